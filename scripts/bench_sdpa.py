"""The peers of `tqkv bench attention`, timed in the same session on the same GPU: PyTorch's
scaled_dot_product_attention on an f16 cache (decode: one query token, GQA 32/8, d = 128; and
a prefill chunk of 512 queries over a past), flash-attn's and FlashInfer's decode kernels when
they are installed, and a device-to-device copy of a 1 GiB buffer (bytes read + written), the
ceiling the issue's "% of copy" is measured against. Times by CUDA events, median of `iters`.

    python3 scripts/bench_sdpa.py --json sdpa.json
"""
import argparse, json, statistics, torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--contexts", default="4096,16384,32768,65536,131072")
p.add_argument("--batch", default="1,16")
p.add_argument("--iters", type=int, default=20)
p.add_argument("--prefill-chunk", type=int, default=512)
p.add_argument("--json")
a = p.parse_args()
dev = "cuda"
hq, hk, d = 32, 8, 128


def median_ms(f, iters):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        f()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


points = []
# Copy bandwidth: 1 GiB → 1 GiB, read + write counted.
src = torch.empty(1 << 29, device=dev, dtype=torch.float16).normal_()
dst = torch.empty_like(src)
ms = median_ms(lambda: dst.copy_(src), 20)
copy_gbps = 2 * src.numel() * 2 / ms / 1e6
print(f"device copy (read + write, 1 GiB): {copy_gbps:.0f} GB/s")
del src, dst
torch.cuda.empty_cache()

peers = {"sdpa": None}
try:
    from flash_attn import flash_attn_with_kvcache  # noqa: F401
    peers["flash-attn"] = None
except Exception:
    pass
try:
    import flashinfer  # noqa: F401
    peers["flashinfer"] = None
except Exception:
    pass
print("peers:", ", ".join(peers))

for b in map(int, a.batch.split(",")):
    for n in map(int, a.contexts.split(",")):
        q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.float16)
        k = torch.randn(b, hk, n, d, device=dev, dtype=torch.float16)
        v = torch.randn(b, hk, n, d, device=dev, dtype=torch.float16)
        bytes_ = 2 * b * hk * n * d * 2
        fs = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
        if "flash-attn" in peers:
            from flash_attn import flash_attn_with_kvcache
            qf, kf, vf = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            fs["flash-attn"] = lambda: flash_attn_with_kvcache(qf, kf, vf)
        if "flashinfer" in peers and b == 1:
            import flashinfer
            kq, vq = k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous()
            fs["flashinfer"] = lambda: flashinfer.single_decode_with_kv_cache(q[0, :, 0], kq, vq)
        for name, f in fs.items():
            try:
                ms = median_ms(f, a.iters)
            except Exception as e:  # a peer that fails is reported, not fatal
                print(f"{name} decode b={b} ctx={n}: failed ({e})")
                continue
            points.append({"peer": name, "op": "decode", "batch": b, "context": n, "ms": ms,
                           "gbps": bytes_ / ms / 1e6})
            print(f"{name} f16 decode b={b} ctx={n}: {ms:.4f} ms, {bytes_ / ms / 1e6:.0f} GB/s")
        del q, k, v, fs
        torch.cuda.empty_cache()

t = a.prefill_chunk
for n in (c for c in map(int, a.contexts.split(",")) if c > t and t > 0):
    # The last chunk of a sequence of n: 512 queries over n keys, causal within the chunk.
    q = torch.randn(1, hq, t, d, device=dev, dtype=torch.float16)
    k = torch.randn(1, hk, n, d, device=dev, dtype=torch.float16)
    v = torch.randn(1, hk, n, d, device=dev, dtype=torch.float16)
    mask = torch.ones(t, n, device=dev, dtype=torch.bool).tril(n - t)
    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                   max(2, a.iters // 4))
    points.append({"peer": "sdpa", "op": "prefill", "batch": 1, "context": n, "ms": ms,
                   "gbps": 2 * hk * n * d * 2 / ms / 1e6})
    print(f"sdpa f16 prefill chunk {t} ctx={n}: {ms:.3f} ms")
    del q, k, v, mask
    torch.cuda.empty_cache()

if a.json:
    json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "copy_gbps": copy_gbps,
               "points": points}, open(a.json, "w"), indent=1)

"""PyTorch's scaled_dot_product_attention on the shapes of `tqkv bench attention` (decode: one
query token, GQA 32/8, d = 128, f16), a peer to time in the same run as our kernels.

    python3 scripts/bench_sdpa.py --json sdpa.json
"""
import argparse, json, torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--contexts", default="4096,16384,32768,65536,131072")
p.add_argument("--batch", default="1,16")
p.add_argument("--iters", type=int, default=20)
p.add_argument("--json")
a = p.parse_args()
dev = "cuda"
hq, hk, d = 32, 8, 128
points = []
for b in map(int, a.batch.split(",")):
    for n in map(int, a.contexts.split(",")):
        q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.float16)
        k = torch.randn(b, hk, n, d, device=dev, dtype=torch.float16)
        v = torch.randn(b, hk, n, d, device=dev, dtype=torch.float16)
        f = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        for _ in range(3):
            f()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(a.iters):
            f()
        e.record()
        torch.cuda.synchronize()
        ms = s.elapsed_time(e) / a.iters
        bytes_ = 2 * b * hk * n * d * 2
        points.append({"batch": b, "context": n, "ms": ms, "gbps": bytes_ / ms / 1e6})
        print(f"sdpa f16 decode b={b} ctx={n}: {ms:.4f} ms, {bytes_ / ms / 1e6:.0f} GB/s")
        del q, k, v
        torch.cuda.empty_cache()
if a.json:
    json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "points": points}, open(a.json, "w"), indent=1)

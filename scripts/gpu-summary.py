"""The summary table of a GPU run (printed last by scripts/gpu-run.sh): for each batch and
context, the f16 peers (PyTorch SDPA, flash-attn, FlashInfer where present) and each tqkv
kind × kernel of `tqkv bench attention`: ms, × SDPA, packed bytes/s as a fraction of the copy
measured by bench_sdpa.py in the same run, and the targets of issue 11 (≥ 3× SDPA at 32K–128K,
≥ 1× at 4K, ≥ 70 % of copy). Also the prefill chunk against SDPA.

    python3 scripts/gpu-summary.py OUT/bench.json OUT/sdpa.json [--md table.md]
"""
import json, sys

bench = json.load(open(sys.argv[1]))
sdpa = json.load(open(sys.argv[2]))
md = sys.argv[sys.argv.index("--md") + 1] if "--md" in sys.argv else None
copy = sdpa.get("copy_gbps") or bench.get("copy_gbps")
peer = {(p.get("peer", "sdpa"), p.get("op", "decode"), p["batch"], p["context"]): p["ms"] for p in sdpa["points"]}
lines = [f"GPU {sdpa.get('device')}, torch {sdpa.get('torch')}; copy {copy:.0f} GB/s (1 GiB, read + write)", ""]
lines += ["| op | batch | context | kind | ms | SDPA ms | × SDPA | GB/s | % of copy | target |",
          "|---|---|---|---|---|---|---|---|---|---|"]
ok_all = True
for p in bench["points"]:
    op = p["op"]
    base_op = "prefill" if op.startswith("prefill") else op
    s = peer.get(("sdpa", base_op, p["batch"], p["context"]))
    x = s / p["ms"] if s else None
    frac = p["gbps"] / copy if copy else None
    target = ""
    if p["kind"].startswith("tq") and x is not None:
        if op == "decode":
            need = 3.0 if p["context"] >= 32768 else 1.0 if p["context"] <= 4096 else None
            good = (need is None or x >= need) and (frac is None or frac >= 0.7)
            target = ("✓" if good else "✗") + (f" (≥{need:g}×, ≥70%)" if need else " (≥70%)")
        elif op == "prefill-fused" and p["context"] >= 16384:
            good = x >= 1.0
            target = ("✓" if good else "✗") + " (≥1×)"
        else:
            good = True
        ok_all &= good
    lines.append(f"| {op} | {p['batch']} | {p['context']} | {p['kind']} | {p['ms']:.4f} | "
                 f"{'-' if s is None else f'{s:.4f}'} | {'-' if x is None else f'{x:.2f}'} | {p['gbps']:.0f} | "
                 f"{'-' if frac is None else f'{100 * frac:.0f}%'} | {target} |")
for (name, op, b, n), ms in sorted(peer.items()):
    if name != "sdpa":
        lines.append(f"| {op} | {b} | {n} | {name} (f16) | {ms:.4f} | - | - | - | - | |")
lines += ["", "all targets hold" if ok_all else "some targets miss (✗)"]
text = "\n".join(lines)
print(text)
if md:
    open(md, "w").write(text + "\n")

#!/usr/bin/env python3
"""Decode attention time against context, and the speed-up over PyTorch SDPA on an f16 cache,
from one GPU run of scripts/gpu-run.sh (bench.json of `tqkv bench attention`, sdpa.json of
scripts/bench_sdpa.py): one panel per batch size, every tqkv kind × kernel, the f16 peers.
Writes <out>/decode-time.png and <out>/decode-speedup.png.

    python3 scripts/plot-kernels.py docs/gpu-runs/<date>/bench.json docs/gpu-runs/<date>/sdpa.json docs/gpu-runs/<date>
"""
import json, os, sys
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

bench, sdpa = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
out = sys.argv[3] if len(sys.argv) > 3 else os.path.dirname(sys.argv[1])
pts = [p for p in bench["points"] if p["op"] == "decode"]
peers = [p for p in sdpa["points"] if p.get("op", "decode") == "decode"]
batches = sorted({p["batch"] for p in pts})
kinds = list(dict.fromkeys(p["kind"] for p in pts))
device = sdpa.get("device", "GPU")


def series(points, key):
    xs = sorted(points, key=lambda p: p["context"])
    return [p["context"] for p in xs], [key(p) for p in xs]


for what in ("time", "speedup"):
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, b in zip(axes[0], batches):
        base = {p["context"]: p["ms"] for p in peers if p.get("peer", "sdpa") == "sdpa" and p["batch"] == b}
        for kind in kinds:
            mine = [p for p in pts if p["kind"] == kind and p["batch"] == b]
            if what == "time":
                x, y = series(mine, lambda p: p["ms"])
            else:
                mine = [p for p in mine if p["context"] in base]
                x, y = series(mine, lambda p: base[p["context"]] / p["ms"])
            ax.plot(x, y, marker="o", label=kind, linestyle="--" if "[tc]" in kind else "-")
        if what == "time":
            for name in sorted({p.get("peer", "sdpa") for p in peers}):
                x, y = series([p for p in peers if p.get("peer", "sdpa") == name and p["batch"] == b], lambda p: p["ms"])
                if x:
                    ax.plot(x, y, marker="s", color="black" if name == "sdpa" else None, label=f"{name} (f16)")
            ax.set_yscale("log")
            ax.set_ylabel("ms per decode step (all 32 query heads)")
        else:
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.axhline(3.0, color="tab:red", linewidth=0.8, linestyle=":", label="target 3×")
            ax.set_ylabel("× faster than PyTorch SDPA on f16")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(f"batch {b}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"decode attention, Llama-3.1-8B shapes (32/8 heads, d = 128), {device}")
    fig.tight_layout()
    path = os.path.join(out, f"decode-{what}.png")
    fig.savefig(path, dpi=110)
    print("wrote", path)

#!/usr/bin/env python3
"""Concurrent sequences and completion tokens/s per cache kind at one KV budget, from the JSON
of `tqkv bench serve` (docs/serving/bench-cpu-{prefill,decode,system,system-noshare}-DATE.json,
the newest DATE unless one is given). Writes docs/serving/concurrency.png.

    pip install matplotlib && python3 scripts/plot-serving.py [DATE]
"""
import glob, json, os, sys
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "serving")
dates = sorted(os.path.basename(f)[len("bench-cpu-prefill-"):-5]
               for f in glob.glob(os.path.join(root, "bench-cpu-prefill-*.json")))
date = sys.argv[1] if len(sys.argv) > 1 else dates[-1]
runs = [("prefill-heavy (192 + 64 tokens)", ["prefill"]),
        ("decode-heavy (32 + 224 tokens)", ["decode"]),
        ("shared 512-token system message", ["system", "system-noshare"])]
runs = [(t, fs) for t, fs in runs
        if os.path.exists(os.path.join(root, f"bench-cpu-{fs[0]}-{date}.json"))]
fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4))
for ax, (title, fs) in zip(axes, runs):
    rows = []
    for f in fs:
        path = os.path.join(root, f"bench-cpu-{f}-{date}.json")
        if os.path.exists(path):
            for r in json.load(open(path)):
                if f.endswith("noshare"):
                    r = dict(r, kind=r["kind"] + "\nnot shared")
                rows.append(r)
    kinds = [r["kind"] for r in rows]
    x = range(len(kinds))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [r["fit_full_length"] for r in rows], w, label="fit at full length")
    ax.bar([i + w / 2 for i in x], [r["peak_sequences"] for r in rows], w, label="peak run at once")
    ax.set_xticks(list(x), kinds)
    ax.set_ylabel(f"sequences in {rows[0]['kv_memory']} of KV")
    ax.set_title(title)
    ax2 = ax.twinx()
    ax2.plot(list(x), [r["tokens_per_s"] for r in rows], "ko-", label="completion tokens/s")
    ax2.set_ylim(0, max(r["tokens_per_s"] for r in rows) * 1.3)
    ax2.set_ylabel("completion tokens/s (2 CPU cores)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
fig.suptitle(f"tqkv serve, SmolLM2-135M-Instruct, 64 concurrent clients (CPU, {date})")
fig.tight_layout()
out = os.path.join(root, "concurrency.png")
fig.savefig(out, dpi=110)
print(out)

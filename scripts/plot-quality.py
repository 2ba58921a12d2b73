#!/usr/bin/env python3
"""Mean KL divergence against KV-cache compression, from the JSON files of `tqkv eval kld`
(docs/eval/gpl3-smollm2*.json, 4 windows of 512 tokens each): docs/eval/kld-vs-size.png.

    pip install matplotlib && python3 scripts/plot-quality.py
"""
import glob, json, os, sys
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
rows = {}
for path in sorted(glob.glob(os.path.join(root, "docs/eval/gpl3-smollm2*.json"))):
    data = json.load(open(path))
    if "rows" not in data or data.get("windows") != 4:
        continue
    suffix = " +keep2" if path.endswith("keep2.json") else ""
    for r in data["rows"]:
        name = r["kind"] + suffix
        if r["mean_kld"] > 0 and name not in rows:
            rows[name] = (r["f16_bytes"] / r["kv_bytes"], r["mean_kld"])
if not rows:
    sys.exit("no eval JSON with 4 windows under docs/eval/")


baselines = ["q8", "q4h", "kivi4", "kivi2"]
paper = ["tq2.5", "tq3.5", "tq4", "tqk4v3", "tqk5v3"]
fig, ax = plt.subplots(figsize=(9, 6))


def draw(names, color, marker, label):
    pts = [(n, rows[n]) for n in names if n in rows]
    ax.scatter([p[1][0] for p in pts], [p[1][1] for p in pts], color=color, marker=marker,
               label=label, zorder=3, s=40)
    for n, (x, y) in pts:
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8, color=color)


draw(baselines, "tab:gray", "s", "baselines (q4h = llama.cpp's q4_0 + Hadamard)")
draw(paper, "tab:blue", "o", "TurboQuant as in the paper (MSE, exact norms)")
draw([n + "-pn-c" for n in paper] + ["tqk4.5v3-pn-c"], "tab:red", "o",
     "+ projected norms and centred keys (-pn-c)")
for n in paper:
    if n in rows and n + "-pn-c" in rows:
        (x0, y0), (x1, y1) = rows[n], rows[n + "-pn-c"]
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", color="tab:red", alpha=0.5))
if "q4h" in rows:
    ax.axhline(rows["q4h"][1], color="tab:gray", ls="--", lw=0.8)
ax.set_ylim(3e-4, 1.0)
ax.set_yscale("log")
ax.set_xlabel("KV cache compression vs f16 (×)")
ax.set_ylabel("mean KL divergence vs f16 cache (nats / token, log)")
ax.set_title("SmolLM2-135M-Instruct, GPL-3 text, 4 × 512-token windows (tqkv eval kld)")
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8, loc="lower right")
out = os.path.join(root, "docs/eval/kld-vs-size.png")
fig.tight_layout()
fig.savefig(out, dpi=110)
print(out)

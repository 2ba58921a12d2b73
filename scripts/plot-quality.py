#!/usr/bin/env python3
"""Mean KL divergence against all-in bits per channel, from the JSON files of
scripts/quality-evals.sh (docs/eval/{gpl3,gfdl13,gnu}-{512,2048}.json): one panel per context
length, every text, the presets, the paper's configurations, our baselines, and llama.cpp's own
q4_0 / q5_0 / q8_0 measurements on the same model (../shared/docs/ANCHORS.md, ctx 512).
Writes docs/eval/kld-vs-bits.png.

    pip install matplotlib && python3 scripts/plot-quality.py
"""
import json, os, sys
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
texts = {"gpl3": ("GPL-3", "o"), "gfdl13": ("GFDL-1.3", "s"), "gnu": ("GNU standards", "^")}
groups = [
    (["tq4", "tq3.5", "tq2.5"], "tab:red", "tqkv presets"),
    (["tq4 (f16 window)", "tq3.5 (f16 window)", "tq2.5 (f16 window)"], "tab:orange",
     "the presets with an f16 window (before -wq8)"),
    (["tq4-paper", "tq3.5-paper", "tq2.5-paper"], "tab:blue", "TurboQuant as in the paper"),
    (["q8", "q5h", "q4h"], "tab:gray", "llama.cpp q8_0 / q5_0 / q4_0 + Hadamard (ours)"),
    (["kivi4", "kivi4-r0", "kivi2"], "tab:green", "KIVI (window 128; -r0: none)"),
]
# llama.cpp 0c1e570 on SmolLM2-135M, ctx 512, two licence texts (ANCHORS.md): (bits, low, high).
llama_cpp = [("q8_0", 8.5, 0.0045, 0.0049), ("q5_0", 5.5, 0.022, 0.025), ("q4_0+H", 4.5, 0.068, 0.078)]

fig, axes = plt.subplots(1, 2, figsize=(14, 6), sharey=True)
found = False
for ax, ctx in zip(axes, [512, 2048]):
    for key, (tname, marker) in texts.items():
        path = os.path.join(root, f"docs/eval/{key}-{ctx}.json")
        if not os.path.exists(path):
            continue
        found = True
        rows = {r["kind"]: r for r in json.load(open(path))["rows"]}
        for names, color, label in groups:
            pts = [(rows[n]["bits_per_channel"], rows[n]["mean_kld"], n) for n in names if n in rows]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker,
                       s=45, zorder=3, label=f"{label}" if key == "gpl3" else None)
            if key == "gpl3":
                for x, y, n in pts:
                    ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8,
                                color=color)
    if ctx == 512:
        for n, b, lo, hi in llama_cpp:
            ax.plot([b, b], [lo, hi], color="black", lw=3, alpha=0.6, zorder=2)
            ax.annotate(f"llama.cpp {n}", (b, hi), textcoords="offset points", xytext=(4, 6),
                        fontsize=8)
    ax.axvline(4.0, color="tab:red", ls=":", lw=0.8)
    ax.axvline(3.0, color="tab:red", ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlim(2.5, 10)
    ax.set_ylim(2e-4, 1.0)
    ax.set_xticks([3, 4, 5, 6, 8])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("all-in bits per channel (codes, norms, exact tokens, tables; f16 = 16)")
    ax.set_title(f"ctx {ctx}: ○ GPL-3, □ GFDL-1.3, △ GNU standards")
    ax.grid(True, which="both", alpha=0.3)
axes[0].set_ylabel("mean KL divergence vs an f16 cache (nats / token)")
axes[0].legend(fontsize=8, loc="lower left")
if not found:
    sys.exit("no docs/eval/*-512.json or *-2048.json: run scripts/quality-evals.sh")
fig.suptitle("SmolLM2-135M-Instruct, tqkv eval kld (lower left is better)")
out = os.path.join(root, "docs/eval/kld-vs-bits.png")
fig.tight_layout()
fig.savefig(out, dpi=110)
print(out)

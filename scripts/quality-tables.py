#!/usr/bin/env python3
"""Markdown tables for docs/QUALITY.md from the JSON files of scripts/quality-evals.sh:
per context length, one row per cache kind with mean KLD and top-1 agreement on each text and
the all-in size; then the targets of issue 10 checked against them.

    python3 scripts/quality-tables.py > /tmp/tables.md
"""
import json, os

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
texts = [("gpl3", "GPL-3"), ("gfdl13", "GFDL-1.3"), ("gnu", "GNU standards")]


def load(name):
    path = os.path.join(root, "docs/eval", name + ".json")
    if not os.path.exists(path):
        return None
    return json.load(open(path))


for ctx in (512, 2048):
    data = {k: load(f"{k}-{ctx}") for k, _ in texts}
    data = {k: v for k, v in data.items() if v}
    if not data:
        continue
    kinds = []
    for v in data.values():
        for r in v["rows"]:
            if r["kind"] not in kinds:
                kinds.append(r["kind"])
    heads = [t for k, t in texts if k in data]
    print(f"### ctx {ctx}\n")
    print("| kv | bits/channel | vs f16 | " + " | ".join(f"{t}: KLD / top-1" for t in heads) + " |")
    print("|---|---|---|" + "---|" * len(heads))
    for kind in kinds:
        cells, size = [], None
        for k, _ in texts:
            if k not in data:
                continue
            row = next((r for r in data[k]["rows"] if r["kind"] == kind), None)
            if row is None:
                cells.append("–")
                continue
            size = size or (row["bits_per_channel"], row["f16_bytes"] / row["kv_bytes"])
            cells.append(f"{row['mean_kld']:.4f} / {100 * row['top1']:.1f}%")
        print(f"| {kind} | {size[0]:.2f} | {size[1]:.2f}× | " + " | ".join(cells) + " |")
    info = ", ".join(
        f"{t}: {data[k]['windows']} windows ({data[k]['rows'][0]['tokens']} scored tokens"
        + (f", from token {data[k].get('skip', 0)}" if data[k].get("skip") else "")
        + ")"
        for k, t in texts
        if k in data
    )
    print(f"\n{info}.\n")

targets = [
    ("tq3.5", 512, 0.020, 0.92, 4.0),
    ("tq3.5", 2048, 0.010, 0.95, 4.0),
    ("tq2.5", 512, 0.07, None, 16 / 3),
    ("tq2.5", 2048, 0.035, None, 16 / 3),
]
print("### The targets\n")
print("| kind | ctx | target | " + " | ".join(t for _, t in texts) + " |")
print("|---|---|---|" + "---|" * len(texts))
for kind, ctx, kld, top1, ratio in targets:
    cells = []
    for k, _ in texts:
        d = load(f"{k}-{ctx}")
        row = d and next((r for r in d["rows"] if r["kind"] == kind), None)
        if not row:
            cells.append("–")
            continue
        r = row["f16_bytes"] / row["kv_bytes"]
        ok = row["mean_kld"] <= kld and (top1 is None or row["top1"] >= top1) and r >= ratio - 0.005
        cells.append(
            f"{'✓' if ok else '✗'} {row['mean_kld']:.4f}, {100 * row['top1']:.1f}%, {r:.2f}×"
        )
    want = f"KLD ≤ {kld}" + (f", top-1 ≥ {100 * top1:.0f}%" if top1 else "") + f", ≥ {ratio:.2f}×"
    print(f"| {kind} | {ctx} | {want} | " + " | ".join(cells) + " |")

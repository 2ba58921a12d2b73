#!/usr/bin/env python3
"""Markdown table of criterion results: median time per benchmark and the ratio to a baseline
benchmark of the same group, from target/criterion/<group>/<bench>/new/*.json.

usage: criterion-table.py GROUP_PREFIX BASELINE [--elements]
"""
import glob, json, os, sys

prefix, baseline = sys.argv[1], sys.argv[2]
elements = "--elements" in sys.argv
rows = {}
for est in glob.glob(f"target/criterion/{prefix}*/*/new/estimates.json"):
    d = os.path.dirname(est)
    bench = json.load(open(os.path.join(d, "benchmark.json")))
    group, name = bench["group_id"], bench["value_str"] or bench["function_id"]
    ns = json.load(open(est))["median"]["point_estimate"]
    n = (bench.get("throughput") or {}).get("Elements", 1) if elements else 1
    rows.setdefault(group, {})[name] = (ns, n)
print("| group | kind | median time | per second | × " + baseline + " (time ratio) |")
print("|---|---|---|---|---|")
import re
def natural(g):
    # decode_ctx1024 < decode_ctx4096 < decode_ctx16384: numbers compare as numbers.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", g)]
for group in sorted(rows, key=natural):
    base = rows[group].get(baseline)
    for name, (ns, n) in sorted(rows[group].items(), key=lambda kv: kv[1][0]):
        t = f"{ns/1e3:,.1f} µs" if ns < 1e6 else f"{ns/1e6:,.2f} ms"
        ratio = f"{ns/base[0]:.2f}" if base else "–"
        print(f"| {group} | {name} | {t} | {n/(ns*1e-9):,.0f} | {ratio} |")

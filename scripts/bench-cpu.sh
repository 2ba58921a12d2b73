#!/usr/bin/env bash
# Runs the criterion CPU bench (benches/cpu.rs) and writes docs/BENCH_CPU.md: vectors/s and
# bytes/s of quantize, dequantize and score, and the ratio to the f16 baseline of the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench cpu >&2
python3 - "$@" <<'PY'
import json, glob, os, datetime, subprocess
rows = {}
for est in glob.glob("target/criterion/*/*/new/estimates.json"):
    parts = est.split(os.sep)
    op, ident = parts[2], parts[3]
    bench = json.load(open(os.path.join(os.path.dirname(est), "benchmark.json")))
    name = bench["value_str"] or ident
    elems = bench["throughput"]["Elements"]
    ns = json.load(open(est))["median"]["point_estimate"]
    rows[(op, name)] = elems / (ns * 1e-9)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
out = ["# CPU throughput of the reference quantizer", "",
       f"`scripts/bench-cpu.sh` (criterion, `cargo bench --bench cpu`), {datetime.date.today()}, "
       f"{os.cpu_count()} cores ({cpu}), single thread.", "",
       "Vectors per second (median); bytes/s = vectors/s × bytes per vector (f32 input for "
       "quantize, the packed record or f16 vector for dequantize and score); `× f16` = our "
       "vectors/s over the f16 baseline's at the same d, measured in the same run (f16: convert "
       "f32→f16, f16→f32, dot product of an f32 query with an f16 key).", "",
       "| op | setting | d | vectors/s | MB/s | × f16 |", "|---|---|---|---|---|---|"]
import re
def rb(setting, d):
    return {"mse4": 2 + d // 2, "tq3.5": 4 + d * 7 // 16, "prod3": 4 + d // 4 + d // 8,
            "mse4-hadamard": 2 + d // 2, "f16": 2 * d}[setting]
for op in ["quantize", "dequantize", "score"]:
    for (o, name), vps in sorted(rows.items()):
        if o != op: continue
        setting, d = name.split("/d"); d = int(d)
        base = rows.get((op, f"f16/d{d}"))
        nbytes = 4 * d if op == "quantize" else rb(setting, d)
        out.append(f"| {op} | {setting} | {d} | {vps:,.0f} | {vps*nbytes/1e6:,.1f} | "
                   f"{vps/base:.3f} |" if base else "")
out += ["", "This is the plain reference path (allocates per call, scalar codebook look-ups); the "
        "candle layer's CPU path (issue 3) and the CUDA kernels (issue 5) are where speed is "
        "engineered. The ratios say how far the reference is from the f16 cost today."]
open("docs/BENCH_CPU.md", "w").write("\n".join(out) + "\n")
print("wrote docs/BENCH_CPU.md")
PY

#!/usr/bin/env bash
# CPU decode-step attention per cache kind (crates/tqkv-candle/benches/decode.rs) →
# docs/BENCH_DECODE_CPU.md, with f16 as the baseline of the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -p tqkv-candle --bench decode >&2
{
  echo "# One decode step of attention on the CPU, per cache kind"
  echo
  echo "\`scripts/bench-decode-cpu.sh\` on $(date -u +%Y-%m-%d), $(nproc) cores"
  echo "($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')): one layer of"
  echo "SmolLM2-135M's attention (9 query heads, 3 KV heads, head_dim 64), batch 1, append one"
  echo "token and attend, at a context of 1K, 4K and 16K tokens. Ratio = median time / f16's median"
  echo "time in the same run (below 1 is faster than f16). CPU times are for comparison between"
  echo "kinds only; absolute numbers count from a GPU."
  echo
  python3 scripts/criterion-table.py decode_ctx f16
} > docs/BENCH_DECODE_CPU.md
echo "wrote docs/BENCH_DECODE_CPU.md" >&2

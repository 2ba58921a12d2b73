#!/usr/bin/env bash
# Runs the CUDA attention kernels on the CPU (no GPU needed): kernels/decode_attention.cu is
# compiled as C++ with the host emulator tests/emu/tq_emu.h (-DTQ_EMU; fibers per thread,
# warp collectives, ldmatrix and mma.sync emulated per the PTX ISA), tests/emu_cases.rs writes
# fresh random cases with the CPU reference's outputs, and tests/emu/harness.cpp compares both
# split kernels (several plans, and the tensor-core one through a shuffled tile table).
# Needs g++ and the CUDA headers (installed from PyPI by scripts/install-nvcc.sh). ~1 min.
#   scripts/emulate-kernels.sh            # replay a case set: TQKV_TEST_SEED=… scripts/emulate-kernels.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
eval "$(scripts/install-nvcc.sh)"
dir=target/emu
rm -rf "$dir"
mkdir -p "$dir"
g++ -O2 -std=c++17 -Wall -Wno-unused-function -Wno-unknown-pragmas -Wno-sign-compare -Wno-class-memaccess -Werror -DTQ_EMU -I tests/emu -I kernels -I "$CUDA_ROOT/include" \
  tests/emu/harness.cpp -o "$dir/harness"
TQKV_EMU_DIR="$dir" cargo test --release --quiet --test emu_cases -- --ignored --nocapture
"$dir/harness" "$dir"/*.bin

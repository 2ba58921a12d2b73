#!/usr/bin/env bash
# Installs CUDA 13.0's nvcc (and the headers it needs) from PyPI into .cuda/ and prints the
# environment to use it. Works on a machine without a GPU or a CUDA toolkit.
#   source <(scripts/install-nvcc.sh)    # then: cargo build --features cuda
# Pins (../shared/docs/GPU.md): nvvm must be 13.0 (13.5's PTX is rejected by the 13.0 ptxas and
# the 580 driver); cccl is needed by cuda_fp16.h.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.cuda"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
cu="$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13 | head -1)"
test -x "$cu/bin/nvcc" || { echo "nvcc not found under $cu" >&2; exit 1; }
echo "export CUDA_ROOT=$cu"
echo "export PATH=$cu/bin:\$PATH"
echo "export CUDA_COMPUTE_CAP=90"
echo "export CUDAFORGE_THREADS=2"

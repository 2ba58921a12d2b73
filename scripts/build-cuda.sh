#!/usr/bin/env bash
# Builds with the `cuda` feature on a machine without a GPU or CUDA libraries
# (../shared/docs/GPU.md): installs CUDA 13.0's nvcc from PyPI (scripts/install-nvcc.sh), patches
# two candle crates outside git (cudarc dynamic-loading instead of dynamic-linking; cudart linked
# statically), and runs cargo with those patches. Cargo.lock is restored afterwards.
#
#   scripts/build-cuda.sh build --release --features cuda -p tqkv-cli
#   scripts/build-cuda.sh test --release --features cuda --no-run
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
eval "$(scripts/install-nvcc.sh)"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
cargo fetch --quiet
reg="$(dirname "$(cargo metadata --format-version 1 --quiet | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "candle-core"))')")/.."
patch="$root/target/cuda-patch"
mkdir -p "$patch"
for crate in candle-core-0.11.1 candle-kernels-0.11.1; do
  if [ ! -d "$patch/$crate" ]; then
    cp -r "$reg/$crate" "$patch/$crate.tmp"
    mv "$patch/$crate.tmp" "$patch/$crate"
  fi
done
# cudarc: load the CUDA libraries at run time instead of linking them.
sed -i 's/"dynamic-linking"/"dynamic-loading"/' "$patch/candle-core-0.11.1/Cargo.toml"
# candle-kernels: link the static CUDA runtime shipped with the PyPI nvcc.
python3 - "$patch/candle-kernels-0.11.1/build.rs" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
old = 'println!("cargo:rustc-link-lib=dylib=cudart");'
new = ('println!("cargo:rustc-link-search={}/lib", std::env::var("CUDA_ROOT").expect("CUDA_ROOT"));\n'
       '    println!("cargo:rustc-link-lib=static=cudart_static");\n'
       '    println!("cargo:rustc-link-lib=dylib=rt");\n'
       '    println!("cargo:rustc-link-lib=dylib=dl");')
if old in s:
    open(p, "w").write(s.replace(old, new))
PY
cat > "$patch/config.toml" <<TOML
[patch.crates-io]
candle-core = { path = "$patch/candle-core-0.11.1" }
candle-kernels = { path = "$patch/candle-kernels-0.11.1" }
TOML
cp Cargo.lock "$patch/Cargo.lock.orig"
trap 'cp "$patch/Cargo.lock.orig" "$root/Cargo.lock"' EXIT
cargo --config "$patch/config.toml" "$@"

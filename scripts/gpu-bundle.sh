#!/usr/bin/env bash
# Builds the bundle for a GPU machine that has no Rust toolchain (../shared/docs/GPU.md):
# the CUDA test binaries and the release `tqkv` binary, stripped and xz-compressed, in the
# git-ignored folder .gpu-bundle/ (a device run carries it; scripts/gpu-run.sh runs it there).
# The default model's GGUF (94 MiB) is over one carry's 64 MiB, so it is split: part a goes into
# .gpu-bundle/, part b (with the model test binary) into .gpu-model/, carried by a second call
# while the machine is warm (files in /tmp survive between calls to a warm machine).
#
#   scripts/gpu-bundle.sh            # then: device run, carry [".gpu-bundle"], scripts/gpu-run.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out=.gpu-bundle
rm -rf "$out" .gpu-model
mkdir -p "$out" .gpu-model
json=$(mktemp)
scripts/build-cuda.sh test --release --features cuda --workspace --no-run --message-format=json >"$json"
scripts/build-cuda.sh build --release --features cuda -p tqkv-cli
python3 - "$json" "$out" <<'PY'
import json, sys, shutil
want = {("tqkv", "gpu_kernels"), ("tqkv-candle", "cuda"), ("tqkv-llama", "cuda_model")}
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    for p, t in want:
        if m["target"]["name"] == t and p in m["package_id"]:
            shutil.copy(m["executable"], f"{sys.argv[2]}/test-{p}-{t}")
PY
rm -f "$json"
cp target/release/tqkv "$out/tqkv"
for f in "$out"/*; do
  strip "$f"
  xz -T2 -6 "$f"
done
ls "$out" | grep -c test- | grep -q '^3$' || { echo "expected 3 test binaries in $out" >&2; ls -la "$out" >&2; exit 1; }
gguf="models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$gguf" ] || scripts/fetch-model.sh
sha256sum "$gguf" | awk '{print $1}' >"$out/model.sha256"
# Two carries of under 64 MiB each: binaries + part a, then the model test + part b.
head -c 46137344 "$gguf" >"$out/model.part-a"
tail -c +46137345 "$gguf" >.gpu-model/model.part-b
mv "$out/test-tqkv-llama-cuda_model.xz" .gpu-model/
du -sh "$out" .gpu-model

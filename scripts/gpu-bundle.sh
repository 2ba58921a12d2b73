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
# Kernels for the lent GPU only (H100/H200: sm_90; TQKV_CUDA_ARCH=80 for an A100): a third of
# the fat binaries' size, so that binaries and model fit two carries.
export TQKV_CUDA_ARCH="${TQKV_CUDA_ARCH:-90}"
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
# Two carries of under 64 MiB each (the working tree travels with each): the kernel and
# candle test binaries, tqkv and part a of the model; then the model test and part b. Part a
# takes what room the first carry has left.
mib=$((1024 * 1024))
limit=$((63 * mib))
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
model=$(stat -c %s "$gguf")
mv "$out/test-tqkv-llama-cuda_model.xz" .gpu-model/
used=$(du -cb "$out"/* | tail -1 | cut -f1)
part_a=$((limit - tree - used))
[ "$part_a" -gt "$model" ] && part_a=$model
[ "$part_a" -gt 0 ] || { echo "no room for the model in $out ($used bytes of binaries)" >&2; exit 1; }
head -c "$part_a" "$gguf" >"$out/model.part-a"
tail -c +$((part_a + 1)) "$gguf" >.gpu-model/model.part-b
second=$(( $(du -cb .gpu-model/* | tail -1 | cut -f1) + tree ))
if [ "$second" -gt "$limit" ]; then
  echo "the second carry would be $((second / mib)) MiB (over 63): binaries too large" >&2
  exit 1
fi
du -sh "$out" .gpu-model
echo "carry 1: $(( ($(du -cb "$out"/* | tail -1 | cut -f1) + tree) / mib )) MiB, carry 2: $((second / mib)) MiB (with the working tree)"

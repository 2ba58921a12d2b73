#!/usr/bin/env bash
# Runs on a GPU machine without Rust, from the repository root, over the bundle made by
# scripts/gpu-bundle.sh (.gpu-bundle/, and .gpu-model/ for the second half of the model).
# Writes logs and JSON into $1 (default $OUT). Stages, in order given (default: all):
#   tests      the GPU tests of the kernels and of the candle caches
#   model-test the model on CUDA against the CPU, and greedy answers with each cache (after model)
#   sanitizer  the kernel tests under compute-sanitizer memcheck, racecheck and initcheck
#   bench      tqkv bench attention (Llama-3.1-8B shapes, 4K–128K, batch 1 and 16; split and
#              tensor-core kernels) + the peers and the 1 GiB copy (scripts/bench_sdpa.py)
#   summary    the table of scripts/gpu-summary.py (× SDPA, % of copy, the targets), last
#   profile    Nsight Compute on the tensor-core split kernel (batch 16, 128K)
#   model      reassemble the default GGUF (part a kept in /tmp from an earlier call, part b here)
#   chat       tqkv chat --device cuda with the f16 and tq3.5 caches, one question each
#   serve      tqkv bench serve --device cuda: f16, tq3.5, tq2.5 at one KV budget, and chats
#              sharing a system message (after model)
set -uo pipefail
out="${1:-${OUT:?give an output folder}}"
shift || true
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests sanitizer bench profile summary)
mkdir -p "$out"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
bin=/tmp/tqkv-bin
mkdir -p "$bin" /tmp/tqkv-parts
for d in .gpu-bundle .gpu-model; do
  [ -d $d ] || continue
  for f in $d/*.xz; do xz -dc "$f" >"$bin/$(basename "$f" .xz)"; done
  cp $d/model.* /tmp/tqkv-parts/ 2>/dev/null
done
chmod +x "$bin"/* 2>/dev/null
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
fail=0
run() { # name, command...
  local name=$1; shift
  echo "== $name: $*"
  local t0=$(date +%s)
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $(( $(date +%s) - t0 )) s"
  tail -n 25 "$out/$name.log"
  [ $rc -ne 0 ] && fail=1
  return 0
}
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
for s in "${stages[@]}"; do
  case $s in
    model)
      mkdir -p models
      cat /tmp/tqkv-parts/model.part-a /tmp/tqkv-parts/model.part-b >"$gguf" 2>/dev/null
      if [ "$(sha256sum "$gguf" | awk '{print $1}')" = "$(cat /tmp/tqkv-parts/model.sha256)" ]; then
        echo "== model: reassembled $gguf"
      else
        echo "== model: parts missing or corrupt"; rm -f "$gguf"; fail=1
      fi ;;
    tests)
      run test-kernels "$bin/test-tqkv-gpu_kernels" --test-threads=1 --nocapture
      run test-candle "$bin/test-tqkv-candle-cuda" --test-threads=1 --nocapture ;;
    model-test)
      run test-model "$bin/test-tqkv-llama-cuda_model" --test-threads=1 --nocapture ;;
    sanitizer)
      run memcheck compute-sanitizer --tool memcheck --error-exitcode 9 "$bin/test-tqkv-gpu_kernels" --test-threads=1
      run racecheck compute-sanitizer --tool racecheck --error-exitcode 9 "$bin/test-tqkv-gpu_kernels" --test-threads=1
      run initcheck compute-sanitizer --tool initcheck --error-exitcode 9 "$bin/test-tqkv-gpu_kernels" --test-threads=1 attention ;;
    bench)
      run bench "$bin/tqkv" bench attention --device cuda --json "$out/bench.json"
      cp "$out/bench.log" "$out/bench.md"
      run sdpa python3 scripts/bench_sdpa.py --json "$out/sdpa.json" ;;
    summary)
      python3 scripts/gpu-summary.py "$out/bench.json" "$out/sdpa.json" --md "$out/summary.md" || fail=1 ;;
    profile)
      run profile ncu --clock-control none --set full -k regex:tq_tc_split -c 2 \
        "$bin/tqkv" bench attention --device cuda --kv tq3.5-paper --batch 16 --contexts 131072 \
        --iters 1 --prefill-chunk 0 --kernels tc ;;
    chat)
      for kv in f16 tq3.5-paper tq3.5; do
        run "chat-$kv" "$bin/tqkv" chat --device cuda --kv "$kv" --model "$gguf" --temperature 0 \
          --prompt "What is the capital of France? Answer in one sentence."
      done ;;
    serve)
      # docs/SERVING.md's headline on the GPU: the same budget and requests as on the CPU,
      # and a larger budget with more clients.
      run serve-48m "$bin/tqkv" bench serve --device cuda --model "$gguf" --kinds f16,tq3.5,tq2.5 \
        --kv-memory 48MiB --clients 64 --requests 64 --prompt-tokens 192 --max-tokens 64 \
        --max-context 1024 --json "$out/serve-48m.json"
      run serve-512m "$bin/tqkv" bench serve --device cuda --model "$gguf" --kinds f16,tq3.5,tq2.5 \
        --kv-memory 512MiB --clients 256 --requests 256 --prompt-tokens 512 --max-tokens 256 \
        --max-batch 256 --max-context 2048 --json "$out/serve-512m.json"
      # Chats sharing one 512-token system message (its tiles held once by tq3.5).
      run serve-system "$bin/tqkv" bench serve --device cuda --model "$gguf" --kinds f16,tq3.5 \
        --kv-memory 48MiB --clients 64 --requests 64 --system-tokens 512 --prompt-tokens 32 \
        --max-tokens 64 --max-context 1024 --json "$out/serve-system.json" ;;
    *) echo "unknown stage $s"; fail=1 ;;
  esac
done
exit $fail

#!/usr/bin/env bash
# The measurements of docs/QUALITY.md: `tqkv eval kld` of the presets, the paper's
# configurations and the baselines on three texts at 512 and 2048 tokens, and the ablations of
# the quality mechanisms, as JSON under docs/eval/ (one file per table). About 3 hours on 2 cores.
#
#   scripts/quality-evals.sh [main|ablations|all]     (default: all)
#   scripts/quality-evals.sh presets                  the presets again, merged into main's files
#                                                     (the rows they replace kept as "<kind> (before)")
#
# Texts: the GPL-3 and GFDL-1.3 licences Debian ships, and the GNU Coding Standards
# (scripts/fetch-texts.sh). The per-layer profile of tq3.5 was measured on the GNU text's first
# 2048 tokens, so that text is scored from token 8192 on.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
what="${1:-all}"
cargo build --release -p tqkv-cli >&2
scripts/fetch-model.sh >/dev/null
gnu="$(scripts/fetch-texts.sh)"
tqkv=target/release/tqkv
out=docs/eval
mkdir -p "$out"

run() { # name text ctx windows skip kinds
  local name=$1 text=$2 ctx=$3 win=$4 skip=$5 kinds=$6
  echo "== $name (ctx $ctx, $win windows, skip $skip): $kinds" >&2
  "$tqkv" eval kld --text "$text" --ctx "$ctx" --windows "$win" --skip "$skip" --kv "$kinds" \
    --json "$out/$name.json" | tee "$out/$name.md"
}

# `run`, then its rows merged into the existing file of that name (scripts/merge-eval.py).
rerun() { # name text ctx windows skip kinds
  run "$1.new" "$2" "$3" "$4" "$5" "$6"
  python3 scripts/merge-eval.py "$out/$1.json" "$out/$1.new.json" --rename-old " (before)"
  rm -f "$out/$1.new.json" "$out/$1.new.md"
}

# The three texts at both lengths: $1 = run or rerun, $2 the kinds at 512 tokens, $3 at 2048.
texts() {
  "$1" gpl3-512 /usr/share/common-licenses/GPL-3 512 4 0 "$2"
  "$1" gfdl13-512 /usr/share/common-licenses/GFDL-1.3 512 4 0 "$2"
  "$1" gnu-512 "$gnu" 512 4 8192 "$2"
  "$1" gpl3-2048 /usr/share/common-licenses/GPL-3 2048 3 0 "$3"
  "$1" gfdl13-2048 /usr/share/common-licenses/GFDL-1.3 2048 2 0 "$3"
  "$1" gnu-2048 "$gnu" 2048 3 8192 "$3"
}

main512="f32,q8,q5h,q4h,kivi4,kivi4-r0,kivi2,tq4-paper,tq3.5-paper,tq2.5-paper,tq4,tq3.5,tq2.5"
main2048="q8,q5h,q4h,kivi4,tq3.5-paper,tq4,tq3.5,tq2.5"
if [ "$what" = presets ]; then
  texts rerun tq4,tq3.5,tq2.5 tq4,tq3.5,tq2.5
fi
if [ "$what" = main ] || [ "$what" = all ]; then
  texts run "$main512" "$main2048"
fi

# Ablations at 4 bits per channel all-in (tq3.5's budget), GPL-3: the paper's configuration, then
# each mechanism added; each mechanism alone against the preset's base; the per-layer profile.
ladder="tq3.5-paper,tq3.5-had,tq3.5-had-pn,tq3.5-had-pn-c,tqk4v2-had-pn-c-s1-b4,tqk4v2-had-pn-c-s1-b4-r4,tqk4v2-had-pn-c-s1-b4-r4-wq8,tq3.5"
alone="tqk4v2-had-pn-c-b4,tqk4v2-had-pn-c-s4-b4,tqk4v2-had-pn-c-s1,tqk4v2-had-pn-c-s1-w29,tqk4v2-had-c-s1-b4,tqk4v2-had-pnk-c-s1-b4,tqk4v2-had-pn-s1-b4,tqk4v2-had-pn-c-cv-s1-b4,tqk4v2-had-pn-c-ks0.25-s1-b4,tqk4v2-had-pn-c-ks0.5-s1-b4,tqk4v2-had-pn-c-fc-s1-b4,tqk4v2-pn-c-s1-b4,tqk4v2-had-pn-c-s1-b4-r2,tqk3.5v2.5-had-pn-c-s1-b4-r4,tqk4v2.5-had-pn-c-s1-b4-r4,tqk3v2-had-pn-c-s1-b4-r4,tqk4.5v2-had-pn-c-s1-b4-r4,tqk4v3-had-pn-c-s1-b4-r4"
if [ "$what" = ablations ] || [ "$what" = all ]; then
  run ablation-ladder-512 /usr/share/common-licenses/GPL-3 512 4 0 "$ladder"
  run ablation-alone-512 /usr/share/common-licenses/GPL-3 512 4 0 "$alone"
  run ablation-ladder-2048 /usr/share/common-licenses/GPL-3 2048 3 0 "$ladder"
  run ablation-alone-2048 /usr/share/common-licenses/GPL-3 2048 3 0 \
    "tqk4v2-had-pn-c-b4-r4,tqk4v2-had-pn-c-s1-r4,tqk4v2-had-pn-c-s1-w29-r4,tqk4v2-had-pn-c-s1-b4-r2,tqk4v3-had-pn-c-s1-b4-r4,tqk4v2.5-had-pn-c-s1-b4-r4"
  # q8_0 exact tokens and log8 norms at 3 bits (tq2.5's budget) and with 4-bit keys.
  three="tqk3v1.5-had-pn-c-s1-b3-r4-wq8,tqk3v1-had-pn-c-s1-b3-r4-wq8,tqk3v1.5-had-pn-c-s1-b3-r4-n8v-wq8,tqk3v1.5-had-pn-c-s1-b3-r4-n8-wq8,tqk3v2-had-pn-c-s1-b3-r4-n8-wq8,tqk3v2-had-pn-c-s1-b3-r4-wq8"
  run ablation-3bits-512 /usr/share/common-licenses/GPL-3 512 4 0 "$three"
  run ablation-3bits-2048 /usr/share/common-licenses/GPL-3 2048 3 0 "$three"
  four="tqk4v2-had-pn-c-s1-b4-r4-n8v-wq8,tqk4v3-had-pn-c-s1-b4.25-r4-n8v-wq8"
  run ablation-4bits-n8v-512 /usr/share/common-licenses/GPL-3 512 4 0 "$four"
  run ablation-4bits-n8v-2048 /usr/share/common-licenses/GPL-3 2048 3 0 "$four"
fi

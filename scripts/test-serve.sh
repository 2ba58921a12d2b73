#!/usr/bin/env bash
# `tqkv serve` against the official openai Python client (tests/serve/test_openai.py), in a
# virtual environment under target/ (created on first use; PyPI must be reachable then).
# Usage: scripts/test-serve.sh [KV_KIND ...]   (default: tq3.5 f16)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/serve-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "openai>=1.40,<4"
fi
"$venv/bin/python" -c "import openai; print('openai', openai.__version__)"
cargo build --release -p tqkv-cli
model=$(scripts/fetch-model.sh)
kinds=("$@")
[ ${#kinds[@]} -gt 0 ] || kinds=(tq3.5 f16)
for kv in "${kinds[@]}"; do
  echo "== openai client against tqkv serve --kv $kv"
  "$venv/bin/python" tests/serve/test_openai.py target/release/tqkv "$model" "$kv"
done

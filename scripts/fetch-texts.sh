#!/usr/bin/env bash
# The evaluation texts of docs/QUALITY.md besides the licence texts Debian ships in
# /usr/share/common-licenses (GPL-3, GFDL-1.3): the GNU Coding Standards (plain text, ~34k
# words of prose with some code; GFDL), from Debian's package gnu-standards. Puts it at
# models/texts/gnu-standards.txt (git-ignored) and prints the path. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dst="$root/models/texts/gnu-standards.txt"
if [ -s "$dst" ]; then
  echo "$dst"
  exit 0
fi
mkdir -p "$(dirname "$dst")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download gnu-standards >&2)
dpkg-deb -x "$tmp"/gnu-standards_*.deb "$tmp/x"
zcat "$tmp/x/usr/share/doc/gnu-standards/standards.text.gz" > "$dst.part$$"
mv "$dst.part$$" "$dst"
echo "$dst"

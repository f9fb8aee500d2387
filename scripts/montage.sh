#!/usr/bin/env bash
# Renders the six-site phantom contact sheet (one case per site: mid-gland slice, zoom with the
# ground-truth outline, a slice near the base) to a PNG for a visual check of the generator.
# Usage: scripts/montage.sh [OUT.png] [SEED] [CASE] [full|small]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-phantom-montage.png}"
seed="${2:-1}"
case_index="${3:-0}"
size="${4:-full}"
if [ -z "${LIBTORCH:-}" ] && [ -d .venv/lib/python3.11/site-packages/torch ]; then
  export LIBTORCH="$PWD/.venv/lib/python3.11/site-packages/torch"
fi
cargo build --quiet --bin desam
./target/debug/desam phantom --montage "$out" --seed "$seed" --montage-case "$case_index" --size "$size"
echo "montage: $out"

#!/usr/bin/env bash
# The README's main command: on a fresh Debian 12 machine, set up (idempotent), build the release
# binaries and plugin, then run `desam demo` with the default model: Debian's Orthanc + the DeSAM
# plugin segment one phantom series per site; prints the Dice/QA/volume/latency table and writes
# out/demo/overlay.png. With --ohif it also serves the OHIF viewer (fetched once by
# scripts/setup-ohif.sh) on http://127.0.0.1:3000/ over Orthanc's DICOMweb and prints each study's URL.
# Usage: bash scripts/demo.sh [--keep-running|--stop] [--ohif] [more `desam demo` options, e.g. --sites ACE]
set -euo pipefail
cd "$(dirname "$0")/.."

mode=(--keep-running)
extra=()
ohif=0
for a in "$@"; do
  case "$a" in
    --stop) mode=(--stop) ;;
    --keep-running) mode=(--keep-running) ;;
    --ohif) ohif=1 ;;
    -h|--help)
      sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
      exit 0 ;;
    *) extra+=("$a") ;;
  esac
done

MODEL=models/default
if [ ! -f "$MODEL/model.json" ]; then
  echo "demo: $MODEL/model.json is missing: the demo needs the trained default model in $MODEL" >&2
  echo "      (a try-out with any model directory: target/release/desam demo --model DIR --plugin target/release/libdesam.so)" >&2
  exit 2
fi
if grep -Eq '"untrained"[[:space:]]*:[[:space:]]*true' "$MODEL/model.json"; then
  echo "demo: $MODEL is an untrained placeholder: never for the demo (model.json \"untrained\": true)" >&2
  exit 2
fi

bash scripts/setup.sh
if ! command -v cargo >/dev/null 2>&1; then
  echo "demo: cargo is not installed: install Rust >= 1.85 (https://rustup.rs), then run this script again" >&2
  exit 2
fi
export LIBTORCH="${LIBTORCH:-$PWD/.venv/lib/python3.11/site-packages/torch}"
cargo build --release --bins --lib

mkdir -p out
if [ "$ohif" -eq 1 ]; then
  extra+=(--ohif "$(bash scripts/setup-ohif.sh)")
fi
exec target/release/desam demo --model "$MODEL" --plugin target/release/libdesam.so \
  --out out/demo --require-trained "${mode[@]}" ${extra[@]+"${extra[@]}"}

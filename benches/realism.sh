#!/usr/bin/env bash
# Benchmark, not run by CI: the open realism test (docs/phantom.md, "Outside judges"). pyAutoRef 2.2.1
# (PyPI, MIT), a YOLOv8 detector of reference fat and muscle trained on real prostate T2w, judges
# CASES phantom cases of every site through its own pre-processing; each class's top box is checked
# against the phantom's tissue map. Goal: fat and muscle, top probability >= 0.5, box >= 50 % on that
# tissue, on every case of every site. Results: OUT/realism.json and OUT/realism.md.
# Usage: benches/realism.sh [OUT]   Env: CASES (2), SEED (0), FIRST (0: first case index),
#        SITES ("A B C D E F"), GENERATION (1: the phantom's anatomy and contrast model, `desam phantom --generation`),
#        JUDGE_ARGS (more arguments of python/realism/autoref_judge.py, e.g. "--add-rician-noise 12"),
#        REALISM_VENV (.venv-realism: pyAutoRef's own venv, made here from PyPI), BIN (built binaries).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-/tmp/desam-bench-realism}")
CASES=${CASES:-2}; SEED=${SEED:-0}; FIRST=${FIRST:-0}; GENERATION=${GENERATION:-1}
export LIBTORCH=${LIBTORCH:-$PWD/.venv/lib/python3.11/site-packages/torch}
if [ -z "${BIN:-}" ]; then cargo build -q --release --bin desam; BIN=$PWD/target/release; fi
VENV=${REALISM_VENV:-$PWD/.venv-realism}
# pyAutoRef and its dependencies (onnxruntime, SimpleITK, scikit-image, ...) in a venv of their own:
# the project's venv stays what CI installs.
if ! "$VENV/bin/python" -c 'import pyAutoRef, onnxruntime, SimpleITK' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --no-cache-dir "pyAutoRef==2.2.1"
fi
rm -rf "$OUT/data" && mkdir -p "$OUT"
for site in ${SITES:-A B C D E F}; do
  "$BIN/desam" phantom --site $site --cases "$CASES" --first-case "$FIRST" --seed "$SEED" \
    --format nifti --tissue-map --generation "$GENERATION" --out "$OUT/data" >/dev/null
done
"$VENV/bin/python" python/realism/autoref_judge.py --data "$OUT/data" --out "$OUT/realism.json" \
  --markdown "$OUT/realism.md" ${JUDGE_ARGS:-} 2> "$OUT/pyautoref.log"

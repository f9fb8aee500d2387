#!/usr/bin/env bash
# Times `desam forward` (release build) against the PyTorch reference on the same weights, inputs and
# thread count, for SAM ViT-B (random weights, Meta's .pth format) and LiteMedSAM (real weights), and
# measures bf16 speed and its error against f32. One cold pass each, as the CLI measures itself.
#   usage: benches/forward.sh            (THREADS=n to pin the thread count; default: nproc)
#          ARCHS="lite" benches/forward.sh   (a subset)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
THREADS=${THREADS:-$(nproc)}
ARCHS=${ARCHS:-"vit_b lite"}
PY=${DESAM_PYTHON:-$ROOT/.venv/bin/python}
export LIBTORCH=${LIBTORCH:-$ROOT/.venv/lib/python3.11/site-packages/torch}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS PYTHONWARNINGS=ignore

cargo build --release --quiet --bin desam
BIN=$ROOT/target/release/desam
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

field() { awk -v k="$1" '$1 == k { print $2 }' "$2"; }
# "desam: timing: encoder X s, decoder Y s (...)" -> "X Y"
ours_times() { sed -n 's/.*timing: encoder \([0-9.]*\) s, decoder \([0-9.]*\) s.*/\1 \2/p' "$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

echo "desam forward benchmark: $(date -u +%FT%TZ), $THREADS thread(s), $(uname -m), $(nproc) CPU(s)"
for arch in $ARCHS; do
  dir=$WORK/$arch
  case $arch in
    vit_b)
      "$PY" python/parity/make_sam_reference.py "$dir" --threads "$THREADS" --time --prompts box > "$dir.ref.txt"
      ckpt=$dir/sam_vit_b_random.pth
      prompt=(--box $("$PY" -c "import json,sys; print(*json.load(open(sys.argv[1]))['box'])" "$dir/prompts.json"))
      ;;
    lite)
      "$PY" python/parity/make_lite_reference.py "$dir" --threads "$THREADS" --time > "$dir.ref.txt"
      ckpt=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['checkpoint'])" "$dir/prompt.json")
      prompt=(--box $("$PY" -c "import json,sys; print(*json.load(open(sys.argv[1]))['box'])" "$dir/prompt.json"))
      ;;
    *) echo "unknown arch $arch" >&2; exit 2 ;;
  esac
  for dtype in f32 bf16; do
    "$BIN" forward --arch "$arch" --checkpoint "$ckpt" --image "$dir/image.npy" "${prompt[@]}" \
      --dtype "$dtype" --out "$dir/ours_$dtype.safetensors" 2> "$dir.$dtype.txt"
  done
  ref_enc=$(field reference_encoder_seconds "$dir.ref.txt")
  ref_all=$(field reference_seconds "$dir.ref.txt")
  read -r enc dec < <(ours_times "$dir.f32.txt")
  read -r enc16 dec16 < <(ours_times "$dir.bf16.txt")
  all=$(awk -v a="$enc" -v b="$dec" 'BEGIN { print a + b }')
  all16=$(awk -v a="$enc16" -v b="$dec16" 'BEGIN { print a + b }')
  echo "== $arch"
  echo "  encoder     ours f32 ${enc} s   PyTorch ${ref_enc} s   ours/reference $(ratio "$enc" "$ref_enc")"
  echo "  whole pass  ours f32 ${all} s   PyTorch ${ref_all} s   ours/reference $(ratio "$all" "$ref_all")" \
       " (ours also runs PIMM and PRIM twice; the reference runs SAM's decoder once)"
  echo "  bf16        encoder ${enc16} s, whole ${all16} s   bf16/f32 encoder $(ratio "$enc16" "$enc"), whole $(ratio "$all16" "$all")"
  "$PY" python/bench/compare_outputs.py "$dir/ours_f32.safetensors" "$dir/ours_bf16.safetensors" | sed 's/^/  bf16 vs f32: /'
  rm -rf "$dir"
done

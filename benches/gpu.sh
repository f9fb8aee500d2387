#!/usr/bin/env bash
# The CUDA path, measured (issue 20): parity CUDA vs CPU, per-slice encoder/decoder time against the
# FLOP floor, `desam segment` per site, the Orthanc plugin on the GPU with a forced out-of-memory,
# mixed-precision training. Every section writes one record {name, status ok|skipped|failed, reason,
# figures} to OUT/sections.jsonl; the end renders OUT/gpu.json and OUT/gpu.md (benches/gpu_report.py).
# Without CUDA (or with --cpu-only) the CUDA sections are "skipped" and only the CPU half runs:
# FLOP model (checked against SAM ViT-B's published ≈486 GMAC), CPU parity references (tiny + LiteMedSAM,
# one slice), a tiny CPU run of the timing loop, the rendering. Exit 0 unless a section failed.
#   usage: benches/gpu.sh [--cpu-only] [--from-carry] [OUTDIR]   (default OUTDIR benches/results/gpu-<date>)
# Binaries: DESAM_BIN_DIR=dir holding desam, desam-train, gpu_bench (or examples/gpu_bench) and
# libdesam.so; --from-carry unpacks .gpu-carry/bin.tar.xz (benches/gpu-carry.sh); else built here with
# cargo (PROFILE=release|debug, default release).
# Peaks used for the floor (H200 SXM dense, NVIDIA datasheet, as /work/.library/device/H200.md):
# f16/bf16 989 TFLOP/s, f32 67 TFLOP/s (override: PEAK_F16, PEAK_BF16, PEAK_F32 in TFLOP/s).
#
# On the device machine (nvidia-h200: no cargo, no Orthanc, torch 2.11.0+cu130 in /opt/torch/.venv),
# from a session that has a GPU lent (docs/engine.md §10 has the plan and its open risk):
#   here:   bash benches/gpu-carry.sh
#   device: run(command="bash benches/gpu.sh --from-carry $OUT/gpu 2>&1 | tee $OUT/gpu.log",
#               carry=[".gpu-carry"], timeout_s=540)
# then copy gpu.json and gpu.md from files_at into benches/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source benches/lib.sh
CPU_ONLY=0 FROM_CARRY=0
while [ $# -gt 0 ]; do
  case $1 in
    --cpu-only) CPU_ONLY=1; shift ;;
    --from-carry) FROM_CARRY=1; shift ;;
    *) break ;;
  esac
done
OUT=$(realpath -m "${1:-benches/results/gpu-$(date -u +%Y%m%d)}")
W=$OUT/work
rm -rf "$W" "$OUT/sections.jsonl"; mkdir -p "$W"
PY=$(bench_python)
REC=$OUT/sections.jsonl
record() { "$PY" benches/gpu_report.py add "$REC" "$@"; echo "== $1: $2${3:+ ($3)}" >&2; }
rows_of() { "$PY" -c 'import json,sys; print(json.dumps({"rows": [json.loads(l) for l in open(sys.argv[1]) if l.strip()]}))' "$1"; }
log_tail() { tail -c 300 "$1" 2>/dev/null | tr '\n"' '  '; }
PEAK_F16=${PEAK_F16:-989} PEAK_BF16=${PEAK_BF16:-989} PEAK_F32=${PEAK_F32:-67}
NO_CUDA="no CUDA device (tch::Cuda::is_available() is false)"

# --- binaries ------------------------------------------------------------------------------------
if [ "$FROM_CARRY" = 1 ]; then
  # Device machine: binaries built on the CPU machine (libtorch 2.13), run on the host's torch libs.
  mkdir -p "$W/bin" && tar -xJf .gpu-carry/bin.tar.xz -C "$W/bin"
  DESAM_BIN_DIR=$W/bin
  TORCH_LIB=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
  export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if [ -z "${DESAM_BIN_DIR:-}" ]; then
  PROFILE=${PROFILE:-release}
  flag=(); [ "$PROFILE" = release ] && flag=(--release)
  cargo build -q "${flag[@]}" --lib --bin desam --bin desam-train --example gpu_bench >&2 || { echo "build failed" >&2; exit 1; }
  DESAM_BIN_DIR=$ROOT/target/$PROFILE
fi
DESAM=$DESAM_BIN_DIR/desam TRAIN=$DESAM_BIN_DIR/desam-train
BENCH=$DESAM_BIN_DIR/gpu_bench; [ -x "$BENCH" ] || BENCH=$DESAM_BIN_DIR/examples/gpu_bench

# --- host ----------------------------------------------------------------------------------------
if ! probe=$("$BENCH" cuda 2> "$W/probe.err"); then
  record host failed "gpu_bench does not run: $(log_tail "$W/probe.err")"
  "$PY" benches/gpu_report.py render "$OUT" > /dev/null; exit 1
fi
CUDA=$(echo "$probe" | "$PY" -c 'import json,sys; print(int(json.load(sys.stdin)["cuda"]))')
SKIP=""
[ "$CUDA" = 1 ] || SKIP=$NO_CUDA
[ "$CPU_ONLY" = 1 ] && SKIP="--cpu-only: ${SKIP:-CUDA present but not used}"
gpu_name=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
record host ok "" "$("$PY" -c 'import json,sys; d=json.loads(sys.argv[1]); d.update(gpu=sys.argv[2], cpus=int(sys.argv[3]),
  peaks_tflops={"f16": float(sys.argv[4]), "bf16": float(sys.argv[5]), "f32": float(sys.argv[6])}); print(json.dumps(d))' \
  "$probe" "$gpu_name" "$(nproc)" "$PEAK_F16" "$PEAK_BF16" "$PEAK_F32")"

# peak GPU memory (MiB, whole device, nvidia-smi sampled every 0.2 s) while "$@" runs → GPU_PEAK
GPU_PEAK=0
with_gpu_peak() {
  local f=$W/smi.$$; : > "$f"
  ( while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$f" 2>/dev/null; sleep 0.2; done ) &
  local sampler=$! rc=0
  "$@" || rc=$?
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  GPU_PEAK=$(sort -n "$f" | tail -1); GPU_PEAK=${GPU_PEAK:-0}
  return $rc
}

# --- 1. FLOP model -------------------------------------------------------------------------------
"$BENCH" flops > "$W/flops.jsonl"
vitb=$("$PY" -c 'import json,sys; print(round([json.loads(l) for l in open(sys.argv[1]) if "vit_b" in l][0]["encoder_gmac"], 2))' "$W/flops.jsonl")
if "$PY" -c 'import sys; sys.exit(0 if abs(float(sys.argv[1]) / 486 - 1) < 0.01 else 1)' "$vitb"; then
  record flops ok "vit_b encoder $vitb GMAC per 1024² slice (published ≈486)" "$(rows_of "$W/flops.jsonl")"
else
  record flops failed "vit_b encoder $vitb GMAC, expected ≈486 within 1%" "$(rows_of "$W/flops.jsonl")"
fi

# --- 2. parity CUDA vs CPU -----------------------------------------------------------------------
side_of() { case $1 in lite) echo 256 ;; tiny) echo 128 ;; *) echo 1024 ;; esac; }
make_image() { # ARCH: a seeded normalised 1×3×S×S image
  "$PY" -c 'import numpy as np,sys; s=int(sys.argv[2]); np.save(sys.argv[1], np.random.default_rng(7).standard_normal((1,3,s,s)).astype(np.float32))' \
    "$W/$1.npy" "$(side_of "$1")"
}
forward() { # ARCH DEVICE DTYPE OUTNAME: lite = the shipped model's real weights, others seeded random
  local dir=$W/m_$1; [ "$1" = lite ] && dir=models/default
  local s; s=$(side_of "$1")
  "$DESAM" forward --arch "$1" --checkpoint "$dir/encoder.safetensors" --checkpoint "$dir/decoder.safetensors" \
    --image "$W/$1.npy" --box 0 0 "$s" "$s" --device "$2" --dtype "$3" --out "$W/$4.safetensors" 2>> "$W/forward.log"
}
compare() { # REF OTHER ARCH RUN → one row; with CUDA the goal is checked too
  "$PY" python/bench/compare_outputs.py "$W/$1.safetensors" "$W/$2.safetensors" --json | "$PY" -c 'import json,sys
d=json.load(sys.stdin); e=d["errors"]; run=sys.argv[2]
d.update(arch=sys.argv[1], against="cpu f32", run=run)
if run.startswith("cuda"):
    keys=[k for k in e if k.startswith("tap.") or k in ("neck", "mask_embedding", "logits")]
    d["goal_met"]=max(e[k] for k in keys) <= 1e-4 if run.endswith("f32") else d["mask_dice"] >= 0.99
print(json.dumps(d))' "$3" "$4" >> "$W/parity.jsonl"
}
: > "$W/parity.jsonl"; parity_ok=1
archs="tiny lite"; [ -z "$SKIP" ] && archs="tiny lite vit_b"
for a in $archs; do
  make_image "$a"
  [ "$a" = lite ] || "$DESAM" model init --arch "$a" --out "$W/m_$a" --seed 1 > /dev/null 2>> "$W/forward.log" || parity_ok=0
  forward "$a" cpu f32 "${a}_cpu_f32" || { parity_ok=0; continue; }
  if [ -n "$SKIP" ]; then
    # CPU half: the comparison on CPU bf16 vs f32 (the same figures the CUDA run reports)
    { forward "$a" cpu bf16 "${a}_cpu_bf16" && compare "${a}_cpu_f32" "${a}_cpu_bf16" "$a" "cpu bf16"; } || parity_ok=0
    continue
  fi
  for dt in f32 f16; do
    { forward "$a" cuda "$dt" "${a}_cuda_$dt" && compare "${a}_cpu_f32" "${a}_cuda_$dt" "$a" "cuda $dt"; } || parity_ok=0
  done
done
figs=$(rows_of "$W/parity.jsonl")
if [ "$parity_ok" = 0 ]; then record parity failed "a forward pass or comparison failed: $(log_tail "$W/forward.log")" "$figs"
elif [ -n "$SKIP" ]; then record parity ok "CPU references only (tiny, lite; CPU bf16 vs f32 shown); CUDA skipped: $SKIP" "$figs"
else record parity ok "goals: f32 ≤ 1e-4 relative (taps, neck, mask embedding, logits); f16 mask Dice ≥ 0.99" "$figs"; fi

# --- 3. per-slice timing against the floor -------------------------------------------------------
: > "$W/time.jsonl"; timing_ok=1
if [ -n "$SKIP" ]; then
  "$BENCH" time tiny cpu f32 1 1 >> "$W/time.jsonl" 2>> "$W/time.log" || timing_ok=0
else
  for a in vit_b vit_l vit_h lite; do
    for dt in f16 bf16 f32; do
      with_gpu_peak "$BENCH" time "$a" cuda "$dt" 1,4,16 3 > "$W/t.jsonl" 2>> "$W/time.log" || timing_ok=0
      "$PY" -c 'import json,sys
for l in open(sys.argv[1]):
    d=json.loads(l); d["gpu_peak_mib_all_batches"]=int(sys.argv[2]); print(json.dumps(d))' "$W/t.jsonl" "$GPU_PEAK" >> "$W/time.jsonl"
    done
  done
fi
figs=$("$PY" -c 'import json,sys
flops={json.loads(l)["arch"]: json.loads(l) for l in open(sys.argv[2])}
peak={"f16": float(sys.argv[3]), "bf16": float(sys.argv[4]), "f32": float(sys.argv[5])}
rows=[]
for l in open(sys.argv[1]):
    d=json.loads(l); f=flops[d["arch"]]
    if d.get("status")=="ok":
        d.update(encoder_tflops=f["encoder_gflop"]/d["encoder_s_per_slice"]/1e3, decoder_tflops=f["decoder_box_gflop"]/d["decoder_s_per_slice"]/1e3)
        if d["device"]=="cuda":
            d.update(encoder_x_floor=d["encoder_s_per_slice"]/(f["encoder_gflop"]/peak[d["dtype"]]/1e3),
                     decoder_x_floor=d["decoder_s_per_slice"]/(f["decoder_box_gflop"]/peak[d["dtype"]]/1e3))
    rows.append(d)
print(json.dumps({"rows": rows}))' "$W/time.jsonl" "$W/flops.jsonl" "$PEAK_F16" "$PEAK_BF16" "$PEAK_F32")
if [ "$timing_ok" = 0 ] || [ ! -s "$W/time.jsonl" ]; then record timing failed "$(log_tail "$W/time.log")" "$figs"
elif [ -n "$SKIP" ]; then record timing ok "CPU: tiny, 1 slice, batch 1 (the loop only); CUDA skipped: $SKIP" "$figs"
else record timing ok "best of 3 batches after a warm-up; floor = FLOPs / peak of the dtype; goal vit_b f16/bf16 encoder ≤ 5× floor" "$figs"; fi

# --- 4. desam segment on phantom series of each site ---------------------------------------------
if [ -n "$SKIP" ]; then
  record segment skipped "$SKIP"
else
  : > "$W/segment.jsonl"; seg_ok=1
  for site in A B C D E F; do
    "$DESAM" phantom --site "$site" --out "$W/ph" > /dev/null 2>> "$W/segment.log" || seg_ok=0
    for mode in box grid; do
      t0=$(date +%s.%N)
      with_gpu_peak "$DESAM" segment "$W/ph/${site}000/MR" --model models/default -o "$W/seg_$site$mode.dcm" --mode "$mode" \
        --device cuda --progress none --report "$W/seg_$site$mode.json" 2>> "$W/segment.log" || seg_ok=0
      wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
      "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); t=r["timings"]
print(json.dumps({"site": sys.argv[2], "mode": sys.argv[3], "wall_s": float(sys.argv[4]), "engine_s": t["total_s"], "encode_s": t["encode_s"],
  "decode_s": t["decode_s"], "slices": len(r.get("slices", [])), "device": r["device"], "dtype": r["dtype"], "gpu_peak_mib": int(sys.argv[5])}))' \
        "$W/seg_$site$mode.json" "$site" "$mode" "$wall" "$GPU_PEAK" >> "$W/segment.jsonl" || seg_ok=0
    done
  done
  if [ "$seg_ok" = 1 ]; then record segment ok "models/default (LiteMedSAM), --device cuda, default dtype; goal box < 1 s per 24-slice series" "$(rows_of "$W/segment.jsonl")"
  else record segment failed "$(log_tail "$W/segment.log")" "$(rows_of "$W/segment.jsonl")"; fi
fi

# --- 5. Orthanc plugin on the GPU ----------------------------------------------------------------
# `desam demo` (the demo harness) with Device auto: one series per site at once; then again while a
# process holds all but 1 GiB of the GPU's memory (forced out-of-memory): each series must end done
# (CPU fallback) or failed, once, and the demo (Orthanc's REST API) must keep answering to the end.
if [ -n "$SKIP" ]; then
  record plugin skipped "$SKIP"
elif [ ! -x /usr/sbin/Orthanc ] || ! command -v storescu > /dev/null || [ ! -f "$DESAM_BIN_DIR/libdesam.so" ]; then
  record plugin skipped "needs /usr/sbin/Orthanc, storescu (dcmtk) and libdesam.so on this host"
else
  demo() { "$DESAM" demo --model models/default --plugin "$DESAM_BIN_DIR/libdesam.so" --out "$W/$1" --device auto --stop --timeout 600 > "$W/$1.log" 2>&1; }
  with_gpu_peak demo demo; normal_rc=$?; normal_peak=$GPU_PEAK
  python3 -c 'import torch, time, sys; f, _ = torch.cuda.mem_get_info(); x = torch.empty(f - (1 << 30), dtype=torch.uint8, device="cuda")
open(sys.argv[1], "w").close(); time.sleep(900)' "$W/hog.ready" &
  hog=$!
  for _ in $(seq 120); do [ -f "$W/hog.ready" ] && break; sleep 0.5; done
  demo demo_oom; oom_rc=$?
  kill "$hog" 2>/dev/null; wait "$hog" 2>/dev/null
  figs=$("$PY" -c 'import json,sys,os
out={}
for name, sub, rc in (("normal", "demo", sys.argv[2]), ("forced_oom", "demo_oom", sys.argv[3])):
    p=os.path.join(sys.argv[1], sub, "results.json")
    s=json.load(open(p))["series"] if os.path.exists(p) else []
    out[name]={"exit": int(rc), "series": len(s), "segs_exactly_one": sum(1 for r in s if r.get("seg_count")==1), "results": s}
out["normal"]["gpu_peak_mib"]=int(sys.argv[4])
print(json.dumps(out))' "$W" "$normal_rc" "$oom_rc" "$normal_peak")
  record plugin "$([ "$normal_rc" = 0 ] && echo ok || echo failed)" "6 series at once (one per site; the issue asks 20: desam demo sends one series per site); forced OOM: a process held all but 1 GiB" "$figs"
fi

# --- 6. desam-train fit: mixed precision vs f32 on the GPU, --resume bit-exact in f32 -------------
if [ -n "$SKIP" ]; then
  record train skipped "$SKIP"
else
  tr_ok=1; STEPS=${TRAIN_STEPS:-300}
  "$DESAM" phantom --site A --cases 6 --format nifti --out "$W/trdata" > /dev/null 2>> "$W/train.log" || tr_ok=0
  "$TRAIN" precompute --data "$W/trdata" --model models/default --out "$W/store" --device cuda >> "$W/train.log" 2>&1 || tr_ok=0
  fit() { "$TRAIN" fit --embeddings "$W/store" --site A --device cuda --quiet --out "$W/$1" "${@:2}" >> "$W/train.log" 2>&1; }
  fit amp --amp true --max-steps "$STEPS" || tr_ok=0
  fit f32 --amp false --max-steps "$STEPS" || tr_ok=0
  { fit half --amp false --max-steps $((STEPS / 2)) && fit half --amp false --max-steps "$STEPS" --resume; } || tr_ok=0
  figs=$("$PY" benches/gpu_report.py train "$W")
  record train "$([ "$tr_ok" = 1 ] && echo ok || echo failed)" "$STEPS steps on 6 site-A phantom cases, --amp true vs false; resume = $((STEPS / 2)) + --resume vs straight, f32" "$figs"
fi

"$PY" benches/gpu_report.py render "$OUT" > /dev/null
rm -rf "$W"
echo "benches/gpu.sh: $OUT/gpu.json, $OUT/gpu.md" >&2
! grep -q '"status": "failed"' "$REC"

#!/usr/bin/env bash
# Benchmarks the Orthanc plugin on this machine (CPU):
#  1. start-up cost: time until Orthanc's REST API answers and idle RSS, without and with the plugin
#     (ratio with/without reported);
#  2. latency from the last instance of a 24-slice axial T2 series received (storescu returns) to the
#     DICOM-SEG stored, three series in a row (the first one includes the lazy model load), with the
#     plugin's own processing time and, as a reference from the same run, `desam segment` on the same
#     files when that CLI subcommand is available.
# Usage: benches/orthanc.sh MODEL_DIR [SIZE]   (SIZE: in-plane pixels, default 256)
# Env: PROFILE=release|debug (default release; built if missing), STABLE_AGE (default 1), THREADS (0).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=$(realpath "${1:?usage: benches/orthanc.sh MODEL_DIR [SIZE]}")
SIZE=${2:-256}
PROFILE=${PROFILE:-release}
STABLE_AGE=${STABLE_AGE:-1}
THREADS=${THREADS:-0}
export LIBTORCH=${LIBTORCH:-$PWD/.venv/lib/python3.11/site-packages/torch}
PY=${DESAM_PYTHON:-$PWD/.venv/bin/python}

flag=""; [ "$PROFILE" = release ] && flag="--release"
cargo build -q $flag --lib --bins
SO=$PWD/target/$PROFILE/libdesam.so
CLI=$PWD/target/$PROFILE/desam
WORK=$(mktemp -d /tmp/desam-bench-orthanc.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.6f\", $* }"; }

# start_orthanc NAME WITH_PLUGIN → sets HTTP, DICOM, OPID, STARTUP_S
start_orthanc() {
  local name=$1 with_plugin=$2 dir=$WORK/$1
  mkdir -p "$dir/storage"
  HTTP=$(free_port); DICOM=$(free_port)
  local plugins="[]"; [ "$with_plugin" = 1 ] && plugins="[\"$SO\"]"
  cat > "$dir/orthanc.json" <<EOF
{ "Name": "bench-$name", "HttpPort": $HTTP, "DicomPort": $DICOM, "DicomAet": "BENCH",
  "DicomCheckCalledAet": false, "RemoteAccessAllowed": false, "AuthenticationEnabled": false,
  "StableAge": $STABLE_AGE, "StorageDirectory": "$dir/storage", "IndexDirectory": "$dir/storage",
  "Plugins": $plugins,
  "DeSAM": { "ModelDirectory": "$MODEL_DIR", "Device": "cpu", "Threads": $THREADS,
             "SeriesFilter": { "MinSlices": 10 } } }
EOF
  local t0; t0=$(now)
  env -i /usr/sbin/Orthanc --logfile="$dir/orthanc.log" "$dir/orthanc.json" &
  OPID=$!; PIDS+=("$OPID")
  until curl -sf "http://127.0.0.1:$HTTP/system" >/dev/null; do
    kill -0 "$OPID" 2>/dev/null || { cat "$dir/orthanc.log"; echo "Orthanc died"; exit 1; }
    sleep 0.02
  done
  STARTUP_S=$(calc "$(now) - $t0")
}
stop_orthanc() { curl -s -X POST "http://127.0.0.1:$HTTP/tools/shutdown" >/dev/null; wait "$OPID" || true; }
rss_mb() { awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }

echo "== start-up cost (profile $PROFILE)"
start_orthanc plain 0; sleep 2; PLAIN_S=$STARTUP_S; PLAIN_RSS=$(rss_mb "$OPID"); stop_orthanc
start_orthanc plugin 1; sleep 2; PLUG_S=$STARTUP_S; PLUG_RSS=$(rss_mb "$OPID")
printf "Orthanc ready in %.2f s without the plugin, %.2f s with it (x%.2f)\n" "$PLAIN_S" "$PLUG_S" "$(calc "$PLUG_S / $PLAIN_S")"
printf "idle RSS %s MB without, %s MB with (x%.2f; the model is not loaded yet)\n" "$PLAIN_RSS" "$PLUG_RSS" "$(calc "$PLUG_RSS / $PLAIN_RSS")"

echo "== latency: last instance received → SEG stored (24 slices of ${SIZE}x${SIZE}, CPU, StableAge $STABLE_AGE s)"
for i in 1 2 3; do
  "$PY" - "$WORK/series$i" "$SIZE" "$i" <<'EOF'
import sys, os, numpy as np, pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
out, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(seed)
study, series, frame = generate_uid(), generate_uid(), generate_uid()
yy, xx = np.mgrid[0:n, 0:n] / n
for z in range(24):
    dz = z / 24 - 0.5
    inside = ((xx - 0.5) / 0.18) ** 2 + ((yy - 0.55) / 0.14) ** 2 + (dz / 0.35) ** 2 <= 1
    img = (np.where(inside, 700, 250) + rng.integers(0, 40, (n, n))).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset(); ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "Bench^Prostate", "BENCH", study, series
    ds.FrameOfReferenceUID, ds.Modality, ds.SeriesDescription, ds.ProtocolName = frame, "MR", "t2_tse_tra", "t2_tse_tra"
    ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "SE", "SK", "2D"
    ds.StudyDate, ds.StudyTime, ds.SeriesNumber, ds.InstanceNumber = "20260101", "120000", 1, z + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-80, -80, 3.0 * z]
    ds.PixelSpacing, ds.SliceThickness = [0.6, 0.6], 3.0
    ds.Rows = ds.Columns = n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = img.tobytes()
    ds.save_as(os.path.join(out, f"MR{z:03d}.dcm"), enforce_file_format=True)
print(series)
EOF
done > "$WORK/uids.txt"
i=0
while read -r uid; do
  i=$((i + 1))
  storescu -aec BENCH 127.0.0.1 "$DICOM" "$WORK/series$i"/*.dcm
  t_last=$(now)
  sid=$(curl -s -X POST --data "$uid" "http://127.0.0.1:$HTTP/tools/lookup" | "$PY" -c 'import json,sys; print([x["ID"] for x in json.load(sys.stdin) if x["Type"]=="Series"][0])')
  while :; do
    status=$(curl -s "http://127.0.0.1:$HTTP/desam/series/$sid")
    state=$(echo "$status" | "$PY" -c 'import json,sys; r=json.load(sys.stdin)["Result"] or {}; print(r.get("Status",""), r.get("Seconds",0))')
    case "$state" in done*|failed*|empty*) break ;; esac
    sleep 0.05
  done
  t_done=$(now)
  printf "series %d: %s; last instance → SEG stored %.2f s (StableAge %s s; plugin processing %.2f s)\n" \
    "$i" "${state%% *}" "$(calc "$t_done - $t_last")" "$STABLE_AGE" "${state##* }"
done < "$WORK/uids.txt"
printf "Orthanc RSS after 3 series: %s MB\n" "$(rss_mb "$OPID")"
stop_orthanc

if "$CLI" segment --help >/dev/null 2>&1; then
  echo "== reference: desam segment on the same 24 files (same process cost: model load + inference)"
  t0=$(now)
  if "$CLI" segment --model "$MODEL_DIR" --device cpu "$WORK/series1" -o "$WORK/cli-seg.dcm" >/dev/null 2>"$WORK/cli.err"; then
    printf "desam segment: %.2f s wall\n" "$(calc "$(now) - $t0")"
  else
    echo "desam segment failed (options may differ): $(head -c 300 "$WORK/cli.err")"
  fi
fi

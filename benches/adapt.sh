#!/usr/bin/env bash
# Benchmark, not run by CI: the headline figure of docs/adaptation.md ("Measured"), all through a real
# Orthanc (Debian's) with the DeSAM plugin following a model registry whose current version is
# models/default:
#  1. N reviewed site-E phantom cases (MR + truth SEG marked reviewed, metadata 4302 = "reviewed") and
#     NEW new site-E and NEW new site-C MR series (cases 100.., never seen by adapt) are sent to it; the
#     plugin segments every series with the base version ("before");
#  2. `desam-train adapt` (timed, with the plugin idle) fine-tunes, gates and promotes;
#  3. each new series is requested again (`POST /desam/series/{id}/segment`): the plugin reloads the
#     promoted version at its next job, without a restart, and segments them ("after").
# The SEGs the plugin stored are scored against the phantom truth by `desam-train eval --orthanc`
# (per case in OUT/{before,after}-{E,C}-N/cases.jsonl, each naming the model version that made it).
# Usage: benches/adapt.sh [OUT]   Env: N (5), NEW (10), PROFILE (debug|release, default debug),
#        THREADS (the plugin's and adapt's; default: libtorch's), EXTRA (more adapt arguments, e.g.
#        "--epochs 6"), BIN (a folder with desam, desam-train and libdesam.so built earlier, copied so
#        that a concurrent build cannot swap them mid-run).
# Every step resumes: rerun the same command after a kill (the Orthanc storage is kept in OUT; a
# re-sent series is not segmented again). Delete OUT when done.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-/tmp/desam-bench-adapt}")
N=${N:-5}; NEW=${NEW:-10}; PROFILE=${PROFILE:-debug}
# The very LIBTORCH value of .cargo/config.toml: another spelling (lib.sh's resolved symlink) would
# make cargo rebuild torch-sys and the crate.
export LIBTORCH=${LIBTORCH:-$PWD/.venv/lib/python3.11/site-packages/torch}
source benches/lib.sh
flag=""; [ "$PROFILE" = release ] && flag="--release"
if [ -z "${BIN:-}" ]; then cargo build -q $flag --bins --lib; BIN=$PWD/target/$PROFILE; fi
PY=$(bench_python)
THREADS_ARG=(); [ -n "${THREADS:-}" ] && THREADS_ARG=(--threads "$THREADS")
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*"; }
version_of() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$1"; }

# 1. Phantoms: reviewed E cases 0..N-1, new E and new C cases 100..100+NEW-1 (never seen by adapt).
[ -d "$OUT/reviewed-E-$N" ] || "$BIN/desam" phantom --site E --cases "$N" --first-case 0 --out "$OUT/reviewed-E-$N" >/dev/null
[ -d "$OUT/new-E-$NEW" ] || "$BIN/desam" phantom --site E --cases "$NEW" --first-case 100 --out "$OUT/new-E-$NEW" >/dev/null
[ -d "$OUT/new-C-$NEW" ] || "$BIN/desam" phantom --site C --cases "$NEW" --first-case 100 --out "$OUT/new-C-$NEW" >/dev/null

# 2. The registry: models/default as its current version.
REG=$OUT/registry-$N
BASE=$(version_of models/default/model.json)
if [ ! -f "$REG/current.json" ]; then
  mkdir -p "$REG/versions" && cp -r models/default "$REG/versions/$BASE"
  "$BIN/desam-train" promote --registry "$REG" --version "$BASE"
fi

# 3. Orthanc with the plugin serving the registry; the reviewed cases and the new series.
ODIR=$OUT/orthanc-$N; mkdir -p "$ODIR/storage"
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HTTP=$(free_port); DICOM=$(free_port)
cat > "$ODIR/orthanc.json" <<JSON
{ "Name": "bench-adapt", "HttpPort": $HTTP, "DicomPort": $DICOM, "DicomAet": "BENCH",
  "DicomCheckCalledAet": false, "RemoteAccessAllowed": false, "AuthenticationEnabled": false,
  "StableAge": 2, "StorageDirectory": "$ODIR/storage", "IndexDirectory": "$ODIR/storage",
  "UserMetadata": {"DeSAMResult": 4301, "DeSAMReview": 4302}, "Plugins": ["$BIN/libdesam.so"],
  "DeSAM": { "ModelDirectory": "$REG", "Device": "cpu", "Threads": ${THREADS:-0} } }
JSON
env -i /usr/sbin/Orthanc --logfile="$ODIR/orthanc.log" "$ODIR/orthanc.json" &
OPID=$!
trap 'curl -s -X POST "http://127.0.0.1:$HTTP/tools/shutdown" >/dev/null || kill $OPID; wait $OPID || true' EXIT
until curl -sf "http://127.0.0.1:$HTTP/system" >/dev/null; do kill -0 $OPID; sleep 0.1; done
URL=http://127.0.0.1:$HTTP
for c in "$OUT/reviewed-E-$N"/*/; do
  storescu -aec BENCH -aet SCANNER 127.0.0.1 "$DICOM" "$c"MR/* >/dev/null
  seg=$(curl -sf -X POST "$URL/instances" --data-binary @"$c"SEG/seg.dcm | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["ParentSeries"])')
  curl -sf -X PUT "$URL/series/$seg/metadata/4302" -d reviewed >/dev/null
done
for c in "$OUT/new-E-$NEW"/*/ "$OUT/new-C-$NEW"/*/; do
  storescu -aec BENCH -aet SCANNER 127.0.0.1 "$DICOM" "$c"MR/* >/dev/null
done
log "Orthanc at $URL (plugin, registry $REG) holds $N reviewed site-E cases and 2 x $NEW new series"

# score WHICH VERSION: the plugin's SEGs of the new series (waiting until they are of VERSION).
score() {
  for site in E C; do
    out=$OUT/$1-$site-$N; resume=(); [ -f "$out/cases.jsonl" ] && resume=(--resume)
    "$BIN/desam-train" eval --orthanc "$URL" --version "$2" --wait 7200 --data "$OUT/new-$site-$NEW" --sites "$site" --out "$out" "${resume[@]}" >/dev/null
    log "$1 ($2) $site: $("$PY" -c 'import json,sys; s=json.load(open(sys.argv[1])); print("Dice %.4f over %d cases" % (s["dice_mean_cases"], len(s["cases"])))' "$out/summary.json")"
  done
}
idle() {  # until the plugin's queue is empty and nothing runs
  until "$PY" -c 'import json,sys; q=json.load(sys.stdin)["Queue"]; sys.exit(0 if q["Length"] == 0 and not q["Running"] else 1)' < <(curl -sf "$URL/desam/status"); do sleep 2; done
}

# 4. Before: the base version's SEGs (the plugin segments each series as it becomes stable).
score before "$BASE"
idle

# 5. adapt, timed, with the plugin idle.
WORK=$OUT/work-$N
t0=$(date +%s.%N)
"$BIN/desam-train" adapt --orthanc "$URL" --registry "$REG" --work "$WORK" --device cpu "${THREADS_ARG[@]}" ${EXTRA:-} | tee "$OUT/adapt-$N.md"
log "adapt wall time of this call: $(awk "BEGIN{printf \"%.0f\", $(date +%s.%N) - $t0}") s (all calls: report.json .seconds)"

# 6. After: each new series requested again; the plugin's next job loads the registry's current
# version (no restart) and segments it (a series already done by that version is skipped).
AFTER=$(version_of "$REG/current.json")
for c in "$OUT/new-E-$NEW"/*/ "$OUT/new-C-$NEW"/*/; do
  uid=$("$PY" -c 'import pydicom,sys,glob; print(pydicom.dcmread(sorted(glob.glob(sys.argv[1]+"MR/*"))[0], stop_before_pixels=True).SeriesInstanceUID)' "$c")
  id=$(curl -sf -X POST "$URL/tools/lookup" -d "$uid" | "$PY" -c 'import json,sys; print([x["ID"] for x in json.load(sys.stdin) if x["Type"] == "Series"][0])')
  curl -sf -X POST "$URL/desam/series/$id/segment" -d '{}' >/dev/null
done
score after "$AFTER"
curl -sf "$URL/desam/status" | "$PY" -c 'import json,sys; s=json.load(sys.stdin); print("plugin serving", s["Model"]["Version"], "; reload:", s["ModelSource"].get("LastReload"))'

# 7. The same cases before and after, per site (the figure of docs/adaptation.md).
"$PY" - "$OUT" "$N" <<'PY'
import json, sys
out, n = sys.argv[1], sys.argv[2]
rep = json.load(open(f"{out}/work-{n}/report.json"))
print(f"N = {n}: adapt {rep['seconds']:.0f} s, promoted: {rep['promoted']}")
for site in "EC":
    read = lambda d: {c["id"]: c["dice"] for c in map(json.loads, open(f"{out}/{d}/cases.jsonl"))}
    before, after = read(f"before-{site}-{n}"), read(f"after-{site}-{n}")
    ids = sorted(set(before) & set(after))
    b = sum(before[i] for i in ids) / len(ids)
    a = sum(after[i] for i in ids) / len(ids)
    worst = min(ids, key=lambda i: after[i] - before[i])
    print(f"new site {site}, {len(ids)} cases: Dice {b:.4f} -> {a:.4f} ({a - b:+.4f}); min after {min(after[i] for i in ids):.4f}; "
          f"worst case {worst} {after[worst] - before[worst]:+.4f}")
PY

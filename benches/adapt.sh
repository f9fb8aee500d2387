#!/usr/bin/env bash
# Benchmark, not run by CI: the headline figure of docs/adaptation.md ("Measured").
# A registry whose current version is models/default; N reviewed site-E phantom cases (their truth
# SEGs marked reviewed, metadata 4302 = "reviewed") in a real Orthanc (Debian's, no plugin);
# `desam-train adapt` (timed); then the current model before and after on NEW new site-E and NEW new
# site-C phantom cases, segmented and scored by the real engine (`desam-train eval`, the corridor the
# plugin and the CLI use), per case in OUT/{before,after}-{E,C}/cases.jsonl.
# Usage: benches/adapt.sh [OUT]   Env: N (5), NEW (10), MAX_NEW (score the adapted model on the first
#        MAX_NEW new cases per site only; default all NEW), SKIP_BEFORE (1: do not score the base
#        version, e.g. when OUT/before-{E,C} link to another run's), PROFILE (debug|release, default debug),
#        THREADS (default: libtorch's), EXTRA (more adapt arguments, e.g. "--epochs 6"), BIN (see below).
# Every step resumes: rerun the same command after a kill (the Orthanc storage is kept in OUT).
# OUT/feature-cache holds the new cases' encoder features (about 10 MB a slice): delete OUT when done.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-/tmp/desam-bench-adapt}")
N=${N:-5}; NEW=${NEW:-10}; PROFILE=${PROFILE:-debug}
# The very LIBTORCH value of .cargo/config.toml: another spelling (lib.sh's resolved symlink) would
# make cargo rebuild torch-sys and the crate.
export LIBTORCH=${LIBTORCH:-$PWD/.venv/lib/python3.11/site-packages/torch}
source benches/lib.sh
flag=""; [ "$PROFILE" = release ] && flag="--release"
# BIN=DIR: binaries built earlier (a copy, so that a concurrent build cannot swap them mid-run).
if [ -z "${BIN:-}" ]; then cargo build -q $flag --bins; BIN=$PWD/target/$PROFILE; fi
PY=$(bench_python)
THREADS_ARG=(); [ -n "${THREADS:-}" ] && THREADS_ARG=(--threads "$THREADS")
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*"; }

# 1. Phantoms: reviewed E cases 0..N-1, new E and new C cases 100..100+NEW-1 (never seen by adapt).
[ -d "$OUT/reviewed-E-$N" ] || "$BIN/desam" phantom --site E --cases "$N" --first-case 0 --out "$OUT/reviewed-E-$N" >/dev/null
[ -d "$OUT/new-E" ] || "$BIN/desam" phantom --site E --cases "$NEW" --first-case 100 --out "$OUT/new-E" >/dev/null
[ -d "$OUT/new-C" ] || "$BIN/desam" phantom --site C --cases "$NEW" --first-case 100 --out "$OUT/new-C" >/dev/null

# 2. The registry: models/default as its current version.
REG=$OUT/registry-$N
BASE=$(sed -n 's/^  "version": "\(.*\)",$/\1/p' models/default/model.json)
if [ ! -f "$REG/current.json" ]; then
  mkdir -p "$REG/versions" && cp -r models/default "$REG/versions/$BASE"
  "$BIN/desam-train" promote --registry "$REG" --version "$BASE"
fi

# 3. Orthanc with the reviewed cases.
ODIR=$OUT/orthanc-$N; mkdir -p "$ODIR/storage"
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HTTP=$(free_port); DICOM=$(free_port)
cat > "$ODIR/orthanc.json" <<JSON
{ "Name": "bench-adapt", "HttpPort": $HTTP, "DicomPort": $DICOM, "DicomAet": "BENCH",
  "DicomCheckCalledAet": false, "RemoteAccessAllowed": false, "AuthenticationEnabled": false,
  "StorageDirectory": "$ODIR/storage", "IndexDirectory": "$ODIR/storage",
  "UserMetadata": {"DeSAMResult": 4301, "DeSAMReview": 4302}, "Plugins": [] }
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
log "Orthanc at $URL holds $N reviewed site-E cases"

# 4. adapt, timed.
WORK=$OUT/work-$N
t0=$(date +%s.%N)
"$BIN/desam-train" adapt --orthanc "$URL" --registry "$REG" --work "$WORK" --device cpu "${THREADS_ARG[@]}" ${EXTRA:-} | tee "$OUT/adapt-$N.md"
log "adapt wall time of this call: $(awk "BEGIN{printf \"%.0f\", $(date +%s.%N) - $t0}") s (all calls: report.json .seconds)"

# 5. Before (the base version) and after (the registry's current version) on the new cases.
AFTER=$(readlink -f "$REG/current")
for site in E C; do
  for which in before after; do
    [ $which = before ] && [ "${SKIP_BEFORE:-}" = 1 ] && continue
    model=$REG/versions/$BASE; [ $which = after ] && model=$AFTER
    out=$OUT/$which-$site-$N; [ $which = before ] && out=$OUT/before-$site
    resume=(); [ -f "$out/cases.jsonl" ] && resume=(--resume)
    limit=(); [ $which = after ] && [ -n "${MAX_NEW:-}" ] && limit=(--max-cases "$MAX_NEW")
    # One feature cache for both versions (same encoder): "after" runs only the decoder.
    "$BIN/desam-train" eval --model "$model" --data "$OUT/new-$site" --sites "$site" --out "$out" --device cpu --cache "$OUT/feature-cache" "${THREADS_ARG[@]}" "${resume[@]}" "${limit[@]}" >/dev/null
    log "$which $site: $("$PY" -c 'import json,sys; s=json.load(open(sys.argv[1])); print("Dice %.4f over %d cases" % (s["dice_mean_cases"], len(s["cases"])))' "$out/summary.json")"
  done
done
# 6. The same cases before and after, per site (the figure of docs/adaptation.md).
"$PY" - "$OUT" "$N" <<'PY'
import json, sys
out, n = sys.argv[1], sys.argv[2]
rep = json.load(open(f"{out}/work-{n}/report.json"))
print(f"N = {n}: adapt {rep['seconds']:.0f} s, promoted: {rep['promoted']}")
for site in "EC":
    read = lambda d: {c["id"]: c["dice"] for c in map(json.loads, open(f"{out}/{d}/cases.jsonl"))}
    before, after = read(f"before-{site}"), read(f"after-{site}-{n}")
    ids = sorted(set(before) & set(after))
    b = sum(before[i] for i in ids) / len(ids)
    a = sum(after[i] for i in ids) / len(ids)
    print(f"new site {site}, {len(ids)} cases: Dice {b:.4f} -> {a:.4f} ({a - b:+.4f}); min after {min(after[i] for i in ids):.4f}")
PY

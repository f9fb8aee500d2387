#!/usr/bin/env bash
# Brings a fresh Debian 12 machine to a working build of desam: Debian packages (Orthanc, its SDK,
# DICOM tools and validators), a project-local Python venv with torch==2.13.0 (libtorch for tch)
# and the Python reference/validator packages. Idempotent: a second run only checks stamps.
set -euo pipefail
cd "$(dirname "$0")/.."

# orthanc-postgresql, postgresql-15: the cluster test; orthanc-dicomweb, chromium: the viewer (OHIF
# over DICOMweb) and its headless-browser test; time: peak memory in the hostile-input test;
# patchelf: $ORIGIN RUNPATHs of the shipped files (scripts/package.sh).
APT_PACKAGES=(orthanc orthanc-dev orthanc-dicomweb orthanc-postgresql postgresql-15 dcmtk dicom3tools pkg-config curl ca-certificates chromium time patchelf)
need_apt=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# Debian installs Orthanc as a service; our tests start their own instances on loopback ports.

# The test command checks formatting and lints (docs/architecture.md): rustfmt and clippy, from the
# machine's rustup toolchain (a no-op where they are installed).
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  echo "setup: adding rustfmt and clippy to the Rust toolchain"
  rustup component add rustfmt clippy
fi

REQ=python/requirements.txt
STAMP=.venv/.desam-requirements.sha256
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating the Python venv (.venv) from $REQ"
  # torch's wheel pulls CUDA libraries: the venv is ~5 GB. Fail early and say so rather than let pip
  # die half-way with ENOSPC (seen on a CI machine whose disk had filled up).
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ "${free_kb:-0}" -lt $((7 * 1024 * 1024)) ]; then
    echo "setup: error: the Python venv needs about 7 GB free beside the checkout; $((free_kb / 1024)) MB are free" >&2
    exit 1
  fi
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # No pip cache: the cached wheels would double the disk the venv needs.
  .venv/bin/pip install -q --no-cache-dir --upgrade pip
  .venv/bin/pip install -q --no-cache-dir -r "$REQ"
  echo "$want" > "$STAMP"
fi
# The OHIF viewer for the browser test and `demo.sh --ohif`: npm fetches it (Debian's npm when no
# Node.js is installed). A failure here only warns: tests/python/test_viewer_ohif.py then fails and
# says why, the rest of the suite still runs.
if ! command -v npm >/dev/null 2>&1; then
  echo "setup: installing Debian's npm (fetches the OHIF viewer)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends npm >/dev/null \
    || echo "setup: warning: could not install npm" >&2
fi
bash scripts/setup-ohif.sh >/dev/null \
  || echo "setup: warning: the OHIF viewer could not be fetched; tests/python/test_viewer_ohif.py will fail" >&2
echo "setup: ok (libtorch: .venv/lib/python3.11/site-packages/torch)"

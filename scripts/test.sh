#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: set-up (idempotent), build, Rust tests
# (unit + integration against real libtorch, Orthanc, validators), then the Python tests
# (the 3D Slicer module's logic against the real engine). Exits non-zero if any part failed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DESAM_PYTHON="$PWD/.venv/bin/python"
cargo build --bins --lib
status=0
# House rules (docs/architecture.md): one formatting, no clippy warnings.
cargo fmt --check || { echo "test.sh: cargo fmt --check failed (run cargo fmt)" >&2; status=1; }
cargo clippy --all-targets --quiet -- -D warnings || { echo "test.sh: clippy found warnings" >&2; status=1; }
cargo test --no-fail-fast -- --test-threads=2 || status=1
.venv/bin/python -m pytest -q tests/python || status=1
if [ "$status" -ne 0 ]; then echo "test.sh: some tests failed" >&2; fi
exit "$status"

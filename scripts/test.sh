#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: set-up (idempotent), build, Rust tests
# (unit + integration against real libtorch, Orthanc, validators), then the Python tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DESAM_PYTHON="$PWD/.venv/bin/python"
cargo build --bins --lib
cargo test --no-fail-fast -- --test-threads=2
if ls tests/python/test_*.py >/dev/null 2>&1; then
  .venv/bin/python -m pytest -q tests/python
fi

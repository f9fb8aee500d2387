# Shared pytest fixtures for the Python tests: repository paths, the real `desam` binary, the Slicer
# module's plain-Python library and tiny test models. Must not fake the engine.
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SLICER_MODULE_DIR = REPO_ROOT / "plugin-manifest" / "slicer" / "DeSAM"


def desam_bin_path():
    """The engine under test: env DESAM_BIN, else target/debug/desam (scripts/test.sh builds it)."""
    value = os.environ.get("DESAM_BIN")
    path = Path(value) if value else REPO_ROOT / "target" / "debug" / "desam"
    if not path.is_absolute():
        path = REPO_ROOT / path
    return path


@pytest.fixture(scope="session")
def desam_bin():
    path = desam_bin_path()
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail("the desam binary %s does not exist: run `cargo build --bins` (scripts/test.sh does) "
                    "or set DESAM_BIN" % path)
    return str(path)


@pytest.fixture(scope="session")
def slicer_engine():
    """DeSAMLib.engine imported the way Slicer imports it (module folder on sys.path)."""
    if str(SLICER_MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(SLICER_MODULE_DIR))
    from DeSAMLib import engine

    return engine


@pytest.fixture(scope="session")
def models_folder(tmp_path_factory, desam_bin):
    """A models folder holding one untrained tiny model made by `desam model init`."""
    folder = tmp_path_factory.mktemp("models")
    out = folder / "tiny"
    proc = subprocess.run([desam_bin, "model", "init", "--arch", "tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail("`desam model init --arch tiny` failed: %s" % (proc.stderr.strip() or proc.stdout.strip()))
    assert (out / "model.json").is_file(), "desam model init wrote no model.json"
    return folder


@pytest.fixture(scope="session")
def tiny_model(models_folder):
    return str(models_folder / "tiny")

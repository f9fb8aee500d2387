# Tests of the Slicer module's plain-Python library (DeSAMLib.engine): NIfTI-1 I/O checked against
# nibabel, engine discovery, and real `desam segment` runs (geometry, progress, cancel, errors).
import json
import stat
import threading
import time

import nibabel as nib
import numpy as np
import pytest

STAGES = {"load", "preprocess", "encode", "decode", "postprocess", "write"}


def rotation(axis, degrees):
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def affine(direction, spacing, origin):
    a = np.eye(4)
    a[:3, :3] = np.asarray(direction) @ np.diag(spacing)
    a[:3, 3] = origin
    return a


# Grids a Slicer volume can have: IJK-to-RAS matrices with oblique directions, anisotropic spacing,
# non-zero origins, and the LPS-style axis flips DICOM series get when loaded into RAS.
GRIDS = {
    "identity": affine(np.eye(3), [1.0, 1.0, 1.0], [0, 0, 0]),
    "anisotropic_offset": affine(np.eye(3), [0.625, 0.625, 3.6], [-80.3, 42.1, -17.25]),
    "lps_flip": affine(np.diag([-1.0, -1.0, 1.0]), [0.5, 0.55, 3.0], [95.0, 110.5, -30.0]),
    "oblique": affine(rotation(2, 17) @ rotation(0, -11), [0.7, 0.7, 3.3], [-12.5, 33.0, 51.0]),
    "oblique_left_handed": affine(rotation(1, 23) @ np.diag([-1.0, 1.0, 1.0]) @ rotation(2, -8),
                                  [0.9, 0.6, 4.0], [7.0, -120.0, 3.0]),
}


def phantom_volume(shape=(4, 48, 56), seed=0):
    """KJI int16 volume: noisy background with a bright off-centre ellipsoid."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape)
    nk, nj, ni = shape
    inside = (((i - ni * 0.55) / (ni * 0.2)) ** 2 + ((j - nj * 0.45) / (nj * 0.18)) ** 2
              + ((k - nk / 2) / max(nk * 0.4, 1)) ** 2) <= 1
    return (200 + 600 * inside + rng.normal(0, 20, shape)).astype(np.int16)


# ------------------------------------------------------------------------------------ NIfTI-1
@pytest.mark.parametrize("name", sorted(GRIDS))
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.uint16, np.float64])
def test_written_nifti_reads_identically_in_nibabel(slicer_engine, tmp_path, name, dtype):
    a = GRIDS[name]
    arr = (phantom_volume((5, 7, 9)) % 250).astype(dtype)
    path = tmp_path / "v.nii.gz"
    slicer_engine.write_nifti(arr, a, str(path))
    img = nib.load(str(path))
    assert img.shape == (9, 7, 5)  # NIfTI is IJK, Slicer arrays are KJI
    assert np.array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), arr)
    assert np.asarray(img.dataobj).dtype == np.dtype(dtype)
    np.testing.assert_allclose(img.get_sform(), a, atol=1e-4)
    np.testing.assert_allclose(img.get_qform(), a, atol=1e-4)  # qform agrees (readers that ignore sform)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_reader_matches_nibabel_written_files(slicer_engine, tmp_path, name):
    a = GRIDS[name]
    arr = phantom_volume((4, 6, 8))
    nii = nib.Nifti1Image(arr.transpose(2, 1, 0), a)
    nii.set_sform(a, 1)
    nii.set_qform(a, 1)
    for fname in ("v.nii", "v.nii.gz"):
        nib.save(nii, str(tmp_path / fname))
        back, back_affine = slicer_engine.read_nifti(str(tmp_path / fname))
        assert np.array_equal(back, arr)
        np.testing.assert_allclose(back_affine, a, atol=1e-4)
    # qform only (sform_code 0): the reader must fall back to the quaternion.
    q_only = nib.Nifti1Image(arr.transpose(2, 1, 0), None)
    q_only.set_qform(a, 1)
    q_only.set_sform(None, 0)
    nib.save(q_only, str(tmp_path / "q.nii.gz"))
    _, q_affine = slicer_engine.read_nifti(str(tmp_path / "q.nii.gz"))
    np.testing.assert_allclose(q_affine, a, atol=1e-4)


def test_reader_applies_scaling_and_rejects_garbage(slicer_engine, tmp_path):
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(arr.transpose(2, 1, 0), np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, str(tmp_path / "s.nii"))
    back, _ = slicer_engine.read_nifti(str(tmp_path / "s.nii"))
    np.testing.assert_allclose(back, arr * 0.5 + 10.0)
    (tmp_path / "bad.nii").write_bytes(b"not a nifti file at all" * 30)
    with pytest.raises(slicer_engine.NiftiError, match="not a NIfTI-1"):
        slicer_engine.read_nifti(str(tmp_path / "bad.nii"))
    data = (tmp_path / "s.nii").read_bytes()
    (tmp_path / "short.nii").write_bytes(data[:-10])
    with pytest.raises(slicer_engine.NiftiError, match="truncated"):
        slicer_engine.read_nifti(str(tmp_path / "short.nii"))


# ---------------------------------------------------------------------- discovery and parsing
def test_find_engine_settings_env_and_missing(slicer_engine, tmp_path, monkeypatch):
    exe = tmp_path / "bin" / "desam"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    assert slicer_engine.find_engine(str(exe)) == str(exe)
    assert slicer_engine.find_engine(str(tmp_path)) == str(exe)  # folder with bin/desam
    assert slicer_engine.find_engine(str(exe.parent)) == str(exe)
    with pytest.raises(slicer_engine.EngineNotFound) as err:
        slicer_engine.find_engine(str(tmp_path / "nowhere" / "desam"))
    assert "nowhere" in str(err.value) and slicer_engine.INSTALL_HELP_URL in str(err.value)
    monkeypatch.setenv("DESAM_BIN", str(exe))
    assert slicer_engine.find_engine("") == str(exe)
    monkeypatch.setenv("DESAM_BIN", str(tmp_path / "missing"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(slicer_engine.EngineNotFound) as err:
        slicer_engine.find_engine(None)
    assert "not installed or not configured" in str(err.value)
    assert "DESAM_BIN=" in str(err.value) and slicer_engine.INSTALL_HELP_URL in str(err.value)
    # The Debian package's place is tried after PATH (Slicer may start with a PATH of its own).
    monkeypatch.setattr(slicer_engine, "SYSTEM_ENGINE_PATHS", [str(tmp_path / "usr-bin-desam"), str(exe)])
    assert slicer_engine.find_engine(None) == str(exe)
    monkeypatch.setattr(slicer_engine, "SYSTEM_ENGINE_PATHS", [str(tmp_path / "usr-bin-desam")])
    with pytest.raises(slicer_engine.EngineNotFound) as err:
        slicer_engine.find_engine(None)
    assert str(tmp_path / "usr-bin-desam") in str(err.value)


def test_installed_models_folder_and_engine_environment(slicer_engine, tmp_path, monkeypatch):
    # The unpacked tarball: bin/desam and share/desam/models/default side by side.
    exe = tmp_path / "desam-0.1.0-linux-x86_64" / "bin" / "desam"
    models = tmp_path / "desam-0.1.0-linux-x86_64" / "share" / "desam" / "models"
    (models / "default").mkdir(parents=True)
    (models / "default" / "model.json").write_text('{"name": "desam-lite-prostate"}')
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    assert slicer_engine.installed_models_folder(str(exe)) == str(models)
    assert [m.name for m in slicer_engine.list_models(slicer_engine.installed_models_folder(str(exe)))] == [
        "desam-lite-prostate"]
    monkeypatch.setattr(slicer_engine, "SYSTEM_MODELS_FOLDER", str(tmp_path / "absent"))
    assert slicer_engine.installed_models_folder(str(tmp_path / "elsewhere" / "desam")) is None
    monkeypatch.setattr(slicer_engine, "SYSTEM_MODELS_FOLDER", str(models))
    assert slicer_engine.installed_models_folder(None) == str(models)
    # Outside Slicer the engine gets this process's environment.
    monkeypatch.setenv("DESAM_TEST_MARK", "1")
    assert slicer_engine.engine_environment()["DESAM_TEST_MARK"] == "1"
    # Inside Slicer the module passes the startup environment, which wins over this process's.
    assert slicer_engine.engine_environment({"PATH": "/usr/bin"}) == {"PATH": "/usr/bin"}


def test_list_models(slicer_engine, tmp_path):
    assert slicer_engine.list_models(str(tmp_path / "absent")) == []
    (tmp_path / "b-model").mkdir()
    (tmp_path / "b-model" / "model.json").write_text(json.dumps({"name": "prostate", "version": "1.2", "arch": "lite"}))
    (tmp_path / "a-model").mkdir()
    (tmp_path / "a-model" / "model.json").write_text("{ not json")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "stray.json").write_text("{}")
    models = slicer_engine.list_models(str(tmp_path))
    assert [m.name for m in models] == ["a-model", "prostate"]
    assert models[1].path == str(tmp_path / "b-model") and models[1].label() == "prostate 1.2 (lite)"


def test_progress_parsing(slicer_engine):
    p = slicer_engine.parse_progress_line
    assert p('{"event":"stage","stage":"encode","done":2,"total":4}\n')["done"] == 2
    assert p("Loading model...") is None and p("{broken") is None and p("[1, 2]") is None
    fractions = [slicer_engine.progress_fraction(s, d, 4) for s in slicer_engine.STAGE_ORDER for d in range(5)]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and abs(fractions[-1] - 1.0) < 1e-9
    assert slicer_engine.progress_fraction("unknown", 1, 2) is None


# ----------------------------------------------------------------------- the real engine
def run_engine(slicer_engine, desam_bin, tiny_model, tmp_path, arr, a, **kwargs):
    events = []
    kwargs.setdefault("device", "cpu")
    mask, result = slicer_engine.segment_array(desam_bin, arr, a, tiny_model, str(tmp_path),
                                               on_progress=events.append, **kwargs)
    return mask, result, events


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_engine_mask_comes_back_on_the_same_grid(slicer_engine, desam_bin, tiny_model, tmp_path, name):
    a = GRIDS[name]
    arr = phantom_volume()
    mask, result, _ = run_engine(slicer_engine, desam_bin, tiny_model, tmp_path, arr, a)
    assert mask.shape == arr.shape and mask.dtype == np.uint8
    # The engine's own file, read by an independent reader, has the input's exact grid.
    out = nib.load(result.mask_path)
    assert out.shape == arr.shape[::-1]
    np.testing.assert_allclose(out.affine, a, atol=1e-3)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}
    # The report's volume agrees with the mask we read back.
    voxel_ml = abs(np.linalg.det(a[:3, :3])) / 1000.0
    assert result.volume_ml == pytest.approx(mask.sum() * voxel_ml, rel=1e-3, abs=1e-6)


def test_engine_progress_lines_and_report(slicer_engine, desam_bin, tiny_model, tmp_path):
    logs = []
    mask, result, events = run_engine(slicer_engine, desam_bin, tiny_model, tmp_path,
                                      phantom_volume(), GRIDS["oblique"], mode="box", on_log=logs.append)
    stages = [e for e in events if e.stage != "done"]
    assert stages, "no stage events reached on_progress"
    assert {e.stage for e in stages} <= STAGES
    assert all(0 <= e.done <= e.total for e in stages if e.total)
    assert [e.fraction for e in events] == sorted(e.fraction for e in events)  # never goes backwards
    assert events[-1].stage == "done" and events[-1].fraction == 1.0
    assert result.events[-1]["event"] == "done"
    for key in ("volume_ml", "quality", "flagged"):
        assert key in result.report, "report lacks %s: %s" % (key, result.report)
    assert isinstance(result.flagged, bool) and 0.0 <= result.quality <= 1.0
    assert ("FLAGGED" in result.summary()) == result.flagged
    assert "mL" in result.summary()
    with open(result.report_path) as f:
        assert json.load(f)["volume_ml"] == pytest.approx(result.volume_ml)


def test_engine_grid_mode_runs(slicer_engine, desam_bin, tiny_model, tmp_path):
    arr = phantom_volume((3, 40, 40))
    mask, result, _ = run_engine(slicer_engine, desam_bin, tiny_model, tmp_path, arr, GRIDS["lps_flip"], mode="grid")
    assert mask.shape == arr.shape


def test_cancel_stops_the_engine(slicer_engine, desam_bin, tiny_model, tmp_path):
    # Big enough that the tiny model on one thread is still encoding when we cancel.
    arr = phantom_volume((120, 96, 96))
    slicer_engine.write_nifti(arr, GRIDS["anisotropic_offset"], str(tmp_path / "in.nii.gz"))
    cancel = threading.Event()
    procs, seen = [], []

    def on_progress(p):
        seen.append(p)
        if p.stage in ("encode", "decode"):
            cancel.set()

    started = time.time()
    with pytest.raises(slicer_engine.Cancelled):
        slicer_engine.run_segmentation(desam_bin, str(tmp_path / "in.nii.gz"), tiny_model,
                                       str(tmp_path / "out.nii.gz"), device="cpu", threads=1,
                                       on_progress=on_progress, cancel_event=cancel,
                                       on_start=procs.append, kill_grace=5.0)
    assert procs and procs[0].poll() is not None, "the engine is still running after cancel"
    assert seen and seen[-1].stage != "done"
    assert time.time() - started < 120
    assert not (tmp_path / "out.nii.gz").exists()


def test_missing_engine_message(slicer_engine, tiny_model, tmp_path):
    with pytest.raises(slicer_engine.EngineNotFound) as err:
        slicer_engine.run_segmentation(str(tmp_path / "no-such-desam"), str(tmp_path / "in.nii.gz"),
                                       tiny_model, str(tmp_path / "out.nii.gz"))
    assert "cannot start the DeSAM engine" in str(err.value)
    assert slicer_engine.INSTALL_HELP_URL in str(err.value)


def test_failing_run_gives_the_engines_one_line_message(slicer_engine, desam_bin, tiny_model, tmp_path):
    missing = str(tmp_path / "does-not-exist.nii.gz")
    with pytest.raises(slicer_engine.EngineError) as err:
        slicer_engine.run_segmentation(desam_bin, missing, tiny_model, str(tmp_path / "out.nii.gz"), device="cpu")
    msg = str(err.value)
    assert msg.startswith("DeSAM engine failed: ") and "\n" not in msg
    assert "does-not-exist.nii.gz" in msg
    assert err.value.returncode not in (0, None)
    # A model folder without a model: also a clean one-line failure.
    slicer_engine.write_nifti(phantom_volume((2, 16, 16)), np.eye(4), str(tmp_path / "in.nii.gz"))
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(slicer_engine.EngineError) as err:
        slicer_engine.run_segmentation(desam_bin, str(tmp_path / "in.nii.gz"), str(tmp_path / "empty-model"),
                                       str(tmp_path / "out2.nii.gz"), device="cpu")
    assert "\n" not in str(err.value) and len(str(err.value)) > len("DeSAM engine failed: ")


def test_progress_tracker_is_monotonic_with_interleaved_encode_and_decode(slicer_engine):
    # The engine encodes a batch, decodes its slices, then encodes the next batch.
    t = slicer_engine.ProgressTracker()
    seq = [("load", 1, 1), ("preprocess", 1, 1)]
    for b in range(0, 6, 2):
        seq.append(("encode", b + 2, 6))
        seq += [("decode", z + 1, 6) for z in range(b, b + 2)]
    seq += [("postprocess", 1, 1), ("write", 1, 1)]
    fr = [t.update(*e) for e in seq]
    assert fr == sorted(fr), fr
    assert fr[-1] > 0.99
    # progress_fraction's per-stage mapping would go backwards on this stream.
    naive = [slicer_engine.progress_fraction(*e) for e in seq]
    assert naive != sorted(naive)

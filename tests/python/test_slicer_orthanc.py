# The Slicer module's Orthanc client (DeSAMLib.engine.OrthancBackend) against a real Orthanc (Debian's
# `Orthanc`, loopback, basic auth): series lookup, SEG download, errors. The DeSAM routes need the plugin.
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest

from conftest import REPO_ROOT
from test_slicer_seg_dcmqi import SERIES, segimage2itkimage, series_ras_affine, write_mr_series

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_orthanc(root, plugins=(), extra=None):
    if not os.access(ORTHANC, os.X_OK):
        pytest.fail("Orthanc is not installed (apt-get install orthanc; scripts/setup.sh does)")
    http, dicom = free_port(), free_port()
    config = {
        "Name": "desam-slicer-test", "HttpPort": http, "DicomPort": dicom, "DicomAet": "SLICERTEST",
        "DicomCheckCalledAet": False, "RemoteAccessAllowed": False, "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"), "AuthenticationEnabled": True,
        "RegisteredUsers": {"slicer": "s3cret"}, "Plugins": [str(p) for p in plugins], "StableAge": 2,
    }
    config.update(extra or {})
    root.mkdir(parents=True, exist_ok=True)
    (root / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen([ORTHANC, "--logfile=%s" % (root / "orthanc.log"), str(root / "orthanc.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = "http://127.0.0.1:%d" % http
    deadline = time.time() + 60
    while True:
        try:
            req = urllib.request.Request(url + "/system")
            req.add_header("Authorization", "Basic c2xpY2VyOnMzY3JldA==")  # slicer:s3cret
            urllib.request.urlopen(req, timeout=2).read()
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                log = (root / "orthanc.log").read_text() if (root / "orthanc.log").exists() else ""
                pytest.fail("Orthanc did not start: %s" % log[-2000:])
            time.sleep(0.3)
    return proc, url


def start_orthanc_with_plugin(root, model_dir):
    """Orthanc running our plugin (target/debug) on ``model_dir``, segmenting only on request."""
    plugin = Path(os.environ.get("DESAM_PLUGIN", REPO_ROOT / "target" / "debug" / "libdesam.so"))
    if not plugin.is_file():
        pytest.fail("the Orthanc plugin %s is not built: run `cargo build --lib` (scripts/test.sh does)" % plugin)
    section = {"ModelDirectory": model_dir, "Device": "cpu", "Threads": 1, "Mode": "box",
               "StableSeriesTrigger": False,
               "SeriesFilter": {"MinSlices": 1, "DescriptionPattern": None, "ScanningSequencePattern": None}}
    return start_orthanc(root, [plugin.resolve()], {"DeSAM": section})


def stop_orthanc(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    proc, url = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield url
    stop_orthanc(proc)


def upload_series(backend, folder):
    for f in sorted(folder.iterdir()):
        backend._request("POST", "/instances", f.read_bytes(), content_type="application/dicom")


@pytest.fixture(scope="module")
def stored_series(orthanc, tmp_path_factory, slicer_engine):
    folder = tmp_path_factory.mktemp("series")
    write_mr_series(folder, *SERIES["oblique"], shape=(3, 32, 32))
    upload_series(slicer_engine.OrthancBackend(orthanc, "slicer", "s3cret"), folder)
    return folder, pydicom.dcmread(str(next(folder.iterdir()))).SeriesInstanceUID


def test_lookup_and_download_with_basic_auth(orthanc, stored_series, slicer_engine, tmp_path):
    folder, series_uid = stored_series
    backend = slicer_engine.OrthancBackend(orthanc + "/", "slicer", "s3cret")
    series_id = backend.find_series(series_uid)
    info = backend._request("GET", "/series/%s" % series_id)
    assert info["MainDicomTags"]["SeriesInstanceUID"] == series_uid and len(info["Instances"]) == 3
    out = tmp_path / "x.dcm"
    backend.download_instance(info["Instances"][0], str(out))
    assert pydicom.dcmread(str(out)).SeriesInstanceUID == series_uid


def test_errors_are_one_line_user_messages(orthanc, stored_series, slicer_engine):
    _, series_uid = stored_series
    with pytest.raises(slicer_engine.OrthancError, match="HTTP 401"):
        slicer_engine.OrthancBackend(orthanc, "slicer", "wrong").system()
    backend = slicer_engine.OrthancBackend(orthanc, "slicer", "s3cret")
    with pytest.raises(slicer_engine.OrthancError, match="is not stored in Orthanc"):
        backend.find_series("1.2.3.4.5.6.7.8.9")
    # Without the DeSAM plugin the route does not exist: the message says which call failed.
    series_id = backend.find_series(series_uid)
    with pytest.raises(slicer_engine.OrthancError, match=r"POST /desam/series/.*/segment failed: HTTP 404"):
        backend.start(series_id)
    with pytest.raises(slicer_engine.OrthancError, match="Cannot reach Orthanc"):
        slicer_engine.OrthancBackend("http://127.0.0.1:9", timeout=2).system()
    with pytest.raises(slicer_engine.OrthancError, match="No Orthanc URL"):
        slicer_engine.OrthancBackend("")


def test_seg_instance_from_status_shapes(slicer_engine):
    pick = slicer_engine.OrthancBackend.seg_instance
    assert pick({"State": "Running"}) is None
    assert pick({"SegInstance": "abc"}) == "abc"
    assert pick({"Seg": {"Instance": "def"}}) == "def"
    assert pick({"SegInstances": ["old", "new"]}) == "new"


def test_plugin_status_is_interpreted(slicer_engine):
    """The answers of the plugin's GET /desam/series/{id} (shape from src/orthanc/worker.rs)."""
    read = slicer_engine.OrthancBackend.interpret_status
    done = {"Series": "s1", "Queued": False, "Running": False, "NeedsReview": True,
            "Result": {"Status": "done", "SegInstance": "seg-1", "VolumeMl": 31.5, "QualityScore": 0.42,
                       "NeedsReview": True, "ModelName": "desam-lite", "ModelVersion": "1.0"}}
    state, seg, report = read(done)
    assert (state, seg) == ("done", "seg-1")
    assert report["volume_ml"] == 31.5 and report["quality"] == 0.42 and report["flagged"] is True
    result = slicer_engine.Result(mask_path="seg.dcm", report=report)
    assert "31.5 mL" in result.summary() and "FLAGGED" in result.summary()
    # A job queued over an old result must not hand back the old SEG.
    assert read(dict(done, Queued=True))[:2] == ("queued", None)
    assert read(dict(done, Running=True))[:2] == ("running", None)
    assert read({"Series": "s1", "Result": None, "Queued": False, "Running": False})[:2] == ("unknown", None)
    state, seg, report = read({"Result": {"Status": "failed", "Error": "model missing"}})
    assert (state, seg, report["error"]) == ("failed", None, "model missing")
    assert read({"Result": {"Status": "empty"}})[:2] == ("empty", None)


def test_round_trip_through_the_desam_plugin(slicer_engine, tiny_model, tmp_path):
    """What the module's Orthanc backend does, against Orthanc running our plugin (target/debug)."""
    proc, url = start_orthanc_with_plugin(tmp_path / "orthanc", tiny_model)
    try:
        series_dir = tmp_path / "series"
        write_mr_series(series_dir, *SERIES["oblique"], shape=(6, 48, 48))
        source_affine, source_shape = series_ras_affine(series_dir)
        series_uid = pydicom.dcmread(str(next(series_dir.iterdir()))).SeriesInstanceUID
        backend = slicer_engine.OrthancBackend(url, "slicer", "s3cret")
        upload_series(backend, series_dir)

        states = []
        out = tmp_path / "seg.dcm"
        report = backend.segment_series(series_uid, str(out), mode="box", poll_interval=0.5, timeout=600,
                                        on_progress=lambda p: states.append(p.stage))
        assert states and states[-1] in ("done",), states
        seg = pydicom.dcmread(str(out))
        assert seg.Modality == "SEG"
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
        code = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
        assert (code.CodingSchemeDesignator, code.CodeValue) == ("SCT", "41216001")
        assert report["volume_ml"] >= 0 and 0.0 <= report["quality"] <= 1.0 and isinstance(report["flagged"], bool)

        # The SEG Slicer would load lies on the source series' grid (dcmqi reads it back).
        dcmqi_out = tmp_path / "dcmqi"
        dcmqi_out.mkdir()
        run = subprocess.run([segimage2itkimage(), "--inputDICOM", str(out), "--outputDirectory", str(dcmqi_out),
                              "-t", "nifti", "-p", "seg"], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        import nibabel as nib
        import numpy as np

        img = nib.load(str(sorted(dcmqi_out.glob("seg*.nii*"))[0]))
        assert img.shape[:3] == source_shape
        np.testing.assert_allclose(img.affine, source_affine, atol=1e-3)
        voxel_ml = abs(np.linalg.det(source_affine[:3, :3])) / 1000.0
        assert report["volume_ml"] == pytest.approx(float((np.asarray(img.dataobj) > 0).sum()) * voxel_ml, rel=1e-3)
    finally:
        stop_orthanc(proc)


def test_corrected_mask_goes_back_to_orthanc_as_a_reviewed_seg(slicer_engine, desam_bin, tiny_model, tmp_path):
    """The module's "Send to Orthanc as reviewed" (DeSAMLib.engine.send_reviewed_to_orthanc) against Orthanc
    running our plugin: a new MANUAL SEG series over the same MR series, marked reviewed, automatic SEG kept."""
    proc, url = start_orthanc_with_plugin(tmp_path / "orthanc", tiny_model)
    try:
        series_dir = tmp_path / "series"
        write_mr_series(series_dir, *SERIES["oblique"], shape=(6, 32, 40))
        affine, (ni, nj, nk) = series_ras_affine(series_dir)
        series_uid = pydicom.dcmread(str(next(series_dir.iterdir()))).SeriesInstanceUID
        backend = slicer_engine.OrthancBackend(url, "slicer", "s3cret")
        upload_series(backend, series_dir)
        auto_path = tmp_path / "auto.dcm"
        backend.segment_series(series_uid, str(auto_path), mode="box", poll_interval=0.5, timeout=600)
        auto = pydicom.dcmread(str(auto_path))

        # The radiologist's correction, on Slicer's grid of the series (KJI array, IJK-to-RAS).
        import numpy as np

        corrected = np.zeros((nk, nj, ni), dtype=np.uint8)
        corrected[1:5, 8:20, 10:30] = 1
        sent = slicer_engine.send_reviewed_to_orthanc(desam_bin, backend, series_uid, corrected, affine,
                                                      "Rossi^Anna", str(tmp_path / "review"))
        assert sent["voxels"] == int(corrected.sum()), sent
        assert sent["review"]["State"] == "reviewed" and sent["review"]["Reviewer"] == "Rossi^Anna", sent

        seg_series = backend._request("GET", "/series/%s" % sent["seg_series"])
        reviewed_path = tmp_path / "reviewed.dcm"
        backend.download_instance(seg_series["Instances"][0], str(reviewed_path))
        reviewed = pydicom.dcmread(str(reviewed_path))
        assert reviewed.Modality == "SEG" and str(reviewed.ContentCreatorName) == "Rossi^Anna"
        assert "reviewed" in reviewed.SeriesDescription.lower()
        assert reviewed.SeriesInstanceUID not in (auto.SeriesInstanceUID, series_uid)
        assert reviewed.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
        assert reviewed.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"
        mark = backend._request("GET", "/series/%s/metadata/4302" % sent["seg_series"], raw=True)
        assert mark == b"reviewed"

        # The automatic SEG is still there, byte for byte, and not marked reviewed.
        series_id = backend.find_series(series_uid)
        auto_instance = backend.status(series_id)["Result"]["SegInstance"]
        assert backend._request("GET", "/instances/%s/file" % auto_instance, raw=True) == auto_path.read_bytes()
        auto_series = backend._request("GET", "/instances/%s" % auto_instance)["ParentSeries"]
        with pytest.raises(slicer_engine.OrthancError, match="HTTP 404"):
            backend._request("GET", "/series/%s/metadata/4302" % auto_series, raw=True)

        # The reviewed SEG carries exactly the corrected voxels on the series' grid (dcmqi reads it back).
        dcmqi_out = tmp_path / "dcmqi"
        dcmqi_out.mkdir()
        run = subprocess.run([segimage2itkimage(), "--inputDICOM", str(reviewed_path), "--outputDirectory",
                              str(dcmqi_out), "-t", "nifti", "-p", "seg"], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        import nibabel as nib

        img = nib.load(str(sorted(dcmqi_out.glob("seg*.nii*"))[0]))
        np.testing.assert_allclose(img.affine, affine, atol=1e-3)
        back = np.asarray(img.dataobj)[..., 0] if np.asarray(img.dataobj).ndim == 4 else np.asarray(img.dataobj)
        assert np.array_equal(back > 0, corrected.transpose(2, 1, 0) > 0)
    finally:
        stop_orthanc(proc)

# A radiologist's view of our SEGs: Debian's Orthanc + its DICOMweb plugin hold phantom studies (MR
# series + the SEG desam writes), the OHIF v3 viewer (npm @ohif/app, scripts/setup-ohif.sh) is served
# by scripts/ohif-serve.py, and Debian's Chromium, headless, driven over CDP (tests/python/cdp.py),
# opens each study in OHIF's segmentation mode and loads the SEG the way a user does (double-click its
# thumbnail, answer "Yes"). The screenshots are checked against the phantom's truth: overlay colour
# on the gland of the displayed slice, none far from it, best agreement with that slice (not a
# neighbour, not a flipped copy). Screenshots go to $DESAM_ARTEFACTS/ohif (default out/test-artefacts/ohif).
import importlib.util
import io
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from cdp import Browser, CdpError
from conftest import REPO_ROOT
from test_slicer_orthanc import start_orthanc, stop_orthanc

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AUTH = "slicer:s3cret"  # start_orthanc's user
AUTH_HEADER = "Basic c2xpY2VyOnMzY3JldA=="
ARTEFACTS = Path(os.environ.get("DESAM_ARTEFACTS", REPO_ROOT / "out" / "test-artefacts")) / "ohif"
# Overlay colour: the MR is grey, so any pixel whose channels differ by more than this is overlay.
CHROMA = 24

# (name, `desam phantom` arguments, what the SEG must be): site D is oblique; C and A cropped to
# matrices whose Columns is not a multiple of 8 (FRACTIONAL SEGs); E's SEG is emptied.
CASES = [
    ("oblique_D", ["--site", "D", "--first-case", "0", "--size", "small"], "BINARY"),
    ("m250x250_C", ["--site", "C", "--first-case", "2", "--crop", "250x250"], "FRACTIONAL"),
    ("m257x193_A", ["--site", "A", "--first-case", "3", "--crop", "257x193"], "FRACTIONAL"),
    ("empty_E", ["--site", "E", "--first-case", "4", "--size", "small"], "BINARY"),
]


def ohif_dist():
    """The OHIF dist/ folder; scripts/setup-ohif.sh fetches it (pinned @ohif/app) once."""
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "setup-ohif.sh")], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        pytest.fail("the OHIF viewer is not available: scripts/setup-ohif.sh failed: %s" % proc.stderr.strip()[-1500:])
    return proc.stdout.strip().splitlines()[-1]


def load_ohif_serve():
    spec = importlib.util.spec_from_file_location("ohif_serve", REPO_ROOT / "scripts" / "ohif-serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def orthanc_get(url, path):
    req = urllib.request.Request(url + path)
    req.add_header("Authorization", AUTH_HEADER)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def orthanc_post(url, path, body):
    req = urllib.request.Request(url + path, data=body, method="POST")
    req.add_header("Authorization", AUTH_HEADER)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def empty_seg(path):
    """Our SEG with every pixel cleared: what the writer produces for an empty result (every frame kept,
    ContentDescription saying so), as a new SEG series."""
    ds = pydicom.dcmread(path)
    ds.PixelData = bytes(len(ds.PixelData))
    ds.ContentDescription = "DeSAM prostate: empty result"
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path)


def slice_geometry(mr_dir):
    """MR slices sorted along the normal: (SOPInstanceUID, IPP, row cosine, column cosine, spacing, rows, cols)."""
    out = []
    for f in sorted(Path(mr_dir).glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        iop = np.array(ds.ImageOrientationPatient, float)
        out.append((ds.SOPInstanceUID, np.array(ds.ImagePositionPatient, float), iop[:3], iop[3:],
                    [float(v) for v in ds.PixelSpacing], int(ds.Rows), int(ds.Columns)))
    normal = np.cross(out[0][2], out[0][3])
    return sorted(out, key=lambda s: float(np.dot(s[1], normal)))


def world_of(sl, rows, cols):
    """LPS centres of pixels (rows[i], cols[i]) of one slice."""
    _, ipp, rc, cc, (dr, dc), _, _ = sl
    return ipp[None] + np.outer(cols * dc, rc) + np.outer(rows * dr, cc)


def truth_slices(label_path, geometry):
    """The phantom's truth (label.nii.gz) on each MR slice's pixel grid, through the NIfTI affine."""
    img = nib.load(str(label_path))
    data = np.asarray(img.dataobj) > 0
    inv = np.linalg.inv(img.affine)
    out = []
    for sl in geometry:
        nr, nc = sl[5], sl[6]
        rr, cc = np.meshgrid(np.arange(nr), np.arange(nc), indexing="ij")
        w = world_of(sl, rr.ravel().astype(float), cc.ravel().astype(float))
        ras = np.c_[-w[:, 0], -w[:, 1], w[:, 2], np.ones(len(w))]
        ijk = np.rint(ras @ inv.T)[:, :3].astype(int)
        ok = np.all((ijk >= 0) & (ijk < np.array(data.shape)[None]), axis=1)
        m = np.zeros(len(w), bool)
        m[ok] = data[ijk[ok, 0], ijk[ok, 1], ijk[ok, 2]]
        out.append(m.reshape(nr, nc))
    return out


def dice(a, b):
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * (a & b).sum() / s


def pick_slice(truth):
    """A slice with a large gland whose neighbours differ from it most (so a one-slice shift shows)."""
    areas = [t.sum() for t in truth]
    best, best_score = None, -1.0
    for k in range(1, len(truth) - 1):
        if areas[k] < 0.4 * max(areas):
            continue
        score = 1.0 - max(dice(truth[k], truth[k - 1]), dice(truth[k], truth[k + 1]))
        if score > best_score:
            best, best_score = k, score
    return best if best is not None else int(np.argmax(areas))


@pytest.fixture(scope="module")
def viewer(tmp_path_factory, desam_bin):
    if not DICOMWEB_PLUGIN.is_file():
        pytest.fail("Orthanc's DICOMweb plugin %s is missing (apt-get install orthanc-dicomweb; scripts/setup.sh "
                    "does)" % DICOMWEB_PLUGIN)
    dist = ohif_dist()
    root = tmp_path_factory.mktemp("ohif")
    # "Full" metadata: the SEG's sequences (ReferencedSeriesSequence, per-frame groups) reach OHIF.
    proc, url = start_orthanc(root / "orthanc", plugins=[DICOMWEB_PLUGIN], extra={
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full", "SeriesMetadata": "Full"}})
    server = load_ohif_serve().serve(dist, url, AUTH)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    browser = None
    try:
        browser = Browser(log_path=str(root / "chromium.log"))
        yield {"orthanc": url, "ohif": "http://127.0.0.1:%d" % server.server_address[1], "browser": browser,
               "root": root}
    except CdpError as e:
        pytest.fail(str(e))
    finally:
        if browser:
            browser.close()
        server.shutdown()
        stop_orthanc(proc)


@pytest.fixture(scope="module")
def studies(viewer, desam_bin):
    """Each case written by `desam phantom` (MR + the SEG desam writes) and stored in Orthanc."""
    out = {}
    for name, args, seg_type in CASES:
        folder = viewer["root"] / name
        proc = subprocess.run([desam_bin, "phantom", "--cases", "1", "--out", str(folder), *args],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        case_dir = next(p for p in folder.iterdir() if p.is_dir())
        seg_path = case_dir / "SEG" / "seg.dcm"
        if name.startswith("empty"):
            empty_seg(seg_path)
        seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
        assert seg.SegmentationType == seg_type, (name, seg.SegmentationType, seg.Rows, seg.Columns)
        for f in sorted((case_dir / "MR").glob("*.dcm")):
            orthanc_post(viewer["orthanc"], "/instances", f.read_bytes())
        seg_id = orthanc_post(viewer["orthanc"], "/instances", seg_path.read_bytes())["ID"]
        geometry = slice_geometry(case_dir / "MR")
        out[name] = {"study_uid": seg.StudyInstanceUID, "seg_series_uid": seg.SeriesInstanceUID, "seg_id": seg_id,
                     "geometry": geometry, "truth": truth_slices(case_dir / "label.nii.gz", geometry),
                     "empty": name.startswith("empty"), "frames": int(seg.NumberOfFrames)}
    return out


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_orthanc_serves_every_seg_frame(viewer, studies, name):
    """Orthanc 1.10 refuses 1-bit frames whose Columns is not a multiple of 8; our SEGs never are."""
    s = studies[name]
    for i in sorted({0, s["frames"] // 2, s["frames"] - 1}):
        status, body = orthanc_get(viewer["orthanc"], "/instances/%s/frames/%d/raw" % (s["seg_id"], i))
        assert status == 200, "%s: frame %d: HTTP %d %s" % (name, i, status, body[:300])
    tags = json.loads(orthanc_get(viewer["orthanc"], "/instances/%s/simplified-tags" % s["seg_id"])[1])
    status, _ = orthanc_get(viewer["orthanc"], "/dicom-web/studies/%s/series/%s/instances/%s/frames/1" % (
        s["study_uid"], s["seg_series_uid"], tags["SOPInstanceUID"]))
    assert status == 200, "%s: DICOMweb frames route: HTTP %d" % (name, status)


def click(browser, x, y, count=1):
    for n in range(1, count + 1):
        for t in ("mousePressed", "mouseReleased"):
            browser.call("Input.dispatchMouseEvent", type=t, x=x, y=y, button="left", clickCount=n)


def centre_of(browser, js_find):
    return browser.eval("(() => { const e = %s; if (!e) return null; const r = e.getBoundingClientRect(); "
                        "return [r.x + r.width / 2, r.y + r.height / 2]; })()" % js_find)


def open_seg_in_ohif(viewer, study, name):
    b = viewer["browser"]
    b.console.clear()
    b.goto("%s/segmentation?StudyInstanceUIDs=%s" % (viewer["ohif"], study["study_uid"]))
    b.wait_for("!!(window.services && [...document.querySelectorAll('*')].some(e => e.children.length === 0 && "
               "e.textContent.trim() === 'SEG'))", 90, "OHIF to list the SEG series (%s)" % name)
    b.wait_for("(() => { try { const vp = cornerstone.getRenderingEngines()[0].getViewports()[0]; "
               "return !!(vp && vp.getImageIds && vp.getImageIds().length); } catch (e) { return false; } })()",
               90, "the MR series in the viewport (%s)" % name)
    # As a user does: double-click the SEG's thumbnail, then "Yes" to "open this Segmentation?".
    pos = centre_of(b, "[...document.querySelectorAll('*')].find(e => e.children.length === 0 && "
                       "e.textContent.trim() === 'SEG')")
    click(b, pos[0] + 60, pos[1], count=2)
    yes = b.wait_for("(() => { const e = [...document.querySelectorAll('button')].find(e => e.textContent.trim() "
                     "=== 'Yes'); if (!e) return null; const r = e.getBoundingClientRect(); "
                     "return [r.x + r.width / 2, r.y + r.height / 2]; })()", 60, "the load prompt (%s)" % name)
    click(b, yes[0], yes[1])
    segs = b.wait_for("(() => { const s = services.segmentationService.getSegmentations(); "
                      "if (!s.length) return null; return s.map(g => Object.values(g.segments || {})"
                      ".filter(Boolean).map(x => x.label)); })()", 90, "the segmentation to load (%s)" % name)
    b.wait_for("[...document.querySelectorAll('*')].some(e => e.children.length === 0 && "
               "e.textContent.trim() === 'Prostate')", 30, "'Prostate' in the segment list (%s)" % name)
    return segs


def show_slice(b, sop_uid, points):
    """Shows the MR image `sop_uid` and returns the page coordinates of the LPS `points` on it."""
    js = """(async () => {
      const vp = cornerstone.getRenderingEngines()[0].getViewports()[0];
      const idx = vp.getImageIds().findIndex(id => id.includes('/instances/%s/'));
      if (idx < 0) return {error: 'image not in the viewport'};
      await vp.setImageIdIndex(idx);
      vp.render();
      await new Promise(r => setTimeout(r, 1500));
      vp.render();
      await new Promise(r => setTimeout(r, 500));
      const rect = vp.canvas.getBoundingClientRect();
      const pts = %s.map(p => { const c = vp.worldToCanvas(p); return [rect.x + c[0], rect.y + c[1]]; });
      return {idx, current: vp.getCurrentImageIdIndex(), rect: [rect.x, rect.y, rect.width, rect.height], pts};
    })()""" % (sop_uid, json.dumps([list(map(float, p)) for p in points]))
    r = b.eval(js, timeout_s=60)
    assert r and "error" not in r, r
    assert r["current"] == r["idx"], r
    return r


def canvas_only(b, on):
    """Hides every page element but the viewport's canvases (CSS visibility is inherited but a child may
    turn it back on), or shows the page again."""
    js = """(() => {
      const vp = cornerstone.getRenderingEngines()[0].getViewports()[0];
      document.body.style.visibility = %s;
      for (const c of vp.element.querySelectorAll('canvas')) c.style.visibility = %s;
      return vp.element.querySelectorAll('canvas').length;
    })()""" % (("'hidden'", "'visible'") if on else ("''", "''"))
    n = b.eval(js)
    assert n, "no canvas in the viewport"
    if on:
        time.sleep(0.3)  # one frame for the compositor


def chroma_at(img, pts):
    a = np.asarray(img.convert("RGB")).astype(int)
    h, w = a.shape[:2]
    out = []
    for x, y in pts:
        xi, yi = int(round(x)), int(round(y))
        if not (0 <= xi < w and 0 <= yi < h):
            out.append(None)
            continue
        p = a[yi, xi]
        out.append(int(p.max() - p.min()) > CHROMA)
    return out


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_ohif_shows_the_seg_on_the_gland(viewer, studies, name):
    study = studies[name]
    b = viewer["browser"]
    segs = open_seg_in_ohif(viewer, study, name)
    assert any("Prostate" in labels for labels in segs), segs
    truth, geometry = study["truth"], study["geometry"]
    k = pick_slice(truth)
    sl = geometry[k]
    nr, nc = sl[5], sl[6]
    t = truth[k]
    # Voxels near the gland (bounding box + margin) for the agreement, a coarse grid of far ones.
    ys, xs = np.nonzero(t)
    m = max(4, nr // 16)
    r0, r1, c0, c1 = max(0, ys.min() - m), min(nr, ys.max() + m + 1), max(0, xs.min() - m), min(nc, xs.max() + m + 1)
    near_r, near_c = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
    near_r, near_c = near_r.ravel(), near_c.ravel()
    step = max(2, nr // 24)
    far_r, far_c = np.meshgrid(np.arange(0, nr, step), np.arange(0, nc, step), indexing="ij")
    far = (np.abs(far_r - (ys.min() + ys.max()) / 2) > (ys.max() - ys.min()) / 2 + 3 * m) | \
          (np.abs(far_c - (xs.min() + xs.max()) / 2) > (xs.max() - xs.min()) / 2 + 3 * m)
    far_r, far_c = far_r[far], far_c[far]
    rows = np.r_[near_r, far_r].astype(float)
    cols = np.r_[near_c, far_c].astype(float)
    r = show_slice(b, sl[0], world_of(sl, rows, cols))
    b.screenshot(str(ARTEFACTS / ("%s.png" % name)))  # what the user sees, for the record
    # The check reads the viewport's own canvases only: toasts, menus and icons that OHIF may float over
    # the image at any moment (a timing-dependent notification once coloured far points) are hidden.
    shot = ARTEFACTS / ("%s-canvas.png" % name)
    canvas_only(b, True)
    try:
        b.screenshot(str(shot))
    finally:
        canvas_only(b, False)
    img = Image.open(shot)
    x0, y0, w, h = r["rect"]
    inside_canvas = [x0 + 2 <= p[0] <= x0 + w - 2 and y0 + 2 <= p[1] <= y0 + h - 2 for p in r["pts"]]
    # Far points: clear of the viewport's coloured UI (orientation/layer icons, arrows, scroll bar).
    clear_of_ui = [x0 + 40 <= p[0] <= x0 + w - 40 and y0 + 50 <= p[1] <= y0 + h - 50 for p in r["pts"]]
    col = chroma_at(img, r["pts"])
    n_near = len(near_r)
    shown = np.zeros((nr, nc), bool)
    seen = np.zeros((nr, nc), bool)
    for i in range(n_near):
        if inside_canvas[i] and col[i] is not None:
            seen[near_r[i], near_c[i]] = True
            shown[near_r[i], near_c[i]] = col[i]
    far_hits = [i for i in range(n_near, len(col)) if clear_of_ui[i] and col[i]]
    far_seen = sum(1 for i in range(n_near, len(col)) if clear_of_ui[i])
    report = {"slice": k, "image_index": r["idx"], "near_seen": int(seen.sum()), "far_seen": far_seen,
              "far_coloured": len(far_hits), "overlay_voxels": int(shown.sum()), "truth_voxels": int(t.sum())}
    assert seen.sum() > 0.9 * len(near_r), ("%s: the gland is not in view" % name, report)
    assert far_seen > 20, ("%s: too few far points in view" % name, report)
    assert not far_hits, ("%s: overlay colour far from the gland" % name, report)
    if study["empty"]:
        assert shown.sum() == 0, ("%s: the empty SEG shows an overlay" % name, report)
        return
    d = {"k": dice(shown, t & seen), "k-1": dice(shown, truth[k - 1] & seen), "k+1": dice(shown, truth[k + 1] & seen),
         "flip_lr": dice(shown, t[:, ::-1] & seen), "flip_ap": dice(shown, t[::-1, :] & seen)}
    report["dice"] = {key: round(v, 3) for key, v in d.items()}
    print(name, json.dumps(report))
    assert d["k"] >= 0.85, ("%s: overlay does not match the truth of the displayed slice" % name, report)
    for other in ("k-1", "k+1"):
        assert d["k"] > d[other], ("%s: overlay matches slice %s better (shifted)" % (name, other), report)
    for flip, tf in (("flip_lr", t[:, ::-1]), ("flip_ap", t[::-1, :])):
        if dice(t, tf) < 0.9:  # a flip is only visible where the gland is not symmetric
            assert d["k"] > d[flip] + 0.02, ("%s: overlay matches the %s truth" % (name, flip), report)

"""The open realism test of docs/phantom.md: pyAutoRef's detector (trained on real prostate T2w) judges phantoms.
For each case: pyAutoRef's own pre-processing and detection; then each class's top box against the tissue map.

pyAutoRef 2.2.1 (PyPI, MIT) finds reference "fat" and "muscle" with a YOLOv8 model (`pyAutoRef/model.onnx`)
on its resampled slices (384 x 384, N4-corrected, percentile-scaled, written as JPEG). A class passes on a
case when its top detection has probability >= --min-probability and its box lies for >= --min-on-tissue of
its area on that tissue in the phantom's tissue map (`desam phantom --tissue-map`), resampled exactly as
pyAutoRef resamples the image (nearest neighbour). Usage (benches/realism.sh runs it):

    python autoref_judge.py --data NNUNET_DIR --out OUT.json [--markdown OUT.md]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from importlib import metadata

import numpy as np
import SimpleITK as sitk
import pyAutoRef
from pyAutoRef.object_detection import object_detection
from pyAutoRef.pre_processing import pre_processing
from pyAutoRef import utils as autoref_utils
from pyAutoRef.utils import resize_image

SITES = "ABCDEF"
# Which tissue codes of the phantom's map count as each detector class.
CLASS_TISSUES = {"fat": ["fat"], "muscle": ["muscle"]}


def site_of(case_id):
    """Site letter of an nnU-Net case id `prostate_NNN` (DeSAM's patient id = site index * 100 + case)."""
    return SITES[int(case_id.split("_")[1]) // 100]


def lower_detection_floor(floor):
    """Makes pyAutoRef keep detections down to `floor` (its own cut is 0.5), so that a near miss shows
    as a probability rather than "none". The top box is the same either way whenever it reaches 0.5
    (non-maximum suppression never removes the most probable box), so a pass stays a pass."""
    own = autoref_utils.process_model_output

    def with_floor(output, width, height, yolo_classes=("fat", "muscle"), confidence_threshold=0.5, iou_threshold=0.5):
        return own(output, width, height, list(yolo_classes), min(floor, confidence_threshold), iou_threshold)

    autoref_utils.process_model_output = with_floor


def with_rician_noise(image_path, tissue_path, legend, snr, seed, scratch):
    """A copy of the image with Rician noise of sigma = (median fat intensity) / snr added (noise on the
    real and imaginary channels, then the magnitude, as a scanner's magnitude image has it): a probe of
    how much the judge's verdict hangs on the noise level."""
    image = sitk.ReadImage(image_path)
    a = sitk.GetArrayFromImage(image).astype(np.float32)
    tissues = sitk.GetArrayFromImage(sitk.ReadImage(tissue_path))
    sigma = float(np.median(a[tissues == legend["fat"]])) / snr
    rng = np.random.default_rng(seed)
    noisy = np.hypot(a + rng.normal(0, sigma, a.shape), rng.normal(0, sigma, a.shape)).astype(np.float32)
    out = sitk.GetImageFromArray(noisy)
    out.CopyInformation(image)
    path = os.path.join(scratch, f"noisy_{os.path.basename(image_path)}")
    sitk.WriteImage(out, path)
    return path


def judge_case(image_path, tissue_path, legend, scratch, min_probability, min_on_tissue):
    t0 = time.time()
    _, slices_dir, _, resized = pre_processing(scratch, image_path)
    model = os.path.join(os.path.dirname(pyAutoRef.__file__), "model.onnx")
    top = object_detection(slices_dir, model)
    # The tissue map on pyAutoRef's grid: its own resize, nearest neighbour (codes stay codes).
    tissues = sitk.ReadImage(tissue_path)
    tissues = resize_image(tissues, interpolator=sitk.sitkNearestNeighbor)
    tmap = sitk.GetArrayFromImage(tissues)  # [slice, row, col], the JPEGs' pixel grid
    if tmap.shape[1:] != sitk.GetArrayViewFromImage(resized).shape[1:]:
        raise RuntimeError(f"tissue map grid {tmap.shape} differs from pyAutoRef's {resized.GetSize()}")
    out = {"seconds": round(time.time() - t0, 1)}
    for cls, names in CLASS_TISSUES.items():
        codes = [legend[n] for n in names]
        dets = top.get(cls, [])
        if not dets:
            out[cls] = {"detected": False, "probability": 0.0, "on_tissue": 0.0, "passed": False}
            continue
        best = dets[0]
        z = int(best["slice"])
        x1, y1, x2, y2 = (float(v) for v in best["bbox"])
        h, w = tmap.shape[1:]
        c0, c1 = max(0, int(np.floor(x1))), min(w, int(np.ceil(x2)))
        r0, r1 = max(0, int(np.floor(y1))), min(h, int(np.ceil(y2)))
        region = tmap[z, r0:r1, c0:c1]
        on = float(np.isin(region, codes).mean()) if region.size else 0.0
        # What the box mostly covers, for the reader.
        names_by_code = {v: k for k, v in legend.items()}
        vals, counts = np.unique(region, return_counts=True) if region.size else ([], [])
        mostly = names_by_code.get(int(vals[int(np.argmax(counts))]), "?") if len(vals) else "-"
        p = float(best["probability"])
        out[cls] = {
            "detected": True,
            "probability": round(p, 4),
            "slice": z,
            "bbox": [round(v, 1) for v in (x1, y1, x2, y2)],
            "on_tissue": round(on, 4),
            "box_mostly": mostly,
            "passed": p >= min_probability and on >= min_on_tissue,
        }
    return out


def markdown(result):
    lines = [
        f"pyAutoRef {result['pyautoref']}, goal: top probability >= {result['min_probability']} and top box >= "
        f"{result['min_on_tissue']:.0%} on that tissue, both classes, every case. Detections are kept down to "
        f"p = {result['detection_floor']} (\"below\": a near miss; \"none\": nothing even there).",
        "",
        *(
            [f"Probe: Rician noise added to every image, sigma = median fat / {result['added_rician_noise_snr']:g}.", ""]
            if result.get("added_rician_noise_snr")
            else []
        ),
        "| site | case | fat p | fat box on fat | muscle p | muscle box on muscle | both pass |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        cell = lambda k: (
            (f"{c[k]['probability']:.2f}" if c[k]["detected"] else "none")
            + ("" if c[k]["probability"] >= result["min_probability"] or not c[k]["detected"] else " (below)"),
            f"{c[k]['on_tissue']:.0%} ({c[k]['box_mostly']})" if c[k]["detected"] else "-",
        )
        fp, fo = cell("fat")
        mp, mo = cell("muscle")
        ok = "yes" if c["fat"]["passed"] and c["muscle"]["passed"] else "no"
        lines.append(f"| {c['site']} | {c['case']} | {fp} | {fo} | {mp} | {mo} | {ok} |")
    lines += ["", "| site | cases | fat passed | muscle passed | goal met |", "|---|---|---|---|---|"]
    for s, v in result["sites"].items():
        lines.append(f"| {s} | {v['cases']} | {v['fat_passed']} | {v['muscle_passed']} | {'yes' if v['goal_met'] else 'no'} |")
    lines.append("")
    lines.append(f"Goal met on all sites: {'yes' if result['goal_met'] else 'no'}.")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="nnU-Net folder from `desam phantom --format nifti --tissue-map`")
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--markdown", help="also write the tables here")
    ap.add_argument("--min-probability", type=float, default=0.5)
    ap.add_argument("--min-on-tissue", type=float, default=0.5)
    ap.add_argument(
        "--detection-floor",
        type=float,
        default=0.02,
        help="keep detections down to this probability (pyAutoRef cuts at 0.5) to report near misses",
    )
    ap.add_argument(
        "--add-rician-noise",
        type=float,
        metavar="SNR",
        help="a probe, not the test: judge each image with Rician noise of sigma = median fat / SNR added",
    )
    a = ap.parse_args()
    lower_detection_floor(a.detection_floor)

    legend_path = os.path.join(a.data, "labelsTr_tissues", "tissues.json")
    with open(legend_path) as f:
        legend = json.load(f)
    images = sorted(n for n in os.listdir(os.path.join(a.data, "imagesTr")) if n.endswith("_0000.nii.gz"))
    if not images:
        sys.exit(f"no images in {a.data}/imagesTr")
    cases = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in images:
            cid = name[: -len("_0000.nii.gz")]
            tissue = os.path.join(a.data, "labelsTr_tissues", cid + ".nii.gz")
            if not os.path.exists(tissue):
                sys.exit(f"{cid}: no tissue map {tissue} (generate with --tissue-map)")
            image = os.path.join(a.data, "imagesTr", name)
            if a.add_rician_noise:
                image = with_rician_noise(image, tissue, legend, a.add_rician_noise, int(cid.split("_")[1]), scratch)
            r = judge_case(image, tissue, legend, scratch, a.min_probability, a.min_on_tissue)
            r.update({"case": cid, "site": site_of(cid)})
            print(f"{cid} site {r['site']}: fat {r['fat']}, muscle {r['muscle']}", flush=True)
            cases.append(r)
    sites = {}
    for c in cases:
        s = sites.setdefault(c["site"], {"cases": 0, "fat_passed": 0, "muscle_passed": 0})
        s["cases"] += 1
        s["fat_passed"] += int(c["fat"]["passed"])
        s["muscle_passed"] += int(c["muscle"]["passed"])
    for s in sites.values():
        s["goal_met"] = s["fat_passed"] == s["cases"] and s["muscle_passed"] == s["cases"]
    result = {
        "pyautoref": metadata.version("pyAutoRef"),
        "onnxruntime": metadata.version("onnxruntime"),
        "min_probability": a.min_probability,
        "min_on_tissue": a.min_on_tissue,
        "detection_floor": a.detection_floor,
        "added_rician_noise_snr": a.add_rician_noise,
        "cases": cases,
        "sites": dict(sorted(sites.items())),
        "goal_met": all(s["goal_met"] for s in sites.values()),
    }
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md)
    print(md)


if __name__ == "__main__":
    main()

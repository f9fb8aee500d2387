"""A probe for the realism judge, not part of the phantom: copies an nnU-Net phantom folder with a
multiplicative texture painted into fat and muscle, so `autoref_judge.py` can tell what the detector misses.

The texture is white noise smoothed by a Gaussian of `--scale-mm` in-plane (a third of it through-plane),
normalised to unit spread, and applied as image * (1 + amplitude * texture) on the voxels the tissue map
calls fat or muscle (`--tissues`); `--fat-gain` also scales fat's signal, `--gain NAME=FACTOR` any tissue's.
Seeded by the case index. Usage:

    python texture_probe.py --data NNUNET_DIR --out OUT_DIR --scale-mm 0.6 --amplitude 0.25 [--fat-gain 1.0]
        [--tissues fat,muscle] [--gain muscle=1.5 ...]
"""

import argparse
import json
import os
import shutil

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="from `desam phantom --format nifti --tissue-map`")
    ap.add_argument("--out", required=True)
    ap.add_argument("--scale-mm", type=float, required=True)
    ap.add_argument("--amplitude", type=float, required=True)
    ap.add_argument("--fat-gain", type=float, default=1.0)
    ap.add_argument("--tissues", default="fat,muscle", help="tissue-map names the texture is painted into")
    ap.add_argument("--gain", action="append", default=[], help="NAME=FACTOR: scale that tissue's signal")
    a = ap.parse_args()
    legend_dir = os.path.join(a.data, "labelsTr_tissues")
    with open(os.path.join(legend_dir, "tissues.json")) as f:
        legend = json.load(f)
    os.makedirs(os.path.join(a.out, "imagesTr"), exist_ok=True)
    shutil.copytree(legend_dir, os.path.join(a.out, "labelsTr_tissues"), dirs_exist_ok=True)
    for name in sorted(os.listdir(os.path.join(a.data, "imagesTr"))):
        case = name[: -len("_0000.nii.gz")]
        image = sitk.ReadImage(os.path.join(a.data, "imagesTr", name))
        pixels = sitk.GetArrayFromImage(image).astype(np.float32)  # [slice, row, col]
        tissues = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(legend_dir, case + ".nii.gz")))
        sx, sy, sz = image.GetSpacing()
        rng = np.random.default_rng(int(case.split("_")[1]))
        texture = gaussian_filter(rng.normal(size=pixels.shape), sigma=(a.scale_mm / sz / 3, a.scale_mm / sy, a.scale_mm / sx))
        texture /= texture.std()
        painted = np.isin(tissues, [legend[n] for n in a.tissues.split(",")])
        pixels = np.where(painted, pixels * (1 + a.amplitude * texture), pixels)
        gains = dict(g.split("=") for g in a.gain)
        gains["fat"] = float(gains.get("fat", 1.0)) * a.fat_gain
        for tissue, factor in gains.items():
            pixels = np.where(tissues == legend[tissue], pixels * float(factor), pixels)
        pixels = pixels.astype(np.float32)
        out = sitk.GetImageFromArray(pixels)
        out.CopyInformation(image)
        sitk.WriteImage(out, os.path.join(a.out, "imagesTr", name))
        print(f"{case}: texture {a.scale_mm} mm x {a.amplitude} in {a.tissues}, gains {gains}", flush=True)


if __name__ == "__main__":
    main()

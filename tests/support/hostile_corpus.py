"""Writes the hostile-input corpus of tests/hostile.rs (issue 13): malformed DICOM, NIfTI, model
directories, checkpoints and caches, each aimed at one class of failure (panic, unbounded memory,
unbounded recursion, wrapping header arithmetic). Every case is made here from a valid template.

usage: hostile_corpus.py TEMPLATE_DCM MODEL_DIR OUT_DIR
TEMPLATE_DCM: one valid MR slice written by desam; MODEL_DIR: a valid (tiny) model directory.
Writes OUT_DIR/<case>/... and OUT_DIR/manifest.json: [{"name", "class", "input", "model", "expect"}].
"""
import copy
import gzip
import hashlib
import json
import os
import shutil
import struct
import sys
import zipfile

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

CASES = []


def case(name, klass, input_path, expect, model=None, env=None, note=""):
    CASES.append({"name": name, "class": klass, "input": input_path, "expect": expect,
                  "model": model, "env": env or {}, "note": note})


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def series_dir(out, name):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    return d


def save(ds, path, ts=ExplicitVRLittleEndian):
    ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(path, enforce_file_format=True)


def dicom_cases(template, out):
    base = pydicom.dcmread(template)

    # Memory: one deflated 8192² slice (a 200 KB file that inflates to 128 MB of pixels).
    ds = copy.deepcopy(base)
    ds.Rows = ds.Columns = 8192
    ds.PixelData = bytes(8192 * 8192 * 2)
    d = series_dir(out, "dicom_deflated_8192")
    save(ds, os.path.join(d, "huge.dcm"), DeflatedExplicitVRLittleEndian)
    case("dicom_deflated_8192", "memory", d, "error")

    # Memory: a defined-length sequence whose item holds an element declaring 4 GiB (9 KB file).
    ds = copy.deepcopy(base)
    item = Dataset()
    item.EncapsulatedDocument = b"MARKMARK"
    seq = Sequence([item])
    ds.ReferencedImageSequence = seq
    ds["ReferencedImageSequence"].is_undefined_length = False
    item.is_undefined_length_sequence_item = False
    d = series_dir(out, "dicom_nested_4gib")
    p = os.path.join(d, "nested.dcm")
    save(ds, p)
    raw = bytearray(open(p, "rb").read())
    at = raw.find(b"\x42\x00\x11\x00OB\x00\x00\x08\x00\x00\x00MARKMARK")
    assert at > 0, "marker element not found"
    raw[at + 8:at + 12] = struct.pack("<I", 0xFFFFFFF0)
    open(p, "wb").write(raw)
    case("dicom_nested_4gib", "memory", d, "error")

    # Memory: Rows × Columns far beyond an MR slice, pixel data absent from the file.
    ds = copy.deepcopy(base)
    ds.Rows = ds.Columns = 65535
    d = series_dir(out, "dicom_rows_65535")
    save(ds, os.path.join(d, "big.dcm"))
    case("dicom_rows_65535", "memory", d, "error")

    # Arithmetic: NumberOfFrames = 2^48 (rows × cols × frames overflows 64-bit products of usize).
    ds = copy.deepcopy(base)
    ds.NumberOfFrames = str(1 << 48)
    d = series_dir(out, "dicom_frames_2p48")
    save(ds, os.path.join(d, "frames.dcm"))
    case("dicom_frames_2p48", "arithmetic", d, "error")

    # Recursion/memory: sequences nested 200 deep.
    ds = copy.deepcopy(base)
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(200):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    ds.ContentSequence = inner.ContentSequence
    d = series_dir(out, "dicom_nested_200")
    save(ds, os.path.join(d, "deep.dcm"))
    case("dicom_nested_200", "recursion", d, "error")

    # Memory: a 1 GiB non-DICOM file (sparse) beside a valid one-slice series: read 132 bytes only.
    d = series_dir(out, "dicom_big_neighbour")
    shutil.copy(template, os.path.join(d, "slice.dcm"))
    with open(os.path.join(d, "notes.bin"), "wb") as f:
        f.truncate(1 << 30)
    case("dicom_big_neighbour", "memory", d, "ok")

    # Recursion: directory symlink loops inside a valid series folder.
    d = series_dir(out, "dicom_symlink_loop")
    shutil.copy(template, os.path.join(d, "slice.dcm"))
    os.makedirs(os.path.join(d, "sub"), exist_ok=True)
    os.symlink("..", os.path.join(d, "sub", "up"))
    os.symlink(".", os.path.join(d, "sub", "self"))
    os.symlink("../sub", os.path.join(d, "sub", "again"))
    case("dicom_symlink_loop", "recursion", d, "ok")

    # Truncated: the template cut in the middle of its pixel data.
    d = series_dir(out, "dicom_truncated")
    raw = open(template, "rb").read()
    open(os.path.join(d, "cut.dcm"), "wb").write(raw[: len(raw) // 2])
    case("dicom_truncated", "panic", d, "error")


def nifti_header(dims, datatype=4, bitpix=16):
    h = bytearray(348)
    struct.pack_into("<i", h, 0, 348)
    struct.pack_into("<8h", h, 40, len(dims), *(list(dims) + [1] * (7 - len(dims))))
    struct.pack_into("<hh", h, 70, datatype, bitpix)
    struct.pack_into("<8f", h, 76, 1.0, 1.0, 1.0, 1.0, 1, 1, 1, 1)
    struct.pack_into("<f", h, 108, 352.0)  # vox_offset
    struct.pack_into("<f", h, 112, 1.0)  # scl_slope
    h[344:348] = b"n+1\x00"
    return bytes(h) + b"\x00" * 4


def nifti_cases(out):
    # Memory: a 2 MB .nii.gz declaring 2048 × 2048 × 1024 int16 (8 GiB); its data is compressible zeros.
    d = series_dir(out, "nifti_8gib")
    p = os.path.join(d, "lie.nii.gz")
    with gzip.open(p, "wb", compresslevel=1) as f:
        f.write(nifti_header((2048, 2048, 1024)))
        f.write(bytes(2 << 20))
    case("nifti_8gib", "memory", p, "error")

    # Arithmetic: a negative dimension.
    d = series_dir(out, "nifti_negative_dim")
    p = os.path.join(d, "neg.nii")
    open(p, "wb").write(nifti_header((64, -64, 8)) + bytes(64))
    case("nifti_negative_dim", "arithmetic", p, "error")


def model_copy(src, out, name):
    d = os.path.join(out, name)
    shutil.copytree(src, d)
    return d, json.load(open(os.path.join(d, "model.json")))


def write_model(d, spec):
    json.dump(spec, open(os.path.join(d, "model.json"), "w"), indent=1)


def pth_zip(path, pickle_bytes, members=()):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        for name, writer in members:
            with z.open("archive/data/" + name, "w", force_zip64=True) as f:
                writer(f)


def use_backbone(d, spec, weights_name):
    p = os.path.join(d, weights_name)
    spec["backbone"]["files"] = [{"path": weights_name, "sha256": sha256(p)}]
    write_model(d, spec)


def model_cases(model, out, valid_series):
    # Panic (shipped bug): an impossible intensity clip passed validation, then panicked per series.
    d, spec = model_copy(model, out, "model_bad_clip")
    spec["preprocessing"]["clip_percentiles"] = [0.5, 150.0]
    write_model(d, spec)
    case("model_bad_clip", "panic", valid_series, "error", model=d)

    d, spec = model_copy(model, out, "model_bad_threshold")
    spec["thresholds"] = {"iou": 7.0, "nms": 0.7, "min_area": 100.0, "qa": 0.5}  # IoU above 1: never met
    write_model(d, spec)
    case("model_bad_threshold", "panic", valid_series, "error", model=d)

    # Path traversal in a weights entry.
    d, spec = model_copy(model, out, "model_path_traversal")
    spec["decoder"]["files"][0]["path"] = "../../../../etc/passwd"
    write_model(d, spec)
    case("model_path_traversal", "panic", valid_series, "error", model=d)

    # Memory: a zip bomb: a 1 GiB storage of zeros deflated to about 1 MB. The pickle is torch's
    # own (a 12345-element tensor) with that size patched to 2^28 elements.
    import io
    import pickle
    import torch
    d, spec = model_copy(model, out, "model_zip_bomb")
    buf = io.BytesIO()
    torch.save({"image_encoder.w": torch.zeros(12345)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    pkl_name = next(n for n in src.namelist() if n.endswith("/data.pkl"))
    prefix = pkl_name[: -len("data.pkl")]
    pkl = src.read(pkl_name)
    assert pkl.count(b"M\x39\x30") == 2, "numel and size of the template tensor"
    pkl = pkl.replace(b"M\x39\x30", b"J" + struct.pack("<i", 1 << 28))
    p = os.path.join(d, "bomb.pth")
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for n in src.namelist():
            if n == pkl_name:
                z.writestr(n, pkl)
            elif n == prefix + "data/0":
                with z.open(n, "w", force_zip64=True) as f:
                    chunk = bytes(16 << 20)
                    for _ in range(64):
                        f.write(chunk)
            else:
                z.writestr(n, src.read(n))
    use_backbone(d, spec, "bomb.pth")
    case("model_zip_bomb", "memory", valid_series, "error", model=d)

    # Recursion: a state dict that contains itself (memo cycle) under "model".
    d, spec = model_copy(model, out, "model_pickle_cycle")
    cyc = {}
    cyc["model"] = cyc
    p = os.path.join(d, "cycle.pth")
    pth_zip(p, pickle.dumps(cyc, protocol=2))
    use_backbone(d, spec, "cycle.pth")
    case("model_pickle_cycle", "recursion", valid_series, "error", model=d)

    # Recursion: lists nested a million deep (EMPTY_LIST × N, APPEND × (N − 1)).
    d, spec = model_copy(model, out, "model_pickle_deep")
    n = 1_000_000
    p = os.path.join(d, "deep.pth")
    pth_zip(p, b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b".")
    use_backbone(d, spec, "deep.pth")
    case("model_pickle_deep", "recursion", valid_series, "error", model=d)

    # Panic: a real libtorch error at inference (test hook, docs/limits.md) must be one line, exit 1.
    case("model_fault_at_inference", "panic", valid_series, "error", model=model,
         env={"DESAM_FAULT_INJECTION": "decode"})


def main():
    template, model, out = sys.argv[1:4]
    os.makedirs(out, exist_ok=True)
    valid = series_dir(out, "valid_one_slice")
    shutil.copy(template, os.path.join(valid, "slice.dcm"))
    case("valid_one_slice", "reference", valid, "ok")
    dicom_cases(template, out)
    nifti_cases(out)
    model_cases(model, out, valid)
    json.dump(CASES, open(os.path.join(out, "manifest.json"), "w"), indent=1)


if __name__ == "__main__":
    main()

"""Makes DICOM variants of a series for tests/dicom_series.rs with pydicom (the independent encoder).

usage: dicom_variants.py KIND IN_DIR OUT_DIR
Every *.dcm in IN_DIR is transformed and written to OUT_DIR (same file names unless stated).
Never modifies IN_DIR.
"""
import copy
import os
import sys

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)


def files(d):
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".dcm"))


def save(ds, path, **kw):
    ds.save_as(path, enforce_file_format=True, **kw)


def main():
    kind, src, dst = sys.argv[1:4]
    os.makedirs(dst, exist_ok=True)
    paths = files(src)
    if kind == "enhanced":
        return make_enhanced(paths, dst)
    if kind in ("legacy_enhanced", "legacy_enhanced_rle"):
        return make_legacy_enhanced(paths, dst, rle=kind.endswith("rle"))
    for i, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        out = os.path.join(dst, os.path.basename(p))
        if kind == "rle":
            ds.compress(RLELossless, encoding_plugin="pydicom")
        elif kind == "j2k":
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        elif kind == "implicit":
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        elif kind == "deflated":
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        elif kind == "8bit_unsigned" or kind == "8bit_signed":
            arr = ds.pixel_array.astype(np.int32)
            signed = kind == "8bit_signed"
            arr8 = (arr % 200 - (100 if signed else 0)).astype(np.int8 if signed else np.uint8)
            ds.BitsAllocated = 8
            ds.BitsStored = 8
            ds.HighBit = 7
            ds.PixelRepresentation = 1 if signed else 0
            ds.PixelData = arr8.tobytes()
            ds["PixelData"].VR = "OB"
            for t in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "RescaleType"):
                if t in ds:
                    del ds[t]
        elif kind == "12bit_signed":
            # BitsStored 12 in 16 allocated, garbage in the unused high bits (must be ignored).
            arr = ds.pixel_array.astype(np.int32) % 2000 - 1000
            raw = (arr & 0x0FFF) | 0xA000
            ds.BitsStored = 12
            ds.HighBit = 11
            ds.PixelRepresentation = 1
            ds.PixelData = raw.astype(np.uint16).tobytes()
            for t in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
                if t in ds:
                    del ds[t]
        elif kind == "monochrome1":
            ds.PhotometricInterpretation = "MONOCHROME1"
        elif kind == "mixed_monochrome":
            if i == 1:
                ds.PhotometricInterpretation = "MONOCHROME1"
        elif kind == "palette":
            if i == len(paths) // 2:
                ds.PhotometricInterpretation = "PALETTE COLOR"
        elif kind == "mixed_orientation":
            if i == 1:
                ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        elif kind == "tilted":
            if i == 1:
                t = np.radians(3.0)
                ds.ImageOrientationPatient = [1, 0, 0, 0, float(np.cos(t)), float(np.sin(t))]
        elif kind == "shifted":
            if i == 1:
                ipp = [float(v) for v in ds.ImagePositionPatient]
                ipp[0] += 5.0
                ds.ImagePositionPatient = ipp
        elif kind == "duplicate":
            if i == 1:
                dup = copy.deepcopy(ds)
                dup.SOPInstanceUID = generate_uid()
                dup.file_meta.MediaStorageSOPInstanceUID = dup.SOPInstanceUID
                save(dup, os.path.join(dst, "dup.dcm"))
        elif kind == "rows":
            if i == 1:
                arr = ds.pixel_array[:-1, :]
                ds.Rows = arr.shape[0]
                ds.PixelData = arr.tobytes()
        elif kind == "spacing":
            if i == 1:
                ds.PixelSpacing = [1.5, 1.5]
        elif kind == "no_pixels":
            if i == 1:
                del ds.PixelData
        elif kind == "no_spacing_info":
            for t in ("SpacingBetweenSlices", "SliceThickness"):
                if t in ds:
                    del ds[t]
        elif kind == "thickness_only":
            del ds.SpacingBetweenSlices
            ds.SliceThickness = 4.0
        elif kind == "unknown_ts":
            ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.2.1143.999.1"
            with open(out, "wb") as f:
                pydicom.filewriter.dcmwrite(f, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
            continue
        elif kind == "other_series":
            ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(ds.SeriesInstanceUID), "other"])
            ds.SeriesDescription = "second series"
        else:
            raise SystemExit(f"unknown kind {kind}")
        save(ds, out)


def make_enhanced(paths, dst):
    """One Enhanced MR instance from single-frame slices: frames stored in reverse order, a per-frame
    rescale, shared pixel measures and orientation, per-frame position."""
    slices = [pydicom.dcmread(p) for p in paths]
    first = slices[0]
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for kw in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
               "Modality", "Manufacturer", "SeriesDescription", "StudyDate", "StudyTime"):
        setattr(ds, kw, getattr(first, kw))
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows, ds.Columns = first.Rows, first.Columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    order = list(reversed(range(len(slices))))
    ds.NumberOfFrames = len(order)
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = first.PixelSpacing
    pm.SliceThickness = first.SliceThickness
    shared.PixelMeasuresSequence = Sequence([pm])
    po = Dataset()
    po.ImageOrientationPatient = first.ImageOrientationPatient
    shared.PlaneOrientationSequence = Sequence([po])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    frames = []
    for k, idx in enumerate(order):
        s = slices[idx]
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = s.ImagePositionPatient
        item.PlanePositionSequence = Sequence([pp])
        pv = Dataset()
        slope, icpt = 1.0 / (2 ** (k % 3)), -10.0 * k
        pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = slope, icpt, "US"
        item.PixelValueTransformationSequence = Sequence([pv])
        per_frame.append(item)
        # Stored so that stored*slope + icpt reproduces the slice's values (written with identity rescale).
        real = s.pixel_array.astype(np.float64)
        stored = np.round((real - icpt) / slope)
        frames.append(stored.astype(np.uint16))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.stack(frames).tobytes()
    save(ds, os.path.join(dst, "enhanced.dcm"))


def make_legacy_enhanced(paths, dst, rle):
    """highdicom's Legacy Converted Enhanced MR Image from the single-frame series (an independent
    multi-frame writer), optionally RLE-compressed frame by frame."""
    import highdicom as hd

    slices = [pydicom.dcmread(p) for p in paths]
    slices = slices[1::2] + slices[0::2]  # arrival order must not matter
    lce = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=slices,
        series_instance_uid=generate_uid(),
        series_number=100,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        transfer_syntax_uid=RLELossless if rle else ExplicitVRLittleEndian,
    )
    save(lce, os.path.join(dst, "lce.dcm"))


if __name__ == "__main__":
    main()

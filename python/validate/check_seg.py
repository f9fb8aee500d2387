"""Independent check of a DICOM-SEG written by desam, with pydicom + highdicom (+ dcmqi if present).

Usage: check_seg.py SEG.dcm EXPECT.json MASKS.npy
  EXPECT.json: {"slices": [{"sop_instance_uid", "frame_number"|null, "position": [x,y,z]}...] (z order),
                "iop": [6 floats], "segments": [{"label", "category": [v,s], "type": [v,s]}...],
                "dcmqi": bool}
  MASKS.npy: uint8 [n_segments, nz, ny, nx] — the masks the SEG must reproduce exactly.
Prints one JSON line of findings; exits 1 (with the reasons on stderr) on any mismatch.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pydicom
import highdicom as hd

failures = []


def fail(msg):
    failures.append(msg)


def main():
    seg_path, expect_path, masks_path = sys.argv[1:4]
    expect = json.load(open(expect_path))
    masks = np.load(masks_path)
    n_seg, nz, ny, nx = masks.shape
    slices = expect["slices"]
    report = {}

    ds = pydicom.dcmread(seg_path)
    if ds.SOPClassUID != "1.2.840.10008.5.1.4.1.1.66.4":
        fail(f"SOPClassUID {ds.SOPClassUID}")
    if int(ds.NumberOfFrames) != n_seg * nz:
        fail(f"NumberOfFrames {ds.NumberOfFrames} != {n_seg * nz} (empty frames must be kept)")
    # BINARY (1 bit, packed) or FRACTIONAL (8 bits, 0 or MaximumFractionalValue) for grids whose
    # Columns is not a multiple of 8.
    fractional = ds.SegmentationType == "FRACTIONAL"
    if fractional and (ds.BitsAllocated != 8 or ds.SegmentationFractionalType not in ("OCCUPANCY", "PROBABILITY")):
        fail(f"FRACTIONAL SEG with BitsAllocated {ds.BitsAllocated}")
    if fractional != (nx % 8 != 0):
        fail(f"SegmentationType {ds.SegmentationType} for {nx} columns")
    expected_bytes = n_seg * nz * ny * nx if fractional else (n_seg * nz * ny * nx + 7) // 8
    expected_bytes += expected_bytes % 2
    if len(ds.PixelData) != expected_bytes:
        fail(f"PixelData {len(ds.PixelData)} bytes, expected {expected_bytes}")
    # pydicom's own decode, frame by frame in file order
    arr = ds.pixel_array.reshape(n_seg * nz, ny, nx)
    if fractional:
        vals = set(np.unique(arr).tolist())
        if not vals <= {0, ds.MaximumFractionalValue}:
            fail(f"FRACTIONAL values {sorted(vals)[:8]} are not only 0 and {ds.MaximumFractionalValue}")
        arr = (arr == ds.MaximumFractionalValue).astype(np.uint8)

    seg = hd.seg.segread(seg_path)
    # Segment descriptions
    for i, want in enumerate(expect["segments"]):
        d = seg.get_segment_description(i + 1)
        if d.segment_label != want["label"]:
            fail(f"segment {i+1} label {d.segment_label!r} != {want['label']!r}")
        cat = d.segmented_property_category
        typ = d.segmented_property_type
        if [cat.value, cat.scheme_designator] != want["category"]:
            fail(f"segment {i+1} category {cat}")
        if [typ.value, typ.scheme_designator] != want["type"]:
            fail(f"segment {i+1} type {typ}")
        if d.algorithm_type.value != "AUTOMATIC":
            fail(f"segment {i+1} algorithm type {d.algorithm_type}")
        fam = d.algorithm_identification[0].AlgorithmFamilyCodeSequence[0]
        if (fam.CodeValue, fam.CodingSchemeDesignator) != ("123110", "DCM"):
            fail(f"segment {i+1} algorithm family {fam.CodeValue}")

    # Frames map to the right source instances (highdicom's index of Derivation Image refs)
    multiframe = any(s["frame_number"] is not None for s in slices)
    for s_idx in range(n_seg):
        if not multiframe:
            uids = [s["sop_instance_uid"] for s in slices]
            px = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=uids, segment_numbers=[s_idx + 1], dtype=np.float32
            )[..., 0]
        else:
            uid = slices[0]["sop_instance_uid"]
            frames = [s["frame_number"] for s in slices]
            px = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=uid, source_frame_numbers=frames,
                segment_numbers=[s_idx + 1], dtype=np.float32
            )[..., 0]
        # float: highdicom scales FRACTIONAL to 0..1 (1.0 inside), BINARY stays 0/1
        px = (px > 0.5).astype(np.uint8)
        if px.shape != (nz, ny, nx):
            fail(f"segment {s_idx+1}: by-source shape {px.shape}")
        elif not np.array_equal(px, masks[s_idx]):
            fail(f"segment {s_idx+1}: pixels by source instance differ from the mask "
                 f"({int((px != masks[s_idx]).sum())} voxels)")
        # pydicom frame order: segment-major, slice order (our dimension order)
        frames = arr[s_idx * nz:(s_idx + 1) * nz]
        if not np.array_equal(frames, masks[s_idx]):
            fail(f"segment {s_idx+1}: pydicom pixel_array differs from the mask")

    # Reconstructed volume equals the mask, placed by position
    vol = seg.get_volume(combine_segments=False, dtype=np.float32)
    va = (vol.array > 0.5).astype(np.uint8)  # (slices, rows, cols, segments)
    if va.shape[1:3] != (ny, nx) or va.shape[0] != nz:
        fail(f"get_volume shape {va.shape}")
    else:
        aff = vol.affine
        positions = np.array([s["position"] for s in slices], dtype=float)
        for k in range(va.shape[0]):
            p = aff[:3, :3] @ np.array([k, 0, 0]) + aff[:3, 3]
            d = np.linalg.norm(positions - p, axis=1)
            z = int(np.argmin(d))
            if d[z] > 1e-3:
                fail(f"get_volume slice {k} at {p} matches no source slice")
                break
            for s_idx in range(n_seg):
                if not np.array_equal(va[k, :, :, s_idx], masks[s_idx, z]):
                    fail(f"get_volume slice {k} (source z={z}) segment {s_idx+1} differs")
        iop = np.array(expect["iop"])
        # highdicom's volume axes: column 1 = row direction (down the columns), column 2 = along a row
        col_dir = aff[:3, 1] / np.linalg.norm(aff[:3, 1])
        row_dir = aff[:3, 2] / np.linalg.norm(aff[:3, 2])
        if not (np.allclose(row_dir, iop[:3], atol=1e-5) and np.allclose(col_dir, iop[3:], atol=1e-5)):
            fail(f"get_volume orientation {row_dir} {col_dir} != IOP {iop}")
    report["highdicom_volume_shape"] = list(va.shape)

    # With the source files at hand: every frame points at a real source instance, at its position
    if expect.get("source_dir"):
        src = {}
        for f in sorted(os.listdir(expect["source_dir"])):
            sds = pydicom.dcmread(os.path.join(expect["source_dir"], f))
            src[sds.SOPInstanceUID] = sds
        first = next(iter(src.values()))
        for kw in ["StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName"]:
            if str(getattr(ds, kw)) != str(getattr(first, kw)):
                fail(f"{kw} {getattr(ds, kw)} != source {getattr(first, kw)}")
        if ds.SeriesInstanceUID == first.SeriesInstanceUID:
            fail("SEG reuses the source SeriesInstanceUID")
        refd = {r.ReferencedSOPInstanceUID
                for s in ds.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
        if refd != set(src):
            fail(f"Common Instance Reference lists {len(refd)} instances, source has {len(src)}")
        if ds.ReferencedSeriesSequence[0].SeriesInstanceUID != first.SeriesInstanceUID:
            fail("ReferencedSeriesSequence names another series")
        siop = np.array([float(v) for v in first.ImageOrientationPatient])
        seg_iop = np.array([float(v) for v in
                            ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient])
        if not np.allclose(siop, seg_iop, atol=1e-6):
            fail(f"SEG IOP {seg_iop} != source {siop}")
        sps = [float(v) for v in first.PixelSpacing]
        seg_ps = [float(v) for v in ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
        if not np.allclose(sps, seg_ps, rtol=1e-9):
            fail(f"SEG PixelSpacing {seg_ps} != source {sps}")
        for i, pf in enumerate(ds.PerFrameFunctionalGroupsSequence):
            ref = pf.DerivationImageSequence[0].SourceImageSequence[0]
            sds = src.get(ref.ReferencedSOPInstanceUID)
            if sds is None:
                fail(f"frame {i+1} references an instance not in the source series")
                continue
            if ref.ReferencedSOPClassUID != sds.SOPClassUID:
                fail(f"frame {i+1} SOP class {ref.ReferencedSOPClassUID} != {sds.SOPClassUID}")
            p = np.array([float(v) for v in pf.PlanePositionSequence[0].ImagePositionPatient])
            q = np.array([float(v) for v in sds.ImagePositionPatient])
            if np.linalg.norm(p - q) > 1e-4:
                fail(f"frame {i+1} position {p} != its source instance's {q}")
        report["source_instances_checked"] = len(src)

    # dcmqi (independent C++ reader): per-segment voxel counts
    if expect.get("dcmqi") and masks.sum() > 0:
        with tempfile.TemporaryDirectory() as tmp:
            exe = os.path.join(os.path.dirname(sys.executable), "segimage2itkimage")
            r = subprocess.run([exe, "--inputDICOM", seg_path, "--outputDirectory", tmp,
                                "--outputType", "nifti"], capture_output=True, text=True)
            if r.returncode != 0:
                fail(f"dcmqi segimage2itkimage failed: {r.stderr[-800:]}")
            else:
                import nibabel as nib
                meta = json.load(open(os.path.join(tmp, "meta.json")))
                counts = {}
                for f in sorted(os.listdir(tmp)):
                    if f.endswith(".nii.gz") or f.endswith(".nii"):
                        img = np.asarray(nib.load(os.path.join(tmp, f)).dataobj)
                        counts[f] = int((img > 0).sum())
                report["dcmqi_counts"] = counts
                report["dcmqi_segments"] = len(meta.get("segmentAttributes", []))
                want = sorted(int(m.sum()) for m in masks if m.sum() > 0)
                got = sorted(c for c in counts.values() if c > 0)
                if want != got:
                    fail(f"dcmqi voxel counts {got} != expected {want}")

    report["ok"] = not failures
    print(json.dumps(report))
    if failures:
        print("\n".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

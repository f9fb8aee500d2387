"""Dump what pydicom sees in a DICOM-SEG as JSON (reference for our reader's tests).

Usage: dump_seg.py SEG.dcm  → {"rows", "columns", "iop", "pixel_spacing", "frame_of_reference_uid",
  "segments": [{"number", "label", "category": [v, s], "type": [v, s]}],
  "frames": [{"segment", "position", "source_uid", "source_class", "count"}]}
"""
import json
import sys

import numpy as np
import pydicom


def main():
    ds = pydicom.dcmread(sys.argv[1])
    n_frames = int(getattr(ds, "NumberOfFrames", 1))
    px = ds.pixel_array.reshape(n_frames, ds.Rows, ds.Columns)
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    segments = []
    for s in ds.SegmentSequence:
        cat = s.SegmentedPropertyCategoryCodeSequence[0]
        typ = s.SegmentedPropertyTypeCodeSequence[0]
        segments.append({
            "number": int(s.SegmentNumber), "label": str(s.SegmentLabel),
            "category": [cat.CodeValue, cat.CodingSchemeDesignator],
            "type": [typ.CodeValue, typ.CodingSchemeDesignator],
        })
    frames = []
    for i, pf in enumerate(ds.PerFrameFunctionalGroupsSequence[:n_frames]):
        src = pf.DerivationImageSequence[0].SourceImageSequence[0]
        frames.append({
            "segment": int(pf.SegmentIdentificationSequence[0].ReferencedSegmentNumber),
            "position": [float(v) for v in pf.PlanePositionSequence[0].ImagePositionPatient],
            "source_uid": str(src.ReferencedSOPInstanceUID),
            "source_class": str(src.ReferencedSOPClassUID),
            "count": int(np.count_nonzero(px[i])),
        })
    print(json.dumps({
        "rows": int(ds.Rows), "columns": int(ds.Columns), "iop": iop, "pixel_spacing": spacing,
        "frame_of_reference_uid": str(ds.FrameOfReferenceUID),
        "segments": segments, "frames": frames,
    }))


if __name__ == "__main__":
    main()

"""Write a small MR series (pydicom) and two-segment DICOM-SEGs of it with highdicom, so that our
reader is tested on another tool's output.

Usage: make_hd_seg.py OUTDIR → OUTDIR/hd_seg.dcm (all frames), hd_seg_omitted.dcm (empty frames
omitted), masks.bin (uint8 [2, nz, ny, nx], source slice order), meta.json (dims, slices, FoR).
"""
import json
import os
import sys

import numpy as np
import highdicom as hd
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR = "1.2.840.10008.5.1.4.1.1.4"


def mr_series(nz, ny, nx):
    study, series, fo_r = generate_uid(), generate_uid(), generate_uid()
    out = []
    for z in range(nz):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MR
        uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SOPClassUID, ds.SOPInstanceUID = MR, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, fo_r
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^HD", "HD1", "19500101", "M"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, z + 1
        ds.Manufacturer = "pydicom"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 2.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-10.0, -20.0, 5.0 + 2.0 * z]
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (np.arange(ny * nx, dtype=np.uint16) % 1000).tobytes()
        out.append(ds)
    return out


def main():
    outdir = sys.argv[1]
    nz, ny, nx = 6, 10, 13
    sources = mr_series(nz, ny, nx)
    zz, yy, xx = np.mgrid[0:nz, 0:ny, 0:nx]
    gland = (((zz - 2.5) / 2.0) ** 2 + ((yy - 5) / 4.0) ** 2 + ((xx - 6) / 5.0) ** 2) <= 1.0
    gland[0] = False  # an empty first slice
    pz = gland & (yy >= 5)
    masks = np.stack([gland, pz]).astype(np.uint8)
    labels = np.zeros((nz, ny, nx, 2), dtype=bool)
    labels[..., 0], labels[..., 1] = gland, pz
    algo = hd.AlgorithmIdentificationSequence(
        name="test", version="1", family=CodedConcept("123110", "DCM", "Artificial Intelligence"))
    descs = [
        hd.seg.SegmentDescription(
            segment_number=1, segment_label="Prostate",
            segmented_property_category=CodedConcept("123037004", "SCT", "Anatomical Structure"),
            segmented_property_type=CodedConcept("41216001", "SCT", "Prostate"),
            algorithm_type="AUTOMATIC", algorithm_identification=algo),
        hd.seg.SegmentDescription(
            segment_number=2, segment_label="PZ",
            segmented_property_category=CodedConcept("123037004", "SCT", "Anatomical Structure"),
            segmented_property_type=CodedConcept("279706003", "SCT", "Peripheral zone of the prostate"),
            algorithm_type="AUTOMATIC", algorithm_identification=algo),
    ]
    for name, omit in [("hd_seg.dcm", False), ("hd_seg_omitted.dcm", True)]:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=labels, segmentation_type="BINARY",
            segment_descriptions=descs, series_instance_uid=generate_uid(), series_number=100,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="highdicom",
            manufacturer_model_name="test", software_versions="1", device_serial_number="1",
            omit_empty_frames=omit)
        seg.save_as(os.path.join(outdir, name))
    masks.tofile(os.path.join(outdir, "masks.bin"))
    json.dump({
        "dims": [nz, ny, nx],
        "frame_of_reference_uid": str(sources[0].FrameOfReferenceUID),
        "slices": [{"uid": str(s.SOPInstanceUID), "position": [float(v) for v in s.ImagePositionPatient]}
                   for s in sources],
    }, open(os.path.join(outdir, "meta.json"), "w"))


if __name__ == "__main__":
    main()

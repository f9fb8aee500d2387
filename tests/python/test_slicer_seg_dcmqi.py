# The DICOM-SEG that `desam segment <series> -o seg.dcm` writes (what Slicer loads from Orthanc) read
# back by an independent tool, dcmqi's segimage2itkimage: same grid as the source series, same voxels.
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def segimage2itkimage():
    candidates = [Path(sys.executable).parent / "segimage2itkimage", shutil.which("segimage2itkimage")]
    for c in candidates:
        if c and os.access(str(c), os.X_OK):
            return str(c)
    pytest.fail("dcmqi's segimage2itkimage is not installed (pip install dcmqi, see python/requirements.txt)")


def write_mr_series(folder, iop, spacing, origin, shape=(8, 64, 72), seed=3):
    """A classic MR Image Storage series written with pydicom (independent of our writer).

    ``iop`` = row and column cosines (LPS); slices advance along their cross product by spacing[2].
    """
    folder.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = shape
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    inside = ((x - nx * 0.5) / (nx * 0.22)) ** 2 + ((y - ny * 0.55) / (ny * 0.2)) ** 2 + ((z - nz / 2) / (nz * 0.45)) ** 2 <= 1
    voxels = np.clip(300 + 900 * inside + rng.normal(0, 30, shape), 0, 4000).astype(np.uint16)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(nz):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Slicer^Test", "SLICER-1", "19600101", "M"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 3, k + 1
        ds.Manufacturer = "pydicom"
        ds.PatientPosition, ds.PositionReferenceIndicator = "FFS", ""
        ds.BodyPartExamined = "PROSTATE"
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength, ds.MagneticFieldStrength = 100, 4000, 16, 3
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[2] * normal]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (y), column spacing (x)
        ds.SliceThickness = float(spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = voxels[k].tobytes()
        # Shuffle file names so the reader must sort by position, not by name.
        ds.save_as(str(folder / ("img_%03d.dcm" % ((k * 5) % nz if nz % 5 else k))), enforce_file_format=True)
    return voxels


def series_ras_affine(folder):
    """IJK-to-RAS of a classic MR series, computed from its headers with pydicom."""
    slices = [pydicom.dcmread(str(p)) for p in sorted(folder.iterdir())]
    slices = [s for s in slices if s.SOPClassUID == MRImageStorage]
    iop = np.array(slices[0].ImageOrientationPatient, float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    slices.sort(key=lambda s: float(np.dot(np.array(s.ImagePositionPatient, float), normal)))
    first = np.array(slices[0].ImagePositionPatient, float)
    last = np.array(slices[-1].ImagePositionPatient, float)
    dy, dx = (float(v) for v in slices[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = row * dx
    lps[:3, 1] = col * dy
    lps[:3, 2] = (last - first) / (len(slices) - 1)
    lps[:3, 3] = first
    return LPS_TO_RAS @ lps, (int(slices[0].Columns), int(slices[0].Rows), len(slices))


SERIES = {
    "axial": ([1, 0, 0, 0, 1, 0], [0.55, 0.55, 3.0], [-20.0, -35.0, 12.0]),
    "oblique": ([0.9659258, 0.2588190, 0.0, -0.0449435, 0.1677312, -0.9848078], [0.7, 0.62, 3.6], [-41.2, 7.5, 88.0]),
}


def phantom_series(desam_bin, tmp_path):
    """Site-A phantom case written by `desam phantom` (our own MR writer)."""
    out = tmp_path / "phantom"
    proc = subprocess.run([desam_bin, "phantom", "--site", "A", "--cases", "1", "--seed", "1", "--out", str(out),
                           "--format", "dicom"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    dirs = sorted(p.parent for p in out.rglob("MR_*.dcm"))
    assert dirs, "desam phantom wrote no MR series under %s" % out
    return dirs[0]


@pytest.mark.parametrize("name", sorted(SERIES) + ["phantom_site_A"])
def test_dcmqi_reads_our_seg_on_the_source_grid(desam_bin, tiny_model, tmp_path, name):
    if name == "phantom_site_A":
        series_dir = phantom_series(desam_bin, tmp_path)
    else:
        series_dir = tmp_path / "series"
        write_mr_series(series_dir, *SERIES[name])
    source_affine, source_shape = series_ras_affine(series_dir)

    seg_path, mask_path = tmp_path / "seg.dcm", tmp_path / "mask.nii.gz"
    for out in (seg_path, mask_path):
        proc = subprocess.run([desam_bin, "segment", str(series_dir), "--model", tiny_model, "-o", str(out),
                               "--device", "cpu", "--progress", "none"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
    ours = nib.load(str(mask_path))
    assert ours.shape == source_shape
    np.testing.assert_allclose(ours.affine, source_affine, atol=1e-3)
    our_mask = np.asarray(ours.dataobj) > 0
    # The untrained tiny model still marks the bright gland-like blob; an empty mask would make the
    # voxel comparison below say nothing.
    assert our_mask.any() and not our_mask.all(), "degenerate mask: %d voxels" % our_mask.sum()

    seg = pydicom.dcmread(str(seg_path))
    assert seg.Modality == "SEG"
    prop = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodingSchemeDesignator, prop.CodeValue) == ("SCT", "41216001")

    out_dir = tmp_path / "dcmqi"
    out_dir.mkdir()
    proc = subprocess.run([segimage2itkimage(), "--inputDICOM", str(seg_path), "--outputDirectory", str(out_dir),
                           "-t", "nifti", "-p", "seg"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outputs = sorted(out_dir.glob("seg*.nii*"))
    assert len(outputs) == 1, [p.name for p in out_dir.iterdir()]
    theirs = nib.load(str(outputs[0]))
    # dcmqi rebuilds the grid from the SEG's own frames: it must be the source series' grid.
    assert theirs.shape[:3] == source_shape
    np.testing.assert_allclose(theirs.affine, source_affine, atol=1e-3)
    their_mask = np.asarray(theirs.dataobj).reshape(source_shape) > 0
    assert int(their_mask.sum()) == int(our_mask.sum())
    assert np.array_equal(their_mask, our_mask)

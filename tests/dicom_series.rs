//! Integration tests of the DICOM series reader and the MR writer on real files: our own writer,
//! pydicom-encoded transfer syntaxes, pydicom's test files, and the dciodvfy validator.

#![allow(clippy::needless_range_loop)] // x/y/z component loops over small fixed arrays

use std::path::{Path, PathBuf};
use std::process::Command;

use desam::dicom::*;
use desam::Volume;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("desam-dicomio-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small oblique phantom: a bright ellipsoid in a gradient background, values in [0, 1000].
fn phantom(dims: [usize; 3], spacing: [f64; 3], direction: [[f64; 3]; 3]) -> Volume {
    let [nz, ny, nx] = dims;
    let mut vox = Vec::with_capacity(nz * ny * nx);
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let (dx, dy, dz) = (
                    (x as f64 - nx as f64 / 2.0) / (nx as f64 / 3.0),
                    (y as f64 - ny as f64 / 2.0) / (ny as f64 / 4.0),
                    (z as f64 - nz as f64 / 2.0) / (nz as f64 / 3.0),
                );
                let inside = dx * dx + dy * dy + dz * dz < 1.0;
                vox.push(if inside { 800.0 + z as f32 } else { (x + 2 * y + 3 * z) as f32 });
            }
        }
    }
    let mut v = Volume::new(vox, dims, spacing, [-40.0, -30.5, 12.25]);
    v.direction = direction;
    v
}

fn oblique() -> [[f64; 3]; 3] {
    let (a, b) = (20f64.to_radians(), 10f64.to_radians());
    let row = [a.cos(), a.sin(), 0.0];
    let col = [-a.sin() * b.cos(), a.cos() * b.cos(), b.sin()];
    let n = [row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0]];
    [row, col, n]
}

fn dciodvfy_errors(path: &Path) -> Vec<String> {
    let out = Command::new("dciodvfy").arg(path).output().expect("dciodvfy (dicom3tools) must be installed");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    text.lines().filter(|l| l.starts_with("Error")).map(str::to_string).collect()
}

#[test]
fn mr_writer_output_passes_dciodvfy() {
    let dir = scratch("dciodvfy");
    let vol = phantom([3, 12, 10], [0.6, 0.7, 3.3], oblique());
    for (i, enc) in [StoredPixels::Uint16, StoredPixels::Int16].into_iter().enumerate() {
        let mut attrs = MrSeriesAttributes { stored_pixels: enc, ..Default::default() };
        if enc == StoredPixels::Int16 {
            attrs.rescale = Some((0.5, -100.0));
        }
        let paths = write_mr_series(&vol, &attrs, &dir.join(i.to_string())).unwrap();
        assert_eq!(paths.len(), 3);
        for p in &paths {
            let errs = dciodvfy_errors(p);
            assert!(errs.is_empty(), "{}: {errs:?}", p.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn python() -> PathBuf {
    std::env::var_os("DESAM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"))
}

fn pydicom_test_file(name: &str) -> PathBuf {
    let out = Command::new(python())
        .args(["-c", "import pydicom, os; print(os.path.dirname(pydicom.__file__))"])
        .output()
        .expect("python");
    assert!(out.status.success());
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("data/test_files").join(name)
}

/// Scratch folders are fixed per test name (cleared before use) so repeated runs do not pile up.
/// Runs tests/support/dicom_variants.py KIND src dst and returns dst.
fn variant(kind: &str, src: &Path, dst: &Path) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/dicom_variants.py");
    let out = Command::new(python())
        .arg(script)
        .args([kind.as_ref(), src.as_os_str(), dst.as_os_str()])
        .output()
        .expect("python");
    assert!(out.status.success(), "variant {kind}: {}", String::from_utf8_lossy(&out.stderr));
    dst.to_path_buf()
}

/// Runs a DCMTK tool on every file of `src`, writing to `dst`.
fn dcmtk(tool: &str, opts: &[&str], src: &Path, dst: &Path) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    for p in dcm_files(src) {
        let out = Command::new(tool).args(opts).arg(&p).arg(dst.join(p.file_name().unwrap())).output().expect(tool);
        assert!(out.status.success(), "{tool} {}: {}", p.display(), String::from_utf8_lossy(&out.stderr));
    }
    dst.to_path_buf()
}

fn dcm_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    v.sort();
    v
}

/// A shuffled copy of the file list (deterministic).
fn shuffled(mut v: Vec<PathBuf>) -> Vec<PathBuf> {
    let n = v.len();
    for i in 0..n {
        v.swap(i, (i * 7 + 3) % n);
    }
    v
}

/// Writes the standard test series (oblique, 6 slices) with integer values; returns dir and the volume with refs.
fn written_series(name: &str, attrs: &MrSeriesAttributes) -> (PathBuf, Volume) {
    let dir = scratch(name);
    let vol = phantom([6, 40, 36], [0.8, 0.6, 3.0], oblique());
    let w = write_mr_series_full(&vol, attrs, &dir.join("src")).unwrap();
    (dir.join("src"), w.volume)
}

fn assert_same_geometry(a: &Volume, b: &Volume) {
    assert_eq!(a.dims, b.dims);
    for i in 0..3 {
        assert!((a.spacing[i] - b.spacing[i]).abs() < 1e-4, "spacing {:?} vs {:?}", a.spacing, b.spacing);
        assert!((a.origin[i] - b.origin[i]).abs() < 1e-4, "origin {:?} vs {:?}", a.origin, b.origin);
        for j in 0..3 {
            assert!(
                (a.direction[i][j] - b.direction[i][j]).abs() < 1e-5,
                "direction {:?} vs {:?}",
                a.direction,
                b.direction
            );
        }
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

// ---------------------------------------------------------------------------------------------
// Geometry and values

#[test]
fn shuffled_oblique_signed_rescaled_series_reads_back_exactly() {
    let attrs =
        MrSeriesAttributes { stored_pixels: StoredPixels::Int16, rescale: Some((0.25, -50.0)), ..Default::default() };
    let (dir, written) = written_series("signed", &attrs);
    let files = shuffled(dcm_files(&dir));
    let got = load_series_files(&files).unwrap();
    assert!(got.warnings.is_empty(), "{:?}", got.warnings);
    let v = &got.volume;
    assert_same_geometry(v, &written);
    // Values were multiples of 1 → representable exactly with slope 0.25.
    assert_eq!(max_abs_diff(&v.voxels, &written.voxels), 0.0);
    assert_eq!(v.slices, written.slices, "slices sorted along the normal, not by file order");
    assert_eq!(v.frame_of_reference_uid, written.frame_of_reference_uid);
    let s = v.source.as_ref().unwrap();
    let w = written.source.as_ref().unwrap();
    assert_eq!(s.study_instance_uid, w.study_instance_uid);
    assert_eq!(s.series_instance_uid, w.series_instance_uid);
    assert_eq!(s.patient_id.as_deref(), Some("DESAM-PHANTOM"));
    assert_eq!(s.modality, "MR");
    assert_eq!(s.magnetic_field_strength, Some(3.0));
    // The same series from the folder (recursive scan) is identical.
    let from_dir = load_series_dir(dir.parent().unwrap()).unwrap();
    assert_eq!(from_dir.volume, *v);
}

#[test]
fn slices_written_against_the_normal_are_reordered_along_it() {
    let mut vol = phantom([5, 8, 7], [0.9, 0.9, 2.0], oblique());
    let d = vol.direction;
    vol.direction[2] = [-d[2][0], -d[2][1], -d[2][2]];
    let dir = scratch("against");
    write_mr_series(&vol, &MrSeriesAttributes::default(), &dir).unwrap();
    let got = load_series_dir(&dir).unwrap().volume;
    let (r, c) = (got.direction[0], got.direction[1]);
    let rc = [r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]];
    for a in 0..3 {
        assert!((got.direction[2][a] - d[2][a]).abs() < 1e-6);
        assert!((got.direction[2][a] - rc[a]).abs() < 1e-9);
    }
    // First slice of the read volume is the last written one.
    let last = vol.index_to_world(0.0, 0.0, 4.0);
    for a in 0..3 {
        assert!((got.origin[a] - last[a]).abs() < 1e-4);
    }
    for z in 0..5 {
        assert_eq!(got.slice(z), vol.slice(4 - z));
    }
    // Positions ascend along the normal.
    let pos: Vec<f64> =
        got.slices.iter().map(|s| s.position.iter().zip(&got.direction[2]).map(|(p, n)| p * n).sum()).collect();
    assert!(pos.windows(2).all(|w| w[1] > w[0]));
}

#[test]
fn orthanc_style_bytes_with_and_without_preamble() {
    let (dir, written) = written_series("bytes", &MrSeriesAttributes::default());
    let with: Vec<Vec<u8>> = shuffled(dcm_files(&dir)).iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(with.iter().all(|b| &b[128..132] == b"DICM"));
    let a = load_series_bytes(&with).unwrap().volume;
    let without: Vec<Vec<u8>> = with.iter().map(|b| b[128..].to_vec()).collect();
    let b = load_series_bytes(&without).unwrap().volume;
    assert_eq!(a, b);
    assert_eq!(a.voxels, written.voxels);
}

#[test]
fn single_slice_spacing_rules() {
    let dir = scratch("single");
    let vol = phantom([1, 6, 5], [0.5, 0.5, 2.5], oblique());
    write_mr_series(&vol, &MrSeriesAttributes { slice_thickness: Some(3.5), ..Default::default() }, &dir.join("src"))
        .unwrap();
    let got = load_series_dir(&dir.join("src")).unwrap();
    assert_eq!(got.volume.dims, [1, 6, 5]);
    assert_eq!(got.volume.spacing[2], 2.5, "SpacingBetweenSlices first");
    let t = variant("thickness_only", &dir.join("src"), &dir.join("t"));
    assert_eq!(load_series_dir(&t).unwrap().volume.spacing[2], 4.0, "then SliceThickness");
    let n = variant("no_spacing_info", &dir.join("src"), &dir.join("n"));
    let got = load_series_dir(&n).unwrap();
    assert_eq!(got.volume.spacing[2], 1.0, "else 1 mm");
    assert!(!got.warnings.is_empty());
}

#[test]
fn uneven_spacing_is_a_warning_with_the_median() {
    let (dir, _) = written_series("uneven", &MrSeriesAttributes::default());
    let mut files = dcm_files(&dir);
    files.remove(2); // a missing slice leaves one double gap
    let got = load_series_files(&files).unwrap();
    assert_eq!(got.volume.dims[0], 5);
    assert!((got.volume.spacing[2] - 3.0).abs() < 1e-6);
    assert!(got.warnings.iter().any(|w| w.contains("uneven")), "{:?}", got.warnings);
}

#[test]
fn eight_and_twelve_bit_and_monochrome1_pixels() {
    let (dir, written) = written_series("bits", &MrSeriesAttributes::default());
    let root = dir.parent().unwrap().to_path_buf();
    let vals: Vec<i32> = written.voxels.iter().map(|&v| v as i32).collect();
    let u8v = load_series_dir(&variant("8bit_unsigned", &dir, &root.join("u8"))).unwrap().volume;
    assert_eq!(u8v.voxels, vals.iter().map(|v| (v % 200) as f32).collect::<Vec<_>>());
    let s8v = load_series_dir(&variant("8bit_signed", &dir, &root.join("s8"))).unwrap().volume;
    assert_eq!(s8v.voxels, vals.iter().map(|v| (v % 200 - 100) as f32).collect::<Vec<_>>());
    let s12 = load_series_dir(&variant("12bit_signed", &dir, &root.join("s12"))).unwrap().volume;
    assert_eq!(s12.voxels, vals.iter().map(|v| (v % 2000 - 1000) as f32).collect::<Vec<_>>());
    let m1 = load_series_dir(&variant("monochrome1", &dir, &root.join("m1"))).unwrap();
    let lo = written.voxels.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = written.voxels.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    assert_eq!(m1.volume.voxels, written.voxels.iter().map(|v| lo + hi - v).collect::<Vec<_>>());
    assert!(m1.warnings.iter().any(|w| w.contains("MONOCHROME1")));
}

// ---------------------------------------------------------------------------------------------
// Transfer syntaxes

#[test]
fn pydicom_mr_small_in_every_decodable_syntax_matches_the_uncompressed_file() {
    let reference = load_series_files(&[pydicom_test_file("MR_small.dcm")]).unwrap().volume;
    assert_eq!(reference.dims, [1, 64, 64]);
    for name in [
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_padded.dcm",
    ] {
        let v = load_series_files(&[pydicom_test_file(name)]).unwrap_or_else(|e| panic!("{name}: {e}")).volume;
        assert_same_geometry(&v, &reference);
        assert_eq!(v.voxels, reference.voxels, "{name}");
    }
    // Signed 16-bit data with real variation (not a constant image).
    let (lo, hi) = reference.voxels.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert!(hi - lo > 100.0);
}

/// Copies a pydicom test file, adding the plane geometry that secondary-capture samples lack.
fn with_geometry(name: &str, out: &Path) -> PathBuf {
    let script = r#"
import sys, pydicom
ds = pydicom.dcmread(sys.argv[1])
ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
ds.ImagePositionPatient = [0, 0, 0]
ds.PixelSpacing = [1, 1]
if "SeriesInstanceUID" not in ds:
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
ds.save_as(sys.argv[2])
"#;
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let st = Command::new(python()).args(["-c", script]).arg(pydicom_test_file(name)).arg(out).status().unwrap();
    assert!(st.success());
    out.to_path_buf()
}

/// pydicom's decode of one file (stored values with the rescale applied), as f64.
fn pydicom_values(path: &Path) -> Vec<f64> {
    let script = r#"
import sys, pydicom, numpy as np
ds = pydicom.dcmread(sys.argv[1])
a = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
sys.stdout.write(" ".join(repr(float(v)) for v in a.ravel()))
"#;
    let out = Command::new(python()).args(["-c", script]).arg(path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().split_whitespace().map(|t| t.parse().unwrap()).collect()
}

#[test]
fn lossy_jpeg2000_files_decode_like_pydicom_and_12bit_jpeg_is_refused() {
    let dir = scratch("j2k-lossy");
    for name in ["693_J2KI.dcm", "JPEG2000.dcm"] {
        let p = with_geometry(name, &dir.join(name));
        let ours = load_series_files(std::slice::from_ref(&p)).unwrap_or_else(|e| panic!("{name}: {e}")).volume;
        let theirs = pydicom_values(&p);
        assert_eq!(ours.voxels.len(), theirs.len());
        let worst = ours.voxels.iter().zip(&theirs).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(worst == 0.0, "{name}: largest difference {worst}");
    }
    let p = with_geometry("JPGExtended.dcm", &dir.join("ext.dcm"));
    let r = load_series_files(&[p]);
    assert!(matches!(r, Err(DicomError::UnsupportedTransferSyntax { .. })), "{r:?}");
}

#[test]
fn our_series_compressed_by_independent_encoders_decodes_to_the_same_values() {
    let attrs = MrSeriesAttributes { stored_pixels: StoredPixels::Int16, ..Default::default() };
    let (dir, written) = written_series("codecs", &attrs);
    let root = dir.parent().unwrap().to_path_buf();
    let cases: Vec<(&str, PathBuf)> = vec![
        ("pydicom RLE", variant("rle", &dir, &root.join("rle"))),
        ("pydicom/openjpeg JPEG 2000 lossless", variant("j2k", &dir, &root.join("j2k"))),
        ("pydicom implicit VR", variant("implicit", &dir, &root.join("implicit"))),
        ("pydicom deflated", variant("deflated", &dir, &root.join("deflated"))),
        ("dcmtk RLE", dcmtk("dcmcrle", &[], &dir, &root.join("dcmcrle"))),
        ("dcmtk JPEG lossless SV1", dcmtk("dcmcjpeg", &["+e1"], &dir, &root.join("jpegll"))),
        ("dcmtk JPEG lossless (process 14)", dcmtk("dcmcjpeg", &["+el"], &dir, &root.join("jpegll14"))),
        ("dcmtk explicit big endian", dcmtk("dcmconv", &["+tb"], &dir, &root.join("be"))),
    ];
    for (label, d) in cases {
        let got = load_series_files(&shuffled(dcm_files(&d))).unwrap_or_else(|e| panic!("{label}: {e}")).volume;
        assert_same_geometry(&got, &written);
        assert_eq!(got.voxels, written.voxels, "{label}");
        assert_eq!(got.slices.len(), 6);
    }
}

#[test]
fn jpeg_baseline_matches_dcmtk_decode() {
    let (dir, _) = written_series("baseline", &MrSeriesAttributes::default());
    let root = dir.parent().unwrap().to_path_buf();
    let u8dir = variant("8bit_unsigned", &dir, &root.join("u8"));
    let jpeg = dcmtk("dcmcjpeg", &["+eb"], &u8dir, &root.join("jpeg"));
    let redecoded = dcmtk("dcmdjpeg", &[], &jpeg, &root.join("dcmtk-decoded"));
    let ours = load_series_dir(&jpeg).unwrap().volume;
    let theirs = load_series_dir(&redecoded).unwrap().volume;
    assert_same_geometry(&ours, &theirs);
    // IDCT implementations may round differently by one grey level.
    assert!(max_abs_diff(&ours.voxels, &theirs.voxels) <= 2.0);
    let original = load_series_dir(&u8dir).unwrap().volume;
    assert!(max_abs_diff(&ours.voxels, &original.voxels) > 0.0, "baseline is lossy: the test must see compressed data");
}

#[test]
fn jpeg_ls_and_unknown_transfer_syntaxes_are_typed_errors() {
    let r = load_series_files(&[pydicom_test_file("MR_small_jpeg_ls_lossless.dcm")]);
    assert!(matches!(r, Err(DicomError::UnsupportedTransferSyntax { .. })), "{r:?}");
    let (dir, _) = written_series("unknown-ts", &MrSeriesAttributes::default());
    let root = dir.parent().unwrap().to_path_buf();
    let jls = dcmtk("dcmcjpls", &[], &dir, &root.join("jls"));
    let r = load_series_dir(&jls);
    assert!(matches!(r, Err(DicomError::UnsupportedTransferSyntax { .. })), "{r:?}");
    let unk = variant("unknown_ts", &dir, &root.join("unknown"));
    let r = load_series_dir(&unk);
    assert!(matches!(r, Err(DicomError::UnsupportedTransferSyntax { .. })), "{r:?}");
}

#[test]
fn enhanced_mr_multiframe_with_per_frame_geometry_and_rescale() {
    let (dir, written) = written_series("enhanced", &MrSeriesAttributes::default());
    let root = dir.parent().unwrap().to_path_buf();
    let e = variant("enhanced", &dir, &root.join("enh"));
    let got = load_series_dir(&e).unwrap();
    let v = &got.volume;
    assert_same_geometry(v, &written);
    assert_eq!(v.voxels, written.voxels);
    // Frames were stored in reverse slice order: frame k+1 holds slice nz-1-k.
    let nz = v.dims[0] as u32;
    let frames: Vec<u32> = v.slices.iter().map(|s| s.frame_number.unwrap()).collect();
    assert_eq!(frames, (1..=nz).rev().collect::<Vec<_>>());
    assert!(v.slices.iter().all(|s| s.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4.1"));
    assert!(v.slices.windows(2).all(|w| w[0].sop_instance_uid == w[1].sop_instance_uid));
    for (s, w) in v.slices.iter().zip(&written.slices) {
        for a in 0..3 {
            assert!((s.position[a] - w.position[a]).abs() < 1e-4);
        }
    }
}

#[test]
fn highdicom_legacy_converted_enhanced_mr_reads_like_the_single_frame_series() {
    let (dir, written) = written_series("lce", &MrSeriesAttributes::default());
    let root = dir.parent().unwrap().to_path_buf();
    for kind in ["legacy_enhanced", "legacy_enhanced_rle"] {
        let d = variant(kind, &dir, &root.join(kind));
        let v = load_series_dir(&d).unwrap_or_else(|e| panic!("{kind}: {e}")).volume;
        assert_same_geometry(&v, &written);
        assert_eq!(v.voxels, written.voxels, "{kind}");
        assert!(v.slices.iter().all(|s| s.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4.4" && s.frame_number.is_some()));
        let mut frames: Vec<u32> = v.slices.iter().map(|s| s.frame_number.unwrap()).collect();
        frames.sort();
        assert_eq!(frames, (1..=v.dims[0] as u32).collect::<Vec<_>>());
    }
}

// ---------------------------------------------------------------------------------------------
// Rejected input: every case returns its typed variant

#[test]
fn rejected_inputs_return_their_typed_errors() {
    let (dir, _) = written_series("reject", &MrSeriesAttributes::default());
    let root = dir.parent().unwrap().to_path_buf();
    let load = |kind: &str| load_series_dir(&variant(kind, &dir, &root.join(kind)));

    let r = load("mixed_orientation");
    assert!(matches!(r, Err(DicomError::MixedOrientation { .. })), "{r:?}");
    let r = load("tilted");
    assert!(matches!(r, Err(DicomError::NonParallelSlices { .. })), "{r:?}");
    let r = load("shifted");
    assert!(matches!(r, Err(DicomError::NonParallelSlices { .. })), "{r:?}");
    let r = load("duplicate");
    assert!(matches!(r, Err(DicomError::DuplicatePosition { .. })), "{r:?}");
    let r = load("rows");
    assert!(matches!(r, Err(DicomError::InconsistentGeometry { ref what, .. }) if what.contains("Rows")), "{r:?}");
    let r = load("spacing");
    assert!(
        matches!(r, Err(DicomError::InconsistentGeometry { ref what, .. }) if what.contains("PixelSpacing")),
        "{r:?}"
    );
    let r = load("no_pixels");
    assert!(matches!(r, Err(DicomError::MissingPixelData { .. })), "{r:?}");
    let r = load("palette");
    assert!(
        matches!(r, Err(DicomError::UnsupportedPhotometric { ref value, .. }) if value == "PALETTE COLOR"),
        "{r:?}"
    );
    let r = load("mixed_monochrome");
    assert!(matches!(r, Err(DicomError::UnsupportedPhotometric { ref value, .. }) if value.contains("mixed")), "{r:?}");

    // Two series in one folder: named in the error; each can still be loaded by UID.
    let other = variant("other_series", &dir, &root.join("other"));
    let both = root.join("both");
    for (i, d) in [&dir, &other].iter().enumerate() {
        for p in dcm_files(d) {
            std::fs::create_dir_all(both.join(i.to_string())).unwrap();
            std::fs::copy(&p, both.join(i.to_string()).join(p.file_name().unwrap())).unwrap();
        }
    }
    let groups = list_series_dir(&both).unwrap();
    assert_eq!(groups.len(), 2);
    let mut all_files = dcm_files(&dir);
    all_files.extend(dcm_files(&other));
    all_files.push(pydicom_test_file("test-SR.dcm"));
    let by_file = group_series(&all_files).unwrap();
    assert_eq!(by_file.len(), 3);
    assert_eq!(by_file.iter().filter(|g| g.is_image).count(), 2, "image series listed first, the SR after");
    assert!(!by_file[2].is_image && by_file[2].modality == "SR");
    assert!(by_file[..2].iter().all(|g| g.instances == 6 && g.files.len() == 6 && g.modality == "MR"));
    match load_series_dir(&both) {
        Err(DicomError::MultipleSeries { series }) => {
            assert_eq!(series.len(), 2);
            for g in &groups {
                assert!(series.iter().any(|s| s.contains(&g.series_instance_uid)));
            }
            assert!(series.iter().any(|s| s.contains("second series")));
        }
        r => panic!("expected MultipleSeries, got {r:?}"),
    }
    let one = load_series_dir_uid(&both, &groups[1].series_instance_uid).unwrap();
    assert_eq!(one.volume.source.unwrap().series_instance_uid, groups[1].series_instance_uid);

    // Non-image objects only: a structured report; our own SEG (pixel data, but not an image).
    let r = load_series_files(&[pydicom_test_file("test-SR.dcm")]);
    assert!(matches!(r, Err(DicomError::NoImages(_))), "{r:?}");
    let source = load_series_dir(&dir).unwrap().volume;
    let mut mask = desam::Mask::zeros(source.dims);
    mask.data[source.slice_len() * 2 + 40] = 1;
    let seg = write_prostate_seg(&source, &mask, &SegOptions::default()).unwrap();
    let r = load_series_bytes(std::slice::from_ref(&seg));
    assert!(matches!(r, Err(DicomError::NoImages(ref m)) if m.contains("segmentation")), "{r:?}");
    // A SEG stored next to its source series is ignored (with a warning), not a second series.
    let mut with_seg: Vec<Vec<u8>> = dcm_files(&dir).iter().map(|p| std::fs::read(p).unwrap()).collect();
    with_seg.push(seg);
    let got = load_series_bytes(&with_seg).unwrap();
    assert_eq!(got.volume.voxels, source.voxels);
    assert!(got.warnings.iter().any(|w| w.contains("ignored 1")), "{:?}", got.warnings);

    // A truncated file is named in the error.
    let first = dcm_files(&dir)[0].clone();
    let bytes = std::fs::read(&first).unwrap();
    let cut = root.join("cut.dcm");
    std::fs::write(&cut, &bytes[..300]).unwrap();
    match load_series_files(std::slice::from_ref(&cut)) {
        Err(DicomError::Corrupt { file, .. }) => assert!(file.contains("cut.dcm")),
        r => panic!("expected Corrupt, got {r:?}"),
    }
    // Pixel data cut short: decoding fails cleanly (no panic).
    let short = root.join("short.dcm");
    std::fs::write(&short, &bytes[..bytes.len() - 40]).unwrap();
    let r = load_series_files(&[short]);
    assert!(matches!(r, Err(DicomError::Corrupt { .. } | DicomError::Decode { .. })), "{r:?}");

    // Empty inputs.
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(matches!(load_series_dir(&empty), Err(DicomError::EmptyInput(_))));
    assert!(matches!(load_series_files(&[]), Err(DicomError::EmptyInput(_))));
    std::fs::write(empty.join("README.txt"), "not dicom").unwrap();
    assert!(matches!(load_series_dir(&empty), Err(DicomError::EmptyInput(_))));
}

// ---------------------------------------------------------------------------------------------
// Robustness: the Orthanc plugin feeds arbitrary instances to the reader; it must answer, never crash.

#[test]
fn mutated_and_truncated_files_never_panic() {
    use rand::{Rng, SeedableRng};
    let vol = phantom([2, 12, 10], [0.8, 0.6, 3.0], oblique());
    let enc = encode_mr_series(&vol, &MrSeriesAttributes::default()).unwrap();
    let rle_src = std::fs::read(pydicom_test_file("MR_small_RLE.dcm")).unwrap();
    let j2k_src = std::fs::read(pydicom_test_file("MR_small_jp2klossless.dcm")).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut outcomes = std::collections::BTreeMap::new();
    for i in 0..600 {
        let mut files = if i % 3 == 0 {
            enc.files.clone()
        } else if i % 3 == 1 {
            vec![rle_src.clone()]
        } else {
            vec![j2k_src.clone()]
        };
        let f = &mut files[0];
        match i % 4 {
            0 => {
                let cut = rng.gen_range(0..f.len());
                f.truncate(cut);
            }
            _ => {
                for _ in 0..rng.gen_range(1..8) {
                    let at = rng.gen_range(132..f.len());
                    f[at] = rng.gen();
                }
            }
        }
        let r = std::panic::catch_unwind(|| load_series_bytes(&files));
        let r = r.unwrap_or_else(|_| panic!("reader panicked on mutation {i}"));
        let key = match r {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{:?}", e).split([' ', '{', '(']).next().unwrap().to_string(),
        };
        *outcomes.entry(key).or_insert(0) += 1;
    }
    eprintln!("outcomes: {outcomes:?}");
    assert!(outcomes.len() > 2, "mutations must exercise several paths: {outcomes:?}");
}

//! DICOM-SEG integration tests: every SEG we write is checked by independent validators
//! (dciodvfy, dcmdump, pydicom + highdicom + dcmqi) and read back by our reader; SEGs written by
//! other tools (dcmqi's liver SEGs in pydicom's data, highdicom) are read and compared with pydicom.

use std::path::{Path, PathBuf};
use std::process::Command;

use desam::dicom::codes;
use desam::dicom::seg_read::{read_seg, read_seg_standalone};
use desam::dicom::seg_write::{write_seg, SegEncoding, SegError, SegOptions, Segment, SegmentInfo};
use desam::dicom::uid::new_uid;
use desam::{Mask, SliceRef, SourceInfo, Volume};

const MR_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.4";
const ENHANCED_MR_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.4.1";

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    std::env::var_os("DESAM_PYTHON").map(PathBuf::from).unwrap_or_else(|| manifest().join(".venv/bin/python"))
}

fn site_packages() -> PathBuf {
    let out = Command::new(python())
        .args(["-c", "import pydicom, os; print(os.path.dirname(os.path.dirname(pydicom.__file__)))"])
        .output()
        .expect("python runs");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("desam-seg-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A source volume as the series reader would produce it: slices along the normal, each with a
/// reference to its (single- or multi-frame) instance.
fn source_volume(dims: [usize; 3], spacing: [f64; 3], oblique: bool, multiframe: bool) -> Volume {
    let n: usize = dims.iter().product();
    let mut v = Volume::new((0..n).map(|i| (i % 97) as f32).collect(), dims, spacing, [-80.25, -95.5, 12.125]);
    if oblique {
        // Rotated 20° about x then 15° about z: a double-oblique acquisition.
        let (a, b) = (20f64.to_radians(), 15f64.to_radians());
        let row = [b.cos(), b.sin(), 0.0];
        let col = [-b.sin() * a.cos(), b.cos() * a.cos(), a.sin()];
        let normal =
            [row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0]];
        v.direction = [row, col, normal];
    }
    let enhanced_uid = new_uid();
    v.slices = (0..dims[0])
        .map(|z| SliceRef {
            sop_class_uid: if multiframe { ENHANCED_MR_IMAGE_STORAGE } else { MR_IMAGE_STORAGE }.to_string(),
            sop_instance_uid: if multiframe { enhanced_uid.clone() } else { new_uid() },
            frame_number: multiframe.then_some(z as u32 + 1),
            position: v.index_to_world(0.0, 0.0, z as f64),
        })
        .collect();
    v.frame_of_reference_uid = Some(new_uid());
    v.source = Some(SourceInfo {
        patient_name: Some("Phantom^Prostate".into()),
        patient_id: Some("DESAM-0001".into()),
        patient_birth_date: Some("19600101".into()),
        patient_sex: Some("M".into()),
        patient_age: Some("065Y".into()),
        study_instance_uid: new_uid(),
        study_date: Some("20260101".into()),
        study_time: Some("101500".into()),
        study_id: Some("S1".into()),
        accession_number: Some("ACC1".into()),
        referring_physician_name: None,
        study_description: Some("MRI prostate".into()),
        series_instance_uid: new_uid(),
        series_number: Some(3),
        series_description: Some("t2_tse_tra".into()),
        protocol_name: None,
        modality: "MR".into(),
        manufacturer: Some("Phantom".into()),
        manufacturer_model_name: None,
        institution_name: None,
        magnetic_field_strength: Some(3.0),
        body_part_examined: Some("PROSTATE".into()),
        slice_thickness: Some(spacing[2]),
    });
    v
}

/// An ellipsoid "gland" (plus optional sub-region) on the volume's grid.
fn ellipsoid(dims: [usize; 3], centre: [f64; 3], radii: [f64; 3]) -> Mask {
    let mut m = Mask::zeros(dims);
    for z in 0..dims[0] {
        for y in 0..dims[1] {
            for x in 0..dims[2] {
                let d = ((z as f64 - centre[0]) / radii[0]).powi(2)
                    + ((y as f64 - centre[1]) / radii[1]).powi(2)
                    + ((x as f64 - centre[2]) / radii[2]).powi(2);
                m.data[(z * dims[1] + y) * dims[2] + x] = (d <= 1.0) as u8;
            }
        }
    }
    m
}

fn random_mask(dims: [usize; 3], seed: u64) -> Mask {
    let mut s = seed;
    let mut m = Mask::zeros(dims);
    for v in m.data.iter_mut() {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *v = ((s >> 33) % 3 == 0) as u8;
    }
    m
}

fn write_npy_u8(path: &Path, shape: &[usize], data: &[u8]) {
    let shape_txt = shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
    let mut header = format!("{{'descr': '|u1', 'fortran_order': False, 'shape': ({shape_txt},), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

fn options() -> SegOptions {
    SegOptions {
        quality_score: Some(0.87),
        gland_volume_ml: Some(42.5),
        content_creator: Some("DeSAM^Automatic".into()),
        ..SegOptions::new("DeSAM ViT-B", "sha256:0123456789abcdef")
    }
}

/// Run dciodvfy: (IOD recognised, errors, warnings).
fn dciodvfy_findings(path: &Path) -> (String, Vec<String>, Vec<String>) {
    let out = Command::new("dciodvfy").arg(path).output().expect("dciodvfy (dicom3tools) is installed");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let pick = |p: &str| text.lines().filter(|l| l.starts_with(p)).map(str::to_string).collect::<Vec<_>>();
    (text.lines().next().unwrap_or("").trim().to_string(), pick("Error"), pick("Warning"))
}

/// Run dciodvfy; return its warnings, fail on any error.
fn dciodvfy(path: &Path) -> Vec<String> {
    let (iod, errors, warnings) = dciodvfy_findings(path);
    assert_eq!(iod, "Segmentation", "dciodvfy must recognise the Segmentation IOD");
    assert!(errors.is_empty(), "dciodvfy errors for {}:\n{errors:#?}", path.display());
    warnings
}

/// Pixel Data length as dcmdump (dcmtk) reports it.
fn dcmdump_pixel_len(path: &Path) -> usize {
    let out = Command::new("dcmdump").args(["+P", "7fe0,0010"]).arg(path).output().expect("dcmdump (dcmtk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("(7fe0,0010)")).unwrap_or_else(|| panic!("no pixel data: {text}"));
    // "... # 1234, 1 PixelData"
    let after = line.rsplit('#').next().unwrap();
    after.trim().split(',').next().unwrap().trim().parse().unwrap()
}

/// Write a SEG and check it with every validator and our reader. Returns (bytes, dciodvfy warnings).
fn write_and_validate(name: &str, source: &Volume, segments: &[Segment<'_>]) -> (Vec<u8>, Vec<String>) {
    write_and_validate_with_sources(name, source, segments, None)
}

fn write_and_validate_with_sources(
    name: &str,
    source: &Volume,
    segments: &[Segment<'_>],
    source_dir: Option<&Path>,
) -> (Vec<u8>, Vec<String>) {
    let bytes = write_seg(source, segments, &options()).expect("write_seg");
    let dir = tmp_dir(name);
    let seg_path = dir.join("seg.dcm");
    std::fs::write(&seg_path, &bytes).unwrap();

    let warnings = dciodvfy(&seg_path);

    let n_pixels = segments.len() * source.dims.iter().product::<usize>();
    let expected_len = SegEncoding::for_columns(source.nx()).pixel_data_len(n_pixels);
    assert_eq!(dcmdump_pixel_len(&seg_path), expected_len, "{name}: pixel data length");

    // highdicom / pydicom / dcmqi
    let all: Vec<u8> = segments.iter().flat_map(|s| s.mask.data.iter().copied()).collect();
    let [nz, ny, nx] = source.dims;
    write_npy_u8(&dir.join("masks.npy"), &[segments.len(), nz, ny, nx], &all);
    let [r, c, _] = source.direction;
    let expect = serde_json::json!({
        "slices": source.slices.iter().map(|s| serde_json::json!({
            "sop_instance_uid": s.sop_instance_uid, "frame_number": s.frame_number, "position": s.position,
        })).collect::<Vec<_>>(),
        "iop": [r[0], r[1], r[2], c[0], c[1], c[2]],
        "segments": segments.iter().map(|s| serde_json::json!({
            "label": s.info.label,
            "category": [s.info.category.value, s.info.category.scheme],
            "type": [s.info.property_type.value, s.info.property_type.scheme],
        })).collect::<Vec<_>>(),
        "dcmqi": true,
        "source_dir": source_dir,
    });
    std::fs::write(dir.join("expect.json"), expect.to_string()).unwrap();
    let out = Command::new(python())
        .arg(manifest().join("python/validate/check_seg.py"))
        .args([&seg_path, &dir.join("expect.json"), &dir.join("masks.npy")])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{name}: check_seg.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    eprintln!("{name}: check_seg.py {}", String::from_utf8_lossy(&out.stdout).trim());
    eprintln!("{name}: dciodvfy warnings {warnings:#?}");
    if std::env::var_os("DESAM_KEEP_SEG").is_some() {
        std::fs::copy(&seg_path, std::env::temp_dir().join(format!("desam-{name}.dcm"))).unwrap();
    }

    // Our reader, onto the source grid
    let back = read_seg(&bytes, source).expect("read_seg");
    assert_eq!(back.len(), segments.len());
    for ((info, mask), s) in back.iter().zip(segments) {
        assert_eq!(info, &s.info, "{name}: segment description round trip");
        assert_eq!(mask, s.mask, "{name}: mask round trip");
    }
    let _ = std::fs::remove_dir_all(&dir);
    (bytes, warnings)
}

fn prostate(mask: &Mask) -> Segment<'_> {
    Segment { info: SegmentInfo::prostate("DeSAM"), mask }
}

#[test]
fn prostate_phantom_validates_everywhere() {
    let mut src = source_volume([12, 24, 32], [0.625, 0.625, 3.0], false, false);
    // Non-ASCII names must survive (SpecificCharacterSet ISO_IR 192, UTF-8).
    src.source.as_mut().unwrap().patient_name = Some("Müller^Jürgen".into());
    let mask = ellipsoid(src.dims, [5.5, 12.0, 15.0], [4.0, 7.0, 9.0]);
    assert!(mask.count() > 100);
    let (bytes, warnings) = write_and_validate("phantom", &src, &[prostate(&mask)]);
    let convenience = desam::dicom::write_prostate_seg(&src, &mask, &options()).unwrap();
    let back = read_seg(&convenience, &src).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].1, mask);
    assert_eq!(back[0].0.algorithm_name.as_deref(), Some("DeSAM ViT-B"));
    eprintln!("dciodvfy warnings: {warnings:#?}");

    let seg = read_seg_standalone(&bytes).unwrap();
    let info = src.source.as_ref().unwrap();
    assert_eq!(seg.frames.len(), 12);
    assert_eq!(seg.study_instance_uid.as_deref(), Some(info.study_instance_uid.as_str()));
    assert_ne!(seg.series_instance_uid.as_deref(), Some(info.series_instance_uid.as_str()));
    assert_eq!(seg.frame_of_reference_uid, src.frame_of_reference_uid);
    assert_eq!(seg.series_description.as_deref(), Some("DeSAM prostate (auto) sha256:0123456789abcdef"));
    let cd = seg.content_description.unwrap();
    assert!(cd.contains("quality 0.87") && cd.contains("gland 42.5 mL"), "{cd}");
    assert_eq!(seg.referenced_series.len(), 1);
    assert_eq!(seg.referenced_series[0].0, info.series_instance_uid);
    assert_eq!(seg.referenced_series[0].1.len(), 12);
    for (z, f) in seg.frames.iter().enumerate() {
        assert_eq!(f.source_refs[0].sop_instance_uid, src.slices[z].sop_instance_uid);
        let p = f.position.unwrap();
        for (got, want) in p.iter().zip(src.slices[z].position) {
            assert!((got - want).abs() < 1e-9);
        }
        assert_eq!(f.dimension_index_values, vec![1, z as u32 + 1]);
    }
    let obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(&bytes[..])
        .unwrap();
    let name = obj.element(dicom_dictionary_std::tags::PATIENT_NAME).unwrap().to_str().unwrap().to_string();
    assert_eq!(name.trim(), "Müller^Jürgen");
    let py = Command::new(python())
        .args(["-c", "import sys,pydicom; print(pydicom.dcmread(sys.argv[1]).PatientName)"])
        .arg({
            let p = tmp_dir("utf8").join("seg.dcm");
            std::fs::write(&p, &bytes).unwrap();
            p
        })
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&py.stdout).trim(), "Müller^Jürgen", "pydicom decodes the UTF-8 name");
    let (_, prostate_code) = (&seg.segments[0].0, &seg.segments[0].1.property_type);
    assert!(prostate_code.same_concept(&codes::PROSTATE));
}

#[test]
fn odd_frame_size_starts_frames_mid_byte() {
    // 7×5 = 35 pixels per frame: every frame after the first starts mid-byte.
    let mut src = source_volume([5, 5, 7], [0.9, 0.8, 2.5], false, false);
    // Messy source attributes must not make the SEG invalid.
    let info = src.source.as_mut().unwrap();
    info.patient_sex = Some("male".into());
    info.patient_age = Some("65 years".into());
    info.study_description = Some("a\\b: backslash".into());
    info.body_part_examined = Some("prostate gland (pelvis)".into());
    let mask = random_mask(src.dims, 7);
    write_and_validate("odd", &src, &[prostate(&mask)]);
}

/// Matrices whose Columns is not a multiple of 8 (Orthanc 1.10 will not decode them as 1-bit, and
/// cornerstone expects byte-aligned BINARY frames) are written FRACTIONAL; a multiple of 8 stays BINARY.
#[test]
fn non_multiple_of_8_matrices_are_fractional() {
    for (name, dims, want) in [
        ("m250x250", [4, 250, 250], SegEncoding::Fractional),
        ("m257x193", [3, 193, 257], SegEncoding::Fractional),
        ("m320x320", [3, 320, 320], SegEncoding::Binary),
    ] {
        let src = source_volume(dims, [0.7, 0.7, 3.0], false, false);
        let mask =
            ellipsoid(dims, [dims[0] as f64 / 2.0, dims[1] as f64 / 2.0, dims[2] as f64 / 2.0], [1.6, 40.0, 50.0]);
        let (bytes, _) = write_and_validate(name, &src, &[prostate(&mask)]);
        let obj = dicom_object::OpenFileOptions::new()
            .read_preamble(dicom_object::file::ReadPreamble::Always)
            .from_reader(&bytes[..])
            .unwrap();
        let seg_type =
            obj.element(dicom_dictionary_std::tags::SEGMENTATION_TYPE).unwrap().to_str().unwrap().to_string();
        assert_eq!(seg_type.trim(), want.segmentation_type(), "{name}");
    }
}

#[test]
fn single_slice() {
    let src = source_volume([1, 9, 11], [0.5, 0.5, 4.0], false, false);
    let mask = random_mask(src.dims, 11);
    write_and_validate("single", &src, &[prostate(&mask)]);
}

#[test]
fn empty_mask_keeps_all_frames() {
    let src = source_volume([6, 8, 8], [1.0, 1.0, 3.0], false, false);
    let mask = Mask::zeros(src.dims);
    let (bytes, _) = write_and_validate("empty", &src, &[prostate(&mask)]);
    let seg = read_seg_standalone(&bytes).unwrap();
    assert_eq!(seg.frames.len(), 6, "an empty result keeps every frame");
    assert!(seg.frames.iter().all(|f| f.pixels.iter().all(|&p| p == 0)));
    assert!(seg.content_description.unwrap().starts_with("DeSAM prostate: empty result;"));
}

#[test]
fn oblique_orientation() {
    let src = source_volume([7, 16, 20], [0.7, 0.7, 3.3], true, false);
    let mask = ellipsoid(src.dims, [3.0, 8.0, 10.0], [2.5, 5.0, 6.0]);
    write_and_validate("oblique", &src, &[prostate(&mask)]);
}

#[test]
fn prostate_and_zones() {
    let src = source_volume([8, 20, 20], [0.6, 0.6, 3.0], false, false);
    let gland = ellipsoid(src.dims, [3.5, 10.0, 10.0], [3.0, 7.0, 7.0]);
    let mut pz = gland.clone();
    let mut tz = gland.clone();
    for (i, (p, t)) in pz.data.iter_mut().zip(tz.data.iter_mut()).enumerate() {
        let y = (i / 20) % 20;
        // posterior half → PZ, anterior → TZ
        if y < 10 {
            *p = 0
        } else {
            *t = 0
        }
    }
    let segments = [
        prostate(&gland),
        Segment { info: SegmentInfo::peripheral_zone("DeSAM"), mask: &pz },
        Segment { info: SegmentInfo::transition_zone("DeSAM"), mask: &tz },
    ];
    let (bytes, _) = write_and_validate("zones", &src, &segments);
    let seg = read_seg_standalone(&bytes).unwrap();
    assert_eq!(seg.frames.len(), 24);
    assert_eq!(seg.segments.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(seg.frames[8].dimension_index_values, vec![2, 1]);
}

#[test]
fn multi_frame_source_references_frames() {
    let src = source_volume([5, 10, 12], [0.8, 0.8, 3.0], false, true);
    let mask = ellipsoid(src.dims, [2.0, 5.0, 6.0], [2.0, 4.0, 5.0]);
    let (bytes, _) = write_and_validate("multiframe", &src, &[prostate(&mask)]);
    let seg = read_seg_standalone(&bytes).unwrap();
    assert_eq!(seg.referenced_series[0].1.len(), 1, "one Enhanced MR instance referenced once");
    for (z, f) in seg.frames.iter().enumerate() {
        assert_eq!(f.source_refs[0].frame_numbers, vec![z as u32 + 1]);
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    // NIfTI-like volume: no DICOM references
    let nifti = Volume::new(vec![0.0; 2 * 3 * 4], [2, 3, 4], [1.0; 3], [0.0; 3]);
    let m = Mask::zeros([2, 3, 4]);
    assert!(matches!(write_seg(&nifti, &[prostate(&m)], &options()), Err(SegError::NoDicomSource)));
    let src = source_volume([2, 3, 4], [1.0; 3], false, false);
    let wrong = Mask::zeros([2, 4, 3]);
    assert!(matches!(write_seg(&src, &[prostate(&wrong)], &options()), Err(SegError::DimsMismatch { .. })));
    assert!(matches!(write_seg(&src, &[], &options()), Err(SegError::NoSegments)));
    let mut unsorted = src.clone();
    unsorted.slices.swap(0, 1);
    assert!(matches!(write_seg(&unsorted, &[prostate(&m)], &options()), Err(SegError::SliceOrder { slice: 1 })));
    let mut nan = src.clone();
    nan.spacing[0] = f64::NAN;
    assert!(matches!(write_seg(&nan, &[prostate(&m)], &options()), Err(SegError::Ds(_))));

    // Reading onto the wrong series: every frame's reference and position are foreign.
    let mut fg = Mask::zeros([2, 3, 4]);
    fg.data[1] = 1; // slice 0
    fg.data[12 + 5] = 1; // slice 1: other pixels, so a misplaced frame shows
    fg.data[12 + 10] = 1;
    let bytes = write_seg(&src, &[prostate(&fg)], &options()).unwrap();
    let mut other = source_volume([2, 3, 4], [1.0; 3], false, false);
    other.frame_of_reference_uid = src.frame_of_reference_uid.clone();
    for s in other.slices.iter_mut() {
        s.position[2] += 50.0;
    }
    assert!(matches!(read_seg(&bytes, &other), Err(SegError::FrameNotInSource { frame: 1, .. })));
    // Same positions, foreign instance UIDs: placed by position (documented fallback).
    let mut moved = source_volume([2, 3, 4], [1.0; 3], false, false);
    moved.frame_of_reference_uid = src.frame_of_reference_uid.clone();
    let placed = read_seg(&bytes, &moved).unwrap();
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].1, fg, "frames placed by position");
    // Different frame of reference → grid mismatch
    let foreign = source_volume([2, 3, 4], [1.0; 3], false, false);
    assert!(matches!(read_seg(&bytes, &foreign), Err(SegError::GridMismatch { .. })));
    assert!(matches!(read_seg(&bytes, &nifti), Err(SegError::NoDicomSource | SegError::GridMismatch { .. })));
    // Same references, other pixel spacing → grid mismatch
    let mut resampled = src.clone();
    resampled.spacing[0] = 0.5;
    assert!(matches!(read_seg(&bytes, &resampled), Err(SegError::GridMismatch { what: "PixelSpacing", .. })));
    // Not a SEG at all
    assert!(read_seg_standalone(&bytes[..200]).is_err());
}

/// What pydicom says about a SEG written by another tool.
fn pydicom_dump(path: &Path) -> serde_json::Value {
    let out = Command::new(python())
        .arg(manifest().join("python/validate/dump_seg.py"))
        .arg(path)
        .output()
        .expect("python runs");
    assert!(out.status.success(), "dump_seg.py: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Compare our standalone decode with pydicom's, and read onto a source grid rebuilt from the
/// SEG's own references (the dcmqi liver SEG's CT series is not shipped).
fn check_foreign_seg(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let ours = read_seg_standalone(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let theirs = pydicom_dump(path);
    let frames = theirs["frames"].as_array().unwrap();
    assert_eq!(ours.frames.len(), frames.len(), "{}: frame count", path.display());
    assert_eq!(ours.rows as u64, theirs["rows"].as_u64().unwrap());
    let segs = theirs["segments"].as_array().unwrap();
    assert_eq!(ours.segments.len(), segs.len());
    for ((num, info), s) in ours.segments.iter().zip(segs) {
        assert_eq!(*num as u64, s["number"].as_u64().unwrap());
        assert_eq!(info.label, s["label"].as_str().unwrap());
        assert_eq!(info.property_type.value, s["type"][0].as_str().unwrap());
        assert_eq!(info.property_type.scheme, s["type"][1].as_str().unwrap());
        assert_eq!(info.category.value, s["category"][0].as_str().unwrap());
    }
    for (f, t) in ours.frames.iter().zip(frames) {
        let count = f.pixels.iter().filter(|&&p| p != 0).count() as u64;
        assert_eq!(count, t["count"].as_u64().unwrap(), "{}: per-frame pixel count", path.display());
        let p = f.position.unwrap();
        for a in 0..3 {
            assert!((p[a] - t["position"][a].as_f64().unwrap()).abs() < 1e-9);
        }
        assert_eq!(f.source_refs[0].sop_instance_uid, t["source_uid"].as_str().unwrap());
        assert_eq!(f.segment_number as u64, t["segment"].as_u64().unwrap());
    }

    // Read onto a grid built from the references pydicom reports, in slice order.
    let mut order: Vec<usize> = (0..frames.len()).collect();
    order.sort_by(|&a, &b| {
        let za = frames[a]["position"][2].as_f64().unwrap();
        let zb = frames[b]["position"][2].as_f64().unwrap();
        za.partial_cmp(&zb).unwrap()
    });
    let (ny, nx) = (ours.rows, ours.columns);
    let mut src = Volume::new(vec![0.0; order.len() * ny * nx], [order.len(), ny, nx], [1.0; 3], [0.0; 3]);
    src.slices = order
        .iter()
        .map(|&i| SliceRef {
            sop_class_uid: theirs["frames"][i]["source_class"].as_str().unwrap().to_string(),
            sop_instance_uid: frames[i]["source_uid"].as_str().unwrap().to_string(),
            frame_number: None,
            position: [0, 1, 2].map(|a| frames[i]["position"][a].as_f64().unwrap()),
        })
        .collect();
    let iop: Vec<f64> = theirs["iop"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    src.direction[0] = [iop[0], iop[1], iop[2]];
    src.direction[1] = [iop[3], iop[4], iop[5]];
    src.frame_of_reference_uid = theirs["frame_of_reference_uid"].as_str().map(str::to_string);
    // PixelSpacing is (row spacing, column spacing); Volume::spacing is (x, y, z).
    src.spacing[0] = theirs["pixel_spacing"][1].as_f64().unwrap();
    src.spacing[1] = theirs["pixel_spacing"][0].as_f64().unwrap();
    let masks = read_seg(&bytes, &src).unwrap();
    let total: u64 = frames.iter().map(|t| t["count"].as_u64().unwrap()).sum();
    assert_eq!(masks.iter().map(|(_, m)| m.count() as u64).sum::<u64>(), total);
    for (k, &i) in order.iter().enumerate() {
        let (_, m) = &masks[0];
        let c = m.slice(k).iter().filter(|&&v| v != 0).count() as u64;
        assert_eq!(c, frames[i]["count"].as_u64().unwrap());
    }
}

#[test]
fn reads_dcmqi_liver_segs_like_pydicom() {
    let sp = site_packages();
    for rel in [
        "data_store/data/liver.dcm",
        "data_store/data/liver_expb.dcm",
        "pydicom/data/test_files/liver_1frame.dcm",
        "pydicom/data/test_files/liver_expb_1frame.dcm",
    ] {
        check_foreign_seg(&sp.join(rel));
    }
}

#[test]
fn reads_highdicom_segs() {
    let dir = tmp_dir("hd");
    let out = Command::new(python())
        .arg(manifest().join("python/validate/make_hd_seg.py"))
        .arg(&dir)
        .output()
        .expect("python runs");
    assert!(out.status.success(), "make_hd_seg.py: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap();
    let dims = [0, 1, 2].map(|a| meta["dims"][a].as_u64().unwrap() as usize);
    let mut src = Volume::new(vec![0.0; dims.iter().product()], dims, [0.5, 0.5, 2.0], [0.0; 3]);
    src.slices = meta["slices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| SliceRef {
            sop_class_uid: MR_IMAGE_STORAGE.into(),
            sop_instance_uid: s["uid"].as_str().unwrap().into(),
            frame_number: None,
            position: [0, 1, 2].map(|a| s["position"][a].as_f64().unwrap()),
        })
        .collect();
    src.frame_of_reference_uid = Some(meta["frame_of_reference_uid"].as_str().unwrap().into());
    let expected = std::fs::read(dir.join("masks.bin")).unwrap();
    let n = src.voxels.len();
    for name in ["hd_seg.dcm", "hd_seg_omitted.dcm"] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let masks = read_seg(&bytes, &src).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(masks.len(), 2, "{name}");
        assert_eq!(masks[0].0.label, "Prostate");
        assert!(masks[0].0.property_type.same_concept(&codes::PROSTATE));
        for (k, (_, m)) in masks.iter().enumerate() {
            assert_eq!(m.data, expected[k * n..(k + 1) * n], "{name}: segment {}", k + 1);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn seg_of_a_real_mr_series_written_and_read_back() {
    use desam::dicom::{load_series_dir, write_mr_series_full, MrSeriesAttributes};
    let dir = tmp_dir("mr-source");
    let src_dir = dir.join("mr");
    // An oblique phantom series written by our MR writer and read back by the series reader.
    let mut phantom = source_volume([9, 18, 22], [0.55, 0.6, 3.5], true, false);
    phantom.slices.clear();
    phantom.source = None;
    phantom.frame_of_reference_uid = None;
    write_mr_series_full(&phantom, &MrSeriesAttributes::default(), &src_dir).unwrap();
    let loaded = load_series_dir(&src_dir).unwrap().volume;
    assert_eq!(loaded.slices.len(), 9);
    let mask = ellipsoid(loaded.dims, [4.0, 9.0, 11.0], [3.0, 6.0, 8.0]);
    let (bytes, _) = write_and_validate_with_sources("mr", &loaded, &[prostate(&mask)], Some(&src_dir));
    // A SEG made for this series does not paint onto another one.
    let other = source_volume([9, 18, 22], [0.55, 0.6, 3.5], true, false);
    assert!(read_seg(&bytes, &other).is_err());
    // The source files are untouched (the SEG never rewrites them).
    assert_eq!(std::fs::read_dir(&src_dir).unwrap().count(), 9);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dciodvfy_catches_a_broken_seg() {
    // The validator check must be able to fail: drop a Type 1 attribute and expect an error.
    let src = source_volume([2, 4, 4], [1.0; 3], false, false);
    let m = random_mask(src.dims, 3);
    let bytes = write_seg(&src, &[prostate(&m)], &options()).unwrap();
    let mut obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(&bytes[..])
        .unwrap();
    assert!(obj.remove_element(dicom_dictionary_std::tags::SEGMENTATION_TYPE));
    let dir = tmp_dir("broken");
    let path = dir.join("broken.dcm");
    obj.write_to_file(&path).unwrap();
    let (_, errors, _) = dciodvfy_findings(&path);
    assert!(errors.iter().any(|e| e.contains("SegmentationType")), "{errors:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reads_our_seg_converted_to_other_transfer_syntaxes() {
    // dcmtk's dcmconv re-encodes the file; the decoded masks must not change.
    let src = source_volume([4, 5, 7], [0.9, 0.8, 2.5], false, false);
    let mask = random_mask(src.dims, 21);
    let bytes = write_seg(&src, &[prostate(&mask)], &options()).unwrap();
    let dir = tmp_dir("ts");
    let input = dir.join("seg.dcm");
    std::fs::write(&input, &bytes).unwrap();
    for (flag, name) in [("+ti", "implicit"), ("+tb", "big")] {
        let out = dir.join(format!("{name}.dcm"));
        let st = Command::new("dcmconv").arg(flag).arg(&input).arg(&out).status().expect("dcmconv (dcmtk)");
        assert!(st.success(), "dcmconv {flag}");
        let converted = std::fs::read(&out).unwrap();
        assert_ne!(converted, bytes);
        let back = read_seg(&converted, &src).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(back[0].1, mask, "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

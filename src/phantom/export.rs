//! Writes generated phantom cases to disk: an MR series + DICOM-SEG ground truth + NIfTI label per
//! case, or an nnU-Net v1 task folder with DeSAM's `prostate_patientid.csv`. Never overwrites a file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::dicom::{
    write_mr_series_full, write_seg, AlgorithmType, MrSeriesAttributes, SegOptions, Segment, SegmentInfo, StoredPixels,
};
use crate::nifti::{write_nifti, write_nifti_mask};
use crate::volume::Volume;

use super::anatomy::Tissue;
use super::{PhantomCase, PhantomError, Site};

/// The text every ground-truth segment and SEG series carries.
pub const GROUND_TRUTH_LABEL: &str = "phantom ground truth";

/// Equipment and acquisition attributes of the case's MR series, from its protocol and SourceInfo.
pub fn mr_attributes(case: &PhantomCase) -> MrSeriesAttributes {
    let p = &case.protocol;
    let src = case.image.source.clone().unwrap_or_default();
    let site = case.site;
    let (sequence_variant, sequence_name, flip, coil) = match site {
        Site::A => ("SK\\SP\\OSP", "*tse2d1_21", 150.0, "Body18+Spine32"),
        Site::B => ("SK", "TSE", 90.0, "SENSE-ENDO+Body"),
        Site::C => ("SK\\SP\\MP\\OSP", "*spc_314ns", 120.0, "BodyMatrix+Spine"),
        Site::D => ("SK\\SP\\OSP", "*tse2d1_15", 150.0, "BodyMatrix"),
        Site::E => ("SK\\OSP", "fse-xl", 90.0, "ENDO+PA"),
        Site::F => ("SK\\SP\\OSP", "*tse2d1_17", 150.0, "Endorectal+Body"),
    };
    MrSeriesAttributes {
        patient_name: src.patient_name.clone().unwrap_or_default(),
        patient_id: src.patient_id.clone().unwrap_or_default(),
        patient_birth_date: src.patient_birth_date.clone().unwrap_or_default(),
        patient_sex: src.patient_sex.clone().unwrap_or_else(|| "M".into()),
        patient_age: src.patient_age.clone(),
        study_instance_uid: Some(src.study_instance_uid.clone()),
        study_date: src.study_date.clone().unwrap_or_default(),
        study_time: src.study_time.clone().unwrap_or_default(),
        study_id: src.study_id.clone().unwrap_or_default(),
        accession_number: src.accession_number.clone().unwrap_or_default(),
        referring_physician_name: String::new(),
        study_description: src.study_description.clone(),
        series_instance_uid: Some(src.series_instance_uid.clone()),
        series_number: src.series_number.unwrap_or(3),
        series_description: p.series_description.clone(),
        protocol_name: p.protocol_name.clone(),
        frame_of_reference_uid: case.image.frame_of_reference_uid.clone(),
        body_part_examined: "PROSTATE".into(),
        patient_position: "HFS".into(),
        manufacturer: p.manufacturer.clone(),
        manufacturer_model_name: p.manufacturer_model_name.clone(),
        device_serial_number: Some(format!("PHANTOM{}", site.letter())),
        software_versions: Some(format!("desam-phantom {}", env!("CARGO_PKG_VERSION"))),
        institution_name: Some(p.institution_name.clone()),
        station_name: Some(format!("PHANTOM-{}", site.letter())),
        magnetic_field_strength: p.magnetic_field_strength,
        scanning_sequence: "SE".into(),
        sequence_variant: sequence_variant.into(),
        scan_options: String::new(),
        mr_acquisition_type: if site == Site::C { "3D".into() } else { "2D".into() },
        sequence_name: Some(sequence_name.into()),
        repetition_time: p.repetition_time_ms,
        echo_time: p.echo_time_ms,
        echo_train_length: p.echo_train_length as i32,
        flip_angle: Some(flip),
        imaging_frequency: Some((42.577_478 * p.magnetic_field_strength * 1e4).round() / 1e4),
        imaged_nucleus: "1H".into(),
        receive_coil_name: Some(coil.into()),
        slice_thickness: Some(p.slice_thickness),
        stored_pixels: StoredPixels::Uint16,
        rescale: p.rescale,
    }
}

/// Files written for one case in the DICOM layout.
#[derive(Debug, Clone)]
pub struct DicomCaseFiles {
    pub mr: Vec<PathBuf>,
    pub seg: PathBuf,
    pub label: PathBuf,
    pub zones: PathBuf,
    /// `tissues.nii.gz` when the case has a tissue map (legend: `tissues.json` beside it).
    pub tissues: Option<PathBuf>,
    /// The image as written (with the SliceRefs of the written MR instances).
    pub volume: Volume,
}

fn refuse_existing(path: &Path) -> Result<(), PhantomError> {
    if path.exists() {
        Err(PhantomError::Exists(path.display().to_string()))
    } else {
        Ok(())
    }
}

fn create_dir(path: &Path) -> Result<(), PhantomError> {
    std::fs::create_dir_all(path).map_err(|e| PhantomError::Io { path: path.display().to_string(), source: e })
}

/// `dir/<case id>/MR/MR_0001.dcm…`, `dir/<case id>/SEG/seg.dcm` (the gland, MANUAL, "phantom ground
/// truth"), `dir/<case id>/label.nii.gz` (binary gland) and `zones.nii.gz` (1 PZ, 2 TZ).
pub fn write_case_dicom(case: &PhantomCase, dir: &Path) -> Result<DicomCaseFiles, PhantomError> {
    let case_dir = dir.join(&case.case_id);
    let mr_dir = case_dir.join("MR");
    let seg_dir = case_dir.join("SEG");
    let seg_path = seg_dir.join("seg.dcm");
    let label_path = case_dir.join("label.nii.gz");
    let zones_path = case_dir.join("zones.nii.gz");
    for p in [&mr_dir, &seg_path, &label_path, &zones_path] {
        refuse_existing(p)?;
    }
    let written = write_mr_series_full(&case.image, &mr_attributes(case), &mr_dir)?;

    let gland = case.gland_mask();
    let mut info = SegmentInfo::prostate(GROUND_TRUTH_LABEL);
    info.algorithm_type = AlgorithmType::Manual;
    info.description = Some(GROUND_TRUTH_LABEL.to_string());
    let mut opts = SegOptions::new("DeSAM phantom", env!("CARGO_PKG_VERSION"));
    opts.series_description = Some(format!("Prostate ({GROUND_TRUTH_LABEL})"));
    opts.content_label = "GROUNDTRUTH".into();
    opts.content_description = Some(format!("Prostate gland, {GROUND_TRUTH_LABEL}"));
    opts.content_creator = Some("DeSAM^Phantom".into());
    opts.device_serial_number = format!("PHANTOM{}", case.site.letter());
    opts.gland_volume_ml = Some(case.truth.gland_ml);
    let src = case.image.source.as_ref();
    let date = src.and_then(|s| s.study_date.clone()).unwrap_or_else(|| "20120101".into());
    let time = src.and_then(|s| s.study_time.clone()).unwrap_or_else(|| "120000".into());
    opts.content_date_time = Some((date, time));
    let bytes = write_seg(&written.volume, &[Segment { info, mask: &gland }], &opts)?;
    create_dir(&seg_dir)?;
    write_new(&seg_path, &bytes)?;

    write_nifti_mask(&label_path, &gland, &written.volume)?;
    write_nifti_mask(&zones_path, &case.labels, &written.volume)?;
    let tissues = write_tissue_map(case, &case_dir.join("tissues.nii.gz"), &written.volume)?;
    Ok(DicomCaseFiles {
        mr: written.paths,
        seg: seg_path,
        label: label_path,
        zones: zones_path,
        tissues,
        volume: written.volume,
    })
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<(), PhantomError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| PhantomError::Io { path: path.display().to_string(), source: e })?;
    f.write_all(bytes).map_err(|e| PhantomError::Io { path: path.display().to_string(), source: e })
}

/// DeSAM's numeric patient id of a case: site index · 100 + case (A000 → 0, B007 → 107, F011 → 511).
pub fn official_patient_id(site: Site, case_index: u32) -> Result<u32, PhantomError> {
    if case_index >= 100 {
        return Err(PhantomError::CaseOutOfRange { case: case_index, max: 99 });
    }
    Ok(site.index() as u32 * 100 + case_index)
}

/// The nnU-Net case identifier: `prostate_<3-digit patient id>` (DeSAM parses `id[9:12]`).
pub fn nnunet_case_id(site: Site, case_index: u32) -> Result<String, PhantomError> {
    Ok(format!("prostate_{:03}", official_patient_id(site, case_index)?))
}

/// Files written for one case in the nnU-Net layout.
#[derive(Debug, Clone)]
pub struct NiftiCaseFiles {
    pub image: PathBuf,
    pub label: PathBuf,
    pub zones: PathBuf,
    /// `dir/labelsTr_tissues/<id>.nii.gz` when the case has a tissue map (legend: `tissues.json` in that folder).
    pub tissues: Option<PathBuf>,
}

/// Writes the case's tissue map (if it has one) on the image's grid, and the legend
/// `tissues.json` ({"fat": 2, ...}) beside it. None when the case has no map.
fn write_tissue_map(case: &PhantomCase, path: &Path, grid: &Volume) -> Result<Option<PathBuf>, PhantomError> {
    let Some(map) = &case.tissues else { return Ok(None) };
    let dir = path.parent().expect("a file in a folder");
    create_dir(dir)?;
    refuse_existing(path)?;
    write_nifti_mask(path, map, grid)?;
    let legend: serde_json::Map<String, serde_json::Value> =
        Tissue::ALL.iter().map(|t| (t.name().to_string(), serde_json::json!(*t as u8))).collect();
    let legend_path = dir.join("tissues.json");
    let text = serde_json::to_string_pretty(&legend).expect("JSON of plain values");
    std::fs::write(&legend_path, text)
        .map_err(|e| PhantomError::Io { path: legend_path.display().to_string(), source: e })?;
    Ok(Some(path.to_path_buf()))
}

/// `dir/imagesTr/<id>_0000.nii.gz` (float32 modality values), `dir/labelsTr/<id>.nii.gz` (binary gland,
/// label 1) and `dir/labelsTr_zones/<id>.nii.gz` (1 PZ, 2 TZ); then refreshes `prostate_patientid.csv`
/// and `dataset.json` from the folder's contents.
pub fn write_case_nifti(case: &PhantomCase, dir: &Path) -> Result<NiftiCaseFiles, PhantomError> {
    let id = nnunet_case_id(case.site, case.case_index)?;
    let images = dir.join("imagesTr");
    let labels = dir.join("labelsTr");
    let zones = dir.join("labelsTr_zones");
    let mut files = NiftiCaseFiles {
        image: images.join(format!("{id}_0000.nii.gz")),
        label: labels.join(format!("{id}.nii.gz")),
        zones: zones.join(format!("{id}.nii.gz")),
        tissues: None,
    };
    for p in [&files.image, &files.label, &files.zones] {
        refuse_existing(p)?;
    }
    for d in [&images, &labels, &zones] {
        create_dir(d)?;
    }
    write_nifti(&files.image, &case.image)?;
    write_nifti_mask(&files.label, &case.gland_mask(), &case.image)?;
    write_nifti_mask(&files.zones, &case.labels, &case.image)?;
    files.tissues = write_tissue_map(case, &dir.join("labelsTr_tissues").join(format!("{id}.nii.gz")), &case.image)?;
    update_task_index(dir, case.site, case.case_index)?;
    Ok(files)
}

/// Adds the case to `prostate_patientid.csv` (columns `center,patientid`, DeSAM's centre names) and
/// rewrites `dataset.json` (nnU-Net v1) listing every case present in `imagesTr`.
fn update_task_index(dir: &Path, site: Site, case_index: u32) -> Result<(), PhantomError> {
    let csv_path = dir.join("prostate_patientid.csv");
    let mut rows: BTreeSet<(u32, String)> = BTreeSet::new();
    if csv_path.exists() {
        let text = std::fs::read_to_string(&csv_path)
            .map_err(|e| PhantomError::Io { path: csv_path.display().to_string(), source: e })?;
        for line in text.lines().skip(1) {
            let mut it = line.split(',');
            if let (Some(center), Some(pid)) = (it.next(), it.next()) {
                if let Ok(pid) = pid.trim().parse::<u32>() {
                    rows.insert((pid, center.trim().to_string()));
                }
            }
        }
    }
    rows.insert((official_patient_id(site, case_index)?, site.official_center().to_string()));
    let mut csv = String::from("center,patientid\n");
    for (pid, center) in &rows {
        csv.push_str(&format!("{center},{pid}\n"));
    }
    std::fs::write(&csv_path, csv).map_err(|e| PhantomError::Io { path: csv_path.display().to_string(), source: e })?;

    let images = dir.join("imagesTr");
    let mut ids: Vec<String> = std::fs::read_dir(&images)
        .map_err(|e| PhantomError::Io { path: images.display().to_string(), source: e })?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_string_lossy().strip_suffix("_0000.nii.gz").map(str::to_string))
        .collect();
    ids.sort();
    let training: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| serde_json::json!({"image": format!("./imagesTr/{id}.nii.gz"), "label": format!("./labelsTr/{id}.nii.gz")}))
        .collect();
    let dataset = serde_json::json!({
        "name": "ProstatePhantom",
        "description": "DeSAM six-site synthetic prostate T2w MR phantom (desam phantom)",
        "tensorImageSize": "3D",
        "licence": "GPL-3.0-or-later (synthetic data)",
        "modality": {"0": "T2"},
        "labels": {"0": "background", "1": "prostate"},
        "numTraining": ids.len(),
        "numTest": 0,
        "training": training,
        "test": [],
    });
    let json_path = dir.join("dataset.json");
    let text = serde_json::to_string_pretty(&dataset).expect("JSON of plain values");
    std::fs::write(&json_path, text).map_err(|e| PhantomError::Io { path: json_path.display().to_string(), source: e })
}

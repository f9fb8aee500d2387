//! Training/evaluation data sources: an nnU-Net v1 NIfTI folder with DeSAM's patient→site CSV, an
//! nnU-Net v2 raw dataset (`dataset.json`), or DICOM case folders (MR series + DICOM-SEG ground truth).
//! Reads and validates; never writes data.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{io_err, TrainError};
use crate::volume::{Mask, Volume};

/// DeSAM's site table in an nnU-Net folder (columns `center,patientid`).
pub const SITE_CSV: &str = "prostate_patientid.csv";
/// An nnU-Net v2 raw dataset's description (`channel_names`, `labels`, `numTraining`, `file_ending`).
pub const DATASET_JSON: &str = "dataset.json";
/// The site of every case of an nnU-Net v2 dataset that has no site table (one site: the dataset).
pub const DEFAULT_SITE: &str = "A";

#[derive(Debug, Clone, PartialEq)]
pub enum CaseSource {
    Nifti {
        image: PathBuf,
        label: PathBuf,
    },
    /// nnU-Net v2: channel 0 of `imagesTr/` and the label file; voxels whose label value is one of
    /// `prostate_labels` are the prostate (see `prostate_label_values`).
    NnUnetV2 {
        image: PathBuf,
        label: PathBuf,
        prostate_labels: Vec<u8>,
    },
    /// `series` holds the MR instances, `seg` the ground-truth DICOM-SEG file.
    Dicom {
        series: PathBuf,
        seg: PathBuf,
    },
}

/// One case of a dataset, in dataset order (the CSV order for NIfTI, folder-name order for DICOM).
#[derive(Debug, Clone, PartialEq)]
pub struct CaseRef {
    pub id: String,
    /// Site code: the part of the CSV centre before '-' ("A-ISBI" → "A").
    pub site: String,
    pub patient: String,
    pub source: CaseSource,
}

/// A case read from disk: the image and its binary ground truth (1 = prostate) on the same grid.
#[derive(Debug, Clone)]
pub struct LoadedCase {
    pub case: CaseRef,
    pub volume: Volume,
    pub label: Mask,
}

fn site_code(center: &str) -> String {
    center.trim().split('-').next().unwrap_or("").trim().to_string()
}

fn trailing_number(id: &str) -> Option<u64> {
    let digits: String =
        id.chars().rev().take_while(|c| c.is_ascii_digit()).collect::<Vec<_>>().into_iter().rev().collect();
    digits.parse().ok()
}

/// Reads `center,patientid` rows: (patient number, site code), in file order.
fn read_site_csv(path: &Path) -> Result<Vec<(u64, String)>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or("").to_ascii_lowercase();
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let (ci, pi) = match (cols.iter().position(|c| *c == "center"), cols.iter().position(|c| *c == "patientid")) {
        (Some(c), Some(p)) => (c, p),
        _ => {
            return Err(TrainError::Data {
                path: path.into(),
                message: "expected a header with columns center,patientid".into(),
            })
        }
    };
    let mut rows = Vec::new();
    for (n, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').collect();
        let bad = || TrainError::Data { path: path.into(), message: format!("line {}: cannot parse {line:?}", n + 2) };
        let pid: u64 = f.get(pi).ok_or_else(bad)?.trim().parse().map_err(|_| bad())?;
        let site = site_code(f.get(ci).ok_or_else(bad)?);
        if site.is_empty() {
            return Err(bad());
        }
        rows.push((pid, site));
    }
    Ok(rows)
}

/// Lists a dataset folder: nnU-Net v2 (`dataset.json` with `channel_names`, `imagesTr/`, `labelsTr/`,
/// optionally `prostate_patientid.csv`), nnU-Net v1 (`imagesTr/` + `labelsTr/` +
/// `prostate_patientid.csv`) or DICOM case folders (`<case>/MR/…` + `<case>/SEG/*.dcm`). Every case
/// must have a label and a site.
pub fn list_cases(dir: &Path) -> Result<Vec<CaseRef>, TrainError> {
    if !dir.join("imagesTr").is_dir() {
        return list_dicom(dir);
    }
    match read_dataset_json(dir)? {
        Some(v2) => list_nnunet_v2(dir, &v2),
        None => list_nifti(dir),
    }
}

/// The fields of an nnU-Net v2 `dataset.json` that desam reads.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct DatasetJson {
    /// Channel index ("0", "1", …) → name ("T2"); desam reads channel 0 only.
    pub channel_names: serde_json::Map<String, serde_json::Value>,
    /// Label name → value, or → list of values for region-based labels.
    pub labels: serde_json::Map<String, serde_json::Value>,
    #[serde(rename = "numTraining")]
    pub num_training: usize,
    /// ".nii.gz" or ".nii" (other endings are image formats desam does not read).
    pub file_ending: String,
}

/// `dataset.json` of an nnU-Net v2 dataset; `None` when there is none or it is a v1 one (v1's has
/// `modality` where v2's has `channel_names`).
fn read_dataset_json(dir: &Path) -> Result<Option<DatasetJson>, TrainError> {
    let path = dir.join(DATASET_JSON);
    if !path.is_file() {
        return Ok(None);
    }
    let bad = |message: String| TrainError::Data { path: path.clone(), message };
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    if value.get("channel_names").is_none() {
        return Ok(None);
    }
    serde_json::from_value(value).map(Some).map_err(|e| {
        bad(format!("not an nnU-Net v2 dataset.json (channel_names, labels, numTraining, file_ending): {e}"))
    })
}

/// The label values that make up the prostate: the label named "prostate" (any case), else the one
/// named "foreground", else every non-zero label (e.g. the MSD prostate's PZ + TZ zones = the gland).
/// A region-based label (a list of values) counts with all of its values.
pub fn prostate_label_values(labels: &serde_json::Map<String, serde_json::Value>) -> Result<Vec<u8>, String> {
    let values_of = |name: &str, v: &serde_json::Value| -> Result<Vec<u8>, String> {
        let one = |x: &serde_json::Value| {
            x.as_u64()
                .and_then(|n| u8::try_from(n).ok())
                .ok_or_else(|| format!("label {name:?}: {x} is not a label value 0–255"))
        };
        match v {
            serde_json::Value::Array(list) => list.iter().map(one).collect(),
            other => Ok(vec![one(other)?]),
        }
    };
    for wanted in ["prostate", "foreground"] {
        if let Some((name, v)) = labels.iter().find(|(k, _)| k.eq_ignore_ascii_case(wanted)) {
            let mut values = values_of(name, v)?;
            values.retain(|&x| x != 0);
            if values.is_empty() {
                return Err(format!("label {name:?} has no non-zero value"));
            }
            return Ok(values);
        }
    }
    let mut values = Vec::new();
    for (name, v) in labels {
        for x in values_of(name, v)? {
            if x != 0 && !values.contains(&x) {
                values.push(x);
            }
        }
    }
    values.sort_unstable();
    if values.is_empty() {
        return Err("no non-zero label: nothing to train on".into());
    }
    Ok(values)
}

fn list_nnunet_v2(dir: &Path, ds: &DatasetJson) -> Result<Vec<CaseRef>, TrainError> {
    let json = dir.join(DATASET_JSON);
    let bad = |message: String| TrainError::Data { path: json.clone(), message };
    let ending = ds.file_ending.as_str();
    if ending != ".nii.gz" && ending != ".nii" {
        return Err(bad(format!("file_ending {ending:?}: desam reads NIfTI datasets only (.nii.gz or .nii)")));
    }
    if !ds.channel_names.contains_key("0") {
        return Err(bad("channel_names has no channel \"0\" (desam reads the first channel, T2)".into()));
    }
    let prostate_labels = prostate_label_values(&ds.labels).map_err(|m| bad(format!("labels: {m}")))?;
    let images = dir.join("imagesTr");
    let mut ids: Vec<String> = std::fs::read_dir(&images)
        .map_err(io_err(&images))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name().to_str().and_then(|n| n.strip_suffix(&format!("_0000{ending}"))).map(String::from)
        })
        .collect();
    ids.sort();
    if ids.len() != ds.num_training {
        return Err(bad(format!(
            "numTraining is {} but imagesTr/ has {} case(s) with channel 0 (*_0000{ending})",
            ds.num_training,
            ids.len()
        )));
    }
    let csv = dir.join(SITE_CSV);
    let rows = if csv.is_file() { Some(read_site_csv(&csv)?) } else { None };
    let mut out = Vec::new();
    for id in ids {
        let image = images.join(format!("{id}_0000{ending}"));
        let label = dir.join("labelsTr").join(format!("{id}{ending}"));
        if !label.is_file() {
            return Err(TrainError::Data {
                path: image,
                message: format!("case {id} has no label labelsTr/{id}{ending}"),
            });
        }
        // With a site table, sites as for nnU-Net v1; without one the dataset is one site.
        let (site, patient) = match &rows {
            Some(rows) => {
                let pid = trailing_number(&id);
                match pid.and_then(|p| rows.iter().find(|(q, _)| *q == p)) {
                    Some((p, s)) => (s.clone(), p.to_string()),
                    None => {
                        return Err(TrainError::MissingSite {
                            case: id.clone(),
                            patient: pid.map(|p| p.to_string()).unwrap_or_default(),
                            csv: csv.clone(),
                        })
                    }
                }
            }
            None => (DEFAULT_SITE.to_string(), id.clone()),
        };
        out.push(CaseRef {
            id,
            site,
            patient,
            source: CaseSource::NnUnetV2 { image, label, prostate_labels: prostate_labels.clone() },
        });
    }
    Ok(out)
}

fn list_nifti(dir: &Path) -> Result<Vec<CaseRef>, TrainError> {
    let cases = crate::nifti::list_nnunet_cases(dir)
        .map_err(|e| TrainError::Data { path: dir.into(), message: e.to_string() })?;
    let csv = dir.join(SITE_CSV);
    if !csv.is_file() {
        return Err(TrainError::Data {
            path: csv,
            message: "missing: the patient→site table (columns center,patientid)".into(),
        });
    }
    let rows = read_site_csv(&csv)?;
    let mut out = Vec::new();
    for c in &cases {
        let label = c.label.clone().ok_or_else(|| TrainError::Data {
            path: c.image.clone(),
            message: format!("case {} has no label in labelsTr/", c.id),
        })?;
        let pid = trailing_number(&c.id).ok_or_else(|| TrainError::MissingSite {
            case: c.id.clone(),
            patient: "(no trailing number in the case id)".into(),
            csv: csv.clone(),
        })?;
        let pos = rows.iter().position(|(p, _)| *p == pid).ok_or_else(|| TrainError::MissingSite {
            case: c.id.clone(),
            patient: pid.to_string(),
            csv: csv.clone(),
        })?;
        out.push((
            pos,
            CaseRef {
                id: c.id.clone(),
                site: rows[pos].1.clone(),
                patient: pid.to_string(),
                source: CaseSource::Nifti { image: c.image.clone(), label },
            },
        ));
    }
    // CSV order (the official split takes the first 90% of a site's patients in CSV order).
    out.sort_by_key(|(pos, _)| *pos);
    Ok(out.into_iter().map(|(_, c)| c).collect())
}

fn list_dicom(dir: &Path) -> Result<Vec<CaseRef>, TrainError> {
    let rd = std::fs::read_dir(dir).map_err(io_err(dir))?;
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let csv = dir.join(SITE_CSV);
    let rows = if csv.is_file() { Some(read_site_csv(&csv)?) } else { None };
    let mut out = Vec::new();
    for name in names {
        let case_dir = dir.join(&name);
        let (mr, seg_dir) = (case_dir.join("MR"), case_dir.join("SEG"));
        if !mr.is_dir() {
            continue;
        }
        let seg = std::fs::read_dir(&seg_dir)
            .ok()
            .and_then(|rd| {
                let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect();
                v.sort();
                v.into_iter().next()
            })
            .ok_or_else(|| TrainError::Data {
                path: seg_dir.clone(),
                message: format!("case {name}: no DICOM-SEG ground truth file"),
            })?;
        // Site: the CSV when present, else the phantom's PatientID convention ("PHANTOM-A-007").
        let (site, patient) = match &rows {
            Some(rows) => {
                let pid = trailing_number(&name);
                let row = pid.and_then(|p| rows.iter().find(|(q, _)| *q == p));
                match row {
                    Some((p, s)) => (s.clone(), p.to_string()),
                    None => {
                        return Err(TrainError::MissingSite {
                            case: name.clone(),
                            patient: pid.map(|p| p.to_string()).unwrap_or_default(),
                            csv: csv.clone(),
                        })
                    }
                }
            }
            None => match name.chars().next().filter(|c| c.is_ascii_alphabetic()) {
                // Phantom case folders are "<site letter><3 digits>" (A007).
                Some(letter) if name.len() == 4 && name[1..].chars().all(|c| c.is_ascii_digit()) => {
                    (letter.to_ascii_uppercase().to_string(), name.clone())
                }
                _ => {
                    return Err(TrainError::MissingSite {
                        case: name.clone(),
                        patient: name.clone(),
                        csv: csv.clone(),
                    });
                }
            },
        };
        out.push(CaseRef { id: name, site, patient, source: CaseSource::Dicom { series: mr, seg } });
    }
    if out.is_empty() {
        return Err(TrainError::Data {
            path: dir.into(),
            message: "no cases: expected imagesTr/+labelsTr/+prostate_patientid.csv or <case>/MR + <case>/SEG folders"
                .into(),
        });
    }
    Ok(out)
}

/// Reads a case and checks it: same grid for image and label, non-empty foreground (label == 1).
pub fn load_case(case: &CaseRef, require_foreground: bool) -> Result<LoadedCase, TrainError> {
    let (volume, label) = match &case.source {
        CaseSource::Nifti { image, label } => read_nifti_pair(image, label)?,
        CaseSource::NnUnetV2 { image, label, prostate_labels } => {
            let (v, mut m) = read_nifti_pair(image, label)?;
            // The prostate's label values become 1, everything else 0 (the binarisation below keeps 1).
            for x in m.data.iter_mut() {
                *x = prostate_labels.contains(x) as u8;
            }
            (v, m)
        }
        CaseSource::Dicom { series, seg } => {
            let v = crate::dicom::load_series_dir(series)
                .map_err(|e| TrainError::Data { path: series.clone(), message: e.to_string() })?
                .volume;
            let len = std::fs::metadata(seg).map_err(io_err(seg))?.len();
            let cap = crate::limits::get().max_file_bytes;
            if len > cap {
                return Err(TrainError::Data {
                    path: seg.clone(),
                    message: format!("{len} bytes exceed the limit of {cap} (max_file_bytes, docs/limits.md)"),
                });
            }
            let bytes = std::fs::read(seg).map_err(io_err(seg))?;
            let m = first_segment(&bytes, &v).map_err(|message| TrainError::Data { path: seg.clone(), message })?;
            (v, m)
        }
    };
    if label.dims != volume.dims {
        return Err(TrainError::ShapeMismatch { case: case.id.clone(), image: volume.dims, label: label.dims });
    }
    let mut label = label;
    for v in label.data.iter_mut() {
        *v = (*v == 1) as u8;
    }
    if require_foreground && label.count() == 0 {
        return Err(TrainError::EmptyLabel { case: case.id.clone() });
    }
    Ok(LoadedCase { case: case.clone(), volume, label })
}

/// The first segment of a DICOM-SEG on `volume`'s grid (the gland; `read_seg` gives 0/1 masks).
pub fn first_segment(seg: &[u8], volume: &Volume) -> Result<Mask, String> {
    let segments = crate::dicom::read_seg(seg, volume).map_err(|e| e.to_string())?;
    segments.into_iter().next().map(|(_, m)| m).ok_or_else(|| "the SEG has no segment".to_string())
}

fn read_nifti_pair(image: &Path, label: &Path) -> Result<(Volume, Mask), TrainError> {
    let v =
        crate::nifti::read_nifti(image).map_err(|e| TrainError::Data { path: image.into(), message: e.to_string() })?;
    let (m, _) = crate::nifti::read_nifti_mask(label)
        .map_err(|e| TrainError::Data { path: label.into(), message: e.to_string() })?;
    Ok((v, m))
}

/// Where a case's tissue map is (`desam phantom --tissue-map`): `labelsTr_tissues/<file>` beside a
/// NIfTI dataset's `labelsTr/<file>`, `tissues.nii.gz` in a DICOM case folder (beside `MR/`).
pub fn tissue_map_path(case: &CaseRef) -> Option<PathBuf> {
    match &case.source {
        CaseSource::Nifti { label, .. } | CaseSource::NnUnetV2 { label, .. } => {
            let labels = label.parent()?;
            Some(labels.parent()?.join(format!("{}_tissues", labels.file_name()?.to_str()?)).join(label.file_name()?))
        }
        CaseSource::Dicom { series, .. } => Some(series.parent()?.join("tissues.nii.gz")),
    }
}

/// Reads a case's tissue map (z-major codes) and checks that it lies on the image's grid `dims`.
pub fn load_tissue_map(case: &CaseRef, dims: [usize; 3]) -> Result<Vec<u8>, TrainError> {
    let path = tissue_map_path(case).ok_or_else(|| TrainError::Invalid(format!("case {}: no tissue map", case.id)))?;
    let (map, _) = crate::nifti::read_nifti_mask(&path)
        .map_err(|e| TrainError::Data { path: path.clone(), message: e.to_string() })?;
    if map.dims != dims {
        return Err(TrainError::Data {
            path,
            message: format!("tissue map of {:?} voxels, the image has {dims:?} ([z, y, x])", map.dims),
        });
    }
    Ok(map.data)
}

/// SHA-256 over the cases' ids, sites and file contents: identifies exactly which data a run saw.
pub fn manifest_hash(cases: &[CaseRef]) -> Result<String, TrainError> {
    let mut h = Sha256::new();
    for c in cases {
        h.update(format!("{}\t{}\t{}\n", c.id, c.site, c.patient).as_bytes());
        let files: Vec<PathBuf> = match &c.source {
            CaseSource::Nifti { image, label } => vec![image.clone(), label.clone()],
            CaseSource::NnUnetV2 { image, label, prostate_labels } => {
                // Which label values counted as prostate is part of the data the run saw.
                h.update(format!("prostate labels {prostate_labels:?}\n").as_bytes());
                vec![image.clone(), label.clone()]
            }
            CaseSource::Dicom { series, seg } => {
                let mut v: Vec<PathBuf> = walk(series)?;
                v.sort();
                v.push(seg.clone());
                v
            }
        };
        for f in files {
            let digest = crate::modeldir::sha256_file(&f).map_err(io_err(&f))?;
            h.update(digest.as_bytes());
        }
    }
    Ok(hex::encode(h.finalize()))
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>, TrainError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let p = e.map_err(io_err(dir))?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

/// Parses "B,C,D" into site codes (upper case, de-duplicated, order kept).
pub fn parse_sites(s: &str) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for x in s.split(',').map(|x| x.trim().to_ascii_uppercase()).filter(|x| !x.is_empty()) {
        if !v.contains(&x) {
            v.push(x);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_codes_and_numbers() {
        assert_eq!(site_code("A-ISBI"), "A");
        assert_eq!(site_code("B-ISBI_1.5"), "B");
        assert_eq!(trailing_number("prostate_107"), Some(107));
        assert_eq!(trailing_number("case"), None);
        assert_eq!(parse_sites("b, C,b"), vec!["B", "C"]);
    }

    #[test]
    fn prostate_labels_by_name_or_all_non_zero() {
        let labels = |v: serde_json::Value| v.as_object().unwrap().clone();
        let named = labels(serde_json::json!({"background": 0, "Prostate": 2, "lesion": 1}));
        assert_eq!(prostate_label_values(&named).unwrap(), vec![2]);
        let fg = labels(serde_json::json!({"background": 0, "foreground": 1}));
        assert_eq!(prostate_label_values(&fg).unwrap(), vec![1]);
        // The MSD prostate's zones: the gland is their union.
        let zones = labels(serde_json::json!({"background": 0, "PZ": 1, "TZ": 2}));
        assert_eq!(prostate_label_values(&zones).unwrap(), vec![1, 2]);
        let region = labels(serde_json::json!({"background": 0, "prostate": [1, 2], "PZ": 1}));
        assert_eq!(prostate_label_values(&region).unwrap(), vec![1, 2]);
        assert!(prostate_label_values(&labels(serde_json::json!({"background": 0}))).is_err());
        assert!(prostate_label_values(&labels(serde_json::json!({"background": 0, "x": 300}))).is_err());
    }
}

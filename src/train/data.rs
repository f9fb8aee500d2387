//! Training/evaluation data sources: an nnU-Net v1 NIfTI folder with DeSAM's patient→site CSV, or
//! DICOM case folders (MR series + DICOM-SEG ground truth). Reads and validates; never writes data.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{io_err, TrainError};
use crate::volume::{Mask, Volume};

/// DeSAM's site table in an nnU-Net folder (columns `center,patientid`).
pub const SITE_CSV: &str = "prostate_patientid.csv";

#[derive(Debug, Clone, PartialEq)]
pub enum CaseSource {
    Nifti {
        image: PathBuf,
        label: PathBuf,
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

/// Lists a dataset folder: nnU-Net (`imagesTr/` + `labelsTr/` + `prostate_patientid.csv`) or DICOM
/// case folders (`<case>/MR/…` + `<case>/SEG/*.dcm`). Every case must have a label and a site.
pub fn list_cases(dir: &Path) -> Result<Vec<CaseRef>, TrainError> {
    if dir.join("imagesTr").is_dir() {
        list_nifti(dir)
    } else {
        list_dicom(dir)
    }
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
        CaseSource::Nifti { image, label } => {
            let v = crate::nifti::read_nifti(image)
                .map_err(|e| TrainError::Data { path: image.clone(), message: e.to_string() })?;
            let (m, _) = crate::nifti::read_nifti_mask(label)
                .map_err(|e| TrainError::Data { path: label.clone(), message: e.to_string() })?;
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
            let segs = crate::dicom::read_seg(&bytes, &v)
                .map_err(|e| TrainError::Data { path: seg.clone(), message: e.to_string() })?;
            let Some((_, m)) = segs.into_iter().next() else {
                return Err(TrainError::Data { path: seg.clone(), message: "the SEG has no segment".into() });
            };
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

/// SHA-256 over the cases' ids, sites and file contents: identifies exactly which data a run saw.
pub fn manifest_hash(cases: &[CaseRef]) -> Result<String, TrainError> {
    let mut h = Sha256::new();
    for c in cases {
        h.update(format!("{}\t{}\t{}\n", c.id, c.site, c.patient).as_bytes());
        let files: Vec<PathBuf> = match &c.source {
            CaseSource::Nifti { image, label } => vec![image.clone(), label.clone()],
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
}

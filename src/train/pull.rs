//! `desam-train pull`: reviewed DICOM-SEGs in an Orthanc server (plus the MR series they segment) →
//! the DICOM training layout `data::list_dicom` reads (`DIR/<case>/MR/*.dcm`, `DIR/<case>/SEG/*.dcm`,
//! `DIR/prostate_patientid.csv`), with a `pull.json` manifest.
//!
//! Ground truth is a SEG **series** whose user metadata `review_metadata` (default 4302, the plugin's
//! ReviewMetadata) equals `reviewed_value` (default `reviewed`); only a person sets that value (the
//! plugin writes `ok` / `needs-review`, and on the MR series). Orthanc is only read: GET requests and
//! `POST /tools/lookup`. Resumable: a case is written to `DIR/.pull-tmp/<case>` and renamed when
//! complete; complete cases are skipped on the next run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::data::SITE_CSV;
use super::orthanc_rest::{Client, Connection};
use super::{io_err, TrainError};

/// The manifest written into the output folder.
pub const MANIFEST: &str = "pull.json";
/// Where cases are assembled before they are renamed into place (list_dicom skips it: no MR/).
const TMP: &str = ".pull-tmp";
/// Series listed per `GET /series` page.
const PAGE: usize = 500;

/// Where a case's site comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum SiteFrom {
    /// The same site for every case (`--site`).
    Fixed(String),
    /// A DICOM attribute of the MR series' first instance, by keyword (`--site-tag`, default InstitutionName).
    Tag(String),
}

#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The server and how to log in.
    pub connection: Connection,
    pub out: PathBuf,
    pub review_metadata: u16,
    pub reviewed_value: String,
    pub site: SiteFrom,
    /// Print a line per case (the CLI); notes are returned in the report either way.
    pub progress: bool,
}

impl PullOptions {
    /// Defaults: metadata 4302 = "reviewed", site from InstitutionName, no authentication.
    pub fn new(orthanc: &str, out: &Path) -> PullOptions {
        PullOptions {
            connection: Connection { orthanc: orthanc.to_string(), ..Default::default() },
            out: out.to_path_buf(),
            review_metadata: 4302,
            reviewed_value: "reviewed".into(),
            site: SiteFrom::Tag("InstitutionName".into()),
            progress: false,
        }
    }
}

/// One pulled case, as recorded in `pull.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PulledCase {
    /// Folder name (`case_007`); its trailing number is the patient id in the site table.
    pub case: String,
    pub site: String,
    pub mr_series_uid: String,
    pub seg_series_uid: String,
    pub seg_sop_instance_uid: String,
    pub orthanc_mr_series: String,
    pub orthanc_seg_series: String,
    /// MR instance files written.
    pub mr_instances: usize,
    /// Instances of the SEG series in Orthanc (the first one is written).
    pub seg_instances: usize,
    pub pulled_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullManifest {
    /// The Orthanc URL of the last pull (never with a password).
    pub orthanc: String,
    pub user: Option<String>,
    pub review_metadata: u16,
    pub reviewed_value: String,
    pub updated_at: String,
    pub cases: Vec<PulledCase>,
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullReport {
    pub manifest: PullManifest,
    /// Cases written by this run (new, or replaced by a newer reviewed SEG).
    pub pulled: Vec<String>,
    /// Cases already complete in the folder.
    pub up_to_date: Vec<String>,
    /// Warnings and notes (duplicate reviewed SEGs, missing site tags, …).
    pub notes: Vec<String>,
}

/// A reviewed SEG series, read from Orthanc.
#[derive(Debug, Clone)]
struct Candidate {
    orthanc_series: String,
    series_uid: String,
    instance: String,
    sop_uid: String,
    instances: usize,
    mr_series_uid: String,
    /// InstanceCreationDate + Time of the SEG instance, then Orthanc's LastUpdate: the newest wins.
    newest_key: (String, String),
}

/// Upper-case letters, digits and single underscores: a site code that survives the site table
/// (`center` is cut at '-') and `--sites` (upper-cased) unchanged.
pub fn sanitize_site(s: &str) -> String {
    let mut out = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_uppercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_end_matches('_').to_string()
}

/// A file name from a UID (digits and dots); anything else falls back to `fallback`.
fn file_stem(uid: &str, fallback: &str) -> String {
    let ok = !uid.is_empty()
        && uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        && !uid.starts_with('.');
    if ok {
        uid.to_string()
    } else {
        fallback.to_string()
    }
}

fn case_name(n: u64) -> String {
    format!("case_{n:03}")
}

fn case_number(name: &str) -> Option<u64> {
    name.strip_prefix("case_").and_then(|d| d.parse().ok())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn read_manifest(out: &Path) -> Result<Option<PullManifest>, TrainError> {
    let path = out.join(MANIFEST);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    serde_json::from_slice(&bytes).map(Some).map_err(|e| TrainError::Data {
        path,
        message: format!("not a pull manifest ({e}); move the folder aside or choose another --out"),
    })
}

/// Writes `pull.json` and the site table from the manifest (the table has a row for every case).
fn write_manifest(out: &Path, m: &PullManifest) -> Result<(), TrainError> {
    let mut csv = String::from("center,patientid\n");
    for c in &m.cases {
        let pid = case_number(&c.case).unwrap_or_default();
        csv.push_str(&format!("{},{pid}\n", c.site));
    }
    write_atomic(&out.join(SITE_CSV), csv.as_bytes())?;
    let json =
        serde_json::to_vec_pretty(m).map_err(|e| TrainError::Invalid(format!("serialising the manifest: {e}")))?;
    write_atomic(&out.join(MANIFEST), &json)
}

/// A case folder holds exactly what the manifest says: `mr_instances` MR files and the SEG file.
fn is_complete(out: &Path, c: &PulledCase) -> bool {
    let dir = out.join(&c.case);
    let mr = std::fs::read_dir(dir.join("MR"))
        .map(|rd| rd.filter_map(|e| e.ok()).filter(|e| e.path().is_file()).count())
        .unwrap_or(0);
    mr == c.mr_instances
        && mr > 0
        && dir.join("SEG").join(format!("{}.dcm", file_stem(&c.seg_sop_instance_uid, "seg"))).is_file()
}

/// Pulls every reviewed SEG (and its MR series) from Orthanc into `opts.out`.
pub fn pull(opts: &PullOptions) -> Result<PullReport, TrainError> {
    let client = Client::connect(&opts.connection)?;
    if let SiteFrom::Fixed(s) = &opts.site {
        if sanitize_site(s).is_empty() {
            return Err(TrainError::Invalid(format!("--site {s:?}: needs at least one letter or digit")));
        }
    }
    if opts.reviewed_value.trim().is_empty() {
        return Err(TrainError::Invalid("--reviewed-value must not be empty".into()));
    }
    let out = &opts.out;

    // The output folder: new, empty, or an earlier pull's.
    let previous = read_manifest(out)?;
    if previous.is_none() && out.exists() {
        let foreign = std::fs::read_dir(out).map_err(io_err(out))?.filter_map(|e| e.ok()).any(|e| e.file_name() != TMP);
        if foreign {
            return Err(TrainError::Invalid(format!(
                "{} is not empty and has no {MANIFEST}: pull writes only into a new folder or an earlier pull's folder",
                out.display()
            )));
        }
    }

    let mut notes = Vec::new();
    let note = |notes: &mut Vec<String>, text: String| {
        if opts.progress {
            eprintln!("pull: {text}");
        }
        notes.push(text);
    };

    // 1. Reviewed SEG series.
    let candidates = reviewed_segs(&client, opts, &mut notes)?;
    if candidates.is_empty() {
        return Err(TrainError::NoReviewedSeg {
            url: client.url.clone(),
            index: opts.review_metadata,
            value: opts.reviewed_value.clone(),
        });
    }

    // 2. One SEG per MR series: the newest.
    let mut by_mr: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
    for c in candidates {
        by_mr.entry(c.mr_series_uid.clone()).or_default().push(c);
    }
    let mut chosen = Vec::new();
    for (mr_uid, mut list) in by_mr {
        list.sort_by(|a, b| a.newest_key.cmp(&b.newest_key).then_with(|| a.series_uid.cmp(&b.series_uid)));
        let newest = list.pop().expect("non-empty group");
        if !list.is_empty() {
            let older: Vec<&str> = list.iter().map(|c| c.series_uid.as_str()).collect();
            note(
                &mut notes,
                format!(
                    "{} reviewed SEG series reference MR series {mr_uid}: taking the newest, {} (created {} {}, Orthanc LastUpdate {}); ignoring {}",
                    list.len() + 1,
                    newest.series_uid,
                    newest.newest_key.0.get(..8).unwrap_or(""),
                    newest.newest_key.0.get(8..).unwrap_or(""),
                    newest.newest_key.1,
                    older.join(", ")
                ),
            );
        }
        chosen.push(newest);
    }

    // 3. Every referenced MR series must be in Orthanc (checked before anything is written).
    let mut plan = Vec::new();
    for c in chosen {
        match client.lookup_series(&c.mr_series_uid)? {
            Some(id) => plan.push((c, id)),
            None => {
                return Err(TrainError::ReferencedSeriesMissing {
                    seg_series: c.series_uid,
                    mr_series: c.mr_series_uid,
                    url: client.url.clone(),
                })
            }
        }
    }

    // 4. Pull what is not complete yet.
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let mut manifest = previous.unwrap_or(PullManifest {
        orthanc: client.url.clone(),
        user: opts.connection.user.clone(),
        review_metadata: opts.review_metadata,
        reviewed_value: opts.reviewed_value.clone(),
        updated_at: crate::clock::utc_now(),
        cases: Vec::new(),
    });
    let (mut pulled, mut up_to_date) = (Vec::new(), Vec::new());
    for (c, mr_orthanc) in &plan {
        let existing = manifest.cases.iter().position(|p| p.mr_series_uid == c.mr_series_uid);
        if let Some(i) = existing {
            let p = &manifest.cases[i];
            if p.seg_sop_instance_uid == c.sop_uid && is_complete(out, p) {
                up_to_date.push(p.case.clone());
                continue;
            }
            if p.seg_sop_instance_uid != c.sop_uid {
                note(
                    &mut notes,
                    format!("{}: a newer reviewed SEG ({}) replaces {}", p.case, c.series_uid, p.seg_series_uid),
                );
            }
        }
        let name = match existing {
            Some(i) => manifest.cases[i].case.clone(),
            None => {
                // The next number after every recorded case and every case_N folder.
                let mut n = manifest.cases.iter().filter_map(|p| case_number(&p.case)).max().unwrap_or(0) + 1;
                while out.join(case_name(n)).exists() {
                    n += 1;
                }
                case_name(n)
            }
        };
        let record = pull_case(&client, opts, out, &name, c, mr_orthanc, &mut notes)?;
        if opts.progress {
            println!(
                "pull: {name}: site {}, {} MR instances of {}, SEG {}",
                record.site, record.mr_instances, record.mr_series_uid, record.seg_series_uid
            );
        }
        // The manifest first, then the folder: a crash in between leaves a recorded case that is
        // not complete, which the next run pulls again.
        match existing {
            Some(i) => manifest.cases[i] = record,
            None => manifest.cases.push(record),
        }
        manifest.orthanc = client.url.clone();
        manifest.user = opts.connection.user.clone();
        manifest.review_metadata = opts.review_metadata;
        manifest.reviewed_value = opts.reviewed_value.clone();
        manifest.updated_at = crate::clock::utc_now();
        write_manifest(out, &manifest)?;
        let staged = out.join(TMP).join(&name);
        let target = out.join(&name);
        if target.exists() {
            let old = out.join(TMP).join(format!("{name}.old"));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&target, &old).map_err(io_err(&target))?;
            std::fs::rename(&staged, &target).map_err(io_err(&target))?;
            std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
        } else {
            std::fs::rename(&staged, &target).map_err(io_err(&target))?;
        }
        pulled.push(name);
    }
    // Recorded cases whose SEG is no longer marked reviewed stay (pull never deletes data).
    for p in &manifest.cases {
        if !plan.iter().any(|(c, _)| c.mr_series_uid == p.mr_series_uid) {
            note(
                &mut notes,
                format!("{}: no reviewed SEG references its MR series {} any more; the case is kept (delete it by hand to drop it)", p.case, p.mr_series_uid),
            );
        }
    }
    if pulled.is_empty() && !out.join(MANIFEST).is_file() {
        write_manifest(out, &manifest)?;
    }
    let tmp = out.join(TMP);
    if tmp.is_dir() {
        let _ = std::fs::remove_dir(&tmp); // only when empty
    }
    Ok(PullReport { manifest, pulled, up_to_date, notes })
}

/// Lists SEG series page by page and keeps those marked reviewed.
fn reviewed_segs(client: &Client, opts: &PullOptions, notes: &mut Vec<String>) -> Result<Vec<Candidate>, TrainError> {
    let mut out = Vec::new();
    let mut since = 0;
    loop {
        let page = client.get_json(&format!("/series?expand&since={since}&limit={PAGE}"))?;
        let list = page.as_array().cloned().unwrap_or_default();
        for s in &list {
            if s["MainDicomTags"]["Modality"] != "SEG" {
                continue;
            }
            let Some(id) = s["ID"].as_str() else { continue };
            let Some(value) = client.get_optional(&format!("/series/{id}/metadata/{}", opts.review_metadata))? else {
                continue;
            };
            if String::from_utf8_lossy(&value).trim() != opts.reviewed_value.trim() {
                continue;
            }
            let series_uid = s["MainDicomTags"]["SeriesInstanceUID"].as_str().unwrap_or_default().to_string();
            let instances: Vec<String> = s["Instances"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect();
            let Some(instance) = instances.first().cloned() else {
                notes.push(format!("reviewed SEG series {series_uid} (Orthanc {id}) has no instance; skipped"));
                continue;
            };
            if instances.len() > 1 {
                let text = format!(
                    "reviewed SEG series {series_uid} has {} instances; using the first, {instance}",
                    instances.len()
                );
                if opts.progress {
                    eprintln!("pull: {text}");
                }
                notes.push(text);
            }
            let tags = client.get_json(&format!("/instances/{instance}/simplified-tags"))?;
            let mr_series_uid = tags["ReferencedSeriesSequence"]
                .as_array()
                .and_then(|a| a.iter().find_map(|r| r["SeriesInstanceUID"].as_str()))
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .ok_or_else(|| TrainError::SegWithoutReference {
                    seg_series: series_uid.clone(),
                    orthanc_id: id.to_string(),
                })?
                .to_string();
            let text = |k: &str| tags[k].as_str().unwrap_or("").trim().to_string();
            let created = format!("{:0<8}{:0<6}", text("InstanceCreationDate"), text("InstanceCreationTime"));
            out.push(Candidate {
                orthanc_series: id.to_string(),
                series_uid,
                sop_uid: text("SOPInstanceUID"),
                instance,
                instances: instances.len(),
                mr_series_uid,
                newest_key: (created, s["LastUpdate"].as_str().unwrap_or("").to_string()),
            });
        }
        if list.len() < PAGE {
            return Ok(out);
        }
        since += list.len();
    }
}

/// Downloads one case into `out/.pull-tmp/<name>` (MR instances + the SEG file) and returns its record.
fn pull_case(
    client: &Client,
    opts: &PullOptions,
    out: &Path,
    name: &str,
    c: &Candidate,
    mr_orthanc: &str,
    notes: &mut Vec<String>,
) -> Result<PulledCase, TrainError> {
    let staged = out.join(TMP).join(name);
    if staged.exists() {
        std::fs::remove_dir_all(&staged).map_err(io_err(&staged))?;
    }
    let (mr_dir, seg_dir) = (staged.join("MR"), staged.join("SEG"));
    std::fs::create_dir_all(&mr_dir).map_err(io_err(&mr_dir))?;
    std::fs::create_dir_all(&seg_dir).map_err(io_err(&seg_dir))?;

    let instances = client.get_json(&format!("/series/{mr_orthanc}/instances"))?;
    let instances = instances.as_array().cloned().unwrap_or_default();
    let mut first = None;
    let mut written = 0;
    for inst in &instances {
        let Some(id) = inst["ID"].as_str() else { continue };
        first.get_or_insert_with(|| id.to_string());
        let sop = inst["MainDicomTags"]["SOPInstanceUID"].as_str().unwrap_or("");
        let bytes = client.get(&format!("/instances/{id}/file"))?;
        let path = mr_dir.join(format!("{}.dcm", file_stem(sop, id)));
        std::fs::write(&path, &bytes).map_err(io_err(&path))?;
        written += 1;
    }
    let Some(first) = first else {
        return Err(TrainError::OrthancAnswer {
            url: client.url.clone(),
            message: format!("MR series {} (Orthanc {mr_orthanc}) has no instance", c.mr_series_uid),
        });
    };
    let seg_bytes = client.get(&format!("/instances/{}/file", c.instance))?;
    let seg_path = seg_dir.join(format!("{}.dcm", file_stem(&c.sop_uid, "seg")));
    std::fs::write(&seg_path, &seg_bytes).map_err(io_err(&seg_path))?;

    let site = match &opts.site {
        SiteFrom::Fixed(s) => sanitize_site(s),
        SiteFrom::Tag(tag) => {
            let tags = client.get_json(&format!("/instances/{first}/simplified-tags"))?;
            let site = sanitize_site(tags[tag.as_str()].as_str().unwrap_or(""));
            if site.is_empty() {
                let text = format!("{name}: the MR series has no {tag}; site UNKNOWN (give --site or --site-tag)");
                if opts.progress {
                    eprintln!("pull: {text}");
                }
                notes.push(text);
                "UNKNOWN".to_string()
            } else {
                site
            }
        }
    };
    Ok(PulledCase {
        case: name.to_string(),
        site,
        mr_series_uid: c.mr_series_uid.clone(),
        seg_series_uid: c.series_uid.clone(),
        seg_sop_instance_uid: c.sop_uid.clone(),
        orthanc_mr_series: mr_orthanc.to_string(),
        orthanc_seg_series: c.orthanc_series.clone(),
        mr_instances: written,
        seg_instances: c.instances,
        pulled_at: crate::clock::utc_now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_are_sanitized_for_the_site_table() {
        assert_eq!(sanitize_site("DESAM PHANTOM SITE A"), "DESAM_PHANTOM_SITE_A");
        assert_eq!(sanitize_site("  Radboud-UMC, Nijmegen "), "RADBOUD_UMC_NIJMEGEN");
        assert_eq!(sanitize_site("--"), "");
        assert_eq!(case_name(7), "case_007");
        assert_eq!(case_number("case_1234"), Some(1234));
        assert_eq!(file_stem("1.2.840.1", "x"), "1.2.840.1");
        assert_eq!(file_stem("../etc", "x"), "x");
        assert_eq!(file_stem("", "x"), "x");
    }

    #[test]
    fn unreachable_orthanc_is_a_typed_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let out = std::env::temp_dir().join(format!("desam-pull-unit-{}", std::process::id()));
        let r = pull(&PullOptions::new(&format!("http://127.0.0.1:{port}"), &out));
        assert!(matches!(r, Err(TrainError::OrthancUnreachable { .. })), "{r:?}");
        assert!(!out.exists(), "nothing is written when Orthanc cannot be reached");
        let r = pull(&PullOptions::new(&format!("https://127.0.0.1:{port}"), &out));
        assert!(matches!(r, Err(TrainError::OrthancUnreachable { .. })), "https too: {r:?}");
        assert!(matches!(pull(&PullOptions::new("ftp://h:1", &out)), Err(TrainError::Invalid(_))));
        // A CA file that is not one is refused before any request.
        let mut opts = PullOptions::new(&format!("https://127.0.0.1:{port}"), &out);
        opts.connection.ca_file = Some(out.with_extension("missing.pem"));
        let r = pull(&opts);
        assert!(matches!(&r, Err(TrainError::Invalid(m)) if m.contains("--ca-file")), "{r:?}");
    }
}

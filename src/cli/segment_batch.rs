//! `desam segment` over many cases with one model load: finding the cases (the given paths, or every
//! case under a folder), naming their outputs, a report line per case and the batch's summary.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::bail;
use serde::Serialize;

use super::process::one_line;
use super::segment_case::{self, InputKind, ModelSlot, OutputKind, ProgressKind, Reporter, SegmentCliError};
use crate::engine::SegmentRequest;

/// `--output-format` of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// DICOM-SEG (.dcm) for DICOM series, NIfTI mask (.nii.gz) for NIfTI volumes.
    Auto,
    /// DICOM-SEG for every case (NIfTI inputs then fail).
    Seg,
    /// NIfTI masks (.nii.gz) for every case.
    Nifti,
}

/// One case of a batch and the name its outputs get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    pub input: PathBuf,
    pub name: String,
    /// Found under `-i DIR` (a folder there that holds no image series is skipped, not failed).
    pub discovered: bool,
}

pub struct Batch {
    pub cases: Vec<Case>,
    pub out_dir: PathBuf,
    pub format: OutputFormat,
    /// One JSON file with every case's report and the summary.
    pub report: Option<PathBuf>,
    pub request: SegmentRequest,
}

/// Folders deeper than this under `-i DIR` are not searched (a symlink loop ends here).
const MAX_DEPTH: usize = 16;

/// The cases of a batch: the given inputs in order, then every case under `dir` in name order: a
/// folder holding DICOM files is one series (its subfolders are not searched), a .nii/.nii.gz file
/// one volume. Hidden entries and the batch's own output folder are left out.
pub fn find_cases(inputs: &[PathBuf], dir: Option<&Path>, out_dir: &Path) -> Result<Vec<Case>, SegmentCliError> {
    let mut given: Vec<Case> = Vec::new();
    for (input, name) in inputs.iter().zip(shortest_unique_tails(inputs)) {
        given.push(Case { input: input.clone(), name, discovered: false });
    }
    if let Some(dir) = dir {
        if !dir.is_dir() {
            return Err(SegmentCliError::MissingInput(dir.to_path_buf()));
        }
        let skip = std::fs::canonicalize(out_dir).ok();
        let mut found = Vec::new();
        collect_cases(dir, 0, skip.as_deref(), &mut found);
        if found.is_empty() {
            return Err(SegmentCliError::BadOption(format!(
                "no case under {} (folders holding DICOM files, or .nii/.nii.gz files)",
                dir.display()
            )));
        }
        for input in found {
            let relative = input.strip_prefix(dir).unwrap_or(&input);
            let name = if relative.as_os_str().is_empty() { tail_name(dir, 1) } else { joined_name(relative) };
            given.push(Case { input, name, discovered: true });
        }
    }
    deduplicate_names(&mut given);
    Ok(given)
}

fn collect_cases(dir: &Path, depth: usize, skip: Option<&Path>, out: &mut Vec<PathBuf>) {
    if depth > MAX_DEPTH || skip.is_some_and(|s| std::fs::canonicalize(dir).is_ok_and(|d| d == s)) {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    paths.sort();
    if paths.iter().any(|p| p.is_file() && !segment_case::is_nifti(p) && looks_like_dicom(p)) {
        out.push(dir.to_path_buf());
        return;
    }
    for p in paths {
        if p.is_dir() {
            collect_cases(&p, depth + 1, skip, out);
        } else if segment_case::is_nifti(&p) {
            out.push(p);
        }
    }
}

/// A Part-10 file starts with "DICM" at byte 128 (or at 0 without the preamble, as Orthanc serves
/// them); the reader checks the same before parsing, this only decides what is a series folder.
fn looks_like_dicom(p: &Path) -> bool {
    use std::io::Read;
    let mut head = Vec::with_capacity(132);
    let read = std::fs::File::open(p).and_then(|f| f.take(132).read_to_end(&mut head));
    read.is_ok() && ((head.len() >= 132 && &head[128..132] == b"DICM") || head.starts_with(b"DICM"))
}

/// A file or folder name without its NIfTI ending.
fn stem(name: &str) -> &str {
    let lower = name.to_ascii_lowercase();
    for ext in [".nii.gz", ".nii"] {
        if lower.ends_with(ext) {
            return &name[..name.len() - ext.len()];
        }
    }
    name
}

/// The last `n` components of `p`, joined with `_` (the last without its NIfTI ending).
fn tail_name(p: &Path, n: usize) -> String {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let parts: Vec<String> =
        abs.components().filter_map(|c| c.as_os_str().to_str().map(str::to_string)).filter(|s| s != "/").collect();
    joined_name(Path::new(&parts[parts.len().saturating_sub(n)..].join("/")))
}

fn joined_name(relative: &Path) -> String {
    let parts: Vec<String> = relative.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    let joined = parts.join("_");
    let cleaned: String =
        stem(&joined).chars().map(|c| if c.is_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    if cleaned.is_empty() {
        "case".into()
    } else {
        cleaned
    }
}

/// Names for the given inputs from as few trailing path components as keep them apart
/// (…/A000/MR and …/B001/MR become A000_MR and B001_MR; a.nii.gz stays a).
fn shortest_unique_tails(inputs: &[PathBuf]) -> Vec<String> {
    for n in 1..=8 {
        let names: Vec<String> = inputs.iter().map(|p| tail_name(p, n)).collect();
        let unique: std::collections::HashSet<&String> = names.iter().collect();
        if unique.len() == names.len() {
            return names;
        }
    }
    inputs.iter().map(|p| tail_name(p, 1)).collect()
}

/// Any name still taken twice gets `-2`, `-3`, … so that no case writes over another's output.
fn deduplicate_names(cases: &mut [Case]) {
    let mut taken = std::collections::HashSet::new();
    for c in cases.iter_mut() {
        let mut name = c.name.clone();
        let mut k = 2;
        while !taken.insert(name.to_ascii_lowercase()) {
            name = format!("{}-{k}", c.name);
            k += 1;
        }
        c.name = name;
    }
}

/// One case's line in the batch report.
#[derive(Debug, Serialize)]
struct CaseEntry {
    name: String,
    input: String,
    output: Option<String>,
    /// ok, failed or skipped.
    status: &'static str,
    seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    report: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct BatchSummary {
    pub cases: usize,
    pub ok: usize,
    pub failed: usize,
    pub skipped: usize,
    /// Times the model was loaded (1: the point of a batch).
    pub model_loads: usize,
    pub model_load_s: f64,
    pub total_s: f64,
}

/// The case's output path under the batch folder, by the input's kind and `--output-format`.
fn output_of(case: &Case, batch: &Batch) -> Result<PathBuf, SegmentCliError> {
    let kind = match (batch.format, segment_case::input_kind_of(&case.input)?) {
        (OutputFormat::Seg, _) | (OutputFormat::Auto, InputKind::Dicom) => OutputKind::Seg,
        (OutputFormat::Nifti, _) | (OutputFormat::Auto, InputKind::Nifti) => OutputKind::Nifti,
    };
    Ok(batch.out_dir.join(format!("{}.{}", case.name, kind.extension())))
}

/// Segments every case with one model; a failing case is reported and the batch goes on. Errors
/// when the model cannot load (before any case), or at the end when any case failed.
pub fn run(batch: &Batch, mut model: ModelSlot, rep: &mut Reporter) -> anyhow::Result<()> {
    let t_all = Instant::now();
    let out = &batch.out_dir;
    if out.is_file() || (!out.exists() && segment_case::output_kind_of(out).is_some()) {
        bail!(SegmentCliError::BadOption(format!(
            "-o {}: several inputs or -i DIR write into a folder, one output per case",
            out.display()
        )));
    }
    std::fs::create_dir_all(out)
        .map_err(|e| anyhow::anyhow!("cannot create the output folder {}: {e}", out.display()))?;
    model.get()?;
    let total = batch.cases.len();
    let mut entries = Vec::with_capacity(total);
    for (i, case) in batch.cases.iter().enumerate() {
        let t = Instant::now();
        let output = output_of(case, batch);
        let outcome = match &output {
            Ok(o) => segment_case::segment_case(&case.input, o, None, &mut model, &batch.request, rep),
            Err(e) => Err(anyhow::anyhow!(e.to_string())),
        };
        rep.finish();
        let seconds = t.elapsed().as_secs_f64();
        let no_images = |e: &anyhow::Error| {
            matches!(e.downcast_ref::<crate::dicom::DicomError>(), Some(crate::dicom::DicomError::NoImages(_)))
        };
        let mut entry = CaseEntry {
            name: case.name.clone(),
            input: case.input.display().to_string(),
            output: output.as_ref().ok().map(|o| o.display().to_string()),
            status: "ok",
            seconds,
            error: None,
            report: None,
        };
        let head = format!("[{}/{total}]", i + 1);
        match outcome {
            Ok(o) => {
                let r = &o.result;
                eprintln!(
                    "{head} ok      {} → {}: {} slices, {:.1} mL, quality {:.2}{}, {seconds:.1} s",
                    case.input.display(),
                    entry.output.as_deref().unwrap_or(""),
                    r.slice_iou.len(),
                    r.volume_ml,
                    r.quality,
                    if r.flagged { " (FLAGGED for review)" } else { "" },
                );
                entry.report = Some(o.report);
            }
            Err(e) => {
                // A folder found under -i DIR that holds only non-image objects (a SEG, say) is no case.
                let skipped = case.discovered && no_images(&e);
                entry.status = if skipped { "skipped" } else { "failed" };
                entry.output = None;
                let message = one_line(&e);
                eprintln!("{head} {:<7} {}: {message}", entry.status, case.input.display());
                entry.error = Some(message);
            }
        }
        if rep.kind == ProgressKind::Json {
            rep.json(serde_json::json!({"event": "case", "index": i + 1, "total": total, "case": &entry}));
        }
        entries.push(entry);
    }
    let count = |s: &str| entries.iter().filter(|e| e.status == s).count();
    let summary = BatchSummary {
        cases: total,
        ok: count("ok"),
        failed: count("failed"),
        skipped: count("skipped"),
        model_loads: model.loads,
        model_load_s: model.load_s,
        total_s: t_all.elapsed().as_secs_f64(),
    };
    eprintln!(
        "Batch: {} case(s) in {:.1} s: {} ok, {} failed, {} skipped; model loaded {} time(s) ({:.1} s); outputs in {}.",
        summary.cases,
        summary.total_s,
        summary.ok,
        summary.failed,
        summary.skipped,
        summary.model_loads,
        summary.model_load_s,
        out.display()
    );
    if rep.kind == ProgressKind::Json {
        rep.json(serde_json::json!({"event": "summary", "summary": &summary}));
    }
    if let Some(path) = &batch.report {
        let text = serde_json::to_string_pretty(&serde_json::json!({"cases": entries, "summary": &summary}))? + "\n";
        let pending = crate::atomic::Pending::beside(path);
        std::fs::write(pending.path(), text)
            .and_then(|_| pending.commit())
            .map_err(|e| anyhow::anyhow!("cannot write the report {}: {e}", path.display()))?;
    }
    if summary.failed > 0 {
        bail!("{} of {} case(s) failed", summary.failed, summary.cases);
    }
    Ok(())
}

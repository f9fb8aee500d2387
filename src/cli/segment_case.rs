//! One case of `desam segment`, shared by the single-input form and batches: what the paths mean,
//! reading the input, the model loaded on first use, writing the mask and report, progress output.

use anyhow::Context;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::engine::{
    Cleanup3d, EngineError, EngineOptions, Progress, SegmentRequest, SegmentationResult, Segmenter, Stage,
};
use crate::volume::Volume;

/// What can be wrong with the command line, or with one case's paths, before any work starts.
#[derive(Debug, thiserror::Error)]
pub enum SegmentCliError {
    #[error("input {0} does not exist")]
    MissingInput(PathBuf),
    #[error("input {0} is neither a DICOM series folder nor a .nii/.nii.gz file")]
    UnknownInput(PathBuf),
    #[error("output {0} must end in .dcm (DICOM-SEG) or .nii/.nii.gz (NIfTI mask)")]
    UnknownOutput(PathBuf),
    #[error("a DICOM-SEG output (.dcm) needs a DICOM series as input, not a NIfTI file; write a .nii.gz mask instead")]
    SegNeedsDicom,
    #[error("output {0} would overwrite the input")]
    OverwritesInput(PathBuf),
    #[error("no model given and none installed: pass --model DIR or set DESAM_MODEL (looked in: {})", .0.join(", "))]
    NoModel(Vec<String>),
    #[error("{0}")]
    BadOption(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Dicom,
    Nifti,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    Seg,
    Nifti,
}

impl OutputKind {
    /// The file name ending a batch gives this kind of output.
    pub fn extension(self) -> &'static str {
        match self {
            OutputKind::Seg => "dcm",
            OutputKind::Nifti => "nii.gz",
        }
    }
}

pub fn is_nifti(p: &Path) -> bool {
    let s = p.to_string_lossy().to_ascii_lowercase();
    s.ends_with(".nii") || s.ends_with(".nii.gz")
}

/// The output kind a file name asks for (`.dcm`, `.nii`, `.nii.gz`), if any.
pub fn output_kind_of(p: &Path) -> Option<OutputKind> {
    if p.to_string_lossy().to_ascii_lowercase().ends_with(".dcm") {
        Some(OutputKind::Seg)
    } else if is_nifti(p) {
        Some(OutputKind::Nifti)
    } else {
        None
    }
}

/// The input's kind (a folder is a DICOM series).
pub fn input_kind_of(input: &Path) -> Result<InputKind, SegmentCliError> {
    if !input.exists() {
        Err(SegmentCliError::MissingInput(input.to_path_buf()))
    } else if input.is_dir() {
        Ok(InputKind::Dicom)
    } else if is_nifti(input) {
        Ok(InputKind::Nifti)
    } else {
        Err(SegmentCliError::UnknownInput(input.to_path_buf()))
    }
}

/// The kinds of one case's input and output, refusing impossible pairs and writing over the input.
pub fn classify(input: &Path, output: &Path) -> Result<(InputKind, OutputKind), SegmentCliError> {
    let input_kind = input_kind_of(input)?;
    let output_kind = output_kind_of(output).ok_or_else(|| SegmentCliError::UnknownOutput(output.to_path_buf()))?;
    if input_kind == InputKind::Nifti && output_kind == OutputKind::Seg {
        return Err(SegmentCliError::SegNeedsDicom);
    }
    let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y || (input_kind == InputKind::Dicom && y.starts_with(&x) && b.exists()),
        _ => false,
    };
    if same(input, output) {
        return Err(SegmentCliError::OverwritesInput(output.to_path_buf()));
    }
    Ok((input_kind, output_kind))
}

/// Parse `none`, `largest`, `min:<mL>` (a clap value parser: a bad value is a usage error).
pub fn parse_cleanup(s: &str) -> Result<Cleanup3d, String> {
    match s {
        "none" => Ok(Cleanup3d::None),
        "largest" => Ok(Cleanup3d::KeepLargest),
        _ => s
            .strip_prefix("min:")
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(|ml| Cleanup3d::MinVolume { ml })
            .ok_or_else(|| format!("{s:?}: expected none, largest or min:<mL>")),
    }
}

/// `--progress`: where stage progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressKind {
    /// A bar on stderr (the default on a terminal).
    Bar,
    /// One JSON object per line on stdout (3D Slicer reads these).
    Json,
    /// Nothing.
    None,
}

/// Progress reporting to a terminal bar, JSON lines on stdout, or nowhere.
pub struct Reporter {
    pub kind: ProgressKind,
    bar: Option<indicatif::ProgressBar>,
    stage: Option<Stage>,
}

impl Reporter {
    pub fn new(kind: ProgressKind) -> Self {
        Reporter { kind, bar: None, stage: None }
    }

    pub fn json(&self, v: serde_json::Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    }

    pub fn event(&mut self, p: Progress) {
        match self.kind {
            ProgressKind::None => {}
            ProgressKind::Json => self
                .json(serde_json::json!({"event": "stage", "stage": p.stage.name(), "done": p.done, "total": p.total})),
            ProgressKind::Bar => {
                if self.stage != Some(p.stage) {
                    if let Some(b) = self.bar.take() {
                        b.finish_and_clear();
                    }
                    let b = indicatif::ProgressBar::new(p.total as u64);
                    b.set_style(
                        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {elapsed}")
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                            .progress_chars("=> "),
                    );
                    b.set_message(p.stage.name());
                    self.bar = Some(b);
                    self.stage = Some(p.stage);
                }
                if let Some(b) = &self.bar {
                    b.set_length(p.total as u64);
                    b.set_position(p.done as u64);
                }
            }
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        self.stage = None;
    }
}

/// The report: the engine's result (minus the mask) plus what the command did.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    pub input: String,
    pub output: String,
    pub load_s: f64,
    pub write_s: f64,
    pub warnings: Vec<String>,
    #[serde(flatten)]
    pub result: &'a SegmentationResult,
}

/// One paragraph for a human.
pub fn summary(r: &SegmentationResult, io_s: f64) -> String {
    let untrained = if r.model.untrained { " (UNTRAINED placeholder model: the mask is meaningless)" } else { "" };
    format!(
        "Segmented {} slices in {:.1} s ({:.1} s inference) on {}, {} mode: prostate volume {:.1} mL, quality {:.2}{}; model {} {}{}.",
        r.slice_iou.len(),
        r.timings.total_s + io_s,
        r.timings.total_s,
        r.device,
        r.mode.name(),
        r.volume_ml,
        r.quality,
        if r.flagged { " — FLAGGED for review" } else { " (ok)" },
        r.model.name,
        r.model.version,
        untrained
    )
}

/// The model directory and engine options, loaded into a `Segmenter` on first use and kept: a batch
/// loads its model once, a single case only after its input has been read.
pub struct ModelSlot {
    dir: PathBuf,
    options: EngineOptions,
    loaded: Option<Segmenter>,
    /// Seconds spent loading (0 until loaded).
    pub load_s: f64,
    /// Times the model was loaded (a batch's summary shows it stays 1).
    pub loads: usize,
}

impl ModelSlot {
    pub fn new(dir: PathBuf, options: EngineOptions) -> Self {
        ModelSlot { dir, options, loaded: None, load_s: 0.0, loads: 0 }
    }

    pub fn get(&mut self) -> Result<&Segmenter, EngineError> {
        if self.loaded.is_none() {
            let t = Instant::now();
            self.loaded = Some(Segmenter::from_model_dir(&self.dir, self.options.clone())?);
            self.load_s = t.elapsed().as_secs_f64();
            self.loads += 1;
        }
        Ok(self.loaded.as_ref().expect("loaded above"))
    }
}

/// What one segmented case gives back.
pub struct CaseOutcome {
    pub result: SegmentationResult,
    /// The report (as written to `--report`), for JSON progress and batch reports.
    pub report: serde_json::Value,
    /// Seconds reading the input and writing the outputs.
    pub io_s: f64,
}

/// Reads one case, segments it with the slot's model and writes its mask (and report, if a path is
/// given): both to temporary files renamed only when both exist, so a failure (disk full, a bad
/// path) leaves neither a partial file nor a SEG without its report.
pub fn segment_case(
    input: &Path,
    output: &Path,
    report_path: Option<&Path>,
    model: &mut ModelSlot,
    request: &SegmentRequest,
    rep: &mut Reporter,
) -> anyhow::Result<CaseOutcome> {
    let (input_kind, output_kind) = classify(input, output)?;
    let t = Instant::now();
    rep.event(Progress { stage: Stage::Load, done: 0, total: 1 });
    let (volume, warnings) = load_input(input, input_kind)?;
    let load_s = t.elapsed().as_secs_f64();
    rep.event(Progress { stage: Stage::Load, done: 1, total: 1 });

    let segmenter = model.get()?;
    let result = segmenter.segment(&volume, request, &mut |p| rep.event(p))?;

    let t = Instant::now();
    rep.event(Progress { stage: Stage::Write, done: 0, total: 1 });
    let pending_output = write_output(output, output_kind, &volume, &result)?;
    let write_s = t.elapsed().as_secs_f64();
    let report = Report {
        input: input.display().to_string(),
        output: output.display().to_string(),
        load_s,
        write_s,
        warnings,
        result: &result,
    };
    let report = serde_json::to_value(&report).context("serialising the report")?;
    let pending_report = match report_path {
        Some(path) => {
            let p = crate::atomic::Pending::beside(path);
            std::fs::write(p.path(), serde_json::to_string_pretty(&report)? + "\n")
                .with_context(|| format!("cannot write the report {}", path.display()))?;
            Some((p, path))
        }
        None => None,
    };
    pending_output.commit().with_context(|| format!("cannot write {}", output.display()))?;
    if let Some((p, path)) = pending_report {
        p.commit().with_context(|| format!("cannot write the report {}", path.display()))?;
    }
    rep.event(Progress { stage: Stage::Write, done: 1, total: 1 });
    rep.finish();
    Ok(CaseOutcome { result, report, io_s: load_s + write_s })
}

fn load_input(path: &Path, kind: InputKind) -> anyhow::Result<(Volume, Vec<String>)> {
    match kind {
        InputKind::Nifti => Ok((crate::nifti::read_nifti(path)?, Vec::new())),
        InputKind::Dicom => {
            let loaded = crate::dicom::load_series_dir(path)?;
            Ok((loaded.volume, loaded.warnings))
        }
    }
}

/// The output written to a temporary file beside `path` (renamed into place by the caller).
fn write_output(
    path: &Path,
    kind: OutputKind,
    volume: &Volume,
    r: &SegmentationResult,
) -> anyhow::Result<crate::atomic::Pending> {
    let pending = crate::atomic::Pending::beside(path);
    let written = match kind {
        OutputKind::Nifti => {
            crate::nifti::write_nifti_mask(pending.path(), &r.mask, volume).map_err(anyhow::Error::from)
        }
        OutputKind::Seg => {
            use crate::dicom::{write_seg, SegOptions, Segment, SegmentInfo};
            let id = &r.model;
            let mut opts =
                SegOptions::new(&id.name, &format!("{} {}", id.version, &id.sha256[..12.min(id.sha256.len())]));
            opts.quality_score = Some(r.quality);
            opts.gland_volume_ml = Some(r.volume_ml);
            let seg = [Segment { info: SegmentInfo::prostate(&id.name), mask: &r.mask }];
            write_seg(volume, &seg, &opts)
                .map_err(anyhow::Error::from)
                .and_then(|bytes| std::fs::write(pending.path(), bytes).map_err(anyhow::Error::from))
        }
    };
    written.with_context(|| format!("cannot write {}", path.display()))?;
    Ok(pending)
}

//! `desam segment`: read a DICOM series or NIfTI, run the engine, write a DICOM-SEG or NIfTI mask,
//! a JSON report and progress (bar, JSON lines for 3D Slicer, or none). Never writes over its input.

use anyhow::Context;
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use crate::engine::{
    Cleanup3d, DeviceChoice, EngineOptions, Mode, Progress, SegmentRequest, SegmentationResult, Segmenter, Stage,
};
use crate::volume::Volume;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A DICOM series folder, or a .nii / .nii.gz volume.
    pub input: PathBuf,
    /// Model directory (model.json + weights); default: $DESAM_MODEL.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output: a DICOM-SEG `.dcm` (DICOM input only) or a NIfTI mask `.nii` / `.nii.gz`.
    #[arg(short, long)]
    pub output: PathBuf,
    /// box (one whole-image box per slice) or grid (9×9 points + filters); default: the model's.
    #[arg(long)]
    pub mode: Option<String>,
    /// Also run the other mode and use the agreement in the quality score.
    #[arg(long)]
    pub compare_modes: bool,
    /// Full JSON report (everything but the mask).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// CPU threads for libtorch.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Compute dtype: f32, f16 or bf16 (default: f16 on CUDA; on CPU bf16 where it has native bf16
    /// instructions, else f32).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Slices per encoder batch / prompts per decoder batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// bar (default on a terminal), json (one JSON object per line on stdout) or none.
    #[arg(long)]
    pub progress: Option<String>,
    /// Feature cache directory (a re-run or second mode then costs only the decoder).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// 3-D clean-up: none, largest, or min:<mL> (default: the model's).
    #[arg(long)]
    pub cleanup_3d: Option<String>,
}

/// What can be wrong with the command line before any work starts.
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
    #[error("no model given: pass --model DIR or set DESAM_MODEL")]
    NoModel,
    #[error("{0}")]
    BadOption(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputKind {
    Dicom,
    Nifti,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutputKind {
    Seg,
    Nifti,
}

fn is_nifti(p: &Path) -> bool {
    let s = p.to_string_lossy().to_ascii_lowercase();
    s.ends_with(".nii") || s.ends_with(".nii.gz")
}

fn classify(args: &Args) -> Result<(InputKind, OutputKind), SegmentCliError> {
    if !args.input.exists() {
        return Err(SegmentCliError::MissingInput(args.input.clone()));
    }
    let input = if args.input.is_dir() {
        InputKind::Dicom
    } else if is_nifti(&args.input) {
        InputKind::Nifti
    } else {
        return Err(SegmentCliError::UnknownInput(args.input.clone()));
    };
    let output = if args.output.to_string_lossy().to_ascii_lowercase().ends_with(".dcm") {
        OutputKind::Seg
    } else if is_nifti(&args.output) {
        OutputKind::Nifti
    } else {
        return Err(SegmentCliError::UnknownOutput(args.output.clone()));
    };
    if input == InputKind::Nifti && output == OutputKind::Seg {
        return Err(SegmentCliError::SegNeedsDicom);
    }
    let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y || (input == InputKind::Dicom && y.starts_with(&x) && b.exists()),
        _ => false,
    };
    if same(&args.input, &args.output) {
        return Err(SegmentCliError::OverwritesInput(args.output.clone()));
    }
    Ok((input, output))
}

/// Parse `f32`, `f16`, `bf16`.
pub fn parse_dtype(s: &str) -> Result<tch::Kind, String> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float" | "float32" => Ok(tch::Kind::Float),
        "f16" | "half" | "float16" => Ok(tch::Kind::Half),
        "bf16" | "bfloat16" => Ok(tch::Kind::BFloat16),
        _ => Err(format!("--dtype {s:?}: expected f32, f16 or bf16")),
    }
}

/// Parse `none`, `largest`, `min:<mL>`.
pub fn parse_cleanup(s: &str) -> Result<Cleanup3d, String> {
    match s {
        "none" => Ok(Cleanup3d::None),
        "largest" => Ok(Cleanup3d::KeepLargest),
        _ => s
            .strip_prefix("min:")
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(|ml| Cleanup3d::MinVolume { ml })
            .ok_or_else(|| format!("--cleanup-3d {s:?}: expected none, largest or min:<mL>")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProgressKind {
    Bar,
    Json,
    None,
}

/// Progress reporting to a terminal bar, JSON lines on stdout, or nowhere.
struct Reporter {
    kind: ProgressKind,
    bar: Option<indicatif::ProgressBar>,
    stage: Option<Stage>,
}

impl Reporter {
    fn new(kind: ProgressKind) -> Self {
        Reporter { kind, bar: None, stage: None }
    }

    fn json(&self, v: serde_json::Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    }

    fn event(&mut self, p: Progress) {
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

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
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

pub fn run(args: Args) -> anyhow::Result<()> {
    let progress_kind = match args.progress.as_deref() {
        None if std::io::stderr().is_terminal() => ProgressKind::Bar,
        None | Some("none") => ProgressKind::None,
        Some("bar") => ProgressKind::Bar,
        Some("json") => ProgressKind::Json,
        Some(other) => {
            anyhow::bail!(SegmentCliError::BadOption(format!("--progress {other:?}: expected bar, json or none")))
        }
    };
    let mut rep = Reporter::new(progress_kind);
    let result = run_inner(&args, &mut rep);
    rep.finish();
    if let Err(e) = &result {
        if progress_kind == ProgressKind::Json {
            let msg = e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ").replace('\n', " ");
            rep.json(serde_json::json!({"event": "error", "message": msg}));
        }
    }
    result
}

fn run_inner(args: &Args, rep: &mut Reporter) -> anyhow::Result<()> {
    let (input_kind, output_kind) = classify(args)?;
    let mode = args.mode.as_deref().map(str::parse::<Mode>).transpose().map_err(SegmentCliError::BadOption)?;
    let device: DeviceChoice = args.device.parse().map_err(SegmentCliError::BadOption)?;
    let dtype = args.dtype.as_deref().map(parse_dtype).transpose().map_err(SegmentCliError::BadOption)?;
    let cleanup = args.cleanup_3d.as_deref().map(parse_cleanup).transpose().map_err(SegmentCliError::BadOption)?;
    let model_dir = args
        .model
        .clone()
        .or_else(|| std::env::var_os("DESAM_MODEL").map(PathBuf::from))
        .ok_or(SegmentCliError::NoModel)?;

    let t = std::time::Instant::now();
    rep.event(Progress { stage: Stage::Load, done: 0, total: 1 });
    let (volume, warnings) = load_input(&args.input, input_kind)?;
    let load_s = t.elapsed().as_secs_f64();
    rep.event(Progress { stage: Stage::Load, done: 1, total: 1 });

    let opts = EngineOptions {
        device,
        threads: args.threads,
        dtype,
        batch_size: args.batch_size,
        cache_dir: args.cache.clone(),
    };
    let segmenter = Segmenter::from_model_dir(&model_dir, opts)?;
    let req = SegmentRequest { mode, compare_modes: args.compare_modes, cleanup_3d: cleanup, ..Default::default() };
    let result = segmenter.segment(&volume, &req, &mut |p| rep.event(p))?;

    let t = std::time::Instant::now();
    rep.event(Progress { stage: Stage::Write, done: 0, total: 1 });
    // Both outputs are written to temporary files first and renamed only when both exist, so a
    // failure (disk full, a bad path) leaves neither a partial file nor a SEG without its report.
    let output = write_output(&args.output, output_kind, &volume, &result)?;
    let write_s = t.elapsed().as_secs_f64();

    let report = Report {
        input: args.input.display().to_string(),
        output: args.output.display().to_string(),
        load_s,
        write_s,
        warnings,
        result: &result,
    };
    let report_json = serde_json::to_value(&report).context("serialising the report")?;
    let report_file = match &args.report {
        Some(path) => {
            let p = crate::atomic::Pending::beside(path);
            std::fs::write(p.path(), serde_json::to_string_pretty(&report_json)? + "\n")
                .with_context(|| format!("cannot write the report {}", path.display()))?;
            Some(p)
        }
        None => None,
    };
    output.commit().with_context(|| format!("cannot write {}", args.output.display()))?;
    if let (Some(p), Some(path)) = (report_file, &args.report) {
        p.commit().with_context(|| format!("cannot write the report {}", path.display()))?;
    }
    rep.event(Progress { stage: Stage::Write, done: 1, total: 1 });
    rep.finish();
    if rep.kind == ProgressKind::Json {
        rep.json(serde_json::json!({"event": "done", "report": report_json}));
    }
    eprintln!("{}", summary(&result, load_s + write_s));
    Ok(())
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

fn load_input(path: &Path, kind: InputKind) -> anyhow::Result<(Volume, Vec<String>)> {
    match kind {
        InputKind::Nifti => Ok((crate::nifti::read_nifti(path)?, Vec::new())),
        InputKind::Dicom => load_dicom_series(path),
    }
}

fn load_dicom_series(dir: &Path) -> anyhow::Result<(Volume, Vec<String>)> {
    let loaded = crate::dicom::load_series_dir(dir)?;
    Ok((loaded.volume, loaded.warnings))
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

//! `desam segment`: read DICOM series or NIfTI volumes, run the engine, write DICOM-SEG or NIfTI masks,
//! JSON reports and progress (bar, JSON lines for 3D Slicer, or none). Never writes over its input.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;

use super::segment_batch::{self, Batch, OutputFormat};
use super::segment_case::{self, ModelSlot, ProgressKind, Reporter, SegmentCliError};
use super::values::DeviceParser;
use crate::engine::{Cleanup3d, DeviceChoice, Dtype, EngineOptions, Mode, SegmentRequest};

#[derive(clap::Args, Debug)]
#[command(after_help = "One case: desam segment INPUT -o OUTPUT.{dcm,nii,nii.gz}\n\
Batch (one model load): desam segment INPUT INPUT… -o OUTDIR, or desam segment -i DIR -o OUTDIR")]
pub struct Args {
    /// A DICOM series folder or a .nii / .nii.gz volume; several make a batch.
    #[arg(value_name = "INPUT", required_unless_present = "input_dir")]
    pub inputs: Vec<PathBuf>,
    /// Batch: every case under DIR (folders holding DICOM files, and .nii / .nii.gz files).
    #[arg(short = 'i', long, value_name = "DIR")]
    pub input_dir: Option<PathBuf>,
    /// Model directory (model.json + weights); default: $DESAM_MODEL, then ../share/desam/models/default
    /// beside this program, then /usr/share/desam/models/default.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// One case: a DICOM-SEG `.dcm` (DICOM input only) or a NIfTI mask `.nii` / `.nii.gz`.
    /// A batch: a folder (created if missing) that gets one output per case.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Batch: the outputs' format; auto gives DICOM-SEG for DICOM series and NIfTI for NIfTI volumes.
    #[arg(long, value_enum)]
    pub output_format: Option<OutputFormat>,
    /// box (one whole-image box per slice) or grid (9×9 points + filters); default: the model's.
    #[arg(long, value_enum, ignore_case = true)]
    pub mode: Option<Mode>,
    /// Also run the other mode and use the agreement in the quality score.
    #[arg(long)]
    pub compare_modes: bool,
    /// Full JSON report (everything but the mask); for a batch, one file with every case and the summary.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Where to run.
    #[arg(long, default_value = "auto", value_parser = DeviceParser)]
    pub device: DeviceChoice,
    /// CPU threads for libtorch.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Compute dtype (default: f16 on CUDA; on CPU bf16 where it has native bf16 instructions, else f32).
    #[arg(long, value_enum, ignore_case = true)]
    pub dtype: Option<Dtype>,
    /// Slices per encoder batch / prompts per decoder batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Progress output (default: bar on a terminal, else none).
    #[arg(long, value_enum)]
    pub progress: Option<ProgressKind>,
    /// Feature cache directory (a re-run or second mode then costs only the decoder).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// 3-D clean-up: none, largest, or min:<mL> (default: the model's).
    #[arg(long, value_name = "none|largest|min:<mL>", value_parser = segment_case::parse_cleanup)]
    pub cleanup_3d: Option<Cleanup3d>,
}

impl Args {
    /// Several inputs or an input folder: a batch into the folder -o.
    fn is_batch(&self) -> bool {
        self.input_dir.is_some() || self.inputs.len() > 1
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let progress = match args.progress {
        Some(kind) => kind,
        None if std::io::stderr().is_terminal() => ProgressKind::Bar,
        None => ProgressKind::None,
    };
    let mut rep = Reporter::new(progress);
    let result = if args.is_batch() { run_batch(&args, &mut rep) } else { run_single(&args, &mut rep) };
    rep.finish();
    if let Err(e) = &result {
        if progress == ProgressKind::Json {
            let msg = e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ").replace('\n', " ");
            rep.json(serde_json::json!({"event": "error", "message": msg}));
        }
    }
    result
}

fn model_slot(args: &Args) -> Result<ModelSlot, SegmentCliError> {
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => default_model_dir(std::env::var_os("DESAM_MODEL"), std::env::current_exe().ok())?,
    };
    let options = EngineOptions {
        device: args.device,
        threads: args.threads,
        dtype: args.dtype.map(Dtype::kind),
        batch_size: args.batch_size,
        cache_dir: args.cache.clone(),
    };
    Ok(ModelSlot::new(dir, options))
}

/// Where an installed model lies when `--model` is not given: `$DESAM_MODEL` (taken as given: an
/// explicit choice never falls through to another model), then the relocatable bundle's
/// `../share/desam/models/default` beside the binary, then the Debian package's. The error lists each place.
fn default_model_dir(env: Option<OsString>, exe: Option<PathBuf>) -> Result<PathBuf, SegmentCliError> {
    if let Some(dir) = env.filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let mut looked = vec!["$DESAM_MODEL (unset)".to_string()];
    let beside_binary =
        exe.and_then(|exe| exe.parent().map(|bin| bin.join("../share/desam/models/default"))).into_iter();
    for dir in beside_binary.chain(std::iter::once(PathBuf::from(SYSTEM_MODEL_DIR))) {
        if dir.join("model.json").is_file() {
            return Ok(dir);
        }
        looked.push(dir.display().to_string());
    }
    Err(SegmentCliError::NoModel(looked))
}

/// The Debian package's model (and the Orthanc plugin's default `ModelDirectory`).
const SYSTEM_MODEL_DIR: &str = "/usr/share/desam/models/default";

fn request(args: &Args) -> SegmentRequest {
    SegmentRequest {
        mode: args.mode,
        compare_modes: args.compare_modes,
        cleanup_3d: args.cleanup_3d,
        ..Default::default()
    }
}

fn run_single(args: &Args, rep: &mut Reporter) -> anyhow::Result<()> {
    let input = &args.inputs[0];
    if args.output_format.is_some() {
        anyhow::bail!(SegmentCliError::BadOption(
            "--output-format is for batches; one case's format is the ending of -o".into()
        ));
    }
    // Path errors come before a missing model, as they always have.
    segment_case::classify(input, &args.output)?;
    let mut model = model_slot(args)?;
    let outcome =
        segment_case::segment_case(input, &args.output, args.report.as_deref(), &mut model, &request(args), rep)?;
    if rep.kind == ProgressKind::Json {
        rep.json(serde_json::json!({"event": "done", "report": outcome.report}));
    }
    eprintln!("{}", segment_case::summary(&outcome.result, outcome.io_s));
    Ok(())
}

fn run_batch(args: &Args, rep: &mut Reporter) -> anyhow::Result<()> {
    let cases = segment_batch::find_cases(&args.inputs, args.input_dir.as_deref(), &args.output)?;
    let batch = Batch {
        cases,
        out_dir: args.output.clone(),
        format: args.output_format.unwrap_or(OutputFormat::Auto),
        report: args.report.clone(),
        request: request(args),
    };
    segment_batch::run(&batch, model_slot(args)?, rep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn desam_model_wins_and_is_taken_as_given() {
        let got = default_model_dir(Some("/nowhere/model".into()), Some("/opt/x/bin/desam".into())).unwrap();
        assert_eq!(got, PathBuf::from("/nowhere/model"));
    }

    #[test]
    fn the_bundle_beside_the_binary_is_found() {
        let root = std::env::temp_dir().join(format!("desam-model-lookup-{}", std::process::id()));
        let model = root.join("share/desam/models/default");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(model.join("model.json"), "{}").unwrap();
        let got = default_model_dir(None, Some(root.join("bin/desam"))).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(got, root.join("bin/../share/desam/models/default"));
    }

    #[test]
    fn the_error_names_every_place_looked() {
        if Path::new(SYSTEM_MODEL_DIR).join("model.json").is_file() {
            // A machine with the Debian package installed finds it.
            let got = default_model_dir(None, Some("/nowhere/bin/desam".into())).unwrap();
            assert_eq!(got, PathBuf::from(SYSTEM_MODEL_DIR));
            return;
        }
        let err = default_model_dir(Some("".into()), Some("/nowhere/bin/desam".into())).unwrap_err().to_string();
        for place in ["$DESAM_MODEL", "/nowhere/bin/../share/desam/models/default", SYSTEM_MODEL_DIR] {
            assert!(err.contains(place), "{err}");
        }
    }
}

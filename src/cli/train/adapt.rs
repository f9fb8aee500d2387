//! `desam-train adapt`: arguments and printing for the one-command adaptation (pull reviewed cases,
//! fine-tune the registry's current model, gate, promote); the work is in `crate::train::adapt`.

use std::path::PathBuf;

use crate::cli::overlay::{self, OverlayPanel};
use crate::cli::values::DeviceParser;
use crate::engine::DeviceChoice;
use crate::raster::Rgb;
use crate::train::adapt::{self, AdaptOutcome, Gate, Schedule, WorstCase};
use crate::train::pull;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Orthanc's REST API, http://HOST:PORT or https://HOST:PORT. Only read (GET, POST /tools/lookup).
    #[arg(long)]
    pub orthanc: String,
    #[command(flatten)]
    pub login: super::OrthancLogin,
    /// User-metadata index of the review mark on SEG series (the plugin's ReviewMetadata).
    #[arg(long, default_value_t = 4302)]
    pub review_metadata: u16,
    /// The value that marks a SEG series as reviewed ground truth (set by a person).
    #[arg(long, default_value = "reviewed")]
    pub reviewed_value: String,
    /// DICOM attribute (keyword) of the MR series that names its site (for the report).
    #[arg(long, default_value = "InstitutionName", conflicts_with = "site")]
    pub site_tag: String,
    /// The same site for every pulled case instead of --site-tag.
    #[arg(long)]
    pub site: Option<String>,
    /// Model registry (REG/versions/<V>, REG/current.json): its current version is fine-tuned.
    #[arg(long)]
    pub registry: PathBuf,
    /// Work folder: new or empty, or an earlier adapt's (it continues where it stopped).
    #[arg(long)]
    pub work: PathBuf,
    /// Version name of the candidate (default: <current>-adapt-<UTC time>).
    #[arg(long)]
    pub version: Option<String>,
    /// Promote only if the candidate's mean check Dice beats the current model's by at least this
    /// (may be negative).
    #[arg(long, default_value_t = 0.01, allow_negative_numbers = true)]
    pub min_gain: f64,
    /// ... and no check case loses more Dice than this.
    #[arg(long, default_value_t = 0.05)]
    pub max_case_drop: f64,
    /// Fine-tuning epochs over the fit cases (poly-decayed learning rate).
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    /// Train on every k-th foreground slice of a fit case.
    #[arg(long, default_value_t = 1)]
    pub slice_stride: usize,
    /// Slices without gland up to this many beyond the gland's first and last slice also train
    /// (target: empty), so the candidate keeps stopping at the apex and base (0: gland slices only).
    #[arg(long, default_value_t = 3)]
    pub background_margin: usize,
    /// Decoder parts kept fixed, comma-separated (see `desam-train fit --freeze`); "none" trains
    /// the whole decoder. The default keeps PIMM's two encoder-only high-resolution branches,
    /// which takes their backward pass (about a third of a step on a CPU) out of every fit.
    #[arg(long, value_delimiter = ',', default_value = "pimm.conv_blocks_context.1,pimm.conv_blocks_context.2")]
    pub freeze: Vec<String>,
    /// k of the k-fold split used with fewer than --holdout-from cases.
    #[arg(long, default_value_t = 2)]
    pub folds: usize,
    /// From this many cases on, one hold-out split (a quarter of the cases check) instead of k-fold.
    #[arg(long, default_value_t = 8)]
    pub holdout_from: usize,
    /// Seed of the split and of the fine-tuning.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to run.
    #[arg(long, default_value = "auto", value_parser = DeviceParser)]
    pub device: DeviceChoice,
    #[arg(long)]
    pub threads: Option<usize>,
    /// Stop after this many steps have finished in this call (rerun with the same --work to continue).
    #[arg(long)]
    pub stop_after_steps: Option<usize>,
}

/// Left: the current model, right: the candidate; each with its Dice on this case.
fn render_worst_case(w: &WorstCase) -> Rgb {
    let panel = |predicted: &[u8], dice: f64| OverlayPanel {
        image: w.image.clone(),
        truth: w.truth.clone(),
        predicted: predicted.to_vec(),
        nx: w.nx,
        ny: w.ny,
        spacing: w.spacing,
        label: format!("{dice:.3}"),
    };
    overlay::render(&[panel(&w.before, w.dice_before), panel(&w.after, w.dice_after)], 320)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut p = pull::PullOptions::new(&a.orthanc, &a.work.join("data"));
    p.connection = a.login.connection(a.orthanc)?;
    p.review_metadata = a.review_metadata;
    p.reviewed_value = a.reviewed_value;
    p.site = match a.site {
        Some(s) => pull::SiteFrom::Fixed(s),
        None => pull::SiteFrom::Tag(a.site_tag),
    };
    p.progress = true;
    let outcome = adapt::adapt(&adapt::AdaptOptions {
        pull: p,
        registry: a.registry,
        work: a.work.clone(),
        version: a.version,
        gate: Gate { min_gain: a.min_gain, max_case_drop: a.max_case_drop },
        schedule: Schedule {
            epochs: a.epochs,
            batch: a.batch,
            lr: a.lr,
            slice_stride: a.slice_stride,
            background_margin: a.background_margin,
            freeze: a.freeze.into_iter().filter(|f| f != "none" && !f.is_empty()).collect(),
        },
        folds: a.folds,
        holdout_from: a.holdout_from,
        seed: a.seed,
        device: a.device,
        threads: a.threads,
        stop_after_steps: a.stop_after_steps,
        progress: true,
        render_overlay: Some(render_worst_case),
    })?;
    match outcome {
        AdaptOutcome::Stopped { finished_steps } => {
            println!(
                "stopped after --stop-after-steps; finished so far: {}. Run the same command again to continue.",
                finished_steps.join(", ")
            );
        }
        AdaptOutcome::Finished(report) => {
            println!("{}", adapt::markdown(&report));
            println!(
                "report: {} and {}",
                a.work.join(adapt::REPORT_MD).display(),
                a.work.join(adapt::REPORT_JSON).display()
            );
        }
    }
    Ok(())
}

//! `desam-train`: precompute embeddings, train the decoder, evaluate across sites, export models.
//! Argument handling only; the work is in `desam::train`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use desam::engine::DeviceChoice;
use desam::train::{fit, precompute};

#[derive(Parser, Debug)]
#[command(name = "desam-train", version, about = "Train and evaluate DeSAM decoders (nnU-Net-like workflow)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the frozen encoder once per slice and store f16 features + labels (resumable).
    Precompute(PrecomputeArgs),
    /// Train PRIM + PIMM (or the coupled SAM head) on precomputed features of one site.
    Fit(FitArgs),
    /// Segment every case of the given sites with the real engine and score it (Dice, HD95, official metric).
    Eval(EvalArgs),
    /// Score a run's best checkpoint (either head) on a precomputed store of target sites (box prompt).
    EvalRun(EvalRunArgs),
    /// Export a run as an immutable, versioned model directory.
    Export(ExportArgs),
    /// Make a version of a registry current (REG/versions/<V>; REG/current.json + REG/current symlink).
    Promote(PromoteArgs),
    /// Make the previously current version of a registry current again.
    Rollback(RollbackArgs),
    /// Copy reviewed DICOM-SEGs and their MR series from Orthanc into a DICOM training folder (resumable).
    Pull(PullArgs),
}

#[derive(clap::Args, Debug)]
struct PrecomputeArgs {
    /// Dataset: nnU-Net folder (imagesTr, labelsTr, prostate_patientid.csv) or DICOM case folders.
    #[arg(long)]
    data: PathBuf,
    /// Architecture of --checkpoint (lite, vit_b, vit_l, vit_h, tiny).
    #[arg(long)]
    arch: Option<String>,
    /// Official checkpoint (lite_medsam.pth, sam_vit_b.pth): converted into OUT/base_model.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Or an existing model directory whose encoder (and decoder, as the training start) to use.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    /// Store every slice (for evaluation), not only slices with foreground.
    #[arg(long)]
    all_slices: bool,
    /// Only these sites, e.g. A or B,C.
    #[arg(long)]
    sites: Option<String>,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the randomly initialised PIMM in OUT/base_model (and of the augmentations).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also store this many intensity-augmented copies of every case (bias field incl. a
    /// coil-like bump, gamma, noise; docs/training.md). Training stores only.
    #[arg(long, default_value_t = 0)]
    augment: usize,
    /// Store every K-th foreground slice only (then fit with --slice-stride 1).
    #[arg(long, default_value_t = 1)]
    slice_stride: usize,
    /// Per-volume intensity clip "LOW,HIGH" in percentiles for the model being trained (default: the
    /// base model's; official 0.5,99.5). With --model, a copy with this clip goes to OUT/base_model.
    #[arg(long, value_parser = parse_clip)]
    clip_percentiles: Option<[f64; 2]>,
}

fn parse_clip(s: &str) -> Result<[f64; 2], String> {
    let v: Vec<f64> =
        s.split(',').map(|p| p.trim().parse::<f64>().map_err(|e| format!("{p:?}: {e}"))).collect::<Result<_, _>>()?;
    let clip: [f64; 2] = v.try_into().map_err(|_| "expected two percentiles, LOW,HIGH".to_string())?;
    desam::modeldir::check_clip_percentiles(clip)
}

#[derive(clap::Args, Debug)]
struct FitArgs {
    #[arg(long)]
    embeddings: PathBuf,
    /// box (DeSAM-B) or grid (DeSAM-P: one random point per sample).
    #[arg(long, default_value = "box")]
    mode: String,
    /// Source site to train on (its patients are split 90/10 into train/validation).
    #[arg(long)]
    site: String,
    #[arg(long, default_value_t = 50)]
    epochs: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// dice,bce,iou weights (official effective: 1,0,1; paper review: 1,1,10).
    #[arg(long, default_value = "1,1,1")]
    loss_weights: String,
    #[arg(long, default_value = "l1")]
    iou_loss: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// official (first 90% of patients train) or shuffle (seeded).
    #[arg(long, default_value = "official")]
    split: String,
    /// Use every k-th foreground slice of each training case.
    #[arg(long, default_value_t = 1)]
    slice_stride: usize,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    resume: bool,
    /// Stop after this many optimiser steps in total (saves checkpoint_latest; continue with --resume).
    #[arg(long)]
    max_steps: Option<u64>,
    /// `coupled`: fine-tune SAM's own mask head instead of PIMM (the MedSAM comparison row).
    #[arg(long)]
    baseline: Option<String>,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long)]
    threads: Option<usize>,
    /// Mixed precision on CUDA (autocast + dynamic loss scaling); ignored on CPU.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    amp: bool,
    #[arg(long, default_value_t = 25)]
    save_every: u64,
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args, Debug)]
struct EvalArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    /// Sites to evaluate, e.g. B,C,D,E,F.
    #[arg(long)]
    sites: String,
    /// box or grid (default: the model's).
    #[arg(long)]
    mode: Option<String>,
    /// Output folder for summary.json and summary.md; each case is also appended to cases.jsonl
    /// as it finishes.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue an interrupted evaluation in --out: cases already in its cases.jsonl are kept
    /// (only when model, mode, sites and case list are the same).
    #[arg(long, requires = "out")]
    resume: bool,
    /// Evaluate at most N cases per site.
    #[arg(long)]
    max_cases: Option<usize>,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(clap::Args, Debug)]
struct EvalRunArgs {
    #[arg(long)]
    run: PathBuf,
    /// Store of the target sites (`precompute` without --all-slices).
    #[arg(long)]
    embeddings: PathBuf,
    #[arg(long)]
    sites: String,
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    device: String,
    /// box or grid (the model's point grid + IoU filter/NMS, DeSAM-P's automatic mode); default: the
    /// run's training mode.
    #[arg(long)]
    mode: Option<desam::engine::Mode>,
    /// Score at most N cases per site (the first eligible ones in store order).
    #[arg(long)]
    max_cases: Option<usize>,
}

#[derive(clap::Args, Debug)]
struct ExportArgs {
    #[arg(long)]
    run: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "desam-lite-prostate")]
    name: String,
    #[arg(long, default_value = "0.1.0")]
    version: String,
    /// best or latest.
    #[arg(long, default_value = "best")]
    checkpoint: String,
    /// A summary.json of `desam-train eval` to record in model.json.
    #[arg(long)]
    eval: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct PromoteArgs {
    #[arg(long)]
    registry: PathBuf,
    #[arg(long)]
    version: String,
}

#[derive(clap::Args, Debug)]
struct RollbackArgs {
    #[arg(long)]
    registry: PathBuf,
}

#[derive(clap::Args, Debug)]
struct PullArgs {
    /// Orthanc's REST API, http://HOST:PORT or https://HOST:PORT. Only read (GET, POST /tools/lookup).
    #[arg(long)]
    orthanc: String,
    /// PEM file of a private CA trusted for https besides the system's roots (default: $DESAM_CA_FILE).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Output folder: new, empty, or an earlier pull's (complete cases are skipped).
    #[arg(long)]
    out: PathBuf,
    /// HTTP basic-authentication user.
    #[arg(long, requires = "password_env")]
    user: Option<String>,
    /// Name of the environment variable holding the password (never on the command line).
    #[arg(long, requires = "user")]
    password_env: Option<String>,
    /// User-metadata index of the review mark on SEG series (the plugin's ReviewMetadata).
    #[arg(long, default_value_t = 4302)]
    review_metadata: u16,
    /// The value that marks a SEG series as reviewed ground truth (set by a person).
    #[arg(long, default_value = "reviewed")]
    reviewed_value: String,
    /// DICOM attribute (keyword) of the MR series that names its site.
    #[arg(long, default_value = "InstitutionName", conflicts_with = "site")]
    site_tag: String,
    /// The same site for every pulled case instead of --site-tag.
    #[arg(long)]
    site: Option<String>,
}

fn run_pull(a: PullArgs) -> anyhow::Result<()> {
    let password = match &a.password_env {
        Some(var) => Some(
            std::env::var(var).with_context(|| format!("--password-env {var}: the environment variable is not set"))?,
        ),
        None => None,
    };
    let mut o = desam::train::pull::PullOptions::new(&a.orthanc, &a.out);
    o.ca_file = a.ca_file;
    o.user = a.user;
    o.password = password;
    o.review_metadata = a.review_metadata;
    o.reviewed_value = a.reviewed_value;
    o.site = match a.site {
        Some(s) => desam::train::pull::SiteFrom::Fixed(s),
        None => desam::train::pull::SiteFrom::Tag(a.site_tag),
    };
    o.progress = true;
    let r = desam::train::pull::pull(&o)?;
    println!(
        "pulled {} case(s), {} already up to date; {} has {} case(s) (manifest {})",
        r.pulled.len(),
        r.up_to_date.len(),
        a.out.display(),
        r.manifest.cases.len(),
        a.out.join(desam::train::pull::MANIFEST).display()
    );
    Ok(())
}

fn device_of(s: &str) -> anyhow::Result<tch::Device> {
    let d: DeviceChoice = s.parse().map_err(anyhow::Error::msg)?;
    Ok(match d {
        DeviceChoice::Cpu => tch::Device::Cpu,
        DeviceChoice::Cuda if tch::Cuda::is_available() => tch::Device::Cuda(0),
        DeviceChoice::Cuda => bail!("CUDA is not available"),
        DeviceChoice::Auto => tch::Device::cuda_if_available(),
    })
}

fn run_precompute(a: PrecomputeArgs) -> anyhow::Result<()> {
    let base = a.out.join("base_model");
    let model_dir = match (&a.model, &a.checkpoint) {
        (Some(m), None) => match a.clip_percentiles {
            Some(clip) if desam::modeldir::read_spec(m)?.preprocessing.clip_percentiles != clip => {
                if !base.join("model.json").is_file() {
                    desam::modeldir::derive_with_clip(m, &base, clip)?;
                } else if desam::modeldir::read_spec(&base)?.preprocessing.clip_percentiles != clip {
                    bail!("{} was made with another clip; use a new --out", base.display());
                }
                base
            }
            _ => m.clone(),
        },
        (None, Some(ckpt)) => {
            let arch: desam::model::Arch = a.arch.as_deref().context("--checkpoint needs --arch")?.parse()?;
            if !base.join("model.json").is_file() {
                std::fs::create_dir_all(&a.out)?;
                desam::modeldir::create_untrained_model_dir(
                    arch,
                    &base,
                    a.seed,
                    &desam::modeldir::BackboneSource::Convert(ckpt.clone()),
                )
                .with_context(|| format!("converting {}", ckpt.display()))?;
                if let Some(clip) = a.clip_percentiles {
                    let mut spec = desam::modeldir::read_spec(&base)?;
                    spec.preprocessing.clip_percentiles = clip;
                    desam::modeldir::write_spec(&base, &spec)?;
                }
            }
            base
        }
        _ => bail!("give exactly one of --model DIR or --checkpoint FILE (with --arch)"),
    };
    let opts = precompute::PrecomputeOptions {
        data: a.data,
        out: a.out,
        model_dir,
        all_slices: a.all_slices,
        sites: a.sites.as_deref().map(desam::train::data::parse_sites).unwrap_or_default(),
        device: a.device.parse().map_err(anyhow::Error::msg)?,
        threads: a.threads,
        batch: 2,
        progress: true,
        augment: a.augment,
        augment_seed: a.seed,
        slice_stride: a.slice_stride,
    };
    let idx = precompute::precompute(&opts)?;
    println!(
        "{} cases, {} slices, {:.1} MB per slice (f16), {:.2} slices/s, manifest {}",
        idx.cases.len(),
        idx.slices,
        idx.bytes_per_slice as f64 / 1e6,
        idx.slices_per_second,
        idx.manifest_hash
    );
    Ok(())
}

fn run_fit(a: FitArgs) -> anyhow::Result<()> {
    let coupled = match a.baseline.as_deref() {
        None => false,
        Some("coupled") => true,
        Some(o) => bail!("unknown --baseline {o:?} (only `coupled`)"),
    };
    let cfg = fit::FitConfig {
        embeddings: std::fs::canonicalize(&a.embeddings).with_context(|| format!("{}", a.embeddings.display()))?,
        mode: a.mode.parse().map_err(anyhow::Error::msg)?,
        site: a.site.trim().to_ascii_uppercase(),
        epochs: a.epochs,
        batch: a.batch,
        lr: a.lr,
        loss_weights: a.loss_weights.parse().map_err(anyhow::Error::msg)?,
        iou_loss: a.iou_loss.parse().map_err(anyhow::Error::msg)?,
        seed: a.seed,
        split: a.split.parse().map_err(anyhow::Error::msg)?,
        coupled,
        slice_stride: a.slice_stride.max(1),
        amp: a.amp,
        manifest_hash: String::new(),
    };
    let opts = fit::RunOptions {
        out: a.out,
        resume: a.resume,
        max_steps: a.max_steps,
        device: Some(device_of(&a.device)?),
        threads: a.threads,
        save_every: a.save_every,
        progress: !a.quiet,
    };
    let s = fit::fit(&cfg, &opts)?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

fn run_eval(a: EvalArgs) -> anyhow::Result<()> {
    let o = desam::train::eval::EvalOptions {
        model: a.model,
        data: a.data,
        sites: desam::train::data::parse_sites(&a.sites),
        mode: a.mode.as_deref().map(str::parse).transpose().map_err(anyhow::Error::msg)?,
        device: a.device.parse().map_err(anyhow::Error::msg)?,
        threads: a.threads,
        max_cases_per_site: a.max_cases,
        out: a.out,
        resume: a.resume,
        progress: true,
    };
    let s = desam::train::eval::evaluate(&o)?;
    println!("{}", desam::train::eval::markdown(&s, "evaluation"));
    Ok(())
}

fn run_eval_run(a: EvalRunArgs) -> anyhow::Result<()> {
    let sites = desam::train::data::parse_sites(&a.sites);
    let s = desam::train::eval::evaluate_run_on_store(
        &a.run,
        &a.embeddings,
        &sites,
        device_of(&a.device)?,
        a.mode,
        a.max_cases,
    )?;
    if let Some(out) = &a.out {
        desam::train::eval::write_summary(
            out,
            &s,
            &format!("run {} on store {}", a.run.display(), a.embeddings.display()),
        )?;
    }
    println!("{}", desam::train::eval::markdown(&s, "evaluation on stored slices"));
    Ok(())
}

fn run_export(a: ExportArgs) -> anyhow::Result<()> {
    let extra = match &a.eval {
        Some(p) => {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(p).with_context(|| p.display().to_string())?)?;
            let mut v = v;
            if let Some(o) = v.as_object_mut() {
                o.remove("cases");
            }
            serde_json::json!({ "evaluation": v })
        }
        None => serde_json::json!({}),
    };
    let md = desam::train::export::export(&desam::train::export::ExportOptions {
        run: a.run,
        out: a.out,
        name: a.name,
        version: a.version,
        which: a.checkpoint,
        extra,
    })?;
    println!("exported {} {} to {} (sha256 {})", md.spec.name, md.spec.version, md.dir.display(), md.model_sha256());
    Ok(())
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    desam::runtime::keep_freed_memory();
    let cli = Cli::parse();
    if let Err(e) = desam::limits::check_env() {
        eprintln!("desam-train: error: {e}");
        std::process::exit(1);
    }
    // The last boundary: a panic below (a tampered store's shapes reaching libtorch, a bug) ends as
    // a one-line error and exit status 1, never as a backtrace.
    let r = desam::guard::catch(|| match cli.cmd {
        Cmd::Precompute(a) => run_precompute(a),
        Cmd::Fit(a) => run_fit(a),
        Cmd::Eval(a) => run_eval(a),
        Cmd::EvalRun(a) => run_eval_run(a),
        Cmd::Export(a) => run_export(a),
        Cmd::Promote(a) => desam::train::export::promote(&a.registry, &a.version)
            .map(|c| println!("current: {}", c.version.unwrap_or_default()))
            .map_err(Into::into),
        Cmd::Rollback(a) => desam::train::export::rollback(&a.registry)
            .map(|c| println!("current: {}", c.version.unwrap_or_default()))
            .map_err(Into::into),
        Cmd::Pull(a) => run_pull(a),
    })
    .unwrap_or_else(|panic| Err(anyhow::anyhow!("internal error: {panic}")));
    if let Err(e) = r {
        eprintln!("desam-train: error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

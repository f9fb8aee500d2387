//! `desam-train precompute`: run the frozen encoder once per slice of a dataset and store the features
//! and labels; the base model comes from an official checkpoint (converted) or a model directory.

use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::cli::values::DeviceParser;
use crate::engine::DeviceChoice;
use crate::model::Arch;
use crate::modeldir;
use crate::train::precompute;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Dataset: nnU-Net folder (imagesTr, labelsTr, prostate_patientid.csv) or DICOM case folders.
    #[arg(long)]
    pub data: PathBuf,
    /// Architecture of --checkpoint.
    #[arg(long, ignore_case = true)]
    pub arch: Option<Arch>,
    /// Official checkpoint (lite_medsam.pth, sam_vit_b.pth): converted into OUT/base_model.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Or an existing model directory whose encoder (and decoder, as the training start) to use.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    /// Store every slice (for evaluation), not only slices with foreground.
    #[arg(long)]
    pub all_slices: bool,
    /// Only these sites, e.g. A or B,C.
    #[arg(long)]
    pub sites: Option<String>,
    /// Where to run.
    #[arg(long, default_value = "auto", value_parser = DeviceParser)]
    pub device: DeviceChoice,
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seed of the randomly initialised PIMM in OUT/base_model (and of the augmentations).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also store this many intensity-augmented copies of every case (bias field incl. a
    /// coil-like bump, gamma, noise; docs/training.md). Training stores only.
    #[arg(long, default_value_t = 0)]
    pub augment: usize,
    /// Also store this many SynthSeg-style copies of every case, painted from its tissue map with a
    /// random contrast per tissue, warp, blur, bias field and noise (`desam phantom --tissue-map`
    /// writes the maps; docs/training.md). Training stores only.
    #[arg(long, default_value_t = 0)]
    pub synth: usize,
    /// Store every K-th foreground slice only (then fit with --slice-stride 1).
    #[arg(long, default_value_t = 1)]
    pub slice_stride: usize,
    /// Also store the slices without gland up to this many slices beyond the gland's ends (for
    /// `fit --train-background`). Training stores only.
    #[arg(long, default_value_t = 0)]
    pub background_margin: usize,
    /// Per-volume intensity clip "LOW,HIGH" in percentiles for the model being trained (default: the
    /// base model's; official 0.5,99.5). With --model, a copy with this clip goes to OUT/base_model.
    #[arg(long, value_parser = parse_clip)]
    pub clip_percentiles: Option<[f64; 2]>,
}

fn parse_clip(s: &str) -> Result<[f64; 2], String> {
    let v: Vec<f64> =
        s.split(',').map(|p| p.trim().parse::<f64>().map_err(|e| format!("{p:?}: {e}"))).collect::<Result<_, _>>()?;
    let clip: [f64; 2] = v.try_into().map_err(|_| "expected two percentiles, LOW,HIGH".to_string())?;
    modeldir::check_clip_percentiles(clip)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let model_dir = base_model_dir(&a)?;
    let opts = precompute::PrecomputeOptions {
        data: a.data,
        out: a.out,
        model_dir,
        all_slices: a.all_slices,
        sites: a.sites.as_deref().map(crate::train::data::parse_sites).unwrap_or_default(),
        device: a.device,
        threads: a.threads,
        batch: 2,
        progress: true,
        augment: a.augment,
        augment_seed: a.seed,
        slice_stride: a.slice_stride,
        background_margin: a.background_margin,
        synth: a.synth,
        feature_cache: None,
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

/// The model whose encoder fills the store: --model as is (or a copy in OUT/base_model with another
/// clip), or --checkpoint converted once into OUT/base_model.
fn base_model_dir(a: &Args) -> anyhow::Result<PathBuf> {
    let base = a.out.join("base_model");
    Ok(match (&a.model, &a.checkpoint) {
        (Some(m), None) => match a.clip_percentiles {
            Some(clip) if modeldir::read_spec(m)?.preprocessing.clip_percentiles != clip => {
                if !base.join("model.json").is_file() {
                    modeldir::derive_with_clip(m, &base, clip)?;
                } else if modeldir::read_spec(&base)?.preprocessing.clip_percentiles != clip {
                    bail!("{} was made with another clip; use a new --out", base.display());
                }
                base
            }
            _ => m.clone(),
        },
        (None, Some(ckpt)) => {
            let arch = a.arch.context("--checkpoint needs --arch")?;
            if !base.join("model.json").is_file() {
                std::fs::create_dir_all(&a.out)?;
                crate::engine::create_untrained_model_dir(
                    arch,
                    &base,
                    a.seed,
                    &crate::engine::BackboneSource::Convert(ckpt.clone()),
                )
                .with_context(|| format!("converting {}", ckpt.display()))?;
                if let Some(clip) = a.clip_percentiles {
                    let mut spec = modeldir::read_spec(&base)?;
                    spec.preprocessing.clip_percentiles = clip;
                    modeldir::write_spec(&base, &spec)?;
                }
            }
            base
        }
        _ => bail!("give exactly one of --model DIR or --checkpoint FILE (with --arch)"),
    })
}

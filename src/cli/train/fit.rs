//! `desam-train fit`: train PRIM + PIMM (or SAM's coupled mask head) on one site's precomputed
//! features; prints the run's summary as JSON.

use std::path::PathBuf;

use anyhow::Context;

use crate::cli::values::DeviceParser;
use crate::engine::{DeviceChoice, Mode};
use crate::train::fit;

/// `--baseline`: a comparison head trained instead of PIMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    /// Fine-tune SAM's own mask head instead of PIMM (the MedSAM comparison row).
    Coupled,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub embeddings: PathBuf,
    /// box (DeSAM-B: the whole-image box) or grid (DeSAM-P: one random point per sample).
    #[arg(long, value_enum, default_value_t = Mode::Box, ignore_case = true)]
    pub mode: Mode,
    /// Source site to train on (its patients are split 90/10 into train/validation).
    #[arg(long)]
    pub site: String,
    #[arg(long, default_value_t = 50)]
    pub epochs: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// dice,bce,iou weights (official effective: 1,0,1; paper review: 1,1,10).
    #[arg(long, default_value = "1,1,1")]
    pub loss_weights: String,
    #[arg(long, default_value = "l1", value_parser = ["l1", "mse"], ignore_case = true)]
    pub iou_loss: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// official (first 90% of patients train) or shuffle (seeded).
    #[arg(long, default_value = "official", value_parser = ["official", "shuffle"], ignore_case = true)]
    pub split: String,
    /// Use every k-th foreground slice of each training case.
    #[arg(long, default_value_t = 1)]
    pub slice_stride: usize,
    /// Also train on the store's slices without gland (target: empty), e.g. those of a
    /// `precompute --background-margin` store: teaches the decoder where the gland ends.
    #[arg(long)]
    pub train_background: bool,
    /// Decoder parts to keep fixed, comma-separated names below `mask_decoder.` (prefixes), e.g.
    /// `pimm.conv_blocks_context.1,pimm.conv_blocks_context.2`: PIMM's encoder-only branches, whose
    /// backward pass a fine-tune then skips.
    #[arg(long, value_delimiter = ',')]
    pub freeze: Vec<String>,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many optimiser steps in total (saves checkpoint_latest; continue with --resume).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Train a comparison head instead of PIMM.
    #[arg(long, value_enum)]
    pub baseline: Option<Baseline>,
    /// Where to run.
    #[arg(long, default_value = "auto", value_parser = DeviceParser)]
    pub device: DeviceChoice,
    #[arg(long)]
    pub threads: Option<usize>,
    /// Mixed precision on CUDA (autocast + dynamic loss scaling); ignored on CPU.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub amp: bool,
    #[arg(long, default_value_t = 25)]
    pub save_every: u64,
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = fit::FitConfig {
        embeddings: std::fs::canonicalize(&a.embeddings).with_context(|| format!("{}", a.embeddings.display()))?,
        mode: a.mode,
        site: a.site.trim().to_ascii_uppercase(),
        epochs: a.epochs,
        batch: a.batch,
        lr: a.lr,
        loss_weights: a.loss_weights.parse().map_err(anyhow::Error::msg)?,
        iou_loss: a.iou_loss.parse().map_err(anyhow::Error::msg)?,
        seed: a.seed,
        split: a.split.parse().map_err(anyhow::Error::msg)?,
        coupled: a.baseline == Some(Baseline::Coupled),
        slice_stride: a.slice_stride.max(1),
        train_background: a.train_background,
        amp: a.amp,
        freeze: a.freeze,
        manifest_hash: String::new(),
    };
    let opts = fit::RunOptions {
        out: a.out,
        resume: a.resume,
        max_steps: a.max_steps,
        device: Some(a.device.resolve()?),
        threads: a.threads,
        save_every: a.save_every,
        progress: !a.quiet,
        skip_validation: false,
    };
    let s = fit::fit(&cfg, &opts)?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

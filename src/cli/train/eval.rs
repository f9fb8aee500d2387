//! `desam-train eval`: segment every case of the given sites with the real engine and score it
//! (Dice, HD95, the official metric); resumable per case.

use std::path::PathBuf;

use crate::cli::values::DeviceParser;
use crate::engine::{DeviceChoice, Mode};
use crate::train::{data, eval};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub data: PathBuf,
    /// Sites to evaluate, e.g. B,C,D,E,F.
    #[arg(long)]
    pub sites: String,
    /// Prompt mode (default: the model's).
    #[arg(long, value_enum, ignore_case = true)]
    pub mode: Option<Mode>,
    /// Output folder for summary.json and summary.md; each case is also appended to cases.jsonl
    /// as it finishes.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue an interrupted evaluation in --out: cases already in its cases.jsonl are kept
    /// (only when model, mode, sites and case list are the same).
    #[arg(long, requires = "out")]
    pub resume: bool,
    /// Evaluate at most N cases per site.
    #[arg(long)]
    pub max_cases: Option<usize>,
    /// Where to run.
    #[arg(long, default_value = "auto", value_parser = DeviceParser)]
    pub device: DeviceChoice,
    #[arg(long)]
    pub threads: Option<usize>,
    /// Encoder-feature cache folder (shared by models with the same encoder, like `desam segment
    /// --cache`).
    #[arg(long = "cache")]
    pub cache_dir: Option<PathBuf>,
    /// Also write each case's predicted mask to OUT/masks/<case>.nii.gz.
    #[arg(long, requires = "out")]
    pub save_masks: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let o = eval::EvalOptions {
        model: a.model,
        data: a.data,
        sites: data::parse_sites(&a.sites),
        mode: a.mode,
        device: a.device,
        threads: a.threads,
        max_cases_per_site: a.max_cases,
        out: a.out,
        resume: a.resume,
        progress: true,
        cache_dir: a.cache_dir,
        save_masks: a.save_masks,
    };
    let s = eval::evaluate(&o)?;
    println!("{}", eval::markdown(&s, "evaluation"));
    Ok(())
}

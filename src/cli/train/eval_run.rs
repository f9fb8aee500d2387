//! `desam-train eval-run`: score a training run's best checkpoint (either head) on a precomputed
//! store of target sites, without the engine's preprocessing (the store holds the features).

use std::path::PathBuf;

use crate::cli::values::DeviceParser;
use crate::engine::{DeviceChoice, Mode};
use crate::train::{data, eval};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub run: PathBuf,
    /// Store of the target sites (`precompute` without --all-slices).
    #[arg(long)]
    pub embeddings: PathBuf,
    #[arg(long)]
    pub sites: String,
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where to run.
    #[arg(long, default_value = "auto", value_parser = DeviceParser)]
    pub device: DeviceChoice,
    /// box, or grid (the model's point grid + IoU filter/NMS, DeSAM-P's automatic mode); default: the
    /// run's training mode.
    #[arg(long, value_enum, ignore_case = true)]
    pub mode: Option<Mode>,
    /// Score at most N cases per site (the first eligible ones in store order).
    #[arg(long)]
    pub max_cases: Option<usize>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let sites = data::parse_sites(&a.sites);
    let s = eval::evaluate_run_on_store(&a.run, &a.embeddings, &sites, a.device.resolve()?, a.mode, a.max_cases)?;
    if let Some(out) = &a.out {
        eval::write_summary(out, &s, &format!("run {} on store {}", a.run.display(), a.embeddings.display()))?;
    }
    println!("{}", eval::markdown(&s, "evaluation on stored slices"));
    Ok(())
}

//! `desam model init`: create a clearly labelled untrained model directory (tests, benchmarks, a
//! training start). Creates files only under --out; never touches the source checkpoint.

use std::path::PathBuf;

use crate::engine::{create_untrained_model_dir, BackboneSource};
use crate::model::Arch;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Write an UNTRAINED model directory (random PIMM; backbone random or from a checkpoint).
    Init(InitArgs),
}

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// tiny, lite, vit_b, vit_l or vit_h.
    #[arg(long)]
    pub arch: String,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Backbone (and PRIM) from an official checkpoint (lite_medsam.pth, sam_vit_*.pth), converted
    /// into the directory as f16 safetensors.
    #[arg(long)]
    pub backbone: Option<PathBuf>,
    /// Reference --backbone by absolute path instead of converting it (large SAM checkpoints).
    #[arg(long, requires = "backbone")]
    pub reference: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Init(a) => {
            let arch: Arch = a.arch.parse()?;
            let source = match (a.backbone, a.reference) {
                (None, _) => BackboneSource::Random,
                (Some(p), false) => BackboneSource::Convert(p),
                (Some(p), true) => BackboneSource::Reference(p),
            };
            let md = create_untrained_model_dir(arch, &a.out, a.seed, &source)?;
            eprintln!(
                "Wrote UNTRAINED model {} to {} (sha256 {}): for tests and benchmarks only.",
                md.spec.name,
                a.out.display(),
                md.model_sha256()
            );
            Ok(())
        }
    }
}

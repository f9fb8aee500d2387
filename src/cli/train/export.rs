//! `desam-train export`: a training run's checkpoint as an immutable, versioned model directory,
//! optionally recording an evaluation summary in its model.json.

use std::path::PathBuf;

use anyhow::Context;

use crate::train::export;

/// `--checkpoint`: which of a run's checkpoints to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// The epoch with the lowest validation loss.
    Best,
    /// The last saved step.
    Latest,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub run: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "desam-lite-prostate")]
    pub name: String,
    #[arg(long, default_value = "0.1.0")]
    pub version: String,
    #[arg(long, value_enum, default_value_t = Which::Best)]
    pub checkpoint: Which,
    /// A summary.json of `desam-train eval` to record in model.json.
    #[arg(long)]
    pub eval: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let extra = match &a.eval {
        Some(p) => {
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(p).with_context(|| p.display().to_string())?)?;
            // The per-case list belongs to the evaluation folder, not to the model's identity card.
            if let Some(o) = v.as_object_mut() {
                o.remove("cases");
            }
            serde_json::json!({ "evaluation": v })
        }
        None => serde_json::json!({}),
    };
    let which = match a.checkpoint {
        Which::Best => "best",
        Which::Latest => "latest",
    };
    let md = export::export(&export::ExportOptions {
        run: a.run,
        out: a.out,
        name: a.name,
        version: a.version,
        which: which.to_string(),
        extra,
    })?;
    println!("exported {} {} to {} (sha256 {})", md.spec.name, md.spec.version, md.dir.display(), md.model_sha256());
    Ok(())
}

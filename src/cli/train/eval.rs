//! `desam-train eval`: segment every case of the given sites with the real engine (or take the SEGs
//! the Orthanc plugin stored, `--orthanc`) and score it (Dice, HD95, the official metric); resumable.

use std::path::PathBuf;
use std::time::Duration;

use crate::cli::values::DeviceParser;
use crate::engine::{DeviceChoice, Mode};
use crate::train::{data, eval};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory to run here.
    #[arg(long, required_unless_present = "orthanc")]
    pub model: Option<PathBuf>,
    /// Instead of running a model, score the SEGs the DeSAM plugin stored in this Orthanc
    /// (`http[s]://host:port`) for the cases' MR series (found by SeriesInstanceUID; DICOM case
    /// folders only), as named by each series' result record. Only reads from Orthanc.
    #[arg(long)]
    pub orthanc: Option<String>,
    /// Only results of this model version count (the record's ModelVersion); others are waited for.
    #[arg(long, requires = "orthanc")]
    pub version: Option<String>,
    /// Seconds to wait, in all, for results that are missing or of another version (0: fail at once).
    #[arg(long, default_value_t = 0, requires = "orthanc")]
    pub wait: u64,
    /// The plugin's ResultMetadata index.
    #[arg(long, default_value_t = 4301, requires = "orthanc")]
    pub result_metadata: u16,
    #[command(flatten)]
    pub login: super::OrthancLogin,
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
    // Not clap's conflicts_with: an argument that conflicts with a present one is no longer
    // required, so --version, --ca-file, ... would be ignored beside --model instead of refused.
    let source = match (a.model, a.orthanc) {
        (Some(_), Some(_)) => anyhow::bail!("--model and --orthanc: give one (run a model, or score stored SEGs)"),
        (Some(dir), None) => eval::EvalSource::Model(dir),
        (None, Some(orthanc)) => eval::EvalSource::Stored(eval::StoredSegs {
            connection: a.login.connection(orthanc)?,
            result_metadata: a.result_metadata,
            version: a.version,
            wait: Duration::from_secs(a.wait),
        }),
        (None, None) => anyhow::bail!("give --model DIR or --orthanc URL"),
    };
    let o = eval::EvalOptions {
        source,
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: super::Args,
    }

    fn parse(extra: &[&str]) -> Result<super::Args, clap::Error> {
        let base = ["eval", "--data", "/nonexistent", "--sites", "A"];
        Cli::try_parse_from(base.iter().chain(extra)).map(|c| c.args)
    }

    #[test]
    fn the_orthanc_options_are_refused_beside_a_model_rather_than_ignored() {
        assert!(parse(&["--model", "m"]).is_ok());
        assert!(parse(&["--orthanc", "http://127.0.0.1:9", "--version", "1", "--wait", "5"]).is_ok());
        for extra in [
            &["--version", "1"][..],
            &["--wait", "5"],
            &["--result-metadata", "9"],
            &["--ca-file", "ca.pem"],
            &["--user", "u", "--password-env", "P"],
        ] {
            let e = parse(&[&["--model", "m"][..], extra].concat()).err();
            assert!(e.is_some_and(|e| e.to_string().contains("--orthanc")), "{extra:?} beside --model");
        }
        let both = parse(&["--model", "m", "--orthanc", "http://127.0.0.1:9"]).unwrap();
        assert!(super::run(both).unwrap_err().to_string().contains("give one"));
    }
}

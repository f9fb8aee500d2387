//! The `desam` command line: segment a series or NIfTI, debug forward passes, phantom data, demo.

use clap::{Parser, Subcommand};
use desam::cli;

#[derive(Parser)]
#[command(name = "desam", version, about = "Fully automatic DeSAM prostate MR segmentation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Segment a DICOM series folder or a NIfTI volume.
    Segment(cli::segment::Args),
    /// Run one forward pass of a model on a prepared image (debugging, parity checks).
    Forward(cli::forward::Args),
    /// Write synthetic multi-site prostate MR cases.
    Phantom(cli::phantom::Args),
    /// End-to-end demo: Orthanc with the plugin segments phantom series.
    Demo(cli::demo::Args),
    /// Model directories (create an untrained one for tests).
    Model(cli::model::Args),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    desam::runtime::keep_freed_memory();
    let cli = Cli::parse();
    if let Err(e) = desam::limits::check_env() {
        eprintln!("desam: error: {e}");
        std::process::exit(1);
    }
    // The last boundary: a panic anywhere below (a libtorch error outside the engine, a bug) ends
    // as a one-line error and exit status 1, never as a backtrace.
    let result = desam::guard::catch(|| match cli.command {
        Command::Segment(a) => cli::segment::run(a),
        Command::Forward(a) => cli::forward::run(a),
        Command::Phantom(a) => cli::phantom::run(a),
        Command::Demo(a) => cli::demo::run(a),
        Command::Model(a) => cli::model::run(a),
    })
    .unwrap_or_else(|panic| Err(anyhow::anyhow!("internal error: {panic}")));
    if let Err(e) = result {
        eprintln!("desam: error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// The error chain on one line ("outer: inner: root").
fn one_line(e: &anyhow::Error) -> String {
    // A wrapper whose message already ends with its source's message says it once.
    let mut out = String::new();
    for part in e.chain().map(|c| c.to_string()) {
        if out.ends_with(&part) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&part);
    }
    out.replace('\n', " ")
}

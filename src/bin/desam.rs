//! The `desam` command line: segment series or NIfTI volumes, debug forward passes, phantom data, demo.
//! Dispatch only; each subcommand lives in `desam::cli`.

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
    /// Segment a DICOM series folder or a NIfTI volume; or many cases with one model load.
    Segment(cli::segment::Args),
    /// Run one forward pass of a model on a prepared image (debugging, parity checks).
    Forward(cli::forward::Args),
    /// Write synthetic multi-site prostate MR cases.
    Phantom(cli::phantom::Args),
    /// End-to-end demo: Orthanc with the plugin segments phantom series.
    Demo(cli::demo::Args),
    /// Model directories (create an untrained one for tests).
    Model(cli::model::Args),
    /// Write a DICOM-SEG from a given mask (e.g. a reviewed, corrected segmentation) over its series.
    WriteSeg(cli::write_seg::Args),
}

fn main() {
    let cli: Cli = cli::process::start("desam");
    cli::process::finish("desam", || match cli.command {
        Command::Segment(a) => cli::segment::run(a),
        Command::Forward(a) => cli::forward::run(a),
        Command::Phantom(a) => cli::phantom::run(a),
        Command::Demo(a) => cli::demo::run(a),
        Command::Model(a) => cli::model::run(a),
        Command::WriteSeg(a) => cli::write_seg::run(a),
    });
}

//! `desam-train`: precompute embeddings, train the decoder, evaluate across sites, export models.
//! Dispatch only; each subcommand lives in `desam::cli::train`, the work in `desam::train`.

use clap::{Parser, Subcommand};
use desam::cli::{self, train};

#[derive(Parser)]
#[command(name = "desam-train", version, about = "Train and evaluate DeSAM decoders (nnU-Net-like workflow)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the frozen encoder once per slice and store f16 features + labels (resumable).
    Precompute(train::precompute::Args),
    /// Train PRIM + PIMM (or the coupled SAM head) on precomputed features of one site.
    Fit(train::fit::Args),
    /// Segment every case of the given sites with the real engine and score it (Dice, HD95, official metric).
    Eval(train::eval::Args),
    /// Score a run's best checkpoint (either head) on a precomputed store of target sites (box prompt).
    EvalRun(train::eval_run::Args),
    /// Export a run as an immutable, versioned model directory.
    Export(train::export::Args),
    /// Make a version of a registry current (REG/versions/<V>; REG/current.json + REG/current symlink).
    Promote(train::registry::PromoteArgs),
    /// Make the previously current version of a registry current again.
    Rollback(train::registry::RollbackArgs),
    /// Copy reviewed DICOM-SEGs and their MR series from Orthanc into a DICOM training folder (resumable).
    Pull(train::pull::Args),
    /// Pull reviewed cases, fine-tune the registry's current model, check it against the current one
    /// on held-out cases and promote it only if it passes the gate (resumable).
    Adapt(train::adapt::Args),
}

fn main() {
    let cli: Cli = cli::process::start("desam-train");
    // A panic below (a tampered store's shapes reaching libtorch, a bug) ends as one line, exit 1.
    cli::process::finish("desam-train", || match cli.command {
        Command::Precompute(a) => train::precompute::run(a),
        Command::Fit(a) => train::fit::run(a),
        Command::Eval(a) => train::eval::run(a),
        Command::EvalRun(a) => train::eval_run::run(a),
        Command::Export(a) => train::export::run(a),
        Command::Promote(a) => train::registry::promote(a),
        Command::Rollback(a) => train::registry::rollback(a),
        Command::Pull(a) => train::pull::run(a),
        Command::Adapt(a) => train::adapt::run(a),
    });
}

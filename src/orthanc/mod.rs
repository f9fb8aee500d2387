//! The Orthanc plugin (this crate's cdylib). Must not hold segmentation logic (engine/). Its files,
//! bottom up (each imports only files below it; bridge and entry name each other through cxx):
//! - `bridge`: the cxx bridge to the C++ shim, the SDK calls; no plugin policy;
//! - leaves: `config`, `selection`, `claims`, `metadata`, `metrics`, `pipeline` (engine glue, model in
//!   service), `review` (the review mark on a SEG series);
//! - `jobs` (Orthanc job state), then `worker` (queue, thread, exactly-once);
//! - `state` (the global worker slot), `rest` (the route table), `entry` (C entry points, callbacks).

pub mod bridge;
pub mod claims;
pub mod config;
pub mod entry;
pub mod jobs;
pub mod metadata;
pub mod metrics;
pub mod pipeline;
pub mod rest;
pub mod review;
pub mod selection;
pub mod state;
pub mod worker;

pub use config::PluginConfig;
pub use pipeline::{
    ModelIdentity, ProcessError, ProcessOutput, ProcessRequest, ProcessSummary, ReloadOutcome, ReloadReport,
    SeriesProcessor,
};

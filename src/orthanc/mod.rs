//! The Orthanc plugin (this crate's cdylib): entry points, the cxx bridge to the C++ shim,
//! configuration, worker and jobs, REST routes, metrics. Must not hold segmentation logic (engine/).

pub mod bridge;
pub mod claims;
pub mod config;
pub mod entry;
pub mod jobs;
pub mod metadata;
pub mod metrics;
pub mod pipeline;
pub mod rest;
pub mod selection;
pub mod worker;

pub use config::PluginConfig;
pub use pipeline::{ModelIdentity, ProcessError, ProcessOutput, ProcessRequest, ProcessSummary, SeriesProcessor};

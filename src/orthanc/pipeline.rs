//! The processing step behind the plugin: instance bytes in, DICOM-SEG bytes and a summary out.
//! Owns the glue to the reader, the engine and the SEG writer; knows nothing about Orthanc.

use std::sync::atomic::AtomicBool;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot read the series: {0}")]
    Read(String),
    #[error("model: {0}")]
    Model(String),
    #[error("segmentation failed: {0}")]
    Engine(String),
    #[error("cannot write the DICOM-SEG: {0}")]
    Write(String),
    #[error("cancelled")]
    Cancelled,
}

/// Which model produced a result (model.json's name and version, the weights' SHA-256).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ModelIdentity {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

#[derive(Debug, Clone)]
pub struct ProcessRequest {
    pub mode: String,
    pub series_description: String,
    pub quality_threshold: f64,
    /// When false and nothing is found, no SEG is produced.
    pub store_empty: bool,
}

#[derive(Debug, Clone, Default)]
pub struct ProcessSummary {
    pub quality: f64,
    pub flagged: bool,
    pub volume_ml: f64,
    pub empty: bool,
    pub device: String,
    pub seg_sop_instance_uid: Option<String>,
    pub seg_series_instance_uid: Option<String>,
    pub warnings: Vec<String>,
}

pub struct ProcessOutput {
    pub seg: Option<Vec<u8>>,
    pub summary: ProcessSummary,
}

/// One series in, one SEG out. `progress` receives 0..1; `cancel` is polled between stages/slices.
pub trait SeriesProcessor: Send + Sync {
    /// The model's identity without loading the weights (used for exactly-once checks).
    fn identity(&self) -> Result<ModelIdentity, ProcessError>;
    /// Whether the weights are in memory, and on which device.
    fn loaded_device(&self) -> Option<String>;
    fn process(
        &self,
        instances: &[Vec<u8>],
        request: &ProcessRequest,
        progress: &mut dyn FnMut(f32),
        cancel: &AtomicBool,
    ) -> Result<ProcessOutput, ProcessError>;
}

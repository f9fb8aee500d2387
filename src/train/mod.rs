//! desam-train: dataset sources, the precomputed-embedding store, losses, the decoder training loop,
//! cross-site evaluation through the real engine, export/promote/rollback. Never edits source data.

pub mod adapt;
pub mod augment;
pub mod data;
pub mod eval;
pub mod export;
pub mod fit;
pub mod loss;
pub mod metrics;
pub mod orthanc_rest;
pub mod plot;
pub mod precompute;
pub mod pull;
pub mod run_log;
pub mod synth;

/// Every training-layer failure with a message that says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {message}")]
    Data { path: std::path::PathBuf, message: String },
    #[error("case {case}: image {image:?} and label {label:?} have different shapes")]
    ShapeMismatch { case: String, image: [usize; 3], label: [usize; 3] },
    #[error("case {case}: the label has no foreground (label value 1, or an nnU-Net v2 dataset's prostate labels); remove the case or fix the label")]
    EmptyLabel { case: String },
    #[error("case {case} (patient id {patient}) is missing from the site table {csv}")]
    MissingSite { case: String, patient: String, csv: std::path::PathBuf },
    #[error("embedding store {dir}: {message}")]
    Store { dir: std::path::PathBuf, message: String },
    #[error("run {dir}: {message}")]
    Run { dir: std::path::PathBuf, message: String },
    #[error("{path} already exists; model directories are immutable (choose a new --version or --out)")]
    Exists { path: std::path::PathBuf },
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("model: {0}")]
    Model(String),
    #[error("model directory: {0}")]
    ModelDir(#[from] crate::modeldir::ModelDirError),
    #[error("model: {0}")]
    Net(#[from] crate::model::ModelError),
    #[error("engine: {0}")]
    Engine(#[from] crate::engine::EngineError),
    #[error("weights: {0}")]
    Checkpoint(#[from] crate::model::checkpoint::CheckpointError),
    #[error("model: {0}")]
    Arch(#[from] crate::model::config::UnknownArch),
    #[error("Orthanc at {url} is unreachable ({message}): is it running, and are --orthanc's host and port right?")]
    OrthancUnreachable { url: String, message: String },
    #[error("Orthanc at {url}: {method} {path} answered HTTP {status}{hint}: {body}")]
    OrthancStatus { url: String, method: String, path: String, status: u16, hint: String, body: String },
    #[error("Orthanc at {url}: {message}")]
    OrthancTls { url: String, message: String },
    #[error("Orthanc at {url}: {message}")]
    OrthancAnswer { url: String, message: String },
    #[error("reviewed SEG series {seg_series} (Orthanc series {orthanc_id}) has no ReferencedSeriesSequence (0008,1115): cannot tell which MR series it segments; fix the SEG or remove its review mark")]
    SegWithoutReference { seg_series: String, orthanc_id: String },
    #[error("reviewed SEG series {seg_series} references MR series {mr_series}, which is not in Orthanc at {url}; upload the MR series or remove the SEG's review mark")]
    ReferencedSeriesMissing { seg_series: String, mr_series: String, url: String },
    #[error("no DICOM-SEG series in Orthanc at {url} has metadata {index} = {value:?}, so there is no ground truth to pull; after checking (and correcting) a SEG, mark it: curl -X PUT {url}/series/<seg-series-id>/metadata/{index} -d {value}")]
    NoReviewedSeg { url: String, index: u16, value: String },
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

//! desam-train: dataset sources, the precomputed-embedding store, losses, the decoder training loop,
//! cross-site evaluation through the real engine, export/promote/rollback. Never edits source data.

pub mod augment;
pub mod data;
pub mod eval;
pub mod export;
pub mod fit;
pub mod loss;
pub mod metrics;
pub mod plot;
pub mod precompute;

/// Every training-layer failure with a message that says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {message}")]
    Data { path: std::path::PathBuf, message: String },
    #[error("case {case}: image {image:?} and label {label:?} have different shapes")]
    ShapeMismatch { case: String, image: [usize; 3], label: [usize; 3] },
    #[error("case {case}: the label has no foreground (label value 1); remove the case or fix the label")]
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
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

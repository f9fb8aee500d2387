//! The typed errors of the DICOM layer (series reading, MR writing): one-line messages that name the
//! file or instance at fault. Owns no I/O and no decoding; callers map these to exit codes / HTTP answers.

use std::path::PathBuf;

/// Everything that can go wrong turning DICOM files into a `Volume` or a `Volume` into DICOM files.
#[derive(Debug, thiserror::Error)]
pub enum DicomError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {reason}")]
    Write { path: String, reason: String },
    #[error("{file}: not a readable DICOM file ({reason})")]
    Corrupt { file: String, reason: String },
    #[error("no input: {0}")]
    EmptyInput(String),
    #[error("no image series found: {0}")]
    NoImages(String),
    #[error("{} image series found where one was expected: {}", .series.len(), .series.join(", "))]
    MultipleSeries { series: Vec<String> },
    #[error("{instance}: required attribute {attribute} is missing or invalid")]
    MissingAttribute { instance: String, attribute: String },
    #[error("{instance}: has no pixel data")]
    MissingPixelData { instance: String },
    #[error("{instance}: image orientation differs from the rest of the series (mixed orientations)")]
    MixedOrientation { instance: String },
    #[error("{instance}: slice is not parallel to the others (its position leaves the slice stack)")]
    NonParallelSlices { instance: String },
    #[error("{first} and {second}: two slices at the same position ({position_mm:.3} mm along the normal)")]
    DuplicatePosition { first: String, second: String, position_mm: f64 },
    #[error("{instance}: {what} differs from the rest of the series ({found} vs {expected})")]
    InconsistentGeometry { instance: String, what: String, found: String, expected: String },
    #[error("{instance}: photometric interpretation {value} is not supported (MONOCHROME1/2 only)")]
    UnsupportedPhotometric { instance: String, value: String },
    #[error("{instance}: transfer syntax {uid} ({name}) is not supported")]
    UnsupportedTransferSyntax { instance: String, uid: String, name: String },
    #[error("{instance}: unsupported pixel format ({detail})")]
    UnsupportedPixelFormat { instance: String, detail: String },
    #[error("{instance}: pixel data cannot be decoded ({reason})")]
    Decode { instance: String, reason: String },
    #[error("{file}: refused: {reason}")]
    LimitExceeded { file: String, reason: String },
    #[error("invalid volume for DICOM export: {0}")]
    InvalidVolume(String),
}

impl DicomError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DicomError::Io { path: path.into(), source }
    }
}

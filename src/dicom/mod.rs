//! DICOM in and out: MR series → Volume, DICOM-SEG writer and reader, UIDs and value formatting.

pub mod error;
pub mod mr_write;
pub use error::DicomError;
pub use mr_write::{
    encode_mr_series, write_mr_series, write_mr_series_full, EncodedMrSeries, MrSeriesAttributes, StoredPixels,
    WrittenMrSeries,
};

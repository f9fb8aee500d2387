//! DICOM in and out: MR series → Volume, DICOM-SEG writer and reader, UIDs and value formatting.

pub mod error;
pub mod mr_write;
pub use error::DicomError;
pub use mr_write::{
    encode_mr_series, write_mr_series, write_mr_series_full, EncodedMrSeries, MrSeriesAttributes, StoredPixels,
    WrittenMrSeries,
};
pub mod series;
pub use series::{
    group_series, list_series_dir, load_series_bytes, load_series_dir, load_series_dir_uid, load_series_files,
    LoadedSeries, SeriesGroup,
};

pub mod attrs;
pub mod codes;
pub mod ds;
pub mod seg_read;
pub mod seg_write;
pub mod uid;

pub use seg_read::{read_seg, read_seg_standalone, SegFrame, SegObject, SourceRef};
pub use seg_write::{
    write_prostate_seg, write_seg, AlgorithmType, SegEncoding, SegError, SegOptions, Segment, SegmentInfo,
};

//! DICOM in and out: MR series → Volume, DICOM-SEG writer and reader, UIDs and value formatting.

pub mod codes;
pub mod ds;
pub mod seg_read;
pub mod seg_write;
pub mod uid;

pub use seg_read::{read_seg, read_seg_standalone, SegFrame, SegObject, SourceRef};
pub use seg_write::{write_seg, AlgorithmType, SegError, SegOptions, Segment, SegmentInfo};

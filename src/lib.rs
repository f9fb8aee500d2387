//! desam: fully automatic, domain-robust prostate MR segmentation (DeSAM, Gao & Xia, MICCAI 2024)
//! on libtorch. One engine behind four doors: the `desam` CLI, the Orthanc plugin (this crate's
//! cdylib), the 3D Slicer module (through the CLI) and `desam-train`'s evaluation.

// Index loops over 3-vectors, matrices and pyramid levels read like the formulas they implement
// (p[a] += d[c][a] * s[c]); clippy's iterator rewrite obscures them.
#![allow(clippy::needless_range_loop)]

pub mod atomic;
pub mod cli;
pub mod clock;
pub mod dicom;
pub mod engine;
pub mod guard;
pub mod harness;
pub mod http;
pub mod limits;
pub mod model;
pub mod modeldir;
pub mod nifti;
#[cfg(feature = "orthanc")]
pub mod orthanc;
pub mod phantom;
pub mod raster;
pub mod registry;
pub mod runtime;
pub mod train;
pub mod volume;

pub use volume::{Mask, SliceRef, SourceInfo, Volume};

//! The two command lines' subcommands, one file each (`train/` for `desam-train`); `src/bin/` only
//! dispatches. Every subcommand returns `anyhow::Result`; `process` prints a one-line error, exit 1.

pub mod demo;
pub mod forward;
pub mod model;
pub mod overlay;
pub mod phantom;
pub mod process;
pub mod segment;
pub mod segment_batch;
pub mod segment_case;
pub mod train;
pub mod values;
pub mod write_seg;

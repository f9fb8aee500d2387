//! Subcommands of the `desam` CLI, one file each; `src/bin/desam.rs` only dispatches.
//! Every subcommand returns `anyhow::Result`; the binary prints a one-line error and exits non-zero.

pub mod demo;
pub mod forward;
pub mod model;
pub mod overlay;
pub mod phantom;
pub mod segment;

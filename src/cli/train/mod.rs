//! Subcommands of `desam-train`, one file each (promote and rollback share `registry`);
//! `src/bin/desam-train.rs` only dispatches, the work is in `crate::train`.

pub mod adapt;
pub mod eval;
pub mod eval_run;
pub mod export;
pub mod fit;
pub mod precompute;
pub mod pull;
pub mod registry;

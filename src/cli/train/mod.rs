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

/// The password named by `--password-env VAR` (passwords never go on the command line).
pub fn password_from_env(var: Option<&str>) -> anyhow::Result<Option<String>> {
    use anyhow::Context;
    var.map(|v| std::env::var(v).with_context(|| format!("--password-env {v}: the environment variable is not set")))
        .transpose()
}

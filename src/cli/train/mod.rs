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

/// How the Orthanc-facing subcommands (`pull`, `adapt`, `eval --orthanc`) log in; each has its own
/// `--orthanc URL`.
#[derive(clap::Args, Debug)]
pub struct OrthancLogin {
    /// PEM file of a private CA trusted for https besides the system's roots (default: $DESAM_CA_FILE).
    #[arg(long, requires = "orthanc")]
    pub ca_file: Option<std::path::PathBuf>,
    /// HTTP basic-authentication user.
    #[arg(long, requires_all = ["password_env", "orthanc"])]
    pub user: Option<String>,
    /// Name of the environment variable holding the password (never on the command line).
    #[arg(long, requires = "user")]
    pub password_env: Option<String>,
}

impl OrthancLogin {
    /// The connection to `orthanc`, with the password read from `--password-env VAR`.
    pub fn connection(self, orthanc: String) -> anyhow::Result<crate::train::orthanc_rest::Connection> {
        use anyhow::Context;
        let password = self
            .password_env
            .map(|v| {
                std::env::var(&v).with_context(|| format!("--password-env {v}: the environment variable is not set"))
            })
            .transpose()?;
        Ok(crate::train::orthanc_rest::Connection { orthanc, ca_file: self.ca_file, user: self.user, password })
    }
}

//! A read-only client of Orthanc's REST API for desam-train (`pull`, `eval --orthanc`): the crate's
//! one HTTP client with Orthanc's answers mapped to `TrainError`s that say what to fix.

use std::path::PathBuf;

use serde_json::Value;

use super::TrainError;
use crate::http::{Endpoint, HttpError, CA_FILE_ENV};

/// Where the server is and how to log in.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// `http[s]://host:port[/prefix]`.
    pub orthanc: String,
    /// A private CA's PEM file trusted for https besides the system's roots; `None`: the file named
    /// by `DESAM_CA_FILE`, if set.
    pub ca_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
}

/// Orthanc's REST API through the crate's HTTP client, with typed errors.
pub struct Client {
    endpoint: Endpoint,
    /// The server's URL as the errors name it (never with a password).
    pub url: String,
}

impl Client {
    /// Checks the connection options (no request is made).
    pub fn connect(c: &Connection) -> Result<Client, TrainError> {
        let mut endpoint = Endpoint::parse(&c.orthanc).map_err(|e| TrainError::Invalid(format!("--orthanc: {e}")))?;
        match (&c.user, &c.password) {
            (Some(u), Some(p)) => endpoint = endpoint.with_basic_auth(u, p),
            (Some(_), None) => return Err(TrainError::Invalid("--user needs a password (--password-env VAR)".into())),
            (None, Some(_)) => return Err(TrainError::Invalid("a password was given without --user".into())),
            (None, None) => {}
        }
        // An empty DESAM_CA_FILE counts as unset (a blank `export` in a service file).
        let ca_file =
            c.ca_file.clone().or_else(|| std::env::var_os(CA_FILE_ENV).filter(|v| !v.is_empty()).map(PathBuf::from));
        if let Some(ca) = &ca_file {
            endpoint = endpoint.with_ca_file(ca).map_err(|e| TrainError::Invalid(format!("--ca-file: {e}")))?;
        }
        Ok(Client { url: endpoint.url(), endpoint })
    }

    pub fn call(&self, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), TrainError> {
        self.endpoint.request(method, path, body).map_err(|e| match e {
            HttpError::Connect { message, .. } => TrainError::OrthancUnreachable { url: self.url.clone(), message },
            tls @ HttpError::Tls { .. } => TrainError::OrthancTls { url: self.url.clone(), message: tls.to_string() },
            other => TrainError::OrthancAnswer { url: self.url.clone(), message: other.to_string() },
        })
    }

    pub fn status_error(&self, method: &str, path: &str, status: u16, body: &[u8]) -> TrainError {
        let hint = match status {
            401 | 403 => " (check --user and --password-env)",
            _ => "",
        };
        let text: String = String::from_utf8_lossy(body).chars().take(300).collect();
        TrainError::OrthancStatus {
            url: self.url.clone(),
            method: method.into(),
            path: path.into(),
            status,
            hint: hint.into(),
            body: text.trim().to_string(),
        }
    }

    /// GET that must answer 200.
    pub fn get(&self, path: &str) -> Result<Vec<u8>, TrainError> {
        match self.call("GET", path, b"")? {
            (200, body) => Ok(body),
            (status, body) => Err(self.status_error("GET", path, status, &body)),
        }
    }

    /// GET that may answer 404 (→ None).
    pub fn get_optional(&self, path: &str) -> Result<Option<Vec<u8>>, TrainError> {
        match self.call("GET", path, b"")? {
            (200, body) => Ok(Some(body)),
            (404, _) => Ok(None),
            (status, body) => Err(self.status_error("GET", path, status, &body)),
        }
    }

    pub fn json(&self, path: &str, body: &[u8]) -> Result<Value, TrainError> {
        serde_json::from_slice(body).map_err(|e| TrainError::OrthancAnswer {
            url: self.url.clone(),
            message: format!("{path}: not JSON ({e})"),
        })
    }

    pub fn get_json(&self, path: &str) -> Result<Value, TrainError> {
        let body = self.get(path)?;
        self.json(path, &body)
    }

    /// Orthanc's id of the series with this SeriesInstanceUID (`POST /tools/lookup`, read-only).
    pub fn lookup_series(&self, uid: &str) -> Result<Option<String>, TrainError> {
        let path = "/tools/lookup";
        let (status, body) = self.call("POST", path, uid.as_bytes())?;
        if status != 200 {
            return Err(self.status_error("POST", path, status, &body));
        }
        let v = self.json(path, &body)?;
        Ok(v.as_array()
            .and_then(|a| a.iter().find(|x| x["Type"] == "Series"))
            .and_then(|x| x["ID"].as_str())
            .map(str::to_string))
    }
}

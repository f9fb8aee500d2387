//! One Orthanc process (Debian's /usr/sbin/Orthanc): writes its configuration folder, starts it with a
//! log file, waits for its REST API, asks it questions (series by UID, SEGs that reference a series), stops it.

use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::http::{Endpoint, HttpError};

/// Debian's Orthanc server.
pub const ORTHANC_EXE: &str = "/usr/sbin/Orthanc";
/// How long a starting Orthanc may take to answer `/system`.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long `POST /tools/shutdown` may take to end the process.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{method} {path}: {source}")]
    Http { method: String, path: String, source: Box<HttpError> },
    #[error("{method} {path} answered HTTP {status}: {body}")]
    Status { method: String, path: String, status: u16, body: String },
    #[error("{0}")]
    Orthanc(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// A free TCP port on loopback (bound, then released for the server to take).
pub fn free_port() -> Result<u16, HarnessError> {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).map_err(io("free port"))
}

/// A running Orthanc; killed on drop unless stopped with [`OrthancProcess::shutdown`].
pub struct OrthancProcess {
    pub dir: PathBuf,
    pub http_port: u16,
    pub dicom_port: u16,
    pub child: Child,
    pub log: PathBuf,
    endpoint: Endpoint,
}

impl OrthancProcess {
    /// Writes `config` (plus copies of the `more` configuration files) into `dir/config/`, starts `exe`
    /// with a fresh log file in `dir` and only `env` in its environment (None: the caller's environment),
    /// and waits until `GET /system` answers. `http_port`/`dicom_port` must match the configuration.
    pub fn start(
        exe: &Path,
        dir: &Path,
        config: &Value,
        more: &[PathBuf],
        env: Option<&[(&str, &str)]>,
    ) -> Result<OrthancProcess, HarnessError> {
        let port = |key: &str| {
            config[key].as_u64().map(|p| p as u16).ok_or_else(|| HarnessError::Orthanc(format!("config lacks {key}")))
        };
        let (http_port, dicom_port) = (port("HttpPort")?, port("DicomPort")?);
        let cfg_dir = dir.join("config");
        let _ = std::fs::remove_dir_all(&cfg_dir);
        std::fs::create_dir_all(&cfg_dir).map_err(io(cfg_dir.display().to_string()))?;
        let text = serde_json::to_vec_pretty(config).map_err(|e| HarnessError::Orthanc(e.to_string()))?;
        std::fs::write(cfg_dir.join("orthanc.json"), text).map_err(io("writing orthanc.json"))?;
        for f in more {
            let name = f.file_name().ok_or_else(|| HarnessError::Orthanc(format!("{} has no name", f.display())))?;
            std::fs::copy(f, cfg_dir.join(name)).map_err(io(f.display().to_string()))?;
        }
        // One log per start, so a restarted node keeps the earlier one.
        let n = std::fs::read_dir(dir)
            .map_err(io(dir.display().to_string()))?
            .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().starts_with("orthanc-")))
            .count();
        let log = dir.join(format!("orthanc-{n}.log"));
        let mut cmd = Command::new(exe);
        cmd.arg(format!("--logfile={}", log.display()))
            .arg(&cfg_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(env) = env {
            cmd.env_clear().envs(env.iter().copied());
        }
        let child = cmd.spawn().map_err(io(format!("starting {} (Debian package orthanc)", exe.display())))?;
        let mut endpoint = Endpoint::loopback(http_port);
        if let Some((user, password)) = first_user(config) {
            endpoint = endpoint.with_basic_auth(&user, &password);
        }
        let mut o = OrthancProcess { dir: dir.to_path_buf(), http_port, dicom_port, child, log, endpoint };
        let t0 = Instant::now();
        loop {
            if let Ok(Some(status)) = o.child.try_wait() {
                return Err(HarnessError::Orthanc(format!(
                    "Orthanc exited at start-up ({status}); log {}:\n{}",
                    o.log.display(),
                    o.log_tail(30)
                )));
            }
            if matches!(o.request("GET", "/system", b""), Ok((200, _))) {
                return Ok(o);
            }
            if t0.elapsed() > START_TIMEOUT {
                return Err(HarnessError::Orthanc(format!(
                    "Orthanc did not answer within {START_TIMEOUT:?}; log:\n{}",
                    o.log_tail(30)
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The REST endpoint (with the first registered user's credentials, if any).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.http_port, path)
    }

    /// One request with the configured credentials: (status, body).
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), HarnessError> {
        self.request_with(&self.endpoint, method, path, body)
    }

    /// One request through `endpoint` (e.g. other credentials, or none).
    pub fn request_with(
        &self,
        endpoint: &Endpoint,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), HarnessError> {
        endpoint.request(method, path, body).map_err(|source| HarnessError::Http {
            method: method.into(),
            path: path.into(),
            source: Box::new(source),
        })
    }

    /// `GET path` as JSON; any status but 200 is an error.
    pub fn get_json(&self, path: &str) -> Result<Value, HarnessError> {
        let (status, body) = self.request("GET", path, b"")?;
        if status != 200 {
            return Err(HarnessError::Status {
                method: "GET".into(),
                path: path.into(),
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        serde_json::from_slice(&body).map_err(|e| HarnessError::Orthanc(format!("GET {path}: not JSON: {e}")))
    }

    /// Orthanc's id of a series from its SeriesInstanceUID.
    pub fn series_id(&self, series_uid: &str) -> Result<String, HarnessError> {
        let (_, body) = self.request("POST", "/tools/lookup", series_uid.as_bytes())?;
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        v.as_array()
            .and_then(|a| a.iter().find(|x| x["Type"] == "Series"))
            .and_then(|x| x["ID"].as_str())
            .map(str::to_string)
            .ok_or_else(|| HarnessError::Orthanc(format!("series {series_uid} is not in Orthanc: {v}")))
    }

    /// SEG instances (Orthanc ids) in the study of `series_id` whose ReferencedSeriesSequence names it.
    pub fn segs_referencing(&self, series_id: &str) -> Result<Vec<String>, HarnessError> {
        let series = self.get_json(&format!("/series/{series_id}"))?;
        let uid = series["MainDicomTags"]["SeriesInstanceUID"].as_str().unwrap_or_default().to_string();
        let study = series["ParentStudy"].as_str().unwrap_or_default().to_string();
        let mut found = Vec::new();
        for s in self.get_json(&format!("/studies/{study}/series"))?.as_array().cloned().unwrap_or_default() {
            if s["MainDicomTags"]["Modality"] != "SEG" {
                continue;
            }
            for inst in s["Instances"].as_array().cloned().unwrap_or_default() {
                let inst = inst.as_str().unwrap_or_default();
                let tags = self.get_json(&format!("/instances/{inst}/simplified-tags"))?;
                let refs = tags["ReferencedSeriesSequence"].as_array().cloned().unwrap_or_default();
                if refs.iter().any(|r| r["SeriesInstanceUID"] == uid.as_str()) {
                    found.push(inst.to_string());
                }
            }
        }
        Ok(found)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.child.id())).exists()
    }

    /// Resident and peak memory of the process (kB), from /proc.
    pub fn rss_kb(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// `POST /tools/shutdown`, then waits for a clean exit (code 0); returns the log.
    pub fn shutdown(mut self) -> Result<String, HarnessError> {
        let _ = self.request("POST", "/tools/shutdown", b"");
        let t0 = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(self.log_text()),
                Ok(Some(status)) => {
                    return Err(HarnessError::Orthanc(format!(
                        "Orthanc exited with {status}; log:\n{}",
                        self.log_tail(30)
                    )))
                }
                _ if t0.elapsed() > STOP_TIMEOUT => {
                    // Drop kills it.
                    return Err(HarnessError::Orthanc(format!(
                        "Orthanc did not stop within {STOP_TIMEOUT:?} of POST /tools/shutdown (killed); log:\n{}",
                        self.log_tail(30)
                    )));
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

impl OrthancProcess {
    /// Gives up ownership of the process: it keeps running after this value (and the caller) are gone.
    pub fn detach(self) {
        // Drop would kill it; nothing else here needs releasing before the caller exits.
        std::mem::forget(self);
    }
}

impl Drop for OrthancProcess {
    fn drop(&mut self) {
        // After a clean shutdown this finds the process gone; otherwise never leave a server running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The first `RegisteredUsers` entry of an Orthanc configuration, for authenticated requests.
fn first_user(config: &Value) -> Option<(String, String)> {
    let users = config.get("RegisteredUsers")?.as_object()?;
    let (u, p) = users.iter().next()?;
    Some((u.clone(), p.as_str()?.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_user_and_missing_ports() {
        let cfg = serde_json::json!({"RegisteredUsers": {"alice": "pw"}});
        assert_eq!(first_user(&cfg), Some(("alice".into(), "pw".into())));
        assert_eq!(first_user(&serde_json::json!({})), None);
        let d = std::env::temp_dir().join(format!("desam-harness-{}", std::process::id()));
        let e = OrthancProcess::start(Path::new("/bin/false"), &d, &cfg, &[], None).err().unwrap();
        assert!(e.to_string().contains("HttpPort"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}

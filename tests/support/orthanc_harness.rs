//! Test support over `desam::harness::OrthancProcess` (the demo's harness too): a real Orthanc on free
//! loopback ports with a temporary storage folder and the freshly built plugin; DICOM through dcmtk's storescu.
#![allow(dead_code)]

use desam::harness::OrthancProcess;
use desam::http::Endpoint;
use serde_json::{json, Value};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const ORTHANC: &str = desam::harness::ORTHANC_EXE;
pub const AET: &str = "DESAMTEST";

pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("desam-orthanc-{}-{}", name, std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The plugin: target/<profile>/libdesam.so next to the test binary. `cargo test` compiles the
/// library for the tests but does not refresh that file, so it is (re)built here once per run with
/// `cargo build --lib` (a no-op when it is up to date).
pub fn plugin_path() -> PathBuf {
    static SO: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    SO.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--lib", "--quiet"]).current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cannot run cargo to build the plugin");
        assert!(status.success(), "cargo build --lib failed");
        let so = profile_dir.join("libdesam.so");
        assert!(so.is_file(), "{} is missing after cargo build --lib", so.display());
        so
    })
    .clone()
}

/// One clearly untrained tiny model per test binary (its masks mean nothing: the plugin's behaviour,
/// not the segmentation, is under test); `seed` names it and seeds its random decoder.
pub fn tiny_model(seed: u64) -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = scratch(&format!("model-{seed}")).join("tiny");
        desam::engine::create_untrained_model_dir(
            desam::model::Arch::Tiny,
            &d,
            seed,
            &desam::engine::BackboneSource::Random,
        )
        .expect("tiny model dir");
        d
    })
    .clone()
}

fn free_port() -> u16 {
    desam::harness::free_port().unwrap()
}

/// A test's Orthanc: the shared process harness (fields and queries through `Deref`), with answers
/// that panic with the log on failure, as a test wants.
pub struct Orthanc {
    process: OrthancProcess,
}

impl Deref for Orthanc {
    type Target = OrthancProcess;
    fn deref(&self) -> &OrthancProcess {
        &self.process
    }
}

impl DerefMut for Orthanc {
    fn deref_mut(&mut self) -> &mut OrthancProcess {
        &mut self.process
    }
}

pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// Orthanc's configuration for a test instance; `extra` entries override the defaults.
pub fn config(dir: &Path, http_port: u16, dicom_port: u16, with_plugin: bool, extra: &Value) -> Value {
    let storage = dir.join("storage");
    let mut cfg = json!({
        "Name": "desam-test",
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": AET,
        "DicomCheckCalledAet": false,
        "RemoteAccessAllowed": false,
        "AuthenticationEnabled": false,
        "HttpDescribeErrors": true,
        "StableAge": 1,
        "ConcurrentJobs": 2,
        "StorageDirectory": storage,
        "IndexDirectory": storage,
        "UserMetadata": {"DeSAMResult": 4301, "DeSAMReview": 4302},
        "Plugins": if with_plugin { json!([plugin_path()]) } else { json!([]) },
    });
    if let (Value::Object(c), Value::Object(e)) = (&mut cfg, extra) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    cfg
}

impl Orthanc {
    /// Starts Orthanc in `dir` (reusing its storage if present) and waits until the REST API answers.
    pub fn start(dir: &Path, with_plugin: bool, extra: &Value) -> Orthanc {
        Self::start_with_files(dir, with_plugin, extra, &[])
    }

    /// As `start`, with more configuration files (copied next to orthanc.json; Orthanc reads them all).
    pub fn start_with_files(dir: &Path, with_plugin: bool, extra: &Value, more: &[PathBuf]) -> Orthanc {
        Self::start_with_env(dir, with_plugin, extra, more, &[])
    }

    /// As `start_with_files`, with environment variables for the Orthanc process (otherwise empty).
    pub fn start_with_env(
        dir: &Path,
        with_plugin: bool,
        extra: &Value,
        more: &[PathBuf],
        env: &[(&str, &str)],
    ) -> Orthanc {
        let (http_port, dicom_port) = (free_port(), free_port());
        let cfg = config(dir, http_port, dicom_port, with_plugin, extra);
        let process = OrthancProcess::start(Path::new(ORTHANC), dir, &cfg, more, Some(env))
            .unwrap_or_else(|e| panic!("cannot start Orthanc: {e}"));
        Orthanc { process }
    }

    /// `user:password` → an endpoint with those credentials; None → no credentials.
    fn endpoint_as(&self, auth: Option<&str>) -> Endpoint {
        let e = Endpoint::loopback(self.http_port);
        match auth.and_then(|a| a.split_once(':')) {
            Some((u, p)) => e.with_basic_auth(u, p),
            None => e,
        }
    }

    /// None when Orthanc does not answer at all.
    pub fn try_request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Option<Reply> {
        let (status, body) = self.process.request(method, path, body.unwrap_or_default()).ok()?;
        Some(Reply { status, body })
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
        self.try_request(method, path, body).unwrap_or_else(|| panic!("{method} {path}: no answer from Orthanc"))
    }

    pub fn request_as(&self, method: &str, path: &str, auth: Option<&str>) -> Reply {
        let (status, body) = self
            .process
            .request_with(&self.endpoint_as(auth), method, path, b"")
            .unwrap_or_else(|e| panic!("{method} {path}: no answer from Orthanc: {e}"));
        Reply { status, body }
    }

    pub fn get_json(&self, path: &str) -> Value {
        self.process.get_json(path).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sends files like a scanner (one association).
    pub fn storescu(&self, files: &[PathBuf]) {
        let out = Command::new("storescu")
            .args(["-aec", AET, "-aet", "SCANNER", "127.0.0.1", &self.dicom_port.to_string()])
            .args(files)
            .output()
            .expect("storescu (dcmtk) must be installed");
        assert!(out.status.success(), "storescu failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Orthanc's id of a series, from its SeriesInstanceUID.
    pub fn series_id(&self, series_uid: &str) -> String {
        self.process.series_id(series_uid).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Polls `GET /desam/series/{id}` until its result record has a final status.
    pub fn wait_result(&self, series_id: &str, timeout: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let r = self.request("GET", &format!("/desam/series/{series_id}"), None);
            if r.status == 200 {
                let v = r.json();
                let status = v["Result"]["Status"].as_str().unwrap_or("");
                if ["done", "empty", "failed"].contains(&status) && !v["Running"].as_bool().unwrap_or(false) {
                    return v;
                }
            }
            assert!(self.child_alive(), "Orthanc died; log:\n{}", self.log_text());
            assert!(
                t0.elapsed() < timeout,
                "series {series_id} not processed within {timeout:?}; status {}; log:\n{}",
                self.request("GET", "/desam/status", None).text(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn child_alive(&self) -> bool {
        self.process.alive()
    }

    /// SEG instances (Orthanc ids) in the study of `series_id` that reference that series.
    pub fn segs_referencing(&self, series_id: &str) -> Vec<String> {
        self.process.segs_referencing(series_id).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `POST /tools/shutdown`, then waits for a clean exit (code 0); returns the log.
    pub fn stop(self) -> String {
        self.process.shutdown().unwrap_or_else(|e| panic!("{e}"))
    }
}

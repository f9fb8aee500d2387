//! Test support: a real Orthanc (Debian's /usr/sbin/Orthanc) on free loopback ports with a temporary
//! storage folder and the freshly built plugin; HTTP through curl, DICOM through dcmtk's storescu.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ORTHANC: &str = "/usr/sbin/Orthanc";
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
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Orthanc {
    pub dir: PathBuf,
    pub http_port: u16,
    pub dicom_port: u16,
    pub child: Child,
    pub log: PathBuf,
    pub auth: Option<String>,
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
        let auth = extra
            .get("RegisteredUsers")
            .and_then(Value::as_object)
            .and_then(|m| m.iter().next())
            .map(|(u, p)| format!("{u}:{}", p.as_str().unwrap()));
        let cfg_dir = dir.join("config");
        let _ = std::fs::remove_dir_all(&cfg_dir);
        std::fs::create_dir_all(&cfg_dir).unwrap();
        std::fs::write(cfg_dir.join("orthanc.json"), serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        for f in more {
            std::fs::copy(f, cfg_dir.join(f.file_name().unwrap())).unwrap();
        }
        let cfg_path = cfg_dir;
        let n = std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("orthanc-"))
            .count();
        let log = dir.join(format!("orthanc-{n}.log"));
        let child = Command::new(ORTHANC)
            .arg(format!("--logfile={}", log.display()))
            .arg(&cfg_path)
            .env_clear()
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start /usr/sbin/Orthanc (Debian package orthanc)");
        let mut o = Orthanc { dir: dir.to_path_buf(), http_port, dicom_port, child, log, auth };
        let t0 = Instant::now();
        loop {
            if let Ok(Some(status)) = o.child.try_wait() {
                panic!("Orthanc exited at start-up ({status}); log:\n{}", o.log_text());
            }
            if let Some(r) = o.try_request("GET", "/system", None) {
                if r.status == 200 {
                    break;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "Orthanc did not answer within 90 s; log:\n{}",
                o.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        o
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.http_port, path)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn curl(&self, method: &str, path: &str, body: Option<&[u8]>, auth: Option<&str>) -> Option<Reply> {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-S", "--max-time", "120", "-X", method, "-w", "\n%{http_code}"]);
        if let Some(a) = auth {
            cmd.args(["-u", a]);
        }
        if body.is_some() {
            cmd.args(["--data-binary", "@-"]);
        }
        cmd.arg(self.url(path)).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = cmd.spawn().expect("curl must be installed");
        {
            let mut stdin = child.stdin.take().unwrap();
            if let Some(b) = body {
                // A write error shows up as curl's own failure below.
                let _ = stdin.write_all(b);
            }
        }
        let out = child.wait_with_output().ok()?;
        let text = out.stdout;
        let split = text.iter().rposition(|&b| b == b'\n')?;
        let status: u16 = String::from_utf8_lossy(&text[split + 1..]).trim().parse().ok()?;
        if status == 0 {
            return None;
        }
        Some(Reply { status, body: text[..split].to_vec() })
    }

    pub fn try_request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Option<Reply> {
        self.curl(method, path, body, self.auth.as_deref())
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
        self.try_request(method, path, body).unwrap_or_else(|| panic!("{method} {path}: no answer from Orthanc"))
    }

    pub fn request_as(&self, method: &str, path: &str, auth: Option<&str>) -> Reply {
        self.curl(method, path, None, auth).unwrap_or_else(|| panic!("{method} {path}: no answer from Orthanc"))
    }

    pub fn get_json(&self, path: &str) -> Value {
        let r = self.request("GET", path, None);
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        r.json()
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
        let r = self.request("POST", "/tools/lookup", Some(series_uid.as_bytes()));
        let v = r.json();
        v.as_array()
            .unwrap()
            .iter()
            .find(|x| x["Type"] == "Series")
            .unwrap_or_else(|| panic!("series {series_uid} not found in Orthanc: {v}"))["ID"]
            .as_str()
            .unwrap()
            .to_string()
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
        Path::new(&format!("/proc/{}", self.child.id())).exists()
    }

    /// SEG instances (Orthanc ids) in the study of `series_id` that reference that series.
    pub fn segs_referencing(&self, series_id: &str) -> Vec<String> {
        let series = self.get_json(&format!("/series/{series_id}"));
        let uid = series["MainDicomTags"]["SeriesInstanceUID"].as_str().unwrap().to_string();
        let study = series["ParentStudy"].as_str().unwrap();
        let mut out = Vec::new();
        for s in self.get_json(&format!("/studies/{study}/series")).as_array().unwrap() {
            if s["MainDicomTags"]["Modality"] != "SEG" {
                continue;
            }
            for inst in s["Instances"].as_array().unwrap() {
                let inst = inst.as_str().unwrap();
                let tags = self.get_json(&format!("/instances/{inst}/simplified-tags"));
                let refs = tags["ReferencedSeriesSequence"].as_array().cloned().unwrap_or_default();
                if refs.iter().any(|r| r["SeriesInstanceUID"] == uid.as_str()) {
                    out.push(inst.to_string());
                }
            }
        }
        out
    }

    /// Resident and peak memory of the Orthanc process (kB), from /proc.
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

    /// `POST /tools/shutdown`, then waits for a clean exit (code 0).
    pub fn stop(mut self) -> String {
        let _ = self.try_request("POST", "/tools/shutdown", Some(b""));
        let t0 = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    assert!(status.success(), "Orthanc exited with {status}; log:\n{}", self.log_text());
                    break;
                }
                _ if t0.elapsed() > Duration::from_secs(60) => {
                    let _ = self.child.kill();
                    panic!("Orthanc did not stop within 60 s; log:\n{}", self.log_text());
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let log = self.log_text();
        std::mem::forget(self);
        log
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        // Only reached when a test failed: do not leave the server running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

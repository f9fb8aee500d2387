//! `desam-train pull` against a real Orthanc (Debian's, without the plugin, with HTTP basic
//! authentication): only SEG series marked reviewed are pulled, into the DICOM layout that
//! `desam::train::data` loads; re-runs are no-ops, a newer reviewed SEG replaces the older one,
//! Orthanc is never modified, and each failure is its typed error / a non-zero exit. Over https
//! (a TLS proxy in front of Orthanc, with a CA made at test time) the pull works with that CA given
//! and is refused with a certificate error without it.

#[path = "support/orthanc_harness.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use desam::dicom::{write_seg, AlgorithmType, SegOptions, Segment, SegmentInfo};
use desam::phantom::{self, export::DicomCaseFiles, GenerateOptions, PhantomCase, Site, Size};
use desam::train::data;
use desam::train::pull::{pull, PullOptions, SiteFrom, MANIFEST};
use desam::train::TrainError;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use harness::{scratch, Orthanc};
use serde_json::{json, Value};

const USER: &str = "trainer";
const PASSWORD: &str = "s3cret-pw";

fn phantom_case(site: Site, dir: &Path) -> (PhantomCase, DicomCaseFiles) {
    let case = phantom::generate_case_with(site, 0, 0, &GenerateOptions { size: Size::Small, ..Default::default() });
    let files = phantom::export::write_case_dicom(&case, dir).unwrap();
    (case, files)
}

fn series_uid_of(file: &Path) -> String {
    let obj = dicom_object::open_file(file).unwrap();
    obj.element(tags::SERIES_INSTANCE_UID).unwrap().to_str().unwrap().trim_end_matches('\0').trim().to_string()
}

/// POST /instances (storescu does not propose the Segmentation Storage SOP class by default).
fn post_instance(o: &Orthanc, file: &Path) {
    let r = o.request("POST", "/instances", Some(&std::fs::read(file).unwrap()));
    assert_eq!(r.status, 200, "POST /instances {}: {}", file.display(), r.text());
}

fn instance_count(o: &Orthanc) -> u64 {
    o.get_json("/statistics")["CountInstances"].as_u64().unwrap()
}

fn mark(o: &Orthanc, series_uid: &str, value: &str) {
    let id = o.series_id(series_uid);
    let r = o.request("PUT", &format!("/series/{id}/metadata/4302"), Some(value.as_bytes()));
    assert_eq!(r.status, 200, "PUT metadata: {}", r.text());
}

fn options(o: &Orthanc, out: &Path) -> PullOptions {
    let mut opts = PullOptions::new(&format!("http://127.0.0.1:{}", o.http_port), out);
    opts.connection.user = Some(USER.into());
    opts.connection.password = Some(PASSWORD.into());
    opts
}

fn cli(o: &Orthanc, out: &Path, extra: &[&str]) -> (bool, String, String) {
    let r = Command::new(env!("CARGO_BIN_EXE_desam-train"))
        .args(["pull", "--orthanc", &format!("http://127.0.0.1:{}", o.http_port), "--out"])
        .arg(out)
        .args(["--user", USER, "--password-env", "DESAM_TEST_ORTHANC_PASSWORD"])
        .args(extra)
        .env("DESAM_TEST_ORTHANC_PASSWORD", PASSWORD)
        .output()
        .expect("desam-train runs");
    (
        r.status.success(),
        String::from_utf8_lossy(&r.stdout).into_owned(),
        String::from_utf8_lossy(&r.stderr).into_owned(),
    )
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

/// (path, modification time) of every file under the case folder.
fn snapshot(dir: &Path) -> Vec<(PathBuf, std::time::SystemTime)> {
    let mut v = Vec::new();
    for sub in ["MR", "SEG"] {
        for f in files_in(&dir.join(sub)) {
            let t = std::fs::metadata(&f).unwrap().modified().unwrap();
            v.push((f, t));
        }
    }
    v
}

#[test]
fn pulls_only_reviewed_segs_into_the_training_layout() {
    let root = scratch("pull");
    let src = root.join("phantom");
    let (case_a, a) = phantom_case(Site::A, &src);
    let (_, b) = phantom_case(Site::B, &src);
    let (_, c) = phantom_case(Site::C, &src);

    let o = Orthanc::start(
        &root.join("orthanc"),
        false,
        &json!({"AuthenticationEnabled": true, "RegisteredUsers": {USER: PASSWORD}}),
    );
    let upload: Vec<PathBuf> = a.mr.iter().chain(&b.mr).cloned().collect();
    o.storescu(&upload);
    post_instance(&o, &a.seg);
    post_instance(&o, &b.seg);
    let mr_a = a.volume.source.as_ref().unwrap().series_instance_uid.clone();
    let (seg_a, seg_b) = (series_uid_of(&a.seg), series_uid_of(&b.seg));
    let mr_a_id = o.series_id(&mr_a);
    assert_eq!(o.get_json(&format!("/series/{mr_a_id}/instances")).as_array().unwrap().len(), a.mr.len());
    // What the plugin writes (on the MR series) never counts as reviewed.
    mark(&o, &mr_a, "ok");
    let out = root.join("pulled");

    // Nothing reviewed yet: a typed error, nothing written; the CLI exits non-zero and says how to mark one.
    match pull(&options(&o, &out)) {
        Err(TrainError::NoReviewedSeg { index: 4302, .. }) => {}
        other => panic!("expected NoReviewedSeg, got {other:?}"),
    }
    assert!(!out.exists());
    let (ok, _, err) = cli(&o, &out, &[]);
    assert!(!ok, "pull without a reviewed SEG must fail");
    assert!(err.contains("curl -X PUT") && err.contains("/metadata/4302 -d reviewed"), "{err}");

    // Wrong password: HTTP 401 as a typed error.
    let mut wrong = options(&o, &out);
    wrong.connection.password = Some("nope".into());
    match pull(&wrong) {
        Err(TrainError::OrthancStatus { status: 401, .. }) => {}
        other => panic!("expected HTTP 401, got {other:?}"),
    }

    // A's SEG reviewed by a person; B's SEG unmarked.
    mark(&o, &seg_a, "reviewed");
    let instances_before = instance_count(&o);
    let r = pull(&options(&o, &out)).unwrap();
    assert_eq!(r.pulled, vec!["case_001".to_string()]);
    assert_eq!(r.manifest.cases.len(), 1);
    let pc = &r.manifest.cases[0];
    assert_eq!((pc.mr_series_uid.as_str(), pc.seg_series_uid.as_str()), (mr_a.as_str(), seg_a.as_str()));
    assert_ne!(pc.seg_series_uid, seg_b);
    assert_eq!(pc.mr_instances, a.mr.len());
    let case_dir = out.join("case_001");
    assert_eq!(files_in(&case_dir.join("MR")).len(), a.mr.len());
    let segs = files_in(&case_dir.join("SEG"));
    assert_eq!(segs.len(), 1);
    assert_eq!(std::fs::read(&segs[0]).unwrap(), std::fs::read(&a.seg).unwrap(), "the SEG file is byte-identical");
    assert!(!out.join(".pull-tmp").exists());

    // The manifest: URL without the password, counts.
    let manifest_text = std::fs::read_to_string(out.join(MANIFEST)).unwrap();
    assert!(!manifest_text.contains(PASSWORD));
    let m: Value = serde_json::from_str(&manifest_text).unwrap();
    assert_eq!(m["orthanc"], format!("http://127.0.0.1:{}", o.http_port));
    assert_eq!(m["cases"][0]["mr_instances"], a.mr.len());
    assert_eq!(m["cases"][0]["seg_instances"], 1);

    // desam-train's data layer reads it: site from InstitutionName, the phantom's ground truth.
    let cases = data::list_cases(&out).unwrap();
    assert_eq!(cases.len(), 1);
    assert_eq!(
        (cases[0].id.as_str(), cases[0].site.as_str(), cases[0].patient.as_str()),
        ("case_001", "DESAM_PHANTOM_SITE_A", "1")
    );
    let loaded = data::load_case(&cases[0], true).unwrap();
    assert_eq!(loaded.volume.dims, case_a.labels.dims);
    assert_eq!(loaded.label.count(), case_a.gland_mask().count());

    // Second pull (the CLI binary): a no-op, also once B's SEG carries a value other than "reviewed".
    mark(&o, &seg_b, "needs-review");
    let before = snapshot(&case_dir);
    let (ok, stdout, err) = cli(&o, &out, &[]);
    assert!(ok, "{stdout}\n{err}");
    assert!(stdout.contains("pulled 0 case(s), 1 already up to date"), "{stdout}");
    assert_eq!(snapshot(&case_dir), before, "a re-run must not rewrite a complete case");
    let m2: Value = serde_json::from_slice(&std::fs::read(out.join(MANIFEST)).unwrap()).unwrap();
    assert_eq!(m2["cases"], m["cases"]);

    // A corrected SEG for A (newer) is also marked reviewed: it replaces the older one in case_001.
    let mut opts = SegOptions::new("Reader", "corrected");
    opts.content_label = "CORRECTED".into();
    let mut info = SegmentInfo::prostate("reader");
    info.algorithm_type = AlgorithmType::Manual;
    let newer = write_seg(&a.volume, &[Segment { info, mask: &case_a.gland_mask() }], &opts).unwrap();
    let newer_path = root.join("newer-seg.dcm");
    std::fs::write(&newer_path, &newer).unwrap();
    post_instance(&o, &newer_path);
    let seg_a2 = series_uid_of(&newer_path);
    mark(&o, &seg_a2, "reviewed");
    let instances_before = instances_before + 1;
    let r = pull(&options(&o, &out)).unwrap();
    assert_eq!(r.pulled, vec!["case_001".to_string()]);
    assert_eq!(r.manifest.cases.len(), 1);
    assert_eq!(r.manifest.cases[0].seg_series_uid, seg_a2);
    assert!(r.notes.iter().any(|n| n.contains("taking the newest") && n.contains(&seg_a2)), "{:?}", r.notes);
    let segs = files_in(&case_dir.join("SEG"));
    assert_eq!(segs.len(), 1);
    assert_eq!(std::fs::read(&segs[0]).unwrap(), newer);
    assert_eq!(files_in(&case_dir.join("MR")).len(), a.mr.len());
    let r = pull(&options(&o, &out)).unwrap();
    assert!(r.pulled.is_empty() && r.up_to_date == vec!["case_001".to_string()], "{r:?}");

    // --site for every case, through the CLI, into a fresh folder.
    let out2 = root.join("pulled-site");
    let (ok, stdout, err) = cli(&o, &out2, &["--site", "radboud-umc"]);
    assert!(ok, "{stdout}\n{err}");
    let cases = data::list_cases(&out2).unwrap();
    assert_eq!(cases.len(), 1);
    assert_eq!(cases[0].site, "RADBOUD_UMC");

    // Pulling never changed Orthanc.
    assert_eq!(instance_count(&o), instances_before);
    assert_eq!(
        o.request("GET", &format!("/series/{}/metadata/4302", o.series_id(&seg_b)), None).text(),
        "needs-review"
    );

    // A reviewed SEG whose MR series is not in Orthanc.
    post_instance(&o, &c.seg);
    let seg_c = series_uid_of(&c.seg);
    mark(&o, &seg_c, "reviewed");
    match pull(&options(&o, &out)) {
        Err(TrainError::ReferencedSeriesMissing { seg_series, mr_series, .. }) => {
            assert_eq!(seg_series, seg_c);
            assert_eq!(mr_series, c.volume.source.as_ref().unwrap().series_instance_uid);
        }
        other => panic!("expected ReferencedSeriesMissing, got {other:?}"),
    }
    mark(&o, &seg_c, "rejected");

    // A reviewed SEG without ReferencedSeriesSequence.
    let mut obj = dicom_object::open_file(&c.seg).unwrap();
    assert!(obj.remove_element(tags::REFERENCED_SERIES_SEQUENCE));
    let (sop, series) = ("2.25.1234567890123456789", "2.25.9876543210987654321");
    obj.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(sop)));
    obj.put(DataElement::new(tags::SERIES_INSTANCE_UID, VR::UI, PrimitiveValue::from(series)));
    obj.update_meta(|m| m.media_storage_sop_instance_uid = sop.to_string());
    let broken = root.join("no-reference.dcm");
    obj.write_to_file(&broken).unwrap();
    post_instance(&o, &broken);
    mark(&o, series, "reviewed");
    match pull(&options(&o, &out)) {
        Err(TrainError::SegWithoutReference { seg_series, .. }) => assert_eq!(seg_series, series),
        other => panic!("expected SegWithoutReference, got {other:?}"),
    }
    let (ok, _, err) = cli(&o, &out, &[]);
    assert!(!ok && err.contains("ReferencedSeriesSequence"), "{err}");
    // The failed pulls left the pulled case alone.
    assert_eq!(data::list_cases(&out).unwrap().len(), 1);
    assert_eq!(std::fs::read(&files_in(&case_dir.join("SEG"))[0]).unwrap(), newer);

    o.stop();
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn site_from_a_fixed_value_is_sanitized() {
    // The site option alone, without a server: an empty site is refused before any request.
    let out = scratch("pull-site").join("out");
    let mut opts = PullOptions::new("http://127.0.0.1:9", &out);
    opts.site = SiteFrom::Fixed(" - ".into());
    assert!(matches!(pull(&opts), Err(TrainError::Invalid(_))));
    assert!(!out.exists());
}

/// Runs `openssl` in `dir` and insists it succeeds.
fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs (Debian's openssl)");
    assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// A private CA (`ca.pem`) and a server certificate it signed for 127.0.0.1 (`server.pem`,
/// `server.key`), made fresh in `dir`, as a hospital's own CA would issue them.
fn private_ca_and_server_cert(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=desam test hospital CA"]);
    ca.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    dir.join("ca.pem")
}

/// The TLS proxy (tests/support/tls_proxy.py) in front of Orthanc's HTTP port; killed on drop.
struct TlsProxy {
    child: Child,
    port: u16,
}

impl TlsProxy {
    fn start(cert_dir: &Path, upstream_port: u16) -> TlsProxy {
        let python = std::env::var_os("DESAM_PYTHON").map(PathBuf::from).unwrap_or_else(|| "python3".into());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/tls_proxy.py");
        let mut child = Command::new(python)
            .arg(script)
            .arg(cert_dir.join("server.pem"))
            .arg(cert_dir.join("server.key"))
            .arg(upstream_port.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the TLS proxy starts");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| panic!("the TLS proxy printed {line:?}, not its port"));
        TlsProxy { child, port }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn pulls_over_https_with_a_private_ca_and_refuses_an_untrusted_certificate() {
    let root = scratch("pull-https");
    let (_, a) = phantom_case(Site::A, &root.join("phantom"));
    let o = Orthanc::start(
        &root.join("orthanc"),
        false,
        &json!({"AuthenticationEnabled": true, "RegisteredUsers": {USER: PASSWORD}}),
    );
    o.storescu(&a.mr);
    post_instance(&o, &a.seg);
    mark(&o, &series_uid_of(&a.seg), "reviewed");
    let ca = private_ca_and_server_cert(&root.join("tls"));
    let proxy = TlsProxy::start(&root.join("tls"), o.http_port);
    let url = format!("https://127.0.0.1:{}", proxy.port);
    let https_options = |out: &Path| {
        let mut opts = options(&o, out);
        opts.connection.orthanc = url.clone();
        opts
    };

    // With the private CA: the same pull as over http, and the manifest records the https URL.
    let out = root.join("pulled");
    let mut opts = https_options(&out);
    opts.connection.ca_file = Some(ca.clone());
    let r = pull(&opts).unwrap();
    assert_eq!(r.pulled, vec!["case_001".to_string()]);
    assert_eq!(r.manifest.orthanc, url);
    assert_eq!(files_in(&out.join("case_001").join("MR")).len(), a.mr.len());
    assert_eq!(std::fs::read(&files_in(&out.join("case_001").join("SEG"))[0]).unwrap(), std::fs::read(&a.seg).unwrap());

    // Without it the certificate is not trusted: a typed TLS error that says what to do, nothing written.
    let refused = root.join("refused");
    match pull(&https_options(&refused)) {
        Err(TrainError::OrthancTls { message, .. }) => {
            assert!(message.contains("certificate is not trusted") && message.contains("--ca-file"), "{message}")
        }
        other => panic!("expected a TLS certificate error, got {other:?}"),
    }
    assert!(!refused.exists());

    // The CLI: DESAM_CA_FILE or --ca-file makes it trusted; neither gives a non-zero exit with the reason.
    let cli_https = |out: &Path, ca_env: Option<&Path>, extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_desam-train"));
        c.args(["pull", "--orthanc", &url, "--out"]).arg(out);
        c.args(["--user", USER, "--password-env", "DESAM_TEST_ORTHANC_PASSWORD"]).args(extra);
        c.env("DESAM_TEST_ORTHANC_PASSWORD", PASSWORD).env_remove("DESAM_CA_FILE");
        if let Some(ca) = ca_env {
            c.env("DESAM_CA_FILE", ca);
        }
        let r = c.output().expect("desam-train runs");
        (r.status.success(), String::from_utf8_lossy(&r.stderr).into_owned())
    };
    let (ok, err) = cli_https(&root.join("cli-env"), Some(&ca), &[]);
    assert!(ok, "{err}");
    assert_eq!(data::list_cases(&root.join("cli-env")).unwrap().len(), 1);
    let (ok, err) = cli_https(&root.join("cli-flag"), None, &["--ca-file", ca.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, err) = cli_https(&root.join("cli-none"), None, &[]);
    assert!(!ok && err.contains("certificate is not trusted"), "{err}");

    drop(proxy);
    o.stop();
    let _ = std::fs::remove_dir_all(&root);
}

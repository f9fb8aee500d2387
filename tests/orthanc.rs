//! The Orthanc plugin against a real Orthanc: automatic trigger, exactly-once, restart catch-up,
//! series rules, bad series, load, REST routes and authentication. Series are sent with storescu.

#[path = "support/orthanc_harness.rs"]
mod harness;

use desam::dicom::{self, MrSeriesAttributes};
use desam::Volume;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use harness::{scratch, Orthanc};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(240);

fn desam_section(extra: Value) -> Value {
    let mut s = json!({
        "ModelDirectory": harness::tiny_model(11),
        "Device": "cpu",
        "Threads": 1,
        "Mode": "box",
        "MaxQueueLength": 10,
        "SeriesFilter": {"MinSlices": 6},
    });
    if let (Value::Object(a), Value::Object(b)) = (&mut s, extra) {
        for (k, v) in b {
            a.insert(k, v);
        }
    }
    s
}

/// A small prostate-like volume: a bright ellipsoid in darker, noisy tissue.
fn volume(nz: usize, n: usize, seed: u64, direction: [[f64; 3]; 3]) -> Volume {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut v = Vec::with_capacity(nz * n * n);
    for z in 0..nz {
        for y in 0..n {
            for x in 0..n {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let noise = ((state >> 33) % 40) as f32;
                let (dx, dy, dz) = (x as f64 / n as f64 - 0.5, y as f64 / n as f64 - 0.55, z as f64 / nz as f64 - 0.5);
                let inside = (dx / 0.18).powi(2) + (dy / 0.14).powi(2) + (dz / 0.35).powi(2) <= 1.0;
                v.push(if inside { 700.0 } else { 250.0 } + noise);
            }
        }
    }
    let mut vol = Volume::new(v, [nz, n, n], [0.7, 0.7, 3.0], [-20.0, -30.0, 10.0]);
    vol.direction = direction;
    vol
}

const AXIAL: [[f64; 3]; 3] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
const CORONAL: [[f64; 3]; 3] = [[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]];

/// Writes an MR series; returns (files, SeriesInstanceUID).
fn mr_series(
    dir: &Path,
    nz: usize,
    n: usize,
    seed: u64,
    direction: [[f64; 3]; 3],
    description: &str,
) -> (Vec<PathBuf>, String) {
    let attrs = MrSeriesAttributes {
        series_description: description.into(),
        protocol_name: description.into(),
        ..Default::default()
    };
    let written = dicom::write_mr_series_full(&volume(nz, n, seed, direction), &attrs, dir).unwrap();
    let uid = written
        .volume
        .source
        .as_ref()
        .map(|s| s.series_instance_uid.clone())
        .unwrap_or_else(|| read_series_uid(&written.paths[0]));
    (written.paths, uid)
}

fn read_series_uid(path: &Path) -> String {
    let obj = dicom_object::open_file(path).unwrap();
    obj.element(tags::SERIES_INSTANCE_UID).unwrap().to_str().unwrap().trim_end_matches('\0').trim().to_string()
}

fn dciodvfy_errors(path: &Path) -> Vec<String> {
    let out = Command::new("dciodvfy").arg(path).output().expect("dciodvfy (dicom3tools) must be installed");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    text.lines().filter(|l| l.starts_with("Error")).map(str::to_string).collect()
}

fn counters(o: &Orthanc) -> Value {
    o.get_json("/desam/status")["Counters"].clone()
}

/// Waits until the worker has nothing queued or running.
fn wait_idle(o: &Orthanc) {
    let t0 = std::time::Instant::now();
    loop {
        let q = o.get_json("/desam/status")["Queue"].clone();
        if q["Length"] == 0 && q["Running"].is_null() {
            return;
        }
        assert!(t0.elapsed() < TIMEOUT, "worker never idle: {q}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_series_gets_exactly_one_valid_seg_and_other_series_are_skipped_with_a_reason() {
    let dir = scratch("once");
    let o = Orthanc::start(&dir, true, &json!({"DeSAM": desam_section(json!({}))}));

    let (files, uid) = mr_series(&dir.join("t2"), 8, 48, 1, AXIAL, "t2_tse_tra");
    o.storescu(&files);
    let id = o.series_id(&uid);
    let result = o.wait_result(&id, TIMEOUT);
    let record = &result["Result"];
    assert_eq!(record["Status"], "done", "{result}");
    assert_eq!(record["InstanceCount"], 8);
    assert!(record["QualityScore"].is_number() && record["VolumeMl"].is_number(), "{record}");
    assert!(record["ModelSha256"].as_str().unwrap().len() == 64);

    // Exactly one SEG, valid, aligned with the source, carrying the model's version.
    let segs = o.segs_referencing(&id);
    assert_eq!(segs.len(), 1, "SEGs: {segs:?}");
    let seg_bytes = o.request("GET", &format!("/instances/{}/file", segs[0]), None).body;
    let seg_path = dir.join("seg.dcm");
    std::fs::write(&seg_path, &seg_bytes).unwrap();
    let errors = dciodvfy_errors(&seg_path);
    assert!(errors.is_empty(), "dciodvfy: {errors:?}");
    let source = dicom::load_series_files(&files).unwrap().volume;
    let masks = dicom::read_seg(&seg_bytes, &source).unwrap();
    assert_eq!(masks.len(), 1);
    assert_eq!(masks[0].1.dims, source.dims);
    let tags = o.get_json(&format!("/instances/{}/simplified-tags", segs[0]));
    assert_eq!(tags["Manufacturer"], "desam");
    let versions = tags["SoftwareVersions"].to_string();
    let short = &record["ModelSha256"].as_str().unwrap()[..16];
    assert!(versions.contains(short), "SoftwareVersions {versions} should name the model hash {short}");
    assert_eq!(
        record["SegSopInstanceUid"].as_str().or(record["SegSOPInstanceUID"].as_str()),
        tags["SOPInstanceUID"].as_str(),
        "{record}"
    );
    let review = o.get_json(&format!("/series/{id}/metadata?expand"));
    assert!(review["DeSAMReview"] == "ok" || review["DeSAMReview"] == "needs-review", "{review}");

    // It ran as an Orthanc job.
    let jobs = o.get_json("/jobs?expand");
    let ours: Vec<&Value> = jobs.as_array().unwrap().iter().filter(|j| j["Type"] == "DeSAMSegmentation").collect();
    assert_eq!(ours.len(), 1, "{jobs}");
    assert_eq!(ours[0]["State"], "Success");
    assert_eq!(ours[0]["Content"]["Series"], id.as_str());

    // Re-send: no duplicate (the StableSeries that may follow and a manual request are both skipped).
    let skipped_before = counters(&o)["Skipped"].as_u64().unwrap();
    o.storescu(&files);
    std::thread::sleep(Duration::from_secs(4));
    let r = o.request("POST", &format!("/desam/series/{id}/segment"), Some(b""));
    assert_eq!(r.status, 200, "{}", r.text());
    wait_idle(&o);
    assert!(counters(&o)["Skipped"].as_u64().unwrap() > skipped_before);
    assert_eq!(o.segs_referencing(&id).len(), 1);
    assert_eq!(counters(&o)["Processed"], 1);

    // Series the plugin must leave alone: CT, a coronal T2, a DWI, too few slices.
    let ct = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".venv/lib/python3.11/site-packages/pydicom/data/test_files/CT_small.dcm");
    o.storescu(std::slice::from_ref(&ct));
    let (cor, cor_uid) = mr_series(&dir.join("cor"), 8, 32, 2, CORONAL, "t2_tse_cor");
    let (dwi, dwi_uid) = mr_series(&dir.join("dwi"), 8, 32, 3, AXIAL, "ep2d_diff_tra");
    let (short_files, short_uid) = mr_series(&dir.join("short"), 3, 32, 4, AXIAL, "t2_tse_tra");
    o.storescu(&[cor, dwi, short_files].concat());
    std::thread::sleep(Duration::from_secs(4));
    wait_idle(&o);
    let log = o.log_text();
    for (uid, reason) in [(&cor_uid, "from axial"), (&dwi_uid, "DescriptionPattern"), (&short_uid, "MinSlices")] {
        let sid = o.series_id(uid);
        assert!(
            log.lines().any(|l| l.contains(&sid) && l.contains("skipped") && l.contains(reason)),
            "no skip line with {reason:?} for {sid}"
        );
        assert!(o.segs_referencing(&sid).is_empty());
    }
    assert!(log.lines().any(|l| l.contains("skipped") && l.contains("not MR")), "CT not reported as skipped");
    let seg_series = o.get_json(&format!("/instances/{}", segs[0]))["ParentSeries"].as_str().unwrap().to_string();
    assert!(
        log.lines().any(|l| l.contains(&seg_series) && l.contains("skipped") && l.contains("our own output")),
        "own SEG not reported as skipped"
    );
    assert_eq!(counters(&o)["Processed"], 1);

    // Metrics reach Prometheus.
    let prom = o.request("GET", "/tools/metrics-prometheus", None).text();
    assert!(prom.lines().any(|l| l.starts_with("desam_series_processed ") && l.contains(" 1")), "{prom}");
    assert!(prom.contains("desam_queue_length"), "{prom}");
    o.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rest_routes_answer_and_follow_orthanc_authentication() {
    let dir = scratch("rest");
    let o = Orthanc::start(
        &dir,
        true,
        &json!({
            "AuthenticationEnabled": true,
            "RegisteredUsers": {"alice": "s3cret"},
            "DeSAM": desam_section(json!({
                "StableSeriesTrigger": false,
                "ViewerUrlTemplate": "http://viewer.example/segmentation?StudyInstanceUIDs={StudyInstanceUID}&o={OrthancSeriesId}",
            })),
        }),
    );
    for path in ["/desam/status", "/desam/models", "/desam/series/0000"] {
        assert_eq!(o.request_as("GET", path, None).status, 401, "{path} without credentials");
        assert_eq!(o.request_as("GET", path, Some("alice:wrong")).status, 401, "{path} with a wrong password");
    }
    assert_eq!(o.request_as("POST", "/desam/series/0000/segment", None).status, 401);

    let status = o.get_json("/desam/status");
    assert_eq!(status["Enabled"], true);
    assert_eq!(status["ModelLoaded"], false, "the model must load lazily: {status}");
    assert!(status["Model"]["Name"].as_str().is_some(), "{status}");
    let models = o.get_json("/desam/models");
    assert_eq!(models["Active"]["Identity"]["Sha256"], status["Model"]["Sha256"]);
    assert!(models["Available"].as_array().unwrap().iter().any(|m| m["Active"] == true), "{models}");
    assert_eq!(o.request("GET", "/desam/series/0123abcd", None).status, 404);
    assert_eq!(o.request("POST", "/desam/series/0123abcd/segment", Some(b"")).status, 404);
    assert_eq!(o.request("GET", "/desam/series/0123abcd/segment", None).status, 405);

    // Manual trigger with a mode (automatic trigger is off in this instance).
    let (files, uid) = mr_series(&dir.join("t2"), 6, 32, 5, AXIAL, "t2_tse_tra");
    o.storescu(&files);
    let id = o.series_id(&uid);
    assert_eq!(o.request("POST", &format!("/desam/series/{id}/segment"), Some(b"{\"Mode\": 3}")).status, 400);
    let r = o.request("POST", &format!("/desam/series/{id}/segment"), Some(br#"{"Mode": "grid"}"#));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["Mode"], "grid");
    let result = o.wait_result(&id, TIMEOUT);
    assert_eq!(result["Result"]["Status"], "done", "{result}");
    assert_eq!(result["Result"]["Mode"], "grid");
    // The link to the study in the configured viewer (ViewerUrlTemplate).
    let study =
        o.get_json(&format!("/studies/{}", o.get_json(&format!("/series/{id}"))["ParentStudy"].as_str().unwrap()));
    let study_uid = study["MainDicomTags"]["StudyInstanceUID"].as_str().unwrap();
    assert_eq!(result["ViewerUrl"], format!("http://viewer.example/segmentation?StudyInstanceUIDs={study_uid}&o={id}"));
    assert_eq!(o.get_json("/desam/status")["ModelLoaded"], true);
    o.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Polls Orthanc's `/jobs/{id}` until its State is `state`.
fn wait_job_state(o: &Orthanc, job: &str, state: &str) -> Value {
    let t0 = std::time::Instant::now();
    loop {
        let j = o.get_json(&format!("/jobs/{job}"));
        if j["State"] == state {
            return j;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60) && j["State"] != "Success",
            "job {job} never reached {state}: {j}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn orthanc_conventions_unknown_keys_job_ids_and_cancel_error_bodies_and_odd_matrices() {
    let dir = scratch("conventions");
    let section = desam_section(json!({"StableSeriesTrigger": false, "NoSuchOption": 1}));
    let o = Orthanc::start(&dir, true, &json!({"DeSAM": section}));

    // An unknown key is a logged warning; the plugin runs.
    let status = o.get_json("/desam/status");
    assert_eq!(status["Enabled"], true, "{status}");
    assert_eq!(status["IgnoredOptions"], json!(["NoSuchOption"]), "{status}");
    assert!(
        o.log_text().lines().any(|l| l.starts_with('W') && l.contains("NoSuchOption") && l.contains("ignored")),
        "no warning for the unknown key:\n{}",
        o.log_text()
    );

    // Error bodies carry Orthanc's keys.
    let r = o.request("GET", "/desam/series/0123abcd", None);
    assert_eq!(r.status, 404);
    let body = r.json();
    assert_eq!(body["Message"], "Unknown resource", "{body}");
    assert!(body["Details"].as_str().unwrap().contains("0123abcd"), "{body}");
    let r = o.request("POST", "/desam/series/0123abcd/segment", Some(br#"{"Mode": "points"}"#));
    assert_eq!(r.status, 400);
    assert!(r.json()["Details"].as_str().unwrap().contains("Mode"), "{}", r.text());

    // A slow run (grid mode, 40 × 128²) to cancel, and a small series whose Columns (36) is not a
    // multiple of 8.
    let (slow, slow_uid) = mr_series(&dir.join("slow"), 40, 128, 21, AXIAL, "t2_tse_tra");
    let (odd, odd_uid) = mr_series(&dir.join("odd"), 6, 36, 22, AXIAL, "t2_tse_tra");
    o.storescu(&[slow, odd].concat());
    let (slow_id, odd_id) = (o.series_id(&slow_uid), o.series_id(&odd_uid));
    let slow_instances = o.get_json(&format!("/series/{slow_id}"))["Instances"].clone();

    // The segment route names the Orthanc job that runs the request.
    let segment = |id: &str, body: &[u8]| {
        let r = o.request("POST", &format!("/desam/series/{id}/segment"), Some(body));
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let job = v["ID"].as_str().unwrap_or_else(|| panic!("no job ID: {v}")).to_string();
        assert_eq!(v["Path"], format!("/jobs/{job}"), "{v}");
        assert_eq!(o.get_json(&format!("/jobs/{job}"))["Type"], "DeSAMSegmentation");
        job
    };
    let t0 = std::time::Instant::now();
    let slow_job = segment(&slow_id, br#"{"Mode": "grid"}"#);
    eprintln!("{:.2} s: slow job {slow_job} queued", t0.elapsed().as_secs_f64());
    let odd_job = segment(&odd_id, b"");
    // Canceled while it waits in the queue: it never runs.
    let queued_job = segment(&odd_id, br#"{"Force": true}"#);
    assert_eq!(o.request("POST", &format!("/jobs/{queued_job}/cancel"), Some(b"")).status, 200);

    eprintln!("{:.2} s: other jobs queued, one canceled", t0.elapsed().as_secs_f64());
    // Cancel the slow job while it runs.
    wait_job_state(&o, &slow_job, "Running");
    eprintln!("{:.2} s: slow job running", t0.elapsed().as_secs_f64());
    assert_eq!(o.request("POST", &format!("/jobs/{slow_job}/cancel"), Some(b"")).status, 200);
    eprintln!("{:.2} s: cancel sent", t0.elapsed().as_secs_f64());
    let canceled = wait_job_state(&o, &slow_job, "Failure");
    eprintln!("{:.2} s: canceled job: {canceled}", t0.elapsed().as_secs_f64());

    let odd_result = o.wait_result(&odd_id, TIMEOUT);
    wait_idle(&o);
    assert_eq!(o.get_json(&format!("/jobs/{odd_job}"))["State"], "Success");
    assert_eq!(o.get_json(&format!("/jobs/{queued_job}"))["State"], "Failure");
    // The canceled run stored nothing and left its source as it was.
    assert!(o.segs_referencing(&slow_id).is_empty());
    assert_eq!(o.get_json(&format!("/series/{slow_id}"))["Instances"], slow_instances);
    assert!(o.get_json(&format!("/desam/series/{slow_id}"))["Result"].is_null());
    assert_eq!(counters(&o)["Processed"], 1, "only the odd series ran to the end");

    // Columns 36: a FRACTIONAL SEG, a warning in the log and in the series status.
    let record = &odd_result["Result"];
    assert_eq!(record["Status"], "done", "{odd_result}");
    let warnings = record["Warnings"].to_string();
    assert!(warnings.contains("not a multiple of 8") && warnings.contains("FRACTIONAL"), "{record}");
    let segs = o.segs_referencing(&odd_id);
    assert_eq!(segs.len(), 1, "the canceled duplicate request must not have run");
    assert_eq!(o.get_json(&format!("/instances/{}/simplified-tags", segs[0]))["SegmentationType"], "FRACTIONAL");
    let log = o.stop();
    assert!(
        log.lines().any(|l| l.starts_with('W') && l.contains(&odd_id) && l.contains("not a multiple of 8")),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn invalid_configuration_disables_the_plugin_but_orthanc_keeps_running() {
    let dir = scratch("badcfg");
    let o = Orthanc::start(&dir, true, &json!({"DeSAM": {"ModelDirectory": harness::tiny_model(11), "Device": "tpu"}}));
    let status = o.get_json("/desam/status");
    assert_eq!(status["Enabled"], false);
    assert!(status["Reason"].as_str().unwrap().contains("Device"), "{status}");
    assert_eq!(o.request("GET", "/desam/models", None).status, 404, "only the status route exists when disabled");
    assert_eq!(o.request("GET", "/system", None).status, 200);
    let log = o.stop();
    assert!(
        log.lines()
            .any(|l| l.starts_with('E') && l.contains("DeSAM") && l.contains("Device") && l.contains("disabled")),
        "{log}"
    );

    // The shipped sample configuration is accepted by Orthanc and by the plugin (only the model
    // directory, absent on a build machine, stops it).
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugin-manifest/orthanc/desam.json");
    let o = Orthanc::start_with_files(&scratch("sample"), true, &json!({}), &[sample]);
    let status = o.get_json("/desam/status");
    let reason = status["Reason"].as_str().unwrap_or("");
    assert!(
        status["Enabled"] == true
            || (reason.contains("/usr/share/desam/models/default") && !reason.contains("invalid")),
        "{status}"
    );
    o.stop();

    let missing = scratch("nomodel");
    let o = Orthanc::start(&missing, true, &json!({"DeSAM": {"ModelDirectory": "/nonexistent/desam-model"}}));
    let status = o.get_json("/desam/status");
    assert_eq!(status["Enabled"], false);
    assert!(status["Reason"].as_str().unwrap().contains("/nonexistent/desam-model"), "{status}");
    o.stop();
}

fn rewrite(path: &Path, edit: impl FnOnce(&mut dicom_object::DefaultDicomObject)) {
    let mut obj = dicom_object::open_file(path).unwrap();
    edit(&mut obj);
    obj.write_to_file(path).unwrap();
}

#[test]
fn bad_series_fail_their_jobs_cleanly_and_other_series_are_still_processed() {
    let dir = scratch("bad");
    let section = desam_section(
        json!({"SeriesFilter": {"MinSlices": 1, "DescriptionPattern": null, "ScanningSequencePattern": null}}),
    );
    let o = Orthanc::start(&dir, true, &json!({"DeSAM": section}));

    // Truncated pixel data in one slice.
    let (corrupt, corrupt_uid) = mr_series(&dir.join("corrupt"), 6, 32, 6, AXIAL, "t2 corrupt");
    rewrite(&corrupt[2], |obj| {
        let px = obj.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap().to_vec();
        obj.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(px[..px.len() / 2].to_vec())));
    });
    // One slice in another orientation.
    let (mixed, mixed_uid) = mr_series(&dir.join("mixed"), 6, 32, 7, AXIAL, "t2 mixed");
    rewrite(&mixed[3], |obj| {
        obj.put(DataElement::new(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, PrimitiveValue::from("1\\0\\0\\0\\0\\-1")));
    });
    // No pixel data at all.
    let (nopixels, nopixels_uid) = mr_series(&dir.join("nopixels"), 6, 32, 8, AXIAL, "t2 no pixels");
    for f in &nopixels {
        rewrite(f, |obj| {
            obj.remove_element(tags::PIXEL_DATA);
        });
    }
    // A transfer syntax the reader cannot decode (JPEG-LS).
    let jls = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".venv/lib/python3.11/site-packages/pydicom/data/test_files/MR_small_jpeg_ls_lossless.dcm");
    let jls_uid = read_series_uid(&jls);

    o.storescu(&corrupt);
    o.storescu(&mixed);
    o.storescu(&nopixels);
    // storescu cannot offer JPEG-LS to this Orthanc; a REST upload stores it as it is.
    let r = o.request("POST", "/instances", Some(&std::fs::read(&jls).unwrap()));
    assert_eq!(r.status, 200, "{}", r.text());
    let (good, good_uid) = mr_series(&dir.join("good"), 6, 32, 9, AXIAL, "t2 good");
    o.storescu(&good);

    let good_id = o.series_id(&good_uid);
    assert_eq!(o.wait_result(&good_id, TIMEOUT)["Result"]["Status"], "done");
    let mut errors = Vec::new();
    for uid in [&corrupt_uid, &mixed_uid, &nopixels_uid, &jls_uid] {
        let id = o.series_id(uid);
        let r = o.wait_result(&id, TIMEOUT);
        assert_eq!(r["Result"]["Status"], "failed", "{r}");
        assert!(o.segs_referencing(&id).is_empty());
        errors.push(r["Result"]["Error"].as_str().unwrap().to_string());
    }
    eprintln!("failure messages: {errors:#?}");
    assert!(errors[0].contains("pixel data") || errors[0].contains("Pixel"), "{}", errors[0]);
    assert!(errors[1].contains("orientation"), "{}", errors[1]);
    assert!(errors[2].contains("no pixel data"), "{}", errors[2]);
    assert!(errors[3].to_lowercase().contains("transfer syntax") || errors[3].contains("JPEG-LS"), "{}", errors[3]);
    for e in &errors {
        assert!(!e.contains('\n') && e.starts_with("cannot read the series"), "{e}");
    }
    // Failed Orthanc jobs carry the same message.
    let jobs = o.get_json("/jobs?expand");
    let failed: Vec<&Value> = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["Type"] == "DeSAMSegmentation" && j["State"] == "Failure")
        .collect();
    assert_eq!(failed.len(), 4, "{jobs}");
    assert!(
        failed.iter().all(|j| j["Content"]["Error"].as_str().is_some_and(|e| errors.iter().any(|x| x == e))),
        "{jobs}"
    );
    assert_eq!(counters(&o)["Failed"], 4);
    assert_eq!(o.request("GET", "/system", None).status, 200);
    let log = o.stop();
    assert!(
        log.lines().filter(|l| l.starts_with('E') && l.contains("DeSAM: series") && l.contains("failed")).count() >= 4
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn restart_processes_series_that_arrived_while_the_plugin_was_not_running() {
    let dir = scratch("restart");
    let cfg = json!({"DeSAM": desam_section(json!({}))});
    // First start with the plugin: it records where the change log stands.
    let o = Orthanc::start(&dir, true, &cfg);
    let t0 = std::time::Instant::now();
    while o.get_json("/desam/status")["Queue"]["Cursor"].as_i64().unwrap_or(-1) < 0 {
        assert!(t0.elapsed() < TIMEOUT, "the change cursor was never stored");
        std::thread::sleep(Duration::from_millis(200));
    }
    o.stop();
    // Orthanc without the plugin receives a series and stops.
    let o = Orthanc::start(&dir, false, &json!({}));
    let (files, uid) = mr_series(&dir.join("t2"), 6, 32, 10, AXIAL, "t2_tse_tra");
    o.storescu(&files);
    let id = o.series_id(&uid);
    o.stop();
    // Back with the plugin: the series is processed at start-up.
    let o = Orthanc::start(&dir, true, &cfg);
    assert_eq!(o.wait_result(&id, TIMEOUT)["Result"]["Status"], "done");
    assert_eq!(o.segs_referencing(&id).len(), 1);
    let log = o.stop();
    assert!(log.contains("catching up"), "{log}");
    // Another restart: nothing is processed twice.
    let o = Orthanc::start(&dir, true, &cfg);
    std::thread::sleep(Duration::from_secs(3));
    wait_idle(&o);
    assert_eq!(o.segs_referencing(&id).len(), 1);
    assert_eq!(counters(&o)["Processed"], 0);
    o.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn twenty_series_at_once_are_each_segmented_exactly_once_with_a_bounded_queue() {
    let dir = scratch("load");
    let max_queue = 4;
    let o = Orthanc::start(&dir, true, &json!({"DeSAM": desam_section(json!({"MaxQueueLength": max_queue}))}));
    let (rss0, _) = o.rss_kb();
    let mut all = Vec::new();
    let mut uids = Vec::new();
    for i in 0..20 {
        let (files, uid) = mr_series(&dir.join(format!("s{i}")), 6, 32, 100 + i, AXIAL, "t2_tse_tra");
        all.extend(files);
        uids.push(uid);
    }
    let t0 = std::time::Instant::now();
    o.storescu(&all);
    let mut peak_rss = 0;
    for uid in &uids {
        let id = o.series_id(uid);
        assert_eq!(o.wait_result(&id, TIMEOUT)["Result"]["Status"], "done");
        peak_rss = peak_rss.max(o.rss_kb().0);
    }
    wait_idle(&o);
    let elapsed = t0.elapsed();
    for uid in &uids {
        assert_eq!(o.segs_referencing(&o.series_id(uid)).len(), 1, "series {uid}");
    }
    let c = counters(&o);
    assert_eq!(c["Processed"], 20, "{c}");
    assert_eq!(c["Failed"], 0, "{c}");
    // 20 stable series against a queue of 4: it fills to its bound and never beyond.
    assert_eq!(c["QueueHighWater"].as_u64().unwrap(), max_queue as u64, "{c}");
    let (rss, hwm) = o.rss_kb();
    eprintln!(
        "load: 20 series (6×32×32) in {:.1} s; Orthanc RSS idle {} MB, during {} MB, after {} MB, peak {} MB; queue high water {}",
        elapsed.as_secs_f64(),
        rss0 / 1024,
        peak_rss / 1024,
        rss / 1024,
        hwm / 1024,
        c["QueueHighWater"]
    );
    assert!(hwm < 3 * 1024 * 1024, "Orthanc peak RSS {} MB", hwm / 1024);
    o.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shutdown_during_a_job_is_clean_and_the_series_is_completed_after_restart() {
    let dir = scratch("shutdown");
    // Grid mode (81 prompts per slice) on 40 slices keeps the job running for many seconds, so the
    // stop below lands inside it; the restart uses box mode to finish quickly.
    let o = Orthanc::start(&dir, true, &json!({"DeSAM": desam_section(json!({"Mode": "grid"}))}));
    let (files, uid) = mr_series(&dir.join("t2"), 40, 128, 12, AXIAL, "t2_tse_tra");
    o.storescu(&files);
    let id = o.series_id(&uid);
    // Stop Orthanc as soon as the series is running.
    let t0 = std::time::Instant::now();
    loop {
        let status = o.get_json("/desam/status");
        if status["Queue"]["Running"] == id.as_str() {
            break;
        }
        assert_eq!(status["Counters"]["Processed"], 0, "the series finished before the stop: {status}");
        assert!(t0.elapsed() < TIMEOUT, "the series never started: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let stop_started = std::time::Instant::now();
    let log = o.stop(); // asserts exit code 0
    let stop_s = stop_started.elapsed().as_secs_f64();
    eprintln!("shutdown with a running series took {stop_s:.1} s");
    assert!(stop_s < 30.0, "shutdown took {stop_s:.1} s");
    assert!(log.contains(&format!("series {id} interrupted by the shutdown")), "{log}");
    assert!(!log.contains("segmented in"), "{log}");
    // After a restart the interrupted series is segmented by the new process, exactly once.
    let o = Orthanc::start(&dir, true, &json!({"DeSAM": desam_section(json!({}))}));
    assert_eq!(o.wait_result(&id, TIMEOUT)["Result"]["Status"], "done");
    std::thread::sleep(Duration::from_secs(2));
    wait_idle(&o);
    assert_eq!(o.segs_referencing(&id).len(), 1);
    assert_eq!(counters(&o)["Processed"], 1);
    o.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Segments `id` on request (optionally forced) and waits for this request's result record: the
/// series must have left the queue and finished running (an older record is there all along).
fn segment_and_wait(o: &Orthanc, id: &str, body: &[u8]) -> Value {
    let r = o.request("POST", &format!("/desam/series/{id}/segment"), Some(body));
    assert_eq!(r.status, 200, "{}", r.text());
    let t0 = std::time::Instant::now();
    loop {
        let v = o.get_json(&format!("/desam/series/{id}"));
        if v["Queued"] == false && v["Running"] == false {
            return o.wait_result(id, TIMEOUT);
        }
        assert!(t0.elapsed() < TIMEOUT, "series {id} never left the queue: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn review_route_marks_a_seg_reviewed_for_pull_and_refuses_non_segs_strangers_and_orphans() {
    let dir = scratch("review");
    let o = Orthanc::start(
        &dir,
        true,
        &json!({
            "AuthenticationEnabled": true,
            "RegisteredUsers": {"alice": "s3cret"},
            "DeSAM": desam_section(json!({"StableSeriesTrigger": false})),
        }),
    );
    let (files, uid) = mr_series(&dir.join("t2"), 6, 32, 31, AXIAL, "t2_tse_tra");
    o.storescu(&files);
    let mr_id = o.series_id(&uid);
    assert_eq!(segment_and_wait(&o, &mr_id, b"")["Result"]["Status"], "done");
    let seg_instance = o.segs_referencing(&mr_id)[0].clone();
    let seg_series = o.get_json(&format!("/instances/{seg_instance}"))["ParentSeries"].as_str().unwrap().to_string();
    let seg_bytes = o.request("GET", &format!("/instances/{seg_instance}/file"), None).body;
    let review = |id: &str, body: &[u8]| o.request("POST", &format!("/desam/series/{id}/review"), Some(body));

    // Behind Orthanc's authentication like every route.
    assert_eq!(o.request_as("POST", &format!("/desam/series/{seg_series}/review"), None).status, 401);
    // Only a SEG series is reviewed; the body needs a reviewer.
    let r = review(&mr_id, br#"{"State": "reviewed", "Reviewer": "Dr Test"}"#);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["Message"], "Not a DICOM-SEG series", "{}", r.text());
    assert!(r.json()["Details"].as_str().unwrap().contains("MR"), "{}", r.text());
    assert_eq!(review(&seg_series, br#"{"State": "reviewed"}"#).status, 400);
    assert_eq!(review("0123abcd", br#"{"Reviewer": "Dr Test"}"#).status, 404);

    // Marked: the state in ReviewMetadata (what desam-train pull reads), the reviewer beside it.
    let r = review(&seg_series, br#"{"State": "reviewed", "Reviewer": "Dr Test"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["ReferencedSeries"]["ID"], mr_id.as_str(), "{}", r.text());
    assert_eq!(o.request("GET", &format!("/series/{seg_series}/metadata/4302"), None).text(), "reviewed");
    let reviewer: Value = o.request("GET", &format!("/series/{seg_series}/metadata/4304"), None).json();
    assert_eq!((reviewer["Reviewer"].as_str(), reviewer["State"].as_str()), (Some("Dr Test"), Some("reviewed")));
    assert_eq!(reviewer["ReferencedSeriesInstanceUID"], uid.as_str());
    // The SEG itself is untouched.
    assert_eq!(o.request("GET", &format!("/instances/{seg_instance}/file"), None).body, seg_bytes);
    assert_eq!(o.segs_referencing(&mr_id), std::slice::from_ref(&seg_instance));

    // desam-train pull's library finds the reviewed SEG and its MR series.
    let mut opts = desam::train::pull::PullOptions::new(&o.url(""), &dir.join("pulled"));
    opts.connection.user = Some("alice".into());
    opts.connection.password = Some("s3cret".into());
    opts.site = desam::train::pull::SiteFrom::Fixed("test".into());
    let pulled = desam::train::pull::pull(&opts).unwrap_or_else(|e| panic!("pull: {e}"));
    assert_eq!(pulled.manifest.cases.len(), 1, "{:?}", pulled.notes);
    assert_eq!(pulled.manifest.cases[0].mr_series_uid, uid);
    assert_eq!(pulled.manifest.cases[0].orthanc_seg_series, seg_series);

    // A SEG over an MR series this Orthanc does not hold is refused.
    let (orphan_files, _) = mr_series(&dir.join("absent"), 4, 16, 32, AXIAL, "t2_tse_tra");
    let absent = dicom::load_series_files(&orphan_files).unwrap().volume;
    let mut mask = desam::Mask::zeros(absent.dims);
    mask.data[absent.slice_len() + 40] = 1;
    let segment = dicom::Segment { info: dicom::SegmentInfo::prostate("manual"), mask: &mask };
    let orphan = dicom::write_seg(&absent, &[segment], &dicom::SegOptions::default()).unwrap();
    let stored = o.request("POST", "/instances", Some(&orphan));
    assert_eq!(stored.status, 200, "{}", stored.text());
    let orphan_series = stored.json()["ParentSeries"].as_str().unwrap().to_string();
    let r = review(&orphan_series, br#"{"Reviewer": "Dr Test"}"#);
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["Message"], "Referenced MR series absent", "{}", r.text());
    assert_eq!(o.request("GET", &format!("/series/{orphan_series}/metadata/4302"), None).status, 404);
    o.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A registry version: an untrained tiny model whose model.json says `version`.
fn registry_version(reg: &Path, version: &str, seed: u64) -> PathBuf {
    let dir = desam::registry::version_dir(reg, version);
    let arch = desam::model::Arch::Tiny;
    desam::engine::create_untrained_model_dir(arch, &dir, seed, &desam::engine::BackboneSource::Random).unwrap();
    let mut spec = desam::modeldir::read_spec(&dir).unwrap();
    spec.version = version.into();
    desam::modeldir::write_spec(&dir, &spec).unwrap();
    dir
}

#[test]
fn a_promoted_version_serves_from_the_next_job_without_restart_and_broken_ones_are_refused() {
    let dir = scratch("reload");
    let reg = dir.join("registry");
    registry_version(&reg, "1.0.0", 41);
    registry_version(&reg, "2.0.0", 42);
    let v3 = registry_version(&reg, "3.0.0", 43);
    desam::registry::promote(&reg, "1.0.0").unwrap();
    // ModelDirectory names the registry's `current` link.
    let section = desam_section(json!({"StableSeriesTrigger": false, "ModelDirectory": reg.join("current")}));
    let o = Orthanc::start(
        &dir,
        true,
        &json!({"AuthenticationEnabled": true, "RegisteredUsers": {"admin": "s3cret"}, "DeSAM": section}),
    );
    let source = o.get_json("/desam/status")["ModelSource"].clone();
    assert_eq!((source["Kind"].as_str(), source["Current"].as_str()), (Some("registry"), Some("1.0.0")), "{source}");

    let (a, a_uid) = mr_series(&dir.join("a"), 6, 32, 51, AXIAL, "t2_tse_tra");
    let (slow, slow_uid) = mr_series(&dir.join("slow"), 16, 96, 52, AXIAL, "t2_tse_tra");
    o.storescu(&[a.clone(), slow].concat());
    let (a_id, slow_id) = (o.series_id(&a_uid), o.series_id(&slow_uid));
    let version_of = |result: &Value| result["Result"]["ModelVersion"].as_str().unwrap_or("").to_string();
    let seg_names = |id: &str, version: &str| {
        let segs = o.segs_referencing(id);
        let tags = o.get_json(&format!("/instances/{}/simplified-tags", segs.last().unwrap()));
        assert!(tags["SoftwareVersions"].to_string().contains(version), "SEG of {id} should name {version}: {tags}");
    };
    assert_eq!(version_of(&segment_and_wait(&o, &a_id, b"")), "1.0.0");
    // A DICOM case folder for `desam-train eval --orthanc`: series a, with v1's SEG as its truth.
    let cases = dir.join("cases");
    let case_mr = cases.join("A001").join("MR");
    std::fs::create_dir_all(&case_mr).unwrap();
    std::fs::create_dir_all(cases.join("A001").join("SEG")).unwrap();
    for f in &a {
        std::fs::copy(f, case_mr.join(f.file_name().unwrap())).unwrap();
    }
    let v1_seg = o.request("GET", &format!("/instances/{}/file", o.segs_referencing(&a_id)[0]), None).body;
    std::fs::write(cases.join("A001").join("SEG").join("seg.dcm"), &v1_seg).unwrap();
    let score_stored = |version: &str| {
        desam::train::eval::evaluate(&desam::train::eval::EvalOptions {
            source: desam::train::eval::EvalSource::Stored(desam::train::eval::StoredSegs {
                connection: desam::train::orthanc_rest::Connection {
                    orthanc: o.url(""),
                    ca_file: None,
                    user: Some("admin".into()),
                    password: Some("s3cret".into()),
                },
                result_metadata: 4301,
                version: Some(version.into()),
                wait: Duration::ZERO,
            }),
            data: cases.clone(),
            sites: vec!["A".into()],
            mode: None,
            device: desam::engine::DeviceChoice::Cpu,
            threads: None,
            max_cases_per_site: None,
            out: None,
            resume: false,
            progress: false,
            cache_dir: None,
            save_masks: false,
        })
        .map_err(|e| e.to_string())
    };
    let v1_score = score_stored("1.0.0").unwrap();
    assert_eq!((v1_score.cases[0].dice, v1_score.cases[0].model_version.as_deref()), (1.0, Some("1.0.0")));

    // v2 is promoted while a (grid mode) job runs: that job finishes with v1, the next one uses v2.
    let r = o.request("POST", &format!("/desam/series/{slow_id}/segment"), Some(br#"{"Mode": "grid"}"#));
    assert_eq!(r.status, 200, "{}", r.text());
    wait_job_state(&o, r.json()["ID"].as_str().unwrap(), "Running");
    desam::registry::promote(&reg, "2.0.0").unwrap();
    let slow_result = o.wait_result(&slow_id, TIMEOUT);
    assert_eq!(version_of(&slow_result), "1.0.0", "the running job keeps its model: {slow_result}");
    seg_names(&slow_id, "1.0.0");
    let a_again = segment_and_wait(&o, &a_id, br#"{"Force": true}"#);
    assert_eq!(version_of(&a_again), "2.0.0", "{a_again}");
    seg_names(&a_id, "2.0.0");
    // The stored-SEG score reads the SEG the record names now (v2's), against the case's truth.
    let v2_seg = o.request("GET", &format!("/instances/{}/file", o.segs_referencing(&a_id).last().unwrap()), None).body;
    let grid = dicom::load_series_dir(&case_mr).unwrap().volume;
    let mask_of = |bytes: &[u8]| dicom::read_seg(bytes, &grid).unwrap().remove(0).1;
    let expected = desam::engine::quality::dice(&mask_of(&v2_seg).data, &mask_of(&v1_seg).data);
    assert!(expected < 1.0, "v1 and v2 must segment A differently for this check to mean anything");
    let v2_score = score_stored("2.0.0").unwrap();
    assert!((v2_score.cases[0].dice - expected).abs() < 1e-12, "{} vs {expected}", v2_score.cases[0].dice);
    assert_eq!(v2_score.cases[0].model_version.as_deref(), Some("2.0.0"));
    let stale = score_stored("1.0.0").unwrap_err();
    assert!(stale.contains("version \"2.0.0\", not \"1.0.0\"") && stale.contains("--wait"), "{stale}");
    let status = o.get_json("/desam/status");
    assert_eq!(status["Model"]["Version"], "2.0.0", "{status}");
    assert_eq!(status["ModelSource"]["LastReload"]["Outcome"], "reloaded", "{status}");

    // Rollback (authenticated like every route) goes back one version; the next job uses v1.
    assert_eq!(o.request_as("POST", "/desam/models/rollback", None).status, 401);
    let r = o.request("POST", "/desam/models/rollback", Some(b""));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["Serving"]["Version"], "1.0.0", "{}", r.text());
    assert_eq!(desam::registry::read_current(&reg).unwrap().version.as_deref(), Some("1.0.0"));
    assert_eq!(version_of(&segment_and_wait(&o, &a_id, br#"{"Force": true}"#)), "1.0.0");
    assert_eq!(score_stored("1.0.0").unwrap().cases[0].dice, 1.0, "v1 again: its record names the new SEG");

    // A version whose weights were truncated after its promotion is refused; v1 keeps serving.
    desam::registry::promote(&reg, "3.0.0").unwrap();
    let decoder = v3.join(&desam::modeldir::read_spec(&v3).unwrap().decoder.files[0].path);
    let bytes = std::fs::read(&decoder).unwrap();
    std::fs::write(&decoder, &bytes[..bytes.len() / 2]).unwrap();
    assert_eq!(version_of(&segment_and_wait(&o, &a_id, br#"{"Force": true}"#)), "1.0.0");
    let r = o.request("POST", "/desam/models/reload", Some(b""));
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.json()["Details"].as_str().unwrap().contains("SHA-256"), "{}", r.text());
    let status = o.get_json("/desam/status");
    assert_eq!(status["Model"]["Version"], "1.0.0", "{status}");
    assert_eq!(status["ModelSource"]["Current"], "3.0.0", "{status}");
    assert_eq!(status["ModelSource"]["LastReload"]["Outcome"], "refused", "{status}");
    let log = o.stop();
    let refusals = log.lines().filter(|l| l.starts_with('E') && l.contains("model reload refused")).count();
    // Once at the job start that saw the change, once for the explicit reload; not at every job.
    assert_eq!(refusals, 2, "{log}");
    assert!(log.lines().any(|l| l.contains("model reloaded") && l.contains("2.0.0")), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_job_longer_than_its_lease_keeps_its_claim_on_a_single_node() {
    // A 3 s lease is renewed every second; the grid run on 40 × 128² lasts several renewals. The
    // renewals must keep the claim (no "another node took the claim over" on a node that is alone).
    let dir = scratch("lease");
    let o = Orthanc::start(&dir, true, &json!({"DeSAM": desam_section(json!({"Mode": "grid", "LeaseSeconds": 3}))}));
    let (slow, slow_uid) = mr_series(&dir.join("slow"), 40, 128, 31, AXIAL, "t2_tse_tra");
    o.storescu(&slow);
    let id = o.series_id(&slow_uid);
    let t0 = std::time::Instant::now();
    let v = o.wait_result(&id, Duration::from_secs(300));
    let took = t0.elapsed().as_secs_f64();
    let log = o.stop();
    assert!(!log.contains("took the claim over"), "the node lost its own claim:\n{log}");
    assert_eq!(v["Result"]["Status"], "done", "{v}");
    assert!(took > 3.0, "the run ({took:.1} s) must outlast several renewals for this test to mean anything");
}

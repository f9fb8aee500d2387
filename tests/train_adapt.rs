//! `desam-train adapt` against a real Orthanc (Debian's, without the plugin) holding small site-E
//! phantoms whose truth SEGs are marked reviewed, with a tiny model as the registry's current version:
//! a gate that cannot be met promotes nothing; a gate that is met promotes a valid new version; a run
//! stopped after some steps continues without redoing them.

#[path = "support/orthanc_harness.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use desam::phantom::{self, GenerateOptions, Site, Size};
use desam::train::adapt::{self, AdaptOptions, AdaptOutcome, AdaptReport, Gate, Schedule};
use desam::train::pull::PullOptions;
use desam::train::{export, fit, precompute};
use harness::{scratch, Orthanc};
use serde_json::{json, Value};

const CASES: u32 = 3;

/// Uploads `CASES` small site-E phantoms (MR by storescu, the truth SEG by POST) and marks each SEG
/// reviewed, as a person would after checking it.
fn reviewed_cases(o: &Orthanc, dir: &Path) {
    for i in 0..CASES {
        let case =
            phantom::generate_case_with(Site::E, i, 0, &GenerateOptions { size: Size::Small, ..Default::default() });
        let files = phantom::export::write_case_dicom(&case, &dir.join(format!("E{i:03}"))).unwrap();
        o.storescu(&files.mr);
        let r = o.request("POST", "/instances", Some(&std::fs::read(&files.seg).unwrap()));
        assert_eq!(r.status, 200, "POST SEG: {}", r.text());
        let seg_series = r.json()["ParentSeries"].as_str().unwrap().to_string();
        let r = o.request("PUT", &format!("/series/{seg_series}/metadata/4302"), Some(b"reviewed"));
        assert_eq!(r.status, 200, "PUT metadata: {}", r.text());
    }
}

/// A registry whose current version 0.0.1 is a tiny untrained model.
fn registry(root: &Path) -> PathBuf {
    let reg = root.join("registry");
    desam::engine::create_untrained_model_dir(
        desam::model::Arch::Tiny,
        &reg.join("versions").join("0.0.1"),
        11,
        &desam::engine::BackboneSource::Random,
    )
    .unwrap();
    export::promote(&reg, "0.0.1").unwrap();
    reg
}

fn current_json(reg: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(reg.join(export::CURRENT_JSON)).unwrap()).unwrap()
}

fn options(o: &Orthanc, reg: &Path, work: &Path, gate: Gate, version: &str) -> AdaptOptions {
    AdaptOptions {
        pull: PullOptions::new(&format!("http://127.0.0.1:{}", o.http_port), &work.join("data")),
        registry: reg.to_path_buf(),
        work: work.to_path_buf(),
        version: Some(version.into()),
        gate,
        schedule: Schedule { epochs: 1, batch: 4, lr: 1e-4, slice_stride: 2, background_margin: 1, freeze: vec![] },
        folds: 2,
        holdout_from: 8,
        seed: 3,
        device: desam::engine::DeviceChoice::Cpu,
        threads: Some(1),
        stop_after_steps: None,
        progress: false,
        render_overlay: None,
    }
}

fn stamp_times(work: &Path) -> Vec<(String, SystemTime)> {
    let mut v: Vec<(String, SystemTime)> = std::fs::read_dir(work.join(adapt::STEPS_DIR))
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().modified().unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn adapt_promotes_only_through_the_gate_and_resumes_after_a_stop() {
    let root = scratch("adapt");
    let o = Orthanc::start(&root.join("orthanc"), false, &json!({}));
    reviewed_cases(&o, &root.join("phantom"));
    let reg = registry(&root);
    let before = current_json(&reg);

    // A gain of 1.0 Dice cannot be reached: nothing is promoted and the report says why.
    let work = root.join("work-strict");
    let outcome = adapt::adapt(&options(&o, &reg, &work, Gate { min_gain: 1.0, max_case_drop: 1.0 }, "0.0.2")).unwrap();
    let AdaptOutcome::Finished(report) = outcome else { panic!("the run must finish") };
    assert!(!report.promoted && !report.gate.passed);
    assert!(report.gate.reasons.iter().any(|r| r.contains("--min-gain")), "{:?}", report.gate.reasons);
    assert_eq!(report.split.scheme, "k-fold");
    assert_eq!(report.gate.rows.len(), CASES as usize, "every reviewed case is a check case once");
    assert_eq!(current_json(&reg), before, "current.json is unchanged");
    assert!(!reg.join("versions").join("0.0.2").exists(), "no version is exported when the gate fails");
    let md = std::fs::read_to_string(work.join(adapt::REPORT_MD)).unwrap();
    assert!(md.contains("Not promoted") && md.contains("--min-gain"), "{md}");
    let on_disk: AdaptReport = serde_json::from_slice(&std::fs::read(work.join(adapt::REPORT_JSON)).unwrap()).unwrap();
    assert_eq!(on_disk.current_version.as_deref(), Some("0.0.1"));
    assert!(on_disk.steps.iter().all(|s| s.step != "export" && s.step != "promote" && s.step != "refit-all"));
    // Margin 1: the store keeps the slice beyond each end of the gland (target empty), and the folds'
    // fits train on them, so a candidate keeps stopping at the apex and base.
    let store = precompute::read_index(&work.join("store")).unwrap();
    assert_eq!(store.config.background_margin, 1);
    for c in &store.cases {
        let no_gland: Vec<usize> = (0..c.z.len()).filter(|&r| !c.foreground[r]).map(|r| c.z[r]).collect();
        let gland: Vec<usize> = (0..c.z.len()).filter(|&r| c.foreground[r]).map(|r| c.z[r]).collect();
        let (lo, hi) = (gland[0], gland[gland.len() - 1]);
        assert_eq!(no_gland, vec![lo - 1, hi + 1], "{}: slices without gland kept", c.id);
    }
    let run_cfg: Value =
        serde_json::from_slice(&std::fs::read(work.join("folds/0/run").join(fit::CONFIG_JSON)).unwrap()).unwrap();
    assert_eq!(run_cfg["train_background"], true);
    // The gate judges the last checkpoint: no validation pass over the fit cases at epoch ends.
    let epochs = std::fs::read_to_string(work.join("folds/0/run/log.jsonl")).unwrap();
    assert!(!epochs.is_empty());
    for line in epochs.lines() {
        let e: Value = serde_json::from_str(line).unwrap();
        assert!(e["val_loss"].is_null() && e["is_best"] == false, "{line}");
    }
    // The checks share one encoder pass per case: precompute left its slices in the feature cache,
    // the current model encoded only the rest, the candidate none; the masks are kept for the overlay
    // and the cache is gone at the end.
    for fold in ["0", "1"] {
        let cases = |which: &str| -> Vec<Value> {
            std::fs::read_to_string(work.join("folds").join(fold).join(which).join("cases.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        for c in cases("eval-current") {
            let id = c["id"].as_str().unwrap();
            let stored = store.cases.iter().find(|s| s.id == id).unwrap().z.len();
            let nz = desam::nifti::read_nifti_mask(&desam::train::eval::mask_path(
                &work.join("folds").join(fold).join("eval-current"),
                id,
            ))
            .unwrap()
            .0
            .dims[0];
            assert_eq!(
                c["encoder_runs"].as_u64().unwrap() as usize,
                nz - stored,
                "{id}: encoder runs of the current model"
            );
        }
        for c in cases("eval-candidate") {
            assert_eq!(c["encoder_runs"], 0, "the candidate reuses the encoder features: {c}");
            let mask = desam::train::eval::mask_path(
                &work.join("folds").join(fold).join("eval-candidate"),
                c["id"].as_str().unwrap(),
            );
            assert!(mask.is_file(), "{}", mask.display());
        }
    }
    assert!(!work.join(adapt::FEATURE_CACHE).exists(), "the feature cache is removed at the end");

    // A gate that is met (any gain, any case drop), through the CLI, stopped after 3 steps and then
    // continued: the finished steps are not redone, and the candidate becomes current.
    let work = root.join("work-open");
    let cli = |extra: &[&str]| {
        let r = Command::new(env!("CARGO_BIN_EXE_desam-train"))
            .args(["adapt", "--orthanc", &format!("http://127.0.0.1:{}", o.http_port)])
            .arg("--registry")
            .arg(&reg)
            .arg("--work")
            .arg(&work)
            .args(["--version", "0.0.3", "--min-gain", "-1", "--max-case-drop", "1"])
            .args(["--epochs", "1", "--batch", "4", "--slice-stride", "2", "--seed", "3", "--device", "cpu"])
            .args(["--threads", "1"])
            .args(extra)
            .output()
            .expect("desam-train runs");
        let text = format!("{}\n{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
        assert!(r.status.success(), "{text}");
        String::from_utf8_lossy(&r.stdout).into_owned()
    };
    let out = cli(&["--stop-after-steps", "3"]);
    assert!(out.contains("pull, split, precompute"), "{out}");
    let first = stamp_times(&work);
    assert_eq!(
        first.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["precompute.json", "pull.json", "split.json"]
    );
    assert_eq!(current_json(&reg), before, "a stopped run promotes nothing");
    let out = cli(&[]);
    assert!(out.contains("Promoted") && out.contains("| case | site | fold |"), "{out}");
    let second = stamp_times(&work);
    for (name, t) in &first {
        assert_eq!(second.iter().find(|(n, _)| n == name).map(|(_, t)| t), Some(t), "{name} was redone");
    }
    for step in ["fold0-fit", "fold1-fit", "gate", "refit-all", "export", "promote", "overlay", "report"] {
        assert!(second.iter().any(|(n, _)| n == &format!("{step}.json")), "step {step} has no stamp: {second:?}");
    }
    let current = current_json(&reg);
    assert_eq!(current["version"], "0.0.3");
    assert_eq!(current["history"], json!(["0.0.1"]));
    let md = desam::modeldir::open(&reg.join("versions").join("0.0.3")).unwrap();
    assert_eq!(md.spec.version, "0.0.3");
    assert!(!md.spec.untrained);
    assert_eq!(md.spec.training["adaptation"]["base_version"], "0.0.1");
    // The CLI's default schedule keeps PIMM's encoder-only branches: they are the base's, bit for bit,
    // while the rest of the decoder moved.
    let run_cfg: Value =
        serde_json::from_slice(&std::fs::read(work.join("final/run").join(fit::CONFIG_JSON)).unwrap()).unwrap();
    assert_eq!(run_cfg["freeze"], json!(["pimm.conv_blocks_context.1", "pimm.conv_blocks_context.2"]));
    let weights = |v: &str| -> Vec<(String, tch::Tensor)> {
        let md = desam::modeldir::open(&reg.join("versions").join(v)).unwrap();
        md.decoder_paths.iter().flat_map(|p| tch::Tensor::read_safetensors(p).unwrap()).collect()
    };
    let (old, new) = (weights("0.0.1"), weights("0.0.3"));
    let (mut same, mut moved) = (0, 0);
    for (name, t) in &new {
        let (_, o) = old.iter().find(|(n, _)| n == name).unwrap();
        // The export stores the base's values at its own precision.
        let equal = t.equal(&o.to_kind(t.kind()));
        if name.starts_with("mask_decoder.pimm.conv_blocks_context.1.")
            || name.starts_with("mask_decoder.pimm.conv_blocks_context.2.")
        {
            assert!(equal, "{name} is frozen but changed");
            same += 1;
        } else if !equal {
            moved += 1;
        }
    }
    assert!(same > 0 && moved > 0, "frozen tensors {same}, trained tensors that moved {moved}");
    let png = std::fs::read(work.join(adapt::OVERLAY_PNG)).unwrap();
    assert_eq!(&png[1..4], b"PNG", "the worst case's overlay is a PNG");

    // A rerun of the finished folder redoes nothing and keeps the promotion.
    let out = cli(&[]);
    assert!(out.contains("Promoted"), "{out}");
    assert_eq!(stamp_times(&work), second);
    assert_eq!(current_json(&reg)["version"], "0.0.3");

    o.stop();
    let _ = std::fs::remove_dir_all(&root);
}

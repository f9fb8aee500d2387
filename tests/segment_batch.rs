//! `desam segment` batches with the real binary: a tiny model and small `desam phantom` cases; a batch
//! gives the masks of single calls with one model load, and goes on past a failing case.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use desam::engine::{create_untrained_model_dir, BackboneSource};
use desam::model::Arch;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("desam-batch-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny model whose box-mode masks are not empty (seed 5 covers about a sixth of a volume), so
/// that comparing masks means something.
fn tiny_model(dir: &Path) -> PathBuf {
    let d = dir.join("model");
    create_untrained_model_dir(Arch::Tiny, &d, 5, &BackboneSource::Random).unwrap();
    d
}

/// `desam` with the engine's info log on, so that every model load leaves one "loaded model" line.
fn desam(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_desam")).args(args).env("RUST_LOG", "desam::engine=info").output().unwrap()
}

fn model_loads(stderr: &str) -> usize {
    stderr.lines().filter(|l| l.contains("loaded model")).count()
}

/// Small phantom cases: `n` DICOM series (…/<case>/MR) of site A and one NIfTI volume of site B.
fn phantom_cases(work: &Path, n: u32) -> (Vec<PathBuf>, PathBuf) {
    let dicom = work.join("dicom");
    let nifti = work.join("nifti");
    for (site, cases, format, out) in [("A", n, "dicom", &dicom), ("B", 1, "nifti", &nifti)] {
        let cases = cases.to_string();
        let o = desam(
            &["phantom", "--site", site, "--cases", &cases, "--size", "small", "--format", format, "--out"]
                .into_iter()
                .chain([out.to_str().unwrap()])
                .collect::<Vec<_>>(),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let mut series: Vec<PathBuf> =
        std::fs::read_dir(&dicom).unwrap().map(|e| e.unwrap().path().join("MR")).filter(|p| p.is_dir()).collect();
    series.sort();
    let volume = std::fs::read_dir(nifti.join("imagesTr")).unwrap().next().unwrap().unwrap().path();
    (series, volume)
}

fn mask(path: &Path) -> desam::Mask {
    desam::nifti::read_nifti_mask(path).unwrap().0
}

#[test]
fn a_batch_gives_the_masks_of_single_calls_with_one_model_load() {
    let work = tmpdir("same");
    let model = tiny_model(&work);
    let (series, volume) = phantom_cases(&work, 2);
    let inputs: Vec<PathBuf> = series.iter().cloned().chain([volume]).collect();
    let m = model.to_str().unwrap();
    let common = ["--model", m, "--device", "cpu", "--threads", "1", "--mode", "box"];

    // N single calls: one process and one model load each.
    let t = Instant::now();
    let mut singles = Vec::new();
    for (k, input) in inputs.iter().enumerate() {
        let out = work.join(format!("single-{k}.nii.gz"));
        let o = desam(
            &[
                &["segment", input.to_str().unwrap(), "-o", out.to_str().unwrap(), "--progress", "none"][..],
                &common[..],
            ]
            .concat(),
        );
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        assert_eq!(model_loads(&stderr), 1, "{stderr}");
        singles.push(mask(&out));
    }
    let singles_s = t.elapsed().as_secs_f64();

    // One batch over the same inputs.
    let out_dir = work.join("batch");
    let report = work.join("batch.json");
    let mut args = vec!["segment"];
    args.extend(inputs.iter().map(|p| p.to_str().unwrap()));
    args.extend(["-o", out_dir.to_str().unwrap(), "--output-format", "nifti", "--progress", "json"]);
    args.extend(["--report", report.to_str().unwrap()]);
    args.extend(common);
    let t = Instant::now();
    let o = desam(&args);
    let batch_s = t.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    // The proof of one load: the engine logs every load, and the batch's log holds one.
    assert_eq!(model_loads(&stderr), 1, "{stderr}");
    assert!(stderr.contains("3 case(s)") && stderr.contains("3 ok, 0 failed"), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.starts_with('[') && l.contains(" ok ")).count(), 3, "{stderr}");

    let rep: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(rep["summary"]["model_loads"], 1);
    assert_eq!(rep["summary"]["ok"], 3);
    let cases = rep["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    // Series folders named MR are told apart by their case folder.
    let names: std::collections::HashSet<&str> = cases.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    let mut foreground = 0;
    for (case, single) in cases.iter().zip(&singles) {
        assert_eq!(case["status"], "ok");
        let batch_mask = mask(Path::new(case["output"].as_str().unwrap()));
        assert_eq!(batch_mask.dims, single.dims, "{}", case["input"]);
        assert!(batch_mask.data == single.data, "{}: batch and single masks differ", case["input"]);
        assert_eq!(case["report"]["voxels"].as_u64().unwrap(), single.count() as u64);
        foreground += single.count();
    }
    assert!(foreground > 0, "every mask is empty: the comparison would say nothing");
    // JSON progress: one event per case, then the summary.
    let events: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.iter().filter(|e| e["event"] == "case").count(), 3);
    assert_eq!(events.last().unwrap()["event"], "summary");

    println!(
        "3 cases: {singles_s:.2} s as single calls, {batch_s:.2} s as one batch ({:.2}×); model load in the batch {:.3} s",
        singles_s / batch_s,
        rep["summary"]["model_load_s"].as_f64().unwrap()
    );
    // Loose on purpose (a loaded 2-core machine): N singles pay N process starts and model loads.
    assert!(batch_s < singles_s, "a batch of 3 ({batch_s:.2} s) was slower than 3 single calls ({singles_s:.2} s)");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_batch_goes_on_past_a_failing_case_and_exits_non_zero() {
    let work = tmpdir("fail");
    let model = tiny_model(&work);
    let (series, volume) = phantom_cases(&work, 1);
    // -i DIR: a series folder, a NIfTI volume, a broken NIfTI file and a folder holding only a SEG.
    let cases = work.join("cases");
    std::fs::create_dir_all(cases.join("a")).unwrap();
    for f in std::fs::read_dir(&series[0]).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, cases.join("a").join(f.file_name().unwrap())).unwrap();
    }
    std::fs::copy(&volume, cases.join("b.nii.gz")).unwrap();
    std::fs::write(cases.join("broken.nii.gz"), b"not a NIfTI file").unwrap();
    std::fs::create_dir_all(cases.join("seg")).unwrap();
    std::fs::copy(series[0].parent().unwrap().join("SEG/seg.dcm"), cases.join("seg/seg.dcm")).unwrap();
    // The output folder inside the input folder is not searched for cases.
    let out_dir = cases.join("out");
    let report = work.join("r.json");
    let m = model.to_str().unwrap();
    let args = ["segment", "-i", cases.to_str().unwrap(), "-o", out_dir.to_str().unwrap(), "--model", m];
    let o = desam(&[&args[..], &["--device", "cpu", "--threads", "1", "--report", report.to_str().unwrap()]].concat());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("2 ok, 1 failed, 1 skipped"), "{stderr}");
    assert!(stderr.trim_end().ends_with("desam: error: 1 of 4 case(s) failed"), "{stderr}");
    assert_eq!(model_loads(&stderr), 1, "{stderr}");
    let rep: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let status: Vec<(&str, &str)> = rep["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["status"].as_str().unwrap()))
        .collect();
    assert_eq!(status, [("a", "ok"), ("b", "ok"), ("broken", "failed"), ("seg", "skipped")]);
    // DICOM in, DICOM-SEG out; NIfTI in, NIfTI mask out; nothing for the failed case.
    assert!(out_dir.join("a.dcm").is_file() && out_dir.join("b.nii.gz").is_file());
    assert!(!out_dir.join("broken.nii.gz").exists());
    let seg = desam::dicom::read_seg_standalone(&std::fs::read(out_dir.join("a.dcm")).unwrap());
    assert!(seg.is_ok(), "{:?}", seg.err());

    // A batch writes into a folder: a file name for -o is a usage mistake, before any work.
    let two = [series[0].to_str().unwrap(), volume.to_str().unwrap()];
    let o =
        desam(&[&["segment"][..], &two[..], &["-o", work.join("x.nii.gz").to_str().unwrap(), "--model", m]].concat());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("folder") && model_loads(&stderr) == 0, "{stderr}");
    let _ = std::fs::remove_dir_all(&work);
}

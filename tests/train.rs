//! Integration tests of `desam-train` with the real binary: tiny random-weight model, small phantom
//! cases in the nnU-Net layout; precompute → fit → resume → eval → export → promote/rollback, and
//! clear errors for bad data. Dice of the tiny model is not asserted high (it has no real encoder).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use desam::engine::{create_untrained_model_dir, BackboneSource};
use desam::model::Arch;
use desam::modeldir;
use desam::phantom::{self, GenerateOptions, Site, Size};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("desam-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_desam-train"));
    c.env("RUST_LOG", "warn");
    c
}

fn run(args: &[&str]) -> Output {
    let o = bin().args(args).output().expect("desam-train runs");
    o
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    let (so, se) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "desam-train {args:?} failed:\n{so}\n{se}");
    so
}

fn fails(args: &[&str]) -> String {
    let o = run(args);
    assert!(!o.status.success(), "desam-train {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Small phantom cases in the nnU-Net layout with DeSAM's patient→site CSV.
fn write_dataset(dir: &Path, cases: &[(Site, u32)]) {
    std::fs::create_dir_all(dir.join("imagesTr")).unwrap();
    std::fs::create_dir_all(dir.join("labelsTr")).unwrap();
    let mut csv = String::from("center,patientid\n");
    for &(site, i) in cases {
        let pid = site.index() as u32 * 100 + i;
        let id = format!("prostate_{pid:03}");
        let c = phantom::generate_case_with(site, i, 0, &GenerateOptions { size: Size::Small, ..Default::default() });
        // Keep the tests fast: the middle slices (the gland) only.
        let (vol, mask) = crop_slices(&c.image, &c.gland_mask(), 6);
        desam::nifti::write_nifti(&dir.join(format!("imagesTr/{id}_0000.nii.gz")), &vol).unwrap();
        desam::nifti::write_nifti_mask(&dir.join(format!("labelsTr/{id}.nii.gz")), &mask, &vol).unwrap();
        csv.push_str(&format!("{},{pid}\n", site.official_center()));
    }
    std::fs::write(dir.join("prostate_patientid.csv"), csv).unwrap();
}

/// `n` slices centred on the label's extent.
/// First of the `n` slices around the middle of the mask's foreground.
fn crop_start(m: &desam::Mask, n: usize) -> usize {
    let fg: Vec<usize> = (0..m.dims[0]).filter(|&z| m.slice(z).iter().any(|&x| x != 0)).collect();
    let mid = (fg[0] + fg[fg.len() - 1]) / 2;
    mid.saturating_sub(n / 2).min(m.dims[0] - n)
}

fn crop_slices(v: &desam::Volume, m: &desam::Mask, n: usize) -> (desam::Volume, desam::Mask) {
    let len = v.slice_len();
    let z0 = crop_start(m, n);
    let mut out =
        desam::Volume::new(v.voxels[z0 * len..(z0 + n) * len].to_vec(), [n, v.ny(), v.nx()], v.spacing, v.origin);
    out.direction = v.direction;
    let mask = desam::Mask { data: m.data[z0 * len..(z0 + n) * len].to_vec(), dims: [n, v.ny(), v.nx()] };
    (out, mask)
}

fn checkpoint_params(path: &Path) -> Vec<(String, Vec<f32>)> {
    let (p, _, _, _) = desam::train::fit::read_checkpoint(path).unwrap();
    p.into_iter().map(|(n, t)| (n, Vec::<f32>::try_from(t.to_kind(tch::Kind::Float).view([-1])).unwrap())).collect()
}

#[test]
fn precompute_fit_resume_eval_export_promote() {
    let root = tmpdir("flow");
    let data = root.join("data");
    write_dataset(&data, &[(Site::A, 0), (Site::A, 1), (Site::A, 2), (Site::B, 0)]);
    let model = root.join("tiny");
    create_untrained_model_dir(Arch::Tiny, &model, 3, &BackboneSource::Random).unwrap();
    let emb = root.join("emb");
    let (d, m, e) = (data.to_str().unwrap(), model.to_str().unwrap(), emb.to_str().unwrap());

    // Precompute (foreground slices), then again: everything is skipped and the index is identical.
    let out = ok(&["precompute", "--data", d, "--model", m, "--out", e, "--sites", "A", "--device", "cpu"]);
    assert!(out.contains("3 cases"), "{out}");
    let index1 = std::fs::read_to_string(emb.join("index.json")).unwrap();
    let idx: serde_json::Value = serde_json::from_str(&index1).unwrap();
    assert_eq!(idx["config"]["feature_dtype"], "f16");
    assert!(idx["slices"].as_u64().unwrap() >= 6);
    ok(&["precompute", "--data", d, "--model", m, "--out", e, "--sites", "A", "--device", "cpu"]);
    let index2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(emb.join("index.json")).unwrap()).unwrap();
    assert_eq!(idx["cases"], index2["cases"]);
    assert_eq!(index2["encode_seconds"].as_f64().unwrap(), 0.0, "a resumed precompute must skip finished shards");
    // A store built differently refuses to be mixed.
    let err = fails(&[
        "precompute",
        "--data",
        d,
        "--model",
        m,
        "--out",
        e,
        "--sites",
        "A",
        "--all-slices",
        "--device",
        "cpu",
    ]);
    assert!(err.contains("different"), "{err}");
    // Every 2nd foreground slice plus one augmented copy per case: half the slices (rounded up) per
    // stored case, copies tied to their source, and an evaluation store refuses a stride.
    let emb2 = root.join("emb_stride");
    let e2 = emb2.to_str().unwrap();
    // (with another intensity clip: the store then trains a copy of the model that carries it)
    let err =
        fails(&["precompute", "--data", d, "--model", m, "--out", e2, "--clip-percentiles", "99,1", "--device", "cpu"]);
    assert!(err.contains("clip percentiles"), "{err}");
    ok(&[
        "precompute",
        "--data",
        d,
        "--model",
        m,
        "--out",
        e2,
        "--sites",
        "A",
        "--device",
        "cpu",
        "--slice-stride",
        "2",
        "--augment",
        "1",
        "--clip-percentiles",
        "0.5,99.9",
    ]);
    let idx2 = desam::train::precompute::read_index(&emb2).unwrap();
    assert_eq!(idx2.config.slice_stride, 2);
    assert_eq!(idx2.config.model_dir, emb2.join("base_model"));
    assert_eq!(modeldir::read_spec(&emb2.join("base_model")).unwrap().preprocessing.clip_percentiles, [0.5, 99.9]);
    assert_eq!(
        modeldir::read_spec(&model).unwrap().preprocessing.clip_percentiles,
        [0.5, 99.5],
        "the source model is untouched"
    );
    let full = desam::train::precompute::read_index(&emb).unwrap();
    assert_eq!(idx2.cases.len(), 2 * full.cases.len());
    for c in &idx2.cases {
        let src = c.augmented_from.as_deref().unwrap_or(&c.id);
        let f = full.cases.iter().find(|f| f.id == src).unwrap();
        assert_eq!(c.z, f.z.iter().copied().step_by(2).collect::<Vec<_>>(), "{}", c.id);
        assert_eq!(c.augmentation.is_some(), c.augmented_from.is_some());
    }
    let err = fails(&[
        "precompute",
        "--data",
        d,
        "--model",
        m,
        "--out",
        &format!("{e2}x"),
        "--all-slices",
        "--slice-stride",
        "2",
        "--device",
        "cpu",
    ]);
    assert!(err.contains("slice-stride"), "{err}");

    // Fit: the loss decreases over epochs.
    let run_full = root.join("run_full");
    let fit = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "fit",
            "--embeddings",
            e,
            "--mode",
            "grid",
            "--site",
            "A",
            "--epochs",
            "4",
            "--batch",
            "2",
            "--lr",
            "1e-3",
            "--seed",
            "5",
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
            "--quiet",
            "--save-every",
            "0",
        ];
        a.extend_from_slice(extra);
        ok(&a)
    };
    fit(&run_full, &[]);
    let log: Vec<serde_json::Value> = std::fs::read_to_string(run_full.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(log.len(), 4);
    let first = log[0]["train_loss"].as_f64().unwrap();
    let last = log[3]["train_loss"].as_f64().unwrap();
    assert!(last < first, "training loss should decrease: {first} → {last}");
    for l in &log {
        let vd = l["val_dice"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&vd));
    }
    assert!(run_full.join("progress.png").is_file() && run_full.join("checkpoint_best.safetensors").is_file());
    let png = std::fs::read(run_full.join("progress.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");

    // Resume after a forced stop continues at the saved step (its log says so and its step log
    // extends the first session's without repeating a step) and reproduces the uninterrupted run's
    // weights exactly.
    let run_cut = root.join("run_cut");
    fit(&run_cut, &["--max-steps", "3"]);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_cut.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["finished"], false);
    assert_eq!(s["global_step"], 3);
    let cut = checkpoint_params(&run_cut.join("checkpoint_latest.safetensors"));
    fit(&run_cut, &["--resume"]);
    let steps = |run: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(run.join("steps.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (full_steps, cut_steps) = (steps(&run_full), steps(&run_cut));
    assert_eq!(cut_steps, full_steps, "the resumed run's steps differ from the uninterrupted run's");
    let starts: Vec<String> = std::fs::read_to_string(run_cut.join("training_log.txt"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(" start ").map(|(_, rest)| rest.to_string()))
        .collect();
    assert_eq!(starts.len(), 2, "{starts:?}");
    let at = format!("epoch {} step {} (", full_steps[3]["epoch"], full_steps[3]["step"]);
    assert!(starts[1].starts_with(&at), "the resumed session should start at {at}: {}", starts[1]);
    let a = checkpoint_params(&run_full.join("checkpoint_latest.safetensors"));
    let b = checkpoint_params(&run_cut.join("checkpoint_latest.safetensors"));
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(va == vb, "{na} differs after resume");
    }
    // The same 3 steps with another seed give other weights, so the equality above is not trivial.
    let run_seed6 = root.join("run_seed6");
    ok(&[
        "fit",
        "--embeddings",
        e,
        "--mode",
        "grid",
        "--site",
        "A",
        "--epochs",
        "4",
        "--batch",
        "2",
        "--lr",
        "1e-3",
        "--seed",
        "6",
        "--out",
        run_seed6.to_str().unwrap(),
        "--device",
        "cpu",
        "--quiet",
        "--save-every",
        "0",
        "--max-steps",
        "3",
    ]);
    let other = checkpoint_params(&run_seed6.join("checkpoint_latest.safetensors"));
    assert!(cut.iter().zip(&other).any(|((_, va), (_, vb))| va != vb), "seeds 5 and 6 gave the same weights");
    let run_other = root.join("run_other");
    ok(&[
        "fit",
        "--embeddings",
        e,
        "--mode",
        "grid",
        "--site",
        "A",
        "--epochs",
        "1",
        "--batch",
        "2",
        "--lr",
        "1e-3",
        "--seed",
        "6",
        "--out",
        run_other.to_str().unwrap(),
        "--device",
        "cpu",
        "--quiet",
    ]);
    // Resume with a changed configuration is refused.
    let err = fails(&[
        "fit",
        "--embeddings",
        e,
        "--mode",
        "box",
        "--site",
        "A",
        "--epochs",
        "4",
        "--batch",
        "2",
        "--lr",
        "1e-3",
        "--seed",
        "5",
        "--out",
        run_cut.to_str().unwrap(),
        "--device",
        "cpu",
        "--quiet",
        "--resume",
    ]);
    assert!(err.contains("different configuration"), "{err}");

    // Scoring a run on stored slices never counts the cases it trained on: of site A's three cases
    // only the validation case is scored, with the grid (DeSAM-P automatic mode) or the box prompt.
    let rs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_full.join("summary.json")).unwrap()).unwrap();
    let val_ids: Vec<&str> = rs["val_cases"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(val_ids.len(), 1);
    for mode in ["grid", "box"] {
        let out = root.join(format!("store_eval_{mode}"));
        ok(&[
            "eval-run",
            "--run",
            run_full.to_str().unwrap(),
            "--embeddings",
            e,
            "--sites",
            "A",
            "--mode",
            mode,
            "--device",
            "cpu",
            "--out",
            out.to_str().unwrap(),
        ]);
        let sm: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
        let ids: Vec<&str> = sm["cases"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
        assert_eq!(ids, val_ids, "{mode}");
        assert!((0.0..=1.0).contains(&sm["cases"][0]["dice"].as_f64().unwrap()));
        assert_eq!(sm["mode"], format!("{mode} (store)"));
        assert_eq!(sm["model"]["excluded_training_cases"], 2);
    }
    // On the augmented store the validation case has a copy: two eligible cases, `--max-cases 1`
    // keeps the first of them.
    let scored = |extra: &[&str]| -> Vec<String> {
        let out = root.join("store_eval_cap");
        let _ = std::fs::remove_dir_all(&out);
        let mut a = vec![
            "eval-run",
            "--run",
            run_full.to_str().unwrap(),
            "--embeddings",
            e2,
            "--sites",
            "A",
            "--mode",
            "box",
            "--device",
            "cpu",
        ];
        a.extend_from_slice(&["--out", out.to_str().unwrap()]);
        a.extend_from_slice(extra);
        ok(&a);
        let sm: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
        sm["cases"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_string()).collect()
    };
    let all = scored(&[]);
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all.iter().all(|id| id.starts_with(val_ids[0])), "{all:?}");
    assert_eq!(scored(&["--max-cases", "1"]), all[..1].to_vec());

    // Export: immutable versioned model dir with provenance, usable by the engine.
    let reg = root.join("registry");
    let v1 = reg.join("versions/0.1.0");
    ok(&["export", "--run", run_full.to_str().unwrap(), "--out", v1.to_str().unwrap(), "--version", "0.1.0"]);
    let md = modeldir::open(&v1).unwrap();
    assert!(!md.spec.untrained);
    assert_eq!(md.spec.default_mode, desam::engine::Mode::Grid);
    assert_eq!(md.spec.training["data_manifest_sha256"], idx["manifest_hash"]);
    let err = fails(&["export", "--run", run_full.to_str().unwrap(), "--out", v1.to_str().unwrap()]);
    assert!(err.contains("already exists"), "{err}");
    let v2 = reg.join("versions/0.2.0");
    ok(&["export", "--run", run_other.to_str().unwrap(), "--out", v2.to_str().unwrap(), "--version", "0.2.0"]);

    // Eval through the engine on the held-out site.
    let ev = root.join("eval");
    let out = ok(&[
        "eval",
        "--model",
        v1.to_str().unwrap(),
        "--data",
        d,
        "--sites",
        "B",
        "--out",
        ev.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(out.contains("| B | 1 |"), "{out}");
    let sm: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ev.join("summary.json")).unwrap()).unwrap();
    let dice = sm["cases"][0]["dice"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&dice));
    assert_eq!(sm["model"]["version"], "0.1.0");
    assert!(ev.join("summary.md").is_file());

    // Each case is logged as it finishes; a second run into the same folder needs --resume, and
    // --resume takes logged cases over (a torn last line from a kill is dropped) instead of
    // segmenting them again: the planted Dice proves the record was reused.
    let log = ev.join("cases.jsonl");
    let logged: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&log).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(logged["id"], sm["cases"][0]["id"]);
    let eval_b = [
        "eval",
        "--model",
        v1.to_str().unwrap(),
        "--data",
        d,
        "--sites",
        "B",
        "--out",
        ev.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    let err = fails(&eval_b);
    assert!(err.contains("--resume"), "{err}");
    let mut planted = logged.clone();
    planted["dice"] = serde_json::json!(0.123456);
    std::fs::write(&log, format!("{planted}\n{{\"id\":\"torn")).unwrap();
    let out = ok(&[&eval_b[..], &["--resume"]].concat());
    assert!(out.contains("0.1235"), "{out}");
    let sm2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ev.join("summary.json")).unwrap()).unwrap();
    assert_eq!(sm2["resumed_cases"], 1);
    assert_eq!(sm2["cases"][0]["dice"], 0.123456);
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1);
    // A different evaluation (here: another mode) never resumes into this folder.
    let err = fails(&[&eval_b[..], &["--resume", "--mode", "box"]].concat());
    assert!(err.contains("different evaluation"), "{err}");

    // Promote / rollback.
    let r = reg.to_str().unwrap();
    ok(&["promote", "--registry", r, "--version", "0.1.0"]);
    ok(&["promote", "--registry", r, "--version", "0.2.0"]);
    assert_eq!(desam::train::export::current_dir(&reg).unwrap(), reg.join("versions/0.2.0"));
    assert_eq!(std::fs::read_link(reg.join("current")).unwrap(), Path::new("versions/0.2.0"));
    ok(&["rollback", "--registry", r]);
    assert_eq!(desam::train::export::current_dir(&reg).unwrap(), reg.join("versions/0.1.0"));
    modeldir::open(&reg.join("current")).unwrap();
    let err = fails(&["rollback", "--registry", r]);
    assert!(err.contains("nothing to roll back"), "{err}");
    let err = fails(&["promote", "--registry", r, "--version", "9.9.9"]);
    assert!(err.contains("9.9.9"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn bad_data_gives_clear_errors() {
    let root = tmpdir("bad");
    let model = root.join("tiny");
    create_untrained_model_dir(Arch::Tiny, &model, 3, &BackboneSource::Random).unwrap();
    let m = model.to_str().unwrap();
    let pre = |data: &Path, out: &str| {
        fails(&["precompute", "--data", data.to_str().unwrap(), "--model", m, "--out", out, "--device", "cpu"])
    };

    // Image/label shape mismatch.
    let d1 = root.join("shape");
    write_dataset(&d1, &[(Site::A, 0)]);
    let img = desam::nifti::read_nifti(&d1.join("imagesTr/prostate_000_0000.nii.gz")).unwrap();
    let small =
        desam::Volume::new(vec![0.0; 2 * img.ny() * img.nx()], [2, img.ny(), img.nx()], img.spacing, img.origin);
    let lab = desam::Mask { data: vec![1; 2 * img.ny() * img.nx()], dims: small.dims };
    std::fs::remove_file(d1.join("labelsTr/prostate_000.nii.gz")).unwrap();
    desam::nifti::write_nifti_mask(&d1.join("labelsTr/prostate_000.nii.gz"), &lab, &small).unwrap();
    let err = pre(&d1, root.join("e1").to_str().unwrap());
    assert!(err.contains("different shapes"), "{err}");

    // Empty label.
    let d2 = root.join("empty");
    write_dataset(&d2, &[(Site::A, 0)]);
    let lab = desam::Mask::zeros(img.dims);
    std::fs::remove_file(d2.join("labelsTr/prostate_000.nii.gz")).unwrap();
    desam::nifti::write_nifti_mask(&d2.join("labelsTr/prostate_000.nii.gz"), &lab, &img).unwrap();
    let err = pre(&d2, root.join("e2").to_str().unwrap());
    assert!(err.contains("no foreground"), "{err}");

    // Case missing from the site CSV.
    let d3 = root.join("nosite");
    write_dataset(&d3, &[(Site::A, 0), (Site::A, 1)]);
    std::fs::write(d3.join("prostate_patientid.csv"), "center,patientid\nA-ISBI,0\n").unwrap();
    let err = pre(&d3, root.join("e3").to_str().unwrap());
    assert!(err.contains("prostate_001") && err.contains("missing from the site table"), "{err}");

    // No CSV at all; label missing.
    std::fs::remove_file(d3.join("prostate_patientid.csv")).unwrap();
    assert!(pre(&d3, root.join("e4").to_str().unwrap()).contains("prostate_patientid.csv"));
    let d5 = root.join("nolabel");
    write_dataset(&d5, &[(Site::A, 0)]);
    std::fs::remove_file(d5.join("labelsTr/prostate_000.nii.gz")).unwrap();
    assert!(pre(&d5, root.join("e5").to_str().unwrap()).contains("no label"));

    // fit on a store that does not exist; bad loss weights.
    let nothing = root.join("nothing");
    let err = fails(&[
        "fit",
        "--embeddings",
        nothing.to_str().unwrap(),
        "--site",
        "A",
        "--out",
        root.join("r").to_str().unwrap(),
    ]);
    assert!(err.contains(&format!("{}: No such file", nothing.display())), "{err}");
    let err = fails(&[
        "fit",
        "--embeddings",
        root.to_str().unwrap(),
        "--site",
        "A",
        "--out",
        root.join("r").to_str().unwrap(),
        "--loss-weights",
        "1,2",
    ]);
    assert!(err.contains("--loss-weights wants three"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn dicom_cases_with_seg_ground_truth_are_a_data_source() {
    let root = tmpdir("dicom");
    let data = root.join("dicom");
    std::fs::create_dir_all(&data).unwrap();
    let c = phantom::generate_case_with(Site::C, 0, 0, &GenerateOptions { size: Size::Small, ..Default::default() });
    let files = phantom::export::write_case_dicom(&c, &data).unwrap();
    let model = root.join("tiny");
    create_untrained_model_dir(Arch::Tiny, &model, 3, &BackboneSource::Random).unwrap();
    let emb = root.join("emb");
    ok(&[
        "precompute",
        "--data",
        data.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--out",
        emb.to_str().unwrap(),
        "--all-slices",
        "--device",
        "cpu",
    ]);
    let idx = desam::train::precompute::read_index(&emb).unwrap();
    assert_eq!(idx.cases.len(), 1);
    let case = &idx.cases[0];
    assert_eq!(case.site, "C");
    assert_eq!(case.z.len(), files.volume.nz(), "--all-slices stores every slice");
    // The stored labels are the SEG's gland, resized: foreground slices match the NIfTI truth.
    let (truth, _) = desam::nifti::read_nifti_mask(&files.label).unwrap();
    let fg_truth: Vec<bool> = (0..truth.dims[0]).map(|z| truth.slice(z).iter().any(|&v| v != 0)).collect();
    assert_eq!(case.foreground.iter().filter(|&&f| f).count(), fg_truth.iter().filter(|&&f| f).count());
    let mut reader = desam::train::precompute::ShardReader::default();
    let z = fg_truth.iter().position(|&f| f).unwrap();
    let (f, label) = desam::train::precompute::read_sample(&mut reader, &emb, case, z, idx.config.tap_count).unwrap();
    assert_eq!(label.size(), vec![1, 32, 32]);
    assert_eq!(f.neck.size()[0], 1);
    let _ = std::fs::remove_dir_all(&root);
}

/// Two small phantom cases as an nnU-Net v2 raw dataset without a site table: the gland is label 2
/// ("prostate"), a corner block is label 1 ("lesion", not prostate); channel 0 only.
fn write_nnunet_v2_dataset(dir: &Path) -> Vec<desam::Mask> {
    std::fs::create_dir_all(dir.join("imagesTr")).unwrap();
    std::fs::create_dir_all(dir.join("labelsTr")).unwrap();
    let mut glands = Vec::new();
    for i in 0..2 {
        let c =
            phantom::generate_case_with(Site::A, i, 0, &GenerateOptions { size: Size::Small, ..Default::default() });
        let (vol, gland) = crop_slices(&c.image, &c.gland_mask(), 4);
        let mut label = gland.clone();
        for v in label.data.iter_mut() {
            *v *= 2;
        }
        label.data[0] = 1;
        let id = format!("Prostate_{i:03}");
        desam::nifti::write_nifti(&dir.join(format!("imagesTr/{id}_0000.nii.gz")), &vol).unwrap();
        desam::nifti::write_nifti_mask(&dir.join(format!("labelsTr/{id}.nii.gz")), &label, &vol).unwrap();
        glands.push(gland);
    }
    let dataset = serde_json::json!({
        "channel_names": {"0": "T2"},
        "labels": {"background": 0, "lesion": 1, "prostate": 2},
        "numTraining": 2,
        "file_ending": ".nii.gz",
        "name": "Dataset901_PhantomProstate",
    });
    std::fs::write(dir.join("dataset.json"), serde_json::to_string_pretty(&dataset).unwrap()).unwrap();
    glands
}

#[test]
fn nnunet_v2_dataset_is_a_training_source() {
    let root = tmpdir("nnunet-v2");
    let data = root.join("Dataset901_PhantomProstate");
    let glands = write_nnunet_v2_dataset(&data);

    // The data layer: one default site, the "prostate" label value only.
    let cases = desam::train::data::list_cases(&data).unwrap();
    assert_eq!(cases.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["Prostate_000", "Prostate_001"]);
    assert!(cases.iter().all(|c| c.site == desam::train::data::DEFAULT_SITE));
    let loaded = desam::train::data::load_case(&cases[0], true).unwrap();
    assert_eq!(loaded.label.data, glands[0].data, "label 2 is the prostate, label 1 is not");

    // precompute → fit for one step through the binary.
    let model = root.join("tiny");
    create_untrained_model_dir(Arch::Tiny, &model, 3, &BackboneSource::Random).unwrap();
    let (d, m) = (data.to_str().unwrap(), model.to_str().unwrap());
    let emb = root.join("emb");
    let out = ok(&["precompute", "--data", d, "--model", m, "--out", emb.to_str().unwrap(), "--device", "cpu"]);
    assert!(out.contains("2 cases"), "{out}");
    let idx = desam::train::precompute::read_index(&emb).unwrap();
    assert!(idx.cases.iter().all(|c| c.site == "A"));
    let fg: usize = idx.cases[0].foreground.iter().filter(|&&f| f).count();
    assert_eq!(fg, (0..4).filter(|&z| glands[0].slice(z).iter().any(|&v| v != 0)).count());
    let run = root.join("run");
    ok(&[
        "fit",
        "--embeddings",
        emb.to_str().unwrap(),
        "--site",
        "A",
        "--epochs",
        "1",
        "--batch",
        "2",
        "--max-steps",
        "1",
        "--out",
        run.to_str().unwrap(),
        "--device",
        "cpu",
        "--quiet",
    ]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["global_step"], 1, "{summary}");
    assert!(run.join("checkpoint_latest.safetensors").is_file());

    // A numTraining that disagrees with imagesTr/ is a clear error.
    let mut ds: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("dataset.json")).unwrap()).unwrap();
    ds["numTraining"] = 3.into();
    std::fs::write(data.join("dataset.json"), ds.to_string()).unwrap();
    let err = fails(&[
        "precompute",
        "--data",
        d,
        "--model",
        m,
        "--out",
        root.join("emb2").to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(err.contains("numTraining is 3"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

/// SynthSeg-style copies (`precompute --synth`): refused without the tissue maps, then painted from
/// them: tied to their source case, labels warped with the image (never the source's), features new.
#[test]
fn precompute_synth_copies_are_painted_from_the_tissue_map() {
    let root = tmpdir("synth");
    let data = root.join("data");
    write_dataset(&data, &[(Site::A, 0)]);
    let model = root.join("tiny");
    create_untrained_model_dir(Arch::Tiny, &model, 3, &BackboneSource::Random).unwrap();
    let (d, m) = (data.to_str().unwrap(), model.to_str().unwrap());
    let emb = root.join("emb");
    let e = emb.to_str().unwrap();
    let args = ["precompute", "--data", d, "--model", m, "--out", e, "--synth", "2", "--device", "cpu"];
    let err = fails(&args);
    assert!(err.contains("tissue map") && err.contains("labelsTr_tissues"), "{err}");

    // The same case again with its tissue map, cropped to the same slices.
    let opts = GenerateOptions { size: Size::Small, tissue_map: true, ..Default::default() };
    let c = phantom::generate_case_with(Site::A, 0, 0, &opts);
    let (vol, _) = crop_slices(&c.image, &c.gland_mask(), 6);
    let (z0, len) = (crop_start(&c.gland_mask(), 6), vol.slice_len());
    let map = c.tissues.as_ref().unwrap();
    let tissues = desam::Mask { data: map.data[z0 * len..(z0 + 6) * len].to_vec(), dims: vol.dims };
    std::fs::create_dir_all(data.join("labelsTr_tissues")).unwrap();
    desam::nifti::write_nifti_mask(&data.join("labelsTr_tissues/prostate_000.nii.gz"), &tissues, &vol).unwrap();
    ok(&args);

    let idx = desam::train::precompute::read_index(&emb).unwrap();
    assert_eq!(idx.config.synth, 2);
    let ids: Vec<&str> = idx.cases.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["prostate_000", "prostate_000~synth1", "prostate_000~synth2"]);
    let shard = |i: usize| {
        let named = tch::Tensor::read_safetensors(emb.join(&idx.cases[i].shard)).unwrap();
        let get = |n: &str| named.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
        (get("label"), get("neck"))
    };
    let (label0, neck0) = shard(0);
    for i in 1..3 {
        let c = &idx.cases[i];
        assert_eq!(c.augmented_from.as_deref(), Some("prostate_000"));
        assert!(c.augmentation.is_none() && c.synthesis.is_some());
        assert!(c.foreground.iter().any(|&f| f), "{}: the warped gland is still there", c.id);
        let (label, neck) = shard(i);
        // Warped labels (each copy its own warp) and features of a new image.
        if label.size() == label0.size() {
            assert!(label.ne_tensor(&label0).any().int64_value(&[]) != 0, "{}", c.id);
        }
        let diff = (neck.to_kind(tch::Kind::Float)
            - neck0.narrow(0, 0, neck.size()[0].min(neck0.size()[0])).to_kind(tch::Kind::Float))
        .abs()
        .mean(tch::Kind::Float)
        .double_value(&[]);
        assert!(diff > 1e-3, "{}: features equal the original's ({diff})", c.id);
    }
    assert_ne!(idx.cases[1].synthesis, idx.cases[2].synthesis);
    let _ = std::fs::remove_dir_all(&root);
}

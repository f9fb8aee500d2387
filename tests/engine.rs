//! Integration tests of the segmentation engine and `desam segment`: tiny random-weight models built
//! in temp folders, synthetic volumes, the real CLI binary. Dice is printed, never asserted high.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use desam::engine::{create_untrained_model_dir, BackboneSource};
use desam::engine::{segmenter::DecoderStrategy, EngineError, EngineOptions, Mode, SegmentRequest, Segmenter};
use desam::model::{Arch, PromptBatch};
use desam::modeldir::{self, ModelDirError};
use desam::{Mask, Volume};
use tch::Tensor;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("desam-engine-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny_model(tag: &str) -> PathBuf {
    let d = tmpdir(tag).join("model");
    create_untrained_model_dir(Arch::Tiny, &d, 7, &BackboneSource::Random).unwrap();
    d
}

/// A tiny model whose masks are not empty in either mode, so that comparing two of them means
/// something: random IoU heads rarely pass 0.5, so every grid prompt is let through, and seed 5's
/// masks cover about a sixth of the synthetic volumes (seed 7's: a few dozen voxels).
fn tiny_model_with_masks(tag: &str) -> PathBuf {
    let d = tmpdir(tag).join("model");
    create_untrained_model_dir(Arch::Tiny, &d, 5, &BackboneSource::Random).unwrap();
    let mut spec = modeldir::read_spec(&d).unwrap();
    spec.thresholds.iou = -1e9;
    modeldir::write_spec(&d, &spec).unwrap();
    d
}

/// Both masks hold foreground (`dice` of two empty masks is 1) and agree to `min_dice`.
fn assert_same_mask(what: &str, a: &Mask, b: &Mask, min_dice: f64) {
    assert!(a.count() > 0 && b.count() > 0, "{what}: empty mask ({} and {} voxels)", a.count(), b.count());
    let d = dice(a, b);
    assert!(d > min_dice, "{what}: Dice {d}");
}

/// A prostate-like synthetic MR volume: a bright ellipsoid gland in a darker pelvis with noise.
/// Returns the volume and its truth.
fn synthetic_volume(nz: usize, ny: usize, nx: usize, seed: u64) -> (Volume, Mask) {
    let mut v = vec![0f32; nz * ny * nx];
    let mut truth = Mask::zeros([nz, ny, nx]);
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut rnd = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) as f32
    };
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let (cx, cy, cz) = (nx as f64 / 2.0, ny as f64 * 0.55, nz as f64 / 2.0);
                let body =
                    ((x as f64 - cx) / (nx as f64 * 0.45)).powi(2) + ((y as f64 - cy) / (ny as f64 * 0.4)).powi(2);
                let gland = ((x as f64 - cx) / (nx as f64 * 0.15)).powi(2)
                    + ((y as f64 - cy) / (ny as f64 * 0.12)).powi(2)
                    + ((z as f64 - cz) / (nz as f64 * 0.4)).powi(2);
                let i = (z * ny + y) * nx + x;
                let mut val = if body < 1.0 { 300.0 } else { 0.0 };
                if gland < 1.0 {
                    val = 700.0;
                    truth.data[i] = 1;
                }
                if body < 1.0 {
                    val += 60.0 * rnd();
                }
                v[i] = val;
            }
        }
    }
    (Volume::new(v, [nz, ny, nx], [0.7, 0.7, 3.0], [-50.0, -60.0, 10.0]), truth)
}

fn dice(a: &Mask, b: &Mask) -> f64 {
    let inter = a.data.iter().zip(&b.data).filter(|(x, y)| **x != 0 && **y != 0).count();
    let s = a.count() + b.count();
    if s == 0 {
        1.0
    } else {
        2.0 * inter as f64 / s as f64
    }
}

fn open(dir: &Path, batch: Option<usize>, cache: Option<PathBuf>) -> Segmenter {
    Segmenter::from_model_dir(dir, EngineOptions { batch_size: batch, cache_dir: cache, ..Default::default() }).unwrap()
}

#[test]
fn box_and_grid_end_to_end() {
    let dir = tiny_model("e2e");
    let seg = open(&dir, None, None);
    assert!(seg.model_id().untrained);
    let (vol, truth) = synthetic_volume(6, 48, 64, 1);
    for mode in [Mode::Box, Mode::Grid] {
        let mut events = Vec::new();
        let r = seg
            .segment(&vol, &SegmentRequest { mode: Some(mode), ..Default::default() }, &mut |p| events.push(p))
            .unwrap();
        assert_eq!(r.mask.dims, vol.dims);
        assert_eq!(r.slice_iou.len(), 6);
        assert_eq!(r.slices.len(), 6);
        assert!((0.0..=1.0).contains(&r.quality));
        assert_eq!(r.flagged, r.quality < r.qa_threshold);
        assert!((r.volume_ml - r.mask.count() as f64 * vol.voxel_ml()).abs() < 1e-9);
        assert_eq!(r.encoder_runs, 6);
        let expect_runs = if mode == Mode::Box { 6 } else { 6 * 81 };
        assert_eq!(r.decoder_runs, expect_runs);
        // Progress: encode and decode both reach their totals.
        for stage in ["encode", "decode"] {
            let last = events.iter().rfind(|p| p.stage.name() == stage).unwrap();
            assert_eq!((last.done, last.total), (6, 6), "{stage}");
        }
        if mode == Mode::Grid {
            // Grid slices are empty exactly when no prompt passed the IoU filter.
            for (z, d) in r.slices.iter().enumerate() {
                if d.prompts_passed == 0 {
                    assert!(d.chosen_prompt.is_none() && r.mask.slice(z).iter().all(|&v| v == 0));
                } else {
                    assert!(d.slice_iou_ok());
                }
            }
        }
        let json = serde_json::to_value(&r).unwrap();
        assert!(json.get("mask").is_none() && json["model"]["untrained"] == true);
        println!(
            "{mode:?}: Dice vs synthetic truth {:.3} (random weights: meaningless), quality {:.3}",
            dice(&r.mask, &truth),
            r.quality
        );
    }
}

trait SliceOk {
    fn slice_iou_ok(&self) -> bool;
}
impl SliceOk for desam::engine::SliceDetail {
    fn slice_iou_ok(&self) -> bool {
        self.chosen_prompt.is_some() && self.iou > 0.5 && self.after_nms >= 1
    }
}

#[test]
fn batch_invariance_of_logits_and_masks() {
    let dir = tiny_model_with_masks("batch");
    let seg = open(&dir, Some(4), None);
    let (vol, _) = synthetic_volume(4, 40, 40, 2);
    let u8vol =
        desam::engine::preprocess::normalize_intensity(&vol.voxels, desam::modeldir::default_clip_percentiles());
    let batched = seg.encode_slices(&u8vol, vol.dims, 0, 4);
    let s = seg.config().image_size as f32;
    tch::no_grad(|| {
        for z in 0..4i64 {
            let single = seg.encode_slices(&u8vol, vol.dims, z as usize, z as usize + 1);
            let fb = batched.narrow(z, 1);
            let boxes = || PromptBatch::Boxes(Tensor::from_slice(&[0.0f32, 0.0, s, s]).view([1, 4]));
            let a = seg.model().decode(&single, &seg.model().pimm_context(&single), &boxes()).logits;
            let b = seg.model().decode(&fb, &seg.model().pimm_context(&fb), &boxes()).logits;
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff <= 1e-5, "slice {z}: batched vs single logits differ by {diff}");
        }
    });
    // bf16 (the fast CPU path) runs and stays close to f32.
    let bf = Segmenter::from_model_dir(&dir, EngineOptions { dtype: Some(tch::Kind::BFloat16), ..Default::default() })
        .unwrap();
    let rb = bf.segment(&vol, &SegmentRequest::default(), &mut |_| {}).unwrap();
    let rf = seg.segment(&vol, &SegmentRequest::default(), &mut |_| {}).unwrap();
    assert_eq!(rb.dtype, "bfloat16");
    println!("bf16 vs f32 box Dice {:.3}", dice(&rb.mask, &rf.mask));
    let one = open(&dir, Some(1), None);
    let req = SegmentRequest { mode: Some(Mode::Grid), ..Default::default() };
    let r1 = one.segment(&vol, &req, &mut |_| {}).unwrap();
    let r4 = seg.segment(&vol, &req, &mut |_| {}).unwrap();
    assert_same_mask("grid, batch 1 vs 4", &r1.mask, &r4.mask, 0.999);
}

#[test]
fn shared_context_matches_the_official_decoder_use() {
    let dir = tiny_model_with_masks("official");
    let seg = open(&dir, None, None);
    let (vol, _) = synthetic_volume(3, 40, 40, 3);
    for mode in [Mode::Box, Mode::Grid] {
        let shared =
            seg.segment(&vol, &SegmentRequest { mode: Some(mode), ..Default::default() }, &mut |_| {}).unwrap();
        let official = seg
            .segment(
                &vol,
                &SegmentRequest { mode: Some(mode), strategy: DecoderStrategy::Official, ..Default::default() },
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(official.decoder_runs, 3 * 81);
        assert_same_mask(&format!("{mode:?}: shared vs official"), &shared.mask, &official.mask, 0.99);
        for (a, b) in shared.slices.iter().zip(&official.slices) {
            assert_eq!(a.chosen_prompt.is_some(), b.chosen_prompt.is_some());
        }
    }
}

#[test]
fn cache_hit_is_identical_and_skips_the_encoder() {
    let dir = tiny_model("cache");
    let cache = tmpdir("cache-store");
    let seg = open(&dir, None, Some(cache.clone()));
    let (vol, _) = synthetic_volume(5, 40, 48, 4);
    let req = SegmentRequest { mode: Some(Mode::Grid), ..Default::default() };
    let first = seg.segment(&vol, &req, &mut |_| {}).unwrap();
    assert_eq!((first.encoder_runs, first.cache_hits), (5, 0));
    let files = std::fs::read_dir(&cache).unwrap().flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap()).count();
    assert_eq!(files, 5);
    // A fresh segmenter (new process-like state) reads the cache.
    let again = open(&dir, None, Some(cache.clone()));
    let second = again.segment(&vol, &req, &mut |_| {}).unwrap();
    assert_eq!((second.encoder_runs, second.cache_hits), (0, 5));
    assert_eq!(first.mask, second.mask);
    assert_eq!(format!("{:?}", first.slice_iou), format!("{:?}", second.slice_iou));
    // A different volume misses.
    let (other, _) = synthetic_volume(5, 40, 48, 5);
    assert_eq!(again.segment(&other, &req, &mut |_| {}).unwrap().encoder_runs, 5);
}

#[test]
fn cancel_and_bad_inputs_give_typed_errors() {
    let dir = tiny_model("bad");
    let seg = open(&dir, None, None);
    let (vol, _) = synthetic_volume(2, 32, 32, 6);
    let cancel = Arc::new(AtomicBool::new(true));
    let e = seg.segment(&vol, &SegmentRequest { cancel: Some(cancel), ..Default::default() }, &mut |_| {}).unwrap_err();
    assert!(matches!(e, EngineError::Cancelled));
    let tiny = Volume::new(vec![1.0; 4 * 4], [1, 4, 4], [1.0; 3], [0.0; 3]);
    assert!(matches!(seg.segment(&tiny, &SegmentRequest::default(), &mut |_| {}), Err(EngineError::BadVolume(_))));
    // Missing model dir.
    let missing =
        Segmenter::from_model_dir(Path::new("/nonexistent/desam-model"), EngineOptions::default()).unwrap_err();
    assert!(matches!(missing, EngineError::ModelDir(ModelDirError::NotADirectory(_))), "{missing}");
    // Hash mismatch: flip one byte of the decoder weights.
    let broken = tmpdir("bad-hash").join("model");
    create_untrained_model_dir(Arch::Tiny, &broken, 1, &BackboneSource::Random).unwrap();
    let f = broken.join("decoder.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(&f, bytes).unwrap();
    let e = Segmenter::from_model_dir(&broken, EngineOptions::default()).unwrap_err();
    assert!(matches!(e, EngineError::ModelDir(ModelDirError::HashMismatch { .. })), "{e}");
    assert!(!e.to_string().contains('\n'));
    // Wrong shapes: a tiny decoder declared as a lite model (hashes fine, shapes wrong).
    let mut spec = modeldir::read_spec(&dir).unwrap();
    let shapes = tmpdir("bad-shape");
    for f in ["encoder.safetensors", "decoder.safetensors"] {
        std::fs::copy(dir.join(f), shapes.join(f)).unwrap();
    }
    spec.arch = Arch::VitB;
    modeldir::write_spec(&shapes, &spec).unwrap();
    let e = Segmenter::from_model_dir(&shapes, EngineOptions::default()).unwrap_err();
    assert!(matches!(e, EngineError::ModelLoad { .. }), "{e}");
    println!("shape error: {e}");
}

#[test]
fn device_choices_parse_and_resolve_in_one_place() {
    use desam::engine::DeviceChoice;
    for (text, choice) in [
        ("auto", DeviceChoice::Auto),
        ("CPU", DeviceChoice::Cpu),
        ("cuda", DeviceChoice::Cuda(0)),
        ("cuda:3", DeviceChoice::Cuda(3)),
    ] {
        assert_eq!(text.parse::<DeviceChoice>(), Ok(choice), "{text}");
    }
    assert_eq!(DeviceChoice::Cuda(3).to_string(), "cuda:3");
    for bad in ["cuda:", "cuda:-1", "tpu", "cuda:x"] {
        assert!(bad.parse::<DeviceChoice>().is_err(), "{bad}");
    }
    assert_eq!(DeviceChoice::Cpu.resolve().unwrap(), tch::Device::Cpu);
    // An index past the machine's CUDA devices is a typed error naming how many there are.
    let past = tch::Cuda::device_count() as usize;
    match DeviceChoice::Cuda(past).resolve() {
        Err(EngineError::DeviceUnavailable(m)) => assert!(m.contains(&format!("cuda:{past}")), "{m}"),
        other => panic!("cuda:{past} resolved to {other:?}"),
    }
}

fn desam() -> Command {
    Command::new(env!("CARGO_BIN_EXE_desam"))
}

#[test]
fn cli_nifti_in_nifti_out_with_json_progress_and_report() {
    let dir = tiny_model("cli");
    let work = tmpdir("cli-work");
    let (vol, _) = synthetic_volume(4, 40, 56, 8);
    let input = work.join("t2.nii.gz");
    desam::nifti::write_nifti(&input, &vol).unwrap();
    let before = std::fs::read(&input).unwrap();
    let out = work.join("mask.nii.gz");
    let report = work.join("report.json");
    let o = desam()
        .args(["segment", input.to_str().unwrap(), "--model", dir.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .args(["--progress", "json", "--report", report.to_str().unwrap(), "--device", "cpu", "--mode", "grid"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("mL") && stderr.contains("UNTRAINED"), "{stderr}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let stages: Vec<&str> =
        lines.iter().filter(|l| l["event"] == "stage").map(|l| l["stage"].as_str().unwrap()).collect();
    for s in ["load", "preprocess", "encode", "decode", "postprocess", "write"] {
        assert!(stages.contains(&s), "missing stage {s}: {stages:?}");
    }
    let done = lines.last().unwrap();
    assert_eq!(done["event"], "done");
    assert_eq!(done["report"]["mode"], "grid");
    let rep: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(rep["slice_iou"].as_array().unwrap().len(), 4);
    assert!(rep["quality"].as_f64().is_some() && rep["timings"]["encode_s"].as_f64().is_some());
    assert_eq!(rep["model"]["sha256"].as_str().unwrap().len(), 64);
    let (mask, grid) = desam::nifti::read_nifti_mask(&out).unwrap();
    assert_eq!(mask.dims, vol.dims);
    assert_eq!(grid.affine_lps(), desam::nifti::read_nifti(&input).unwrap().affine_lps());
    assert_eq!(mask.count() as u64, rep["voxels"].as_u64().unwrap());
    assert_eq!(std::fs::read(&input).unwrap(), before, "input must not change");
}

#[test]
fn cli_bad_inputs_fail_with_one_line() {
    let dir = tiny_model("cli-bad");
    let work = tmpdir("cli-bad-work");
    let (vol, _) = synthetic_volume(2, 32, 32, 9);
    let nii = work.join("v.nii.gz");
    desam::nifti::write_nifti(&nii, &vol).unwrap();
    let empty = work.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let m = dir.to_str().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![nii.display().to_string(), "-o".into(), work.join("x.dcm").display().to_string()], "DICOM-SEG"),
        (vec![empty.display().to_string(), "-o".into(), work.join("x.nii.gz").display().to_string()], "no DICOM files"),
        (
            vec![work.join("nope.nii").display().to_string(), "-o".into(), work.join("x.nii.gz").display().to_string()],
            "does not exist",
        ),
        (vec![nii.display().to_string(), "-o".into(), work.join("x.png").display().to_string()], ".dcm"),
        (vec![nii.display().to_string(), "-o".into(), nii.display().to_string()], "overwrite"),
    ];
    for (args, needle) in cases {
        let o = desam().arg("segment").args(&args).args(["--model", m, "--progress", "json"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        let last: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
        assert_eq!(last["event"], "error");
    }
    // Bad values of typed options are usage errors (exit 2, like clap's others) that list the values.
    let x = work.join("x.nii.gz").display().to_string();
    for (flag, bad, listed) in
        [("--mode", "star", "box, grid"), ("--device", "cuda:x", "cuda:N"), ("--dtype", "f64", "bf16")]
    {
        let o = desam().args(["segment", nii.to_str().unwrap(), "-o", &x, "--model", m, flag, bad]).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flag} {bad}: {stderr}");
        assert!(stderr.contains(flag) && stderr.contains(listed), "{flag} {bad}: {stderr}");
    }
    let o = desam()
        .args([
            "segment",
            nii.to_str().unwrap(),
            "-o",
            work.join("y.nii.gz").to_str().unwrap(),
            "--model",
            "/nonexistent",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("/nonexistent"));
    assert!(!work.join("y.nii.gz").exists());
}

fn python() -> PathBuf {
    std::env::var_os("DESAM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"))
}

/// Source slices → SEG frames as highdicom sees them: foreground count per source instance.
const HIGHDICOM_CHECK: &str = r#"
import json, sys, glob
import pydicom, highdicom as hd
seg = hd.seg.segread(sys.argv[1])
src = {}
for f in glob.glob(sys.argv[2] + "/*"):
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    src[ds.SOPInstanceUID] = (float(ds.ImagePositionPatient[2]), ds.Rows, ds.Columns)
out = {}
for uid, (z, rows, cols) in src.items():
    px = seg.get_pixels_by_source_instance(source_sop_instance_uids=[uid], segment_numbers=[1])
    assert px.shape == (1, rows, cols, 1), px.shape
    out[uid] = int(px.sum())
print(json.dumps({"frames": int(seg.NumberOfFrames), "per_instance": out, "label": seg.get_segment_description(1).segment_label}))
"#;

/// Run `desam segment` on a DICOM series folder → SEG; check it with dciodvfy and highdicom (one frame
/// per source slice, each frame's foreground equal to the engine's slice area) and our reader; print
/// the Dice against `truth`.
fn segment_series_to_seg(name: &str, model: &Path, series: &Path, mode: &str, truth: Option<&Mask>) {
    let work = tmpdir(&format!("seg-{name}"));
    let out = work.join("seg.dcm");
    let report = work.join("r.json");
    let o = desam()
        .args(["segment", series.to_str().unwrap(), "--model", model.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .args(["--report", report.to_str().unwrap(), "--progress", "none", "--mode", mode])
        .output()
        .unwrap();
    assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
    let v = Command::new("dciodvfy").arg(&out).output().expect("dciodvfy (dicom3tools) is installed");
    let text = String::from_utf8_lossy(&v.stdout).to_string() + &String::from_utf8_lossy(&v.stderr);
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("Error")).collect();
    assert!(errors.is_empty(), "{name}: dciodvfy:\n{text}");
    let hd = Command::new(python()).args(["-c", HIGHDICOM_CHECK]).arg(&out).arg(series).output().unwrap();
    assert!(hd.status.success(), "{name}: highdicom: {}", String::from_utf8_lossy(&hd.stderr));
    let hd: serde_json::Value = serde_json::from_slice(&hd.stdout).unwrap();
    let rep: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let loaded = desam::dicom::load_series_dir(series).unwrap().volume;
    assert_eq!(hd["frames"].as_u64().unwrap() as usize, loaded.nz(), "{name}");
    assert_eq!(hd["label"], "Prostate");
    for (z, s) in loaded.slices.iter().enumerate() {
        let area = rep["slices"][z]["area_px"].as_u64().unwrap();
        assert_eq!(hd["per_instance"][&s.sop_instance_uid].as_u64().unwrap(), area, "{name}: slice {z}");
    }
    // Our own reader agrees with the report too (frames → slices).
    let segs = desam::dicom::read_seg(&std::fs::read(&out).unwrap(), &loaded).unwrap();
    assert_eq!(segs.len(), 1);
    let seg_mask = segs.into_iter().next().unwrap().1;
    assert_eq!(seg_mask.count() as u64, rep["voxels"].as_u64().unwrap(), "{name}");
    let dice_txt = truth.map(|t| format!("{:.3}", dice(&seg_mask, t))).unwrap_or("-".into());
    println!("{name} ({mode}): {} slices {}×{}, SEG valid and aligned; Dice vs truth {dice_txt} (random weights: meaningless), quality {:.3}",
        loaded.nz(), loaded.ny(), loaded.nx(), rep["quality"].as_f64().unwrap());
}

#[test]
fn cli_dicom_series_to_valid_seg_aligned_with_source_slices() {
    use desam::dicom::{write_mr_series, MrSeriesAttributes};
    let dir = tiny_model("seg");
    let work = tmpdir("seg-work");
    let (mut vol, truth) = synthetic_volume(5, 48, 40, 11);
    vol.origin = [-20.0, -30.0, 5.0];
    let series = work.join("series");
    let mut attrs = MrSeriesAttributes::default();
    attrs.fit_rescale(&vol);
    write_mr_series(&vol, &attrs, &series).unwrap();
    segment_series_to_seg("synthetic", &dir, &series, "box", Some(&truth));
}

#[test]
fn phantom_sites_box_and_grid_to_seg() {
    use desam::phantom::export::write_case_dicom;
    use desam::phantom::{generate_case_with, GenerateOptions, Site, Size};
    let dir = tiny_model("phantom");
    let work = tmpdir("phantom-cases");
    let opts = GenerateOptions { size: Size::Small, ..Default::default() };
    for (site, mode) in [(Site::A, "grid"), (Site::B, "box"), (Site::D, "box")] {
        let case = generate_case_with(site, 1, 2026, &opts);
        write_case_dicom(&case, &work).unwrap();
        let series = work.join(&case.case_id).join("MR");
        segment_series_to_seg(&format!("site {site:?}"), &dir, &series, mode, Some(&case.gland_mask()));
    }
}

#[test]
fn grid_filters_run_when_prompts_pass() {
    let dir = tiny_model_with_masks("grid-pass");
    let seg = open(&dir, Some(27), None);
    let (vol, _) = synthetic_volume(3, 40, 40, 12);
    let r = seg.segment(&vol, &SegmentRequest { mode: Some(Mode::Grid), ..Default::default() }, &mut |_| {}).unwrap();
    for d in &r.slices {
        assert_eq!(d.prompts_passed, 81);
        assert!(d.after_nms >= 1 && d.after_nms <= 81);
        assert!(d.chosen_prompt.is_some() && d.iou.is_finite());
    }
    assert_eq!(r.decoder_runs, 3 * 81);
    // Both modes: the other mode's agreement enters the quality score; the encoder still runs once per slice.
    let both = seg
        .segment(
            &vol,
            &SegmentRequest { mode: Some(Mode::Box), compare_modes: true, ..Default::default() },
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(both.encoder_runs, 3);
    assert_eq!(both.mode, Mode::Box);
    let agreement = both.quality_terms.as_ref().expect("a non-empty mask has quality terms").mode_agreement;
    assert!(agreement.is_some_and(|a| (0.0..=1.0).contains(&a)), "{agreement:?}");
}

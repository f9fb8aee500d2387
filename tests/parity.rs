//! Parity with the PyTorch reference implementations (CPU, f32): outputs of our Rust modules on
//! the same weights and inputs must match within max|ours−ref| / max|ref| ≤ 1e-4.

use desam::model::checkpoint::{load_into, read_checkpoint};
use desam::model::tiny_vit::TinyVit;
use desam::model::Backbone;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{nn, Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

fn python() -> PathBuf {
    std::env::var_os("DESAM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"))
}

fn run_script(script: &str, out: &Path) {
    let _ = std::fs::remove_dir_all(out);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/parity").join(script);
    let status = Command::new(python()).arg(&script).arg(out).status().expect("run python");
    assert!(status.success(), "{} failed", script.display());
}

fn reference(dir: &Path) -> Vec<(String, Tensor)> {
    Tensor::read_npz(dir.join("reference.npz")).unwrap()
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

fn tmp(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("parity-{name}-{}", std::process::id()))
}

#[test]
fn tiny_vit_matches_lite_medsam_encoder() {
    let dir = tmp("lite-encoder");
    run_script("make_lite_reference.py", &dir);
    let prompt: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("prompt.json")).unwrap()).unwrap();
    let ckpt = PathBuf::from(prompt["checkpoint"].as_str().unwrap());

    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = TinyVit::new(&(vs.root() / "image_encoder"));
    let report = load_into(&mut vs, read_checkpoint(&ckpt).unwrap(), &[]).unwrap();
    assert!(report.fresh.is_empty());
    assert!(report.unused.iter().all(|k| !k.starts_with("image_encoder.") || k.ends_with("num_batches_tracked")));

    let image = Tensor::read_npy(dir.join("image.npy")).unwrap();
    let features = tch::no_grad(|| net.forward(&image));
    let reference = reference(&dir);
    let mut worst = 0f64;
    for (i, tap) in features.taps.iter().enumerate() {
        let name = format!("tap.{i}");
        let e = relative_error(&name, tap, get(&reference, &name));
        eprintln!("{name}: relative error {e:.2e}");
        worst = worst.max(e);
    }
    let e = relative_error("neck", &features.neck, get(&reference, "neck"));
    eprintln!("neck: relative error {e:.2e}");
    worst = worst.max(e);
    assert!(worst <= TOLERANCE, "TinyViT parity: worst relative error {worst:.2e}");
    let _ = std::fs::remove_dir_all(&dir);
}

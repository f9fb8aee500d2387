//! Driver for benches/engine.sh (not a test): prepares model directories and synthetic series, and
//! times the engine's shared-context decoding against the official decoder use in one process.
//!   engine_bench prepare OUT [LITE_PTH]    → OUT/{tiny,lite}/ model dirs, OUT/vol24_384.nii.gz, OUT/vol30_512.nii.gz
//!   engine_bench compare MODEL VOL.nii.gz [box|grid|both] [K] → one JSON line per (mode, strategy)
//!   engine_bench profile MODEL → encoder / PIMM context / box decode seconds on 2 slices

use std::path::{Path, PathBuf};

use desam::engine::{create_untrained_model_dir, BackboneSource};
use desam::engine::{segmenter::DecoderStrategy, EngineOptions, Mode, SegmentRequest, Segmenter};
use desam::model::Arch;
use desam::Volume;

/// A prostate-like series: bright ellipsoid gland in a noisy pelvis (the phantom generator's job; a
/// stand-in with the same sizes is enough for timing).
fn synthetic(nz: usize, n: usize) -> Volume {
    let mut v = vec![0f32; nz * n * n];
    let mut s: u64 = 0x9e3779b97f4a7c15;
    for z in 0..nz {
        for y in 0..n {
            for x in 0..n {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let r = ((s >> 33) as f64 / (1u64 << 31) as f64) as f32;
                let c = n as f64 / 2.0;
                let body = ((x as f64 - c) / (n as f64 * 0.45)).powi(2) + ((y as f64 - c) / (n as f64 * 0.38)).powi(2);
                let gland = ((x as f64 - c) / (n as f64 * 0.12)).powi(2)
                    + ((y as f64 - c * 1.1) / (n as f64 * 0.1)).powi(2)
                    + ((z as f64 - nz as f64 / 2.0) / (nz as f64 * 0.35)).powi(2);
                let i = (z * n + y) * n + x;
                v[i] = if gland < 1.0 {
                    700.0 + 80.0 * r
                } else if body < 1.0 {
                    300.0 + 80.0 * r
                } else {
                    0.0
                };
            }
        }
    }
    Volume::new(v, [nz, n, n], [0.5, 0.5, 3.0], [-96.0, -96.0, -36.0])
}

/// User + system CPU seconds of this process (from /proc; the host is shared, so wall time alone misleads).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn main() -> anyhow::Result<()> {
    desam::runtime::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("prepare") => {
            let out = PathBuf::from(&args[2]);
            std::fs::create_dir_all(&out)?;
            create_untrained_model_dir(Arch::Tiny, &out.join("tiny"), 1, &BackboneSource::Random)?;
            if let Some(pth) = args.get(3) {
                create_untrained_model_dir(Arch::Lite, &out.join("lite"), 1, &BackboneSource::Convert(pth.into()))?;
            }
            desam::nifti::write_nifti(&out.join("vol24_384.nii.gz"), &synthetic(24, 384))?;
            desam::nifti::write_nifti(&out.join("vol30_512.nii.gz"), &synthetic(30, 512))?;
            Ok(())
        }
        Some("compare") => {
            // Shared-context decoding vs the official decoder use (81 full decoder runs per slice) on
            // the same first K slices (the official way is slow); whole-series figures come from the CLI.
            let seg = Segmenter::from_model_dir(
                Path::new(&args[2]),
                EngineOptions { device: desam::engine::DeviceChoice::Cpu, ..Default::default() },
            )?;
            let vol = desam::nifti::read_nifti(Path::new(&args[3]))?;
            let series_slices = vol.nz();
            let modes: Vec<Mode> = match args.get(4).map(String::as_str) {
                Some("both") | None => vec![Mode::Box, Mode::Grid],
                Some(m) => vec![m.parse().map_err(anyhow::Error::msg)?],
            };
            let k: usize = args.get(5).map(|v| v.parse()).transpose()?.unwrap_or(2).min(vol.nz());
            let first_k = {
                let n = vol.slice_len();
                let mut v = Volume::new(vol.voxels[..k * n].to_vec(), [k, vol.ny(), vol.nx()], vol.spacing, vol.origin);
                v.direction = vol.direction;
                v
            };
            for mode in modes {
                for strategy in [DecoderStrategy::Shared, DecoderStrategy::Official] {
                    let v = &first_k;
                    let req = SegmentRequest { mode: Some(mode), strategy, ..Default::default() };
                    let cpu0 = cpu_seconds();
                    let r = seg.segment(v, &req, &mut |_| {})?;
                    let cpu = cpu_seconds() - cpu0;
                    let nz = v.nz() as f64;
                    println!(
                        "{}",
                        serde_json::json!({"model": r.model.arch, "mode": mode.name(), "strategy": strategy,
                            "device": r.device, "dtype": r.dtype, "slices": v.nz(), "timings": r.timings, "cpu_s": cpu,
                            "decode_s_per_slice": r.timings.decode_s / nz, "total_s_per_slice": r.timings.total_s / nz,
                            "series_slices": series_slices, "series_s_extrapolated": r.timings.total_s / nz * series_slices as f64,
                            "decoder_runs": r.decoder_runs, "voxels": r.voxels})
                    );
                }
            }
            Ok(())
        }
        Some("profile") => {
            // Per-piece CPU cost on 2 slices: encoder, PIMM context, one box decode, 81 point decodes.
            let seg = Segmenter::from_model_dir(
                Path::new(&args[2]),
                EngineOptions { device: desam::engine::DeviceChoice::Cpu, ..Default::default() },
            )?;
            let vol = synthetic(2, 256);
            let u8vol = desam::engine::preprocess::normalize_intensity(
                &vol.voxels,
                desam::modeldir::default_clip_percentiles(),
            );
            let cpu = std::time::Instant::now;
            let t = cpu();
            let f = seg.encode_slices(&u8vol, vol.dims, 0, 2);
            let enc = t.elapsed().as_secs_f64() / 2.0;
            let f1 = f.narrow(0, 1);
            let s = seg.config().image_size as f32;
            tch::no_grad(|| {
                let t = cpu();
                let ctx = seg.model().pimm_context(&f1);
                let ctx_s = t.elapsed().as_secs_f64();
                let t = cpu();
                let b = desam::model::PromptBatch::Boxes(tch::Tensor::from_slice(&[0f32, 0.0, s, s]).view([1, 4]));
                let _ = seg.model().decode(&f1, &ctx, &b);
                let dec_s = t.elapsed().as_secs_f64();
                println!(
                    "{}",
                    serde_json::json!({"encode_per_slice_s": enc, "pimm_context_s": ctx_s, "box_decode_s": dec_s})
                );
            });
            Ok(())
        }
        _ => anyhow::bail!("usage: engine_bench prepare OUT [LITE_PTH] | compare MODEL VOL.nii.gz [box|grid]"),
    }
}

//! Driver for benches/gpu.sh (not a test): CUDA probe, the FLOP model of every architecture, and
//! per-slice encoder/decoder timing of randomly initialised networks with device synchronisation.
//!   gpu_bench cuda                          → {"cuda": bool, "devices": n, "cudnn": bool}
//!   gpu_bench flops                         → one JSON line per arch: MACs per slice (encoder, PRIM, PIMM)
//!   gpu_bench time ARCH DEVICE DTYPE B[,B..] ITERS → one JSON line per batch size (out of memory → "status": "oom")

use desam::model::{Arch, DeSam, ModelConfig, PromptBatch};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Multiply-accumulates of one 1024² (ViT) or 256² (LiteMedSAM) slice, by part.
struct Macs {
    encoder: f64,
    prim_box: f64,
    pimm_context: f64,
    pimm_decode: f64,
}

fn ceil_to(x: f64, m: f64) -> f64 {
    (x / m).ceil() * m
}

/// SAM's ViT: windowed blocks pad the g×g grid to whole windows and run qkv/proj on the padding
/// too (that padding is what brings ViT-B to the published ≈486 GMAC).
fn vit_encoder_macs(cfg: &ModelConfig) -> f64 {
    let v = cfg.vit.as_ref().expect("ViT sizes");
    let (g, e, p, d) = (cfg.grid as f64, v.embed_dim as f64, cfg.patch_size as f64, cfg.prompt_dim as f64);
    let n = g * g;
    let w = v.window as f64;
    let mut macs = n * e * 3.0 * p * p; // patch embedding
    for i in 0..v.depth {
        macs += 2.0 * n * e * (v.mlp_ratio as f64 * e); // MLP
        if v.global_indices.contains(&i) {
            macs += 4.0 * n * e * e + 2.0 * n * n * e + 2.0 * n * g * e; // qkv+proj, QKᵀ and AV, rel-pos
        } else {
            let np = ceil_to(g, w).powi(2);
            macs += 4.0 * np * e * e + 2.0 * np * w * w * e + 2.0 * np * w * e;
        }
    }
    macs + n * e * d + n * d * d * 9.0 // neck: 1×1 then 3×3
}

/// LiteMedSAM's TinyViT, layer by layer as src/model/tiny_vit.rs builds it (1×1 patch embedding at
/// 256², MBConv stage at 256², windowed stages at 128/64/64, stride-1 merge into the last stage).
fn tinyvit_encoder_macs() -> f64 {
    let (dims, depths, windows) = ([64.0, 128.0, 160.0, 320.0], [2, 2, 6, 2], [7.0, 7.0, 14.0, 7.0]);
    let px = |s: f64| s * s;
    let mut m = px(256.0) * (3.0 * 32.0 + 32.0 * 64.0);
    m += depths[0] as f64 * px(256.0) * (64.0 * 256.0 + 256.0 * 9.0 + 256.0 * 64.0);
    let merge = |cin: f64, cout: f64, side_in: f64, stride: f64| {
        px(side_in) * cin * cout + px(side_in / stride) * (cout * 9.0 + cout * cout)
    };
    m += merge(64.0, 128.0, 256.0, 2.0);
    let sides = [0.0, 128.0, 64.0, 64.0];
    for i in 1..4 {
        let (c, s, w) = (dims[i], sides[i], windows[i]);
        let (n, np) = (px(s), px(ceil_to(s, w)));
        let block = 4.0 * np * c * c + 2.0 * np * w * w * c + n * c * 9.0 + 8.0 * n * c * c;
        m += depths[i] as f64 * block;
        if i < 3 {
            m += merge(c, dims[i + 1], s, if i == 2 { 1.0 } else { 2.0 });
        }
    }
    m + px(64.0) * (320.0 * 256.0 + 256.0 * 256.0 * 9.0)
}

/// PRIM (SAM's two-way transformer) for one prompt of `t` tokens (5 output tokens + prompt tokens).
fn prim_macs(cfg: &ModelConfig, t: f64) -> f64 {
    let (n, d, mlp) = (cfg.grid as f64 * cfg.grid as f64, cfg.prompt_dim as f64, cfg.two_way_mlp as f64);
    let di = d / 2.0; // cross-attention downsample rate 2
    let cross = |q: f64, kv: f64| q * d * di + 2.0 * kv * d * di + 2.0 * q * kv * di + q * di * d;
    let layer = 4.0 * t * d * d + 2.0 * t * t * d + cross(t, n) + 2.0 * t * d * mlp + cross(n, t);
    cfg.two_way_depth as f64 * layer + cross(t, n)
}

/// PIMM as src/model/pimm.rs builds it: SRB = 3×3, 3×3 (+1×1 projection), 2×2 stride-2 transposed convs.
fn pimm_macs(cfg: &ModelConfig, taps: &[(f64, f64)]) -> (f64, f64) {
    let srb = |cin: f64, cout: f64, s: f64| {
        s * s * (cin * cout * 9.0 + cout * cout * 9.0 + if cin != cout { cin * cout } else { 0.0 })
    };
    let up = |cin: f64, cout: f64, s_in: f64| s_in * s_in * cin * cout * 4.0;
    let (c, g, l) = (cfg.pimm_channels[0] as f64, cfg.grid as f64, taps.len());
    let ladder: Vec<f64> = (0..l).map(|d| c / f64::powi(2.0, d as i32)).collect();
    let mut context = 0.0;
    for d in 0..l {
        let (tc, mut side) = taps[l - 1 - d];
        context += srb(tc, ladder[d], side);
        while side < g * f64::powi(2.0, d as i32) {
            context += up(ladder[d], ladder[d], side) + srb(ladder[d], ladder[d], 2.0 * side);
            side *= 2.0;
        }
    }
    let mut decode = srb(2.0 * c, c, g);
    for i in 0..l - 1 {
        let s = g * f64::powi(2.0, i as i32);
        decode += up(ladder[i], ladder[i + 1], s) + srb(2.0 * ladder[i + 1], ladder[i + 1], 2.0 * s);
    }
    (context, decode + ladder[l - 1] * (g * f64::powi(2.0, l as i32 - 1)).powi(2))
}

fn macs(arch: Arch) -> Macs {
    let cfg = ModelConfig::for_arch(arch);
    let (encoder, taps) = match &cfg.vit {
        Some(v) => (vit_encoder_macs(&cfg), vec![(v.embed_dim as f64, cfg.grid as f64); cfg.tap_count]),
        None => (tinyvit_encoder_macs(), vec![(128.0, 128.0), (160.0, 64.0), (320.0, 64.0)]),
    };
    let (pimm_context, pimm_decode) = pimm_macs(&cfg, &taps);
    Macs { encoder, prim_box: prim_macs(&cfg, 7.0), pimm_context, pimm_decode }
}

fn kind_of(s: &str) -> anyhow::Result<Kind> {
    Ok(match s {
        "f32" => Kind::Float,
        "f16" => Kind::Half,
        "bf16" => Kind::BFloat16,
        _ => anyhow::bail!("dtype {s:?}: expected f32, f16 or bf16"),
    })
}

/// Seconds per slice of the encoder and of the box decoder (PIMM context + PRIM + PIMM), best of
/// `iters` timed batches after one warm-up batch (cuDNN picks its algorithms there).
fn time_batch(model: &DeSam, device: Device, batch: i64, iters: usize) -> (f64, f64) {
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let s = model.config().image_size;
    let images = Tensor::rand([batch, 3, s, s], (Kind::Float, device));
    let boxes = PromptBatch::Boxes(Tensor::from_slice(&[0f32, 0.0, s as f32, s as f32]).view([1, 4]).to_device(device));
    let (mut enc, mut dec) = (f64::INFINITY, f64::INFINITY);
    tch::no_grad(|| {
        for it in 0..=iters {
            sync();
            let t = Instant::now();
            let f = model.encode(&images);
            sync();
            let e = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for i in 0..batch {
                let fi = f.narrow(i, 1);
                let ctx = model.pimm_context(&fi);
                let _ = model.decode(&fi, &ctx, &boxes);
            }
            sync();
            if it > 0 {
                enc = enc.min(e);
                dec = dec.min(t.elapsed().as_secs_f64());
            }
        }
    });
    (enc / batch as f64, dec / batch as f64)
}

fn main() -> anyhow::Result<()> {
    desam::runtime::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("cuda") => {
            let json = serde_json::json!({"cuda": tch::Cuda::is_available(), "devices": tch::Cuda::device_count(),
                "cudnn": tch::Cuda::cudnn_is_available()});
            println!("{json}");
        }
        Some("flops") => {
            for arch in [Arch::VitB, Arch::VitL, Arch::VitH, Arch::Lite, Arch::Tiny] {
                let m = macs(arch);
                let g = 1e-9;
                let decoder = m.prim_box + m.pimm_context + m.pimm_decode;
                let json = serde_json::json!({"arch": arch.name(), "input": ModelConfig::for_arch(arch).image_size,
                    "encoder_gmac": m.encoder * g, "prim_box_gmac": m.prim_box * g, "pimm_context_gmac": m.pimm_context * g,
                    "pimm_decode_gmac": m.pimm_decode * g, "decoder_box_gmac": decoder * g,
                    "encoder_gflop": 2.0 * m.encoder * g, "decoder_box_gflop": 2.0 * decoder * g});
                println!("{json}");
            }
        }
        Some("time") if args.len() >= 7 => {
            let arch: Arch = args[2].parse().map_err(anyhow::Error::msg)?;
            let device = match args[3].as_str() {
                "cpu" => Device::Cpu,
                "cuda" if tch::Cuda::is_available() => Device::Cuda(0),
                d => anyhow::bail!("device {d:?} is not available"),
            };
            let kind = kind_of(&args[4])?;
            let iters: usize = args[6].parse()?;
            tch::manual_seed(0);
            let cfg = ModelConfig::for_arch(arch);
            let mut model = DeSam::new(&cfg, device);
            if kind != Kind::Float {
                model.var_store_mut().set_kind(kind);
            }
            if device == Device::Cpu {
                model.use_channels_last(); // as the engine does on the CPU
            }
            for b in args[5].split(',') {
                let batch: i64 = b.parse()?;
                let base =
                    serde_json::json!({"arch": arch.name(), "device": args[3], "dtype": args[4], "batch": batch});
                let mut row = base.as_object().cloned().unwrap_or_default();
                match catch_unwind(AssertUnwindSafe(|| time_batch(&model, device, batch, iters))) {
                    Ok((enc, dec)) => {
                        row.insert("status".into(), "ok".into());
                        row.insert("encoder_s_per_slice".into(), enc.into());
                        row.insert("decoder_s_per_slice".into(), dec.into());
                    }
                    Err(e) => {
                        let msg = e.downcast_ref::<String>().cloned().unwrap_or_else(|| "panic".into());
                        let oom = msg.contains("out of memory");
                        row.insert("status".into(), if oom { "oom" } else { "failed" }.into());
                        row.insert(
                            "reason".into(),
                            msg.lines().next().unwrap_or("").chars().take(300).collect::<String>().into(),
                        );
                    }
                }
                println!("{}", serde_json::Value::Object(row));
            }
        }
        _ => anyhow::bail!("usage: gpu_bench cuda | flops | time ARCH cpu|cuda f32|f16|bf16 B[,B..] ITERS"),
    }
    Ok(())
}

//! The DeSAM network at the tiny configuration (seeded, CPU): output shapes, prompt tokens, PIMM
//! invariants (per-sample batching, prompt only through M, shared context), state-dict names and
//! sizes of the real ViT-B layout, checkpoint round trips, dtypes, gradients and the forward CLI.

use desam::model::checkpoint::{read_checkpoint, save_safetensors};
use desam::model::{Arch, DeSam, ModelConfig, PromptBatch};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

fn tiny(seed: i64) -> DeSam {
    tch::manual_seed(seed);
    DeSam::new(&ModelConfig::for_arch(Arch::Tiny), Device::Cpu)
}

fn image(batch: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn([batch, 3, 128, 128], (Kind::Float, Device::Cpu))
}

fn points(xy: &[(f32, f32)]) -> PromptBatch {
    let coords: Vec<f32> = xy.iter().flat_map(|&(x, y)| [x, y]).collect();
    let n = xy.len() as i64;
    PromptBatch::Points {
        coords: Tensor::from_slice(&coords).view([n, 1, 2]),
        labels: Tensor::ones([n, 1], (Kind::Float, Device::Cpu)),
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn tmp(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("model-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn every_output_has_its_shape() {
    let m = tiny(1);
    tch::no_grad(|| {
        let f = m.encode(&image(2, 2));
        assert_eq!(f.taps.len(), 3);
        for t in &f.taps {
            assert_eq!(t.size(), vec![2, 64, 8, 8]);
        }
        assert_eq!(f.neck.size(), vec![2, 64, 8, 8]);
        assert_eq!(m.backbone().tap_shapes(), vec![(64, 8); 3]);
        let ctx = m.pimm_context(&f);
        let shapes: Vec<Vec<i64>> = ctx.branches.iter().map(|t| t.size()).collect();
        assert_eq!(shapes, vec![vec![2, 64, 8, 8], vec![2, 32, 16, 16], vec![2, 16, 32, 32]]);
        let boxes = PromptBatch::Boxes(Tensor::from_slice(&[10f32, 20., 90., 100., 0., 0., 128., 128.]).view([2, 4]));
        let out = m.decode(&f, &ctx, &boxes);
        assert_eq!(out.iou.size(), vec![2, 1]);
        assert_eq!(out.mask_embedding.size(), vec![2, 64, 8, 8]);
        assert_eq!(out.logits.size(), vec![2, 1, 32, 32]);
        assert_eq!(m.sam_mask(&f, &boxes).size(), vec![2, 1, 32, 32]);
        assert!(bool::try_from(out.logits.isfinite().all()).unwrap());
    });
}

#[test]
fn a_point_and_a_box_each_give_two_sparse_tokens() {
    let m = tiny(3);
    let pe = m.prompt_encoder();
    let coords = Tensor::from_slice(&[40f32, 50.]).view([1, 1, 2]);
    let labels = Tensor::from_slice(&[1f32]).view([1, 1]);
    let p = pe.embed_points(&coords, &labels, true);
    assert_eq!(p.size(), vec![1, 2, 64]);
    let b = pe.embed_boxes(&Tensor::from_slice(&[10f32, 20., 90., 100.]).view([1, 4]));
    assert_eq!(b.size(), vec![1, 2, 64]);
    // The padding token is the same whatever the point, and differs from the point token.
    let coords2 = Tensor::from_slice(&[100f32, 7.]).view([1, 1, 2]);
    let p2 = pe.embed_points(&coords2, &labels, true);
    assert!(p.get(0).get(1).equal(&p2.get(0).get(1)));
    assert!(max_abs_diff(&p.get(0).get(0), &p2.get(0).get(0)) > 1e-3);
}

#[test]
fn batching_prompts_equals_running_them_one_by_one() {
    let m = tiny(4);
    tch::no_grad(|| {
        let f = m.encode(&image(1, 5));
        let ctx = m.pimm_context(&f);
        let xy = [(10.0, 12.0), (64.0, 64.0), (120.0, 3.0)];
        let all = m.decode(&f, &ctx, &points(&xy));
        for (i, p) in xy.iter().enumerate() {
            let one = m.decode(&f, &ctx, &points(&[*p]));
            let i = i as i64;
            assert!(max_abs_diff(&all.logits.narrow(0, i, 1), &one.logits) < 1e-5);
            assert!(max_abs_diff(&all.iou.narrow(0, i, 1), &one.iou) < 1e-5);
            assert!(max_abs_diff(&all.mask_embedding.narrow(0, i, 1), &one.mask_embedding) < 1e-5);
        }
        // Different prompts do give different outputs (the check above is not vacuous).
        assert!(max_abs_diff(&all.logits.get(0), &all.logits.get(1)) > 1e-6);
        assert!(max_abs_diff(&all.iou.get(0), &all.iou.get(1)) > 1e-6);
    });
}

#[test]
fn the_prompt_reaches_the_logits_only_through_the_mask_embedding() {
    let m = tiny(6);
    tch::no_grad(|| {
        let f = m.encode(&image(1, 7));
        let ctx = m.pimm_context(&f);
        let a = m.decode(&f, &ctx, &points(&[(10.0, 10.0)]));
        let b = m.decode(&f, &ctx, &PromptBatch::Boxes(Tensor::from_slice(&[30f32, 30., 100., 110.]).view([1, 4])));
        assert!(max_abs_diff(&a.logits, &b.logits) > 1e-6);
        // PIMM given each prompt's own M reproduces decode; given a fixed M, the prompts agree.
        assert!(max_abs_diff(&m.pimm().decode(&ctx, &a.mask_embedding), &a.logits) == 0.0);
        tch::manual_seed(8);
        let fixed = Tensor::randn([1, 64, 8, 8], (Kind::Float, Device::Cpu));
        let la = m.pimm().decode(&ctx, &fixed);
        let lb = m.pimm().decode(&ctx, &fixed);
        assert!(la.equal(&lb));
        assert!(max_abs_diff(&la, &a.logits) > 1e-6);
    });
}

#[test]
fn shared_context_decode_equals_full_decode() {
    let m = tiny(9);
    tch::no_grad(|| {
        let f = m.encode(&image(1, 10));
        let prompts = points(&[(5.0, 100.0), (77.0, 30.0)]);
        let shared = m.decode(&f, &m.pimm_context(&f), &prompts);
        // Full path: features repeated to the prompt batch, context recomputed per prompt.
        let fb = f.expand_batch(2);
        let taps: Vec<Tensor> = fb.taps.iter().map(|t| t.contiguous()).collect();
        let full = m.pimm().forward(&taps, &shared.mask_embedding);
        assert!(max_abs_diff(&shared.logits, &full) < 1e-5);
        let per_prompt_ctx = m.decode(&fb, &m.pimm_context(&fb), &prompts);
        assert!(max_abs_diff(&shared.logits, &per_prompt_ctx.logits) < 1e-5);
    });
}

#[test]
fn vit_b_state_dict_matches_the_pytorch_layout() {
    tch::manual_seed(0);
    let m = DeSam::new(&ModelConfig::for_arch(Arch::VitB), Device::Cpu);
    let sd = m.state_dict();
    let count = |prefix: &str| sd.iter().filter(|(n, _)| n.starts_with(prefix)).count();
    let values = |prefix: &str| sd.iter().filter(|(n, _)| n.starts_with(prefix)).map(|(_, t)| t.numel()).sum::<usize>();
    // Spec §7/§8/§18: 366 tensors, 101,198,832 values (SAM 314 + PIMM 52).
    assert_eq!(sd.len(), 366);
    assert_eq!(values(""), 101_198_832);
    assert_eq!((count("image_encoder."), count("prompt_encoder."), count("mask_decoder.pimm.")), (177, 17, 52));
    assert_eq!(values("image_encoder."), 89_670_912);
    assert_eq!(values("mask_decoder.pimm."), 7_463_104);
    assert_eq!(values("mask_decoder.") - values("mask_decoder.pimm."), 4_058_340);
    let shape = |n: &str| sd.iter().find(|(k, _)| k == n).unwrap_or_else(|| panic!("missing {n}")).1.size();
    assert_eq!(shape("image_encoder.blocks.2.attn.rel_pos_h"), vec![127, 64]);
    assert_eq!(shape("image_encoder.blocks.3.attn.rel_pos_w"), vec![27, 64]);
    assert_eq!(shape("mask_decoder.output_upscaling.0.weight"), vec![256, 64, 2, 2]);
    assert_eq!(shape("mask_decoder.pimm.conv_blocks_context.0.block_init.conv1.conv.weight"), vec![256, 768, 3, 3]);
    assert_eq!(shape("mask_decoder.pimm.conv_blocks_context.2.residual_block.1.0.conv.weight"), vec![64, 64, 2, 2]);
    assert_eq!(shape("mask_decoder.pimm.conv_blocks_localization.0.transp_conv.conv.weight"), vec![256, 128, 2, 2]);
    assert_eq!(shape("mask_decoder.pimm.mask_embedding_fusion.se.fc.0.weight"), vec![16, 256]);
    assert_eq!(shape("mask_decoder.pimm.seg_outputs.0.weight"), vec![1, 128, 1, 1]);
    assert_eq!(shape("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"), vec![2, 128]);
    // Only the decoder is handed to training.
    let dec = m.decoder_variables();
    assert_eq!(dec.len(), 120 + 52);
    assert!(dec.iter().all(|(n, _)| n.starts_with("mask_decoder.")));
}

#[test]
fn state_dict_round_trips_through_safetensors_bit_exact() {
    let m = tiny(11);
    let path = tmp("tiny.safetensors");
    save_safetensors(&m.state_dict(), &path, Kind::Float).unwrap();
    let cfg = ModelConfig::for_arch(Arch::Tiny);
    tch::manual_seed(999); // a different fresh init, fully overwritten by the load
    let (back, report) = DeSam::load(&cfg, &[path.as_path()], Device::Cpu).unwrap();
    assert!(report.fresh.is_empty() && report.unused.is_empty());
    assert_eq!(report.loaded, m.state_dict().len());
    for ((na, a), (nb, b)) in m.state_dict().iter().zip(back.state_dict().iter()) {
        assert_eq!(na, nb);
        assert!(a.equal(b), "{na} differs");
    }
    // And the outputs agree exactly.
    tch::no_grad(|| {
        let img = image(1, 12);
        let (fa, fb) = (m.encode(&img), back.encode(&img));
        let p = points(&[(20.0, 30.0)]);
        let oa = m.decode(&fa, &m.pimm_context(&fa), &p);
        let ob = back.decode(&fb, &back.pimm_context(&fb), &p);
        assert!(oa.logits.equal(&ob.logits));
    });
}

#[test]
fn a_sam_only_checkpoint_leaves_pimm_fresh_and_says_so() {
    let m = tiny(13);
    let sam_only: Vec<(String, Tensor)> =
        m.state_dict().into_iter().filter(|(n, _)| !n.starts_with("mask_decoder.pimm.")).collect();
    let path = tmp("tiny-sam-only.safetensors");
    save_safetensors(&sam_only, &path, Kind::Float).unwrap();
    let cfg = ModelConfig::for_arch(Arch::Tiny);
    let (a, report) = DeSam::load(&cfg, &[path.as_path()], Device::Cpu).unwrap();
    assert!(!report.fresh.is_empty());
    assert!(report.fresh.iter().all(|n| n.starts_with("mask_decoder.pimm.")));
    assert_eq!(report.loaded, sam_only.len());
    // A missing non-PIMM tensor is an error, not a silent fresh init.
    let broken: Vec<(String, Tensor)> =
        sam_only.into_iter().filter(|(n, _)| n != "mask_decoder.iou_token.weight").collect();
    save_safetensors(&broken, &path, Kind::Float).unwrap();
    let err = DeSam::load(&cfg, &[path.as_path()], Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("mask_decoder.iou_token.weight"), "{err}");
    // Layering: SAM file first, then a PIMM-only file → nothing fresh.
    let pimm_only: Vec<(String, Tensor)> =
        a.state_dict().into_iter().filter(|(n, _)| n.starts_with("mask_decoder.pimm.")).collect();
    let full_sam = tmp("tiny-sam.safetensors");
    save_safetensors(&m.state_dict(), &full_sam, Kind::Float).unwrap();
    let pimm_path = tmp("tiny-pimm.safetensors");
    save_safetensors(&pimm_only, &pimm_path, Kind::Float).unwrap();
    let (b, report) = DeSam::load(&cfg, &[full_sam.as_path(), pimm_path.as_path()], Device::Cpu).unwrap();
    assert!(report.fresh.is_empty());
    let w = "mask_decoder.pimm.seg_outputs.1.weight";
    let get = |d: &DeSam| d.state_dict().into_iter().find(|(n, _)| n == w).unwrap().1;
    assert!(get(&b).equal(&get(&a)));
    assert!(read_checkpoint(&pimm_path).unwrap().len() == pimm_only.len());
}

#[test]
fn reduced_precision_inference_stays_close_to_f32() {
    let mut m = tiny(14);
    let img = image(1, 15);
    let p = points(&[(60.0, 70.0)]);
    let run = |m: &DeSam| {
        tch::no_grad(|| {
            let f = m.encode(&img);
            m.decode(&f, &m.pimm_context(&f), &p).logits.to_kind(Kind::Float)
        })
    };
    let ref32 = run(&m);
    m.var_store_mut().set_kind(Kind::BFloat16);
    assert_eq!(m.kind(), Kind::BFloat16);
    let lo = run(&m);
    let rel = max_abs_diff(&lo, &ref32) / ref32.abs().max().double_value(&[]);
    assert!(rel < 0.1, "bf16 relative error {rel}");
}

#[test]
fn gradients_reach_prim_and_pimm_through_decode() {
    let m = tiny(16);
    let f = tch::no_grad(|| m.encode(&image(1, 17)));
    let out = m.decode(&f, &m.pimm_context(&f), &points(&[(30.0, 40.0), (90.0, 90.0)]));
    (out.logits.sigmoid().mean(Kind::Float) + out.iou.mean(Kind::Float)).backward();
    let vars = m.decoder_variables();
    let grad_of = |name: &str| vars.iter().find(|(n, _)| n == name).unwrap().1.grad();
    for name in [
        "mask_decoder.iou_token.weight",
        "mask_decoder.transformer.layers.1.norm4.weight",
        "mask_decoder.pimm.mask_embedding_fusion.conv1.conv.weight",
        "mask_decoder.pimm.conv_blocks_context.2.block_init.conv1.conv.weight",
        "mask_decoder.pimm.seg_outputs.1.weight",
    ] {
        let g = grad_of(name);
        assert!(g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{name} has no gradient");
    }
    // SAM's unused mask head gets none.
    assert!(!grad_of("mask_decoder.output_upscaling.0.weight").defined());
    // With the encoders frozen, encoding builds no graph, while the decoder still trains.
    m.freeze_encoders();
    let f = m.encode(&image(1, 18));
    assert!(!f.neck.requires_grad() && !f.taps[0].requires_grad());
    let out = m.decode(&f, &m.pimm_context(&f), &points(&[(30.0, 40.0)]));
    assert!(out.logits.requires_grad());
}

fn write_npy(path: &Path, t: &Tensor) {
    let shape = t.size().iter().map(|d| format!("{d}, ")).collect::<String>();
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({shape}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    let v = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
    for x in v {
        bytes.extend(x.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn forward_cli_writes_every_output_and_rejects_bad_input() {
    let m = tiny(18);
    let ckpt = tmp("cli.safetensors");
    let sam_only = tmp("cli-sam-only.safetensors");
    save_safetensors(&m.state_dict(), &ckpt, Kind::Float).unwrap();
    let no_pimm: Vec<(String, Tensor)> =
        m.state_dict().into_iter().filter(|(n, _)| !n.starts_with("mask_decoder.pimm.")).collect();
    save_safetensors(&no_pimm, &sam_only, Kind::Float).unwrap();
    let img_path = tmp("img.npy");
    let img = image(1, 19);
    write_npy(&img_path, &img);
    let out = tmp("out.safetensors");
    let desam = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_desam")).arg("forward").args(args).output().unwrap();
    let base = ["--arch", "tiny", "--image", img_path.to_str().unwrap(), "--out", out.to_str().unwrap()];

    let r = desam(&[&base[..], &["--checkpoint", ckpt.to_str().unwrap(), "--point", "40", "50", "1"]].concat());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("encoder"));
    let got: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out).unwrap().into_iter().collect();
    let mut names: Vec<&String> = got.keys().collect();
    names.sort();
    assert_eq!(names, ["iou", "logits", "mask_embedding", "neck", "sam_masks", "tap.0", "tap.1", "tap.2"]);
    // Same numbers as the library.
    let expect = tch::no_grad(|| {
        let f = m.encode(&img);
        m.decode(&f, &m.pimm_context(&f), &points(&[(40.0, 50.0)])).logits
    });
    assert!(max_abs_diff(&got["logits"], &expect) < 1e-6);

    // SAM-only weights: a note on stderr, and the fresh PIMM follows --seed.
    let run_seed = |seed: &str| {
        let r = desam(
            &[
                &base[..],
                &["--checkpoint", sam_only.to_str().unwrap(), "--box", "0", "0", "128", "128", "--seed", seed],
            ]
            .concat(),
        );
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(String::from_utf8_lossy(&r.stderr).contains("fresh"));
        Tensor::read_safetensors(&out).unwrap().into_iter().find(|(n, _)| n == "logits").unwrap().1
    };
    let (a, b, c) = (run_seed("1"), run_seed("1"), run_seed("2"));
    assert!(a.equal(&b));
    assert!(!a.equal(&c));

    for (bad, needle) in [
        (vec!["--checkpoint", ckpt.to_str().unwrap()], "no prompt"),
        (vec!["--checkpoint", ckpt.to_str().unwrap(), "--point", "400", "5", "1"], "outside"),
        (vec!["--checkpoint", ckpt.to_str().unwrap(), "--point", "4", "5", "7"], "label"),
        (vec!["--checkpoint", ckpt.to_str().unwrap(), "--box", "9", "9", "1", "1"], "--box"),
        (vec!["--checkpoint", "/nonexistent.pth", "--point", "4", "5", "1"], "nonexistent"),
    ] {
        let r = desam(&[&base[..], &bad[..]].concat());
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{bad:?}: {err}");
        assert!(
            err.starts_with("desam: error:") && err.contains(needle) && err.trim_end().lines().count() == 1,
            "{err}"
        );
    }
    // A dtype outside the list is a usage error (exit 2) naming the possible values.
    let r = desam(
        &[&base[..], &["--checkpoint", ckpt.to_str().unwrap(), "--point", "4", "5", "1", "--dtype", "f64"]].concat(),
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains("--dtype") && err.contains("f32, f16, bf16"), "{err}");
    // Wrong image size for the architecture.
    write_npy(&img_path, &Tensor::zeros([1, 3, 64, 64], (Kind::Float, Device::Cpu)));
    let r = desam(&[&base[..], &["--checkpoint", ckpt.to_str().unwrap(), "--point", "4", "5", "1"]].concat());
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("[1, 3, 128, 128]"));
}

#[test]
fn lite_medsam_layout_feeds_tinyvit_stages_into_a_256_pimm() {
    tch::manual_seed(20);
    let m = DeSam::new(&ModelConfig::for_arch(Arch::Lite), Device::Cpu);
    let shapes = m.backbone().tap_shapes();
    assert_eq!(shapes, vec![(128, 128), (160, 64), (320, 64)]);
    let sd = m.state_dict();
    let pimm: Vec<&(String, Tensor)> = sd.iter().filter(|(n, _)| n.starts_with("mask_decoder.pimm.")).collect();
    // Layout documented in docs/model.md: 46 tensors, 5,033,664 values.
    assert_eq!(pimm.len(), 46);
    assert_eq!(pimm.iter().map(|(_, t)| t.numel()).sum::<usize>(), 5_033_664);
    tch::no_grad(|| {
        let taps: Vec<Tensor> =
            shapes.iter().map(|&(c, s)| Tensor::randn([1, c, s, s], (Kind::Float, Device::Cpu))).collect();
        let f = desam::model::Features { taps, neck: Tensor::randn([1, 256, 64, 64], (Kind::Float, Device::Cpu)) };
        let boxes = PromptBatch::Boxes(Tensor::from_slice(&[0f32, 0., 255., 255.]).view([1, 4]));
        let out = m.decode(&f, &m.pimm_context(&f), &boxes);
        assert_eq!(out.logits.size(), vec![1, 1, 256, 256]);
        assert_eq!(m.sam_mask(&f, &boxes).size(), vec![1, 1, 256, 256]);
    });
}

#[test]
fn channels_last_encoder_gives_the_same_features() {
    // The engine switches the CPU encoder to channels-last (DeSam::use_channels_last): values must
    // not change, only memory order. LiteMedSAM has the convolutions where it matters.
    tch::manual_seed(21);
    let mut m = DeSam::new(&ModelConfig::for_arch(Arch::Lite), Device::Cpu);
    tch::manual_seed(22);
    let img = Tensor::randn([2, 3, 256, 256], (Kind::Float, Device::Cpu));
    let before = tch::no_grad(|| m.encode(&img));
    m.use_channels_last();
    let conv = m.state_dict().into_iter().find(|(n, _)| n == "image_encoder.patch_embed.seq.0.c.weight").unwrap().1;
    assert_eq!(conv.stride()[1], 1, "conv weight is channels-last after use_channels_last");
    let after = tch::no_grad(|| m.encode(&img));
    for (a, b) in before.taps.iter().chain([&before.neck]).zip(after.taps.iter().chain([&after.neck])) {
        assert_eq!(a.size(), b.size());
        assert!(b.is_contiguous(), "features come back NCHW-contiguous for PIMM");
        let rel = max_abs_diff(a, b) / a.abs().max().double_value(&[]);
        assert!(rel < 1e-4, "channels-last changed a feature by {rel} (relative)");
    }
}

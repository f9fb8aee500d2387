//! `desam forward`: one forward pass of a model on a prepared, normalised image (debugging and
//! parity checks). Owns the .npy reader and the output file layout; no preprocessing of images.

use super::values::DeviceParser;
use crate::engine::{DeviceChoice, Dtype};
use crate::model::{Arch, DeSam, ModelConfig, PromptBatch};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Architecture.
    #[arg(long, value_enum, ignore_case = true)]
    pub arch: Arch,
    /// Weights (.pth or .safetensors); repeat to layer several files (later keys win).
    #[arg(long = "checkpoint", required = true)]
    pub checkpoints: Vec<PathBuf>,
    /// float32 1×3×S×S image, already normalised for the architecture.
    #[arg(long)]
    pub image: PathBuf,
    /// Box prompt x0 y0 x1 y1 in the input-pixel frame.
    #[arg(long = "box", num_args = 4, value_names = ["X0", "Y0", "X1", "Y1"], allow_negative_numbers = true)]
    pub bbox: Option<Vec<f64>>,
    /// Point prompt x y label (1 foreground, 0 background); repeatable.
    #[arg(long = "point", num_args = 3, value_names = ["X", "Y", "LABEL"], allow_negative_numbers = true,
          action = clap::ArgAction::Append)]
    pub points: Vec<f64>,
    /// Output safetensors: tap.N, neck, iou, mask_embedding, logits, sam_masks (f32).
    #[arg(long)]
    pub out: PathBuf,
    /// Where to run.
    #[arg(long, default_value = "cpu", value_parser = DeviceParser)]
    pub device: DeviceChoice,
    #[arg(long, value_enum, default_value_t = Dtype::F32, ignore_case = true)]
    pub dtype: Dtype,
    /// Seed of the fresh initialisation of weights the checkpoints lack (PIMM).
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = args.device.resolve()?;
    let kind = args.dtype.kind();
    let cfg = ModelConfig::for_arch(args.arch);
    let prompts = prompt_batch(&args, cfg.image_size)?;
    let image = read_npy_f32(&args.image)?;
    let s = cfg.image_size;
    if image.size() != [1, 3, s, s] {
        bail!("{}: image has shape {:?}, {} expects [1, 3, {s}, {s}]", args.image.display(), image.size(), args.arch);
    }

    tch::manual_seed(args.seed);
    let paths: Vec<&Path> = args.checkpoints.iter().map(PathBuf::as_path).collect();
    let (mut model, report) = DeSam::load(&cfg, &paths, device)?;
    if !report.fresh.is_empty() {
        eprintln!(
            "desam: note: {} tensor(s) not in the checkpoint(s) (PIMM) keep a fresh init seeded with {}",
            report.fresh.len(),
            args.seed
        );
    }
    if kind != Kind::Float {
        model.var_store_mut().set_kind(kind);
    }

    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let (outputs, t_enc, t_dec) = tch::no_grad(|| {
        let t0 = Instant::now();
        let feats = model.encode(&image.to_device(device));
        sync();
        let t_enc = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let ctx = model.pimm_context(&feats);
        let out = model.decode(&feats, &ctx, &prompts);
        let sam = model.sam_mask(&feats, &prompts);
        sync();
        let t_dec = t1.elapsed().as_secs_f64();
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for (i, t) in feats.taps.iter().enumerate() {
            named.push((format!("tap.{i}"), t.shallow_clone()));
        }
        named.push(("neck".into(), feats.neck));
        named.push(("iou".into(), out.iou));
        named.push(("mask_embedding".into(), out.mask_embedding));
        named.push(("logits".into(), out.logits));
        named.push(("sam_masks".into(), sam));
        let named: Vec<(String, Tensor)> =
            named.into_iter().map(|(n, t)| (n, t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous())).collect();
        (named, t_enc, t_dec)
    });
    Tensor::write_safetensors(&outputs, &args.out).with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "desam: timing: encoder {t_enc:.3} s, decoder {t_dec:.3} s ({} {}, {})",
        args.arch,
        args.dtype.name(),
        args.device
    );
    Ok(())
}

fn prompt_batch(args: &Args, image_size: i64) -> anyhow::Result<PromptBatch> {
    let in_frame = |v: f64| v.is_finite() && v >= 0.0 && v <= image_size as f64;
    match (&args.bbox, args.points.is_empty()) {
        (Some(_), false) => bail!("give either --box or --point, not both"),
        (None, true) => bail!("no prompt: give --box X0 Y0 X1 Y1 or --point X Y LABEL"),
        (Some(b), true) => {
            if !b.iter().all(|&v| in_frame(v)) || b[2] < b[0] || b[3] < b[1] {
                bail!("--box {b:?}: expected 0 ≤ x0 ≤ x1 ≤ {image_size} and 0 ≤ y0 ≤ y1 ≤ {image_size}");
            }
            let v: Vec<f32> = b.iter().map(|&x| x as f32).collect();
            Ok(PromptBatch::Boxes(Tensor::from_slice(&v).view([1, 4])))
        }
        (None, false) => {
            let mut coords = Vec::new();
            let mut labels = Vec::new();
            for p in args.points.chunks(3) {
                if !in_frame(p[0]) || !in_frame(p[1]) {
                    bail!("--point {} {}: outside the {image_size}×{image_size} input frame", p[0], p[1]);
                }
                if p[2] != 0.0 && p[2] != 1.0 {
                    bail!("--point label {}: expected 1 (foreground) or 0 (background)", p[2]);
                }
                coords.extend([p[0] as f32, p[1] as f32]);
                labels.push(p[2] as f32);
            }
            let n = labels.len() as i64;
            Ok(PromptBatch::Points {
                coords: Tensor::from_slice(&coords).view([1, n, 2]),
                labels: Tensor::from_slice(&labels).view([1, n]),
            })
        }
    }
}

/// Errors of the minimal .npy reader.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{0}: cannot read: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}: not a .npy file ({1})")]
    Format(PathBuf, String),
    #[error("{0}: dtype {1} is not supported (need little-endian float32 '<f4')")]
    Dtype(PathBuf, String),
    #[error("{0}: Fortran-order arrays are not supported (save with C order)")]
    Fortran(PathBuf),
}

/// Reads a C-order little-endian float32 .npy array (format versions 1–3) as a CPU tensor.
pub fn read_npy_f32(path: &Path) -> Result<Tensor, NpyError> {
    let bytes = std::fs::read(path).map_err(|e| NpyError::Io(path.to_path_buf(), e))?;
    let fmt = |m: &str| NpyError::Format(path.to_path_buf(), m.to_string());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(fmt("missing \\x93NUMPY magic"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(fmt(&format!("unknown format version {v}"))),
    };
    let header = bytes.get(start..start + header_len).ok_or_else(|| fmt("truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| fmt("header is not text"))?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[i..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr").ok_or_else(|| fmt("no 'descr' in header"))?;
    let descr = descr.trim_start_matches(['\'', '"']).split(['\'', '"']).next().unwrap_or("");
    if descr != "<f4" {
        return Err(NpyError::Dtype(path.to_path_buf(), descr.to_string()));
    }
    let fortran = field("fortran_order").ok_or_else(|| fmt("no 'fortran_order' in header"))?;
    if fortran.starts_with("True") {
        return Err(NpyError::Fortran(path.to_path_buf()));
    }
    let shape = field("shape").ok_or_else(|| fmt("no 'shape' in header"))?;
    let inner = shape.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or_else(|| fmt("bad 'shape'"))?;
    let dims: Vec<i64> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<i64>().map_err(|_| fmt("bad 'shape'")))
        .collect::<Result<_, _>>()?;
    let numel: i64 = dims.iter().product();
    let data = &bytes[start + header_len..];
    if data.len() != numel as usize * 4 {
        return Err(fmt(&format!("shape {dims:?} needs {} data bytes, file has {}", numel * 4, data.len())));
    }
    let values: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok(Tensor::from_slice(&values).view(dims.as_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str, data: &[f32]) -> Vec<u8> {
        let mut h = header.to_string();
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((h.len() as u16).to_le_bytes());
        b.extend(h.as_bytes());
        for v in data {
            b.extend(v.to_le_bytes());
        }
        b
    }

    #[test]
    fn reads_c_order_f32_and_rejects_others() {
        let dir = std::env::temp_dir().join(format!("desam-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        std::fs::write(
            &p,
            npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 3), }", &[0., 1., 2., 3., 4., 5.]),
        )
        .unwrap();
        let t = read_npy_f32(&p).unwrap();
        assert_eq!(t.size(), vec![1, 2, 3]);
        assert_eq!(t.double_value(&[0, 1, 2]), 5.0);
        std::fs::write(&p, npy("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", &[0., 0.])).unwrap();
        assert!(matches!(read_npy_f32(&p), Err(NpyError::Dtype(..))));
        std::fs::write(&p, npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", &[0., 0.])).unwrap();
        assert!(matches!(read_npy_f32(&p), Err(NpyError::Fortran(..))));
        std::fs::write(&p, npy("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", &[0., 0.])).unwrap();
        assert!(matches!(read_npy_f32(&p), Err(NpyError::Format(..))));
        std::fs::write(&p, b"hello").unwrap();
        assert!(matches!(read_npy_f32(&p), Err(NpyError::Format(..))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

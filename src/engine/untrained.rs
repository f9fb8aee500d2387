//! Untrained model directories: builds the network (random, or from an official checkpoint), writes
//! its weights as safetensors and a model.json labelled "untrained". Tests, benchmarks, training starts.

use std::path::{Path, PathBuf};

use crate::model::{checkpoint, Arch, DeSam, ModelConfig};
use crate::modeldir::{
    default_clip_percentiles, open, sha256_file, write_spec, Cleanup3d, Mode, ModelDir, ModelDirError, ModelSpec,
    Normalization, Preprocessing, Thresholds, WeightsFile, WeightsSet, FORMAT_VERSION,
};

/// Where an untrained model's backbone (and PRIM) weights come from.
#[derive(Debug, Clone)]
pub enum BackboneSource {
    /// Random initialisation (seeded): for tests only.
    Random,
    /// Converted from an official checkpoint (`lite_medsam.pth`, SAM `.pth`) and stored in the
    /// directory as f16 safetensors (`encoder.safetensors`); PRIM and the prompt encoder come from
    /// it too, PIMM is random.
    Convert(PathBuf),
    /// Referenced by absolute path (a large user-supplied SAM `.pth`), not copied.
    Reference(PathBuf),
}

/// Create a CLEARLY LABELLED untrained model directory (`"untrained": true`): backbone weights as
/// `source` says, decoder (prompt encoder + PRIM + PIMM) in `decoder.safetensors`, random PIMM
/// from `seed`. Its masks mean nothing; it exists for tests, benchmarks and as a training start.
pub fn create_untrained_model_dir(
    arch: Arch,
    out: &Path,
    seed: u64,
    source: &BackboneSource,
) -> Result<ModelDir, ModelDirError> {
    let fail = |message: String| ModelDirError::Invalid { path: out.to_path_buf(), message };
    std::fs::create_dir_all(out).map_err(|source| ModelDirError::Io { path: out.to_path_buf(), source })?;
    let cfg = ModelConfig::for_arch(arch);
    tch::manual_seed(seed as i64);
    let model = match source {
        BackboneSource::Random => DeSam::new(&cfg, tch::Device::Cpu),
        BackboneSource::Convert(p) | BackboneSource::Reference(p) => {
            DeSam::load(&cfg, &[p.as_path()], tch::Device::Cpu).map_err(|e| fail(e.to_string()))?.0
        }
    };
    let sd = model.state_dict();
    let (enc, dec): (Vec<_>, Vec<_>) = sd.into_iter().partition(|(n, _)| n.starts_with("image_encoder."));
    let save = |name: &str, tensors: &[(String, tch::Tensor)], kind: tch::Kind| -> Result<WeightsFile, ModelDirError> {
        let path = out.join(name);
        checkpoint::save_safetensors(tensors, &path, kind).map_err(|e| fail(e.to_string()))?;
        let sha256 = sha256_file(&path).map_err(|source| ModelDirError::Io { path: path.clone(), source })?;
        Ok(WeightsFile { path: name.into(), sha256 })
    };
    let backbone = match source {
        BackboneSource::Reference(p) => {
            let abs = std::fs::canonicalize(p).map_err(|source| ModelDirError::Io { path: p.clone(), source })?;
            let sha256 = sha256_file(&abs).map_err(|source| ModelDirError::Io { path: abs.clone(), source })?;
            WeightsFile { path: abs.to_string_lossy().into_owned(), sha256 }
        }
        // Real backbones are stored as f16 (LiteMedSAM ≈ 12 MB); the tiny test model stays f32.
        _ => save("encoder.safetensors", &enc, if arch == Arch::Tiny { tch::Kind::Float } else { tch::Kind::Half })?,
    };
    let decoder = save("decoder.safetensors", &dec, tch::Kind::Float)?;
    let normalization = if arch == Arch::Lite {
        Normalization::MinMax
    } else {
        Normalization::MeanStd { mean: cfg.pixel_mean, std: cfg.pixel_std }
    };
    let origin = match source {
        BackboneSource::Random => "random".to_string(),
        BackboneSource::Convert(p) | BackboneSource::Reference(p) => p.display().to_string(),
    };
    let spec = ModelSpec {
        format: FORMAT_VERSION,
        name: format!("desam-{}-UNTRAINED", arch.name()),
        version: "0.0.0-untrained".into(),
        arch,
        backbone: WeightsSet { files: vec![backbone] },
        decoder: WeightsSet { files: vec![decoder] },
        preprocessing: Preprocessing { normalization, clip_percentiles: default_clip_percentiles() },
        default_mode: Mode::Box,
        grid_points: 9,
        thresholds: Thresholds::default(),
        cleanup_3d: Cleanup3d::None,
        training: serde_json::json!({
            "note": "UNTRAINED placeholder: decoder (PIMM) randomly initialised; masks are meaningless",
            "seed": seed,
            "backbone_from": origin,
        }),
        untrained: true,
    };
    write_spec(out, &spec)?;
    open(out)
}

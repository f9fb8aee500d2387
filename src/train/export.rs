//! Export of a training run into an immutable, versioned model directory (the engine's format,
//! with provenance), and a registry's promote/rollback. Never overwrites or deletes a model.

use std::path::{Path, PathBuf};

use super::fit::{self, FitConfig};
use super::precompute;
use super::{io_err, TrainError};
use crate::model::checkpoint;
use crate::modeldir::{self, ModelSpec, WeightsFile, WeightsSet};

pub struct ExportOptions {
    pub run: PathBuf,
    pub out: PathBuf,
    pub name: String,
    pub version: String,
    /// `best` (lowest validation loss) or `latest`.
    pub which: String,
    /// Extra provenance (e.g. evaluation metrics) merged into `training`.
    pub extra: serde_json::Value,
}

fn git_commit() -> Option<String> {
    let o = std::process::Command::new("git").args(["rev-parse", "HEAD"]).output().ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Writes `out` (which must not exist): encoder weights as the training store's model had them
/// (copied, or the same absolute reference), the trained decoder (prompt encoder + PRIM + PIMM +
/// SAM's unused heads) as f16 safetensors, and model.json with hashes and provenance.
pub fn export(o: &ExportOptions) -> Result<modeldir::ModelDir, TrainError> {
    if o.out.exists() {
        return Err(TrainError::Exists { path: o.out.clone() });
    }
    let cfg: FitConfig = serde_json::from_slice(&std::fs::read(o.run.join(fit::CONFIG_JSON)).map_err(io_err(&o.run))?)
        .map_err(|e| TrainError::Run { dir: o.run.clone(), message: format!("config.json: {e}") })?;
    if cfg.coupled {
        return Err(TrainError::Invalid(
            "a --baseline coupled run trains SAM's own mask head, which the engine does not use; it is for the comparison table only".into(),
        ));
    }
    let ckpt = match o.which.as_str() {
        "best" => o.run.join(fit::BEST),
        "latest" => o.run.join(fit::LATEST),
        w => return Err(TrainError::Invalid(format!("--checkpoint {w:?}: expected best or latest"))),
    };
    let (params, _, _, state) = fit::read_checkpoint(&ckpt)?;
    let index = precompute::read_index(&cfg.embeddings)?;
    let base = modeldir::open(&index.config.model_dir)?;
    let model = fit::load_base_model(&index, tch::Device::Cpu)?;
    let vars = model.decoder_variables();
    if vars.len() != params.len() || vars.iter().zip(&params).any(|(a, b)| a.0 != b.0) {
        return Err(TrainError::Run {
            dir: o.run.clone(),
            message: "checkpoint does not match the model's decoder".into(),
        });
    }
    tch::no_grad(|| {
        for ((_, v), (_, p)) in vars.iter().zip(&params) {
            v.shallow_clone().copy_(p);
        }
    });
    let tmp = o.out.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    // Backbone: copy files that live in the base model directory; keep absolute references.
    let mut backbone = Vec::new();
    for (f, abs) in base.spec.backbone.files.iter().zip(&base.backbone_paths) {
        if Path::new(&f.path).is_absolute() {
            backbone.push(f.clone());
        } else {
            let name = Path::new(&f.path)
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "encoder.safetensors".into());
            let dst = tmp.join(&name);
            std::fs::copy(abs, &dst).map_err(io_err(&dst))?;
            backbone.push(WeightsFile { path: name, sha256: f.sha256.clone() });
        }
    }
    let decoder: Vec<(String, tch::Tensor)> =
        model.state_dict().into_iter().filter(|(n, _)| !n.starts_with("image_encoder.")).collect();
    let dec_path = tmp.join("decoder.safetensors");
    checkpoint::save_safetensors(&decoder, &dec_path, tch::Kind::Half)?;
    let dec_sha = modeldir::sha256_file(&dec_path).map_err(io_err(&dec_path))?;
    let logs = fit::read_log(&o.run)?;
    let best = state.best_epoch.and_then(|e| logs.iter().find(|l| l.epoch == e).cloned());
    let summary: serde_json::Value = std::fs::read(o.run.join(fit::SUMMARY_JSON))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    let mut training = serde_json::json!({
        "run": o.run,
        "checkpoint": o.which,
        "config": cfg,
        "data_manifest_sha256": index.manifest_hash,
        "data_dir": index.config.data_dir,
        "store": {"slices": index.slices, "bytes_per_slice_f16": index.bytes_per_slice, "sites": index.config.sites},
        "epochs_done": state.epoch,
        "global_step": state.global_step,
        "best_epoch": state.best_epoch,
        "best_validation": best,
        "fit_summary": summary,
        "base_model": {"name": base.spec.name, "backbone_sha256": base.backbone_sha256()},
        "git_commit": git_commit(),
        "decoder_dtype": "f16",
    });
    if let (Some(t), Some(e)) = (training.as_object_mut(), o.extra.as_object()) {
        for (k, v) in e {
            t.insert(k.clone(), v.clone());
        }
    }
    let spec = ModelSpec {
        format: modeldir::FORMAT_VERSION,
        name: o.name.clone(),
        version: o.version.clone(),
        arch: base.spec.arch,
        backbone: WeightsSet { files: backbone },
        decoder: WeightsSet { files: vec![WeightsFile { path: "decoder.safetensors".into(), sha256: dec_sha }] },
        preprocessing: base.spec.preprocessing.clone(),
        default_mode: cfg.mode,
        grid_points: base.spec.grid_points,
        thresholds: base.spec.thresholds.clone(),
        cleanup_3d: base.spec.cleanup_3d,
        training,
        untrained: false,
    };
    modeldir::write_spec(&tmp, &spec)?;
    if o.out.exists() {
        return Err(TrainError::Exists { path: o.out.clone() });
    }
    std::fs::rename(&tmp, &o.out).map_err(io_err(&o.out))?;
    // Immutable: the files are made read-only.
    for e in std::fs::read_dir(&o.out).map_err(io_err(&o.out))?.flatten() {
        if let Ok(m) = e.metadata() {
            let mut p = m.permissions();
            p.set_readonly(true);
            let _ = std::fs::set_permissions(e.path(), p);
        }
    }
    Ok(modeldir::open(&o.out)?)
}

// ------------------------------------------------------------------------------------------------
// Registry: its format and functions live in `crate::registry` (floor 2) so that the Orthanc plugin,
// which must not import `train`, reads the same current.json; here they answer in `TrainError`.

pub use crate::registry::{registry_of, version_dir, Current, RegistryError, CURRENT_JSON, CURRENT_LINK, VERSIONS_DIR};

impl From<RegistryError> for TrainError {
    fn from(e: RegistryError) -> TrainError {
        match e {
            RegistryError::Io { path, source } => TrainError::Io { path, source },
            RegistryError::Json { path, message } => TrainError::Data { path, message },
            e @ (RegistryError::Promote { .. } | RegistryError::RollbackTarget { .. }) => {
                TrainError::Model(e.to_string())
            }
            e @ (RegistryError::NothingToRollBack(_) | RegistryError::NoCurrent(_)) => {
                TrainError::Invalid(e.to_string())
            }
        }
    }
}

/// Makes `version` current (it must be a valid model directory under REG/versions/).
pub fn promote(reg: &Path, version: &str) -> Result<Current, TrainError> {
    Ok(crate::registry::promote(reg, version)?)
}

/// Goes back to the previously current version.
pub fn rollback(reg: &Path) -> Result<Current, TrainError> {
    Ok(crate::registry::rollback(reg)?)
}

/// The model directory a registry's current.json points to.
pub fn current_dir(reg: &Path) -> Result<PathBuf, TrainError> {
    Ok(crate::registry::current_dir(reg)?)
}

/// current.json (empty when the registry has none yet).
pub fn read_current(reg: &Path) -> Result<Current, TrainError> {
    Ok(crate::registry::read_current(reg)?)
}

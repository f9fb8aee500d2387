//! The processing step behind the plugin: instance bytes in, DICOM-SEG bytes and a summary out; and the
//! model in service (hot reload from a registry). Owns the engine glue; knows nothing about Orthanc.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use super::config::{ModeChoice, PluginConfig};
use crate::dicom::{self, SegEncoding, SegOptions, Segment, SegmentInfo};
use crate::engine::{DeviceChoice, EngineError, EngineOptions, Mode, Progress, SegmentRequest, Segmenter, Stage};
use crate::modeldir::{self, ModelDir};
use crate::registry;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot read the series: {0}")]
    Read(#[source] dicom::DicomError),
    #[error("model: {0}")]
    Model(String),
    #[error("model directory: {0}")]
    ModelDir(#[source] modeldir::ModelDirError),
    #[error("model: {0}")]
    ModelLoad(#[source] EngineError),
    #[error("segmentation failed: {0}")]
    Engine(#[source] EngineError),
    #[error("segmentation failed (CPU retry after GPU out-of-memory): {0}")]
    CpuRetry(#[source] EngineError),
    #[error("cannot write the DICOM-SEG: {0}")]
    Write(#[source] dicom::SegError),
    #[error("cannot write the DICOM-SEG: the written SEG does not read back: {0}")]
    ReadBack(#[source] dicom::SegError),
    #[error("cancelled")]
    Cancelled,
}

/// Which model produced a result (model.json's name and version, the weights' SHA-256).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ModelIdentity {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

impl ModelIdentity {
    /// The version string written into the SEG (AlgorithmVersion, SoftwareVersions): the model
    /// version plus the start of the weights hash, so that retrained weights never look "the same".
    pub fn seg_version(&self) -> String {
        let short: String = self.sha256.chars().take(16).collect();
        let v = format!("{} sha256:{short}", self.version);
        v.chars().take(64).collect()
    }
}

#[derive(Debug, Clone)]
pub struct ProcessRequest {
    /// `ModeChoice(None)`: the plugin's configured mode, and if that is "auto" the model's default.
    pub mode: ModeChoice,
    pub series_description: String,
    pub quality_threshold: f64,
    /// When false and nothing is found, no SEG is produced.
    pub store_empty: bool,
}

#[derive(Debug, Clone, Default)]
pub struct ProcessSummary {
    pub quality: f64,
    pub flagged: bool,
    pub volume_ml: f64,
    pub empty: bool,
    pub device: String,
    pub seg_sop_instance_uid: Option<String>,
    pub seg_series_instance_uid: Option<String>,
    pub warnings: Vec<String>,
}

pub struct ProcessOutput {
    pub seg: Option<Vec<u8>>,
    pub summary: ProcessSummary,
    /// The model that produced this output (the one in service when `process` started).
    pub model: ModelIdentity,
}

/// One series in, one SEG out. `progress` receives 0..1; `cancel` is polled between stages/slices.
pub trait SeriesProcessor: Send + Sync {
    /// The identity of the model in service, without loading the weights (exactly-once checks).
    fn identity(&self) -> Result<ModelIdentity, ProcessError>;
    /// Whether the weights are in memory, and on which device.
    fn loaded_device(&self) -> Option<tch::Device>;
    /// Called at the start of each job: when the model source changed (a registry's current.json, a
    /// model directory's model.json; a cheap read of one small file), takes the new model into service
    /// for this and later jobs, or refuses it and keeps the one in service. None: nothing changed.
    fn refresh(&self) -> Option<ReloadReport> {
        None
    }
    /// `POST /desam/models/reload`: as `refresh`, also when the file looks unchanged (a refused version
    /// whose files were repaired since).
    fn reload(&self) -> Result<ReloadReport, ProcessError> {
        Err(ProcessError::Model("this node serves no model".into()))
    }
    /// `POST /desam/models/rollback`: the registry's previous version becomes current, then serves.
    fn rollback(&self) -> Result<ReloadReport, ProcessError> {
        Err(ProcessError::Model("this node serves no model".into()))
    }
    /// Where the model comes from (kind, paths, the registry's current version, the last reload).
    fn source_json(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Runs one series with the model in service when the call starts; that model stays in use until
    /// the call returns, whatever reloads happen meanwhile (`ProcessOutput::model` names it).
    fn process(
        &self,
        instances: &[Vec<u8>],
        request: &ProcessRequest,
        progress: &mut dyn FnMut(f32),
        cancel: &Arc<AtomicBool>,
    ) -> Result<ProcessOutput, ProcessError>;
}

/// What a reload did: `Outcome` is "reloaded" (the candidate now serves), "unchanged" (it already
/// served) or "refused" (`Reason` says why; the previous model keeps serving).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ReloadReport {
    pub outcome: ReloadOutcome,
    /// The model directory that was looked at.
    pub candidate: String,
    /// The model serving after the reload.
    pub serving: ModelIdentity,
    /// The model that served before, when it changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous: Option<ModelIdentity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReloadOutcome {
    Reloaded,
    Unchanged,
    Refused,
}

/// An ingest node's stand-in: it loads no model and processes nothing (the worker never calls it).
pub struct IngestOnly;

impl SeriesProcessor for IngestOnly {
    fn identity(&self) -> Result<ModelIdentity, ProcessError> {
        Err(ProcessError::Model("this is an ingest node (\"Role\": \"ingest\"): it loads no model".into()))
    }
    fn loaded_device(&self) -> Option<tch::Device> {
        None
    }
    fn process(
        &self,
        _: &[Vec<u8>],
        _: &ProcessRequest,
        _: &mut dyn FnMut(f32),
        _: &Arc<AtomicBool>,
    ) -> Result<ProcessOutput, ProcessError> {
        Err(ProcessError::Model("this is an ingest node: it segments nothing".into()))
    }
}

/// One model in service: its directory, identity and, once loaded, its segmenter. Jobs hold it by
/// `Arc`, so a reload never pulls a model from under a running job; it is freed when the last holder ends.
struct ServingModel {
    dir: PathBuf,
    identity: ModelIdentity,
    /// Its model.json as read (a thresholds edit is a change too, even with the same weights).
    spec: modeldir::ModelSpec,
    /// tch tensors are Send but not Sync, so the model sits behind a mutex (one series at a time anyway).
    segmenter: Mutex<Option<Segmenter>>,
}

impl ServingModel {
    fn unloaded(dir: PathBuf) -> Result<ServingModel, ProcessError> {
        let spec = modeldir::read_spec(&dir).map_err(ProcessError::ModelDir)?;
        let md = ModelDir { dir: dir.clone(), spec, backbone_paths: Vec::new(), decoder_paths: Vec::new() };
        Ok(ServingModel { identity: identity_of(&md), spec: md.spec, dir, segmenter: Mutex::new(None) })
    }
}

fn identity_of(md: &ModelDir) -> ModelIdentity {
    ModelIdentity { name: md.spec.name.clone(), version: md.spec.version.clone(), sha256: md.model_sha256() }
}

/// Where the plugin's `ModelDirectory` points: one model directory (its model.json is watched), or a
/// model registry (its current.json is watched and names the version that serves).
#[derive(Debug, Clone)]
enum ModelSource {
    Directory(PathBuf),
    Registry(PathBuf),
}

impl ModelSource {
    fn of(path: &Path) -> ModelSource {
        match registry::registry_of(path) {
            Some(reg) => ModelSource::Registry(reg),
            None => ModelSource::Directory(path.to_path_buf()),
        }
    }

    /// The file whose change means "another model": current.json or model.json.
    fn watched_file(&self) -> PathBuf {
        match self {
            ModelSource::Directory(d) => d.join(modeldir::MODEL_JSON),
            ModelSource::Registry(r) => r.join(registry::CURRENT_JSON),
        }
    }

    /// The model directory that should serve now.
    fn wanted_dir(&self) -> Result<PathBuf, ProcessError> {
        match self {
            ModelSource::Directory(d) => Ok(d.clone()),
            ModelSource::Registry(r) => registry::current_dir(r).map_err(|e| ProcessError::Model(e.to_string())),
        }
    }
}

/// The real processor: DICOM reader → DeSAM engine → DICOM-SEG writer. The first model loads on the
/// first series (in the worker, never in plugin initialisation); a changed model source is loaded
/// and checked in full before it replaces the model in service (`refresh`, `reload`).
pub struct EngineProcessor {
    source: ModelSource,
    options: EngineOptions,
    /// None: the model's own default mode.
    default_mode: Option<Mode>,
    serving: Mutex<Arc<ServingModel>>,
    /// The watched file's contents when last acted upon (taken into service or refused), so that a
    /// refused version is logged once, not at every job.
    seen: Mutex<Option<Vec<u8>>>,
    /// One reload at a time (the worker's check at a job start and the REST routes).
    reloading: Mutex<()>,
    last_reload: Mutex<Option<ReloadReport>>,
    /// Device of the loaded model, readable by the status route while a series is running.
    loaded_device: Mutex<Option<tch::Device>>,
}
/// The warning for a source matrix whose Columns (hence Rows × Columns) is not a multiple of 8: the
/// writer then stores a FRACTIONAL SEG, which viewers that read only BINARY SEGs cannot show.
pub fn fractional_seg_warning(rows: usize, columns: usize) -> Option<String> {
    (SegEncoding::for_columns(columns) == SegEncoding::Fractional).then(|| {
        format!(
            "the source matrix is {rows} × {columns} (Columns not a multiple of 8): the SEG is stored as FRACTIONAL \
             (8-bit, 0/255) instead of BINARY; OHIF v3, Slicer, highdicom and Orthanc show it, viewers that read \
             only BINARY SEGs do not (docs/viewers.md, \"Matrices that are not multiples of 8\")"
        )
    })
}

impl EngineProcessor {
    /// Resolves the model source and reads the serving model's model.json (cheap: no weights are read).
    pub fn new(config: &PluginConfig) -> Result<EngineProcessor, ProcessError> {
        let source = ModelSource::of(Path::new(&config.model_directory));
        let seen = std::fs::read(source.watched_file()).ok();
        let serving = ServingModel::unloaded(source.wanted_dir()?)?;
        let options = EngineOptions {
            device: config.device,
            threads: (config.threads > 0).then_some(config.threads),
            ..Default::default()
        };
        Ok(EngineProcessor {
            source,
            options,
            default_mode: config.mode.0,
            serving: Mutex::new(Arc::new(serving)),
            seen: Mutex::new(seen),
            reloading: Mutex::new(()),
            last_reload: Mutex::new(None),
            loaded_device: Mutex::new(None),
        })
    }

    /// The model directory in service.
    pub fn model_dir(&self) -> PathBuf {
        self.serving().dir.clone()
    }

    fn serving(&self) -> Arc<ServingModel> {
        self.serving.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn load(&self, dir: &Path) -> Result<Segmenter, ProcessError> {
        let s = Segmenter::from_model_dir(dir, self.options.clone()).map_err(ProcessError::ModelLoad)?;
        *self.loaded_device.lock().unwrap() = Some(s.device());
        Ok(s)
    }

    /// Loads the wanted model in full (hashes, safetensors, architecture) and puts it in service;
    /// any failure leaves the model in service as it was. `force`: also when the watched file did not
    /// change since it was last acted upon.
    fn switch(&self, force: bool) -> Option<ReloadReport> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let contents = std::fs::read(self.source.watched_file()).ok();
        {
            let mut seen = self.seen.lock().unwrap();
            if !force && *seen == contents {
                return None;
            }
            *seen = contents;
        }
        let before = self.serving();
        let report = |outcome, candidate: &Path, serving: ModelIdentity, previous, reason| ReloadReport {
            outcome,
            candidate: candidate.display().to_string(),
            serving,
            previous,
            reason,
            at: crate::clock::utc_now(),
        };
        let candidate = match self.source.wanted_dir() {
            Ok(dir) => dir,
            Err(e) => {
                let path = self.source.watched_file();
                let r = report(ReloadOutcome::Refused, &path, before.identity.clone(), None, Some(e.to_string()));
                return Some(self.remember(r));
            }
        };
        let unchanged =
            candidate == before.dir && modeldir::read_spec(&candidate).ok().is_some_and(|spec| spec == before.spec);
        if unchanged {
            let r = report(ReloadOutcome::Unchanged, &candidate, before.identity.clone(), None, None);
            return Some(self.remember(r));
        }
        let r = match self.load(&candidate) {
            Ok(segmenter) => {
                let id = segmenter.model_id();
                let identity = ModelIdentity { name: id.name, version: id.version, sha256: id.sha256 };
                let spec = segmenter.model_dir().spec.clone();
                let next =
                    ServingModel { dir: candidate.clone(), identity, spec, segmenter: Mutex::new(Some(segmenter)) };
                let next = Arc::new(next);
                *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = next.clone();
                report(ReloadOutcome::Reloaded, &candidate, next.identity.clone(), Some(before.identity.clone()), None)
            }
            Err(e) => report(ReloadOutcome::Refused, &candidate, before.identity.clone(), None, Some(e.to_string())),
        };
        Some(self.remember(r))
    }

    fn remember(&self, r: ReloadReport) -> ReloadReport {
        *self.last_reload.lock().unwrap() = Some(r.clone());
        r
    }
}

impl SeriesProcessor for EngineProcessor {
    fn identity(&self) -> Result<ModelIdentity, ProcessError> {
        Ok(self.serving().identity.clone())
    }

    fn loaded_device(&self) -> Option<tch::Device> {
        *self.loaded_device.lock().unwrap()
    }

    fn refresh(&self) -> Option<ReloadReport> {
        self.switch(false)
    }

    fn reload(&self) -> Result<ReloadReport, ProcessError> {
        Ok(self.switch(true).expect("a forced reload always reports"))
    }

    fn rollback(&self) -> Result<ReloadReport, ProcessError> {
        let ModelSource::Registry(reg) = &self.source else {
            return Err(ProcessError::Model(format!(
                "ModelDirectory {} is a model directory, not a registry (a folder with current.json): nothing to roll back",
                self.serving().dir.display()
            )));
        };
        registry::rollback(reg).map_err(|e| ProcessError::Model(e.to_string()))?;
        self.reload()
    }

    fn source_json(&self) -> serde_json::Value {
        let serving = self.serving();
        let last = self.last_reload.lock().unwrap().clone();
        match &self.source {
            ModelSource::Directory(d) => serde_json::json!({
                "Kind": "directory",
                "Path": d,
                "ServingDirectory": serving.dir,
                "LastReload": last,
            }),
            ModelSource::Registry(r) => {
                let current = registry::read_current(r);
                serde_json::json!({
                    "Kind": "registry",
                    "Path": r,
                    "ServingDirectory": serving.dir,
                    "ServingVersion": serving.identity.version,
                    "Current": current.as_ref().ok().and_then(|c| c.version.clone()),
                    "History": current.as_ref().map(|c| c.history.clone()).unwrap_or_default(),
                    "Error": current.as_ref().err().map(|e| e.to_string()),
                    "LastReload": last,
                })
            }
        }
    }

    fn process(
        &self,
        instances: &[Vec<u8>],
        request: &ProcessRequest,
        progress: &mut dyn FnMut(f32),
        cancel: &Arc<AtomicBool>,
    ) -> Result<ProcessOutput, ProcessError> {
        let loaded = dicom::load_series_bytes(instances).map_err(ProcessError::Read)?;
        let volume = loaded.volume;
        progress(0.05);
        // This job's model: a reload meanwhile swaps the one in service, not this one.
        let model = self.serving();
        let mut slot = model.segmenter.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let loaded = self.load(&model.dir)?;
            if loaded.model_id().sha256 != model.identity.sha256 {
                // model.json was edited in place since this model was read: the SEG would name the
                // wrong weights. The next job's check takes the edited model into service.
                return Err(ProcessError::Model(format!(
                    "{} changed while it was being loaded; it is reloaded at the next job",
                    model.dir.display()
                )));
            }
            *slot = Some(loaded);
        }
        let segmenter = slot.as_ref().expect("loaded above");
        let mode = request.mode.0.or(self.default_mode);
        let seg_request = SegmentRequest { mode, cancel: Some(cancel.clone()), ..Default::default() };
        let mut report = |p: Progress| {
            let base = match p.stage {
                Stage::Load | Stage::Preprocess => 0.05,
                Stage::Encode => 0.1,
                Stage::Decode => 0.6,
                Stage::Postprocess | Stage::Write => 0.9,
            };
            let span = match p.stage {
                Stage::Encode => 0.5,
                Stage::Decode => 0.3,
                _ => 0.05,
            };
            let frac = if p.total > 0 { p.done as f32 / p.total as f32 } else { 0.0 };
            progress(base + span * frac.clamp(0.0, 1.0));
        };
        let mut warnings = loaded.warnings;
        warnings.extend(fractional_seg_warning(volume.dims[1], volume.dims[2]));
        let result = match segmenter.segment(&volume, &seg_request, &mut report) {
            Ok(r) => r,
            Err(EngineError::Cancelled) => return Err(ProcessError::Cancelled),
            Err(e @ EngineError::OutOfMemory(_)) if segmenter.device().is_cuda() => {
                // A GPU that is full (another process, a huge series) should not lose the series.
                warnings.push(format!("GPU out of memory ({e}); retrying this series on the CPU"));
                let cpu = Segmenter::from_model_dir(
                    &model.dir,
                    EngineOptions { device: DeviceChoice::Cpu, ..self.options.clone() },
                )
                .map_err(ProcessError::ModelLoad)?;
                match cpu.segment(&volume, &seg_request, &mut report) {
                    Ok(r) => r,
                    Err(EngineError::Cancelled) => return Err(ProcessError::Cancelled),
                    Err(e) => return Err(ProcessError::CpuRetry(e)),
                }
            }
            Err(e) => return Err(ProcessError::Engine(e)),
        };
        let empty = result.voxels == 0;
        let mut summary = ProcessSummary {
            quality: result.quality,
            flagged: result.flagged || result.quality < request.quality_threshold || empty,
            volume_ml: result.volume_ml,
            empty,
            device: result.device.clone(),
            seg_sop_instance_uid: None,
            seg_series_instance_uid: None,
            warnings,
        };
        if result.model.untrained {
            summary.warnings.push(format!("model {} is UNTRAINED: its masks mean nothing", result.model.name));
        }
        if empty && !request.store_empty {
            progress(1.0);
            return Ok(ProcessOutput { seg: None, summary, model: model.identity.clone() });
        }
        let identity = &model.identity;
        let mut opts = SegOptions::new(&identity.name, &identity.seg_version());
        opts.series_description =
            Some(format!("{} {}", request.series_description, identity.version).trim().to_string());
        opts.quality_score = Some(result.quality);
        opts.gland_volume_ml = Some(result.volume_ml);
        let segment = Segment { info: SegmentInfo::prostate(&identity.name), mask: &result.mask };
        let bytes = dicom::write_seg(&volume, &[segment], &opts).map_err(ProcessError::Write)?;
        let written = dicom::read_seg_standalone(&bytes).map_err(ProcessError::ReadBack)?;
        summary.seg_sop_instance_uid = Some(written.sop_instance_uid);
        summary.seg_series_instance_uid = written.series_instance_uid;
        progress(1.0);
        Ok(ProcessOutput { seg: Some(bytes), summary, model: identity.clone() })
    }
}

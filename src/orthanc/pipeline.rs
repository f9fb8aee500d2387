//! The processing step behind the plugin: instance bytes in, DICOM-SEG bytes and a summary out.
//! Owns the glue to the reader, the engine and the SEG writer; knows nothing about Orthanc.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use super::config::{ModeChoice, PluginConfig};
use crate::dicom::{self, SegEncoding, SegOptions, Segment, SegmentInfo};
use crate::engine::{DeviceChoice, EngineError, EngineOptions, Mode, Progress, SegmentRequest, Segmenter, Stage};
use crate::modeldir::{self, ModelDir};

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
}

/// One series in, one SEG out. `progress` receives 0..1; `cancel` is polled between stages/slices.
pub trait SeriesProcessor: Send + Sync {
    /// The model's identity without loading the weights (used for exactly-once checks).
    fn identity(&self) -> Result<ModelIdentity, ProcessError>;
    /// Whether the weights are in memory, and on which device.
    fn loaded_device(&self) -> Option<tch::Device>;
    fn process(
        &self,
        instances: &[Vec<u8>],
        request: &ProcessRequest,
        progress: &mut dyn FnMut(f32),
        cancel: &Arc<AtomicBool>,
    ) -> Result<ProcessOutput, ProcessError>;
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

/// The real processor: DICOM reader → DeSAM engine → DICOM-SEG writer. The model loads on the first
/// series (in the worker, never in plugin initialisation) and stays loaded.
pub struct EngineProcessor {
    dir: PathBuf,
    identity: ModelIdentity,
    options: EngineOptions,
    /// None: the model's own default mode.
    default_mode: Option<Mode>,
    /// The loaded model (tch tensors are Send but not Sync, so the model sits behind a mutex; the
    /// worker processes one series at a time anyway).
    segmenter: Mutex<Option<Segmenter>>,
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
    /// Checks the model directory's model.json (cheap: no weights are read) and the options.
    pub fn new(config: &PluginConfig) -> Result<EngineProcessor, ProcessError> {
        let dir = PathBuf::from(&config.model_directory);
        let spec = modeldir::read_spec(&dir).map_err(ProcessError::ModelDir)?;
        let md = ModelDir { dir: dir.clone(), spec, backbone_paths: Vec::new(), decoder_paths: Vec::new() };
        let identity =
            ModelIdentity { name: md.spec.name.clone(), version: md.spec.version.clone(), sha256: md.model_sha256() };
        let default_mode = config.mode.0;
        let options = EngineOptions {
            device: config.device,
            threads: (config.threads > 0).then_some(config.threads),
            ..Default::default()
        };
        Ok(EngineProcessor {
            dir,
            identity,
            options,
            default_mode,
            segmenter: Mutex::new(None),
            loaded_device: Mutex::new(None),
        })
    }

    pub fn model_dir(&self) -> &Path {
        &self.dir
    }

    fn load(&self) -> Result<Segmenter, ProcessError> {
        let s = Segmenter::from_model_dir(&self.dir, self.options.clone()).map_err(ProcessError::ModelLoad)?;
        let id = s.model_id();
        if id.sha256 != self.identity.sha256 {
            return Err(ProcessError::Model(format!(
                "model.json changed since start-up (weights {} now, {} then); restart Orthanc to use the new model",
                id.sha256, self.identity.sha256
            )));
        }
        *self.loaded_device.lock().unwrap() = Some(s.device());
        Ok(s)
    }
}

impl SeriesProcessor for EngineProcessor {
    fn identity(&self) -> Result<ModelIdentity, ProcessError> {
        Ok(self.identity.clone())
    }

    fn loaded_device(&self) -> Option<tch::Device> {
        *self.loaded_device.lock().unwrap()
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
        let mut slot = self.segmenter.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(self.load()?);
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
                    &self.dir,
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
            return Ok(ProcessOutput { seg: None, summary });
        }
        let mut opts = SegOptions::new(&self.identity.name, &self.identity.seg_version());
        opts.series_description =
            Some(format!("{} {}", request.series_description, self.identity.version).trim().to_string());
        opts.quality_score = Some(result.quality);
        opts.gland_volume_ml = Some(result.volume_ml);
        let segment = Segment { info: SegmentInfo::prostate(&self.identity.name), mask: &result.mask };
        let bytes = dicom::write_seg(&volume, &[segment], &opts).map_err(ProcessError::Write)?;
        let written = dicom::read_seg_standalone(&bytes).map_err(ProcessError::ReadBack)?;
        summary.seg_sop_instance_uid = Some(written.sop_instance_uid);
        summary.seg_series_instance_uid = written.series_instance_uid;
        progress(1.0);
        Ok(ProcessOutput { seg: Some(bytes), summary })
    }
}

//! `Segmenter`: a loaded model directory plus the pipeline volume → encoder features → automatic
//! prompts → native-grid mask → QA. Reads no images and writes nothing but the optional feature cache.

use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use super::cache::{self, FeatureCache};
use super::postprocess::{self, Cleanup3d};
use super::preprocess::{self, Normalization};
use super::prompts::{self, AmgSettings, BinMask};
use super::quality::{self, QualityTerms};
use crate::model::{Arch, DeSam, Features, ModelConfig, PromptBatch};
pub use crate::modeldir::Mode;
use crate::modeldir::{self, ModelDir, ModelDirError};
use crate::volume::{Mask, Volume};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model: {0}")]
    ModelDir(#[from] ModelDirError),
    #[error("model {dir}: {message}")]
    ModelLoad { dir: PathBuf, message: String },
    #[error("device {0} is not available")]
    DeviceUnavailable(String),
    #[error("input volume: {0}")]
    BadVolume(String),
    #[error("feature cache {dir}: {message}")]
    Cache { dir: PathBuf, message: String },
    #[error("cancelled")]
    Cancelled,
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("out of memory: {0}")]
    OutOfMemory(String),
}

impl EngineError {
    /// A panic caught at the engine's boundary (libtorch errors reach Rust as tch panics).
    fn from_panic(message: String) -> EngineError {
        if crate::guard::is_out_of_memory(&message) {
            EngineError::OutOfMemory(message)
        } else {
            EngineError::Inference(message)
        }
    }
}

/// Test hook (docs/limits.md): `DESAM_FAULT_INJECTION=decode` makes every decode raise a real
/// libtorch error, so that tests can prove a failing model never takes a worker down.
fn injected_fault(stage: &str) {
    if std::env::var("DESAM_FAULT_INJECTION").is_ok_and(|v| v.split(',').any(|s| s.trim() == stage)) {
        let _ = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)).view([7]);
    }
}

/// Where the engine runs, as asked for on a command line or in a configuration: parsed once (here),
/// resolved to a libtorch device once ([`DeviceChoice::resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA device 0 when there is one, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// CUDA device N (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("unknown device {s:?} (auto, cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl DeviceChoice {
    /// The libtorch device: the one place a choice becomes a device (engine, training, `desam forward`).
    pub fn resolve(self) -> Result<Device, EngineError> {
        if self == DeviceChoice::Cpu {
            return Ok(Device::Cpu);
        }
        // Before libtorch is first asked about CUDA: it caches the answer.
        let part = crate::runtime::cuda_part();
        let count = tch::Cuda::device_count();
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto if count > 0 => Ok(Device::Cuda(0)),
            DeviceChoice::Auto => {
                // A CPU-only install is the normal case; an installed CUDA part without a GPU is worth a line.
                if !matches!(part, crate::runtime::CudaPart::Absent(_)) {
                    log::warn!("device auto: running on the CPU: {}", crate::runtime::why_no_cuda_device());
                }
                Ok(Device::Cpu)
            }
            DeviceChoice::Cuda(n) if (n as i64) < count => Ok(Device::Cuda(n)),
            // The count says which indices exist ("cuda:1 … 1 CUDA device(s)").
            DeviceChoice::Cuda(n) => Err(EngineError::DeviceUnavailable(match part {
                crate::runtime::CudaPart::Absent(why) => format!("cuda:{n} (libtorch's CUDA part: {why})"),
                _ if count == 0 => {
                    format!("cuda:{n} (this machine has 0 CUDA device(s): {})", crate::runtime::why_no_cuda_device())
                }
                _ => format!("cuda:{n} (this machine has {count} CUDA device(s))"),
            })),
        }
    }
}

/// A compute dtype by its short name; `kind()` is what libtorch uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    #[value(alias = "float", alias = "float32")]
    F32,
    #[value(alias = "half", alias = "float16")]
    F16,
    #[value(alias = "bfloat16")]
    Bf16,
}

impl Dtype {
    pub fn kind(self) -> Kind {
        match self {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::Bf16 => Kind::BFloat16,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// How the engine runs. Defaults: best device; f16 on CUDA; on CPU bf16 where the CPU has native
/// bf16 dot products (see [`default_dtype`]), else f32; batch sized per device.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    pub device: DeviceChoice,
    /// CPU threads for libtorch (None: libtorch's default).
    pub threads: Option<usize>,
    /// Compute dtype (None: [`default_dtype`]).
    pub dtype: Option<Kind>,
    /// Slices per encoder batch and prompts per decoder batch (None: 2 slices and 9 prompts on CPU, 16
    /// slices and 81 prompts on CUDA).
    pub batch_size: Option<usize>,
    /// Directory of the on-disk feature cache (None: no cache).
    pub cache_dir: Option<PathBuf>,
}

/// How the decoder is driven (the official way exists only to measure the shared-context speed-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecoderStrategy {
    /// PIMM context once per slice, prompts batched, box mode = one decoder run.
    #[default]
    Shared,
    /// As the official automatic mask generator: 81 prompts per slice in batches of 9, features
    /// repeated and PIMM run in full for each (box mode = the whole box 81 times).
    Official,
}

/// One segmentation job.
#[derive(Debug, Clone, Default)]
pub struct SegmentRequest {
    /// None: the model's default mode.
    pub mode: Option<Mode>,
    /// Also run the other mode and use the agreement in the quality score.
    pub compare_modes: bool,
    /// None: the model's setting.
    pub cleanup_3d: Option<Cleanup3d>,
    pub strategy: DecoderStrategy,
    /// Set to true from another thread to stop between batches (→ `EngineError::Cancelled`).
    pub cancel: Option<Arc<AtomicBool>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Load,
    Preprocess,
    Encode,
    Decode,
    Postprocess,
    Write,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Load => "load",
            Stage::Preprocess => "preprocess",
            Stage::Encode => "encode",
            Stage::Decode => "decode",
            Stage::Postprocess => "postprocess",
            Stage::Write => "write",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub stage: Stage,
    pub done: usize,
    pub total: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StageTimings {
    pub preprocess_s: f64,
    pub encode_s: f64,
    pub decode_s: f64,
    pub postprocess_s: f64,
    pub total_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelId {
    pub name: String,
    pub version: String,
    pub arch: String,
    /// Hash of the model's weights files (see `ModelDir::model_sha256`).
    pub sha256: String,
    pub untrained: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SliceDetail {
    pub z: usize,
    /// Predicted IoU of the chosen prompt (NaN when no prompt passed the filter).
    pub iou: f32,
    /// SAM's stability score of the chosen mask: IoU of logits > +1 and logits > −1 at the model's
    /// output size (NaN when no prompt passed or the mask is empty).
    pub stability: f32,
    /// Foreground pixels on the native grid.
    pub area_px: usize,
    /// Grid mode: prompts that passed the IoU filter and survivors of the first NMS.
    pub prompts_passed: usize,
    pub after_nms: usize,
    pub chosen_prompt: Option<usize>,
    pub cache_hit: bool,
}

/// Everything the engine says about one series; the report is this minus the mask.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentationResult {
    #[serde(skip)]
    pub mask: Mask,
    pub mode: Mode,
    pub slice_iou: Vec<f32>,
    /// Series quality score in [0, 1] (docs/engine.md).
    pub quality: f64,
    pub quality_terms: Option<QualityTerms>,
    pub flagged: bool,
    pub qa_threshold: f64,
    pub volume_ml: f64,
    pub voxels: usize,
    pub timings: StageTimings,
    pub device: String,
    pub dtype: String,
    pub model: ModelId,
    pub slices: Vec<SliceDetail>,
    pub cache_hits: usize,
    pub encoder_runs: usize,
    pub decoder_runs: usize,
    pub cleanup_3d: Cleanup3d,
    pub voxels_removed_3d: usize,
}

/// A loaded model ready to segment volumes.
pub struct Segmenter {
    model: DeSam,
    dir: ModelDir,
    cfg: ModelConfig,
    norm: Normalization,
    clip: [f64; 2],
    device: Device,
    kind: Kind,
    encode_batch: usize,
    prompt_batch: usize,
    cache: Option<FeatureCache>,
}

impl std::fmt::Debug for Segmenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segmenter").field("model", &self.dir.spec.name).field("device", &self.device).finish()
    }
}

/// The compute dtype used when none is asked for: f16 on CUDA; on CPU bf16 when the CPU has native
/// bf16 dot products (AVX512-BF16/AMX: about 2× faster than f32; box-mode masks agree with f32 at
/// Dice ≥ 0.99, measured in docs/engine.md), else f32 (emulated bf16 would be slower).
pub fn default_dtype(device: Device) -> Kind {
    if device.is_cuda() {
        Kind::Half
    } else if crate::runtime::cpu_has_native_bf16() {
        Kind::BFloat16
    } else {
        Kind::Float
    }
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => format!("cpu ({} threads)", tch::get_num_threads()),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}

impl Segmenter {
    /// Open, verify and load a model directory. A libtorch error while loading is an error, never a panic.
    pub fn from_model_dir(dir: &Path, opts: EngineOptions) -> Result<Segmenter, EngineError> {
        crate::guard::catch(|| Self::load_unguarded(dir, opts))
            .unwrap_or_else(|m| Err(EngineError::ModelLoad { dir: dir.to_path_buf(), message: m }))
    }

    fn load_unguarded(dir: &Path, opts: EngineOptions) -> Result<Segmenter, EngineError> {
        let md = modeldir::open(dir)?;
        let load_err = |message: String| EngineError::ModelLoad { dir: dir.to_path_buf(), message };
        let arch: Arch = md.spec.arch;
        let cfg = ModelConfig::for_arch(arch);
        let device = opts.device.resolve()?;
        if let Some(n) = opts.threads {
            tch::set_num_threads(n.max(1) as i32);
        }
        let kind = opts.dtype.unwrap_or_else(|| default_dtype(device));
        let files: Vec<&Path> = md.backbone_paths.iter().chain(&md.decoder_paths).map(|p| p.as_path()).collect();
        let (mut model, report) = DeSam::load(&cfg, &files, device).map_err(|e| load_err(e.to_string()))?;
        if !report.fresh.is_empty() {
            return Err(load_err(format!(
                "the weights lack {} decoder tensors (first: {}); a model directory must hold a complete decoder",
                report.fresh.len(),
                report.fresh[0]
            )));
        }
        if kind != Kind::Float {
            model.var_store_mut().set_kind(kind);
        }
        if device == Device::Cpu {
            model.use_channels_last();
        }
        let cache = match &opts.cache_dir {
            Some(root) => Some(
                FeatureCache::new(root, &md.backbone_sha256())
                    .map_err(|e| EngineError::Cache { dir: root.clone(), message: e.to_string() })?,
            ),
            None => None,
        };
        // CPU: 2 slices per batch was fastest and needs less memory than 4 (docs/engine.md).
        let encode_batch = opts.batch_size.unwrap_or(if device.is_cuda() { 16 } else { 2 }).max(1);
        // Grid prompts per decoder batch: all 81 on CUDA; 9 on CPU, where 81 prompts' 256² PIMM
        // activations (≈0.7 GB per layer in bf16) made decoding memory-bound (benches/engine.sh:
        // 16.1 s per slice vs 12.5 s for the official batches of 9 with PIMM run in full).
        let prompt_batch = opts.batch_size.map(|b| b.max(1)).unwrap_or(if device.is_cuda() { 81 } else { 9 });
        let norm = md.spec.preprocessing.normalization.clone();
        let clip = md.spec.preprocessing.clip_percentiles;
        // One line per load: batch runs are checked to load their model once by counting it.
        log::info!("loaded model {} ({} {}) on {}", dir.display(), md.spec.name, md.spec.version, device_name(device));
        Ok(Segmenter { model, dir: md, cfg, norm, clip, device, kind, encode_batch, prompt_batch, cache })
    }

    /// The model's per-volume intensity clip (percentiles); training must preprocess the same way.
    pub fn clip_percentiles(&self) -> [f64; 2] {
        self.clip
    }
    pub fn model_dir(&self) -> &ModelDir {
        &self.dir
    }
    pub fn model(&self) -> &DeSam {
        &self.model
    }
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn default_mode(&self) -> Mode {
        self.dir.spec.default_mode
    }
    pub fn model_id(&self) -> ModelId {
        let s = &self.dir.spec;
        ModelId {
            name: s.name.clone(),
            version: s.version.clone(),
            arch: s.arch.name().into(),
            sha256: self.dir.model_sha256(),
            untrained: s.untrained,
        }
    }

    /// Segment one volume. Every libtorch error (including running out of memory) comes back as an
    /// `EngineError`; nothing panics out of here.
    pub fn segment(
        &self,
        volume: &Volume,
        req: &SegmentRequest,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<SegmentationResult, EngineError> {
        crate::guard::catch(|| self.segment_unguarded(volume, req, progress))
            .unwrap_or_else(|m| Err(EngineError::from_panic(m)))
    }

    fn segment_unguarded(
        &self,
        volume: &Volume,
        req: &SegmentRequest,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<SegmentationResult, EngineError> {
        check_volume(volume)?;
        let t_all = Instant::now();
        let mode = req.mode.unwrap_or_else(|| self.default_mode());
        let cancelled = || req.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed));
        let mut timings = StageTimings::default();
        tch::no_grad(|| {
            // 1. Intensity (per volume) and encoder input (per slice, in batches).
            let t = Instant::now();
            let u8vol = preprocess::normalize_intensity(&volume.voxels, self.clip);
            progress(Progress { stage: Stage::Preprocess, done: 1, total: 1 });
            timings.preprocess_s += t.elapsed().as_secs_f64();
            // 2–4. Per encoder batch: features (encoder or cache), then prompts and native mapping, so
            // that only one batch of features is alive (unless a second mode needs them all).
            let nz = volume.nz();
            let mut mask = Mask::zeros(volume.dims);
            let mut details = Vec::with_capacity(nz);
            let mut hits = Vec::with_capacity(nz);
            let (mut enc_runs, mut dec_runs) = (0, 0);
            let mut kept: Vec<Features> = Vec::new();
            let mut z = 0;
            while z < nz {
                let z1 = (z + self.encode_batch).min(nz);
                let (feats, h, r) = self.encode_all(&u8vol, volume.dims, z, z1, &mut timings, progress, &cancelled)?;
                enc_runs += r;
                hits.extend(h);
                dec_runs += self.decode_all(
                    volume,
                    &feats,
                    z,
                    mode,
                    req.strategy,
                    &mut mask,
                    &mut details,
                    &mut timings,
                    progress,
                    &cancelled,
                )?;
                if req.compare_modes {
                    kept.extend(feats);
                }
                z = z1;
            }
            let other = if req.compare_modes {
                let other_mode = if mode == Mode::Box { Mode::Grid } else { Mode::Box };
                let mut m2 = Mask::zeros(volume.dims);
                let mut d2 = Vec::with_capacity(nz);
                self.decode_all(
                    volume,
                    &kept,
                    0,
                    other_mode,
                    req.strategy,
                    &mut m2,
                    &mut d2,
                    &mut timings,
                    &mut |_| {},
                    &cancelled,
                )?;
                Some(m2)
            } else {
                None
            };
            let t = Instant::now();
            let cleanup = req.cleanup_3d.unwrap_or(self.dir.spec.cleanup_3d);
            let removed = postprocess::cleanup_3d(volume.dims, &mut mask.data, volume.voxel_ml(), cleanup);
            for (z, d) in details.iter_mut().enumerate() {
                d.area_px = mask.slice(z).iter().filter(|&&v| v != 0).count();
                d.cache_hit = hits[z];
            }
            // 5. QA.
            let slice_iou: Vec<f32> = details.iter().map(|d| d.iou).collect();
            let slice_stability: Vec<f32> = details.iter().map(|d| d.stability).collect();
            let (quality, terms) = quality::quality(&quality::QualityInput {
                mask: &mask.data,
                slice_len: volume.slice_len(),
                slice_iou: &slice_iou,
                slice_stability: &slice_stability,
                iou_informative: mode == Mode::Grid,
                volume_ml: mask.count() as f64 * volume.voxel_ml(),
                plausible_ml: self.dir.spec.thresholds.plausible_volume_ml,
                other_mode: other.as_ref().map(|m| m.data.as_slice()),
            });
            timings.postprocess_s += t.elapsed().as_secs_f64();
            progress(Progress { stage: Stage::Postprocess, done: 1, total: 1 });
            timings.total_s = t_all.elapsed().as_secs_f64();
            let voxels = mask.count();
            let qa = self.dir.spec.thresholds.qa;
            Ok(SegmentationResult {
                mode,
                slice_iou,
                quality,
                quality_terms: terms,
                flagged: quality < qa,
                qa_threshold: qa,
                volume_ml: voxels as f64 * volume.voxel_ml(),
                voxels,
                timings,
                device: device_name(self.device),
                dtype: format!("{:?}", self.kind).to_lowercase(),
                model: self.model_id(),
                slices: details,
                cache_hits: hits.iter().filter(|&&h| h).count(),
                encoder_runs: enc_runs,
                decoder_runs: dec_runs,
                cleanup_3d: cleanup,
                voxels_removed_3d: removed,
                mask: std::mem::replace(&mut mask, Mask::zeros([0, 0, 0])),
            })
        })
    }

    /// Encoder features for slices z0..z1 of a u8 volume, straight from the encoder (no cache):
    /// a batch-B `Features` on the device. Public for training and parity tests.
    pub fn encode_slices(&self, u8vol: &[u8], dims: [usize; 3], z0: usize, z1: usize) -> Features {
        let x = preprocess::encoder_input(u8vol, dims, z0, z1, self.cfg.image_size, &self.norm);
        tch::no_grad(|| self.model.encode(&x))
    }

    /// Whether this engine reads and writes an on-disk feature cache.
    pub fn has_cache(&self) -> bool {
        self.cache.is_some()
    }

    /// Encoder features of slices z0..z1 exactly as `segment` gets them (through the feature cache
    /// when there is one), one batch-1 `Features` per slice. For training stores whose slices a
    /// later `segment` of the same volume should find in the cache.
    pub fn encode_slices_cached(
        &self,
        u8vol: &[u8],
        dims: [usize; 3],
        z0: usize,
        z1: usize,
    ) -> Result<Vec<Features>, EngineError> {
        let mut timings = StageTimings::default();
        tch::no_grad(|| {
            let mut feats = Vec::with_capacity(z1.saturating_sub(z0));
            let mut z = z0;
            while z < z1 {
                let zb = (z + self.encode_batch).min(z1);
                let (f, _, _) = self.encode_all(u8vol, dims, z, zb, &mut timings, &mut |_| {}, &|| false)?;
                feats.extend(f);
                z = zb;
            }
            Ok(feats)
        })
    }

    /// Features of slices z_start..z_end (encoder in batches, or the cache), with cache hits and encoder runs.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn encode_all(
        &self,
        u8vol: &[u8],
        dims: [usize; 3],
        z_start: usize,
        z_end: usize,
        timings: &mut StageTimings,
        progress: &mut dyn FnMut(Progress),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Vec<Features>, Vec<bool>, usize), EngineError> {
        let nz = dims[0];
        let mut out: Vec<Option<Features>> = (z_start..z_end).map(|_| None).collect();
        let mut hits = vec![false; z_end - z_start];
        let mut runs = 0;
        let mut z = z_start;
        while z < z_end {
            if cancelled() {
                return Err(EngineError::Cancelled);
            }
            let z1 = (z + self.encode_batch).min(z_end);
            let t = Instant::now();
            let x = preprocess::encoder_input(u8vol, dims, z, z1, self.cfg.image_size, &self.norm);
            timings.preprocess_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let mut keys = Vec::new();
            let mut todo = Vec::new();
            for i in 0..(z1 - z) {
                let key = self.cache.as_ref().map(|_| FeatureCache::key(&x.narrow(0, i as i64, 1)));
                if let (Some(c), Some(k)) = (&self.cache, &key) {
                    if let Some(f) =
                        c.get(k, self.cfg.tap_count, [1, self.cfg.prompt_dim, self.cfg.grid, self.cfg.grid])
                    {
                        out[z + i - z_start] = Some(f.to_device_kind(self.device, self.kind));
                        hits[z + i - z_start] = true;
                    }
                }
                if out[z + i - z_start].is_none() {
                    todo.push(i as i64);
                }
                keys.push(key);
            }
            if !todo.is_empty() {
                let idx = Tensor::from_slice(&todo);
                let f = self.model.encode(&x.index_select(0, &idx));
                runs += todo.len();
                for (j, &i) in todo.iter().enumerate() {
                    let fi = f.narrow(j as i64, 1);
                    let fi = match (&self.cache, &keys[i as usize]) {
                        (Some(c), Some(k)) => {
                            // Store and use the f16-rounded features so that a later hit gives the same result.
                            c.put(k, &fi)
                                .map_err(|e| EngineError::Cache { dir: PathBuf::new(), message: e.to_string() })?;
                            cache::round_to_half(&fi)
                        }
                        _ => Features { taps: fi.taps.iter().map(|t| t.copy()).collect(), neck: fi.neck.copy() },
                    };
                    out[z + i as usize - z_start] = Some(fi);
                }
            }
            timings.encode_s += t.elapsed().as_secs_f64();
            progress(Progress { stage: Stage::Encode, done: z1, total: nz });
            z = z1;
        }
        Ok((out.into_iter().map(|f| f.expect("every slice encoded")).collect(), hits, runs))
    }

    /// Min-area in pixels for a slice of `pixels` pixels (1000 at 256² scaled by pixel count).
    fn min_area(&self, pixels: usize) -> usize {
        self.dir.spec.thresholds.min_area_px(pixels)
    }

    /// Prompts, selection and native mapping for slices z_offset.. (one per feature); writes `mask`,
    /// appends to `details`, returns the decoder runs.
    #[allow(clippy::too_many_arguments)]
    fn decode_all(
        &self,
        volume: &Volume,
        features: &[Features],
        z_offset: usize,
        mode: Mode,
        strategy: DecoderStrategy,
        mask: &mut Mask,
        details: &mut Vec<SliceDetail>,
        timings: &mut StageTimings,
        progress: &mut dyn FnMut(Progress),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<usize, EngineError> {
        let (nz, h, w) = (volume.nz(), volume.ny(), volume.nx());
        let s = self.cfg.image_size;
        let out_side = self.cfg.output_size as usize;
        let th = &self.dir.spec.thresholds;
        let amg =
            AmgSettings { iou_threshold: th.iou, nms_threshold: th.nms, min_area: self.min_area(out_side * out_side) };
        let native_min_area = self.min_area(h * w);
        let mut runs = 0;
        for (i, f) in features.iter().enumerate() {
            let z = z_offset + i;
            if cancelled() {
                return Err(EngineError::Cancelled);
            }
            let t = Instant::now();
            injected_fault("decode");
            let (ious, logits) = match (mode, strategy) {
                (Mode::Box, DecoderStrategy::Shared) => {
                    let ctx = self.model.pimm_context(f);
                    let boxes = Tensor::from_slice(&prompts::whole_box(s as f64).map(|v| v as f32)).view([1, 4]);
                    let o = self.model.decode(f, &ctx, &PromptBatch::Boxes(boxes));
                    runs += 1;
                    (o.iou, o.logits)
                }
                (Mode::Grid, DecoderStrategy::Shared) => {
                    let ctx = self.model.pimm_context(f);
                    let pts = prompts::grid_points(self.dir.spec.grid_points, s as f64);
                    let mut ious = Vec::new();
                    let mut logits = Vec::new();
                    for chunk in pts.chunks(self.prompt_batch) {
                        let b = chunk.len() as i64;
                        let flat: Vec<f32> = chunk.iter().flat_map(|p| [p[0] as f32, p[1] as f32]).collect();
                        let coords = Tensor::from_slice(&flat).view([b, 1, 2]);
                        let labels = Tensor::ones([b, 1], (Kind::Float, Device::Cpu));
                        let o = self.model.decode(f, &ctx, &PromptBatch::Points { coords, labels });
                        runs += chunk.len();
                        ious.push(o.iou);
                        logits.push(o.logits);
                    }
                    (Tensor::cat(&ious, 0), Tensor::cat(&logits, 0))
                }
                (m, DecoderStrategy::Official) => self.decode_official(f, m, &mut runs),
            };
            timings.decode_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let ious_v: Vec<f32> = Vec::try_from(ious.to_device(Device::Cpu).to_kind(Kind::Float).view([-1]))
                .map_err(|e: tch::TchError| EngineError::Inference(e.to_string()))?;
            let logits = logits.to_device(Device::Cpu).to_kind(Kind::Float);
            let n = ious_v.len();
            let chosen = if mode == Mode::Box && strategy == DecoderStrategy::Shared {
                // One box: the official generator forces its IoU to 1, so it always passes; cleaned below.
                prompts::AmgChoice { prompt: Some(0), mask: None, passed_iou: 1, after_nms: 1 }
            } else {
                let bin: Vec<BinMask> = (0..n)
                    .map(|i| {
                        let v: Vec<f32> = Vec::try_from(logits.get(i as i64).view([-1])).expect("float logits");
                        BinMask::new(out_side, out_side, postprocess::threshold(&v))
                    })
                    .collect();
                // Box mode (official strategy) forces IoU to 1 as the official generator does.
                let scores: Vec<f64> =
                    if mode == Mode::Box { vec![1.0; n] } else { ious_v.iter().map(|&v| v as f64).collect() };
                prompts::select_mask(&bin, &scores, &amg)
            };
            let mut detail = SliceDetail {
                z,
                iou: f32::NAN,
                area_px: 0,
                prompts_passed: chosen.passed_iou,
                after_nms: chosen.after_nms,
                chosen_prompt: chosen.prompt,
                cache_hit: false,
                stability: f32::NAN,
            };
            if let Some(p) = chosen.prompt {
                detail.iou = ious_v[p];
                detail.stability = quality::stability_score(&logits.get(p as i64), 1.0);
                let native = postprocess::logits_to_native(&logits.narrow(0, p as i64, 1), s, (s, s), h, w);
                let bin = BinMask::new(h, w, postprocess::threshold(&native));
                let cleaned = prompts::clean_mask(&bin, native_min_area);
                let n2 = h * w;
                for (dst, &b) in mask.data[z * n2..(z + 1) * n2].iter_mut().zip(&cleaned.data) {
                    *dst = b as u8;
                }
            }
            details.push(detail);
            timings.postprocess_s += t.elapsed().as_secs_f64();
            progress(Progress { stage: Stage::Decode, done: z + 1, total: nz });
        }
        Ok(runs)
    }

    /// The official generator's decoder use: 81 prompts per slice in batches of 9, features repeated
    /// and PIMM run in full per batch.
    fn decode_official(&self, f: &Features, mode: Mode, runs: &mut usize) -> (Tensor, Tensor) {
        let s = self.cfg.image_size as f64;
        let pts = prompts::grid_points(9, s);
        let mut ious = Vec::new();
        let mut logits = Vec::new();
        for chunk in pts.chunks(9) {
            let b = chunk.len() as i64;
            let fb = f.expand_batch(b);
            let ctx = self.model.pimm_context(&fb);
            let prompts = match mode {
                Mode::Box => {
                    let flat: Vec<f32> = (0..b).flat_map(|_| prompts::whole_box(s).map(|v| v as f32)).collect();
                    PromptBatch::Boxes(Tensor::from_slice(&flat).view([b, 4]))
                }
                Mode::Grid => {
                    let flat: Vec<f32> = chunk.iter().flat_map(|p| [p[0] as f32, p[1] as f32]).collect();
                    PromptBatch::Points {
                        coords: Tensor::from_slice(&flat).view([b, 1, 2]),
                        labels: Tensor::ones([b, 1], (Kind::Float, Device::Cpu)),
                    }
                }
            };
            let o = self.model.decode(&fb, &ctx, &prompts);
            *runs += chunk.len();
            ious.push(o.iou);
            logits.push(o.logits);
        }
        (Tensor::cat(&ious, 0), Tensor::cat(&logits, 0))
    }
}

fn check_volume(v: &Volume) -> Result<(), EngineError> {
    let [nz, ny, nx] = v.dims;
    if nz == 0 || ny < 8 || nx < 8 {
        return Err(EngineError::BadVolume(format!("dims {nz}×{ny}×{nx} are too small (need ≥1 slice of ≥8×8)")));
    }
    let limits = crate::limits::get();
    if (ny as u64).saturating_mul(nx as u64) > limits.max_slice_pixels {
        return Err(EngineError::BadVolume(format!(
            "slices of {nx}×{ny} exceed the limit of {} pixels per slice (docs/limits.md)",
            limits.max_slice_pixels
        )));
    }
    if crate::limits::product(&[nz as u64, ny as u64, nx as u64]).is_none_or(|n| n > limits.max_volume_voxels) {
        return Err(EngineError::BadVolume(format!(
            "{nz}×{ny}×{nx} voxels exceed the limit of {} voxels per volume (docs/limits.md)",
            limits.max_volume_voxels
        )));
    }
    if v.voxels.len() != nz * ny * nx {
        return Err(EngineError::BadVolume(format!("{} voxels for dims {nz}×{ny}×{nx}", v.voxels.len())));
    }
    if v.spacing.iter().any(|s| !s.is_finite() || *s <= 0.0) {
        return Err(EngineError::BadVolume(format!("invalid spacing {:?}", v.spacing)));
    }
    Ok(())
}

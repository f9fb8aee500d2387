//! The decoder training loop (PRIM + PIMM, or SAM's own mask head for the coupled baseline) over
//! precomputed embeddings: Adam with poly decay, seeded prompt sampling, per-epoch validation,
//! latest/best checkpoints and bit-exact resume. Never runs the image encoder.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use super::loss::{self, IouLoss, LossWeights};
use super::precompute::{self, ShardReader, StoreIndex};
// The run record lives in its own room (plot reads it too); re-exported so callers keep `fit::…`.
pub use super::run_log::{read_log, EpochLog, LOG_JSONL};
use super::{io_err, TrainError};
use crate::model::{Arch, DeSam, Features, ModelConfig, PromptBatch};

pub const CONFIG_JSON: &str = "config.json";
pub const STEPS_JSONL: &str = "steps.jsonl";
pub const LATEST: &str = "checkpoint_latest.safetensors";
pub const BEST: &str = "checkpoint_best.safetensors";
pub const SUMMARY_JSON: &str = "summary.json";

/// Training samples prompts the way the engine runs them: box = the whole-image box for every sample
/// (DeSAM-B, no IoU loss); grid = one random point per sample, inside (IoU target 1) or outside (0)
/// the ground truth (DeSAM-P).
pub use crate::engine::Mode as PromptMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// First 90% of the site's patients (store order = CSV order) train, last 10% validate.
    Official,
    /// Patients shuffled with the seed, then 90/10.
    Shuffle,
    /// Every real case in the store trains, whatever its site, and validation runs on the same cases
    /// (a fit figure, not a held-out one): for `adapt`, which selects with its own check cases.
    All,
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "official" => Ok(Split::Official),
            "shuffle" => Ok(Split::Shuffle),
            "all" => Ok(Split::All),
            o => Err(format!("unknown split {o:?} (official, shuffle or all)")),
        }
    }
}

/// Everything that determines a run's result (recorded in `config.json`; `--resume` requires it unchanged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitConfig {
    pub embeddings: PathBuf,
    pub mode: PromptMode,
    pub site: String,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub loss_weights: LossWeights,
    pub iou_loss: IouLoss,
    pub seed: u64,
    pub split: Split,
    /// Train SAM's own mask head (hypernetworks) instead of PIMM: the coupled "MedSAM" baseline.
    pub coupled: bool,
    /// Use every k-th foreground slice of each training case (1 = all).
    pub slice_stride: usize,
    /// Also train on the store's slices without gland (target: an empty mask), e.g. those a
    /// `background_margin` store keeps beyond the gland's ends; false in older runs.
    #[serde(default)]
    pub train_background: bool,
    /// Mixed precision (autocast + dynamic loss scaling); CUDA only.
    pub amp: bool,
    /// Decoder parts kept as they are (names below `mask_decoder.`, matched as prefixes, e.g.
    /// `pimm.conv_blocks_context.2`): no gradient, no update, and no backward pass through them
    /// when nothing trainable feeds them (PIMM's encoder-only branches), which is what makes a
    /// fine-tune cheaper. Empty in older runs: everything trains.
    #[serde(default)]
    pub freeze: Vec<String>,
    /// Data set identity (from the store).
    pub manifest_hash: String,
}

/// Options that do not change the result.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub out: PathBuf,
    pub resume: bool,
    /// Stop (saving `latest`) after this many optimiser steps in total.
    pub max_steps: Option<u64>,
    pub device: Option<Device>,
    pub threads: Option<usize>,
    /// Save `latest` every this many steps (besides every epoch end).
    pub save_every: u64,
    /// No validation pass at epoch ends (val_loss and val_dice are NaN, no `best` checkpoint): for
    /// runs whose checkpoint is chosen elsewhere, like `adapt`'s (the last one, judged by its gate),
    /// where it would only cost a forward pass over the training cases again.
    pub skip_validation: bool,
    pub progress: bool,
}

/// What is saved besides the tensors: where in the schedule the run is, and the epoch's running sums.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub epoch: usize,
    /// Steps already taken in `epoch`.
    pub step_in_epoch: usize,
    pub global_step: u64,
    /// Adam's step count t.
    pub adam_t: u64,
    pub best_val_loss: Option<f64>,
    pub best_epoch: Option<usize>,
    pub loss_scale: f64,
    pub good_steps: u64,
    /// Running sums of the current epoch (loss, dice loss, bce, iou loss, samples).
    pub sums: [f64; 5],
    /// Data order and prompts are pure functions of (seed, epoch, step); recorded for the reader.
    pub rng: serde_json::Value,
    pub train_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FitSummary {
    pub finished: bool,
    pub epochs_done: usize,
    pub global_step: u64,
    pub best_epoch: Option<usize>,
    pub best_val_loss: Option<f64>,
    pub best_val_dice: Option<f64>,
    pub train_seconds: f64,
    pub seconds_per_step: f64,
    pub peak_rss_mb: f64,
    pub train_cases: Vec<String>,
    pub val_cases: Vec<String>,
    pub train_slices: usize,
    pub val_slices: usize,
    pub device: String,
}

/// (case index in the store, row in its shard).
type Sample = (usize, usize);

fn run_err(dir: &Path, message: impl Into<String>) -> TrainError {
    TrainError::Run { dir: dir.to_path_buf(), message: message.into() }
}

/// A 64-bit seed derived from the run seed and a labelled tuple (so streams never overlap).
fn derive_seed(seed: u64, label: &str, a: u64, b: u64, c: u64) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(label.as_bytes());
    for x in [a, b, c] {
        h.update(x.to_le_bytes());
    }
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().unwrap())
}

fn shuffled<T: Clone>(v: &[T], seed: u64) -> Vec<T> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = v.to_vec();
    // Fisher–Yates, explicit so the order never depends on a library's shuffle algorithm.
    for i in (1..out.len()).rev() {
        let j = rng.gen_range(0..=i);
        out.swap(i, j);
    }
    out
}

/// Patient-level split of a site's cases (indices into `index.cases`).
pub fn split_cases(
    index: &StoreIndex,
    site: &str,
    split: Split,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>), TrainError> {
    // Split the real cases; augmented copies follow their source case into training and never
    // validate.
    let ids: Vec<usize> = index
        .cases
        .iter()
        .enumerate()
        .filter(|(_, c)| (split == Split::All || c.site == site) && c.augmented_from.is_none())
        .map(|(i, _)| i)
        .collect();
    let ids = match split {
        Split::All if ids.is_empty() => return Err(TrainError::Invalid("the store has no case to train on".into())),
        Split::All => {
            let copies = index.cases.iter().enumerate().filter(|(_, c)| c.augmented_from.is_some()).map(|(j, _)| j);
            return Ok((ids.iter().copied().chain(copies).collect(), ids));
        }
        _ if ids.len() < 2 => {
            return Err(TrainError::Invalid(format!(
                "site {site} has {} case(s) in the store; need at least 2 for a train/validation split",
                ids.len()
            )))
        }
        Split::Official => ids,
        Split::Shuffle => shuffled(&ids, derive_seed(seed, "split", 0, 0, 0)),
    };
    let n_train = ((ids.len() as f64 * 0.9).floor() as usize).clamp(1, ids.len() - 1);
    let mut train = ids[..n_train].to_vec();
    for &i in &ids[..n_train] {
        let id = &index.cases[i].id;
        train.extend(
            index.cases.iter().enumerate().filter(|(_, c)| c.augmented_from.as_ref() == Some(id)).map(|(j, _)| j),
        );
    }
    Ok((train, ids[n_train..].to_vec()))
}

/// The (case, row) samples of `cases`: every `stride`-th row with gland, plus (with `background`)
/// every row without gland.
fn samples_of(index: &StoreIndex, cases: &[usize], stride: usize, background: bool) -> Vec<Sample> {
    let mut v = Vec::new();
    for &c in cases {
        let rows = &index.cases[c].foreground;
        let fg: Vec<usize> = (0..rows.len()).filter(|&r| rows[r]).collect();
        v.extend(fg.into_iter().step_by(stride.max(1)).map(|r| (c, r)));
        if background {
            v.extend((0..rows.len()).filter(|&r| !rows[r]).map(|r| (c, r)));
        }
    }
    v
}

/// Peak resident set size of this process in MB (Linux VmHWM).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// The model a store was built for: its encoder (unused here) + its decoder as the starting point.
pub fn load_base_model(index: &StoreIndex, device: Device) -> Result<DeSam, TrainError> {
    let md = crate::modeldir::open(&index.config.model_dir)?;
    let arch: Arch = index.config.arch.parse()?;
    let files: Vec<&Path> = md.backbone_paths.iter().chain(&md.decoder_paths).map(|p| p.as_path()).collect();
    let (model, _) = DeSam::load(&ModelConfig::for_arch(arch), &files, device)?;
    model.freeze_encoders();
    Ok(model)
}

/// Prompts for a batch: the whole box, or per sample a random point inside/outside the label.
/// Returns the prompts and the IoU targets (grid mode).
fn make_prompts(mode: PromptMode, labels: &[Tensor], cfg: &ModelConfig, seeds: &[u64]) -> (PromptBatch, Tensor) {
    let b = labels.len() as i64;
    let s = cfg.image_size as f32;
    match mode {
        PromptMode::Box => {
            let flat: Vec<f32> = (0..b).flat_map(|_| [0.0, 0.0, s, s]).collect();
            (
                PromptBatch::Boxes(Tensor::from_slice(&flat).view([b, 4])),
                Tensor::ones([b, 1], (Kind::Float, Device::Cpu)),
            )
        }
        PromptMode::Grid => {
            let scale = (cfg.image_size as f32) / (cfg.output_size as f32);
            let mut coords = Vec::new();
            let mut targets = Vec::new();
            for (lab, &seed) in labels.iter().zip(seeds) {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let flat: Vec<u8> = Vec::try_from(lab.view([-1])).expect("u8 label");
                let side = cfg.output_size as usize;
                let want_bg = rng.gen_bool(0.5);
                let pool: Vec<usize> =
                    flat.iter().enumerate().filter(|(_, v)| (**v == 0) == want_bg).map(|(i, _)| i).collect();
                // A label without background (or foreground) falls back to any pixel.
                let idx =
                    if pool.is_empty() { rng.gen_range(0..flat.len()) } else { pool[rng.gen_range(0..pool.len())] };
                let (y, x) = (idx / side, idx % side);
                coords.extend([x as f32 * scale, y as f32 * scale]);
                // IoU target: 1 for a point on the gland, 0 for a background point.
                targets.push(if flat[idx] != 0 { 1.0f32 } else { 0.0 });
            }
            (
                PromptBatch::Points {
                    coords: Tensor::from_slice(&coords).view([b, 1, 2]),
                    labels: Tensor::ones([b, 1], (Kind::Float, Device::Cpu)),
                },
                Tensor::from_slice(&targets).view([b, 1]),
            )
        }
    }
}

struct Batch {
    features: Features,
    labels: Tensor,
    label_list: Vec<Tensor>,
}

fn load_batch(
    reader: &mut ShardReader,
    store: &Path,
    index: &StoreIndex,
    samples: &[Sample],
    device: Device,
) -> Result<Batch, TrainError> {
    let mut taps: Vec<Vec<Tensor>> = (0..index.config.tap_count).map(|_| Vec::new()).collect();
    let mut necks = Vec::new();
    let mut labels = Vec::new();
    for &(c, r) in samples {
        let (f, l) = precompute::read_sample(reader, store, &index.cases[c], r, index.config.tap_count)?;
        for (k, t) in f.taps.into_iter().enumerate() {
            taps[k].push(t);
        }
        necks.push(f.neck);
        labels.push(l);
    }
    let features = Features {
        taps: taps.iter().map(|v| Tensor::cat(v, 0).to_device(device)).collect(),
        neck: Tensor::cat(&necks, 0).to_device(device),
    };
    let lab = Tensor::cat(&labels, 0).unsqueeze(1).to_kind(Kind::Float).to_device(device);
    Ok(Batch { features, labels: lab, label_list: labels })
}

/// Logits (B×1×4g×4g) and predicted IoU (B×1) for a batch.
fn forward(model: &DeSam, coupled: bool, f: &Features, prompts: &PromptBatch) -> (Tensor, Tensor) {
    if coupled {
        let logits = model.sam_mask(f, prompts);
        let b = logits.size()[0];
        (logits, Tensor::ones([b, 1], (Kind::Float, model.device())))
    } else {
        let ctx = model.pimm_context(f);
        let o = model.decode(f, &ctx, prompts);
        (o.logits, o.iou)
    }
}

struct Losses {
    total: Tensor,
    dice: f64,
    bce: f64,
    iou: f64,
}

fn losses(cfg: &FitConfig, logits: &Tensor, iou: &Tensor, labels: &Tensor, iou_target: &Tensor) -> Losses {
    let logits = logits.to_kind(Kind::Float);
    let d = loss::soft_dice(&logits, labels);
    let b = loss::bce(&logits, labels);
    let w = cfg.loss_weights;
    let mut total = &d * w.dice + &b * w.bce;
    let mut iou_v = 0.0;
    if cfg.mode == PromptMode::Grid && !cfg.coupled {
        let il = loss::iou_loss(iou, &iou_target.to_device(iou.device()), cfg.iou_loss);
        iou_v = il.double_value(&[]);
        total += il * w.iou;
    }
    Losses { dice: d.double_value(&[]), bce: b.double_value(&[]), iou: iou_v, total }
}

/// The trainable variables: PRIM + PIMM + SAM's mask head (all `mask_decoder.*`), sorted by name.
fn trainable(model: &DeSam) -> Vec<(String, Tensor)> {
    model.decoder_variables()
}

/// Stops gradients for the decoder parameters under each `freeze` prefix; a prefix that names no
/// decoder parameter is an error (a typo would otherwise silently train everything).
pub fn freeze_parts(model: &DeSam, freeze: &[String]) -> Result<usize, TrainError> {
    let vars = model.decoder_variables();
    let mut frozen = 0;
    for prefix in freeze {
        let full = format!("mask_decoder.{prefix}");
        let matched: Vec<&(String, Tensor)> =
            vars.iter().filter(|(n, _)| n == &full || n.starts_with(&format!("{full}."))).collect();
        if matched.is_empty() {
            return Err(TrainError::Invalid(format!(
                "--freeze {prefix}: no decoder parameter is named mask_decoder.{prefix}[.…]"
            )));
        }
        for (_, t) in matched {
            let _ = t.shallow_clone().set_requires_grad(false);
            frozen += t.numel();
        }
    }
    Ok(frozen)
}

/// Adam (torch defaults: β 0.9/0.999, ε 1e-8, no weight decay) with explicit state, so that a
/// checkpoint holds everything needed to continue bit-exactly.
struct Adam {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: u64,
}

impl Adam {
    fn new(params: &[(String, Tensor)]) -> Adam {
        Adam {
            m: params.iter().map(|(_, p)| p.zeros_like()).collect(),
            v: params.iter().map(|(_, p)| p.zeros_like()).collect(),
            t: 0,
        }
    }

    /// One step; `inv_scale` undoes loss scaling. Parameters without a gradient are left alone.
    fn step(&mut self, params: &[(String, Tensor)], lr: f64, inv_scale: f64) {
        self.t += 1;
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        tch::no_grad(|| {
            for (i, (_, p)) in params.iter().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let g = if inv_scale != 1.0 { g * inv_scale } else { g };
                let _ = self.m[i].g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
                let _ = self.v[i].g_mul_scalar_(b2).g_add_(&(&g * &g * (1.0 - b2)));
                let denom = (&self.v[i] / bc2).sqrt() + eps;
                let mut pm = p.shallow_clone();
                let _ = pm.g_sub_(&(&self.m[i] / &denom * (lr / bc1)));
            }
        });
    }
}

fn zero_grads(params: &[(String, Tensor)]) {
    for (_, p) in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

fn grads_finite(params: &[(String, Tensor)]) -> bool {
    params.iter().all(|(_, p)| {
        let g = p.grad();
        !g.defined() || g.isfinite().all().int64_value(&[]) == 1
    })
}

/// Poly schedule of the official code, set at the start of each epoch.
pub fn poly_lr(base: f64, epoch: usize, epochs: usize) -> f64 {
    base * (1.0 - epoch as f64 / epochs as f64).max(0.0).powf(0.9)
}

fn save_checkpoint(
    path: &Path,
    params: &[(String, Tensor)],
    adam: &Adam,
    state: &TrainState,
) -> Result<(), TrainError> {
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (i, (n, p)) in params.iter().enumerate() {
        named.push((format!("param.{n}"), p.detach().to_device(Device::Cpu)));
        named.push((format!("adam_m.{n}"), adam.m[i].to_device(Device::Cpu)));
        named.push((format!("adam_v.{n}"), adam.v[i].to_device(Device::Cpu)));
    }
    let js = serde_json::to_vec(state).unwrap();
    named.push(("state_json".into(), Tensor::from_slice(&js)));
    let tmp = path.with_extension("safetensors.partial");
    Tensor::write_safetensors(&named, &tmp)?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Reads a checkpoint: (parameters by name, Adam m, Adam v, state).
#[allow(clippy::type_complexity)]
pub fn read_checkpoint(
    path: &Path,
) -> Result<(Vec<(String, Tensor)>, Vec<(String, Tensor)>, Vec<(String, Tensor)>, TrainState), TrainError> {
    let all = Tensor::read_safetensors(path)
        .map_err(|e| TrainError::Run { dir: path.to_path_buf(), message: format!("cannot read checkpoint: {e}") })?;
    let (mut p, mut m, mut v, mut state) = (Vec::new(), Vec::new(), Vec::new(), None);
    for (n, t) in all {
        if let Some(k) = n.strip_prefix("param.") {
            p.push((k.to_string(), t));
        } else if let Some(k) = n.strip_prefix("adam_m.") {
            m.push((k.to_string(), t));
        } else if let Some(k) = n.strip_prefix("adam_v.") {
            v.push((k.to_string(), t));
        } else if n == "state_json" {
            let bytes: Vec<u8> = Vec::try_from(&t).map_err(TrainError::Torch)?;
            state = Some(serde_json::from_slice(&bytes).map_err(|e| run_err(path, format!("state: {e}")))?);
        }
    }
    let state = state.ok_or_else(|| run_err(path, "checkpoint has no state"))?;
    for x in [&mut p, &mut m, &mut v] {
        x.sort_by(|a, b| a.0.cmp(&b.0));
    }
    Ok((p, m, v, state))
}

fn append_line(path: &Path, line: &str) -> Result<(), TrainError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(io_err(path))?;
    writeln!(f, "{line}").map_err(io_err(path))
}

/// Validation loss and mean per-slice Dice (deterministic prompts).
fn validate(
    model: &DeSam,
    cfg: &FitConfig,
    reader: &mut ShardReader,
    index: &StoreIndex,
    samples: &[Sample],
) -> Result<(f64, f64), TrainError> {
    let store = cfg.embeddings.clone();
    let mcfg = model.config().clone();
    let (mut loss_sum, mut dice_sum, mut n) = (0.0, 0.0, 0usize);
    tch::no_grad(|| -> Result<(), TrainError> {
        for (bi, chunk) in samples.chunks(cfg.batch.max(1)).enumerate() {
            let b = load_batch(reader, &store, index, chunk, model.device())?;
            let seeds: Vec<u64> =
                (0..chunk.len()).map(|i| derive_seed(cfg.seed, "val", bi as u64, i as u64, 0)).collect();
            let (prompts, iou_t) = make_prompts(cfg.mode, &b.label_list, &mcfg, &seeds);
            let (logits, iou) = forward(model, cfg.coupled, &b.features, &prompts);
            let l = losses(cfg, &logits, &iou, &b.labels, &iou_t);
            loss_sum += l.total.double_value(&[]) * chunk.len() as f64;
            dice_sum += loss::hard_dice(&logits.to_kind(Kind::Float), &b.labels).iter().sum::<f64>();
            n += chunk.len();
        }
        Ok(())
    })?;
    Ok((loss_sum / n.max(1) as f64, dice_sum / n.max(1) as f64))
}

/// Trains; returns the summary (also written to `summary.json`).
pub fn fit(cfg_in: &FitConfig, opts: &RunOptions) -> Result<FitSummary, TrainError> {
    let out = &opts.out;
    if let Some(n) = opts.threads {
        tch::set_num_threads(n.max(1) as i32);
    }
    let device = opts.device.unwrap_or(Device::Cpu);
    let index = precompute::read_index(&cfg_in.embeddings)?;
    let mut cfg = cfg_in.clone();
    cfg.manifest_hash = index.manifest_hash.clone();
    cfg.amp = cfg.amp && device.is_cuda();
    if cfg.epochs == 0 || cfg.batch == 0 || cfg.lr.is_nan() || cfg.lr <= 0.0 {
        return Err(TrainError::Invalid("--epochs, --batch and --lr must be positive".into()));
    }
    let cfg_path = out.join(CONFIG_JSON);
    let latest = out.join(LATEST);
    if opts.resume {
        let old: FitConfig = serde_json::from_slice(&std::fs::read(&cfg_path).map_err(io_err(&cfg_path))?)
            .map_err(|e| run_err(out, format!("config.json: {e}")))?;
        if old != cfg {
            return Err(run_err(out, "--resume with a different configuration or data; start a new --out instead"));
        }
        if !latest.is_file() {
            return Err(run_err(out, "--resume but there is no checkpoint_latest.safetensors"));
        }
    } else {
        if cfg_path.exists() {
            return Err(run_err(out, "already holds a run; pass --resume to continue it or choose a new --out"));
        }
        std::fs::create_dir_all(out).map_err(io_err(out))?;
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).map_err(io_err(&cfg_path))?;
    }

    let (train_cases, val_cases) = split_cases(&index, &cfg.site, cfg.split, cfg.seed)?;
    let train = samples_of(&index, &train_cases, cfg.slice_stride, cfg.train_background);
    let val = if opts.skip_validation { Vec::new() } else { samples_of(&index, &val_cases, 1, false) };
    if train.is_empty() {
        return Err(TrainError::Invalid(format!("site {} has no foreground slices to train on", cfg.site)));
    }
    let model = load_base_model(&index, device)?;
    let mcfg = model.config().clone();
    if mcfg.output_size != index.config.output_size {
        return Err(run_err(out, "store and model disagree on the output size"));
    }
    freeze_parts(&model, &cfg.freeze)?;
    let params = trainable(&model);
    let mut adam = Adam::new(&params);
    let mut state = TrainState {
        epoch: 0,
        step_in_epoch: 0,
        global_step: 0,
        adam_t: 0,
        best_val_loss: None,
        best_epoch: None,
        loss_scale: if cfg.amp { 65536.0 } else { 1.0 },
        good_steps: 0,
        sums: [0.0; 5],
        rng: serde_json::json!({"seed": cfg.seed, "derivation": "sha256(seed, stream, epoch, step, sample) -> ChaCha8"}),
        train_seconds: 0.0,
    };
    if opts.resume {
        let (p, m, v, st) = read_checkpoint(&latest)?;
        if p.len() != params.len() {
            return Err(run_err(out, "checkpoint does not match the model's decoder"));
        }
        tch::no_grad(|| {
            for (i, (name, t)) in params.iter().enumerate() {
                let mut dst = t.shallow_clone();
                dst.copy_(&p[i].1.to_device(device));
                adam.m[i] = m[i].1.to_device(device);
                adam.v[i] = v[i].1.to_device(device);
                debug_assert_eq!(name, &p[i].0);
            }
        });
        adam.t = st.adam_t;
        state = st;
    }

    let steps_per_epoch = train.len().div_ceil(cfg.batch);
    let mut reader = ShardReader::default();
    let store = cfg.embeddings.clone();
    let bar = if opts.progress {
        indicatif::ProgressBar::new((steps_per_epoch * cfg.epochs) as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} ETA {eta} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    bar.set_position(state.global_step);
    let log_path = out.join(LOG_JSONL);
    let steps_path = out.join(STEPS_JSONL);
    let text_log = out.join("training_log.txt");
    append_line(
        &text_log,
        &format!(
            "{} start epoch {} step {} ({} train slices from {} cases, {} val slices from {} cases, {} steps/epoch, device {:?})",
            crate::clock::utc_now(),
            state.epoch,
            state.step_in_epoch,
            train.len(),
            train_cases.len(),
            val.len(),
            val_cases.len(),
            steps_per_epoch,
            device
        ),
    )?;
    let session_start = Instant::now();
    let start_seconds = state.train_seconds;
    let start_step = state.global_step;
    let mut stopped = false;
    while state.epoch < cfg.epochs {
        let epoch = state.epoch;
        let lr = poly_lr(cfg.lr, epoch, cfg.epochs);
        let order = shuffled(&train, derive_seed(cfg.seed, "order", epoch as u64, 0, 0));
        let t_epoch = Instant::now();
        while state.step_in_epoch < steps_per_epoch {
            if opts.max_steps.is_some_and(|m| state.global_step >= m) {
                stopped = true;
                break;
            }
            let s = state.step_in_epoch;
            let chunk = &order[s * cfg.batch..((s + 1) * cfg.batch).min(order.len())];
            let b = load_batch(&mut reader, &store, &index, chunk, device)?;
            let seeds: Vec<u64> =
                (0..chunk.len()).map(|i| derive_seed(cfg.seed, "prompt", epoch as u64, s as u64, i as u64)).collect();
            let (prompts, iou_t) = make_prompts(cfg.mode, &b.label_list, &mcfg, &seeds);
            zero_grads(&params);
            let (logits, iou) = if cfg.amp {
                tch::autocast(true, || forward(&model, cfg.coupled, &b.features, &prompts))
            } else {
                forward(&model, cfg.coupled, &b.features, &prompts)
            };
            let l = losses(&cfg, &logits, &iou, &b.labels, &iou_t);
            (&l.total * state.loss_scale).backward();
            let take = !cfg.amp || grads_finite(&params);
            if take {
                adam.step(&params, lr, 1.0 / state.loss_scale);
                state.good_steps += 1;
                if cfg.amp && state.good_steps % 2000 == 0 {
                    state.loss_scale *= 2.0;
                }
            } else {
                state.loss_scale = (state.loss_scale / 2.0).max(1.0);
                state.good_steps = 0;
            }
            let n = chunk.len() as f64;
            let total = l.total.double_value(&[]);
            state.sums[0] += total * n;
            state.sums[1] += l.dice * n;
            state.sums[2] += l.bce * n;
            state.sums[3] += l.iou * n;
            state.sums[4] += n;
            state.step_in_epoch += 1;
            state.global_step += 1;
            state.adam_t = adam.t;
            state.train_seconds = start_seconds + session_start.elapsed().as_secs_f64();
            append_line(
                &steps_path,
                &serde_json::json!({"epoch": epoch, "step": s, "global_step": state.global_step, "loss": total, "dice_loss": l.dice, "bce": l.bce, "iou_loss": l.iou, "lr": lr, "skipped": !take}).to_string(),
            )?;
            bar.inc(1);
            bar.set_message(format!("epoch {epoch} loss {total:.4}"));
            if opts.save_every > 0 && state.global_step % opts.save_every == 0 {
                save_checkpoint(&latest, &params, &adam, &state)?;
            }
        }
        if stopped {
            break;
        }
        // Epoch end: validation, logs, checkpoints.
        let (val_loss, val_dice) =
            if val.is_empty() { (f64::NAN, f64::NAN) } else { validate(&model, &cfg, &mut reader, &index, &val)? };
        let ns = state.sums[4].max(1.0);
        let is_best = !val_loss.is_nan() && state.best_val_loss.is_none_or(|b| val_loss < b);
        if is_best {
            state.best_val_loss = Some(val_loss);
            state.best_epoch = Some(epoch);
        }
        let entry = EpochLog {
            epoch,
            lr,
            steps: steps_per_epoch,
            global_step: state.global_step,
            train_loss: state.sums[0] / ns,
            train_dice_loss: state.sums[1] / ns,
            train_bce: state.sums[2] / ns,
            train_iou_loss: state.sums[3] / ns,
            val_loss,
            val_dice,
            seconds: t_epoch.elapsed().as_secs_f64(),
            is_best,
        };
        append_line(&log_path, &serde_json::to_string(&entry).unwrap())?;
        append_line(
            &text_log,
            &format!(
                "{} epoch {epoch} train_loss {:.4} {} lr {lr:.2e}{}",
                crate::clock::utc_now(),
                entry.train_loss,
                if val_loss.is_nan() {
                    "(no validation)".to_string()
                } else {
                    format!("val_loss {val_loss:.4} val_dice {val_dice:.4}")
                },
                if is_best { " (best)" } else { "" }
            ),
        )?;
        state.epoch += 1;
        state.step_in_epoch = 0;
        state.sums = [0.0; 5];
        state.train_seconds = start_seconds + session_start.elapsed().as_secs_f64();
        save_checkpoint(&latest, &params, &adam, &state)?;
        if is_best {
            std::fs::copy(&latest, out.join(BEST)).map_err(io_err(out))?;
        }
        let logs = read_log(out)?;
        super::plot::write_progress_png(&out.join("progress.png"), &logs)
            .map_err(|e| run_err(out, format!("progress.png: {e}")))?;
    }
    if stopped {
        save_checkpoint(&latest, &params, &adam, &state)?;
    }
    bar.finish();
    let logs = read_log(out)?;
    let session_steps = state.global_step - start_step;
    let summary = FitSummary {
        finished: state.epoch >= cfg.epochs,
        epochs_done: state.epoch,
        global_step: state.global_step,
        best_epoch: state.best_epoch,
        best_val_loss: state.best_val_loss,
        best_val_dice: state.best_epoch.and_then(|e| logs.iter().find(|l| l.epoch == e).map(|l| l.val_dice)),
        train_seconds: state.train_seconds,
        seconds_per_step: if session_steps > 0 {
            session_start.elapsed().as_secs_f64() / session_steps as f64
        } else {
            0.0
        },
        peak_rss_mb: peak_rss_mb(),
        train_cases: train_cases.iter().map(|&i| index.cases[i].id.clone()).collect(),
        val_cases: val_cases.iter().map(|&i| index.cases[i].id.clone()).collect(),
        train_slices: train.len(),
        val_slices: val.len(),
        device: format!("{device:?}"),
    };
    let p = out.join(SUMMARY_JSON);
    std::fs::write(&p, serde_json::to_string_pretty(&summary).unwrap()).map_err(io_err(&p))?;
    append_line(
        &text_log,
        &format!(
            "{} stop at epoch {} step {} (finished: {})",
            crate::clock::utc_now(),
            state.epoch,
            state.global_step,
            summary.finished
        ),
    )?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poly_schedule_matches_official() {
        assert_eq!(poly_lr(1e-4, 0, 50), 1e-4);
        assert!((poly_lr(1e-4, 25, 50) - 1e-4 * 0.5f64.powf(0.9)).abs() < 1e-12);
        assert_eq!(poly_lr(1e-4, 50, 50), 0.0);
    }

    #[test]
    fn freeze_stops_gradients_of_the_named_parts_only() {
        let model = DeSam::new(&ModelConfig::for_arch(Arch::Tiny), Device::Cpu);
        model.freeze_encoders();
        let grad = |name: &str| {
            model.decoder_variables().into_iter().find(|(n, _)| n == name).map(|(_, t)| t.requires_grad()).unwrap()
        };
        let frozen = "mask_decoder.pimm.conv_blocks_context.2.block_init.conv1.conv.weight";
        let trained = "mask_decoder.pimm.conv_blocks_localization.1.res_block.conv1.conv.weight";
        assert!(grad(frozen) && grad(trained));
        let n = freeze_parts(&model, &["pimm.conv_blocks_context.2".to_string()]).unwrap();
        assert!(n > 0);
        assert!(!grad(frozen) && grad(trained));
        // A typo is an error, not a silent fine-tune of everything.
        let e = freeze_parts(&model, &["pimm.conv_block_context.2".to_string()]).unwrap_err();
        assert!(e.to_string().contains("pimm.conv_block_context.2"), "{e}");
    }

    #[test]
    fn shuffles_are_pure_functions_of_the_seed() {
        let v: Vec<u32> = (0..20).collect();
        assert_eq!(shuffled(&v, 7), shuffled(&v, 7));
        assert_ne!(shuffled(&v, 7), shuffled(&v, 8));
        let mut s = shuffled(&v, 7);
        s.sort();
        assert_eq!(s, v);
    }
}

//! Cross-site evaluation: runs the REAL engine (`Segmenter`, the CLI/plugin code path) on every case
//! of the chosen sites, or takes the SEG the Orthanc plugin stored for it, and scores it (3-D Dice,
//! HD95 in mm, the official DeSAM metric); also scores a training checkpoint on a precomputed store.
//! Read-only (Orthanc included).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::data::{self, CaseRef};
use super::metrics;
use super::orthanc_rest::{Client, Connection};
use super::precompute::{self, ShardReader};
use super::{io_err, TrainError};
use crate::engine::{DeviceChoice, EngineOptions, Mode, SegmentRequest, Segmenter};
use crate::volume::{Mask, Volume};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseResult {
    pub id: String,
    pub site: String,
    pub dice: f64,
    /// None when the prediction (or ground truth) is empty.
    pub hd95_mm: Option<f64>,
    /// Official metric of this case (foreground slices at 256², border zeroed).
    pub official_dice: f64,
    pub official_slices: usize,
    pub gt_ml: f64,
    pub pred_ml: f64,
    pub seconds: f64,
    /// The engine's series quality score and whether it flagged the result.
    #[serde(default)]
    pub quality: Option<f64>,
    #[serde(default)]
    pub flagged: bool,
    /// Slices the encoder ran on (the others came from the feature cache); 0 in older logs and for
    /// stored SEGs.
    #[serde(default)]
    pub encoder_runs: usize,
    /// The model version that made the mask (a stored SEG's: its result record's `ModelVersion`).
    #[serde(default)]
    pub model_version: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteResult {
    pub site: String,
    pub cases: usize,
    pub dice_mean: f64,
    pub dice_std: f64,
    pub dice_min: f64,
    pub hd95_mean_mm: Option<f64>,
    pub empty_predictions: usize,
    pub official_dice_mean: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalSummary {
    pub model: serde_json::Value,
    pub mode: String,
    pub data: PathBuf,
    pub manifest_hash: String,
    pub sites: Vec<SiteResult>,
    /// Mean 3-D Dice over all cases (patients pooled).
    pub dice_mean_cases: f64,
    /// Mean of the per-site means.
    pub dice_mean_sites: f64,
    /// Official metric: mean over all patients of the evaluated sites pooled.
    pub official_dice_pooled: f64,
    pub seconds: f64,
    /// Cases taken over from an interrupted run's `cases.jsonl` (`--resume`), not re-segmented.
    #[serde(default)]
    pub resumed_cases: usize,
    pub cases: Vec<CaseResult>,
}

/// What is scored.
#[derive(Debug, Clone)]
pub enum EvalSource {
    /// A model directory, run here by the engine.
    Model(PathBuf),
    /// The SEGs the Orthanc plugin stored for the cases' MR series (DICOM case folders only).
    Stored(StoredSegs),
}

/// Where the plugin's results are and which ones count.
#[derive(Debug, Clone)]
pub struct StoredSegs {
    pub connection: Connection,
    /// The plugin's `ResultMetadata` index (series metadata holding its result record).
    pub result_metadata: u16,
    /// Only results of this model version count (the record's `ModelVersion`); others are waited for.
    pub version: Option<String>,
    /// How long to wait, in all, for results that are missing or from another version.
    pub wait: Duration,
}

pub struct EvalOptions {
    pub source: EvalSource,
    pub data: PathBuf,
    pub sites: Vec<String>,
    pub mode: Option<Mode>,
    pub device: DeviceChoice,
    pub threads: Option<usize>,
    /// Evaluate at most this many cases per site (None: all).
    pub max_cases_per_site: Option<usize>,
    pub out: Option<PathBuf>,
    /// Continue an interrupted evaluation in `out`: cases already in its `cases.jsonl` are kept.
    pub resume: bool,
    pub progress: bool,
    /// (Model source only.) The engine's on-disk encoder-feature cache (`EngineOptions::cache_dir`): a second model with
    /// the same encoder (a fine-tuned decoder) then skips the encoder on the same cases.
    pub cache_dir: Option<PathBuf>,
    /// Also write each case's predicted mask as `out/masks/<case>.nii.gz` (needs `out`).
    pub save_masks: bool,
}

/// Where `save_masks` puts a case's predicted mask.
pub fn mask_path(out: &Path, case: &str) -> PathBuf {
    out.join("masks").join(format!("{case}.nii.gz"))
}

/// What makes two evaluations the same one; stored as `eval.json` next to `cases.jsonl` so that
/// `--resume` never mixes cases of a different model, mode or case list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct EvalKey {
    model_sha256: String,
    mode: String,
    manifest_hash: String,
    sites: Vec<String>,
    max_cases_per_site: Option<usize>,
}

/// Per-case results written as each case finishes, so a long evaluation killed halfway loses at
/// most the case in flight.
struct CaseLog {
    file: std::fs::File,
    path: PathBuf,
}

impl CaseLog {
    /// Opens `out/cases.jsonl`; with `resume`, returns the complete records already there (a torn
    /// last line from a kill is dropped and the file rewritten without it).
    fn open(out: &Path, key: &EvalKey, resume: bool) -> Result<(CaseLog, Vec<CaseResult>), TrainError> {
        std::fs::create_dir_all(out).map_err(io_err(out))?;
        let path = out.join("cases.jsonl");
        let key_path = out.join("eval.json");
        let mut done = Vec::new();
        if path.exists() {
            if !resume {
                return Err(TrainError::Invalid(format!(
                    "{} already holds case results of an evaluation; pass --resume to continue it, or choose another --out",
                    path.display()
                )));
            }
            let stored: Option<EvalKey> = std::fs::read(&key_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
            if stored.as_ref() != Some(key) {
                return Err(TrainError::Invalid(format!(
                    "{} belongs to a different evaluation (model, mode, sites or case list differ: stored {:?}, now {:?}); choose another --out",
                    out.display(),
                    stored,
                    key
                )));
            }
            let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            // The complete lines are kept verbatim (not re-serialised).
            let mut clean = String::new();
            for (i, l) in lines.iter().enumerate() {
                match serde_json::from_str::<CaseResult>(l) {
                    Ok(c) => {
                        done.push(c);
                        clean.push_str(l);
                        clean.push('\n');
                    }
                    // Only the last line can be torn by a kill; anything earlier is damage.
                    Err(_) if i + 1 == lines.len() => {}
                    Err(e) => return Err(TrainError::Invalid(format!("{} line {}: {e}", path.display(), i + 1))),
                }
            }
            let tmp = out.join("cases.jsonl.tmp");
            std::fs::write(&tmp, clean).map_err(io_err(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        } else {
            std::fs::write(&key_path, serde_json::to_string_pretty(key).unwrap()).map_err(io_err(&key_path))?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&path))?;
        Ok((CaseLog { file, path }, done))
    }

    fn append(&mut self, c: &CaseResult) -> Result<(), TrainError> {
        use std::io::Write;
        let mut line = serde_json::to_string(c).unwrap();
        line.push('\n');
        self.file.write_all(line.as_bytes()).and_then(|_| self.file.sync_data()).map_err(io_err(&self.path))
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn std(v: &[f64]) -> f64 {
    let m = mean(v);
    if v.len() < 2 {
        0.0
    } else {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
    }
}

/// Per-site aggregates of case results, in the order of `sites`.
pub fn summarise(cases: &[CaseResult], sites: &[String]) -> (Vec<SiteResult>, f64, f64, f64) {
    let mut out = Vec::new();
    for s in sites {
        let c: Vec<&CaseResult> = cases.iter().filter(|c| &c.site == s).collect();
        if c.is_empty() {
            continue;
        }
        let d: Vec<f64> = c.iter().map(|c| c.dice).collect();
        let h: Vec<f64> = c.iter().filter_map(|c| c.hd95_mm).collect();
        out.push(SiteResult {
            site: s.clone(),
            cases: c.len(),
            dice_mean: mean(&d),
            dice_std: std(&d),
            dice_min: d.iter().cloned().fold(f64::INFINITY, f64::min),
            hd95_mean_mm: if h.is_empty() { None } else { Some(mean(&h)) },
            empty_predictions: c.iter().filter(|c| c.pred_ml == 0.0).count(),
            official_dice_mean: mean(&c.iter().map(|c| c.official_dice).collect::<Vec<_>>()),
        });
    }
    let all: Vec<f64> = cases.iter().map(|c| c.dice).collect();
    let site_means: Vec<f64> = out.iter().map(|s| s.dice_mean).collect();
    let off: Vec<f64> = cases.iter().map(|c| c.official_dice).filter(|d| d.is_finite()).collect();
    (out, mean(&all), mean(&site_means), mean(&off))
}

/// Markdown table of a summary.
pub fn markdown(s: &EvalSummary, title: &str) -> String {
    let mut t = format!(
        "### {title}\n\nmode `{}`, data manifest `{}`\n\n",
        s.mode,
        &s.manifest_hash[..12.min(s.manifest_hash.len())]
    );
    t.push_str("| site | cases | Dice 3-D mean ± sd | min | HD95 mean (mm) | empty | official Dice |\n|---|---|---|---|---|---|---|\n");
    for r in &s.sites {
        t.push_str(&format!(
            "| {} | {} | {:.4} ± {:.4} | {:.4} | {} | {} | {:.4} |\n",
            r.site,
            r.cases,
            r.dice_mean,
            r.dice_std,
            r.dice_min,
            r.hd95_mean_mm.map(|h| format!("{h:.2}")).unwrap_or_else(|| "–".into()),
            r.empty_predictions,
            r.official_dice_mean
        ));
    }
    t.push_str(&format!(
        "| **all** | {} | **{:.4}** (cases pooled; mean of site means {:.4}) | | | | **{:.4}** (patients pooled) |\n",
        s.cases.len(),
        s.dice_mean_cases,
        s.dice_mean_sites,
        s.official_dice_pooled
    ));
    t
}

fn select_cases(data_dir: &Path, sites: &[String], max_per_site: Option<usize>) -> Result<Vec<CaseRef>, TrainError> {
    let all = data::list_cases(data_dir)?;
    let mut out = Vec::new();
    for s in sites {
        let c: Vec<CaseRef> = all.iter().filter(|c| &c.site == s).cloned().collect();
        if c.is_empty() {
            return Err(TrainError::Invalid(format!("no case of site {s} in {}", data_dir.display())));
        }
        out.extend(c.into_iter().take(max_per_site.unwrap_or(usize::MAX)));
    }
    Ok(out)
}

/// A predicted mask and what made it.
struct Prediction {
    mask: Mask,
    quality: Option<f64>,
    flagged: bool,
    encoder_runs: usize,
    model_version: Option<String>,
}

/// Makes the masks that are scored: the engine here, or the plugin's stored SEGs.
// One per evaluation: the size of the enum does not matter.
#[allow(clippy::large_enum_variant)]
enum Predictor<'a> {
    Engine { seg: Segmenter, mode: Mode },
    Stored { client: Client, o: &'a StoredSegs, deadline: Instant },
}

impl Predictor<'_> {
    fn predict(&self, case: &CaseRef, volume: &Volume) -> Result<Prediction, TrainError> {
        match self {
            Predictor::Engine { seg, mode } => {
                let req = SegmentRequest { mode: Some(*mode), ..Default::default() };
                let r = seg
                    .segment(volume, &req, &mut |_| {})
                    .map_err(|e| TrainError::Model(format!("case {}: {e}", case.id)))?;
                Ok(Prediction {
                    mask: r.mask,
                    quality: Some(r.quality),
                    flagged: r.flagged,
                    encoder_runs: r.encoder_runs,
                    model_version: Some(seg.model_id().version),
                })
            }
            Predictor::Stored { client, o, deadline } => stored_prediction(client, o, *deadline, case, volume),
        }
    }
}

/// What the plugin's record of a series says, read once.
enum StoredState {
    /// Not there yet (why, for the error after the wait).
    Waiting(String),
    Ready(serde_json::Value),
}

/// The plugin's result record of the case's MR series when it is from the wanted version.
fn stored_record(client: &Client, o: &StoredSegs, uid: &str) -> Result<StoredState, TrainError> {
    let Some(series) = client.lookup_series(uid)? else {
        return Ok(StoredState::Waiting(format!("MR series {uid} is not in Orthanc")));
    };
    let path = format!("/series/{series}/metadata/{}", o.result_metadata);
    let Some(body) = client.get_optional(&path)? else {
        return Ok(StoredState::Waiting(format!(
            "Orthanc series {series} has no result record (metadata {}) yet",
            o.result_metadata
        )));
    };
    let record = client.json(&path, &body)?;
    let version = record["ModelVersion"].as_str().unwrap_or("");
    match &o.version {
        Some(want) if want != version => Ok(StoredState::Waiting(format!(
            "Orthanc series {series} has a result of version {version:?}, not {want:?}"
        ))),
        _ => Ok(StoredState::Ready(record)),
    }
}

/// The mask of the SEG the plugin stored for this case's MR series (an `empty` result: no voxel),
/// waiting until `deadline` for a record of the wanted version.
fn stored_prediction(
    client: &Client,
    o: &StoredSegs,
    deadline: Instant,
    case: &CaseRef,
    volume: &Volume,
) -> Result<Prediction, TrainError> {
    let Some(uid) = volume.source.as_ref().map(|s| s.series_instance_uid.clone()) else {
        return Err(TrainError::Invalid(format!(
            "case {}: scoring stored SEGs needs DICOM case folders (<case>/MR + <case>/SEG)",
            case.id
        )));
    };
    let record = loop {
        match stored_record(client, o, &uid)? {
            StoredState::Ready(r) => break r,
            StoredState::Waiting(why) if Instant::now() >= deadline => {
                return Err(TrainError::Invalid(format!(
                    "case {}: {why} (waited {} s in all; --wait)",
                    case.id,
                    o.wait.as_secs()
                )))
            }
            StoredState::Waiting(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    let text = |key: &str| record[key].as_str().unwrap_or("").to_string();
    let mask = match text("Status").as_str() {
        "done" => {
            let instance = text("SegInstance");
            if instance.is_empty() {
                return Err(TrainError::OrthancAnswer {
                    url: client.url.clone(),
                    message: format!("case {}: the result record says done but names no SegInstance", case.id),
                });
            }
            let bytes = client.get(&format!("/instances/{instance}/file"))?;
            data::first_segment(&bytes, volume).map_err(|e| TrainError::OrthancAnswer {
                url: client.url.clone(),
                message: format!("case {}: SEG instance {instance}: {e}", case.id),
            })?
        }
        // No prostate found: nothing stored, an empty prediction.
        "empty" => Mask::zeros(volume.dims),
        "failed" => {
            return Err(TrainError::Invalid(format!(
                "case {}: the plugin's run failed: {}",
                case.id,
                record["Error"].as_str().unwrap_or("no reason recorded")
            )))
        }
        other => {
            return Err(TrainError::OrthancAnswer {
                url: client.url.clone(),
                message: format!("case {}: unknown result status {other:?}", case.id),
            })
        }
    };
    Ok(Prediction {
        mask,
        quality: record["QualityScore"].as_f64(),
        flagged: record["NeedsReview"].as_bool().unwrap_or(false),
        encoder_runs: 0,
        model_version: Some(text("ModelVersion")),
    })
}

/// Evaluates a model directory with the engine, or the plugin's stored SEGs.
pub fn evaluate(o: &EvalOptions) -> Result<EvalSummary, TrainError> {
    let t0 = Instant::now();
    if o.save_masks && o.out.is_none() {
        return Err(TrainError::Invalid("saving masks needs an output folder".into()));
    }
    let cases = select_cases(&o.data, &o.sites, o.max_cases_per_site)?;
    let manifest_hash = data::manifest_hash(&cases)?;
    // What identifies the masks (the resume key) and the summary's `model`.
    let (predictor, model_key, mode_name, model_json, title) = match &o.source {
        EvalSource::Model(dir) => {
            let seg = Segmenter::from_model_dir(
                dir,
                EngineOptions {
                    device: o.device,
                    threads: o.threads,
                    cache_dir: o.cache_dir.clone(),
                    ..Default::default()
                },
            )?;
            let mode = o.mode.unwrap_or_else(|| seg.default_mode());
            let id = seg.model_id();
            let title = format!("{} on sites {}", id.name, o.sites.join(","));
            let json = serde_json::to_value(&id).unwrap_or_default();
            (Predictor::Engine { seg, mode }, id.sha256, mode.name().to_string(), json, title)
        }
        EvalSource::Stored(stored) => {
            if o.mode.is_some() {
                return Err(TrainError::Invalid(
                    "stored SEGs have the mode the plugin ran; --mode does not apply".into(),
                ));
            }
            let client = Client::connect(&stored.connection)?;
            let version = stored.version.clone().unwrap_or_else(|| "any".into());
            let key = format!("stored {} metadata {} version {version}", client.url, stored.result_metadata);
            let json = serde_json::json!({
                "source": "orthanc",
                "orthanc": client.url,
                "result_metadata": stored.result_metadata,
                "version": stored.version,
            });
            let title = format!("SEGs stored in {} (version {version}) on sites {}", client.url, o.sites.join(","));
            let deadline = Instant::now() + stored.wait;
            (Predictor::Stored { client, o: stored, deadline }, key, "stored".to_string(), json, title)
        }
    };
    let key = EvalKey {
        model_sha256: model_key,
        mode: mode_name.clone(),
        manifest_hash: manifest_hash.clone(),
        sites: o.sites.clone(),
        max_cases_per_site: o.max_cases_per_site,
    };
    let (mut log, done) = match &o.out {
        Some(out) => {
            let (l, d) = CaseLog::open(out, &key, o.resume)?;
            (Some(l), d)
        }
        None => (None, Vec::new()),
    };
    let bar =
        if o.progress { indicatif::ProgressBar::new(cases.len() as u64) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} cases ETA {eta} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    let mut results = Vec::new();
    let (mut resumed, mut resumed_seconds) = (0, 0.0);
    for c in &cases {
        if let Some(prev) = done.iter().find(|d| d.id == c.id && d.site == c.site) {
            results.push(prev.clone());
            resumed += 1;
            resumed_seconds += prev.seconds;
            bar.inc(1);
            continue;
        }
        let t = Instant::now();
        let lc = data::load_case(c, true)?;
        let p = predictor.predict(c, &lc.volume)?;
        if let (true, Some(out)) = (o.save_masks, &o.out) {
            let path = mask_path(out, &c.id);
            std::fs::create_dir_all(path.parent().unwrap_or(out)).map_err(io_err(out))?;
            crate::nifti::write_nifti_mask(&path, &p.mask, &lc.volume)
                .map_err(|e| TrainError::Data { path: path.clone(), message: e.to_string() })?;
        }
        let dims = lc.volume.dims;
        let (od, on) = metrics::official_dice(&p.mask.data, &lc.label.data, dims);
        let ml = lc.volume.voxel_ml();
        results.push(CaseResult {
            id: c.id.clone(),
            site: c.site.clone(),
            dice: metrics::dice(&p.mask.data, &lc.label.data),
            hd95_mm: metrics::hd95(&p.mask.data, &lc.label.data, dims, lc.volume.spacing),
            official_dice: od,
            official_slices: on,
            gt_ml: lc.label.count() as f64 * ml,
            pred_ml: p.mask.count() as f64 * ml,
            seconds: t.elapsed().as_secs_f64(),
            quality: p.quality,
            flagged: p.flagged,
            encoder_runs: p.encoder_runs,
            model_version: p.model_version,
        });
        if let Some(l) = &mut log {
            l.append(results.last().unwrap())?;
        }
        bar.inc(1);
        bar.set_message(format!("{} Dice {:.3}", c.id, results.last().unwrap().dice));
    }
    bar.finish();
    let (sites, dm, dms, off) = summarise(&results, &o.sites);
    let summary = EvalSummary {
        model: model_json,
        mode: mode_name,
        data: o.data.clone(),
        manifest_hash,
        sites,
        dice_mean_cases: dm,
        dice_mean_sites: dms,
        official_dice_pooled: off,
        // Wall time of this run plus the per-case times of the cases taken over by --resume.
        seconds: t0.elapsed().as_secs_f64() + resumed_seconds,
        resumed_cases: resumed,
        cases: results,
    };
    if let Some(out) = &o.out {
        write_summary(out, &summary, &title)?;
    }
    Ok(summary)
}

pub fn write_summary(out: &Path, s: &EvalSummary, title: &str) -> Result<(), TrainError> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let p = out.join("summary.json");
    std::fs::write(&p, serde_json::to_string_pretty(s).unwrap()).map_err(io_err(&p))?;
    let p = out.join("summary.md");
    std::fs::write(&p, markdown(s, title)).map_err(io_err(&p))
}

/// Scores a training checkpoint (its `checkpoint_best`, either head) on a precomputed store of the
/// target sites with the official metric (stored foreground slices at the model's output size,
/// border zeroed at 256², patient-level Dice). For comparison tables; bypasses the engine's
/// automatic prompts (box mode only: one whole-image box per slice).
/// `mode`: how prompts are given (None: the run's training mode). Box: the whole-image box. Grid: the
/// model's n×n point grid with the engine's IoU filter, NMS and region clean-up at the output size
/// (`prompts::select_mask`), i.e. DeSAM-P's automatic mode. Cases the run trained on (its
/// `summary.json` `train_cases`, and their augmented copies) are never scored. `max_cases_per_site`:
/// score only the first N eligible cases of each site (store order), for slow modes such as grid.
pub fn evaluate_run_on_store(
    run: &Path,
    store: &Path,
    sites: &[String],
    device: Device,
    mode: Option<crate::engine::Mode>,
    max_cases_per_site: Option<usize>,
) -> Result<EvalSummary, TrainError> {
    let t0 = Instant::now();
    let cfg: super::fit::FitConfig =
        serde_json::from_slice(&std::fs::read(run.join(super::fit::CONFIG_JSON)).map_err(io_err(run))?)
            .map_err(|e| TrainError::Run { dir: run.into(), message: e.to_string() })?;
    let index = precompute::read_index(store)?;
    let train_index = precompute::read_index(&cfg.embeddings)?;
    if index.config.backbone_sha256 != train_index.config.backbone_sha256 {
        return Err(TrainError::Store {
            dir: store.into(),
            message: "built with a different encoder than the run's training store".into(),
        });
    }
    let model = super::fit::load_base_model(&train_index, device)?;
    let spec = crate::modeldir::read_spec(&train_index.config.model_dir)?;
    let mode = mode.unwrap_or(cfg.mode);
    if cfg.coupled && mode == crate::engine::Mode::Grid {
        return Err(TrainError::Invalid("the coupled baseline is scored with the box prompt only".into()));
    }
    let trained_on: Vec<String> = std::fs::read(run.join("summary.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            v["train_cases"].as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
        })
        .unwrap_or_default();
    let (p, _, _, _) = super::fit::read_checkpoint(&run.join(super::fit::BEST))?;
    let vars = model.decoder_variables();
    tch::no_grad(|| {
        for ((n, t), (pn, pt)) in vars.iter().zip(&p) {
            debug_assert_eq!(n, pn);
            t.shallow_clone().copy_(&pt.to_device(device));
        }
    });
    let mcfg = model.config().clone();
    let mut reader = ShardReader::default();
    let mut results = Vec::new();
    let side = mcfg.output_size;
    let out_side = side as usize;
    let amg = crate::engine::prompts::AmgSettings {
        iou_threshold: spec.thresholds.iou,
        nms_threshold: spec.thresholds.nms,
        min_area: spec.thresholds.min_area_px(out_side * out_side),
    };
    let grid = crate::engine::prompts::grid_points(spec.grid_points, mcfg.image_size as f64);
    let scored =
        |c: &&precompute::StoredCase| !trained_on.iter().any(|t| *t == c.id || Some(t) == c.augmented_from.as_ref());
    let limit = max_cases_per_site.unwrap_or(usize::MAX);
    let chosen = sites.iter().flat_map(|s| index.cases.iter().filter(move |c| &c.site == s).filter(scored).take(limit));
    for case in chosen {
        let t = Instant::now();
        let rows: Vec<usize> = (0..case.z.len()).filter(|&r| case.foreground[r]).collect();
        let (mut pred, mut gt) = (Vec::new(), Vec::new());
        tch::no_grad(|| -> Result<(), TrainError> {
            for &r in &rows {
                let (f, l) = precompute::read_sample(&mut reader, store, case, r, index.config.tap_count)?;
                let f = f.to_device_kind(device, Kind::Float);
                let s = mcfg.image_size as f32;
                let boxes = crate::model::PromptBatch::Boxes(Tensor::from_slice(&[0.0f32, 0.0, s, s]).view([1, 4]));
                if mode == crate::engine::Mode::Grid {
                    pred.extend(grid_mask(&model, &f, &grid, &amg, out_side)?);
                } else {
                    let logits = if cfg.coupled {
                        model.sam_mask(&f, &boxes)
                    } else {
                        let ctx = model.pimm_context(&f);
                        model.decode(&f, &ctx, &boxes).logits
                    };
                    let m = logits.gt(0.0).to_kind(Kind::Uint8).to_device(Device::Cpu).view([-1]);
                    pred.extend(Vec::<u8>::try_from(m).map_err(TrainError::Torch)?);
                }
                gt.extend(Vec::<u8>::try_from(l.view([-1])).map_err(TrainError::Torch)?);
            }
            Ok(())
        })?;
        let dims = [rows.len(), side as usize, side as usize];
        let (od, on) = metrics::official_dice(&pred, &gt, dims);
        results.push(CaseResult {
            id: case.id.clone(),
            site: case.site.clone(),
            dice: metrics::dice(&pred, &gt),
            hd95_mm: None,
            official_dice: od,
            official_slices: on,
            gt_ml: 0.0,
            pred_ml: pred.iter().filter(|&&v| v != 0).count() as f64,
            seconds: t.elapsed().as_secs_f64(),
            quality: None,
            flagged: false,
            encoder_runs: 0,
            model_version: None,
        });
    }
    if results.is_empty() {
        return Err(TrainError::Invalid(format!("the store has no case of sites {sites:?}")));
    }
    let (s, dm, dms, off) = summarise(&results, sites);
    Ok(EvalSummary {
        model: serde_json::json!({"run": run, "coupled": cfg.coupled, "mode": cfg.mode, "site": cfg.site, "excluded_training_cases": trained_on.len()}),
        mode: format!("{} (store)", mode.name()),
        data: store.to_path_buf(),
        manifest_hash: index.manifest_hash.clone(),
        sites: s,
        dice_mean_cases: dm,
        dice_mean_sites: dms,
        official_dice_pooled: off,
        seconds: t0.elapsed().as_secs_f64(),
        resumed_cases: 0,
        cases: results,
    })
}

/// DeSAM-P's automatic mode on one stored slice: every grid point as a prompt (in batches of 9),
/// then the engine's selection (IoU filter, NMS, largest region). Empty when nothing passes.
fn grid_mask(
    model: &crate::model::DeSam,
    f: &crate::model::Features,
    grid: &[[f64; 2]],
    amg: &crate::engine::prompts::AmgSettings,
    side: usize,
) -> Result<Vec<u8>, TrainError> {
    use crate::engine::prompts::{select_mask, BinMask};
    let ctx = model.pimm_context(f);
    let (mut masks, mut scores) = (Vec::new(), Vec::new());
    for chunk in grid.chunks(9) {
        let b = chunk.len() as i64;
        let flat: Vec<f32> = chunk.iter().flat_map(|p| [p[0] as f32, p[1] as f32]).collect();
        let coords = Tensor::from_slice(&flat).view([b, 1, 2]).to_device(f.neck.device());
        let labels = Tensor::ones([b, 1], (Kind::Float, f.neck.device()));
        let o = model.decode(f, &ctx, &crate::model::PromptBatch::Points { coords, labels });
        let iou: Vec<f32> =
            Vec::try_from(o.iou.to_device(Device::Cpu).to_kind(Kind::Float).view([-1])).map_err(TrainError::Torch)?;
        let logits = o.logits.to_device(Device::Cpu).to_kind(Kind::Float);
        for (i, v) in iou.iter().enumerate() {
            let l: Vec<f32> = Vec::try_from(logits.get(i as i64).view([-1])).map_err(TrainError::Torch)?;
            masks.push(BinMask::new(side, side, l.iter().map(|&x| x > 0.0).collect()));
            scores.push(*v as f64);
        }
    }
    let choice = select_mask(&masks, &scores, amg);
    Ok(match (choice.mask, choice.prompt) {
        (Some(m), _) => m.data.iter().map(|&b| b as u8).collect(),
        (None, Some(p)) => masks[p].data.iter().map(|&b| b as u8).collect(),
        (None, None) => vec![0; side * side],
    })
}

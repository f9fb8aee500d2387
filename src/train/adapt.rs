//! `desam-train adapt`: reviewed cases in Orthanc → a fine-tuned candidate of the registry's current
//! model, scored against the current one on check cases and promoted only if it passes the gate.
//! Never promotes a candidate that fails the gate, never edits pulled data or an existing version.
//!
//! One work folder holds every step's output and a stamp per finished step (`steps/<name>.json`, with
//! its result and time), so a killed run continues where it stopped and never redoes a finished step;
//! a step killed midway resumes too (pull, precompute, fit and eval are resumable by themselves).
//!
//! How cases are split into fit and check cases (seeded, deterministic; `split.json`):
//! * 1 case: resubstitution (fit and check on the same case; optimistic, said so in the report);
//! * fewer than `holdout_from` cases: k-fold (k = min(`folds`, N)): every case is a check case of
//!   exactly one fold, scored by a candidate that never saw it; if the gate passes, the candidate
//!   that is exported is fitted again on all N cases with the same schedule;
//! * otherwise one hold-out split: a quarter of the cases (at least 2) check, the rest fit, and the
//!   exported candidate is that fit.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::data::{self, SITE_CSV};
use super::eval::{self, EvalOptions, EvalSource};
use super::export::{self, ExportOptions};
use super::fit::{self, FitConfig, RunOptions, Split};
use super::loss::{IouLoss, LossWeights};
use super::precompute::{self, PrecomputeOptions, StoreIndex};
use super::pull::{self, PullOptions};
use super::{io_err, TrainError};
use crate::engine::{DeviceChoice, EngineOptions, Mode, SegmentRequest, Segmenter};
use crate::modeldir;
use crate::raster::Rgb;

/// Where each part of a run lives inside the work folder.
pub const PLAN_JSON: &str = "adapt.json";
pub const SPLIT_JSON: &str = "split.json";
pub const REPORT_JSON: &str = "report.json";
pub const REPORT_MD: &str = "report.md";
pub const OVERLAY_PNG: &str = "worst_case.png";
pub const STEPS_DIR: &str = "steps";
/// The check's encoder-feature cache (deleted once the overlay is drawn: about 10 MB per slice).
pub const FEATURE_CACHE: &str = "feature-cache";

/// When a candidate may replace the current model: its mean check Dice must beat the current model's
/// by `min_gain` (may be negative) and no check case may lose more than `max_case_drop`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    pub min_gain: f64,
    pub max_case_drop: f64,
}

/// The fine-tuning schedule (short by default: CPU minutes, not hours).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    /// Every k-th foreground slice of a fit case trains.
    pub slice_stride: usize,
    /// Slices without gland up to this many beyond the gland's ends also train (target: empty), so
    /// the fine-tuned decoder keeps stopping at the apex and base (0 in older work folders).
    #[serde(default)]
    pub background_margin: usize,
    /// Decoder parts kept fixed (`FitConfig::freeze`; empty in older work folders).
    #[serde(default)]
    pub freeze: Vec<String>,
}

/// The mid-gland slice of one check case as the current model (before) and the candidate (after)
/// segment it; the CLI draws it (the overlay renderer lives with the front doors).
pub struct WorstCase {
    pub case: String,
    pub image: Vec<f32>,
    pub truth: Vec<u8>,
    pub before: Vec<u8>,
    pub after: Vec<u8>,
    pub nx: usize,
    pub ny: usize,
    /// In-plane pixel spacing (x, y) in mm.
    pub spacing: [f64; 2],
    pub dice_before: f64,
    pub dice_after: f64,
}

pub struct AdaptOptions {
    /// Orthanc and its review mark; `out` is replaced by `WORK/data`.
    pub pull: PullOptions,
    pub registry: PathBuf,
    pub work: PathBuf,
    /// Version name of the candidate (default `<current>-adapt-<UTC time of the first run>`).
    pub version: Option<String>,
    pub gate: Gate,
    pub schedule: Schedule,
    /// k of the k-fold split used below `holdout_from` cases.
    pub folds: usize,
    pub holdout_from: usize,
    pub seed: u64,
    pub device: DeviceChoice,
    pub threads: Option<usize>,
    /// Stop (successfully) after this many steps have finished in this invocation; a rerun continues.
    pub stop_after_steps: Option<usize>,
    pub progress: bool,
    /// Draws the worst check case before and after (`None`: no PNG).
    pub render_overlay: Option<fn(&WorstCase) -> Rgb>,
}

/// What identifies a run; a rerun in the same work folder must agree (else: another work folder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptPlan {
    pub registry: PathBuf,
    pub base_version: String,
    pub candidate_version: String,
    pub orthanc: String,
    pub review_metadata: u16,
    pub reviewed_value: String,
    pub gate: Gate,
    pub schedule: Schedule,
    pub folds: usize,
    pub holdout_from: usize,
    pub seed: u64,
}

/// One fold: fitted on `fit`, scored on `check`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fold {
    pub fit: Vec<String>,
    pub check: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitPlan {
    /// `resubstitution`, `k-fold` or `holdout`.
    pub scheme: String,
    pub description: String,
    pub folds: Vec<Fold>,
    /// k-fold: the exported candidate is fitted again on these (all) cases.
    pub refit_on: Option<Vec<String>>,
}

/// One check case, scored by the current model and by the candidate that did not fit it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseRow {
    pub case: String,
    pub site: String,
    pub fold: usize,
    pub dice_before: f64,
    pub dice_after: f64,
    pub hd95_before_mm: Option<f64>,
    pub hd95_after_mm: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateResult {
    pub gate: Gate,
    pub passed: bool,
    /// Why it failed (empty when it passed).
    pub reasons: Vec<String>,
    pub mean_before: f64,
    pub mean_after: f64,
    pub gain: f64,
    /// The largest loss of Dice of one check case (negative: every case improved).
    pub worst_drop: f64,
    pub worst_drop_case: String,
    pub rows: Vec<CaseRow>,
}

/// One finished step, as stamped in `steps/<name>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: String,
    pub finished_at: String,
    pub seconds: f64,
    pub result: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdaptReport {
    pub plan: AdaptPlan,
    pub split: SplitPlan,
    pub gate: GateResult,
    pub promoted: bool,
    /// The registry's current version after the run.
    pub current_version: Option<String>,
    pub overlay_png: Option<PathBuf>,
    /// Sum of the steps' times (over every invocation that worked on this folder).
    pub seconds: f64,
    pub steps: Vec<StepRecord>,
}

/// How a call ended: the whole run, or a stop after `stop_after_steps` (rerun to continue).
#[derive(Debug)]
pub enum AdaptOutcome {
    Finished(Box<AdaptReport>),
    Stopped { finished_steps: Vec<String> },
}

/// A step that ended the call: an error, or the step limit.
enum Halt {
    Limit,
    /// Boxed: a step's `Result` stays small on the happy path.
    Fail(Box<TrainError>),
}

impl From<TrainError> for Halt {
    fn from(e: TrainError) -> Halt {
        Halt::Fail(Box::new(e))
    }
}

/// Runs steps once: a stamped step's result is read back, anything else is run and stamped.
struct Steps {
    dir: PathBuf,
    limit: Option<usize>,
    finished_now: usize,
    finished: Vec<String>,
    progress: bool,
}

impl Steps {
    fn stamp_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn run<T: Serialize + DeserializeOwned>(
        &mut self,
        name: &str,
        work: impl FnOnce() -> Result<T, TrainError>,
    ) -> Result<T, Halt> {
        let stamp = self.stamp_path(name);
        if stamp.is_file() {
            let rec: StepRecord = read_json(&stamp)?;
            let value = serde_json::from_value(rec.result)
                .map_err(|e| TrainError::Data { path: stamp.clone(), message: format!("step result: {e}") })?;
            self.finished.push(name.to_string());
            return Ok(value);
        }
        if self.limit.is_some_and(|l| self.finished_now >= l) {
            return Err(Halt::Limit);
        }
        if self.progress {
            eprintln!("adapt: {} {name} …", crate::clock::utc_now());
        }
        let t = Instant::now();
        let value = work()?;
        let rec = StepRecord {
            step: name.to_string(),
            finished_at: crate::clock::utc_now(),
            seconds: t.elapsed().as_secs_f64(),
            result: serde_json::to_value(&value).map_err(|e| TrainError::Invalid(format!("step {name}: {e}")))?,
        };
        write_json(&stamp, &rec)?;
        if self.progress {
            eprintln!("adapt: {name} done in {:.1} s", rec.seconds);
        }
        self.finished_now += 1;
        self.finished.push(name.to_string());
        Ok(value)
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, TrainError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes).map_err(|e| TrainError::Data { path: path.to_path_buf(), message: e.to_string() })
}

/// Written whole or not at all (a kill never leaves half a stamp).
fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| TrainError::Invalid(e.to_string()))?;
    write_text(path, &text)
}

fn write_text(path: &Path, text: &str) -> Result<(), TrainError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// The fit/check split of `cases` (pulled case ids), a pure function of the ids and the seed.
pub fn split_cases(cases: &[String], seed: u64, folds: usize, holdout_from: usize) -> Result<SplitPlan, TrainError> {
    if cases.is_empty() {
        return Err(TrainError::Invalid("no case to adapt to".into()));
    }
    // Seeded order by hash, so that adding a case does not reshuffle the others.
    let mut order: Vec<(Vec<u8>, String)> = cases
        .iter()
        .map(|c| {
            let mut h = Sha256::new();
            h.update(seed.to_le_bytes());
            h.update(c.as_bytes());
            (h.finalize().to_vec(), c.clone())
        })
        .collect();
    order.sort();
    let order: Vec<String> = order.into_iter().map(|(_, c)| c).collect();
    let n = order.len();
    let without = |check: &[String]| order.iter().filter(|c| !check.contains(c)).cloned().collect::<Vec<_>>();
    if n == 1 {
        return Ok(SplitPlan {
            scheme: "resubstitution".into(),
            description: "1 case: fitted and checked on the same case (optimistic; no held-out check is possible)"
                .into(),
            folds: vec![Fold { fit: order.clone(), check: order }],
            refit_on: None,
        });
    }
    if n < holdout_from.max(2) {
        let k = folds.clamp(2, n);
        let folds: Vec<Fold> = (0..k)
            .map(|j| {
                let check: Vec<String> =
                    order.iter().enumerate().filter(|(i, _)| i % k == j).map(|(_, c)| c.clone()).collect();
                Fold { fit: without(&check), check }
            })
            .collect();
        return Ok(SplitPlan {
            scheme: "k-fold".into(),
            description: format!(
                "{n} cases (< {holdout_from}): {k}-fold; each case is checked once by a candidate fitted without it; the exported candidate is fitted again on all {n}"
            ),
            folds,
            refit_on: Some(order.clone()),
        });
    }
    let n_check = (n / 4).max(2);
    let check: Vec<String> = order[..n_check].to_vec();
    Ok(SplitPlan {
        scheme: "holdout".into(),
        description: format!("{n} cases (≥ {holdout_from}): hold-out; {n_check} check, {} fit", n - n_check),
        folds: vec![Fold { fit: without(&check), check }],
        refit_on: None,
    })
}

/// The gate over the check rows.
pub fn judge(gate: Gate, rows: Vec<CaseRow>) -> GateResult {
    let n = rows.len().max(1) as f64;
    let mean_before = rows.iter().map(|r| r.dice_before).sum::<f64>() / n;
    let mean_after = rows.iter().map(|r| r.dice_after).sum::<f64>() / n;
    let gain = mean_after - mean_before;
    let (worst_drop, worst_drop_case) = rows
        .iter()
        .map(|r| (r.dice_before - r.dice_after, r.case.clone()))
        .fold((f64::NEG_INFINITY, String::new()), |a, b| if b.0 > a.0 { b } else { a });
    let mut reasons = Vec::new();
    if rows.is_empty() {
        reasons.push("no check case was scored".to_string());
    }
    if gain.is_nan() || gain < gate.min_gain {
        reasons.push(format!(
            "mean check Dice {mean_after:.4} vs current {mean_before:.4}: gain {gain:+.4} < required {:+.4} (--min-gain)",
            gate.min_gain
        ));
    }
    if worst_drop > gate.max_case_drop {
        reasons.push(format!(
            "check case {worst_drop_case} loses {worst_drop:.4} Dice > allowed {:.4} (--max-case-drop)",
            gate.max_case_drop
        ));
    }
    GateResult {
        gate,
        passed: reasons.is_empty(),
        reasons,
        mean_before,
        mean_after,
        gain,
        worst_drop,
        worst_drop_case,
        rows,
    }
}

/// Default candidate version: `<current>-adapt-<YYYYMMDDTHHMMSSZ>`.
fn default_version(base: &str) -> String {
    let t = crate::clock::UtcTime::now();
    format!("{base}-adapt-{:04}{:02}{:02}T{:02}{:02}{:02}Z", t.year, t.month, t.day, t.hour, t.minute, t.second)
}

/// Whether a rerun continues the stored plan. The Orthanc URL may differ (a restarted server on
/// another port, an https proxy): the cases are those of the first call's pull step.
fn same_run(stored: &AdaptPlan, now: &AdaptPlan) -> bool {
    let mut now = now.clone();
    now.orthanc = stored.orthanc.clone();
    *stored == now
}

/// The plan of this work folder: written by the first run, checked by every rerun.
fn settle_plan(o: &AdaptOptions) -> Result<AdaptPlan, TrainError> {
    let current = export::current_dir(&o.registry)?;
    let base_version = current.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let path = o.work.join(PLAN_JSON);
    let stored: Option<AdaptPlan> = if path.is_file() { Some(read_json(&path)?) } else { None };
    let candidate_version = o
        .version
        .clone()
        .or_else(|| stored.as_ref().map(|p| p.candidate_version.clone()))
        .unwrap_or_else(|| default_version(&base_version));
    let plan = AdaptPlan {
        registry: std::fs::canonicalize(&o.registry).map_err(io_err(&o.registry))?,
        base_version,
        candidate_version,
        orthanc: o.pull.connection.orthanc.clone(),
        review_metadata: o.pull.review_metadata,
        reviewed_value: o.pull.reviewed_value.clone(),
        gate: o.gate,
        schedule: o.schedule.clone(),
        folds: o.folds,
        holdout_from: o.holdout_from,
        seed: o.seed,
    };
    match stored {
        Some(old) if !same_run(&old, &plan) => {
            // A promotion by this very run makes the candidate current: that is its own run, not a change.
            let promoted_here = old.candidate_version == plan.base_version && {
                let mut same = old.clone();
                same.base_version = plan.base_version.clone();
                same_run(&same, &plan)
            };
            if promoted_here {
                return Ok(old);
            }
            Err(TrainError::Invalid(format!(
                "{} belongs to another adaptation (stored {old:?}, now {plan:?}); the registry's current version, the review mark, the gate, the schedule or the seed changed: use a new --work folder",
                o.work.display()
            )))
        }
        Some(old) => Ok(old),
        None => {
            if o.work.exists() && std::fs::read_dir(&o.work).map_err(io_err(&o.work))?.next().is_some() {
                return Err(TrainError::Invalid(format!(
                    "{} is not empty and holds no {PLAN_JSON}: adapt works in a new or empty folder, or continues its own",
                    o.work.display()
                )));
            }
            write_json(&path, &plan)?;
            Ok(plan)
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PullStep {
    cases: Vec<String>,
    pulled: Vec<String>,
    up_to_date: Vec<String>,
    notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FitStep {
    run: PathBuf,
    global_step: u64,
    train_slices: usize,
    seconds_per_step: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ExportStep {
    dir: PathBuf,
    version: String,
    sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CaseScore {
    case: String,
    site: String,
    dice: f64,
    hd95_mm: Option<f64>,
}

/// Runs (or continues) an adaptation in `o.work`.
pub fn adapt(o: &AdaptOptions) -> Result<AdaptOutcome, TrainError> {
    let mut steps = Steps {
        dir: o.work.join(STEPS_DIR),
        limit: o.stop_after_steps,
        finished_now: 0,
        finished: vec![],
        progress: o.progress,
    };
    match drive(o, &mut steps) {
        Ok(report) => Ok(AdaptOutcome::Finished(Box::new(report))),
        Err(Halt::Limit) => Ok(AdaptOutcome::Stopped { finished_steps: steps.finished }),
        Err(Halt::Fail(e)) => Err(*e),
    }
}

fn drive(o: &AdaptOptions, steps: &mut Steps) -> Result<AdaptReport, Halt> {
    if !(o.gate.min_gain.is_finite() && o.gate.max_case_drop.is_finite() && o.gate.max_case_drop >= 0.0) {
        return Err(TrainError::Invalid("--min-gain must be a number and --max-case-drop a number ≥ 0".into()).into());
    }
    let plan = settle_plan(o)?;
    let work = std::fs::canonicalize(&o.work).map_err(io_err(&o.work))?;
    let base_dir = plan.registry.join("versions").join(&plan.base_version);
    let data_dir = work.join("data");

    let pulled = steps.run("pull", || {
        let mut p = o.pull.clone();
        p.out = data_dir.clone();
        let r = pull::pull(&p)?;
        Ok(PullStep {
            cases: r.manifest.cases.iter().map(|c| c.case.clone()).collect(),
            pulled: r.pulled,
            up_to_date: r.up_to_date,
            notes: r.notes,
        })
    })?;
    let split = steps.run("split", || {
        let s = split_cases(&pulled.cases, plan.seed, plan.folds, plan.holdout_from)?;
        write_json(&work.join(SPLIT_JSON), &s)?;
        Ok(s)
    })?;
    if o.progress {
        eprintln!("adapt: split: {}", split.description);
    }
    let store = work.join("store");
    let cache = work.join(FEATURE_CACHE);
    steps.run("precompute", || {
        let idx = precompute::precompute(&PrecomputeOptions {
            data: data_dir.clone(),
            out: store.clone(),
            model_dir: base_dir.clone(),
            all_slices: false,
            sites: vec![],
            device: o.device,
            threads: o.threads,
            batch: 2,
            progress: o.progress,
            augment: 0,
            augment_seed: plan.seed,
            slice_stride: 1,
            background_margin: plan.schedule.background_margin,
            synth: 0,
            feature_cache: Some(cache.clone()),
        })?;
        Ok(serde_json::json!({"cases": idx.cases.len(), "slices": idx.slices, "manifest": idx.manifest_hash}))
    })?;
    let all_cases = data::list_cases(&data_dir)?;

    let mut rows = Vec::new();
    for (k, fold) in split.folds.iter().enumerate() {
        let fold_dir = work.join("folds").join(k.to_string());
        let fitted = steps.run(&format!("fold{k}-fit"), || {
            let fold_store = fold_dir.join("store");
            write_fold_store(&store, &fold_store, &fold.fit, &all_cases)?;
            run_fit(o, &plan, &fold_store, &fold_dir.join("run"))
        })?;
        let model = steps.run(&format!("fold{k}-export"), || {
            export_run(&fitted.run, &fold_dir.join("model"), &base_dir, &format!("fold{k}"), serde_json::json!({}))
        })?;
        let check_data = fold_dir.join("check-data");
        let before = steps.run(&format!("fold{k}-check-current"), || {
            link_cases(&data_dir, &check_data, &fold.check)?;
            score(o, &base_dir, &check_data, &fold_dir.join("eval-current"), &cache)
        })?;
        let after = steps.run(&format!("fold{k}-check-candidate"), || {
            link_cases(&data_dir, &check_data, &fold.check)?;
            score(o, &model.dir, &check_data, &fold_dir.join("eval-candidate"), &cache)
        })?;
        for b in &before {
            let a = after.iter().find(|a| a.case == b.case).ok_or_else(|| {
                TrainError::Invalid(format!("fold {k}: case {} was scored before but not after", b.case))
            })?;
            rows.push(CaseRow {
                case: b.case.clone(),
                site: b.site.clone(),
                fold: k,
                dice_before: b.dice,
                dice_after: a.dice,
                hd95_before_mm: b.hd95_mm,
                hd95_after_mm: a.hd95_mm,
            });
        }
    }
    rows.sort_by(|a, b| a.case.cmp(&b.case));
    let gate = steps.run("gate", || Ok(judge(plan.gate, rows)))?;
    if o.progress {
        eprintln!("adapt: gate {}", if gate.passed { "passed" } else { "failed" });
    }

    let mut promoted = false;
    if gate.passed {
        let final_run = match &split.refit_on {
            Some(_) => {
                steps
                    .run("refit-all", || {
                        run_fit(
                            o,
                            &plan,
                            &std::fs::canonicalize(&store).map_err(io_err(&store))?,
                            &work.join("final").join("run"),
                        )
                    })?
                    .run
            }
            None => work.join("folds").join("0").join("run"),
        };
        let target = plan.registry.join("versions").join(&plan.candidate_version);
        steps.run("export", || {
            let provenance = serde_json::json!({"adaptation": {
                "base_version": plan.base_version,
                "work": work,
                "split": split.scheme,
                "check_mean_dice_before": gate.mean_before,
                "check_mean_dice_after": gate.mean_after,
                "gate": plan.gate,
            }});
            export_run(&final_run, &target, &base_dir, &plan.candidate_version, provenance)
        })?;
        steps.run("promote", || {
            let c = export::promote(&plan.registry, &plan.candidate_version)?;
            Ok(serde_json::to_value(c).unwrap_or_default())
        })?;
        promoted = true;
    }

    let overlay = steps.run("overlay", || match o.render_overlay {
        Some(render) => draw_worst_case(o, &gate, &base_dir, &work, &all_cases, render).map(Some),
        None => Ok(None),
    })?;
    if cache.exists() {
        std::fs::remove_dir_all(&cache).map_err(io_err(&cache))?;
    }

    steps.run("report", || {
        let current_version = export::current_dir(&plan.registry)
            .ok()
            .and_then(|d| d.file_name().map(|s| s.to_string_lossy().into_owned()));
        let report = AdaptReport {
            plan: plan.clone(),
            split: split.clone(),
            gate: gate.clone(),
            promoted,
            current_version,
            overlay_png: overlay.clone(),
            seconds: 0.0,
            steps: vec![],
        };
        write_report(&work, report)?;
        Ok(serde_json::json!({"json": work.join(REPORT_JSON), "markdown": work.join(REPORT_MD)}))
    })?;
    // The report with every step's time, the report step's own included.
    let report: AdaptReport = read_json(&work.join(REPORT_JSON))?;
    Ok(write_report(&work, report)?)
}

/// Fills in the step records and total time, writes `report.json` and `report.md`.
fn write_report(work: &Path, mut report: AdaptReport) -> Result<AdaptReport, TrainError> {
    report.steps = read_stamps(&work.join(STEPS_DIR))?;
    report.seconds = report.steps.iter().map(|s| s.seconds).sum();
    write_json(&work.join(REPORT_JSON), &report)?;
    write_text(&work.join(REPORT_MD), &markdown(&report))?;
    Ok(report)
}

/// Every stamp in the order the steps finished.
pub fn read_stamps(dir: &Path) -> Result<Vec<StepRecord>, TrainError> {
    let mut v: Vec<StepRecord> = Vec::new();
    if dir.is_dir() {
        for e in std::fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
            if e.path().extension().is_some_and(|x| x == "json") {
                v.push(read_json(&e.path())?);
            }
        }
    }
    v.sort_by(|a, b| {
        a.finished_at.cmp(&b.finished_at).then_with(|| pipeline_rank(&a.step).cmp(&pipeline_rank(&b.step)))
    });
    Ok(v)
}

/// Where a step comes in the pipeline: steps that finish within the same second of the stamps'
/// clock (an export right after its fit) are listed in this order.
fn pipeline_rank(step: &str) -> (usize, usize) {
    const ORDER: [&str; 10] =
        ["pull", "split", "precompute", "fold", "gate", "refit-all", "export", "promote", "overlay", "report"];
    if let Some((k, part)) = step.strip_prefix("fold").and_then(|rest| rest.split_once('-')) {
        let part_rank = ["fit", "export", "check-current", "check-candidate"].iter().position(|p| *p == part);
        return (3, k.parse::<usize>().unwrap_or(usize::MAX / 8).saturating_mul(8) + part_rank.unwrap_or(7));
    }
    (ORDER.iter().position(|s| *s == step).unwrap_or(ORDER.len()), 0)
}

/// A store of some cases of `store`: the same config, an index that names only them. The shards are
/// not copied: their absolute paths go into the index (`Path::join` keeps an absolute path as is).
fn write_fold_store(store: &Path, out: &Path, ids: &[String], cases: &[data::CaseRef]) -> Result<(), TrainError> {
    let full = precompute::read_index(store)?;
    let store_abs = std::fs::canonicalize(store).map_err(io_err(store))?;
    let mut chosen = Vec::new();
    for id in ids {
        let mut c = full.cases.iter().find(|c| &c.id == id).cloned().ok_or_else(|| TrainError::Store {
            dir: store.to_path_buf(),
            message: format!("case {id} is not in the store"),
        })?;
        c.shard = store_abs.join(&c.shard).to_string_lossy().into_owned();
        chosen.push(c);
    }
    let refs: Vec<data::CaseRef> = cases.iter().filter(|c| ids.contains(&c.id)).cloned().collect();
    let slices: usize = chosen.iter().map(|c| c.z.len()).sum();
    let bytes: u64 = chosen.iter().map(|c| c.bytes).sum();
    let index = StoreIndex {
        config: full.config.clone(),
        manifest_hash: data::manifest_hash(&refs)?,
        cases: chosen,
        slices,
        bytes,
        bytes_per_slice: if slices > 0 { bytes / slices as u64 } else { 0 },
        encode_seconds: 0.0,
        slices_per_second: 0.0,
    };
    write_json(&out.join(precompute::INDEX_JSON), &index)
}

/// Fine-tunes the store's model (the registry's current one) on every case of `store`; resumes a
/// run killed midway.
fn run_fit(o: &AdaptOptions, plan: &AdaptPlan, store: &Path, run: &Path) -> Result<FitStep, TrainError> {
    let cfg = FitConfig {
        embeddings: std::fs::canonicalize(store).map_err(io_err(store))?,
        mode: Mode::Box,
        site: "ALL".into(),
        epochs: plan.schedule.epochs,
        batch: plan.schedule.batch,
        lr: plan.schedule.lr,
        loss_weights: LossWeights { dice: 1.0, bce: 1.0, iou: 1.0 },
        iou_loss: IouLoss::L1,
        seed: plan.seed,
        split: Split::All,
        coupled: false,
        slice_stride: plan.schedule.slice_stride.max(1),
        train_background: plan.schedule.background_margin > 0,
        amp: true,
        freeze: plan.schedule.freeze.clone(),
        manifest_hash: String::new(),
    };
    let has_checkpoint = run.join(fit::LATEST).is_file();
    if run.join(fit::CONFIG_JSON).is_file() && !has_checkpoint {
        // Killed before its first checkpoint: nothing to continue from.
        std::fs::remove_dir_all(run).map_err(io_err(run))?;
    }
    let s = fit::fit(
        &cfg,
        &RunOptions {
            out: run.to_path_buf(),
            resume: has_checkpoint,
            max_steps: None,
            device: Some(o.device.resolve()?),
            threads: o.threads,
            save_every: 10,
            progress: o.progress,
            skip_validation: true,
        },
    )?;
    Ok(FitStep {
        run: run.to_path_buf(),
        global_step: s.global_step,
        train_slices: s.train_slices,
        seconds_per_step: s.seconds_per_step,
    })
}

/// Exports a run's last checkpoint (the schedule is fixed; selection is the gate's job) under the
/// base model's name. A directory left by a kill after its rename is the export itself.
fn export_run(
    run: &Path,
    out: &Path,
    base_dir: &Path,
    version: &str,
    extra: serde_json::Value,
) -> Result<ExportStep, TrainError> {
    let name = modeldir::read_spec(base_dir)?.name;
    let md = match modeldir::open(out) {
        Ok(md) if md.spec.version == version => md,
        _ => export::export(&ExportOptions {
            run: run.to_path_buf(),
            out: out.to_path_buf(),
            name,
            version: version.to_string(),
            which: "latest".into(),
            extra,
        })?,
    };
    Ok(ExportStep { dir: out.to_path_buf(), version: md.spec.version.clone(), sha256: md.model_sha256() })
}

/// A DICOM data folder of some pulled cases: links to their folders plus the site table.
fn link_cases(data_dir: &Path, out: &Path, ids: &[String]) -> Result<(), TrainError> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    for id in ids {
        let link = out.join(id);
        if link.symlink_metadata().is_err() {
            let target = std::fs::canonicalize(data_dir.join(id)).map_err(io_err(&data_dir.join(id)))?;
            #[cfg(unix)]
            std::os::unix::fs::symlink(&target, &link).map_err(io_err(&link))?;
        }
    }
    let csv = data_dir.join(SITE_CSV);
    std::fs::copy(&csv, out.join(SITE_CSV)).map_err(io_err(&csv))?;
    Ok(())
}

/// Scores a model on a data folder with the real engine (`eval::evaluate`, resumable per case),
/// keeping each case's mask for the overlay. The current model and the candidates share one
/// encoder, so the work folder's feature cache runs it once per check case.
fn score(
    o: &AdaptOptions,
    model: &Path,
    data_dir: &Path,
    out: &Path,
    cache: &Path,
) -> Result<Vec<CaseScore>, TrainError> {
    let mut sites: Vec<String> = data::list_cases(data_dir)?.into_iter().map(|c| c.site).collect();
    sites.sort();
    sites.dedup();
    let s = eval::evaluate(&EvalOptions {
        source: EvalSource::Model(model.to_path_buf()),
        data: data_dir.to_path_buf(),
        sites,
        mode: None,
        device: o.device,
        threads: o.threads,
        max_cases_per_site: None,
        out: Some(out.to_path_buf()),
        resume: out.join("cases.jsonl").is_file(),
        progress: o.progress,
        cache_dir: Some(cache.to_path_buf()),
        save_masks: true,
    })?;
    Ok(s.cases.into_iter().map(|c| CaseScore { case: c.id, site: c.site, dice: c.dice, hd95_mm: c.hd95_mm }).collect())
}

/// The check case the candidate does worst on, segmented by both models, as a PNG (left: the
/// current model, right: the candidate; green: the reviewed truth, red: the prediction).
fn draw_worst_case(
    o: &AdaptOptions,
    gate: &GateResult,
    base_dir: &Path,
    work: &Path,
    cases: &[data::CaseRef],
    render: fn(&WorstCase) -> Rgb,
) -> Result<PathBuf, TrainError> {
    let row = gate
        .rows
        .iter()
        .min_by(|a, b| a.dice_after.total_cmp(&b.dice_after))
        .ok_or_else(|| TrainError::Invalid("no check case to draw".into()))?;
    let case = cases
        .iter()
        .find(|c| c.id == row.case)
        .ok_or_else(|| TrainError::Invalid(format!("case {} is not in the pulled data", row.case)))?;
    let loaded = data::load_case(case, true)?;
    // The masks the checks saved; a work folder from before they were saved segments again.
    let fold = work.join("folds").join(row.fold.to_string());
    let mask_of = |eval_dir: &str, model: &Path| -> Result<Vec<u8>, TrainError> {
        let saved = eval::mask_path(&fold.join(eval_dir), &row.case);
        if let Ok((m, _)) = crate::nifti::read_nifti_mask(&saved) {
            if m.dims == loaded.volume.dims {
                return Ok(m.data);
            }
        }
        let seg = Segmenter::from_model_dir(
            model,
            EngineOptions { device: o.device, threads: o.threads, ..Default::default() },
        )?;
        let r = seg
            .segment(&loaded.volume, &SegmentRequest::default(), &mut |_| {})
            .map_err(|e| TrainError::Model(format!("case {}: {e}", row.case)))?;
        Ok(r.mask.data)
    };
    let before = mask_of("eval-current", base_dir)?;
    let after = mask_of("eval-candidate", &fold.join("model"))?;
    let [nz, ny, nx] = loaded.volume.dims;
    let plane = ny * nx;
    // The slice with the most reviewed gland.
    let z = (0..nz)
        .max_by_key(|&z| loaded.label.data[z * plane..(z + 1) * plane].iter().filter(|&&v| v != 0).count())
        .unwrap_or(0);
    let slice = |v: &[u8]| v[z * plane..(z + 1) * plane].to_vec();
    let worst = WorstCase {
        case: row.case.clone(),
        image: loaded.volume.voxels[z * plane..(z + 1) * plane].to_vec(),
        truth: slice(&loaded.label.data),
        before: slice(&before),
        after: slice(&after),
        nx,
        ny,
        spacing: [loaded.volume.spacing[0], loaded.volume.spacing[1]],
        dice_before: row.dice_before,
        dice_after: row.dice_after,
    };
    let png = work.join(OVERLAY_PNG);
    render(&worst).write_png(&png).map_err(|e| TrainError::Invalid(format!("{}: {e}", png.display())))?;
    Ok(png)
}

/// The report as Markdown: the plan, the per-case table, the gate's verdict and the steps' times.
pub fn markdown(r: &AdaptReport) -> String {
    let g = &r.gate;
    let mut t = format!(
        "# desam-train adapt: {} → candidate {}\n\n{}\n\n**Split:** {} ({}).\n\n",
        r.plan.base_version,
        r.plan.candidate_version,
        if r.promoted {
            format!(
                "**Promoted**: the registry's current version is now {}.",
                r.current_version.as_deref().unwrap_or("?")
            )
        } else {
            format!(
                "**Not promoted**: the registry's current version stays {}. {}",
                r.current_version.as_deref().unwrap_or("?"),
                g.reasons.join("; ")
            )
        },
        r.split.scheme,
        r.split.description
    );
    t.push_str(&format!(
        "**Gate:** mean check Dice gain ≥ {:+.4} (--min-gain) and no check case losing more than {:.4} (--max-case-drop).\n\n",
        g.gate.min_gain, g.gate.max_case_drop
    ));
    let sc = &r.plan.schedule;
    t.push_str(&format!(
        "**Schedule:** {} epochs, batch {}, lr {:e}, every {} gland slice(s), {} slice(s) without gland beyond each end (--background-margin).\n\n",
        sc.epochs, sc.batch, sc.lr, sc.slice_stride.max(1), sc.background_margin
    ));
    t.push_str("| case | site | fold | Dice before (current) | Dice after (candidate) | Δ | HD95 before mm | HD95 after mm |\n|---|---|---|---|---|---|---|---|\n");
    let mm = |h: Option<f64>| h.map(|h| format!("{h:.1}")).unwrap_or_else(|| "–".into());
    for row in &g.rows {
        t.push_str(&format!(
            "| {} | {} | {} | {:.4} | {:.4} | {:+.4} | {} | {} |\n",
            row.case,
            row.site,
            row.fold,
            row.dice_before,
            row.dice_after,
            row.dice_after - row.dice_before,
            mm(row.hd95_before_mm),
            mm(row.hd95_after_mm)
        ));
    }
    t.push_str(&format!(
        "| **mean** | | | **{:.4}** | **{:.4}** | **{:+.4}** | | |\n\nWorst single-case change: {:+.4} ({}).\n\n",
        g.mean_before, g.mean_after, g.gain, -g.worst_drop, g.worst_drop_case
    ));
    if let Some(p) = &r.overlay_png {
        t.push_str(&format!(
            "Candidate's worst check case: `{}` (left: current model, right: candidate; green: reviewed SEG, red: prediction).\n\n",
            p.display()
        ));
    }
    t.push_str("| step | seconds | finished |\n|---|---|---|\n");
    for s in &r.steps {
        t.push_str(&format!("| {} | {:.1} | {} |\n", s.step, s.seconds, s.finished_at));
    }
    t.push_str(&format!("| **total** | **{:.1}** | |\n", r.seconds));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stamps finished within one second (the stamps' clock) are listed in pipeline order.
    #[test]
    fn steps_of_one_second_keep_the_pipeline_order() {
        let mut v = ["refit-all", "promote", "export", "fold1-export", "fold1-fit", "fold10-fit", "fold2-fit", "gate"];
        v.sort_by_key(|s| pipeline_rank(s));
        assert_eq!(
            v,
            ["fold1-fit", "fold1-export", "fold2-fit", "fold10-fit", "gate", "refit-all", "export", "promote"]
        );
    }

    fn ids(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("case_{i:03}")).collect()
    }

    #[test]
    fn splits_are_deterministic_and_check_every_case_once() {
        let one = split_cases(&ids(1), 0, 2, 8).unwrap();
        assert_eq!((one.scheme.as_str(), one.folds[0].fit.clone()), ("resubstitution", one.folds[0].check.clone()));
        let five = split_cases(&ids(5), 7, 2, 8).unwrap();
        assert_eq!(five, split_cases(&ids(5), 7, 2, 8).unwrap());
        assert_eq!(five.scheme, "k-fold");
        assert_eq!(five.folds.len(), 2);
        let mut checked: Vec<String> = five.folds.iter().flat_map(|f| f.check.clone()).collect();
        checked.sort();
        assert_eq!(checked, ids(5), "every case is checked exactly once");
        for f in &five.folds {
            assert!(f.fit.iter().all(|c| !f.check.contains(c)), "a fold never checks what it fitted");
        }
        assert_eq!(five.refit_on.as_ref().map(Vec::len), Some(5));
        let twelve = split_cases(&ids(12), 7, 2, 8).unwrap();
        assert_eq!((twelve.scheme.as_str(), twelve.folds[0].check.len(), twelve.folds[0].fit.len()), ("holdout", 3, 9));
        assert!(split_cases(&[], 0, 2, 8).is_err());
    }

    #[test]
    fn a_rerun_may_reach_orthanc_at_another_url_but_not_change_the_gate() {
        let plan = AdaptPlan {
            registry: "/reg".into(),
            base_version: "0.3.0".into(),
            candidate_version: "0.3.0-adapt".into(),
            orthanc: "http://127.0.0.1:8042".into(),
            review_metadata: 4302,
            reviewed_value: "reviewed".into(),
            gate: Gate { min_gain: 0.01, max_case_drop: 0.05 },
            schedule: Schedule { epochs: 4, batch: 8, lr: 2e-4, slice_stride: 1, background_margin: 3, freeze: vec![] },
            folds: 2,
            holdout_from: 8,
            seed: 0,
        };
        let moved = AdaptPlan { orthanc: "https://pacs:443".into(), ..plan.clone() };
        assert!(same_run(&plan, &moved));
        let stricter = AdaptPlan { gate: Gate { min_gain: 0.02, max_case_drop: 0.05 }, ..plan.clone() };
        assert!(!same_run(&plan, &stricter));
    }

    fn row(case: &str, before: f64, after: f64) -> CaseRow {
        CaseRow {
            case: case.into(),
            site: "E".into(),
            fold: 0,
            dice_before: before,
            dice_after: after,
            hd95_before_mm: None,
            hd95_after_mm: None,
        }
    }

    #[test]
    fn the_gate_needs_a_gain_and_no_large_case_drop() {
        let gate = Gate { min_gain: 0.01, max_case_drop: 0.05 };
        let ok = judge(gate, vec![row("a", 0.70, 0.90), row("b", 0.80, 0.78)]);
        assert!(ok.passed, "{:?}", ok.reasons);
        assert!((ok.gain - 0.09).abs() < 1e-9 && (ok.worst_drop - 0.02).abs() < 1e-9);
        let drop = judge(gate, vec![row("a", 0.50, 0.95), row("b", 0.90, 0.80)]);
        assert!(!drop.passed && drop.reasons.iter().any(|r| r.contains("case b")), "{:?}", drop.reasons);
        let flat = judge(gate, vec![row("a", 0.8, 0.805)]);
        assert!(!flat.passed && flat.reasons[0].contains("--min-gain"), "{:?}", flat.reasons);
        assert!(!judge(gate, vec![]).passed);
    }
}

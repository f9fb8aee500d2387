//! The plugin's segmentation worker (`SegmentationWorker`): its queue and its thread, which reads
//! Orthanc's /changes log from a persisted cursor, applies the series rules and the exactly-once checks,
//! and runs each series as an Orthanc job. It is the only place that calls the REST API for processing;
//! the change callback merely wakes it.

use serde_json::{json, Value};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::bridge::{Orthanc, OrthancCallError};
use super::claims::{self, ClaimError, Lease};
use super::config::{CompiledFilter, EmptyResult, ModeChoice, PluginConfig, Role};
use super::jobs::{self, JobShared, Phase};
use super::metadata::{self, ResultRecord};
use super::metrics::Metrics;
use super::pipeline::{ModelIdentity, ProcessError, ProcessRequest, ReloadOutcome, ReloadReport, SeriesProcessor};
use super::selection::{self, SeriesFacts};

/// How often the worker looks at /changes without being woken (a safety net; StableSeries wakes it).
const POLL_INTERVAL: Duration = Duration::from_secs(5);
const CHANGES_PAGE: usize = 500;

pub enum WorkItem {
    /// From the /changes log (automatic trigger or start-up catch-up).
    Change { series_id: String, seq: i64 },
    /// `POST /desam/series/{id}/segment`; `mode` None: the configured one. `job`: the Orthanc job
    /// submitted (and paused) when the request was queued, None if the jobs engine refused it.
    Manual { series_id: String, mode: Option<ModeChoice>, force: bool, job: Option<Arc<JobShared>> },
    /// A failed or canceled job resubmitted from /jobs.
    Resume(Arc<JobShared>),
    /// A series another node had claimed, looked at again once that claim could have expired.
    Recheck { series_id: String },
}

impl WorkItem {
    fn series_id(&self) -> &str {
        match self {
            WorkItem::Change { series_id, .. }
            | WorkItem::Manual { series_id, .. }
            | WorkItem::Recheck { series_id } => series_id,
            WorkItem::Resume(job) => &job.series_id,
        }
    }
}

#[derive(Default)]
struct State {
    manual: VecDeque<WorkItem>,
    changes: VecDeque<(String, i64)>,
    queued: HashSet<String>,
    running: Option<String>,
    /// Orthanc ids of the running series, its study and its patient, and the running job: a
    /// deletion of any of them cancels the run (it then ends as a skip).
    running_ids: Vec<String>,
    running_job: Option<Arc<JobShared>>,
    /// Series skipped because another node held a live claim, with the Unix time to look again.
    deferred: Vec<(String, i64)>,
    /// Series this node holds a claim on right now.
    held: Vec<String>,
    /// Last /changes sequence number read (everything up to it is queued or needs nothing).
    scanned: i64,
    /// Last sequence number persisted in the global property.
    persisted: i64,
    /// Last sequence number that existed at start-up; changes up to it are catch-up.
    horizon: i64,
    woken: bool,
    ready: bool,
}

impl State {
    fn len(&self) -> usize {
        self.manual.len() + self.changes.len()
    }
}

/// Removes a series from the node's claims list when dropped (every exit of `process_series`).
struct Unlist<'a>(&'a SegmentationWorker, String);

impl Drop for Unlist<'_> {
    fn drop(&mut self) {
        self.0.unlist(&self.1);
    }
}

const VANISHED: &str = "the series was deleted while it was being segmented";

/// Ends a job that turned out to need no work (a vanished series, a lost claim): done, with why.
fn skip_job(job: &JobShared, why: &str) -> Outcome {
    job.set_detail("Skipped", json!(why));
    job.set_phase(Phase::Done);
    Outcome::Skipped(if why == VANISHED { format!("{why}; no SEG stored") } else { why.to_string() })
}

/// Logs what a model reload did: a new model in service is a warning (an operator wants to see it
/// in the log), a refused one an error with its reason.
pub fn log_reload(report: &ReloadReport) {
    let name = |m: &ModelIdentity| format!("{} {} (sha256 {})", m.name, m.version, &m.sha256[..16.min(m.sha256.len())]);
    match report.outcome {
        ReloadOutcome::Reloaded => Orthanc::log_warning(&format!(
            "DeSAM: model reloaded: {} now serves (was {}), from {}",
            name(&report.serving),
            report.previous.as_ref().map(name).unwrap_or_default(),
            report.candidate
        )),
        ReloadOutcome::Refused => Orthanc::log_error(&format!(
            "DeSAM: model reload refused: {}: {}; {} keeps serving",
            report.candidate,
            report.reason.as_deref().unwrap_or("unknown reason"),
            name(&report.serving)
        )),
        ReloadOutcome::Unchanged => {
            Orthanc::log_info(&format!("DeSAM: model unchanged: {} serves", name(&report.serving)))
        }
    }
}

/// Outcome of one series, for logs and tests.
#[derive(Debug)]
enum Outcome {
    Skipped(String),
    Done,
    Failed(String),
    Canceled,
}

/// What `enqueue_manual` answers: the queue length and the Orthanc job that will run the request.
pub struct ManualRequestQueued {
    pub queue_length: usize,
    /// Orthanc's job id (follow or cancel it through `/jobs/{id}`); None if the jobs engine refused it.
    pub job_id: Option<String>,
}

/// Orthanc's state of a job ("Pending", "Running", "Paused", "Success", "Failure", ...), None if unknown.
fn orthanc_job_state(job_id: &str) -> Option<String> {
    Orthanc::get_json(&format!("/jobs/{job_id}")).ok().and_then(|v| v["State"].as_str().map(String::from))
}

/// Resumes a job the plugin paused while it waited in the queue. A pause asked for while the job was
/// running only takes effect after its current step, so "Running" is waited out briefly.
fn resume_paused_job(job_id: &str) {
    for _ in 0..40 {
        match orthanc_job_state(job_id).as_deref() {
            Some("Paused") => {
                if Orthanc::post(&format!("/jobs/{job_id}/resume"), b"").is_ok() {
                    return;
                }
            }
            Some("Running") => {}
            _ => return,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (a few seconds at most) until a pause asked of a job Orthanc had already started has landed.
/// Orthanc applies a pause between two steps and, when a cancel is scheduled too, the pause wins and
/// the cancel is forgotten: a client that cancels the job ID we return must find it paused, not running.
fn wait_while_running(job_id: &str) {
    for _ in 0..150 {
        if orthanc_job_state(job_id).as_deref() != Some("Running") {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The node's segmentation worker: configuration, model, counters, queue and worker thread. One per
/// plugin, created at start-up when the configuration is valid (`state` holds it).
pub struct SegmentationWorker {
    pub config: PluginConfig,
    filter: CompiledFilter,
    pub processor: Box<dyn SeriesProcessor>,
    pub metrics: Metrics,
    state: Mutex<State>,
    wake: Condvar,
    pub shutdown: AtomicBool,
    worker: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("{0}")]
    Process(#[from] ProcessError),
    #[error("{0}")]
    Orthanc(#[from] OrthancCallError),
    #[error("{0}")]
    Other(String),
    /// The source series disappeared (deleted) while it was being processed.
    #[error("the series was deleted while it was being segmented")]
    Vanished,
}

impl SegmentationWorker {
    pub fn new(config: PluginConfig, processor: Box<dyn SeriesProcessor>) -> Result<Arc<SegmentationWorker>, String> {
        let filter = config.compiled_filter().map_err(|e| e.to_string())?;
        Ok(Arc::new(SegmentationWorker {
            config,
            filter,
            processor,
            metrics: Metrics::default(),
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            worker: Mutex::new(None),
        }))
    }

    /// Called on OrthancStarted: the REST API is usable from now on.
    pub fn start(self: &Arc<Self>) {
        let mut slot = self.worker.lock().unwrap();
        if slot.is_some() {
            return;
        }
        let me = self.clone();
        let weak = Arc::downgrade(self);
        jobs::set_resubmit_hook(Some(Box::new(move |job| {
            if let Some(p) = weak.upgrade() {
                p.push_front(WorkItem::Resume(job));
            }
        })));
        match std::thread::Builder::new().name("desam-worker".into()).spawn(move || me.run()) {
            Ok(h) => *slot = Some(h),
            Err(e) => Orthanc::log_error(&format!("DeSAM: cannot start the worker thread: {e}")),
        }
        self.metrics.publish();
    }

    /// Called on OrthancStopped and from Finalize: cancel the running series, stop taking new work.
    pub fn signal_shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        for job in jobs::live_jobs() {
            job.cancel.store(true, Ordering::SeqCst);
        }
        self.wake.notify_all();
    }

    /// Joins the worker (Finalize).
    pub fn join(&self) {
        self.signal_shutdown();
        jobs::set_resubmit_hook(None);
        if let Some(h) = self.worker.lock().unwrap().take() {
            let _ = h.join();
        }
    }

    /// The change callback for a deleted resource: if it is the running series, its study or its
    /// patient, cancel the run (no REST call here; the worker confirms and records a skip).
    pub fn resource_deleted(&self, resource_id: &str) {
        let st = self.state.lock().unwrap();
        if st.running_ids.iter().any(|id| id == resource_id) {
            if let Some(job) = &st.running_job {
                job.cancel.store(true, Ordering::SeqCst);
            }
        }
    }

    /// The change callback: StableSeries only wakes the worker (no REST call in the callback).
    pub fn wake_up(&self) {
        self.state.lock().unwrap().woken = true;
        self.wake.notify_all();
    }

    fn push_front(&self, item: WorkItem) {
        let mut st = self.state.lock().unwrap();
        st.manual.push_front(item);
        self.metrics.set_queue_length(st.len());
        self.wake.notify_all();
    }

    /// Queues a manual request as an Orthanc job (paused until its turn, see `JobShared::paused_in_queue`);
    /// Err when the queue is full or this is an ingest node.
    pub fn enqueue_manual(
        &self,
        series_id: &str,
        mode: Option<ModeChoice>,
        force: bool,
    ) -> Result<ManualRequestQueued, String> {
        if self.config.role == Role::Ingest {
            return Err(format!(
                "node {} is an ingest node (\"Role\": \"ingest\"): send the request to a worker node",
                self.config.node()
            ));
        }
        let queue_full = |n: usize| format!("the queue is full ({n} series waiting)");
        let waiting = self.state.lock().unwrap().len();
        if waiting >= self.config.max_queue_length {
            return Err(queue_full(waiting));
        }
        let job = JobShared::new(series_id, mode.unwrap_or(self.config.mode), force);
        job.set_detail("Queued", json!(true));
        let job_id = match Orthanc::submit_job(job.handle, jobs::JOB_TYPE, self.config.job_priority) {
            Ok(id) => {
                *job.orthanc_id.lock().unwrap() = Some(id.clone());
                job.paused_in_queue.store(true, Ordering::SeqCst);
                if let Err(e) = Orthanc::post(&format!("/jobs/{id}/pause"), b"") {
                    Orthanc::log_warning(&format!("DeSAM: cannot pause queued job {id} ({e}); it holds a job slot"));
                } else {
                    wait_while_running(&id);
                }
                Some(id)
            }
            Err(e) => {
                // The worker submits one itself when the request's turn comes.
                Orthanc::log_warning(&format!("DeSAM: cannot submit a job for series {series_id} now ({e})"));
                jobs::finalize(job.handle);
                None
            }
        };
        let mut st = self.state.lock().unwrap();
        if st.len() >= self.config.max_queue_length {
            drop(st);
            // Filled up by concurrent requests meanwhile: take the job back.
            if let Some(id) = &job_id {
                job.set_phase(jobs::Phase::Canceled);
                let _ = Orthanc::post(&format!("/jobs/{id}/cancel"), b"");
            }
            return Err(queue_full(self.config.max_queue_length));
        }
        let job = job_id.as_ref().map(|_| job);
        st.manual.push_back(WorkItem::Manual { series_id: series_id.to_string(), mode, force, job });
        let n = st.len();
        self.metrics.set_queue_length(n);
        self.wake.notify_all();
        Ok(ManualRequestQueued { queue_length: n, job_id })
    }

    pub fn queue_json(&self) -> Value {
        let st = self.state.lock().unwrap();
        let waiting: Vec<&str> =
            st.manual.iter().map(|i| i.series_id()).chain(st.changes.iter().map(|(s, _)| s.as_str())).collect();
        json!({
            "Length": st.len(),
            "Max": self.config.max_queue_length,
            "Running": st.running,
            "Waiting": waiting,
            "Cursor": st.persisted,
        })
    }

    /// This node in the cluster: id, role, where its cursor lives, the claims it holds now.
    pub fn node_json(&self) -> Value {
        let st = self.state.lock().unwrap();
        json!({
            "Id": self.config.node(),
            "Role": self.config.role,
            "CursorProperty": self.config.node_cursor_property(),
            "LeaseSeconds": self.config.lease_seconds,
            "CheckRevisions": self.config.check_revisions,
            "Claims": st.held,
            "Deferred": st.deferred.iter().map(|(s, t)| json!({"Series": s, "RecheckAt": t})).collect::<Vec<_>>(),
        })
    }

    pub fn is_queued_or_running(&self, series_id: &str) -> (bool, bool) {
        let st = self.state.lock().unwrap();
        let queued = st.queued.contains(series_id) || st.manual.iter().any(|i| i.series_id() == series_id);
        (queued, st.running.as_deref() == Some(series_id))
    }

    fn run(self: Arc<Self>) {
        if self.config.role == Role::Ingest {
            Orthanc::log_warning(&format!(
                "DeSAM: node {} is an ingest node: it claims and segments nothing",
                self.config.node()
            ));
        } else if self.config.stable_series_trigger {
            if let Err(e) = self.init_cursor() {
                Orthanc::log_error(&format!(
                    "DeSAM: cannot read the change log ({e}); automatic processing is off until restart"
                ));
            }
        }
        while !self.shutdown.load(Ordering::SeqCst) {
            let item = {
                let mut st = self.state.lock().unwrap();
                let next = st
                    .manual
                    .pop_front()
                    .or_else(|| st.changes.pop_front().map(|(series_id, seq)| WorkItem::Change { series_id, seq }));
                if let Some(item) = &next {
                    if let WorkItem::Change { series_id, .. } = item {
                        st.queued.remove(series_id.as_str());
                    }
                    st.running = Some(item.series_id().to_string());
                    self.metrics.set_queue_length(st.len());
                }
                next
            };
            match item {
                Some(item) => {
                    self.handle(item);
                    self.state.lock().unwrap().running = None;
                    if self.shutdown.load(Ordering::SeqCst) {
                        // Interrupted by the shutdown: keep the cursor before this series so that
                        // the next start-up runs it again.
                        break;
                    }
                    self.persist_cursor();
                }
                None => {
                    if self.requeue_deferred() {
                        continue;
                    }
                    let scan = {
                        let st = self.state.lock().unwrap();
                        st.ready && self.config.stable_series_trigger && self.config.role == Role::Worker
                    };
                    if scan {
                        match self.scan_changes() {
                            Ok(true) => continue,
                            Ok(false) => {}
                            Err(e) => Orthanc::log_warning(&format!("DeSAM: reading /changes failed: {e}")),
                        }
                        self.persist_cursor();
                    }
                    let st = self.state.lock().unwrap();
                    if !st.woken && st.manual.is_empty() && !self.shutdown.load(Ordering::SeqCst) {
                        let (mut st, _) = self.wake.wait_timeout(st, POLL_INTERVAL).unwrap();
                        st.woken = false;
                    } else {
                        drop(st);
                        self.state.lock().unwrap().woken = false;
                    }
                }
            }
        }
        Orthanc::log_info("DeSAM: worker stopped");
    }

    /// Moves deferred series whose foreign claim may have expired back into the queue.
    fn requeue_deferred(&self) -> bool {
        let now = claims::unix_now();
        let mut st = self.state.lock().unwrap();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut st.deferred).into_iter().partition(|(_, t)| *t <= now);
        st.deferred = later;
        let any = !due.is_empty();
        for (series_id, _) in due {
            st.manual.push_back(WorkItem::Recheck { series_id });
        }
        any
    }

    /// Reads the stored cursor and the current end of the change log. Changes after the cursor and
    /// up to that end are "catch-up": they include series whose StableSeries never fired here.
    fn init_cursor(&self) -> Result<(), OrthancCallError> {
        let last = Orthanc::get_json("/changes?last")?.get("Last").and_then(Value::as_i64).unwrap_or(0);
        let property = self.config.node_cursor_property();
        let mut stored = Orthanc::global_property(property, "")?;
        if stored.trim().is_empty() && property != self.config.cursor_property {
            // A node that gets its own cursor for the first time starts where the shared one was.
            stored = Orthanc::global_property(self.config.cursor_property, "")?;
        }
        let cursor = match stored.split_whitespace().next().unwrap_or("").parse::<i64>() {
            Ok(c) if c <= last => c,
            Ok(c) => {
                Orthanc::log_warning(&format!(
                    "DeSAM: stored change cursor {c} is past the log's end {last}; starting from {last}"
                ));
                last
            }
            Err(_) => {
                Orthanc::log_warning(&format!(
                    "DeSAM: first start with this database: existing series are not back-filled (change cursor set to {last}); use POST /desam/series/{{id}}/segment for older series"
                ));
                last
            }
        };
        {
            let mut st = self.state.lock().unwrap();
            st.scanned = cursor;
            st.persisted = i64::MIN;
            st.horizon = if self.config.catch_up { last } else { cursor };
            st.ready = true;
        }
        if self.config.catch_up && cursor < last {
            Orthanc::log_warning(&format!(
                "DeSAM: catching up on changes {}..{} that happened while the plugin was not running",
                cursor + 1,
                last
            ));
        }
        self.persist_cursor();
        Ok(())
    }

    /// Queues candidate series from /changes. Ok(true) if something was queued.
    fn scan_changes(&self) -> Result<bool, OrthancCallError> {
        let mut queued_any = false;
        loop {
            let (since, room) = {
                let st = self.state.lock().unwrap();
                (st.scanned, self.config.max_queue_length.saturating_sub(st.len()))
            };
            if room == 0 || self.shutdown.load(Ordering::SeqCst) {
                return Ok(queued_any);
            }
            let page = Orthanc::get_json(&format!("/changes?since={since}&limit={CHANGES_PAGE}"))?;
            let changes = page.get("Changes").and_then(Value::as_array).cloned().unwrap_or_default();
            let done = page.get("Done").and_then(Value::as_bool).unwrap_or(true);
            let mut st = self.state.lock().unwrap();
            for c in &changes {
                let seq = c.get("Seq").and_then(Value::as_i64).unwrap_or(st.scanned);
                let kind = c.get("ChangeType").and_then(Value::as_str).unwrap_or("");
                let id = c.get("ID").and_then(Value::as_str).unwrap_or("").to_string();
                let candidate = kind == "StableSeries" || (kind == "NewSeries" && seq <= st.horizon);
                if candidate && !st.queued.contains(&id) {
                    if st.len() >= self.config.max_queue_length {
                        // Back-pressure: stop here; this change is read again once there is room.
                        self.metrics.set_queue_length(st.len());
                        return Ok(queued_any);
                    }
                    st.queued.insert(id.clone());
                    st.changes.push_back((id, seq));
                    queued_any = true;
                }
                st.scanned = st.scanned.max(seq);
            }
            self.metrics.set_queue_length(st.len());
            if done || changes.is_empty() {
                return Ok(queued_any);
            }
        }
    }

    /// Everything before the first still-queued change is handled: persist that point.
    fn persist_cursor(&self) {
        let value = {
            let st = self.state.lock().unwrap();
            if !st.ready {
                return;
            }
            let upto = match st.changes.front() {
                Some((_, seq)) => seq - 1,
                None if st.running.is_some() => return,
                None => st.scanned,
            };
            if upto == st.persisted {
                return;
            }
            upto
        };
        match Orthanc::set_global_property(self.config.node_cursor_property(), &value.to_string()) {
            Ok(()) => self.state.lock().unwrap().persisted = value,
            Err(e) => Orthanc::log_warning(&format!("DeSAM: cannot store the change cursor: {e}")),
        }
    }

    fn handle(&self, item: WorkItem) {
        let (series_id, mode, force, job, manual) = match item {
            WorkItem::Change { series_id, .. } | WorkItem::Recheck { series_id } => {
                (series_id, None, false, None, false)
            }
            WorkItem::Manual { series_id, mode, force, job } => (series_id, mode, force, job, true),
            WorkItem::Resume(job) => (job.series_id.clone(), Some(job.mode), true, Some(job), true),
        };
        let submitted_job = job.clone();
        // Allocator tuning for inference, confined to this series (restored when `memory` drops).
        let memory = crate::runtime::InferenceMemory::begin();
        // The panic boundary of one unit of work: whatever goes wrong in it, the worker goes on.
        let outcome = match crate::guard::catch(|| self.process_series(&series_id, mode, force, manual, job)) {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => Outcome::Failed(e.to_string()),
            Err(panic) => {
                self.metrics.record_panic();
                Outcome::Failed(format!("internal error (caught): {panic}"))
            }
        };
        // The engine's buffers stay in the heap during a series (crate::runtime); give them back.
        drop(memory);
        if let Some(job) = submitted_job {
            self.settle_job(&job, &outcome);
        }
        {
            let mut st = self.state.lock().unwrap();
            st.running_ids.clear();
            st.running_job = None;
        }
        match &outcome {
            Outcome::Skipped(reason) => {
                self.metrics.record_skip();
                Orthanc::log_warning(&format!("DeSAM: series {series_id} skipped: {reason}"));
            }
            Outcome::Failed(msg) if self.shutdown.load(Ordering::SeqCst) => {
                Orthanc::log_warning(&format!(
                    "DeSAM: series {series_id} interrupted by the shutdown ({msg}); it runs again at the next start"
                ));
            }
            Outcome::Failed(msg) => {
                self.metrics.record_failure();
                Orthanc::log_error(&format!("DeSAM: series {series_id} failed: {msg}"));
            }
            Outcome::Canceled if self.shutdown.load(Ordering::SeqCst) => Orthanc::log_warning(&format!(
                "DeSAM: series {series_id} interrupted by the shutdown; it runs again at the next start"
            )),
            Outcome::Canceled => Orthanc::log_warning(&format!("DeSAM: series {series_id}: job canceled")),
            Outcome::Done => {}
        }
    }

    /// A job submitted before the run (manual request, resubmission) that ended before it started
    /// (a skip, a cancel while queued, an error in the checks) is given its end here, and resumed if
    /// the plugin still holds it paused, so that Orthanc shows how it ended instead of "Paused".
    fn settle_job(&self, job: &JobShared, outcome: &Outcome) {
        if !job.is_finished() {
            match outcome {
                Outcome::Skipped(why) => {
                    job.set_detail("Skipped", json!(why));
                    job.set_phase(Phase::Done);
                }
                Outcome::Done => job.set_phase(Phase::Done),
                Outcome::Failed(msg) => job.set_phase(Phase::Failed(msg.clone())),
                Outcome::Canceled => job.set_phase(Phase::Canceled),
            }
        }
        job.set_detail("Queued", json!(false));
        job.attached.store(false, Ordering::SeqCst);
        if job.paused_in_queue.swap(false, Ordering::SeqCst) {
            if let Some(id) = job.orthanc_id.lock().unwrap().clone() {
                resume_paused_job(&id);
            }
        }
    }

    fn read_record(&self, series_id: &str) -> Option<ResultRecord> {
        let bytes = Orthanc::get(&format!("/series/{series_id}/metadata/{}", self.config.result_metadata)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Writes the record (and the review flag) revision-safely: with Orthanc's `CheckRevisions` on,
    /// an existing entry is replaced at its current revision.
    fn write_record(&self, series_id: &str, record: &ResultRecord) -> Result<(), OrthancCallError> {
        let body = serde_json::to_vec(record).unwrap_or_default();
        claims::put_metadata(&format!("/series/{series_id}/metadata/{}", self.config.result_metadata), &body)?;
        let review: &[u8] = if record.needs_review { b"needs-review" } else { b"ok" };
        if record.status != "failed" {
            claims::put_metadata(&format!("/series/{series_id}/metadata/{}", self.config.review_metadata), review)?;
        }
        Ok(())
    }

    /// An existing SEG from this model over exactly this content, searched by StudyInstanceUID across
    /// the whole archive (a SEG whose patient attributes differ may sit under another Orthanc study).
    fn find_existing_seg(
        &self,
        study_uid: &str,
        series_uid: &str,
        model: &ModelIdentity,
        hash: &str,
    ) -> Result<Option<metadata::ExistingSeg>, OrthancCallError> {
        let query =
            json!({"Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": "SEG"}, "Expand": true});
        let series_list: Value = serde_json::from_slice(&Orthanc::post("/tools/find", query.to_string().as_bytes())?)
            .map_err(|e| OrthancCallError::bridge("/tools/find", e.to_string()))?;
        for s in series_list.as_array().into_iter().flatten() {
            let main = &s["MainDicomTags"];
            let modality = main["Modality"].as_str().unwrap_or("");
            let manufacturer = main["Manufacturer"].as_str().unwrap_or("");
            if !modality.eq_ignore_ascii_case("SEG") || !manufacturer.eq_ignore_ascii_case(selection::OUR_MANUFACTURER)
            {
                continue;
            }
            for inst in s["Instances"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                let tags = Orthanc::get_json(&format!("/instances/{inst}/simplified-tags"))?;
                if let Some(uid) = metadata::matching_seg(&tags, series_uid, &model.seg_version(), hash) {
                    return Ok(Some(metadata::ExistingSeg::from_tags(uid, inst, &tags)));
                }
            }
        }
        Ok(None)
    }

    fn process_series(
        &self,
        series_id: &str,
        mode: Option<ModeChoice>,
        force: bool,
        manual: bool,
        job: Option<Arc<JobShared>>,
    ) -> Result<Outcome, RunError> {
        let mode = mode.unwrap_or(self.config.mode);
        // Canceled through Orthanc's /jobs while it waited in the queue: Orthanc never calls `stop`
        // for a job that is not running, so its state is read here.
        let orthanc_job = job.as_ref().and_then(|j| j.orthanc_id.lock().unwrap().clone());
        if orthanc_job.as_deref().and_then(orthanc_job_state).as_deref() == Some("Failure") {
            return Ok(Outcome::Canceled);
        }
        let series = match Orthanc::get_json(&format!("/series/{series_id}")) {
            Ok(s) => s,
            Err(e) if e.is_not_found() => return Ok(Outcome::Skipped("the series no longer exists".into())),
            Err(e) => return Err(e.into()),
        };
        let instance_ids: Vec<String> =
            series["Instances"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect();
        let Some(first) = instance_ids.first() else {
            return Ok(Outcome::Skipped("the series has no instances".into()));
        };
        let study_id = series["ParentStudy"].as_str().unwrap_or("").to_string();
        let patient_id = Orthanc::get_json(&format!("/studies/{study_id}"))
            .ok()
            .and_then(|s| s["ParentPatient"].as_str().map(String::from));
        {
            let mut st = self.state.lock().unwrap();
            st.running_ids =
                [Some(series_id.to_string()), Some(study_id.clone()), patient_id].into_iter().flatten().collect();
        }
        let tags = Orthanc::get_json(&format!("/instances/{first}/simplified-tags"))
            .map_err(|e| self.vanished_or(series_id, e))?;
        let meta = Orthanc::get_json(&format!("/instances/{first}/metadata?expand"))
            .map_err(|e| self.vanished_or(series_id, e))?;
        let facts = SeriesFacts::from_orthanc(&series, &tags, &meta);
        if let Some(reason) = selection::hard_rules(&facts, &self.config.series_description) {
            return Ok(Outcome::Skipped(reason));
        }
        if !manual {
            if let Some(reason) = selection::series_rules(&facts, &self.filter) {
                return Ok(Outcome::Skipped(reason));
            }
        }

        // The model check of each job (docs/adaptation.md): a new current version serves from this
        // job on; a job already running keeps the model it started with.
        if let Some(report) = self.processor.refresh() {
            log_reload(&report);
        }
        let model = self.processor.identity()?;
        let listing = Orthanc::get_json(&format!("/series/{series_id}/instances"))?;
        let uids: Vec<String> = listing
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["MainDicomTags"]["SOPInstanceUID"].as_str().map(String::from))
            .collect();
        let hash = metadata::content_hash(&uids);
        let series_uid = series["MainDicomTags"]["SeriesInstanceUID"].as_str().unwrap_or("").to_string();
        let study_uid = tags["StudyInstanceUID"].as_str().unwrap_or("").to_string();

        if !force {
            if let Some(rec) = self.read_record(series_id) {
                if rec.covers(&model.sha256, &hash) {
                    return Ok(Outcome::Skipped(format!(
                        "already segmented by {} {} (SEG {})",
                        rec.model_name,
                        rec.model_version,
                        rec.seg_sop_instance_uid.as_deref().unwrap_or("none: empty result")
                    )));
                }
            }
        }
        // Cluster: one worker per series. A live claim of another node defers the series; ours (a
        // restart with the same node id) or an expired one is taken; the claim is renewed while we work.
        let claim = match claims::claim(
            series_id,
            self.config.claim_metadata,
            &self.config.node(),
            &model.seg_version(),
            self.config.lease_seconds,
        ) {
            Ok((held, previous)) => {
                if let Some(p) = previous {
                    Orthanc::log_warning(&format!(
                        "DeSAM: series {series_id}: taking over the expired claim of node {p}"
                    ));
                }
                held
            }
            Err(ClaimError::HeldBy { node, expires }) => {
                self.state.lock().unwrap().deferred.push((series_id.to_string(), expires + 1));
                return Ok(Outcome::Skipped(format!("claimed by node {node} (looked at again when its lease ends)")));
            }
            Err(ClaimError::Lost) => return Ok(Outcome::Skipped("another node claimed it first".into())),
            Err(ClaimError::Orthanc(e)) => return Err(e.into()),
        };
        let lease = Lease::start(claim, self.config.lease_seconds, series_id);
        self.state.lock().unwrap().held.push(series_id.to_string());
        let _unlist = Unlist(self, series_id.to_string());
        if !force {
            // Another node may have finished between our first look and the claim.
            if let Some(rec) = self.read_record(series_id) {
                if rec.covers(&model.sha256, &hash) {
                    return Ok(Outcome::Skipped(format!(
                        "already segmented by {} {} (another node, just now)",
                        rec.model_name, rec.model_version
                    )));
                }
            }
            if let Some(found) = self.find_existing_seg(&study_uid, &series_uid, &model, &hash)? {
                let seg_uid = found.sop_instance_uid.clone();
                // The restored record keeps the SEG's own QA and flags it as the first run did.
                let needs_review = found.quality.is_none_or(|q| q < self.config.quality_threshold) || found.empty;
                let record = ResultRecord {
                    seg_sop_instance_uid: Some(found.sop_instance_uid),
                    seg_instance: Some(found.instance),
                    quality_score: found.quality,
                    needs_review,
                    ..ResultRecord::new("done", &model, mode, &hash, uids.len())
                };
                self.write_record(series_id, &record)?;
                return Ok(Outcome::Skipped(format!(
                    "an existing SEG ({seg_uid}) from {} {} covers this series; metadata restored",
                    model.name, model.version
                )));
            }
        }

        let job = match job {
            Some(j) => j,
            None => {
                let j = JobShared::new(series_id, mode, force);
                match Orthanc::submit_job(j.handle, jobs::JOB_TYPE, self.config.job_priority) {
                    Ok(id) => {
                        Orthanc::log_info(&format!("DeSAM: series {series_id}: job {id} submitted"));
                        *j.orthanc_id.lock().unwrap() = Some(id);
                    }
                    Err(e) => {
                        // Without the jobs engine the worker still does the work; status stays visible via /desam.
                        Orthanc::log_warning(&format!(
                            "DeSAM: cannot submit a job ({e}); processing series {series_id} in the worker"
                        ));
                        j.set_phase(Phase::Started);
                    }
                }
                j
            }
        };
        job.attached.store(true, Ordering::SeqCst);
        job.set_detail("Queued", json!(false));
        if job.paused_in_queue.load(Ordering::SeqCst) {
            if let Some(id) = job.orthanc_id.lock().unwrap().clone() {
                resume_paused_job(&id);
            }
        }
        lease.attach(job.cancel.clone());
        self.state.lock().unwrap().running_job = Some(job.clone());
        job.set_detail("SeriesInstanceUID", json!(series_uid));
        job.set_detail("Model", json!(format!("{} {}", model.name, model.version)));
        let outcome = loop {
            let orthanc_job = job.orthanc_id.lock().unwrap().clone();
            let still_wanted = || match &orthanc_job {
                // Pending, Running, Paused or Retry: Orthanc may still start it.
                Some(id) => match Orthanc::get_json(&format!("/jobs/{id}")) {
                    Ok(v) => {
                        if v["State"] == "Paused" && job.paused_in_queue.load(Ordering::SeqCst) {
                            // Our queue pause landed after the resume above (it waits for a step).
                            resume_paused_job(id);
                        }
                        !matches!(v["State"].as_str(), Some("Failure") | Some("Success"))
                    }
                    Err(e) => !e.is_not_found(),
                },
                None => true,
            };
            let started = job.wait_until_started(&self.shutdown, &still_wanted);
            job.paused_in_queue.store(false, Ordering::SeqCst);
            if !started {
                break if self.shutdown.load(Ordering::SeqCst) {
                    job.set_phase(Phase::Failed("Orthanc is stopping".into()));
                    Outcome::Canceled
                } else {
                    Outcome::Canceled
                };
            }
            let started = Instant::now();
            // A panic inside the run fails this job (with its message) and nothing else.
            let run = crate::guard::catch(|| self.run_job(series_id, &instance_ids, &uids, &hash, mode, &job))
                .unwrap_or_else(|panic| {
                    self.metrics.record_panic();
                    Err(RunError::Other(format!("internal error (caught): {panic}")))
                });
            match run {
                Ok(record) => {
                    let millis = started.elapsed().as_millis() as u64;
                    self.metrics.record_success(millis, record.needs_review);
                    job.set_progress(1.0);
                    job.set_phase(Phase::Done);
                    let msg = format!(
                        "DeSAM: series {series_id} segmented in {:.1} s: QA {:.3}, volume {:.1} mL, SEG {}",
                        millis as f64 / 1000.0,
                        record.quality_score.unwrap_or(0.0),
                        record.volume_ml.unwrap_or(0.0),
                        record.seg_sop_instance_uid.as_deref().unwrap_or("not stored (empty result)")
                    );
                    if record.needs_review {
                        Orthanc::log_warning(&format!(
                            "{msg}; QA below {} or flagged: needs review",
                            self.config.quality_threshold
                        ));
                    } else {
                        Orthanc::log_info(&msg);
                    }
                    break Outcome::Done;
                }
                Err(RunError::Vanished) => break skip_job(&job, VANISHED),
                Err(RunError::Process(ProcessError::Cancelled)) if lease.lost() => {
                    break skip_job(&job, "another node took the claim over")
                }
                Err(RunError::Process(ProcessError::Cancelled))
                    if !self.shutdown.load(Ordering::SeqCst) && !self.series_exists(series_id) =>
                {
                    break skip_job(&job, VANISHED)
                }
                Err(RunError::Process(ProcessError::Cancelled))
                    if !self.shutdown.load(Ordering::SeqCst) && job.phase() == Phase::Paused =>
                {
                    Orthanc::log_info(&format!("DeSAM: series {series_id}: job paused"));
                    continue;
                }
                Err(RunError::Process(ProcessError::Cancelled)) => {
                    job.set_phase(if self.shutdown.load(Ordering::SeqCst) {
                        Phase::Failed("Orthanc is stopping".into())
                    } else {
                        Phase::Canceled
                    });
                    break Outcome::Canceled;
                }
                Err(_) if self.shutdown.load(Ordering::SeqCst) => {
                    job.set_phase(Phase::Failed("Orthanc is stopping".into()));
                    break Outcome::Canceled;
                }
                Err(e) => {
                    let msg = e.to_string();
                    job.set_phase(Phase::Failed(msg.clone()));
                    let failed = ResultRecord {
                        error: Some(msg.clone()),
                        job: job.orthanc_id.lock().unwrap().clone(),
                        ..ResultRecord::new("failed", &model, mode, &hash, uids.len())
                    };
                    // A failed re-run never replaces a good result: it is kept beside it, newest first.
                    let record = match self.read_record(series_id) {
                        Some(previous) => previous.with_failed_run(failed),
                        None => failed,
                    };
                    let _ = self.write_record(series_id, &record);
                    break Outcome::Failed(msg);
                }
            }
        };
        job.attached.store(false, Ordering::SeqCst);
        Ok(outcome)
    }

    fn run_job(
        &self,
        series_id: &str,
        instance_ids: &[String],
        uids: &[String],
        hash: &str,
        mode: ModeChoice,
        job: &JobShared,
    ) -> Result<ResultRecord, RunError> {
        let started = Instant::now();
        let mut files = Vec::with_capacity(instance_ids.len());
        for (i, id) in instance_ids.iter().enumerate() {
            if job.cancel.load(Ordering::SeqCst) {
                return Err(ProcessError::Cancelled.into());
            }
            files.push(Orthanc::get(&format!("/instances/{id}/file")).map_err(|e| self.vanished_or(series_id, e))?);
            job.set_progress(0.1 * (i + 1) as f32 / instance_ids.len() as f32);
        }
        // Test hook (docs/limits.md): a panic in the middle of a unit of work, outside the engine.
        if std::env::var("DESAM_FAULT_INJECTION").is_ok_and(|v| v.split(',').any(|s| s.trim() == "worker")) {
            panic!("injected fault in the worker (DESAM_FAULT_INJECTION=worker)");
        }
        let request = ProcessRequest {
            mode,
            series_description: self.config.series_description.clone(),
            quality_threshold: self.config.quality_threshold,
            store_empty: self.config.empty_result == EmptyResult::Seg,
        };
        let output = self.processor.process(&files, &request, &mut |p| job.set_progress(0.1 + 0.8 * p), &job.cancel)?;
        drop(files);
        if job.cancel.load(Ordering::SeqCst) {
            return Err(ProcessError::Cancelled.into());
        }
        let s = &output.summary;
        for w in &s.warnings {
            Orthanc::log_warning(&format!("DeSAM: series {series_id}: {w}"));
        }
        // Never store a SEG for a series that is gone: it would re-create its patient and study.
        if !self.series_exists(series_id) {
            return Err(RunError::Vanished);
        }
        let seg_instance = match &output.seg {
            Some(bytes) => {
                let answer = Orthanc::post("/instances", bytes)?;
                let v: Value = serde_json::from_slice(&answer)
                    .map_err(|e| RunError::Other(format!("unexpected answer from POST /instances: {e}")))?;
                let id = v["ID"]
                    .as_str()
                    .ok_or_else(|| RunError::Other(format!("POST /instances answered {v}")))?
                    .to_string();
                if !self.series_exists(series_id) {
                    // Deleted between the check and the store: take our own SEG back (Orthanc then
                    // removes the study and patient it re-created). Source instances are never touched.
                    let _ = Orthanc::delete(&format!("/instances/{id}"));
                    return Err(RunError::Vanished);
                }
                Some(id)
            }
            None => None,
        };
        job.set_progress(0.95);
        let needs_review = s.flagged || s.quality < self.config.quality_threshold || s.empty;
        let status = if output.seg.is_some() { "done" } else { "empty" };
        let record = ResultRecord {
            seg_sop_instance_uid: s.seg_sop_instance_uid.clone(),
            seg_series_instance_uid: s.seg_series_instance_uid.clone(),
            seg_instance: seg_instance.clone(),
            quality_score: Some(s.quality),
            volume_ml: Some(s.volume_ml),
            needs_review,
            error: None,
            seconds: started.elapsed().as_secs_f64(),
            device: s.device.clone(),
            job: job.orthanc_id.lock().unwrap().clone(),
            warnings: s.warnings.clone(),
            // The model that made the SEG (a reload between the job's checks and the run is possible).
            ..ResultRecord::new(status, &output.model, mode, hash, uids.len())
        };
        self.write_record(series_id, &record)?;
        job.set_detail("SegInstance", json!(seg_instance));
        job.set_detail("SegSOPInstanceUID", json!(s.seg_sop_instance_uid));
        job.set_detail("QualityScore", json!(s.quality));
        job.set_detail("VolumeMl", json!(s.volume_ml));
        job.set_detail("NeedsReview", json!(needs_review));
        job.set_detail("Device", json!(s.device));
        job.set_detail("Model", json!(format!("{} {}", output.model.name, output.model.version)));
        Ok(record)
    }

    /// The claims list and the status route, minus one series (when its processing ends).
    fn unlist(&self, series_id: &str) {
        self.state.lock().unwrap().held.retain(|s| s != series_id);
    }

    /// A "not found" while reading a series whose series is gone is a vanished series, not a failure.
    fn vanished_or(&self, series_id: &str, e: OrthancCallError) -> RunError {
        if e.is_not_found() && !self.series_exists(series_id) {
            RunError::Vanished
        } else {
            e.into()
        }
    }

    /// Whether the series is still in Orthanc (a failed look-up other than "not found" counts as yes).
    fn series_exists(&self, series_id: &str) -> bool {
        match Orthanc::get(&format!("/series/{series_id}")) {
            Ok(_) => true,
            Err(e) => !e.is_not_found(),
        }
    }

    pub fn result_json(&self, series_id: &str) -> Result<Option<Value>, OrthancCallError> {
        let series = match Orthanc::get(&format!("/series/{series_id}")) {
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
            Ok(body) => body,
        };
        let viewer_url = self.viewer_url(series_id, &series);
        let record = self.read_record(series_id);
        let review = Orthanc::get(&format!("/series/{series_id}/metadata/{}", self.config.review_metadata))
            .ok()
            .map(|b| String::from_utf8_lossy(&b).to_string());
        let (queued, running) = self.is_queued_or_running(series_id);
        Ok(Some(json!({
            "Series": series_id,
            "Result": record,
            "Review": review,
            "NeedsReview": review.as_deref() == Some("needs-review"),
            "Queued": queued,
            "Running": running,
            "ViewerUrl": viewer_url,
        })))
    }

    /// `ViewerUrlTemplate` filled in for this series (its study); None when no template is set or
    /// the study cannot be read.
    fn viewer_url(&self, series_id: &str, series_body: &[u8]) -> Option<String> {
        let template = &self.config.viewer_url_template;
        if template.trim().is_empty() {
            return None;
        }
        let series: Value = serde_json::from_slice(series_body).ok()?;
        let study_id = series["ParentStudy"].as_str()?;
        let study: Value = serde_json::from_slice(&Orthanc::get(&format!("/studies/{study_id}")).ok()?).ok()?;
        super::config::viewer_url(
            template,
            &super::config::ViewerIds {
                study_instance_uid: study["MainDicomTags"]["StudyInstanceUID"].as_str()?,
                series_instance_uid: series["MainDicomTags"]["SeriesInstanceUID"].as_str().unwrap_or(""),
                orthanc_study_id: study_id,
                orthanc_series_id: series_id,
            },
        )
    }
}

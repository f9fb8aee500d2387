//! Segmentation jobs as Orthanc (v1) jobs: the state shared between the worker thread that does the
//! work and Orthanc's job thread that polls it (step/progress/content/stop/reset). No processing here.

use once_cell::sync::Lazy;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::bridge::{STEP_CONTINUE, STEP_FAILURE, STEP_SUCCESS, STOP_PAUSED};
use super::config::ModeChoice;

pub const JOB_TYPE: &str = "DeSAMSegmentation";

#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Submitted; Orthanc has not started it yet.
    Pending,
    /// Orthanc's job thread called step: the worker may run it.
    Started,
    Done,
    Failed(String),
    /// Paused by a user: the worker abandons the run and restarts it when Orthanc resumes the job.
    Paused,
    Canceled,
}

pub struct JobShared {
    pub handle: u64,
    pub series_id: String,
    pub mode: ModeChoice,
    pub force: bool,
    pub cancel: Arc<AtomicBool>,
    progress: AtomicU32,
    phase: Mutex<Phase>,
    changed: Condvar,
    pub orthanc_id: Mutex<Option<String>>,
    details: Mutex<Value>,
    /// Whether a worker currently owns this job (false once it moved on; a reset then re-queues it).
    pub attached: AtomicBool,
    /// Submitted for a manual request and paused by the plugin while it waits in the queue, so that it
    /// holds none of Orthanc's job slots (`ConcurrentJobs`); the worker resumes it when its turn comes.
    pub paused_in_queue: AtomicBool,
}

static NEXT_HANDLE: AtomicU64 = AtomicU64::new(1);
static JOBS: Lazy<Mutex<HashMap<u64, Arc<JobShared>>>> = Lazy::new(|| Mutex::new(HashMap::new()));
/// Called by `reset` to hand a resubmitted job back to the worker.
static RESUBMIT: Lazy<Mutex<Option<ResubmitHook>>> = Lazy::new(|| Mutex::new(None));

pub type ResubmitHook = Box<dyn Fn(Arc<JobShared>) + Send>;

pub fn set_resubmit_hook(hook: Option<ResubmitHook>) {
    *RESUBMIT.lock().unwrap() = hook;
}

impl JobShared {
    pub fn new(series_id: &str, mode: ModeChoice, force: bool) -> Arc<JobShared> {
        let job = Arc::new(JobShared {
            handle: NEXT_HANDLE.fetch_add(1, Ordering::SeqCst),
            series_id: series_id.to_string(),
            mode,
            force,
            cancel: Arc::new(AtomicBool::new(false)),
            progress: AtomicU32::new(0f32.to_bits()),
            phase: Mutex::new(Phase::Pending),
            changed: Condvar::new(),
            orthanc_id: Mutex::new(None),
            details: Mutex::new(json!({})),
            attached: AtomicBool::new(true),
            paused_in_queue: AtomicBool::new(false),
        });
        JOBS.lock().unwrap().insert(job.handle, job.clone());
        job
    }

    /// The job ended (done, failed or canceled): Orthanc's next `step` reports it.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase(), Phase::Done | Phase::Failed(_) | Phase::Canceled)
    }

    pub fn phase(&self) -> Phase {
        self.phase.lock().unwrap().clone()
    }

    pub fn set_phase(&self, p: Phase) {
        *self.phase.lock().unwrap() = p;
        self.changed.notify_all();
    }

    pub fn set_progress(&self, p: f32) {
        self.progress.store(p.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    pub fn progress(&self) -> f32 {
        f32::from_bits(self.progress.load(Ordering::Relaxed))
    }

    /// Merges fields into the JSON shown in `/jobs/{id}` → Content.
    pub fn set_detail(&self, key: &str, value: Value) {
        if let Value::Object(m) = &mut *self.details.lock().unwrap() {
            m.insert(key.to_string(), value);
        }
    }

    /// Waits until Orthanc starts (or resumes) the job. False if `give_up` became true or the job
    /// was canceled before it started.
    /// `still_wanted` is asked every few seconds while waiting (Orthanc does not call `stop` for a
    /// job canceled before it ever ran, so the worker must look at the job's state itself).
    pub fn wait_until_started(&self, give_up: &AtomicBool, still_wanted: &dyn Fn() -> bool) -> bool {
        let mut phase = self.phase.lock().unwrap();
        let mut last_check = std::time::Instant::now();
        loop {
            match *phase {
                Phase::Started => return true,
                Phase::Canceled | Phase::Failed(_) | Phase::Done => return false,
                _ => {}
            }
            if give_up.load(Ordering::SeqCst) {
                return false;
            }
            if last_check.elapsed() > Duration::from_secs(2) {
                drop(phase);
                let wanted = still_wanted();
                phase = self.phase.lock().unwrap();
                if !wanted && !matches!(*phase, Phase::Started) {
                    *phase = Phase::Canceled;
                    return false;
                }
                last_check = std::time::Instant::now();
            }
            phase = self.changed.wait_timeout(phase, Duration::from_millis(200)).unwrap().0;
        }
    }

    pub fn content(&self) -> Value {
        let mut v = self.details.lock().unwrap().clone();
        if let Value::Object(m) = &mut v {
            m.insert("Series".into(), json!(self.series_id));
            m.insert("Mode".into(), json!(self.mode.to_string()));
            let (state, error) = match self.phase() {
                Phase::Pending => ("pending", None),
                Phase::Started => ("running", None),
                Phase::Done => ("done", None),
                Phase::Failed(e) => ("failed", Some(e)),
                Phase::Paused => ("paused", None),
                Phase::Canceled => ("canceled", None),
            };
            m.insert("Phase".into(), json!(state));
            if let Some(e) = error {
                m.insert("Error".into(), json!(e));
            }
        }
        v
    }
}

fn lookup(handle: u64) -> Option<Arc<JobShared>> {
    JOBS.lock().unwrap().get(&handle).cloned()
}

/// All jobs Orthanc still holds (for shutdown and status).
pub fn live_jobs() -> Vec<Arc<JobShared>> {
    JOBS.lock().unwrap().values().cloned().collect()
}

pub fn progress(handle: u64) -> f32 {
    lookup(handle).map(|j| j.progress()).unwrap_or(0.0)
}

pub fn content(handle: u64) -> String {
    lookup(handle).map(|j| j.content().to_string()).unwrap_or_else(|| "{}".into())
}

/// Orthanc's job thread: start the run, then report its outcome. Sleeps briefly between polls so a
/// pause or cancel from /jobs is seen within a fraction of a second.
pub fn step(handle: u64) -> i32 {
    let Some(job) = lookup(handle) else { return STEP_FAILURE };
    {
        let mut phase = job.phase.lock().unwrap();
        match &*phase {
            Phase::Pending | Phase::Paused => {
                job.cancel.store(false, Ordering::SeqCst);
                *phase = Phase::Started;
                job.changed.notify_all();
            }
            Phase::Done => return STEP_SUCCESS,
            Phase::Failed(_) | Phase::Canceled => return STEP_FAILURE,
            Phase::Started => {}
        }
        let _ = job.changed.wait_timeout(phase, Duration::from_millis(250)).unwrap();
    }
    match job.phase() {
        Phase::Done => STEP_SUCCESS,
        Phase::Failed(_) | Phase::Canceled => STEP_FAILURE,
        _ => STEP_CONTINUE,
    }
}

/// The job left the running state (pause, cancel, failure, success or Orthanc stopping).
pub fn stop(handle: u64, reason: i32) {
    let Some(job) = lookup(handle) else { return };
    let mut phase = job.phase.lock().unwrap();
    // A resumed job is "Running" for Orthanc before its first `step` turns our phase from Paused to
    // Started: a cancel in that window must still cancel (a real race, seen in CI).
    let cancels_a_resumed_job = *phase == Phase::Paused && reason != STOP_PAUSED;
    if matches!(*phase, Phase::Pending | Phase::Started) || cancels_a_resumed_job {
        job.cancel.store(true, Ordering::SeqCst);
        *phase = if reason == STOP_PAUSED { Phase::Paused } else { Phase::Canceled };
        job.changed.notify_all();
    }
}

/// A failed or canceled job is resubmitted from /jobs/{id}/resubmit: run it again.
pub fn reset(handle: u64) {
    let Some(job) = lookup(handle) else { return };
    job.cancel.store(false, Ordering::SeqCst);
    job.set_progress(0.0);
    job.set_phase(Phase::Pending);
    if !job.attached.swap(true, Ordering::SeqCst) {
        if let Some(hook) = &*RESUBMIT.lock().unwrap() {
            hook(job.clone());
        }
    }
}

pub fn finalize(handle: u64) {
    JOBS.lock().unwrap().remove(&handle);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_starts_the_job_then_reports_its_outcome() {
        let job = JobShared::new("s1", ModeChoice(None), false);
        assert_eq!(job.phase(), Phase::Pending);
        assert_eq!(step(job.handle), STEP_CONTINUE);
        assert_eq!(job.phase(), Phase::Started);
        assert!(job.wait_until_started(&AtomicBool::new(false), &|| true));
        job.set_phase(Phase::Failed("bad series".into()));
        assert_eq!(step(job.handle), STEP_FAILURE);
        assert_eq!(job.content()["Error"], "bad series");
        finalize(job.handle);
        assert_eq!(step(job.handle), STEP_FAILURE);
    }

    #[test]
    fn stop_sets_cancel_and_pause_resumes_on_next_step() {
        let job = JobShared::new("s2", ModeChoice(None), false);
        step(job.handle);
        stop(job.handle, STOP_PAUSED);
        assert!(job.cancel.load(Ordering::SeqCst));
        assert_eq!(job.phase(), Phase::Paused);
        step(job.handle);
        assert_eq!(job.phase(), Phase::Started);
        assert!(!job.cancel.load(Ordering::SeqCst));
        stop(job.handle, 4);
        assert_eq!(job.phase(), Phase::Canceled);
        assert!(!job.wait_until_started(&AtomicBool::new(false), &|| true));
        finalize(job.handle);
    }

    #[test]
    fn a_cancel_between_resume_and_first_step_cancels() {
        let job = JobShared::new("s3", ModeChoice(None), false);
        step(job.handle);
        stop(job.handle, STOP_PAUSED);
        // Resumed: Orthanc shows it Running, but has not called `step` yet when the cancel comes.
        stop(job.handle, 4);
        assert_eq!(job.phase(), Phase::Canceled);
        assert!(job.cancel.load(Ordering::SeqCst));
        assert_eq!(step(job.handle), STEP_FAILURE);
        finalize(job.handle);
    }
}

//! The plugin's counters, published to Orthanc's metrics (/tools/metrics-prometheus) and shown by
//! `GET /desam/status`. Owns numbers only; decides nothing.

use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};

use super::bridge::Orthanc;

#[derive(Default)]
pub struct Metrics {
    pub processed: AtomicU64,
    pub failed: AtomicU64,
    pub skipped: AtomicU64,
    /// Units of work that panicked (caught at the worker's boundary; each also counts as failed).
    pub panics: AtomicU64,
    pub needs_review: AtomicU64,
    /// Milliseconds of the last processed series, and the sum over all of them.
    pub last_ms: AtomicU64,
    pub total_ms: AtomicU64,
    pub queue_length: AtomicU64,
    pub queue_high_water: AtomicU64,
}

impl Metrics {
    pub fn record_success(&self, millis: u64, needs_review: bool) {
        self.processed.fetch_add(1, Ordering::SeqCst);
        if needs_review {
            self.needs_review.fetch_add(1, Ordering::SeqCst);
        }
        self.last_ms.store(millis, Ordering::SeqCst);
        self.total_ms.fetch_add(millis, Ordering::SeqCst);
        self.publish();
    }
    pub fn record_failure(&self) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        self.publish();
    }
    pub fn record_panic(&self) {
        self.panics.fetch_add(1, Ordering::SeqCst);
        self.publish();
    }
    pub fn record_skip(&self) {
        self.skipped.fetch_add(1, Ordering::SeqCst);
        self.publish();
    }
    pub fn set_queue_length(&self, n: usize) {
        self.queue_length.store(n as u64, Ordering::SeqCst);
        self.queue_high_water.fetch_max(n as u64, Ordering::SeqCst);
        Orthanc::set_metric("desam_queue_length", n as f32, false);
    }

    pub fn publish(&self) {
        let g = |a: &AtomicU64| a.load(Ordering::SeqCst) as f32;
        Orthanc::set_metric("desam_series_processed", g(&self.processed), false);
        Orthanc::set_metric("desam_series_failed", g(&self.failed), false);
        Orthanc::set_metric("desam_series_skipped", g(&self.skipped), false);
        Orthanc::set_metric("desam_worker_panics", g(&self.panics), false);
        Orthanc::set_metric("desam_series_needs_review", g(&self.needs_review), false);
        Orthanc::set_metric("desam_series_seconds", g(&self.last_ms) / 1000.0, false);
        Orthanc::set_metric("desam_queue_length", g(&self.queue_length), false);
    }

    pub fn to_json(&self) -> Value {
        let g = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let processed = g(&self.processed);
        json!({
            "Processed": processed,
            "Failed": g(&self.failed),
            "Skipped": g(&self.skipped),
            "Panics": g(&self.panics),
            "NeedsReview": g(&self.needs_review),
            "LastSeconds": g(&self.last_ms) as f64 / 1000.0,
            "MeanSeconds": if processed > 0 { g(&self.total_ms) as f64 / 1000.0 / processed as f64 } else { 0.0 },
            "QueueHighWater": g(&self.queue_high_water),
        })
    }
}

//! The plugin's global state: the running segmentation worker, or why the plugin is disabled.
//! Set once by the entry points at start-up, read by the REST routes and the change callback.

use once_cell::sync::Lazy;
use std::sync::{Arc, Mutex};

use super::worker::SegmentationWorker;

/// Where the plugin stands; one per process (Orthanc loads a plugin once).
enum PluginState {
    /// Disabled (bad configuration, no model, not initialised yet): the reason, shown by `/desam/status`.
    Disabled(String),
    Enabled(Arc<SegmentationWorker>),
}

static STATE: Lazy<Mutex<PluginState>> = Lazy::new(|| Mutex::new(PluginState::Disabled("not initialised".into())));

/// The running worker; None while the plugin is disabled or after Finalize.
pub fn worker() -> Option<Arc<SegmentationWorker>> {
    match &*STATE.lock().unwrap() {
        PluginState::Enabled(w) => Some(w.clone()),
        PluginState::Disabled(_) => None,
    }
}

/// Why the plugin is disabled (empty when it is enabled).
pub fn disabled_reason() -> String {
    match &*STATE.lock().unwrap() {
        PluginState::Disabled(reason) => reason.clone(),
        PluginState::Enabled(_) => String::new(),
    }
}

pub fn enable(worker: Arc<SegmentationWorker>) {
    *STATE.lock().unwrap() = PluginState::Enabled(worker);
}

pub fn disable(reason: String) {
    *STATE.lock().unwrap() = PluginState::Disabled(reason);
}

/// Takes the worker out (Finalize); the plugin is then disabled.
pub fn take_worker() -> Option<Arc<SegmentationWorker>> {
    let previous = std::mem::replace(&mut *STATE.lock().unwrap(), PluginState::Disabled("finalized".into()));
    match previous {
        PluginState::Enabled(w) => Some(w),
        PluginState::Disabled(reason) => {
            *STATE.lock().unwrap() = PluginState::Disabled(reason);
            None
        }
    }
}

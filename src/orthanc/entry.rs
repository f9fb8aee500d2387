//! The plugin's top: the four C entry points Orthanc looks up (exported from Rust, every body inside
//! catch_unwind), start-up and shutdown order, and the callbacks the bridge forwards (REST, changes,
//! jobs). No processing.

use std::ffi::{c_char, c_void};

use super::bridge::{
    self, guarded, Orthanc, RestReply, CHANGE_DELETED, CHANGE_ORTHANC_STARTED, CHANGE_ORTHANC_STOPPED,
    CHANGE_STABLE_SERIES, STEP_FAILURE,
};
use super::config::{device_label, PluginConfig, Role};
use super::jobs;
use super::pipeline;
use super::rest;
use super::state;
use super::worker::SegmentationWorker;

const NAME: &[u8] = b"desam\0";
const VERSION: &[u8] = concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes();

fn disable(reason: String, error: bool) {
    if error {
        Orthanc::log_error(&format!("DeSAM: {reason}; the plugin is disabled (Orthanc keeps running)"));
    } else {
        Orthanc::log_warning(&format!("DeSAM: {reason}; the plugin is disabled"));
    }
    state::disable(reason);
    // Only the status route, so that `GET /desam/status` says why.
    let _ = Orthanc::register_rest_route(rest::STATUS_ROUTE.pattern);
}

fn initialize() -> i32 {
    if !Orthanc::check_version() {
        Orthanc::log_error(&format!(
            "DeSAM: this Orthanc ({}) is older than the SDK the plugin was built against (1.10.1); the plugin cannot run",
            Orthanc::version()
        ));
        return -1;
    }
    Orthanc::set_description(
        "DeSAM: fully automatic prostate MR segmentation; stores a DICOM-SEG for each new axial T2 series",
    );
    let text = match Orthanc::configuration() {
        Ok(t) => t,
        Err(e) => {
            disable(format!("cannot read the configuration: {e}"), true);
            return 0;
        }
    };
    let parsed = PluginConfig::from_orthanc_json(&text);
    if let Ok(Some(c)) = &parsed {
        // Logged, not fatal: only bad values disable the plugin.
        for key in &c.ignored_keys {
            Orthanc::log_warning(&format!("DeSAM: unknown option \"DeSAM\".{key} is ignored"));
        }
    }
    let config = match parsed {
        Ok(Some(c)) if c.enable => c,
        Ok(Some(_)) => {
            disable("\"DeSAM\".\"Enable\" is false".into(), false);
            return 0;
        }
        Ok(None) => {
            disable("no \"DeSAM\" section in the configuration".into(), false);
            return 0;
        }
        Err(e) => {
            disable(format!("{e}"), true);
            return 0;
        }
    };
    // Validated with the configuration above.
    let _ = crate::limits::set(config.limits);
    // No process-wide allocator tuning here: the worker applies it around each series only and
    // restores glibc's behaviour after it, so Orthanc's own traffic is never affected (issue 13).
    let processor: Box<dyn pipeline::SeriesProcessor> = if config.role == Role::Ingest {
        Box::new(pipeline::IngestOnly)
    } else {
        match pipeline::EngineProcessor::new(&config) {
            Ok(p) => Box::new(p),
            Err(e) => {
                disable(format!("cannot use the model in {:?}: {e}", config.model_directory), true);
                return 0;
            }
        }
    };
    if config.node_id.is_some() && config.role == Role::Worker && !config.check_revisions {
        Orthanc::log_warning("DeSAM: a NodeId is set but Orthanc's \"CheckRevisions\" is false: claims are not race-free between nodes (docs/scale-out.md)");
    }
    let worker = match SegmentationWorker::new(config, processor) {
        Ok(w) => w,
        Err(e) => {
            disable(e, true);
            return 0;
        }
    };
    for route in rest::ROUTES {
        if let Err(e) = Orthanc::register_rest_route(route.pattern) {
            Orthanc::log_error(&format!("DeSAM: cannot register {}: {e}", route.pattern));
        }
    }
    if let Err(e) = Orthanc::register_on_change() {
        disable(format!("cannot register the change callback: {e}"), true);
        return 0;
    }
    Orthanc::log_warning(&format!(
        "DeSAM {} ready: node {} ({:?}), model directory {}, device {}, automatic trigger {}",
        env!("CARGO_PKG_VERSION"),
        worker.config.node(),
        worker.config.role,
        worker.config.model_directory,
        device_label(&worker.config.device),
        if worker.config.stable_series_trigger { "on StableSeries" } else { "off (manual only)" }
    ));
    state::enable(worker);
    0
}

/// Only queue or signal here: the SDK forbids REST calls inside the change callback.
pub fn on_change(change_type: i32, _resource_type: i32, resource_id: &str) {
    guarded("change callback", (), || {
        let Some(w) = state::worker() else { return };
        match change_type {
            CHANGE_STABLE_SERIES => w.wake_up(),
            CHANGE_DELETED => w.resource_deleted(resource_id),
            CHANGE_ORTHANC_STARTED => w.start(),
            CHANGE_ORTHANC_STOPPED => w.signal_shutdown(),
            _ => {}
        }
    })
}

/// A request to one of `rest::ROUTES`; a panic answers 500 in Orthanc's error shape.
pub fn on_rest_request(method: u32, url: &str, groups: &[String], body: &[u8]) -> RestReply {
    guarded("REST handler", rest::error_reply(500, "Internal error", "the DeSAM plugin failed on this request"), || {
        rest::dispatch(method, url, groups, body)
    })
}

/// Orthanc's job thread asks about a DeSAM job (`jobs` holds the state it reads).
pub fn on_job_progress(handle: u64) -> f32 {
    guarded("job progress", 0.0, || jobs::progress(handle))
}
pub fn on_job_content(handle: u64) -> String {
    guarded("job content", "{}".to_string(), || jobs::content(handle))
}
pub fn on_job_step(handle: u64) -> i32 {
    guarded("job step", STEP_FAILURE, || jobs::step(handle))
}
pub fn on_job_stop(handle: u64, reason: i32) {
    guarded("job stop", (), || jobs::stop(handle, reason))
}
pub fn on_job_reset(handle: u64) {
    guarded("job reset", (), || jobs::reset(handle))
}
pub fn on_job_finalize(handle: u64) {
    guarded("job finalize", (), || jobs::finalize(handle))
}

/// # Safety
/// Called by Orthanc with its plugin context.
#[no_mangle]
pub unsafe extern "C" fn OrthancPluginInitialize(context: *mut c_void) -> i32 {
    guarded("OrthancPluginInitialize", -1, || {
        Orthanc::init(context as *mut bridge::ffi::OrthancPluginContext);
        initialize()
    })
}

#[no_mangle]
pub extern "C" fn OrthancPluginFinalize() {
    guarded("OrthancPluginFinalize", (), || {
        if let Some(w) = state::take_worker() {
            w.join();
            Orthanc::log_warning("DeSAM: finalized");
        }
    })
}

#[no_mangle]
pub extern "C" fn OrthancPluginGetName() -> *const c_char {
    NAME.as_ptr() as *const c_char
}

#[no_mangle]
pub extern "C" fn OrthancPluginGetVersion() -> *const c_char {
    VERSION.as_ptr() as *const c_char
}

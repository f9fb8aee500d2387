//! The four C entry points Orthanc looks up in the plugin (exported from Rust, every body inside
//! catch_unwind) and the change callback. Owns plugin start-up/shutdown order; no processing.

use once_cell::sync::Lazy;
use std::ffi::{c_char, c_void};
use std::sync::{Arc, Mutex};

use super::bridge::{
    self, guarded, Orthanc, CHANGE_DELETED, CHANGE_ORTHANC_STARTED, CHANGE_ORTHANC_STOPPED, CHANGE_STABLE_SERIES,
};
use super::config::PluginConfig;
use super::pipeline;
use super::rest;
use super::worker::Plugin;

static PLUGIN: Lazy<Mutex<Option<Arc<Plugin>>>> = Lazy::new(|| Mutex::new(None));
static DISABLED_REASON: Lazy<Mutex<String>> = Lazy::new(|| Mutex::new("not initialised".into()));

const NAME: &[u8] = b"desam\0";
const VERSION: &[u8] = concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes();

pub fn plugin() -> Option<Arc<Plugin>> {
    PLUGIN.lock().unwrap().clone()
}

pub fn disabled_reason() -> String {
    DISABLED_REASON.lock().unwrap().clone()
}

fn disable(reason: String, error: bool) {
    if error {
        Orthanc::log_error(&format!("DeSAM: {reason}; the plugin is disabled (Orthanc keeps running)"));
    } else {
        Orthanc::log_warning(&format!("DeSAM: {reason}; the plugin is disabled"));
    }
    *DISABLED_REASON.lock().unwrap() = reason;
    // Only the status route, so that `GET /desam/status` says why.
    let _ = Orthanc::register_rest_route(rest::ROUTES[0]);
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
    let config = match PluginConfig::from_orthanc_json(&text) {
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
    let processor: Box<dyn pipeline::SeriesProcessor> = if config.role == super::config::Role::Ingest {
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
    if config.node_id.is_some() && config.role == super::config::Role::Worker && !config.check_revisions {
        Orthanc::log_warning("DeSAM: a NodeId is set but Orthanc's \"CheckRevisions\" is false: claims are not race-free between nodes (docs/scale-out.md)");
    }
    let plugin = match Plugin::new(config, processor) {
        Ok(p) => p,
        Err(e) => {
            disable(e, true);
            return 0;
        }
    };
    for route in rest::ROUTES {
        if let Err(e) = Orthanc::register_rest_route(route) {
            Orthanc::log_error(&format!("DeSAM: cannot register {route}: {e}"));
        }
    }
    if let Err(e) = Orthanc::register_on_change() {
        disable(format!("cannot register the change callback: {e}"), true);
        return 0;
    }
    Orthanc::log_warning(&format!(
        "DeSAM {} ready: node {} ({:?}), model directory {}, device {}, automatic trigger {}",
        env!("CARGO_PKG_VERSION"),
        plugin.config.node(),
        plugin.config.role,
        plugin.config.model_directory,
        plugin.config.device,
        if plugin.config.stable_series_trigger { "on StableSeries" } else { "off (manual only)" }
    ));
    *PLUGIN.lock().unwrap() = Some(plugin);
    0
}

/// Only queue or signal here: the SDK forbids REST calls inside the change callback.
pub fn on_change(change_type: i32, _resource_type: i32, resource_id: &str) {
    let Some(p) = plugin() else { return };
    match change_type {
        CHANGE_STABLE_SERIES => p.wake_up(),
        CHANGE_DELETED => p.resource_deleted(resource_id),
        CHANGE_ORTHANC_STARTED => p.start(),
        CHANGE_ORTHANC_STOPPED => p.signal_shutdown(),
        _ => {}
    }
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
        let p = PLUGIN.lock().unwrap().take();
        if let Some(p) = p {
            p.join();
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

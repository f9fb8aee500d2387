//! The Rust half of the cxx bridge to the Orthanc SDK (cpp/orthanc_shim.* is the C++ half), plus
//! safe wrappers. Owns FFI types and the callbacks' entry into Rust; holds no plugin policy.

use std::panic::{catch_unwind, AssertUnwindSafe};

#[cxx::bridge(namespace = "desam_shim")]
#[allow(clippy::missing_safety_doc)] // documented on the item below; cxx does not carry the doc over
pub mod ffi {
    /// What a REST handler answers; status 200 is sent with AnswerBuffer, 405 with SendMethodNotAllowed
    /// (`allow` lists the methods), anything else with SendHttpStatus and `body` as the description.
    pub struct RestReply {
        pub status: u16,
        pub content_type: String,
        pub body: Vec<u8>,
        pub allow: String,
    }

    #[namespace = ""]
    unsafe extern "C++" {
        include!("desam/cpp/orthanc_shim.h");
        type OrthancPluginContext;
    }

    unsafe extern "C++" {
        include!("desam/cpp/orthanc_shim.h");

        type FullAnswer;
        fn code(self: &FullAnswer) -> i32;
        fn status(self: &FullAnswer) -> u16;
        fn body(self: &FullAnswer) -> &[u8];
        fn headers(self: &FullAnswer) -> &[u8];

        type Answer;
        fn code(self: &Answer) -> i32;
        fn data(self: &Answer) -> &[u8];
        fn error(self: &Answer) -> String;

        /// # Safety
        /// `context` must be the pointer Orthanc passed to OrthancPluginInitialize.
        unsafe fn init_context(context: *mut OrthancPluginContext);
        fn check_version() -> Result<bool>;
        fn orthanc_version() -> Result<String>;
        fn set_description(text: &str) -> Result<()>;
        fn log_message(level: u8, message: &str);
        fn get_configuration() -> Result<String>;
        fn rest_get(uri: &str) -> Result<UniquePtr<Answer>>;
        fn rest_post(uri: &str, body: &[u8]) -> Result<UniquePtr<Answer>>;
        fn rest_delete(uri: &str) -> Result<i32>;
        fn rest_call(method: u32, uri: &str, if_match: &str, body: &[u8]) -> Result<UniquePtr<FullAnswer>>;
        fn get_global_property(property: i32, default_value: &str) -> Result<String>;
        fn set_global_property(property: i32, value: &str) -> Result<i32>;
        fn set_metric(name: &str, value: f32, is_timer: bool);
        fn register_rest_route(path_regex: &str) -> Result<()>;
        fn register_on_change() -> Result<()>;
        fn submit_job(handle: u64, job_type: &str, priority: i32) -> Result<String>;
    }

    extern "Rust" {
        fn desam_rest(method: u32, url: &str, groups: Vec<String>, body: &[u8]) -> RestReply;
        fn desam_on_change(change_type: i32, resource_type: i32, resource_id: &str);
        fn desam_job_progress(handle: u64) -> f32;
        fn desam_job_content(handle: u64) -> String;
        fn desam_job_step(handle: u64) -> i32;
        fn desam_job_stop(handle: u64, reason: i32);
        fn desam_job_reset(handle: u64);
        fn desam_job_finalize(handle: u64);
    }
}

pub use ffi::RestReply;

/// Orthanc's "bad revision number" (a concurrent writer changed the resource first).
pub const ERROR_BAD_REVISION: i32 = 43;
pub const HTTP_PUT: u32 = 3;
pub const HTTP_DELETE: u32 = 4;

/// The answer of [`Orthanc::call`].
#[derive(Debug, Clone)]
pub struct Revisioned {
    pub status: u16,
    pub body: Vec<u8>,
    pub etag: Option<String>,
}

/// Orthanc's change types (OrthancPluginChangeType) the plugin reacts to.
pub const CHANGE_DELETED: i32 = 1;
pub const CHANGE_STABLE_SERIES: i32 = 8;
pub const CHANGE_ORTHANC_STARTED: i32 = 10;
pub const CHANGE_ORTHANC_STOPPED: i32 = 11;

/// OrthancPluginHttpMethod.
pub const HTTP_GET: u32 = 1;
pub const HTTP_POST: u32 = 2;

/// OrthancPluginJobStepStatus values returned by `desam_job_step`.
pub const STEP_SUCCESS: i32 = 1;
pub const STEP_FAILURE: i32 = 2;
pub const STEP_CONTINUE: i32 = 3;

/// OrthancPluginJobStopReason.
pub const STOP_PAUSED: i32 = 2;

/// OrthancPluginErrorCode_UnknownResource: what the REST API answers for a missing resource (404).
pub const ERROR_UNKNOWN_RESOURCE: i32 = 17;

/// An Orthanc core call that failed: the SDK error code and its description.
#[derive(Debug, Clone, thiserror::Error)]
#[error("Orthanc error {code} ({message}) on {what}")]
pub struct OrthancCallError {
    pub code: i32,
    pub message: String,
    pub what: String,
}

impl OrthancCallError {
    pub fn is_not_found(&self) -> bool {
        self.code == ERROR_UNKNOWN_RESOURCE
    }
    pub fn bridge(what: &str, e: impl std::fmt::Display) -> Self {
        OrthancCallError { code: -1, message: e.to_string(), what: what.to_string() }
    }
}

/// Safe access to the SDK; every call goes through the context stored by `init`.
pub struct Orthanc;

impl Orthanc {
    /// # Safety
    /// `context` must be the pointer Orthanc passed to OrthancPluginInitialize.
    pub unsafe fn init(context: *mut ffi::OrthancPluginContext) {
        ffi::init_context(context);
    }

    fn answer(what: &str, a: Result<cxx::UniquePtr<ffi::Answer>, cxx::Exception>) -> Result<Vec<u8>, OrthancCallError> {
        let a = a.map_err(|e| OrthancCallError::bridge(what, e))?;
        let answer = a.as_ref().ok_or_else(|| OrthancCallError {
            code: -1,
            message: "null answer".into(),
            what: what.into(),
        })?;
        if answer.code() != 0 {
            return Err(OrthancCallError { code: answer.code(), message: answer.error(), what: what.to_string() });
        }
        Ok(answer.data().to_vec())
    }

    pub fn get(uri: &str) -> Result<Vec<u8>, OrthancCallError> {
        Self::answer(&format!("GET {uri}"), ffi::rest_get(uri))
    }
    pub fn post(uri: &str, body: &[u8]) -> Result<Vec<u8>, OrthancCallError> {
        Self::answer(&format!("POST {uri}"), ffi::rest_post(uri, body))
    }

    pub fn delete(uri: &str) -> Result<(), OrthancCallError> {
        match ffi::rest_delete(uri) {
            Ok(0) => Ok(()),
            Ok(code) => Err(OrthancCallError { code, message: "DELETE failed".into(), what: format!("DELETE {uri}") }),
            Err(e) => Err(OrthancCallError::bridge(&format!("DELETE {uri}"), e)),
        }
    }

    /// A REST call with an optional `If-Match` revision: (HTTP status, body, ETag without quotes).
    /// Orthanc's refusals come back as their HTTP status (404, 409 for a stale revision), not as errors.
    pub fn call(method: u32, uri: &str, if_match: Option<&str>, body: &[u8]) -> Result<Revisioned, OrthancCallError> {
        let what = format!("{} {uri}", ["?", "GET", "POST", "PUT", "DELETE"].get(method as usize).unwrap_or(&"?"));
        let a = ffi::rest_call(method, uri, if_match.map(|e| format!("\"{e}\"")).as_deref().unwrap_or(""), body)
            .map_err(|e| OrthancCallError::bridge(&what, e))?;
        let a = a.as_ref().ok_or_else(|| OrthancCallError {
            code: -1,
            message: "null answer".into(),
            what: what.clone(),
        })?;
        let headers: serde_json::Value = serde_json::from_slice(a.headers()).unwrap_or(serde_json::Value::Null);
        let etag = headers
            .as_object()
            .and_then(|h| h.iter().find(|(k, _)| k.eq_ignore_ascii_case("etag")))
            .and_then(|(_, v)| v.as_str())
            .map(|v| v.trim_matches('"').to_string());
        let status = match (a.status(), a.code()) {
            (0, 0) => 200,
            (0, ERROR_UNKNOWN_RESOURCE) => 404,
            (0, ERROR_BAD_REVISION) => 409,
            (0, code) => return Err(OrthancCallError { code, message: "REST call failed".into(), what }),
            (s, _) => s,
        };
        Ok(Revisioned { status, body: a.body().to_vec(), etag })
    }

    /// Reads one stored file through a callback on the borrowed buffer (no copy of large files).
    pub fn get_json(uri: &str) -> Result<serde_json::Value, OrthancCallError> {
        let bytes = Self::get(uri)?;
        serde_json::from_slice(&bytes).map_err(|e| OrthancCallError {
            code: -1,
            message: format!("invalid JSON: {e}"),
            what: format!("GET {uri}"),
        })
    }

    pub fn log_error(msg: &str) {
        ffi::log_message(0, msg);
    }
    pub fn log_warning(msg: &str) {
        ffi::log_message(1, msg);
    }
    pub fn log_info(msg: &str) {
        ffi::log_message(2, msg);
    }

    pub fn check_version() -> bool {
        ffi::check_version().unwrap_or(false)
    }
    pub fn version() -> String {
        ffi::orthanc_version().unwrap_or_default()
    }
    pub fn set_description(text: &str) {
        let _ = ffi::set_description(text);
    }
    pub fn configuration() -> Result<String, OrthancCallError> {
        ffi::get_configuration().map_err(|e| OrthancCallError::bridge("GetConfiguration", e))
    }
    pub fn global_property(id: i32, default: &str) -> Result<String, OrthancCallError> {
        ffi::get_global_property(id, default).map_err(|e| OrthancCallError::bridge("GetGlobalProperty", e))
    }
    pub fn set_global_property(id: i32, value: &str) -> Result<(), OrthancCallError> {
        match ffi::set_global_property(id, value) {
            Ok(0) => Ok(()),
            Ok(code) => Err(OrthancCallError {
                code,
                message: "SetGlobalProperty failed".into(),
                what: format!("global property {id}"),
            }),
            Err(e) => Err(OrthancCallError::bridge("SetGlobalProperty", e)),
        }
    }
    pub fn set_metric(name: &str, value: f32, is_timer: bool) {
        ffi::set_metric(name, value, is_timer);
    }
    pub fn register_rest_route(regex: &str) -> Result<(), OrthancCallError> {
        ffi::register_rest_route(regex).map_err(|e| OrthancCallError::bridge("RegisterRestCallback", e))
    }
    pub fn register_on_change() -> Result<(), OrthancCallError> {
        ffi::register_on_change().map_err(|e| OrthancCallError::bridge("RegisterOnChangeCallback", e))
    }
    pub fn submit_job(handle: u64, job_type: &str, priority: i32) -> Result<String, OrthancCallError> {
        ffi::submit_job(handle, job_type, priority).map_err(|e| OrthancCallError::bridge("SubmitJob", e))
    }
}

/// Runs a callback body, turning a panic into `fallback` (a panic must never cross into Orthanc).
pub fn guarded<T>(what: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(v) => v,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Orthanc::log_error(&format!("DeSAM: internal error in {what}: {msg}"));
            fallback
        }
    }
}

// The callbacks the C++ half calls: each forwards to the entry points (the top of the plugin), which
// guard them against panics and route them; the bridge itself stays free of plugin policy.
fn desam_rest(method: u32, url: &str, groups: Vec<String>, body: &[u8]) -> RestReply {
    super::entry::on_rest_request(method, url, &groups, body)
}

fn desam_on_change(change_type: i32, resource_type: i32, resource_id: &str) {
    super::entry::on_change(change_type, resource_type, resource_id)
}

fn desam_job_progress(handle: u64) -> f32 {
    super::entry::on_job_progress(handle)
}
fn desam_job_content(handle: u64) -> String {
    super::entry::on_job_content(handle)
}
fn desam_job_step(handle: u64) -> i32 {
    super::entry::on_job_step(handle)
}
fn desam_job_stop(handle: u64, reason: i32) {
    super::entry::on_job_stop(handle, reason)
}
fn desam_job_reset(handle: u64) {
    super::entry::on_job_reset(handle)
}
fn desam_job_finalize(handle: u64) {
    super::entry::on_job_finalize(handle)
}

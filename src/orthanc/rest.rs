//! The plugin's REST routes under /desam/ (registered with Orthanc, so they sit behind Orthanc's own
//! HTTP authentication): one table of (pattern, method, handler), used both to register and to dispatch.
//! Owns request parsing and answers; the work itself is queued to the worker.

use once_cell::sync::Lazy;
use regex::Regex;
use serde_json::{json, Value};

use super::bridge::{Orthanc, RestReply, HTTP_GET, HTTP_POST};
use super::config::{device_label, ModeChoice};
use super::pipeline::{ProcessError, ReloadOutcome, ReloadReport, SeriesProcessor};
use super::review::{self, ReviewError};
use super::state;
use super::worker::{log_reload, SegmentationWorker};

/// What a handler gets from Orthanc: the regex groups of its pattern and the request body.
pub struct RestRequest<'a> {
    pub groups: &'a [String],
    pub body: &'a [u8],
}

/// One REST route: Orthanc's URI regex (registered as is, matched whole to dispatch), the one method it
/// answers (others get 405) and its handler.
pub struct Route {
    pub pattern: &'static str,
    pub method: u32,
    pub handler: fn(&RestRequest<'_>) -> RestReply,
}

/// The only route registered while the plugin is disabled, so that it says why.
pub const STATUS_ROUTE: Route = Route { pattern: "/desam/status", method: HTTP_GET, handler: status_route };

pub const ROUTES: &[Route] = &[
    STATUS_ROUTE,
    Route { pattern: "/desam/models", method: HTTP_GET, handler: models_route },
    Route { pattern: "/desam/series/([^/]+)", method: HTTP_GET, handler: series_route },
    Route { pattern: "/desam/series/([^/]+)/segment", method: HTTP_POST, handler: segment_route },
    Route { pattern: "/desam/series/([^/]+)/review", method: HTTP_POST, handler: review_route },
    Route { pattern: "/desam/models/reload", method: HTTP_POST, handler: reload_route },
    Route { pattern: "/desam/models/rollback", method: HTTP_POST, handler: rollback_route },
];

static MATCHERS: Lazy<Vec<Regex>> = Lazy::new(|| {
    ROUTES.iter().map(|r| Regex::new(&format!("^{}$", r.pattern)).expect("route patterns are valid")).collect()
});

fn method_name(method: u32) -> &'static str {
    if method == HTTP_POST {
        "POST"
    } else {
        "GET"
    }
}

/// Answers a request Orthanc routed to one of `ROUTES` (the table decides which).
pub fn dispatch(method: u32, url: &str, groups: &[String], body: &[u8]) -> RestReply {
    let path = url.split('?').next().unwrap_or(url);
    let Some(route) = ROUTES.iter().zip(MATCHERS.iter()).find(|(_, m)| m.is_match(path)).map(|(r, _)| r) else {
        return error_reply(404, "Unknown resource", &format!("no DeSAM route for {path}"));
    };
    if method != route.method {
        return RestReply {
            status: 405,
            content_type: String::new(),
            body: Vec::new(),
            allow: method_name(route.method).into(),
        };
    }
    (route.handler)(&RestRequest { groups, body })
}

pub fn reply_json(status: u16, v: &Value) -> RestReply {
    RestReply {
        status,
        content_type: "application/json".into(),
        body: serde_json::to_vec_pretty(v).unwrap_or_default(),
        allow: String::new(),
    }
}

/// An error answer in Orthanc's own shape: `HttpStatus`, `Message` (what kind of failure) and
/// `Details` (this request's particulars), so clients read plugin and core errors alike.
pub fn error_reply(status: u16, message: &str, details: &str) -> RestReply {
    reply_json(status, &json!({"HttpStatus": status, "Message": message, "Details": details}))
}

fn bad_request(details: &str) -> RestReply {
    error_reply(400, "Bad request", details)
}

fn unknown_series(id: &str) -> RestReply {
    error_reply(404, "Unknown resource", &format!("unknown series {id}"))
}

/// The worker, or the 503 that says why there is none.
fn enabled_worker() -> Result<std::sync::Arc<SegmentationWorker>, RestReply> {
    state::worker().ok_or_else(|| error_reply(503, "DeSAM is disabled", &state::disabled_reason()))
}

/// Series ids are Orthanc's hashes: hex groups joined by '-'. Anything else is refused before it
/// reaches a URI.
fn valid_series_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

fn series_id_of(request: &RestRequest<'_>) -> Result<String, RestReply> {
    let id = request.groups.first().map(String::as_str).unwrap_or("");
    if valid_series_id(id) {
        Ok(id.to_string())
    } else {
        Err(bad_request(&format!("invalid series id {id:?}")))
    }
}

/// The optional body of `POST .../segment`: `{"Mode": "auto"|"box"|"grid", "Force": bool}`.
fn parse_segment_body(body: &[u8]) -> Result<(Option<ModeChoice>, bool), String> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok((None, false));
    }
    let v = match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.is_object() => v,
        _ => return Err("the body must be a JSON object such as {\"Mode\": \"grid\"}".into()),
    };
    let mode = match v.get("Mode") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(m.parse::<ModeChoice>()?),
        Some(other) => return Err(format!("\"Mode\" must be a non-empty string, not {other}")),
    };
    Ok((mode, v.get("Force").and_then(Value::as_bool).unwrap_or(false)))
}

fn status_route(_: &RestRequest<'_>) -> RestReply {
    reply_json(200, &status())
}

fn models_route(_: &RestRequest<'_>) -> RestReply {
    match enabled_worker() {
        Ok(w) => reply_json(200, &models(&w.config.model_directory, w.processor.as_ref())),
        Err(reply) => reply,
    }
}

/// A reload's answer: 200 with the report when the model in service is the wanted one, 409 in
/// Orthanc's error shape (plus the report) when the candidate was refused.
fn reload_reply(result: Result<ReloadReport, ProcessError>, what: &str) -> RestReply {
    match result {
        Ok(report) => {
            log_reload(&report);
            let body = serde_json::to_value(&report).unwrap_or(Value::Null);
            if report.outcome == ReloadOutcome::Refused {
                let mut v = json!({
                    "HttpStatus": 409,
                    "Message": format!("{what} refused"),
                    "Details": format!("{}: {}", report.candidate, report.reason.as_deref().unwrap_or("")),
                });
                v["Reload"] = body;
                reply_json(409, &v)
            } else {
                reply_json(200, &body)
            }
        }
        Err(e) => {
            Orthanc::log_error(&format!("DeSAM: {what} refused: {e}"));
            error_reply(409, &format!("{what} refused"), &e.to_string())
        }
    }
}

fn reload_route(_: &RestRequest<'_>) -> RestReply {
    match enabled_worker() {
        Ok(w) => reload_reply(w.processor.reload(), "Model reload"),
        Err(reply) => reply,
    }
}

fn rollback_route(_: &RestRequest<'_>) -> RestReply {
    match enabled_worker() {
        Ok(w) => reload_reply(w.processor.rollback(), "Model rollback"),
        Err(reply) => reply,
    }
}

fn review_route(request: &RestRequest<'_>) -> RestReply {
    let (worker, id) = match (enabled_worker(), series_id_of(request)) {
        (Ok(w), Ok(id)) => (w, id),
        (Err(reply), _) | (_, Err(reply)) => return reply,
    };
    let body = match review::parse_review_body(request.body) {
        Ok(b) => b,
        Err(details) => return bad_request(&details),
    };
    match review::mark(&id, &body, worker.config.review_metadata, worker.config.reviewer_metadata) {
        Ok(answer) => {
            Orthanc::log_info(&format!("DeSAM: SEG series {id} marked {:?} by {:?}", body.state, body.reviewer));
            reply_json(200, &answer)
        }
        Err(e @ ReviewError::UnknownSeries(_)) => error_reply(404, "Unknown resource", &e.to_string()),
        Err(e @ ReviewError::NotSeg { .. }) => error_reply(400, "Not a DICOM-SEG series", &e.to_string()),
        Err(e @ ReviewError::NoReferencedMr { .. }) => error_reply(409, "Referenced MR series absent", &e.to_string()),
        Err(e @ ReviewError::Orthanc(_)) => error_reply(500, "Internal error", &e.to_string()),
    }
}

fn series_route(request: &RestRequest<'_>) -> RestReply {
    let (worker, id) = match (enabled_worker(), series_id_of(request)) {
        (Ok(w), Ok(id)) => (w, id),
        (Err(reply), _) | (_, Err(reply)) => return reply,
    };
    match worker.result_json(&id) {
        Ok(Some(v)) => reply_json(200, &v),
        Ok(None) => unknown_series(&id),
        Err(e) => error_reply(500, "Internal error", &e.to_string()),
    }
}

fn segment_route(request: &RestRequest<'_>) -> RestReply {
    let (worker, id) = match (enabled_worker(), series_id_of(request)) {
        (Ok(w), Ok(id)) => (w, id),
        (Err(reply), _) | (_, Err(reply)) => return reply,
    };
    let (mode, force) = match parse_segment_body(request.body) {
        Ok(parsed) => parsed,
        Err(details) => return bad_request(&details),
    };
    match Orthanc::get(&format!("/series/{id}")) {
        Ok(_) => {}
        Err(e) if e.is_not_found() => return unknown_series(&id),
        Err(e) => return error_reply(500, "Internal error", &e.to_string()),
    }
    match worker.enqueue_manual(&id, mode, force) {
        Ok(queued) => reply_json(
            200,
            &json!({
                "Series": id,
                "Queued": true,
                "QueueLength": queued.queue_length,
                "Mode": mode.unwrap_or(worker.config.mode).to_string(),
                "Force": force,
                // Orthanc's job: follow, pause or cancel the request through /jobs/{ID}.
                "ID": queued.job_id,
                "Path": queued.job_id.as_ref().map(|id| format!("/jobs/{id}")),
            }),
        ),
        Err(details) => error_reply(503, "DeSAM cannot queue the series", &details),
    }
}

fn loaded_device_label(device: tch::Device) -> String {
    format!("{device:?}").to_ascii_lowercase()
}

fn status() -> Value {
    let Some(worker) = state::worker() else {
        return json!({"Enabled": false, "Reason": state::disabled_reason(), "Version": env!("CARGO_PKG_VERSION")});
    };
    let model = match worker.processor.identity() {
        Ok(id) => json!(id),
        Err(e) => json!({"Error": e.to_string()}),
    };
    let loaded = worker.processor.loaded_device();
    json!({
        "Enabled": true,
        "Version": env!("CARGO_PKG_VERSION"),
        "Model": model,
        "ModelDirectory": worker.config.model_directory,
        // Registry or directory, the registry's current version and the last reload (docs/adaptation.md).
        "ModelSource": worker.processor.source_json(),
        "ModelLoaded": loaded.is_some(),
        "Device": loaded.map(loaded_device_label)
            .unwrap_or_else(|| format!("{} (not loaded yet)", device_label(&worker.config.device))),
        "Mode": worker.config.mode,
        "StableSeriesTrigger": worker.config.stable_series_trigger,
        "QualityThreshold": worker.config.quality_threshold,
        // Keys of the "DeSAM" section this plugin does not know (ignored; also logged at start-up).
        "IgnoredOptions": worker.config.ignored_keys,
        "Queue": worker.queue_json(),
        "Node": worker.node_json(),
        "Cluster": cluster_counts(),
        "Counters": worker.metrics.to_json(),
    })
}

/// What this node can see of the whole archive (all nodes share the index): SEG series and MR series.
fn cluster_counts() -> Value {
    let count = |modality: &str| -> Value {
        let q = json!({"Level": "Series", "Query": {"Modality": modality}});
        Orthanc::post("/tools/find", q.to_string().as_bytes())
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v.as_array().map(|a| json!(a.len())))
            .unwrap_or(Value::Null)
    };
    json!({"SegSeries": count("SEG"), "MrSeries": count("MR")})
}

/// The active model plus any sibling model directories (each with a readable model.json).
fn models(active_dir: &str, processor: &dyn SeriesProcessor) -> Value {
    // A registry's serving version sits in versions/, beside the other versions.
    let serving = processor.source_json()["ServingDirectory"].as_str().map(String::from);
    let device = processor.loaded_device().map(loaded_device_label);
    let active = match processor.identity() {
        Ok(id) => json!({
            "Directory": active_dir,
            "ServingDirectory": serving,
            "Identity": id,
            "Loaded": device.is_some(),
            "Device": device,
        }),
        Err(e) => json!({"Directory": active_dir, "Error": e.to_string()}),
    };
    let mut available = Vec::new();
    let active_path = std::path::Path::new(serving.as_deref().unwrap_or(active_dir));
    if let Some(parent) = active_path.parent() {
        if let Ok(entries) = std::fs::read_dir(parent) {
            let mut dirs: Vec<_> =
                entries.flatten().map(|e| e.path()).filter(|p| p.join("model.json").is_file()).collect();
            dirs.sort();
            for d in dirs {
                let card =
                    std::fs::read(d.join("model.json")).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok());
                available.push(json!({
                    "Directory": d.display().to_string(),
                    "Name": card.as_ref().and_then(|c| c.get("name").cloned()),
                    "Version": card.as_ref().and_then(|c| c.get("version").cloned()),
                    "Active": d == active_path,
                }));
            }
        }
    }
    json!({"Active": active, "Available": available})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_ids_are_checked_before_use() {
        assert!(valid_series_id("211fb9b0-46831f91-29422fb0-3d1353fd-1a2228a9"));
        assert!(!valid_series_id("../../tools/shutdown"));
        assert!(!valid_series_id(""));
    }

    #[test]
    fn the_route_table_dispatches_by_pattern_and_method() {
        let patterns: Vec<&str> = ROUTES.iter().map(|r| r.pattern).collect();
        assert_eq!(patterns[0], STATUS_ROUTE.pattern);
        let matching = |path: &str| {
            ROUTES
                .iter()
                .zip(MATCHERS.iter())
                .filter(|(_, m)| m.is_match(path))
                .map(|(r, _)| r.pattern)
                .collect::<Vec<_>>()
        };
        assert_eq!(matching("/desam/series/ab-12"), ["/desam/series/([^/]+)"]);
        assert_eq!(matching("/desam/series/ab-12/segment"), ["/desam/series/([^/]+)/segment"]);
        assert!(matching("/desam/series/ab/segment/x").is_empty());
        // A wrong method is answered by the table, before any handler or state is touched.
        let reply = dispatch(HTTP_GET, "/desam/series/ab/segment", &["ab".into()], b"");
        assert_eq!((reply.status, reply.allow.as_str()), (405, "POST"));
    }

    #[test]
    fn segment_bodies_are_parsed_into_typed_modes_and_errors_use_orthanc_keys() {
        assert_eq!(parse_segment_body(b" ").unwrap(), (None, false));
        let (mode, force) = parse_segment_body(br#"{"Mode": "GRID", "Force": true}"#).unwrap();
        assert_eq!((mode.map(|m| m.to_string()), force), (Some("grid".into()), true));
        assert!(parse_segment_body(br#"{"Mode": 3}"#).unwrap_err().contains("Mode"));
        assert!(parse_segment_body(br#"{"Mode": "points"}"#).unwrap_err().contains("\"box\""));
        assert!(parse_segment_body(b"[1]").is_err());
        let reply = error_reply(404, "Unknown resource", "unknown series ab");
        let body: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(
            (body["Message"].as_str(), body["Details"].as_str()),
            (Some("Unknown resource"), Some("unknown series ab"))
        );
        assert_eq!(body["HttpStatus"], 404);
    }
}

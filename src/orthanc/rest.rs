//! The plugin's REST routes under /desam/ (registered with Orthanc, so they sit behind Orthanc's own
//! HTTP authentication). Owns request parsing and answers; the work itself is queued to the worker.

use serde_json::{json, Value};

use super::bridge::{Orthanc, RestReply, HTTP_GET, HTTP_POST};
use super::entry;

pub const ROUTES: &[&str] =
    &["/desam/status", "/desam/models", "/desam/series/([^/]+)", "/desam/series/([^/]+)/segment"];

pub fn reply_json(status: u16, v: &Value) -> RestReply {
    RestReply {
        status,
        content_type: "application/json".into(),
        body: serde_json::to_vec_pretty(v).unwrap_or_default(),
        allow: String::new(),
    }
}

fn not_allowed(allow: &str) -> RestReply {
    RestReply { status: 405, content_type: String::new(), body: Vec::new(), allow: allow.into() }
}

fn error(status: u16, msg: &str) -> RestReply {
    reply_json(status, &json!({ "Error": msg }))
}

/// Series ids are Orthanc's hashes: hex groups joined by '-'. Anything else is refused before it
/// reaches a URI.
fn valid_series_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

pub fn handle(method: u32, url: &str, groups: &[String], body: &[u8]) -> RestReply {
    let path = url.split('?').next().unwrap_or(url);
    if path == "/desam/status" {
        if method != HTTP_GET {
            return not_allowed("GET");
        }
        return reply_json(200, &status());
    }
    let plugin = match entry::plugin() {
        Some(p) => p,
        None => return error(503, &format!("DeSAM is disabled: {}", entry::disabled_reason())),
    };
    if path == "/desam/models" {
        if method != HTTP_GET {
            return not_allowed("GET");
        }
        return reply_json(200, &models(&plugin.config.model_directory, plugin.processor.as_ref()));
    }
    if path.ends_with("/segment") {
        if method != HTTP_POST {
            return not_allowed("POST");
        }
        let id = groups.first().map(String::as_str).unwrap_or("");
        if !valid_series_id(id) {
            return error(400, "invalid series id");
        }
        let (mode, force) = if body.iter().all(|b| b.is_ascii_whitespace()) {
            (None, false)
        } else {
            match serde_json::from_slice::<Value>(body) {
                Ok(v) if v.is_object() => {
                    let mode = match v.get("Mode") {
                        None | Some(Value::Null) => None,
                        Some(Value::String(m)) if super::pipeline::parse_mode(m).is_ok() => {
                            Some(m.to_ascii_lowercase())
                        }
                        Some(Value::String(m)) => {
                            return error(400, &format!("\"Mode\" must be \"auto\", \"box\" or \"grid\", not {m:?}"))
                        }
                        Some(other) => return error(400, &format!("\"Mode\" must be a non-empty string, not {other}")),
                    };
                    (mode, v.get("Force").and_then(Value::as_bool).unwrap_or(false))
                }
                _ => return error(400, "the body must be a JSON object such as {\"Mode\": \"grid\"}"),
            }
        };
        match Orthanc::get(&format!("/series/{id}")) {
            Ok(_) => {}
            Err(e) if e.is_not_found() => return error(404, &format!("unknown series {id}")),
            Err(e) => return error(500, &e.to_string()),
        }
        return match plugin.enqueue_manual(id, mode.clone(), force) {
            Ok(n) => reply_json(
                200,
                &json!({"Series": id, "Queued": true, "QueueLength": n, "Mode": mode.unwrap_or_else(|| plugin.config.mode.clone()), "Force": force}),
            ),
            Err(msg) => error(503, &msg),
        };
    }
    // /desam/series/{id}
    if method != HTTP_GET {
        return not_allowed("GET");
    }
    let id = groups.first().map(String::as_str).unwrap_or("");
    if !valid_series_id(id) {
        return error(400, "invalid series id");
    }
    match plugin.result_json(id) {
        Ok(Some(v)) => reply_json(200, &v),
        Ok(None) => error(404, &format!("unknown series {id}")),
        Err(e) => error(500, &e.to_string()),
    }
}

fn status() -> Value {
    let Some(plugin) = entry::plugin() else {
        return json!({"Enabled": false, "Reason": entry::disabled_reason(), "Version": env!("CARGO_PKG_VERSION")});
    };
    let model = match plugin.processor.identity() {
        Ok(id) => json!(id),
        Err(e) => json!({"Error": e.to_string()}),
    };
    let loaded = plugin.processor.loaded_device();
    json!({
        "Enabled": true,
        "Version": env!("CARGO_PKG_VERSION"),
        "Model": model,
        "ModelDirectory": plugin.config.model_directory,
        "ModelLoaded": loaded.is_some(),
        "Device": loaded.unwrap_or_else(|| format!("{} (not loaded yet)", plugin.config.device)),
        "Mode": plugin.config.mode,
        "StableSeriesTrigger": plugin.config.stable_series_trigger,
        "QualityThreshold": plugin.config.quality_threshold,
        "Queue": plugin.queue_json(),
        "Node": plugin.node_json(),
        "Cluster": cluster_counts(),
        "Counters": plugin.metrics.to_json(),
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
fn models(active_dir: &str, processor: &dyn super::pipeline::SeriesProcessor) -> Value {
    let active = match processor.identity() {
        Ok(id) => {
            json!({"Directory": active_dir, "Identity": id, "Loaded": processor.loaded_device().is_some(), "Device": processor.loaded_device()})
        }
        Err(e) => json!({"Directory": active_dir, "Error": e.to_string()}),
    };
    let mut available = Vec::new();
    let active_path = std::path::Path::new(active_dir);
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
}

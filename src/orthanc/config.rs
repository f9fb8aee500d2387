//! The plugin's configuration: the `"DeSAM"` section of Orthanc's configuration, typed with serde
//! defaults and validated once at start-up. Owns no SDK calls and no processing.

use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::engine::{DeviceChoice, Mode};

/// Metadata and global-property indices must be in Orthanc's user range.
const USER_RANGE: std::ops::RangeInclusive<i32> = 1024..=65535;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the Orthanc configuration is not valid JSON: {0}")]
    Json(String),
    #[error("invalid \"DeSAM\" section: {0}")]
    Section(String),
    #[error("invalid \"DeSAM\" option {option}: {reason}")]
    Option { option: &'static str, reason: String },
}

/// What to do when the model finds no prostate in a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmptyResult {
    /// Store an all-zero SEG flagged "needs review" (viewers then show that the series was processed).
    Seg,
    /// Store no SEG; record the outcome in the series metadata and the log only.
    Skip,
}

/// Which series are segmented automatically. Text rules apply to SeriesDescription and ProtocolName;
/// a `null` pattern disables that rule.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields, default)]
pub struct SeriesFilter {
    /// Must match SeriesDescription or ProtocolName (case-insensitive regex).
    pub description_pattern: Option<String>,
    /// Must match neither SeriesDescription nor ProtocolName.
    pub exclude_pattern: Option<String>,
    /// Must match ScanningSequence (0018,0020) when the attribute is present.
    pub scanning_sequence_pattern: Option<String>,
    /// Largest angle (degrees) between the slice normal and the patient's axial (head–foot) axis.
    pub max_obliquity_degrees: f64,
    /// Fewest slices (instances × frames) a series needs.
    pub min_slices: usize,
}

impl Default for SeriesFilter {
    fn default() -> Self {
        SeriesFilter {
            description_pattern: Some("(?i)t2".into()),
            exclude_pattern: Some("(?i)(dwi|adc|diff|dce|perf|scout|localizer|survey|calib)".into()),
            scanning_sequence_pattern: Some("SE|RM".into()),
            max_obliquity_degrees: 30.0,
            min_slices: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields, default)]
pub struct PluginConfig {
    /// Master switch; false leaves only `GET /desam/status` (reporting "disabled").
    pub enable: bool,
    /// Model directory (model.json + weights).
    pub model_directory: String,
    /// "auto" (CUDA when available, else CPU), "cpu" or "cuda" (the first GPU).
    #[serde(deserialize_with = "device_from_text")]
    pub device: DeviceChoice,
    /// CPU threads for libtorch; 0 keeps libtorch's default.
    pub threads: usize,
    /// Prompting mode: "auto" (the model's default), "box" (DeSAM-B) or "grid" (DeSAM-P).
    pub mode: ModeChoice,
    /// Segment series automatically when Orthanc reports them stable.
    pub stable_series_trigger: bool,
    /// After a restart, process series that arrived or became stable while the plugin was not running.
    pub catch_up: bool,
    pub series_filter: SeriesFilter,
    /// Results whose QA score is below this are flagged "needs review".
    pub quality_threshold: f64,
    /// Most series waiting in the plugin's queue (automatic and manual together).
    pub max_queue_length: usize,
    pub empty_result: EmptyResult,
    /// SeriesDescription of the SEGs the plugin stores (the model version is appended).
    pub series_description: String,
    /// Orthanc job priority of segmentation jobs.
    pub job_priority: i32,
    /// User-defined series metadata index holding the JSON result record.
    pub result_metadata: i32,
    /// User-defined series metadata index holding "needs-review" or "ok".
    pub review_metadata: i32,
    /// Global property index storing the last handled /changes sequence number.
    pub cursor_property: i32,
    /// Resource limits checked before anything is allocated (docs/limits.md).
    pub limits: crate::limits::Limits,
    /// This node's name in a cluster (docs/scale-out.md). Unset: `<hostname>:<HttpPort>`, and the
    /// change cursor stays in `CursorProperty` (single-node behaviour). Set: the node keeps its own
    /// cursor in global property `CursorProperty + 1 + FNV-1a(NodeId) mod 1000`.
    pub node_id: Option<String>,
    /// "worker" (claims and segments series) or "ingest" (loads no model, never claims).
    pub role: Role,
    /// Lifetime of a claim; the holder renews it every third of it while it works. An expired claim
    /// (a dead node's) may be taken over by any worker.
    pub lease_seconds: u64,
    /// User-defined series metadata index holding the claim (node, model, expiry).
    pub claim_metadata: i32,
    /// User-defined series metadata index on a SEG series holding who reviewed it, in what state and
    /// when (`POST /desam/series/{id}/review`); the state itself goes to `ReviewMetadata`.
    pub reviewer_metadata: i32,
    /// Orthanc's own `HttpPort` (for the default node id); not a key of the "DeSAM" section.
    #[serde(skip)]
    pub http_port: u16,
    /// Orthanc's own `CheckRevisions`: claims are race-free only with it (not a key of "DeSAM").
    #[serde(skip)]
    pub check_revisions: bool,
    /// URL that opens a study in the site's viewer, e.g.
    /// `http://pacs:3000/segmentation?StudyInstanceUIDs={StudyInstanceUID}` (OHIF); placeholders:
    /// `VIEWER_PLACEHOLDERS`. Empty (the default): no viewer link in `GET /desam/series/{id}`.
    pub viewer_url_template: String,
    /// Keys of the "DeSAM" section the plugin does not know (dotted for nested ones, e.g.
    /// `SeriesFilter.MinSlice`): ignored, and logged as warnings at start-up.
    #[serde(skip)]
    pub ignored_keys: Vec<String>,
}

/// A prompting mode as configured or requested: one of the engine's modes, or `None` for the
/// model's own default (written "auto"). Parsed once, from the configuration or a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModeChoice(pub Option<Mode>);

impl std::str::FromStr for ModeChoice {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if text.trim().eq_ignore_ascii_case("auto") {
            return Ok(ModeChoice(None));
        }
        text.trim()
            .parse::<Mode>()
            .map(|m| ModeChoice(Some(m)))
            .map_err(|_| format!("\"Mode\" must be \"auto\" (the model's default), \"box\" or \"grid\", not {text:?}"))
    }
}

impl std::fmt::Display for ModeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.map_or("auto", Mode::name))
    }
}

impl Serialize for ModeChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ModeChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// `"Device"` through the engine's own parser (so the plugin accepts exactly what the engine knows).
fn device_from_text<'de, D: Deserializer<'de>>(d: D) -> Result<DeviceChoice, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|e: String| serde::de::Error::custom(format!("Device {text:?}: {e}")))
}

/// How a device choice is shown (status route, start-up log): its configuration spelling.
pub fn device_label(device: &DeviceChoice) -> String {
    match serde_json::to_value(device) {
        Ok(Value::String(s)) => s,
        _ => format!("{device:?}").to_ascii_lowercase(),
    }
}

/// Removes the keys of `section` that `known` (the defaults, serialised) does not have, recursing
/// into nested sections; returns their dotted names. Unknown keys are a warning, not an error, so that
/// a configuration written for a newer plugin still starts an older one.
fn remove_unknown_keys(section: &mut Value, known: &Value, prefix: &str) -> Vec<String> {
    let (Value::Object(given), Value::Object(known)) = (section, known) else { return Vec::new() };
    let mut ignored = Vec::new();
    given.retain(|key, _| {
        let keep = known.contains_key(key);
        if !keep {
            ignored.push(format!("{prefix}{key}"));
        }
        keep
    });
    for (key, value) in given.iter_mut() {
        if let Some(defaults) = known.get(key).filter(|d| d.is_object()) {
            ignored.extend(remove_unknown_keys(value, defaults, &format!("{prefix}{key}.")));
        }
    }
    ignored
}

/// FNV-1a, for a stable per-node index derived from the node id.
pub fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// What a node does in a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Worker,
    Ingest,
}

/// Placeholders `ViewerUrlTemplate` may use (source series identifiers).
pub const VIEWER_PLACEHOLDERS: &[&str] =
    &["{StudyInstanceUID}", "{SeriesInstanceUID}", "{OrthancStudyId}", "{OrthancSeriesId}"];

/// The identifiers a viewer URL is made of, in `VIEWER_PLACEHOLDERS` order.
pub struct ViewerIds<'a> {
    pub study_instance_uid: &'a str,
    pub series_instance_uid: &'a str,
    pub orthanc_study_id: &'a str,
    pub orthanc_series_id: &'a str,
}

/// The template with its placeholders filled in; None when the template is empty.
pub fn viewer_url(template: &str, ids: &ViewerIds<'_>) -> Option<String> {
    if template.trim().is_empty() {
        return None;
    }
    let values = [ids.study_instance_uid, ids.series_instance_uid, ids.orthanc_study_id, ids.orthanc_series_id];
    let mut url = template.trim().to_string();
    for (p, v) in VIEWER_PLACEHOLDERS.iter().zip(values) {
        // UIDs and Orthanc ids are digits, dots, hex and dashes: nothing to percent-encode.
        url = url.replace(p, v);
    }
    Some(url)
}

impl Default for PluginConfig {
    fn default() -> Self {
        PluginConfig {
            enable: true,
            model_directory: "/usr/share/desam/models/default".into(),
            device: DeviceChoice::Auto,
            threads: 0,
            mode: ModeChoice(None),
            stable_series_trigger: true,
            catch_up: true,
            series_filter: SeriesFilter::default(),
            quality_threshold: 0.5,
            max_queue_length: 100,
            empty_result: EmptyResult::Seg,
            series_description: "DeSAM prostate (auto)".into(),
            job_priority: 0,
            result_metadata: 4301,
            review_metadata: 4302,
            cursor_property: 4301,
            limits: crate::limits::Limits::default(),
            node_id: None,
            role: Role::Worker,
            lease_seconds: 120,
            claim_metadata: 4303,
            reviewer_metadata: 4304,
            http_port: 8042,
            check_revisions: false,
            viewer_url_template: String::new(),
            ignored_keys: Vec::new(),
        }
    }
}

/// The filter's regexes, compiled once.
#[derive(Debug, Clone)]
pub struct CompiledFilter {
    pub description: Option<Regex>,
    pub exclude: Option<Regex>,
    pub scanning_sequence: Option<Regex>,
    pub max_obliquity_degrees: f64,
    pub min_slices: usize,
}

fn compile(option: &'static str, pattern: &Option<String>) -> Result<Option<Regex>, ConfigError> {
    match pattern {
        None => Ok(None),
        Some(p) => Regex::new(p).map(Some).map_err(|e| ConfigError::Option { option, reason: e.to_string() }),
    }
}

impl PluginConfig {
    /// Reads the `"DeSAM"` section from Orthanc's whole configuration. `Ok(None)`: no section at all
    /// (the plugin stays inactive).
    pub fn from_orthanc_json(text: &str) -> Result<Option<PluginConfig>, ConfigError> {
        let root: serde_json::Value = serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        let Some(section) = root.get("DeSAM") else { return Ok(None) };
        let mut section = section.clone();
        let known = serde_json::to_value(PluginConfig::default()).map_err(|e| ConfigError::Json(e.to_string()))?;
        let ignored_keys = remove_unknown_keys(&mut section, &known, "");
        let mut cfg: PluginConfig = serde_json::from_value(section).map_err(|e| ConfigError::Section(e.to_string()))?;
        cfg.ignored_keys = ignored_keys;
        cfg.http_port = root.get("HttpPort").and_then(serde_json::Value::as_u64).unwrap_or(8042) as u16;
        cfg.check_revisions = root.get("CheckRevisions").and_then(serde_json::Value::as_bool).unwrap_or(false);
        cfg.validate()?;
        Ok(Some(cfg))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |option: &'static str, reason: String| Err(ConfigError::Option { option, reason });
        if self.model_directory.trim().is_empty() {
            return bad("ModelDirectory", "must not be empty".into());
        }
        if !(0.0..=1.0).contains(&self.quality_threshold) {
            return bad("QualityThreshold", format!("{} is outside [0, 1]", self.quality_threshold));
        }
        if self.max_queue_length == 0 {
            return bad("MaxQueueLength", "must be at least 1".into());
        }
        if self.threads > 1024 {
            return bad("Threads", format!("{} is not a sensible thread count", self.threads));
        }
        if !(0.0..=90.0).contains(&self.series_filter.max_obliquity_degrees) {
            return bad("SeriesFilter.MaxObliquityDegrees", "must be within [0, 90]".into());
        }
        if let Some(id) = &self.node_id {
            if id.trim().is_empty() || id.len() > 64 || id.chars().any(char::is_control) {
                return bad("NodeId", format!("{id:?} must be 1 to 64 printable characters"));
            }
        }
        if self.lease_seconds < 3 {
            return bad("LeaseSeconds", format!("{} is too short (at least 3)", self.lease_seconds));
        }
        if self.node_id.is_some() && self.cursor_property > 65535 - 1001 {
            return bad(
                "CursorProperty",
                "with a NodeId it must leave room for the per-node cursors (at most 64534)".into(),
            );
        }
        if [self.result_metadata, self.review_metadata].contains(&self.claim_metadata) {
            return bad("ClaimMetadata", "must differ from ResultMetadata and ReviewMetadata".into());
        }
        if [self.result_metadata, self.review_metadata, self.claim_metadata].contains(&self.reviewer_metadata) {
            return bad("ReviewerMetadata", "must differ from ResultMetadata, ReviewMetadata and ClaimMetadata".into());
        }
        for (option, v) in [
            ("ResultMetadata", self.result_metadata),
            ("ReviewMetadata", self.review_metadata),
            ("ClaimMetadata", self.claim_metadata),
            ("ReviewerMetadata", self.reviewer_metadata),
            ("CursorProperty", self.cursor_property),
        ] {
            if !USER_RANGE.contains(&v) {
                return bad(option, format!("{v} is outside the user range 1024..65535"));
            }
        }
        if self.result_metadata == self.review_metadata {
            return bad("ReviewMetadata", "must differ from ResultMetadata".into());
        }
        if !self.viewer_url_template.trim().is_empty() {
            let t = &self.viewer_url_template;
            if !(t.starts_with("http://") || t.starts_with("https://")) {
                return bad("ViewerUrlTemplate", format!("{t:?} is not an http(s) URL"));
            }
            let mut rest = t.clone();
            for p in VIEWER_PLACEHOLDERS {
                rest = rest.replace(p, "");
            }
            if let Some(i) = rest.find('{') {
                let unknown: String = rest[i..].chars().take_while(|&c| c != '}').chain(['}']).collect();
                return bad(
                    "ViewerUrlTemplate",
                    format!("unknown placeholder {unknown} (known: {})", VIEWER_PLACEHOLDERS.join(", ")),
                );
            }
        }
        self.limits.validate().map_err(|reason| ConfigError::Option { option: "Limits", reason })?;
        self.compiled_filter()?;
        Ok(())
    }

    /// This node's id: `NodeId`, or `<hostname>:<HttpPort>`.
    pub fn node(&self) -> String {
        match &self.node_id {
            Some(id) => id.trim().to_string(),
            None => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "localhost".into());
                format!("{}:{}", host.trim(), self.http_port)
            }
        }
    }

    /// The global property holding this node's change cursor (see `node_id`).
    pub fn node_cursor_property(&self) -> i32 {
        match &self.node_id {
            Some(id) => self.cursor_property + 1 + (fnv1a(id.trim()) % 1000) as i32,
            None => self.cursor_property,
        }
    }

    pub fn compiled_filter(&self) -> Result<CompiledFilter, ConfigError> {
        let f = &self.series_filter;
        Ok(CompiledFilter {
            description: compile("SeriesFilter.DescriptionPattern", &f.description_pattern)?,
            exclude: compile("SeriesFilter.ExcludePattern", &f.exclude_pattern)?,
            scanning_sequence: compile("SeriesFilter.ScanningSequencePattern", &f.scanning_sequence_pattern)?,
            max_obliquity_degrees: f.max_obliquity_degrees,
            min_slices: f.min_slices,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_section_is_inactive_and_empty_section_takes_defaults() {
        assert!(PluginConfig::from_orthanc_json(r#"{"HttpPort": 8042}"#).unwrap().is_none());
        let cfg = PluginConfig::from_orthanc_json(r#"{"DeSAM": {}}"#).unwrap().unwrap();
        assert!(cfg.enable);
        assert_eq!(cfg.max_queue_length, 100);
        assert_eq!(cfg.empty_result, EmptyResult::Seg);
        assert_eq!(cfg.series_filter.min_slices, 10);
    }

    #[test]
    fn options_are_read_and_invalid_ones_rejected_with_their_name() {
        let cfg = PluginConfig::from_orthanc_json(
            r#"{"DeSAM": {"Device": "cuda", "Mode": "grid", "EmptyResult": "skip", "SeriesFilter": {"MinSlices": 3, "DescriptionPattern": null}}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(cfg.empty_result, EmptyResult::Skip);
        assert_eq!(cfg.series_filter.min_slices, 3);
        assert!(cfg.compiled_filter().unwrap().description.is_none());

        for (json, needle) in [
            (r#"{"DeSAM": {"Device": "tpu"}}"#, "Device"),
            (r#"{"DeSAM": {"Mode": "points"}}"#, "Mode"),
            (r#"{"DeSAM": {"QualityThreshold": 2}}"#, "QualityThreshold"),
            (r#"{"DeSAM": {"MaxQueueLength": 0}}"#, "MaxQueueLength"),
            (r#"{"DeSAM": {"ResultMetadata": 12}}"#, "ResultMetadata"),
            (r#"{"DeSAM": {"SeriesFilter": {"DescriptionPattern": "(t2"}}}"#, "DescriptionPattern"),
            (r#"{"DeSAM": {"EmptyResult": "maybe"}}"#, "maybe"),
            (r#"{"DeSAM": {"ViewerUrlTemplate": "ohif/{StudyInstanceUID}"}}"#, "ViewerUrlTemplate"),
            (r#"{"DeSAM": {"ViewerUrlTemplate": "http://v/{StudyUID}"}}"#, "{StudyUID}"),
        ] {
            let err = PluginConfig::from_orthanc_json(json).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_ignored_and_named_and_mode_and_device_are_typed() {
        let cfg = PluginConfig::from_orthanc_json(
            r#"{"DeSAM": {"Enabel": false, "Mode": "GRID", "Device": "gpu", "SeriesFilter": {"MinSlice": 3}, "Limits": {"Bogus": 1}}}"#,
        )
        .unwrap()
        .unwrap();
        let mut ignored = cfg.ignored_keys.clone();
        ignored.sort();
        assert_eq!(ignored, ["Enabel", "Limits.Bogus", "SeriesFilter.MinSlice"]);
        assert!(cfg.enable, "an unknown key must not change a known option");
        assert_eq!(cfg.mode, ModeChoice(Some(Mode::Grid)));
        assert_eq!(cfg.device, DeviceChoice::Cuda(0));
        assert_eq!(PluginConfig::default().mode.to_string(), "auto");
        assert_eq!("Box".parse::<ModeChoice>().unwrap().to_string(), "box");
        assert!("points".parse::<ModeChoice>().is_err());
        assert_eq!(device_label(&DeviceChoice::Cpu), "cpu");
        assert_ne!(fnv1a("w1") % 1000, fnv1a("w2") % 1000);
    }

    #[test]
    fn viewer_url_is_filled_in_and_empty_by_default() {
        let ids = ViewerIds {
            study_instance_uid: "1.2.3",
            series_instance_uid: "1.2.3.4",
            orthanc_study_id: "ab-cd",
            orthanc_series_id: "ef-01",
        };
        assert_eq!(viewer_url(&PluginConfig::default().viewer_url_template, &ids), None);
        let t = "http://h:3000/segmentation?StudyInstanceUIDs={StudyInstanceUID}&s={SeriesInstanceUID}&o={OrthancStudyId}/{OrthancSeriesId}";
        let cfg = PluginConfig::from_orthanc_json(&format!(r#"{{"DeSAM": {{"ViewerUrlTemplate": "{t}"}}}}"#))
            .unwrap()
            .unwrap();
        assert_eq!(
            viewer_url(&cfg.viewer_url_template, &ids).as_deref(),
            Some("http://h:3000/segmentation?StudyInstanceUIDs=1.2.3&s=1.2.3.4&o=ab-cd/ef-01")
        );
    }
}

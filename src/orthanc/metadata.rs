//! Exactly-once bookkeeping: the result record kept in series metadata, the content hash of a
//! series, and recognising an existing SEG from the same model. Pure over JSON; no SDK calls.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// What happened to a series, stored as JSON in its `ResultMetadata` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ResultRecord {
    /// "done", "empty" (no prostate found, no SEG stored) or "failed".
    pub status: String,
    pub model_name: String,
    pub model_version: String,
    pub model_sha256: String,
    pub mode: String,
    /// Hash of the sorted SOPInstanceUIDs the result was computed from.
    pub content_hash: String,
    pub instance_count: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seg_sop_instance_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seg_series_instance_uid: Option<String>,
    /// Orthanc id of the stored SEG instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seg_instance: Option<String>,
    #[serde(default)]
    pub quality_score: Option<f64>,
    #[serde(default)]
    pub volume_ml: Option<f64>,
    #[serde(default)]
    pub needs_review: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub seconds: f64,
    #[serde(default)]
    pub device: String,
    /// UTC time (RFC 3339-like, seconds) when the record was written.
    pub processed_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// What the reader and the pipeline warned about (also logged), e.g. a FRACTIONAL SEG for a
    /// matrix whose Columns is not a multiple of 8.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Later runs that failed while this result stayed in force, newest first (at most 5).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_runs: Vec<ResultRecord>,
}

/// Most failed runs kept beside a good result.
const MAX_FAILED_RUNS: usize = 5;

/// A SEG found in the archive that already covers a series (see `matching_seg`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExistingSeg {
    pub sop_instance_uid: String,
    /// Orthanc id of the SEG instance.
    pub instance: String,
    /// The QA score the SEG's ContentDescription states ("...; quality 0.87; ...").
    pub quality: Option<f64>,
    pub empty: bool,
}

impl ExistingSeg {
    pub fn from_tags(sop_instance_uid: String, instance: &str, tags: &Value) -> ExistingSeg {
        let description = tags.get("ContentDescription").and_then(Value::as_str).unwrap_or("");
        let quality = description
            .split(';')
            .find_map(|part| part.trim().strip_prefix("quality "))
            .and_then(|q| q.trim().parse::<f64>().ok())
            .filter(|q| q.is_finite());
        ExistingSeg {
            sop_instance_uid,
            instance: instance.to_string(),
            quality,
            empty: description.contains("empty result"),
        }
    }
}

impl ResultRecord {
    /// A record of `status` for one run of `model` in `mode` over `instance_count` instances with
    /// `content_hash`, stamped now; the outcome fields start empty.
    pub fn new(
        status: &str,
        model: &super::pipeline::ModelIdentity,
        mode: super::config::ModeChoice,
        content_hash: &str,
        instance_count: usize,
    ) -> ResultRecord {
        ResultRecord {
            status: status.into(),
            model_name: model.name.clone(),
            model_version: model.version.clone(),
            model_sha256: model.sha256.clone(),
            mode: mode.to_string(),
            content_hash: content_hash.into(),
            instance_count,
            processed_at: crate::clock::utc_now(),
            ..Default::default()
        }
    }

    /// This record with a later failed run added: a failure replaces a failure, but a good result
    /// ("done"/"empty") stays in force and keeps the failure beside it, newest first.
    pub fn with_failed_run(self, failed: ResultRecord) -> ResultRecord {
        if self.status == "done" || self.status == "empty" {
            let mut kept = self;
            let mut failed = failed;
            failed.failed_runs.clear();
            kept.failed_runs.insert(0, failed);
            kept.failed_runs.truncate(MAX_FAILED_RUNS);
            kept
        } else {
            failed
        }
    }

    /// True if this record already covers (model, content): the series needs no new run.
    pub fn covers(&self, model_sha256: &str, content_hash: &str) -> bool {
        (self.status == "done" || self.status == "empty")
            && self.model_sha256 == model_sha256
            && self.content_hash == content_hash
    }
}

/// SHA-256 over the sorted, de-duplicated SOPInstanceUIDs (order of arrival does not matter).
pub fn content_hash<S: AsRef<str>>(sop_instance_uids: &[S]) -> String {
    let mut uids: Vec<&str> = sop_instance_uids.iter().map(|s| s.as_ref().trim()).collect();
    uids.sort_unstable();
    uids.dedup();
    let mut h = Sha256::new();
    for u in uids {
        h.update(u.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

fn walk<'a>(v: &'a Value, key: &str, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == key {
                    out.push(x);
                }
                walk(x, key, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| walk(x, key, out)),
        _ => {}
    }
}

/// Every string value under `key` anywhere in a simplified-tags document.
pub fn strings_under(tags: &Value, key: &str) -> Vec<String> {
    let mut found = Vec::new();
    walk(tags, key, &mut found);
    let mut out = Vec::new();
    for v in found {
        match v {
            Value::String(s) => out.extend(s.split('\\').map(|p| p.trim().to_string())),
            Value::Array(a) => {
                for item in a {
                    if let Value::String(s) = item {
                        out.push(s.trim().to_string());
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Does this SEG (`GET /instances/{id}/simplified-tags`) come from the given model version and
/// reference exactly the given series content? Returns its SOPInstanceUID if so.
pub fn matching_seg(seg_tags: &Value, series_uid: &str, version_tag: &str, content_hash_now: &str) -> Option<String> {
    let referenced_series = strings_under(seg_tags, "SeriesInstanceUID");
    let referenced_here = seg_tags
        .get("ReferencedSeriesSequence")
        .map(|r| strings_under(r, "SeriesInstanceUID").iter().any(|u| u == series_uid))
        .unwrap_or(false);
    if !referenced_here && !referenced_series.iter().skip(1).any(|u| u == series_uid) {
        return None;
    }
    let versions: Vec<String> = strings_under(seg_tags, "AlgorithmVersion")
        .into_iter()
        .chain(strings_under(seg_tags, "SoftwareVersions"))
        .collect();
    let same_model = !version_tag.is_empty() && versions.iter().any(|v| v == version_tag);
    if !same_model {
        return None;
    }
    let refs = seg_tags
        .get("ReferencedSeriesSequence")
        .map(|r| strings_under(r, "ReferencedSOPInstanceUID"))
        .unwrap_or_default();
    if refs.is_empty() || content_hash(&refs) != content_hash_now {
        return None;
    }
    seg_tags.get("SOPInstanceUID").and_then(Value::as_str).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_hash_ignores_order_and_duplicates_but_not_content() {
        let a = content_hash(&["1.2.3", "1.2.4"]);
        assert_eq!(a, content_hash(&["1.2.4", "1.2.3", "1.2.3"]));
        assert_ne!(a, content_hash(&["1.2.3", "1.2.4", "1.2.5"]));
    }

    #[test]
    fn record_covers_only_same_model_and_content() {
        let r = ResultRecord {
            status: "done".into(),
            model_sha256: "abc".into(),
            content_hash: "h".into(),
            ..Default::default()
        };
        assert!(r.covers("abc", "h"));
        assert!(!r.covers("abd", "h"));
        assert!(!r.covers("abc", "h2"));
        let failed = ResultRecord { status: "failed".into(), ..r.clone() };
        assert!(!failed.covers("abc", "h"));
        let back: ResultRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn existing_seg_is_recognised_by_reference_model_and_content() {
        let seg = json!({
            "SOPInstanceUID": "9.9",
            "SeriesInstanceUID": "9.8",
            "SoftwareVersions": ["0.1.0", "v1 sha256:abc"],
            "SegmentSequence": [{"SegmentationAlgorithmIdentificationSequence": [{"AlgorithmVersion": "v1 sha256:abc"}]}],
            "ReferencedSeriesSequence": [{"SeriesInstanceUID": "1.2", "ReferencedInstanceSequence": [
                {"ReferencedSOPInstanceUID": "1.2.1"}, {"ReferencedSOPInstanceUID": "1.2.2"}]}]
        });
        let h = content_hash(&["1.2.2", "1.2.1"]);
        assert_eq!(matching_seg(&seg, "1.2", "v1 sha256:abc", &h).as_deref(), Some("9.9"));
        assert!(matching_seg(&seg, "1.3", "v1 sha256:abc", &h).is_none());
        assert!(matching_seg(&seg, "1.2", "v1 sha256:abd", &h).is_none());
        assert!(matching_seg(&seg, "1.2", "v1 sha256:abc", &content_hash(&["1.2.1"])).is_none());
    }

    #[test]
    fn a_failed_rerun_keeps_the_good_result_and_existing_segs_give_their_qa() {
        let done = ResultRecord { status: "done".into(), quality_score: Some(0.9), ..Default::default() };
        let failed = |e: &str| ResultRecord { status: "failed".into(), error: Some(e.into()), ..Default::default() };
        let r = done.clone().with_failed_run(failed("one")).with_failed_run(failed("two"));
        assert_eq!(r.status, "done");
        assert_eq!(r.quality_score, Some(0.9));
        assert_eq!(r.failed_runs.iter().map(|f| f.error.clone().unwrap()).collect::<Vec<_>>(), ["two", "one"]);
        assert_eq!(failed("old").with_failed_run(failed("new")).error.as_deref(), Some("new"));
        let seg = ExistingSeg::from_tags(
            "1.2".into(),
            "abc",
            &json!({"ContentDescription": "DeSAM prostate segmentation; quality 0.42; gland 30.1 mL"}),
        );
        assert_eq!(seg.quality, Some(0.42));
        assert!(!seg.empty);
        let e = ExistingSeg::from_tags(
            "1.3".into(),
            "abd",
            &json!({"ContentDescription": "DeSAM prostate: empty result; quality 0.10"}),
        );
        assert!(e.empty && e.quality == Some(0.10));
    }
}

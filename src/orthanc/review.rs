//! The review mark on a SEG series (`POST /desam/series/{id}/review`): checks that the series is a
//! DICOM-SEG over an MR series held by this Orthanc, then writes series metadata only; never touches an instance.

use serde_json::{json, Value};

use super::bridge::{Orthanc, OrthancCallError};
use super::claims;

/// The state written when the body names none: the value `desam-train pull` collects by default.
pub const DEFAULT_REVIEW_STATE: &str = "reviewed";

/// The body of the review route: `{"State": "reviewed", "Reviewer": "Dr Rossi"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewRequest {
    pub state: String,
    pub reviewer: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("unknown series {0}")]
    UnknownSeries(String),
    #[error("series {series} is a {modality} series, not a DICOM-SEG: only segmentations are reviewed")]
    NotSeg { series: String, modality: String },
    #[error("SEG series {series} references no MR series held by this Orthanc (referenced: {referenced}); store the MR series first")]
    NoReferencedMr { series: String, referenced: String },
    #[error("{0}")]
    Orthanc(#[from] OrthancCallError),
}

/// A review field: 1 to 64 printable characters (it ends up in metadata and logs, one line).
fn review_text(name: &str, value: Option<&Value>, default: Option<&str>) -> Result<String, String> {
    let text = match (value, default) {
        (None | Some(Value::Null), Some(d)) => d.to_string(),
        (None | Some(Value::Null), None) => return Err(format!("\"{name}\" is required")),
        (Some(Value::String(s)), _) => s.trim().to_string(),
        (Some(other), _) => return Err(format!("\"{name}\" must be a string, not {other}")),
    };
    if text.is_empty() || text.chars().count() > 64 || text.chars().any(char::is_control) {
        return Err(format!("\"{name}\" must be 1 to 64 printable characters, not {text:?}"));
    }
    Ok(text)
}

pub fn parse_review_body(body: &[u8]) -> Result<ReviewRequest, String> {
    let v = match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.is_object() => v,
        _ => {
            return Err(
                "the body must be a JSON object such as {\"State\": \"reviewed\", \"Reviewer\": \"name\"}".into()
            )
        }
    };
    Ok(ReviewRequest {
        state: review_text("State", v.get("State"), Some(DEFAULT_REVIEW_STATE))?,
        reviewer: review_text("Reviewer", v.get("Reviewer"), None)?,
    })
}

/// The SeriesInstanceUIDs a SEG instance's ReferencedSeriesSequence names.
fn referenced_series_uids(tags: &Value) -> Vec<String> {
    tags["ReferencedSeriesSequence"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item["SeriesInstanceUID"].as_str())
        .map(|uid| uid.trim().to_string())
        .filter(|uid| !uid.is_empty())
        .collect()
}

/// Orthanc's id of the MR series with this SeriesInstanceUID, if this Orthanc holds one.
fn mr_series_id(series_uid: &str) -> Result<Option<String>, OrthancCallError> {
    let query = json!({"Level": "Series", "Query": {"SeriesInstanceUID": series_uid}, "Expand": true});
    let found: Value = serde_json::from_slice(&Orthanc::post("/tools/find", query.to_string().as_bytes())?)
        .map_err(|e| OrthancCallError::bridge("/tools/find", e.to_string()))?;
    Ok(found
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["MainDicomTags"]["Modality"] == "MR")
        .and_then(|s| s["ID"].as_str().map(String::from)))
}

/// Marks SEG series `series_id` with `request.state` in metadata `review_metadata` (what `desam-train
/// pull` reads) and records who, what and when as JSON in `reviewer_metadata`. Returns the answer body.
pub fn mark(
    series_id: &str,
    request: &ReviewRequest,
    review_metadata: i32,
    reviewer_metadata: i32,
) -> Result<Value, ReviewError> {
    let series = match Orthanc::get_json(&format!("/series/{series_id}")) {
        Ok(s) => s,
        Err(e) if e.is_not_found() => return Err(ReviewError::UnknownSeries(series_id.to_string())),
        Err(e) => return Err(e.into()),
    };
    let modality = series["MainDicomTags"]["Modality"].as_str().unwrap_or("").to_string();
    if modality != "SEG" {
        let modality = if modality.is_empty() { "modality-less".into() } else { modality };
        return Err(ReviewError::NotSeg { series: series_id.to_string(), modality });
    }
    let first = series["Instances"].as_array().and_then(|a| a.first()).and_then(Value::as_str).unwrap_or("");
    let tags = Orthanc::get_json(&format!("/instances/{first}/simplified-tags"))?;
    let referenced = referenced_series_uids(&tags);
    let mut source = None;
    for uid in &referenced {
        if let Some(id) = mr_series_id(uid)? {
            source = Some((uid.clone(), id));
            break;
        }
    }
    let Some((mr_uid, mr_id)) = source else {
        let referenced = if referenced.is_empty() { "none".into() } else { referenced.join(", ") };
        return Err(ReviewError::NoReferencedMr { series: series_id.to_string(), referenced });
    };
    let reviewed_at = crate::clock::utc_now();
    let record = json!({
        "State": request.state,
        "Reviewer": request.reviewer,
        "ReviewedAt": reviewed_at,
        "ReferencedSeriesInstanceUID": mr_uid,
    });
    // The reviewer first: a SEG marked reviewed always says by whom.
    claims::put_metadata(&format!("/series/{series_id}/metadata/{reviewer_metadata}"), record.to_string().as_bytes())?;
    claims::put_metadata(&format!("/series/{series_id}/metadata/{review_metadata}"), request.state.as_bytes())?;
    Ok(json!({
        "Series": series_id,
        "SeriesInstanceUID": series["MainDicomTags"]["SeriesInstanceUID"],
        "State": request.state,
        "Reviewer": request.reviewer,
        "ReviewedAt": reviewed_at,
        "ReferencedSeries": {"ID": mr_id, "SeriesInstanceUID": mr_uid},
        "ReviewMetadata": review_metadata,
        "ReviewerMetadata": reviewer_metadata,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn review_bodies_need_a_reviewer_and_default_to_reviewed() {
        let r = parse_review_body(br#"{"Reviewer": " Dr Rossi "}"#).unwrap();
        assert_eq!((r.state.as_str(), r.reviewer.as_str()), ("reviewed", "Dr Rossi"));
        let r = parse_review_body(br#"{"State": "rejected", "Reviewer": "x"}"#).unwrap();
        assert_eq!(r.state, "rejected");
        assert!(parse_review_body(br#"{"State": "reviewed"}"#).unwrap_err().contains("Reviewer"));
        assert!(parse_review_body(br#"{"State": 1, "Reviewer": "x"}"#).unwrap_err().contains("State"));
        assert!(parse_review_body(b"{\"Reviewer\": \"a\\nb\"}").unwrap_err().contains("printable"));
        assert!(parse_review_body(b"").is_err());
    }

    #[test]
    fn referenced_series_are_read_from_simplified_tags() {
        let tags = json!({"ReferencedSeriesSequence": [{"SeriesInstanceUID": "1.2.3 "}, {"SeriesInstanceUID": ""}]});
        assert_eq!(referenced_series_uids(&tags), ["1.2.3"]);
        assert!(referenced_series_uids(&json!({})).is_empty());
    }
}

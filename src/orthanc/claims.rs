//! Cluster bookkeeping on Orthanc's own revisions: a worker claims a series with a leased record in
//! the series' metadata (create-if-absent, `If-Match` to renew, take over or release) and writes every
//! other metadata entry revision-safely. The decisions are pure; the REST calls go through `Orthanc`.

use serde::{Deserialize, Serialize};

use super::bridge::{Orthanc, OrthancCallError, HTTP_DELETE, HTTP_GET, HTTP_PUT};

/// A claim: which node works on a series, with which model, until when (Unix seconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ClaimRecord {
    pub node: String,
    pub model: String,
    pub expires: i64,
    /// UTC time of the claim (for people reading the metadata).
    #[serde(default)]
    pub claimed: String,
}

/// What to do with a series' claim entry as found.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// No claim: create one (fails if another node creates it first).
    Create,
    /// Our own claim (a restart with the same node id) or an expired one: replace it at `etag`.
    Replace { etag: String, previous: Option<String> },
    /// Another node holds a live claim.
    HeldBy { node: String, expires: i64 },
}

/// The decision for node `me` at time `now` given the current entry (record or unreadable, etag).
pub fn decide(current: Option<(Option<ClaimRecord>, String)>, me: &str, now: i64) -> Decision {
    match current {
        None => Decision::Create,
        Some((Some(c), etag)) if c.node != me && c.expires > now => {
            let _ = etag;
            Decision::HeldBy { node: c.node, expires: c.expires }
        }
        Some((Some(c), etag)) => Decision::Replace { etag, previous: (c.node != me).then_some(c.node) },
        // An unreadable entry is nobody's claim.
        Some((None, etag)) => Decision::Replace { etag, previous: None },
    }
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// A claim this node holds: renew it while working, release it when done.
#[derive(Debug)]
pub struct Held {
    uri: String,
    etag: String,
    record: ClaimRecord,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("claimed by node {node} until {expires} (Unix time)")]
    HeldBy { node: String, expires: i64 },
    #[error("another node changed the claim first")]
    Lost,
    #[error("{0}")]
    Orthanc(#[from] OrthancCallError),
}

fn http_error(what: &str, status: u16, body: &[u8]) -> OrthancCallError {
    OrthancCallError {
        code: status as i32,
        message: String::from_utf8_lossy(body).chars().take(300).collect(),
        what: what.to_string(),
    }
}

/// Claims `series_id` for `node` with a lease of `lease_s` seconds.
pub fn claim(
    series_id: &str,
    index: i32,
    node: &str,
    model: &str,
    lease_s: u64,
) -> Result<(Held, Option<String>), ClaimError> {
    let uri = format!("/series/{series_id}/metadata/{index}");
    let now = unix_now();
    let current = Orthanc::call(HTTP_GET, &uri, None, &[])?;
    let found = match current.status {
        404 => None,
        200 => {
            Some((serde_json::from_slice::<ClaimRecord>(&current.body).ok(), current.etag.clone().unwrap_or_default()))
        }
        s => return Err(http_error(&format!("GET {uri}"), s, &current.body).into()),
    };
    let record = ClaimRecord {
        node: node.into(),
        model: model.into(),
        expires: now + lease_s as i64,
        claimed: crate::clock::utc_now(),
    };
    let body = serde_json::to_vec(&record).expect("a claim serialises");
    let (if_match, previous) = match decide(found, node, now) {
        Decision::HeldBy { node, expires } => return Err(ClaimError::HeldBy { node, expires }),
        Decision::Create => (None, None),
        Decision::Replace { etag, previous } => (Some(etag), previous),
    };
    let put = Orthanc::call(HTTP_PUT, &uri, if_match.as_deref().filter(|e| !e.is_empty()), &body)?;
    match put.status {
        200 => Ok((Held { uri, etag: put.etag.unwrap_or_default(), record }, previous)),
        409 => Err(ClaimError::Lost),
        s => Err(http_error(&format!("PUT {uri}"), s, &put.body).into()),
    }
}

impl Held {
    /// Extends the lease; `Lost` when another node took the claim over in the meantime.
    pub fn renew(&mut self, lease_s: u64) -> Result<(), ClaimError> {
        self.record.expires = unix_now() + lease_s as i64;
        let body = serde_json::to_vec(&self.record).expect("a claim serialises");
        let put =
            Orthanc::call(HTTP_PUT, &self.uri, Some(&self.etag).filter(|e| !e.is_empty()).map(String::as_str), &body)?;
        match put.status {
            200 => {
                self.etag = put.etag.unwrap_or_default();
                Ok(())
            }
            409 => self.renew_at_current_revision(&body),
            s => Err(http_error(&format!("PUT {}", self.uri), s, &put.body).into()),
        }
    }

    /// Orthanc refused our revision. The claim is lost only if the entry now names another claim; if
    /// it is still exactly ours (seen on a single SQLite node, where the revision we were answered no
    /// longer matched), renew it at the revision Orthanc has now.
    fn renew_at_current_revision(&mut self, body: &[u8]) -> Result<(), ClaimError> {
        let current = Orthanc::call(HTTP_GET, &self.uri, None, &[])?;
        let still_ours = current.status == 200
            && serde_json::from_slice::<ClaimRecord>(&current.body)
                .is_ok_and(|c| c.node == self.record.node && c.claimed == self.record.claimed);
        if !still_ours {
            return Err(ClaimError::Lost);
        }
        let etag = current.etag.unwrap_or_default();
        let put = Orthanc::call(HTTP_PUT, &self.uri, Some(etag.as_str()).filter(|e| !e.is_empty()), body)?;
        match put.status {
            200 => {
                self.etag = put.etag.unwrap_or_default();
                Ok(())
            }
            409 => Err(ClaimError::Lost),
            s => Err(http_error(&format!("PUT {}", self.uri), s, &put.body).into()),
        }
    }

    /// Removes the claim (only if it is still ours).
    pub fn release(self) {
        let _ =
            Orthanc::call(HTTP_DELETE, &self.uri, Some(&self.etag).filter(|e| !e.is_empty()).map(String::as_str), &[]);
    }
}

/// Writes a metadata entry whatever Orthanc's `CheckRevisions` says. A plain PUT creates the entry
/// (and, with revisions off, overwrites it) in one call; only when Orthanc asks for the current
/// revision (409) is it read and the write repeated with `If-Match`, again after a concurrent writer.
pub fn put_metadata(uri: &str, body: &[u8]) -> Result<(), OrthancCallError> {
    let mut etag: Option<String> = None;
    for attempt in 0..6 {
        if attempt > 0 {
            let current = Orthanc::call(HTTP_GET, uri, None, &[])?;
            etag = match current.status {
                200 => current.etag,
                404 => None,
                s => return Err(http_error(&format!("GET {uri}"), s, &current.body)),
            };
        }
        let put = Orthanc::call(HTTP_PUT, uri, etag.as_deref(), body)?;
        match put.status {
            200 => return Ok(()),
            409 => continue,
            s => return Err(http_error(&format!("PUT {uri}"), s, &put.body)),
        }
    }
    Err(OrthancCallError { code: 409, message: "five concurrent writers in a row".into(), what: format!("PUT {uri}") })
}

/// A held claim kept alive by a renewal thread (every third of the lease) until dropped; dropping it
/// releases the claim. If another node takes the claim over, `lost()` turns true and the attached
/// cancel flag is set, so the run stops at its next check.
pub struct Lease {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cancel: std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<std::sync::atomic::AtomicBool>>>>,
    thread: Option<std::thread::JoinHandle<Held>>,
}

impl Lease {
    pub fn start(mut held: Held, lease_s: u64, series_id: &str) -> Lease {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let cancel: Arc<Mutex<Option<Arc<AtomicBool>>>> = Arc::new(Mutex::new(None));
        let (s, l, c, id) = (stop.clone(), lost.clone(), cancel.clone(), series_id.to_string());
        let every = std::time::Duration::from_millis(lease_s * 1000 / 3);
        let thread = std::thread::Builder::new()
            .name("desam-lease".into())
            .spawn(move || {
                let mut last = std::time::Instant::now();
                while !s.load(Ordering::SeqCst) {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    if last.elapsed() < every {
                        continue;
                    }
                    last = std::time::Instant::now();
                    match held.renew(lease_s) {
                        Ok(()) => {}
                        Err(ClaimError::Lost) => {
                            Orthanc::log_warning(&format!(
                                "DeSAM: series {id}: another node took the claim over; stopping"
                            ));
                            l.store(true, Ordering::SeqCst);
                            if let Some(flag) = &*c.lock().unwrap_or_else(|p| p.into_inner()) {
                                flag.store(true, Ordering::SeqCst);
                            }
                            break;
                        }
                        Err(e) => Orthanc::log_warning(&format!(
                            "DeSAM: series {id}: cannot renew the claim ({e}); trying again"
                        )),
                    }
                }
                held
            })
            .ok();
        Lease { stop, lost, cancel, thread }
    }

    /// The run's cancel flag, set if the claim is lost.
    pub fn attach(&self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) = Some(flag);
    }

    pub fn lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if let Ok(held) = t.join() {
                if !self.lost() {
                    held.release();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(node: &str, expires: i64) -> Option<(Option<ClaimRecord>, String)> {
        Some((
            Some(ClaimRecord { node: node.into(), model: "m".into(), expires, claimed: String::new() }),
            "3-x".into(),
        ))
    }

    #[test]
    fn claims_are_created_renewed_taken_over_or_respected() {
        assert_eq!(decide(None, "a", 100), Decision::Create);
        assert_eq!(decide(rec("b", 200), "a", 100), Decision::HeldBy { node: "b".into(), expires: 200 });
        assert_eq!(
            decide(rec("b", 100), "a", 100),
            Decision::Replace { etag: "3-x".into(), previous: Some("b".into()) }
        );
        assert_eq!(decide(rec("a", 200), "a", 100), Decision::Replace { etag: "3-x".into(), previous: None });
        assert_eq!(
            decide(Some((None, "1-y".into())), "a", 100),
            Decision::Replace { etag: "1-y".into(), previous: None }
        );
        let back: ClaimRecord = serde_json::from_str(r#"{"Node":"w1","Model":"0.3.0","Expires":5}"#).unwrap();
        assert_eq!(back.node, "w1");
    }
}

//! A training run's per-epoch record (`log.jsonl`): the `EpochLog` row and its reader. Shared by the
//! training loop that writes it, the plot that draws it and the export that reads the best epoch.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{io_err, TrainError};

/// One JSON line per finished epoch, appended by `fit`.
pub const LOG_JSONL: &str = "log.jsonl";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub lr: f64,
    pub steps: usize,
    pub global_step: u64,
    pub train_loss: f64,
    pub train_dice_loss: f64,
    pub train_bce: f64,
    pub train_iou_loss: f64,
    /// NaN (null in the JSON) for a run without validation (`RunOptions::skip_validation`).
    #[serde(with = "nan_as_null")]
    pub val_loss: f64,
    #[serde(with = "nan_as_null")]
    pub val_dice: f64,
    pub seconds: f64,
    pub is_best: bool,
}

/// JSON has no NaN: a value that was not measured is written as null and read back as NaN.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_nan() {
            s.serialize_none()
        } else {
            s.serialize_f64(*v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// The per-epoch log of a run (empty before the first epoch ends).
pub fn read_log(run: &Path) -> Result<Vec<EpochLog>, TrainError> {
    let p = run.join(LOG_JSONL);
    if !p.is_file() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&p).map_err(io_err(&p))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .map_err(|e| TrainError::Run { dir: run.to_path_buf(), message: format!("{LOG_JSONL}: {e}") })
        })
        .collect()
}

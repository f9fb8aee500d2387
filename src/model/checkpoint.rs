//! Weights in and out: Meta's SAM / LiteMedSAM / official DeSAM `.pth` (zip + pickle, read in Rust),
//! and the project's safetensors (f32/f16). Owned by the `ckpt` task.
//! PLACEHOLDER SIGNATURES ONLY: the real implementation replaces this file.

use std::path::Path;
use tch::{nn, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{0}")]
    Other(String),
}

/// What loading into a VarStore did.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub loaded: usize,
    /// Variables absent from the checkpoint that were allowed to keep their fresh init.
    pub fresh: Vec<String>,
    /// Checkpoint tensors with no matching variable (ignored).
    pub unused: Vec<String>,
}

/// Read every tensor of a `.pth` (zip + pickle state dict, possibly nested under "model" or
/// "state_dict") or a `.safetensors` file, as (state-dict key, CPU tensor).
pub fn read_checkpoint(_path: &Path) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    Err(CheckpointError::Other("checkpoint reader not implemented yet".into()))
}

/// Copy named tensors into `vs` (names = VarStore paths). Every variable must be present with the
/// right shape, except those under one of `fresh_prefixes`, which keep their initialisation.
pub fn load_into(
    _vs: &mut nn::VarStore,
    _tensors: Vec<(String, Tensor)>,
    _fresh_prefixes: &[&str],
) -> Result<LoadReport, CheckpointError> {
    Err(CheckpointError::Other("checkpoint loader not implemented yet".into()))
}

/// Write named tensors as safetensors in `kind` (Float or Half).
pub fn save_safetensors(_tensors: &[(String, Tensor)], _path: &Path, _kind: Kind) -> Result<(), CheckpointError> {
    Err(CheckpointError::Other("safetensors writer not implemented yet".into()))
}

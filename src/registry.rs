//! A model registry: REG/versions/<V>/ (immutable model directories), REG/current.json (which version
//! serves, with the history rollback walks back) and REG/current (a relative symlink). Never deletes a version.

// Both pointers survive git (it stores symlinks); current.json also survives copies that drop symlinks,
// so it is the source of truth. Readers: `desam-train promote/rollback/adapt` and the Orthanc plugin
// (its `ModelDirectory` may name a registry or its `current` link; it reloads when current.json changes).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::modeldir::{self, ModelDirError};

pub const CURRENT_JSON: &str = "current.json";
pub const CURRENT_LINK: &str = "current";
pub const VERSIONS_DIR: &str = "versions";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Json { path: PathBuf, message: String },
    #[error("cannot promote {version}: {source}")]
    Promote { version: String, source: ModelDirError },
    #[error("cannot roll back to {version}: {source}")]
    RollbackTarget { version: String, source: ModelDirError },
    #[error("{}: nothing to roll back to", .0.display())]
    NothingToRollBack(PathBuf),
    #[error("{}: no current version (promote one)", .0.display())]
    NoCurrent(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io { path: path.to_path_buf(), source }
}

/// `current.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Current {
    pub version: Option<String>,
    /// Previously current versions, oldest first (rollback pops the last).
    pub history: Vec<String>,
}

/// The directory of one version.
pub fn version_dir(reg: &Path, version: &str) -> PathBuf {
    reg.join(VERSIONS_DIR).join(version)
}

/// The registry a path names: the registry folder itself (it holds current.json) or its `current`
/// link. A path straight to `versions/<V>` is a pinned model directory, not a registry.
pub fn registry_of(path: &Path) -> Option<PathBuf> {
    if path.join(CURRENT_JSON).is_file() {
        return Some(path.to_path_buf());
    }
    let parent = path.parent()?;
    let is_link = path.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink());
    (path.file_name().is_some_and(|n| n == CURRENT_LINK) && is_link && parent.join(CURRENT_JSON).is_file())
        .then(|| parent.to_path_buf())
}

/// current.json (an empty `Current` when the registry has none yet).
pub fn read_current(reg: &Path) -> Result<Current, RegistryError> {
    let p = reg.join(CURRENT_JSON);
    if !p.is_file() {
        return Ok(Current::default());
    }
    serde_json::from_slice(&std::fs::read(&p).map_err(io_err(&p))?)
        .map_err(|e| RegistryError::Json { path: p, message: e.to_string() })
}

fn write_current(reg: &Path, c: &Current) -> Result<(), RegistryError> {
    let p = reg.join(CURRENT_JSON);
    // Readers (a running plugin) must never see a half-written file: write beside, then rename.
    let tmp = reg.join(".current.json.partial");
    let text = serde_json::to_string_pretty(c).expect("Current serialises") + "\n";
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &p).map_err(io_err(&p))?;
    let link = reg.join(CURRENT_LINK);
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(&link).map_err(io_err(&link))?;
    }
    if let Some(v) = &c.version {
        #[cfg(unix)]
        std::os::unix::fs::symlink(Path::new(VERSIONS_DIR).join(v), &link).map_err(io_err(&link))?;
    }
    Ok(())
}

/// Makes `version` current (it must be a valid model directory under REG/versions/: hashes checked).
pub fn promote(reg: &Path, version: &str) -> Result<Current, RegistryError> {
    modeldir::open(&version_dir(reg, version))
        .map_err(|source| RegistryError::Promote { version: version.to_string(), source })?;
    let mut c = read_current(reg)?;
    if c.version.as_deref() == Some(version) {
        return Ok(c);
    }
    if let Some(old) = c.version.take() {
        c.history.push(old);
    }
    c.version = Some(version.to_string());
    write_current(reg, &c)?;
    Ok(c)
}

/// Goes back to the previously current version.
pub fn rollback(reg: &Path) -> Result<Current, RegistryError> {
    let mut c = read_current(reg)?;
    let prev = c.history.pop().ok_or_else(|| RegistryError::NothingToRollBack(reg.to_path_buf()))?;
    modeldir::open(&version_dir(reg, &prev))
        .map_err(|source| RegistryError::RollbackTarget { version: prev.clone(), source })?;
    c.version = Some(prev);
    write_current(reg, &c)?;
    Ok(c)
}

/// The model directory a registry's current.json points to.
pub fn current_dir(reg: &Path) -> Result<PathBuf, RegistryError> {
    let v = read_current(reg)?.version.ok_or_else(|| RegistryError::NoCurrent(reg.to_path_buf()))?;
    Ok(version_dir(reg, &v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_is_named_by_its_folder_or_its_current_link_but_not_by_a_version() {
        let reg = std::env::temp_dir().join(format!("desam-registry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&reg);
        std::fs::create_dir_all(version_dir(&reg, "1")).unwrap();
        assert_eq!(registry_of(&reg), None, "no current.json yet");
        write_current(&reg, &Current { version: Some("1".into()), history: vec![] }).unwrap();
        assert_eq!(registry_of(&reg), Some(reg.clone()));
        assert_eq!(registry_of(&reg.join(CURRENT_LINK)), Some(reg.clone()));
        assert_eq!(registry_of(&version_dir(&reg, "1")), None);
        assert_eq!(current_dir(&reg).unwrap(), version_dir(&reg, "1"));
        assert!(matches!(rollback(&reg), Err(RegistryError::NothingToRollBack(_))));
        let e = promote(&reg, "2").unwrap_err();
        assert!(e.to_string().starts_with("cannot promote 2: "), "{e}");
        std::fs::remove_dir_all(&reg).unwrap();
    }
}

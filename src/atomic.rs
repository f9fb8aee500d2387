//! Atomic file outputs: write beside the target under a hidden temporary name, rename into place on
//! success, remove the temporary file on every failure path (drop without `commit`).

use std::path::{Path, PathBuf};

/// A temporary file beside `target`; dropped without [`Pending::commit`] it is removed.
#[derive(Debug)]
pub struct Pending {
    tmp: PathBuf,
    target: PathBuf,
    done: bool,
}

impl Pending {
    /// A temporary name beside `target` that keeps its suffix (writers pick gzip from `.gz`).
    pub fn beside(target: &Path) -> Pending {
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = target.with_file_name(format!(".desam-tmp-{}-{name}", std::process::id()));
        Pending { tmp, target: target.to_path_buf(), done: false }
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the temporary file onto the target.
    pub fn commit(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.tmp, &self.target)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `target` atomically: the target is either the old file or the whole new one.
pub fn write(target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let p = Pending::beside(target);
    std::fs::write(p.path(), bytes)?;
    p.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_writes_leave_nothing_and_commits_replace_whole() {
        let d = std::env::temp_dir().join(format!("desam-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let target = d.join("out.nii.gz");
        {
            let p = Pending::beside(&target);
            assert!(p.path().to_string_lossy().ends_with(".nii.gz"));
            std::fs::write(p.path(), b"half").unwrap();
        } // dropped: a failure path
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        write(&target, b"whole").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        assert!(write(&d.join("missing-dir/x"), b"x").is_err());
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }
}

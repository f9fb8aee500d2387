//! Resource limits every reader checks BEFORE it allocates (pixels, voxels, decoded bytes, nesting,
//! HTTP bodies): one process-wide table, defaults in docs/limits.md, overridable by env or config.

use std::sync::RwLock;

/// The limits. Sizes are counts of pixels/voxels or bytes; a value of 0 is never valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields, default)]
pub struct Limits {
    /// Rows × Columns of one image slice (DICOM frame, NIfTI x × y). Default 2048².
    pub max_slice_pixels: u64,
    /// Voxels of one volume (all slices). Default 2^27 (e.g. 512² × 512, 1024² × 128).
    pub max_volume_voxels: u64,
    /// Bytes read from one input file (DICOM instance, NIfTI file) and decoded from one compressed
    /// stream (deflated DICOM, gzip). Default 1 GiB.
    pub max_file_bytes: u64,
    /// Bytes of one checkpoint (all storages of a `.pth`/safetensors file). Default 8 GiB (SAM ViT-H
    /// is 2.5 GB).
    pub max_checkpoint_bytes: u64,
    /// Decoded size over stored size of a zip member (zip-bomb guard). Default 32.
    pub max_zip_ratio: u64,
    /// Bytes of a checkpoint's pickle (`data.pkl`). Default 64 MiB.
    pub max_pickle_bytes: u64,
    /// Nesting of DICOM sequences, pickle containers and directory walks. Default 32.
    pub max_nesting: u64,
    /// Bytes of one HTTP answer body (`desam-train pull`). Default 2 GiB.
    pub max_http_body_bytes: u64,
    /// Frames of one DICOM-SEG. Default 65536.
    pub max_seg_frames: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_slice_pixels: 2048 * 2048,
            max_volume_voxels: 1 << 27,
            max_file_bytes: 1 << 30,
            max_checkpoint_bytes: 8 << 30,
            max_zip_ratio: 32,
            max_pickle_bytes: 64 << 20,
            max_nesting: 32,
            max_http_body_bytes: 2 << 30,
            max_seg_frames: 65_536,
        }
    }
}

/// Selects one limit of a `Limits` for an override.
pub type LimitField = fn(&mut Limits) -> &mut u64;

/// Environment variables that override single limits (`DESAM_MAX_SLICE_PIXELS=4194304`, ...).
pub const ENV_VARS: [(&str, LimitField); 9] = [
    ("DESAM_MAX_SLICE_PIXELS", |l| &mut l.max_slice_pixels),
    ("DESAM_MAX_VOLUME_VOXELS", |l| &mut l.max_volume_voxels),
    ("DESAM_MAX_FILE_BYTES", |l| &mut l.max_file_bytes),
    ("DESAM_MAX_CHECKPOINT_BYTES", |l| &mut l.max_checkpoint_bytes),
    ("DESAM_MAX_ZIP_RATIO", |l| &mut l.max_zip_ratio),
    ("DESAM_MAX_PICKLE_BYTES", |l| &mut l.max_pickle_bytes),
    ("DESAM_MAX_NESTING", |l| &mut l.max_nesting),
    ("DESAM_MAX_HTTP_BODY_BYTES", |l| &mut l.max_http_body_bytes),
    ("DESAM_MAX_SEG_FRAMES", |l| &mut l.max_seg_frames),
];

static CURRENT: RwLock<Option<Limits>> = RwLock::new(None);

impl Limits {
    /// The defaults with the `DESAM_MAX_*` environment variables applied; a malformed value is an
    /// error naming the variable.
    pub fn from_env() -> Result<Limits, String> {
        let mut l = Limits::default();
        for (name, field) in ENV_VARS {
            if let Ok(text) = std::env::var(name) {
                let v: u64 = text.trim().parse().map_err(|_| format!("{name}={text:?} is not a positive integer"))?;
                *field(&mut l) = v;
            }
        }
        l.validate()?;
        Ok(l)
    }

    pub fn validate(&self) -> Result<(), String> {
        let mut probe = *self;
        for (name, field) in ENV_VARS {
            if *field(&mut probe) == 0 {
                return Err(format!("limit {} must be at least 1", name.trim_start_matches("DESAM_")));
            }
        }
        Ok(())
    }
}

/// The limits in force: set by [`set`], else the defaults with the environment applied (a bad
/// environment value falls back to the default and is reported by [`check_env`]).
pub fn get() -> Limits {
    if let Some(l) = *CURRENT.read().unwrap_or_else(|p| p.into_inner()) {
        return l;
    }
    // The environment is read once per process: every reader asks, often per file.
    static FROM_ENV: std::sync::OnceLock<Limits> = std::sync::OnceLock::new();
    *FROM_ENV.get_or_init(|| Limits::from_env().unwrap_or_default())
}

/// Replaces the limits for the whole process (the plugin's `"Limits"` section, CLI flags).
pub fn set(limits: Limits) -> Result<(), String> {
    limits.validate()?;
    *CURRENT.write().unwrap_or_else(|p| p.into_inner()) = Some(limits);
    Ok(())
}

/// Error text when the environment holds a malformed limit (front doors report it at start).
pub fn check_env() -> Result<(), String> {
    Limits::from_env().map(|_| ())
}

/// `a × b × ...` with overflow reported as None (header-derived sizes).
pub fn product(factors: &[u64]) -> Option<u64> {
    factors.iter().try_fold(1u64, |acc, &f| acc.checked_mul(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_detects_overflow_and_defaults_are_valid() {
        assert_eq!(product(&[2048, 2048, 3]), Some(2048 * 2048 * 3));
        assert_eq!(product(&[1 << 48, 1 << 20]), None);
        Limits::default().validate().unwrap();
        let zero = Limits { max_nesting: 0, ..Limits::default() };
        assert!(zero.validate().unwrap_err().contains("MAX_NESTING"));
        let parsed: Limits = serde_json::from_str(r#"{"MaxSlicePixels": 1024}"#).unwrap();
        assert_eq!(parsed.max_slice_pixels, 1024);
        assert_eq!(parsed.max_nesting, Limits::default().max_nesting);
        assert!(serde_json::from_str::<Limits>(r#"{"MaxPixels": 1}"#).is_err());
    }
}

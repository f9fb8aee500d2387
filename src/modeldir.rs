//! A model directory: `model.json` (identity, architecture, weights with SHA-256, preprocessing,
//! thresholds, provenance) + safetensors. Reads, verifies and creates; runs no inference.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::model::Arch;

pub const MODEL_JSON: &str = "model.json";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    #[error("model directory {0} does not exist or is not a directory")]
    NotADirectory(PathBuf),
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid model.json: {message}")]
    Json { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("weights file {path} is missing")]
    MissingWeights { path: PathBuf },
    #[error("weights file {path} has SHA-256 {actual}, model.json says {expected}")]
    HashMismatch { path: PathBuf, expected: String, actual: String },
}

/// How an RGB 0–255 image becomes encoder input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Normalization {
    /// SAM ViT: (x − mean) / std per channel.
    MeanStd { mean: [f64; 3], std: [f64; 3] },
    /// LiteMedSAM: per-slice min-max to [0, 1].
    MinMax,
}

/// 3-D clean-up applied to the stacked slice masks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Cleanup3d {
    /// The official pipeline: none.
    #[default]
    None,
    /// Keep only the largest 3-D component (26-connectivity).
    KeepLargest,
    /// Drop 3-D components smaller than this many mL.
    MinVolume { ml: f64 },
}

/// How prompts are drawn on each slice (model.json `default_mode`; the engine runs either).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One whole-image box per slice (DeSAM-B).
    #[default]
    Box,
    /// N×N point grid with the automatic mask generator's filters (DeSAM-P).
    Grid,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "box" => Ok(Mode::Box),
            "grid" => Ok(Mode::Grid),
            other => Err(format!("unknown mode {other:?} (box or grid)")),
        }
    }
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Box => "box",
            Mode::Grid => "grid",
        }
    }
}

/// One weights file: relative to the model directory, or an absolute path (a user-supplied SAM `.pth`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsFile {
    pub path: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsSet {
    pub files: Vec<WeightsFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    pub normalization: Normalization,
    /// Per-volume intensity clip, in percentiles (spec §9: [0.5, 99.5]). A model trained with other
    /// values must be run with them, so they travel in model.json.
    #[serde(default = "default_clip_percentiles")]
    pub clip_percentiles: [f64; 2],
}

pub fn default_clip_percentiles() -> [f64; 2] {
    [0.5, 99.5]
}

impl Thresholds {
    /// `min_area` (given at 256×256) scaled to masks of `pixels` pixels.
    pub fn min_area_px(&self, pixels: usize) -> usize {
        (self.min_area * pixels as f64 / (256.0 * 256.0)).round() as usize
    }
}

/// Decision thresholds (spec §10.2 defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Thresholds {
    /// Grid mode: keep prompts whose predicted IoU is above this.
    pub iou: f64,
    /// Box-NMS IoU.
    pub nms: f64,
    /// Small-region clean-up area in pixels at 256×256 (scaled with the slice resolution).
    pub min_area: f64,
    /// Series quality score below which a result is flagged.
    pub qa: f64,
    /// Gland volumes (mL) the quality score treats as plausible; outside, its volume term falls.
    pub plausible_volume_ml: Option<[f64; 2]>,
}

impl Default for Thresholds {
    fn default() -> Self {
        // Prostate volumes: small glands are ~15 mL, large hyperplastic ones exceed 150 mL.
        Thresholds { iou: 0.5, nms: 0.7, min_area: 1000.0, qa: 0.5, plausible_volume_ml: Some([8.0, 300.0]) }
    }
}

/// `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub format: u32,
    pub name: String,
    pub version: String,
    pub arch: Arch,
    pub backbone: WeightsSet,
    pub decoder: WeightsSet,
    pub preprocessing: Preprocessing,
    #[serde(default)]
    pub default_mode: Mode,
    #[serde(default = "default_grid")]
    pub grid_points: usize,
    #[serde(default)]
    pub thresholds: Thresholds,
    #[serde(default)]
    pub cleanup_3d: Cleanup3d,
    /// Free-form: data, sites, epochs, seed, commit, metrics.
    #[serde(default)]
    pub training: serde_json::Value,
    /// True for a placeholder with a randomly initialised decoder: its masks mean nothing.
    pub untrained: bool,
}

fn default_grid() -> usize {
    9
}

/// A verified model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub dir: PathBuf,
    pub spec: ModelSpec,
    /// Absolute paths of the backbone and decoder weights, in model.json order.
    pub backbone_paths: Vec<PathBuf>,
    pub decoder_paths: Vec<PathBuf>,
}

impl ModelDir {
    /// SHA-256 identifying the backbone weights (hash of the per-file hashes; the cache key).
    pub fn backbone_sha256(&self) -> String {
        combined_hash(&self.spec.backbone.files)
    }
    /// SHA-256 identifying the whole model (backbone and decoder files).
    pub fn model_sha256(&self) -> String {
        let all: Vec<WeightsFile> = self.spec.backbone.files.iter().chain(&self.spec.decoder.files).cloned().collect();
        combined_hash(&all)
    }
}

fn combined_hash(files: &[WeightsFile]) -> String {
    if files.len() == 1 {
        return files[0].sha256.to_ascii_lowercase();
    }
    let mut h = Sha256::new();
    for f in files {
        h.update(f.sha256.to_ascii_lowercase().as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn invalid(path: &Path, message: impl Into<String>) -> ModelDirError {
    ModelDirError::Invalid { path: path.to_path_buf(), message: message.into() }
}

/// Read and validate `model.json` (no hashing).
pub fn read_spec(dir: &Path) -> Result<ModelSpec, ModelDirError> {
    if !dir.is_dir() {
        return Err(ModelDirError::NotADirectory(dir.to_path_buf()));
    }
    let path = dir.join(MODEL_JSON);
    let text = std::fs::read_to_string(&path).map_err(|source| ModelDirError::Io { path: path.clone(), source })?;
    let spec: ModelSpec =
        serde_json::from_str(&text).map_err(|e| ModelDirError::Json { path: path.clone(), message: e.to_string() })?;
    if spec.format != FORMAT_VERSION {
        return Err(invalid(&path, format!("format {} is not supported (expected {FORMAT_VERSION})", spec.format)));
    }
    if spec.backbone.files.is_empty() || spec.decoder.files.is_empty() {
        return Err(invalid(&path, "backbone and decoder each need at least one weights file"));
    }
    if spec.grid_points == 0 || spec.grid_points > 64 {
        return Err(invalid(&path, "grid_points must be in 1..=64"));
    }
    for f in spec.backbone.files.iter().chain(&spec.decoder.files) {
        if f.sha256.len() != 64 || !f.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(invalid(&path, format!("sha256 of {} is not 64 hex digits", f.path)));
        }
    }
    validate_values(&spec).map_err(|m| invalid(&path, m))?;
    Ok(spec)
}

/// Every value of model.json that the engine uses, checked once at load so that nothing fails (or
/// panics) at the first series: lengths, ranges, finiteness, weights paths inside the directory.
pub fn validate_values(spec: &ModelSpec) -> Result<(), String> {
    let text_ok = |s: &str| !s.trim().is_empty() && s.chars().count() <= 64 && !s.chars().any(char::is_control);
    if !text_ok(&spec.name) {
        return Err(format!("name must be 1 to 64 printable characters, not {:?}", spec.name));
    }
    if !text_ok(&spec.version) {
        return Err(format!("version must be 1 to 64 printable characters, not {:?}", spec.version));
    }
    check_clip_percentiles(spec.preprocessing.clip_percentiles).map_err(|m| format!("preprocessing.{m}"))?;
    if let Normalization::MeanStd { mean, std } = &spec.preprocessing.normalization {
        if mean.iter().chain(std).any(|v| !v.is_finite()) || std.iter().any(|&s| s <= 0.0) {
            return Err(format!(
                "preprocessing.normalization needs finite means and positive stds, got {mean:?} / {std:?}"
            ));
        }
    }
    let t = &spec.thresholds;
    let unit = |name: &str, v: f64, lo_open: bool| {
        let ok = v.is_finite() && v <= 1.0 && if lo_open { v > 0.0 } else { v >= 0.0 };
        if ok {
            Ok(())
        } else {
            Err(format!("thresholds.{name} must be within {}0, 1], got {v}", if lo_open { "(" } else { "[" }))
        }
    };
    // A negative IoU threshold is legitimate: it keeps every grid prompt.
    if !(t.iou.is_finite() && t.iou <= 1.0) {
        return Err(format!("thresholds.iou must be finite and at most 1, got {}", t.iou));
    }
    unit("nms", t.nms, true)?;
    unit("qa", t.qa, false)?;
    if !(t.min_area.is_finite() && (0.0..=65_536.0).contains(&t.min_area)) {
        return Err(format!("thresholds.min_area must be within [0, 65536] pixels at 256², got {}", t.min_area));
    }
    if let Some([lo, hi]) = t.plausible_volume_ml {
        if !(lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo < hi) {
            return Err(format!("thresholds.plausible_volume_ml must satisfy 0 ≤ low < high, got [{lo}, {hi}]"));
        }
    }
    let files = spec.backbone.files.iter().chain(&spec.decoder.files);
    if spec.backbone.files.len() + spec.decoder.files.len() > 16 {
        return Err("at most 16 weights files".into());
    }
    for f in files {
        let p = Path::new(&f.path);
        if f.path.is_empty()
            || (p.is_relative() && p.components().any(|c| !matches!(c, std::path::Component::Normal(_))))
        {
            return Err(format!(
                "weights path {:?} must be a plain path inside the model directory (or absolute)",
                f.path
            ));
        }
    }
    Ok(())
}

/// Read `model.json`, resolve the weights and check every file's SHA-256.
pub fn open(dir: &Path) -> Result<ModelDir, ModelDirError> {
    let spec = read_spec(dir)?;
    let resolve = |files: &[WeightsFile]| -> Result<Vec<PathBuf>, ModelDirError> {
        files
            .iter()
            .map(|f| {
                let p = Path::new(&f.path);
                let p = if p.is_absolute() { p.to_path_buf() } else { dir.join(p) };
                if !p.is_file() {
                    return Err(ModelDirError::MissingWeights { path: p });
                }
                let actual = sha256_file(&p).map_err(|source| ModelDirError::Io { path: p.clone(), source })?;
                if !actual.eq_ignore_ascii_case(&f.sha256) {
                    return Err(ModelDirError::HashMismatch { path: p, expected: f.sha256.clone(), actual });
                }
                Ok(p)
            })
            .collect()
    };
    let backbone_paths = resolve(&spec.backbone.files)?;
    let decoder_paths = resolve(&spec.decoder.files)?;
    Ok(ModelDir { dir: dir.to_path_buf(), spec, backbone_paths, decoder_paths })
}

/// Write `model.json` into `dir`.
pub fn write_spec(dir: &Path, spec: &ModelSpec) -> Result<(), ModelDirError> {
    let path = dir.join(MODEL_JSON);
    let text = serde_json::to_string_pretty(spec).expect("spec serialises");
    std::fs::write(&path, text + "\n").map_err(|source| ModelDirError::Io { path, source })
}

/// Check a clip given by a user: 0 ≤ lo < hi ≤ 100.
pub fn check_clip_percentiles(clip: [f64; 2]) -> Result<[f64; 2], String> {
    if clip.iter().all(|p| p.is_finite() && (0.0..=100.0).contains(p)) && clip[0] < clip[1] {
        Ok(clip)
    } else {
        Err(format!("clip percentiles must satisfy 0 ≤ low < high ≤ 100, got {clip:?}"))
    }
}

/// A copy of model directory `src` in `dst` that differs only in its intensity clip (a training
/// start whose encoder sees a different clip must be a different model). Relative weights files are
/// copied and re-verified; absolute ones stay referenced. `dst` must not hold a model yet.
pub fn derive_with_clip(src: &Path, dst: &Path, clip: [f64; 2]) -> Result<ModelDir, ModelDirError> {
    let clip = check_clip_percentiles(clip).map_err(|m| invalid(dst, m))?;
    let mut spec = open(src)?.spec;
    if dst.join(MODEL_JSON).exists() {
        return Err(invalid(dst, "already holds a model.json"));
    }
    std::fs::create_dir_all(dst).map_err(|source| ModelDirError::Io { path: dst.to_path_buf(), source })?;
    for f in spec.backbone.files.iter().chain(&spec.decoder.files) {
        if Path::new(&f.path).is_relative() {
            let (from, to) = (src.join(&f.path), dst.join(&f.path));
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|source| ModelDirError::Io { path: parent.to_path_buf(), source })?;
            }
            std::fs::copy(&from, &to).map_err(|source| ModelDirError::Io { path: from.clone(), source })?;
        }
    }
    spec.preprocessing.clip_percentiles = clip;
    write_spec(dst, &spec)?;
    open(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("desam-modeldir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn spec_with(files: (&str, &str)) -> ModelSpec {
        ModelSpec {
            format: 1,
            name: "t".into(),
            version: "0".into(),
            arch: Arch::Tiny,
            backbone: WeightsSet { files: vec![WeightsFile { path: files.0.into(), sha256: files.1.into() }] },
            decoder: WeightsSet { files: vec![WeightsFile { path: files.0.into(), sha256: files.1.into() }] },
            preprocessing: Preprocessing {
                normalization: Normalization::MinMax,
                clip_percentiles: default_clip_percentiles(),
            },
            default_mode: Mode::Box,
            grid_points: 9,
            thresholds: Thresholds::default(),
            cleanup_3d: Cleanup3d::None,
            training: serde_json::Value::Null,
            untrained: true,
        }
    }

    #[test]
    fn verifies_hashes_and_reports_problems() {
        let d = tmpdir("hash");
        std::fs::write(d.join("w.bin"), b"abc").unwrap();
        let good = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&d.join("w.bin")).unwrap(), good);
        write_spec(&d, &spec_with(("w.bin", good))).unwrap();
        let m = open(&d).unwrap();
        assert_eq!(m.backbone_sha256(), good);
        assert_ne!(m.model_sha256(), good);
        let bad = "0".repeat(64);
        write_spec(&d, &spec_with(("w.bin", &bad))).unwrap();
        assert!(matches!(open(&d), Err(ModelDirError::HashMismatch { .. })));
        write_spec(&d, &spec_with(("nope.bin", good))).unwrap();
        assert!(matches!(open(&d), Err(ModelDirError::MissingWeights { .. })));
        std::fs::write(d.join(MODEL_JSON), "{\"format\":1}").unwrap();
        let e = open(&d).unwrap_err();
        assert!(matches!(e, ModelDirError::Json { .. }) && !e.to_string().contains('\n'), "{e}");
        assert!(matches!(open(&d.join("absent")), Err(ModelDirError::NotADirectory(_))));
        let json = serde_json::to_string(&spec_with(("w.bin", good))).unwrap().replace("\"tiny\"", "\"resnet\"");
        std::fs::write(d.join(MODEL_JSON), json).unwrap();
        let e = open(&d).unwrap_err();
        assert!(matches!(e, ModelDirError::Json { .. }) && e.to_string().contains("resnet"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

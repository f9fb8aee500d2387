//! The embedding store: runs the frozen encoder once per slice through the engine's own
//! preprocessing and writes f16 safetensors shards (one per case) + labels + a JSON index.
//! Owns the store format and its reader; never trains and never edits the source data.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::augment::{self, AugmentParams};
use super::data::{self, CaseRef};
use super::synth::{self, SynthParams};
use super::{io_err, TrainError};
use crate::engine::{preprocess, DeviceChoice, EngineOptions, Segmenter};
use crate::model::Features;

pub const INDEX_JSON: &str = "index.json";
pub const STORE_JSON: &str = "store.json";
pub const FORMAT: u32 = 1;

/// What the store was built with; a resumed precompute must match it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreConfig {
    pub format: u32,
    pub arch: String,
    /// The model directory whose encoder produced the features (and whose decoder starts training).
    pub model_dir: PathBuf,
    pub backbone_sha256: String,
    pub image_size: i64,
    pub output_size: i64,
    pub tap_count: usize,
    pub all_slices: bool,
    pub feature_dtype: String,
    pub data_dir: PathBuf,
    pub sites: Vec<String>,
    /// Intensity-augmented copies stored per case (train/augment.rs); 0 in older stores.
    #[serde(default)]
    pub augment: usize,
    #[serde(default)]
    pub augment_seed: u64,
    /// Every K-th foreground slice of a case is stored (1: all; older stores).
    #[serde(default = "one")]
    pub slice_stride: usize,
    /// Slices without gland stored beyond each end of the gland (so a fit can learn where the gland
    /// stops; 0 in older stores).
    #[serde(default)]
    pub background_margin: usize,
    /// SynthSeg-style copies per case drawn from its tissue map (train/synth.rs); 0 in older stores.
    #[serde(default)]
    pub synth: usize,
}

fn one() -> usize {
    1
}

/// One case in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredCase {
    pub id: String,
    pub site: String,
    pub patient: String,
    /// Relative to the store directory.
    pub shard: String,
    /// Source slice index of each stored row.
    pub z: Vec<usize>,
    /// Whether each stored row's label (at output size) has foreground.
    pub foreground: Vec<bool>,
    pub dims: [usize; 3],
    pub spacing: [f64; 3],
    pub bytes: u64,
    /// For an augmented copy: the id of the case it was made from (same patient, same split side;
    /// never used for validation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augmented_from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augmentation: Option<AugmentParams>,
    /// For a synthetic copy: what was drawn (its image was painted from the source's tissue map).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthesis: Option<SynthParams>,
}

/// `index.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreIndex {
    pub config: StoreConfig,
    pub manifest_hash: String,
    pub cases: Vec<StoredCase>,
    pub slices: usize,
    pub bytes: u64,
    pub bytes_per_slice: u64,
    pub encode_seconds: f64,
    pub slices_per_second: f64,
}

pub struct PrecomputeOptions {
    pub data: PathBuf,
    pub out: PathBuf,
    pub model_dir: PathBuf,
    pub all_slices: bool,
    /// Only these sites (empty: all).
    pub sites: Vec<String>,
    pub device: DeviceChoice,
    pub threads: Option<usize>,
    pub batch: usize,
    pub progress: bool,
    /// Intensity-augmented copies per case (training stores only; 0: none).
    pub augment: usize,
    pub augment_seed: u64,
    /// Store every K-th foreground slice (adjacent slices are nearly the same training sample; 1: all).
    pub slice_stride: usize,
    /// Also store the slices without gland that lie at most this many slices beyond the gland's
    /// first and last slice (training stores; a fit with `train_background` learns to stop there).
    pub background_margin: usize,
    /// SynthSeg-style copies per case, painted from its tissue map (training stores only; 0: none).
    pub synth: usize,
    /// Encode as the engine does (its default precision, e.g. bf16 on a CPU, instead of f32) and
    /// through its feature cache in this folder, so that a later engine run on the same cases
    /// (`desam-train adapt`'s checks) finds their slices encoded. None: f32, no cache.
    pub feature_cache: Option<PathBuf>,
}

fn store_err(dir: &Path, message: impl Into<String>) -> TrainError {
    TrainError::Store { dir: dir.to_path_buf(), message: message.into() }
}

/// Resize a stack of binary label slices [n, h, w] to [n, side, side] with centre-aligned nearest
/// neighbour (skimage order 0, as the official preprocessing).
pub fn labels_at(mask: &[u8], dims: [usize; 3], zs: &[usize], side: i64) -> Tensor {
    let (h, w) = (dims[1], dims[2]);
    let mut buf = Vec::with_capacity(zs.len() * h * w);
    for &z in zs {
        buf.extend_from_slice(&mask[z * h * w..(z + 1) * h * w]);
    }
    let t = Tensor::from_slice(&buf).view([zs.len() as i64, 1, h as i64, w as i64]).to_kind(Kind::Float);
    t.internal_upsample_nearest_exact2d([side, side], None, None).gt(0.5).to_kind(Kind::Uint8).view([
        zs.len() as i64,
        side,
        side,
    ])
}

/// The slices a training store keeps: every `stride`-th slice with gland, plus the slices without
/// gland at most `margin` slices beyond the gland's first and last one (ascending).
pub fn training_slices(foreground: &[bool], stride: usize, margin: usize) -> Vec<usize> {
    let fg: Vec<usize> = (0..foreground.len()).filter(|&z| foreground[z]).collect();
    let mut zs: Vec<usize> = fg.iter().copied().step_by(stride.max(1)).collect();
    if let (Some(&lo), Some(&hi), true) = (fg.first(), fg.last(), margin > 0) {
        let beyond = (lo.saturating_sub(margin)..lo).chain(hi + 1..(hi + 1 + margin).min(foreground.len()));
        zs.extend(beyond.filter(|&z| !foreground[z]));
        zs.sort_unstable();
    }
    zs
}

/// Runs the precompute. Cases with a finished shard (its `.json` sidecar exists) are skipped.
pub fn precompute(opts: &PrecomputeOptions) -> Result<StoreIndex, TrainError> {
    let out = &opts.out;
    std::fs::create_dir_all(out.join("shards")).map_err(io_err(out))?;
    let mut cases = data::list_cases(&opts.data)?;
    if !opts.sites.is_empty() {
        cases.retain(|c| opts.sites.contains(&c.site));
        if cases.is_empty() {
            return Err(TrainError::Invalid(format!("no case of sites {:?} in {}", opts.sites, opts.data.display())));
        }
    }
    let manifest_hash = data::manifest_hash(&cases)?;
    let engine = Segmenter::from_model_dir(
        &opts.model_dir,
        EngineOptions {
            device: opts.device,
            threads: opts.threads,
            dtype: if opts.feature_cache.is_some() { None } else { Some(Kind::Float) },
            batch_size: Some(opts.batch),
            cache_dir: opts.feature_cache.clone(),
        },
    )?;
    let cfg = engine.config().clone();
    let config = StoreConfig {
        format: FORMAT,
        arch: cfg.arch.name().into(),
        model_dir: std::fs::canonicalize(&opts.model_dir).map_err(io_err(&opts.model_dir))?,
        backbone_sha256: engine.model_dir().backbone_sha256(),
        image_size: cfg.image_size,
        output_size: cfg.output_size,
        tap_count: cfg.tap_count,
        all_slices: opts.all_slices,
        feature_dtype: "f16".into(),
        data_dir: std::fs::canonicalize(&opts.data).map_err(io_err(&opts.data))?,
        sites: opts.sites.clone(),
        augment: opts.augment,
        augment_seed: opts.augment_seed,
        slice_stride: opts.slice_stride.max(1),
        background_margin: if opts.all_slices { 0 } else { opts.background_margin },
        synth: opts.synth,
    };
    if opts.slice_stride > 1 && opts.all_slices {
        return Err(TrainError::Invalid(
            "--slice-stride is for training stores; an --all-slices (evaluation) store holds every slice".into(),
        ));
    }
    if (opts.augment > 0 || opts.synth > 0) && opts.all_slices {
        return Err(TrainError::Invalid(
            "--augment and --synth are for training stores; an --all-slices (evaluation) store must hold the real images"
                .into(),
        ));
    }
    if opts.synth > 0 {
        // Every case needs its tissue map: say which one lacks it before encoding anything.
        if let Some(c) = cases.iter().find(|c| data::tissue_map_path(c).is_none_or(|p| !p.is_file())) {
            return Err(TrainError::Invalid(format!(
                "--synth needs every case's tissue map and case {} has none (expected {}; `desam phantom --tissue-map` writes them)",
                c.id,
                data::tissue_map_path(c).map(|p| p.display().to_string()).unwrap_or_else(|| "a NIfTI or DICOM case".into())
            )));
        }
    }
    let store_json = out.join(STORE_JSON);
    if store_json.is_file() {
        let old: StoreConfig = serde_json::from_slice(&std::fs::read(&store_json).map_err(io_err(&store_json))?)
            .map_err(|e| store_err(out, format!("store.json: {e}")))?;
        if old != config {
            return Err(store_err(
                out,
                "was built with a different model, data folder or slice selection; use a new --out",
            ));
        }
    } else {
        std::fs::write(&store_json, serde_json::to_string_pretty(&config).unwrap()).map_err(io_err(&store_json))?;
    }

    let bar =
        if opts.progress { indicatif::ProgressBar::new(cases.len() as u64) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} cases, ETA {eta} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    let mut encode_s = 0.0;
    let mut encoded = 0usize;
    let mut stored = Vec::new();
    for (case_no, case) in cases.iter().enumerate() {
        // Copy 0 is the case itself; copies 1..=augment are intensity-augmented, the next `synth` ones
        // are painted from the tissue map.
        for copy in 0..=opts.augment + opts.synth {
            let synth_no = copy.checked_sub(opts.augment).filter(|&k| k > 0);
            let id = match (copy, synth_no) {
                (0, _) => case.id.clone(),
                (_, Some(k)) => format!("{}~synth{k}", case.id),
                _ => format!("{}~aug{copy}", case.id),
            };
            let sidecar = out.join("shards").join(format!("{id}.json"));
            if sidecar.is_file() {
                let sc: StoredCase = serde_json::from_slice(&std::fs::read(&sidecar).map_err(io_err(&sidecar))?)
                    .map_err(|e| store_err(out, format!("{}: {e}", sidecar.display())))?;
                stored.push(sc);
                continue;
            }
            let seed = opts.augment_seed.wrapping_mul(1_000_003).wrapping_add((case_no * 1000 + copy) as u64);
            let variant = match synth_no {
                Some(_) => Variant::Synthetic(seed),
                None if copy > 0 => Variant::Augmented(AugmentParams::draw(seed), seed ^ 0x5eed),
                None => Variant::Original,
            };
            let t = Instant::now();
            let sc = precompute_case(&engine, case, &id, &variant, out, opts.all_slices, &config)?;
            encode_s += t.elapsed().as_secs_f64();
            encoded += sc.z.len();
            std::fs::write(&sidecar, serde_json::to_string(&sc).unwrap()).map_err(io_err(&sidecar))?;
            stored.push(sc);
            write_index(out, &config, &stored, &manifest_hash, encode_s, encoded, &cases)?;
        }
        bar.inc(1);
        if encode_s > 0.0 {
            bar.set_message(format!("{:.2} slices/s", encoded as f64 / encode_s));
        }
    }
    bar.finish();
    let index = write_index(out, &config, &stored, &manifest_hash, encode_s, encoded, &cases)?;
    Ok(index)
}

/// Writes `index.json` for the cases finished so far (after every case, so that an interrupted
/// precompute leaves a usable store of its first cases; the manifest hash then covers only those).
fn write_index(
    out: &Path,
    config: &StoreConfig,
    stored: &[StoredCase],
    full_manifest: &str,
    encode_s: f64,
    encoded: usize,
    cases: &[CaseRef],
) -> Result<StoreIndex, TrainError> {
    let slices: usize = stored.iter().map(|c| c.z.len()).sum();
    let bytes: u64 = stored.iter().map(|c| c.bytes).sum();
    let originals = stored.iter().filter(|c| c.augmented_from.is_none()).count();
    let manifest_hash = if originals == cases.len() {
        full_manifest.to_string()
    } else {
        let done: Vec<CaseRef> = cases.iter().filter(|c| stored.iter().any(|s| s.id == c.id)).cloned().collect();
        data::manifest_hash(&done)?
    };
    let index = StoreIndex {
        config: config.clone(),
        manifest_hash,
        cases: stored.to_vec(),
        slices,
        bytes,
        bytes_per_slice: if slices > 0 { bytes / slices as u64 } else { 0 },
        encode_seconds: encode_s,
        slices_per_second: if encode_s > 0.0 { encoded as f64 / encode_s } else { 0.0 },
    };
    let p = out.join(INDEX_JSON);
    let tmp = out.join(".index.json.partial");
    std::fs::write(&tmp, serde_json::to_string_pretty(&index).unwrap()).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &p).map_err(io_err(&p))?;
    Ok(index)
}

/// What a stored copy of a case is made of.
enum Variant {
    Original,
    /// Intensity-augmented (train/augment.rs) with a noise seed.
    Augmented(AugmentParams, u64),
    /// Painted from the tissue map (train/synth.rs); the seed of its parameters (drawn for the
    /// tissue codes the map holds) and of its noise.
    Synthetic(u64),
}

fn precompute_case(
    engine: &Segmenter,
    case: &CaseRef,
    id: &str,
    variant: &Variant,
    out: &Path,
    all_slices: bool,
    config: &StoreConfig,
) -> Result<StoredCase, TrainError> {
    let mut lc = data::load_case(case, true)?;
    let mut synthesis = None;
    match variant {
        Variant::Original => {}
        Variant::Augmented(params, noise_seed) => {
            let geom = augment::GlandGeometry::from_label(
                &lc.label.data,
                lc.label.dims,
                lc.volume.spacing,
                lc.volume.direction,
            );
            lc.volume.voxels = augment::apply(&lc.volume.voxels, lc.volume.dims, &geom, params, *noise_seed);
        }
        Variant::Synthetic(seed) => {
            let tissues = data::load_tissue_map(case, lc.volume.dims)?;
            let codes = tissues.iter().copied().max().unwrap_or(0) as usize + 1;
            let params = SynthParams::draw(*seed, codes);
            let (image, label) = synth::synthesise(
                &tissues,
                &lc.label.data,
                lc.volume.dims,
                lc.volume.spacing,
                lc.volume.direction,
                &params,
                *seed,
            );
            lc.volume.voxels = image;
            lc.label.data = label;
            synthesis = Some(params);
        }
    }
    let cfg = engine.config();
    let dims = lc.volume.dims;
    let all: Vec<usize> = (0..dims[0]).collect();
    let labels_all = labels_at(&lc.label.data, dims, &all, cfg.output_size);
    let fg_all: Vec<bool> =
        (0..dims[0]).map(|z| labels_all.get(z as i64).sum(Kind::Int64).int64_value(&[]) > 0).collect();
    let zs: Vec<usize> =
        if all_slices { all.clone() } else { training_slices(&fg_all, config.slice_stride, config.background_margin) };
    if zs.is_empty() {
        return Err(TrainError::EmptyLabel { case: case.id.clone() });
    }
    let u8vol = preprocess::normalize_intensity(&lc.volume.voxels, engine.clip_percentiles());
    let mut taps: Vec<Vec<Tensor>> = (0..cfg.tap_count).map(|_| Vec::new()).collect();
    let mut necks = Vec::new();
    // Contiguous runs of selected slices, encoded in engine-sized batches.
    let mut i = 0;
    let batch = 4usize;
    while i < zs.len() {
        let mut j = i + 1;
        while j < zs.len() && zs[j] == zs[j - 1] + 1 && j - i < batch {
            j += 1;
        }
        let fs: Vec<Features> = if engine.has_cache() {
            engine
                .encode_slices_cached(&u8vol, dims, zs[i], zs[j - 1] + 1)
                .map_err(|e| TrainError::Model(e.to_string()))?
        } else {
            vec![engine.encode_slices(&u8vol, dims, zs[i], zs[j - 1] + 1)]
        };
        for f in fs {
            for (k, t) in f.taps.iter().enumerate() {
                taps[k].push(t.to_device(Device::Cpu).to_kind(Kind::Half));
            }
            necks.push(f.neck.to_device(Device::Cpu).to_kind(Kind::Half));
        }
        i = j;
    }
    let idx = Tensor::from_slice(&zs.iter().map(|&z| z as i64).collect::<Vec<_>>());
    let mut named: Vec<(String, Tensor)> =
        taps.iter().enumerate().map(|(k, v)| (format!("tap{k}"), Tensor::cat(v, 0).contiguous())).collect();
    named.push(("neck".into(), Tensor::cat(&necks, 0).contiguous()));
    named.push(("label".into(), labels_all.index_select(0, &idx).contiguous()));
    named.push(("z".into(), idx));
    let shard_rel = format!("shards/{id}.safetensors");
    let shard = out.join(&shard_rel);
    let tmp = out.join(format!("shards/{id}.safetensors.partial"));
    Tensor::write_safetensors(&named, &tmp)?;
    std::fs::rename(&tmp, &shard).map_err(io_err(&shard))?;
    let bytes = std::fs::metadata(&shard).map_err(io_err(&shard))?.len();
    Ok(StoredCase {
        id: id.to_string(),
        site: case.site.clone(),
        patient: case.patient.clone(),
        shard: shard_rel,
        foreground: zs.iter().map(|&z| fg_all[z]).collect(),
        z: zs,
        dims,
        spacing: lc.volume.spacing,
        bytes,
        augmented_from: (!matches!(variant, Variant::Original)).then(|| case.id.clone()),
        augmentation: match variant {
            Variant::Augmented(p, _) => Some(p.clone()),
            _ => None,
        },
        synthesis,
    })
}

/// Reads `index.json`.
pub fn read_index(dir: &Path) -> Result<StoreIndex, TrainError> {
    let p = dir.join(INDEX_JSON);
    let bytes = std::fs::read(&p)
        .map_err(|e| store_err(dir, format!("cannot read {INDEX_JSON} ({e}); run `desam-train precompute` first")))?;
    serde_json::from_slice(&bytes).map_err(|e| store_err(dir, format!("{INDEX_JSON}: {e}")))
}

#[derive(Debug, Clone)]
struct TensorEntry {
    kind: Kind,
    shape: Vec<i64>,
    start: u64,
    row_bytes: u64,
}

/// Reads single rows (slices) of shards without loading whole files: safetensors stores each
/// tensor contiguously, so row i of an [n, …] tensor is one byte range.
#[derive(Debug, Default)]
pub struct ShardReader {
    headers: HashMap<PathBuf, HashMap<String, TensorEntry>>,
}

impl ShardReader {
    fn header(&mut self, path: &Path) -> Result<&HashMap<String, TensorEntry>, TrainError> {
        if !self.headers.contains_key(path) {
            let bad = |m: String| TrainError::Data { path: path.to_path_buf(), message: m };
            let mut f = File::open(path).map_err(io_err(path))?;
            let mut len = [0u8; 8];
            f.read_exact(&mut len).map_err(io_err(path))?;
            let n = u64::from_le_bytes(len);
            if n > 100 << 20 {
                return Err(bad("safetensors header too large".into()));
            }
            let mut js = vec![0u8; n as usize];
            f.read_exact(&mut js).map_err(io_err(path))?;
            let v: serde_json::Value = serde_json::from_slice(&js).map_err(|e| bad(format!("header: {e}")))?;
            let mut map = HashMap::new();
            for (name, e) in v.as_object().ok_or_else(|| bad("header is not an object".into()))? {
                if name == "__metadata__" {
                    continue;
                }
                let dtype = e["dtype"].as_str().unwrap_or("");
                let (kind, size) = crate::model::checkpoint::safetensors_kind(dtype)
                    .map(|(kind, bytes)| (kind, bytes as u64))
                    .ok_or_else(|| bad(format!("{name}: unsupported dtype {dtype}")))?;
                let shape: Vec<i64> =
                    e["shape"].as_array().map(|a| a.iter().filter_map(|x| x.as_i64()).collect()).unwrap_or_default();
                if shape.is_empty() || shape.len() > 8 || shape.iter().any(|&d| d < 0) {
                    return Err(bad(format!("{name}: shape {shape:?} is not a stack of rows")));
                }
                let off = e["data_offsets"].as_array().and_then(|a| Some((a.first()?.as_u64()?, a.get(1)?.as_u64()?)));
                let (a, b) = off.ok_or_else(|| bad(format!("{name}: no data_offsets")))?;
                // Checked arithmetic: a tampered header must be an error, not an overflow or a huge buffer.
                let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
                let row_bytes = crate::limits::product(&dims[1..]).and_then(|n| n.checked_mul(size));
                let total = row_bytes.and_then(|r| r.checked_mul(dims[0]));
                let file_len = f.metadata().map_err(io_err(path))?.len();
                let (Some(row_bytes), Some(total)) = (row_bytes, total) else {
                    return Err(bad(format!("{name}: shape {shape:?} overflows")));
                };
                if b < a || total != b - a || (8 + n).checked_add(b).is_none_or(|end| end > file_len) {
                    return Err(bad(format!("{name}: data length does not match its shape or the file")));
                }
                map.insert(name.clone(), TensorEntry { kind, shape, start: 8 + n + a, row_bytes });
            }
            self.headers.insert(path.to_path_buf(), map);
        }
        Ok(&self.headers[path])
    }

    /// Row `row` of tensor `name` (shape without the leading axis).
    pub fn row(&mut self, path: &Path, name: &str, row: usize) -> Result<Tensor, TrainError> {
        let e = self
            .header(path)?
            .get(name)
            .cloned()
            .ok_or_else(|| TrainError::Data { path: path.to_path_buf(), message: format!("no tensor {name}") })?;
        if row as i64 >= e.shape[0] {
            return Err(TrainError::Data {
                path: path.to_path_buf(),
                message: format!("{name}: row {row} out of range"),
            });
        }
        let mut f = File::open(path).map_err(io_err(path))?;
        f.seek(SeekFrom::Start(e.start + row as u64 * e.row_bytes)).map_err(io_err(path))?;
        let mut buf = vec![0u8; e.row_bytes as usize];
        f.read_exact(&mut buf).map_err(io_err(path))?;
        let shape: Vec<i64> = e.shape[1..].to_vec();
        Ok(Tensor::f_from_data_size(&buf, &shape, e.kind)?)
    }
}

/// One training sample's inputs, read from the store: features (batch 1, f32) and its label.
pub fn read_sample(
    reader: &mut ShardReader,
    store: &Path,
    case: &StoredCase,
    row: usize,
    tap_count: usize,
) -> Result<(Features, Tensor), TrainError> {
    let p = store.join(&case.shard);
    let mut taps = Vec::with_capacity(tap_count);
    for k in 0..tap_count {
        taps.push(reader.row(&p, &format!("tap{k}"), row)?.to_kind(Kind::Float).unsqueeze(0));
    }
    let neck = reader.row(&p, "neck", row)?.to_kind(Kind::Float).unsqueeze(0);
    let label = reader.row(&p, "label", row)?.unsqueeze(0);
    Ok((Features { taps, neck }, label))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gland on slices 3..=6 of 10: stride thins the gland slices only; the margin adds the slices just
    /// beyond each end, clipped at the volume's edges, never a gland slice twice.
    #[test]
    fn training_slices_take_the_stride_and_the_margin() {
        let fg: Vec<bool> = (0..10).map(|z| (3..=6).contains(&z)).collect();
        assert_eq!(training_slices(&fg, 1, 0), vec![3, 4, 5, 6]);
        assert_eq!(training_slices(&fg, 2, 0), vec![3, 5]);
        assert_eq!(training_slices(&fg, 1, 2), vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(training_slices(&fg, 2, 5), vec![0, 1, 2, 3, 5, 7, 8, 9]);
        assert!(training_slices(&[false; 4], 1, 2).is_empty());
    }

    /// A shard header is attacker-controlled input (a tampered store): sizes that overflow, negative
    /// dimensions or data past the file's end are errors, never a panic or a huge buffer.
    #[test]
    fn tampered_shard_headers_are_errors() {
        let dir = std::env::temp_dir().join(format!("desam-shard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, header: &str, data: usize| {
            let p = dir.join(name);
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend(std::iter::repeat_n(0u8, data));
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let good = write("good.safetensors", r#"{"neck":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]}}"#, 12);
        let mut r = ShardReader::default();
        assert_eq!(r.row(&good, "neck", 1).unwrap().size(), vec![3]);
        for (name, header) in [
            (
                "overflow",
                r#"{"neck":{"dtype":"F16","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,12]}}"#,
            ),
            ("negative", r#"{"neck":{"dtype":"F16","shape":[2,-3],"data_offsets":[0,12]}}"#),
            ("scalar", r#"{"neck":{"dtype":"F16","shape":[],"data_offsets":[0,2]}}"#),
            ("past_end", r#"{"neck":{"dtype":"F16","shape":[1000000,3],"data_offsets":[0,6000000]}}"#),
            ("reversed", r#"{"neck":{"dtype":"F16","shape":[0,3],"data_offsets":[12,0]}}"#),
        ] {
            let p = write(&format!("{name}.safetensors"), header, 12);
            let e = ShardReader::default().row(&p, "neck", 0).unwrap_err();
            assert!(matches!(e, TrainError::Data { .. }), "{name}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

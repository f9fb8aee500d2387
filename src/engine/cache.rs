//! On-disk cache of encoder features: one f16 safetensors file per slice, keyed by the backbone's
//! SHA-256 and a hash of the slice's exact encoder input. Never stores masks; a miss is never an error.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

use crate::model::Features;

#[derive(Debug, Clone)]
pub struct FeatureCache {
    dir: PathBuf,
}

impl FeatureCache {
    /// A cache under `root`/<first 16 hex digits of the backbone hash>.
    pub fn new(root: &Path, backbone_sha256: &str) -> std::io::Result<Self> {
        let dir = root.join(&backbone_sha256[..16.min(backbone_sha256.len())]);
        std::fs::create_dir_all(&dir)?;
        Ok(FeatureCache { dir })
    }

    /// The key of one slice: SHA-256 of its encoder input (1×3×S×S f32, contiguous).
    pub fn key(input: &Tensor) -> String {
        let t = input.to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
        let n = t.numel();
        let mut v = vec![0f32; n];
        t.view([-1]).copy_data(&mut v, n);
        let mut h = Sha256::new();
        h.update(format!("{:?}", t.size()).as_bytes());
        for x in v {
            h.update(x.to_le_bytes());
        }
        hex::encode(h.finalize())
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.safetensors"))
    }

    /// Features of one slice (batch 1, f16 on the CPU) if present, readable and shaped as the model
    /// expects (neck 1×`neck_dim`×g×g, taps 4-D of batch 1): a corrupt entry is a miss, not a panic.
    pub fn get(&self, key: &str, tap_count: usize, neck_shape: [i64; 4]) -> Option<Features> {
        let p = self.path(key);
        if !p.is_file() {
            return None;
        }
        let tensors = Tensor::read_safetensors(&p).ok()?;
        let find = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone());
        let neck = find("neck")?;
        let taps: Option<Vec<Tensor>> = (0..tap_count).map(|i| find(&format!("tap{i}"))).collect();
        let taps = taps?;
        let float = |t: &Tensor| matches!(t.kind(), Kind::Half | Kind::Float | Kind::BFloat16);
        if neck.size() != neck_shape
            || !float(&neck)
            || taps.iter().any(|t| t.dim() != 4 || t.size()[0] != 1 || !float(t))
        {
            return None;
        }
        Some(Features { taps, neck })
    }

    /// Store one slice's features (batch 1) as f16. Written to a temporary name then renamed, so a
    /// concurrent reader never sees half a file.
    pub fn put(&self, key: &str, f: &Features) -> std::io::Result<()> {
        let mut named: Vec<(String, Tensor)> = vec![("neck".into(), half_cpu(&f.neck))];
        for (i, t) in f.taps.iter().enumerate() {
            named.push((format!("tap{i}"), half_cpu(t)));
        }
        let tmp = self.dir.join(format!("{key}.{}.tmp", std::process::id()));
        Tensor::write_safetensors(&named, &tmp).map_err(|e| std::io::Error::other(e.to_string()))?;
        std::fs::rename(&tmp, self.path(key))
    }
}

fn half_cpu(t: &Tensor) -> Tensor {
    t.to_device(tch::Device::Cpu).to_kind(Kind::Half).contiguous()
}

/// Features rounded through f16 (what the cache stores), so that a cache miss and a later hit give
/// bit-identical decoder input.
pub fn round_to_half(f: &Features) -> Features {
    Features {
        taps: f.taps.iter().map(|t| t.to_kind(Kind::Half).to_kind(t.kind())).collect(),
        neck: f.neck.to_kind(Kind::Half).to_kind(f.neck.kind()),
    }
}

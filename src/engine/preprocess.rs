//! Intensity and geometry preprocessing of a volume into encoder input, as the official pipeline
//! (spec §9): per-volume percentile clip to 0–255, per-slice resize to 256 then to the backbone input.
//! Pure arrays and CPU tensors; no model, no files.

pub use crate::modeldir::Normalization;
use tch::{Kind, Tensor};

/// Side of the intermediate "stored slice" of the official pipeline (spec §9: everything runs at 256).
pub const STORED_SIDE: i64 = 256;

/// Value at percentile `p` (0–100) with numpy's default linear interpolation. `values` is reordered.
pub fn percentile(values: &mut [f32], p: f64) -> f32 {
    assert!(!values.is_empty());
    let n = values.len();
    // model.json's clip is validated at load; clamping here keeps any other caller in range too.
    let p = if p.is_finite() { p.clamp(0.0, 100.0) } else { 50.0 };
    let pos = p / 100.0 * (n - 1) as f64;
    let lo = pos.floor() as usize;
    let frac = pos - lo as f64;
    let (_, &mut a, rest) = values.select_nth_unstable_by(lo, |x, y| x.total_cmp(y));
    let a = a as f64;
    if frac == 0.0 || rest.is_empty() {
        return a as f32;
    }
    let b = rest.iter().copied().fold(f32::INFINITY, f32::min) as f64;
    (a + frac * (b - a)) as f32
}

/// Per-volume intensity (spec §9): clip to the `clip` percentiles (official: [0.5, 99.5]), min-max to
/// 0..255, voxels that were exactly 0 stay 0, truncate to u8. A constant volume maps to all zeros.
pub fn normalize_intensity(voxels: &[f32], clip: [f64; 2]) -> Vec<u8> {
    if voxels.is_empty() {
        return Vec::new();
    }
    let mut tmp: Vec<f32> = voxels.iter().map(|&v| if v.is_finite() { v } else { 0.0 }).collect();
    let lo = percentile(&mut tmp, clip[0]);
    let hi = percentile(&mut tmp, clip[1]);
    drop(tmp);
    let range = hi - lo;
    voxels
        .iter()
        .map(|&v| {
            if v == 0.0 || !v.is_finite() || range <= 0.0 {
                return 0u8;
            }
            let c = v.clamp(lo, hi);
            (((c - lo) / range) * 255.0).clamp(0.0, 255.0) as u8
        })
        .collect()
}

/// Resize B×1×h×w to B×1×oh×ow with anti-aliasing when shrinking (skimage/PIL behaviour).
fn resize(t: &Tensor, oh: i64, ow: i64, bicubic: bool) -> Tensor {
    let sz = t.size();
    if sz[2] == oh && sz[3] == ow {
        return t.shallow_clone();
    }
    let shrinking = sz[2] > oh || sz[3] > ow;
    match (bicubic, shrinking) {
        (true, true) => t.internal_upsample_bicubic2d_aa([oh, ow], false, None, None),
        (true, false) => t.upsample_bicubic2d([oh, ow], false, None, None),
        (false, true) => t.internal_upsample_bilinear2d_aa([oh, ow], false, None, None),
        (false, false) => t.upsample_bilinear2d([oh, ow], false, None, None),
    }
}

/// Encoder input for slices `z0..z1` of a u8 volume of [nz, h, w]: B×3×S×S float on the CPU.
/// Per slice: stretch to 256×256 (bicubic, anti-aliased, back to u8 by truncation as the official
/// skimage step), then to S×S (bilinear, the official ResizeLongestSide on a square image), then the
/// backbone's normalisation, replicated to 3 channels. Non-square slices are stretched like the
/// official 256×256 resize (no padding), so the whole S×S input is image.
pub fn encoder_input(
    u8_volume: &[u8],
    dims: [usize; 3],
    z0: usize,
    z1: usize,
    side: i64,
    norm: &Normalization,
) -> Tensor {
    let (h, w) = (dims[1] as i64, dims[2] as i64);
    let n = (z1 - z0) as i64;
    let slice_len = dims[1] * dims[2];
    let raw = Tensor::from_slice(&u8_volume[z0 * slice_len..z1 * slice_len]).to_kind(Kind::Float).view([n, 1, h, w]);
    let stored = resize(&raw, STORED_SIDE, STORED_SIDE, true).clamp(0.0, 255.0).floor();
    let x = resize(&stored, side, side, false);
    let x = match norm {
        Normalization::MinMax => {
            let flat = x.view([n, -1]);
            let min = flat.amin(&[1i64][..], true).view([n, 1, 1, 1]);
            let max = flat.amax(&[1i64][..], true).view([n, 1, 1, 1]);
            let den = (&max - &min).clamp_min(1e-8);
            let y = (&x - &min) / den;
            y.expand([n, 3, side, side], false)
        }
        Normalization::MeanStd { mean, std } => {
            let mean = Tensor::from_slice(&mean.map(|v| v as f32)).view([1, 3, 1, 1]);
            let std = Tensor::from_slice(&std.map(|v| v as f32)).view([1, 3, 1, 1]);
            (x.expand([n, 3, side, side], false) - mean) / std
        }
    };
    x.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_matches_numpy_linear() {
        // numpy.percentile(np.arange(11), 0.5) = 0.05, (.., 99.5) = 9.95
        let mut v: Vec<f32> = (0..11).rev().map(|i| i as f32).collect();
        assert!((percentile(&mut v, 0.5) - 0.05).abs() < 1e-6);
        assert!((percentile(&mut v, 99.5) - 9.95).abs() < 1e-6);
        assert_eq!(percentile(&mut v, 50.0), 5.0);
    }

    #[test]
    fn intensity_clips_scales_and_keeps_zeros() {
        let mut v: Vec<f32> = (1..=1000).map(|i| i as f32).collect();
        v[0] = 0.0;
        v[999] = 1e6; // outlier clipped to the 99.5th percentile
        let u = normalize_intensity(&v, crate::modeldir::default_clip_percentiles());
        assert_eq!(u[0], 0);
        assert_eq!(u[999], 255);
        assert!(u[500] > 120 && u[500] < 135, "{}", u[500]);
        assert!(u.windows(2).skip(1).all(|p| p[0] <= p[1]));
        assert!(normalize_intensity(&[5.0; 10], crate::modeldir::default_clip_percentiles()).iter().all(|&x| x == 0));
    }

    #[test]
    fn clip_percentiles_move_the_saturation_point() {
        // A bright tail (a coil's hot spot): 3 of 1000 voxels far above tissue of 100..199. The 99.5th
        // percentile lies in the tissue (199), the 99.9th in the tail (1000); the low clip is 100.
        let mut v: Vec<f32> = (0..1000).map(|i| 100.0 + (i % 100) as f32).collect();
        for x in v.iter_mut().take(3) {
            *x = 1000.0;
        }
        let official = normalize_intensity(&v, [0.5, 99.5]);
        let wider = normalize_intensity(&v, [0.5, 99.9]);
        assert_ne!(official, wider);
        // At 99.5 the tissue spans 0..255 and the tail saturates: 150 → 50/99·255, 199 → 255.
        assert_eq!((official[0], official[150], official[199]), (255, 128, 255));
        // At 99.9 the tail sets the top and the tissue is squeezed: 150 → 50/900·255, 199 → 99/900·255.
        assert_eq!((wider[0], wider[150], wider[199]), (255, 14, 28));
        // Older model.json files (no clip field) read as the official clip.
        let p: crate::modeldir::Preprocessing =
            serde_json::from_str(r#"{"normalization":{"kind":"min_max"}}"#).unwrap();
        assert_eq!(p.clip_percentiles, [0.5, 99.5]);
    }

    #[test]
    fn encoder_input_shapes_and_normalisations() {
        let dims = [3, 40, 60];
        let vol: Vec<u8> = (0..3 * 40 * 60).map(|i| (i % 251) as u8).collect();
        let meanstd = Normalization::MeanStd { mean: [123.675, 116.28, 103.53], std: [58.395, 57.12, 57.375] };
        let x = encoder_input(&vol, dims, 1, 3, 128, &meanstd);
        assert_eq!(x.size(), vec![2, 3, 128, 128]);
        // Channels differ only by the per-channel normalisation of the same grey image.
        let c0 = x.get(0).get(0) * 58.395 + 123.675;
        let c2 = x.get(0).get(2) * 57.375 + 103.53;
        assert!((c0 - c2).abs().max().double_value(&[]) < 1e-3);
        let y = encoder_input(&vol, dims, 0, 3, 256, &Normalization::MinMax);
        assert_eq!(y.size(), vec![3, 3, 256, 256]);
        assert!((y.min().double_value(&[])).abs() < 1e-6 && (y.max().double_value(&[]) - 1.0).abs() < 1e-6);
        // A constant slice stays finite.
        let flat = vec![7u8; 40 * 60];
        let z = encoder_input(&flat, [1, 40, 60], 0, 1, 256, &Normalization::MinMax);
        assert!(z.isfinite().all().int64_value(&[]) == 1);
    }
}

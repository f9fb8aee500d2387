//! Intensity augmentation for cross-site training: scanner and coil changes a single training site
//! does not show. Applied to the raw volume before the engine's own preprocessing (percentile clip,
//! 0–255), so the encoder sees what it would see from a different scanner. Geometry and labels are
//! never changed. Deterministic: the same (case, copy, seed) always gives the same voxels.
//!
//! Per augmented copy, in this order (each drawn independently):
//! - a smooth multiplicative bias field `exp(b)`: `b` a random 2nd-order polynomial of the in-plane
//!   position (|coefficients| ≤ 0.4) plus, with probability 0.7, a Gaussian bump of log-amplitude
//!   0.5–2.0 (×1.6–×7.4) and width 8–30% of the field of view centred anywhere in the middle 60%
//!   (a surface or endorectal receive coil's sensitivity profile);
//! - a gamma on the volume's 0–99.5 percentile range, γ ∈ [0.7, 1.5];
//! - Gaussian noise with σ up to 5% of the mean foreground intensity.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The parameters drawn for one copy (written to the store so a copy can be explained).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AugmentParams {
    /// Coefficients of 1, x, y, x², xy, y² (x, y in [−1, 1]).
    pub poly: [f64; 6],
    /// (log-amplitude, centre x, centre y, sigma), all in [−1, 1] coordinates; None: no bump.
    pub bump: Option<[f64; 4]>,
    pub gamma: f64,
    pub noise_rel: f64,
}

impl AugmentParams {
    pub fn draw(seed: u64) -> AugmentParams {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let mut poly = [0.0; 6];
        for c in poly.iter_mut().skip(1) {
            *c = r.gen_range(-0.4..=0.4);
        }
        let bump = r.gen_bool(0.7).then(|| {
            [r.gen_range(0.5..=2.0), r.gen_range(-0.6..=0.6), r.gen_range(-0.6..=0.6), r.gen_range(0.16..=0.6)]
        });
        AugmentParams { poly, bump, gamma: r.gen_range(0.7..=1.5), noise_rel: r.gen_range(0.0..=0.05) }
    }

    /// The log bias field at in-plane position (x, y) ∈ [−1, 1]².
    fn log_field(&self, x: f64, y: f64) -> f64 {
        let p = &self.poly;
        let mut b = p[0] + p[1] * x + p[2] * y + p[3] * x * x + p[4] * x * y + p[5] * y * y;
        if let Some([a, cx, cy, s]) = self.bump {
            let d2 = (x - cx).powi(2) + (y - cy).powi(2);
            b += a * (-d2 / (2.0 * s * s)).exp();
        }
        b
    }
}

/// Applies `params` to a z-major volume of `dims` = [z, y, x] (returns a new buffer).
pub fn apply(voxels: &[f32], dims: [usize; 3], params: &AugmentParams, noise_seed: u64) -> Vec<f32> {
    let [_, ny, nx] = dims;
    let plane = ny * nx;
    let mut field = vec![0f32; plane];
    for yy in 0..ny {
        let y = if ny > 1 { 2.0 * yy as f64 / (ny - 1) as f64 - 1.0 } else { 0.0 };
        for xx in 0..nx {
            let x = if nx > 1 { 2.0 * xx as f64 / (nx - 1) as f64 - 1.0 } else { 0.0 };
            field[yy * nx + xx] = params.log_field(x, y).exp() as f32;
        }
    }
    let mut out: Vec<f32> = voxels.iter().enumerate().map(|(i, &v)| if v.is_finite() { v.max(0.0) * field[i % plane] } else { 0.0 }).collect();
    // Gamma on [0, p99.5] (values above keep their relative excess).
    let mut sorted: Vec<f32> = out.iter().copied().filter(|&v| v > 0.0).collect();
    if sorted.is_empty() {
        return out;
    }
    sorted.sort_by(|a, b| a.total_cmp(b));
    let hi = sorted[((sorted.len() - 1) as f64 * 0.995) as usize].max(f32::MIN_POSITIVE) as f64;
    let mean = sorted.iter().map(|&v| v as f64).sum::<f64>() / sorted.len() as f64;
    let sigma = params.noise_rel * mean;
    let mut r = ChaCha8Rng::seed_from_u64(noise_seed);
    for v in out.iter_mut() {
        if *v <= 0.0 {
            continue;
        }
        let t = *v as f64 / hi;
        let g = if t <= 1.0 { t.powf(params.gamma) } else { t };
        // Box–Muller; noise only where there is signal (the background stays exactly zero, as the
        // preprocessing keeps zeros).
        let n = if sigma > 0.0 {
            let (u1, u2): (f64, f64) = (r.gen_range(f64::EPSILON..1.0), r.gen_range(0.0..1.0));
            sigma * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        } else {
            0.0
        };
        *v = ((g * hi) + n).max(0.0) as f32;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume() -> (Vec<f32>, [usize; 3]) {
        let dims = [3, 32, 40];
        let v = (0..dims.iter().product::<usize>()).map(|i| if i % 7 == 0 { 0.0 } else { 100.0 + (i % 13) as f32 }).collect();
        (v, dims)
    }

    #[test]
    fn draws_are_deterministic_and_in_range() {
        for seed in 0..200 {
            let p = AugmentParams::draw(seed);
            assert_eq!(p, AugmentParams::draw(seed));
            assert!((0.7..=1.5).contains(&p.gamma));
            assert!((0.0..=0.05).contains(&p.noise_rel));
            assert!(p.poly.iter().all(|c| c.abs() <= 0.4));
            if let Some([a, _, _, s]) = p.bump {
                assert!((0.5..=2.0).contains(&a) && s > 0.0);
            }
        }
        assert_ne!(AugmentParams::draw(1), AugmentParams::draw(2));
    }

    #[test]
    fn bump_brightens_its_centre_and_zeros_stay_zero() {
        let (v, dims) = volume();
        let p = AugmentParams { poly: [0.0; 6], bump: Some([1.5, 0.0, 0.0, 0.2]), gamma: 1.0, noise_rel: 0.0 };
        let out = apply(&v, dims, &p, 0);
        assert_eq!(out.len(), v.len());
        let (ny, nx) = (dims[1], dims[2]);
        let centre = (ny / 2) * nx + nx / 2;
        let corner = nx + 1;
        let ratio = |i: usize| out[i] as f64 / v[i] as f64;
        assert!(v[centre] > 0.0 && v[corner] > 0.0);
        assert!(ratio(centre) > 2.0 * ratio(corner), "centre ×{} corner ×{}", ratio(centre), ratio(corner));
        for (a, b) in v.iter().zip(&out) {
            assert_eq!(*a == 0.0, *b == 0.0);
        }
        assert_eq!(out, apply(&v, dims, &p, 0));
    }

    #[test]
    fn identity_parameters_keep_the_volume() {
        let (v, dims) = volume();
        let p = AugmentParams { poly: [0.0; 6], bump: None, gamma: 1.0, noise_rel: 0.0 };
        let out = apply(&v, dims, &p, 0);
        for (a, b) in v.iter().zip(&out) {
            assert!((a - b).abs() <= 1e-3 * a.abs().max(1.0), "{a} → {b}");
        }
    }
}

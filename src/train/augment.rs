//! Intensity augmentation for cross-site training: scanner and coil changes a single training site
//! does not show. Applied to the raw volume before the engine's own preprocessing (percentile clip,
//! 0–255), so the encoder sees what it would see from a different scanner. Geometry and labels are
//! never changed. Deterministic: the same (case, copy, seed) always gives the same voxels.
//!
//! Per augmented copy (each drawn independently), applied as gamma → receive field → noise:
//! - a smooth multiplicative bias field `exp(b)`: `b` a random 2nd-order polynomial of the in-plane
//!   position (|coefficients| ≤ 0.4) plus, with probability 0.7, a Gaussian bump of log-amplitude
//!   0.5–2.0 (×1.6–×7.4) and width 8–30% of the field of view centred anywhere in the middle 60%
//!   (a surface or endorectal receive coil's sensitivity profile);
//! - with probability 0.5, an endorectal coil's receive profile: `body + gain·(r0/r)^n` around an
//!   axis through the slice (r0 10–20 mm, body 0.35–0.7, gain 2–6, n 1.5–2.0) placed 8–16 mm outside
//!   the gland, posterior to it within ±0.5 rad (the label's centroid and equivalent radius and the
//!   volume's orientation; without a label, the image centre and 20 mm). Posterior because that is
//!   where the rectum is: a coil on the fat beside the gland lit the brightest tissue instead. The coil sits in a balloon, so tissue starts about 8 mm from
//!   its axis: r is floored there (a 3 mm floor gave a ×50 spike that blacked out the whole image). A coil lifts the tissue next to it by one or two
//!   orders of magnitude, so the percentile clip saturates part of the gland: the smooth bump above
//!   does not teach that;
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
    /// Endorectal coil: (angle from the posterior direction in radians, gap outside the gland in mm, body, gain, exponent,
    /// r0 in mm);
    /// None: no coil. Absent in stores written before it existed.
    #[serde(default)]
    pub coil: Option<[f64; 6]>,
}

/// Where the gland is, for placing a coil next to it (in-plane, in voxels of the volume).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlandGeometry {
    /// [column spacing, row spacing] in mm.
    pub spacing_mm: [f64; 2],
    /// Label centroid (column, row); None: the image centre.
    pub centroid: Option<[f64; 2]>,
    /// Radius of the disc with the label's largest in-plane area, in mm.
    pub radius_mm: f64,
    /// Patient posterior as an in-plane angle (atan2 of its row and column components in mm space).
    pub posterior_angle: f64,
}

impl GlandGeometry {
    /// From a z-major label volume of `dims` ([z, y, x]) and the volume's spacing ([x, y, z]).
    /// `direction` = the volume's [column, row, slice] unit vectors in LPS (posterior is +y).
    pub fn from_label(label: &[u8], dims: [usize; 3], spacing: [f64; 3], direction: [[f64; 3]; 3]) -> GlandGeometry {
        let posterior_angle = direction[1][1].atan2(direction[0][1]);
        let [nz, ny, nx] = dims;
        let plane = ny * nx;
        let (mut sx, mut sy, mut n) = (0.0, 0.0, 0usize);
        let mut max_area = 0usize;
        for z in 0..nz {
            let mut area = 0;
            for (i, &v) in label[z * plane..(z + 1) * plane].iter().enumerate() {
                if v != 0 {
                    sx += (i % nx) as f64;
                    sy += (i / nx) as f64;
                    n += 1;
                    area += 1;
                }
            }
            max_area = max_area.max(area);
        }
        let spacing_mm = [spacing[0], spacing[1]];
        if n == 0 {
            return GlandGeometry { spacing_mm, centroid: None, radius_mm: 20.0, posterior_angle };
        }
        let area_mm2 = max_area as f64 * spacing[0] * spacing[1];
        GlandGeometry {
            spacing_mm,
            centroid: Some([sx / n as f64, sy / n as f64]),
            radius_mm: (area_mm2 / std::f64::consts::PI).sqrt(),
            posterior_angle,
        }
    }
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
        let (gamma, noise_rel) = (r.gen_range(0.7..=1.5), r.gen_range(0.0..=0.05));
        // Drawn last so that the earlier parameters of a seed are what they were before coils existed.
        let coil = r.gen_bool(0.5).then(|| {
            [
                r.gen_range(-0.5..=0.5),
                r.gen_range(8.0..=16.0),
                r.gen_range(0.35..=0.7),
                r.gen_range(2.0..=6.0),
                r.gen_range(1.5..=2.0),
                r.gen_range(10.0..=20.0),
            ]
        });
        AugmentParams { poly, bump, gamma, noise_rel, coil }
    }

    /// The coil's multiplicative receive profile at voxel (column, row); 1 without a coil.
    fn coil_gain(&self, geom: &GlandGeometry, dims: [usize; 3], col: f64, row: f64) -> f64 {
        let Some([offset, gap, body, gain, exponent, r0]) = self.coil else { return 1.0 };
        let theta = geom.posterior_angle + offset;
        let [_, ny, nx] = dims;
        let [cx, cy] = geom.centroid.unwrap_or([(nx as f64 - 1.0) / 2.0, (ny as f64 - 1.0) / 2.0]);
        let d = geom.radius_mm + gap;
        let (ax, ay) = (cx * geom.spacing_mm[0] + d * theta.cos(), cy * geom.spacing_mm[1] + d * theta.sin());
        let r = ((col * geom.spacing_mm[0] - ax).powi(2) + (row * geom.spacing_mm[1] - ay).powi(2)).sqrt().max(8.0);
        body + gain * (r0 / r).powf(exponent)
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

/// A standard normal draw (Box–Muller; the training floor's one normal sampler).
pub fn standard_normal(r: &mut ChaCha8Rng) -> f64 {
    let (u1, u2): (f64, f64) = (r.gen_range(f64::EPSILON..1.0), r.gen_range(0.0..1.0));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Applies `params` to a z-major volume of `dims` = [z, y, x] (returns a new buffer).
pub fn apply(
    voxels: &[f32],
    dims: [usize; 3],
    geom: &GlandGeometry,
    params: &AugmentParams,
    noise_seed: u64,
) -> Vec<f32> {
    let [_, ny, nx] = dims;
    let plane = ny * nx;
    let mut field = vec![0f32; plane];
    for yy in 0..ny {
        let y = if ny > 1 { 2.0 * yy as f64 / (ny - 1) as f64 - 1.0 } else { 0.0 };
        for xx in 0..nx {
            let x = if nx > 1 { 2.0 * xx as f64 / (nx - 1) as f64 - 1.0 } else { 0.0 };
            field[yy * nx + xx] =
                (params.log_field(x, y).exp() * params.coil_gain(geom, dims, xx as f64, yy as f64)) as f32;
        }
    }
    // Gamma first, on the raw volume's [0, p99.5] (values above keep their relative excess): it
    // stands for a different tissue contrast. Then the receive field, as a scanner would apply it;
    // a gamma taken after a coil's hot spot would crush everything else towards black.
    let mut out: Vec<f32> = voxels.iter().map(|&v| if v.is_finite() { v.max(0.0) } else { 0.0 }).collect();
    let mut positive: Vec<f32> = out.iter().copied().filter(|&v| v > 0.0).collect();
    if positive.is_empty() {
        return out;
    }
    let k = ((positive.len() - 1) as f64 * 0.995) as usize;
    let hi = (*positive.select_nth_unstable_by(k, |a, b| a.total_cmp(b)).1).max(f32::MIN_POSITIVE) as f64;
    drop(positive);
    let (mut sum, mut count) = (0.0f64, 0usize);
    for (i, v) in out.iter_mut().enumerate() {
        if *v <= 0.0 {
            continue;
        }
        let t = *v as f64 / hi;
        let g = if t <= 1.0 { t.powf(params.gamma) } else { t };
        *v = (g * hi * field[i % plane] as f64) as f32;
        sum += *v as f64;
        count += 1;
    }
    let sigma = params.noise_rel * sum / count as f64;
    if sigma > 0.0 {
        let mut r = ChaCha8Rng::seed_from_u64(noise_seed);
        // Noise only where there is signal (the background stays exactly zero, as the
        // preprocessing keeps zeros).
        for v in out.iter_mut().filter(|v| **v > 0.0) {
            *v = (*v as f64 + sigma * standard_normal(&mut r)).max(0.0) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom() -> GlandGeometry {
        GlandGeometry {
            spacing_mm: [1.0, 1.0],
            centroid: None,
            radius_mm: 20.0,
            posterior_angle: std::f64::consts::FRAC_PI_2,
        }
    }

    #[test]
    fn coil_sits_next_to_the_gland_and_saturates_its_near_side() {
        // A 60×60 slice of 1 mm pixels, a gland disc of radius 8 around (30, 30); the coil below it.
        let dims = [1, 60, 60];
        let label: Vec<u8> =
            (0..3600).map(|i| u8::from(((i % 60) as f64 - 30.0).hypot((i / 60) as f64 - 30.0) <= 8.0)).collect();
        // Axial LPS orientation: rows run posterior, so the coil goes towards +row.
        let g = GlandGeometry::from_label(
            &label,
            dims,
            [1.0, 1.0, 3.0],
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        );
        assert!((g.posterior_angle - std::f64::consts::FRAC_PI_2).abs() < 1e-9);
        let [cx, cy] = g.centroid.unwrap();
        assert!((cx - 30.0).abs() < 0.5 && (cy - 30.0).abs() < 0.5, "{cx} {cy}");
        assert!((g.radius_mm - 8.0).abs() < 0.5, "{}", g.radius_mm);
        let p = AugmentParams {
            poly: [0.0; 6],
            bump: None,
            gamma: 1.0,
            noise_rel: 0.0,
            coil: Some([0.0, 9.0, 0.5, 4.0, 2.0, 10.0]),
        };
        let v = vec![100.0f32; 3600];
        let out = apply(&v, dims, &g, &p, 0);
        let (near, far) = (out[37 * 60 + 30], out[23 * 60 + 30]); // gland edge towards / away from the coil
        assert!(near > 3.0 * far, "near {near} far {far}");
        assert_eq!(out, apply(&v, dims, &g, &p, 0));
        // Stored parameters of older stores (no coil) still read.
        let old: AugmentParams =
            serde_json::from_str(r#"{"poly":[0,0,0,0,0,0],"bump":null,"gamma":1.0,"noise_rel":0.0}"#).unwrap();
        assert_eq!(old.coil, None);
    }

    #[test]
    fn earlier_parameters_of_a_seed_did_not_change_and_coils_are_drawn() {
        let with_coil = (0..200).filter(|&s| AugmentParams::draw(s).coil.is_some()).count();
        assert!((60..140).contains(&with_coil), "{with_coil} of 200");
        for s in 0..200 {
            if let Some([t, gap, body, gain, n, r0]) = AugmentParams::draw(s).coil {
                assert!((-0.5..=0.5).contains(&t) && (8.0..=16.0).contains(&gap));
                assert!((0.35..=0.7).contains(&body) && (2.0..=6.0).contains(&gain) && (1.5..=2.0).contains(&n));
                assert!((10.0..=20.0).contains(&r0));
            }
        }
    }

    fn volume() -> (Vec<f32>, [usize; 3]) {
        let dims = [3, 32, 40];
        let v = (0..dims.iter().product::<usize>())
            .map(|i| if i % 7 == 0 { 0.0 } else { 100.0 + (i % 13) as f32 })
            .collect();
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
        let p =
            AugmentParams { poly: [0.0; 6], bump: Some([1.5, 0.0, 0.0, 0.2]), gamma: 1.0, noise_rel: 0.0, coil: None };
        let out = apply(&v, dims, &geom(), &p, 0);
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
        assert_eq!(out, apply(&v, dims, &geom(), &p, 0));
    }

    #[test]
    fn identity_parameters_keep_the_volume() {
        let (v, dims) = volume();
        let p = AugmentParams { poly: [0.0; 6], bump: None, gamma: 1.0, noise_rel: 0.0, coil: None };
        let out = apply(&v, dims, &geom(), &p, 0);
        for (a, b) in v.iter().zip(&out) {
            assert!((a - b).abs() <= 1e-3 * a.abs().max(1.0), "{a} → {b}");
        }
    }
}

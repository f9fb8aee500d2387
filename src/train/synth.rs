//! SynthSeg-style training images (Billot et al., Medical Image Analysis 2023): a new image drawn from
//! a case's tissue label map with a random contrast, resolution, shape and receive field.
//!
//! One synthetic copy, in this order (every number drawn from the copy's seed, stored with it):
//! 1. **Shape and orientation**: one in-plane warp for all slices (the engine is 2-D): rotation
//!    ±15°, scale 0.85–1.15 per axis, shear ±0.1, a left–right mirror with probability 0.5, and a
//!    smooth displacement field (a 5×5 grid of vectors with σ 0–4 mm, bilinear between grid points).
//!    Tissue map and prostate label go through the same nearest-neighbour lookup, so they cannot
//!    disagree; what falls outside the field becomes air (code 0) and background.
//! 2. **Contrast**: every tissue code gets its own Gaussian, mean uniform in [0, 1] and σ uniform in
//!    [0, 0.1] (SynthSeg: means 0–255, σ 0–35 of 255); air is 0 with probability 0.8, else dim.
//! 3. **Resolution**: a separable Gaussian blur, σ 0–1.5 pixels in-plane and 0–0.8 slices across
//!    (thick slices, partial volume).
//! 4. **Scanner**: the intensity augmentation of `augment.rs` (gamma, bias field, endorectal coil
//!    profile, noise) with parameters drawn from the same seed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::augment::{self, standard_normal, AugmentParams, GlandGeometry};

/// Side of the displacement grid.
const GRID: usize = 5;

/// The parameters drawn for one synthetic copy (written to the store so that a copy can be explained).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SynthParams {
    pub rotation_deg: f64,
    /// Scale along columns and rows (> 1 enlarges the anatomy).
    pub scale: [f64; 2],
    pub shear: f64,
    pub mirror: bool,
    /// Displacement grid, GRID × GRID (row-major, from the top-left corner), (columns, rows) in mm.
    pub displacement_mm: Vec<[f64; 2]>,
    /// Mean and σ of every tissue code (index = code), relative to the brightest possible tissue (1).
    pub means: Vec<f64>,
    pub sigmas: Vec<f64>,
    /// Blur σ: (in-plane pixels, slices).
    pub blur: [f64; 2],
    pub scanner: AugmentParams,
}

impl SynthParams {
    /// Draws the parameters of one copy for tissue codes `0..codes`.
    pub fn draw(seed: u64, codes: usize) -> SynthParams {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let rotation_deg = r.gen_range(-15.0..=15.0);
        let scale = [r.gen_range(0.85..=1.15), r.gen_range(0.85..=1.15)];
        let shear = r.gen_range(-0.1..=0.1);
        let mirror = r.gen_bool(0.5);
        let deform = r.gen_range(0.0..=4.0);
        let displacement_mm =
            (0..GRID * GRID).map(|_| [deform * standard_normal(&mut r), deform * standard_normal(&mut r)]).collect();
        let mut means: Vec<f64> = (0..codes).map(|_| r.gen_range(0.0..=1.0)).collect();
        let sigmas = (0..codes).map(|_| r.gen_range(0.0..=0.1)).collect();
        if let Some(air) = means.first_mut() {
            *air = if r.gen_bool(0.8) { 0.0 } else { r.gen_range(0.0..=0.15) };
        }
        let blur = [r.gen_range(0.0..=1.5), r.gen_range(0.0..=0.8)];
        let scanner = AugmentParams::draw(r.gen());
        SynthParams { rotation_deg, scale, shear, mirror, displacement_mm, means, sigmas, blur, scanner }
    }

    /// The displacement (mm) at in-plane position (u, v) ∈ [0, 1]², bilinear between grid points.
    fn displacement(&self, u: f64, v: f64) -> [f64; 2] {
        let (gx, gy) = (u.clamp(0.0, 1.0) * (GRID - 1) as f64, v.clamp(0.0, 1.0) * (GRID - 1) as f64);
        let (x0, y0) = ((gx as usize).min(GRID - 2), (gy as usize).min(GRID - 2));
        let (fx, fy) = (gx - x0 as f64, gy - y0 as f64);
        let at = |x: usize, y: usize| self.displacement_mm[y * GRID + x];
        let mut d = [0.0; 2];
        for (k, dk) in d.iter_mut().enumerate() {
            let top = at(x0, y0)[k] * (1.0 - fx) + at(x0 + 1, y0)[k] * fx;
            let bottom = at(x0, y0 + 1)[k] * (1.0 - fx) + at(x0 + 1, y0 + 1)[k] * fx;
            *dk = top * (1.0 - fy) + bottom * fy;
        }
        d
    }
}

/// Warps the tissue map and the label (z-major, `dims` = [z, y, x], in-plane `spacing` = [column,
/// row] mm) with the copy's in-plane transform; returns (tissues, label).
pub fn warp(tissues: &[u8], label: &[u8], dims: [usize; 3], spacing: [f64; 2], p: &SynthParams) -> (Vec<u8>, Vec<u8>) {
    let [nz, ny, nx] = dims;
    let plane = ny * nx;
    let (cx, cy) = ((nx as f64 - 1.0) / 2.0, (ny as f64 - 1.0) / 2.0);
    // Output → source: inverse of (scale ∘ shear ∘ rotation), in mm about the centre.
    let (s, c) = p.rotation_deg.to_radians().sin_cos();
    let forward = [[p.scale[0] * (c + p.shear * s), p.scale[0] * (-s + p.shear * c)], [p.scale[1] * s, p.scale[1] * c]];
    let det = forward[0][0] * forward[1][1] - forward[0][1] * forward[1][0];
    let inverse = [[forward[1][1] / det, -forward[0][1] / det], [-forward[1][0] / det, forward[0][0] / det]];
    let mut source = vec![usize::MAX; plane];
    for row in 0..ny {
        for col in 0..nx {
            let (mut x, y) = ((col as f64 - cx) * spacing[0], (row as f64 - cy) * spacing[1]);
            if p.mirror {
                x = -x;
            }
            let d = p.displacement(col as f64 / (nx.max(2) - 1) as f64, row as f64 / (ny.max(2) - 1) as f64);
            let sx = inverse[0][0] * x + inverse[0][1] * y + d[0];
            let sy = inverse[1][0] * x + inverse[1][1] * y + d[1];
            let (sc, sr) = ((sx / spacing[0] + cx).round(), (sy / spacing[1] + cy).round());
            if sc >= 0.0 && sr >= 0.0 && (sc as usize) < nx && (sr as usize) < ny {
                source[row * nx + col] = sr as usize * nx + sc as usize;
            }
        }
    }
    let (mut t, mut l) = (vec![0u8; tissues.len()], vec![0u8; label.len()]);
    for z in 0..nz {
        for (i, &src) in source.iter().enumerate() {
            if src != usize::MAX {
                t[z * plane + i] = tissues[z * plane + src];
                l[z * plane + i] = label[z * plane + src];
            }
        }
    }
    (t, l)
}

/// Paints a warped tissue map with the copy's per-tissue Gaussians (values in about [0, 1]).
pub fn paint(tissues: &[u8], p: &SynthParams, seed: u64) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    tissues
        .iter()
        .map(|&t| {
            let (mean, sigma) =
                (p.means.get(t as usize).copied().unwrap_or(0.0), p.sigmas.get(t as usize).copied().unwrap_or(0.0));
            if mean <= 0.0 {
                0.0
            } else {
                (mean + sigma * standard_normal(&mut r)).max(0.0) as f32
            }
        })
        .collect()
}

/// Gaussian blur of σ `sigma` voxels along `axis` (0 = slices, 1 = rows, 2 = columns), in place;
/// the kernel is renormalised at the volume's edges.
fn blur_axis(v: &mut [f32], dims: [usize; 3], axis: usize, sigma: f64) {
    if sigma < 0.05 {
        return;
    }
    let half = (3.0 * sigma).ceil() as isize;
    let kernel: Vec<f64> = (-half..=half).map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp()).collect();
    let [nz, ny, nx] = dims;
    let (n, step) = match axis {
        0 => (nz, ny * nx),
        1 => (ny, nx),
        _ => (nx, 1),
    };
    let starts: Vec<usize> = (0..nz * ny * nx).filter(|&i| (i / step) % n == 0).collect();
    let mut line = vec![0f32; n];
    for s in starts {
        for (k, l) in line.iter_mut().enumerate() {
            *l = v[s + k * step];
        }
        for k in 0..n {
            let (mut acc, mut w) = (0.0, 0.0);
            for (j, kv) in kernel.iter().enumerate() {
                let i = k as isize + j as isize - half;
                if i >= 0 && (i as usize) < n {
                    acc += kv * line[i as usize] as f64;
                    w += kv;
                }
            }
            v[s + k * step] = (acc / w) as f32;
        }
    }
}

/// One synthetic copy of a case: (image, prostate label), both on the case's grid.
/// `spacing` = [column, row] mm; `geometry` places the scanner augmentation's coil from the warped label.
pub fn synthesise(
    tissues: &[u8],
    label: &[u8],
    dims: [usize; 3],
    spacing: [f64; 3],
    direction: [[f64; 3]; 3],
    p: &SynthParams,
    seed: u64,
) -> (Vec<f32>, Vec<u8>) {
    let (t, l) = warp(tissues, label, dims, [spacing[0], spacing[1]], p);
    let mut image = paint(&t, p, seed);
    blur_axis(&mut image, dims, 2, p.blur[0]);
    blur_axis(&mut image, dims, 1, p.blur[0]);
    blur_axis(&mut image, dims, 0, p.blur[1]);
    let geometry = GlandGeometry::from_label(&l, dims, spacing, direction);
    (augment::apply(&image, dims, &geometry, &p.scanner, seed ^ 0x5eed), l)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2-slice 40×48 map: air border, code 2 "fat" background, a code-15 disc (the "gland").
    fn phantom() -> (Vec<u8>, Vec<u8>, [usize; 3]) {
        let dims = [2, 40, 48];
        let mut t = vec![0u8; 2 * 40 * 48];
        for z in 0..2 {
            for r in 0..40 {
                for c in 0..48 {
                    let inside_body = (3..37).contains(&r) && (3..45).contains(&c);
                    let gland = ((c as f64 - 20.0).hypot(r as f64 - 18.0)) < 7.0;
                    t[z * 1920 + r * 48 + c] = if gland {
                        15
                    } else if inside_body {
                        2
                    } else {
                        0
                    };
                }
            }
        }
        let l = t.iter().map(|&x| u8::from(x == 15)).collect();
        (t, l, dims)
    }

    #[test]
    fn label_and_tissues_move_together_and_the_draw_is_repeatable() {
        let (t, l, dims) = phantom();
        for seed in 0..20 {
            let p = SynthParams::draw(seed, 22);
            assert_eq!(p, SynthParams::draw(seed, 22));
            let (wt, wl) = warp(&t, &l, dims, [1.0, 1.2], &p);
            // The label is exactly the warped gland code: one lookup moved both.
            assert!(wt.iter().zip(&wl).all(|(&a, &b)| (a == 15) == (b == 1)), "seed {seed}");
            // Without the displacement field (σ up to 4 mm: large against this 7 mm disc), scale
            // 0.85–1.15 per axis changes the area by at most about ±32 % (plus rounding).
            let mut affine = p.clone();
            affine.displacement_mm.iter_mut().for_each(|d| *d = [0.0, 0.0]);
            let (_, wl) = warp(&t, &l, dims, [1.0, 1.2], &affine);
            let area = wl.iter().filter(|&&x| x == 1).count() as f64;
            let before = l.iter().filter(|&&x| x == 1).count() as f64;
            assert!(area > 0.6 * before && area < 1.45 * before, "seed {seed}: {area} vs {before}");
        }
        // Different seeds, different shapes.
        let (_, a) = warp(&t, &l, dims, [1.0, 1.0], &SynthParams::draw(1, 22));
        let (_, b) = warp(&t, &l, dims, [1.0, 1.0], &SynthParams::draw(2, 22));
        assert_ne!(a, b);
    }

    #[test]
    fn the_identity_warp_keeps_the_map_and_a_mirror_flips_it() {
        let (t, l, dims) = phantom();
        let mut p = SynthParams::draw(3, 22);
        p.rotation_deg = 0.0;
        p.scale = [1.0, 1.0];
        p.shear = 0.0;
        p.mirror = false;
        p.displacement_mm.iter_mut().for_each(|d| *d = [0.0, 0.0]);
        assert_eq!(warp(&t, &l, dims, [0.7, 0.7], &p), (t.clone(), l.clone()));
        p.mirror = true;
        let (_, m) = warp(&t, &l, dims, [0.7, 0.7], &p);
        // The disc centred at column 20 of 48 (centre 23.5) lands around column 27.
        let cols: Vec<usize> = (0..m.len()).filter(|&i| m[i] == 1).map(|i| i % 48).collect();
        let mean = cols.iter().sum::<usize>() as f64 / cols.len() as f64;
        assert!((mean - 27.0).abs() < 0.6, "{mean}");
    }

    #[test]
    fn each_tissue_gets_its_own_contrast_per_copy() {
        let (t, l, dims) = phantom();
        let mean_of = |img: &[f32], code: u8, tissues: &[u8]| {
            let v: Vec<f64> = img.iter().zip(tissues).filter(|(_, &x)| x == code).map(|(&a, _)| a as f64).collect();
            v.iter().sum::<f64>() / v.len() as f64
        };
        let mut contrasts = Vec::new();
        for seed in 0..6 {
            let mut p = SynthParams::draw(seed, 22);
            // Without warp, blur and scanner effects the painted means are the drawn ones.
            p.rotation_deg = 0.0;
            p.scale = [1.0, 1.0];
            p.shear = 0.0;
            p.mirror = false;
            p.displacement_mm.iter_mut().for_each(|d| *d = [0.0, 0.0]);
            let img = paint(&t, &p, seed);
            let (fat, gland) = (mean_of(&img, 2, &t), mean_of(&img, 15, &t));
            assert!((fat - p.means[2]).abs() < 0.02 + p.sigmas[2], "{fat} vs {}", p.means[2]);
            assert!((gland - p.means[15]).abs() < 0.02 + p.sigmas[15], "{gland} vs {}", p.means[15]);
            contrasts.push(gland > fat);
            let (full, label) = synthesise(&t, &l, dims, [1.0, 1.0, 3.0], IDENTITY, &p, seed);
            assert_eq!(label, l);
            assert!(full.iter().all(|v| v.is_finite() && *v >= 0.0));
        }
        // Over six copies the gland is brighter than its surroundings in some and darker in others.
        assert!(contrasts.contains(&true) && contrasts.contains(&false), "{contrasts:?}");
    }

    const IDENTITY: [[f64; 3]; 3] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

    #[test]
    fn blur_spreads_an_edge_and_keeps_the_mean() {
        let dims = [1, 1, 21];
        let mut v: Vec<f32> = (0..21).map(|i| if i < 10 { 0.0 } else { 1.0 }).collect();
        let before: f32 = v.iter().sum();
        blur_axis(&mut v, dims, 2, 1.5);
        assert!(v[9] > 0.2 && v[9] < 0.5 && v[10] > 0.5 && v[10] < 0.8, "{v:?}");
        assert!((v.iter().sum::<f32>() - before).abs() < 0.6);
    }
}

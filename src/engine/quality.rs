//! The series quality score (QA) and the agreement measures it is built from. Pure functions of
//! per-slice IoU predictions and masks; the definition is documented in docs/engine.md.

use serde::{Deserialize, Serialize};

/// Dice of two binary slices/volumes; 1 when both are empty.
pub fn dice(a: &[u8], b: &[u8]) -> f64 {
    let (mut inter, mut sa, mut sb) = (0usize, 0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x != 0, y != 0);
        inter += (x && y) as usize;
        sa += x as usize;
        sb += y as usize;
    }
    if sa + sb == 0 {
        1.0
    } else {
        2.0 * inter as f64 / (sa + sb) as f64
    }
}

/// The pieces of the quality score (each in [0, 1]; None where it does not apply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityTerms {
    /// Mean predicted IoU (clamped to [0, 1]) over slices with a non-empty prediction.
    pub iou: f64,
    /// Mean Dice between neighbouring slices, over adjacent pairs where at least one is non-empty.
    pub neighbour: Option<f64>,
    /// Fraction of the foreground slices that lie in the longest run of consecutive foreground slices.
    pub continuity: f64,
    /// Dice between the box-mode and grid-mode volumes (when both modes were run).
    pub mode_agreement: Option<f64>,
}

/// The per-slice inputs of the quality score.
pub struct QualityInput<'a> {
    /// Slice masks, z-major, each of `slice_len` voxels.
    pub mask: &'a [u8],
    pub slice_len: usize,
    /// Predicted IoU of the chosen prompt per slice (NaN or anything for empty slices; ignored there).
    pub slice_iou: &'a [f32],
    /// The other mode's mask on the same grid, when both modes ran.
    pub other_mode: Option<&'a [u8]>,
}

/// Compute the terms and the score: the geometric mean of the available terms, 0 for an empty mask.
pub fn quality(inp: &QualityInput) -> (f64, Option<QualityTerms>) {
    let nz = inp.slice_iou.len();
    let fg: Vec<bool> = (0..nz).map(|z| inp.mask[z * inp.slice_len..(z + 1) * inp.slice_len].iter().any(|&v| v != 0)).collect();
    let n_fg = fg.iter().filter(|&&f| f).count();
    if n_fg == 0 {
        return (0.0, None);
    }
    let iou = (0..nz).filter(|&z| fg[z]).map(|z| (inp.slice_iou[z] as f64).clamp(0.0, 1.0)).filter(|v| v.is_finite()).sum::<f64>()
        / n_fg as f64;
    let mut pairs = Vec::new();
    for z in 0..nz.saturating_sub(1) {
        if fg[z] || fg[z + 1] {
            let a = &inp.mask[z * inp.slice_len..(z + 1) * inp.slice_len];
            let b = &inp.mask[(z + 1) * inp.slice_len..(z + 2) * inp.slice_len];
            pairs.push(dice(a, b));
        }
    }
    let neighbour = if pairs.is_empty() { None } else { Some(pairs.iter().sum::<f64>() / pairs.len() as f64) };
    let (mut best, mut run) = (0usize, 0usize);
    for &f in &fg {
        run = if f { run + 1 } else { 0 };
        best = best.max(run);
    }
    let continuity = best as f64 / n_fg as f64;
    let mode_agreement = inp.other_mode.map(|o| dice(inp.mask, o));
    let terms = QualityTerms { iou, neighbour, continuity, mode_agreement };
    (geometric_mean(&terms), Some(terms))
}

/// Geometric mean of the terms present: any term near 0 pulls the score to 0.
pub fn geometric_mean(t: &QualityTerms) -> f64 {
    let vals: Vec<f64> = [Some(t.iou), t.neighbour, Some(t.continuity), t.mode_agreement].into_iter().flatten().collect();
    let log_sum: f64 = vals.iter().map(|v| v.max(1e-6).ln()).sum();
    (log_sum / vals.len() as f64).exp().clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disc_stack(nz: usize, n: usize, radius: impl Fn(usize) -> f64, shift: impl Fn(usize) -> f64) -> Vec<u8> {
        let mut m = vec![0u8; nz * n * n];
        for z in 0..nz {
            let (r, s) = (radius(z), shift(z));
            for y in 0..n {
                for x in 0..n {
                    let (dx, dy) = (x as f64 - n as f64 / 2.0 - s, y as f64 - n as f64 / 2.0);
                    if dx * dx + dy * dy <= r * r {
                        m[(z * n + y) * n + x] = 1;
                    }
                }
            }
        }
        m
    }

    #[test]
    fn dice_basics() {
        assert_eq!(dice(&[1, 1, 0, 0], &[1, 0, 0, 0]), 2.0 / 3.0);
        assert_eq!(dice(&[0, 0], &[0, 0]), 1.0);
        assert_eq!(dice(&[1, 0], &[0, 1]), 0.0);
    }

    #[test]
    fn empty_prediction_scores_zero() {
        let m = vec![0u8; 4 * 16];
        assert_eq!(quality(&QualityInput { mask: &m, slice_len: 16, slice_iou: &[0.9; 4], other_mode: None }).0, 0.0);
    }

    #[test]
    fn score_decreases_with_each_term() {
        let n = 32;
        let smooth = disc_stack(8, n, |z| 6.0 + z as f64 * 0.3, |_| 0.0);
        // Same per-slice areas, but the blob jumps around between slices.
        let jumpy = disc_stack(8, n, |z| 6.0 + z as f64 * 0.3, |z| if z % 2 == 0 { -8.0 } else { 8.0 });
        let q = |m: &[u8], iou: f32| quality(&QualityInput { mask: m, slice_len: n * n, slice_iou: &[iou; 8], other_mode: None });
        let (q_smooth, t) = q(&smooth, 0.9);
        let t = t.unwrap();
        assert!(t.neighbour.unwrap() > 0.8 && t.continuity == 1.0);
        let (q_jumpy, _) = q(&jumpy, 0.9);
        assert!(q_jumpy < q_smooth - 0.2, "{q_jumpy} vs {q_smooth}");
        // Lower predicted IoU → lower score.
        assert!(q(&smooth, 0.5).0 < q_smooth);
        // Broken runs of foreground slices → lower continuity.
        let mut gappy = smooth.clone();
        for v in &mut gappy[3 * n * n..5 * n * n] {
            *v = 0;
        }
        let (q_gappy, tg) = q(&gappy, 0.9);
        assert!(tg.unwrap().continuity < 1.0 && q_gappy < q_smooth);
        // Disagreement between modes lowers it too.
        let (q_agree, _) = quality(&QualityInput { mask: &smooth, slice_len: n * n, slice_iou: &[0.9; 8], other_mode: Some(&smooth) });
        let (q_disagree, _) = quality(&QualityInput { mask: &smooth, slice_len: n * n, slice_iou: &[0.9; 8], other_mode: Some(&jumpy) });
        assert!(q_disagree < q_agree);
        assert!((0.0..=1.0).contains(&q_agree));
    }
}

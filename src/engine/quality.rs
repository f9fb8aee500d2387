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
    /// Mean predicted IoU (clamped to [0, 1]) over slices with a non-empty prediction. Counted in
    /// the score only when `iou_counted` (grid mode: box-mode training targets IoU 1 for the
    /// whole-image box, so there it carries no information).
    pub iou: f64,
    #[serde(default = "yes")]
    pub iou_counted: bool,
    /// Mean Dice between neighbouring slices, over adjacent pairs where at least one is non-empty.
    pub neighbour: Option<f64>,
    /// Fraction of the foreground slices that lie in the longest run of consecutive foreground slices.
    pub continuity: f64,
    /// Dice between the box-mode and grid-mode volumes (when both modes were run).
    pub mode_agreement: Option<f64>,
    /// Mean SAM stability score (IoU of logits > +1 vs > −1) over slices with a prediction: how
    /// decided the decoder is about its own boundary. Low on images unlike its training data.
    #[serde(default)]
    pub stability: Option<f64>,
    /// Gland volume plausibility: 1 inside the model's plausible range, lo/v or v/hi outside it.
    #[serde(default)]
    pub volume: Option<f64>,
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
    /// Whether the predicted IoU is informative (grid mode) and so counted in the score.
    pub iou_informative: bool,
    /// Stability score of the chosen mask per slice (NaN where there is none; may be empty).
    pub slice_stability: &'a [f32],
    /// Volume of the mask in mL and the plausible range [lo, hi] (None: no volume term).
    pub volume_ml: f64,
    pub plausible_ml: Option<[f64; 2]>,
}

/// SAM's stability score of one mask's logits (any shape): |logits > offset| / |logits > −offset|;
/// NaN when even the looser mask is empty.
pub fn stability_score(logits: &tch::Tensor, offset: f64) -> f32 {
    let strict = logits.gt(offset).sum(tch::Kind::Int64).int64_value(&[]);
    let loose = logits.gt(-offset).sum(tch::Kind::Int64).int64_value(&[]);
    if loose == 0 {
        f32::NAN
    } else {
        strict as f32 / loose as f32
    }
}

/// The volume term: 1 inside [lo, hi], falling as lo/v below and hi/v above.
pub fn volume_plausibility(v: f64, [lo, hi]: [f64; 2]) -> f64 {
    if v <= 0.0 {
        0.0
    } else if v < lo {
        v / lo
    } else if v > hi {
        hi / v
    } else {
        1.0
    }
}

/// Compute the terms and the score: the geometric mean of the available terms, 0 for an empty mask.
pub fn quality(inp: &QualityInput) -> (f64, Option<QualityTerms>) {
    let nz = inp.slice_iou.len();
    let fg: Vec<bool> =
        (0..nz).map(|z| inp.mask[z * inp.slice_len..(z + 1) * inp.slice_len].iter().any(|&v| v != 0)).collect();
    let n_fg = fg.iter().filter(|&&f| f).count();
    if n_fg == 0 {
        return (0.0, None);
    }
    let iou = (0..nz)
        .filter(|&z| fg[z])
        .map(|z| (inp.slice_iou[z] as f64).clamp(0.0, 1.0))
        .filter(|v| v.is_finite())
        .sum::<f64>()
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
    let stab: Vec<f64> = (0..nz)
        .filter(|&z| fg[z])
        .filter_map(|z| inp.slice_stability.get(z).map(|&v| v as f64))
        .filter(|v| v.is_finite())
        .collect();
    let stability = if stab.is_empty() { None } else { Some(stab.iter().sum::<f64>() / stab.len() as f64) };
    let volume = inp.plausible_ml.map(|r| volume_plausibility(inp.volume_ml, r));
    let terms = QualityTerms {
        iou,
        iou_counted: inp.iou_informative,
        neighbour,
        continuity,
        mode_agreement,
        stability,
        volume,
    };
    (geometric_mean(&terms), Some(terms))
}

fn yes() -> bool {
    true
}

/// Geometric mean of the terms present: any term near 0 pulls the score to 0.
pub fn geometric_mean(t: &QualityTerms) -> f64 {
    let vals: Vec<f64> =
        [t.iou_counted.then_some(t.iou), t.neighbour, Some(t.continuity), t.mode_agreement, t.stability, t.volume]
            .into_iter()
            .flatten()
            .collect();
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
        assert_eq!(
            quality(&QualityInput {
                mask: &m,
                slice_len: 16,
                slice_iou: &[0.9; 4],
                other_mode: None,
                iou_informative: true,
                slice_stability: &[],
                volume_ml: 0.0,
                plausible_ml: None
            })
            .0,
            0.0
        );
    }

    #[test]
    fn score_decreases_with_each_term() {
        let n = 32;
        let smooth = disc_stack(8, n, |z| 6.0 + z as f64 * 0.3, |_| 0.0);
        // Same per-slice areas, but the blob jumps around between slices.
        let jumpy = disc_stack(8, n, |z| 6.0 + z as f64 * 0.3, |z| if z % 2 == 0 { -8.0 } else { 8.0 });
        let q = |m: &[u8], iou: f32| {
            quality(&QualityInput {
                mask: m,
                slice_len: n * n,
                slice_iou: &[iou; 8],
                other_mode: None,
                iou_informative: true,
                slice_stability: &[],
                volume_ml: 0.0,
                plausible_ml: None,
            })
        };
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
        let (q_agree, _) = quality(&QualityInput {
            mask: &smooth,
            slice_len: n * n,
            slice_iou: &[0.9; 8],
            other_mode: Some(&smooth),
            iou_informative: true,
            slice_stability: &[],
            volume_ml: 0.0,
            plausible_ml: None,
        });
        let (q_disagree, _) = quality(&QualityInput {
            mask: &smooth,
            slice_len: n * n,
            slice_iou: &[0.9; 8],
            other_mode: Some(&jumpy),
            iou_informative: true,
            slice_stability: &[],
            volume_ml: 0.0,
            plausible_ml: None,
        });
        assert!(q_disagree < q_agree);
        assert!((0.0..=1.0).contains(&q_agree));
    }

    #[test]
    fn stability_and_volume_terms_lower_the_score() {
        let n = 32;
        let m = disc_stack(8, n, |_| 8.0, |_| 0.0);
        let q = |stab: f32, vol: f64| {
            quality(&QualityInput {
                mask: &m,
                slice_len: n * n,
                slice_iou: &[0.9; 8],
                other_mode: None,
                iou_informative: true,
                slice_stability: &[stab; 8],
                volume_ml: vol,
                plausible_ml: Some([10.0, 250.0]),
            })
        };
        let (good, t) = q(0.95, 40.0);
        let t = t.unwrap();
        assert_eq!(t.volume, Some(1.0));
        assert!((t.stability.unwrap() - 0.95).abs() < 1e-6);
        assert!(q(0.5, 40.0).0 < good - 0.05);
        assert!(q(0.95, 1.0).0 < good - 0.2, "a 1 mL 'gland' is implausible");
        assert!(q(0.95, 1000.0).0 < good - 0.2);
        assert_eq!(volume_plausibility(5.0, [10.0, 250.0]), 0.5);
        assert_eq!(volume_plausibility(500.0, [10.0, 250.0]), 0.5);
        assert_eq!(volume_plausibility(0.0, [10.0, 250.0]), 0.0);
    }

    #[test]
    fn stability_score_is_sams() {
        let t = tch::Tensor::from_slice(&[-3.0f32, -0.5, 0.5, 2.0, 3.0]);
        // > +1: 2 of them; > −1: 4 of them.
        assert_eq!(stability_score(&t, 1.0), 0.5);
        assert!(stability_score(&tch::Tensor::from_slice(&[-5.0f32, -2.0]), 1.0).is_nan());
    }
}

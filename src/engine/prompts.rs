//! Automatic prompts and the mask selection of SAM's automatic mask generator as DeSAM runs it:
//! grid points, the whole-image box, IoU filter, box-NMS, small-region clean-up. Pure arrays, no model.

use super::components::label_components;

/// N×N point prompts in the input-pixel frame of side `s`: ((k + 0.5) / N) · S on each axis,
/// row-major (y outer, x inner), each as (x, y).
pub fn grid_points(n: usize, s: f64) -> Vec<[f64; 2]> {
    let mut pts = Vec::with_capacity(n * n);
    for j in 0..n {
        for i in 0..n {
            pts.push([(i as f64 + 0.5) / n as f64 * s, (j as f64 + 0.5) / n as f64 * s]);
        }
    }
    pts
}

/// The whole-image box [x0, y0, x1, y1] = [0, 0, S, S] (DeSAM's box prompt).
pub fn whole_box(s: f64) -> [f64; 4] {
    [0.0, 0.0, s, s]
}

/// A binary mask of one slice, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct BinMask {
    pub h: usize,
    pub w: usize,
    pub data: Vec<bool>,
}

impl BinMask {
    pub fn new(h: usize, w: usize, data: Vec<bool>) -> Self {
        assert_eq!(data.len(), h * w);
        BinMask { h, w, data }
    }
    pub fn area(&self) -> usize {
        self.data.iter().filter(|&&b| b).count()
    }
    /// Tight box [x0, y0, x1, y1] (inclusive pixel indices, as SAM's `batched_mask_to_box`);
    /// [0, 0, 0, 0] for an empty mask.
    pub fn bbox(&self) -> [f64; 4] {
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0usize, 0usize);
        for y in 0..self.h {
            for x in 0..self.w {
                if self.data[y * self.w + x] {
                    x0 = x0.min(x);
                    y0 = y0.min(y);
                    x1 = x1.max(x);
                    y1 = y1.max(y);
                }
            }
        }
        if x0 == usize::MAX {
            [0.0; 4]
        } else {
            [x0 as f64, y0 as f64, x1 as f64, y1 as f64]
        }
    }
}

/// IoU of two xyxy boxes (torchvision's `box_iou`: area = (x1 − x0)·(y1 − y0), no +1).
pub fn box_iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let area = |r: &[f64; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// Greedy box-NMS (torchvision `nms`): indices kept, in descending score order. Ties keep the
/// earlier index first (stable sort).
pub fn box_nms(boxes: &[[f64; 4]], scores: &[f64], iou_threshold: f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap_or(std::cmp::Ordering::Equal));
    let mut keep: Vec<usize> = Vec::new();
    for &i in &order {
        if keep.iter().all(|&k| box_iou(&boxes[k], &boxes[i]) <= iou_threshold) {
            keep.push(i);
        }
    }
    keep
}

/// Which of SAM's two clean-up passes to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionMode {
    /// Fill background components smaller than the area (holes).
    Holes,
    /// Delete foreground components smaller than the area; if all are small keep the largest.
    Islands,
}

/// SAM's `remove_small_regions`: returns the cleaned mask and whether it changed.
/// Like SAM, holes are the connected components of the inverted mask, including ones touching the
/// border, and both passes use 8-connectivity.
pub fn remove_small_regions(mask: &BinMask, area_thresh: usize, mode: RegionMode) -> (BinMask, bool) {
    let holes = mode == RegionMode::Holes;
    let working: Vec<bool> = mask.data.iter().map(|&b| b != holes).collect();
    let (labels, sizes) = label_components([1, mask.h, mask.w], |i| working[i]);
    let n = sizes.len() - 1;
    let small: Vec<usize> = (1..=n).filter(|&l| sizes[l] < area_thresh).collect();
    if small.is_empty() {
        return (mask.clone(), false);
    }
    // Regions to keep in `working` (label 0 = background of `working` is never kept as a region).
    let mut keep = vec![false; sizes.len()];
    for (l, k) in keep.iter_mut().enumerate().skip(1) {
        *k = sizes[l] >= area_thresh;
    }
    if holes {
        // Holes: keep every large inverted region; small ones become foreground.
    } else if !keep.iter().any(|&k| k) {
        // Every island is small: keep the largest (first on ties, as numpy's argmax).
        let largest = (1..=n).max_by(|&a, &b| sizes[a].cmp(&sizes[b]).then(b.cmp(&a))).unwrap();
        keep[largest] = true;
    }
    let data: Vec<bool> = labels
        .iter()
        .map(|&l| {
            let in_working = l != 0 && keep[l as usize];
            // Holes: foreground = NOT (a kept inverted region).
            if holes {
                !in_working
            } else {
                in_working
            }
        })
        .collect();
    (BinMask { h: mask.h, w: mask.w, data }, true)
}

/// Settings of the automatic mask generator's filters (spec §10.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AmgSettings {
    pub iou_threshold: f64,
    pub nms_threshold: f64,
    /// Minimum region area in pixels at the resolution of the masks given.
    pub min_area: usize,
}

/// What the generator chose for one slice.
#[derive(Debug, Clone, PartialEq)]
pub struct AmgChoice {
    /// Index of the surviving prompt (the slice prediction), None when nothing passed the IoU filter.
    pub prompt: Option<usize>,
    /// Its cleaned mask.
    pub mask: Option<BinMask>,
    /// Prompts that passed the IoU filter.
    pub passed_iou: usize,
    /// Survivors of the first NMS.
    pub after_nms: usize,
}

/// The automatic mask generator's selection on one slice's masks (one per prompt) and predicted
/// IoUs: IoU filter → box-NMS by IoU → small-region clean-up (holes, then islands) → NMS again
/// preferring unchanged masks (score 1 if unchanged, 0 if changed) → the first survivor.
pub fn select_mask(masks: &[BinMask], ious: &[f64], s: &AmgSettings) -> AmgChoice {
    assert_eq!(masks.len(), ious.len());
    let passed: Vec<usize> = (0..masks.len()).filter(|&i| ious[i] > s.iou_threshold).collect();
    if passed.is_empty() {
        return AmgChoice { prompt: None, mask: None, passed_iou: 0, after_nms: 0 };
    }
    let boxes: Vec<[f64; 4]> = passed.iter().map(|&i| masks[i].bbox()).collect();
    let scores: Vec<f64> = passed.iter().map(|&i| ious[i]).collect();
    let kept: Vec<usize> = box_nms(&boxes, &scores, s.nms_threshold).into_iter().map(|k| passed[k]).collect();
    let after_nms = kept.len();
    let mut cleaned = Vec::with_capacity(kept.len());
    let mut unchanged_scores = Vec::with_capacity(kept.len());
    for &i in &kept {
        let (m, ch_holes) = remove_small_regions(&masks[i], s.min_area, RegionMode::Holes);
        let (m, ch_islands) = remove_small_regions(&m, s.min_area, RegionMode::Islands);
        unchanged_scores.push(if ch_holes || ch_islands { 0.0 } else { 1.0 });
        cleaned.push(m);
    }
    let boxes2: Vec<[f64; 4]> = cleaned.iter().map(|m| m.bbox()).collect();
    let keep2 = box_nms(&boxes2, &unchanged_scores, s.nms_threshold);
    let first = keep2[0];
    AmgChoice { prompt: Some(kept[first]), mask: Some(cleaned[first].clone()), passed_iou: passed.len(), after_nms }
}

/// Clean one mask as the generator does (holes, then islands).
pub fn clean_mask(mask: &BinMask, min_area: usize) -> BinMask {
    let (m, _) = remove_small_regions(mask, min_area, RegionMode::Holes);
    remove_small_regions(&m, min_area, RegionMode::Islands).0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rect(h: usize, w: usize, rects: &[(usize, usize, usize, usize)]) -> BinMask {
        let mut d = vec![false; h * w];
        for &(y0, x0, y1, x1) in rects {
            for y in y0..y1 {
                for x in x0..x1 {
                    d[y * w + x] = true;
                }
            }
        }
        BinMask::new(h, w, d)
    }

    #[test]
    fn grid_matches_official_coordinates() {
        let p = grid_points(9, 1024.0);
        assert_eq!(p.len(), 81);
        assert!((p[0][0] - 0.5 / 9.0 * 1024.0).abs() < 1e-9);
        assert!((p[8][0] - 8.5 / 9.0 * 1024.0).abs() < 1e-9 && (p[8][1] - p[0][1]).abs() < 1e-12);
        assert!((p[9][1] - 1.5 / 9.0 * 1024.0).abs() < 1e-9);
        // 256-frame values of the spec ×4.
        assert!((p[1][0] / 4.0 - 42.666).abs() < 1e-2);
    }

    #[test]
    fn nms_suppresses_overlaps_by_score() {
        let boxes = [[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [20.0, 20.0, 30.0, 30.0]];
        let keep = box_nms(&boxes, &[0.6, 0.9, 0.7], 0.7);
        assert_eq!(keep, vec![1, 2]);
        let keep = box_nms(&boxes, &[0.6, 0.9, 0.7], 0.95);
        assert_eq!(keep, vec![1, 2, 0]);
    }

    #[test]
    fn components_use_eight_connectivity() {
        let m = rect(6, 6, &[(0, 0, 1, 1), (1, 1, 2, 2), (4, 4, 6, 6)]);
        let (_, sizes) = label_components([1, 6, 6], |i| m.data[i]);
        assert_eq!(sizes.len() - 1, 2);
        let mut s = sizes[1..].to_vec();
        s.sort();
        assert_eq!(s, vec![2, 4]);
    }

    #[test]
    fn small_islands_removed_large_kept() {
        let m = rect(40, 40, &[(0, 0, 10, 10), (20, 20, 25, 25), (30, 0, 40, 12)]);
        let (c, changed) = remove_small_regions(&m, 50, RegionMode::Islands);
        assert!(changed);
        assert_eq!(c.area(), 100 + 120);
        assert!(!c.data[22 * 40 + 22]);
    }

    #[test]
    fn all_small_islands_keep_the_largest() {
        let m = rect(40, 40, &[(0, 0, 3, 3), (20, 20, 25, 25)]);
        let (c, changed) = remove_small_regions(&m, 50, RegionMode::Islands);
        assert!(changed);
        assert_eq!(c.area(), 25);
        assert!(c.data[22 * 40 + 22]);
    }

    #[test]
    fn small_holes_filled_large_background_kept() {
        let mut m = rect(40, 40, &[(5, 5, 35, 35)]);
        m.data[20 * 40 + 20] = false; // 1-px hole
        for y in 10..16 {
            for x in 10..16 {
                m.data[y * 40 + x] = false; // 36-px hole
            }
        }
        let (c, changed) = remove_small_regions(&m, 10, RegionMode::Holes);
        assert!(changed);
        assert!(c.data[20 * 40 + 20]);
        assert!(!c.data[12 * 40 + 12]);
        assert!(!c.data[0]);
        let (_, changed) = remove_small_regions(&rect(40, 40, &[(5, 5, 35, 35)]), 10, RegionMode::Holes);
        assert!(!changed);
    }

    #[test]
    fn selection_filters_iou_nms_and_prefers_unchanged() {
        let s = AmgSettings { iou_threshold: 0.5, nms_threshold: 0.7, min_area: 20 };
        let big = rect(32, 32, &[(4, 4, 20, 20)]);
        let big_with_speck = rect(32, 32, &[(4, 4, 20, 20), (28, 28, 29, 29)]);
        let other = rect(32, 32, &[(22, 22, 30, 30)]);
        // All below the IoU threshold: nothing.
        let c = select_mask(&[big.clone(), other.clone()], &[0.4, 0.5], &s);
        assert_eq!(c.prompt, None);
        // The speck changes the box, so both survive the first NMS; clean-up makes them equal, and the
        // second NMS prefers the unchanged one although its IoU is lower.
        let c = select_mask(&[big_with_speck.clone(), big.clone()], &[0.9, 0.8], &s);
        assert_eq!(c.passed_iou, 2);
        assert_eq!(c.after_nms, 2);
        assert_eq!(c.prompt, Some(1));
        assert_eq!(c.mask.unwrap(), big);
        // Overlapping boxes: the higher IoU wins the first NMS.
        let shifted = rect(32, 32, &[(4, 5, 20, 21)]);
        let c = select_mask(&[big.clone(), shifted, other], &[0.7, 0.95, 0.6], &s);
        assert_eq!(c.after_nms, 2);
        assert_eq!(c.prompt, Some(1));
    }
}

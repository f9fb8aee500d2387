//! Segmentation metrics: 3-D Dice, 95% Hausdorff distance in mm (MedPy's `hd95` definition), and
//! the official DeSAM metric (foreground slices at 256², 50-pixel border zeroed). Pure arrays.

use tch::{Kind, Tensor};

/// 2|A∩B| / (|A|+|B|); 1 when both are empty: the engine's QA uses the same definition.
pub use crate::engine::quality::dice;

/// Surface voxels (6-connected border) of a [nz, ny, nx] mask, in mm (x, y, z).
fn surface(m: &[u8], dims: [usize; 3], spacing: [f64; 3]) -> Vec<[f64; 3]> {
    let [nz, ny, nx] = dims;
    let at = |z: i64, y: i64, x: i64| -> bool {
        z >= 0
            && y >= 0
            && x >= 0
            && (z as usize) < nz
            && (y as usize) < ny
            && (x as usize) < nx
            && m[(z as usize * ny + y as usize) * nx + x as usize] != 0
    };
    let mut out = Vec::new();
    for z in 0..nz as i64 {
        for y in 0..ny as i64 {
            for x in 0..nx as i64 {
                if !at(z, y, x) {
                    continue;
                }
                let border = !(at(z - 1, y, x)
                    && at(z + 1, y, x)
                    && at(z, y - 1, x)
                    && at(z, y + 1, x)
                    && at(z, y, x - 1)
                    && at(z, y, x + 1));
                if border {
                    out.push([x as f64 * spacing[0], y as f64 * spacing[1], z as f64 * spacing[2]]);
                }
            }
        }
    }
    out
}

fn directed(a: &[[f64; 3]], b: &[[f64; 3]]) -> Vec<f64> {
    // Brute force: prostate surfaces have a few thousand voxels.
    a.iter()
        .map(|p| {
            b.iter()
                .map(|q| (p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2) + (p[2] - q[2]).powi(2))
                .fold(f64::INFINITY, f64::min)
                .sqrt()
        })
        .collect()
}

/// 95th percentile of the pooled surface distances both ways (MedPy `hd95`), in mm. `spacing` is
/// (x, y, z). None when either mask is empty.
pub fn hd95(a: &[u8], b: &[u8], dims: [usize; 3], spacing: [f64; 3]) -> Option<f64> {
    let (sa, sb) = (surface(a, dims, spacing), surface(b, dims, spacing));
    if sa.is_empty() || sb.is_empty() {
        return None;
    }
    let mut d = directed(&sa, &sb);
    d.extend(directed(&sb, &sa));
    d.sort_by(|x, y| x.total_cmp(y));
    // numpy's linear-interpolated percentile.
    let pos = 0.95 * (d.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(d.len() - 1);
    Some(d[lo] + (pos - lo as f64) * (d[hi] - d[lo]))
}

/// Official DeSAM metric of one case: prediction and ground truth resized to 256² (nearest), only
/// slices whose resized ground truth has foreground, a 50-pixel border of the prediction zeroed,
/// then one Dice over the stack. Returns (dice, number of slices).
pub fn official_dice(pred: &[u8], gt: &[u8], dims: [usize; 3]) -> (f64, usize) {
    let all: Vec<usize> = (0..dims[0]).collect();
    let side = 256;
    let p = super::precompute::labels_at(pred, dims, &all, side);
    let g = super::precompute::labels_at(gt, dims, &all, side);
    let fg: Vec<i64> = (0..dims[0] as i64).filter(|&z| g.get(z).sum(Kind::Int64).int64_value(&[]) > 0).collect();
    if fg.is_empty() {
        return (f64::NAN, 0);
    }
    let idx = Tensor::from_slice(&fg);
    let p = p.index_select(0, &idx);
    let g = g.index_select(0, &idx);
    let border = Tensor::zeros([side, side], (Kind::Uint8, tch::Device::Cpu));
    let _ = border.narrow(0, 50, 156).narrow(1, 50, 156).fill_(1);
    let p = p * border.unsqueeze(0);
    let pv: Vec<u8> = Vec::try_from(p.view([-1])).unwrap_or_default();
    let gv: Vec<u8> = Vec::try_from(g.view([-1])).unwrap_or_default();
    (dice(&pv, &gv), fg.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cube(dims: [usize; 3], lo: usize, hi: usize) -> Vec<u8> {
        let [nz, ny, nx] = dims;
        let mut m = vec![0u8; nz * ny * nx];
        for z in lo..hi {
            for y in lo..hi {
                for x in lo..hi {
                    m[(z * ny + y) * nx + x] = 1;
                }
            }
        }
        m
    }

    #[test]
    fn dice_and_hd95_of_shifted_cubes() {
        let dims = [12, 12, 12];
        let a = cube(dims, 2, 8);
        let mut b = vec![0u8; a.len()];
        // b = a shifted by 2 voxels along x.
        for z in 0..12 {
            for y in 0..12 {
                for x in 2..12 {
                    b[(z * 12 + y) * 12 + x] = a[(z * 12 + y) * 12 + x - 2];
                }
            }
        }
        assert_eq!(dice(&a, &a), 1.0);
        assert!((dice(&a, &b) - 2.0 * 4.0 / 12.0).abs() < 1e-12);
        assert_eq!(hd95(&a, &a, dims, [1.0; 3]), Some(0.0));
        let h = hd95(&a, &b, dims, [0.5, 1.0, 3.0]).unwrap();
        assert!((h - 1.0).abs() < 1e-9, "{h}"); // 2 voxels × 0.5 mm
        assert_eq!(hd95(&a, &vec![0; a.len()], dims, [1.0; 3]), None);
    }

    #[test]
    fn official_metric_ignores_border_and_empty_slices() {
        let dims = [3, 64, 64];
        let mut gt = vec![0u8; 3 * 64 * 64];
        for y in 20..40 {
            for x in 20..40 {
                gt[64 * 64 + y * 64 + x] = 1;
            }
        }
        let mut pred = gt.clone();
        pred[0] = 1; // border pixel of a background slice: ignored
        pred[64 * 64] = 1; // border of the foreground slice: zeroed
        let (d, n) = official_dice(&pred, &gt, dims);
        assert_eq!(n, 1);
        assert!((d - 1.0).abs() < 1e-12, "{d}");
    }
}

//! Segmentation metrics: 3-D Dice, 95% Hausdorff distance in mm (MedPy's `hd95` definition), and
//! the official DeSAM metric (foreground slices at 256², 50-pixel border zeroed). Pure arrays.

use tch::{Kind, Tensor};

/// 2|A∩B| / (|A|+|B|); 1 when both are empty: the engine's QA uses the same definition.
pub use crate::engine::quality::dice;

/// Surface voxels (6-connected border: a voxel of the mask with a 6-neighbour outside it or outside
/// the volume) of a [nz, ny, nx] mask.
fn surface(m: &[u8], dims: [usize; 3]) -> Vec<bool> {
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
    let mut out = vec![false; m.len()];
    for z in 0..nz as i64 {
        for y in 0..ny as i64 {
            for x in 0..nx as i64 {
                if at(z, y, x) {
                    out[(z as usize * ny + y as usize) * nx + x as usize] = !(at(z - 1, y, x)
                        && at(z + 1, y, x)
                        && at(z, y - 1, x)
                        && at(z, y + 1, x)
                        && at(z, y, x - 1)
                        && at(z, y, x + 1));
                }
            }
        }
    }
    out
}

/// One line of the exact squared distance transform (Felzenszwalb & Huttenlocher, "Distance
/// transforms of sampled functions", 2012): out[p] = min_q f[q] + (w·(p − q))², samples w mm apart.
/// Infinite f (no site on this line yet) takes no part; a line with none stays infinite.
fn distance_line(f: &[f64], w: f64, out: &mut [f64], v: &mut Vec<usize>, z: &mut Vec<f64>) {
    v.clear();
    z.clear();
    let pos = |q: usize| q as f64 * w;
    for (q, &fq) in f.iter().enumerate() {
        if fq.is_infinite() {
            continue;
        }
        // Pop the parabolas that the new one hides entirely, then record where it takes over.
        loop {
            match v.last() {
                None => {
                    v.push(q);
                    z.push(f64::NEG_INFINITY);
                    break;
                }
                Some(&p) => {
                    let s = ((fq + pos(q) * pos(q)) - (f[p] + pos(p) * pos(p))) / (2.0 * (pos(q) - pos(p)));
                    if s <= *z.last().unwrap_or(&f64::NEG_INFINITY) {
                        v.pop();
                        z.pop();
                    } else {
                        v.push(q);
                        z.push(s);
                        break;
                    }
                }
            }
        }
    }
    if v.is_empty() {
        out.fill(f64::INFINITY);
        return;
    }
    let mut k = 0;
    for (p, o) in out.iter_mut().enumerate() {
        let x = pos(p);
        while k + 1 < v.len() && z[k + 1] < x {
            k += 1;
        }
        let d = x - pos(v[k]);
        *o = d * d + f[v[k]];
    }
}

/// Squared distance in mm² from every voxel of a [nz, ny, nx] grid to the nearest `site` voxel
/// (exact, separable: x, then y, then z lines); infinite everywhere when there is no site.
fn squared_distance_to(site: &[bool], dims: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let [nz, ny, nx] = dims;
    let mut d: Vec<f64> = site.iter().map(|&s| if s { 0.0 } else { f64::INFINITY }).collect();
    let (mut v, mut z) = (Vec::new(), Vec::new());
    // (length, stride, spacing, first index of every line) for each axis.
    let axes: [(usize, usize, f64, Vec<usize>); 3] = [
        (nx, 1, spacing[0], (0..nz * ny).map(|l| l * nx).collect()),
        (ny, nx, spacing[1], (0..nz).flat_map(|zz| (0..nx).map(move |x| zz * ny * nx + x)).collect()),
        (nz, ny * nx, spacing[2], (0..ny * nx).collect()),
    ];
    let mut line = Vec::new();
    let mut out = Vec::new();
    for (len, stride, w, starts) in &axes {
        line.resize(*len, 0.0);
        out.resize(*len, 0.0);
        for &s0 in starts {
            for i in 0..*len {
                line[i] = d[s0 + i * stride];
            }
            distance_line(&line, *w, &mut out, &mut v, &mut z);
            for i in 0..*len {
                d[s0 + i * stride] = out[i];
            }
        }
    }
    d
}

/// 95th percentile of the pooled surface distances both ways (MedPy `hd95`), in mm. `spacing` is
/// (x, y, z). None when either mask is empty. Distances come from an exact distance transform of
/// each surface (as MedPy's), not from all pairs: a full-size prostate has ~60 000 surface voxels.
pub fn hd95(a: &[u8], b: &[u8], dims: [usize; 3], spacing: [f64; 3]) -> Option<f64> {
    let (sa, sb) = (surface(a, dims), surface(b, dims));
    if !sa.iter().any(|&s| s) || !sb.iter().any(|&s| s) {
        return None;
    }
    let (to_a, to_b) = (squared_distance_to(&sa, dims, spacing), squared_distance_to(&sb, dims, spacing));
    let mut d: Vec<f64> = sa.iter().zip(&to_b).filter(|(&s, _)| s).map(|(_, &d2)| d2.sqrt()).collect();
    d.extend(sb.iter().zip(&to_a).filter(|(&s, _)| s).map(|(_, &d2)| d2.sqrt()));
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

    /// HD95 from all pairs of surface voxels: the definition, for small volumes.
    fn hd95_all_pairs(a: &[u8], b: &[u8], dims: [usize; 3], spacing: [f64; 3]) -> Option<f64> {
        let points = |m: &[u8]| -> Vec<[f64; 3]> {
            let [_, ny, nx] = dims;
            surface(m, dims)
                .iter()
                .enumerate()
                .filter(|(_, &s)| s)
                .map(|(i, _)| {
                    let (z, y, x) = (i / (ny * nx), (i / nx) % ny, i % nx);
                    [x as f64 * spacing[0], y as f64 * spacing[1], z as f64 * spacing[2]]
                })
                .collect()
        };
        let (pa, pb) = (points(a), points(b));
        if pa.is_empty() || pb.is_empty() {
            return None;
        }
        let directed = |from: &[[f64; 3]], to: &[[f64; 3]]| -> Vec<f64> {
            from.iter()
                .map(|p| {
                    to.iter()
                        .map(|q| (p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2) + (p[2] - q[2]).powi(2))
                        .fold(f64::INFINITY, f64::min)
                        .sqrt()
                })
                .collect()
        };
        let mut d = directed(&pa, &pb);
        d.extend(directed(&pb, &pa));
        d.sort_by(|x, y| x.total_cmp(y));
        let pos = 0.95 * (d.len() - 1) as f64;
        let lo = pos.floor() as usize;
        let hi = (lo + 1).min(d.len() - 1);
        Some(d[lo] + (pos - lo as f64) * (d[hi] - d[lo]))
    }

    #[test]
    fn distance_transform_hd95_equals_the_all_pairs_definition() {
        // Random blobs (and a speckle) on an anisotropic grid like a T2 series: thick slices.
        let dims = [7, 19, 23];
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as f64 / (1u64 << 31) as f64
        };
        for trial in 0..6 {
            let blob = |cx: f64, cy: f64, cz: f64, r: f64| -> Vec<u8> {
                let mut m = vec![0u8; dims.iter().product()];
                for z in 0..dims[0] {
                    for y in 0..dims[1] {
                        for x in 0..dims[2] {
                            let d = ((x as f64 - cx) / r).powi(2)
                                + ((y as f64 - cy) / r).powi(2)
                                + ((z as f64 - cz) / 2.0).powi(2);
                            m[(z * dims[1] + y) * dims[2] + x] = (d < 1.0) as u8;
                        }
                    }
                }
                m
            };
            let a = blob(5.0 + 12.0 * next(), 4.0 + 10.0 * next(), 3.0 * next() + 2.0, 3.0 + 4.0 * next());
            let mut b = blob(5.0 + 12.0 * next(), 4.0 + 10.0 * next(), 3.0 * next() + 2.0, 2.0 + 5.0 * next());
            let n = b.len();
            b[(trial * 131) % n] = 1; // a stray voxel, as a false positive far away
            let spacing = [0.4 + next(), 0.4 + next(), 2.0 + 2.0 * next()];
            let fast = hd95(&a, &b, dims, spacing).unwrap();
            let slow = hd95_all_pairs(&a, &b, dims, spacing).unwrap();
            assert!((fast - slow).abs() < 1e-9, "trial {trial}: {fast} vs {slow}");
            assert!(fast > 0.0);
        }
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

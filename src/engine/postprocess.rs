//! From model logits to a mask on the volume's own grid: SAM's bilinear up-sampling, crop and
//! resize to each slice's native H×W, threshold, and optional 3-D clean-up. Knows nothing of the model.

use tch::{Kind, Tensor};

use super::components::label_components;
pub use crate::modeldir::Cleanup3d;

/// Map 4g×4g logits (1×1×4g×4g, any device/kind) to the native slice grid h×w, as SAM's
/// `postprocess_masks`: bilinear (align_corners = false) to the input side S, crop the padded
/// input region (`valid` = rows×cols of S that hold image; S×S for the stretch resize), bilinear to h×w.
/// Returns f32 logits, row-major h×w.
pub fn logits_to_native(logits: &Tensor, input_side: i64, valid: (i64, i64), h: usize, w: usize) -> Vec<f32> {
    let t = logits.to_device(tch::Device::Cpu).to_kind(Kind::Float).view([1, 1, logits.size()[2], logits.size()[3]]);
    let up = t.upsample_bilinear2d([input_side, input_side], false, None, None);
    let cropped = up.narrow(2, 0, valid.0).narrow(3, 0, valid.1);
    let native = cropped.upsample_bilinear2d([h as i64, w as i64], false, None, None).contiguous();
    Vec::<f32>::try_from(native.view([-1])).expect("float logits")
}

/// Threshold logits at 0 (sigmoid > 0.5).
pub fn threshold(logits: &[f32]) -> Vec<bool> {
    logits.iter().map(|&v| v > 0.0).collect()
}

/// Apply a 3-D clean-up in place; returns the number of voxels removed.
pub fn cleanup_3d(dims: [usize; 3], mask: &mut [u8], voxel_ml: f64, how: Cleanup3d) -> usize {
    if how == Cleanup3d::None {
        return 0;
    }
    let (labels, sizes) = label_components(dims, |i| mask[i] != 0);
    if sizes.len() <= 1 {
        return 0;
    }
    let keep: Vec<bool> = match how {
        Cleanup3d::None => unreachable!(),
        Cleanup3d::KeepLargest => {
            let largest = (1..sizes.len()).max_by(|&a, &b| sizes[a].cmp(&sizes[b]).then(b.cmp(&a))).unwrap();
            (0..sizes.len()).map(|l| l == largest).collect()
        }
        Cleanup3d::MinVolume { ml } => (0..sizes.len()).map(|l| l > 0 && sizes[l] as f64 * voxel_ml >= ml).collect(),
    };
    let mut removed = 0;
    for (m, &l) in mask.iter_mut().zip(&labels) {
        if *m != 0 && !keep[l as usize] {
            *m = 0;
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_logit_field_maps_to_the_right_native_boundary() {
        // Logits at 32×32 equal to (x_centre − 20) in output-pixel units; a native grid of 96 columns
        // spans the same image, so the field must stay linear and cross zero at x_centre = 20.
        let g = 32i64;
        let vals: Vec<f32> = (0..g * g).map(|i| (i % g) as f32 + 0.5 - 20.0).collect();
        let t = Tensor::from_slice(&vals).view([1, 1, g, g]);
        let (h, w) = (40usize, 96usize);
        let native = logits_to_native(&t, 128, (128, 128), h, w);
        // Bilinear (align_corners = false) preserves linear fields away from the borders: the value at
        // native column c (centre (c + 0.5)/96 · 32 in output units) is that centre − 20.
        for c in 5..90 {
            let expect = (c as f32 + 0.5) / w as f32 * g as f32 - 20.0;
            let got = native[10 * w + c];
            assert!((got - expect).abs() < 1e-4, "col {c}: {got} vs {expect}");
        }
        let m = threshold(&native);
        let first_fg = (0..w).find(|&c| m[7 * w + c]).unwrap();
        // centre > 20 ⇔ (c + 0.5) · 32 / 96 > 20 ⇔ c > 59.5.
        assert_eq!(first_fg, 60);
        // Rows are independent of y.
        assert_eq!(&m[0..w], &m[(h - 1) * w..h * w]);
    }

    #[test]
    fn crop_of_padded_input_is_undone() {
        // Input side 8 of which only the top 4 rows are image; logits constant +1 above, −1 below.
        let g = 8i64;
        let vals: Vec<f32> = (0..g * g).map(|i| if i / g < 4 { 1.0 } else { -1.0 }).collect();
        let t = Tensor::from_slice(&vals).view([1, 1, g, g]);
        let native = logits_to_native(&t, 8, (4, 8), 4, 8);
        assert!(threshold(&native).iter().all(|&b| b));
    }

    #[test]
    fn cleanup_3d_keeps_largest_or_drops_small() {
        let dims = [3, 5, 5];
        let mut m = vec![0u8; 75];
        for z in 0..3 {
            for y in 0..2 {
                for x in 0..2 {
                    m[(z * 5 + y) * 5 + x] = 1; // 12 voxels
                }
            }
        }
        m[(5 + 4) * 5 + 4] = 1; // 1 voxel island
        let mut a = m.clone();
        assert_eq!(cleanup_3d(dims, &mut a, 1.0, Cleanup3d::KeepLargest), 1);
        assert_eq!(a.iter().filter(|&&v| v != 0).count(), 12);
        let mut b = m.clone();
        assert_eq!(cleanup_3d(dims, &mut b, 1.0, Cleanup3d::MinVolume { ml: 13.0 }), 13);
        let mut c = m.clone();
        assert_eq!(cleanup_3d(dims, &mut c, 1.0, Cleanup3d::None), 0);
        assert_eq!(c, m);
    }
}

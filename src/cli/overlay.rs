//! Overlay montage for the demo: one column per series (whole field of view over a zoom on the gland),
//! MR in grey with a predicted (red) and a reference (green) contour. Renders pixels only (crate::raster draws text and encodes PNG).

use crate::raster::Rgb;

/// Contour colours.
pub const PREDICTED: [u8; 3] = [255, 40, 40];
pub const REFERENCE: [u8; 3] = [40, 230, 40];
/// Side of the zoomed square around the gland (mm).
pub const ZOOM_MM: f64 = 90.0;

/// One slice to draw: image, two masks on its grid (row-major `ny`×`nx`), pixel spacing (x, y) in mm.
pub struct OverlayPanel {
    pub image: Vec<f32>,
    pub truth: Vec<u8>,
    pub predicted: Vec<u8>,
    pub nx: usize,
    pub ny: usize,
    pub spacing: [f64; 2],
    /// Drawn in the top-left corner (digits, A–F, '.', '-' and spaces).
    pub label: String,
}

/// Two rows (whole slice, then a [`ZOOM_MM`] square around the reference gland) × one column per
/// panel, each `size`×`size` pixels, 4-pixel black gaps.
pub fn render(panels: &[OverlayPanel], size: usize) -> Rgb {
    let gap = 4;
    let width = (panels.len() * size + panels.len().saturating_sub(1) * gap).max(1);
    let height = 2 * size + gap;
    let mut out = Rgb::new(width, height);
    for (i, p) in panels.iter().enumerate() {
        let x0 = i * (size + gap);
        let full = View { x0: 0.0, y0: 0.0, sx: p.nx as f64 / size as f64, sy: p.ny as f64 / size as f64 };
        draw_view(&mut out, p, &full, size, x0, 0);
        let (cx, cy) = centroid(&p.truth, p.nx, p.ny)
            .or_else(|| centroid(&p.predicted, p.nx, p.ny))
            .unwrap_or((p.nx as f64 / 2.0, p.ny as f64 / 2.0));
        let (hx, hy) = (0.5 * ZOOM_MM / p.spacing[0], 0.5 * ZOOM_MM / p.spacing[1]);
        let zoom = View { x0: cx - hx, y0: cy - hy, sx: 2.0 * hx / size as f64, sy: 2.0 * hy / size as f64 };
        draw_view(&mut out, p, &zoom, size, x0, size + gap);
        out.draw_text(&p.label, x0 + 6, 6, (size / 96).max(2), [255, 255, 0]);
    }
    out
}

/// Panel pixel (px, py) shows image point (x0 + (px + 0.5)·sx, y0 + (py + 0.5)·sy) in pixel units.
struct View {
    x0: f64,
    y0: f64,
    sx: f64,
    sy: f64,
}

fn centroid(mask: &[u8], nx: usize, ny: usize) -> Option<(f64, f64)> {
    let (mut sx, mut sy, mut n) = (0.0, 0.0, 0usize);
    for y in 0..ny {
        for x in 0..nx {
            if mask[y * nx + x] != 0 {
                sx += x as f64 + 0.5;
                sy += y as f64 + 0.5;
                n += 1;
            }
        }
    }
    (n > 0).then(|| (sx / n as f64, sy / n as f64))
}

fn draw_view(out: &mut Rgb, p: &OverlayPanel, v: &View, size: usize, ox: usize, oy: usize) {
    let (nx, ny) = (p.nx, p.ny);
    let mut sorted = p.image.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| sorted.get(((sorted.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(0.0);
    let lo = pct(0.005);
    let hi = pct(0.995).max(lo + 1e-3);
    // Nearest image pixel under a panel pixel, None outside the image.
    let pixel = |px: isize, py: isize| -> Option<usize> {
        let fx = v.x0 + (px as f64 + 0.5) * v.sx;
        let fy = v.y0 + (py as f64 + 0.5) * v.sy;
        if fx < 0.0 || fy < 0.0 || fx >= nx as f64 || fy >= ny as f64 {
            return None;
        }
        Some(fy as usize * nx + fx as usize)
    };
    let inside = |m: &[u8], px: isize, py: isize| pixel(px, py).is_some_and(|i| m[i] != 0);
    for py in 0..size as isize {
        for px in 0..size as isize {
            let mut c = match pixel(px, py) {
                Some(i) => {
                    let g = (((p.image[i] - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0).round() as u8;
                    [g, g, g]
                }
                None => [0, 0, 0],
            };
            for (mask, colour) in [(&p.truth, REFERENCE), (&p.predicted, PREDICTED)] {
                if inside(mask, px, py)
                    && [(-1, 0), (1, 0), (0, -1), (0, 1)].iter().any(|(dx, dy)| !inside(mask, px + dx, py + dy))
                {
                    c = colour;
                }
            }
            out.put(ox + px as usize, oy + py as usize, c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contours_are_drawn_in_their_colours_on_the_mask_edges() {
        let n = 32;
        let mut truth = vec![0u8; n * n];
        let mut predicted = vec![0u8; n * n];
        for y in 8..24 {
            for x in 8..24 {
                truth[y * n + x] = 1;
            }
        }
        for y in 12..20 {
            for x in 12..20 {
                predicted[y * n + x] = 1;
            }
        }
        let image: Vec<f32> = (0..n * n).map(|i| (i % n) as f32).collect();
        let p = OverlayPanel { image, truth, predicted, nx: n, ny: n, spacing: [1.0, 1.0], label: String::new() };
        let img = render(&[p], 32);
        assert_eq!((img.width, img.height), (32, 68));
        let at = |x: usize, y: usize| -> [u8; 3] { img.data[(y * img.width + x) * 3..][..3].try_into().unwrap() };
        // Full view is 1:1: reference edge at x = 8, predicted edge at x = 12, inside grey.
        assert_eq!(at(8, 16), REFERENCE);
        assert_eq!(at(12, 16), PREDICTED);
        let g = at(16, 16);
        assert!(g[0] == g[1] && g[1] == g[2], "inside is grey: {g:?}");
        // Grey ramps left to right.
        assert!(at(28, 2)[0] > at(3, 2)[0]);
    }
}

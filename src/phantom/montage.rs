//! A PNG contact sheet of the six sites (mid-gland slice, percentile window, gland contour) for eyes,
//! not for analysis. Draws through crate::raster; generates no anatomy itself.

use std::path::Path;

use super::{generate_case_with, GenerateOptions, Generation, PhantomCase, PhantomError, Site, Size, LABEL_TZ};

pub use crate::raster::Rgb;

/// The slice index through the gland's centroid (the middle slice of the volume when there is no gland).
pub fn mid_gland_slice(case: &PhantomCase) -> usize {
    let [nz, ny, nx] = case.labels.dims;
    let (mut sum, mut n) = (0usize, 0usize);
    for z in 0..nz {
        let c = case.labels.data[z * ny * nx..(z + 1) * ny * nx].iter().filter(|&&v| v > 0).count();
        sum += z * c;
        n += c;
    }
    if n == 0 {
        nz / 2
    } else {
        (sum as f64 / n as f64).round() as usize
    }
}

fn percentile(sorted: &[f32], q: f64) -> f32 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// The gland's centroid on slice `z` in pixel units (x, y), or the slice centre.
fn gland_centroid(case: &PhantomCase, z: usize) -> (f64, f64) {
    let [_, ny, nx] = case.labels.dims;
    let lab = case.labels.slice(z);
    let (mut sx, mut sy, mut n) = (0.0, 0.0, 0usize);
    for y in 0..ny {
        for x in 0..nx {
            if lab[y * nx + x] > 0 {
                sx += x as f64 + 0.5;
                sy += y as f64 + 0.5;
                n += 1;
            }
        }
    }
    if n == 0 {
        (nx as f64 / 2.0, ny as f64 / 2.0)
    } else {
        (sx / n as f64, sy / n as f64)
    }
}

/// One panel: slice `z` of the case, windowed to the slice's 0.5–99.5 percentiles, resampled to
/// `size`×`size`; `zoom_mm` crops a square of that side (mm) around the gland; with `contours`, the
/// gland outline in yellow and the TZ outline in cyan.
pub fn render_panel(case: &PhantomCase, z: usize, size: usize, contours: bool, zoom_mm: Option<f64>) -> Rgb {
    let [_, ny, nx] = case.labels.dims;
    let img = case.image.slice(z);
    let lab = case.labels.slice(z);
    let mut sorted: Vec<f32> = img.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let lo = percentile(&sorted, 0.005);
    let hi = percentile(&sorted, 0.995).max(lo + 1e-3);
    let mut out = Rgb::new(size, size);
    // Panel pixel (px, py) shows image point (x0 + (px+0.5)·sx, y0 + (py+0.5)·sy) in pixel units.
    let (x0, y0, sx, sy) = match zoom_mm {
        None => (0.0, 0.0, nx as f64 / size as f64, ny as f64 / size as f64),
        Some(mm) => {
            let (cx, cy) = gland_centroid(case, z);
            let half_x = 0.5 * mm / case.image.spacing[0];
            let half_y = 0.5 * mm / case.image.spacing[1];
            (cx - half_x, cy - half_y, 2.0 * half_x / size as f64, 2.0 * half_y / size as f64)
        }
    };
    let sample = |fx: f64, fy: f64| -> f32 {
        // Bilinear between pixel centres.
        let x = (fx - 0.5).clamp(0.0, (nx - 1) as f64);
        let y = (fy - 0.5).clamp(0.0, (ny - 1) as f64);
        let (x0, y0) = (x.floor() as usize, y.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(nx - 1), (y0 + 1).min(ny - 1));
        let (tx, ty) = ((x - x0 as f64) as f32, (y - y0 as f64) as f32);
        let a = img[y0 * nx + x0] * (1.0 - tx) + img[y0 * nx + x1] * tx;
        let b = img[y1 * nx + x0] * (1.0 - tx) + img[y1 * nx + x1] * tx;
        a * (1.0 - ty) + b * ty
    };
    let label_at = |px: usize, py: usize| -> u8 {
        let x = ((x0 + (px as f64 + 0.5) * sx).max(0.0) as usize).min(nx - 1);
        let y = ((y0 + (py as f64 + 0.5) * sy).max(0.0) as usize).min(ny - 1);
        lab[y * nx + x]
    };
    for py in 0..size {
        for px in 0..size {
            let v = sample(x0 + (px as f64 + 0.5) * sx, y0 + (py as f64 + 0.5) * sy);
            let g = (((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0).round() as u8;
            out.put(px, py, [g, g, g]);
        }
    }
    if contours {
        for py in 0..size {
            for px in 0..size {
                let l = label_at(px, py);
                let neighbours = [
                    label_at(px.saturating_sub(1), py),
                    label_at((px + 1).min(size - 1), py),
                    label_at(px, py.saturating_sub(1)),
                    label_at(px, (py + 1).min(size - 1)),
                ];
                let gland_edge = l > 0 && neighbours.contains(&0);
                let tz_edge = l == LABEL_TZ && neighbours.contains(&1);
                if gland_edge {
                    out.put(px, py, [255, 220, 0]);
                } else if tz_edge {
                    out.put(px, py, [0, 200, 255]);
                }
            }
        }
    }
    out
}

/// The slice through the upper third of the gland (towards the base), where the bladder and the
/// seminal vesicles show.
pub fn base_slice(case: &PhantomCase) -> usize {
    let [nz, ny, nx] = case.labels.dims;
    let with_gland: Vec<usize> =
        (0..nz).filter(|&z| case.labels.data[z * ny * nx..(z + 1) * ny * nx].iter().any(|&v| v > 0)).collect();
    match (with_gland.first(), with_gland.last()) {
        // z runs along the slice normal, which points superior (head) for these stacks.
        (Some(&lo), Some(&hi)) => (lo + (hi - lo) * 9 / 10).min(nz - 1),
        _ => nz / 2,
    }
}

/// Three rows × one column per case: the whole field of view at mid-gland, a 90 mm square around
/// the gland with the gland (yellow) and TZ (cyan) outlines, and the whole field near the base.
pub fn montage(cases: &[PhantomCase], panel: usize) -> Rgb {
    let gap = 4;
    let rows = 3;
    let width = cases.len() * panel + (cases.len().saturating_sub(1)) * gap;
    let height = rows * panel + (rows - 1) * gap;
    let mut out = Rgb::new(width.max(1), height);
    for (i, case) in cases.iter().enumerate() {
        let mid = mid_gland_slice(case);
        let base = base_slice(case);
        for (row, z, contours, zoom) in [(0usize, mid, false, None), (1, mid, true, Some(90.0)), (2, base, false, None)]
        {
            let p = render_panel(case, z, panel, contours, zoom);
            let x0 = i * (panel + gap);
            let y0 = row * (panel + gap);
            for y in 0..panel {
                let src = &p.data[y * panel * 3..(y + 1) * panel * 3];
                let dst = ((y0 + y) * out.width + x0) * 3;
                out.data[dst..dst + panel * 3].copy_from_slice(src);
            }
        }
        out.draw_text(&case.site.letter().to_string(), i * (panel + gap) + 6, 6, (panel / 64).max(2), [255, 80, 80]);
    }
    out
}

pub fn write_png(img: &Rgb, path: &Path) -> Result<(), PhantomError> {
    img.write_png(path).map_err(|e| PhantomError::Png { path: e.path, message: e.message })
}

/// Generates case `case_index` of every site and writes the contact sheet to `path`.
pub fn write_site_montage(
    path: &Path,
    seed: u64,
    case_index: u32,
    size: Size,
    panel: usize,
    generation: Generation,
) -> Result<(), PhantomError> {
    let opts = GenerateOptions { size, generation, ..Default::default() };
    let cases: Vec<PhantomCase> = Site::ALL.iter().map(|&s| generate_case_with(s, case_index, seed, &opts)).collect();
    write_png(&montage(&cases, panel), path)
}

/// Before/after sheet of the generations: per generation two rows, the mid-gland slice over the
/// whole field of view and a 90 mm square around the gland (no outlines: what a reader would see);
/// each panel is marked with its site letter and generation number.
pub fn generations_montage(rows: &[(Generation, Vec<PhantomCase>)], panel: usize) -> Rgb {
    let gap = 4;
    let columns = rows.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
    let width = columns * panel + columns.saturating_sub(1) * gap;
    let height = 2 * rows.len() * panel + (2 * rows.len()).saturating_sub(1) * gap;
    let mut out = Rgb::new(width.max(1), height.max(1));
    for (r, (generation, cases)) in rows.iter().enumerate() {
        let number = match generation {
            Generation::V1 => "1",
            Generation::V2 => "2",
            Generation::V3 => "3",
        };
        for (i, case) in cases.iter().enumerate() {
            let mid = mid_gland_slice(case);
            for (k, zoom) in [None, Some(90.0)].into_iter().enumerate() {
                let p = render_panel(case, mid, panel, false, zoom);
                let (x0, y0) = (i * (panel + gap), (2 * r + k) * (panel + gap));
                for y in 0..panel {
                    let src = &p.data[y * panel * 3..(y + 1) * panel * 3];
                    let dst = ((y0 + y) * out.width + x0) * 3;
                    out.data[dst..dst + panel * 3].copy_from_slice(src);
                }
                let label = format!("{}{}", case.site.letter(), number);
                out.draw_text(&label, x0 + 6, y0 + 6, (panel / 64).max(2), [255, 80, 80]);
            }
        }
    }
    out
}

/// Case `case_index` of every site in each generation of `generations`, as [`generations_montage`].
pub fn write_generations_montage(
    path: &Path,
    seed: u64,
    case_index: u32,
    size: Size,
    panel: usize,
    generations: &[Generation],
) -> Result<(), PhantomError> {
    let rows: Vec<(Generation, Vec<PhantomCase>)> = generations
        .iter()
        .map(|&generation| {
            let opts = GenerateOptions { size, generation, ..Default::default() };
            (generation, Site::ALL.iter().map(|&s| generate_case_with(s, case_index, seed, &opts)).collect())
        })
        .collect();
    write_png(&generations_montage(&rows, panel), path)
}

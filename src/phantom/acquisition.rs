//! The scanner side of the phantom: slice geometry, rasterisation with partial volume and slice
//! profile, coil sensitivity (bias field, endorectal hot spot), Rician noise and vendor scaling.
//! Owns no anatomy (see anatomy.rs) and no file formats.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::anatomy::{Anatomy, Zone, V3};
use super::sites::CaseProtocol;

/// Where the slice stack sits in patient space.
#[derive(Debug, Clone)]
pub struct Geometry {
    pub dims: [usize; 3],
    pub spacing: [f64; 3],
    pub origin: V3,
    pub direction: [V3; 3],
    /// LPS position of the anatomy's origin (the gland centre).
    pub gland_centre: V3,
    /// LPS centre of the stack.
    pub centre: V3,
}

impl Geometry {
    pub fn world(&self, x: f64, y: f64, z: f64) -> V3 {
        let mut p = self.origin;
        for a in 0..3 {
            p[a] += x * self.spacing[0] * self.direction[0][a]
                + y * self.spacing[1] * self.direction[1][a]
                + z * self.spacing[2] * self.direction[2][a];
        }
        p
    }
}

/// Places the stack: gland near the centre, slice plane rotated `oblique_deg` about left–right.
pub fn place(protocol: &CaseProtocol, rng: &mut ChaCha20Rng) -> Geometry {
    let th = protocol.oblique_deg.to_radians();
    let row = [1.0, 0.0, 0.0];
    let col = [0.0, th.cos(), th.sin()];
    let normal = [0.0, -th.sin(), th.cos()];
    // Arbitrary but plausible table position of the gland.
    let gland_centre = [rng.gen_range(-8.0..8.0), rng.gen_range(-40.0..-10.0), rng.gen_range(-90.0..-30.0)];
    let off_r = rng.gen_range(-6.0..6.0);
    let off_c = rng.gen_range(-10.0..4.0);
    let off_n = rng.gen_range(-4.0..4.0);
    let mut centre = gland_centre;
    for a in 0..3 {
        centre[a] += off_r * row[a] + off_c * col[a] + off_n * normal[a];
    }
    let n = protocol.matrix;
    let nz = protocol.slices;
    let spacing = [protocol.pixel_spacing, protocol.pixel_spacing, protocol.slice_spacing];
    let mut origin = centre;
    let half = [(n as f64 - 1.0) / 2.0, (n as f64 - 1.0) / 2.0, (nz as f64 - 1.0) / 2.0];
    for a in 0..3 {
        origin[a] -= half[0] * spacing[0] * row[a] + half[1] * spacing[1] * col[a] + half[2] * spacing[2] * normal[a];
    }
    Geometry { dims: [nz, n, n], spacing, origin, direction: [row, col, normal], gland_centre, centre }
}

/// The noise-free relative image (PZ = 1) and the zone labels (0 bg, 1 PZ, 2 TZ).
pub fn rasterise(anatomy: &Anatomy, geom: &Geometry, protocol: &CaseProtocol) -> (Vec<f32>, Vec<u8>) {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 16);
    rasterise_with_threads(anatomy, geom, protocol, threads)
}

/// [`rasterise`] on `threads` threads (the result does not depend on it).
pub fn rasterise_with_threads(
    anatomy: &Anatomy,
    geom: &Geometry,
    protocol: &CaseProtocol,
    threads: usize,
) -> (Vec<f32>, Vec<u8>) {
    let [nz, ny, nx] = geom.dims;
    // Partial volume over the acquired (not the interpolated) pixel.
    let acquired = protocol.full_pixel_spacing * protocol.interpolation as f64;
    let w = protocol.pixel_spacing.max(acquired);
    // Slice profile: average sub-planes ~1.2 mm apart across the slice thickness.
    let n_sub = ((protocol.slice_thickness / 1.2).round() as usize).clamp(1, 4);
    let offsets: Vec<f64> = (0..n_sub)
        .map(|i| ((i as f64 + 0.5) / n_sub as f64 - 0.5) * protocol.slice_thickness / protocol.slice_spacing)
        .collect();
    let mut image = vec![0f32; nz * ny * nx];
    let mut labels = vec![0u8; nz * ny * nx];
    let g = geom.gland_centre;
    let to_anat = |p: V3| [p[0] - g[0], p[1] - g[1], p[2] - g[2]];
    let plane = ny * nx;
    // Each voxel is a pure function of the anatomy and its position, so splitting the slices over
    // threads gives the same bytes for any thread count.
    let render = |z: usize, img: &mut [f32], lab: &mut [u8]| {
        for y in 0..ny {
            for x in 0..nx {
                let i = y * nx + x;
                let mut s = 0.0;
                for &o in &offsets {
                    s += anatomy.signal(to_anat(geom.world(x as f64, y as f64, z as f64 + o)), w);
                }
                img[i] = (s / n_sub as f64) as f32;
                lab[i] = match anatomy.zone(to_anat(geom.world(x as f64, y as f64, z as f64))) {
                    Zone::Outside => 0,
                    Zone::Peripheral => 1,
                    Zone::Transition => 2,
                };
            }
        }
    };
    let threads = threads.clamp(1, nz.max(1));
    let per = nz.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (t, (img, lab)) in image.chunks_mut(per * plane).zip(labels.chunks_mut(per * plane)).enumerate() {
            let render = &render;
            scope.spawn(move || {
                for (k, (si, sl)) in img.chunks_mut(plane).zip(lab.chunks_mut(plane)).enumerate() {
                    render(t * per + k, si, sl);
                }
            });
        }
    });
    (image, labels)
}

/// The tissue map on the image grid: the class of each voxel's centre with the image's in-plane
/// partial-volume width ([`Anatomy::tissue`]; codes of [`crate::phantom::anatomy::Tissue`]).
pub fn tissue_map(anatomy: &Anatomy, geom: &Geometry, protocol: &CaseProtocol) -> Vec<u8> {
    let [nz, ny, nx] = geom.dims;
    let w = protocol.pixel_spacing.max(protocol.full_pixel_spacing * protocol.interpolation as f64);
    let g = geom.gland_centre;
    let plane = ny * nx;
    let mut map = vec![0u8; nz * plane];
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, nz.max(1));
    let per = nz.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (t, chunk) in map.chunks_mut(per * plane).enumerate() {
            scope.spawn(move || {
                for (k, slice) in chunk.chunks_mut(plane).enumerate() {
                    let z = (t * per + k) as f64;
                    for (i, v) in slice.iter_mut().enumerate() {
                        let p = geom.world((i % nx) as f64, (i / nx) as f64, z);
                        *v = anatomy.tissue([p[0] - g[0], p[1] - g[1], p[2] - g[2]], w) as u8;
                    }
                }
            });
        }
    });
    map
}

/// Smooth multiplicative receive sensitivity: a random low-order polynomial bias field of relative
/// amplitude `protocol.bias_amplitude`, times the endorectal coil's hot spot when present.
pub struct Sensitivity {
    coeffs: [f64; 9],
    norm: f64,
    amplitude: f64,
    centre: V3,
    half_fov: f64,
    coil: Option<Coil>,
}

impl Sensitivity {
    pub fn draw(anatomy: &Anatomy, geom: &Geometry, protocol: &CaseProtocol, rng: &mut ChaCha20Rng) -> Self {
        let mut coeffs = [0.0f64; 9];
        for c in coeffs.iter_mut() {
            *c = rng.gen_range(-1.0..1.0);
        }
        // Surface arrays: brighter near the anterior and posterior skin (positive y² term).
        coeffs[4] = coeffs[4].abs() + 0.5;
        let norm: f64 = coeffs.iter().map(|c| c.abs()).sum();
        let half_fov = 0.5 * protocol.full_matrix as f64 * protocol.full_pixel_spacing;
        let coil = anatomy.coil.map(|(xy, half_len)| {
            let g = geom.gland_centre;
            let axis =
                [g[0] + xy[0], g[1] + xy[1], g[2] + anatomy.balloon.as_ref().map(|b| b.centre[2]).unwrap_or(0.0)];
            Coil {
                axis,
                half_len,
                body: rng.gen_range(0.35..0.6),
                gain: rng.gen_range(3.0..6.0),
                exponent: rng.gen_range(1.5..2.0),
                r0: 10.0,
            }
        });
        Sensitivity { coeffs, norm, amplitude: protocol.bias_amplitude, centre: geom.centre, half_fov, coil }
    }

    /// The bias field alone (1 ± amplitude).
    pub fn bias(&self, p: V3) -> f64 {
        let u = (p[0] - self.centre[0]) / self.half_fov;
        let v = (p[1] - self.centre[1]) / self.half_fov;
        let w = (p[2] - self.centre[2]) / self.half_fov;
        let (u, v, w) = (u.clamp(-1.0, 1.0), v.clamp(-1.0, 1.0), w.clamp(-1.0, 1.0));
        let basis = [u, v, w, u * u * 2.0 - 1.0, v * v * 2.0 - 1.0, w * w * 2.0 - 1.0, u * v, v * w, u * w];
        let g: f64 = self.coeffs.iter().zip(basis.iter()).map(|(c, b)| c * b).sum();
        1.0 + self.amplitude * g / self.norm
    }

    /// The endorectal coil's profile (1 without the coil): body + gain·(r0/r)^n around the coil axis.
    pub fn coil_gain(&self, p: V3) -> f64 {
        match &self.coil {
            None => 1.0,
            Some(c) => {
                let dx = p[0] - c.axis[0];
                let dy = p[1] - c.axis[1];
                let dz = ((p[2] - c.axis[2]).abs() - c.half_len).max(0.0);
                let r = (dx * dx + dy * dy + dz * dz).sqrt().max(3.0);
                c.body + c.gain * (c.r0 / r).powf(c.exponent)
            }
        }
    }

    pub fn at(&self, p: V3) -> f64 {
        self.bias(p) * self.coil_gain(p)
    }
}

/// A faint copy of each slice shifted by half the field of view along the phase-encoding direction
/// (the N/2 ghost of periodic motion and phase errors), added to the image.
pub fn add_ghost(image: &mut [f32], dims: [usize; 3], phase_along_rows: bool, amplitude: f64) {
    let [nz, ny, nx] = dims;
    let a = amplitude as f32;
    let plane = ny * nx;
    for z in 0..nz {
        let slice = &mut image[z * plane..(z + 1) * plane];
        let copy = slice.to_vec();
        for y in 0..ny {
            for x in 0..nx {
                let (sy, sx) = if phase_along_rows { (y, (x + nx / 2) % nx) } else { ((y + ny / 2) % ny, x) };
                slice[y * nx + x] += a * copy[sy * nx + sx];
            }
        }
    }
}

/// The endorectal receive coil: a loop along the rectum whose sensitivity falls off as 1/r^n
/// (n between 1 and 2) on top of the external (body/pelvic) array's share `body`.
#[derive(Debug, Clone)]
struct Coil {
    axis: V3,
    half_len: f64,
    body: f64,
    gain: f64,
    exponent: f64,
    r0: f64,
}

/// One standard normal variate (Box–Muller; the rand crate alone has no normal distribution).
fn normal(rng: &mut ChaCha20Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Complex Gaussian noise of standard deviation `sigma` per channel, magnitude taken (Rician).
/// `correlation` > 1 box-filters the noise in-plane (scanner interpolation) keeping its variance.
pub fn add_rician_noise(image: &mut [f32], dims: [usize; 3], sigma: f64, correlation: usize, seed: [u8; 32]) {
    let [nz, ny, nx] = dims;
    let mut rng = ChaCha20Rng::from_seed(seed);
    let n = nz * ny * nx;
    let mut re: Vec<f32> = (0..n).map(|_| normal(&mut rng) as f32).collect();
    let mut im: Vec<f32> = (0..n).map(|_| normal(&mut rng) as f32).collect();
    if correlation > 1 {
        re = box_filter(&re, dims, correlation);
        im = box_filter(&im, dims, correlation);
    }
    let s = sigma as f32;
    for i in 0..n {
        let a = image[i] + s * re[i];
        let b = s * im[i];
        image[i] = (a * a + b * b).sqrt();
    }
}

/// k×k in-plane moving sum divided by k (so unit-variance white noise stays unit-variance).
fn box_filter(v: &[f32], dims: [usize; 3], k: usize) -> Vec<f32> {
    let [nz, ny, nx] = dims;
    let mut out = vec![0f32; v.len()];
    let scale = 1.0 / k as f32;
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let mut s = 0.0;
                for dy in 0..k {
                    for dx in 0..k {
                        let yy = (y + dy).min(ny - 1);
                        let xx = (x + dx).min(nx - 1);
                        s += v[(z * ny + yy) * nx + xx];
                    }
                }
                out[(z * ny + y) * nx + x] = s * scale;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phantom::sites::{draw_protocol, Site, Size};

    #[test]
    fn ghost_appears_half_a_field_away_along_the_phase_direction() {
        let dims = [1, 4, 6];
        let mut img = vec![0f32; 24];
        img[6 + 1] = 100.0;
        let mut cols = img.clone();
        add_ghost(&mut img, dims, true, 0.02);
        assert_eq!(img[6 + 1 + 3], 2.0);
        assert_eq!(img[6 + 1], 100.0);
        add_ghost(&mut cols, dims, false, 0.02);
        assert_eq!(cols[3 * 6 + 1], 2.0);
        assert_eq!(cols.iter().filter(|&&v| v > 0.0).count(), 2);
    }

    #[test]
    fn rasterisation_does_not_depend_on_the_thread_count() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let anatomy = Anatomy::draw(&mut rng, true);
        let mut protocol = draw_protocol(Site::F, Size::Small, 60.0, &mut rng);
        protocol.matrix = 40;
        protocol.pixel_spacing = 5.0;
        let geom = place(&protocol, &mut rng);
        let one = rasterise_with_threads(&anatomy, &geom, &protocol, 1);
        let three = rasterise_with_threads(&anatomy, &geom, &protocol, 3);
        assert_eq!(one, three);
        assert!(one.1.contains(&1) && one.1.contains(&2));
    }
}

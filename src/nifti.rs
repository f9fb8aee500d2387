//! NIfTI-1 in/out with correct affines (RAS on disk ↔ LPS in `Volume`) and the nnU-Net v1 folder layout.
//! Owns file-format conversion only: no resampling, no reordering of voxels; reads never modify files, writes touch only the given path.

// 3×3/4×4 affine arithmetic reads best with explicit row/column indices.
#![allow(clippy::needless_range_loop)]

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::volume::{Mask, Volume};

/// Errors of the NIfTI layer; messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum NiftiError {
    #[error("cannot access {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a readable NIfTI-1 file ({reason})")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: unsupported NIfTI content ({reason})")]
    Unsupported { path: PathBuf, reason: String },
    #[error("mask grid {mask:?} does not match the volume grid {volume:?}")]
    GridMismatch { mask: [usize; 3], volume: [usize; 3] },
    #[error("cannot write this volume as NIfTI: {0}")]
    InvalidVolume(String),
    #[error("{dir}: not an nnU-Net task folder ({reason})")]
    Layout { dir: PathBuf, reason: String },
}

/// Reads a .nii or .nii.gz scalar image (3-D, or 4-D with one time point) into a `Volume` in LPS.
///
/// The affine is taken from the sform when `sform_code > 0`, else from the qform when
/// `qform_code > 0`, else from pixdim alone (NIfTI "method 1"). Voxel order is kept exactly as in
/// the file (x fastest), so `direction[2]` may point against `direction[0] × direction[1]` for a
/// left-handed grid. Scaling (`scl_slope`/`scl_inter`) is applied.
pub fn read_nifti(path: &Path) -> Result<Volume, NiftiError> {
    if !path.is_file() {
        return Err(NiftiError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    use nifti::{IntoNdArray, NiftiObject};
    let fmt = |reason: String| NiftiError::Format { path: path.to_path_buf(), reason };
    // The header's sizes are checked before the parser allocates the data it declares.
    precheck_header(path)?;
    // The nifti crate may panic on malformed headers: never let that cross into callers (FFI).
    let obj = std::panic::catch_unwind(|| nifti::ReaderOptions::new().read_file(path))
        .map_err(|_| fmt("the NIfTI parser panicked".into()))?
        .map_err(|e| fmt(e.to_string()))?;
    let h = obj.header().clone();
    let ndim = h.dim[0] as usize;
    if !(1..=7).contains(&ndim) {
        return Err(fmt(format!("dim[0] = {ndim}")));
    }
    let d = |i: usize| if i <= ndim { h.dim[i] as usize } else { 1 };
    let (nx, ny, nz) = (d(1), d(2), d(3));
    let extra: usize = (4..=ndim).map(d).product();
    if extra != 1 {
        return Err(NiftiError::Unsupported {
            path: path.to_path_buf(),
            reason: format!("{extra} volumes along dims 4+ (a single 3-D image is expected)"),
        });
    }
    if nx * ny * nz == 0 {
        return Err(fmt("an image dimension is 0".into()));
    }
    let arr = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| obj.into_volume().into_ndarray::<f32>()))
        .map_err(|_| fmt("the NIfTI data decoder panicked".into()))?
        .map_err(|e| NiftiError::Unsupported { path: path.to_path_buf(), reason: e.to_string() })?;
    // The array is indexed [x, y, z, ...]; reversed axes iterate x fastest, which is Volume's order.
    let voxels: Vec<f32> = arr.t().iter().copied().collect();
    if voxels.len() != nx * ny * nz {
        return Err(fmt(format!("{} values for a {nx}x{ny}x{nz} grid", voxels.len())));
    }
    // A degenerate sform (all zeros is common in hand-made headers) falls back to the qform.
    let (spacing, direction, origin) = match lps_geometry(&header_affine(&h, true)) {
        Ok(g) => g,
        Err(_) if h.sform_code > 0 => lps_geometry(&header_affine(&h, false)).map_err(fmt)?,
        Err(e) => return Err(fmt(e)),
    };
    let mut v = Volume::new(voxels, [nz, ny, nx], spacing, origin);
    v.direction = direction;
    Ok(v)
}

/// Reads the 348-byte header (through gzip for .gz) and refuses, before any data is read, a file
/// whose declared grid exceeds the limits (docs/limits.md) or whose data would not fit in
/// `max_file_bytes`; sizes are computed with checked arithmetic.
fn precheck_header(path: &Path) -> Result<(), NiftiError> {
    use std::io::Read;
    let io = |source: std::io::Error| NiftiError::Io { path: path.to_path_buf(), source };
    let fmt = |reason: String| NiftiError::Format { path: path.to_path_buf(), reason };
    let refuse = |reason: String| NiftiError::Unsupported { path: path.to_path_buf(), reason };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut raw = std::io::BufReader::new(file);
    let mut magic = [0u8; 2];
    let gz = {
        use std::io::BufRead;
        let head = raw.fill_buf().map_err(io)?;
        if head.len() >= 2 {
            magic.copy_from_slice(&head[..2]);
        }
        magic == [0x1f, 0x8b]
    };
    let mut reader: Box<dyn Read> = if gz { Box::new(flate2::read::MultiGzDecoder::new(raw)) } else { Box::new(raw) };
    let mut h = [0u8; 348];
    reader.read_exact(&mut h).map_err(|e| fmt(format!("header cut short: {e}")))?;
    let le = i32::from_le_bytes([h[0], h[1], h[2], h[3]]) == 348;
    let be = i32::from_be_bytes([h[0], h[1], h[2], h[3]]) == 348;
    if !le && !be {
        return Err(fmt("sizeof_hdr is not 348 (not NIfTI-1)".into()));
    }
    let i16_at =
        |at: usize| if le { i16::from_le_bytes([h[at], h[at + 1]]) } else { i16::from_be_bytes([h[at], h[at + 1]]) };
    let ndim = i16_at(40);
    if !(1..=7).contains(&ndim) {
        return Err(fmt(format!("dim[0] = {ndim}")));
    }
    let mut dims = Vec::new();
    for i in 1..=ndim as usize {
        let d = i16_at(40 + 2 * i);
        if d < 0 {
            return Err(fmt(format!("dim[{i}] = {d} is negative")));
        }
        dims.push(d as u64);
    }
    let bitpix = i16_at(72).max(8) as u64;
    let limits = crate::limits::get();
    let slice = dims[0].saturating_mul(*dims.get(1).unwrap_or(&1));
    if slice > limits.max_slice_pixels {
        return Err(refuse(format!(
            "{slice} pixels per slice exceed the limit of {} (max_slice_pixels, docs/limits.md)",
            limits.max_slice_pixels
        )));
    }
    let voxels = crate::limits::product(&dims).filter(|&n| n <= limits.max_volume_voxels);
    let Some(voxels) = voxels else {
        return Err(refuse(format!(
            "the grid {dims:?} exceeds the limit of {} voxels (max_volume_voxels, docs/limits.md)",
            limits.max_volume_voxels
        )));
    };
    let bytes = voxels.saturating_mul(bitpix) / 8;
    if bytes > limits.max_file_bytes {
        return Err(refuse(format!(
            "{bytes} bytes of image data exceed the limit of {} (max_file_bytes, docs/limits.md)",
            limits.max_file_bytes
        )));
    }
    Ok(())
}

/// Reads a label image (e.g. nnU-Net `labelsTr/*.nii.gz`) as a mask: values rounded to the nearest
/// integer label (negative → 0, above 255 → 255). Returns the mask and its grid (voxels empty).
pub fn read_nifti_mask(path: &Path) -> Result<(Mask, Volume), NiftiError> {
    let v = read_nifti(path)?;
    let data = v.voxels.iter().map(|&x| x.round().clamp(0.0, 255.0) as u8).collect();
    Ok((Mask { data, dims: v.dims }, v.clone_geometry()))
}

/// Writes `vol` as float32 NIfTI-1 (`.nii`, or gzip-compressed when the name ends in `.gz`) with
/// identical sform and qform (code 1, scanner) in RAS.
pub fn write_nifti(path: &Path, vol: &Volume) -> Result<(), NiftiError> {
    if vol.voxels.len() != vol.dims.iter().product::<usize>() {
        return Err(NiftiError::InvalidVolume("voxel count does not match dims".into()));
    }
    let mut data = Vec::with_capacity(vol.voxels.len() * 4);
    for v in &vol.voxels {
        data.extend_from_slice(&v.to_le_bytes());
    }
    write_file(path, vol, DT_FLOAT32, 32, &data)
}

/// Writes a mask on the grid of `grid` as uint8 NIfTI-1 with the grid's affine.
pub fn write_nifti_mask(path: &Path, mask: &Mask, grid: &Volume) -> Result<(), NiftiError> {
    if mask.dims != grid.dims {
        return Err(NiftiError::GridMismatch { mask: mask.dims, volume: grid.dims });
    }
    if mask.data.len() != mask.dims.iter().product::<usize>() {
        return Err(NiftiError::InvalidVolume("mask data length does not match dims".into()));
    }
    write_file(path, grid, DT_UINT8, 8, &mask.data)
}

/// One training case of an nnU-Net v1 task folder.
#[derive(Debug, Clone, PartialEq)]
pub struct NnunetCase {
    /// Case identifier (file name without `_0000.nii.gz`).
    pub id: String,
    /// `imagesTr/<id>_0000.nii(.gz)` (the first — for DeSAM the only — modality).
    pub image: PathBuf,
    /// `labelsTr/<id>.nii(.gz)` when present.
    pub label: Option<PathBuf>,
}

/// Lists the cases of an nnU-Net v1 task folder (`imagesTr/*_0000.nii.gz`, `labelsTr/*.nii.gz`), sorted
/// by id. Only channel 0000 is used; other channels are ignored.
pub fn list_nnunet_cases(dir: &Path) -> Result<Vec<NnunetCase>, NiftiError> {
    let images = dir.join("imagesTr");
    let labels = dir.join("labelsTr");
    if !images.is_dir() {
        return Err(NiftiError::Layout { dir: dir.to_path_buf(), reason: "no imagesTr folder".into() });
    }
    let rd = std::fs::read_dir(&images).map_err(|e| NiftiError::Io { path: images.clone(), source: e })?;
    let mut cases = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| NiftiError::Io { path: images.clone(), source: e })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue; // macOS "._" resource forks and hidden files
        }
        let id = match name.strip_suffix("_0000.nii.gz").or_else(|| name.strip_suffix("_0000.nii")) {
            Some(id) => id.to_string(),
            None => continue,
        };
        let label = ["nii.gz", "nii"].iter().map(|ext| labels.join(format!("{id}.{ext}"))).find(|p| p.is_file());
        cases.push(NnunetCase { id, image: entry.path(), label });
    }
    if cases.is_empty() {
        return Err(NiftiError::Layout { dir: dir.to_path_buf(), reason: "no imagesTr/*_0000.nii(.gz) files".into() });
    }
    cases.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(cases)
}

const DT_UINT8: i16 = 2;
const DT_FLOAT32: i16 = 16;
const HEADER_LEN: usize = 348;
const VOX_OFFSET: usize = 352;

/// The 3×4 voxel-to-RAS affine the header describes (ignoring the sform when `use_sform` is false).
fn header_affine(h: &nifti::NiftiHeader, use_sform: bool) -> [[f64; 4]; 3] {
    if use_sform && h.sform_code > 0 {
        let r = |s: [f32; 4]| [s[0] as f64, s[1] as f64, s[2] as f64, s[3] as f64];
        return [r(h.srow_x), r(h.srow_y), r(h.srow_z)];
    }
    let px = |i: usize| {
        let p = h.pixdim[i] as f64;
        if p > 0.0 && p.is_finite() {
            p
        } else {
            1.0
        }
    };
    let (dx, dy, dz) = (px(1), px(2), px(3));
    if h.qform_code > 0 {
        let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
        let rot = quatern_to_rotation(b, c, d);
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let scale = [dx, dy, dz * qfac];
        let off = [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64];
        let mut a = [[0.0; 4]; 3];
        for r in 0..3 {
            for c in 0..3 {
                a[r][c] = rot[r][c] * scale[c];
            }
            a[r][3] = off[r];
        }
        return a;
    }
    [[dx, 0.0, 0.0, 0.0], [0.0, dy, 0.0, 0.0], [0.0, 0.0, dz, 0.0]]
}

/// Splits a RAS affine into LPS spacing, unit direction columns and origin.
#[allow(clippy::type_complexity)]
fn lps_geometry(ras: &[[f64; 4]; 3]) -> Result<([f64; 3], [[f64; 3]; 3], [f64; 3]), String> {
    let flip = [-1.0, -1.0, 1.0];
    let mut spacing = [0.0; 3];
    let mut direction = [[0.0; 3]; 3];
    for c in 0..3 {
        let col = [flip[0] * ras[0][c], flip[1] * ras[1][c], flip[2] * ras[2][c]];
        let n = (col[0] * col[0] + col[1] * col[1] + col[2] * col[2]).sqrt();
        if !(n.is_finite() && n > 0.0) {
            return Err(format!("affine column {c} is zero or not finite"));
        }
        spacing[c] = n;
        direction[c] = [col[0] / n, col[1] / n, col[2] / n];
    }
    let origin = [flip[0] * ras[0][3], flip[1] * ras[1][3], flip[2] * ras[2][3]];
    if origin.iter().any(|v| !v.is_finite()) {
        return Err("affine offset is not finite".into());
    }
    Ok((spacing, direction, origin))
}

/// The voxel-to-RAS affine of a volume (LPS affine with x and y negated).
pub fn ras_affine(vol: &Volume) -> [[f64; 4]; 4] {
    let mut m = vol.affine_lps();
    for c in 0..4 {
        m[0][c] = -m[0][c];
        m[1][c] = -m[1][c];
    }
    m
}

fn quatern_to_rotation(b: f64, c: f64, d: f64) -> [[f64; 3]; 3] {
    let mut a = 1.0 - (b * b + c * c + d * d);
    let (mut b, mut c, mut d) = (b, c, d);
    if a < 1e-7 {
        // Tiny negative round-off: renormalise (b, c, d) and take a 180° rotation.
        let s = 1.0 / (b * b + c * c + d * d).sqrt();
        b *= s;
        c *= s;
        d *= s;
        a = 0.0;
    } else {
        a = a.sqrt();
    }
    [
        [a * a + b * b - c * c - d * d, 2.0 * (b * c - a * d), 2.0 * (b * d + a * c)],
        [2.0 * (b * c + a * d), a * a + c * c - b * b - d * d, 2.0 * (c * d - a * b)],
        [2.0 * (b * d - a * c), 2.0 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ]
}

/// Quaternion (b, c, d) and qfac of the rotation part of unit direction columns `r` (r[row][col]).
fn rotation_to_quatern(mut r: [[f64; 3]; 3]) -> (f64, f64, f64, f64) {
    let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1]) - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
    let qfac = if det < 0.0 { -1.0 } else { 1.0 };
    if det < 0.0 {
        for row in r.iter_mut() {
            row[2] = -row[2];
        }
    }
    let (r11, r12, r13) = (r[0][0], r[0][1], r[0][2]);
    let (r21, r22, r23) = (r[1][0], r[1][1], r[1][2]);
    let (r31, r32, r33) = (r[2][0], r[2][1], r[2][2]);
    let (mut a, mut b, mut c, mut d);
    let trace = r11 + r22 + r33 + 1.0;
    if trace > 0.5 {
        a = 0.5 * trace.sqrt();
        b = 0.25 * (r32 - r23) / a;
        c = 0.25 * (r13 - r31) / a;
        d = 0.25 * (r21 - r12) / a;
    } else {
        let xd = 1.0 + r11 - (r22 + r33);
        let yd = 1.0 + r22 - (r11 + r33);
        let zd = 1.0 + r33 - (r11 + r22);
        if xd > 1.0 {
            b = 0.5 * xd.sqrt();
            c = 0.25 * (r12 + r21) / b;
            d = 0.25 * (r13 + r31) / b;
            a = 0.25 * (r32 - r23) / b;
        } else if yd > 1.0 {
            c = 0.5 * yd.sqrt();
            b = 0.25 * (r12 + r21) / c;
            d = 0.25 * (r23 + r32) / c;
            a = 0.25 * (r13 - r31) / c;
        } else {
            d = 0.5 * zd.sqrt();
            b = 0.25 * (r13 + r31) / d;
            c = 0.25 * (r23 + r32) / d;
            a = 0.25 * (r21 - r12) / d;
        }
        if a < 0.0 {
            b = -b;
            c = -c;
            d = -d;
            a = -a;
        }
    }
    let _ = a;
    (b, c, d, qfac)
}

fn write_file(path: &Path, grid: &Volume, datatype: i16, bitpix: i16, data: &[u8]) -> Result<(), NiftiError> {
    let [nz, ny, nx] = grid.dims;
    if [nx, ny, nz].iter().any(|&n| n == 0 || n > i16::MAX as usize) {
        return Err(NiftiError::InvalidVolume(format!("dimensions {:?} do not fit NIfTI-1", grid.dims)));
    }
    if grid.spacing.iter().chain(grid.origin.iter()).any(|v| !v.is_finite()) || grid.spacing.iter().any(|&s| s <= 0.0) {
        return Err(NiftiError::InvalidVolume(format!("spacing {:?} / origin {:?}", grid.spacing, grid.origin)));
    }
    let ras = ras_affine(grid);
    let mut h = vec![0u8; VOX_OFFSET];
    let put_i16 = |h: &mut Vec<u8>, at: usize, v: i16| h[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put_f32 = |h: &mut Vec<u8>, at: usize, v: f32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    h[0..4].copy_from_slice(&(HEADER_LEN as i32).to_le_bytes());
    h[38] = b'r';
    for (i, v) in [3, nx, ny, nz, 1, 1, 1, 1].iter().enumerate() {
        put_i16(&mut h, 40 + 2 * i, *v as i16);
    }
    put_i16(&mut h, 70, datatype);
    put_i16(&mut h, 72, bitpix);
    // Rotation of the RAS direction columns (unit) for the qform.
    let mut rot = [[0.0; 3]; 3];
    for r in 0..3 {
        for c in 0..3 {
            rot[r][c] = ras[r][c] / grid.spacing[c];
        }
    }
    let (qb, qc, qd, qfac) = rotation_to_quatern(rot);
    let pixdim = [qfac, grid.spacing[0], grid.spacing[1], grid.spacing[2], 1.0, 1.0, 1.0, 1.0];
    for (i, v) in pixdim.iter().enumerate() {
        put_f32(&mut h, 76 + 4 * i, *v as f32);
    }
    put_f32(&mut h, 108, VOX_OFFSET as f32);
    put_f32(&mut h, 112, 1.0); // scl_slope
    put_f32(&mut h, 116, 0.0);
    h[123] = 2; // xyzt_units: mm
    let descrip = b"desam";
    h[148..148 + descrip.len()].copy_from_slice(descrip);
    put_i16(&mut h, 252, 1); // qform_code: scanner anatomical
    put_i16(&mut h, 254, 1); // sform_code
    put_f32(&mut h, 256, qb as f32);
    put_f32(&mut h, 260, qc as f32);
    put_f32(&mut h, 264, qd as f32);
    for r in 0..3 {
        put_f32(&mut h, 268 + 4 * r, ras[r][3] as f32);
        for c in 0..4 {
            put_f32(&mut h, 280 + 16 * r + 4 * c, ras[r][c] as f32);
        }
    }
    h[344..348].copy_from_slice(b"n+1\0");
    // h[348..352] = 0: no extensions.
    h.extend_from_slice(data);

    let io = |e| NiftiError::Io { path: path.to_path_buf(), source: e };
    let gz = path.extension().map(|e| e.eq_ignore_ascii_case("gz")).unwrap_or(false);
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::new(file);
    if gz {
        let mut enc = flate2::write::GzEncoder::new(w, flate2::Compression::new(6));
        enc.write_all(&h).map_err(io)?;
        w = enc.finish().map_err(io)?;
    } else {
        w.write_all(&h).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("desam-nifti-unit-{name}"));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn quaternion_round_trip_for_proper_and_improper_rotations() {
        let (a, b) = (0.4f64, -1.1f64);
        let r1 = [[a.cos(), -a.sin(), 0.0], [a.sin(), a.cos(), 0.0], [0.0, 0.0, 1.0]];
        let r2 = [[1.0, 0.0, 0.0], [0.0, b.cos(), -b.sin()], [0.0, b.sin(), b.cos()]];
        let mut rot = [[0.0; 3]; 3];
        for i in 0..3 {
            for j in 0..3 {
                rot[i][j] = (0..3).map(|k| r1[i][k] * r2[k][j]).sum();
            }
        }
        for improper in [false, true] {
            let mut r = rot;
            if improper {
                for row in r.iter_mut() {
                    row[2] = -row[2];
                }
            }
            let (qb, qc, qd, qfac) = rotation_to_quatern(r);
            assert_eq!(qfac < 0.0, improper);
            let back = quatern_to_rotation(qb, qc, qd);
            for i in 0..3 {
                for j in 0..3 {
                    let want = r[i][j] * if j == 2 { qfac } else { 1.0 };
                    assert!((back[i][j] - want).abs() < 1e-9, "{i}{j}: {} vs {want}", back[i][j]);
                }
            }
        }
        // 180° rotations take the non-trace branch.
        let flip = [[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]];
        let (qb, qc, qd, _) = rotation_to_quatern(flip);
        let back = quatern_to_rotation(qb, qc, qd);
        for i in 0..3 {
            for j in 0..3 {
                assert!((back[i][j] - flip[i][j]).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn write_then_read_keeps_voxels_and_geometry() {
        let dir = scratch("rt");
        let vals: Vec<f32> = (0..2 * 3 * 4).map(|i| i as f32 * 1.5 - 3.0).collect();
        let mut v = Volume::new(vals, [2, 3, 4], [0.5, 0.75, 3.0], [12.0, -7.0, 30.0]);
        let t = 0.3f64;
        v.direction = [[t.cos(), t.sin(), 0.0], [0.0, 0.0, -1.0], [-t.sin(), t.cos(), 0.0]];
        for name in ["a.nii", "a.nii.gz"] {
            let p = dir.join(name);
            write_nifti(&p, &v).unwrap();
            let back = read_nifti(&p).unwrap();
            assert_eq!(back.dims, v.dims);
            assert_eq!(back.voxels, v.voxels);
            for i in 0..3 {
                assert!((back.spacing[i] - v.spacing[i]).abs() < 1e-5);
                assert!((back.origin[i] - v.origin[i]).abs() < 1e-4);
                for j in 0..3 {
                    assert!((back.direction[i][j] - v.direction[i][j]).abs() < 1e-5);
                }
            }
        }
        let mut m = Mask::zeros(v.dims);
        m.data[5] = 1;
        m.data[17] = 2;
        write_nifti_mask(&dir.join("m.nii.gz"), &m, &v).unwrap();
        let (mb, grid) = read_nifti_mask(&dir.join("m.nii.gz")).unwrap();
        assert_eq!(mb, m);
        assert_eq!(grid.dims, v.dims);
        assert!(matches!(
            write_nifti_mask(&dir.join("bad.nii"), &Mask::zeros([1, 1, 1]), &v),
            Err(NiftiError::GridMismatch { .. })
        ));
        assert!(matches!(read_nifti(&dir.join("missing.nii")), Err(NiftiError::Io { .. })));
        std::fs::write(dir.join("junk.nii"), b"not a nifti file at all").unwrap();
        assert!(matches!(read_nifti(&dir.join("junk.nii")), Err(NiftiError::Format { .. })));
    }
}

//! The shared language of the crate: a scalar image volume with exact patient geometry and the
//! references a derived object (DICOM-SEG) needs. Owns no I/O; readers and writers live elsewhere.

use serde::{Deserialize, Serialize};

/// A 3-D scalar volume in DICOM patient coordinates (LPS, millimetres).
///
/// Voxels are stored z-major: index `(z * ny + y) * nx + x`, where x runs along a row (increasing
/// column index), y down the columns (increasing row index) and z across slices.
/// World position of voxel (x, y, z):
/// `origin + x*spacing[0]*direction[0] + y*spacing[1]*direction[1] + z*spacing[2]*direction[2]`.
/// `direction[0]` and `direction[1]` are the DICOM ImageOrientationPatient row and column cosines;
/// `direction[2]` is their cross product (slices are always ordered along the slice normal).
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    pub voxels: Vec<f32>,
    /// [nz, ny, nx]
    pub dims: [usize; 3],
    /// [column spacing (x), row spacing (y), slice spacing (z)] in mm.
    pub spacing: [f64; 3],
    /// LPS position of the centre of voxel (0, 0, 0).
    pub origin: [f64; 3],
    /// Unit vectors [x axis, y axis, z axis] in LPS.
    pub direction: [[f64; 3]; 3],
    /// One entry per slice (same order as z) when the volume came from DICOM; empty otherwise.
    pub slices: Vec<SliceRef>,
    pub frame_of_reference_uid: Option<String>,
    /// Patient/study/series/equipment attributes a derived object must carry; None for NIfTI input.
    pub source: Option<SourceInfo>,
}

/// Where one slice of a volume came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SliceRef {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    /// 1-based frame number inside a multi-frame source instance (Enhanced MR); None for single-frame.
    pub frame_number: Option<u32>,
    /// ImagePositionPatient of this slice as read from the source.
    pub position: [f64; 3],
}

/// Attributes copied from the source series into a derived object. Strings are stored as read
/// (already trimmed of DICOM padding); absent attributes are None.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    // Patient
    pub patient_name: Option<String>,
    pub patient_id: Option<String>,
    pub patient_birth_date: Option<String>,
    pub patient_sex: Option<String>,
    pub patient_age: Option<String>,
    // Study
    pub study_instance_uid: String,
    pub study_date: Option<String>,
    pub study_time: Option<String>,
    pub study_id: Option<String>,
    pub accession_number: Option<String>,
    pub referring_physician_name: Option<String>,
    pub study_description: Option<String>,
    // Series
    pub series_instance_uid: String,
    pub series_number: Option<i32>,
    pub series_description: Option<String>,
    pub protocol_name: Option<String>,
    pub modality: String,
    // Equipment and acquisition (useful for QA and site detection)
    pub manufacturer: Option<String>,
    pub manufacturer_model_name: Option<String>,
    pub institution_name: Option<String>,
    pub magnetic_field_strength: Option<f64>,
    pub body_part_examined: Option<String>,
    pub slice_thickness: Option<f64>,
}

impl Volume {
    /// A volume with identity direction, no source references.
    pub fn new(voxels: Vec<f32>, dims: [usize; 3], spacing: [f64; 3], origin: [f64; 3]) -> Self {
        assert_eq!(voxels.len(), dims[0] * dims[1] * dims[2], "voxel count does not match dims");
        Volume {
            voxels,
            dims,
            spacing,
            origin,
            direction: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            slices: Vec::new(),
            frame_of_reference_uid: None,
            source: None,
        }
    }

    pub fn nz(&self) -> usize {
        self.dims[0]
    }
    pub fn ny(&self) -> usize {
        self.dims[1]
    }
    pub fn nx(&self) -> usize {
        self.dims[2]
    }
    pub fn slice_len(&self) -> usize {
        self.dims[1] * self.dims[2]
    }

    /// The voxels of slice z, row-major [y][x].
    pub fn slice(&self, z: usize) -> &[f32] {
        let n = self.slice_len();
        &self.voxels[z * n..(z + 1) * n]
    }

    /// LPS position of the centre of voxel (x, y, z) (fractional indices allowed).
    pub fn index_to_world(&self, x: f64, y: f64, z: f64) -> [f64; 3] {
        let mut p = self.origin;
        for a in 0..3 {
            p[a] += x * self.spacing[0] * self.direction[0][a]
                + y * self.spacing[1] * self.direction[1][a]
                + z * self.spacing[2] * self.direction[2][a];
        }
        p
    }

    /// The 4×4 index-to-LPS affine (row-major).
    pub fn affine_lps(&self) -> [[f64; 4]; 4] {
        let mut m = [[0.0; 4]; 4];
        for r in 0..3 {
            for c in 0..3 {
                m[r][c] = self.direction[c][r] * self.spacing[c];
            }
            m[r][3] = self.origin[r];
        }
        m[3][3] = 1.0;
        m
    }

    /// Volume of one voxel in mL.
    pub fn voxel_ml(&self) -> f64 {
        self.spacing[0] * self.spacing[1] * self.spacing[2] / 1000.0
    }

    /// A volume on the same grid and with the same references, filled with `voxels`.
    pub fn with_voxels(&self, voxels: Vec<f32>) -> Self {
        assert_eq!(voxels.len(), self.voxels.len(), "voxel count does not match the grid");
        Volume { voxels, ..self.clone_geometry() }
    }

    /// Geometry and references only (empty voxel buffer).
    pub fn clone_geometry(&self) -> Self {
        Volume {
            voxels: Vec::new(),
            dims: self.dims,
            spacing: self.spacing,
            origin: self.origin,
            direction: self.direction,
            slices: self.slices.clone(),
            frame_of_reference_uid: self.frame_of_reference_uid.clone(),
            source: self.source.clone(),
        }
    }
}

/// A binary (or label) mask on the grid of a [`Volume`], z-major like `Volume::voxels`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    pub data: Vec<u8>,
    /// [nz, ny, nx]
    pub dims: [usize; 3],
}

impl Mask {
    pub fn zeros(dims: [usize; 3]) -> Self {
        Mask { data: vec![0; dims[0] * dims[1] * dims[2]], dims }
    }
    pub fn count(&self) -> usize {
        self.data.iter().filter(|&&v| v != 0).count()
    }
    pub fn slice(&self, z: usize) -> &[u8] {
        let n = self.dims[1] * self.dims[2];
        &self.data[z * n..(z + 1) * n]
    }
}

/// Dot product of two 3-vectors (patient coordinates).
pub fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Cross product of two 3-vectors (a slice normal from its row and column directions).
pub fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affine_matches_index_to_world() {
        let mut v = Volume::new(vec![0.0; 2 * 3 * 4], [2, 3, 4], [0.5, 0.7, 3.0], [10.0, -5.0, 2.0]);
        let c = (30f64).to_radians();
        v.direction = [[c.cos(), c.sin(), 0.0], [-c.sin(), c.cos(), 0.0], [0.0, 0.0, 1.0]];
        let m = v.affine_lps();
        let p = v.index_to_world(3.0, 2.0, 1.0);
        for r in 0..3 {
            let q = m[r][0] * 3.0 + m[r][1] * 2.0 + m[r][2] * 1.0 + m[r][3];
            assert!((p[r] - q).abs() < 1e-12);
        }
        assert!((p[2] - 5.0).abs() < 1e-12);
    }
}

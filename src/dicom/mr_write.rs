//! Writes a `Volume` as a realistic single-frame MR Image Storage series (Explicit VR Little Endian),
//! one file per slice, and reports the SliceRefs it created. Must not modify the input volume or overwrite files.

use std::path::{Path, PathBuf};

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

use super::attrs::put_patient_study;
use super::ds::format_ds;
use super::error::DicomError;
use super::uid::{new_uid, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};
use crate::volume::{cross, dot, SliceRef, SourceInfo, Volume};

/// How pixel values are stored in the written files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredPixels {
    /// BitsAllocated 16, PixelRepresentation 0.
    Uint16,
    /// BitsAllocated 16, PixelRepresentation 1.
    Int16,
}

/// Patient, study, series, equipment and acquisition attributes of a written MR series.
/// UIDs left as None are generated (`2.25.<random 128-bit>`).
#[derive(Debug, Clone)]
pub struct MrSeriesAttributes {
    pub patient_name: String,
    pub patient_id: String,
    pub patient_birth_date: String,
    pub patient_sex: String,
    pub patient_age: Option<String>,
    pub study_instance_uid: Option<String>,
    pub study_date: String,
    pub study_time: String,
    pub study_id: String,
    pub accession_number: String,
    pub referring_physician_name: String,
    pub study_description: Option<String>,
    pub series_instance_uid: Option<String>,
    pub series_number: i32,
    pub series_description: String,
    pub protocol_name: String,
    pub frame_of_reference_uid: Option<String>,
    pub body_part_examined: String,
    pub patient_position: String,
    pub manufacturer: String,
    pub manufacturer_model_name: String,
    pub device_serial_number: Option<String>,
    pub software_versions: Option<String>,
    pub institution_name: Option<String>,
    pub station_name: Option<String>,
    pub magnetic_field_strength: f64,
    /// (0018,0020) e.g. "SE", "GR", "EP", "IR" (backslash-separated for several).
    pub scanning_sequence: String,
    /// (0018,0021) e.g. "SK\SP", "NONE".
    pub sequence_variant: String,
    /// (0018,0022), may be empty.
    pub scan_options: String,
    /// (0018,0023) "2D" or "3D".
    pub mr_acquisition_type: String,
    pub sequence_name: Option<String>,
    /// ms
    pub repetition_time: f64,
    /// ms
    pub echo_time: f64,
    pub echo_train_length: i32,
    pub flip_angle: Option<f64>,
    /// MHz
    pub imaging_frequency: Option<f64>,
    pub imaged_nucleus: String,
    pub receive_coil_name: Option<String>,
    /// Defaults to the volume's slice spacing when None.
    pub slice_thickness: Option<f64>,
    pub stored_pixels: StoredPixels,
    /// (RescaleSlope, RescaleIntercept): stored = round((value - intercept) / slope). None = identity
    /// (values are rounded to integers and must fit the stored type).
    pub rescale: Option<(f64, f64)>,
}

impl Default for MrSeriesAttributes {
    fn default() -> Self {
        MrSeriesAttributes {
            patient_name: "Phantom^Prostate".into(),
            patient_id: "DESAM-PHANTOM".into(),
            patient_birth_date: "19600101".into(),
            patient_sex: "M".into(),
            patient_age: Some("065Y".into()),
            study_instance_uid: None,
            study_date: "20260101".into(),
            study_time: "120000".into(),
            study_id: "1".into(),
            accession_number: String::new(),
            referring_physician_name: String::new(),
            study_description: Some("MR prostate".into()),
            series_instance_uid: None,
            series_number: 1,
            series_description: "t2_tse_tra".into(),
            protocol_name: "t2_tse_tra".into(),
            frame_of_reference_uid: None,
            body_part_examined: "PROSTATE".into(),
            patient_position: "HFS".into(),
            manufacturer: "DeSAM Phantom".into(),
            manufacturer_model_name: "Synthetic".into(),
            device_serial_number: None,
            software_versions: Some(format!("desam {}", env!("CARGO_PKG_VERSION"))),
            institution_name: None,
            station_name: None,
            magnetic_field_strength: 3.0,
            scanning_sequence: "SE".into(),
            sequence_variant: "SK\\SP".into(),
            scan_options: String::new(),
            mr_acquisition_type: "2D".into(),
            sequence_name: Some("*tse2d1_25".into()),
            repetition_time: 4000.0,
            echo_time: 100.0,
            echo_train_length: 25,
            flip_angle: Some(160.0),
            imaging_frequency: Some(123.2),
            imaged_nucleus: "1H".into(),
            receive_coil_name: None,
            slice_thickness: None,
            stored_pixels: StoredPixels::Uint16,
            rescale: None,
        }
    }
}

impl MrSeriesAttributes {
    /// Chooses `rescale` so that the volume's value range fits the stored type with 4096 levels or
    /// more, keeping identity when the values are already integers in range.
    pub fn fit_rescale(&mut self, vol: &Volume) {
        let (lo, hi) = finite_range(&vol.voxels);
        let (smin, smax) = stored_range(self.stored_pixels);
        let integral = vol.voxels.iter().all(|v| v.fract() == 0.0);
        if integral && lo as f64 >= smin && hi as f64 <= smax {
            self.rescale = None;
            return;
        }
        let span = (hi - lo) as f64;
        let slope = if span > 0.0 { span / 4095.0 } else { 1.0 };
        // Stored 0 (or the signed minimum + offset) maps to lo.
        let intercept = match self.stored_pixels {
            StoredPixels::Uint16 => lo as f64,
            StoredPixels::Int16 => lo as f64 + 2048.0 * slope,
        };
        self.rescale = Some((slope, intercept));
    }
}

/// The files of an encoded series (Part-10 bytes with preamble, in slice order) and the volume with
/// its SliceRefs, FrameOfReferenceUID and SourceInfo filled in.
#[derive(Debug, Clone)]
pub struct EncodedMrSeries {
    pub files: Vec<Vec<u8>>,
    pub volume: Volume,
}

/// Paths written (in slice order) and the volume with its new references.
#[derive(Debug, Clone)]
pub struct WrittenMrSeries {
    pub paths: Vec<PathBuf>,
    pub volume: Volume,
}

/// Writes `vol` as one MR Image Storage file per slice into `out_dir` (created if missing), named
/// `MR_0001.dcm`…; refuses to overwrite existing files.
pub fn write_mr_series(vol: &Volume, attrs: &MrSeriesAttributes, out_dir: &Path) -> Result<Vec<PathBuf>, DicomError> {
    Ok(write_mr_series_full(vol, attrs, out_dir)?.paths)
}

/// Like [`write_mr_series`], also returning the volume with the SliceRefs of the written instances.
pub fn write_mr_series_full(
    vol: &Volume,
    attrs: &MrSeriesAttributes,
    out_dir: &Path,
) -> Result<WrittenMrSeries, DicomError> {
    let encoded = encode_mr_series(vol, attrs)?;
    std::fs::create_dir_all(out_dir).map_err(|e| DicomError::io(out_dir, e))?;
    let mut paths = Vec::with_capacity(encoded.files.len());
    for (z, bytes) in encoded.files.iter().enumerate() {
        let path = out_dir.join(format!("MR_{:04}.dcm", z + 1));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| DicomError::io(&path, e))?;
        std::io::Write::write_all(&mut f, bytes).map_err(|e| DicomError::io(&path, e))?;
        paths.push(path);
    }
    Ok(WrittenMrSeries { paths, volume: encoded.volume })
}

/// Encodes `vol` as Part-10 MR Image Storage files in memory (bytes variant of [`write_mr_series`]).
pub fn encode_mr_series(vol: &Volume, attrs: &MrSeriesAttributes) -> Result<EncodedMrSeries, DicomError> {
    check_volume(vol)?;
    let numbers = [attrs.magnetic_field_strength, attrs.repetition_time, attrs.echo_time];
    let optional = [attrs.flip_angle, attrs.imaging_frequency, attrs.slice_thickness];
    if numbers.iter().chain(optional.iter().flatten()).any(|v| !v.is_finite()) {
        return Err(DicomError::InvalidVolume("an acquisition attribute is NaN or infinite".into()));
    }
    let [nz, ny, nx] = vol.dims;
    let (slope, intercept) = attrs.rescale.unwrap_or((1.0, 0.0));
    if !(slope.is_finite() && slope != 0.0 && intercept.is_finite()) {
        return Err(DicomError::InvalidVolume(format!("rescale slope {slope} / intercept {intercept} is not usable")));
    }
    let (smin, smax) = stored_range(attrs.stored_pixels);
    let stored: Vec<i32> = vol
        .voxels
        .iter()
        .map(|&v| ((v as f64 - intercept) / slope).round())
        .map(|s| {
            if s < smin || s > smax {
                Err(DicomError::InvalidVolume(format!(
                    "a value maps to stored {s}, outside [{smin}, {smax}]; set `rescale` (MrSeriesAttributes::fit_rescale)"
                )))
            } else {
                Ok(s as i32)
            }
        })
        .collect::<Result<_, _>>()?;
    let (vmin, vmax) = finite_range(&vol.voxels);

    let study_uid = attrs.study_instance_uid.clone().unwrap_or_else(new_uid);
    let series_uid = attrs.series_instance_uid.clone().unwrap_or_else(new_uid);
    let for_uid = attrs.frame_of_reference_uid.clone().unwrap_or_else(new_uid);
    let thickness = attrs.slice_thickness.unwrap_or(vol.spacing[2]);
    let [row, col, normal] = vol.direction;

    let mut files = Vec::with_capacity(nz);
    let mut slices = Vec::with_capacity(nz);
    for z in 0..nz {
        let sop_uid = new_uid();
        // Report the position exactly as stored (DS text), so references match what readers see.
        let ipp = vol
            .index_to_world(0.0, 0.0, z as f64)
            .map(|v| format_ds(v).ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(v));
        let slice_location = dot(ipp, normal);
        let mut o = InMemDicomObject::new_empty();
        let mut s = |tag: Tag, vr: VR, v: &str| {
            o.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
        };
        // SOP Common
        s(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192");
        s(tags::SOP_CLASS_UID, VR::UI, uids::MR_IMAGE_STORAGE);
        s(tags::SOP_INSTANCE_UID, VR::UI, &sop_uid);
        s(tags::INSTANCE_CREATION_DATE, VR::DA, &attrs.study_date);
        s(tags::INSTANCE_CREATION_TIME, VR::TM, &attrs.study_time);
        // Patient, General Study: the same module writer as the SEG's.
        put_patient_study(
            &mut o,
            &SourceInfo {
                patient_name: Some(attrs.patient_name.clone()),
                patient_id: Some(attrs.patient_id.clone()),
                patient_birth_date: Some(attrs.patient_birth_date.clone()),
                patient_sex: Some(attrs.patient_sex.clone()),
                patient_age: attrs.patient_age.clone(),
                study_instance_uid: study_uid.clone(),
                study_date: Some(attrs.study_date.clone()),
                study_time: Some(attrs.study_time.clone()),
                study_id: Some(attrs.study_id.clone()),
                accession_number: Some(attrs.accession_number.clone()),
                referring_physician_name: Some(attrs.referring_physician_name.clone()),
                study_description: attrs.study_description.clone(),
                ..SourceInfo::default()
            },
        );
        let mut s = |tag: Tag, vr: VR, v: &str| {
            o.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
        };
        // General Series
        s(tags::MODALITY, VR::CS, "MR");
        s(tags::SERIES_INSTANCE_UID, VR::UI, &series_uid);
        s(tags::SERIES_NUMBER, VR::IS, &attrs.series_number.to_string());
        s(tags::SERIES_DATE, VR::DA, &attrs.study_date);
        s(tags::SERIES_TIME, VR::TM, &attrs.study_time);
        s(tags::SERIES_DESCRIPTION, VR::LO, &attrs.series_description);
        s(tags::PROTOCOL_NAME, VR::LO, &attrs.protocol_name);
        s(tags::BODY_PART_EXAMINED, VR::CS, &attrs.body_part_examined);
        s(tags::PATIENT_POSITION, VR::CS, &attrs.patient_position);
        // Frame of Reference
        s(tags::FRAME_OF_REFERENCE_UID, VR::UI, &for_uid);
        s(tags::POSITION_REFERENCE_INDICATOR, VR::LO, "");
        // General Equipment
        s(tags::MANUFACTURER, VR::LO, &attrs.manufacturer);
        s(tags::MANUFACTURER_MODEL_NAME, VR::LO, &attrs.manufacturer_model_name);
        if let Some(v) = &attrs.device_serial_number {
            s(tags::DEVICE_SERIAL_NUMBER, VR::LO, v);
        }
        if let Some(v) = &attrs.software_versions {
            s(tags::SOFTWARE_VERSIONS, VR::LO, v);
        }
        if let Some(v) = &attrs.institution_name {
            s(tags::INSTITUTION_NAME, VR::LO, v);
        }
        if let Some(v) = &attrs.station_name {
            s(tags::STATION_NAME, VR::SH, v);
        }
        // General Acquisition / General Image
        s(tags::ACQUISITION_NUMBER, VR::IS, "1");
        s(tags::INSTANCE_NUMBER, VR::IS, &(z + 1).to_string());
        s(tags::CONTENT_DATE, VR::DA, &attrs.study_date);
        s(tags::CONTENT_TIME, VR::TM, &attrs.study_time);
        s(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY\\OTHER");
        // Image Plane
        o.put(ds_multi(tags::PIXEL_SPACING, &[vol.spacing[1], vol.spacing[0]]));
        o.put(ds_multi(tags::IMAGE_ORIENTATION_PATIENT, &[row[0], row[1], row[2], col[0], col[1], col[2]]));
        o.put(ds_multi(tags::IMAGE_POSITION_PATIENT, &ipp));
        o.put(ds_multi(tags::SLICE_THICKNESS, &[thickness]));
        o.put(ds_multi(tags::SPACING_BETWEEN_SLICES, &[vol.spacing[2]]));
        o.put(ds_multi(tags::SLICE_LOCATION, &[slice_location]));
        // MR Image
        let mut s = |tag: Tag, vr: VR, v: &str| {
            o.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
        };
        s(tags::SCANNING_SEQUENCE, VR::CS, &attrs.scanning_sequence);
        s(tags::SEQUENCE_VARIANT, VR::CS, &attrs.sequence_variant);
        s(tags::SCAN_OPTIONS, VR::CS, &attrs.scan_options);
        s(tags::MR_ACQUISITION_TYPE, VR::CS, &attrs.mr_acquisition_type);
        if let Some(v) = &attrs.sequence_name {
            s(tags::SEQUENCE_NAME, VR::SH, v);
        }
        s(tags::ECHO_TRAIN_LENGTH, VR::IS, &attrs.echo_train_length.to_string());
        s(tags::IMAGED_NUCLEUS, VR::SH, &attrs.imaged_nucleus);
        if let Some(v) = &attrs.receive_coil_name {
            s(tags::RECEIVE_COIL_NAME, VR::SH, v);
        }
        s(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2");
        o.put(ds_multi(tags::REPETITION_TIME, &[attrs.repetition_time]));
        o.put(ds_multi(tags::ECHO_TIME, &[attrs.echo_time]));
        o.put(ds_multi(tags::MAGNETIC_FIELD_STRENGTH, &[attrs.magnetic_field_strength]));
        o.put(ds_multi(tags::NUMBER_OF_AVERAGES, &[1.0]));
        if let Some(v) = attrs.flip_angle {
            o.put(ds_multi(tags::FLIP_ANGLE, &[v]));
        }
        if let Some(v) = attrs.imaging_frequency {
            o.put(ds_multi(tags::IMAGING_FREQUENCY, &[v]));
        }
        // Image Pixel
        let us = |tag: Tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
        o.put(us(tags::SAMPLES_PER_PIXEL, 1));
        o.put(us(tags::ROWS, ny as u16));
        o.put(us(tags::COLUMNS, nx as u16));
        o.put(us(tags::BITS_ALLOCATED, 16));
        o.put(us(tags::BITS_STORED, 16));
        o.put(us(tags::HIGH_BIT, 15));
        let signed = attrs.stored_pixels == StoredPixels::Int16;
        o.put(us(tags::PIXEL_REPRESENTATION, signed as u16));
        if attrs.rescale.is_some() {
            o.put(ds_multi(tags::RESCALE_INTERCEPT, &[intercept]));
            o.put(ds_multi(tags::RESCALE_SLOPE, &[slope]));
            o.put(DataElement::new(tags::RESCALE_TYPE, VR::LO, PrimitiveValue::from("US")));
        }
        // VOI LUT: a window over the whole volume's range (in rescaled units).
        let width = ((vmax - vmin) as f64).max(1.0);
        o.put(ds_multi(tags::WINDOW_CENTER, &[(vmin as f64 + vmax as f64) / 2.0]));
        o.put(ds_multi(tags::WINDOW_WIDTH, &[width]));
        let n = ny * nx;
        let mut bytes = Vec::with_capacity(n * 2);
        for &v in &stored[z * n..(z + 1) * n] {
            if signed {
                bytes.extend_from_slice(&(v as i16).to_le_bytes());
            } else {
                bytes.extend_from_slice(&(v as u16).to_le_bytes());
            }
        }
        o.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(bytes)));

        let file = o
            .with_meta(
                FileMetaTableBuilder::new()
                    .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
                    .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
                    .implementation_version_name(IMPLEMENTATION_VERSION_NAME),
            )
            .map_err(|e| DicomError::Write { path: format!("slice {z}"), reason: e.to_string() })?;
        let mut out = Vec::new();
        file.write_all(&mut out)
            .map_err(|e| DicomError::Write { path: format!("slice {z}"), reason: e.to_string() })?;
        files.push(out);
        slices.push(SliceRef {
            sop_class_uid: uids::MR_IMAGE_STORAGE.to_string(),
            sop_instance_uid: sop_uid,
            frame_number: None,
            position: ipp,
        });
    }

    let mut volume = vol.clone();
    volume.slices = slices;
    volume.frame_of_reference_uid = Some(for_uid);
    volume.source = Some(SourceInfo {
        patient_name: Some(attrs.patient_name.clone()),
        patient_id: Some(attrs.patient_id.clone()),
        patient_birth_date: non_empty(&attrs.patient_birth_date),
        patient_sex: non_empty(&attrs.patient_sex),
        patient_age: attrs.patient_age.clone(),
        study_instance_uid: study_uid,
        study_date: non_empty(&attrs.study_date),
        study_time: non_empty(&attrs.study_time),
        study_id: non_empty(&attrs.study_id),
        accession_number: non_empty(&attrs.accession_number),
        referring_physician_name: non_empty(&attrs.referring_physician_name),
        study_description: attrs.study_description.clone(),
        series_instance_uid: series_uid,
        series_number: Some(attrs.series_number),
        series_description: non_empty(&attrs.series_description),
        protocol_name: non_empty(&attrs.protocol_name),
        modality: "MR".into(),
        manufacturer: non_empty(&attrs.manufacturer),
        manufacturer_model_name: non_empty(&attrs.manufacturer_model_name),
        institution_name: attrs.institution_name.clone(),
        magnetic_field_strength: Some(attrs.magnetic_field_strength),
        body_part_examined: non_empty(&attrs.body_part_examined),
        slice_thickness: Some(thickness),
    });
    Ok(EncodedMrSeries { files, volume })
}

fn check_volume(vol: &Volume) -> Result<(), DicomError> {
    let [nz, ny, nx] = vol.dims;
    if nz == 0 || ny == 0 || nx == 0 {
        return Err(DicomError::InvalidVolume(format!("empty dimensions {:?}", vol.dims)));
    }
    if ny > u16::MAX as usize || nx > u16::MAX as usize {
        return Err(DicomError::InvalidVolume(format!("slice size {nx}x{ny} exceeds 65535")));
    }
    if vol.voxels.len() != nz * ny * nx {
        return Err(DicomError::InvalidVolume("voxel count does not match dims".into()));
    }
    if vol.voxels.iter().any(|v| !v.is_finite()) {
        return Err(DicomError::InvalidVolume("volume contains NaN or infinite values".into()));
    }
    if vol.spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(DicomError::InvalidVolume(format!("spacing {:?} must be positive", vol.spacing)));
    }
    let [r, c, n] = vol.direction;
    let unit = |v: [f64; 3]| (dot(v, v).sqrt() - 1.0).abs() < 1e-4;
    if !(unit(r) && unit(c) && unit(n)) || dot(r, c).abs() > 1e-4 {
        return Err(DicomError::InvalidVolume(format!("direction {:?} is not orthonormal", vol.direction)));
    }
    // DICOM slices may lie on either side of the row×column normal (readers re-sort them), but they
    // must stack along it: a sheared grid cannot be written as an image stack.
    if dot(cross(r, c), n).abs() < 1.0 - 1e-4 {
        return Err(DicomError::InvalidVolume("slice axis is not perpendicular to the slice plane".into()));
    }
    Ok(())
}

fn stored_range(p: StoredPixels) -> (f64, f64) {
    match p {
        StoredPixels::Uint16 => (0.0, 65535.0),
        StoredPixels::Int16 => (-32768.0, 32767.0),
    }
}

fn finite_range(v: &[f32]) -> (f32, f32) {
    let mut lo = f32::INFINITY;
    let mut hi = f32::NEG_INFINITY;
    for &x in v.iter().filter(|x| x.is_finite()) {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if lo > hi {
        (0.0, 0.0)
    } else {
        (lo, hi)
    }
}

fn non_empty(s: &str) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s.to_string())
    }
}

fn ds_multi(tag: Tag, values: &[f64]) -> DataElement<InMemDicomObject> {
    // Values are checked finite before encoding starts, so formatting cannot fail here.
    let strs: Vec<String> = values.iter().map(|&v| format_ds(v).unwrap_or_else(|_| "0".into())).collect();
    DataElement::new(tag, VR::DS, PrimitiveValue::Strs(strs.into_iter().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_sheared_and_non_finite_volumes() {
        let mut v = Volume::new(vec![0.0; 8], [2, 2, 2], [1.0, 1.0, 1.0], [0.0; 3]);
        v.direction[2] = [0.0, 0.6, 0.8];
        assert!(matches!(encode_mr_series(&v, &MrSeriesAttributes::default()), Err(DicomError::InvalidVolume(_))));
        let mut v = Volume::new(vec![0.0; 8], [2, 2, 2], [1.0, 1.0, 1.0], [0.0; 3]);
        v.voxels[3] = f32::NAN;
        assert!(matches!(encode_mr_series(&v, &MrSeriesAttributes::default()), Err(DicomError::InvalidVolume(_))));
        let v = Volume::new(vec![-5.0; 8], [2, 2, 2], [1.0, 1.0, 1.0], [0.0; 3]);
        assert!(matches!(encode_mr_series(&v, &MrSeriesAttributes::default()), Err(DicomError::InvalidVolume(_))));
    }

    #[test]
    fn fit_rescale_maps_fractional_values_into_range() {
        let vals: Vec<f32> = (0..8).map(|i| i as f32 * 0.125 - 0.3).collect();
        let v = Volume::new(vals.clone(), [2, 2, 2], [1.0, 1.0, 2.0], [0.0; 3]);
        for enc in [StoredPixels::Uint16, StoredPixels::Int16] {
            let mut a = MrSeriesAttributes { stored_pixels: enc, ..Default::default() };
            a.fit_rescale(&v);
            let (slope, icpt) = a.rescale.unwrap();
            let enc_out = encode_mr_series(&v, &a).unwrap();
            assert_eq!(enc_out.files.len(), 2);
            for &x in &vals {
                let st = ((x as f64 - icpt) / slope).round();
                assert!((st * slope + icpt - x as f64).abs() <= slope / 2.0 + 1e-9);
            }
        }
    }
}

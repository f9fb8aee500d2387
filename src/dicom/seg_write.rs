//! DICOM-SEG writer: binary masks on a DICOM-sourced `Volume` → one Segmentation Storage instance
//! (Part-10 bytes, Explicit VR Little Endian). Owns the SEG IOD layout; never resamples the grid.

use dicom_core::value::{PrimitiveValue, C};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use thiserror::Error;

use super::attrs::{
    clean_cs, clean_lo, clean_text, nonempty, put_empty, put_opt, put_patient_study, put_seq, put_str, put_strs,
    put_u16,
};
use super::codes::{self, Code};
use super::ds::{format_ds_vec, DsError};
use super::uid::{new_uid, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};
use crate::volume::{Mask, Volume};

/// SOP Class UID of Segmentation Storage.
pub const SEGMENTATION_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.66.4";
/// Manufacturer written into every SEG.
pub const MANUFACTURER: &str = "desam";

/// Errors of the SEG writer and reader.
#[derive(Debug, Error)]
pub enum SegError {
    #[error("the volume has no DICOM source (NIfTI input?): a DICOM-SEG needs the source slice references, patient/study attributes and frame of reference")]
    NoDicomSource,
    #[error("the source volume has {refs} slice references for {nz} slices")]
    SliceRefMismatch { refs: usize, nz: usize },
    #[error("the source volume has no FrameOfReferenceUID; a DICOM-SEG must share the source's frame of reference")]
    NoFrameOfReference,
    #[error("segment {segment}: mask dims {mask:?} differ from the source volume dims {volume:?}")]
    DimsMismatch { segment: usize, mask: [usize; 3], volume: [usize; 3] },
    #[error("source slices {slice} and {} are not in increasing order along the slice normal (duplicate or unsorted positions)", slice + 1)]
    SliceOrder { slice: usize },
    #[error("no segments given: a DICOM-SEG needs at least one segment")]
    NoSegments,
    #[error("{0}")]
    Ds(#[from] DsError),
    #[error("cannot encode the DICOM-SEG: {0}")]
    Encode(String),
    #[error("cannot parse the DICOM object: {0}")]
    Parse(String),
    #[error("not a DICOM Segmentation (SOP class {0})")]
    NotSegmentation(String),
    #[error("unsupported DICOM-SEG: {0}")]
    Unsupported(String),
    #[error("invalid DICOM-SEG: {0}")]
    Invalid(String),
    #[error("the SEG's {what} does not match the source series: {detail}")]
    GridMismatch { what: &'static str, detail: String },
    #[error("SEG frame {frame} (segment {segment}) matches no slice of the source series (references {references:?}, position {position:?})")]
    FrameNotInSource { frame: usize, segment: u16, references: Vec<String>, position: Option<[f64; 3]> },
}

/// Segment Algorithm Type (0062,0008).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlgorithmType {
    Automatic,
    Semiautomatic,
    Manual,
}

impl AlgorithmType {
    pub fn as_dicom(self) -> &'static str {
        match self {
            AlgorithmType::Automatic => "AUTOMATIC",
            AlgorithmType::Semiautomatic => "SEMIAUTOMATIC",
            AlgorithmType::Manual => "MANUAL",
        }
    }
    pub fn from_dicom(s: &str) -> Option<AlgorithmType> {
        match s.trim() {
            "AUTOMATIC" => Some(AlgorithmType::Automatic),
            "SEMIAUTOMATIC" => Some(AlgorithmType::Semiautomatic),
            "MANUAL" => Some(AlgorithmType::Manual),
            _ => None,
        }
    }
}

/// What one segment is (one item of the Segment Sequence).
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentInfo {
    /// SegmentLabel (LO).
    pub label: String,
    /// SegmentDescription (ST), e.g. the segment's volume; optional.
    pub description: Option<String>,
    /// Segmented Property Category Code.
    pub category: Code,
    /// Segmented Property Type Code.
    pub property_type: Code,
    pub algorithm_type: AlgorithmType,
    /// SegmentAlgorithmName (required unless MANUAL).
    pub algorithm_name: Option<String>,
    /// RecommendedDisplayCIELabValue, DICOM-scaled (see `codes::cielab_from_srgb`).
    pub cielab: Option<[u16; 3]>,
}

impl SegmentInfo {
    /// The whole gland, segmented automatically by `algorithm_name`.
    pub fn prostate(algorithm_name: &str) -> SegmentInfo {
        Self::anatomy("Prostate", codes::PROSTATE, codes::PROSTATE_RGB, algorithm_name)
    }
    pub fn peripheral_zone(algorithm_name: &str) -> SegmentInfo {
        Self::anatomy("Peripheral zone", codes::PERIPHERAL_ZONE, codes::PERIPHERAL_ZONE_RGB, algorithm_name)
    }
    pub fn transition_zone(algorithm_name: &str) -> SegmentInfo {
        Self::anatomy("Transition zone", codes::TRANSITION_ZONE, codes::TRANSITION_ZONE_RGB, algorithm_name)
    }
    fn anatomy(label: &str, property_type: Code, rgb: [u8; 3], algorithm_name: &str) -> SegmentInfo {
        SegmentInfo {
            label: label.to_string(),
            description: None,
            category: codes::ANATOMICAL_STRUCTURE,
            property_type,
            algorithm_type: AlgorithmType::Automatic,
            algorithm_name: Some(algorithm_name.to_string()),
            cielab: Some(codes::cielab_from_srgb(rgb)),
        }
    }
}

/// One segment to write: what it is and its mask on the source grid.
#[derive(Debug, Clone)]
pub struct Segment<'a> {
    pub info: SegmentInfo,
    pub mask: &'a Mask,
}

/// Everything about the SEG instance that is not in the source or the masks.
#[derive(Debug, Clone)]
pub struct SegOptions {
    /// Model name: ManufacturerModelName and Segmentation Algorithm Identification's AlgorithmName.
    pub model_name: String,
    /// Model version or weights hash: AlgorithmVersion and the second SoftwareVersions value.
    pub model_version: String,
    /// None → "DeSAM prostate (auto) <model_version>".
    pub series_description: Option<String>,
    /// None → 1000 + the source series number (or 1000).
    pub series_number: Option<i32>,
    pub instance_number: i32,
    /// ContentLabel (CS, upper case, ≤16 characters).
    pub content_label: String,
    /// None → "DeSAM prostate segmentation" (or "DeSAM prostate: empty result") + quality and gland volume when given.
    pub content_description: Option<String>,
    /// ContentCreatorName (PN); empty when None.
    pub content_creator: Option<String>,
    pub device_serial_number: String,
    /// None → [crate version, model_version].
    pub software_versions: Option<Vec<String>>,
    /// Model-reported quality score (0..1), written into ContentDescription.
    pub quality_score: Option<f64>,
    /// Gland volume in mL, written into ContentDescription.
    pub gland_volume_ml: Option<f64>,
    /// (ContentDate YYYYMMDD, ContentTime HHMMSS.FFFFFF); None → now (UTC).
    pub content_date_time: Option<(String, String)>,
}

impl SegOptions {
    pub fn new(model_name: &str, model_version: &str) -> SegOptions {
        SegOptions {
            model_name: model_name.to_string(),
            model_version: model_version.to_string(),
            ..Default::default()
        }
    }
}

impl Default for SegOptions {
    fn default() -> Self {
        SegOptions {
            model_name: "DeSAM".to_string(),
            model_version: "unknown".to_string(),
            series_description: None,
            series_number: None,
            instance_number: 1,
            content_label: "PROSTATE".to_string(),
            content_description: None,
            content_creator: None,
            device_serial_number: "0".to_string(),
            software_versions: None,
            quality_score: None,
            gland_volume_ml: None,
            content_date_time: None,
        }
    }
}

/// Write a DICOM-SEG (BINARY, or FRACTIONAL when Columns is not a multiple of 8: see `SegEncoding`; one frame per source slice per segment, empty frames kept) on the
/// grid of `source`, which must come from a DICOM series (slice references and `SourceInfo`).
/// Returns the Part-10 file bytes (preamble, meta, Explicit VR Little Endian data set).
pub fn write_seg(source: &Volume, segments: &[Segment<'_>], opts: &SegOptions) -> Result<Vec<u8>, SegError> {
    let info = source.source.as_ref().ok_or(SegError::NoDicomSource)?;
    if source.slices.is_empty() {
        return Err(SegError::NoDicomSource);
    }
    let nz = source.nz();
    if source.slices.len() != nz {
        return Err(SegError::SliceRefMismatch { refs: source.slices.len(), nz });
    }
    let for_uid = source.frame_of_reference_uid.as_deref().ok_or(SegError::NoFrameOfReference)?;
    if segments.is_empty() {
        return Err(SegError::NoSegments);
    }
    for (i, s) in segments.iter().enumerate() {
        if s.mask.dims != source.dims || s.mask.data.len() != source.dims.iter().product::<usize>() {
            return Err(SegError::DimsMismatch { segment: i + 1, mask: s.mask.dims, volume: source.dims });
        }
    }
    // Frames are indexed by slice order: the slices must advance along the normal, as the series
    // reader sorts them (InstanceNumber order is not enough).
    let normal = source.direction[2];
    let along = |p: &[f64; 3]| p[0] * normal[0] + p[1] * normal[1] + p[2] * normal[2];
    for (z, w) in source.slices.windows(2).enumerate() {
        if along(&w[1].position) - along(&w[0].position) <= 1e-6 {
            return Err(SegError::SliceOrder { slice: z + 1 });
        }
    }
    let (ny, nx) = (source.ny(), source.nx());
    if ny > u16::MAX as usize || nx > u16::MAX as usize {
        return Err(SegError::Encode(format!("frame size {ny}×{nx} exceeds 65535")));
    }

    let (content_date, content_time) =
        opts.content_date_time.clone().unwrap_or_else(|| crate::clock::UtcTime::now().dicom_date_time());
    let series_uid = new_uid();
    let sop_uid = new_uid();
    let mut o = InMemDicomObject::new_empty();

    // SOP Common
    put_str(&mut o, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192");
    put_str(&mut o, tags::SOP_CLASS_UID, VR::UI, SEGMENTATION_STORAGE);
    put_str(&mut o, tags::SOP_INSTANCE_UID, VR::UI, &sop_uid);
    put_str(&mut o, tags::INSTANCE_CREATION_DATE, VR::DA, &content_date);
    put_str(&mut o, tags::INSTANCE_CREATION_TIME, VR::TM, &content_time);

    // Provenance: the scanner that acquired the source and the software that segmented it.
    let mut contributing = Vec::new();
    if let Some(m) = info.manufacturer.as_deref().filter(|m| !m.trim().is_empty()) {
        let mut e = InMemDicomObject::new_empty();
        put_seq(&mut e, tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE, vec![code_item(&codes::ACQUISITION_EQUIPMENT)]);
        put_str(&mut e, tags::MANUFACTURER, VR::LO, &clean_lo(m, 64));
        if let Some(i) = info.institution_name.as_deref().filter(|s| !s.trim().is_empty()) {
            put_str(&mut e, tags::INSTITUTION_NAME, VR::LO, &clean_lo(i, 64));
        }
        if let Some(n) = info.manufacturer_model_name.as_deref().filter(|s| !s.trim().is_empty()) {
            put_str(&mut e, tags::MANUFACTURER_MODEL_NAME, VR::LO, &clean_lo(n, 64));
        }
        contributing.push(e);
    }
    let mut e = InMemDicomObject::new_empty();
    put_seq(&mut e, tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE, vec![code_item(&codes::PROCESSING_EQUIPMENT)]);
    put_str(&mut e, tags::MANUFACTURER, VR::LO, MANUFACTURER);
    put_str(&mut e, tags::MANUFACTURER_MODEL_NAME, VR::LO, &clean_lo(&opts.model_name, 64));
    put_str(&mut e, tags::SOFTWARE_VERSIONS, VR::LO, &clean_lo(nonempty(&opts.model_version, "unknown"), 64));
    put_str(&mut e, tags::CONTRIBUTION_DATE_TIME, VR::DT, &format!("{content_date}{content_time}"));
    put_str(&mut e, tags::CONTRIBUTION_DESCRIPTION, VR::ST, "Automatic segmentation (DeSAM)");
    contributing.push(e);
    put_seq(&mut o, tags::CONTRIBUTING_EQUIPMENT_SEQUENCE, contributing);

    // Patient, General Study, Patient Study (copied from the source)
    put_patient_study(&mut o, info);

    // General Series + Segmentation Series
    put_str(&mut o, tags::MODALITY, VR::CS, "SEG");
    put_str(&mut o, tags::SERIES_INSTANCE_UID, VR::UI, &series_uid);
    let series_number =
        opts.series_number.unwrap_or_else(|| 1000 + info.series_number.unwrap_or(0).clamp(0, 1_000_000));
    put_str(&mut o, tags::SERIES_NUMBER, VR::IS, &series_number.to_string());
    let description =
        opts.series_description.clone().unwrap_or_else(|| format!("DeSAM prostate (auto) {}", opts.model_version));
    put_str(&mut o, tags::SERIES_DESCRIPTION, VR::LO, &clean_lo(&description, 64));
    put_str(&mut o, tags::SERIES_DATE, VR::DA, &content_date);
    put_str(&mut o, tags::SERIES_TIME, VR::TM, &content_time);
    if let Some(b) = info.body_part_examined.as_deref().filter(|s| !s.is_empty()) {
        put_str(&mut o, tags::BODY_PART_EXAMINED, VR::CS, &clean_cs(b));
    }

    // Frame of Reference
    put_str(&mut o, tags::FRAME_OF_REFERENCE_UID, VR::UI, for_uid);
    put_empty(&mut o, tags::POSITION_REFERENCE_INDICATOR, VR::LO);

    // General Equipment + Enhanced General Equipment
    put_str(&mut o, tags::MANUFACTURER, VR::LO, MANUFACTURER);
    put_str(&mut o, tags::MANUFACTURER_MODEL_NAME, VR::LO, &clean_lo(&opts.model_name, 64));
    put_str(&mut o, tags::DEVICE_SERIAL_NUMBER, VR::LO, &clean_lo(nonempty(&opts.device_serial_number, "0"), 64));
    let software = opts
        .software_versions
        .clone()
        .unwrap_or_else(|| vec![format!("desam {}", env!("CARGO_PKG_VERSION")), opts.model_version.clone()]);
    let software: Vec<String> = software.iter().map(|s| clean_lo(nonempty(s, "unknown"), 64)).collect();
    put_strs(&mut o, tags::SOFTWARE_VERSIONS, VR::LO, software);

    // General Image + Segmentation Image
    put_str(&mut o, tags::INSTANCE_NUMBER, VR::IS, &opts.instance_number.to_string());
    put_strs(&mut o, tags::IMAGE_TYPE, VR::CS, vec!["DERIVED".into(), "PRIMARY".into()]);
    put_str(&mut o, tags::CONTENT_DATE, VR::DA, &content_date);
    put_str(&mut o, tags::CONTENT_TIME, VR::TM, &content_time);
    put_str(&mut o, tags::CONTENT_LABEL, VR::CS, &clean_cs(nonempty(&opts.content_label, "PROSTATE")));
    put_str(
        &mut o,
        tags::CONTENT_DESCRIPTION,
        VR::LO,
        &clean_lo(&content_description(opts, segments.iter().all(|s| s.mask.data.iter().all(|&v| v == 0))), 64),
    );
    put_opt(&mut o, tags::CONTENT_CREATOR_NAME, VR::PN, opts.content_creator.as_deref(), 64 * 5);
    let encoding = SegEncoding::for_columns(nx);
    put_str(&mut o, tags::SEGMENTATION_TYPE, VR::CS, encoding.segmentation_type());
    if encoding == SegEncoding::Fractional {
        // Every pixel is 0 or 255: fully outside or fully inside the segment.
        put_str(&mut o, tags::SEGMENTATION_FRACTIONAL_TYPE, VR::CS, "OCCUPANCY");
        put_u16(&mut o, tags::MAXIMUM_FRACTIONAL_VALUE, &[FRACTIONAL_MAX as u16]);
    }
    // NO unless two segments share a voxel (the gland and its zones do).
    let overlap = (0..segments[0].mask.data.len()).any(|i| segments.iter().filter(|s| s.mask.data[i] != 0).count() > 1);
    put_str(&mut o, tags::SEGMENTS_OVERLAP, VR::CS, if overlap { "YES" } else { "NO" });
    put_str(&mut o, tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00");

    // Image Pixel
    let n_frames = segments.len() * nz;
    put_u16(&mut o, tags::SAMPLES_PER_PIXEL, &[1]);
    put_str(&mut o, tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2");
    put_u16(&mut o, tags::ROWS, &[ny as u16]);
    put_u16(&mut o, tags::COLUMNS, &[nx as u16]);
    let bits = encoding.bits_allocated();
    put_u16(&mut o, tags::BITS_ALLOCATED, &[bits]);
    put_u16(&mut o, tags::BITS_STORED, &[bits]);
    put_u16(&mut o, tags::HIGH_BIT, &[bits - 1]);
    put_u16(&mut o, tags::PIXEL_REPRESENTATION, &[0]);
    put_str(&mut o, tags::NUMBER_OF_FRAMES, VR::IS, &n_frames.to_string());

    // Segment Sequence
    let mut segment_items = Vec::with_capacity(segments.len());
    for (i, s) in segments.iter().enumerate() {
        segment_items.push(segment_item(i as u16 + 1, &s.info, opts)?);
    }
    put_seq(&mut o, tags::SEGMENT_SEQUENCE, segment_items);

    // Multi-frame Dimension: segment number, then position along the slice normal.
    let dim_org_uid = new_uid();
    let mut dim_org = InMemDicomObject::new_empty();
    put_str(&mut dim_org, tags::DIMENSION_ORGANIZATION_UID, VR::UI, &dim_org_uid);
    put_seq(&mut o, tags::DIMENSION_ORGANIZATION_SEQUENCE, vec![dim_org]);
    let dim_index = |pointer: Tag, group: Tag, label: &str| {
        let mut d = InMemDicomObject::new_empty();
        put_str(&mut d, tags::DIMENSION_ORGANIZATION_UID, VR::UI, &dim_org_uid);
        d.put(DataElement::new(
            tags::DIMENSION_INDEX_POINTER,
            VR::AT,
            PrimitiveValue::Tags(C::from_vec(vec![pointer])),
        ));
        d.put(DataElement::new(tags::FUNCTIONAL_GROUP_POINTER, VR::AT, PrimitiveValue::Tags(C::from_vec(vec![group]))));
        put_str(&mut d, tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, label);
        d
    };
    put_seq(
        &mut o,
        tags::DIMENSION_INDEX_SEQUENCE,
        vec![
            dim_index(
                tags::REFERENCED_SEGMENT_NUMBER,
                tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                "ReferencedSegmentNumber",
            ),
            dim_index(tags::IMAGE_POSITION_PATIENT, tags::PLANE_POSITION_SEQUENCE, "ImagePositionPatient"),
        ],
    );

    // Shared Functional Groups: pixel measures and orientation of the source grid.
    let mut measures = InMemDicomObject::new_empty();
    put_ds(&mut measures, tags::PIXEL_SPACING, &[source.spacing[1], source.spacing[0]])?;
    let thickness = info.slice_thickness.filter(|t| t.is_finite() && *t > 0.0).unwrap_or(source.spacing[2]);
    if thickness.is_finite() && thickness > 0.0 {
        put_ds(&mut measures, tags::SLICE_THICKNESS, &[thickness])?;
    }
    if nz > 1 && source.spacing[2].is_finite() && source.spacing[2] > 0.0 {
        put_ds(&mut measures, tags::SPACING_BETWEEN_SLICES, &[source.spacing[2]])?;
    }
    let mut orientation = InMemDicomObject::new_empty();
    let [r, c, _] = source.direction;
    put_ds(&mut orientation, tags::IMAGE_ORIENTATION_PATIENT, &[r[0], r[1], r[2], c[0], c[1], c[2]])?;
    let mut shared = InMemDicomObject::new_empty();
    put_seq(&mut shared, tags::PIXEL_MEASURES_SEQUENCE, vec![measures]);
    put_seq(&mut shared, tags::PLANE_ORIENTATION_SEQUENCE, vec![orientation]);
    put_seq(&mut o, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]);

    // Per-frame Functional Groups, segment-major then slice order (the dimension order).
    let mut per_frame = Vec::with_capacity(n_frames);
    for seg_number in 1..=segments.len() as u16 {
        for (z, slice) in source.slices.iter().enumerate() {
            let mut item = InMemDicomObject::new_empty();

            let mut src = InMemDicomObject::new_empty();
            put_str(&mut src, tags::REFERENCED_SOP_CLASS_UID, VR::UI, &slice.sop_class_uid);
            put_str(&mut src, tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, &slice.sop_instance_uid);
            if let Some(f) = slice.frame_number {
                put_str(&mut src, tags::REFERENCED_FRAME_NUMBER, VR::IS, &f.to_string());
            }
            put_seq(
                &mut src,
                tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
                vec![code_item(&codes::SOURCE_IMAGE_FOR_PROCESSING)],
            );
            put_str(&mut src, tags::SPATIAL_LOCATIONS_PRESERVED, VR::CS, "YES");
            let mut derivation = InMemDicomObject::new_empty();
            put_seq(&mut derivation, tags::DERIVATION_CODE_SEQUENCE, vec![code_item(&codes::SEGMENTATION_DERIVATION)]);
            put_seq(&mut derivation, tags::SOURCE_IMAGE_SEQUENCE, vec![src]);
            put_seq(&mut item, tags::DERIVATION_IMAGE_SEQUENCE, vec![derivation]);

            let mut content = InMemDicomObject::new_empty();
            content.put(DataElement::new(
                tags::DIMENSION_INDEX_VALUES,
                VR::UL,
                PrimitiveValue::U32(C::from_vec(vec![seg_number as u32, z as u32 + 1])),
            ));
            put_seq(&mut item, tags::FRAME_CONTENT_SEQUENCE, vec![content]);

            let mut position = InMemDicomObject::new_empty();
            put_ds(&mut position, tags::IMAGE_POSITION_PATIENT, &slice.position)?;
            put_seq(&mut item, tags::PLANE_POSITION_SEQUENCE, vec![position]);

            let mut ident = InMemDicomObject::new_empty();
            put_u16(&mut ident, tags::REFERENCED_SEGMENT_NUMBER, &[seg_number]);
            put_seq(&mut item, tags::SEGMENT_IDENTIFICATION_SEQUENCE, vec![ident]);

            per_frame.push(item);
        }
    }
    put_seq(&mut o, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame);

    // Common Instance Reference: every source instance, once.
    let mut seen = std::collections::HashSet::new();
    let mut instances = Vec::new();
    for s in &source.slices {
        if seen.insert(s.sop_instance_uid.as_str()) {
            let mut r = InMemDicomObject::new_empty();
            put_str(&mut r, tags::REFERENCED_SOP_CLASS_UID, VR::UI, &s.sop_class_uid);
            put_str(&mut r, tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, &s.sop_instance_uid);
            instances.push(r);
        }
    }
    let mut series_ref = InMemDicomObject::new_empty();
    put_str(&mut series_ref, tags::SERIES_INSTANCE_UID, VR::UI, &info.series_instance_uid);
    put_seq(&mut series_ref, tags::REFERENCED_INSTANCE_SEQUENCE, instances);
    put_seq(&mut o, tags::REFERENCED_SERIES_SEQUENCE, vec![series_ref]);

    // Pixel Data
    let masks: Vec<&Mask> = segments.iter().map(|s| s.mask).collect();
    let pixels = match encoding {
        SegEncoding::Binary => pack_frames(&masks),
        SegEncoding::Fractional => byte_frames(&masks),
    };
    o.put(DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(C::from_vec(pixels))));

    let file = o
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
                .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
                .implementation_version_name(IMPLEMENTATION_VERSION_NAME),
        )
        .map_err(|e| SegError::Encode(e.to_string()))?;
    let mut out = Vec::new();
    file.write_all(&mut out).map_err(|e| SegError::Encode(e.to_string()))?;
    Ok(out)
}

/// The common case: one whole-gland segment (SNOMED CT 41216001 "Prostate"), algorithm
/// `opts.model_name`.
pub fn write_prostate_seg(source: &Volume, mask: &Mask, opts: &SegOptions) -> Result<Vec<u8>, SegError> {
    write_seg(source, &[Segment { info: SegmentInfo::prostate(&opts.model_name), mask }], opts)
}

/// Pixel encoding of a SEG. BINARY packs frames continuously, so a frame starts on a byte boundary
/// only when Rows × Columns is a multiple of 8; Orthanc 1.10 refuses to decode 1-bit frames whose
/// Columns is not a multiple of 8 and cornerstone (OHIF) slices BINARY frames at byte offsets. Such
/// grids get FRACTIONAL (8-bit, OCCUPANCY, values 0 or 255), which every reader decodes per byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegEncoding {
    Binary,
    Fractional,
}

/// MaximumFractionalValue of a FRACTIONAL SEG; a voxel inside the segment has this value.
pub const FRACTIONAL_MAX: u8 = 255;

impl SegEncoding {
    /// BINARY when Columns (hence Rows × Columns) is a multiple of 8, else FRACTIONAL.
    pub fn for_columns(columns: usize) -> SegEncoding {
        if columns % 8 == 0 {
            SegEncoding::Binary
        } else {
            SegEncoding::Fractional
        }
    }
    pub fn segmentation_type(self) -> &'static str {
        match self {
            SegEncoding::Binary => "BINARY",
            SegEncoding::Fractional => "FRACTIONAL",
        }
    }
    pub fn bits_allocated(self) -> u16 {
        match self {
            SegEncoding::Binary => 1,
            SegEncoding::Fractional => 8,
        }
    }
    /// Pixel Data length in bytes for `n_pixels` pixels (all frames), padded to even.
    pub fn pixel_data_len(self, n_pixels: usize) -> usize {
        let n = match self {
            SegEncoding::Binary => n_pixels.div_ceil(8),
            SegEncoding::Fractional => n_pixels,
        };
        n + n % 2
    }
}

/// The masks' slices (segment-major, then z, each frame row-major) as one byte per pixel, 0 or
/// `FRACTIONAL_MAX`; zero-padded to an even byte count.
pub fn byte_frames(masks: &[&Mask]) -> Vec<u8> {
    let mut out: Vec<u8> =
        masks.iter().flat_map(|m| m.data.iter().map(|&v| if v != 0 { FRACTIONAL_MAX } else { 0 })).collect();
    if out.len() % 2 == 1 {
        out.push(0);
    }
    out
}

/// Pack the masks' slices (segment-major, then z, each frame row-major) into 1-bit pixels,
/// LSB first, continuously across frame boundaries; zero-padded to an even byte count.
pub fn pack_frames(masks: &[&Mask]) -> Vec<u8> {
    let total_bits: usize = masks.iter().map(|m| m.data.len()).sum();
    let mut n_bytes = total_bits.div_ceil(8);
    n_bytes += n_bytes % 2;
    let mut out = vec![0u8; n_bytes];
    let mut bit = 0usize;
    for m in masks {
        for &v in &m.data {
            if v != 0 {
                out[bit >> 3] |= 1 << (bit & 7);
            }
            bit += 1;
        }
    }
    out
}

fn content_description(opts: &SegOptions, empty: bool) -> String {
    if let Some(d) = &opts.content_description {
        return d.clone();
    }
    // Lead with "empty": ContentDescription is 64 characters at most.
    let mut d = if empty { "DeSAM prostate: empty result" } else { "DeSAM prostate segmentation" }.to_string();
    if let Some(q) = opts.quality_score.filter(|q| q.is_finite()) {
        d.push_str(&format!("; quality {q:.2}"));
    }
    if let Some(v) = opts.gland_volume_ml.filter(|v| v.is_finite()) {
        d.push_str(&format!("; gland {v:.1} mL"));
    }
    d
}

fn segment_item(number: u16, info: &SegmentInfo, opts: &SegOptions) -> Result<InMemDicomObject, SegError> {
    let mut s = InMemDicomObject::new_empty();
    put_u16(&mut s, tags::SEGMENT_NUMBER, &[number]);
    put_str(&mut s, tags::SEGMENT_LABEL, VR::LO, &clean_lo(nonempty(&info.label, "Segment"), 64));
    if let Some(d) = info.description.as_deref().filter(|d| !d.is_empty()) {
        put_str(&mut s, tags::SEGMENT_DESCRIPTION, VR::ST, &clean_text(d, 1024));
    }
    put_seq(&mut s, tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE, vec![code_item(&info.category)]);
    put_seq(&mut s, tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE, vec![code_item(&info.property_type)]);
    put_str(&mut s, tags::SEGMENT_ALGORITHM_TYPE, VR::CS, info.algorithm_type.as_dicom());
    if info.algorithm_type != AlgorithmType::Manual {
        let name = info.algorithm_name.clone().unwrap_or_else(|| opts.model_name.clone());
        let name = clean_lo(nonempty(&name, "DeSAM"), 64);
        put_str(&mut s, tags::SEGMENT_ALGORITHM_NAME, VR::LO, &name);
        let mut alg = InMemDicomObject::new_empty();
        put_seq(&mut alg, tags::ALGORITHM_FAMILY_CODE_SEQUENCE, vec![code_item(&codes::ARTIFICIAL_INTELLIGENCE)]);
        put_str(&mut alg, tags::ALGORITHM_NAME, VR::LO, &name);
        put_str(&mut alg, tags::ALGORITHM_VERSION, VR::LO, &clean_lo(nonempty(&opts.model_version, "unknown"), 64));
        put_seq(&mut s, tags::SEGMENTATION_ALGORITHM_IDENTIFICATION_SEQUENCE, vec![alg]);
    }
    if let Some(lab) = info.cielab {
        put_u16(&mut s, tags::RECOMMENDED_DISPLAY_CIE_LAB_VALUE, &lab);
    }
    Ok(s)
}

// ---- small dataset helpers (shared with the reader's tests) ----

pub(crate) fn code_item(c: &Code) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    put_str(&mut o, tags::CODE_VALUE, VR::SH, &c.value);
    put_str(&mut o, tags::CODING_SCHEME_DESIGNATOR, VR::SH, &c.scheme);
    put_str(&mut o, tags::CODE_MEANING, VR::LO, &clean_lo(&c.meaning, 64));
    o
}

fn put_ds(o: &mut InMemDicomObject, tag: Tag, v: &[f64]) -> Result<(), SegError> {
    put_strs(o, tag, VR::DS, format_ds_vec(v)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_is_lsb_first_and_continuous() {
        // Two 1×3×3 "frames" (9 pixels each): frame 2 starts at bit 9 (mid-byte).
        let mut a = Mask::zeros([1, 3, 3]);
        a.data[0] = 1;
        a.data[8] = 1;
        let mut b = Mask::zeros([1, 3, 3]);
        b.data[0] = 1;
        b.data[7] = 1;
        let p = pack_frames(&[&a, &b]);
        assert_eq!(p.len(), 4, "18 bits → 3 bytes, padded to 4");
        assert_eq!(p, vec![0b0000_0001, 0b0000_0011, 0b0000_0001, 0]);
    }

    #[test]
    fn text_cleaning() {
        assert_eq!(clean_cs("prostate-1 gland long label"), "PROSTATE_1 GLAND");
        assert_eq!(clean_lo("a\\b", 64), "a b");
        assert_eq!(clean_lo(&"x".repeat(80), 64).len(), 64);
        assert!(
            crate::dicom::attrs::is_age_string("065Y")
                && !crate::dicom::attrs::is_age_string("65Y")
                && !crate::dicom::attrs::is_age_string("065y")
        );
    }
}

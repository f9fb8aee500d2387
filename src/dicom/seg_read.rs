//! DICOM-SEG reader: Segmentation Storage bytes (ours or other tools', any uncompressed transfer
//! syntax) → segment descriptions and masks on a source series' grid. Never resamples or guesses.

use std::collections::HashMap;

use dicom_core::value::Value;
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{InMemDicomObject, OpenFileOptions};

use super::attrs::{attr_f64s, attr_str, attr_uint, items};
use super::codes::Code;
use super::seg_write::{AlgorithmType, SegError, SegmentInfo, SEGMENTATION_STORAGE};
use crate::volume::{Mask, Volume};

/// One source image a SEG frame was derived from.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRef {
    pub sop_class_uid: Option<String>,
    pub sop_instance_uid: String,
    /// ReferencedFrameNumber values (empty for single-frame sources).
    pub frame_numbers: Vec<u32>,
}

/// One decoded frame of a SEG.
#[derive(Debug, Clone, PartialEq)]
pub struct SegFrame {
    pub segment_number: u16,
    /// ImagePositionPatient from the Plane Position functional group.
    pub position: Option<[f64; 3]>,
    /// ImageOrientationPatient (shared or per-frame Plane Orientation).
    pub orientation: Option<[f64; 6]>,
    pub dimension_index_values: Vec<u32>,
    /// Derivation Image → Source Image Sequence references.
    pub source_refs: Vec<SourceRef>,
    /// Rows × Columns values, 0 or 1, row-major.
    pub pixels: Vec<u8>,
}

/// A SEG decoded without a source series.
#[derive(Debug, Clone, PartialEq)]
pub struct SegObject {
    pub sop_instance_uid: String,
    pub series_instance_uid: Option<String>,
    pub study_instance_uid: Option<String>,
    pub frame_of_reference_uid: Option<String>,
    pub series_description: Option<String>,
    pub content_label: Option<String>,
    pub content_description: Option<String>,
    /// BINARY or FRACTIONAL (FRACTIONAL frames are thresholded at half the maximum value).
    pub segmentation_type: String,
    pub rows: usize,
    pub columns: usize,
    /// PixelSpacing (row spacing, column spacing) from Pixel Measures, if present.
    pub pixel_spacing: Option<[f64; 2]>,
    /// (SegmentNumber, description) in Segment Sequence order.
    pub segments: Vec<(u16, SegmentInfo)>,
    pub frames: Vec<SegFrame>,
    /// Common Instance Reference: (SeriesInstanceUID, referenced instances).
    pub referenced_series: Vec<(String, Vec<SourceRef>)>,
}

/// Decode a SEG on its own: segments, frames (positions, references, pixels).
pub fn read_seg_standalone(bytes: &[u8]) -> Result<SegObject, SegError> {
    let preamble = if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        ReadPreamble::Always
    } else if bytes.starts_with(b"DICM") {
        ReadPreamble::Never
    } else {
        return Err(SegError::Parse("not a DICOM Part-10 file (no DICM magic)".into()));
    };
    // The same pre-parse walk as for images: declared lengths at every depth, sizes within limits.
    super::series::precheck_part10(bytes, if preamble == ReadPreamble::Always { 132 } else { 4 })
        .map_err(|(limit, reason)| if limit { SegError::Invalid(reason) } else { SegError::Parse(reason) })?;
    let file = OpenFileOptions::new()
        .read_preamble(preamble)
        .from_reader(bytes)
        .map_err(|e| SegError::Parse(e.to_string()))?;
    let o: &InMemDicomObject = &file;

    let sop_class = attr_str(o, tags::SOP_CLASS_UID).unwrap_or_default();
    if sop_class != SEGMENTATION_STORAGE {
        return Err(SegError::NotSegmentation(sop_class));
    }
    let segmentation_type = attr_str(o, tags::SEGMENTATION_TYPE).unwrap_or_default().to_ascii_uppercase();
    let rows = attr_uint(o, tags::ROWS).ok_or_else(|| SegError::Invalid("missing Rows".into()))? as usize;
    let columns = attr_uint(o, tags::COLUMNS).ok_or_else(|| SegError::Invalid("missing Columns".into()))? as usize;
    let n_frames = match attr_str(o, tags::NUMBER_OF_FRAMES) {
        Some(s) => s.parse::<usize>().map_err(|_| SegError::Invalid(format!("NumberOfFrames {s:?}")))?,
        None => 1,
    };
    if rows == 0 || columns == 0 || n_frames == 0 {
        return Err(SegError::Invalid(format!("empty image: {rows}×{columns}, {n_frames} frames")));
    }
    // Header-derived sizes, checked before anything is unpacked (a SEG declaring 2^48 frames must
    // not pass by multiplication overflow).
    let limits = crate::limits::get();
    if n_frames as u64 > limits.max_seg_frames {
        return Err(SegError::Invalid(format!(
            "{n_frames} frames exceed the limit of {} (max_seg_frames, docs/limits.md)",
            limits.max_seg_frames
        )));
    }
    let frame_pixels = (rows as u64).saturating_mul(columns as u64);
    if frame_pixels > limits.max_slice_pixels
        || crate::limits::product(&[frame_pixels, n_frames as u64]).is_none_or(|n| n > limits.max_volume_voxels)
    {
        return Err(SegError::Invalid(format!(
            "{columns}×{rows}×{n_frames} pixels exceed the limits (max_slice_pixels, max_volume_voxels, docs/limits.md)"
        )));
    }
    let bits_allocated = attr_uint(o, tags::BITS_ALLOCATED).unwrap_or(0);

    // Segments
    let mut segments = Vec::new();
    for item in items(o, tags::SEGMENT_SEQUENCE) {
        let number = attr_uint(item, tags::SEGMENT_NUMBER)
            .ok_or_else(|| SegError::Invalid("segment without SegmentNumber".into()))? as u16;
        segments.push((number, parse_segment_info(item)?));
    }
    if segments.is_empty() {
        return Err(SegError::Invalid("empty Segment Sequence".into()));
    }

    // Functional groups
    let shared = items(o, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).first().copied();
    let mut per_frame = items(o, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE);
    if per_frame.len() > n_frames {
        // Seen in the wild (pydicom's liver_1frame.dcm): a file cut down to fewer frames that
        // kept every per-frame item. The pixel data decides; the extra items describe nothing.
        log::warn!("{} per-frame functional group items for {n_frames} frames; extra items ignored", per_frame.len());
        per_frame.truncate(n_frames);
    }
    if !per_frame.is_empty() && per_frame.len() != n_frames {
        return Err(SegError::Invalid(format!(
            "{} per-frame functional group items for {n_frames} frames",
            per_frame.len()
        )));
    }
    let pixel_spacing = fg_item(None, shared, tags::PIXEL_MEASURES_SEQUENCE)
        .and_then(|m| attr_f64s(m, tags::PIXEL_SPACING))
        .filter(|v| v.len() == 2)
        .map(|v| [v[0], v[1]]);

    // Pixels
    let pixel_elem = o.get(tags::PIXEL_DATA).ok_or_else(|| SegError::Invalid("no Pixel Data".into()))?;
    if matches!(pixel_elem.value(), Value::PixelSequence(_)) {
        return Err(SegError::Unsupported("encapsulated (compressed) pixel data".into()));
    }
    let data = pixel_elem.to_bytes().map_err(|e| SegError::Invalid(format!("Pixel Data: {e}")))?;
    let frame_len = rows * columns;
    let all_pixels: Vec<Vec<u8>> = match (segmentation_type.as_str(), bits_allocated) {
        ("BINARY", 1) => {
            let needed = (n_frames * frame_len).div_ceil(8);
            if data.len() < needed {
                return Err(SegError::Invalid(format!("Pixel Data has {} bytes, {needed} needed", data.len())));
            }
            (0..n_frames).map(|f| unpack_bits(&data, f * frame_len, frame_len)).collect()
        }
        ("FRACTIONAL", 8) => {
            if data.len() < n_frames * frame_len {
                return Err(SegError::Invalid("Pixel Data too short".into()));
            }
            let max = attr_uint(o, tags::MAXIMUM_FRACTIONAL_VALUE).unwrap_or(255).max(1) as u32;
            (0..n_frames)
                .map(|f| {
                    data[f * frame_len..(f + 1) * frame_len].iter().map(|&v| (2 * v as u32 >= max) as u8).collect()
                })
                .collect()
        }
        (t, b) => return Err(SegError::Unsupported(format!("SegmentationType {t:?} with BitsAllocated {b}"))),
    };

    let mut frames = Vec::with_capacity(n_frames);
    for (i, pixels) in all_pixels.into_iter().enumerate() {
        let pf = per_frame.get(i).copied();
        let segment_number = match fg_item(pf, shared, tags::SEGMENT_IDENTIFICATION_SEQUENCE)
            .and_then(|s| attr_uint(s, tags::REFERENCED_SEGMENT_NUMBER))
        {
            Some(n) => n as u16,
            None if segments.len() == 1 => segments[0].0,
            None => return Err(SegError::Invalid(format!("frame {} has no Segment Identification", i + 1))),
        };
        if !segments.iter().any(|(n, _)| *n == segment_number) {
            return Err(SegError::Invalid(format!("frame {} refers to unknown segment {segment_number}", i + 1)));
        }
        let position = fg_item(pf, shared, tags::PLANE_POSITION_SEQUENCE)
            .and_then(|p| attr_f64s(p, tags::IMAGE_POSITION_PATIENT))
            .filter(|v| v.len() == 3)
            .map(|v| [v[0], v[1], v[2]]);
        let orientation = fg_item(pf, shared, tags::PLANE_ORIENTATION_SEQUENCE)
            .and_then(|p| attr_f64s(p, tags::IMAGE_ORIENTATION_PATIENT))
            .filter(|v| v.len() == 6)
            .map(|v| [v[0], v[1], v[2], v[3], v[4], v[5]]);
        let dimension_index_values = fg_item(pf, None, tags::FRAME_CONTENT_SEQUENCE)
            .and_then(|c| c.get(tags::DIMENSION_INDEX_VALUES))
            .and_then(|e| e.to_multi_int::<u32>().ok())
            .unwrap_or_default();
        let mut source_refs = Vec::new();
        if let Some(pf) = pf {
            for d in items(pf, tags::DERIVATION_IMAGE_SEQUENCE) {
                for s in items(d, tags::SOURCE_IMAGE_SEQUENCE) {
                    source_refs.extend(parse_ref(s));
                }
            }
        }
        frames.push(SegFrame { segment_number, position, orientation, dimension_index_values, source_refs, pixels });
    }

    let mut referenced_series = Vec::new();
    for s in items(o, tags::REFERENCED_SERIES_SEQUENCE) {
        let uid = attr_str(s, tags::SERIES_INSTANCE_UID).unwrap_or_default();
        let refs = items(s, tags::REFERENCED_INSTANCE_SEQUENCE).into_iter().filter_map(parse_ref).collect();
        referenced_series.push((uid, refs));
    }

    Ok(SegObject {
        sop_instance_uid: attr_str(o, tags::SOP_INSTANCE_UID).unwrap_or_default(),
        series_instance_uid: attr_str(o, tags::SERIES_INSTANCE_UID),
        study_instance_uid: attr_str(o, tags::STUDY_INSTANCE_UID),
        frame_of_reference_uid: attr_str(o, tags::FRAME_OF_REFERENCE_UID),
        series_description: attr_str(o, tags::SERIES_DESCRIPTION),
        content_label: attr_str(o, tags::CONTENT_LABEL),
        content_description: attr_str(o, tags::CONTENT_DESCRIPTION),
        segmentation_type,
        rows,
        columns,
        pixel_spacing,
        segments,
        frames,
        referenced_series,
    })
}

/// Read a SEG onto the grid of `source` (a volume read from the DICOM series the SEG was derived
/// from). Returns one (description, mask) per segment, in Segment Sequence order.
///
/// Frames are placed by their Derivation Image references (SOP Instance UID + frame number);
/// frames without a usable reference fall back to Plane Position matching against the source
/// slice positions. A frame that matches neither is an error ([`SegError::FrameNotInSource`]):
/// a SEG of another series must not be painted silently onto this one.
pub fn read_seg(bytes: &[u8], source: &Volume) -> Result<Vec<(SegmentInfo, Mask)>, SegError> {
    let seg = read_seg_standalone(bytes)?;
    if source.slices.is_empty() {
        return Err(SegError::NoDicomSource);
    }
    if source.slices.len() != source.nz() {
        return Err(SegError::SliceRefMismatch { refs: source.slices.len(), nz: source.nz() });
    }
    if seg.rows != source.ny() || seg.columns != source.nx() {
        return Err(SegError::GridMismatch {
            what: "frame size",
            detail: format!("SEG {}×{}, source {}×{}", seg.rows, seg.columns, source.ny(), source.nx()),
        });
    }
    if let (Some(a), Some(b)) = (&seg.frame_of_reference_uid, &source.frame_of_reference_uid) {
        if a != b {
            return Err(SegError::GridMismatch { what: "FrameOfReferenceUID", detail: format!("SEG {a}, source {b}") });
        }
    }
    if let Some(ps) = seg.pixel_spacing {
        let want = [source.spacing[1], source.spacing[0]];
        if (0..2).any(|a| (ps[a] - want[a]).abs() > 1e-4 * want[a].abs().max(1e-3)) {
            return Err(SegError::GridMismatch {
                what: "PixelSpacing",
                detail: format!("SEG {ps:?}, source {want:?}"),
            });
        }
    }
    let [r, c, _] = source.direction;
    let src_iop = [r[0], r[1], r[2], c[0], c[1], c[2]];

    let mut by_ref: HashMap<(&str, Option<u32>), usize> = HashMap::new();
    for (z, s) in source.slices.iter().enumerate() {
        by_ref.insert((s.sop_instance_uid.as_str(), s.frame_number), z);
    }
    let spacing_max = source.spacing.iter().cloned().fold(0.0f64, f64::max);
    let tolerance = (1e-3 * spacing_max).max(1e-3);

    let n = source.dims.iter().product::<usize>();
    let mut masks: Vec<Mask> = seg.segments.iter().map(|_| Mask { data: vec![0; n], dims: source.dims }).collect();
    let slice_len = source.slice_len();
    for (i, f) in seg.frames.iter().enumerate() {
        if let Some(iop) = f.orientation {
            if iop.iter().zip(src_iop).any(|(a, b)| (a - b).abs() > 1e-4) {
                return Err(SegError::GridMismatch {
                    what: "ImageOrientationPatient",
                    detail: format!("frame {}: SEG {iop:?}, source {src_iop:?}", i + 1),
                });
            }
        }
        let by_reference = f.source_refs.iter().find_map(|r| {
            let uid = r.sop_instance_uid.as_str();
            match r.frame_numbers.first() {
                Some(&fno) => {
                    by_ref.get(&(uid, Some(fno))).or_else(|| (fno == 1).then(|| by_ref.get(&(uid, None))).flatten())
                }
                None => by_ref.get(&(uid, None)),
            }
            .copied()
        });
        let z = match by_reference {
            Some(z) => z,
            None => {
                let by_position = f.position.and_then(|p| {
                    source.slices.iter().position(|s| {
                        let d2: f64 = (0..3).map(|a| (s.position[a] - p[a]).powi(2)).sum();
                        d2.sqrt() <= tolerance
                    })
                });
                match by_position {
                    Some(z) => {
                        if !f.source_refs.is_empty() {
                            log::warn!(
                                "SEG frame {} references instances not in the source series; placed by its position",
                                i + 1
                            );
                        }
                        z
                    }
                    None => {
                        return Err(SegError::FrameNotInSource {
                            frame: i + 1,
                            segment: f.segment_number,
                            references: f.source_refs.iter().map(|r| r.sop_instance_uid.clone()).collect(),
                            position: f.position,
                        })
                    }
                }
            }
        };
        let k = seg.segments.iter().position(|(num, _)| *num == f.segment_number).expect("checked in standalone read");
        let dst = &mut masks[k].data[z * slice_len..(z + 1) * slice_len];
        for (d, &v) in dst.iter_mut().zip(&f.pixels) {
            *d |= v;
        }
    }
    Ok(seg.segments.into_iter().map(|(_, info)| info).zip(masks).collect())
}

/// `len` bits starting at bit `start` (LSB-first packing), one byte (0/1) per pixel.
pub fn unpack_bits(data: &[u8], start: usize, len: usize) -> Vec<u8> {
    (start..start + len).map(|b| (data[b >> 3] >> (b & 7)) & 1).collect()
}

fn parse_segment_info(item: &InMemDicomObject) -> Result<SegmentInfo, SegError> {
    let label = attr_str(item, tags::SEGMENT_LABEL).unwrap_or_default();
    let code = |tag: Tag, what: &str| {
        items(item, tag)
            .first()
            .and_then(|c| parse_code(c))
            .ok_or_else(|| SegError::Invalid(format!("segment {label:?} has no {what}")))
    };
    let category = code(tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE, "Segmented Property Category")?;
    let property_type = code(tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE, "Segmented Property Type")?;
    let algorithm_type_text = attr_str(item, tags::SEGMENT_ALGORITHM_TYPE).unwrap_or_default();
    let algorithm_type = AlgorithmType::from_dicom(&algorithm_type_text)
        .ok_or_else(|| SegError::Invalid(format!("segment {label:?}: SegmentAlgorithmType {algorithm_type_text:?}")))?;
    let cielab = item
        .get(tags::RECOMMENDED_DISPLAY_CIE_LAB_VALUE)
        .and_then(|e| e.to_multi_int::<u16>().ok())
        .filter(|v| v.len() == 3)
        .map(|v| [v[0], v[1], v[2]]);
    Ok(SegmentInfo {
        label,
        description: attr_str(item, tags::SEGMENT_DESCRIPTION),
        category,
        property_type,
        algorithm_type,
        algorithm_name: attr_str(item, tags::SEGMENT_ALGORITHM_NAME),
        cielab,
    })
}

fn parse_code(item: &InMemDicomObject) -> Option<Code> {
    let value = attr_str(item, tags::CODE_VALUE)
        .or_else(|| attr_str(item, tags::LONG_CODE_VALUE))
        .or_else(|| attr_str(item, tags::URN_CODE_VALUE))?;
    let scheme = attr_str(item, tags::CODING_SCHEME_DESIGNATOR).unwrap_or_default();
    let meaning = attr_str(item, tags::CODE_MEANING).unwrap_or_default();
    Some(Code::new(value, scheme, meaning))
}

fn parse_ref(item: &InMemDicomObject) -> Option<SourceRef> {
    Some(SourceRef {
        sop_class_uid: attr_str(item, tags::REFERENCED_SOP_CLASS_UID),
        sop_instance_uid: attr_str(item, tags::REFERENCED_SOP_INSTANCE_UID)?,
        frame_numbers: item
            .get(tags::REFERENCED_FRAME_NUMBER)
            .and_then(|e| e.to_multi_int::<u32>().ok())
            .unwrap_or_default(),
    })
}

/// The first item of functional group `tag`, per-frame first, then shared.
fn fg_item<'a>(
    per_frame: Option<&'a InMemDicomObject>,
    shared: Option<&'a InMemDicomObject>,
    tag: Tag,
) -> Option<&'a InMemDicomObject> {
    per_frame
        .and_then(|p| items(p, tag).first().copied())
        .or_else(|| shared.and_then(|s| items(s, tag).first().copied()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_mid_byte() {
        let data = [0b1000_0001u8, 0b0000_0011];
        assert_eq!(unpack_bits(&data, 7, 3), vec![1, 1, 1]);
        assert_eq!(unpack_bits(&data, 1, 6), vec![0; 6]);
    }

    #[test]
    fn garbage_is_a_parse_error() {
        assert!(matches!(read_seg_standalone(b"hello"), Err(SegError::Parse(_))));
        let mut fake = vec![0u8; 200];
        fake[128..132].copy_from_slice(b"DICM");
        assert!(matches!(read_seg_standalone(&fake), Err(SegError::Parse(_))));
    }
}

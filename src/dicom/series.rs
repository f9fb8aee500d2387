//! Reads DICOM image series (single-frame MR/CT-like images and Enhanced MR multi-frame) into a `Volume`
//! with exact geometry, sorted along the slice normal. Must never panic on bad input nor modify source files.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::attrs::{attr_f64, attr_f64s, attr_int, attr_str, first_item};
use super::error::DicomError;
use crate::volume::{cross, dot, SliceRef, SourceInfo, Volume};

/// A volume read from one series plus the non-fatal findings (uneven spacing, skipped files…).
#[derive(Debug, Clone)]
pub struct LoadedSeries {
    pub volume: Volume,
    pub warnings: Vec<String>,
}

/// One series found among input files.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesGroup {
    pub series_instance_uid: String,
    pub modality: String,
    pub series_description: Option<String>,
    pub series_number: Option<i32>,
    /// SOP classes of its instances (sorted, distinct).
    pub sop_class_uids: Vec<String>,
    /// True when the series holds images this reader turns into a volume (not SEG/SR/PR/RT…).
    pub is_image: bool,
    /// Number of instances (files).
    pub instances: usize,
    /// The files of this series (empty for in-memory input).
    pub files: Vec<PathBuf>,
}

/// Loads the single image series stored under `dir` (searched recursively; files that are clearly not
/// DICOM are skipped with a warning). Several image series → [`DicomError::MultipleSeries`].
pub fn load_series_dir(dir: &Path) -> Result<LoadedSeries, DicomError> {
    let (objects, mut warnings) = read_dir_objects(dir)?;
    let mut loaded = load_objects(objects, None)?;
    warnings.append(&mut loaded.warnings);
    loaded.warnings = warnings;
    Ok(loaded)
}

/// Loads the series `series_instance_uid` from the files under `dir` (for folders holding several).
pub fn load_series_dir_uid(dir: &Path, series_instance_uid: &str) -> Result<LoadedSeries, DicomError> {
    let (objects, mut warnings) = read_dir_objects(dir)?;
    let mut loaded = load_objects(objects, Some(series_instance_uid))?;
    warnings.append(&mut loaded.warnings);
    loaded.warnings = warnings;
    Ok(loaded)
}

/// Loads the single image series made of `paths` (every file must be readable DICOM).
pub fn load_series_files(paths: &[PathBuf]) -> Result<LoadedSeries, DicomError> {
    if paths.is_empty() {
        return Err(DicomError::EmptyInput("no files given".into()));
    }
    let mut objects = Vec::with_capacity(paths.len());
    for p in paths {
        let Some(bytes) = read_if_dicom(p)? else {
            return Err(DicomError::Corrupt {
                file: p.display().to_string(),
                reason: "no DICM magic code: not a DICOM Part-10 file".into(),
            });
        };
        objects.push(parse_bytes(&p.display().to_string(), &bytes, Some(p.clone()))?);
    }
    load_objects(objects, None)
}

/// Loads the single image series made of in-memory Part-10 files (with or without the 128-byte
/// preamble, as Orthanc serves them).
pub fn load_series_bytes(files: &[Vec<u8>]) -> Result<LoadedSeries, DicomError> {
    if files.is_empty() {
        return Err(DicomError::EmptyInput("no DICOM instances given".into()));
    }
    let mut objects = Vec::with_capacity(files.len());
    for (i, b) in files.iter().enumerate() {
        objects.push(parse_bytes(&format!("instance #{}", i + 1), b, None)?);
    }
    load_objects(objects, None)
}

/// Groups files by SeriesInstanceUID (files that cannot be read are an error naming them).
pub fn group_series(paths: &[PathBuf]) -> Result<Vec<SeriesGroup>, DicomError> {
    let mut objects = Vec::with_capacity(paths.len());
    for p in paths {
        let Some(bytes) = read_if_dicom(p)? else {
            return Err(DicomError::Corrupt {
                file: p.display().to_string(),
                reason: "no DICM magic code: not a DICOM Part-10 file".into(),
            });
        };
        objects.push(parse_bytes(&p.display().to_string(), &bytes, Some(p.clone()))?);
    }
    Ok(groups_of(&objects))
}

/// Lists the series stored under `dir` (recursively), image series first.
pub fn list_series_dir(dir: &Path) -> Result<Vec<SeriesGroup>, DicomError> {
    let (objects, _) = read_dir_objects(dir)?;
    Ok(groups_of(&objects))
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// One parsed instance and where it came from.
struct Parsed {
    name: String,
    path: Option<PathBuf>,
    obj: DefaultDicomObject,
}

fn parse_bytes(name: &str, bytes: &[u8], path: Option<PathBuf>) -> Result<Parsed, DicomError> {
    let corrupt = |reason: String| DicomError::Corrupt { file: name.to_string(), reason };
    let preamble = if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        ReadPreamble::Always
    } else if bytes.len() >= 4 && &bytes[0..4] == b"DICM" {
        ReadPreamble::Never
    } else {
        return Err(corrupt("no DICM magic code: not a DICOM Part-10 file".into()));
    };
    let after_magic = if preamble == ReadPreamble::Always { 132 } else { 4 };
    let data_end = match check_element_lengths(bytes, after_magic) {
        Ok(w) => w.data_end,
        Err(WalkError::Limit(reason)) => return Err(DicomError::LimitExceeded { file: name.to_string(), reason }),
        Err(WalkError::Malformed(reason)) => {
            // A transfer syntax we do not know may also be why the walk failed; say so precisely.
            if let Some(uid) = meta_transfer_syntax(bytes, preamble) {
                if TransferSyntaxRegistry.get(&uid).is_none() {
                    return Err(DicomError::UnsupportedTransferSyntax {
                        instance: name.to_string(),
                        uid,
                        name: "unknown to the decoder".into(),
                    });
                }
            }
            return Err(corrupt(reason));
        }
    };
    let bytes = &bytes[..data_end];
    // Unknown transfer syntaxes fail inside the parser; name them precisely.
    let result = catch_unwind(AssertUnwindSafe(|| {
        OpenFileOptions::new().read_preamble(preamble).from_reader(std::io::Cursor::new(bytes))
    }))
    .map_err(|_| corrupt("the DICOM parser panicked".into()))?;
    match result {
        Ok(obj) => Ok(Parsed { name: name.to_string(), path, obj }),
        Err(e) => {
            let msg = e.to_string();
            if let Some(uid) = meta_transfer_syntax(bytes, preamble) {
                if TransferSyntaxRegistry.get(&uid).is_none() || msg.to_lowercase().contains("transfer syntax") {
                    return Err(DicomError::UnsupportedTransferSyntax {
                        instance: name.to_string(),
                        uid,
                        name: "unknown to the decoder".into(),
                    });
                }
            }
            Err(corrupt(full_error_chain(&e)))
        }
    }
}

/// Value representations with a 4-byte length in explicit VR.
const LONG_VRS: [&[u8; 2]; 13] =
    [b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"];

/// All value representations (explicit VR headers must carry one of them).
const ALL_VRS: [&[u8; 2]; 34] = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF", b"OL",
    b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US",
    b"UT", b"UV",
];

/// Reads the file meta group (explicit VR little endian, group 0002) by hand, checking its lengths:
/// returns the transfer syntax UID and where the data set starts.
fn scan_meta(bytes: &[u8], start: usize) -> Result<(String, usize), String> {
    let end = bytes.len();
    let rd16 = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let rd32 = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let mut pos = start;
    // File meta group: explicit VR little endian, group 0002.
    let mut ts = String::new();
    while pos + 8 <= end && rd16(pos) == 0x0002 {
        let elem = rd16(pos + 2);
        let vr = [bytes[pos + 4], bytes[pos + 5]];
        if !ALL_VRS.contains(&&vr) {
            return Err(format!("file meta element (0002,{elem:04X}) has an invalid VR"));
        }
        let (len, hdr) = if LONG_VRS.contains(&&vr) {
            if pos + 12 > end {
                return Err("file meta element header cut short".into());
            }
            (rd32(pos + 8) as usize, 12)
        } else {
            (rd16(pos + 6) as usize, 8)
        };
        if pos + hdr + len > end {
            return Err(format!("file meta element (0002,{elem:04X}) declares {len} bytes past the end"));
        }
        if elem == 0x0010 {
            ts = String::from_utf8_lossy(&bytes[pos + hdr..pos + hdr + len]).trim_end_matches(['\0', ' ']).to_string();
        }
        pos += hdr + len;
    }
    Ok((ts, pos))
}

/// Why the pre-parse walk refused a byte stream: a declared size beyond a limit (docs/limits.md), or
/// a stream that is not well-formed.
#[derive(Debug, Clone, PartialEq)]
enum WalkError {
    Limit(String),
    Malformed(String),
}

/// What the pre-parse walk learnt: where the data set ends and the image size its top level declares.
#[derive(Debug, Default, Clone, Copy)]
struct Walked {
    data_end: usize,
    rows: u64,
    cols: u64,
    frames: u64,
}

/// The pre-parse checks of [`check_element_lengths`] for other readers (the SEG reader): Err(true,
/// reason) when a declared size is beyond a limit, Err(false, reason) when the stream is malformed.
pub(crate) fn precheck_part10(bytes: &[u8], start: usize) -> Result<(), (bool, String)> {
    check_element_lengths(bytes, start).map(|_| ()).map_err(|e| match e {
        WalkError::Limit(r) => (true, r),
        WalkError::Malformed(r) => (false, r),
    })
}

/// Walks the element headers of a Part-10 byte stream and checks that every defined length fits in
/// the container that holds it (file, sequence or item, at every nesting depth). dicom-rs allocates a
/// declared length before reading it, so a corrupt length (up to 4 GiB) would otherwise cost a huge
/// allocation — or abort the process — before failing. A deflated data set is inflated first, at most
/// `max_file_bytes` (docs/limits.md), and walked the same way. Top-level Rows, Columns and Number of
/// Frames are checked against the limits here, before anything is decoded.
/// Returns where the data set ends: the buffer's end, or the start of an all-zero tail (padding that
/// the parser would otherwise choke on).
fn check_element_lengths(bytes: &[u8], start: usize) -> Result<Walked, WalkError> {
    let limits = crate::limits::get();
    let (ts, pos) = scan_meta(bytes, start).map_err(WalkError::Malformed)?;
    let (explicit, be) = match ts.as_str() {
        "1.2.840.10008.1.2" => (false, false),
        "1.2.840.10008.1.2.2" => (true, true),
        "1.2.840.10008.1.2.1.99" => {
            // Deflated: inflate (bounded) and walk the plain data set; the parser inflates it again.
            use std::io::Read;
            let mut inflated = Vec::new();
            let cap = limits.max_file_bytes;
            flate2::read::DeflateDecoder::new(&bytes[pos..])
                .take(cap + 1)
                .read_to_end(&mut inflated)
                .map_err(|e| WalkError::Malformed(format!("the deflated data set does not inflate: {e}")))?;
            if inflated.len() as u64 > cap {
                return Err(WalkError::Limit(format!(
                    "the deflated data set inflates to more than {cap} bytes (limit max_file_bytes, docs/limits.md)"
                )));
            }
            let w = walk_data_set(&inflated, 0, true, false, &limits)?;
            return Ok(Walked { data_end: bytes.len(), ..w });
        }
        "" => return Err(WalkError::Malformed("no transfer syntax in the file meta group".to_string())),
        _ => (true, false),
    };
    walk_data_set(bytes, pos, explicit, be, &limits)
}

/// The walk itself over a plain (not deflated) data set starting at `pos`.
fn walk_data_set(
    bytes: &[u8],
    mut pos: usize,
    explicit: bool,
    be: bool,
    limits: &crate::limits::Limits,
) -> Result<Walked, WalkError> {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
    let end = bytes.len();
    let rd16 = |at: usize| -> u16 {
        let b = [bytes[at], bytes[at + 1]];
        if be {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    };
    let rd32 = |at: usize| -> u32 {
        let b = [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]];
        if be {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    let max_depth = limits.max_nesting as usize;
    // Ends of the open defined-length containers (sequences and items); undefined-length ones
    // end at their delimiter and are recorded as usize::MAX.
    let mut containers: Vec<usize> = Vec::new();
    let mut walked = Walked { data_end: end, rows: 0, cols: 0, frames: 1 };
    let mut in_fragments = false;
    while pos < end {
        while containers.last().is_some_and(|&e| e != usize::MAX && pos >= e) {
            containers.pop();
        }
        let limit = containers.iter().rev().copied().find(|&e| e != usize::MAX).unwrap_or(end);
        // Zero padding after the last element (seen in files from some archives) is the parser's call.
        if containers.is_empty() && bytes[pos..].iter().all(|&b| b == 0) {
            walked.data_end = pos;
            break;
        }
        if pos + 8 > limit {
            return Err(WalkError::Malformed(format!("element header cut short at byte {pos}")));
        }
        let group = rd16(pos);
        let elem = rd16(pos + 2);
        if group == 0xFFFE {
            // Item / item delimiter / sequence delimiter: 4-byte length, never a VR.
            let len = rd32(pos + 4);
            pos += 8;
            match elem {
                0xE0DD => {
                    in_fragments = false;
                    // The undefined-length sequence ends here.
                    if containers.last() == Some(&usize::MAX) {
                        containers.pop();
                    }
                }
                0xE00D if containers.last() == Some(&usize::MAX) => {
                    containers.pop();
                }
                0xE000 if in_fragments => {
                    if len == u32::MAX || pos + len as usize > limit {
                        return Err(WalkError::Malformed(format!(
                            "pixel data fragment at byte {} declares {len} bytes past its end",
                            pos - 8
                        )));
                    }
                    pos += len as usize;
                }
                0xE000 => {
                    if containers.len() >= max_depth {
                        return Err(WalkError::Limit(format!(
                            "sequences nested deeper than {max_depth} levels (limit max_nesting, docs/limits.md)"
                        )));
                    }
                    if len == u32::MAX {
                        containers.push(usize::MAX);
                    } else if pos + len as usize > limit {
                        return Err(WalkError::Malformed(format!(
                            "item at byte {} declares {len} bytes past the end of its container",
                            pos - 8
                        )));
                    } else {
                        containers.push(pos + len as usize);
                    }
                }
                _ => {}
            }
            continue;
        }
        let (len, hdr, vr) = if explicit {
            let vr = [bytes[pos + 4], bytes[pos + 5]];
            if !ALL_VRS.contains(&&vr) {
                return Err(WalkError::Malformed(format!(
                    "element ({group:04X},{elem:04X}) has an invalid VR at byte {pos}"
                )));
            }
            if LONG_VRS.contains(&&vr) {
                if pos + 12 > limit {
                    return Err(WalkError::Malformed(format!("element header cut short at byte {pos}")));
                }
                (rd32(pos + 8), 12, Some(vr))
            } else {
                (rd16(pos + 6) as u32, 8, Some(vr))
            }
        } else {
            (rd32(pos + 4), 8, None)
        };
        let header_at = pos;
        pos += hdr;
        let tag = Tag(group, elem);
        let is_sequence = match vr {
            Some(v) => &v == b"SQ",
            None => dicom_dictionary_std::StandardDataDictionary
                .by_tag(tag)
                .is_some_and(|e| e.vr() == VirtualVr::Exact(dicom_core::VR::SQ)),
        };
        if len == u32::MAX {
            if (group, elem) == (0x7FE0, 0x0010) {
                in_fragments = true;
            } else if vr == Some(*b"UN") {
                return Ok(walked); // implicit-VR content inside explicit VR: leave it to the parser
            } else {
                if containers.len() >= max_depth {
                    return Err(WalkError::Limit(format!(
                        "sequences nested deeper than {max_depth} levels (limit max_nesting, docs/limits.md)"
                    )));
                }
                containers.push(usize::MAX); // walk into its items; it ends at its delimiter
            }
            continue;
        }
        if pos + len as usize > limit {
            return Err(WalkError::Malformed(format!(
                "element ({group:04X},{elem:04X}) at byte {header_at} declares {len} bytes past the end of {}",
                if containers.is_empty() { "the file" } else { "its sequence" }
            )));
        }
        if is_sequence {
            if containers.len() >= max_depth {
                return Err(WalkError::Limit(format!(
                    "sequences nested deeper than {max_depth} levels (limit max_nesting, docs/limits.md)"
                )));
            }
            containers.push(pos + len as usize); // walk into it
            continue;
        }
        if containers.is_empty() && group == 0x0028 {
            let value = &bytes[pos..pos + len as usize];
            match (elem, len) {
                (0x0010, 2) => walked.rows = rd16(pos) as u64,
                (0x0011, 2) => walked.cols = rd16(pos) as u64,
                (0x0008, _) => {
                    walked.frames = String::from_utf8_lossy(value).trim_matches(['\0', ' ']).parse().unwrap_or(1).max(1)
                }
                _ => {}
            }
        }
        pos += len as usize;
    }
    check_image_size(walked.rows, walked.cols, walked.frames, limits).map_err(WalkError::Limit)?;
    Ok(walked)
}

/// Rows × Columns against the per-slice limit, × frames against the per-volume one (overflow-safe).
fn check_image_size(rows: u64, cols: u64, frames: u64, limits: &crate::limits::Limits) -> Result<(), String> {
    let pixels = rows.saturating_mul(cols);
    if pixels > limits.max_slice_pixels {
        return Err(format!(
            "{cols}×{rows} pixels per frame exceed the limit of {} (max_slice_pixels, docs/limits.md)",
            limits.max_slice_pixels
        ));
    }
    if crate::limits::product(&[rows, cols, frames]).is_none_or(|n| n > limits.max_volume_voxels) {
        return Err(format!(
            "{cols}×{rows}×{frames} voxels exceed the limit of {} (max_volume_voxels, docs/limits.md)",
            limits.max_volume_voxels
        ));
    }
    Ok(())
}

/// The error and its sources on one line.
fn full_error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Transfer syntax UID from the file meta group (read alone), if it parses.
fn meta_transfer_syntax(bytes: &[u8], preamble: ReadPreamble) -> Option<String> {
    let start = if preamble == ReadPreamble::Always { 132 } else { 4 };
    scan_meta(bytes, start).ok().map(|(ts, _)| ts).filter(|ts| !ts.is_empty())
}

fn read_dir_objects(dir: &Path) -> Result<(Vec<Parsed>, Vec<String>), DicomError> {
    if !dir.is_dir() {
        return Err(DicomError::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory")));
    }
    let mut files = Vec::new();
    collect_files(dir, 0, &mut files)?;
    files.sort();
    let mut warnings = Vec::new();
    let mut objects = Vec::new();
    for p in files {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with('.') || name.eq_ignore_ascii_case("DICOMDIR") {
            continue;
        }
        // Look at the 132-byte preamble before reading a file whole: a large non-DICOM file
        // beside a series costs nothing.
        let Some(bytes) = read_if_dicom(&p)? else {
            warnings.push(format!("skipped {}: not a DICOM Part-10 file", p.display()));
            continue;
        };
        objects.push(parse_bytes(&p.display().to_string(), &bytes, Some(p.clone()))?);
    }
    if objects.is_empty() {
        return Err(DicomError::EmptyInput(format!("no DICOM files under {}", dir.display())));
    }
    Ok((objects, warnings))
}

/// The bytes of `path` if it starts like a Part-10 file (DICM at 128 or at 0); None otherwise.
/// Files over `max_file_bytes` are an error before they are read.
fn read_if_dicom(path: &Path) -> Result<Option<Vec<u8>>, DicomError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| DicomError::io(path, e))?;
    let mut head = Vec::with_capacity(132);
    (&mut f).take(132).read_to_end(&mut head).map_err(|e| DicomError::io(path, e))?;
    let got = head.len();
    let looks_dicom = (got == 132 && &head[128..132] == b"DICM") || head.starts_with(b"DICM");
    if !looks_dicom {
        return Ok(None);
    }
    let size = f.metadata().map_err(|e| DicomError::io(path, e))?.len();
    let cap = crate::limits::get().max_file_bytes;
    if size > cap {
        return Err(DicomError::LimitExceeded {
            file: path.display().to_string(),
            reason: format!("{size} bytes exceed the limit of {cap} per file (max_file_bytes, docs/limits.md)"),
        });
    }
    let mut bytes = head;
    bytes.reserve(size as usize);
    f.take(cap - got as u64).read_to_end(&mut bytes).map_err(|e| DicomError::io(path, e))?;
    Ok(Some(bytes))
}

/// Every file below `dir`. Directories reached twice (symlink loops, links to a parent) are walked
/// once: each is identified by its device and inode; nesting stops at `max_nesting` levels.
fn collect_files(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), DicomError> {
    let mut seen = std::collections::HashSet::new();
    collect_files_once(dir, depth, out, &mut seen)
}

fn collect_files_once(
    dir: &Path,
    depth: usize,
    out: &mut Vec<PathBuf>,
    seen: &mut std::collections::HashSet<(u64, u64)>,
) -> Result<(), DicomError> {
    use std::os::unix::fs::MetadataExt;
    if depth as u64 > crate::limits::get().max_nesting {
        return Ok(());
    }
    let meta = std::fs::metadata(dir).map_err(|e| DicomError::io(dir, e))?;
    if !seen.insert((meta.dev(), meta.ino())) {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).map_err(|e| DicomError::io(dir, e))? {
        let entry = entry.map_err(|e| DicomError::io(dir, e))?;
        let p = entry.path();
        if p.is_dir() {
            collect_files_once(&p, depth + 1, out, seen)?;
        } else if p.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

/// SOP classes that carry pixel data or references but are not images to segment.
fn is_non_image_sop_class(uid: &str) -> bool {
    const NON_IMAGE_PREFIXES: [&str; 7] = [
        "1.2.840.10008.5.1.4.1.1.66", // raw data, SEG, registration, fiducials, surface segmentation…
        "1.2.840.10008.5.1.4.1.1.88", // structured reports
        "1.2.840.10008.5.1.4.1.1.11", // presentation states
        "1.2.840.10008.5.1.4.1.1.481", // RT objects
        "1.2.840.10008.5.1.4.1.1.104", // encapsulated documents
        "1.2.840.10008.5.1.4.1.1.9",  // waveforms
        "1.2.840.10008.5.1.4.1.1.4.2", // MR spectroscopy
    ];
    NON_IMAGE_PREFIXES.iter().any(|p| uid == *p || uid.starts_with(&format!("{p}.")))
}

fn kind_of_sop_class(uid: &str) -> &'static str {
    if uid.starts_with("1.2.840.10008.5.1.4.1.1.66.4") {
        "segmentation"
    } else if uid.starts_with("1.2.840.10008.5.1.4.1.1.88") {
        "structured report"
    } else if uid.starts_with("1.2.840.10008.5.1.4.1.1.11") {
        "presentation state"
    } else if uid.starts_with("1.2.840.10008.5.1.4.1.1.481") {
        "RT object"
    } else {
        "non-image object"
    }
}

struct ObjSummary {
    series_uid: String,
    sop_class: String,
    is_image: bool,
}

fn summarize(p: &Parsed) -> ObjSummary {
    let o: &InMemDicomObject = &p.obj;
    let sop_class = attr_str(o, tags::SOP_CLASS_UID).unwrap_or_default();
    let has_pixels = o.element_opt(tags::PIXEL_DATA).ok().flatten().is_some()
        || o.element_opt(tags::FLOAT_PIXEL_DATA).ok().flatten().is_some()
        || o.element_opt(tags::DOUBLE_FLOAT_PIXEL_DATA).ok().flatten().is_some();
    // An image SOP class without pixel data is still an image (reported as missing pixel data).
    let is_image = !is_non_image_sop_class(&sop_class)
        && (has_pixels || attr_int(o, tags::ROWS).is_some())
        && !sop_class.is_empty();
    ObjSummary {
        series_uid: attr_str(o, tags::SERIES_INSTANCE_UID).unwrap_or_else(|| "(no SeriesInstanceUID)".into()),
        sop_class,
        is_image,
    }
}

fn groups_of(objects: &[Parsed]) -> Vec<SeriesGroup> {
    let mut map: BTreeMap<String, SeriesGroup> = BTreeMap::new();
    for p in objects {
        let s = summarize(p);
        let o: &InMemDicomObject = &p.obj;
        let g = map.entry(s.series_uid.clone()).or_insert_with(|| SeriesGroup {
            series_instance_uid: s.series_uid.clone(),
            modality: attr_str(o, tags::MODALITY).unwrap_or_default(),
            series_description: attr_str(o, tags::SERIES_DESCRIPTION),
            series_number: attr_int(o, tags::SERIES_NUMBER).map(|v| v as i32),
            sop_class_uids: Vec::new(),
            is_image: false,
            instances: 0,
            files: Vec::new(),
        });
        g.is_image |= s.is_image;
        g.instances += 1;
        if !g.sop_class_uids.contains(&s.sop_class) {
            g.sop_class_uids.push(s.sop_class.clone());
            g.sop_class_uids.sort();
        }
        if let Some(path) = &p.path {
            g.files.push(path.clone());
        }
    }
    let mut v: Vec<SeriesGroup> = map.into_values().collect();
    v.sort_by_key(|g| !g.is_image);
    v
}

// ---------------------------------------------------------------------------------------------
// Assembly

/// Geometry and value transform of one frame (a single-frame instance or one frame of a multi-frame).
#[derive(Debug, Clone)]
struct Frame {
    obj: usize,
    /// 0-based frame index inside its instance.
    index: u32,
    multi_frame: bool,
    sop_class: String,
    sop_uid: String,
    ipp: [f64; 3],
    row: [f64; 3],
    col: [f64; 3],
    /// [row spacing (between rows), column spacing (between columns)]
    pixel_spacing: [f64; 2],
    rows: usize,
    cols: usize,
    slope: f64,
    intercept: f64,
    thickness: Option<f64>,
    between: Option<f64>,
}

fn load_objects(objects: Vec<Parsed>, want_series: Option<&str>) -> Result<LoadedSeries, DicomError> {
    if objects.is_empty() {
        return Err(DicomError::EmptyInput("no DICOM instances".into()));
    }
    let summaries: Vec<ObjSummary> = objects.iter().map(summarize).collect();
    let mut image_series: Vec<String> = Vec::new();
    for s in summaries.iter().filter(|s| s.is_image) {
        if !image_series.contains(&s.series_uid) {
            image_series.push(s.series_uid.clone());
        }
    }
    let chosen = match want_series {
        Some(uid) => {
            if !image_series.iter().any(|s| s == uid) {
                return Err(DicomError::NoImages(format!("no image series with SeriesInstanceUID {uid}")));
            }
            uid.to_string()
        }
        None => match image_series.len() {
            0 => {
                let mut kinds: Vec<String> = summaries
                    .iter()
                    .map(|s| format!("{} ({})", kind_of_sop_class(&s.sop_class), s.sop_class))
                    .collect();
                kinds.sort();
                kinds.dedup();
                return Err(DicomError::NoImages(format!("only {}", kinds.join(", "))));
            }
            1 => image_series[0].clone(),
            _ => {
                let names = image_series
                    .iter()
                    .map(|uid| {
                        let o = objects.iter().zip(&summaries).find(|(_, s)| &s.series_uid == uid).map(|(p, _)| p);
                        let d = o.and_then(|p| attr_str(&p.obj, tags::SERIES_DESCRIPTION));
                        match d {
                            Some(d) => format!("{uid} \"{d}\""),
                            None => uid.clone(),
                        }
                    })
                    .collect();
                return Err(DicomError::MultipleSeries { series: names });
            }
        },
    };
    let mut warnings = Vec::new();
    let skipped = summaries.iter().filter(|s| s.series_uid != chosen || !s.is_image).count();
    if skipped > 0 {
        warnings.push(format!("ignored {skipped} instance(s) of other series or non-image objects"));
    }
    let objects: Vec<Parsed> = objects
        .into_iter()
        .zip(summaries)
        .filter(|(_, s)| s.series_uid == chosen && s.is_image)
        .map(|(p, _)| p)
        .collect();

    // Frames with their geometry.
    let mut frames = Vec::new();
    for (i, p) in objects.iter().enumerate() {
        frames.extend(frames_of(i, p)?);
    }
    let first = frames[0].clone();
    let normal = unit(cross(first.row, first.col));
    if !(normal.iter().all(|v| v.is_finite())) || dot(first.row, first.col).abs() > 1e-3 {
        return Err(DicomError::MissingAttribute {
            instance: first.sop_uid.clone(),
            attribute: "ImageOrientationPatient (not two orthogonal unit vectors)".into(),
        });
    }
    for f in &frames {
        check_consistent(&first, f, normal)?;
    }
    // Sort along the normal; duplicates and in-plane shifts are errors.
    let mut order: Vec<(f64, usize)> = frames.iter().enumerate().map(|(i, f)| (dot(f.ipp, normal), i)).collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    let frames: Vec<Frame> = order.iter().map(|&(_, i)| frames[i].clone()).collect();
    let dists: Vec<f64> = order.iter().map(|&(d, _)| d).collect();
    let tol_inplane = 0.05 * first.pixel_spacing[0].min(first.pixel_spacing[1]).max(1e-3);
    for (k, f) in frames.iter().enumerate() {
        let d = [f.ipp[0] - frames[0].ipp[0], f.ipp[1] - frames[0].ipp[1], f.ipp[2] - frames[0].ipp[2]];
        let along = dists[k] - dists[0];
        let off = [d[0] - along * normal[0], d[1] - along * normal[1], d[2] - along * normal[2]];
        let off_len = dot(off, off).sqrt();
        if off_len > tol_inplane.max(1e-2) {
            return Err(DicomError::NonParallelSlices { instance: frame_name(f) });
        }
        if k > 0 && (dists[k] - dists[k - 1]).abs() < 1e-3 {
            return Err(DicomError::DuplicatePosition {
                first: frame_name(&frames[k - 1]),
                second: frame_name(f),
                position_mm: dists[k],
            });
        }
    }
    let dz = if frames.len() == 1 {
        let s = first.between.filter(|v| *v > 0.0).or(first.thickness.filter(|v| *v > 0.0));
        if s.is_none() {
            warnings
                .push("single slice without SpacingBetweenSlices or SliceThickness: slice spacing set to 1 mm".into());
        }
        s.unwrap_or(1.0)
    } else {
        let mut gaps: Vec<f64> = dists.windows(2).map(|w| w[1] - w[0]).collect();
        let (min, max) = gaps.iter().fold((f64::INFINITY, 0.0f64), |(a, b), &g| (a.min(g), b.max(g)));
        gaps.sort_by(|a, b| a.total_cmp(b));
        let median = gaps[gaps.len() / 2];
        if max - min > (0.01 * median).max(1e-3) {
            warnings.push(format!(
                "uneven slice spacing ({min:.4}..{max:.4} mm); using the median {median:.4} mm, positions of individual slices are kept in the slice references"
            ));
        }
        median
    };

    // Pixels.
    let (rows, cols) = (first.rows, first.cols);
    let n = rows * cols;
    // A corrupt or hostile size must be an error, not an allocation that aborts the process.
    let limits = crate::limits::get();
    if (n as u64).saturating_mul(frames.len() as u64) > limits.max_volume_voxels {
        return Err(DicomError::LimitExceeded {
            file: frame_name(&first),
            reason: format!(
                "the series has {} voxels, above the limit of {} (max_volume_voxels, docs/limits.md)",
                (n as u64).saturating_mul(frames.len() as u64),
                limits.max_volume_voxels
            ),
        });
    }
    let mut voxels = vec![0f32; n * frames.len()];
    // Decode each instance once and scatter its frames to their sorted positions.
    let mut slots: Vec<Vec<(usize, &Frame)>> = vec![Vec::new(); objects.len()];
    for (z, f) in frames.iter().enumerate() {
        slots[f.obj].push((z, f));
    }
    let mut photometric: Option<bool> = None;
    for (obj, targets) in slots.iter().enumerate() {
        if targets.is_empty() {
            continue;
        }
        let (raw, mono1) = decode_object(&objects[obj], rows, cols)?;
        match &photometric {
            None => photometric = Some(mono1),
            Some(m) if *m != mono1 => {
                return Err(DicomError::UnsupportedPhotometric {
                    instance: frame_name(targets[0].1),
                    value: "MONOCHROME1 and MONOCHROME2 mixed in one series".into(),
                });
            }
            Some(_) => {}
        }
        for &(z, f) in targets {
            let start = f.index as usize * n;
            if raw.len() < start + n {
                return Err(DicomError::Decode {
                    instance: frame_name(f),
                    reason: format!("decoded {} values, frame needs {}", raw.len(), start + n),
                });
            }
            for (dst, &src) in voxels[z * n..(z + 1) * n].iter_mut().zip(&raw[start..start + n]) {
                *dst = (src * f.slope + f.intercept) as f32;
            }
        }
    }
    let monochrome1 = photometric == Some(true);
    if monochrome1 {
        let (lo, hi) = voxels.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        for v in &mut voxels {
            *v = lo + hi - *v;
        }
        warnings.push(
            "MONOCHROME1 image: intensities inverted (min + max − value) so that bright means high signal".into(),
        );
    }

    let o0: &InMemDicomObject = &objects[0].obj;
    let slices = frames
        .iter()
        .map(|f| SliceRef {
            sop_class_uid: f.sop_class.clone(),
            sop_instance_uid: f.sop_uid.clone(),
            frame_number: if f.multi_frame { Some(f.index + 1) } else { None },
            position: f.ipp,
        })
        .collect();
    let mut volume = Volume::new(
        voxels,
        [frames.len(), rows, cols],
        [first.pixel_spacing[1], first.pixel_spacing[0], dz],
        frames[0].ipp,
    );
    volume.direction = [first.row, first.col, normal];
    volume.slices = slices;
    volume.frame_of_reference_uid = attr_str(o0, tags::FRAME_OF_REFERENCE_UID);
    if volume.frame_of_reference_uid.is_none() {
        warnings.push("no FrameOfReferenceUID: derived objects cannot be registered to this series".into());
    }
    volume.source = Some(source_info(o0, &chosen, first.thickness));
    Ok(LoadedSeries { volume, warnings })
}

fn frame_name(f: &Frame) -> String {
    if f.multi_frame {
        format!("instance {} frame {}", f.sop_uid, f.index + 1)
    } else {
        format!("instance {}", f.sop_uid)
    }
}

fn unit(v: [f64; 3]) -> [f64; 3] {
    let n = dot(v, v).sqrt();
    [v[0] / n, v[1] / n, v[2] / n]
}

fn check_consistent(first: &Frame, f: &Frame, normal: [f64; 3]) -> Result<(), DicomError> {
    let name = frame_name(f);
    if f.rows != first.rows || f.cols != first.cols {
        return Err(DicomError::InconsistentGeometry {
            instance: name,
            what: "Rows/Columns".into(),
            found: format!("{}x{}", f.rows, f.cols),
            expected: format!("{}x{}", first.rows, first.cols),
        });
    }
    let ps_close = |a: f64, b: f64| (a - b).abs() <= 1e-3 * a.abs().max(b.abs()).max(1e-3);
    if !(ps_close(f.pixel_spacing[0], first.pixel_spacing[0]) && ps_close(f.pixel_spacing[1], first.pixel_spacing[1])) {
        return Err(DicomError::InconsistentGeometry {
            instance: name,
            what: "PixelSpacing".into(),
            found: format!("{:?}", f.pixel_spacing),
            expected: format!("{:?}", first.pixel_spacing),
        });
    }
    const COS_TOL: f64 = 1e-3; // ≈ 0.05°
    if dot(f.row, first.row) >= 1.0 - COS_TOL && dot(f.col, first.col) >= 1.0 - COS_TOL {
        return Ok(());
    }
    let n = unit(cross(f.row, f.col));
    let normal_cos = dot(n, normal).abs();
    // Clearly different planes (localizers, a sagittal among axials) or the same plane turned in-plane
    // are mixed orientations; a stack whose planes are slightly tilted against each other is non-parallel.
    if normal_cos >= 1.0 - COS_TOL || normal_cos < (10f64).to_radians().cos() {
        Err(DicomError::MixedOrientation { instance: name })
    } else {
        Err(DicomError::NonParallelSlices { instance: name })
    }
}

fn vec3(v: &[f64]) -> [f64; 3] {
    [v[0], v[1], v[2]]
}

/// Geometry of every frame of one instance.
fn frames_of(obj_idx: usize, p: &Parsed) -> Result<Vec<Frame>, DicomError> {
    let o: &InMemDicomObject = &p.obj;
    let sop_uid = attr_str(o, tags::SOP_INSTANCE_UID).unwrap_or_else(|| p.name.clone());
    let sop_class = attr_str(o, tags::SOP_CLASS_UID).unwrap_or_default();
    let missing =
        |attribute: &str| DicomError::MissingAttribute { instance: sop_uid.clone(), attribute: attribute.into() };
    if o.element_opt(tags::PIXEL_DATA).ok().flatten().is_none() {
        return Err(DicomError::MissingPixelData { instance: sop_uid.clone() });
    }
    let rows = attr_int(o, tags::ROWS).filter(|v| *v > 0).ok_or_else(|| missing("Rows"))? as usize;
    let cols = attr_int(o, tags::COLUMNS).filter(|v| *v > 0).ok_or_else(|| missing("Columns"))? as usize;
    let n_frames = attr_int(o, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1) as usize;
    check_image_size(rows as u64, cols as u64, n_frames as u64, &crate::limits::get())
        .map_err(|reason| DicomError::LimitExceeded { file: sop_uid.clone(), reason })?;
    let per_frame = o.element_opt(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).ok().flatten().and_then(|e| e.items());
    let shared = first_item(o, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE);
    let multi = per_frame.is_some() || shared.is_some() || n_frames > 1;
    if !multi {
        let iop = attr_f64s(o, tags::IMAGE_ORIENTATION_PATIENT)
            .filter(|v| v.len() == 6)
            .ok_or_else(|| missing("ImageOrientationPatient"))?;
        let ipp = attr_f64s(o, tags::IMAGE_POSITION_PATIENT)
            .filter(|v| v.len() == 3)
            .ok_or_else(|| missing("ImagePositionPatient"))?;
        let ps = attr_f64s(o, tags::PIXEL_SPACING)
            .filter(|v| v.len() == 2 && v[0] > 0.0 && v[1] > 0.0)
            .ok_or_else(|| missing("PixelSpacing"))?;
        return Ok(vec![Frame {
            obj: obj_idx,
            index: 0,
            multi_frame: false,
            sop_class,
            sop_uid: sop_uid.clone(),
            ipp: vec3(&ipp),
            row: unit(vec3(&iop[0..3])),
            col: unit(vec3(&iop[3..6])),
            pixel_spacing: [ps[0], ps[1]],
            rows,
            cols,
            slope: attr_f64(o, tags::RESCALE_SLOPE).filter(|s| *s != 0.0).unwrap_or(1.0),
            intercept: attr_f64(o, tags::RESCALE_INTERCEPT).unwrap_or(0.0),
            thickness: attr_f64(o, tags::SLICE_THICKNESS),
            between: attr_f64(o, tags::SPACING_BETWEEN_SLICES),
        }]);
    }
    // Multi-frame: functional groups, per-frame item first, then shared.
    let per_frame = per_frame.ok_or_else(|| missing("PerFrameFunctionalGroupsSequence"))?;
    if per_frame.len() != n_frames {
        return Err(DicomError::MissingAttribute {
            instance: sop_uid.clone(),
            attribute: format!("PerFrameFunctionalGroupsSequence ({} items for {} frames)", per_frame.len(), n_frames),
        });
    }
    let lookup = |item: &InMemDicomObject, seq: Tag, tag: Tag| -> Option<Vec<f64>> {
        first_item(item, seq).and_then(|m| attr_f64s(m, tag))
    };
    let mut out = Vec::with_capacity(n_frames);
    for (k, item) in per_frame.iter().enumerate() {
        let get = |seq: Tag, tag: Tag| lookup(item, seq, tag).or_else(|| shared.and_then(|s| lookup(s, seq, tag)));
        let frame_missing = |attribute: &str| DicomError::MissingAttribute {
            instance: format!("{} frame {}", sop_uid, k + 1),
            attribute: attribute.into(),
        };
        let ipp = get(tags::PLANE_POSITION_SEQUENCE, tags::IMAGE_POSITION_PATIENT)
            .filter(|v| v.len() == 3)
            .ok_or_else(|| frame_missing("PlanePositionSequence/ImagePositionPatient"))?;
        let iop = get(tags::PLANE_ORIENTATION_SEQUENCE, tags::IMAGE_ORIENTATION_PATIENT)
            .filter(|v| v.len() == 6)
            .ok_or_else(|| frame_missing("PlaneOrientationSequence/ImageOrientationPatient"))?;
        let ps = get(tags::PIXEL_MEASURES_SEQUENCE, tags::PIXEL_SPACING)
            .filter(|v| v.len() == 2 && v[0] > 0.0 && v[1] > 0.0)
            .ok_or_else(|| frame_missing("PixelMeasuresSequence/PixelSpacing"))?;
        let slope = get(tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE, tags::RESCALE_SLOPE)
            .map(|v| v[0])
            .or_else(|| attr_f64(o, tags::RESCALE_SLOPE))
            .filter(|s| *s != 0.0)
            .unwrap_or(1.0);
        let intercept = get(tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE, tags::RESCALE_INTERCEPT)
            .map(|v| v[0])
            .or_else(|| attr_f64(o, tags::RESCALE_INTERCEPT))
            .unwrap_or(0.0);
        out.push(Frame {
            obj: obj_idx,
            index: k as u32,
            multi_frame: true,
            sop_class: sop_class.clone(),
            sop_uid: sop_uid.clone(),
            ipp: vec3(&ipp),
            row: unit(vec3(&iop[0..3])),
            col: unit(vec3(&iop[3..6])),
            pixel_spacing: [ps[0], ps[1]],
            rows,
            cols,
            slope,
            intercept,
            thickness: get(tags::PIXEL_MEASURES_SEQUENCE, tags::SLICE_THICKNESS).map(|v| v[0]),
            between: get(tags::PIXEL_MEASURES_SEQUENCE, tags::SPACING_BETWEEN_SLICES).map(|v| v[0]),
        });
    }
    Ok(out)
}

/// Decodes all frames of an instance to stored values (before rescale) as f64; also reports
/// MONOCHROME1.
fn decode_object(p: &Parsed, rows: usize, cols: usize) -> Result<(Vec<f64>, bool), DicomError> {
    let o: &InMemDicomObject = &p.obj;
    let instance = attr_str(o, tags::SOP_INSTANCE_UID).unwrap_or_else(|| p.name.clone());
    let photometric = attr_str(o, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default();
    let mono1 = match photometric.as_str() {
        "MONOCHROME2" => false,
        "MONOCHROME1" => true,
        other => {
            return Err(DicomError::UnsupportedPhotometric {
                instance,
                value: if other.is_empty() { "(missing)".into() } else { other.into() },
            })
        }
    };
    let samples = attr_int(o, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    let bits_allocated = attr_int(o, tags::BITS_ALLOCATED).unwrap_or(0);
    let bits_stored = attr_int(o, tags::BITS_STORED).unwrap_or(bits_allocated);
    let signed = attr_int(o, tags::PIXEL_REPRESENTATION).unwrap_or(0) == 1;
    if samples != 1 || !(bits_allocated == 8 || bits_allocated == 16) || bits_stored < 1 || bits_stored > bits_allocated
    {
        return Err(DicomError::UnsupportedPixelFormat {
            instance,
            detail: format!("SamplesPerPixel {samples}, BitsAllocated {bits_allocated}, BitsStored {bits_stored} (1 sample of 8 or 16 bits expected)"),
        });
    }
    let ts_uid = p.obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']).to_string();
    match TransferSyntaxRegistry.get(&ts_uid) {
        None => {
            return Err(DicomError::UnsupportedTransferSyntax { instance, uid: ts_uid, name: "unknown".into() });
        }
        Some(ts) if ts.is_unsupported_pixel_encapsulation() || !ts.can_decode_all() => {
            return Err(DicomError::UnsupportedTransferSyntax {
                instance,
                uid: ts_uid,
                name: format!("{}: no decoder built in", ts.name()),
            });
        }
        Some(_) if ts_uid == "1.2.840.10008.1.2.4.51" && bits_stored > 8 => {
            // The baseline JPEG decoder has no 12-bit (extended) sample precision.
            return Err(DicomError::UnsupportedTransferSyntax {
                instance,
                uid: ts_uid,
                name: format!("JPEG Extended with {bits_stored}-bit samples: no 12-bit JPEG decoder built in"),
            });
        }
        Some(_) => {}
    }
    let decoded = catch_unwind(AssertUnwindSafe(|| p.obj.decode_pixel_data().map(|d| d.to_owned())))
        .map_err(|_| DicomError::Decode { instance: instance.clone(), reason: "the pixel decoder panicked".into() })?
        .map_err(|e| DicomError::Decode { instance: instance.clone(), reason: full_error_chain(&e) })?;
    let data = decoded.data();
    let n_frames = decoded.number_of_frames().max(1) as usize;
    let count = rows * cols * n_frames;
    let bytes_per = (bits_allocated / 8) as usize;
    if data.len() < count * bytes_per {
        return Err(DicomError::Decode {
            instance,
            reason: format!("{} bytes of pixel data for {} frame(s) of {}x{}", data.len(), n_frames, cols, rows),
        });
    }
    let shift = (bits_allocated - bits_stored) as u32;
    let mut out = Vec::with_capacity(count);
    if bits_allocated == 16 {
        for c in data[..count * 2].chunks_exact(2) {
            let raw = u16::from_le_bytes([c[0], c[1]]);
            // Keep only the stored bits; sign-extend from the stored high bit when signed.
            let v = if signed { (((raw << shift) as i16) >> shift) as f64 } else { ((raw << shift) >> shift) as f64 };
            out.push(v);
        }
    } else {
        for &b in &data[..count] {
            let v = if signed { (((b << shift) as i8) >> shift) as f64 } else { ((b << shift) >> shift) as f64 };
            out.push(v);
        }
    }
    Ok((out, mono1))
}

fn source_info(o: &InMemDicomObject, series_uid: &str, thickness: Option<f64>) -> SourceInfo {
    SourceInfo {
        patient_name: attr_str(o, tags::PATIENT_NAME),
        patient_id: attr_str(o, tags::PATIENT_ID),
        patient_birth_date: attr_str(o, tags::PATIENT_BIRTH_DATE),
        patient_sex: attr_str(o, tags::PATIENT_SEX),
        patient_age: attr_str(o, tags::PATIENT_AGE),
        study_instance_uid: attr_str(o, tags::STUDY_INSTANCE_UID).unwrap_or_default(),
        study_date: attr_str(o, tags::STUDY_DATE),
        study_time: attr_str(o, tags::STUDY_TIME),
        study_id: attr_str(o, tags::STUDY_ID),
        accession_number: attr_str(o, tags::ACCESSION_NUMBER),
        referring_physician_name: attr_str(o, tags::REFERRING_PHYSICIAN_NAME),
        study_description: attr_str(o, tags::STUDY_DESCRIPTION),
        series_instance_uid: series_uid.to_string(),
        series_number: attr_int(o, tags::SERIES_NUMBER).map(|v| v as i32),
        series_description: attr_str(o, tags::SERIES_DESCRIPTION),
        protocol_name: attr_str(o, tags::PROTOCOL_NAME),
        modality: attr_str(o, tags::MODALITY).unwrap_or_default(),
        manufacturer: attr_str(o, tags::MANUFACTURER),
        manufacturer_model_name: attr_str(o, tags::MANUFACTURER_MODEL_NAME),
        institution_name: attr_str(o, tags::INSTITUTION_NAME),
        magnetic_field_strength: attr_f64(o, tags::MAGNETIC_FIELD_STRENGTH),
        body_part_examined: attr_str(o, tags::BODY_PART_EXAMINED),
        slice_thickness: thickness.or_else(|| attr_f64(o, tags::SLICE_THICKNESS)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dicom::mr_write::{encode_mr_series, MrSeriesAttributes};

    #[test]
    fn round_trip_through_our_writer_keeps_geometry_and_values() {
        let vals: Vec<f32> = (0..4 * 3 * 5).map(|i| (i * 37 % 101) as f32).collect();
        let mut v = Volume::new(vals.clone(), [4, 3, 5], [0.7, 0.9, 2.5], [10.0, -20.0, 5.0]);
        let t = 0.4f64;
        v.direction = [[t.cos(), t.sin(), 0.0], [-t.sin(), t.cos(), 0.0], [0.0, 0.0, 1.0]];
        let enc = encode_mr_series(&v, &MrSeriesAttributes::default()).unwrap();
        let mut files = enc.files.clone();
        files.reverse();
        let got = load_series_bytes(&files).unwrap();
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
        let g = &got.volume;
        assert_eq!(g.dims, v.dims);
        assert_eq!(g.voxels, vals);
        assert_eq!(g.slices, enc.volume.slices);
        for i in 0..3 {
            assert!((g.spacing[i] - v.spacing[i]).abs() < 1e-6);
            assert!((g.origin[i] - v.origin[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn zero_padding_after_the_data_set_is_tolerated_but_overlong_lengths_are_not() {
        let v = Volume::new((0..2 * 4 * 4).map(|i| i as f32).collect(), [2, 4, 4], [1.0, 1.0, 2.0], [0.0; 3]);
        let enc = encode_mr_series(&v, &MrSeriesAttributes::default()).unwrap();
        let mut padded = enc.files.clone();
        padded[0].extend_from_slice(&[0u8; 6]);
        assert_eq!(check_element_lengths(&padded[0], 132).map(|w| w.data_end), Ok(enc.files[0].len()));
        let got = load_series_bytes(&padded).unwrap();
        assert_eq!(got.volume.voxels, v.voxels);
        // Cut the pixel data short: its declared length now runs past the end.
        let mut cut = enc.files[1].clone();
        cut.truncate(cut.len() - 2);
        let WalkError::Malformed(err) = check_element_lengths(&cut, 132).unwrap_err() else {
            panic!("not a malformed-stream error")
        };
        assert!(err.contains("(7FE0,0010)"), "{err}");
    }

    #[test]
    fn garbage_bytes_are_a_corrupt_error() {
        let r = load_series_bytes(&[b"hello".to_vec()]);
        assert!(matches!(r, Err(DicomError::Corrupt { .. })), "{r:?}");
        let mut b = vec![0u8; 128];
        b.extend_from_slice(b"DICM\x02\x00\x00\x00garbage");
        let r = load_series_bytes(&[b]);
        assert!(matches!(r, Err(DicomError::Corrupt { .. })), "{r:?}");
        assert!(matches!(load_series_bytes(&[]), Err(DicomError::EmptyInput(_))));
    }
}

//! DICOM attribute access for our readers and writers: trimmed values read from a data set (None when
//! absent or unparsable), element writers with value-representation hygiene, the Patient/Study modules.

use dicom_core::value::{DataSetSequence, PrimitiveValue, C};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::volume::SourceInfo;

// ---- reading ----

/// A string value without padding (spaces, NUL); None when absent, empty or not text.
pub fn attr_str(o: &InMemDicomObject, tag: Tag) -> Option<String> {
    let e = o.element_opt(tag).ok()??;
    let s = e.to_str().ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c.is_whitespace()).to_string();
    (!s.is_empty()).then_some(s)
}

/// All numeric values; None when absent, empty, unparsable or not finite.
pub fn attr_f64s(o: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    let e = o.element_opt(tag).ok()??;
    let v = e.to_multi_float64().ok()?;
    (!v.is_empty() && v.iter().all(|x| x.is_finite())).then_some(v)
}

pub fn attr_f64(o: &InMemDicomObject, tag: Tag) -> Option<f64> {
    attr_f64s(o, tag).map(|v| v[0])
}

pub fn attr_int(o: &InMemDicomObject, tag: Tag) -> Option<i64> {
    o.element_opt(tag).ok()??.to_int::<i64>().ok()
}

pub fn attr_uint(o: &InMemDicomObject, tag: Tag) -> Option<u64> {
    o.element_opt(tag).ok()??.to_int::<u64>().ok()
}

/// The items of a sequence (empty when absent or not a sequence).
pub fn items(o: &InMemDicomObject, tag: Tag) -> Vec<&InMemDicomObject> {
    o.element_opt(tag).ok().flatten().and_then(|e| e.items()).map(|i| i.iter().collect()).unwrap_or_default()
}

pub fn first_item(o: &InMemDicomObject, tag: Tag) -> Option<&InMemDicomObject> {
    o.element_opt(tag).ok()??.items()?.first()
}

// ---- writing ----

pub fn put_str(o: &mut InMemDicomObject, tag: Tag, vr: VR, s: &str) {
    o.put(DataElement::new(tag, vr, PrimitiveValue::from(s)));
}

pub fn put_strs(o: &mut InMemDicomObject, tag: Tag, vr: VR, v: Vec<String>) {
    o.put(DataElement::new(tag, vr, PrimitiveValue::Strs(C::from_vec(v))));
}

pub fn put_empty(o: &mut InMemDicomObject, tag: Tag, vr: VR) {
    o.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
}

/// A type-2 attribute: the value when present and non-empty, else an empty element.
pub fn put_opt(o: &mut InMemDicomObject, tag: Tag, vr: VR, v: Option<&str>, max_len: usize) {
    match v.map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => put_str(o, tag, vr, &clean_lo(s, max_len)),
        None => put_empty(o, tag, vr),
    }
}

pub fn put_u16(o: &mut InMemDicomObject, tag: Tag, v: &[u16]) {
    o.put(DataElement::new(tag, VR::US, PrimitiveValue::U16(C::from_vec(v.to_vec()))));
}

pub fn put_seq(o: &mut InMemDicomObject, tag: Tag, items: Vec<InMemDicomObject>) {
    o.put(DataElement::new(tag, VR::SQ, DataSetSequence::from(items)));
}

/// Patient, General Study and Patient Study modules copied from the source series.
pub fn put_patient_study(o: &mut InMemDicomObject, info: &SourceInfo) {
    put_opt(o, tags::PATIENT_NAME, VR::PN, info.patient_name.as_deref(), 64 * 5);
    // PatientID is copied as it is, even beyond LO's 64 characters: archives (Orthanc) file a SEG
    // under the patient whose ID matches byte for byte, so a shortened ID would land it elsewhere.
    match info.patient_id.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(id) => put_str(o, tags::PATIENT_ID, VR::LO, id),
        None => put_empty(o, tags::PATIENT_ID, VR::LO),
    }
    put_opt(o, tags::PATIENT_BIRTH_DATE, VR::DA, info.patient_birth_date.as_deref(), 8);
    // Enumerated values only (M, F, O); anything else is written as unknown (empty).
    let sex = info.patient_sex.as_deref().map(str::trim).filter(|s| matches!(*s, "M" | "F" | "O"));
    put_opt(o, tags::PATIENT_SEX, VR::CS, sex, 16);
    if let Some(age) = info.patient_age.as_deref().map(str::trim).filter(|s| is_age_string(s)) {
        put_str(o, tags::PATIENT_AGE, VR::AS, age);
    }
    put_str(o, tags::STUDY_INSTANCE_UID, VR::UI, &info.study_instance_uid);
    put_opt(o, tags::STUDY_DATE, VR::DA, info.study_date.as_deref(), 8);
    put_opt(o, tags::STUDY_TIME, VR::TM, info.study_time.as_deref(), 16);
    put_opt(o, tags::STUDY_ID, VR::SH, info.study_id.as_deref(), 16);
    put_opt(o, tags::ACCESSION_NUMBER, VR::SH, info.accession_number.as_deref(), 16);
    put_opt(o, tags::REFERRING_PHYSICIAN_NAME, VR::PN, info.referring_physician_name.as_deref(), 64 * 5);
    if let Some(d) = info.study_description.as_deref().filter(|s| !s.is_empty()) {
        put_str(o, tags::STUDY_DESCRIPTION, VR::LO, &clean_lo(d, 64));
    }
}

/// AS: three digits and D, W, M or Y (e.g. `065Y`).
pub fn is_age_string(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 4 && b[..3].iter().all(u8::is_ascii_digit) && matches!(b[3], b'D' | b'W' | b'M' | b'Y')
}

pub fn nonempty<'a>(s: &'a str, fallback: &'a str) -> &'a str {
    if s.trim().is_empty() {
        fallback
    } else {
        s
    }
}

pub fn truncate_chars(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// LO/SH-safe text: no backslash (value delimiter) or control characters, at most `max` characters.
pub fn clean_lo(s: &str, max: usize) -> String {
    let t: String = s.trim().chars().map(|c| if c == '\\' || c.is_control() { ' ' } else { c }).collect();
    truncate_chars(&t, max)
}

/// ST-safe text: backslash allowed, control characters other than CR/LF/TAB removed.
pub fn clean_text(s: &str, max: usize) -> String {
    let t: String = s.chars().filter(|c| !c.is_control() || matches!(c, '\n' | '\r' | '\t')).collect();
    truncate_chars(&t, max)
}

/// CS-safe text: upper-case letters, digits, space and underscore, at most 16 characters.
pub fn clean_cs(s: &str) -> String {
    let t: String = s
        .trim()
        .to_ascii_uppercase()
        .chars()
        .map(|c| if c.is_ascii_uppercase() || c.is_ascii_digit() || c == ' ' || c == '_' { c } else { '_' })
        .collect();
    truncate_chars(&t, 16)
}

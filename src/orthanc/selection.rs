//! Which series the plugin segments: hard loop-prevention rules (MR only, never SEG/SR/PR/KO or our
//! own output) and the configurable series rules. Pure functions over Orthanc's JSON; no SDK calls.

use super::config::CompiledFilter;
use serde_json::Value;

/// SOP classes that are never image input (derived objects, reports, presentation states).
const NON_IMAGE_SOP_CLASS_PREFIXES: &[&str] = &[
    "1.2.840.10008.5.1.4.1.1.66",   // Segmentation, surface segmentation, labelmap
    "1.2.840.10008.5.1.4.1.1.88.",  // Structured reports
    "1.2.840.10008.5.1.4.1.1.11.",  // Presentation states
    "1.2.840.10008.5.1.4.1.1.481.", // RT objects
];
const NON_IMAGE_MODALITIES: &[&str] = &["SEG", "SR", "PR", "KO", "RTSTRUCT", "REG", "DOC"];

/// The manufacturer written into every object the plugin stores.
pub const OUR_MANUFACTURER: &str = "desam";

/// Everything the rules look at, gathered from the series and its first instance.
#[derive(Debug, Clone, Default)]
pub struct SeriesFacts {
    pub modality: String,
    pub manufacturer: String,
    pub series_description: String,
    pub protocol_name: String,
    pub scanning_sequence: Option<String>,
    pub sop_class_uid: String,
    /// Core metadata "Origin" of the first instance ("Plugins" for what a plugin stored).
    pub origin: String,
    pub orientation: Option<[f64; 6]>,
    pub instance_count: usize,
    pub frames_per_instance: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Accept,
    Skip(String),
}

fn text(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or("").trim().to_string()
}

/// Parses a DICOM multi-valued DS string "a\b\c..." into numbers.
fn parse_ds(s: &str) -> Option<Vec<f64>> {
    s.split('\\').map(|p| p.trim().parse::<f64>().ok()).collect()
}

impl SeriesFacts {
    /// `series`: `GET /series/{id}`; `tags`: `GET /instances/{first}/simplified-tags`;
    /// `metadata`: `GET /instances/{first}/metadata?expand`.
    pub fn from_orthanc(series: &Value, tags: &Value, metadata: &Value) -> Self {
        let main = series.get("MainDicomTags").cloned().unwrap_or(Value::Null);
        let pick = |key: &str| {
            let t = text(tags, key);
            if t.is_empty() {
                text(&main, key)
            } else {
                t
            }
        };
        let orientation = parse_ds(&pick("ImageOrientationPatient"))
            .filter(|v| v.len() == 6)
            .map(|v| [v[0], v[1], v[2], v[3], v[4], v[5]]);
        let frames = text(tags, "NumberOfFrames").parse::<usize>().unwrap_or(1).max(1);
        let mut sop_class = text(metadata, "SopClassUid");
        if sop_class.is_empty() {
            sop_class = text(tags, "SOPClassUID");
        }
        // Enhanced MR keeps the orientation inside the functional groups; the reader checks it later.
        SeriesFacts {
            modality: pick("Modality"),
            manufacturer: pick("Manufacturer"),
            series_description: pick("SeriesDescription"),
            protocol_name: pick("ProtocolName"),
            scanning_sequence: Some(text(tags, "ScanningSequence")).filter(|s| !s.is_empty()),
            sop_class_uid: sop_class,
            origin: text(metadata, "Origin"),
            orientation,
            instance_count: series.get("Instances").and_then(Value::as_array).map(|a| a.len()).unwrap_or(0),
            frames_per_instance: frames,
        }
    }
}

/// Angle in degrees between the slice normal and the axial axis (0 = axial).
pub fn obliquity_degrees(iop: &[f64; 6]) -> f64 {
    let r = [iop[0], iop[1], iop[2]];
    let c = [iop[3], iop[4], iop[5]];
    let n = [r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]];
    let len = (n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).sqrt();
    if len < 1e-6 {
        return 90.0;
    }
    (n[2].abs() / len).clamp(0.0, 1.0).acos().to_degrees()
}

/// True for the plugin's own output, whatever its modality.
pub fn is_our_output(f: &SeriesFacts, our_description: &str) -> bool {
    f.manufacturer.eq_ignore_ascii_case(OUR_MANUFACTURER)
        || (f.origin == "Plugins" && !our_description.is_empty() && f.series_description.starts_with(our_description))
}

/// Rules that always hold, even for manual requests: MR images only, never our own output.
pub fn hard_rules(f: &SeriesFacts, our_description: &str) -> Option<String> {
    if is_our_output(f, our_description) {
        return Some(format!("our own output (Manufacturer \"{}\", Origin \"{}\")", f.manufacturer, f.origin));
    }
    if NON_IMAGE_MODALITIES.iter().any(|m| f.modality.eq_ignore_ascii_case(m)) {
        return Some(format!("modality {} is not an image series", f.modality));
    }
    if NON_IMAGE_SOP_CLASS_PREFIXES.iter().any(|p| f.sop_class_uid.starts_with(p)) {
        return Some(format!("SOP class {} is not an image", f.sop_class_uid));
    }
    if !f.modality.eq_ignore_ascii_case("MR") {
        return Some(format!("modality {:?} is not MR", f.modality));
    }
    None
}

/// The configurable rules (`SeriesFilter`); automatic triggers only.
pub fn series_rules(f: &SeriesFacts, filter: &CompiledFilter) -> Option<String> {
    let texts = [&f.series_description, &f.protocol_name];
    if let Some(re) = &filter.description {
        if !texts.iter().any(|t| !t.is_empty() && re.is_match(t)) {
            return Some(format!(
                "SeriesDescription {:?} / ProtocolName {:?} do not match DescriptionPattern {:?}",
                f.series_description,
                f.protocol_name,
                re.as_str()
            ));
        }
    }
    if let Some(re) = &filter.exclude {
        if let Some(t) = texts.iter().find(|t| !t.is_empty() && re.is_match(t)) {
            return Some(format!("{t:?} matches ExcludePattern {:?}", re.as_str()));
        }
    }
    if let (Some(re), Some(seq)) = (&filter.scanning_sequence, &f.scanning_sequence) {
        if !re.is_match(seq) {
            return Some(format!("ScanningSequence {seq:?} does not match {:?}", re.as_str()));
        }
    }
    match &f.orientation {
        Some(iop) => {
            let angle = obliquity_degrees(iop);
            if angle > filter.max_obliquity_degrees {
                return Some(format!(
                    "slices are {angle:.0}° from axial (MaxObliquityDegrees {})",
                    filter.max_obliquity_degrees
                ));
            }
        }
        None if f.frames_per_instance <= 1 => return Some("no ImageOrientationPatient".into()),
        None => {}
    }
    let slices = f.instance_count * f.frames_per_instance;
    if slices < filter.min_slices {
        return Some(format!("{slices} slices, fewer than MinSlices {}", filter.min_slices));
    }
    None
}

/// The hard rules and then the configurable ones; the reason names the failed rule.
pub fn decide(f: &SeriesFacts, filter: &CompiledFilter, our_description: &str) -> Decision {
    match hard_rules(f, our_description).or_else(|| series_rules(f, filter)) {
        Some(reason) => Decision::Skip(reason),
        None => Decision::Accept,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orthanc::config::PluginConfig;
    use serde_json::json;

    fn t2_axial() -> SeriesFacts {
        SeriesFacts {
            modality: "MR".into(),
            manufacturer: "SIEMENS".into(),
            series_description: "t2_tse_tra".into(),
            protocol_name: "".into(),
            scanning_sequence: Some("SE".into()),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.4".into(),
            origin: "DicomProtocol".into(),
            orientation: Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
            instance_count: 20,
            frames_per_instance: 1,
        }
    }

    #[test]
    fn rules_accept_axial_t2_and_name_the_reason_otherwise() {
        let filter = PluginConfig::default().compiled_filter().unwrap();
        let d = |f: &SeriesFacts| decide(f, &filter, "DeSAM prostate (auto)");
        assert_eq!(d(&t2_axial()), Decision::Accept);

        type Change = Box<dyn Fn(&mut SeriesFacts)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|f| f.modality = "CT".into()), "not MR"),
            (Box::new(|f| f.modality = "SEG".into()), "not an image series"),
            (Box::new(|f| f.manufacturer = "DeSAM".into()), "our own output"),
            (Box::new(|f| f.sop_class_uid = "1.2.840.10008.5.1.4.1.1.66.4".into()), "SOP class"),
            (Box::new(|f| f.series_description = "ep2d_diff_tra ADC".into()), "DescriptionPattern"),
            (Box::new(|f| f.series_description = "t2 dwi".into()), "ExcludePattern"),
            (Box::new(|f| f.scanning_sequence = Some("GR".into())), "ScanningSequence"),
            (Box::new(|f| f.orientation = Some([0.0, 1.0, 0.0, 0.0, 0.0, -1.0])), "from axial"),
            (Box::new(|f| f.instance_count = 3), "MinSlices"),
        ];
        for (change, reason) in cases {
            let mut f = t2_axial();
            change(&mut f);
            match d(&f) {
                Decision::Skip(r) => assert!(r.contains(reason), "{r} should mention {reason}"),
                Decision::Accept => panic!("accepted but expected skip for {reason}"),
            }
        }
    }

    #[test]
    fn obliquity_of_tilted_planes() {
        assert!(obliquity_degrees(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]) < 1e-9);
        let a = 20f64.to_radians();
        let tilted = [1.0, 0.0, 0.0, 0.0, a.cos(), -a.sin()];
        assert!((obliquity_degrees(&tilted) - 20.0).abs() < 1e-6);
        assert!((obliquity_degrees(&[1.0, 0.0, 0.0, 0.0, 0.0, -1.0]) - 90.0).abs() < 1e-6);
    }

    #[test]
    fn facts_come_from_orthanc_json() {
        let series =
            json!({"MainDicomTags": {"Modality": "MR", "SeriesDescription": "T2 ax"}, "Instances": ["a", "b"]});
        let tags =
            json!({"ImageOrientationPatient": "1\\0\\0\\0\\1\\0", "ScanningSequence": "SE", "Manufacturer": "GE"});
        let meta = json!({"SopClassUid": "1.2.840.10008.5.1.4.1.1.4", "Origin": "DicomProtocol"});
        let f = SeriesFacts::from_orthanc(&series, &tags, &meta);
        assert_eq!(f.modality, "MR");
        assert_eq!(f.instance_count, 2);
        assert_eq!(f.orientation.unwrap()[4], 1.0);
        assert_eq!(f.manufacturer, "GE");
        assert_eq!(f.scanning_sequence.as_deref(), Some("SE"));
    }
}

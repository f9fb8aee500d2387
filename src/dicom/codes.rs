//! Coded concepts used in the segmentations desam writes (SNOMED CT and DICOM codes) and the
//! CIELab display colours. Owns constants only; never uses retired SRT codes.

use std::borrow::Cow;

/// A coded concept: (CodeValue, CodingSchemeDesignator, CodeMeaning).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Code {
    pub value: Cow<'static, str>,
    pub scheme: Cow<'static, str>,
    pub meaning: Cow<'static, str>,
}

impl Code {
    pub const fn new_static(value: &'static str, scheme: &'static str, meaning: &'static str) -> Code {
        Code { value: Cow::Borrowed(value), scheme: Cow::Borrowed(scheme), meaning: Cow::Borrowed(meaning) }
    }
    pub fn new(value: impl Into<String>, scheme: impl Into<String>, meaning: impl Into<String>) -> Code {
        Code { value: Cow::Owned(value.into()), scheme: Cow::Owned(scheme.into()), meaning: Cow::Owned(meaning.into()) }
    }
    /// Same concept (value and scheme), whatever the meaning text says.
    pub fn same_concept(&self, other: &Code) -> bool {
        self.value == other.value && self.scheme == other.scheme
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "({}, {}, \"{}\")", self.value, self.scheme, self.meaning)
    }
}

/// Segmented Property Category (CID 7150).
pub const ANATOMICAL_STRUCTURE: Code = Code::new_static("123037004", "SCT", "Anatomical Structure");
/// Segmented Property Types (CID 7151 and relatives).
pub const PROSTATE: Code = Code::new_static("41216001", "SCT", "Prostate");
pub const PERIPHERAL_ZONE: Code = Code::new_static("279706003", "SCT", "Peripheral zone of the prostate");
pub const TRANSITION_ZONE: Code = Code::new_static("399384005", "SCT", "Transition zone of the prostate");
pub const ANTERIOR_FIBROMUSCULAR_STROMA: Code =
    Code::new_static("717025007", "SCT", "Anterior fibromuscular stroma of prostate");

/// Algorithm family (CID 7162).
pub const ARTIFICIAL_INTELLIGENCE: Code = Code::new_static("123110", "DCM", "Artificial Intelligence");
/// Purpose of reference for source images of a derived image (CID 7202).
pub const SOURCE_IMAGE_FOR_PROCESSING: Code =
    Code::new_static("121322", "DCM", "Source image for image processing operation");
/// Derivation code (CID 7203).
pub const SEGMENTATION_DERIVATION: Code = Code::new_static("113076", "DCM", "Segmentation");

/// Contributing equipment purposes of reference (CID 7005).
pub const ACQUISITION_EQUIPMENT: Code = Code::new_static("109101", "DCM", "Acquisition Equipment");
pub const PROCESSING_EQUIPMENT: Code = Code::new_static("109102", "DCM", "Processing Equipment");

/// Default display colours (sRGB) for the structures desam segments. The prostate's is the one 3D
/// Slicer's terminology gives SCT 41216001 ("Segmentation category and type - 3D Slicer General
/// Anatomy list", recommendedDisplayRGBValue), so a SEG looks the same in Slicer as in our Slicer
/// module (plugin-manifest/slicer/DeSAM/DeSAMLib/engine.py `PROSTATE_RGB`; a test keeps them equal).
pub const PROSTATE_RGB: [u8; 3] = [230, 158, 140];
pub const PERIPHERAL_ZONE_RGB: [u8; 3] = [230, 220, 70];
pub const TRANSITION_ZONE_RGB: [u8; 3] = [80, 150, 230];

/// sRGB (8-bit) → DICOM-scaled CIELab (PS3.3 C.10.7.1.1): L* 0..100 → 0..65535,
/// a*, b* -128..127 → 0..65535. Computed with the D65 white point.
pub fn cielab_from_srgb(rgb: [u8; 3]) -> [u16; 3] {
    let lin = |c: u8| {
        let c = c as f64 / 255.0;
        if c <= 0.04045 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    let (r, g, b) = (lin(rgb[0]), lin(rgb[1]), lin(rgb[2]));
    let x = 0.4124564 * r + 0.3575761 * g + 0.1804375 * b;
    let y = 0.2126729 * r + 0.7151522 * g + 0.0721750 * b;
    let z = 0.0193339 * r + 0.1191920 * g + 0.9503041 * b;
    let f = |t: f64| {
        let d = 6.0 / 29.0;
        if t > d * d * d {
            t.cbrt()
        } else {
            t / (3.0 * d * d) + 4.0 / 29.0
        }
    };
    let (fx, fy, fz) = (f(x / 0.95047), f(y / 1.0), f(z / 1.08883));
    let l = 116.0 * fy - 16.0;
    let a = 500.0 * (fx - fy);
    let bb = 200.0 * (fy - fz);
    let scale_l = |v: f64| (v.clamp(0.0, 100.0) * 65535.0 / 100.0).round() as u16;
    let scale_ab = |v: f64| ((v.clamp(-128.0, 127.0) + 128.0) * 65535.0 / 255.0).round() as u16;
    [scale_l(l), scale_ab(a), scale_ab(bb)]
}

/// DICOM-scaled CIELab → sRGB (8-bit), the inverse of [`cielab_from_srgb`] as viewers and dcmqi apply
/// it to RecommendedDisplayCIELabValue (PS3.3 C.10.7.1.1; D65 white point, sRGB companding).
pub fn srgb_from_cielab(lab: [u16; 3]) -> [u8; 3] {
    let l = lab[0] as f64 * 100.0 / 65535.0;
    let a = lab[1] as f64 * 255.0 / 65535.0 - 128.0;
    let b = lab[2] as f64 * 255.0 / 65535.0 - 128.0;
    let fy = (l + 16.0) / 116.0;
    let (fx, fz) = (fy + a / 500.0, fy - b / 200.0);
    let finv = |t: f64| {
        let d = 6.0 / 29.0;
        if t > d {
            t * t * t
        } else {
            3.0 * d * d * (t - 4.0 / 29.0)
        }
    };
    let (x, y, z) = (0.95047 * finv(fx), finv(fy), 1.08883 * finv(fz));
    let r = 3.2404542 * x - 1.5371385 * y - 0.4985314 * z;
    let g = -0.9692660 * x + 1.8760108 * y + 0.0415560 * z;
    let bl = 0.0556434 * x - 0.2040259 * y + 1.0572252 * z;
    let gamma = |c: f64| {
        let c = c.clamp(0.0, 1.0);
        let v = if c <= 0.0031308 { 12.92 * c } else { 1.055 * c.powf(1.0 / 2.4) - 0.055 };
        (v * 255.0).round() as u8
    };
    [gamma(r), gamma(g), gamma(bl)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cielab_of_white_black_and_red() {
        let w = cielab_from_srgb([255, 255, 255]);
        assert!(w[0] > 65500, "{w:?}");
        assert!((w[1] as i32 - 32896).abs() < 100 && (w[2] as i32 - 32896).abs() < 100, "{w:?}");
        assert_eq!(cielab_from_srgb([0, 0, 0])[0], 0);
        // Red: L*≈53, a*≈80, b*≈67.
        let r = cielab_from_srgb([255, 0, 0]);
        assert!((r[0] as f64 / 655.35 - 53.2).abs() < 0.5, "{r:?}");
        assert!(((r[1] as f64) * 255.0 / 65535.0 - 128.0 - 80.1).abs() < 0.5, "{r:?}");
    }

    #[test]
    fn the_seg_prostate_colour_is_slicers_and_the_slicer_modules() {
        // What the writer puts into RecommendedDisplayCIELabValue, read back the way viewers do.
        let written = crate::dicom::SegmentInfo::prostate("m").cielab.expect("a display colour");
        assert_eq!(srgb_from_cielab(written), [230, 158, 140], "Slicer General Anatomy: prostate");
        // The Slicer module's own constant (one place on that side too).
        let module = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugin-manifest/slicer/DeSAM/DeSAMLib/engine.py"),
        )
        .unwrap();
        let line = module.lines().find(|l| l.starts_with("PROSTATE_RGB = (")).expect("PROSTATE_RGB in engine.py");
        let rgb: Vec<u8> = line["PROSTATE_RGB = (".len()..]
            .split(')')
            .next()
            .unwrap()
            .split(',')
            .map(|v| v.trim().parse().unwrap())
            .collect();
        assert_eq!(rgb, srgb_from_cielab(written), "{line}");
        for rgb in [[0, 0, 0], [255, 255, 255], [80, 150, 230], PROSTATE_RGB] {
            assert_eq!(srgb_from_cielab(cielab_from_srgb(rgb)), rgb);
        }
    }

    #[test]
    fn codes_are_sct_not_srt() {
        for c in [&PROSTATE, &ANATOMICAL_STRUCTURE, &PERIPHERAL_ZONE, &TRANSITION_ZONE] {
            assert_eq!(c.scheme, "SCT");
        }
        assert!(PROSTATE.same_concept(&Code::new("41216001", "SCT", "prostate")));
    }
}

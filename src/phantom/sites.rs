//! The six acquisition sites (A–F) of the multi-site prostate T2w release and the per-case protocol
//! drawn from each site's ranges. Owns protocol numbers only; no anatomy, no voxels, no I/O.

use rand::Rng;
use rand_chacha::ChaCha20Rng;

use super::PhantomError;

/// One of the six public prostate T2w MR sites the phantom imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// RUNMC (NCI-ISBI 2013): Siemens 3 T, surface coil.
    A,
    /// BMC (NCI-ISBI 2013): Philips 1.5 T, endorectal coil.
    B,
    /// HCRUDB (I2CVB): Siemens 3 T, 1.25 mm slices.
    C,
    /// UCL (PROMISE12): Siemens 1.5 or 3 T, oblique axial.
    D,
    /// BIDMC (PROMISE12): GE 3 T, endorectal coil, small field of view.
    E,
    /// HK (PROMISE12): Siemens 1.5 T, endorectal coil, oblique axial.
    F,
}

impl Site {
    pub const ALL: [Site; 6] = [Site::A, Site::B, Site::C, Site::D, Site::E, Site::F];

    pub fn letter(self) -> char {
        match self {
            Site::A => 'A',
            Site::B => 'B',
            Site::C => 'C',
            Site::D => 'D',
            Site::E => 'E',
            Site::F => 'F',
        }
    }

    /// 0 for A … 5 for F.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_letter(c: char) -> Option<Site> {
        match c.to_ascii_uppercase() {
            'A' => Some(Site::A),
            'B' => Some(Site::B),
            'C' => Some(Site::C),
            'D' => Some(Site::D),
            'E' => Some(Site::E),
            'F' => Some(Site::F),
            _ => None,
        }
    }

    /// The centre name the official DeSAM `prostate_patientid.csv` uses for this site.
    pub fn official_center(self) -> &'static str {
        match self {
            Site::A => "A-ISBI",
            Site::B => "B-ISBI_1.5",
            Site::C => "C-I2CVB",
            Site::D => "D-UCL",
            Site::E => "E-BIDMC",
            Site::F => "F-HK",
        }
    }

    /// The real source the site imitates (for documentation and SeriesDescription-free labels).
    pub fn source_name(self) -> &'static str {
        match self {
            Site::A => "RUNMC",
            Site::B => "BMC",
            Site::C => "HCRUDB",
            Site::D => "UCL",
            Site::E => "BIDMC",
            Site::F => "HK",
        }
    }

    pub fn institution_name(self) -> String {
        format!("DESAM PHANTOM SITE {}", self.letter())
    }

    pub fn has_endorectal_coil(self) -> bool {
        matches!(self, Site::B | Site::E | Site::F)
    }

    pub fn is_oblique(self) -> bool {
        matches!(self, Site::D | Site::F)
    }

    /// The fixed and ranged protocol figures of the site (full-size acquisition).
    pub fn spec(self) -> SiteSpec {
        match self {
            Site::A => SiteSpec {
                manufacturer: "SIEMENS",
                model_names: &["TrioTim", "Skyra"],
                field_strengths: &[3.0],
                endorectal: false,
                matrices: &[(320, 0.6), (320, 0.625)],
                slice_thickness: (3.6, 4.0),
                slices: (18, 24),
                oblique_deg: (0.0, 0.0),
                snr: (22.0, 36.0),
                stored_max: (1200.0, 2400.0),
                rescale_slope: None,
                interpolation: 1,
                parallel_imaging_g: Some((1.1, 1.3)),
                series_description: "t2_tse_tra",
                tr_ms: (3600.0, 5000.0),
                te_ms: (101.0, 109.0),
            },
            Site::B => SiteSpec {
                manufacturer: "Philips Medical Systems",
                model_names: &["Achieva"],
                field_strengths: &[1.5],
                endorectal: true,
                // 0.8 mm acquired, interpolated to 0.4 mm by the scanner.
                matrices: &[(512, 0.4)],
                slice_thickness: (3.0, 3.0),
                slices: (22, 30),
                oblique_deg: (0.0, 0.0),
                snr: (16.0, 30.0),
                stored_max: (2200.0, 4000.0),
                rescale_slope: Some((1.4, 3.2)),
                interpolation: 2,
                parallel_imaging_g: None,
                series_description: "T2W_TSE_ax",
                tr_ms: (3000.0, 6500.0),
                te_ms: (100.0, 120.0),
            },
            Site::C => SiteSpec {
                manufacturer: "SIEMENS",
                model_names: &["TrioTim"],
                field_strengths: &[3.0],
                endorectal: false,
                matrices: &[(256, 0.67), (256, 0.7), (256, 0.75), (256, 0.79)],
                slice_thickness: (1.25, 1.25),
                slices: (56, 64),
                oblique_deg: (0.0, 0.0),
                snr: (12.0, 24.0),
                stored_max: (500.0, 1200.0),
                rescale_slope: None,
                interpolation: 1,
                parallel_imaging_g: None,
                series_description: "t2_spc_tra_1.25mm",
                tr_ms: (3000.0, 3500.0),
                te_ms: (90.0, 100.0),
            },
            Site::D => SiteSpec {
                manufacturer: "SIEMENS",
                model_names: &["Avanto", "TrioTim"],
                field_strengths: &[1.5, 3.0],
                endorectal: false,
                matrices: &[(512, 0.325), (384, 0.43), (320, 0.5), (256, 0.625)],
                slice_thickness: (3.0, 3.6),
                slices: (18, 26),
                oblique_deg: (5.0, 20.0),
                snr: (10.0, 32.0),
                stored_max: (600.0, 1800.0),
                rescale_slope: None,
                interpolation: 1,
                parallel_imaging_g: None,
                series_description: "t2_tse_obl",
                tr_ms: (4000.0, 7500.0),
                te_ms: (95.0, 110.0),
            },
            Site::E => SiteSpec {
                manufacturer: "GE MEDICAL SYSTEMS",
                model_names: &["Signa HDxt"],
                field_strengths: &[3.0],
                endorectal: true,
                // 0.5 mm acquired, zero-fill interpolated to 0.25 mm.
                matrices: &[(512, 0.25)],
                slice_thickness: (2.2, 3.0),
                slices: (24, 30),
                oblique_deg: (0.0, 0.0),
                snr: (28.0, 40.0),
                stored_max: (300.0, 900.0),
                rescale_slope: None,
                interpolation: 2,
                parallel_imaging_g: None,
                series_description: "Ax T2 FSE",
                tr_ms: (4500.0, 7000.0),
                te_ms: (100.0, 120.0),
            },
            Site::F => SiteSpec {
                manufacturer: "SIEMENS",
                model_names: &["Avanto"],
                field_strengths: &[1.5],
                endorectal: true,
                matrices: &[(320, 0.625)],
                slice_thickness: (3.6, 3.6),
                slices: (18, 24),
                oblique_deg: (5.0, 20.0),
                snr: (18.0, 32.0),
                stored_max: (1000.0, 2600.0),
                rescale_slope: None,
                interpolation: 1,
                parallel_imaging_g: None,
                series_description: "t2_tse_tra_obl",
                tr_ms: (4000.0, 6000.0),
                te_ms: (96.0, 110.0),
            },
        }
    }
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.letter())
    }
}

impl std::str::FromStr for Site {
    type Err = PhantomError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let mut chars = t.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => Site::from_letter(c).ok_or_else(|| PhantomError::UnknownSite(s.to_string())),
            _ => Err(PhantomError::UnknownSite(s.to_string())),
        }
    }
}

/// The ranges a site's protocol is drawn from. Ranges are inclusive `(min, max)`.
#[derive(Debug, Clone)]
pub struct SiteSpec {
    pub manufacturer: &'static str,
    pub model_names: &'static [&'static str],
    pub field_strengths: &'static [f64],
    pub endorectal: bool,
    /// (matrix, in-plane pixel spacing mm) choices; the field of view is their product.
    pub matrices: &'static [(usize, f64)],
    pub slice_thickness: (f64, f64),
    pub slices: (usize, usize),
    /// Rotation of the slice plane about the left–right axis (0 = true axial).
    pub oblique_deg: (f64, f64),
    /// SNR (mean peripheral-zone signal / noise sigma) of the stored image.
    pub snr: (f64, f64),
    /// Largest stored (uint16) value of the series.
    pub stored_max: (f64, f64),
    /// Some((min, max)) when the vendor writes RescaleSlope (intercept 0).
    pub rescale_slope: Option<(f64, f64)>,
    /// Scanner interpolation factor in-plane (1 = none; 2 = acquired at twice the pixel size).
    pub interpolation: usize,
    /// Some((min, max)) g-factor of parallel imaging at R = 2 that phantom generation 3 adds to the
    /// noise (σ × g·√2), for a site whose `snr` range was set as if it used none (A).
    pub parallel_imaging_g: Option<(f64, f64)>,
    pub series_description: &'static str,
    pub tr_ms: (f64, f64),
    pub te_ms: (f64, f64),
}

impl SiteSpec {
    /// The SNR range at a given field strength (site D mixes 1.5 and 3 T; 1.5 T has about half).
    pub fn snr_at(&self, field_t: f64) -> (f64, f64) {
        if self.field_strengths.len() > 1 {
            let mid = 0.5 * (self.snr.0 + self.snr.1);
            if field_t < 2.0 {
                (self.snr.0, mid * 0.85)
            } else {
                (mid, self.snr.1)
            }
        } else {
            self.snr
        }
    }
}

/// How large a volume to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Size {
    /// The site's real matrix (256–512).
    #[default]
    Full,
    /// A quarter of the in-plane matrix (pixels four times larger, same field of view, same slices):
    /// for tests and quick looks.
    Small,
}

impl Size {
    pub fn in_plane_factor(self) -> usize {
        match self {
            Size::Full => 1,
            Size::Small => 4,
        }
    }
}

impl std::str::FromStr for Size {
    type Err = PhantomError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "full" => Ok(Size::Full),
            "small" => Ok(Size::Small),
            _ => Err(PhantomError::UnknownSize(s.to_string())),
        }
    }
}

/// The acquisition parameters of one generated case (what the DICOM header reports).
#[derive(Debug, Clone, PartialEq)]
pub struct CaseProtocol {
    pub manufacturer: String,
    pub manufacturer_model_name: String,
    pub institution_name: String,
    pub magnetic_field_strength: f64,
    pub endorectal_coil: bool,
    pub series_description: String,
    pub protocol_name: String,
    /// Acquisition matrix of the full-size protocol (rows = columns).
    pub full_matrix: usize,
    /// In-plane pixel spacing of the full-size protocol, mm.
    pub full_pixel_spacing: f64,
    /// Matrix and pixel spacing actually generated (differ from full_* for `Size::Small`).
    pub matrix: usize,
    pub pixel_spacing: f64,
    pub slice_thickness: f64,
    /// Centre-to-centre slice distance (contiguous: equals the thickness).
    pub slice_spacing: f64,
    pub slices: usize,
    /// Rotation of the slice plane about the left–right axis, degrees (0 = axial).
    pub oblique_deg: f64,
    pub snr: f64,
    /// Relative amplitude of the smooth multiplicative bias field (0.1–0.3).
    pub bias_amplitude: f64,
    pub stored_max: f64,
    /// (RescaleSlope, RescaleIntercept) when the vendor writes them (Philips).
    pub rescale: Option<(f64, f64)>,
    pub interpolation: usize,
    pub repetition_time_ms: f64,
    pub echo_time_ms: f64,
    pub echo_train_length: u32,
    /// Phase encoding along the rows (left–right) rather than the columns (anterior–posterior).
    pub phase_encoding_rows: bool,
    /// Relative amplitude of the N/2 (motion/phase) ghost along the phase-encoding direction.
    pub ghost_amplitude: f64,
}

impl CaseProtocol {
    pub fn field_of_view_mm(&self) -> f64 {
        self.full_matrix as f64 * self.full_pixel_spacing
    }
}

fn uniform(rng: &mut ChaCha20Rng, r: (f64, f64)) -> f64 {
    if r.1 <= r.0 {
        r.0
    } else {
        rng.gen_range(r.0..=r.1)
    }
}

/// Draws the protocol of one case of `site`. `min_coverage_mm` is the superior–inferior extent the
/// stack must cover (the gland plus margins); the slice count grows within the site's range to meet it.
pub(crate) fn draw_protocol(site: Site, size: Size, min_coverage_mm: f64, rng: &mut ChaCha20Rng) -> CaseProtocol {
    let spec = site.spec();
    let field = spec.field_strengths[rng.gen_range(0..spec.field_strengths.len())];
    let model = if spec.model_names.len() > 1 {
        // Site D: the 1.5 T cases come from the Avanto, 3 T from the Trio; site A draws either.
        if spec.field_strengths.len() > 1 {
            if field < 2.0 {
                spec.model_names[0]
            } else {
                spec.model_names[1]
            }
        } else {
            spec.model_names[rng.gen_range(0..spec.model_names.len())]
        }
    } else {
        spec.model_names[0]
    };
    let (full_matrix, full_spacing) = spec.matrices[rng.gen_range(0..spec.matrices.len())];
    let thickness = (uniform(rng, spec.slice_thickness) * 10.0).round() / 10.0;
    let mut thickness = thickness.clamp(spec.slice_thickness.0, spec.slice_thickness.1);
    // A large gland at thin slices: thicker slices (within the site's range) before too few.
    let max_cover = spec.slices.1 as f64 * thickness;
    if max_cover < min_coverage_mm {
        let t = ((min_coverage_mm / spec.slices.1 as f64) * 10.0).ceil() / 10.0;
        thickness = t.clamp(spec.slice_thickness.0, spec.slice_thickness.1);
    }
    let drawn = rng.gen_range(spec.slices.0..=spec.slices.1);
    let needed = (min_coverage_mm / thickness).ceil() as usize;
    let slices = drawn.max(needed).min(spec.slices.1);
    let oblique = if spec.oblique_deg.1 > 0.0 {
        let a = uniform(rng, spec.oblique_deg);
        if rng.gen_bool(0.5) {
            a
        } else {
            -a
        }
    } else {
        0.0
    };
    let snr = uniform(rng, spec.snr_at(field));
    // Bias fields are stronger at 3 T (dielectric effects, surface-coil profiles).
    let bias = if field > 2.0 { uniform(rng, (0.2, 0.3)) } else { uniform(rng, (0.1, 0.2)) };
    let stored_max = uniform(rng, spec.stored_max).round();
    let rescale = spec.rescale_slope.map(|r| (((uniform(rng, r)) * 1e4).round() / 1e4, 0.0));
    let factor = size.in_plane_factor();
    let matrix = (full_matrix / factor).max(32);
    let pixel_spacing = full_spacing * full_matrix as f64 / matrix as f64;
    let tr = uniform(rng, spec.tr_ms).round();
    let te = uniform(rng, spec.te_ms).round();
    CaseProtocol {
        manufacturer: spec.manufacturer.to_string(),
        manufacturer_model_name: model.to_string(),
        institution_name: site.institution_name(),
        magnetic_field_strength: field,
        endorectal_coil: spec.endorectal,
        series_description: spec.series_description.to_string(),
        protocol_name: spec.series_description.to_string(),
        full_matrix,
        full_pixel_spacing: full_spacing,
        matrix,
        pixel_spacing,
        slice_thickness: thickness,
        slice_spacing: thickness,
        slices,
        oblique_deg: oblique,
        snr,
        bias_amplitude: bias,
        stored_max,
        rescale,
        interpolation: spec.interpolation,
        repetition_time_ms: tr,
        echo_time_ms: te,
        echo_train_length: rng.gen_range(13..=25),
        // Siemens prostate protocols usually encode phase left–right, the others anterior–posterior.
        phase_encoding_rows: spec.manufacturer == "SIEMENS",
        ghost_amplitude: uniform(rng, (0.005, 0.025)),
    }
}

//! Six-site synthetic T2-weighted prostate MR phantom (shared design phantom-sites.md): in-memory
//! volumes, zone labels and DICOM-ready attributes. File output lives in export.rs and montage.rs only.

pub mod acquisition;
pub mod anatomy;
pub mod export;
pub mod montage;
pub mod sites;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

use crate::volume::{Mask, SliceRef, SourceInfo, Volume};

pub use sites::{CaseProtocol, Site, SiteSpec, Size};

/// MR Image Storage.
pub const MR_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.4";

/// Label values of [`PhantomCase::labels`].
pub const LABEL_PZ: u8 = 1;
pub const LABEL_TZ: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum PhantomError {
    #[error("unknown site '{0}' (expected one of A, B, C, D, E, F)")]
    UnknownSite(String),
    #[error("unknown size '{0}' (expected full or small)")]
    UnknownSize(String),
    #[error("unknown phantom generation '{0}' (expected 1, 2 or 3)")]
    UnknownGeneration(String),
    #[error("case index {case} is out of range (0..={max})")]
    CaseOutOfRange { case: u32, max: u32 },
    #[error("{0} already exists; the phantom writer never overwrites files")]
    Exists(String),
    #[error(transparent)]
    Dicom(#[from] crate::dicom::DicomError),
    #[error(transparent)]
    Seg(#[from] crate::dicom::SegError),
    #[error(transparent)]
    Nifti(#[from] crate::nifti::NiftiError),
    #[error("cannot write {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("cannot encode PNG {path}: {message}")]
    Png { path: String, message: String },
}

/// What the generator drew for a case, for tests and documentation (not in any header).
#[derive(Debug, Clone)]
pub struct CaseTruth {
    pub gland_ml: f64,
    pub pz_ml: f64,
    pub tz_ml: f64,
    pub has_tumour: bool,
    /// Designed posterior PZ thickness on the midline (mm).
    pub pz_thickness_mm: f64,
    /// Relative TZ signal (PZ = 1) before texture and nodules.
    pub tz_relative: f64,
    /// Noise sigma per channel, in the image's (modality) units.
    pub noise_sigma: f64,
    /// Mean noise-free PZ signal in the image's units (after coil sensitivity).
    pub pz_mean: f64,
    /// RescaleSlope (1 when the vendor writes none): modality value = stored · slope.
    pub slope: f64,
}

impl PhantomCase {
    /// The stored (uint16) values the DICOM files hold.
    pub fn stored_voxels(&self) -> Vec<u16> {
        let (slope, intercept) = self.protocol.rescale.unwrap_or((1.0, 0.0));
        self.image.voxels.iter().map(|&v| ((v as f64 - intercept) / slope).round().clamp(0.0, 65535.0) as u16).collect()
    }
}

/// One generated case.
#[derive(Debug, Clone)]
pub struct PhantomCase {
    pub site: Site,
    pub case_index: u32,
    /// "A007": site letter and three-digit case index.
    pub case_id: String,
    /// Modality values: the stored uint16 values after RescaleSlope/Intercept (`protocol.rescale`; only
    /// site B has one, elsewhere the voxels are the stored integers). What a DICOM reader returns.
    pub image: Volume,
    /// 0 background, 1 peripheral zone, 2 transition zone (the binary gland is label > 0).
    pub labels: Mask,
    /// The tissue class of every voxel (codes of [`anatomy::Tissue`]) when asked for
    /// ([`GenerateOptions::tissue_map`]): where fat, muscle, bone, ... are, for realism checks.
    pub tissues: Option<Mask>,
    pub protocol: CaseProtocol,
    pub truth: CaseTruth,
}

impl PhantomCase {
    /// The binary gland mask (PZ ∪ TZ) as 0/1.
    pub fn gland_mask(&self) -> Mask {
        Mask { data: self.labels.data.iter().map(|&v| u8::from(v > 0)).collect(), dims: self.labels.dims }
    }

    /// Keep the central `rows` × `cols` of every slice (image and labels), moving the origin so every
    /// kept voxel stays where it was in patient space. Used to test matrices the sites do not have
    /// (e.g. 250 × 250, 257 × 193). None when the case is smaller than that.
    pub fn crop_in_plane(&mut self, rows: usize, cols: usize) -> Option<()> {
        let [nz, ny, nx] = self.image.dims;
        if rows == 0 || cols == 0 || rows > ny || cols > nx {
            return None;
        }
        let (y0, x0) = ((ny - rows) / 2, (nx - cols) / 2);
        let mut voxels = Vec::with_capacity(nz * rows * cols);
        let mut labels = Vec::with_capacity(nz * rows * cols);
        let mut tissues = self.tissues.as_ref().map(|_| Vec::with_capacity(nz * rows * cols));
        for z in 0..nz {
            for y in y0..y0 + rows {
                let start = (z * ny + y) * nx + x0;
                voxels.extend_from_slice(&self.image.voxels[start..start + cols]);
                labels.extend_from_slice(&self.labels.data[start..start + cols]);
                if let (Some(out), Some(map)) = (tissues.as_mut(), self.tissues.as_ref()) {
                    out.extend_from_slice(&map.data[start..start + cols]);
                }
            }
        }
        self.tissues = tissues.map(|data| Mask { data, dims: [nz, rows, cols] });
        let [dx, dy] = [self.image.spacing[0] * x0 as f64, self.image.spacing[1] * y0 as f64];
        let d = self.image.direction;
        for a in 0..3 {
            self.image.origin[a] += d[0][a] * dx + d[1][a] * dy;
        }
        self.image.voxels = voxels;
        self.image.dims = [nz, rows, cols];
        self.labels = Mask { data: labels, dims: [nz, rows, cols] };
        Some(())
    }
}

/// Knobs for tests and tools; `GenerateOptions::default()` is the realistic full-size case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateOptions {
    pub size: Size,
    /// Add Rician noise.
    pub noise: bool,
    /// Apply the bias field and endorectal coil sensitivity.
    pub sensitivity: bool,
    /// Which noise draw (0 = the case's own); other values give independent repeats of the same case.
    pub noise_realisation: u64,
    /// Also rasterise the tissue map ([`PhantomCase::tissues`]; one more pass over the volume).
    pub tissue_map: bool,
    /// Which anatomy and contrast model paints the case.
    pub generation: Generation,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            size: Size::Full,
            noise: true,
            sensitivity: true,
            noise_realisation: 0,
            tissue_map: false,
            generation: Generation::V1,
        }
    }
}

/// The phantom's anatomy and contrast model (docs/phantom.md). Generation 1 made `models/default`
/// 0.3.0 and every figure measured with it; generation 2 adds relaxation-time contrast, a smooth
/// deformation of the whole pelvis, fat lobules, a layered rectum with stool and thinner lines. A case's protocol,
/// placement and noise draws are the same in both, so a case can be compared across generations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Generation {
    #[default]
    V1,
    V2,
    /// Generation 2 plus a fine muscle grain, a puborectalis-only levator sling, the periprostatic
    /// venous plexus and parallel-imaging noise at site A (docs/phantom.md, "Generation 3").
    V3,
}

impl std::str::FromStr for Generation {
    type Err = PhantomError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "1" => Ok(Generation::V1),
            "2" => Ok(Generation::V2),
            "3" => Ok(Generation::V3),
            other => Err(PhantomError::UnknownGeneration(other.to_string())),
        }
    }
}

/// The case id used in folder and file names: "A007".
pub fn case_id(site: Site, case_index: u32) -> String {
    format!("{}{:03}", site.letter(), case_index)
}

/// PatientID written to the header: "PHANTOM-A-007".
pub fn patient_id(site: Site, case_index: u32) -> String {
    format!("PHANTOM-{}-{:03}", site.letter(), case_index)
}

/// Recovers (site, case) from a series' attributes: PatientID "PHANTOM-<site>-<case>", else the
/// InstitutionName "DESAM PHANTOM SITE <site>" with the case from the PatientID's trailing digits.
pub fn site_and_case_from_source(source: &SourceInfo) -> Option<(Site, u32)> {
    if let Some(pid) = &source.patient_id {
        let parts: Vec<&str> = pid.trim().split('-').collect();
        if parts.len() == 3 && parts[0].eq_ignore_ascii_case("PHANTOM") {
            if let (Ok(site), Ok(case)) = (parts[1].parse::<Site>(), parts[2].parse::<u32>()) {
                return Some((site, case));
            }
        }
    }
    let inst = source.institution_name.as_deref()?.trim();
    let letter = inst.strip_prefix("DESAM PHANTOM SITE ")?;
    let site = letter.parse::<Site>().ok()?;
    let digits: String = source.patient_id.as_deref()?.chars().rev().take_while(|c| c.is_ascii_digit()).collect();
    let case = digits.chars().rev().collect::<String>().parse::<u32>().ok()?;
    Some((site, case))
}

/// A deterministic DICOM UID ("2.25." + 128 bits of SHA-256 of `key`).
pub fn uid_for(key: &str) -> String {
    let h = Sha256::digest(key.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    format!("2.25.{}", u128::from_be_bytes(b))
}

/// A 32-byte RNG seed for one purpose of one case.
fn stream_seed(site: Site, case_index: u32, seed: u64, purpose: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"desam-phantom-v1");
    h.update([site.letter() as u8]);
    h.update(case_index.to_le_bytes());
    h.update(seed.to_le_bytes());
    h.update(purpose.as_bytes());
    h.finalize().into()
}

/// Generation 3: the noise amplification g·√R of parallel imaging (R = 2, g from the site's
/// `parallel_imaging_g`; site A, whose SNR range 22–36 was set as if it had none, then reads 12–23;
/// docs/phantom.md, "Generation 3"). 1 elsewhere and before generation 3.
fn parallel_imaging_noise(site: Site, case_index: u32, seed: u64, generation: Generation) -> f64 {
    match site.spec().parallel_imaging_g {
        Some((lo, hi)) if generation >= Generation::V3 => {
            let mut rng = ChaCha20Rng::from_seed(stream_seed(site, case_index, seed, "parallel-imaging"));
            rng.gen_range(lo..hi) * std::f64::consts::SQRT_2
        }
        _ => 1.0,
    }
}

/// The realistic full-size case `case_index` of `site` for `seed`. Same inputs, same voxels.
pub fn generate_case(site: Site, case_index: u32, seed: u64) -> PhantomCase {
    generate_case_with(site, case_index, seed, &GenerateOptions::default())
}

/// [`generate_case`] with size/noise/sensitivity switches (anatomy and protocol do not depend on them,
/// except the matrix for `Size::Small`).
pub fn generate_case_with(site: Site, case_index: u32, seed: u64, opts: &GenerateOptions) -> PhantomCase {
    let mut anat_rng = ChaCha20Rng::from_seed(stream_seed(site, case_index, seed, "anatomy"));
    let mut proto_rng = ChaCha20Rng::from_seed(stream_seed(site, case_index, seed, "protocol"));
    let mut place_rng = ChaCha20Rng::from_seed(stream_seed(site, case_index, seed, "placement"));
    let mut coil_rng = ChaCha20Rng::from_seed(stream_seed(site, case_index, seed, "sensitivity"));
    let noise_seed = stream_seed(site, case_index, seed, &format!("noise-{}", opts.noise_realisation));

    let mut anatomy = anatomy::Anatomy::draw(&mut anat_rng, site.has_endorectal_coil());
    // The stack covers the gland with room for the bladder base and seminal vesicles.
    let gland_si = 2.0 * anatomy.gland.semi[2] * 1.1;
    let protocol = sites::draw_protocol(site, opts.size, gland_si + 20.0, &mut proto_rng);
    if opts.generation >= Generation::V2 {
        let mut rng = ChaCha20Rng::from_seed(stream_seed(site, case_index, seed, "realism"));
        let seq = anatomy::Sequence {
            echo_time_ms: protocol.echo_time_ms,
            repetition_time_ms: protocol.repetition_time_ms,
            field_strength_t: protocol.magnetic_field_strength,
        };
        anatomy.make_realistic(&mut rng, &seq);
        if opts.generation >= Generation::V3 {
            anatomy.refine(&mut ChaCha20Rng::from_seed(stream_seed(site, case_index, seed, "realism-3")));
        }
    }
    let geom = acquisition::place(&protocol, &mut place_rng);
    let (mut image, labels) = acquisition::rasterise(&anatomy, &geom, &protocol);
    let dims = geom.dims;
    let tissues = opts.tissue_map.then(|| Mask { data: acquisition::tissue_map(&anatomy, &geom, &protocol), dims });

    let sens = acquisition::Sensitivity::draw(&anatomy, &geom, &protocol, &mut coil_rng);
    if opts.sensitivity {
        let [nz, ny, nx] = dims;
        for z in 0..nz {
            for y in 0..ny {
                for x in 0..nx {
                    let i = (z * ny + y) * nx + x;
                    image[i] *= sens.at(geom.world(x as f64, y as f64, z as f64)) as f32;
                }
            }
        }
        acquisition::add_ghost(&mut image, dims, protocol.phase_encoding_rows, protocol.ghost_amplitude);
    }

    // Noise is set against the mean PZ signal of this image (SNR = mean PZ / sigma).
    let (mut pz_sum, mut pz_n) = (0.0f64, 0usize);
    for (v, l) in image.iter().zip(labels.iter()) {
        if *l == LABEL_PZ {
            pz_sum += *v as f64;
            pz_n += 1;
        }
    }
    let pz_mean = if pz_n > 0 { pz_sum / pz_n as f64 } else { 1.0 };
    let sigma = pz_mean / protocol.snr * parallel_imaging_noise(site, case_index, seed, opts.generation);
    let clean_max = image.iter().cloned().fold(0f32, f32::max) as f64;
    if opts.noise {
        // Scanner interpolation correlates the noise over the interpolated pixels.
        let correlation = ((protocol.full_pixel_spacing * protocol.interpolation as f64) / protocol.pixel_spacing)
            .round()
            .max(1.0) as usize;
        acquisition::add_rician_noise(&mut image, dims, sigma, correlation, noise_seed);
    }
    // Vendor scaling, fixed by the noise-free image so repeats of a case share one scale.
    let scale = protocol.stored_max / (clean_max + 3.0 * sigma);
    let top = protocol.stored_max as f32;
    let (slope, intercept) = protocol.rescale.unwrap_or((1.0, 0.0));
    for v in image.iter_mut() {
        let stored = (*v * scale as f32).round().clamp(0.0, top);
        *v = (stored as f64 * slope + intercept) as f32;
    }

    let voxel_ml = geom.spacing[0] * geom.spacing[1] * geom.spacing[2] / 1000.0;
    let pz_count = labels.iter().filter(|&&l| l == LABEL_PZ).count();
    let tz_count = labels.iter().filter(|&&l| l == LABEL_TZ).count();
    let truth = CaseTruth {
        gland_ml: (pz_count + tz_count) as f64 * voxel_ml,
        pz_ml: pz_count as f64 * voxel_ml,
        tz_ml: tz_count as f64 * voxel_ml,
        has_tumour: anatomy.has_tumour,
        pz_thickness_mm: anatomy.pz_thickness_mm,
        tz_relative: anatomy.tissues.tz,
        noise_sigma: sigma * scale * slope,
        pz_mean: pz_mean * scale * slope,
        slope,
    };

    let mut volume = Volume::new(image, dims, geom.spacing, geom.origin);
    volume.direction = geom.direction;
    let key = format!("{}/{}/{}", site.letter(), case_index, seed);
    let series_uid = uid_for(&format!("series/{key}"));
    volume.slices = (0..dims[0])
        .map(|z| SliceRef {
            sop_class_uid: MR_IMAGE_STORAGE.to_string(),
            sop_instance_uid: uid_for(&format!("instance/{key}/{z}")),
            frame_number: None,
            position: geom.world(0.0, 0.0, z as f64),
        })
        .collect();
    volume.frame_of_reference_uid = Some(uid_for(&format!("frame/{key}")));
    volume.source = Some(source_info(site, case_index, &key, &series_uid, &protocol, &mut proto_rng));

    PhantomCase {
        site,
        case_index,
        case_id: case_id(site, case_index),
        image: volume,
        labels: Mask { data: labels, dims },
        tissues,
        protocol,
        truth,
    }
}

fn source_info(
    site: Site,
    case_index: u32,
    key: &str,
    series_uid: &str,
    p: &CaseProtocol,
    rng: &mut ChaCha20Rng,
) -> SourceInfo {
    let age: u32 = rng.gen_range(52..=78);
    let year = 2012 - age as i32;
    let month = rng.gen_range(1..=12);
    let day = rng.gen_range(1..=28);
    let study_month = rng.gen_range(1..=12);
    let study_day = rng.gen_range(1..=28);
    SourceInfo {
        patient_name: Some(format!("PHANTOM^{}", case_id(site, case_index))),
        patient_id: Some(patient_id(site, case_index)),
        patient_birth_date: Some(format!("{year:04}{month:02}{day:02}")),
        patient_sex: Some("M".into()),
        patient_age: Some(format!("{age:03}Y")),
        study_instance_uid: uid_for(&format!("study/{key}")),
        study_date: Some(format!("2012{study_month:02}{study_day:02}")),
        study_time: Some(format!("{:02}{:02}00", rng.gen_range(7..18), rng.gen_range(0..60))),
        study_id: Some("1".into()),
        accession_number: Some(format!("PH{}", case_id(site, case_index))),
        referring_physician_name: None,
        study_description: Some("MR PROSTATE (DESAM PHANTOM)".into()),
        series_instance_uid: series_uid.to_string(),
        series_number: Some(rng.gen_range(2..=9)),
        series_description: Some(p.series_description.clone()),
        protocol_name: Some(p.protocol_name.clone()),
        modality: "MR".into(),
        manufacturer: Some(p.manufacturer.clone()),
        manufacturer_model_name: Some(p.manufacturer_model_name.clone()),
        institution_name: Some(p.institution_name.clone()),
        magnetic_field_strength: Some(p.magnetic_field_strength),
        body_part_examined: Some("PROSTATE".into()),
        slice_thickness: Some(p.slice_thickness),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_and_case_round_trip_through_source() {
        let mut s = SourceInfo { patient_id: Some(patient_id(Site::E, 7)), ..Default::default() };
        assert_eq!(site_and_case_from_source(&s), Some((Site::E, 7)));
        s.patient_id = Some("anonymised 12".into());
        s.institution_name = Some(Site::C.institution_name());
        assert_eq!(site_and_case_from_source(&s), Some((Site::C, 12)));
        s.institution_name = Some("Some Hospital".into());
        assert_eq!(site_and_case_from_source(&s), None);
    }

    #[test]
    fn the_stack_always_covers_the_gland() {
        for site in Site::ALL {
            for case in 0..40u32 {
                let mut anat_rng = ChaCha20Rng::from_seed(stream_seed(site, case, 77, "anatomy"));
                let mut proto_rng = ChaCha20Rng::from_seed(stream_seed(site, case, 77, "protocol"));
                let mut place_rng = ChaCha20Rng::from_seed(stream_seed(site, case, 77, "placement"));
                let mut anatomy = anatomy::Anatomy::draw(&mut anat_rng, site.has_endorectal_coil());
                let gland_si = 2.0 * anatomy.gland.semi[2] * 1.1;
                let p = sites::draw_protocol(site, Size::Small, gland_si + 20.0, &mut proto_rng);
                // Odd cases in generation 2: its deformation must not push the gland out either.
                if case % 2 == 1 {
                    let seq = anatomy::Sequence {
                        echo_time_ms: p.echo_time_ms,
                        repetition_time_ms: p.repetition_time_ms,
                        field_strength_t: p.magnetic_field_strength,
                    };
                    let mut rng = ChaCha20Rng::from_seed(stream_seed(site, case, 77, "realism"));
                    anatomy.make_realistic(&mut rng, &seq);
                }
                let spec = site.spec();
                assert!(p.slice_thickness >= spec.slice_thickness.0 && p.slice_thickness <= spec.slice_thickness.1);
                assert!(p.slices >= spec.slices.0 && p.slices <= spec.slices.1);
                let g = acquisition::place(&p, &mut place_rng);
                let [nz, n, _] = g.dims;
                // Outer slices (edges of the slab included) never touch the gland.
                for z in [-0.5, 0.0, nz as f64 - 1.0, nz as f64 - 0.5] {
                    for y in (0..n).step_by(2) {
                        for x in (0..n).step_by(2) {
                            let w = g.world(x as f64, y as f64, z);
                            let a = [w[0] - g.gland_centre[0], w[1] - g.gland_centre[1], w[2] - g.gland_centre[2]];
                            assert_eq!(anatomy.zone(a), anatomy::Zone::Outside, "site {site} case {case} slice {z}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn uids_are_valid_and_distinct() {
        let a = uid_for("x");
        let b = uid_for("y");
        assert_ne!(a, b);
        assert!(a.len() <= 64 && a.starts_with("2.25."));
        assert!(a[5..].chars().all(|c| c.is_ascii_digit()) && !a[5..].starts_with('0'));
    }
}

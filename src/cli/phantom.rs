//! `desam phantom`: writes synthetic six-site prostate MR cases (DICOM or nnU-Net NIfTI) or a PNG
//! montage of the sites. Owns argument handling and file layout only; the generator is crate::phantom.

use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::phantom::{self, export, GenerateOptions, Generation, Site, Size};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Site to imitate: A (RUNMC), B (BMC), C (HCRUDB), D (UCL), E (BIDMC), F (HK).
    #[arg(long)]
    pub site: Option<String>,
    /// Number of cases to write.
    #[arg(long, default_value_t = 1)]
    pub cases: u32,
    /// Index of the first case (cases are numbered first-case .. first-case + cases - 1).
    #[arg(long, default_value_t = 0)]
    pub first_case: u32,
    /// Random seed: the same (site, case, seed) always gives the same voxels.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// dicom (DIR/<case>/MR, SEG, label.nii.gz) or nifti (nnU-Net v1 imagesTr/labelsTr).
    #[arg(long, default_value = "dicom")]
    pub format: String,
    /// full (the site's real matrix) or small (quarter matrix, for tests).
    #[arg(long, default_value = "full")]
    pub size: String,
    /// Crop every slice to its central ROWSxCOLS (e.g. 257x193: 257 rows, 193 columns), for matrices
    /// no site has.
    #[arg(long)]
    pub crop: Option<String>,
    /// Also write each case's tissue map (fat, muscle, bone, ... as codes; legend `tissues.json`):
    /// DICOM: `<case>/tissues.nii.gz`; NIfTI: `labelsTr_tissues/<id>.nii.gz`.
    #[arg(long)]
    pub tissue_map: bool,
    /// Instead of cases, write a PNG montage of one case per site (mid-gland slice) to this file.
    #[arg(long)]
    pub montage: Option<PathBuf>,
    /// Which case index of each site the montage shows.
    #[arg(long, default_value_t = 0)]
    pub montage_case: u32,
    /// Montage panel size in pixels.
    #[arg(long, default_value_t = 320)]
    pub panel: usize,
    /// With --montage: generation 1 above --generation (2 when that is 1; mid-gland slice, whole
    /// field and a 90 mm square), instead of one generation's three rows.
    #[arg(long)]
    pub compare_generations: bool,
    /// Anatomy and contrast model: 1 (the phantom of models/default 0.3.0), 2 (relaxation-time
    /// contrast, deformed pelvis, fat lobules, layered rectum, thin lines) or 3 (2 plus a muscle
    /// grain, a puborectalis-only levator sling, the venous plexus, parallel-imaging noise at
    /// site A; docs/phantom.md).
    #[arg(long, default_value = "1")]
    pub generation: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let size: Size = args.size.parse()?;
    let generation: Generation = args.generation.parse()?;
    if let Some(png) = &args.montage {
        if args.panel < 32 || args.panel > 2048 {
            bail!("--panel must be between 32 and 2048 pixels");
        }
        let written = if args.compare_generations {
            // Generation 1 above the one asked for (generation 2 when none is).
            let after = if generation == Generation::V1 { Generation::V2 } else { generation };
            let both = [Generation::V1, after];
            phantom::montage::write_generations_montage(png, args.seed, args.montage_case, size, args.panel, &both)
        } else {
            phantom::montage::write_site_montage(png, args.seed, args.montage_case, size, args.panel, generation)
        };
        written.with_context(|| format!("writing montage {}", png.display()))?;
        return Ok(());
    }
    let site: Site = match &args.site {
        Some(s) => s.parse()?,
        None => bail!("--site is required (one of A, B, C, D, E, F) unless --montage is given"),
    };
    let Some(out) = &args.out else { bail!("--out is required unless --montage is given") };
    if args.cases == 0 {
        bail!("--cases must be at least 1");
    }
    let end = args.first_case.checked_add(args.cases).context("case range overflows")?;
    let nifti = match args.format.as_str() {
        "dicom" => false,
        "nifti" => true,
        other => bail!("unknown --format '{other}' (expected dicom or nifti)"),
    };
    // DeSAM's numeric patient ids (site·100 + case) leave 100 cases per site in the nnU-Net layout.
    let limit = if nifti { 100 } else { 1000 };
    if end > limit {
        bail!("case indices must stay below {limit} for --format {} (got up to {})", args.format, end - 1);
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let opts = GenerateOptions { size, tissue_map: args.tissue_map, generation, ..Default::default() };
    let crop = match &args.crop {
        None => None,
        Some(c) => {
            let parsed = c
                .split_once('x')
                .and_then(|(r, c)| Some((r.trim().parse::<usize>().ok()?, c.trim().parse::<usize>().ok()?)));
            Some(parsed.with_context(|| format!("--crop '{c}' is not ROWSxCOLS (e.g. 250x250)"))?)
        }
    };
    for case_index in args.first_case..end {
        let mut case = phantom::generate_case_with(site, case_index, args.seed, &opts);
        if let Some((rows, cols)) = crop {
            let [_, ny, nx] = case.image.dims;
            case.crop_in_plane(rows, cols).with_context(|| {
                format!("--crop {rows}x{cols} is larger than case {}'s {ny}x{nx} matrix", case.case_id)
            })?;
        }
        if nifti {
            let f = export::write_case_nifti(&case, out).with_context(|| format!("writing case {}", case.case_id))?;
            println!("{} {} ({:.1} mL)", case.case_id, f.image.display(), case.truth.gland_ml);
        } else {
            let f = export::write_case_dicom(&case, out).with_context(|| format!("writing case {}", case.case_id))?;
            println!("{} {} slices, SEG {} ({:.1} mL)", case.case_id, f.mr.len(), f.seg.display(), case.truth.gland_ml);
        }
    }
    Ok(())
}

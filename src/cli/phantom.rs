//! `desam phantom`: writes synthetic six-site prostate MR cases (DICOM or nnU-Net NIfTI) or a PNG
//! montage of the sites. Owns argument handling and file layout only; the generator is crate::phantom.

use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::phantom::{self, Site, Size};

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
    /// Instead of cases, write a PNG montage of one case per site (mid-gland slice) to this file.
    #[arg(long)]
    pub montage: Option<PathBuf>,
    /// Which case index of each site the montage shows.
    #[arg(long, default_value_t = 0)]
    pub montage_case: u32,
    /// Montage panel size in pixels.
    #[arg(long, default_value_t = 320)]
    pub panel: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let size: Size = args.size.parse()?;
    if let Some(png) = &args.montage {
        if args.panel < 32 || args.panel > 2048 {
            bail!("--panel must be between 32 and 2048 pixels");
        }
        phantom::montage::write_site_montage(png, args.seed, args.montage_case, size, args.panel)
            .with_context(|| format!("writing montage {}", png.display()))?;
        return Ok(());
    }
    let site: Site = match &args.site {
        Some(s) => s.parse()?,
        None => bail!("--site is required (one of A, B, C, D, E, F) unless --montage is given"),
    };
    let Some(out) = &args.out else { bail!("--out is required unless --montage is given") };
    let last = args.first_case.checked_add(args.cases).context("case range overflows")?;
    if args.cases == 0 {
        bail!("--cases must be at least 1");
    }
    if last > 1000 {
        bail!("case indices must stay below 1000 (got up to {})", last - 1);
    }
    match args.format.as_str() {
        "dicom" | "nifti" => {}
        other => bail!("unknown --format '{other}' (expected dicom or nifti)"),
    }
    let _ = (site, out, size);
    bail!("writing cases needs the DICOM/NIfTI writers, not merged yet")
}

//! `desam write-seg`: a DICOM-SEG from a given mask (a NIfTI label image, e.g. a corrected segmentation
//! from 3D Slicer) over the DICOM series it was drawn on. Runs no model; never writes over its input.

use anyhow::{bail, Context};
use std::path::PathBuf;

use crate::dicom::{self, AlgorithmType, SegOptions, Segment, SegmentInfo};
use crate::volume::{Mask, Volume};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AlgorithmTypeArg {
    Manual,
    Semiautomatic,
    Automatic,
}

impl From<AlgorithmTypeArg> for AlgorithmType {
    fn from(a: AlgorithmTypeArg) -> AlgorithmType {
        match a {
            AlgorithmTypeArg::Manual => AlgorithmType::Manual,
            AlgorithmTypeArg::Semiautomatic => AlgorithmType::Semiautomatic,
            AlgorithmTypeArg::Automatic => AlgorithmType::Automatic,
        }
    }
}

#[derive(clap::Args, Debug)]
#[command(after_help = "A reviewed segmentation: desam write-seg SERIES_DIR --mask corrected.nii.gz -o reviewed.dcm \
--creator \"Rossi^Anna\" --description \"DeSAM prostate reviewed\"")]
pub struct Args {
    /// The DICOM MR series folder the mask was drawn on (the SEG references it).
    pub series: PathBuf,
    /// The mask: a NIfTI label image (.nii / .nii.gz); voxels above 0 are the prostate. It is placed on
    /// the series' grid by world coordinates (nearest voxel), so any voxel order of the same grid works.
    #[arg(long)]
    pub mask: PathBuf,
    /// The DICOM-SEG to write (.dcm); it must not exist.
    #[arg(short, long)]
    pub output: PathBuf,
    /// ContentCreatorName (DICOM PN, e.g. "Rossi^Anna"): who made or corrected the mask.
    #[arg(long)]
    pub creator: Option<String>,
    /// SeriesDescription of the new SEG series.
    #[arg(long, default_value = "DeSAM prostate reviewed")]
    pub description: String,
    /// SegmentAlgorithmType: manual (drawn or corrected by a person), semiautomatic or automatic.
    #[arg(long, value_enum, default_value = "manual")]
    pub algorithm_type: AlgorithmTypeArg,
    /// The algorithm (ManufacturerModelName; SegmentAlgorithmName unless manual), e.g. the model that
    /// made the mask before it was corrected.
    #[arg(long, default_value = "DeSAM")]
    pub algorithm_name: String,
    /// AlgorithmVersion / SoftwareVersions, e.g. the model version the correction started from.
    #[arg(long, default_value = "reviewed")]
    pub algorithm_version: String,
}

/// Inverse of a 3×3 matrix (None when singular).
fn invert3(m: [[f64; 3]; 3]) -> Option<[[f64; 3]; 3]> {
    let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
    if det.abs() < 1e-12 {
        return None;
    }
    let mut inv = [[0.0; 3]; 3];
    for r in 0..3 {
        for c in 0..3 {
            let (r1, r2, c1, c2) = ((c + 1) % 3, (c + 2) % 3, (r + 1) % 3, (r + 2) % 3);
            inv[r][c] = (m[r1][c1] * m[r2][c2] - m[r1][c2] * m[r2][c1]) / det;
        }
    }
    Some(inv)
}

/// `mask` (on `mask_grid`) resampled onto `series` by nearest voxel in patient coordinates; series
/// voxels outside the mask's grid are background. Fails when nothing of the mask lands on the series.
fn mask_on_series(mask: &Mask, mask_grid: &Volume, series: &Volume) -> anyhow::Result<Mask> {
    let affine = mask_grid.affine_lps();
    let linear = [
        [affine[0][0], affine[0][1], affine[0][2]],
        [affine[1][0], affine[1][1], affine[1][2]],
        [affine[2][0], affine[2][1], affine[2][2]],
    ];
    let inverse = invert3(linear).context("the mask's grid is degenerate (zero spacing or parallel axes)")?;
    let [nz, ny, nx] = mask.dims;
    let mut out = Mask::zeros(series.dims);
    let mut i = 0;
    for z in 0..series.dims[0] {
        for y in 0..series.dims[1] {
            for x in 0..series.dims[2] {
                let p = series.index_to_world(x as f64, y as f64, z as f64);
                let d = [p[0] - affine[0][3], p[1] - affine[1][3], p[2] - affine[2][3]];
                let index: Vec<f64> =
                    (0..3).map(|r| inverse[r][0] * d[0] + inverse[r][1] * d[1] + inverse[r][2] * d[2]).collect();
                let (mx, my, mz) = (index[0].round(), index[1].round(), index[2].round());
                let inside = mx >= 0.0 && my >= 0.0 && mz >= 0.0 && mx < nx as f64 && my < ny as f64 && mz < nz as f64;
                if inside && mask.data[(mz as usize * ny + my as usize) * nx + mx as usize] > 0 {
                    out.data[i] = 1;
                }
                i += 1;
            }
        }
    }
    if mask.count() > 0 && out.count() == 0 {
        bail!("the mask does not overlap the series: was it drawn on another series?");
    }
    Ok(out)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.output.exists() {
        bail!("{} already exists; choose another --output", a.output.display());
    }
    let series = dicom::load_series_dir(&a.series).with_context(|| format!("reading {}", a.series.display()))?.volume;
    let (mask, grid) =
        crate::nifti::read_nifti_mask(&a.mask).with_context(|| format!("reading {}", a.mask.display()))?;
    let mask = mask_on_series(&mask, &grid, &series)?;
    let mut info = SegmentInfo::prostate(&a.algorithm_name);
    info.algorithm_type = a.algorithm_type.into();
    let mut opts = SegOptions::new(&a.algorithm_name, &a.algorithm_version);
    opts.series_description = Some(a.description.clone());
    opts.content_creator = a.creator.clone().filter(|c| !c.trim().is_empty());
    opts.content_label = "PROSTATE".into();
    opts.content_description = Some(match a.algorithm_type {
        AlgorithmTypeArg::Manual => "Prostate segmentation, reviewed and corrected".into(),
        _ => "Prostate segmentation".into(),
    });
    let bytes = dicom::write_seg(&series, &[Segment { info, mask: &mask }], &opts)?;
    let written = dicom::read_seg_standalone(&bytes).context("the written SEG does not read back")?;
    let pending = crate::atomic::Pending::beside(&a.output);
    std::fs::write(pending.path(), &bytes).with_context(|| format!("cannot write {}", a.output.display()))?;
    pending.commit().with_context(|| format!("cannot write {}", a.output.display()))?;
    // One JSON line for callers (the Slicer module): what was written.
    println!(
        "{}",
        serde_json::json!({
            "output": a.output,
            "sop_instance_uid": written.sop_instance_uid,
            "series_instance_uid": written.series_instance_uid,
            "voxels": mask.count(),
        })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mask_in_another_voxel_order_lands_on_the_same_voxels() {
        let series = Volume::new(vec![0.0; 2 * 3 * 4], [2, 3, 4], [1.0, 1.0, 2.0], [10.0, 20.0, 30.0]);
        let mut mask = Mask::zeros(series.dims);
        mask.data[(3 + 2) * 4 + 1] = 1; // z 1, y 2, x 1
                                        // The same grid with x flipped: origin at the last column, direction −x.
        let mut flipped = series.clone_geometry();
        flipped.origin = series.index_to_world(3.0, 0.0, 0.0);
        flipped.direction[0] = [-1.0, 0.0, 0.0];
        let mut flipped_mask = Mask::zeros(series.dims);
        flipped_mask.data[(3 + 2) * 4 + 2] = 1; // x 3 − 1
        assert_eq!(mask_on_series(&flipped_mask, &flipped, &series).unwrap(), mask);
        assert_eq!(invert3([[2.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 1.0]]).unwrap()[1][1], 0.25);
        let mut far = series.clone_geometry();
        far.origin = [1000.0, 0.0, 0.0];
        assert!(mask_on_series(&mask, &far, &series).unwrap_err().to_string().contains("overlap"));
    }
}

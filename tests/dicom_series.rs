//! Integration tests of the DICOM series reader and the MR writer on real files: our own writer,
//! pydicom-encoded transfer syntaxes, pydicom's test files, and the dciodvfy validator.

use std::path::{Path, PathBuf};
use std::process::Command;

use desam::dicom::*;
use desam::Volume;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("desam-dicomio-{}-{}", name, std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small oblique phantom: a bright ellipsoid in a gradient background, values in [0, 1000].
fn phantom(dims: [usize; 3], spacing: [f64; 3], direction: [[f64; 3]; 3]) -> Volume {
    let [nz, ny, nx] = dims;
    let mut vox = Vec::with_capacity(nz * ny * nx);
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let (dx, dy, dz) = (
                    (x as f64 - nx as f64 / 2.0) / (nx as f64 / 3.0),
                    (y as f64 - ny as f64 / 2.0) / (ny as f64 / 4.0),
                    (z as f64 - nz as f64 / 2.0) / (nz as f64 / 3.0),
                );
                let inside = dx * dx + dy * dy + dz * dz < 1.0;
                vox.push(if inside { 800.0 + z as f32 } else { (x + 2 * y + 3 * z) as f32 });
            }
        }
    }
    let mut v = Volume::new(vox, dims, spacing, [-40.0, -30.5, 12.25]);
    v.direction = direction;
    v
}

fn oblique() -> [[f64; 3]; 3] {
    let (a, b) = (20f64.to_radians(), 10f64.to_radians());
    let row = [a.cos(), a.sin(), 0.0];
    let col = [-a.sin() * b.cos(), a.cos() * b.cos(), b.sin()];
    let n = [
        row[1] * col[2] - row[2] * col[1],
        row[2] * col[0] - row[0] * col[2],
        row[0] * col[1] - row[1] * col[0],
    ];
    [row, col, n]
}

fn dciodvfy_errors(path: &Path) -> Vec<String> {
    let out = Command::new("dciodvfy").arg(path).output().expect("dciodvfy (dicom3tools) must be installed");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    text.lines().filter(|l| l.starts_with("Error")).map(str::to_string).collect()
}

#[test]
fn mr_writer_output_passes_dciodvfy() {
    let dir = scratch("dciodvfy");
    let vol = phantom([3, 12, 10], [0.6, 0.7, 3.3], oblique());
    for (i, enc) in [StoredPixels::Uint16, StoredPixels::Int16].into_iter().enumerate() {
        let mut attrs = MrSeriesAttributes { stored_pixels: enc, ..Default::default() };
        if enc == StoredPixels::Int16 {
            attrs.rescale = Some((0.5, -100.0));
        }
        let paths = write_mr_series(&vol, &attrs, &dir.join(i.to_string())).unwrap();
        assert_eq!(paths.len(), 3);
        for p in &paths {
            let errs = dciodvfy_errors(p);
            assert!(errs.is_empty(), "{}: {errs:?}", p.display());
        }
    }
}

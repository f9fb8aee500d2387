//! NIfTI interoperability against nibabel (the independent reference): our affines and voxel order
//! as nibabel sees them, nibabel-written oblique/qform-only/scaled files as we read them, nnU-Net layout.

use std::path::{Path, PathBuf};
use std::process::Command;

use desam::nifti::*;
use desam::{Mask, Volume};

fn python() -> PathBuf {
    std::env::var_os("DESAM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"))
}

fn run_py(script: &str, args: &[&Path]) -> String {
    let out = Command::new(python()).arg("-c").arg(script).args(args).output().expect("python");
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("desam-nifti-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn numbers(s: &str) -> Vec<f64> {
    s.split_whitespace().map(|t| t.parse().unwrap()).collect()
}

fn oblique_volume() -> Volume {
    let [nz, ny, nx] = [3usize, 4, 5];
    let vox: Vec<f32> = (0..nz * ny * nx).map(|i| (i * 7 % 23) as f32 - 4.5).collect();
    let mut v = Volume::new(vox, [nz, ny, nx], [0.6, 0.8, 2.5], [-31.0, 12.5, 44.0]);
    let (a, b) = (25f64.to_radians(), -15f64.to_radians());
    let row = [a.cos(), a.sin(), 0.0];
    let col = [-a.sin() * b.cos(), a.cos() * b.cos(), b.sin()];
    let n = [row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0]];
    v.direction = [row, col, n];
    v
}

const NIB_DUMP: &str = r#"
import sys, nibabel as nib, numpy as np
img = nib.load(sys.argv[1])
print(*img.affine[:3].ravel())
print(*img.get_sform()[:3].ravel(), int(img.header['sform_code']))
print(*img.get_qform()[:3].ravel(), int(img.header['qform_code']))
print(*img.shape)
print(*np.asarray(img.dataobj, dtype=np.float64).ravel(order='F'))
"#;

#[test]
fn nibabel_sees_our_affine_and_voxels() {
    let dir = scratch("ours");
    let v = oblique_volume();
    let ras = ras_affine(&v);
    for name in ["img.nii", "img.nii.gz"] {
        let p = dir.join(name);
        write_nifti(&p, &v).unwrap();
        let out = run_py(NIB_DUMP, &[&p]);
        let lines: Vec<&str> = out.lines().collect();
        let affine = numbers(lines[0]);
        let sform = numbers(lines[1]);
        let qform = numbers(lines[2]);
        assert_eq!(sform[12], 1.0);
        assert_eq!(qform[12], 1.0);
        for r in 0..3 {
            for c in 0..4 {
                let want = ras[r][c];
                for (label, got) in
                    [("affine", affine[r * 4 + c]), ("sform", sform[r * 4 + c]), ("qform", qform[r * 4 + c])]
                {
                    assert!((got - want).abs() < 1e-4, "{label}[{r}][{c}] = {got}, want {want}");
                }
            }
        }
        // LPS → RAS: x and y of the origin change sign.
        assert!((affine[3] + v.origin[0]).abs() < 1e-4 && (affine[7] + v.origin[1]).abs() < 1e-4);
        assert_eq!(numbers(lines[3]), vec![5.0, 4.0, 3.0]);
        // Fortran order of nibabel's [x, y, z] array is Volume's z-major order.
        let data = numbers(lines[4]);
        assert_eq!(data.len(), v.voxels.len());
        for (a, b) in data.iter().zip(&v.voxels) {
            assert_eq!(*a as f32, *b);
        }
    }
    // A mask written on the grid carries the same affine and its labels.
    let mut m = Mask::zeros(v.dims);
    m.data[7] = 1;
    m.data[40] = 3;
    let p = dir.join("mask.nii.gz");
    write_nifti_mask(&p, &m, &v).unwrap();
    let out = run_py(NIB_DUMP, &[&p]);
    let lines: Vec<&str> = out.lines().collect();
    let affine = numbers(lines[0]);
    for r in 0..3 {
        for c in 0..4 {
            assert!((affine[r * 4 + c] - ras[r][c]).abs() < 1e-4);
        }
    }
    let data = numbers(lines[4]);
    assert_eq!(data.iter().map(|&x| x as u8).collect::<Vec<_>>(), m.data);
}

const NIB_WRITE: &str = r#"
import sys, nibabel as nib, numpy as np
out = sys.argv[1]
a, b = np.radians(-35.0), np.radians(12.0)
rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
R = rz @ rx
aff = np.eye(4)
aff[:3, :3] = R @ np.diag([0.7, 0.9, 3.1])
aff[:3, 3] = [10.5, -20.25, 33.0]
data = (np.arange(6 * 5 * 4).reshape(6, 5, 4) * 3 - 40).astype(np.int16)
# 1) sform + qform, scaled int16
img = nib.Nifti1Image(data, aff)
img.header.set_slope_inter(0.5, 10.0)
nib.save(img, out + '/sform.nii.gz')
# 2) qform only, left-handed grid (x flipped)
aff2 = aff.copy(); aff2[:3, 0] *= -1
img2 = nib.Nifti1Image(data, None)
img2.set_qform(aff2, code=1)
img2.set_sform(None, code=0)
nib.save(img2, out + '/qform.nii')
# 3) sform_code set but the sform left all zeros: the qform must be used
img3 = nib.Nifti1Image(data, None)
img3.set_qform(aff, code=1)
img3.header['sform_code'] = 2
for k in ('srow_x', 'srow_y', 'srow_z'):
    img3.header[k] = [0, 0, 0, 0]
nib.save(img3, out + '/zero_sform.nii')
for name in ('sform.nii.gz', 'qform.nii', 'zero_sform.nii'):
    im = nib.load(out + '/' + name)
    # nibabel trusts a non-zero sform_code even with a zero sform; the expected geometry is the qform.
    best = im.get_qform() if name == 'zero_sform.nii' else im.affine
    print(name, *best[:3].ravel())
    print(*np.asarray(im.get_fdata(), dtype=np.float64).ravel(order='F'))
"#;

#[test]
fn we_read_nibabel_written_oblique_files() {
    let dir = scratch("nib");
    let out = run_py(NIB_WRITE, &[&dir]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6);
    for pair in lines.chunks(2) {
        let mut head = pair[0].split_whitespace();
        let name = head.next().unwrap();
        let affine: Vec<f64> = head.map(|t| t.parse().unwrap()).collect();
        let want_data = numbers(pair[1]);
        let v = read_nifti(&dir.join(name)).unwrap();
        assert_eq!(v.dims, [4, 5, 6], "{name}");
        let got = ras_affine(&v);
        for r in 0..3 {
            for c in 0..4 {
                assert!(
                    (got[r][c] - affine[r * 4 + c]).abs() < 1e-4,
                    "{name} affine[{r}][{c}]: {} vs {}",
                    got[r][c],
                    affine[r * 4 + c]
                );
            }
        }
        assert_eq!(v.voxels.len(), want_data.len());
        for (a, b) in v.voxels.iter().zip(&want_data) {
            assert!((*a as f64 - b).abs() < 1e-4, "{name}: {a} vs {b}");
        }
        // World position of a voxel agrees with nibabel's affine applied to the same index.
        let (i, j, k) = (3.0, 2.0, 1.0);
        let p = v.index_to_world(i, j, k);
        for r in 0..3 {
            let ras = affine[r * 4] * i + affine[r * 4 + 1] * j + affine[r * 4 + 2] * k + affine[r * 4 + 3];
            let lps = if r < 2 { -ras } else { ras };
            assert!((p[r] - lps).abs() < 1e-4);
        }
    }
    // The scaled file really used scl_slope: values are (raw*0.5 + 10), so the first one is -10.
    let v = read_nifti(&dir.join("sform.nii.gz")).unwrap();
    assert_eq!(v.voxels[0], -10.0);
}

#[test]
fn lists_nnunet_v1_cases() {
    let dir = scratch("nnunet");
    std::fs::create_dir_all(dir.join("imagesTr")).unwrap();
    std::fs::create_dir_all(dir.join("labelsTr")).unwrap();
    let v = oblique_volume();
    for id in ["prostate_02", "prostate_00"] {
        write_nifti(&dir.join(format!("imagesTr/{id}_0000.nii.gz")), &v).unwrap();
        write_nifti(&dir.join(format!("imagesTr/{id}_0001.nii.gz")), &v).unwrap();
    }
    write_nifti_mask(&dir.join("labelsTr/prostate_00.nii.gz"), &Mask::zeros(v.dims), &v).unwrap();
    std::fs::write(dir.join("imagesTr/._prostate_00_0000.nii.gz"), b"resource fork").unwrap();
    let cases = list_nnunet_cases(&dir).unwrap();
    assert_eq!(cases.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["prostate_00", "prostate_02"]);
    assert_eq!(cases[0].label.as_deref(), Some(dir.join("labelsTr/prostate_00.nii.gz").as_path()));
    assert_eq!(cases[1].label, None);
    assert_eq!(read_nifti(&cases[1].image).unwrap().dims, v.dims);
    assert!(matches!(list_nnunet_cases(&dir.join("labelsTr")), Err(NiftiError::Layout { .. })));
}

//! Integration tests of the six-site phantom: determinism, per-site protocol and image statistics
//! against shared/design/phantom-sites.md, and (where the writers exist) the files `desam phantom` writes.

use desam::phantom::{
    generate_case_with, site_and_case_from_source, GenerateOptions, PhantomCase, Site, Size, LABEL_PZ, LABEL_TZ,
};

fn small() -> GenerateOptions {
    GenerateOptions { size: Size::Small, ..Default::default() }
}

fn clean(sensitivity: bool) -> GenerateOptions {
    GenerateOptions { size: Size::Small, noise: false, sensitivity, ..Default::default() }
}

/// Voxels of `label` whose 4 in-plane neighbours carry the same label (away from partial volume).
fn interior(case: &PhantomCase, label: u8) -> Vec<usize> {
    let [nz, ny, nx] = case.labels.dims;
    let l = &case.labels.data;
    let mut out = Vec::new();
    for z in 0..nz {
        for y in 1..ny - 1 {
            for x in 1..nx - 1 {
                let i = (z * ny + y) * nx + x;
                if l[i] == label && l[i - 1] == label && l[i + 1] == label && l[i - nx] == label && l[i + nx] == label {
                    out.push(i);
                }
            }
        }
    }
    out
}

fn mean_at(v: &[f32], idx: &[usize]) -> f64 {
    idx.iter().map(|&i| v[i] as f64).sum::<f64>() / idx.len().max(1) as f64
}

#[test]
fn same_seed_same_voxels_different_seed_different_voxels() {
    let a = generate_case_with(Site::B, 3, 42, &small());
    let b = generate_case_with(Site::B, 3, 42, &small());
    assert_eq!(a.image.voxels, b.image.voxels);
    assert_eq!(a.labels, b.labels);
    assert_eq!(a.image.source, b.image.source);
    let c = generate_case_with(Site::B, 3, 43, &small());
    assert_ne!(a.image.voxels, c.image.voxels);
    let d = generate_case_with(Site::B, 4, 42, &small());
    assert_ne!(a.image.voxels, d.image.voxels);
    assert_ne!(
        a.image.source.as_ref().unwrap().series_instance_uid,
        d.image.source.as_ref().unwrap().series_instance_uid
    );
}

/// The site table of phantom-sites.md (in-plane mm range, slice mm range, field of view mm range).
fn table(site: Site) -> ((f64, f64), (f64, f64), (f64, f64)) {
    match site {
        Site::A => ((0.6, 0.625), (3.6, 4.0), (180.0, 210.0)),
        Site::B => ((0.4, 0.4), (3.0, 3.0), (180.0, 210.0)),
        Site::C => ((0.67, 0.79), (1.25, 1.25), (160.0, 210.0)),
        Site::D => ((0.325, 0.625), (3.0, 3.6), (140.0, 200.0)),
        Site::E => ((0.25, 0.25), (2.2, 3.0), (125.0, 140.0)),
        Site::F => ((0.625, 0.625), (3.6, 3.6), (180.0, 210.0)),
    }
}

#[test]
fn protocol_and_geometry_follow_the_site_table() {
    for site in Site::ALL {
        let (inplane, slice, fov) = table(site);
        for case in 0..2 {
            let c = generate_case_with(site, case, 7, &small());
            let p = &c.protocol;
            let tag = format!("site {site} case {case}");
            assert!(
                p.full_pixel_spacing >= inplane.0 - 1e-9 && p.full_pixel_spacing <= inplane.1 + 1e-9,
                "{tag}: {p:?}"
            );
            assert!(p.slice_thickness >= slice.0 - 1e-9 && p.slice_thickness <= slice.1 + 1e-9, "{tag}: {p:?}");
            assert!((256..=512).contains(&p.full_matrix), "{tag}: matrix {}", p.full_matrix);
            let f = p.field_of_view_mm();
            assert!(f >= fov.0 && f <= fov.1, "{tag}: FOV {f}");
            let slices_ok = if site == Site::C { (56..=64).contains(&p.slices) } else { (15..=30).contains(&p.slices) };
            assert!(slices_ok, "{tag}: {} slices", p.slices);
            // The generated grid has the site's field of view and slice spacing.
            let v = &c.image;
            assert_eq!(v.dims[0], p.slices);
            assert!((v.spacing[0] * v.nx() as f64 - f).abs() < 1e-6, "{tag}: grid FOV");
            assert!((v.spacing[2] - p.slice_thickness).abs() < 1e-9);
            assert_eq!(v.nx(), p.full_matrix / 4);
            // Oblique axial (rotation about left-right) for D and F only.
            let tilt = v.direction[1][2].abs().asin().to_degrees();
            if site.is_oblique() {
                assert!((5.0 - 1e-6..=20.0 + 1e-6).contains(&tilt), "{tag}: tilt {tilt}");
            } else {
                assert!(tilt < 1e-9, "{tag}: tilt {tilt}");
            }
            assert!((v.direction[0][0] - 1.0).abs() < 1e-12, "row direction stays left-right");
            // Field strength per site (D mixes 1.5 and 3 T).
            let fs = p.magnetic_field_strength;
            match site {
                Site::A | Site::C | Site::E => assert_eq!(fs, 3.0),
                Site::B | Site::F => assert_eq!(fs, 1.5),
                Site::D => assert!(fs == 1.5 || fs == 3.0),
            }
            assert_eq!(p.endorectal_coil, site.has_endorectal_coil());
            // Vendor scale.
            let stored = c.stored_voxels();
            let max = *stored.iter().max().unwrap();
            assert!((300..=4000).contains(&max), "{tag}: stored max {max}");
            assert_eq!(p.rescale.is_some(), site == Site::B, "{tag}: only Philips writes RescaleSlope");
            let (slope, icpt) = p.rescale.unwrap_or((1.0, 0.0));
            for (s, v) in stored.iter().zip(v.voxels.iter()) {
                assert!((*s as f64 * slope + icpt - *v as f64).abs() < 1e-2, "{tag}: voxel = stored·slope + intercept");
            }
            // Headers identify site and case.
            let src = v.source.as_ref().unwrap();
            assert_eq!(site_and_case_from_source(src), Some((site, case)));
            assert_eq!(src.institution_name.as_deref(), Some(format!("DESAM PHANTOM SITE {site}").as_str()));
            let man = src.manufacturer.as_deref().unwrap();
            let expected = match site {
                Site::B => "Philips Medical Systems",
                Site::E => "GE MEDICAL SYSTEMS",
                _ => "SIEMENS",
            };
            assert_eq!(man, expected);
            assert_eq!(v.slices.len(), p.slices);
            // Slice positions step along the slice normal by the spacing.
            let d = v.slices[1].position;
            let o = v.slices[0].position;
            let step: f64 = (0..3).map(|a| (d[a] - o[a]) * v.direction[2][a]).sum();
            assert!((step - v.spacing[2]).abs() < 1e-9);
        }
    }
}

#[test]
fn gland_volume_zones_and_contrast_are_realistic() {
    for site in Site::ALL {
        for case in 0..2 {
            let c = generate_case_with(site, case, 11, &clean(false));
            let tag = format!("site {site} case {case}");
            let t = &c.truth;
            assert!((15.0..=80.0).contains(&t.gland_ml), "{tag}: gland {} mL", t.gland_ml);
            // Both zones present; the PZ is a substantial crescent, not a sliver or the whole gland.
            let pz_share = t.pz_ml / t.gland_ml;
            assert!((0.3..=0.8).contains(&pz_share), "{tag}: PZ share {pz_share}");
            assert!((5.0..=15.0).contains(&t.pz_thickness_mm));
            // The gland spans roughly 3-6 cm superior-inferior: 10-15 slices at 3.6 mm.
            let [nz, ny, nx] = c.labels.dims;
            let slices_with_gland = (0..nz).filter(|&z| c.labels.slice(z).iter().any(|&l| l > 0)).count();
            let si_mm = slices_with_gland as f64 * c.image.spacing[2];
            assert!((25.0..=70.0).contains(&si_mm), "{tag}: gland SI extent {si_mm} mm");
            // No gland on the first or last slice: the stack covers it.
            assert!(
                c.labels.slice(0).iter().all(|&l| l == 0) && c.labels.slice(nz - 1).iter().all(|&l| l == 0),
                "{tag}"
            );
            let _ = (ny, nx);
            // Noise-free, uniform-sensitivity contrast: TZ (with nodules and stroma) darker than PZ.
            let pz = mean_at(&c.image.voxels, &interior(&c, LABEL_PZ));
            let tz = mean_at(&c.image.voxels, &interior(&c, LABEL_TZ));
            let ratio = tz / pz;
            assert!((0.55..=0.9).contains(&ratio), "{tag}: TZ/PZ {ratio}");
        }
    }
}

#[test]
fn noise_matches_the_site_snr() {
    for site in Site::ALL {
        let a = generate_case_with(site, 1, 5, &small());
        let b = generate_case_with(site, 1, 5, &GenerateOptions { noise_realisation: 1, ..small() });
        // Two repeats differ only by noise (NEMA two-acquisition method): sigma = std(diff)/sqrt(2).
        let pz = interior(&a, LABEL_PZ);
        assert!(pz.len() > 30, "site {site}: {} interior PZ voxels", pz.len());
        let diffs: Vec<f64> = pz.iter().map(|&i| (a.image.voxels[i] - b.image.voxels[i]) as f64).collect();
        let m = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let var = diffs.iter().map(|d| (d - m) * (d - m)).sum::<f64>() / (diffs.len() - 1) as f64;
        let sigma = (var / 2.0).sqrt();
        let snr = 0.5 * (mean_at(&a.image.voxels, &pz) + mean_at(&b.image.voxels, &pz)) / sigma;
        let spec = site.spec().snr_at(a.protocol.magnetic_field_strength);
        assert!(snr > spec.0 * 0.75 && snr < spec.1 * 1.35, "site {site}: measured SNR {snr}, range {spec:?}");
        assert!((10.0 * 0.75..=40.0 * 1.35).contains(&snr));
        // The generator's own sigma agrees with the measurement.
        let rel = sigma / a.truth.noise_sigma;
        assert!((0.8..1.25).contains(&rel), "site {site}: sigma measured/designed {rel}");
    }
}

/// Mean of `v` over gland voxels posterior (larger row index) / anterior of the gland's centroid row.
fn posterior_anterior_ratio(case: &PhantomCase, v: &[f32]) -> f64 {
    let [nz, ny, nx] = case.labels.dims;
    let mut rows = Vec::new();
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                if case.labels.data[(z * ny + y) * nx + x] > 0 {
                    rows.push(y as f64);
                }
            }
        }
    }
    let cy = rows.iter().sum::<f64>() / rows.len() as f64;
    let (mut post, mut ant) = (Vec::new(), Vec::new());
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let i = (z * ny + y) * nx + x;
                if case.labels.data[i] > 0 {
                    if (y as f64) > cy + 2.0 {
                        post.push(i)
                    } else if (y as f64) < cy - 2.0 {
                        ant.push(i)
                    }
                }
            }
        }
    }
    mean_at(v, &post) / mean_at(v, &ant)
}

#[test]
fn endorectal_hot_spot_only_on_b_e_f() {
    for site in Site::ALL {
        let on = generate_case_with(site, 2, 9, &clean(true));
        let off = generate_case_with(site, 2, 9, &clean(false));
        // The receive sensitivity the scanner applied (image with / image without).
        let gain: Vec<f32> = on
            .image
            .voxels
            .iter()
            .zip(off.image.voxels.iter())
            .map(|(a, b)| if *b > 0.0 { a / b } else { 0.0 })
            .collect();
        let g = posterior_anterior_ratio(&on, &gain);
        // And in the image itself (noise included): posterior gland brighter than anterior.
        let noisy = generate_case_with(site, 2, 9, &small());
        let img = posterior_anterior_ratio(&noisy, &noisy.image.voxels);
        if site.has_endorectal_coil() {
            assert!(g > 1.7, "site {site}: posterior/anterior sensitivity {g}");
            assert!(img > 2.0, "site {site}: posterior/anterior image ratio {img}");
        } else {
            assert!(g < 1.25, "site {site}: posterior/anterior sensitivity {g}");
            assert!(img < 1.8, "site {site}: posterior/anterior image ratio {img}");
        }
    }
}

// ---- Files written by `desam phantom` ----

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("desam-phantom-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn run_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_desam")).arg("phantom").args(args).output().expect("run desam")
}

#[test]
fn dicom_output_reads_back_with_geometry_voxels_and_seg_ground_truth() {
    let out = scratch("dicom");
    // B: Philips RescaleSlope; D: oblique axial.
    for (site, case) in [(Site::B, 3u32), (Site::D, 0u32)] {
        let letter = site.to_string();
        let o = run_cli(&[
            "--site",
            &letter,
            "--cases",
            "1",
            "--first-case",
            &case.to_string(),
            "--seed",
            "21",
            "--format",
            "dicom",
            "--size",
            "small",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let expected = generate_case_with(site, case, 21, &small());
        let case_dir = out.join(&expected.case_id);
        let loaded = desam::dicom::load_series_dir(&case_dir.join("MR")).expect("MR series reads back").volume;
        assert_eq!(loaded.dims, expected.image.dims);
        for a in 0..3 {
            assert!((loaded.spacing[a] - expected.image.spacing[a]).abs() < 1e-4, "spacing {a}");
            assert!((loaded.origin[a] - expected.image.origin[a]).abs() < 1e-3, "origin {a}");
            for b in 0..3 {
                assert!((loaded.direction[a][b] - expected.image.direction[a][b]).abs() < 1e-5, "direction");
            }
        }
        let max_err =
            loaded.voxels.iter().zip(expected.image.voxels.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_err < 1e-2, "site {site}: voxels differ by {max_err}");
        let src = loaded.source.as_ref().expect("source attributes");
        assert_eq!(site_and_case_from_source(src), Some((site, case)));
        assert_eq!(src.manufacturer, expected.image.source.as_ref().unwrap().manufacturer);
        assert_eq!(src.magnetic_field_strength, Some(expected.protocol.magnetic_field_strength));
        if site == Site::D {
            assert!(loaded.direction[1][2].abs() > (5f64).to_radians().sin() - 1e-6, "oblique IOP survives");
        }

        // DICOM-SEG ground truth: one MANUAL prostate segment equal to the gland label.
        let bytes = std::fs::read(case_dir.join("SEG/seg.dcm")).unwrap();
        let segs = desam::dicom::read_seg(&bytes, &loaded).expect("SEG reads against its source");
        assert_eq!(segs.len(), 1);
        let (info, mask) = &segs[0];
        assert_eq!(info.algorithm_type, desam::dicom::AlgorithmType::Manual);
        assert_eq!(info.label, "Prostate");
        assert_eq!(mask.data, expected.gland_mask().data, "site {site}: SEG equals the ground truth");

        // Independent validator (dicom3tools): no errors in the SEG or an MR instance.
        for f in [case_dir.join("SEG/seg.dcm"), case_dir.join("MR/MR_0001.dcm")] {
            let v =
                std::process::Command::new("dciodvfy").arg(&f).output().expect("dciodvfy (dicom3tools) is installed");
            let text = String::from_utf8_lossy(&v.stderr).to_string() + &String::from_utf8_lossy(&v.stdout);
            assert!(!text.contains("Error"), "dciodvfy {}: {text}", f.display());
        }

        let (label, grid) = desam::nifti::read_nifti_mask(&case_dir.join("label.nii.gz")).unwrap();
        assert_eq!(label.data, expected.gland_mask().data);
        assert!((grid.origin[0] - expected.image.origin[0]).abs() < 1e-3);
        let (zones, _) = desam::nifti::read_nifti_mask(&case_dir.join("zones.nii.gz")).unwrap();
        assert_eq!(zones.data, expected.labels.data);
    }
    // Never overwrite: the same case again is refused with a clear message.
    let o =
        run_cli(&["--site", "D", "--cases", "1", "--seed", "21", "--size", "small", "--out", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn nifti_output_is_an_nnunet_task_with_desam_patient_ids() {
    let out = scratch("nifti");
    for site in ["A", "E"] {
        let o = run_cli(&[
            "--site",
            site,
            "--cases",
            "2",
            "--seed",
            "4",
            "--format",
            "nifti",
            "--size",
            "small",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let cases = desam::nifti::list_nnunet_cases(&out).unwrap();
    let ids: Vec<&str> = cases.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["prostate_000", "prostate_001", "prostate_400", "prostate_401"]);
    assert!(cases.iter().all(|c| c.label.is_some()));
    let csv = std::fs::read_to_string(out.join("prostate_patientid.csv")).unwrap();
    assert_eq!(csv, "center,patientid\nA-ISBI,0\nA-ISBI,1\nE-BIDMC,400\nE-BIDMC,401\n");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("dataset.json")).unwrap()).unwrap();
    assert_eq!(json["numTraining"], 4);

    let expected = generate_case_with(Site::E, 1, 4, &small());
    let img = desam::nifti::read_nifti(&cases[3].image).unwrap();
    assert_eq!(img.dims, expected.image.dims);
    assert_eq!(img.voxels, expected.image.voxels);
    for a in 0..3 {
        assert!((img.origin[a] - expected.image.origin[a]).abs() < 1e-3);
    }
    let (label, _) = desam::nifti::read_nifti_mask(cases[3].label.as_ref().unwrap()).unwrap();
    assert_eq!(label.data, expected.gland_mask().data);
    assert!(label.data.iter().all(|&v| v <= 1));

    // Bad input: a clear error and a non-zero exit.
    for bad in [
        vec!["--site", "G", "--out", "x"],
        vec!["--site", "A", "--format", "png", "--out", "x"],
        vec!["--site", "A", "--format", "nifti", "--first-case", "99", "--cases", "2", "--out", "x"],
        vec!["--site", "A"],
    ] {
        let o = run_cli(&bad);
        assert!(!o.status.success(), "{bad:?} should fail");
        assert!(String::from_utf8_lossy(&o.stderr).starts_with("desam: error:"), "{bad:?}");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn montage_png_shows_six_sites() {
    let out = scratch("montage");
    std::fs::create_dir_all(&out).unwrap();
    let png_path = out.join("m.png");
    let o = run_cli(&["--montage", png_path.to_str().unwrap(), "--seed", "3", "--size", "small", "--panel", "64"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let decoder = png::Decoder::new(std::fs::File::open(&png_path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (6 * 64 + 5 * 4, 3 * 64 + 2 * 4));
    // The contour colour (yellow) appears in every site's lower panel.
    for i in 0..6usize {
        let x0 = i * 68;
        let mut yellow = 0;
        for y in 68..132usize {
            for x in x0..x0 + 64 {
                let p = (y * info.width as usize + x) * 3;
                if buf[p] == 255 && buf[p + 1] == 220 && buf[p + 2] == 0 {
                    yellow += 1;
                }
            }
        }
        assert!(yellow > 10, "site panel {i}: {yellow} contour pixels");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn crop_in_plane_keeps_every_voxel_where_it_was() {
    // An odd-sized central crop of an axial (A) and an oblique (D) grid.
    for site in [Site::A, Site::D] {
        let full = generate_case_with(site, 0, 3, &small());
        let [nz, ny, nx] = full.image.dims;
        let (rows, cols) = (ny - 7, nx - 10);
        let mut c = full.clone();
        c.crop_in_plane(rows, cols).expect("smaller crop fits");
        assert_eq!(c.image.dims, [nz, rows, cols]);
        assert_eq!(c.labels.dims, [nz, rows, cols]);
        let (y0, x0) = ((ny - rows) / 2, (nx - cols) / 2);
        let world = |v: &desam::Volume, z: usize, y: usize, x: usize| -> [f64; 3] {
            let d = v.direction;
            let s = v.spacing;
            std::array::from_fn(|a| {
                v.origin[a] + d[0][a] * s[0] * x as f64 + d[1][a] * s[1] * y as f64 + d[2][a] * s[2] * z as f64
            })
        };
        for (z, y, x) in [(0, 0, 0), (nz - 1, rows - 1, cols - 1), (nz / 2, rows / 3, cols / 2)] {
            let (a, b) = (world(&c.image, z, y, x), world(&full.image, z, y + y0, x + x0));
            assert!((0..3).all(|i| (a[i] - b[i]).abs() < 1e-9), "{site:?}: {a:?} vs {b:?}");
            assert_eq!(c.image.voxels[(z * rows + y) * cols + x], full.image.voxels[(z * ny + y + y0) * nx + x + x0]);
            assert_eq!(c.labels.data[(z * rows + y) * cols + x], full.labels.data[(z * ny + y + y0) * nx + x + x0]);
        }
        assert_eq!(c.clone().crop_in_plane(rows + 1, cols), None, "a crop larger than the case is refused");
    }
}

/// Tissue codes the painter uses inside the gland label: capsule to neurovascular bundle, one run of
/// codes in the legend (capsule and bundles at the gland's edge included).
fn gland_tissue_codes() -> Vec<u8> {
    use desam::phantom::anatomy::Tissue;
    (Tissue::Capsule as u8..=Tissue::NeurovascularBundle as u8).collect()
}

/// The tissue map (`--tissue-map`): same grid, the image unchanged by asking for it, the gland's
/// labelled voxels are gland tissues, fat and muscle are where the map says they are (their image
/// signal is the table's: fat bright, muscle dark), and the NIfTI export carries map and legend.
#[test]
fn tissue_map_names_what_each_voxel_shows() {
    use desam::phantom::anatomy::Tissue;
    let with = GenerateOptions { tissue_map: true, ..clean(false) };
    let case = generate_case_with(Site::C, 2, 7, &with);
    let plain = generate_case_with(Site::C, 2, 7, &clean(false));
    assert_eq!(case.image.voxels, plain.image.voxels, "the map must not change the image");
    assert!(plain.tissues.is_none());
    let map = case.tissues.as_ref().expect("asked for");
    assert_eq!(map.dims, case.labels.dims);
    let gland = gland_tissue_codes();
    let pz = interior(&case, LABEL_PZ);
    let in_gland = pz.iter().filter(|&&i| gland.contains(&map.data[i])).count();
    assert!(in_gland as f64 > 0.95 * pz.len() as f64, "{in_gland} of {} PZ voxels are gland tissue", pz.len());
    let of = |t: Tissue| -> Vec<usize> { (0..map.data.len()).filter(|&i| map.data[i] == t as u8).collect() };
    let (fat, muscle, air) = (of(Tissue::Fat), of(Tissue::Muscle), of(Tissue::Air));
    assert!(
        fat.len() > 1000 && muscle.len() > 1000 && air.len() > 1000,
        "{} {} {}",
        fat.len(),
        muscle.len(),
        air.len()
    );
    let (f, m, a) =
        (mean_at(&case.image.voxels, &fat), mean_at(&case.image.voxels, &muscle), mean_at(&case.image.voxels, &air));
    assert!(f > 2.0 * m && m > 3.0 * a, "fat {f:.0}, muscle {m:.0}, air {a:.0}");

    let out = scratch("tissues");
    let o = run_cli(
        &["--site", "C", "--cases", "1", "--first-case", "2", "--seed", "7", "--format", "nifti"]
            .into_iter()
            .chain(["--size", "small", "--tissue-map", "--out", out.to_str().unwrap()])
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (read, _) = desam::nifti::read_nifti_mask(&out.join("labelsTr_tissues/prostate_202.nii.gz")).unwrap();
    let noisy = generate_case_with(Site::C, 2, 7, &GenerateOptions { tissue_map: true, ..small() });
    assert_eq!(read.data, noisy.tissues.unwrap().data);
    let legend: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("labelsTr_tissues/tissues.json")).unwrap()).unwrap();
    assert_eq!((legend["fat"].as_u64(), legend["muscle"].as_u64()), (Some(2), Some(4)));
    let _ = std::fs::remove_dir_all(&out);
}

/// `--generation 2` repaints the same case: same protocol and grid, other voxels, labels moved with
/// the deformed pelvis and still painted as gland; the default stays generation 1; `--generation 4`
/// is refused with the choices.
#[test]
fn generation_two_repaints_the_same_case() {
    use desam::phantom::anatomy::Tissue;
    use desam::phantom::Generation;
    let v1 = generate_case_with(Site::D, 4, 7, &clean(true));
    let v2 = generate_case_with(
        Site::D,
        4,
        7,
        &GenerateOptions { generation: Generation::V2, tissue_map: true, ..clean(true) },
    );
    assert_eq!(
        generate_case_with(Site::D, 4, 7, &GenerateOptions { generation: Generation::V1, ..clean(true) }).image.voxels,
        v1.image.voxels
    );
    assert_eq!(
        (v1.image.dims, v1.image.spacing, v1.protocol.echo_time_ms),
        (v2.image.dims, v2.image.spacing, v2.protocol.echo_time_ms)
    );
    assert_ne!(v1.image.voxels, v2.image.voxels);
    assert_ne!(v1.labels.data, v2.labels.data, "the deformation moves the gland and its labels");
    let map = v2.tissues.as_ref().unwrap();
    let gland = gland_tissue_codes();
    let pz = interior(&v2, LABEL_PZ);
    let painted = pz.iter().filter(|&&i| gland.contains(&map.data[i])).count();
    assert!(
        pz.len() > 50 && painted as f64 > 0.95 * pz.len() as f64,
        "{painted} of {} PZ voxels painted as gland",
        pz.len()
    );
    let muscle: Vec<usize> = (0..map.data.len()).filter(|&i| map.data[i] == Tissue::Muscle as u8).collect();
    let (m, p) = (mean_at(&v2.image.voxels, &muscle), mean_at(&v2.image.voxels, &pz));
    assert!(m < 0.35 * p, "muscle {m:.0} against PZ {p:.0}: relaxation contrast keeps muscle dark");

    let o = run_cli(&["--montage", "/nonexistent/x.png", "--generation", "4"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("expected 1, 2 or 3"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Generation 3 adds parallel-imaging noise (g·√2, g 1.1–1.3) at site A only: relative to the mean
/// PZ signal the noise grows by 1.5–1.9 there and stays within a few percent elsewhere; the venous
/// plexus is in the tissue map.
#[test]
fn generation_three_adds_parallel_imaging_noise_at_site_a_only() {
    use desam::phantom::anatomy::Tissue;
    use desam::phantom::Generation;
    // Noise relative to the PZ signal: the spread of (noisy - noise-free) over the PZ interior.
    let relative_noise = |site: Site, generation: Generation| {
        let noisy = generate_case_with(site, 1, 3, &GenerateOptions { generation, tissue_map: true, ..small() });
        let clean = generate_case_with(site, 1, 3, &GenerateOptions { generation, noise: false, ..small() });
        let pz = interior(&clean, LABEL_PZ);
        // The vendor scale is fixed by the noise-free image, so both share it.
        let d: Vec<f64> = pz.iter().map(|&i| (noisy.image.voxels[i] - clean.image.voxels[i]) as f64).collect();
        let m = d.iter().sum::<f64>() / d.len() as f64;
        let sd = (d.iter().map(|x| (x - m).powi(2)).sum::<f64>() / d.len() as f64).sqrt();
        let plexus = noisy.tissues.unwrap().data.iter().filter(|&&t| t == Tissue::VenousPlexus as u8).count();
        (sd / mean_at(&clean.image.voxels, &pz), plexus)
    };
    let (a2, plexus2) = relative_noise(Site::A, Generation::V2);
    let (a3, plexus3) = relative_noise(Site::A, Generation::V3);
    let (d2, _) = relative_noise(Site::D, Generation::V2);
    let (d3, _) = relative_noise(Site::D, Generation::V3);
    assert!((1.45..2.0).contains(&(a3 / a2)), "site A noise {a2:.4} -> {a3:.4}");
    assert!((0.9..1.1).contains(&(d3 / d2)), "site D noise {d2:.4} -> {d3:.4}");
    assert!(plexus2 == 0 && plexus3 > 0, "venous plexus voxels {plexus2} -> {plexus3}");
}

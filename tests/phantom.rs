//! Integration tests of the six-site phantom: determinism, per-site protocol and image statistics
//! against shared/design/phantom-sites.md, and (where the writers exist) the files `desam phantom` writes.

use desam::phantom::{
    generate_case_with, site_and_case_from_source, GenerateOptions, PhantomCase, Site, Size, LABEL_PZ, LABEL_TZ,
};

fn small() -> GenerateOptions {
    GenerateOptions { size: Size::Small, ..Default::default() }
}

fn clean(sensitivity: bool) -> GenerateOptions {
    GenerateOptions { size: Size::Small, noise: false, sensitivity, noise_realisation: 0 }
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
    assert_ne!(a.image.source.as_ref().unwrap().series_instance_uid, d.image.source.as_ref().unwrap().series_instance_uid);
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
            assert!(p.full_pixel_spacing >= inplane.0 - 1e-9 && p.full_pixel_spacing <= inplane.1 + 1e-9, "{tag}: {p:?}");
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
            let max = v.voxels.iter().cloned().fold(0f32, f32::max);
            assert!((300.0..=4000.0).contains(&max), "{tag}: stored max {max}");
            assert!(v.voxels.iter().all(|&x| x >= 0.0 && x.fract() == 0.0), "{tag}: stored values are uint16");
            assert_eq!(p.rescale.is_some(), site == Site::B, "{tag}: only Philips writes RescaleSlope");
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
            assert!(c.labels.slice(0).iter().all(|&l| l == 0) && c.labels.slice(nz - 1).iter().all(|&l| l == 0), "{tag}");
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
        let rel = sigma / a.truth.noise_sigma_stored;
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
        let gain: Vec<f32> =
            on.image.voxels.iter().zip(off.image.voxels.iter()).map(|(a, b)| if *b > 0.0 { a / b } else { 0.0 }).collect();
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

//! Hostile inputs against the command line (issue 13): a generated corpus of malformed DICOM, NIfTI,
//! model directories and checkpoints; every case must end in exit 1 with one line (or a clean success),
//! never a signal, a panic or a timeout, with peak RSS within 300 MB of a valid one-slice series.

use desam::dicom::{self, MrSeriesAttributes};
use desam::engine::{create_untrained_model_dir, BackboneSource};
use desam::model::Arch;
use desam::Volume;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Peak RSS a hostile case may add over the same command on a valid one-slice series.
const RSS_MARGIN_KB: u64 = 300 * 1024;
const CASE_TIMEOUT: Duration = Duration::from_secs(180);

fn work() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("desam-hostile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fn python() -> PathBuf {
    std::env::var_os("DESAM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"))
}

/// The tiny model and the corpus, made once per test binary.
fn corpus() -> &'static (PathBuf, Vec<Value>) {
    static C: OnceLock<(PathBuf, Vec<Value>)> = OnceLock::new();
    C.get_or_init(|| {
        let model = work().join("tiny");
        create_untrained_model_dir(Arch::Tiny, &model, 3, &BackboneSource::Random).unwrap();
        let voxels: Vec<f32> = (0..64 * 64).map(|i| ((i * 7919) % 1000) as f32).collect();
        let vol = Volume::new(voxels, [1, 64, 64], [0.8, 0.8, 3.0], [0.0, 0.0, 0.0]);
        let attrs = MrSeriesAttributes { series_description: "t2_tse_tra".into(), ..Default::default() };
        let written = dicom::write_mr_series_full(&vol, &attrs, &work().join("template")).unwrap();
        let out = work().join("corpus");
        let o = Command::new(python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/hostile_corpus.py"))
            .args([&written.paths[0], &model, &out])
            .output()
            .expect("the venv's python (scripts/setup.sh)");
        assert!(o.status.success(), "corpus generator failed: {}", String::from_utf8_lossy(&o.stderr));
        let manifest: Vec<Value> = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        (model, manifest)
    })
}

/// The corpus' valid one-slice series (the reference every case is compared with).
fn valid_one_slice() -> PathBuf {
    let case = corpus().1.iter().find(|c| c["name"] == "valid_one_slice").expect("reference case");
    PathBuf::from(case["input"].as_str().unwrap())
}

struct Run {
    code: Option<i32>,
    stderr: String,
    peak_rss_kb: u64,
    seconds: f64,
}

/// Runs `bin args` under /usr/bin/time (peak RSS) with extra environment, killing it at the timeout.
fn run(bin: &str, args: &[&str], env: &[(String, String)]) -> Run {
    let rss_file = work().join(format!(
        "rss-{}.txt",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    ));
    let mut cmd = Command::new("/usr/bin/time");
    cmd.args(["-f", "%M", "-o"]).arg(&rss_file).arg(bin).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t0 = Instant::now();
    let mut child =
        cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("/usr/bin/time (Debian package time)");
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > CASE_TIMEOUT {
            let _ = child.kill();
            panic!("{bin} {args:?} did not finish within {CASE_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let peak_rss_kb = std::fs::read_to_string(&rss_file)
        .unwrap_or_default()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    // /usr/bin/time exits with the command's status, or 128 + signal and a note on stderr.
    assert!(!stderr.contains("terminated by signal"), "{bin} {args:?} died of a signal: {stderr}");
    Run { code: status.code(), stderr, peak_rss_kb, seconds: t0.elapsed().as_secs_f64() }
}

fn desam_segment(input: &Path, model: &Path, out: &Path, env: &[(String, String)], extra: &[&str]) -> Run {
    let mut args =
        vec!["segment", input.to_str().unwrap(), "--model", model.to_str().unwrap(), "-o", out.to_str().unwrap()];
    args.extend(["--device", "cpu", "--threads", "1", "--progress", "none"]);
    args.extend(extra);
    run(env!("CARGO_BIN_EXE_desam"), &args, env)
}

/// Exit 1 with exactly one line "desam: error: ..." and no panic text.
fn assert_one_line_error(name: &str, r: &Run, prefix: &str) {
    assert_eq!(r.code, Some(1), "{name}: exit {:?}, stderr: {}", r.code, r.stderr);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{name}: expected one line, got: {}", r.stderr);
    assert!(lines[0].starts_with(prefix), "{name}: {}", lines[0]);
    assert!(!r.stderr.contains("panicked") && !r.stderr.contains("RUST_BACKTRACE"), "{name}: {}", r.stderr);
}

/// Nothing but `keep` in `dir` (no temporary or partial files).
fn assert_no_leftovers(dir: &Path, keep: &[&str]) {
    let names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    let extra: Vec<&String> = names.iter().filter(|n| !keep.contains(&n.as_str())).collect();
    assert!(extra.is_empty(), "left behind in {}: {extra:?}", dir.display());
}

#[test]
fn every_corpus_case_ends_in_one_line_or_success_within_the_memory_margin() {
    let (model, cases) = corpus();
    let out_dir = work().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let base = desam_segment(&valid_one_slice(), model, &out_dir.join("reference.dcm"), &[], &[]);
    assert_eq!(base.code, Some(0), "the valid one-slice series must segment: {}", base.stderr);
    println!("reference: valid one-slice series, peak RSS {} MB, {:.1} s", base.peak_rss_kb / 1024, base.seconds);
    let classes: std::collections::BTreeSet<&str> = cases.iter().filter_map(|c| c["class"].as_str()).collect();
    for needed in ["memory", "recursion", "arithmetic", "panic"] {
        assert!(classes.contains(needed), "the corpus lacks a {needed} case");
    }
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let input = PathBuf::from(c["input"].as_str().unwrap());
        let case_model = c["model"].as_str().map(PathBuf::from).unwrap_or_else(|| model.clone());
        let env: Vec<(String, String)> = c["env"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let nifti = input.to_string_lossy().contains(".nii");
        let case_out = out_dir.join(name);
        std::fs::create_dir_all(&case_out).unwrap();
        let out = case_out.join(if nifti { "mask.nii.gz" } else { "seg.dcm" });
        let r = desam_segment(
            &input,
            &case_model,
            &out,
            &env,
            &["--report", case_out.join("report.json").to_str().unwrap()],
        );
        println!(
            "{name:28} [{}] exit {:?}, peak RSS {:5} MB (+{} MB), {:.1} s: {}",
            c["class"].as_str().unwrap(),
            r.code,
            r.peak_rss_kb / 1024,
            r.peak_rss_kb.saturating_sub(base.peak_rss_kb) / 1024,
            r.seconds,
            r.stderr.lines().next().unwrap_or("")
        );
        if c["expect"] == "ok" {
            assert_eq!(r.code, Some(0), "{name}: a legitimate input must succeed: {}", r.stderr);
            assert!(out.is_file(), "{name}: no output");
            assert_no_leftovers(&case_out, &["seg.dcm", "mask.nii.gz", "report.json"]);
        } else {
            assert_one_line_error(name, &r, "desam: error:");
            assert_no_leftovers(&case_out, &[]);
        }
        assert!(
            r.peak_rss_kb <= base.peak_rss_kb + RSS_MARGIN_KB,
            "{name}: peak RSS {} MB is more than 300 MB above the valid one-slice series ({} MB)",
            r.peak_rss_kb / 1024,
            base.peak_rss_kb / 1024
        );
    }
}

/// A SEG whose NumberOfFrames is 2^48: refused by the reader before any size is multiplied.
#[test]
fn seg_with_2p48_frames_is_refused_by_the_reader() {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    let voxels: Vec<f32> = vec![100.0; 2 * 16 * 16];
    let vol = {
        let mut v = Volume::new(voxels, [2, 16, 16], [1.0, 1.0, 2.0], [0.0; 3]);
        let attrs = MrSeriesAttributes::default();
        v = dicom::write_mr_series_full(&v, &attrs, &work().join("seg-src")).unwrap().volume;
        v
    };
    let mut mask = desam::Mask::zeros(vol.dims);
    mask.data[20] = 1;
    let opts = dicom::SegOptions::new("t", "0");
    let seg = dicom::Segment { info: dicom::SegmentInfo::prostate("t"), mask: &mask };
    let bytes = dicom::write_seg(&vol, &[seg], &opts).unwrap();
    dicom::read_seg_standalone(&bytes).expect("the unmodified SEG reads");
    let mut obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Auto)
        .from_reader(std::io::Cursor::new(&bytes))
        .unwrap();
    obj.put(DataElement::new(
        dicom_dictionary_std::tags::NUMBER_OF_FRAMES,
        VR::IS,
        PrimitiveValue::from((1u64 << 48).to_string()),
    ));
    let mut tampered = Vec::new();
    obj.write_all(&mut tampered).unwrap();
    let e = dicom::read_seg_standalone(&tampered).unwrap_err().to_string();
    assert!(e.contains("281474976710656") && e.contains("docs/limits.md"), "{e}");
}

/// Corrupt feature-cache entries (valid safetensors, wrong shapes) are misses, not panics.
#[test]
fn a_corrupt_feature_cache_entry_is_a_miss() {
    let (model, input) = (&corpus().0, valid_one_slice());
    let cache = work().join("cache");
    let out = work().join("cache-out");
    std::fs::create_dir_all(&out).unwrap();
    let first = desam_segment(&input, model, &out.join("a.dcm"), &[], &["--cache", cache.to_str().unwrap()]);
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    let mut entries = Vec::new();
    for sub in std::fs::read_dir(&cache).unwrap() {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            entries.push(f.unwrap().path());
        }
    }
    assert!(!entries.is_empty(), "the first run wrote no cache entry");
    for e in &entries {
        let t = tch::Tensor::zeros([3, 5], tch::kind::FLOAT_CPU);
        tch::Tensor::write_safetensors(&[("neck", &t), ("tap0", &t)], e).unwrap();
    }
    let second = desam_segment(&input, model, &out.join("b.dcm"), &[], &["--cache", cache.to_str().unwrap()]);
    assert_eq!(second.code, Some(0), "a corrupt cache entry must not fail the run: {}", second.stderr);
    let pixels = |f: &str| -> Vec<Vec<u8>> {
        dicom::read_seg_standalone(&std::fs::read(out.join(f)).unwrap())
            .unwrap()
            .frames
            .into_iter()
            .map(|fr| fr.pixels)
            .collect()
    };
    assert_eq!(pixels("b.dcm"), pixels("a.dcm"), "a miss recomputes the same mask");
}

/// A full disk while writing the output or the report: exit 1, and neither a partial file, nor a
/// temporary one, nor a SEG without its report is left (a real tmpfs of 64 KiB, filled up).
#[test]
fn a_full_disk_leaves_no_partial_or_orphan_output() {
    let (model, input) = (&corpus().0, valid_one_slice());
    let full = work().join("full");
    let ok = work().join("roomy");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::create_dir_all(&ok).unwrap();
    let mount = Command::new("mount").args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"]).arg(&full).status().unwrap();
    assert!(mount.success(), "this test mounts a small tmpfs (it runs as root in CI)");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(full.clone());
    // Fill it up.
    let filler = full.join("filler");
    let _ = std::fs::write(&filler, vec![1u8; 128 * 1024]);
    let r = desam_segment(&input, model, &full.join("seg.dcm"), &[], &[]);
    assert_one_line_error("output on a full disk", &r, "desam: error:");
    assert_no_leftovers(&full, &["filler"]);
    let r = desam_segment(
        &input,
        model,
        &ok.join("seg.dcm"),
        &[],
        &["--report", full.join("report.json").to_str().unwrap()],
    );
    assert_one_line_error("report on a full disk", &r, "desam: error:");
    assert_no_leftovers(&full, &["filler"]);
    assert_no_leftovers(&ok, &[]);
}

/// `desam-train pull` against a server whose answer never ends: the body limit stops it.
#[test]
fn pull_refuses_an_answer_beyond_the_body_limit() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n[");
            let chunk = vec![b' '; 1 << 20];
            for _ in 0..64 {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
        }
    });
    let out = work().join("pull");
    // The same command against a closed port: what the process costs without any answer.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = run(
        env!("CARGO_BIN_EXE_desam-train"),
        &["pull", "--orthanc", &format!("http://127.0.0.1:{closed}"), "--out", out.to_str().unwrap()],
        &[],
    );
    assert_eq!(base.code, Some(1), "{}", base.stderr);
    let r = run(
        env!("CARGO_BIN_EXE_desam-train"),
        &["pull", "--orthanc", &format!("http://127.0.0.1:{port}"), "--out", out.to_str().unwrap()],
        &[("DESAM_MAX_HTTP_BODY_BYTES".into(), (8u64 << 20).to_string())],
    );
    assert_one_line_error("pull", &r, "desam-train: error:");
    assert!(r.stderr.contains("max_http_body_bytes"), "{}", r.stderr);
    assert!(
        r.peak_rss_kb < base.peak_rss_kb + 64 * 1024,
        "pull held {} MB ({} MB without an answer)",
        r.peak_rss_kb / 1024,
        base.peak_rss_kb / 1024
    );
}

/// A malformed limit in the environment is a usage error naming the variable, not a silent default.
#[test]
fn a_malformed_limit_is_refused() {
    let r = run(
        env!("CARGO_BIN_EXE_desam"),
        &["phantom", "--site", "A"],
        &[("DESAM_MAX_SLICE_PIXELS".into(), "lots".into())],
    );
    assert_one_line_error("bad limit", &r, "desam: error:");
    assert!(r.stderr.contains("DESAM_MAX_SLICE_PIXELS"), "{}", r.stderr);
}

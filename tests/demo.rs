//! `desam demo --stop` end to end: a real Orthanc with the freshly built plugin, two small phantom
//! series sent with storescu, exactly one SEG each, the table, results.json and the overlay PNG.

#[path = "support/orthanc_harness.rs"]
mod harness;

use desam::engine::{create_untrained_model_dir, BackboneSource};
use desam::model::Arch;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn desam() -> Command {
    Command::new(env!("CARGO_BIN_EXE_desam"))
}

#[test]
fn demo_stop_segments_every_series_once_and_writes_the_overlay() {
    let dir = harness::scratch("demo");
    let model = dir.join("tiny");
    create_untrained_model_dir(Arch::Tiny, &model, 3, &BackboneSource::Random).expect("tiny model dir");
    let out_dir = dir.join("out");
    // --ohif: a stand-in dist/ is enough here (the real viewer is tested in test_viewer_ohif.py).
    let dist = dir.join("ohif-dist");
    std::fs::create_dir_all(&dist).unwrap();
    std::fs::write(dist.join("index.html"), "<html>OHIF stand-in</html>").unwrap();
    let ohif_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let run = || {
        desam()
            .args([
                "demo",
                "--sites",
                "AE",
                "--size",
                "small",
                "--device",
                "cpu",
                "--threads",
                "1",
                "--stop",
                "--timeout",
                "240",
            ])
            .arg("--model")
            .arg(&model)
            .arg("--plugin")
            .arg(harness::plugin_path())
            .arg("--out")
            .arg(&out_dir)
            .arg("--ohif")
            .arg(&dist)
            .args(["--ohif-port", &ohif_port.to_string()])
            .arg("--ohif-server")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ohif-serve.py"))
            .output()
            .expect("desam demo runs")
    };
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "desam demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("UNTRAINED"), "an untrained model is announced: {stderr}");
    assert!(stdout.contains("Orthanc stopped cleanly"), "{stdout}");
    // The viewer link of every result (ViewerUrlTemplate set by --ohif).
    assert!(stdout.contains(&format!("demo: OHIF viewer on http://127.0.0.1:{ohif_port}/")), "{stdout}");
    let links = format!("; viewer: http://127.0.0.1:{ohif_port}/segmentation?StudyInstanceUIDs=");
    assert_eq!(stdout.matches(&links).count(), 2, "one viewer URL per series: {stdout}");
    assert!(stdout.contains("2 series, 2 SEGs (2/2 with exactly one)"), "{stdout}");

    let results: Value = serde_json::from_slice(&std::fs::read(out_dir.join("results.json")).unwrap()).unwrap();
    let series = results["series"].as_array().unwrap();
    assert_eq!(series.len(), 2);
    for (s, site) in series.iter().zip(["A", "E"]) {
        assert_eq!(s["site"], site);
        assert_eq!(s["seg_count"], 1, "{s}");
        assert_eq!(s["status"], "done", "{s}");
        let dice = s["dice"].as_f64().expect("a Dice score");
        assert!((0.0..=1.0).contains(&dice), "{s}");
        assert!(s["truth_ml"].as_f64().unwrap() > 5.0, "{s}");
        assert!(s["latency_s"].as_f64().unwrap() > 0.0, "{s}");
        // The table printed one row per series with the same SEG count.
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{site}    {site}000")))
            .unwrap_or_else(|| panic!("no row for {site}: {stdout}"));
        assert!(row.contains("done"), "{row}");
    }

    let png = out_dir.join("overlay.png");
    let (w, h) = png_size(&png);
    assert_eq!((w, h), (2 * 256 + 4, 2 * 256 + 4), "two columns of two 256-pixel panels");
    // The demo stopped its Orthanc: nothing answers on its port any more.
    let port = results["orthanc_http_port"].as_u64().unwrap() as u16;
    assert!(desam::cli::demo::http_request(port, "GET", "/system", b"").is_err(), "Orthanc still answers on {port}");

    // A second run reuses (clears) its own output folder.
    let again = run();
    assert!(again.status.success(), "second run failed: {}", String::from_utf8_lossy(&again.stderr));
}

#[test]
fn demo_refuses_an_untrained_model_when_a_trained_one_is_required_and_foreign_folders() {
    let dir = harness::scratch("demo-refuse");
    let model = dir.join("tiny");
    create_untrained_model_dir(Arch::Tiny, &model, 3, &BackboneSource::Random).expect("tiny model dir");
    let out = desam()
        .args(["demo", "--require-trained", "--stop"])
        .arg("--model")
        .arg(&model)
        .arg("--plugin")
        .arg(harness::plugin_path())
        .arg("--out")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("untrained placeholder: never for the demo"), "{stderr}");
    assert!(!dir.join("out").exists(), "nothing written before the checks pass");

    // A non-empty folder the demo did not write is never cleared.
    let foreign = dir.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("keep.txt"), "mine").unwrap();
    let out = desam()
        .args(["demo", "--stop", "--sites", "A", "--size", "small"])
        .arg("--model")
        .arg(&model)
        .arg("--plugin")
        .arg(harness::plugin_path())
        .arg("--out")
        .arg(&foreign)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("was not written by desam demo"));
    assert_eq!(std::fs::read_to_string(foreign.join("keep.txt")).unwrap(), "mine");
}

fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

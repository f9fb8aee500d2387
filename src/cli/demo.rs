//! `desam demo`: starts Debian's Orthanc with the plugin, sends phantom series like a scanner, waits for
//! the plugin's SEGs and scores them against the phantom truth. Writes only under --out; never edits sent data.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::cli::overlay;
use crate::dicom::read_seg;
use crate::harness::{free_port, OrthancProcess};
use crate::phantom::{self, export, montage, GenerateOptions, PhantomCase, Site, Size};
use crate::volume::{Mask, Volume};

/// The AE title our Orthanc answers to and the one storescu calls from.
const DEMO_AET: &str = "DESAMDEMO";
const SCANNER_AET: &str = "PHANTOMSCANNER";
/// Marks a folder as the demo's own output (only such a folder is cleared on a re-run).
const MARKER: &str = ".desam-demo";
/// How long the plugin may sit idle while series still lack a result before the demo stops waiting
/// (StableAge 2 s + about 1 s until Orthanc reports a series stable, with a wide margin).
const IDLE_GIVE_UP: Duration = Duration::from_secs(20);

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (model.json + weights) the plugin loads.
    #[arg(long)]
    pub model: PathBuf,
    /// The plugin: the crate's cdylib (target/release/libdesam.so).
    #[arg(long)]
    pub plugin: PathBuf,
    /// Output folder (Orthanc storage and log, phantom series, overlay.png, results.json). Cleared on
    /// each run when it is a previous demo's folder; any other non-empty folder is refused.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
    /// Sites to simulate, one series each (letters A–F).
    #[arg(long, default_value = "ABCDEF")]
    pub sites: String,
    /// full (each site's real matrix) or small (quarter matrix, for quick runs and CI).
    #[arg(long, default_value = "full")]
    pub size: String,
    /// Phantom case index of every site.
    #[arg(long, default_value_t = 0)]
    pub case: u32,
    /// Phantom seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The plugin's Device option.
    #[arg(long, default_value = "auto", value_parser = super::values::DeviceParser)]
    pub device: crate::engine::DeviceChoice,
    /// The plugin's Threads option (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Wait for each SEG before sending the next series (latency without queueing). By default all
    /// series are sent one after another, as a scanner does, and the plugin queues them.
    #[arg(long)]
    pub sequential: bool,
    /// Seconds to wait for all SEGs after the last series was sent.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    /// Shut Orthanc down at the end (POST /tools/shutdown) instead of leaving it running.
    #[arg(long)]
    pub stop: bool,
    /// Leave Orthanc running at the end (the default; kept for symmetry with --stop).
    #[arg(long, conflicts_with = "stop")]
    pub keep_running: bool,
    /// Refuse a model directory marked untrained (scripts/demo.sh sets this).
    #[arg(long)]
    pub require_trained: bool,
    /// The Orthanc executable.
    #[arg(long, default_value = "/usr/sbin/Orthanc")]
    pub orthanc: PathBuf,
    /// Also serve the OHIF viewer from this dist/ folder (scripts/setup-ohif.sh prints it) over
    /// Orthanc's DICOMweb plugin, and give each result's viewer URL (ViewerUrlTemplate).
    #[arg(long)]
    pub ohif: Option<PathBuf>,
    /// Port of the OHIF viewer (loopback).
    #[arg(long, default_value_t = 3000)]
    pub ohif_port: u16,
    /// The static server + DICOMweb proxy that serves OHIF.
    #[arg(long, default_value = "scripts/ohif-serve.py")]
    pub ohif_server: PathBuf,
}

/// Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb), loaded when the demo serves OHIF.
pub const DICOMWEB_PLUGIN: &str = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so";

/// The viewer URL template the demo gives the plugin when it serves OHIF on `port`.
pub fn ohif_url_template(port: u16) -> String {
    format!("http://127.0.0.1:{port}/segmentation?StudyInstanceUIDs={{StudyInstanceUID}}")
}

/// One demo series: the phantom case, what was sent, and what came back.
struct DemoSeries {
    case: PhantomCase,
    /// The written MR series' grid and instance references (what the SEG is read against).
    volume: Volume,
    files: Vec<PathBuf>,
    description: String,
    orthanc_id: String,
    sent_at: Instant,
    finished_at: Option<Instant>,
    record: Value,
}

#[derive(serde::Serialize)]
struct SeriesReport {
    site: String,
    case: String,
    series_description: String,
    orthanc_series: String,
    slices: usize,
    status: String,
    seg_count: usize,
    dice: Option<f64>,
    quality_score: Option<f64>,
    volume_ml: Option<f64>,
    truth_ml: f64,
    latency_s: Option<f64>,
    plugin_seconds: Option<f64>,
    needs_review: bool,
    error: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let t_start = Instant::now();
    let size: Size = args.size.parse()?;
    let sites = parse_sites(&args.sites)?;
    let model = absolute(&args.model)?;
    let spec = crate::modeldir::read_spec(&model).with_context(|| format!("model directory {}", model.display()))?;
    if spec.untrained {
        if args.require_trained {
            bail!(
                "{} is an untrained placeholder: never for the demo (model.json \"untrained\": true); train a model with desam-train or install the default model",
                model.display()
            );
        }
        eprintln!("demo: WARNING: {} is an UNTRAINED model: its masks and Dice scores mean nothing", model.display());
    }
    let plugin = absolute(&args.plugin)?;
    if !plugin.is_file() {
        bail!("plugin {} not found (build it with `cargo build --release --lib`)", plugin.display());
    }
    if !args.orthanc.is_file() {
        bail!("{} not found: install Debian's orthanc package (bash scripts/setup.sh)", args.orthanc.display());
    }
    which("storescu").context("storescu (Debian package dcmtk) is needed to send series: run bash scripts/setup.sh")?;

    let ohif = match &args.ohif {
        None => None,
        Some(dist) => {
            let dist = absolute(dist)?;
            if !dist.join("index.html").is_file() {
                bail!("--ohif {}: no index.html there (bash scripts/setup-ohif.sh fetches OHIF and prints its dist folder)", dist.display());
            }
            if !Path::new(DICOMWEB_PLUGIN).is_file() {
                bail!("{DICOMWEB_PLUGIN} not found: install Debian's orthanc-dicomweb package (bash scripts/setup.sh)");
            }
            Some((dist, absolute(&args.ohif_server)?))
        }
    };
    let viewer_template = ohif.as_ref().map(|_| ohif_url_template(args.ohif_port));

    let out = absolute(&args.out)?;
    prepare_out_dir(&out)?;

    // 1. Orthanc with the plugin.
    let orthanc = DemoOrthanc::start(
        &args.orthanc,
        &out,
        &plugin,
        &model,
        args.device,
        args.threads,
        viewer_template.as_deref(),
    )?;
    println!(
        "demo: Orthanc {} started (pid {}, HTTP 127.0.0.1:{}, DICOM {} port {}), model {} {} ({})",
        orthanc.version,
        orthanc.child.id(),
        orthanc.http_port,
        DEMO_AET,
        orthanc.dicom_port,
        spec.name,
        spec.version,
        if spec.untrained { "UNTRAINED" } else { "trained" }
    );

    let mut ohif_child = match &ohif {
        None => None,
        Some((dist, server)) => {
            let child = start_ohif(server, dist, orthanc.http_port, args.ohif_port, &out)?;
            println!(
                "demo: OHIF viewer on http://127.0.0.1:{}/ (pid {}, DICOMweb of Orthanc)",
                args.ohif_port,
                child.id()
            );
            Some(child)
        }
    };
    let outcome = run_series(&args, &orthanc, &out, &sites, size);
    let all_ok = match &outcome {
        Ok(ok) => *ok,
        Err(e) => {
            eprintln!("demo: error: {e:#}");
            eprintln!("demo: last lines of the Orthanc log ({}):\n{}", orthanc.log.display(), orthanc.log_tail(25));
            false
        }
    };
    // 7. Stop Orthanc, or leave it running for the user.
    if args.stop {
        if let Some(c) = ohif_child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        orthanc.shutdown()?;
        println!("demo: Orthanc stopped cleanly; total wall time {:.1} s", t_start.elapsed().as_secs_f64());
    } else {
        println!("demo: total wall time {:.1} s", t_start.elapsed().as_secs_f64());
        println!("demo: Orthanc keeps running (pid {}, log {}):", orthanc.child.id(), orthanc.log.display());
        println!("  Orthanc Explorer: http://127.0.0.1:{}/app/explorer.html", orthanc.http_port);
        println!("  plugin status:    curl http://127.0.0.1:{}/desam/status", orthanc.http_port);
        if ohif_child.is_some() {
            println!("  OHIF viewer:      http://127.0.0.1:{}/ (each study: the viewer URLs above)", args.ohif_port);
        }
        println!("  stop it:          curl -X POST http://127.0.0.1:{}/tools/shutdown", orthanc.http_port);
        orthanc.keep_running();
    }
    outcome?;
    if !all_ok {
        bail!("not every series got exactly one SEG (see the table above and {})", out.join("results.json").display());
    }
    Ok(())
}

/// Phantom generation, sending, waiting, scoring, table and overlay. Ok(true) when every series got
/// exactly one SEG.
fn run_series(args: &Args, orthanc: &DemoOrthanc, out: &Path, sites: &[Site], size: Size) -> anyhow::Result<bool> {
    // 2. Phantom series (the ground truth stays in memory and on disk next to the series).
    let phantom_dir = out.join("phantom");
    let opts = GenerateOptions { size, ..Default::default() };
    let mut series = Vec::new();
    for &site in sites {
        let t0 = Instant::now();
        let case = phantom::generate_case_with(site, args.case, args.seed, &opts);
        let written = export::write_case_dicom(&case, &phantom_dir)
            .with_context(|| format!("writing phantom case {}", case.case_id))?;
        if written.volume.dims != case.labels.dims {
            bail!(
                "phantom case {}: written grid {:?} differs from the truth grid {:?}",
                case.case_id,
                written.volume.dims,
                case.labels.dims
            );
        }
        println!(
            "demo: phantom {} ({}, {} slices of {}x{}, truth {:.1} mL) in {:.1} s",
            case.case_id,
            case.protocol.series_description,
            case.labels.dims[0],
            case.labels.dims[2],
            case.labels.dims[1],
            mask_ml(&case.gland_mask(), &written.volume),
            t0.elapsed().as_secs_f64()
        );
        let description = case.protocol.series_description.clone();
        series.push(DemoSeries {
            case,
            volume: written.volume,
            files: written.mr,
            description,
            orthanc_id: String::new(),
            sent_at: Instant::now(),
            finished_at: None,
            record: Value::Null,
        });
    }

    // 3. + 4. Send like a scanner (storescu), wait for the plugin's results.
    let deadline_for = |t: Instant| t + Duration::from_secs(args.timeout);
    if args.sequential {
        for i in 0..series.len() {
            send(orthanc, &mut series[i])?;
            let deadline = deadline_for(series[i].sent_at);
            wait_results(orthanc, &mut series[i..=i], deadline)?;
        }
    } else {
        for s in series.iter_mut() {
            send(orthanc, s)?;
        }
        let deadline = deadline_for(Instant::now());
        wait_results(orthanc, &mut series, deadline)?;
    }

    // 5. Score each SEG against the truth.
    let mut reports = Vec::new();
    for s in &series {
        reports.push(score(orthanc, s)?);
    }
    print_table(&reports);
    let results = out.join("results.json");
    std::fs::write(
        &results,
        serde_json::to_vec_pretty(&json!({"series": reports, "orthanc_http_port": orthanc.http_port}))?,
    )
    .with_context(|| format!("writing {}", results.display()))?;

    // 6. Overlay montage.
    let png = out.join("overlay.png");
    write_overlay(orthanc, &series, &reports, &png)?;
    println!(
        "demo: overlay {} (grey MR, red: SEG contour, green: phantom truth); results {}",
        png.display(),
        results.display()
    );
    Ok(reports.iter().all(|r| r.seg_count == 1))
}

fn send(orthanc: &DemoOrthanc, s: &mut DemoSeries) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let out = Command::new("storescu")
        .args(["-aec", DEMO_AET, "-aet", SCANNER_AET, "127.0.0.1", &orthanc.dicom_port.to_string()])
        .args(&s.files)
        .output()
        .context("running storescu")?;
    if !out.status.success() {
        bail!("storescu failed for {}: {}", s.case.case_id, String::from_utf8_lossy(&out.stderr).trim());
    }
    s.sent_at = Instant::now();
    let uid = s
        .volume
        .source
        .as_ref()
        .map(|x| x.series_instance_uid.clone())
        .context("written series has no SeriesInstanceUID")?;
    s.orthanc_id = orthanc.series_id(&uid)?;
    println!(
        "demo: sent {} ({} instances, {}) with storescu in {:.1} s → Orthanc series {}",
        s.case.case_id,
        s.files.len(),
        s.description,
        t0.elapsed().as_secs_f64(),
        s.orthanc_id
    );
    Ok(())
}

/// Polls `GET /desam/series/{id}` until every series has a final result record.
fn wait_results(orthanc: &DemoOrthanc, series: &mut [DemoSeries], deadline: Instant) -> anyhow::Result<()> {
    let mut last_note = Instant::now();
    let mut idle_since: Option<Instant> = None;
    loop {
        let mut pending = 0;
        for s in series.iter_mut().filter(|s| s.finished_at.is_none()) {
            let (status, body) = orthanc.http("GET", &format!("/desam/series/{}", s.orthanc_id), b"")?;
            if status == 200 {
                let v: Value = serde_json::from_slice(&body).context("GET /desam/series: not JSON")?;
                let st = v["Result"]["Status"].as_str().unwrap_or("");
                if ["done", "empty", "failed"].contains(&st) && !v["Running"].as_bool().unwrap_or(false) {
                    s.finished_at = Some(Instant::now());
                    s.record = v["Result"].clone();
                    println!(
                        "demo: {} {} after {:.1} s (QA {}, {} mL){}",
                        s.case.case_id,
                        st,
                        s.sent_at.elapsed().as_secs_f64(),
                        fmt_opt(s.record["QualityScore"].as_f64(), 3),
                        fmt_opt(s.record["VolumeMl"].as_f64(), 1),
                        v["ViewerUrl"].as_str().map(|u| format!("; viewer: {u}")).unwrap_or_default()
                    );
                    continue;
                }
            } else if status != 404 {
                bail!("GET /desam/series/{} answered HTTP {status}: {}", s.orthanc_id, String::from_utf8_lossy(&body));
            }
            pending += 1;
        }
        if pending == 0 {
            return Ok(());
        }
        orthanc.check_alive()?;
        // A series the plugin never queued (its series rules skipped it) would otherwise be waited
        // for until the timeout: once the plugin has been idle for IDLE_GIVE_UP, give up on it.
        let queue = orthanc.get_json("/desam/status")?["Queue"].clone();
        let idle = queue["Length"].as_u64() == Some(0) && queue["Running"].is_null();
        idle_since = if idle { idle_since.or(Some(Instant::now())) } else { None };
        let gave_up = idle_since.is_some_and(|t| t.elapsed() > IDLE_GIVE_UP);
        let timed_out = Instant::now() > deadline;
        if gave_up || timed_out {
            let why = if timed_out {
                "no result before the timeout".to_string()
            } else {
                format!(
                    "not processed: the plugin is idle (skipped by its series rules? see {})",
                    orthanc.log.display()
                )
            };
            for s in series.iter_mut().filter(|s| s.finished_at.is_none()) {
                eprintln!("demo: {}: {why}", s.case.case_id);
                s.record = json!({"Status": if timed_out { "timeout" } else { "not processed" }, "Error": why});
            }
            return Ok(());
        }
        if last_note.elapsed() > Duration::from_secs(30) {
            println!("demo: waiting for {pending} series …");
            last_note = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Counts the SEGs referencing the series, reads the plugin's SEG onto the source grid, and compares it
/// with the phantom truth.
fn score(orthanc: &DemoOrthanc, s: &DemoSeries) -> anyhow::Result<SeriesReport> {
    let truth = s.case.gland_mask();
    let segs = orthanc.segs_referencing(&s.orthanc_id)?;
    let r = &s.record;
    let mut dice = None;
    let mut volume_ml = r["VolumeMl"].as_f64();
    if let Some(inst) = r["SegInstance"].as_str() {
        let mask = orthanc.read_seg_mask(inst, &s.volume)?;
        dice = Some(dice_score(&mask, &truth));
        volume_ml = Some(mask_ml(&mask, &s.volume));
    }
    Ok(SeriesReport {
        site: s.case.site.to_string(),
        case: s.case.case_id.clone(),
        series_description: s.description.clone(),
        orthanc_series: s.orthanc_id.clone(),
        slices: s.volume.dims[0],
        status: r["Status"].as_str().unwrap_or("").to_string(),
        seg_count: segs.len(),
        dice,
        quality_score: r["QualityScore"].as_f64(),
        volume_ml,
        truth_ml: mask_ml(&truth, &s.volume),
        latency_s: s.finished_at.map(|t| (t - s.sent_at).as_secs_f64()),
        plugin_seconds: r["Seconds"].as_f64(),
        needs_review: r["NeedsReview"].as_bool().unwrap_or(false),
        error: r["Error"].as_str().map(str::to_string),
    })
}

fn print_table(reports: &[SeriesReport]) {
    println!();
    println!(
        "{:<4} {:<5} {:<18} {:>6} {:>6} {:>6} {:>9} {:>9} {:>9} {:>8} {:>4}  status",
        "site", "case", "series", "slices", "Dice", "QA", "vol mL", "truth mL", "latency s", "plugin s", "SEGs"
    );
    for r in reports {
        let status = match (&r.error, r.needs_review) {
            (Some(e), _) => format!("{} ({e})", r.status),
            (None, true) => format!("{}, needs review", r.status),
            (None, false) => r.status.clone(),
        };
        println!(
            "{:<4} {:<5} {:<18} {:>6} {:>6} {:>6} {:>9} {:>9.1} {:>9} {:>8} {:>4}  {}",
            r.site,
            r.case,
            truncate(&r.series_description, 18),
            r.slices,
            fmt_opt(r.dice, 3),
            fmt_opt(r.quality_score, 3),
            fmt_opt(r.volume_ml, 1),
            r.truth_ml,
            fmt_opt(r.latency_s, 1),
            fmt_opt(r.plugin_seconds, 1),
            r.seg_count,
            status
        );
    }
    let n = reports.len();
    let mean = |v: Vec<f64>| {
        if v.is_empty() {
            None
        } else {
            Some(v.iter().sum::<f64>() / v.len() as f64)
        }
    };
    let dice = mean(reports.iter().filter_map(|r| r.dice).collect());
    let lat: Vec<f64> = reports.iter().filter_map(|r| r.latency_s).collect();
    let max_lat = lat.iter().cloned().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let one_each = reports.iter().filter(|r| r.seg_count == 1).count();
    println!(
        "total: {n} series, {} SEGs ({one_each}/{n} with exactly one), mean Dice {}, mean QA {}, latency mean {} s / max {} s, plugin mean {} s",
        reports.iter().map(|r| r.seg_count).sum::<usize>(),
        fmt_opt(dice, 3),
        fmt_opt(mean(reports.iter().filter_map(|r| r.quality_score).collect()), 3),
        fmt_opt(mean(lat.clone()), 1),
        fmt_opt(max_lat, 1),
        fmt_opt(mean(reports.iter().filter_map(|r| r.plugin_seconds).collect()), 1),
    );
    println!();
}

fn write_overlay(
    orthanc: &DemoOrthanc,
    series: &[DemoSeries],
    reports: &[SeriesReport],
    png: &Path,
) -> anyhow::Result<()> {
    let mut panels = Vec::new();
    for (s, r) in series.iter().zip(reports) {
        let z = montage::mid_gland_slice(&s.case);
        let predicted = match s.record["SegInstance"].as_str() {
            Some(inst) => orthanc.read_seg_mask(inst, &s.volume)?,
            None => Mask::zeros(s.volume.dims),
        };
        let truth = s.case.gland_mask();
        panels.push(overlay::OverlayPanel {
            image: s.volume.slice(z).to_vec(),
            truth: truth.slice(z).to_vec(),
            predicted: predicted.slice(z).to_vec(),
            nx: s.volume.dims[2],
            ny: s.volume.dims[1],
            spacing: [s.volume.spacing[0], s.volume.spacing[1]],
            label: format!("{} {}", r.site, r.dice.map(|d| format!("{d:.2}")).unwrap_or_else(|| "-".into())),
        });
    }
    let img = overlay::render(&panels, 256);
    phantom::montage::write_png(&img, png).with_context(|| format!("writing {}", png.display()))?;
    Ok(())
}

/// Dice coefficient of two binary masks on the same grid (1 when both are empty).
pub fn dice_score(a: &Mask, b: &Mask) -> f64 {
    assert_eq!(a.dims, b.dims, "Dice of masks on different grids");
    crate::engine::quality::dice(&a.data, &b.data)
}

fn mask_ml(m: &Mask, grid: &Volume) -> f64 {
    m.count() as f64 * grid.voxel_ml()
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map(|x| format!("{x:.decimals$}")).unwrap_or_else(|| "-".into())
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn parse_sites(s: &str) -> anyhow::Result<Vec<Site>> {
    let sites: Vec<Site> = s
        .chars()
        .filter(|c| !matches!(c, ',' | ' '))
        .map(|c| {
            Site::from_letter(c.to_ascii_uppercase())
                .with_context(|| format!("unknown site {c:?} in --sites (letters A–F)"))
        })
        .collect::<anyhow::Result<_>>()?;
    if sites.is_empty() {
        bail!("--sites is empty");
    }
    Ok(sites)
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) })
}

fn which(program: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found in PATH"))
}

/// Makes `out` an empty demo folder: stops a demo Orthanc still running from it, clears a previous
/// demo's files, refuses any other non-empty folder.
fn prepare_out_dir(out: &Path) -> anyhow::Result<()> {
    if out.exists() {
        let non_empty = std::fs::read_dir(out)?.next().is_some();
        if non_empty && !out.join(MARKER).is_file() {
            bail!("{} is not empty and was not written by desam demo; choose another --out", out.display());
        }
        stop_previous(out);
        for entry in std::fs::read_dir(out)? {
            let p = entry?.path();
            if p.file_name().is_some_and(|n| n == MARKER) {
                continue;
            }
            if p.is_dir() {
                std::fs::remove_dir_all(&p).with_context(|| format!("clearing {}", p.display()))?;
            } else {
                std::fs::remove_file(&p).with_context(|| format!("clearing {}", p.display()))?;
            }
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join(MARKER), "desam demo output folder: cleared by the next `desam demo` run\n")?;
    Ok(())
}

/// A demo Orthanc left running by an earlier run (state in orthanc/state.json) is shut down first.
fn stop_previous(out: &Path) {
    let Ok(text) = std::fs::read_to_string(out.join("orthanc").join("state.json")) else {
        return;
    };
    let Ok(state) = serde_json::from_str::<Value>(&text) else {
        return;
    };
    let (Some(pid), Some(port)) = (state["pid"].as_u64(), state["http_port"].as_u64()) else {
        return;
    };
    // The OHIF server of that run holds its port: end it (only if it is still our server).
    if let Some(ohif_pid) = state["ohif_pid"].as_u64() {
        let cmdline = std::fs::read(format!("/proc/{ohif_pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("ohif-serve") {
            let _ = Command::new("kill").arg(ohif_pid.to_string()).status();
        }
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    if !exe.to_string_lossy().contains("Orthanc") {
        return;
    }
    println!("demo: stopping the demo Orthanc still running from the previous run (pid {pid}, port {port})");
    let _ = http_request(port as u16, "POST", "/tools/shutdown", b"");
    let t0 = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts scripts/ohif-serve.py (python3) serving `dist` and proxying DICOMweb to the demo Orthanc;
/// its pid joins orthanc/state.json so the next run can stop it.
fn start_ohif(server: &Path, dist: &Path, orthanc_port: u16, port: u16, out: &Path) -> anyhow::Result<Child> {
    let log = std::fs::File::create(out.join("ohif.log"))?;
    let mut child = Command::new("python3")
        .arg(server)
        .args(["--dist".as_ref(), dist.as_os_str()])
        .args(["--orthanc", &format!("http://127.0.0.1:{orthanc_port}"), "--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting python3 {}", server.display()))?;
    let state_path = out.join("orthanc").join("state.json");
    let mut state: Value = serde_json::from_str(&std::fs::read_to_string(&state_path)?)?;
    state["ohif_pid"] = json!(child.id());
    std::fs::write(&state_path, state.to_string())?;
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("the OHIF server exited ({status}); see {}", out.join("ohif.log").display());
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            bail!("the OHIF server did not listen on port {port} within 20 s; see {}", out.join("ohif.log").display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(child)
}

/// The demo's Orthanc: the shared process harness (`crate::harness`) plus the server's version; fields
/// and queries through `Deref`.
pub struct DemoOrthanc {
    process: OrthancProcess,
    pub version: String,
}

impl std::ops::Deref for DemoOrthanc {
    type Target = OrthancProcess;
    fn deref(&self) -> &OrthancProcess {
        &self.process
    }
}

impl DemoOrthanc {
    /// Writes the configuration under `out/orthanc/`, starts Orthanc, waits for `/system` and checks
    /// that the plugin is enabled; the pid and ports go to `orthanc/state.json` for the next run.
    pub fn start(
        exe: &Path,
        out: &Path,
        plugin: &Path,
        model: &Path,
        device: crate::engine::DeviceChoice,
        threads: usize,
        viewer_url_template: Option<&str>,
    ) -> anyhow::Result<DemoOrthanc> {
        let dir = out.join("orthanc");
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage)?;
        let (http_port, dicom_port) = (free_port()?, free_port()?);
        let mut cfg = json!({
            "Name": "desam-demo",
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": DEMO_AET,
            "DicomCheckCalledAet": false,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "HttpDescribeErrors": true,
            "StableAge": 2,
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "UserMetadata": {"DeSAMResult": 4301, "DeSAMReview": 4302},
            "Plugins": [plugin],
            "DeSAM": {
                "Enable": true,
                "ModelDirectory": model,
                "Device": device.to_string(),
                "Threads": threads,
            },
        });
        if let Some(t) = viewer_url_template {
            // OHIF reads the study over DICOMweb; "Full" metadata keeps the SEG's sequences.
            cfg["Plugins"] = json!([plugin, DICOMWEB_PLUGIN]);
            cfg["DicomWeb"] =
                json!({"Enable": true, "Root": "/dicom-web/", "StudiesMetadata": "Full", "SeriesMetadata": "Full"});
            cfg["DeSAM"]["ViewerUrlTemplate"] = json!(t);
        }
        let process = OrthancProcess::start(exe, &dir, &cfg, &[], None)?;
        std::fs::write(
            dir.join("state.json"),
            json!({"pid": process.child.id(), "http_port": http_port, "dicom_port": dicom_port}).to_string(),
        )?;
        let system = process.get_json("/system")?;
        let version = system["Version"].as_str().unwrap_or("?").to_string();
        let o = DemoOrthanc { process, version };
        let (status, body) = o.http("GET", "/desam/status", b"")?;
        let st: Value = serde_json::from_slice(&body).unwrap_or_default();
        if status != 200 || st["Enabled"] != json!(true) {
            let reason = st["Reason"].as_str().unwrap_or("the plugin did not register /desam/status").to_string();
            let _ = o.shutdown();
            bail!("the DeSAM plugin is not enabled: {reason}");
        }
        Ok(o)
    }

    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        Ok(self.process.request(method, path, body)?)
    }

    /// The SEG instance's segments, read onto `grid` and merged into one binary mask.
    pub fn read_seg_mask(&self, instance: &str, grid: &Volume) -> anyhow::Result<Mask> {
        let (status, bytes) = self.http("GET", &format!("/instances/{instance}/file"), b"")?;
        if status != 200 {
            bail!("GET /instances/{instance}/file answered HTTP {status}");
        }
        let segments = read_seg(&bytes, grid).with_context(|| format!("reading SEG {instance}"))?;
        let mut mask = Mask::zeros(grid.dims);
        for (_, m) in &segments {
            for (d, &v) in mask.data.iter_mut().zip(&m.data) {
                *d |= u8::from(v != 0);
            }
        }
        Ok(mask)
    }

    fn check_alive(&self) -> anyhow::Result<()> {
        if !self.process.alive() {
            bail!("Orthanc exited unexpectedly");
        }
        Ok(())
    }

    /// `POST /tools/shutdown` and wait for a clean exit (code 0).
    pub fn shutdown(self) -> anyhow::Result<()> {
        self.process.shutdown()?;
        Ok(())
    }

    /// Leaves Orthanc running after the demo exits (the user stops it, or the next run does).
    pub fn keep_running(self) {
        self.process.detach();
    }
}

/// A request to Orthanc on loopback through the crate's HTTP client (`crate::http`).
pub fn http_request(port: u16, method: &str, path: &str, body: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    Ok(crate::http::Endpoint::loopback(port).request(method, path, body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dice_of_overlapping_masks() {
        let a = Mask { data: vec![1, 1, 0, 0], dims: [1, 2, 2] };
        let b = Mask { data: vec![0, 1, 1, 0], dims: [1, 2, 2] };
        assert!((dice_score(&a, &b) - 0.5).abs() < 1e-12);
        assert_eq!(dice_score(&a, &a), 1.0);
        assert_eq!(dice_score(&Mask::zeros([1, 2, 2]), &Mask::zeros([1, 2, 2])), 1.0);
    }

    #[test]
    fn sites_are_parsed_and_checked() {
        assert_eq!(parse_sites("a, C").unwrap(), vec![Site::A, Site::C]);
        assert!(parse_sites("AZ").is_err());
        assert!(parse_sites("").is_err());
    }
}

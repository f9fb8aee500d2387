//! The plugin in Orthanc's cluster model (issue 19): a throw-away PostgreSQL 15, three Debian Orthanc
//! processes on one index and storage (two workers, one ingest node), 30 series spread over the
//! nodes: each segmented exactly once; a worker killed mid-series is replaced after its lease ends.

#[path = "support/orthanc_harness.rs"]
mod harness;

use desam::dicom::{self, MrSeriesAttributes};
use desam::Volume;
use harness::{scratch, Orthanc};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PG_PLUGINS: [&str; 2] = [
    "/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so",
    "/usr/share/orthanc/plugins/libOrthancPostgreSQLStorage.so",
];
const LEASE_S: u64 = 6;
const TIMEOUT: Duration = Duration::from_secs(600);

/// A PostgreSQL server in a temporary folder on a free loopback port, stopped when dropped.
struct Postgres {
    data: PathBuf,
    port: u16,
}

fn as_postgres(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(format!("{PG_BIN}/{cmd}"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Postgres {
    fn start(dir: &Path) -> Postgres {
        assert!(
            Path::new(PG_BIN).join("postgres").is_file(),
            "PostgreSQL 15 is missing (scripts/setup.sh installs postgresql-15)"
        );
        let data = dir.join("pgdata");
        std::fs::create_dir_all(&data).unwrap();
        let pw = dir.join("pgpass");
        std::fs::write(&pw, "orthanc\n").unwrap();
        let chown = |p: &Path| {
            assert!(Command::new("chown").args(["-R", "postgres:postgres"]).arg(p).status().unwrap().success())
        };
        chown(&data);
        chown(&pw);
        as_postgres(
            "initdb",
            &["-D", data.to_str().unwrap(), "-A", "md5", "-U", "postgres", &format!("--pwfile={}", pw.display())],
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let opts = format!("-p {port} -k {} -c listen_addresses=127.0.0.1", data.display());
        as_postgres(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-o", &opts, "-l", data.join("log").to_str().unwrap(), "-w", "start"],
        );
        let out = Command::new(format!("{PG_BIN}/createdb"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "orthanc"])
            .env("PGPASSWORD", "orthanc")
            .output()
            .unwrap();
        assert!(out.status.success(), "createdb: {}", String::from_utf8_lossy(&out.stderr));
        Postgres { data, port }
    }

    fn rss_kb(&self) -> u64 {
        // All server processes of this cluster (postmaster and backends), from /proc.
        let mut total = 0;
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            let is_ours = String::from_utf8_lossy(&cmdline).contains(self.data.to_str().unwrap())
                || (status.contains("Name:\tpostgres")
                    && std::fs::read_to_string(e.path().join("environ")).is_ok()
                    && self.owns(&e.path()));
            if is_ours {
                total += status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        total
    }

    /// A backend is ours when its parent chain reaches our postmaster.
    fn owns(&self, proc_dir: &Path) -> bool {
        let pid_file = std::fs::read_to_string(self.data.join("postmaster.pid")).unwrap_or_default();
        let master = pid_file.lines().next().unwrap_or("").trim().to_string();
        let status = std::fs::read_to_string(proc_dir.join("status")).unwrap_or_default();
        let ppid =
            status.lines().find(|l| l.starts_with("PPid:")).and_then(|l| l.split_whitespace().nth(1)).unwrap_or("");
        !master.is_empty() && ppid == master
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(format!("{PG_BIN}/pg_ctl"))
            .args(["-D", self.data.to_str().unwrap(), "-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// One node's Orthanc configuration on the shared PostgreSQL index and storage.
fn node_config(pg: &Postgres, model: &Path, node: &str, role: &str, mode: &str) -> Value {
    json!({
        "Plugins": [harness::plugin_path(), PG_PLUGINS[0], PG_PLUGINS[1]],
        "CheckRevisions": true,
        "JobsHistorySize": 200,
        "PostgreSQL": {"EnableIndex": true, "EnableStorage": true, "Host": "127.0.0.1", "Port": pg.port, "Database": "orthanc",
                        "Username": "postgres", "Password": "orthanc", "Lock": false, "EnableSsl": false},
        "UserMetadata": {"DeSAMResult": 4301, "DeSAMReview": 4302, "DeSAMClaim": 4303},
        "DeSAM": {"ModelDirectory": model, "Device": "cpu", "Threads": 1, "Mode": mode, "NodeId": node, "Role": role,
                  "LeaseSeconds": LEASE_S, "SeriesFilter": {"MinSlices": 4}, "MaxQueueLength": 40},
    })
}

fn write_series(dir: &Path, seed: u64, slices: usize, side: usize) -> (Vec<PathBuf>, String) {
    let mut state = seed.wrapping_mul(2862933555777941757).wrapping_add(3037000493);
    let voxels: Vec<f32> = (0..slices * side * side)
        .map(|i| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let (x, y) = ((i % side) as f64 / side as f64 - 0.5, ((i / side) % side) as f64 / side as f64 - 0.5);
            (if x * x + y * y < 0.04 { 700.0 } else { 250.0 }) + ((state >> 41) % 40) as f32
        })
        .collect();
    let vol = Volume::new(voxels, [slices, side, side], [0.7, 0.7, 3.0], [0.0; 3]);
    let attrs = MrSeriesAttributes {
        series_description: "t2_tse_tra".into(),
        patient_id: format!("C{seed}"),
        ..Default::default()
    };
    let w = dicom::write_mr_series_full(&vol, &attrs, dir).unwrap();
    (w.paths, w.volume.source.as_ref().unwrap().series_instance_uid.clone())
}

/// Successful DeSAM jobs of one node (jobs live in each Orthanc process).
fn jobs_by_series(o: &Orthanc) -> Vec<String> {
    let jobs = o.get_json("/jobs?expand");
    jobs.as_array()
        .unwrap()
        .iter()
        .filter(|j| j["Type"] == "DeSAMSegmentation" && j["State"] == "Success" && j["Content"]["Skipped"].is_null())
        .map(|j| j["Content"]["Series"].as_str().unwrap().to_string())
        .collect()
}

fn wait_done(o: &Orthanc, ids: &[String]) -> f64 {
    let t0 = Instant::now();
    loop {
        let done = ids
            .iter()
            .filter(|id| o.request("GET", &format!("/desam/series/{id}"), None).json()["Result"]["Status"] == "done")
            .count();
        if done == ids.len() {
            return t0.elapsed().as_secs_f64();
        }
        assert!(t0.elapsed() < TIMEOUT, "{done}/{} series done; status {}", ids.len(), o.get_json("/desam/status"));
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn seg_count_per_series(o: &Orthanc, ids: &[String]) -> HashMap<String, usize> {
    ids.iter().map(|id| (id.clone(), o.segs_referencing(id).len())).collect()
}

#[test]
fn three_nodes_on_postgresql_segment_each_series_once_and_take_over_a_dead_worker() {
    let dir = scratch("cluster");
    let pg = Postgres::start(&dir);
    let model = harness::tiny_model(21);
    let start = |name: &str, role: &str, mode: &str| {
        Orthanc::start(&dir.join(name), true, &node_config(&pg, &model, name, role, mode))
    };
    // Grid mode keeps the slow series below running long enough to kill its worker mid-way.
    // DESAM_CLUSTER_WORKERS=1 measures one worker instead (the second node then ingests only).
    let one_worker = std::env::var("DESAM_CLUSTER_WORKERS").is_ok_and(|v| v == "1");
    let w1 = start("w1", "worker", "grid");
    let w2 = start("w2", if one_worker { "ingest" } else { "worker" }, "grid");
    let ingest = start("ingest", "ingest", "grid");
    let nodes = [&w1, &w2, &ingest];

    // 30 series, sent to the three nodes in turn.
    let mut ids = Vec::new();
    let t0 = Instant::now();
    for k in 0..30 {
        let (files, uid) = write_series(&dir.join(format!("s{k}")), k, 6, 48);
        let node = nodes[k as usize % 3];
        node.storescu(&files);
        ids.push(node.series_id(&uid));
    }
    let send_s = t0.elapsed().as_secs_f64();
    let wall = wait_done(&w1, &ids) + send_s;
    std::thread::sleep(Duration::from_secs(2));
    let per_node: Vec<Vec<String>> = nodes.iter().map(|o| jobs_by_series(o)).collect();
    let ran: usize = per_node.iter().map(Vec::len).sum();
    println!(
        "30 series over {} worker(s): {:.1} s ({:.1} series/min); jobs w1 {}, w2 {}, ingest {}",
        if one_worker { 1 } else { 2 },
        wall,
        30.0 * 60.0 / wall,
        per_node[0].len(),
        per_node[1].len(),
        per_node[2].len()
    );
    assert!(per_node[2].is_empty(), "the ingest node ran jobs: {:?}", per_node[2]);
    if one_worker {
        assert_eq!(per_node[0].len(), 30, "the one worker ran {} series", per_node[0].len());
        return;
    }
    assert!(
        !per_node[0].is_empty() && !per_node[1].is_empty(),
        "both workers should have worked: {} / {}",
        per_node[0].len(),
        per_node[1].len()
    );
    let mut all: Vec<&String> = per_node.iter().flatten().collect();
    all.sort();
    all.dedup();
    assert_eq!(ran, 30, "30 series, {ran} successful runs (a series ran twice or not at all)");
    assert_eq!(all.len(), 30, "{ran} runs cover {} distinct series", all.len());
    for (id, n) in seg_count_per_series(&ingest, &ids) {
        assert_eq!(n, 1, "series {id} has {n} SEGs");
    }
    let status = ingest.get_json("/desam/status");
    assert_eq!(status["Node"]["Role"], "ingest");
    assert_eq!(status["Cluster"]["SegSeries"], 30, "{status}");
    println!(
        "resident memory: PostgreSQL {} MB, Orthanc w1 {} MB, w2 {} MB, ingest {} MB",
        pg.rss_kb() / 1024,
        w1.rss_kb().0 / 1024,
        w2.rss_kb().0 / 1024,
        ingest.rss_kb().0 / 1024
    );

    // A worker killed in the middle of a series: the other takes it over after the lease.
    let (files, uid) = write_series(&dir.join("slow"), 99, 24, 160);
    ingest.storescu(&files);
    let slow = ingest.series_id(&uid);
    let t0 = Instant::now();
    let mut workers = [Some(w1), Some(w2)];
    let victim = loop {
        let running = |o: &Orthanc| o.get_json("/desam/status")["Queue"]["Running"] == slow.as_str();
        if let Some(i) = (0..2).find(|&i| running(workers[i].as_ref().unwrap())) {
            break i;
        }
        assert!(t0.elapsed() < TIMEOUT, "no worker started the slow series");
        std::thread::sleep(Duration::from_millis(100));
    };
    let victim_name = ["w1", "w2"][victim];
    std::thread::sleep(Duration::from_millis(500));
    let mut killed = workers[victim].take().unwrap();
    killed.child.kill().unwrap();
    let _ = killed.child.wait();
    let killed_at = Instant::now();
    let survivor = workers[1 - victim].take().unwrap();
    let done_after = wait_done(&survivor, std::slice::from_ref(&slow));
    let takeover = survivor.log_text().contains(&format!("taking over the expired claim of node {victim_name}"));
    println!(
        "worker {victim_name} killed mid-series; the other finished it {:.1} s later (lease {LEASE_S} s)",
        killed_at.elapsed().as_secs_f64()
    );
    assert!(takeover, "the survivor never took the claim over; log:\n{}", survivor.log_text());
    assert!(
        done_after >= LEASE_S as f64 - 1.0,
        "finished {done_after:.1} s after the kill: before the lease could expire?"
    );
    assert_eq!(survivor.segs_referencing(&slow).len(), 1);
    drop(killed);

    // The killed node restarted with the same id duplicates nothing.
    let back = Orthanc::start(
        &dir.join(format!("{victim_name}-again")),
        true,
        &node_config(&pg, &model, victim_name, "worker", "box"),
    );
    std::thread::sleep(Duration::from_secs(8));
    for (id, n) in seg_count_per_series(&back, &ids) {
        assert_eq!(n, 1, "after the restart series {id} has {n} SEGs");
    }
    assert_eq!(back.segs_referencing(&slow).len(), 1);
    assert!(jobs_by_series(&back).is_empty(), "the restarted node re-ran series: {:?}", jobs_by_series(&back));
    back.stop();
    survivor.stop();
    ingest.stop();
}

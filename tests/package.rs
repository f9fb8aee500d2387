//! Issue 15's acceptance: `scripts/package.sh` builds the Debian packages and the tarball, and what
//! they install runs from an empty environment with nothing resolved from this checkout (libtorch,
//! model), segments a phantom series, and works as Debian's Orthanc's plugin (docs/install.md).
use desam::harness::{free_port, OrthancProcess, ORTHANC_EXE};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn checkout() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A command that runs cargo (directly or through package.sh) without the variables `cargo test`
/// gives this process: build scripts (ring's) watch CARGO_PKG_NAME and friends, so inheriting them
/// would rebuild half the dependency tree here and again in the next plain `cargo build`.
fn cargo_free(mut cmd: Command) -> Command {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let from_cargo_test = (key.starts_with("CARGO_")
            && !["CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_BUILD_JOBS"].contains(&key.as_str()))
            || ["OUT_DIR", "LD_LIBRARY_PATH", "RUSTC", "RUSTDOC"].contains(&key.as_str());
        if from_cargo_test {
            cmd.env_remove(&key);
        }
    }
    cmd
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every ELF file under `root` (by its magic number).
fn elf_files(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                todo.push(path);
            } else if meta.is_file() && std::fs::read(&path).is_ok_and(|b| b.starts_with(b"\x7fELF")) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// RUNPATH relative to `$ORIGIN`, no RPATH, and no path into this checkout in the dynamic section;
/// `ldd` (empty environment) resolves every library, libtorch's inside `root`, none from the checkout.
fn assert_relocatable(root: &Path) {
    let files = elf_files(root);
    assert!(files.len() >= 4, "too few ELF files under {}: {files:?}", root.display());
    let here = checkout().display().to_string();
    for f in &files {
        let dynamic = text(&run(Command::new("readelf").arg("-d").arg(f)).stdout);
        assert!(!dynamic.contains("(RPATH)"), "{}: has an RPATH:\n{dynamic}", f.display());
        let runpath =
            dynamic.lines().find(|l| l.contains("(RUNPATH)")).unwrap_or_else(|| panic!("{}: no RUNPATH", f.display()));
        assert!(runpath.contains("[$ORIGIN"), "{}: RUNPATH not relative to $ORIGIN: {runpath}", f.display());
        assert!(
            !dynamic.contains(&here) && !dynamic.contains("site-packages"),
            "{}: build path:\n{dynamic}",
            f.display()
        );
        let ldd = text(&run(Command::new("ldd").arg(f).env_clear()).stdout);
        assert!(!ldd.contains("not found"), "{}: unresolved:\n{ldd}", f.display());
        // Every resolved library is the system's or inside the installed tree (which this test keeps
        // under the checkout's target/), never from the checkout's .venv.
        let root_text = root.display().to_string();
        for resolved in ldd.lines().filter_map(|l| l.split("=>").nth(1)).map(str::trim) {
            let outside_root = !resolved.starts_with(&root_text);
            assert!(!(outside_root && resolved.starts_with(&here)), "{}: from the checkout: {resolved}", f.display());
            assert!(!resolved.contains("site-packages"), "{}: from a Python venv: {resolved}", f.display());
        }
        for line in ldd.lines().filter(|l| l.contains("libtorch") || l.contains("libc10") || l.contains("libgomp")) {
            let resolved = line.split("=>").nth(1).unwrap_or("").trim();
            assert!(
                resolved.starts_with(&root.display().to_string()),
                "{}: {line} is not inside {}",
                f.display(),
                root.display()
            );
        }
        let cuda =
            ["libcuda", "libcudart", "libcupti", "libcublas", "libcudnn", "libnv", "libtorch_cuda", "libc10_cuda"];
        assert!(!cuda.iter().any(|c| ldd.contains(c)), "{}: needs a CUDA library:\n{ldd}", f.display());
    }
    println!("{}: {} ELF files relocatable, libtorch resolved inside", root.display(), files.len());
}

/// dciodvfy recognises a Segmentation and reports no error.
fn assert_valid_seg(path: &Path) {
    let out = run(Command::new("dciodvfy").arg(path));
    let report = text(&out.stdout) + &text(&out.stderr);
    assert_eq!(report.lines().next().unwrap_or("").trim(), "Segmentation", "{report}");
    assert!(!report.lines().any(|l| l.starts_with("Error")), "dciodvfy errors:\n{report}");
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

/// An Orthanc configuration as a test must have it (ports, storage, loopback) loading the plugin
/// folder of the installed tree, as Debian's orthanc.json does.
fn orthanc_config(dir: &Path, plugins: &Path) -> Value {
    let storage = dir.join("storage");
    json!({
        "Name": "desam-package-test", "HttpPort": free_port().unwrap(), "DicomPort": free_port().unwrap(),
        "DicomAet": "DESAMPKG", "DicomCheckCalledAet": false, "RemoteAccessAllowed": false,
        "AuthenticationEnabled": false, "StableAge": 1,
        "StorageDirectory": storage, "IndexDirectory": storage, "Plugins": [plugins],
    })
}

fn get_json(orthanc: &OrthancProcess, path: &str) -> Value {
    orthanc.get_json(path).unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", orthanc.log_tail(40)))
}

#[test]
fn packages_install_anywhere_and_run_from_an_empty_environment() {
    let scratch = checkout().join("target/package-test");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let dist = scratch.join("dist");

    // 1. The CLI builds without the plugin: the C++ shim (and so orthanc-dev's header) is never built.
    let t0 = Instant::now();
    let out = run(cargo_free(Command::new(env!("CARGO")))
        .args(["build", "--no-default-features", "--bin", "desam", "--message-format=json"])
        .current_dir(checkout()));
    let messages = text(&out.stdout);
    let build_script = messages
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|m| {
            m["reason"] == "build-script-executed"
                && m["package_id"].as_str().is_some_and(|p| p.contains("/wt-") || p.contains("desam"))
        })
        .filter(|m| m["out_dir"].as_str().is_some_and(|d| d.contains("/build/desam-")))
        .expect("cargo reported no build script run for desam");
    let out_dir = PathBuf::from(build_script["out_dir"].as_str().unwrap());
    assert!(!out_dir.join("libdesam_orthanc_shim.a").exists(), "the no-orthanc build compiled the shim");
    assert!(!out_dir.join("cxxbridge").exists(), "the no-orthanc build ran cxx-build");
    println!("no-orthanc build of desam: {:.0} s", t0.elapsed().as_secs_f64());

    // 2. package.sh from this checkout's dev build (the default features; it rebuilds them after 1.).
    let t0 = Instant::now();
    let out = run(cargo_free(Command::new("bash"))
        .args(["scripts/package.sh", "--profile", "dev", "--out"])
        .arg(&dist)
        .current_dir(checkout()));
    println!("package.sh: {:.0} s\n{}", t0.elapsed().as_secs_f64(), text(&out.stdout));
    let desam_deb = dist.join(format!("desam_{VERSION}_amd64.deb"));
    let plugin_deb = dist.join(format!("orthanc-desam_{VERSION}_amd64.deb"));
    let tarball = dist.join(format!("desam-{VERSION}-linux-x86_64.tar.gz"));
    for f in [&desam_deb, &plugin_deb, &tarball] {
        assert!(f.is_file(), "{} missing", f.display());
    }
    std::fs::remove_dir_all(dist.join("stage")).unwrap();

    // 3. Package metadata: dependencies, the conffile, a postinst that only tells the admin.
    let field = |deb: &Path, name: &str| text(&run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name)).stdout);
    assert!(field(&plugin_deb, "Depends").contains("orthanc (>= 1.10.1)"));
    assert!(field(&plugin_deb, "Depends").contains(&format!("desam (= {VERSION})")));
    let control = scratch.join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&plugin_deb).arg(&control));
    assert_eq!(std::fs::read_to_string(control.join("conffiles")).unwrap().trim(), "/etc/orthanc/desam.json");
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    let actions: Vec<&str> = postinst.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    assert!(postinst.contains("restart Orthanc"), "{postinst}");
    assert!(
        actions
            .iter()
            .all(|l| ["set -e", "fi", "exit 0"].contains(l) || l.starts_with("if [") || l.starts_with("echo ")),
        "the postinst must only print a message:\n{postinst}"
    );
    assert!(
        !control.join("prerm").exists() && !control.join("postrm").exists(),
        "purge is dpkg's own conffile removal"
    );
    for deb in [&desam_deb, &plugin_deb] {
        let listing = text(&run(Command::new("dpkg-deb").arg("-c").arg(deb)).stdout);
        for cuda in ["libcud", "libcupti", "libcublas", "libnv", "libnccl", "_cuda"] {
            assert!(!listing.contains(cuda), "{} ships a CUDA library ({cuda}):\n{listing}", deb.display());
        }
    }
    let copyright = text(&run(Command::new("dpkg-deb").arg("--fsys-tarfile").arg(&desam_deb)).stdout);
    for licence in ["GPL-3.0-or-later", "BSD-3-Clause", "Apache-2.0"] {
        assert!(copyright.contains(licence), "desam's copyright file lacks {licence}");
    }

    // 4. Installed tree: both packages extracted into an empty folder; the tarball unpacked elsewhere.
    let root = scratch.join("root");
    for deb in [&desam_deb, &plugin_deb] {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
    }
    let bundle_parent = scratch.join("some where");
    std::fs::create_dir_all(&bundle_parent).unwrap();
    run(Command::new("tar").arg("-xzf").arg(&tarball).arg("-C").arg(&bundle_parent));
    let bundle = bundle_parent.join(format!("desam-{VERSION}-linux-x86_64"));
    assert_relocatable(&root);
    assert_relocatable(&bundle);

    // 5. The installed CLI, empty environment: a phantom series, segmented with the installed model
    //    found without --model, on the CPU without a word about CUDA; the SEG passes dciodvfy.
    let desam = root.join("usr/bin/desam");
    run(Command::new(&desam)
        .env_clear()
        .args(["phantom", "--site", "A", "--size", "small", "--out"])
        .arg(scratch.join("ph")));
    let series = scratch.join("ph/A000/MR");
    let seg = scratch.join("seg.dcm");
    let t0 = Instant::now();
    let out = run(Command::new(&desam)
        .env_clear()
        .arg("segment")
        .arg(&series)
        .arg("-o")
        .arg(&seg)
        .args(["--device", "auto"]));
    let log = text(&out.stderr);
    println!("installed desam segment: {:.0} s\n{log}", t0.elapsed().as_secs_f64());
    assert!(log.contains(" on cpu"), "--device auto did not report cpu:\n{log}");
    assert!(log.contains("desam-lite-prostate"), "the installed default model was not used:\n{log}");
    assert!(
        !log.contains("WARN") && !log.to_lowercase().contains("cuda"),
        "a CPU install says nothing of CUDA:\n{log}"
    );
    assert_valid_seg(&seg);

    // The tarball's CLI runs where it was unpacked and looks for its model beside itself.
    run(Command::new(bundle.join("bin/desam"))
        .env_clear()
        .args(["phantom", "--site", "B", "--size", "small", "--out"])
        .arg(scratch.join("ph-b")));
    std::fs::remove_dir_all(bundle.join("share/desam/models/default")).unwrap();
    let out = Command::new(bundle.join("bin/desam"))
        .env_clear()
        .arg("segment")
        .arg(&series)
        .arg("-o")
        .arg(scratch.join("x.dcm"))
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for place in ["$DESAM_MODEL (unset)", "bin/../share/desam/models/default", "/usr/share/desam/models/default"] {
        assert!(err.contains(place), "the error does not name {place}:\n{err}");
    }

    // 6. Debian's Orthanc with the installed configuration (only the model path moved into the
    //    extracted tree) and plugin folder: one phantom series by storescu, exactly one SEG stored.
    //    The model is a tiny untrained one written there by the installed CLI: step 5 ran the shipped
    //    model already, and with it a series takes minutes on a loaded 2-core CI machine, long enough
    //    to hit the plugin's lease renewal conflict reported in docs/install.md.
    let etc = scratch.join("etc-orthanc");
    std::fs::create_dir_all(&etc).unwrap();
    let installed_json = std::fs::read_to_string(root.join("etc/orthanc/desam.json")).unwrap();
    let model = root.join("usr/share/desam/models/tiny-test");
    run(Command::new(&desam).env_clear().args(["model", "init", "--arch", "tiny", "--out"]).arg(&model));
    let adapted =
        installed_json.replace("\"/usr/share/desam/models/default\"", &format!("{:?}", model.display().to_string()));
    assert_ne!(adapted, installed_json, "desam.json does not name /usr/share/desam/models/default");
    std::fs::write(etc.join("desam.json"), adapted).unwrap();
    let plugins = root.join("usr/share/orthanc/plugins");
    let node = scratch.join("orthanc");
    let config = orthanc_config(&node, &plugins);
    let orthanc = OrthancProcess::start(Path::new(ORTHANC_EXE), &node, &config, &[etc.join("desam.json")], Some(&[]))
        .unwrap_or_else(|e| panic!("Orthanc with the installed plugin did not start: {e}"));
    let status = get_json(&orthanc, "/desam/status");
    assert!(status.to_string().contains(&model.display().to_string()), "plugin status: {status}");
    let store = Command::new("storescu")
        .args(["-aec", "DESAMPKG", "-aet", "SCANNER", "127.0.0.1", &orthanc.dicom_port.to_string()])
        .args(files_in(&series))
        .output()
        .expect("storescu (dcmtk)");
    assert!(store.status.success(), "storescu: {}", text(&store.stderr));
    let mr = get_json(&orthanc, "/series?expand")
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["MainDicomTags"]["Modality"] == "MR")
        .map(|s| s["ID"].as_str().unwrap().to_string())
        .expect("the MR series was not stored");
    let t0 = Instant::now();
    loop {
        // A loaded machine may drop one poll; only a dead Orthanc or the deadline fails the test.
        let (code, body) = orthanc.request("GET", &format!("/desam/series/{mr}"), b"").unwrap_or((0, Vec::new()));
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let state = v["Result"]["Status"].as_str().unwrap_or("");
        if code == 200 && ["done", "empty", "failed"].contains(&state) && !v["Running"].as_bool().unwrap_or(false) {
            assert_eq!(state, "done", "{v}");
            break;
        }
        assert!(orthanc.alive(), "Orthanc died:\n{}", orthanc.log_tail(60));
        assert!(t0.elapsed() < Duration::from_secs(900), "no SEG within 15 min:\n{}", orthanc.log_tail(60));
        std::thread::sleep(Duration::from_secs(1));
    }
    println!("plugin: series segmented {:.0} s after storescu", t0.elapsed().as_secs_f64());
    assert_eq!(orthanc.segs_referencing(&mr).unwrap().len(), 1, "exactly one SEG");
    orthanc.shutdown().unwrap_or_else(|e| panic!("Orthanc did not stop cleanly: {e}"));

    // 7. `apt remove orthanc-desam` deletes the plugin and keeps the conffile: Orthanc still starts,
    //    serves what it stored, and has no DeSAM routes.
    std::fs::remove_file(plugins.join("libdesam.so")).unwrap();
    let orthanc = OrthancProcess::start(Path::new(ORTHANC_EXE), &node, &config, &[etc.join("desam.json")], Some(&[]))
        .unwrap_or_else(|e| panic!("Orthanc without the plugin did not start: {e}"));
    assert_eq!(orthanc.request("GET", "/desam/status", b"").unwrap().0, 404);
    assert_eq!(get_json(&orthanc, "/series").as_array().unwrap().len(), 2, "the MR series and its SEG");
    orthanc.shutdown().unwrap_or_else(|e| panic!("Orthanc did not stop cleanly: {e}"));

    std::fs::remove_dir_all(&scratch).unwrap();
}

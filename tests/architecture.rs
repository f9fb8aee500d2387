//! The house rules of docs/architecture.md as a test: reads every `crate::`/`super::`/`desam::` path in
//! `src/`, checks that rooms only import rooms on their floor or below, the "never" rules, and no file cycles.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Floors, bottom up. A room may import rooms on its own floor or below; the doors (top floor) never
/// import each other. Keep in step with docs/architecture.md.
const FLOORS: &[&[&str]] = &[
    &["limits", "guard", "atomic", "clock", "runtime", "http", "raster"],
    &["model", "volume"],
    &["dicom", "nifti", "modeldir", "registry"],
    &["engine", "phantom"],
    &["train", "harness"],
    &["cli", "orthanc"],
    &["bin"],
];
/// The front doors' rooms (`bin/` holds the CLI door's two `main`s over `cli/`).
const DOORS: &[&str] = &["cli", "orthanc"];

/// Spelled-out "never" rules (most follow from the floors; they are listed so a change of floors
/// cannot quietly lift them).
const NEVER: &[(&str, &str)] = &[
    ("engine", "dicom"),
    ("engine", "orthanc"),
    ("engine", "phantom"),
    ("model", "engine"),
    ("model", "dicom"),
    ("train", "orthanc"),
    ("cli", "orthanc"),
    ("orthanc", "cli"),
    ("orthanc", "train"),
    ("bin", "orthanc"),
];

/// File-level edges allowed to close a cycle: the cxx bridge declares the Rust functions the C++
/// shim calls back, so it and the entry points name each other by construction.
const CYCLE_EXEMPT: &[(&str, &str)] = &[("orthanc/bridge", "orthanc/entry")];

fn floor_of(room: &str) -> Option<usize> {
    FLOORS.iter().position(|f| f.contains(&room))
}

/// Source text without comments, string literals and `#[cfg(test)] mod tests` blocks.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let b = text.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' && (i == 0 || b[i - 1] != b'\'') {
            // A string literal (raw strings r"..."/r#"..."# included): skip to its end.
            let hashes = {
                let mut h = 0;
                let mut j = i;
                while j > 0 && b[j - 1] == b'#' {
                    h += 1;
                    j -= 1;
                }
                if j > 0 && b[j - 1] == b'r' {
                    Some(h)
                } else {
                    None
                }
            };
            i += 1;
            loop {
                if i >= b.len() {
                    break;
                }
                match hashes {
                    None if b[i] == b'\\' => i += 2,
                    None if b[i] == b'"' => {
                        i += 1;
                        break;
                    }
                    Some(h) if b[i] == b'"' && b[i + 1..].iter().take(h).filter(|&&c| c == b'#').count() == h => {
                        i += 1 + h;
                        break;
                    }
                    _ => i += 1,
                }
            }
            out.push_str("\"\"");
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// Every path after `root::` in `code`, expanded through `use root::{a::b, c}` groups: each item is the
/// list of its segments (e.g. ["orthanc", "worker", "Plugin"]).
fn paths_after(code: &str, root: &str) -> Vec<Vec<String>> {
    let pat = format!("{root}::");
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(k) = code[from..].find(&pat) {
        let start = from + k;
        from = start + pat.len();
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        expand(&code[from..], Vec::new(), &mut out);
    }
    out
}

/// Parses one path tail (`a::b::{c, d::e}` or `a::b`) into full paths, appended to `out`.
fn expand(s: &str, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let s_trim = s.trim_start();
    let skipped = s.len() - s_trim.len();
    if let Some(inner) = s_trim.strip_prefix('{') {
        let mut used = 1;
        let mut rest = inner;
        loop {
            let t = rest.trim_start();
            used += rest.len() - t.len();
            if let Some(r) = t.strip_prefix('}') {
                let _ = r;
                return skipped + used + 1;
            }
            if let Some(r) = t.strip_prefix(',') {
                used += 1;
                rest = r;
                continue;
            }
            if t.is_empty() {
                return skipped + used;
            }
            let n = expand(t, prefix.clone(), out);
            used += n.max(1);
            rest = &t[n.max(1)..];
        }
    }
    let id = ident_at(s_trim);
    if id.is_empty() {
        if !prefix.is_empty() {
            out.push(prefix);
        }
        return skipped + s_trim.len().min(1);
    }
    let mut p = prefix;
    p.push(id.to_string());
    let after = &s_trim[id.len()..];
    if let Some(r) = after.strip_prefix("::") {
        return skipped + id.len() + 2 + expand(r, p, out);
    }
    out.push(p);
    skipped + id.len()
}

/// A source file's place: its room ("orthanc", "clock", "bin") and its file key ("orthanc/worker").
#[derive(Debug, Clone)]
struct Unit {
    room: String,
    key: String,
}

fn unit_of(rel: &Path) -> Unit {
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    let room = parts[0].clone();
    let key = if parts.len() == 1 { room.clone() } else { parts.join("/") };
    Unit { room, key }
}

#[derive(Debug, Default)]
struct Report {
    violations: Vec<String>,
    rooms: BTreeMap<String, BTreeSet<String>>,
}

/// Checks the rules over `files` (path relative to src/ → text); `file_keys` tells which keys are files.
fn check(files: &BTreeMap<PathBuf, String>) -> Report {
    let mut report = Report::default();
    let file_keys: BTreeSet<String> = files.keys().map(|p| unit_of(p).key).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in files {
        if rel.as_os_str() == "lib.rs" {
            continue;
        }
        let unit = unit_of(rel);
        let code = code_of(text);
        let mut targets: Vec<Vec<String>> = paths_after(&code, "crate");
        if unit.room == "bin" {
            targets.extend(paths_after(&code, "desam")); // the binaries name the library by its crate name
        }
        for p in &targets {
            let Some(room) = p.first() else { continue };
            if *room == unit.room || room == "self" {
                if let Some(f) = p.get(1).map(|f| format!("{room}/{f}")).filter(|k| file_keys.contains(k)) {
                    if f != unit.key {
                        edges.entry(unit.key.clone()).or_default().insert(f);
                    }
                }
                continue;
            }
            report.rooms.entry(unit.room.clone()).or_default().insert(room.clone());
            let (Some(a), Some(b)) = (floor_of(&unit.room), floor_of(room)) else {
                report.violations.push(format!("{}: room `{}` or `{room}` is on no floor", rel.display(), unit.room));
                continue;
            };
            if b > a {
                report.violations.push(format!(
                    "{}: upward import `{}` (floor {a}) → `{room}` (floor {b})",
                    rel.display(),
                    unit.room
                ));
            } else if a == b && DOORS.contains(&unit.room.as_str()) && DOORS.contains(&room.as_str()) {
                report.violations.push(format!("{}: door `{}` imports door `{room}`", rel.display(), unit.room));
            }
            if NEVER.contains(&(unit.room.as_str(), room.as_str())) {
                report.violations.push(format!("{}: `{}` must never import `{room}`", rel.display(), unit.room));
            }
        }
        // Siblings named through `super::file::...` (inside a room).
        if let Some(dir) = unit.key.rsplit_once('/').map(|(d, _)| d.to_string()) {
            for p in paths_after(&code, "super") {
                if let Some(f) = p.first().map(|f| format!("{dir}/{f}")).filter(|k| file_keys.contains(k)) {
                    if f != unit.key {
                        edges.entry(unit.key.clone()).or_default().insert(f);
                    }
                }
            }
        }
    }
    for (a, b) in CYCLE_EXEMPT {
        for (x, y) in [(a, b), (b, a)] {
            if let Some(e) = edges.get_mut(*x) {
                e.remove(*y);
            }
        }
    }
    // Module files (x/mod.rs) only declare and re-export: they are not part of file cycles.
    for e in edges.values_mut() {
        e.retain(|k| !k.ends_with("/mod"));
    }
    edges.retain(|k, _| !k.ends_with("/mod"));
    for cycle in cycles(&edges) {
        report.violations.push(format!("import cycle: {}", cycle.join(" → ")));
    }
    report
}

/// One representative cycle per strongly connected component with more than one file.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut reported: BTreeSet<String> = BTreeSet::new();
    for start in edges.keys() {
        if reported.contains(start) {
            continue;
        }
        // Depth-first search for a path back to `start`.
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((node, path)) = stack.pop() {
            for next in edges.get(&node).into_iter().flatten() {
                if next == start {
                    let mut c = path.clone();
                    c.push(start.clone());
                    reported.extend(path.iter().cloned());
                    out.push(c);
                    stack.clear();
                    break;
                }
                if seen.insert(next.clone()) {
                    let mut p = path.clone();
                    p.push(next.clone());
                    stack.push((next.clone(), p));
                }
            }
        }
    }
    out
}

fn read_tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn the_tree_keeps_the_house_rules() {
    let files = read_tree(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(files.len() > 50, "src/ not found");
    let report = check(&files);
    for (room, deps) in &report.rooms {
        println!("{room} → {}", deps.iter().cloned().collect::<Vec<_>>().join(", "));
    }
    assert!(
        report.violations.is_empty(),
        "house rules broken (docs/architecture.md):\n{}",
        report.violations.join("\n")
    );
}

#[test]
fn every_room_is_on_a_floor() {
    let files = read_tree(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let rooms: BTreeSet<String> = files.keys().filter(|p| p.as_os_str() != "lib.rs").map(|p| unit_of(p).room).collect();
    let missing: Vec<_> = rooms.iter().filter(|r| floor_of(r).is_none()).collect();
    assert!(missing.is_empty(), "rooms on no floor (add them to FLOORS and docs/architecture.md): {missing:?}");
}

fn tree(files: &[(&str, &str)]) -> BTreeMap<PathBuf, String> {
    files.iter().map(|(p, t)| (PathBuf::from(p), t.to_string())).collect()
}

#[test]
fn the_checker_catches_each_kind_of_break() {
    // Upward, through a `use` group spread over lines.
    let r = check(&tree(&[
        ("engine/segmenter.rs", "use crate::{\n    model::DeSam,\n    dicom::series::read,\n};"),
        ("dicom/series.rs", ""),
    ]));
    assert!(r.violations.iter().any(|v| v.contains("`engine` must never import `dicom`")), "{:?}", r.violations);
    let r = check(&tree(&[("model/desam.rs", "fn f() -> crate::engine::Mode { todo!() }")]));
    assert!(r.violations.iter().any(|v| v.contains("upward import `model`")), "{:?}", r.violations);
    // A door importing a door, as an inline path.
    let r = check(&tree(&[("cli/segment.rs", "fn f() { crate::orthanc::config::load(); }")]));
    assert!(r.violations.iter().any(|v| v.contains("door `cli` imports door `orthanc`")), "{:?}", r.violations);
    // train → orthanc; a binary importing the plugin through the crate's name.
    let r = check(&tree(&[("train/pull.rs", "use crate::orthanc::metadata::utc_now;")]));
    assert!(r.violations.iter().any(|v| v.contains("never import `orthanc`")), "{:?}", r.violations);
    let r = check(&tree(&[("bin/desam.rs", "use desam::orthanc::entry;")]));
    assert!(r.violations.iter().any(|v| v.contains("`bin` must never import `orthanc`")), "{:?}", r.violations);
    // A cycle of three files in one room, via super:: and crate::.
    let r = check(&tree(&[
        ("orthanc/entry.rs", "use super::rest::ROUTES;"),
        ("orthanc/rest.rs", "use crate::orthanc::worker::Plugin;"),
        ("orthanc/worker.rs", "fn p() { super::entry::plugin() }"),
    ]));
    assert!(
        r.violations.iter().any(|v| v.starts_with("import cycle") && v.contains("orthanc/rest")),
        "{:?}",
        r.violations
    );
    // Not fooled by comments and strings; a clean downward tree passes.
    let r = check(&tree(&[
        ("engine/a.rs", "// use crate::dicom::x;\nlet s = \"crate::orthanc::y\"; use crate::model::M;"),
        ("orthanc/w.rs", "use crate::engine::Segmenter; use super::x::Y;"),
        ("orthanc/x.rs", "pub struct Y;"),
    ]));
    assert!(r.violations.is_empty(), "{:?}", r.violations);
}

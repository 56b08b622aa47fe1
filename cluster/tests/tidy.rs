//! Style as a test (after tigerbeetle's tidy.zig): the cluster crate stays sans-IO and
//! deterministic. No clock, randomness, threads, async, I/O or runtime may appear in
//! cluster/src, and iterated maps must be ordered.

use std::path::Path;

/// Identifiers whose mere presence breaks determinism or the sans-IO boundary.
const FORBIDDEN: &[(&str, &str)] = &[
    ("Instant::now", "reads a clock; take `now` as an argument"),
    ("SystemTime", "reads a clock; take `now` as an argument"),
    ("thread::spawn", "spawns a thread"),
    ("std::thread", "threads belong to the driver"),
    ("rand::", "randomness belongs to the driver (seeded)"),
    ("getrandom", "OS randomness"),
    ("fastrand", "randomness belongs to the driver (seeded)"),
    ("async fn", "the core never awaits"),
    (".await", "the core never awaits"),
    ("std::net", "network I/O belongs to the driver"),
    ("std::fs", "file I/O belongs to the driver"),
    ("std::io::", "I/O belongs to the driver"),
    ("glommio", "the runtime belongs to the driver"),
    ("tokio", "the runtime belongs to the driver"),
    ("HashMap", "iteration order varies; use BTreeMap"),
    ("HashSet", "iteration order varies; use BTreeSet"),
    ("unsafe", "the crate is safe Rust"),
];

#[test]
fn cluster_sources_stay_sans_io_and_deterministic() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for (needle, why) in FORBIDDEN {
                if code.contains(needle) {
                    violations.push(format!(
                        "{}:{}: `{needle}`: {why}",
                        path.display(),
                        number + 1
                    ));
                }
            }
        }
    }
    assert!(
        files >= 8,
        "found only {files} source files; did the layout change?"
    );
    assert!(violations.is_empty(), "\n{}", violations.join("\n"));
}

#[test]
fn cluster_depends_on_no_runtime_or_randomness() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let dependencies = manifest
        .split("[dependencies]")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .unwrap_or("");
    for crate_name in [
        "glommio",
        "tokio",
        "rand",
        "fastrand",
        "getrandom",
        "ringkv-engine",
    ] {
        assert!(
            !dependencies
                .lines()
                .any(|l| l.trim_start().starts_with(crate_name)),
            "cluster must not depend on {crate_name}"
        );
    }
}

//! `ringkv get | put | del | status` against a real node: round trips, JSON output,
//! siblings, and the exit codes scripts rely on.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use ringkv_client::{Client, PutMode, WriteOptions};
use serde_json::Value;

mod common;
use common::{Server, tempdir};

fn ringkv(server_addr: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .args(args)
        .args(["--addr", server_addr])
        .output()
        .unwrap()
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[test]
fn round_trips_siblings_and_exit_codes() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let native = server.native.clone();
    let addr = native.as_str();

    let put = ringkv(addr, &["put", "greeting", "hello world"]);
    assert!(put.status.success(), "{put:?}");
    let get = ringkv(addr, &["get", "greeting"]);
    assert_eq!(get.status.code(), Some(0));
    assert_eq!(get.stdout, b"hello world\n");

    // The value from standard input, byte for byte.
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .args(["put", "piped", "--addr", addr])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"line one\nline two\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(
        ringkv(addr, &["get", "piped"]).stdout,
        b"line one\nline two\n"
    );

    // Absent: exit 1; JSON says so.
    let absent = ringkv(addr, &["get", "nope", "-o", "json"]);
    assert_eq!(absent.status.code(), Some(1));
    assert_eq!(json(&absent)["found"], false);

    // Two writers that saw nothing leave siblings; the CLI shows both and a context
    // that resolves them.
    let client = Client::builder().seeds([addr]).connect_blocking().unwrap();
    for value in [&b"red"[..], b"blue"] {
        client
            .put_with(b"color", value, PutMode::Sibling, WriteOptions::default())
            .unwrap();
    }
    let shown = ringkv(addr, &["get", "color"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("2 siblings") && text.contains("red") && text.contains("blue"),
        "{text}"
    );
    let found = json(&ringkv(addr, &["get", "color", "-o", "json"]));
    let mut siblings: Vec<&str> = found["siblings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    siblings.sort();
    assert_eq!(siblings, ["blue", "red"]);
    let context = found["context"].as_str().unwrap();
    let resolved = ringkv(addr, &["put", "color", "purple", "--context", context]);
    assert!(resolved.status.success());
    assert_eq!(ringkv(addr, &["get", "color"]).stdout, b"purple\n");
    let bad_context = ringkv(addr, &["put", "color", "x", "--context", "zz"]);
    assert_eq!(bad_context.status.code(), Some(5));

    // Delete, then absent.
    let del = ringkv(addr, &["del", "greeting", "-o", "json"]);
    assert_eq!(json(&del)["ok"], true);
    assert_eq!(ringkv(addr, &["get", "greeting"]).status.code(), Some(1));

    // A quorum the node cannot meet is refused (5), with a reason.
    let refused = ringkv(addr, &["get", "piped", "--r", "3"]);
    assert_eq!(refused.status.code(), Some(5));
    assert!(!refused.stderr.is_empty());

    // Status: this node, two shards owning all 64 partitions, counters moving.
    let status = json(&ringkv(addr, &["status", "-o", "json"]));
    assert_eq!(status["partitions"], 64);
    let node = &status["nodes"][0];
    assert_eq!(node["native"], addr);
    let shards = node["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2);
    let partitions: u64 = shards
        .iter()
        .map(|s| s["partitions"].as_u64().unwrap())
        .sum();
    assert_eq!(partitions, 64);
    let writes: u64 = shards.iter().map(|s| s["writes"].as_u64().unwrap()).sum();
    assert!(writes >= 5, "{status}");
    let table = ringkv(addr, &["status"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("partitions=64"));
    drop(server);

    // Nothing listening: exit 3.
    let down = ringkv(addr, &["get", "greeting", "--timeout", "0.5"]);
    assert_eq!(down.status.code(), Some(3), "{down:?}");
}

#[test]
fn bench_runs_for_a_second_and_prints_one_json_object() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .args(["bench", "--seconds", "1", "--json", "--keys", "500"])
        .args(["--connections", "4", "--depth", "2", "--workload", "a"])
        .args(["--distribution", "zipfian", "--addr", &server.native])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json(&out);
    let operations = report["operations"].as_array().unwrap();
    let names: Vec<&str> = operations
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["read", "update"]);
    for op in operations {
        for field in ["ops_per_sec", "p50_us", "p99_us", "p999_us", "max_us"] {
            assert!(op[field].as_f64().unwrap() > 0.0, "{field} in {op}");
        }
        assert_eq!(op["errors"], 0, "{report}");
        assert!(op["p50_us"].as_f64() <= op["p99_us"].as_f64());
    }
}

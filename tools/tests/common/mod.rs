//! A real `ringkv server` process on loopback for the client and CLI tests.
#![allow(dead_code)] // Each test file uses its own part of this.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub dir: PathBuf,
    /// The node's native-protocol address (shards at the next two ports).
    pub native: String,
    pub resp_port: u16,
    base: u16,
}

impl Server {
    /// Starts a two-shard node on free ports with its data in `dir`.
    pub fn start(dir: &Path) -> Server {
        Server::start_on(dir, free_ports())
    }

    pub fn start_on(dir: &Path, base: u16) -> Server {
        let native = format!("127.0.0.1:{}", base + 3);
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringkv"))
            .args(["server", "--shards", "2", "--partitions", "64"])
            .args(["--resp", &format!("127.0.0.1:{base}")])
            .args(["--listen", &native])
            .arg("--data-dir")
            .arg(dir)
            .stdout(Stdio::piped())
            .spawn()
            .expect("ringkv server starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "server did not get ready");
            match lines.next() {
                Some(Ok(line)) if line.starts_with("ringkv server ready") => break,
                Some(Ok(_)) => {}
                _ => panic!("server exited before it was ready"),
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            dir: dir.to_owned(),
            native,
            resp_port: base,
            base,
        }
    }

    /// The same node again after a clean stop (same ports, same data).
    pub fn restart(mut self) -> Server {
        self.stop();
        Server::start_on(&self.dir.clone(), self.base)
    }

    /// SIGTERM and wait: the node drains and exits 0.
    pub fn stop(&mut self) {
        signal(self.child.id(), "TERM");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "server exited with {status}");
    }

    pub fn pause(&self) {
        signal(self.child.id(), "STOP");
    }

    pub fn resume(&self) {
        signal(self.child.id(), "CONT");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), "CONT");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// A base port with the six ports from it free (best effort; loopback only).
pub fn free_ports() -> u16 {
    loop {
        let base = fastrand::u16(20_000..60_000);
        if (0..6).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

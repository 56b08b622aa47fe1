//! A real node (two shards) on loopback for the end-to-end tests.
#![allow(dead_code)] // Each test file uses its own part of this.

use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringkv_server::config::ServerConfig;

pub const SHARDS: u16 = 2;

/// Ports a node takes from `base`: RESP `base..=base+2`, native `base+3..=base+5`.
pub const PORTS: u16 = 2 * (SHARDS + 1);

pub fn native_port(base: u16) -> u16 {
    base + SHARDS + 1
}

/// A two-shard node's configuration on ports from `base` (see [`PORTS`]).
pub fn config(dir: &Path, base: u16) -> ServerConfig {
    ServerConfig {
        resp: format!("127.0.0.1:{base}").parse().unwrap(),
        listen: format!("127.0.0.1:{}", native_port(base)).parse().unwrap(),
        data_dir: dir.to_path_buf(),
        shards: SHARDS as usize,
        partitions: 64,
        max_value_bytes: 64 << 10,
        ..ServerConfig::default()
    }
}

pub struct Node {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Node {
    pub fn start(dir: &Path, base: u16) -> Node {
        Node::start_with(config(dir, base))
    }

    pub fn start_with(config: ServerConfig) -> Node {
        // The last listener a node binds: shard 1's own native port.
        let last = config.shard_native_addr(config.shard_count() - 1);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            ringkv_server::runtime::run_until(config, flag).expect("node ran")
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(last).is_err() {
            assert!(Instant::now() < deadline, "node did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        Node {
            stop,
            thread: Some(thread),
        }
    }

    pub fn client(&self, port: u16) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_connection()
            .unwrap()
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("node stopped cleanly");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A base port with the [`PORTS`] ports from it free (best effort; loopback only).
pub fn free_ports() -> u16 {
    loop {
        let base = fastrand::u16(20_000..60_000);
        if (0..PORTS).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
}

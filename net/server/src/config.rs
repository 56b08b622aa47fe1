//! Server configuration: defaults, the TOML file, and validation. The binary overlays
//! command-line flags on top of the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ringkv_cluster::phi::PhiConfig;
use ringkv_cluster::{HintConfig, MembershipConfig, NodeId, Quorum};
use ringkv_engine::Durability;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub node_id: u32,
    /// Native protocol address, shared by every shard (SO_REUSEPORT). Shard i also
    /// listens alone on port + 1 + i, so a shard-aware client lands on a key's owner
    /// without a hop.
    pub listen: SocketAddr,
    /// Redis protocol address, shared by every shard (SO_REUSEPORT); shard i also
    /// listens alone on port + 1 + i.
    pub resp: SocketAddr,
    pub data_dir: PathBuf,
    /// Executors (one per core); 0 means one per available core.
    pub shards: usize,
    /// Partitions of the key space (a power of two); fixed for the life of the data.
    pub partitions: u32,
    /// `sync`, `none` or `interval(<ms>)`.
    pub durability: String,
    pub max_value_bytes: usize,
    /// Open connections per shard beyond which new ones are refused with an error.
    pub max_connections_per_shard: usize,
    /// Pipelined requests of one connection executed at once; more wait their turn.
    pub max_pipeline: usize,
    /// Requests in flight on one shard beyond which new ones get `Overloaded`.
    pub max_inflight_per_shard: usize,
    /// Every member of the cluster, this node included, as `id@host:port` (each one's
    /// native address); every node must be given the same list. Empty: a single node.
    pub peers: Vec<String>,
    /// N, replicas of each key (at most the member count). Requests that name no R or
    /// W use a majority of N.
    pub replicas: usize,
    /// How long a coordinator waits for its quorum before answering Timeout (ms).
    pub request_timeout_ms: u64,
    /// How long an idle executor keeps polling before it sleeps (µs). Waking a
    /// sleeping executor (a hop from another shard) costs syscalls and inter-processor
    /// interrupts; a short spin avoids them under load and costs CPU when idle.
    pub spin_before_park_us: u64,
    /// Gossip membership: a heartbeat to every member this often (ms), the whole view
    /// to a few random members every gossip interval (ms), and the phi at which a
    /// silent member is taken for down (routed around, never removed).
    pub heartbeat_interval_ms: u64,
    pub gossip_interval_ms: u64,
    pub phi_threshold: f64,
    /// Sloppy quorum's hints, per target node and per shard: the most bytes kept
    /// (past it, a hinted write is refused and does not count toward W), the age
    /// after which a hint is dropped and counted (seconds), and the handoff pace to
    /// a returning node (bytes per second; hints in flight at once).
    pub hint_bytes_max: u64,
    pub hint_age_max_s: u64,
    pub handoff_bytes_per_second: u64,
    pub handoff_in_flight: usize,
    /// Milliseconds between anti-entropy exchanges of each shard (one partition with
    /// one other replica each time; 0: off).
    pub anti_entropy_interval_ms: u64,
    /// Seconds a tombstone is kept at least; then it is collected once every replica
    /// of its key holds it (or nothing). 0: never collected. Must exceed
    /// `hint_age_max_s` plus twice the request timeout, so no hint of a deleted value
    /// outlives its tombstone.
    pub tombstone_grace_s: u64,
    /// Most keys each shard's anti-entropy pushes to peers per second (0: no limit).
    pub anti_entropy_pushes_per_second: u64,
    /// A running member's native address: a node with no ring view stored yet asks it
    /// to join the cluster (or, with `replace`, to take over a dead node's partitions)
    /// and starts from the view it answers. Ignored once a view is stored.
    pub join: Option<String>,
    /// With `join`: the id of the dead node this one replaces.
    pub replace: Option<u32>,
    /// Most keys each shard streams to new replicas per second during a membership
    /// change (0: no limit).
    pub transfer_keys_per_second: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            node_id: 1,
            listen: "127.0.0.1:7500".parse().expect("a valid literal address"),
            resp: "127.0.0.1:7379".parse().expect("a valid literal address"),
            data_dir: PathBuf::from("ringkv-data"),
            shards: 0,
            partitions: 1024,
            durability: "sync".into(),
            max_value_bytes: 1 << 20,
            max_connections_per_shard: 10_000,
            max_pipeline: 128,
            max_inflight_per_shard: 50_000,
            peers: Vec::new(),
            replicas: 3,
            request_timeout_ms: 1000,
            spin_before_park_us: 0,
            heartbeat_interval_ms: 200,
            gossip_interval_ms: 1000,
            phi_threshold: 8.0,
            hint_bytes_max: 256 << 20,
            hint_age_max_s: 3 * 3600,
            handoff_bytes_per_second: 8 << 20,
            handoff_in_flight: 32,
            anti_entropy_interval_ms: 100,
            tombstone_grace_s: 4 * 3600,
            anti_entropy_pushes_per_second: 2_000,
            join: None,
            replace: None,
            transfer_keys_per_second: 20_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ServerConfig {
    pub fn from_file(path: &std::path::Path) -> Result<ServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// The shard count after resolving 0 to the number of available cores.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            return self.shards;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if !self.partitions.is_power_of_two() || self.partitions < 2 {
            return invalid(format!(
                "partitions = {} must be a power of two, at least 2",
                self.partitions
            ));
        }
        if self.shard_count() > self.partitions as usize {
            return invalid(format!(
                "{} shards cannot share {} partitions",
                self.shard_count(),
                self.partitions
            ));
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if self.shard_count() > cpus {
            return invalid(format!(
                "{} shards need {} CPUs (one executor pinned to each); this machine has {cpus}",
                self.shard_count(),
                self.shard_count()
            ));
        }
        if self.shard_count() > 256 {
            return invalid(format!("{} shards: at most 256", self.shard_count()));
        }
        if self.max_pipeline == 0
            || self.max_connections_per_shard == 0
            || self.max_inflight_per_shard == 0
        {
            return invalid("max_pipeline, max_connections_per_shard and max_inflight_per_shard must be above 0".into());
        }
        self.check_ports()?;
        self.members()?;
        if self.replicas == 0 || self.replicas > ringkv_cluster::Quorum::N_MAX {
            return invalid(format!(
                "replicas must be 1 to {}, not {}",
                ringkv_cluster::Quorum::N_MAX,
                self.replicas
            ));
        }
        self.durability
            .parse::<ringkv_engine::Durability>()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(())
    }

    /// The cluster's members as (id, native address), ordered by id; just this node
    /// when no peers are configured.
    pub fn members(&self) -> Result<Vec<(u32, SocketAddr)>, ConfigError> {
        if self.peers.is_empty() {
            return Ok(vec![(self.node_id, self.listen)]);
        }
        let mut members = Vec::new();
        for peer in &self.peers {
            let parsed = peer.split_once('@').and_then(|(id, addr)| {
                Some((id.parse::<u32>().ok()?, addr.parse::<SocketAddr>().ok()?))
            });
            let Some(member) = parsed else {
                return Err(ConfigError::Invalid(format!(
                    "peer '{peer}' is not id@host:port (for example 2@127.0.0.1:7510)"
                )));
            };
            members.push(member);
        }
        members.sort();
        if members.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(ConfigError::Invalid("peers name a node id twice".into()));
        }
        match members.iter().find(|(id, _)| *id == self.node_id) {
            None => Err(ConfigError::Invalid(format!(
                "peers do not include this node (id {}); list every member, this one too",
                self.node_id
            ))),
            Some((_, addr)) if *addr != self.listen => Err(ConfigError::Invalid(format!(
                "peers give node {} the address {addr}, but it listens on {}",
                self.node_id, self.listen
            ))),
            Some(_) => Ok(members),
        }
    }

    /// N as used: the configured replicas, at most one per member.
    pub fn replica_count(&self) -> usize {
        let members = self.members().map_or(1, |m| m.len());
        self.replicas.clamp(1, members)
    }

    /// The port shard `shard` listens on alone for RESP.
    pub fn shard_resp_addr(&self, shard: usize) -> SocketAddr {
        shard_addr(self.resp, shard)
    }

    /// The port shard `shard` listens on alone for the native protocol.
    pub fn shard_native_addr(&self, shard: usize) -> SocketAddr {
        shard_addr(self.listen, shard)
    }

    /// Every address the node listens on.
    pub fn all_addrs(&self) -> Vec<SocketAddr> {
        let shards = 0..self.shard_count();
        let mut addrs = vec![self.resp, self.listen];
        addrs.extend(shards.clone().map(|i| self.shard_resp_addr(i)));
        addrs.extend(shards.map(|i| self.shard_native_addr(i)));
        addrs
    }

    /// Each protocol takes a block of 1 + shards ports; the blocks must be real ports
    /// and must not overlap.
    fn check_ports(&self) -> Result<(), ConfigError> {
        let span = self.shard_count() as u32;
        let block = |addr: SocketAddr| addr.port() as u32..=addr.port() as u32 + span;
        let (resp, native) = (block(self.resp), block(self.listen));
        for (name, ports) in [("resp", &resp), ("listen", &native)] {
            if *ports.start() == 0 || *ports.end() > u16::MAX as u32 {
                return Err(ConfigError::Invalid(format!(
                    "{name} port {} leaves no room for {span} shard ports after it (ports {}..={})",
                    ports.start(),
                    ports.start(),
                    ports.end()
                )));
            }
        }
        let same_host = self.resp.ip() == self.listen.ip()
            || self.resp.ip().is_unspecified()
            || self.listen.ip().is_unspecified();
        if same_host && resp.start() <= native.end() && native.start() <= resp.end() {
            return Err(ConfigError::Invalid(format!(
                "resp ports {}..={} overlap listen ports {}..={} (each protocol takes 1 + shards ports)",
                resp.start(),
                resp.end(),
                native.start(),
                native.end()
            )));
        }
        Ok(())
    }
}

fn shard_addr(base: SocketAddr, shard: usize) -> SocketAddr {
    let mut addr = base;
    addr.set_port(base.port() + 1 + shard as u16);
    addr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ringkv.toml");
        std::fs::write(
            &path,
            "node_id = 7\npartitions = 256\nresp = \"127.0.0.1:9000\"\n",
        )
        .unwrap();
        let config = ServerConfig::from_file(&path).unwrap();
        assert_eq!((config.node_id, config.partitions), (7, 256));
        assert_eq!(config.shard_resp_addr(1).port(), 9002);
        assert_eq!(config.max_pipeline, ServerConfig::default().max_pipeline);
        std::fs::write(&path, "nodeid = 7\n").unwrap();
        assert!(matches!(
            ServerConfig::from_file(&path),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn validation_names_the_problem() {
        let bad = ServerConfig {
            partitions: 1000,
            ..ServerConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("power of two")
        );
        let bad = ServerConfig {
            shards: 8,
            partitions: 4,
            ..ServerConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = ServerConfig {
            durability: "often".into(),
            ..ServerConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = ServerConfig {
            shards: 2,
            resp: "127.0.0.1:7000".parse().unwrap(),
            listen: "127.0.0.1:7002".parse().unwrap(),
            ..ServerConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("overlap"));
        let bad = ServerConfig {
            listen: "127.0.0.1:65535".parse().unwrap(),
            ..ServerConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("no room"));
        let cluster = |peers: &[&str]| ServerConfig {
            peers: peers.iter().map(|p| p.to_string()).collect(),
            ..ServerConfig::default()
        };
        let good = cluster(&["2@127.0.0.1:7510", "1@127.0.0.1:7500", "3@127.0.0.1:7520"]);
        assert_eq!(good.members().unwrap()[0].0, 1);
        assert_eq!(good.replica_count(), 3);
        for (peers, problem) in [
            (&["2@127.0.0.1:7510"][..], "do not include this node"),
            (&["1@127.0.0.1:9999"][..], "listens on"),
            (&["1@127.0.0.1:7500", "1@127.0.0.1:7510"][..], "twice"),
            (&["one@here"][..], "id@host:port"),
        ] {
            let err = cluster(peers).validate().unwrap_err().to_string();
            assert!(err.contains(problem), "{err}");
        }
        assert_eq!(ServerConfig::default().replica_count(), 1);
        assert!(ServerConfig::default().validate().is_ok());
    }
}

/// The configuration as the runtime uses it, parsed and checked once when the node
/// starts and shared by every shard: typed where [`ServerConfig`] holds text or raw
/// numbers. Everything else is read through it from the configuration (`Deref`).
#[derive(Debug)]
pub(crate) struct Settings {
    config: ServerConfig,
    /// Every member with its native address, ordered by id.
    pub members: Vec<(NodeId, SocketAddr)>,
    pub durability: Durability,
    pub request_timeout: Duration,
    pub spin_before_park: Duration,
    /// N from the configuration (at most one replica per member), R and W a majority.
    pub quorum: Quorum,
    /// Executors: the configured count, or one per available core.
    pub shards: usize,
    pub membership: MembershipConfig,
    pub hints: HintConfig,
    pub tombstone_grace: Option<Duration>,
}

impl ServerConfig {
    /// Checks the configuration and parses it for the runtime.
    pub(crate) fn settings(self) -> Result<Settings, ConfigError> {
        self.validate()?;
        let invalid = |e: &dyn std::fmt::Display| ConfigError::Invalid(e.to_string());
        let members = self
            .members()?
            .into_iter()
            .map(|(id, addr)| (NodeId(id), addr))
            .collect();
        let durability = self.durability.parse().map_err(|e| invalid(&e))?;
        let n = self.replica_count();
        let majority = n / 2 + 1;
        let quorum = Quorum::new(n, majority, majority).map_err(|e| invalid(&e))?;
        if self.heartbeat_interval_ms == 0
            || self.gossip_interval_ms < self.heartbeat_interval_ms
            || !(self.phi_threshold >= 1.0 && self.phi_threshold.is_finite())
        {
            return Err(invalid(&format!(
                "heartbeat_interval_ms = {} must be above 0 and at most gossip_interval_ms = {}, and phi_threshold = {} at least 1",
                self.heartbeat_interval_ms, self.gossip_interval_ms, self.phi_threshold
            )));
        }
        let heartbeat_interval = Duration::from_millis(self.heartbeat_interval_ms);
        let membership = MembershipConfig {
            heartbeat_interval,
            gossip_interval: Duration::from_millis(self.gossip_interval_ms),
            phi: PhiConfig {
                threshold: self.phi_threshold,
                first_gap: heartbeat_interval,
                ..PhiConfig::default()
            },
            // Nodes join at run time (`--join`): gossip learns them.
            learn_members: true,
            ..MembershipConfig::default()
        };
        if self.handoff_bytes_per_second == 0 || self.handoff_in_flight == 0 {
            return Err(invalid(&format!(
                "handoff_bytes_per_second = {} and handoff_in_flight = {} must be above 0",
                self.handoff_bytes_per_second, self.handoff_in_flight
            )));
        }
        let hints = HintConfig {
            bytes_max: self.hint_bytes_max,
            age_max: Duration::from_secs(self.hint_age_max_s),
            handoff_bytes_per_second: self.handoff_bytes_per_second,
            handoff_in_flight: self.handoff_in_flight,
            ..HintConfig::default()
        };
        let tombstone_grace =
            (self.tombstone_grace_s > 0).then(|| Duration::from_secs(self.tombstone_grace_s));
        let request_timeout = Duration::from_millis(self.request_timeout_ms);
        if let Some(grace) = tombstone_grace
            && grace <= hints.age_max + request_timeout * 2
        {
            return Err(invalid(&format!(
                "tombstone_grace_s = {} must exceed hint_age_max_s = {} plus twice the request timeout ({} ms), or a hint of a deleted value could outlive its tombstone",
                self.tombstone_grace_s, self.hint_age_max_s, self.request_timeout_ms
            )));
        }
        Ok(Settings {
            tombstone_grace,
            hints,
            membership,
            members,
            durability,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            spin_before_park: Duration::from_micros(self.spin_before_park_us),
            quorum,
            shards: self.shard_count(),
            config: self,
        })
    }
}

impl std::ops::Deref for Settings {
    type Target = ServerConfig;

    fn deref(&self) -> &ServerConfig {
        &self.config
    }
}

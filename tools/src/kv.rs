//! `ringkv get | put | del | status`: one request through the client, printed for
//! people (`-o table`) or scripts (`-o json`), with exit codes scripts can rely on.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use ringkv_client::{Client, Context, Error, PutMode, ReadOptions, Versions, WriteOptions};
use serde_json::{Value, json};

/// Exit codes (also in README.md): 0 done; 1 the key is absent (get); 2 bad usage
/// (clap's); 3 no node reachable or none could serve; 4 timed out (a write's outcome is
/// unknown); 5 the request was refused as invalid or too large; 6 anything else.
pub mod exit {
    pub const NOT_FOUND: u8 = 1;
    pub const UNREACHABLE: u8 = 3;
    pub const TIMEOUT: u8 = 4;
    pub const REFUSED: u8 = 5;
    pub const OTHER: u8 = 6;
}

/// `println!` that ends the process quietly when stdout is closed early (`| head`)
/// instead of panicking on the broken pipe.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

#[derive(Clone, Copy, ValueEnum, Default)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Args)]
pub struct Common {
    /// Any node's native-protocol address.
    #[arg(long, default_value = "127.0.0.1:7500")]
    pub addr: String,
    /// Output for people (table) or scripts (json).
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
    /// Reads and writes: only the key's own replicas count (sloppy quorum off; no
    /// stand-ins for down replicas). Ignored by status.
    #[arg(long)]
    pub strict: bool,
}

#[derive(Args)]
pub struct GetArgs {
    pub key: String,
    /// Replicas that must answer (default: the node's).
    #[arg(long)]
    pub r: Option<u8>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct PutArgs {
    pub key: String,
    /// The value; read from standard input when left out.
    pub value: Option<String>,
    /// Supersede exactly the siblings of this context (hex, as `get` prints it);
    /// without it the write replaces whatever the node holds.
    #[arg(long)]
    pub context: Option<String>,
    /// Replicas that must store the write durably (default: the node's).
    #[arg(long)]
    pub w: Option<u8>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct DelArgs {
    pub key: String,
    /// Delete exactly the siblings of this context (hex, as `get` prints it).
    #[arg(long)]
    pub context: Option<String>,
    #[arg(long)]
    pub w: Option<u8>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub common: Common,
}

pub fn get(args: GetArgs) -> ExitCode {
    let key = args.key.as_bytes();
    let common = &args.common;
    let result = connect(common).and_then(|client| {
        let options = ReadOptions {
            r: args.r,
            timeout: Some(timeout(common)),
            strict: common.strict,
        };
        client.get_with(key, options)
    });
    match result {
        Ok(found) => {
            match common.output {
                Output::Json => print_json(&found_json(&args.key, &found)),
                Output::Table => print_found(&args.key, &found),
            }
            if found.is_empty() {
                ExitCode::from(exit::NOT_FOUND)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => fail(common.output, &e),
    }
}

pub fn put(args: PutArgs) -> ExitCode {
    let value = match args.value {
        Some(value) => value.into_bytes(),
        None => {
            let mut value = Vec::new();
            if let Err(e) = std::io::stdin().read_to_end(&mut value) {
                eprintln!("ringkv: cannot read the value from standard input: {e}");
                return ExitCode::from(exit::OTHER);
            }
            value
        }
    };
    let (key, context) = (args.key.as_bytes(), args.context.as_deref());
    write(
        &args.common,
        "put",
        &args.key,
        context,
        args.w,
        |client, mode, options| client.put_with(key, &value, mode, options),
    )
}

pub fn del(args: DelArgs) -> ExitCode {
    let (key, context) = (args.key.as_bytes(), args.context.as_deref());
    write(
        &args.common,
        "del",
        &args.key,
        context,
        args.w,
        |client, mode, options| client.delete_with(key, mode, options),
    )
}

/// A put or delete: the context flag, W and the timeout, the request, the report.
fn write(
    common: &Common,
    what: &str,
    key: &str,
    context: Option<&str>,
    w: Option<u8>,
    request: impl FnOnce(&Client, PutMode, WriteOptions) -> Result<(), Error>,
) -> ExitCode {
    let mode = match mode(context) {
        Ok(mode) => mode,
        Err(code) => return code,
    };
    let options = WriteOptions {
        w,
        timeout: Some(timeout(common)),
        strict: common.strict,
    };
    let result = connect(common).and_then(|client| request(&client, mode, options));
    done(common.output, what, key, result)
}

pub fn status(args: StatusArgs) -> ExitCode {
    let common = &args.common;
    let result = connect(common).and_then(|c| Ok((c.topology()?, c.status_each()?)));
    let (topology, each) = match result {
        Ok(found) => found,
        Err(e) => return fail(common.output, &e),
    };
    // A node that does not answer (paused, dead) is reported as such; the others
    // still say how they see it.
    let mut nodes = Vec::new();
    let mut silent = Vec::new();
    for (node_id, status) in each {
        match status {
            Ok(status) => nodes.push(status),
            Err(e) => silent.push((node_id, e.to_string())),
        }
    }
    match common.output {
        Output::Json => {
            let nodes: Vec<Value> = nodes
                .iter()
                .map(|n| {
                    let address = topology.node(n.node_id);
                    let owned = topology.owners.iter().filter(|&&o| o == n.node_id).count();
                    json!({
                        "node_id": n.node_id,
                        "incarnation": n.incarnation,
                        "native": address.map(|a| a.native.clone()),
                        "resp": address.map(|a| a.resp.clone()),
                        "partitions": owned,
                        "shards": n.shards.iter().map(|s| json!({
                            "shard": s.shard,
                            "port": address.and_then(|a| a.shard_native.get(s.shard as usize).cloned()),
                            "partitions": s.partitions,
                            "keys": s.keys,
                            "disk_bytes": s.disk_bytes,
                            "reads": s.reads,
                            "writes": s.writes,
                            "overloaded": s.overloaded,
                            "commits": s.commits,
                            "corrupt": s.corrupt,
                            "store_failure": s.store_failure,
                            "hints_stored": s.hints_stored,
                            "hints_handed_off": s.hints_handed_off,
                            "hints_refused": s.hints_refused,
                            "hints_expired": s.hints_expired,
                            "partitions_in_sync": s.partitions_in_sync,
                            "keys_pushed": s.keys_pushed,
                            "repairs_received": s.repairs_received,
                            "tombstones": s.tombstones,
                            "index_bytes": s.index_bytes,
                            "tombstones_collected": s.tombstones_collected,
                            "transfer_keys_sent": s.transfer_keys_sent,
                            "transfer_bytes_sent": s.transfer_bytes_sent,
                            "partitions_sent": s.partitions_sent,
                            "partitions_received": s.partitions_received,
                            "partitions_dropped": s.partitions_dropped,
                            "streams": s.streams,
                            "transfer_keys_per_second": s.transfer_keys_per_second,
                        })).collect::<Vec<_>>(),
                        "ring": json!({
                            "epoch": n.ring.epoch,
                            "members": n.ring.members,
                            "change": n.ring.change,
                            "pending": n.ring.pending,
                            "waiting_for": n.ring.waiting_for,
                            "streaming": n.ring.streaming,
                        }),
                        "hints_pending": hints_pending(n).iter().map(|(target, keys, bytes)| json!({
                            "target": target, "keys": keys, "bytes": bytes,
                        })).collect::<Vec<_>>(),
                        "members": n.members.iter().map(|m| json!({
                            "node_id": m.node_id,
                            "down": m.down,
                            "phi": f64::from(m.phi_milli) / 1000.0,
                            "incarnation": m.incarnation,
                            "heartbeat": m.heartbeat,
                            "status": m.status,
                            "ring_epoch": m.ring_epoch,
                            "suspicions": m.suspicions,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let silent: Vec<Value> = silent
                .iter()
                .map(|(node_id, error)| json!({"node_id": node_id, "error": error}))
                .collect();
            print_json(&json!({
                "epoch": topology.epoch,
                "partitions": topology.partitions,
                "nodes": nodes,
                "unanswered": silent,
            }));
        }
        Output::Table => {
            say!(
                "cluster: {} node(s), {} partitions, ring epoch {}",
                nodes.len() + silent.len(),
                topology.partitions,
                topology.epoch
            );
            for n in &nodes {
                let address = topology.node(n.node_id);
                let owned = topology.owners.iter().filter(|&&o| o == n.node_id).count();
                say!(
                    "node {} (incarnation {}) native={} resp={} partitions={}",
                    n.node_id,
                    n.incarnation,
                    address.map_or("?", |a| &a.native),
                    address.map_or("?", |a| &a.resp),
                    owned
                );
                say!(
                    "  {:>5} {:<22} {:>10} {:>10} {:>12} {:>12} {:>12} {:>10} {:>8}",
                    "shard",
                    "port",
                    "partitions",
                    "keys",
                    "disk bytes",
                    "reads",
                    "writes",
                    "overloaded",
                    "corrupt"
                );
                for s in &n.shards {
                    let port = address
                        .and_then(|a| a.shard_native.get(s.shard as usize))
                        .map_or("?", String::as_str);
                    say!(
                        "  {:>5} {:<22} {:>10} {:>10} {:>12} {:>12} {:>12} {:>10} {:>8}",
                        s.shard,
                        port,
                        s.partitions,
                        s.keys,
                        s.disk_bytes,
                        s.reads,
                        s.writes,
                        s.overloaded,
                        s.corrupt
                    );
                    if let Some(failure) = &s.store_failure {
                        say!("        store failed (refusing writes until restart): {failure}");
                    }
                    if s.partitions_in_sync < s.partitions {
                        say!(
                            "        anti-entropy: {} of {} partitions in sync with a peer ({} repairs received)",
                            s.partitions_in_sync,
                            s.partitions,
                            s.repairs_received
                        );
                    }
                }
                say!(
                    "  ring: epoch {}, members {:?}{}",
                    n.ring.epoch,
                    n.ring.members,
                    n.ring
                        .change
                        .as_ref()
                        .map_or(String::new(), |change| format!(
                            "; {change} in progress: {} partition(s) to move, {}",
                            n.ring.pending,
                            if n.ring.streaming {
                                "streaming".to_string()
                            } else {
                                format!("waiting for nodes {:?} to hold it", n.ring.waiting_for)
                            }
                        ))
                );
                let sum =
                    |f: fn(&ringkv_client::ShardStatus) -> u64| n.shards.iter().map(f).sum::<u64>();
                let (keys, bytes) = (
                    sum(|s| s.transfer_keys_sent),
                    sum(|s| s.transfer_bytes_sent),
                );
                if keys > 0
                    || sum(|s| s.partitions_received) > 0
                    || sum(|s| u64::from(s.streams)) > 0
                {
                    say!(
                        "  transfers: {keys} key(s), {bytes} bytes streamed out; partitions sent {}, received {}, dropped {}; {} stream(s) running at {} keys/s",
                        sum(|s| s.partitions_sent),
                        sum(|s| s.partitions_received),
                        sum(|s| s.partitions_dropped),
                        sum(|s| u64::from(s.streams)),
                        sum(|s| s.transfer_keys_per_second)
                    );
                }
                for m in n.members.iter().filter(|m| m.node_id != n.node_id) {
                    say!(
                        "  sees node {}: {} (phi {:.1}, incarnation {}, heartbeat {}, {}, ring epoch {}; suspected {} time(s))",
                        m.node_id,
                        if m.down { "DOWN" } else { "up" },
                        f64::from(m.phi_milli) / 1000.0,
                        m.incarnation,
                        m.heartbeat,
                        m.status,
                        m.ring_epoch,
                        m.suspicions
                    );
                }
                for (target, keys, bytes) in hints_pending(n) {
                    say!(
                        "  holds hints for node {target}: {keys} key(s), {bytes} bytes to hand off"
                    );
                }
                let handed: u64 = n.shards.iter().map(|s| s.hints_handed_off).sum();
                let refused: u64 = n.shards.iter().map(|s| s.hints_refused).sum();
                let expired: u64 = n.shards.iter().map(|s| s.hints_expired).sum();
                if handed + refused + expired > 0 {
                    say!(
                        "  hints since start: {handed} handed off, {refused} refused at the bound, {expired} expired"
                    );
                }
            }
            for (node_id, error) in &silent {
                say!("node {node_id}: did not answer ({error})");
            }
        }
    }
    ExitCode::SUCCESS
}

/// Hints a node holds, per target, summed over its shards: (target, keys, bytes).
fn hints_pending(node: &ringkv_client::NodeStatus) -> Vec<(u32, u64, u64)> {
    let mut by_target: std::collections::BTreeMap<u32, (u64, u64)> = Default::default();
    for hint in node.shards.iter().flat_map(|s| &s.hints) {
        let entry = by_target.entry(hint.target).or_default();
        entry.0 += hint.keys;
        entry.1 += hint.bytes;
    }
    by_target
        .into_iter()
        .map(|(target, (keys, bytes))| (target, keys, bytes))
        .collect()
}

fn connect(common: &Common) -> Result<Client, Error> {
    Client::builder()
        .seeds([common.addr.clone()])
        .connect_timeout(timeout(common))
        .request_timeout(timeout(common))
        .client_name("ringkv cli")
        .connect_blocking()
}

fn timeout(common: &Common) -> Duration {
    Duration::try_from_secs_f64(common.timeout).unwrap_or(Duration::from_secs(5))
}

fn mode(context: Option<&str>) -> Result<PutMode, ExitCode> {
    match context {
        None => Ok(PutMode::Latest),
        Some(hex) => match decode_hex(hex) {
            Some(bytes) => Ok(PutMode::After(Context::from_bytes(bytes))),
            None => {
                eprintln!("ringkv: --context must be the hex string `ringkv get` printed");
                Err(ExitCode::from(exit::REFUSED))
            }
        },
    }
}

fn done(output: Output, what: &str, key: &str, result: Result<(), Error>) -> ExitCode {
    match result {
        Ok(()) => {
            match output {
                Output::Json => print_json(&json!({"ok": true, "op": what, "key": key})),
                Output::Table => say!("OK"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(output, &e),
    }
}

fn fail(output: Output, error: &Error) -> ExitCode {
    let code = match error {
        Error::Connect { .. }
        | Error::Unavailable { .. }
        | Error::ShuttingDown
        | Error::RingChanging { .. } => exit::UNREACHABLE,
        Error::Timeout { .. } | Error::ConnectionLost => exit::TIMEOUT,
        Error::InvalidArgument(_) | Error::TooLarge { .. } | Error::TooManySiblings { .. } => {
            exit::REFUSED
        }
        _ => exit::OTHER,
    };
    match output {
        Output::Json => print_json(&json!({
            "ok": false,
            "error": error.to_string(),
            "outcome_unknown": error.outcome_unknown(),
            "retry_safe": error.retry_safe(),
        })),
        Output::Table => eprintln!("ringkv: {error}"),
    }
    ExitCode::from(code)
}

fn print_found(key: &str, found: &Versions) {
    if found.stand_ins > 0 {
        eprintln!(
            "({} of the answers came from stand-ins for down replicas: writes those replicas hold may be missing)",
            found.stand_ins
        );
    }
    match found.siblings.as_slice() {
        [] => eprintln!("(not found: {key})"),
        [one] => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(one);
            if !one.ends_with(b"\n") {
                let _ = out.write_all(b"\n");
            }
            // The context goes to stderr so that stdout is the value alone.
            eprintln!("context: {}", encode_hex(found.context.as_bytes()));
        }
        many => {
            say!("{} siblings (concurrent writes) for {key}:", many.len());
            for (i, value) in many.iter().enumerate() {
                say!("  [{}] {}", i + 1, value.escape_ascii());
            }
            let context = encode_hex(found.context.as_bytes());
            say!("context: {context}");
            say!("resolve with: ringkv put {key} <merged value> --context {context}");
        }
    }
}

fn found_json(key: &str, found: &Versions) -> Value {
    let siblings: Vec<Value> = found
        .siblings
        .iter()
        .map(|v| match std::str::from_utf8(v) {
            Ok(text) => Value::String(text.to_owned()),
            Err(_) => json!({ "hex": encode_hex(v) }),
        })
        .collect();
    json!({
        "key": key,
        "found": !found.is_empty(),
        "siblings": siblings,
        "context": encode_hex(found.context.as_bytes()),
        "stand_ins": found.stand_ins,
    })
}

fn print_json(value: &Value) {
    say!("{value}");
}

fn encode_hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    hex::decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        let bytes = vec![0, 1, 0xab, 0xff];
        assert_eq!(decode_hex(&encode_hex(&bytes)), Some(bytes));
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex(""), Some(Vec::new()));
    }
}

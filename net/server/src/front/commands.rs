//! Redis commands (and ringkv's KV.* extensions) as cluster requests.
//!
//! Plain `SET` reads the key's context first and writes with it, so it replaces what it
//! saw as a Redis user expects; two `SET`s racing from different clients can still leave
//! siblings, which `KV.GET` shows. Plain `GET` on a key with siblings returns one value
//! by a fixed rule: the sibling with the greatest dot (node, incarnation, counter), i.e.
//! the last in the version set's dot order. docs/protocol.md lists every command.

use ringkv_cluster::GetOutcome;
pub use ringkv_proto::resp::Reply;
use ringkv_proto::{ErrorReply, WriteContext};

use crate::front::ops;
use crate::shard::Shard;

/// Per-connection state that commands read or change.
#[derive(Debug, Clone)]
pub struct Session {
    pub protocol: u8,
    pub name: Option<Vec<u8>>,
    pub id: u64,
    /// Set by QUIT: answer, then close.
    pub closing: bool,
}

impl Session {
    pub fn new(id: u64) -> Session {
        Session {
            protocol: 2,
            name: None,
            id,
            closing: false,
        }
    }
}

/// Renders an error in Redis style: a leading code word, then what happened.
fn error(err: ErrorReply) -> Reply {
    Reply::err(match err {
        ErrorReply::Timeout { acked, required } => format!(
            "TIMEOUT {acked} of {required} replicas answered in time; a write's outcome is unknown (it may still be applied)"
        ),
        ErrorReply::Unavailable {
            required,
            reachable,
        } => format!("UNAVAILABLE {reachable} replicas reachable, {required} required"),
        ErrorReply::Overloaded { inflight } => {
            format!("OVERLOADED {inflight} requests in flight on this shard; retry later")
        }
        ErrorReply::InvalidArgument { message } => format!("ERR {message}"),
        // Redis Cluster's word for "nothing done, the slot is moving: try again".
        ErrorReply::RingChanging { replicas } => format!(
            "TRYAGAIN the ring is changing (this key's replicas are now {replicas:?}); nothing was written"
        ),
        other => format!("ERR {other}"),
    })
}

fn upper(arg: &[u8]) -> String {
    String::from_utf8_lossy(arg).to_ascii_uppercase()
}

fn wrong_args(name: &str) -> Reply {
    Reply::err(format!(
        "ERR wrong number of arguments for '{}' command",
        name.to_ascii_lowercase()
    ))
}

/// Runs one command. `args[0]` is the command name; `args` is never empty.
pub async fn execute(shard: &Shard, session: &mut Session, args: &[Vec<u8>]) -> Reply {
    let name = upper(&args[0]);
    let rest = &args[1..];
    match (name.as_str(), rest.len()) {
        ("PING", 0) => Reply::Simple("PONG".into()),
        ("PING", 1) => Reply::bulk(&rest[0]),
        ("ECHO", 1) => Reply::bulk(&rest[0]),
        ("QUIT", _) => {
            session.closing = true;
            Reply::ok()
        }
        ("HELLO", _) => hello(session, rest),
        ("SELECT", 1) if rest[0] == b"0" => Reply::ok(),
        ("SELECT", 1) => Reply::err("ERR DB index is out of range (ringkv has database 0 only)"),
        ("DBSIZE", 0) => match shard.count_keys().await {
            Ok(n) => Reply::Int(n as i64),
            Err(e) => error(ops::error_reply(e)),
        },
        ("INFO", _) => info(shard),
        ("COMMAND", _) => command_info(rest),
        ("CONFIG", _) => config(rest),
        ("CLIENT", _) => client(session, rest),
        ("GET", 1) => match read(shard, &rest[0], None, false).await {
            Ok(outcome) => outcome
                .values()
                .last()
                .map_or(Reply::Null, |v| Reply::bulk(v)),
            Err(reply) => reply,
        },
        ("SET", 2) => set(shard, &rest[0], &rest[1]).await,
        ("SET", n) if n > 2 => set_option_refused(&upper(&rest[2])),
        ("DEL", n) if n > 0 => {
            let mut deleted = 0;
            for key in rest {
                match ops::delete_existing(shard, key).await {
                    Ok(true) => deleted += 1,
                    Ok(false) => {}
                    Err(e) => return error(e),
                }
            }
            Reply::Int(deleted)
        }
        ("EXISTS", n) if n > 0 => {
            let mut found = 0;
            for key in rest {
                match read(shard, key, None, false).await {
                    Ok(outcome) if !outcome.values().is_empty() => found += 1,
                    Ok(_) => {}
                    Err(reply) => return reply,
                }
            }
            Reply::Int(found)
        }
        ("MGET", n) if n > 0 => {
            let mut values = Vec::with_capacity(n);
            for key in rest {
                values.push(match read(shard, key, None, false).await {
                    Ok(outcome) => outcome
                        .values()
                        .last()
                        .map_or(Reply::Null, |v| Reply::bulk(v)),
                    Err(reply) => return reply,
                });
            }
            Reply::Array(values)
        }
        ("MSET", n) if n > 0 && n % 2 == 0 => {
            for pair in rest.chunks(2) {
                let reply = set(shard, &pair[0], &pair[1]).await;
                if matches!(reply, Reply::Error(_)) {
                    return reply;
                }
            }
            Reply::ok()
        }
        ("KV.GET", _) => kv_get(shard, rest).await,
        ("KV.PUT", _) => kv_put(shard, rest, false).await,
        ("KV.DEL", _) => kv_put(shard, rest, true).await,
        (
            "PING" | "ECHO" | "SELECT" | "DBSIZE" | "GET" | "SET" | "DEL" | "EXISTS" | "MGET"
            | "MSET",
            _,
        ) => wrong_args(&name),
        _ => {
            let shown: Vec<String> = rest
                .iter()
                .take(3)
                .map(|a| format!("'{}'", String::from_utf8_lossy(a)))
                .collect();
            Reply::err(format!(
                "ERR unknown command '{}', with args beginning with: {}",
                String::from_utf8_lossy(&args[0]),
                shown.join(" ")
            ))
        }
    }
}

async fn read(
    shard: &Shard,
    key: &[u8],
    r: Option<usize>,
    strict: bool,
) -> Result<GetOutcome, Reply> {
    ops::get(shard, key, r, strict).await.map_err(error)
}

async fn write(
    shard: &Shard,
    key: &[u8],
    value: Option<&[u8]>,
    context: WriteContext,
    (w, strict): (Option<usize>, bool),
) -> Reply {
    match ops::put(shard, key, value, context, w, strict).await {
        Ok(()) => Reply::ok(),
        Err(e) => error(e),
    }
}

/// SET: write with the context just read, replacing what was there.
async fn set(shard: &Shard, key: &[u8], value: &[u8]) -> Reply {
    write(shard, key, Some(value), WriteContext::Latest, (None, false)).await
}

/// Parses `[NAME value]` pairs and the `STRICT` flag after the fixed arguments;
/// refuses anything else.
fn options<'a>(args: &'a [Vec<u8>], allowed: &[&str]) -> Result<Options<'a>, Reply> {
    let mut found = Options::default();
    let mut rest = args;
    while let Some(first) = rest.first() {
        let name = upper(first);
        if name == "STRICT" {
            found.strict = true;
            rest = &rest[1..];
            continue;
        }
        if !allowed.contains(&name.as_str()) {
            return Err(Reply::err(format!(
                "ERR syntax error: unknown option {name}"
            )));
        }
        let Some(value) = rest.get(1) else {
            return Err(Reply::err(format!(
                "ERR syntax error: option {name} needs a value"
            )));
        };
        found.pairs.push((name, value.as_slice()));
        rest = &rest[2..];
    }
    Ok(found)
}

/// A command's options: `NAME value` pairs in order, and whether `STRICT` was given
/// (sloppy quorum off: only the key's own replicas count).
#[derive(Default)]
struct Options<'a> {
    pairs: Vec<(String, &'a [u8])>,
    strict: bool,
}

fn count(name: &str, value: &[u8]) -> Result<usize, Reply> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Reply::err(format!("ERR {name} must be a positive integer")))
}

/// KV.GET key [R n] [STRICT] -> [context, [sibling values...]]
async fn kv_get(shard: &Shard, args: &[Vec<u8>]) -> Reply {
    let Some((key, rest)) = args.split_first() else {
        return wrong_args("KV.GET");
    };
    let parsed = options(rest, &["R"]).and_then(|opts| {
        let r = opts
            .pairs
            .iter()
            .map(|(n, v)| count(n, v))
            .next_back()
            .transpose()?;
        Ok((r, opts.strict))
    });
    let (r, strict) = match parsed {
        Ok(parsed) => parsed,
        Err(reply) => return reply,
    };
    match read(shard, key, r, strict).await {
        Ok(outcome) => Reply::Array(vec![
            Reply::Bulk(outcome.context.encode()),
            Reply::Array(outcome.values().into_iter().map(Reply::bulk).collect()),
        ]),
        Err(reply) => reply,
    }
}

/// KV.PUT key value [CONTEXT ctx] [W n] [STRICT] / KV.DEL key [CONTEXT ctx] [W n] [STRICT]
async fn kv_put(shard: &Shard, args: &[Vec<u8>], delete: bool) -> Reply {
    let fixed = if delete { 1 } else { 2 };
    if args.len() < fixed {
        return wrong_args(if delete { "KV.DEL" } else { "KV.PUT" });
    }
    let (key, value) = (
        &args[0],
        if delete {
            None
        } else {
            Some(args[1].as_slice())
        },
    );
    let opts = match options(&args[fixed..], &["CONTEXT", "W"]) {
        Ok(o) => o,
        Err(reply) => return reply,
    };
    // Without a CONTEXT a put is a sibling of what is stored (the Dynamo way; plain
    // SET is the command that replaces), while a delete removes what it finds: a
    // tombstone beside live siblings would delete nothing a reader could see.
    let mut context = if delete {
        WriteContext::Latest
    } else {
        WriteContext::Blind
    };
    let mut w = None;
    for (name, v) in opts.pairs {
        if name == "CONTEXT" {
            context = WriteContext::Given(v.to_vec());
        } else {
            match count("W", v) {
                Ok(n) => w = Some(n),
                Err(reply) => return reply,
            }
        }
    }
    write(shard, key, value, context, (w, opts.strict)).await
}

/// SET options are refused rather than ignored: each would promise what ringkv does
/// not do.
fn set_option_refused(option: &str) -> Reply {
    let why = match option {
        "EX" | "PX" | "EXAT" | "PXAT" | "KEEPTTL" => "ringkv has no expiry (TTL)",
        "NX" | "XX" | "GET" => "a replicated write cannot check and set atomically",
        _ => "it is not a SET option ringkv knows",
    };
    Reply::err(format!(
        "ERR SET option {option} is not supported: {why}; use plain SET, or KV.PUT with a context"
    ))
}

/// HELLO [protover [AUTH user pass] [SETNAME name]]: nothing changes unless all of it
/// is valid. AUTH is accepted and ignored (ringkv has no users yet).
fn hello(session: &mut Session, args: &[Vec<u8>]) -> Reply {
    if let Some(version) = args.first() {
        let protocol = match version.as_slice() {
            b"2" => 2,
            b"3" => 3,
            _ => return Reply::err("NOPROTO unsupported protocol version"),
        };
        let mut name = None;
        let mut rest = &args[1..];
        while let Some(option) = rest.first() {
            match (upper(option).as_str(), rest.len()) {
                ("AUTH", n) if n >= 3 => rest = &rest[3..],
                ("SETNAME", n) if n >= 2 => {
                    name = Some(rest[1].clone());
                    rest = &rest[2..];
                }
                _ => return Reply::err("ERR syntax error in HELLO"),
            }
        }
        session.protocol = protocol;
        if name.is_some() {
            session.name = name;
        }
    }
    let text = |s: &str| Reply::Bulk(s.as_bytes().to_vec());
    Reply::Map(vec![
        (text("server"), text("ringkv")),
        (text("version"), text(env!("CARGO_PKG_VERSION"))),
        (text("proto"), Reply::Int(session.protocol as i64)),
        (text("id"), Reply::Int(session.id as i64)),
        (text("mode"), text("standalone")),
        (text("role"), text("master")),
        (text("modules"), Reply::Array(Vec::new())),
    ])
}

fn info(shard: &Shard) -> Reply {
    let store = shard.driver().store();
    let (stats, usage) = (store.stats(), store.usage());
    let text = format!(
        "# Server\r\nredis_version:7.0.0\r\nringkv_version:{}\r\nshard:{}\r\nshards:{}\r\n\
         # Keyspace\r\ndb0:keys={},expires=0\r\n\
         # Ringkv shard\r\nputs:{}\r\ngets:{}\r\ncache_hits:{}\r\ncommits:{}\r\nsegments:{}\r\n\
         corrupt:{}\r\nstore_failed:{}\r\n",
        env!("CARGO_PKG_VERSION"),
        shard.id,
        shard.map().shards(),
        usage.keys,
        stats.puts,
        stats.gets,
        stats.cache_hits,
        stats.commits,
        usage.segments,
        stats.corruption(),
        u8::from(store.failure().is_some()),
    );
    Reply::Bulk(text.into_bytes())
}

fn command_info(args: &[Vec<u8>]) -> Reply {
    match args.first().map(|a| upper(a)).as_deref() {
        None => Reply::Array(Vec::new()),
        Some("COUNT") => Reply::Int(COMMANDS.len() as i64),
        Some("DOCS") => Reply::Map(Vec::new()),
        Some(other) => Reply::err(format!("ERR COMMAND {other} is not supported")),
    }
}

const COMMANDS: &[&str] = &[
    "PING", "ECHO", "QUIT", "HELLO", "SELECT", "DBSIZE", "INFO", "COMMAND", "CONFIG", "CLIENT",
    "GET", "SET", "DEL", "EXISTS", "MGET", "MSET", "KV.GET", "KV.PUT", "KV.DEL",
];

/// CONFIG GET answers what redis-benchmark and memtier ask about persistence.
fn config(args: &[Vec<u8>]) -> Reply {
    match (args.first().map(|a| upper(a)).as_deref(), args.len()) {
        (Some("GET"), 2) => {
            let wanted = String::from_utf8_lossy(&args[1]).to_ascii_lowercase();
            let known = [
                ("save", ""),
                ("appendonly", "no"),
                ("databases", "1"),
                ("maxmemory", "0"),
            ];
            let mut reply = Vec::new();
            for (name, value) in known {
                if wanted == "*" || wanted == name {
                    reply.push(Reply::bulk(name.as_bytes()));
                    reply.push(Reply::bulk(value.as_bytes()));
                }
            }
            Reply::Array(reply)
        }
        _ => Reply::err("ERR ringkv supports CONFIG GET <parameter> only"),
    }
}

fn client(session: &mut Session, args: &[Vec<u8>]) -> Reply {
    match (args.first().map(|a| upper(a)).as_deref(), args.len()) {
        (Some("SETNAME"), 2) => {
            session.name = Some(args[1].clone());
            Reply::ok()
        }
        (Some("GETNAME"), 1) => session.name.as_deref().map_or(Reply::Null, Reply::bulk),
        (Some("SETINFO"), 3) => Reply::ok(),
        (Some("ID"), 1) => Reply::Int(session.id as i64),
        _ => Reply::err("ERR ringkv supports CLIENT SETNAME, GETNAME, SETINFO and ID"),
    }
}

//! Redis-protocol connections: accept, read pipelined commands, execute them, answer in
//! order.
//!
//! A connection reads what has arrived, parses every complete command in it (up to
//! `max_pipeline`), starts them all at once and writes the replies in order. Starting
//! them in order keeps per-key order: the node queues work per key in arrival order, so
//! `SET k 1` then `GET k` in one pipeline reads 1. Malformed input gets an error reply
//! and closes that connection only.

use std::cell::Cell;
use std::rc::Rc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use crate::commands::{self, Reply, Session};
use crate::shard::Shard;

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 64 << 10;

/// The connections of one shard: how many are open, and whether new ones are welcome.
pub struct Connections {
    open: Cell<usize>,
    max: usize,
    max_pipeline: usize,
    closing: Cell<bool>,
    next_id: Cell<u64>,
}

impl Connections {
    pub fn new(max: usize, max_pipeline: usize) -> Connections {
        Connections {
            open: Cell::new(0),
            max,
            max_pipeline,
            closing: Cell::new(false),
            next_id: Cell::new(1),
        }
    }

    pub fn open(&self) -> usize {
        self.open.get()
    }

    /// Stops accepting work: open connections finish the commands they have read.
    pub fn close(&self) {
        self.closing.set(true);
    }
}

pub async fn accept(listener: TcpListener, shard: Rc<Shard>, connections: Rc<Connections>) {
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(%err, "accept failed");
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        if connections.closing.get() {
            break;
        }
        let (shard, connections) = (shard.clone(), connections.clone());
        glommio::spawn_local(async move {
            if connections.open.get() >= connections.max {
                let mut stream = stream;
                let _ = stream
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
                return;
            }
            connections.open.set(connections.open.get() + 1);
            let id = connections.next_id.get();
            connections.next_id.set(id + 1);
            if let Err(reason) = serve(stream, &shard, &connections, id).await {
                tracing::debug!(%reason, id, "connection closed");
            }
            connections.open.set(connections.open.get() - 1);
        })
        .detach();
    }
}

async fn serve(
    mut stream: TcpStream,
    shard: &Shard,
    connections: &Connections,
    id: u64,
) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut session = Session::new(id);
    let mut input: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut output: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        let mut consumed = 0;
        let mut batch = Vec::new();
        let mut malformed = None;
        while batch.len() < connections.max_pipeline {
            match crate::wire::next_command(&input[consumed..]) {
                Ok(Some((args, used))) => {
                    consumed += used;
                    if !args.is_empty() {
                        batch.push(args);
                    }
                }
                Ok(None) => break,
                Err(reason) => {
                    malformed = Some(reason);
                    break;
                }
            }
        }
        input.drain(..consumed);
        // Read only when nothing complete is buffered: a client waiting for the replies
        // to a long pipeline sends nothing more.
        if batch.is_empty() && malformed.is_none() && consumed == 0 {
            if connections.closing.get() {
                return Ok(());
            }
            let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(());
            }
            input.extend_from_slice(&chunk[..n]);
            continue;
        }
        let replies = run_batch(shard, &mut session, &batch).await;
        for reply in &replies {
            crate::wire::encode(reply, session.protocol, &mut output);
        }
        if let Some(reason) = &malformed {
            let reply = Reply::Error(format!("ERR Protocol error: {reason}"));
            crate::wire::encode(&reply, session.protocol, &mut output);
        }
        stream.write_all(&output).await.map_err(|e| e.to_string())?;
        output.clear();
        if let Some(reason) = malformed {
            return Err(format!("malformed input: {reason}"));
        }
        if session.closing {
            return Ok(());
        }
    }
}

/// Runs a batch, answering in order. Commands run concurrently in segments where no
/// two touch the same key (SET is a read then a write, so a GET of the same key behind
/// it must wait for it); commands that change the session or touch several keys run
/// alone, so later commands see their effect.
async fn run_batch(shard: &Shard, session: &mut Session, batch: &[Vec<Vec<u8>>]) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(batch.len());
    let mut start = 0;
    while start < batch.len() && !session.closing {
        let end = segment_end(batch, start);
        if end == start + 1 {
            replies.push(commands::execute(shard, session, &batch[start]).await);
        } else {
            let snapshot = session.clone();
            let running = batch[start..end].iter().map(|args| {
                let mut session = snapshot.clone();
                async move { commands::execute(shard, &mut session, args).await }
            });
            replies.extend(futures_util::future::join_all(running).await);
        }
        start = end;
    }
    replies
}

/// The end of the concurrent segment that starts at `start` (at least one command).
fn segment_end(batch: &[Vec<Vec<u8>>], start: usize) -> usize {
    let mut keys: Vec<&[u8]> = Vec::new();
    for (i, args) in batch.iter().enumerate().skip(start) {
        let Some(key) = single_key(args) else {
            return if i == start { i + 1 } else { i };
        };
        if keys.contains(&key) {
            return i;
        }
        keys.push(key);
    }
    batch.len()
}

/// The one key a command reads or writes, if it is a single-key data command.
fn single_key(args: &[Vec<u8>]) -> Option<&[u8]> {
    let name = args.first()?.to_ascii_uppercase();
    match name.as_slice() {
        b"GET" | b"SET" | b"KV.GET" | b"KV.PUT" | b"KV.DEL" | b"PING" | b"ECHO" => {
            // PING and ECHO touch no key; an empty key never collides with a real one
            // often enough to matter, and colliding only costs concurrency.
            Some(args.get(1).map_or(&[][..], Vec::as_slice))
        }
        b"DEL" | b"EXISTS" if args.len() == 2 => Some(&args[1]),
        _ => None,
    }
}

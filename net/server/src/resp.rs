//! Redis-protocol connections: accept, read pipelined commands, execute them, answer in
//! order.
//!
//! A connection reads what has arrived, parses every complete command in it (up to
//! `max_pipeline`), starts them all at once and writes the replies in order. Starting
//! them in order keeps per-key order: the node queues work per key in arrival order, so
//! `SET k 1` then `GET k` in one pipeline reads 1. Malformed input gets an error reply
//! and closes that connection only.

use std::rc::Rc;

use futures_lite::AsyncWriteExt;
use glommio::net::{TcpListener, TcpStream};

use crate::commands::{self, Reply, Session};
use crate::connections::{Connections, READ_CHUNK, read_more};
use crate::pipeline::{Touch, segment_end};
use crate::shard::Shard;

/// Accepts Redis-protocol connections until the node stops.
pub async fn accept(listener: TcpListener, shard: Rc<Shard>, connections: Rc<Connections>) {
    let refusal = b"-ERR max number of clients reached\r\n";
    crate::connections::accept(listener, connections.clone(), refusal, move |stream, id| {
        let (shard, connections) = (shard.clone(), connections.clone());
        async move { serve(stream, &shard, &connections, id).await }
    })
    .await
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
        while batch.len() < connections.max_pipeline() {
            match ringkv_proto::resp::next_command(&input[consumed..]) {
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
            if connections.is_closing() {
                return Ok(());
            }
            if !read_more(&mut stream, &mut chunk, &mut input).await? {
                return Ok(());
            }
            continue;
        }
        let replies = run_batch(shard, &mut session, &batch).await;
        for reply in &replies {
            ringkv_proto::resp::encode(reply, session.protocol, &mut output);
        }
        if let Some(reason) = &malformed {
            let reply = Reply::Error(format!("ERR Protocol error: {reason}"));
            ringkv_proto::resp::encode(&reply, session.protocol, &mut output);
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

/// Runs a batch, answering in order (see [`crate::pipeline`]). Commands that run alone
/// use the connection's session; concurrent ones get a copy, as they cannot change it.
async fn run_batch(shard: &Shard, session: &mut Session, batch: &[Vec<Vec<u8>>]) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(batch.len());
    let mut start = 0;
    while start < batch.len() && !session.closing {
        let end = segment_end(batch, start, &touch);
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

/// What a command touches: single-key data commands run beside each other.
#[allow(clippy::ptr_arg)] // The pipeline hands each request over as `&T`, T a Vec.
fn touch(args: &Vec<Vec<u8>>) -> Touch<'_> {
    let Some(name) = args.first() else {
        return Touch::Alone;
    };
    match name.to_ascii_uppercase().as_slice() {
        b"PING" | b"ECHO" => Touch::Nothing,
        b"GET" | b"SET" | b"KV.GET" | b"KV.PUT" | b"KV.DEL" if args.len() > 1 => {
            Touch::Key(&args[1])
        }
        b"DEL" | b"EXISTS" if args.len() == 2 => Touch::Key(&args[1]),
        _ => Touch::Alone,
    }
}

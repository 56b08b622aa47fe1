//! Redis-protocol connections, on the shared pipelined loop (`crate::front::pipelined`):
//! commands are cut from the input with ringkv-proto's RESP parser, run (side by side
//! where they touch different keys, in order otherwise: `SET k 1` then `GET k` in one
//! pipeline reads 1) and answered in order. Malformed input gets `ERR Protocol error`
//! and closes that connection only.

use std::rc::Rc;

use glommio::net::{TcpListener, TcpStream};

use crate::front::commands::{self, Reply, Session};
use crate::front::connections::{ConnectionError, Connections};
use crate::front::pipeline::{Touch, segment_end};
use crate::front::pipelined::{self, FrontEnd, Parsed};
use crate::shard::Shard;

/// Accepts Redis-protocol connections until the node stops.
pub async fn accept(listener: TcpListener, shard: Rc<Shard>, connections: Rc<Connections>) {
    let refusal = b"-ERR max number of clients reached\r\n";
    crate::front::connections::accept(listener, connections.clone(), refusal, move |stream, id| {
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
) -> Result<(), ConnectionError> {
    stream.set_nodelay(true)?;
    let mut front = Resp {
        shard,
        session: Session::new(id),
    };
    pipelined::serve(&mut stream, connections, &mut front, Vec::new()).await
}

/// One Redis-protocol connection: the shard it is served by and its session (the
/// protocol version, the client's name, whether it asked to close).
struct Resp<'a> {
    shard: &'a Shard,
    session: Session,
}

impl FrontEnd for Resp<'_> {
    type Request = Vec<Vec<u8>>;

    fn parse(&mut self, input: &[u8]) -> Parsed<Self::Request> {
        match ringkv_proto::resp::next_command(input) {
            Ok(Some((args, used))) if args.is_empty() => Parsed::Skip(used),
            Ok(Some((args, used))) => Parsed::Request(args, used),
            Ok(None) => Parsed::Incomplete,
            Err(reason) => Parsed::Malformed(reason.to_string()),
        }
    }

    async fn run(&mut self, batch: Vec<Self::Request>, output: &mut Vec<u8>) {
        let replies = run_batch(self.shard, &mut self.session, &batch).await;
        for reply in &replies {
            ringkv_proto::resp::encode(reply, self.session.protocol, output);
        }
    }

    fn malformed(&mut self, reason: &str, output: &mut Vec<u8>) {
        let reply = Reply::Error(format!("ERR Protocol error: {reason}"));
        ringkv_proto::resp::encode(&reply, self.session.protocol, output);
    }

    fn closing(&self) -> bool {
        self.session.closing
    }
}

/// Runs a batch, answering in order (see [`crate::front::pipeline`]). Commands that run alone
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

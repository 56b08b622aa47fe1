//! The native protocol's connection loop after the handshake: every request is answered
//! as soon as it is done, and the connection keeps reading while requests run.
//!
//! Why not the RESP loop (`crate::front::pipelined`), which answers a batch once all of
//! it is done and reads nothing meanwhile: the client pipelines every request for a
//! shard over a few connections, so one request that waits out a request timeout (a
//! quorum during a membership change, a replica that just died) held every request
//! queued behind it on that connection. Measured during a join with 20 connections:
//! p99 0.7 s against 25 ms with 200 (docs/benchmarks.md). Native clients match answers
//! by id, so order is free; RESP clients need answers in order and keep the old loop.
//!
//! What stays ordered: requests on one key start in arrival order, each once the one
//! before it on that key is done (a put then a get of the key reads the put); a request
//! that touches several keys or the connection itself (multi-get, multi-put, a late
//! Hello) starts once everything before it is done, and nothing starts beside it.
//! Keys are tracked by a 64-bit hash: two keys that collide only wait for each other.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncWrite, AsyncWriteExt};
use futures_util::future::{Either, select};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use glommio::net::TcpStream;
use xxhash_rust::xxh3::xxh3_64;

use crate::front::connections::{ConnectionError, Connections, READ_CHUNK, read_more};
use crate::front::pipeline::Touch;

/// What a request waits for before it may start.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Nothing (a ping, a topology request): starts at once (unless a lone request
    /// runs).
    Free,
    /// The requests before it on this key (its hash).
    Key(u64),
    /// Everything before it; nothing starts beside it.
    Alone,
}

impl Gate {
    pub fn of(touch: Touch<'_>) -> Gate {
        match touch {
            Touch::Nothing => Gate::Free,
            Touch::Key(key) => Gate::Key(xxh3_64(key)),
            Touch::Alone => Gate::Alone,
        }
    }
}

/// Which requests may start: the keys running, whether a lone request runs.
#[derive(Default)]
struct Gates {
    running_keys: HashMap<u64, u32>,
    running: usize,
    alone: bool,
}

impl Gates {
    /// Starts, in arrival order, every waiting request that may start now.
    fn start_ready<R>(&mut self, waiting: &mut VecDeque<(Gate, R)>) -> Vec<(Gate, R)> {
        let mut started = Vec::new();
        let mut blocked: Vec<u64> = Vec::new();
        let mut i = 0;
        while i < waiting.len() && !self.alone {
            let gate = waiting[i].0;
            let ready = match gate {
                Gate::Free => true,
                Gate::Key(key) => !self.running_keys.contains_key(&key) && !blocked.contains(&key),
                // Only first in line, and with nothing running.
                Gate::Alone => i == 0 && self.running == 0,
            };
            if !ready {
                match gate {
                    Gate::Key(key) => blocked.push(key),
                    // Nothing after a lone request may pass it.
                    Gate::Alone => break,
                    Gate::Free => {}
                }
                i += 1;
                continue;
            }
            let request = waiting.remove(i).expect("in range");
            self.running += 1;
            match gate {
                Gate::Key(key) => *self.running_keys.entry(key).or_default() += 1,
                Gate::Alone => self.alone = true,
                Gate::Free => {}
            }
            started.push(request);
        }
        started
    }

    fn finished(&mut self, gate: Gate) {
        self.running -= 1;
        match gate {
            Gate::Key(key) => {
                if let Some(count) = self.running_keys.get_mut(&key) {
                    *count -= 1;
                    if *count == 0 {
                        self.running_keys.remove(&key);
                    }
                }
            }
            Gate::Alone => self.alone = false,
            Gate::Free => {}
        }
    }
}

/// One request cut from the input.
pub enum Cut<R> {
    Request(R, Gate, usize),
    Incomplete,
    Malformed(String),
}

/// A protocol served out of order: how to cut a request from the input, run one, and
/// say the input was malformed.
pub trait Unordered {
    type Request;
    /// Boxed, as a rule: one allocation per request.
    type Run: Future<Output = Vec<u8>> + Unpin;

    fn cut(&mut self, input: &[u8]) -> Cut<Self::Request>;
    /// Runs one request; its future yields the encoded answer.
    fn run(&self, request: Self::Request) -> Self::Run;
    fn malformed(&self, reason: &str, output: &mut Vec<u8>);
}

/// Serves `front` on `stream` until the client leaves, the node stops, or the input is
/// malformed (an error naming why; the answers to the requests before the bad frame
/// are written first). `input` holds bytes already read. At most `max_pipeline`
/// requests are read ahead of their answers.
pub async fn serve<F: Unordered>(
    stream: &mut TcpStream,
    connections: &Connections,
    front: &mut F,
    input: Vec<u8>,
) -> Result<(), ConnectionError> {
    let mut running: FuturesUnordered<Gated<F::Run>> = FuturesUnordered::new();
    let served = serve_with(stream, connections, front, input, &mut running).await;
    // On a broken connection the requests it started still finish (their answers go
    // nowhere): a request is never abandoned halfway through by its connection.
    while running.next().await.is_some() {}
    served
}

async fn serve_with<F: Unordered>(
    stream: &mut TcpStream,
    connections: &Connections,
    front: &mut F,
    mut input: Vec<u8>,
    running: &mut FuturesUnordered<Gated<F::Run>>,
) -> Result<(), ConnectionError> {
    let mut output: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut waiting: VecDeque<(Gate, F::Request)> = VecDeque::new();
    let mut gates = Gates::default();
    let mut malformed: Option<String> = None;
    let mut ended = false;
    let max = connections.max_pipeline().max(1);
    loop {
        // Cut what has arrived, up to the read-ahead bound.
        let mut consumed = 0;
        while malformed.is_none() && waiting.len() + gates.running < max {
            match front.cut(&input[consumed..]) {
                Cut::Request(request, gate, used) => {
                    consumed += used;
                    waiting.push_back((gate, request));
                }
                Cut::Incomplete => break,
                Cut::Malformed(reason) => malformed = Some(reason),
            }
        }
        input.drain(..consumed);
        // (With nothing running, the first in line always starts.)
        for (gate, request) in gates.start_ready(&mut waiting) {
            running.push(Gated {
                gate,
                run: front.run(request),
            });
        }
        // Until nothing is left: answers collected during a write go out next (or the
        // last one could sit here while the loop waits for input).
        while !output.is_empty() {
            write_collecting(stream, &mut output, running, &mut gates).await?;
        }
        let done = ended || malformed.is_some() || connections.is_closing();
        if running.is_empty() {
            if let Some(reason) = malformed {
                front.malformed(&reason, &mut output);
                stream.write_all(&output).await?;
                return Err(ConnectionError::Malformed(reason));
            }
            if done {
                return Ok(());
            }
            ended = !read_more(stream, &mut chunk, &mut input).await?;
            continue;
        }
        // Wait for an answer, and with room to read ahead, for more input too.
        let finished = if !done && waiting.len() + gates.running < max {
            // Answers first: a client that keeps sending must not starve them.
            let reading = std::pin::pin!(read_more(stream, &mut chunk, &mut input));
            match select(running.next(), reading).await {
                Either::Left((finished, _)) => finished,
                Either::Right((more, _)) => {
                    ended = !more?;
                    None
                }
            }
        } else {
            running.next().await
        };
        let mut finished = finished;
        while let Some((gate, answer)) = finished {
            gates.finished(gate);
            output.extend_from_slice(&answer);
            // Whatever else is done already goes out in the same write.
            finished = running.next().now_or_never().flatten();
        }
    }
}

/// Writes all of `output`, collecting meanwhile the answers of requests that finish:
/// a client slow to read must not leave them unpolled (each holds a slot of the
/// shard's in-flight bound until its future ends). What they answered is left in
/// `output`, for the next write.
async fn write_collecting<R: Future<Output = Vec<u8>> + Unpin>(
    stream: &mut TcpStream,
    output: &mut Vec<u8>,
    running: &mut FuturesUnordered<Gated<R>>,
    gates: &mut Gates,
) -> Result<(), ConnectionError> {
    let mut later = Vec::new();
    let mut written = 0;
    std::future::poll_fn(|cx| {
        while let Poll::Ready(Some((gate, answer))) = running.poll_next_unpin(cx) {
            gates.finished(gate);
            later.extend_from_slice(&answer);
        }
        while written < output.len() {
            match Pin::new(&mut *stream).poll_write(cx, &output[written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::Error::from(std::io::ErrorKind::WriteZero)));
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    })
    .await?;
    *output = later;
    Ok(())
}

/// A running request and the gate it holds until it is done.
struct Gated<R> {
    gate: Gate,
    run: R,
}

impl<R: Future<Output = Vec<u8>> + Unpin> Future for Gated<R> {
    type Output = (Gate, Vec<u8>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let gate = self.gate;
        self.run.poll_unpin(cx).map(|answer| (gate, answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(started: &[(Gate, &'static str)]) -> Vec<&'static str> {
        started.iter().map(|(_, n)| *n).collect()
    }

    #[test]
    fn requests_on_one_key_start_in_order_and_lone_ones_alone() {
        let (a, b) = (Gate::Key(1), Gate::Key(2));
        let mut waiting: VecDeque<(Gate, &'static str)> = [
            (a, "put a"),
            (b, "get b"),
            (a, "get a"),
            (Gate::Free, "ping"),
            (Gate::Alone, "multi"),
            (b, "put b"),
        ]
        .into();
        let mut gates = Gates::default();
        assert_eq!(
            names(&gates.start_ready(&mut waiting)),
            ["put a", "get b", "ping"]
        );
        // "get a" waits for "put a"; the lone request waits for everything before it.
        assert!(gates.start_ready(&mut waiting).is_empty());
        gates.finished(a);
        assert_eq!(names(&gates.start_ready(&mut waiting)), ["get a"]);
        gates.finished(b);
        gates.finished(Gate::Free);
        assert!(
            gates.start_ready(&mut waiting).is_empty(),
            "get a still runs"
        );
        gates.finished(a);
        assert_eq!(names(&gates.start_ready(&mut waiting)), ["multi"]);
        assert!(
            gates.start_ready(&mut waiting).is_empty(),
            "nothing beside it"
        );
        gates.finished(Gate::Alone);
        assert_eq!(names(&gates.start_ready(&mut waiting)), ["put b"]);
        assert!(waiting.is_empty());
    }
}

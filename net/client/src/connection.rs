//! One native-protocol connection, shared by any number of concurrent requests.
//!
//! A writer task takes requests from a bounded queue and writes every one that is
//! waiting in one go (pipelining); a reader task matches each response to its waiting
//! request by id. When either side fails, every waiting request learns that the
//! connection was lost, and the connection is marked dead for the pool to replace.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringkv_proto::frame::next_frame;
use ringkv_proto::native::{decode_response, encode_request, hello};
use ringkv_proto::{Body, ErrorReply, Op, Request, Response};
use rkyv::util::AlignedVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::Error;

/// Requests queued for the writer beyond which callers wait their turn.
const QUEUE: usize = 4096;
/// Bytes gathered before a write even if more requests are queued.
const WRITE_BATCH: usize = 256 << 10;

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Body>>>>;

pub(crate) struct Connection {
    pub addr: String,
    queue: mpsc::Sender<Request>,
    waiting: Waiting,
    next_id: AtomicU64,
    alive: Arc<AtomicBool>,
}

impl Connection {
    /// Connects, does the handshake, and starts the reader and writer tasks. Every
    /// reply's ring epoch is folded into `newest_epoch` (the highest map epoch seen).
    pub async fn open(
        addr: &str,
        timeout: Duration,
        client: &str,
        newest_epoch: Arc<AtomicU64>,
    ) -> Result<Connection, Error> {
        let connect_error = |reason: String| Error::Connect {
            addr: addr.to_owned(),
            reason,
        };
        let mut stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_error(format!("no connection within {timeout:?}")))?
            .map_err(|e| connect_error(e.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| connect_error(e.to_string()))?;
        let mut out = Vec::new();
        // Id 0 is reserved for the node's connection-level errors.
        encode_request(&hello(1, client), &mut out).expect("a small frame");
        let handshake = async {
            stream.write_all(&out).await?;
            read_response(&mut stream, &mut Input::default()).await
        };
        match tokio::time::timeout(timeout, handshake).await {
            Err(_) => return Err(connect_error(format!("no handshake within {timeout:?}"))),
            Ok(Err(e)) => return Err(connect_error(format!("handshake failed: {e}"))),
            Ok(Ok(Response {
                body: Body::Welcome(_),
                ring_epoch,
                ..
            })) => {
                newest_epoch.fetch_max(ring_epoch, Ordering::Relaxed);
            }
            // A node at its connection limit did nothing: safe to try again later.
            Ok(Ok(Response {
                body: Body::Error(ErrorReply::Overloaded { .. }),
                ..
            })) => return Err(Error::Overloaded),
            Ok(Ok(Response {
                body: Body::Error(e),
                ..
            })) => return Err(Error::Protocol(format!("handshake refused: {e}"))),
            Ok(Ok(other)) => {
                return Err(Error::Protocol(format!(
                    "handshake answered with {other:?}"
                )));
            }
        };
        let (reader, writer) = stream.into_split();
        let (queue, requests) = mpsc::channel(QUEUE);
        let waiting: Waiting = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        tokio::spawn(write_requests(
            writer,
            requests,
            alive.clone(),
            waiting.clone(),
        ));
        tokio::spawn(read_responses(
            reader,
            waiting.clone(),
            alive.clone(),
            newest_epoch,
        ));
        Ok(Connection {
            addr: addr.to_owned(),
            queue,
            waiting,
            next_id: AtomicU64::new(2),
            alive,
        })
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// Sends `op` and waits for its answer (the caller bounds the wait).
    pub async fn call(&self, op: Op) -> Result<Body, Error> {
        if !self.is_alive() {
            // Known dead before anything was sent: safe to send elsewhere.
            return Err(Error::Connect {
                addr: self.addr.clone(),
                reason: "connection closed".into(),
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        self.waiting
            .lock()
            .expect("no panics while locked")
            .insert(id, answer);
        // If the caller gives up (a timeout drops this future), forget the request.
        let _forget = Forget {
            id,
            waiting: &self.waiting,
        };
        if self.queue.send(Request { id, op }).await.is_err() {
            // The writer is gone: nothing of this request was sent.
            return Err(Error::Connect {
                addr: self.addr.clone(),
                reason: "connection closed".into(),
            });
        }
        answered.await.map_err(|_| Error::ConnectionLost)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Closing the queue stops the writer, which shuts the socket and so the reader.
        self.alive.store(false, Ordering::Relaxed);
    }
}

struct Forget<'a> {
    id: u64,
    waiting: &'a Waiting,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.remove(&self.id);
        }
    }
}

async fn write_requests(
    mut writer: OwnedWriteHalf,
    mut requests: mpsc::Receiver<Request>,
    alive: Arc<AtomicBool>,
    waiting: Waiting,
) {
    let mut out = Vec::with_capacity(WRITE_BATCH);
    while let Some(request) = requests.recv().await {
        encode(&request, &mut out, &waiting);
        while out.len() < WRITE_BATCH {
            match requests.try_recv() {
                Ok(request) => encode(&request, &mut out, &waiting),
                Err(_) => break,
            }
        }
        if writer.write_all(&out).await.is_err() {
            break;
        }
        out.clear();
    }
    alive.store(false, Ordering::Relaxed);
    let _ = writer.shutdown().await;
    fail_all(&waiting);
}

/// Encodes a request; one too large for a frame is answered at once instead of sent.
fn encode(request: &Request, out: &mut Vec<u8>, waiting: &Waiting) {
    if let Err(e) = encode_request(request, out) {
        let answer = waiting.lock().ok().and_then(|mut w| w.remove(&request.id));
        if let Some(answer) = answer {
            let message = format!("request too large: {e}");
            let _ = answer.send(Body::Error(ringkv_proto::ErrorReply::InvalidArgument {
                message,
            }));
        }
    }
}

async fn read_responses(
    mut reader: OwnedReadHalf,
    waiting: Waiting,
    alive: Arc<AtomicBool>,
    newest_epoch: Arc<AtomicU64>,
) {
    let mut input = Input::default();
    while let Ok(response) = read_response(&mut reader, &mut input).await {
        // Before the answer is handed over: the caller checks it next.
        newest_epoch.fetch_max(response.ring_epoch, Ordering::Relaxed);
        if response.id == 0 {
            // About the connection (malformed input from us): it is closing.
            break;
        }
        let answer = waiting
            .lock()
            .expect("no panics while locked")
            .remove(&response.id);
        if let Some(answer) = answer {
            let _ = answer.send(response.body);
        }
    }
    alive.store(false, Ordering::Relaxed);
    fail_all(&waiting);
}

/// Dropping the senders tells every waiting request the connection is lost.
fn fail_all(waiting: &Waiting) {
    if let Ok(mut waiting) = waiting.lock() {
        waiting.clear();
    }
}

/// Bytes read from a socket and not yet decoded.
#[derive(Default)]
struct Input {
    bytes: Vec<u8>,
    /// Where the undecoded bytes start; the front is dropped only before a read, so a
    /// burst of small pipelined responses is not moved once per response.
    start: usize,
    scratch: AlignedVec<16>,
}

/// Reads until one whole response is buffered in `input`, then decodes it.
async fn read_response(
    stream: &mut (impl AsyncReadExt + Unpin),
    input: &mut Input,
) -> std::io::Result<Response> {
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    loop {
        let pending = &input.bytes[input.start..];
        if let Some((payload, end)) = next_frame(pending).map_err(|e| invalid(e.to_string()))? {
            let response = decode_response(&pending[payload], &mut input.scratch)
                .map_err(|e| invalid(e.to_string()))?;
            input.start += end;
            return Ok(response);
        }
        input.bytes.drain(..input.start);
        input.start = 0;
        let before = input.bytes.len();
        input.bytes.resize(before + (64 << 10), 0);
        let n = stream.read(&mut input.bytes[before..]).await?;
        input.bytes.truncate(before + n);
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

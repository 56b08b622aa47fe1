//! Accepting connections for either protocol: a bound on how many are open per shard,
//! ids, and a stop switch so a stopping node lets open connections finish their work.

use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

/// Bytes read from a socket at a time.
pub const READ_CHUNK: usize = 64 << 10;

/// Reads what has arrived on `stream` (through `chunk`) onto the end of `input`;
/// false when the other side has closed the connection.
pub async fn read_more(
    stream: &mut TcpStream,
    chunk: &mut [u8],
    input: &mut Vec<u8>,
) -> Result<bool, String> {
    let n = stream.read(chunk).await.map_err(|e| e.to_string())?;
    input.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

/// The connections of one shard: how many are open, and whether new ones are welcome.
pub struct Connections {
    open: Cell<usize>,
    /// Of the open connections, those that are links from other nodes.
    peer_links: Cell<usize>,
    max: usize,
    max_pipeline: usize,
    closing: Cell<bool>,
    next_id: Cell<u64>,
}

impl Connections {
    pub fn new(max: usize, max_pipeline: usize) -> Connections {
        Connections {
            open: Cell::new(0),
            peer_links: Cell::new(0),
            max,
            max_pipeline,
            closing: Cell::new(false),
            next_id: Cell::new(1),
        }
    }

    /// Open connections from clients: what a stopping node waits for.
    pub fn clients_open(&self) -> usize {
        self.open.get() - self.peer_links.get()
    }

    /// Counts a connection as a peer link while `serving` runs.
    pub async fn as_peer_link<T>(&self, serving: impl Future<Output = T>) -> T {
        self.peer_links.set(self.peer_links.get() + 1);
        let result = serving.await;
        self.peer_links.set(self.peer_links.get() - 1);
        result
    }

    /// Requests of one connection parsed and run at once; more wait for the next turn.
    pub fn max_pipeline(&self) -> usize {
        self.max_pipeline
    }

    /// Stops accepting work: open connections finish the requests they have read.
    pub fn close(&self) {
        self.closing.set(true);
    }

    pub fn is_closing(&self) -> bool {
        self.closing.get()
    }
}

/// Accepts on `listener` until the node stops, serving each connection with `serve`
/// (given the stream and a connection id). Past the connection limit a new connection
/// gets `refusal` and is closed.
pub async fn accept<F, Fut>(
    listener: TcpListener,
    connections: Rc<Connections>,
    refusal: &'static [u8],
    serve: F,
) where
    F: Fn(TcpStream, u64) -> Fut,
    Fut: Future<Output = Result<(), String>> + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            // A stopping node shuts its listeners down, which fails the accept.
            Err(_) if connections.closing.get() => break,
            Err(err) => {
                tracing::warn!(%err, "accept failed");
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        if connections.closing.get() {
            break;
        }
        if connections.open.get() >= connections.max {
            glommio::spawn_local(async move {
                let mut stream = stream;
                let _ = stream.write_all(refusal).await;
            })
            .detach();
            continue;
        }
        connections.open.set(connections.open.get() + 1);
        let id = connections.next_id.get();
        connections.next_id.set(id + 1);
        let served = serve(stream, id);
        let connections = connections.clone();
        glommio::spawn_local(async move {
            if let Err(reason) = served.await {
                tracing::debug!(%reason, id, "connection closed");
            }
            connections.open.set(connections.open.get() - 1);
        })
        .detach();
    }
}

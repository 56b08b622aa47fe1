//! Accepting connections for either protocol: a bound on how many are open per shard,
//! ids, and a stop switch so a stopping node lets open connections finish their work,
//! then hangs up on the rest and waits until every connection's task has ended.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use socket2::Socket;

use crate::tasks::TaskGroup;

/// Why a connection (a client's or a peer link) ended early: logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Input its protocol does not allow (the connection was told, then closed).
    #[error("malformed input: {0}")]
    Malformed(String),
    /// A handshake refused, by this node or by the one it connected to.
    #[error("handshake refused: {0}")]
    Refused(String),
}

impl From<glommio::GlommioError<()>> for ConnectionError {
    fn from(error: glommio::GlommioError<()>) -> Self {
        ConnectionError::Io(error.into())
    }
}

/// Bytes read from a socket at a time.
pub const READ_CHUNK: usize = 64 << 10;

/// Reads what has arrived on `stream` (through `chunk`) onto the end of `input`;
/// false when the other side has closed the connection.
pub async fn read_more(
    stream: &mut TcpStream,
    chunk: &mut [u8],
    input: &mut Vec<u8>,
) -> Result<bool, ConnectionError> {
    let n = stream.read(chunk).await?;
    input.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

/// The connections of one shard: how many are open, whether new ones are welcome, and
/// a way to hang up on each from outside the task serving it.
pub struct Connections {
    /// Every open connection, by id.
    open: RefCell<HashMap<u64, Open>>,
    /// The task serving each connection (and those refusing one past the limit).
    tasks: TaskGroup,
    max: usize,
    max_pipeline: usize,
    closing: Cell<bool>,
    next_id: Cell<u64>,
}

struct Open {
    /// A duplicate of the connection's socket: shutting it down ends the connection's
    /// reads and writes, whatever the task serving it is waiting for.
    hangup: Socket,
    /// A link from another node (which stops with the peer links, not with clients).
    peer_link: bool,
}

impl Connections {
    pub fn new(max: usize, max_pipeline: usize) -> Connections {
        Connections {
            open: RefCell::new(HashMap::new()),
            tasks: TaskGroup::new(),
            max,
            max_pipeline,
            closing: Cell::new(false),
            next_id: Cell::new(1),
        }
    }

    /// Open connections from clients: what a stopping node waits for.
    pub fn clients_open(&self) -> usize {
        self.open.borrow().values().filter(|c| !c.peer_link).count()
    }

    /// Marks connection `id` as a link from another node while `serving` runs.
    pub async fn as_peer_link<T>(&self, id: u64, serving: impl Future<Output = T>) -> T {
        if let Some(open) = self.open.borrow_mut().get_mut(&id) {
            open.peer_link = true;
        }
        serving.await
    }

    /// Requests of one connection read ahead of their answers: a RESP batch parsed and
    /// run at once (more wait for the next turn), native requests unanswered at once.
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

    /// Shuts down every client connection's socket: a task waiting to read sees the end
    /// of the stream, one writing gets an error, one running requests finishes them and
    /// then fails to answer. Either way it ends, and its socket closes.
    pub fn hang_up_clients(&self) {
        for open in self.open.borrow().values().filter(|c| !c.peer_link) {
            // An error means the socket is already shut down, which is what we want.
            let _ = open.hangup.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Waits until the task of every connection (clients and peer links) has ended.
    pub async fn ended(&self) {
        self.tasks.ended().await
    }
}

/// A second handle on `stream`'s socket, for `Connections::hang_up_clients`.
fn hangup_handle(stream: &TcpStream) -> std::io::Result<Socket> {
    // SAFETY: `stream` owns this descriptor and keeps it open for the whole call; the
    // duplicate made from it is a new descriptor, owned by the `Socket` returned.
    #[allow(unsafe_code)]
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    Ok(Socket::from(fd.try_clone_to_owned()?))
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
    Fut: Future<Output = Result<(), ConnectionError>> + 'static,
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
        if connections.open.borrow().len() >= connections.max {
            connections.tasks.spawn(async move {
                let mut stream = stream;
                let _ = stream.write_all(refusal).await;
            });
            continue;
        }
        let hangup = match hangup_handle(&stream) {
            Ok(hangup) => hangup,
            // Out of descriptors: closing this connection frees one.
            Err(err) => {
                tracing::warn!(%err, "cannot serve a connection");
                continue;
            }
        };
        let id = connections.next_id.get();
        connections.next_id.set(id + 1);
        let open = Open {
            hangup,
            peer_link: false,
        };
        connections.open.borrow_mut().insert(id, open);
        let served = serve(stream, id);
        let group = connections.clone();
        connections.tasks.spawn(async move {
            if let Err(reason) = served.await {
                tracing::debug!(%reason, id, "connection closed");
            }
            group.open.borrow_mut().remove(&id);
        });
    }
}

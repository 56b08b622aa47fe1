//! Listening sockets that really stop listening when the node stops.
//!
//! glommio's `TcpListener` closes its socket on drop, but an accept still queued in
//! io_uring holds the socket open until the kernel tears the ring down, which happens
//! asynchronously after the executor exits. Meanwhile the socket stays in its
//! SO_REUSEPORT group and the kernel keeps handing it new connections that nobody will
//! ever accept: a client of a restarted node could hang on the old node's socket. So
//! the node binds its own sockets, keeps a duplicate of each, and on stop shuts the
//! duplicate down, which leaves the group at once and fails the queued accept.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// A listener for glommio and the handle that stops it.
pub struct Bound {
    pub listener: glommio::net::TcpListener,
    pub stopper: Stopper,
}

/// Stops a listener from another task: no new connections from the moment it is called.
pub struct Stopper(Socket);

impl Stopper {
    pub fn stop(&self) {
        // Errors mean the socket is already closed, which is what we want.
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// Binds `addr` with SO_REUSEPORT (every shard binds the shared address) and listens.
pub fn bind(addr: SocketAddr) -> std::io::Result<Bound> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_port(true)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    let stopper = Stopper(socket.try_clone()?);
    let fd = socket.into_raw_fd();
    // SAFETY: `fd` is a bound, listening TCP socket that we own (taken from `socket`
    // just above, which no longer closes it); glommio takes over closing it.
    #[allow(unsafe_code)]
    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(fd) };
    Ok(Bound { listener, stopper })
}

/// Whether `addr` is free to bind for this node: a bind without SO_REUSEPORT (which a
/// socket of another ringkv or redis would refuse), and without `listen`, so no client
/// can connect to this probe in the moment it exists.
pub fn probe(addr: SocketAddr) -> std::io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())
}

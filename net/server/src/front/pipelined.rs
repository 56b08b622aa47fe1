//! The one connection loop both front ends run: read what has arrived, parse every
//! complete request in it (up to `max_pipeline`), run the batch, write the answers in
//! order, and read again only when nothing complete is buffered (a client waiting for
//! the answers to a long pipeline sends nothing more). Malformed input is answered
//! with the protocol's error and closes that connection only.
//!
//! A protocol is a [`FrontEnd`]: how to cut one request out of the input, how to run a
//! batch (concurrently where `crate::front::pipeline` allows, answered in order), and
//! how to say the input was malformed.

use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

use super::connections::{ConnectionError, Connections, READ_CHUNK, read_more};

/// One request cut from the input, or a reason it cannot be.
pub enum Parsed<R> {
    /// A complete request, and the bytes it took.
    Request(R, usize),
    /// Bytes that carry no request (an empty RESP command), consumed.
    Skip(usize),
    /// More bytes are needed.
    Incomplete,
    Malformed(String),
}

/// A protocol spoken over [`serve`].
pub trait FrontEnd {
    type Request;

    fn parse(&mut self, input: &[u8]) -> Parsed<Self::Request>;

    /// Runs `batch` and appends its answers, in request order, to `output`.
    async fn run(&mut self, batch: Vec<Self::Request>, output: &mut Vec<u8>);

    /// Appends the answer to malformed input to `output`.
    fn malformed(&mut self, reason: &str, output: &mut Vec<u8>);

    /// Whether the connection should end after the answers just written (QUIT).
    fn closing(&self) -> bool {
        false
    }
}

/// Serves `front` on `stream` until the client leaves, the node stops, or the input
/// is malformed (an error naming why). `input` holds bytes already read.
pub async fn serve<F: FrontEnd>(
    stream: &mut TcpStream,
    connections: &Connections,
    front: &mut F,
    mut input: Vec<u8>,
) -> Result<(), ConnectionError> {
    let mut output: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        let mut consumed = 0;
        let mut batch = Vec::new();
        let mut malformed = None;
        while batch.len() < connections.max_pipeline() {
            match front.parse(&input[consumed..]) {
                Parsed::Request(request, used) => {
                    consumed += used;
                    batch.push(request);
                }
                Parsed::Skip(used) => consumed += used,
                Parsed::Incomplete => break,
                Parsed::Malformed(reason) => {
                    malformed = Some(reason);
                    break;
                }
            }
        }
        input.drain(..consumed);
        if batch.is_empty() && malformed.is_none() && consumed == 0 {
            if connections.is_closing() {
                return Ok(());
            }
            if !read_more(stream, &mut chunk, &mut input).await? {
                return Ok(());
            }
            continue;
        }
        if !batch.is_empty() {
            front.run(batch, &mut output).await;
        }
        if let Some(reason) = &malformed {
            front.malformed(reason, &mut output);
        }
        stream.write_all(&output).await?;
        output.clear();
        if let Some(reason) = malformed {
            return Err(ConnectionError::Malformed(reason));
        }
        if front.closing() {
            return Ok(());
        }
    }
}

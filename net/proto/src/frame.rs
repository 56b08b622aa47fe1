//! Native-protocol framing: a 4-byte little-endian payload length, then the payload.
//!
//! The length is checked against [`MAX_FRAME`] as soon as its four bytes have arrived,
//! so a peer announcing a huge frame is refused before a byte is allocated for it.

use thiserror::Error;

/// Bytes before every payload: its length as a little-endian u32.
pub const HEADER_LEN: usize = 4;

/// Largest payload accepted: a 16 MiB value (the configurable maximum's ceiling) plus a
/// 64 KiB key, a context and the archive's own bookkeeping, with room to spare. A
/// multi-put or multi-get reply must fit in one frame too.
pub const MAX_FRAME: usize = 32 << 20;

/// Why bytes cannot be split into frames. The connection that sent them is closed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge { len: usize },
    #[error("empty frame")]
    Empty,
    /// A peer frame header whose reserved bytes are not zero (another frame format).
    #[error("a peer frame header with a non-zero reserved byte {byte:#04x}")]
    BadHeader { byte: u8 },
}

/// Where the next complete frame's payload lies in `input`, and where the frame ends.
/// `Ok(None)` means more bytes are needed.
pub fn next_frame(input: &[u8]) -> Result<Option<(std::ops::Range<usize>, usize)>, FrameError> {
    let Some(header) = input.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = payload_len(header)?;
    let end = HEADER_LEN + len;
    if input.len() < end {
        return Ok(None);
    }
    Ok(Some((HEADER_LEN..end, end)))
}

/// The payload length a frame header announces, refused when empty or over
/// [`MAX_FRAME`] (before a byte is allocated for it).
pub(crate) fn payload_len(header: &[u8]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header[..4].try_into().expect("four bytes")) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    Ok(len)
}

/// Appends one frame holding `payload` to `out`.
pub fn write_frame(payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { len: payload.len() });
    }
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_at_every_cut() {
        let mut wire = Vec::new();
        write_frame(b"hello", &mut wire).unwrap();
        write_frame(b"x", &mut wire).unwrap();
        let (payload, end) = next_frame(&wire).unwrap().unwrap();
        assert_eq!(&wire[payload], b"hello");
        let (second, rest) = next_frame(&wire[end..]).unwrap().unwrap();
        assert_eq!((&wire[end..][second], rest), (&b"x"[..], 5));
        for cut in 0..end {
            assert_eq!(next_frame(&wire[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn oversized_and_empty_frames_are_refused_from_the_header_alone() {
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert_eq!(
            next_frame(&huge),
            Err(FrameError::TooLarge { len: MAX_FRAME + 1 })
        );
        assert_eq!(next_frame(&[0, 0, 0, 0]), Err(FrameError::Empty));
    }
}

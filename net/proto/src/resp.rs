//! The Redis protocol: take one command off the input, encode one reply in RESP2 or
//! RESP3. Limits are checked before anything is allocated.

/// A reply before encoding; the connection encodes it as RESP2 or RESP3.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Null,
    Array(Vec<Reply>),
    /// A RESP3 map; RESP2 gets a flat array of alternating keys and values.
    Map(Vec<(Reply, Reply)>),
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::Simple("OK".into())
    }
    pub fn err(message: impl Into<String>) -> Reply {
        Reply::Error(message.into())
    }
    pub fn bulk(bytes: &[u8]) -> Reply {
        Reply::Bulk(bytes.to_vec())
    }
}

/// Longest bulk string accepted: the largest value plus room for the key and options.
const MAX_BULK: usize = 17 << 20;
const MAX_ARGS: usize = 1 << 16;
const MAX_INLINE: usize = 64 << 10;

/// A command's arguments (name first) and the input bytes it used.
pub type Parsed = (Vec<Vec<u8>>, usize);

/// The next complete command in `input` and the bytes it used; None if incomplete.
pub fn next_command(input: &[u8]) -> Result<Option<Parsed>, String> {
    match input.first() {
        None => Ok(None),
        Some(b'*') => array(input),
        Some(_) => inline(input),
    }
}

fn line(input: &[u8], from: usize, limit: usize) -> Result<Option<(&[u8], usize)>, String> {
    let window = &input[from..input.len().min(from + limit + 2)];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(end) => Ok(Some((&window[..end], from + end + 2))),
        None if window.len() >= limit + 2 => Err(format!("line longer than {limit} bytes")),
        None => Ok(None),
    }
}

fn number(digits: &[u8], what: &str) -> Result<i64, String> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| format!("invalid {what} '{}'", String::from_utf8_lossy(digits)))
}

fn array(input: &[u8]) -> Result<Option<Parsed>, String> {
    let Some((header, mut at)) = line(input, 1, 32)? else {
        return Ok(None);
    };
    let count = number(header, "multibulk length")?;
    if count <= 0 {
        return Ok(Some((Vec::new(), at)));
    }
    if count as usize > MAX_ARGS {
        return Err(format!("too many arguments: {count} (at most {MAX_ARGS})"));
    }
    let mut args = Vec::with_capacity(count as usize);
    for _ in 0..count {
        if at >= input.len() {
            return Ok(None);
        }
        if input[at] != b'$' {
            return Err(format!("expected '$', got '{}'", input[at].escape_ascii()));
        }
        let Some((digits, body)) = line(input, at + 1, 32)? else {
            return Ok(None);
        };
        let len = number(digits, "bulk length")?;
        if len < 0 || len as usize > MAX_BULK {
            return Err(format!("invalid bulk length {len}"));
        }
        let end = body + len as usize;
        if input.len() < end + 2 {
            return Ok(None);
        }
        if &input[end..end + 2] != b"\r\n" {
            return Err("bulk string not followed by CRLF".into());
        }
        args.push(input[body..end].to_vec());
        at = end + 2;
    }
    Ok(Some((args, at)))
}

/// An inline command ends at LF (with or without CR before it), as Redis reads it, so
/// `printf 'PING\n' | nc` works.
fn inline(input: &[u8]) -> Result<Option<Parsed>, String> {
    let window = &input[..input.len().min(MAX_INLINE + 2)];
    let Some(end) = window.iter().position(|&b| b == b'\n') else {
        if window.len() >= MAX_INLINE + 2 {
            return Err(format!("line longer than {MAX_INLINE} bytes"));
        }
        return Ok(None);
    };
    let (text, used) = (&window[..end], end + 1);
    let args = text
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    Ok(Some((args, used)))
}

/// Appends `reply` to `out` in RESP2 (`protocol` 2) or RESP3 (`protocol` 3).
pub fn encode(reply: &Reply, protocol: u8, out: &mut Vec<u8>) {
    match reply {
        Reply::Simple(s) => frame(out, b'+', s.as_bytes()),
        // Error text must stay on one line.
        Reply::Error(e) => frame(out, b'-', e.replace(['\r', '\n'], " ").as_bytes()),
        Reply::Int(n) => frame(out, b':', n.to_string().as_bytes()),
        Reply::Bulk(bytes) => {
            frame(out, b'$', bytes.len().to_string().as_bytes());
            out.extend_from_slice(bytes);
            out.extend_from_slice(b"\r\n");
        }
        Reply::Null if protocol >= 3 => out.extend_from_slice(b"_\r\n"),
        Reply::Null => out.extend_from_slice(b"$-1\r\n"),
        Reply::Array(items) => {
            frame(out, b'*', items.len().to_string().as_bytes());
            for item in items {
                encode(item, protocol, out);
            }
        }
        Reply::Map(pairs) => {
            if protocol >= 3 {
                frame(out, b'%', pairs.len().to_string().as_bytes());
            } else {
                frame(out, b'*', (pairs.len() * 2).to_string().as_bytes());
            }
            for (key, value) in pairs {
                encode(key, protocol, out);
                encode(value, protocol, out);
            }
        }
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    out.push(kind);
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_inline_partial_and_pipelined() {
        let two = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n";
        let (args, used) = next_command(two).unwrap().unwrap();
        assert_eq!(args, vec![b"GET".to_vec(), b"k".to_vec()]);
        let (args, rest) = next_command(&two[used..]).unwrap().unwrap();
        assert_eq!((args, rest), (vec![b"PING".to_vec()], 6));
        let (args, used) = next_command(b"SET a b\nGET a\n").unwrap().unwrap();
        assert_eq!((args.len(), used), (3, 8));
        for cut in 0..used {
            assert_eq!(next_command(&two[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn bad_input_is_an_error_before_any_allocation() {
        assert!(next_command(b"*1\r\n$999999999999\r\n").is_err());
        assert!(next_command(b"*99999999\r\n").is_err());
        assert!(next_command(b"*1\r\n$-7\r\n").is_err());
        assert!(next_command(b"*1\r\n:5\r\n").is_err());
        assert!(next_command(b"*1\r\n$1\r\nab\r\n").is_err());
        assert!(next_command(b"*x\r\n").is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..20_000 {
            let mut input: Vec<u8> = (0..rng.usize(0..40)).map(|_| rng.u8(..)).collect();
            if rng.bool() {
                input.insert(0, b'*');
            }
            let _ = next_command(&input);
        }
    }

    #[test]
    fn replies_in_both_protocols() {
        let map = Reply::Map(vec![(Reply::Bulk(b"a".to_vec()), Reply::Int(1))]);
        let mut out = Vec::new();
        encode(&map, 2, &mut out);
        assert_eq!(out, b"*2\r\n$1\r\na\r\n:1\r\n");
        out.clear();
        encode(&map, 3, &mut out);
        assert_eq!(out, b"%1\r\n$1\r\na\r\n:1\r\n");
        out.clear();
        encode(&Reply::Null, 2, &mut out);
        encode(&Reply::Error("ERR a\r\nb".into()), 2, &mut out);
        assert_eq!(out, b"$-1\r\n-ERR a  b\r\n");
    }
}

//! Running a connection's pipelined requests: as many at once as is safe, answered in
//! the order they arrived.
//!
//! Requests run concurrently in segments where no two touch the same key; a request
//! that touches several keys or changes the connection runs alone. Within a key the
//! node serves work in arrival order, so `SET k 1` then `GET k` in one pipeline reads 1
//! (SET is a read and then a write, which is why a later request on its key must wait).

use std::future::Future;

/// What a request touches, for deciding what may run beside it.
pub enum Touch<'a> {
    /// No key (PING, a topology request): runs beside anything.
    Nothing,
    /// One key: runs beside requests on other keys.
    Key(&'a [u8]),
    /// Several keys, or the connection's own state: runs alone.
    Alone,
}

/// The end of the concurrent segment that starts at `start` (at least one request).
pub fn segment_end<T>(batch: &[T], start: usize, touch: &impl Fn(&T) -> Touch<'_>) -> usize {
    let mut keys: Vec<&[u8]> = Vec::new();
    for (i, request) in batch.iter().enumerate().skip(start) {
        match touch(request) {
            Touch::Nothing => {}
            Touch::Key(key) if !keys.contains(&key) => keys.push(key),
            Touch::Key(_) => return i,
            Touch::Alone if i == start => return i + 1,
            Touch::Alone => return i,
        }
    }
    batch.len()
}

/// Runs `batch` through `run`, concurrently where `touch` allows; the answers come back
/// in request order.
pub async fn run_in_order<'b, T, R, F, Fut>(
    batch: &'b [T],
    touch: impl Fn(&T) -> Touch<'_>,
    mut run: F,
) -> Vec<R>
where
    F: FnMut(&'b T) -> Fut,
    Fut: Future<Output = R>,
{
    let mut answers = Vec::with_capacity(batch.len());
    let mut start = 0;
    while start < batch.len() {
        let end = segment_end(batch, start, &touch);
        if end == start + 1 {
            answers.push(run(&batch[start]).await);
        } else {
            let running: Vec<Fut> = batch[start..end].iter().map(&mut run).collect();
            answers.extend(futures_util::future::join_all(running).await);
        }
        start = end;
    }
    answers
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Named(&'static str);

    fn touch(request: &Named) -> Touch<'_> {
        match request.0 {
            "ping" => Touch::Nothing,
            "multi" => Touch::Alone,
            key => Touch::Key(key.as_bytes()),
        }
    }

    #[test]
    fn segments_break_at_repeated_keys_and_lone_requests() {
        let batch = ["a", "b", "ping", "a", "multi", "c", "ping", "ping"].map(Named);
        let mut ends = Vec::new();
        let mut start = 0;
        while start < batch.len() {
            start = segment_end(&batch, start, &touch);
            ends.push(start);
        }
        assert_eq!(ends, vec![3, 4, 5, 8]);
    }
}

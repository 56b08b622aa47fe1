//! Shared pieces of ringkv's whole-system tests.

/// The value the engine writer stores under `key`: derived from the key so a reader can
/// check it without a log of values.
pub fn value_for(key: &str) -> Vec<u8> {
    let mut value = key.as_bytes().to_vec();
    while value.len() < 100 {
        value.extend_from_slice(key.as_bytes());
    }
    value.truncate(100);
    value
}

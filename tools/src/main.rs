//! The `ringkv` binary. It parses arguments and calls the libraries; nothing more.
fn main() {}

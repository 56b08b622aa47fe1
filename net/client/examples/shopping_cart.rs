//! A shopping cart kept in ringkv, merged safely when two sessions add items at once.
//!
//! Start a cluster (`cargo run --release -p ringkv-tools`), then:
//!
//! ```sh
//! cargo run -p ringkv-client --example shopping_cart -- 127.0.0.1:7500
//! ```
//!
//! Two writers that did not see each other's write leave two siblings; `modify` reads
//! every sibling, merges them (here: the union of the items), and writes the result
//! with the context it read, which supersedes exactly those siblings.

use std::collections::BTreeSet;

use ringkv_client::{Client, Error, PutMode, WriteOptions};

fn items(value: &[u8]) -> BTreeSet<String> {
    String::from_utf8_lossy(value)
        .split(',')
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

fn main() -> Result<(), Error> {
    let seed = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7500".into());
    let client = Client::builder().seeds([seed]).connect_blocking()?;
    let cart = b"cart:example";
    client.delete(cart)?;

    // Two sessions add an item each without reading first: concurrent writes.
    let concurrent = WriteOptions::default();
    client.put_with(cart, b"apples", PutMode::Sibling, concurrent)?;
    client.put_with(cart, b"pears", PutMode::Sibling, concurrent)?;
    let found = client.get(cart)?;
    println!(
        "after two concurrent adds: {} siblings",
        found.siblings.len()
    );

    // Merge: the union of every sibling's items, written back with the context read.
    client.modify(cart, |siblings| {
        let all: BTreeSet<String> = siblings.iter().flat_map(|s| items(s)).collect();
        Some(all.into_iter().collect::<Vec<_>>().join(",").into_bytes())
    })?;
    let merged = client.get(cart)?;
    let value = merged.value().map(String::from_utf8_lossy);
    println!("after the merge: {value:?}");
    Ok(())
}

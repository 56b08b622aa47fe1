//! Per-key mutual exclusion for read-merge-write.
//!
//! Locks are keyed by a 64-bit hash of (partition, key): two different keys that share a
//! hash merely take turns, which is harmless, and locking allocates nothing per key.

use std::cell::RefCell;
use std::rc::Rc;

use event_listener::Event;
use hashbrown::HashMap;
use xxhash_rust::xxh3::xxh3_64_with_seed;

#[derive(Default)]
pub struct KeyLocks {
    held: RefCell<HashMap<u64, Rc<Event>>>,
}

pub struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    hash: u64,
}

impl KeyLocks {
    pub async fn lock(&self, partition: u32, key: &[u8]) -> KeyGuard<'_> {
        let hash = xxh3_64_with_seed(key, partition as u64);
        loop {
            let listener = {
                let mut held = self.held.borrow_mut();
                match held.get(&hash) {
                    None => {
                        held.insert(hash, Rc::new(Event::new()));
                        return KeyGuard { locks: self, hash };
                    }
                    Some(event) => event.listen(),
                }
            };
            listener.await;
        }
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        if let Some(event) = self.locks.held.borrow_mut().remove(&self.hash) {
            // Waiters race to re-take the lock; the losers wait on the winner's event.
            event.notify(usize::MAX);
        }
    }
}

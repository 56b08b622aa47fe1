//! The record cache, addressed from the index (direct I/O bypasses the page cache, so
//! hot records are kept here).
//!
//! A cached key's index entry holds the number of its slot here (see `index::Entry::
//! cache_slot`), so a cached get is one index lookup and one array access: no second
//! hash table keyed by location. The slot keeps the version digest the entry gave up to
//! hold the slot number, and the record's location as a tag, checked on every hit.
//! Eviction is CLOCK over the slots, within a byte budget; an evicted slot is handed
//! back so the store can restore the entry (found by the record's own key).

use crate::index::Location;
use crate::record::Record;

pub(crate) struct RecordCache {
    slots: Vec<Slot>,
    free: Vec<u32>,
    hand: usize,
    weight: u64,
    capacity: u64,
}

struct Slot {
    record: Option<Record>,
    location: Location,
    digest: u32,
    referenced: bool,
}

/// What a cached record costs the budget: its bytes plus its slot and the `Rc` header
/// it shares with readers (so a cache of small records keeps to its budget too).
fn weight_of(record: &Record) -> u64 {
    (record.raw_len() + std::mem::size_of::<Slot>() + 16) as u64
}

/// A record evicted to make room: its key's entry must forget `slot` and get `digest`
/// back.
pub(crate) struct Evicted {
    pub slot: u32,
    pub digest: u32,
    pub record: Record,
}

impl RecordCache {
    pub fn new(capacity: u64) -> RecordCache {
        RecordCache {
            slots: Vec::new(),
            free: Vec::new(),
            hand: 0,
            weight: 0,
            capacity,
        }
    }

    /// The cached record in `slot` if it is the one at `location`.
    pub fn get(&mut self, slot: u32, location: Location) -> Option<Record> {
        let slot = self.slots.get_mut(slot as usize)?;
        if slot.location != location {
            return None;
        }
        let record = slot.record.as_ref()?.clone();
        slot.referenced = true;
        Some(record)
    }

    /// Caches `record` (stored at `location`), evicting others to stay within the
    /// budget (appended to `evicted`); returns its slot, or None if it is larger than
    /// the whole cache.
    pub fn insert(
        &mut self,
        location: Location,
        record: Record,
        evicted: &mut Vec<Evicted>,
    ) -> Option<u32> {
        let weight = weight_of(&record);
        if weight > self.capacity {
            return None;
        }
        while self.weight + weight > self.capacity {
            evicted.push(self.evict_one());
        }
        self.weight += weight;
        let slot = Slot {
            record: Some(record),
            location,
            digest: 0,
            referenced: false,
        };
        let number = match self.free.pop() {
            Some(number) => {
                self.slots[number as usize] = slot;
                number
            }
            None => {
                self.slots.push(slot);
                u32::try_from(self.slots.len() - 1).expect("over 4 billion cached records")
            }
        };
        Some(number)
    }

    /// Records the version digest the index entry gave up for `slot`.
    pub fn set_digest(&mut self, slot: u32, digest: u32) {
        self.slots[slot as usize].digest = digest;
    }

    pub fn digest(&self, slot: u32) -> u32 {
        self.slots[slot as usize].digest
    }

    /// Follows the record to its new place (compaction moved it; the bytes that
    /// matter, key, version and value, are the same).
    pub fn retag(&mut self, slot: u32, from: Location, to: Location) {
        if let Some(slot) = self.slots.get_mut(slot as usize)
            && slot.location == from
        {
            slot.location = to;
        }
    }

    /// Empties `slot` (its entry no longer points at it).
    pub fn free(&mut self, slot: u32) {
        let Some(entry) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if let Some(record) = entry.record.take() {
            self.weight -= weight_of(&record);
            self.free.push(slot);
        }
    }

    pub fn weight(&self) -> u64 {
        self.weight
    }

    fn evict_one(&mut self) -> Evicted {
        assert!(self.weight > 0, "nothing to evict");
        loop {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let number = self.hand;
            self.hand += 1;
            let slot = &mut self.slots[number];
            if slot.record.is_none() {
                continue;
            }
            if std::mem::take(&mut slot.referenced) {
                continue;
            }
            let record = slot.record.take().expect("checked above");
            let digest = slot.digest;
            self.weight -= weight_of(&record);
            self.free.push(number as u32);
            return Evicted {
                slot: number as u32,
                digest,
                record,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::*;
    use crate::record::{self, Kind};

    fn record(i: u32, len: usize) -> Record {
        let mut bytes = Vec::new();
        record::encode(
            &mut bytes,
            Kind::Value,
            0,
            &i.to_le_bytes(),
            b"v",
            &vec![1; len],
            0,
        );
        let header = record::decode_header(&bytes, 0).unwrap();
        Record::from_checked(Rc::from(&bytes[..]), header)
    }

    fn at(i: u32) -> Location {
        Location {
            file: 1,
            offset: i * 1000,
            len: 100,
        }
    }

    #[test]
    fn stays_within_its_budget_and_keeps_what_is_read() {
        let size = weight_of(&record(0, 100));
        let mut cache = RecordCache::new(size * 10);
        let mut evicted = Vec::new();
        let mut slots = Vec::new();
        for i in 0..10 {
            slots.push(cache.insert(at(i), record(i, 100), &mut evicted).unwrap());
        }
        assert!(evicted.is_empty());
        // Reading record 3 marks it: the next insertions evict others first.
        assert!(cache.get(slots[3], at(3)).is_some());
        assert!(
            cache.get(slots[3], at(4)).is_none(),
            "a location tag that differs misses"
        );
        for i in 10..15 {
            cache.insert(at(i), record(i, 100), &mut evicted).unwrap();
            assert!(cache.weight() <= size * 10);
        }
        assert_eq!(evicted.len(), 5);
        assert!(evicted.iter().all(|e| e.record.key() != 3u32.to_le_bytes()));
        assert!(cache.get(slots[3], at(3)).is_some());
        // A record larger than the whole cache is not cached.
        assert!(
            cache
                .insert(at(99), record(99, 5000), &mut evicted)
                .is_none()
        );
        cache.free(slots[3]);
        assert!(cache.get(slots[3], at(3)).is_none());
    }
}

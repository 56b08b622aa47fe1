//! The simulator's only source of randomness: a seeded xoshiro256++ stream, so a seed
//! names one run on every machine.

use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::{Rng, SeedableRng};

pub struct Dice {
    rng: Xoshiro256PlusPlus,
}

impl Dice {
    pub fn new(seed: u64) -> Self {
        Dice {
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
        }
    }

    /// A uniform integer in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        assert!(low <= high, "empty range {low}..={high}");
        let span = high - low + 1;
        // Multiply-shift maps 64 random bits onto the span with negligible bias.
        low + ((self.rng.next_u64() as u128 * span as u128) >> 64) as u64
    }

    /// 64 random bits (a node's epoch seed).
    pub fn bits(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// An index into a collection of `len` items.
    pub fn index(&mut self, len: usize) -> usize {
        assert!(len > 0, "index into an empty collection");
        self.between(0, len as u64 - 1) as usize
    }

    /// True with probability `per_mille` / 1000.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        self.between(0, 999) < per_mille as u64
    }
}

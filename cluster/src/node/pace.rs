//! How fast a shard streams partitions: up to the configured rate, and slower while
//! the new replicas answer slowly.
//!
//! A streamed key costs its new replica what a client's write does (a merge, a
//! durable write, an ack), and several sources may stream to one new replica at
//! once. A fixed rate that suits an idle cluster swamps a busy one: measured on two
//! cores (docs/benchmarks.md), 3 sources at 2,000 keys/s each cut a cluster serving
//! 2,000 requests/s to 900, with p50 over half a second. So the rate follows the
//! time a streamed key takes to be acked: that is the new replica's queueing delay
//! plus a round trip, and it rises as soon as foreground work and streams contend.
//! Each window, when more than a tenth of the acks took longer than
//! [`ACK_TARGET`] (or any key timed out), the rate halves; otherwise it grows by a
//! tenth of the ceiling (additive increase, multiplicative decrease, as TCP; yielding
//! to foreground traffic like LEDBAT). A new stream starts at a tenth of the ceiling.

use std::time::Duration;

use crate::hints::Throttle;

/// An ack slower than this says the new replica (or the link) is queueing.
pub const ACK_TARGET: Duration = Duration::from_millis(20);
/// How often the rate is adjusted.
const WINDOW: Duration = Duration::from_millis(100);
/// The rate never drops below this (keys per second): a change always ends.
pub const FLOOR: f64 = 50.0;

#[derive(Debug)]
pub(super) struct Pace {
    /// The configured rate (keys per second); 0: no limit and no pacing.
    ceiling: u64,
    rate: f64,
    throttle: Throttle,
    window_start: Duration,
    acks: u32,
    slow: u32,
    timeouts: u32,
}

impl Pace {
    pub fn new(ceiling: u64, now: Duration) -> Pace {
        let rate = (ceiling as f64 / 10.0).max(FLOOR.min(ceiling as f64));
        Pace {
            ceiling,
            rate,
            throttle: Throttle::new(rate.round() as u64, now),
            window_start: now,
            acks: 0,
            slow: 0,
            timeouts: 0,
        }
    }

    /// Whether one more key may be sent now; if so, it is counted.
    pub fn take(&mut self, now: Duration) -> bool {
        self.adjust(now);
        if !self.throttle.ready(now) {
            return false;
        }
        self.throttle.spend(1);
        true
    }

    /// A streamed key was acked (or refused) `took` after it was sent.
    pub fn acked(&mut self, now: Duration, took: Duration) {
        self.acks += 1;
        if took > ACK_TARGET {
            self.slow += 1;
        }
        self.adjust(now);
    }

    /// A streamed key got no answer in time.
    pub fn timed_out(&mut self, now: Duration) {
        self.timeouts += 1;
        self.adjust(now);
    }

    /// Keys per second now (the ceiling when there is no limit).
    pub fn rate(&self) -> u64 {
        if self.ceiling == 0 {
            return 0;
        }
        self.rate.round() as u64
    }

    fn adjust(&mut self, now: Duration) {
        if self.ceiling == 0 || now < self.window_start + WINDOW {
            return;
        }
        let ceiling = self.ceiling as f64;
        if self.timeouts > 0 || self.slow * 10 > self.acks {
            self.rate = (self.rate / 2.0).max(FLOOR.min(ceiling));
        } else if self.acks > 0 {
            self.rate = (self.rate + ceiling / 10.0).min(ceiling);
        }
        self.throttle.set_rate(self.rate.round() as u64, now);
        self.window_start = now;
        (self.acks, self.slow, self.timeouts) = (0, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Sends for `windows` windows with every ack taking `took`; the rate at the end.
    fn run(pace: &mut Pace, from: u64, windows: u64, took: Duration) -> u64 {
        for w in 0..windows {
            let now = ms(from + w * 100);
            for i in 0..20 {
                let at = now + ms(i * 5);
                if pace.take(at) {
                    pace.acked(at, took);
                }
            }
        }
        pace.rate()
    }

    #[test]
    fn the_rate_climbs_to_the_ceiling_while_acks_are_fast() {
        let mut pace = Pace::new(20_000, ms(0));
        assert_eq!(pace.rate(), 2_000, "a stream starts at a tenth");
        assert_eq!(run(&mut pace, 0, 30, ms(2)), 20_000);
    }

    #[test]
    fn slow_acks_halve_the_rate_down_to_the_floor_and_it_recovers() {
        let mut pace = Pace::new(20_000, ms(0));
        run(&mut pace, 0, 30, ms(2));
        let after_one = run(&mut pace, 3_000, 2, ms(50));
        assert!(after_one <= 10_000, "one slow window halves: {after_one}");
        assert_eq!(run(&mut pace, 3_200, 40, ms(50)), FLOOR as u64);
        assert!(run(&mut pace, 7_200, 5, ms(2)) > FLOOR as u64);
    }

    #[test]
    fn a_timeout_halves_the_rate_and_no_limit_means_no_pacing() {
        let mut pace = Pace::new(1_000, ms(0));
        run(&mut pace, 0, 20, ms(1));
        assert_eq!(pace.rate(), 1_000);
        pace.timed_out(ms(2_000));
        assert_eq!(pace.rate(), 500);
        let mut free = Pace::new(0, ms(0));
        assert!((0..100_000).all(|_| free.take(ms(1))), "0 is no limit");
        free.timed_out(ms(5_000));
        assert_eq!(free.rate(), 0);
    }
}

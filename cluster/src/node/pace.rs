//! How fast a shard streams partitions: up to the configured rate, and slower while
//! the new replicas answer slowly.
//!
//! A streamed key costs its new replica what a client's write does (a merge, a
//! durable write, an ack), and several sources may stream to one new replica at
//! once. A fixed rate that suits an idle cluster swamps a busy one: measured on two
//! cores (docs/benchmarks.md), 3 sources at 2,000 keys/s each cut a cluster serving
//! 2,000 requests/s to 900, with p50 over half a second. So the rate follows the
//! time a streamed key takes to be acked: that is the new replica's queueing delay
//! plus a round trip and a durable write, and it rises as soon as foreground work and
//! streams contend. As in LEDBAT, what counts is the delay above the least ack time
//! seen (the base: the round trip and the disk's sync when nothing queues), so a slow
//! disk or a distant replica is not taken for congestion. Once a window holds at least
//! [`SAMPLES`] acks: when more than a tenth of them took over base + [`ACK_TARGET`],
//! the rate halves; otherwise, if the rate was what held the sends back, it grows by a
//! tenth of the ceiling (additive increase, multiplicative decrease, as TCP). A key
//! that timed out halves it at once. A new stream starts at a tenth of the ceiling.

use std::time::Duration;

use crate::hints::Throttle;

/// An ack this much slower than the base says the new replica is queueing: small
/// next to the foreground's own budget (a p99 of about 10 ms on the bench machine),
/// since the sources also serve foreground requests on the same threads.
pub const ACK_TARGET: Duration = Duration::from_millis(5);
/// How often the rate is adjusted, at the soonest.
const WINDOW: Duration = Duration::from_millis(100);
/// Acks a window needs before it judges (at the floor, a window lasts longer).
pub const SAMPLES: u32 = 8;
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
    /// Whether the rate held a send back in this window (else more rate would not
    /// have been used, and is not earned).
    limited: bool,
    /// The least ack time seen.
    base: Option<Duration>,
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
            limited: false,
            base: None,
        }
    }

    /// Whether one more key may be sent now; if so, it is counted.
    pub fn take(&mut self, now: Duration) -> bool {
        self.adjust(now);
        if !self.throttle.ready(now) {
            self.limited = true;
            return false;
        }
        self.throttle.spend(1);
        true
    }

    /// A streamed key was stored by its new replica `took` after it was sent.
    pub fn acked(&mut self, now: Duration, took: Duration) {
        let base = *self.base.get_or_insert(took);
        self.base = Some(base.min(took));
        self.acks += 1;
        if took > base + ACK_TARGET {
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
        if self.timeouts == 0 && self.acks < SAMPLES {
            // Too few to judge: the window goes on.
            return;
        }
        let ceiling = self.ceiling as f64;
        if self.timeouts > 0 || self.slow * 10 > self.acks {
            self.rate = (self.rate / 2.0).max(FLOOR.min(ceiling));
        } else if self.limited {
            self.rate = (self.rate + ceiling / 10.0).min(ceiling);
        }
        self.throttle.set_rate(self.rate.round() as u64, now);
        self.window_start = now;
        (self.acks, self.slow, self.timeouts) = (0, 0, 0);
        self.limited = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Offers a key every 100 us for `windows` windows of 100 ms from `from` ms, every
    /// ack taking `took`; the rate at the end.
    fn run(pace: &mut Pace, from: u64, windows: u64, took: Duration) -> u64 {
        for tick in 0..windows * 1_000 {
            let at = ms(from) + Duration::from_micros(tick * 100);
            if pace.take(at) {
                pace.acked(at, took);
            }
        }
        pace.rate()
    }

    #[test]
    fn the_rate_climbs_to_the_ceiling_while_acks_are_fast() {
        // Offered 10,000 keys a second, more than the ceiling.
        let mut pace = Pace::new(8_000, ms(0));
        assert_eq!(pace.rate(), 800, "a stream starts at a tenth");
        assert_eq!(run(&mut pace, 0, 30, ms(2)), 8_000);
    }

    #[test]
    fn a_slow_disk_is_not_congestion_but_queueing_above_it_is() {
        // Every ack takes 45 ms (a slow sync): that is the base, and the rate climbs.
        let mut pace = Pace::new(8_000, ms(0));
        assert_eq!(run(&mut pace, 0, 30, ms(45)), 8_000);
        // 45 ms more than the base: halved, down to the floor, and never below.
        assert!(run(&mut pace, 3_000, 2, ms(90)) <= 4_000);
        assert_eq!(run(&mut pace, 3_200, 60, ms(90)), FLOOR as u64);
        // The queue drains: back up.
        assert!(run(&mut pace, 9_200, 5, ms(45)) > FLOOR as u64);
    }

    #[test]
    fn the_rate_grows_only_when_it_held_sends_back() {
        let mut pace = Pace::new(20_000, ms(0));
        // One key every 5 ms (200 a second) never meets a limit of 2,000 a second.
        for tick in 0..600 {
            let at = ms(tick * 5);
            if pace.take(at) {
                pace.acked(at, ms(1));
            }
        }
        assert_eq!(pace.rate(), 2_000);
    }

    #[test]
    fn a_timeout_halves_the_rate_and_no_limit_means_no_pacing() {
        let mut pace = Pace::new(1_000, ms(0));
        run(&mut pace, 0, 20, ms(1));
        assert_eq!(pace.rate(), 1_000);
        pace.timed_out(ms(2_100));
        assert_eq!(pace.rate(), 500);
        let mut free = Pace::new(0, ms(0));
        assert!((0..100_000).all(|_| free.take(ms(1))), "0 is no limit");
        free.timed_out(ms(5_000));
        assert_eq!(free.rate(), 0);
    }
}

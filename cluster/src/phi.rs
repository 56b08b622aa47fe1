//! The phi-accrual failure detector (Hayashibara et al., 2004; Cassandra's and Akka's).
//!
//! Instead of a yes/no timeout, the detector keeps the recent gaps between a peer's
//! heartbeats and says how unlikely the present silence is: phi = -log10(P(a gap at
//! least this long)), with the gaps taken as normally distributed. phi = 8 means the
//! silence would happen once in 10^8 heartbeats if the peer were well. A loaded
//! machine that delays heartbeats widens the distribution, so it needs a longer silence
//! before the same phi: the detector adapts instead of firing on every slow second.
//!
//! Times are the driver's monotonic `now`; nothing here reads a clock.

use std::collections::VecDeque;
use std::time::Duration;

/// Settings of one detector (the same for every peer).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PhiConfig {
    /// phi at or above which a peer is taken for down.
    pub threshold: f64,
    /// Gaps kept to estimate the distribution.
    pub window: usize,
    /// The standard deviation never drops below this: perfectly regular heartbeats
    /// would otherwise make a few milliseconds of delay look fatal.
    pub min_std_dev: Duration,
    /// The gap assumed before any was measured (the gossip interval).
    pub first_gap: Duration,
}

impl Default for PhiConfig {
    fn default() -> Self {
        PhiConfig {
            threshold: 8.0,
            window: 100,
            min_std_dev: Duration::from_millis(300),
            first_gap: Duration::from_millis(200),
        }
    }
}

/// What one node knows about the heartbeats of one peer.
#[derive(Clone, Debug)]
pub struct PhiDetector {
    last: Option<Duration>,
    gaps: VecDeque<f64>,
    sum: f64,
    sum_squares: f64,
}

impl PhiDetector {
    pub fn new(config: &PhiConfig) -> PhiDetector {
        let mut detector = PhiDetector {
            last: None,
            gaps: VecDeque::with_capacity(config.window),
            sum: 0.0,
            sum_squares: 0.0,
        };
        // Seeded with the expected gap, so the first silence is judged sensibly.
        detector.push(config.first_gap.as_secs_f64(), config.window);
        detector
    }

    /// A heartbeat of the peer arrived at `now`.
    pub fn heartbeat(&mut self, now: Duration, config: &PhiConfig) {
        if let Some(last) = self.last
            && now > last
        {
            self.push((now - last).as_secs_f64(), config.window);
        }
        self.last = Some(now);
    }

    /// How suspicious the silence since the last heartbeat is at `now`; 0 before any
    /// heartbeat (a peer never heard from is not suspected, only unknown).
    pub fn phi(&self, now: Duration, config: &PhiConfig) -> f64 {
        let Some(last) = self.last else { return 0.0 };
        let elapsed = now.saturating_sub(last).as_secs_f64();
        let n = self.gaps.len() as f64;
        let mean = self.sum / n;
        let variance = (self.sum_squares / n - mean * mean).max(0.0);
        let std_dev = variance.sqrt().max(config.min_std_dev.as_secs_f64());
        phi_of(elapsed, mean, std_dev)
    }

    /// Takes `now` as the last heartbeat without counting a gap: for when this node
    /// itself was stalled and could not have heard anyone.
    pub fn rebase(&mut self, now: Duration) {
        if self.last.is_some() {
            self.last = Some(now);
        }
    }

    /// The mean gap between heartbeats (for status reports).
    pub fn mean_gap(&self) -> Duration {
        Duration::from_secs_f64(self.sum / self.gaps.len() as f64)
    }

    fn push(&mut self, gap: f64, window: usize) {
        if self.gaps.len() == window.max(1)
            && let Some(old) = self.gaps.pop_front()
        {
            self.sum -= old;
            self.sum_squares -= old * old;
        }
        self.gaps.push_back(gap);
        self.sum += gap;
        self.sum_squares += gap * gap;
    }
}

/// -log10 of the probability that a normal(mean, std_dev) gap exceeds `elapsed`, with
/// the logistic approximation of the normal tail Akka uses (accurate to about 1e-3). A
/// very long silence underflows to +infinity, which compares as suspected; never NaN
/// (the standard deviation is at least `min_std_dev`).
fn phi_of(elapsed: f64, mean: f64, std_dev: f64) -> f64 {
    let y = (elapsed - mean) / std_dev;
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    if elapsed > mean {
        -(e / (1.0 + e)).log10()
    } else {
        -(1.0 - 1.0 / (1.0 + e)).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn regular_heartbeats_then_silence_cross_the_threshold_about_two_seconds_in() {
        let config = PhiConfig::default();
        let mut detector = PhiDetector::new(&config);
        for i in 0..50 {
            detector.heartbeat(ms(200 * i), &config);
        }
        let last = ms(200 * 49);
        assert!(detector.phi(last + ms(400), &config) < 1.0);
        let crossed = (1..100)
            .map(|i| last + ms(100 * i))
            .find(|&t| detector.phi(t, &config) >= config.threshold)
            .expect("a long silence is suspected");
        let after = crossed - last;
        assert!(
            (ms(1_500)..=ms(2_500)).contains(&after),
            "suspected {after:?} after the last heartbeat"
        );
        // phi only grows with the silence.
        let phis: Vec<f64> = (1..60)
            .map(|i| detector.phi(last + ms(50 * i), &config))
            .collect();
        assert!(phis.windows(2).all(|w| w[0] <= w[1]), "{phis:?}");
    }

    #[test]
    fn jittery_heartbeats_need_a_longer_silence() {
        let config = PhiConfig::default();
        let (mut steady, mut jittery) = (PhiDetector::new(&config), PhiDetector::new(&config));
        let mut t = 0;
        for i in 0..100u64 {
            steady.heartbeat(ms(500 * i), &config);
            t += if i % 2 == 0 { 100 } else { 1_300 };
            jittery.heartbeat(ms(t), &config);
        }
        let silence = ms(2_000);
        assert!(
            jittery.phi(ms(t) + silence, &config) < steady.phi(ms(500 * 99) + silence, &config)
        );
    }

    #[test]
    fn a_peer_never_heard_from_is_not_suspected() {
        let config = PhiConfig::default();
        assert_eq!(PhiDetector::new(&config).phi(ms(60_000), &config), 0.0);
    }
}

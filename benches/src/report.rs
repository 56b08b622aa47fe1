//! Latency summaries from hdrhistogram, and their table and JSON forms.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// One measured operation.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub name: String,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// p50 divided by the p50 of the matching bare-disk baseline, where there is one.
    pub p50_vs_baseline: Option<f64>,
}

/// Records latencies in nanoseconds, up to one minute.
pub struct Recorder {
    histogram: Histogram<u64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            histogram: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds"),
        }
    }
}

impl Recorder {
    pub fn record(&mut self, latency: Duration) {
        self.histogram
            .saturating_record(latency.as_nanos().max(1) as u64);
    }

    pub fn merge(&mut self, other: &Recorder) {
        self.histogram.add(&other.histogram).expect("same bounds");
    }

    pub fn measurement(&self, name: &str, elapsed: Duration) -> Measurement {
        let us = |q: f64| self.histogram.value_at_quantile(q) as f64 / 1000.0;
        Measurement {
            name: name.to_owned(),
            ops: self.histogram.len(),
            ops_per_sec: self.histogram.len() as f64 / elapsed.as_secs_f64(),
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: self.histogram.max() as f64 / 1000.0,
            p50_vs_baseline: None,
        }
    }
}

pub fn print_table(rows: &[Measurement]) {
    println!(
        "{:<34} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "operation", "ops", "ops/s", "p50 us", "p99 us", "p999 us", "max us", "p50/base"
    );
    for m in rows {
        let ratio = m
            .p50_vs_baseline
            .map_or("-".to_owned(), |r| format!("{r:.2}x"));
        println!(
            "{:<34} {:>10} {:>12.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10}",
            m.name, m.ops, m.ops_per_sec, m.p50_us, m.p99_us, m.p999_us, m.max_us, ratio
        );
    }
}

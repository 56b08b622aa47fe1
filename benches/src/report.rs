//! Latency summaries from hdrhistogram, and their table and JSON forms.

use std::time::{Duration, Instant};

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
    /// The bare-disk measurement this one is compared with, where there is one.
    pub baseline: Option<String>,
    /// Each percentile divided by the same percentile of `baseline`.
    pub p50_vs_baseline: Option<f64>,
    pub p99_vs_baseline: Option<f64>,
    pub p999_vs_baseline: Option<f64>,
    /// For puts: records carried by each group commit, and fdatasyncs per second.
    pub records_per_commit: Option<f64>,
    pub syncs_per_sec: Option<f64>,
}

impl Measurement {
    /// Records `baseline` as the comparison and fills in the ratios.
    pub fn compare_with(&mut self, baseline: &Measurement) {
        let ratio = |ours: f64, theirs: f64| (theirs > 0.0).then(|| ours / theirs);
        self.baseline = Some(baseline.name.clone());
        self.p50_vs_baseline = ratio(self.p50_us, baseline.p50_us);
        self.p99_vs_baseline = ratio(self.p99_us, baseline.p99_us);
        self.p999_vs_baseline = ratio(self.p999_us, baseline.p999_us);
    }
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

    /// Records the time since `start` and returns now: one clock read per operation
    /// besides the one that starts it.
    pub fn record_since(&mut self, start: Instant) -> Instant {
        let now = Instant::now();
        self.record(now - start);
        now
    }

    pub fn merge(&mut self, other: &Recorder) {
        self.histogram.add(&other.histogram).expect("same bounds");
    }

    pub fn len(&self) -> u64 {
        self.histogram.len()
    }

    pub fn is_empty(&self) -> bool {
        self.histogram.is_empty()
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
            baseline: None,
            p50_vs_baseline: None,
            p99_vs_baseline: None,
            p999_vs_baseline: None,
            records_per_commit: None,
            syncs_per_sec: None,
        }
    }
}

pub fn print_table(rows: &[Measurement]) {
    println!(
        "{:<40} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9}  {:<21}",
        "operation",
        "ops",
        "ops/s",
        "p50 us",
        "p99 us",
        "p999 us",
        "max us",
        "vs base p50/p99/p999"
    );
    for m in rows {
        let ratio = |r: Option<f64>| r.map_or("-".to_owned(), |r| format!("{r:.2}"));
        let ratios = if m.baseline.is_some() {
            format!(
                "{}/{}/{}",
                ratio(m.p50_vs_baseline),
                ratio(m.p99_vs_baseline),
                ratio(m.p999_vs_baseline)
            )
        } else {
            "-".to_owned()
        };
        println!(
            "{:<40} {:>9} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1}  {:<21}",
            m.name, m.ops, m.ops_per_sec, m.p50_us, m.p99_us, m.p999_us, m.max_us, ratios
        );
    }
    for m in rows {
        if let Some(base) = &m.baseline {
            println!("  {}: compared with {}", m.name, base);
        }
        if let (Some(records), Some(syncs)) = (m.records_per_commit, m.syncs_per_sec) {
            println!(
                "  {}: {records:.1} records per group commit, {syncs:.0} fdatasyncs/s",
                m.name
            );
        }
    }
}

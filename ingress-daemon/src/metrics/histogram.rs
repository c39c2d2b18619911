//! A fixed-bucket histogram of durations that the data path updates with plain atomic adds.
//!
//! `prometheus-client`'s own histogram takes a write lock per observation; this one costs two
//! relaxed `fetch_add`s and a short scan of the bounds, and is encoded through the same
//! `prometheus-client` encoder at scrape time.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use prometheus_client::encoding::{MetricEncoder, NoLabelSet};

/// Upper bounds (seconds) for the handshake-phase histograms: 0.5 ms to 10 s.
pub const PHASE_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds (seconds) for flow durations: 10 ms to a day.
pub const FLOW_BOUNDS: &[f64] = &[
    0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21_600.0, 86_400.0,
];

/// Most bounds any histogram here has (the `+Inf` bucket comes on top).
const MAX_BOUNDS: usize = 14;

/// Counts of durations per bucket, and their sum.
#[derive(Debug)]
pub struct DurationHistogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last one is `+Inf`.
    counts: [AtomicU64; MAX_BOUNDS + 1],
    sum_nanos: AtomicU64,
}

impl DurationHistogram {
    /// An empty histogram with `bounds` (seconds, ascending, at most 14).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds: bounds.get(..MAX_BOUNDS.min(bounds.len())).unwrap_or(&[]),
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let seconds = d.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get(bucket) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts
            .iter()
            .take(self.bounds.len() + 1)
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Encodes the histogram (the count is the sum of the buckets read, so they agree).
    pub(crate) fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0); MAX_BOUNDS + 1];
        let mut count = 0;
        let n = self.bounds.len() + 1;
        for (i, slot) in buckets.iter_mut().take(n).enumerate() {
            let value = self.counts.get(i).map_or(0, |c| c.load(Ordering::Relaxed));
            // prometheus-client writes `+Inf` for `f64::MAX`.
            *slot = (self.bounds.get(i).copied().unwrap_or(f64::MAX), value);
            count += value;
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, buckets.get(..n).unwrap_or(&[]), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = DurationHistogram::new(PHASE_BOUNDS);
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_secs(60));
        assert_eq!(h.count(), 3);
        assert_eq!(h.counts[0].load(Ordering::Relaxed), 1);
        assert_eq!(h.counts[1].load(Ordering::Relaxed), 1);
        assert_eq!(h.counts[PHASE_BOUNDS.len()].load(Ordering::Relaxed), 1);
    }
}

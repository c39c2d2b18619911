//! Percentiles of latency samples and medians of repeated runs.
use std::time::Duration;

/// Latency percentiles of one run, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Number of samples.
    pub samples: usize,
}

impl Percentiles {
    /// Percentiles of `samples` (sorted in place); all zero when there are none.
    pub fn of(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        Self {
            p50_us: quantile_us(samples, 0.50),
            p90_us: quantile_us(samples, 0.90),
            p99_us: quantile_us(samples, 0.99),
            p999_us: quantile_us(samples, 0.999),
            samples: samples.len(),
        }
    }

    /// The run-by-run median of each percentile.
    pub fn median(runs: &[Self]) -> Self {
        Self {
            p50_us: median(runs.iter().map(|r| r.p50_us)),
            p90_us: median(runs.iter().map(|r| r.p90_us)),
            p99_us: median(runs.iter().map(|r| r.p99_us)),
            p999_us: median(runs.iter().map(|r| r.p999_us)),
            samples: runs.iter().map(|r| r.samples).sum(),
        }
    }
}

/// The `q` quantile (nearest rank) of sorted `samples`, in microseconds.
pub fn quantile_us(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // The epsilon keeps 0.999 × 1000 from rounding up to rank 1000.
    let rank = (q * sorted.len() as f64 - 1e-9).ceil() as usize;
    let index = rank.clamp(1, sorted.len()) - 1;
    sorted.get(index).map_or(0.0, |d| d.as_nanos() as f64 / 1e3)
}

/// The median of `values` (the mean of the middle two for an even count); 0 when empty.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let mut s: Vec<Duration> = (1..=1000).rev().map(Duration::from_micros).collect();
        let p = Percentiles::of(&mut s);
        assert_eq!(
            (p.p50_us, p.p90_us, p.p99_us, p.p999_us),
            (500.0, 900.0, 990.0, 999.0)
        );
        assert_eq!(Percentiles::of(&mut []).p99_us, 0.0);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median([]), 0.0);
    }
}

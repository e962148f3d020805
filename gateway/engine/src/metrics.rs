//! Histograms a master target keeps over time, for `/metrics` (the gauges and counters are
//! read from a status snapshot when scraped; a distribution must be observed as it happens).

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// RPO buckets, seconds: a second to an hour.
const RPO_BUCKETS: [f64; 12] = [
    0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// The master target's distributions.
#[derive(Debug)]
pub struct Histograms {
    /// Seconds from a record's arrival (journaled) to its application to the replica.
    pub apply_latency: Histogram,
    /// Every replica's RPO, sampled once a second.
    pub rpo: Histogram,
}

impl Default for Histograms {
    fn default() -> Self {
        Histograms {
            // 1 ms doubling to about 2 minutes.
            apply_latency: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            rpo: Histogram::new(RPO_BUCKETS),
        }
    }
}

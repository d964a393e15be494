//! Instruments that must be fed on the hot path. Everything that is already
//! counted elsewhere (table outcomes, queue counters) is read at scrape
//! time instead, so it costs nothing per event.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Histogram buckets from 50 µs to about 26 s, doubling.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandlerLabel {
    pub handler: String,
}

pub type LatencyFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The engine's own instruments; cheap to clone (shared inside).
#[derive(Clone, Debug)]
pub struct EngineMetrics {
    /// Time one attempt of a handler takes, injected delay included.
    pub handler_duration: LatencyFamily<HandlerLabel>,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self {
            handler_duration: Family::new_with_constructor(latency_histogram),
        }
    }
}

//! The engine's counters: plain atomics the daemon renders as Prometheus metrics.

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

/// Upper bounds (inclusive) of the batch latency buckets, in microseconds: one `ovs-ofctl` process
/// takes ~4 ms, a 50,000-flow bundle well under a second.
pub const BATCH_LATENCY_BUCKETS_US: [u64; 10] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 5_000_000,
];

/// A cumulative histogram of batch latencies, Prometheus-style.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// `buckets[i]` counts observations ≤ `BATCH_LATENCY_BUCKETS_US[i]`; the last one is +Inf.
    buckets: [AtomicU64; BATCH_LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BATCH_LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BATCH_LATENCY_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// Cumulative counts per bucket (the last is +Inf), sum in microseconds, count.
    pub fn snapshot(&self) -> (Vec<u64>, u64, u64) {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Relaxed);
                acc
            })
            .collect();
        (
            cumulative,
            self.sum_us.load(Relaxed),
            self.count.load(Relaxed),
        )
    }
}

/// Counters of one engine.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Flows written (adds, including refreshes and reinstalls).
    pub flows_installed: AtomicU64,
    /// Flows deleted by flowd (pod gone, rules changed, stale at reconcile).
    pub flows_removed: AtomicU64,
    /// Desired flows found missing (foreign delete, e.g. an ovn-controller wipe) and written again.
    pub flows_reinstalled: AtomicU64,
    /// Flows OVS removed on their idle or hard timeout, and that flowd forgot.
    pub flows_expired: AtomicU64,
    /// Grants not kept because a cap was reached, in all and per cap (pod, namespace, node).
    pub grants_dropped: AtomicU64,
    pub grants_dropped_pod: AtomicU64,
    pub grants_dropped_namespace: AtomicU64,
    pub grants_dropped_node: AtomicU64,
    /// Flows OVS refused (found by splitting the rejected bundle), dropped so the rest goes through.
    pub flows_rejected: AtomicU64,
    /// Tries to learn the flow template that found nothing usable in OVN's flows.
    pub template_failures: AtomicU64,
    pub batches: AtomicU64,
    pub batch_errors: AtomicU64,
    pub batch_latency: LatencyHistogram,
    pub monitor_restarts: AtomicU64,
    pub reconciles: AtomicU64,
    /// Answers held for a pod not known yet, and those dropped (buffer full or too old).
    pub pending_held: AtomicU64,
    pub pending_dropped: AtomicU64,
}

/// A plain copy of [`Metrics`] plus the engine's gauges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    pub flows_installed: u64,
    pub flows_removed: u64,
    pub flows_reinstalled: u64,
    pub flows_expired: u64,
    pub grants_dropped: u64,
    pub grants_dropped_pod: u64,
    pub grants_dropped_namespace: u64,
    pub grants_dropped_node: u64,
    pub flows_rejected: u64,
    pub template_failures: u64,
    pub batches: u64,
    pub batch_errors: u64,
    /// Cumulative bucket counts matching [`BATCH_LATENCY_BUCKETS_US`], then +Inf.
    pub batch_latency_buckets: Vec<u64>,
    pub batch_latency_sum_us: u64,
    pub batch_latency_count: u64,
    pub monitor_restarts: u64,
    pub reconciles: u64,
    pub pending_held: u64,
    pub pending_dropped: u64,
    /// Gauges: a template learned (1) or not, flows flowd wants now (of which adopted from an earlier
    /// run and not justified since), pods it knows, answers waiting.
    pub template_learned: u64,
    pub flows_desired: u64,
    pub flows_adopted: u64,
    pub pods: u64,
    pub pending: u64,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        let (buckets, sum, count) = self.batch_latency.snapshot();
        MetricsSnapshot {
            flows_installed: self.flows_installed.load(Relaxed),
            flows_removed: self.flows_removed.load(Relaxed),
            flows_reinstalled: self.flows_reinstalled.load(Relaxed),
            flows_expired: self.flows_expired.load(Relaxed),
            grants_dropped: self.grants_dropped.load(Relaxed),
            grants_dropped_pod: self.grants_dropped_pod.load(Relaxed),
            grants_dropped_namespace: self.grants_dropped_namespace.load(Relaxed),
            grants_dropped_node: self.grants_dropped_node.load(Relaxed),
            flows_rejected: self.flows_rejected.load(Relaxed),
            template_failures: self.template_failures.load(Relaxed),
            batches: self.batches.load(Relaxed),
            batch_errors: self.batch_errors.load(Relaxed),
            batch_latency_buckets: buckets,
            batch_latency_sum_us: sum,
            batch_latency_count: count,
            monitor_restarts: self.monitor_restarts.load(Relaxed),
            reconciles: self.reconciles.load(Relaxed),
            pending_held: self.pending_held.load(Relaxed),
            pending_dropped: self.pending_dropped.load(Relaxed),
            template_learned: 0,
            flows_desired: 0,
            flows_adopted: 0,
            pods: 0,
            pending: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(900));
        h.observe(Duration::from_millis(7));
        h.observe(Duration::from_secs(60));
        let (b, sum, count) = h.snapshot();
        assert_eq!(count, 3);
        assert_eq!(sum, 900 + 7_000 + 60_000_000);
        assert_eq!(b[0], 1);
        assert_eq!(b[3], 2, "≤ 10 ms");
        assert_eq!(*b.last().unwrap(), 3);
    }
}

//! The engine's metrics: counters and a histogram the core and the engine move, registered once in
//! flowd's registry, and the gauges read from the engine's state at each scrape.

use super::Engine;
use crate::{metrics::Registry, ovs::FlowProgrammer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::Counter, gauge::ConstGauge, histogram::Histogram},
    registry::Unit,
};
use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

/// Upper bounds of the batch latency buckets, in seconds: one `ovs-ofctl` process takes ~4 ms, a
/// 50,000-flow bundle well under a second.
pub const BATCH_SECONDS_BUCKETS: [f64; 10] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// Counters of one engine.
#[derive(Debug)]
pub struct Metrics {
    /// Flows written (adds, including refreshes and reinstalls).
    pub flows_installed: Counter,
    /// Flows deleted by flowd (pod gone, rules changed, stale at reconcile).
    pub flows_removed: Counter,
    /// Desired flows found missing (foreign delete, e.g. an ovn-controller wipe) and written again.
    pub flows_reinstalled: Counter,
    /// Flows OVS removed on their idle or hard timeout, and that flowd forgot.
    pub flows_expired: Counter,
    /// Grants not kept because a cap was reached, in all and per cap (pod, namespace, node).
    pub grants_dropped: Counter,
    pub grants_dropped_pod: Counter,
    pub grants_dropped_namespace: Counter,
    pub grants_dropped_node: Counter,
    /// Flows OVS refused (found by splitting the rejected bundle), dropped so the rest goes through.
    pub flows_rejected: Counter,
    /// Tries to learn the flow template that found nothing usable in OVN's flows.
    pub template_failures: Counter,
    pub batches: Counter,
    pub batch_errors: Counter,
    /// Seconds per bundle.
    pub batch_latency: Histogram,
    /// The time all bundles took, in microseconds, for [`MetricsSnapshot`] (a histogram does not
    /// give its sum back; `/metrics` shows it as `dnsflow_ovs_batch_seconds_sum`).
    batch_micros: AtomicU64,
    pub monitor_restarts: Counter,
    pub reconciles: Counter,
    /// Answers held for a pod not known yet, and those dropped (buffer full or too old).
    pub pending_held: Counter,
    pub pending_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            flows_installed: Counter::default(),
            flows_removed: Counter::default(),
            flows_reinstalled: Counter::default(),
            flows_expired: Counter::default(),
            grants_dropped: Counter::default(),
            grants_dropped_pod: Counter::default(),
            grants_dropped_namespace: Counter::default(),
            grants_dropped_node: Counter::default(),
            flows_rejected: Counter::default(),
            template_failures: Counter::default(),
            batches: Counter::default(),
            batch_errors: Counter::default(),
            batch_latency: Histogram::new(BATCH_SECONDS_BUCKETS),
            batch_micros: AtomicU64::new(0),
            monitor_restarts: Counter::default(),
            reconciles: Counter::default(),
            pending_held: Counter::default(),
            pending_dropped: Counter::default(),
        }
    }
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
    /// Time spent in the `batches`.
    pub batch_latency_sum_us: u64,
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
    pub fn add(counter: &Counter, n: usize) {
        counter.inc_by(n as u64);
    }

    /// One bundle applied (or not), in `took`.
    pub fn batch(&self, took: Duration, ok: bool) {
        self.batch_latency.observe(took.as_secs_f64());
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.batch_micros.fetch_add(micros, Relaxed);
        self.batches.inc();
        if !ok {
            self.batch_errors.inc();
        }
    }

    /// Registers the counters and the histogram, under the names `/metrics` shows without `dnsflow_`.
    pub fn register(&self, registry: &mut Registry) {
        let counters = [
            (
                "flows_installed",
                "Flows written to OVS (new, refreshed or reinstalled)",
                &self.flows_installed,
            ),
            (
                "flows_removed",
                "Flows deleted by flowd (pod gone, rules changed, stale)",
                &self.flows_removed,
            ),
            (
                "flows_reinstalled",
                "Wanted flows found deleted by someone else and written again",
                &self.flows_reinstalled,
            ),
            (
                "flows_expired",
                "Flows OVS removed on their idle or hard timeout",
                &self.flows_expired,
            ),
            (
                "flows_rejected",
                "Flows OVS refused; dropped so that the rest of their bundle went through",
                &self.flows_rejected,
            ),
            (
                "grants_dropped",
                "Grants not kept because a cap was reached (any of the pod, namespace and node caps)",
                &self.grants_dropped,
            ),
            (
                "grants_dropped_pod_cap",
                "Grants not kept because the pod holds --max-grants-per-pod flows",
                &self.grants_dropped_pod,
            ),
            (
                "grants_dropped_namespace_cap",
                "Grants not kept because the namespace holds --max-grants-per-namespace flows",
                &self.grants_dropped_namespace,
            ),
            (
                "grants_dropped_node_cap",
                "Grants not kept because the node holds the node-wide maximum of flows",
                &self.grants_dropped_node,
            ),
            (
                "template_failures",
                "Tries to learn from OVN's flows what a grant must look like that found nothing usable",
                &self.template_failures,
            ),
            ("ovs_batches", "ovs-ofctl bundles applied", &self.batches),
            (
                "ovs_batch_errors",
                "ovs-ofctl bundles that failed",
                &self.batch_errors,
            ),
            (
                "monitor_restarts",
                "Restarts of the OVS flow monitor",
                &self.monitor_restarts,
            ),
            (
                "reconciles",
                "Full reconciles against dump-flows",
                &self.reconciles,
            ),
            (
                "pending_answers_held",
                "Answers held for a pod flowd did not know yet",
                &self.pending_held,
            ),
            (
                "pending_answers_dropped",
                "Held answers dropped (too old, or the buffer was full)",
                &self.pending_dropped,
            ),
        ];
        for (name, help, counter) in counters {
            registry.counter(name, help, counter);
        }
        registry.register_with_unit(
            "ovs_batch",
            "Time to apply one ovs-ofctl bundle",
            Unit::Seconds,
            self.batch_latency.clone(),
        );
    }

    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            flows_installed: self.flows_installed.get(),
            flows_removed: self.flows_removed.get(),
            flows_reinstalled: self.flows_reinstalled.get(),
            flows_expired: self.flows_expired.get(),
            grants_dropped: self.grants_dropped.get(),
            grants_dropped_pod: self.grants_dropped_pod.get(),
            grants_dropped_namespace: self.grants_dropped_namespace.get(),
            grants_dropped_node: self.grants_dropped_node.get(),
            flows_rejected: self.flows_rejected.get(),
            template_failures: self.template_failures.get(),
            batches: self.batches.get(),
            batch_errors: self.batch_errors.get(),
            batch_latency_sum_us: self.batch_micros.load(Relaxed),
            monitor_restarts: self.monitor_restarts.get(),
            reconciles: self.reconciles.get(),
            pending_held: self.pending_held.get(),
            pending_dropped: self.pending_dropped.get(),
            template_learned: 0,
            flows_desired: 0,
            flows_adopted: 0,
            pods: 0,
            pending: 0,
        }
    }
}

/// The engine's gauges: sizes of its state, read (under its lock) when `/metrics` is scraped.
pub(super) struct Gauges<P>(pub(super) Engine<P>);

impl<P> std::fmt::Debug for Gauges<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Gauges").field(&self.0).finish()
    }
}

impl<P: FlowProgrammer> Collector for Gauges<P> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = self.0.metrics_snapshot();
        let gauges = [
            (
                "template_learned",
                "1 once flowd has learned from OVN's flows what a grant must look like.",
                m.template_learned,
            ),
            (
                "grants",
                "Flows flowd wants in OVS now (one per grant).",
                m.flows_desired,
            ),
            (
                "grants_adopted",
                "Of those, flows found in OVS at start and not justified by an answer since.",
                m.flows_adopted,
            ),
            ("pods", "Pods of this node flowd knows.", m.pods),
            (
                "pending_answers",
                "Answers waiting for their pod to be known.",
                m.pending,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

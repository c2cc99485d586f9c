//! flowd's Prometheus metrics and probes: `/metrics` (text format 0.0.4), `/healthz` (the process
//! serves) and `/readyz` (pods, EgressFirewalls and this node have been listed in full; until then the
//! DaemonSet's readiness probe fails and a rolling update waits).

use crate::{
    engine::{Engine, MetricsSnapshot, BATCH_LATENCY_BUCKETS_US},
    ovs::FlowProgrammer,
    status::Status,
};
use std::{
    fmt::Write as _,
    future::Future,
    sync::{atomic::Ordering::Relaxed, Arc},
};
use tokio::net::TcpListener;

/// What the metrics are read from.
#[derive(Debug)]
pub struct Sources<P> {
    pub engine: Engine<P>,
    pub status: Arc<Status>,
}

impl<P> Clone for Sources<P> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            status: self.status.clone(),
        }
    }
}

/// Every counter, by its Prometheus name without the `_total` suffix (the `Stats` RPC shows the same).
pub fn counters(m: &MetricsSnapshot, status: &Status) -> Vec<(&'static str, u64)> {
    let up = &status.upstream;
    vec![
        ("dnsflow_dns_events", status.dns_events.load(Relaxed)),
        ("dnsflow_tapd_events_replayed", up.replayed.load(Relaxed)),
        ("dnsflow_tapd_events_invalid", up.invalid.load(Relaxed)),
        ("dnsflow_tapd_connects", up.connects.load(Relaxed)),
        ("dnsflow_tapd_failures", up.failures.load(Relaxed)),
        ("dnsflow_flows_installed", m.flows_installed),
        ("dnsflow_flows_removed", m.flows_removed),
        ("dnsflow_flows_reinstalled", m.flows_reinstalled),
        ("dnsflow_flows_expired", m.flows_expired),
        ("dnsflow_flows_rejected", m.flows_rejected),
        ("dnsflow_grants_dropped", m.grants_dropped),
        ("dnsflow_grants_dropped_pod_cap", m.grants_dropped_pod),
        (
            "dnsflow_grants_dropped_namespace_cap",
            m.grants_dropped_namespace,
        ),
        ("dnsflow_grants_dropped_node_cap", m.grants_dropped_node),
        ("dnsflow_template_failures", m.template_failures),
        ("dnsflow_ovs_batches", m.batches),
        ("dnsflow_ovs_batch_errors", m.batch_errors),
        ("dnsflow_monitor_restarts", m.monitor_restarts),
        ("dnsflow_reconciles", m.reconciles),
        ("dnsflow_pending_answers_held", m.pending_held),
        ("dnsflow_pending_answers_dropped", m.pending_dropped),
        ("dnsflow_watch_errors", status.watch.errors.load(Relaxed)),
        ("dnsflow_watch_lists", status.watch.lists.load(Relaxed)),
        (
            "dnsflow_invalid_egressfirewalls",
            status.invalid_firewalls.load(Relaxed),
        ),
    ]
}

const HELP: &[(&str, &str)] = &[
    (
        "dnsflow_dns_events",
        "DNS answers from tapd handed to the engine.",
    ),
    (
        "dnsflow_tapd_events_replayed",
        "Answers received from a tapd's replay of recent answers.",
    ),
    (
        "dnsflow_tapd_events_invalid",
        "Events from tapd that were not valid answers (dropped).",
    ),
    (
        "dnsflow_tapd_connects",
        "Subscriptions to a tapd established (connects and reconnects).",
    ),
    (
        "dnsflow_tapd_failures",
        "Subscriptions to a tapd that failed to connect or broke.",
    ),
    (
        "dnsflow_flows_installed",
        "Flows written to OVS (new, refreshed or reinstalled).",
    ),
    (
        "dnsflow_flows_removed",
        "Flows deleted by flowd (pod gone, rules changed, stale).",
    ),
    (
        "dnsflow_flows_reinstalled",
        "Wanted flows found deleted by someone else and written again.",
    ),
    (
        "dnsflow_flows_expired",
        "Flows OVS removed on their idle or hard timeout.",
    ),
    (
        "dnsflow_flows_rejected",
        "Flows OVS refused; dropped so that the rest of their bundle went through.",
    ),
    (
        "dnsflow_grants_dropped",
        "Grants not kept because a cap was reached (any of the three below).",
    ),
    (
        "dnsflow_grants_dropped_pod_cap",
        "Grants not kept because the pod holds --max-grants-per-pod flows.",
    ),
    (
        "dnsflow_grants_dropped_namespace_cap",
        "Grants not kept because the namespace holds --max-grants-per-namespace flows.",
    ),
    (
        "dnsflow_grants_dropped_node_cap",
        "Grants not kept because the node holds the node-wide maximum of flows.",
    ),
    (
        "dnsflow_template_failures",
        "Tries to learn from OVN's flows what a grant must look like that found nothing usable.",
    ),
    ("dnsflow_ovs_batches", "ovs-ofctl bundles applied."),
    ("dnsflow_ovs_batch_errors", "ovs-ofctl bundles that failed."),
    (
        "dnsflow_monitor_restarts",
        "Restarts of the OVS flow monitor.",
    ),
    ("dnsflow_reconciles", "Full reconciles against dump-flows."),
    (
        "dnsflow_pending_answers_held",
        "Answers held for a pod flowd did not know yet.",
    ),
    (
        "dnsflow_pending_answers_dropped",
        "Held answers dropped (too old, or the buffer was full).",
    ),
    (
        "dnsflow_watch_errors",
        "Kubernetes watch or list errors (each followed by a backoff).",
    ),
    (
        "dnsflow_watch_lists",
        "Full Kubernetes lists (first sync and relists).",
    ),
    (
        "dnsflow_invalid_egressfirewalls",
        "EgressFirewalls skipped as invalid.",
    ),
];

fn help(name: &str) -> &'static str {
    HELP.iter().find(|(n, _)| *n == name).map_or("", |(_, h)| h)
}

/// The whole `/metrics` page.
pub fn render<P: FlowProgrammer>(sources: &Sources<P>) -> String {
    let m = sources.engine.metrics_snapshot();
    let status = &sources.status;
    let mut out = String::with_capacity(4096);
    for (name, value) in counters(&m, status) {
        let _ = writeln!(
            out,
            "# HELP {name}_total {}\n# TYPE {name}_total counter\n{name}_total {value}",
            help(name)
        );
    }
    let gauges = [
        (
            "dnsflow_ready",
            "1 once pods, EgressFirewalls and this node are listed.",
            u64::from(status.is_ready()),
        ),
        (
            "dnsflow_template_learned",
            "1 once flowd has learned from OVN's flows what a grant must look like.",
            m.template_learned,
        ),
        (
            "dnsflow_tapd_connections",
            "tapd subscriptions streaming now.",
            status.upstream.connected.load(Relaxed),
        ),
        (
            "dnsflow_grants",
            "Flows flowd wants in OVS now (one per grant).",
            m.flows_desired,
        ),
        (
            "dnsflow_grants_adopted",
            "Of those, flows found in OVS at start and not justified by an answer since.",
            m.flows_adopted,
        ),
        ("dnsflow_pods", "Pods of this node flowd knows.", m.pods),
        (
            "dnsflow_pending_answers",
            "Answers waiting for their pod to be known.",
            m.pending,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    let name = "dnsflow_ovs_batch_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time to apply one ovs-ofctl bundle.\n# TYPE {name} histogram"
    );
    for (le, count) in BATCH_LATENCY_BUCKETS_US
        .iter()
        .map(|us| format!("{}", *us as f64 / 1e6))
        .chain(std::iter::once("+Inf".to_string()))
        .zip(&m.batch_latency_buckets)
    {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {count}");
    }
    let _ = writeln!(
        out,
        "{name}_sum {}\n{name}_count {}",
        m.batch_latency_sum_us as f64 / 1e6,
        m.batch_latency_count
    );
    out
}

impl<P: FlowProgrammer> tapd::http::Exposition for Sources<P> {
    fn render(&self) -> String {
        render(self)
    }

    fn readiness(&self) -> Result<(), String> {
        if !self.status.is_ready() {
            return Err("waiting for the first list of pods, EgressFirewalls and this node".into());
        }
        match self.engine.blocked() {
            Some(why) => Err(format!("grants wait, installing nothing: {why}")),
            None => Ok(()),
        }
    }

    fn liveness(&self) -> Result<(), String> {
        self.engine.stalled().map_or(Ok(()), Err)
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
pub async fn serve<P: FlowProgrammer>(
    listener: TcpListener,
    sources: Sources<P>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tapd::http::serve_http(listener, Arc::new(sources), shutdown).await
}

//! flowd's metrics and probes: `/metrics` (OpenMetrics text), `/healthz` (batches reach OVS) and
//! `/readyz` (pods, EgressFirewalls, nodes and OVN-K's ConfigMap have been listed in full, the cluster's
//! networks are known and nothing blocks the grants; until then the DaemonSet's readiness probe fails
//! and a rolling update waits).
//!
//! Each part defines its metrics where it moves them, as a struct of typed handles with a `register`
//! method: the engine's ([`crate::engine::Metrics`], and the gauges it reads from its state), its flow
//! programmer's, the cluster watches' ([`crate::watch::WatchStats`]), the tapd subscriptions'
//! ([`crate::upstream::UpstreamStats`]) and the node loop's ([`Status`]). [`registry`] gathers them
//! once per daemon, under the `dnsflow_` prefix; `/metrics` and the `Stats` RPC both read it. A metric
//! is added in its part's struct and `register`, and in `deploy/README.md`.

use crate::{engine::Engine, ovs::FlowProgrammer, status::Status};
use prometheus_client::{
    collector::Collector,
    metrics::counter::Counter,
    registry::{Metric, Unit},
};
use std::{future::Future, sync::Arc};
use tokio::net::TcpListener;

/// The prefix of every flowd metric: `dnsflow_ready`, `dnsflow_flows_installed_total`...
pub const PREFIX: &str = "dnsflow";

/// flowd's one registry. It also keeps each counter by name, for the `Stats` RPC.
#[derive(Debug)]
pub struct Registry {
    registry: prometheus_client::registry::Registry,
    counters: Vec<(String, Counter)>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            registry: prometheus_client::registry::Registry::with_prefix(PREFIX),
            counters: Vec::new(),
        }
    }
}

impl Registry {
    /// Registers a counter: `name` without the prefix and without `_total`, which the encoding adds.
    pub fn counter(&mut self, name: &str, help: &str, counter: &Counter) {
        self.registry.register(name, help, counter.clone());
        self.counters
            .push((format!("{PREFIX}_{name}"), counter.clone()));
    }

    /// Registers any other metric (a gauge, a histogram) under `name`, without the prefix.
    pub fn register(&mut self, name: &str, help: &str, metric: impl Metric) {
        self.registry.register(name, help, metric);
    }

    /// Registers a metric whose name ends in its unit (`_seconds`), which the encoding appends to `name`.
    pub fn register_with_unit(&mut self, name: &str, help: &str, unit: Unit, metric: impl Metric) {
        self.registry.register_with_unit(name, help, unit, metric);
    }

    /// Registers metrics read from some state at each scrape; their names get the prefix too.
    pub fn collector(&mut self, collector: impl Collector) {
        self.registry.register_collector(Box::new(collector));
    }

    /// Every counter's value, by its name without `_total` (`dnsflow_dns_events`), as `Stats` shows them.
    pub fn counters(&self) -> impl Iterator<Item = (&str, u64)> {
        self.counters
            .iter()
            .map(|(name, c)| (name.as_str(), c.get()))
    }

    /// What `/metrics` encodes.
    pub fn registry(&self) -> &prometheus_client::registry::Registry {
        &self.registry
    }
}

/// flowd's registry: every metric of every part, registered once.
pub fn registry<P: FlowProgrammer>(engine: &Engine<P>, status: &Status) -> Registry {
    let mut registry = Registry::default();
    status.register(&mut registry);
    status.upstream.register(&mut registry);
    engine.register_metrics(&mut registry);
    status.watch.register(&mut registry);
    registry
}

/// What `/metrics`, `/healthz` and `/readyz` read.
#[derive(Debug)]
pub struct Sources<P> {
    pub engine: Engine<P>,
    pub status: Arc<Status>,
    pub registry: Arc<Registry>,
}

impl<P> Clone for Sources<P> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            status: self.status.clone(),
            registry: self.registry.clone(),
        }
    }
}

impl<P: FlowProgrammer> dnsflow_runtime::http::Exposition for Sources<P> {
    fn registry(&self) -> &prometheus_client::registry::Registry {
        self.registry.registry()
    }

    fn readiness(&self) -> Result<(), String> {
        // What blocks every grant comes first: it may also be why the lists are not complete (an
        // RBAC error on OVN-K's ConfigMap).
        if let Some(why) = self.engine.blocked() {
            return Err(format!("grants wait, installing nothing: {why}"));
        }
        if !self.status.is_ready() {
            return Err(self.status.unsynced().unwrap_or_else(|| {
                "waiting for the first list of pods, EgressFirewalls, nodes, OVN-K's ConfigMap and \
                 the DNS Service"
                    .into()
            }));
        }
        Ok(())
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
    dnsflow_runtime::http::serve_http(listener, Arc::new(sources), shutdown).await
}

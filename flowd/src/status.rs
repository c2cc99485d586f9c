//! What the parts of `flowd run` share about its state: readiness, counters, and what is known of the
//! cluster beyond the engine. The node loop ([`crate::daemon`]) writes it; the gRPC API ([`crate::api`])
//! and the metrics endpoint ([`crate::metrics`]) read it.

use crate::{
    hold::HoldReport,
    metrics::Registry,
    model::{PodInfo, PodKey},
    rules::FirewallRules,
    upstream::UpstreamStats,
    watch::WatchStats,
};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};
use tokio::sync::watch as signal;

/// What the cluster looks like to flowd beyond the engine: the rules per namespace and the pods, for
/// `Explain`.
#[derive(Debug, Default)]
pub struct Known {
    pub rules: HashMap<String, Arc<FirewallRules>>,
    /// Namespaces whose EgressFirewall `default` is invalid, with what is wrong with it: they get no
    /// grants.
    pub invalid: HashMap<String, String>,
    /// This node's pods that can hold grants.
    pub pods: BTreeMap<PodKey, PodInfo>,
}

/// Readiness, counters, and what the API needs to explain decisions; shared by every part.
#[derive(Debug)]
pub struct Status {
    /// Set by the node loop once the first full sync is done ([`Status::set_ready`]).
    ready: signal::Sender<bool>,
    /// The same, for `/metrics`.
    ready_gauge: Gauge,
    pub watch: Arc<WatchStats>,
    pub upstream: Arc<UpstreamStats>,
    /// EgressFirewalls flowd could not use (each logged; an invalid `default` leaves its namespace
    /// without grants).
    pub invalid_firewalls: Counter,
    /// DNS answers handed to the engine.
    pub dns_events: Counter,
    /// 1 once OVN-K's configuration told the cluster's networks (nothing is installed before).
    pub networks_known: Gauge,
    /// Versions of OVN-K's ConfigMap flowd could not read the networks from.
    pub invalid_ovn_configs: Counter,
    pub known: Mutex<Known>,
    /// Whether DNS responses are held, and for which pods.
    pub hold: Arc<HoldReport>,
    /// Why flowd is not ready although it has waited long enough (the cluster could not be listed
    /// within `--sync-timeout`).
    unsynced: Mutex<Option<String>>,
    /// How many DNS servers flowd trusts now (the DNS Service's addresses and `--trusted-resolver`).
    pub trusted_resolvers: Gauge,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            ready: signal::channel(false).0,
            ready_gauge: Gauge::default(),
            watch: Arc::default(),
            upstream: Arc::default(),
            invalid_firewalls: Counter::default(),
            dns_events: Counter::default(),
            networks_known: Gauge::default(),
            invalid_ovn_configs: Counter::default(),
            known: Mutex::default(),
            hold: Arc::default(),
            unsynced: Mutex::default(),
            trusted_resolvers: Gauge::default(),
        }
    }
}

impl Status {
    /// A new status whose hold is `hold` (off unless given).
    pub fn with_hold(hold: Arc<HoldReport>) -> Self {
        Self {
            hold,
            ..Self::default()
        }
    }

    /// Pods, EgressFirewalls, nodes, OVN-K's ConfigMap and the DNS Service have each been listed in
    /// full.
    pub(crate) fn set_ready(&self) {
        *self.unsynced.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.ready_gauge.set(1);
        self.ready.send_replace(true);
    }

    /// The DNS servers flowd trusts now.
    pub(crate) fn set_trusted(&self, resolvers: &crate::resolvers::ResolverSet) {
        self.trusted_resolvers
            .set(i64::try_from(resolvers.len()).unwrap_or(i64::MAX));
    }

    /// The cluster has not been listed within the time flowd gives it, for this reason.
    pub(crate) fn set_unsynced(&self, why: String) {
        *self.unsynced.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// Why flowd gave up waiting for the first full list, if it did.
    pub fn unsynced(&self) -> Option<String> {
        self.unsynced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// True once pods, EgressFirewalls, nodes, OVN-K's ConfigMap and the DNS Service have each been
    /// listed in full.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Follows readiness.
    pub fn ready_changes(&self) -> signal::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Registers the node loop's metrics (the watches' and the subscriptions' have their own).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ready",
            "1 once pods, EgressFirewalls, nodes, OVN-Kubernetes's ConfigMap and the DNS Service are listed",
            self.ready_gauge.clone(),
        );
        registry.register(
            "trusted_resolvers",
            "DNS servers whose replies flowd holds and learns from (the DNS Service's ClusterIPs and ports, --trusted-resolver)",
            self.trusted_resolvers.clone(),
        );
        registry.counter(
            "dns_events",
            "DNS answers from tapd handed to the engine",
            &self.dns_events,
        );
        registry.register(
            "cluster_networks_known",
            "1 once OVN-Kubernetes's configuration told the cluster's pod and service subnets",
            self.networks_known.clone(),
        );
        registry.counter(
            "invalid_ovn_configs",
            "Versions of OVN-Kubernetes's ConfigMap whose networks could not be read",
            &self.invalid_ovn_configs,
        );
        registry.counter(
            "invalid_egressfirewalls",
            "EgressFirewalls skipped as invalid",
            &self.invalid_firewalls,
        );
    }

    /// What is known of the cluster, locked (a panic while it was held leaves it as it was).
    pub fn known(&self) -> MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }
}

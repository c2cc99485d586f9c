//! `flowd run`: the node daemon. Kubernetes state ([`crate::watch`]), the DNS replies it holds in
//! br-int ([`crate::hold`], trusting the DNS Service's addresses, [`crate::resolvers`]) and, unless
//! `--tapd=false`, the answers of every tapd ([`crate::upstream`]) drive the engine as they arrive;
//! the engine keeps `br-int` equal to what they justify. The gRPC API ([`crate::api`]) and the
//! metrics/probe endpoint ([`crate::metrics`]) read the same state.

use crate::{
    api,
    cluster::{node_subnets, pod_info, NodeExclusions},
    config::{OvsDriver, RunArgs, UpstreamArgs},
    engine::Engine,
    hold::{HoldFlows, HoldRate, HoldReport, Holder},
    metrics,
    model::PodKey,
    ovnkube::{self, ClusterNetworks, ObjectRef},
    ovs::{FlowProgrammer, Native, Ofctl},
    resolvers::{service_resolvers, TrustedResolvers},
    rules::{FirewallRules, EGRESS_FIREWALL_NAME},
    status::Status,
    upstream::{DnsPods, Upstreams},
    watch::{self, Change, ClusterEvent, SyncState},
};
use futures::StreamExt as _;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use std::{
    future::Future,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::{mpsc, watch as signal};

/// DNS answers queued from the tapd subscriptions to the engine; beyond this the gRPC streams wait.
const EVENT_QUEUE: usize = 8192;

/// What the node loop needs of the configuration.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node: String,
    /// Overrides the node's own pod subnets when not empty.
    pub pod_subnets: Vec<IpNet>,
    /// OVN-K's ConfigMap with the cluster's networks.
    pub ovn_config: ObjectRef,
    /// The cluster's DNS Service: its ClusterIPs are the DNS servers flowd believes.
    pub dns_service: ObjectRef,
    /// How long the first full list may take before the flows of an earlier run are removed.
    pub sync_timeout: Duration,
    /// Where what the pods were told is kept across restarts (see [`crate::persist`]).
    pub state_file: Option<std::path::PathBuf>,
    pub upstream: UpstreamArgs,
}

/// What flowd discovers about the cluster: its own addresses, none of which an answer may open
/// (every Node's subnets and addresses, and the networks OVN-K's configuration names), and the DNS
/// servers it believes (the DNS Service's addresses).
#[derive(Debug)]
pub struct Discovered {
    source: ObjectRef,
    nodes: NodeExclusions,
    config: Option<ClusterNetworks>,
    /// The ConfigMap has been seen (valid or not) since the last list.
    seen: bool,
    dns_service: ObjectRef,
    resolvers: TrustedResolvers,
    /// The DNS Service has been seen since the last list.
    dns_seen: bool,
}

impl Discovered {
    /// Reads the networks from OVN-K's ConfigMap `source`; trusts no DNS server until
    /// [`Discovered::trusting`] says which.
    pub fn new(source: ObjectRef) -> Self {
        Self {
            source,
            nodes: NodeExclusions::default(),
            config: None,
            seen: false,
            dns_service: crate::resolvers::UPSTREAM_DNS_SERVICE
                .parse()
                .expect("a valid namespace/name"),
            resolvers: TrustedResolvers::new(&[]),
            dns_seen: false,
        }
    }

    /// Trusts the addresses of the DNS Service `dns_service` too, as they change, into `resolvers`.
    pub fn trusting(mut self, dns_service: ObjectRef, resolvers: TrustedResolvers) -> Self {
        self.dns_service = dns_service;
        self.resolvers = resolvers;
        self
    }

    /// Applies a change of the DNS Service: its addresses are trusted from now on, instead of the
    /// ones before. A Service that is gone, or whose replies cannot be told apart (headless), leaves
    /// only `--trusted-resolver`'s: replies are then learned from tapd only.
    fn apply_dns_service(
        &mut self,
        status: &Status,
        change: Change<k8s_openapi::api::core::v1::Service>,
    ) {
        let service = &self.dns_service;
        let addrs = match change {
            Change::Applied(svc) => {
                self.dns_seen = true;
                match service_resolvers(&svc) {
                    Ok(addrs) => addrs,
                    Err(error) => {
                        tracing::error!(%service, %error,
                            "the DNS Service gives no address flowd can trust; DNS replies in br-int are neither held nor learned from it");
                        Vec::new()
                    }
                }
            }
            Change::Deleted(_) => {
                self.dns_seen = false;
                tracing::warn!(%service, "the DNS Service was deleted; its addresses are no longer trusted");
                Vec::new()
            }
            Change::Synced if !self.dns_seen => {
                tracing::error!(%service,
                    "the DNS Service does not exist (--dns-service names it); DNS replies in br-int are neither held nor learned from it");
                Vec::new()
            }
            Change::Synced => return,
        };
        let (changed, beyond) = self.resolvers.set_service(addrs);
        if let Some(warning) = beyond {
            tracing::warn!(%service, "{warning}");
        }
        let trusted = self.resolvers.current();
        status.set_trusted(&trusted);
        if changed {
            tracing::info!(%service, resolvers = %trusted, "trusted DNS resolvers");
        }
    }

    /// Why nothing may be installed before the configuration has been read.
    pub fn waiting(&self) -> String {
        format!(
            "waiting for OVN-Kubernetes's ConfigMap {} (the cluster's pod and service subnets)",
            self.source
        )
    }

    fn publish<P: FlowProgrammer>(&self, engine: &Engine<P>) {
        let config = self
            .config
            .as_ref()
            .map(ClusterNetworks::all)
            .unwrap_or_default();
        let all = crate::cluster::union([&self.nodes.all(), &config]);
        tracing::debug!(excluded = all.len(), "destinations discovered");
        engine.set_discovered_exclusions(all);
    }

    /// Applies a change of OVN-K's ConfigMap. The networks, once read, are kept when the object turns
    /// unreadable or goes: they do not change under a running cluster, and forgetting them would
    /// stop every grant.
    fn apply_config<P: FlowProgrammer>(
        &mut self,
        engine: &Engine<P>,
        status: &Status,
        change: Change<k8s_openapi::api::core::v1::ConfigMap>,
    ) {
        let source = &self.source;
        match change {
            Change::Applied(cm) => {
                self.seen = true;
                match ovnkube::networks(&cm) {
                    Ok(found) if self.config.as_ref() == Some(&found) => {}
                    Ok(found) => {
                        tracing::info!(%source, networks = %found,
                            "the cluster's networks, from OVN-Kubernetes's configuration");
                        self.config = Some(found);
                        self.publish(engine);
                        status.networks_known.set(1);
                        engine.set_networks_unknown(None);
                    }
                    Err(error) => {
                        status.invalid_ovn_configs.inc();
                        if self.config.is_some() {
                            tracing::warn!(%source, %error,
                                "OVN-Kubernetes's ConfigMap cannot be read; keeping the networks read before");
                        } else {
                            tracing::error!(%source, %error,
                                "OVN-Kubernetes's ConfigMap cannot be read; installing nothing");
                            engine.set_networks_unknown(Some(format!(
                                "OVN-Kubernetes's ConfigMap {source} does not tell the cluster's networks: {error}"
                            )));
                        }
                    }
                }
            }
            Change::Deleted(_) => {
                self.seen = false;
                tracing::warn!(%source, known = self.config.is_some(),
                    "OVN-Kubernetes's ConfigMap deleted; keeping the networks read before, if any");
            }
            Change::Synced if !self.seen && self.config.is_none() => {
                tracing::error!(%source, "OVN-Kubernetes's ConfigMap does not exist; installing nothing");
                engine.set_networks_unknown(Some(format!(
                    "OVN-Kubernetes's ConfigMap {source} does not exist: without the cluster's \
                     service subnet flowd cannot tell a Service from the internet (--ovn-config names it)"
                )));
            }
            Change::Synced => {}
        }
    }
}

/// Applies one cluster change to the engine (and to what the API knows). Returns this node's pod
/// subnets when the change revealed them.
fn apply_cluster_event<P: FlowProgrammer>(
    engine: &Engine<P>,
    status: &Status,
    node: &str,
    discovered: &mut Discovered,
    event: ClusterEvent,
) -> Option<Vec<IpNet>> {
    // Every node's pod, join and transit subnets and addresses: never a destination of a grant.
    if let ClusterEvent::Node(Change::Applied(n) | Change::Deleted(n)) = &event {
        let deleted = matches!(event, ClusterEvent::Node(Change::Deleted(_)));
        if discovered.nodes.apply(n, deleted).is_some() {
            discovered.publish(engine);
        }
    }
    match event {
        ClusterEvent::OvnConfig(change) => discovered.apply_config(engine, status, change),
        ClusterEvent::DnsService(change) => discovered.apply_dns_service(status, change),
        ClusterEvent::Pod(Change::Applied(pod)) => match pod_info(&pod) {
            Ok(info) => {
                status.known().pods.insert(info.key.clone(), info.clone());
                engine.upsert_pod(info);
            }
            Err(skip) => {
                // Finished, host-network or IP-less: it must hold no grant (its IP may be reused).
                tracing::debug!(reason = %skip, "pod gets no grants");
                let key = pod_key(&pod);
                status.known().pods.remove(&key);
                engine.remove_pod(&key);
            }
        },
        ClusterEvent::Pod(Change::Deleted(pod)) => {
            let key = pod_key(&pod);
            tracing::debug!(pod = %key, "pod deleted");
            status.known().pods.remove(&key);
            engine.remove_pod(&key);
        }
        ClusterEvent::Firewall(Change::Applied(ef)) => {
            let namespace = ef.namespace().unwrap_or_default();
            match FirewallRules::from_egress_firewall(&ef) {
                Ok(rules) => {
                    let count = rules.rules.len();
                    let mut known = status.known();
                    known.invalid.remove(&namespace);
                    known
                        .rules
                        .insert(namespace.clone(), Arc::new(rules.clone()));
                    drop(known);
                    // OVN-K writes the status once per zone: only a change of the rules counts.
                    if engine.set_rules(rules) {
                        tracing::info!(%namespace, rules = count, "EgressFirewall applied");
                    } else {
                        tracing::debug!(%namespace, "EgressFirewall updated; rules unchanged");
                    }
                }
                Err(error) => {
                    status.invalid_firewalls.inc();
                    match error.invalid_namespace() {
                        Some(namespace) => {
                            // OVN-K rejects such an object too; granting nothing is the safe reading.
                            tracing::warn!(%namespace, name = %ef.name_any(), %error,
                                "invalid EgressFirewall skipped; the namespace gets no grants");
                            let mut known = status.known();
                            known.rules.remove(namespace);
                            known.invalid.insert(namespace.to_string(), error.problem());
                            drop(known);
                            engine.remove_rules(namespace);
                        }
                        // OVN-K ignores it: the namespace's `default` still applies.
                        None => tracing::warn!(%namespace, name = %ef.name_any(), %error,
                            "EgressFirewall ignored"),
                    }
                }
            }
        }
        ClusterEvent::Firewall(Change::Deleted(ef)) if ef.name_any() != EGRESS_FIREWALL_NAME => {
            tracing::debug!(namespace = ef.namespace(), name = %ef.name_any(),
                "EgressFirewall OVN-K ignores deleted");
        }
        ClusterEvent::Firewall(Change::Deleted(ef)) => {
            let namespace = ef.namespace().unwrap_or_default();
            tracing::info!(%namespace, "EgressFirewall deleted");
            let mut known = status.known();
            known.rules.remove(&namespace);
            known.invalid.remove(&namespace);
            drop(known);
            engine.remove_rules(&namespace);
        }
        ClusterEvent::Node(Change::Applied(n)) if n.metadata.name.as_deref() == Some(node) => {
            match node_subnets(&n) {
                Ok((_, subnets)) => return Some(subnets),
                Err(error) => tracing::warn!(%error, "this node's pod subnets are unknown"),
            }
        }
        ClusterEvent::Node(Change::Deleted(n)) if n.metadata.name.as_deref() == Some(node) => {
            tracing::warn!(node, "this node was deleted");
        }
        ClusterEvent::Node(_) => {}
        ClusterEvent::Pod(Change::Synced) | ClusterEvent::Firewall(Change::Synced) => {}
    }
    None
}

/// Gives the pods back what they were told before a restart (`--state-file`), once.
async fn restore_answers<P: FlowProgrammer>(config: &NodeConfig, engine: &Engine<P>) {
    let Some(path) = config.state_file.clone() else {
        return;
    };
    let (node, engine) = (config.node.clone(), engine.clone());
    let restored =
        tokio::task::spawn_blocking(move || crate::persist::restore(&path, &node, &engine)).await;
    match restored {
        Ok(Ok(n)) => tracing::info!(
            answers = n,
            "answers of an earlier run given back to their pods"
        ),
        Ok(Err(error)) => {
            tracing::warn!(%error, "no answers of an earlier run: the file is ignored")
        }
        Err(error) => tracing::warn!(%error, "reading the answers of an earlier run failed"),
    }
}

/// Writes what the pods were told (`--state-file`).
async fn save_answers<P: FlowProgrammer>(config: &NodeConfig, engine: &Engine<P>) {
    let Some(path) = config.state_file.clone() else {
        return;
    };
    let (node, engine) = (config.node.clone(), engine.clone());
    match tokio::task::spawn_blocking(move || crate::persist::save(&path, &node, &engine)).await {
        Ok(Ok(n)) => tracing::debug!(answers = n, "answers written"),
        Ok(Err(error)) => tracing::warn!(%error, "answers not written"),
        Err(error) => tracing::warn!(%error, "writing the answers failed"),
    }
}

fn pod_key(pod: &Pod) -> PodKey {
    PodKey::new(pod.namespace().unwrap_or_default(), pod.name_any())
}

/// Runs the node loop until `shutdown`: the engine, the Kubernetes watches, and, unless
/// `--tapd=false`, tapd discovery and the subscriptions. Every change goes to the engine as it
/// arrives; the DNS Service's addresses go to `resolvers`.
pub async fn run_node<P: FlowProgrammer>(
    config: NodeConfig,
    client: kube::Client,
    engine: Engine<P>,
    status: Arc<Status>,
    resolvers: TrustedResolvers,
    shutdown: impl Future<Output = ()>,
) {
    engine.set_node(config.node.clone());
    status.set_trusted(&resolvers.current());
    let mut discovered =
        Discovered::new(config.ovn_config.clone()).trusting(config.dns_service.clone(), resolvers);
    engine.set_networks_unknown(Some(discovered.waiting()));
    let (subnets_tx, subnets_rx) = signal::channel(config.pod_subnets.clone());
    if !config.pod_subnets.is_empty() {
        engine.set_local_subnets(config.pod_subnets.clone());
    }
    let engine_task = tokio::spawn(engine.clone().run());
    let (events_tx, mut events_rx) = mpsc::channel(EVENT_QUEUE);
    let mut upstreams = Upstreams::new(
        subnets_rx,
        events_tx,
        status.upstream.clone(),
        config.upstream.session(),
    );
    let mut dns_pods = DnsPods::new(config.upstream.tapd_port);
    let mut discovery = if !config.upstream.tapd {
        // No DNS pods watched (no list or watch in their namespace) and no tapd dialled: the
        // replies held in br-int are the only answers.
        tracing::info!(
            "--tapd=false: no tapd subscriptions; flowd learns DNS answers only from the replies it holds in br-int"
        );
        futures::stream::pending().boxed()
    } else if config.upstream.endpoints.is_empty() {
        watch::dns_pods(
            &client,
            &config.upstream.tapd_namespace,
            &config.upstream.tapd_selector,
            &status.watch,
        )
    } else {
        upstreams.set_endpoints(&config.upstream.endpoints.iter().copied().collect());
        futures::stream::pending().boxed()
    };
    let mut cluster = watch::cluster(
        &client,
        &config.node,
        &config.ovn_config,
        &config.dns_service,
        &status.watch,
    );
    let mut sync = SyncState::default();
    let sync_deadline = tokio::time::sleep(config.sync_timeout);
    let mut save_tick = tokio::time::interval(crate::persist::SAVE_EVERY);
    save_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gave_up = false;
    tokio::pin!(shutdown, sync_deadline);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = &mut sync_deadline, if !gave_up && !sync.complete() => {
                gave_up = true;
                let missing = sync.missing().join(", ");
                let removed = engine.abandon_adopted();
                let why = format!(
                    "not listed within --sync-timeout={:?}: {missing}; flows an earlier run left \
                     cannot be judged and were removed ({removed})",
                    config.sync_timeout
                );
                tracing::error!(node = %config.node, "{why}");
                status.set_unsynced(why);
            }
            Some(event) = cluster.next() => {
                let synced = !sync.complete() && sync.note(&event);
                if let Some(subnets) =
                    apply_cluster_event(&engine, &status, &config.node, &mut discovered, event)
                {
                    if config.pod_subnets.is_empty() && *subnets_tx.borrow() != subnets {
                        tracing::info!(?subnets, "this node's pod subnets");
                        engine.set_local_subnets(subnets.clone());
                        subnets_tx.send_replace(subnets);
                    }
                }
                if synced {
                    tracing::info!(node = %config.node, "pods, EgressFirewalls, nodes, OVN-K's configuration and the DNS Service listed");
                    // Now the flows an earlier run left can be judged against the cluster, and what
                    // the pods were told before the restart given back to them.
                    engine.synced();
                    restore_answers(&config, &engine).await;
                    status.set_ready();
                }
            }
            Some(change) = discovery.next() => {
                if dns_pods.apply(&change) {
                    upstreams.set_endpoints(&dns_pods.endpoints());
                }
            }
            Some(response) = events_rx.recv() => {
                status.dns_events.inc();
                engine.on_dns(response, Instant::now());
            }
            _ = save_tick.tick(), if config.state_file.is_some() && sync.complete() => {
                save_answers(&config, &engine).await;
            }
        }
    }
    if sync.complete() {
        save_answers(&config, &engine).await;
    }
    drop(upstreams);
    engine_task.abort();
    // Flows stay: their idle timeouts end them if flowd does not come back, and a restart adopts them.
    if let Err(error) = engine.flush().await {
        tracing::warn!(%error, "last flush failed");
    }
}

/// `flowd run`.
pub fn main(args: RunArgs) -> anyhow::Result<ExitCode> {
    if let Err(error) = args.validate() {
        eprintln!("flowd: {error}");
        return Ok(ExitCode::from(crate::config::EXIT_CONFIG));
    }
    dnsflow_runtime::init_logging(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: RunArgs) -> anyhow::Result<()> {
    let grpc = tokio::net::TcpListener::bind(args.grpc_listen).await?;
    let http = tokio::net::TcpListener::bind(args.metrics_listen).await?;
    let client = kube::Client::try_default().await?;
    let bridge = &args.engine.bridge;
    let ofctl = Ofctl::new(bridge.clone()).with_timeout(args.engine.ovs_timeout);
    let rundir = std::env::var_os("OVS_RUNDIR").map(std::path::PathBuf::from);
    let socket = Native::socket_path(rundir.as_deref(), bridge);
    let programmer = Native::new(ofctl, socket.clone(), args.engine.ovs_timeout);
    // Whether flowd holds DNS responses, decided once; held responses reach the holder from the
    // first connection on.
    let hold_off = match (args.ovs_driver, args.hold) {
        (OvsDriver::Ofctl, _) => Some("ovs-ofctl cannot hold packets (--ovs-driver ofctl)"),
        (_, false) => Some("flowd runs with --hold=false"),
        (OvsDriver::Native, true) => None,
    };
    let packet_ins = hold_off.is_none().then(|| programmer.packet_ins());
    match args.ovs_driver {
        OvsDriver::Ofctl => programmer.disable(),
        OvsDriver::Native => match programmer.connect().await {
            Ok(()) => {}
            Err(error) => tracing::warn!(socket = %socket.display(), %error,
                "no OpenFlow connection to the bridge yet; batches go through ovs-ofctl until there is"),
        },
    }
    let engine = Engine::new(args.engine.clone(), programmer);
    let resolvers = TrustedResolvers::new(&args.trusted_resolvers);
    let hold =
        Arc::new(hold_off.map_or_else(|| HoldReport::on(args.hold_deadline), HoldReport::off));
    let status = Arc::new(Status::with_hold(hold.clone()));
    tracing::info!(node = %args.node_name, grpc = %args.grpc_listen, metrics = %args.metrics_listen, "flowd starting");
    let (stop_tx, stop_rx) = signal::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut registry = metrics::registry(&engine, &status);
    hold.register(&mut registry);
    let holds = packet_ins.map(|packet_ins| {
        let holder = Holder::new(
            engine.clone(),
            Arc::new(engine.clone()),
            args.hold_deadline,
            resolvers.subscribe(),
        )
        .with_rate(HoldRate {
            total: args.hold_rate,
            per_pod: args.hold_rate_per_pod,
        })
        .reporting_to(hold.clone());
        holder.metrics().register(&mut registry);
        tokio::spawn(holder.run(packet_ins));
        tracing::info!(deadline = ?args.hold_deadline, timeout = ?args.hold_timeout,
            "holding DNS responses until their grants are in br-int");
        tokio::spawn(
            HoldFlows::new(engine.clone(), args.hold_timeout, resolvers.subscribe())
                .reporting_to(hold)
                .run(stopped()),
        )
    });
    let registry = Arc::new(registry);
    let api = tokio::spawn(api::serve(
        grpc,
        engine.clone(),
        status.clone(),
        registry.clone(),
        stopped(),
    ));
    let http = tokio::spawn(metrics::serve(
        http,
        metrics::Sources {
            engine: engine.clone(),
            status: status.clone(),
            registry,
        },
        stopped(),
    ));
    let config = NodeConfig {
        node: args.node_name.clone(),
        pod_subnets: args.pod_subnets.clone(),
        ovn_config: args.ovn_config.clone(),
        dns_service: args.dns_service.clone(),
        sync_timeout: args.sync_timeout,
        state_file: args.state_file.clone(),
        upstream: args.upstream.clone(),
    };
    tracing::info!(dns_service = %args.dns_service, trusted = %resolvers.current(),
        "DNS replies in br-int are believed from the DNS Service's addresses and --trusted-resolver only");
    run_node(
        config,
        client,
        engine,
        status,
        resolvers,
        dnsflow_runtime::shutdown_signal(),
    )
    .await;
    tracing::info!("shutting down");
    stop_tx.send_replace(true);
    if let Some(holds) = holds {
        // Removes the hold flows: DNS goes straight to the pods while flowd is away.
        let _ = holds.await;
    }
    api.await??;
    http.await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::EngineSettings, egressfirewall::EgressFirewall, ovs::Recording};
    use dnsflow_dnstap::{Answer, DnsName, DnsResponse};
    use serde_json::json;

    fn firewall(name: &str, egress: serde_json::Value) -> ClusterEvent {
        let mut ef = EgressFirewall::inline("abc", egress).expect("deserializes");
        ef.metadata.name = Some(name.into());
        ClusterEvent::Firewall(Change::Applied(Box::new(ef)))
    }

    fn deleted(name: &str) -> ClusterEvent {
        let mut ef = EgressFirewall::inline("abc", json!([])).expect("deserializes");
        ef.metadata.name = Some(name.into());
        ClusterEvent::Firewall(Change::Deleted(Box::new(ef)))
    }

    /// Pod `abc/client` (10.244.1.5) has resolved `www.google.com`; then each step is applied in turn and
    /// the namespace must (or must not) have rules, and the pod grants, afterwards; and what is known
    /// about an invalid EgressFirewall must say why.
    #[test]
    fn egressfirewalls_ovn_k_ignores_change_nothing_and_invalid_ones_say_why() {
        let allow = || json!([{"type": "Allow", "to": {"dnsName": "google.com"}}]);
        let bad = || json!([{"type": "Allow", "to": {"dnsName": "bad name"}}]);
        let why = "egress[0].to.dnsName: \"bad name\" does not match";
        // (step, event, rules afterwards, invalid afterwards)
        let steps = [
            (
                "the default applies",
                firewall("default", allow()),
                true,
                false,
            ),
            (
                "another name, valid",
                firewall("extra", allow()),
                true,
                false,
            ),
            (
                "another name, invalid",
                firewall("extra", bad()),
                true,
                false,
            ),
            ("another name deleted", deleted("extra"), true, false),
            (
                "the default turns invalid",
                firewall("default", bad()),
                false,
                true,
            ),
            (
                "another name beside it",
                firewall("extra", allow()),
                false,
                true,
            ),
            (
                "the default is valid again",
                firewall("default", allow()),
                true,
                false,
            ),
            (
                "the default invalid again",
                firewall("default", bad()),
                false,
                true,
            ),
            ("the default deleted", deleted("default"), false, false),
        ];
        let engine = Engine::new(EngineSettings::default(), Recording::new(None));
        let status = Status::default();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "client", "namespace": "abc"},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.5"}]},
        }))
        .expect("pod");
        let mut discovered = Discovered::new(ovnkube::UPSTREAM_CONFIG.parse().expect("ref"));
        apply_cluster_event(
            &engine,
            &status,
            "n1",
            &mut discovered,
            ClusterEvent::Pod(Change::Applied(Box::new(pod))),
        );
        assert_eq!(
            status.known().pods[&PodKey::new("abc", "client")].ips,
            vec!["10.244.1.5".parse::<std::net::IpAddr>().expect("ip")]
        );
        engine.on_dns(
            DnsResponse::noerror(
                "10.244.1.5".parse().expect("ip"),
                DnsName::new("www.google.com").expect("name"),
                Vec::new(),
                vec![Answer {
                    ip: "142.250.74.36".parse().expect("ip"),
                    ttl: 300,
                }],
            ),
            Instant::now(),
        );
        for (what, event, rules, invalid) in steps {
            apply_cluster_event(&engine, &status, "n1", &mut discovered, event);
            let known = status.known();
            assert_eq!(known.rules.contains_key("abc"), rules, "{what}");
            let reason = known.invalid.get("abc");
            assert_eq!(reason.is_some(), invalid, "{what}: {reason:?}");
            assert!(
                reason.is_none_or(|r| r.starts_with(why)),
                "{what}: {reason:?}"
            );
            drop(known);
            assert_eq!(
                engine.grants(None, None).len(),
                usize::from(rules),
                "{what}"
            );
        }
        // Every object flowd could not use is counted, the ignored ones too.
        assert_eq!(status.invalid_firewalls.get(), 5);
    }
}

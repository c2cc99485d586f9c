//! Kubernetes state: the pods of this node, every namespace's EgressFirewall, this node, and the DNS
//! pods that carry tapd, each kept current by a kube-runtime watcher (list, then watch; after `410 Gone`
//! or any error, kube's default backoff and a relist).
//!
//! A watcher's relist does not report objects that vanished while it was away: [`changes`] remembers
//! what it has reported and turns every object missing from a relist into a [`Change::Deleted`], so the
//! consumer sees one consistent stream of applies and deletes whatever happened on the wire.

use crate::{egressfirewall::EgressFirewall, metrics::Registry, ovnkube::ObjectRef};
use futures::{stream, Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, Resource, ResourceExt as _,
};
use prometheus_client::metrics::counter::Counter;
use serde::de::DeserializeOwned;
use std::{collections::HashMap, fmt::Debug, pin::Pin, sync::Arc};

/// One kind of API call flowd makes. The ClusterRole in `deploy/base/clusterrole.yaml` grants exactly
/// these (a test compares the two, and another checks every request flowd sends against this list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiAccess {
    /// API group, `""` for the core group.
    pub group: &'static str,
    /// Resource (plural).
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// Every API call flowd makes: watchers list then watch; this node is watched by name through a
/// `metadata.name` field selector, which is a list/watch, not a get.
pub const REQUIRED_ACCESS: &[ApiAccess] = &[
    ApiAccess {
        group: "",
        resource: "pods",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "k8s.ovn.org",
        resource: "egressfirewalls",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "",
        resource: "nodes",
        verbs: &["list", "watch"],
    },
];

/// The one namespaced call: OVN-K's ConfigMap (`--ovn-config`), listed and watched by name through a
/// `metadata.name` field selector. A Role in OVN-K's namespace grants it for that name only
/// (`resourceNames`), in each overlay of `deploy/`.
pub const OVN_CONFIG_ACCESS: ApiAccess = ApiAccess {
    group: "",
    resource: "configmaps",
    verbs: &["list", "watch"],
};

/// The other namespaced call: the cluster's DNS Service (`--dns-service`), listed and watched by
/// name, whose ClusterIPs are the only DNS servers flowd believes (see [`crate::resolvers`]). A
/// Role in the Service's namespace grants it for that name only, in each overlay of `deploy/`.
pub const DNS_SERVICE_ACCESS: ApiAccess = ApiAccess {
    group: "",
    resource: "services",
    verbs: &["list", "watch"],
};

/// What happened to one watched object (boxed: a Pod is kilobytes, and changes travel through channels
/// and merged streams).
#[derive(Clone, Debug, PartialEq)]
pub enum Change<K> {
    /// Created or changed (or seen again by a relist with a new resourceVersion).
    Applied(Box<K>),
    /// Deleted, or missing from a relist: the last state flowd knew.
    Deleted(Box<K>),
    /// A full list has been delivered (the first one, and again after every relist).
    Synced,
}

/// Counters the watchers move; shared with the metrics.
#[derive(Debug, Default)]
pub struct WatchStats {
    /// Watch or list errors (each followed by a backoff).
    pub errors: Counter,
    /// Full lists received (the first sync and every relist).
    pub lists: Counter,
}

impl WatchStats {
    pub fn register(&self, registry: &mut Registry) {
        registry.counter(
            "watch_errors",
            "Kubernetes watch or list errors (each followed by a backoff)",
            &self.errors,
        );
        registry.counter(
            "watch_lists",
            "Full Kubernetes lists (first sync and relists)",
            &self.lists,
        );
    }
}

/// `namespace/name`: objects are identified by name, as the API server does.
fn key_of<K: Resource>(obj: &K) -> (String, String) {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// The changes of the objects `api` lists with `config`, forever: errors are logged and counted, then
/// kube's default backoff and a new watch (or relist, after `410 Gone`) follow.
pub fn changes<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    stats: Arc<WatchStats>,
) -> impl Stream<Item = Change<K>> + Send + 'static
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut known: HashMap<(String, String), K> = HashMap::new();
    // Objects seen since the current relist began; `None` outside a relist.
    let mut relisted: Option<HashMap<(String, String), K>> = None;
    watcher(api, config)
        .default_backoff()
        .map(move |event| {
            let mut out = Vec::new();
            match event {
                Ok(watcher::Event::Init) => relisted = Some(HashMap::new()),
                Ok(watcher::Event::InitApply(obj)) => {
                    let key = key_of(&obj);
                    let unchanged = known
                        .get(&key)
                        .is_some_and(|old| old.resource_version() == obj.resource_version());
                    if !unchanged {
                        out.push(Change::Applied(Box::new(obj.clone())));
                    }
                    relisted.get_or_insert_with(HashMap::new).insert(key, obj);
                }
                Ok(watcher::Event::InitDone) => {
                    let fresh = relisted.take().unwrap_or_default();
                    for (key, old) in known.drain() {
                        if !fresh.contains_key(&key) {
                            tracing::debug!(what, namespace = %key.0, name = %key.1, "gone after relist");
                            out.push(Change::Deleted(Box::new(old)));
                        }
                    }
                    known = fresh;
                    stats.lists.inc();
                    tracing::debug!(what, objects = known.len(), "listed");
                    out.push(Change::Synced);
                }
                Ok(watcher::Event::Apply(obj)) => {
                    known.insert(key_of(&obj), obj.clone());
                    out.push(Change::Applied(Box::new(obj)));
                }
                Ok(watcher::Event::Delete(obj)) => {
                    known.remove(&key_of(&obj));
                    out.push(Change::Deleted(Box::new(obj)));
                }
                Err(error) => {
                    stats.errors.inc();
                    tracing::warn!(what, %error, "watch failed; backing off, then watching or relisting again");
                }
            }
            stream::iter(out)
        })
        .flatten()
}

/// One change of the cluster state flowd follows.
#[derive(Clone, Debug)]
pub enum ClusterEvent {
    Pod(Change<Pod>),
    Firewall(Change<EgressFirewall>),
    Node(Change<Node>),
    /// OVN-K's ConfigMap, the one `--ovn-config` names.
    OvnConfig(Change<ConfigMap>),
    /// The cluster's DNS Service, the one `--dns-service` names.
    DnsService(Change<Service>),
}

/// Which of the watches have delivered their first full list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncState {
    pub pods: bool,
    pub firewalls: bool,
    pub node: bool,
    pub ovn_config: bool,
    pub dns_service: bool,
}

impl SyncState {
    /// Notes a `Synced`; true once all of them have been synced.
    pub fn note(&mut self, event: &ClusterEvent) -> bool {
        match event {
            ClusterEvent::Pod(Change::Synced) => self.pods = true,
            ClusterEvent::Firewall(Change::Synced) => self.firewalls = true,
            ClusterEvent::Node(Change::Synced) => self.node = true,
            ClusterEvent::OvnConfig(Change::Synced) => self.ovn_config = true,
            ClusterEvent::DnsService(Change::Synced) => self.dns_service = true,
            _ => {}
        }
        self.complete()
    }

    pub fn complete(&self) -> bool {
        self.lists().iter().all(|(done, _)| *done)
    }

    /// The watches that have not listed yet, for people.
    pub fn missing(&self) -> Vec<&'static str> {
        self.lists()
            .into_iter()
            .filter_map(|(done, what)| (!done).then_some(what))
            .collect()
    }

    /// Each watch, whether it has listed, and what it lists.
    fn lists(&self) -> [(bool, &'static str); 5] {
        [
            (self.pods, "this node's pods"),
            (self.firewalls, "EgressFirewalls"),
            (self.node, "nodes"),
            (self.ovn_config, "OVN-Kubernetes's ConfigMap"),
            (self.dns_service, "the DNS Service"),
        ]
    }
}

/// The merged stream of pod, EgressFirewall, node, OVN-K configuration and DNS Service changes.
pub type ClusterStream = Pin<Box<dyn Stream<Item = ClusterEvent> + Send>>;

/// Watches the pods scheduled to `node` (field selector `spec.nodeName`), the EgressFirewalls of every
/// namespace, every Node, OVN-K's ConfigMap `ovn_config` and the DNS Service `dns_service` (each by
/// name, field selector `metadata.name`).
pub fn cluster(
    client: &Client,
    node: &str,
    ovn_config: &ObjectRef,
    dns_service: &ObjectRef,
    stats: &Arc<WatchStats>,
) -> ClusterStream {
    let pods = changes(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        "pods",
        stats.clone(),
    )
    .map(ClusterEvent::Pod);
    let firewalls = changes(
        Api::<EgressFirewall>::all(client.clone()),
        watcher::Config::default(),
        "egressfirewalls",
        stats.clone(),
    )
    .map(ClusterEvent::Firewall);
    // Every node: this one's pod subnets filter the subscriptions, and every node's subnets and
    // addresses are destinations no answer may open.
    let nodes = changes(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        "nodes",
        stats.clone(),
    )
    .map(ClusterEvent::Node);
    // By name: the Role grants this one ConfigMap, not the namespace's others.
    let config = changes(
        Api::<ConfigMap>::namespaced(client.clone(), &ovn_config.namespace),
        watcher::Config::default().fields(&format!("metadata.name={}", ovn_config.name)),
        "ovn-config",
        stats.clone(),
    )
    .map(ClusterEvent::OvnConfig);
    let dns = changes(
        Api::<Service>::namespaced(client.clone(), &dns_service.namespace),
        watcher::Config::default().fields(&format!("metadata.name={}", dns_service.name)),
        "dns-service",
        stats.clone(),
    )
    .map(ClusterEvent::DnsService);
    Box::pin(stream::select_all([
        pods.boxed(),
        firewalls.boxed(),
        nodes.boxed(),
        config.boxed(),
        dns.boxed(),
    ]))
}

/// Watches the DNS pods that carry tapd: `selector` (a label selector) in `namespace`.
pub fn dns_pods(
    client: &Client,
    namespace: &str,
    selector: &str,
    stats: &Arc<WatchStats>,
) -> Pin<Box<dyn Stream<Item = Change<Pod>> + Send>> {
    changes(
        Api::<Pod>::namespaced(client.clone(), namespace),
        watcher::Config::default().labels(selector),
        "dns pods",
        stats.clone(),
    )
    .boxed()
}

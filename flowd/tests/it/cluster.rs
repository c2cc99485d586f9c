//! flowd's Kubernetes state against the fake API server: what the watchers report, relists after
//! `410 Gone`, bookmarks, selectors, and the API calls flowd makes compared with its RBAC.

use crate::apiserver::{egress_firewall, node, ovn_config, pod, FakeApiServer, Resource};
use flowd::watch::{self, Change, ClusterEvent, ClusterStream, SyncState, WatchStats};
use futures::StreamExt as _;
use kube::ResourceExt as _;
use serde_json::json;
use std::{sync::Arc, time::Duration};

/// Long enough for a watcher's backoff and relist on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(20);

pub const NODE: &str = "node1";

/// A short description of one event, for assertions.
fn describe(event: &ClusterEvent) -> String {
    fn change<K: kube::Resource>(what: &str, c: &Change<K>) -> String {
        match c {
            Change::Applied(o) => format!("{what} applied {}", name(o.as_ref())),
            Change::Deleted(o) => format!("{what} deleted {}", name(o.as_ref())),
            Change::Synced => format!("{what} synced"),
        }
    }
    fn name<K: kube::Resource>(o: &K) -> String {
        match o.namespace() {
            Some(ns) => format!("{ns}/{}", o.name_any()),
            None => o.name_any(),
        }
    }
    match event {
        ClusterEvent::Pod(c) => change("pod", c),
        ClusterEvent::Firewall(c) => change("ef", c),
        ClusterEvent::Node(c) => change("node", c),
        ClusterEvent::OvnConfig(c) => change("ovn-config", c),
        ClusterEvent::DnsService(c) => change("dns-service", c),
    }
}

/// Reads events until one described as `want` arrives; returns everything read, in order.
async fn until(stream: &mut ClusterStream, want: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let result = tokio::time::timeout(WAIT, async {
        while let Some(ev) = stream.next().await {
            let d = describe(&ev);
            seen.push(d.clone());
            if d == want {
                return;
            }
        }
    })
    .await;
    assert!(result.is_ok(), "no {want:?} within {WAIT:?}; saw {seen:?}");
    seen
}

/// Reads until all three watches have synced once.
async fn until_synced(stream: &mut ClusterStream) -> Vec<String> {
    let mut sync = SyncState::default();
    let mut seen = Vec::new();
    let result = tokio::time::timeout(WAIT, async {
        while let Some(ev) = stream.next().await {
            seen.push(describe(&ev));
            if sync.note(&ev) {
                return;
            }
        }
    })
    .await;
    assert!(result.is_ok(), "not synced within {WAIT:?}; saw {seen:?}");
    seen
}

pub async fn cluster_with_two_pods() -> FakeApiServer {
    let api = FakeApiServer::start().await;
    api.apply(node(NODE, "127.0.0.0/24"));
    api.apply(node("node2", "10.244.2.0/24"));
    api.apply(pod("demo", "client", NODE, "127.0.0.11"));
    api.apply(pod("demo", "other", NODE, "127.0.0.12"));
    api.apply(pod("demo", "elsewhere", "node2", "10.244.2.5"));
    api.apply(egress_firewall(
        "demo",
        json!([{"type": "Allow", "to": {"dnsName": "example.com"}},
               {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}]),
    ));
    api.apply(ovn_config("10.244.0.0/16/24", SERVICE_SUBNET));
    api.apply(kube_dns_service(crate::sandbox::KUBE_DNS_VIP));
    // Another Service beside it: flowd asks for the DNS Service by name only.
    let mut other = kube_dns_service("172.30.0.11");
    other["metadata"]["name"] = json!("metrics-server");
    api.apply(other);
    // Another ConfigMap in the same namespace: flowd asks for its own by name only.
    api.apply(json!({
        "kind": "ConfigMap",
        "metadata": {"name": "other", "namespace": "ovn-kubernetes"},
        "data": {"net_cidr": "1.0.0.0/8", "svc_cidr": "2.0.0.0/8"},
    }));
    api
}

/// The cluster's service subnet, as its OVN-K ConfigMap tells.
pub const SERVICE_SUBNET: &str = "172.30.0.0/16";

fn upstream_config() -> flowd::ovnkube::ObjectRef {
    flowd::ovnkube::UPSTREAM_CONFIG.parse().unwrap()
}

fn dns_service() -> flowd::ovnkube::ObjectRef {
    flowd::resolvers::UPSTREAM_DNS_SERVICE.parse().unwrap()
}

/// `kube-system/kube-dns` with `cluster_ip`, its ports as kubeadm and kind write them.
pub fn kube_dns_service(cluster_ip: &str) -> serde_json::Value {
    json!({
        "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": "kube-system"},
        "spec": {
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                {"name": "metrics", "port": 9153, "protocol": "TCP", "targetPort": 9153},
            ],
        },
    })
}

#[tokio::test]
async fn watchers_list_this_nodes_pods_every_firewall_and_every_node_then_follow_changes() {
    let api = cluster_with_two_pods().await;
    let stats = Arc::new(WatchStats::default());
    let mut events = watch::cluster(
        &api.client(),
        NODE,
        &upstream_config(),
        &dns_service(),
        &stats,
    );
    let mut seen = until_synced(&mut events).await;
    seen.sort();
    assert_eq!(
        seen,
        [
            "dns-service applied kube-system/kube-dns",
            "dns-service synced",
            "ef applied demo/default",
            "ef synced",
            "node applied node1",
            "node applied node2",
            "node synced",
            "ovn-config applied ovn-kubernetes/ovn-config",
            "ovn-config synced",
            "pod applied demo/client",
            "pod applied demo/other",
            "pod synced",
        ]
    );

    api.apply(pod("demo", "late", NODE, "127.0.0.13"));
    assert_eq!(until(&mut events, "pod applied demo/late").await.len(), 1);
    // A pod of another node never shows up; the next change of this node's does, alone.
    api.apply(pod("demo", "far", "node2", "10.244.2.6"));
    api.delete(Resource::Pods, "demo", "other");
    assert_eq!(
        until(&mut events, "pod deleted demo/other").await,
        ["pod deleted demo/other"]
    );
    api.apply(egress_firewall("demo", json!([])));
    assert_eq!(
        until(&mut events, "ef applied demo/default").await,
        ["ef applied demo/default"]
    );
    api.delete(Resource::EgressFirewalls, "demo", "default");
    until(&mut events, "ef deleted demo/default").await;
    assert_eq!(stats.errors.get(), 0);
}

#[tokio::test]
async fn after_410_gone_the_relist_reports_what_was_deleted_while_away() {
    let api = cluster_with_two_pods().await;
    let stats = Arc::new(WatchStats::default());
    let mut events = watch::cluster(
        &api.client(),
        NODE,
        &upstream_config(),
        &dns_service(),
        &stats,
    );
    until_synced(&mut events).await;
    let lists = api.count(Resource::Pods, "list");

    api.delete_unseen_and_expire(Resource::Pods, "demo", "client");
    let seen = until(&mut events, "pod deleted demo/client").await;
    assert!(
        api.count(Resource::Pods, "list") > lists,
        "no relist after 410"
    );
    // The relist re-announces nothing that did not change: only the deletion and the new sync.
    assert!(
        seen.iter()
            .all(|s| s.ends_with("synced") || s == "pod deleted demo/client"),
        "{seen:?}"
    );
    // And the watch goes on from the relist.
    api.apply(pod("demo", "after", NODE, "127.0.0.14"));
    until(&mut events, "pod applied demo/after").await;
}

#[tokio::test]
async fn bookmarks_move_the_watch_on_without_a_relist() {
    let api = cluster_with_two_pods().await;
    let stats = Arc::new(WatchStats::default());
    let mut events = watch::cluster(
        &api.client(),
        NODE,
        &upstream_config(),
        &dns_service(),
        &stats,
    );
    until_synced(&mut events).await;
    let lists = api.count(Resource::Pods, "list");
    // Every watch open (the fake server logs it and subscribes it to changes at once), then
    // bookmark them. Watchers only watch while polled: poll them meanwhile (they have nothing to say).
    let unwatched = || {
        let requests = api.requests();
        requests.iter().filter(|l| l.verb == "list").any(|l| {
            !requests
                .iter()
                .any(|w| w.verb == "watch" && w.resource == l.resource)
        })
    };
    tokio::time::timeout(WAIT, async {
        while unwatched() {
            tokio::select! {
                ev = events.next() => panic!("{:?} before any change", ev.as_ref().map(describe)),
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    })
    .await
    .expect("every watch open");
    api.bookmark();
    api.apply(pod("demo", "next", NODE, "127.0.0.15"));
    assert_eq!(
        until(&mut events, "pod applied demo/next").await,
        ["pod applied demo/next"]
    );
    assert_eq!(api.count(Resource::Pods, "list"), lists);
    let watches = api.requests();
    assert!(watches.iter().filter(|r| r.verb == "watch").all(|r| r
        .query
        .get("allowWatchBookmarks")
        .map(String::as_str)
        == Some("true")));
}

#[tokio::test]
async fn tapd_discovery_watches_dns_pods_by_label_in_one_namespace() {
    let api = FakeApiServer::start().await;
    let mut dns = pod("kube-system", "coredns-a", "node2", "10.244.2.2");
    dns["metadata"]["labels"] = json!({"k8s-app": "kube-dns"});
    api.apply(dns.clone());
    let mut not_dns = pod("kube-system", "etcd", "node2", "10.244.2.3");
    not_dns["metadata"]["labels"] = json!({"component": "etcd"});
    api.apply(not_dns);
    let mut elsewhere = dns.clone();
    elsewhere["metadata"]["namespace"] = json!("default");
    api.apply(elsewhere);

    let stats = Arc::new(WatchStats::default());
    let mut changes = watch::dns_pods(&api.client(), "kube-system", "k8s-app=kube-dns", &stats);
    let mut names = Vec::new();
    while let Some(c) = tokio::time::timeout(WAIT, changes.next()).await.unwrap() {
        match c {
            Change::Applied(p) => {
                names.push(format!("{}/{}", p.namespace().unwrap(), p.name_any()))
            }
            Change::Synced => break,
            Change::Deleted(p) => panic!("deleted {}", p.name_any()),
        }
    }
    assert_eq!(names, ["kube-system/coredns-a"]);
    let listed = api.requests();
    let list = listed.iter().find(|r| r.verb == "list").unwrap();
    assert_eq!(list.namespace.as_deref(), Some("kube-system"));
    assert_eq!(list.query["labelSelector"], "k8s-app=kube-dns");
}

/// Every request flowd's watchers sent is one that `REQUIRED_ACCESS` (and so the ClusterRole) allows,
/// or OVN-K's ConfigMap or the DNS Service read by name in its namespace (`OVN_CONFIG_ACCESS`,
/// `DNS_SERVICE_ACCESS`, the overlays' Roles).
pub fn assert_requests_within_rbac(api: &FakeApiServer) {
    let requests = api.requests();
    assert!(!requests.is_empty());
    for r in requests {
        let resource = r
            .resource
            .unwrap_or_else(|| panic!("flowd called an unknown API: {r:?}"));
        let (group, plural) = resource.rbac();
        // The namespaced calls: one object each, read by name.
        let by_name = [
            (
                Resource::Services,
                watch::DNS_SERVICE_ACCESS,
                "kube-system",
                "kube-dns",
            ),
            (
                Resource::ConfigMaps,
                watch::OVN_CONFIG_ACCESS,
                "ovn-kubernetes",
                "ovn-config",
            ),
        ];
        if let Some((_, a, namespace, name)) = by_name.iter().find(|b| b.0 == resource) {
            assert!(
                a.verbs.contains(&r.verb.as_str())
                    && r.namespace.as_deref() == Some(*namespace)
                    && r.query.get("fieldSelector").map(String::as_str)
                        == Some(format!("metadata.name={name}").as_str()),
                "{r:?} is not {namespace}/{name} read by name"
            );
            continue;
        }
        let allowed = watch::REQUIRED_ACCESS.iter().any(|a| {
            a.group == group && a.resource == plural && a.verbs.contains(&r.verb.as_str())
        });
        assert!(allowed, "{r:?} is not in REQUIRED_ACCESS");
    }
}

#[tokio::test]
async fn every_call_the_watchers_make_is_in_required_access() {
    let api = cluster_with_two_pods().await;
    let stats = Arc::new(WatchStats::default());
    let mut events = watch::cluster(
        &api.client(),
        NODE,
        &upstream_config(),
        &dns_service(),
        &stats,
    );
    until_synced(&mut events).await;
    let mut dns = watch::dns_pods(&api.client(), "kube-system", "k8s-app=kube-dns", &stats);
    while !matches!(
        tokio::time::timeout(WAIT, dns.next()).await.unwrap(),
        Some(Change::Synced)
    ) {}
    // Watchers only watch while polled: keep both going until their watches are open.
    let drain = tokio::spawn(async move {
        futures::future::join(events.for_each(|_| async {}), dns.for_each(|_| async {})).await
    });
    tokio::time::timeout(WAIT, async {
        while api.count(Resource::Pods, "watch") < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    drain.abort();
    assert_requests_within_rbac(&api);
    // Every verb REQUIRED_ACCESS lists is really used: the ClusterRole grants nothing idle.
    for a in watch::REQUIRED_ACCESS {
        for verb in a.verbs {
            assert!(
                api.requests().iter().any(|r| r.resource.map(Resource::rbac)
                    == Some((a.group, a.resource))
                    && r.verb == *verb),
                "{a:?} {verb} never used"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The node loop on real parts: Unbound → tapd (the real binary) → flowd's watches, subscriptions and
// engine, with the flows recorded by the engine's in-memory bridge (the OVS side is covered by the
// sandbox tests and by `pipeline.rs`).

use dnsflow_dnstap::{DnsName, DnsResponse};
use dnsflow_testkit::{
    dig, free_port, http_get, metric, tapd_binary, wait_until, Unbound, UnboundConfig,
};
use flowd::{
    config::EngineSettings,
    config::UpstreamArgs,
    daemon::{run_node, NodeConfig},
    engine::Engine,
    ovs::{FlowProgrammer, PortKeys, Recording, Template},
    status::Status,
};
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Instant, SystemTime},
};

/// The EF ACL table the recording bridge pretends OVN uses.
const ACL_TABLE: u8 = 46;

/// The tapd binary, as a child process in its own temp dir, killed by its pid when dropped.
#[derive(Debug)]
pub struct Tapd {
    child: Option<Child>,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub socket: PathBuf,
    log: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Tapd {
    /// Starts tapd with its socket at `socket` and gRPC at `grpc`.
    pub fn start_at(socket: &Path, grpc: SocketAddr) -> Tapd {
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let log = socket.with_extension(format!("{}.log", grpc.port()));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(tapd_binary())
            .arg("--socket")
            .arg(socket)
            .args(["--listen", &grpc.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .env_clear()
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start tapd");
        let tapd = Tapd {
            child: Some(child),
            grpc,
            metrics,
            socket: socket.to_path_buf(),
            log,
            _dir: None,
        };
        wait_until("tapd's gRPC port", || {
            std::net::TcpStream::connect(grpc).is_ok()
        })
        .unwrap_or_else(|e| panic!("{e}:\n{}", tapd.log()));
        wait_until("tapd's socket", || socket.exists()).unwrap();
        tapd
    }

    /// Starts tapd in a new temp dir on a free loopback port.
    pub fn start() -> Tapd {
        let dir = tempfile::Builder::new().prefix("tapd-").tempdir().unwrap();
        let grpc = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let mut tapd = Tapd::start_at(&dir.path().join("dnstap.sock"), grpc);
        tapd._dir = Some(dir);
        tapd
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One sample of tapd's `/metrics`, 0 when absent or unreachable.
    pub fn metric(&self, name: &str) -> u64 {
        http_get(self.metrics, "/metrics")
            .ok()
            .and_then(|t| metric(&t, name))
            .unwrap_or(0)
    }

    /// SIGKILL: no drain, no goodbye; the streams just break.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for Tapd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `cond` until it holds, failing with `what` after [`WAIT`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `dig -b client` without blocking the runtime; returns the answer lines.
pub async fn dig_from(client: Ipv4Addr, port: u16, name: &str) -> Vec<String> {
    let name = name.to_string();
    tokio::task::spawn_blocking(move || dig(client, port, &name, "A").unwrap())
        .await
        .unwrap()
}

/// flowd's node loop, in this process, until dropped.
pub struct Node<P: FlowProgrammer> {
    pub engine: Engine<P>,
    pub status: Arc<Status>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl<P: FlowProgrammer> Node<P> {
    pub fn start(api: &FakeApiServer, engine: Engine<P>, upstream: UpstreamArgs) -> Node<P> {
        Self::start_with(api, engine, upstream, Duration::from_secs(120))
    }

    /// [`Node::start`], giving up on the first full list after `sync_timeout`.
    pub fn start_with(
        api: &FakeApiServer,
        engine: Engine<P>,
        upstream: UpstreamArgs,
        sync_timeout: Duration,
    ) -> Node<P> {
        Self::start_full(api, engine, upstream, sync_timeout, None)
    }

    /// [`Node::start`], keeping what the pods were told in `state_file`.
    pub fn start_keeping(
        api: &FakeApiServer,
        engine: Engine<P>,
        upstream: UpstreamArgs,
        state_file: &Path,
    ) -> Node<P> {
        let sync_timeout = Duration::from_secs(120);
        Self::start_full(api, engine, upstream, sync_timeout, Some(state_file.into()))
    }

    fn start_full(
        api: &FakeApiServer,
        engine: Engine<P>,
        upstream: UpstreamArgs,
        sync_timeout: Duration,
        state_file: Option<PathBuf>,
    ) -> Node<P> {
        let status = Arc::new(Status::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = NodeConfig {
            node: NODE.to_string(),
            pod_subnets: Vec::new(),
            ovn_config: upstream_config(),
            dns_service: dns_service(),
            sync_timeout,
            state_file,
            upstream,
        };
        let task = tokio::spawn(run_node(
            config,
            api.client(),
            engine.clone(),
            status.clone(),
            flowd::resolvers::TrustedResolvers::new(&[]),
            async {
                let _ = stopped.await;
            },
        ));
        Node {
            engine,
            status,
            stop: Some(stop),
            task,
        }
    }

    pub async fn ready(&self) {
        let mut ready = self.status.ready_changes();
        tokio::time::timeout(WAIT, ready.wait_for(|r| *r))
            .await
            .expect("flowd not ready in time")
            .unwrap();
    }

    /// Serves the node loop's `/metrics`, `/healthz` and `/readyz` on a free loopback port, as
    /// `flowd run` does; returns the address and the registry (the gRPC API shares it).
    pub async fn serve_probes(&self) -> (SocketAddr, Arc<flowd::metrics::Registry>) {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = http.local_addr().unwrap();
        let registry = Arc::new(flowd::metrics::registry(&self.engine, &self.status));
        let sources = flowd::metrics::Sources {
            engine: self.engine.clone(),
            status: self.status.clone(),
            registry: registry.clone(),
        };
        tokio::spawn(flowd::metrics::serve(http, sources, std::future::pending()));
        (addr, registry)
    }

    pub fn tapd_connected(&self) -> u64 {
        self.status.upstream.connected.get()
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        (&mut self.task).await.unwrap();
    }
}

impl<P: FlowProgrammer> Drop for Node<P> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HTTP GET of `path` at `addr`, without blocking the runtime: the whole response.
async fn get(addr: SocketAddr, path: &'static str) -> String {
    tokio::task::spawn_blocking(move || http_get(addr, path).unwrap())
        .await
        .unwrap()
}

/// Static subscriptions to `tapds`.
pub fn static_upstream(tapds: &[&Tapd]) -> UpstreamArgs {
    let endpoints: Vec<String> = tapds.iter().map(|t| t.grpc.to_string()).collect();
    let endpoints = endpoints.join(",");
    if endpoints.is_empty() {
        upstream_args(&[])
    } else {
        upstream_args(&["--tapd-endpoints", &endpoints])
    }
}

/// flowd's tapd flags as `flowd run` parses them from `args`.
pub fn upstream_args(args: &[&str]) -> UpstreamArgs {
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        upstream: UpstreamArgs,
    }
    <Flags as clap::Parser>::try_parse_from(std::iter::once("flowd").chain(args.iter().copied()))
        .unwrap()
        .upstream
}

/// An engine over the recording bridge, with OVN port keys for `pods` (iface-ids `demo_<pod>`).
fn recording_engine(pods: &[&str]) -> Engine<Recording> {
    // A switch without conntrack hints (one flow per grant); it leaves by router port 1.
    let mut template = Template::stand_in(ACL_TABLE, 1, 1);
    template.allow.truncate(1);
    template.allow[0].hint = None;
    let bridge = Recording::new(Some(template));
    for (i, pod) in pods.iter().enumerate() {
        bridge.set_port(
            &format!("demo_{pod}"),
            PortKeys {
                metadata: 1,
                reg14: 2 + i as u32,
            },
        );
    }
    Engine::new(EngineSettings::default(), bridge)
}

/// The destinations of the flows on the recording bridge for traffic from `src`.
fn flows_from(engine: &Engine<Recording>, src: &str) -> BTreeSet<IpAddr> {
    let src: IpAddr = src.parse().unwrap();
    engine
        .programmer()
        .flows()
        .iter()
        .filter(|f| f.matches.src == src)
        .map(|f| f.matches.dst)
        .collect()
}

fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// Unbound answering the test names, with dnstap to `tapd`.
fn unbound_for(tapd: &Tapd, records: &[&str]) -> Unbound {
    Unbound::start(
        &tapd.socket,
        &UnboundConfig {
            local_data: records.iter().map(|r| r.to_string()).collect(),
            ..UnboundConfig::default()
        },
    )
    .unwrap()
}

const ALLOW_EXAMPLE: &str = "example.com";

/// One tapd fed by one Unbound, the two-pod cluster in the fake API server, and flowd's node loop on the
/// recording bridge, subscribed and ready.
struct OneTapd {
    node: Node<Recording>,
    api: FakeApiServer,
    dns: Unbound,
    _tapd: Tapd,
}

async fn one_tapd(records: &[&str], pods: &[&str], firewall: bool) -> OneTapd {
    let tapd = Tapd::start();
    let dns = unbound_for(&tapd, records);
    let api = cluster_with_two_pods().await;
    if firewall {
        api.apply(egress_firewall("demo", allow_example_then_deny_all()));
    }
    let node = Node::start(&api, recording_engine(pods), static_upstream(&[&tapd]));
    node.ready().await;
    eventually("the tapd subscription", || node.tapd_connected() == 1).await;
    OneTapd {
        node,
        api,
        dns,
        _tapd: tapd,
    }
}

fn allow_example_then_deny_all() -> serde_json::Value {
    json!([{"type": "Allow", "to": {"dnsName": ALLOW_EXAMPLE}},
           {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_and_firewalls_added_changed_and_deleted_drive_the_flows() {
    let OneTapd {
        node,
        api,
        dns,
        _tapd,
    } = one_tapd(
        &[
            "www.example.com. 300 IN A 192.0.2.10",
            "www.other.test. 300 IN A 192.0.2.20",
        ],
        &["client", "other"],
        true,
    )
    .await;

    // A name the rules do not allow gets nothing; the allowed one gets exactly its answer.
    let client = Ipv4Addr::new(127, 0, 0, 11);
    assert_eq!(
        dig_from(client, dns.port(), "www.other.test").await,
        ["192.0.2.20"]
    );
    assert_eq!(
        dig_from(client, dns.port(), "www.example.com").await,
        ["192.0.2.10"]
    );
    eventually("the grant for www.example.com", || {
        flows_from(&node.engine, "127.0.0.11") == ips(&["192.0.2.10"])
    })
    .await;
    assert!(flows_from(&node.engine, "127.0.0.12").is_empty());

    // The EgressFirewall loses its dnsName rule: the namespace is recomputed, the flow goes.
    api.apply(egress_firewall(
        "demo",
        json!([{"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}]),
    ));
    eventually("the flow to go with its rule", || {
        flows_from(&node.engine, "127.0.0.11").is_empty()
    })
    .await;
    // The rule comes back: the remembered answer earns the flow again, with no new DNS query.
    api.apply(egress_firewall("demo", allow_example_then_deny_all()));
    eventually("the flow to come back", || {
        flows_from(&node.engine, "127.0.0.11") == ips(&["192.0.2.10"])
    })
    .await;

    // An invalid EgressFirewall is reported and skipped: the namespace gets nothing from it.
    api.apply(egress_firewall(
        "demo",
        json!([{"type": "Allow", "to": {"dnsName": "not a name!"}}]),
    ));
    eventually("the invalid EgressFirewall to be counted", || {
        node.status.invalid_firewalls.get() == 1
    })
    .await;
    eventually("no flow under an invalid EgressFirewall", || {
        flows_from(&node.engine, "127.0.0.11").is_empty()
    })
    .await;
    api.apply(egress_firewall("demo", allow_example_then_deny_all()));
    eventually("the flow to come back", || {
        !flows_from(&node.engine, "127.0.0.11").is_empty()
    })
    .await;

    // The pod goes: its flows go at once (its IP will be reused).
    api.delete(Resource::Pods, "demo", "client");
    eventually("the deleted pod's flows to go", || {
        flows_from(&node.engine, "127.0.0.11").is_empty()
    })
    .await;
    // Deleting the EgressFirewall leaves nothing to grant.
    assert_eq!(
        dig_from(Ipv4Addr::new(127, 0, 0, 12), dns.port(), "www.example.com")
            .await
            .len(),
        1
    );
    eventually("the other pod's grant", || {
        flows_from(&node.engine, "127.0.0.12") == ips(&["192.0.2.10"])
    })
    .await;
    api.delete(Resource::EgressFirewalls, "demo", "default");
    eventually("every flow to go with the EgressFirewall", || {
        node.engine.programmer().flows().is_empty()
    })
    .await;
    assert_requests_within_rbac(&api);
    node.stop().await;
}

/// Every flow of the recording bridge, by source and destination.
fn all_flows(engine: &Engine<Recording>) -> BTreeSet<(IpAddr, IpAddr)> {
    let flows = engine.programmer().flows();
    flows
        .iter()
        .map(|f| (f.matches.src, f.matches.dst))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_then_aaaa_and_round_robin_answers_keep_their_flows_through_status_only_updates() {
    let tapd = Tapd::start();
    // Two servers answer the same name with different addresses, as a round robin does.
    let first = unbound_for(
        &tapd,
        &[
            "www.example.com. 300 IN A 192.0.2.10",
            "www.example.com. 300 IN AAAA 2001:db8::10",
        ],
    );
    let second = unbound_for(&tapd, &["www.example.com. 300 IN A 192.0.2.11"]);
    let api = cluster_with_two_pods().await;
    // A dual-stack pod: asked over IPv4, its AAAA answer earns a flow from its IPv6 address.
    let mut client = pod("demo", "client", NODE, "127.0.0.11");
    client["status"]["podIPs"] = json!([{"ip": "127.0.0.11"}, {"ip": "fd00:10:244:1::11"}]);
    api.apply(client);
    let node = Node::start(
        &api,
        recording_engine(&["client"]),
        static_upstream(&[&tapd]),
    );
    node.ready().await;
    eventually("the tapd subscription", || node.tapd_connected() == 1).await;

    let from = Ipv4Addr::new(127, 0, 0, 11);
    let v4: IpAddr = "127.0.0.11".parse().unwrap();
    let v6: IpAddr = "fd00:10:244:1::11".parse().unwrap();
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let query = |port: u16, qtype: &'static str| async move {
        tokio::task::spawn_blocking(move || dig(from, port, "www.example.com", qtype).unwrap())
            .await
            .unwrap()
    };
    assert_eq!(query(first.port(), "A").await, ["192.0.2.10"]);
    assert_eq!(query(first.port(), "AAAA").await, ["2001:db8::10"]);
    assert_eq!(query(second.port(), "A").await, ["192.0.2.11"]);
    let want: BTreeSet<(IpAddr, IpAddr)> = [
        (v4, ip("192.0.2.10")),
        (v6, ip("2001:db8::10")),
        (v4, ip("192.0.2.11")),
    ]
    .into();
    eventually(
        "A, AAAA and the second round-robin address, side by side",
        || all_flows(&node.engine) == want,
    )
    .await;

    // OVN-K writes the EgressFirewall's status once per zone: the same rules change nothing. A change
    // in another namespace, seen after it on the same watch, shows it was applied.
    let mut status_only = egress_firewall("demo", allow_example_then_deny_all());
    status_only["status"] = json!({"status": "EgressFirewall Rules applied"});
    api.apply(status_only);
    api.apply(egress_firewall("marker", allow_example_then_deny_all()));
    eventually("the watch to pass the status-only update", || {
        node.status
            .known
            .lock()
            .unwrap()
            .rules
            .contains_key("marker")
    })
    .await;
    assert_eq!(all_flows(&node.engine), want);
    assert_eq!(node.engine.metrics_snapshot().flows_removed, 0);

    // A spec change that removes the rule: every flow goes promptly.
    api.apply(egress_firewall(
        "demo",
        json!([{"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}]),
    ));
    eventually("the flows to go with their rule", || {
        all_flows(&node.engine).is_empty()
    })
    .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_queried_dns_before_flowd_saw_it_gets_its_grant_when_it_shows_up() {
    let OneTapd {
        node,
        api,
        dns,
        _tapd,
    } = one_tapd(
        &["www.example.com. 300 IN A 192.0.2.10"],
        &["client", "other", "newborn"],
        false,
    )
    .await;

    // The pod's first query happens before its Pod object reaches flowd.
    let newborn = Ipv4Addr::new(127, 0, 0, 13);
    assert_eq!(
        dig_from(newborn, dns.port(), "www.example.com").await,
        ["192.0.2.10"]
    );
    eventually("the answer to be held for the unknown pod", || {
        node.engine.metrics_snapshot().pending == 1
    })
    .await;
    assert!(flows_from(&node.engine, "127.0.0.13").is_empty());

    api.apply(pod("demo", "newborn", NODE, "127.0.0.13"));
    eventually("the held answer to become the pod's grant", || {
        flows_from(&node.engine, "127.0.0.13") == ips(&["192.0.2.10"])
    })
    .await;
    assert_eq!(node.engine.metrics_snapshot().pending, 0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_after_the_first_full_sync_on_probes_and_grpc_health() {
    let api = cluster_with_two_pods().await;
    api.set_failing(Resource::EgressFirewalls, true);
    let node = Node::start_with(
        &api,
        recording_engine(&[]),
        static_upstream(&[]),
        Duration::from_secs(1),
    );
    let (http_addr, registry) = node.serve_probes().await;
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let _grpc = tokio::spawn(flowd::api::serve(
        grpc,
        node.engine.clone(),
        node.status.clone(),
        registry,
        std::future::pending(),
    ));
    let health = || async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let resp = client
            .check(tonic_health::pb::HealthCheckRequest {
                service: "dnsflow.v1.Flowd".into(),
            })
            .await
            .unwrap();
        resp.into_inner().status
    };
    let readyz = || get(http_addr, "/readyz");

    // Pods and the node are listed, the EgressFirewalls cannot be: not ready.
    eventually("pods and node listed", || {
        api.count(Resource::Pods, "list") >= 1 && api.count(Resource::Nodes, "list") >= 1
    })
    .await;
    eventually("EgressFirewall lists failing", || {
        api.count(Resource::EgressFirewalls, "list") >= 2 && node.status.watch.errors.get() >= 2
    })
    .await;
    assert!(!node.status.is_ready());
    assert!(readyz().await.starts_with("HTTP/1.1 503"));
    // Past --sync-timeout, /readyz says which list is missing and what that cost.
    eventually("the sync timeout", || node.status.unsynced().is_some()).await;
    let said = readyz().await;
    assert!(
        said.contains("not listed within --sync-timeout=1s: EgressFirewalls; flows an earlier run left cannot be judged and were removed (0)"),
        "{said}"
    );
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    assert_eq!(health().await, not_serving);

    api.set_failing(Resource::EgressFirewalls, false);
    node.ready().await;
    assert!(readyz().await.starts_with("HTTP/1.1 200"));
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    eventually_async_health(health, serving).await;
    let metrics = get(http_addr, "/metrics").await;
    assert!(metrics.lines().any(|l| l == "dnsflow_ready 1"), "{metrics}");
    assert!(metric(&metrics, "dnsflow_watch_errors_total").unwrap() >= 1);
}

async fn eventually_async_health<F, Fut>(health: F, want: i32)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = i32>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while health().await != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_410_gone_the_relist_takes_the_flows_of_a_pod_deleted_while_away() {
    let OneTapd {
        node,
        api,
        dns,
        _tapd,
    } = one_tapd(
        &["www.example.com. 300 IN A 192.0.2.10"],
        &["client", "other"],
        false,
    )
    .await;
    for client in [11, 12] {
        dig_from(
            Ipv4Addr::new(127, 0, 0, client),
            dns.port(),
            "www.example.com",
        )
        .await;
    }
    eventually("both grants", || {
        !flows_from(&node.engine, "127.0.0.11").is_empty()
            && !flows_from(&node.engine, "127.0.0.12").is_empty()
    })
    .await;

    api.delete_unseen_and_expire(Resource::Pods, "demo", "client");
    eventually("the relist to remove the vanished pod's flows", || {
        flows_from(&node.engine, "127.0.0.11").is_empty()
    })
    .await;
    assert_eq!(flows_from(&node.engine, "127.0.0.12"), ips(&["192.0.2.10"]));
    assert!(node.status.watch.lists.get() > 3, "no relist");
    node.stop().await;
}

/// With no tapd, a restarted flowd gets back from its state file what the pod was told: the grant
/// is justified again (its reason known, not merely adopted) with the time it had left, and a rule
/// added after the restart grants from an answer given before it, with no new query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_tapd_keeps_every_answer_and_its_remaining_time() {
    let api = cluster_with_two_pods().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("answers.json");
    let no_tapd = || upstream_args(&["--tapd=false"]);
    let node = Node::start_keeping(&api, recording_engine(&["client"]), no_tapd(), &state);
    node.ready().await;
    let answer = |name: &str, ip: &str| {
        DnsResponse::noerror(
            "127.0.0.11".parse().unwrap(),
            DnsName::new(name).unwrap(),
            Vec::new(),
            vec![dnsflow_dnstap::Answer {
                ip: ip.parse().unwrap(),
                ttl: 600,
            }],
        )
    };
    // As the hold would give them: one the rule allows, one it does not (yet).
    node.engine
        .on_dns(answer("www.example.com", "192.0.2.51"), Instant::now());
    node.engine
        .on_dns(answer("cdn.example.net", "192.0.2.52"), Instant::now());
    eventually("the grant", || {
        flows_from(&node.engine, "127.0.0.11") == ips(&["192.0.2.51"])
    })
    .await;
    let left = |engine: &Engine<Recording>| {
        let g = engine.grants(None, None);
        g[0].expires
            .duration_since(SystemTime::now())
            .unwrap()
            .as_secs()
    };
    let before = left(&node.engine);
    node.stop().await;
    assert!(state.exists(), "written at shutdown");

    let node = Node::start_keeping(&api, recording_engine(&["client"]), no_tapd(), &state);
    node.ready().await;
    eventually("the grant, justified again", || {
        node.engine
            .grants(None, None)
            .iter()
            .any(|g| g.reason.is_some() && g.key.dst == "192.0.2.51".parse::<IpAddr>().unwrap())
    })
    .await;
    assert!(
        before.abs_diff(left(&node.engine)) <= 2,
        "{before} s left before the restart"
    );
    // A rule added now grants from the answer given before the restart.
    api.apply(egress_firewall(
        "demo",
        json!([{"type": "Allow", "to": {"dnsName": "example.com"}},
               {"type": "Allow", "to": {"dnsName": "example.net"}},
               {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}]),
    ));
    eventually("the later rule's grant", || {
        flows_from(&node.engine, "127.0.0.11") == ips(&["192.0.2.51", "192.0.2.52"])
    })
    .await;
    node.stop().await;
}

/// A DNS pod carrying tapd at `ip`, as discovery sees it.
fn dns_pod(name: &str, ip: &str) -> serde_json::Value {
    let mut p = pod("kube-system", name, "node2", ip);
    p["metadata"]["labels"] = json!({"k8s-app": "kube-dns"});
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tapds_one_killed_and_restarted_mid_stream_lose_no_grant_and_duplicate_none() {
    let port = free_port();
    let ip_a = Ipv4Addr::new(127, 0, 0, 101);
    let ip_b = Ipv4Addr::new(127, 0, 0, 102);
    let dir = tempfile::tempdir().unwrap();
    let socket_a = dir.path().join("a.sock");
    let socket_b = dir.path().join("b.sock");
    let mut tapd_a = Tapd::start_at(&socket_a, SocketAddr::from((ip_a, port)));
    let tapd_b = Tapd::start_at(&socket_b, SocketAddr::from((ip_b, port)));
    let records = [
        "a.example.com. 300 IN A 192.0.2.31",
        "b.example.com. 300 IN A 192.0.2.32",
        "c.example.com. 300 IN A 192.0.2.33",
        "d.example.com. 300 IN A 192.0.2.34",
    ];
    let dns_a = unbound_for(&tapd_a, &records);
    let dns_b = unbound_for(&tapd_b, &records);

    let api = FakeApiServer::start().await;
    api.apply(node(NODE, "127.0.0.0/24"));
    api.apply(pod("demo", "one", NODE, "127.0.0.21"));
    api.apply(pod("demo", "two", NODE, "127.0.0.22"));
    api.apply(egress_firewall("demo", allow_example_then_deny_all()));
    api.apply(dns_pod("coredns-a", &ip_a.to_string()));
    api.apply(dns_pod("coredns-b", &ip_b.to_string()));
    api.apply(ovn_config("10.244.0.0/16/24", SERVICE_SUBNET));
    let discovery = upstream_args(&["--tapd-port", &port.to_string()]);
    let node = Node::start(&api, recording_engine(&["one", "two"]), discovery);
    node.ready().await;
    eventually("subscriptions to both tapds", || node.tapd_connected() == 2).await;

    let one = Ipv4Addr::new(127, 0, 0, 21);
    let two = Ipv4Addr::new(127, 0, 0, 22);
    dig_from(one, dns_a.port(), "a.example.com").await;
    dig_from(two, dns_b.port(), "b.example.com").await;
    eventually("a grant through each tapd", || {
        flows_from(&node.engine, "127.0.0.21") == ips(&["192.0.2.31"])
            && flows_from(&node.engine, "127.0.0.22") == ips(&["192.0.2.32"])
    })
    .await;

    // tapd A dies mid-stream. flowd notices, keeps every grant, and keeps trying.
    let failures = node.status.upstream.failures.get();
    tapd_a.kill();
    eventually("flowd to notice the broken stream", || {
        node.tapd_connected() == 1 && node.status.upstream.failures.get() > failures
    })
    .await;
    assert_eq!(flows_from(&node.engine, "127.0.0.21"), ips(&["192.0.2.31"]));

    // tapd A comes back at the same address (the container restarted in its pod): flowd reconnects
    // by itself and asks for the recent answers again.
    let connects = node.status.upstream.connects.get();
    let tapd_a = Tapd::start_at(&socket_a, SocketAddr::from((ip_a, port)));
    eventually("flowd to reconnect to tapd A", || {
        node.tapd_connected() == 2 && node.status.upstream.connects.get() > connects
    })
    .await;
    // Unbound redials the new socket on its own timer.
    eventually("Unbound to reconnect to tapd A", || {
        tapd_a.metric("tapd_open_connections") >= 1
    })
    .await;
    dig_from(one, dns_a.port(), "c.example.com").await;
    eventually("a grant through the restarted tapd", || {
        flows_from(&node.engine, "127.0.0.21") == ips(&["192.0.2.31", "192.0.2.33"])
    })
    .await;

    // tapd B's pod is replaced: the old endpoint vanishes, a new one (same address, new pod) holds
    // answers given while flowd was not subscribed; flowd gets them from the replay.
    api.delete(Resource::Pods, "kube-system", "coredns-b");
    eventually("flowd to drop tapd B", || node.tapd_connected() == 1).await;
    let events = tapd_b.metric("tapd_events_total");
    dig_from(two, dns_b.port(), "d.example.com").await;
    dig_from(two, dns_b.port(), "b.example.com").await;
    eventually("tapd B to decode both answers", || {
        tapd_b.metric("tapd_events_total") >= events + 2
    })
    .await;
    assert_eq!(flows_from(&node.engine, "127.0.0.22"), ips(&["192.0.2.32"]));
    let replayed = node.status.upstream.replayed.get();
    api.apply(dns_pod("coredns-b2", &ip_b.to_string()));
    eventually("the replayed answer's grant", || {
        flows_from(&node.engine, "127.0.0.22") == ips(&["192.0.2.32", "192.0.2.34"])
    })
    .await;
    assert!(node.status.upstream.replayed.get() > replayed);

    // No grant lost, none duplicated: exactly one flow per (pod, answer), and the engine agrees.
    let flows = node.engine.programmer().flows();
    let keys: BTreeSet<(IpAddr, IpAddr)> = flows
        .iter()
        .map(|f| (f.matches.src, f.matches.dst))
        .collect();
    assert_eq!(keys.len(), flows.len(), "duplicate flows: {flows:?}");
    assert_eq!(
        keys,
        [
            ("127.0.0.21", "192.0.2.31"),
            ("127.0.0.21", "192.0.2.33"),
            ("127.0.0.22", "192.0.2.32"),
            ("127.0.0.22", "192.0.2.34"),
        ]
        .iter()
        .map(|(s, d)| (s.parse().unwrap(), d.parse().unwrap()))
        .collect()
    );
    assert_eq!(node.engine.grants(None, None).len(), 4);
    assert_eq!(node.status.upstream.invalid.get(), 0);
    drop(tapd_b);
    node.stop().await;
}

/// With `--tapd=false` flowd becomes ready on the cluster's state alone and never looks for a tapd:
/// its only calls on pods are the list and watch of its own node's pods, and it dials nothing. The
/// control, the same cluster with tapd on, lists the DNS pods by label in `kube-system` and dials the
/// tapd it finds there (nothing listens: the attempt fails, and is counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tapd_off_flowd_is_ready_without_watching_dns_pods_or_dialling_any_tapd() {
    let own_pods = |r: &crate::apiserver::Logged| {
        r.namespace.is_none()
            && r.query.get("fieldSelector").map(String::as_str)
                == Some(&*format!("spec.nodeName={NODE}"))
            && !r.query.contains_key("labelSelector")
    };
    let other_pod_calls = |api: &FakeApiServer| -> Vec<crate::apiserver::Logged> {
        api.requests()
            .into_iter()
            .filter(|r| r.resource == Some(Resource::Pods) && !own_pods(r))
            .collect()
    };
    /// The two-pod cluster with a DNS pod whose tapd port nothing listens on, and a ready node.
    async fn start(tapd: bool, closed: &str) -> (FakeApiServer, Node<Recording>) {
        let api = cluster_with_two_pods().await;
        api.apply(dns_pod("coredns-a", "127.0.0.1"));
        let args = upstream_args(&[&format!("--tapd={tapd}"), "--tapd-port", closed]);
        let node = Node::start(&api, recording_engine(&["late"]), args);
        node.ready().await;
        (api, node)
    }
    let closed = free_port().to_string();

    let (api, node) = start(true, &closed).await;
    eventually("the DNS pods listed by label in kube-system", || {
        other_pod_calls(&api).iter().any(|r| {
            r.verb == "list"
                && r.namespace.as_deref() == Some("kube-system")
                && r.query.get("labelSelector").map(String::as_str) == Some("k8s-app=kube-dns")
        })
    })
    .await;
    eventually("a subscription to the DNS pod's tapd tried", || {
        node.status.upstream.failures.get() > 0
    })
    .await;
    node.stop().await;

    let (api, node) = start(false, &closed).await;
    // A pod applied after the first sync has gone through the node loop: a discovery watch, had one
    // been started with the others, would have listed by now.
    api.apply(pod("demo", "late", NODE, "127.0.0.16"));
    eventually("the pod applied after the first sync", || {
        node.status
            .known()
            .pods
            .contains_key(&flowd::model::PodKey::new("demo", "late"))
    })
    .await;
    assert!(
        api.count(Resource::Pods, "watch") >= 1,
        "{:?}",
        api.requests()
    );
    let others = other_pod_calls(&api);
    assert!(
        others.is_empty(),
        "calls on pods besides this node's: {others:?}"
    );
    let upstream = &node.status.upstream;
    assert_eq!(
        (
            upstream.connects.get(),
            upstream.failures.get(),
            node.tapd_connected()
        ),
        (0, 0, 0)
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_lists_grants_explains_and_counts_over_grpcurl_and_metrics() {
    let OneTapd {
        node,
        api,
        dns,
        _tapd,
    } = one_tapd(
        &["www.example.com. 300 IN A 192.0.2.10"],
        &["client", "other"],
        true,
    )
    .await;
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap().to_string();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let registry = Arc::new(flowd::metrics::registry(&node.engine, &node.status));
    tokio::spawn(flowd::api::serve(
        grpc,
        node.engine.clone(),
        node.status.clone(),
        registry.clone(),
        std::future::pending(),
    ));
    tokio::spawn(flowd::metrics::serve(
        http,
        flowd::metrics::Sources {
            engine: node.engine.clone(),
            status: node.status.clone(),
            registry,
        },
        std::future::pending(),
    ));
    dig_from(Ipv4Addr::new(127, 0, 0, 11), dns.port(), "www.example.com").await;
    eventually("the grant", || {
        !flows_from(&node.engine, "127.0.0.11").is_empty()
    })
    .await;

    let grpcurl = |data: &str, method: &str| {
        let out = Command::new("grpcurl")
            .args(["-plaintext", "-d", data, &grpc_addr, method])
            .output()
            .expect("grpcurl is not installed: run scripts/test");
        assert!(
            out.status.success(),
            "grpcurl {method}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let listed = block(|| grpcurl(r#"{"namespace":"demo"}"#, "dnsflow.v1.Flowd/ListGrants"));
    let grants = listed["grants"].as_array().unwrap();
    assert_eq!(grants.len(), 1, "{listed}");
    assert_eq!(grants[0]["pod"], "client");
    assert_eq!(grants[0]["podIp"], "127.0.0.11");
    assert_eq!(grants[0]["ip"], "192.0.2.10");
    assert_eq!(grants[0]["queryName"], "www.example.com");
    assert_eq!(grants[0]["dnsName"], "example.com");
    assert_eq!(grants[0]["action"], "Allow");
    assert_eq!(grants[0]["port"], "any");
    assert_eq!(grants[0]["priority"], 11000);
    assert_eq!(
        grants[0]["table"],
        u32::from(ACL_TABLE),
        "the discovered table"
    );
    let none = block(|| {
        grpcurl(
            r#"{"namespace":"demo","pod":"other"}"#,
            "dnsflow.v1.Flowd/ListGrants",
        )
    });
    assert!(none.get("grants").is_none(), "{none}");

    let explained = block(|| {
        grpcurl(
            r#"{"namespace":"demo","pod":"client","query_name":"WWW.Example.com."}"#,
            "dnsflow.v1.Flowd/Explain",
        )
    });
    let summary = explained["summary"].as_str().unwrap();
    assert!(summary.starts_with("rule 0 "), "{explained}");
    assert!(summary.contains("www.example.com"), "{explained}");
    assert_eq!(explained["rules"][0]["matches"], true);
    assert!(
        explained["rules"][1].get("matches").is_none(),
        "{explained}"
    );
    let elsewhere = block(|| {
        grpcurl(
            r#"{"namespace":"demo","pod":"client","query_name":"evilexample.com"}"#,
            "dnsflow.v1.Flowd/Explain",
        )
    });
    assert!(
        elsewhere["summary"]
            .as_str()
            .unwrap()
            .starts_with("no dnsName rule"),
        "{elsewhere}"
    );

    let no_rules = block(|| {
        grpcurl(
            r#"{"namespace":"elsewhere","pod":"x","query_name":"www.example.com"}"#,
            "dnsflow.v1.Flowd/Explain",
        )
    });
    assert_eq!(
        no_rules["summary"],
        "namespace elsewhere has no EgressFirewall: flowd grants nothing there",
        "{no_rules}"
    );
    // The name that matched is the CNAME target; the service IP among the answers (inside the
    // service subnet OVN-K's ConfigMap names, not kind's) gets no flow.
    let chained = block(|| {
        grpcurl(
            r#"{"namespace":"demo","pod":"client","query_name":"www.example.org",
                "cname_chain":["edge.example.com"],"answers":["192.0.2.10","172.30.0.1"]}"#,
            "dnsflow.v1.Flowd/Explain",
        )
    });
    assert_eq!(
        chained["summary"],
        "rule 0 (Allow dnsName=example.com) matches edge.example.com (CNAME target of \
         www.example.org); no usable flow for 172.30.0.1",
        "{chained}"
    );
    assert_eq!(chained["rules"][0]["matchedName"], "edge.example.com");
    assert_eq!(
        chained["excluded"],
        json!([{"ip": "172.30.0.1", "reason": format!("inside cluster subnet {SERVICE_SUBNET}")}]),
        "{chained}"
    );
    // An invalid EgressFirewall is named as such, with why.
    api.apply(egress_firewall(
        "broken",
        json!([{"type": "Allow", "to": {"dnsName": "bad name"}}]),
    ));
    eventually("the invalid EgressFirewall", || {
        node.status.invalid_firewalls.get() == 1
    })
    .await;
    let broken = block(|| {
        grpcurl(
            r#"{"namespace":"broken","pod":"x","query_name":"www.example.com"}"#,
            "dnsflow.v1.Flowd/Explain",
        )
    });
    assert!(
        broken["summary"].as_str().unwrap().starts_with(
            "namespace broken: EgressFirewall invalid: egress[0].to.dnsName: \"bad name\" does not match"
        ),
        "{broken}"
    );
    // A name that is no DNS name is the caller's mistake, said as such.
    let bad = block(|| {
        Command::new("grpcurl")
            .args([
                "-plaintext",
                "-d",
                r#"{"namespace":"demo","pod":"client","query_name":"a..b"}"#,
                &grpc_addr,
                "dnsflow.v1.Flowd/Explain",
            ])
            .output()
            .unwrap()
    });
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("InvalidArgument"),
        "{bad:?}"
    );

    let stats = block(|| grpcurl("{}", "dnsflow.v1.Flowd/Stats"));
    assert_eq!(stats["grants"], "1");
    assert_eq!(stats["tapdConnected"], "1");
    assert_eq!(stats["counters"]["dnsflow_dns_events"], "1");
    let services = block(|| {
        let out = Command::new("grpcurl")
            .args(["-plaintext", &grpc_addr, "list"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    });
    assert!(
        services.lines().any(|l| l == "dnsflow.v1.Flowd"),
        "{services}"
    );
    assert!(
        services.lines().any(|l| l == "grpc.health.v1.Health"),
        "{services}"
    );

    let text = block(|| http_get(http_addr, "/metrics").unwrap());
    assert_eq!(metric(&text, "dnsflow_dns_events_total"), Some(1));
    assert_eq!(metric(&text, "dnsflow_tapd_events_total"), Some(1));
    assert_eq!(metric(&text, "dnsflow_grants"), Some(1));
    assert_eq!(metric(&text, "dnsflow_tapd_connections"), Some(1));
    assert!(metric(&text, "dnsflow_flows_installed_total").unwrap() >= 1);
    assert!(metric(&text, "dnsflow_ovs_batch_seconds_count").unwrap() >= 1);
    assert!(text.contains("dnsflow_ovs_batch_seconds_bucket{le=\"+Inf\"}"));
    node.stop().await;
}

/// Runs blocking test code (child processes, blocking sockets) off the runtime's worker.
fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A kubeconfig for the fake API server, for the real `flowd run`.
pub fn kubeconfig(api: &FakeApiServer, dir: &Path) -> PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
         clusters: [{{name: fake, cluster: {{server: \"http://{}\"}}}}]\n\
         users: [{{name: fake, user: {{}}}}]\n\
         contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: default}}}}]\n",
        api.addr
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn flowd_run_exits_64_on_bad_config_before_binding_anything() {
    // The port flowd would bind is taken: binding first would fail differently.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for bad in [
        vec!["--node-name", " "],
        vec!["--node-name", "n1", "--cookie-prefix", "0"],
        vec![
            "--node-name",
            "n1",
            "--idle-floor",
            "0s",
            "--idle-grace",
            "0s",
        ],
        vec!["--node-name", "n1", "--tapd-port", "0"],
        vec!["--node-name", "n1", "--sync-timeout", "0s"],
        vec!["--node-name", "n1", "--tapd=false", "--hold=false"],
        vec![
            "--node-name",
            "n1",
            "--tapd=false",
            "--tapd-endpoints",
            "127.0.0.1:9530",
        ],
        // What clap refuses is a usage error too.
        vec!["--node-name", "n1", "--trusted-resolver", "dns.example"],
        vec!["--node-name", "n1", "--dns-service", "kube-dns"],
        vec![],
        vec!["--node-name", "n1", "--pod-subnet", "x"],
        vec!["--node-name", "n1", "--log-format", "xml"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_flowd"))
            .arg("run")
            .args(["--metrics-listen", &addr, "--grpc-listen", &addr])
            .args(&bad)
            .env_clear()
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{bad:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.is_empty(), "{bad:?} explains itself");
        assert!(!stderr.contains("in use"), "{bad:?} bound a port: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flowd_run_binary_gets_ready_from_the_api_server_and_serves_its_api() {
    let api = cluster_with_two_pods().await;
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(&api, dir.path());
    let tapd = Tapd::start();
    let grpc = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let http = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let log = dir.path().join("flowd.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowd"))
        .arg("run")
        .env_clear()
        .env("KUBECONFIG", &config)
        .env("RUST_LOG", "info")
        .env("FLOWD_NODE_NAME", NODE)
        .env("FLOWD_GRPC_LISTEN", grpc.to_string())
        .env("FLOWD_METRICS_LISTEN", http.to_string())
        .env("FLOWD_TAPD_ENDPOINTS", tapd.grpc.to_string())
        .env("FLOWD_LOG_FORMAT", "json")
        // No OVS here: the engine keeps retrying, which readiness does not wait for.
        .env("FLOWD_BRIDGE", "br-none")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("flowd run to be ready", || {
        http_get(http, "/readyz")
            .map(|r| r.starts_with("HTTP/1.1 200"))
            .unwrap_or(false)
    })
    .await;
    eventually("flowd run to subscribe to tapd", || {
        tapd.metric("tapd_subscribers") == 1
    })
    .await;
    let text = block(|| http_get(http, "/metrics").unwrap());
    assert_eq!(metric(&text, "dnsflow_ready"), Some(1));
    assert_eq!(metric(&text, "dnsflow_pods"), Some(2), "{text}");
    let out = block(|| {
        Command::new("grpcurl")
            .args([
                "-plaintext",
                &grpc.to_string(),
                "grpc.health.v1.Health/Check",
            ])
            .output()
            .unwrap()
    });
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("SERVING"),
        "{out:?}"
    );
    // JSON logs, one object per line.
    let first = logs().lines().next().unwrap_or_default().to_string();
    assert!(
        serde_json::from_str::<serde_json::Value>(&first).is_ok(),
        "{first}"
    );
    assert_requests_within_rbac(&api);

    // SIGTERM: a clean, prompt exit.
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "flowd ignored SIGTERM:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}:\n{}", logs());
}

/// Every node's addresses are destinations no answer opens, discovered from the Node objects as
/// they come: a node that joins with an address a pod was granted takes the grant away; the pod's
/// other grant stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_address_is_never_a_grant_even_when_the_node_comes_later() {
    let tapd = Tapd::start();
    let dns = unbound_for(
        &tapd,
        &[
            "www.example.com. 300 IN A 192.0.2.10",
            "www.example.com. 300 IN A 198.51.100.7",
        ],
    );
    let api = cluster_with_two_pods().await;
    let node = Node::start(
        &api,
        recording_engine(&["client"]),
        static_upstream(&[&tapd]),
    );
    node.ready().await;
    eventually("the tapd subscription", || node.tapd_connected() == 1).await;
    let port = dns.port();
    let mut got = tokio::task::spawn_blocking(move || {
        dig(Ipv4Addr::new(127, 0, 0, 11), port, "www.example.com", "A").unwrap()
    })
    .await
    .unwrap();
    got.sort();
    assert_eq!(got, ["192.0.2.10", "198.51.100.7"]);
    let client: IpAddr = "127.0.0.11".parse().unwrap();
    let both: BTreeSet<(IpAddr, IpAddr)> = [
        (client, "192.0.2.10".parse().unwrap()),
        (client, "198.51.100.7".parse().unwrap()),
    ]
    .into();
    eventually("both answers granted", || all_flows(&node.engine) == both).await;

    // A node joins whose address is one of them (OVN-K's host CIDRs name it too).
    let mut other = crate::apiserver::node("ovn-worker9", "10.244.9.0/24");
    other["status"] = json!({"addresses": [{"type": "InternalIP", "address": "198.51.100.7"}]});
    api.apply(other);
    let one: BTreeSet<(IpAddr, IpAddr)> = [(client, "192.0.2.10".parse().unwrap())].into();
    eventually("the node's address to lose its grant", || {
        all_flows(&node.engine) == one
    })
    .await;
}

/// Without OVN-K's ConfigMap flowd cannot tell a Service from the internet: it decides answers but
/// writes nothing, and `/readyz` says why. Once the ConfigMap appears, what was kept is decided against
/// the subnets it names (not kind's): the answer inside its service subnet earns nothing. A later
/// version that cannot be read is counted and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_installed_until_ovn_ks_configuration_names_the_service_subnet() {
    let tapd = Tapd::start();
    let dns = unbound_for(
        &tapd,
        &[
            "www.example.com. 300 IN A 192.0.2.10",
            "svc.example.com. 300 IN A 172.30.0.9",
        ],
    );
    let api = cluster_with_two_pods().await;
    api.delete(Resource::ConfigMaps, "ovn-kubernetes", "ovn-config");
    let node = Node::start(
        &api,
        recording_engine(&["client"]),
        static_upstream(&[&tapd]),
    );
    let (http_addr, _) = node.serve_probes().await;
    let get = |path| get(http_addr, path);
    node.ready().await;
    eventually("the tapd subscription", || node.tapd_connected() == 1).await;
    let client = Ipv4Addr::new(127, 0, 0, 11);
    for name in ["www.example.com", "svc.example.com"] {
        assert_eq!(dig_from(client, dns.port(), name).await.len(), 1);
    }
    eventually("both answers", || node.status.dns_events.get() >= 2).await;
    // Give a write every chance to happen: the engine retries every few hundred milliseconds.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(node.engine.programmer().flows().is_empty());
    assert!(node.engine.programmer().batches().is_empty());
    let readyz = get("/readyz").await;
    assert!(readyz.starts_with("HTTP/1.1 503"), "{readyz}");
    assert!(
        readyz.contains("ConfigMap ovn-kubernetes/ovn-config does not exist"),
        "{readyz}"
    );
    let metrics = get("/metrics").await;
    assert_eq!(metric(&metrics, "dnsflow_cluster_networks_known"), Some(0));

    api.apply(ovn_config("10.244.0.0/16/24", SERVICE_SUBNET));
    eventually("the grant outside the service subnet", || {
        flows_from(&node.engine, "127.0.0.11") == ips(&["192.0.2.10"])
    })
    .await;
    assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    let metrics = get("/metrics").await;
    assert_eq!(metric(&metrics, "dnsflow_cluster_networks_known"), Some(1));

    // A broken version is counted; the networks read before stay, and so does the grant.
    let mut broken = ovn_config("10.244.0.0/16/24", "not a subnet");
    broken["metadata"]["labels"] = json!({"v": "2"});
    api.apply(broken);
    eventually("the unreadable version counted", || {
        node.status.invalid_ovn_configs.get() == 1
    })
    .await;
    assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    assert_eq!(flows_from(&node.engine, "127.0.0.11"), ips(&["192.0.2.10"]));
    assert_requests_within_rbac(&api);
    node.stop().await;
}

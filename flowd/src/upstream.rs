//! The tapd instances flowd listens to: where they are (the DNS pods, or a static list) and one
//! subscription to each, filtered to this node's pod subnets, asking for the recent answers again on
//! every (re)connect so that a flowd or tapd restart loses no grant.
//!
//! Each subscription is its own task; it reconnects with jittered exponential backoff, and resubscribes
//! when the node's pod subnets change. tapds that appear or vanish start or stop their task. Events go to
//! the engine through one bounded channel: when the engine falls behind, the gRPC streams wait (tapd, not
//! flowd, decides what to drop for a slow subscriber, and counts it).

use crate::{metrics::Registry, watch::Change};
use dnsflow_dnstap::DnsResponse;
use dnsflow_proto::v1::{dns_tap_client::DnsTapClient, SubscribeRequest};
use dnsflow_runtime::Backoff;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::Instrument as _;

/// First reconnect delay: a tapd restarting in a rolling update is back within a second or two.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest reconnect delay: a vanished tapd is normally removed by discovery long before this.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A subscription that lasted this long was healthy: the next failure starts from the shortest delay.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// Connecting to a tapd in the same cluster takes milliseconds; longer means it is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Counters of the subscriptions; shared with the metrics and the API.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    /// Subscriptions currently streaming.
    pub connected: Gauge<u64, AtomicU64>,
    /// Subscriptions established (first connects and reconnects).
    pub connects: Counter,
    /// Connection attempts or streams that failed.
    pub failures: Counter,
    /// Events received and handed to the engine.
    pub events: Counter,
    /// Of those, sent from a tapd's recent-answer replay.
    pub replayed: Counter,
    /// Events that did not convert to a `DnsResponse` (logged and dropped).
    pub invalid: Counter,
}

impl UpstreamStats {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tapd_connections",
            "tapd subscriptions streaming now",
            self.connected.clone(),
        );
        registry.counter(
            "tapd_connects",
            "Subscriptions to a tapd established (connects and reconnects)",
            &self.connects,
        );
        registry.counter(
            "tapd_failures",
            "Subscriptions to a tapd that failed to connect or broke",
            &self.failures,
        );
        registry.counter(
            "tapd_events",
            "Valid answers received from the tapds and passed on to the engine",
            &self.events,
        );
        registry.counter(
            "tapd_events_replayed",
            "Answers received from a tapd's replay of recent answers",
            &self.replayed,
        );
        registry.counter(
            "tapd_events_invalid",
            "Events from tapd that were not valid answers (dropped)",
            &self.invalid,
        );
    }
}

/// Counts a subscription as connected for as long as it lives.
struct Connected(Arc<UpstreamStats>);

impl Connected {
    fn new(stats: &Arc<UpstreamStats>) -> Self {
        stats.connected.inc();
        stats.connects.inc();
        Connected(stats.clone())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.connected.dec();
    }
}

/// How a subscription reaches its tapd.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// The HTTP/2 ping interval, and how long a ping may go unanswered.
    pub keepalive: Duration,
    /// Mutual TLS; plaintext when `None`.
    pub tls: Option<ClientTls>,
}

/// flowd's TLS material for tapd, read on every connect so that a rotated Secret takes effect.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The identity tapd's certificate must name.
    pub server_name: String,
}

impl ClientTls {
    async fn config(&self) -> Result<tonic::transport::ClientTlsConfig, SessionError> {
        let read = |path: &PathBuf| {
            let path = path.clone();
            async move {
                tokio::fs::read(&path)
                    .await
                    .map_err(|e| SessionError::Tls(format!("reading {}: {e}", path.display())))
            }
        };
        let (ca, cert, key) = (
            read(&self.ca).await?,
            read(&self.cert).await?,
            read(&self.key).await?,
        );
        Ok(tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .identity(tonic::transport::Identity::from_pem(cert, key))
            .domain_name(self.server_name.clone()))
    }
}

/// Why one subscription ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// With every cause below tonic's own ("transport error" alone does not tell a wrong CA from
    /// a tapd that proves another name).
    #[error("connect: {}", causes(.0))]
    Connect(#[from] tonic::transport::Error),
    #[error("subscribe: {0}")]
    Status(#[from] tonic::Status),
    #[error("connect: timed out after {CONNECT_TIMEOUT:?}")]
    Timeout,
    #[error("TLS: {0}")]
    Tls(String),
}

/// `error` and each of its sources, `: `-separated, repeats left out.
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = e.source();
    }
    out
}

/// The subscriptions, one per tapd endpoint.
#[derive(Debug)]
pub struct Upstreams {
    subnets: watch::Receiver<Vec<IpNet>>,
    events: mpsc::Sender<DnsResponse>,
    stats: Arc<UpstreamStats>,
    settings: Arc<SessionSettings>,
    tasks: BTreeMap<SocketAddr, JoinHandle<()>>,
}

impl Drop for Upstreams {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

impl Upstreams {
    /// `subnets`: this node's pod subnets, the subscription filter (nothing is subscribed while it is
    /// empty: an empty filter would mean every client of the cluster). `events`: to the engine.
    /// `settings`: how each subscription connects.
    pub fn new(
        subnets: watch::Receiver<Vec<IpNet>>,
        events: mpsc::Sender<DnsResponse>,
        stats: Arc<UpstreamStats>,
        settings: SessionSettings,
    ) -> Self {
        Self {
            subnets,
            events,
            stats,
            settings: Arc::new(settings),
            tasks: BTreeMap::new(),
        }
    }

    /// Subscribes to every endpoint of `endpoints` not yet subscribed and drops the subscriptions of
    /// endpoints no longer in it.
    pub fn set_endpoints(&mut self, endpoints: &BTreeSet<SocketAddr>) {
        self.tasks.retain(|addr, task| {
            let keep = endpoints.contains(addr);
            if !keep {
                tracing::info!(tapd = %addr, "tapd gone; unsubscribing");
                task.abort();
            }
            keep
        });
        for addr in endpoints {
            if !self.tasks.contains_key(addr) {
                tracing::info!(tapd = %addr, "tapd found; subscribing");
                let task = tokio::spawn(
                    subscription(
                        *addr,
                        self.subnets.clone(),
                        self.events.clone(),
                        self.stats.clone(),
                        Arc::clone(&self.settings),
                    )
                    .instrument(tracing::info_span!("tapd", tapd = %addr)),
                );
                self.tasks.insert(*addr, task);
            }
        }
    }

    /// The endpoints currently subscribed (or trying to).
    pub fn endpoints(&self) -> BTreeSet<SocketAddr> {
        self.tasks.keys().copied().collect()
    }
}

/// One tapd, forever: subscribe, stream, and after any end or failure wait and subscribe again.
async fn subscription(
    addr: SocketAddr,
    mut subnets: watch::Receiver<Vec<IpNet>>,
    events: mpsc::Sender<DnsResponse>,
    stats: Arc<UpstreamStats>,
    settings: Arc<SessionSettings>,
) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    loop {
        let filter = subnets.borrow_and_update().clone();
        if filter.is_empty() {
            // This node's pod subnets are not known yet.
            if subnets.changed().await.is_err() {
                return;
            }
            continue;
        }
        let started = tokio::time::Instant::now();
        let result = session(addr, &filter, &mut subnets, &events, &stats, &settings).await;
        if events.is_closed() {
            return;
        }
        if started.elapsed() >= HEALTHY_SESSION {
            backoff.reset();
        }
        let delay = match result {
            // The node's subnets changed: resubscribe with the new filter at once.
            Ok(End::Refilter) => continue,
            Ok(End::Closed) => {
                tracing::info!("tapd ended the stream; resubscribing");
                backoff.next_delay()
            }
            Err(error) => {
                stats.failures.inc();
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in = ?delay, "tapd subscription failed");
                delay
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            changed = subnets.changed() => if changed.is_err() { return },
        }
    }
}

enum End {
    /// tapd ended the stream (it is shutting down).
    Closed,
    /// The filter changed.
    Refilter,
}

async fn session(
    addr: SocketAddr,
    filter: &[IpNet],
    subnets: &mut watch::Receiver<Vec<IpNet>>,
    events: &mpsc::Sender<DnsResponse>,
    stats: &Arc<UpstreamStats>,
    settings: &SessionSettings,
) -> Result<End, SessionError> {
    let scheme = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    // The pings also run while no answer flows: a quiet node is when a partition goes unnoticed.
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(settings.keepalive)
        .keep_alive_timeout(settings.keepalive)
        .keep_alive_while_idle(true);
    if let Some(tls) = &settings.tls {
        endpoint = endpoint.tls_config(tls.config().await?)?;
    }
    let channel = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect())
        .await
        .map_err(|_| SessionError::Timeout)??;
    let request = SubscribeRequest {
        client_cidrs: filter.iter().map(ToString::to_string).collect(),
        replay_recent: true,
    };
    let mut stream = DnsTapClient::new(channel)
        .subscribe(request)
        .await?
        .into_inner();
    let _connected = Connected::new(stats);
    tracing::info!(subnets = ?filter, "subscribed");
    loop {
        let message = tokio::select! {
            m = stream.message() => m?,
            changed = subnets.changed() => {
                if changed.is_err() || *subnets.borrow() != filter {
                    return Ok(End::Refilter);
                }
                continue;
            }
        };
        let Some(event) = message else {
            return Ok(End::Closed);
        };
        match DnsResponse::try_from(event) {
            Ok(response) => {
                stats.events.inc();
                if response.replayed {
                    stats.replayed.inc();
                }
                if events.send(response).await.is_err() {
                    return Ok(End::Closed);
                }
            }
            Err(error) => {
                stats.invalid.inc();
                tracing::warn!(%error, "invalid event from tapd; skipped");
            }
        }
    }
}

/// The tapd endpoints of the DNS pods: each pod with an IP, at `port`. Kept current from the DNS pod
/// watch ([`crate::watch::dns_pods`]).
#[derive(Debug)]
pub struct DnsPods {
    port: u16,
    pods: HashMap<(String, String), IpAddr>,
}

impl DnsPods {
    pub fn new(port: u16) -> Self {
        Self {
            port,
            pods: HashMap::new(),
        }
    }

    /// Applies one change; true when the endpoint set may have changed.
    pub fn apply(&mut self, change: &Change<Pod>) -> bool {
        match change {
            Change::Applied(pod) => {
                let key = (pod.namespace().unwrap_or_default(), pod.name_any());
                let finished = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .is_some_and(|p| p == "Succeeded" || p == "Failed");
                let ip = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.as_deref())
                    .and_then(|ip| ip.parse::<IpAddr>().ok())
                    .filter(|_| !finished && pod.metadata.deletion_timestamp.is_none());
                match ip {
                    Some(ip) => self.pods.insert(key, ip) != Some(ip),
                    None => self.pods.remove(&key).is_some(),
                }
            }
            Change::Deleted(pod) => self
                .pods
                .remove(&(pod.namespace().unwrap_or_default(), pod.name_any()))
                .is_some(),
            Change::Synced => true,
        }
    }

    pub fn endpoints(&self) -> BTreeSet<SocketAddr> {
        self.pods
            .values()
            .map(|ip| SocketAddr::new(*ip, self.port))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamArgs;
    use clap::Parser;
    use futures::StreamExt as _;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        upstream: UpstreamArgs,
    }

    #[test]
    fn args_default_to_coredns_and_take_a_static_list() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert!(cli.upstream.endpoints.is_empty());
        assert_eq!(cli.upstream.tapd_namespace, "kube-system");
        assert_eq!(cli.upstream.tapd_selector, "k8s-app=kube-dns");
        assert_eq!(cli.upstream.tapd_port, 9530);
        let cli =
            Cli::try_parse_from(["x", "--tapd-endpoints", "10.0.0.1:9530,[fd00::1]:9530"]).unwrap();
        assert_eq!(cli.upstream.endpoints.len(), 2);
        assert!(Cli::try_parse_from(["x", "--tapd-endpoints", "coredns:9530"]).is_err());
    }

    fn dns_pod(name: &str, ip: Option<&str>, phase: &str) -> Box<Pod> {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "kube-system"},
            "status": {"phase": phase, "podIP": ip},
        }))
        .unwrap()
    }

    #[test]
    fn dns_pods_map_to_endpoints_as_they_come_and_go() {
        let mut pods = DnsPods::new(9530);
        assert!(!pods.apply(&Change::Applied(dns_pod("a", None, "Pending"))));
        assert!(pods.apply(&Change::Applied(dns_pod("a", Some("10.0.0.1"), "Running"))));
        assert!(pods.apply(&Change::Applied(dns_pod("b", Some("10.0.0.2"), "Running"))));
        assert!(!pods.apply(&Change::Applied(dns_pod("b", Some("10.0.0.2"), "Running"))));
        let want: BTreeSet<SocketAddr> = ["10.0.0.1:9530", "10.0.0.2:9530"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(pods.endpoints(), want);
        assert!(pods.apply(&Change::Applied(dns_pod("b", Some("10.0.0.2"), "Failed"))));
        assert!(pods.apply(&Change::Deleted(dns_pod("a", Some("10.0.0.1"), "Running"))));
        assert!(pods.endpoints().is_empty());
        assert!(!pods.apply(&Change::Applied(dns_pod("x", Some("not-an-ip"), "Running"))));
    }

    /// A DnsTap server that records each SubscribeRequest and, per subscription, sends one invalid
    /// event and one valid event for the first subnet asked for, then keeps the stream open.
    #[derive(Debug, Default, Clone)]
    struct FakeTapd {
        requests: Arc<std::sync::Mutex<Vec<SubscribeRequest>>>,
    }

    #[tonic::async_trait]
    impl dnsflow_proto::v1::dns_tap_server::DnsTap for FakeTapd {
        type SubscribeStream = std::pin::Pin<
            Box<
                dyn futures::Stream<Item = Result<dnsflow_proto::v1::DnsEvent, tonic::Status>>
                    + Send,
            >,
        >;

        async fn subscribe(
            &self,
            request: tonic::Request<SubscribeRequest>,
        ) -> Result<tonic::Response<Self::SubscribeStream>, tonic::Status> {
            let req = request.into_inner();
            let net: IpNet = req.client_cidrs[0].parse().unwrap();
            self.requests.lock().unwrap().push(req);
            let client = net.hosts().next().unwrap().to_string();
            let invalid = dnsflow_proto::v1::DnsEvent {
                client_ip: "not-an-ip".into(),
                query_name: "a.example.com".into(),
                ..Default::default()
            };
            let valid = dnsflow_proto::v1::DnsEvent {
                client_ip: client,
                query_name: "a.example.com".into(),
                answers: vec![dnsflow_proto::v1::Answer {
                    ip: "192.0.2.1".into(),
                    ttl: 30,
                }],
                replayed: true,
                ..Default::default()
            };
            let events = futures::stream::iter([Ok::<_, tonic::Status>(invalid), Ok(valid)])
                .chain(futures::stream::pending());
            Ok(tonic::Response::new(Box::pin(events)))
        }
    }

    async fn fake_tapd() -> (SocketAddr, FakeTapd) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = FakeTapd::default();
        let server = dnsflow_proto::v1::dns_tap_server::DnsTapServer::new(fake.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (addr, fake)
    }

    const WAIT: Duration = Duration::from_secs(10);
    const KEEPALIVE: Duration = Duration::from_secs(20);

    fn plain(keepalive: Duration) -> SessionSettings {
        SessionSettings {
            keepalive,
            tls: None,
        }
    }

    /// A TCP relay to `to` that forwards until `cut` is set, then silently drops every byte both ways
    /// while keeping both connections open: a network partition, as a peer sees it.
    async fn partitionable_relay(
        to: SocketAddr,
    ) -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let relay_cut = cut.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut from, mut into) in [(cr, sw), (sr, cw)] {
                    let cut = relay_cut.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf).await {
                            if n == 0 {
                                return;
                            }
                            if !cut.load(Ordering::Relaxed)
                                && into.write_all(&buf[..n]).await.is_err()
                            {
                                return;
                            }
                        }
                    });
                }
            }
        });
        (addr, cut)
    }

    #[tokio::test]
    async fn a_partitioned_tapd_is_noticed_by_keepalive_and_dialled_again() {
        let (tapd, _fake) = fake_tapd().await;
        let (addr, cut) = partitionable_relay(tapd).await;
        let (_subnets_tx, subnets_rx) = watch::channel(vec!["10.244.1.0/24".parse().unwrap()]);
        let (tx, mut rx) = mpsc::channel(16);
        let stats = Arc::new(UpstreamStats::default());
        let keepalive = Duration::from_millis(300);
        let mut upstreams = Upstreams::new(subnets_rx, tx, stats.clone(), plain(keepalive));
        upstreams.set_endpoints(&[addr].into_iter().collect());
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stats.connected.get(), 1);

        // The connection stays open but nothing crosses it any more: only the pings can tell.
        cut.store(true, std::sync::atomic::Ordering::Relaxed);
        let cut_at = tokio::time::Instant::now();
        while stats.failures.get() == 0 {
            assert!(cut_at.elapsed() < WAIT, "a partition went unnoticed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let noticed = cut_at.elapsed();
        assert!(noticed <= keepalive * 4, "noticed after {noticed:?}");
        assert_eq!(stats.connected.get(), 0);

        // Healed: the next dial subscribes again.
        cut.store(false, std::sync::atomic::Ordering::Relaxed);
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stats.connected.get(), 1);
    }

    #[tokio::test]
    async fn subscribes_with_the_node_subnets_counts_invalid_events_and_refilters() {
        let (addr, fake) = fake_tapd().await;
        let (subnets_tx, subnets_rx) = watch::channel(Vec::new());
        let (tx, mut rx) = mpsc::channel(16);
        let stats = Arc::new(UpstreamStats::default());
        let mut upstreams = Upstreams::new(subnets_rx, tx, stats.clone(), plain(KEEPALIVE));
        upstreams.set_endpoints(&[addr].into_iter().collect());

        // Without this node's subnets an empty filter would mean every client: nothing is subscribed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(fake.requests.lock().unwrap().is_empty());

        subnets_tx.send_replace(vec!["10.244.1.0/24".parse().unwrap()]);
        let first = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.client, "10.244.1.1".parse::<IpAddr>().unwrap());
        assert_eq!(stats.invalid.get(), 1);
        assert_eq!(stats.replayed.get(), 1);
        assert_eq!(stats.connected.get(), 1);
        {
            let requests = fake.requests.lock().unwrap();
            assert_eq!(requests.len(), 1);
            assert_eq!(requests[0].client_cidrs, ["10.244.1.0/24"]);
            assert!(requests[0].replay_recent);
        }

        // The node's subnets change: a new subscription with the new filter, at once.
        subnets_tx.send_replace(vec![
            "10.244.2.0/24".parse().unwrap(),
            "fd00:10:244:2::/64".parse().unwrap(),
        ]);
        let second = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second.client, "10.244.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            fake.requests.lock().unwrap()[1].client_cidrs,
            ["10.244.2.0/24", "fd00:10:244:2::/64"]
        );
        assert_eq!(stats.connects.get(), 2);

        // The tapd vanishes from discovery: its subscription ends.
        upstreams.set_endpoints(&BTreeSet::new());
        let deadline = tokio::time::Instant::now() + WAIT;
        while stats.connected.get() != 0 {
            assert!(tokio::time::Instant::now() < deadline, "still connected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(upstreams.endpoints().is_empty());
    }

    #[tokio::test]
    async fn an_unreachable_tapd_is_retried_with_backoff_and_counted() {
        // A port nobody listens on.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let (_subnets_tx, subnets_rx) = watch::channel(vec!["10.244.1.0/24".parse().unwrap()]);
        let (tx, _rx) = mpsc::channel(16);
        let stats = Arc::new(UpstreamStats::default());
        let mut upstreams = Upstreams::new(subnets_rx, tx, stats.clone(), plain(KEEPALIVE));
        let started = tokio::time::Instant::now();
        upstreams.set_endpoints(&[addr].into_iter().collect());
        while stats.failures.get() < 3 {
            assert!(started.elapsed() < WAIT, "no retries");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A refused connect fails at once: the time goes to the backoff, at least half of the first
        // two steps (200 ms, 400 ms).
        assert!(
            started.elapsed() >= (BACKOFF_MIN + BACKOFF_MIN * 2) / 2,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(stats.connected.get(), 0);
    }
}

//! Every flag of flowd, its environment variable, default and validation: the command line
//! ([`Cli`]), `flowd run` ([`RunArgs`], with whether and where it hears tapd, [`UpstreamArgs`]),
//! `flowd replay` ([`ReplayArgs`]) and the engine's settings both share ([`EngineSettings`]). A value
//! clap or [`Cli::validate`] refuses exits with [`EXIT_CONFIG`] before anything is bound, read or
//! started.
//!
//! The engine's settings:
//!
//! | flag | env | default |
//! | --- | --- | --- |
//! | `--priority-base` | `FLOWD_PRIORITY_BASE` | 11000 (OVN-K's EF rule 0: ACL 10000 + OVN's offset 1000) |
//! | `--idle-floor` | `FLOWD_IDLE_FLOOR` | 300s |
//! | `--idle-grace` | `FLOWD_IDLE_GRACE` | 30s |
//! | `--hard-cap` | `FLOWD_HARD_CAP` | none |
//! | `--bridge` | `FLOWD_BRIDGE` | br-int |
//! | `--acl-table` | `FLOWD_ACL_TABLE` | discovered (when set, OVN's EF flows must be there) |
//! | `--cookie-prefix` | `FLOWD_COOKIE_PREFIX` | 0x646e7366 ("dnsf") |
//! | `--reconcile-interval` | `FLOWD_RECONCILE_INTERVAL` | 60s |
//! | `--strict-dns-names` | `FLOWD_STRICT_DNS_NAMES` | false (plain names also cover subdomains) |
//! | `--cluster-subnet` | `FLOWD_CLUSTER_SUBNETS` | none (added to what OVN-K's configuration and the Nodes tell) |
//! | `--ovs-timeout` | `FLOWD_OVS_TIMEOUT` | 30s |
//! | `--max-grants-per-pod` | `FLOWD_MAX_GRANTS_PER_POD` | 5000 |
//! | `--max-grants-per-namespace` | `FLOWD_MAX_GRANTS_PER_NAMESPACE` | 50000 |

use crate::policy::PolicySettings;
use clap::{Parser, Subcommand};
use dnsflow_runtime::LogFormat;
use ipnet::IpNet;
use std::{net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

/// Exit code for bad configuration (EX_USAGE), in every subcommand: nothing has been bound, read or
/// started then.
pub const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "flowd",
    version,
    about = "DNS-aware per-pod egress flows for OVN-Kubernetes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replay a dnstap capture or a recorded event stream against a cluster snapshot, without a cluster.
    Replay(Box<ReplayArgs>),
    /// Run the node daemon.
    Run(Box<RunArgs>),
}

impl Cli {
    /// Checks what clap cannot, before anything is started.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.command {
            Command::Replay(args) => args.validate()?,
            Command::Run(args) => args.validate()?,
        }
        Ok(())
    }
}

/// How flowd writes flows (`--ovs-driver`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OvsDriver {
    Native,
    Ofctl,
}

/// Why flowd refuses its configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--node-name is empty")]
    NoNodeName,
    #[error(
        "--hold-deadline must be between 1ms and 5s (a held DNS response waits at most that), is {0:?}"
    )]
    HoldDeadline(Duration),
    #[error("--hold-timeout must be between 3s and 1h, is {0:?}")]
    HoldTimeout(Duration),
    #[error("--sync-timeout must be between 1s and 1h, is {0:?}")]
    SyncTimeout(Duration),
    #[error("--trusted-resolver names {0} resolvers; at most {max} are trusted", max = crate::resolvers::MAX_RESOLVERS)]
    TooManyResolvers(usize),
    #[error("--tapd-port must not be 0")]
    TapdPort,
    #[error("--tapd-endpoints names tapds to subscribe to, but --tapd=false subscribes to none")]
    TapdOffWithEndpoints,
    #[error(
        "--tapd=false leaves flowd only the DNS replies it holds in br-int, and {0}: it would learn no answer"
    )]
    NoAnswerSource(&'static str),
    #[error("--node is empty")]
    EmptyNode,
    #[error("--apply needs a bridge name")]
    EmptyBridge,
    #[error(transparent)]
    Engine(#[from] SettingsError),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// This node's name (the DaemonSet passes `spec.nodeName` through the downward API).
    #[arg(long, env = "FLOWD_NODE_NAME")]
    pub node_name: String,
    /// flowd's gRPC API (`dnsflow.v1.Flowd`, reflection, health).
    #[arg(long, env = "FLOWD_GRPC_LISTEN", default_value = "127.0.0.1:9540")]
    pub grpc_listen: SocketAddr,
    /// Prometheus `/metrics`, `/healthz` (alive) and `/readyz` (first sync done). flowd runs on the
    /// host network: the DaemonSet binds the node's own address (`$(NODE_IP):9541`), not every
    /// interface of the node.
    #[arg(long, env = "FLOWD_METRICS_LISTEN", default_value = "127.0.0.1:9541", value_parser = parse_listen)]
    pub metrics_listen: SocketAddr,
    /// Log format (RUST_LOG sets the filter).
    #[arg(long, env = "FLOWD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// This node's pod subnets (repeat or comma-separate), instead of the node's
    /// `k8s.ovn.org/node-subnets` annotation or `spec.podCIDRs`.
    #[arg(long = "pod-subnet", env = "FLOWD_POD_SUBNETS", value_delimiter = ',')]
    pub pod_subnets: Vec<IpNet>,
    /// OVN-Kubernetes's ConfigMap (namespace/name) that names the cluster's pod and service subnets
    /// (`net_cidr`, `svc_cidr`; or OpenShift's `ovnkube.conf`). flowd installs nothing and is not
    /// ready until it has read them; OpenShift's is openshift-ovn-kubernetes/ovnkube-config.
    #[arg(long, env = "FLOWD_OVN_CONFIG", default_value = crate::ovnkube::UPSTREAM_CONFIG)]
    pub ovn_config: crate::ovnkube::ObjectRef,
    /// The cluster's DNS Service (namespace/name), read by name. Replies from its ClusterIPs on its
    /// UDP ports are the only DNS replies flowd holds and learns from in br-int: a pod asking a DNS
    /// server of its own gets its answer, and flowd grants nothing for it. OpenShift's is
    /// openshift-dns/dns-default.
    #[arg(long, env = "FLOWD_DNS_SERVICE", default_value = crate::resolvers::UPSTREAM_DNS_SERVICE)]
    pub dns_service: crate::ovnkube::ObjectRef,
    /// More DNS servers whose replies flowd trusts, as IP (port 53) or IP:PORT (repeat or
    /// comma-separate), e.g. NodeLocal DNSCache's 169.254.20.10. Name only the cluster's own
    /// resolvers: whatever such a server answers, the pods it answers may reach.
    #[arg(
        long = "trusted-resolver",
        env = "FLOWD_TRUSTED_RESOLVERS",
        value_delimiter = ','
    )]
    pub trusted_resolvers: Vec<crate::resolvers::Resolver>,
    /// How long flowd waits for the first full list of pods, EgressFirewalls, nodes, OVN-K's
    /// ConfigMap and the DNS Service (an RBAC error, a missing CRD) before it removes the flows an
    /// earlier run left, which it cannot judge without them (fail closed); /readyz says why.
    #[arg(long, env = "FLOWD_SYNC_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub sync_timeout: Duration,
    /// Where flowd keeps what each pod of the node was told (names, addresses, TTLs), written every
    /// 30 s and at shutdown, and read once the cluster is listed after a start: a restart or an
    /// upgrade forgets no answer (the DaemonSet puts it on a hostPath). None: kept in memory only.
    #[arg(long, env = "FLOWD_STATE_FILE")]
    pub state_file: Option<std::path::PathBuf>,
    /// How batches of flows reach the bridge: `native`, flowd's own OpenFlow connection to
    /// `<OVS_RUNDIR>/<bridge>.mgmt` (a batch goes through ovs-ofctl while it cannot connect), or
    /// `ofctl`, one `ovs-ofctl --bundle` process per batch. Reading OVS always uses ovs-ofctl.
    #[arg(long, env = "FLOWD_OVS_DRIVER", value_enum, default_value_t = OvsDriver::Native)]
    pub ovs_driver: OvsDriver,
    /// Hold each pod's DNS responses in br-int until the grants they justify are installed (native
    /// driver only; pods of namespaces with a dnsName rule): the pod's first packet finds its flow.
    #[arg(long, env = "FLOWD_HOLD", default_value_t = true, action = clap::ArgAction::Set)]
    pub hold: bool,
    /// Longest a held DNS response waits for its grants; then it goes on anyway (counted).
    #[arg(long, env = "FLOWD_HOLD_DEADLINE", default_value = "100ms", value_parser = parse_duration)]
    pub hold_deadline: Duration,
    /// Hard timeout of the hold flows, renewed every third of it: a flowd that dies stops holding
    /// DNS within it.
    #[arg(long, env = "FLOWD_HOLD_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub hold_timeout: Duration,
    /// DNS responses held per second on this node; beyond it they go on at once, unheld (their
    /// answers still reach the engine).
    #[arg(long, env = "FLOWD_HOLD_RATE", default_value_t = crate::hold::DEFAULT_RATE.total)]
    pub hold_rate: NonZeroU32,
    /// DNS responses held per second for one pod: a pod flooding itself with DNS replies takes
    /// nothing from the others.
    #[arg(long, env = "FLOWD_HOLD_RATE_PER_POD", default_value_t = crate::hold::DEFAULT_RATE.per_pod)]
    pub hold_rate_per_pod: NonZeroU32,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    #[command(flatten)]
    pub engine: EngineSettings,
}

impl RunArgs {
    /// Checks what clap cannot, before anything is bound or started.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_name.trim().is_empty() {
            return Err(ConfigError::NoNodeName);
        }
        if !self.upstream.tapd {
            if !self.upstream.endpoints.is_empty() {
                return Err(ConfigError::TapdOffWithEndpoints);
            }
            // Without tapd the held replies are the only source of answers: a flowd that holds
            // nothing would install nothing, while looking healthy.
            if self.ovs_driver == OvsDriver::Ofctl {
                return Err(ConfigError::NoAnswerSource(
                    "--ovs-driver ofctl cannot hold packets",
                ));
            }
            if !self.hold {
                return Err(ConfigError::NoAnswerSource("--hold=false holds none"));
            }
        } else if self.upstream.endpoints.is_empty() && self.upstream.tapd_port == 0 {
            return Err(ConfigError::TapdPort);
        }
        // OpenFlow's hard timeout is whole seconds, 1..=65535; a deadline of 0 would hold nothing.
        if !(Duration::from_millis(1)..=Duration::from_secs(5)).contains(&self.hold_deadline) {
            return Err(ConfigError::HoldDeadline(self.hold_deadline));
        }
        if !(Duration::from_secs(3)..=Duration::from_secs(3600)).contains(&self.hold_timeout) {
            return Err(ConfigError::HoldTimeout(self.hold_timeout));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.sync_timeout) {
            return Err(ConfigError::SyncTimeout(self.sync_timeout));
        }
        if self.trusted_resolvers.len() > crate::resolvers::MAX_RESOLVERS {
            return Err(ConfigError::TooManyResolvers(self.trusted_resolvers.len()));
        }
        self.engine.validate()?;
        Ok(())
    }
}

/// Whether flowd listens to tapd, and where the tapd instances are.
#[derive(Clone, Debug, clap::Args)]
pub struct UpstreamArgs {
    /// Subscribe to tapd beside CoreDNS as a second source of answers; with false, flowd learns
    /// from the DNS replies it holds in br-int only (no DNS pods are watched, no tapd is dialled:
    /// what a cluster without tapd, such as OpenShift's managed DNS, runs with).
    #[arg(long = "tapd", env = "FLOWD_TAPD", default_value_t = true, action = clap::ArgAction::Set)]
    pub tapd: bool,
    /// Fixed tapd endpoints (`IP:port`, comma-separated); when given, no DNS pods are watched.
    #[arg(
        long = "tapd-endpoints",
        env = "FLOWD_TAPD_ENDPOINTS",
        value_delimiter = ','
    )]
    pub endpoints: Vec<SocketAddr>,
    /// Namespace of the DNS pods that carry tapd.
    #[arg(long, env = "FLOWD_TAPD_NAMESPACE", default_value = "kube-system")]
    pub tapd_namespace: String,
    /// Label selector of the DNS pods that carry tapd.
    #[arg(long, env = "FLOWD_TAPD_SELECTOR", default_value = "k8s-app=kube-dns")]
    pub tapd_selector: String,
    /// tapd's gRPC port in those pods.
    #[arg(long, env = "FLOWD_TAPD_PORT", default_value_t = 9530)]
    pub tapd_port: u16,
    /// HTTP/2 ping interval on each tapd subscription. A tapd that answers no ping within the same
    /// time (a partitioned node, a frozen process) is taken as gone and dialled again.
    #[arg(long, env = "FLOWD_TAPD_KEEPALIVE", default_value = "20s", value_parser = parse_duration)]
    pub tapd_keepalive: Duration,
    /// CA (PEM) that issued tapd's certificate. With --tapd-tls-cert and --tapd-tls-key, every tapd is
    /// reached over mutual TLS and must prove the identity --tapd-server-name. The files are read
    /// again on every (re)connect, so a rotated Secret takes effect without a restart.
    #[arg(long, env = "FLOWD_TAPD_TLS_CA", requires_all = ["tapd_tls_cert", "tapd_tls_key"])]
    pub tapd_tls_ca: Option<PathBuf>,
    /// flowd's client certificate chain (PEM), which tapd checks.
    #[arg(long, env = "FLOWD_TAPD_TLS_CERT", requires_all = ["tapd_tls_ca", "tapd_tls_key"])]
    pub tapd_tls_cert: Option<PathBuf>,
    /// flowd's private key (PEM).
    #[arg(long, env = "FLOWD_TAPD_TLS_KEY", requires_all = ["tapd_tls_ca", "tapd_tls_cert"])]
    pub tapd_tls_key: Option<PathBuf>,
    /// The identity (a DNS name in its certificate) every tapd must prove.
    #[arg(long, env = "FLOWD_TAPD_SERVER_NAME", default_value = "tapd.dnsflow")]
    pub tapd_server_name: String,
}

impl UpstreamArgs {
    /// How each subscription connects.
    pub fn session(&self) -> crate::upstream::SessionSettings {
        let tls = match (&self.tapd_tls_ca, &self.tapd_tls_cert, &self.tapd_tls_key) {
            (Some(ca), Some(cert), Some(key)) => Some(crate::upstream::ClientTls {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                server_name: self.tapd_server_name.clone(),
            }),
            _ => None,
        };
        crate::upstream::SessionSettings {
            keepalive: self.tapd_keepalive,
            tls,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One line per flow, per answer left without a usable flow, per rule entry that got no flow of its
    /// own, and per skipped event; then a summary.
    Text,
    /// One JSON document: events, flows, summary, warnings.
    Json,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Cluster snapshot: what `kubectl get -A pods,egressfirewalls,nodes -o yaml` prints, or
    /// multi-document YAML of those objects. Default: the shipped example.
    #[arg(long, env = "FLOWD_REPLAY_SNAPSHOT", value_name = "FILE")]
    pub snapshot: Option<PathBuf>,
    /// dnstap capture (Frame Streams file, as fstrm_capture or tapd --capture write it); `-` reads
    /// standard input. Default, when --events is not given either: the shipped example.
    #[arg(
        long,
        env = "FLOWD_REPLAY_CAPTURE",
        value_name = "FILE.fstrm",
        conflicts_with = "events"
    )]
    pub capture: Option<PathBuf>,
    /// The JSON that grpcurl prints for dnsflow.v1.DnsTap/Subscribe; `-` reads standard input.
    #[arg(long, env = "FLOWD_REPLAY_EVENTS", value_name = "FILE.json")]
    pub events: Option<PathBuf>,
    /// Only pods of this node get flows, as the daemon on that node would decide. Default: every pod.
    #[arg(long, env = "FLOWD_REPLAY_NODE", value_name = "NAME")]
    pub node: Option<String>,
    /// Output format.
    #[arg(long, env = "FLOWD_REPLAY_OUTPUT", value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Run the engine against this OVS bridge (as `flowd run` would) and install the flows, then exit.
    /// What the flows look like is learned from OVN's flows there, and the pods' ports are found there.
    #[arg(long, env = "FLOWD_REPLAY_APPLY", value_name = "BRIDGE")]
    pub apply: Option<String>,
    /// Run the engine without a bridge and print the exact `ovs-ofctl --bundle add-flows` input it
    /// would send, in the shape OVN 23.03.1 gives them (pods get stand-in port keys; the ACL table is
    /// --acl-table or a stand-in).
    #[arg(long, env = "FLOWD_REPLAY_DRY_RUN_OFCTL", conflicts_with = "apply")]
    pub dry_run_ofctl: bool,
    #[command(flatten)]
    pub engine: EngineSettings,
}

impl ReplayArgs {
    /// Checks what clap cannot, before any input is read.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.as_deref().is_some_and(|n| n.trim().is_empty()) {
            return Err(ConfigError::EmptyNode);
        }
        if self.apply.as_deref().is_some_and(|b| b.trim().is_empty()) {
            return Err(ConfigError::EmptyBridge);
        }
        self.engine.validate()?;
        Ok(())
    }
}

/// Durations read like tapd's (`500ms`, `30s`, `5m`, `1h`, bare seconds).
pub use dnsflow_runtime::{parse_duration, parse_listen};

/// A pod talking to 5,000 distinct addresses within one idle timeout is a crawler, not a client.
pub const DEFAULT_MAX_GRANTS_PER_POD: usize = 5_000;
/// A tenth of the node-wide cap: ten busy namespaces still fit.
pub const DEFAULT_MAX_GRANTS_PER_NAMESPACE: usize = 50_000;
/// "dnsf" in ASCII: easy to spot in `ovs-ofctl dump-flows`, and never an OVN cookie (those are 32-bit).
pub const DEFAULT_COOKIE_PREFIX: u32 = 0x646e_7366;

#[derive(Clone, Debug, clap::Args)]
pub struct EngineSettings {
    /// OpenFlow priority of EgressFirewall rule 0; rule i gets base - i.
    #[arg(long, env = "FLOWD_PRIORITY_BASE", default_value_t = 11000)]
    pub priority_base: u16,
    /// Shortest idle timeout a grant gets, whatever the TTL (e.g. 300s, 5m).
    #[arg(long, env = "FLOWD_IDLE_FLOOR", default_value = "300s", value_parser = parse_duration)]
    pub idle_floor: Duration,
    /// Added to max(TTL, floor) so that a client re-resolving at expiry never sees a gap.
    #[arg(long, env = "FLOWD_IDLE_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub idle_grace: Duration,
    /// Optional hard timeout: a flow goes after this long even while in use.
    #[arg(long, env = "FLOWD_HARD_CAP", value_parser = parse_duration)]
    pub hard_cap: Option<Duration>,
    /// The OVN integration bridge.
    #[arg(long, env = "FLOWD_BRIDGE", default_value = "br-int")]
    pub bridge: String,
    /// The EgressFirewall ACL table flowd expects. Flows always take the shape (table, ACL tier,
    /// conntrack hints, allow actions) learned from OVN's own flows; when set, OVN's EgressFirewall
    /// flows must be in this table, or flowd installs nothing.
    #[arg(long, env = "FLOWD_ACL_TABLE")]
    pub acl_table: Option<u8>,
    /// High 32 bits of every dnsflow flow's cookie (hex with 0x, or decimal).
    #[arg(long, env = "FLOWD_COOKIE_PREFIX", default_value = "0x646e7366", value_parser = parse_u32)]
    pub cookie_prefix: u32,
    /// Period of the full reconcile against `ovs-ofctl dump-flows`.
    #[arg(long, env = "FLOWD_RECONCILE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub reconcile_interval: Duration,
    /// OVN-K's strict matching: a plain dnsName matches only itself, not its subdomains.
    #[arg(long = "strict-dns-names", env = "FLOWD_STRICT_DNS_NAMES")]
    pub strict_names: bool,
    /// More subnets answers inside which never get a flow (repeat or comma-separate), besides what
    /// flowd discovers: OVN-K's configuration (pod, service, join, transit and masquerade subnets),
    /// every Node (its subnets and addresses), link-local, loopback and multicast.
    #[arg(
        long = "cluster-subnet",
        env = "FLOWD_CLUSTER_SUBNETS",
        value_delimiter = ','
    )]
    pub cluster_subnets: Vec<IpNet>,
    /// How long one `ovs-ofctl`/`ovs-vsctl` call may take before it is killed and the batch retried.
    #[arg(long, env = "FLOWD_OVS_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub ovs_timeout: Duration,
    /// Flows one pod's answers may hold at once (and answers remembered per pod): one pod resolving
    /// many names under a wildcard cannot starve the others. A grant beyond it is counted and logged.
    #[arg(long, env = "FLOWD_MAX_GRANTS_PER_POD", default_value_t = DEFAULT_MAX_GRANTS_PER_POD)]
    pub max_grants_per_pod: usize,
    /// Flows the pods of one namespace may hold at once.
    #[arg(long, env = "FLOWD_MAX_GRANTS_PER_NAMESPACE", default_value_t = DEFAULT_MAX_GRANTS_PER_NAMESPACE)]
    pub max_grants_per_namespace: usize,
}

/// Why a setting is refused.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("--cookie-prefix must not be 0: a zero prefix is OVN's own cookie space")]
    ZeroCookiePrefix,
    #[error("--idle-floor plus --idle-grace must be between 1s and 65535s, is {0:?}")]
    IdleRange(Duration),
    #[error("--reconcile-interval must be at least 1s")]
    ReconcileInterval,
    #[error("--acl-table {0} leaves no table after it to continue to (at most 253)")]
    AclTable(u8),
    #[error("--ovs-timeout must be at least 1s")]
    OvsTimeout,
    #[error("--max-grants-per-pod and --max-grants-per-namespace must be at least 1")]
    ZeroCap,
}

impl EngineSettings {
    /// Checks what clap cannot, before anything starts.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.cookie_prefix == 0 {
            return Err(SettingsError::ZeroCookiePrefix);
        }
        let idle = self.idle_floor + self.idle_grace;
        if idle < Duration::from_secs(1) || idle > Duration::from_secs(u16::MAX.into()) {
            return Err(SettingsError::IdleRange(idle));
        }
        if self.reconcile_interval < Duration::from_secs(1) {
            return Err(SettingsError::ReconcileInterval);
        }
        // OpenFlow tables end at 254; an allow continues to the next one.
        if let Some(t) = self.acl_table.filter(|t| *t > 253) {
            return Err(SettingsError::AclTable(t));
        }
        if self.ovs_timeout < Duration::from_secs(1) {
            return Err(SettingsError::OvsTimeout);
        }
        if self.max_grants_per_pod == 0 || self.max_grants_per_namespace == 0 {
            return Err(SettingsError::ZeroCap);
        }
        Ok(())
    }

    /// What the decision needs of these settings.
    pub fn policy(&self) -> PolicySettings {
        PolicySettings {
            priority_base: self.priority_base,
            strict_names: self.strict_names,
            cluster_subnets: self.cluster_subnets.clone(),
        }
    }

    /// `idle_timeout` for an answer with this TTL: max(TTL, floor) + grace, in OpenFlow's u16 seconds.
    /// A TTL with the top bit set counts as 0 (RFC 2181 §8).
    pub fn idle_timeout(&self, ttl: u32) -> u16 {
        let ttl = if ttl > i32::MAX as u32 { 0 } else { ttl };
        let secs = u64::from(ttl).max(self.idle_floor.as_secs()) + self.idle_grace.as_secs();
        u16::try_from(secs.max(1)).unwrap_or(u16::MAX)
    }

    /// `hard_timeout`, when capped.
    pub fn hard_timeout(&self) -> Option<u16> {
        self.hard_cap
            .map(|d| u16::try_from(d.as_secs().max(1)).unwrap_or(u16::MAX))
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            priority_base: 11000,
            idle_floor: Duration::from_secs(300),
            idle_grace: Duration::from_secs(30),
            hard_cap: None,
            bridge: "br-int".into(),
            acl_table: None,
            cookie_prefix: DEFAULT_COOKIE_PREFIX,
            reconcile_interval: Duration::from_secs(60),
            strict_names: false,
            cluster_subnets: Vec::new(),
            ovs_timeout: Duration::from_secs(30),
            max_grants_per_pod: DEFAULT_MAX_GRANTS_PER_POD,
            max_grants_per_namespace: DEFAULT_MAX_GRANTS_PER_NAMESPACE,
        }
    }
}

#[cfg(any(test, feature = "test-support"))]
impl EngineSettings {
    /// The defaults with kind's pod, service and join subnets given as `--cluster-subnet`: what
    /// flowd's own tests run with where no OVN-K ConfigMap is read.
    pub fn for_kind() -> Self {
        Self {
            cluster_subnets: [
                "10.244.0.0/16",
                "fd00:10:244::/48",
                "10.96.0.0/16",
                "fd00:10:96::/112",
                "100.64.0.0/16",
                "fd98::/64",
            ]
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect(),
            ..Self::default()
        }
    }
}

/// Parses `0x646e7366` or a decimal number.
pub fn parse_u32(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        settings: EngineSettings,
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let s = Cli::try_parse_from(["flowd"]).unwrap().settings;
        let d = EngineSettings::default();
        assert_eq!(s.priority_base, 11000);
        assert_eq!((s.idle_floor, s.idle_grace), (d.idle_floor, d.idle_grace));
        assert_eq!(s.cookie_prefix, DEFAULT_COOKIE_PREFIX);
        assert_eq!(s.cluster_subnets, d.cluster_subnets);
        // Nothing by default: the cluster's subnets are discovered, never assumed to be kind's.
        assert!(s.cluster_subnets.is_empty());
        assert_eq!(
            (s.bridge.as_str(), s.acl_table, s.hard_cap),
            ("br-int", None, None)
        );
        assert!(!s.strict_names);
        assert_eq!(
            (s.max_grants_per_pod, s.max_grants_per_namespace),
            (5_000, 50_000)
        );
        s.validate().unwrap();
    }

    #[test]
    fn flags_override_everything() {
        let s = Cli::try_parse_from([
            "flowd",
            "--priority-base=20000",
            "--idle-floor=1s",
            "--idle-grace=500ms",
            "--hard-cap=1h",
            "--bridge=br-test",
            "--acl-table=44",
            "--cookie-prefix=0xabcdef01",
            "--reconcile-interval=5m",
            "--strict-dns-names",
            "--cluster-subnet=10.0.0.0/8,fd00::/8",
        ])
        .unwrap()
        .settings;
        assert_eq!(s.priority_base, 20000);
        assert_eq!(s.idle_grace, Duration::from_millis(500));
        assert_eq!(s.hard_timeout(), Some(3600));
        assert_eq!((s.acl_table, s.cookie_prefix), (Some(44), 0xabcd_ef01));
        assert_eq!(s.reconcile_interval, Duration::from_secs(300));
        assert!(s.strict_names);
        assert_eq!(s.cluster_subnets.len(), 2);
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            &["flowd", "--idle-floor=5 minutes"][..],
            &["flowd", "--allow-actions=resubmit(,45)"],
            &["flowd", "--cookie-prefix=0x1ffffffff"],
            &["flowd", "--cluster-subnet=10.0.0.0/33"],
            &["flowd", "--acl-table=256"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} accepted");
        }
        let zero = Cli::try_parse_from(["flowd", "--cookie-prefix=0"]).unwrap();
        assert!(zero.settings.validate().is_err());
        let long = Cli::try_parse_from(["flowd", "--idle-floor=20h"]).unwrap();
        assert!(long.settings.validate().is_err());
        let last = Cli::try_parse_from(["flowd", "--acl-table=254"]).unwrap();
        assert!(last.settings.validate().is_err());
    }

    #[test]
    fn idle_timeout_is_max_of_ttl_and_floor_plus_grace() {
        let s = EngineSettings::default();
        assert_eq!(s.idle_timeout(5), 330);
        assert_eq!(s.idle_timeout(3600), 3630);
        assert_eq!(s.idle_timeout(65_535), u16::MAX);
        assert_eq!(s.idle_timeout(1 << 31), 330, "top bit set: TTL 0");
        assert_eq!(s.idle_timeout(u32::MAX), 330);
    }
}

#[cfg(test)]
mod run_tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct RunCli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn run_args_parse_with_defaults_and_validate() {
        let cli = RunCli::try_parse_from(["flowd", "--node-name", "n1"]).unwrap();
        assert_eq!(cli.run.grpc_listen, "127.0.0.1:9540".parse().unwrap());
        assert_eq!(cli.run.metrics_listen, "127.0.0.1:9541".parse().unwrap());
        assert_eq!(cli.run.log_format, LogFormat::Text);
        assert!(cli.run.pod_subnets.is_empty());
        assert_eq!(cli.run.ovn_config.to_string(), "ovn-kubernetes/ovn-config");
        assert_eq!(cli.run.ovs_driver, OvsDriver::Native);
        assert!(cli.run.hold);
        assert_eq!(cli.run.hold_deadline, Duration::from_millis(100));
        assert_eq!(cli.run.hold_timeout, Duration::from_secs(10));
        assert_eq!(
            (cli.run.hold_rate.get(), cli.run.hold_rate_per_pod.get()),
            (2000, 200)
        );
        cli.run.validate().unwrap();

        let cli = RunCli::try_parse_from([
            "flowd",
            "--node-name",
            "n1",
            "--pod-subnet",
            "10.244.1.0/24,fd00:10:244:2::/64",
            "--log-format",
            "json",
            "--ovn-config",
            "openshift-ovn-kubernetes/ovnkube-config",
        ])
        .unwrap();
        assert_eq!(cli.run.pod_subnets.len(), 2);
        assert_eq!(cli.run.ovn_config.namespace, "openshift-ovn-kubernetes");
        assert_eq!(cli.run.log_format, LogFormat::Json);
    }

    #[test]
    fn bad_config_is_refused_before_anything_starts() {
        assert!(
            RunCli::try_parse_from(["flowd"]).is_err(),
            "node name required"
        );
        assert!(
            RunCli::try_parse_from(["flowd", "--node-name", "n", "--pod-subnet", "x"]).is_err()
        );
        assert!(RunCli::try_parse_from([
            "flowd",
            "--node-name",
            "n",
            "--ovn-config",
            "ovn-config"
        ])
        .is_err());
        let cli = RunCli::try_parse_from(["flowd", "--node-name", " "]).unwrap();
        assert!(matches!(cli.run.validate(), Err(ConfigError::NoNodeName)));
        let cli =
            RunCli::try_parse_from(["flowd", "--node-name", "n", "--cookie-prefix", "0"]).unwrap();
        assert!(matches!(cli.run.validate(), Err(ConfigError::Engine(_))));
        let cli =
            RunCli::try_parse_from(["flowd", "--node-name", "n", "--tapd-port", "0"]).unwrap();
        assert!(matches!(cli.run.validate(), Err(ConfigError::TapdPort)));
        for (flag, value) in [
            ("--hold-deadline", "0s"),
            ("--hold-deadline", "10s"),
            ("--hold-timeout", "1s"),
            ("--sync-timeout", "0s"),
            ("--sync-timeout", "2h"),
        ] {
            let cli = RunCli::try_parse_from(["flowd", "--node-name", "n", flag, value]).unwrap();
            assert!(cli.run.validate().is_err(), "{flag} {value}");
        }
        let off = RunCli::try_parse_from(["flowd", "--node-name", "n", "--hold", "false"]).unwrap();
        assert!(!off.run.hold);
        for flag in ["--hold-rate", "--hold-rate-per-pod"] {
            assert!(RunCli::try_parse_from(["flowd", "--node-name", "n", flag, "0"]).is_err());
        }
        let many = (1..=17)
            .map(|i| format!("10.0.0.{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let cli =
            RunCli::try_parse_from(["flowd", "--node-name", "n", "--trusted-resolver", &many])
                .unwrap();
        assert!(matches!(
            cli.run.validate(),
            Err(ConfigError::TooManyResolvers(17))
        ));
        assert!(
            RunCli::try_parse_from(["flowd", "--node-name", "n", "--trusted-resolver", "x"])
                .is_err()
        );
    }

    #[test]
    fn the_trusted_dns_servers_are_the_dns_service_and_the_flag() {
        let cli = RunCli::try_parse_from(["flowd", "--node-name", "n"]).unwrap();
        assert_eq!(cli.run.dns_service.to_string(), "kube-system/kube-dns");
        assert!(cli.run.trusted_resolvers.is_empty());
        assert_eq!(cli.run.sync_timeout, Duration::from_secs(120));
        let cli = RunCli::try_parse_from([
            "flowd",
            "--node-name",
            "n",
            "--dns-service",
            crate::resolvers::OPENSHIFT_DNS_SERVICE,
            "--trusted-resolver",
            "169.254.20.10,[fd00::a]:5353",
        ])
        .unwrap();
        assert_eq!(cli.run.dns_service.namespace, "openshift-dns");
        let given: Vec<String> = cli
            .run
            .trusted_resolvers
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(given, ["169.254.20.10:53", "[fd00::a]:5353"]);
    }

    #[test]
    fn tapd_is_a_second_source_that_can_be_switched_off() {
        let on = RunCli::try_parse_from(["flowd", "--node-name", "n"]).unwrap();
        assert!(on.run.upstream.tapd, "tapd is heard by default");
        for (args, tapd) in [
            (&["--tapd", "false"][..], false),
            (&["--tapd=false"], false),
            (&["--tapd=true"], true),
        ] {
            let cli =
                RunCli::try_parse_from(["flowd", "--node-name", "n"].iter().chain(args).copied())
                    .unwrap();
            assert_eq!(cli.run.upstream.tapd, tapd, "{args:?}");
            cli.run.validate().unwrap();
        }
        // A bool flag that takes its value, as --hold does: alone it is an error, not "true".
        assert!(RunCli::try_parse_from(["flowd", "--node-name", "n", "--tapd"]).is_err());
        assert!(RunCli::try_parse_from(["flowd", "--node-name", "n", "--tapd=no"]).is_err());
        // Without tapd, its port does not matter; a list of tapds contradicts it.
        let off = |extra: &[&str]| {
            RunCli::try_parse_from(
                ["flowd", "--node-name", "n", "--tapd=false"]
                    .iter()
                    .chain(extra)
                    .copied(),
            )
            .unwrap()
            .run
            .validate()
        };
        off(&["--tapd-port", "0"]).unwrap();
        assert!(matches!(
            off(&["--tapd-endpoints", "10.0.0.1:9530"]),
            Err(ConfigError::TapdOffWithEndpoints)
        ));
        // The held replies are then the only source: a flowd that cannot hold would learn nothing.
        for extra in [&["--hold", "false"][..], &["--ovs-driver", "ofctl"]] {
            assert!(
                matches!(off(extra), Err(ConfigError::NoAnswerSource(_))),
                "{extra:?}"
            );
        }
        // The OpenShift overlay sets it as FLOWD_TAPD (read from the definition rather than by
        // setting the variable: the environment is shared with the tests running beside this one).
        use clap::CommandFactory as _;
        let cmd = RunCli::command();
        let flag = cmd.get_arguments().find(|a| a.get_long() == Some("tapd"));
        assert_eq!(
            flag.and_then(|f| f.get_env()),
            Some(std::ffi::OsStr::new("FLOWD_TAPD"))
        );
    }
}

#[cfg(test)]
mod cli_tests {
    use super::*;

    #[test]
    fn every_subcommand_validates_its_configuration() {
        for (args, refused) in [
            (&["flowd", "replay"][..], false),
            (&["flowd", "replay", "--cookie-prefix", "0"], true),
            (&["flowd", "replay", "--node", " "], true),
            (&["flowd", "replay", "--apply", ""], true),
            (&["flowd", "run", "--node-name", "n1"], false),
            (&["flowd", "run", "--node-name", " "], true),
            (
                &[
                    "flowd",
                    "run",
                    "--node-name",
                    "n1",
                    "--idle-floor",
                    "0s",
                    "--idle-grace",
                    "0s",
                ],
                true,
            ),
        ] {
            let cli = Cli::try_parse_from(args).expect("clap accepts it");
            assert_eq!(cli.validate().is_err(), refused, "{args:?}");
        }
    }
}

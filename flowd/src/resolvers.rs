//! The DNS servers whose answers flowd believes when it reads them from packets: the cluster's own
//! resolvers, and nobody else.
//!
//! A pod may ask any server it can reach (another pod, a host on the internet it is allowed to
//! talk to) and that server may answer anything: were such an answer learned, a pod under
//! "Allow `dnsName: example.com`" could open its EgressFirewall to any address by running a DNS
//! server of its own. So the hold (see [`crate::hold`]) holds, and the engine learns from, only
//! replies whose source is one of these:
//!
//! - every ClusterIP of the cluster's DNS Service (`kube-system/kube-dns`, OpenShift's
//!   `openshift-dns/dns-default`), on the Service's UDP ports (and the same port numbers over TCP).
//!   The node switch's load balancer DNATs a pod's query to a CoreDNS pod in the pod's conntrack
//!   zone and un-DNATs the reply, so the reply reaches the pod from exactly `ClusterIP:port`. A
//!   CoreDNS pod's own address is never trusted: a reply from it did not come through the Service.
//! - the addresses given with `--trusted-resolver` (NodeLocal DNSCache's, a resolver a platform
//!   documents).
//!
//! Replies from anyone else reach the pod untouched and teach flowd nothing; they are counted.

use dnsflow_dnstap::packet::DNS_PORT;
use k8s_openapi::api::core::v1::Service;
use std::{collections::BTreeSet, fmt, net::IpAddr, net::SocketAddr, str::FromStr};
use tokio::sync::watch;

/// The DNS Service flowd trusts by default (kind, upstream OVN-Kubernetes).
pub const UPSTREAM_DNS_SERVICE: &str = "kube-system/kube-dns";
/// OpenShift's DNS Service.
pub const OPENSHIFT_DNS_SERVICE: &str = "openshift-dns/dns-default";
/// Trusted addresses at most: every one costs a hold flow per pod and family. A dual-stack DNS
/// Service has two ClusterIPs; a handful more come from the flag.
pub const MAX_RESOLVERS: usize = 16;

/// One trusted source of DNS replies: an address and port, over UDP (held and learned) and TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Resolver(pub SocketAddr);

impl FromStr for Resolver {
    type Err = String;

    /// `IP` (port 53), `IP:PORT` or `[IPv6]:PORT`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self(SocketAddr::new(ip, DNS_PORT)));
        }
        let addr: SocketAddr = s
            .parse()
            .map_err(|_| format!("{s:?} is not IP, IP:PORT or [IPv6]:PORT"))?;
        if addr.port() == 0 {
            return Err(format!("{s:?}: port 0"));
        }
        Ok(Self(addr))
    }
}

impl fmt::Display for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The trusted sources of DNS replies, sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolverSet(BTreeSet<SocketAddr>);

impl ResolverSet {
    /// At most [`MAX_RESOLVERS`] of `addrs`, the first in order; the rest are named in the error.
    pub fn new(addrs: impl IntoIterator<Item = SocketAddr>) -> (Self, Option<String>) {
        let all: BTreeSet<SocketAddr> = addrs.into_iter().collect();
        let dropped: Vec<String> = all
            .iter()
            .skip(MAX_RESOLVERS)
            .map(ToString::to_string)
            .collect();
        let kept = all.into_iter().take(MAX_RESOLVERS).collect();
        let error = (!dropped.is_empty()).then(|| {
            format!(
                "more than {MAX_RESOLVERS} trusted DNS resolvers; not trusted: {}",
                dropped.join(", ")
            )
        });
        (Self(kept), error)
    }

    /// Whether a reply from `source` (the packet's source address and port) may be believed.
    pub fn trusts(&self, source: SocketAddr) -> bool {
        self.0.contains(&normalize(source))
    }

    pub fn iter(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.0.iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl fmt::Display for ResolverSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let all: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&all.join(", "))
    }
}

/// An IPv4-mapped IPv6 address is the IPv4 address it maps.
fn normalize(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Why a DNS Service gives no trusted address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("it has no ClusterIP (headless or ExternalName): its replies cannot be told apart")]
    NoClusterIp,
    #[error("ClusterIP {0:?} is not an IP address")]
    BadClusterIp(String),
    #[error("it has no UDP port")]
    NoUdpPort,
    #[error("port {0} is not 1-65535")]
    BadPort(i32),
}

/// The addresses a reply through the DNS Service `svc` comes from: each ClusterIP with each UDP
/// port of the Service.
pub fn service_resolvers(svc: &Service) -> Result<Vec<SocketAddr>, ServiceError> {
    let spec = svc.spec.as_ref().ok_or(ServiceError::NoClusterIp)?;
    let mut ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.iter());
    }
    let ips: Vec<IpAddr> = ips
        .into_iter()
        .filter(|ip| !ip.is_empty() && ip.as_str() != "None")
        .map(|ip| {
            ip.parse()
                .map_err(|_| ServiceError::BadClusterIp(ip.clone()))
        })
        .collect::<Result<_, _>>()?;
    if ips.is_empty() {
        return Err(ServiceError::NoClusterIp);
    }
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        // A Service port's protocol defaults to TCP.
        if p.protocol.as_deref() != Some("UDP") {
            continue;
        }
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or(ServiceError::BadPort(p.port))?;
        ports.push(port);
    }
    if ports.is_empty() {
        return Err(ServiceError::NoUdpPort);
    }
    Ok(ips
        .iter()
        .flat_map(|ip| ports.iter().map(|port| SocketAddr::new(*ip, *port)))
        .collect())
}

/// The trusted resolvers as they change: the fixed ones from the flag, and the DNS Service's as
/// the watch reports it. Readers ([`TrustedResolvers::subscribe`]) always see the union.
#[derive(Debug)]
pub struct TrustedResolvers {
    fixed: Vec<SocketAddr>,
    from_service: Vec<SocketAddr>,
    tx: watch::Sender<ResolverSet>,
}

impl TrustedResolvers {
    /// Trusts `fixed` until the DNS Service is read.
    pub fn new(fixed: &[Resolver]) -> Self {
        let fixed: Vec<SocketAddr> = fixed.iter().map(|r| normalize(r.0)).collect();
        let (set, _) = ResolverSet::new(fixed.iter().copied());
        Self {
            fixed,
            from_service: Vec::new(),
            tx: watch::channel(set).0,
        }
    }

    /// The DNS Service's addresses now (empty when it is gone or unusable). Returns whether the set
    /// changed, and a warning when some addresses were beyond [`MAX_RESOLVERS`].
    pub fn set_service(&mut self, addrs: Vec<SocketAddr>) -> (bool, Option<String>) {
        self.from_service = addrs.into_iter().map(normalize).collect();
        let (set, error) = ResolverSet::new(self.fixed.iter().chain(&self.from_service).copied());
        (
            self.tx
                .send_if_modified(|s| std::mem::replace(s, set) != *s),
            error,
        )
    }

    pub fn current(&self) -> ResolverSet {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<ResolverSet> {
        self.tx.subscribe()
    }
}

/// A receiver of a set that never changes (its sender is gone: `changed()` never fires): for
/// tests and benches.
pub fn fixed(addrs: impl IntoIterator<Item = SocketAddr>) -> watch::Receiver<ResolverSet> {
    watch::channel(ResolverSet::new(addrs).0).1
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "kube-dns", "namespace": "kube-system"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_dns_service_gives_each_cluster_ip_on_each_udp_port() {
        let kube_dns = service(json!({
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10", "fd00:10:96::a"],
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                {"name": "metrics", "port": 9153, "protocol": "TCP", "targetPort": 9153},
            ],
        }));
        assert_eq!(
            service_resolvers(&kube_dns).unwrap(),
            [addr("10.96.0.10:53"), addr("[fd00:10:96::a]:53")]
        );
        // OpenShift's dns-default maps 53 to CoreDNS's 5353; the reply comes from port 53.
        let openshift = service(json!({
            "clusterIP": "172.30.0.10",
            "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"}],
        }));
        assert_eq!(
            service_resolvers(&openshift).unwrap(),
            [addr("172.30.0.10:53")]
        );
    }

    #[test]
    fn a_service_whose_replies_cannot_be_told_apart_gives_nothing() {
        for (spec, error) in [
            (
                json!({"clusterIP": "None", "ports": [{"port": 53, "protocol": "UDP"}]}),
                ServiceError::NoClusterIp,
            ),
            (
                json!({"type": "ExternalName", "externalName": "dns.example"}),
                ServiceError::NoClusterIp,
            ),
            (
                json!({"clusterIP": "10.96.0.10", "ports": [{"port": 53}]}),
                ServiceError::NoUdpPort,
            ),
            (
                json!({"clusterIP": "ten", "ports": [{"port": 53, "protocol": "UDP"}]}),
                ServiceError::BadClusterIp("ten".into()),
            ),
            (
                json!({"clusterIP": "10.96.0.10", "ports": [{"port": 70000, "protocol": "UDP"}]}),
                ServiceError::BadPort(70000),
            ),
        ] {
            assert_eq!(service_resolvers(&service(spec)), Err(error));
        }
        assert_eq!(
            service_resolvers(&Service::default()),
            Err(ServiceError::NoClusterIp)
        );
    }

    #[test]
    fn the_flag_takes_an_address_with_or_without_a_port() {
        let parse = |s: &str| s.parse::<Resolver>().map(|r| r.0);
        assert_eq!(parse("169.254.20.10"), Ok(addr("169.254.20.10:53")));
        assert_eq!(parse("10.0.0.2:5353"), Ok(addr("10.0.0.2:5353")));
        assert_eq!(parse("fd00::a"), Ok(addr("[fd00::a]:53")));
        assert_eq!(parse("[fd00::a]:54"), Ok(addr("[fd00::a]:54")));
        for bad in ["", "dns.example", "10.0.0.2:0", "10.0.0.2:x", "10.0.0.0/8"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_the_exact_address_and_port_are_trusted() {
        let mut trusted = TrustedResolvers::new(&["169.254.20.10".parse().unwrap()]);
        let mut rx = trusted.subscribe();
        assert!(trusted.current().trusts(addr("169.254.20.10:53")));
        assert_eq!(
            trusted.set_service(vec![addr("10.96.0.10:53")]),
            (true, None)
        );
        assert!(rx.has_changed().unwrap());
        let set = rx.borrow_and_update().clone();
        assert_eq!(set.to_string(), "10.96.0.10:53, 169.254.20.10:53");
        for (source, trusted) in [
            ("10.96.0.10:53", true),
            ("[::ffff:10.96.0.10]:53", true),
            ("10.96.0.10:5353", false),
            ("10.96.0.11:53", false),
            ("10.244.1.9:53", false),
        ] {
            assert_eq!(set.trusts(addr(source)), trusted, "{source}");
        }
        // The same again changes nothing; the Service gone leaves the flag's.
        assert_eq!(
            trusted.set_service(vec![addr("10.96.0.10:53")]),
            (false, None)
        );
        assert_eq!(trusted.set_service(Vec::new()), (true, None));
        assert_eq!(trusted.current().to_string(), "169.254.20.10:53");
        assert_eq!(TrustedResolvers::new(&[]).current().to_string(), "none");
    }

    #[test]
    fn beyond_the_cap_addresses_are_named_and_not_trusted() {
        let mut trusted = TrustedResolvers::new(&[]);
        let many: Vec<SocketAddr> = (1..=20u8)
            .map(|i| SocketAddr::new(IpAddr::from([10, 96, 0, i]), 53))
            .collect();
        let (changed, error) = trusted.set_service(many);
        assert!(changed);
        assert_eq!(trusted.current().len(), MAX_RESOLVERS);
        let error = error.unwrap();
        assert!(error.contains("10.96.0.17:53, 10.96.0.18:53"), "{error}");
        assert!(!error.contains("10.96.0.9:53"), "{error}");
    }
}

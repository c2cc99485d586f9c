//! The typed vocabulary shared by the decision (`policy`), the engine and the OVS driver: pods, and
//! the grants a DNS answer earns. Nothing here holds a string that came from DNS except `GrantReason`,
//! which is for humans (logs, `flowd replay`, the inspection API) and never reaches a command line.

use dnsflow_dnstap::DnsName;
use std::{fmt, net::IpAddr};

/// A pod, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl PodKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// OVN-K's logical port name, also the OVS Interface `external_ids:iface-id`.
    pub fn iface_id(&self) -> String {
        format!("{}_{}", self.namespace, self.name)
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What flowd needs to know of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub key: PodKey,
    /// `metadata.uid`, when known: a pod recreated under the same name is another pod, and inherits
    /// nothing of the old one (not its answers, not its flows).
    pub uid: Option<String>,
    /// The pod's IPs (`status.podIPs`), at most one per family in practice.
    pub ips: Vec<IpAddr>,
    /// `spec.nodeName`; flows are only ever installed for pods of flowd's own node.
    pub node: String,
}

/// L4 protocol of an EgressFirewall port entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        })
    }
}

/// A rule's port entry: protocol and destination port (1..=65535).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortMatch {
    pub protocol: Protocol,
    pub port: u16,
}

/// Allow continues OVN's pipeline the way OVN's own allow flow does; Deny drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny,
}

/// Identity of one flow: two grants with the same key are the same flow (a refresh).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub pod: PodKey,
    /// OpenFlow priority (`priority_base - rule_index`).
    pub priority: u16,
    /// The pod's IP (source); same family as `dst`.
    pub src: IpAddr,
    /// The answer IP (destination).
    pub dst: IpAddr,
    /// `None` when the rule has no ports.
    pub l4: Option<PortMatch>,
}

/// Why a grant exists, for humans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantReason {
    /// The name the pod asked for.
    pub qname: DnsName,
    /// The EgressFirewall rule that matched (0-based) and its `dnsName` as written.
    pub rule_index: usize,
    pub dns_name: String,
}

/// One flow the decision wants, with how long the DNS answer justifies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub key: FlowKey,
    pub verdict: Verdict,
    /// The answer's TTL in seconds (floor and grace are applied by the engine, not here).
    pub ttl: u32,
    pub reason: GrantReason,
}

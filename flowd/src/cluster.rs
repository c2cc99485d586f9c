//! Kubernetes objects to flowd's view of the cluster: a Pod to a [`PodInfo`], a Node to its pod subnets.
//!
//! Pure conversions, shared by the live watchers and by snapshot files. A pod flowd cannot or must not
//! grant anything to comes back as a [`PodSkip`] that says why, so callers can log it and move on.

use crate::model::{PodInfo, PodKey};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Pod};
use std::net::IpAddr;

/// OVN-K's per-node pod subnets, e.g. `{"default":["10.244.1.0/24","fd00:10:244:2::/64"]}` (older
/// releases: `{"default":"10.244.1.0/24"}`).
pub const NODE_SUBNETS_ANNOTATION: &str = "k8s.ovn.org/node-subnets";
/// The key of the cluster's primary network in [`NODE_SUBNETS_ANNOTATION`].
const DEFAULT_NETWORK: &str = "default";

/// Why a pod gets no grants.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodSkip {
    #[error("pod has no name or namespace")]
    NoName,
    #[error("pod {0} uses the host network (OVN does not filter it)")]
    HostNetwork(PodKey),
    #[error("pod {0} is not scheduled to a node yet")]
    NotScheduled(PodKey),
    #[error("pod {pod} has finished ({phase}); its IP may be reused")]
    Finished { pod: PodKey, phase: String },
    #[error("pod {0} has no IP yet")]
    NoIp(PodKey),
    #[error("pod {pod} has an invalid IP {ip:?}")]
    BadIp { pod: PodKey, ip: String },
}

/// Why a node's pod subnets are unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("node has no name")]
    NoName,
    #[error("node {node}: annotation {NODE_SUBNETS_ANNOTATION}: {problem}")]
    Annotation { node: String, problem: String },
    #[error("node {node}: spec.podCIDRs entry {cidr:?} is not a CIDR")]
    PodCidr { node: String, cidr: String },
}

/// The pod as flowd needs it, or why it is none of flowd's business.
pub fn pod_info(pod: &Pod) -> Result<PodInfo, PodSkip> {
    let (Some(namespace), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
        return Err(PodSkip::NoName);
    };
    let key = PodKey::new(namespace, name);
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Err(PodSkip::HostNetwork(key));
    }
    let Some(node) = spec
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
    else {
        return Err(PodSkip::NotScheduled(key));
    };
    let status = pod.status.as_ref();
    if let Some(phase @ ("Succeeded" | "Failed")) = status.and_then(|s| s.phase.as_deref()) {
        return Err(PodSkip::Finished {
            pod: key,
            phase: phase.to_string(),
        });
    }
    // `podIPs` lists every family; `podIP` alone is what old API servers (and hand-written snapshots) give.
    let raw: Vec<&str> = match status.and_then(|s| s.pod_ips.as_ref()) {
        Some(ips) if !ips.is_empty() => ips.iter().map(|p| p.ip.as_str()).collect(),
        _ => status
            .and_then(|s| s.pod_ip.as_deref())
            .into_iter()
            .collect(),
    };
    let mut ips: Vec<IpAddr> = Vec::with_capacity(raw.len());
    for s in raw.into_iter().filter(|s| !s.is_empty()) {
        let ip = s.parse().map_err(|_| PodSkip::BadIp {
            pod: key.clone(),
            ip: s.to_string(),
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return Err(PodSkip::NoIp(key));
    }
    Ok(PodInfo {
        key,
        uid: pod.metadata.uid.clone(),
        ips,
        node,
    })
}

/// The node's name and pod subnets: OVN-K's annotation when present, else `spec.podCIDRs`.
pub fn node_subnets(node: &Node) -> Result<(String, Vec<IpNet>), NodeError> {
    let name = node.metadata.name.clone().ok_or(NodeError::NoName)?;
    if let Some(value) = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(NODE_SUBNETS_ANNOTATION))
    {
        let subnets = parse_node_subnets(value).map_err(|problem| NodeError::Annotation {
            node: name.clone(),
            problem,
        })?;
        return Ok((name, subnets));
    }
    let spec = node.spec.as_ref();
    let cidrs: Vec<&String> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(c) if !c.is_empty() => c.iter().collect(),
        _ => spec.and_then(|s| s.pod_cidr.as_ref()).into_iter().collect(),
    };
    let subnets = cidrs
        .into_iter()
        .map(|c| {
            c.parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| NodeError::PodCidr {
                    node: name.clone(),
                    cidr: c.clone(),
                })
        })
        .collect::<Result<_, _>>()?;
    Ok((name, subnets))
}

/// OVN-K's annotation with a node's addresses (JSON list of CIDRs, the address with its prefix).
pub const HOST_CIDRS_ANNOTATION: &str = "k8s.ovn.org/host-cidrs";
/// OVN-K's annotations with the node's address on the join and on the transit switch (JSON objects
/// `{"ipv4": "100.64.0.2/16", "ipv6": ...}`): their networks are the join and transit subnets.
pub const JOIN_ADDRESS_ANNOTATION: &str = "k8s.ovn.org/node-gateway-router-lrp-ifaddr";
pub const TRANSIT_ADDRESS_ANNOTATION: &str = "k8s.ovn.org/node-transit-switch-port-ifaddr";

/// Everything of `node` that an answer must never open egress to: its pod subnets, the join and
/// transit subnets its annotations name, and each of its own addresses (`status.addresses` and
/// OVN-K's host CIDRs, as single addresses). What does not parse is left out and reported.
pub fn node_exclusions(node: &Node) -> (Vec<IpNet>, Vec<String>) {
    let mut nets = Vec::new();
    let mut problems = Vec::new();
    match node_subnets(node) {
        Ok((_, subnets)) => nets.extend(subnets),
        Err(e) => problems.push(e.to_string()),
    }
    let host = |ip: IpAddr| IpNet::from(ip);
    for address in node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
    {
        if let Ok(ip) = address.address.parse::<IpAddr>() {
            nets.push(host(ip));
        }
    }
    let annotations = node.metadata.annotations.as_ref();
    let annotation = |key: &str| annotations.and_then(|a| a.get(key));
    if let Some(value) = annotation(HOST_CIDRS_ANNOTATION) {
        match serde_json::from_str::<Vec<String>>(value) {
            Ok(cidrs) => nets.extend(
                cidrs
                    .iter()
                    .filter_map(|c| c.parse::<IpNet>().ok())
                    .map(|n| host(n.addr())),
            ),
            Err(e) => problems.push(format!("{HOST_CIDRS_ANNOTATION}: {e}")),
        }
    }
    for key in [JOIN_ADDRESS_ANNOTATION, TRANSIT_ADDRESS_ANNOTATION] {
        if let Some(value) = annotation(key) {
            match serde_json::from_str::<std::collections::BTreeMap<String, String>>(value) {
                Ok(by_family) => nets.extend(
                    by_family
                        .values()
                        .filter_map(|c| c.parse::<IpNet>().ok())
                        .map(|n| n.trunc()),
                ),
                Err(e) => problems.push(format!("{key}: {e}")),
            }
        }
    }
    nets.sort();
    nets.dedup();
    (nets, problems)
}

/// What every node of the cluster excludes ([`node_exclusions`]), kept as nodes come and go.
#[derive(Debug, Default)]
pub struct NodeExclusions {
    by_node: std::collections::HashMap<String, Vec<IpNet>>,
}

impl NodeExclusions {
    /// Notes `node` (or its removal); returns the exclusions of every node when they changed.
    pub fn apply(&mut self, node: &Node, deleted: bool) -> Option<Vec<IpNet>> {
        let name = node.metadata.name.clone()?;
        let changed = if deleted {
            self.by_node.remove(&name).is_some()
        } else {
            let (nets, problems) = node_exclusions(node);
            for problem in problems {
                tracing::warn!(node = %name, %problem, "part of a node's addresses unknown");
            }
            self.by_node.insert(name, nets.clone()) != Some(nets)
        };
        changed.then(|| self.all())
    }

    /// Every node's exclusions, sorted, without repeats.
    pub fn all(&self) -> Vec<IpNet> {
        union(self.by_node.values())
    }
}

/// The networks of every list, sorted, without repeats.
pub fn union<'a>(lists: impl IntoIterator<Item = &'a Vec<IpNet>>) -> Vec<IpNet> {
    let mut all: Vec<IpNet> = lists.into_iter().flatten().copied().collect();
    all.sort();
    all.dedup();
    all
}

/// Parses the value of [`NODE_SUBNETS_ANNOTATION`] (both the list and the older single-string form).
pub fn parse_node_subnets(value: &str) -> Result<Vec<IpNet>, String> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let map: std::collections::BTreeMap<String, OneOrMany> = serde_json::from_str(value)
        .map_err(|e| format!("not a JSON map of network to subnets: {e}"))?;
    let list = match map.get(DEFAULT_NETWORK) {
        None => return Err(format!("no {DEFAULT_NETWORK:?} network")),
        Some(OneOrMany::One(s)) => vec![s.as_str()],
        Some(OneOrMany::Many(v)) => v.iter().map(String::as_str).collect(),
    };
    list.into_iter()
        .map(|s| {
            s.parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| format!("{s:?} is not a CIDR"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("valid Pod")
    }

    fn node(v: serde_json::Value) -> Node {
        serde_json::from_value(v).expect("valid Node")
    }

    fn running(ips: serde_json::Value) -> serde_json::Value {
        json!({
            "metadata": {"name": "client", "namespace": "abc"},
            "spec": {"nodeName": "ovn-worker", "containers": []},
            "status": {"phase": "Running", "podIPs": ips}
        })
    }

    #[test]
    fn a_running_pod_becomes_pod_info() {
        let info = pod_info(&pod(running(
            json!([{"ip": "10.244.1.5"}, {"ip": "fd00:10:244:2::5"}]),
        )))
        .expect("running pod");
        assert_eq!(info.key, PodKey::new("abc", "client"));
        assert_eq!(info.node, "ovn-worker");
        assert_eq!(
            info.ips,
            vec![
                "10.244.1.5".parse::<IpAddr>().expect("ip"),
                "fd00:10:244:2::5".parse().expect("ip")
            ]
        );
    }

    #[test]
    fn pod_ip_alone_is_enough() {
        let mut v = running(json!([]));
        v["status"]["podIP"] = json!("10.244.1.7");
        let info = pod_info(&pod(v)).expect("pod");
        assert_eq!(info.ips, vec!["10.244.1.7".parse::<IpAddr>().expect("ip")]);
    }

    #[test]
    fn pods_without_grants_say_why() {
        let key = PodKey::new("abc", "client");
        let mut host = running(json!([{"ip": "172.18.0.2"}]));
        host["spec"]["hostNetwork"] = json!(true);
        let mut done = running(json!([{"ip": "10.244.1.5"}]));
        done["status"]["phase"] = json!("Succeeded");
        let mut failed = running(json!([{"ip": "10.244.1.5"}]));
        failed["status"]["phase"] = json!("Failed");
        let mut pending = running(json!([]));
        pending["status"]["phase"] = json!("Pending");
        let mut unscheduled = running(json!([]));
        unscheduled["spec"]["nodeName"] = json!(null);
        let cases = [
            (host, PodSkip::HostNetwork(key.clone())),
            (
                done,
                PodSkip::Finished {
                    pod: key.clone(),
                    phase: "Succeeded".into(),
                },
            ),
            (
                failed,
                PodSkip::Finished {
                    pod: key.clone(),
                    phase: "Failed".into(),
                },
            ),
            (pending, PodSkip::NoIp(key.clone())),
            (unscheduled, PodSkip::NotScheduled(key.clone())),
            (
                running(json!([{"ip": "10.244.1"}])),
                PodSkip::BadIp {
                    pod: key.clone(),
                    ip: "10.244.1".into(),
                },
            ),
            (json!({"metadata": {"name": "x"}}), PodSkip::NoName),
        ];
        for (v, want) in cases {
            assert_eq!(pod_info(&pod(v.clone())), Err(want), "{v}");
        }
        assert_eq!(
            PodSkip::HostNetwork(key).to_string(),
            "pod abc/client uses the host network (OVN does not filter it)"
        );
    }

    #[test]
    fn a_node_excludes_its_subnets_and_addresses() {
        let n = node(json!({"metadata": {"name": "w", "annotations": {
            NODE_SUBNETS_ANNOTATION: r#"{"default":["172.20.1.0/24","fd00:20:1::/64"]}"#,
            JOIN_ADDRESS_ANNOTATION: r#"{"ipv4":"100.65.0.3/16","ipv6":"fd98::3/64"}"#,
            TRANSIT_ADDRESS_ANNOTATION: r#"{"ipv4":"100.89.0.3/16"}"#,
            HOST_CIDRS_ANNOTATION: r#"["192.168.50.10/24","2001:db8::10/64"]"#}},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.10"},
                                     {"type": "Hostname", "address": "w"}]}}));
        let (nets, problems) = node_exclusions(&n);
        assert!(problems.is_empty(), "{problems:?}");
        let want: Vec<IpNet> = [
            "100.65.0.0/16",
            "100.89.0.0/16",
            "172.20.1.0/24",
            "192.168.50.10/32",
            "2001:db8::10/128",
            "fd00:20:1::/64",
            "fd98::/64",
        ]
        .iter()
        .map(|s| s.parse().expect("net"))
        .collect();
        let mut got = nets;
        got.sort_by_key(ToString::to_string);
        assert_eq!(got, want);

        let broken = node(json!({"metadata": {"name": "b", "annotations": {
            HOST_CIDRS_ANNOTATION: "not json"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.9"}]}}));
        let (nets, problems) = node_exclusions(&broken);
        assert_eq!(nets, vec!["10.0.0.9/32".parse::<IpNet>().expect("net")]);
        assert_eq!(problems.len(), 1, "{problems:?}");

        let mut all = NodeExclusions::default();
        assert!(all.apply(&n, false).is_some());
        assert!(all.apply(&n, false).is_none(), "unchanged");
        assert_eq!(all.apply(&broken, false).map(|a| a.len()), Some(8));
        assert_eq!(all.apply(&n, true).map(|a| a.len()), Some(1));
    }

    #[test]
    fn node_subnets_from_the_annotation_in_both_forms() {
        let list = node(json!({"metadata": {"name": "ovn-worker", "annotations": {
            NODE_SUBNETS_ANNOTATION: r#"{"default":["10.244.1.0/24","fd00:10:244:2::/64"]}"#}}}));
        let (name, subnets) = node_subnets(&list).expect("valid");
        assert_eq!(name, "ovn-worker");
        assert_eq!(
            subnets,
            vec![
                "10.244.1.0/24".parse::<IpNet>().expect("net"),
                "fd00:10:244:2::/64".parse().expect("net")
            ]
        );
        let one = node(json!({"metadata": {"name": "n", "annotations": {
            NODE_SUBNETS_ANNOTATION: r#"{"default":"10.244.2.0/24"}"#}}}));
        assert_eq!(
            node_subnets(&one).expect("valid").1,
            vec!["10.244.2.0/24".parse::<IpNet>().expect("net")]
        );
    }

    #[test]
    fn node_subnets_fall_back_to_pod_cidrs() {
        let n = node(
            json!({"metadata": {"name": "n"}, "spec": {"podCIDRs": ["10.244.3.0/24", "fd00:10:244:3::/64"]}}),
        );
        assert_eq!(node_subnets(&n).expect("valid").1.len(), 2);
        let n = node(json!({"metadata": {"name": "n"}, "spec": {"podCIDR": "10.244.3.0/24"}}));
        assert_eq!(node_subnets(&n).expect("valid").1.len(), 1);
        let n = node(json!({"metadata": {"name": "n"}}));
        assert_eq!(node_subnets(&n).expect("valid").1, Vec::<IpNet>::new());
        let n = node(json!({"metadata": {"name": "n"}, "spec": {"podCIDRs": ["bogus"]}}));
        assert!(matches!(node_subnets(&n), Err(NodeError::PodCidr { .. })));
    }

    #[test]
    fn bad_annotations_are_reported() {
        for (value, problem) in [
            ("not json", "not a JSON map"),
            (r#"{"other":["10.0.0.0/8"]}"#, "no \"default\" network"),
            (r#"{"default":["10.0.0.0"]}"#, "not a CIDR"),
            (r#"{"default":5}"#, "not a JSON map"),
        ] {
            let n = node(
                json!({"metadata": {"name": "n", "annotations": {NODE_SUBNETS_ANNOTATION: value}}}),
            );
            match node_subnets(&n) {
                Err(NodeError::Annotation { node, problem: p }) => {
                    assert_eq!(node, "n");
                    assert!(p.contains(problem), "{value}: {p}");
                }
                other => panic!("{value}: {other:?}"),
            }
        }
    }
}

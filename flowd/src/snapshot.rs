//! A cluster snapshot file: the Pods, EgressFirewalls and Nodes `flowd replay` works against, and
//! OVN-K's ConfigMap with the cluster's networks ([`crate::ovnkube`]).
//!
//! Accepts what `kubectl get -A pods,egressfirewalls,nodes -o yaml` (or `-o json`) prints, plus
//! `kubectl get -n ovn-kubernetes configmap ovn-config -o yaml` (OpenShift:
//! `-n openshift-ovn-kubernetes configmap ovnkube-config`), a
//! `kind: List`, and multi-document YAML of the same objects (lists may appear inside too). Objects of
//! other kinds, pods that get no grants (host network, finished, no IP) and invalid EgressFirewalls are
//! skipped with a warning that says why; only unreadable or syntactically broken files are errors. A
//! namespace whose EgressFirewall is invalid keeps the reason, so that replay says why its pods get
//! nothing.

use crate::{
    cluster::{node_exclusions, node_subnets, pod_info, union},
    egressfirewall::EgressFirewall,
    model::PodInfo,
    ovnkube::{self, ClusterNetworks, OPENSHIFT_CONFIG, UPSTREAM_CONFIG},
    rules::FirewallRules,
};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use serde::Deserialize;
use std::{
    collections::BTreeMap,
    io::Read,
    path::{Path, PathBuf},
};

/// Largest snapshot read: a pod's YAML is a few KiB, so this holds clusters of several thousand pods while
/// keeping a wrong path (a disk image, /dev/zero) from exhausting memory.
pub const MAX_SNAPSHOT_BYTES: u64 = 64 * 1024 * 1024;
/// Most objects taken from one snapshot (lists included), a second bound against hostile input.
pub const MAX_OBJECTS: usize = 100_000;

/// What a snapshot says about the cluster, already validated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Pods that can hold grants, in file order.
    pub pods: Vec<PodInfo>,
    /// Validated EgressFirewall rules by namespace (only the object named `default` counts).
    pub rules: BTreeMap<String, FirewallRules>,
    /// Namespaces whose EgressFirewall `default` is invalid, with what is wrong with it: they get no
    /// grants, as OVN-K refuses such an object too.
    pub invalid: BTreeMap<String, String>,
    /// Pod subnets by node name.
    pub nodes: BTreeMap<String, Vec<IpNet>>,
    /// What each node excludes as a destination: its pod, join and transit subnets and its addresses.
    pub excluded: BTreeMap<String, Vec<IpNet>>,
    /// The cluster's networks, from OVN-K's ConfigMap when the snapshot has it.
    pub networks: Option<ClusterNetworks>,
    /// Everything skipped, and why, one line each.
    pub warnings: Vec<String>,
}

/// Why a snapshot file cannot be used at all. Each message carries its cause, which `source()` does
/// not return again (a printer walking the chain would print it twice).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: larger than {MAX_SNAPSHOT_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}: not UTF-8 text")]
    NotText { path: PathBuf },
    #[error("{path}: invalid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error("{path}: more than {MAX_OBJECTS} objects")]
    TooManyObjects { path: PathBuf },
}

impl Snapshot {
    /// Reads and parses the snapshot at `path`.
    pub fn load(path: &Path) -> Result<Self, SnapshotError> {
        let io = |error| SnapshotError::Io {
            path: path.to_path_buf(),
            error,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let mut bytes = Vec::new();
        file.take(MAX_SNAPSHOT_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > MAX_SNAPSHOT_BYTES {
            return Err(SnapshotError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = String::from_utf8(bytes).map_err(|_| SnapshotError::NotText {
            path: path.to_path_buf(),
        })?;
        Self::parse(&text, path)
    }

    /// Parses snapshot text; `origin` names it in errors and warnings.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, SnapshotError> {
        let mut objects = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(text) {
            let value = serde_yaml::Value::deserialize(doc).map_err(|e| SnapshotError::Yaml {
                path: origin.to_path_buf(),
                message: e.to_string(),
            })?;
            flatten(value, &mut objects);
            if objects.len() > MAX_OBJECTS {
                return Err(SnapshotError::TooManyObjects {
                    path: origin.to_path_buf(),
                });
            }
        }
        let mut snap = Snapshot::default();
        for (i, obj) in objects.into_iter().enumerate() {
            snap.add(i, obj, origin);
        }
        Ok(snap)
    }

    fn add(&mut self, i: usize, obj: serde_yaml::Value, origin: &Path) {
        let kind = obj
            .get("kind")
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or("")
            .to_string();
        let at = format!(
            "{}: object {i} ({})",
            origin.display(),
            describe(&obj, &kind)
        );
        match kind.as_str() {
            "Pod" => match serde_yaml::from_value::<Pod>(obj) {
                Err(e) => self.warn(format!("{at}: not a valid Pod: {e}")),
                Ok(pod) => match pod_info(&pod) {
                    Ok(info) => self.pods.push(info),
                    Err(skip) => self.warn(format!("{at}: skipped: {skip}")),
                },
            },
            "EgressFirewall" => match serde_yaml::from_value::<EgressFirewall>(obj) {
                Err(e) => self.warn(format!("{at}: not a valid EgressFirewall: {e}")),
                Ok(ef) => match FirewallRules::from_egress_firewall(&ef) {
                    Ok(rules) => {
                        self.replace_firewall(&at, &rules.namespace);
                        self.rules.insert(rules.namespace.clone(), rules);
                    }
                    Err(e) => {
                        self.warn(format!("{at}: skipped: {e}"));
                        // The namespace's `default` is invalid: like the daemon, the last one read wins.
                        if let Some(namespace) = e.invalid_namespace() {
                            self.replace_firewall(&at, namespace);
                            self.invalid.insert(namespace.to_string(), e.problem());
                        }
                    }
                },
            },
            "Node" => match serde_yaml::from_value::<Node>(obj) {
                Err(e) => self.warn(format!("{at}: not a valid Node: {e}")),
                Ok(node) => {
                    let (excluded, problems) = node_exclusions(&node);
                    for problem in problems {
                        self.warn(format!("{at}: {problem}"));
                    }
                    if let Some(name) = node.metadata.name.clone() {
                        self.excluded.insert(name, excluded);
                    }
                    // A node whose pod subnets do not parse was warned about just above.
                    if let Ok((name, subnets)) = node_subnets(&node) {
                        self.nodes.insert(name, subnets);
                    }
                }
            },
            "ConfigMap" => match serde_yaml::from_value::<ConfigMap>(obj) {
                Err(e) => self.warn(format!("{at}: not a valid ConfigMap: {e}")),
                Ok(cm) => {
                    let name = format!(
                        "{}/{}",
                        cm.metadata.namespace.as_deref().unwrap_or_default(),
                        cm.metadata.name.as_deref().unwrap_or_default()
                    );
                    if name != UPSTREAM_CONFIG && name != OPENSHIFT_CONFIG {
                        self.warn(format!("{at}: skipped: not OVN-Kubernetes's configuration"));
                    } else {
                        match ovnkube::networks(&cm) {
                            Ok(found) => self.networks = Some(found),
                            Err(e) => self.warn(format!("{at}: skipped: {e}")),
                        }
                    }
                }
            },
            "" => self.warn(format!("{at}: skipped: no kind")),
            _ => self.warn(format!("{at}: skipped: kind {kind} is not used by flowd")),
        }
    }

    /// Forgets what an earlier EgressFirewall of `namespace` said, warning when there was one.
    fn replace_firewall(&mut self, at: &str, namespace: &str) {
        let valid = self.rules.remove(namespace).is_some();
        let invalid = self.invalid.remove(namespace).is_some();
        if valid || invalid {
            self.warn(format!(
                "{at}: replaces an earlier EgressFirewall of the namespace"
            ));
        }
    }

    fn warn(&mut self, line: String) {
        tracing::warn!(warning = %line, "snapshot");
        self.warnings.push(line);
    }

    /// The warning for a snapshot without OVN-K's ConfigMap, whose service subnet is then unknown.
    pub fn networks_warning(&self) -> Option<String> {
        self.networks.is_none().then(|| {
            format!(
                "no OVN-Kubernetes ConfigMap ({UPSTREAM_CONFIG} or {OPENSHIFT_CONFIG}): the \
                 service subnet is unknown, so answers inside it are not excluded unless \
                 --cluster-subnet names it"
            )
        })
    }

    /// Every node's pod subnets.
    pub fn pod_subnets(&self) -> Vec<IpNet> {
        union(self.nodes.values())
    }

    /// Every node's exclusions ([`crate::cluster::node_exclusions`]) and the networks of OVN-K's
    /// configuration, for [`crate::policy::PolicySettings::cluster_subnets`].
    pub fn exclusions(&self) -> Vec<IpNet> {
        let networks = self
            .networks
            .as_ref()
            .map(ClusterNetworks::all)
            .unwrap_or_default();
        union(self.excluded.values().chain([&networks]))
    }
}

/// Top-level objects, with the items of any `*List` spliced in; null documents (a leading `---`) vanish.
fn flatten(value: serde_yaml::Value, out: &mut Vec<serde_yaml::Value>) {
    if value.is_null() {
        return;
    }
    let is_list = value
        .get("kind")
        .and_then(serde_yaml::Value::as_str)
        .is_some_and(|k| k.ends_with("List"));
    match value {
        serde_yaml::Value::Mapping(mut map) if is_list => {
            if let Some(serde_yaml::Value::Sequence(items)) = map.remove("items") {
                // Items of nested lists are not expanded again: kubectl never nests them.
                out.extend(items.into_iter().filter(|v| !v.is_null()));
            }
        }
        other => out.push(other),
    }
}

/// "Pod abc/client" for messages; never fails.
fn describe(obj: &serde_yaml::Value, kind: &str) -> String {
    let field = |f: &str| {
        obj.get("metadata")
            .and_then(|m| m.get(f))
            .and_then(serde_yaml::Value::as_str)
    };
    let kind = if kind.is_empty() { "?" } else { kind };
    match (field("namespace"), field("name")) {
        (Some(ns), Some(name)) => format!("{kind} {ns}/{name}"),
        (None, Some(name)) => format!("{kind} {name}"),
        _ => kind.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"
apiVersion: v1
kind: List
metadata: {resourceVersion: ""}
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: client, namespace: abc}
  spec: {nodeName: ovn-worker, containers: [{name: c, image: busybox}]}
  status: {phase: Running, podIP: 10.244.1.5, podIPs: [{ip: 10.244.1.5}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: host, namespace: kube-system}
  spec: {nodeName: ovn-worker, hostNetwork: true, containers: []}
  status: {phase: Running, podIPs: [{ip: 172.18.0.2}]}
- apiVersion: k8s.ovn.org/v1
  kind: EgressFirewall
  metadata: {name: default, namespace: abc}
  spec:
    egress:
    - {type: Allow, to: {dnsName: google.com}}
    - {type: Deny, to: {cidrSelector: 0.0.0.0/0}}
- apiVersion: k8s.ovn.org/v1
  kind: EgressFirewall
  metadata: {name: default, namespace: bad}
  spec:
    egress:
    - {type: Allow, to: {dnsName: "bad name"}}
- apiVersion: v1
  kind: Node
  metadata:
    name: ovn-worker
    annotations: {k8s.ovn.org/node-subnets: '{"default":["10.244.1.0/24"]}'}
- apiVersion: v1
  kind: Service
  metadata: {name: kubernetes, namespace: default}
"#;

    fn parse(text: &str) -> Result<Snapshot, SnapshotError> {
        Snapshot::parse(text, Path::new("snap.yaml"))
    }

    #[test]
    fn a_kubectl_list_loads_with_warnings_for_what_is_skipped() {
        let s = parse(LIST).expect("valid");
        assert_eq!(s.pods.len(), 1);
        assert_eq!(s.pods[0].key.to_string(), "abc/client");
        assert_eq!(s.rules.keys().collect::<Vec<_>>(), vec!["abc"]);
        assert_eq!(s.rules["abc"].rules.len(), 2);
        assert_eq!(s.invalid.keys().collect::<Vec<_>>(), vec!["bad"]);
        assert!(
            s.invalid["bad"].starts_with("egress[0].to.dnsName: \"bad name\" does not match"),
            "{}",
            s.invalid["bad"]
        );
        assert_eq!(
            s.nodes["ovn-worker"],
            vec!["10.244.1.0/24".parse::<IpNet>().expect("net")]
        );
        assert_eq!(s.pod_subnets().len(), 1);
        assert_eq!(s.warnings.len(), 3, "{:#?}", s.warnings);
        assert!(
            s.warnings[0].contains("Pod kube-system/host")
                && s.warnings[0].contains("host network")
        );
        assert!(
            s.warnings[1].contains("EgressFirewall bad/default")
                && s.warnings[1].contains("egress[0].to.dnsName")
        );
        assert!(s.warnings[2].contains("kind Service is not used"));
        assert!(s
            .warnings
            .iter()
            .all(|w| w.starts_with("snap.yaml: object ")));
    }

    #[test]
    fn a_node_with_broken_subnets_is_warned_about_once_and_keeps_its_addresses() {
        let s = parse(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: n\n  annotations:\n    \
             k8s.ovn.org/node-subnets: garbage\nstatus:\n  addresses: [{type: InternalIP, address: 10.0.0.9}]\n",
        )
        .expect("valid");
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert!(s.nodes.is_empty());
        assert_eq!(
            s.exclusions(),
            ["10.0.0.9/32".parse::<IpNet>().expect("net")]
        );
    }

    #[test]
    fn the_last_egressfirewall_of_a_namespace_decides_whether_it_is_invalid() {
        let ef = |name: &str, dns: &str| {
            format!(
                "---\napiVersion: k8s.ovn.org/v1\nkind: EgressFirewall\n\
                 metadata: {{name: {name}, namespace: ns}}\n\
                 spec: {{egress: [{{type: Allow, to: {{dnsName: \"{dns}\"}}}}]}}\n"
            )
        };
        let (good, bad) = (ef("default", "google.com"), ef("default", "bad name"));
        let other = ef("extra", "bad name");
        // (documents, valid afterwards, invalid afterwards, warnings)
        let cases = [
            (vec![&good], true, false, 0),
            (vec![&bad], false, true, 1),
            (vec![&good, &bad], false, true, 2),
            (vec![&bad, &good], true, false, 2),
            (vec![&bad, &bad], false, true, 3),
            // OVN-K ignores objects not named `default`: they change nothing for the namespace.
            (vec![&good, &other], true, false, 1),
            (vec![&other], false, false, 1),
        ];
        for (docs, valid, invalid, warnings) in cases {
            let text: String = docs.iter().map(|d| d.as_str()).collect();
            let s = parse(&text).expect("valid YAML");
            assert_eq!(s.rules.contains_key("ns"), valid, "{text}");
            assert_eq!(s.invalid.contains_key("ns"), invalid, "{text}");
            assert_eq!(s.warnings.len(), warnings, "{text}\n{:#?}", s.warnings);
        }
    }

    #[test]
    fn multi_document_yaml_is_the_same() {
        let docs = r#"---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: abc}
spec: {nodeName: ovn-worker, containers: []}
status: {phase: Running, podIPs: [{ip: 10.244.1.5}]}
---
apiVersion: v1
kind: PodList
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: other, namespace: abc}
  spec: {nodeName: ovn-worker, containers: []}
  status: {phase: Running, podIPs: [{ip: 10.244.1.6}]}
---
"#;
        let s = parse(docs).expect("valid");
        assert_eq!(s.pods.len(), 2);
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    /// OVN-K's ConfigMap, in either shape, tells the networks; any other ConfigMap, or one that cannot
    /// be read, is a warning; without one the snapshot says the service subnet is unknown.
    #[test]
    fn ovn_ks_configmap_tells_the_networks_and_nothing_else_does() {
        let text = "---\napiVersion: v1\nkind: ConfigMap\n\
                    metadata: {name: kube-root-ca.crt, namespace: ovn-kubernetes}\n\
                    data: {net_cidr: 1.0.0.0/8, svc_cidr: 2.0.0.0/8}\n\
                    ---\napiVersion: v1\nkind: ConfigMap\n\
                    metadata: {name: ovnkube-config, namespace: openshift-ovn-kubernetes}\n\
                    data:\n  ovnkube.conf: |\n    [default]\n    cluster-subnets=\"10.128.0.0/14/23\"\n\
                    \x20   [kubernetes]\n    service-cidrs=\"172.30.0.0/16\"\n";
        let s = parse(text).expect("parses");
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert!(s.warnings[0].contains("not OVN-Kubernetes's configuration"));
        let networks = s.networks.clone().expect("networks");
        assert_eq!(
            networks.services,
            vec!["172.30.0.0/16".parse::<IpNet>().expect("net")]
        );
        let excluded = s.exclusions();
        for net in ["172.30.0.0/16", "10.128.0.0/14", "100.64.0.0/16"] {
            assert!(excluded.contains(&net.parse().expect("net")), "{net}");
        }
        assert!(!excluded.contains(&"2.0.0.0/8".parse().expect("net")));
        assert_eq!(s.networks_warning(), None);

        let broken = parse(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ovn-config, namespace: ovn-kubernetes}\n\
             data: {net_cidr: 10.244.0.0/16}\n",
        )
        .expect("parses");
        assert_eq!(broken.networks, None);
        assert!(
            broken.warnings[0].contains("it names no service subnet"),
            "{:?}",
            broken.warnings
        );
        assert!(broken
            .networks_warning()
            .is_some_and(|w| w.contains("service subnet is unknown")));
    }

    #[test]
    fn kubectl_json_output_loads_too() {
        let json = serde_json::to_string_pretty(
            &serde_yaml::from_str::<serde_json::Value>(LIST).expect("yaml to json"),
        )
        .expect("json");
        let s = parse(&json).expect("JSON is YAML");
        assert_eq!(s, parse(LIST).expect("valid"));
    }

    #[test]
    fn broken_input_is_a_clear_error_or_warning() {
        let err = parse("items: [").expect_err("bad yaml");
        assert!(
            err.to_string().starts_with("snap.yaml: invalid YAML"),
            "{err}"
        );
        let s = parse("kind: Pod\nspec: 5\n").expect("syntax is fine");
        assert!(
            s.warnings[0].contains("not a valid Pod"),
            "{:?}",
            s.warnings
        );
        let s = parse("- 1\n- 2\n").expect("syntax is fine");
        assert!(s.warnings[0].contains("no kind"), "{:?}", s.warnings);
        let s = parse("").expect("empty");
        assert_eq!(s, Snapshot::default());
    }

    #[test]
    fn load_bounds_and_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.yaml");
        let err = Snapshot::load(&missing).expect_err("missing");
        assert!(err.to_string().contains("missing.yaml"), "{err}");
        // The cause is in the message once, and not again for a printer that walks the chain.
        let printed = format!("{:#}", anyhow::Error::new(err));
        assert_eq!(printed.matches("No such file").count(), 1, "{printed}");
        let binary = dir.path().join("bin.yaml");
        std::fs::write(&binary, [0xff, 0xfe, 0]).expect("write");
        assert!(matches!(
            Snapshot::load(&binary),
            Err(SnapshotError::NotText { .. })
        ));
        let big = dir.path().join("big.yaml");
        let f = std::fs::File::create(&big).expect("create");
        f.set_len(MAX_SNAPSHOT_BYTES + 1).expect("sparse file");
        assert!(matches!(
            Snapshot::load(&big),
            Err(SnapshotError::TooLarge { .. })
        ));
        let ok = dir.path().join("ok.yaml");
        std::fs::write(&ok, LIST).expect("write");
        assert_eq!(Snapshot::load(&ok).expect("valid").pods.len(), 1);
    }

    #[test]
    fn too_many_objects_is_an_error() {
        let mut text = String::from("kind: List\nitems:\n");
        for _ in 0..=MAX_OBJECTS {
            text.push_str("- {kind: X}\n");
        }
        assert!(matches!(
            parse(&text),
            Err(SnapshotError::TooManyObjects { .. })
        ));
    }
}

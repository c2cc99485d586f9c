//! Kubernetes state: the pods of this node, every namespace's EgressFirewall, this node, and the DNS
//! pods that carry tapd, each kept current by a kube-runtime watcher (list, then watch; relist after
//! `410 Gone` or any error, with kube's default backoff).

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

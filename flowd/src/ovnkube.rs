//! OVN-Kubernetes's own configuration: the cluster's pod and service subnets, and the join, transit and
//! masquerade subnets its routers use, read from the ConfigMap OVN-K is deployed with. No DNS answer may
//! open any of them: a grant there would reach a pod past its NetworkPolicy, a Service's backends, or a
//! node's own gateway.
//!
//! Two shapes exist, and both are read:
//! - upstream OVN-K (kind, the Helm chart): `ovn-kubernetes/ovn-config` with `net_cidr` and `svc_cidr`,
//!   comma-separated, a pod subnet optionally followed by its per-node prefix (`10.244.0.0/16/24`);
//! - OpenShift: `openshift-ovn-kubernetes/ovnkube-config` whose `ovnkube.conf` is the INI file ovnkube
//!   reads (`[default] cluster-subnets`, `[kubernetes] service-cidrs`, `[gateway] v4-join-subnet`...).
//!
//! Join, transit and masquerade subnets that the configuration does not name are OVN-K's defaults.
//! The service subnet has no default: without it flowd cannot tell a Service from the internet, so it
//! installs nothing and stays not ready (see [`crate::daemon`]).

use ipnet::IpNet;
use k8s_openapi::api::core::v1::ConfigMap;
use std::{fmt, str::FromStr};

/// Upstream OVN-K's ConfigMap (kind, Helm).
pub const UPSTREAM_CONFIG: &str = "ovn-kubernetes/ovn-config";
/// OpenShift's.
pub const OPENSHIFT_CONFIG: &str = "openshift-ovn-kubernetes/ovnkube-config";
/// The key of OpenShift's INI file.
const INI_KEY: &str = "ovnkube.conf";
/// More subnets than any real configuration has; a longer list is a broken (or hostile) object.
const MAX_SUBNETS: usize = 64;

/// OVN-K's defaults for what its configuration may leave out. The IPv4 masquerade subnet is
/// link-local and so excluded anyway; the IPv6 one is not (`fd69::/125` in older releases, inside the
/// newer `fd69::/112`).
const DEFAULT_JOIN: [&str; 2] = ["100.64.0.0/16", "fd98::/64"];
const DEFAULT_TRANSIT: [&str; 2] = ["100.88.0.0/16", "fd97::/64"];
const DEFAULT_MASQUERADE: [&str; 2] = ["169.254.169.0/29", "fd69::/112"];

/// One namespaced object flowd reads by name (`namespace/name`): OVN-K's ConfigMap, the DNS Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl FromStr for ObjectRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (namespace, name) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not namespace/name"))?;
        // DNS-1123 labels and subdomains: nothing else is a namespace or an object's name.
        let valid = |part: &str, max: usize| {
            !part.is_empty()
                && part.len() <= max
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                && !part.starts_with(['-', '.'])
                && !part.ends_with(['-', '.'])
        };
        if !valid(namespace, 63) || namespace.contains('.') || !valid(name, 253) {
            return Err(format!("{s:?} is not namespace/name"));
        }
        Ok(Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The cluster's own networks as OVN-K is configured with them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterNetworks {
    /// Every pod subnet of the cluster (each node's is a part of one).
    pub pods: Vec<IpNet>,
    /// Service ClusterIPs.
    pub services: Vec<IpNet>,
    /// Join, transit and masquerade subnets: addresses of OVN-K's own routers and of the nodes behind
    /// them.
    pub internal: Vec<IpNet>,
}

impl ClusterNetworks {
    /// Every subnet, for the exclusions.
    pub fn all(&self) -> Vec<IpNet> {
        crate::cluster::union([&self.pods, &self.services, &self.internal])
    }
}

impl fmt::Display for ClusterNetworks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[IpNet]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(
            f,
            "pods {}, services {}, join/transit/masquerade {}",
            list(&self.pods),
            list(&self.services),
            list(&self.internal)
        )
    }
}

/// Why a ConfigMap does not tell the cluster's networks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetworksError {
    #[error("it has neither `net_cidr`/`svc_cidr` (upstream OVN-K) nor `{INI_KEY}` (OpenShift)")]
    UnknownShape,
    #[error("{INI_KEY} is not an INI file: {0}")]
    Ini(String),
    #[error("it names no {0}")]
    Missing(&'static str),
    #[error("{key}: {value:?} is not a subnet")]
    Subnet { key: String, value: String },
    #[error("{key}: more than {MAX_SUBNETS} subnets")]
    TooMany { key: String },
}

/// Reads the cluster's networks from OVN-K's ConfigMap, in either shape.
pub fn networks(config_map: &ConfigMap) -> Result<ClusterNetworks, NetworksError> {
    let data = config_map.data.as_ref();
    let get = |key: &str| data.and_then(|d| d.get(key)).map(String::as_str);
    let mut found = if let Some(ini) = get(INI_KEY) {
        from_ini(ini)?
    } else if get("net_cidr").is_some() || get("svc_cidr").is_some() {
        let list = |key: &str| subnets(key, get(key).unwrap_or(""));
        let mut internal = Vec::new();
        for key in [
            "v4_join_subnet",
            "v6_join_subnet",
            "v4_transit_switch_subnet",
            "v6_transit_switch_subnet",
            "v4_masquerade_subnet",
            "v6_masquerade_subnet",
        ] {
            internal.extend(list(key)?);
        }
        ClusterNetworks {
            pods: list("net_cidr")?,
            services: list("svc_cidr")?,
            internal,
        }
    } else {
        return Err(NetworksError::UnknownShape);
    };
    if found.pods.is_empty() {
        return Err(NetworksError::Missing("pod subnet (cluster subnets)"));
    }
    if found.services.is_empty() {
        return Err(NetworksError::Missing("service subnet"));
    }
    found.internal = with_defaults(found.internal);
    Ok(found)
}

fn from_ini(text: &str) -> Result<ClusterNetworks, NetworksError> {
    let options = ini::ParseOption {
        enabled_quote: true,
        enabled_escape: false,
        ..ini::ParseOption::default()
    };
    let ini = ini::Ini::load_from_str_opt(text, options)
        .map_err(|e| NetworksError::Ini(e.to_string()))?;
    let list = |section: &str, key: &str| {
        let value = ini.get_from(Some(section), key).unwrap_or("");
        subnets(&format!("[{section}] {key}"), value)
    };
    let mut internal = Vec::new();
    for (section, key) in [
        ("gateway", "v4-join-subnet"),
        ("gateway", "v6-join-subnet"),
        ("gateway", "v4-masquerade-subnet"),
        ("gateway", "v6-masquerade-subnet"),
        ("clustermgrinterconnect", "v4-transit-switch-subnet"),
        ("clustermgrinterconnect", "v6-transit-switch-subnet"),
    ] {
        internal.extend(list(section, key)?);
    }
    Ok(ClusterNetworks {
        pods: list("default", "cluster-subnets")?,
        services: list("kubernetes", "service-cidrs")?,
        internal,
    })
}

/// A comma-separated list of subnets; a pod subnet may carry its per-node prefix after a second `/`.
fn subnets(key: &str, value: &str) -> Result<Vec<IpNet>, NetworksError> {
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if out.len() == MAX_SUBNETS {
            return Err(NetworksError::TooMany {
                key: key.to_string(),
            });
        }
        let cidr = match item.rsplit_once('/') {
            Some((net, host)) if net.contains('/') && host.parse::<u8>().is_ok() => net,
            _ => item,
        };
        let net = cidr.parse::<IpNet>().map_err(|_| NetworksError::Subnet {
            key: key.to_string(),
            value: item.to_string(),
        })?;
        out.push(net.trunc());
    }
    Ok(out)
}

/// The configured join, transit and masquerade subnets, plus OVN-K's defaults for each family and kind
/// the configuration leaves out. A default that is not in use excludes addresses no cluster may route to
/// the internet anyway (shared address space, ULAs), so adding it is the safe side.
fn with_defaults(configured: Vec<IpNet>) -> Vec<IpNet> {
    let defaults: Vec<IpNet> = [DEFAULT_JOIN, DEFAULT_TRANSIT, DEFAULT_MASQUERADE]
        .iter()
        .flatten()
        .filter_map(|s| s.parse().ok())
        .collect();
    crate::cluster::union([&configured, &defaults])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config_map(data: serde_json::Value) -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": "c", "namespace": "n"}, "data": data}))
            .expect("config map")
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("net")).collect()
    }

    #[test]
    fn upstream_shape_with_host_prefixes_and_dual_stack() {
        let n = networks(&config_map(json!({
            "net_cidr": "10.244.0.0/16/24, fd00:10:244::/48/64",
            "svc_cidr": "10.96.0.0/16,fd00:10:96::/112",
            "k8s_apiserver": "https://172.18.0.2:6443",
            "mtu": "1400",
        })))
        .expect("networks");
        assert_eq!(n.pods, nets(&["10.244.0.0/16", "fd00:10:244::/48"]));
        assert_eq!(n.services, nets(&["10.96.0.0/16", "fd00:10:96::/112"]));
        // OVN-K's defaults for what the map leaves out.
        for default in ["100.64.0.0/16", "fd98::/64", "100.88.0.0/16", "fd69::/112"] {
            assert!(
                n.internal.contains(&default.parse().expect("net")),
                "{default}"
            );
        }
        assert!(n.all().contains(&"10.96.0.0/16".parse().expect("net")));
    }

    #[test]
    fn openshift_ini_with_quotes_and_custom_join() {
        let ini = "[default]\nmtu=\"1400\"\ncluster-subnets=\"10.128.0.0/14/23,fd01::/48/64\"\n\
                   encap-port=\"6081\"\n\n[kubernetes]\nservice-cidrs=\"172.30.0.0/16,fd02::/112\"\n\
                   ovn-config-namespace=\"openshift-ovn-kubernetes\"\n\n[gateway]\nmode=shared\n\
                   v4-join-subnet=\"100.65.0.0/16\"\nv4-masquerade-subnet=\"169.254.169.0/29\"\n";
        let n = networks(&config_map(json!({ INI_KEY: ini }))).expect("networks");
        assert_eq!(n.pods, nets(&["10.128.0.0/14", "fd01::/48"]));
        assert_eq!(n.services, nets(&["172.30.0.0/16", "fd02::/112"]));
        assert!(n.internal.contains(&"100.65.0.0/16".parse().expect("net")));
        assert!(n.internal.contains(&"100.64.0.0/16".parse().expect("net")));
    }

    #[test]
    fn what_cannot_be_read_says_why() {
        let cases = [
            (json!({}), "neither"),
            (json!({"mtu": "1400"}), "neither"),
            (json!({"net_cidr": "10.244.0.0/16"}), "no service subnet"),
            (json!({"svc_cidr": "10.96.0.0/16"}), "no pod subnet"),
            (
                json!({"net_cidr": "10.244.0.0/16", "svc_cidr": "10.96.0.0/33"}),
                "svc_cidr: \"10.96.0.0/33\" is not a subnet",
            ),
            (
                json!({"net_cidr": "10.244.0.0/16/x", "svc_cidr": "10.96.0.0/16"}),
                "net_cidr: \"10.244.0.0/16/x\"",
            ),
            (
                json!({INI_KEY: "[default]\ncluster-subnets=\"10.128.0.0/14\"\n"}),
                "no service subnet",
            ),
            (
                json!({INI_KEY: "[kubernetes\nservice-cidrs=1\n"}),
                "not an INI file",
            ),
        ];
        for (data, why) in cases {
            let error = networks(&config_map(data.clone())).expect_err("refused");
            assert!(error.to_string().contains(why), "{data}: {error}");
        }
        let many = (0..=MAX_SUBNETS)
            .map(|i| format!("10.{i}.0.0/16"))
            .collect::<Vec<_>>()
            .join(",");
        let error = networks(&config_map(
            json!({"net_cidr": many, "svc_cidr": "10.96.0.0/16"}),
        ))
        .expect_err("too many");
        assert_eq!(
            error,
            NetworksError::TooMany {
                key: "net_cidr".into()
            }
        );
    }

    #[test]
    fn config_map_refs_are_checked() {
        let r: ObjectRef = UPSTREAM_CONFIG.parse().expect("ref");
        assert_eq!(r.namespace, "ovn-kubernetes");
        assert_eq!(r.to_string(), UPSTREAM_CONFIG);
        assert!(OPENSHIFT_CONFIG.parse::<ObjectRef>().is_ok());
        for bad in [
            "", "x", "/x", "x/", "A/b", "a.b/c", "a/b/c", "a/-b", "a/b c",
        ] {
            assert!(bad.parse::<ObjectRef>().is_err(), "{bad}");
        }
    }
}

//! The OVN-Kubernetes `EgressFirewall` custom resource (`k8s.ovn.org/v1`), as the API server stores it.
//!
//! Field names follow OVN-K's CRD exactly. Every field is optional and loosely typed on purpose: an object
//! the API server would have rejected (or that a snapshot file carries by hand) must still deserialize, so
//! that [`crate::rules`] can say which rule and which field is wrong instead of failing on a serde error.
//! Only [`crate::rules::FirewallRules`] is meant to be used after validation.

use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// Annotation on an EgressFirewall that overrides the node's default matching of plain `dnsName`s for
/// its namespace: `subdomains` (a plain name also covers its subdomains) or `strict` (exact, as OVN-K).
pub const NAME_MATCHING_ANNOTATION: &str = "dnsflow.io/dns-name-matching";

/// `spec` of an `EgressFirewall`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[kube(
    group = "k8s.ovn.org",
    version = "v1",
    kind = "EgressFirewall",
    namespaced,
    status = "EgressFirewallStatus",
    schema = "disabled"
)]
pub struct EgressFirewallSpec {
    /// The rules, in order: the first rule matching a packet decides (OVN-K caps the list at 8000).
    #[serde(default)]
    pub egress: Vec<EgressFirewallRule>,
}

impl EgressFirewall {
    /// `namespace`'s EgressFirewall (the one named `default`, the only one OVN-K honours) with the
    /// `spec.egress` list given as JSON, e.g. `[{"type": "Allow", "to": {"dnsName": "google.com"}}]`:
    /// for tools and tests that write rules inline instead of reading them from the API server or a
    /// snapshot. Content is as loosely typed as in any other object; validation is
    /// [`crate::rules::FirewallRules::from_egress_firewall`]'s job.
    pub fn inline(namespace: &str, egress: serde_json::Value) -> serde_json::Result<Self> {
        let spec = EgressFirewallSpec {
            egress: serde_json::from_value(egress)?,
        };
        let mut ef = Self::new(crate::rules::EGRESS_FIREWALL_NAME, spec);
        ef.metadata.namespace = Some(namespace.to_string());
        Ok(ef)
    }
}

/// One `spec.egress[]` entry.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct EgressFirewallRule {
    /// `Allow` or `Deny`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub rule_type: Option<String>,
    /// Exactly one destination must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<EgressFirewallDestination>,
    /// When present, the rule only applies to these protocol/port pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<EgressFirewallPort>>,
}

/// `spec.egress[].to`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressFirewallDestination {
    /// e.g. `0.0.0.0/0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr_selector: Option<String>,
    /// e.g. `google.com` or `*.example.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
    /// A `metav1.LabelSelector`, kept raw so that a malformed one is reported, not a parse failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<serde_json::Value>,
}

/// `spec.egress[].ports[]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct EgressFirewallPort {
    /// `TCP`, `UDP` or `SCTP` (upper-case, as OVN-K compares them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// 1..=65535; kept raw so that `"443"` or `70000` is reported rather than failing the whole object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<serde_json::Value>,
}

/// `status`, as OVN-K writes it (flowd only reads it for display).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct EgressFirewallStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource as _;

    #[test]
    fn resource_identity_matches_ovn_kubernetes() {
        assert_eq!(EgressFirewall::group(&()), "k8s.ovn.org");
        assert_eq!(EgressFirewall::version(&()), "v1");
        assert_eq!(EgressFirewall::kind(&()), "EgressFirewall");
        assert_eq!(EgressFirewall::plural(&()), "egressfirewalls");
        assert_eq!(EgressFirewall::api_version(&()), "k8s.ovn.org/v1");
    }

    #[test]
    fn ovn_kubernetes_yaml_deserializes_field_for_field() {
        let ef: EgressFirewall = serde_yaml::from_str(
            r#"
apiVersion: k8s.ovn.org/v1
kind: EgressFirewall
metadata: {name: default, namespace: abc, annotations: {dnsflow.io/dns-name-matching: strict}}
spec:
  egress:
  - type: Allow
    to: {dnsName: google.com}
    ports: [{protocol: TCP, port: 443}]
  - type: Allow
    to: {nodeSelector: {matchLabels: {role: infra}}}
  - type: Deny
    to: {cidrSelector: 0.0.0.0/0}
status: {status: EgressFirewall Rules applied}
"#,
        )
        .expect("valid EgressFirewall");
        assert_eq!(ef.metadata.name.as_deref(), Some("default"));
        let rules = &ef.spec.egress;
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].rule_type.as_deref(), Some("Allow"));
        let to0 = rules[0].to.as_ref().expect("to");
        assert_eq!(to0.dns_name.as_deref(), Some("google.com"));
        let port0 = &rules[0].ports.as_ref().expect("ports")[0];
        assert_eq!(port0.protocol.as_deref(), Some("TCP"));
        assert_eq!(port0.port, Some(serde_json::json!(443)));
        assert!(rules[1].to.as_ref().expect("to").node_selector.is_some());
        assert_eq!(
            rules[2].to.as_ref().expect("to").cidr_selector.as_deref(),
            Some("0.0.0.0/0")
        );
        // Round trip keeps the wire names.
        let back = serde_json::to_value(&ef).expect("serializes");
        assert_eq!(back["spec"]["egress"][0]["to"]["dnsName"], "google.com");
        assert_eq!(back["spec"]["egress"][2]["type"], "Deny");
    }

    #[test]
    fn invalid_content_still_deserializes_for_validation_to_report() {
        let ef: EgressFirewall = serde_json::from_value(serde_json::json!({
            "apiVersion": "k8s.ovn.org/v1",
            "kind": "EgressFirewall",
            "metadata": {"name": "default", "namespace": "x"},
            "spec": {"egress": [
                {"type": "Maybe", "to": {"dnsName": "a b", "cidrSelector": "nope"},
                 "ports": [{"protocol": "tcp", "port": "443"}, {"port": 70000}], "extra": true},
                {}
            ]}
        }))
        .expect("tolerant");
        assert_eq!(ef.spec.egress.len(), 2);
        assert_eq!(ef.spec.egress[0].rule_type.as_deref(), Some("Maybe"));
        assert_eq!(ef.spec.egress[1], EgressFirewallRule::default());
    }
}

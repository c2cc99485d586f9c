//! A namespace's EgressFirewall, validated the way OVN-Kubernetes validates it, as typed rules.
//!
//! [`FirewallRules::from_egress_firewall`] is the edge: it either yields rules the decision can trust or
//! a [`RulesError`] naming the rule index and field at fault. Callers log the error and skip the object,
//! exactly as OVN-K refuses such an object (its own ACLs then stay as they were; dnsflow grants nothing).

use crate::{
    egressfirewall::{
        EgressFirewall, EgressFirewallPort, EgressFirewallRule, NAME_MATCHING_ANNOTATION,
    },
    model::{PortMatch, Protocol, Verdict},
};
use dnsflow_dnstap::DnsName;
use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::{fmt, str::FromStr};

/// OVN-K only honours the EgressFirewall named `default` in each namespace (its status says so for others).
pub const EGRESS_FIREWALL_NAME: &str = "default";
/// OVN-K's CRD limit (`maxItems`); rule `i` becomes ACL priority `10000 - i`, which must stay above OVN-K's
/// own lower-priority ACLs.
pub const MAX_RULES: usize = 8000;

/// How a plain (non-wildcard) `dnsName` matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum NameMatching {
    /// `google.com` covers `google.com` and every name below it at a label boundary (the default).
    #[default]
    Subdomains,
    /// `google.com` covers only `google.com` (OVN-K's own semantics).
    Strict,
}

impl FromStr for NameMatching {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "subdomains" => Ok(Self::Subdomains),
            "strict" => Ok(Self::Strict),
            other => Err(format!(
                "{other:?} is neither \"subdomains\" nor \"strict\""
            )),
        }
    }
}

impl fmt::Display for NameMatching {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Subdomains => "subdomains",
            Self::Strict => "strict",
        })
    }
}

/// A validated `dnsName`, normalized (lower-case, no trailing dot).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DnsPattern {
    /// A plain name: the name itself, and its subdomains unless matching is strict.
    Name(DnsName),
    /// `*.base`: exactly one label below `base` (never `base` itself, never deeper).
    Wildcard(DnsName),
}

impl DnsPattern {
    /// Parses a `dnsName` as OVN-K's CRD pattern `^(\*\.)?([A-Za-z0-9-]+\.)*[A-Za-z0-9-]+\.?$` allows it.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (wildcard, rest) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let body = rest.strip_suffix('.').unwrap_or(rest);
        let label_ok =
            |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !body.split('.').all(label_ok) {
            return Err(format!(
                "{s:?} does not match the dnsName pattern ^(\\*\\.)?([A-Za-z0-9-]+\\.)*[A-Za-z0-9-]+\\.?$"
            ));
        }
        let name = DnsName::new(body).map_err(|e| format!("{s:?}: {e}"))?;
        Ok(if wildcard {
            Self::Wildcard(name)
        } else {
            Self::Name(name)
        })
    }

    /// Whether `name` (already normalized) is covered by this pattern.
    pub fn matches(&self, name: &DnsName, mode: NameMatching) -> bool {
        match (self, mode) {
            (Self::Wildcard(base), _) => is_child_of(name, base),
            (Self::Name(n), NameMatching::Strict) => name == n,
            (Self::Name(n), NameMatching::Subdomains) => is_at_or_below(name, n),
        }
    }
}

/// True when `name` is `parent` or lies below it at a label boundary (`www.google.com` is below
/// `google.com`; `evilgoogle.com` is not). Both are normalized (lower case, no trailing dot).
fn is_at_or_below(name: &DnsName, parent: &DnsName) -> bool {
    let (name, parent) = (name.as_str(), parent.as_str());
    name == parent
        || name
            .strip_suffix(parent)
            .is_some_and(|head| head.ends_with('.'))
}

/// True when `name` is exactly one label below `parent` (OVN-K's `*.parent`).
fn is_child_of(name: &DnsName, parent: &DnsName) -> bool {
    name.as_str()
        .strip_suffix(parent.as_str())
        .and_then(|head| head.strip_suffix('.'))
        .is_some_and(|label| !label.is_empty() && !label.contains('.'))
}

impl fmt::Display for DnsPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(n) => write!(f, "{n}"),
            Self::Wildcard(n) => write!(f, "*.{n}"),
        }
    }
}

/// Where a rule sends (or stops) traffic.
#[derive(Clone, Debug, PartialEq)]
pub enum Destination {
    /// Normalized to its network address, as Go's `net.ParseCIDR` does.
    Cidr(IpNet),
    DnsName(DnsPattern),
    NodeSelector(LabelSelector),
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cidr(net) => write!(f, "cidrSelector={net}"),
            Self::DnsName(p) => write!(f, "dnsName={p}"),
            Self::NodeSelector(_) => f.write_str("nodeSelector"),
        }
    }
}

/// One validated rule.
#[derive(Clone, Debug, PartialEq)]
pub struct FirewallRule {
    pub verdict: Verdict,
    pub destination: Destination,
    /// Empty: every protocol and port. Duplicates removed, order kept.
    pub ports: Vec<PortMatch>,
}

impl FirewallRule {
    /// The rule's `dnsName`, if that is its destination.
    pub fn dns_pattern(&self) -> Option<&DnsPattern> {
        match &self.destination {
            Destination::DnsName(p) => Some(p),
            _ => None,
        }
    }
}

impl fmt::Display for FirewallRule {
    /// "Allow dnsName=*.example.com tcp/443", as the inspection API shows it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match self.verdict {
            Verdict::Allow => "Allow",
            Verdict::Deny => "Deny",
        };
        write!(f, "{verdict} {}", self.destination)?;
        for p in &self.ports {
            write!(f, " {}/{}", p.protocol, p.port)?;
        }
        Ok(())
    }
}

/// A namespace's validated EgressFirewall.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct FirewallRules {
    pub namespace: String,
    /// In order: index `i` is OVN-K's rule `i`.
    pub rules: Vec<FirewallRule>,
    /// The namespace's annotation, if set; `None` means the node default applies.
    pub name_matching: Option<NameMatching>,
}

/// What is wrong with one field of one rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("egress[{index}].{field}: {problem}")]
pub struct RuleError {
    pub index: usize,
    /// The field path inside the rule, e.g. `to.dnsName` or `ports[1].port`.
    pub field: String,
    pub problem: String,
}

/// Why an EgressFirewall object is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("EgressFirewall has no namespace")]
    NoNamespace,
    #[error("EgressFirewall {namespace}/{name} is ignored: only the one named \"{EGRESS_FIREWALL_NAME}\" counts")]
    NotNamedDefault { namespace: String, name: String },
    #[error("EgressFirewall {namespace}/default has {count} rules, more than {MAX_RULES}")]
    TooManyRules { namespace: String, count: usize },
    #[error(
        "EgressFirewall {namespace}/default: annotation {NAME_MATCHING_ANNOTATION}: {problem}"
    )]
    Annotation { namespace: String, problem: String },
    #[error("EgressFirewall {namespace}/default: {error}")]
    Rule { namespace: String, error: RuleError },
}

pub type Result<T, E = RulesError> = std::result::Result<T, E>;

impl RulesError {
    /// The namespace this error leaves without usable rules: the one whose `default` EgressFirewall it
    /// is about. `None` for objects OVN-K ignores anyway (no namespace, another name), which change
    /// nothing for their namespace.
    pub fn invalid_namespace(&self) -> Option<&str> {
        match self {
            Self::NoNamespace | Self::NotNamedDefault { .. } => None,
            Self::TooManyRules { namespace, .. }
            | Self::Annotation { namespace, .. }
            | Self::Rule { namespace, .. } => Some(namespace),
        }
    }

    /// What is wrong, without naming the object, e.g. `egress[0].to.dnsName: "bad name" does not match
    /// ...`: for "EgressFirewall invalid: <why>" where the namespace is already said.
    pub fn problem(&self) -> String {
        match self {
            Self::NoNamespace | Self::NotNamedDefault { .. } => self.to_string(),
            Self::TooManyRules { count, .. } => format!("{count} rules, more than {MAX_RULES}"),
            Self::Annotation { problem, .. } => {
                format!("annotation {NAME_MATCHING_ANNOTATION}: {problem}")
            }
            Self::Rule { error, .. } => error.to_string(),
        }
    }
}

impl FirewallRules {
    /// Validates `ef` as OVN-K does; the first problem found is returned.
    pub fn from_egress_firewall(ef: &EgressFirewall) -> Result<Self> {
        let namespace = ef
            .metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or(RulesError::NoNamespace)?;
        let name = ef.metadata.name.clone().unwrap_or_default();
        if name != EGRESS_FIREWALL_NAME {
            return Err(RulesError::NotNamedDefault { namespace, name });
        }
        let count = ef.spec.egress.len();
        if count > MAX_RULES {
            return Err(RulesError::TooManyRules { namespace, count });
        }
        let name_matching = match ef
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(NAME_MATCHING_ANNOTATION))
        {
            None => None,
            Some(v) => Some(v.parse().map_err(|problem| RulesError::Annotation {
                namespace: namespace.clone(),
                problem,
            })?),
        };
        let rules = ef
            .spec
            .egress
            .iter()
            .enumerate()
            .map(|(index, raw)| validate_rule(index, raw))
            .collect::<Result<Vec<_>, RuleError>>()
            .map_err(|error| RulesError::Rule {
                namespace: namespace.clone(),
                error,
            })?;
        Ok(Self {
            namespace,
            rules,
            name_matching,
        })
    }

    /// The matching mode in force for this namespace.
    pub fn name_matching_or(&self, node_default: NameMatching) -> NameMatching {
        self.name_matching.unwrap_or(node_default)
    }
}

fn validate_rule(index: usize, raw: &EgressFirewallRule) -> Result<FirewallRule, RuleError> {
    let err = |field: &str, problem: String| RuleError {
        index,
        field: field.to_string(),
        problem,
    };
    let verdict = match raw.rule_type.as_deref() {
        Some("Allow") => Verdict::Allow,
        Some("Deny") => Verdict::Deny,
        Some(other) => {
            return Err(err(
                "type",
                format!("{other:?} is neither \"Allow\" nor \"Deny\""),
            ))
        }
        None => return Err(err("type", "missing".into())),
    };
    let to = raw.to.as_ref().ok_or_else(|| err("to", "missing".into()))?;
    let mut set = Vec::new();
    if to.cidr_selector.is_some() {
        set.push("cidrSelector");
    }
    if to.dns_name.is_some() {
        set.push("dnsName");
    }
    if to.node_selector.is_some() {
        set.push("nodeSelector");
    }
    if set.len() != 1 {
        return Err(err(
            "to",
            format!(
                "exactly one of cidrSelector, dnsName, nodeSelector must be set, found {}",
                if set.is_empty() {
                    "none".to_string()
                } else {
                    set.join(", ")
                }
            ),
        ));
    }
    let destination = if let Some(cidr) = &to.cidr_selector {
        let net: IpNet = cidr
            .parse()
            .map_err(|_| err("to.cidrSelector", format!("{cidr:?} is not a CIDR")))?;
        Destination::Cidr(net.trunc())
    } else if let Some(name) = &to.dns_name {
        Destination::DnsName(DnsPattern::parse(name).map_err(|p| err("to.dnsName", p))?)
    } else {
        let value = to.node_selector.clone().unwrap_or_default();
        Destination::NodeSelector(
            serde_json::from_value(value)
                .map_err(|e| err("to.nodeSelector", format!("not a label selector: {e}")))?,
        )
    };
    let mut ports: Vec<PortMatch> = Vec::new();
    for (i, p) in raw.ports.iter().flatten().enumerate() {
        let port = validate_port(p)
            .map_err(|(field, problem)| err(&format!("ports[{i}].{field}"), problem))?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ok(FirewallRule {
        verdict,
        destination,
        ports,
    })
}

fn validate_port(p: &EgressFirewallPort) -> Result<PortMatch, (&'static str, String)> {
    // OVN-K compares the protocol with Kubernetes' upper-case constants; anything else matches nothing there.
    let protocol = match p.protocol.as_deref() {
        Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        Some(other) => {
            return Err((
                "protocol",
                format!("{other:?} is not one of TCP, UDP, SCTP"),
            ))
        }
        None => return Err(("protocol", "missing".into())),
    };
    let raw = p.port.as_ref().ok_or(("port", "missing".to_string()))?;
    let port = raw
        .as_u64()
        .and_then(|n| u16::try_from(n).ok())
        .filter(|n| *n >= 1)
        .ok_or_else(|| ("port", format!("{raw} is not an integer in 1..=65535")))?;
    Ok(PortMatch { protocol, port })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with_egress(egress: serde_json::Value) -> EgressFirewall {
        EgressFirewall::inline("abc", egress).expect("deserializes")
    }

    fn name(s: &str) -> DnsName {
        DnsName::new(s).expect("valid name")
    }

    #[test]
    fn label_boundaries() {
        let g = name("google.com");
        assert!(is_at_or_below(&name("google.com"), &g));
        assert!(is_at_or_below(&name("www.google.com"), &g));
        assert!(is_at_or_below(&name("a.b.google.com"), &g));
        assert!(!is_at_or_below(&name("evilgoogle.com"), &g));
        assert!(!is_at_or_below(&name("com"), &g));
        assert!(is_child_of(&name("www.google.com"), &g));
        assert!(!is_child_of(&name("a.www.google.com"), &g));
        assert!(!is_child_of(&name("google.com"), &g));
        assert!(!is_child_of(&name("xgoogle.com"), &g));
        assert!(!is_child_of(&name("x.evilgoogle.com"), &g));
    }

    #[test]
    fn the_seed_case_validates() {
        let rules = FirewallRules::from_egress_firewall(&with_egress(json!([
            {"type": "Allow", "to": {"dnsName": "Google.COM."}},
            {"type": "Allow", "to": {"dnsName": "*.example.com"}, "ports": [
                {"protocol": "TCP", "port": 443}, {"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 443}]},
            {"type": "Allow", "to": {"nodeSelector": {"matchLabels": {"a": "b"}}}},
            {"type": "Deny", "to": {"cidrSelector": "10.1.2.3/8"}}
        ])))
        .expect("valid");
        assert_eq!(rules.namespace, "abc");
        assert_eq!(rules.name_matching, None);
        assert_eq!(rules.rules.len(), 4);
        assert_eq!(
            rules.rules[0].destination,
            Destination::DnsName(DnsPattern::Name(name("google.com")))
        );
        assert_eq!(rules.rules[0].to_string(), "Allow dnsName=google.com");
        assert_eq!(
            rules.rules[1].to_string(),
            "Allow dnsName=*.example.com tcp/443 udp/53"
        );
        assert_eq!(rules.rules[2].to_string(), "Allow nodeSelector");
        assert_eq!(rules.rules[3].to_string(), "Deny cidrSelector=10.0.0.0/8");
        assert_eq!(rules.rules[3].verdict, Verdict::Deny);
    }

    #[test]
    fn invalid_rules_name_index_and_field() {
        let cases: &[(serde_json::Value, &str, &str)] = &[
            (json!({"to": {"dnsName": "a.com"}}), "type", "missing"),
            (
                json!({"type": "allow", "to": {"dnsName": "a.com"}}),
                "type",
                "neither",
            ),
            (json!({"type": "Allow"}), "to", "missing"),
            (json!({"type": "Allow", "to": {}}), "to", "found none"),
            (
                json!({"type": "Allow", "to": {"dnsName": "a.com", "cidrSelector": "1.0.0.0/8"}}),
                "to",
                "cidrSelector, dnsName",
            ),
            (
                json!({"type": "Allow", "to": {"cidrSelector": "1.2.3.4"}}),
                "to.cidrSelector",
                "not a CIDR",
            ),
            (
                json!({"type": "Allow", "to": {"cidrSelector": "1.2.3.0/33"}}),
                "to.cidrSelector",
                "not a CIDR",
            ),
            (
                json!({"type": "Allow", "to": {"dnsName": "a b.com"}}),
                "to.dnsName",
                "pattern",
            ),
            (
                json!({"type": "Allow", "to": {"dnsName": "a.*.com"}}),
                "to.dnsName",
                "pattern",
            ),
            (
                json!({"type": "Allow", "to": {"dnsName": "**.com"}}),
                "to.dnsName",
                "pattern",
            ),
            (
                json!({"type": "Allow", "to": {"dnsName": "*"}}),
                "to.dnsName",
                "pattern",
            ),
            (
                json!({"type": "Allow", "to": {"dnsName": "a..com"}}),
                "to.dnsName",
                "pattern",
            ),
            (
                json!({"type": "Allow", "to": {"dnsName": "a_b.com"}}),
                "to.dnsName",
                "pattern",
            ),
            (
                json!({"type": "Allow", "to": {"dnsName": ""}}),
                "to.dnsName",
                "pattern",
            ),
            (
                json!({"type": "Allow", "to": {"dnsName": format!("{}.com", "a".repeat(260))}}),
                "to.dnsName",
                "longer than",
            ),
            (
                json!({"type": "Allow", "to": {"nodeSelector": "role=infra"}}),
                "to.nodeSelector",
                "label selector",
            ),
            (
                json!({"type": "Allow", "to": {"dnsName": "a.com"}, "ports": [{"protocol": "tcp", "port": 1}]}),
                "ports[0].protocol",
                "not one of",
            ),
            (
                json!({"type": "Allow", "to": {"dnsName": "a.com"}, "ports": [{"protocol": "ICMP", "port": 1}]}),
                "ports[0].protocol",
                "not one of",
            ),
            (
                json!({"type": "Allow", "to": {"dnsName": "a.com"}, "ports": [{"port": 1}]}),
                "ports[0].protocol",
                "missing",
            ),
            (
                json!({"type": "Allow", "to": {"dnsName": "a.com"}, "ports": [{"protocol": "TCP", "port": 1}, {"protocol": "TCP"}]}),
                "ports[1].port",
                "missing",
            ),
            (
                json!({"type": "Allow", "to": {"dnsName": "a.com"}, "ports": [{"protocol": "TCP", "port": 0}]}),
                "ports[0].port",
                "1..=65535",
            ),
            (
                json!({"type": "Allow", "to": {"dnsName": "a.com"}, "ports": [{"protocol": "TCP", "port": 65536}]}),
                "ports[0].port",
                "1..=65535",
            ),
            (
                json!({"type": "Allow", "to": {"dnsName": "a.com"}, "ports": [{"protocol": "TCP", "port": "443"}]}),
                "ports[0].port",
                "1..=65535",
            ),
            (
                json!({"type": "Allow", "to": {"dnsName": "a.com"}, "ports": [{"protocol": "TCP", "port": -1}]}),
                "ports[0].port",
                "1..=65535",
            ),
        ];
        for (rule, field, problem) in cases {
            let obj =
                with_egress(json!([{"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}, rule]));
            match FirewallRules::from_egress_firewall(&obj) {
                Err(RulesError::Rule { namespace, error }) => {
                    assert_eq!(namespace, "abc");
                    assert_eq!(error.index, 1, "{rule}");
                    assert_eq!(error.field, *field, "{rule}: {error}");
                    assert!(error.problem.contains(problem), "{rule}: {error}");
                }
                other => panic!("{rule}: expected a rule error, got {other:?}"),
            }
        }
    }

    #[test]
    fn valid_dns_names_of_the_crd_pattern() {
        for (s, shown) in [
            ("google.com", "google.com"),
            ("google.com.", "google.com"),
            ("*.Example.COM", "*.example.com"),
            ("localhost", "localhost"),
            ("*.com", "*.com"),
            ("a-b.c-d.e", "a-b.c-d.e"),
            ("123.45", "123.45"),
        ] {
            let p = DnsPattern::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(p.to_string(), shown);
        }
    }

    #[test]
    fn object_level_problems() {
        let mut obj = with_egress(json!([]));
        obj.metadata.name = Some("other".into());
        assert!(matches!(
            FirewallRules::from_egress_firewall(&obj),
            Err(RulesError::NotNamedDefault { .. })
        ));
        let mut obj = with_egress(json!([]));
        obj.metadata.namespace = None;
        assert_eq!(
            FirewallRules::from_egress_firewall(&obj),
            Err(RulesError::NoNamespace)
        );
        let many: Vec<_> = (0..=MAX_RULES)
            .map(|_| json!({"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}))
            .collect();
        assert!(matches!(
            FirewallRules::from_egress_firewall(&with_egress(json!(many))),
            Err(RulesError::TooManyRules { count, .. }) if count == MAX_RULES + 1
        ));
        let exactly: Vec<_> = (0..MAX_RULES)
            .map(|_| json!({"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}))
            .collect();
        assert!(FirewallRules::from_egress_firewall(&with_egress(json!(exactly))).is_ok());
    }

    #[test]
    fn the_annotation_overrides_name_matching() {
        for (value, expect) in [
            ("strict", Ok(Some(NameMatching::Strict))),
            ("subdomains", Ok(Some(NameMatching::Subdomains))),
            ("Strict", Err(())),
            ("", Err(())),
        ] {
            let mut obj = with_egress(json!([]));
            obj.metadata.annotations =
                Some([(NAME_MATCHING_ANNOTATION.to_string(), value.to_string())].into());
            let got = FirewallRules::from_egress_firewall(&obj);
            match expect {
                Ok(m) => assert_eq!(got.expect("valid").name_matching, m),
                Err(()) => assert!(
                    matches!(got, Err(RulesError::Annotation { .. })),
                    "{value}: {got:?}"
                ),
            }
        }
        let rules = FirewallRules {
            name_matching: Some(NameMatching::Strict),
            ..Default::default()
        };
        assert_eq!(
            rules.name_matching_or(NameMatching::Subdomains),
            NameMatching::Strict
        );
        assert_eq!(
            FirewallRules::default().name_matching_or(NameMatching::Strict),
            NameMatching::Strict
        );
    }

    #[test]
    fn errors_read_well() {
        let err = FirewallRules::from_egress_firewall(&with_egress(json!([
            {"type": "Allow", "to": {"dnsName": "bad name"}}
        ])))
        .expect_err("invalid");
        assert_eq!(
            err.to_string(),
            "EgressFirewall abc/default: egress[0].to.dnsName: \"bad name\" does not match the dnsName pattern ^(\\*\\.)?([A-Za-z0-9-]+\\.)*[A-Za-z0-9-]+\\.?$"
        );
    }

    #[test]
    fn which_errors_leave_their_namespace_without_rules_and_why() {
        let mut too_many = with_egress(json!([]));
        too_many.spec.egress = vec![Default::default(); MAX_RULES + 1];
        let mut annotated = with_egress(json!([]));
        annotated.metadata.annotations = Some(
            [(
                NAME_MATCHING_ANNOTATION.to_string(),
                "sometimes".to_string(),
            )]
            .into_iter()
            .collect(),
        );
        let mut other_name = with_egress(json!([]));
        other_name.metadata.name = Some("extra".into());
        let mut no_namespace = with_egress(json!([]));
        no_namespace.metadata.namespace = None;
        let cases = [
            (
                with_egress(json!([{"type": "Allow", "to": {"dnsName": "bad name"}}])),
                Some("abc"),
                "egress[0].to.dnsName: \"bad name\" does not match",
            ),
            (too_many, Some("abc"), "8001 rules, more than 8000"),
            (
                annotated,
                Some("abc"),
                "annotation dnsflow.io/dns-name-matching: \"sometimes\" is neither",
            ),
            (other_name, None, "EgressFirewall abc/extra is ignored"),
            (no_namespace, None, "EgressFirewall has no namespace"),
        ];
        for (ef, namespace, problem) in cases {
            let err = FirewallRules::from_egress_firewall(&ef).expect_err("invalid");
            assert_eq!(err.invalid_namespace(), namespace, "{err}");
            assert!(err.problem().starts_with(problem), "{}", err.problem());
        }
    }

    #[test]
    fn pattern_matching_table() {
        use NameMatching::{Strict, Subdomains};
        let cases = [
            ("google.com", "google.com", Subdomains, true),
            ("google.com", "www.google.com", Subdomains, true),
            ("google.com", "a.b.google.com", Subdomains, true),
            ("google.com", "evilgoogle.com", Subdomains, false),
            ("google.com", "google.com.evil", Subdomains, false),
            ("google.com", "com", Subdomains, false),
            ("google.com", "google.com", Strict, true),
            ("google.com", "www.google.com", Strict, false),
            ("*.example.com", "a.example.com", Subdomains, true),
            ("*.example.com", "a.example.com", Strict, true),
            ("*.example.com", "b.a.example.com", Subdomains, false),
            ("*.example.com", "example.com", Subdomains, false),
            ("*.example.com", "aexample.com", Subdomains, false),
            ("GOOGLE.com.", "google.com", Strict, true),
        ];
        for (pattern, n, mode, expect) in cases {
            let p = DnsPattern::parse(pattern).expect("valid pattern");
            assert_eq!(
                p.matches(&name(n), mode),
                expect,
                "{pattern} vs {n} ({mode})"
            );
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(json!(null)),
            any::<bool>().prop_map(|b| json!(b)),
            any::<i64>().prop_map(|n| json!(n)),
            prop_oneof![
                Just("Allow".to_string()),
                Just("Deny".to_string()),
                Just("TCP".to_string()),
                Just("*.example.com".to_string()),
                Just("10.0.0.0/8".to_string()),
                "[ -~]{0,12}",
            ]
            .prop_map(|s| json!(s)),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("type".to_string()),
                        Just("to".to_string()),
                        Just("ports".to_string()),
                        Just("dnsName".to_string()),
                        Just("cidrSelector".to_string()),
                        Just("nodeSelector".to_string()),
                        Just("protocol".to_string()),
                        Just("port".to_string()),
                        "[a-z]{1,6}",
                    ],
                    inner,
                    0..4,
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        /// Whatever an EgressFirewall holds, validation answers with rules or a reason, never a panic.
        #[test]
        fn hostile_objects_never_panic(egress in proptest::collection::vec(
            json_value().prop_map(|v| if v.is_object() { v } else { json!({"type": "Allow", "to": v}) }),
            0..6,
        )) {
            if let Ok(obj) = EgressFirewall::inline("abc", json!(egress.clone())) {
                match FirewallRules::from_egress_firewall(&obj) {
                    Ok(rules) => proptest::prop_assert_eq!(rules.rules.len(), egress.len()),
                    Err(e) => proptest::prop_assert!(!e.to_string().is_empty()),
                }
            }
        }
    }
}

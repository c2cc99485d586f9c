//! The decision: which flows one DNS answer earns one pod under its namespace's EgressFirewall.
//!
//! [`decide`] is pure (no I/O, no clock): the daemon, `flowd replay` and the inspection API all call it,
//! and it is where the semantics of DESIGN §5 are pinned down by tests.
//!
//! Choices made here, and why:
//! - **Which names match.** The question name and every CNAME target on the chain are candidates; a rule
//!   matching any of them applies. `www.google.com CNAME www3.l.google.com` is allowed by `google.com`
//!   (the name the pod asked for), and also by a rule naming the CDN target, which is what OVN-K itself does
//!   (it resolves the rule's name and allows whatever addresses that name has, whoever asked). The chain in
//!   a response comes from the cluster's resolver, which only accepts in-bailiwick data for each link, so a
//!   hostile zone cannot attach addresses to a name it does not own.
//! - **Shadowed flows are not emitted.** Once an earlier matching `dnsName` rule produces a flow for the
//!   same pod and IPs with the same or a wider L4 match (no ports, or the same protocol/port), a later
//!   rule's flow at a lower priority could never see a packet: OVS would always pick the earlier one. Such
//!   entries are reported as shadowed in the explanation and produce no grant, which keeps the flow table
//!   as small as the semantics allow. Rules further down with other ports still get their flows.
//! - **Unusable answers.** Answers inside the cluster's pod/service/join subnets never get a flow (that
//!   traffic is not egress and a DNS answer must not open it); neither do link-local addresses
//!   (`169.254.0.0/16`, where cloud metadata services live, and `fe80::/10`) nor unspecified, loopback,
//!   multicast, broadcast or IPv4-mapped IPv6 addresses, which are not egress destinations either. An answer of a family
//!   the pod has no IP of is skipped. Such answers are listed in [`Decision::excluded`] with the reason,
//!   also when other answers of the same response get flows.
//! - **Earlier `cidrSelector` rules are OVN's.** A dnsName rule's flow sits below OVN's own flows for the
//!   rules before it, so where an earlier `cidrSelector` rule covers an answer IP (and port) with the
//!   opposite verdict, OVS never picks flowd's flow for those packets. [`decide`] still emits it (it is
//!   harmless, and looking at every earlier rule for every answer would cost the daemon on each DNS
//!   event); [`exclusions`] names such flows for `flowd replay` and `Explain`. `nodeSelector` rules are
//!   not considered: flowd does not know the nodes' IPs.

use crate::{
    model::{FlowKey, Grant, GrantReason, PodInfo, PortMatch, Verdict},
    rules::{Destination, FirewallRules, NameMatching},
};
use dnsflow_dnstap::{DnsName, DnsResponse};
use ipnet::IpNet;
use std::{fmt, net::IpAddr};

/// OpenFlow priority of rule 0: OVN maps ACL priority `10000 - i` to OpenFlow `11000 - i`, so a dnsflow
/// flow for rule `i` sits exactly where OVN's own flow for that rule would.
pub const DEFAULT_PRIORITY_BASE: u16 = 11000;

/// The node-wide knobs of the decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySettings {
    /// OpenFlow priority of rule 0; rule `i` gets `priority_base - i`.
    pub priority_base: u16,
    /// Plain `dnsName`s match exactly (OVN-K) instead of also covering subdomains, unless a namespace's
    /// annotation says otherwise.
    pub strict_names: bool,
    /// Pod, service and join subnets: answers inside them never get a flow.
    pub cluster_subnets: Vec<IpNet>,
}

impl Default for PolicySettings {
    fn default() -> Self {
        Self {
            priority_base: DEFAULT_PRIORITY_BASE,
            strict_names: false,
            cluster_subnets: Vec::new(),
        }
    }
}

impl PolicySettings {
    /// The node default for plain names.
    pub fn name_matching(&self) -> NameMatching {
        if self.strict_names {
            NameMatching::Strict
        } else {
            NameMatching::Subdomains
        }
    }
}

/// Why a response as a whole earns nothing, before any rule is looked at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// Only NOERROR answers grant anything.
    NotNoError { rcode: u16 },
    /// The response went to an IP that is not this pod's.
    ClientNotPod { client: IpAddr },
    /// NOERROR without any A/AAAA on the chain (NODATA, or only other types).
    NoAddresses,
}

impl fmt::Display for Ignored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotNoError { rcode } => {
                write!(f, "rcode {}", dnsflow_dnstap::event::rcode_name(*rcode))
            }
            Self::ClientNotPod { client } => write!(f, "client {client} is not the pod's IP"),
            Self::NoAddresses => f.write_str("no A/AAAA answers"),
        }
    }
}

/// One L4 match of a rule: `None` when the rule has no ports.
pub type L4 = Option<PortMatch>;

/// What one rule made of the names of a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleOutcome {
    /// A `cidrSelector` or `nodeSelector` rule: OVN-K's own ACL enforces it.
    NotDnsName,
    /// No name of the response matches the rule's `dnsName`.
    NoMatch,
    /// `name` (the first of the question name and the CNAME chain that matches) is covered. `live` are the
    /// L4 matches that get flows; `shadowed` those an earlier rule's flow already covers (with its index).
    Matched {
        name: DnsName,
        priority: u16,
        live: Vec<L4>,
        shadowed: Vec<(L4, usize)>,
    },
    /// The rule matches but `priority_base - index` is below zero: no flow can express it.
    NoPriority { name: DnsName },
}

/// One rule's line in an explanation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleTrace {
    pub index: usize,
    /// The rule as written, e.g. "Allow dnsName=*.example.com tcp/443".
    pub rule: String,
    pub outcome: RuleOutcome,
}

impl RuleTrace {
    pub fn matches(&self) -> bool {
        self.matched_name().is_some()
    }

    /// The name that matched the rule: the question name, or the CNAME target that did.
    pub fn matched_name(&self) -> Option<&DnsName> {
        match &self.outcome {
            RuleOutcome::Matched { name, .. } | RuleOutcome::NoPriority { name } => Some(name),
            RuleOutcome::NotDnsName | RuleOutcome::NoMatch => None,
        }
    }

    /// True when some of the rule's L4 matches get no flow of their own although the rule matches:
    /// an earlier rule's flow covers them, or no priority is left for the rule.
    pub fn has_unused_entries(&self) -> bool {
        match &self.outcome {
            RuleOutcome::Matched { shadowed, .. } => !shadowed.is_empty(),
            RuleOutcome::NoPriority { .. } => true,
            RuleOutcome::NotDnsName | RuleOutcome::NoMatch => false,
        }
    }

    /// A sentence for an operator.
    pub fn reason(&self) -> String {
        match &self.outcome {
            RuleOutcome::NotDnsName => "not a dnsName rule (enforced by OVN itself)".into(),
            RuleOutcome::NoMatch => "no name of the answer matches".into(),
            RuleOutcome::NoPriority { name } => {
                format!("matches {name}, but its priority would be below 0")
            }
            RuleOutcome::Matched {
                name,
                priority,
                live,
                shadowed,
            } => {
                let mut s = format!("matches {name} at priority {priority}");
                if !live.is_empty() {
                    let l4: Vec<String> = live.iter().map(l4_name).collect();
                    s += &format!("; flows for {}", l4.join(", "));
                }
                for (l4, by) in shadowed {
                    s += &format!("; {} already covered by rule {by}", l4_name(l4));
                }
                s
            }
        }
    }
}

/// "tcp/443", or "any" for a rule without ports (as the inspection API prints ports).
pub fn l4_name(l4: &L4) -> String {
    l4.map_or_else(|| "any".into(), |p| format!("{}/{}", p.protocol, p.port))
}

/// The name that matched, for an operator: `www.google.com`, or `www3.l.google.com (CNAME target of
/// www.google.com)` when the match came from the chain rather than from the question.
pub fn matched_text(question: &DnsName, matched: &DnsName) -> String {
    if matched == question {
        matched.to_string()
    } else {
        format!("{matched} (CNAME target of {question})")
    }
}

/// "Allow" or "Deny", as EgressFirewalls spell them.
pub fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "Allow",
        Verdict::Deny => "Deny",
    }
}

/// Why one answer IP got no flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exclusion {
    ClusterSubnet(IpNet),
    /// Unspecified, loopback, multicast, broadcast or IPv4-mapped: not an egress destination.
    NotEgress,
    /// `169.254.0.0/16` or `fe80::/10`: the node's own link (cloud metadata services live there), never
    /// a destination a DNS answer may open.
    LinkLocal,
    /// The pod has no IP of this family to pair it with.
    NoPodIpOfFamily,
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ClusterSubnet(net) => write!(f, "inside cluster subnet {net}"),
            Self::NotEgress => f.write_str("not an egress destination"),
            Self::LinkLocal => f.write_str("link-local (the node's own link, e.g. cloud metadata)"),
            Self::NoPodIpOfFamily => f.write_str("the pod has no IP of this family"),
        }
    }
}

/// The grants a response earns, with everything needed to explain them.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Decision {
    /// In rule order, then answer order, then port order.
    pub grants: Vec<Grant>,
    /// Set when the response earns nothing whatever the rules say.
    pub ignored: Option<Ignored>,
    /// The rules that match, in order (empty when `ignored`); [`explain`] lists every rule.
    pub rules: Vec<RuleTrace>,
    /// Answer IPs that got no flow and why, also when other answers did. Only computed when some rule
    /// matched: otherwise no answer gets anything, and `rules` says why.
    pub excluded: Vec<(IpAddr, Exclusion)>,
}

impl Decision {
    /// The name that matched rule `index` (the question name or a CNAME target), if it matched.
    pub fn matched_name(&self, index: usize) -> Option<&DnsName> {
        self.rules
            .iter()
            .find(|r| r.index == index)
            .and_then(RuleTrace::matched_name)
    }
}

/// A grant's flow that OVS never picks for some or all of its packets: OVN's own flow for an earlier
/// `cidrSelector` rule covers the answer IP with the opposite verdict, at a higher priority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outranked {
    /// The answer IP.
    pub ip: IpAddr,
    /// The grant's rule and verdict.
    pub rule: usize,
    pub verdict: Verdict,
    /// The part of the grant's L4 match the earlier rule takes: one port, or `None` for all of it (or
    /// all that rules before that one did not already take).
    pub l4: L4,
    /// The earlier rule, and that rule as written.
    pub by: usize,
    pub by_rule: String,
}

impl fmt::Display for Outranked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rule {} ({}) decides it first: rule {}'s {} flow never applies",
            self.by,
            self.by_rule,
            self.rule,
            verdict_name(self.verdict)
        )
    }
}

/// An answer IP, or one L4 match of it, that gets no flow OVS would use, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Excluded {
    /// No flow at all for the IP.
    Answer { ip: IpAddr, why: Exclusion },
    /// A flow that an earlier rule's flow outranks.
    Outranked(Outranked),
}

impl Excluded {
    pub fn ip(&self) -> IpAddr {
        match self {
            Self::Answer { ip, .. } => *ip,
            Self::Outranked(o) => o.ip,
        }
    }

    /// The L4 match concerned, or `None` for the whole IP.
    pub fn l4(&self) -> Option<L4> {
        match self {
            Self::Answer { .. } => None,
            Self::Outranked(o) => Some(o.l4),
        }
    }

    /// Why, for an operator.
    pub fn reason(&self) -> String {
        match self {
            Self::Answer { why, .. } => why.to_string(),
            Self::Outranked(o) => o.to_string(),
        }
    }
}

impl fmt::Display for Excluded {
    /// "10.96.0.10: inside cluster subnet 10.96.0.0/16", "1.2.3.4 tcp/443: rule 0 (...) decides it first: ...".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.l4() {
            None => write!(f, "{}: {}", self.ip(), self.reason()),
            Some(l4) => write!(f, "{} {}: {}", self.ip(), l4_name(&l4), self.reason()),
        }
    }
}

/// Everything of `decision`'s answers that gets no usable flow: [`Decision::excluded`], then the grants
/// whose flows OVN's flows for earlier `cidrSelector` rules of `rules` outrank (see [`outranked`]).
pub fn exclusions(decision: &Decision, rules: &FirewallRules) -> Vec<Excluded> {
    decision
        .excluded
        .iter()
        .map(|(ip, why)| Excluded::Answer {
            ip: *ip,
            why: why.clone(),
        })
        .chain(
            outranked(&decision.grants, rules)
                .into_iter()
                .map(Excluded::Outranked),
        )
        .collect()
}

/// The parts of `grants` that OVS never picks because OVN's flow for an earlier `cidrSelector` rule of
/// `rules` covers the answer IP (and port) with the opposite verdict at a higher priority. Each rule is
/// looked at in order, as OVS does by priority: the first rule covering a port decides it, so a later
/// one never outranks what an earlier one took (whatever that one's verdict). Not part of [`decide`]:
/// this walks every earlier rule for every grant, which only explanations need.
pub fn outranked(grants: &[Grant], rules: &FirewallRules) -> Vec<Outranked> {
    let mut out = Vec::new();
    for g in grants {
        // Ports of a grant without L4 match that earlier rules with ports have taken already.
        let mut taken: Vec<PortMatch> = Vec::new();
        for (by, earlier) in rules.rules.iter().enumerate().take(g.reason.rule_index) {
            let Destination::Cidr(net) = &earlier.destination else {
                continue;
            };
            if !net.contains(&g.key.dst) {
                continue;
            }
            let whole =
                earlier.ports.is_empty() || g.key.l4.is_some_and(|p| earlier.ports.contains(&p));
            let parts: Vec<L4> = if whole {
                vec![g.key.l4]
            } else if g.key.l4.is_none() {
                earlier
                    .ports
                    .iter()
                    .filter(|p| !taken.contains(p))
                    .map(|p| Some(*p))
                    .collect()
            } else {
                Vec::new()
            };
            if earlier.verdict != g.verdict {
                out.extend(parts.iter().map(|l4| Outranked {
                    ip: g.key.dst,
                    rule: g.reason.rule_index,
                    verdict: g.verdict,
                    l4: *l4,
                    by,
                    by_rule: earlier.to_string(),
                }));
            }
            if whole {
                break;
            }
            taken.extend(parts.into_iter().flatten());
        }
    }
    out
}

/// Rule by rule, what `names` (question name first, then the CNAME chain) make of `rules`.
pub fn explain(
    names: &[&DnsName],
    rules: &FirewallRules,
    settings: &PolicySettings,
) -> Vec<RuleTrace> {
    trace(names, rules, settings, true)
}

/// The L4 matches that earlier matching rules already cover with a flow of higher priority for the
/// same pod and IPs (every rule of one decision sees the same answers).
#[derive(Default)]
struct Coverage {
    /// The earliest matching rule without ports: it covers every L4 match.
    all: Option<usize>,
    /// Otherwise, per protocol/port, the rule covering it.
    ports: Vec<(PortMatch, usize)>,
}

impl Coverage {
    fn covered_by(&self, l4: L4) -> Option<usize> {
        self.all.or_else(|| {
            let p = l4?;
            self.ports.iter().find(|(c, _)| *c == p).map(|(_, i)| *i)
        })
    }

    /// Splits rule `index`'s L4 matches into live and shadowed ones, and records the live ones.
    fn claim(&mut self, index: usize, ports: &[PortMatch]) -> (Vec<L4>, Vec<(L4, usize)>) {
        let entries: Vec<L4> = if ports.is_empty() {
            vec![None]
        } else {
            ports.iter().copied().map(Some).collect()
        };
        let (mut live, mut shadowed) = (Vec::new(), Vec::new());
        for l4 in entries {
            match self.covered_by(l4) {
                Some(by) => shadowed.push((l4, by)),
                None => live.push(l4),
            }
        }
        for l4 in &live {
            match l4 {
                None => self.all = self.all.or(Some(index)),
                Some(p) => self.ports.push((*p, index)),
            }
        }
        (live, shadowed)
    }
}

/// [`explain`], keeping only the rules that match when `all` is false: [`decide`] runs for every DNS
/// answer, and formatting thousands of non-matching rules would dominate its cost.
fn trace(
    names: &[&DnsName],
    rules: &FirewallRules,
    settings: &PolicySettings,
    all: bool,
) -> Vec<RuleTrace> {
    let mode = rules.name_matching_or(settings.name_matching());
    let mut coverage = Coverage::default();
    let mut out = Vec::new();
    for (index, rule) in rules.rules.iter().enumerate() {
        let matched = rule
            .dns_pattern()
            .map(|pattern| names.iter().find(|n| pattern.matches(n, mode)));
        let outcome = match matched {
            None => RuleOutcome::NotDnsName,
            Some(None) => RuleOutcome::NoMatch,
            Some(Some(name)) => {
                let name = (*name).clone();
                let priority = u16::try_from(index)
                    .ok()
                    .and_then(|i| settings.priority_base.checked_sub(i));
                match priority {
                    None => RuleOutcome::NoPriority { name },
                    Some(priority) => {
                        let (live, shadowed) = coverage.claim(index, &rule.ports);
                        RuleOutcome::Matched {
                            name,
                            priority,
                            live,
                            shadowed,
                        }
                    }
                }
            }
        };
        if all || !matches!(outcome, RuleOutcome::NotDnsName | RuleOutcome::NoMatch) {
            out.push(RuleTrace {
                index,
                rule: rule.to_string(),
                outcome,
            });
        }
    }
    out
}

fn exclusion(ip: IpAddr, settings: &PolicySettings) -> Option<Exclusion> {
    if let Some(net) = settings.cluster_subnets.iter().find(|n| n.contains(&ip)) {
        return Some(Exclusion::ClusterSubnet(*net));
    }
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    };
    if link_local {
        return Some(Exclusion::LinkLocal);
    }
    let not_egress = ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || match ip {
            IpAddr::V4(v4) => v4.is_broadcast(),
            IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
        };
    not_egress.then_some(Exclusion::NotEgress)
}

/// The flows `resp` earns `pod` under `rules` (DESIGN §5). Pure: same inputs, same decision.
pub fn decide(
    resp: &DnsResponse,
    pod: &PodInfo,
    rules: &FirewallRules,
    settings: &PolicySettings,
) -> Decision {
    let ignored = if !resp.is_noerror() {
        Some(Ignored::NotNoError { rcode: resp.rcode })
    } else if !pod.ips.contains(&resp.client) {
        Some(Ignored::ClientNotPod {
            client: resp.client,
        })
    } else if resp.answers.is_empty() {
        Some(Ignored::NoAddresses)
    } else {
        None
    };
    if ignored.is_some() {
        return Decision {
            ignored,
            ..Decision::default()
        };
    }
    let names: Vec<&DnsName> = resp.names().collect();
    let traces = trace(&names, rules, settings, false);
    let mut decision = Decision {
        rules: traces,
        ..Decision::default()
    };
    if !decision.rules.iter().any(RuleTrace::matches) {
        return decision;
    }
    // Usable answers, each IP once (the longest TTL wins when a name repeats an address).
    let mut targets: Vec<(IpAddr, IpAddr, u32)> = Vec::new();
    for answer in &resp.answers {
        if let Some(t) = targets.iter_mut().find(|t| t.1 == answer.ip) {
            t.2 = t.2.max(answer.ttl);
            continue;
        }
        if decision.excluded.iter().any(|(ip, _)| *ip == answer.ip) {
            continue;
        }
        let why = exclusion(answer.ip, settings).or_else(|| {
            match pod
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == answer.ip.is_ipv4())
            {
                Some(src) => {
                    targets.push((*src, answer.ip, answer.ttl));
                    None
                }
                None => Some(Exclusion::NoPodIpOfFamily),
            }
        });
        if let Some(why) = why {
            decision.excluded.push((answer.ip, why));
        }
    }
    for trace in &decision.rules {
        let RuleOutcome::Matched { priority, live, .. } = &trace.outcome else {
            continue;
        };
        let Some(rule) = rules.rules.get(trace.index) else {
            continue;
        };
        let dns_name = rule
            .dns_pattern()
            .map(ToString::to_string)
            .unwrap_or_default();
        for (src, dst, ttl) in &targets {
            for l4 in live {
                decision.grants.push(Grant {
                    key: FlowKey {
                        pod: pod.key.clone(),
                        priority: *priority,
                        src: *src,
                        dst: *dst,
                        l4: *l4,
                    },
                    verdict: rule.verdict,
                    ttl: *ttl,
                    reason: GrantReason {
                        qname: resp.qname.clone(),
                        rule_index: trace.index,
                        dns_name: dns_name.clone(),
                    },
                });
            }
        }
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        egressfirewall::EgressFirewall,
        model::{PodKey, Protocol, Verdict},
        rules::NameMatching,
    };
    use dnsflow_dnstap::Answer;
    use proptest::prelude::*;
    use serde_json::json;

    fn name(s: &str) -> DnsName {
        DnsName::new(s).expect("valid name")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("valid ip")
    }

    fn pod(ips: &[&str]) -> PodInfo {
        PodInfo {
            uid: None,
            key: PodKey::new("abc", "client"),
            ips: ips.iter().map(|s| ip(s)).collect(),
            node: "ovn-worker".into(),
        }
    }

    fn rules(egress: serde_json::Value) -> FirewallRules {
        let ef = EgressFirewall::inline("abc", egress).expect("deserializes");
        FirewallRules::from_egress_firewall(&ef).expect("valid rules")
    }

    fn response(client: &str, qname: &str, chain: &[&str], answers: &[(&str, u32)]) -> DnsResponse {
        let answers = answers.iter().map(|(a, ttl)| Answer {
            ip: ip(a),
            ttl: *ttl,
        });
        let chain = chain.iter().map(|n| name(n)).collect();
        DnsResponse::noerror(ip(client), name(qname), chain, answers.collect())
    }

    /// (priority, dst, l4, verdict, rule index) of each grant.
    fn flows(d: &Decision) -> Vec<(u16, IpAddr, String, Verdict, usize)> {
        d.grants
            .iter()
            .map(|g| {
                (
                    g.key.priority,
                    g.key.dst,
                    l4_name(&g.key.l4),
                    g.verdict,
                    g.reason.rule_index,
                )
            })
            .collect()
    }

    fn allow(n: &str) -> serde_json::Value {
        json!({"type": "Allow", "to": {"dnsName": n}})
    }

    fn seed_rules() -> FirewallRules {
        rules(json!([
            {"type": "Allow", "to": {"dnsName": "google.com"}},
            {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}
        ]))
    }

    #[test]
    fn the_seed_case_grants_the_cdn_answers_at_rule_0() {
        let resp = response(
            "10.244.1.5",
            "www.google.com",
            &["www3.l.google.com"],
            &[("142.250.74.36", 300), ("142.250.74.68", 200)],
        );
        let d = decide(
            &resp,
            &pod(&["10.244.1.5"]),
            &seed_rules(),
            &PolicySettings::default(),
        );
        assert_eq!(d.ignored, None);
        assert_eq!(
            flows(&d),
            vec![
                (11000, ip("142.250.74.36"), "any".into(), Verdict::Allow, 0),
                (11000, ip("142.250.74.68"), "any".into(), Verdict::Allow, 0),
            ]
        );
        let g = &d.grants[0];
        assert_eq!(g.key.src, ip("10.244.1.5"));
        assert_eq!(g.key.pod, PodKey::new("abc", "client"));
        assert_eq!(g.ttl, 300);
        assert_eq!(g.reason.qname, name("www.google.com"));
        assert_eq!(g.reason.dns_name, "google.com");
        assert_eq!(d.grants[1].ttl, 200);
        assert_eq!(d.rules.len(), 1, "only the matching rule is traced");
        let all = explain(
            &[&name("www.google.com")],
            &seed_rules(),
            &PolicySettings::default(),
        );
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].outcome, RuleOutcome::NotDnsName);
        assert_eq!(all[1].rule, "Deny cidrSelector=0.0.0.0/0");
        assert_eq!(
            all[1].reason(),
            "not a dnsName rule (enforced by OVN itself)"
        );
        let none = explain(
            &[&name("example.org")],
            &seed_rules(),
            &PolicySettings::default(),
        );
        assert_eq!(none[0].outcome, RuleOutcome::NoMatch);
        assert_eq!(
            d.rules[0].reason(),
            "matches www.google.com at priority 11000; flows for any"
        );
    }

    /// The semantic cases, each a rule list, a response and the expected (priority, dst, l4) flows.
    #[test]
    fn decision_table() {
        struct Case {
            what: &'static str,
            egress: serde_json::Value,
            settings: PolicySettings,
            qname: &'static str,
            chain: &'static [&'static str],
            answers: &'static [&'static str],
            expect: &'static [(u16, &'static str, &'static str)],
        }
        let dflt = PolicySettings::default;
        let strict = || PolicySettings {
            strict_names: true,
            ..PolicySettings::default()
        };
        let cases = vec![
            Case {
                what: "wildcard: one extra label",
                egress: json!([allow("*.example.com")]),
                settings: dflt(),
                qname: "a.example.com",
                chain: &[],
                answers: &["1.1.1.1"],
                expect: &[(11000, "1.1.1.1", "any")],
            },
            Case {
                what: "wildcard: never deeper",
                egress: json!([allow("*.example.com")]),
                settings: dflt(),
                qname: "b.a.example.com",
                chain: &[],
                answers: &["1.1.1.1"],
                expect: &[],
            },
            Case {
                what: "wildcard: never the base",
                egress: json!([allow("*.example.com")]),
                settings: dflt(),
                qname: "example.com",
                chain: &[],
                answers: &["1.1.1.1"],
                expect: &[],
            },
            Case {
                what: "plain name covers subdomains by default",
                egress: json!([allow("google.com")]),
                settings: dflt(),
                qname: "mail.google.com",
                chain: &[],
                answers: &["2.2.2.2"],
                expect: &[(11000, "2.2.2.2", "any")],
            },
            Case {
                what: "never a name that merely ends the same",
                egress: json!([allow("google.com")]),
                settings: dflt(),
                qname: "evilgoogle.com",
                chain: &[],
                answers: &["2.2.2.2"],
                expect: &[],
            },
            Case {
                what: "strict: plain name is exact",
                egress: json!([allow("google.com")]),
                settings: strict(),
                qname: "mail.google.com",
                chain: &[],
                answers: &["2.2.2.2"],
                expect: &[],
            },
            Case {
                what: "strict: the name itself",
                egress: json!([allow("google.com")]),
                settings: strict(),
                qname: "google.com",
                chain: &[],
                answers: &["2.2.2.2"],
                expect: &[(11000, "2.2.2.2", "any")],
            },
            Case {
                what: "upper case and trailing dot in the rule",
                egress: json!([allow("WWW.Google.COM.")]),
                settings: strict(),
                qname: "www.google.com",
                chain: &[],
                answers: &["2.2.2.2"],
                expect: &[(11000, "2.2.2.2", "any")],
            },
            Case {
                what: "CNAME: the rule names the CDN target",
                egress: json!([allow("*.l.google.com")]),
                settings: dflt(),
                qname: "www.google.com",
                chain: &["www3.l.google.com"],
                answers: &["3.3.3.3"],
                expect: &[(11000, "3.3.3.3", "any")],
            },
            Case {
                what: "CNAME: neither asked name nor chain match",
                egress: json!([allow("example.org")]),
                settings: dflt(),
                qname: "www.google.com",
                chain: &["www3.l.google.com"],
                answers: &["3.3.3.3"],
                expect: &[],
            },
            Case {
                what: "IPv6 answer pairs with the pod's IPv6",
                egress: json!([allow("google.com")]),
                settings: dflt(),
                qname: "www.google.com",
                chain: &[],
                answers: &["2a00:1450::4", "4.4.4.4"],
                expect: &[(11000, "2a00:1450::4", "any"), (11000, "4.4.4.4", "any")],
            },
            Case {
                what: "answers inside cluster subnets get nothing",
                egress: json!([allow("google.com")]),
                settings: PolicySettings {
                    cluster_subnets: vec![
                        "10.96.0.0/16".parse().expect("net"),
                        "fd00:10:96::/112".parse().expect("net"),
                    ],
                    ..PolicySettings::default()
                },
                qname: "www.google.com",
                chain: &[],
                answers: &["10.96.0.10", "5.5.5.5", "fd00:10:96::a"],
                expect: &[(11000, "5.5.5.5", "any")],
            },
            Case {
                what: "loopback, unspecified and v4-mapped answers get nothing",
                egress: json!([allow("google.com")]),
                settings: dflt(),
                qname: "www.google.com",
                chain: &[],
                answers: &["127.0.0.1", "0.0.0.0", "::ffff:1.2.3.4", "224.0.0.1", "6.6.6.6"],
                expect: &[(11000, "6.6.6.6", "any")],
            },
            Case {
                what: "link-local answers (cloud metadata) get nothing, whatever the cluster subnets",
                egress: json!([allow("google.com")]),
                settings: PolicySettings {
                    cluster_subnets: Vec::new(),
                    ..PolicySettings::default()
                },
                qname: "metadata.google.com",
                chain: &[],
                answers: &["169.254.169.254", "fe80::a9fe:a9fe", "fd00:ec2::254", "6.6.6.6"],
                expect: &[(11000, "fd00:ec2::254", "any"), (11000, "6.6.6.6", "any")],
            },
            Case {
                what: "ports: one flow per port entry",
                egress: json!([{"type": "Allow", "to": {"dnsName": "google.com"},
                    "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "UDP", "port": 443}]}]),
                settings: dflt(),
                qname: "google.com",
                chain: &[],
                answers: &["7.7.7.7"],
                expect: &[(11000, "7.7.7.7", "tcp/443"), (11000, "7.7.7.7", "udp/443")],
            },
            Case {
                what: "rule order: an earlier cidr Deny leaves rule 1 at 10999 (OVS keeps the Deny winning)",
                egress: json!([{"type": "Deny", "to": {"cidrSelector": "7.0.0.0/8"}}, allow("google.com")]),
                settings: dflt(),
                qname: "google.com",
                chain: &[],
                answers: &["7.7.7.7"],
                expect: &[(10999, "7.7.7.7", "any")],
            },
            Case {
                what: "rule order: a later dnsName rule with a covered port is shadowed, other ports are not",
                egress: json!([
                    {"type": "Allow", "to": {"dnsName": "google.com"}, "ports": [{"protocol": "TCP", "port": 443}]},
                    {"type": "Deny", "to": {"dnsName": "*.google.com"}, "ports": [
                        {"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 80}]},
                    {"type": "Allow", "to": {"dnsName": "www.google.com"}}
                ]),
                settings: dflt(),
                qname: "www.google.com",
                chain: &[],
                answers: &["8.8.8.8"],
                expect: &[
                    (11000, "8.8.8.8", "tcp/443"),
                    (10999, "8.8.8.8", "tcp/80"),
                    (10998, "8.8.8.8", "any"),
                ],
            },
            Case {
                what: "rule order: a rule without ports shadows every later matching rule",
                egress: json!([
                    {"type": "Deny", "to": {"dnsName": "*.google.com"}},
                    allow("google.com"),
                    {"type": "Allow", "to": {"dnsName": "google.com"}, "ports": [{"protocol": "SCTP", "port": 9}]}
                ]),
                settings: dflt(),
                qname: "www.google.com",
                chain: &[],
                answers: &["8.8.4.4"],
                expect: &[(11000, "8.8.4.4", "any")],
            },
            Case {
                what: "custom priority base",
                egress: json!([{"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}, allow("google.com")]),
                settings: PolicySettings {
                    priority_base: 2000,
                    ..PolicySettings::default()
                },
                qname: "google.com",
                chain: &[],
                answers: &["9.9.9.9"],
                expect: &[(1999, "9.9.9.9", "any")],
            },
        ];
        for c in cases {
            let resp = response(
                "10.244.1.5",
                c.qname,
                c.chain,
                &c.answers.iter().map(|a| (*a, 60)).collect::<Vec<_>>(),
            );
            let d = decide(
                &resp,
                &pod(&["10.244.1.5", "fd00:10:244:2::5"]),
                &rules(c.egress),
                &c.settings,
            );
            let got: Vec<(u16, IpAddr, String)> = flows(&d)
                .into_iter()
                .map(|(p, dst, l4, _, _)| (p, dst, l4))
                .collect();
            let want: Vec<(u16, IpAddr, String)> = c
                .expect
                .iter()
                .map(|(p, dst, l4)| (*p, ip(dst), (*l4).to_string()))
                .collect();
            assert_eq!(got, want, "{}", c.what);
            for g in &d.grants {
                assert_eq!(g.key.src.is_ipv4(), g.key.dst.is_ipv4(), "{}", c.what);
            }
        }
    }

    #[test]
    fn verdicts_and_shadow_explanations() {
        let r = rules(json!([
            {"type": "Deny", "to": {"dnsName": "ads.example.com"}},
            {"type": "Allow", "to": {"dnsName": "example.com"}, "ports": [{"protocol": "TCP", "port": 443}]}
        ]));
        let d = decide(
            &response("10.244.1.5", "ads.example.com", &[], &[("1.2.3.4", 30)]),
            &pod(&["10.244.1.5"]),
            &r,
            &PolicySettings::default(),
        );
        assert_eq!(
            flows(&d),
            vec![(11000, ip("1.2.3.4"), "any".into(), Verdict::Deny, 0)]
        );
        assert_eq!(
            d.rules[1].outcome,
            RuleOutcome::Matched {
                name: name("ads.example.com"),
                priority: 10999,
                live: vec![],
                shadowed: vec![(
                    Some(PortMatch {
                        protocol: Protocol::Tcp,
                        port: 443
                    }),
                    0
                )],
            }
        );
        assert_eq!(
            d.rules[1].reason(),
            "matches ads.example.com at priority 10999; tcp/443 already covered by rule 0"
        );
    }

    #[test]
    fn the_namespace_annotation_overrides_the_node_default() {
        let mut r = rules(json!([{"type": "Allow", "to": {"dnsName": "google.com"}}]));
        let resp = response("10.244.1.5", "www.google.com", &[], &[("1.2.3.4", 30)]);
        let p = pod(&["10.244.1.5"]);
        let strict = PolicySettings {
            strict_names: true,
            ..PolicySettings::default()
        };
        assert!(decide(&resp, &p, &r, &strict).grants.is_empty());
        r.name_matching = Some(NameMatching::Subdomains);
        assert_eq!(decide(&resp, &p, &r, &strict).grants.len(), 1);
        r.name_matching = Some(NameMatching::Strict);
        assert!(decide(&resp, &p, &r, &PolicySettings::default())
            .grants
            .is_empty());
    }

    #[test]
    fn whole_responses_that_earn_nothing() {
        let p = pod(&["10.244.1.5"]);
        let mut nx = response("10.244.1.5", "www.google.com", &[], &[("1.2.3.4", 30)]);
        nx.rcode = 3;
        let d = decide(&nx, &p, &seed_rules(), &PolicySettings::default());
        assert_eq!(d.ignored, Some(Ignored::NotNoError { rcode: 3 }));
        assert_eq!(
            d.ignored.as_ref().map(ToString::to_string).as_deref(),
            Some("rcode NXDOMAIN")
        );
        assert!(d.grants.is_empty());

        let other = response("10.244.1.6", "www.google.com", &[], &[("1.2.3.4", 30)]);
        let d = decide(&other, &p, &seed_rules(), &PolicySettings::default());
        assert_eq!(
            d.ignored,
            Some(Ignored::ClientNotPod {
                client: ip("10.244.1.6")
            })
        );

        let nodata = response("10.244.1.5", "www.google.com", &[], &[]);
        let d = decide(&nodata, &p, &seed_rules(), &PolicySettings::default());
        assert_eq!(d.ignored, Some(Ignored::NoAddresses));

        let v6_only = response("10.244.1.5", "www.google.com", &[], &[("2a00::1", 30)]);
        let d = decide(&v6_only, &p, &seed_rules(), &PolicySettings::default());
        assert!(d.grants.is_empty());
        assert_eq!(
            d.excluded,
            vec![(ip("2a00::1"), Exclusion::NoPodIpOfFamily)]
        );
    }

    #[test]
    fn repeated_answers_give_one_flow_with_the_longest_ttl() {
        let resp = response(
            "10.244.1.5",
            "google.com",
            &[],
            &[("1.2.3.4", 30), ("1.2.3.4", 90)],
        );
        let d = decide(
            &resp,
            &pod(&["10.244.1.5"]),
            &seed_rules(),
            &PolicySettings::default(),
        );
        assert_eq!(d.grants.len(), 1);
        assert_eq!(d.grants[0].ttl, 90);
    }

    #[test]
    fn a_priority_below_zero_is_reported_not_wrapped() {
        let r = rules(json!([
            {"type": "Deny", "to": {"cidrSelector": "10.0.0.0/8"}},
            {"type": "Allow", "to": {"dnsName": "google.com"}}
        ]));
        let settings = PolicySettings {
            priority_base: 0,
            ..PolicySettings::default()
        };
        let d = decide(
            &response("10.244.1.5", "google.com", &[], &[("1.2.3.4", 30)]),
            &pod(&["10.244.1.5"]),
            &r,
            &settings,
        );
        assert!(d.grants.is_empty());
        assert_eq!(d.rules[0].index, 1);
        assert_eq!(
            d.rules[0].outcome,
            RuleOutcome::NoPriority {
                name: name("google.com")
            }
        );
    }

    #[test]
    fn the_name_that_matched_each_rule_is_reported() {
        struct Case {
            what: &'static str,
            egress: serde_json::Value,
            qname: &'static str,
            chain: &'static [&'static str],
            /// (rule index, the name that matched it) for every matching rule.
            want: &'static [(usize, &'static str)],
            /// `matched_text` of the first match.
            text: &'static str,
        }
        let cases = [
            Case {
                what: "the question name matches",
                egress: json!([allow("google.com")]),
                qname: "www.google.com",
                chain: &["www3.l.google.com"],
                want: &[(0, "www.google.com")],
                text: "www.google.com",
            },
            Case {
                what: "only the CNAME target matches",
                egress: json!([allow("*.l.google.com")]),
                qname: "www.google.com",
                chain: &["www3.l.google.com"],
                want: &[(0, "www3.l.google.com")],
                text: "www3.l.google.com (CNAME target of www.google.com)",
            },
            Case {
                what: "the last link of a longer chain matches",
                egress: json!([allow("cdn.example.net")]),
                qname: "shop.example.com",
                chain: &["shop.example.com.edgekey.net", "e1.cdn.example.net"],
                want: &[(0, "e1.cdn.example.net")],
                text: "e1.cdn.example.net (CNAME target of shop.example.com)",
            },
            Case {
                what: "each rule reports its own first matching name",
                egress: json!([
                    {"type": "Deny", "to": {"dnsName": "*.l.google.com"}, "ports": [{"protocol": "TCP", "port": 80}]},
                    {"type": "Deny", "to": {"cidrSelector": "10.0.0.0/8"}},
                    allow("google.com")
                ]),
                qname: "www.google.com",
                chain: &["www3.l.google.com"],
                want: &[(0, "www3.l.google.com"), (2, "www.google.com")],
                text: "www3.l.google.com (CNAME target of www.google.com)",
            },
            Case {
                what: "nothing matches",
                egress: json!([allow("example.org")]),
                qname: "www.google.com",
                chain: &["www3.l.google.com"],
                want: &[],
                text: "",
            },
        ];
        for c in cases {
            let r = rules(c.egress);
            let resp = response("10.244.1.5", c.qname, c.chain, &[("1.2.3.4", 60)]);
            let d = decide(&resp, &pod(&["10.244.1.5"]), &r, &PolicySettings::default());
            let got: Vec<(usize, String)> = d
                .rules
                .iter()
                .filter_map(|t| t.matched_name().map(|n| (t.index, n.to_string())))
                .collect();
            let want: Vec<(usize, String)> =
                c.want.iter().map(|(i, n)| (*i, (*n).to_string())).collect();
            assert_eq!(got, want, "{}", c.what);
            for (i, n) in c.want {
                assert_eq!(d.matched_name(*i), Some(&name(n)), "{}", c.what);
            }
            // Every grant's rule has the name that matched it.
            for g in &d.grants {
                assert!(d.matched_name(g.reason.rule_index).is_some(), "{}", c.what);
            }
            // explain() agrees with decide() on the names.
            let names: Vec<&DnsName> = resp.names().collect();
            let all = explain(&names, &r, &PolicySettings::default());
            let explained: Vec<(usize, String)> = all
                .iter()
                .filter_map(|t| t.matched_name().map(|n| (t.index, n.to_string())))
                .collect();
            assert_eq!(explained, want, "{}", c.what);
            let text = c
                .want
                .first()
                .map(|(_, n)| matched_text(&resp.qname, &name(n)))
                .unwrap_or_default();
            assert_eq!(text, c.text, "{}", c.what);
        }
    }

    #[test]
    fn excluded_answers_are_reported_beside_the_granted_ones() {
        struct Case {
            what: &'static str,
            pod_ips: &'static [&'static str],
            answers: &'static [&'static str],
            granted: &'static [&'static str],
            excluded: &'static [&'static str],
        }
        let settings = PolicySettings {
            cluster_subnets: vec![
                "10.96.0.0/16".parse().expect("net"),
                "fd00:10:96::/112".parse().expect("net"),
            ],
            ..PolicySettings::default()
        };
        let cases = [
            Case {
                what: "a service IP among public ones",
                pod_ips: &["10.244.1.5"],
                answers: &["10.96.0.10", "5.5.5.5"],
                granted: &["5.5.5.5"],
                excluded: &["10.96.0.10: inside cluster subnet 10.96.0.0/16"],
            },
            Case {
                what: "IPv6 answers for a single-stack pod",
                pod_ips: &["10.244.1.5"],
                answers: &["5.5.5.5", "2a00:1450::4"],
                granted: &["5.5.5.5"],
                excluded: &["2a00:1450::4: the pod has no IP of this family"],
            },
            Case {
                what: "loopback and multicast among public ones, each reported once",
                pod_ips: &["10.244.1.5", "fd00:10:244:2::5"],
                answers: &[
                    "127.0.0.1",
                    "169.254.169.254",
                    "6.6.6.6",
                    "ff02::1",
                    "127.0.0.1",
                    "fd00:10:96::a",
                ],
                granted: &["6.6.6.6"],
                excluded: &[
                    "127.0.0.1: not an egress destination",
                    "169.254.169.254: link-local (the node's own link, e.g. cloud metadata)",
                    "ff02::1: not an egress destination",
                    "fd00:10:96::a: inside cluster subnet fd00:10:96::/112",
                ],
            },
            Case {
                what: "everything usable",
                pod_ips: &["10.244.1.5"],
                answers: &["5.5.5.5", "6.6.6.6"],
                granted: &["5.5.5.5", "6.6.6.6"],
                excluded: &[],
            },
        ];
        for c in cases {
            let answers: Vec<(&str, u32)> = c.answers.iter().map(|a| (*a, 60)).collect();
            let d = decide(
                &response("10.244.1.5", "www.google.com", &[], &answers),
                &pod(c.pod_ips),
                &seed_rules(),
                &settings,
            );
            let granted: Vec<IpAddr> = d.grants.iter().map(|g| g.key.dst).collect();
            let want: Vec<IpAddr> = c.granted.iter().map(|a| ip(a)).collect();
            assert_eq!(granted, want, "{}", c.what);
            let excluded: Vec<String> = exclusions(&d, &seed_rules())
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(excluded, c.excluded, "{}", c.what);
        }
    }

    #[test]
    fn flows_an_earlier_cidr_rule_of_the_other_verdict_decides_first_are_named() {
        struct Case {
            what: &'static str,
            egress: serde_json::Value,
            answers: &'static [&'static str],
            /// How many grants: outranked flows are still emitted.
            grants: usize,
            excluded: &'static [&'static str],
        }
        let tcp = |port| json!({"protocol": "TCP", "port": port});
        let cases = [
            Case {
                what: "an earlier Deny of the IP's network",
                egress: json!([{"type": "Deny", "to": {"cidrSelector": "7.0.0.0/8"}}, allow("google.com")]),
                answers: &["7.7.7.7", "8.8.8.8"],
                grants: 2,
                excluded: &["7.7.7.7 any: rule 0 (Deny cidrSelector=7.0.0.0/8) decides it first: rule 1's Allow flow never applies"],
            },
            Case {
                what: "an earlier Allow of the same verdict changes nothing",
                egress: json!([{"type": "Allow", "to": {"cidrSelector": "7.0.0.0/8"}}, allow("google.com")]),
                answers: &["7.7.7.7"],
                grants: 1,
                excluded: &[],
            },
            Case {
                what: "the seed's trailing Deny 0.0.0.0/0 comes after: nothing is outranked",
                egress: json!([allow("google.com"), {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}]),
                answers: &["7.7.7.7"],
                grants: 1,
                excluded: &[],
            },
            Case {
                what: "an earlier Allow outranks a Deny flow",
                egress: json!([{"type": "Allow", "to": {"cidrSelector": "7.7.7.0/24"}},
                               {"type": "Deny", "to": {"dnsName": "google.com"}}]),
                answers: &["7.7.7.7"],
                grants: 1,
                excluded: &["7.7.7.7 any: rule 0 (Allow cidrSelector=7.7.7.0/24) decides it first: rule 1's Deny flow never applies"],
            },
            Case {
                what: "an earlier Deny on one port takes that port of a portless flow",
                egress: json!([{"type": "Deny", "to": {"cidrSelector": "7.0.0.0/8"}, "ports": [tcp(25)]}, allow("google.com")]),
                answers: &["7.7.7.7"],
                grants: 1,
                excluded: &["7.7.7.7 tcp/25: rule 0 (Deny cidrSelector=7.0.0.0/8 tcp/25) decides it first: rule 1's Allow flow never applies"],
            },
            Case {
                what: "port coverage: only the flow for the covered port is outranked",
                egress: json!([{"type": "Deny", "to": {"cidrSelector": "7.0.0.0/8"}, "ports": [tcp(443)]},
                               {"type": "Allow", "to": {"dnsName": "google.com"}, "ports": [tcp(443), tcp(80)]}]),
                answers: &["7.7.7.7"],
                grants: 2,
                excluded: &["7.7.7.7 tcp/443: rule 0 (Deny cidrSelector=7.0.0.0/8 tcp/443) decides it first: rule 1's Allow flow never applies"],
            },
            Case {
                what: "the first covering rule decides: an earlier Allow shields a later Deny",
                egress: json!([{"type": "Allow", "to": {"cidrSelector": "7.7.0.0/16"}},
                               {"type": "Deny", "to": {"cidrSelector": "7.0.0.0/8"}},
                               allow("google.com")]),
                answers: &["7.7.7.7", "7.8.8.8"],
                grants: 2,
                excluded: &["7.8.8.8 any: rule 1 (Deny cidrSelector=7.0.0.0/8) decides it first: rule 2's Allow flow never applies"],
            },
            Case {
                what: "ports taken by an earlier rule are not reported again by a later one",
                egress: json!([{"type": "Allow", "to": {"cidrSelector": "7.0.0.0/8"}, "ports": [tcp(80)]},
                               {"type": "Deny", "to": {"cidrSelector": "7.0.0.0/8"}, "ports": [tcp(80), tcp(22)]},
                               {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}},
                               allow("google.com")]),
                answers: &["7.7.7.7"],
                grants: 1,
                excluded: &[
                    "7.7.7.7 tcp/22: rule 1 (Deny cidrSelector=7.0.0.0/8 tcp/80 tcp/22) decides it first: rule 3's Allow flow never applies",
                    "7.7.7.7 any: rule 2 (Deny cidrSelector=0.0.0.0/0) decides it first: rule 3's Allow flow never applies",
                ],
            },
            Case {
                what: "families do not mix",
                egress: json!([{"type": "Deny", "to": {"cidrSelector": "::/0"}}, allow("google.com")]),
                answers: &["7.7.7.7", "2a00::1"],
                grants: 2,
                excluded: &["2a00::1 any: rule 0 (Deny cidrSelector=::/0) decides it first: rule 1's Allow flow never applies"],
            },
        ];
        for c in cases {
            let r = rules(c.egress);
            let answers: Vec<(&str, u32)> = c.answers.iter().map(|a| (*a, 60)).collect();
            let d = decide(
                &response("10.244.1.5", "google.com", &[], &answers),
                &pod(&["10.244.1.5", "fd00:10:244:2::5"]),
                &r,
                &PolicySettings::default(),
            );
            assert_eq!(d.grants.len(), c.grants, "{}", c.what);
            assert!(d.excluded.is_empty(), "{}", c.what);
            let got: Vec<String> = exclusions(&d, &r).iter().map(ToString::to_string).collect();
            assert_eq!(got, c.excluded, "{}", c.what);
            for e in exclusions(&d, &r) {
                assert!(
                    d.grants.iter().any(|g| g.key.dst == e.ip()),
                    "{}: only granted IPs can be outranked",
                    c.what
                );
            }
        }
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9-]{0,8}"
    }

    fn dns_name() -> impl Strategy<Value = String> {
        prop::collection::vec(label(), 1..4).prop_map(|l| l.join("."))
    }

    fn any_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u8; 16]>().prop_map(IpAddr::from),
            // Concentrate some answers in a typical cluster range so subnet exclusions are exercised.
            (0u8..4, any::<u8>()).prop_map(|(c, d)| IpAddr::from([10, 96, c, d])),
        ]
    }

    proptest! {
        #[test]
        fn a_prefix_never_matches_at_a_non_label_boundary(base in dns_name(), prefix in "[a-z0-9-]{1,8}", strict in any::<bool>()) {
            let rules = rules(json!([{"type": "Allow", "to": {"dnsName": base.clone()}}]));
            let settings = PolicySettings { strict_names: strict, ..PolicySettings::default() };
            let evil = format!("{prefix}{base}");
            let d = decide(&response("10.244.1.5", &evil, &[], &[("1.2.3.4", 30)]), &pod(&["10.244.1.5"]), &rules, &settings);
            prop_assert!(d.grants.is_empty(), "{} matched {}", evil, base);
        }

        #[test]
        fn wildcards_match_exactly_one_label(base in dns_name(), first in label(), second in label()) {
            let pattern = crate::rules::DnsPattern::parse(&format!("*.{base}")).expect("valid");
            let one = name(&format!("{first}.{base}"));
            let two = name(&format!("{second}.{first}.{base}"));
            for mode in [NameMatching::Subdomains, NameMatching::Strict] {
                prop_assert!(pattern.matches(&one, mode));
                prop_assert!(!pattern.matches(&two, mode));
                prop_assert!(!pattern.matches(&name(&base), mode));
            }
        }

        #[test]
        fn grants_respect_subnets_families_and_priorities(
            answers in prop::collection::vec((any_ip(), 0u32..100_000), 0..12),
            subnets in prop::collection::vec(prop_oneof![
                Just("10.96.0.0/14"), Just("10.0.0.0/8"), Just("fd00::/8"), Just("0.0.0.0/1"), Just("8000::/1")
            ], 0..3),
            dual in any::<bool>(),
            ports in any::<bool>(),
        ) {
            let mut egress = vec![json!({"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}})];
            egress.push(if ports {
                json!({"type": "Allow", "to": {"dnsName": "example.com"}, "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "UDP", "port": 443}]})
            } else {
                json!({"type": "Allow", "to": {"dnsName": "*.example.com"}})
            });
            let rules = rules(json!(egress));
            let settings = PolicySettings {
                cluster_subnets: subnets.iter().map(|s| s.parse().expect("net")).collect(),
                ..PolicySettings::default()
            };
            let p = if dual { pod(&["10.244.1.5", "fd00:10:244:1::5"]) } else { pod(&["10.244.1.5"]) };
            let mut resp = response("10.244.1.5", "www.example.com", &[], &[]);
            resp.answers = answers.iter().map(|(ip, ttl)| Answer { ip: *ip, ttl: *ttl }).collect();
            let d = decide(&resp, &p, &rules, &settings);
            for g in &d.grants {
                prop_assert!(!settings.cluster_subnets.iter().any(|n| n.contains(&g.key.dst)), "{:?}", g);
                prop_assert_eq!(g.key.src.is_ipv4(), g.key.dst.is_ipv4());
                prop_assert!(p.ips.contains(&g.key.src));
                prop_assert_eq!(g.key.priority, 10999);
                prop_assert_eq!(g.reason.rule_index, 1);
                let longest = resp.answers.iter().filter(|a| a.ip == g.key.dst).map(|a| a.ttl).max();
                prop_assert_eq!(longest, Some(g.ttl));
            }
            // Rule 0 denies all of IPv4 first: every IPv4 flow, and no IPv6 one, is outranked by it.
            let outranked = outranked(&d.grants, &rules);
            prop_assert_eq!(outranked.len(), d.grants.iter().filter(|g| g.key.dst.is_ipv4()).count());
            for (o, g) in outranked.iter().zip(d.grants.iter().filter(|g| g.key.dst.is_ipv4())) {
                prop_assert_eq!((o.ip, o.l4, o.by, o.rule), (g.key.dst, g.key.l4, 0, 1));
            }
            // Every answer is either granted (once per L4 entry) or excluded with a reason.
            let per_ip = if ports { 2 } else { 1 };
            for a in &resp.answers {
                let granted = d.grants.iter().filter(|g| g.key.dst == a.ip).count();
                let excluded = d.excluded.iter().any(|(ip, _)| *ip == a.ip);
                prop_assert!(granted == per_ip && !excluded || granted == 0 && excluded, "{:?}: {} {}", a, granted, excluded);
            }
        }
    }
}

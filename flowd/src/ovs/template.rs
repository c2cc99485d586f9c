//! What a flow for EgressFirewall rule *i* must look like on the OVN that runs this node, learned from
//! OVN's own flows in `br-int` and never guessed.
//!
//! OVN changed its ACL pipeline in 23.06. Before, an ACL flow either continued (`resubmit(,T+1)`, with a
//! commit bit for new connections) or dropped. Since, ACLs have **tiers** (OVN-K: AdminNetworkPolicy 1,
//! EgressFirewall and NetworkPolicy 2, BaselineAdminNetworkPolicy 3): the ACL table is evaluated once
//! per tier with the tier in `reg8[30..31]`, and a flow only sets a verdict bit in `reg8` (allow 16,
//! drop 17, reject 18) that a later table acts on. A flow without the tier match would be evaluated in
//! the tier-0 pass, before every tier-2 Deny, and an allow flow copied from the wrong ACL is a drop.
//!
//! So the [`Template`] is learned from flows OVN itself wrote for tier-2 ACLs in the EF table: the
//! table, the tier match of OVN's own EgressFirewall flows, and the conntrack-hint variants (`reg0`)
//! with the actions OVN gives an allow ACL for each. Anything that does not have exactly the shapes
//! known here is refused with a [`LearnError`] that says what is missing: flowd then installs nothing.

use super::flow::{parse_flow_line, Actions, FlowAction, ParsedFlow, RegMatch};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
};

/// OVN-K puts EgressFirewall rule `i` at ACL priority `10000 - i` and allows at most this many rules.
pub const MAX_EF_RULES: u16 = 8000;
/// ACL priorities 0..=32767 become OpenFlow priorities 1000..=33767: below are OVN's own stage flows.
const ACL_MIN_PRIORITY: u16 = 1000;
/// NetworkPolicy ACLs sit at OpenFlow priorities up to 2000 (ACL 1000 + 1000): the EF range is above.
const NETWORK_POLICY_MAX_PRIORITY: u16 = 2000;
/// `reg8[30..31]`: the ACL tier, on OVN ≥ 23.06.
const TIER_MASK: u32 = 0xc000_0000;
/// The verdict bits of OVN ≥ 23.06, as `ovs-ofctl` prints their loads (`reg8[16..18]` is bits 48..50
/// of the 64-bit packet register 4).
const VERDICT_ALLOW: &str = "load:0x1->OXM_OF_PKT_REG4[48]";
const VERDICT_DROP: &str = "OXM_OF_PKT_REG4[49]";
const VERDICT_REJECT: &str = "OXM_OF_PKT_REG4[50]";
/// OVN's ACL hints on a switch with conntrack: a new connection may be allowed (and is then committed)...
pub const HINT_ALLOW_NEW: RegMatch = RegMatch::masked(0x80, 0x80);
/// ...and a packet of an established (or untracked) connection may be allowed without a commit.
pub const HINT_ALLOW: RegMatch = RegMatch::masked(0x100, 0x100);
/// Router ports of one switch beyond this are not a Kubernetes node switch; such a switch gets none.
const MAX_UPLINKS: usize = 1;

/// How OVN expresses an ACL verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pipeline {
    /// OVN < 23.06: an allow continues to the next table, a drop drops.
    Continue,
    /// OVN ≥ 23.06: ACL tiers and verdict bits in `reg8`.
    VerdictRegister,
}

impl fmt::Display for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pipeline::Continue => "continue (OVN < 23.06)",
            Pipeline::VerdictRegister => "tiers and verdict register (OVN >= 23.06)",
        })
    }
}

/// One flow of an allow grant: the conntrack hint it answers and OVN's actions for it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub hint: Option<RegMatch>,
    pub actions: Actions,
}

/// What flowd's flows must look like on this bridge; see the module doc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pub table: u8,
    pub pipeline: Pipeline,
    /// The tier match of OVN's own EgressFirewall flows (`reg8=0x80000000/0xc0000000` for tier 2).
    pub tier: Option<RegMatch>,
    /// One flow per variant for every allow grant: OVN's allow ACL flows, hint by hint.
    pub allow: Vec<Variant>,
    /// Per logical switch (`metadata`): the port toward the cluster router (`reg15`).
    pub uplinks: BTreeMap<u64, u32>,
    /// Where OVN hands a packet to a local port (OFTABLE_LOG_TO_PHY: `reg15=K,metadata=M
    /// actions=output:N`), the last table before a pod; `None` when OVN's flows do not tell one.
    pub delivery_table: Option<u8>,
}

/// Why no template could be learned: what the bridge lacks, for the log line and `/readyz`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LearnError {
    #[error("no EgressFirewall ACL flows in the bridge (OVN has no EgressFirewall rule for a pod of this node yet)")]
    NoAclTable,
    #[error("the EgressFirewall ACL table {0} is not {1}")]
    WrongTable(u8, u8),
    #[error("OVN's EgressFirewall flows in table {table} disagree on the ACL tier ({found})")]
    MixedTiers { table: u8, found: String },
    #[error(
        "OVN's EgressFirewall flows in table {table} match reg8 as {found}, not as an ACL tier"
    )]
    UnknownTier { table: u8, found: String },
    #[error("no allow ACL flow of OVN's in table {table} at the EgressFirewall's tier ({tier}) to learn from: flowd needs one (an EgressFirewall allow rule OVN-K resolved, or a NetworkPolicy allow)")]
    NoAllowFlow { table: u8, tier: String },
    #[error("OVN's allow ACL flows in table {table} answer the conntrack hints {found}, not one of the shapes flowd knows")]
    UnknownHints { table: u8, found: String },
}

impl Template {
    /// The flows of one grant: (hint, action) per flow. A Deny is one plain drop, whatever the hint:
    /// OVN's own drop ACL covers every hint a packet toward the pod's destination can carry.
    pub fn variants(&self, allow: bool) -> Vec<(Option<RegMatch>, FlowAction)> {
        if allow {
            self.allow
                .iter()
                .map(|v| (v.hint, FlowAction::Continue(v.actions.clone())))
                .collect()
        } else {
            vec![(None, FlowAction::Drop)]
        }
    }

    /// The port toward the cluster router on the logical switch `metadata`.
    pub fn uplink(&self, metadata: u64) -> Option<u32> {
        self.uplinks.get(&metadata).copied()
    }

    /// OVN 23.03.1's template (EF table 46, a switch with conntrack), for `flowd replay --dry-run-ofctl`
    /// where there is no bridge to learn from; `table` moves it.
    pub fn stand_in(table: u8, metadata: u64, uplink: u32) -> Self {
        let next = table.saturating_add(1);
        let actions = |s: String| Actions::new(&s).unwrap_or_else(|_| Actions::resubmit(next));
        Self {
            table,
            pipeline: Pipeline::Continue,
            tier: None,
            allow: vec![
                Variant {
                    hint: Some(HINT_ALLOW_NEW),
                    actions: actions(format!("load:0x1->NXM_NX_XXREG0[97],resubmit(,{next})")),
                },
                Variant {
                    hint: Some(HINT_ALLOW),
                    actions: Actions::resubmit(next),
                },
            ],
            uplinks: [(metadata, uplink)].into(),
            delivery_table: Some(65),
        }
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "table={} pipeline=\"{}\"", self.table, self.pipeline)?;
        if let Some(t) = self.tier {
            write!(f, " tier=reg8={t}")?;
        }
        for v in &self.allow {
            match v.hint {
                Some(h) => write!(f, " allow[reg0={h}]={}", v.actions)?,
                None => write!(f, " allow={}", v.actions)?,
            }
        }
        write!(f, " uplinks={}", self.uplinks.len())
    }
}

fn show(tiers: &BTreeSet<Option<RegMatch>>) -> String {
    let parts: Vec<String> = tiers
        .iter()
        .map(|t| t.map_or_else(|| "none".to_owned(), |t| format!("reg8={t}")))
        .collect();
    parts.join(", ")
}

/// The EF table: the last table holding ACL flows at EF priorities (`priority_base - 7999 ..=
/// priority_base`, above NetworkPolicy) that match a logical *inport* (`reg14`) and datapath
/// (`metadata`), not an outport (`reg15`) as NetworkPolicy's to-lport ACLs do. OVN-K's EF is a
/// to-lport ACL on `inport`, so it sits in the egress pipeline, after every ingress table (where
/// from-lport ACLs on `inport`, egress NetworkPolicy and AdminNetworkPolicy, live).
fn ef_flows(flows: &[ParsedFlow], priority_base: u16) -> Option<(u8, Vec<&ParsedFlow>)> {
    let low = priority_base
        .saturating_sub(MAX_EF_RULES - 1)
        .max(NETWORK_POLICY_MAX_PRIORITY + 1);
    let is_ef = |f: &&ParsedFlow| {
        f.priority
            .is_some_and(|p| (low..=priority_base).contains(&p))
            && f.fields
                .as_ref()
                .is_some_and(|x| x.reg14.is_some() && x.metadata.is_some() && x.reg15.is_none())
    };
    let table = flows.iter().filter(is_ef).map(|f| f.table).max()?;
    Some((
        table,
        flows
            .iter()
            .filter(is_ef)
            .filter(|f| f.table == table)
            .collect(),
    ))
}

/// How a flow of the EF table ends, on this pipeline.
fn is_allow(pipeline: Pipeline, actions: &str, next: &str) -> bool {
    let continues = actions.ends_with(next);
    match pipeline {
        Pipeline::Continue => continues && !actions.contains("ct("),
        Pipeline::VerdictRegister => {
            continues
                && actions.contains(VERDICT_ALLOW)
                && !actions.contains(VERDICT_DROP)
                && !actions.contains(VERDICT_REJECT)
        }
    }
}

/// Learns the template from a full `ovs-ofctl dump-flows --no-names` of the bridge; `table`, when
/// given (`--acl-table`), is where the EF table must be. See the module doc.
pub fn learn(dump: &str, priority_base: u16, table: Option<u8>) -> Result<Template, LearnError> {
    let flows: Vec<ParsedFlow> = dump.lines().filter_map(parse_flow_line).collect();
    let (found, ef) = ef_flows(&flows, priority_base).ok_or(LearnError::NoAclTable)?;
    if let Some(t) = table.filter(|t| *t != found) {
        return Err(LearnError::WrongTable(found, t));
    }
    let table = found;
    let next = format!(
        "resubmit(,{})",
        table.checked_add(1).ok_or(LearnError::NoAclTable)?
    );
    let in_table = || flows.iter().filter(|f| f.table == table);
    let pipeline = if in_table().any(|f| {
        f.actions
            .as_deref()
            .is_some_and(|a| a.contains(VERDICT_ALLOW))
    }) {
        Pipeline::VerdictRegister
    } else {
        Pipeline::Continue
    };

    // The tier of OVN's own EgressFirewall flows: ours go in exactly that pass.
    let tiers: BTreeSet<Option<RegMatch>> = ef
        .iter()
        .map(|f| f.fields.as_ref().and_then(|x| x.reg8))
        .collect();
    let tier = match (tiers.len(), tiers.first()) {
        (1, Some(t)) => *t,
        _ => {
            return Err(LearnError::MixedTiers {
                table,
                found: show(&tiers),
            })
        }
    };
    let tier_ok = match (pipeline, tier) {
        (Pipeline::VerdictRegister, Some(t)) => t.mask == TIER_MASK,
        // A single tier in use: OVN leaves the tier match out.
        (Pipeline::VerdictRegister, None) => true,
        (Pipeline::Continue, t) => t.is_none(),
    };
    if !tier_ok {
        return Err(LearnError::UnknownTier {
            table,
            found: show(&tiers),
        });
    }

    // OVN's allow ACL flows at that tier (EgressFirewall allows on `inport`, NetworkPolicy allows on
    // `outport`): their actions, counted per hint.
    let mut by_hint: HashMap<Option<RegMatch>, HashMap<&str, usize>> = HashMap::new();
    for f in in_table() {
        let (Some(priority), Some(x), Some(actions)) =
            (f.priority, f.fields.as_ref(), f.actions.as_deref())
        else {
            continue;
        };
        let port_bound = x.reg14.is_some() || x.reg15.is_some();
        if !(ACL_MIN_PRIORITY..=priority_base).contains(&priority)
            || !port_bound
            || x.metadata.is_none()
            || x.reg8 != tier
            || !is_allow(pipeline, actions, &next)
            || Actions::new(actions).is_err()
        {
            continue;
        }
        *by_hint
            .entry(x.reg0)
            .or_default()
            .entry(actions)
            .or_default() += 1;
    }
    if by_hint.is_empty() {
        return Err(LearnError::NoAllowFlow {
            table,
            tier: show(&[tier].into()),
        });
    }
    // The most common actions per hint (logging or labels make some ACLs differ), shortest on a tie.
    let pick = |hint: Option<RegMatch>| -> Option<Variant> {
        let (actions, _) = by_hint.get(&hint)?.iter().max_by(|a, b| {
            a.1.cmp(b.1)
                .then_with(|| b.0.len().cmp(&a.0.len()))
                .then_with(|| b.0.cmp(a.0))
        })?;
        Some(Variant {
            hint,
            actions: Actions::new(actions).ok()?,
        })
    };
    let allow = match (
        pick(Some(HINT_ALLOW_NEW)),
        pick(Some(HINT_ALLOW)),
        pick(None),
    ) {
        // A switch with conntrack: every stateful allow ACL has both.
        (Some(new), Some(est), _) => vec![new, est],
        // A switch without: plain allow ACLs.
        (None, None, Some(plain)) if by_hint.len() == 1 => vec![plain],
        _ => {
            let mut found: Vec<String> = by_hint
                .keys()
                .map(|h| h.map_or_else(|| "none".to_owned(), |h| format!("reg0={h}")))
                .collect();
            found.sort();
            return Err(LearnError::UnknownHints {
                table,
                found: found.join(", "),
            });
        }
    };
    Ok(Template {
        table,
        pipeline,
        tier,
        allow,
        uplinks: parse_uplinks(&flows),
        delivery_table: delivery_table(&flows),
    })
}

/// `(switch, port)` of a flow that matches exactly one logical output port and nothing else
/// (`reg15=K,metadata=M`): OVN's per-port flows of its delivery table.
fn port_flow(f: &ParsedFlow) -> Option<(u64, u32)> {
    let x = f.fields.as_ref()?;
    let plain = !x.foreign
        && x.reg14.is_none()
        && x.reg0.is_none()
        && x.reg8.is_none()
        && x.src.is_none()
        && x.dst.is_none();
    plain.then_some((x.metadata?, x.reg15?.exact_value()?))
}

/// Whether `actions` is exactly `output:N`: delivery to a local port.
fn outputs(actions: Option<&str>) -> bool {
    actions.is_some_and(|a| {
        a.strip_prefix("output:")
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// The one table of OVN's per-port output flows (`reg15=K,metadata=M actions=output:N`, nothing
/// else matched); `None` when there is none, or more than one.
fn delivery_table(flows: &[ParsedFlow]) -> Option<u8> {
    let tables: BTreeSet<u8> = flows
        .iter()
        .filter(|f| outputs(f.actions.as_deref()) && port_flow(f).is_some())
        .map(|f| f.table)
        .collect();
    match (tables.len(), tables.first()) {
        (1, Some(t)) => Some(*t),
        _ => None,
    }
}

/// Per logical switch, its port toward a router: OVN's output flow for a logical patch port,
/// `reg15=K,metadata=M actions=clone(ct_clear,...,load:X->OXM_OF_METADATA[],...,resubmit(,8))`, which
/// carries the packet into another datapath (the router) on this chassis. A switch with more than
/// [`MAX_UPLINKS`] such ports is left out: flowd cannot tell which one the EgressFirewall governs.
fn parse_uplinks(flows: &[ParsedFlow]) -> BTreeMap<u64, u32> {
    let mut ports: BTreeMap<u64, BTreeSet<u32>> = BTreeMap::new();
    for f in flows {
        let (Some(x), Some(actions)) = (f.fields.as_ref(), f.actions.as_deref()) else {
            continue;
        };
        let (Some(metadata), Some(reg15)) = (x.metadata, x.reg15.and_then(|r| r.exact_value()))
        else {
            continue;
        };
        if x.foreign || x.reg14.is_some() || x.reg0.is_some() || x.reg8.is_some() {
            continue;
        }
        let Some(inner) = actions
            .strip_prefix("clone(ct_clear,")
            .and_then(|a| a.strip_suffix(')'))
        else {
            continue;
        };
        let enters_other_datapath = inner.split(',').any(|a| {
            a.strip_prefix("load:")
                .and_then(|l| l.strip_suffix("->OXM_OF_METADATA[]"))
                .and_then(|v| v.strip_prefix("0x"))
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .is_some_and(|peer| peer != metadata)
        });
        if enters_other_datapath && inner.contains("resubmit(,") {
            ports.entry(metadata).or_default().insert(reg15);
        }
    }
    ports
        .into_iter()
        .filter_map(|(m, p)| {
            (p.len() <= MAX_UPLINKS)
                .then(|| p.first().map(|k| (m, *k)))
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines from a real OVN 23.03.1 `br-int`: a node switch (metadata 1) with a load balancer, its
    /// router port (reg15 1), two pods (reg14 2, 3), rule 0 `dnsName` Allow on an address set OVN-K
    /// filled, rule 1 a cidr Deny, and a NetworkPolicy allow on outport.
    const DUMP_23_03: &str = "NXST_FLOW reply (xid=0x8):
 cookie=0x5343bea0, duration=1.015s, table=0, n_packets=0, n_bytes=0, idle_age=1, priority=100,in_port=2 actions=load:0x8->NXM_NX_REG13[],load:0x6->NXM_NX_REG11[],load:0x3->NXM_NX_REG12[],load:0x1->OXM_OF_METADATA[],load:0x2->NXM_NX_REG14[],resubmit(,8)
 cookie=0x333, duration=1.0s, table=19, n_packets=0, n_bytes=0, idle_age=1, priority=10500,ip,reg0=0x80/0x80,reg14=0x1,metadata=0x1,nw_dst=5.5.5.5 actions=load:0x1->NXM_NX_XXREG0[97],resubmit(,20)
 cookie=0x222, duration=1.0s, table=46, n_packets=0, n_bytes=0, idle_age=1, priority=2001,ip,reg0=0x80/0x80,reg15=0x3,metadata=0x1,nw_src=10.244.0.0/16 actions=load:0x1->NXM_NX_XXREG0[97],resubmit(,47)
 cookie=0x223, duration=1.0s, table=46, n_packets=0, n_bytes=0, idle_age=1, priority=2001,ip,reg0=0x100/0x100,reg15=0x3,metadata=0x1,nw_src=10.244.0.0/16 actions=resubmit(,47)
 cookie=0x79ee24c9, duration=3.298s, table=46, n_packets=0, n_bytes=0, idle_age=3, priority=65532,icmp6,metadata=0x1,ipv6_src=fe80::/10,icmp_type=132 actions=resubmit(,47)
 cookie=0x2795c6fc, duration=0.064s, table=46, n_packets=0, n_bytes=0, idle_age=0, priority=11000,ip,reg0=0x100/0x100,reg14=0x2,metadata=0x1,nw_dst=9.9.9.9 actions=resubmit(,47)
 cookie=0x1057dd9, duration=0.064s, table=46, n_packets=0, n_bytes=0, idle_age=0, priority=11000,ip,reg0=0x80/0x80,reg14=0x2,metadata=0x1,nw_dst=9.9.9.9 actions=load:0x1->NXM_NX_XXREG0[97],resubmit(,47)
 cookie=0xb292f1e9, duration=0.039s, table=46, n_packets=0, n_bytes=0, idle_age=0, priority=10999,ip,reg0=0x400/0x400,reg14=0x2,metadata=0x1 actions=ct(commit,zone=NXM_NX_REG13[0..15],nat(src),exec(load:0x1->NXM_NX_CT_MARK[0]))
 cookie=0x1a86b5b7, duration=0.039s, table=46, n_packets=0, n_bytes=0, idle_age=0, priority=10999,ip,reg0=0x200/0x200,reg14=0x2,metadata=0x1 actions=drop
 cookie=0x74b977e6, duration=10.924s, table=65, n_packets=0, n_bytes=0, idle_age=10, priority=100,reg15=0x1,metadata=0x1 actions=clone(ct_clear,load:0->NXM_NX_REG11[],load:0->NXM_NX_REG12[],load:0->NXM_NX_REG13[],load:0x2->NXM_NX_REG11[],load:0x4->NXM_NX_REG12[],load:0x2->OXM_OF_METADATA[],load:0x1->NXM_NX_REG14[],load:0->NXM_NX_REG10[],load:0->NXM_NX_REG15[],load:0->NXM_NX_REG0[],load:0->NXM_NX_REG9[],resubmit(,8))
 cookie=0x2e17b407, duration=10.924s, table=65, n_packets=0, n_bytes=0, idle_age=10, priority=100,reg15=0x1,metadata=0x2 actions=clone(ct_clear,load:0->NXM_NX_REG11[],load:0x1->OXM_OF_METADATA[],load:0x1->NXM_NX_REG14[],resubmit(,8))
 cookie=0xa37fce89, duration=10.885s, table=65, n_packets=0, n_bytes=0, idle_age=10, priority=100,reg15=0x2,metadata=0x1 actions=output:2
";

    /// The same node on OVN 25.03.0 with the EF and NetworkPolicy ACLs in tier 2, an AdminNetworkPolicy
    /// deny in tier 1 on the same port, and the verdict register.
    const DUMP_25_03: &str = "NXST_FLOW reply (xid=0x4):
 cookie=0xd3d1f832, duration=30.432s, table=0, n_packets=0, n_bytes=0, idle_age=30, priority=100,in_port=2 actions=load:0x8->NXM_NX_REG13[0..15],load:0x2->NXM_NX_REG11[],load:0x7->NXM_NX_REG12[],load:0x1->OXM_OF_METADATA[],load:0x2->NXM_NX_REG14[],load:0->NXM_NX_REG13[16..31],resubmit(,8)
 cookie=0x38fed6d3, duration=30.455s, table=48, n_packets=0, n_bytes=0, idle_age=30, priority=110,ip,reg15=0x1,metadata=0x1 actions=ct_clear,resubmit(,49)
 cookie=0xa02b8829, duration=0.024s, table=51, n_packets=0, n_bytes=0, idle_age=0, priority=11000,ip,reg0=0x100/0x100,reg8=0x80000000/0xc0000000,reg14=0x2,metadata=0x1,nw_dst=9.9.9.9 actions=load:0x1->OXM_OF_PKT_REG4[48],resubmit(,52)
 cookie=0xbd7aa1a6, duration=0.024s, table=51, n_packets=0, n_bytes=0, idle_age=0, priority=11000,ip,reg0=0x80/0x80,reg8=0x80000000/0xc0000000,reg14=0x2,metadata=0x1,nw_dst=9.9.9.9 actions=load:0x1->OXM_OF_PKT_REG4[48],load:0x1->NXM_NX_XXREG0[97],resubmit(,52)
 cookie=0x9d584e5b, duration=0.036s, table=51, n_packets=0, n_bytes=0, idle_age=0, priority=10999,ip,reg0=0x400/0x400,reg8=0x80000000/0xc0000000,reg14=0x2,metadata=0x1 actions=load:0x1->OXM_OF_PKT_REG4[49],ct(commit,zone=NXM_NX_REG13[0..15],nat(src),exec(load:0x1->NXM_NX_CT_MARK[0],load:0->NXM_NX_CT_LABEL[96..127])),resubmit(,52)
 cookie=0x15ca30c5, duration=0.036s, table=51, n_packets=0, n_bytes=0, idle_age=0, priority=10999,ip,reg0=0x200/0x200,reg8=0x80000000/0xc0000000,reg14=0x2,metadata=0x1 actions=load:0x1->OXM_OF_PKT_REG4[49],resubmit(,52)
 cookie=0x15ca30c6, duration=0.036s, table=51, n_packets=0, n_bytes=0, idle_age=0, priority=2000,ip,reg0=0x200/0x200,reg8=0x40000000/0xc0000000,reg14=0x2,metadata=0x1,nw_dst=198.51.100.0/24 actions=load:0x1->OXM_OF_PKT_REG4[49],resubmit(,52)
 cookie=0x17fa70cd, duration=3.146s, table=51, n_packets=0, n_bytes=0, idle_age=3, priority=65532,icmp6,metadata=0x1,nw_ttl=255,icmp_type=136,icmp_code=0 actions=load:0x1->OXM_OF_PKT_REG4[48],resubmit(,52)
 cookie=0x7dcfbf4b, duration=3.130s, table=51, n_packets=0, n_bytes=0, idle_age=3, priority=65532,ct_state=-new+est-rel+rpl-inv+trk,ct_mark=0/0x1,metadata=0x1 actions=load:0x1->OXM_OF_PKT_REG4[48],resubmit(,52)
 cookie=0xe4da24a, duration=3.130s, table=51, n_packets=0, n_bytes=0, idle_age=3, priority=1,ct_state=-est+trk,ip,metadata=0x1 actions=load:0x1->NXM_NX_XXREG0[97],resubmit(,52)
 cookie=0x2c1, duration=1.0s, table=51, n_packets=0, n_bytes=0, idle_age=1, priority=2001,ip,reg0=0x80/0x80,reg8=0x80000000/0xc0000000,reg15=0x3,metadata=0x1,nw_src=10.244.0.0/16 actions=load:0x1->OXM_OF_PKT_REG4[48],load:0x1->NXM_NX_XXREG0[97],resubmit(,52)
 cookie=0x2c2, duration=1.0s, table=51, n_packets=0, n_bytes=0, idle_age=1, priority=2001,ip,reg0=0x100/0x100,reg8=0x80000000/0xc0000000,reg15=0x3,metadata=0x1,nw_src=10.244.0.0/16 actions=load:0x1->OXM_OF_PKT_REG4[48],resubmit(,52)
 cookie=0x136a704d, duration=0.071s, table=53, n_packets=0, n_bytes=0, idle_age=0, priority=1000,reg8=0x10000/0x10000,metadata=0x1 actions=load:0->OXM_OF_PKT_REG4[48],load:0->OXM_OF_PKT_REG4[49],load:0->OXM_OF_PKT_REG4[50],load:0->OXM_OF_PKT_REG4[62..63],resubmit(,54)
 cookie=0xaddef89, duration=30.470s, table=65, n_packets=0, n_bytes=0, idle_age=30, priority=100,reg15=0x1,metadata=0x1 actions=clone(ct_clear,load:0->NXM_NX_REG11[],load:0->NXM_NX_REG12[],load:0->NXM_NX_REG13[0..15],load:0x3->NXM_NX_REG11[],load:0x4->NXM_NX_REG12[],load:0x2->OXM_OF_METADATA[],load:0x1->NXM_NX_REG14[],load:0->NXM_NX_REG10[],resubmit(,8))
 cookie=0xa37fce89, duration=10.885s, table=65, n_packets=0, n_bytes=0, idle_age=10, priority=100,reg15=0x2,metadata=0x1 actions=output:2
";

    fn without(dump: &str, needle: &str) -> String {
        dump.lines()
            .filter(|l| !l.contains(needle))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    #[test]
    fn learns_ovn_23_03_continue_pipeline() {
        let t = learn(DUMP_23_03, 11000, None).unwrap();
        assert_eq!(
            (t.table, t.pipeline, t.tier),
            (46, Pipeline::Continue, None)
        );
        assert_eq!(
            t.allow,
            vec![
                Variant {
                    hint: Some(HINT_ALLOW_NEW),
                    actions: Actions::new("load:0x1->NXM_NX_XXREG0[97],resubmit(,47)").unwrap()
                },
                Variant {
                    hint: Some(HINT_ALLOW),
                    actions: Actions::resubmit(47)
                },
            ]
        );
        // The router datapath's own patch port back (metadata 2) is a router's, not a node switch's,
        // but it is harmless: no pod has metadata 2.
        assert_eq!(t.uplink(1), Some(1));
        assert_eq!(
            t,
            Template::stand_in(46, 1, 1).with_uplinks(t.uplinks.clone())
        );
    }

    impl Template {
        fn with_uplinks(mut self, uplinks: BTreeMap<u64, u32>) -> Self {
            self.uplinks = uplinks;
            self
        }
    }

    #[test]
    fn learns_ovn_25_03_tier_and_verdict_register() {
        let t = learn(DUMP_25_03, 11000, None).unwrap();
        assert_eq!(t.table, 51);
        assert_eq!(t.pipeline, Pipeline::VerdictRegister);
        assert_eq!(t.tier, Some(RegMatch::masked(0x8000_0000, TIER_MASK)));
        let actions: Vec<&str> = t.allow.iter().map(|v| v.actions.as_str()).collect();
        assert_eq!(
            actions,
            [
                "load:0x1->OXM_OF_PKT_REG4[48],load:0x1->NXM_NX_XXREG0[97],resubmit(,52)",
                "load:0x1->OXM_OF_PKT_REG4[48],resubmit(,52)"
            ]
        );
        assert_eq!(t.uplink(1), Some(1));
        assert!(
            !actions.iter().any(|a| a.contains("[49]")),
            "never a drop verdict as allow"
        );
    }

    #[test]
    fn network_policy_allows_alone_teach_the_same_template() {
        // OVN-K could not resolve the dnsName (a wildcard): only the Deny and NetworkPolicy remain.
        let t = learn(&without(DUMP_25_03, "nw_dst=9.9.9.9"), 11000, None).unwrap();
        assert_eq!(t, learn(DUMP_25_03, 11000, None).unwrap());
    }

    #[test]
    fn refuses_when_nothing_can_be_learned() {
        let drops_only = without(&without(DUMP_25_03, "nw_dst=9.9.9.9"), "reg15=0x3");
        assert!(matches!(
            learn(&drops_only, 11000, None),
            Err(LearnError::NoAllowFlow { table: 51, .. })
        ));
        let drops_only = without(&without(DUMP_23_03, "nw_dst=9.9.9.9"), "reg15=0x3");
        assert!(matches!(
            learn(&drops_only, 11000, None),
            Err(LearnError::NoAllowFlow { table: 46, .. })
        ));
        assert_eq!(
            learn(&without(DUMP_25_03, "priority=1"), 11000, None),
            Err(LearnError::NoAclTable)
        );
        assert_eq!(
            learn("garbage\n\0\n", 11000, None),
            Err(LearnError::NoAclTable)
        );
        assert_eq!(
            learn(DUMP_25_03, 11000, Some(49)),
            Err(LearnError::WrongTable(51, 49))
        );
        let one_hint = without(DUMP_25_03, "reg0=0x100/0x100");
        assert!(matches!(
            learn(&one_hint, 11000, None),
            Err(LearnError::UnknownHints { .. })
        ));
        let mixed = DUMP_25_03.replace(
            "priority=10999,ip,reg0=0x200/0x200,reg8=0x80000000",
            "priority=10999,ip,reg0=0x200/0x200,reg8=0x40000000",
        );
        assert!(matches!(
            learn(&mixed, 11000, None),
            Err(LearnError::MixedTiers { .. })
        ));
    }

    #[test]
    fn the_tier_1_deny_is_not_an_ef_flow_and_a_switch_with_two_routers_gets_no_uplink() {
        // The ANP-like deny at priority 2000 (tier 1) is below the EF band: it neither moves the table
        // nor the tier.
        let t = learn(DUMP_25_03, 11000, None).unwrap();
        assert_eq!(t.tier, Some(RegMatch::masked(0x8000_0000, TIER_MASK)));
        let two = format!(
            "{DUMP_25_03} cookie=0xaddef8a, duration=30.470s, table=65, n_packets=0, n_bytes=0, idle_age=30, priority=100,reg15=0x4,metadata=0x1 actions=clone(ct_clear,load:0x5->OXM_OF_METADATA[],load:0x1->NXM_NX_REG14[],resubmit(,8))\n"
        );
        assert_eq!(learn(&two, 11000, None).unwrap().uplink(1), None);
    }

    use proptest::prelude::*;

    proptest! {
        /// Tool output is hostile until parsed: fragments of real lines in any order, and arbitrary
        /// text, never make learning panic, and a learned template only ever holds allow actions.
        #[test]
        fn learning_survives_any_output(
            parts in proptest::collection::vec(prop_oneof![
                proptest::sample::select(vec![
                    " cookie=0x646e736600012af8", ", table=51", ", table=46", ", duration=1s",
                    " priority=11000", " priority=2001", ",reg14=0x1", ",metadata=0x1", ",reg15=0x2",
                    ",reg0=0x80/0x80", ",reg0=0x100/0x100", ",reg8=0x80000000/0xc0000000", ",ip",
                    ",nw_src=1.2.3.4", " actions=", "drop", "resubmit(,52)", "resubmit(,47)",
                    "load:0x1->OXM_OF_PKT_REG4[48],", "load:0x1->OXM_OF_PKT_REG4[49],",
                    "clone(ct_clear,load:0x2->OXM_OF_METADATA[],resubmit(,8))",
                    "\n", "(", ")", "=", ",", " ",
                ]).prop_map(str::to_owned),
                "\\PC{0,12}",
            ], 0..60),
        ) {
            let text: String = parts.concat();
            if let Ok(t) = learn(&text, 11000, None) {
                for v in &t.allow {
                    prop_assert!(Actions::new(v.actions.as_str()).is_ok());
                    prop_assert!(!v.actions.as_str().contains(VERDICT_DROP));
                }
            }
        }
    }
}

//! OpenFlow flows as flowd writes and reads them: the typed flow, its cookie, the exact `ovs-ofctl`
//! bundle text (a pure function of typed values), and the parser for the lines `ovs-ofctl dump-flows`
//! and `ovs-ofctl monitor` print back.
//!
//! Only integers, IP addresses and the validated [`Actions`] are ever formatted into a line: no string
//! that came from DNS can reach `ovs-ofctl`.

use crate::model::{PortMatch, Protocol};
use std::{fmt, fmt::Write as _, net::IpAddr};

/// Longest actions string accepted from OVS or an operator; OVN's ACL actions are well under 200 bytes.
pub const MAX_ACTIONS_LEN: usize = 512;
/// Longest line we parse from `ovs-ofctl`; longer lines are not ours (our flows print in ~300 bytes).
pub const MAX_LINE_LEN: usize = 4096;

/// The 64-bit cookie of a dnsflow flow: `prefix` (high 32 bits) marks every dnsflow flow and never
/// collides with OVN's 32-bit cookies; then the pod's id (16 bits) and the flow's priority (16 bits),
/// so all flows of one pod go with one masked delete and a monitor event (which omits the priority)
/// still identifies its flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cookie(pub u64);

/// Mask selecting the prefix of a cookie.
pub const PREFIX_MASK: u64 = 0xffff_ffff_0000_0000;
/// Mask selecting prefix and pod id: every flow of one pod.
pub const POD_MASK: u64 = 0xffff_ffff_ffff_0000;

impl Cookie {
    pub fn new(prefix: u32, pod_id: u16, priority: u16) -> Self {
        Self((u64::from(prefix) << 32) | (u64::from(pod_id) << 16) | u64::from(priority))
    }

    /// The cookie of a pod's flows, to be used with [`POD_MASK`].
    pub fn pod(prefix: u32, pod_id: u16) -> Self {
        Self::new(prefix, pod_id, 0)
    }

    pub fn prefix(self) -> u32 {
        (self.0 >> 32) as u32
    }

    pub fn pod_id(self) -> u16 {
        (self.0 >> 16) as u16
    }

    pub fn priority(self) -> u16 {
        self.0 as u16
    }
}

impl fmt::Display for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// OpenFlow actions copied from OVN's own allow flow (or given by the operator), validated so that they
/// can only be one token of an `ovs-ofctl` flow: no blanks, no line breaks, no `=`-free surprises.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Actions(String);

/// Why a string is not usable as [`Actions`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionsError {
    #[error("empty actions")]
    Empty,
    #[error("actions longer than {MAX_ACTIONS_LEN} bytes")]
    TooLong,
    #[error("actions contain {0:?}, outside the OpenFlow action alphabet")]
    BadChar(char),
    #[error("unbalanced parentheses or brackets in actions")]
    Unbalanced,
}

impl Actions {
    pub fn new(s: &str) -> Result<Self, ActionsError> {
        if s.is_empty() {
            return Err(ActionsError::Empty);
        }
        if s.len() > MAX_ACTIONS_LEN {
            return Err(ActionsError::TooLong);
        }
        let mut depth = 0i32;
        for c in s.chars() {
            match c {
                '(' | '[' => depth += 1,
                ')' | ']' => depth -= 1,
                c if c.is_ascii_alphanumeric() || "_,:->./".contains(c) => {}
                c => return Err(ActionsError::BadChar(c)),
            }
            if depth < 0 {
                return Err(ActionsError::Unbalanced);
            }
        }
        if depth != 0 {
            return Err(ActionsError::Unbalanced);
        }
        Ok(Self(s.to_owned()))
    }

    /// `resubmit(,table)`: how a flow continues to the next table when OVN offers nothing better.
    pub fn resubmit(table: u8) -> Self {
        Self(format!("resubmit(,{table})"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Actions {
    type Err = ActionsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for Actions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a flow does with a matching packet.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FlowAction {
    /// Continue OVN's pipeline with these actions (those of OVN's own allow flow).
    Continue(Actions),
    Drop,
}

/// A 32-bit register match as OVN writes it: `reg0=0x80/0x80`, or `reg15=0x1` when exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegMatch {
    pub value: u32,
    pub mask: u32,
}

impl RegMatch {
    pub const fn masked(value: u32, mask: u32) -> Self {
        Self {
            value: value & mask,
            mask,
        }
    }

    pub const fn exact(value: u32) -> Self {
        Self {
            value,
            mask: u32::MAX,
        }
    }

    /// The exact value, when the match is not masked.
    pub fn exact_value(self) -> Option<u32> {
        (self.mask == u32::MAX).then_some(self.value)
    }

    /// Parses `0x80/0x80`, `0x1` or `1` (ovs-ofctl prints exact matches without a mask).
    fn parse(s: &str) -> Option<Self> {
        let (value, mask) = match s.split_once('/') {
            Some((v, m)) => (v, Some(m)),
            None => (s, None),
        };
        let value = u32::try_from(parse_num_u64(value)?).ok()?;
        let mask = match mask {
            Some(m) => u32::try_from(parse_num_u64(m)?).ok()?,
            None => u32::MAX,
        };
        Some(Self::masked(value, mask))
    }
}

impl fmt::Display for RegMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.exact_value() {
            Some(v) => write!(f, "{v:#x}"),
            None => write!(f, "{:#x}/{:#x}", self.value, self.mask),
        }
    }
}

/// The match of one dnsflow flow: where OVN evaluates the EgressFirewall (table, tier), which of OVN's
/// conntrack hints it answers, the pod's datapath keys, the switch's router port the traffic leaves by,
/// the pod's IP, the answer IP and the rule's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowMatch {
    pub table: u8,
    pub priority: u16,
    /// OVN ≥ 23.06: the ACL tier this flow is evaluated in (`reg8[30..31]`); `None` before tiers.
    pub tier: Option<RegMatch>,
    /// OVN's ACL hint bits (`reg0`, e.g. allow-new `0x80/0x80`); `None` on a switch without conntrack.
    pub hint: Option<RegMatch>,
    /// The pod's logical switch key (`metadata`).
    pub metadata: u64,
    /// The pod's logical port key (`reg14`).
    pub reg14: u32,
    /// The logical output port (`reg15`): the switch's port toward the cluster router, so that a grant
    /// never changes the verdict for traffic that stays on the switch. `None` only in flows read back
    /// from an older flowd, which never match a current template.
    pub outport: Option<u32>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: Option<PortMatch>,
}

/// One flow to install.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowSpec {
    pub cookie: Cookie,
    pub matches: FlowMatch,
    /// Seconds without traffic before OVS removes the flow (1..=65535).
    pub idle_timeout: u16,
    /// Seconds before OVS removes the flow whatever the traffic, when capped.
    pub hard_timeout: Option<u16>,
    pub action: FlowAction,
}

/// A flow in OVN's delivery table (the last before a port) for DNS replies: packets from a DNS
/// server's port that answer a query or connection a local port opened (`ct_state=+trk+est+rpl`,
/// so nobody can make flowd hold made-up packets). It may pause them for flowd's controller first;
/// then it forgets their conntrack state (`ct_clear`) and looks the table up again
/// (`resubmit`), where no such flow matches any more (they all need `+trk`) and OVN's own flow
/// for the port delivers the packet exactly as it would have. No flow copies OVN's actions, so a
/// port that comes up is covered from its first packet, and a port renumbered is never misdelivered.
/// The hard timeout ends it if flowd stops renewing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldSpec {
    pub cookie: Cookie,
    pub table: u8,
    pub priority: u16,
    pub v6: bool,
    pub tcp: bool,
    /// Replies from this server (its address, of the flow's family, and port) only; else from
    /// any server's port 53.
    pub from: Option<std::net::SocketAddr>,
    /// Replies to this port only: its switch (`metadata`) and port (`reg15`, the output port in
    /// this table); else to any port of the node.
    pub to: Option<(u64, u32)>,
    /// Paused for the connection with this controller id first; else only sent on (counted by
    /// the flow's statistics).
    pub pause: Option<u16>,
    pub hard_timeout: u16,
}

/// The DNS port replies come from when a [`HoldSpec`] names no server.
pub use dnsflow_dnstap::packet::DNS_PORT;

/// One line of an `ovs-ofctl --bundle add-flows` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowOp {
    /// Install or replace (same table, priority and match) a flow; resets its idle timer.
    Add(FlowSpec),
    /// Install or replace a pod's hold flow; resets its hard timer.
    Hold(HoldSpec),
    /// Remove exactly this flow, only if it carries this cookie.
    DeleteStrict { cookie: Cookie, matches: FlowMatch },
    /// Remove every flow in `table` whose cookie matches `cookie` under `mask`.
    DeleteCookie {
        table: u8,
        cookie: Cookie,
        mask: u64,
    },
}

fn proto_keyword(m: &FlowMatch) -> &'static str {
    match (m.dst.is_ipv4(), m.l4.map(|p| p.protocol)) {
        (true, None) => "ip",
        (true, Some(Protocol::Tcp)) => "tcp",
        (true, Some(Protocol::Udp)) => "udp",
        (true, Some(Protocol::Sctp)) => "sctp",
        (false, None) => "ipv6",
        (false, Some(Protocol::Tcp)) => "tcp6",
        (false, Some(Protocol::Udp)) => "udp6",
        (false, Some(Protocol::Sctp)) => "sctp6",
    }
}

fn write_match(out: &mut String, m: &FlowMatch) {
    let (src_field, dst_field) = if m.dst.is_ipv4() {
        ("nw_src", "nw_dst")
    } else {
        ("ipv6_src", "ipv6_dst")
    };
    // Writing to a String cannot fail.
    out.push_str(proto_keyword(m));
    if let Some(hint) = m.hint {
        let _ = write!(out, ",reg0={hint}");
    }
    if let Some(tier) = m.tier {
        let _ = write!(out, ",reg8={tier}");
    }
    let _ = write!(out, ",metadata={:#x},reg14={:#x}", m.metadata, m.reg14);
    if let Some(outport) = m.outport {
        let _ = write!(out, ",reg15={outport:#x}");
    }
    let _ = write!(out, ",{src_field}={},{dst_field}={}", m.src, m.dst);
    if let Some(p) = m.l4 {
        let _ = write!(out, ",tp_dst={}", p.port);
    }
}

/// Appends the `ovs-ofctl` bundle line for `op` (with its newline) to `out`.
pub fn render_op(out: &mut String, op: &FlowOp) {
    match op {
        FlowOp::Add(f) => {
            let m = &f.matches;
            let _ = write!(
                out,
                "add cookie={},table={},priority={},idle_timeout={}",
                f.cookie, m.table, m.priority, f.idle_timeout
            );
            if let Some(hard) = f.hard_timeout {
                let _ = write!(out, ",hard_timeout={hard}");
            }
            out.push(',');
            write_match(out, m);
            match &f.action {
                FlowAction::Continue(a) => {
                    let _ = write!(out, ",actions={a}");
                }
                FlowAction::Drop => out.push_str(",actions=drop"),
            }
        }
        FlowOp::Hold(h) => {
            let _ = write!(
                out,
                "add cookie={},table={},priority={},hard_timeout={},{}",
                h.cookie,
                h.table,
                h.priority,
                h.hard_timeout,
                match (h.tcp, h.v6) {
                    (false, false) => "udp",
                    (false, true) => "udp6",
                    (true, false) => "tcp",
                    (true, true) => "tcp6",
                },
            );
            match h.from {
                Some(from) => {
                    let field = if from.is_ipv4() { "nw_src" } else { "ipv6_src" };
                    let _ = write!(out, ",{field}={},tp_src={}", from.ip(), from.port());
                }
                None => {
                    let _ = write!(out, ",tp_src={DNS_PORT}");
                }
            }
            out.push_str(",ct_state=+est+rpl+trk");
            if let Some((metadata, port)) = h.to {
                let _ = write!(out, ",reg15={port:#x},metadata={metadata:#x}");
            }
            out.push_str(",actions=");
            if let Some(id) = h.pause {
                let _ = write!(out, "controller(pause,id={id}),");
            }
            let _ = write!(out, "ct_clear,resubmit(,{})", h.table);
        }
        FlowOp::DeleteStrict { cookie, matches } => {
            let _ = write!(
                out,
                "delete_strict cookie={cookie}/-1,table={},priority={},",
                matches.table, matches.priority
            );
            write_match(out, matches);
        }
        FlowOp::DeleteCookie {
            table,
            cookie,
            mask,
        } => {
            let _ = write!(out, "delete cookie={cookie}/{mask:#x},table={table}");
        }
    }
    out.push('\n');
}

/// The whole `ovs-ofctl --bundle add-flows <bridge> -` stdin for a batch.
pub fn render_batch(ops: &[FlowOp]) -> String {
    // ~260 bytes per add line; reserving avoids regrowth on 50,000-flow batches.
    let mut out = String::with_capacity(ops.len() * 260);
    for op in ops {
        render_op(&mut out, op);
    }
    out
}

/// The fields `ovs-ofctl dump-flows` prints about a flow's use, not its definition.
pub const STATISTICS: [&str; 5] = [
    "duration=",
    "n_packets=",
    "n_bytes=",
    "idle_age=",
    "hard_age=",
];

/// A flow as `ovs-ofctl dump-flows` or `ovs-ofctl monitor` shows it, reduced to what flowd needs.
/// `matches` is `None` when the flow is not of the shape flowd writes (someone else's flow).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedFlow {
    pub cookie: Cookie,
    pub table: u8,
    /// Absent from monitor events (OVS omits it there); recovered from the cookie by the caller.
    pub priority: Option<u16>,
    pub idle_timeout: Option<u16>,
    pub hard_timeout: Option<u16>,
    /// `metadata`, `reg14`, addresses and port, when all present and typed.
    pub fields: Option<MatchFields>,
    /// `None` for `drop` (monitor prints no actions for a drop flow).
    pub actions: Option<String>,
}

/// The typed part of a match.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MatchFields {
    pub metadata: Option<u64>,
    pub reg14: Option<u32>,
    pub reg15: Option<RegMatch>,
    /// OVN's ACL hint bits.
    pub reg0: Option<RegMatch>,
    /// OVN's ACL tier and verdict register.
    pub reg8: Option<RegMatch>,
    /// Fields beyond those flowd writes (conntrack state, other registers, L2...): not a flowd flow.
    pub foreign: bool,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub l4: Option<PortMatch>,
    /// `ipv6` (or tcp6, ...) rather than `ip`.
    pub v6: bool,
}

impl MatchFields {
    /// The complete match of a dnsflow flow, when every part is there.
    pub fn flow_match(&self, table: u8, priority: u16) -> Option<FlowMatch> {
        let (src, dst) = (self.src?, self.dst?);
        let outport = match self.reg15 {
            Some(r) => Some(r.exact_value()?),
            None => None,
        };
        (src.is_ipv4() == dst.is_ipv4() && dst.is_ipv6() == self.v6 && !self.foreign).then_some(
            FlowMatch {
                table,
                priority,
                tier: self.reg8,
                hint: self.reg0,
                metadata: self.metadata?,
                reg14: self.reg14?,
                outport,
                src,
                dst,
                l4: self.l4,
            },
        )
    }
}

fn parse_hex_u64(s: &str) -> Option<u64> {
    let s = s.strip_prefix("0x")?;
    u64::from_str_radix(s, 16).ok()
}

fn parse_num_u64(s: &str) -> Option<u64> {
    parse_hex_u64(s).or_else(|| s.parse().ok())
}

/// Parses the comma-separated match of a flow (`priority=...,tcp,reg14=0x1,...`).
fn parse_match(text: &str, flow: &mut ParsedFlow) {
    let mut f = MatchFields::default();
    let mut proto = None;
    let mut tp_dst = None;
    let mut unknown_shape = false;
    for item in text.split(',').filter(|s| !s.is_empty()) {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        match (key, value) {
            ("priority", Some(v)) => flow.priority = v.parse().ok(),
            ("ip", None) => {}
            ("ipv6", None) => f.v6 = true,
            ("tcp", None) => proto = Some(Protocol::Tcp),
            ("udp", None) => proto = Some(Protocol::Udp),
            ("sctp", None) => proto = Some(Protocol::Sctp),
            ("tcp6", None) => (proto, f.v6) = (Some(Protocol::Tcp), true),
            ("udp6", None) => (proto, f.v6) = (Some(Protocol::Udp), true),
            ("sctp6", None) => (proto, f.v6) = (Some(Protocol::Sctp), true),
            ("metadata", Some(v)) => f.metadata = parse_num_u64(v),
            ("reg14", Some(v)) => f.reg14 = parse_num_u64(v).and_then(|n| u32::try_from(n).ok()),
            ("reg15", Some(v)) => f.reg15 = RegMatch::parse(v),
            ("reg0", Some(v)) => f.reg0 = RegMatch::parse(v),
            ("reg8", Some(v)) => f.reg8 = RegMatch::parse(v),
            ("nw_src" | "ipv6_src", Some(v)) => f.src = v.parse().ok(),
            ("nw_dst" | "ipv6_dst", Some(v)) => f.dst = v.parse().ok(),
            ("tp_dst", Some(v)) => tp_dst = v.parse::<u16>().ok(),
            _ => unknown_shape = true,
        }
    }
    f.l4 = match (proto, tp_dst) {
        (Some(protocol), Some(port)) => Some(PortMatch { protocol, port }),
        (None, None) => None,
        _ => {
            unknown_shape = true;
            None
        }
    };
    if unknown_shape {
        // Not a flow flowd wrote; keep the registers for table discovery but no addresses.
        f.foreign = true;
        f.src = None;
        f.dst = None;
    }
    flow.fields = Some(f);
}

/// Parses one line of `ovs-ofctl dump-flows` (` cookie=0x.., duration=.., table=46, ..., priority=..,match actions=..`)
/// or of `ovs-ofctl monitor` after its `event=... ` prefix. Returns `None` for headers and garbage.
pub fn parse_flow_line(line: &str) -> Option<ParsedFlow> {
    if line.len() > MAX_LINE_LEN {
        return None;
    }
    let (head, actions) = match line.trim().split_once(" actions=") {
        Some((h, a)) => (h, Some(a.trim())),
        None => (line.trim(), None),
    };
    let mut flow = ParsedFlow {
        cookie: Cookie(0),
        table: 0,
        priority: None,
        idle_timeout: None,
        hard_timeout: None,
        fields: None,
        actions: actions.filter(|a| *a != "drop").map(str::to_owned),
    };
    let mut saw_cookie = false;
    let mut saw_match = false;
    // Header fields are separated by ", " (dump) or " " (monitor); the match is the last blank-free token.
    for token in head.split([' ', ',']).filter(|t| !t.is_empty()) {
        let Some((key, value)) = token.split_once('=') else {
            continue;
        };
        match key {
            "cookie" => {
                flow.cookie = Cookie(parse_hex_u64(value)?);
                saw_cookie = true;
            }
            "table" => flow.table = value.parse().ok()?,
            "idle_timeout" => flow.idle_timeout = value.parse().ok(),
            "hard_timeout" => flow.hard_timeout = value.parse().ok(),
            _ => {}
        }
    }
    if let Some(last) = head.rsplit(' ').next() {
        // The match: `priority=..,...` in dumps, plain `tcp,reg14=..` in monitor events. Header-only
        // tokens (cookie=, table=, idle_age=...) never contain a comma-separated register/address list.
        if !last.starts_with("cookie=") && !last.starts_with("table=") {
            let text = last.trim_end_matches(',');
            let is_header = STATISTICS.iter().any(|p| text.starts_with(p))
                || text.starts_with("idle_timeout=")
                || text.starts_with("hard_timeout=");
            if !is_header {
                parse_match(text, &mut flow);
                saw_match = true;
            }
        }
    }
    if !saw_match {
        // A flow matching everything in its table (`priority=0 actions=...` prints no comma list).
        flow.fields = None;
    }
    saw_cookie.then_some(flow)
}

/// Why OVS removed a flow (from `ovs-ofctl monitor`'s `event=DELETED reason=...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemovedReason {
    Idle,
    Hard,
    /// A flow_mod delete: someone removed it (ovn-controller wipes br-int when it reconnects).
    Delete,
    /// Group or meter deletion, eviction: treated like a delete.
    Other,
}

/// One event of `ovs-ofctl monitor`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowEvent {
    Added(ParsedFlow),
    Modified(ParsedFlow),
    Deleted(RemovedReason, ParsedFlow),
}

/// Parses one line of `ovs-ofctl monitor <bridge> watch:... --no-names`.
pub fn parse_monitor_line(line: &str) -> Option<FlowEvent> {
    let rest = line.trim_start().strip_prefix("event=")?;
    let (kind, rest) = rest.split_once(' ')?;
    match kind {
        "ADDED" => parse_flow_line(rest).map(FlowEvent::Added),
        "MODIFIED" => parse_flow_line(rest).map(FlowEvent::Modified),
        "DELETED" => {
            let (reason, rest) = match rest.strip_prefix("reason=") {
                Some(r) => r.split_once(' ')?,
                None => ("", rest),
            };
            let reason = match reason {
                "idle" => RemovedReason::Idle,
                "hard" => RemovedReason::Hard,
                "delete" => RemovedReason::Delete,
                _ => RemovedReason::Other,
            };
            parse_flow_line(rest).map(|f| FlowEvent::Deleted(reason, f))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(dst: &str, l4: Option<PortMatch>, action: FlowAction) -> FlowSpec {
        let dst: IpAddr = dst.parse().unwrap();
        let src: IpAddr = if dst.is_ipv4() {
            "10.244.1.5".parse().unwrap()
        } else {
            "fd00:10:244:1::5".parse().unwrap()
        };
        FlowSpec {
            cookie: Cookie::new(0x646e_7366, 3, 11000),
            matches: FlowMatch {
                table: 46,
                priority: 11000,
                tier: None,
                hint: None,
                metadata: 1,
                reg14: 2,
                outport: Some(1),
                src,
                dst,
                l4,
            },
            idle_timeout: 330,
            hard_timeout: None,
            action,
        }
    }

    const TCP443: PortMatch = PortMatch {
        protocol: Protocol::Tcp,
        port: 443,
    };

    #[test]
    fn renders_the_exact_ofctl_lines() {
        let allow = FlowAction::Continue(
            Actions::new("load:0x1->NXM_NX_XXREG0[97],resubmit(,47)").unwrap(),
        );
        let mut capped = spec("2001:db8::1", None, FlowAction::Drop);
        capped.hard_timeout = Some(3600);
        capped.matches.priority = 10998;
        capped.matches.tier = Some(RegMatch::masked(0x8000_0000, 0xc000_0000));
        capped.matches.hint = Some(RegMatch::masked(0x100, 0x100));
        let ops = [
            FlowOp::Add(spec("142.250.1.1", Some(TCP443), allow)),
            FlowOp::Add(capped.clone()),
            FlowOp::DeleteStrict {
                cookie: capped.cookie,
                matches: capped.matches,
            },
            FlowOp::DeleteCookie {
                table: 46,
                cookie: Cookie::pod(0x646e_7366, 3),
                mask: POD_MASK,
            },
        ];
        assert_eq!(
            render_batch(&ops),
            "add cookie=0x646e736600032af8,table=46,priority=11000,idle_timeout=330,tcp,metadata=0x1,reg14=0x2,reg15=0x1,nw_src=10.244.1.5,nw_dst=142.250.1.1,tp_dst=443,actions=load:0x1->NXM_NX_XXREG0[97],resubmit(,47)\n\
             add cookie=0x646e736600032af8,table=46,priority=10998,idle_timeout=330,hard_timeout=3600,ipv6,reg0=0x100/0x100,reg8=0x80000000/0xc0000000,metadata=0x1,reg14=0x2,reg15=0x1,ipv6_src=fd00:10:244:1::5,ipv6_dst=2001:db8::1,actions=drop\n\
             delete_strict cookie=0x646e736600032af8/-1,table=46,priority=10998,ipv6,reg0=0x100/0x100,reg8=0x80000000/0xc0000000,metadata=0x1,reg14=0x2,reg15=0x1,ipv6_src=fd00:10:244:1::5,ipv6_dst=2001:db8::1\n\
             delete cookie=0x646e736600030000/0xffffffffffff0000,table=46\n"
        );
    }

    #[test]
    fn cookie_fields_round_trip() {
        let c = Cookie::new(0xdead_beef, 0x1234, 10999);
        assert_eq!(
            (c.prefix(), c.pod_id(), c.priority()),
            (0xdead_beef, 0x1234, 10999)
        );
        assert_eq!(c.0 & POD_MASK, Cookie::pod(0xdead_beef, 0x1234).0);
    }

    #[test]
    fn actions_reject_anything_outside_the_action_alphabet() {
        assert!(Actions::new("resubmit(,47)").is_ok());
        assert!(Actions::new("ct(commit,zone=NXM_NX_REG13[0..15],nat(src))").is_err());
        for bad in [
            "drop\nadd x",
            "a b",
            "resubmit(,47",
            "x)",
            "",
            "a;b",
            "output:$x",
        ] {
            assert!(Actions::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// The line `ovs-ofctl dump-flows` prints for a flow we installed.
    fn dump_line(s: &FlowSpec) -> String {
        let mut m = String::new();
        write_match(&mut m, &s.matches);
        format!(
            " cookie={}, duration=0.007s, table={}, n_packets=0, n_bytes=0, idle_timeout={}, idle_age=0, priority={},{m} actions=drop",
            s.cookie, s.matches.table, s.idle_timeout, s.matches.priority
        )
    }

    #[test]
    fn parses_dump_lines_back_into_our_match() {
        for (dst, l4) in [("142.250.1.1", Some(TCP443)), ("2001:db8::1", None)] {
            let s = spec(dst, l4, FlowAction::Drop);
            let p = parse_flow_line(&dump_line(&s)).unwrap();
            assert_eq!(p.cookie, s.cookie);
            assert_eq!(
                (p.table, p.priority, p.idle_timeout),
                (46, Some(11000), Some(330))
            );
            assert_eq!(p.actions, None);
            let m = p.fields.unwrap().flow_match(p.table, 11000).unwrap();
            assert_eq!(m, s.matches);
        }
    }

    #[test]
    fn parses_ovn_flows_for_discovery() {
        let line = " cookie=0xf1bb7908, duration=0.010s, table=46, n_packets=0, n_bytes=0, idle_age=0, priority=11000,ip,reg0=0x80/0x80,reg14=0x1,metadata=0x1,nw_dst=1.2.3.4 actions=load:0x1->NXM_NX_XXREG0[97],resubmit(,47)";
        let p = parse_flow_line(line).unwrap();
        assert_eq!(p.priority, Some(11000));
        let f = p.fields.unwrap();
        assert_eq!((f.metadata, f.reg14), (Some(1), Some(1)));
        assert_eq!(f.reg0, Some(RegMatch::masked(0x80, 0x80)));
        assert_eq!(f.flow_match(46, 11000), None, "no source: not one of ours");
        let tiered = " cookie=0xa02b8829, duration=0.024s, table=51, n_packets=0, n_bytes=0, idle_age=0, priority=11000,ip,reg0=0x100/0x100,reg8=0x80000000/0xc0000000,reg14=0x3,metadata=0x1,nw_dst=9.9.9.9 actions=load:0x1->OXM_OF_PKT_REG4[48],resubmit(,52)";
        let f = parse_flow_line(tiered).unwrap().fields.unwrap();
        assert_eq!(f.reg8, Some(RegMatch::masked(0x8000_0000, 0xc000_0000)));
        assert!(!f.foreign);
        let ct = " cookie=0x259c58f, duration=3.131s, table=51, n_packets=0, n_bytes=0, idle_age=3, priority=65532,ct_state=+inv+trk,metadata=0x1 actions=drop";
        assert!(parse_flow_line(ct).unwrap().fields.unwrap().foreign);
        assert_eq!(
            p.actions.as_deref(),
            Some("load:0x1->NXM_NX_XXREG0[97],resubmit(,47)")
        );
        let catch_all = " cookie=0x4dbfde02, duration=27.007s, table=46, n_packets=0, n_bytes=0, idle_age=27, priority=0,metadata=0x1 actions=resubmit(,47)";
        assert_eq!(parse_flow_line(catch_all).unwrap().priority, Some(0));
        assert!(parse_flow_line("NXST_FLOW reply (xid=0x8):").is_none());
    }

    #[test]
    fn parses_monitor_events() {
        let del = " event=DELETED reason=idle table=46 idle_timeout=2 hard_timeout=100 cookie=0x646e736600012aff tcp,reg14=0x1,metadata=0x1,nw_src=10.244.1.5,nw_dst=8.8.8.8,tp_dst=443 actions=load:0x1->NXM_NX_XXREG0[97],resubmit(,47)";
        let Some(FlowEvent::Deleted(RemovedReason::Idle, p)) = parse_monitor_line(del) else {
            panic!("not parsed")
        };
        assert_eq!(p.cookie.pod_id(), 1);
        assert_eq!(
            (p.table, p.idle_timeout, p.hard_timeout),
            (46, Some(2), Some(100))
        );
        let m = p
            .fields
            .unwrap()
            .flow_match(46, p.cookie.priority())
            .unwrap();
        assert_eq!(m.l4, Some(TCP443));
        assert_eq!(m.dst, "8.8.8.8".parse::<IpAddr>().unwrap());
        let drop6 = " event=DELETED reason=delete table=46 idle_timeout=60 cookie=0x646e736600000001 ipv6,reg14=0x1,metadata=0x1,ipv6_src=fd00:10:244:1::5,ipv6_dst=2001:db8::1";
        let Some(FlowEvent::Deleted(RemovedReason::Delete, p)) = parse_monitor_line(drop6) else {
            panic!("not parsed")
        };
        assert!(p.fields.unwrap().flow_match(46, 1).unwrap().dst.is_ipv6());
        let add = " event=ADDED table=46 cookie=0x79ee24c9 icmp6,metadata=0x3,nw_ttl=255,icmp_type=133,icmp_code=0 actions=resubmit(,47)";
        assert!(matches!(parse_monitor_line(add), Some(FlowEvent::Added(_))));
        assert!(parse_monitor_line("NXST_FLOW_MONITOR reply (xid=0x0):").is_none());
    }

    proptest! {
        /// Whatever typed values go in, a rendered line is one line, parses back to the same match,
        /// and holds nothing but the fixed keywords, numbers and addresses.
        #[test]
        fn rendered_lines_round_trip(
            v4 in any::<bool>(), a in any::<[u8; 16]>(), b in any::<[u8; 16]>(),
            meta in any::<u32>(), reg in 0u32..0x8000, prio in any::<u16>(), pod in any::<u16>(),
            idle in 1u16.., port in proptest::option::of((0usize..3, 1u16..)),
            tier in any::<bool>(), hint in any::<bool>(), out in any::<u32>(),
        ) {
            let (src, dst): (IpAddr, IpAddr) = if v4 {
                ([a[0], a[1], a[2], a[3]].into(), [b[0], b[1], b[2], b[3]].into())
            } else {
                (a.into(), b.into())
            };
            let l4 = port.map(|(p, port)| PortMatch {
                protocol: [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][p], port,
            });
            let s = FlowSpec {
                cookie: Cookie::new(0x646e_7366, pod, prio),
                matches: FlowMatch {
                    table: 46, priority: prio, tier: tier.then_some(RegMatch::masked(0x8000_0000, 0xc000_0000)),
                    hint: hint.then_some(RegMatch::masked(0x100, 0x100)), metadata: meta.into(), reg14: reg,
                    outport: Some(out), src, dst, l4,
                },
                idle_timeout: idle, hard_timeout: None, action: FlowAction::Drop,
            };
            let line = render_batch(&[FlowOp::Add(s.clone())]);
            let body = line.strip_prefix("add ").unwrap().strip_suffix('\n').unwrap();
            prop_assert!(body.chars().all(|c| c.is_ascii_alphanumeric() || ",=:._/".contains(c)), "{}", body);
            let p = parse_flow_line(&dump_line(&s)).unwrap();
            prop_assert_eq!(p.fields.unwrap().flow_match(46, prio), Some(s.matches));
        }
    }
}

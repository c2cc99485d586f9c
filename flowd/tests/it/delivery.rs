//! Where flowd will read DNS answers: a flow in OVN's delivery table (`OFTABLE_LOG_TO_PHY`) on a pod's
//! port, above OVN's own per-port flow, matching replies from port 53 in conntrack state
//! `+trk+est+rpl`. These tests send real packets through br-int's datapath and conntrack (not
//! `ofproto/trace`'s) and read which of the table's flows counted them, on OVN 23.03 and 25.03.
//!
//! Each observer flow here has exactly the actions of OVN's flow for that port, so it changes nothing
//! but the counters: the pod's port transmitting the packet shows the delivery still happens.

use crate::sandbox::{Ovn, Pod, Sandbox, Udp, KUBE_DNS_VIP, ROUTER_MAC};
use anyhow::{bail, ensure, Context, Result};
use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

/// Our observers' cookie: no dnsflow prefix, so no engine would take them for its own.
const OBSERVER_COOKIE: u64 = 0x0d15_0065;
/// The priority of OVN's flow delivering to a local port, and of the flow the feature will add above it.
const OVN_PRIORITY: u16 = 100;
const FEATURE_PRIORITY: u16 = 110;
/// A packet crosses br-int in milliseconds; generous for a loaded 2-core machine.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// The client's ephemeral ports.
const QUERY_PORT: u16 = 40000;
const STRAY_PORT: u16 = 40001;

/// A node with a client pod `ns1/pod1` and the kube-dns backend `kube-system/coredns`.
struct Node {
    sb: Sandbox,
    ovn: Ovn,
    client: Pod,
    dns: Pod,
}

fn node(ovn: Ovn) -> Result<Node> {
    let sb = Sandbox::start(ovn)?;
    let client = sb.add_pod("ns1", "pod1", 5)?;
    let dns = sb.add_dns_server()?;
    Ok(Node {
        sb,
        ovn,
        client,
        dns,
    })
}

fn addr(pod: &Pod, v6: bool) -> IpAddr {
    if v6 {
        pod.ipv6
    } else {
        pod.ipv4
    }
}

/// A flow in the delivery table on one pod's port, told apart from the others there by its priority.
struct Flow {
    priority: u16,
    /// Its match, `table=...,reg15=...,metadata=...`: what `dump-flows` takes (no priority).
    filter: String,
}

impl Flow {
    /// Its line in a `dump-flows` of its filter (which lists the flows at least as specific).
    fn line<'a>(&self, dump: &'a str) -> Option<&'a str> {
        let p = format!("priority={}", self.priority);
        dump.lines().find(|l| {
            l.split_whitespace()
                .any(|t| t == p || t.starts_with(&format!("{p},")))
        })
    }
}

impl Node {
    /// The flow at `priority` on `pod`'s port matching `m` as well.
    fn flow(&self, pod: &Pod, priority: u16, m: &str) -> Result<Flow> {
        let port = self.sb.port_key(&pod.key.iface_id())?;
        let switch = self.sb.switch_key()?;
        let m = if m.is_empty() {
            m.to_owned()
        } else {
            format!("{m},")
        };
        let filter = format!(
            "table={},{m}reg15={port},metadata={switch}",
            self.ovn.delivery_table()
        );
        Ok(Flow { priority, filter })
    }

    /// OVN's own flow delivering to `pod`, and its actions.
    fn ovn_flow(&self, pod: &Pod) -> Result<(Flow, String)> {
        let flow = self.flow(pod, OVN_PRIORITY, "")?;
        let dump = self.dump(&flow.filter)?;
        let actions = flow
            .line(&dump)
            .and_then(|l| l.split(" actions=").nth(1))
            .with_context(|| format!("no OVN flow {}:\n{}", flow.filter, self.table()))?;
        Ok((flow, actions.trim().to_owned()))
    }

    /// Adds a flow on `pod`'s port at `priority` matching `m`, with the actions of OVN's flow for
    /// that port.
    fn observe(&self, pod: &Pod, priority: u16, m: &str) -> Result<Flow> {
        let (_, actions) = self.ovn_flow(pod)?;
        let flow = self.flow(pod, priority, m)?;
        let add = format!(
            "cookie={OBSERVER_COOKIE:#x},priority={priority},{},actions={actions}",
            flow.filter
        );
        self.sb.ofctl_cmd(&["add-flow", "br-int", &add])?;
        Ok(flow)
    }

    fn dump(&self, filter: &str) -> Result<String> {
        self.sb
            .ofctl_cmd(&["dump-flows", "--no-names", "br-int", filter])
    }

    /// The delivery table, for failure messages.
    fn table(&self) -> String {
        let table = format!("table={}", self.ovn.delivery_table());
        self.dump(&table).unwrap_or_else(|e| e.to_string())
    }

    /// The packets `flow` counted.
    fn packets(&self, flow: &Flow) -> Result<u64> {
        let dump = self.dump(&flow.filter)?;
        flow.line(&dump)
            .and_then(|l| l.split("n_packets=").nth(1))
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no flow {}:\n{}", flow.filter, self.table()))
    }

    /// The packets each of `flows` counted.
    fn counts<const N: usize>(&self, flows: [&Flow; N]) -> Result<[u64; N]> {
        let mut counts = [0; N];
        for (c, flow) in counts.iter_mut().zip(flows) {
            *c = self.packets(flow)?;
        }
        Ok(counts)
    }

    /// `from` sends `packet`; fails unless `to`'s port transmits exactly one packet more.
    fn exchange(&self, from: &Pod, packet: &Udp, to: &Pod) -> Result<()> {
        let before = self.sb.port_stats(to)?.tx;
        self.sb.send_udp(from, packet)?;
        let deadline = Instant::now() + DELIVERY_TIMEOUT;
        loop {
            let tx = self.sb.port_stats(to)?.tx;
            if tx > before {
                ensure!(tx == before + 1, "{} got {} packets", to.port, tx - before);
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{packet:?} from {} never reached {}:\n{}",
                    from.port,
                    to.port,
                    self.table()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.sb.credit_flow_stats()
    }

    /// The client's query to `dst` through `dl_dst`, and the DNS pod's reply to it.
    fn query_and_reply(&self, dl_dst: &str, dst: IpAddr) -> Result<()> {
        let query = Udp {
            dl_dst,
            dst,
            src_port: QUERY_PORT,
            dst_port: 53,
        };
        self.exchange(&self.client, &query, &self.dns)?;
        self.reply(QUERY_PORT, dst.is_ipv6())
    }

    /// A packet from the DNS pod's port 53 to the client's `port`.
    fn reply(&self, port: u16, v6: bool) -> Result<()> {
        let reply = Udp {
            dl_dst: &self.client.mac,
            dst: addr(&self.client, v6),
            src_port: 53,
            dst_port: port,
        };
        self.exchange(&self.dns, &reply, &self.client)
    }
}

/// The client queries the DNS pod directly; only the reply meets the feature's flow, whose actions
/// (OVN's) still deliver it; a packet from port 53 the client never asked for does not.
fn a_reply_reaches_the_delivery_table_established(ovn: Ovn, v6: bool) -> Result<()> {
    let n = node(ovn)?;
    let udp = if v6 { "udp6" } else { "udp" };
    let (ovn_flow, _) = n.ovn_flow(&n.client)?;
    let feature = n.observe(
        &n.client,
        FEATURE_PRIORITY,
        &format!("{udp},tp_src=53,ct_state=+trk+est+rpl"),
    )?;
    let query = Udp {
        dl_dst: &n.dns.mac,
        dst: addr(&n.dns, v6),
        src_port: QUERY_PORT,
        dst_port: 53,
    };
    n.exchange(&n.client, &query, &n.dns)?;
    let after_query = n.counts([&feature, &ovn_flow])?;
    n.reply(QUERY_PORT, v6)?;
    let after_reply = n.counts([&feature, &ovn_flow])?;
    n.reply(STRAY_PORT, v6)?;
    let after_stray = n.counts([&feature, &ovn_flow])?;
    assert_eq!(
        [after_query, after_reply, after_stray],
        [[0, 0], [1, 0], [1, 1]],
        "[feature's, OVN's] flow after the query, its reply, and a stray from port 53:\n{}",
        n.table()
    );
    Ok(())
}

fn a_dns_reply_reaches_the_delivery_table_established(ovn: Ovn) -> Result<()> {
    a_reply_reaches_the_delivery_table_established(ovn, false)
}

fn an_ipv6_dns_reply_reaches_the_delivery_table_established(ovn: Ovn) -> Result<()> {
    a_reply_reaches_the_delivery_table_established(ovn, true)
}

/// A query to the kube-dns ClusterIP is DNATed to the DNS pod; its reply comes back un-DNATed by
/// the egress pipeline's conntrack, so the delivery table sees it from the ClusterIP, established.
fn a_reply_through_the_cluster_ip_is_un_natted_before_the_delivery_table(ovn: Ovn) -> Result<()> {
    let n = node(ovn)?;
    let (ovn_flow, _) = n.ovn_flow(&n.client)?;
    let established = "udp,tp_src=53,ct_state=+trk+est+rpl";
    let feature = n.observe(&n.client, FEATURE_PRIORITY, established)?;
    let from_vip = n.observe(
        &n.client,
        FEATURE_PRIORITY + 1,
        &format!("{established},nw_src={KUBE_DNS_VIP}"),
    )?;
    n.query_and_reply(ROUTER_MAC, KUBE_DNS_VIP.parse()?)?;
    assert_eq!(
        n.counts([&from_vip, &feature, &ovn_flow])?,
        [1, 0, 0],
        "[from the ClusterIP, any established reply, OVN's] flow after the reply:\n{}",
        n.table()
    );
    Ok(())
}

/// Without a load balancer or a stateful ACL on the switch, OVN sends nothing through conntrack: the
/// reply reaches the delivery table untracked and the feature's match misses it. No OVN-K node
/// switch is like that (its Services' load balancers), and the feature relies on that.
fn on_a_stateless_switch_the_reply_is_untracked(ovn: Ovn) -> Result<()> {
    let n = node(ovn)?;
    n.sb.remove_stateful_config()?;
    let (ovn_flow, _) = n.ovn_flow(&n.client)?;
    let feature = n.observe(
        &n.client,
        FEATURE_PRIORITY,
        "udp,tp_src=53,ct_state=+trk+est+rpl",
    )?;
    let untracked = n.observe(
        &n.client,
        FEATURE_PRIORITY - 1,
        "udp,tp_src=53,ct_state=-trk",
    )?;
    n.query_and_reply(&n.dns.mac, n.dns.ipv4)?;
    assert_eq!(
        n.counts([&feature, &untracked, &ovn_flow])?,
        [0, 1, 0],
        "[feature's, untracked, OVN's] flow after the reply:\n{}",
        n.table()
    );
    Ok(())
}

/// Every test above, once per OVN version.
macro_rules! on_every_ovn {
    ($($name:ident),* $(,)?) => {
        mod v23_03 {
            $(
                #[test]
                fn $name() -> anyhow::Result<()> {
                    super::$name(super::Ovn::V23_03)
                }
            )*
        }
        mod v25_03 {
            $(
                #[test]
                fn $name() -> anyhow::Result<()> {
                    super::$name(super::Ovn::V25_03)
                }
            )*
        }
    };
}

on_every_ovn!(
    a_dns_reply_reaches_the_delivery_table_established,
    an_ipv6_dns_reply_reaches_the_delivery_table_established,
    a_reply_through_the_cluster_ip_is_un_natted_before_the_delivery_table,
    on_a_stateless_switch_the_reply_is_untracked,
);

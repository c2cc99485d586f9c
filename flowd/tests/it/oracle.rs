//! The differential oracle: dnsflow grants exactly what OVN-K's own rule would, for that pod only, on
//! every OVN version.
//!
//! For generated EgressFirewalls (cidr and `dnsName` rules, Allow and Deny, with and without ports,
//! wildcards, IPv4 and IPv6, up to dozens of rules) and generated answers per pod, two sandboxes of the
//! same OVN are compared, packet by packet, with `ofproto/trace`:
//! - the **reference**: the EgressFirewall as OVN-K renders it had it resolved exactly those IPs, for
//!   exactly that pod (each `dnsName` rule an ACL per pod on address sets holding that pod's answers,
//!   without cluster addresses, as OVN-K never puts those in a DNS address set);
//! - **flowd**: the same EgressFirewall with empty address sets, and flowd's engine fed the answers,
//!   not told the cluster subnets (so an answer pointing at a pod of the node earns a grant: the router
//!   port guard alone must keep it from opening the same switch).
//!
//! The grid: both pods of the namespace to every destination of the pool (one an AdminNetworkPolicy
//! denies in tier 1), over TCP 443, TCP 80, UDP 53 and plain IP, and each pod to a pod of the same node
//! whose NetworkPolicy denies ingress. Every verdict must be identical.

use crate::{
    ovn::{settle, start_engine},
    sandbox::{Ovn, Pod, Sandbox, Trace},
};
use anyhow::{Context, Result};
use dnsflow_dnstap::{Answer, DnsName, DnsResponse};
use flowd::{
    config::EngineSettings, egressfirewall::EgressFirewall, model::Protocol, rules::FirewallRules,
};
use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Instant};
use tokio::task::block_in_place;

/// Generated cases per OVN version; the first seed is fixed, so a failure names its case.
const CASES: u64 = 10;
const SEED: u64 = 0x646e_7366_6f72_636c;
/// At most this many rules per generated EgressFirewall (the last case has more).
const MAX_RULES: usize = 24;
const BIG_CASE_RULES: usize = 40;

const V4_POOL: [&str; 8] = [
    "8.8.4.4",
    "8.8.8.8",
    "8.8.9.1",
    "1.1.1.1",
    "1.0.0.1",
    "9.9.9.9",
    "142.250.1.1",
    // Denied by the sandbox's AdminNetworkPolicy (tier 1).
    "203.0.113.8",
];
const V6_POOL: [&str; 4] = [
    "2001:4860:4860::8888",
    "2001:4860:4860::8844",
    "2606:4700::1111",
    "2620:fe::fe",
];
const V4_CIDRS: [&str; 6] = [
    "8.8.0.0/16",
    "8.8.4.0/24",
    "8.8.4.4/32",
    "1.0.0.0/8",
    "0.0.0.0/0",
    "142.250.0.0/15",
];
const V6_CIDRS: [&str; 3] = ["2001:4860::/32", "::/0", "2606:4700::1111/128"];
const L4_GRID: [Option<(Protocol, u16)>; 4] = [
    None,
    Some((Protocol::Tcp, 443)),
    Some((Protocol::Tcp, 80)),
    Some((Protocol::Udp, 53)),
];

/// xorshift64*: a small, reproducible generator (the case, not the randomness, is what matters).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

/// One answer a pod received: the name, the rule whose name it answers (`None`: no rule covers it),
/// the addresses.
type Received = (String, Option<usize>, Vec<IpAddr>);

/// One generated case: the EgressFirewall's `spec.egress`, and per pod the answers it received.
struct Case {
    egress: Vec<serde_json::Value>,
    answers: [Vec<Received>; 2],
}

fn generate(seed: u64, rules: usize, victim: IpAddr) -> Case {
    let mut rng = Rng(seed | 1);
    let mut egress = Vec::new();
    let mut names: Vec<(usize, String, &'static str)> = Vec::new();
    for i in 0..rules {
        let ports = match rng.below(4) {
            0 => serde_json::json!([{"protocol": "TCP", "port": 443}]),
            1 => {
                serde_json::json!([{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 80}])
            }
            _ => serde_json::json!(null),
        };
        let mut rule = if rng.percent(55) {
            let (name, kind) = if rng.percent(30) {
                (format!("*.w{i}.example.com"), "wildcard")
            } else {
                (format!("r{i}.example.com"), "plain")
            };
            names.push((i, name.clone(), kind));
            let verdict = if rng.percent(75) { "Allow" } else { "Deny" };
            serde_json::json!({"type": verdict, "to": {"dnsName": name}})
        } else {
            let cidr = if rng.percent(70) {
                rng.pick(&V4_CIDRS)
            } else {
                rng.pick(&V6_CIDRS)
            };
            let verdict = if rng.percent(35) { "Allow" } else { "Deny" };
            serde_json::json!({"type": verdict, "to": {"cidrSelector": cidr}})
        };
        if !ports.is_null() {
            rule["ports"] = ports;
        }
        egress.push(rule);
    }
    if rng.percent(70) {
        egress.push(serde_json::json!({"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}));
        egress.push(serde_json::json!({"type": "Deny", "to": {"cidrSelector": "::/0"}}));
    }
    let mut answers: [Vec<Received>; 2] = [Vec::new(), Vec::new()];
    for (p, pod_answers) in answers.iter_mut().enumerate() {
        for (i, name, kind) in &names {
            if !rng.percent(60) {
                continue;
            }
            let qname = match *kind {
                "wildcard" => name.replacen('*', "api", 1),
                _ => name.clone(),
            };
            let mut ips: Vec<IpAddr> = (0..1 + rng.below(3))
                .map(|_| {
                    let ip = if rng.percent(70) {
                        rng.pick(&V4_POOL)
                    } else {
                        rng.pick(&V6_POOL)
                    };
                    ip.parse().unwrap()
                })
                .collect();
            if p == 0 && rng.percent(30) {
                // A name that points at a pod of this node.
                ips.push(victim);
            }
            ips.sort();
            ips.dedup();
            pod_answers.push((qname, Some(*i), ips));
        }
        let stray: IpAddr = rng.pick(&V4_POOL).parse().unwrap();
        pod_answers.push(("nothing.test".into(), None, vec![stray]));
    }
    Case { egress, answers }
}

/// A sandbox of `ovn` with the namespace's two pods and a protected pod of another namespace.
struct Side {
    sb: Arc<Sandbox>,
    pods: [Pod; 2],
    victim: Pod,
}

fn side(ovn: Ovn) -> Result<Side> {
    let sb = Sandbox::start(ovn)?;
    let pods = [sb.add_pod(NS, "pod1", 5)?, sb.add_pod(NS, "pod2", 6)?];
    let victim = sb.add_pod("ns2", "db", 7)?;
    sb.deny_ingress("ns2", "10.244.1.250".parse()?)?;
    Ok(Side {
        sb: Arc::new(sb),
        pods,
        victim,
    })
}

const NS: &str = "ns1";

impl Side {
    /// Every verdict of the grid, in a fixed order, with its description.
    fn grid(&self) -> Result<Vec<(String, Trace)>> {
        let mut out = Vec::new();
        for pod in &self.pods {
            for dst in V4_POOL.iter().chain(&V6_POOL) {
                for l4 in L4_GRID {
                    let verdict = self.sb.trace(pod, dst.parse()?, l4)?;
                    out.push((format!("{} -> {dst} {l4:?}", pod.key), verdict));
                }
            }
            let to_pod = self.sb.trace_to_pod(pod, &self.victim)?;
            out.push((format!("{} -> pod {}", pod.key, self.victim.key), to_pod));
        }
        Ok(out)
    }
}

async fn oracle(ovn: Ovn) -> Result<()> {
    let (reference, dnsflow) = block_in_place(|| -> Result<_> {
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| side(ovn));
            let b = side(ovn);
            (a.join().expect("sandbox thread"), b)
        });
        Ok((a?, b?))
    })?;
    let unaware = EngineSettings {
        cluster_subnets: Vec::new(),
        ..EngineSettings::default()
    };
    let prefix = unaware.cookie_prefix;
    let (mut traces, mut forwarded, mut grants_total, mut mismatches) = (0, 0, 0, Vec::new());
    for n in 0..CASES {
        let rules_n = if n + 1 == CASES {
            BIG_CASE_RULES
        } else {
            1 + (SEED.rotate_left(n as u32) as usize % MAX_RULES)
        };
        let seed = SEED.wrapping_add(n);
        let case = generate(seed, rules_n, dnsflow.victim.ipv4);
        let ef = EgressFirewall::inline(NS, serde_json::Value::Array(case.egress.clone()))?;
        let rules = FirewallRules::from_egress_firewall(&ef)
            .with_context(|| format!("case {n}: {:?}", case.egress))?;

        // The reference: OVN-K's own ACLs, resolved per pod to what that pod was answered.
        let per_pod: Vec<HashMap<usize, Vec<IpAddr>>> = case
            .answers
            .iter()
            .map(|answers| {
                let mut m: HashMap<usize, Vec<IpAddr>> = HashMap::new();
                for (_, rule, ips) in answers {
                    if let Some(rule) = rule {
                        let outside = ips.iter().filter(|ip| **ip != reference.victim.ipv4);
                        m.entry(*rule).or_default().extend(outside);
                    }
                }
                m
            })
            .collect();
        block_in_place(|| {
            reference.sb.set_egress_firewall_resolved(
                &rules,
                &[
                    (Some(&reference.pods[0]), &per_pod[0]),
                    (Some(&reference.pods[1]), &per_pod[1]),
                ],
            )
        })?;

        // flowd: empty address sets, an engine fed the same answers.
        block_in_place(|| -> Result<()> {
            dnsflow.sb.set_egress_firewall_resolved(&rules, &[])?;
            let ours = format!("cookie={:#x}/0xffffffff00000000", u64::from(prefix) << 32);
            dnsflow.sb.ofctl_cmd(&["del-flows", "br-int", &ours])?;
            Ok(())
        })?;
        let pods: Vec<&Pod> = dnsflow.pods.iter().collect();
        let (engine, task) = start_engine(&dnsflow.sb, unaware.clone(), &rules, &pods);
        for (pod, answers) in dnsflow.pods.iter().zip(&case.answers) {
            for (qname, _, ips) in answers {
                let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = ips.iter().partition(|i| i.is_ipv4());
                for (client, ips) in [(pod.ipv4, v4), (pod.ipv6, v6)] {
                    if ips.is_empty() {
                        continue;
                    }
                    let answers = ips.into_iter().map(|ip| Answer { ip, ttl: 300 }).collect();
                    let name = DnsName::new(qname)?;
                    let resp = DnsResponse::noerror(client, name, Vec::new(), answers);
                    engine.on_dns(resp, Instant::now());
                }
            }
        }
        let grants = engine.grants(None, None).len();
        let settled = settle(&dnsflow.sb, &engine, grants).await;
        task.abort();
        settled.with_context(|| format!("case {n} (seed {seed:#x}) never settled"))?;
        grants_total += grants;

        let (want, got) =
            block_in_place(|| -> Result<_> { Ok((reference.grid()?, dnsflow.grid()?)) })?;
        traces += want.len();
        forwarded += want.iter().filter(|(_, v)| *v == Trace::Forwarded).count();
        for ((what, w), (_, g)) in want.iter().zip(&got) {
            if w != g {
                mismatches.push(format!(
                    "case {n} (seed {seed:#x}, {} rules): {what}: OVN-K {w:?}, dnsflow {g:?}",
                    case.egress.len()
                ));
            }
        }
        if mismatches.len() > 20 {
            break;
        }
    }
    eprintln!(
        "oracle on {ovn:?}: {CASES} cases, {grants_total} grants, {traces} packets traced on each side ({forwarded} forwarded by OVN-K's rule), {} differ",
        mismatches.len()
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnsflow_grants_exactly_what_ovn_ks_own_rule_would_on_ovn_23_03() -> Result<()> {
    oracle(Ovn::V23_03).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnsflow_grants_exactly_what_ovn_ks_own_rule_would_on_ovn_25_03() -> Result<()> {
    oracle(Ovn::V25_03).await
}

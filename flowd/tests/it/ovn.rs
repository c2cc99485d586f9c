//! flowd's flows proven in real OVN pipelines, 23.03 and 25.03 (ACL tiers, verdict register): the
//! oracle is `ofproto/trace` of a packet from a pod (see `sandbox.rs`). Every test runs once per OVN
//! version (modules `v23_03` and `v25_03`); each builds its own sandbox, so they run in parallel.

use crate::sandbox::{Ovn, Pod, Sandbox, Trace};
use anyhow::Result;
use dnsflow_dnstap::{Answer, DnsName, DnsResponse};
use flowd::{
    config::EngineSettings, egressfirewall::EgressFirewall, engine::Engine, model::Protocol,
    ovs::Native, rules::FirewallRules,
};
use serde_json::json;
use std::{
    net::IpAddr,
    path::Path,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::task::{block_in_place, JoinHandle};

const NS: &str = "ns1";
const TCP443: Option<(Protocol, u16)> = Some((Protocol::Tcp, 443));
/// How long a flow may take from a DNS answer to OVS (one bundle; generous for a loaded CI machine).
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A namespace's EgressFirewall from its `spec.egress`, validated as flowd does.
pub fn rules(egress: serde_json::Value) -> FirewallRules {
    rules_annotated(egress, None)
}

fn rules_annotated(egress: serde_json::Value, matching: Option<&str>) -> FirewallRules {
    let mut ef = EgressFirewall::inline(NS, egress).unwrap();
    if let Some(m) = matching {
        let annotation = flowd::egressfirewall::NAME_MATCHING_ANNOTATION;
        ef.metadata.annotations = Some([(annotation.to_string(), m.to_string())].into());
    }
    FirewallRules::from_egress_firewall(&ef).unwrap()
}

/// The seed's case: `dnsName: google.com` Allow, then everything else denied.
fn google() -> FirewallRules {
    rules(json!([
        {"type": "Allow", "to": {"dnsName": "google.com"}},
        {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}},
        {"type": "Deny", "to": {"cidrSelector": "::/0"}}
    ]))
}

/// A NOERROR answer to `client` for `qname`, following `chain`, with `answers` (TTL 300).
pub fn answer(client: IpAddr, qname: &str, chain: &[&str], answers: &[&str]) -> DnsResponse {
    let answers = answers.iter().map(|a| Answer {
        ip: ip(a),
        ttl: 300,
    });
    let chain = chain.iter().map(|n| DnsName::new(n).unwrap()).collect();
    DnsResponse::noerror(
        client,
        DnsName::new(qname).unwrap(),
        chain,
        answers.collect(),
    )
}

/// A sandbox with pods `ns1/pod1` and `ns1/pod2`, the namespace's EgressFirewall, and a running engine.
struct Node {
    sb: Arc<Sandbox>,
    pod1: Pod,
    pod2: Pod,
    engine: Engine<Native>,
    task: JoinHandle<()>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn settings() -> EngineSettings {
    EngineSettings::for_kind()
}

/// A sandbox with pods `ns1/pod1` and `ns1/pod2` and the namespace's EgressFirewall.
fn sandbox(ovn: Ovn, rules: &FirewallRules) -> Result<(Sandbox, Pod, Pod)> {
    let sb = Sandbox::start(ovn)?;
    let pod1 = sb.add_pod(NS, "pod1", 5)?;
    let pod2 = sb.add_pod(NS, "pod2", 6)?;
    sb.set_egress_firewall(rules)?;
    Ok((sb, pod1, pod2))
}

async fn node_with(ovn: Ovn, rules: FirewallRules, settings: EngineSettings) -> Result<Node> {
    let (sb, pod1, pod2) = block_in_place(|| sandbox(ovn, &rules))?;
    let sb = Arc::new(sb);
    let (engine, task) = start_engine(&sb, settings, &rules, &[&pod1, &pod2]);
    Ok(Node {
        sb,
        pod1,
        pod2,
        engine,
        task,
    })
}

pub fn start_engine(
    sb: &Sandbox,
    settings: EngineSettings,
    rules: &FirewallRules,
    pods: &[&Pod],
) -> (Engine<Native>, JoinHandle<()>) {
    let engine = Engine::new(settings, sb.native());
    engine.set_node(Sandbox::NODE);
    engine.set_rules(rules.clone());
    for p in pods {
        engine.upsert_pod(p.info());
    }
    let task = tokio::spawn(engine.clone().run());
    (engine, task)
}

async fn node(ovn: Ovn, rules: FirewallRules) -> Result<Node> {
    node_with(ovn, rules, settings()).await
}

impl Node {
    /// Traces every case and fails with all mismatches at once: (pod, destination, L4, expected, why).
    fn expect(&self, cases: &[Case]) {
        expect_traces(&self.sb, cases);
    }

    fn dns(&self, pod: &Pod, qname: &str, chain: &[&str], answers: &[&str]) {
        let client = if answers.iter().any(|a| a.contains(':')) {
            pod.ipv6
        } else {
            pod.ipv4
        };
        self.engine
            .on_dns(answer(client, qname, chain, answers), Instant::now());
    }

    fn flows(&self) -> Vec<String> {
        block_in_place(|| self.sb.dnsflow_flows(self.engine.settings().cookie_prefix)).unwrap()
    }

    /// Waits until the engine holds `n` grants, has nothing left to write, and OVS holds exactly their
    /// flows (one per variant of the template learned from this OVN).
    async fn settle(&self, n: usize) -> Result<Duration> {
        settle(&self.sb, &self.engine, n).await
    }
}

/// How many OVS flows the engine's grants take on this bridge.
fn flows_for_grants(engine: &Engine<Native>) -> Option<usize> {
    let t = engine.template()?;
    Some(
        engine
            .grants(None, None)
            .iter()
            .map(|g| t.variants(g.verdict == flowd::model::Verdict::Allow).len())
            .sum(),
    )
}

/// See [`Node::settle`].
pub async fn settle(sb: &Sandbox, engine: &Engine<Native>, n: usize) -> Result<Duration> {
    let prefix = engine.settings().cookie_prefix;
    let flows = || block_in_place(|| sb.dnsflow_flows(prefix)).unwrap_or_default();
    poll(APPLY_TIMEOUT, || {
        let grants = engine.grants(None, None);
        grants.len() == n
            && grants.iter().all(|g| g.installed)
            && !engine.has_pending_changes()
            && flows_for_grants(engine) == Some(flows().len())
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}; grants: {}, template: {:?}, blocked: {:?}, flows now: {:#?}",
            engine.grants(None, None).len(),
            engine.template().map(|t| t.to_string()),
            engine.blocked(),
            flows()
        )
    })
}

/// One oracle check: from pod, to destination, with L4 (or plain IP), expected verdict, why.
type Case<'a> = (&'a Pod, &'a str, Option<(Protocol, u16)>, Trace, &'a str);

fn expect_traces(sb: &Sandbox, cases: &[Case]) {
    let wrong: Vec<String> = cases
        .iter()
        .filter_map(|(pod, dst, l4, want, why)| {
            let got = block_in_place(|| sb.trace(pod, ip(dst), *l4)).unwrap();
            (got != *want).then(|| {
                format!(
                    "{} -> {dst} {l4:?}: {got:?}, want {want:?} ({why})",
                    pod.key
                )
            })
        })
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Polls `check` every 5 ms until it holds; returns how long that took.
pub async fn poll(timeout: Duration, mut check: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if check() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            anyhow::bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

use Trace::{Dropped, Forwarded};
const UDP443: Option<(Protocol, u16)> = Some((Protocol::Udp, 443));

async fn a_resolved_ip_is_dropped_before_the_answer_and_forwarded_after(ovn: Ovn) -> Result<()> {
    let n = node(ovn, google()).await?;
    let (p1, p2) = (&n.pod1, &n.pod2);
    n.expect(&[(
        p1,
        "142.250.1.1",
        TCP443,
        Dropped,
        "the EF Deny holds before DNS",
    )]);
    n.dns(p1, "www.google.com", &[], &["142.250.1.1"]);
    n.settle(1).await?;
    n.expect(&[
        (p1, "142.250.1.1", TCP443, Forwarded, "resolved"),
        (p1, "142.250.1.1", None, Forwarded, "no ports: any protocol"),
        (
            p2,
            "142.250.1.1",
            TCP443,
            Dropped,
            "another pod of the namespace",
        ),
        (
            p1,
            "142.250.1.2",
            TCP443,
            Dropped,
            "an IP the pod did not resolve",
        ),
    ]);
    let flow = &n.flows()[0];
    let table = format!("table={}", ovn.ef_table());
    assert!(
        flow.contains(&table) && flow.contains("priority=11000"),
        "{flow}"
    );
    assert!(flow.contains("idle_timeout=330"), "{flow}");
    assert_eq!(
        n.engine.acl_table(),
        Some(ovn.ef_table()),
        "the table the engine found"
    );
    Ok(())
}

async fn an_earlier_cidr_deny_still_wins_a_later_one_does_not(ovn: Ovn) -> Result<()> {
    let n = node(
        ovn,
        rules(json!([
            {"type": "Deny", "to": {"cidrSelector": "142.250.0.0/16"}},
            {"type": "Allow", "to": {"dnsName": "google.com"}},
            {"type": "Deny", "to": {"cidrSelector": "8.8.0.0/16"}},
            {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}
        ])),
    )
    .await?;
    n.dns(&n.pod1, "google.com", &[], &["142.250.1.1", "8.8.4.4"]);
    n.settle(2).await?;
    n.expect(&[
        (
            &n.pod1,
            "142.250.1.1",
            TCP443,
            Dropped,
            "rule 0 comes first",
        ),
        (&n.pod1, "8.8.4.4", TCP443, Forwarded, "rule 2 comes after"),
    ]);
    Ok(())
}

async fn only_the_rules_protocol_and_port_pass(ovn: Ovn) -> Result<()> {
    let n = node(ovn, rules(json!([
        {"type": "Allow", "to": {"dnsName": "google.com"}, "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "UDP", "port": 443}]},
        {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}
    ])))
    .await?;
    n.dns(&n.pod1, "google.com", &[], &["142.250.1.1"]);
    n.settle(2).await?;
    let p1 = &n.pod1;
    n.expect(&[
        (p1, "142.250.1.1", TCP443, Forwarded, "tcp/443"),
        (p1, "142.250.1.1", UDP443, Forwarded, "udp/443"),
        (
            p1,
            "142.250.1.1",
            Some((Protocol::Tcp, 80)),
            Dropped,
            "another port",
        ),
        (
            p1,
            "142.250.1.1",
            Some((Protocol::Sctp, 443)),
            Dropped,
            "another protocol",
        ),
        (p1, "142.250.1.1", None, Dropped, "plain IP"),
    ]);
    Ok(())
}

async fn a_wildcard_covers_one_label_not_deeper_names(ovn: Ovn) -> Result<()> {
    let n = node(
        ovn,
        rules(json!([
            {"type": "Allow", "to": {"dnsName": "*.example.com"}},
            {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}
        ])),
    )
    .await?;
    n.dns(&n.pod1, "a.example.com", &[], &["93.184.216.1"]);
    n.dns(&n.pod1, "b.a.example.com", &[], &["93.184.216.2"]);
    n.dns(&n.pod1, "example.com", &[], &["93.184.216.3"]);
    n.settle(1).await?;
    n.expect(&[
        (
            &n.pod1,
            "93.184.216.1",
            TCP443,
            Forwarded,
            "one label below",
        ),
        (&n.pod1, "93.184.216.2", TCP443, Dropped, "two labels below"),
        (
            &n.pod1,
            "93.184.216.3",
            TCP443,
            Dropped,
            "the base name itself",
        ),
    ]);
    Ok(())
}

async fn plain_names_cover_subdomains_unless_strict(ovn: Ovn) -> Result<()> {
    let n = node(ovn, google()).await?;
    n.dns(&n.pod1, "mail.google.com", &[], &["142.250.1.1"]);
    n.dns(&n.pod1, "evilgoogle.com", &[], &["6.6.6.6"]);
    n.settle(1).await?;
    n.expect(&[
        (
            &n.pod1,
            "142.250.1.1",
            TCP443,
            Forwarded,
            "subdomain by default",
        ),
        (
            &n.pod1,
            "6.6.6.6",
            TCP443,
            Dropped,
            "not at a label boundary",
        ),
    ]);

    // The namespace's annotation selects OVN-K's strict matching: the subdomain's flow goes.
    let strict = rules_annotated(
        json!([
            {"type": "Allow", "to": {"dnsName": "google.com"}},
            {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}
        ]),
        Some("strict"),
    );
    n.engine.set_rules(strict);
    n.settle(0).await?;
    n.dns(&n.pod1, "google.com", &[], &["142.250.1.9"]);
    n.settle(1).await?;
    n.expect(&[
        (
            &n.pod1,
            "142.250.1.1",
            TCP443,
            Dropped,
            "strict: subdomain no more",
        ),
        (
            &n.pod1,
            "142.250.1.9",
            TCP443,
            Forwarded,
            "strict: the exact name",
        ),
    ]);

    // And the node-wide flag does the same without an annotation.
    let m = node_with(
        ovn,
        google(),
        EngineSettings {
            strict_names: true,
            ..settings()
        },
    )
    .await?;
    m.dns(&m.pod1, "www.google.com", &[], &["142.250.1.1"]);
    m.dns(&m.pod1, "google.com", &[], &["142.250.1.2"]);
    m.settle(1).await?;
    m.expect(&[
        (
            &m.pod1,
            "142.250.1.1",
            TCP443,
            Dropped,
            "strict flag: subdomain",
        ),
        (
            &m.pod1,
            "142.250.1.2",
            TCP443,
            Forwarded,
            "strict flag: exact name",
        ),
    ]);
    Ok(())
}

async fn an_ipv6_answer_opens_ipv6_only(ovn: Ovn) -> Result<()> {
    let n = node(ovn, google()).await?;
    n.expect(&[(&n.pod1, "2a00:1450:4001::1", TCP443, Dropped, "before DNS")]);
    n.dns(&n.pod1, "www.google.com", &[], &["2a00:1450:4001::1"]);
    n.settle(1).await?;
    n.expect(&[
        (&n.pod1, "2a00:1450:4001::1", TCP443, Forwarded, "resolved"),
        (
            &n.pod1,
            "2a00:1450:4001::2",
            TCP443,
            Dropped,
            "not resolved",
        ),
        (&n.pod2, "2a00:1450:4001::1", TCP443, Dropped, "another pod"),
    ]);
    assert!(n.flows()[0].contains("ipv6_dst=2a00:1450:4001::1"));
    Ok(())
}

async fn a_cname_chain_is_followed_and_upper_case_is_normalized(ovn: Ovn) -> Result<()> {
    let n = node(
        ovn,
        rules(json!([
            {"type": "Allow", "to": {"dnsName": "WWW.Example.COM."}},
            {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}
        ])),
    )
    .await?;
    // The pod asked for the rule's name; the addresses belong to the CDN name at the chain's end.
    let chain = ["www.example.com.edgekey.net", "e1.a.akamaiedge.net"];
    n.dns(&n.pod1, "WwW.ExAmPlE.cOm.", &chain, &["23.1.2.3"]);
    n.settle(1).await?;
    n.expect(&[(&n.pod1, "23.1.2.3", TCP443, Forwarded, "via the chain")]);
    Ok(())
}

async fn an_answer_inside_the_cluster_subnets_gets_nothing(ovn: Ovn) -> Result<()> {
    let n = node(ovn, google()).await?;
    n.dns(
        &n.pod1,
        "google.com",
        &[],
        &["10.244.2.7", "10.96.0.1", "142.250.1.1"],
    );
    n.settle(1).await?;
    let flows = n.flows();
    assert!(flows[0].contains("nw_dst=142.250.1.1"), "{flows:?}");
    n.expect(&[(&n.pod1, "10.96.0.1", TCP443, Dropped, "service subnet")]);
    Ok(())
}

async fn grants_are_back_within_a_second_after_ovn_controller_restarts(ovn: Ovn) -> Result<()> {
    let n = node(ovn, google()).await?;
    n.dns(&n.pod1, "google.com", &[], &["142.250.1.1", "142.250.1.2"]);
    n.dns(&n.pod1, "google.com", &[], &["2a00:1450:4001::1"]);
    n.settle(3).await?;
    let before = n.engine.metrics_snapshot();
    let restarted = Instant::now();
    block_in_place(|| n.sb.restart_ovn_controller())?;
    // The wipe happens when ovn-controller reconnects; the engine sees it on its flow monitor.
    poll(Duration::from_secs(10), || {
        n.engine.metrics_snapshot().flows_reinstalled >= before.flows_reinstalled + 3
    })
    .await?;
    let wiped = Instant::now();
    n.settle(3).await?;
    let back = wiped.elapsed();
    assert!(
        back < Duration::from_secs(1),
        "reinstalled {back:?} after the wipe was seen"
    );
    block_in_place(|| n.sb.sync())?;
    n.expect(&[
        (&n.pod1, "142.250.1.1", TCP443, Forwarded, "v4 back"),
        (&n.pod1, "2a00:1450:4001::1", TCP443, Forwarded, "v6 back"),
    ]);
    assert_eq!(Some(n.flows().len()), flows_for_grants(&n.engine));
    eprintln!(
        "ovn-controller restart to grants back: {:?}",
        restarted.elapsed()
    );
    Ok(())
}

async fn a_restarted_engine_adopts_its_flows_and_removes_only_what_the_cluster_disallows(
    ovn: Ovn,
) -> Result<()> {
    let n = node(ovn, google()).await?;
    n.dns(&n.pod1, "google.com", &[], &["142.250.1.1", "142.250.1.2"]);
    n.dns(&n.pod2, "google.com", &[], &["142.250.1.3"]);
    n.settle(3).await?;
    let per_grant = flows_for_grants(&n.engine).expect("a template") / 3;
    n.task.abort();
    let sb = Arc::clone(&n.sb);
    let (pod1, pod2) = (n.pod1.clone(), n.pod2.clone());
    drop(n);
    let prefix = settings().cookie_prefix;
    let ours = || block_in_place(|| sb.dnsflow_flows(prefix));

    // The new run hears again only part of the answers (tapd's replay of still-valid ones), and pod2
    // was deleted while flowd was away. Until the cluster is listed, nothing is removed.
    let (engine, task) = start_engine(&sb, settings(), &google(), &[&pod1]);
    engine.on_dns(
        answer(pod1.ipv4, "google.com", &[], &["142.250.1.1"]),
        Instant::now(),
    );
    engine.reconcile().await?;
    assert_eq!(
        ours()?.len(),
        3 * per_grant,
        "every flow adopted: {:#?}",
        ours()?
    );
    assert_eq!(engine.metrics_snapshot().flows_adopted, 2);
    expect_traces(
        &sb,
        &[
            (&pod1, "142.250.1.1", TCP443, Forwarded, "heard again"),
            (&pod1, "142.250.1.2", TCP443, Forwarded, "adopted"),
            (
                &pod2,
                "142.250.1.3",
                TCP443,
                Forwarded,
                "adopted, cluster not listed yet",
            ),
        ],
    );

    // Listed: the flow of the deleted pod goes; the one its rule still allows stays until OVS idles it.
    engine.synced();
    engine.flush().await?;
    assert_eq!(ours()?.len(), 2 * per_grant, "{:#?}", ours()?);
    expect_traces(
        &sb,
        &[
            (&pod1, "142.250.1.1", TCP443, Forwarded, "kept"),
            (
                &pod1,
                "142.250.1.2",
                TCP443,
                Forwarded,
                "its rule is unchanged",
            ),
            (&pod2, "142.250.1.3", TCP443, Dropped, "its pod is gone"),
        ],
    );
    engine.reconcile().await?;
    assert_eq!(
        ours()?.len(),
        2 * per_grant,
        "no duplicate, nothing re-adopted"
    );

    // The rule at its priority changes: the adopted flow goes with the one no answer allows any more.
    engine.set_rules(rules(json!([
        {"type": "Allow", "to": {"dnsName": "example.com"}},
        {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}
    ])));
    engine.flush().await?;
    task.abort();
    assert_eq!(ours()?.len(), 0, "{:#?}", ours()?);
    expect_traces(
        &sb,
        &[(&pod1, "142.250.1.2", TCP443, Dropped, "rule changed")],
    );
    Ok(())
}

async fn an_idle_flow_leaves_ovs_and_the_engine(ovn: Ovn) -> Result<()> {
    let quick = EngineSettings {
        idle_floor: Duration::ZERO,
        idle_grace: Duration::ZERO,
        ..settings()
    };
    let n = node_with(ovn, google(), quick).await?;
    let mut short = answer(n.pod1.ipv4, "google.com", &[], &["142.250.1.1"]);
    short.answers[0].ttl = 1;
    n.engine.on_dns(short, Instant::now());
    n.dns(&n.pod1, "google.com", &[], &["142.250.1.2"]);
    n.settle(2).await?;
    n.expect(&[(&n.pod1, "142.250.1.1", TCP443, Forwarded, "before expiry")]);
    // OVS checks idle timeouts about once a second.
    poll(Duration::from_secs(5), || {
        n.engine.grants(None, None).len() == 1
    })
    .await?;
    assert_eq!(Some(n.flows().len()), flows_for_grants(&n.engine));
    n.expect(&[
        (&n.pod1, "142.250.1.1", TCP443, Dropped, "expired"),
        (&n.pod1, "142.250.1.2", TCP443, Forwarded, "still valid"),
    ]);
    let m = n.engine.metrics_snapshot();
    assert_eq!((m.flows_expired, m.flows_reinstalled), (1, 0));
    Ok(())
}

async fn a_removed_pods_flows_are_gone(ovn: Ovn) -> Result<()> {
    let n = node(ovn, google()).await?;
    n.dns(
        &n.pod1,
        "google.com",
        &[],
        &["142.250.1.1", "2a00:1450:4001::1"],
    );
    n.dns(&n.pod2, "google.com", &[], &["142.250.1.1"]);
    n.settle(3).await?;
    n.engine.remove_pod(&n.pod1.key);
    n.settle(1).await?;
    n.expect(&[
        (&n.pod1, "142.250.1.1", TCP443, Dropped, "removed pod"),
        (
            &n.pod2,
            "142.250.1.1",
            TCP443,
            Forwarded,
            "the other pod keeps its grant",
        ),
    ]);
    assert!(n.flows()[0].contains(&format!("nw_src={}", n.pod2.ipv4)));
    Ok(())
}

/// The first packet passes, on real packets: flowd's hold flow in OVN's delivery table pauses the
/// pod's DNS reply to flowd's own OpenFlow connection; the holder reads the answer, the engine
/// writes its grant, and only then is the reply sent on: at the instant of the resume, before the
/// pod has the reply, every flow of the grant is in br-int and a packet to the answer is traced
/// forwarded. The pod receives it exactly once, no deadline was missed; a reply that grants
/// nothing goes on too.
async fn a_held_dns_reply_reaches_the_pod_after_its_grant(ovn: Ovn) -> Result<()> {
    use flowd::{
        engine::NotHeld,
        hold::{hold_cookie_prefix, HoldFlows, HoldReport},
    };
    let rules = google();
    let (sb, pod1, dns, other) = block_in_place(|| -> Result<_> {
        let (sb, pod1) = one_pod(ovn)?;
        let dns = sb.add_dns_server()?;
        // A pod in a namespace without EgressFirewall: never held.
        let other = sb.add_pod("ns2", "free", 7)?;
        Ok((Arc::new(sb), pod1, dns, other))
    })?;
    let native = sb.native();
    let packet_ins = native.packet_ins();
    let (engine, task) = holding_engine(native, rules, &[&pod1, &other]).await?;
    let report = Arc::new(HoldReport::on(Duration::from_secs(2)));
    let mut holds = HoldFlows::new(
        engine.clone(),
        Duration::from_secs(2),
        crate::sandbox::kube_dns(),
    )
    .reporting_to(report.clone());
    assert_eq!(holds.refresh().await.map_err(anyhow::Error::msg)?, 1);
    // What Explain says of each pod.
    let (held, why) = report.explain(engine.hold_candidate(&pod1.key));
    assert!(held, "{why}");
    assert_eq!(
        report.explain(engine.hold_candidate(&other.key)),
        (
            false,
            format!("its DNS responses are not held: {}", NotHeld::NoDnsRule)
        )
    );
    let prefix = settings().cookie_prefix;
    let hold_flows = || block_in_place(|| sb.dnsflow_flows(hold_cookie_prefix(prefix)));
    let held = hold_flows()?;
    assert!(
        held.iter().all(|f| f.contains("table=65")
            && f.contains("ct_state=+est+rpl+trk")
            && f.contains("actions=")
            && f.ends_with("ct_clear,resubmit(,65)")),
        "{held:#?}"
    );
    let at = |priority: u16| -> Vec<&String> {
        held.iter()
            .filter(|f| f.contains(&format!("priority={priority},")))
            .collect()
    };
    // Replies from kube-dns's address (IPv4 only here), over UDP and TCP, to any port: paused.
    let holding = at(110);
    assert_eq!(holding.len(), 2, "{held:#?}");
    assert!(
        holding.iter().all(|f| f.contains("nw_src=10.96.0.10")
            && f.contains("tp_src=53")
            && !f.contains("reg15")
            && f.contains("controller(")),
        "{held:#?}"
    );
    assert!(
        holding
            .iter()
            .any(|f| f.contains(",tcp,") || f.contains(" tcp,")),
        "{held:#?}"
    );
    // The pod of a namespace without a dnsName rule passes them: each family, UDP and TCP.
    let passing = at(111);
    assert_eq!(passing.len(), 4, "{held:#?}");
    assert!(
        passing.iter().all(|f| !f.contains("controller(")),
        "{held:#?}"
    );
    // Pod1's replies from any other server are counted, per family.
    let counting = at(105);
    assert_eq!(counting.len(), 2, "{held:#?}");
    assert!(
        counting.iter().all(|f| !f.contains("controller(")),
        "{held:#?}"
    );
    let (metrics, witness) = spawn_holder(&engine, packet_ins, &sb, &pod1);
    let variants = engine.template().map(|t| t.variants(true).len());

    let reply = |qname: &str, answer: [u8; 4]| -> Result<Vec<u8>> {
        let payload = crate::sandbox::dns_answer(qname, answer.into())?;
        crate::sandbox::udp_frame(&dns, &pod1, (53, 40000), &payload)
    };
    // To the kube-dns Service: the reply reaches the pod from its address, after conntrack's
    // un-DNAT, and only such replies are held.
    let query = crate::sandbox::Udp {
        dl_dst: crate::sandbox::ROUTER_MAC,
        dst: ip(crate::sandbox::KUBE_DNS_VIP),
        src_port: 40000,
        dst_port: 53,
    };
    // Sends the query and its reply; waits until the pod's port has transmitted the reply and
    // `resumed` replies have been sent on by the holder. Returns what the pod had received before.
    let exchange = |qname: &'static str, answer: [u8; 4], resumed: u64| {
        let (sb, pod1, dns, query, metrics) = (&sb, &pod1, &dns, &query, &metrics);
        let reply = &reply;
        async move {
            let received = block_in_place(|| sb.port_stats(pod1))?.tx;
            block_in_place(|| -> Result<()> {
                sb.send_udp(pod1, query)?;
                sb.send_frames(dns, &[reply(qname, answer)?])
            })?;
            poll(Duration::from_secs(10), || {
                metrics.resumed.get() == resumed
                    && block_in_place(|| sb.port_stats(pod1)).is_ok_and(|s| s.tx == received + 1)
            })
            .await
            .map_err(|e| anyhow::anyhow!("{qname}: {e}; held {}", metrics.held.get()))?;
            Ok::<_, anyhow::Error>(received)
        }
    };
    for (i, (qname, answer, granted)) in [
        ("www.google.com.", [142, 250, 9, 9], true),
        ("www.other.test.", [198, 51, 100, 9], false),
    ]
    .into_iter()
    .enumerate()
    {
        let received = exchange(qname, answer, i as u64 + 1).await?;
        let dst = IpAddr::from(answer);
        // Seen at the resume, not after the delivery: the pod had not had the reply yet, and the
        // grant was already whole in br-int and forwarding.
        let variants = variants.ok_or_else(|| anyhow::anyhow!("no template"))?;
        assert_eq!(
            witness.seen().get(i).cloned(),
            Some(resumed_after_grant(dst, granted, variants, received)),
            "{qname}: br-int at the instant the held reply was sent on; granted before the pod \
             had its answer"
        );
        let flows = block_in_place(|| sb.dnsflow_flows(prefix))?;
        assert_eq!(
            flows.iter().any(|f| f.contains(&format!("nw_dst={dst}"))),
            granted,
            "{qname}: {flows:#?}"
        );
        let want = if granted {
            Trace::Forwarded
        } else {
            Trace::Dropped
        };
        assert_eq!(
            block_in_place(|| sb.trace(&pod1, dst, TCP443))?,
            want,
            "{qname}"
        );
    }
    assert_eq!(
        (
            metrics.held.get(),
            metrics.deadline_misses.get(),
            metrics.unreadable.get()
        ),
        (2, 0, 0)
    );
    // The packet-ins went to flowd's controller id only: ovn-controller's pinctrl saw none of them.
    let log = std::fs::read_to_string(sb.path().join("ovn-controller.log"))?;
    assert!(
        !log.lines()
            .any(|l| l.contains("pinctrl") && l.contains("|WARN|")),
        "{log}"
    );

    // Not renewed (a flowd that died), the hold flows end at their hard timeout, and DNS goes to
    // the pod unheld.
    poll(Duration::from_secs(10), || {
        hold_flows().is_ok_and(|f| f.is_empty())
    })
    .await?;
    exchange("www3.google.com.", [142, 250, 9, 10], 2).await?;
    assert_eq!(metrics.held.get(), 2, "not held");
    assert_eq!(witness.seen().len(), 2, "not resumed either");
    // Renewed, then cleared as at a clean shutdown.
    holds.refresh().await.map_err(anyhow::Error::msg)?;
    assert_eq!(hold_flows()?.len(), 8);
    holds.clear().await.map_err(anyhow::Error::msg)?;
    assert!(hold_flows()?.is_empty());

    // Running as in the daemon: a pod that appears is held within about a second (not at the next
    // renewal, ten minutes away here), and a clean shutdown removes every hold flow.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(
        HoldFlows::new(
            engine.clone(),
            Duration::from_secs(1800),
            crate::sandbox::kube_dns(),
        )
        .run(async {
            let _ = stopped.await;
        }),
    );
    poll(Duration::from_secs(10), || {
        hold_flows().is_ok_and(|f| f.len() == 8)
    })
    .await?;
    let pod3 = block_in_place(|| sb.add_pod(NS, "pod3", 8))?;
    engine.upsert_pod(pod3.info());
    engine.flush().await?;
    poll(Duration::from_secs(10), || {
        hold_flows().is_ok_and(|f| f.len() == 10)
    })
    .await
    .map_err(|e| anyhow::anyhow!("pod3 not held: {e}"))?;
    // ovn-controller reconnecting deletes every flow in br-int, the hold flows with the rest: they
    // are back within seconds of OVN's own (seen through the grants' monitor), not at the renewal.
    block_in_place(|| sb.restart_ovn_controller())?;
    poll(Duration::from_secs(20), || {
        hold_flows().is_ok_and(|f| f.len() == 10)
    })
    .await
    .map_err(|e| anyhow::anyhow!("hold flows not back after the wipe: {e}"))?;
    let _ = stop.send(());
    running.await?;
    assert!(hold_flows()?.is_empty(), "cleared at shutdown");
    task.abort();
    Ok(())
}

/// CoreDNS on another node: the query leaves through the Geneve tunnel, the load balancer's DNAT
/// committed in the pod's conntrack zone here; the reply comes back in Geneve straight into this
/// node's switch's egress pipeline (node2 ran the ingress ones), is un-NATed in that zone, and meets
/// the same hold flow in the delivery table as a local CoreDNS's reply: held, granted, resumed,
/// and granted already at the instant it was resumed, before the pod had it.
async fn a_dns_reply_from_another_node_over_geneve_is_held_too(ovn: Ovn) -> Result<()> {
    use crate::sandbox::{dns_answer, Udp, KUBE_DNS_VIP, ROUTER_MAC};
    let (sb, pod1, dns) = block_in_place(|| -> Result<_> {
        let (sb, pod1) = one_pod(ovn)?;
        let dns = sb.add_remote_dns_server()?;
        Ok((Arc::new(sb), pod1, dns))
    })?;
    let native = sb.native();
    let packet_ins = native.packet_ins();
    let (engine, task) = holding_engine(native, google(), &[&pod1]).await?;
    let mut holds = flowd::hold::HoldFlows::new(
        engine.clone(),
        Duration::from_secs(30),
        crate::sandbox::kube_dns(),
    );
    assert_eq!(holds.refresh().await.map_err(anyhow::Error::msg)?, 1);
    let (metrics, witness) = spawn_holder(&engine, packet_ins, &sb, &pod1);

    let vip = ip(KUBE_DNS_VIP);
    let query = Udp {
        dl_dst: ROUTER_MAC,
        dst: vip,
        src_port: 40000,
        dst_port: 53,
    };
    let (sent, received) = block_in_place(|| -> Result<_> {
        let sent = sb.underlay_sent(&dns)?;
        let received = sb.port_stats(&pod1)?.tx;
        sb.send_udp(&pod1, &query)?;
        Ok((sent, received))
    })?;
    poll(Duration::from_secs(10), || {
        block_in_place(|| sb.underlay_sent(&dns)).is_ok_and(|n| n == sent + 1)
    })
    .await
    .map_err(|e| anyhow::anyhow!("the query did not leave through the tunnel: {e}"))?;

    let answer = IpAddr::from([142, 250, 9, 9]);
    assert_eq!(block_in_place(|| sb.trace(&pod1, answer, TCP443))?, Dropped);
    block_in_place(|| {
        let payload = dns_answer("www.google.com.", [142, 250, 9, 9].into())?;
        sb.send_from_remote_dns(&dns, &pod1, 40000, &payload)
    })?;
    poll(Duration::from_secs(10), || {
        metrics.resumed.get() == 1
            && block_in_place(|| sb.port_stats(&pod1)).is_ok_and(|s| s.tx == received + 1)
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "the reply was not held and delivered: {e}; held {}, resumed {}",
            metrics.held.get(),
            metrics.resumed.get()
        )
    })?;
    assert_eq!(
        (
            metrics.held.get(),
            metrics.deadline_misses.get(),
            metrics.unreadable.get()
        ),
        (1, 0, 0)
    );
    let variants = engine
        .template()
        .map(|t| t.variants(true).len())
        .ok_or_else(|| anyhow::anyhow!("no template"))?;
    assert_eq!(
        witness.seen(),
        [resumed_after_grant(answer, true, variants, received)],
        "br-int at the instant the held reply was sent on: granted before the pod had its answer"
    );
    holds.clear().await.map_err(anyhow::Error::msg)?;
    task.abort();
    Ok(())
}

/// An engine on this node's `pods` under `rules`, running, once it has learned the template and
/// holds exactly one pod (the first).
async fn holding_engine<P: flowd::ovs::FlowProgrammer>(
    programmer: P,
    rules: FirewallRules,
    pods: &[&Pod],
) -> Result<(Engine<P>, JoinHandle<()>)> {
    let engine = Engine::new(settings(), programmer);
    engine.set_node(Sandbox::NODE);
    engine.set_rules(rules);
    for pod in pods {
        engine.upsert_pod(pod.info());
    }
    let task = tokio::spawn(engine.clone().run());
    engine.flush().await?;
    poll(Duration::from_secs(10), || {
        engine.template().is_some() && engine.held_pods().len() == 1
    })
    .await?;
    Ok((engine, task))
}

/// The holder of `engine`'s held packets, resuming over its own connection (deadline 2 s) through
/// a [`Witness`] of `pod`'s side, running; returns what it counts and the witness.
fn spawn_holder(
    engine: &Engine<Native>,
    packet_ins: tokio::sync::mpsc::Receiver<dnsflow_openflow::PacketIn2>,
    sb: &Arc<Sandbox>,
    pod: &Pod,
) -> (
    Arc<flowd::hold::HoldMetrics>,
    Arc<Witness<Engine<Native>, Native>>,
) {
    let witness = Arc::new(Witness::new(engine.clone(), engine, sb, pod).unwrap());
    let holder = flowd::hold::Holder::new(
        engine.clone(),
        witness.clone(),
        Duration::from_secs(2),
        crate::sandbox::kube_dns(),
    );
    let metrics = holder.metrics().clone();
    tokio::spawn(holder.run(packet_ins));
    (metrics, witness)
}

/// What br-int looked like for one answer of a held reply at the instant the holder sent the reply
/// on.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AnswerAtResume {
    dst: IpAddr,
    /// OVS had acknowledged the bundle with the grant: read from the engine at the very instant of
    /// the resume, before anything else (a grant written a millisecond after the resume is in
    /// br-int by the time `ovs-ofctl` below has looked).
    written: bool,
    /// A TCP/443 packet from the pod to `dst`, traced at once over ovs-vswitchd's control socket
    /// (well under a millisecond after the resume), met one of flowd's grant flows.
    met_grant: bool,
    /// The pod's flows to `dst` in br-int (one per variant of the template when granted).
    flows: usize,
    /// A TCP/443 packet from the pod to `dst`, traced.
    trace: Trace,
}

/// One resume as [`Witness`] saw it, before it let the reply go.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AtResume {
    answers: Vec<AnswerAtResume>,
    /// Packets br-int had delivered to the pod by then: the reply still held is not among them.
    delivered: u64,
}

/// The holder's resumer, wrapped: at each resume, before passing it on to `inner`, it records
/// whether each answer's grant was written at that instant, what a packet from the pod to it
/// meets in br-int while the reply is still held, and how many packets the pod had received. A
/// holder that sends a reply on before its grant is in OVS is caught in the act, whatever OVS
/// holds a moment later.
struct Witness<R, P: flowd::ovs::FlowProgrammer> {
    inner: R,
    engine: Engine<P>,
    sb: Arc<Sandbox>,
    appctl: std::sync::Mutex<Appctl>,
    pod: Pod,
    seen: std::sync::Mutex<Vec<Result<AtResume, String>>>,
}

impl<R, P: flowd::ovs::FlowProgrammer> Witness<R, P> {
    fn new(inner: R, engine: &Engine<P>, sb: &Arc<Sandbox>, pod: &Pod) -> Result<Self> {
        Ok(Self {
            inner,
            engine: engine.clone(),
            sb: sb.clone(),
            appctl: std::sync::Mutex::new(Appctl::connect(sb)?),
            pod: pod.clone(),
            seen: std::sync::Mutex::default(),
        })
    }

    fn look(&self, held: &dnsflow_openflow::PacketIn2) -> Result<AtResume> {
        let written: Vec<IpAddr> = self
            .engine
            .grants(Some(&self.pod.key), None)
            .into_iter()
            .filter(|g| g.installed)
            .map(|g| g.key.dst)
            .collect();
        let (reply, _) = dnsflow_dnstap::packet::response(
            &held.packet,
            "witness",
            std::time::SystemTime::now(),
        )?;
        let grant_cookie = format!("cookie {:#x}", u64::from(settings().cookie_prefix) << 32);
        let grant_cookie = &grant_cookie[..grant_cookie.len() - 8];
        let met_grant = {
            let mut appctl = self.appctl.lock().unwrap();
            reply
                .answers
                .iter()
                .map(|a| {
                    let trace = appctl.trace(&self.pod, a.ip)?;
                    Ok(trace.contains(grant_cookie))
                })
                .collect::<Result<Vec<bool>>>()?
        };
        let flows = self.sb.dnsflow_flows(settings().cookie_prefix)?;
        let src = format!("nw_src={},", self.pod.ipv4);
        let answers = reply
            .answers
            .iter()
            .zip(met_grant)
            .map(|(a, met_grant)| {
                let dst = format!("nw_dst={}", a.ip);
                Ok(AnswerAtResume {
                    dst: a.ip,
                    written: written.contains(&a.ip),
                    met_grant,
                    flows: flows
                        .iter()
                        .filter(|f| f.contains(&src) && f.contains(&dst))
                        .count(),
                    trace: self.sb.trace(&self.pod, a.ip, TCP443)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AtResume {
            answers,
            delivered: self.sb.port_stats(&self.pod)?.tx,
        })
    }

    /// What it saw at each resume so far, in order (or why it could not look).
    fn seen(&self) -> Vec<Result<AtResume, String>> {
        self.seen.lock().unwrap().clone()
    }
}

impl<R: flowd::hold::Resumer, P: flowd::ovs::FlowProgrammer> flowd::hold::Resumer
    for Witness<R, P>
{
    async fn resume(&self, held: &dnsflow_openflow::PacketIn2) -> Result<(), String> {
        // The reply goes on in any case: a look that failed fails the test, not the exchange.
        let seen = block_in_place(|| self.look(held)).map_err(|e| format!("{e:#}"));
        self.seen.lock().unwrap().push(seen);
        self.inner.resume(held).await
    }

    async fn revalidation(&self) -> Option<flowd::ovs::unixctl::Revalidation> {
        self.inner.revalidation().await
    }
}

/// ovs-vswitchd's control socket, connected once: what `ovs-appctl` speaks, without starting a
/// process per call, so that a trace is taken well under a millisecond after it is asked for.
struct Appctl {
    stream: std::os::unix::net::UnixStream,
    id: u64,
}

impl Appctl {
    fn connect(sb: &Sandbox) -> Result<Self> {
        let socket = flowd::ovs::unixctl::vswitchd_socket(sb.path())?;
        Ok(Self {
            stream: std::os::unix::net::UnixStream::connect(socket)?,
            id: 0,
        })
    }

    /// `ovs-appctl ofproto/trace` of a TCP/443 packet from `pod` to `dst` (IPv4), as
    /// [`Sandbox::trace`] traces it: its whole text.
    fn trace(&mut self, pod: &Pod, dst: IpAddr) -> Result<String> {
        use std::io::Write as _;
        let flow = format!(
            "in_port={},dl_src={},dl_dst={},tcp,nw_src={},nw_dst={dst},nw_ttl=64,tcp_src=40000,tcp_dst=443",
            pod.ofport,
            pod.mac,
            crate::sandbox::ROUTER_MAC,
            pod.ipv4
        );
        let ct = ["--ct-next", "trk,new"];
        let params = [&["br-int", &flow][..], &ct, &ct, &ct].concat();
        self.id += 1;
        let request = json!({"id": self.id, "method": "ofproto/trace", "params": params});
        self.stream.write_all(request.to_string().as_bytes())?;
        let reply = serde_json::Deserializer::from_reader(std::io::BufReader::new(&self.stream))
            .into_iter::<serde_json::Value>()
            .next()
            .ok_or_else(|| anyhow::anyhow!("ovs-vswitchd closed its control socket"))??;
        match (&reply["result"], &reply["error"]) {
            (serde_json::Value::String(text), serde_json::Value::Null) => Ok(text.clone()),
            _ => anyhow::bail!("ofproto/trace {flow}: {reply}"),
        }
    }
}

/// A witnessed resume of a reply that granted `dst` (`granted`: written, all `variants` flows,
/// traced forwarded) or nothing (no flow, dropped), while the pod had received `delivered`
/// packets.
fn resumed_after_grant(
    dst: IpAddr,
    granted: bool,
    variants: usize,
    delivered: u64,
) -> Result<AtResume, String> {
    Ok(AtResume {
        answers: vec![AnswerAtResume {
            dst,
            written: granted,
            met_grant: granted,
            flows: if granted { variants } else { 0 },
            trace: if granted { Forwarded } else { Dropped },
        }],
        delivered,
    })
}

/// The native driver with its writes stalled while `stall` is set: a flowd that cannot get its
/// grants into OVS in time.
struct Stalling {
    inner: Native,
    stall: Arc<std::sync::atomic::AtomicBool>,
}

impl flowd::ovs::FlowProgrammer for Stalling {
    async fn apply(&self, ops: &[flowd::ovs::FlowOp]) -> flowd::ovs::Result<()> {
        while self.stall.load(std::sync::atomic::Ordering::Relaxed) {
            // A poll of the test's switch: the write waits for as long as the test stalls it.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.inner.apply(ops).await
    }

    async fn dump(&self, prefix: u32) -> flowd::ovs::Result<Vec<flowd::ovs::ParsedFlow>> {
        self.inner.dump(prefix).await
    }

    async fn monitor(
        &self,
        table: u8,
    ) -> flowd::ovs::Result<tokio::sync::mpsc::Receiver<flowd::ovs::FlowEvent>> {
        self.inner.monitor(table).await
    }

    async fn learn_template(
        &self,
        priority_base: u16,
        table: Option<u8>,
    ) -> flowd::ovs::Result<Result<flowd::ovs::Template, flowd::ovs::LearnError>> {
        self.inner.learn_template(priority_base, table).await
    }

    async fn port_keys(
        &self,
        iface_ids: &[String],
    ) -> flowd::ovs::Result<std::collections::HashMap<String, flowd::ovs::PortKeys>> {
        self.inner.port_keys(iface_ids).await
    }
}

/// Resumes over the stalled engine's own connection (its writes stall, its resumes do not).
struct ResumeVia(Engine<Stalling>);

impl flowd::hold::Resumer for ResumeVia {
    async fn resume(&self, held: &dnsflow_openflow::PacketIn2) -> Result<(), String> {
        flowd::hold::Resumer::resume(&self.0.programmer().inner, held).await
    }
}

/// A flowd whose grant cannot reach OVS in time still lets the held reply go at the deadline:
/// the pod gets its answer about 100 ms late, the miss is counted, and the grant follows once
/// OVS takes it.
async fn a_stalled_grant_write_lets_the_held_reply_go_at_the_deadline(ovn: Ovn) -> Result<()> {
    use flowd::{
        hold::{hold_cookie_prefix, Holder, HOLD_PRIORITY},
        ovs::{Cookie, FlowOp, FlowProgrammer, HoldSpec},
    };
    const DEADLINE: Duration = Duration::from_millis(100);
    let (sb, pod1, dns) = block_in_place(|| -> Result<_> {
        let (sb, pod1) = one_pod(ovn)?;
        let dns = sb.add_dns_server()?;
        Ok((Arc::new(sb), pod1, dns))
    })?;
    let native = sb.native();
    let packet_ins = native.packet_ins();
    let stall = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stalling = Stalling {
        inner: native,
        stall: stall.clone(),
    };
    let (engine, task) = holding_engine(stalling, google(), &[&pod1]).await?;
    // The hold flow for kube-dns's replies, written beside the stalled connection as HoldFlows
    // would write it.
    let ofctl = sb.ofctl();
    let table = ovn.delivery_table();
    ofctl
        .apply(&[FlowOp::Hold(HoldSpec {
            cookie: Cookie::new(
                hold_cookie_prefix(settings().cookie_prefix),
                0,
                HOLD_PRIORITY,
            ),
            table,
            priority: HOLD_PRIORITY,
            v6: false,
            tcp: false,
            from: Some(std::net::SocketAddr::new(
                ip(crate::sandbox::KUBE_DNS_VIP),
                53,
            )),
            to: None,
            pause: Some(flowd::ovs::native::CONTROLLER_ID),
            hard_timeout: 60,
        })])
        .await?;
    // The connection that takes the packet-ins (the daemon connects at start).
    engine.programmer().inner.connect().await?;
    let witness = Arc::new(Witness::new(
        ResumeVia(engine.clone()),
        &engine,
        &sb,
        &pod1,
    )?);
    let holder = Holder::new(
        engine.clone(),
        witness.clone(),
        DEADLINE,
        crate::sandbox::kube_dns(),
    );
    let metrics = holder.metrics().clone();
    tokio::spawn(holder.run(packet_ins));

    stall.store(true, std::sync::atomic::Ordering::Relaxed);
    let before = block_in_place(|| sb.port_stats(&pod1))?.tx;
    let payload = crate::sandbox::dns_answer("www.google.com.", [142, 250, 9, 9].into())?;
    let reply = crate::sandbox::udp_frame(&dns, &pod1, (53, 40000), &payload)?;
    // To the kube-dns Service: the reply reaches the pod from its address, after conntrack's
    // un-DNAT, and only such replies are held.
    let query = crate::sandbox::Udp {
        dl_dst: crate::sandbox::ROUTER_MAC,
        dst: ip(crate::sandbox::KUBE_DNS_VIP),
        src_port: 40000,
        dst_port: 53,
    };
    block_in_place(|| sb.send_udp(&pod1, &query))?;
    let sent = Instant::now();
    block_in_place(|| sb.send_frames(&dns, &[reply]))?;
    poll(Duration::from_secs(5), || {
        block_in_place(|| sb.port_stats(&pod1)).is_ok_and(|s| s.tx > before)
    })
    .await
    .map_err(|e| anyhow::anyhow!("the held reply never reached the pod: {e}"))?;
    let waited = sent.elapsed();
    eprintln!("{ovn:?}: with the grant stalled, the reply reached the pod after {waited:?}");
    assert!(
        waited >= DEADLINE && waited < Duration::from_secs(1),
        "{waited:?}"
    );
    assert_eq!((metrics.held.get(), metrics.deadline_misses.get()), (1, 1));
    assert_eq!(
        witness.seen(),
        [resumed_after_grant(ip("142.250.9.9"), false, 0, before)],
        "br-int at the instant the held reply was sent on: no grant yet"
    );
    let granted = || {
        block_in_place(|| sb.dnsflow_flows(settings().cookie_prefix))
            .is_ok_and(|f| f.iter().any(|f| f.contains("nw_dst=142.250.9.9")))
    };
    assert!(!granted(), "nothing written while stalled");
    stall.store(false, std::sync::atomic::Ordering::Relaxed);
    poll(Duration::from_secs(10), granted)
        .await
        .map_err(|e| anyhow::anyhow!("the grant never followed: {e}"))?;
    task.abort();
    Ok(())
}

/// A DHCPDISCOVER from `pod`: broadcast from 0.0.0.0:68 to 255.255.255.255:67, its MAC as chaddr.
fn dhcp_discover(pod: &Pod) -> Result<Vec<u8>> {
    let mac: Vec<u8> = pod
        .mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()?;
    let mac: [u8; 6] = mac.try_into().map_err(|_| anyhow::anyhow!("MAC"))?;
    // op, htype, hlen, hops; xid; secs; flags (broadcast); ciaddr, yiaddr, siaddr, giaddr.
    let mut bootp = vec![1, 1, 6, 0, 0xd5, 0xf1, 0x00, 0x01, 0, 0, 0x80, 0];
    bootp.extend([0; 16]);
    bootp.extend(mac);
    bootp.extend([0; 10 + 64 + 128]);
    // The DHCP magic cookie, message type DISCOVER, end.
    bootp.extend([99, 130, 83, 99, 53, 1, 1, 255]);
    let builder = etherparse::PacketBuilder::ethernet2(mac, [0xff; 6])
        .ipv4([0; 4], [255; 4], 64)
        .udp(68, 67);
    let mut frame = Vec::with_capacity(builder.size(bootp.len()));
    builder.write(&mut frame, &bootp)?;
    Ok(frame)
}

/// A DNS query for `qname` A.
fn dns_query(qname: &str) -> Result<Vec<u8>> {
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{Name, RecordType},
    };
    let mut m = Message::new(11, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(qname.parse::<Name>()?, RecordType::A));
    Ok(m.to_vec()?)
}

/// ovn-controller's own `controller()` actions work while flowd holds the pod's DNS on the same
/// bridge: its DHCP server answers the pod's DISCOVER, the router's `arp` resolves a next hop, and
/// its native DNS (`dns_lookup`) answers a name from the switch's DNS records, from the address the
/// pod asked: not the kube-dns Service, so flowd neither holds nor grants it, and counts it. flowd's
/// controller id keeps each side's packet-ins its own: ovn-controller's log has no complaint about a
/// packet it did not expect.
async fn ovn_controllers_own_packet_ins_work_beside_the_hold(ovn: Ovn) -> Result<()> {
    use flowd::hold::HoldFlows;
    let (sb, pod1, dns, free) = block_in_place(|| -> Result<_> {
        let (sb, pod1) = one_pod(ovn)?;
        let dns = sb.add_dns_server()?;
        // A pod without EgressFirewall, whose packets reach the router.
        let free = sb.add_pod("ns2", "free", 7)?;
        let dhcp = sb.nbctl(&[
            "create",
            "dhcp_options",
            "cidr=10.244.1.0/24",
            "options:lease_time=3600",
            "options:router=10.244.1.1",
            "options:server_id=10.244.1.1",
            &format!("options:server_mac={}", crate::sandbox::ROUTER_MAC),
        ])?;
        sb.nbctl(&["lsp-set-dhcpv4-options", &pod1.key.iface_id(), dhcp.trim()])?;
        // A port on the exit switch, to see what ovn-controller sends there.
        sb.vsctl(&[
            "add-port",
            "br-int",
            "pexit",
            "--",
            "set",
            "interface",
            "pexit",
            "type=internal",
            "external_ids:iface-id=exthost",
        ])?;
        let records = sb.nbctl(&["create", "dns", "records:db.google.com=142.250.77.1"])?;
        sb.nbctl(&[
            "add",
            "logical_switch",
            "node1",
            "dns_records",
            records.trim(),
        ])?;
        sb.sync()?;
        Ok((Arc::new(sb), pod1, dns, free))
    })?;
    let native = sb.native();
    let packet_ins = native.packet_ins();
    let (engine, task) = holding_engine(native, google(), &[&pod1]).await?;
    let mut holds = HoldFlows::new(
        engine.clone(),
        Duration::from_secs(60),
        crate::sandbox::kube_dns(),
    );
    assert_eq!(holds.refresh().await.map_err(anyhow::Error::msg)?, 1);
    let (metrics, witness) = spawn_holder(&engine, packet_ins, &sb, &pod1);
    let delivered = |before: u64| {
        let (sb, pod1) = (&sb, &pod1);
        poll(Duration::from_secs(10), move || {
            block_in_place(|| sb.port_stats(pod1)).is_ok_and(|s| s.tx > before)
        })
    };

    let before = block_in_place(|| sb.port_stats(&pod1))?.tx;
    block_in_place(|| sb.send_frames(&pod1, &[dhcp_discover(&pod1)?]))?;
    delivered(before)
        .await
        .map_err(|e| anyhow::anyhow!("no DHCPOFFER reached the pod: {e}"))?;
    let log = || std::fs::read_to_string(sb.path().join("ovn-controller.log"));
    assert!(log()?.contains("DHCPOFFER"), "{}", log()?);

    let before_dns = block_in_place(|| sb.port_stats(&pod1))?.tx;
    let query = crate::sandbox::udp_frame(&pod1, &dns, (40002, 53), &dns_query("db.google.com.")?)?;
    block_in_place(|| sb.send_frames(&pod1, &[query]))?;
    delivered(before_dns)
        .await
        .map_err(|e| anyhow::anyhow!("OVN's DNS answer did not reach the pod: {e}"))?;
    // The router resolving a next hop it has no MAC for (100.64.0.99 on the exit switch): OVN's
    // `arp` action, a packet-in to ovn-controller, which broadcasts the request on that switch.
    let exit_tx = || -> Result<u64> {
        let n =
            block_in_place(|| sb.vsctl(&["get", "interface", "pexit", "statistics:tx_packets"]))?;
        Ok(n.trim().parse()?)
    };
    let before = exit_tx()?;
    let to_unknown = crate::sandbox::Udp {
        dl_dst: crate::sandbox::ROUTER_MAC,
        dst: "100.64.0.99".parse()?,
        src_port: 40003,
        dst_port: 9,
    };
    block_in_place(|| sb.send_udp(&free, &to_unknown))?;
    poll(Duration::from_secs(10), || {
        exit_tx().is_ok_and(|n| n > before)
    })
    .await
    .map_err(|e| anyhow::anyhow!("no ARP request from ovn-controller: {e}"))?;
    // OVN's own answer comes from the address the pod asked (the DNS pod's own, not the kube-dns
    // Service's): a server flowd does not trust. It reached the pod untouched (above), was neither
    // held nor granted, and the pod's counting flow counted it.
    assert_eq!(metrics.held.get(), 0);
    assert!(witness.seen().is_empty());
    let granted = block_in_place(|| sb.dnsflow_flows(settings().cookie_prefix))?;
    assert!(
        !granted.iter().any(|f| f.contains("nw_dst=142.250.77.1")),
        "{granted:#?}"
    );
    holds.refresh().await.map_err(anyhow::Error::msg)?;
    assert_eq!(holds.report().untrusted_total(), 1);
    let (_, why) = holds.report().explain(engine.hold_candidate(&pod1.key));
    assert!(
        why.ends_with(
            "; 1 DNS replies from servers other than the trusted resolvers (10.96.0.10:53) \
             reached it and taught flowd nothing"
        ),
        "{why}"
    );

    // No warning after start-up (where a sandbox without hardware warns of its VIF plug provider).
    let log = log()?;
    assert!(
        !log.lines()
            .any(|l| (l.contains("|WARN|") || l.contains("|ERR|"))
                && !l.contains("|vif_plug_provider|")),
        "{log}"
    );
    holds.clear().await.map_err(anyhow::Error::msg)?;
    task.abort();
    Ok(())
}

/// A sandbox with `ns1/pod1` and the namespace's EgressFirewall (google.com allowed).
fn one_pod(ovn: Ovn) -> Result<(Sandbox, Pod)> {
    let sb = Sandbox::start(ovn)?;
    let pod1 = sb.add_pod(NS, "pod1", 5)?;
    sb.set_egress_firewall(&google())?;
    Ok((sb, pod1))
}

/// The native driver writes exactly the flows `ovs-ofctl` writes for the same batch: every shape a
/// grant takes on this OVN (each allow variant of the learned template, IPv4 and IPv6, TCP, UDP,
/// SCTP and no port, a Deny's drop, a hard timeout), byte for byte in `dump-flows`; its exact and
/// cookie deletes remove what they name. A flow OVS refuses fails the whole bundle, saying which.
async fn the_native_driver_writes_what_ovs_ofctl_writes(ovn: Ovn) -> Result<()> {
    use flowd::{
        model::{PortMatch, Protocol::*},
        ovs::{Cookie, FlowAction, FlowMatch, FlowOp, FlowProgrammer, FlowSpec, OvsError},
    };
    let (sb, pod1) = block_in_place(|| one_pod(ovn))?;
    let (ofctl, native) = (sb.ofctl(), sb.native());
    let t = ofctl.learn_template(11000, None).await??;
    let keys = ofctl.port_keys(&["ns1_pod1".into()]).await?["ns1_pod1"];
    let prefix = settings().cookie_prefix;
    let base = |dst: &str, l4: Option<PortMatch>| FlowMatch {
        table: t.table,
        priority: 11000,
        tier: t.tier,
        hint: None,
        metadata: keys.metadata,
        reg14: keys.reg14,
        outport: t.uplinks.get(&keys.metadata).copied(),
        src: if dst.contains(':') {
            pod1.ipv6
        } else {
            pod1.ipv4
        },
        dst: ip(dst),
        l4,
    };
    let port = |protocol, port| Some(PortMatch { protocol, port });
    let mut ops = Vec::new();
    for (i, (dst, l4)) in [
        ("142.250.1.1", port(Tcp, 443)),
        ("142.250.1.2", None),
        ("2a00:1450::1", port(Udp, 53)),
        ("142.250.1.3", port(Sctp, 9)),
    ]
    .into_iter()
    .enumerate()
    {
        for v in &t.allow {
            ops.push(FlowOp::Add(FlowSpec {
                cookie: Cookie::new(prefix, 7, 11000),
                matches: FlowMatch {
                    hint: v.hint,
                    ..base(dst, l4)
                },
                idle_timeout: 300 + i as u16,
                hard_timeout: (i == 1).then_some(3600),
                action: FlowAction::Continue(v.actions.clone()),
            }));
        }
    }
    // The hold flows, both families, in OVN's delivery table: holding a resolver's replies over UDP
    // and TCP to any port, passing a pod's, counting a pod's from any server.
    let table = t.delivery_table.expect("OVN's delivery table");
    let to = Some((keys.metadata, keys.reg14));
    for (v6, resolver) in [(false, "10.96.0.10:53"), (true, "[fd00:10:96::a]:5353")] {
        for (priority, tcp, from, to, pause) in [
            (
                110,
                false,
                Some(resolver.parse()?),
                None,
                Some(flowd::ovs::native::CONTROLLER_ID),
            ),
            (
                110,
                true,
                Some(resolver.parse()?),
                None,
                Some(flowd::ovs::native::CONTROLLER_ID),
            ),
            (111, true, None, to, None),
            (105, false, None, to, None),
        ] {
            ops.push(FlowOp::Hold(flowd::ovs::HoldSpec {
                cookie: Cookie::new(prefix, 7, priority),
                table,
                priority,
                v6,
                tcp,
                from,
                to,
                pause,
                hard_timeout: 30,
            }));
        }
    }
    ops.push(FlowOp::Add(FlowSpec {
        cookie: Cookie::new(prefix, 7, 10999),
        matches: FlowMatch {
            priority: 10999,
            ..base("198.51.100.9", port(Tcp, 25))
        },
        idle_timeout: 60,
        hard_timeout: None,
        action: FlowAction::Drop,
    }));
    let dump = || -> Result<Vec<String>> {
        let mut flows: Vec<String> = block_in_place(|| sb.dnsflow_flows(prefix))?
            .into_iter()
            .map(|l| {
                // Counters and ages differ between the two writes; the flows must not.
                l.split(", ")
                    .filter(|f| {
                        !flowd::ovs::flow::STATISTICS
                            .iter()
                            .any(|k| f.trim_start().starts_with(k))
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .collect();
        flows.sort();
        Ok(flows)
    };
    // Every table (the holds are not in the ACL table).
    let everything = FlowOp::DeleteCookie {
        table: 255,
        cookie: Cookie::new(prefix, 0, 0),
        mask: flowd::ovs::flow::PREFIX_MASK,
    };
    for op in &ops {
        flowd::ovs::native::flow_mod(op).map_err(|e| anyhow::anyhow!("{e}: {op:?}"))?;
    }
    native.connect().await?;
    native.apply(&ops).await?;
    assert_eq!(native.fallbacks(), 0, "written natively");
    let by_native = dump()?;
    assert_eq!(by_native.len(), ops.len(), "{by_native:#?}");
    native.apply(std::slice::from_ref(&everything)).await?;
    assert!(dump()?.is_empty());
    ofctl.apply(&ops).await?;
    assert_eq!(dump()?, by_native, "ovs-ofctl and the native driver differ");
    // An exact delete takes exactly its flow.
    let FlowOp::Add(first) = &ops[0] else {
        unreachable!()
    };
    native
        .apply(&[FlowOp::DeleteStrict {
            cookie: first.cookie,
            matches: first.matches,
        }])
        .await?;
    assert_eq!(dump()?.len(), ops.len() - 1);
    // A flow that cannot be written (a register OVS does not have) fails the batch: nothing
    // changes. (OVS's own refusal of a flow in a bundle, and the discard, are proven in the openflow
    // crate's live test.)
    let mut bad = first.clone();
    bad.action = FlowAction::Continue(flowd::ovs::Actions::new("load:0x1->OXM_OF_PKT_REG9[0]")?);
    let refused = native
        .apply(&[
            FlowOp::Add(first.clone()),
            FlowOp::Add(bad),
            everything.clone(),
        ])
        .await;
    assert!(
        refused.as_ref().is_err_and(OvsError::is_refusal),
        "{refused:?}"
    );
    assert_eq!(
        dump()?.len(),
        ops.len() - 1,
        "the refused batch changed nothing"
    );
    native.apply(&[everything]).await?;
    assert!(dump()?.is_empty());
    Ok(())
}

async fn the_template_and_pod_keys_are_learned_from_ovn(ovn: Ovn) -> Result<()> {
    let (sb, pod1) = block_in_place(|| one_pod(ovn))?;
    use flowd::ovs::{template::Pipeline, FlowProgrammer, RegMatch};
    let ofctl = sb.ofctl();
    let t = ofctl.learn_template(11000, None).await??;
    eprintln!("{ovn:?}: {t}");
    assert_eq!(t.table, ovn.ef_table(), "OVN's ls_out_acl_eval");
    assert_eq!(t.delivery_table, Some(65), "OVN's OFTABLE_LOG_TO_PHY");
    let continues = format!("resubmit(,{})", ovn.ef_table() + 1);
    assert!(t
        .allow
        .iter()
        .all(|v| v.actions.as_str().ends_with(&continues)));
    let hints: Vec<_> = t.allow.iter().map(|v| v.hint).collect();
    assert_eq!(
        hints,
        [
            Some(flowd::ovs::template::HINT_ALLOW_NEW),
            Some(flowd::ovs::template::HINT_ALLOW)
        ],
        "a switch with a load balancer: new and established variants"
    );
    match ovn {
        Ovn::V23_03 => {
            assert_eq!((t.pipeline, t.tier), (Pipeline::Continue, None));
            assert_eq!(
                t.allow[0].actions.as_str(),
                "load:0x1->NXM_NX_XXREG0[97],resubmit(,47)"
            );
        }
        Ovn::V25_03 => {
            assert_eq!(t.pipeline, Pipeline::VerdictRegister);
            assert_eq!(t.tier, Some(RegMatch::masked(0x8000_0000, 0xc000_0000)));
            assert!(t
                .allow
                .iter()
                .all(|v| v.actions.as_str().contains("OXM_OF_PKT_REG4[48]")
                    && !v.actions.as_str().contains("OXM_OF_PKT_REG4[49]")));
        }
    }
    let keys = ofctl
        .port_keys(&["ns1_pod1".into(), "ns1_absent".into()])
        .await?;
    assert_eq!(keys.len(), 1);
    let k = keys["ns1_pod1"];
    let table0 = block_in_place(|| sb.bound_ports())?;
    let line = &table0[&pod1.ofport];
    assert!(
        line.contains(&format!("load:{:#x}->NXM_NX_REG14[]", k.reg14)),
        "{line}"
    );
    assert!(
        line.contains(&format!("load:{:#x}->OXM_OF_METADATA[]", k.metadata)),
        "{line}"
    );
    let router_port = block_in_place(|| sb.port_key("stor-node1"))?;
    assert_eq!(t.uplink(k.metadata), Some(router_port));
    Ok(())
}

/// Without an allow ACL of OVN's to learn from (OVN-K resolved nothing, no NetworkPolicy allows), flowd
/// installs nothing, says why, and a pod's answer opens nothing.
async fn with_nothing_to_learn_from_nothing_is_installed(ovn: Ovn) -> Result<()> {
    let (sb, pod1) = block_in_place(|| -> Result<_> {
        let sb = Sandbox::start(ovn)?;
        let pod1 = sb.add_pod(NS, "pod1", 5)?;
        sb.set_egress_firewall_resolved(&google(), &[])?;
        Ok((sb, pod1))
    })?;
    let sb = Arc::new(sb);
    let (engine, task) = start_engine(&sb, settings(), &google(), &[&pod1]);
    engine.on_dns(
        answer(pod1.ipv4, "google.com", &[], &["142.250.1.1"]),
        Instant::now(),
    );
    let blocked = poll(APPLY_TIMEOUT, || engine.blocked().is_some()).await;
    task.abort();
    blocked.map_err(|e| anyhow::anyhow!("{e}: never said why nothing is installed"))?;
    let why = engine.blocked().unwrap_or_default();
    assert!(why.contains("no allow ACL flow"), "{why}");
    assert!(engine.metrics_snapshot().template_failures >= 1);
    assert!(block_in_place(|| sb.dnsflow_flows(engine.settings().cookie_prefix))?.is_empty());
    expect_traces(
        &sb,
        &[(&pod1, "142.250.1.1", TCP443, Dropped, "nothing installed")],
    );
    Ok(())
}

/// An AdminNetworkPolicy deny (tier 1 on 25.03; above the EF's priorities without tiers) wins over a
/// grant for the same destination, and so does the EF's own earlier Deny.
async fn an_admin_network_policy_deny_wins_over_a_grant(ovn: Ovn) -> Result<()> {
    let n = node(ovn, google()).await?;
    n.dns(&n.pod1, "google.com", &[], &["203.0.113.8", "142.250.1.1"]);
    n.settle(2).await?;
    n.expect(&[
        (
            &n.pod1,
            "203.0.113.8",
            TCP443,
            Dropped,
            "the ANP denies it first",
        ),
        (
            &n.pod1,
            "142.250.1.1",
            TCP443,
            Forwarded,
            "granted, not ANP-denied",
        ),
    ]);
    Ok(())
}

/// A DNS answer pointing at a pod on the same switch never overrides that pod's NetworkPolicy, even
/// when flowd is not told the cluster subnets: grants only match traffic leaving toward the router.
async fn a_grant_never_overrides_network_policy_on_the_same_switch(ovn: Ovn) -> Result<()> {
    let rules = rules(json!([
        {"type": "Allow", "to": {"dnsName": "google.com"}},
        {"type": "Deny", "to": {"cidrSelector": "142.250.0.0/16"}}
    ]));
    let (sb, pod1, victim, friend) = block_in_place(|| -> Result<_> {
        let sb = Sandbox::start(ovn)?;
        let pod1 = sb.add_pod(NS, "pod1", 5)?;
        let victim = sb.add_pod("ns2", "db", 7)?;
        let friend = sb.add_pod("ns3", "web", 8)?;
        sb.set_egress_firewall(&rules)?;
        sb.deny_ingress("ns2", "10.244.1.250".parse()?)?;
        Ok((sb, pod1, victim, friend))
    })?;
    let sb = Arc::new(sb);
    let unaware = EngineSettings {
        cluster_subnets: Vec::new(),
        ..settings()
    };
    let (engine, task) = start_engine(&sb, unaware, &rules, &[&pod1]);
    let before = [
        block_in_place(|| sb.trace_to_pod(&pod1, &victim))?,
        block_in_place(|| sb.trace_to_pod(&pod1, &friend))?,
    ];
    assert_eq!(before, [Dropped, Forwarded], "NetworkPolicy alone decides");
    engine.on_dns(
        answer(
            pod1.ipv4,
            "google.com",
            &[],
            &[&victim.ipv4.to_string(), "142.250.1.1"],
        ),
        Instant::now(),
    );
    let settled = settle(&sb, &engine, 2).await;
    task.abort();
    settled?;
    assert_eq!(
        block_in_place(|| sb.trace_to_pod(&pod1, &victim))?,
        Dropped,
        "the grant for the pod's IP does not open the same switch"
    );
    expect_traces(
        &sb,
        &[(
            &pod1,
            "142.250.1.1",
            TCP443,
            Forwarded,
            "the same answer's outside IP",
        )],
    );
    Ok(())
}

/// A pod recreated under the same name gets a new port (and port key): the next reconcile moves its
/// grant there and removes the flows of the old port.
async fn a_recreated_pods_grant_follows_its_new_port(ovn: Ovn) -> Result<()> {
    let n = node(ovn, google()).await?;
    n.dns(&n.pod1, "google.com", &[], &["142.250.1.1"]);
    n.settle(1).await?;
    let iface = n.pod1.key.iface_id();
    let old_key = block_in_place(|| n.sb.port_key(&iface))?;
    let new = block_in_place(|| n.sb.recreate_pod(&n.pod1))?;
    let new_key = block_in_place(|| n.sb.port_key(&iface))?;
    assert_ne!((new.ofport, new_key), (n.pod1.ofport, old_key));
    n.engine.reconcile().await?;
    n.settle(1).await?;
    let flows = n.flows();
    assert!(
        flows
            .iter()
            .all(|f| f.contains(&format!(",reg14={new_key:#x},"))),
        "only flows of the new port (key {new_key}, was {old_key}): {flows:#?}"
    );
    n.expect(&[(
        &new,
        "142.250.1.1",
        TCP443,
        Forwarded,
        "granted on the new port",
    )]);
    Ok(())
}

/// A bundle `ovs-ofctl` never finishes (a wedged OVS, as seen by flowd) is killed at the timeout, and
/// the revocation it carried goes through with the next batch.
async fn a_wedged_ovs_ofctl_is_killed_at_its_timeout_and_the_revocation_goes_through(
    ovn: Ovn,
) -> Result<()> {
    let rules = google();
    let (sb, pod1, pod2) = block_in_place(|| sandbox(ovn, &rules))?;
    // A stand-in first on PATH: the next bundle after `wedge` appears hangs; everything else is the
    // real ovs-ofctl.
    let dir = tempfile::tempdir()?;
    let (wedge, pidfile) = (dir.path().join("wedge"), dir.path().join("pid"));
    let real = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v ovs-ofctl"])
            .output()?
            .stdout,
    )?;
    let script = format!(
        "#!/bin/sh\ncase \" $* \" in *\" --bundle \"*)\n  if [ -e {w} ]; then rm -f {w}; echo $$ > {p}; exec sleep 1000; fi;;\nesac\nexec {real} \"$@\"\n",
        w = wedge.display(),
        p = pidfile.display(),
        real = real.trim(),
    );
    let stand_in = dir.path().join("ovs-ofctl");
    std::fs::write(&stand_in, script)?;
    std::fs::set_permissions(
        &stand_in,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ofctl = sb
        .ofctl()
        .with_env("PATH", path)
        .with_timeout(Duration::from_secs(2));
    let engine = Engine::new(settings(), ofctl);
    engine.set_node(Sandbox::NODE);
    engine.set_rules(rules);
    engine.upsert_pod(pod1.info());
    engine.upsert_pod(pod2.info());
    engine.on_dns(
        answer(pod1.ipv4, "google.com", &[], &["142.250.1.1"]),
        Instant::now(),
    );
    engine.on_dns(
        answer(pod2.ipv4, "google.com", &[], &["142.250.1.3"]),
        Instant::now(),
    );
    engine.flush().await?;
    expect_traces(&sb, &[(&pod2, "142.250.1.3", TCP443, Forwarded, "granted")]);

    std::fs::write(&wedge, "")?;
    engine.remove_pod(&pod2.key);
    let started = Instant::now();
    let wedged = engine.flush().await;
    assert!(
        matches!(
            wedged,
            Err(flowd::engine::EngineError::Ovs(
                flowd::ovs::OvsError::Timeout { .. }
            ))
        ),
        "{wedged:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let pid = std::fs::read_to_string(&pidfile)?;
    assert!(
        !Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "the wedged ovs-ofctl (pid {pid}) is gone"
    );
    // The next batch carries the revocation again, and OVS takes it.
    engine.flush().await?;
    expect_traces(
        &sb,
        &[
            (
                &pod2,
                "142.250.1.3",
                TCP443,
                Dropped,
                "revoked after the wedge",
            ),
            (&pod1, "142.250.1.1", TCP443, Forwarded, "untouched"),
        ],
    );
    Ok(())
}

/// Every test above, once per OVN version (and `tcp.rs`'s).
macro_rules! on_every_ovn {
    ($($name:ident),* $(,)?) => {
        mod v23_03 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(super::Ovn::V23_03).await
                }
            )*
        }
        mod v25_03 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(super::Ovn::V25_03).await
                }
            )*
        }
    };
}
pub(crate) use on_every_ovn;

on_every_ovn!(
    a_wedged_ovs_ofctl_is_killed_at_its_timeout_and_the_revocation_goes_through,
    a_resolved_ip_is_dropped_before_the_answer_and_forwarded_after,
    an_earlier_cidr_deny_still_wins_a_later_one_does_not,
    only_the_rules_protocol_and_port_pass,
    a_wildcard_covers_one_label_not_deeper_names,
    plain_names_cover_subdomains_unless_strict,
    an_ipv6_answer_opens_ipv6_only,
    a_cname_chain_is_followed_and_upper_case_is_normalized,
    an_answer_inside_the_cluster_subnets_gets_nothing,
    grants_are_back_within_a_second_after_ovn_controller_restarts,
    a_restarted_engine_adopts_its_flows_and_removes_only_what_the_cluster_disallows,
    an_idle_flow_leaves_ovs_and_the_engine,
    a_removed_pods_flows_are_gone,
    the_template_and_pod_keys_are_learned_from_ovn,
    the_native_driver_writes_what_ovs_ofctl_writes,
    a_held_dns_reply_reaches_the_pod_after_its_grant,
    a_dns_reply_from_another_node_over_geneve_is_held_too,
    ovn_controllers_own_packet_ins_work_beside_the_hold,
    a_stalled_grant_write_lets_the_held_reply_go_at_the_deadline,
    with_nothing_to_learn_from_nothing_is_installed,
    an_admin_network_policy_deny_wins_over_a_grant,
    a_grant_never_overrides_network_policy_on_the_same_switch,
    a_recreated_pods_grant_follows_its_new_port,
);

//! Whom the hold believes, on real packets: pods are network namespaces on OVS's userspace (netdev)
//! datapath, as in `tcp.rs` (client `ns1/pod1` under "Allow `*.allowed.test`, Deny 0.0.0.0/0",
//! kube-dns's backend running Unbound, a listener behind the exit), with flowd's hold as the daemon
//! runs it and no tapd.
//!
//! - A DNS server in another pod answers the client's query for an allowed name with an address of
//!   its choosing: flowd neither holds nor learns that reply, the connect to the address fails, and
//!   the reply is counted. The same names through the kube-dns Service are held, granted, and every
//!   first SYN passes.
//! - flowd's OpenFlow connection ends and its management socket cannot be reached again: the hold
//!   flows go at once (not at their hard timeout, ten minutes here) and DNS keeps reaching the pod.
//! - A pod whose port has just come up is held from its first reply.

use crate::{
    ovn::{on_every_ovn, poll},
    sandbox::{Ovn, Sandbox},
    tcp::{answer, connect_all, connect_all_via, node, receive_dnstap, report, Node},
};
use anyhow::{ensure, Context, Result};
use dnsflow_testkit::{Unbound, UnboundConfig};
use flowd::{
    config::EngineSettings,
    engine::Engine,
    hold::{hold_cookie_prefix, HoldFlows, HoldMetrics, HoldReport, Holder, DEFAULT_DEADLINE},
    ovs::Native,
};
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
    task::{block_in_place, JoinHandle, JoinSet},
};

/// Names each part asks for: `n1..=n10.allowed.test`.
const NAMES: (u8, u8) = (1, 10);
/// The other pod's DNS server answers `n<i>.allowed.test` with this address instead.
fn forged(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 100 + i)
}
/// How long flowd may take to write its hold flows, or to remove them.
const READY: Duration = Duration::from_secs(20);
/// Hard timeout of the hold flows here: far longer than any test waits, so only flowd's own
/// removal can make them go.
const HARD_TIMEOUT: Duration = Duration::from_secs(600);

/// flowd's hold as the daemon runs it, on `native`: engine, holder and hold flows, trusting the
/// kube-dns Service's address only.
struct Holding {
    engine: Engine<Native>,
    metrics: Arc<HoldMetrics>,
    report: Arc<HoldReport>,
    stop: Option<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Holding {
    async fn start(n: &Node, native: Native) -> Result<Self> {
        let packet_ins = native.packet_ins();
        let engine = Engine::new(EngineSettings::for_kind(), native);
        engine.set_node(Sandbox::NODE);
        engine.set_rules(n.rules.clone());
        engine.upsert_pod(n.client.info());
        let report = Arc::new(HoldReport::on(DEFAULT_DEADLINE));
        let holder = Holder::new(
            engine.clone(),
            Arc::new(engine.clone()),
            DEFAULT_DEADLINE,
            crate::sandbox::kube_dns(),
        )
        .reporting_to(report.clone());
        let metrics = holder.metrics().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let tasks = vec![
            tokio::spawn(engine.clone().run()),
            tokio::spawn(holder.run(packet_ins)),
            tokio::spawn(
                HoldFlows::new(engine.clone(), HARD_TIMEOUT, crate::sandbox::kube_dns())
                    .reporting_to(report.clone())
                    .run(async {
                        let _ = stopped.await;
                    }),
            ),
        ];
        let holding = Self {
            engine,
            metrics,
            report,
            stop: Some(stop),
            tasks,
        };
        poll(READY, || !holding.hold_flows(n).is_empty())
            .await
            .context("the client's hold flow for kube-dns")?;
        Ok(holding)
    }

    /// The hold flows in br-int that pause replies (not the counting ones).
    fn hold_flows(&self, n: &Node) -> Vec<String> {
        let prefix = hold_cookie_prefix(self.engine.settings().cookie_prefix);
        block_in_place(|| n.sb.dnsflow_flows(prefix))
            .unwrap_or_default()
            .into_iter()
            .filter(|f| f.contains("controller("))
            .collect()
    }

    /// The client's granted destinations.
    fn granted(&self, n: &Node) -> Vec<IpAddr> {
        let mut dsts: Vec<IpAddr> = self
            .engine
            .grants(Some(&n.client.key), None)
            .iter()
            .map(|g| g.key.dst)
            .collect();
        dsts.sort();
        dsts.dedup();
        dsts
    }

    fn explain(&self, n: &Node) -> (bool, String) {
        self.report
            .explain(self.engine.hold_candidate(&n.client.key))
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A DNS server of the client's own choosing, in pod `ns2/resolver` (10.244.1.9): Unbound, answering
/// every `n<i>.allowed.test` with [`forged`]`(i)`.
fn rogue_server(n: &Node) -> Result<(Unbound, JoinHandle<()>, IpAddr)> {
    let (_, ns) = n.sb.add_netns_pod("ns2", "resolver", 9)?;
    let ip = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 9));
    let socket = n.dir.path().join("rogue-dnstap.sock");
    // Its dnstap goes nowhere that matters: no tapd reads it.
    let (events, _) = mpsc::unbounded_channel();
    let receiving = tokio::spawn(receive_dnstap(UnixListener::bind(&socket)?, events));
    let records = (NAMES.0..=NAMES.1)
        .map(|i| format!("n{i}.allowed.test. 300 IN A {}", forged(i)))
        .collect();
    let unbound = Unbound::start(
        &socket,
        &UnboundConfig {
            local_data: records,
            listen: Some(SocketAddr::new(ip, 53)),
            netns: Some(ns.name().to_owned()),
            ..UnboundConfig::default()
        },
    )?;
    Ok((unbound, receiving, ip))
}

/// The proof of trust: see the module doc.
async fn a_pods_own_dns_server_opens_nothing_and_the_dns_service_does(ovn: Ovn) -> Result<()> {
    let n = node(ovn).await?;
    let (_rogue, receiving, rogue) = block_in_place(|| rogue_server(&n))?;
    let holding = Holding::start(&n, n.sb.native()).await?;

    // Ten clients at once: each connect waits its whole 5 s timeout.
    let asked_rogue = connect_all_via(
        &n.client_ns,
        &rogue.to_string(),
        NAMES,
        usize::from(NAMES.1),
        false,
        |i, ip| ip == forged(i),
    )
    .await?;
    report(ovn, "answers from a pod's own DNS server", &asked_rogue);
    for a in &asked_rogue {
        ensure!(
            a.ip.is_some(),
            "{}: the rogue server's answer never came: {a:?}",
            a.name
        );
        ensure!(
            a.error.as_deref().is_some_and(|e| e.starts_with("connect")),
            "{}: the forged address was reachable: {a:?}",
            a.name
        );
    }
    assert_eq!(holding.granted(&n), Vec::<IpAddr>::new(), "nothing granted");
    assert_eq!(holding.metrics.held.get(), 0, "none of its replies held");
    // The counting flow saw each reply; flowd reads it every second.
    poll(READY, || {
        holding.report.untrusted_total() >= u64::from(NAMES.1)
    })
    .await
    .context("the rogue server's replies counted")?;
    let (_, why) = holding.explain(&n);
    assert!(
        why.contains("DNS replies from servers other than the trusted resolvers (10.96.0.10:53)"),
        "{why}"
    );

    // The same names through the kube-dns Service: held, granted, every first SYN through.
    let asked_service = connect_all(&n.client_ns, NAMES, 1, false).await?;
    report(
        ovn,
        "the same names through the kube-dns Service",
        &asked_service,
    );
    let late: Vec<_> = asked_service.iter().filter(|a| !a.first_syn()).collect();
    assert!(late.is_empty(), "first SYNs that did not pass: {late:#?}");
    // A loaded machine can make a revalidation round outlast the deadline: such a reply went on
    // with its grant in OVS (the first SYNs above tell whether the datapath was ready), counted
    // apart from those seen revalidated.
    let m = &holding.metrics;
    eprintln!(
        "  {} sent on at the deadline before a revalidation round was seen to end",
        m.revalidation_timeouts.get()
    );
    assert_eq!(
        (
            m.held.get(),
            m.granted.get() + m.revalidation_timeouts.get(),
            m.untrusted.get()
        ),
        (u64::from(NAMES.1), u64::from(NAMES.1), 0)
    );
    let want: Vec<IpAddr> = (NAMES.0..=NAMES.1).map(|i| answer(i).into()).collect();
    assert_eq!(holding.granted(&n), want, "the Service's answers only");
    receiving.abort();
    Ok(())
}

/// Passes bytes between clients of `listen` and the socket at `target`; aborting the returned task
/// ends every connection it carries.
fn relay(listen: UnixListener, target: PathBuf) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut connections = JoinSet::new();
        while let Ok((mut a, _)) = listen.accept().await {
            let Ok(mut b) = UnixStream::connect(&target).await else {
                continue;
            };
            connections.spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            });
        }
    })
}

/// The proof that nothing is paused for a controller that is gone: see the module doc.
async fn without_its_openflow_connection_flowd_holds_nothing_and_dns_flows(ovn: Ovn) -> Result<()> {
    let n = node(ovn).await?;
    let socket = n.dir.path().join("br-int.mgmt");
    let relaying = relay(
        UnixListener::bind(&socket)?,
        Native::socket_path(Some(n.sb.path()), "br-int"),
    );
    let native = Native::new(n.sb.ofctl(), socket.clone(), Duration::from_secs(5));
    let holding = Holding::start(&n, native).await?;
    let held = connect_all(&n.client_ns, (1, 1), 1, false).await?;
    ensure!(held[0].first_syn(), "held and granted first: {held:?}");
    assert_eq!(holding.metrics.granted.get(), 1);
    poll(READY, || holding.report.coverage_now() == (true, 0))
        .await
        .context("dnsflow_dns_holding 1, no pod uncovered")?;

    // The connection ends, and the socket is gone: flowd cannot open another.
    relaying.abort();
    let _ = relaying.await;
    std::fs::remove_file(&socket)?;
    poll(Duration::from_secs(5), || holding.hold_flows(&n).is_empty())
        .await
        .context("hold flows still in br-int after the connection ended")?;
    let (held_now, why) = holding.explain(&n);
    assert!(!held_now, "{why}");
    assert!(why.contains("OpenFlow connection"), "{why}");
    // The metrics say so too: the client (its namespace has a dnsName rule) is not covered.
    assert_eq!(holding.report.coverage_now(), (false, 1));

    // DNS keeps reaching the pod, unheld (its answers are not learned: no tapd here).
    let unheld = connect_all(&n.client_ns, (2, 6), 5, false).await?;
    report(ovn, "with flowd's OpenFlow connection gone", &unheld);
    for a in &unheld {
        ensure!(
            a.ip.is_some(),
            "{}: no DNS answer reached the pod: {a:?}",
            a.name
        );
    }
    assert_eq!(holding.metrics.held.get(), 1, "nothing held since");
    // Rounds go on every second: none writes them again while the socket is unreachable.
    assert!(holding.hold_flows(&n).is_empty());
    Ok(())
}

/// A pod whose port has just come up resolves and connects at once: the hold flows hold replies
/// from kube-dns to any port of the node, so the pod's first reply is held before flowd has looked
/// its port up at all (the held reply makes it look at once), and every first SYN passes.
async fn a_pod_whose_port_just_came_up_is_held_from_its_first_reply(ovn: Ovn) -> Result<()> {
    let n = node(ovn).await?;
    let holding = Holding::start(&n, n.sb.native()).await?;
    let (late, late_ns) = block_in_place(|| n.sb.add_netns_pod("ns1", "late", 7))?;
    // The API tells flowd of the pod; its port keys are not known to the engine yet.
    holding.engine.upsert_pod(late.info());
    assert!(
        holding.engine.hold_candidate(&late.key).is_err(),
        "no port keys looked up yet"
    );
    let asked = connect_all(&late_ns, (11, 20), 1, false).await?;
    report(ovn, "a pod whose port just came up", &asked);
    let late_syns: Vec<_> = asked.iter().filter(|a| !a.first_syn()).collect();
    assert!(
        late_syns.is_empty(),
        "first SYNs that did not pass: {late_syns:#?}"
    );
    let m = &holding.metrics;
    assert_eq!(
        (
            m.held.get(),
            m.granted.get() + m.revalidation_timeouts.get(),
            m.grants_pending.get()
        ),
        (10, 10, 0)
    );
    Ok(())
}

on_every_ovn!(
    a_pods_own_dns_server_opens_nothing_and_the_dns_service_does,
    without_its_openflow_connection_flowd_holds_nothing_and_dns_flows,
    a_pod_whose_port_just_came_up_is_held_from_its_first_reply,
);

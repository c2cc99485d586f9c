//! `flowd run` (the real binary) restarted by SIGTERM and by SIGKILL, on OVN 25.03 with a real tapd
//! and Unbound: polled every 100 ms for 30 s after each restart, `br-int` never misses a flow of a
//! grant the cluster still allows (every variant the template makes of it, one per conntrack hint)
//! nor stops forwarding a traced packet to it — even a grant whose answer is past its TTL, so that
//! tapd's replay cannot justify it again — and the flows of a pod deleted while flowd was down go
//! once flowd has listed the cluster. And, on OVN 23.03 and 25.03, a killed flowd stops holding DNS within its hold flows'
//! hard timeout.

use crate::{
    apiserver::{FakeApiServer, Resource},
    cluster::{dig_from, eventually, kubeconfig, Tapd, NODE},
    sandbox::{dns_answer, udp_frame, Ovn, Pod, Sandbox, Trace, Udp},
};
use dnsflow_testkit::{free_port, http_get, Unbound, UnboundConfig};
use flowd::{
    config::EngineSettings,
    hold::hold_cookie_prefix,
    model::Protocol,
    ovs::{flow::parse_flow_line, FlowProgrammer as _, ParsedFlow, Template},
};
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};
use tokio::task::block_in_place;

/// How long, and how often, the bridge is watched after each restart.
const WATCH: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

/// `flowd run` against the sandbox's `br-int`, the fake API server and `tapd`; ready when it returns.
async fn start_flowd(sb: &Sandbox, api: &FakeApiServer, tapd: &Tapd, dir: &Path) -> Child {
    start_flowd_with(sb, api, tapd, dir, &[]).await.0
}

/// [`start_flowd`] with more settings (`FLOWD_*` variables); returns its metrics address too.
async fn start_flowd_with(
    sb: &Sandbox,
    api: &FakeApiServer,
    tapd: &Tapd,
    dir: &Path,
    settings: &[(&str, &str)],
) -> (Child, SocketAddr) {
    let http = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("flowd.log"))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_flowd"))
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(sb.env())
        .env("KUBECONFIG", kubeconfig(api, dir))
        .env("RUST_LOG", "info")
        .env("FLOWD_NODE_NAME", NODE)
        .env("FLOWD_GRPC_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("FLOWD_METRICS_LISTEN", http.to_string())
        .env("FLOWD_TAPD_ENDPOINTS", tapd.grpc.to_string())
        .envs(settings.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    eventually("flowd run to be ready", || {
        http_get(http, "/readyz").is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    })
    .await;
    (child, http)
}

/// What is wrong with the grant `pod` → `dst` in `flows` (a dump of flowd's flows), if anything: it
/// must have exactly one flow per variant of `template` (each conntrack hint with OVN's actions for
/// it), and a TCP/443 packet from the pod to `dst` must be traced forwarded.
fn grant_faults(
    sb: &Sandbox,
    flows: &[ParsedFlow],
    template: &Template,
    pod: &Pod,
    dst: IpAddr,
) -> Vec<String> {
    let mut have: Vec<(Option<String>, Option<String>)> = flows
        .iter()
        .filter(|f| {
            f.fields
                .is_some_and(|m| m.src == Some(pod.ipv4) && m.dst == Some(dst))
        })
        .map(|f| {
            let hint = f.fields.and_then(|m| m.reg0).map(|h| h.to_string());
            (hint, f.actions.clone())
        })
        .collect();
    let mut want: Vec<(Option<String>, Option<String>)> = template
        .allow
        .iter()
        .map(|v| (v.hint.map(|h| h.to_string()), Some(v.actions.to_string())))
        .collect();
    have.sort();
    want.sort();
    let mut faults = Vec::new();
    if have != want {
        faults.push(format!(
            "{} -> {dst}: flows (reg0 hint, actions) {have:?}, want one per variant {want:?}",
            pod.key
        ));
    }
    match block_in_place(|| sb.trace(pod, dst, Some((Protocol::Tcp, 443)))) {
        Ok(Trace::Forwarded) => {}
        got => faults.push(format!("{} -> {dst}: traced {got:?}", pod.key)),
    }
    faults
}

fn signal(child: &mut Child, sig: &str) {
    let pid = child.id().to_string();
    let status = Command::new("kill").args([sig, &pid]).status().unwrap();
    assert!(status.success(), "kill {sig} {pid}");
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flowd_restarted_by_sigterm_and_sigkill_never_drops_a_valid_flow() {
    let crate::pipeline::Demo {
        sb,
        client,
        other,
        api,
    } = crate::pipeline::demo().await;
    let tapd = Tapd::start();
    let dns = Unbound::start(
        &tapd.socket,
        &UnboundConfig {
            local_data: vec![
                // Past its TTL by the first restart: tapd's replay no longer brings it back, yet the
                // flow's idle timeout (max(TTL, floor) + grace) keeps a connection using it alive.
                "a.example.com. 1 IN A 198.51.100.10".into(),
                "b.example.com. 300 IN A 198.51.100.11".into(),
            ],
            ..UnboundConfig::default()
        },
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut flowd = start_flowd(&sb, &api, &tapd, dir.path()).await;
    dig_from(Ipv4Addr::new(127, 0, 0, 5), dns.port(), "a.example.com").await;
    dig_from(Ipv4Addr::new(127, 0, 0, 6), dns.port(), "b.example.com").await;
    let settings = EngineSettings::default();
    // What every grant's flows must be on this OVN, learned from OVN's own flows as flowd does.
    let template = sb
        .ofctl()
        .learn_template(settings.priority_base, None)
        .await
        .unwrap()
        .unwrap();
    assert!(!template.allow.is_empty(), "{template}");
    let flows = || -> Vec<ParsedFlow> {
        block_in_place(|| sb.dnsflow_flows(settings.cookie_prefix))
            .unwrap()
            .iter()
            .filter_map(|l| parse_flow_line(l))
            .collect()
    };
    let (a, b): (IpAddr, IpAddr) = (
        "198.51.100.10".parse().unwrap(),
        "198.51.100.11".parse().unwrap(),
    );
    let has = |flows: &[ParsedFlow], src: IpAddr, dst: IpAddr| {
        flows.iter().any(|f| {
            f.fields
                .is_some_and(|m| m.src == Some(src) && m.dst == Some(dst))
        })
    };
    eventually("both grants whole in br-int", || {
        let f = flows();
        grant_faults(&sb, &f, &template, &client, a).is_empty()
            && grant_faults(&sb, &f, &template, &other, b).is_empty()
    })
    .await;
    let logs = || std::fs::read_to_string(dir.path().join("flowd.log")).unwrap_or_default();
    // Time must pass, not an event: a.example.com's 1 s TTL runs out, so that after the restarts
    // tapd's replay no longer brings its answer back and only the adopted flows keep the grant.
    tokio::time::sleep(Duration::from_secs(2)).await;

    for sig in ["-TERM", "-KILL"] {
        signal(&mut flowd, sig);
        let other_stays = sig == "-TERM";
        if !other_stays {
            // Deleted while flowd is away: its flow must go once the new run has listed the cluster.
            api.delete(Resource::Pods, "demo", "other");
        }
        let restarted = Instant::now();
        let mut next = Box::pin(start_flowd(&sb, &api, &tapd, dir.path()));
        let mut gone_after = None;
        let mut ready = false;
        let (mut last, mut widest) = (Instant::now(), Duration::ZERO);
        // Poll while the new run starts up, and on until the watch ends.
        loop {
            let f = flows();
            let mut faults = grant_faults(&sb, &f, &template, &client, a);
            let other_there = has(&f, other.ipv4, b);
            if other_stays {
                faults.extend(grant_faults(&sb, &f, &template, &other, b));
            }
            assert!(
                faults.is_empty(),
                "after {sig}, {:?} after the restart: {}\n{f:#?}\n{}",
                restarted.elapsed(),
                faults.join("\n"),
                logs()
            );
            if !other_stays && !other_there && gone_after.is_none() {
                gone_after = Some(restarted.elapsed());
            }
            widest = widest.max(last.elapsed());
            last = Instant::now();
            if !ready {
                tokio::select! {
                    child = &mut next => { flowd = child; ready = true; }
                    () = tokio::time::sleep(POLL) => {}
                }
            } else if restarted.elapsed() >= WATCH {
                break;
            } else {
                // Pacing, not a wait: the point is to look all through the watch.
                tokio::time::sleep(POLL).await;
            }
        }
        // A loaded machine slows each dump and trace; a gap this wide would still be seen.
        eprintln!("after {sig}: polled at most {widest:?} apart");
        assert!(widest < Duration::from_secs(1), "polls {widest:?} apart");
        if !other_stays {
            let gone = gone_after.expect("the deleted pod's flow to go");
            eprintln!("after {sig}: the deleted pod's flow went {gone:?} after the restart");
            assert_eq!(
                block_in_place(|| sb.trace(&other, b, Some((Protocol::Tcp, 443)))).unwrap(),
                Trace::Dropped,
                "after {sig}: the deleted pod's grant still forwards"
            );
        }
    }
    signal(&mut flowd, "-TERM");
    assert!(
        logs().contains("adopted the flows an earlier run left"),
        "{}",
        logs()
    );
}

/// A flowd killed with DNS responses held: its hold flows stay in br-int until their hard timeout
/// (`--hold-timeout`, 3 s here), and while they do, OVS has no controller to give a reply to; after
/// it, DNS reaches the pods unheld. Before the kill, the same exchange was held and resumed by the
/// real binary, on OVN 23.03 and 25.03.
async fn a_killed_flowd_stops_holding_dns_within_the_hard_timeout(ovn: Ovn) -> anyhow::Result<()> {
    const HOLD_TIMEOUT: Duration = Duration::from_secs(3);
    let crate::pipeline::Demo {
        sb, client, api, ..
    } = crate::pipeline::demo_on(ovn).await;
    let dns = block_in_place(|| sb.add_dns_server()).unwrap();
    let tapd = Tapd::start();
    let dir = tempfile::tempdir().unwrap();
    let (mut flowd, http) = start_flowd_with(
        &sb,
        &api,
        &tapd,
        dir.path(),
        &[("FLOWD_HOLD_TIMEOUT", "3s")],
    )
    .await;
    let logs = || std::fs::read_to_string(dir.path().join("flowd.log")).unwrap_or_default();
    let holds = hold_cookie_prefix(EngineSettings::default().cookie_prefix);
    let hold_flows = || block_in_place(|| sb.dnsflow_flows(holds)).unwrap();
    // kube-dns's replies held (UDP and TCP, to any port); per pod, any other server's counted
    // (IPv4 only here).
    eventually("hold flows for the demo's two pods", || {
        hold_flows().len() == 4
    })
    .await;

    // One query from the client and its reply from the DNS pod; whether the client got the reply
    // within `wait`.
    let query = Udp {
        dl_dst: crate::sandbox::ROUTER_MAC,
        dst: crate::sandbox::KUBE_DNS_VIP.parse().unwrap(),
        src_port: 40000,
        dst_port: 53,
    };
    let exchange = |n: u8, wait: Duration| {
        let (sb, client, dns, query) = (&sb, &client, &dns, &query);
        async move {
            let before = block_in_place(|| sb.port_stats(client)).unwrap().tx;
            let payload = dns_answer(
                &format!("n{n}.example.com."),
                Ipv4Addr::new(198, 51, 100, n),
            )
            .unwrap();
            let reply = udp_frame(dns, client, (53, 40000), &payload).unwrap();
            block_in_place(|| -> anyhow::Result<()> {
                sb.send_udp(client, query)?;
                sb.send_frames(dns, &[reply])
            })
            .unwrap();
            let start = Instant::now();
            while start.elapsed() < wait {
                if block_in_place(|| sb.port_stats(client)).unwrap().tx > before {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        }
    };
    let held = || {
        http_get(http, "/metrics")
            .ok()
            .and_then(|m| dnsflow_testkit::metric(&m, "dnsflow_dns_held_total"))
            .unwrap_or(0)
    };
    assert!(exchange(1, Duration::from_secs(5)).await, "{}", logs());
    assert_eq!(held(), 1, "held and resumed by flowd: {}", logs());

    signal(&mut flowd, "-KILL");
    let killed = Instant::now();
    let mut n = 2;
    let mut lost = 0;
    while !exchange(n, Duration::from_millis(200)).await {
        lost += 1;
        n += 1;
        assert!(
            killed.elapsed() < HOLD_TIMEOUT + Duration::from_secs(3),
            "DNS still held {:?} after the kill: {:#?}",
            killed.elapsed(),
            hold_flows()
        );
    }
    let back = killed.elapsed();
    assert!(hold_flows().is_empty(), "{:#?}", hold_flows());
    eprintln!(
        "{ovn:?}: DNS to a held pod back {back:?} after SIGKILL ({lost} replies lost before)"
    );
    Ok(())
}

crate::ovn::on_every_ovn!(a_killed_flowd_stops_holding_dns_within_the_hard_timeout);

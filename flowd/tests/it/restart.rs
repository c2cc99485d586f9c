//! `flowd run` (the real binary) restarted by SIGTERM and by SIGKILL, on OVN 25.03 with a real tapd
//! and Unbound: `dump-flows`, polled every 100 ms for 30 s after each restart, never misses a flow the
//! cluster still allows — even one whose answer is past its TTL, so that tapd's replay cannot justify
//! it again — and the flow of a pod deleted while flowd was down goes once flowd has listed the
//! cluster. And, on OVN 23.03 and 25.03, a killed flowd stops holding DNS within its hold flows'
//! hard timeout.

use crate::{
    apiserver::{FakeApiServer, Resource},
    cluster::{dig_from, eventually, kubeconfig, Tapd, NODE},
    sandbox::{dns_answer, udp_frame, Ovn, Sandbox, Udp},
};
use dnsflow_testkit::{free_port, http_get, Unbound, UnboundConfig};
use flowd::config::EngineSettings;
use flowd::hold::hold_cookie_prefix;
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
    let prefix = EngineSettings::default().cookie_prefix;
    let flows = || block_in_place(|| sb.dnsflow_flows(prefix)).unwrap();
    let has = |flows: &[String], src: IpAddr, dst: &str| {
        let (src, dst) = (format!("nw_src={src},"), format!("nw_dst={dst}"));
        flows.iter().any(|f| f.contains(&src) && f.contains(&dst))
    };
    eventually("both grants in br-int", || {
        let f = flows();
        has(&f, client.ipv4, "198.51.100.10") && has(&f, other.ipv4, "198.51.100.11")
    })
    .await;
    let logs = || std::fs::read_to_string(dir.path().join("flowd.log")).unwrap_or_default();
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
            assert!(
                has(&f, client.ipv4, "198.51.100.10"),
                "after {sig}: the client's flow missing {:?} after the restart: {f:#?}\n{}",
                restarted.elapsed(),
                logs()
            );
            let other_there = has(&f, other.ipv4, "198.51.100.11");
            if other_stays {
                assert!(
                    other_there,
                    "after {sig}: the other pod's flow went: {f:#?}"
                );
            } else if !other_there && gone_after.is_none() {
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
                tokio::time::sleep(POLL).await;
            }
        }
        // A loaded machine slows each dump; a gap this wide would still be seen.
        assert!(widest < Duration::from_secs(1), "polls {widest:?} apart");
        if !other_stays {
            let gone = gone_after.expect("the deleted pod's flow to go");
            eprintln!("after {sig}: the deleted pod's flow went {gone:?} after the restart");
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
    eventually("hold flows for the demo's two pods", || {
        hold_flows().len() == 2
    })
    .await;

    // One query from the client and its reply from the DNS pod; whether the client got the reply
    // within `wait`.
    let query = Udp {
        dl_dst: &dns.mac,
        dst: dns.ipv4,
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

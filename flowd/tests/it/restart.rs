//! `flowd run` (the real binary) restarted by SIGTERM and by SIGKILL, on OVN 25.03 with a real tapd
//! and Unbound: `dump-flows`, polled every 100 ms for 30 s after each restart, never misses a flow the
//! cluster still allows — even one whose answer is past its TTL, so that tapd's replay cannot justify
//! it again — and the flow of a pod deleted while flowd was down goes once flowd has listed the
//! cluster.

use crate::{
    apiserver::{FakeApiServer, Resource},
    cluster::{dig_from, eventually, kubeconfig, Tapd, NODE},
    sandbox::Sandbox,
};
use dnsflow_testkit::{free_port, http_get, Unbound, UnboundConfig};
use flowd::config::EngineSettings;
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
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    eventually("flowd run to be ready", || {
        http_get(http, "/readyz").is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    })
    .await;
    child
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

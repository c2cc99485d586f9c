//! Both daemons' `/metrics`, scraped from the real binaries (`flowd run` against the fake API server,
//! subscribed to a real tapd): OpenMetrics text that the reference parser accepts, labels whose values
//! are bounded, and exactly the metrics `deploy/README.md` documents in its tables.

use crate::{
    apiserver::FakeApiServer,
    cluster::{cluster_with_two_pods, eventually, kubeconfig, Tapd, NODE},
};
use dnsflow_runtime::http::OPENMETRICS_CONTENT_TYPE;
use dnsflow_testkit::{free_port, http_get, metric};
use std::{
    collections::BTreeSet,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

/// Reads an exposition on stdin with prometheus_client's OpenMetrics parser (the Python client's, which
/// refuses what the OpenMetrics specification refuses: no `# EOF`, a counter sample without `_total`,
/// two families of one name, unordered buckets...) and prints each family as JSON: name, type, and
/// the names of its samples' labels.
const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
print(json.dumps([
    {"name": f.name, "type": f.type, "labels": sorted({k for s in f.samples for k in s.labels})}
    for f in text_string_to_metric_families(sys.stdin.read())
]))
"#;

/// The only labels allowed: their values come from fixed lists (a reason; a histogram's bucket bound).
/// A label such as a subscriber id or a peer address would grow without bound.
const BOUNDED_LABELS: [&str; 2] = ["reason", "le"];

/// One metric family of a scrape, under the name a query uses: a counter's `_total` sample, any other
/// family's own name (a histogram's, whose samples add `_bucket`, `_sum` and `_count`).
#[derive(Debug)]
struct Family {
    name: String,
    labels: Vec<String>,
}

/// The families of an exposition, or why the OpenMetrics parser refuses it.
fn families(exposition: &str) -> Result<Vec<Family>, String> {
    let mut python = Command::new("python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is not installed: run scripts/test");
    python
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = python.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "prometheus_client is not installed: run scripts/test"
    );
    if !out.status.success() {
        return Err(stderr.lines().last().unwrap_or_default().to_string());
    }
    let families: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    Ok(families
        .iter()
        .map(|f| {
            let name = f["name"].as_str().unwrap();
            Family {
                name: match f["type"].as_str().unwrap() {
                    "counter" => format!("{name}_total"),
                    _ => name.to_string(),
                },
                labels: f["labels"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|l| l.as_str().unwrap().to_string())
                    .collect(),
            }
        })
        .collect())
}

/// Checks a whole `/metrics` response (headers and body) and returns its families.
fn parse(what: &str, response: &str) -> Vec<Family> {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{what}: no HTTP response: {response}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{what}: {head}");
    let content_type = format!("content-type: {OPENMETRICS_CONTENT_TYPE}");
    assert!(
        head.lines().any(|l| l.eq_ignore_ascii_case(&content_type)),
        "{what}: {head}"
    );
    families(body).unwrap_or_else(|why| panic!("{what}: not OpenMetrics: {why}\n{body}"))
}

/// The metric names in the first column of the table under `heading` in `deploy/README.md`: every
/// name in backquotes, spelled in full.
fn documented(heading: &str) -> BTreeSet<String> {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/README.md");
    let readme = std::fs::read_to_string(readme).unwrap();
    let section = readme
        .split_once(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("deploy/README.md has no {heading:?}"))
        .1;
    let section = section.split("\n#").next().unwrap_or_default();
    let names: BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .flat_map(|row| {
            let first = row.split(" |").next().unwrap_or_default();
            format!("`{first}")
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(!names.is_empty(), "no metric in {heading:?}");
    names
}

/// Compares a daemon's scrape with its documentation.
fn check(what: &str, response: &str, heading: &str, prefix: &str) {
    let families = parse(what, response);
    for f in &families {
        assert!(f.name.starts_with(prefix), "{what}: {f:?} lacks {prefix}");
        assert!(
            f.labels
                .iter()
                .all(|l| BOUNDED_LABELS.contains(&l.as_str())),
            "{what}: {f:?} has a label outside {BOUNDED_LABELS:?}"
        );
    }
    let exposed: BTreeSet<String> = families.into_iter().map(|f| f.name).collect();
    let documented = documented(heading);
    let undocumented: Vec<_> = exposed.difference(&documented).collect();
    let missing: Vec<_> = documented.difference(&exposed).collect();
    assert!(
        undocumented.is_empty() && missing.is_empty(),
        "{what}: exposed but not in deploy/README.md's {heading:?}: {undocumented:?}; \
         documented but not exposed: {missing:?}"
    );
}

#[test]
fn the_parser_refuses_what_the_daemons_used_to_expose() {
    // tapd's counter and gauge of one family, in the Prometheus text format of before.
    let shared = "# TYPE tapd_connections_total counter\ntapd_connections_total 2\n\
                  # TYPE tapd_connections gauge\ntapd_connections 1\n";
    assert!(families(shared).is_err());
    assert!(families(&format!("{shared}# EOF\n")).is_err());
    // flowd's counters were typed under their sample's name.
    let flowd = "# TYPE dnsflow_reconciles_total counter\ndnsflow_reconciles_total 1\n# EOF\n";
    assert!(families(flowd).is_err());
    let now = "# TYPE dnsflow_reconciles counter\ndnsflow_reconciles_total 1\n# EOF\n";
    let parsed = families(now).unwrap();
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].name, "dnsflow_reconciles_total");
}

/// Kills the child when dropped, by its own pid.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `flowd run` against the fake API server and a real tapd, ready and subscribed.
struct Running {
    tapd: Tapd,
    flowd: Killed,
    http: SocketAddr,
    log: std::path::PathBuf,
    _api: FakeApiServer,
    _dir: tempfile::TempDir,
}

async fn flowd_run() -> Running {
    let api = cluster_with_two_pods().await;
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(&api, dir.path());
    let tapd = Tapd::start();
    let grpc = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let http = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let log = dir.path().join("flowd.log");
    let flowd = Killed(
        Command::new(env!("CARGO_BIN_EXE_flowd"))
            .arg("run")
            .env_clear()
            .env("KUBECONFIG", &config)
            .env("FLOWD_NODE_NAME", NODE)
            .env("FLOWD_GRPC_LISTEN", grpc.to_string())
            .env("FLOWD_METRICS_LISTEN", http.to_string())
            .env("FLOWD_TAPD_ENDPOINTS", tapd.grpc.to_string())
            // No OVS here: the engine keeps retrying, which readiness does not wait for.
            .env("FLOWD_BRIDGE", "br-none")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    eventually("flowd run to be ready", || {
        http_get(http, "/readyz").is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    })
    .await;
    eventually("flowd run to subscribe to tapd", || {
        tapd.metric("tapd_subscribers") == 1
    })
    .await;
    Running {
        tapd,
        flowd,
        http,
        log,
        _api: api,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_daemons_expose_valid_openmetrics_with_exactly_the_documented_metrics() {
    let Running {
        tapd,
        http,
        log,
        flowd: _flowd,
        _api,
        _dir,
    } = flowd_run().await;
    tokio::task::block_in_place(|| {
        let tapd_text = http_get(tapd.metrics, "/metrics").unwrap();
        check("tapd", &tapd_text, "### tapd's metrics", "tapd_");
        assert_eq!(metric(&tapd_text, "tapd_subscribers"), Some(1));

        let flowd_text = http_get(http, "/metrics").unwrap();
        let logs = std::fs::read_to_string(&log).unwrap_or_default();
        check(
            &format!("flowd (log: {logs})"),
            &flowd_text,
            "### flowd's metrics",
            "dnsflow_",
        );
        assert_eq!(metric(&flowd_text, "dnsflow_ready"), Some(1));
        assert_eq!(metric(&flowd_text, "dnsflow_tapd_connections"), Some(1));
    });
}

/// flowd runs on the host network, so anything that reaches the node reaches its metrics port: 5,000
/// idle connections from one address (a helper process holds them) leave its memory where it was, and
/// the kubelet's probe from another address is answered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http_connections_do_not_grow_flowd_or_shut_probes_out() {
    let running = flowd_run().await;
    let rss_kib = || dnsflow_testkit::proc_status_kib(Some(running.flowd.0.id()), "VmRSS").unwrap();
    let before = rss_kib();
    // Python raises its own descriptor limit (the test process cannot without unsafe code).
    const HOLD: &str = "import resource, socket, sys\n\
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n\
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n\
        n = min(int(sys.argv[3]), hard - 64)\n\
        held = [socket.create_connection((sys.argv[1], int(sys.argv[2]))) for _ in range(n)]\n\
        print(n, flush=True)\n\
        sys.stdin.read()\n";
    let mut holder = Killed(
        Command::new("python3")
            .args([
                "-c",
                HOLD,
                "127.0.0.1",
                &running.http.port().to_string(),
                "5000",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut opened = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.0.stdout.as_mut().unwrap()),
        &mut opened,
    )
    .unwrap();
    let opened: u32 = opened.trim().parse().unwrap();
    assert!(opened >= 1000, "only {opened} connections could be opened");
    // The probe, from another address, while they are all held.
    let probe = tokio::net::TcpSocket::new_v4().unwrap();
    probe.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut probe = tokio::time::timeout(Duration::from_secs(2), probe.connect(running.http))
        .await
        .expect("the probe connects at once")
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(2), probe.read_to_string(&mut answer))
        .await
        .expect("the probe is answered at once")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 8 << 10,
        "{opened} idle connections grew flowd by {grown} KiB"
    );
}

//! `flowd replay`, run as the built binary on the shipped examples and on hostile input.

#[path = "../../examples/make_example_capture.rs"]
mod example;

use serde_json::Value;
use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn flowd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowd"))
        .arg("replay")
        .args(args)
        // The tests pass every setting explicitly; none may leak in from the caller's environment.
        .env_remove("FLOWD_STRICT_DNS_NAMES")
        .env_remove("FLOWD_CLUSTER_SUBNETS")
        .env_remove("FLOWD_PRIORITY_BASE")
        .env_remove("FLOWD_REPLAY_NODE")
        .output()
        .expect("runs flowd")
}

fn ok_stdout(args: &[&str]) -> String {
    let out = flowd(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "flowd replay {args:?} failed: {stderr}"
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn json(args: &[&str]) -> Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok_stdout(&all)).expect("one JSON document")
}

/// The flows of a JSON replay as (pod, ip, priority, rule, action).
fn flows(doc: &Value) -> BTreeSet<(String, IpAddr, u64, u64, String)> {
    doc["flows"]
        .as_array()
        .expect("flows")
        .iter()
        .map(|f| {
            (
                format!(
                    "{}/{}",
                    f["namespace"].as_str().unwrap(),
                    f["pod"].as_str().unwrap()
                ),
                f["ip"].as_str().unwrap().parse().unwrap(),
                f["priority"].as_u64().unwrap(),
                f["ruleIndex"].as_u64().unwrap(),
                f["action"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn expected_flows() -> BTreeSet<(String, IpAddr, u64, u64, String)> {
    example::granted_ips()
        .into_iter()
        .map(|ip| ("abc/client".to_string(), ip, 11000, 0, "Allow".to_string()))
        .collect()
}

#[test]
fn the_shipped_example_grants_the_client_its_google_answers_in_text() {
    let text = ok_stdout(&[]);
    let flow_lines: Vec<&str> = text.lines().filter(|l| l.starts_with("flow ")).collect();
    assert_eq!(flow_lines.len(), 3, "{text}");
    for ip in example::granted_ips() {
        let line = flow_lines
            .iter()
            .find(|l| l.contains(&format!("-> {ip} ")))
            .unwrap_or_else(|| panic!("no flow to {ip}:\n{text}"));
        assert!(line.contains("flow  abc/client "), "{line}");
        assert!(line.contains(" priority=11000 Allow ttl=274 "), "{line}");
        assert!(
            line.contains("reason: www.google.com matched rule 0 dnsName=google.com"),
            "{line}"
        );
    }
    assert!(flow_lines
        .iter()
        .any(|l| l.contains("10.244.1.5 -> 142.250.74.36 any")));
    assert!(flow_lines
        .iter()
        .any(|l| l.contains("fd00:10:244:2::5 -> 2a00:1450:4001:82b::2004 any")));
    assert!(!text.contains("abc/other"), "{text}");
    assert!(
        text.contains("skip  event 3 10.244.1.5 nosuch.google.com: not NOERROR: rcode NXDOMAIN"),
        "{text}"
    );
    assert!(
        text.contains("skip  event 4 10.244.1.6 www.example.com: no dnsName rule matches"),
        "{text}"
    );
    assert!(
        text.contains(
            "skip  event 5 10.244.1.7 www.google.com: namespace has no EgressFirewall: xyz"
        ),
        "{text}"
    );
    assert!(
        text.contains("summary: 6 events read (1 other dnstap messages ignored), 4 skipped, 3 grants, 3 flows"),
        "{text}"
    );
}

#[test]
fn the_shipped_example_in_json() {
    let doc = json(&[]);
    assert_eq!(flows(&doc), expected_flows());
    assert_eq!(doc["summary"]["events"], 6);
    assert_eq!(doc["summary"]["notClientResponses"], 1);
    assert_eq!(doc["summary"]["grants"], 3);
    assert_eq!(doc["summary"]["flows"], 3);
    assert_eq!(doc["summary"]["skipped"]["not NOERROR"], 1);
    let events = doc["events"].as_array().unwrap();
    let nx = events
        .iter()
        .find(|e| e["queryName"] == "nosuch.google.com")
        .expect("the NXDOMAIN");
    assert_eq!(nx["skipped"]["reason"], "not NOERROR");
    assert!(nx.get("grants").is_none());
    let other = events
        .iter()
        .find(|e| e["pod"] == "abc/other")
        .expect("the other pod's event");
    assert_eq!(other["skipped"]["reason"], "no dnsName rule matches");
    let first = &events[0];
    assert_eq!(first["time"], "2026-11-26T04:00:00.001Z");
    assert_eq!(first["grants"][0]["ttl"], 274);
    assert_eq!(first["grants"][0]["idleTimeout"], 330);
    assert_eq!(first["grants"][0]["queryName"], "www.google.com");
    assert_eq!(first["grants"][0]["dnsName"], "google.com");
    assert_eq!(first["grants"][0]["port"], "any");
    assert_eq!(doc["warnings"], serde_json::json!([]));
}

#[test]
fn files_given_explicitly_and_the_grpcurl_stream_give_the_same_flows() {
    let ex = examples();
    let snapshot = ex.join("snapshot.yaml");
    let capture = ex.join("google.fstrm");
    let events = ex.join("google-events.json");
    let from_capture = json(&[
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--capture",
        capture.to_str().unwrap(),
    ]);
    let from_events = json(&[
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
    ]);
    assert_eq!(flows(&from_capture), expected_flows());
    assert_eq!(flows(&from_events), expected_flows());
    // grpcurl never shows FORWARDER traffic: tapd drops it.
    assert_eq!(from_events["summary"]["notClientResponses"], 0);
    assert_eq!(from_events["summary"]["events"], 6);
}

#[test]
fn a_snake_case_event_stream_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.json");
    std::fs::write(
        &path,
        r#"{"client_ip": "10.244.1.5", "query_name": "Mail.Google.com.", "rcode": "NOERROR",
            "answers": [{"ip": "142.250.1.1", "ttl": 60}], "sequence": 9,
            "response_time": "2026-11-26T05:00:00Z"}
           {"clientIp": "10.244.1.5", "queryName": "x.google.com", "answers": [{"ip": "bogus"}]}"#,
    )
    .unwrap();
    let doc = json(&["--events", path.to_str().unwrap()]);
    let got: Vec<(String, IpAddr, u64, u64, String)> = flows(&doc).into_iter().collect();
    assert_eq!(
        got,
        vec![(
            "abc/client".into(),
            "142.250.1.1".parse().unwrap(),
            11000,
            0,
            "Allow".into()
        )]
    );
    assert_eq!(doc["summary"]["skipped"]["invalid event"], 1);
    assert!(doc["events"][1]["skipped"]["detail"]
        .as_str()
        .unwrap()
        .contains("answer ip \"bogus\""));
}

/// A snapshot where `abc` allows Google's CDN names (`*.l.google.com`) and denies tcp/25 to one of its
/// networks first, and `bad`'s EgressFirewall is invalid; with events that hit each case.
fn report_inputs(dir: &Path) -> (String, String) {
    let snapshot = dir.join("snapshot.yaml");
    std::fs::write(
        &snapshot,
        r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Pod, metadata: {name: client, namespace: abc},
   spec: {nodeName: ovn-worker, containers: []}, status: {phase: Running, podIPs: [{ip: 10.244.1.5}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: web, namespace: bad},
   spec: {nodeName: ovn-worker, containers: []}, status: {phase: Running, podIPs: [{ip: 10.244.1.8}]}}
- apiVersion: k8s.ovn.org/v1
  kind: EgressFirewall
  metadata: {name: default, namespace: abc}
  spec:
    egress:
    - {type: Deny, to: {cidrSelector: 142.250.74.0/24}, ports: [{protocol: TCP, port: 25}]}
    - {type: Allow, to: {dnsName: "*.l.google.com"}}
    - {type: Deny, to: {cidrSelector: 0.0.0.0/0}}
- apiVersion: k8s.ovn.org/v1
  kind: EgressFirewall
  metadata: {name: default, namespace: bad}
  spec:
    egress:
    - {type: Allow, to: {dnsName: google.com}, ports: [{protocol: TCP, port: 70000}]}
- apiVersion: v1
  kind: Node
  metadata:
    name: ovn-worker
    annotations: {k8s.ovn.org/node-subnets: '{"default":["10.244.1.0/24"]}'}
"#,
    )
    .unwrap();
    let events = dir.join("events.json");
    std::fs::write(
        &events,
        r#"{"clientIp": "10.244.1.5", "queryName": "www.google.com", "rcode": "NOERROR",
            "cnameChain": ["www3.l.google.com"],
            "answers": [{"ip": "142.250.74.36", "ttl": 60}, {"ip": "10.244.1.9", "ttl": 60}],
            "responseTime": "2026-11-26T05:00:00Z"}
           {"clientIp": "10.244.1.8", "queryName": "www.google.com", "rcode": "NOERROR",
            "answers": [{"ip": "142.250.74.36", "ttl": 60}]}"#,
    )
    .unwrap();
    (
        snapshot.to_str().unwrap().to_string(),
        events.to_str().unwrap().to_string(),
    )
}

/// On a cluster whose subnets are not kind's, what the nodes and OVN-K's ConfigMap say excludes:
/// another node's pod subnet, the join and transit subnets, a node address (InternalIP, or one of
/// OVN-K's host CIDRs), the service subnet and link-local earn nothing;
/// only the address outside the cluster does.
#[test]
fn destinations_discovered_from_the_nodes_and_ovn_ks_configuration_earn_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("snapshot.yaml");
    std::fs::write(
        &snapshot,
        r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Pod, metadata: {name: client, namespace: abc},
   spec: {nodeName: worker-a, containers: []}, status: {phase: Running, podIPs: [{ip: 172.20.1.5}]}}
- apiVersion: k8s.ovn.org/v1
  kind: EgressFirewall
  metadata: {name: default, namespace: abc}
  spec:
    egress:
    - {type: Allow, to: {dnsName: example.com}}
    - {type: Deny, to: {cidrSelector: 0.0.0.0/0}}
- apiVersion: v1
  kind: Node
  metadata:
    name: worker-a
    annotations:
      k8s.ovn.org/node-subnets: '{"default":["172.20.1.0/24"]}'
      k8s.ovn.org/node-gateway-router-lrp-ifaddr: '{"ipv4":"100.65.0.3/16"}'
      k8s.ovn.org/node-transit-switch-port-ifaddr: '{"ipv4":"100.89.0.3/16"}'
      k8s.ovn.org/host-cidrs: '["192.168.50.10/24","203.0.113.50/24"]'
  status: {addresses: [{type: InternalIP, address: 192.168.50.10}, {type: Hostname, address: worker-a}]}
- apiVersion: v1
  kind: Node
  metadata:
    name: worker-b
    annotations: {k8s.ovn.org/node-subnets: '{"default":["172.20.2.0/24"]}'}
  status: {addresses: [{type: InternalIP, address: 192.168.50.11}]}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: ovn-config, namespace: ovn-kubernetes}
  data: {net_cidr: "172.20.0.0/16/24", svc_cidr: "172.21.0.0/16,fd21::/112"}
"#,
    )
    .unwrap();
    let answers = [
        "172.20.2.7",
        "100.65.0.9",
        "100.89.0.9",
        "192.168.50.11",
        "203.0.113.50",
        "169.254.169.254",
        "172.21.3.4",
        "93.184.215.14",
    ];
    let events = dir.path().join("events.json");
    let list: Vec<String> = answers
        .iter()
        .map(|ip| format!(r#"{{"ip": "{ip}", "ttl": 60}}"#))
        .collect();
    std::fs::write(
        &events,
        format!(
            r#"{{"clientIp": "172.20.1.5", "queryName": "www.example.com", "rcode": "NOERROR",
                "answers": [{}]}}"#,
            list.join(", ")
        ),
    )
    .unwrap();
    let doc = json(&[
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
    ]);
    let granted: Vec<IpAddr> = flows(&doc).into_iter().map(|f| f.1).collect();
    assert_eq!(
        granted,
        ["93.184.215.14".parse::<IpAddr>().unwrap()],
        "{doc:#}"
    );
    let excluded: BTreeSet<String> = doc["events"][0]["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["ip"].as_str().unwrap(),
                e["reason"].as_str().unwrap()
            )
        })
        .collect();
    for want in [
        // Inside the cluster subnet OVN-K's ConfigMap names, which holds worker-b's pod subnet.
        "172.20.2.7 inside cluster subnet 172.20.0.0/16",
        "100.65.0.9 inside cluster subnet 100.65.0.0/16",
        "100.89.0.9 inside cluster subnet 100.89.0.0/16",
        "192.168.50.11 inside cluster subnet 192.168.50.11/32",
        "203.0.113.50 inside cluster subnet 203.0.113.50/32",
        "172.21.3.4 inside cluster subnet 172.21.0.0/16",
    ] {
        assert!(excluded.contains(want), "no {want:?} in {excluded:#?}");
    }
    assert!(
        excluded.iter().any(|e| e.starts_with("169.254.169.254 ")),
        "{excluded:#?}"
    );
}

#[test]
fn replay_reports_the_matched_cname_the_excluded_answers_and_invalid_firewalls() {
    let dir = tempfile::tempdir().unwrap();
    let (snapshot, events) = report_inputs(dir.path());
    let args = ["--snapshot", &snapshot, "--events", &events];

    let text = ok_stdout(&args);
    let flow_lines: Vec<&str> = text.lines().filter(|l| l.starts_with("flow ")).collect();
    assert_eq!(flow_lines.len(), 1, "{text}");
    assert!(
        flow_lines[0].contains(
            "reason: www3.l.google.com (CNAME target of www.google.com) matched rule 1 dnsName=*.l.google.com"
        ),
        "{text}"
    );
    // 10.244.1.9 is inside the node's pod subnet.
    for line in [
        "excl  event 1 10.244.1.5 www.google.com: 10.244.1.9: inside cluster subnet 10.244.1.0/24",
        "excl  event 1 10.244.1.5 www.google.com: 142.250.74.36 tcp/25: rule 0 (Deny cidrSelector=142.250.74.0/24 tcp/25) decides it first: rule 1's Allow flow never applies",
        "skip  event 2 10.244.1.8 www.google.com: EgressFirewall invalid: egress[0].ports[0].port:",
    ] {
        assert!(text.lines().any(|l| l.starts_with(line)), "no {line:?}:\n{text}");
    }
    assert!(!text.contains("has no EgressFirewall"), "{text}");
    assert!(text.contains("skipped: 1 EgressFirewall invalid"), "{text}");

    let doc = json(&args);
    let first = &doc["events"][0];
    assert_eq!(first["grants"][0]["queryName"], "www.google.com");
    assert_eq!(first["grants"][0]["matchedName"], "www3.l.google.com");
    assert_eq!(doc["flows"][0]["matchedName"], "www3.l.google.com");
    assert_eq!(first["rules"][0]["matchedName"], "www3.l.google.com");
    assert_eq!(
        first["excluded"],
        serde_json::json!([
            {"ip": "10.244.1.9", "reason": "inside cluster subnet 10.244.1.0/24"},
            {"ip": "142.250.74.36", "port": "tcp/25",
             "reason": "rule 0 (Deny cidrSelector=142.250.74.0/24 tcp/25) decides it first: rule 1's Allow flow never applies"}
        ])
    );
    assert_eq!(doc["summary"]["excluded"], 2);
    let invalid = &doc["events"][1]["skipped"];
    assert_eq!(invalid["reason"], "EgressFirewall invalid");
    assert!(
        invalid["detail"]
            .as_str()
            .unwrap()
            .starts_with("egress[0].ports[0].port:"),
        "{invalid}"
    );
    // The snapshot still warns about the invalid object, and that it has no OVN-K ConfigMap; the
    // replay carries on.
    let warnings = doc["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 2, "{doc:#}");
    assert!(warnings[0]
        .as_str()
        .unwrap()
        .contains("EgressFirewall bad/default"));
    assert!(warnings[1]
        .as_str()
        .unwrap()
        .contains("the service subnet is unknown"));
    assert_eq!(doc["summary"]["events"], 2);
}

#[test]
fn engine_flags_change_the_decision() {
    let strict = json(&["--strict-dns-names"]);
    assert_eq!(
        strict["summary"]["flows"], 0,
        "www.google.com is not google.com in strict mode"
    );
    let other_node = json(&["--node", "ovn-worker2"]);
    assert_eq!(other_node["summary"]["flows"], 0);
    assert_eq!(other_node["summary"]["skipped"]["pod on another node"], 6);
    let own_node = json(&["--node", "ovn-worker"]);
    assert_eq!(flows(&own_node), expected_flows());
    let base = json(&["--priority-base", "2000"]);
    assert!(flows(&base).iter().all(|f| f.2 == 2000));
    // An answer inside a cluster subnet gets nothing.
    let excluded = json(&["--cluster-subnet", "142.250.0.0/16"]);
    assert_eq!(
        excluded["summary"]["flows"], 1,
        "only the IPv6 answer is left"
    );
}

fn assert_clean_failure(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {stderr}");
    assert_ne!(out.status.code(), Some(101), "panicked: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}: {stderr}");
    }
}

#[test]
fn hostile_input_fails_cleanly_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path.to_str().unwrap().to_string()
    };
    let bad_yaml = p("bad.yaml", b"items: [\n  - {kind: Pod\n");
    assert_clean_failure(
        &flowd(&["--snapshot", &bad_yaml]),
        &["bad.yaml", "invalid YAML"],
    );

    // A "billion laughs" of aliases and deep nesting are refused, not expanded.
    let mut laughs = String::from("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for (prev, name) in ('a'..='i').zip('b'..='j') {
        laughs += &format!(
            "{name}: &{name} [{}]\n",
            vec![format!("*{prev}"); 9].join(", ")
        );
    }
    let laughs = p("laughs.yaml", laughs.as_bytes());
    assert_clean_failure(
        &flowd(&["--snapshot", &laughs]),
        &["laughs.yaml", "invalid YAML"],
    );
    let deep = p(
        "deep.yaml",
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).as_bytes(),
    );
    assert_clean_failure(
        &flowd(&["--snapshot", &deep]),
        &["deep.yaml", "invalid YAML"],
    );
    let deep_json = p("deep.json", "[".repeat(100_000).as_bytes());
    assert_clean_failure(
        &flowd(&["--events", &deep_json]),
        &["deep.json", "invalid JSON"],
    );

    let binary_yaml = p("binary.yaml", &[0xff, 0x00, 0xfe]);
    assert_clean_failure(
        &flowd(&["--snapshot", &binary_yaml]),
        &["binary.yaml", "not UTF-8"],
    );

    let capture = std::fs::read(examples().join("google.fstrm")).unwrap();
    let truncated = p("cut.fstrm", &capture[..capture.len() / 2]);
    assert_clean_failure(
        &flowd(&["--capture", &truncated]),
        &["cut.fstrm", "not a readable dnstap capture"],
    );

    let not_capture = p("text.fstrm", b"hello, this is not frame streams at all\n");
    assert_clean_failure(
        &flowd(&["--capture", &not_capture]),
        &["text.fstrm", "not a readable dnstap capture"],
    );

    let bogus = p(
        "bogus.json",
        b"{\"clientIp\": \"10.244.1.5\", \"queryName\": \"a.b\"}\n{\"clientIp\": ",
    );
    assert_clean_failure(
        &flowd(&["--events", &bogus]),
        &["bogus.json", "event 2: invalid JSON"],
    );

    let missing = dir.path().join("missing.yaml");
    let out = flowd(&["--snapshot", missing.to_str().unwrap()]);
    assert_clean_failure(&out, &["missing.yaml"]);
    // An unreadable input is no configuration error, and its cause is printed once.
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
}

#[test]
fn bad_configuration_exits_64_before_any_input_is_read() {
    // The snapshot does not exist: reading it first would fail differently.
    let missing = "/nonexistent/snapshot.yaml";
    for (bad, says) in [
        (&["--cookie-prefix", "0"][..], "--cookie-prefix"),
        (
            &["--idle-floor", "0s", "--idle-grace", "0s"],
            "--idle-floor",
        ),
        (&["--reconcile-interval", "0s"], "--reconcile-interval"),
        (&["--acl-table", "254"], "--acl-table"),
        (&["--node", ""], "--node"),
        (&["--apply", " "], "--apply"),
        // What clap refuses is a usage error too.
        (&["--capture", "a", "--events", "b"], "cannot be used with"),
        (&["--cluster-subnet", "10.0.0.1"], "--cluster-subnet"),
        (&["--output", "yaml"], "--output"),
        (&["--no-such-flag"], "--no-such-flag"),
    ] {
        let out = flowd(&[&["--snapshot", missing][..], bad].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{bad:?}: {stderr}");
        assert!(stderr.contains(says), "{bad:?}: {stderr}");
        assert!(
            !stderr.contains("nonexistent"),
            "{bad:?} read input: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{bad:?}");
    }
    for good in ["--help", "--version"] {
        let out = Command::new(env!("CARGO_BIN_EXE_flowd"))
            .arg(good)
            .output()
            .unwrap();
        assert!(out.status.success(), "{good}: {out:?}");
        assert!(!out.stdout.is_empty(), "{good}");
    }
    // No subcommand at all is a usage error.
    let none = Command::new(env!("CARGO_BIN_EXE_flowd")).output().unwrap();
    assert_eq!(none.status.code(), Some(64), "{none:?}");
}

#[test]
fn random_bytes_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = fastrand::Rng::with_seed(0x646e_7366);
    let capture = std::fs::read(examples().join("google.fstrm")).unwrap();
    for i in 0..12 {
        // Half pure noise, half the real capture with a few bytes flipped.
        let bytes: Vec<u8> = if i % 2 == 0 {
            (0..rng.usize(0..4096)).map(|_| rng.u8(..)).collect()
        } else {
            let mut c = capture.clone();
            for _ in 0..4 {
                let at = rng.usize(..c.len());
                c[at] = rng.u8(..);
            }
            c
        };
        for (flag, name) in [
            ("--capture", "x.fstrm"),
            ("--events", "x.json"),
            ("--snapshot", "x.yaml"),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, &bytes).unwrap();
            let out = flowd(&[flag, path.to_str().unwrap()]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_ne!(out.status.code(), Some(101), "{flag} {i}: {stderr}");
            assert!(!stderr.contains("panicked"), "{flag} {i}: {stderr}");
        }
    }
}

#[test]
fn the_committed_examples_are_what_the_generator_makes() {
    let ex = examples();
    assert!(
        std::fs::read(ex.join("google.fstrm")).unwrap() == example::capture(),
        "examples/google.fstrm drifted: run `cargo run -p flowd --example make_example_capture`"
    );
    assert_eq!(
        std::fs::read_to_string(ex.join("google-events.json")).unwrap(),
        example::events_json(),
        "examples/google-events.json drifted: run `cargo run -p flowd --example make_example_capture`"
    );
}

#[test]
fn the_example_capture_is_a_frame_streams_file_fstrm_dump_reads() {
    let out = Command::new("fstrm_dump")
        .arg(examples().join("google.fstrm"))
        .output()
        .expect(
            "fstrm_dump (Debian package fstrm-bin) must be installed: scripts/test installs it",
        );
    // fstrm_dump prints the frame headers on stderr and the payloads on stdout.
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("\"protobuf:dnstap.Dnstap\""), "{text}");
    assert_eq!(
        text.matches("Data frame").count(),
        example::frames().len(),
        "{text}"
    );
    assert!(text.contains("FSTRM_CONTROL_STOP"), "{text}");
}

#[test]
fn dry_run_prints_the_engines_exact_ovs_ofctl_input() {
    let text = ok_stdout(&["--dry-run-ofctl"]);
    let adds: Vec<&str> = text.lines().filter(|l| l.starts_with("add ")).collect();
    assert_eq!(
        adds.len(),
        6,
        "a new and an established variant per grant: {text}"
    );
    for ip in example::granted_ips() {
        let dst = if ip.is_ipv4() {
            format!(",nw_dst={ip},")
        } else {
            format!(",ipv6_dst={ip},")
        };
        let lines: Vec<&&str> = adds.iter().filter(|l| l.contains(&dst)).collect();
        assert_eq!(lines.len(), 2, "{ip}:\n{text}");
        for line in &lines {
            assert!(line.starts_with("add cookie=0x646e7366"), "{line}");
            assert!(
                line.contains(",table=46,priority=11000,idle_timeout=330,"),
                "{line}"
            );
            assert!(line.contains(",reg15=0x1,"), "toward the router: {line}");
        }
        assert!(lines[0].contains(",reg0=0x80/0x80,"), "{}", lines[0]);
        assert!(
            lines[0].ends_with(",actions=load:0x1->NXM_NX_XXREG0[97],resubmit(,47)"),
            "{}",
            lines[0]
        );
        assert!(lines[1].contains(",reg0=0x100/0x100,"), "{}", lines[1]);
        assert!(lines[1].ends_with(",actions=resubmit(,47)"), "{}", lines[1]);
    }
    // Only typed numbers and addresses reach ovs-ofctl, never a name from DNS.
    assert!(adds.iter().all(|l| !l.contains("google")), "{text}");
    assert!(text.contains("engine: 3 flows in the dry run"), "{text}");

    let custom = json(&[
        "--dry-run-ofctl",
        "--acl-table",
        "44",
        "--idle-floor",
        "10s",
        "--idle-grace",
        "0s",
    ]);
    let ofctl = custom["engine"]["ofctl"].as_str().unwrap();
    let adds: Vec<&str> = ofctl.lines().filter(|l| l.starts_with("add ")).collect();
    assert_eq!(adds.len(), 6, "{ofctl}");
    assert!(
        adds.iter()
            .all(|l| l.contains(",table=44,priority=11000,idle_timeout=274,")
                && l.ends_with("resubmit(,45)")),
        "{ofctl}"
    );
    assert_eq!(custom["engine"]["installed"], 3);
}

/// The seed's case end to end through the real OVN pipeline: `flowd replay --apply br-int` on the shipped
/// capture turns client -> Google's answers from dropped (the EF Deny) into forwarded, and nothing else.
#[test]
fn apply_installs_the_grants_in_a_real_ovn_pipeline() -> anyhow::Result<()> {
    for ovn in crate::sandbox::Ovn::ALL {
        apply_on(ovn).map_err(|e| e.context(format!("on {ovn:?}")))?;
    }
    Ok(())
}

fn apply_on(ovn: crate::sandbox::Ovn) -> anyhow::Result<()> {
    use crate::sandbox::{Sandbox, Trace};
    let sb = Sandbox::start(ovn)?;
    let client = sb.add_pod("abc", "client", 5)?;
    let other = sb.add_pod("abc", "other", 6)?;
    let ef = r#"
apiVersion: k8s.ovn.org/v1
kind: EgressFirewall
metadata: {name: default, namespace: abc}
spec:
  egress:
  - {type: Allow, to: {dnsName: google.com}}
  - {type: Deny, to: {cidrSelector: 0.0.0.0/0}}
  - {type: Deny, to: {cidrSelector: "::/0"}}
"#;
    let snapshot = format!(
        r#"{ef}
---
apiVersion: v1
kind: Node
metadata:
  name: {node}
  annotations: {{k8s.ovn.org/node-subnets: '{{"default":["10.244.1.0/24","fd00:10:244:1::/64"]}}'}}
---
{client}
---
{other}
"#,
        node = Sandbox::NODE,
        client = pod_yaml("client", client.ipv4, client.ipv6),
        other = pod_yaml("other", other.ipv4, other.ipv6),
    );
    let rules = flowd::snapshot::Snapshot::parse(&snapshot, Path::new("t.yaml"))?
        .rules
        .remove("abc")
        .expect("the EgressFirewall validates");
    sb.set_egress_firewall(&rules)?;
    let google: Vec<IpAddr> = example::granted_ips();
    for ip in &google {
        assert_eq!(
            sb.trace(&client, *ip, None)?,
            Trace::Dropped,
            "{ip} before the replay"
        );
    }

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("snapshot.yaml");
    let apply = |path: &Path| {
        Command::new(env!("CARGO_BIN_EXE_flowd"))
            .args(["replay", "--snapshot", path.to_str().unwrap()])
            .args(["--node", Sandbox::NODE, "--apply", "br-int"])
            .envs(sb.env())
            .env_remove("FLOWD_ACL_TABLE")
            .output()
    };
    // Without OVN-K's ConfigMap the service subnet is unknown: nothing is written.
    std::fs::write(&path, &snapshot)?;
    let refused = apply(&path)?;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("refusing --apply"), "{stderr}");
    for ip in &google {
        assert_eq!(
            sb.trace(&client, *ip, None)?,
            Trace::Dropped,
            "{ip} refused"
        );
    }
    let snapshot = format!(
        "{snapshot}\n---\napiVersion: v1\nkind: ConfigMap\n\
         metadata: {{name: ovn-config, namespace: ovn-kubernetes}}\n\
         data: {{net_cidr: 10.244.0.0/16/24, svc_cidr: 10.96.0.0/16}}\n"
    );
    std::fs::write(&path, &snapshot)?;
    let out = apply(&path)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("engine: 3 flows installed in br-int, 0 waiting"),
        "{stdout}"
    );

    for ip in &google {
        assert_eq!(
            sb.trace(&client, *ip, None)?,
            Trace::Forwarded,
            "client -> {ip}"
        );
        assert_eq!(
            sb.trace(&other, *ip, None)?,
            Trace::Dropped,
            "other -> {ip}"
        );
    }
    let unresolved: IpAddr = "142.250.74.99".parse()?;
    assert_eq!(sb.trace(&client, unresolved, None)?, Trace::Dropped);
    let flows = sb.dnsflow_flows(flowd::config::DEFAULT_COOKIE_PREFIX)?;
    assert_eq!(
        flows.len(),
        6,
        "new and established variant per grant: {flows:#?}"
    );
    let table = format!("table={},", ovn.ef_table());
    assert!(flows.iter().all(|f| f.contains(&table)), "{flows:#?}");
    Ok(())
}

fn pod_yaml(name: &str, v4: IpAddr, v6: IpAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: abc}}\n\
         spec: {{nodeName: {node}, containers: []}}\n\
         status: {{phase: Running, podIPs: [{{ip: \"{v4}\"}}, {{ip: \"{v6}\"}}]}}\n",
        node = crate::sandbox::Sandbox::NODE
    )
}

/// A capture recorded from real parts: Unbound (dnstap `CLIENT_RESPONSE`, bidirectional Frame Streams)
/// into the real `fstrm_capture`, queried by `dig` from client IPs that the snapshot gives to pods.
#[test]
fn a_capture_recorded_by_fstrm_capture_from_unbound_replays() -> anyhow::Result<()> {
    use dnsflow_testkit::{dig, require_tool, wait_until, ChildDaemon, Unbound};
    use std::{net::Ipv4Addr, time::Duration};
    require_tool("fstrm_capture")?;
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("dnstap.sock");
    let file = dir.path().join("recorded.fstrm");
    // Debug level 5 makes fstrm_capture log each data frame, which tells when all have arrived.
    let mut capture = ChildDaemon::spawn(
        "fstrm_capture",
        Command::new("fstrm_capture")
            .args(["-ddddd", "-t", "protobuf:dnstap.Dnstap", "-u"])
            .arg(&socket)
            .arg("-w")
            .arg(&file),
        dir.path().join("fstrm_capture.log"),
    )?;
    capture.wait_for_log("opened output file")?;
    let unbound = Unbound::start(&socket, &google_zone())?;
    let client = Ipv4Addr::new(127, 0, 0, 5);
    let web = Ipv4Addr::new(127, 0, 0, 7);
    let a = dig(client, unbound.port(), "WWW.Google.com", "A")?;
    assert!(a.contains(&"142.250.74.36".to_string()), "{a:?}");
    dig(client, unbound.port(), "www.google.com", "AAAA")?;
    dig(client, unbound.port(), "nosuch.google.com", "A")?;
    dig(web, unbound.port(), "www.google.com", "A")?;
    wait_until("four dnstap frames at fstrm_capture", || {
        capture.log().matches("processing data frame").count() >= 4
    })?;
    capture.terminate(Duration::from_secs(5))?;
    drop(unbound);

    let snapshot = loopback_snapshot(dir.path());
    let doc = json(&[
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--capture",
        file.to_str().unwrap(),
    ]);
    assert_eq!(flows(&doc), loopback_flows(), "{doc:#}");
    assert_eq!(doc["summary"]["events"], 4, "{doc:#}");
    assert_eq!(doc["summary"]["skipped"]["not NOERROR"], 1, "{doc:#}");
    assert_eq!(
        doc["summary"]["skipped"]["namespace has no EgressFirewall"], 1,
        "{doc:#}"
    );
    let first = &doc["events"][0];
    assert_eq!(first["queryName"], "www.google.com");
    assert_eq!(first["grants"][0]["ttl"], 274);
    assert_eq!(first["grants"][0]["podIp"], "127.0.0.5");
    Ok(())
}

#[test]
fn events_can_be_piped_in_as_grpcurl_prints_them() {
    use std::{io::Write as _, process::Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowd"))
        .args(["replay", "--events", "-", "--output", "json"])
        .env_remove("FLOWD_STRICT_DNS_NAMES")
        .env_remove("FLOWD_CLUSTER_SUBNETS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let events = std::fs::read(examples().join("google-events.json")).unwrap();
    child.stdin.take().unwrap().write_all(&events).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(flows(&doc), expected_flows());
    assert!(doc["flows"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["time"].is_string()));
}

/// What the real grpcurl prints for `Subscribe` on a live tapd (fed by a real Unbound) replays to the
/// same flows: the `--events` reader accepts grpcurl's own output, not only our rendering of it.
#[tokio::test(flavor = "multi_thread")]
async fn what_grpcurl_prints_from_a_live_tapd_replays() -> anyhow::Result<()> {
    use dnsflow_testkit::{dig, require_tool, tapd_binary, wait_until, TapdProcess, Unbound};
    use std::net::Ipv4Addr;
    require_tool("grpcurl")?;
    let tapd = TapdProcess::spawn(tapd_binary(), &[])?;
    let addrs = tapd.addrs.clone();
    let stream = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let unbound = Unbound::start(&addrs.socket, &google_zone())?;
        let client = Ipv4Addr::new(127, 0, 0, 5);
        dig(client, unbound.port(), "www.google.com", "A")?;
        dig(client, unbound.port(), "www.google.com", "AAAA")?;
        wait_until("tapd to decode both answers", || {
            addrs.metric("tapd_events_total") >= 2
        })?;
        // The answers came before the subscription: ask for the recent ones first, then hang up.
        let out = Command::new("grpcurl")
            .args([
                "-plaintext",
                "-max-time",
                "2",
                "-d",
                r#"{"replay_recent":true}"#,
            ])
            .arg(addrs.grpc.to_string())
            .arg("dnsflow.v1.DnsTap/Subscribe")
            .output()?;
        Ok(String::from_utf8(out.stdout)?)
    })
    .await??;
    drop(tapd);
    assert!(stream.contains("\"clientIp\": \"127.0.0.5\""), "{stream}");

    let dir = tempfile::tempdir()?;
    let events = dir.path().join("grpcurl.json");
    std::fs::write(&events, &stream)?;
    let snapshot = loopback_snapshot(dir.path());
    let doc = json(&[
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
    ]);
    assert_eq!(flows(&doc), loopback_flows(), "{stream}\n{doc:#}");
    assert_eq!(doc["summary"]["skipped"], serde_json::json!({}), "{doc:#}");
    Ok(())
}

/// Unbound serving the seed's names: `www.google.com` CNAME `www3.l.google.com`, with A and AAAA.
fn google_zone() -> dnsflow_testkit::UnboundConfig {
    dnsflow_testkit::UnboundConfig {
        auth_zones: vec![(
            "google.com".into(),
            vec![
                "www 21600 IN CNAME www3.l".into(),
                "www3.l 274 IN A 142.250.74.36".into(),
                "www3.l 274 IN AAAA 2a00:1450:4001:82b::2004".into(),
            ],
        )],
        ..dnsflow_testkit::UnboundConfig::default()
    }
}

/// The seed's namespace for clients that can only be 127.0.0.N on one machine: `abc/client` is
/// 127.0.0.5 (and an IPv6 address for the AAAA answer), `xyz/web` 127.0.0.7 without EgressFirewall.
fn loopback_snapshot(dir: &Path) -> PathBuf {
    let path = dir.join("snapshot.yaml");
    std::fs::write(
        &path,
        r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Pod, metadata: {name: client, namespace: abc},
   spec: {nodeName: n1, containers: []},
   status: {phase: Running, podIPs: [{ip: 127.0.0.5}, {ip: "fd00:10:244:2::5"}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: web, namespace: xyz},
   spec: {nodeName: n1, containers: []}, status: {phase: Running, podIPs: [{ip: 127.0.0.7}]}}
- apiVersion: k8s.ovn.org/v1
  kind: EgressFirewall
  metadata: {name: default, namespace: abc}
  spec:
    egress:
    - {type: Allow, to: {dnsName: google.com}}
    - {type: Deny, to: {cidrSelector: 0.0.0.0/0}}
"#,
    )
    .unwrap();
    path
}

/// The flows `abc/client` of [`loopback_snapshot`] earns from [`google_zone`]'s answers.
fn loopback_flows() -> BTreeSet<(String, IpAddr, u64, u64, String)> {
    ["142.250.74.36", "2a00:1450:4001:82b::2004"]
        .iter()
        .map(|ip| {
            (
                "abc/client".to_string(),
                ip.parse().unwrap(),
                11000,
                0,
                "Allow".to_string(),
            )
        })
        .collect()
}

/// The example's Pods and Node are valid Kubernetes objects (strict schema validation by the real
/// `kubernetes-validate`), so the snapshot is what a cluster would print.
#[test]
fn the_example_snapshot_passes_kubernetes_schema_validation() {
    dnsflow_testkit::require_tool("kubernetes-validate").unwrap();
    let list: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(examples().join("snapshot.yaml")).unwrap())
            .unwrap();
    let items = list["items"].as_sequence().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (i, item) in items.iter().enumerate() {
        if item["kind"] == "EgressFirewall" {
            continue; // a CRD: not in the bundled schemas
        }
        let path = dir.path().join(format!("item{i}.yaml"));
        std::fs::write(&path, serde_yaml::to_string(item).unwrap()).unwrap();
        let out = Command::new("kubernetes-validate")
            .arg("--strict")
            .arg(&path)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success() && text.contains(" passed "), "{text}");
        checked += 1;
    }
    assert_eq!(checked, 5, "three pods, a node and OVN-K's ConfigMap");
}

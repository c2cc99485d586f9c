//! Benchmark of the decision and of snapshot loading (figures, not a test):
//!
//! ```sh
//! cargo run --release -p flowd --example bench_policy
//! ```
//!
//! - `decide`, the seed's rules (dnsName Allow + 0.0.0.0/0 Deny), an answer with a CNAME and 4 IPs;
//! - `decide` against 8000 rules (OVN-K's maximum) where only the last one matches: the worst case;
//! - `explain` of one name against those 8000 rules;
//! - loading a 5,000-pod `kubectl get -o yaml` snapshot.

use flowd::{
    egressfirewall::EgressFirewall,
    model::{PodInfo, PodKey},
    policy::{decide, explain, PolicySettings},
    rules::FirewallRules,
    snapshot::Snapshot,
};
use serde_json::json;
use std::{
    hint::black_box,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant, UNIX_EPOCH},
};
use tapd::{Answer, DnsName, DnsResponse};

fn rules(egress: Vec<serde_json::Value>) -> FirewallRules {
    let ef: EgressFirewall = serde_json::from_value(json!({
        "apiVersion": "k8s.ovn.org/v1", "kind": "EgressFirewall",
        "metadata": {"name": "default", "namespace": "abc"},
        "spec": {"egress": egress}
    }))
    .expect("valid object");
    FirewallRules::from_egress_firewall(&ef).expect("valid rules")
}

fn response() -> DnsResponse {
    DnsResponse {
        client: IpAddr::from([10, 244, 1, 5]),
        qname: DnsName::new("www.google.com").expect("name"),
        qtype: 1,
        rcode: 0,
        cname_chain: vec![DnsName::new("www3.l.google.com").expect("name")],
        answers: (0..4)
            .map(|i| Answer {
                ip: IpAddr::from([142, 250, 74, 36 + i]),
                ttl: 300,
            })
            .collect(),
        response_time: None,
        decoded_time: UNIX_EPOCH,
        server_identity: String::new(),
        sequence: 1,
        replayed: false,
    }
}

/// Runs `f` for about a second and returns the mean time per call.
fn measure(mut f: impl FnMut()) -> Duration {
    let budget = Duration::from_secs(1);
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < budget || n < 10 {
        f();
        n += 1;
    }
    start.elapsed() / n
}

fn report(what: &str, per_call: Duration) {
    let per_sec = 1.0 / per_call.as_secs_f64();
    println!(
        "{what:<58} {:>10.2} µs/op {per_sec:>12.0} op/s",
        per_call.as_secs_f64() * 1e6
    );
}

fn main() {
    let pod = PodInfo {
        key: PodKey::new("abc", "client"),
        ips: vec![IpAddr::from([10, 244, 1, 5])],
        node: "ovn-worker".into(),
    };
    let settings = PolicySettings {
        cluster_subnets: flowd::settings::EngineSettings::default().cluster_subnets,
        ..PolicySettings::default()
    };
    let resp = response();

    let seed = rules(vec![
        json!({"type": "Allow", "to": {"dnsName": "google.com"}}),
        json!({"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}),
    ]);
    assert_eq!(decide(&resp, &pod, &seed, &settings).grants.len(), 4);
    report(
        "decide: seed rules, CNAME, 4 answers",
        measure(|| {
            black_box(decide(black_box(&resp), &pod, &seed, &settings));
        }),
    );

    let mut egress: Vec<serde_json::Value> = (0..7999)
        .map(|i| json!({"type": "Allow", "to": {"dnsName": format!("host{i}.example.org")}}))
        .collect();
    egress.push(json!({"type": "Allow", "to": {"dnsName": "*.l.google.com"}}));
    let worst = rules(egress);
    assert_eq!(decide(&resp, &pod, &worst, &settings).grants.len(), 4);
    report(
        "decide: 8000 rules, only the last matches",
        measure(|| {
            black_box(decide(black_box(&resp), &pod, &worst, &settings));
        }),
    );
    let names: Vec<&DnsName> = resp.names().collect();
    report(
        "explain: 8000 rules",
        measure(|| {
            black_box(explain(black_box(&names), &worst, &settings));
        }),
    );

    let mut yaml = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for i in 0..5000u32 {
        yaml += &format!(
            "- apiVersion: v1\n  kind: Pod\n  metadata: {{name: pod{i}, namespace: ns{}, labels: {{app: web}}}}\n  \
             spec: {{nodeName: node{}, containers: [{{name: c, image: nginx, ports: [{{containerPort: 80}}]}}]}}\n  \
             status: {{phase: Running, podIP: 10.{}.{}.{}, podIPs: [{{ip: 10.{}.{}.{}}}]}}\n",
            i % 50,
            i % 20,
            i >> 16, (i >> 8) & 255, i & 255,
            i >> 16, (i >> 8) & 255, i & 255,
        );
    }
    let snap = Snapshot::parse(&yaml, Path::new("bench.yaml")).expect("valid");
    assert_eq!(snap.pods.len(), 5000);
    println!("snapshot of 5,000 pods: {} KiB", yaml.len() / 1024);
    report(
        "snapshot: parse 5,000 pods",
        measure(|| {
            black_box(Snapshot::parse(black_box(&yaml), Path::new("bench.yaml")).expect("valid"));
        }),
    );
}

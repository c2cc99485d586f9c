//! Benchmark of the decision and of snapshot loading (figures, not a test):
//!
//! ```sh
//! cargo run --release -p flowd --example bench_policy
//! ```
//!
//! - `decide`, the seed's rules (dnsName Allow + 0.0.0.0/0 Deny), an answer with a CNAME and 4 IPs;
//! - `decide` against 8000 rules (OVN-K's maximum) where only the last one matches: the worst case;
//! - `explain` of one name against those 8000 rules;
//! - loading a 5,000-pod `kubectl get -o yaml` snapshot;
//! - replay's pipeline per event: capture decoding (dnstap + DNS) and the planner, 20,000 answers.

use dnsflow_dnstap::{Answer, DnsName, DnsResponse};
use flowd::{
    egressfirewall::EgressFirewall,
    model::{PodInfo, PodKey},
    policy::{decide, explain, PolicySettings},
    replay::{events::read_capture, Planner},
    rules::FirewallRules,
    snapshot::Snapshot,
};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{rdata::A, Name, RData, Record, RecordType},
};
use serde_json::json;
use std::{
    hint::black_box,
    net::IpAddr,
    path::Path,
    str::FromStr,
    time::{Duration, Instant, UNIX_EPOCH},
};

fn rules(egress: Vec<serde_json::Value>) -> FirewallRules {
    let ef = EgressFirewall::inline("abc", json!(egress)).expect("valid object");
    FirewallRules::from_egress_firewall(&ef).expect("valid rules")
}

fn response() -> DnsResponse {
    let answers = (0..4).map(|i| Answer {
        ip: IpAddr::from([142, 250, 74, 36 + i]),
        ttl: 300,
    });
    DnsResponse::noerror(
        IpAddr::from([10, 244, 1, 5]),
        DnsName::new("www.google.com").expect("name"),
        vec![DnsName::new("www3.l.google.com").expect("name")],
        answers.collect(),
    )
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
        uid: None,
        key: PodKey::new("abc", "client"),
        ips: vec![IpAddr::from([10, 244, 1, 5])],
        node: "ovn-worker".into(),
    };
    let settings = PolicySettings {
        cluster_subnets: flowd::config::EngineSettings::default().cluster_subnets,
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

    // Replay: 20,000 answers from the 5,000 pods above, half of them in a namespace with rules.
    let mut snap = snap;
    for ns in 0..25 {
        let mut r = seed.clone();
        r.namespace = format!("ns{ns}");
        snap.rules.insert(r.namespace.clone(), r);
    }
    let cdn = Name::from_str("www3.l.google.com.").expect("name");
    let mut m = Message::new(1, MessageType::Response, OpCode::Query);
    m.add_query(Query::query(
        Name::from_str("www.google.com.").expect("name"),
        RecordType::A,
    ));
    m.add_answer(Record::from_rdata(
        Name::from_str("www.google.com.").expect("name"),
        300,
        RData::CNAME(hickory_proto::rr::rdata::CNAME(cdn.clone())),
    ));
    for i in 0..4u8 {
        m.add_answer(Record::from_rdata(
            cdn.clone(),
            300,
            RData::A(A::new(142, 250, 74, i)),
        ));
    }
    let wire = m.to_vec().expect("encodes");
    let mut w = dnsflow_dnstap::CaptureWriter::new(Vec::new()).expect("writer");
    const EVENTS: u32 = 20_000;
    for i in 0..EVENTS {
        let pod = i % 5000;
        let client = [
            10,
            (pod >> 16) as u8,
            ((pod >> 8) & 255) as u8,
            (pod & 255) as u8,
        ];
        let frame = dnsflow_dnstap::dnstap::client_response_frame(None, &client, &wire, UNIX_EPOCH);
        w.write_frame(&frame).expect("write");
    }
    let capture = w.finish().expect("finish");
    let planner = Planner::new(&snap, settings.clone(), None);
    let per_run = measure(|| {
        let mut grants = 0usize;
        read_capture(capture.as_slice(), "bench", |item| {
            if let Ok(g) = planner.plan(0, item).result {
                grants += g.len();
            }
        })
        .expect("reads");
        assert_eq!(grants, EVENTS as usize / 2 * 4);
    });
    report(
        "replay: decode + plan, per event (20,000 events)",
        per_run / EVENTS,
    );
}

//! The whole pipeline on real parts: Unbound with dnstap → tapd (the real binary) → gRPC → flowd's node
//! loop (cluster state from the fake API server) → `ovs-ofctl` → a real OVN node. A `dig` for an allowed
//! name flips `ofproto/trace` for that pod to the answer from drop to forward; the time from the DNS
//! answer reaching the client to the flow being in br-int is measured and printed.
//!
//! The pod carries two IPs. `dig -b 127.0.0.N` is the only way to pick a DNS client address on this
//! machine, so `127.0.0.N` is how the pod shows up in dnstap; but OVN's router drops every packet with a
//! loopback source, so in OVN the pod has a real pod-subnet address (`10.244.1.N`). Both are the pod's
//! `status.podIPs` in the fake API server: flowd maps the DNS client to the pod by either, and installs the
//! flow from the pod's first IP of the answer's family, which is what `ofproto/trace` sends from.

use crate::{
    apiserver::{egress_firewall, node, FakeApiServer, Resource},
    cluster::{dig_from, eventually, static_upstream, Node, Tapd, NODE},
    sandbox::{Pod, Sandbox, Trace},
};
use dnsflow_proto::v1::{dns_tap_client::DnsTapClient, SubscribeRequest};
use dnsflow_testkit::{Unbound, UnboundConfig};
use flowd::{config::EngineSettings, engine::Engine, rules::FirewallRules};
use serde_json::json;
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};
use tokio::task::block_in_place;

/// Names the pod resolves, one per measurement, each with its own answer.
const NAMES: usize = 5;
/// How often the test looks for the flow while measuring (one `ovs-ofctl dump-flows` takes ~4 ms).
const POLL: Duration = Duration::from_millis(2);
/// The longest a flow may take to appear before the test fails.
const FLOW_DEADLINE: Duration = Duration::from_secs(10);

fn answer(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 10 + i as u8))
}

/// The fake API server's view of the sandbox pod: its OVN address first, its loopback twin second.
fn dual_ip_pod(name: &str, ovn_ip: IpAddr, dns_ip: Ipv4Addr) -> serde_json::Value {
    json!({
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": ovn_ip.to_string(),
                   "podIPs": [{"ip": ovn_ip.to_string()}, {"ip": dns_ip.to_string()}]},
    })
}

/// An OVN 25.03 node with pods `demo/client` and `demo/other` under "Allow example.com, then Deny
/// all", and the fake API server's view of it: this node (its pod subnet and the loopback one `dig -b`
/// picks clients from), both pods with their loopback twins (`127.0.0.5`, `127.0.0.6`), the
/// EgressFirewall.
pub struct Demo {
    pub sb: Sandbox,
    pub client: Pod,
    pub other: Pod,
    pub api: FakeApiServer,
}

pub async fn demo() -> Demo {
    demo_on(crate::sandbox::Ovn::V25_03).await
}

/// [`demo`] on `ovn`.
pub async fn demo_on(ovn: crate::sandbox::Ovn) -> Demo {
    let sb = block_in_place(|| Sandbox::start(ovn)).unwrap();
    let client = block_in_place(|| sb.add_pod("demo", "client", 5)).unwrap();
    let other = block_in_place(|| sb.add_pod("demo", "other", 6)).unwrap();
    let ef = egress_firewall(
        "demo",
        json!([{"type": "Allow", "to": {"dnsName": "example.com"}},
               {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}]),
    );
    let rules =
        FirewallRules::from_egress_firewall(&serde_json::from_value(ef.clone()).unwrap()).unwrap();
    block_in_place(|| sb.set_egress_firewall(&rules)).unwrap();
    let api = FakeApiServer::start().await;
    let mut this_node = node(NODE, "10.244.1.0/24");
    this_node["metadata"]["annotations"]["k8s.ovn.org/node-subnets"] =
        json!(json!({"default": ["10.244.1.0/24", "127.0.0.0/24"]}).to_string());
    api.apply(this_node);
    api.apply(dual_ip_pod(
        "client",
        client.ipv4,
        Ipv4Addr::new(127, 0, 0, 5),
    ));
    api.apply(dual_ip_pod(
        "other",
        other.ipv4,
        Ipv4Addr::new(127, 0, 0, 6),
    ));
    api.apply(ef);
    api.apply(crate::apiserver::ovn_config(
        "10.244.0.0/16/24",
        crate::cluster::SERVICE_SUBNET,
    ));
    api.apply(crate::cluster::kube_dns_service(
        crate::sandbox::KUBE_DNS_VIP,
    ));
    Demo {
        sb,
        client,
        other,
        api,
    }
}

/// Subscribes to `tapd` and records when it decoded each name (`decoded_time`).
async fn watch_decoded_times(tapd: &Tapd) -> Arc<Mutex<HashMap<String, SystemTime>>> {
    let times = Arc::new(Mutex::new(HashMap::new()));
    let mut client = DnsTapClient::connect(format!("http://{}", tapd.grpc))
        .await
        .unwrap();
    let mut stream = client
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let sink = times.clone();
    tokio::spawn(async move {
        while let Ok(Some(ev)) = stream.message().await {
            let ev = dnsflow_dnstap::DnsResponse::try_from(ev).unwrap();
            sink.lock()
                .unwrap()
                .insert(ev.qname.to_string(), ev.decoded_time);
        }
    });
    times
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_for_an_allowed_name_flips_the_trace_from_drop_to_forward() {
    let Demo {
        sb,
        client: pod,
        other,
        api,
    } = demo().await;
    let dns_ip = Ipv4Addr::new(127, 0, 0, 5);

    let tapd = Tapd::start();
    let records: Vec<String> = (0..NAMES)
        .map(|i| format!("n{i}.example.com. 300 IN A {}", answer(i)))
        .chain(["www.not-allowed.test. 300 IN A 198.51.100.99".to_string()])
        .collect();
    let dns = Unbound::start(
        &tapd.socket,
        &UnboundConfig {
            local_data: records,
            ..UnboundConfig::default()
        },
    )
    .unwrap();

    let engine = Engine::new(EngineSettings::default(), sb.ofctl());
    let node = Node::start(&api, engine, static_upstream(&[&tapd]));
    node.ready().await;
    eventually("the tapd subscription", || node.tapd_connected() == 1).await;

    // A second subscriber beside flowd, to learn when tapd decoded each answer: Unbound, like CoreDNS,
    // buffers dnstap for about a second, which is not dnsflow's to measure.
    let decoded = watch_decoded_times(&tapd).await;

    let trace =
        |p: &crate::sandbox::Pod, dst: IpAddr| block_in_place(|| sb.trace(p, dst, None)).unwrap();
    for i in 0..NAMES {
        assert_eq!(
            trace(&pod, answer(i)),
            Trace::Dropped,
            "the EgressFirewall's Deny holds before DNS"
        );
    }
    // A name no rule allows: still dropped afterwards.
    dig_from(dns_ip, dns.port(), "www.not-allowed.test").await;

    let mut latencies = Vec::new();
    let mut after_decode = Vec::new();
    for i in 0..NAMES {
        let lines = dig_from(dns_ip, dns.port(), &format!("n{i}.example.com")).await;
        let answered = Instant::now();
        assert_eq!(lines, [answer(i).to_string()]);
        let needle = format!("nw_dst={}", answer(i));
        loop {
            let flows =
                block_in_place(|| sb.dnsflow_flows(EngineSettings::default().cookie_prefix))
                    .unwrap();
            if flows.iter().any(|f| f.contains(&needle)) {
                break;
            }
            assert!(
                answered.elapsed() < FLOW_DEADLINE,
                "no flow for {needle}: {flows:?}"
            );
            tokio::time::sleep(POLL).await;
        }
        latencies.push(answered.elapsed());
        let seen = SystemTime::now();
        let name = format!("n{i}.example.com");
        let at = decoded
            .lock()
            .unwrap()
            .get(&name)
            .copied()
            .unwrap_or_else(|| panic!("the side subscriber never saw {name}"));
        after_decode.push(seen.duration_since(at).unwrap_or_default());
        assert_eq!(
            trace(&pod, answer(i)),
            Trace::Forwarded,
            "the pod reaches what it resolved"
        );
        assert_eq!(
            trace(&other, answer(i)),
            Trace::Dropped,
            "another pod of the namespace does not"
        );
    }
    let not_allowed: IpAddr = "198.51.100.99".parse().unwrap();
    assert_eq!(trace(&pod, not_allowed), Trace::Dropped);

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let summary = |mut v: Vec<Duration>| {
        v.sort();
        format!(
            "min {:.1} ms, median {:.1} ms, max {:.1} ms",
            ms(v[0]),
            ms(v[v.len() / 2]),
            ms(v[v.len() - 1])
        )
    };
    eprintln!(
        "pipeline ({NAMES} names; each figure includes the dump-flows poll, ~4 ms):\n  \
         DNS answer at the client -> flow in br-int: {}\n  \
         tapd decoded the answer  -> flow in br-int: {}",
        summary(latencies),
        summary(after_decode),
    );

    // The pod is deleted in the API: its flows leave br-int and the Deny holds again.
    api.delete(Resource::Pods, "demo", "client");
    let prefix = EngineSettings::default().cookie_prefix;
    eventually("the deleted pod's flows to leave br-int", || {
        block_in_place(|| sb.dnsflow_flows(prefix))
            .unwrap()
            .iter()
            .all(|f| !f.contains(&format!("nw_src={}", pod.ipv4)))
    })
    .await;
    assert_eq!(trace(&pod, answer(0)), Trace::Dropped);
    node.stop().await;
}

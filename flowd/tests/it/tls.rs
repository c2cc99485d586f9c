//! flowd's subscriptions over mutual TLS, against the real tapd with certificates from the shipped
//! `deploy/tls/make-certs.sh`: with its certificate flowd receives the answers; a tapd that cannot
//! prove the expected identity gets no subscription, only failures.

use crate::cluster::upstream_args;
use dnsflow_dnstap::DnsResponse;
use dnsflow_testkit::{
    dig, make_certs, tapd_binary, tapd_tls_args, wait_until, TapdProcess, Unbound, UnboundConfig,
};
use flowd::upstream::{UpstreamStats, Upstreams};
use std::{net::Ipv4Addr, path::Path, sync::Arc, time::Duration};
use tokio::sync::{mpsc, watch};

fn tapd_with(certs: &Path) -> TapdProcess {
    let args = tapd_tls_args(certs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TapdProcess::spawn(tapd_binary(), &args).unwrap()
}

/// One tapd subscribed to like `flowd run` does, for the 127.0.0.0/24 clients.
struct Subscribed {
    events: mpsc::Receiver<DnsResponse>,
    stats: Arc<UpstreamStats>,
    _upstreams: Upstreams,
    _subnets: watch::Sender<Vec<ipnet::IpNet>>,
}

fn subscribe(tapd: &TapdProcess, flags: &[&str]) -> Subscribed {
    let grpc = tapd.addrs.grpc.to_string();
    let mut args = vec!["--tapd-endpoints", &grpc];
    args.extend_from_slice(flags);
    let settings = upstream_args(&args).session();
    let (subnets_tx, subnets) = watch::channel(vec!["127.0.0.0/24".parse().unwrap()]);
    let (events, rx) = mpsc::channel(16);
    let stats = Arc::new(UpstreamStats::default());
    let mut upstreams = Upstreams::new(subnets, events, stats.clone(), settings);
    upstreams.set_endpoints(&[tapd.addrs.grpc].into_iter().collect());
    Subscribed {
        events: rx,
        stats,
        _upstreams: upstreams,
        _subnets: subnets_tx,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn flowd_subscribes_with_its_certificate_and_refuses_a_tapd_that_is_not_tapd() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path(), &[]).unwrap();
    make_certs(certs.path(), &["impostor:server", "intruder:client"]).unwrap();
    let f = |name: &str| certs.path().join(name).display().to_string();
    let (ca, cert, key) = (f("ca.crt"), f("flowd.crt"), f("flowd.key"));
    let flowd_tls = [
        "--tapd-tls-ca",
        &ca,
        "--tapd-tls-cert",
        &cert,
        "--tapd-tls-key",
        &key,
    ];

    let tapd = tapd_with(certs.path());
    let mut flowd = subscribe(&tapd, &flowd_tls);
    wait_until("flowd's subscription", || {
        tapd.addrs.metric("tapd_subscribers") == 1
    })
    .unwrap();
    let zone = UnboundConfig {
        local_data: vec!["tls.example.test. 60 IN A 192.0.2.7".into()],
        ..UnboundConfig::default()
    };
    let unbound = Unbound::start(&tapd.addrs.socket, &zone).unwrap();
    let client = Ipv4Addr::new(127, 0, 0, 9);
    let port = unbound.port();
    tokio::task::spawn_blocking(move || dig(client, port, "tls.example.test", "A").unwrap())
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), flowd.events.recv())
        .await
        .expect("an answer over TLS")
        .unwrap();
    assert_eq!(got.client.to_string(), "127.0.0.9");
    assert_eq!(got.qname.as_str(), "tls.example.test");
    assert_eq!(flowd.stats.failures.get(), 0);

    // A tapd whose certificate (from the same CA) names another identity.
    let impostor = tempfile::tempdir().unwrap();
    for (from, to) in [
        ("impostor.crt", "tapd.crt"),
        ("impostor.key", "tapd.key"),
        ("ca.crt", "ca.crt"),
    ] {
        std::fs::copy(certs.path().join(from), impostor.path().join(to)).unwrap();
    }
    let fake = tapd_with(impostor.path());
    let mut impostor = subscribe(&fake, &flowd_tls);
    wait_until("failed subscriptions", || {
        impostor.stats.failures.get() >= 2
    })
    .unwrap();
    assert_eq!(fake.addrs.metric("tapd_subscribers"), 0);
    assert!(impostor.events.try_recv().is_err());

    // A certificate of the CA that names no identity allowed to subscribe: tapd refuses it.
    let (intruder_cert, intruder_key) = (f("intruder.crt"), f("intruder.key"));
    let intruder = [
        "--tapd-tls-ca",
        &ca,
        "--tapd-tls-cert",
        &intruder_cert,
        "--tapd-tls-key",
        &intruder_key,
    ];
    let intruding = subscribe(&tapd, &intruder);
    wait_until("failed subscriptions", || {
        intruding.stats.failures.get() >= 1
    })
    .unwrap();
    assert!(
        tapd.addrs
            .metric("tapd_grpc_refused_total{reason=\"identity\"}")
            >= 1
    );
}

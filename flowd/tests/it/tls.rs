//! flowd's subscriptions over mutual TLS, against the real tapd with certificates from the shipped
//! `deploy/tls/make-certs.sh`: with its certificate flowd receives the answers; a tapd that cannot
//! prove the expected identity gets no subscription, only failures, and for that reason: the very
//! same tapd is accepted when flowd expects the name its certificate proves.

use crate::cluster::upstream_args;
use dnsflow_dnstap::DnsResponse;
use dnsflow_testkit::{
    dig, make_certs, tapd_binary, tapd_tls_args, TapdProcess, Unbound, UnboundConfig,
};
use flowd::upstream::{UpstreamStats, Upstreams};
use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::{mpsc, watch};
use tracing::{span, Event, Level, Metadata};

/// How long a subscription may take to connect, fail or deliver (generous for a loaded machine).
const WAIT: Duration = Duration::from_secs(20);

fn tapd_with(certs: &Path) -> TapdProcess {
    let args = tapd_tls_args(certs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TapdProcess::spawn(tapd_binary(), &args).unwrap()
}

/// One tapd subscribed to like `flowd run` does, for the 127.0.0.0/24 clients.
struct Subscribed {
    events: mpsc::Receiver<DnsResponse>,
    stats: Arc<UpstreamStats>,
    /// Dropping it ends the subscription.
    upstreams: Option<Upstreams>,
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
        upstreams: Some(upstreams),
        _subnets: subnets_tx,
    }
}

/// The warnings flowd logs (each event's fields, `name=value`), as long as it is this thread's
/// subscriber: the test runs on a current-thread runtime, so every subscription task logs here, and
/// no other test's line does.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl Warnings {
    /// The lines logged since `from` lines.
    fn since(&self, from: usize) -> Vec<String> {
        self.0.lock().unwrap()[from..].to_vec()
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

impl tracing::Subscriber for Warnings {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.is_event() && *metadata.level() <= Level::WARN
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = String::new();
        event.record(
            &mut |field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
                let _ = write!(line, "{}={value:?} ", field.name());
            },
        );
        self.0.lock().unwrap().push(line.trim_end().to_owned());
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

/// Waits for `what` without blocking the runtime the subscriptions run on.
async fn until(what: &str, check: impl FnMut() -> bool) {
    crate::ovn::poll(WAIT, check)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// Resolves `name` from `client` through `unbound`, then waits for the answer on `subscribed`.
async fn answered(subscribed: &mut Subscribed, unbound: &Unbound, client: Ipv4Addr, name: &str) {
    let (port, qname) = (unbound.port(), name.to_owned());
    tokio::task::spawn_blocking(move || dig(client, port, &qname, "A").unwrap())
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, subscribed.events.recv())
        .await
        .unwrap_or_else(|_| panic!("no answer for {name} over TLS"))
        .unwrap();
    assert_eq!(got.client, client);
    assert_eq!(got.qname.as_str(), name);
}

/// An Unbound answering `name` (A 192.0.2.7) that reports to `tapd`.
fn unbound_for(tapd: &TapdProcess, name: &str) -> Unbound {
    let zone = UnboundConfig {
        local_data: vec![format!("{name}. 60 IN A 192.0.2.7")],
        ..UnboundConfig::default()
    };
    Unbound::start(&tapd.addrs.socket, &zone).unwrap()
}

// A current-thread runtime, so that `Warnings` sees every line the subscriptions log.
#[tokio::test]
async fn flowd_subscribes_with_its_certificate_and_refuses_a_tapd_that_is_not_tapd() {
    let warnings = Warnings::default();
    let _logging = tracing::subscriber::set_default(warnings.clone());
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
    until("flowd's subscription", || {
        tapd.addrs.metric("tapd_subscribers") == 1
    })
    .await;
    let unbound = unbound_for(&tapd, "tls.example.test");
    answered(
        &mut flowd,
        &unbound,
        Ipv4Addr::new(127, 0, 0, 9),
        "tls.example.test",
    )
    .await;
    assert_eq!(flowd.stats.failures.get(), 0);
    assert_eq!(warnings.since(0), Vec::<String>::new());

    // A tapd whose certificate (from the same CA) names another identity: impostor.dnsflow.
    let impostor = tempfile::tempdir().unwrap();
    for (from, to) in [
        ("impostor.crt", "tapd.crt"),
        ("impostor.key", "tapd.key"),
        ("ca.crt", "ca.crt"),
    ] {
        std::fs::copy(certs.path().join(from), impostor.path().join(to)).unwrap();
    }
    let fake = tapd_with(impostor.path());
    let handshakes = "tapd_grpc_refused_total{reason=\"handshake\"}";
    let mut refused = subscribe(&fake, &flowd_tls);
    until("failed subscriptions", || refused.stats.failures.get() >= 2).await;
    drop(refused.upstreams.take());
    assert_eq!(fake.addrs.metric("tapd_subscribers"), 0);
    assert!(refused.events.try_recv().is_err());
    // Refused in the TLS handshake, by flowd, for the name the certificate proves: not for
    // unreadable material ("TLS: ..."), a timeout, an unknown CA, or tapd turning flowd's
    // certificate away (which fails the subscribe call, "subscribe: ...").
    let lines = warnings.since(0);
    assert!(lines.len() >= 2, "{lines:#?}");
    for line in &lines {
        assert!(
            line.starts_with(
                "message=tapd subscription failed error=connect: transport error: invalid peer \
                 certificate: certificate not valid for name \"tapd.dnsflow\"; certificate is \
                 only valid for DnsName(\"impostor.dnsflow\") "
            ),
            "{lines:#?}"
        );
    }
    assert!(fake.addrs.metric(handshakes) >= 2);
    assert_eq!(
        fake.addrs
            .metric("tapd_grpc_refused_total{reason=\"identity\"}"),
        0
    );

    // The control: the very same tapd process, its certificate and flowd's material unchanged,
    // accepted the moment flowd expects the name that certificate proves. So the refusal above
    // was for the name, and for nothing else in the setup (a CA, a path, a key).
    let (logged, refusals) = (warnings.len(), fake.addrs.metric(handshakes));
    let mut accepted = subscribe(
        &fake,
        &[&flowd_tls[..], &["--tapd-server-name", "impostor.dnsflow"]].concat(),
    );
    until("the subscription under the right name", || {
        fake.addrs.metric("tapd_subscribers") == 1
    })
    .await;
    let unbound = unbound_for(&fake, "control.example.test");
    answered(
        &mut accepted,
        &unbound,
        Ipv4Addr::new(127, 0, 0, 10),
        "control.example.test",
    )
    .await;
    assert_eq!(accepted.stats.failures.get(), 0);
    assert_eq!(fake.addrs.metric(handshakes), refusals);
    assert_eq!(warnings.since(logged), Vec::<String>::new());

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
    let logged = warnings.len();
    let intruding = subscribe(&tapd, &intruder);
    until("failed subscriptions", || {
        intruding.stats.failures.get() >= 1
    })
    .await;
    assert!(
        tapd.addrs
            .metric("tapd_grpc_refused_total{reason=\"identity\"}")
            >= 1
    );
    // This time tapd is the one that refuses, and flowd says so.
    let lines = warnings.since(logged);
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("message=tapd subscription failed error=subscribe: ")),
        "{lines:#?}"
    );
}

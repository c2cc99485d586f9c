//! Mutual TLS on the event stream, with certificates from the shipped `deploy/tls/make-certs.sh`: only
//! a client certificate of tapd's client CA that names an allowed identity subscribes; the client
//! checks tapd's identity; grpcurl works with the operator's certificate; rotated files take effect;
//! and without TLS tapd serves only loopback unless told otherwise.

use crate::common::{collect, tapd, Sender};
use dnsflow_proto::v1::{dns_tap_client::DnsTapClient, DnsEvent, SubscribeRequest};
use dnsflow_testkit::{
    free_port, make_certs, require_tool, tapd_tls_args, wait_until, ChildDaemon, TapdAddrs,
    TapdProcess,
};
use std::{
    path::{Path, PathBuf},
    process::Command,
};
use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
    Code, Streaming,
};

/// Where a client's material comes from: the CA it trusts, its own certificate (if any), and the
/// identity it expects tapd to prove.
#[derive(Clone)]
struct Client {
    ca: PathBuf,
    cert: Option<(PathBuf, &'static str)>,
    server_name: &'static str,
}

impl Client {
    /// flowd's certificate from `dir`, trusting the CA of `dir`.
    fn flowd(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.crt"),
            cert: Some((dir.to_path_buf(), "flowd")),
            server_name: "tapd.dnsflow",
        }
    }

    async fn subscribe(&self, addrs: &TapdAddrs) -> Result<Streaming<DnsEvent>, tonic::Status> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(&self.ca).unwrap()))
            .domain_name(self.server_name);
        if let Some((dir, name)) = &self.cert {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(dir.join(format!("{name}.crt"))).unwrap(),
                std::fs::read(dir.join(format!("{name}.key"))).unwrap(),
            ));
        }
        let channel = Channel::from_shared(format!("https://{}", addrs.grpc))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
        Ok(DnsTapClient::new(channel)
            .subscribe(SubscribeRequest {
                client_cidrs: Vec::new(),
                replay_recent: true,
            })
            .await?
            .into_inner())
    }
}

fn start(dir: &Path, extra: &[&str]) -> TapdProcess {
    let mut flags = tapd_tls_args(dir);
    flags.extend(extra.iter().map(ToString::to_string));
    tapd(&flags.iter().map(String::as_str).collect::<Vec<_>>())
}

#[tokio::test(flavor = "multi_thread")]
async fn only_an_allowed_identity_of_the_client_ca_subscribes_and_tapd_proves_its_own() {
    let ours = tempfile::tempdir().unwrap();
    make_certs(ours.path(), &[]).unwrap();
    make_certs(ours.path(), &["intruder:client", "evil:server"]).unwrap();
    let theirs = tempfile::tempdir().unwrap();
    make_certs(theirs.path(), &["flowd:client"]).unwrap();
    let tapd = start(ours.path(), &[]);

    let flowd = Client::flowd(ours.path());
    let mut stream = flowd
        .subscribe(&tapd.addrs)
        .await
        .expect("flowd subscribes");
    wait_until("the subscriber", || {
        tapd.addrs.metric("tapd_subscribers") == 1
    })
    .unwrap();
    let mut dns = Sender::connect(&tapd.addrs.socket, true).await;
    dns.answer([10, 0, 0, 7], "tls.example.", [192, 0, 2, 7])
        .await;
    assert_eq!(collect(&mut stream, 1).await[0].query_name, "tls.example");

    // No client certificate, and one from another CA: the handshake fails.
    let anonymous = Client {
        cert: None,
        ..flowd.clone()
    };
    assert!(anonymous.subscribe(&tapd.addrs).await.is_err());
    let foreign = Client {
        cert: Some((theirs.path().to_path_buf(), "flowd")),
        ..flowd.clone()
    };
    assert!(foreign.subscribe(&tapd.addrs).await.is_err());
    wait_until("two refused handshakes", || {
        tapd.addrs
            .metric("tapd_grpc_refused_total{reason=\"handshake\"}")
            >= 2
    })
    .unwrap();

    // Our CA, but an identity not allowed to subscribe.
    let intruder = Client {
        cert: Some((ours.path().to_path_buf(), "intruder")),
        ..flowd.clone()
    };
    let refused = intruder.subscribe(&tapd.addrs).await.expect_err("refused");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("flowd.dnsflow"), "{refused:?}");
    assert_eq!(
        tapd.addrs
            .metric("tapd_grpc_refused_total{reason=\"identity\"}"),
        1
    );

    // The client checks tapd's identity: a tapd that cannot prove the expected name is refused.
    let wrong_server = Client {
        server_name: "evil.dnsflow",
        ..flowd.clone()
    };
    assert!(wrong_server.subscribe(&tapd.addrs).await.is_err());
    assert_eq!(
        tapd.addrs.metric("tapd_subscribers"),
        1,
        "only flowd's stream"
    );
    dns.answer([10, 0, 0, 8], "still.example.", [192, 0, 2, 8])
        .await;
    assert_eq!(collect(&mut stream, 1).await[0].query_name, "still.example");
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_streams_with_the_operator_certificate_and_not_without() {
    require_tool("grpcurl").unwrap();
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path(), &[]).unwrap();
    let tapd = start(certs.path(), &[]);
    let mut dns = Sender::connect(&tapd.addrs.socket, true).await;
    dns.answer([10, 0, 0, 9], "operator.example.", [192, 0, 2, 9])
        .await;
    wait_until("the answer", || tapd.addrs.metric("tapd_events_total") == 1).unwrap();

    let f = |name: &str| certs.path().join(name);
    let grpcurl = |auth: &[PathBuf]| {
        let mut cmd = Command::new("grpcurl");
        if auth.is_empty() {
            cmd.arg("-plaintext");
        } else {
            cmd.arg("-cacert").arg(&auth[0]).arg("-cert").arg(&auth[1]);
            cmd.arg("-key")
                .arg(&auth[2])
                .args(["-servername", "tapd.dnsflow"]);
        }
        cmd.args(["-max-time", "2", "-d", r#"{"replay_recent":true}"#])
            .arg(tapd.addrs.grpc.to_string())
            .arg("dnsflow.v1.DnsTap/Subscribe")
            .output()
            .unwrap()
    };
    // The command deploy/README.md gives the operator.
    let out = grpcurl(&[f("ca.crt"), f("operator.crt"), f("operator.key")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("\"queryName\": \"operator.example\""),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plain = grpcurl(&[]);
    assert!(!plain.status.success());
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("operator.example"));
}

#[tokio::test(flavor = "multi_thread")]
async fn rotated_files_take_effect_without_a_restart() {
    let old = tempfile::tempdir().unwrap();
    make_certs(old.path(), &[]).unwrap();
    let new = tempfile::tempdir().unwrap();
    make_certs(new.path(), &[]).unwrap();
    let live = tempfile::tempdir().unwrap();
    let install = |from: &Path| {
        for name in ["tapd.crt", "tapd.key", "ca.crt"] {
            // A new file renamed over the old one, as a Secret update swaps its files.
            let tmp = live.path().join(format!(".{name}"));
            std::fs::copy(from.join(name), &tmp).unwrap();
            std::fs::rename(&tmp, live.path().join(name)).unwrap();
        }
    };
    install(old.path());
    let tapd = start(live.path(), &["--tls-reload-interval", "100ms"]);
    let mut before = Client::flowd(old.path())
        .subscribe(&tapd.addrs)
        .await
        .expect("the old material works");

    install(new.path());
    wait_until("the new files to be loaded", || {
        tapd.addrs
            .metric("tapd_tls_reloads_total{reason=\"loaded\"}")
            >= 1
    })
    .unwrap();
    assert!(Client::flowd(old.path())
        .subscribe(&tapd.addrs)
        .await
        .is_err());
    let mut after = Client::flowd(new.path())
        .subscribe(&tapd.addrs)
        .await
        .expect("the new material works");

    // The stream opened before the rotation goes on.
    let mut dns = Sender::connect(&tapd.addrs.socket, true).await;
    dns.answer([10, 0, 0, 5], "rotated.example.", [192, 0, 2, 5])
        .await;
    assert_eq!(
        collect(&mut before, 1).await[0].query_name,
        "rotated.example"
    );
    assert_eq!(
        collect(&mut after, 1).await[0].query_name,
        "rotated.example"
    );

    // Broken files are refused and counted; the material in use stays.
    std::fs::write(live.path().join("tapd.key"), "not a key").unwrap();
    wait_until("the broken files to be refused", || {
        tapd.addrs
            .metric("tapd_tls_reloads_total{reason=\"failed\"}")
            >= 1
    })
    .unwrap();
    Client::flowd(new.path())
        .subscribe(&tapd.addrs)
        .await
        .expect("the last good material stays");
}

#[test]
fn without_tls_only_loopback_is_served_unless_insecure_listen() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tapd.sock");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tapd"))
            .arg("--socket")
            .arg(&socket)
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["--listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--insecure-listen"), "{stderr}");
    assert!(!socket.exists());

    let half = run(&["--tls-cert", "/nonexistent/tapd.crt"]);
    assert_eq!(
        half.status.code(),
        Some(64),
        "TLS needs all three files: {half:?}"
    );

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tapd"));
    cmd.arg("--socket")
        .arg(&socket)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args([
            "--listen",
            &format!("0.0.0.0:{}", free_port()),
            "--insecure-listen",
        ])
        .env("RUST_LOG", "info");
    let mut insecure = ChildDaemon::spawn("tapd", &mut cmd, dir.path().join("tapd.log")).unwrap();
    insecure.wait_for_log("WITHOUT TLS").unwrap();
}

/// Hundreds of connections that never start a handshake, from one address, keep nobody else out: the
/// address holds a few handshake slots, its other connections are closed at once.
#[tokio::test(flavor = "multi_thread")]
async fn silent_connections_do_not_keep_flowd_out() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path(), &[]).unwrap();
    let tapd = start(certs.path(), &[]);
    let mut silent = Vec::new();
    for _ in 0..300 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
        silent.push(socket.connect(tapd.addrs.grpc).await.unwrap());
    }
    wait_until("the silent connections to be turned away", || {
        tapd.addrs
            .metric("tapd_grpc_refused_total{reason=\"handshake\"}")
            >= 290
    })
    .unwrap();
    let started = std::time::Instant::now();
    let mut stream = Client::flowd(certs.path())
        .subscribe(&tapd.addrs)
        .await
        .expect("flowd subscribes");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    let mut dns = Sender::connect(&tapd.addrs.socket, true).await;
    dns.answer([10, 0, 0, 4], "through.example.", [192, 0, 2, 4])
        .await;
    assert_eq!(
        collect(&mut stream, 1).await[0].query_name,
        "through.example"
    );
    drop(silent);
}

//! Real BIND (`named`, `dnstap { client response; }` to a unix socket) sending to the real tapd binary.

use crate::common::{answers, collect, subscribe, tapd};
use dnsflow_testkit::{dig, free_port, require_tool, ChildDaemon};
use std::{fs, net::Ipv4Addr, path::Path, process::Command};

struct Named {
    _daemon: ChildDaemon,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Named {
    /// named in the foreground (`-g`, as root, one worker) serving `example.test` from a temp dir.
    fn start(dnstap_socket: &Path) -> Named {
        require_tool("named").unwrap();
        let dir = tempfile::Builder::new().prefix("named-").tempdir().unwrap();
        let d = dir.path().display();
        let port = free_port();
        fs::write(
            dir.path().join("example.test.db"),
            "$ORIGIN example.test.\n\
             @ 3600 IN SOA ns.example.test. host.example.test. 1 3600 600 86400 60\n\
             @ 3600 IN NS ns.example.test.\n\
             ns 3600 IN A 127.0.0.1\n\
             www 300 IN CNAME edge.example.test.\n\
             edge 60 IN CNAME e1.example.test.\n\
             e1 30 IN A 192.0.2.20\n\
             e1 30 IN A 192.0.2.21\n\
             e1 40 IN AAAA 2001:db8::20\n",
        )
        .unwrap();
        let conf = format!(
            "options {{\n  directory \"{d}\";\n  pid-file \"{d}/named.pid\";\n  \
             session-keyfile \"{d}/session.key\";\n  managed-keys-directory \"{d}\";\n  \
             listen-on port {port} {{ 127.0.0.1; }};\n  listen-on-v6 {{ none; }};\n  recursion no;\n  \
             allow-query {{ any; }};\n  dnssec-validation no;\n  dnstap {{ client response; }};\n  \
             dnstap-output unix \"{sock}\";\n  dnstap-identity \"bind-it\";\n}};\ncontrols {{ }};\n\
             zone \"example.test\" {{ type primary; file \"{d}/example.test.db\"; }};\n",
            sock = dnstap_socket.display()
        );
        let conf_path = dir.path().join("named.conf");
        fs::write(&conf_path, conf).unwrap();
        let mut daemon = ChildDaemon::spawn(
            "named",
            Command::new("named")
                .args(["-g", "-n", "1", "-c"])
                .arg(&conf_path),
            dir.path().join("named.log"),
        )
        .unwrap();
        daemon.wait_for_log("running").unwrap();
        Named {
            _daemon: daemon,
            port,
            _dir: dir,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bind_client_responses_reach_subscribers() {
    let tapd = tapd(&[]);
    let mut all = subscribe(&tapd.addrs, &[], false).await;
    let mut only_32 = subscribe(&tapd.addrs, &["127.0.0.32"], false).await;
    let named = Named::start(&tapd.addrs.socket);

    let got = dig(
        Ipv4Addr::new(127, 0, 0, 31),
        named.port,
        "www.example.test",
        "A",
    )
    .unwrap();
    assert!(got.contains(&"192.0.2.20".to_string()), "{got:?}");
    dig(
        Ipv4Addr::new(127, 0, 0, 32),
        named.port,
        "www.example.test",
        "AAAA",
    )
    .unwrap();

    let mut events = collect(&mut all, 2).await;
    events.sort_by(|a, b| a.client_ip.cmp(&b.client_ip));
    let (v4, v6) = (&events[0], &events[1]);
    assert_eq!(v4.client_ip, "127.0.0.31");
    assert_eq!(v4.query_name, "www.example.test");
    assert_eq!(v4.cname_chain, ["edge.example.test", "e1.example.test"]);
    assert_eq!(
        answers(v4),
        [("192.0.2.20".into(), 30), ("192.0.2.21".into(), 30)]
    );
    assert_eq!(v4.server_identity, "bind-it");
    assert_eq!(v6.client_ip, "127.0.0.32");
    assert_eq!(v6.query_type, "AAAA");
    assert_eq!(answers(v6), [("2001:db8::20".into(), 40)]);

    let mine = collect(&mut only_32, 1).await;
    assert_eq!(mine[0].client_ip, "127.0.0.32");
}

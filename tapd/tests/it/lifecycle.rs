//! tapd as a process: configuration errors exit 64 before anything is bound; a stale socket is
//! replaced, a live one never; SIGTERM drains subscribers and removes the socket.

use crate::common::{collect, subscribe, tapd, Sender};
use dnsflow_testkit::{free_port, TapdProcess};
use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::Path,
    process::Command,
    time::Duration,
};

#[test]
fn bad_configuration_exits_64_and_binds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("never.sock");
    let grpc = format!("127.0.0.1:{}", free_port());
    for bad in [
        &["--socket-mode", "999"][..],
        &["--max-frame-bytes", "100"],
        &["--listen", "not-an-address"],
        &["--recent-max-ttl", "forever"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tapd"))
            .arg("--socket")
            .arg(&socket)
            .args(["--listen", &grpc, "--metrics-listen", "127.0.0.1:0"])
            .args(bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{bad:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{bad:?} explains itself");
        assert!(!socket.exists(), "{bad:?} created the socket");
        assert!(
            std::net::TcpListener::bind(&grpc).is_ok(),
            "{bad:?} left the gRPC port bound"
        );
    }
    let help = Command::new(env!("CARGO_BIN_EXE_tapd"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("TAPD_SOCKET"));
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_socket_is_replaced_with_a_world_writable_one() {
    let TapdProcess { daemon, addrs, dir } = tapd(&[]);
    // SIGKILL: no chance to clean up, the socket file stays behind.
    drop(daemon);
    assert!(addrs.socket.exists());
    let tapd = TapdProcess::spawn_in(Path::new(env!("CARGO_BIN_EXE_tapd")), dir, &[]).unwrap();
    let meta = std::fs::metadata(&tapd.addrs.socket).unwrap();
    assert!(meta.file_type().is_socket());
    // CoreDNS runs as uid 65532: the socket must be writable by others.
    assert_eq!(meta.permissions().mode() & 0o777, 0o666);
    let mut sub = subscribe(&tapd.addrs, &[], false).await;
    let mut s = Sender::connect(&tapd.addrs.socket, true).await;
    s.answer([10, 0, 0, 3], "stale.example.", [192, 0, 2, 3])
        .await;
    assert_eq!(collect(&mut sub, 1).await[0].query_name, "stale.example");
}

/// A second tapd pointed at the socket a live tapd accepts on refuses to start, saying why, and leaves
/// the socket alone: the first keeps accepting and delivering.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_tapd_on_a_live_socket_refuses_to_start_and_the_first_keeps_serving() {
    let first = tapd(&[]);
    let out = Command::new(env!("CARGO_BIN_EXE_tapd"))
        .arg("--socket")
        .arg(&first.addrs.socket)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to replace the live socket"),
        "{stderr}"
    );
    assert!(std::fs::metadata(&first.addrs.socket)
        .unwrap()
        .file_type()
        .is_socket());
    let mut sub = subscribe(&first.addrs, &[], false).await;
    let mut s = Sender::connect(&first.addrs.socket, true).await;
    s.answer([10, 0, 0, 5], "still.example.", [192, 0, 2, 5])
        .await;
    assert_eq!(collect(&mut sub, 1).await[0].query_name, "still.example");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_streams_cleanly_and_removes_the_socket() {
    let mut tapd = tapd(&["--drain-timeout", "2s"]);
    let mut sub = subscribe(&tapd.addrs, &[], false).await;
    let mut s = Sender::connect(&tapd.addrs.socket, true).await;
    s.answer([10, 0, 0, 4], "last.example.", [192, 0, 2, 4])
        .await;
    let status = tapd.daemon.terminate(Duration::from_secs(8)).unwrap();
    assert!(status.success(), "{status:?}: {}", tapd.daemon.log());
    assert!(!tapd.addrs.socket.exists(), "socket removed at exit");
    // The subscriber gets what was published, then a clean end of stream.
    assert_eq!(collect(&mut sub, 1).await[0].query_name, "last.example");
    assert!(
        matches!(sub.message().await, Ok(None)),
        "clean end of stream"
    );
    assert!(tapd.daemon.log().contains("stopped"));
}

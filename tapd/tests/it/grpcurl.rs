//! grpcurl (a real, independent gRPC client) against tapd: reflection, health, and the event stream.

use crate::common::{tapd, Sender};
use dnsflow_testkit::{require_tool, wait_until};
use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

fn grpcurl(args: &[&str]) -> String {
    require_tool("grpcurl").unwrap();
    let out = Command::new("grpcurl").args(args).output().unwrap();
    assert!(out.status.success(), "grpcurl {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn reflection_lists_the_service_and_health_is_serving() {
    let tapd = tapd(&[]);
    let addr = tapd.addrs.grpc.to_string();
    let services = grpcurl(&["-plaintext", &addr, "list"]);
    let services: Vec<&str> = services.lines().collect();
    assert!(services.contains(&"dnsflow.v1.DnsTap"), "{services:?}");
    assert!(services.contains(&"grpc.health.v1.Health"), "{services:?}");
    assert!(!services.contains(&"dnsflow.v1.Flowd"), "{services:?}");
    let methods = grpcurl(&["-plaintext", &addr, "describe", "dnsflow.v1.DnsTap"]);
    assert!(methods.contains("rpc Subscribe"), "{methods}");

    for service in ["", "dnsflow.v1.DnsTap"] {
        let body = format!("{{\"service\":\"{service}\"}}");
        let health = grpcurl(&[
            "-plaintext",
            "-d",
            &body,
            &addr,
            "grpc.health.v1.Health/Check",
        ]);
        let v: serde_json::Value = serde_json::from_str(&health).unwrap();
        assert_eq!(v["status"], "SERVING", "{service:?}: {health}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_receives_the_filtered_stream_as_json() {
    require_tool("grpcurl").unwrap();
    let tapd = tapd(&[]);
    let mut child = Command::new("grpcurl")
        .args([
            "-plaintext",
            "-max-time",
            "10",
            "-d",
            r#"{"client_cidrs":["10.244.1.0/24"]}"#,
            &tapd.addrs.grpc.to_string(),
            "dnsflow.v1.DnsTap/Subscribe",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("grpcurl to subscribe", || {
        tapd.addrs.metric("tapd_subscribers") == 1
    })
    .unwrap();

    let mut s = Sender::connect(&tapd.addrs.socket, true).await;
    s.answer([10, 244, 1, 5], "www.Example.com.", [93, 184, 216, 34])
        .await;
    s.answer([10, 244, 2, 5], "other.example.com.", [192, 0, 2, 9])
        .await;
    s.answer([10, 244, 1, 6], "api.example.com.", [192, 0, 2, 10])
        .await;

    // grpcurl prints each message as a JSON object as it arrives; read until two are complete.
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let n = stdout.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            let complete = serde_json::Deserializer::from_str(&text)
                .into_iter::<serde_json::Value>()
                .filter(Result::is_ok)
                .count();
            if complete >= 2 {
                break;
            }
        }
        text
    });
    let text = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();

    let events: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&text)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(events.len(), 2, "{text}");
    assert_eq!(events[0]["clientIp"], "10.244.1.5");
    assert_eq!(events[0]["queryName"], "www.example.com");
    assert_eq!(events[0]["queryType"], "A");
    assert_eq!(events[0]["rcode"], "NOERROR");
    assert_eq!(events[0]["answers"][0]["ip"], "93.184.216.34");
    assert_eq!(events[0]["answers"][0]["ttl"], 30);
    assert_eq!(events[0]["serverIdentity"], "coredns-test");
    assert_eq!(events[1]["clientIp"], "10.244.1.6");
    // The wire form parses back into the domain type, as `flowd replay` will do with this JSON.
    assert!(
        events[1]["sequence"].as_str().is_some(),
        "uint64 is a JSON string: {text}"
    );
}

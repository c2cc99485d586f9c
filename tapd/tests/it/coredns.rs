//! CoreDNS's dnstap behaviour (DESIGN.md §4), reproduced: IPv4-mapped 16-byte client addresses,
//! FORWARDER messages to ignore, reconnects without STOP, several connections at once; and the
//! optional TCP listener.

use crate::common::{
    a_record, client_response, collect, dns_response, other_message, subscribe, tapd, Sender,
};
use dnsflow_dnstap::dnstap::client_response_frame;
use dnsflow_proto::dnstap::message::Type;
use hickory_proto::rr::RecordType;
use std::{net::Ipv4Addr, time::SystemTime};

#[tokio::test(flavor = "multi_thread")]
async fn ipv4_mapped_client_addresses_are_unmapped() {
    let tapd = tapd(&[]);
    let mut sub = subscribe(&tapd.addrs, &["10.244.1.0/24"], false).await;
    let mut s = Sender::connect(&tapd.addrs.socket, true).await;
    let wire = dns_response(
        "mapped.example.",
        RecordType::A,
        vec![a_record(
            "mapped.example.",
            Ipv4Addr::new(192, 0, 2, 44),
            15,
        )],
    );
    // Before CoreDNS 1.14.5: 16 bytes, ::ffff:10.244.1.9, while socket_family says INET.
    let mapped = Ipv4Addr::new(10, 244, 1, 9).to_ipv6_mapped().octets();
    s.send(&client_response_frame(
        None,
        &mapped,
        &wire,
        SystemTime::now(),
    ))
    .await;
    let e = &collect(&mut sub, 1).await[0];
    assert_eq!(e.client_ip, "10.244.1.9");
    assert_eq!(e.query_name, "mapped.example");
    // No identity from the sender: tapd's own name.
    assert_eq!(e.server_identity, "tapd");
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarder_and_query_messages_are_counted_and_ignored() {
    let tapd = tapd(&[]);
    let mut sub = subscribe(&tapd.addrs, &[], false).await;
    let mut s = Sender::connect(&tapd.addrs.socket, true).await;
    // CoreDNS's own address on forwarder traffic: never a pod.
    s.send(&other_message(Type::ForwarderQuery, &[10, 244, 0, 2]))
        .await;
    s.send(&other_message(Type::ForwarderResponse, &[10, 244, 0, 2]))
        .await;
    s.send(&other_message(Type::ClientQuery, &[10, 244, 1, 5]))
        .await;
    s.answer([10, 244, 1, 5], "real.example.", [192, 0, 2, 1])
        .await;
    let e = &collect(&mut sub, 1).await[0];
    assert_eq!(e.query_name, "real.example");
    assert_eq!(tapd.addrs.metric("tapd_ignored_messages_total"), 3);
    assert_eq!(tapd.addrs.metric("tapd_events_total"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnect_without_stop_is_normal() {
    let tapd = tapd(&[]);
    let mut sub = subscribe(&tapd.addrs, &[], false).await;
    // A Corefile reload: the old connection just goes away, mid-stream, without STOP.
    let mut old = Sender::connect(&tapd.addrs.socket, true).await;
    old.answer([10, 0, 0, 1], "before.example.", [192, 0, 2, 1])
        .await;
    drop(old);
    let mut new = Sender::connect(&tapd.addrs.socket, true).await;
    new.answer([10, 0, 0, 1], "after.example.", [192, 0, 2, 2])
        .await;
    // Each connection has its own reader: the old one's last frame may come out after the new
    // one's first.
    let mut names: Vec<String> = collect(&mut sub, 2)
        .await
        .into_iter()
        .map(|e| e.query_name)
        .collect();
    names.sort();
    assert_eq!(names, ["after.example", "before.example"]);
    dnsflow_testkit::wait_until("the old connection to close", || {
        tapd.addrs.metric("tapd_open_connections") == 1
    })
    .unwrap();
    assert_eq!(tapd.addrs.metric("tapd_frame_errors_total"), 0);
    assert_eq!(tapd.addrs.metric("tapd_connections_total"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn several_simultaneous_connections_are_all_served() {
    const CONNECTIONS: u8 = 4;
    const PER_CONNECTION: usize = 200;
    let tapd = tapd(&[]);
    let mut sub = subscribe(&tapd.addrs, &[], false).await;
    // Every `dnstap` directive opens its own connection; mix both modes.
    let mut senders = Vec::new();
    for c in 0..CONNECTIONS {
        senders.push(Sender::connect(&tapd.addrs.socket, c % 2 == 0).await);
    }
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(c, mut s)| {
            tokio::spawn(async move {
                for i in 0..PER_CONNECTION {
                    let client = [10, 1, u8::try_from(c).unwrap(), 1];
                    let name = format!("c{c}-{i}.example.");
                    s.answer(client, &name, [192, 0, 2, 1]).await;
                }
                s.stop(c % 2 == 0).await;
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let events = collect(&mut sub, usize::from(CONNECTIONS) * PER_CONNECTION).await;
    for c in 0..CONNECTIONS {
        let from_c: Vec<&str> = events
            .iter()
            .filter(|e| e.client_ip == format!("10.1.{c}.1"))
            .map(|e| e.query_name.as_str())
            .collect();
        assert_eq!(from_c.len(), PER_CONNECTION);
        // Order within one connection is kept.
        assert_eq!(from_c[0], format!("c{c}-0.example"));
        assert_eq!(
            from_c[PER_CONNECTION - 1],
            format!("c{c}-{}.example", PER_CONNECTION - 1)
        );
    }
    assert_eq!(
        tapd.addrs.metric("tapd_connections_total"),
        u64::from(CONNECTIONS)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dnstap_over_tcp_is_served_beside_the_unix_socket() {
    use dnsflow_dnstap::framestream::{encode_control, encode_data, Control};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = dnsflow_testkit::free_port();
    let addr = format!("127.0.0.1:{port}");
    let tapd = tapd(&["--dnstap-tcp", &addr]);
    let mut sub = subscribe(&tapd.addrs, &[], false).await;
    let ct = dnsflow_proto::DNSTAP_CONTENT_TYPE.as_bytes();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(&encode_control(Control::Ready, Some(ct)))
        .await
        .unwrap();
    let want = encode_control(Control::Accept, Some(ct));
    let mut got = vec![0; want.len()];
    tcp.read_exact(&mut got).await.unwrap();
    assert_eq!(got, want);
    let mut out = bytes::BytesMut::new();
    out.extend_from_slice(&encode_control(Control::Start, Some(ct)));
    encode_data(
        &client_response([10, 9, 9, 9].into(), "tcp.example.", [192, 0, 2, 99].into()),
        &mut out,
    );
    tcp.write_all(&out).await.unwrap();
    let e = &collect(&mut sub, 1).await[0];
    assert_eq!(
        (e.client_ip.as_str(), e.query_name.as_str()),
        ("10.9.9.9", "tcp.example")
    );
    // The unix socket keeps working alongside.
    let mut s = Sender::connect(&tapd.addrs.socket, false).await;
    s.answer([10, 9, 9, 8], "unix.example.", [192, 0, 2, 98])
        .await;
    assert_eq!(collect(&mut sub, 1).await[0].query_name, "unix.example");
}

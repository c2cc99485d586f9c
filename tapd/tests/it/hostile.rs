//! Hostile input on some connections while another keeps being served; every error is counted.

use crate::common::{a_record, collect, dns_response, subscribe, tapd, Sender};
use bytes::BufMut;
use dnsflow_dnstap::{
    dnstap::client_response_frame,
    framestream::{encode_control, Control},
};
use dnsflow_proto::v1::DnsEvent;
use dnsflow_testkit::wait_until;
use hickory_proto::rr::RecordType;
use std::time::SystemTime;
use tokio::io::AsyncWriteExt;
use tonic::Streaming;

#[tokio::test(flavor = "multi_thread")]
async fn hostile_connections_end_alone_and_are_counted() {
    let tapd = tapd(&["--max-frame-bytes", "65536"]);
    let mut sub = subscribe(&tapd.addrs, &[], false).await;
    let mut good = Sender::connect(&tapd.addrs.socket, true).await;
    check_good(&mut good, &mut sub, 1).await;

    // A READY with another content type: refused, no ACCEPT, connection closed.
    let mut wrong = Sender::raw(&tapd.addrs.socket).await;
    wrong
        .stream
        .write_all(&encode_control(
            Control::Ready,
            Some(b"protobuf:other.Thing"),
        ))
        .await
        .unwrap();
    assert!(wrong.closed_by_peer().await, "wrong content type refused");

    // A 4 GiB length prefix: refused before anything is buffered.
    // tapd may close as soon as it has read the prefix, so the bytes after it can meet a closed socket:
    // whether they are written does not matter, the close does.
    let mut huge = Sender::connect(&tapd.addrs.socket, false).await;
    huge.stream
        .write_all(&u32::MAX.to_be_bytes())
        .await
        .unwrap();
    let _ = huge.stream.write_all(&[0u8; 1024]).await;
    assert!(huge.closed_by_peer().await, "4 GiB frame refused");

    // A frame cut short by the sender going away.
    let mut cut = Sender::connect(&tapd.addrs.socket, true).await;
    cut.stream.write_all(&100u32.to_be_bytes()).await.unwrap();
    cut.stream.write_all(&[1, 2, 3]).await.unwrap();
    drop(cut);

    // An oversized control frame.
    let mut ctl = Sender::raw(&tapd.addrs.socket).await;
    ctl.stream
        .write_all(&[0, 0, 0, 0, 0, 0, 4, 0])
        .await
        .unwrap();
    assert!(
        ctl.closed_by_peer().await,
        "oversized control frame refused"
    );

    wait_until("four frame errors", || {
        tapd.addrs.metric("tapd_frame_errors_total") == 4
    })
    .unwrap();
    check_good(&mut good, &mut sub, 2).await;

    // Well framed, badly filled: each bad frame is counted and the same connection goes on.
    let mut bad = Sender::connect(&tapd.addrs.socket, true).await;
    bad.send(b"\x0a\xff\xff\xff\xff\x0fnot protobuf at all")
        .await;
    let dns_frame =
        |wire: &[u8]| client_response_frame(None, &[10, 0, 0, 9], wire, SystemTime::now());
    // A question name whose compression pointer points at itself.
    let mut looped = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
    looped.extend([0xc0, 12, 0, 1, 0, 1]);
    bad.send(&dns_frame(&looped)).await;
    // Two pointers pointing at each other.
    let mut ping_pong = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
    ping_pong.extend([0xc0, 14, 0xc0, 12, 0, 1, 0, 1]);
    bad.send(&dns_frame(&ping_pong)).await;
    // Counts that lie: 65535 answers claimed in a tiny message.
    let mut lying = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0xff, 0xff, 0, 0, 0, 0];
    lying.extend([1, b'a', 0, 0, 1, 0, 1]);
    bad.send(&dns_frame(&lying)).await;
    // A count that lies by one: the record is simply not there.
    let mut short = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0];
    short.extend([1, b'a', 0, 0, 1, 0, 1]);
    short.extend([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 9, 0, 4, 192, 0, 2, 1]);
    short.put_slice(&[0xc0, 12, 0, 1]);
    bad.send(&dns_frame(&short)).await;
    // Then a good frame on the same connection still counts.
    bad.answer([10, 0, 0, 9], "after-bad.example.", [192, 0, 2, 9])
        .await;
    let e = &collect(&mut sub, 1).await[0];
    assert_eq!(e.query_name, "after-bad.example");
    assert_eq!(
        tapd.addrs
            .metric("tapd_decode_errors_total{reason=\"protobuf\"}"),
        1
    );
    assert_eq!(
        tapd.addrs
            .metric("tapd_decode_errors_total{reason=\"dns\"}"),
        4
    );
    check_good(&mut good, &mut sub, 3).await;
    assert_eq!(tapd.addrs.metric("tapd_events_total"), 4);
}

/// The long-lived good connection still delivers.
async fn check_good(good: &mut Sender, sub: &mut Streaming<DnsEvent>, n: u32) {
    let name = format!("good{n}.example.");
    good.answer([10, 0, 0, 1], &name, [192, 0, 2, 1]).await;
    let e = &collect(sub, 1).await[0];
    assert_eq!(e.query_name, name.trim_end_matches('.'));
}

/// `--max-connections` is one budget for the unix socket and the TCP listener together.
#[tokio::test(flavor = "multi_thread")]
async fn one_connection_cap_covers_every_dnstap_listener() {
    use tokio::io::AsyncReadExt;
    let tcp = format!("127.0.0.1:{}", dnsflow_testkit::free_port());
    let tapd = tapd(&["--max-connections", "2", "--dnstap-tcp", &tcp]);
    let _unix = Sender::connect(&tapd.addrs.socket, true).await;
    let _first_tcp = tokio::net::TcpStream::connect(&tcp).await.unwrap();
    wait_until("two open connections", || {
        tapd.addrs.metric("tapd_open_connections") == 2
    })
    .unwrap();
    let mut refused = tokio::net::TcpStream::connect(&tcp).await.unwrap();
    let mut buf = [0u8; 8];
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(5), refused.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    assert_eq!(
        tapd.addrs
            .metric("tapd_dropped_total{reason=\"connection_limit\"}"),
        1
    );
}

/// An answer with more addresses than an event carries: the event keeps the first 256, the rest are
/// counted.
#[tokio::test(flavor = "multi_thread")]
async fn addresses_beyond_256_are_cut_and_counted() {
    let tapd = tapd(&[]);
    let mut sub = subscribe(&tapd.addrs, &[], false).await;
    let records = (0..300u16)
        .map(|i| {
            let ip = std::net::Ipv4Addr::new(198, 18, (i >> 8) as u8, i as u8);
            a_record("many.example.", ip, 60)
        })
        .collect();
    let wire = dns_response("many.example.", RecordType::A, records);
    let mut sender = Sender::connect(&tapd.addrs.socket, true).await;
    sender
        .send(&client_response_frame(
            None,
            &[10, 0, 0, 6],
            &wire,
            SystemTime::now(),
        ))
        .await;
    let e = &collect(&mut sub, 1).await[0];
    assert_eq!(e.answers.len(), 256);
    assert_eq!(tapd.addrs.metric("tapd_addresses_cut_total"), 44);
}

/// 20,000 answers of 256 records each (any pod can make CoreDNS answer those from a zone it controls):
/// the recent-answer cache is bounded in bytes, so tapd stays far below its 128 MiB limit.
#[tokio::test(flavor = "multi_thread")]
async fn big_answers_keep_tapd_within_its_memory_bound() {
    const ANSWERS: u32 = 20_000;
    let tapd = tapd(&[]);
    let frames = (0..ANSWERS).map(|i| {
        let owner = format!("n{i}.zone.example.");
        let records = (0..256u32)
            .map(|j| a_record(&owner, std::net::Ipv4Addr::from(0xc612_0000 | j), 3600))
            .collect();
        let client = [10, 1, (i >> 8) as u8, i as u8];
        let wire = dns_response(&owner, RecordType::A, records);
        client_response_frame(None, &client, &wire, SystemTime::now())
    });
    let mut sender = Sender::connect(&tapd.addrs.socket, true).await;
    sender.send_all(frames).await;
    wait_until("every answer decoded", || {
        tapd.addrs.metric("tapd_events_total") == u64::from(ANSWERS)
    })
    .unwrap();
    let bytes = tapd.addrs.metric("tapd_recent_answer_bytes");
    assert!(bytes <= 32 << 20, "{bytes} bytes held");
    let peak_kib = dnsflow_testkit::proc_status_kib(Some(tapd.daemon.pid()), "VmHWM").unwrap();
    assert!(peak_kib < 100 << 10, "peak RSS {peak_kib} KiB");
}

//! The `Subscribe` contract: filters, the replay of recent answers, and argument errors.

use crate::common::{a_record, assert_no_more, collect, dns_response, subscribe, tapd, Sender};
use dnsflow_dnstap::dnstap::client_response_frame;
use dnsflow_proto::v1::{dns_tap_client::DnsTapClient, SubscribeRequest};
use hickory_proto::rr::RecordType;
use std::{
    net::Ipv4Addr,
    time::{Duration, SystemTime},
};

#[tokio::test(flavor = "multi_thread")]
async fn invalid_cidrs_are_invalid_arguments() {
    let tapd = tapd(&[]);
    let mut client = DnsTapClient::connect(tapd.addrs.grpc_url()).await.unwrap();
    let err = client
        .subscribe(SubscribeRequest {
            client_cidrs: vec!["10.0.0.0/8".into(), "10.1.2.300/32".into()],
            replay_recent: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("10.1.2.300/32"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_subscriber_gets_still_valid_answers_first_then_the_live_stream() {
    let tapd = tapd(&[]);
    let mut s = Sender::connect(&tapd.addrs.socket, true).await;
    s.answer([10, 244, 1, 5], "old.example.", [192, 0, 2, 1])
        .await;
    s.answer([10, 244, 1, 5], "old.example.", [192, 0, 2, 2])
        .await;
    s.answer([10, 244, 9, 9], "elsewhere.example.", [192, 0, 2, 3])
        .await;
    // A zero TTL grants nothing later: not replayed.
    let wire = dns_response(
        "zero.example.",
        RecordType::A,
        vec![a_record("zero.example.", Ipv4Addr::new(192, 0, 2, 4), 0)],
    );
    s.send(&client_response_frame(
        None,
        &[10, 244, 1, 5],
        &wire,
        SystemTime::now(),
    ))
    .await;
    dnsflow_testkit::wait_until("events published", || {
        tapd.addrs.metric("tapd_events_total") == 4
    })
    .unwrap();

    let mut sub = subscribe(&tapd.addrs, &["10.244.1.0/24"], true).await;
    let replayed = &collect(&mut sub, 1).await[0];
    assert!(replayed.replayed);
    assert_eq!(replayed.query_name, "old.example");
    // The newer answer for the same (client, name, type) replaced the older one.
    assert_eq!(replayed.answers[0].ip, "192.0.2.2");
    assert!(replayed.answers[0].ttl <= 30);
    assert_eq!(replayed.sequence, 2);
    assert_no_more(&mut sub, Duration::from_millis(200)).await;

    s.answer([10, 244, 1, 6], "live.example.", [192, 0, 2, 5])
        .await;
    let live = &collect(&mut sub, 1).await[0];
    assert!(!live.replayed);
    assert_eq!(live.query_name, "live.example");
    assert_eq!(live.sequence, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribers_and_filters_are_bounded() {
    let tapd = tapd(&["--max-subscribers", "1"]);
    let _first = subscribe(&tapd.addrs, &[], false).await;
    let mut client = DnsTapClient::connect(tapd.addrs.grpc_url()).await.unwrap();
    let err = client
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    let err = client
        .subscribe(SubscribeRequest {
            client_cidrs: vec!["10.0.0.1".into(); tapd::MAX_FILTER_CIDRS + 1],
            replay_recent: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
}

/// One peer (here: one address, without TLS) holds at most --max-subscribers-per-peer streams.
#[tokio::test(flavor = "multi_thread")]
async fn one_peer_holds_at_most_its_share_of_subscriptions() {
    let tapd = tapd(&["--max-subscribers-per-peer", "2"]);
    let _first = subscribe(&tapd.addrs, &[], false).await;
    let _second = subscribe(&tapd.addrs, &[], false).await;
    let mut client = DnsTapClient::connect(tapd.addrs.grpc_url()).await.unwrap();
    let err = client
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("already has 2 subscriptions"),
        "{err:?}"
    );
}

/// Replaying the recent answers shares the cache's entries: three subscribers that ask for the replay
/// of a full cache (and read slowly) leave tapd's memory flat, where a copy per subscriber would add
/// the whole cache three times.
#[tokio::test(flavor = "multi_thread")]
async fn replay_subscribers_share_the_cache_instead_of_copying_it() {
    let tapd = tapd(&[]);
    let rss_kib = || dnsflow_testkit::proc_status_kib(Some(tapd.daemon.pid()), "VmRSS").unwrap();
    const ANSWERS: u32 = 20_000;
    let frames = (0..ANSWERS).map(|i| {
        let name = format!("n{i}.replay.example.");
        let records = (0..32u32)
            .map(|j| a_record(&name, Ipv4Addr::from(0xc612_0000 | (i << 5) | j), 3600))
            .collect();
        let client = [10, 2, (i >> 8) as u8, i as u8];
        client_response_frame(
            None,
            &client,
            &dns_response(&name, RecordType::A, records),
            SystemTime::now(),
        )
    });
    let mut s = Sender::connect(&tapd.addrs.socket, true).await;
    s.send_all(frames).await;
    dnsflow_testkit::wait_until("the cache to fill", || {
        tapd.addrs.metric("tapd_events_total") == u64::from(ANSWERS)
    })
    .unwrap();
    let cached = tapd.addrs.metric("tapd_recent_answer_bytes");
    assert!(cached > 8 << 20, "a cache worth copying: {cached} bytes");
    let before = rss_kib();
    let mut subs = Vec::new();
    for _ in 0..3 {
        let mut sub = subscribe(&tapd.addrs, &[], true).await;
        assert!(collect(&mut sub, 1).await[0].replayed);
        subs.push(sub);
    }
    // Time, not an event: the replays run on as far as the slow readers let them, so that a copy
    // made along the way, not at the subscription, would show too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 8 << 10,
        "three replays grew tapd by {grown} KiB over a {cached}-byte cache"
    );
}

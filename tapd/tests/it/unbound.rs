//! Real Unbound sending dnstap (bidirectional and unidirectional) to the real tapd binary while `dig`
//! queries from several client IPs.

use crate::common::{answers, collect, subscribe, tapd};
use dnsflow_testkit::{dig, Unbound, UnboundConfig};
use std::net::Ipv4Addr;

fn config(bidirectional: bool) -> UnboundConfig {
    UnboundConfig {
        auth_zones: vec![(
            "example.test".into(),
            vec![
                "www 300 IN CNAME edge.example.test.".into(),
                "edge 60 IN CNAME e1.example.test.".into(),
                "e1 30 IN A 192.0.2.10".into(),
                "e1 30 IN A 192.0.2.11".into(),
            ],
        )],
        local_data: vec![
            "v6.local.test. 45 IN AAAA 2001:db8::7".into(),
            "plain.local.test. 120 IN A 198.51.100.4".into(),
        ],
        identity: "unbound-it".into(),
        bidirectional,
        ..UnboundConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unbound_bidirectional_answers_reach_subscribers_with_chain_ips_and_ttls() {
    let tapd = tapd(&[]);
    let mut all = subscribe(&tapd.addrs, &[], false).await;
    let mut only_12 = subscribe(&tapd.addrs, &["127.0.0.12/32"], false).await;
    let unbound = Unbound::start(&tapd.addrs.socket, &config(true)).unwrap();

    let www = dig(
        Ipv4Addr::new(127, 0, 0, 11),
        unbound.port(),
        "www.example.test",
        "A",
    )
    .unwrap();
    assert!(www.contains(&"192.0.2.10".to_string()), "{www:?}");
    dig(
        Ipv4Addr::new(127, 0, 0, 12),
        unbound.port(),
        "V6.Local.Test",
        "AAAA",
    )
    .unwrap();
    dig(
        Ipv4Addr::new(127, 0, 0, 13),
        unbound.port(),
        "plain.local.test",
        "A",
    )
    .unwrap();

    let mut events = collect(&mut all, 3).await;
    events.sort_by(|a, b| a.client_ip.cmp(&b.client_ip));
    let (www, v6, plain) = (&events[0], &events[1], &events[2]);
    assert_eq!(www.client_ip, "127.0.0.11");
    assert_eq!(www.query_name, "www.example.test");
    assert_eq!(www.query_type, "A");
    assert_eq!(www.rcode, "NOERROR");
    assert_eq!(www.cname_chain, ["edge.example.test", "e1.example.test"]);
    assert_eq!(
        answers(www),
        [("192.0.2.10".into(), 30), ("192.0.2.11".into(), 30)]
    );
    assert_eq!(www.server_identity, "unbound-it");
    assert!(www.response_time.is_some());

    assert_eq!(v6.client_ip, "127.0.0.12");
    assert_eq!(v6.query_name, "v6.local.test");
    assert_eq!(v6.query_type, "AAAA");
    assert_eq!(answers(v6), [("2001:db8::7".into(), 45)]);

    assert_eq!(plain.client_ip, "127.0.0.13");
    assert_eq!(answers(plain), [("198.51.100.4".into(), 120)]);
    assert!(plain.cname_chain.is_empty());

    let mine = collect(&mut only_12, 1).await;
    assert_eq!(mine[0].client_ip, "127.0.0.12");
    // Sequence numbers are tapd's own, increasing.
    let mut seqs: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, [1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread")]
async fn unbound_unidirectional_and_nxdomain() {
    let tapd = tapd(&[]);
    let mut all = subscribe(&tapd.addrs, &[], false).await;
    let unbound = Unbound::start(&tapd.addrs.socket, &config(false)).unwrap();
    dig(
        Ipv4Addr::new(127, 0, 0, 21),
        unbound.port(),
        "missing.example.test",
        "A",
    )
    .unwrap();
    let e = &collect(&mut all, 1).await[0];
    assert_eq!(e.client_ip, "127.0.0.21");
    assert_eq!(e.query_name, "missing.example.test");
    assert_eq!(e.rcode, "NXDOMAIN");
    assert!(e.answers.is_empty());
}

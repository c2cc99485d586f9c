//! Property tests: arbitrary bytes through Frame Streams → dnstap → DNS never panic, stay bounded, and
//! valid streams come through intact however they are split. (`fuzz/` drives the same path with
//! cargo-fuzz.)

use crate::common::{a_record, cname_record, dns_response};
use dnsflow_dnstap::{
    dnstap::{self, client_response_frame, Decoded},
    event::{MAX_ANSWERS, MAX_CNAME_CHAIN},
    framestream::{encode_control, encode_data, Control, Decoder, Output},
    DnsName,
};
use dnsflow_testkit::drive_pipeline;
use hickory_proto::rr::RecordType;
use proptest::prelude::*;
use std::{net::Ipv4Addr, time::SystemTime};

const CAP: usize = 4096;

/// Feeds `bytes` in chunks of the given sizes; returns the data frames and replies, or the error.
fn run(bytes: &[u8], chunks: &[usize]) -> (Vec<Output>, bool) {
    let mut d = Decoder::new(dnsflow_proto::DNSTAP_CONTENT_TYPE, CAP);
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut sizes = chunks.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
        d.push(&rest[..n]);
        rest = &rest[n..];
        loop {
            match d.poll() {
                Ok(Some(o)) => out.push(o),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
        // Never more than one partial frame plus one chunk.
        assert!(d.buffered() <= CAP + 8 + n, "buffered {}", d.buffered());
    }
    (out, false)
}

fn check_decoded(frame: &[u8]) {
    if let Ok(Decoded::Response { response: r, .. }) = dnstap::decode(frame, "p", SystemTime::now())
    {
        assert!(r.cname_chain.len() <= MAX_CNAME_CHAIN);
        assert!(r.answers.len() <= MAX_ANSWERS);
        for n in r.names() {
            assert_eq!(DnsName::new(n.as_str()).as_ref(), Ok(n));
        }
    }
}

fn stream(payloads: &[Vec<u8>], bidirectional: bool) -> Vec<u8> {
    let ct = dnsflow_proto::DNSTAP_CONTENT_TYPE.as_bytes();
    let mut b = bytes::BytesMut::new();
    if bidirectional {
        b.extend_from_slice(&encode_control(Control::Ready, Some(ct)));
    }
    b.extend_from_slice(&encode_control(Control::Start, Some(ct)));
    for p in payloads {
        encode_data(p, &mut b);
    }
    b.extend_from_slice(&encode_control(Control::Stop, None));
    b.to_vec()
}

fn valid_dns() -> Vec<u8> {
    dns_response(
        "www.example.com.",
        RecordType::A,
        vec![
            cname_record("www.example.com.", "edge.example.net.", 60),
            a_record("edge.example.net.", Ipv4Addr::new(192, 0, 2, 1), 30),
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        drive_pipeline(&data);
    }

    #[test]
    fn arbitrary_dnstap_payloads_in_valid_frames_never_panic(
        payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..400), 1..6),
        selector in any::<u8>(),
    ) {
        // A valid framing around arbitrary payloads reaches the dnstap and DNS decoders every time.
        let framed = stream(&payloads, false);
        let start_len = encode_control(Control::Start, Some(dnsflow_proto::DNSTAP_CONTENT_TYPE.as_bytes())).len();
        // Selector ≡ 1 (mod 3): the unidirectional opening, with a read size from the rest.
        let mut data = vec![(selector % 85) * 3 + 1];
        data.extend_from_slice(&framed[start_len..]);
        drive_pipeline(&data);
    }

    #[test]
    fn valid_streams_arrive_intact_however_split(
        payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..600), 0..12),
        bidirectional in any::<bool>(),
        chunks in prop::collection::vec(1usize..200, 1..8),
    ) {
        let (out, failed) = run(&stream(&payloads, bidirectional), &chunks);
        prop_assert!(!failed);
        let data: Vec<Vec<u8>> = out.iter().filter_map(|o| match o {
            Output::Data(d) => Some(d.to_vec()),
            _ => None,
        }).collect();
        prop_assert_eq!(&data, &payloads);
        let replies = out.iter().filter(|o| matches!(o, Output::Reply(_))).count();
        prop_assert_eq!(replies, if bidirectional { 2 } else { 0 });
        prop_assert!(matches!(out.last(), Some(Output::Finished | Output::Reply(_))));
    }

    #[test]
    fn mutated_dns_inside_valid_dnstap_never_panics(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        cut in any::<prop::sample::Index>(),
        garbage in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut wire = valid_dns();
        for (i, b) in &flips {
            let at = i.index(wire.len());
            wire[at] = *b;
        }
        let cut_at = cut.index(wire.len() + 1);
        for dns in [&wire[..], &wire[..cut_at], &garbage[..]] {
            check_decoded(&client_response_frame(None, &[10, 0, 0, 1], dns, SystemTime::now()));
        }
    }
}

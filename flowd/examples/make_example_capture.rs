//! Regenerates `examples/google.fstrm` (a dnstap capture in Frame Streams file format, as
//! `fstrm_capture` writes it) and `examples/google-events.json` (the same client responses as grpcurl
//! prints them for `dnsflow.v1.DnsTap/Subscribe`):
//!
//! ```sh
//! cargo run -p flowd --example make_example_capture
//! ```
//!
//! What CoreDNS would have sent for the pods of `examples/snapshot.yaml`: 10.244.1.5 (abc/client)
//! resolves `www.google.com` (A and AAAA, through a CNAME to Google's CDN), plus noise: CoreDNS's own
//! FORWARDER traffic, an NXDOMAIN, another pod resolving a name no rule allows, a pod of a namespace
//! without EgressFirewall, and a cluster-internal name. The output is byte-for-byte reproducible; a test
//! fails when the committed files drift from it.

use dnsflow_proto::{dnstap as pb, prost::Message as _, v1};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        rdata::{A, AAAA, CNAME},
        Name, RData, Record, RecordType,
    },
};
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// The dnstap identity CoreDNS sends (its pod name).
const IDENTITY: &[u8] = b"coredns-5d78c9869d-xk2vq";
/// CoreDNS's own pod IP: FORWARDER_* messages carry it, never a client's.
const COREDNS_IP: [u8; 4] = [10, 244, 0, 3];
/// 2026-11-26T04:00:00Z: the replay clock of the first event.
const START_SECS: u64 = 1_795_665_600;

fn name(s: &str) -> Name {
    Name::from_str(s).expect("valid name")
}

fn a(owner: &str, ip: Ipv4Addr, ttl: u32) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A::from(ip)))
}

fn aaaa(owner: &str, ip: Ipv6Addr, ttl: u32) -> Record {
    Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA::from(ip)))
}

fn cname(owner: &str, target: &str, ttl: u32) -> Record {
    Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
}

fn response(
    id: u16,
    qname: &str,
    qtype: RecordType,
    rcode: ResponseCode,
    answers: Vec<Record>,
) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Response, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.recursion_available = true;
    m.metadata.response_code = rcode;
    m.add_query(Query::query(name(qname), qtype));
    for r in answers {
        m.add_answer(r);
    }
    m.to_vec().expect("encodes")
}

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(START_SECS) + Duration::from_millis(ms)
}

fn client(ip: [u8; 4], ms: u64, wire: &[u8]) -> Vec<u8> {
    dnsflow_dnstap::dnstap::client_response_frame(Some(IDENTITY), &ip, wire, at(ms))
}

/// CoreDNS asking its upstream: dnstap `FORWARDER_RESPONSE`, which tapd and replay ignore.
fn forwarder(ms: u64, wire: &[u8]) -> Vec<u8> {
    let since = at(ms).duration_since(UNIX_EPOCH).expect("after 1970");
    pb::Dnstap {
        identity: Some(IDENTITY.to_vec()),
        r#type: pb::dnstap::Type::Message as i32,
        message: Some(pb::Message {
            r#type: pb::message::Type::ForwarderResponse as i32,
            socket_family: Some(pb::SocketFamily::Inet as i32),
            socket_protocol: Some(pb::SocketProtocol::Udp as i32),
            query_address: Some(COREDNS_IP.to_vec()),
            response_address: Some(vec![8, 8, 8, 8]),
            query_port: Some(41_234),
            response_port: Some(53),
            response_time_sec: Some(since.as_secs()),
            response_time_nsec: Some(since.subsec_nanos()),
            response_message: Some(wire.to_vec()),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// The dnstap frames of the example, in order.
pub fn frames() -> Vec<Vec<u8>> {
    let pod = [10, 244, 1, 5];
    let cdn = "www3.l.google.com.";
    let google_a = response(
        0x1a2b,
        "www.google.com.",
        RecordType::A,
        ResponseCode::NoError,
        vec![
            cname("www.google.com.", cdn, 21_600),
            a(cdn, Ipv4Addr::new(142, 250, 74, 36), 274),
            a(cdn, Ipv4Addr::new(142, 250, 74, 68), 274),
        ],
    );
    let google_aaaa = response(
        0x1a2c,
        "www.google.com.",
        RecordType::AAAA,
        ResponseCode::NoError,
        vec![
            cname("www.google.com.", cdn, 21_600),
            aaaa(
                cdn,
                Ipv6Addr::new(0x2a00, 0x1450, 0x4001, 0x82b, 0, 0, 0, 0x2004),
                274,
            ),
        ],
    );
    vec![
        forwarder(0, &google_a),
        client(pod, 1, &google_a),
        client(pod, 2, &google_aaaa),
        client(
            pod,
            250,
            &response(
                0x1a2d,
                "nosuch.google.com.",
                RecordType::A,
                ResponseCode::NXDomain,
                vec![],
            ),
        ),
        client(
            [10, 244, 1, 6],
            500,
            &response(
                0x2b01,
                "www.example.com.",
                RecordType::A,
                ResponseCode::NoError,
                vec![a("www.example.com.", Ipv4Addr::new(93, 184, 215, 14), 1800)],
            ),
        ),
        client([10, 244, 1, 7], 750, &google_a),
        client(
            pod,
            1000,
            &response(
                0x1a2e,
                "kubernetes.default.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NoError,
                vec![a(
                    "kubernetes.default.svc.cluster.local.",
                    Ipv4Addr::new(10, 96, 0, 1),
                    5,
                )],
            ),
        ),
    ]
}

/// `examples/google.fstrm`.
pub fn capture() -> Vec<u8> {
    let mut w = dnsflow_dnstap::CaptureWriter::new(Vec::new()).expect("in-memory writer");
    for f in frames() {
        w.write_frame(&f).expect("in-memory write");
    }
    w.finish().expect("in-memory finish")
}

/// `examples/google-events.json`: the client responses of [`capture`] as tapd would stream them
/// (decoded 3 ms after the response, numbered from 1) and grpcurl would print them.
pub fn events_json() -> String {
    let mut out = String::new();
    for resp in dnsflow_dnstap::CaptureReader::new(capture().as_slice()) {
        let mut resp = resp.expect("the example decodes");
        resp.decoded_time = resp.response_time.unwrap_or(UNIX_EPOCH) + Duration::from_millis(3);
        let json = flowd::replay::events::event_to_json(&v1::DnsEvent::from(&resp))
            .expect("every event has a JSON form");
        out += &serde_json::to_string_pretty(&json).expect("serializes");
        out.push('\n');
    }
    out
}

/// The answer IPs the example's client pod gets flows for (used by the tests).
pub fn granted_ips() -> Vec<IpAddr> {
    vec![
        IpAddr::from([142, 250, 74, 36]),
        IpAddr::from([142, 250, 74, 68]),
        IpAddr::from(Ipv6Addr::new(
            0x2a00, 0x1450, 0x4001, 0x82b, 0, 0, 0, 0x2004,
        )),
    ]
}

#[allow(dead_code)]
fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    std::fs::write(dir.join("google.fstrm"), capture())?;
    std::fs::write(dir.join("google-events.json"), events_json())?;
    println!(
        "wrote {}/google.fstrm and google-events.json",
        dir.display()
    );
    Ok(())
}

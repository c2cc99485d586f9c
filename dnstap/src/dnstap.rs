//! dnstap protobuf → [`DnsResponse`]: the edge where wire bytes become the domain type.
//!
//! Only `CLIENT_RESPONSE` messages describe what a client (a pod) was told; every other kind is
//! reported as [`Decoded::Ignored`] so the caller can count it. Each input is hostile: a frame that is
//! not dnstap, a DNS message that does not parse, or a name that is not a [`DnsName`] yields a
//! [`DecodeError`] for that frame only.

use crate::event::{Answer, DnsName, DnsResponse, NameError, MAX_ANSWERS, MAX_CNAME_CHAIN};
use dnsflow_proto::dnstap::{self as pb, dnstap, message};
use hickory_proto::{
    op::Message,
    rr::{Name, RData, Record},
};
use prost::Message as _;
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// A DNS header is 12 bytes; a question at least 5 (root name, type, class) and a resource record at
/// least 11 (root name, type, class, TTL, rdata length). Counts that cannot fit are a lie, refused
/// before the parser allocates for them.
const DNS_HEADER_LEN: usize = 12;
const MIN_QUESTION_LEN: usize = 5;
const MIN_RECORD_LEN: usize = 11;
/// The largest TTL there is: RFC 2181 §8 reads a TTL with the top bit set as 0.
const MAX_TTL: u32 = (1 << 31) - 1;

/// Why one dnstap frame produced no event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a dnstap protobuf: {0}")]
    Protobuf(String),
    #[error("dnstap frame carries no message")]
    NoMessage,
    #[error("client response without query_address")]
    NoClientAddress,
    #[error("query_address of {0} bytes is neither IPv4 nor IPv6")]
    ClientAddress(usize),
    #[error("client response without response_message (is the sender's dnstap `full`?)")]
    NoResponseMessage,
    #[error("DNS header counts do not fit the {0}-byte message")]
    LyingCounts(usize),
    #[error("DNS message does not parse: {0}")]
    Dns(String),
    #[error("DNS response has no question")]
    NoQuestion,
    #[error("name {name:?} refused: {err}")]
    Name { name: String, err: NameError },
}

impl DecodeError {
    /// Every value [`DecodeError::reason`] returns, for metrics that list them all.
    pub const REASONS: [&'static str; 5] = [
        "protobuf",
        "client_address",
        "no_response_message",
        "dns",
        "name",
    ];

    /// A short, fixed label for metrics (one of [`DecodeError::REASONS`]).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Protobuf(_) | Self::NoMessage => "protobuf",
            Self::NoClientAddress | Self::ClientAddress(_) => "client_address",
            Self::NoResponseMessage => "no_response_message",
            Self::LyingCounts(_) | Self::Dns(_) | Self::NoQuestion => "dns",
            Self::Name { .. } => "name",
        }
    }
}

/// The outcome of decoding one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A client response, with `sequence` 0 (the hub numbers events). `addresses_cut`: the chain's
    /// addresses beyond [`MAX_ANSWERS`], left out of the event.
    Response {
        response: DnsResponse,
        addresses_cut: usize,
    },
    /// Another kind of dnstap message (queries, FORWARDER_*, resolver traffic): not ours.
    Ignored,
}

/// Decodes one dnstap data frame. `fallback_identity` names the server when the sender sent no
/// identity; `now` is stamped as the decode time.
pub fn decode(
    frame: &[u8],
    fallback_identity: &str,
    now: SystemTime,
) -> Result<Decoded, DecodeError> {
    let tap = pb::Dnstap::decode(frame).map_err(|e| DecodeError::Protobuf(e.to_string()))?;
    if tap.r#type != dnstap::Type::Message as i32 {
        return Ok(Decoded::Ignored);
    }
    let msg = tap.message.ok_or(DecodeError::NoMessage)?;
    if msg.r#type != message::Type::ClientResponse as i32 {
        return Ok(Decoded::Ignored);
    }
    let client = client_ip(
        msg.query_address
            .as_deref()
            .ok_or(DecodeError::NoClientAddress)?,
    )?;
    let wire = msg
        .response_message
        .as_deref()
        .ok_or(DecodeError::NoResponseMessage)?;
    let response_time = msg.response_time_sec.and_then(|s| {
        UNIX_EPOCH.checked_add(Duration::new(
            s,
            msg.response_time_nsec.unwrap_or(0).min(999_999_999),
        ))
    });
    let server_identity = match tap.identity.as_deref() {
        Some(id) if !id.is_empty() => String::from_utf8_lossy(id).into_owned(),
        _ => fallback_identity.to_owned(),
    };
    let (mut response, addresses_cut) = parse_response(wire, client, now)?;
    response.response_time = response_time;
    response.server_identity = server_identity;
    Ok(Decoded::Response {
        response,
        addresses_cut,
    })
}

/// The DNS response message `wire` sent to `client`, as an event (no response time, no server
/// identity: the caller knows them), and how many addresses were left out beyond [`MAX_ANSWERS`].
pub(crate) fn parse_response(
    wire: &[u8],
    client: IpAddr,
    now: SystemTime,
) -> Result<(DnsResponse, usize), DecodeError> {
    let dns = parse_dns(wire)?;
    Ok((
        DnsResponse {
            client,
            qname: dns.qname,
            qtype: dns.qtype,
            rcode: dns.rcode,
            cname_chain: dns.cname_chain,
            answers: dns.answers,
            response_time: None,
            decoded_time: now,
            server_identity: String::new(),
            sequence: 0,
            replayed: false,
        },
        dns.addresses_cut,
    ))
}

/// 4 bytes are IPv4; 16 bytes are IPv6, unless IPv4-mapped (older CoreDNS sends IPv4 clients that
/// way while claiming INET).
fn client_ip(bytes: &[u8]) -> Result<IpAddr, DecodeError> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Ok(IpAddr::V4(Ipv4Addr::from(v4)));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        return Ok(IpAddr::V6(Ipv6Addr::from(v6)).to_canonical());
    }
    Err(DecodeError::ClientAddress(bytes.len()))
}

/// The parts of a DNS response that matter to a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DnsAnswer {
    qname: DnsName,
    qtype: u16,
    rcode: u16,
    cname_chain: Vec<DnsName>,
    answers: Vec<Answer>,
    addresses_cut: usize,
}

fn check_counts(wire: &[u8]) -> Result<(), DecodeError> {
    let count = |at: usize| {
        wire.get(at..at + 2)
            .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    };
    if wire.len() < DNS_HEADER_LEN {
        return Err(DecodeError::Dns(format!(
            "{} bytes is shorter than a header",
            wire.len()
        )));
    }
    let least = DNS_HEADER_LEN
        + count(4) * MIN_QUESTION_LEN
        + (count(6) + count(8) + count(10)) * MIN_RECORD_LEN;
    if least > wire.len() {
        return Err(DecodeError::LyingCounts(wire.len()));
    }
    Ok(())
}

fn dns_name(name: &Name) -> Result<DnsName, DecodeError> {
    DnsName::from_string(name.to_ascii()).map_err(|err| DecodeError::Name {
        name: name.to_ascii(),
        err,
    })
}

/// A record's TTL as RFC 2181 §8 has it: one with the top bit set counts as 0 rather than as up to
/// 136 years, which only a broken or hostile server sends.
fn ttl(r: &Record) -> u32 {
    if r.ttl > MAX_TTL {
        0
    } else {
        r.ttl
    }
}

fn parse_dns(wire: &[u8]) -> Result<DnsAnswer, DecodeError> {
    check_counts(wire)?;
    let msg = Message::from_vec(wire).map_err(|e| DecodeError::Dns(e.to_string()))?;
    let query = msg.queries.first().ok_or(DecodeError::NoQuestion)?;
    let qname = dns_name(query.name())?;

    // Follow CNAMEs from the question name, in answer order, bounded and loop-safe.
    let mut chain_names: Vec<&Name> = vec![query.name()];
    while chain_names.len() <= MAX_CNAME_CHAIN {
        let Some(current) = chain_names.last() else {
            break;
        };
        let next = msg.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if &r.name == *current => Some(&target.0),
            _ => None,
        });
        match next {
            Some(target) if !chain_names.contains(&target) => chain_names.push(target),
            _ => break,
        }
    }
    // Exact capacities: these vectors live on in the subscriber buffers and the replay cache.
    let mut cname_chain = Vec::with_capacity(chain_names.len() - 1);
    for name in &chain_names[1..] {
        cname_chain.push(dns_name(name)?);
    }
    let address = |r: &Record| match &r.data {
        RData::A(a) if chain_names.contains(&&r.name) => Some(Answer {
            ip: IpAddr::V4(a.0),
            ttl: ttl(r),
        }),
        RData::AAAA(a) if chain_names.contains(&&r.name) => Some(Answer {
            ip: IpAddr::V6(a.0),
            ttl: ttl(r),
        }),
        _ => None,
    };
    // hickory has already bounded the records by the message's size; only the event is capped.
    let total = msg.answers.iter().filter_map(address).count();
    let count = total.min(MAX_ANSWERS);
    let mut answers = Vec::with_capacity(count);
    answers.extend(msg.answers.iter().filter_map(address).take(count));
    Ok(DnsAnswer {
        qname,
        qtype: u16::from(query.query_type()),
        rcode: u16::from(msg.metadata.response_code),
        cname_chain,
        answers,
        addresses_cut: total - count,
    })
}

/// Encodes a dnstap `CLIENT_RESPONSE` frame; used by the capture writer's tests, the fixtures that
/// play CoreDNS, and the benchmark.
pub fn client_response_frame(
    identity: Option<&[u8]>,
    client: &[u8],
    response: &[u8],
    response_time: SystemTime,
) -> Vec<u8> {
    let since = response_time.duration_since(UNIX_EPOCH).unwrap_or_default();
    pb::Dnstap {
        identity: identity.map(<[u8]>::to_vec),
        version: None,
        extra: None,
        r#type: dnstap::Type::Message as i32,
        message: Some(pb::Message {
            r#type: message::Type::ClientResponse as i32,
            socket_family: Some(if client.len() == 4 {
                pb::SocketFamily::Inet as i32
            } else {
                pb::SocketFamily::Inet6 as i32
            }),
            socket_protocol: Some(pb::SocketProtocol::Udp as i32),
            query_address: Some(client.to_vec()),
            query_port: Some(53_000),
            response_time_sec: Some(since.as_secs()),
            response_time_nsec: Some(since.subsec_nanos()),
            response_message: Some(response.to_vec()),
            ..Default::default()
        }),
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query, ResponseCode},
        rr::{
            rdata::{A, AAAA, CNAME},
            RecordType,
        },
    };
    use std::str::FromStr;

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn response(qname: &str, qtype: RecordType, answers: Vec<Record>) -> Vec<u8> {
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(name(qname), qtype));
        for a in answers {
            m.add_answer(a);
        }
        m.to_vec().unwrap()
    }

    fn a(owner: &str, ip: [u8; 4], ttl: u32) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A::from(Ipv4Addr::from(ip))))
    }

    fn cname(owner: &str, target: &str) -> Record {
        Record::from_rdata(name(owner), 300, RData::CNAME(CNAME(name(target))))
    }

    fn decoded(frame: &[u8]) -> DnsResponse {
        match decode(frame, "tapd", UNIX_EPOCH).unwrap() {
            Decoded::Response { response, .. } => response,
            Decoded::Ignored => panic!("ignored"),
        }
    }

    #[test]
    fn client_response_follows_the_cname_chain_and_keeps_only_its_addresses() {
        let wire = response(
            "WWW.Example.com.",
            RecordType::A,
            vec![
                cname("www.example.com.", "edge.Example.NET."),
                cname("edge.example.net.", "e1.cdn.test."),
                a("e1.cdn.test.", [192, 0, 2, 1], 20),
                a("e1.cdn.test.", [192, 0, 2, 2], 20),
                a("unrelated.test.", [203, 0, 113, 9], 99),
                Record::from_rdata(
                    name("e1.cdn.test."),
                    30,
                    RData::AAAA(AAAA::from(Ipv6Addr::LOCALHOST)),
                ),
            ],
        );
        let frame = client_response_frame(
            Some(b"coredns-1"),
            &[10, 244, 1, 5],
            &wire,
            UNIX_EPOCH + Duration::new(1_700_000_000, 42),
        );
        let r = decoded(&frame);
        assert_eq!(r.client, IpAddr::from([10, 244, 1, 5]));
        assert_eq!(r.qname.as_str(), "www.example.com");
        assert_eq!(r.qtype, 1);
        assert_eq!(r.rcode, 0);
        let chain: Vec<&str> = r.cname_chain.iter().map(DnsName::as_str).collect();
        assert_eq!(chain, ["edge.example.net", "e1.cdn.test"]);
        let ips: Vec<(String, u32)> = r
            .answers
            .iter()
            .map(|a| (a.ip.to_string(), a.ttl))
            .collect();
        assert_eq!(
            ips,
            [
                ("192.0.2.1".to_string(), 20),
                ("192.0.2.2".to_string(), 20),
                ("::1".to_string(), 30)
            ]
        );
        assert_eq!(r.server_identity, "coredns-1");
        assert_eq!(
            r.response_time,
            Some(UNIX_EPOCH + Duration::new(1_700_000_000, 42))
        );
    }

    #[test]
    fn addresses_beyond_the_cap_are_left_out_and_counted() {
        let records = (0..300u16)
            .map(|i| a("many.test.", [10, 9, (i >> 8) as u8, i as u8], 60))
            .collect();
        let wire = response("many.test.", RecordType::A, records);
        let frame = client_response_frame(None, &[10, 0, 0, 1], &wire, UNIX_EPOCH);
        match decode(&frame, "tapd", UNIX_EPOCH).unwrap() {
            Decoded::Response {
                response,
                addresses_cut,
            } => {
                assert_eq!(response.answers.len(), MAX_ANSWERS);
                assert_eq!(addresses_cut, 300 - MAX_ANSWERS);
                assert_eq!(response.answers[0].ip, IpAddr::from([10, 9, 0, 0]));
            }
            Decoded::Ignored => panic!("ignored"),
        }
    }

    #[test]
    fn cname_loops_end_and_identity_falls_back() {
        let wire = response(
            "a.test.",
            RecordType::A,
            vec![
                cname("a.test.", "b.test."),
                cname("b.test.", "a.test."),
                a("b.test.", [192, 0, 2, 7], 5),
            ],
        );
        let r = decoded(&client_response_frame(
            None,
            &[10, 0, 0, 1],
            &wire,
            UNIX_EPOCH,
        ));
        let chain: Vec<&str> = r.cname_chain.iter().map(DnsName::as_str).collect();
        assert_eq!(chain, ["b.test"]);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.server_identity, "tapd");
    }

    #[test]
    fn ttls_with_the_top_bit_set_count_as_zero() {
        let wire = response(
            "t.test.",
            RecordType::A,
            vec![
                a("t.test.", [192, 0, 2, 1], MAX_TTL),
                a("t.test.", [192, 0, 2, 2], MAX_TTL + 1),
                a("t.test.", [192, 0, 2, 3], u32::MAX),
                Record::from_rdata(
                    name("t.test."),
                    0x9000_0000,
                    RData::AAAA(AAAA::from(Ipv6Addr::LOCALHOST)),
                ),
            ],
        );
        let r = decoded(&client_response_frame(
            None,
            &[10, 0, 0, 1],
            &wire,
            UNIX_EPOCH,
        ));
        let ttls: Vec<u32> = r.answers.iter().map(|a| a.ttl).collect();
        assert_eq!(ttls, [2_147_483_647, 0, 0, 0]);
    }

    #[test]
    fn long_cname_chains_are_cut() {
        let hops: Vec<Record> = (0..40)
            .map(|i| cname(&format!("n{i}.test."), &format!("n{}.test.", i + 1)))
            .collect();
        let wire = response("n0.test.", RecordType::A, hops);
        let r = decoded(&client_response_frame(
            None,
            &[10, 0, 0, 1],
            &wire,
            UNIX_EPOCH,
        ));
        assert_eq!(r.cname_chain.len(), MAX_CNAME_CHAIN);
    }

    #[test]
    fn ipv4_mapped_clients_are_unmapped_and_ipv6_kept() {
        let wire = response("x.test.", RecordType::A, vec![]);
        let mapped = Ipv4Addr::new(10, 244, 0, 9).to_ipv6_mapped().octets();
        let r = decoded(&client_response_frame(None, &mapped, &wire, UNIX_EPOCH));
        assert_eq!(r.client, IpAddr::from([10, 244, 0, 9]));
        let v6: Ipv6Addr = "fd00::5".parse().unwrap();
        let r = decoded(&client_response_frame(
            None,
            &v6.octets(),
            &wire,
            UNIX_EPOCH,
        ));
        assert_eq!(r.client, IpAddr::V6(v6));
        assert_eq!(
            decode(
                &client_response_frame(None, &[1, 2, 3], &wire, UNIX_EPOCH),
                "",
                UNIX_EPOCH
            ),
            Err(DecodeError::ClientAddress(3))
        );
    }

    #[test]
    fn rcode_and_other_message_types() {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(name("gone.test."), RecordType::AAAA));
        m.metadata.response_code = ResponseCode::NXDomain;
        let r = decoded(&client_response_frame(
            None,
            &[10, 0, 0, 1],
            &m.to_vec().unwrap(),
            UNIX_EPOCH,
        ));
        assert_eq!((r.rcode, r.qtype), (3, 28));

        let fwd = pb::Dnstap {
            r#type: dnstap::Type::Message as i32,
            message: Some(pb::Message {
                r#type: message::Type::ForwarderResponse as i32,
                query_address: Some(vec![10, 96, 0, 10]),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            decode(&fwd.encode_to_vec(), "", UNIX_EPOCH),
            Ok(Decoded::Ignored)
        );
    }

    #[test]
    fn every_reason_is_listed() {
        let errors = [
            DecodeError::Protobuf(String::new()),
            DecodeError::NoMessage,
            DecodeError::NoClientAddress,
            DecodeError::ClientAddress(3),
            DecodeError::NoResponseMessage,
            DecodeError::LyingCounts(12),
            DecodeError::Dns(String::new()),
            DecodeError::NoQuestion,
            DecodeError::Name {
                name: String::new(),
                err: NameError::Empty,
            },
        ];
        for e in errors {
            assert!(DecodeError::REASONS.contains(&e.reason()), "{e:?}");
        }
    }

    #[test]
    fn hostile_payloads_are_errors_not_panics() {
        assert!(matches!(
            decode(b"\xff\xff\xff garbage", "", UNIX_EPOCH),
            Err(DecodeError::Protobuf(_))
        ));
        // Lying counts: a header claiming 65535 answers in a 12-byte message.
        let mut lying = vec![0u8; 12];
        lying[2] = 0x80;
        lying[4..6].copy_from_slice(&1u16.to_be_bytes());
        lying[6..8].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(
            decode(
                &client_response_frame(None, &[10, 0, 0, 1], &lying, UNIX_EPOCH),
                "",
                UNIX_EPOCH
            ),
            Err(DecodeError::LyingCounts(12))
        );
        // A compression pointer that points at itself.
        let mut looped = vec![0, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
        looped.extend([0xc0, 12, 0, 1, 0, 1]);
        assert!(matches!(
            decode(
                &client_response_frame(None, &[10, 0, 0, 1], &looped, UNIX_EPOCH),
                "",
                UNIX_EPOCH
            ),
            Err(DecodeError::Dns(_))
        ));
        // Odd bytes are escaped (a space becomes four characters), so two labels of 63 spaces are too
        // long for a DnsName.
        let mut odd = vec![0, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
        for _ in 0..2 {
            odd.push(63);
            odd.extend([b' '; 63]);
        }
        odd.extend([0, 0, 1, 0, 1]);
        assert!(matches!(
            decode(
                &client_response_frame(None, &[10, 0, 0, 1], &odd, UNIX_EPOCH),
                "",
                UNIX_EPOCH
            ),
            Err(DecodeError::Name {
                err: NameError::TooLong,
                ..
            })
        ));
    }
}

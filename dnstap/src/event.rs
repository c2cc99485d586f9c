//! The decoded DNS answer: the one domain type that tapd produces and flowd consumes.
//!
//! Wire forms (dnstap on the way in, `dnsflow.v1.DnsEvent` on the way out, the JSON that grpcurl prints
//! when replaying) are converted to and from this type once, at the edge. After the edge, code works with
//! `IpAddr`, `Duration`-like TTLs and normalized names, never raw strings.

use dnsflow_proto::v1 as pb;
use std::{
    fmt,
    net::IpAddr,
    str::FromStr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// Longest presentation-form name we accept (RFC 1035: 255 octets on the wire, 253 in text).
pub const MAX_NAME_LEN: usize = 253;
/// A CNAME chain longer than this is treated as a loop or an attack and cut (resolvers give up near 8–16).
pub const MAX_CNAME_CHAIN: usize = 16;
/// More A/AAAA records than this in one answer are ignored (a UDP answer holds far fewer).
pub const MAX_ANSWERS: usize = 256;

/// A DNS name, normalized: ASCII lower-case, no trailing dot, at most [`MAX_NAME_LEN`] bytes, made only
/// of printable ASCII without spaces (names with other bytes are escaped by the decoder before they get
/// here, and never reach a command line anyway).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsName(String);

/// Why a string is not a [`DnsName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("name longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    #[error("name contains a non-printable or non-ASCII byte")]
    BadByte,
    #[error("name has an empty label")]
    EmptyLabel,
}

impl DnsName {
    /// Normalizes `s`: lower-case, one trailing dot stripped. The root name (".") is rejected: nobody
    /// resolves an address for it.
    pub fn new(s: &str) -> Result<Self, NameError> {
        let s = s.strip_suffix('.').unwrap_or(s);
        Self::check(s)?;
        Ok(Self(s.to_ascii_lowercase()))
    }

    /// Like [`DnsName::new`], reusing the allocation of `s` (the decoder's hot path).
    pub fn from_string(mut s: String) -> Result<Self, NameError> {
        if s.ends_with('.') {
            s.pop();
        }
        Self::check(&s)?;
        s.make_ascii_lowercase();
        Ok(Self(s))
    }

    fn check(s: &str) -> Result<(), NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(NameError::BadByte);
        }
        if s.split('.').any(str::is_empty) {
            return Err(NameError::EmptyLabel);
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DnsName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// One address record on the answer's CNAME chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Answer {
    pub ip: IpAddr,
    /// TTL in seconds, as the client received it.
    pub ttl: u32,
}

/// A DNS response as the client received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsResponse {
    /// The client (pod) the answer went to.
    pub client: IpAddr,
    pub qname: DnsName,
    /// Question type code (1 = A, 28 = AAAA, ...).
    pub qtype: u16,
    /// Response code (0 = NOERROR).
    pub rcode: u16,
    /// CNAME targets followed from `qname`, in order.
    pub cname_chain: Vec<DnsName>,
    /// A/AAAA records owned by `qname` or a name on `cname_chain`.
    pub answers: Vec<Answer>,
    /// When the server sent it (from dnstap), if known.
    pub response_time: Option<SystemTime>,
    /// When tapd decoded it.
    pub decoded_time: SystemTime,
    /// The server's dnstap identity (or the tapd instance name).
    pub server_identity: String,
    /// Per-tapd sequence number.
    pub sequence: u64,
    /// Sent from tapd's recent-answer cache rather than live.
    pub replayed: bool,
}

pub const RCODE_NOERROR: u16 = 0;

impl DnsResponse {
    /// A NOERROR response of type A to `client` for `qname`, with everything else at its zero value
    /// (no times, no identity, sequence 0): what tests, benchmarks and tools build by hand.
    pub fn noerror(
        client: IpAddr,
        qname: DnsName,
        cname_chain: Vec<DnsName>,
        answers: Vec<Answer>,
    ) -> Self {
        Self {
            client,
            qname,
            qtype: 1,
            rcode: RCODE_NOERROR,
            cname_chain,
            answers,
            response_time: None,
            decoded_time: UNIX_EPOCH,
            server_identity: String::new(),
            sequence: 0,
            replayed: false,
        }
    }

    /// Only NOERROR answers grant anything.
    pub fn is_noerror(&self) -> bool {
        self.rcode == RCODE_NOERROR
    }

    /// Every name the answers may belong to: the question name, then the CNAME chain.
    pub fn names(&self) -> impl Iterator<Item = &DnsName> {
        std::iter::once(&self.qname).chain(self.cname_chain.iter())
    }

    /// The longest TTL among the answers, as a duration (zero when there are none).
    pub fn max_ttl(&self) -> Duration {
        Duration::from_secs(
            self.answers
                .iter()
                .map(|a| u64::from(a.ttl))
                .max()
                .unwrap_or(0),
        )
    }
}

const RCODES: &[(u16, &str)] = &[
    (0, "NOERROR"),
    (1, "FORMERR"),
    (2, "SERVFAIL"),
    (3, "NXDOMAIN"),
    (4, "NOTIMP"),
    (5, "REFUSED"),
    (6, "YXDOMAIN"),
    (7, "YXRRSET"),
    (8, "NXRRSET"),
    (9, "NOTAUTH"),
    (10, "NOTZONE"),
];

const QTYPES: &[(u16, &str)] = &[
    (1, "A"),
    (2, "NS"),
    (5, "CNAME"),
    (6, "SOA"),
    (12, "PTR"),
    (15, "MX"),
    (16, "TXT"),
    (28, "AAAA"),
    (33, "SRV"),
    (64, "SVCB"),
    (65, "HTTPS"),
    (255, "ANY"),
];

fn mnemonic(table: &[(u16, &str)], code: u16, prefix: &str) -> String {
    table
        .iter()
        .find(|(c, _)| *c == code)
        .map_or_else(|| format!("{prefix}{code}"), |(_, m)| (*m).to_string())
}

fn from_mnemonic(table: &[(u16, &str)], s: &str, prefix: &str) -> Option<u16> {
    let s = s.trim();
    table
        .iter()
        .find(|(_, m)| m.eq_ignore_ascii_case(s))
        .map(|(c, _)| *c)
        .or_else(|| {
            s.get(..prefix.len())
                .filter(|p| p.eq_ignore_ascii_case(prefix))
                .and_then(|_| s[prefix.len()..].parse().ok())
        })
}

/// "NOERROR", "NXDOMAIN", ..., "RCODE23".
pub fn rcode_name(rcode: u16) -> String {
    mnemonic(RCODES, rcode, "RCODE")
}

/// "A", "AAAA", ..., "TYPE65534" (RFC 3597 form).
pub fn qtype_name(qtype: u16) -> String {
    mnemonic(QTYPES, qtype, "TYPE")
}

/// Why a `dnsflow.v1.DnsEvent` is not a valid [`DnsResponse`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("client_ip {0:?} is not an IP address")]
    ClientIp(String),
    #[error("query_name {name:?}: {err}")]
    QueryName { name: String, err: NameError },
    #[error("cname_chain entry {name:?}: {err}")]
    Cname { name: String, err: NameError },
    #[error("answer ip {0:?} is not an IP address")]
    AnswerIp(String),
    #[error("unknown rcode {0:?}")]
    Rcode(String),
    #[error("unknown query_type {0:?}")]
    QueryType(String),
    #[error("more than {MAX_CNAME_CHAIN} CNAMEs")]
    ChainTooLong,
    #[error("more than {MAX_ANSWERS} answers")]
    TooManyAnswers,
}

/// Times before 1970 do not occur in dnstap (the sender's clock would be broken); they are taken as
/// unknown.
fn from_timestamp(t: &prost_types::Timestamp) -> Option<SystemTime> {
    SystemTime::try_from(*t).ok().filter(|t| *t >= UNIX_EPOCH)
}

impl From<&DnsResponse> for pb::DnsEvent {
    fn from(r: &DnsResponse) -> Self {
        pb::DnsEvent {
            client_ip: r.client.to_string(),
            query_name: r.qname.to_string(),
            query_type: qtype_name(r.qtype),
            rcode: rcode_name(r.rcode),
            cname_chain: r.cname_chain.iter().map(ToString::to_string).collect(),
            answers: r
                .answers
                .iter()
                .map(|a| pb::Answer {
                    ip: a.ip.to_string(),
                    ttl: a.ttl,
                })
                .collect(),
            response_time: r.response_time.map(Into::into),
            decoded_time: Some(r.decoded_time.into()),
            server_identity: r.server_identity.clone(),
            sequence: r.sequence,
            replayed: r.replayed,
        }
    }
}

impl TryFrom<pb::DnsEvent> for DnsResponse {
    type Error = EventError;

    fn try_from(e: pb::DnsEvent) -> Result<Self, Self::Error> {
        if e.cname_chain.len() > MAX_CNAME_CHAIN {
            return Err(EventError::ChainTooLong);
        }
        if e.answers.len() > MAX_ANSWERS {
            return Err(EventError::TooManyAnswers);
        }
        let client = e
            .client_ip
            .parse()
            .map_err(|_| EventError::ClientIp(e.client_ip.clone()))?;
        let qname = DnsName::new(&e.query_name).map_err(|err| EventError::QueryName {
            name: e.query_name.clone(),
            err,
        })?;
        let cname_chain = e
            .cname_chain
            .iter()
            .map(|n| {
                DnsName::new(n).map_err(|err| EventError::Cname {
                    name: n.clone(),
                    err,
                })
            })
            .collect::<Result<_, _>>()?;
        let answers = e
            .answers
            .iter()
            .map(|a| {
                a.ip.parse()
                    .map(|ip| Answer { ip, ttl: a.ttl })
                    .map_err(|_| EventError::AnswerIp(a.ip.clone()))
            })
            .collect::<Result<_, _>>()?;
        // proto3 omits empty strings: an absent rcode is NOERROR, an absent type is A.
        let rcode = if e.rcode.is_empty() {
            RCODE_NOERROR
        } else {
            from_mnemonic(RCODES, &e.rcode, "RCODE")
                .ok_or_else(|| EventError::Rcode(e.rcode.clone()))?
        };
        let qtype = if e.query_type.is_empty() {
            1
        } else {
            from_mnemonic(QTYPES, &e.query_type, "TYPE")
                .ok_or_else(|| EventError::QueryType(e.query_type.clone()))?
        };
        Ok(DnsResponse {
            client,
            qname,
            qtype,
            rcode,
            cname_chain,
            answers,
            response_time: e.response_time.as_ref().and_then(from_timestamp),
            decoded_time: e
                .decoded_time
                .as_ref()
                .and_then(from_timestamp)
                .unwrap_or(UNIX_EPOCH),
            server_identity: e.server_identity,
            sequence: e.sequence,
            replayed: e.replayed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> DnsName {
        DnsName::new(s).expect("valid name")
    }

    #[test]
    fn names_normalize_case_and_one_trailing_dot() {
        assert_eq!(n("WWW.Google.COM.").as_str(), "www.google.com");
        assert_eq!(DnsName::new("."), Err(NameError::Empty));
        assert_eq!(DnsName::new("a..b"), Err(NameError::EmptyLabel));
        assert_eq!(DnsName::new("a.b.."), Err(NameError::EmptyLabel));
        assert_eq!(DnsName::new("a b"), Err(NameError::BadByte));
        assert_eq!(DnsName::new(&"a".repeat(254)), Err(NameError::TooLong));
        assert_eq!(
            DnsName::from_string("WWW.Google.COM.".into()),
            Ok(n("www.google.com"))
        );
        assert_eq!(
            DnsName::from_string("a..b".into()),
            Err(NameError::EmptyLabel)
        );
    }

    #[test]
    fn mnemonics_round_trip() {
        for code in [0u16, 3, 23, 4095] {
            assert_eq!(
                from_mnemonic(RCODES, &rcode_name(code), "RCODE"),
                Some(code)
            );
        }
        for code in [1u16, 28, 65, 65534] {
            assert_eq!(from_mnemonic(QTYPES, &qtype_name(code), "TYPE"), Some(code));
        }
        assert_eq!(from_mnemonic(RCODES, "BOGUS", "RCODE"), None);
        assert_eq!(from_mnemonic(RCODES, "RCODEx", "RCODE"), None);
    }

    #[test]
    fn event_round_trips_through_the_wire_form() {
        let r = DnsResponse {
            client: "10.244.1.5".parse().expect("ip"),
            qname: n("www.example.com"),
            qtype: 28,
            rcode: 0,
            cname_chain: vec![n("edge.example.net")],
            answers: vec![Answer {
                ip: "2001:db8::1".parse().expect("ip"),
                ttl: 30,
            }],
            response_time: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
            decoded_time: UNIX_EPOCH + Duration::new(1_700_000_001, 0),
            server_identity: "coredns-1".into(),
            sequence: 7,
            replayed: false,
        };
        let back = DnsResponse::try_from(pb::DnsEvent::from(&r)).expect("valid");
        assert_eq!(back, r);
    }

    #[test]
    fn hostile_wire_events_are_rejected_with_a_reason() {
        let bad = pb::DnsEvent {
            client_ip: "not-an-ip".into(),
            query_name: "a.b".into(),
            ..Default::default()
        };
        assert!(matches!(
            DnsResponse::try_from(bad),
            Err(EventError::ClientIp(_))
        ));
        let bad = pb::DnsEvent {
            client_ip: "10.0.0.1".into(),
            query_name: "a.b".into(),
            answers: vec![pb::Answer {
                ip: "1.2.3".into(),
                ttl: 1,
            }],
            ..Default::default()
        };
        assert!(matches!(
            DnsResponse::try_from(bad),
            Err(EventError::AnswerIp(_))
        ));
        let bad = pb::DnsEvent {
            client_ip: "10.0.0.1".into(),
            query_name: "a.b".into(),
            cname_chain: vec!["c.d".into(); MAX_CNAME_CHAIN + 1],
            ..Default::default()
        };
        assert_eq!(DnsResponse::try_from(bad), Err(EventError::ChainTooLong));
    }
}

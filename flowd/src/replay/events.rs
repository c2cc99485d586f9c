//! Recorded DNS answers for `flowd replay`: a dnstap capture (Frame Streams file, as `fstrm_capture` or
//! tapd's `--capture` writes it) or the JSON that `grpcurl` prints for `dnsflow.v1.DnsTap/Subscribe`
//! (pretty-printed objects back to back, camelCase field names, 64-bit integers as strings, timestamps
//! in RFC 3339). snake_case field names are accepted too.
//!
//! Both are converted to [`DnsResponse`] at this edge. An event that does not convert is handed on as a
//! reason (replay counts it and goes on); input that cannot be read on at all (broken JSON, a capture
//! cut mid-frame) is an error naming the file.

use dnsflow_proto::v1 as pb;
use serde_json::{json, Map, Value};
use std::{
    io::{BufReader, Read},
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tapd::{CaptureReader, DnsResponse};

/// Largest event file read: far beyond any debugging session, small enough that a wrong path cannot
/// exhaust memory through one endless JSON value.
pub const MAX_EVENTS_BYTES: u64 = 1 << 30;

/// Reads at most `limit` bytes of `inner`, then fails: a silent cut would surface as a misleading
/// "truncated" or "invalid JSON" error instead of naming the real problem.
#[derive(Debug)]
struct Bounded<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> Bounded<R> {
    fn new(inner: R, limit: u64) -> Self {
        Self {
            inner,
            left: limit,
            limit,
        }
    }
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            // Input ending exactly at the limit is fine; one more byte is not.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(std::io::Error::other(format!(
                    "input larger than {} bytes",
                    self.limit
                ))),
            };
        }
        let max = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Why recorded input cannot be read on.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{origin}: {message}")]
    Broken { origin: String, message: String },
}

/// One recorded event: a response, or why the record is not one.
pub type Item = Result<DnsResponse, String>;

/// What a reader saw besides the items it handed on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InputStats {
    /// dnstap messages that are not client responses (queries, FORWARDER_* traffic).
    pub not_client_responses: u64,
}

/// Reads a dnstap capture, handing each client response (or decode failure) to `each`.
pub fn read_capture(
    input: impl Read,
    origin: &str,
    mut each: impl FnMut(Item),
) -> Result<InputStats, InputError> {
    let mut reader = CaptureReader::new(BufReader::new(Bounded::new(input, MAX_EVENTS_BYTES)));
    for item in reader.by_ref() {
        match item {
            Ok(resp) => each(Ok(resp)),
            Err(tapd::Error::Decode(e)) => each(Err(format!("undecodable dnstap frame: {e}"))),
            Err(e) => {
                return Err(InputError::Broken {
                    origin: origin.to_string(),
                    message: format!("not a readable dnstap capture: {e}"),
                })
            }
        }
    }
    Ok(InputStats {
        not_client_responses: reader.stats().skipped,
    })
}

/// Reads grpcurl's JSON event stream, handing each event (or why it is not one) to `each`.
pub fn read_events_json(
    input: impl Read,
    origin: &str,
    mut each: impl FnMut(Item),
) -> Result<InputStats, InputError> {
    let reader = BufReader::new(Bounded::new(input, MAX_EVENTS_BYTES));
    for (i, value) in serde_json::Deserializer::from_reader(reader)
        .into_iter::<Value>()
        .enumerate()
    {
        let value = value.map_err(|e| InputError::Broken {
            origin: origin.to_string(),
            message: format!("event {}: invalid JSON: {e}", i + 1),
        })?;
        each(
            event_from_json(&value)
                .and_then(|e| DnsResponse::try_from(e).map_err(|e| e.to_string()))
                .map_err(|e| format!("event {}: {e}", i + 1)),
        );
    }
    Ok(InputStats::default())
}

/// Looks a field up under its camelCase (grpcurl) or snake_case (proto) name.
fn field<'a>(obj: &'a Map<String, Value>, camel: &str, snake: &str) -> Option<&'a Value> {
    obj.get(camel)
        .or_else(|| obj.get(snake))
        .filter(|v| !v.is_null())
}

fn string(obj: &Map<String, Value>, camel: &str, snake: &str) -> Result<String, String> {
    match field(obj, camel, snake) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("{camel}: expected a string, got {other}")),
    }
}

/// proto3 JSON prints 64-bit integers as strings and accepts numbers too.
fn integer(v: &Value, what: &str) -> Result<u64, String> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("{what}: expected a non-negative integer, got {v}"))
}

fn timestamp(
    obj: &Map<String, Value>,
    camel: &str,
    snake: &str,
) -> Result<Option<prost_types::Timestamp>, String> {
    match field(obj, camel, snake) {
        None => Ok(None),
        Some(Value::String(s)) => parse_rfc3339(s)
            .map(|t| Some(to_timestamp(t)))
            .ok_or_else(|| format!("{camel}: {s:?} is not an RFC 3339 time")),
        Some(other) => Err(format!("{camel}: expected an RFC 3339 string, got {other}")),
    }
}

/// Converts one grpcurl JSON object into the wire event.
pub fn event_from_json(v: &Value) -> Result<pb::DnsEvent, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("expected a JSON object, got {}", kind_of(v)))?;
    let list = |camel: &str, snake: &str| -> Result<Vec<Value>, String> {
        match field(obj, camel, snake) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => Ok(a.clone()),
            Some(other) => Err(format!("{camel}: expected a list, got {other}")),
        }
    };
    let cname_chain = list("cnameChain", "cname_chain")?
        .iter()
        .map(|n| {
            n.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("cnameChain: expected strings, got {n}"))
        })
        .collect::<Result<_, _>>()?;
    let answers = list("answers", "answers")?
        .iter()
        .map(|a| {
            let a = a
                .as_object()
                .ok_or_else(|| format!("answers: expected objects, got {a}"))?;
            let ttl = match a.get("ttl").filter(|t| !t.is_null()) {
                None => 0,
                Some(t) => u32::try_from(integer(t, "answers.ttl")?)
                    .map_err(|_| format!("answers.ttl: {t} is out of range"))?,
            };
            Ok(pb::Answer {
                ip: string(a, "ip", "ip")?,
                ttl,
            })
        })
        .collect::<Result<_, String>>()?;
    let replayed = match field(obj, "replayed", "replayed") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(format!("replayed: expected true or false, got {other}")),
    };
    Ok(pb::DnsEvent {
        client_ip: string(obj, "clientIp", "client_ip")?,
        query_name: string(obj, "queryName", "query_name")?,
        query_type: string(obj, "queryType", "query_type")?,
        rcode: string(obj, "rcode", "rcode")?,
        cname_chain,
        answers,
        response_time: timestamp(obj, "responseTime", "response_time")?,
        decoded_time: timestamp(obj, "decodedTime", "decoded_time")?,
        server_identity: string(obj, "serverIdentity", "server_identity")?,
        sequence: field(obj, "sequence", "sequence")
            .map(|s| integer(s, "sequence"))
            .transpose()?
            .unwrap_or(0),
        replayed,
    })
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The event as grpcurl prints it (proto3 JSON: camelCase, defaults left out, uint64 as a string).
pub fn event_to_json(e: &pb::DnsEvent) -> Value {
    let mut obj = Map::new();
    let mut put = |k: &str, v: Value| {
        obj.insert(k.to_string(), v);
    };
    let non_empty = |s: &str| (!s.is_empty()).then(|| json!(s));
    for (k, v) in [
        ("clientIp", non_empty(&e.client_ip)),
        ("queryName", non_empty(&e.query_name)),
        ("queryType", non_empty(&e.query_type)),
        ("rcode", non_empty(&e.rcode)),
        (
            "cnameChain",
            (!e.cname_chain.is_empty()).then(|| json!(e.cname_chain)),
        ),
        (
            "answers",
            (!e.answers.is_empty()).then(|| {
                Value::Array(
                    e.answers
                        .iter()
                        .map(|a| {
                            let mut m = Map::new();
                            if !a.ip.is_empty() {
                                m.insert("ip".into(), json!(a.ip));
                            }
                            if a.ttl != 0 {
                                m.insert("ttl".into(), json!(a.ttl));
                            }
                            Value::Object(m)
                        })
                        .collect(),
                )
            }),
        ),
        (
            "responseTime",
            e.response_time.as_ref().map(|t| json!(format_timestamp(t))),
        ),
        (
            "decodedTime",
            e.decoded_time.as_ref().map(|t| json!(format_timestamp(t))),
        ),
        ("serverIdentity", non_empty(&e.server_identity)),
        (
            "sequence",
            (e.sequence != 0).then(|| json!(e.sequence.to_string())),
        ),
        ("replayed", e.replayed.then_some(json!(true))),
    ] {
        if let Some(v) = v {
            put(k, v);
        }
    }
    Value::Object(obj)
}

fn to_timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn format_timestamp(t: &prost_types::Timestamp) -> String {
    let secs = u64::try_from(t.seconds).unwrap_or(0);
    let nanos = u32::try_from(t.nanos).unwrap_or(0);
    format_rfc3339(UNIX_EPOCH + Duration::new(secs, nanos.min(999_999_999)))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `2026-11-26T04:00:00.25Z`-style UTC time with 0, 3, 6 or 9 fraction digits, as proto3 JSON prints it.
pub fn format_rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let (y, mo, da) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    let nanos = d.subsec_nanos();
    let frac = if nanos == 0 {
        String::new()
    } else if nanos.is_multiple_of(1_000_000) {
        format!(".{:03}", nanos / 1_000_000)
    } else if nanos.is_multiple_of(1_000) {
        format!(".{:06}", nanos / 1_000)
    } else {
        format!(".{nanos:09}")
    };
    format!(
        "{y:04}-{mo:02}-{da:02}T{:02}:{:02}:{:02}{frac}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Parses an RFC 3339 time (`Z` or a numeric offset, up to 9 fraction digits); `None` if malformed or
/// before 1970.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        nanos = frac[..digits].parse::<u32>().ok()? * 10u32.pow(u32::try_from(9 - digits).ok()?);
        rest = &frac[digits..];
    }
    let offset: i64 = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            let oh = i64::from(rest[1..3].parse::<u32>().ok()?);
            let om = i64::from(rest[4..6].parse::<u32>().ok()?);
            sign * (oh * 3600 + om * 60)
        }
    };
    let days = days_from_civil(i64::from(y), mo, d);
    let secs = days * 86_400 + i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(se) - offset;
    UNIX_EPOCH.checked_add(Duration::new(u64::try_from(secs).ok()?, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_rejects_garbage() {
        for s in [
            "1970-01-01T00:00:00Z",
            "2026-11-26T04:00:00.250Z",
            "2024-02-29T23:59:59.123456Z",
            "2000-03-01T12:34:56.000000001Z",
        ] {
            let t = parse_rfc3339(s).unwrap_or_else(|| panic!("{s}"));
            assert_eq!(format_rfc3339(t), s);
        }
        assert_eq!(
            parse_rfc3339("2026-11-26T05:00:00+01:00"),
            parse_rfc3339("2026-11-26T04:00:00Z")
        );
        assert_eq!(
            parse_rfc3339("2026-11-26T04:00:00.5Z")
                .map(format_rfc3339)
                .as_deref(),
            Some("2026-11-26T04:00:00.500Z")
        );
        for bad in [
            "",
            "2026-11-26",
            "2026-13-01T00:00:00Z",
            "2026-11-26T04:00:00",
            "1969-12-31T23:59:59Z",
            "2026-11-26T04:00:00.Z",
            "2026-11-26T04:00:00.1234567890Z",
            "2026-1a-26T04:00:00Z",
            "2026-11-26T04:00:00+1:00",
            "2026-11-26T04:00:00ü",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    fn sample() -> pb::DnsEvent {
        pb::DnsEvent {
            client_ip: "10.244.1.5".into(),
            query_name: "www.google.com".into(),
            query_type: "A".into(),
            rcode: "NOERROR".into(),
            cname_chain: vec!["www3.l.google.com".into()],
            answers: vec![pb::Answer {
                ip: "142.250.74.36".into(),
                ttl: 300,
            }],
            response_time: Some(prost_types::Timestamp {
                seconds: 1_795_665_600,
                nanos: 250_000_000,
            }),
            decoded_time: Some(prost_types::Timestamp {
                seconds: 1_795_665_601,
                nanos: 0,
            }),
            server_identity: "coredns-1".into(),
            sequence: 18_446_744_073_709_551_615,
            replayed: true,
        }
    }

    #[test]
    fn grpcurl_json_round_trips() {
        let e = sample();
        let v = event_to_json(&e);
        assert_eq!(v["clientIp"], "10.244.1.5");
        assert_eq!(v["sequence"], "18446744073709551615");
        assert_eq!(v["responseTime"], "2026-11-26T04:00:00.250Z");
        assert_eq!(event_from_json(&v), Ok(e));
        // Defaults are left out, as proto3 JSON does.
        let empty = event_to_json(&pb::DnsEvent::default());
        assert_eq!(empty, json!({}));
    }

    #[test]
    fn snake_case_and_numbers_are_accepted() {
        let v = json!({"client_ip": "10.0.0.1", "query_name": "a.b", "cname_chain": ["c.d"],
                       "answers": [{"ip": "1.2.3.4", "ttl": "30"}], "sequence": 5,
                       "response_time": "2026-11-26T04:00:00Z"});
        let e = event_from_json(&v).expect("valid");
        assert_eq!(e.client_ip, "10.0.0.1");
        assert_eq!(e.cname_chain, vec!["c.d".to_string()]);
        assert_eq!(e.answers[0].ttl, 30);
        assert_eq!(e.sequence, 5);
        assert!(e.response_time.is_some());
    }

    #[test]
    fn wrong_shapes_say_which_field() {
        for (v, want) in [
            (json!([1]), "expected a JSON object, got a list"),
            (json!({"clientIp": 5}), "clientIp: expected a string"),
            (json!({"cnameChain": "x"}), "cnameChain: expected a list"),
            (json!({"cnameChain": [1]}), "cnameChain: expected strings"),
            (
                json!({"answers": [{"ip": "1.2.3.4", "ttl": -1}]}),
                "answers.ttl",
            ),
            (
                json!({"answers": [{"ip": "1.2.3.4", "ttl": 4_294_967_296u64}]}),
                "out of range",
            ),
            (json!({"answers": ["1.2.3.4"]}), "answers: expected objects"),
            (
                json!({"sequence": "x"}),
                "sequence: expected a non-negative integer",
            ),
            (
                json!({"responseTime": "yesterday"}),
                "responseTime: \"yesterday\" is not an RFC 3339 time",
            ),
            (
                json!({"replayed": "yes"}),
                "replayed: expected true or false",
            ),
        ] {
            let err = event_from_json(&v).expect_err("invalid");
            assert!(err.contains(want), "{v}: {err}");
        }
    }

    #[test]
    fn a_stream_of_pretty_objects_reads_event_by_event() {
        let mut text = String::new();
        for q in ["a.example", "b.example"] {
            let mut e = sample();
            e.query_name = q.into();
            text += &serde_json::to_string_pretty(&event_to_json(&e)).expect("json");
            text += "\n";
        }
        text += "{\"clientIp\": \"nope\", \"queryName\": \"c.example\"}\n";
        let mut items = Vec::new();
        read_events_json(text.as_bytes(), "ev.json", |i| items.push(i)).expect("readable");
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].as_ref().expect("ok").qname.as_str(), "a.example");
        assert_eq!(items[1].as_ref().expect("ok").qname.as_str(), "b.example");
        assert!(items[2]
            .as_ref()
            .expect_err("bad ip")
            .starts_with("event 3: client_ip"));

        let err = read_events_json(
            &b"{\"clientIp\": \"10.0.0.1\"} {oops"[..],
            "ev.json",
            |_| {},
        )
        .expect_err("broken");
        assert!(
            err.to_string()
                .starts_with("ev.json: event 2: invalid JSON"),
            "{err}"
        );
    }

    #[test]
    fn input_beyond_the_bound_is_an_error_that_says_so() {
        let mut r = Bounded::new(&b"abcdef"[..], 6);
        let mut all = Vec::new();
        r.read_to_end(&mut all).expect("exactly at the bound");
        assert_eq!(all, b"abcdef");
        let mut r = Bounded::new(&b"abcdefg"[..], 6);
        let err = r.read_to_end(&mut Vec::new()).expect_err("beyond");
        assert_eq!(err.to_string(), "input larger than 6 bytes");
    }

    #[test]
    fn captures_read_and_truncation_is_an_error() {
        let mut w = tapd::CaptureWriter::new(Vec::new()).expect("writer");
        let msg = {
            use hickory_proto::{
                op::{Message, MessageType, OpCode, Query},
                rr::{rdata::A, Name, RData, Record, RecordType},
            };
            use std::str::FromStr;
            let name = Name::from_str("www.example.com.").expect("name");
            let mut m = Message::new(1, MessageType::Response, OpCode::Query);
            m.add_query(Query::query(name.clone(), RecordType::A));
            m.add_answer(Record::from_rdata(name, 60, RData::A(A::new(1, 2, 3, 4))));
            m.to_vec().expect("encodes")
        };
        let frame = tapd::dnstap::client_response_frame(None, &[10, 244, 1, 5], &msg, UNIX_EPOCH);
        w.write_frame(&frame).expect("write");
        w.write_frame(b"garbage").expect("write");
        let bytes = w.finish().expect("finish");
        let mut items = Vec::new();
        read_capture(bytes.as_slice(), "c.fstrm", |i| items.push(i)).expect("readable");
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].as_ref().expect("ok").answers.len(), 1);
        assert!(items[1]
            .as_ref()
            .expect_err("garbage")
            .starts_with("undecodable dnstap frame"));

        let cut = &bytes[..bytes.len() - 20];
        let err = read_capture(cut, "c.fstrm", |_| {}).expect_err("truncated");
        assert!(
            err.to_string()
                .starts_with("c.fstrm: not a readable dnstap capture"),
            "{err}"
        );
    }
}

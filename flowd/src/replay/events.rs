//! Recorded DNS answers for `flowd replay`: a dnstap capture (Frame Streams file, as `fstrm_capture` or
//! tapd's `--capture` writes it) or the JSON that `grpcurl` prints for `dnsflow.v1.DnsTap/Subscribe`
//! (pretty-printed objects back to back, camelCase field names, 64-bit integers as strings, timestamps
//! in RFC 3339). snake_case field names are accepted too.
//!
//! Both are converted to [`DnsResponse`] at this edge. An event that does not convert is handed on as a
//! reason (replay counts it and goes on); input that cannot be read on at all (broken JSON, a capture
//! cut mid-frame) is an error naming the file.

use dnsflow_dnstap::{CaptureReader, DnsResponse};
use dnsflow_proto::v1 as pb;
use serde_json::Value;
use std::io::{BufReader, Read};

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
            Err(dnsflow_dnstap::Error::Decode(e)) => {
                each(Err(format!("undecodable dnstap frame: {e}")))
            }
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

/// The wire name of the events grpcurl prints for `dnsflow.v1.DnsTap/Subscribe`.
const DNS_EVENT: &str = "dnsflow.v1.DnsEvent";

/// Converts one grpcurl JSON object into the wire event.
pub fn event_from_json(v: &Value) -> Result<pb::DnsEvent, String> {
    dnsflow_proto::json::from_json(v, DNS_EVENT)
}

/// The event as grpcurl prints it (proto3 JSON: camelCase, defaults left out, uint64 as a string).
pub fn event_to_json(e: &pb::DnsEvent) -> Result<Value, String> {
    dnsflow_proto::json::to_json(e, DNS_EVENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::UNIX_EPOCH;

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
        let v = event_to_json(&e).expect("encodes");
        assert_eq!(v["clientIp"], "10.244.1.5");
        assert_eq!(v["sequence"], "18446744073709551615");
        assert_eq!(v["responseTime"], "2026-11-26T04:00:00.250Z");
        assert_eq!(event_from_json(&v), Ok(e));
        // Defaults are left out, as proto3 JSON does.
        let empty = event_to_json(&pb::DnsEvent::default()).expect("encodes");
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
            (json!([1]), "expected a map"),
            (
                json!({"clientIp": 5}),
                "clientIp: invalid type: integer `5`, expected a string",
            ),
            (json!({"cnameChain": "x"}), "cnameChain: invalid type"),
            (json!({"cnameChain": [1]}), "cnameChain[0]: invalid type"),
            (
                json!({"answers": [{"ip": "1.2.3.4", "ttl": -1}]}),
                "answers[0].ttl: out of range",
            ),
            (
                json!({"answers": [{"ip": "1.2.3.4", "ttl": 4_294_967_296u64}]}),
                "answers[0].ttl: out of range",
            ),
            (json!({"answers": ["1.2.3.4"]}), "answers[0]: invalid type"),
            (json!({"sequence": "x"}), "sequence: invalid digit"),
            (
                json!({"responseTime": "yesterday"}),
                "responseTime: invalid rfc3339 timestamp",
            ),
            (json!({"replayed": "yes"}), "replayed: invalid type"),
        ] {
            let err = event_from_json(&v).expect_err("invalid");
            assert!(err.contains(want), "{v}: {err}");
        }
    }

    #[test]
    fn fields_of_a_newer_tapd_are_ignored() {
        let v = json!({"clientIp": "10.0.0.1", "queryName": "a.b", "somethingNew": {"x": 1}});
        assert_eq!(event_from_json(&v).expect("valid").query_name, "a.b");
    }

    #[test]
    fn a_stream_of_pretty_objects_reads_event_by_event() {
        let mut text = String::new();
        for q in ["a.example", "b.example"] {
            let mut e = sample();
            e.query_name = q.into();
            text +=
                &serde_json::to_string_pretty(&event_to_json(&e).expect("encodes")).expect("json");
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
        let mut w = dnsflow_dnstap::CaptureWriter::new(Vec::new()).expect("writer");
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
        let frame =
            dnsflow_dnstap::dnstap::client_response_frame(None, &[10, 244, 1, 5], &msg, UNIX_EPOCH);
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

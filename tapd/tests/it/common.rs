//! Shared pieces of tapd's integration tests: the tapd binary, a gRPC subscriber, a Frame Streams
//! sender that plays CoreDNS, and DNS/dnstap message builders.

use bytes::BytesMut;
use dnsflow_dnstap::{
    dnstap::client_response_frame,
    framestream::{encode_control, encode_data, Control},
};
use dnsflow_proto::{
    dnstap as tap,
    v1::{dns_tap_client::DnsTapClient, DnsEvent, SubscribeRequest},
    DNSTAP_CONTENT_TYPE,
};
use dnsflow_testkit::{TapdAddrs, TapdProcess};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{rdata, Name, RData, Record, RecordType},
};
use prost::Message as _;
use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    str::FromStr,
    time::{Duration, SystemTime},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
};
use tonic::Streaming;

/// How long a test waits for events that should arrive at once.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the tapd binary built for these tests.
pub fn tapd(extra: &[&str]) -> TapdProcess {
    TapdProcess::spawn(Path::new(env!("CARGO_BIN_EXE_tapd")), extra).unwrap()
}

/// Subscribes over gRPC and waits until tapd has registered the subscriber, so nothing sent afterwards
/// is missed.
pub async fn subscribe(addrs: &TapdAddrs, cidrs: &[&str], replay: bool) -> Streaming<DnsEvent> {
    let before = addrs.metric("tapd_subscribers");
    let mut client = DnsTapClient::connect(addrs.grpc_url()).await.unwrap();
    let stream = client
        .subscribe(SubscribeRequest {
            client_cidrs: cidrs.iter().map(ToString::to_string).collect(),
            replay_recent: replay,
        })
        .await
        .unwrap()
        .into_inner();
    dnsflow_testkit::wait_until("the subscriber to register", || {
        addrs.metric("tapd_subscribers") > before
    })
    .unwrap();
    stream
}

/// Reads `n` events, failing after [`EVENT_TIMEOUT`].
pub async fn collect(stream: &mut Streaming<DnsEvent>, n: usize) -> Vec<DnsEvent> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(EVENT_TIMEOUT, stream.message()).await {
            Ok(Ok(Some(e))) => out.push(e),
            other => panic!(
                "after {} of {n} events: {other:?}; got {:#?}",
                out.len(),
                out
            ),
        }
    }
    out
}

/// Asserts that nothing more arrives within `quiet`.
pub async fn assert_no_more(stream: &mut Streaming<DnsEvent>, quiet: Duration) {
    if let Ok(next) = tokio::time::timeout(quiet, stream.message()).await {
        panic!("unexpected extra event: {next:?}");
    }
}

/// A Frame Streams sender on tapd's unix socket, as CoreDNS (bidirectional) or a file replayer
/// (unidirectional) would speak it.
pub struct Sender {
    pub stream: UnixStream,
    out: BytesMut,
}

impl Sender {
    /// Connects and completes the handshake (READY/ACCEPT when `bidirectional`, then START).
    pub async fn connect(socket: &Path, bidirectional: bool) -> Self {
        let mut s = Self::raw(socket).await;
        let ct = DNSTAP_CONTENT_TYPE.as_bytes();
        if bidirectional {
            s.stream
                .write_all(&encode_control(Control::Ready, Some(ct)))
                .await
                .unwrap();
            let want = encode_control(Control::Accept, Some(ct));
            let mut got = vec![0; want.len()];
            s.stream.read_exact(&mut got).await.unwrap();
            assert_eq!(got, want, "ACCEPT echoing the content type");
        }
        s.stream
            .write_all(&encode_control(Control::Start, Some(ct)))
            .await
            .unwrap();
        s
    }

    /// Connects without any handshake.
    pub async fn raw(socket: &Path) -> Self {
        Self {
            stream: UnixStream::connect(socket).await.unwrap(),
            out: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, frame: &[u8]) {
        self.out.clear();
        encode_data(frame, &mut self.out);
        self.stream.write_all(&self.out).await.unwrap();
    }

    /// Sends the CLIENT_RESPONSE of `client` asking `qname` A and getting `ip` (see [`client_response`]).
    pub async fn answer(
        &mut self,
        client: impl Into<IpAddr>,
        qname: &str,
        ip: impl Into<Ipv4Addr>,
    ) {
        self.send(&client_response(client.into(), qname, ip.into()))
            .await;
    }

    /// Sends many frames in large writes, as a busy sender does.
    pub async fn send_all(&mut self, frames: impl IntoIterator<Item = Vec<u8>>) {
        self.out.clear();
        for f in frames {
            encode_data(&f, &mut self.out);
            if self.out.len() > 64 * 1024 {
                self.stream.write_all(&self.out).await.unwrap();
                self.out.clear();
            }
        }
        self.stream.write_all(&self.out).await.unwrap();
    }

    /// STOP, then (bidirectional) expect FINISH.
    pub async fn stop(mut self, bidirectional: bool) {
        self.stream
            .write_all(&encode_control(Control::Stop, None))
            .await
            .unwrap();
        if bidirectional {
            let want = encode_control(Control::Finish, None);
            let mut got = vec![0; want.len()];
            self.stream.read_exact(&mut got).await.unwrap();
            assert_eq!(got, want);
        }
    }

    /// True when tapd has closed the connection (reads EOF or a reset within a second).
    pub async fn closed_by_peer(&mut self) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), self.stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

pub fn name(s: &str) -> Name {
    Name::from_str(s).unwrap()
}

/// A DNS response to `qname`/`qtype` carrying `answers`.
pub fn dns_response(qname: &str, qtype: RecordType, answers: Vec<Record>) -> Vec<u8> {
    let mut m = Message::new(0x1234, MessageType::Response, OpCode::Query);
    m.add_query(Query::query(name(qname), qtype));
    for a in answers {
        m.add_answer(a);
    }
    m.to_vec().unwrap()
}

pub fn a_record(owner: &str, ip: Ipv4Addr, ttl: u32) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(rdata::A(ip)))
}

pub fn cname_record(owner: &str, target: &str, ttl: u32) -> Record {
    Record::from_rdata(name(owner), ttl, RData::CNAME(rdata::CNAME(name(target))))
}

/// A CoreDNS-like CLIENT_RESPONSE frame: `client` asked `qname` A and got `ip`.
pub fn client_response(client: IpAddr, qname: &str, ip: Ipv4Addr) -> Vec<u8> {
    let wire = dns_response(qname, RecordType::A, vec![a_record(qname, ip, 30)]);
    let addr = match client {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    client_response_frame(Some(b"coredns-test"), &addr, &wire, SystemTime::now())
}

/// A dnstap message of another kind (what CoreDNS's forward plugin and queries produce).
pub fn other_message(kind: tap::message::Type, address: &[u8]) -> Vec<u8> {
    tap::Dnstap {
        identity: Some(b"coredns-test".to_vec()),
        r#type: tap::dnstap::Type::Message as i32,
        message: Some(tap::Message {
            r#type: kind as i32,
            socket_family: Some(tap::SocketFamily::Inet as i32),
            query_address: Some(address.to_vec()),
            response_address: Some(vec![8, 8, 8, 8]),
            query_message: Some(dns_response("x.test.", RecordType::A, vec![])),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// The answers of an event as (ip, ttl) strings, sorted.
pub fn answers(e: &DnsEvent) -> Vec<(String, u32)> {
    let mut v: Vec<(String, u32)> = e.answers.iter().map(|a| (a.ip.clone(), a.ttl)).collect();
    v.sort();
    v
}

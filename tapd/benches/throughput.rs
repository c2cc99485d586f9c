//! tapd throughput, printed as figures (run with `cargo bench -p tapd --bench throughput`):
//!
//! 1. decoded events/s on one core: a current-thread runtime reads CoreDNS-sized `CLIENT_RESPONSE`
//!    frames from a unix socket, decodes and publishes them (recent-answer cache on, no subscriber);
//! 2. events/s delivered over gRPC to one subscriber: the tapd binary in its own process, fed flat out
//!    over its unix socket, read by one tonic client here;
//! 3. peak RSS (VmHWM) of that tapd process, and of this process after the decode run.
//!
//! Targets: ≥ 300,000 decoded events/s/core, ≥ 100,000 events/s over gRPC, RSS ≤ 32 MiB.

#![allow(clippy::unwrap_used, missing_docs)]

use bytes::BytesMut;
use clap::Parser as _;
use dnsflow_dnstap::framestream::{encode_control, encode_data, Control};
use dnsflow_proto::{
    dnstap as tap,
    v1::{dns_tap_client::DnsTapClient, SubscribeRequest},
    DNSTAP_CONTENT_TYPE,
};
use dnsflow_testkit::{http_get, metric, proc_status_kib, wait_until, TapdProcess};
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query},
    rr::{rdata, Name, RData, Record, RecordType},
};
use prost::Message as _;
use std::{
    io::{Read, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::Path,
    str::FromStr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use tapd::{Config, Daemon};

/// Distinct frames cycled by the producer, each a distinct (client, name): enough to fill the
/// recent-answer cache to its default cap, so its memory is part of the figures.
const CORPUS: usize = 20_000;
const DECODE_EVENTS: usize = 2_000_000;
const GRPC_EVENTS: usize = 1_000_000;
/// The paced gRPC run offers a fifth more than the 100,000/s target.
const PACED_RATE: u32 = 120_000;
/// Producer write size: CoreDNS flushes 4 KiB at a time; bigger writes keep the producer from being
/// the bottleneck of a benchmark about tapd.
const WRITE_BATCH: usize = 64 * 1024;

/// What CoreDNS sends for `full` dnstap: identity, version, addresses, ports, query and response
/// times, and the response message (a CNAME and two A records for a cluster-style name, with an EDNS
/// OPT record, about 150 bytes of DNS).
fn corpus() -> Vec<Vec<u8>> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    (0..CORPUS)
        .map(|i| {
            let qname = format!("svc{}.team{}.svc.cluster.local.", i / 7, i % 7);
            let target = format!("edge{}.cdn.example.net.", i % 13);
            let mut m = Message::new(
                u16::try_from(i).unwrap(),
                MessageType::Response,
                OpCode::Query,
            );
            m.add_query(Query::query(Name::from_str(&qname).unwrap(), RecordType::A));
            m.add_answer(Record::from_rdata(
                Name::from_str(&qname).unwrap(),
                300,
                RData::CNAME(rdata::CNAME(Name::from_str(&target).unwrap())),
            ));
            for j in 1..=2u8 {
                m.add_answer(Record::from_rdata(
                    Name::from_str(&target).unwrap(),
                    30,
                    RData::A(rdata::A(Ipv4Addr::new(192, 0, 2, j))),
                ));
            }
            m.set_edns(Edns::new());
            tap::Dnstap {
                identity: Some(b"coredns-5d78c9869d-x2x7q".to_vec()),
                version: Some(b"CoreDNS-1.11.3".to_vec()),
                extra: None,
                r#type: tap::dnstap::Type::Message as i32,
                message: Some(tap::Message {
                    r#type: tap::message::Type::ClientResponse as i32,
                    socket_family: Some(tap::SocketFamily::Inet as i32),
                    socket_protocol: Some(tap::SocketProtocol::Udp as i32),
                    query_address: Some(vec![10, 244, 1, u8::try_from(i % 200).unwrap()]),
                    response_address: Some(vec![10, 244, 0, 2]),
                    query_port: Some(10_000 + u32::try_from(i).unwrap()),
                    response_port: Some(53),
                    query_time_sec: Some(now.as_secs()),
                    query_time_nsec: Some(now.subsec_nanos()),
                    response_time_sec: Some(now.as_secs()),
                    response_time_nsec: Some(now.subsec_nanos()),
                    response_message: Some(m.to_vec().unwrap()),
                    ..Default::default()
                }),
            }
            .encode_to_vec()
        })
        .collect()
}

/// Plays CoreDNS on `socket`: handshake, `events` frames cycled from `frames` (flat out, or paced at
/// `rate` events/s), STOP; returns when tapd answers FINISH, i.e. once it has read (and so decoded)
/// everything.
fn produce(socket: &Path, frames: &[Vec<u8>], events: usize, rate: Option<u32>) -> Duration {
    let ct = DNSTAP_CONTENT_TYPE.as_bytes();
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(&encode_control(Control::Ready, Some(ct)))
        .unwrap();
    let mut accept = vec![0; encode_control(Control::Accept, Some(ct)).len()];
    s.read_exact(&mut accept).unwrap();
    s.write_all(&encode_control(Control::Start, Some(ct)))
        .unwrap();
    let started = Instant::now();
    let mut batch = BytesMut::with_capacity(WRITE_BATCH + 1024);
    for (i, f) in frames.iter().cycle().take(events).enumerate() {
        encode_data(f, &mut batch);
        if batch.len() >= WRITE_BATCH {
            s.write_all(&batch).unwrap();
            batch.clear();
            if let Some(rate) = rate {
                let due = started + Duration::from_secs_f64(i as f64 / f64::from(rate));
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        }
    }
    s.write_all(&batch).unwrap();
    s.write_all(&encode_control(Control::Stop, None)).unwrap();
    let mut finish = [0u8; 12];
    s.read_exact(&mut finish).unwrap();
    started.elapsed()
}

/// tapd in this process on one core (a current-thread runtime), with the recent-answer cache at its
/// default size and no subscriber; returns decoded events/s.
fn bench_decode(dir: &Path, frames: &[Vec<u8>]) -> f64 {
    let socket = dir.join("decode.sock");
    let config = Config::try_parse_from([
        "tapd",
        "--socket",
        socket.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let daemon = runtime.block_on(Daemon::bind(config)).unwrap();
    let metrics = daemon.metrics_addr().unwrap();
    let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
    let producer = {
        let frames = frames.to_vec();
        std::thread::spawn(move || {
            let elapsed = produce(&socket, &frames, DECODE_EVENTS, None);
            let text = http_get(metrics, "/metrics").unwrap();
            let _ = stop_tx.send(());
            (elapsed, metric(&text, "tapd_events_total"))
        })
    };
    runtime
        .block_on(daemon.run(async {
            let _ = stop.await;
        }))
        .unwrap();
    let (elapsed, events) = producer.join().unwrap();
    assert_eq!(events, Some(DECODE_EVENTS as u64));
    DECODE_EVENTS as f64 / elapsed.as_secs_f64()
}

/// The tapd binary, alone in its process so that its memory is measured without the producer and
/// the subscriber, fed at `rate` events/s (or flat out); returns delivered events/s, events lost, and
/// tapd's peak RSS in KiB.
fn bench_grpc(frames: &[Vec<u8>], rate: Option<u32>) -> (f64, u64, u64) {
    // Extra tapd flags to compare settings, e.g. TAPD_BENCH_ARGS="--subscriber-buffer 4096".
    let extra = std::env::var("TAPD_BENCH_ARGS").unwrap_or_default();
    let extra: Vec<&str> = extra.split_whitespace().collect();
    let tapd = TapdProcess::spawn(Path::new(env!("CARGO_BIN_EXE_tapd")), &extra).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (rate, received) = runtime.block_on(async {
        let mut client = DnsTapClient::connect(tapd.addrs.grpc_url()).await.unwrap();
        let mut stream = client
            .subscribe(SubscribeRequest::default())
            .await
            .unwrap()
            .into_inner();
        wait_until("the subscriber", || {
            tapd.addrs.metric("tapd_subscribers") == 1
        })
        .unwrap();
        let producer = {
            let frames = frames.to_vec();
            let socket = tapd.addrs.socket.clone();
            std::thread::spawn(move || produce(&socket, &frames, GRPC_EVENTS, rate))
        };
        let started = Instant::now();
        let mut received = 0u64;
        let mut last = started;
        while received < GRPC_EVENTS as u64 {
            match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
                Ok(Ok(Some(_))) => {
                    received += 1;
                    last = Instant::now();
                }
                _ => break,
            }
        }
        producer.join().unwrap();
        (
            received as f64 / last.duration_since(started).as_secs_f64(),
            received,
        )
    });
    let peak = proc_status_kib(Some(tapd.daemon.pid()), "VmHWM").unwrap_or(0);
    (rate, GRPC_EVENTS as u64 - received, peak)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: only build then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let frames = corpus();
    let mean = frames.iter().map(Vec::len).sum::<usize>() / frames.len();
    println!("frames: {CORPUS} distinct CLIENT_RESPONSE frames, {mean} bytes on average");
    let decode = bench_decode(dir.path(), &frames);
    println!("decode (1 core, unix socket): {decode:>12.0} events/s   ({DECODE_EVENTS} events; target ≥ 300000)");
    let own = proc_status_kib(None, "VmHWM").unwrap_or(0);
    println!(
        "  peak RSS of the decode run (VmHWM, incl. producer thread): {:.1} MiB",
        own as f64 / 1024.0
    );
    for (label, rate) in [
        ("offered 120000/s", Some(PACED_RATE)),
        ("offered flat out", None),
    ] {
        let (grpc, lost, rss) = bench_grpc(&frames, rate);
        println!(
            "gRPC, one subscriber, {label}: {grpc:>9.0} events/s delivered   ({GRPC_EVENTS} events, {lost} \
             lost; target ≥ 100000)"
        );
        println!(
            "  peak RSS of the tapd process (VmHWM): {:.1} MiB   (target ≤ 32)",
            rss as f64 / 1024.0
        );
    }
}

//! A subscriber that never reads must neither slow the dnstap reader down nor cost another subscriber
//! a single event: it loses events itself, counted.

use crate::common::{client_response, subscribe, tapd, Sender, EVENT_TIMEOUT};
use dnsflow_testkit::{metric, wait_until};
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

/// Frames per burst: the producer sends each burst flat out.
const BURST: usize = 10_000;
const BURSTS: usize = 6;
/// Per-subscriber buffer: above one burst, so the reading subscriber never falls that far behind,
/// and well below the total, so the stuck one overflows.
const BUFFER: &str = "20000";

#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_subscriber_loses_events_while_the_producer_and_others_run_at_full_speed() {
    let tapd = tapd(&["--subscriber-buffer", BUFFER, "--recent-entries", "0"]);
    // Separate gRPC connections: HTTP/2 flow control is per connection too.
    let stuck = subscribe(&tapd.addrs, &[], false).await;
    let mut reader = subscribe(&tapd.addrs, &[], false).await;
    let seen = Arc::new(AtomicU64::new(0));
    let reader_task = {
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            let mut last = 0u64;
            while last < (BURST * BURSTS) as u64 {
                match tokio::time::timeout(EVENT_TIMEOUT, reader.message()).await {
                    Ok(Ok(Some(e))) => {
                        assert_eq!(e.sequence, last + 1, "no gap in the reader's stream");
                        last = e.sequence;
                        seen.store(last, Ordering::Relaxed);
                    }
                    other => panic!("reader stopped after {last} events: {other:?}"),
                }
            }
            reader
        })
    };

    let mut producer = Sender::connect(&tapd.addrs.socket, true).await;
    let mut slowest = Duration::ZERO;
    for burst in 0..BURSTS {
        let frames: Vec<Vec<u8>> = (0..BURST)
            .map(|i| {
                let client = [10, 244, 1, u8::try_from(i % 200).unwrap()].into();
                client_response(client, &format!("n{i}.example."), [192, 0, 2, 1].into())
            })
            .collect();
        let started = Instant::now();
        producer.send_all(frames).await;
        let sent = ((burst + 1) * BURST) as u64;
        // The reader decodes and publishes the whole burst without waiting for the stuck subscriber.
        wait_until("tapd to publish the burst", || {
            tapd.addrs.metric("tapd_events_total") == sent
        })
        .unwrap();
        slowest = slowest.max(started.elapsed());
        wait_until("the reading subscriber to catch up", || {
            seen.load(Ordering::Relaxed) == sent
        })
        .unwrap();
    }
    producer.stop(true).await;
    // Still subscribed, so that both subscribers are counted below.
    let _reader = reader_task.await.unwrap();

    let text = tapd.addrs.metrics_text().unwrap();
    // The reader lost nothing (its stream had no gap); the stuck one lost all it could not buffer (its
    // channel, plus what the HTTP/2 stream took before flow control stopped it), and is the one
    // subscriber counted as lagging.
    assert_eq!(metric(&text, "tapd_subscribers"), Some(2), "{text}");
    assert_eq!(metric(&text, "tapd_subscribers_lagging"), Some(1), "{text}");
    let lost = metric(&text, "tapd_dropped_total{reason=\"subscriber_full\"}").unwrap_or(0);
    assert!(lost >= BURST as u64, "{text}");
    assert!(slowest < Duration::from_secs(5), "a burst took {slowest:?}");
    drop(stuck);
}

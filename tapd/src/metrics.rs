//! tapd's counters and gauges, rendered as Prometheus text for `/metrics` (served by [`crate::http`]).

use crate::dnstap::DecodeError;
use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
};

/// Why a frame was received but yielded no event, or an event was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A subscriber's buffer was full.
    SubscriberFull,
    /// The capture writer was behind.
    CaptureFull,
    /// A connection was refused because too many were open.
    ConnectionLimit,
}

impl DropReason {
    const ALL: [Self; 3] = [
        Self::SubscriberFull,
        Self::CaptureFull,
        Self::ConnectionLimit,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::SubscriberFull => "subscriber_full",
            Self::CaptureFull => "capture_full",
            Self::ConnectionLimit => "connection_limit",
        }
    }
}

/// tapd's counters. Everything is a relaxed atomic: the hot path never takes a lock to count.
#[derive(Debug, Default)]
pub struct Metrics {
    frames: AtomicU64,
    bytes: AtomicU64,
    events: AtomicU64,
    ignored: AtomicU64,
    decode_errors: [AtomicU64; DecodeError::REASONS.len()],
    frame_errors: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
    connections_total: AtomicU64,
    connections_open: AtomicU64,
    subscribers: AtomicU64,
}

/// Extra lines a caller appends to the rendering (per-subscriber figures, cache size...).
pub type Extra<'a> = &'a dyn Fn(&mut String);

impl Metrics {
    pub fn frame(&self, len: usize) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
    }

    pub fn event(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ignored(&self) {
        self.ignored.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a frame that did not decode, by its reason.
    pub fn decode_error(&self, error: &DecodeError) {
        let reason = error.reason();
        if let Some(i) = DecodeError::REASONS.iter().position(|r| *r == reason) {
            self.decode_errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a connection ended by a Frame Streams error.
    pub fn frame_error(&self) {
        self.frame_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped(&self, why: DropReason) {
        self.drops[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_opened(&self) {
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        self.connections_open.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn set_subscribers(&self, n: usize) {
        self.subscribers.store(n as u64, Ordering::Relaxed);
    }

    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self, extra: Extra<'_>) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::with_capacity(2048);
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let single: [(&str, &str, &str, &AtomicU64); 8] = [
            (
                "tapd_frames_total",
                "counter",
                "Frame Streams data frames received.",
                &self.frames,
            ),
            (
                "tapd_frame_bytes_total",
                "counter",
                "Bytes of data frames received.",
                &self.bytes,
            ),
            (
                "tapd_events_total",
                "counter",
                "Client responses decoded and published.",
                &self.events,
            ),
            (
                "tapd_ignored_messages_total",
                "counter",
                "dnstap messages that are not CLIENT_RESPONSE (queries, forwarder traffic).",
                &self.ignored,
            ),
            (
                "tapd_frame_errors_total",
                "counter",
                "Connections ended by a malformed or oversized Frame Streams frame.",
                &self.frame_errors,
            ),
            (
                "tapd_connections_total",
                "counter",
                "dnstap connections accepted.",
                &self.connections_total,
            ),
            (
                "tapd_connections",
                "gauge",
                "dnstap connections open.",
                &self.connections_open,
            ),
            (
                "tapd_subscribers",
                "gauge",
                "gRPC subscribers connected.",
                &self.subscribers,
            ),
        ];
        for (name, kind, help, c) in single {
            family(name, kind, help, &[(String::new(), get(c))]);
        }
        let by_reason =
            |reasons: &mut dyn Iterator<Item = (&str, &AtomicU64)>| -> Vec<(String, u64)> {
                reasons
                    .map(|(r, c)| (format!("{{reason=\"{r}\"}}"), get(c)))
                    .collect()
            };
        family(
            "tapd_decode_errors_total",
            "counter",
            "Data frames that did not decode into a client response, by reason.",
            &by_reason(&mut DecodeError::REASONS.into_iter().zip(&self.decode_errors)),
        );
        family(
            "tapd_dropped_total",
            "counter",
            "Events, frames or connections dropped rather than waited for, by reason.",
            &by_reason(&mut DropReason::ALL.iter().map(|d| d.label()).zip(&self.drops)),
        );
        extra(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_names_every_family_and_reason() {
        let m = Metrics::default();
        m.frame(10);
        m.event();
        m.decode_error(&DecodeError::NoQuestion);
        m.decode_error(&DecodeError::LyingCounts(12));
        m.dropped(DropReason::SubscriberFull);
        m.connection_opened();
        let text = m.render(&|out: &mut String| out.push_str("tapd_extra 1\n"));
        for line in [
            "tapd_frames_total 1",
            "tapd_frame_bytes_total 10",
            "tapd_events_total 1",
            "tapd_decode_errors_total{reason=\"dns\"} 2",
            "tapd_decode_errors_total{reason=\"protobuf\"} 0",
            "tapd_dropped_total{reason=\"subscriber_full\"} 1",
            "tapd_connections 1",
            "tapd_extra 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}

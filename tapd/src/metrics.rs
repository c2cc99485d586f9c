//! tapd's metrics: one struct of typed handles, moved where things happen (the listener, the hub) and
//! registered once in the daemon's registry, which `/metrics` encodes as OpenMetrics text
//! ([`dnsflow_runtime::http`]). A metric is added here, in [`Metrics::register`], and in `deploy/README.md`.

use dnsflow_dnstap::dnstap::DecodeError;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use std::sync::atomic::AtomicU64;

/// The prefix of every tapd metric: `tapd_frames_total`, `tapd_subscribers`...
pub const PREFIX: &str = "tapd";

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

/// Why a gRPC client was turned away (under TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No TLS handshake: no client certificate, one from another CA, not TLS, or too slow.
    Handshake,
    /// A certificate from the right CA that names no identity allowed to subscribe.
    Identity,
}

impl Refusal {
    const ALL: [Self; 2] = [Self::Handshake, Self::Identity];

    fn label(self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::Identity => "identity",
        }
    }
}

/// The one label of tapd's per-reason counters; its values are fixed lists, never input.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// A count of things present now.
type Level = Gauge<u64, AtomicU64>;

/// A counter family by reason, every reason present from the start (at 0), and each reason's counter
/// kept at hand so that counting takes no lock and hashes nothing.
#[derive(Debug)]
struct ByReason<const N: usize> {
    family: Family<Reason, Counter>,
    counters: [Counter; N],
}

impl<const N: usize> ByReason<N> {
    fn new(reasons: [&'static str; N]) -> Self {
        let family = Family::<Reason, Counter>::default();
        let counters = reasons.map(|reason| family.get_or_create_owned(&Reason { reason }));
        Self { family, counters }
    }
}

/// tapd's metrics. Cheap to count: every handle is a relaxed atomic.
#[derive(Debug)]
pub struct Metrics {
    frames: Counter,
    frame_bytes: Counter,
    events: Counter,
    ignored: Counter,
    decode_errors: ByReason<{ DecodeError::REASONS.len() }>,
    frame_errors: Counter,
    dropped: ByReason<{ DropReason::ALL.len() }>,
    connections: Counter,
    open_connections: Level,
    subscribers: Level,
    lagging_subscribers: Level,
    recent_answers: Level,
    recent_answer_bytes: Level,
    refused: ByReason<{ Refusal::ALL.len() }>,
    tls_reloads: ByReason<2>,
    addresses_cut: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            frames: Counter::default(),
            frame_bytes: Counter::default(),
            events: Counter::default(),
            ignored: Counter::default(),
            decode_errors: ByReason::new(DecodeError::REASONS),
            frame_errors: Counter::default(),
            dropped: ByReason::new(DropReason::ALL.map(DropReason::label)),
            connections: Counter::default(),
            open_connections: Level::default(),
            subscribers: Level::default(),
            lagging_subscribers: Level::default(),
            recent_answers: Level::default(),
            recent_answer_bytes: Level::default(),
            refused: ByReason::new(Refusal::ALL.map(Refusal::label)),
            tls_reloads: ByReason::new(["loaded", "failed"]),
            addresses_cut: Counter::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric in `registry` (tapd's, prefixed with [`PREFIX`]). Names are given without
    /// the prefix, and counters without `_total`, which the encoding adds.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "frames",
            "Frame Streams data frames received",
            self.frames.clone(),
        );
        registry.register_with_unit(
            "frame",
            "Data frames received, in bytes",
            Unit::Bytes,
            self.frame_bytes.clone(),
        );
        registry.register(
            "events",
            "Client responses decoded and published",
            self.events.clone(),
        );
        registry.register(
            "ignored_messages",
            "dnstap messages that are not CLIENT_RESPONSE (queries, forwarder traffic)",
            self.ignored.clone(),
        );
        registry.register(
            "decode_errors",
            "Data frames that did not decode into a client response, by reason",
            self.decode_errors.family.clone(),
        );
        registry.register(
            "frame_errors",
            "Connections ended by a malformed or oversized Frame Streams frame",
            self.frame_errors.clone(),
        );
        registry.register(
            "dropped",
            "Events, frames or connections dropped rather than waited for, by reason",
            self.dropped.family.clone(),
        );
        registry.register(
            "addresses_cut",
            "Answer addresses left out of events beyond 256 per answer (those IPs earn no flow)",
            self.addresses_cut.clone(),
        );
        registry.register(
            "grpc_refused",
            "gRPC clients turned away under TLS, by reason: handshake (no or a foreign certificate), \
             identity (a certificate naming no allowed identity)",
            self.refused.family.clone(),
        );
        registry.register(
            "tls_reloads",
            "Readings of changed TLS files, by reason: loaded, or failed (the previous material stays)",
            self.tls_reloads.family.clone(),
        );
        registry.register(
            "connections",
            "dnstap connections accepted",
            self.connections.clone(),
        );
        registry.register(
            "open_connections",
            "dnstap connections open",
            self.open_connections.clone(),
        );
        registry.register(
            "subscribers",
            "gRPC subscribers connected",
            self.subscribers.clone(),
        );
        registry.register(
            "subscribers_lagging",
            "Connected subscribers that have lost events because they read too slowly",
            self.lagging_subscribers.clone(),
        );
        registry.register(
            "recent_answers",
            "Answers held for replay to new subscribers",
            self.recent_answers.clone(),
        );
        registry.register_with_unit(
            "recent_answer",
            "Memory the answers held for replay take, about",
            Unit::Bytes,
            self.recent_answer_bytes.clone(),
        );
    }

    pub fn frame(&self, len: usize) {
        self.frames.inc();
        self.frame_bytes.inc_by(len as u64);
    }

    pub fn event(&self) {
        self.events.inc();
    }

    pub fn ignored(&self) {
        self.ignored.inc();
    }

    /// Counts a frame that did not decode, by its reason.
    pub fn decode_error(&self, error: &DecodeError) {
        let reason = error.reason();
        if let Some(i) = DecodeError::REASONS.iter().position(|r| *r == reason) {
            self.decode_errors.counters[i].inc();
        }
    }

    /// Counts a connection ended by a Frame Streams error.
    pub fn frame_error(&self) {
        self.frame_errors.inc();
    }

    pub fn dropped(&self, why: DropReason) {
        self.dropped.counters[why as usize].inc();
    }

    pub fn connection_opened(&self) {
        self.connections.inc();
        self.open_connections.inc();
    }

    pub fn connection_closed(&self) {
        self.open_connections.dec();
    }

    pub fn set_subscribers(&self, n: usize) {
        self.subscribers.set(n as u64);
    }

    /// A connected subscriber lost its first event.
    pub fn subscriber_lagging(&self) {
        self.lagging_subscribers.inc();
    }

    /// A subscriber that had lost events is gone.
    pub fn lagging_subscriber_gone(&self) {
        self.lagging_subscribers.dec();
    }

    pub fn set_recent_answers(&self, n: usize, bytes: usize) {
        self.recent_answers.set(n as u64);
        self.recent_answer_bytes.set(bytes as u64);
    }

    /// Counts the addresses of one answer left out of its event (beyond 256).
    pub fn addresses_cut(&self, n: usize) {
        self.addresses_cut.inc_by(n as u64);
    }

    /// Counts a gRPC client turned away.
    pub fn refused(&self, why: Refusal) {
        self.refused.counters[why as usize].inc();
    }

    /// Counts a reading of changed TLS files, and whether it gave usable material.
    pub fn tls_reload(&self, loaded: bool) {
        self.tls_reloads.counters[usize::from(!loaded)].inc();
    }

    pub fn events(&self) -> u64 {
        self.events.get()
    }

    /// These metrics alone, as `/metrics` would show them.
    #[cfg(test)]
    pub(crate) fn openmetrics(&self) -> String {
        let mut registry = Registry::with_prefix(PREFIX);
        self.register(&mut registry);
        dnsflow_runtime::http::openmetrics_text(&registry).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_and_every_reason_is_exposed_under_its_name() {
        let m = Metrics::default();
        m.frame(10);
        m.event();
        m.decode_error(&DecodeError::NoQuestion);
        m.decode_error(&DecodeError::LyingCounts(12));
        m.dropped(DropReason::SubscriberFull);
        m.connection_opened();
        m.subscriber_lagging();
        let text = m.openmetrics();
        for line in [
            "# TYPE tapd_frames counter",
            "tapd_frames_total 1",
            "# UNIT tapd_frame_bytes bytes",
            "tapd_frame_bytes_total 10",
            "tapd_events_total 1",
            "tapd_decode_errors_total{reason=\"dns\"} 2",
            "tapd_decode_errors_total{reason=\"protobuf\"} 0",
            "tapd_dropped_total{reason=\"subscriber_full\"} 1",
            "tapd_dropped_total{reason=\"connection_limit\"} 0",
            "tapd_connections_total 1",
            "# TYPE tapd_open_connections gauge",
            "tapd_open_connections 1",
            "tapd_subscribers_lagging 1",
            "tapd_recent_answers 0",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        // One family per name: a counter and a gauge never share one.
        let mut families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
            .collect();
        let n = families.len();
        families.sort_unstable();
        families.dedup();
        assert_eq!(families.len(), n, "{text}");
        for reason in DecodeError::REASONS {
            let sample = format!("tapd_decode_errors_total{{reason=\"{reason}\"}}");
            assert!(text.contains(&sample), "{sample} missing in\n{text}");
        }
    }
}

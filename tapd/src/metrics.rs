//! Counters and the tiny HTTP server that exposes them (Prometheus text on `/metrics`, plus `/healthz`
//! and `/readyz` for probes). [`serve_http`] knows nothing about tapd and is reused by flowd.

use crate::dnstap::DecodeError;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use std::{
    convert::Infallible,
    fmt::Write as _,
    future::Future,
    io,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::{net::TcpListener, task::JoinSet};

/// A scrape or probe that takes longer than this is a stuck client; its connection is closed.
const HTTP_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

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

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

/// What the HTTP endpoints expose: Prometheus text on `/metrics`, and whether `/readyz` says ready.
/// A plain `Fn() -> String` is an exposition that is ready as soon as it is served.
pub trait Exposition: Send + Sync + 'static {
    /// The Prometheus text format (0.0.4) body of `/metrics`.
    fn render(&self) -> String;
    /// `Err(why)` while the daemon is not ready; `/readyz` then answers 503 with `why`.
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
    /// `Err(why)` while the daemon is wedged and a restart may help; `/healthz` then answers 503.
    fn liveness(&self) -> Result<(), String> {
        Ok(())
    }
}

impl<F: Fn() -> String + Send + Sync + 'static + ?Sized> Exposition for F {
    fn render(&self) -> String {
        self()
    }
}

fn route<B, E: Exposition + ?Sized>(req: &Request<B>, exposition: &E) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            exposition.render(),
        ),
        "/healthz" => match exposition.liveness() {
            Ok(()) => respond(StatusCode::OK, "text/plain", "ok\n".into()),
            Err(why) => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why + "\n"),
        },
        "/readyz" => match exposition.readiness() {
            Ok(()) => respond(StatusCode::OK, "text/plain", "ok\n".into()),
            Err(why) => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why + "\n"),
        },
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` from `exposition` on `listener` until `shutdown`
/// completes. The caller binds the listener before calling, so an exposition without its own readiness
/// is "ready" once every socket of the daemon is bound.
pub async fn serve_http<E: Exposition + ?Sized>(
    listener: TcpListener,
    exposition: Arc<E>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "metrics accept failed");
                    continue;
                }
            },
            Some(_) = connections.join_next() => continue,
        };
        let exposition = Arc::clone(&exposition);
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let resp = route(&req, &*exposition);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(HTTP_CONNECTION_TIMEOUT, conn).await;
        });
    }
    connections.shutdown().await;
    Ok(())
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

    #[tokio::test]
    async fn http_endpoints_answer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_http(
            listener,
            Arc::new(|| "x_total 3\n".to_string()),
            async {
                let _ = stopped.await;
            },
        ));
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let metrics = get("/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.ends_with("x_total 3\n"), "{metrics}");
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    struct NotYet;

    impl Exposition for NotYet {
        fn render(&self) -> String {
            String::new()
        }
        fn readiness(&self) -> Result<(), String> {
            Err("still listing".into())
        }
    }

    #[test]
    fn readyz_says_why_it_is_not_ready() {
        let req = Request::get("/readyz").body(()).unwrap();
        let resp = route(&req, &NotYet);
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let healthz = route(&Request::get("/healthz").body(()).unwrap(), &NotYet);
        assert_eq!(healthz.status(), StatusCode::OK);
    }
}

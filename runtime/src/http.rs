//! The HTTP endpoint of both daemons: `/metrics`, `/healthz` (liveness) and `/readyz` (readiness, with
//! the reason when not ready). [`serve_http`] serves any [`Exposition`]: each daemon brings its own registry and probes.

use crate::{AcceptBackoff, PerAddress};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{encoding::text::encode, registry::Registry};
use std::{convert::Infallible, future::Future, io, sync::Arc, time::Duration};
use tokio::{net::TcpListener, task::JoinSet};

/// A scrape or probe that takes longer than this is a stuck client; its connection is closed.
const HTTP_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that has not sent a whole request by then is closed (slow or idle clients).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections served at once; more wait in the kernel's accept queue.
pub const MAX_HTTP_CONNECTIONS: usize = 128;
/// Connections one address may hold at once; its next ones are closed at once.
pub const MAX_CONNECTIONS_PER_PEER: usize = 8;

/// What `/metrics` answers: the OpenMetrics text format, which prometheus-client encodes.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

/// What the HTTP endpoints expose: the daemon's one metrics registry on `/metrics`, and whether
/// `/healthz` and `/readyz` say ok. A bare [`Registry`] is alive and ready as soon as it is served.
pub trait Exposition: Send + Sync + 'static {
    /// The registry `/metrics` encodes.
    fn registry(&self) -> &Registry;
    /// `Err(why)` while the daemon is not ready; `/readyz` then answers 503 with `why`.
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
    /// `Err(why)` while the daemon is wedged and a restart may help; `/healthz` then answers 503.
    fn liveness(&self) -> Result<(), String> {
        Ok(())
    }
}

impl Exposition for Registry {
    fn registry(&self) -> &Registry {
        self
    }
}

/// The OpenMetrics text of `registry`, `# EOF` included.
pub fn openmetrics_text(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::with_capacity(8192);
    encode(&mut text, registry)?;
    Ok(text)
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
        "/metrics" => match openmetrics_text(exposition.registry()) {
            Ok(text) => respond(StatusCode::OK, OPENMETRICS_CONTENT_TYPE, text),
            Err(std::fmt::Error) => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "the metrics did not encode\n".into(),
            ),
        },
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
/// completes: at most [`MAX_HTTP_CONNECTIONS`] connections at once, [`MAX_CONNECTIONS_PER_PEER`] of
/// them from one address, none of them idle for long. The caller binds the listener before calling,
/// so an exposition without its own readiness is "ready" once every socket of the daemon is bound.
pub async fn serve_http<E: Exposition + ?Sized>(
    listener: TcpListener,
    exposition: Arc<E>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut connections = JoinSet::new();
    let shares = PerAddress::new(MAX_CONNECTIONS_PER_PEER);
    let mut backoff = AcceptBackoff::default();
    tokio::pin!(shutdown);
    loop {
        let at_capacity = connections.len() >= MAX_HTTP_CONNECTIONS;
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next() => continue,
            accepted = listener.accept(), if !at_capacity => match accepted {
                Ok(a) => {
                    backoff.accepted();
                    a
                }
                Err(error) => {
                    backoff.failed(&error, "metrics").await;
                    continue;
                }
            },
        };
        let Some(share) = shares.try_take(peer.ip()) else {
            // One peer holding its share: its next connection is closed at once, so others (the
            // kubelet's probes, Prometheus) still get through.
            tracing::debug!(%peer, "too many HTTP connections from one address; closing one");
            continue;
        };
        let exposition = Arc::clone(&exposition);
        connections.spawn(async move {
            let _share = share;
            let service = service_fn(move |req| {
                let resp = route(&req, &*exposition);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(HTTP_CONNECTION_TIMEOUT, conn).await;
        });
    }
    connections.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn http_endpoints_answer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut registry = Registry::default();
        let counter = prometheus_client::metrics::counter::Counter::<u64>::default();
        registry.register("x", "An example", counter.clone());
        counter.inc_by(3);
        let server = tokio::spawn(serve_http(listener, Arc::new(registry), async {
            let _ = stopped.await;
        }));
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
        assert!(
            metrics.contains(&format!("content-type: {OPENMETRICS_CONTENT_TYPE}\r\n")),
            "{metrics}"
        );
        assert!(metrics.ends_with("\nx_total 3\n# EOF\n"), "{metrics}");
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_from_one_address_cannot_shut_others_out() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(serve_http(
            listener,
            Arc::new(Registry::default()),
            std::future::pending(),
        ));
        // One address opens far more than its share and says nothing.
        let mut idle = Vec::new();
        for _ in 0..(MAX_CONNECTIONS_PER_PEER * 4) {
            idle.push(
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap(),
            );
        }
        let mut reads = tokio::task::JoinSet::new();
        for mut s in idle {
            reads.spawn(async move {
                let mut buf = [0u8; 16];
                // Closed at once (beyond the share), or after the header read timeout.
                let started = tokio::time::Instant::now();
                let _ = s.read(&mut buf).await;
                started.elapsed()
            });
        }
        // Meanwhile another address, as the kubelet's probe, is served at once.
        let probe = tokio::net::TcpSocket::new_v4().unwrap();
        probe.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut probe = probe.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        let started = tokio::time::Instant::now();
        probe
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        probe.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(1));

        let mut waited = Vec::new();
        while let Some(w) = reads.join_next().await {
            waited.push(w.unwrap());
        }
        waited.sort();
        let quick = waited
            .iter()
            .filter(|w| **w < Duration::from_secs(1))
            .count();
        assert_eq!(quick, MAX_CONNECTIONS_PER_PEER * 3, "{waited:?}");
        assert!(
            waited
                .iter()
                .all(|w| *w < HEADER_READ_TIMEOUT + Duration::from_secs(2)),
            "{waited:?}"
        );
    }

    /// Not ready, and alive or not.
    struct NotYet {
        registry: Registry,
        wedged: bool,
    }

    impl Exposition for NotYet {
        fn registry(&self) -> &Registry {
            &self.registry
        }
        fn readiness(&self) -> Result<(), String> {
            Err("still listing".into())
        }
        fn liveness(&self) -> Result<(), String> {
            if self.wedged {
                Err("stuck".into())
            } else {
                Ok(())
            }
        }
    }

    async fn body(resp: Response<Full<Bytes>>) -> Bytes {
        use http_body_util::BodyExt as _;
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn readyz_and_healthz_say_why_they_fail() {
        let mut daemon = NotYet {
            registry: Registry::default(),
            wedged: false,
        };
        let get =
            |path: &str, daemon: &NotYet| route(&Request::get(path).body(()).unwrap(), daemon);
        let readyz = get("/readyz", &daemon);
        assert_eq!(readyz.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(readyz).await, "still listing\n");
        assert_eq!(get("/healthz", &daemon).status(), StatusCode::OK);
        daemon.wedged = true;
        assert_eq!(
            get("/healthz", &daemon).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(get("/metrics", &daemon).status(), StatusCode::OK);
    }
}

//! The HTTP endpoint of both daemons: `/metrics`, `/healthz` (liveness) and `/readyz` (readiness, with
//! the reason when not ready). [`serve_http`] serves any [`Exposition`]: each daemon brings its own registry and probes.

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{encoding::text::encode, registry::Registry};
use std::{convert::Infallible, future::Future, io, sync::Arc, time::Duration};
use tokio::{net::TcpListener, task::JoinSet};

/// A scrape or probe that takes longer than this is a stuck client; its connection is closed.
const HTTP_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

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

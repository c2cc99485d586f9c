//! The HTTP endpoint of both daemons: `/metrics`, `/healthz` (liveness) and `/readyz` (readiness, with
//! the reason when not ready). [`serve_http`] knows nothing about tapd and is reused by flowd.

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use std::{convert::Infallible, future::Future, io, sync::Arc, time::Duration};
use tokio::{net::TcpListener, task::JoinSet};

/// A scrape or probe that takes longer than this is a stuck client; its connection is closed.
const HTTP_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

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

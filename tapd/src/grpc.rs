//! The gRPC edge: `dnsflow.v1.DnsTap/Subscribe`, with server reflection and `grpc.health.v1` on the
//! same port so that grpcurl works without local `.proto` files. With TLS material, only a client
//! whose certificate names an allowed identity may subscribe ([`crate::tls`]).

use crate::{
    error::{Error, Result},
    hub::{ClientFilter, Hub, Peer, Subscription},
    metrics::{Metrics, Refusal},
    tls::{self, ServerTls},
};
use dnsflow_proto::v1::{
    self as pb,
    dns_tap_server::{DnsTap, DnsTapServer},
};
use futures::Stream;
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// Keepalive pings find subscribers that vanished without closing their connection.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(30);

/// The `DnsTap` service over a [`Hub`].
#[derive(Debug, Clone)]
pub struct DnsTapService {
    hub: Hub,
    tls: Option<Arc<ServerTls>>,
    metrics: Arc<Metrics>,
}

impl DnsTapService {
    pub fn new(hub: Hub, tls: Option<Arc<ServerTls>>, metrics: Arc<Metrics>) -> Self {
        Self { hub, tls, metrics }
    }

    /// Who asks (`identity@address` under TLS), or why they may not subscribe.
    fn authorize<T>(&self, request: &Request<T>) -> Result<Peer, Status> {
        let Some(tls) = &self.tls else {
            return Ok(match request.remote_addr() {
                Some(addr) => Peer {
                    name: addr.to_string(),
                    key: Arc::from(addr.ip().to_string()),
                },
                None => Peer::from("unknown"),
            });
        };
        match request.extensions().get::<tls::Peer>() {
            Some(tls::Peer {
                addr,
                identity: Some(identity),
            }) => Ok(Peer {
                name: format!("{identity}@{addr}"),
                key: Arc::from(format!("{identity}@{}", addr.ip())),
            }),
            peer => {
                self.metrics.refused(Refusal::Identity);
                tracing::warn!(peer = ?peer.map(|p| p.addr), "subscription refused: the client certificate names no allowed identity");
                Err(Status::permission_denied(format!(
                    "the client certificate names none of the identities allowed to subscribe ({})",
                    tls.client_names()
                )))
            }
        }
    }
}

/// A subscriber's stream in wire form.
#[derive(Debug)]
pub struct EventStream {
    subscription: Subscription,
    span: tracing::Span,
}

impl Stream for EventStream {
    type Item = Result<pb::DnsEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let _entered = self.span.clone().entered();
        Pin::new(&mut self.subscription)
            .poll_next(cx)
            .map(|r| r.map(|r| Ok(pb::DnsEvent::from(&*r))))
    }
}

#[tonic::async_trait]
impl DnsTap for DnsTapService {
    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let peer = self.authorize(&request)?;
        let req = request.into_inner();
        let filter = ClientFilter::parse(&req.client_cidrs)
            .map_err(|e| Status::invalid_argument(format!("client_cidrs: {e}")))?;
        let name = peer.name.clone();
        let subscription = self
            .hub
            .subscribe(filter, req.replay_recent, peer, Instant::now())
            .map_err(|e| {
                tracing::warn!(peer = %name, error = %e, "subscription refused");
                Status::resource_exhausted(e.to_string())
            })?;
        let span = tracing::info_span!("subscriber", id = subscription.id(), peer = %name);
        span.in_scope(|| {
            tracing::info!(
                cidrs = ?req.client_cidrs,
                replay = req.replay_recent,
                "subscribed"
            );
        });
        Ok(Response::new(EventStream { subscription, span }))
    }
}

/// Serves `DnsTap`, reflection (v1 and v1alpha, which grpcurl 1.8 speaks) and health on `listener`
/// (over mutual TLS when `tls` is given) until `shutdown` completes and every stream has ended.
pub async fn serve(
    listener: TcpListener,
    hub: Hub,
    tls: Option<Arc<ServerTls>>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<DnsTapServer<DnsTapService>>().await;
    let service = DnsTapService::new(hub, tls.clone(), Arc::clone(&metrics));
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE))
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(DnsTapServer::new(service));
    let router = dnsflow_proto::add_reflection(router, &[pb::dns_tap_server::SERVICE_NAME])
        .map_err(|e| Error::Config(format!("reflection: {e}")))?;
    let served = match tls {
        Some(tls) => {
            let incoming = tls::incoming(listener, tls, move |_, _| {
                metrics.refused(Refusal::Handshake);
            });
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await
        }
    };
    served.map_err(|e| Error::io("gRPC server")(std::io::Error::other(e)))
}

//! The daemon: binds every socket first (so a bad address fails before anything runs), then serves
//! dnstap in, gRPC and metrics out, until told to stop; then drains within a bound.

use crate::{
    capture::CaptureFile,
    config::Config,
    error::{Error, Result},
    grpc,
    hub::{Hub, HubConfig},
    listener::{DnstapListener, Ingest},
    metrics::{Metrics, PREFIX},
    tls::ServerTls,
};
use dnsflow_runtime::http::serve_http;
use prometheus_client::registry::Registry;
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};
use tokio::{net::TcpListener, sync::watch};

/// tapd with every socket bound, not yet serving.
#[derive(Debug)]
pub struct Daemon {
    config: Config,
    dnstap: Vec<DnstapListener>,
    grpc: TcpListener,
    metrics_listener: TcpListener,
    capture: Option<CaptureFile>,
    tls: Option<Arc<ServerTls>>,
}

async fn bind_tcp(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(Error::io(format!("binding {what} {addr}")))
}

impl Daemon {
    /// Validates `config` and binds the dnstap socket(s), the gRPC and the metrics ports, and opens the
    /// capture file.
    pub async fn bind(config: Config) -> Result<Self> {
        config.validate()?;
        let tls = config
            .tls_files()
            .map(|files| ServerTls::load(files, &config.tls_client_names))
            .transpose()
            .map_err(|e| Error::Config(e.to_string()))?
            .map(Arc::new);
        let grpc = bind_tcp(config.listen_addr(), "gRPC").await?;
        let metrics_listener = bind_tcp(config.metrics_listen, "metrics").await?;
        let mut dnstap = vec![DnstapListener::bind_unix(
            &config.socket,
            config.socket_mode,
        )?];
        if let Some(addr) = config.dnstap_tcp {
            dnstap.push(DnstapListener::bind_tcp(addr).await?);
        }
        let capture = config
            .capture
            .as_deref()
            .map(|p| CaptureFile::create(p, config.capture_max_bytes))
            .transpose()?;
        Ok(Self {
            config,
            dnstap,
            grpc,
            metrics_listener,
            capture,
            tls,
        })
    }

    /// The bound gRPC address (useful when the configured port was 0).
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.local_addr().ok()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.local_addr().ok()
    }

    /// Serves until `shutdown` completes. Then: stop accepting and remove the socket, let connections
    /// finish what they have read, end the subscriber streams once they have sent what they buffered,
    /// close the capture file — all within `--drain-timeout` per stage.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Self {
            config,
            dnstap,
            grpc,
            metrics_listener,
            capture,
            tls,
        } = self;
        let metrics = Arc::new(Metrics::default());
        let hub = Hub::new(
            HubConfig {
                subscriber_buffer: config.subscriber_buffer,
                recent_entries: config.recent_entries,
                recent_max_bytes: config.recent_max_bytes,
                recent_max_ttl: config.recent_max_ttl,
                max_subscribers: config.max_subscribers,
                max_subscribers_per_peer: config.max_subscribers_per_peer,
            },
            Arc::clone(&metrics),
        );
        let ingest = Arc::new(Ingest::new(
            hub.clone(),
            Arc::clone(&metrics),
            capture,
            config.identity.clone(),
            config.max_frame_bytes,
        ));
        let (stop_tx, stop) = watch::channel(false);
        let drain = config.drain_timeout;

        let mut readers = Vec::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
        for listener in dnstap {
            readers.push(tokio::spawn(listener.run(
                Arc::clone(&ingest),
                Arc::clone(&slots),
                stop.clone(),
                drain,
            )));
        }
        let wait_stop = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let grpc_addr = grpc.local_addr().unwrap_or(config.listen_addr());
        let reload_task = match &tls {
            Some(tls) => {
                tracing::info!(addr = %grpc_addr, clients = %tls.client_names(), "serving gRPC over mutual TLS");
                Some(tokio::spawn(reload_tls(
                    Arc::clone(tls),
                    Arc::clone(&metrics),
                    config.tls_reload_interval,
                )))
            }
            None if grpc_addr.ip().is_loopback() => {
                tracing::info!(addr = %grpc_addr, "serving gRPC without TLS, on loopback only");
                None
            }
            None => {
                tracing::warn!(addr = %grpc_addr, "serving gRPC WITHOUT TLS (--insecure-listen): anyone who reaches this port reads every pod's DNS answers");
                None
            }
        };
        let grpc_task = tokio::spawn(grpc::serve(
            grpc,
            hub.clone(),
            tls,
            Arc::clone(&metrics),
            wait_stop(stop.clone()),
        ));
        let mut registry = Registry::with_prefix(PREFIX);
        metrics.register(&mut registry);
        let metrics_addr = metrics_listener
            .local_addr()
            .unwrap_or(config.metrics_listen);
        tracing::info!(addr = %metrics_addr, "serving metrics");
        let http_task = tokio::spawn(serve_http(
            metrics_listener,
            Arc::new(registry),
            wait_stop(stop.clone()),
        ));

        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        // Readers drain within `drain` themselves; a little more covers the abort.
        for r in readers {
            let _ = tokio::time::timeout(drain * 2, r).await;
        }
        hub.close();
        match tokio::time::timeout(drain, grpc_task).await {
            Ok(Ok(Err(error))) => tracing::warn!(%error, "gRPC server ended with an error"),
            Err(_) => tracing::warn!("subscribers did not finish in time"),
            _ => {}
        }
        let _ = tokio::time::timeout(drain, http_task).await;
        if let Ok(mut ingest) = Arc::try_unwrap(ingest) {
            ingest.close_capture();
        }
        if let Some(task) = reload_task {
            task.abort();
        }
        tracing::info!(events = metrics.events(), "stopped");
        Ok(())
    }
}

/// Reads the TLS files again whenever they change, for as long as tapd runs.
async fn reload_tls(tls: Arc<ServerTls>, metrics: Arc<Metrics>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match tls.reload_if_changed() {
            Ok(false) => {}
            Ok(true) => {
                metrics.tls_reload(true);
                tracing::info!("TLS files changed: new connections use the new material");
            }
            Err(error) => {
                metrics.tls_reload(false);
                tracing::error!(%error, "TLS files changed but cannot be used; the previous material stays in use");
            }
        }
    }
}

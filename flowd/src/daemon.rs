//! `flowd run`: the node daemon.

use std::{net::SocketAddr, process::ExitCode};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// This node's name (the DaemonSet passes `spec.nodeName` through the downward API).
    #[arg(long, env = "FLOWD_NODE_NAME")]
    pub node_name: String,
    /// flowd's gRPC API (`dnsflow.v1.Flowd`, reflection, health).
    #[arg(long, env = "FLOWD_GRPC_LISTEN", default_value = "127.0.0.1:9540")]
    pub grpc_listen: SocketAddr,
    /// Prometheus `/metrics`, `/livez` and `/readyz`.
    #[arg(long, env = "FLOWD_METRICS_LISTEN", default_value = "0.0.0.0:9541")]
    pub metrics_listen: SocketAddr,
    /// `json` for clusters, `text` for people.
    #[arg(long, env = "FLOWD_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    #[command(flatten)]
    pub upstream: crate::upstream::UpstreamArgs,
}

pub fn main(_args: RunArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the node daemon is not built yet")
}

//! flowd's gRPC API, `dnsflow.v1.Flowd`: what this node's flowd currently allows, why, and its counters;
//! with server reflection (grpcurl needs no `.proto` files) and `grpc.health.v1`, which reports
//! SERVING only after the first full sync of the cluster state.

use crate::{
    daemon::Status,
    engine::{Engine, GrantView},
    metrics,
    model::{PodKey, Verdict},
    ovs::FlowProgrammer,
    policy,
};
use dnsflow_proto::v1::{
    self as pb,
    flowd_server::{Flowd, FlowdServer},
};
use std::{future::Future, sync::Arc, time::UNIX_EPOCH};
use tapd::DnsName;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status as GrpcStatus};

/// The `dnsflow.v1.Flowd` implementation.
#[derive(Debug)]
pub struct FlowdApi<P> {
    engine: Engine<P>,
    status: Arc<Status>,
}

impl<P> FlowdApi<P> {
    pub fn new(engine: Engine<P>, status: Arc<Status>) -> Self {
        Self { engine, status }
    }
}

fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "Allow",
        Verdict::Deny => "Deny",
    }
}

fn grant_message(g: &GrantView, table: Option<u8>) -> pb::Grant {
    let expires = g.expires.duration_since(UNIX_EPOCH).unwrap_or_default();
    pb::Grant {
        namespace: g.key.pod.namespace.clone(),
        pod: g.key.pod.name.clone(),
        pod_ip: g.key.src.to_string(),
        // A flow adopted from an earlier run knows its rule (by priority) but not its answer.
        query_name: g
            .reason
            .as_ref()
            .map(|r| r.qname.to_string())
            .unwrap_or_default(),
        rule_index: g
            .rule_index
            .map_or(u32::MAX, |i| u32::try_from(i).unwrap_or(u32::MAX)),
        action: verdict_name(g.verdict).to_string(),
        dns_name: g
            .reason
            .as_ref()
            .map(|r| r.dns_name.clone())
            .unwrap_or_default(),
        ip: g.key.dst.to_string(),
        port: policy::l4_name(&g.key.l4),
        ttl: g.ttl,
        expires: Some(prost_types::Timestamp {
            seconds: i64::try_from(expires.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(expires.subsec_nanos()).unwrap_or(0),
        }),
        priority: u32::from(g.key.priority),
        table: table.map_or(0, u32::from),
    }
}

/// An empty string means "not given".
fn given(s: &str) -> Option<&str> {
    Some(s.trim()).filter(|s| !s.is_empty())
}

#[tonic::async_trait]
impl<P: FlowProgrammer> Flowd for FlowdApi<P> {
    async fn list_grants(
        &self,
        request: Request<pb::ListGrantsRequest>,
    ) -> Result<Response<pb::ListGrantsResponse>, GrpcStatus> {
        let req = request.into_inner();
        let namespace = given(&req.namespace);
        let pod = match (namespace, given(&req.pod)) {
            (Some(ns), Some(name)) => Some(PodKey::new(ns, name)),
            (None, Some(_)) => return Err(GrpcStatus::invalid_argument("pod needs its namespace")),
            (_, None) => None,
        };
        let table = self.engine.acl_table();
        let grants = self
            .engine
            .grants(pod.as_ref(), namespace)
            .iter()
            .map(|g| grant_message(g, table))
            .collect();
        Ok(Response::new(pb::ListGrantsResponse { grants }))
    }

    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, GrpcStatus> {
        let req = request.into_inner();
        let (Some(namespace), Some(pod)) = (given(&req.namespace), given(&req.pod)) else {
            return Err(GrpcStatus::invalid_argument(
                "namespace and pod are required",
            ));
        };
        let name = DnsName::new(&req.query_name).map_err(|e| {
            GrpcStatus::invalid_argument(format!("query_name {:?}: {e}", req.query_name))
        })?;
        let key = PodKey::new(namespace, pod);
        let (known_pod, rules) = {
            let known = self.status.known.lock().unwrap_or_else(|e| e.into_inner());
            (
                known.pods.contains(&key),
                known.rules.get(namespace).cloned(),
            )
        };
        let Some(rules) = rules else {
            return Ok(Response::new(pb::ExplainResponse {
                summary: format!(
                    "namespace {namespace} has no (valid) EgressFirewall: flowd grants nothing there"
                ),
                rules: Vec::new(),
            }));
        };
        let traces = policy::explain(&[&name], &rules, &self.engine.settings().policy());
        let first = traces.iter().find(|t| t.matches());
        let mut summary = match first {
            Some(t) => format!("rule {} ({}) matches {name}", t.index, t.rule),
            None => format!("no dnsName rule of namespace {namespace} matches {name}"),
        };
        if !known_pod {
            summary.push_str(&format!(
                "; but pod {key} is not a pod of this node flowd knows"
            ));
        }
        let rules = traces
            .iter()
            .map(|t| pb::RuleVerdict {
                index: u32::try_from(t.index).unwrap_or(u32::MAX),
                rule: t.rule.clone(),
                matches: t.matches(),
                reason: t.reason(),
            })
            .collect();
        Ok(Response::new(pb::ExplainResponse { summary, rules }))
    }

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, GrpcStatus> {
        let m = self.engine.metrics_snapshot();
        let counters = metrics::counters(&m, &self.status)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        Ok(Response::new(pb::StatsResponse {
            counters,
            pods: m.pods,
            grants: self.engine.grants(None, None).len() as u64,
            flows: m.flows_desired,
            tapd_connected: self
                .status
                .upstream
                .connected
                .load(std::sync::atomic::Ordering::Relaxed),
        }))
    }
}

/// Why the API server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves the API, reflection (v1 and v1alpha, which grpcurl 1.8 speaks) and health on `listener`
/// until `shutdown`.
pub async fn serve<P: FlowProgrammer>(
    listener: tokio::net::TcpListener,
    engine: Engine<P>,
    status: Arc<Status>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApiError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let mut ready = status.ready_changes();
    let health_task = tokio::spawn(async move {
        loop {
            let serving = if *ready.borrow_and_update() {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            reporter.set_service_status("", serving).await;
            reporter
                .set_service_status(pb::flowd_server::SERVICE_NAME, serving)
                .await;
            if ready.changed().await.is_err() {
                return;
            }
        }
    });
    // The descriptor set also holds tapd's service: advertise only what this port serves.
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(dnsflow_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(pb::flowd_server::SERVICE_NAME)
            .with_service_name(tonic_health::pb::health_server::SERVICE_NAME)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure()).build_v1()?;
    let reflection_v1alpha =
        reflection(tonic_reflection::server::Builder::configure()).build_v1alpha()?;
    let result = tonic::transport::Server::builder()
        .add_service(FlowdServer::new(FlowdApi::new(engine, status)))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    health_task.abort();
    Ok(result?)
}

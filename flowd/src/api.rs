//! flowd's gRPC API, `dnsflow.v1.Flowd`: what this node's flowd currently allows, why, and its counters;
//! with server reflection (grpcurl needs no `.proto` files) and `grpc.health.v1`, which reports
//! SERVING only after the first full sync of the cluster state.

use crate::{
    engine::{Engine, GrantView},
    metrics,
    model::PodKey,
    ovs::FlowProgrammer,
    policy,
    status::Status,
};
use dnsflow_dnstap::{
    event::{MAX_ANSWERS, MAX_CNAME_CHAIN},
    Answer, DnsName, DnsResponse,
};
use dnsflow_proto::v1::{
    self as pb,
    flowd_server::{Flowd, FlowdServer},
};
use std::{future::Future, net::IpAddr, sync::Arc, time::UNIX_EPOCH};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status as GrpcStatus};

/// The `dnsflow.v1.Flowd` implementation.
#[derive(Debug)]
pub struct FlowdApi<P> {
    engine: Engine<P>,
    status: Arc<Status>,
    /// flowd's metrics, whose counters `Stats` reports.
    metrics: Arc<metrics::Registry>,
}

impl<P> FlowdApi<P> {
    pub fn new(engine: Engine<P>, status: Arc<Status>, metrics: Arc<metrics::Registry>) -> Self {
        Self {
            engine,
            status,
            metrics,
        }
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
        action: policy::verdict_name(g.verdict).to_string(),
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

fn excluded_message(e: &policy::Excluded) -> pb::ExcludedAnswer {
    pb::ExcludedAnswer {
        ip: e.ip().to_string(),
        port: e.l4().map(|l4| policy::l4_name(&l4)).unwrap_or_default(),
        reason: e.reason(),
    }
}

/// The question name and the CNAME chain of an `Explain` request, validated.
fn request_names(req: &pb::ExplainRequest) -> Result<Vec<DnsName>, GrpcStatus> {
    if req.cname_chain.len() > MAX_CNAME_CHAIN {
        return Err(GrpcStatus::invalid_argument(format!(
            "cname_chain: more than {MAX_CNAME_CHAIN} names"
        )));
    }
    std::iter::once(("query_name", &req.query_name))
        .chain(req.cname_chain.iter().map(|n| ("cname_chain", n)))
        .map(|(field, n)| {
            DnsName::new(n).map_err(|e| GrpcStatus::invalid_argument(format!("{field} {n:?}: {e}")))
        })
        .collect()
}

fn request_answers(req: &pb::ExplainRequest) -> Result<Vec<IpAddr>, GrpcStatus> {
    if req.answers.len() > MAX_ANSWERS {
        return Err(GrpcStatus::invalid_argument(format!(
            "answers: more than {MAX_ANSWERS}"
        )));
    }
    req.answers
        .iter()
        .map(|a| {
            a.trim().parse().map_err(|_| {
                GrpcStatus::invalid_argument(format!("answers: {a:?} is not an IP address"))
            })
        })
        .collect()
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
        let names = request_names(&req)?;
        let answers = request_answers(&req)?;
        let key = PodKey::new(namespace, pod);
        let (held, hold) = self.status.hold.explain(self.engine.hold_candidate(&key));
        let (pod, rules, invalid) = {
            let known = self.status.known();
            (
                known.pods.get(&key).cloned(),
                known.rules.get(namespace).cloned(),
                known.invalid.get(namespace).cloned(),
            )
        };
        let Some(rules) = rules else {
            let summary = match invalid {
                Some(why) => format!(
                    "namespace {namespace}: EgressFirewall invalid: {why}; flowd grants nothing there"
                ),
                None => format!(
                    "namespace {namespace} has no EgressFirewall: flowd grants nothing there"
                ),
            };
            return Ok(Response::new(pb::ExplainResponse {
                summary,
                held,
                hold,
                ..pb::ExplainResponse::default()
            }));
        };
        // What the engine decides with now: the flags plus every discovered network.
        let settings = self.engine.policy();
        let name_refs: Vec<&DnsName> = names.iter().collect();
        let traces = policy::explain(&name_refs, &rules, &settings);
        let qname = &names[0];
        let first = traces.iter().find_map(|t| t.matched_name().map(|m| (t, m)));
        let mut summary = match first {
            Some((t, matched)) => format!(
                "rule {} ({}) matches {}",
                t.index,
                t.rule,
                policy::matched_text(qname, matched)
            ),
            None => format!(
                "no dnsName rule of namespace {namespace} matches {}",
                names
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" -> ")
            ),
        };
        // The answers are decided exactly as the daemon decides a DNS event of this pod.
        let excluded = match &pod {
            Some(pod) if !answers.is_empty() => {
                let client = pod.ips.first().copied().ok_or_else(|| {
                    GrpcStatus::internal(format!("pod {key} is known without an IP"))
                })?;
                let resp = DnsResponse::noerror(
                    client,
                    qname.clone(),
                    names[1..].to_vec(),
                    answers
                        .iter()
                        .map(|ip| Answer { ip: *ip, ttl: 0 })
                        .collect(),
                );
                let decision = policy::decide(&resp, pod, &rules, &settings);
                policy::exclusions(&decision, &rules)
            }
            _ => Vec::new(),
        };
        if !excluded.is_empty() {
            let list: Vec<String> = excluded
                .iter()
                .map(|e| match e.l4() {
                    None => e.ip().to_string(),
                    Some(l4) => format!("{} {}", e.ip(), policy::l4_name(&l4)),
                })
                .collect();
            summary.push_str(&format!("; no usable flow for {}", list.join(", ")));
        }
        if pod.is_none() {
            summary.push_str(&format!(
                "; but pod {key} is not a pod of this node flowd knows"
            ));
            if !answers.is_empty() {
                summary.push_str(", so its answers are not checked");
            }
        }
        let rules = traces
            .iter()
            .map(|t| pb::RuleVerdict {
                index: u32::try_from(t.index).unwrap_or(u32::MAX),
                rule: t.rule.clone(),
                matches: t.matches(),
                reason: t.reason(),
                matched_name: t
                    .matched_name()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::ExplainResponse {
            summary,
            rules,
            excluded: excluded.iter().map(excluded_message).collect(),
            held,
            hold,
        }))
    }

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, GrpcStatus> {
        let m = self.engine.metrics_snapshot();
        let counters = self
            .metrics
            .counters()
            .map(|(name, value)| (name.to_owned(), value))
            .collect();
        Ok(Response::new(pb::StatsResponse {
            counters,
            pods: m.pods,
            grants: self.engine.grants(None, None).len() as u64,
            flows: m.flows_desired,
            tapd_connected: self.status.upstream.connected.get(),
        }))
    }
}

/// Why the API server stopped. tonic's errors keep their causes in `source()` (a transport error says
/// only "transport error"), so these are transparent and the printer walks the chain.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// Serves the API, reflection (v1 and v1alpha, which grpcurl 1.8 speaks) and health on `listener`
/// until `shutdown`; `Stats` reports the counters of `metrics`.
pub async fn serve<P: FlowProgrammer>(
    listener: tokio::net::TcpListener,
    engine: Engine<P>,
    status: Arc<Status>,
    metrics: Arc<metrics::Registry>,
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
    let router = tonic::transport::Server::builder()
        .add_service(FlowdServer::new(FlowdApi::new(engine, status, metrics)))
        .add_service(health);
    let result = dnsflow_proto::add_reflection(router, &[pb::flowd_server::SERVICE_NAME])?
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    health_task.abort();
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::EngineSettings, egressfirewall::EgressFirewall, hold::HoldReport, model::PodInfo,
        ovs::Recording, rules::FirewallRules,
    };
    use serde_json::json;

    /// Namespace `abc` allows Google's CDN names after denying tcp/25 to one of its networks; `bad`'s
    /// EgressFirewall is invalid; `none` has none. Pod `abc/client` is 10.244.1.5, IPv4 only.
    fn api() -> FlowdApi<Recording> {
        let status = Status::default();
        {
            let mut known = status.known();
            let ef = EgressFirewall::inline(
                "abc",
                json!([
                    {"type": "Deny", "to": {"cidrSelector": "142.250.0.0/16"},
                     "ports": [{"protocol": "TCP", "port": 25}]},
                    {"type": "Allow", "to": {"dnsName": "*.l.google.com"}},
                    {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}
                ]),
            )
            .expect("deserializes");
            let rules = FirewallRules::from_egress_firewall(&ef).expect("valid");
            known.rules.insert("abc".into(), Arc::new(rules));
            known.invalid.insert(
                "bad".into(),
                "egress[0].ports[0].port: 0 is out of range".into(),
            );
            let key = PodKey::new("abc", "client");
            known.pods.insert(
                key.clone(),
                PodInfo {
                    uid: None,
                    key,
                    ips: vec!["10.244.1.5".parse().expect("ip")],
                    node: "n1".into(),
                },
            );
        }
        let engine = Engine::new(EngineSettings::for_kind(), Recording::new(None));
        let status = Arc::new(status);
        let registry = Arc::new(metrics::registry(&engine, &status));
        FlowdApi::new(engine, status, registry)
    }

    #[tokio::test]
    async fn stats_reports_every_counter_of_the_metrics_by_name() {
        let api = api();
        api.status.dns_events.inc();
        api.status.upstream.events.inc_by(2);
        let stats = api
            .stats(Request::new(pb::StatsRequest {}))
            .await
            .expect("stats")
            .into_inner();
        assert_eq!(stats.counters.get("dnsflow_dns_events"), Some(&1));
        assert_eq!(stats.counters.get("dnsflow_tapd_events"), Some(&2));
        assert_eq!(stats.counters.get("dnsflow_flows_installed"), Some(&0));
        // The same counters as /metrics: one per counter family there, named without `_total`.
        let text =
            dnsflow_runtime::http::openmetrics_text(api.metrics.registry()).expect("encodes");
        let mut families: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
            .map(str::to_owned)
            .collect();
        families.sort();
        let mut names: Vec<String> = stats.counters.into_keys().collect();
        names.sort();
        assert_eq!(names, families);
    }

    fn request(
        namespace: &str,
        pod: &str,
        query_name: &str,
        cname_chain: &[&str],
        answers: &[&str],
    ) -> pb::ExplainRequest {
        pb::ExplainRequest {
            namespace: namespace.into(),
            pod: pod.into(),
            query_name: query_name.into(),
            cname_chain: cname_chain.iter().map(|s| (*s).to_string()).collect(),
            answers: answers.iter().map(|s| (*s).to_string()).collect(),
        }
    }

    #[tokio::test]
    async fn explain_names_the_matching_name_the_excluded_answers_and_invalid_firewalls() {
        struct Case {
            what: &'static str,
            req: pb::ExplainRequest,
            summary: &'static str,
            /// (rule index, matched name) of the matching rules.
            matched: &'static [(u32, &'static str)],
            /// (ip, port, start of the reason)
            excluded: &'static [(&'static str, &'static str, &'static str)],
        }
        let cases = [
            Case {
                what: "the CNAME target matches",
                req: request("abc", "client", "www.google.com", &["www3.l.google.com"], &[]),
                summary: "rule 1 (Allow dnsName=*.l.google.com) matches www3.l.google.com (CNAME target of www.google.com)",
                matched: &[(1, "www3.l.google.com")],
                excluded: &[],
            },
            Case {
                what: "without the chain nothing matches",
                req: request("abc", "client", "www.google.com", &[], &[]),
                summary: "no dnsName rule of namespace abc matches www.google.com",
                matched: &[],
                excluded: &[],
            },
            Case {
                what: "answers: a service IP and an IPv6 one beside a granted one, and a port an earlier rule takes",
                req: request(
                    "abc",
                    "client",
                    "www.google.com",
                    &["www3.l.google.com"],
                    &["142.250.74.36", "10.96.0.10", "2a00:1450::4"],
                ),
                summary: "rule 1 (Allow dnsName=*.l.google.com) matches www3.l.google.com (CNAME target of www.google.com); no usable flow for 10.96.0.10, 2a00:1450::4, 142.250.74.36 tcp/25",
                matched: &[(1, "www3.l.google.com")],
                excluded: &[
                    ("10.96.0.10", "", "inside cluster subnet 10.96.0.0/16"),
                    ("2a00:1450::4", "", "the pod has no IP of this family"),
                    ("142.250.74.36", "tcp/25", "rule 0 (Deny cidrSelector=142.250.0.0/16 tcp/25) decides it first: rule 1's Allow flow never applies"),
                ],
            },
            Case {
                what: "answers of a pod flowd does not know are not checked",
                req: request("abc", "ghost", "a.l.google.com", &[], &["10.96.0.10"]),
                summary: "rule 1 (Allow dnsName=*.l.google.com) matches a.l.google.com; but pod abc/ghost is not a pod of this node flowd knows, so its answers are not checked",
                matched: &[(1, "a.l.google.com")],
                excluded: &[],
            },
            Case {
                what: "an invalid EgressFirewall says why",
                req: request("bad", "p", "www.google.com", &[], &["8.8.8.8"]),
                summary: "namespace bad: EgressFirewall invalid: egress[0].ports[0].port: 0 is out of range; flowd grants nothing there",
                matched: &[],
                excluded: &[],
            },
            Case {
                what: "no EgressFirewall at all",
                req: request("none", "p", "www.google.com", &[], &[]),
                summary: "namespace none has no EgressFirewall: flowd grants nothing there",
                matched: &[],
                excluded: &[],
            },
        ];
        let api = api();
        for c in cases {
            let got = api
                .explain(Request::new(c.req))
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", c.what))
                .into_inner();
            assert_eq!(got.summary, c.summary, "{}", c.what);
            let matched: Vec<(u32, &str)> = got
                .rules
                .iter()
                .filter(|r| r.matches)
                .map(|r| (r.index, r.matched_name.as_str()))
                .collect();
            assert_eq!(matched, c.matched, "{}", c.what);
            assert!(
                got.rules
                    .iter()
                    .all(|r| r.matches != r.matched_name.is_empty()),
                "{}",
                c.what
            );
            let excluded: Vec<(&str, &str, &str)> = got
                .excluded
                .iter()
                .map(|e| (e.ip.as_str(), e.port.as_str(), e.reason.as_str()))
                .collect();
            assert_eq!(excluded, c.excluded, "{}", c.what);
        }
    }

    /// Explain says whether the pod's DNS responses are held, with the hold's own reason.
    #[tokio::test]
    async fn explain_says_whether_the_pods_dns_responses_are_held() {
        async fn ask(api: &FlowdApi<Recording>) -> pb::ExplainResponse {
            let req = request("abc", "client", "www.google.com", &[], &[]);
            api.explain(Request::new(req))
                .await
                .expect("explains")
                .into_inner()
        }
        let mut api = api();
        let got = ask(&api).await;
        assert_eq!(
            (got.held, got.hold.as_str()),
            (false, "DNS responses are not held: the hold is not running")
        );
        let status = Status::with_hold(Arc::new(HoldReport::on(std::time::Duration::from_millis(
            100,
        ))));
        *status.known() = std::mem::take(&mut *api.status.known());
        api.status = Arc::new(status);
        let got = ask(&api).await;
        // The engine has not been told of the pod (no port in br-int either).
        assert_eq!(
            (got.held, got.hold.as_str()),
            (
                false,
                "its DNS responses are not held: flowd knows no such pod of this node with an IP"
            )
        );
    }

    #[tokio::test]
    async fn explain_refuses_malformed_names_and_answers() {
        let long_chain = vec!["a.example"; MAX_CNAME_CHAIN + 1];
        let many = vec!["192.0.2.1"; MAX_ANSWERS + 1];
        let cases = [
            (request("abc", "client", "a..b", &[], &[]), "query_name"),
            (
                request("abc", "client", "www.google.com", &["bad..name"], &[]),
                "cname_chain",
            ),
            (
                request("abc", "client", "www.google.com", &long_chain, &[]),
                "cname_chain: more than",
            ),
            (
                request("abc", "client", "www.google.com", &[], &["nope"]),
                "answers: \"nope\" is not an IP address",
            ),
            (
                request("abc", "client", "www.google.com", &[], &many),
                "answers: more than",
            ),
            (request("abc", "", "www.google.com", &[], &[]), "required"),
        ];
        let api = api();
        for (req, want) in cases {
            let err = api.explain(Request::new(req)).await.expect_err(want);
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{want}");
            assert!(err.message().contains(want), "{want}: {}", err.message());
        }
    }
}

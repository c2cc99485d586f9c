//! A Kubernetes API server, in process, speaking real HTTP list/watch for the resources flowd reads:
//! pods, nodes, `k8s.ovn.org/v1` egressfirewalls and OVN-K's ConfigMap.
//!
//! What it honours is what kube's watcher relies on: a global `resourceVersion`, paged-free lists that
//! carry it, watches resumed from a version (ADDED / MODIFIED / DELETED, then live), BOOKMARK events when
//! asked for, `410 Gone` as an in-stream ERROR once the history a watch needs is compacted away (the
//! watcher must then relist), field selectors (`spec.nodeName`, `metadata.name`, `metadata.namespace`)
//! and equality label selectors, with objects moving in and out of a selector seen as ADDED / DELETED as
//! the real server does. Every request is logged, so a test can compare flowd's calls with its RBAC.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, StreamBody};
use hyper::{body::Frame, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt as _;

/// Watches that outlive this are closed by the server, as kube-apiserver does after `timeoutSeconds`.
const MAX_WATCH: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Pods,
    Nodes,
    EgressFirewalls,
    ConfigMaps,
    Services,
}

impl Resource {
    fn api_version(self) -> &'static str {
        match self {
            Resource::Pods | Resource::Nodes | Resource::ConfigMaps | Resource::Services => "v1",
            Resource::EgressFirewalls => "k8s.ovn.org/v1",
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Resource::Pods => "Pod",
            Resource::Nodes => "Node",
            Resource::EgressFirewalls => "EgressFirewall",
            Resource::ConfigMaps => "ConfigMap",
            Resource::Services => "Service",
        }
    }
    /// `(api group, resource)` as RBAC names them.
    pub fn rbac(self) -> (&'static str, &'static str) {
        match self {
            Resource::Pods => ("", "pods"),
            Resource::Nodes => ("", "nodes"),
            Resource::EgressFirewalls => ("k8s.ovn.org", "egressfirewalls"),
            Resource::ConfigMaps => ("", "configmaps"),
            Resource::Services => ("", "services"),
        }
    }
    fn of(value: &Value) -> Resource {
        match value["kind"].as_str() {
            Some("Pod") => Resource::Pods,
            Some("Node") => Resource::Nodes,
            Some("EgressFirewall") => Resource::EgressFirewalls,
            Some("ConfigMap") => Resource::ConfigMaps,
            Some("Service") => Resource::Services,
            other => panic!("the fake API server does not serve {other:?}"),
        }
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Logged {
    pub resource: Option<Resource>,
    pub namespace: Option<String>,
    /// `list` or `watch` (RBAC verbs), or the HTTP method for anything else.
    pub verb: String,
    pub query: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
enum Signal {
    /// An object changed at `rv`: its previous and new state (`None` = absent).
    Change {
        rv: u64,
        resource: Resource,
        old: Option<Value>,
        new: Option<Value>,
    },
    Bookmark,
    /// History compacted: every open watch gets `410 Gone` and ends.
    Expire,
}

type Key = (Resource, String, String);

#[derive(Debug)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change, so that a watch can resume from any version not yet compacted.
    history: Vec<Signal>,
    /// Watches from a version below this get `410 Gone`.
    oldest: u64,
    log: Vec<Logged>,
    /// Resources answered with `500 Internal Server Error` (an API server in trouble; kube's client
    /// retries 503 itself, so 500 reaches the watcher at once).
    failing: Vec<Resource>,
}

/// The server; dropping it stops it.
#[derive(Debug)]
pub struct FakeApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    tx: broadcast::Sender<Signal>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn key_of(value: &Value) -> Key {
    (
        Resource::of(value),
        value["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        value["metadata"]["name"].as_str().unwrap().to_string(),
    )
}

impl FakeApiServer {
    pub async fn start() -> FakeApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            rv: 1000,
            objects: BTreeMap::new(),
            history: Vec::new(),
            oldest: 0,
            log: Vec::new(),
            failing: Vec::new(),
        }));
        let (tx, _) = broadcast::channel(4096);
        let task = {
            let (state, tx) = (state.clone(), tx.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (state, tx) = (state.clone(), tx.clone());
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let (state, tx) = (state.clone(), tx.clone());
                            async move { Ok::<_, Infallible>(handle(req, &state, &tx)) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            })
        };
        FakeApiServer {
            addr,
            state,
            tx,
            task,
        }
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Creates or replaces an object (ADDED or MODIFIED); returns its new resourceVersion.
    pub fn apply(&self, mut value: Value) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let resource = Resource::of(&value);
        value["apiVersion"] = json!(resource.api_version());
        value["metadata"]["resourceVersion"] = json!(rv.to_string());
        if value["metadata"]["uid"].is_null() {
            value["metadata"]["uid"] = json!(format!("uid-{rv}"));
        }
        let old = st.objects.insert(key_of(&value), value.clone());
        self.publish(
            &mut st,
            Signal::Change {
                rv,
                resource,
                old,
                new: Some(value),
            },
        );
        rv
    }

    /// Deletes an object (DELETED, carrying its last state with a new resourceVersion).
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        let key = (resource, namespace.to_string(), name.to_string());
        let Some(old) = st.objects.remove(&key) else {
            panic!("no {key:?} to delete")
        };
        st.rv += 1;
        let rv = st.rv;
        self.publish(
            &mut st,
            Signal::Change {
                rv,
                resource,
                old: Some(old),
                new: None,
            },
        );
    }

    /// Deletes an object without any watch ever hearing of it, and compacts history past it: what a
    /// watcher sees after a long disconnect. Every open watch gets `410 Gone`; only a relist can notice
    /// that the object is gone.
    pub fn delete_unseen_and_expire(&self, resource: Resource, namespace: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        let key = (resource, namespace.to_string(), name.to_string());
        assert!(st.objects.remove(&key).is_some(), "no {key:?} to delete");
        st.rv += 1;
        st.oldest = st.rv + 1;
        st.history.clear();
        let _ = self.tx.send(Signal::Expire);
    }

    /// Sends a BOOKMARK to every watch that asked for them.
    pub fn bookmark(&self) {
        let _st = self.state.lock().unwrap();
        let _ = self.tx.send(Signal::Bookmark);
    }

    fn publish(&self, st: &mut State, signal: Signal) {
        st.history.push(signal.clone());
        let _ = self.tx.send(signal);
    }

    /// Makes every list and watch of `resource` fail with `500` (or succeed again).
    pub fn set_failing(&self, resource: Resource, failing: bool) {
        let mut st = self.state.lock().unwrap();
        st.failing.retain(|r| *r != resource);
        if failing {
            st.failing.push(resource);
        }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    /// How many requests so far were `verb` on `resource` (e.g. how often the pods were listed).
    pub fn count(&self, resource: Resource, verb: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.resource == Some(resource) && r.verb == verb)
            .count()
    }
}

/// `(resource, namespace)` from an API path, for the paths flowd may use.
fn route(path: &str) -> Option<(Resource, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (rest, group) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => (rest, ""),
        ["apis", "k8s.ovn.org", "v1", rest @ ..] => (rest, "k8s.ovn.org"),
        _ => return None,
    };
    let (ns, plural) = match rest {
        [plural] => (None, *plural),
        ["namespaces", ns, plural] => (Some((*ns).to_string()), *plural),
        _ => return None,
    };
    let resource = match (group, plural) {
        ("", "pods") => Resource::Pods,
        ("", "nodes") if ns.is_none() => Resource::Nodes,
        ("k8s.ovn.org", "egressfirewalls") => Resource::EgressFirewalls,
        ("", "configmaps") if ns.is_some() => Resource::ConfigMaps,
        ("", "services") if ns.is_some() => Resource::Services,
        _ => return None,
    };
    Some((resource, ns))
}

fn field(value: &Value, path: &str) -> String {
    path.split('.')
        .fold(value, |v, k| &v[k])
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Equality-based selector terms (`k=v`, `k==v`, `k!=v`, and for labels a bare `k`).
fn selector_matches(selector: &str, lookup: impl Fn(&str) -> Option<String>) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            lookup(k.trim()).as_deref() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once('=') {
            lookup(k.trim()).as_deref() == Some(v.trim_start_matches('=').trim())
        } else {
            lookup(term.trim()).is_some()
        }
    })
}

#[derive(Debug)]
struct Filter {
    resource: Resource,
    namespace: Option<String>,
    fields: String,
    labels: String,
}

impl Filter {
    fn matches(&self, value: &Value) -> bool {
        Resource::of(value) == self.resource
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| value["metadata"]["namespace"] == ns.as_str())
            && selector_matches(&self.fields, |k| Some(field(value, k)))
            && selector_matches(&self.labels, |k| {
                value["metadata"]["labels"][k].as_str().map(str::to_string)
            })
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn handle(
    req: Request<hyper::body::Incoming>,
    state: &Arc<Mutex<State>>,
    tx: &broadcast::Sender<Signal>,
) -> Response<BoxBody<Bytes, Infallible>> {
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    let routed = route(req.uri().path());
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (req.method() == hyper::Method::GET, watch) {
        (true, true) => "watch".to_string(),
        (true, false) => "list".to_string(),
        _ => req.method().to_string(),
    };
    let mut st = state.lock().unwrap();
    st.log.push(Logged {
        resource: routed.as_ref().map(|r| r.0),
        namespace: routed.as_ref().and_then(|r| r.1.clone()),
        verb: verb.clone(),
        query: query.clone(),
    });
    let Some((resource, namespace)) = routed else {
        return json_response(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", "not served"),
        );
    };
    if st.failing.contains(&resource) {
        return json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &status(500, "InternalError", "etcd is having a bad day"),
        );
    }
    if req.method() != hyper::Method::GET {
        return json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &status(405, "MethodNotAllowed", "read only"),
        );
    }
    let filter = Filter {
        resource,
        namespace,
        fields: query.get("fieldSelector").cloned().unwrap_or_default(),
        labels: query.get("labelSelector").cloned().unwrap_or_default(),
    };
    if !watch {
        let items: Vec<Value> = st
            .objects
            .values()
            .filter(|v| filter.matches(v))
            .cloned()
            .collect();
        let list = json!({
            "apiVersion": resource.api_version(),
            "kind": format!("{}List", resource.kind()),
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        });
        return json_response(StatusCode::OK, &list);
    }

    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(st.rv);
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(MAX_WATCH, Duration::from_secs)
        .min(MAX_WATCH);
    let (out_tx, out_rx) = mpsc::channel::<Value>(1024);
    if from + 1 < st.oldest {
        let _ = out_tx.try_send(
            json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")}),
        );
    } else {
        // Replay what happened after `from`, then go live: both under the lock, so nothing is missed.
        let backlog: Vec<Signal> = st
            .history
            .iter()
            .filter(|s| matches!(s, Signal::Change { rv, .. } if *rv > from))
            .cloned()
            .collect();
        let mut rx = tx.subscribe();
        drop(st);
        let current = Arc::new(filter);
        let state = state.clone();
        tokio::spawn(async move {
            for s in backlog {
                if let Some(ev) = watch_event(&current, &s) {
                    if out_tx.send(ev).await.is_err() {
                        return;
                    }
                }
            }
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            loop {
                let signal = tokio::select! {
                    _ = &mut deadline => return,
                    s = rx.recv() => s,
                };
                let ev = match signal {
                    Ok(Signal::Expire) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = out_tx
                            .send(json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")}))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                    Ok(Signal::Bookmark) if bookmarks => {
                        // A bookmark promises "you are at least here": the newest version is.
                        let rv = state.lock().unwrap().rv.to_string();
                        Some(json!({"type": "BOOKMARK", "object": {
                            "apiVersion": current.resource.api_version(),
                            "kind": current.resource.kind(),
                            "metadata": {"resourceVersion": rv}}}))
                    }
                    Ok(Signal::Bookmark) => None,
                    Ok(s @ Signal::Change { .. }) => watch_event(&current, &s),
                };
                if let Some(ev) = ev {
                    if out_tx.send(ev).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    let body = StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(out_rx)
            .map(|v| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{v}\n"))))),
    );
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(body.boxed())
        .unwrap()
}

/// How one change looks through a watch's selector: the real server turns an object leaving the
/// selector into DELETED and one entering it into ADDED.
fn watch_event(filter: &Filter, signal: &Signal) -> Option<Value> {
    let Signal::Change {
        rv,
        resource,
        old,
        new,
    } = signal
    else {
        return None;
    };
    if *resource != filter.resource {
        return None;
    }
    let was = old.as_ref().is_some_and(|o| filter.matches(o));
    let is = new.as_ref().is_some_and(|n| filter.matches(n));
    let (kind, mut object) = match (was, is) {
        (false, true) => ("ADDED", new.clone()?),
        (true, true) => ("MODIFIED", new.clone()?),
        (true, false) => ("DELETED", new.clone().or_else(|| old.clone())?),
        (false, false) => return None,
    };
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    Some(json!({"type": kind, "object": object}))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A pod of `node` with `ip`, in the shape the API server returns.
pub fn pod(namespace: &str, name: &str, node: &str, ip: &str) -> Value {
    json!({
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

/// A node whose OVN-K annotation gives it `subnet` on the default network.
pub fn node(name: &str, subnet: &str) -> Value {
    json!({
        "kind": "Node",
        "metadata": {"name": name, "annotations": {
            "k8s.ovn.org/node-subnets": json!({"default": [subnet]}).to_string()}},
        "spec": {"podCIDRs": [subnet]},
    })
}

/// Upstream OVN-K's ConfigMap (`ovn-kubernetes/ovn-config`) with the cluster's pod and service subnets.
pub fn ovn_config(net_cidr: &str, svc_cidr: &str) -> Value {
    json!({
        "kind": "ConfigMap",
        "metadata": {"name": "ovn-config", "namespace": "ovn-kubernetes"},
        "data": {"net_cidr": net_cidr, "svc_cidr": svc_cidr, "mtu": "1400"},
    })
}

/// The EgressFirewall of `namespace` (always named `default`), with `egress` rules as OVN-K writes them.
pub fn egress_firewall(namespace: &str, egress: Value) -> Value {
    json!({
        "kind": "EgressFirewall",
        "metadata": {"name": "default", "namespace": namespace},
        "spec": {"egress": egress},
    })
}

//! The engine: flowd's desired state (pods, rules, the answers pods received, the flows they earn) and
//! the loop that keeps `br-int` equal to it.
//!
//! Callers (the daemon, `flowd replay`) feed it with synchronous, cheap calls — [`Engine::upsert_pod`],
//! [`Engine::remove_pod`], [`Engine::set_rules`], [`Engine::remove_rules`], [`Engine::on_dns`] — and run
//! [`Engine::run`] once in a task. Every change marks flows dirty and wakes the flusher, which writes
//! them with one `ovs-ofctl --bundle` per batch: at most one batch is in flight, changes that arrive
//! meanwhile go into the next one. A flow monitor makes the engine forget flows OVS expired and
//! reinstall flows someone else deleted (ovn-controller wipes `br-int` when it reconnects); a periodic
//! reconcile against `dump-flows` is the safety net and, at start, removes what an earlier run left
//! that is no longer wanted (flows still wanted are simply written again: an add replaces the flow with
//! the same match, so there are never duplicates).

mod metrics;

pub use metrics::{LatencyHistogram, Metrics, MetricsSnapshot, BATCH_LATENCY_BUCKETS_US};

use crate::{
    model::{FlowKey, Grant, GrantReason, PodInfo, PodKey, PortMatch, Verdict},
    ovs::{
        flow::POD_MASK, AclTarget, Cookie, FlowAction, FlowEvent, FlowMatch, FlowOp,
        FlowProgrammer, FlowSpec, OvsError, PortKeys, RemovedReason,
    },
    policy::{self, PolicySettings},
    rules::FirewallRules,
    settings::EngineSettings,
};
use ipnet::IpNet;
use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};
use tapd::{DnsName, DnsResponse};
use tokio::sync::Notify;

/// Answers for a client IP no pod is known for yet are held this many at most (a node's pods start in
/// bursts; the API watch may lag the first DNS query by a second or two)...
pub const PENDING_MAX: usize = 10_000;
/// ...and this long at most.
pub const PENDING_MAX_AGE: Duration = Duration::from_secs(30);
/// Distinct names remembered per pod for recomputing on rule changes; the oldest goes first.
pub const ANSWERS_PER_POD: usize = 4096;
/// A monitor's idle/hard removal is believed when our own record says the flow is due within this.
const EXPIRY_SLACK: Duration = Duration::from_secs(2);
/// A new answer re-adds an existing flow only when it extends the expiry by at least this much.
const REFRESH_MIN: Duration = Duration::from_secs(1);
/// Monitor restart backoff: from the first to the last, doubling.
const MONITOR_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// A monitor that ran this long before dying restarts at the shortest backoff again.
const MONITOR_HEALTHY: Duration = Duration::from_secs(30);
/// Flows the engine holds at most (a grant beyond it is dropped and counted): ~25 MiB of state.
pub const MAX_FLOWS: usize = 500_000;
/// Discovery dumps the whole bridge: while OVN has no ACL table yet, look again at most this often.
const DISCOVERY_RETRY: Duration = Duration::from_secs(5);
/// The first reconcile (which removes what an earlier run left and no longer wants) comes this soon
/// after start, when the interval is longer: time for the caches to fill (tapd replays recent answers
/// on subscribe). A daemon that knows when it is in sync may call [`Engine::reconcile`] itself.
pub const FIRST_RECONCILE: Duration = Duration::from_secs(15);
/// After a foreign wipe, the reconcile that checks OVN's tables again waits this long: ovn-controller
/// reinstalls its flows within a few hundred milliseconds of reconnecting.
pub const WIPE_SETTLE: Duration = Duration::from_secs(2);
/// A pod whose OVS port was not found is looked for again after this long (each look runs two tools).
const KEYS_RETRY: Duration = Duration::from_secs(1);
/// Flows written per bundle at most: bounds the memory of one batch (~10 MiB of text and specs); the
/// rest follows in the next batch at once.
pub const MAX_BATCH_FLOWS: usize = 20_000;
/// Retry period for flows waiting for OVS (no ACL table or port keys yet) or after a failed batch...
const RETRY: Duration = Duration::from_millis(500);
/// ...growing up to this while batches keep failing.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Errors of the engine's OVS side.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Ovs(#[from] OvsError),
    #[error(
        "no EgressFirewall ACL table found in the bridge yet (set --acl-table to skip discovery)"
    )]
    NoAclTable,
}

/// Identity of a flow inside the engine: [`FlowKey`] with the pod as its 16-bit id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct FlowId {
    pod: u16,
    priority: u16,
    src: IpAddr,
    dst: IpAddr,
    l4: Option<PortMatch>,
}

#[derive(Clone, Debug)]
struct FlowState {
    verdict: Verdict,
    ttl: u32,
    /// When the answer stops justifying the flow (answer time + idle timeout).
    expires: SystemTime,
    /// Shared by the flows of one answer and rule (one answer often yields many flows).
    reason: Arc<GrantReason>,
    /// Written to OVS at least once since it was last changed.
    installed: bool,
}

/// One grant as the inspection API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantView {
    pub key: FlowKey,
    pub verdict: Verdict,
    pub ttl: u32,
    pub idle_timeout: u16,
    pub expires: SystemTime,
    pub reason: GrantReason,
    /// In OVS (as far as the engine knows), or still waiting to be written.
    pub installed: bool,
    pub cookie: u64,
}

#[derive(Debug)]
struct PodEntry {
    info: PodInfo,
    id: u16,
    keys: Option<PortKeys>,
    /// When its keys were last looked for in vain (a pod without an OVN port, e.g. host-network).
    keys_missed: Option<Instant>,
    /// Remembered answers by question name, with when they arrived, oldest first by arrival.
    answers: HashMap<DnsName, (DnsResponse, SystemTime)>,
}

#[derive(Debug, Default)]
struct State {
    pods: HashMap<PodKey, PodEntry>,
    by_ip: HashMap<IpAddr, PodKey>,
    by_id: HashMap<u16, PodKey>,
    rules: HashMap<String, Arc<FirewallRules>>,
    flows: HashMap<FlowId, FlowState>,
    /// Flows to write in the next batch.
    dirty: HashSet<FlowId>,
    /// Exact deletes for the next batch (flows no longer wanted), and whole pods to delete.
    delete_strict: HashMap<FlowId, (Cookie, FlowMatch)>,
    delete_pods: Vec<u16>,
    pending: VecDeque<(DnsResponse, SystemTime)>,
    /// Deletes found by a reconcile (not cancelled when the same flow is wanted again: its add follows).
    delete_stale: Vec<(Cookie, FlowMatch)>,
    target: Option<AclTarget>,
    local_subnets: Vec<IpNet>,
    node: Option<String>,
    /// When discovery last found no ACL table.
    discovery_failed: Option<Instant>,
    /// New pods arrived: look up their datapath keys before their first answer needs them.
    prefetch_keys: bool,
    /// Someone deleted our flows (ovn-controller reconnecting, maybe upgraded): look at OVN's tables
    /// again at the next reconcile, which comes [`WIPE_SETTLE`] later.
    rediscover: bool,
}

struct Inner<P> {
    settings: EngineSettings,
    policy: PolicySettings,
    programmer: P,
    state: Mutex<State>,
    wake: Notify,
    /// A foreign wipe was seen: reconcile (and rediscover) soon.
    wiped: Notify,
    /// The ACL table changed: the monitor must watch the new one.
    retarget: Notify,
    /// Held while a batch (or a reconcile) talks to OVS: at most one bundle in flight.
    apply_lock: tokio::sync::Mutex<()>,
    metrics: Metrics,
}

/// The engine; cheap to clone (all clones share one state).
pub struct Engine<P> {
    inner: Arc<Inner<P>>,
}

impl<P> Clone for Engine<P> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<P> std::fmt::Debug for Engine<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

/// FNV-1a of the iface-id: a pod keeps its id (and so its flows' cookies) across flowd restarts.
fn preferred_id(key: &PodKey) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.iface_id().bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    (h ^ (h >> 16)) as u16
}

impl State {
    fn allocate_id(&self, key: &PodKey) -> Option<u16> {
        let start = preferred_id(key);
        (0..=u16::MAX)
            .map(|i| start.wrapping_add(i))
            .find(|id| !self.by_id.contains_key(id))
    }

    fn flow_id(&self, key: &FlowKey) -> Option<FlowId> {
        Some(FlowId {
            pod: self.pods.get(&key.pod)?.id,
            priority: key.priority,
            src: key.src,
            dst: key.dst,
            l4: key.l4,
        })
    }

    fn mark_dirty(&mut self, id: FlowId) {
        self.delete_strict.remove(&id);
        self.dirty.insert(id);
        if let Some(f) = self.flows.get_mut(&id) {
            f.installed = false;
        }
    }

    /// Forgets a flow and, when OVS may hold it, queues its exact delete.
    fn drop_flow(&mut self, id: FlowId, prefix: u32) {
        self.flows.remove(&id);
        self.dirty.remove(&id);
        if let (Some(target), Some(keys)) = (
            self.target.as_ref(),
            self.by_id
                .get(&id.pod)
                .and_then(|k| self.pods.get(k))
                .and_then(|p| p.keys),
        ) {
            let cookie = Cookie::new(prefix, id.pod, id.priority);
            self.delete_strict
                .insert(id, (cookie, flow_match(target.table, keys, &id)));
        }
    }
}

/// Pairs each grant with a shared copy of its reason: consecutive grants of one answer and rule have
/// equal reasons, and 100,000 flows should not hold 100,000 copies of the same two names.
fn share_reasons(grants: Vec<Grant>) -> Vec<(Grant, Arc<GrantReason>)> {
    let mut last: Option<Arc<GrantReason>> = None;
    grants
        .into_iter()
        .map(|g| {
            let reason = match &last {
                Some(r) if **r == g.reason => Arc::clone(r),
                _ => Arc::new(g.reason.clone()),
            };
            last = Some(Arc::clone(&reason));
            (g, reason)
        })
        .collect()
}

fn flow_match(table: u8, keys: PortKeys, id: &FlowId) -> FlowMatch {
    FlowMatch {
        table,
        priority: id.priority,
        metadata: keys.metadata,
        reg14: keys.reg14,
        src: id.src,
        dst: id.dst,
        l4: id.l4,
    }
}

impl<P: FlowProgrammer> Engine<P> {
    /// A new engine. `settings` should have passed [`EngineSettings::validate`].
    pub fn new(settings: EngineSettings, programmer: P) -> Self {
        let policy = settings.policy();
        // With both overrides nothing is left to discover; otherwise the first batch discovers.
        let target = match (settings.acl_table, &settings.allow_actions) {
            (Some(table), Some(allow)) => Some(AclTarget {
                table,
                allow: allow.clone(),
            }),
            _ => None,
        };
        let state = State {
            target,
            local_subnets: settings.cluster_subnets.clone(),
            ..State::default()
        };
        Self {
            inner: Arc::new(Inner {
                settings,
                policy,
                programmer,
                state: Mutex::new(state),
                wake: Notify::new(),
                wiped: Notify::new(),
                retarget: Notify::new(),
                apply_lock: tokio::sync::Mutex::new(()),
                metrics: Metrics::default(),
            }),
        }
    }

    /// Only pods of this node get flows; [`Engine::upsert_pod`] treats other pods as removed.
    pub fn set_node(&self, node: impl Into<String>) {
        self.lock().node = Some(node.into());
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.inner.settings
    }

    pub fn programmer(&self) -> &P {
        &self.inner.programmer
    }

    /// The EgressFirewall ACL table in use: `--acl-table`, else the one discovered in the bridge
    /// (`None` until discovery has found it).
    pub fn acl_table(&self) -> Option<u8> {
        self.lock()
            .target
            .as_ref()
            .map(|t| t.table)
            .or(self.inner.settings.acl_table)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Counters and gauges, copied.
    pub fn metrics_snapshot(&self) -> MetricsSnapshot {
        let mut m = self.inner.metrics.snapshot();
        let s = self.lock();
        m.flows_desired = s.flows.len() as u64;
        m.pods = s.pods.len() as u64;
        m.pending = s.pending.len() as u64;
        m
    }

    /// This node's pod subnets: answers to a client inside them with no known pod are held until the pod
    /// appears. Until set, the cluster subnets of the settings are used.
    pub fn set_local_subnets(&self, subnets: Vec<IpNet>) {
        self.lock().local_subnets = subnets;
    }

    /// Adds or updates a pod. A pod of another node is treated as removed. Answers held for its IPs are
    /// applied now.
    pub fn upsert_pod(&self, pod: PodInfo) {
        let mut s = self.lock();
        if s.node.as_ref().is_some_and(|n| *n != pod.node) {
            drop(s);
            self.remove_pod(&pod.key);
            return;
        }
        let prefix = self.inner.settings.cookie_prefix;
        if let Some(old) = s.pods.get(&pod.key) {
            if old.info == pod {
                return;
            }
            let old_ips = old.info.ips.clone();
            let id = old.id;
            for ip in old_ips {
                s.by_ip.remove(&ip);
            }
            // Flows keyed on an IP the pod no longer has go.
            let stale: Vec<FlowId> = s
                .flows
                .keys()
                .filter(|f| f.pod == id && !pod.ips.contains(&f.src))
                .copied()
                .collect();
            for f in stale {
                s.drop_flow(f, prefix);
            }
            for ip in &pod.ips {
                s.by_ip.insert(*ip, pod.key.clone());
            }
            if let Some(e) = s.pods.get_mut(&pod.key) {
                e.info = pod.clone();
            }
        } else {
            let Some(id) = s.allocate_id(&pod.key) else {
                tracing::error!(pod = %pod.key, "more than 65536 pods on one node; ignoring pod");
                return;
            };
            for ip in &pod.ips {
                s.by_ip.insert(*ip, pod.key.clone());
            }
            s.by_id.insert(id, pod.key.clone());
            s.prefetch_keys = true;
            s.pods.insert(
                pod.key.clone(),
                PodEntry {
                    info: pod.clone(),
                    id,
                    keys: None,
                    keys_missed: None,
                    answers: HashMap::new(),
                },
            );
        }
        // Answers that arrived before the pod did.
        let mut held = Vec::new();
        s.pending.retain(|(resp, at)| {
            if pod.ips.contains(&resp.client) {
                held.push((resp.clone(), *at));
                false
            } else {
                true
            }
        });
        for (resp, at) in held {
            self.answer_locked(&mut s, resp, at);
        }
        drop(s);
        self.inner.wake.notify_one();
    }

    /// Removes a pod: its flows go in the next batch (one delete by cookie), its answers are forgotten.
    pub fn remove_pod(&self, key: &PodKey) {
        let mut s = self.lock();
        let Some(entry) = s.pods.remove(key) else {
            return;
        };
        for ip in &entry.info.ips {
            if s.by_ip.get(ip) == Some(key) {
                s.by_ip.remove(ip);
            }
        }
        s.by_id.remove(&entry.id);
        let before = s.flows.len();
        s.flows.retain(|f, _| f.pod != entry.id);
        s.dirty.retain(|f| f.pod != entry.id);
        s.delete_strict.retain(|f, _| f.pod != entry.id);
        Metrics::add(&self.inner.metrics.flows_removed, before - s.flows.len());
        s.delete_pods.push(entry.id);
        drop(s);
        self.inner.wake.notify_one();
    }

    /// Sets a namespace's validated EgressFirewall and recomputes its pods from remembered answers.
    pub fn set_rules(&self, rules: FirewallRules) {
        let namespace = rules.namespace.clone();
        let mut s = self.lock();
        s.rules.insert(namespace.clone(), Arc::new(rules));
        self.recompute_namespace(&mut s, &namespace);
        drop(s);
        self.inner.wake.notify_one();
    }

    /// The namespace has no (valid) EgressFirewall any more: its flows go.
    pub fn remove_rules(&self, namespace: &str) {
        let mut s = self.lock();
        if s.rules.remove(namespace).is_some() {
            self.recompute_namespace(&mut s, namespace);
        }
        drop(s);
        self.inner.wake.notify_one();
    }

    /// A DNS answer. Decides with `policy::decide`, remembers the answer for rule changes, and marks the
    /// resulting flows for the next batch. `now` is when the answer counts from (its TTL runs from there).
    pub fn on_dns(&self, resp: DnsResponse, now: SystemTime) {
        let mut s = self.lock();
        self.answer_locked(&mut s, resp, now);
        drop(s);
        self.inner.wake.notify_one();
    }

    fn answer_locked(&self, s: &mut State, resp: DnsResponse, now: SystemTime) {
        let Some(key) = s.by_ip.get(&resp.client).cloned() else {
            self.hold(s, resp, now);
            return;
        };
        let grants = match s.rules.get(&key.namespace) {
            Some(rules) => match s.pods.get(&key) {
                Some(pod) => policy::decide(&resp, &pod.info, rules, &self.inner.policy).grants,
                None => Vec::new(),
            },
            None => Vec::new(),
        };
        if let Some(pod) = s.pods.get_mut(&key) {
            if resp.is_noerror() && !resp.answers.is_empty() {
                if pod.answers.len() >= ANSWERS_PER_POD && !pod.answers.contains_key(&resp.qname) {
                    let oldest = pod
                        .answers
                        .iter()
                        .min_by_key(|(_, (_, at))| *at)
                        .map(|(n, _)| n.clone());
                    if let Some(oldest) = oldest {
                        pod.answers.remove(&oldest);
                    }
                }
                pod.answers.insert(resp.qname.clone(), (resp, now));
            }
        }
        for (g, reason) in share_reasons(grants) {
            self.grant_locked(s, &g, reason, now);
        }
    }

    fn hold(&self, s: &mut State, resp: DnsResponse, now: SystemTime) {
        if !s.local_subnets.iter().any(|n| n.contains(&resp.client)) {
            return;
        }
        let m = &self.inner.metrics;
        while s
            .pending
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at).unwrap_or_default() > PENDING_MAX_AGE)
        {
            s.pending.pop_front();
            Metrics::add(&m.pending_dropped, 1);
        }
        if s.pending.len() >= PENDING_MAX {
            s.pending.pop_front();
            Metrics::add(&m.pending_dropped, 1);
        }
        s.pending.push_back((resp, now));
        Metrics::add(&m.pending_held, 1);
    }

    fn grant_locked(&self, s: &mut State, g: &Grant, reason: Arc<GrantReason>, now: SystemTime) {
        let Some(id) = s.flow_id(&g.key) else { return };
        let idle = Duration::from_secs(self.inner.settings.idle_timeout(g.ttl).into());
        let expires = now + idle;
        let full = s.flows.len() >= MAX_FLOWS;
        match s.flows.get_mut(&id) {
            Some(f) if f.verdict == g.verdict && expires < f.expires + REFRESH_MIN => {
                // Already there for at least as long: nothing to write.
                f.reason = reason;
            }
            Some(f) => {
                f.verdict = g.verdict;
                f.ttl = g.ttl;
                f.expires = f.expires.max(expires);
                f.reason = reason;
                s.mark_dirty(id);
            }
            None if full => {
                Metrics::add(&self.inner.metrics.grants_dropped, 1);
            }
            None => {
                s.flows.insert(
                    id,
                    FlowState {
                        verdict: g.verdict,
                        ttl: g.ttl,
                        expires,
                        reason,
                        installed: false,
                    },
                );
                s.mark_dirty(id);
            }
        }
    }

    /// Recomputes the flows of every pod in `namespace` from the answers remembered for it.
    fn recompute_namespace(&self, s: &mut State, namespace: &str) {
        let prefix = self.inner.settings.cookie_prefix;
        let now = SystemTime::now();
        let rules = s.rules.get(namespace).cloned();
        let pods: Vec<PodKey> = s
            .pods
            .keys()
            .filter(|k| k.namespace == namespace)
            .cloned()
            .collect();
        for key in pods {
            let Some(pod) = s.pods.get_mut(&key) else {
                continue;
            };
            let id = pod.id;
            // Answers whose every address has expired are forgotten here.
            pod.answers.retain(|_, (resp, at)| {
                let ttl = resp.answers.iter().map(|a| a.ttl).max().unwrap_or(0);
                let idle = Duration::from_secs(self.inner.settings.idle_timeout(ttl).into());
                *at + idle > now
            });
            let mut grants = Vec::new();
            if let Some(rules) = &rules {
                for (resp, at) in pod.answers.values() {
                    let decided = policy::decide(resp, &pod.info, rules, &self.inner.policy);
                    for (g, reason) in share_reasons(decided.grants) {
                        grants.push((g, reason, *at));
                    }
                }
            }
            let wanted: HashSet<FlowId> = grants
                .iter()
                .filter_map(|(g, _, _)| s.flow_id(&g.key))
                .collect();
            let unwanted: Vec<FlowId> = s
                .flows
                .keys()
                .filter(|f| f.pod == id && !wanted.contains(f))
                .copied()
                .collect();
            Metrics::add(&self.inner.metrics.flows_removed, unwanted.len());
            for f in unwanted {
                s.drop_flow(f, prefix);
            }
            for (g, reason, at) in grants {
                self.grant_locked(s, &g, reason, at);
            }
        }
    }

    /// The grants the engine holds, optionally for one pod or one namespace, sorted by pod then priority.
    pub fn grants(&self, pod: Option<&PodKey>, namespace: Option<&str>) -> Vec<GrantView> {
        let s = self.lock();
        let prefix = self.inner.settings.cookie_prefix;
        let mut out: Vec<GrantView> = s
            .flows
            .iter()
            .filter_map(|(id, f)| {
                let key = s.by_id.get(&id.pod)?;
                if pod.is_some_and(|p| p != key) || namespace.is_some_and(|n| n != key.namespace) {
                    return None;
                }
                Some(GrantView {
                    key: FlowKey {
                        pod: key.clone(),
                        priority: id.priority,
                        src: id.src,
                        dst: id.dst,
                        l4: id.l4,
                    },
                    verdict: f.verdict,
                    ttl: f.ttl,
                    idle_timeout: self.inner.settings.idle_timeout(f.ttl),
                    expires: f.expires,
                    reason: GrantReason::clone(&f.reason),
                    installed: f.installed,
                    cookie: Cookie::new(prefix, id.pod, id.priority).0,
                })
            })
            .collect();
        out.sort_by(|a, b| {
            (
                &a.key.pod,
                std::cmp::Reverse(a.key.priority),
                a.key.dst,
                a.key.l4,
            )
                .cmp(&(
                    &b.key.pod,
                    std::cmp::Reverse(b.key.priority),
                    b.key.dst,
                    b.key.l4,
                ))
        });
        out
    }

    /// Whether changes are waiting for the next batch.
    pub fn has_pending_changes(&self) -> bool {
        let s = self.lock();
        !(s.dirty.is_empty()
            && s.delete_strict.is_empty()
            && s.delete_pods.is_empty()
            && s.delete_stale.is_empty())
    }

    /// Writes every pending change now (waiting for a batch in flight first).
    pub async fn flush(&self) -> Result<(), EngineError> {
        let _guard = self.inner.apply_lock.lock().await;
        self.flush_locked().await
    }

    async fn ensure_target(&self) -> Result<AclTarget, EngineError> {
        if let Some(t) = self.lock().target.clone() {
            return Ok(t);
        }
        if self
            .lock()
            .discovery_failed
            .is_some_and(|at| at.elapsed() < DISCOVERY_RETRY)
        {
            return Err(EngineError::NoAclTable);
        }
        let st = &self.inner.settings;
        let discovered = self.inner.programmer.discover_acl(st.priority_base).await?;
        let target = match (st.acl_table, discovered) {
            (Some(table), d) => AclTarget {
                table,
                allow: st
                    .allow_actions
                    .clone()
                    .or(d.filter(|d| d.table == table).map(|d| d.allow))
                    .unwrap_or_else(|| crate::ovs::Actions::resubmit(table.saturating_add(1))),
            },
            (None, Some(d)) => AclTarget {
                table: d.table,
                allow: st.allow_actions.clone().unwrap_or(d.allow),
            },
            (None, None) => {
                self.lock().discovery_failed = Some(Instant::now());
                return Err(EngineError::NoAclTable);
            }
        };
        tracing::info!(table = target.table, allow = %target.allow, "EgressFirewall ACL stage");
        self.lock().target = Some(target.clone());
        Ok(target)
    }

    /// After a foreign wipe, OVN may have been upgraded and its tables renumbered: when discovery now
    /// finds another ACL table (or other allow actions), every flow moves there (the reconcile then
    /// removes the old ones as stale) and the monitor follows.
    async fn rediscover_if_wiped(&self) -> Result<(), EngineError> {
        if !std::mem::take(&mut self.lock().rediscover) || self.inner.settings.acl_table.is_some() {
            return Ok(());
        }
        let st = &self.inner.settings;
        let Some(found) = self.inner.programmer.discover_acl(st.priority_base).await? else {
            return Ok(());
        };
        let found = AclTarget {
            allow: st.allow_actions.clone().unwrap_or(found.allow),
            ..found
        };
        let mut s = self.lock();
        if s.target.as_ref() == Some(&found) {
            return Ok(());
        }
        tracing::warn!(table = found.table, allow = %found.allow, "OVN's EgressFirewall ACL stage moved");
        s.target = Some(found);
        let all: Vec<FlowId> = s.flows.keys().copied().collect();
        for id in all {
            s.mark_dirty(id);
        }
        // Pod deletes and exact deletes were meant for the old table; the reconcile finds leftovers.
        s.delete_strict.clear();
        s.delete_pods.clear();
        drop(s);
        self.inner.retarget.notify_one();
        Ok(())
    }

    /// Fetches datapath keys for pods with dirty flows and no keys yet.
    async fn ensure_keys(&self) -> Result<(), EngineError> {
        let due = |p: &PodEntry| {
            p.keys.is_none() && p.keys_missed.is_none_or(|t| t.elapsed() >= KEYS_RETRY)
        };
        let missing: HashSet<String> = {
            let mut s = self.lock();
            let needed = s.prefetch_keys
                || s.dirty
                    .iter()
                    .filter_map(|f| s.by_id.get(&f.pod).and_then(|k| s.pods.get(k)))
                    .any(due);
            if !needed {
                return Ok(());
            }
            s.prefetch_keys = false;
            // One lookup costs the same for one pod or all: fetch every pod still without keys, so
            // that the first answer of each other pod does not pay for its own.
            s.pods
                .values()
                .filter(|p| due(p))
                .map(|p| p.info.key.iface_id())
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = missing.iter().cloned().collect();
        let found = self.inner.programmer.port_keys(&ids).await?;
        let mut s = self.lock();
        let now = Instant::now();
        for pod in s.pods.values_mut() {
            let id = pod.info.key.iface_id();
            match found.get(&id) {
                Some(k) => pod.keys = Some(*k),
                None if missing.contains(&id) => pod.keys_missed = Some(now),
                None => {}
            }
        }
        Ok(())
    }

    /// Takes the pending changes as one batch of operations (deletes first). Flows whose pod has no
    /// datapath keys yet stay pending.
    fn take_batch(&self, target: &AclTarget) -> (Vec<FlowOp>, Vec<FlowId>) {
        let st = &self.inner.settings;
        let mut s = self.lock();
        let mut ops = Vec::with_capacity(s.dirty.len() + s.delete_strict.len());
        for pod in std::mem::take(&mut s.delete_pods) {
            ops.push(FlowOp::DeleteCookie {
                table: target.table,
                cookie: Cookie::pod(st.cookie_prefix, pod),
                mask: POD_MASK,
            });
        }
        for (_, (cookie, matches)) in s.delete_strict.drain() {
            ops.push(FlowOp::DeleteStrict { cookie, matches });
        }
        for (cookie, matches) in std::mem::take(&mut s.delete_stale) {
            ops.push(FlowOp::DeleteStrict { cookie, matches });
        }
        let take = s.dirty.len().min(MAX_BATCH_FLOWS);
        let dirty: Vec<FlowId> = s.dirty.iter().take(take).copied().collect();
        for id in &dirty {
            s.dirty.remove(id);
        }
        let mut written = Vec::with_capacity(dirty.len());
        for id in dirty {
            let Some(f) = s.flows.get(&id) else { continue };
            let keys = s
                .by_id
                .get(&id.pod)
                .and_then(|k| s.pods.get(k))
                .and_then(|p| p.keys);
            let Some(keys) = keys else {
                // Not on the bridge yet: try again later.
                s.dirty.insert(id);
                continue;
            };
            ops.push(FlowOp::Add(FlowSpec {
                cookie: Cookie::new(st.cookie_prefix, id.pod, id.priority),
                matches: flow_match(target.table, keys, &id),
                idle_timeout: st.idle_timeout(f.ttl),
                hard_timeout: st.hard_timeout(),
                action: match f.verdict {
                    Verdict::Allow => FlowAction::Continue(target.allow.clone()),
                    Verdict::Deny => FlowAction::Drop,
                },
            }));
            written.push(id);
        }
        (ops, written)
    }

    /// Writes batches until nothing writable is left.
    async fn flush_locked(&self) -> Result<(), EngineError> {
        if self.lock().prefetch_keys {
            self.ensure_keys().await?;
        }
        while self.has_pending_changes() {
            if self.write_batch().await? == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Writes one batch; returns how many operations it held.
    async fn write_batch(&self) -> Result<usize, EngineError> {
        let target = self.ensure_target().await?;
        self.ensure_keys().await?;
        let (ops, written) = self.take_batch(&target);
        if ops.is_empty() {
            return Ok(0);
        }
        let m = &self.inner.metrics;
        let started = Instant::now();
        let result = self.inner.programmer.apply(&ops).await;
        m.batch_latency.observe(started.elapsed());
        Metrics::add(&m.batches, 1);
        let mut s = self.lock();
        match result {
            Ok(()) => {
                for id in &written {
                    if let Some(f) = s.flows.get_mut(id) {
                        f.installed = true;
                    }
                }
                Metrics::add(&m.flows_installed, written.len());
                Ok(ops.len())
            }
            Err(e) => {
                Metrics::add(&m.batch_errors, 1);
                // Everything goes again with the next batch; deletes too, as far as they are known.
                for id in written {
                    if s.flows.contains_key(&id) {
                        s.dirty.insert(id);
                    }
                }
                for op in ops {
                    match op {
                        FlowOp::DeleteCookie { cookie, .. } => s.delete_pods.push(cookie.pod_id()),
                        FlowOp::DeleteStrict { cookie, matches } => {
                            s.delete_stale.push((cookie, matches));
                        }
                        FlowOp::Add(_) => {}
                    }
                }
                Err(e.into())
            }
        }
    }

    /// Full reconcile against `dump-flows`: removes our flows that are not wanted (left by an earlier run,
    /// or of a pod that changed ports), reinstalls wanted flows that are missing, and forgets those that
    /// are missing because they expired.
    pub async fn reconcile(&self) -> Result<(), EngineError> {
        let _guard = self.inner.apply_lock.lock().await;
        self.rediscover_if_wiped().await?;
        let target = self.ensure_target().await?;
        // Pods with flows but no keys yet get theirs first, so their flows are comparable.
        self.ensure_keys().await?;
        self.flush_locked().await?;
        let prefix = self.inner.settings.cookie_prefix;
        let dumped = self.inner.programmer.dump(prefix).await?;
        let now = SystemTime::now();
        let m = &self.inner.metrics;
        {
            let mut s = self.lock();
            let mut present: HashSet<FlowId> = HashSet::with_capacity(dumped.len());
            let mut stale = Vec::new();
            for f in &dumped {
                let id = f.fields.as_ref().and_then(|fields| {
                    let priority = f.priority?;
                    let m = fields.flow_match(f.table, priority)?;
                    Some((
                        FlowId {
                            pod: f.cookie.pod_id(),
                            priority,
                            src: m.src,
                            dst: m.dst,
                            l4: m.l4,
                        },
                        m,
                    ))
                });
                let Some((id, matches)) = id else {
                    tracing::warn!(cookie = %f.cookie, table = f.table, "flow with our cookie prefix in a shape we do not write; leaving it");
                    continue;
                };
                let keys = s
                    .by_id
                    .get(&id.pod)
                    .and_then(|k| s.pods.get(k))
                    .and_then(|p| p.keys);
                let wanted = s.flows.contains_key(&id)
                    && f.table == target.table
                    && id.priority == f.cookie.priority()
                    && keys.is_some_and(|k| {
                        k.metadata == matches.metadata && k.reg14 == matches.reg14
                    });
                if wanted {
                    present.insert(id);
                } else {
                    stale.push((f.cookie, matches));
                }
            }
            Metrics::add(&m.flows_removed, stale.len());
            s.delete_stale.extend(stale);
            let missing: Vec<(FlowId, bool)> = s
                .flows
                .iter()
                .filter(|(id, f)| f.installed && !present.contains(id))
                .map(|(id, f)| (*id, f.expires <= now + EXPIRY_SLACK))
                .collect();
            for (id, expired) in missing {
                if expired {
                    s.flows.remove(&id);
                    Metrics::add(&m.flows_expired, 1);
                } else {
                    s.mark_dirty(id);
                    Metrics::add(&m.flows_reinstalled, 1);
                }
            }
        }
        Metrics::add(&m.reconciles, 1);
        self.flush_locked().await
    }

    /// Applies one monitor event; returns whether something must be written.
    fn on_flow_event(&self, event: FlowEvent) -> bool {
        let FlowEvent::Deleted(reason, f) = event else {
            return false;
        };
        let prefix = self.inner.settings.cookie_prefix;
        if f.cookie.prefix() != prefix {
            return false;
        }
        let Some(m) = f
            .fields
            .as_ref()
            .and_then(|fields| fields.flow_match(f.table, f.cookie.priority()))
        else {
            return false;
        };
        let id = FlowId {
            pod: f.cookie.pod_id(),
            priority: m.priority,
            src: m.src,
            dst: m.dst,
            l4: m.l4,
        };
        let mut s = self.lock();
        let Some(flow) = s.flows.get(&id) else {
            // Our own delete, or a flow we no longer want.
            return false;
        };
        let keys_match = s
            .by_id
            .get(&id.pod)
            .and_then(|k| s.pods.get(k))
            .and_then(|p| p.keys)
            .is_some_and(|k| k.metadata == m.metadata && k.reg14 == m.reg14);
        if !keys_match {
            return false;
        }
        let metrics = &self.inner.metrics;
        let due = flow.expires <= SystemTime::now() + EXPIRY_SLACK;
        match reason {
            RemovedReason::Hard => {
                s.flows.remove(&id);
                Metrics::add(&metrics.flows_expired, 1);
                false
            }
            RemovedReason::Idle if due => {
                s.flows.remove(&id);
                Metrics::add(&metrics.flows_expired, 1);
                false
            }
            // Idle before our record says (refreshed meanwhile), or deleted by someone else: write again.
            RemovedReason::Idle | RemovedReason::Delete | RemovedReason::Other => {
                s.mark_dirty(id);
                Metrics::add(&metrics.flows_reinstalled, 1);
                if reason != RemovedReason::Idle && !s.rediscover {
                    s.rediscover = true;
                    self.inner.wiped.notify_one();
                }
                true
            }
        }
    }

    /// Runs the engine until the future is dropped: the flusher, the flow monitor (restarted with
    /// backoff) and the periodic reconcile.
    pub async fn run(self) {
        tokio::join!(self.flusher(), self.monitor_loop(), self.reconcile_loop());
    }

    async fn flusher(&self) {
        let mut failures = 0u32;
        loop {
            if failures > 0 {
                // OVS refuses or is away: back off (events keep accumulating into the next batch).
                tokio::time::sleep((RETRY * 2u32.pow(failures.min(4))).min(RETRY_MAX)).await;
            }
            let retry = self.has_pending_changes();
            if retry {
                // Something could not be written (no keys, no table, or an error): try again soon,
                // or at once when something new arrives.
                let _ = tokio::time::timeout(RETRY, self.inner.wake.notified()).await;
            } else {
                self.inner.wake.notified().await;
            }
            match self.flush().await {
                Ok(()) => failures = 0,
                // Normal until OVN has ACL flows on this node; discovery itself is rate-limited.
                Err(e @ EngineError::NoAclTable) => tracing::debug!(error = %e, "flows wait"),
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, failures, "writing flows failed; retrying");
                }
            }
        }
    }

    async fn monitor_loop(&self) {
        let mut backoff = MONITOR_BACKOFF.0;
        let mut first = true;
        loop {
            let target = match self.ensure_target().await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(error = %e, "no ACL table yet");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            let started = Instant::now();
            match self.inner.programmer.monitor(target.table).await {
                Ok(mut rx) => {
                    if !first {
                        // Events may have been missed while the monitor was down.
                        if let Err(e) = self.reconcile().await {
                            tracing::warn!(error = %e, "reconcile after monitor restart failed");
                        }
                    }
                    first = false;
                    loop {
                        let event = tokio::select! {
                            e = rx.recv() => e,
                            () = self.inner.retarget.notified() => None,
                        };
                        let Some(event) = event else { break };
                        if self.on_flow_event(event) {
                            self.inner.wake.notify_one();
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot start the flow monitor"),
            }
            Metrics::add(&self.inner.metrics.monitor_restarts, 1);
            if started.elapsed() > MONITOR_HEALTHY {
                backoff = MONITOR_BACKOFF.0;
            }
            tracing::warn!(?backoff, "flow monitor ended; restarting");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MONITOR_BACKOFF.1);
        }
    }

    async fn reconcile_loop(&self) {
        let period = self.inner.settings.reconcile_interval;
        let first = tokio::time::Instant::now() + period.min(FIRST_RECONCILE);
        let mut tick = tokio::time::interval_at(first, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.inner.wiped.notified() => {
                    // Let ovn-controller finish reinstalling its own flows before looking at them.
                    tokio::time::sleep(WIPE_SETTLE).await;
                }
            }
            if let Err(e) = self.reconcile().await {
                tracing::warn!(error = %e, "reconcile failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        egressfirewall::EgressFirewall,
        ovs::{flow, Actions, Recording},
    };
    use proptest::prelude::*;
    use serde_json::json;
    use tapd::Answer;

    const NS: &str = "ns1";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn target() -> AclTarget {
        AclTarget {
            table: 46,
            allow: Actions::new("load:0x1->NXM_NX_XXREG0[97],resubmit(,47)").unwrap(),
        }
    }

    fn rules(egress: serde_json::Value) -> FirewallRules {
        FirewallRules::from_egress_firewall(&EgressFirewall::inline(NS, egress).unwrap()).unwrap()
    }

    fn google_rules() -> FirewallRules {
        rules(json!([
            {"type": "Allow", "to": {"dnsName": "google.com"}},
            {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}
        ]))
    }

    fn pod(name: &str, addr: &str) -> PodInfo {
        PodInfo {
            key: PodKey::new(NS, name),
            ips: vec![ip(addr)],
            node: "node1".into(),
        }
    }

    fn answer(client: &str, qname: &str, answers: &[(&str, u32)]) -> DnsResponse {
        let answers = answers.iter().map(|(a, ttl)| Answer {
            ip: ip(a),
            ttl: *ttl,
        });
        DnsResponse::noerror(
            ip(client),
            DnsName::new(qname).unwrap(),
            Vec::new(),
            answers.collect(),
        )
    }

    /// An engine on a fake bridge where pods pod1 (reg14 2) and pod2 (reg14 3) have ports.
    fn engine() -> Engine<Recording> {
        engine_on(Recording::new(Some(target())), EngineSettings::default())
    }

    fn engine_on(fake: Recording, settings: EngineSettings) -> Engine<Recording> {
        for (iface, reg14) in [("ns1_pod1", 2), ("ns1_pod2", 3)] {
            fake.set_port(iface, PortKeys { metadata: 1, reg14 });
        }
        let e = Engine::new(settings, fake);
        e.set_rules(google_rules());
        e
    }

    fn adds(batch: &[FlowOp]) -> Vec<&FlowSpec> {
        batch
            .iter()
            .filter_map(|op| match op {
                FlowOp::Add(f) => Some(f),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn an_answer_becomes_one_flow_per_ip() {
        let e = engine();
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        e.on_dns(
            answer(
                "10.244.1.5",
                "www.google.com",
                &[("142.250.1.1", 60), ("142.250.1.2", 600)],
            ),
            SystemTime::now(),
        );
        e.flush().await.unwrap();
        let flows = e.programmer().flows();
        assert_eq!(flows.len(), 2);
        let f = flows
            .iter()
            .find(|f| f.matches.dst == ip("142.250.1.2"))
            .unwrap();
        assert_eq!(f.idle_timeout, 630, "max(TTL, floor) + grace");
        assert_eq!(f.matches.priority, 11000);
        assert_eq!(
            (f.matches.table, f.matches.metadata, f.matches.reg14),
            (46, 1, 2)
        );
        assert_eq!(f.matches.src, ip("10.244.1.5"));
        assert_eq!(f.action, FlowAction::Continue(target().allow));
        assert_eq!(f.cookie.prefix(), crate::settings::DEFAULT_COOKIE_PREFIX);
        assert_eq!(f.cookie.priority(), 11000);
        let grants = e.grants(Some(&PodKey::new(NS, "pod1")), None);
        assert_eq!(grants.len(), 2);
        assert!(grants
            .iter()
            .all(|g| g.installed && g.reason.rule_index == 0));
        assert_eq!(e.metrics_snapshot().flows_installed, 2);
    }

    #[tokio::test]
    async fn a_repeated_answer_writes_nothing_a_longer_one_refreshes() {
        let e = engine();
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        let now = SystemTime::now();
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.1.1", 60)]),
            now,
        );
        e.flush().await.unwrap();
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.1.1", 60)]),
            now,
        );
        assert!(!e.has_pending_changes(), "same expiry: no rewrite");
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.1.1", 60)]),
            now + Duration::from_secs(10),
        );
        e.flush().await.unwrap();
        let batches = e.programmer().batches();
        assert_eq!(batches.len(), 2, "the later answer re-adds the flow");
        assert_eq!(adds(&batches[1]).len(), 1);
        assert_eq!(e.programmer().flows().len(), 1);
    }

    #[tokio::test]
    async fn answers_outside_the_rules_and_other_clients_get_nothing() {
        let e = engine();
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        e.on_dns(
            answer("10.244.1.5", "evilgoogle.com", &[("6.6.6.6", 60)]),
            SystemTime::now(),
        );
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("10.244.2.9", 60)]),
            SystemTime::now(),
        );
        e.on_dns(
            answer("192.0.2.1", "google.com", &[("142.250.1.1", 60)]),
            SystemTime::now(),
        );
        e.flush().await.unwrap();
        assert!(e.programmer().flows().is_empty());
        assert_eq!(
            e.metrics_snapshot().pending,
            0,
            "client outside the pod subnets is not held"
        );
    }

    #[tokio::test]
    async fn an_answer_before_its_pod_is_held_then_applied() {
        let e = engine();
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.1.1", 60)]),
            SystemTime::now(),
        );
        e.flush().await.unwrap();
        assert!(e.programmer().flows().is_empty());
        assert_eq!(e.metrics_snapshot().pending, 1);
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        e.flush().await.unwrap();
        assert_eq!(e.programmer().flows().len(), 1);
        let m = e.metrics_snapshot();
        assert_eq!((m.pending, m.pending_held, m.pending_dropped), (0, 1, 0));
    }

    #[tokio::test]
    async fn the_pending_buffer_is_bounded_in_count_and_age() {
        let e = engine();
        let t0 = SystemTime::now();
        for i in 0..PENDING_MAX + 5 {
            let client = format!("10.244.{}.{}", 2 + i / 250, 1 + i % 250);
            e.on_dns(answer(&client, "google.com", &[("142.250.1.1", 60)]), t0);
        }
        let m = e.metrics_snapshot();
        assert_eq!((m.pending, m.pending_dropped), (PENDING_MAX as u64, 5));
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.1.1", 60)]),
            t0 + PENDING_MAX_AGE + Duration::from_secs(1),
        );
        let m = e.metrics_snapshot();
        assert_eq!(m.pending, 1, "everything older than the age limit went");
        assert_eq!(m.pending_dropped, PENDING_MAX as u64 + 5);
    }

    #[tokio::test]
    async fn a_removed_pod_loses_its_flows_with_one_delete() {
        let e = engine();
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        e.upsert_pod(pod("pod2", "10.244.1.6"));
        let now = SystemTime::now();
        e.on_dns(
            answer(
                "10.244.1.5",
                "google.com",
                &[("142.250.1.1", 60), ("142.250.1.2", 60)],
            ),
            now,
        );
        e.on_dns(
            answer("10.244.1.6", "google.com", &[("142.250.1.1", 60)]),
            now,
        );
        e.flush().await.unwrap();
        assert_eq!(e.programmer().flows().len(), 3);
        e.remove_pod(&PodKey::new(NS, "pod1"));
        e.flush().await.unwrap();
        let last = e.programmer().batches().pop().unwrap();
        assert!(matches!(
            last.as_slice(),
            [FlowOp::DeleteCookie {
                mask: flow::POD_MASK,
                ..
            }]
        ));
        let left = e.programmer().flows();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].matches.reg14, 3);
        assert!(e
            .grants(None, Some(NS))
            .iter()
            .all(|g| g.key.pod.name == "pod2"));
    }

    #[tokio::test]
    async fn new_rules_recompute_the_namespace_from_remembered_answers() {
        let e = engine();
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        let now = SystemTime::now();
        e.on_dns(
            answer("10.244.1.5", "www.google.com", &[("142.250.1.1", 60)]),
            now,
        );
        e.on_dns(
            answer("10.244.1.5", "example.com", &[("93.184.216.34", 60)]),
            now,
        );
        e.flush().await.unwrap();
        assert_eq!(e.programmer().flows().len(), 1);
        e.set_rules(rules(json!([
            {"type": "Allow", "to": {"dnsName": "example.com"}, "ports": [{"protocol": "TCP", "port": 443}]},
            {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}
        ])));
        e.flush().await.unwrap();
        let flows = e.programmer().flows();
        assert_eq!(flows.len(), 1, "google.com's flow went, example.com's came");
        assert_eq!(flows[0].matches.dst, ip("93.184.216.34"));
        assert_eq!(flows[0].matches.l4.unwrap().port, 443);
        e.remove_rules(NS);
        e.flush().await.unwrap();
        assert!(e.programmer().flows().is_empty());
    }

    #[tokio::test]
    async fn changes_during_a_batch_are_coalesced_into_the_next() {
        let fake = Recording::with_delay(Some(target()), Duration::from_millis(100));
        let e = engine_on(fake, EngineSettings::default());
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        let run = tokio::spawn(e.clone().run());
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.0.1", 60)]),
            SystemTime::now(),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        for i in 2..=50 {
            e.on_dns(
                answer(
                    "10.244.1.5",
                    "google.com",
                    &[(&format!("142.250.0.{i}"), 60)],
                ),
                SystemTime::now(),
            );
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        run.abort();
        let batches = e.programmer().batches();
        assert_eq!(e.programmer().flows().len(), 50);
        assert_eq!(
            batches.len(),
            2,
            "one batch in flight, everything else in the next"
        );
        assert_eq!(adds(&batches[1]).len(), 49);
    }

    #[tokio::test]
    async fn monitor_events_forget_expired_and_reinstall_deleted_flows() {
        let settings = EngineSettings {
            idle_floor: Duration::ZERO,
            idle_grace: Duration::ZERO,
            ..EngineSettings::default()
        };
        let e = engine_on(Recording::new(Some(target())), settings);
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        let run = tokio::spawn(e.clone().run());
        let now = SystemTime::now();
        e.on_dns(
            answer(
                "10.244.1.5",
                "google.com",
                &[("142.250.0.1", 1), ("142.250.0.2", 3600)],
            ),
            now,
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(e.programmer().flows().len(), 2);
        // OVS expires the 1 s flow; someone deletes the other one.
        e.programmer()
            .remove_where(RemovedReason::Idle, |f| f.matches.dst == ip("142.250.0.1"));
        e.programmer().remove_where(RemovedReason::Delete, |f| {
            f.matches.dst == ip("142.250.0.2")
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let flows = e.programmer().flows();
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].matches.dst, ip("142.250.0.2"), "reinstalled");
        let grants = e.grants(None, None);
        assert_eq!(grants.len(), 1, "the expired grant is forgotten");
        let m = e.metrics_snapshot();
        assert_eq!((m.flows_expired, m.flows_reinstalled), (1, 1));
        // A dead monitor is restarted (and counted).
        e.programmer().kill_monitors();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(e.metrics_snapshot().monitor_restarts >= 1);
        e.programmer().remove_where(RemovedReason::Delete, |_| true);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(e.programmer().flows().len(), 1, "the new monitor works");
        run.abort();
    }

    #[tokio::test]
    async fn after_a_wipe_the_flows_follow_a_renumbered_acl_table() {
        let e = engine();
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        let run = tokio::spawn(e.clone().run());
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.0.1", 300)]),
            SystemTime::now(),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        // ovn-controller is upgraded: it wipes br-int and its ACL stage is now table 48.
        let moved = AclTarget {
            table: 48,
            allow: Actions::resubmit(49),
        };
        e.programmer().set_acl(Some(moved.clone()));
        e.programmer().remove_where(RemovedReason::Delete, |_| true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            e.programmer().flows()[0].matches.table,
            46,
            "reinstalled at once"
        );
        tokio::time::sleep(WIPE_SETTLE + Duration::from_millis(300)).await;
        let flows = e.programmer().flows();
        assert_eq!(flows.len(), 1, "{flows:?}");
        assert_eq!(flows[0].matches.table, 48);
        assert_eq!(flows[0].action, FlowAction::Continue(moved.allow));
        // The monitor follows: a wipe of the new table is repaired too.
        e.programmer().remove_where(RemovedReason::Delete, |_| true);
        tokio::time::sleep(Duration::from_millis(300)).await;
        run.abort();
        assert_eq!(e.programmer().flows().len(), 1);
    }

    #[tokio::test]
    async fn a_failed_batch_is_counted_and_written_again_after_a_pause() {
        let e = engine();
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        e.programmer().fail_next(1);
        let run = tokio::spawn(e.clone().run());
        let now = SystemTime::now();
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.0.1", 300)]),
            now,
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(e.programmer().flows().is_empty());
        assert_eq!(e.metrics_snapshot().batch_errors, 1);
        tokio::time::sleep(RETRY * 2 + Duration::from_millis(500)).await;
        run.abort();
        assert_eq!(e.programmer().flows().len(), 1);
        assert!(e.grants(None, None)[0].installed);
    }

    #[tokio::test]
    async fn a_hard_timeout_ends_the_grant_even_before_its_ttl() {
        let capped = EngineSettings {
            hard_cap: Some(Duration::from_secs(60)),
            ..EngineSettings::default()
        };
        let e = engine_on(Recording::new(Some(target())), capped);
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        let run = tokio::spawn(e.clone().run());
        let long = answer("10.244.1.5", "google.com", &[("142.250.0.1", 3600)]);
        e.on_dns(long, SystemTime::now());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(e.programmer().flows()[0].hard_timeout, Some(60));
        e.programmer().remove_where(RemovedReason::Hard, |_| true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        run.abort();
        assert!(e.programmer().flows().is_empty(), "not reinstalled");
        assert!(e.grants(None, None).is_empty());
        assert_eq!(e.metrics_snapshot().flows_expired, 1);
    }

    #[tokio::test]
    async fn reconcile_removes_stale_flows_and_keeps_wanted_ones() {
        let e = engine();
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        // An earlier run left two flows: one still wanted, one not.
        let stale_id = FlowId {
            pod: 7,
            priority: 11000,
            src: ip("10.244.1.5"),
            dst: ip("1.1.1.1"),
            l4: None,
        };
        let keys = PortKeys {
            metadata: 1,
            reg14: 2,
        };
        let mk = |pod: u16, dst: &str| {
            let id = FlowId {
                pod,
                dst: ip(dst),
                ..stale_id
            };
            FlowOp::Add(FlowSpec {
                cookie: Cookie::new(crate::settings::DEFAULT_COOKIE_PREFIX, pod, 11000),
                matches: flow_match(46, keys, &id),
                idle_timeout: 100,
                hard_timeout: None,
                action: FlowAction::Drop,
            })
        };
        e.programmer()
            .apply(&[mk(7, "1.1.1.1"), mk(7, "142.250.1.1")])
            .await
            .unwrap();
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.1.1", 60)]),
            SystemTime::now(),
        );
        e.reconcile().await.unwrap();
        let flows = e.programmer().flows();
        assert_eq!(flows.len(), 1, "no duplicate, stale one gone: {flows:?}");
        assert_eq!(flows[0].matches.dst, ip("142.250.1.1"));
        assert_ne!(
            flows[0].cookie.pod_id(),
            7,
            "replaced by the add, with this run's cookie"
        );
        assert!(matches!(flows[0].action, FlowAction::Continue(_)));
        // A wanted flow missing from the bridge comes back at the next reconcile.
        e.programmer().remove_where(RemovedReason::Delete, |_| true);
        e.reconcile().await.unwrap();
        assert_eq!(e.programmer().flows().len(), 1);
        assert_eq!(e.metrics_snapshot().flows_reinstalled, 1);
    }

    #[tokio::test]
    async fn flows_wait_for_the_pods_port() {
        let e = engine();
        e.upsert_pod(pod("pod3", "10.244.1.7"));
        e.on_dns(
            answer("10.244.1.7", "google.com", &[("142.250.1.1", 60)]),
            SystemTime::now(),
        );
        e.flush().await.unwrap();
        assert!(e.programmer().flows().is_empty());
        assert!(e.has_pending_changes());
        e.programmer().set_port(
            "ns1_pod3",
            PortKeys {
                metadata: 1,
                reg14: 9,
            },
        );
        e.flush().await.unwrap();
        assert!(
            e.programmer().flows().is_empty(),
            "not looked for again at once"
        );
        for p in e.lock().pods.values_mut() {
            p.keys_missed = p.keys_missed.map(|t| t - KEYS_RETRY);
        }
        e.flush().await.unwrap();
        assert_eq!(e.programmer().flows()[0].matches.reg14, 9);
    }

    #[tokio::test]
    async fn a_new_pods_keys_are_fetched_before_its_first_answer() {
        let e = engine();
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        e.upsert_pod(pod("pod2", "10.244.1.6"));
        e.flush().await.unwrap();
        let s = e.lock();
        assert!(
            s.pods.values().all(|p| p.keys.is_some()),
            "one lookup for both"
        );
        assert!(!s.prefetch_keys);
    }

    #[tokio::test]
    async fn pods_of_other_nodes_get_nothing() {
        let e = engine();
        e.set_node("node2");
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.1.1", 60)]),
            SystemTime::now(),
        );
        e.flush().await.unwrap();
        assert!(e.programmer().flows().is_empty());
    }

    #[tokio::test]
    async fn without_an_acl_table_nothing_is_written() {
        let e = engine();
        e.programmer().set_acl(None);
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.1.1", 60)]),
            SystemTime::now(),
        );
        assert!(matches!(e.flush().await, Err(EngineError::NoAclTable)));
        e.programmer().set_acl(Some(target()));
        assert!(
            matches!(e.flush().await, Err(EngineError::NoAclTable)),
            "the bridge is not dumped again before DISCOVERY_RETRY"
        );
        e.lock().discovery_failed = Some(Instant::now() - DISCOVERY_RETRY);
        e.flush().await.unwrap();
        assert_eq!(e.programmer().flows().len(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever name a pod resolves (any printable ASCII a DnsName admits, shell metacharacters
        /// included), the ovs-ofctl input holds only fixed keywords, numbers and addresses.
        #[test]
        fn no_string_from_dns_reaches_ovs_ofctl(label in "[!-~&&[^.]]{1,40}", a in any::<[u8; 4]>()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let dst = IpAddr::from([1, a[1], a[2], a[3]]);
            // The same answer under a hostile name and under a plain one must give the same bytes.
            let text = |qname: &str| {
                let e = engine();
                e.upsert_pod(pod("pod1", "10.244.1.5"));
                let mut resp = answer("10.244.1.5", "google.com", &[]);
                resp.qname = DnsName::new(qname).unwrap();
                resp.answers = vec![Answer { ip: dst, ttl: 60 }];
                e.on_dns(resp, SystemTime::now());
                rt.block_on(e.flush()).unwrap();
                flow::render_batch(&e.programmer().batches().concat())
            };
            let hostile = text(&format!("{label}.google.com"));
            prop_assert_eq!(&hostile, &text("www.google.com"));
            prop_assert_eq!(hostile.lines().count(), 1);
            let body = hostile.strip_prefix("add ").unwrap().trim_end();
            let allowed = |c: char| c.is_ascii_alphanumeric() || ",=:._-[]()>".contains(c);
            prop_assert!(body.chars().all(allowed), "{}", body);
        }
    }
}

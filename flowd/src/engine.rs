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
        flow::POD_MASK, Cookie, FlowAction, FlowEvent, FlowMatch, FlowOp, FlowProgrammer, FlowSpec,
        LearnError, OvsError, PortKeys, RemovedReason, Template,
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
/// Learning the template dumps the whole bridge: while OVN's flows teach nothing yet (or a pod's switch
/// has no router port in the template), look again at most this often.
const DISCOVERY_RETRY: Duration = Duration::from_secs(5);
/// The first reconcile (which removes what an earlier run left and no longer wants) comes this soon
/// after start, when the interval is longer: time for the caches to fill (tapd replays recent answers
/// on subscribe). A daemon that knows when it is in sync may call [`Engine::reconcile`] itself.
pub const FIRST_RECONCILE: Duration = Duration::from_secs(15);
/// After a foreign wipe, the reconcile that checks OVN's tables again waits this long: ovn-controller
/// reinstalls its flows within a few hundred milliseconds of reconnecting.
pub const WIPE_SETTLE: Duration = Duration::from_secs(2);
/// After a wipe, OVN's flows are read again this often until they teach a template: ovn-controller
/// writes its flows within a few hundred milliseconds of reconnecting, and grants wait until then.
const WIPE_RETRY: Duration = Duration::from_millis(50);
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
    /// flowd cannot be sure what a flow means on this OVN: it installs nothing.
    #[error("installing nothing: {0}")]
    NoTemplate(LearnError),
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
    /// Which of the template's variants (bit `k` for variant `k`) OVS holds, as far as the engine
    /// knows: each expires on its own idle timer, and the grant lives on while any of them does.
    live: u8,
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
    /// Exact deletes for the next batch (flows no longer wanted, every variant), and whole pods to delete.
    delete_strict: HashMap<FlowId, Vec<(Cookie, FlowMatch)>>,
    delete_pods: Vec<u16>,
    pending: VecDeque<(DnsResponse, SystemTime)>,
    /// Deletes found by a reconcile (not cancelled when the same flow is wanted again: its add follows).
    delete_stale: Vec<(Cookie, FlowMatch)>,
    template: Option<Template>,
    local_subnets: Vec<IpNet>,
    node: Option<String>,
    /// Why learning the template last failed (shown by readiness); `None` once it succeeds.
    learn_failed: Option<LearnError>,
    /// When the template was last learned (or tried): every try dumps the whole bridge.
    learned_at: Option<Instant>,
    /// A pod's switch has no router port in the template: learn it again (rate-limited).
    relearn: bool,
    /// New pods arrived: look up their datapath keys before their first answer needs them.
    prefetch_keys: bool,
    /// Someone deleted our flows (ovn-controller reconnecting, maybe upgraded): OVN's tables are read
    /// again before anything is written (every [`WIPE_RETRY`] until they teach a template), and a
    /// reconcile follows [`WIPE_SETTLE`] later.
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

    fn keys(&self, pod: u16) -> Option<PortKeys> {
        self.by_id
            .get(&pod)
            .and_then(|k| self.pods.get(k))
            .and_then(|p| p.keys)
    }

    /// The exact deletes of every variant OVS may hold of a flow with this verdict.
    fn deletes(&self, id: FlowId, verdict: Verdict, prefix: u32) -> Vec<(Cookie, FlowMatch)> {
        let (Some(template), Some(keys)) = (self.template.as_ref(), self.keys(id.pod)) else {
            return Vec::new();
        };
        let cookie = Cookie::new(prefix, id.pod, id.priority);
        physical(template, keys, &id, verdict)
            .into_iter()
            .flatten()
            .map(|(m, _)| (cookie, m))
            .collect()
    }

    /// Forgets a flow and, when OVS may hold it, queues its exact delete.
    fn drop_flow(&mut self, id: FlowId, prefix: u32) {
        self.dirty.remove(&id);
        if let Some(f) = self.flows.remove(&id) {
            let deletes = self.deletes(id, f.verdict, prefix);
            if !deletes.is_empty() {
                self.delete_strict.insert(id, deletes);
            }
        }
    }

    /// Which variant of the template a flow read back from OVS is, for the flow the engine holds under
    /// `id`; `None` when it has a shape the template does not produce (then it is not ours to keep).
    fn variant_of(&self, id: &FlowId, m: &FlowMatch) -> Option<usize> {
        let (template, keys, flow) = (
            self.template.as_ref()?,
            self.keys(id.pod)?,
            self.flows.get(id)?,
        );
        physical(template, keys, id, flow.verdict)?
            .iter()
            .position(|(want, _)| want == m)
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

/// The OVS flows of one grant: one per variant of the template (OVN's own allow ACL shapes), each in
/// the EF's table and tier, for traffic of this pod leaving its switch toward the router. `None` while
/// the template knows no router port for the pod's switch.
fn physical(
    template: &Template,
    keys: PortKeys,
    id: &FlowId,
    verdict: Verdict,
) -> Option<Vec<(FlowMatch, FlowAction)>> {
    let outport = template.uplink(keys.metadata)?;
    Some(
        template
            .variants(verdict == Verdict::Allow)
            .into_iter()
            .map(|(hint, action)| {
                let m = FlowMatch {
                    table: template.table,
                    priority: id.priority,
                    tier: template.tier,
                    hint,
                    metadata: keys.metadata,
                    reg14: keys.reg14,
                    outport: Some(outport),
                    src: id.src,
                    dst: id.dst,
                    l4: id.l4,
                };
                (m, action)
            })
            .collect(),
    )
}

/// The engine's identity of a flow read back from OVS.
fn flow_id(cookie: Cookie, m: &FlowMatch) -> FlowId {
    FlowId {
        pod: cookie.pod_id(),
        priority: m.priority,
        src: m.src,
        dst: m.dst,
        l4: m.l4,
    }
}

/// Bit mask with one bit per variant.
fn all_variants(n: usize) -> u8 {
    u8::try_from((1u16 << n.min(8)) - 1).unwrap_or(u8::MAX)
}

impl<P: FlowProgrammer> Engine<P> {
    /// A new engine. `settings` should have passed [`EngineSettings::validate`].
    pub fn new(settings: EngineSettings, programmer: P) -> Self {
        let policy = settings.policy();
        // The first batch learns the template from OVN's flows.
        let state = State {
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

    /// The EgressFirewall ACL table in use, as learned from OVN's flows (`None` until then).
    pub fn acl_table(&self) -> Option<u8> {
        self.lock().template.as_ref().map(|t| t.table)
    }

    /// The template flows are written with (`None` until learned).
    pub fn template(&self) -> Option<Template> {
        self.lock().template.clone()
    }

    /// Why nothing can be installed, while grants wait for a template OVN's flows cannot teach: the
    /// daemon is not ready then. `None` when there is a template, or nothing waits for one.
    pub fn blocked(&self) -> Option<String> {
        let s = self.lock();
        if s.template.is_some() || s.flows.is_empty() {
            return None;
        }
        s.learn_failed.as_ref().map(ToString::to_string)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Counters and gauges, copied.
    pub fn metrics_snapshot(&self) -> MetricsSnapshot {
        let mut m = self.inner.metrics.snapshot();
        let s = self.lock();
        m.template_learned = u64::from(s.template.is_some());
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
                if f.verdict != g.verdict {
                    // The rule's verdict changed: the other verdict's variants go first.
                    let old = f.verdict;
                    f.verdict = g.verdict;
                    let deletes = s.deletes(id, old, self.inner.settings.cookie_prefix);
                    s.delete_stale.extend(deletes);
                }
                let Some(f) = s.flows.get_mut(&id) else {
                    return;
                };
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
                        live: 0,
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

    async fn ensure_template(&self) -> Result<Template, EngineError> {
        {
            let s = self.lock();
            let recent = s
                .learned_at
                .is_some_and(|at| at.elapsed() < DISCOVERY_RETRY);
            match (&s.template, &s.learn_failed) {
                // After a wipe nothing is written before OVN's flows have been read again.
                _ if s.rediscover => {}
                (Some(t), _) if !s.relearn || recent => return Ok(t.clone()),
                (None, Some(e)) if recent => return Err(EngineError::NoTemplate(e.clone())),
                _ => {}
            }
        }
        self.learn().await
    }

    /// Learns the template from OVN's flows now. A template that differs from the one in use (an
    /// upgrade renumbered the tables, or changed the pipeline) moves every flow: each is written again
    /// in the new shape, and the old shapes go in the same bundle or at the next reconcile. After a
    /// wipe the ports may be new too: every pod's keys are looked up again.
    async fn learn(&self) -> Result<Template, EngineError> {
        let st = &self.inner.settings;
        let after_wipe = self.lock().rediscover;
        let learned = self
            .inner
            .programmer
            .learn_template(st.priority_base, st.acl_table)
            .await?;
        let found = {
            let mut s = self.lock();
            s.relearn = false;
            s.learned_at = Some(Instant::now());
            match learned {
                Ok(t) => {
                    if s.learn_failed.take().is_some() || s.template.is_none() {
                        tracing::info!(template = %t, "learned from OVN's flows what a grant must look like");
                    }
                    t
                }
                Err(e) => {
                    let changed = s.learn_failed.as_ref() != Some(&e);
                    if changed {
                        tracing::warn!(reason = %e, "cannot learn from OVN's flows what a grant must look like; installing nothing");
                    }
                    Metrics::add(&self.inner.metrics.template_failures, 1);
                    s.learn_failed = Some(e.clone());
                    // A template learned before stays valid until OVN's flows show another one; but
                    // not after a wipe, while ovn-controller may still be writing another OVN's flows.
                    return match &s.template {
                        Some(t) if !after_wipe => Ok(t.clone()),
                        _ => Err(EngineError::NoTemplate(e)),
                    };
                }
            }
        };
        if after_wipe {
            self.fetch_keys(true).await?;
        }
        let mut s = self.lock();
        s.rediscover = false;
        if s.template.as_ref() == Some(&found) {
            return Ok(found);
        }
        let moved = s.template.is_some();
        if moved {
            tracing::warn!(template = %found, "OVN's EgressFirewall pipeline changed; moving every flow");
            // The old shapes: exact deletes now, while the old template still says what they were.
            let prefix = st.cookie_prefix;
            let ids: Vec<(FlowId, Verdict)> =
                s.flows.iter().map(|(id, f)| (*id, f.verdict)).collect();
            for (id, verdict) in ids {
                let deletes = s.deletes(id, verdict, prefix);
                s.delete_stale.extend(deletes);
            }
        }
        s.template = Some(found.clone());
        let all: Vec<FlowId> = s.flows.keys().copied().collect();
        for id in all {
            s.mark_dirty(id);
        }
        s.delete_pods.clear();
        drop(s);
        if moved {
            self.inner.retarget.notify_one();
        }
        Ok(found)
    }

    /// Fetches datapath keys for pods with dirty flows and no keys yet.
    async fn ensure_keys(&self) -> Result<(), EngineError> {
        self.fetch_keys(false).await
    }

    /// Looks up datapath keys: of pods that need them (`all` false), or of every pod, when ports may
    /// have been recreated under the same iface-id (a wipe, a reconcile). A pod whose keys changed gets
    /// its flows written again with the new keys, and the old ones deleted.
    async fn fetch_keys(&self, all: bool) -> Result<(), EngineError> {
        let due = |p: &PodEntry| {
            all || p.keys.is_none() && p.keys_missed.is_none_or(|t| t.elapsed() >= KEYS_RETRY)
        };
        let missing: HashSet<String> = {
            let mut s = self.lock();
            let needed = all
                || s.prefetch_keys
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
        let mut moved = Vec::new();
        for pod in s.pods.values_mut() {
            let id = pod.info.key.iface_id();
            match found.get(&id) {
                Some(k) => {
                    if pod.keys.is_some_and(|old| old != *k) {
                        moved.push(pod.id);
                    }
                    pod.keys = Some(*k);
                }
                // Keep the keys of a port that went for now (a pod being torn down); its flows go with
                // the pod.
                None if missing.contains(&id) => pod.keys_missed = Some(now),
                None => {}
            }
        }
        if !moved.is_empty() {
            tracing::info!(
                pods = moved.len(),
                "pods' OVS ports were recreated; moving their flows"
            );
            // The old ports' flows: by cookie, in one delete per pod, before the new ones.
            s.delete_pods.extend(&moved);
            let ids: Vec<FlowId> = s
                .flows
                .keys()
                .filter(|f| moved.contains(&f.pod))
                .copied()
                .collect();
            for id in ids {
                s.mark_dirty(id);
            }
        }
        Ok(())
    }

    /// Takes the pending changes as one batch of operations (deletes first). Flows whose pod has no
    /// datapath keys, or whose switch no router port in the template, yet stay pending.
    fn take_batch(&self, template: &Template) -> (Vec<FlowOp>, Vec<FlowId>) {
        let st = &self.inner.settings;
        let mut s = self.lock();
        let mut ops = Vec::with_capacity(s.dirty.len() + s.delete_strict.len());
        for pod in std::mem::take(&mut s.delete_pods) {
            ops.push(FlowOp::DeleteCookie {
                table: template.table,
                cookie: Cookie::pod(st.cookie_prefix, pod),
                mask: POD_MASK,
            });
        }
        for (_, deletes) in s.delete_strict.drain() {
            ops.extend(
                deletes
                    .into_iter()
                    .map(|(cookie, matches)| FlowOp::DeleteStrict { cookie, matches }),
            );
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
            let flows = s
                .keys(id.pod)
                .map(|keys| (keys, physical(template, keys, &id, f.verdict)));
            let flows = match flows {
                Some((_, Some(flows))) => flows,
                Some((keys, None)) => {
                    // The template knows no router port for this switch yet: learn again, later.
                    if !s.relearn {
                        tracing::warn!(metadata = keys.metadata, "no port toward the router found on the pod's logical switch; its grants wait");
                    }
                    s.relearn = true;
                    s.dirty.insert(id);
                    continue;
                }
                None => {
                    // Not on the bridge yet: try again later.
                    s.dirty.insert(id);
                    continue;
                }
            };
            let cookie = Cookie::new(st.cookie_prefix, id.pod, id.priority);
            for (matches, action) in flows {
                ops.push(FlowOp::Add(FlowSpec {
                    cookie,
                    matches,
                    idle_timeout: st.idle_timeout(f.ttl),
                    hard_timeout: st.hard_timeout(),
                    action,
                }));
            }
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
        let template = self.ensure_template().await?;
        self.ensure_keys().await?;
        let (ops, written) = self.take_batch(&template);
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
                        f.live = all_variants(template.variants(f.verdict == Verdict::Allow).len());
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
    /// of a pod that changed ports, or in a shape the template no longer produces), reinstalls wanted
    /// flows that are missing, and forgets those that are missing because they expired.
    pub async fn reconcile(&self) -> Result<(), EngineError> {
        let _guard = self.inner.apply_lock.lock().await;
        let template = self.ensure_template().await?;
        // Every pod's keys, fresh (a port recreated under the same iface-id has new ones), so that
        // flows are compared with the ports as they are now.
        self.fetch_keys(true).await?;
        self.flush_locked().await?;
        let prefix = self.inner.settings.cookie_prefix;
        let dumped = self.inner.programmer.dump(prefix).await?;
        let now = SystemTime::now();
        let m = &self.inner.metrics;
        {
            let mut s = self.lock();
            // Per flow, the variants OVS holds.
            let mut present: HashMap<FlowId, u8> = HashMap::with_capacity(dumped.len());
            let mut stale = Vec::new();
            for f in &dumped {
                let Some((id, matches)) = f.fields.as_ref().and_then(|fields| {
                    let priority = f.priority?;
                    let m = fields.flow_match(f.table, priority)?;
                    Some((flow_id(f.cookie, &m), m))
                }) else {
                    tracing::warn!(cookie = %f.cookie, table = f.table, "flow with our cookie prefix in a shape we do not write; leaving it");
                    continue;
                };
                let variant = (id.priority == f.cookie.priority())
                    .then(|| s.variant_of(&id, &matches))
                    .flatten();
                match variant {
                    Some(k) => *present.entry(id).or_default() |= 1 << k,
                    None => stale.push((f.cookie, matches)),
                }
            }
            Metrics::add(&m.flows_removed, stale.len());
            s.delete_stale.extend(stale);
            let mut reinstall = Vec::new();
            let mut expired = Vec::new();
            for (id, f) in s.flows.iter_mut().filter(|(_, f)| f.installed) {
                let held = present.get(id).copied().unwrap_or(0);
                let all = all_variants(template.variants(f.verdict == Verdict::Allow).len());
                if held == all {
                    continue;
                }
                if f.expires > now + EXPIRY_SLACK {
                    reinstall.push(*id);
                } else if held == 0 {
                    expired.push(*id);
                } else {
                    // Past its answer, some variants idled out; the rest still carry traffic.
                    f.live = held;
                }
            }
            for id in expired {
                s.flows.remove(&id);
                Metrics::add(&m.flows_expired, 1);
            }
            for id in reinstall {
                s.mark_dirty(id);
                Metrics::add(&m.flows_reinstalled, 1);
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
        let id = flow_id(f.cookie, &m);
        let mut s = self.lock();
        // Our own delete, a flow we no longer want, or a shape (old template, old port) not ours now.
        let Some(variant) = s.variant_of(&id, &m) else {
            return false;
        };
        let Some(flow) = s.flows.get_mut(&id) else {
            return false;
        };
        let metrics = &self.inner.metrics;
        let due = flow.expires <= SystemTime::now() + EXPIRY_SLACK;
        let timed_out = match reason {
            RemovedReason::Hard => true,
            RemovedReason::Idle => due,
            RemovedReason::Delete | RemovedReason::Other => false,
        };
        if timed_out {
            // This variant's own timer ran out; the grant lives while another variant does.
            flow.live &= !(1 << variant);
            if flow.live == 0 {
                s.flows.remove(&id);
                Metrics::add(&metrics.flows_expired, 1);
            }
            return false;
        }
        // Idle before our record says (refreshed meanwhile), or deleted by someone else: write again.
        s.mark_dirty(id);
        Metrics::add(&metrics.flows_reinstalled, 1);
        if reason != RemovedReason::Idle && !s.rediscover {
            s.rediscover = true;
            self.inner.wiped.notify_one();
        }
        true
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
                // or at once when something new arrives; very soon while a wipe has just happened.
                let period = if self.lock().rediscover {
                    WIPE_RETRY
                } else {
                    RETRY
                };
                let _ = tokio::time::timeout(period, self.inner.wake.notified()).await;
            } else {
                self.inner.wake.notified().await;
            }
            match self.flush().await {
                Ok(()) => failures = 0,
                // Normal until OVN has ACL flows on this node; discovery itself is rate-limited.
                Err(e @ EngineError::NoTemplate(_)) => tracing::debug!(error = %e, "flows wait"),
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
            let target = match self.ensure_template().await {
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
        ovs::{
            flow, template,
            template::{Pipeline, Variant},
            Actions, Recording,
        },
    };
    use proptest::prelude::*;
    use serde_json::json;
    use tapd::Answer;

    const NS: &str = "ns1";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A switch without conntrack hints: one flow per grant. Node switch 1's router port is 1.
    fn target() -> Template {
        Template {
            table: 46,
            pipeline: Pipeline::Continue,
            tier: None,
            allow: vec![Variant {
                hint: None,
                actions: Actions::new("load:0x1->NXM_NX_XXREG0[97],resubmit(,47)").unwrap(),
            }],
            uplinks: [(1, 1)].into(),
        }
    }

    /// OVN 25.03's shape: tier 2, and a new and an established variant per allow grant.
    fn tiered() -> Template {
        let tiered = "load:0x1->OXM_OF_PKT_REG4[48],load:0x1->NXM_NX_XXREG0[97],resubmit(,52)";
        Template {
            table: 51,
            pipeline: Pipeline::VerdictRegister,
            tier: Some(crate::ovs::RegMatch::masked(0x8000_0000, 0xc000_0000)),
            allow: vec![
                Variant {
                    hint: Some(template::HINT_ALLOW_NEW),
                    actions: Actions::new(tiered).unwrap(),
                },
                Variant {
                    hint: Some(template::HINT_ALLOW),
                    actions: Actions::new("load:0x1->OXM_OF_PKT_REG4[48],resubmit(,52)").unwrap(),
                },
            ],
            uplinks: [(1, 1)].into(),
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

    /// Idle timeouts of exactly the answers' TTLs: no floor, no grace.
    fn quick() -> EngineSettings {
        EngineSettings {
            idle_floor: Duration::ZERO,
            idle_grace: Duration::ZERO,
            ..EngineSettings::default()
        }
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
        assert_eq!(
            f.action,
            FlowAction::Continue(target().allow[0].actions.clone())
        );
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
        let e = engine_on(Recording::new(Some(target())), quick());
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
    async fn each_variant_expires_on_its_own_and_the_grant_lives_while_one_does() {
        let e = engine_on(Recording::new(Some(tiered())), quick());
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        let run = tokio::spawn(e.clone().run());
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.0.1", 1)]),
            SystemTime::now(),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let flows = e.programmer().flows();
        let hints: Vec<_> = flows.iter().map(|f| f.matches.hint).collect();
        assert_eq!(
            hints,
            [Some(template::HINT_ALLOW_NEW), Some(template::HINT_ALLOW)],
            "{flows:?}"
        );
        assert!(flows.iter().all(|f| f.matches.tier == tiered().tier
            && f.matches.outport == Some(1)
            && f.matches.table == 51));
        // Past the answer's TTL no new connection came: OVS expires the new-connection variant while
        // the established one still carries traffic. The grant stays, and so does that flow.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        e.programmer().remove_where(RemovedReason::Idle, |f| {
            f.matches.hint == Some(template::HINT_ALLOW_NEW)
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(e.grants(None, None).len(), 1);
        e.reconcile().await.unwrap();
        let flows = e.programmer().flows();
        assert_eq!(flows.len(), 1, "not reinstalled, not removed: {flows:?}");
        assert_eq!(flows[0].matches.hint, Some(template::HINT_ALLOW));
        e.programmer().remove_where(RemovedReason::Idle, |_| true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(e.grants(None, None).is_empty());
        assert_eq!(e.metrics_snapshot().flows_expired, 1);
        run.abort();
    }

    #[tokio::test]
    async fn a_rule_turned_deny_replaces_every_allow_variant() {
        let e = engine_on(Recording::new(Some(tiered())), EngineSettings::default());
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.0.1", 300)]),
            SystemTime::now(),
        );
        e.flush().await.unwrap();
        assert_eq!(e.programmer().flows().len(), 2);
        e.set_rules(rules(
            json!([{"type": "Deny", "to": {"dnsName": "google.com"}}]),
        ));
        e.flush().await.unwrap();
        let flows = e.programmer().flows();
        assert_eq!(flows.len(), 1, "{flows:?}");
        assert_eq!(
            (
                flows[0].matches.hint,
                &flows[0].action,
                flows[0].matches.tier
            ),
            (None, &FlowAction::Drop, tiered().tier)
        );
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
        let moved = Template {
            table: 48,
            allow: vec![Variant {
                hint: None,
                actions: Actions::resubmit(49),
            }],
            ..target()
        };
        e.programmer().set_template(Some(moved.clone()));
        e.programmer().remove_where(RemovedReason::Delete, |_| true);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let flows = e.programmer().flows();
        assert_eq!(flows.len(), 1, "{flows:?}");
        assert_eq!(
            flows[0].matches.table, 48,
            "reinstalled at once, never into the old table: OVN's flows are read first"
        );
        assert!(
            e.programmer()
                .batches()
                .iter()
                .flatten()
                .filter_map(|op| match op {
                    FlowOp::Add(f) => Some(f.matches.table),
                    _ => None,
                })
                .filter(|t| *t == 46)
                .count()
                == 1,
            "one add into table 46: the first, before the wipe"
        );
        tokio::time::sleep(WIPE_SETTLE + Duration::from_millis(300)).await;
        let flows = e.programmer().flows();
        assert_eq!(flows.len(), 1, "{flows:?}");
        assert_eq!(flows[0].matches.table, 48);
        assert_eq!(flows[0].action, FlowAction::Continue(Actions::resubmit(49)));
        // The monitor follows: a wipe of the new table is repaired too.
        e.programmer().remove_where(RemovedReason::Delete, |_| true);
        tokio::time::sleep(Duration::from_millis(300)).await;
        run.abort();
        assert_eq!(e.programmer().flows().len(), 1);
    }

    #[tokio::test]
    async fn after_a_wipe_nothing_is_written_until_ovns_flows_teach_a_template_again() {
        let e = engine();
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        let run = tokio::spawn(e.clone().run());
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.0.1", 300)]),
            SystemTime::now(),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        // ovn-controller reconnects: it wipes br-int and has not written its own flows yet.
        e.programmer().set_template(None);
        e.programmer().remove_where(RemovedReason::Delete, |_| true);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            e.programmer().flows().is_empty(),
            "the old template is not trusted"
        );
        // Its flows are back, with the pod's port renumbered: the grant follows at once.
        e.programmer().set_port(
            "ns1_pod1",
            PortKeys {
                metadata: 1,
                reg14: 9,
            },
        );
        e.programmer().set_template(Some(target()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let flows = e.programmer().flows();
        run.abort();
        assert_eq!(flows.len(), 1, "{flows:?}");
        assert_eq!(flows[0].matches.reg14, 9, "the pod's new port");
    }

    #[tokio::test]
    async fn a_reconcile_moves_the_flows_of_a_recreated_port() {
        let e = engine();
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.0.1", 300)]),
            SystemTime::now(),
        );
        e.flush().await.unwrap();
        e.programmer().set_port(
            "ns1_pod1",
            PortKeys {
                metadata: 1,
                reg14: 9,
            },
        );
        e.reconcile().await.unwrap();
        let flows = e.programmer().flows();
        assert_eq!(flows.len(), 1, "{flows:?}");
        assert_eq!(flows[0].matches.reg14, 9);
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
                matches: physical(&target(), keys, &id, Verdict::Deny).unwrap()[0].0,
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
        e.programmer().set_template(None);
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.1.1", 60)]),
            SystemTime::now(),
        );
        assert!(matches!(e.flush().await, Err(EngineError::NoTemplate(_))));
        assert!(
            e.blocked().is_some(),
            "a grant waits: not ready, saying why"
        );
        assert_eq!(e.metrics_snapshot().template_failures, 1);
        e.programmer().set_template(Some(target()));
        assert!(
            matches!(e.flush().await, Err(EngineError::NoTemplate(_))),
            "the bridge is not dumped again before DISCOVERY_RETRY"
        );
        e.lock().learned_at = Some(Instant::now() - DISCOVERY_RETRY);
        e.flush().await.unwrap();
        assert_eq!(e.programmer().flows().len(), 1);
        assert_eq!(e.blocked(), None);
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

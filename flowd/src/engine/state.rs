//! The engine's synchronous core: pods and their port keys, what DNS told each pod, the flows that
//! earns them, the changes waiting for the next batch, and the diff against what OVS holds. No I/O and
//! no clock: every function that needs the time takes `now`, so tests drive it without sleeping.
//!
//! A flow leaves for one of three reasons only: its own timers ran out in OVS (the monitor says so),
//! its pod left, or its namespace's rules no longer allow it. A newer answer for the same name never
//! removes what an older one granted, and a restart removes nothing the cluster still allows: flows
//! found in `br-int` at start are adopted and judged once the Kubernetes state has been listed.

use super::{
    memory::{AnswerMemory, RecentAnswers},
    metrics::{Metrics, MetricsSnapshot},
};
use crate::{
    config::EngineSettings,
    model::{FlowKey, Grant, GrantReason, PodInfo, PodKey, PortMatch, Verdict},
    ovs::{
        flow::POD_MASK, Cookie, FlowAction, FlowEvent, FlowMatch, FlowOp, FlowSpec, LearnError,
        ParsedFlow, PortKeys, RemovedReason, Template,
    },
    policy::{self, PolicySettings},
    rules::{Destination, FirewallRule, FirewallRules},
};
use dnsflow_dnstap::DnsResponse;
use ipnet::IpNet;
use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

/// Answers for a client IP no pod is known for yet are held this many at most (a node's pods start in
/// bursts; the API watch may lag the first DNS query by a second or two)...
pub const PENDING_MAX: usize = 10_000;
/// ...and this long at most.
pub const PENDING_MAX_AGE: Duration = Duration::from_secs(30);
/// A monitor's idle/hard removal is believed when our own record says the flow is due within this.
const EXPIRY_SLACK: Duration = Duration::from_secs(2);
/// A new answer re-adds an existing flow only when it extends the expiry by at least this much.
const REFRESH_MIN: Duration = Duration::from_secs(1);
/// Flows the engine holds at most, whatever the per-pod and per-namespace caps allow: the last guard
/// (a grant beyond it is dropped and counted), ~25 MiB of state.
pub const MAX_FLOWS: usize = 500_000;
/// Flows written per bundle at most: bounds the memory of one batch (~10 MiB of text and specs); the
/// rest follows in the next batch at once.
pub const MAX_BATCH_FLOWS: usize = 20_000;
/// A pod without port keys that receives DNS has them looked for again at once, but not more often
/// than this (each look runs two tools).
const KEYS_RELOOK: Duration = Duration::from_millis(20);
/// A pod's port is looked for again after this long when it was not found (each look runs two tools).
pub(super) const KEYS_RETRY: Duration = Duration::from_secs(1);
/// A cap hit is logged at most this often per pod (it is counted every time).
const CAP_LOG_PERIOD: Duration = Duration::from_secs(60);

/// Identity of a flow inside the engine: [`FlowKey`] with the pod as its 16-bit id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId {
    pub pod: u16,
    pub priority: u16,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: Option<PortMatch>,
}

impl FlowId {
    /// The engine's identity of a flow read back from OVS.
    fn of(cookie: Cookie, m: &FlowMatch) -> Self {
        Self {
            pod: cookie.pod_id(),
            priority: m.priority,
            src: m.src,
            dst: m.dst,
            l4: m.l4,
        }
    }
}

#[derive(Clone, Debug)]
struct FlowState {
    verdict: Verdict,
    ttl: u32,
    /// The idle timeout it is written with.
    idle: u16,
    /// When the answer stops justifying the flow (answer time + idle timeout).
    expires: Instant,
    /// Shared by the flows of one answer and rule; `None` for a flow adopted from an earlier run.
    reason: Option<Arc<GrantReason>>,
    /// Written to OVS at least once since it was last changed.
    installed: bool,
    /// Which of the template's variants (bit `k` for variant `k`) OVS holds, as far as the engine
    /// knows: each expires on its own idle timer, and the grant lives on while any of them does.
    live: u8,
    /// Found in `br-int` at start and not justified by an answer since: the port keys it was written
    /// with (its pod may not be known yet).
    adopted: Option<PortKeys>,
}

/// One grant as the inspection API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantView {
    pub key: FlowKey,
    pub verdict: Verdict,
    pub ttl: u32,
    pub idle_timeout: u16,
    pub expires: SystemTime,
    /// `None` for a flow adopted from an earlier run and not justified by an answer since.
    pub reason: Option<GrantReason>,
    /// The EgressFirewall rule it stands for (from its priority).
    pub rule_index: Option<usize>,
    /// In OVS (as far as the engine knows), or still waiting to be written.
    pub installed: bool,
    pub cookie: u64,
}

/// Why a pod's DNS responses are not held (see `Engine::hold_candidate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotHeld {
    #[error("flowd knows no such pod of this node with an IP")]
    UnknownPod,
    #[error("its namespace has no EgressFirewall rule with a dnsName")]
    NoDnsRule,
    #[error("its OVN port is not in br-int yet")]
    NoPortKeys,
}

/// A pod whose DNS responses flowd holds ([`Core::held_pods`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldPod {
    pub key: PodKey,
    pub id: u16,
    pub keys: PortKeys,
    pub v4: bool,
    pub v6: bool,
}

#[derive(Debug)]
struct PodEntry {
    info: PodInfo,
    id: u16,
    keys: Option<PortKeys>,
    /// When its keys were last looked for in vain (a pod without an OVN port, e.g. host-network).
    keys_missed: Option<Instant>,
    memory: AnswerMemory,
    /// Flows justified by its answers (adopted ones not counted): what the per-pod cap bounds...
    grants: usize,
    /// ...and their destinations, with how many flows each (what keeps a remembered answer).
    dsts: HashMap<IpAddr, u32>,
    cap_logged: Option<Instant>,
}

/// Where a start stands with the flows an earlier run left in `br-int`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Adoption {
    /// Not read yet: flows found in OVS are adopted.
    #[default]
    Pending,
    /// Read and adopted; judged once the Kubernetes state has been listed in full.
    Adopted,
    /// Judged: from now on, a flow in OVS the engine does not hold is stale.
    Done,
}

/// What a monitor event asks of the driver.
#[derive(Debug, PartialEq, Eq)]
pub enum Monitored {
    Nothing,
    /// Something must be written again.
    Write,
    /// Someone else deleted our flows: OVN's tables must be read again before anything is written.
    Wiped,
}

/// One batch: deletes (their own bundle, so that a rejected add never blocks a revocation), then the
/// adds of each flow.
#[derive(Debug, Default)]
pub struct Batch {
    pub deletes: Vec<FlowOp>,
    pub adds: Vec<(FlowId, Vec<FlowOp>)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.deletes.is_empty() && self.adds.is_empty()
    }
}

/// Which cap a grant hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cap {
    Pod,
    Namespace,
    Node,
}

/// The engine's state; see the module documentation.
#[derive(Debug)]
pub struct Core {
    settings: EngineSettings,
    pub(super) policy: PolicySettings,
    pub(super) metrics: Arc<Metrics>,
    pods: HashMap<PodKey, PodEntry>,
    by_ip: HashMap<IpAddr, PodKey>,
    by_id: HashMap<u16, PodKey>,
    rules: HashMap<String, Arc<FirewallRules>>,
    /// What the pods of namespaces without a `dnsName` rule were told lately (see [`super::memory`]).
    recent: RecentAnswers,
    flows: HashMap<FlowId, FlowState>,
    per_namespace: HashMap<String, usize>,
    /// Flows to write in the next batch.
    dirty: HashSet<FlowId>,
    /// Exact deletes for the next batch (flows no longer wanted, every variant), and whole pods to delete.
    delete_strict: HashMap<FlowId, Vec<(Cookie, FlowMatch)>>,
    delete_pods: Vec<u16>,
    /// Deletes found by a reconcile or a changed shape (not cancelled when the same flow is wanted
    /// again: its add follows).
    delete_stale: Vec<(Cookie, FlowMatch)>,
    pending: VecDeque<(DnsResponse, Instant)>,
    pub(super) template: Option<Template>,
    local_subnets: Vec<IpNet>,
    node: Option<String>,
    adoption: Adoption,
    /// The Kubernetes state has been listed in full: adopted flows can be judged.
    synced: bool,
    /// Why learning the template last failed (shown by readiness); `None` once it succeeds.
    pub(super) learn_failed: Option<LearnError>,
    /// When the template was last learned (or tried): every try dumps the whole bridge.
    pub(super) learned_at: Option<Instant>,
    /// A pod's switch has no router port in the template: learn it again (rate-limited).
    pub(super) relearn: bool,
    /// New pods arrived: look up their datapath keys before their first answer needs them.
    pub(super) prefetch_keys: bool,
    /// Someone deleted our flows (ovn-controller reconnecting, maybe upgraded): OVN's tables are read
    /// again before anything is written.
    pub(super) rediscover: bool,
    /// Since when batches have been failing, and the last error: what liveness reports.
    failing: Option<(Instant, String)>,
    /// Why the cluster's own networks are not known yet: nothing is written meanwhile.
    pub(super) networks_unknown: Option<String>,
}

/// Whether a namespace has a `dnsName` rule: only such a rule grants from an answer, so only then
/// do its pods keep answer memories of their own (the others' go to the node's recent window), and
/// only then are their DNS replies held.
fn has_dns_rule(rules: Option<&FirewallRules>) -> bool {
    rules.is_some_and(|r| {
        r.rules
            .iter()
            .any(|r| matches!(r.destination, Destination::DnsName(_)))
    })
}

/// A pod as the hold flows need it, once its OVN port keys are known.
fn port(key: &PodKey, p: &PodEntry) -> Option<HeldPod> {
    Some(HeldPod {
        key: key.clone(),
        id: p.id,
        keys: p.keys?,
        v4: p.info.ips.iter().any(IpAddr::is_ipv4),
        v6: p.info.ips.iter().any(IpAddr::is_ipv6),
    })
}

/// FNV-1a of the iface-id: a pod keeps its id (and so its flows' cookies) across flowd restarts.
fn preferred_id(key: &PodKey) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.iface_id().bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    (h ^ (h >> 16)) as u16
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
pub fn physical(
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

/// Bit mask with one bit per variant.
pub fn all_variants(n: usize) -> u8 {
    u8::try_from((1u16 << n.min(8)) - 1).unwrap_or(u8::MAX)
}

/// The monotonic `t` as wall-clock time, for people.
fn wall(t: Instant, now: Instant) -> SystemTime {
    let wall_now = SystemTime::now();
    match t.checked_duration_since(now) {
        Some(ahead) => wall_now + ahead,
        None => wall_now - now.duration_since(t),
    }
}

impl Core {
    pub fn new(settings: EngineSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            policy: settings.policy(),
            local_subnets: settings.cluster_subnets.clone(),
            settings,
            metrics,
            pods: HashMap::new(),
            by_ip: HashMap::new(),
            by_id: HashMap::new(),
            rules: HashMap::new(),
            recent: RecentAnswers::default(),
            flows: HashMap::new(),
            per_namespace: HashMap::new(),
            dirty: HashSet::new(),
            delete_strict: HashMap::new(),
            delete_pods: Vec::new(),
            delete_stale: Vec::new(),
            pending: VecDeque::new(),
            template: None,
            node: None,
            adoption: Adoption::Pending,
            synced: false,
            learn_failed: None,
            learned_at: None,
            relearn: false,
            prefetch_keys: false,
            rediscover: false,
            failing: None,
            networks_unknown: None,
        }
    }

    /// Only pods of this node get flows; [`Core::upsert_pod`] treats other pods as removed.
    pub fn set_node(&mut self, node: String) {
        self.node = Some(node);
    }

    /// This node's pod subnets: answers to a client inside them with no known pod are held until the pod
    /// appears. Until set, the cluster subnets of the settings are used.
    pub fn set_local_subnets(&mut self, subnets: Vec<IpNet>) {
        self.local_subnets = subnets;
    }

    /// The destinations discovered from the cluster (every node's pod, join and transit subnets and
    /// addresses), excluded besides `--cluster-subnet`. A change decides every namespace again: a grant
    /// to a destination now excluded goes. Returns whether anything changed.
    pub fn set_discovered_exclusions(&mut self, discovered: Vec<IpNet>, now: Instant) -> bool {
        let all = crate::cluster::union([&self.settings.cluster_subnets, &discovered]);
        if self.policy.cluster_subnets == all {
            return false;
        }
        self.policy.cluster_subnets = all;
        let namespaces: Vec<String> = self.rules.keys().cloned().collect();
        for namespace in namespaces {
            let rules = self.rules.get(&namespace).cloned();
            self.recompute_namespace(&namespace, rules.as_deref(), now);
        }
        true
    }

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

    fn pod_of(&self, id: u16) -> Option<&PodEntry> {
        self.by_id.get(&id).and_then(|k| self.pods.get(k))
    }

    fn mark_dirty(&mut self, id: FlowId) {
        self.delete_strict.remove(&id);
        self.dirty.insert(id);
        if let Some(f) = self.flows.get_mut(&id) {
            f.installed = false;
        }
    }

    /// The port keys a flow is (to be) written with: its pod's, or those it was found with.
    fn flow_keys(&self, id: &FlowId, f: &FlowState) -> Option<PortKeys> {
        f.adopted
            .or_else(|| self.pod_of(id.pod).and_then(|p| p.keys))
    }

    /// The exact deletes of every variant OVS may hold of this flow, with this verdict.
    fn deletes(&self, id: FlowId, f: &FlowState, verdict: Verdict) -> Vec<(Cookie, FlowMatch)> {
        let (Some(template), Some(keys)) = (self.template.as_ref(), self.flow_keys(&id, f)) else {
            return Vec::new();
        };
        let cookie = Cookie::new(self.settings.cookie_prefix, id.pod, id.priority);
        physical(template, keys, &id, verdict)
            .into_iter()
            .flatten()
            .map(|(m, _)| (cookie, m))
            .collect()
    }

    /// Counts a justified flow in (`+1`) or out (`-1`) of its pod's and namespace's totals.
    fn count(&mut self, id: FlowId, delta: isize) {
        let Some(key) = self.by_id.get(&id.pod).cloned() else {
            return;
        };
        if let Some(p) = self.pods.get_mut(&key) {
            p.grants = p.grants.saturating_add_signed(delta);
            let n = p.dsts.entry(id.dst).or_default();
            *n = n.saturating_add_signed(delta as i32);
            if *n == 0 {
                p.dsts.remove(&id.dst);
            }
        }
        let n = self.per_namespace.entry(key.namespace).or_default();
        *n = n.saturating_add_signed(delta);
    }

    /// Forgets a flow and, when OVS may hold it, queues its exact delete.
    fn drop_flow(&mut self, id: FlowId) {
        self.dirty.remove(&id);
        if let Some(f) = self.flows.remove(&id) {
            if f.adopted.is_none() {
                self.count(id, -1);
            }
            let deletes = self.deletes(id, &f, f.verdict);
            if !deletes.is_empty() {
                self.delete_strict.insert(id, deletes);
            }
            Metrics::add(&self.metrics.flows_removed, 1);
        }
    }

    /// Forgets a flow OVS no longer holds (its timers ran out).
    fn expire_flow(&mut self, id: FlowId) {
        if let Some(f) = self.flows.remove(&id) {
            if f.adopted.is_none() {
                self.count(id, -1);
            }
            Metrics::add(&self.metrics.flows_expired, 1);
        }
    }

    /// Which variant of the template a flow read back from OVS is, for the flow the engine holds under
    /// `id`; `None` when it has a shape the template does not produce (then it is not ours to keep).
    fn variant_of(&self, id: &FlowId, m: &FlowMatch) -> Option<usize> {
        let flow = self.flows.get(id)?;
        let (template, keys) = (self.template.as_ref()?, self.flow_keys(id, flow)?);
        physical(template, keys, id, flow.verdict)?
            .iter()
            .position(|(want, _)| want == m)
    }

    /// Adds or updates a pod; returns whether something must be written. A pod of another node is
    /// treated as removed; a pod with a new UID under the same name is a new pod (it inherits nothing).
    pub fn upsert_pod(&mut self, pod: PodInfo, now: Instant) -> bool {
        if self.node.as_ref().is_some_and(|n| *n != pod.node) {
            return self.remove_pod(&pod.key);
        }
        if let Some(old) = self.pods.get(&pod.key) {
            if old.info == pod {
                return false;
            }
            if old.info.uid != pod.uid {
                self.remove_pod(&pod.key);
                return self.add_pod(pod, now);
            }
            let (id, old_ips) = (old.id, old.info.ips.clone());
            for ip in old_ips {
                self.by_ip.remove(&ip);
            }
            // Flows keyed on an IP the pod no longer has go, and what it was told at that IP.
            let stale: Vec<FlowId> = self
                .flows
                .keys()
                .filter(|f| f.pod == id && !pod.ips.contains(&f.src))
                .copied()
                .collect();
            for f in stale {
                self.drop_flow(f);
            }
            for ip in &pod.ips {
                self.by_ip.insert(*ip, pod.key.clone());
            }
            if let Some(e) = self.pods.get_mut(&pod.key) {
                e.info = pod.clone();
            }
            self.apply_held(&pod, now);
            return true;
        }
        self.add_pod(pod, now)
    }

    fn add_pod(&mut self, pod: PodInfo, now: Instant) -> bool {
        let Some(id) = self.allocate_id(&pod.key) else {
            tracing::error!(pod = %pod.key, "more than 65536 pods on one node; ignoring pod");
            return false;
        };
        for ip in &pod.ips {
            self.by_ip.insert(*ip, pod.key.clone());
        }
        self.by_id.insert(id, pod.key.clone());
        self.prefetch_keys = true;
        self.pods.insert(
            pod.key.clone(),
            PodEntry {
                info: pod.clone(),
                id,
                keys: None,
                keys_missed: None,
                memory: AnswerMemory::default(),
                grants: 0,
                dsts: HashMap::new(),
                cap_logged: None,
            },
        );
        // Flows adopted under this id from an earlier run count as this pod's once judged; justified
        // ones cannot exist yet.
        self.apply_held(&pod, now);
        true
    }

    /// Answers that arrived before the pod did.
    fn apply_held(&mut self, pod: &PodInfo, now: Instant) {
        let mut held = Vec::new();
        self.pending.retain(|(resp, at)| {
            if pod.ips.contains(&resp.client) {
                held.push((resp.clone(), *at));
                false
            } else {
                true
            }
        });
        for (resp, at) in held {
            self.on_dns(resp, at, now);
        }
    }

    /// Removes a pod: its flows go in the next batch (one delete by cookie), its answers are forgotten.
    pub fn remove_pod(&mut self, key: &PodKey) -> bool {
        let Some(entry) = self.pods.remove(key) else {
            return false;
        };
        for ip in &entry.info.ips {
            if self.by_ip.get(ip) == Some(key) {
                self.by_ip.remove(ip);
            }
        }
        self.by_id.remove(&entry.id);
        self.recent.forget(entry.id);
        if let Some(n) = self.per_namespace.get_mut(&key.namespace) {
            *n = n.saturating_sub(entry.grants);
        }
        let before = self.flows.len();
        self.flows.retain(|f, _| f.pod != entry.id);
        self.dirty.retain(|f| f.pod != entry.id);
        self.delete_strict.retain(|f, _| f.pod != entry.id);
        Metrics::add(&self.metrics.flows_removed, before - self.flows.len());
        self.delete_pods.push(entry.id);
        true
    }

    /// Sets a namespace's validated EgressFirewall. Rules equal to the ones in force (a status-only
    /// update, a relist) change nothing; otherwise its pods are decided again from what they were told,
    /// and only flows the new rules do not allow go. Returns whether something changed.
    pub fn set_rules(&mut self, rules: FirewallRules, now: Instant) -> bool {
        let namespace = rules.namespace.clone();
        if self.rules.get(&namespace).is_some_and(|r| **r == rules) {
            return false;
        }
        let old = self.rules.insert(namespace.clone(), Arc::new(rules));
        self.recompute_namespace(&namespace, old.as_deref(), now);
        true
    }

    /// The namespace has no (valid) EgressFirewall any more: its flows go.
    pub fn remove_rules(&mut self, namespace: &str, now: Instant) -> bool {
        match self.rules.remove(namespace) {
            Some(old) => {
                self.recompute_namespace(namespace, Some(&old), now);
                true
            }
            None => false,
        }
    }

    /// The rule an OpenFlow priority stands for.
    fn rule_at<'r>(&self, rules: &'r FirewallRules, priority: u16) -> Option<&'r FirewallRule> {
        let index = self.settings.priority_base.checked_sub(priority)?;
        rules.rules.get(usize::from(index))
    }

    /// Whether `rule` could have granted this flow from some answer: the flow's verdict and ports are
    /// the rule's, the rule names a DNS name, and the address is not inside the cluster.
    fn could_grant(&self, rule: &FirewallRule, id: &FlowId, verdict: Verdict) -> bool {
        let ports = match id.l4 {
            None => rule.ports.is_empty(),
            Some(p) => rule.ports.contains(&p),
        };
        rule.verdict == verdict
            && ports
            && matches!(rule.destination, Destination::DnsName(_))
            && !self
                .policy
                .cluster_subnets
                .iter()
                .any(|n| n.contains(&id.dst))
    }

    /// Decides again every pod of `namespace` from its remembered answers. A flow goes only when the
    /// new rules do not grant it; a flow adopted from an earlier run (no answer known) stays while the
    /// rule at its priority is unchanged.
    fn recompute_namespace(&mut self, namespace: &str, old: Option<&FirewallRules>, now: Instant) {
        let rules = self.rules.get(namespace).cloned();
        let pods: Vec<PodKey> = self
            .pods
            .keys()
            .filter(|k| k.namespace == namespace)
            .cloned()
            .collect();
        // A namespace that gains its first dnsName rule takes its pods' answers out of the node's
        // window; one that loses its last puts them back there.
        let keeps = has_dns_rule(rules.as_deref());
        let cap = self.settings.max_grants_per_pod;
        for key in pods {
            let Some(id) = self.pods.get(&key).map(|p| p.id) else {
                continue;
            };
            let mut grants = Vec::new();
            if let Some(pod) = self.pods.get_mut(&key) {
                if keeps {
                    self.recent.restore(id, &mut pod.memory, now, cap);
                }
                let dsts = &pod.dsts;
                pod.memory.prune(now, |ip| dsts.contains_key(&ip));
                // The flow's source is the pod's address of the answer's family, whichever of the
                // pod's addresses asked.
                if let (Some(rules), Some(client)) = (&rules, pod.info.ips.first()) {
                    for remembered in pod.memory.responses(*client) {
                        let decided =
                            policy::decide(&remembered.response, &pod.info, rules, &self.policy);
                        for (g, reason) in share_reasons(decided.grants) {
                            let at = remembered.at.get(&g.key.dst).copied().unwrap_or(now);
                            grants.push((g, reason, at));
                        }
                    }
                }
            }
            let wanted: HashSet<FlowId> = grants
                .iter()
                .filter_map(|(g, _, _)| self.flow_id(&g.key))
                .collect();
            let unwanted: Vec<FlowId> = self
                .flows
                .iter()
                .filter(|(f, state)| {
                    f.pod == id
                        && !wanted.contains(f)
                        && !(state.adopted.is_some()
                            && self.same_rule(old, rules.as_deref(), f.priority))
                })
                .map(|(f, _)| *f)
                .collect();
            for f in unwanted {
                self.drop_flow(f);
            }
            for (g, reason, at) in grants {
                self.grant(&g, reason, at, now);
            }
            if !keeps {
                if let Some(pod) = self.pods.get_mut(&key) {
                    self.recent.keep(id, &mut pod.memory, now);
                }
            }
        }
    }

    fn same_rule(
        &self,
        old: Option<&FirewallRules>,
        new: Option<&FirewallRules>,
        priority: u16,
    ) -> bool {
        match (old, new) {
            (Some(old), Some(new)) => {
                let (a, b) = (self.rule_at(old, priority), self.rule_at(new, priority));
                a.is_some() && a == b
            }
            _ => false,
        }
    }

    /// A DNS answer that arrived at `at`: decides, remembers what the pod was told, and marks the
    /// resulting flows for the next batch. Returns the flows the answer justifies (new, or already
    /// there; none when it justifies nothing).
    pub fn on_dns(&mut self, resp: DnsResponse, at: Instant, now: Instant) -> Vec<FlowId> {
        let Some(key) = self.by_ip.get(&resp.client).cloned() else {
            self.hold(resp, at, now);
            return Vec::new();
        };
        let Some(pod) = self.pods.get_mut(&key) else {
            return Vec::new();
        };
        // The pod just received DNS: its port is up, whatever an earlier look found. Its keys are
        // looked for again now rather than at the next retry, so that its grants need not wait.
        if pod.keys.is_none()
            && pod
                .keys_missed
                .is_some_and(|t| now.saturating_duration_since(t) >= KEYS_RELOOK)
        {
            pod.keys_missed = None;
        }
        let pod = &*pod;
        let grants = match self.rules.get(&key.namespace) {
            Some(rules) => policy::decide(&resp, &pod.info, rules, &self.policy).grants,
            None => Vec::new(),
        };
        if resp.is_noerror() && !resp.answers.is_empty() {
            let settings = &self.settings;
            let cap = settings.max_grants_per_pod;
            let until = |ttl| at + Duration::from_secs(settings.idle_timeout(ttl).into());
            let keeps = has_dns_rule(self.rules.get(&key.namespace).map(|r| &**r));
            if let Some(pod) = self.pods.get_mut(&key) {
                if keeps {
                    let dsts = &pod.dsts;
                    pod.memory
                        .remember(&resp, at, until, cap, |ip| dsts.contains_key(&ip));
                } else {
                    self.recent.remember(pod.id, &resp, at, until);
                }
            }
        }
        let justified: Vec<FlowId> = grants.iter().filter_map(|g| self.flow_id(&g.key)).collect();
        for (g, reason) in share_reasons(grants) {
            self.grant(&g, reason, at, now);
        }
        justified
    }

    /// Whether every one of `ids` is in OVS as far as the engine knows: written since it last
    /// changed (a flow refused by a cap, or still waiting for port keys or a template, is not).
    pub fn installed(&self, ids: &[FlowId]) -> bool {
        ids.iter()
            .all(|id| self.flows.get(id).is_some_and(|f| f.installed))
    }

    fn hold(&mut self, resp: DnsResponse, at: Instant, now: Instant) {
        if !self.local_subnets.iter().any(|n| n.contains(&resp.client)) {
            return;
        }
        let m = &self.metrics;
        let now = now.max(at);
        while self
            .pending
            .front()
            .is_some_and(|(_, t)| now.saturating_duration_since(*t) > PENDING_MAX_AGE)
        {
            self.pending.pop_front();
            Metrics::add(&m.pending_dropped, 1);
        }
        if self.pending.len() >= PENDING_MAX {
            self.pending.pop_front();
            Metrics::add(&m.pending_dropped, 1);
        }
        self.pending.push_back((resp, at));
        Metrics::add(&m.pending_held, 1);
    }

    /// Which cap, if any, a new justified flow of this pod would exceed.
    fn cap_hit(&self, pod: &PodEntry) -> Option<Cap> {
        let ns = self.per_namespace.get(&pod.info.key.namespace).copied();
        if self.flows.len() >= MAX_FLOWS {
            Some(Cap::Node)
        } else if pod.grants >= self.settings.max_grants_per_pod {
            Some(Cap::Pod)
        } else if ns.unwrap_or(0) >= self.settings.max_grants_per_namespace {
            Some(Cap::Namespace)
        } else {
            None
        }
    }

    fn grant(&mut self, g: &Grant, reason: Arc<GrantReason>, at: Instant, now: Instant) {
        let Some(id) = self.flow_id(&g.key) else {
            return;
        };
        let idle = self.settings.idle_timeout(g.ttl);
        let expires = at + Duration::from_secs(idle.into());
        let justified = self.flows.get(&id).is_some_and(|f| f.adopted.is_none());
        if !justified {
            if let Some(cap) = self.pod_of(id.pod).and_then(|p| self.cap_hit(p)) {
                // An adopted flow stays as it is; a new one is refused.
                if !self.flows.contains_key(&id) {
                    self.refuse(id.pod, cap, now);
                }
                return;
            }
        }
        let Some(f) = self.flows.get_mut(&id) else {
            self.flows.insert(
                id,
                FlowState {
                    verdict: g.verdict,
                    ttl: g.ttl,
                    idle,
                    expires,
                    reason: Some(reason),
                    installed: false,
                    live: 0,
                    adopted: None,
                },
            );
            self.count(id, 1);
            self.mark_dirty(id);
            return;
        };
        // The rule's verdict changed: the other verdict's variants go (in the shape they were written).
        let old = (f.verdict != g.verdict).then(|| f.clone());
        let was_adopted = f.adopted.take().is_some();
        f.reason = Some(reason);
        if f.verdict == g.verdict && expires < f.expires + REFRESH_MIN && !was_adopted {
            // Already there for at least as long: nothing to write.
            return;
        }
        f.verdict = g.verdict;
        f.ttl = g.ttl;
        f.idle = idle;
        f.expires = f.expires.max(expires);
        if was_adopted {
            self.count(id, 1);
        }
        if let Some(old) = old {
            let deletes = self.deletes(id, &old, old.verdict);
            self.delete_stale.extend(deletes);
        }
        self.mark_dirty(id);
    }

    /// A grant beyond a cap: counted, and logged once a minute per pod.
    fn refuse(&mut self, pod: u16, cap: Cap, now: Instant) {
        let m = &self.metrics;
        Metrics::add(&m.grants_dropped, 1);
        Metrics::add(
            match cap {
                Cap::Pod => &m.grants_dropped_pod,
                Cap::Namespace => &m.grants_dropped_namespace,
                Cap::Node => &m.grants_dropped_node,
            },
            1,
        );
        let (pod_cap, ns_cap) = (
            self.settings.max_grants_per_pod,
            self.settings.max_grants_per_namespace,
        );
        let Some(key) = self.by_id.get(&pod).cloned() else {
            return;
        };
        let Some(entry) = self.pods.get_mut(&key) else {
            return;
        };
        if entry
            .cap_logged
            .is_some_and(|t| now.saturating_duration_since(t) < CAP_LOG_PERIOD)
        {
            return;
        }
        entry.cap_logged = Some(now);
        let limit = match cap {
            Cap::Pod => format!("--max-grants-per-pod={pod_cap}"),
            Cap::Namespace => format!("--max-grants-per-namespace={ns_cap}"),
            Cap::Node => format!("the node-wide {MAX_FLOWS}"),
        };
        tracing::warn!(pod = %key, %limit, "grant cap reached; further answers of this pod get no flow until some expire (counted in dnsflow_grants_dropped_total)");
    }

    /// The Kubernetes state has been listed in full: flows adopted from an earlier run are judged now
    /// (or right after they are read, if that has not happened yet).
    pub fn set_synced(&mut self) -> bool {
        self.synced = true;
        self.judge_adopted()
    }

    /// Removes the adopted flows the cluster proves wrong: their pod is gone or has another port or
    /// IP, their namespace has no rules, or the rule at their priority could not have granted them.
    /// The others stay until their own idle timeout in OVS ends them or an answer justifies them.
    fn judge_adopted(&mut self) -> bool {
        if !(self.synced && self.adoption == Adoption::Adopted) {
            return false;
        }
        self.adoption = Adoption::Done;
        let adopted: Vec<(FlowId, PortKeys, Verdict)> = self
            .flows
            .iter()
            .filter_map(|(id, f)| Some((*id, f.adopted?, f.verdict)))
            .collect();
        let mut wrong = Vec::new();
        for (id, keys, verdict) in &adopted {
            let valid = self.pod_of(id.pod).is_some_and(|pod| {
                pod.info.ips.contains(&id.src)
                    && pod.keys.is_none_or(|k| k == *keys)
                    && self
                        .rules
                        .get(&pod.info.key.namespace)
                        .and_then(|r| self.rule_at(r, id.priority))
                        .is_some_and(|rule| self.could_grant(rule, id, *verdict))
            });
            if !valid {
                wrong.push(*id);
            }
        }
        tracing::info!(
            adopted = adopted.len(),
            removed = wrong.len(),
            "flows of an earlier run judged against the cluster"
        );
        for id in &wrong {
            self.drop_flow(*id);
        }
        !wrong.is_empty()
    }

    /// The Kubernetes state could not be listed in time: the flows an earlier run left cannot be
    /// judged, so none of them is kept (fail closed). Flows not read yet are treated as stale when
    /// they are. Returns how many were removed.
    pub fn abandon_adopted(&mut self) -> usize {
        let adopting = self.adoption;
        self.adoption = Adoption::Done;
        if adopting != Adoption::Adopted {
            return 0;
        }
        let adopted: Vec<FlowId> = self
            .flows
            .iter()
            .filter_map(|(id, f)| f.adopted.is_some().then_some(*id))
            .collect();
        for id in &adopted {
            self.drop_flow(*id);
        }
        adopted.len()
    }

    /// The grants the engine holds, optionally for one pod or one namespace, sorted by pod then priority.
    pub fn grants(
        &self,
        pod: Option<&PodKey>,
        namespace: Option<&str>,
        now: Instant,
    ) -> Vec<GrantView> {
        let prefix = self.settings.cookie_prefix;
        let mut out: Vec<GrantView> = self
            .flows
            .iter()
            .filter_map(|(id, f)| {
                let key = self.by_id.get(&id.pod)?;
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
                    idle_timeout: f.idle,
                    expires: wall(f.expires, now),
                    reason: f.reason.as_deref().cloned(),
                    rule_index: self
                        .settings
                        .priority_base
                        .checked_sub(id.priority)
                        .map(usize::from),
                    installed: f.installed,
                    cookie: Cookie::new(prefix, id.pod, id.priority).0,
                })
            })
            .collect();
        out.sort_by(|a, b| {
            let key = |g: &GrantView| {
                (
                    g.key.pod.clone(),
                    std::cmp::Reverse(g.key.priority),
                    g.key.dst,
                    g.key.l4,
                )
            };
            key(a).cmp(&key(b))
        });
        out
    }

    /// Whether changes are waiting for the next batch.
    pub fn has_pending_changes(&self) -> bool {
        !(self.dirty.is_empty()
            && self.delete_strict.is_empty()
            && self.delete_pods.is_empty()
            && self.delete_stale.is_empty())
    }

    /// The pods whose DNS responses should be held (see [`Core::hold_candidate`]), with their id and
    /// address families.
    pub fn held_pods(&self) -> Vec<HeldPod> {
        self.hold_ports().0
    }

    /// The pods of this node whose OVN port keys are known, in one look: those whose DNS responses
    /// are held (a `dnsName` rule in their namespace), and those whose replies need not wait for
    /// anything (see `crate::hold::HoldFlows`); each sorted by pod.
    pub fn hold_ports(&self) -> (Vec<HeldPod>, Vec<HeldPod>) {
        let (mut held, mut passed) = (Vec::new(), Vec::new());
        for (key, p) in self.pods.iter().filter(|(_, p)| self.of_this_node(p)) {
            if let Some(port) = port(key, p) {
                if self.dns_rule(key) {
                    held.push(port);
                } else {
                    passed.push(port);
                }
            }
        }
        held.sort_by(|a, b| a.key.cmp(&b.key));
        passed.sort_by(|a, b| a.key.cmp(&b.key));
        (held, passed)
    }

    /// What each pod of this node was told and can still use (its own memory and the node's
    /// window): for [`crate::persist`], so that a restart forgets nothing.
    pub fn remembered(&self) -> Vec<(PodInfo, Vec<super::memory::Remembered>)> {
        self.pods
            .values()
            .filter(|p| self.node.as_ref().is_none_or(|n| *n == p.info.node))
            .filter_map(|p| {
                let client = *p.info.ips.first()?;
                let mut all = p.memory.responses(client);
                all.extend(self.recent.responses(p.id, client));
                (!all.is_empty()).then(|| (p.info.clone(), all))
            })
            .collect()
    }

    /// An answer `pod` was given before a restart, at `at`: applied only if the address still
    /// belongs to that very pod (same name, and same uid where both are known), never to a pod that
    /// took its address since.
    pub fn restore(&mut self, pod: &PodInfo, resp: DnsResponse, at: Instant, now: Instant) -> bool {
        let same = self
            .by_ip
            .get(&resp.client)
            .and_then(|key| self.pods.get(key))
            .is_some_and(|p| {
                p.info.key == pod.key
                    && (p.info.uid.is_none() || pod.uid.is_none() || p.info.uid == pod.uid)
            });
        if same {
            self.on_dns(resp, at, now);
        }
        same
    }

    /// The id of the pod of this node with address `ip`.
    pub fn pod_id(&self, ip: IpAddr) -> Option<u16> {
        self.pods.get(self.by_ip.get(&ip)?).map(|p| p.id)
    }

    /// Whether `key`'s DNS responses should be held, or why not: it must be a pod of this node with
    /// its OVN port keys, in a namespace with a `dnsName` rule.
    pub fn hold_candidate(&self, key: &PodKey) -> Result<HeldPod, NotHeld> {
        let p = self
            .pods
            .get(key)
            .filter(|p| self.of_this_node(p))
            .ok_or(NotHeld::UnknownPod)?;
        if !self.dns_rule(key) {
            return Err(NotHeld::NoDnsRule);
        }
        port(key, p).ok_or(NotHeld::NoPortKeys)
    }

    fn of_this_node(&self, p: &PodEntry) -> bool {
        self.node.as_ref().is_none_or(|n| *n == p.info.node)
    }

    /// Whether `key`'s namespace has a `dnsName` rule.
    fn dns_rule(&self, key: &PodKey) -> bool {
        has_dns_rule(self.rules.get(&key.namespace).map(|r| &**r))
    }

    /// Why nothing can be installed: the cluster's networks are unknown, or grants wait for a template
    /// OVN's flows cannot teach.
    pub fn blocked(&self) -> Option<String> {
        if let Some(why) = &self.networks_unknown {
            return Some(why.clone());
        }
        if self.template.is_some() || self.flows.is_empty() {
            return None;
        }
        self.learn_failed.as_ref().map(ToString::to_string)
    }

    /// Gauges on top of the counters.
    pub fn gauges(&self, m: &mut MetricsSnapshot) {
        m.template_learned = u64::from(self.template.is_some());
        m.flows_desired = self.flows.len() as u64;
        m.flows_adopted = self.flows.values().filter(|f| f.adopted.is_some()).count() as u64;
        m.pods = self.pods.len() as u64;
        m.pending = self.pending.len() as u64;
    }

    /// A new template (learned at start, or changed by an upgrade): every flow is written again in its
    /// shape, the old shapes are deleted exactly. Returns whether flows moved from an older template.
    pub fn set_template(&mut self, found: Template) -> bool {
        self.rediscover = false;
        if self.template.as_ref() == Some(&found) {
            return false;
        }
        let moved = self.template.is_some();
        if moved {
            tracing::warn!(template = %found, "OVN's EgressFirewall pipeline changed; moving every flow");
            let ids: Vec<(FlowId, FlowState)> =
                self.flows.iter().map(|(id, f)| (*id, f.clone())).collect();
            for (id, f) in ids {
                let deletes = self.deletes(id, &f, f.verdict);
                self.delete_stale.extend(deletes);
            }
        }
        self.template = Some(found);
        let all: Vec<FlowId> = self.flows.keys().copied().collect();
        for id in all {
            self.mark_dirty(id);
        }
        self.delete_pods.clear();
        moved
    }

    /// The iface-ids whose port keys should be looked up now: every pod's (`all`, when ports may have
    /// been recreated), or those of pods without keys that need them. `None`: nothing to look up.
    pub fn keys_wanted(&mut self, all: bool, now: Instant) -> Option<HashSet<String>> {
        let due = |p: &PodEntry| {
            all || p.keys.is_none()
                && p.keys_missed
                    .is_none_or(|t| now.saturating_duration_since(t) >= KEYS_RETRY)
        };
        let needed = all
            || self.prefetch_keys
            || self
                .dirty
                .iter()
                .filter_map(|f| self.pod_of(f.pod))
                .any(due);
        if !needed {
            return None;
        }
        self.prefetch_keys = false;
        // One lookup costs the same for one pod or all: fetch every pod still without keys, so that
        // the first answer of each other pod does not pay for its own.
        let ids: HashSet<String> = self
            .pods
            .values()
            .filter(|p| due(p))
            .map(|p| p.info.key.iface_id())
            .collect();
        (!ids.is_empty()).then_some(ids)
    }

    /// Port keys found for `asked`. A pod whose keys changed (its port was recreated) has its flows
    /// deleted by cookie and written again with the new keys in the next batch.
    pub fn set_keys(
        &mut self,
        asked: &HashSet<String>,
        found: &HashMap<String, PortKeys>,
        now: Instant,
    ) {
        let mut moved = Vec::new();
        for pod in self.pods.values_mut() {
            let iface = pod.info.key.iface_id();
            match found.get(&iface) {
                Some(k) => {
                    if pod.keys.is_some_and(|old| old != *k) {
                        moved.push(pod.id);
                    }
                    pod.keys = Some(*k);
                }
                // Keep the keys of a port that went for now (a pod being torn down); its flows go with
                // the pod.
                None if asked.contains(&iface) => pod.keys_missed = Some(now),
                None => {}
            }
        }
        if moved.is_empty() {
            return;
        }
        tracing::info!(
            pods = moved.len(),
            "pods' OVS ports were recreated; moving their flows"
        );
        self.delete_pods.extend(&moved);
        let ids: Vec<FlowId> = self
            .flows
            .keys()
            .filter(|f| moved.contains(&f.pod))
            .copied()
            .collect();
        for id in ids {
            if let Some(f) = self.flows.get_mut(&id) {
                // Written again on the pod's new port, not the one it was found on.
                if f.adopted.take().is_some() {
                    self.count(id, 1);
                }
            }
            self.mark_dirty(id);
        }
    }

    /// Takes the pending changes as one batch. Flows whose pod has no datapath keys, or whose switch
    /// no router port in the template, yet stay pending.
    pub fn take_batch(&mut self, template: &Template) -> Batch {
        let prefix = self.settings.cookie_prefix;
        let hard = self.settings.hard_timeout();
        let mut batch = Batch::default();
        for pod in std::mem::take(&mut self.delete_pods) {
            batch.deletes.push(FlowOp::DeleteCookie {
                table: template.table,
                cookie: Cookie::pod(prefix, pod),
                mask: POD_MASK,
            });
        }
        let strict = self.delete_strict.drain().flat_map(|(_, d)| d);
        let stale = std::mem::take(&mut self.delete_stale);
        batch.deletes.extend(
            strict
                .chain(stale)
                .map(|(cookie, matches)| FlowOp::DeleteStrict { cookie, matches }),
        );
        let take = self.dirty.len().min(MAX_BATCH_FLOWS);
        let dirty: Vec<FlowId> = self.dirty.iter().take(take).copied().collect();
        for id in &dirty {
            self.dirty.remove(id);
        }
        for id in dirty {
            let Some(f) = self.flows.get(&id) else {
                continue;
            };
            let keys = self.flow_keys(&id, f);
            let flows = match keys.map(|k| (k, physical(template, k, &id, f.verdict))) {
                Some((_, Some(flows))) => flows,
                Some((keys, None)) => {
                    // The template knows no router port for this switch yet: learn again, later.
                    if !self.relearn {
                        tracing::warn!(metadata = keys.metadata, "no port toward the router found on the pod's logical switch; its grants wait");
                    }
                    self.relearn = true;
                    self.dirty.insert(id);
                    continue;
                }
                None => {
                    // Not on the bridge yet: try again later.
                    self.dirty.insert(id);
                    continue;
                }
            };
            let cookie = Cookie::new(prefix, id.pod, id.priority);
            let ops = flows
                .into_iter()
                .map(|(matches, action)| {
                    FlowOp::Add(FlowSpec {
                        cookie,
                        matches,
                        idle_timeout: f.idle,
                        hard_timeout: hard,
                        action,
                    })
                })
                .collect();
            batch.adds.push((id, ops));
        }
        batch
    }

    /// The deletes of a batch OVS did not take: they go again with the next one.
    pub fn deletes_failed(&mut self, ops: Vec<FlowOp>) {
        for op in ops {
            match op {
                FlowOp::DeleteCookie { cookie, .. } => self.delete_pods.push(cookie.pod_id()),
                FlowOp::DeleteStrict { cookie, matches } => {
                    self.delete_stale.push((cookie, matches));
                }
                FlowOp::Add(_) | FlowOp::Hold(_) => {}
            }
        }
    }

    /// These flows are in OVS now, every variant.
    pub fn written(&mut self, ids: &[FlowId], template: &Template) {
        for id in ids {
            if let Some(f) = self.flows.get_mut(id) {
                f.installed = true;
                f.live = all_variants(template.variants(f.verdict == Verdict::Allow).len());
            }
        }
        Metrics::add(&self.metrics.flows_installed, ids.len());
    }

    /// These adds did not reach OVS (it is away or timed out): they go again with the next batch.
    pub fn adds_failed(&mut self, ids: &[FlowId]) {
        for id in ids {
            if self.flows.contains_key(id) {
                self.dirty.insert(*id);
            }
        }
    }

    /// OVS refuses this flow: it is dropped (and counted) so that the rest goes through.
    pub fn rejected(&mut self, id: FlowId, error: &str) {
        if let Some(f) = self.flows.remove(&id) {
            if f.adopted.is_none() {
                self.count(id, -1);
            }
            Metrics::add(&self.metrics.flows_rejected, 1);
            let pod = self.by_id.get(&id.pod).map(ToString::to_string);
            tracing::error!(?pod, priority = id.priority, dst = %id.dst, %error, "OVS refused a flow; dropped it");
        }
    }

    /// A batch completed (`Ok`) or OVS could not be reached (`Err`): what liveness follows.
    pub fn batch_result(&mut self, result: Result<(), String>, now: Instant) {
        match result {
            Ok(()) => self.failing = None,
            Err(e) => {
                let since = self.failing.take().map_or(now, |(t, _)| t);
                self.failing = Some((since, e));
            }
        }
    }

    /// Since when batches have been failing, and why.
    pub fn failing(&self) -> Option<&(Instant, String)> {
        self.failing.as_ref()
    }

    /// Applies one monitor event.
    pub fn on_flow_event(&mut self, event: FlowEvent, now: Instant) -> Monitored {
        let FlowEvent::Deleted(reason, f) = event else {
            return Monitored::Nothing;
        };
        if f.cookie.prefix() != self.settings.cookie_prefix {
            return Monitored::Nothing;
        }
        let Some(m) = f
            .fields
            .as_ref()
            .and_then(|fields| fields.flow_match(f.table, f.cookie.priority()))
        else {
            return Monitored::Nothing;
        };
        let id = FlowId::of(f.cookie, &m);
        // Our own delete, a flow we no longer want, or a shape (old template, old port) not ours now.
        let Some(variant) = self.variant_of(&id, &m) else {
            return Monitored::Nothing;
        };
        let Some(flow) = self.flows.get_mut(&id) else {
            return Monitored::Nothing;
        };
        let due = flow.expires <= now + EXPIRY_SLACK;
        let timed_out = match reason {
            RemovedReason::Hard => true,
            RemovedReason::Idle => due,
            RemovedReason::Delete | RemovedReason::Other => false,
        };
        if timed_out {
            // This variant's own timer ran out; the grant lives while another variant does.
            flow.live &= !(1 << variant);
            if flow.live == 0 {
                self.expire_flow(id);
            }
            return Monitored::Nothing;
        }
        // Idle before our record says (refreshed meanwhile), or deleted by someone else: write again.
        self.mark_dirty(id);
        Metrics::add(&self.metrics.flows_reinstalled, 1);
        if reason != RemovedReason::Idle && !self.rediscover {
            self.rediscover = true;
            return Monitored::Wiped;
        }
        Monitored::Write
    }

    /// The diff against `dump-flows`: our flows OVS holds that are not wanted (left by an earlier run
    /// once judged, of a pod that changed ports, or in a shape the template no longer produces) are
    /// deleted; wanted flows that are missing are written again; those missing because they expired
    /// are forgotten. The first diff after start adopts what it finds.
    pub fn reconcile(&mut self, dumped: &[ParsedFlow], template: &Template, now: Instant) {
        let adopting = self.adoption == Adoption::Pending;
        // Per flow, the variants OVS holds.
        let mut present: HashMap<FlowId, u8> = HashMap::with_capacity(dumped.len());
        let mut stale = Vec::new();
        let mut adopted = 0usize;
        for f in dumped {
            let Some((id, matches)) = f.fields.as_ref().and_then(|fields| {
                let priority = f.priority?;
                let m = fields.flow_match(f.table, priority)?;
                Some((FlowId::of(f.cookie, &m), m))
            }) else {
                tracing::warn!(cookie = %f.cookie, table = f.table, "flow with our cookie prefix in a shape we do not write; leaving it");
                continue;
            };
            let ours = id.priority == f.cookie.priority();
            let mut variant = ours.then(|| self.variant_of(&id, &matches)).flatten();
            // Not a flow this run dropped after the dump was taken (its delete is still queued).
            let dropped =
                self.delete_strict.contains_key(&id) || self.delete_pods.contains(&id.pod);
            if variant.is_none() && ours && adopting && !dropped && !self.flows.contains_key(&id) {
                variant = self.adopt(id, &matches, f, template, now);
                adopted += usize::from(variant.is_some());
            }
            match variant {
                Some(k) => *present.entry(id).or_default() |= 1 << k,
                None => stale.push((f.cookie, matches)),
            }
        }
        if adopting {
            self.adoption = Adoption::Adopted;
            tracing::info!(
                flows = adopted,
                "adopted the flows an earlier run left in the bridge"
            );
        }
        Metrics::add(&self.metrics.flows_removed, stale.len());
        self.delete_stale.extend(stale);
        let mut reinstall = Vec::new();
        let mut expired = Vec::new();
        for (id, f) in self.flows.iter_mut().filter(|(_, f)| f.installed) {
            let held = present.get(id).copied().unwrap_or(0);
            if f.adopted.is_some() {
                f.live = held;
            }
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
            self.expire_flow(id);
        }
        for id in reinstall {
            self.mark_dirty(id);
            Metrics::add(&self.metrics.flows_reinstalled, 1);
        }
        self.judge_adopted();
        // What pods were told and no flow uses any more goes once it has expired.
        for pod in self.pods.values_mut() {
            let dsts = &pod.dsts;
            pod.memory.prune(now, |ip| dsts.contains_key(&ip));
        }
        self.recent.prune(now);
    }

    /// Takes a flow found in OVS at start as ours, when it has a shape the template produces for some
    /// verdict; returns its variant. It lives until its idle timeout in OVS ends it, unless the cluster
    /// proves it wrong once listed (see [`Core::judge_adopted`]).
    fn adopt(
        &mut self,
        id: FlowId,
        m: &FlowMatch,
        f: &ParsedFlow,
        template: &Template,
        now: Instant,
    ) -> Option<usize> {
        let keys = PortKeys {
            metadata: m.metadata,
            reg14: m.reg14,
        };
        let (verdict, k) = [Verdict::Allow, Verdict::Deny].into_iter().find_map(|v| {
            let k = physical(template, keys, &id, v)?
                .iter()
                .position(|(want, _)| want == m)?;
            Some((v, k))
        })?;
        let idle = f
            .idle_timeout
            .unwrap_or_else(|| self.settings.idle_timeout(0));
        self.flows.insert(
            id,
            FlowState {
                verdict,
                ttl: 0,
                idle,
                // Its answer is unknown: an idle removal is believed at once.
                expires: now,
                reason: None,
                installed: true,
                live: 0,
                adopted: Some(keys),
            },
        );
        Some(k)
    }

    /// Makes every failed port lookup look `by` older.
    #[cfg(test)]
    pub(super) fn age_missed_keys(&mut self, by: Duration) {
        for p in self.pods.values_mut() {
            p.keys_missed = p.keys_missed.map(|t| t - by);
        }
    }

    #[cfg(test)]
    pub(super) fn every_pod_has_keys(&self) -> bool {
        self.pods.values().all(|p| p.keys.is_some())
    }
}

#[cfg(test)]
mod tests {
    //! The core on an injected clock: no test here sleeps.
    use super::super::memory::RECENT_MAX;
    use super::*;
    use crate::{
        config::DEFAULT_MAX_GRANTS_PER_POD,
        egressfirewall::EgressFirewall,
        ovs::{template::Pipeline, template::Variant, Actions},
    };
    use dnsflow_dnstap::{Answer, DnsName};
    use serde_json::json;

    const NS: &str = "ns1";
    const MINUTE: Duration = Duration::from_secs(60);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn template() -> Template {
        Template {
            table: 46,
            pipeline: Pipeline::Continue,
            tier: None,
            allow: vec![Variant {
                hint: None,
                actions: Actions::new("resubmit(,47)").unwrap(),
            }],
            uplinks: [(1, 1)].into(),
            delivery_table: Some(65),
        }
    }

    fn rules(egress: serde_json::Value) -> FirewallRules {
        FirewallRules::from_egress_firewall(&EgressFirewall::inline(NS, egress).unwrap()).unwrap()
    }

    fn google() -> FirewallRules {
        rules(json!([
            {"type": "Allow", "to": {"dnsName": "*.google.com"}},
            {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}
        ]))
    }

    fn pod(name: &str, ips: &[&str], uid: &str) -> PodInfo {
        PodInfo {
            key: PodKey::new(NS, name),
            uid: Some(uid.into()),
            ips: ips.iter().map(|a| ip(a)).collect(),
            node: "node1".into(),
        }
    }

    fn answer(client: &str, qname: &str, ips: &[&str], ttl: u32) -> DnsResponse {
        DnsResponse::noerror(
            ip(client),
            DnsName::new(qname).unwrap(),
            Vec::new(),
            ips.iter().map(|a| Answer { ip: ip(a), ttl }).collect(),
        )
    }

    /// A core on a bridge where pods pod1 (10.244.1.5, fd00:10:244:1::5) and pod2 (10.244.1.6) have
    /// ports, idle timeouts of exactly the TTL, and the template written.
    fn core(settings: EngineSettings, t0: Instant) -> Core {
        let mut c = Core::new(
            EngineSettings {
                idle_floor: Duration::ZERO,
                idle_grace: Duration::ZERO,
                ..settings
            },
            Arc::default(),
        );
        c.set_template(template());
        c.set_rules(google(), t0);
        c.upsert_pod(pod("pod1", &["10.244.1.5", "fd00:10:244:1::5"], "u1"), t0);
        c.upsert_pod(pod("pod2", &["10.244.1.6"], "u2"), t0);
        let asked = c.keys_wanted(false, t0).unwrap();
        let found = [("ns1_pod1", 2), ("ns1_pod2", 3)]
            .map(|(i, reg14)| (i.to_owned(), PortKeys { metadata: 1, reg14 }))
            .into();
        c.set_keys(&asked, &found, t0);
        c
    }

    /// Writes the pending batch as OVS would take it; returns the deletes and the added destinations.
    fn write(c: &mut Core) -> (Vec<FlowOp>, Vec<IpAddr>) {
        let t = template();
        let batch = c.take_batch(&t);
        let ids: Vec<FlowId> = batch.adds.iter().map(|(id, _)| *id).collect();
        c.written(&ids, &t);
        let mut dsts: Vec<IpAddr> = ids.iter().map(|id| id.dst).collect();
        dsts.sort();
        (batch.deletes, dsts)
    }

    fn dsts(c: &Core) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = c.flows.keys().map(|f| f.dst).collect();
        v.sort();
        v
    }

    /// A flow as `dump-flows` (with `priority`) or the monitor (without) reads it back.
    fn parsed(cookie: Cookie, m: &FlowMatch, idle: u16, priority: Option<u16>) -> ParsedFlow {
        let spec = FlowSpec {
            cookie,
            matches: *m,
            idle_timeout: idle,
            hard_timeout: None,
            action: FlowAction::Continue(Actions::new("resubmit(,47)").unwrap()),
        };
        ParsedFlow {
            priority,
            ..crate::ovs::as_event_flow(&spec)
        }
    }

    /// OVS's idle removal of the flow to `dst`, as the monitor reports it.
    fn idled(c: &mut Core, dst: &str, now: Instant) -> Monitored {
        let t = template();
        let (id, f) = c.flows.iter().find(|(id, _)| id.dst == ip(dst)).unwrap();
        let keys = c.flow_keys(id, f).unwrap();
        let (m, _) = physical(&t, keys, id, f.verdict).unwrap().remove(0);
        let cookie = Cookie::new(c.settings.cookie_prefix, id.pod, id.priority);
        let flow = parsed(cookie, &m, f.idle, None);
        c.on_flow_event(FlowEvent::Deleted(RemovedReason::Idle, flow), now)
    }

    #[test]
    fn a_then_aaaa_and_round_robin_answers_keep_every_flow_through_rule_updates() {
        let t0 = Instant::now();
        let mut c = core(EngineSettings::default(), t0);
        c.on_dns(
            answer("10.244.1.5", "www.google.com", &["142.250.1.1"], 300),
            t0,
            t0,
        );
        let aaaa = answer("fd00:10:244:1::5", "www.google.com", &["2a00:1450::1"], 300);
        c.on_dns(aaaa, t0, t0);
        // The next round-robin answer names another address.
        let t1 = t0 + MINUTE;
        c.on_dns(
            answer("10.244.1.5", "www.google.com", &["142.250.1.2"], 300),
            t1,
            t1,
        );
        let (deletes, added) = write(&mut c);
        assert!(deletes.is_empty());
        assert_eq!(added.len(), 3);

        // A status-only update (the same rules) changes nothing at all.
        assert!(!c.set_rules(google(), t1));
        assert!(!c.has_pending_changes());
        // A spec change that still allows them keeps every flow, deleting nothing.
        let t2 = t1 + MINUTE;
        let wider = rules(json!([
            {"type": "Allow", "to": {"dnsName": "*.google.com"}},
            {"type": "Allow", "to": {"dnsName": "example.com"}},
            {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}
        ]));
        assert!(c.set_rules(wider, t2));
        let (deletes, _) = write(&mut c);
        assert!(deletes.is_empty(), "{deletes:?}");
        assert_eq!(dsts(&c).len(), 3);

        // Each address expires on its own TTL: the first answer's goes, the newer one stays.
        let t3 = t0 + Duration::from_secs(300);
        assert_eq!(idled(&mut c, "142.250.1.1", t3), Monitored::Nothing);
        assert_eq!(dsts(&c), [ip("142.250.1.2"), ip("2a00:1450::1")]);
        // An idle report for a flow whose answer is still young is a flow to write again.
        assert_eq!(idled(&mut c, "142.250.1.2", t3), Monitored::Write);
        assert_eq!(dsts(&c).len(), 2);
    }

    #[test]
    fn a_recompute_removes_exactly_what_the_new_rules_no_longer_allow() {
        let t0 = Instant::now();
        let mut c = core(EngineSettings::default(), t0);
        c.on_dns(
            answer("10.244.1.5", "mail.google.com", &["142.250.1.1"], 300),
            t0,
            t0,
        );
        c.on_dns(
            answer("10.244.1.5", "example.com", &["93.184.216.34"], 300),
            t0,
            t0,
        );
        write(&mut c);
        assert_eq!(
            dsts(&c),
            [ip("142.250.1.1")],
            "example.com is not allowed yet"
        );
        // Long past every TTL, a rule change still decides from what the pod was told while its flow
        // carries traffic; what no flow uses is forgotten.
        let late = t0 + Duration::from_secs(3600);
        let both = rules(json!([
            {"type": "Allow", "to": {"dnsName": "*.google.com"}},
            {"type": "Allow", "to": {"dnsName": "example.com"}}
        ]));
        c.set_rules(both, late);
        let (deletes, added) = write(&mut c);
        assert!(
            deletes.is_empty() && added.is_empty(),
            "{deletes:?} {added:?}"
        );
        assert_eq!(dsts(&c), [ip("142.250.1.1")]);
        // The rule goes: its flows go at once.
        c.set_rules(
            rules(json!([{"type": "Allow", "to": {"dnsName": "example.com"}}])),
            late,
        );
        let (deletes, _) = write(&mut c);
        assert_eq!(deletes.len(), 1);
        assert!(dsts(&c).is_empty());
        // And a pod that leaves takes its flows with it.
        c.on_dns(
            answer("10.244.1.6", "example.com", &["93.184.216.34"], 300),
            late,
            late,
        );
        write(&mut c);
        c.remove_pod(&PodKey::new(NS, "pod2"));
        let (deletes, _) = write(&mut c);
        assert!(matches!(deletes[..], [FlowOp::DeleteCookie { .. }]));
        assert!(dsts(&c).is_empty());
    }

    #[test]
    fn a_pod_recreated_under_its_name_inherits_nothing() {
        let t0 = Instant::now();
        let mut c = core(EngineSettings::default(), t0);
        c.on_dns(
            answer("10.244.1.5", "www.google.com", &["142.250.1.1"], 300),
            t0,
            t0,
        );
        write(&mut c);
        c.upsert_pod(pod("pod1", &["10.244.1.5"], "new-uid"), t0);
        assert!(dsts(&c).is_empty());
        c.set_rules(
            rules(json!([{"type": "Allow", "to": {"dnsName": "google.com"}}])),
            t0,
        );
        assert!(
            dsts(&c).is_empty(),
            "the old pod's answers are not the new pod's"
        );
    }

    #[test]
    fn one_pod_with_ten_thousand_answers_does_not_starve_another() {
        let t0 = Instant::now();
        let settings = EngineSettings {
            max_grants_per_namespace: 6_000,
            ..EngineSettings::default()
        };
        let mut c = core(settings, t0);
        for i in 0..10_000u32 {
            let [_, _, a, b] = i.to_be_bytes();
            let name = format!("h{i}.google.com");
            let addr = format!("142.251.{a}.{b}");
            c.on_dns(answer("10.244.1.5", &name, &[&addr], 300), t0, t0);
        }
        assert_eq!(c.flows.len(), DEFAULT_MAX_GRANTS_PER_POD);
        assert_eq!(
            c.pods[&PodKey::new(NS, "pod1")].memory.len(),
            DEFAULT_MAX_GRANTS_PER_POD
        );
        c.on_dns(
            answer("10.244.1.6", "www.google.com", &["142.250.1.1"], 300),
            t0,
            t0,
        );
        assert!(
            c.flows.keys().any(|f| f.dst == ip("142.250.1.1")),
            "the other pod is granted"
        );
        let m = c.metrics.snapshot();
        assert_eq!(m.grants_dropped_pod, 5_000);
        // The namespace cap holds too: pod2 may take 999 more, not 1,000.
        for i in 0..1_000u32 {
            let addr = format!("142.252.{}.{}", i / 250, i % 250);
            c.on_dns(answer("10.244.1.6", "x.google.com", &[&addr], 300), t0, t0);
        }
        assert_eq!(c.flows.len(), 6_000);
        assert_eq!(c.metrics.snapshot().grants_dropped_namespace, 1);
    }

    #[test]
    fn a_namespace_without_an_egressfirewall_is_granted_later_from_answers_within_their_ttl() {
        let t0 = Instant::now();
        let mut c = core(EngineSettings::default(), t0);
        c.remove_rules(NS, t0);
        c.on_dns(
            answer("10.244.1.5", "www.google.com", &["142.250.1.1"], 300),
            t0,
            t0,
        );
        assert!(dsts(&c).is_empty());
        // Nothing can earn a flow from it yet: it waits in the node's window, not in the pod's memory.
        assert_eq!(c.pods[&PodKey::new(NS, "pod1")].memory.len(), 0);
        assert_eq!(c.recent.len(), 1);
        // An allowing EgressFirewall arrives within the TTL: the grant appears.
        let t1 = t0 + MINUTE;
        c.set_rules(google(), t1);
        let (_, added) = write(&mut c);
        assert_eq!(added, [ip("142.250.1.1")]);
        assert_eq!(c.pods[&PodKey::new(NS, "pod1")].memory.len(), 1);
        // The namespace loses its dnsName rule and regains it within the TTL: the grant comes back.
        let deny_all = rules(json!([{"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}]));
        c.set_rules(deny_all.clone(), t1 + MINUTE);
        assert!(dsts(&c).is_empty());
        assert_eq!(c.pods[&PodKey::new(NS, "pod1")].memory.len(), 0);
        assert_eq!(c.recent.len(), 1, "back in the window");
        c.set_rules(google(), t1 + 2 * MINUTE);
        assert_eq!(dsts(&c), [ip("142.250.1.1")]);
        // Past the TTL, a rule added later grants nothing from it.
        c.set_rules(deny_all, t0 + 5 * MINUTE);
        c.set_rules(google(), t0 + 6 * MINUTE);
        assert!(dsts(&c).is_empty());
    }

    #[test]
    fn pods_without_a_dns_name_rule_share_one_bounded_window() {
        let t0 = Instant::now();
        let mut c = core(EngineSettings::default(), t0);
        let deny_all = rules(json!([{"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}]));
        c.set_rules(deny_all, t0);
        for i in 0..RECENT_MAX as u32 + 1_000 {
            let [_, _, a, b] = i.to_be_bytes();
            let client = ["10.244.1.5", "10.244.1.6"][i as usize % 2];
            let (name, addr) = (format!("h{i}.google.com"), format!("142.251.{a}.{b}"));
            c.on_dns(answer(client, &name, &[&addr], 300), t0, t0);
        }
        assert_eq!(c.recent.len(), RECENT_MAX);
        assert!(c.pods.values().all(|p| p.memory.len() == 0));
        // The answers still within their TTL are there for a rule that comes later, as many as each
        // pod's cap takes.
        c.set_rules(google(), t0 + MINUTE);
        assert_eq!(c.flows.len(), 2 * DEFAULT_MAX_GRANTS_PER_POD);
    }

    #[test]
    fn a_pod_recreated_under_its_name_inherits_nothing_from_the_window() {
        let t0 = Instant::now();
        let mut c = core(EngineSettings::default(), t0);
        c.remove_rules(NS, t0);
        c.on_dns(
            answer("10.244.1.5", "www.google.com", &["142.250.1.1"], 300),
            t0,
            t0,
        );
        let old = c.pods[&PodKey::new(NS, "pod1")].id;
        c.upsert_pod(pod("pod1", &["10.244.1.5"], "new-uid"), t0);
        assert_eq!(
            c.pods[&PodKey::new(NS, "pod1")].id,
            old,
            "same name, same id"
        );
        c.set_rules(google(), t0);
        assert!(dsts(&c).is_empty());
    }

    #[test]
    fn adopted_flows_are_judged_once_the_cluster_is_listed() {
        let t0 = Instant::now();
        let mut c = core(EngineSettings::default(), t0);
        let t = template();
        // Flows an earlier run left: pod1's allowed one, one for a pod that is gone, and one with
        // ports its rule does not have.
        let pod1 = c.pods[&PodKey::new(NS, "pod1")].id;
        let keys = PortKeys {
            metadata: 1,
            reg14: 2,
        };
        let dump: Vec<ParsedFlow> = [
            (pod1, "10.244.1.5", "142.250.1.1", None),
            (pod1.wrapping_add(7), "10.244.1.9", "142.250.1.2", None),
            (
                pod1,
                "10.244.1.5",
                "142.250.1.3",
                Some(PortMatch {
                    protocol: crate::model::Protocol::Tcp,
                    port: 22,
                }),
            ),
        ]
        .into_iter()
        .map(|(pod, src, dst, l4)| {
            let id = FlowId {
                pod,
                priority: 11000,
                src: ip(src),
                dst: ip(dst),
                l4,
            };
            let (m, _) = physical(&t, keys, &id, Verdict::Allow).unwrap().remove(0);
            let cookie = Cookie::new(c.settings.cookie_prefix, pod, 11000);
            parsed(cookie, &m, 100, Some(11000))
        })
        .collect();
        c.reconcile(&dump, &t, t0);
        assert_eq!(
            c.flows.len(),
            3,
            "all adopted, nothing judged before the cluster is listed"
        );
        assert!(!c.has_pending_changes());
        assert!(c.set_synced());
        let (deletes, _) = write(&mut c);
        assert_eq!(deletes.len(), 2, "{deletes:?}");
        assert_eq!(dsts(&c), [ip("142.250.1.1")]);
        // A replayed answer justifies it: it counts as the pod's from now on.
        c.on_dns(
            answer("10.244.1.5", "www.google.com", &["142.250.1.1"], 300),
            t0,
            t0,
        );
        assert!(c.flows.values().all(|f| f.adopted.is_none()));
        assert_eq!(c.pods[&PodKey::new(NS, "pod1")].grants, 1);
    }

    /// The cluster is not listed in time: every flow an earlier run left goes (fail closed), the
    /// valid-looking one too; the ones a new answer justified stay. Before they were read, they
    /// are not adopted at all.
    #[test]
    fn flows_of_an_earlier_run_go_when_the_cluster_cannot_be_listed_in_time() {
        let t0 = Instant::now();
        let t = template();
        let keys = PortKeys {
            metadata: 1,
            reg14: 2,
        };
        let earlier = |c: &Core, dst: &str| {
            let pod = c.pods[&PodKey::new(NS, "pod1")].id;
            let id = FlowId {
                pod,
                priority: 11000,
                src: ip("10.244.1.5"),
                dst: ip(dst),
                l4: None,
            };
            let (m, _) = physical(&t, keys, &id, Verdict::Allow).unwrap().remove(0);
            parsed(
                Cookie::new(c.settings.cookie_prefix, pod, 11000),
                &m,
                100,
                Some(11000),
            )
        };
        let mut c = core(EngineSettings::default(), t0);
        let dump = vec![earlier(&c, "142.250.1.1"), earlier(&c, "142.250.1.2")];
        c.reconcile(&dump, &t, t0);
        c.on_dns(
            answer("10.244.1.5", "www.google.com", &["142.250.1.2"], 300),
            t0,
            t0,
        );
        assert_eq!(c.abandon_adopted(), 1);
        let (deletes, _) = write(&mut c);
        assert_eq!(deletes.len(), 1, "{deletes:?}");
        assert_eq!(dsts(&c), [ip("142.250.1.2")]);
        assert!(!c.set_synced(), "nothing left to judge once listed");

        let mut c = core(EngineSettings::default(), t0);
        assert_eq!(c.abandon_adopted(), 0);
        let dump = vec![earlier(&c, "142.250.1.1")];
        c.reconcile(&dump, &t, t0);
        assert!(c.flows.is_empty(), "not adopted: stale");
        assert!(c.has_pending_changes(), "and removed");
    }
}

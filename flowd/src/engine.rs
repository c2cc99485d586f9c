//! The engine: flowd's desired state and the loop that keeps `br-int` equal to it.
//!
//! The state itself — pods, what DNS told them, the flows that earns them, the changes waiting — is
//! the synchronous [`state`] core; this module is its thin async driver. Callers (the daemon, `flowd
//! replay`) feed it with cheap calls — [`Engine::upsert_pod`], [`Engine::remove_pod`],
//! [`Engine::set_rules`], [`Engine::remove_rules`], [`Engine::on_dns`] — and run [`Engine::run`] once
//! in a task: the flusher writes changes with `ovs-ofctl --bundle` (deletes in their own bundle
//! first, at most one batch in flight), the flow monitor reports flows OVS expired or someone else
//! deleted (ovn-controller wipes `br-int` when it reconnects), and a periodic reconcile against
//! `dump-flows` is the safety net. The first reconcile adopts the flows an earlier run left, so that a
//! restart never opens a gap in a connection the cluster still allows.

mod memory;
mod metrics;
mod state;

pub use memory::Remembered;
pub use metrics::{Metrics, MetricsSnapshot, BATCH_SECONDS_BUCKETS};
pub use state::{
    GrantView, HeldPod, NotHeld, MAX_BATCH_FLOWS, MAX_FLOWS, PENDING_MAX, PENDING_MAX_AGE,
};

use crate::{
    config::EngineSettings,
    model::{PodInfo, PodKey},
    ovs::{FlowOp, FlowProgrammer, LearnError, OvsError, Template},
    rules::FirewallRules,
};
use dnsflow_dnstap::DnsResponse;
use dnsflow_runtime::Backoff;
use ipnet::IpNet;
use state::{Core, FlowId, Monitored};
use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};
use tokio::sync::Notify;

/// Monitor restart backoff: from the first to the last, doubling.
const MONITOR_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// A monitor that ran this long before dying restarts at the shortest backoff again.
const MONITOR_HEALTHY: Duration = Duration::from_secs(30);
/// Learning the template dumps the whole bridge: while OVN's flows teach nothing yet (or a pod's switch
/// has no router port in the template), look again at most this often.
const DISCOVERY_RETRY: Duration = Duration::from_secs(5);
/// After a foreign wipe, the reconcile that checks OVN's tables again waits this long: ovn-controller
/// reinstalls its flows within a few hundred milliseconds of reconnecting.
pub const WIPE_SETTLE: Duration = Duration::from_secs(2);
/// After a wipe, OVN's flows are read again this often until they teach a template: ovn-controller
/// writes its flows within a few hundred milliseconds of reconnecting, and grants wait until then.
const WIPE_RETRY: Duration = Duration::from_millis(50);
/// Retry period for flows waiting for OVS (no ACL table or port keys yet) or after a failed batch...
const RETRY: Duration = Duration::from_millis(500);
/// ...growing up to this while batches keep failing.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// The first reconcile (which adopts what an earlier run left) waits at most this long for the
/// template; then it follows the reconcile interval.
const FIRST_RECONCILE_RETRY: Duration = Duration::from_secs(1);
/// Batches failing for this long make flowd not alive: a restart may help, and someone should look.
pub const STALL_LIMIT: Duration = Duration::from_secs(120);

/// The flows one DNS answer justifies (see [`Engine::on_dns_then_flush`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Justified(Vec<FlowId>);

impl Justified {
    /// The answer justifies no flow.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds the flows another answer justifies.
    pub fn extend(&mut self, other: Justified) {
        self.0.extend(other.0);
    }
}

/// Errors of the engine's OVS side.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Ovs(#[from] OvsError),
    /// flowd cannot be sure what a flow means on this OVN: it installs nothing.
    #[error("installing nothing: {0}")]
    NoTemplate(LearnError),
    /// The cluster's own networks are not known: a grant could open a Service or a router address.
    #[error("installing nothing: {0}")]
    NetworksUnknown(String),
}

struct Inner<P> {
    settings: EngineSettings,
    programmer: P,
    core: Mutex<Core>,
    wake: Notify,
    /// A foreign wipe was seen: reconcile (and rediscover) soon.
    wiped: Notify,
    /// How many foreign wipes were seen, for others who keep flows in br-int (the hold flows).
    wipes: tokio::sync::watch::Sender<u64>,
    /// Bundles OVS took (see [`Engine::commits`]).
    commits: std::sync::atomic::AtomicU64,
    /// The ACL table changed: the monitor must watch the new one.
    retarget: Notify,
    /// Held while a batch (or a reconcile) talks to OVS: at most one bundle in flight.
    apply_lock: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
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

/// Why a batch failed, for liveness: the first line of the error.
fn short(e: &OvsError) -> String {
    let s = e.to_string();
    s.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect()
}

impl<P: FlowProgrammer> Engine<P> {
    /// A new engine. `settings` should have passed [`EngineSettings::validate`].
    pub fn new(settings: EngineSettings, programmer: P) -> Self {
        let metrics = Arc::new(Metrics::default());
        Self {
            inner: Arc::new(Inner {
                core: Mutex::new(Core::new(settings.clone(), Arc::clone(&metrics))),
                settings,
                programmer,
                wake: Notify::new(),
                wiped: Notify::new(),
                wipes: tokio::sync::watch::channel(0).0,
                commits: std::sync::atomic::AtomicU64::new(0),
                retarget: Notify::new(),
                apply_lock: tokio::sync::Mutex::new(()),
                metrics,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.inner.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the core and wakes the flusher when it says something changed.
    fn change(&self, f: impl FnOnce(&mut Core) -> bool) {
        if f(&mut self.lock()) {
            self.inner.wake.notify_one();
        }
    }

    /// Only pods of this node get flows; [`Engine::upsert_pod`] treats other pods as removed.
    pub fn set_node(&self, node: impl Into<String>) {
        self.lock().set_node(node.into());
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.inner.settings
    }

    /// The decision's settings as they are now: the flags, with every discovered network excluded.
    pub fn policy(&self) -> crate::policy::PolicySettings {
        self.lock().policy.clone()
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

    /// Why nothing can be installed: the cluster's networks are unknown ([`Engine::set_networks_unknown`]),
    /// or grants wait for a template OVN's flows cannot teach. The daemon is not ready then. `None`
    /// when the networks are known and there is a template, or nothing waits for one.
    pub fn blocked(&self) -> Option<String> {
        self.lock().blocked()
    }

    /// Why flowd is not alive: batches have been failing for longer than [`STALL_LIMIT`].
    pub fn stalled(&self) -> Option<String> {
        let core = self.lock();
        let (since, why) = core.failing()?;
        let failing = since.elapsed();
        (failing >= STALL_LIMIT).then(|| {
            format!(
                "no batch of flows has reached OVS for {}s: {why}",
                failing.as_secs()
            )
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Counters and gauges, copied.
    pub fn metrics_snapshot(&self) -> MetricsSnapshot {
        let mut m = self.inner.metrics.snapshot();
        self.lock().gauges(&mut m);
        m
    }

    /// Registers the engine's counters, the gauges of its state and its flow programmer's metrics.
    pub fn register_metrics(&self, registry: &mut crate::metrics::Registry) {
        self.inner.metrics.register(registry);
        registry.collector(metrics::Gauges(self.clone()));
        self.inner.programmer.register_metrics(registry);
    }

    /// This node's pod subnets: answers to a client inside them with no known pod are held until the pod
    /// appears. Until set, the cluster subnets of the settings are used.
    pub fn set_local_subnets(&self, subnets: Vec<IpNet>) {
        self.lock().set_local_subnets(subnets);
    }

    /// Destinations discovered from the cluster that never earn a grant (see
    /// [`crate::cluster::node_exclusions`]), besides the configured cluster subnets.
    pub fn set_discovered_exclusions(&self, discovered: Vec<IpNet>) {
        self.change(|c| c.set_discovered_exclusions(discovered, Instant::now()));
    }

    /// `Some(why)` while the cluster's own networks (OVN-K's pod, service, join and masquerade
    /// subnets) are not known: nothing is written, not even what a reconcile would (an earlier run's
    /// flows stay as they are), and [`Engine::blocked`] says why. Answers are still decided and kept;
    /// set the networks ([`Engine::set_discovered_exclusions`]) before `None`, so that they are decided
    /// again before anything reaches OVS.
    pub fn set_networks_unknown(&self, why: Option<String>) {
        self.change(|c| {
            let released = c.networks_unknown.is_some() && why.is_none();
            c.networks_unknown = why;
            released
        });
    }

    /// Adds or updates a pod. A pod of another node is treated as removed. Answers held for its IPs are
    /// applied now.
    pub fn upsert_pod(&self, pod: PodInfo) {
        self.change(|c| c.upsert_pod(pod, Instant::now()));
    }

    /// Removes a pod: its flows go in the next batch (one delete by cookie), its answers are forgotten.
    pub fn remove_pod(&self, key: &PodKey) {
        self.change(|c| c.remove_pod(key));
    }

    /// Sets a namespace's validated EgressFirewall. Equal rules (a status-only update, a relist) change
    /// nothing; others decide its pods again from what they were told. Returns whether they changed.
    pub fn set_rules(&self, rules: FirewallRules) -> bool {
        let mut changed = false;
        self.change(|c| {
            changed = c.set_rules(rules, Instant::now());
            changed
        });
        changed
    }

    /// The namespace has no (valid) EgressFirewall any more: its flows go.
    pub fn remove_rules(&self, namespace: &str) {
        self.change(|c| c.remove_rules(namespace, Instant::now()));
    }

    /// A DNS answer the pod received at `at` (its TTL runs from there). Returns whether it justifies
    /// any flow: only then can the pod's next packet depend on a batch (this answer's, or one in
    /// flight for the same name), see [`Engine::flush`].
    pub fn on_dns(&self, resp: DnsResponse, at: Instant) -> bool {
        let mut justifies = false;
        self.change(|c| {
            justifies = !c.on_dns(resp, at, Instant::now()).is_empty();
            true
        });
        justifies
    }

    /// [`Engine::on_dns`] for a caller that writes the changes itself right after, with
    /// [`Engine::flush_then_hand_over`]: the flusher is not woken for them (see [`crate::hold`]).
    /// Returns the flows the answer justifies, for [`Engine::in_ovs`].
    pub fn on_dns_then_flush(&self, resp: DnsResponse, at: Instant) -> Justified {
        Justified(self.lock().on_dns(resp, at, Instant::now()))
    }

    /// Whether every flow of `justified` is in OVS (as far as the engine knows).
    pub fn in_ovs(&self, justified: &Justified) -> bool {
        self.lock().installed(&justified.0)
    }

    /// [`Engine::flush`], then what it left pending (OVS failed, no port keys yet) goes to the
    /// flusher: for changes made without waking it ([`Engine::on_dns_then_flush`]).
    pub async fn flush_then_hand_over(&self) -> Result<(), EngineError> {
        let result = self.flush().await;
        if self.has_pending_changes() {
            self.inner.wake.notify_one();
        }
        result
    }

    /// The Kubernetes state has been listed in full: the flows an earlier run left are judged against
    /// it (pod gone, rule changed) once they have been read.
    pub fn synced(&self) {
        self.change(Core::set_synced);
    }

    /// The Kubernetes state could not be listed in time: the flows an earlier run left are removed
    /// (see `Core::abandon_adopted`). Returns how many.
    pub fn abandon_adopted(&self) -> usize {
        let mut removed = 0;
        self.change(|c| {
            removed = c.abandon_adopted();
            removed > 0
        });
        removed
    }

    /// The pods whose DNS responses should be held (see [`crate::hold`]).
    pub fn held_pods(&self) -> Vec<HeldPod> {
        self.lock().held_pods()
    }

    /// What each pod of this node was told and can still use, with when each address came.
    pub fn remembered(&self) -> Vec<(PodInfo, Vec<Remembered>)> {
        self.lock().remembered()
    }

    /// Gives pod `pod` back an answer it had been given at `at` (see `Core::restore`); whether the
    /// pod still has the answer's address.
    pub fn restore(&self, pod: &PodInfo, resp: DnsResponse, at: Instant) -> bool {
        let mut restored = false;
        self.change(|c| {
            restored = c.restore(pod, resp, at, Instant::now());
            restored
        });
        restored
    }

    /// The pods of this node with port keys, in one look: those held, and those whose DNS replies
    /// need not wait (no `dnsName` rule).
    pub fn hold_ports(&self) -> (Vec<HeldPod>, Vec<HeldPod>) {
        self.lock().hold_ports()
    }

    /// The id of the pod with address `ip`, if flowd knows one.
    pub fn pod_id(&self, ip: std::net::IpAddr) -> Option<u16> {
        self.lock().pod_id(ip)
    }

    /// How many bundles OVS has taken from this engine: a change means its flow tables changed.
    pub fn commits(&self) -> u64 {
        self.inner
            .commits
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Changes whenever someone else (ovn-controller, reconnecting) deleted flowd's grants from
    /// br-int: what else flowd keeps there is gone too.
    pub fn wipes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.wipes.subscribe()
    }

    /// Whether `key`'s DNS responses should be held, or why not.
    pub fn hold_candidate(&self, key: &PodKey) -> Result<HeldPod, NotHeld> {
        self.lock().hold_candidate(key)
    }

    /// The grants the engine holds, optionally for one pod or one namespace, sorted by pod then priority.
    pub fn grants(&self, pod: Option<&PodKey>, namespace: Option<&str>) -> Vec<GrantView> {
        self.lock().grants(pod, namespace, Instant::now())
    }

    /// Whether changes are waiting for the next batch.
    pub fn has_pending_changes(&self) -> bool {
        self.lock().has_pending_changes()
    }

    /// Writes every pending change now, waiting for a batch in flight first: once it returns `Ok`,
    /// every change made before the call is in OVS (or waits for what cannot be written yet: a pod's
    /// port keys, a template), even one another task's batch took.
    pub async fn flush(&self) -> Result<(), EngineError> {
        let _guard = self.inner.apply_lock.lock().await;
        self.flush_locked().await
    }

    async fn ensure_template(&self) -> Result<Template, EngineError> {
        {
            let c = self.lock();
            if let Some(why) = &c.networks_unknown {
                return Err(EngineError::NetworksUnknown(why.clone()));
            }
            let recent = c
                .learned_at
                .is_some_and(|at| at.elapsed() < DISCOVERY_RETRY);
            match (&c.template, &c.learn_failed) {
                // After a wipe nothing is written before OVN's flows have been read again.
                _ if c.rediscover => {}
                (Some(t), _) if !c.relearn || recent => return Ok(t.clone()),
                (None, Some(e)) if recent => return Err(EngineError::NoTemplate(e.clone())),
                _ => {}
            }
        }
        self.learn().await
    }

    /// Learns the template from OVN's flows now. A template that differs from the one in use (an
    /// upgrade renumbered the tables, or changed the pipeline) moves every flow. After a wipe the ports
    /// may be new too: every pod's keys are looked up again.
    async fn learn(&self) -> Result<Template, EngineError> {
        let st = &self.inner.settings;
        let after_wipe = self.lock().rediscover;
        let learned = self
            .inner
            .programmer
            .learn_template(st.priority_base, st.acl_table)
            .await?;
        let found = {
            let mut c = self.lock();
            c.relearn = false;
            c.learned_at = Some(Instant::now());
            match learned {
                Ok(t) => {
                    if c.learn_failed.take().is_some() || c.template.is_none() {
                        tracing::info!(template = %t, "learned from OVN's flows what a grant must look like");
                    }
                    t
                }
                Err(e) => {
                    if c.learn_failed.as_ref() != Some(&e) {
                        tracing::warn!(reason = %e, "cannot learn from OVN's flows what a grant must look like; installing nothing");
                    }
                    Metrics::add(&self.inner.metrics.template_failures, 1);
                    c.learn_failed = Some(e.clone());
                    // A template learned before stays valid until OVN's flows show another one; but
                    // not after a wipe, while ovn-controller may still be writing another OVN's flows.
                    return match &c.template {
                        Some(t) if !after_wipe => Ok(t.clone()),
                        _ => Err(EngineError::NoTemplate(e)),
                    };
                }
            }
        };
        if after_wipe {
            self.fetch_keys(true).await?;
        }
        if self.lock().set_template(found.clone()) {
            self.inner.retarget.notify_one();
        }
        Ok(found)
    }

    /// Looks up datapath keys: of pods that need them (`all` false), or of every pod, when ports may
    /// have been recreated under the same iface-id (a wipe, a reconcile).
    async fn fetch_keys(&self, all: bool) -> Result<(), EngineError> {
        let Some(asked) = self.lock().keys_wanted(all, Instant::now()) else {
            return Ok(());
        };
        let ids: Vec<String> = asked.iter().cloned().collect();
        let found = self.inner.programmer.port_keys(&ids).await?;
        self.lock().set_keys(&asked, &found, Instant::now());
        Ok(())
    }

    /// Writes batches until nothing writable is left.
    async fn flush_locked(&self) -> Result<(), EngineError> {
        if self.lock().prefetch_keys {
            self.fetch_keys(false).await?;
        }
        while self.has_pending_changes() {
            if self.write_batch().await? == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Writes one batch: its deletes in one bundle, then its adds in another. A bundle OVS rejects
    /// is split in halves until the flow it refuses is found; that flow is dropped (and counted), the
    /// rest goes through. Returns how many operations were written.
    async fn write_batch(&self) -> Result<usize, EngineError> {
        let template = self.ensure_template().await?;
        self.fetch_keys(false).await?;
        let batch = self.lock().take_batch(&template);
        if batch.is_empty() {
            return Ok(0);
        }
        let mut written = 0;
        if !batch.deletes.is_empty() {
            if let Err(e) = self.apply(&batch.deletes).await {
                let mut c = self.lock();
                c.deletes_failed(batch.deletes);
                c.adds_failed(&batch.adds.iter().map(|(id, _)| *id).collect::<Vec<_>>());
                return Err(e.into());
            }
            written += batch.deletes.len();
        }
        // Halves still to write; a rejected one is split again.
        let mut todo = vec![batch.adds];
        while let Some(adds) = todo.pop() {
            if adds.is_empty() {
                continue;
            }
            let ops: Vec<FlowOp> = adds.iter().flat_map(|(_, ops)| ops.clone()).collect();
            let ids: Vec<FlowId> = adds.iter().map(|(id, _)| *id).collect();
            match self.apply(&ops).await {
                Ok(()) => {
                    self.lock().written(&ids, &template);
                    written += ops.len();
                }
                Err(e) if e.is_refusal() && adds.len() == 1 => {
                    self.lock().rejected(ids[0], &short(&e));
                }
                Err(e) if e.is_refusal() => {
                    let mut adds = adds;
                    let second = adds.split_off(adds.len() / 2);
                    todo.push(second);
                    todo.push(adds);
                }
                Err(e) => {
                    let mut c = self.lock();
                    c.adds_failed(&ids);
                    for rest in &todo {
                        c.adds_failed(&rest.iter().map(|(id, _)| *id).collect::<Vec<_>>());
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(written)
    }

    /// One bundle, timed and counted; liveness follows whether OVS takes it.
    async fn apply(&self, ops: &[FlowOp]) -> Result<(), OvsError> {
        let started = Instant::now();
        let result = self.inner.programmer.apply(ops).await;
        self.inner.metrics.batch(started.elapsed(), result.is_ok());
        if result.is_ok() {
            self.inner
                .commits
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        }
        // A refused flow is OVS answering: only an OVS that does not answer makes flowd not alive.
        let reached = match &result {
            Ok(()) => Ok(()),
            Err(e) if e.is_refusal() => Ok(()),
            Err(e) => Err(short(e)),
        };
        self.lock().batch_result(reached, Instant::now());
        result
    }

    /// Full reconcile against `dump-flows` (see `Core::reconcile`); the first one adopts the flows an
    /// earlier run left.
    pub async fn reconcile(&self) -> Result<(), EngineError> {
        let _guard = self.inner.apply_lock.lock().await;
        let template = self.ensure_template().await?;
        // Every pod's keys, fresh (a port recreated under the same iface-id has new ones), so that
        // flows are compared with the ports as they are now.
        self.fetch_keys(true).await?;
        self.flush_locked().await?;
        let dumped = self
            .inner
            .programmer
            .dump(self.inner.settings.cookie_prefix)
            .await?;
        self.lock().reconcile(&dumped, &template, Instant::now());
        Metrics::add(&self.inner.metrics.reconciles, 1);
        self.flush_locked().await
    }

    /// Runs the engine until the future is dropped: the flusher, the flow monitor (restarted with
    /// backoff) and the periodic reconcile.
    pub async fn run(self) {
        tokio::join!(self.flusher(), self.monitor_loop(), self.reconcile_loop());
    }

    async fn flusher(&self) {
        let mut failures = 0u32;
        let mut backoff = Backoff::new(RETRY, RETRY_MAX);
        loop {
            if failures > 0 {
                // OVS refuses or is away: back off (events keep accumulating into the next batch).
                tokio::time::sleep(backoff.next_delay()).await;
            }
            if self.has_pending_changes() {
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
                Ok(()) => {
                    failures = 0;
                    backoff.reset();
                }
                // Normal until OVN has ACL flows on this node; discovery itself is rate-limited.
                Err(e @ (EngineError::NoTemplate(_) | EngineError::NetworksUnknown(_))) => {
                    tracing::debug!(error = %e, "flows wait");
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, failures, "writing flows failed; retrying");
                }
            }
        }
    }

    async fn monitor_loop(&self) {
        let mut backoff = Backoff::new(MONITOR_BACKOFF.0, MONITOR_BACKOFF.1);
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
                        match self.lock().on_flow_event(event, Instant::now()) {
                            Monitored::Nothing => {}
                            Monitored::Write => self.inner.wake.notify_one(),
                            Monitored::Wiped => {
                                self.inner.wake.notify_one();
                                self.inner.wiped.notify_one();
                                self.inner.wipes.send_modify(|n| *n += 1);
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot start the flow monitor"),
            }
            Metrics::add(&self.inner.metrics.monitor_restarts, 1);
            if started.elapsed() > MONITOR_HEALTHY {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::warn!(retry_in = ?delay, "flow monitor ended; restarting");
            tokio::time::sleep(delay).await;
        }
    }

    async fn reconcile_loop(&self) {
        // The first reconcile adopts what an earlier run left: as soon as OVN's flows teach a template.
        loop {
            match self.reconcile().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "first reconcile waits");
                    tokio::time::sleep(FIRST_RECONCILE_RETRY).await;
                }
            }
        }
        let period = self.inner.settings.reconcile_interval;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
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
        model::Verdict,
        ovs::{
            flow, template,
            template::{Pipeline, Variant},
            Actions, Cookie, FlowAction, FlowSpec, PortKeys, Recording, RemovedReason,
        },
    };
    use dnsflow_dnstap::Answer;
    use dnsflow_dnstap::DnsName;
    use proptest::prelude::*;
    use serde_json::json;
    use state::{physical, KEYS_RETRY};
    use std::net::IpAddr;

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
            delivery_table: Some(65),
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
            delivery_table: Some(65),
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
            uid: None,
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
        engine_on(Recording::new(Some(target())), EngineSettings::for_kind())
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
            ..EngineSettings::for_kind()
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
            Instant::now(),
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
        assert_eq!(f.cookie.prefix(), crate::config::DEFAULT_COOKIE_PREFIX);
        assert_eq!(f.cookie.priority(), 11000);
        let grants = e.grants(Some(&PodKey::new(NS, "pod1")), None);
        assert_eq!(grants.len(), 2);
        assert!(grants
            .iter()
            .all(|g| g.installed && g.reason.as_ref().unwrap().rule_index == 0));
        assert_eq!(e.metrics_snapshot().flows_installed, 2);
    }

    #[tokio::test]
    async fn a_repeated_answer_writes_nothing_a_longer_one_refreshes() {
        let e = engine();
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        let now = Instant::now();
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
            Instant::now(),
        );
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("10.244.2.9", 60)]),
            Instant::now(),
        );
        e.on_dns(
            answer("192.0.2.1", "google.com", &[("142.250.1.1", 60)]),
            Instant::now(),
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
            Instant::now(),
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
        let t0 = Instant::now();
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
        let now = Instant::now();
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
        let now = Instant::now();
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
        let e = engine_on(fake, EngineSettings::for_kind());
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        let run = tokio::spawn(e.clone().run());
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.0.1", 60)]),
            Instant::now(),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        for i in 2..=50 {
            e.on_dns(
                answer(
                    "10.244.1.5",
                    "google.com",
                    &[(&format!("142.250.0.{i}"), 60)],
                ),
                Instant::now(),
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
        let now = Instant::now();
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
            Instant::now(),
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
        let e = engine_on(Recording::new(Some(tiered())), EngineSettings::for_kind());
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.0.1", 300)]),
            Instant::now(),
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
            Instant::now(),
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
            Instant::now(),
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
            Instant::now(),
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
        let run = tokio::spawn(e.clone().run());
        // The first reconcile (adopting what an earlier run left) runs at once; then the interval.
        while e.metrics_snapshot().reconciles == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        e.programmer().fail_next(1);
        let now = Instant::now();
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
    async fn a_flow_ovs_refuses_is_dropped_and_the_rest_of_its_batch_and_every_delete_go_through() {
        let e = engine();
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        e.upsert_pod(pod("pod2", "10.244.1.6"));
        e.on_dns(
            answer("10.244.1.6", "google.com", &[("142.250.9.9", 60)]),
            Instant::now(),
        );
        e.flush().await.unwrap();
        // One bad flow among four, and a revocation in the same batch.
        e.programmer().refuse(ip("142.250.1.3"));
        e.remove_pod(&PodKey::new(NS, "pod2"));
        let four = [1, 2, 3, 4].map(|i| (format!("142.250.1.{i}"), 60));
        let four: Vec<(&str, u32)> = four.iter().map(|(a, t)| (a.as_str(), *t)).collect();
        e.on_dns(answer("10.244.1.5", "google.com", &four), Instant::now());
        e.flush().await.unwrap();
        let mut dsts: Vec<IpAddr> = e
            .programmer()
            .flows()
            .iter()
            .map(|f| f.matches.dst)
            .collect();
        dsts.sort();
        assert_eq!(
            dsts,
            [ip("142.250.1.1"), ip("142.250.1.2"), ip("142.250.1.4")],
            "pod2's flow revoked, the refused one dropped, the rest written"
        );
        let m = e.metrics_snapshot();
        assert_eq!((m.flows_rejected, m.flows_desired), (1, 3));
        assert!(e.grants(None, None).iter().all(|g| g.installed));
        assert!(e.stalled().is_none(), "OVS answered: alive");
        assert!(!e.has_pending_changes());
    }

    #[tokio::test]
    async fn a_hard_timeout_ends_the_grant_even_before_its_ttl() {
        let capped = EngineSettings {
            hard_cap: Some(Duration::from_secs(60)),
            ..EngineSettings::for_kind()
        };
        let e = engine_on(Recording::new(Some(target())), capped);
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        let run = tokio::spawn(e.clone().run());
        let long = answer("10.244.1.5", "google.com", &[("142.250.0.1", 3600)]);
        e.on_dns(long, Instant::now());
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
                cookie: Cookie::new(crate::config::DEFAULT_COOKIE_PREFIX, pod, 11000),
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
            Instant::now(),
        );
        // Pod 7 is no pod of this node: once the cluster is listed, its flows go.
        e.synced();
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
            Instant::now(),
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
        e.lock().age_missed_keys(KEYS_RETRY);
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
        assert!(s.every_pod_has_keys(), "one lookup for both");
        assert!(!s.prefetch_keys);
    }

    #[tokio::test]
    async fn pods_of_other_nodes_get_nothing() {
        let e = engine();
        e.set_node("node2");
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        e.on_dns(
            answer("10.244.1.5", "google.com", &[("142.250.1.1", 60)]),
            Instant::now(),
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
            Instant::now(),
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

    /// Until the cluster's networks are known nothing reaches OVS, not even a reconcile's adds; once
    /// they are, answers kept meanwhile are decided against them: one inside the service subnet the
    /// networks revealed earns nothing, the other is written.
    #[tokio::test]
    async fn while_the_networks_are_unknown_nothing_is_written() {
        let e = engine();
        e.set_networks_unknown(Some("ConfigMap ovn-kubernetes/ovn-config not found".into()));
        e.upsert_pod(pod("pod1", "10.244.1.5"));
        e.on_dns(
            answer(
                "10.244.1.5",
                "google.com",
                &[("142.250.1.1", 60), ("172.30.0.10", 60)],
            ),
            Instant::now(),
        );
        assert!(matches!(
            e.flush().await,
            Err(EngineError::NetworksUnknown(_))
        ));
        assert!(matches!(
            e.reconcile().await,
            Err(EngineError::NetworksUnknown(_))
        ));
        assert!(e.programmer().batches().is_empty());
        assert_eq!(
            e.blocked().as_deref(),
            Some("ConfigMap ovn-kubernetes/ovn-config not found")
        );
        e.set_discovered_exclusions(vec!["172.30.0.0/16".parse().unwrap()]);
        e.set_networks_unknown(None);
        e.flush().await.unwrap();
        let flows = e.programmer().flows();
        assert_eq!(flows.len(), 1, "{flows:?}");
        assert_eq!(flows[0].matches.dst, ip("142.250.1.1"));
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
                e.on_dns(resp, Instant::now());
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

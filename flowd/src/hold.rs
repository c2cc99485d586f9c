//! Held DNS responses: what flowd does with a pod's DNS response that OVS paused on its way to the
//! pod (an `NXT_PACKET_IN2` with a continuation, from flowd's own controller id). Only replies from
//! the cluster's own resolvers are held and learned (see [`crate::resolvers`]): a pod that asks a
//! DNS server of its own gets its answer, and flowd learns nothing from it. A trusted answer goes
//! to the engine exactly as a tapd event would; when it needs grants that are not in OVS yet, they
//! are written first, then ovs-vswitchd's revalidators finish a round over the datapath's cached
//! flows (a drop cached for that traffic before the grant would catch the pod's next packet until
//! then), and only then is the packet resumed, so the pod's first packet to the answer finds its
//! flow. The response is resumed exactly once, whatever happens: at once when it needs nothing
//! (not a DNS response, not NOERROR, no rule), after the grants otherwise (even when another batch
//! already took them: an earlier answer for the same name), and at the deadline at the latest, so
//! that flowd never breaks DNS; each outcome has its own counter ([`HoldMetrics`]). Beyond
//! [`HoldRate`] or [`MAX_HELD`] a response goes on at once, unheld, its answer given to the engine
//! all the same.
//!
//! [`HoldFlows`] keeps the flows that hold and count, only while flowd's own OpenFlow connection is
//! up, and tells a [`HoldReport`] (what `Explain` says) which pods are held.

use crate::{
    engine::{Engine, HeldPod, Justified, NotHeld},
    metrics::Registry,
    ovs::{
        flow::PREFIX_MASK, native::CONTROLLER_ID, unixctl::Revalidation, Cookie, FlowOp,
        FlowProgrammer, HoldSpec, Native,
    },
    resolvers::ResolverSet,
    tcpdns::Streams,
};
use dnsflow_dnstap::{
    packet::{self, PacketError},
    DnsName, DnsResponse,
};
use dnsflow_openflow::PacketIn2;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge, histogram::Histogram};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    future::Future,
    net::IpAddr,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};
use tokio::sync::{mpsc, watch, Semaphore};

/// How long a held response may wait for its grants by default (Cilium's proxy holds as long).
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(100);
/// Responses held at once; beyond it a response is resumed at once, unheld (counted).
pub const MAX_HELD: usize = 1024;
/// Responses held per second by default, on the node and per pod (see [`HoldRate`]).
pub const DEFAULT_RATE: HoldRate = HoldRate {
    total: NonZeroU32::new(2000).unwrap(),
    per_pod: NonZeroU32::new(200).unwrap(),
};

/// How many responses per second may be held, on the node and per pod (each a token bucket with a
/// second's worth of burst). Beyond either, a response goes on at once, unheld (counted), and its
/// answer still reaches the engine: a pod that floods itself with DNS replies costs others nothing,
/// and nothing is ever dropped. (An OVS meter on the hold flow could only drop the excess: a lost
/// DNS answer, which the hold must never cause.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldRate {
    pub total: NonZeroU32,
    pub per_pod: NonZeroU32,
}

/// [`HoldRate`]'s buckets.
#[derive(Debug)]
struct Limits {
    total: DefaultDirectRateLimiter,
    /// Keyed by the address the reply goes to: a port of this node, so as many buckets as the
    /// node has pods; those no longer used are dropped now and then ([`Limits::forget_idle`]).
    per_pod: DefaultKeyedRateLimiter<IpAddr>,
}

impl Limits {
    fn new(rate: HoldRate) -> Self {
        Self {
            total: RateLimiter::direct(Quota::per_second(rate.total)),
            per_pod: RateLimiter::keyed(Quota::per_second(rate.per_pod)),
        }
    }

    /// Whether a response to `pod` may be held now (the pod's bucket first, so that a pod over its
    /// own rate takes nothing from the node's).
    fn admit(&self, pod: Option<IpAddr>) -> bool {
        pod.is_none_or(|ip| self.per_pod.check_key(&ip).is_ok()) && self.total.check().is_ok()
    }

    /// Drops the buckets that are full again (no reply for a second or more).
    fn forget_idle(&self) {
        self.per_pod.retain_recent();
    }
}

/// The per-pod buckets are looked through for idle ones after this many held responses.
const FORGET_IDLE_EVERY: u64 = 4096;
/// The server named in events from held responses: the packet tells only the server's address.
const IDENTITY: &str = "br-int";

/// Sends a held packet on its way: the native connection's `NXT_RESUME` (a trait so that the
/// holder's ordering can be tested against the recording bridge).
pub trait Resumer: Send + Sync + 'static {
    fn resume(&self, held: &PacketIn2) -> impl Future<Output = Result<(), String>> + Send;

    /// Asks OVS to say when its datapath has been revalidated against the flow tables as they are
    /// from now on ([`Revalidation`]); `None` where there is no such thing to wait for.
    fn revalidation(&self) -> impl Future<Output = Option<Revalidation>> + Send {
        std::future::ready(None)
    }
}

/// Where the hold flows sit in OVN's delivery table: above OVN's per-port flows (100), below
/// anything OVN adds above them to block a port.
pub const HOLD_PRIORITY: u16 = 110;
/// Where a pod of a namespace without a `dnsName` rule has its replies pass the hold flows: its
/// DNS replies wait for nothing.
pub const PASS_PRIORITY: u16 = 111;
/// Where the counting flow sits: below the hold flows (replies from a trusted resolver never reach
/// it), above OVN's per-port flow.
pub const COUNT_PRIORITY: u16 = 105;
/// How often the pods are compared with those the flows were written for, and the counting flows
/// read.
const CHANGE_CHECK: Duration = Duration::from_secs(1);
/// Default hard timeout of a hold flow: a flowd that dies stops holding DNS within it.
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(10);

/// The hold flows' cookie prefix: the grants' with its low bits flipped ("dnsf" gives "dnsh"), so
/// that the engine's dumps, monitor and reconcile, which read the grants' prefix only, never take a
/// hold flow for a stale grant.
pub fn hold_cookie_prefix(grant_prefix: u32) -> u32 {
    grant_prefix ^ 0x0e
}

/// Whether and how flowd holds DNS responses now, for `Explain`: written by [`HoldFlows`], off with
/// its reason when the daemon does not hold at all. It also keeps what the counting flows told (how
/// many DNS replies each pod received from servers flowd does not trust) and how each pod's last
/// held response ended.
#[derive(Debug)]
pub struct HoldReport {
    state: Mutex<HoldState>,
    /// Replies from untrusted servers per pod id, since the pod was first held.
    untrusted: Mutex<BTreeMap<u16, u64>>,
    /// How each pod's last held response ended, with its question name.
    last: Mutex<BTreeMap<u16, (Outcome, Option<String>)>>,
    /// `dnsflow_dns_untrusted_total`: the same, for the node, plus those the holder itself saw.
    untrusted_total: Counter,
    /// 1 while the hold flows are in OVS for at least one trusted resolver.
    holding: Gauge,
    /// Pods whose namespace has a `dnsName` rule whose replies are not held now (no hold flows:
    /// connection down, no template, no trusted resolver): they learn only from tapd, if deployed.
    uncovered: Gauge,
}

#[derive(Debug)]
enum HoldState {
    Off(String),
    On {
        deadline: Duration,
        /// The hold flows are in OVS, for these resolvers.
        written: Option<ResolverSet>,
        /// Why the last round of hold flows was not written.
        failing: Option<String>,
    },
}

impl Default for HoldReport {
    fn default() -> Self {
        Self::off("the hold is not running")
    }
}

impl HoldReport {
    fn with(state: HoldState) -> Self {
        Self {
            state: Mutex::new(state),
            untrusted: Mutex::default(),
            last: Mutex::default(),
            untrusted_total: Counter::default(),
            holding: Gauge::default(),
            uncovered: Gauge::default(),
        }
    }

    /// After a round: whether the hold flows are in OVS, and how many pods that should be held
    /// are not.
    fn coverage(&self, holding: bool, governed: usize) {
        self.holding.set(i64::from(holding));
        let uncovered = if holding { 0 } else { governed };
        self.uncovered
            .set(i64::try_from(uncovered).unwrap_or(i64::MAX));
    }

    /// flowd does not hold, for this reason (a flag, the driver).
    pub fn off(why: impl Into<String>) -> Self {
        Self::with(HoldState::Off(why.into()))
    }

    /// flowd holds for at most `deadline`; no hold flow is written yet.
    pub fn on(deadline: Duration) -> Self {
        Self::with(HoldState::On {
            deadline,
            written: None,
            failing: None,
        })
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "dns_holding",
            "1 while flowd's hold flows are in br-int for at least one trusted DNS resolver",
            self.holding.clone(),
        );
        registry.register(
            "dns_uncovered_pods",
            "Pods of namespaces with a dnsName rule whose DNS replies are not held now (Explain says why); they learn only from tapd",
            self.uncovered.clone(),
        );
        registry.counter(
            "dns_untrusted",
            "DNS replies to held pods from servers flowd does not trust (not the cluster's DNS Service nor --trusted-resolver): neither held nor learned",
            &self.untrusted_total,
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HoldState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn untrusted(&self) -> std::sync::MutexGuard<'_, BTreeMap<u16, u64>> {
        self.untrusted.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lasts(&self) -> std::sync::MutexGuard<'_, BTreeMap<u16, (Outcome, Option<String>)>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A round ended: the hold flows are in OVS for `resolvers`, or were not written, for this
    /// reason.
    fn round(&self, result: Result<&ResolverSet, &str>) {
        if let HoldState::On {
            written, failing, ..
        } = &mut *self.lock()
        {
            match result {
                Ok(trusted) => {
                    *written = Some(trusted.clone());
                    *failing = None;
                }
                Err(why) => *failing = Some(why.to_owned()),
            }
        }
    }

    /// Every hold flow is gone (the connection that took their packets was lost): nothing is held
    /// until the next round writes them again.
    fn lost(&self, why: &str) {
        if let HoldState::On {
            written, failing, ..
        } = &mut *self.lock()
        {
            *written = None;
            *failing = Some(why.to_owned());
        }
    }

    /// `n` more replies from untrusted servers reached `pod` (`None`: a pod flowd does not know).
    pub(crate) fn count_untrusted(&self, pod: Option<u16>, n: u64) {
        if n == 0 {
            return;
        }
        self.untrusted_total.inc_by(n);
        if let Some(pod) = pod {
            *self.untrusted().entry(pod).or_default() += n;
        }
    }

    /// Forgets what it knows of pods no longer on the node (their ids may be reused).
    fn keep_pods(&self, pods: &BTreeSet<u16>) {
        self.untrusted().retain(|id, _| pods.contains(id));
        self.lasts().retain(|id, _| pods.contains(id));
    }

    /// `pod`'s last held response, asking `qname`, ended so.
    pub(crate) fn ended(&self, pod: u16, outcome: Outcome, qname: Option<String>) {
        self.lasts().insert(pod, (outcome, qname));
    }

    /// The node's count of replies from untrusted servers.
    pub fn untrusted_total(&self) -> u64 {
        self.untrusted_total.get()
    }

    /// Whether the hold flows are in OVS (`dnsflow_dns_holding`), and how many pods that should be
    /// held are not (`dnsflow_dns_uncovered_pods`), as of the last look.
    pub fn coverage_now(&self) -> (bool, u64) {
        (
            self.holding.get() == 1,
            u64::try_from(self.uncovered.get()).unwrap_or(0),
        )
    }

    /// Whether `pod`'s DNS responses are held now ([`Engine::hold_candidate`]'s answer), and one
    /// line saying why, or why not; with how its last held response ended and how many replies
    /// from untrusted servers it received.
    pub fn explain(&self, pod: Result<HeldPod, NotHeld>) -> (bool, String) {
        let id = pod.as_ref().ok().map(|p| p.id);
        let untrusted = id
            .and_then(|id| self.untrusted().get(&id).copied())
            .unwrap_or(0);
        let last = id.and_then(|id| self.lasts().get(&id).cloned());
        let (held, mut line) = self.held(pod);
        if let Some((outcome, qname)) = last {
            let asked = qname.map(|q| format!(" ({q})")).unwrap_or_default();
            let _ = write!(line, "; its last held response{asked} {}", outcome.says());
        }
        if untrusted > 0 {
            let resolvers = match &*self.lock() {
                HoldState::On {
                    written: Some(r), ..
                } => r.to_string(),
                _ => "none".to_owned(),
            };
            let _ = write!(
                line,
                "; {untrusted} DNS replies from servers other than the trusted resolvers \
                 ({resolvers}) reached it and taught flowd nothing"
            );
        }
        (held, line)
    }

    fn held(&self, pod: Result<HeldPod, NotHeld>) -> (bool, String) {
        match (&*self.lock(), pod) {
            (HoldState::Off(why), _) => (false, format!("DNS responses are not held: {why}")),
            (HoldState::On { .. }, Err(why)) => {
                (false, format!("its DNS responses are not held: {why}"))
            }
            (
                HoldState::On {
                    failing: Some(e), ..
                },
                Ok(_),
            ) => (
                false,
                format!("its DNS responses are not held: hold flows could not be written: {e}"),
            ),
            (
                HoldState::On {
                    written: Some(resolvers),
                    ..
                },
                Ok(_),
            ) if resolvers.is_empty() => (
                false,
                "its DNS responses are not held: flowd trusts no DNS server yet (the DNS Service \
                 not read, no --trusted-resolver)"
                    .to_owned(),
            ),
            (
                HoldState::On {
                    written: Some(resolvers),
                    deadline,
                    ..
                },
                Ok(_),
            ) => (
                true,
                format!(
                    "its DNS responses from {resolvers} are held in br-int until their grants are \
                     in OVS, at most {} ms",
                    deadline.as_millis()
                ),
            ),
            (HoldState::On { written: None, .. }, Ok(_)) => (
                false,
                "its DNS responses are not held yet: the hold flows are written within a second"
                    .to_owned(),
            ),
        }
    }
}

/// The pods the flows of a round were written for: (those held and counted, those passed).
type Covered = (BTreeSet<u16>, BTreeSet<u16>);

fn covered(held: &[HeldPod], passed: &[HeldPod]) -> Covered {
    (
        held.iter().map(|p| p.id).collect(),
        passed.iter().map(|p| p.id).collect(),
    )
}

/// Keeps the flows that hold, pass and count DNS replies in OVN's delivery table (see
/// [`HoldSpec`]):
///
/// - per trusted resolver, one flow for UDP and one for TCP replies from it to any port of the node,
///   paused for flowd: a pod whose port just came up is held from its first reply, before flowd
///   knows its port;
/// - per pod of a namespace without a `dnsName` rule, flows above them that let its replies go on
///   unpaused (written once flowd knows its port);
/// - per pod held, one flow per family below them that counts the replies from any other server.
///
/// They are written again when the pods or the trusted resolvers change, every third of the hard
/// timeout (which restarts it: a flowd that stops stops holding within the timeout), and after an
/// ovn-controller wipe. They exist only while flowd's own OpenFlow connection is up: written over
/// it and never through `ovs-ofctl` (see [`Native`]'s `apply`), and all deleted the moment it ends
/// (through `ovs-ofctl` if need be): a packet paused for a connection that is gone would be lost.
#[derive(Debug)]
pub struct HoldFlows {
    engine: Engine<Native>,
    hard_timeout: Duration,
    resolvers: watch::Receiver<ResolverSet>,
    /// The pods the flows in OVS were written for; `None` when none are written.
    written: Option<Covered>,
    /// Packets each counting flow (pod id, IPv6) had counted when last read.
    counted: HashMap<(u16, bool), u64>,
    report: Arc<HoldReport>,
}

impl HoldFlows {
    /// Holds replies from `resolvers` only (see [`crate::resolvers`]); replies from anyone else are
    /// counted.
    pub fn new(
        engine: Engine<Native>,
        hard_timeout: Duration,
        resolvers: watch::Receiver<ResolverSet>,
    ) -> Self {
        Self {
            engine,
            hard_timeout,
            resolvers,
            written: None,
            counted: HashMap::new(),
            report: Arc::new(HoldReport::on(DEFAULT_DEADLINE)),
        }
    }

    /// Tells `report` (which `Explain` reads) what is held after each round.
    pub fn reporting_to(mut self, report: Arc<HoldReport>) -> Self {
        self.report = report;
        self
    }

    /// What this writes into (and `Explain` reads).
    pub fn report(&self) -> &Arc<HoldReport> {
        &self.report
    }

    fn prefix(&self) -> u32 {
        hold_cookie_prefix(self.engine.settings().cookie_prefix)
    }

    /// One round for the pods as they are now: every flow written anew, in one atomic bundle.
    /// Returns how many pods are held and counted.
    pub async fn refresh(&mut self) -> Result<usize, String> {
        let (held, passed) = self.engine.hold_ports();
        self.round(&held, &passed).await
    }

    /// One round for `held` and `passed` (see [`Engine::hold_ports`]), told to the report.
    async fn round(&mut self, held: &[HeldPod], passed: &[HeldPod]) -> Result<usize, String> {
        let result = self.write_round(held, passed).await;
        match &result {
            Ok(resolvers) => self.report.round(Ok(resolvers)),
            Err(e) => self.report.round(Err(e)),
        }
        result.map(|_| held.len())
    }

    /// Tells the report whether the hold flows are in OVS and how many of `governed` pods (those
    /// with a `dnsName` rule) are therefore not held.
    fn coverage(&self, governed: usize) {
        let holding = self.written.is_some() && !self.resolvers.borrow().is_empty();
        self.report.coverage(holding, governed);
    }

    /// Writes the round; returns the resolvers the flows hold for.
    async fn write_round(
        &mut self,
        held: &[HeldPod],
        passed: &[HeldPod],
    ) -> Result<ResolverSet, String> {
        let template = self.engine.template().ok_or(
            "OVN's flows have not taught flowd what a grant looks like yet: nothing is held",
        )?;
        let table = template
            .delivery_table
            .ok_or("OVN's flows name no delivery table (OFTABLE_LOG_TO_PHY): nothing is held")?;
        let resolvers = self.resolvers.borrow_and_update().clone();
        let prefix = self.prefix();
        let hard_timeout = u16::try_from(self.hard_timeout.as_secs().max(1)).unwrap_or(u16::MAX);
        let spec = |id: u16, priority: u16, v6: bool, tcp: bool| HoldSpec {
            cookie: Cookie::new(prefix, id, priority),
            table,
            priority,
            v6,
            tcp,
            from: None,
            to: None,
            pause: None,
            hard_timeout,
        };
        // Everything of the last round goes in the same bundle as what replaces it: a reply sees
        // the flows before or after, never none.
        let mut ops = vec![FlowOp::DeleteCookie {
            table,
            cookie: Cookie::new(prefix, 0, 0),
            mask: PREFIX_MASK,
        }];
        for from in resolvers.iter() {
            for tcp in [false, true] {
                ops.push(FlowOp::Hold(HoldSpec {
                    from: Some(from),
                    pause: Some(CONTROLLER_ID),
                    ..spec(0, HOLD_PRIORITY, from.is_ipv6(), tcp)
                }));
            }
        }
        let families = |p: &HeldPod| {
            [(false, p.v4), (true, p.v6)]
                .into_iter()
                .filter_map(|(v6, has)| has.then_some(v6))
        };
        for pod in passed {
            for v6 in families(pod) {
                for tcp in [false, true] {
                    ops.push(FlowOp::Hold(HoldSpec {
                        to: Some((pod.keys.metadata, pod.keys.reg14)),
                        ..spec(pod.id, PASS_PRIORITY, v6, tcp)
                    }));
                }
            }
        }
        for pod in held {
            for v6 in families(pod) {
                ops.push(FlowOp::Hold(HoldSpec {
                    to: Some((pod.keys.metadata, pod.keys.reg14)),
                    ..spec(pod.id, COUNT_PRIORITY, v6, false)
                }));
            }
        }
        // The counts so far, before the flows are written again.
        self.read_counts(table).await;
        self.engine
            .programmer()
            .apply(&ops)
            .await
            .map_err(|e| e.to_string())?;
        let covered = covered(held, passed);
        self.counted.retain(|(id, _), _| covered.0.contains(id));
        self.report.keep_pods(&covered.0);
        self.written = Some(covered);
        Ok(resolvers)
    }

    /// Reads the counting flows' packets and reports what is new since the last reading. A flow
    /// that counts fewer than before was written anew: all it counts is new.
    async fn read_counts(&mut self, table: u8) {
        let Some((held, _)) = &self.written else {
            return;
        };
        let prefix = self.prefix();
        let flows = match self
            .engine
            .programmer()
            .flow_stats(
                table,
                Cookie::new(prefix, 0, COUNT_PRIORITY).0,
                PREFIX_MASK | u64::from(u16::MAX),
            )
            .await
        {
            Ok(flows) => flows,
            Err(error) => {
                tracing::debug!(%error, "counting flows not read");
                return;
            }
        };
        for flow in flows {
            let Some(packets) = flow.counters.packets else {
                continue;
            };
            let pod = Cookie(flow.cookie).pod_id();
            let v6 = flow.matches.fields.eth_type == Some(dnsflow_openflow::ETH_TYPE_IPV6);
            let last = self.counted.insert((pod, v6), packets).unwrap_or(0);
            let new = if packets >= last {
                packets - last
            } else {
                packets
            };
            self.report
                .count_untrusted(held.contains(&pod).then_some(pod), new);
        }
    }

    /// Deletes every hold, pass and counting flow: DNS goes straight to the pods again.
    pub async fn clear(&mut self) -> Result<(), String> {
        self.written = None;
        self.counted.clear();
        let all = FlowOp::DeleteCookie {
            table: dnsflow_openflow::OFPTT_ALL,
            cookie: Cookie::new(self.prefix(), 0, 0),
            mask: PREFIX_MASK,
        };
        // No hold flow in it: it may go through ovs-ofctl when the connection is gone.
        self.engine
            .programmer()
            .apply(&[all])
            .await
            .map_err(|e| e.to_string())
    }

    /// Until `shutdown`: looks every second whether the pods changed and reads the counting flows,
    /// rewrites everything every third of the hard timeout, when the trusted resolvers change, and
    /// after a wipe of br-int (ovn-controller reconnecting deletes every flow) until OVN's own
    /// flows are back; removes every flow the moment flowd's OpenFlow connection ends; then clears.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let period = (self.hard_timeout / 3).max(Duration::from_secs(1));
        let mut tick = tokio::time::interval(CHANGE_CHECK.min(period));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut wipes = self.engine.wipes();
        let mut lost = self.engine.programmer().connection_lost();
        tokio::pin!(shutdown);
        let mut failing = false;
        let mut last: Option<Instant> = None;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = tick.tick() => {}
                Ok(()) = wipes.changed() => {
                    // Gone with the rest: written again at the next tick.
                    self.written = None;
                    last = None;
                    continue;
                }
                Ok(()) = lost.changed() => {
                    if self.written.is_some() {
                        let why = "flowd's OpenFlow connection to the bridge ended: what it held is lost";
                        tracing::warn!("{why}; removing the hold flows, DNS responses go to pods unheld until it is back");
                        self.report.lost(why);
                        if let Err(error) = self.clear().await {
                            tracing::warn!(%error, "hold flows not removed; their hard timeout ends them");
                        }
                        self.coverage(self.engine.held_pods().len());
                        last = None;
                    }
                    continue;
                }
                Ok(()) = self.resolvers.changed() => {
                    last = None;
                }
            }
            let (held, passed) = self.engine.hold_ports();
            let due = last.is_none_or(|t| t.elapsed() >= period)
                || self.written.as_ref() != Some(&covered(&held, &passed));
            if due {
                match self.round(&held, &passed).await {
                    Ok(_) => {
                        last = Some(Instant::now());
                        failing = false;
                    }
                    Err(error) if !failing => {
                        failing = true;
                        tracing::warn!(%error, "hold flows not written; DNS responses go to pods unheld");
                    }
                    Err(_) => {}
                }
            } else if let Some(table) = self.engine.template().and_then(|t| t.delivery_table) {
                self.read_counts(table).await;
            }
            self.coverage(held.len());
        }
        if let Err(error) = self.clear().await {
            tracing::warn!(%error, "hold flows not removed; their hard timeout ends them");
        }
    }
}

/// The engine's own native connection resumes what it held.
impl Resumer for Engine<Native> {
    async fn resume(&self, held: &PacketIn2) -> Result<(), String> {
        Resumer::resume(self.programmer(), held).await
    }

    async fn revalidation(&self) -> Option<Revalidation> {
        Resumer::revalidation(self.programmer()).await
    }
}

/// What the holder counts. Every response it sees ends in exactly one of: `granted`, `no_grant`,
/// `deadline_misses`, `revalidation_timeouts`, `write_failures`, `grants_pending`, `untrusted`,
/// `unreadable`, `unheld`, `rate_limited`; `resumed` counts them all once more as they go on.
#[derive(Debug)]
pub struct HoldMetrics {
    pub held: Counter,
    pub resumed: Counter,
    /// Held until their grants were committed to OVS and its datapath revalidated: the only outcome
    /// that protects the pod's first packet.
    pub granted: Counter,
    /// The answer justifies no grant (no rule matches, not NOERROR): sent on at once.
    pub no_grant: Counter,
    /// Resumed at the deadline, before their grants were in OVS.
    pub deadline_misses: Counter,
    /// Resumed at the deadline with their grants in OVS, before a revalidation round was seen to
    /// end (the datapath may still hold a drop cached for the traffic).
    pub revalidation_timeouts: Counter,
    /// Resumed because writing their grants failed (OVS refused or is away, no template, the
    /// cluster's networks unknown).
    pub write_failures: Counter,
    /// Resumed with their grants still waiting (no port keys yet, a grant cap).
    pub grants_pending: Counter,
    /// From a server flowd does not trust: sent on at once, not learned (a hold flow written for a
    /// resolver that is no longer trusted).
    pub untrusted: Counter,
    /// Resumed at once because [`MAX_HELD`] were held already.
    pub unheld: Counter,
    /// Resumed at once because their pod or the node was over its [`HoldRate`].
    pub rate_limited: Counter,
    /// Paused packets that were not a DNS response flowd could read (resumed at once).
    pub unreadable: Counter,
    /// TCP segments from a trusted resolver that complete no DNS message (handshake, acks, the
    /// first parts of a message): resumed at once.
    pub tcp_partial: Counter,
    /// TCP segments of a stream flowd does not follow (see [`crate::tcpdns::Unfollowed`]).
    pub tcp_unfollowed: Counter,
    pub resume_failures: Counter,
    pub hold_seconds: Histogram,
}

/// How one held response ended: each has its counter in [`HoldMetrics`], and `Explain` tells a
/// pod's last one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Granted,
    NoGrant,
    DeadlineMiss,
    RevalidationTimeout,
    WriteFailed,
    GrantsPending,
    Untrusted,
    Unreadable,
    Unheld,
    RateLimited,
    TcpPartial,
    TcpUnfollowed,
}

impl Outcome {
    /// What happened, for people.
    pub fn says(self) -> &'static str {
        match self {
            Self::Granted => "went on after its grants were in OVS and its datapath revalidated",
            Self::NoGrant => "went on at once: it justified no grant",
            Self::DeadlineMiss => "went on at the deadline, before its grants were in OVS",
            Self::RevalidationTimeout => {
                "went on at the deadline with its grants in OVS, before OVS was seen to revalidate its datapath"
            }
            Self::WriteFailed => "went on without its grants: writing them failed",
            Self::GrantsPending => {
                "went on without its grants: they wait (its port keys not known yet, or a grant cap)"
            }
            Self::Untrusted => "went on at once, not learned: its server is not trusted",
            Self::Unreadable => "went on at once: not a DNS response flowd reads",
            Self::Unheld => "went on at once, unheld: too many responses were held",
            Self::RateLimited => {
                "went on at once, unheld: its pod or the node was over --hold-rate"
            }
            Self::TcpPartial => "went on at once: a TCP segment that completes no DNS message",
            Self::TcpUnfollowed => {
                "went on at once: a DNS-over-TCP stream flowd does not follow (its start unseen, or beyond its bounds)"
            }
        }
    }
}

impl HoldMetrics {
    /// The counter of `outcome`.
    fn of(&self, outcome: Outcome) -> &Counter {
        match outcome {
            Outcome::Granted => &self.granted,
            Outcome::NoGrant => &self.no_grant,
            Outcome::DeadlineMiss => &self.deadline_misses,
            Outcome::RevalidationTimeout => &self.revalidation_timeouts,
            Outcome::WriteFailed => &self.write_failures,
            Outcome::GrantsPending => &self.grants_pending,
            Outcome::Untrusted => &self.untrusted,
            Outcome::Unreadable => &self.unreadable,
            Outcome::Unheld => &self.unheld,
            Outcome::RateLimited => &self.rate_limited,
            Outcome::TcpPartial => &self.tcp_partial,
            Outcome::TcpUnfollowed => &self.tcp_unfollowed,
        }
    }

    fn new() -> Self {
        Self {
            held: Counter::default(),
            resumed: Counter::default(),
            granted: Counter::default(),
            no_grant: Counter::default(),
            deadline_misses: Counter::default(),
            revalidation_timeouts: Counter::default(),
            write_failures: Counter::default(),
            grants_pending: Counter::default(),
            untrusted: Counter::default(),
            unheld: Counter::default(),
            rate_limited: Counter::default(),
            unreadable: Counter::default(),
            tcp_partial: Counter::default(),
            tcp_unfollowed: Counter::default(),
            resume_failures: Counter::default(),
            hold_seconds: Histogram::new([
                0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            ]),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.counter("dns_held", "DNS responses OVS held for flowd", &self.held);
        registry.counter("dns_resumed", "Held DNS responses sent on", &self.resumed);
        registry.counter(
            "dns_hold_granted",
            "Held DNS responses sent on after their grants were committed to OVS and its datapath revalidated",
            &self.granted,
        );
        registry.counter(
            "dns_hold_no_grant",
            "Held DNS responses that justified no grant (sent on at once)",
            &self.no_grant,
        );
        registry.counter(
            "dns_hold_deadline_misses",
            "Held DNS responses sent on at the deadline, before their grants were in OVS",
            &self.deadline_misses,
        );
        registry.counter(
            "dns_hold_revalidation_timeouts",
            "Held DNS responses sent on at the deadline with their grants in OVS, before OVS was seen to revalidate its datapath",
            &self.revalidation_timeouts,
        );
        registry.counter(
            "dns_hold_write_failures",
            "Held DNS responses sent on because their grants could not be written (OVS, no template, networks unknown)",
            &self.write_failures,
        );
        registry.counter(
            "dns_hold_grants_pending",
            "Held DNS responses sent on with their grants still waiting (no port keys yet, a grant cap)",
            &self.grants_pending,
        );
        registry.counter(
            "dns_hold_untrusted",
            "Held packets from a DNS server flowd no longer trusts (sent on at once, not learned)",
            &self.untrusted,
        );
        registry.counter(
            "dns_unheld",
            "Held DNS responses sent on at once because too many were held",
            &self.unheld,
        );
        registry.counter(
            "dns_hold_rate_limited",
            "Held DNS responses sent on at once because their pod or the node was over --hold-rate",
            &self.rate_limited,
        );
        registry.counter(
            "dns_hold_unreadable",
            "Held packets that were not a readable DNS response (sent on at once)",
            &self.unreadable,
        );
        registry.counter(
            "dns_hold_tcp_partial",
            "Held TCP segments from a trusted resolver that complete no DNS message (sent on at once)",
            &self.tcp_partial,
        );
        registry.counter(
            "dns_hold_tcp_unfollowed",
            "Held TCP segments of a DNS-over-TCP stream flowd does not follow: its start unseen, or beyond its bounds (sent on at once)",
            &self.tcp_unfollowed,
        );
        registry.counter(
            "dns_resume_failures",
            "Held DNS responses OVS did not take back (lost connection)",
            &self.resume_failures,
        );
        registry.register_with_unit(
            "dns_hold",
            "How long held DNS responses waited",
            prometheus_client::registry::Unit::Seconds,
            self.hold_seconds.clone(),
        );
    }
}

/// The address a held packet goes to: the pod's.
fn client_of(held: &PacketIn2) -> Option<IpAddr> {
    packet::destination(&held.packet)
}

/// How the write of a held answer's grants ended.
enum Written {
    /// Committed (or nothing was left to write), by the deadline.
    InTime,
    /// It failed, by the deadline: nothing more to wait for.
    Failed,
    /// Still going at the deadline.
    Late,
}

/// Turns held responses into grants, then lets them go.
#[derive(Debug)]
pub struct Holder<P: FlowProgrammer, R: Resumer> {
    engine: Engine<P>,
    resumer: Arc<R>,
    deadline: Duration,
    resolvers: watch::Receiver<ResolverSet>,
    slots: Arc<Semaphore>,
    limits: Arc<Limits>,
    metrics: Arc<HoldMetrics>,
    report: Option<Arc<HoldReport>>,
    /// The DNS-over-TCP connections followed, shared by every held segment.
    tcp: Arc<Mutex<Streams>>,
}

impl<P: FlowProgrammer, R: Resumer> Clone for Holder<P, R> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            resumer: self.resumer.clone(),
            deadline: self.deadline,
            resolvers: self.resolvers.clone(),
            slots: self.slots.clone(),
            limits: self.limits.clone(),
            metrics: self.metrics.clone(),
            report: self.report.clone(),
            tcp: self.tcp.clone(),
        }
    }
}

impl<P: FlowProgrammer, R: Resumer> Holder<P, R> {
    /// Learns only from responses whose source is one of `resolvers` (see [`crate::resolvers`]).
    pub fn new(
        engine: Engine<P>,
        resumer: Arc<R>,
        deadline: Duration,
        resolvers: watch::Receiver<ResolverSet>,
    ) -> Self {
        Self {
            engine,
            resumer,
            deadline,
            resolvers,
            slots: Arc::new(Semaphore::new(MAX_HELD)),
            limits: Arc::new(Limits::new(DEFAULT_RATE)),
            metrics: Arc::new(HoldMetrics::new()),
            report: None,
            tcp: Arc::default(),
        }
    }

    /// Holds at most `rate` responses per second (default [`DEFAULT_RATE`]).
    pub fn with_rate(mut self, rate: HoldRate) -> Self {
        self.limits = Arc::new(Limits::new(rate));
        self
    }

    /// Counts the untrusted responses it sees into `report` too (the node's
    /// `dnsflow_dns_untrusted_total` and Explain's count per pod).
    pub fn reporting_to(mut self, report: Arc<HoldReport>) -> Self {
        self.report = Some(report);
        self
    }

    pub fn metrics(&self) -> &Arc<HoldMetrics> {
        &self.metrics
    }

    /// Counts how a held response to `pod` ended, and tells the report (for `Explain`).
    fn ended(&self, pod: Option<u16>, outcome: Outcome, qname: Option<&DnsName>) {
        self.metrics.of(outcome).inc();
        if let Some((report, pod)) = self.report.as_ref().zip(pod) {
            report.ended(pod, outcome, qname.map(ToString::to_string));
        }
    }

    /// The id of the pod a held packet goes to, if the engine knows it.
    fn pod_of(&self, held: &PacketIn2) -> Option<u16> {
        self.engine.pod_id(client_of(held)?)
    }

    /// Handles every held packet `packet_ins` delivers, each on its own task, until it closes.
    pub async fn run(self, mut packet_ins: mpsc::Receiver<PacketIn2>) {
        while let Some(held) = packet_ins.recv().await {
            self.metrics.held.inc();
            if self.metrics.held.get().is_multiple_of(FORGET_IDLE_EVERY) {
                self.limits.forget_idle();
            }
            if !self.limits.admit(client_of(&held)) {
                let pod = self.pod_of(&held);
                self.ended(pod, Outcome::RateLimited, None);
                self.pass(held, pod).await;
                continue;
            }
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        this.handle(held).await;
                        drop(slot);
                    });
                }
                Err(_) => {
                    let pod = self.pod_of(&held);
                    self.ended(pod, Outcome::Unheld, None);
                    self.pass(held, pod).await;
                }
            }
        }
    }

    /// The responses `held` (a reply to `pod`) gives the engine: the one of a UDP reply, or the
    /// messages a TCP segment completes (see [`crate::tcpdns`]), only from a trusted resolver.
    /// Otherwise how it ends (counted by the caller), with the question name when there is one.
    fn read(
        &self,
        held: &PacketIn2,
        pod: Option<u16>,
    ) -> Result<Vec<DnsResponse>, (Outcome, Option<DnsName>)> {
        let now = SystemTime::now();
        let untrusted = |server: std::net::SocketAddr, client: IpAddr| {
            if let Some(report) = &self.report {
                report.count_untrusted(pod, 1);
            }
            tracing::debug!(%server, %client,
                "held DNS response from a server flowd does not trust; sending it on, learning nothing");
        };
        let segment = match packet::reply(&held.packet, IDENTITY, now) {
            Ok(reply) if self.resolvers.borrow().trusts(reply.server) => {
                return Ok(vec![reply.response])
            }
            Ok(reply) => {
                untrusted(reply.server, reply.response.client);
                return Err((Outcome::Untrusted, Some(reply.response.qname)));
            }
            Err(PacketError::NotUdp) => packet::tcp_segment(&held.packet),
            Err(error) => Err(error),
        }
        .map_err(|error| {
            tracing::debug!(%error, "held packet is not a DNS response flowd reads; sending it on");
            (Outcome::Unreadable, None)
        })?;
        if !self.resolvers.borrow().trusts(segment.server) {
            untrusted(segment.server, segment.client.ip());
            return Err((Outcome::Untrusted, None));
        }
        let followed = self
            .tcp
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_segment(&segment, Instant::now());
        if let Some(why) = followed.unfollowed {
            tracing::debug!(server = %segment.server, client = %segment.client, ?why,
                "a DNS-over-TCP stream flowd does not follow; its segments go on untouched");
            return Err((Outcome::TcpUnfollowed, None));
        }
        if followed.messages.is_empty() {
            return Err((Outcome::TcpPartial, None));
        }
        let mut responses = Vec::new();
        for message in followed.messages {
            match packet::tcp_response(&message, segment.client.ip(), IDENTITY, now) {
                Ok((response, _)) => responses.push(response),
                Err(error) => {
                    tracing::debug!(%error, "a DNS-over-TCP message flowd cannot read; sending it on")
                }
            }
        }
        if responses.is_empty() {
            return Err((Outcome::Unreadable, None));
        }
        Ok(responses)
    }

    /// A response not held: sent on at once, its answers to the engine all the same (their grants
    /// follow with the next batch, as a tapd event's would) when its server is trusted.
    async fn pass(&self, held: PacketIn2, pod: Option<u16>) {
        let now = Instant::now();
        for response in self.read(&held, pod).unwrap_or_default() {
            self.engine.on_dns(response, now);
        }
        self.resume(&held, now).await;
    }

    /// One held response: its answers to the engine, their grants written and in effect in the
    /// datapath (within the deadline), then the resume, exactly once; what happened counted once.
    pub async fn handle(&self, held: PacketIn2) {
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + self.deadline);
        let pod = self.pod_of(&held);
        match self.read(&held, pod) {
            Err((outcome, qname)) => self.ended(pod, outcome, qname.as_ref()),
            Ok(responses) => {
                let commits = self.engine.commits();
                // Not `has_pending_changes`: the flusher may have taken these answers' grants (or
                // those of an earlier answer for the same name) into a batch still in flight, and
                // only a flush, which waits for that batch, knows when they are in OVS.
                let qname = responses.last().map(|r| r.qname.clone());
                let mut justified = Justified::default();
                for response in responses {
                    justified.extend(self.engine.on_dns_then_flush(response, started));
                }
                let outcome = if justified.is_empty() {
                    Outcome::NoGrant
                } else {
                    // Asked before this flush commits the grants, so that the round it waits for
                    // is one that saw them. (The flusher, not woken for this answer, may still
                    // commit them first in a batch of its own: then the wait may last until OVS's
                    // next periodic round, which the deadline cuts short.)
                    let revalidation = self.resumer.revalidation().await;
                    match self.write(deadline).await {
                        Written::Late => Outcome::DeadlineMiss,
                        Written::Failed => Outcome::WriteFailed,
                        Written::InTime if !self.engine.in_ovs(&justified) => {
                            Outcome::GrantsPending
                        }
                        Written::InTime
                            if self.engine.commits() != commits
                                && !Self::revalidated(revalidation, deadline).await =>
                        {
                            Outcome::RevalidationTimeout
                        }
                        Written::InTime => Outcome::Granted,
                    }
                };
                self.ended(pod, outcome, qname.as_ref());
            }
        }
        self.resume(&held, started).await;
    }

    /// Writes what is pending, by `deadline` at the latest.
    async fn write(&self, deadline: tokio::time::Instant) -> Written {
        // The write goes on in its own task past the deadline: a batch dropped halfway would be
        // lost (the engine's flush is not cancel-safe).
        let engine = self.engine.clone();
        let writing = tokio::spawn(async move { engine.flush_then_hand_over().await });
        match tokio::time::timeout_at(deadline, writing).await {
            Ok(Ok(Ok(()))) => Written::InTime,
            Ok(Ok(Err(error))) => {
                tracing::debug!(%error, "held response's grants not written; sending it on");
                Written::Failed
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "writing a held response's grants failed; sending it on");
                Written::Failed
            }
            Err(_) => {
                tracing::debug!(deadline = ?self.deadline,
                    "held response's grants not in OVS at the deadline; sending it on");
                Written::Late
            }
        }
    }

    /// Waits, by `deadline` at the latest, until OVS's revalidators have checked the datapath's
    /// cached flows against the new tables: a drop cached for this traffic a moment ago would
    /// otherwise catch the pod's first packet though its grant is in. Whether that was in time.
    async fn revalidated(
        revalidation: Option<Revalidation>,
        deadline: tokio::time::Instant,
    ) -> bool {
        let Some(revalidation) = revalidation else {
            return true;
        };
        match tokio::time::timeout_at(deadline, revalidation.done()).await {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                tracing::debug!(%error, "cannot wait for OVS to revalidate; sending the held response on");
                true
            }
            Err(_) => false,
        }
    }

    async fn resume(&self, held: &PacketIn2, since: Instant) {
        if let Err(error) = self.resumer.resume(held).await {
            self.metrics.resume_failures.inc();
            tracing::warn!(%error, "a held DNS response could not be sent on");
        }
        self.metrics.resumed.inc();
        self.metrics
            .hold_seconds
            .observe(since.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::EngineSettings,
        egressfirewall::EgressFirewall,
        model::{PodInfo, PodKey},
        ovs::{PortKeys, Recording, Template},
        rules::FirewallRules,
    };
    use bytes::Bytes;
    use dnsflow_openflow::RawMatch;
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{rdata, Name, RData, Record, RecordType},
    };
    use serde_json::json;
    use std::{net::IpAddr, str::FromStr, sync::Mutex};

    /// Records each resume with what the bridge held at that moment.
    #[derive(Default)]
    struct Recorder {
        bridge: Mutex<Option<Engine<Recording>>>,
        resumes: Mutex<Vec<(Bytes, usize)>>,
        /// An ovs-vswitchd control socket stand-in that takes `revalidator/wait` and never answers.
        revalidator: Mutex<Option<std::path::PathBuf>>,
    }

    impl Resumer for Recorder {
        async fn resume(&self, held: &PacketIn2) -> Result<(), String> {
            let flows = self
                .bridge
                .lock()
                .unwrap()
                .as_ref()
                .map_or(0, |e| e.programmer().flows().len());
            self.resumes
                .lock()
                .unwrap()
                .push((held.continuation.clone().unwrap_or_default(), flows));
            Ok(())
        }

        async fn revalidation(&self) -> Option<Revalidation> {
            let socket = self.revalidator.lock().unwrap().clone()?;
            Revalidation::start(&socket).await.ok()
        }
    }

    fn dns(qname: &str, ip: [u8; 4]) -> Vec<u8> {
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(Name::from_str(qname).unwrap(), RecordType::A));
        m.add_answer(Record::from_rdata(
            Name::from_str(qname).unwrap(),
            60,
            RData::A(rdata::A(ip.into())),
        ));
        m.to_vec().unwrap()
    }

    /// The kube-dns Service's address the tests' replies come from.
    const KUBE_DNS: [u8; 4] = [10, 96, 0, 10];

    fn trusted() -> watch::Receiver<ResolverSet> {
        crate::resolvers::fixed(["10.96.0.10:53".parse().unwrap()])
    }

    /// An Ethernet/IPv4/UDP frame from `server`:53 to `client`:40000 carrying `payload`.
    fn frame(server: [u8; 4], client: [u8; 4], payload: &[u8]) -> Bytes {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
        let total = 20 + 8 + payload.len();
        let mut ip = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0,
            0,
            64,
            17,
            0,
            0,
        ];
        ip.extend(server);
        ip.extend(client);
        f.extend(ip);
        let udp_len = 8 + payload.len();
        f.extend([0, 53, 0x9c, 0x40, (udp_len >> 8) as u8, udp_len as u8, 0, 0]);
        f.extend(payload);
        Bytes::from(f)
    }

    /// A reply from kube-dns, paused by pod 1's hold flow.
    fn held(client: [u8; 4], qname: &str, ip: [u8; 4], id: u8) -> PacketIn2 {
        held_from(KUBE_DNS, client, qname, ip, id)
    }

    fn held_from(server: [u8; 4], client: [u8; 4], qname: &str, ip: [u8; 4], id: u8) -> PacketIn2 {
        PacketIn2 {
            packet: frame(server, client, &dns(qname, ip)),
            full_len: None,
            buffer_id: None,
            table_id: 65,
            cookie: Some(1),
            reason: 1,
            metadata: RawMatch::default(),
            userdata: Bytes::new(),
            continuation: Some(Bytes::from(vec![id])),
        }
    }

    fn setup(
        delay: Duration,
    ) -> (
        Holder<Recording, Recorder>,
        Arc<Recorder>,
        Engine<Recording>,
    ) {
        setup_with(Some(Template::stand_in(46, 1, 1)), delay)
    }

    /// ns1/pod1 (10.244.1.5) under "Allow example.com, Deny 0.0.0.0/0" on a bridge whose OVN flows
    /// teach `template`, answering after `delay`; the holder trusts kube-dns.
    fn setup_with(
        template: Option<Template>,
        delay: Duration,
    ) -> (
        Holder<Recording, Recorder>,
        Arc<Recorder>,
        Engine<Recording>,
    ) {
        let bridge = Recording::with_delay(template, delay);
        bridge.set_port(
            "ns1_pod1",
            PortKeys {
                metadata: 1,
                reg14: 2,
            },
        );
        let engine = Engine::new(EngineSettings::for_kind(), bridge);
        let ef = EgressFirewall::inline(
            "ns1",
            json!([{"type": "Allow", "to": {"dnsName": "example.com"}},
                   {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}]),
        )
        .unwrap();
        engine.set_rules(FirewallRules::from_egress_firewall(&ef).unwrap());
        engine.upsert_pod(PodInfo {
            uid: None,
            key: PodKey::new("ns1", "pod1"),
            ips: vec![IpAddr::from([10, 244, 1, 5])],
            node: "n1".into(),
        });
        let recorder = Arc::new(Recorder::default());
        *recorder.bridge.lock().unwrap() = Some(engine.clone());
        let holder = Holder::new(
            engine.clone(),
            recorder.clone(),
            Duration::from_millis(100),
            trusted(),
        );
        (holder, recorder, engine)
    }

    /// An allowed answer is resumed only once its grant is in OVS; an answer that needs nothing
    /// (another name, a packet that is not DNS) is resumed at once, with nothing written.
    #[tokio::test]
    async fn a_response_is_sent_on_only_after_its_grant_is_in_ovs() {
        let (holder, recorder, bridge) = setup(Duration::from_millis(20));
        holder
            .handle(held([10, 244, 1, 5], "www.example.com.", [192, 0, 2, 7], 1))
            .await;
        holder
            .handle(held([10, 244, 1, 5], "www.other.test.", [192, 0, 2, 8], 2))
            .await;
        let mut junk = held([10, 244, 1, 5], "x.", [0; 4], 3);
        junk.packet = Bytes::from_static(b"not a frame");
        holder.handle(junk).await;
        let resumes = recorder.resumes.lock().unwrap().clone();
        let flows = bridge.programmer().flows().len();
        assert!(flows >= 1);
        assert_eq!(
            resumes,
            [
                (Bytes::from(vec![1]), flows),
                (Bytes::from(vec![2]), flows),
                (Bytes::from(vec![3]), flows)
            ],
            "each resumed once, the first after its grant"
        );
        let m = holder.metrics();
        assert_eq!(
            (
                m.resumed.get(),
                m.granted.get(),
                m.no_grant.get(),
                m.unreadable.get(),
                m.deadline_misses.get()
            ),
            (3, 1, 1, 1, 0)
        );
    }

    /// A pod asked a DNS server of its own (another pod) for an allowed name and got an address of
    /// the server's choosing: the reply goes on at once, the engine learns nothing, nothing is
    /// granted, and the reply is counted for the pod; held or passed unheld alike. The same answer
    /// from kube-dns is granted.
    #[tokio::test]
    async fn a_reply_from_a_server_flowd_does_not_trust_teaches_nothing() {
        let (holder, recorder, bridge) = setup(Duration::ZERO);
        let report = Arc::new(HoldReport::on(Duration::from_millis(100)));
        let holder = holder.reporting_to(report.clone());
        let own_server = [10, 244, 1, 9];
        holder
            .handle(held_from(
                own_server,
                [10, 244, 1, 5],
                "www.example.com.",
                [192, 0, 2, 66],
                1,
            ))
            .await;
        let unheld = held_from(
            own_server,
            [10, 244, 1, 5],
            "api.example.com.",
            [192, 0, 2, 67],
            2,
        );
        let pod = holder.pod_of(&unheld);
        holder.pass(unheld, pod).await;
        bridge.flush().await.unwrap();
        assert_eq!(recorder.resumes.lock().unwrap().len(), 2, "both went on");
        assert!(bridge.grants(None, None).is_empty(), "nothing learned");
        assert!(bridge.programmer().flows().is_empty());
        let m = holder.metrics();
        assert_eq!(
            (m.untrusted.get(), m.granted.get(), m.no_grant.get()),
            (1, 0, 0)
        );
        // Both reached the pod from an untrusted server, held or not.
        assert_eq!(report.untrusted_total(), 2);
        let pod1 = bridge.pod_id(IpAddr::from([10, 244, 1, 5])).unwrap();
        assert_eq!(report.untrusted().get(&pod1), Some(&2));

        holder
            .handle(held(
                [10, 244, 1, 5],
                "www.example.com.",
                [192, 0, 2, 66],
                3,
            ))
            .await;
        let granted: Vec<IpAddr> = bridge
            .grants(None, None)
            .iter()
            .map(|g| g.key.dst)
            .collect();
        assert_eq!(granted, [IpAddr::from([192, 0, 2, 66])]);
        assert_eq!(m.granted.get(), 1);
    }

    /// A held answer whose grant cannot be written yet (the pod's port is not in br-int) goes on
    /// with its grant pending, counted as such; with no template, as a failed write.
    #[tokio::test]
    async fn a_response_whose_grant_is_not_in_ovs_is_not_counted_as_granted() {
        let (holder, _recorder, engine) = setup(Duration::ZERO);
        engine.upsert_pod(PodInfo {
            uid: None,
            key: PodKey::new("ns1", "portless"),
            ips: vec![IpAddr::from([10, 244, 1, 6])],
            node: "n1".into(),
        });
        holder
            .handle(held([10, 244, 1, 6], "www.example.com.", [192, 0, 2, 7], 1))
            .await;
        let m = holder.metrics();
        assert_eq!((m.grants_pending.get(), m.granted.get()), (1, 0));

        let (holder, _, _) = setup_with(None, Duration::ZERO);
        holder
            .handle(held([10, 244, 1, 5], "www.example.com.", [192, 0, 2, 7], 1))
            .await;
        let m = holder.metrics();
        assert_eq!(
            (m.write_failures.get(), m.granted.get()),
            (1, 0),
            "no template"
        );
    }

    /// The grant is committed but ovs-vswitchd never says it revalidated its datapath: the response
    /// goes on at the deadline, counted as such and not as held until its grants.
    #[tokio::test]
    async fn a_revalidation_that_never_ends_is_counted_apart() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("ovs-vswitchd.1.ctl");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let silent = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                kept.push(conn);
            }
        });
        let (holder, recorder, bridge) = setup(Duration::ZERO);
        *recorder.revalidator.lock().unwrap() = Some(socket);
        let started = Instant::now();
        holder
            .handle(held([10, 244, 1, 5], "www.example.com.", [192, 0, 2, 7], 1))
            .await;
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert!(!bridge.programmer().flows().is_empty(), "committed");
        let m = holder.metrics();
        assert_eq!(
            (
                m.revalidation_timeouts.get(),
                m.granted.get(),
                m.deadline_misses.get()
            ),
            (1, 0, 0)
        );
        silent.abort();
    }

    /// The same answer came from tapd a moment earlier and its batch is still on its way to OVS:
    /// nothing is pending any more, yet the held response waits for that batch.
    #[tokio::test]
    async fn a_response_waits_for_its_grant_in_a_batch_already_in_flight() {
        let (holder, recorder, bridge) = setup(Duration::from_millis(50));
        let (response, _) = packet::response(
            &held([10, 244, 1, 5], "www.example.com.", [192, 0, 2, 7], 0).packet,
            "tapd",
            SystemTime::now(),
        )
        .unwrap();
        bridge.on_dns(response, Instant::now());
        let in_flight = tokio::spawn({
            let bridge = bridge.clone();
            async move { bridge.flush().await }
        });
        while bridge.has_pending_changes() {
            tokio::task::yield_now().await;
        }
        holder
            .handle(held([10, 244, 1, 5], "www.example.com.", [192, 0, 2, 7], 1))
            .await;
        in_flight.await.unwrap().unwrap();
        let flows = bridge.programmer().flows().len();
        assert!(flows >= 1);
        let resumes = recorder.resumes.lock().unwrap().clone();
        assert_eq!(
            resumes,
            [(Bytes::from(vec![1]), flows)],
            "resumed after the batch in flight"
        );
        assert_eq!(holder.metrics().deadline_misses.get(), 0);
    }

    /// A pod over its rate is not held (counted), and takes nothing from another pod's; every
    /// response still goes on, and the answers of those not held still reach the engine.
    #[tokio::test]
    async fn a_pod_over_its_rate_goes_unheld_and_leaves_others_held() {
        let (holder, recorder, bridge) = setup(Duration::ZERO);
        let holder = holder.with_rate(HoldRate {
            total: NonZeroU32::new(1000).unwrap(),
            per_pod: NonZeroU32::new(100).unwrap(),
        });
        let (tx, rx) = mpsc::channel(1024);
        let run = tokio::spawn(holder.clone().run(rx));
        let flood = 500;
        for i in 0..flood {
            let ip = [192, 0, 2 + (i >> 8) as u8, i as u8];
            tx.send(held([10, 244, 1, 5], &format!("n{i}.example.com."), ip, 0))
                .await
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while holder.metrics().held.get() < flood && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let limited = holder.metrics().rate_limited.get();
        // 100 admitted at once, a few more as the bucket refills while the test runs.
        assert!((380..=400).contains(&limited), "{limited}");
        // Another pod (the rate is per address the replies go to).
        for i in 0..10u8 {
            tx.send(held(
                [10, 244, 1, 6],
                "www.example.com.",
                [198, 51, 100, i],
                0,
            ))
            .await
            .unwrap();
        }
        drop(tx);
        run.await.unwrap();
        while holder.metrics().resumed.get() < flood + 10 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(holder.metrics().rate_limited.get(), limited, "pod 2 held");
        assert_eq!(recorder.resumes.lock().unwrap().len() as u64, flood + 10);
        bridge.flush().await.unwrap();
        let granted = bridge.grants(None, None).len() as u64;
        assert!(
            granted >= flood,
            "every answer reached the engine: {granted}"
        );
    }

    /// Explain's line for each case: held, no dnsName rule, another node's or an unknown pod, no
    /// port yet, a failing round, and a daemon that does not hold at all.
    #[tokio::test]
    async fn the_report_says_whether_a_pod_is_held_and_why_not() {
        let (_, _, engine) = setup(Duration::ZERO);
        engine.set_node("n1");
        engine.flush().await.unwrap();
        let pod1 = PodKey::new("ns1", "pod1");
        let report = HoldReport::on(Duration::from_millis(100));
        let id = engine.hold_candidate(&pod1).expect("held").id;
        let line = |report: &HoldReport, key: &PodKey| report.explain(engine.hold_candidate(key));
        assert_eq!(
            line(&report, &pod1),
            (
                false,
                "its DNS responses are not held yet: the hold flows are written within a second"
                    .into()
            )
        );
        let resolvers = trusted().borrow().clone();
        report.round(Ok(&resolvers));
        assert_eq!(
            line(&report, &pod1),
            (true, "its DNS responses from 10.96.0.10:53 are held in br-int until their grants are in OVS, at most 100 ms".into())
        );
        report.ended(id, Outcome::DeadlineMiss, Some("www.example.com".into()));
        assert_eq!(
            line(&report, &pod1).1,
            "its DNS responses from 10.96.0.10:53 are held in br-int until their grants are in \
             OVS, at most 100 ms; its last held response (www.example.com) went on at the \
             deadline, before its grants were in OVS"
        );
        report.ended(id, Outcome::Granted, Some("www.example.com".into()));
        report.count_untrusted(Some(id), 3);
        assert_eq!(
            line(&report, &pod1).1,
            "its DNS responses from 10.96.0.10:53 are held in br-int until their grants are in \
             OVS, at most 100 ms; its last held response (www.example.com) went on after its \
             grants were in OVS and its datapath revalidated; 3 DNS replies from servers other \
             than the trusted resolvers (10.96.0.10:53) reached it and taught flowd nothing"
        );
        assert_eq!(report.untrusted_total(), 3);
        report.round(Err("OVN's flows name no delivery table"));
        assert!(!line(&report, &pod1).0);
        assert!(line(&report, &pod1)
            .1
            .contains("could not be written: OVN's flows name no delivery table; its last held"));
        report.round(Ok(&resolvers));

        for (pod, node, host, why) in [
            (PodKey::new("ns2", "free"), "n1", 7, NotHeld::NoDnsRule),
            (PodKey::new("ns1", "far"), "n2", 8, NotHeld::UnknownPod),
            (PodKey::new("ns1", "new"), "n1", 9, NotHeld::NoPortKeys),
        ] {
            engine.upsert_pod(PodInfo {
                uid: None,
                key: pod.clone(),
                ips: vec![IpAddr::from([10, 244, 1, host])],
                node: node.into(),
            });
            assert_eq!(
                line(&report, &pod),
                (false, format!("its DNS responses are not held: {why}")),
                "{pod}"
            );
        }
        assert_eq!(
            line(&report, &PodKey::new("ns1", "nobody")).1,
            format!("its DNS responses are not held: {}", NotHeld::UnknownPod)
        );
        let off = HoldReport::off("flowd runs with --hold=false");
        assert_eq!(
            line(&off, &pod1),
            (
                false,
                "DNS responses are not held: flowd runs with --hold=false".into()
            )
        );
    }

    /// The holder's own write fails (OVS refuses the bundle once): the grant is not lost, the
    /// engine's flusher, which the held answer did not wake, writes it.
    #[tokio::test]
    async fn a_grant_the_holders_write_could_not_make_goes_to_the_flusher() {
        let (holder, _recorder, bridge) = setup(Duration::ZERO);
        let running = tokio::spawn(bridge.clone().run());
        let until = Instant::now() + Duration::from_secs(5);
        // The first reconcile (which flushes too) is behind; the flusher waits for a change.
        while bridge.metrics_snapshot().reconciles == 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        bridge.programmer().fail_next(1);
        holder
            .handle(held([10, 244, 1, 5], "www.example.com.", [192, 0, 2, 7], 1))
            .await;
        while bridge.programmer().flows().is_empty() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        running.abort();
        assert!(
            !bridge.programmer().flows().is_empty(),
            "the grant stayed pending"
        );
        let m = holder.metrics();
        assert_eq!(
            (m.write_failures.get(), m.granted.get()),
            (1, 0),
            "a failed write is not counted as held until its grants"
        );
    }

    /// OVS slower than the deadline: the response goes on at the deadline (counted) and its grant
    /// follows.
    #[tokio::test]
    async fn a_slow_bridge_makes_the_response_wait_no_longer_than_the_deadline() {
        let (holder, recorder, bridge) = setup(Duration::from_millis(400));
        let started = Instant::now();
        holder
            .handle(held([10, 244, 1, 5], "www.example.com.", [192, 0, 2, 7], 1))
            .await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(100) && waited < Duration::from_millis(350),
            "{waited:?}"
        );
        assert_eq!(
            recorder.resumes.lock().unwrap()[0].1,
            0,
            "resumed before the grant"
        );
        let m = holder.metrics();
        assert_eq!((m.deadline_misses.get(), m.granted.get()), (1, 0));
        holder.engine.flush().await.unwrap();
        assert!(!bridge.programmer().flows().is_empty(), "the grant follows");
    }

    /// Beyond MAX_HELD at once, responses go on unheld; every one is resumed exactly once.
    #[tokio::test]
    async fn every_held_response_is_resumed_exactly_once_under_load() {
        let (holder, recorder, _bridge) = setup(Duration::from_millis(5));
        let unlimited = NonZeroU32::new(1_000_000).unwrap();
        let holder = holder.with_rate(HoldRate {
            total: unlimited,
            per_pod: unlimited,
        });
        let (tx, rx) = mpsc::channel(4096);
        let n = MAX_HELD + 200;
        for i in 0..n {
            let ip = [192, 0, (i >> 8) as u8, i as u8];
            let mut h = held([10, 244, 1, 5], &format!("n{i}.example.com."), ip, 0);
            h.continuation = Some(Bytes::from((i as u32).to_be_bytes().to_vec()));
            tx.send(h).await.unwrap();
        }
        drop(tx);
        let run = tokio::spawn(holder.clone().run(rx));
        run.await.unwrap();
        // Every handler done: all slots back, so a late second resume would be in by now.
        let deadline = Instant::now() + Duration::from_secs(10);
        while holder.slots.available_permits() < MAX_HELD && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut ids: Vec<Bytes> = recorder
            .resumes
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.0.clone())
            .collect();
        let resumes = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!((resumes, ids.len()), (n, n), "each exactly once");
        assert_eq!(holder.metrics().resumed.get() as usize, n);
        assert!(holder.metrics().unheld.get() > 0);
    }
}

//! An in-memory bridge implementing [`FlowProgrammer`] for unit tests: it applies batches the way OVS
//! does (an add replaces the flow with the same table, priority and match), records every batch, and
//! lets a test expire or wipe flows and see the monitor events that follow.

use super::{
    discovery::PortKeys,
    flow::{
        FlowEvent, FlowMatch, FlowOp, FlowSpec, MatchFields, ParsedFlow, RegMatch, RemovedReason,
    },
    template::{LearnError, Template},
    FlowProgrammer, Result, MONITOR_QUEUE,
};
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, MutexGuard},
    time::Duration,
};
use tokio::sync::mpsc;

#[derive(Debug, Default)]
struct State {
    flows: BTreeMap<FlowMatch, FlowSpec>,
    batches: Vec<Vec<FlowOp>>,
    template: Option<Template>,
    keys: HashMap<String, PortKeys>,
    monitors: Vec<mpsc::Sender<FlowEvent>>,
    refused: std::collections::HashSet<std::net::IpAddr>,
    /// Hold flows by (switch, port, IPv6).
    /// By cookie, family, transport and the server held (none: any).
    holds: BTreeMap<(u64, bool, bool, Option<std::net::SocketAddr>), super::flow::HoldSpec>,
}

/// A fake bridge; see the module doc.
#[derive(Debug, Default)]
pub struct Recording {
    state: Mutex<State>,
    /// How long each `apply` takes, to exercise batching.
    apply_delay: Duration,
    /// This many next `apply` calls fail (as if OVS were away), changing nothing.
    failures: std::sync::atomic::AtomicUsize,
}

/// The flow as `ovs-ofctl monitor` would report it (no priority).
pub(crate) fn as_event_flow(f: &FlowSpec) -> ParsedFlow {
    let m = &f.matches;
    ParsedFlow {
        cookie: f.cookie,
        table: m.table,
        priority: None,
        idle_timeout: Some(f.idle_timeout),
        hard_timeout: f.hard_timeout,
        fields: Some(MatchFields {
            metadata: Some(m.metadata),
            reg14: Some(m.reg14),
            reg15: m.outport.map(RegMatch::exact),
            reg0: m.hint,
            reg8: m.tier,
            foreign: false,
            src: Some(m.src),
            dst: Some(m.dst),
            l4: m.l4,
            v6: m.dst.is_ipv6(),
        }),
        actions: match &f.action {
            super::FlowAction::Continue(a) => Some(a.as_str().to_owned()),
            super::FlowAction::Drop => None,
        },
    }
}

impl Recording {
    pub fn new(template: Option<Template>) -> Self {
        Self::with_delay(template, Duration::ZERO)
    }

    pub fn with_delay(template: Option<Template>, apply_delay: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                template,
                ..State::default()
            }),
            apply_delay,
            failures: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Makes the next `n` batches fail.
    /// Every later bundle that adds a flow to `dst` is refused whole, as OVS refuses a bundle with one
    /// bad flow.
    pub fn refuse(&self, dst: std::net::IpAddr) {
        self.lock().refused.insert(dst);
    }

    pub fn fail_next(&self, n: usize) {
        self.failures.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives an OVS port with OVN's flows to `iface_id`.
    pub fn set_port(&self, iface_id: &str, keys: PortKeys) {
        self.lock().keys.insert(iface_id.to_owned(), keys);
    }

    pub fn set_template(&self, template: Option<Template>) {
        self.lock().template = template;
    }

    /// Every batch applied so far.
    pub fn batches(&self) -> Vec<Vec<FlowOp>> {
        self.lock().batches.clone()
    }

    /// The flows now on the fake bridge.
    pub fn flows(&self) -> Vec<FlowSpec> {
        self.lock().flows.values().cloned().collect()
    }

    /// Removes flows selected by `pick` as OVS would for `reason`, telling the monitors.
    pub fn remove_where(&self, reason: RemovedReason, pick: impl Fn(&FlowSpec) -> bool) {
        let mut s = self.lock();
        let gone: Vec<FlowSpec> = s.flows.values().filter(|f| pick(f)).cloned().collect();
        for f in &gone {
            s.flows.remove(&f.matches);
        }
        Self::notify(
            &s,
            gone.iter()
                .map(|f| FlowEvent::Deleted(reason, as_event_flow(f))),
        );
    }

    fn notify(s: &State, events: impl Iterator<Item = FlowEvent>) {
        for e in events {
            for m in &s.monitors {
                let _ = m.try_send(e.clone());
            }
        }
    }

    /// Closes every monitor stream, as if `ovs-ofctl monitor` died.
    pub fn kill_monitors(&self) {
        self.lock().monitors.clear();
    }
}

impl FlowProgrammer for Recording {
    async fn apply(&self, ops: &[FlowOp]) -> Result<()> {
        if !self.apply_delay.is_zero() {
            tokio::time::sleep(self.apply_delay).await;
        }
        let failing = self
            .failures
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok();
        if failing {
            return Err(super::OvsError::Io {
                program: "recording",
                error: std::io::Error::other("injected failure"),
            });
        }
        let mut s = self.lock();
        let refused = ops.iter().any(|op| match op {
            FlowOp::Add(f) => s.refused.contains(&f.matches.dst),
            _ => false,
        });
        if refused {
            use std::os::unix::process::ExitStatusExt as _;
            return Err(super::OvsError::Failed {
                program: "recording",
                args: "--bundle add-flows".into(),
                status: std::process::ExitStatus::from_raw(1 << 8),
                stderr: "OFPT_ERROR: OFPBAC_BAD_ARGUMENT".into(),
            });
        }
        let mut events = Vec::new();
        for op in ops {
            match op {
                FlowOp::Add(f) => {
                    s.flows.insert(f.matches, f.clone());
                    events.push(FlowEvent::Added(as_event_flow(f)));
                }
                FlowOp::Hold(h) => {
                    s.holds.insert((h.cookie.0, h.v6, h.tcp, h.from), h.clone());
                }
                FlowOp::DeleteStrict { cookie, matches } => {
                    if s.flows.get(matches).is_some_and(|f| f.cookie == *cookie) {
                        if let Some(f) = s.flows.remove(matches) {
                            events
                                .push(FlowEvent::Deleted(RemovedReason::Delete, as_event_flow(&f)));
                        }
                    }
                }
                FlowOp::DeleteCookie {
                    table,
                    cookie,
                    mask,
                } => {
                    let gone: Vec<FlowMatch> = s
                        .flows
                        .values()
                        .filter(|f| {
                            f.matches.table == *table && f.cookie.0 & mask == cookie.0 & mask
                        })
                        .map(|f| f.matches)
                        .collect();
                    for m in gone {
                        if let Some(f) = s.flows.remove(&m) {
                            events
                                .push(FlowEvent::Deleted(RemovedReason::Delete, as_event_flow(&f)));
                        }
                    }
                }
            }
        }
        s.batches.push(ops.to_vec());
        Self::notify(&s, events.into_iter());
        Ok(())
    }

    async fn dump(&self, prefix: u32) -> Result<Vec<ParsedFlow>> {
        Ok(self
            .lock()
            .flows
            .values()
            .filter(|f| f.cookie.prefix() == prefix)
            .map(|f| ParsedFlow {
                priority: Some(f.matches.priority),
                ..as_event_flow(f)
            })
            .collect())
    }

    async fn monitor(&self, _table: u8) -> Result<mpsc::Receiver<FlowEvent>> {
        let (tx, rx) = mpsc::channel(MONITOR_QUEUE);
        self.lock().monitors.push(tx);
        Ok(rx)
    }

    async fn learn_template(
        &self,
        _priority_base: u16,
        table: Option<u8>,
    ) -> Result<Result<Template, LearnError>> {
        Ok(match (self.lock().template.clone(), table) {
            (None, _) => Err(LearnError::NoAclTable),
            (Some(t), Some(want)) if t.table != want => Err(LearnError::WrongTable(t.table, want)),
            (Some(t), _) => Ok(t),
        })
    }

    async fn port_keys(&self, iface_ids: &[String]) -> Result<HashMap<String, PortKeys>> {
        let s = self.lock();
        Ok(iface_ids
            .iter()
            .filter_map(|id| Some((id.clone(), *s.keys.get(id)?)))
            .collect())
    }
}

//! flowd's own OpenFlow 1.5 connection to the bridge: the [`Native`] flow programmer writes every
//! batch as one atomic, ordered bundle over `<OVS_RUNDIR>/<bridge>.mgmt` (the management socket,
//! which takes several clients; ovn-controller is another), instead of starting an `ovs-ofctl` per
//! batch. Reading OVS (templates, dumps, the monitor, port keys) stays with [`Ofctl`].
//!
//! The connection identifies itself with its own controller id ([`CONTROLLER_ID`]), so OVS hands
//! ovn-controller (id 0) none of flowd's packet-ins and flowd none of its. A batch that a flow
//! cannot be translated for (an action OVN writes that the codec does not speak) goes through
//! `ovs-ofctl` instead, and is counted: never a flow with other meaning than the template's.

use super::{
    discovery::PortKeys,
    flow::{render_op, Actions, FlowAction, FlowEvent, FlowMatch, FlowOp, ParsedFlow, DNS_PORT},
    template::{LearnError, Template},
    FlowProgrammer, Ofctl, OvsError, Result,
};
use crate::{metrics::Registry, model::Protocol};
use bytes::{Bytes, BytesMut};
use dnsflow_openflow::{
    self as of, Action, BundleAdd, BundleControl, BundleControlType, BundleFlags, FlowMod,
    FlowModCommand, Masked, Match, Message, PacketIn2, Register,
};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex as StdMutex,
    },
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{unix::OwnedWriteHalf, UnixStream},
    sync::{mpsc, watch, Mutex},
};

/// flowd's controller id on the bridge: "dn". ovn-controller's is 0.
pub const CONTROLLER_ID: u16 = 0x646e;
/// Replies queued from the reader to the batch that waits for them. A batch's replies are bounded
/// by what it sent; messages nobody asked for (port status) are not queued.
const REPLY_QUEUE: usize = 1024;
/// Held packets queued for the holder; beyond it they are sent on at once.
const HELD_QUEUE: usize = 4096;
/// Bytes read at once.
const READ_CHUNK: usize = 64 * 1024;
const PROGRAM: &str = "OpenFlow (br-int.mgmt)";

/// Writes batches over its own OpenFlow connection, reads OVS with `ovs-ofctl`.
#[derive(Debug)]
pub struct Native {
    ofctl: Ofctl,
    socket: PathBuf,
    timeout: Duration,
    conn: Mutex<Option<Connection>>,
    /// Where held packets go ([`Native::packet_ins`]); without it they are sent on at once.
    packet_ins: StdMutex<Option<mpsc::Sender<PacketIn2>>>,
    /// The open connection's writer, for resumes that must not wait for a batch in flight.
    resumes: StdMutex<Option<mpsc::Sender<Bytes>>>,
    /// Off: every batch goes through `ovs-ofctl` (`--ovs-driver ofctl`, or no connection at start).
    enabled: AtomicBool,
    /// Counts the connections that ended (closed by either side, or dropped by flowd): what OVS
    /// paused for a connection that ended is lost, so whoever pauses packets must stop at once.
    lost: watch::Sender<u64>,
    enabled_gauge: Gauge,
    connects: Counter,
    fallbacks: Counter,
}

impl Native {
    /// A programmer for the bridge `ofctl` names, connecting to `socket` when the first batch comes.
    pub fn new(ofctl: Ofctl, socket: PathBuf, timeout: Duration) -> Self {
        Self {
            ofctl,
            socket,
            timeout,
            conn: Mutex::new(None),
            packet_ins: StdMutex::new(None),
            resumes: StdMutex::new(None),
            enabled: AtomicBool::new(true),
            lost: watch::channel(0).0,
            enabled_gauge: Gauge::default(),
            connects: Counter::default(),
            fallbacks: Counter::default(),
        }
    }

    /// Writes every batch with `ovs-ofctl` from now on.
    pub fn disable(&self) {
        self.enabled.store(false, Ordering::Relaxed);
        self.enabled_gauge.set(0);
    }

    /// The held packets (`NXT_PACKET_IN2` with a continuation, sent to flowd's controller id) from
    /// now on, for [`crate::hold::Holder`]. A packet that finds this queue full, or no queue, is
    /// sent on at once by the connection itself: a held DNS response is never dropped.
    pub fn packet_ins(&self) -> mpsc::Receiver<PacketIn2> {
        let (tx, rx) = mpsc::channel(HELD_QUEUE);
        *lock(&self.packet_ins) = Some(tx);
        rx
    }

    /// Changes whenever a connection ends: packets paused for it are lost, and hold flows must go
    /// until a new one is up (see [`crate::hold::HoldFlows`]).
    pub fn connection_lost(&self) -> watch::Receiver<u64> {
        self.lost.subscribe()
    }

    /// The statistics of the flows in `table` whose cookie matches `cookie` under `mask`, over
    /// flowd's own connection (opened if needed; never `ovs-ofctl`).
    pub async fn flow_stats(
        &self,
        table: u8,
        cookie: u64,
        mask: u64,
    ) -> Result<Vec<of::FlowStats>> {
        let mut conn = self.conn.lock().await;
        self.ensure_open(&mut conn).await?;
        let c = conn.as_mut().ok_or_else(closed)?;
        let request = of::FlowStatsRequest {
            table,
            cookie,
            cookie_mask: mask,
        };
        match tokio::time::timeout(self.timeout, c.flow_stats(request)).await {
            Ok(Ok(flows)) => Ok(flows),
            Ok(Err(e)) => {
                *conn = None;
                Err(e)
            }
            Err(_) => {
                *conn = None;
                Err(timeout_error(self.timeout, "flow stats"))
            }
        }
    }

    /// Batches written with `ovs-ofctl` although the native driver is on.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.get()
    }

    /// Whether batches go over the native connection.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// `<OVS_RUNDIR>/<bridge>.mgmt`, as ovs-vswitchd names it (`/var/run/openvswitch` unless
    /// `OVS_RUNDIR` says otherwise).
    pub fn socket_path(rundir: Option<&Path>, bridge: &str) -> PathBuf {
        rundir
            .unwrap_or(Path::new("/var/run/openvswitch"))
            .join(format!("{bridge}.mgmt"))
    }

    /// Connects now (at start: whether the native driver can be used at all).
    pub async fn connect(&self) -> Result<()> {
        self.ensure_open(&mut *self.conn.lock().await).await?;
        self.enabled_gauge.set(i64::from(self.enabled()));
        Ok(())
    }

    /// Makes `conn` a live connection: one whose reader saw the end is dropped (no need to find
    /// out with the next message), and a new one opened when there is none.
    async fn ensure_open(&self, conn: &mut Option<Connection>) -> Result<()> {
        if conn.as_ref().is_some_and(|c| !c.alive()) {
            *conn = None;
        }
        if conn.is_none() {
            *conn = Some(self.open().await?);
        }
        Ok(())
    }

    async fn open(&self) -> Result<Connection> {
        let packet_ins = lock(&self.packet_ins).clone();
        let ended = Ended(self.lost.clone());
        let c = tokio::time::timeout(
            self.timeout,
            Connection::open(&self.socket, packet_ins, ended),
        )
        .await
        .map_err(|_| timeout_error(self.timeout, "connect"))??;
        *lock(&self.resumes) = Some(c.tx.clone());
        self.connects.inc();
        tracing::info!(socket = %self.socket.display(), "OpenFlow connection to the bridge open");
        Ok(c)
    }
}

/// Counts a connection's end when its reader task ends (returns or is aborted).
#[derive(Debug)]
struct Ended(watch::Sender<u64>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n += 1);
    }
}

/// Clears a flag when dropped.
struct Cleared(std::sync::Arc<AtomicBool>);

impl Drop for Cleared {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends `held` on where it paused; a packet that did not pause has nowhere to go on from.
async fn resume(tx: &mpsc::Sender<Bytes>, held: &PacketIn2) -> Result<()> {
    match held.resume() {
        Some(r) => send(tx, 0, &Message::Resume(r)).await,
        None => Ok(()),
    }
}

impl crate::hold::Resumer for Native {
    async fn resume(&self, held: &PacketIn2) -> Result<(), String> {
        let tx = lock(&self.resumes)
            .clone()
            .ok_or_else(|| "no OpenFlow connection to the bridge".to_string())?;
        resume(&tx, held).await.map_err(|e| e.to_string())
    }

    /// `revalidator/wait` on ovs-vswitchd's control socket, beside the bridge's management socket.
    async fn revalidation(&self) -> Option<super::unixctl::Revalidation> {
        let rundir = self.socket.parent()?;
        let started = async {
            let socket = super::unixctl::vswitchd_socket(rundir)?;
            super::unixctl::Revalidation::start(&socket).await
        };
        match started.await {
            Ok(r) => Some(r),
            Err(error) => {
                tracing::debug!(%error, rundir = %rundir.display(),
                    "cannot ask ovs-vswitchd to tell when it has revalidated");
                None
            }
        }
    }
}

fn io_error(error: std::io::Error) -> OvsError {
    OvsError::Io {
        program: PROGRAM,
        error,
    }
}

fn timeout_error(after: Duration, what: &str) -> OvsError {
    OvsError::Timeout {
        program: PROGRAM,
        args: what.to_string(),
        after,
    }
}

/// One connection: a reader task answers echoes and queues replies; writes go through one task
/// too, so that the reader can answer an echo while a batch is being written.
#[derive(Debug)]
struct Connection {
    tx: mpsc::Sender<Bytes>,
    /// Cleared by the reader when it ends.
    alive: std::sync::Arc<AtomicBool>,
    replies: mpsc::Receiver<(u32, Message)>,
    next_xid: u32,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Drop for Connection {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Connection {
    async fn open(
        socket: &Path,
        packet_ins: Option<mpsc::Sender<PacketIn2>>,
        ended: Ended,
    ) -> Result<Self> {
        let stream = UnixStream::connect(socket).await.map_err(io_error)?;
        let alive = std::sync::Arc::new(AtomicBool::new(true));
        let reader_alive = alive.clone();
        let (mut read, write) = stream.into_split();
        let (tx, rx) = mpsc::channel::<Bytes>(REPLY_QUEUE);
        let (reply_tx, replies) = mpsc::channel(REPLY_QUEUE);
        let writer = tokio::spawn(write_loop(write, rx));
        let echo = tx.clone();
        let reader = tokio::spawn(async move {
            // Says so when this task ends, however: returned, or aborted with the connection.
            let _ended = ended;
            let _alive = Cleared(reader_alive);
            let mut buf = BytesMut::with_capacity(READ_CHUNK);
            loop {
                match of::decode(&buf) {
                    Ok(Some((xid, message, used))) => {
                        let _ = buf.split_to(used);
                        let delivered = match message {
                            Message::EchoRequest(data) => {
                                send(&echo, xid, &Message::EchoReply(data)).await.is_ok()
                            }
                            Message::Hello
                            | Message::Error { .. }
                            | Message::BarrierReply
                            | Message::BundleControl(_)
                            | Message::FlowStatsReply { .. } => {
                                reply_tx.send((xid, message)).await.is_ok()
                            }
                            Message::PacketIn2(held) => {
                                let unqueued = match &packet_ins {
                                    Some(q) => q.try_send(held).err().map(|e| match e {
                                        mpsc::error::TrySendError::Full(p)
                                        | mpsc::error::TrySendError::Closed(p) => p,
                                    }),
                                    None => Some(held),
                                };
                                match unqueued {
                                    Some(held) => resume(&echo, &held).await.is_ok(),
                                    None => true,
                                }
                            }
                            // Port status, flow removed.
                            _ => true,
                        };
                        if !delivered {
                            return;
                        }
                    }
                    Ok(None) => match read.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                    Err(error) => {
                        tracing::warn!(%error, "unreadable OpenFlow from the bridge; reconnecting");
                        return;
                    }
                }
            }
        });
        let mut c = Self {
            tx,
            alive,
            replies,
            next_xid: 1,
            tasks: [reader, writer],
        };
        c.send(&Message::Hello).await?;
        c.send(&Message::SetControllerId(CONTROLLER_ID)).await?;
        // Packet-ins with continuations, whole packets.
        c.send(&Message::SetPacketInFormat(of::PacketInFormat::Nxt2))
            .await?;
        let xid = c
            .send(&Message::SetConfig {
                miss_send_len: u16::MAX,
            })
            .await?;
        let barrier = c.send(&Message::BarrierRequest).await?;
        let mut errors = Vec::new();
        c.until_barrier(barrier, &mut errors).await?;
        if let Some((_, kind, code)) = errors.into_iter().find(|e| e.0 <= xid) {
            return Err(OvsError::Refused {
                program: PROGRAM,
                error: format!("the bridge refused the handshake: {}", describe(kind, code)),
            });
        }
        Ok(c)
    }

    fn alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// One flow stats request, its reply parts collected.
    async fn flow_stats(&mut self, request: of::FlowStatsRequest) -> Result<Vec<of::FlowStats>> {
        let xid = self.send(&Message::FlowStatsRequest(request)).await?;
        let mut flows = Vec::new();
        loop {
            match self.replies.recv().await {
                None => return Err(closed()),
                Some((x, Message::FlowStatsReply { flows: part, more })) if x == xid => {
                    flows.extend(part);
                    if !more {
                        return Ok(flows);
                    }
                }
                Some((x, Message::Error { kind, code, .. })) if x == xid => {
                    return Err(OvsError::Refused {
                        program: PROGRAM,
                        error: format!("flow stats: {}", describe(kind, code)),
                    });
                }
                Some(_) => {}
            }
        }
    }

    fn xid(&mut self) -> u32 {
        let xid = self.next_xid;
        self.next_xid = self.next_xid.wrapping_add(1).max(1);
        xid
    }

    async fn send(&mut self, message: &Message) -> Result<u32> {
        let xid = self.xid();
        send(&self.tx, xid, message).await?;
        Ok(xid)
    }

    /// Reads replies until the barrier `xid` is answered; errors on the way are collected as
    /// (xid, type, code).
    async fn until_barrier(&mut self, xid: u32, errors: &mut Vec<(u32, u16, u16)>) -> Result<()> {
        loop {
            match self.replies.recv().await {
                None => return Err(closed()),
                Some((x, Message::BarrierReply)) if x == xid => return Ok(()),
                Some((x, Message::Error { kind, code, .. })) => errors.push((x, kind, code)),
                Some(_) => {}
            }
        }
    }

    /// Sends `mods` as one atomic, ordered bundle. Every message is encoded before anything is
    /// sent, and the adds go in one write. OVS checks each flow as it is added: any refusal discards
    /// the whole bundle, and the error names the refused operation.
    async fn bundle(&mut self, ops: &[FlowOp], mods: &[FlowMod]) -> Result<()> {
        let bundle_id = self.xid();
        let control = |kind| {
            Message::BundleControl(BundleControl {
                bundle_id,
                kind,
                flags: BundleFlags::ATOMIC_ORDERED,
            })
        };
        let mut out = BytesMut::with_capacity(mods.len() * 160 + 64);
        self.encode(&control(BundleControlType::OpenRequest), &mut out)?;
        let first = self.next_xid;
        for m in mods {
            let add = Message::BundleAdd(BundleAdd {
                bundle_id,
                flags: BundleFlags::ATOMIC_ORDERED,
                message: Box::new(Message::FlowMod(m.clone())),
            });
            self.encode(&add, &mut out)?;
        }
        let barrier = self.encode(&Message::BarrierRequest, &mut out)?;
        self.tx.send(out.freeze()).await.map_err(|_| closed())?;
        let mut errors = Vec::new();
        self.until_barrier(barrier, &mut errors).await?;
        if let Some(&(xid, kind, code)) = errors.first() {
            self.send(&control(BundleControlType::DiscardRequest))
                .await?;
            let barrier = self.send(&Message::BarrierRequest).await?;
            self.until_barrier(barrier, &mut Vec::new()).await?;
            let op = usize::try_from(xid.wrapping_sub(first))
                .ok()
                .and_then(|i| ops.get(i));
            let mut what = String::new();
            match op {
                Some(op) => render_op(&mut what, op),
                None => what.push_str("the bundle itself\n"),
            }
            return Err(OvsError::Refused {
                program: PROGRAM,
                error: format!("{} for {}", describe(kind, code), what.trim_end()),
            });
        }
        let commit = self
            .send(&control(BundleControlType::CommitRequest))
            .await?;
        let barrier = self.send(&Message::BarrierRequest).await?;
        let mut errors = Vec::new();
        self.until_barrier(barrier, &mut errors).await?;
        if let Some(&(_, kind, code)) = errors.iter().find(|e| e.0 == commit) {
            return Err(OvsError::Refused {
                program: PROGRAM,
                error: format!("the bundle's commit: {}", describe(kind, code)),
            });
        }
        Ok(())
    }

    /// Appends `message` with the next xid; a message the codec refuses is a refused batch.
    fn encode(&mut self, message: &Message, out: &mut BytesMut) -> Result<u32> {
        let xid = self.xid();
        encode(xid, message, out)?;
        Ok(xid)
    }
}

/// Appends `message`; one the codec cannot write refuses the batch it belongs to.
fn encode(xid: u32, message: &Message, out: &mut BytesMut) -> Result<()> {
    of::encode(xid, message, out).map_err(|e| OvsError::Refused {
        program: PROGRAM,
        error: format!("cannot encode {message:?}: {e}"),
    })
}

async fn send(tx: &mpsc::Sender<Bytes>, xid: u32, message: &Message) -> Result<()> {
    let mut out = BytesMut::new();
    encode(xid, message, &mut out)?;
    tx.send(out.freeze()).await.map_err(|_| closed())
}

async fn write_loop(mut write: OwnedWriteHalf, mut rx: mpsc::Receiver<Bytes>) {
    while let Some(bytes) = rx.recv().await {
        if write.write_all(&bytes).await.is_err() {
            return;
        }
    }
}

fn no_hold_without_connection(why: &str) -> OvsError {
    io_error(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        format!("hold flows are written only over flowd's own OpenFlow connection: {why}"),
    ))
}

fn closed() -> OvsError {
    io_error(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "the bridge closed the OpenFlow connection",
    ))
}

/// An OpenFlow error as `ovs-ofctl` would name its type.
fn describe(kind: u16, code: u16) -> String {
    let name = match kind {
        of::OFPET_BUNDLE_FAILED => of::bundle_failure_name(code).map(str::to_string),
        _ => None,
    };
    let kind_name = match kind {
        1 => "bad request",
        2 => "bad action",
        3 => "bad instruction",
        4 => "bad match",
        5 => "flow mod failed",
        of::OFPET_BUNDLE_FAILED => "bundle failed",
        _ => "error",
    };
    match name {
        Some(n) => format!("OpenFlow {kind_name} {n}"),
        None => format!("OpenFlow {kind_name} (type {kind}, code {code})"),
    }
}

/// Why a batch cannot be written natively: it then goes through `ovs-ofctl`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    #[error("action {0:?} is not one the native driver writes")]
    Action(String),
    #[error("source and destination are of different families")]
    Family,
}

/// The flow mod of `op`: the same flow `render_op` gives `ovs-ofctl`.
pub fn flow_mod(op: &FlowOp) -> Result<FlowMod, TranslateError> {
    Ok(match op {
        FlowOp::Add(f) => {
            let actions = match &f.action {
                FlowAction::Continue(a) => actions(a)?,
                FlowAction::Drop => Vec::new(),
            };
            let m = &f.matches;
            FlowMod {
                idle_timeout: f.idle_timeout,
                hard_timeout: f.hard_timeout.unwrap_or(0),
                ..FlowMod::add(m.table, m.priority, f.cookie.0, flow_match(m)?, actions)
            }
        }
        FlowOp::Hold(h) => {
            let mut m = Match {
                eth_type: Some(if h.v6 {
                    of::ETH_TYPE_IPV6
                } else {
                    of::ETH_TYPE_IPV4
                }),
                ip_proto: Some(if h.tcp {
                    of::IPPROTO_TCP
                } else {
                    of::IPPROTO_UDP
                }),
                ct_state: Some(Masked {
                    value: HOLD_CT_STATE,
                    mask: HOLD_CT_STATE,
                }),
                ..Match::default()
            };
            let port = match h.from {
                Some(from) => {
                    match (from.ip(), h.v6) {
                        (IpAddr::V4(ip), false) => m.ipv4_src = Some(Masked::exact(ip)),
                        (IpAddr::V6(ip), true) => m.ipv6_src = Some(Masked::exact(ip)),
                        _ => return Err(TranslateError::Family),
                    }
                    from.port()
                }
                None => DNS_PORT,
            };
            if h.tcp {
                m.tcp_src = Some(port);
            } else {
                m.udp_src = Some(port);
            }
            if let Some((metadata, reg15)) = h.to {
                m.metadata = Some(Masked::exact(metadata));
                m.regs[15] = Some(Masked::exact(reg15));
            }
            let mut actions = Vec::new();
            if let Some(id) = h.pause {
                actions.push(Action::pause_to_controller(id, Bytes::new()));
            }
            actions.push(Action::CtClear);
            actions.push(Action::Resubmit { table: h.table });
            FlowMod {
                hard_timeout: h.hard_timeout,
                ..FlowMod::add(h.table, h.priority, h.cookie.0, m, actions)
            }
        }
        FlowOp::DeleteStrict { cookie, matches } => FlowMod {
            command: FlowModCommand::DeleteStrict,
            cookie_mask: u64::MAX,
            ..FlowMod::add(
                matches.table,
                matches.priority,
                cookie.0,
                flow_match(matches)?,
                Vec::new(),
            )
        },
        FlowOp::DeleteCookie {
            table,
            cookie,
            mask,
        } => FlowMod {
            table: *table,
            ..FlowMod::delete_by_cookie(cookie.0, *mask)
        },
    })
}

fn flow_match(m: &FlowMatch) -> Result<Match, TranslateError> {
    let mut x = Match::default();
    match (m.src, m.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            x.eth_type = Some(of::ETH_TYPE_IPV4);
            x.ipv4_src = Some(Masked::exact(src));
            x.ipv4_dst = Some(Masked::exact(dst));
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            x.eth_type = Some(of::ETH_TYPE_IPV6);
            x.ipv6_src = Some(Masked::exact(src));
            x.ipv6_dst = Some(Masked::exact(dst));
        }
        _ => return Err(TranslateError::Family),
    }
    if let Some(p) = m.l4 {
        match p.protocol {
            Protocol::Tcp => {
                x.ip_proto = Some(of::IPPROTO_TCP);
                x.tcp_dst = Some(p.port);
            }
            Protocol::Udp => {
                x.ip_proto = Some(of::IPPROTO_UDP);
                x.udp_dst = Some(p.port);
            }
            Protocol::Sctp => {
                x.ip_proto = Some(of::IPPROTO_SCTP);
                x.sctp_dst = Some(p.port);
            }
        }
    }
    let reg = |r: super::RegMatch| Masked {
        value: r.value,
        mask: r.mask,
    };
    x.regs[0] = m.hint.map(reg);
    x.regs[8] = m.tier.map(reg);
    x.regs[14] = Some(Masked::exact(m.reg14));
    x.regs[15] = m.outport.map(Masked::exact);
    x.metadata = Some(Masked::exact(m.metadata));
    Ok(x)
}

/// `ct_state=+trk+est+rpl`: a reply on a connection the pod opened.
const HOLD_CT_STATE: u32 =
    of::ct_state::TRACKED | of::ct_state::ESTABLISHED | of::ct_state::REPLY_DIR;

/// The actions of a template, from the text OVN's flows were read in: the `load:` and `resubmit`
/// forms OVN's allow ACLs use. Anything else is refused, and the batch goes through `ovs-ofctl`.
pub fn actions(a: &Actions) -> Result<Vec<Action>, TranslateError> {
    let unsupported = |s: &str| TranslateError::Action(s.to_string());
    let mut out = Vec::new();
    for part in top_level(a.as_str()) {
        if let Some(table) = part
            .strip_prefix("resubmit(,")
            .and_then(|t| t.strip_suffix(')'))
        {
            out.push(Action::Resubmit {
                table: table.parse().map_err(|_| unsupported(part))?,
            });
        } else if let Some(load) = part.strip_prefix("load:") {
            out.push(parse_load(load).ok_or_else(|| unsupported(part))?);
        } else {
            return Err(unsupported(part));
        }
    }
    Ok(out)
}

/// The comma-separated items of an action list, commas inside parentheses (`resubmit(,47)`,
/// `ct(commit,zone=...)`) not splitting.
fn top_level(s: &str) -> impl Iterator<Item = &str> {
    let mut depth = 0usize;
    let mut start = 0;
    let mut items = Vec::new();
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&s[start..]);
    items.into_iter()
}

/// `0x1->NXM_NX_XXREG0[97]`, `0x5->NXM_NX_REG13[0..15]`, `0x1->OXM_OF_PKT_REG4[48]`, `0x2->NXM_NX_REG10[]`.
fn parse_load(s: &str) -> Option<Action> {
    let (value, dst) = s.split_once("->")?;
    let value = match value.strip_prefix("0x") {
        Some(hex) => u128::from_str_radix(hex, 16).ok()?,
        None => value.parse().ok()?,
    };
    let (field, bits) = dst.strip_suffix(']')?.split_once('[')?;
    let (register, width) = if let Some(n) = field.strip_prefix("NXM_NX_XXREG") {
        (Register::XXReg(n.parse().ok()?), 128)
    } else if let Some(n) = field.strip_prefix("OXM_OF_PKT_REG") {
        (Register::XReg(n.parse().ok()?), 64)
    } else if let Some(n) = field.strip_prefix("NXM_NX_XREG") {
        (Register::XReg(n.parse().ok()?), 64)
    } else if let Some(n) = field.strip_prefix("NXM_NX_REG") {
        (Register::Reg(n.parse().ok()?), 32)
    } else if field == "OXM_OF_METADATA" {
        (Register::Metadata, 64)
    } else {
        return None;
    };
    let (ofs, n_bits) = match bits.split_once("..") {
        _ if bits.is_empty() => (0, width),
        Some((a, b)) => {
            let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
            (a, b.checked_sub(a)? + 1)
        }
        None => (bits.parse().ok()?, 1),
    };
    let exists = match register {
        Register::Reg(n) => n < 16,
        Register::XReg(n) => n < 8,
        Register::XXReg(n) => n < 4,
        Register::Metadata => true,
    };
    if !exists || ofs + n_bits > width || n_bits == 0 || (n_bits < 128 && value >> n_bits != 0) {
        return None;
    }
    Some(Action::load(register, ofs, n_bits, value))
}

impl FlowProgrammer for Native {
    async fn apply(&self, ops: &[FlowOp]) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        // A hold flow pauses packets for this connection: written by anyone else, it would pause
        // them for nobody, and every DNS reply it catches would be lost.
        let holds = ops.iter().any(|op| matches!(op, FlowOp::Hold(_)));
        if !self.enabled() {
            if holds {
                return Err(no_hold_without_connection("the native driver is off"));
            }
            return self.ofctl.apply(ops).await;
        }
        let mods = match ops.iter().map(flow_mod).collect::<Result<Vec<_>, _>>() {
            Ok(mods) => mods,
            Err(error) if holds => {
                return Err(OvsError::Refused {
                    program: PROGRAM,
                    error: format!("a hold flow cannot be written: {error}"),
                });
            }
            Err(error) => {
                self.fallbacks.inc();
                tracing::warn!(%error, "batch written with ovs-ofctl instead");
                return self.ofctl.apply(ops).await;
            }
        };
        let mut conn = self.conn.lock().await;
        // A connection found dead is opened again once; a batch is idempotent (adds replace,
        // deletes of absent flows do nothing), so one that died mid-commit may be sent again.
        for attempt in 0..2 {
            match self.ensure_open(&mut conn).await {
                Ok(()) => {}
                // No connection (OVS restarting, the socket not there yet): this batch goes
                // through ovs-ofctl, the next one tries again.
                Err(error) if holds => {
                    return Err(no_hold_without_connection(&error.to_string()));
                }
                Err(error) => {
                    self.fallbacks.inc();
                    tracing::warn!(%error, "no OpenFlow connection to the bridge; batch written with ovs-ofctl");
                    drop(conn);
                    return self.ofctl.apply(ops).await;
                }
            }
            let c = conn.as_mut().ok_or_else(closed)?;
            match tokio::time::timeout(self.timeout, c.bundle(ops, &mods)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e @ OvsError::Refused { .. })) => return Err(e),
                Ok(Err(e)) if attempt == 1 => {
                    *conn = None;
                    return Err(e);
                }
                Ok(Err(error)) => {
                    tracing::info!(%error, "OpenFlow connection lost; reconnecting");
                    *conn = None;
                }
                Err(_) => {
                    *conn = None;
                    return Err(timeout_error(self.timeout, "bundle"));
                }
            }
        }
        Err(closed())
    }

    async fn dump(&self, prefix: u32) -> Result<Vec<ParsedFlow>> {
        self.ofctl.dump(prefix).await
    }

    async fn monitor(&self, table: u8) -> Result<mpsc::Receiver<FlowEvent>> {
        self.ofctl.monitor(table).await
    }

    async fn learn_template(
        &self,
        priority_base: u16,
        table: Option<u8>,
    ) -> Result<Result<Template, LearnError>> {
        self.ofctl.learn_template(priority_base, table).await
    }

    async fn port_keys(&self, iface_ids: &[String]) -> Result<HashMap<String, PortKeys>> {
        self.ofctl.port_keys(iface_ids).await
    }

    fn register_metrics(&self, registry: &mut Registry) {
        self.ofctl.register_metrics(registry);
        registry.register(
            "ovs_native",
            "1 while batches go over flowd's own OpenFlow connection, 0 when through ovs-ofctl",
            self.enabled_gauge.clone(),
        );
        registry.counter(
            "ovs_native_connects",
            "OpenFlow connections opened to the bridge's management socket",
            &self.connects,
        );
        registry.counter(
            "ovs_native_fallbacks",
            "Batches written with ovs-ofctl: no connection to the bridge, or an action the native driver does not write",
            &self.fallbacks,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ovs::{Cookie, FlowSpec, Template};
    use std::sync::{Arc, Mutex as StdMutex};
    use tokio::net::UnixListener;

    /// What the fake switch does with a connection.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Behaviour {
        /// Answers everything.
        Serve,
        /// Closes the connection at the first bundle add.
        DropAtFirstAdd,
        /// Stops answering once a bundle is opened.
        GoSilent,
        /// Answers everything, and holds a packet for flowd's controller once the handshake's
        /// barrier is answered.
        HoldOne,
    }

    #[derive(Debug, Default)]
    struct Seen {
        connections: usize,
        committed_mods: usize,
        echo_replies: usize,
        /// The continuations of the resumes received.
        resumed: Vec<Bytes>,
    }

    /// A switch speaking just enough OpenFlow, one behaviour per connection in turn (the last one
    /// repeats). It opens each connection with an echo request, as OVS's keepalive does.
    fn fake_switch(listener: UnixListener, behaviours: Vec<Behaviour>, seen: Arc<StdMutex<Seen>>) {
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut stream, _)) = listener.accept().await {
                let behaviour = behaviours[n.min(behaviours.len() - 1)];
                n += 1;
                seen.lock().unwrap().connections += 1;
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut out = BytesMut::new();
                    of::encode(
                        99,
                        &Message::EchoRequest(Bytes::from_static(b"ka")),
                        &mut out,
                    )
                    .unwrap();
                    stream.write_all(&out).await.unwrap();
                    let mut buf = BytesMut::new();
                    let mut pending = 0;
                    let mut silent = false;
                    loop {
                        let Ok(Some((xid, message, used))) = of::decode(&buf) else {
                            if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                                return;
                            }
                            continue;
                        };
                        let _ = buf.split_to(used);
                        let reply = match message {
                            Message::EchoReply(_) => {
                                seen.lock().unwrap().echo_replies += 1;
                                None
                            }
                            _ if silent => None,
                            Message::Hello => Some(Message::Hello),
                            Message::Resume(r) => {
                                seen.lock().unwrap().resumed.push(r.continuation);
                                None
                            }
                            Message::BarrierRequest if behaviour == Behaviour::HoldOne => {
                                let mut out = BytesMut::new();
                                of::encode(xid, &Message::BarrierReply, &mut out).unwrap();
                                of::encode(0, &Message::PacketIn2(held_packet()), &mut out)
                                    .unwrap();
                                stream.write_all(&out).await.unwrap();
                                None
                            }
                            Message::BarrierRequest => Some(Message::BarrierReply),
                            Message::BundleAdd(_) if behaviour == Behaviour::DropAtFirstAdd => {
                                return;
                            }
                            Message::BundleAdd(_) => {
                                pending += 1;
                                None
                            }
                            Message::BundleControl(c) => {
                                silent = behaviour == Behaviour::GoSilent;
                                let kind = match c.kind {
                                    BundleControlType::OpenRequest => BundleControlType::OpenReply,
                                    BundleControlType::CommitRequest => {
                                        seen.lock().unwrap().committed_mods += pending;
                                        BundleControlType::CommitReply
                                    }
                                    _ => BundleControlType::DiscardReply,
                                };
                                (!silent)
                                    .then_some(Message::BundleControl(BundleControl { kind, ..c }))
                            }
                            _ => None,
                        };
                        if let Some(reply) = reply {
                            let mut out = BytesMut::new();
                            of::encode(xid, &reply, &mut out).unwrap();
                            stream.write_all(&out).await.unwrap();
                        }
                    }
                });
            }
        });
    }

    fn held_packet() -> PacketIn2 {
        PacketIn2 {
            packet: Bytes::from_static(b"a frame"),
            full_len: None,
            buffer_id: None,
            table_id: 65,
            cookie: Some(7),
            reason: 1,
            metadata: of::RawMatch::default(),
            userdata: Bytes::from_static(&[0, 1]),
            continuation: Some(Bytes::from_static(b"frozen")),
        }
    }

    /// A held packet goes to the holder's queue and is resumed when the holder says so; with no
    /// holder, the connection sends it on at once. Either way the switch gets its continuation back.
    #[tokio::test]
    async fn held_packets_reach_the_holder_or_go_on_at_once() {
        use crate::hold::Resumer as _;
        for with_holder in [true, false] {
            let (_dir, native, seen) = switch(Duration::from_secs(5), vec![Behaviour::HoldOne]);
            let mut queue = with_holder.then(|| native.packet_ins());
            native.connect().await.unwrap();
            if let Some(queue) = &mut queue {
                let held = tokio::time::timeout(Duration::from_secs(5), queue.recv())
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(held.userdata, Bytes::from_static(&[0, 1]));
                assert!(seen.lock().unwrap().resumed.is_empty(), "held until told");
                native.resume(&held).await.unwrap();
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while seen.lock().unwrap().resumed.is_empty() && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(
                seen.lock().unwrap().resumed,
                [Bytes::from_static(b"frozen")],
                "with holder: {with_holder}"
            );
        }
    }

    fn grant() -> FlowOp {
        let t = Template::stand_in(46, 1, 1);
        FlowOp::Add(FlowSpec {
            cookie: Cookie::new(0x646e_7366, 1, 11000),
            matches: FlowMatch {
                table: 46,
                priority: 11000,
                tier: None,
                hint: t.allow[0].hint,
                metadata: 1,
                reg14: 2,
                outport: Some(1),
                src: "10.244.1.5".parse().unwrap(),
                dst: "192.0.2.7".parse().unwrap(),
                l4: None,
            },
            idle_timeout: 330,
            hard_timeout: None,
            action: FlowAction::Continue(t.allow[0].actions.clone()),
        })
    }

    fn native_at(dir: &Path, timeout: Duration) -> Native {
        // An ovs-ofctl that cannot run: a batch that fell back to it would fail.
        let ofctl = Ofctl::new("br-int").with_env("PATH", dir.as_os_str());
        Native::new(ofctl, Native::socket_path(Some(dir), "br-int"), timeout)
    }

    /// A fake switch behaving as `behaviours` says, and a native driver aimed at it.
    fn switch(
        timeout: Duration,
        behaviours: Vec<Behaviour>,
    ) -> (tempfile::TempDir, Native, Arc<StdMutex<Seen>>) {
        let dir = tempfile::tempdir().unwrap();
        let native = native_at(dir.path(), timeout);
        let seen = Arc::new(StdMutex::new(Seen::default()));
        let listener = UnixListener::bind(Native::socket_path(Some(dir.path()), "br-int")).unwrap();
        fake_switch(listener, behaviours, seen.clone());
        (dir, native, seen)
    }

    /// The switch drops the connection in the middle of a bundle: the batch is sent again on a new
    /// connection and committed once. Echo requests are answered throughout.
    #[tokio::test]
    async fn a_connection_lost_mid_bundle_is_opened_again_and_the_batch_sent_again() {
        let (_dir, native, seen) = switch(
            Duration::from_secs(5),
            vec![Behaviour::DropAtFirstAdd, Behaviour::Serve],
        );
        native.apply(&[grant(), grant()]).await.unwrap();
        {
            let seen = seen.lock().unwrap();
            assert_eq!((seen.connections, seen.committed_mods), (2, 2), "{seen:?}");
            assert!(seen.echo_replies >= 1, "{seen:?}");
        }
        assert_eq!((native.connects.get(), native.fallbacks()), (2, 0));
        // The connection stays open for the next batch.
        native.apply(&[grant()]).await.unwrap();
        assert_eq!(seen.lock().unwrap().connections, 2);
    }

    /// A switch that stops answering makes the batch fail at the timeout, not hang; the next batch
    /// opens a new connection.
    #[tokio::test]
    async fn a_switch_that_stops_answering_times_the_batch_out() {
        let (_dir, native, seen) = switch(
            Duration::from_millis(300),
            vec![Behaviour::GoSilent, Behaviour::Serve],
        );
        let started = std::time::Instant::now();
        let error = native.apply(&[grant()]).await.unwrap_err();
        assert!(matches!(error, OvsError::Timeout { .. }), "{error}");
        assert!(started.elapsed() < Duration::from_secs(3));
        native.apply(&[grant()]).await.unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!((seen.connections, seen.committed_mods), (2, 1), "{seen:?}");
    }

    /// No socket: the batch goes through ovs-ofctl (here one that cannot run), counted.
    #[tokio::test]
    async fn without_a_socket_the_batch_falls_back_to_ovs_ofctl() {
        let dir = tempfile::tempdir().unwrap();
        let native = native_at(dir.path(), Duration::from_secs(1));
        assert!(native.apply(&[grant()]).await.is_err());
        assert_eq!(native.fallbacks(), 1);
        native.disable();
        assert!(!native.enabled());
    }

    #[test]
    fn the_allow_actions_ovn_writes_translate_and_others_do_not() {
        let t = Template::stand_in(51, 1, 1);
        for v in &t.allow {
            assert!(actions(&v.actions).is_ok(), "{}", v.actions);
        }
        let tiered =
            Actions::new("load:0x1->OXM_OF_PKT_REG4[48],load:0x1->NXM_NX_XXREG0[97],resubmit(,52)")
                .expect("actions");
        assert_eq!(
            actions(&tiered).expect("translates"),
            [
                Action::load(Register::XReg(4), 48, 1, 1),
                Action::load(Register::XXReg(0), 97, 1, 1),
                Action::Resubmit { table: 52 },
            ]
        );
        let ranged = Actions::new("load:0x5->NXM_NX_REG13[0..15],load:0x2->NXM_NX_REG10[]")
            .expect("actions");
        assert_eq!(
            actions(&ranged).expect("translates"),
            [
                Action::load(Register::Reg(13), 0, 16, 5),
                Action::load(Register::Reg(10), 0, 32, 2),
            ]
        );
        for bad in [
            "ct(commit)",
            "load:0x2->NXM_NX_REG0[0]",
            "load:0x1->NXM_NX_REG0[31..40]",
            "load:0x1->NXM_NX_REG99[0]",
            "resubmit(,300)",
            "output:1",
        ] {
            let a = Actions::new(bad).expect("actions");
            assert!(actions(&a).is_err(), "{bad}");
        }
    }
}

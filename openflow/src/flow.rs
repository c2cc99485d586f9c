//! Flows: the flow mods flowd sends, and the flow descriptions (flow stats) and flow-removed
//! notices OVS sends back, in their OpenFlow 1.5 forms (`lib/ofp-flow.c`, `lib/ofp-monitor.c`).

use crate::action::{parse_actions, put_apply_actions, put_apply_actions_raw, split_instructions};
use crate::oxm::{Match, RawMatch};
use crate::wire::{padded, Reader};
use crate::{Action, CodecError};
use bytes::{BufMut, Bytes, BytesMut};
use std::time::Duration;

/// The table id that names every table: deletes and stats requests across the pipeline.
pub const OFPTT_ALL: u8 = 0xff;
/// "No port" and "no group": flow mods and stats requests that do not filter on an output.
const OFPP_ANY: u32 = 0xffff_ffff;
const OFPG_ANY: u32 = 0xffff_ffff;
/// A flow mod that applies to no buffered packet.
const OFP_NO_BUFFER: u32 = 0xffff_ffff;

/// `ofp_flow_mod_flags` OFPFF_SEND_FLOW_REM: OVS sends `OFPT_FLOW_REMOVED` when the flow goes.
const OFPFF_SEND_FLOW_REM: u16 = 1;

/// `ofp_flow_mod_command`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowModCommand {
    Add,
    /// Every flow the match covers (and the cookie filter admits) gets the new actions.
    Modify,
    /// The flow with exactly this match and priority gets the new actions.
    ModifyStrict,
    /// Every flow the match covers (and the cookie filter admits) goes.
    Delete,
    /// The flow with exactly this match and priority goes.
    DeleteStrict,
}

impl FlowModCommand {
    fn code(self) -> u8 {
        match self {
            Self::Add => 0,
            Self::Modify => 1,
            Self::ModifyStrict => 2,
            Self::Delete => 3,
            Self::DeleteStrict => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Add,
            1 => Self::Modify,
            2 => Self::ModifyStrict,
            3 => Self::Delete,
            4 => Self::DeleteStrict,
            _ => return None,
        })
    }
}

/// `OFPT_FLOW_MOD` (`struct ofp11_flow_mod`, unchanged in 1.5), with no buffer, no output port or
/// group filter and importance 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowMod {
    pub command: FlowModCommand,
    /// [`OFPTT_ALL`] is valid for deletes only.
    pub table: u8,
    pub priority: u16,
    /// For [`FlowModCommand::Add`] the new flow's cookie (`cookie_mask` should be 0). For the
    /// others a filter: only flows whose cookie equals `cookie` in the `cookie_mask` bits are
    /// touched, and their cookie is left as it is (OpenFlow 1.2 and later cannot change it).
    pub cookie: u64,
    pub cookie_mask: u64,
    /// Seconds; 0 for never.
    pub idle_timeout: u16,
    pub hard_timeout: u16,
    /// OFPFF_SEND_FLOW_REM: OVS reports the flow's removal (`OFPT_FLOW_REMOVED`).
    pub send_flow_removed: bool,
    pub matches: Match,
    /// Apply-actions; empty drops.
    pub actions: Vec<Action>,
}

impl FlowMod {
    /// Adds (or replaces, for the same match and priority) a flow.
    pub fn add(
        table: u8,
        priority: u16,
        cookie: u64,
        matches: Match,
        actions: Vec<Action>,
    ) -> Self {
        Self {
            command: FlowModCommand::Add,
            table,
            priority,
            cookie,
            cookie_mask: 0,
            idle_timeout: 0,
            hard_timeout: 0,
            send_flow_removed: false,
            matches,
            actions,
        }
    }

    /// Deletes every flow, in every table, whose cookie has `cookie` in the `cookie_mask` bits.
    pub fn delete_by_cookie(cookie: u64, cookie_mask: u64) -> Self {
        Self {
            command: FlowModCommand::Delete,
            table: OFPTT_ALL,
            priority: 0,
            cookie,
            cookie_mask,
            ..Self::add(OFPTT_ALL, 0, 0, Match::default(), Vec::new())
        }
    }

    pub(crate) fn put(&self, out: &mut BytesMut) -> Result<(), CodecError> {
        out.put_u64(self.cookie);
        out.put_u64(self.cookie_mask);
        out.put_u8(self.table);
        out.put_u8(self.command.code());
        out.put_u16(self.idle_timeout);
        out.put_u16(self.hard_timeout);
        out.put_u16(self.priority);
        out.put_u32(OFP_NO_BUFFER);
        out.put_u32(OFPP_ANY);
        out.put_u32(OFPG_ANY);
        out.put_u16(if self.send_flow_removed {
            OFPFF_SEND_FLOW_REM
        } else {
            0
        });
        // Importance: eviction is not enabled on br-int.
        out.put_u16(0);
        self.matches.put_ofp_match(out)?;
        put_apply_actions(out, &self.actions)
    }

    /// `None` for a flow mod outside the subset (a buffer, an output filter, other flags or
    /// instructions); an error for one whose structure is broken.
    pub(crate) fn parse(body: Bytes) -> Result<Option<Self>, CodecError> {
        let mut r = Reader::new("OFPT_FLOW_MOD", body);
        let cookie = r.u64()?;
        let cookie_mask = r.u64()?;
        let table = r.u8()?;
        let command = r.u8()?;
        let idle_timeout = r.u16()?;
        let hard_timeout = r.u16()?;
        let priority = r.u16()?;
        let buffer_id = r.u32()?;
        let out_port = r.u32()?;
        let out_group = r.u32()?;
        let flags = r.u16()?;
        let importance = r.u16()?;
        let matches = RawMatch::take_ofp_match(&mut r)?.fields;
        let (actions, other) = split_instructions(r.take(r.remaining())?)?;
        let actions = parse_actions(actions)?;
        let Some(command) = FlowModCommand::from_code(command) else {
            return Ok(None);
        };
        if buffer_id != OFP_NO_BUFFER
            || out_port != OFPP_ANY
            || out_group != OFPG_ANY
            || flags & !OFPFF_SEND_FLOW_REM != 0
            || importance != 0
            || !other.is_empty()
        {
            return Ok(None);
        }
        Ok(Some(Self {
            command,
            table,
            priority,
            cookie,
            cookie_mask,
            idle_timeout,
            hard_timeout,
            send_flow_removed: flags & OFPFF_SEND_FLOW_REM != 0,
            matches,
            actions,
        }))
    }
}

/// A request for the flows of one table (or [`OFPTT_ALL`]) whose cookie has `cookie` in the
/// `cookie_mask` bits, as `ovs-ofctl -O OpenFlow15 dump-flows` sends it: multipart type 1
/// (OpenFlow 1.5's `OFPMP_FLOW_DESC`) with a `struct ofp11_flow_stats_request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowStatsRequest {
    pub table: u8,
    pub cookie: u64,
    pub cookie_mask: u64,
}

impl FlowStatsRequest {
    pub(crate) fn put(&self, out: &mut BytesMut) -> Result<(), CodecError> {
        out.put_u8(self.table);
        out.put_bytes(0, 3);
        out.put_u32(OFPP_ANY);
        out.put_u32(OFPG_ANY);
        out.put_bytes(0, 4);
        out.put_u64(self.cookie);
        out.put_u64(self.cookie_mask);
        Match::default().put_ofp_match(out)
    }

    /// `None` for a request that filters on more than table and cookie.
    pub(crate) fn parse(body: Bytes) -> Result<Option<Self>, CodecError> {
        let mut r = Reader::new("flow stats request", body);
        let table = r.u8()?;
        r.skip(3)?;
        let out_port = r.u32()?;
        let out_group = r.u32()?;
        r.skip(4)?;
        let cookie = r.u64()?;
        let cookie_mask = r.u64()?;
        let matches = RawMatch::take_ofp_match(&mut r)?;
        let plain = out_port == OFPP_ANY && out_group == OFPG_ANY && matches.raw.is_empty();
        Ok((plain && r.is_empty()).then_some(Self {
            table,
            cookie,
            cookie_mask,
        }))
    }
}

/// The counters OpenFlow 1.5 sends as OXS fields (`struct ofp_oxs_stat`); each is absent when the
/// switch leaves it out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowCounters {
    pub duration: Option<Duration>,
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
}

/// `enum oxs_ofb_stat_fields`, in class OFPXSC_OPENFLOW_BASIC.
const OFPXSC_OPENFLOW_BASIC: u16 = 0x8002;
const OFPXST_OFB_DURATION: u8 = 0;
const OFPXST_OFB_PACKET_COUNT: u8 = 4;
const OFPXST_OFB_BYTE_COUNT: u8 = 5;

impl FlowCounters {
    fn put(&self, out: &mut BytesMut) -> Result<(), CodecError> {
        let start = out.len();
        out.put_u16(0);
        out.put_u16(0);
        let mut field = |field: u8, value: u64| {
            out.put_u16(OFPXSC_OPENFLOW_BASIC);
            out.put_u8(field << 1);
            out.put_u8(8);
            out.put_u64(value);
        };
        if let Some(d) = self.duration {
            field(
                OFPXST_OFB_DURATION,
                (d.as_secs() << 32) | u64::from(d.subsec_nanos()),
            );
        }
        if let Some(n) = self.packets {
            field(OFPXST_OFB_PACKET_COUNT, n);
        }
        if let Some(n) = self.bytes {
            field(OFPXST_OFB_BYTE_COUNT, n);
        }
        crate::wire::patch_len(out, start, 2, "stats")?;
        crate::wire::pad_from(out, start);
        Ok(())
    }

    /// Takes a `struct ofp_oxs_stat` with its fields and padding off the front of `r`; fields
    /// other than the three above are skipped.
    fn take(r: &mut Reader) -> Result<Self, CodecError> {
        let len = usize::from(r.peek_u16(2)?);
        if len < 4 || padded(len) > r.remaining() {
            return Err(r.malformed());
        }
        let mut whole = r.take(padded(len))?;
        whole.truncate(len);
        let mut fields = Reader::new("stats", whole.slice(4..));
        let mut counters = Self::default();
        while !fields.is_empty() {
            let class = fields.u16()?;
            let field = fields.u8()? >> 1;
            let len = usize::from(fields.u8()?);
            let value = fields.take(len)?;
            if class != OFPXSC_OPENFLOW_BASIC || len != 8 {
                continue;
            }
            let v = u64::from_be_bytes(value.as_ref().try_into().map_err(|_| fields.malformed())?);
            match field {
                OFPXST_OFB_DURATION => {
                    counters.duration = Some(Duration::new(v >> 32, (v & 0xffff_ffff) as u32));
                }
                OFPXST_OFB_PACKET_COUNT => counters.packets = Some(v),
                OFPXST_OFB_BYTE_COUNT => counters.bytes = Some(v),
                _ => {}
            }
        }
        Ok(counters)
    }
}

/// One flow of a flow stats reply (`struct ofp15_flow_desc`, its match, OXS counters and
/// instructions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowStats {
    pub table: u8,
    pub priority: u16,
    pub cookie: u64,
    pub idle_timeout: u16,
    pub hard_timeout: u16,
    /// `OFPFF_*` as OVS reports them.
    pub flags: u16,
    pub importance: u16,
    pub matches: RawMatch,
    pub counters: FlowCounters,
    /// The apply-actions instruction's actions, byte for byte: [`Action::Raw`] of these repeats the
    /// flow's actions exactly.
    pub actions: Bytes,
    /// Any other instructions, whole (OVS writes `write_metadata`, `goto_table` and the like as
    /// instructions of their own); usually empty.
    pub other_instructions: Bytes,
}

impl FlowStats {
    pub(crate) fn put(&self, out: &mut BytesMut) -> Result<(), CodecError> {
        let start = out.len();
        out.put_u16(0);
        out.put_bytes(0, 2);
        out.put_u8(self.table);
        out.put_u8(0);
        out.put_u16(self.priority);
        out.put_u16(self.idle_timeout);
        out.put_u16(self.hard_timeout);
        out.put_u16(self.flags);
        out.put_u16(self.importance);
        out.put_u64(self.cookie);
        self.matches.put_ofp_match(out)?;
        self.counters.put(out)?;
        if !self.actions.is_empty() {
            put_apply_actions_raw(out, |out| {
                out.put_slice(&self.actions);
                Ok(())
            })?;
        }
        out.put_slice(&self.other_instructions);
        crate::wire::patch_len(out, start, 0, "flow stats")
    }

    pub(crate) fn take(r: &mut Reader) -> Result<Self, CodecError> {
        let len = usize::from(r.peek_u16(0)?);
        let mut f = Reader::new("flow stats", r.take(len)?);
        if len < 24 {
            return Err(f.malformed());
        }
        // `length` (already read), pad, table_id, pad.
        f.skip(4)?;
        let table = f.u8()?;
        f.skip(1)?;
        let priority = f.u16()?;
        let idle_timeout = f.u16()?;
        let hard_timeout = f.u16()?;
        let flags = f.u16()?;
        let importance = f.u16()?;
        let cookie = f.u64()?;
        let matches = RawMatch::take_ofp_match(&mut f)?;
        let counters = FlowCounters::take(&mut f)?;
        let (actions, other_instructions) = split_instructions(f.take(f.remaining())?)?;
        Ok(Self {
            table,
            priority,
            cookie,
            idle_timeout,
            hard_timeout,
            flags,
            importance,
            matches,
            counters,
            actions,
            other_instructions,
        })
    }
}

/// `OFPT_FLOW_REMOVED` in its OpenFlow 1.5 form (`struct ofp15_flow_removed`, match, OXS counters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowRemoved {
    pub table: u8,
    /// `ofp_flow_removed_reason`: idle timeout 0, hard timeout 1, delete 2, group delete 3, meter
    /// delete 4, eviction 5.
    pub reason: u8,
    pub priority: u16,
    pub idle_timeout: u16,
    pub hard_timeout: u16,
    pub cookie: u64,
    pub matches: RawMatch,
    pub counters: FlowCounters,
}

impl FlowRemoved {
    pub(crate) fn put(&self, out: &mut BytesMut) -> Result<(), CodecError> {
        out.put_u8(self.table);
        out.put_u8(self.reason);
        out.put_u16(self.priority);
        out.put_u16(self.idle_timeout);
        out.put_u16(self.hard_timeout);
        out.put_u64(self.cookie);
        self.matches.put_ofp_match(out)?;
        self.counters.put(out)
    }

    pub(crate) fn parse(body: Bytes) -> Result<Self, CodecError> {
        let mut r = Reader::new("OFPT_FLOW_REMOVED", body);
        Ok(Self {
            table: r.u8()?,
            reason: r.u8()?,
            priority: r.u16()?,
            idle_timeout: r.u16()?,
            hard_timeout: r.u16()?,
            cookie: r.u64()?,
            matches: RawMatch::take_ofp_match(&mut r)?,
            counters: FlowCounters::take(&mut r)?,
        })
    }
}

//! `NXT_PACKET_IN2` and `NXT_RESUME` (`lib/ofp-packet.c`): a packet a `controller(pause)` action
//! froze, and the message that thaws it. Both are lists of `NXPINT_*` properties; a resume repeats
//! the packet-in's packet, flow and metadata and hands back its continuation untouched.

use crate::oxm::RawMatch;
use crate::wire::{put_prop, take_prop, Reader};
use crate::CodecError;
use bytes::{BufMut, Bytes, BytesMut};

/// `enum nx_packet_in2_prop_type`.
const NXPINT_PACKET: u16 = 0;
const NXPINT_FULL_LEN: u16 = 1;
const NXPINT_BUFFER_ID: u16 = 2;
const NXPINT_TABLE_ID: u16 = 3;
const NXPINT_COOKIE: u16 = 4;
const NXPINT_REASON: u16 = 5;
const NXPINT_METADATA: u16 = 6;
const NXPINT_USERDATA: u16 = 7;
const NXPINT_CONTINUATION: u16 = 8;

/// A packet sent to this controller (`NXT_PACKET_IN2`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketIn2 {
    /// The packet as it was when the action ran (rewrites by earlier actions included).
    pub packet: Bytes,
    /// The packet's length before truncation to the action's `max_len`, when truncated.
    pub full_len: Option<u32>,
    pub buffer_id: Option<u32>,
    pub table_id: u8,
    /// The flow's cookie; absent for a packet no flow sent.
    pub cookie: Option<u64>,
    /// `ofp_packet_in_reason` as OVS encodes it for 1.5 (1 for `controller` actions).
    pub reason: u8,
    /// The packet's metadata fields (in_port, registers, metadata, conntrack state, ...).
    pub metadata: RawMatch,
    /// The `userdata` of the `controller` action.
    pub userdata: Bytes,
    /// Present when the action paused: the frozen pipeline, private to this ovs-vswitchd and
    /// bridge, to go back unchanged in an [`NXT_RESUME`](Resume).
    pub continuation: Option<Bytes>,
}

impl PacketIn2 {
    /// The resume that continues this packet's pipeline where it paused, with the packet as it
    /// arrived; `None` if it did not pause.
    pub fn resume(&self) -> Option<Resume> {
        Some(Resume {
            packet: self.packet.clone(),
            table_id: self.table_id,
            cookie: self.cookie,
            reason: self.reason,
            metadata: self.metadata.raw.clone(),
            continuation: self.continuation.clone()?,
        })
    }

    /// What OVS sends; flowd's tests play OVS with it.
    pub(crate) fn put(&self, out: &mut BytesMut) -> Result<(), CodecError> {
        Props {
            packet: self.packet.clone(),
            full_len: self.full_len,
            buffer_id: self.buffer_id,
            table_id: self.table_id,
            cookie: self.cookie,
            reason: self.reason,
            metadata: self.metadata.raw.clone(),
            userdata: self.userdata.clone(),
            continuation: self.continuation.clone(),
        }
        .put("NXT_PACKET_IN2", out)
    }

    pub(crate) fn parse(body: Bytes) -> Result<Self, CodecError> {
        let p = Props::parse("NXT_PACKET_IN2", body)?;
        Ok(Self {
            packet: p.packet,
            full_len: p.full_len,
            buffer_id: p.buffer_id,
            table_id: p.table_id,
            cookie: p.cookie,
            reason: p.reason,
            metadata: RawMatch::parse(p.metadata)?,
            userdata: p.userdata,
            continuation: p.continuation,
        })
    }
}

/// Continues a paused pipeline (`NXT_RESUME`). OVS rebuilds the packet's flow from `packet` and
/// `metadata` and its frozen state from `continuation`; [`PacketIn2::resume`] fills all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub packet: Bytes,
    pub table_id: u8,
    pub cookie: Option<u64>,
    pub reason: u8,
    /// Bare OXM fields, as the packet-in carried them.
    pub metadata: Bytes,
    pub continuation: Bytes,
}

impl Resume {
    pub(crate) fn put(&self, out: &mut BytesMut) -> Result<(), CodecError> {
        Props {
            packet: self.packet.clone(),
            table_id: self.table_id,
            cookie: self.cookie,
            reason: self.reason,
            metadata: self.metadata.clone(),
            continuation: Some(self.continuation.clone()),
            ..Props::default()
        }
        .put("NXT_RESUME", out)
    }

    /// `None` for a resume without a continuation, which OVS would refuse.
    pub(crate) fn parse(body: Bytes) -> Result<Option<Self>, CodecError> {
        let p = Props::parse("NXT_RESUME", body)?;
        Ok(p.continuation.map(|continuation| Self {
            packet: p.packet,
            table_id: p.table_id,
            cookie: p.cookie,
            reason: p.reason,
            metadata: p.metadata,
            continuation,
        }))
    }
}

/// The properties both messages share, each checked for the length its type needs.
#[derive(Default)]
struct Props {
    packet: Bytes,
    full_len: Option<u32>,
    buffer_id: Option<u32>,
    table_id: u8,
    cookie: Option<u64>,
    reason: u8,
    metadata: Bytes,
    userdata: Bytes,
    continuation: Option<Bytes>,
}

impl Props {
    /// The properties in the order and form OVS writes them (`ofputil_put_packet_in_private`):
    /// userdata, which only a packet-in has, last.
    fn put(&self, what: &'static str, out: &mut BytesMut) -> Result<(), CodecError> {
        put_prop(out, NXPINT_PACKET, &self.packet, what)?;
        if let Some(full_len) = self.full_len {
            put_prop(out, NXPINT_FULL_LEN, &full_len.to_be_bytes(), what)?;
        }
        if let Some(buffer_id) = self.buffer_id {
            put_prop(out, NXPINT_BUFFER_ID, &buffer_id.to_be_bytes(), what)?;
        }
        put_prop(out, NXPINT_TABLE_ID, &[self.table_id], what)?;
        if let Some(cookie) = self.cookie {
            // A 64-bit property value sits 8-aligned, after 4 bytes of padding.
            let mut value = [0; 12];
            value[4..].copy_from_slice(&cookie.to_be_bytes());
            put_prop(out, NXPINT_COOKIE, &value, what)?;
        }
        put_prop(out, NXPINT_REASON, &[self.reason], what)?;
        put_prop(out, NXPINT_METADATA, &self.metadata, what)?;
        if let Some(continuation) = &self.continuation {
            // Nested properties start 8-aligned, after 4 bytes of padding.
            let mut nested = BytesMut::with_capacity(4 + continuation.len());
            nested.put_bytes(0, 4);
            nested.put_slice(continuation);
            put_prop(out, NXPINT_CONTINUATION, &nested, what)?;
        }
        if !self.userdata.is_empty() {
            put_prop(out, NXPINT_USERDATA, &self.userdata, what)?;
        }
        Ok(())
    }

    fn parse(what: &'static str, body: Bytes) -> Result<Self, CodecError> {
        let mut r = Reader::new(what, body);
        let mut p = Self::default();
        while !r.is_empty() {
            let (kind, payload) = take_prop(&mut r)?;
            let bad = || CodecError::Malformed {
                what,
                len: payload.len(),
            };
            let mut v = Reader::new(what, payload.clone());
            match kind {
                NXPINT_PACKET => p.packet = payload,
                NXPINT_FULL_LEN if payload.len() == 4 => p.full_len = Some(v.u32()?),
                NXPINT_BUFFER_ID if payload.len() == 4 => p.buffer_id = Some(v.u32()?),
                NXPINT_TABLE_ID => p.table_id = v.u8()?,
                NXPINT_COOKIE if payload.len() == 12 => {
                    v.skip(4)?;
                    p.cookie = Some(v.u64()?);
                }
                NXPINT_REASON => p.reason = v.u8()?,
                NXPINT_METADATA => p.metadata = payload,
                NXPINT_USERDATA => p.userdata = payload,
                NXPINT_CONTINUATION if payload.len() >= 4 => {
                    p.continuation = Some(payload.slice(4..));
                }
                NXPINT_FULL_LEN | NXPINT_BUFFER_ID | NXPINT_COOKIE | NXPINT_CONTINUATION => {
                    return Err(bad());
                }
                // Properties of later OVS versions: nothing flowd needs, so no reason to fail.
                _ => {}
            }
        }
        Ok(p)
    }
}

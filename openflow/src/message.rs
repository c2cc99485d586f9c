//! The messages of the subset, their headers, and the two entry points: [`encode`] and [`decode`].

use crate::bundle::{BundleAdd, BundleControl, BundleFlags};
use crate::flow::{FlowMod, FlowRemoved, FlowStats, FlowStatsRequest};
use crate::packet_in::{PacketIn2, Resume};
use crate::wire::{patch_len, Reader};
use crate::CodecError;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The OpenFlow 1.5 wire version.
pub const OFP15_VERSION: u8 = 0x06;
/// Every message starts with version, type, length and transaction id.
pub const HEADER_LEN: usize = 8;
/// Nicira's experimenter id, which prefixes every NXT_* message and NXAST_* action.
pub const NX_VENDOR_ID: u32 = 0x0000_2320;

const OFPT_HELLO: u8 = 0;
const OFPT_ERROR: u8 = 1;
const OFPT_ECHO_REQUEST: u8 = 2;
const OFPT_ECHO_REPLY: u8 = 3;
const OFPT_EXPERIMENTER: u8 = 4;
const OFPT_FEATURES_REQUEST: u8 = 5;
const OFPT_FEATURES_REPLY: u8 = 6;
const OFPT_SET_CONFIG: u8 = 9;
const OFPT_FLOW_REMOVED: u8 = 11;
const OFPT_FLOW_MOD: u8 = 14;
const OFPT_MULTIPART_REQUEST: u8 = 18;
const OFPT_MULTIPART_REPLY: u8 = 19;
const OFPT_BARRIER_REQUEST: u8 = 20;
const OFPT_BARRIER_REPLY: u8 = 21;
const OFPT_BUNDLE_CONTROL: u8 = 33;
const OFPT_BUNDLE_ADD_MESSAGE: u8 = 34;

const NXT_SET_PACKET_IN_FORMAT: u32 = 16;
const NXT_SET_CONTROLLER_ID: u32 = 20;
const NXT_RESUME: u32 = 28;
const NXT_PACKET_IN2: u32 = 30;

/// The hello element that lists the versions a side speaks.
const OFPHET_VERSIONBITMAP: u16 = 1;

/// The multipart type OVS sends and answers for `dump-flows` in OpenFlow 1.5: the 1.1 flow stats
/// request, answered with 1.5 flow descriptions (`OFPMP_FLOW_DESC`).
const OFPMP_FLOW_DESC: u16 = 1;
/// More replies to the same request follow.
const OFPMPF_REPLY_MORE: u16 = 1;

/// `struct ofp_switch_features` without the header.
const FEATURES_LEN: usize = 24;

/// How OVS sends packet-ins to this connection (`NXT_SET_PACKET_IN_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketInFormat {
    /// The OpenFlow version's own `OFPT_PACKET_IN`.
    Standard,
    /// `NXT_PACKET_IN`.
    Nxt,
    /// `NXT_PACKET_IN2`, the one that carries continuations for `NXT_RESUME`.
    Nxt2,
}

impl PacketInFormat {
    fn code(self) -> u32 {
        match self {
            Self::Standard => 0,
            Self::Nxt => 1,
            Self::Nxt2 => 2,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(Self::Standard),
            1 => Some(Self::Nxt),
            2 => Some(Self::Nxt2),
            _ => None,
        }
    }
}

/// One OpenFlow message of the subset flowd speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Sent with a version bitmap naming OpenFlow 1.5 only.
    Hello,
    /// Bundle failures have type [`OFPET_BUNDLE_FAILED`](crate::OFPET_BUNDLE_FAILED).
    Error {
        kind: u16,
        code: u16,
        /// At least the start of the message that failed.
        data: Bytes,
    },
    EchoRequest(Bytes),
    EchoReply(Bytes),
    FeaturesRequest,
    /// The datapath id of the bridge; the rest of `ofp_switch_features` is of no use to flowd.
    FeaturesReply {
        datapath_id: u64,
    },
    /// Normal fragment handling; `miss_send_len` bytes of a packet go to the controller.
    SetConfig {
        miss_send_len: u16,
    },
    FlowMod(FlowMod),
    FlowRemoved(FlowRemoved),
    /// A flow stats request (`dump-flows`).
    FlowStatsRequest(FlowStatsRequest),
    /// One part of the answer: while `more` is set, further parts follow with the same xid, and
    /// the caller collects the flows until a part without it.
    FlowStatsReply {
        flows: Vec<FlowStats>,
        more: bool,
    },
    BarrierRequest,
    BarrierReply,
    BundleControl(BundleControl),
    BundleAdd(BundleAdd),
    /// This connection's controller id: OVS sends it only the packet-ins of `controller(id=...)`
    /// actions with the same id (ovn-controller is 0).
    SetControllerId(u16),
    SetPacketInFormat(PacketInFormat),
    PacketIn2(PacketIn2),
    Resume(Resume),
    /// A message outside the subset, body as received.
    Other {
        kind: u8,
        body: Bytes,
    },
}

/// Appends `message` with transaction id `xid` to `out`. Fails for a body beyond OpenFlow's 64 KiB
/// message length or for an action the subset cannot express (a register OVS lacks); `out` is then
/// as it was.
pub fn encode(xid: u32, message: &Message, out: &mut BytesMut) -> Result<(), CodecError> {
    let start = out.len();
    let result = encode_at(xid, message, out, start);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn encode_at(
    xid: u32,
    message: &Message,
    out: &mut BytesMut,
    start: usize,
) -> Result<(), CodecError> {
    out.put_u8(OFP15_VERSION);
    out.put_u8(kind_of(message));
    out.put_u16(0);
    out.put_u32(xid);
    match message {
        Message::Hello => {
            out.put_u16(OFPHET_VERSIONBITMAP);
            out.put_u16(8);
            out.put_u32(1 << OFP15_VERSION);
        }
        Message::Error { kind, code, data } => {
            out.put_u16(*kind);
            out.put_u16(*code);
            out.put_slice(data);
        }
        Message::EchoRequest(data) | Message::EchoReply(data) => out.put_slice(data),
        Message::FeaturesRequest | Message::BarrierRequest | Message::BarrierReply => {}
        Message::FeaturesReply { datapath_id } => {
            out.put_u64(*datapath_id);
            out.put_bytes(0, FEATURES_LEN - 8);
        }
        Message::SetConfig { miss_send_len } => {
            out.put_u16(0);
            out.put_u16(*miss_send_len);
        }
        Message::FlowMod(flow_mod) => flow_mod.put(out)?,
        Message::FlowRemoved(removed) => removed.put(out)?,
        Message::FlowStatsRequest(request) => {
            out.put_u16(OFPMP_FLOW_DESC);
            out.put_u16(0);
            out.put_bytes(0, 4);
            request.put(out)?;
        }
        Message::FlowStatsReply { flows, more } => {
            out.put_u16(OFPMP_FLOW_DESC);
            out.put_u16(if *more { OFPMPF_REPLY_MORE } else { 0 });
            out.put_bytes(0, 4);
            for flow in flows {
                flow.put(out)?;
            }
        }
        Message::BundleControl(control) => control.put(out),
        Message::BundleAdd(add) => {
            out.put_u32(add.bundle_id);
            out.put_u16(0);
            out.put_u16(add.flags.bits());
            if matches!(*add.message, Message::BundleAdd(_)) {
                return Err(CodecError::Malformed {
                    what: "bundle inside a bundle",
                    len: 0,
                });
            }
            let inner = out.len();
            encode_at(xid, &add.message, out, inner)?;
        }
        Message::SetControllerId(id) => {
            nicira_header(out, NXT_SET_CONTROLLER_ID);
            out.put_bytes(0, 6);
            out.put_u16(*id);
        }
        Message::SetPacketInFormat(format) => {
            nicira_header(out, NXT_SET_PACKET_IN_FORMAT);
            out.put_u32(format.code());
        }
        Message::PacketIn2(packet_in) => {
            nicira_header(out, NXT_PACKET_IN2);
            packet_in.put(out)?;
        }
        Message::Resume(resume) => {
            nicira_header(out, NXT_RESUME);
            resume.put(out)?;
        }
        Message::Other { body, .. } => out.put_slice(body),
    }
    patch_len(out, start, 2, "message")
}

fn kind_of(message: &Message) -> u8 {
    match message {
        Message::Hello => OFPT_HELLO,
        Message::Error { .. } => OFPT_ERROR,
        Message::EchoRequest(_) => OFPT_ECHO_REQUEST,
        Message::EchoReply(_) => OFPT_ECHO_REPLY,
        Message::FeaturesRequest => OFPT_FEATURES_REQUEST,
        Message::FeaturesReply { .. } => OFPT_FEATURES_REPLY,
        Message::SetConfig { .. } => OFPT_SET_CONFIG,
        Message::FlowMod(_) => OFPT_FLOW_MOD,
        Message::FlowRemoved(_) => OFPT_FLOW_REMOVED,
        Message::FlowStatsRequest(_) => OFPT_MULTIPART_REQUEST,
        Message::FlowStatsReply { .. } => OFPT_MULTIPART_REPLY,
        Message::BarrierRequest => OFPT_BARRIER_REQUEST,
        Message::BarrierReply => OFPT_BARRIER_REPLY,
        Message::BundleControl(_) => OFPT_BUNDLE_CONTROL,
        Message::BundleAdd(_) => OFPT_BUNDLE_ADD_MESSAGE,
        Message::SetControllerId(_)
        | Message::SetPacketInFormat(_)
        | Message::PacketIn2(_)
        | Message::Resume(_) => OFPT_EXPERIMENTER,
        Message::Other { kind, .. } => *kind,
    }
}

fn nicira_header(out: &mut BytesMut, subtype: u32) {
    out.put_u32(NX_VENDOR_ID);
    out.put_u32(subtype);
}

/// Takes one whole message off the front of `buf`: `Ok(None)` until all of it has arrived, then the
/// transaction id, the message and the bytes it took. Never reads past the length the header gives,
/// which bounds what a peer can make the caller buffer (64 KiB), and never allocates more than that.
pub fn decode(buf: &[u8]) -> Result<Option<(u32, Message, usize)>, CodecError> {
    decode_nested(buf, false)
}

fn decode_nested(buf: &[u8], in_bundle: bool) -> Result<Option<(u32, Message, usize)>, CodecError> {
    let Some(mut head) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let version = head.get_u8();
    let kind = head.get_u8();
    let len = head.get_u16();
    let xid = head.get_u32();
    if version != OFP15_VERSION && kind != OFPT_HELLO && kind != OFPT_ERROR {
        // A peer may open (HELLO) or refuse (ERROR) in another version; anything else is not ours.
        return Err(CodecError::Version(version));
    }
    if usize::from(len) < HEADER_LEN {
        return Err(CodecError::Length(len));
    }
    let Some(whole) = buf.get(..usize::from(len)) else {
        return Ok(None);
    };
    // One copy of the body; every field that keeps bytes shares it.
    let body = Bytes::copy_from_slice(&whole[HEADER_LEN..]);
    let malformed = |what| CodecError::Malformed {
        what,
        len: body.len(),
    };
    let other = || Message::Other {
        kind,
        body: body.clone(),
    };
    let message = match kind {
        // The version bitmap is not needed: a peer that cannot speak 1.5 says so with an ERROR.
        OFPT_HELLO => Message::Hello,
        OFPT_ERROR => {
            let mut b = body.get(..4).ok_or_else(|| malformed("OFPT_ERROR"))?;
            Message::Error {
                kind: b.get_u16(),
                code: b.get_u16(),
                data: body.slice(4..),
            }
        }
        OFPT_ECHO_REQUEST => Message::EchoRequest(body),
        OFPT_ECHO_REPLY => Message::EchoReply(body),
        OFPT_FEATURES_REQUEST if body.is_empty() => Message::FeaturesRequest,
        OFPT_FEATURES_REPLY => {
            let mut b = body
                .get(..FEATURES_LEN)
                .ok_or_else(|| malformed("OFPT_FEATURES_REPLY"))?;
            Message::FeaturesReply {
                datapath_id: b.get_u64(),
            }
        }
        OFPT_SET_CONFIG => {
            let mut b = body.get(..4).ok_or_else(|| malformed("OFPT_SET_CONFIG"))?;
            let _flags = b.get_u16();
            Message::SetConfig {
                miss_send_len: b.get_u16(),
            }
        }
        OFPT_FLOW_MOD => FlowMod::parse(body.clone())?.map_or_else(other, Message::FlowMod),
        OFPT_FLOW_REMOVED => Message::FlowRemoved(FlowRemoved::parse(body)?),
        OFPT_MULTIPART_REQUEST => decode_multipart_request(body.clone())?.unwrap_or_else(other),
        OFPT_MULTIPART_REPLY => decode_multipart_reply(body.clone())?.unwrap_or_else(other),
        OFPT_BARRIER_REQUEST if body.is_empty() => Message::BarrierRequest,
        OFPT_BARRIER_REPLY if body.is_empty() => Message::BarrierReply,
        OFPT_BUNDLE_CONTROL => {
            BundleControl::parse(body.clone())?.map_or_else(other, Message::BundleControl)
        }
        OFPT_BUNDLE_ADD_MESSAGE if !in_bundle => decode_bundle_add(&body, xid)?,
        OFPT_EXPERIMENTER => decode_nicira(body.clone())?.unwrap_or_else(other),
        _ => other(),
    };
    Ok(Some((xid, message, usize::from(len))))
}

fn decode_multipart_request(body: Bytes) -> Result<Option<Message>, CodecError> {
    let mut r = Reader::new("OFPT_MULTIPART_REQUEST", body);
    let kind = r.u16()?;
    let _flags = r.u16()?;
    r.skip(4)?;
    if kind != OFPMP_FLOW_DESC {
        return Ok(None);
    }
    Ok(FlowStatsRequest::parse(r.take(r.remaining())?)?.map(Message::FlowStatsRequest))
}

fn decode_multipart_reply(body: Bytes) -> Result<Option<Message>, CodecError> {
    let mut r = Reader::new("OFPT_MULTIPART_REPLY", body);
    let kind = r.u16()?;
    let flags = r.u16()?;
    r.skip(4)?;
    if kind != OFPMP_FLOW_DESC {
        return Ok(None);
    }
    let mut flows = Vec::new();
    while !r.is_empty() {
        flows.push(FlowStats::take(&mut r)?);
    }
    Ok(Some(Message::FlowStatsReply {
        flows,
        more: flags & OFPMPF_REPLY_MORE != 0,
    }))
}

/// The inner message must be whole, OpenFlow 1.5 and no bundle itself (which also bounds the
/// recursion to one level).
fn decode_bundle_add(body: &Bytes, xid: u32) -> Result<Message, CodecError> {
    let malformed = || CodecError::Malformed {
        what: "OFPT_BUNDLE_ADD_MESSAGE",
        len: body.len(),
    };
    let mut r = Reader::new("OFPT_BUNDLE_ADD_MESSAGE", body.clone());
    let bundle_id = r.u32()?;
    let _pad = r.u16()?;
    let flags = r.u16()?;
    let inner = r.rest();
    let Some((inner_xid, message, used)) = decode_nested(inner, true)? else {
        return Err(malformed());
    };
    if inner_xid != xid || used != inner.len() {
        return Err(malformed());
    }
    Ok(Message::BundleAdd(BundleAdd {
        bundle_id,
        flags: BundleFlags::from_bits(flags),
        message: Box::new(message),
    }))
}

/// The Nicira messages of the subset; `None` for any other experimenter message.
fn decode_nicira(body: Bytes) -> Result<Option<Message>, CodecError> {
    if body.len() < 8 || body.slice(..4) != NX_VENDOR_ID.to_be_bytes().as_slice() {
        return Ok(None);
    }
    let subtype = u32::from_be_bytes([body[4], body[5], body[6], body[7]]);
    let rest = body.slice(8..);
    Ok(match (subtype, rest.len()) {
        (NXT_SET_CONTROLLER_ID, 8) => Some(Message::SetControllerId(u16::from_be_bytes([
            rest[6], rest[7],
        ]))),
        (NXT_SET_PACKET_IN_FORMAT, 4) => {
            PacketInFormat::from_code(u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]))
                .map(Message::SetPacketInFormat)
        }
        (NXT_PACKET_IN2, _) => Some(Message::PacketIn2(PacketIn2::parse(rest)?)),
        (NXT_RESUME, _) => Resume::parse(rest)?.map(Message::Resume),
        _ => None,
    })
}

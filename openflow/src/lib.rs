//! The OpenFlow 1.5 messages flowd exchanges with OVS over a bridge's management socket, with the
//! Nicira extensions it needs, as a sans-IO codec: [`encode`] appends one message to a buffer,
//! [`decode`] takes one whole message off the front of the bytes read so far.
//!
//! No maintained crate covers this subset (OpenFlow 1.5, controller ids, packet-in2, pause and
//! resume, bundles), so it is written here, message by message, and checked against OVS's own parser
//! (`ovs-ofctl ofp-print`) in the tests. Messages outside the subset decode as [`Message::Other`],
//! so a connection survives what OVS may send unasked.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The OpenFlow 1.5 wire version.
pub const OFP15_VERSION: u8 = 0x06;
/// Every message starts with version, type, length and transaction id.
pub const HEADER_LEN: usize = 8;
/// Nicira's experimenter id, which prefixes every NXT_* message.
pub const NX_VENDOR_ID: u32 = 0x0000_2320;

const OFPT_HELLO: u8 = 0;
const OFPT_ERROR: u8 = 1;
const OFPT_ECHO_REQUEST: u8 = 2;
const OFPT_ECHO_REPLY: u8 = 3;
const OFPT_EXPERIMENTER: u8 = 4;
const OFPT_FEATURES_REQUEST: u8 = 5;
const OFPT_SET_CONFIG: u8 = 9;
const OFPT_BARRIER_REQUEST: u8 = 20;
const OFPT_BARRIER_REPLY: u8 = 21;

const NXT_SET_PACKET_IN_FORMAT: u32 = 16;
const NXT_SET_CONTROLLER_ID: u32 = 20;

/// The hello element that lists the versions a side speaks.
const OFPHET_VERSIONBITMAP: u16 = 1;

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
    Error {
        kind: u16,
        code: u16,
        /// At least the start of the message that failed.
        data: Bytes,
    },
    EchoRequest(Bytes),
    EchoReply(Bytes),
    FeaturesRequest,
    /// Normal fragment handling; `miss_send_len` bytes of a packet go to the controller.
    SetConfig {
        miss_send_len: u16,
    },
    BarrierRequest,
    BarrierReply,
    /// This connection's controller id: OVS sends it only the packet-ins of `controller(id=...)`
    /// actions with the same id (ovn-controller is 0).
    SetControllerId(u16),
    SetPacketInFormat(PacketInFormat),
    /// A message outside the subset, body as received.
    Other {
        kind: u8,
        body: Bytes,
    },
}

/// Why bytes cannot be read as OpenFlow 1.5; the connection is beyond repair.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("OpenFlow version {0:#04x}, not 1.5")]
    Version(u8),
    #[error("message length {0} is shorter than its header")]
    Length(u16),
    #[error("{what} of {len} bytes is malformed")]
    Malformed { what: &'static str, len: usize },
}

fn header(out: &mut BytesMut, kind: u8, xid: u32, body_len: usize) -> Result<(), CodecError> {
    let len = u16::try_from(HEADER_LEN + body_len).map_err(|_| CodecError::Malformed {
        what: "message",
        len: HEADER_LEN + body_len,
    })?;
    out.put_u8(OFP15_VERSION);
    out.put_u8(kind);
    out.put_u16(len);
    out.put_u32(xid);
    Ok(())
}

fn nicira(out: &mut BytesMut, xid: u32, subtype: u32, body: &[u8]) -> Result<(), CodecError> {
    header(out, OFPT_EXPERIMENTER, xid, 8 + body.len())?;
    out.put_u32(NX_VENDOR_ID);
    out.put_u32(subtype);
    out.put_slice(body);
    Ok(())
}

/// Appends `message` with transaction id `xid` to `out`. Fails only for a body beyond OpenFlow's
/// 64 KiB message length.
pub fn encode(xid: u32, message: &Message, out: &mut BytesMut) -> Result<(), CodecError> {
    match message {
        Message::Hello => {
            header(out, OFPT_HELLO, xid, 8)?;
            out.put_u16(OFPHET_VERSIONBITMAP);
            out.put_u16(8);
            out.put_u32(1 << OFP15_VERSION);
        }
        Message::Error { kind, code, data } => {
            header(out, OFPT_ERROR, xid, 4 + data.len())?;
            out.put_u16(*kind);
            out.put_u16(*code);
            out.put_slice(data);
        }
        Message::EchoRequest(data) => {
            header(out, OFPT_ECHO_REQUEST, xid, data.len())?;
            out.put_slice(data);
        }
        Message::EchoReply(data) => {
            header(out, OFPT_ECHO_REPLY, xid, data.len())?;
            out.put_slice(data);
        }
        Message::FeaturesRequest => header(out, OFPT_FEATURES_REQUEST, xid, 0)?,
        Message::SetConfig { miss_send_len } => {
            header(out, OFPT_SET_CONFIG, xid, 4)?;
            out.put_u16(0);
            out.put_u16(*miss_send_len);
        }
        Message::BarrierRequest => header(out, OFPT_BARRIER_REQUEST, xid, 0)?,
        Message::BarrierReply => header(out, OFPT_BARRIER_REPLY, xid, 0)?,
        Message::SetControllerId(id) => {
            let mut body = [0u8; 8];
            body[6..].copy_from_slice(&id.to_be_bytes());
            nicira(out, xid, NXT_SET_CONTROLLER_ID, &body)?;
        }
        Message::SetPacketInFormat(format) => {
            nicira(
                out,
                xid,
                NXT_SET_PACKET_IN_FORMAT,
                &format.code().to_be_bytes(),
            )?;
        }
        Message::Other { kind, body } => {
            header(out, *kind, xid, body.len())?;
            out.put_slice(body);
        }
    }
    Ok(())
}

/// Takes one whole message off the front of `buf`: `Ok(None)` until all of it has arrived, then the
/// transaction id, the message and the bytes it took. Never reads past the length the header gives,
/// which bounds what a peer can make the caller buffer (64 KiB).
pub fn decode(buf: &[u8]) -> Result<Option<(u32, Message, usize)>, CodecError> {
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
    let body = &whole[HEADER_LEN..];
    let malformed = |what| CodecError::Malformed {
        what,
        len: body.len(),
    };
    let message = match kind {
        // The version bitmap is not needed: a peer that cannot speak 1.5 says so with an ERROR.
        OFPT_HELLO => Message::Hello,
        OFPT_ERROR => {
            let mut b = body.get(..4).ok_or_else(|| malformed("OFPT_ERROR"))?;
            Message::Error {
                kind: b.get_u16(),
                code: b.get_u16(),
                data: Bytes::copy_from_slice(&body[4..]),
            }
        }
        OFPT_ECHO_REQUEST => Message::EchoRequest(Bytes::copy_from_slice(body)),
        OFPT_ECHO_REPLY => Message::EchoReply(Bytes::copy_from_slice(body)),
        OFPT_FEATURES_REQUEST if body.is_empty() => Message::FeaturesRequest,
        OFPT_SET_CONFIG => {
            let mut b = body.get(..4).ok_or_else(|| malformed("OFPT_SET_CONFIG"))?;
            let _flags = b.get_u16();
            Message::SetConfig {
                miss_send_len: b.get_u16(),
            }
        }
        OFPT_BARRIER_REQUEST if body.is_empty() => Message::BarrierRequest,
        OFPT_BARRIER_REPLY if body.is_empty() => Message::BarrierReply,
        OFPT_EXPERIMENTER => decode_nicira(body).unwrap_or_else(|| Message::Other {
            kind,
            body: Bytes::copy_from_slice(body),
        }),
        _ => Message::Other {
            kind,
            body: Bytes::copy_from_slice(body),
        },
    };
    Ok(Some((xid, message, usize::from(len))))
}

/// The Nicira messages of the subset; `None` for any other experimenter message.
fn decode_nicira(mut body: &[u8]) -> Option<Message> {
    if body.len() < 8 || body.get_u32() != NX_VENDOR_ID {
        return None;
    }
    match (body.get_u32(), body.len()) {
        (NXT_SET_CONTROLLER_ID, 8) => Some(Message::SetControllerId(u16::from_be_bytes([
            body[6], body[7],
        ]))),
        (NXT_SET_PACKET_IN_FORMAT, 4) => {
            PacketInFormat::from_code(body.get_u32()).map(Message::SetPacketInFormat)
        }
        _ => None,
    }
}

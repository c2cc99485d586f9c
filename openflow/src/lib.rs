//! The OpenFlow 1.5 messages flowd exchanges with OVS over a bridge's management socket, with the
//! Nicira extensions it needs, as a sans-IO codec: [`encode`] appends one message to a buffer,
//! [`decode`] takes one whole message off the front of the bytes read so far.
//!
//! No maintained crate covers this subset (OpenFlow 1.5, controller ids, packet-in2, pause and
//! resume, bundles), so it is written here, message by message, and checked against OVS's own parser
//! (`ovs-ofctl ofp-print`), its own encoder (`ovs-ofctl parse-flow`) and a running `ovs-vswitchd` in
//! the tests. Messages outside the subset decode as [`Message::Other`], so a connection survives what
//! OVS may send unasked; fields and actions outside it are kept as bytes, so flows read from OVS can
//! be written back verbatim.

mod action;
mod bundle;
mod flow;
mod message;
mod oxm;
mod packet_in;
mod wire;

pub use action::{Action, Register, CONTROLLER_MAX_LEN_ALL, OFPP_IN_PORT, OFPR_ACTION};
pub use bundle::{
    bundle_failure_name, BundleAdd, BundleControl, BundleControlType, BundleFlags,
    OFPET_BUNDLE_FAILED,
};
pub use flow::{
    FlowCounters, FlowMod, FlowModCommand, FlowRemoved, FlowStats, FlowStatsRequest, OFPTT_ALL,
};
pub use message::{
    decode, encode, Message, PacketInFormat, HEADER_LEN, NX_VENDOR_ID, OFP15_VERSION,
};
pub use oxm::{
    ct_state, FieldBits, Masked, Match, RawMatch, ETH_TYPE_IPV4, ETH_TYPE_IPV6, IPPROTO_SCTP,
    IPPROTO_TCP, IPPROTO_UDP, N_REGS,
};
pub use packet_in::{PacketIn2, Resume};

/// Why bytes cannot be read as OpenFlow 1.5 (the connection is beyond repair), or why a message
/// cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("OpenFlow version {0:#04x}, not 1.5")]
    Version(u8),
    #[error("message length {0} is shorter than its header")]
    Length(u16),
    #[error("{what} of {len} bytes is malformed")]
    Malformed { what: &'static str, len: usize },
}

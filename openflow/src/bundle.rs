//! Bundles (`OFPT_BUNDLE_CONTROL`, `OFPT_BUNDLE_ADD_MESSAGE`; `lib/ofp-bundle.c`): flowd's flow
//! changes go to OVS as one atomic, ordered bundle, so a datapath never sees half of them.

use crate::wire::Reader;
use crate::{CodecError, Message};
use bytes::{BufMut, Bytes, BytesMut};

const OFPBF_ATOMIC: u16 = 1;
const OFPBF_ORDERED: u16 = 2;

/// `OFPET_BUNDLE_FAILED`, the error type of every bundle failure; the codes are `OFPBFC_*`.
pub const OFPET_BUNDLE_FAILED: u16 = 17;

/// `ofp_bundle_ctrl_type`: each request is answered by the reply one above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BundleControlType {
    OpenRequest,
    OpenReply,
    CloseRequest,
    CloseReply,
    CommitRequest,
    CommitReply,
    DiscardRequest,
    DiscardReply,
}

impl BundleControlType {
    fn code(self) -> u16 {
        match self {
            Self::OpenRequest => 0,
            Self::OpenReply => 1,
            Self::CloseRequest => 2,
            Self::CloseReply => 3,
            Self::CommitRequest => 4,
            Self::CommitReply => 5,
            Self::DiscardRequest => 6,
            Self::DiscardReply => 7,
        }
    }

    fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            0 => Self::OpenRequest,
            1 => Self::OpenReply,
            2 => Self::CloseRequest,
            3 => Self::CloseReply,
            4 => Self::CommitRequest,
            5 => Self::CommitReply,
            6 => Self::DiscardRequest,
            7 => Self::DiscardReply,
            _ => return None,
        })
    }
}

/// `OFPBF_*`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BundleFlags {
    /// All or nothing: one failed message fails the commit and OVS changes nothing.
    pub atomic: bool,
    /// Messages apply in the order they were added.
    pub ordered: bool,
}

impl BundleFlags {
    pub const ATOMIC_ORDERED: Self = Self {
        atomic: true,
        ordered: true,
    };

    pub(crate) fn bits(self) -> u16 {
        (u16::from(self.atomic) * OFPBF_ATOMIC) | (u16::from(self.ordered) * OFPBF_ORDERED)
    }

    /// Flags outside OpenFlow 1.5's two are ignored.
    pub(crate) fn from_bits(bits: u16) -> Self {
        Self {
            atomic: bits & OFPBF_ATOMIC != 0,
            ordered: bits & OFPBF_ORDERED != 0,
        }
    }
}

/// `OFPT_BUNDLE_CONTROL` (`struct ofp14_bundle_ctrl_msg`, no properties).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleControl {
    pub bundle_id: u32,
    pub kind: BundleControlType,
    pub flags: BundleFlags,
}

impl BundleControl {
    pub(crate) fn put(&self, out: &mut BytesMut) {
        out.put_u32(self.bundle_id);
        out.put_u16(self.kind.code());
        out.put_u16(self.flags.bits());
    }

    /// `None` for a control type OpenFlow 1.5 does not have; properties are ignored.
    pub(crate) fn parse(body: Bytes) -> Result<Option<Self>, CodecError> {
        let mut r = Reader::new("OFPT_BUNDLE_CONTROL", body);
        let bundle_id = r.u32()?;
        let kind = r.u16()?;
        let flags = BundleFlags::from_bits(r.u16()?);
        Ok(BundleControlType::from_code(kind).map(|kind| Self {
            bundle_id,
            kind,
            flags,
        }))
    }
}

/// `OFPT_BUNDLE_ADD_MESSAGE`: `message` joins bundle `bundle_id`. It is encoded with the outer
/// message's transaction id, which OVS requires (`OFPBFC_MSG_BAD_XID` otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleAdd {
    pub bundle_id: u32,
    pub flags: BundleFlags,
    pub message: Box<Message>,
}

/// The `OFPBFC_*` name of a bundle failure code, as `ovs-ofctl` prints it.
pub fn bundle_failure_name(code: u16) -> Option<&'static str> {
    const NAMES: [&str; 19] = [
        "OFPBFC_UNKNOWN",
        "OFPBFC_EPERM",
        "OFPBFC_BAD_ID",
        "OFPBFC_BUNDLE_EXIST",
        "OFPBFC_BUNDLE_CLOSED",
        "OFPBFC_OUT_OF_BUNDLES",
        "OFPBFC_BAD_TYPE",
        "OFPBFC_BAD_FLAGS",
        "OFPBFC_MSG_BAD_LEN",
        "OFPBFC_MSG_BAD_XID",
        "OFPBFC_MSG_UNSUP",
        "OFPBFC_MSG_CONFLICT",
        "OFPBFC_MSG_TOO_MANY",
        "OFPBFC_MSG_FAILED",
        "OFPBFC_TIMEOUT",
        "OFPBFC_BUNDLE_IN_PROGRESS",
        "OFPBFC_SCHED_NOT_SUPPORTED",
        "OFPBFC_SCHED_FUTURE",
        "OFPBFC_SCHED_PAST",
    ];
    NAMES.get(usize::from(code)).copied()
}

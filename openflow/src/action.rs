//! The actions flowd writes, and the apply-actions instruction that carries them.
//!
//! Encodings are the ones OVS itself chooses for OpenFlow 1.5 (`lib/ofp-actions.c`), so that a
//! flow written here dumps back exactly as one written with `ovs-ofctl -O OpenFlow15`. In particular
//! OVS's `load:V->FIELD[BITS]` is, in 1.5, a masked `OFPAT_SET_FIELD` ("OF1.5+ only has Set-Field");
//! `ovs-ofctl` prints it back as `set_field:VALUE/MASK->field`, never as `load:`.

use crate::oxm::NXM_NX_XXREG0;
use crate::wire::{be_uint, pad_from, patch_len, put_be_uint, put_prop, take_prop, Reader};
use crate::{CodecError, NX_VENDOR_ID};
use bytes::{Buf, BufMut, Bytes, BytesMut};

const OFPAT_OUTPUT: u16 = 0;
const OFPAT_SET_FIELD: u16 = 25;
const OFPAT_EXPERIMENTER: u16 = 0xffff;

const NXAST_RESUBMIT_TABLE: u16 = 14;
/// The older controller action, which OVS still writes when no userdata or pause is asked for.
const NXAST_CONTROLLER: u16 = 20;
const NXAST_CONTROLLER2: u16 = 37;
const NXAST_CT_CLEAR: u16 = 43;

/// `resubmit(,T)` resubmits with the packet's own in_port.
pub const OFPP_IN_PORT: u32 = 0xffff_fff8;
/// The 16-bit form of [`OFPP_IN_PORT`] that Nicira actions carry.
const OFPP_IN_PORT_16: u16 = 0xfff8;

/// `ofp_instruction_type` APPLY_ACTIONS: flowd's flows carry no other instruction.
pub(crate) const OFPIT_APPLY_ACTIONS: u16 = 4;

/// `enum nx_action_controller2_prop_type`.
const NXAC2PT_MAX_LEN: u16 = 0;
const NXAC2PT_CONTROLLER_ID: u16 = 1;
const NXAC2PT_REASON: u16 = 2;
const NXAC2PT_USERDATA: u16 = 3;
const NXAC2PT_PAUSE: u16 = 4;

/// The packet-in reason of a `controller` action (OVS's `OFPR_ACTION`), its default.
pub const OFPR_ACTION: u8 = 1;
/// `max_len` meaning "the whole packet", the default of a `controller` action.
pub const CONTROLLER_MAX_LEN_ALL: u16 = u16::MAX;

/// OXM classes of the registers a set-field writes.
const OFPXMC_NXM_1: u16 = 0x0001;
const OFPXMC_OPENFLOW_BASIC: u16 = 0x8000;
const OFPXMC_PACKET_REGS: u16 = 0x8001;
const OFPXMT_OFB_METADATA: u8 = 2;

/// A register a set-field writes, named as OVS names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Register {
    /// `reg0..reg15` (`NXM_NX_REGn`), 32 bits.
    Reg(u8),
    /// `xreg0..xreg7` (`OXM_OF_PKT_REGn`), 64 bits: `reg2n` high, `reg2n+1` low.
    XReg(u8),
    /// `xxreg0..xxreg3` (`NXM_NX_XXREGn`), 128 bits: `reg4n` highest.
    XXReg(u8),
    /// `metadata` (`OXM_OF_METADATA`), 64 bits.
    Metadata,
}

impl Register {
    /// OXM class, field and width in bytes; `None` for a register number OVS does not have.
    fn oxm(self) -> Option<(u16, u8, usize)> {
        match self {
            Self::Reg(n @ 0..=15) => Some((OFPXMC_NXM_1, n, 4)),
            Self::XReg(n @ 0..=7) => Some((OFPXMC_PACKET_REGS, n, 8)),
            Self::XXReg(n @ 0..=3) => Some((OFPXMC_NXM_1, NXM_NX_XXREG0 + n, 16)),
            Self::Metadata => Some((OFPXMC_OPENFLOW_BASIC, OFPXMT_OFB_METADATA, 8)),
            _ => None,
        }
    }

    fn from_oxm(class: u16, field: u8, width: usize) -> Option<Self> {
        let reg = match (class, field) {
            (OFPXMC_NXM_1, n @ 0..=15) => Self::Reg(n),
            (OFPXMC_PACKET_REGS, n @ 0..=7) => Self::XReg(n),
            (OFPXMC_NXM_1, n) if (NXM_NX_XXREG0..NXM_NX_XXREG0 + 4).contains(&n) => {
                Self::XXReg(n - NXM_NX_XXREG0)
            }
            (OFPXMC_OPENFLOW_BASIC, OFPXMT_OFB_METADATA) => Self::Metadata,
            _ => return None,
        };
        (reg.oxm().map(|(_, _, w)| w) == Some(width)).then_some(reg)
    }
}

/// One action of an apply-actions list. An empty list drops the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `output:PORT` (`OFPAT_OUTPUT`).
    Output { port: u32 },
    /// `resubmit(,TABLE)` (`NXAST_RESUBMIT_TABLE` with in_port `OFPP_IN_PORT`).
    Resubmit { table: u8 },
    /// `set_field:VALUE/MASK->FIELD` (`OFPAT_SET_FIELD`); [`Action::load`] builds OVS's `load:`.
    /// Values and masks are right-aligned in the register's width.
    SetField {
        field: Register,
        value: u128,
        mask: u128,
    },
    /// `controller(max_len=..,id=..,reason=..,userdata=..,pause)` (`NXAST_CONTROLLER2`). With
    /// `pause`, OVS freezes the packet's pipeline into the packet-in's continuation, and an
    /// `NXT_RESUME` carrying it continues the pipeline after this action.
    Controller {
        /// [`CONTROLLER_MAX_LEN_ALL`] for the whole packet.
        max_len: u16,
        /// Only connections with this controller id receive the packet-in.
        id: u16,
        /// [`OFPR_ACTION`] unless the flow says otherwise.
        reason: u8,
        userdata: Bytes,
        pause: bool,
    },
    /// `ct_clear` (`NXAST_CT_CLEAR`): the packet's conntrack state (`ct_state` and the rest) is
    /// forgotten for the rest of this pipeline; the connection itself is untouched.
    CtClear,
    /// One or more whole actions as OVS encoded them (from a flow stats reply), copied verbatim.
    Raw(Bytes),
}

impl Action {
    /// OVS's `load:VALUE->FIELD[OFS..OFS+N_BITS-1]`: sets `n_bits` bits of `field` from bit `ofs`.
    /// Bits beyond 128 are dropped; [`encode`](crate::encode) refuses bits beyond the field.
    pub fn load(field: Register, ofs: u32, n_bits: u32, value: u128) -> Self {
        let ones = u128::MAX
            .checked_shr(128u32.saturating_sub(n_bits))
            .unwrap_or(0);
        let ones = if n_bits == 0 { 0 } else { ones };
        let mask = ones.checked_shl(ofs).unwrap_or(0);
        Self::SetField {
            field,
            value: value.checked_shl(ofs).unwrap_or(0) & mask,
            mask,
        }
    }

    /// `controller(userdata=..,pause,id=..)` as flowd's hold flows write it.
    pub fn pause_to_controller(id: u16, userdata: Bytes) -> Self {
        Self::Controller {
            max_len: CONTROLLER_MAX_LEN_ALL,
            id,
            reason: OFPR_ACTION,
            userdata,
            pause: true,
        }
    }
}

fn malformed(what: &'static str, len: usize) -> CodecError {
    CodecError::Malformed { what, len }
}

/// Starts an `NXAST_*` action (`struct nx_action_header`): experimenter type, length patched by
/// the caller, Nicira's id, subtype.
fn nx_action_start(out: &mut BytesMut, subtype: u16) -> usize {
    let start = out.len();
    out.put_u16(OFPAT_EXPERIMENTER);
    out.put_u16(0);
    out.put_u32(NX_VENDOR_ID);
    out.put_u16(subtype);
    start
}

pub(crate) fn put_actions(out: &mut BytesMut, actions: &[Action]) -> Result<(), CodecError> {
    for action in actions {
        put_action(out, action)?;
    }
    Ok(())
}

fn put_action(out: &mut BytesMut, action: &Action) -> Result<(), CodecError> {
    match action {
        Action::Output { port } => {
            out.put_u16(OFPAT_OUTPUT);
            out.put_u16(16);
            out.put_u32(*port);
            // max_len matters only for output to the controller; OVS writes 0 otherwise.
            out.put_u16(0);
            out.put_bytes(0, 6);
        }
        Action::Resubmit { table } => {
            let start = nx_action_start(out, NXAST_RESUBMIT_TABLE);
            out.put_u16(OFPP_IN_PORT_16);
            out.put_u8(*table);
            out.put_bytes(0, 3);
            patch_len(out, start, 2, "resubmit")?;
        }
        Action::SetField { field, value, mask } => {
            let (class, oxm_field, width) =
                field.oxm().ok_or(malformed("set_field register", 0))?;
            let full = u128::MAX >> (128 - 8 * width);
            if mask & !full != 0 || *mask == 0 {
                return Err(malformed("set_field mask", width));
            }
            let has_mask = *mask != full;
            let len = if has_mask { 2 * width } else { width };
            let start = out.len();
            out.put_u16(OFPAT_SET_FIELD);
            out.put_u16(0);
            out.put_u16(class);
            // `len` is at most 32.
            out.put_u8((oxm_field << 1) | u8::from(has_mask));
            out.put_u8(u8::try_from(len).map_err(|_| malformed("set_field", len))?);
            put_be_uint(out, value & mask, width);
            if has_mask {
                put_be_uint(out, *mask, width);
            }
            pad_from(out, start);
            patch_len(out, start, 2, "set_field")?;
        }
        Action::Controller {
            max_len,
            id,
            reason,
            userdata,
            pause,
        } if userdata.is_empty() && !*pause => {
            let start = nx_action_start(out, NXAST_CONTROLLER);
            out.put_u16(*max_len);
            out.put_u16(*id);
            out.put_u8(*reason);
            out.put_u8(0);
            patch_len(out, start, 2, "controller")?;
        }
        Action::Controller {
            max_len,
            id,
            reason,
            userdata,
            pause,
        } => {
            let start = nx_action_start(out, NXAST_CONTROLLER2);
            out.put_bytes(0, 6);
            // Defaults are left out, as OVS leaves them out: a u16 property is 8 bytes long.
            if *max_len != CONTROLLER_MAX_LEN_ALL {
                put_prop(
                    out,
                    NXAC2PT_MAX_LEN,
                    &[max_len.to_be_bytes(), [0, 0]].concat(),
                    "controller",
                )?;
            }
            if *id != 0 {
                put_prop(
                    out,
                    NXAC2PT_CONTROLLER_ID,
                    &[id.to_be_bytes(), [0, 0]].concat(),
                    "controller",
                )?;
            }
            if *reason != OFPR_ACTION {
                put_prop(out, NXAC2PT_REASON, &[*reason], "controller")?;
            }
            if !userdata.is_empty() {
                put_prop(out, NXAC2PT_USERDATA, userdata, "controller")?;
            }
            if *pause {
                put_prop(out, NXAC2PT_PAUSE, &[], "controller")?;
            }
            patch_len(out, start, 2, "controller")?;
        }
        Action::CtClear => {
            let start = nx_action_start(out, NXAST_CT_CLEAR);
            out.put_bytes(0, 6);
            patch_len(out, start, 2, "ct_clear")?;
        }
        Action::Raw(bytes) => out.put_slice(bytes),
    }
    Ok(())
}

/// Reads an action list. Actions outside the subset, or with options the subset does not model,
/// become [`Action::Raw`]; an action whose length is not a multiple of 8 or runs past the end is an
/// error.
pub(crate) fn parse_actions(raw: Bytes) -> Result<Vec<Action>, CodecError> {
    let mut r = Reader::new("actions", raw);
    let mut actions = Vec::new();
    while !r.is_empty() {
        let len = usize::from(r.peek_u16(2)?);
        if len < 8 || !len.is_multiple_of(8) {
            return Err(r.malformed());
        }
        let bytes = r.take(len)?;
        actions.push(parse_action(&bytes).unwrap_or(Action::Raw(bytes)));
    }
    Ok(actions)
}

/// The typed form of one action, if it has one.
fn parse_action(bytes: &Bytes) -> Option<Action> {
    let mut b = bytes.clone();
    let kind = b.get_u16();
    let len = usize::from(b.get_u16());
    match kind {
        OFPAT_OUTPUT if len == 16 => {
            let port = b.get_u32();
            (b.get_u16() == 0 && b.iter().all(|&x| x == 0)).then_some(Action::Output { port })
        }
        OFPAT_SET_FIELD => {
            let class = b.get_u16();
            let field_mask = b.get_u8();
            let oxm_len = usize::from(b.get_u8());
            let has_mask = field_mask & 1 != 0;
            let payload = b.get(..oxm_len)?;
            let width = if has_mask { oxm_len / 2 } else { oxm_len };
            let field = Register::from_oxm(class, field_mask >> 1, width)?;
            if (has_mask && !oxm_len.is_multiple_of(2)) || b[oxm_len..].iter().any(|&x| x != 0) {
                return None;
            }
            let full = u128::MAX >> (128 - 8 * width);
            let mask = if has_mask {
                be_uint(&payload[width..])
            } else {
                full
            };
            Some(Action::SetField {
                field,
                value: be_uint(&payload[..width]) & mask,
                mask,
            })
        }
        OFPAT_EXPERIMENTER if len >= 16 && b.get_u32() == NX_VENDOR_ID => match b.get_u16() {
            NXAST_RESUBMIT_TABLE if len == 16 => {
                let in_port = b.get_u16();
                let table = b.get_u8();
                (in_port == OFPP_IN_PORT_16 && b.iter().all(|&x| x == 0))
                    .then_some(Action::Resubmit { table })
            }
            NXAST_CT_CLEAR if len == 16 => b.iter().all(|&x| x == 0).then_some(Action::CtClear),
            NXAST_CONTROLLER if len == 16 => {
                let max_len = b.get_u16();
                let id = b.get_u16();
                let reason = b.get_u8();
                (b.get_u8() == 0).then_some(Action::Controller {
                    max_len,
                    id,
                    reason,
                    userdata: Bytes::new(),
                    pause: false,
                })
            }
            // Without userdata or pause OVS writes the older action; this one would not come back
            // the same.
            NXAST_CONTROLLER2 => parse_controller2(b).filter(
                |a| matches!(a, Action::Controller { userdata, pause, .. } if !userdata.is_empty() || *pause),
            ),
            _ => None,
        },
        _ => None,
    }
}

fn parse_controller2(mut b: Bytes) -> Option<Action> {
    if b.get(..6)?.iter().any(|&x| x != 0) {
        return None;
    }
    b.advance(6);
    let (mut max_len, mut id, mut reason) = (CONTROLLER_MAX_LEN_ALL, 0, OFPR_ACTION);
    let (mut userdata, mut pause) = (Bytes::new(), false);
    let mut props = Reader::new("controller", b);
    while !props.is_empty() {
        let (kind, payload) = take_prop(&mut props).ok()?;
        let u16_of = |p: &Bytes| p.get(..2).map(|v| u16::from_be_bytes([v[0], v[1]]));
        match kind {
            NXAC2PT_MAX_LEN => max_len = u16_of(&payload)?,
            NXAC2PT_CONTROLLER_ID => id = u16_of(&payload)?,
            NXAC2PT_REASON => reason = *payload.first()?,
            NXAC2PT_USERDATA => userdata = payload,
            NXAC2PT_PAUSE => pause = true,
            // A meter id, or something newer: keep the action verbatim.
            _ => return None,
        }
    }
    Some(Action::Controller {
        max_len,
        id,
        reason,
        userdata,
        pause,
    })
}

/// The instruction list of a flow: one apply-actions instruction, or none to drop.
pub(crate) fn put_apply_actions(out: &mut BytesMut, actions: &[Action]) -> Result<(), CodecError> {
    if actions.is_empty() {
        return Ok(());
    }
    put_apply_actions_raw(out, |out| put_actions(out, actions))
}

pub(crate) fn put_apply_actions_raw(
    out: &mut BytesMut,
    body: impl FnOnce(&mut BytesMut) -> Result<(), CodecError>,
) -> Result<(), CodecError> {
    let start = out.len();
    out.put_u16(OFPIT_APPLY_ACTIONS);
    out.put_u16(0);
    out.put_bytes(0, 4);
    body(out)?;
    patch_len(out, start, 2, "instruction")
}

/// Splits an instruction list into the apply-actions' action bytes and every other instruction,
/// whole and in order.
pub(crate) fn split_instructions(raw: Bytes) -> Result<(Bytes, Bytes), CodecError> {
    let mut r = Reader::new("instructions", raw);
    let mut actions = None;
    let mut other = BytesMut::new();
    while !r.is_empty() {
        let kind = r.peek_u16(0)?;
        let len = usize::from(r.peek_u16(2)?);
        if len < 8 || !len.is_multiple_of(8) {
            return Err(r.malformed());
        }
        let instruction = r.take(len)?;
        if kind == OFPIT_APPLY_ACTIONS && actions.is_none() {
            actions = Some(instruction.slice(8..));
        } else {
            other.put_slice(&instruction);
        }
    }
    Ok((actions.unwrap_or_default(), other.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_builds_ovs_value_and_mask() {
        assert_eq!(
            Action::load(Register::XXReg(0), 97, 1, 1),
            Action::SetField {
                field: Register::XXReg(0),
                value: 1 << 97,
                mask: 1 << 97
            }
        );
        assert_eq!(
            Action::load(Register::Reg(15), 0, 32, 7),
            Action::SetField {
                field: Register::Reg(15),
                value: 7,
                mask: 0xffff_ffff
            }
        );
    }

    #[test]
    fn short_or_unaligned_actions_are_errors() {
        assert!(parse_actions(Bytes::from_static(&[0, 0, 0, 16, 0, 0, 0, 7])).is_err());
        assert!(parse_actions(Bytes::from_static(&[0, 0, 0, 4, 0, 0, 0, 7])).is_err());
        assert!(parse_actions(Bytes::new()).unwrap().is_empty());
    }

    #[test]
    fn a_bad_register_or_mask_is_refused() {
        let mut out = BytesMut::new();
        assert!(put_action(&mut out, &Action::load(Register::Reg(16), 0, 1, 1)).is_err());
        assert!(put_action(&mut out, &Action::load(Register::Reg(1), 31, 2, 3)).is_err());
    }
}

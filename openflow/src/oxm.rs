//! Matches: the OXM/NXM fields flowd writes and reads, as a typed [`Match`], and matches received
//! from OVS kept byte for byte next to their parsed view ([`RawMatch`]).
//!
//! A [`Match`] is written in the order OVS itself writes one (`nx_put_raw` in OVS's
//! `lib/nx-match.c`): Ethernet type before IP fields, IP protocol before ports, then registers,
//! conntrack state and metadata. OVS's parser checks each field's prerequisites against the fields
//! before it, so this order is the one that always passes, and it makes our bytes equal OVS's own.

use crate::wire::{be_uint, pad_from, patch_len, put_be_uint, Reader};
use crate::CodecError;
use bytes::{BufMut, Bytes, BytesMut};
use std::net::{Ipv4Addr, Ipv6Addr};

/// `ofp_match_type`: the only match type of OpenFlow 1.2 and later.
const OFPMT_OXM: u16 = 1;

/// OXM classes (`enum ofp_oxm_class`, and OVS's `meta-flow.xml`).
const OFPXMC_NXM_1: u16 = 0x0001;
const OFPXMC_OPENFLOW_BASIC: u16 = 0x8000;
/// OpenFlow 1.5's 64-bit packet registers; OVS's `xreg0..7`, each two of its 32-bit `reg`s.
const OFPXMC_PACKET_REGS: u16 = 0x8001;
/// Its fields carry a 32-bit experimenter id before the value, counted in the length.
const OFPXMC_EXPERIMENTER: u16 = 0xffff;

const OFPXMT_OFB_IN_PORT: u8 = 0;
const OFPXMT_OFB_METADATA: u8 = 2;
const OFPXMT_OFB_ETH_TYPE: u8 = 5;
const OFPXMT_OFB_IP_PROTO: u8 = 10;
const OFPXMT_OFB_IPV4_SRC: u8 = 11;
const OFPXMT_OFB_IPV4_DST: u8 = 12;
const OFPXMT_OFB_TCP_SRC: u8 = 13;
const OFPXMT_OFB_TCP_DST: u8 = 14;
const OFPXMT_OFB_UDP_SRC: u8 = 15;
const OFPXMT_OFB_UDP_DST: u8 = 16;
const OFPXMT_OFB_SCTP_DST: u8 = 18;
const OFPXMT_OFB_IPV6_SRC: u8 = 26;
const OFPXMT_OFB_IPV6_DST: u8 = 27;
/// `NXM_NX_REG0` is field 0 of class NXM_1, `NXM_NX_REG15` field 15.
const NXM_NX_REG0: u8 = 0;
const NXM_NX_CT_STATE: u8 = 105;
/// `NXM_NX_XXREG0..3`, OVS's 128-bit registers (four `reg`s each).
pub(crate) const NXM_NX_XXREG0: u8 = 111;

/// Number of OVS's 32-bit registers `reg0..reg15`.
pub const N_REGS: usize = 16;

/// `dl_type` of IPv4 and IPv6, for [`Match::eth_type`].
pub const ETH_TYPE_IPV4: u16 = 0x0800;
pub const ETH_TYPE_IPV6: u16 = 0x86dd;
/// `nw_proto` values for [`Match::ip_proto`].
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// The bits of `NXM_NX_CT_STATE` (OVS's `CS_*`), as `ovs-ofctl` writes `ct_state=+est+rpl+trk`.
pub mod ct_state {
    pub const NEW: u32 = 0x01;
    pub const ESTABLISHED: u32 = 0x02;
    pub const RELATED: u32 = 0x04;
    pub const REPLY_DIR: u32 = 0x08;
    pub const INVALID: u32 = 0x10;
    pub const TRACKED: u32 = 0x20;
    pub const SRC_NAT: u32 = 0x40;
    pub const DST_NAT: u32 = 0x80;
}

/// A value and the bits of it that matter. An all-ones mask is an exact match and is written
/// without a mask, as OVS does; an all-zeros mask leaves the field out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Masked<T> {
    pub value: T,
    pub mask: T,
}

/// The field types a [`Masked`] can hold, as unsigned numbers of their wire width.
pub trait FieldBits: Copy {
    const WIDTH: usize;
    fn to_bits(self) -> u128;
    fn from_bits(bits: u128) -> Self;
}

impl FieldBits for u32 {
    const WIDTH: usize = 4;
    fn to_bits(self) -> u128 {
        self.into()
    }
    fn from_bits(bits: u128) -> Self {
        // The low 32 bits: `bits` came from a 32-bit field.
        bits as u32
    }
}

impl FieldBits for u64 {
    const WIDTH: usize = 8;
    fn to_bits(self) -> u128 {
        self.into()
    }
    fn from_bits(bits: u128) -> Self {
        bits as u64
    }
}

impl FieldBits for Ipv4Addr {
    const WIDTH: usize = 4;
    fn to_bits(self) -> u128 {
        u32::from(self).into()
    }
    fn from_bits(bits: u128) -> Self {
        Self::from(bits as u32)
    }
}

impl FieldBits for Ipv6Addr {
    const WIDTH: usize = 16;
    fn to_bits(self) -> u128 {
        self.into()
    }
    fn from_bits(bits: u128) -> Self {
        bits.into()
    }
}

impl<T: FieldBits> Masked<T> {
    /// Every bit matters.
    pub fn exact(value: T) -> Self {
        Self {
            value,
            mask: T::from_bits(all_ones(T::WIDTH)),
        }
    }

    fn bits(self) -> (u128, u128) {
        let mask = self.mask.to_bits();
        (self.value.to_bits() & mask, mask)
    }

    fn from_wire(value: u128, mask: u128) -> Self {
        Self {
            value: T::from_bits(value & mask),
            mask: T::from_bits(mask),
        }
    }
}

impl Masked<Ipv4Addr> {
    /// An address prefix such as `10.0.0.0/8`; a length beyond 32 is 32.
    pub fn prefix(addr: Ipv4Addr, len: u8) -> Self {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(len.min(32)))
            .unwrap_or(0);
        Self {
            value: Ipv4Addr::from(u32::from(addr) & mask),
            mask: Ipv4Addr::from(mask),
        }
    }
}

impl Masked<Ipv6Addr> {
    /// An address prefix such as `fd00::/8`; a length beyond 128 is 128.
    pub fn prefix(addr: Ipv6Addr, len: u8) -> Self {
        let mask = u128::MAX
            .checked_shl(128 - u32::from(len.min(128)))
            .unwrap_or(0);
        Self {
            value: Ipv6Addr::from(u128::from(addr) & mask),
            mask: Ipv6Addr::from(mask),
        }
    }
}

fn all_ones(width: usize) -> u128 {
    // `width` is at most 16 (bytes); 0 gives no bits.
    u128::MAX
        .checked_shr(128 - 8 * width.min(16) as u32)
        .unwrap_or(0)
}

/// The fields flowd matches on. Prerequisites (`eth_type` for addresses, `ip_proto` for ports) are
/// the caller's to set; OVS rejects a flow without them (`OFPBMC_BAD_PREREQ`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Match {
    /// `OXM_OF_IN_PORT`; OVS puts it in every packet-in's metadata.
    pub in_port: Option<u32>,
    pub eth_type: Option<u16>,
    pub ipv4_src: Option<Masked<Ipv4Addr>>,
    pub ipv4_dst: Option<Masked<Ipv4Addr>>,
    pub ipv6_src: Option<Masked<Ipv6Addr>>,
    pub ipv6_dst: Option<Masked<Ipv6Addr>>,
    pub ip_proto: Option<u8>,
    pub tcp_src: Option<u16>,
    pub tcp_dst: Option<u16>,
    pub udp_src: Option<u16>,
    pub udp_dst: Option<u16>,
    pub sctp_dst: Option<u16>,
    /// `reg0..reg15`. Read from `NXM_NX_REGn` or from OpenFlow 1.5's packet registers; written as
    /// the latter (`OXM_OF_PKT_REGn` = `reg2n` high, `reg2n+1` low), as OVS does in 1.5.
    pub regs: [Option<Masked<u32>>; N_REGS],
    pub ct_state: Option<Masked<u32>>,
    pub metadata: Option<Masked<u64>>,
    /// Fields outside the subset, each a whole TLV as received, in their order. Written after the
    /// fields above, where every prerequisite they can have is already in place.
    pub other: Vec<Bytes>,
}

fn oxm_header(class: u16, field: u8, has_mask: bool, len: usize) -> u32 {
    // `len` is at most 32 here: twice the widest field.
    let len = u8::try_from(len).unwrap_or(u8::MAX);
    (u32::from(class) << 16) | (u32::from(field) << 9) | (u32::from(has_mask) << 8) | u32::from(len)
}

/// Writes one field the way OVS's `nxm_put_*m` does: nothing for an empty mask, no mask for a full
/// one.
fn put_field(out: &mut BytesMut, class: u16, field: u8, width: usize, value: u128, mask: u128) {
    let full = all_ones(width);
    let mask = mask & full;
    if mask == 0 {
        return;
    }
    let has_mask = mask != full;
    out.put_u32(oxm_header(
        class,
        field,
        has_mask,
        if has_mask { 2 * width } else { width },
    ));
    put_be_uint(out, value & mask, width);
    if has_mask {
        put_be_uint(out, mask, width);
    }
}

fn put_masked<T: FieldBits>(out: &mut BytesMut, class: u16, field: u8, m: Option<Masked<T>>) {
    if let Some(m) = m {
        let (value, mask) = m.bits();
        put_field(out, class, field, T::WIDTH, value, mask);
    }
}

fn put_exact(out: &mut BytesMut, class: u16, field: u8, width: usize, value: Option<u128>) {
    if let Some(value) = value {
        put_field(out, class, field, width, value, all_ones(width));
    }
}

impl Match {
    /// Appends the fields as bare OXM TLVs (the form of `NXPINT_METADATA`), in OVS's order.
    pub(crate) fn put_fields(&self, out: &mut BytesMut) {
        let basic = OFPXMC_OPENFLOW_BASIC;
        put_exact(
            out,
            basic,
            OFPXMT_OFB_IN_PORT,
            4,
            self.in_port.map(u128::from),
        );
        put_exact(
            out,
            basic,
            OFPXMT_OFB_ETH_TYPE,
            2,
            self.eth_type.map(u128::from),
        );
        put_masked(out, basic, OFPXMT_OFB_IPV4_SRC, self.ipv4_src);
        put_masked(out, basic, OFPXMT_OFB_IPV4_DST, self.ipv4_dst);
        put_masked(out, basic, OFPXMT_OFB_IPV6_SRC, self.ipv6_src);
        put_masked(out, basic, OFPXMT_OFB_IPV6_DST, self.ipv6_dst);
        put_exact(
            out,
            basic,
            OFPXMT_OFB_IP_PROTO,
            1,
            self.ip_proto.map(u128::from),
        );
        put_exact(
            out,
            basic,
            OFPXMT_OFB_TCP_SRC,
            2,
            self.tcp_src.map(u128::from),
        );
        put_exact(
            out,
            basic,
            OFPXMT_OFB_TCP_DST,
            2,
            self.tcp_dst.map(u128::from),
        );
        put_exact(
            out,
            basic,
            OFPXMT_OFB_UDP_SRC,
            2,
            self.udp_src.map(u128::from),
        );
        put_exact(
            out,
            basic,
            OFPXMT_OFB_UDP_DST,
            2,
            self.udp_dst.map(u128::from),
        );
        put_exact(
            out,
            basic,
            OFPXMT_OFB_SCTP_DST,
            2,
            self.sctp_dst.map(u128::from),
        );
        for (xreg, pair) in (0u8..).zip(self.regs.chunks(2)) {
            let half = |r: Option<&Option<Masked<u32>>>| r.copied().flatten().map(Masked::bits);
            let (hi, lo) = (
                half(pair.first()).unwrap_or((0, 0)),
                half(pair.get(1)).unwrap_or((0, 0)),
            );
            put_field(
                out,
                OFPXMC_PACKET_REGS,
                xreg,
                8,
                (hi.0 << 32) | lo.0,
                (hi.1 << 32) | lo.1,
            );
        }
        put_masked(out, OFPXMC_NXM_1, NXM_NX_CT_STATE, self.ct_state);
        put_masked(out, basic, OFPXMT_OFB_METADATA, self.metadata);
        for tlv in &self.other {
            out.put_slice(tlv);
        }
    }

    /// Appends the match as an `ofp_match` of type OXM, padded to 8 bytes (flow mods, flow stats).
    pub(crate) fn put_ofp_match(&self, out: &mut BytesMut) -> Result<(), CodecError> {
        let start = out.len();
        out.put_u16(OFPMT_OXM);
        out.put_u16(0);
        self.put_fields(out);
        patch_len(out, start, 2, "match")?;
        pad_from(out, start);
        Ok(())
    }

    /// Reads bare OXM TLVs. Fields outside the subset, or of a width the subset does not expect, are
    /// kept in [`Match::other`]; only a TLV that runs past the end is an error.
    pub(crate) fn parse_fields(raw: &Bytes) -> Result<Self, CodecError> {
        let mut r = Reader::new("match", raw.clone());
        let mut m = Self::default();
        while !r.is_empty() {
            let header = u32::from(r.peek_u16(0)?) << 16 | u32::from(r.peek_u16(2)?);
            let len = (header & 0xff) as usize;
            let tlv = r.take(4 + len)?;
            let class = (header >> 16) as u16;
            let field = ((header >> 9) & 0x7f) as u8;
            let has_mask = header & 0x100 != 0;
            if class == OFPXMC_EXPERIMENTER || !m.set_known(class, field, has_mask, &tlv[4..]) {
                m.other.push(tlv);
            }
        }
        Ok(m)
    }

    /// Sets the field if it is one of the subset with the width the subset expects.
    fn set_known(&mut self, class: u16, field: u8, has_mask: bool, payload: &[u8]) -> bool {
        let width = if has_mask {
            payload.len() / 2
        } else {
            payload.len()
        };
        if has_mask && !payload.len().is_multiple_of(2) {
            return false;
        }
        let value = be_uint(&payload[..width]);
        let mask = if has_mask {
            be_uint(&payload[width..])
        } else {
            all_ones(width)
        };
        // The narrowing casts below keep exactly `width` bytes, as each arm's pattern checks.
        match (class, field, width, has_mask) {
            (OFPXMC_OPENFLOW_BASIC, OFPXMT_OFB_IN_PORT, 4, false) => {
                self.in_port = Some(value as u32);
            }
            (OFPXMC_OPENFLOW_BASIC, OFPXMT_OFB_ETH_TYPE, 2, false) => {
                self.eth_type = Some(value as u16);
            }
            (OFPXMC_OPENFLOW_BASIC, OFPXMT_OFB_IPV4_SRC, 4, _) => {
                self.ipv4_src = Some(Masked::from_wire(value, mask));
            }
            (OFPXMC_OPENFLOW_BASIC, OFPXMT_OFB_IPV4_DST, 4, _) => {
                self.ipv4_dst = Some(Masked::from_wire(value, mask));
            }
            (OFPXMC_OPENFLOW_BASIC, OFPXMT_OFB_IPV6_SRC, 16, _) => {
                self.ipv6_src = Some(Masked::from_wire(value, mask));
            }
            (OFPXMC_OPENFLOW_BASIC, OFPXMT_OFB_IPV6_DST, 16, _) => {
                self.ipv6_dst = Some(Masked::from_wire(value, mask));
            }
            (OFPXMC_OPENFLOW_BASIC, OFPXMT_OFB_IP_PROTO, 1, false) => {
                self.ip_proto = Some(value as u8);
            }
            (OFPXMC_OPENFLOW_BASIC, OFPXMT_OFB_TCP_SRC, 2, false) => {
                self.tcp_src = Some(value as u16);
            }
            (OFPXMC_OPENFLOW_BASIC, OFPXMT_OFB_TCP_DST, 2, false) => {
                self.tcp_dst = Some(value as u16);
            }
            (OFPXMC_OPENFLOW_BASIC, OFPXMT_OFB_UDP_SRC, 2, false) => {
                self.udp_src = Some(value as u16);
            }
            (OFPXMC_OPENFLOW_BASIC, OFPXMT_OFB_UDP_DST, 2, false) => {
                self.udp_dst = Some(value as u16);
            }
            (OFPXMC_OPENFLOW_BASIC, OFPXMT_OFB_SCTP_DST, 2, false) => {
                self.sctp_dst = Some(value as u16);
            }
            (OFPXMC_OPENFLOW_BASIC, OFPXMT_OFB_METADATA, 8, _) => {
                self.metadata = Some(Masked::from_wire(value, mask));
            }
            (OFPXMC_PACKET_REGS, xreg @ 0..=7, 8, _) => {
                let n = usize::from(xreg) * 2;
                for (i, shift) in [(n, 32), (n + 1, 0)] {
                    let half_mask = (mask >> shift) & 0xffff_ffff;
                    if half_mask != 0 {
                        self.regs[i] = Some(Masked::from_wire(value >> shift, half_mask));
                    }
                }
            }
            (OFPXMC_NXM_1, reg @ NXM_NX_REG0..=15, 4, _) => {
                self.regs[usize::from(reg)] = Some(Masked::from_wire(value, mask));
            }
            (OFPXMC_NXM_1, NXM_NX_CT_STATE, 4, _) => {
                self.ct_state = Some(Masked::from_wire(value, mask));
            }
            _ => return false,
        }
        true
    }
}

/// A match as OVS sent it, byte for byte (to copy into a resume or a flow verbatim), with its parsed
/// view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawMatch {
    /// Bare OXM TLVs, without the `ofp_match` header or padding.
    pub raw: Bytes,
    pub fields: Match,
}

impl RawMatch {
    pub(crate) fn parse(raw: Bytes) -> Result<Self, CodecError> {
        Ok(Self {
            fields: Match::parse_fields(&raw)?,
            raw,
        })
    }

    /// Takes an `ofp_match` of type OXM with its padding off the front of `r`.
    pub(crate) fn take_ofp_match(r: &mut Reader) -> Result<Self, CodecError> {
        let kind = r.peek_u16(0)?;
        let len = usize::from(r.peek_u16(2)?);
        if kind != OFPMT_OXM || len < 4 || crate::wire::padded(len) > r.remaining() {
            return Err(r.malformed());
        }
        let mut whole = r.take(crate::wire::padded(len))?;
        whole.truncate(len);
        Self::parse(whole.slice(4..))
    }

    /// Writes the received bytes back as an `ofp_match`.
    pub(crate) fn put_ofp_match(&self, out: &mut BytesMut) -> Result<(), CodecError> {
        let start = out.len();
        out.put_u16(OFPMT_OXM);
        out.put_u16(0);
        out.put_slice(&self.raw);
        patch_len(out, start, 2, "match")?;
        pad_from(out, start);
        Ok(())
    }
}

impl From<Match> for RawMatch {
    /// The bytes OVS would send for `fields`.
    fn from(fields: Match) -> Self {
        let mut raw = BytesMut::new();
        fields.put_fields(&mut raw);
        Self {
            fields: Match::parse_fields(&raw.clone().freeze()).unwrap_or(fields),
            raw: raw.freeze(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_pair_into_openflow_1_5_packet_registers() {
        let mut m = Match::default();
        m.regs[0] = Some(Masked {
            value: 0x80,
            mask: 0x80,
        });
        m.regs[15] = Some(Masked::exact(1));
        let mut out = BytesMut::new();
        m.put_fields(&mut out);
        assert_eq!(
            out.as_ref(),
            [
                0x80, 0x01, 0x01, 0x10, 0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x80, 0, 0, 0,
                0, //
                0x80, 0x01, 0x0f, 0x10, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff,
            ]
        );
        assert_eq!(Match::parse_fields(&out.freeze()).unwrap(), m);
    }

    #[test]
    fn unknown_and_odd_fields_are_kept_and_overruns_are_errors() {
        // NXM_NX_CT_ZONE (not in the subset), then ETH_TYPE with a 3-byte value.
        let raw = Bytes::from_static(&[0, 1, 0xd4, 2, 0, 5, 0x80, 0, 0x0a, 3, 1, 2, 3]);
        let m = Match::parse_fields(&raw).unwrap();
        assert_eq!(m.other.len(), 2);
        assert_eq!(m.eth_type, None);
        let cut = raw.slice(..raw.len() - 1);
        assert!(Match::parse_fields(&cut).is_err());
    }

    #[test]
    fn prefixes_mask_the_host_bits() {
        let p = Masked::<Ipv4Addr>::prefix(Ipv4Addr::new(10, 1, 2, 3), 8);
        assert_eq!(p.value, Ipv4Addr::new(10, 0, 0, 0));
        assert_eq!(p.mask, Ipv4Addr::new(255, 0, 0, 0));
        assert_eq!(
            Masked::<Ipv6Addr>::prefix(Ipv6Addr::LOCALHOST, 0).mask,
            Ipv6Addr::UNSPECIFIED
        );
    }
}

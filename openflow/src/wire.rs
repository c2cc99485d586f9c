//! Bounds-checked reading and length-patched writing of the big-endian structures every message is
//! built from, so that a short or lying peer yields [`CodecError::Malformed`], never a panic or a
//! read past the message, and so that no length field is computed by hand.

use crate::CodecError;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// OpenFlow pads matches, actions, instructions and properties to 64 bits.
pub(crate) const ALIGN: usize = 8;

pub(crate) fn padded(len: usize) -> usize {
    len.div_ceil(ALIGN) * ALIGN
}

/// Reads the fields of one structure off a shared buffer; sub-slices share it instead of copying.
#[derive(Debug)]
pub(crate) struct Reader {
    buf: Bytes,
    what: &'static str,
}

impl Reader {
    pub(crate) fn new(what: &'static str, buf: Bytes) -> Self {
        Self { buf, what }
    }

    pub(crate) fn malformed(&self) -> CodecError {
        CodecError::Malformed {
            what: self.what,
            len: self.buf.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// What is left, without consuming it.
    pub(crate) fn rest(&self) -> &Bytes {
        &self.buf
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, CodecError> {
        if n > self.buf.len() {
            return Err(self.malformed());
        }
        Ok(self.buf.split_to(n))
    }

    pub(crate) fn skip(&mut self, n: usize) -> Result<(), CodecError> {
        self.take(n).map(drop)
    }

    fn need(&self, n: usize) -> Result<(), CodecError> {
        if n > self.buf.len() {
            Err(self.malformed())
        } else {
            Ok(())
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, CodecError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    pub(crate) fn u16(&mut self) -> Result<u16, CodecError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Result<u32, CodecError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    pub(crate) fn u64(&mut self) -> Result<u64, CodecError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }

    pub(crate) fn peek_u16(&self, at: usize) -> Result<u16, CodecError> {
        match self.buf.get(at..at + 2) {
            Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
            None => Err(self.malformed()),
        }
    }
}

/// A `len`-byte big-endian unsigned value (at most 16 bytes) as a number.
pub(crate) fn be_uint(bytes: &[u8]) -> u128 {
    bytes
        .iter()
        .fold(0u128, |acc, &b| acc.wrapping_shl(8) | u128::from(b))
}

/// The low `width` bytes of `value`, big-endian.
pub(crate) fn put_be_uint(out: &mut BytesMut, value: u128, width: usize) {
    let bytes = value.to_be_bytes();
    out.put_slice(&bytes[bytes.len().saturating_sub(width)..]);
}

/// Writes the length of the structure that starts at `start` (and runs to the end of `out`) into
/// the 16-bit field at `start + at`.
pub(crate) fn patch_len(
    out: &mut BytesMut,
    start: usize,
    at: usize,
    what: &'static str,
) -> Result<(), CodecError> {
    let len = out.len() - start;
    let field = u16::try_from(len).map_err(|_| CodecError::Malformed { what, len })?;
    out[start + at..start + at + 2].copy_from_slice(&field.to_be_bytes());
    Ok(())
}

pub(crate) fn pad_from(out: &mut BytesMut, start: usize) {
    let len = out.len() - start;
    out.put_bytes(0, padded(len) - len);
}

/// OpenFlow's property TLV (`struct ofp_prop_header`): type, length without padding, padded to 8.
pub(crate) fn put_prop(
    out: &mut BytesMut,
    kind: u16,
    payload: &[u8],
    what: &'static str,
) -> Result<(), CodecError> {
    let start = out.len();
    out.put_u16(kind);
    out.put_u16(0);
    out.put_slice(payload);
    patch_len(out, start, 2, what)?;
    pad_from(out, start);
    Ok(())
}

/// Pulls one property: its type and its payload (without header or padding). OVS pads every
/// property it sends to 8 bytes and rejects one that is not, and so does this.
pub(crate) fn take_prop(r: &mut Reader) -> Result<(u16, Bytes), CodecError> {
    let kind = r.peek_u16(0)?;
    let len = usize::from(r.peek_u16(2)?);
    if len < 4 || padded(len) > r.remaining() {
        return Err(r.malformed());
    }
    let mut whole = r.take(padded(len))?;
    whole.truncate(len);
    Ok((kind, whole.slice(4..)))
}

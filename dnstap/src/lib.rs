//! The dnstap side of dnsflow, without I/O: the decoded DNS answer ([`event`]), Frame Streams
//! ([`framestream`]), dnstap messages ([`dnstap`]) and capture files ([`capture`]).
//!
//! tapd drives these over sockets; flowd reads captures and converts tapd's events with them. Each
//! layer is sans-IO: bytes in, typed values out, every buffer bounded.

pub mod capture;
pub mod dnstap;
mod error;
pub mod event;
pub mod framestream;
pub mod packet;

pub use capture::{CaptureReader, CaptureStats, CaptureWriter};
pub use error::{Error, Result};
pub use event::{Answer, DnsName, DnsResponse};

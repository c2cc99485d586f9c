//! tapd: reads dnstap from a DNS server over Frame Streams and streams decoded client responses over
//! gRPC (`dnsflow.v1.DnsTap/Subscribe`).
//!
//! The protocol layers are sans-IO ([`framestream`], [`dnstap`]); the daemon wires them to sockets.

pub mod capture;
pub mod dnstap;
mod error;
pub mod event;
pub mod framestream;

pub use capture::{CaptureReader, CaptureStats, CaptureWriter};
pub use error::{Error, Result};
pub use event::{Answer, DnsName, DnsResponse};

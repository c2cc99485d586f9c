//! tapd: reads dnstap from a DNS server over Frame Streams and streams decoded client responses over
//! gRPC (`dnsflow.v1.DnsTap/Subscribe`).
//!
//! The protocol layers are sans-IO ([`framestream`], [`dnstap`]); [`listener`] and [`grpc`] wire them
//! to sockets through the [`hub`]; [`daemon`] puts it all together. [`http::serve_http`] and
//! [`telemetry::init`] are shared with flowd.

pub mod capture;
pub mod config;
pub mod daemon;
pub mod dnstap;
mod error;
pub mod event;
pub mod framestream;
pub mod grpc;
pub mod http;
pub mod hub;
pub mod listener;
pub mod metrics;
pub mod telemetry;
#[cfg(feature = "test-support")]
#[doc(hidden)]
pub mod testsupport;

pub use capture::{CaptureReader, CaptureStats, CaptureWriter};
pub use error::{Error, Result};
pub use event::{Answer, DnsName, DnsResponse};

//! tapd: reads dnstap from a DNS server over Frame Streams and streams decoded client responses over
//! gRPC (`dnsflow.v1.DnsTap/Subscribe`).
//!
//! Decoding lives in `dnsflow-dnstap`; here [`listener`](daemon) wires it to the sockets, a hub fans the
//! events out to subscribers, and [`daemon`] puts it all together. The binary is `main.rs`; this small
//! library is what it and the benchmarks run.

mod capture;
pub mod config;
pub mod daemon;
mod error;
mod grpc;
mod hub;
mod listener;
mod metrics;
mod tls;

pub use config::Config;
pub use daemon::Daemon;
pub use error::{Error, Result};
/// How many client CIDRs one subscription may filter on.
pub use hub::MAX_FILTER_CIDRS;

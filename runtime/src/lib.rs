//! What both dnsflow daemons run on, and nothing about DNS or OVS: logging ([`telemetry`]), the
//! shutdown signal, the admin HTTP server with `/metrics`, `/healthz` and `/readyz` ([`http`]),
//! duration flags and the retry schedule ([`Backoff`]).

mod backoff;
mod duration;
pub mod http;
mod shutdown;
mod telemetry;

pub use backoff::Backoff;
pub use duration::parse_duration;
pub use shutdown::shutdown_signal;
pub use telemetry::{init as init_logging, LogFormat};

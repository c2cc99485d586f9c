//! What both dnsflow daemons run on, and nothing about DNS or OVS: logging ([`telemetry`]), the
//! shutdown signal, the admin HTTP server with `/metrics`, `/healthz` and `/readyz` ([`http`]),
//! duration and address flags, the retry schedule ([`Backoff`]), and what accept loops need
//! against a hostile network ([`AcceptBackoff`], [`PerAddress`]).

mod accept;
mod backoff;
mod flags;
pub mod http;
mod shutdown;
mod telemetry;

pub use accept::{AcceptBackoff, AddressSlot, PerAddress};
pub use backoff::Backoff;
pub use flags::{parse_duration, parse_listen};
pub use shutdown::shutdown_signal;
pub use telemetry::{init as init_logging, LogFormat};

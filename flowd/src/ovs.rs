//! The OVS side of flowd: typed flows and their `ovs-ofctl` text ([`flow`]), what a flow must look like
//! on this OVN, learned from OVN's own flows ([`template`]), pods' datapath keys ([`discovery`]), and
//! the [`FlowProgrammer`] trait with its
//! implementations: [`Ofctl`] (the real `ovs-ofctl`/`ovs-vsctl`), [`Native`] (batches over flowd's
//! own OpenFlow connection, the rest with `Ofctl`), [`DryRun`] (prints the exact
//! `ovs-ofctl` input) and, for tests only (feature `test-support`), `Recording` (an in-memory bridge).

pub mod discovery;
mod dryrun;
pub mod flow;
pub mod native;
mod ofctl;
#[cfg(any(test, feature = "test-support"))]
mod recording;
pub mod template;
pub mod unixctl;

pub use discovery::PortKeys;
pub use dryrun::DryRun;
pub use flow::{
    Actions, Cookie, FlowAction, FlowEvent, FlowMatch, FlowOp, FlowSpec, HoldSpec, ParsedFlow,
    RegMatch, RemovedReason,
};
pub use native::Native;
pub use ofctl::Ofctl;
#[cfg(test)]
pub(crate) use recording::as_event_flow;
#[cfg(any(test, feature = "test-support"))]
pub use recording::Recording;
pub use template::{LearnError, Template};

use std::{collections::HashMap, future::Future};
use tokio::sync::mpsc;

/// Errors talking to OVS.
#[derive(Debug, thiserror::Error)]
pub enum OvsError {
    // The cause is part of the message (and so not a `source`): printed once, also by `{:#}`.
    #[error("cannot run {program}: {error}")]
    Spawn {
        program: &'static str,
        error: std::io::Error,
    },
    #[error("{program} {args} failed ({status}): {stderr}")]
    Failed {
        program: &'static str,
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// OVS answered and refused the batch (a flow it rejects), over the native connection.
    #[error("{program}: {error}")]
    Refused {
        program: &'static str,
        error: String,
    },
    #[error("{program} printed more than {limit} bytes")]
    TooMuchOutput { program: &'static str, limit: usize },
    #[error("i/o with {program}: {error}")]
    Io {
        program: &'static str,
        error: std::io::Error,
    },
    #[error(
        "{program} {args} got no complete answer within {after:?} and was killed: is ovs-vswitchd \
         (ovsdb-server, for ovs-vsctl) hung or overloaded?"
    )]
    Timeout {
        program: &'static str,
        args: String,
        after: std::time::Duration,
    },
}

impl OvsError {
    /// OVS answered and said no (a flow it rejects): as opposed to an OVS that does not answer.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Failed { .. } | Self::Refused { .. })
    }
}

pub type Result<T, E = OvsError> = std::result::Result<T, E>;

/// Monitor events are buffered this deep; beyond it they are dropped and the periodic reconcile repairs
/// what they would have told (an ovn-controller wipe of 100,000 flows still fits).
pub const MONITOR_QUEUE: usize = 131_072;

/// Everything flowd does to OVS, narrow enough to fake.
pub trait FlowProgrammer: Send + Sync + 'static {
    /// Applies one batch atomically (one `ovs-ofctl --bundle` transaction).
    fn apply(&self, ops: &[FlowOp]) -> impl Future<Output = Result<()>> + Send;
    /// Every flow whose cookie carries `prefix` in its high 32 bits.
    fn dump(&self, prefix: u32) -> impl Future<Output = Result<Vec<ParsedFlow>>> + Send;
    /// Starts watching `table`; events arrive until the receiver closes (the monitor died).
    fn monitor(&self, table: u8) -> impl Future<Output = Result<mpsc::Receiver<FlowEvent>>> + Send;
    /// Learns what flowd's flows must look like from OVN's own flows (in `table`, when given); the
    /// inner error says what the bridge lacks.
    fn learn_template(
        &self,
        priority_base: u16,
        table: Option<u8>,
    ) -> impl Future<Output = Result<Result<Template, LearnError>>> + Send;
    /// The datapath keys of those `iface_ids` that have an OVS port with OVN's flows.
    fn port_keys(
        &self,
        iface_ids: &[String],
    ) -> impl Future<Output = Result<HashMap<String, PortKeys>>> + Send;
    /// Registers what this programmer counts (the engine registers it with its own metrics).
    fn register_metrics(&self, _registry: &mut crate::metrics::Registry) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_cause_is_printed_once_even_walking_the_chain() {
        for e in [
            OvsError::Spawn {
                program: "ovs-ofctl",
                error: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            },
            OvsError::Io {
                program: "ovs-vsctl",
                error: std::io::Error::other("no such file"),
            },
        ] {
            let text = format!("{:#}", anyhow::Error::new(e));
            assert_eq!(text.matches("no such file").count(), 1, "{text}");
        }
    }
}

//! Logging set-up, shared by tapd and flowd: `RUST_LOG` filters (default `info`), output to stderr as
//! text or as one JSON object per line for cluster log collectors.

use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global subscriber once; later calls (tests starting several daemons) are no-ops.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        builder.try_init()
    };
}

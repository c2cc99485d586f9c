//! tapd's entry point: parse, set up logging, run, map the outcome to an exit code.

use clap::Parser as _;
use dnsflow_runtime::shutdown_signal;
use std::process::ExitCode;
use tapd::{Config, Daemon, Error};

/// BSD sysexits EX_USAGE: the configuration is wrong; nothing was bound.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Err(e) = config.validate() {
        eprintln!("tapd: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    dnsflow_runtime::init_logging(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(error) => {
            tracing::error!(%error, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let outcome =
        runtime.block_on(async { Daemon::bind(config).await?.run(shutdown_signal()).await });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error @ Error::Config(_)) => {
            tracing::error!(%error, "bad configuration");
            ExitCode::from(EXIT_USAGE)
        }
        Err(error) => {
            tracing::error!(%error, "tapd failed");
            ExitCode::FAILURE
        }
    }
}

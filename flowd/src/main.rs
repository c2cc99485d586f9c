//! `flowd run` (the node daemon) and `flowd replay` (the same engine, alone, on recorded input).
//!
//! Errors print once, with their causes: flowd's error types put the cause in their message and do not
//! return it again from `source()`, so walking the chain (`{:#}`) only adds what a foreign error (or an
//! `anyhow` context) leaves to its sources.

use clap::Parser as _;
use flowd::config::{Cli, EXIT_CONFIG};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; anything else is a usage error.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Err(e) = cli.validate() {
        eprintln!("flowd: {:#}", anyhow::Error::new(e));
        return ExitCode::from(EXIT_CONFIG);
    }
    match flowd::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flowd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

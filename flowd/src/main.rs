//! `flowd run` (the node daemon) and `flowd replay` (the same engine, alone, on recorded input).

use clap::Parser;
use std::process::ExitCode;

/// Exit code for bad configuration (EX_USAGE), checked before any socket is bound.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = flowd::cli::Cli::parse();
    if let Err(e) = cli.validate() {
        eprintln!("flowd: {e:#}");
        return ExitCode::from(EXIT_CONFIG);
    }
    match flowd::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flowd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

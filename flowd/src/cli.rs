//! Command line: `flowd run` and `flowd replay`.
//!
//! Ownership: `Command::Replay` / `replay.rs` and the shared engine settings belong to the flowd-core
//! work; `Command::Run` / `daemon.rs` to the cluster work.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Exit code for bad configuration (EX_USAGE), in every subcommand: a flag clap refuses, or a value
/// [`Cli::validate`] refuses. Nothing has been bound, read or started then.
pub use crate::daemon::EXIT_CONFIG;

#[derive(Debug, Parser)]
#[command(
    name = "flowd",
    version,
    about = "DNS-aware per-pod egress flows for OVN-Kubernetes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replay a dnstap capture or a recorded event stream against a cluster snapshot, without a cluster.
    Replay(crate::replay::ReplayArgs),
    /// Run the node daemon.
    Run(crate::daemon::RunArgs),
}

/// Why a subcommand refuses its configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Run(#[from] crate::daemon::ConfigError),
    #[error(transparent)]
    Replay(#[from] crate::replay::ConfigError),
}

impl Cli {
    /// Checks what clap cannot, before anything is started.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.command {
            Command::Replay(args) => args.validate()?,
            Command::Run(args) => args.validate()?,
        }
        Ok(())
    }
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Replay(args) => crate::replay::main(args),
        Command::Run(args) => crate::daemon::main(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subcommand_validates_its_configuration() {
        for (args, refused) in [
            (&["flowd", "replay"][..], false),
            (&["flowd", "replay", "--cookie-prefix", "0"], true),
            (&["flowd", "replay", "--node", " "], true),
            (&["flowd", "replay", "--apply", ""], true),
            (&["flowd", "run", "--node-name", "n1"], false),
            (&["flowd", "run", "--node-name", " "], true),
            (
                &[
                    "flowd",
                    "run",
                    "--node-name",
                    "n1",
                    "--idle-floor",
                    "0s",
                    "--idle-grace",
                    "0s",
                ],
                true,
            ),
        ] {
            let cli = Cli::try_parse_from(args).expect("clap accepts it");
            assert_eq!(cli.validate().is_err(), refused, "{args:?}");
        }
    }
}

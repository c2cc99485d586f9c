//! Command line: `flowd run` and `flowd replay`.
//!
//! Ownership: `Command::Replay` / `replay.rs` and the shared engine settings belong to the flowd-core
//! work; `Command::Run` / `daemon.rs` to the cluster work.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

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

impl Cli {
    /// Checks what clap cannot, before anything is started.
    pub fn validate(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Replay(args) => crate::replay::main(args),
        Command::Run(args) => crate::daemon::main(args),
    }
}

//! flowd: turns pods' DNS answers into OVS flows that their namespace's EgressFirewall allows.

pub mod api;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod egressfirewall;
pub mod engine;
pub mod hold;
pub mod metrics;
pub mod model;
pub mod ovnkube;
pub mod ovs;
pub mod persist;
pub mod policy;
pub mod replay;
pub mod resolvers;
pub mod rules;
pub mod snapshot;
pub mod status;
pub mod tcpdns;
pub mod upstream;
pub mod watch;

/// Runs the subcommand `cli` names (its configuration validated by [`config::Cli::validate`]).
pub fn run(cli: config::Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        config::Command::Replay(args) => replay::main(*args),
        config::Command::Run(args) => daemon::main(*args),
    }
}

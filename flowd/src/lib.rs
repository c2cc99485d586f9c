//! flowd: turns pods' DNS answers into OVS flows that their namespace's EgressFirewall allows.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod daemon;
pub mod egressfirewall;
pub mod engine;
pub mod metrics;
pub mod model;
pub mod ovs;
pub mod policy;
pub mod replay;
pub mod rules;
pub mod settings;
pub mod snapshot;
pub mod status;
pub mod upstream;
pub mod watch;

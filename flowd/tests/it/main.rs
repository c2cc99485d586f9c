//! flowd integration tests: one binary, against a real OVS + OVN sandbox and a fake API server.

#![allow(clippy::unwrap_used)]
mod apiserver;
mod cluster;
mod delivery;
mod deploy;
mod metrics;
mod oracle;
mod ovn;
mod pipeline;
mod replay;
mod restart;
mod sandbox;
mod tcp;
mod tls;
mod trust;
mod workspace;

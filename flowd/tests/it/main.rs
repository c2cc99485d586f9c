//! flowd integration tests: one binary, against a real OVS + OVN sandbox and a fake API server.

#![allow(clippy::unwrap_used)]
mod deploy;
mod apiserver;
mod cluster;
mod replay;
mod ovn;
mod sandbox;
mod pipeline;

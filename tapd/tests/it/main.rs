//! tapd integration tests: one binary, against real DNS servers, fstrm tools and grpcurl.

#![allow(clippy::unwrap_used)]

mod bind;
mod common;
mod coredns;
mod fstrm;
mod grpcurl;
mod hostile;
mod lifecycle;
mod pipeline;
mod slow_subscriber;
mod subscribe;
mod tls;
mod unbound;

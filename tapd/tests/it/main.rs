//! tapd integration tests: one binary, against real DNS servers, fstrm tools and grpcurl.

#![allow(clippy::unwrap_used)]

mod common;
mod unbound;

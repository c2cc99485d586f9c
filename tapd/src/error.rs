//! The library's error type: what can go wrong at tapd's boundaries.

use crate::{dnstap::DecodeError, framestream::FrameError};
use std::io;

/// Everything tapd's public API can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Frame Streams layer refused the byte stream; the stream is over.
    #[error("frame stream: {0}")]
    Frame(#[from] FrameError),
    /// One dnstap frame did not decode into a client response; the stream goes on.
    #[error("dnstap: {0}")]
    Decode(#[from] DecodeError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// `Result` with tapd's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

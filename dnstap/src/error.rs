//! The crate's error type: what can go wrong reading dnstap.

use crate::{dnstap::DecodeError, framestream::FrameError};
use std::{fmt, io};

/// Everything reading dnstap can fail with.
///
/// The message carries the cause, and the whole chain of an I/O error's own causes; `source()` returns
/// none of them again, so that neither a `%error` log line nor a printer walking the chain (`{:#}`)
/// loses a cause or prints one twice.
#[derive(Debug)]
pub enum Error {
    /// The Frame Streams layer refused the byte stream; the stream is over.
    Frame(FrameError),
    /// One dnstap frame did not decode into a client response; the stream goes on.
    Decode(DecodeError),
    /// An I/O error, with what was being done.
    Io { context: String, source: io::Error },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Frame(e) => write!(f, "frame stream: {e}"),
            Self::Decode(e) => write!(f, "dnstap: {e}"),
            Self::Io { context, source } => {
                write!(f, "{context}: {source}")?;
                // An io::Error wrapping another error (`io::Error::other`) leaves that error's causes
                // to source().
                let mut cause = std::error::Error::source(source);
                while let Some(e) = cause {
                    write!(f, ": {e}")?;
                    cause = e.source();
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Error {}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Self {
        Self::Frame(e)
    }
}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Self {
        Self::Decode(e)
    }
}

impl Error {
    /// Wraps an I/O error with what was being done: `.map_err(Error::io("binding"))`.
    pub fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A foreign error that keeps its cause in `source()`, as tonic's and hyper's do.
    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn each_cause_is_printed_exactly_once_however_the_error_is_printed() {
        let foreign = Layer(
            "transport error",
            Some(Box::new(Layer("connection reset", None))),
        );
        let cases = [
            (
                Error::from(FrameError::DataBeforeStart),
                "frame stream: data frame before START",
                &["data frame before START"][..],
            ),
            (
                Error::from(DecodeError::NoQuestion),
                "dnstap: DNS response has no question",
                &["has no question"],
            ),
            (
                Error::io("binding gRPC 127.0.0.1:9530")(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "address in use",
                )),
                "binding gRPC 127.0.0.1:9530: address in use",
                &["address in use"],
            ),
            (
                Error::io("gRPC server")(io::Error::other(foreign)),
                "gRPC server: transport error: connection reset",
                &["transport error", "connection reset"],
            ),
        ];
        for (error, display, causes) in cases {
            assert_eq!(error.to_string(), display);
            let walked = format!("{:#}", anyhow::Error::new(error));
            assert_eq!(walked, display, "a chain walk adds nothing");
            for cause in causes {
                assert_eq!(walked.matches(cause).count(), 1, "{cause}: {walked}");
            }
        }
    }
}

//! tapd's error type: reading dnstap or I/O ([`dnsflow_dnstap::Error`]), or bad configuration.

/// Everything tapd can fail with. Each cause prints once (see [`dnsflow_dnstap::Error`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Dnstap(#[from] dnsflow_dnstap::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    /// Wraps an I/O error with what was being done: `.map_err(Error::io("binding"))`.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let wrap = dnsflow_dnstap::Error::io(context);
        move |source| Self::Dnstap(wrap(source))
    }
}

/// `Result` with tapd's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_cause_prints_once() {
        let e = Error::io("binding gRPC 127.0.0.1:9530")(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "address in use",
        ));
        let walked = format!("{:#}", anyhow::Error::new(e));
        assert_eq!(walked, "binding gRPC 127.0.0.1:9530: address in use");
    }
}

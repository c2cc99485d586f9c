//! Command line and environment (`TAPD_*`, as `deploy/` sets them), checked before anything is bound.

use crate::{
    error::{Error, Result},
    tls::TlsFiles,
};
use clap::Parser;
use dnsflow_dnstap::framestream::{DEFAULT_MAX_DATA_FRAME, MAX_CONTROL_FRAME};
use dnsflow_runtime::parse_duration;
pub use dnsflow_runtime::LogFormat;
use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// tapd's configuration.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "tapd",
    version,
    about = "Reads dnstap (Frame Streams) from CoreDNS and streams decoded client responses over gRPC"
)]
pub struct Config {
    /// Unix socket the DNS server connects to (stale socket removed at start, removed at exit).
    #[arg(
        long,
        env = "TAPD_SOCKET",
        default_value = "/var/run/dnstap/dnstap.sock"
    )]
    pub socket: PathBuf,

    /// Permissions of the socket, octal; CoreDNS runs as another uid (65532) and must be able to write.
    #[arg(long, env = "TAPD_SOCKET_MODE", default_value = "0666", value_parser = parse_mode)]
    pub socket_mode: u32,

    /// Also accept dnstap over TCP on this address.
    #[arg(long, env = "TAPD_DNSTAP_TCP")]
    pub dnstap_tcp: Option<SocketAddr>,

    /// gRPC address (dnsflow.v1.DnsTap, reflection, health) [default: 0.0.0.0:9530 with TLS,
    /// 127.0.0.1:9530 without]. Without TLS an address other than loopback needs --insecure-listen.
    #[arg(long, env = "TAPD_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// tapd's certificate chain (PEM). With --tls-key and --tls-client-ca, gRPC is served over mutual
    /// TLS only. The three files are read again when they change.
    #[arg(long, env = "TAPD_TLS_CERT", requires_all = ["tls_key", "tls_client_ca"])]
    pub tls_cert: Option<PathBuf>,

    /// tapd's private key (PEM).
    #[arg(long, env = "TAPD_TLS_KEY", requires_all = ["tls_cert", "tls_client_ca"])]
    pub tls_key: Option<PathBuf>,

    /// The CA (PEM) that issues subscribers' certificates.
    #[arg(long, env = "TAPD_TLS_CLIENT_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_client_ca: Option<PathBuf>,

    /// Identities allowed to subscribe: a client certificate must name one of them (a DNS name in
    /// its subject alternative names).
    #[arg(
        long = "tls-client-name",
        env = "TAPD_TLS_CLIENT_NAMES",
        value_delimiter = ',',
        default_value = "flowd.dnsflow,operator.dnsflow"
    )]
    pub tls_client_names: Vec<String>,

    /// How often the TLS files are checked for a change.
    #[arg(long, env = "TAPD_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,

    /// Serve gRPC without TLS on an address other than loopback: anyone who reaches the port reads
    /// every pod's DNS answers. For a lab only.
    #[arg(long, env = "TAPD_INSECURE_LISTEN")]
    pub insecure_listen: bool,

    /// HTTP address for /metrics, /healthz and /readyz.
    #[arg(long, env = "TAPD_METRICS_LISTEN", default_value = "0.0.0.0:9531")]
    pub metrics_listen: SocketAddr,

    /// Largest data frame accepted, in bytes; a larger one ends its connection.
    #[arg(long, env = "TAPD_MAX_FRAME_BYTES", default_value_t = DEFAULT_MAX_DATA_FRAME)]
    pub max_frame_bytes: usize,

    /// Most simultaneous dnstap connections, on the socket and --dnstap-tcp together (each CoreDNS
    /// `dnstap` directive and reload opens one).
    #[arg(long, env = "TAPD_MAX_CONNECTIONS", default_value_t = 256)]
    pub max_connections: usize,

    /// Events buffered per subscriber; beyond that a slow subscriber loses events (counted).
    #[arg(long, env = "TAPD_SUBSCRIBER_BUFFER", default_value_t = 8192)]
    pub subscriber_buffer: usize,

    /// Most gRPC subscribers at once (flowd needs one per node).
    #[arg(long, env = "TAPD_MAX_SUBSCRIBERS", default_value_t = 256)]
    pub max_subscribers: usize,

    /// Most gRPC subscribers of one peer (its certificate's identity and its address) at once: one
    /// flowd needs one, two while it reconnects.
    #[arg(long, env = "TAPD_MAX_SUBSCRIBERS_PER_PEER", default_value_t = 4)]
    pub max_subscribers_per_peer: usize,

    /// Most recent answers kept for replay to (re)connecting subscribers; 0 disables the replay.
    #[arg(long, env = "TAPD_RECENT_ENTRIES", default_value_t = 20_000)]
    pub recent_entries: usize,

    /// Most memory the kept answers take, in bytes: an answer of many addresses counts for more, so
    /// a zone that answers with hundreds of records cannot push tapd past its memory limit.
    #[arg(long, env = "TAPD_RECENT_MAX_BYTES", default_value_t = 32 << 20)]
    pub recent_max_bytes: usize,

    /// Longest time an answer is kept for replay, whatever its TTL (e.g. 30s, 15m, 1h).
    #[arg(long, env = "TAPD_RECENT_MAX_TTL", default_value = "1h", value_parser = parse_duration)]
    pub recent_max_ttl: Duration,

    /// Server identity for events whose sender sent none (CoreDNS sends its hostname).
    #[arg(long, env = "TAPD_IDENTITY", default_value = "tapd")]
    pub identity: String,

    /// Also write every received frame to this Frame Streams file (readable by fstrm_dump, fstrm_replay
    /// and `flowd replay`).
    #[arg(long, env = "TAPD_CAPTURE")]
    pub capture: Option<PathBuf>,

    /// Size at which the capture file is moved to `<capture>.1` and a new one started.
    #[arg(long, env = "TAPD_CAPTURE_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub capture_max_bytes: u64,

    /// How long shutdown waits for connections and subscribers to finish.
    #[arg(long, env = "TAPD_DRAIN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Log format (RUST_LOG sets the filter).
    #[arg(long, env = "TAPD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// A capture file smaller than this would rotate on nearly every frame.
const MIN_CAPTURE_BYTES: u64 = 64 * 1024;

impl Config {
    /// Checks what clap cannot: relations between values and sane ranges.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.max_frame_bytes < MAX_CONTROL_FRAME {
            return bad(format!(
                "--max-frame-bytes {} is below {MAX_CONTROL_FRAME}",
                self.max_frame_bytes
            ));
        }
        if self.max_connections == 0 {
            return bad("--max-connections must be at least 1".into());
        }
        if self.max_subscribers == 0 {
            return bad("--max-subscribers must be at least 1".into());
        }
        if self.max_subscribers_per_peer == 0 {
            return bad("--max-subscribers-per-peer must be at least 1".into());
        }
        if self.subscriber_buffer == 0 {
            return bad("--subscriber-buffer must be at least 1".into());
        }
        if self.capture.is_some() && self.capture_max_bytes < MIN_CAPTURE_BYTES {
            return bad(format!(
                "--capture-max-bytes must be at least {MIN_CAPTURE_BYTES}"
            ));
        }
        if self.socket.as_os_str().is_empty() {
            return bad("--socket is empty".into());
        }
        if self.tls_cert.is_some() && self.tls_client_names.iter().all(|n| n.trim().is_empty()) {
            return bad(
                "--tls-client-name: at least one identity must be allowed to subscribe".into(),
            );
        }
        let listen = self.listen_addr();
        if self.tls_files().is_none() && !listen.ip().is_loopback() && !self.insecure_listen {
            return bad(format!(
                "--listen {listen} would serve every pod's DNS answers without TLS to anyone who \
                 reaches it: give --tls-cert, --tls-key and --tls-client-ca (or, in a lab, \
                 --insecure-listen)"
            ));
        }
        Ok(())
    }

    /// Where gRPC listens: as given, else on all addresses with TLS and on loopback without.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen.unwrap_or_else(|| {
            let ip = if self.tls_files().is_some() {
                std::net::Ipv4Addr::UNSPECIFIED
            } else {
                std::net::Ipv4Addr::LOCALHOST
            };
            SocketAddr::from((ip, DEFAULT_GRPC_PORT))
        })
    }

    /// The TLS material, when gRPC is to be served over mutual TLS.
    pub(crate) fn tls_files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone()?,
        })
    }
}

/// tapd's gRPC port.
pub const DEFAULT_GRPC_PORT: u16 = 9530;

fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{s:?} is not an octal mode like 0666")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("tapd").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_the_deployment() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.socket, PathBuf::from("/var/run/dnstap/dnstap.sock"));
        assert_eq!(c.socket_mode, 0o666);
        assert_eq!(c.listen_addr(), "127.0.0.1:9530".parse().unwrap());
        assert_eq!(c.metrics_listen, "0.0.0.0:9531".parse().unwrap());
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.recent_max_ttl, Duration::from_secs(3600));
        assert!(c.capture.is_none() && c.dnstap_tcp.is_none());
        c.validate().unwrap();
    }

    #[test]
    fn flags_parse_typed_values() {
        let c = parse(&[
            "--socket",
            "/tmp/x.sock",
            "--socket-mode",
            "0660",
            "--dnstap-tcp",
            "127.0.0.1:6000",
            "--listen",
            "127.0.0.1:1",
            "--recent-max-ttl",
            "90s",
            "--drain-timeout",
            "250ms",
            "--log-format",
            "json",
            "--capture",
            "/tmp/cap.fstrm",
        ])
        .unwrap();
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!(c.dnstap_tcp, Some("127.0.0.1:6000".parse().unwrap()));
        assert_eq!(c.recent_max_ttl, Duration::from_secs(90));
        assert_eq!(c.drain_timeout, Duration::from_millis(250));
        assert_eq!(c.log_format, LogFormat::Json);
        c.validate().unwrap();
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            &["--socket-mode", "999"][..],
            &["--socket-mode", "01000"],
            &["--listen", "nowhere"],
            &["--recent-max-ttl", "5 fortnights"],
            &["--log-format", "xml"],
            &["--max-frame-bytes", "-1"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
        for args in [
            &["--max-frame-bytes", "100"][..],
            &["--max-connections", "0"],
            &["--capture", "/tmp/c", "--capture-max-bytes", "10"],
        ] {
            assert!(
                matches!(parse(args).unwrap().validate(), Err(Error::Config(_))),
                "{args:?}"
            );
        }
    }
}

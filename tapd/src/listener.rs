//! The dnstap side: the unix socket CoreDNS connects to (and optionally TCP), one task and one span per
//! connection. Bytes go through the Frame Streams [`Decoder`], frames through the dnstap decoder, events
//! into the [`Hub`]. A bad connection ends only itself; nothing here ever waits for a subscriber.

use crate::{
    capture::CaptureFile,
    error::{Error, Result},
    hub::Hub,
    metrics::{DropReason, Metrics},
};
use bytes::Bytes;
use dnsflow_dnstap::{
    dnstap::{self, Decoded},
    framestream::{Decoder, Output},
};
use dnsflow_runtime::AcceptBackoff;
use std::{
    fs, io,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, UnixListener},
    sync::{watch, Semaphore},
    task::JoinSet,
};
use tracing::Instrument as _;

/// Bytes read per syscall; a CoreDNS flush is 4 KiB, so this holds several.
const READ_CHUNK: usize = 32 * 1024;
/// A peer that has not finished the handshake by then holds a connection slot for nothing.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// ACCEPT and FINISH are tiny; a peer that does not take them in this time is gone or hostile.
const WRITE_TIMEOUT: Duration = Duration::from_secs(4);

/// Everything a connection needs to turn frames into published events.
#[derive(Debug)]
pub struct Ingest {
    hub: Hub,
    metrics: Arc<Metrics>,
    capture: Option<CaptureFile>,
    identity: String,
    max_frame: usize,
}

impl Ingest {
    /// `identity` names the server in events whose sender sent none; `max_frame` caps data frames.
    pub fn new(
        hub: Hub,
        metrics: Arc<Metrics>,
        capture: Option<CaptureFile>,
        identity: String,
        max_frame: usize,
    ) -> Self {
        Self {
            hub,
            metrics,
            capture,
            identity,
            max_frame,
        }
    }

    /// A fresh Frame Streams decoder for one connection.
    pub fn decoder(&self) -> Decoder {
        Decoder::new(dnsflow_proto::DNSTAP_CONTENT_TYPE, self.max_frame)
    }

    /// Handles one data frame received at `received`/`now` (read once per socket read, not per
    /// frame): capture, decode, publish, count. Returns the decode error, if any, for logging.
    pub fn on_frame(
        &self,
        frame: Bytes,
        received: SystemTime,
        now: Instant,
    ) -> Option<dnstap::DecodeError> {
        self.metrics.frame(frame.len());
        if let Some(capture) = &self.capture {
            if !capture.offer(frame.clone()) {
                self.metrics.dropped(DropReason::CaptureFull);
            }
        }
        match dnstap::decode(&frame, &self.identity, received) {
            Ok(Decoded::Response {
                response: r,
                addresses_cut,
            }) => {
                self.metrics.event();
                if addresses_cut > 0 {
                    self.metrics.addresses_cut(addresses_cut);
                }
                self.hub.publish(r, now);
                None
            }
            Ok(Decoded::Ignored) => {
                self.metrics.ignored();
                None
            }
            Err(e) => {
                self.metrics.decode_error(&e);
                Some(e)
            }
        }
    }

    /// Closes the capture file (after everything queued is written).
    pub fn close_capture(&mut self) {
        if let Some(c) = self.capture.take() {
            c.close();
        }
    }

    /// Reads one connection until EOF, STOP, an error, or `stop`. Never panics on input.
    pub async fn serve_connection<S>(&self, mut stream: S, mut stop: watch::Receiver<bool>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut decoder = self.decoder();
        let opened = Instant::now();
        let mut decode_errors = 0u64;
        loop {
            let handshake_left = HANDSHAKE_TIMEOUT.saturating_sub(opened.elapsed());
            let started = decoder.is_started();
            let buf = decoder.buffer_mut();
            buf.reserve(READ_CHUNK);
            let read = tokio::select! {
                r = stream.read_buf(buf) => r,
                _ = stop.wait_for(|s| *s) => {
                    tracing::debug!("stopping");
                    return;
                }
                () = tokio::time::sleep(handshake_left), if !started => {
                    self.metrics.frame_error();
                    tracing::warn!("no START within {HANDSHAKE_TIMEOUT:?}; closing");
                    return;
                }
            };
            match read {
                Ok(0) => {
                    if let Err(error) = decoder.finish_input() {
                        self.metrics.frame_error();
                        tracing::warn!(%error, "connection ended mid-frame");
                    } else {
                        tracing::debug!("sender closed the connection");
                    }
                    return;
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "read failed");
                    return;
                }
            }
            let (received, now) = (SystemTime::now(), Instant::now());
            loop {
                match decoder.poll() {
                    Ok(None) => break,
                    Ok(Some(Output::Data(frame))) => {
                        if let Some(error) = self.on_frame(frame, received, now) {
                            decode_errors += 1;
                            if decode_errors == 1 {
                                tracing::warn!(%error, "undecodable dnstap frame (further ones at debug level)");
                            } else {
                                tracing::debug!(%error, "undecodable dnstap frame");
                            }
                        }
                    }
                    Ok(Some(Output::Reply(reply))) => {
                        let written = tokio::time::timeout(WRITE_TIMEOUT, async {
                            stream.write_all(&reply).await?;
                            stream.flush().await
                        })
                        .await;
                        if !matches!(written, Ok(Ok(()))) {
                            tracing::warn!("could not answer the sender; closing");
                            return;
                        }
                    }
                    Ok(Some(Output::Finished)) => {
                        tracing::debug!("sender stopped");
                        return;
                    }
                    Err(error) => {
                        self.metrics.frame_error();
                        tracing::warn!(%error, "refused frame stream; closing this connection");
                        return;
                    }
                }
            }
            if decoder.is_done() {
                // FINISH sent: nothing more is expected from this sender.
                return;
            }
        }
    }
}

/// A bound dnstap listener. The unix socket file is removed when this is dropped.
#[derive(Debug)]
pub enum DnstapListener {
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    Tcp(TcpListener),
}

impl DnstapListener {
    /// Binds the unix socket at `path` with permissions `mode` (CoreDNS runs as another uid). A stale
    /// socket left by a previous run is removed; any other file there is an error.
    pub fn bind_unix(path: &Path, mode: u32) -> Result<Self> {
        let ctx = |what: &str| format!("{what} {}", path.display());
        match fs::symlink_metadata(path) {
            // A socket someone still accepts on is another tapd's (or a resolver's): replacing it
            // would leave that one serving nothing while it looks alive.
            Ok(meta)
                if meta.file_type().is_socket()
                    && std::os::unix::net::UnixStream::connect(path).is_ok() =>
            {
                return Err(Error::io(ctx("refusing to replace the live socket"))(
                    io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another process accepts connections on it",
                    ),
                ));
            }
            Ok(meta) if meta.file_type().is_socket() => {
                fs::remove_file(path).map_err(Error::io(ctx("removing stale socket")))?;
                tracing::info!(path = %path.display(), "removed stale socket");
            }
            Ok(_) => {
                return Err(Error::io(ctx("refusing to replace"))(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "not a socket",
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(ctx("inspecting"))(e)),
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(Error::io(ctx("creating the directory of")))?;
        }
        let listener = UnixListener::bind(path).map_err(Error::io(ctx("binding")))?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(Error::io(ctx("setting permissions of")))?;
        Ok(Self::Unix {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub async fn bind_tcp(addr: std::net::SocketAddr) -> Result<Self> {
        TcpListener::bind(addr)
            .await
            .map(Self::Tcp)
            .map_err(Error::io(format!("binding dnstap TCP {addr}")))
    }

    /// Where senders connect, for logs.
    pub fn describe(&self) -> String {
        match self {
            Self::Unix { path, .. } => format!("unix:{}", path.display()),
            Self::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp".into(), |a| format!("tcp:{a}")),
        }
    }

    /// Accepts connections until `stop`, serving each in its own task; then stops accepting (removing
    /// the socket file) and gives open connections up to `drain` to finish what they have read.
    pub async fn run(
        self,
        ingest: Arc<Ingest>,
        slots: Arc<Semaphore>,
        mut stop: watch::Receiver<bool>,
        drain: Duration,
    ) {
        static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);
        let mut backoff = AcceptBackoff::default();
        let mut connections = JoinSet::new();
        let listening = self.describe();
        tracing::info!(listen = %listening, "accepting dnstap connections");
        loop {
            let accepted = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                Some(_) = connections.join_next() => continue,
                a = self.accept() => a,
            };
            let (conn, peer) = match accepted {
                Ok(c) => {
                    backoff.accepted();
                    c
                }
                Err(error) => {
                    backoff.failed(&error, &listening).await;
                    continue;
                }
            };
            // One budget for every listener (unix socket and TCP alike).
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                ingest.metrics.dropped(DropReason::ConnectionLimit);
                tracing::warn!(%peer, "too many dnstap connections (--max-connections); refusing one");
                continue;
            };
            let id = CONNECTION_IDS.fetch_add(1, Ordering::Relaxed);
            let span = tracing::info_span!("dnstap", conn = id, %peer);
            let ingest = Arc::clone(&ingest);
            let stop = stop.clone();
            connections.spawn(
                async move {
                    tracing::info!("connected");
                    ingest.metrics.connection_opened();
                    match conn {
                        Conn::Unix(s) => ingest.serve_connection(s, stop).await,
                        Conn::Tcp(s) => ingest.serve_connection(s, stop).await,
                    }
                    ingest.metrics.connection_closed();
                    tracing::info!("disconnected");
                    drop(permit);
                }
                .instrument(span),
            );
        }
        drop(self);
        let drained = tokio::time::timeout(drain, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(listen = %listening, "connections did not finish in time; aborting them");
            connections.shutdown().await;
        }
    }

    async fn accept(&self) -> io::Result<(Conn, String)> {
        match self {
            Self::Unix { listener, path } => {
                let (s, _) = listener.accept().await?;
                let peer = s
                    .peer_cred()
                    .ok()
                    .and_then(|c| c.pid())
                    .map_or_else(|| path.display().to_string(), |pid| format!("pid {pid}"));
                Ok((Conn::Unix(s), peer))
            }
            Self::Tcp(listener) => {
                let (s, addr) = listener.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Conn::Tcp(s), addr.to_string()))
            }
        }
    }
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl Drop for DnstapListener {
    fn drop(&mut self) {
        if let Self::Unix { path, .. } = self {
            match fs::remove_file(&*path) {
                Ok(()) => tracing::info!(path = %path.display(), "removed socket"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(%error, path = %path.display(), "could not remove socket")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{ClientFilter, HubConfig};
    use dnsflow_dnstap::framestream::{encode_control, encode_data, Control};
    use futures::StreamExt;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn unix_socket_lifecycle_and_a_bidirectional_session() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dnstap.sock");
        // A stale socket from a previous run is replaced.
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let listener = DnstapListener::bind_unix(&path, 0o666).unwrap();
        // A live one is not: a second tapd on the same path refuses to start, the first keeps it.
        let second = DnstapListener::bind_unix(&path, 0o666).unwrap_err();
        assert!(second.to_string().contains("live socket"), "{second}");
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o666
        );
        let metrics = Arc::new(Metrics::default());
        let hub = Hub::new(
            HubConfig {
                subscriber_buffer: 16,
                recent_entries: 16,
                recent_max_bytes: 1 << 20,
                recent_max_ttl: Duration::from_secs(60),
                max_subscribers: 4,
                max_subscribers_per_peer: 4,
            },
            Arc::clone(&metrics),
        );
        let mut sub = hub
            .subscribe(ClientFilter::default(), false, "t".into(), Instant::now())
            .unwrap();
        let ingest = Arc::new(Ingest::new(hub, metrics, None, "tapd".into(), 4096));
        let (stop_tx, stop) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(4));
        let task = tokio::spawn(listener.run(ingest, slots, stop, Duration::from_secs(1)));

        let ct = dnsflow_proto::DNSTAP_CONTENT_TYPE.as_bytes();
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(&encode_control(Control::Ready, Some(ct)))
            .await
            .unwrap();
        let mut accept = vec![0u8; encode_control(Control::Accept, Some(ct)).len()];
        s.read_exact(&mut accept).await.unwrap();
        assert_eq!(accept, encode_control(Control::Accept, Some(ct)));
        let mut out = bytes::BytesMut::new();
        out.extend_from_slice(&encode_control(Control::Start, Some(ct)));
        let mut dns = vec![0, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
        dns.extend([1, b'a', 0, 0, 1, 0, 1]);
        encode_data(
            &dnstap::client_response_frame(None, &[10, 1, 2, 3], &dns, SystemTime::now()),
            &mut out,
        );
        out.extend_from_slice(&encode_control(Control::Stop, None));
        s.write_all(&out).await.unwrap();
        let mut finish = vec![0u8; 12];
        s.read_exact(&mut finish).await.unwrap();
        assert_eq!(finish, encode_control(Control::Finish, None));
        let event = sub.next().await.unwrap();
        assert_eq!(event.client.to_string(), "10.1.2.3");
        assert_eq!(event.server_identity, "tapd");

        stop_tx.send(true).unwrap();
        task.await.unwrap();
        assert!(!path.exists(), "socket removed at exit");
    }

    #[test]
    fn a_regular_file_in_the_way_is_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("precious");
        fs::write(&path, b"data").unwrap();
        assert!(DnstapListener::bind_unix(&path, 0o600).is_err());
        assert_eq!(fs::read(&path).unwrap(), b"data");
    }
}

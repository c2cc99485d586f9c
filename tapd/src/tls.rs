//! Mutual TLS on tapd's gRPC port. A subscriber must present a certificate from the client CA tapd is
//! given (`--tls-client-ca`), and that certificate must name one of the identities allowed to subscribe
//! (`--tls-client-name`, DNS names such as `flowd.dnsflow`); tapd presents its own (`--tls-cert`,
//! `--tls-key`). The files are read again when they change (a Secret rotated by cert-manager or by
//! hand): new connections get the new material, established ones keep theirs.
//!
//! Handshakes run beside the accept loop, bounded in number and time, and per address: a peer that
//! opens connections and says nothing holds at most [`MAX_HANDSHAKES_PER_PEER`] handshake slots, each
//! for at most [`HANDSHAKE_TIMEOUT`], so it cannot keep flowd from connecting.

use dnsflow_runtime::{AcceptBackoff, PerAddress};
use rustls::{
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use std::{
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, Semaphore},
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tokio_stream::wrappers::ReceiverStream;

/// A handshake not done by then is a peer that is not speaking TLS to us (a real one takes
/// milliseconds).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress at once; more connections wait in the kernel's accept queue.
const MAX_HANDSHAKES: usize = 256;
/// Handshakes in progress from one address; its further connections are closed at once.
pub const MAX_HANDSHAKES_PER_PEER: usize = 4;

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {error}")]
    Read { path: PathBuf, error: String },
    #[error("{path}: no {what} in it")]
    Empty { path: PathBuf, what: &'static str },
    #[error("TLS set-up: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA {path}: {error}")]
    ClientCa { path: PathBuf, error: String },
    #[error("--tls-client-name {name:?}: {error}")]
    ClientName { name: String, error: String },
}

/// Where tapd's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// tapd's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA that issues subscribers' certificates (PEM, one or more certificates).
    pub client_ca: PathBuf,
}

impl TlsFiles {
    fn paths(&self) -> [&Path; 3] {
        [&self.cert, &self.key, &self.client_ca]
    }
}

/// What a file looked like when it was read: enough to notice a Secret update (which replaces the
/// files behind a symlink) or an edit in place.
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(files: &TlsFiles) -> Stamp {
    files
        .paths()
        .iter()
        .map(|p| {
            let m = fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        error: e.to_string(),
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Read {
            path: path.to_path_buf(),
            error: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_path_buf(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        error: e.to_string(),
    })
}

/// The server configuration the files describe: tapd's identity, client certificates required and
/// verified against the client CA, HTTP/2 negotiated by ALPN (gRPC clients require it).
fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in certificates(&files.client_ca)? {
        roots.add(ca).map_err(|e| TlsError::ClientCa {
            path: files.client_ca.clone(),
            error: e.to_string(),
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::ClientCa {
            path: files.client_ca.clone(),
            error: e.to_string(),
        })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates(&files.cert)?, private_key(&files.key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// tapd's TLS material, read again when the files change.
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    client_names: Vec<ServerName<'static>>,
    current: RwLock<Arc<ServerConfig>>,
    stamp: Mutex<Stamp>,
}

impl ServerTls {
    /// Reads the files; fails when they do not make a working configuration, or when a client name is
    /// not a DNS name.
    pub fn load(files: TlsFiles, client_names: &[String]) -> Result<Self, TlsError> {
        let client_names = client_names
            .iter()
            .map(|n| {
                ServerName::try_from(n.clone()).map_err(|e| TlsError::ClientName {
                    name: n.clone(),
                    error: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        let before = stamp(&files);
        let config = server_config(&files)?;
        Ok(Self {
            current: RwLock::new(Arc::new(config)),
            stamp: Mutex::new(before),
            files,
            client_names,
        })
    }

    /// Reads the files again if they changed since they were last read. `Ok(true)`: new connections
    /// use the new material. On an error the previous material stays in use.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamp(&self.files);
        let mut seen = self.stamp.lock().unwrap_or_else(PoisonError::into_inner);
        if *seen == now {
            return Ok(false);
        }
        // Remember the attempt even when it fails: a half-written Secret is retried when it changes
        // again, not logged every few seconds.
        *seen = now;
        let config = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
        Ok(true)
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }

    /// The allowed identity that the verified client certificate `end_entity` names, if any.
    fn identity(&self, end_entity: Option<&CertificateDer<'_>>) -> Option<Arc<str>> {
        let cert = webpki::EndEntityCert::try_from(end_entity?).ok()?;
        self.client_names
            .iter()
            .find(|name| cert.verify_is_valid_for_subject_name(name).is_ok())
            .map(|name| Arc::from(name.to_str().as_ref()))
    }

    /// The identities allowed to subscribe, for error messages.
    pub fn client_names(&self) -> String {
        self.client_names
            .iter()
            .map(|n| n.to_str().into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Who is at the other end of a TLS connection: its address, and the allowed identity its
/// certificate names (`None`: a certificate from the right CA that names none of them).
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub identity: Option<Arc<str>>,
}

/// A TLS connection whose handshake is done, and who it is with.
#[derive(Debug)]
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: Peer,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts on `listener` and hands on each connection whose TLS handshake completed. A failed
/// handshake (no certificate, another CA, not TLS at all, too slow) is counted by `on_refused` and
/// ends only that connection. Ends when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    on_refused: impl Fn(&SocketAddr, &io::Error) + Send + Sync + 'static,
) -> ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(MAX_HANDSHAKES);
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let in_flight = PerAddress::new(MAX_HANDSHAKES_PER_PEER);
    let on_refused = Arc::new(on_refused);
    tokio::spawn(async move {
        let mut backoff = AcceptBackoff::default();
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, addr) = match accepted {
                Ok(a) => {
                    backoff.accepted();
                    a
                }
                Err(error) => {
                    backoff.failed(&error, "gRPC").await;
                    continue;
                }
            };
            let Some(peer_slot) = in_flight.try_take(addr.ip()) else {
                on_refused(
                    &addr,
                    &io::Error::other("too many handshakes in progress from this address"),
                );
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tls.acceptor();
            let (tls, tx, on_refused) = (Arc::clone(&tls), tx.clone(), Arc::clone(&on_refused));
            tokio::spawn(async move {
                let _slots = (slot, peer_slot);
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                    .unwrap_or_else(|_| {
                        Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no TLS handshake in time",
                        ))
                    });
                match handshake {
                    Ok(stream) => {
                        let identity = tls.identity(
                            stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(<[_]>::first),
                        );
                        let _ = tx
                            .send(Ok(TlsConn {
                                stream,
                                peer: Peer { addr, identity },
                            }))
                            .await;
                    }
                    Err(error) => {
                        tracing::debug!(%addr, %error, "TLS handshake failed");
                        on_refused(&addr, &error);
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

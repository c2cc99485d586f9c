//! What the dnsflow crates' tests share (never part of a release build): daemons as child processes
//! in their own temp dirs, stopped by their pid when dropped so tests can run side by side; Unbound
//! sending dnstap to a socket and `dig` from a chosen client IP; the tapd binary of this workspace; and
//! the invariants the property tests and the fuzz target check on the dnstap pipeline.

#![allow(clippy::unwrap_used, missing_docs)]

use anyhow::{bail, Context as _};
use std::{
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};
use tempfile::TempDir;

/// Daemons here start in well under a second; a slower start means something is wrong.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

/// Fails with a clear message when a tool the tests drive is not installed (`scripts/test` installs
/// them all).
pub fn require_tool(name: &str) -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        bail!("`{name}` is not installed; run scripts/test, which installs every tool the tests drive")
    }
}

/// Ports handed to test daemons come from below the kernel's ephemeral range (`ip_local_port_range`,
/// 32768 and up by default): a port from `bind(0)` is released before the daemon binds it, and in
/// between any outgoing connection of a parallel test may take it as its source port.
const TEST_PORTS: std::ops::Range<u32> = 20_000..32_768;

/// A loopback port free for both UDP and TCP right now (DNS servers bind both). Within one process
/// no port is handed out twice in a row: a counter walks [`TEST_PORTS`] from a random start, so
/// parallel tests of one binary never race for the same port and two binaries rarely meet.
pub fn free_port() -> u16 {
    use std::{
        hash::{BuildHasher as _, RandomState},
        sync::{
            atomic::{AtomicU32, Ordering},
            OnceLock,
        },
    };
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let span = TEST_PORTS.end - TEST_PORTS.start;
    let next = NEXT.get_or_init(|| {
        let seed = RandomState::new().hash_one(std::process::id());
        AtomicU32::new(u32::try_from(seed % u64::from(span)).unwrap())
    });
    loop {
        let offset = next.fetch_add(1, Ordering::Relaxed) % span;
        let port = u16::try_from(TEST_PORTS.start + offset).unwrap();
        if UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
            && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
        {
            return port;
        }
    }
}

/// Polls `ready` until it holds or [`START_TIMEOUT`] passes.
pub fn wait_until(what: &str, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while !ready() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// A child process killed by its pid on drop.
#[derive(Debug)]
pub struct ChildDaemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl ChildDaemon {
    pub fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> anyhow::Result<Self> {
        let out = fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon printed so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `needle` in the log, failing early if the daemon exits.
    pub fn wait_for_log(&mut self, needle: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before {needle:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not log {needle:?} in time:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends SIGTERM and waits up to `within` for the exit.
    pub fn terminate(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.pid());
        }
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {within:?} of SIGTERM", self.name);
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for ChildDaemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// What Unbound serves and how it speaks dnstap.
#[derive(Debug, Clone)]
pub struct UnboundConfig {
    /// Zones served authoritatively, as (apex, zone-file record lines). Unbound follows CNAME chains
    /// inside these (it does not for `local-data`). SOA and NS are added.
    pub auth_zones: Vec<(String, Vec<String>)>,
    /// `local-data` lines, e.g. `"v6.example.test. 45 IN AAAA 2001:db8::7"`.
    pub local_data: Vec<String>,
    /// dnstap identity (sent with `dnstap-send-identity`).
    pub identity: String,
    /// `dnstap-bidirectional` (READY/ACCEPT handshake) or plain unidirectional.
    pub bidirectional: bool,
    /// Where it answers, to any client; `None`: 127.0.0.1 on a [`free_port`], to loopback clients.
    pub listen: Option<SocketAddr>,
    /// The network namespace it runs in (`ip netns exec`), as a pod's DNS server would.
    pub netns: Option<String>,
}

impl Default for UnboundConfig {
    fn default() -> Self {
        Self {
            auth_zones: Vec::new(),
            local_data: Vec::new(),
            identity: "unbound-test".into(),
            bidirectional: true,
            listen: None,
            netns: None,
        }
    }
}

/// Special-use zones (RFC 6761, 7686, 8375) that Unbound answers itself unless told otherwise, so that
/// tests may serve names under them.
const SPECIAL_USE_ZONES: &[&str] = &["test.", "invalid.", "onion.", "home.arpa."];

/// An Unbound resolver on 127.0.0.1:`port` (or where [`UnboundConfig::listen`] says), sending
/// `CLIENT_RESPONSE` dnstap to a socket.
#[derive(Debug)]
pub struct Unbound {
    daemon: ChildDaemon,
    port: u16,
    _dir: TempDir,
}

impl Unbound {
    /// Starts Unbound with dnstap to `dnstap_socket` (start the receiver first: Unbound connects at
    /// start and then retries only on a timer).
    pub fn start(dnstap_socket: &Path, config: &UnboundConfig) -> anyhow::Result<Self> {
        require_tool("unbound")?;
        let dir = tempfile::Builder::new().prefix("unbound-").tempdir()?;
        let d = dir.path().display().to_string();
        let (ip, port, clients) = match config.listen {
            Some(addr) => (addr.ip(), addr.port(), "0.0.0.0/0"),
            None => (Ipv4Addr::LOCALHOST.into(), free_port(), "127.0.0.0/8"),
        };
        let mut conf = format!(
            "server:\n  interface: {ip}\n  port: {port}\n  do-ip6: no\n  chroot: \"\"\n  \
             username: \"\"\n  directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n  use-syslog: no\n  \
             logfile: \"\"\n  verbosity: 1\n  num-threads: 1\n  access-control: {clients} allow\n  \
             module-config: \"iterator\"\n  do-not-query-localhost: yes\n"
        );
        for z in SPECIAL_USE_ZONES {
            let _ = writeln!(conf, "  local-zone: \"{z}\" nodefault");
        }
        for line in &config.local_data {
            let _ = writeln!(conf, "  local-data: \"{line}\"");
        }
        for (i, (apex, records)) in config.auth_zones.iter().enumerate() {
            let apex = format!("{}.", apex.trim_end_matches('.'));
            let file = dir.path().join(format!("zone{i}.db"));
            let mut zone = format!(
                "$ORIGIN {apex}\n@ 3600 IN SOA ns.{apex} host.{apex} 1 3600 600 86400 60\n\
                 @ 3600 IN NS ns.{apex}\nns 3600 IN A 127.0.0.1\n"
            );
            for r in records {
                let _ = writeln!(zone, "{r}");
            }
            fs::write(&file, zone)?;
            let _ = write!(
                conf,
                "auth-zone:\n  name: \"{apex}\"\n  zonefile: \"{}\"\n  for-downstream: yes\n  \
                 for-upstream: yes\n",
                file.display()
            );
        }
        let _ = write!(
            conf,
            "remote-control:\n  control-enable: no\ndnstap:\n  dnstap-enable: yes\n  \
             dnstap-socket-path: \"{}\"\n  dnstap-bidirectional: {}\n  dnstap-send-identity: yes\n  \
             dnstap-identity: \"{}\"\n  dnstap-log-client-response-messages: yes\n",
            dnstap_socket.display(),
            if config.bidirectional { "yes" } else { "no" },
            config.identity,
        );
        let conf_path = dir.path().join("unbound.conf");
        fs::write(&conf_path, conf)?;
        let mut cmd = match &config.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "unbound"]);
                c
            }
            None => Command::new("unbound"),
        };
        let mut daemon = ChildDaemon::spawn(
            "unbound",
            cmd.arg("-d").arg("-c").arg(&conf_path),
            dir.path().join("unbound.log"),
        )?;
        daemon.wait_for_log("start of service")?;
        Ok(Self {
            daemon,
            port,
            _dir: dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

/// Runs `dig -b <client> @127.0.0.1 -p <port> <name> <qtype> +short` and returns its lines. `client`
/// must be a loopback address (127.0.0.N): it becomes the client IP the server sees.
pub fn dig(client: Ipv4Addr, port: u16, name: &str, qtype: &str) -> anyhow::Result<Vec<String>> {
    require_tool("dig")?;
    let out = Command::new("dig")
        .arg("-b")
        .arg(client.to_string())
        .arg("@127.0.0.1")
        .arg("-p")
        .arg(port.to_string())
        .args([name, qtype, "+short", "+time=2", "+tries=1"])
        .output()?;
    if !out.status.success() {
        bail!(
            "dig {name} {qtype} failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Fetches `path` from an HTTP endpoint (blocking, for metrics in tests).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: tapd\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Reads one sample from an OpenMetrics exposition (a `/metrics` response, headers and all): `name` is
/// the sample's name with its exact label set as written, so a counter's ends with `_total`
/// (`tapd_events_total`, `tapd_decode_errors_total{reason="dns"}`, `dnsflow_ready`). `None` when the
/// sample is absent, or when the text is cut short of the `# EOF` that ends every exposition.
pub fn metric(text: &str, name: &str) -> Option<u64> {
    let (samples, _) = text.rsplit_once("\n# EOF")?;
    samples
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Where a running tapd listens.
#[derive(Debug, Clone)]
pub struct TapdAddrs {
    pub socket: PathBuf,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
}

impl TapdAddrs {
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The current `/metrics` text.
    pub fn metrics_text(&self) -> anyhow::Result<String> {
        http_get(self.metrics, "/metrics")
    }

    /// One sample from `/metrics` (0 when absent).
    pub fn metric(&self, name: &str) -> u64 {
        self.metrics_text()
            .ok()
            .and_then(|t| metric(&t, name))
            .unwrap_or(0)
    }
}

fn local_port_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`...) of process `pid`, or of this process
/// when `None`; `None` when the process or the field is not there.
pub fn proc_status_kib(pid: Option<u32>, field: &str) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

/// Where the shipped `deploy/tls/make-certs.sh` put tapd's material in `dir`, as tapd's flags:
/// `--tls-cert`, `--tls-key` (`tapd.*`) and `--tls-client-ca` (`ca.crt`).
pub fn tapd_tls_args(dir: &Path) -> Vec<String> {
    let f = |name: &str| dir.join(name).display().to_string();
    vec![
        "--tls-cert".into(),
        f("tapd.crt"),
        "--tls-key".into(),
        f("tapd.key"),
        "--tls-client-ca".into(),
        f("ca.crt"),
    ]
}

/// The tapd binary of this workspace, built (or found up to date) once per test run. Another
/// package's tests cannot name it with `CARGO_BIN_EXE_tapd`, so cargo is asked for it: the same
/// profile as the running test, in the same target directory.
///
/// `DNSFLOW_TAPD_BIN` names a binary to use instead. `scripts/test` sets it to the tapd that its
/// `cargo test --workspace` has just built for tapd's own tests: `cargo build -p tapd` alone resolves
/// other features for tapd's dependencies and would build most of them a second time, which costs
/// a CI machine minutes and gigabytes.
pub fn tapd_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("DNSFLOW_TAPD_BIN") {
            let bin = PathBuf::from(bin);
            assert!(
                bin.is_file(),
                "DNSFLOW_TAPD_BIN names no file: {}",
                bin.display()
            );
            return bin;
        }
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test>-<hash>
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.args(["build", "--quiet", "-p", "tapd", "--bin", "tapd"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo build -p tapd");
        assert!(status.success(), "building tapd failed");
        let bin = profile_dir.join("tapd");
        assert!(bin.is_file(), "no tapd binary at {}", bin.display());
        bin
    })
}

/// Runs the shipped `deploy/tls/make-certs.sh` on `dir` for `specs` (`name:server|client`; none: the
/// default identities), so the tests use the certificates an operator would: `dir/ca.crt`,
/// `dir/<name>.crt`, `dir/<name>.key`.
pub fn make_certs(dir: &Path, specs: &[&str]) -> anyhow::Result<()> {
    require_tool("openssl")?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tls/make-certs.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .args(specs)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "make-certs.sh {specs:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The tapd binary as a child process, in its own temp dir.
#[derive(Debug)]
pub struct TapdProcess {
    pub daemon: ChildDaemon,
    pub addrs: TapdAddrs,
    pub dir: TempDir,
}

impl TapdProcess {
    /// Starts `bin` listening on `<tempdir>/dnstap.sock` and free loopback ports, with `extra` flags,
    /// and waits until the socket exists and gRPC accepts connections.
    pub fn spawn(bin: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::spawn_in(
            bin,
            tempfile::Builder::new().prefix("tapd-").tempdir()?,
            extra,
        )
    }

    /// Like [`TapdProcess::spawn`], in a given directory (whose socket a previous tapd may have left).
    pub fn spawn_in(bin: &Path, dir: TempDir, extra: &[&str]) -> anyhow::Result<Self> {
        let addrs = TapdAddrs {
            socket: dir.path().join("dnstap.sock"),
            grpc: local_port_addr(free_port()),
            metrics: local_port_addr(free_port()),
        };
        let mut cmd = Command::new(bin);
        cmd.arg("--socket")
            .arg(&addrs.socket)
            .arg("--listen")
            .arg(addrs.grpc.to_string())
            .arg("--metrics-listen")
            .arg(addrs.metrics.to_string())
            .args(extra)
            .env_clear()
            .env("RUST_LOG", "info");
        let mut daemon = ChildDaemon::spawn("tapd", &mut cmd, dir.path().join("tapd.log"))?;
        daemon.wait_for_log("accepting dnstap connections")?;
        wait_until("tapd gRPC", || TcpStream::connect(addrs.grpc).is_ok())?;
        Ok(Self { daemon, addrs, dir })
    }
}

/// Drives arbitrary bytes through Frame Streams → dnstap → DNS, as the socket task does, and panics
/// if an invariant breaks (buffering beyond one frame plus one read, a name that is not normalized, a
/// chain or answer list over its bound). The first byte picks the opening (none, unidirectional,
/// bidirectional) and the read size; the rest is the stream. Shared by the property tests and the
/// cargo-fuzz target in `fuzz/`.
pub fn drive_pipeline(data: &[u8]) {
    use dnsflow_dnstap::{
        dnstap::{self, Decoded},
        event::{DnsName, MAX_ANSWERS, MAX_CNAME_CHAIN},
        framestream::{encode_control, Control, Decoder, Output},
    };
    const CAP: usize = 4096;
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let ct = dnsflow_proto::DNSTAP_CONTENT_TYPE.as_bytes();
    let mut bytes = Vec::with_capacity(rest.len() + 64);
    match selector % 3 {
        0 => {}
        1 => bytes.extend_from_slice(&encode_control(Control::Start, Some(ct))),
        _ => {
            bytes.extend_from_slice(&encode_control(Control::Ready, Some(ct)));
            bytes.extend_from_slice(&encode_control(Control::Start, Some(ct)));
        }
    }
    bytes.extend_from_slice(rest);
    let chunk = usize::from(selector / 3) + 1;
    let mut decoder = Decoder::new(dnsflow_proto::DNSTAP_CONTENT_TYPE, CAP);
    for piece in bytes.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.poll() {
                Ok(Some(Output::Data(frame))) => {
                    if let Ok(Decoded::Response { response: r, .. }) =
                        dnstap::decode(&frame, "fuzz", std::time::UNIX_EPOCH)
                    {
                        assert!(r.cname_chain.len() <= MAX_CNAME_CHAIN);
                        assert!(r.answers.len() <= MAX_ANSWERS);
                        for n in r.names() {
                            assert_eq!(DnsName::new(n.as_str()).as_ref(), Ok(n));
                        }
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        assert!(
            decoder.buffered() <= CAP + 8 + chunk,
            "buffered {}",
            decoder.buffered()
        );
        if decoder.is_done() {
            break;
        }
    }
    let _ = decoder.finish_input();
}

//! The real [`FlowProgrammer`]: `ovs-ofctl` and `ovs-vsctl` child processes. Arguments are fixed
//! keywords and formatted integers; flows go through stdin of one `--bundle` process per batch.
//!
//! No call can wedge flowd: each one runs under [`Ofctl::with_timeout`], past which the child is
//! killed and reaped. The long-lived `ovs-ofctl monitor` runs under `setpriv --pdeathsig KILL`, so
//! the kernel kills it when flowd dies, even by SIGKILL.

use super::{
    discovery::{self, PortKeys},
    flow::{self, FlowEvent, FlowOp, ParsedFlow},
    template::{self, LearnError, Template},
    FlowProgrammer, OvsError, Result, MONITOR_QUEUE,
};
use crate::metrics::Registry;
use prometheus_client::metrics::counter::Counter;
use std::{
    collections::HashMap,
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{mpsc as std_mpsc, Mutex, OnceLock},
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
    runtime::Handle,
    sync::{mpsc, oneshot},
};

const OFCTL: &str = "ovs-ofctl";
const VSCTL: &str = "ovs-vsctl";
const SETPRIV: &str = "setpriv";
/// Cap on what one `ovs-ofctl`/`ovs-vsctl` call may print: a dump of 200,000 flows is ~60 MiB.
pub const MAX_OUTPUT: usize = 256 << 20;
/// Cap on the flows one dump returns: far above what one node's pods resolve, bounded all the same.
pub const MAX_DUMP_FLOWS: usize = 2_000_000;
/// Cap on a tool's error message kept for the log.
const MAX_STDERR: usize = 4096;
/// Default limit on one call (and on the monitor's start): OVS 3.1 dumps 200,000 flows in 1.5 s and
/// bundles as many in 2.5 s, so a 20,000-flow bundle or a 2,000,000-flow dump fits twice over.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for a killed child to be reaped: SIGKILL takes milliseconds; one stuck in the
/// kernel is left to tokio's orphan reaper rather than wedging the caller with it.
const REAP_WAIT: Duration = Duration::from_secs(5);

/// `ovs-ofctl`/`ovs-vsctl` against one bridge. `env` is passed to each child (e.g. `OVS_RUNDIR` of a
/// sandbox) on top of flowd's own environment, which is where `OVS_RUNDIR` normally comes from.
#[derive(Clone, Debug)]
pub struct Ofctl {
    bridge: String,
    env: Vec<(OsString, OsString)>,
    timeout: Duration,
    /// Flow monitor events lost because the engine had [`MONITOR_QUEUE`] unread already.
    monitor_events_dropped: Counter,
}

impl Ofctl {
    pub fn new(bridge: impl Into<String>) -> Self {
        Self {
            bridge: bridge.into(),
            env: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            monitor_events_dropped: Counter::default(),
        }
    }

    /// Sets how long one call (or the monitor's start) may take before its child is killed and the
    /// call fails with [`OvsError::Timeout`]; [`DEFAULT_TIMEOUT`] unless set.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Adds an environment variable for the child processes.
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(program);
        c.envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    /// Kills and reaps `child`, whose call ran out of time, and says so.
    async fn expired(&self, child: &mut Child, program: &'static str, args: &[&str]) -> OvsError {
        reap(child).await;
        OvsError::Timeout {
            program,
            args: args.join(" "),
            after: self.timeout,
        }
    }

    /// Runs `program args`, feeding `stdin`, and returns its (bounded) stdout.
    async fn run(
        &self,
        program: &'static str,
        args: &[&str],
        stdin: Option<String>,
    ) -> Result<String> {
        let mut cmd = self.command(program);
        cmd.args(args);
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().map_err(|source| OvsError::Spawn {
            program,
            error: source,
        })?;
        match tokio::time::timeout(self.timeout, converse(&mut child, program, args, stdin)).await {
            Ok(result) => result,
            Err(_) => Err(self.expired(&mut child, program, args).await),
        }
    }
}

/// The whole exchange with a spawned tool: feeds `stdin`, collects stdout and stderr (bounded),
/// waits for the exit.
async fn converse(
    child: &mut Child,
    program: &'static str,
    args: &[&str],
    stdin: Option<String>,
) -> Result<String> {
    let io = |source| OvsError::Io {
        program,
        error: source,
    };
    let writer = {
        let input = child.stdin.take();
        async move {
            if let (Some(mut pipe), Some(text)) = (input, stdin) {
                pipe.write_all(text.as_bytes()).await?;
                pipe.shutdown().await?;
            }
            Ok::<_, std::io::Error>(())
        }
    };
    let mut out = Vec::new();
    let mut err = Vec::new();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let reader = async {
        if let Some(s) = stdout {
            s.take(MAX_OUTPUT as u64 + 1).read_to_end(&mut out).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    let err_reader = async {
        if let Some(s) = stderr {
            s.take(MAX_STDERR as u64).read_to_end(&mut err).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    let (w, r, e) = tokio::join!(writer, reader, err_reader);
    // A failed write (broken pipe) is explained by the tool's own status and stderr below.
    r.map_err(io)?;
    e.map_err(io)?;
    if out.len() > MAX_OUTPUT {
        return Err(OvsError::TooMuchOutput {
            program,
            limit: MAX_OUTPUT,
        });
    }
    let status = child.wait().await.map_err(io)?;
    if !status.success() {
        return Err(OvsError::Failed {
            program,
            args: args.join(" "),
            status,
            stderr: String::from_utf8_lossy(&err).trim().to_owned(),
        });
    }
    w.map_err(io)?;
    Ok(String::from_utf8(out)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// Kills `child` and waits (boundedly) for its exit, so that no zombie is left behind.
async fn reap(child: &mut Child) {
    // An error means it had already exited and been reaped.
    let _ = tokio::time::timeout(REAP_WAIT, child.kill()).await;
}

/// util-linux `setpriv`, looked up on flowd's PATH once; its absence is warned about once.
fn setpriv() -> Option<&'static Path> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let found = std::env::var_os("PATH").and_then(|path| find_program(&path, SETPRIV));
            if found.is_none() {
                tracing::warn!(
                    "setpriv (util-linux) is not on PATH: if flowd is killed, its ovs-ofctl monitor \
                     lives on"
                );
            }
            found
        })
        .as_deref()
}

/// The first executable `name` in the absolute directories of `path` (a `PATH` value).
fn find_program(path: &OsStr, name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The program and arguments that run `ovs-ofctl args` for as long as flowd lives: behind
/// `setpriv --pdeathsig KILL`, which asks the kernel to kill it when its parent dies (one that dies in
/// the instant between the fork and setpriv's prctl escapes it; that window is microseconds).
fn lifelong_argv(setpriv: Option<&Path>, args: &[&str]) -> (OsString, Vec<OsString>) {
    let args = args.iter().map(OsString::from);
    match setpriv {
        Some(setpriv) => (
            setpriv.into(),
            ["--pdeathsig", "KILL", "--", OFCTL]
                .into_iter()
                .map(OsString::from)
                .chain(args)
                .collect(),
        ),
        None => (OFCTL.into(), args.collect()),
    }
}

/// A command for the spawner thread, the runtime its child belongs to, and where the child goes.
type SpawnJob = (Command, Handle, oneshot::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as flowd. The parent-death signal is bound to the
/// *thread* that forked the child, not to the process: a tokio worker normally lives as long as its
/// runtime, but one that enters `block_in_place` hands its work to a new thread and may then idle
/// out, which would kill a monitor while flowd is well.
async fn spawn_lifelong(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: Mutex<Option<std_mpsc::Sender<SpawnJob>>> = Mutex::new(None);
    let (reply, child) = oneshot::channel();
    let job = (cmd, Handle::current(), reply);
    {
        let mut spawner = SPAWNER.lock().unwrap_or_else(|e| e.into_inner());
        let tx = match &*spawner {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = std_mpsc::channel::<SpawnJob>();
                std::thread::Builder::new()
                    .name("flowd-ovs-spawn".into())
                    .spawn(move || {
                        for (mut cmd, runtime, reply) in rx {
                            let _entered = runtime.enter();
                            let _ = reply.send(cmd.spawn());
                        }
                    })?;
                spawner.insert(tx).clone()
            }
        };
        if tx.send(job).is_err() {
            *spawner = None;
            return Err(std::io::Error::other("the spawner thread is gone"));
        }
    }
    child
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("the spawner thread is gone")))
}

/// Reads a `dump-flows` as it streams, keeping the flows whose cookie carries `prefix`, then waits
/// for the exit.
async fn read_dump(child: &mut Child, args: &[&str], prefix: u32) -> Result<Vec<ParsedFlow>> {
    let io = |source| OvsError::Io {
        program: OFCTL,
        error: source,
    };
    let mut flows = Vec::new();
    let mut err = Vec::new();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let reader = async {
        let Some(stdout) = stdout else { return Ok(()) };
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::with_capacity(flow::MAX_LINE_LEN);
        loop {
            buf.clear();
            let n = (&mut reader)
                .take(flow::MAX_LINE_LEN as u64)
                .read_until(b'\n', &mut buf)
                .await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            if flows.len() >= MAX_DUMP_FLOWS {
                continue;
            }
            if let Some(f) = std::str::from_utf8(&buf)
                .ok()
                .and_then(flow::parse_flow_line)
            {
                if f.cookie.prefix() == prefix {
                    flows.push(f);
                }
            }
        }
    };
    let err_reader = async {
        if let Some(s) = stderr {
            s.take(MAX_STDERR as u64).read_to_end(&mut err).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    let (r, e) = tokio::join!(reader, err_reader);
    r.map_err(io)?;
    e.map_err(io)?;
    let status = child.wait().await.map_err(io)?;
    if !status.success() {
        return Err(OvsError::Failed {
            program: OFCTL,
            args: args.join(" "),
            status,
            stderr: String::from_utf8_lossy(&err).trim().to_owned(),
        });
    }
    Ok(flows)
}

/// Waits for the monitor's first line on stdout, the switch's reply to the monitor request: from
/// then on, every change is reported. Without it, ovs-ofctl ended, and its stderr says why.
async fn monitor_started<R, E>(
    child: &mut Child,
    args: &[&str],
    replies: &mut R,
    events: &mut E,
) -> Result<()>
where
    R: tokio::io::AsyncBufRead + Unpin,
    E: tokio::io::AsyncRead + Unpin,
{
    let io = |source| OvsError::Io {
        program: OFCTL,
        error: source,
    };
    let mut first = Vec::new();
    let n = replies
        .take(flow::MAX_LINE_LEN as u64)
        .read_until(b'\n', &mut first)
        .await
        .map_err(io)?;
    if n > 0 {
        return Ok(());
    }
    let mut err = Vec::new();
    events
        .take(MAX_STDERR as u64)
        .read_to_end(&mut err)
        .await
        .map_err(io)?;
    let status = child.wait().await.map_err(io)?;
    let stderr = String::from_utf8_lossy(&err).trim().to_owned();
    if status.success() {
        return Err(io(std::io::Error::other(format!(
            "ended before the monitor started: {stderr}"
        ))));
    }
    Err(OvsError::Failed {
        program: OFCTL,
        args: args.join(" "),
        status,
        stderr,
    })
}

/// Parses the monitor's lines into events for `tx` until the monitor ends or `tx` closes. An event
/// that finds `tx` full is lost, and counted in `dropped`: the monitor must never wait for flowd (OVS
/// would drop the monitor), and the next reconcile repairs what the event would have told.
async fn forward_events(
    mut events: impl tokio::io::AsyncBufRead + Unpin,
    tx: &mpsc::Sender<FlowEvent>,
    dropped: &Counter,
) {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Bounded: an over-long line is cut, fails to parse and is ignored.
        let mut limited = (&mut events).take(flow::MAX_LINE_LEN as u64);
        let read = tokio::select! {
            r = limited.read_until(b'\n', &mut buf) => r,
            () = tx.closed() => break,
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if let Some(event) = flow::parse_monitor_line(&String::from_utf8_lossy(&buf)) {
            match tx.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    dropped.inc();
                }
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    }
}

impl FlowProgrammer for Ofctl {
    async fn apply(&self, ops: &[FlowOp]) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let text = flow::render_batch(ops);
        // --no-names: otherwise ovs-ofctl first fetches every table's features (~1 MiB from OVN's
        // br-int) to resolve table names, tripling the cost of a small batch.
        self.run(
            OFCTL,
            &["--no-names", "--bundle", "add-flows", &self.bridge, "-"],
            Some(text),
        )
        .await
        .map(drop)
    }

    async fn dump(&self, prefix: u32) -> Result<Vec<ParsedFlow>> {
        // Parsed line by line as it streams: 100,000 flows print ~30 MiB that need not be held at once.
        let filter = format!(
            "cookie={:#x}/{:#x}",
            u64::from(prefix) << 32,
            flow::PREFIX_MASK
        );
        let args = ["dump-flows", "--no-names", &self.bridge, &filter];
        let mut child =
            self.command(OFCTL)
                .args(args)
                .spawn()
                .map_err(|source| OvsError::Spawn {
                    program: OFCTL,
                    error: source,
                })?;
        match tokio::time::timeout(self.timeout, read_dump(&mut child, &args, prefix)).await {
            Ok(result) => result,
            Err(_) => Err(self.expired(&mut child, OFCTL, &args).await),
        }
    }

    async fn monitor(&self, table: u8) -> Result<mpsc::Receiver<FlowEvent>> {
        let watch = format!("watch:!initial,table={table}");
        let args = ["monitor", &self.bridge, &watch, "--no-names"];
        let (program, argv) = lifelong_argv(setpriv(), &args);
        let mut cmd = self.command(program);
        cmd.args(argv);
        let mut child = spawn_lifelong(cmd)
            .await
            .map_err(|source| OvsError::Spawn {
                program: OFCTL,
                error: source,
            })?;
        let (Some(stdout), Some(events)) = (child.stdout.take(), child.stderr.take()) else {
            reap(&mut child).await;
            return Err(OvsError::Io {
                program: OFCTL,
                error: std::io::Error::other("no stdout or stderr"),
            });
        };
        // The flow updates arrive as asynchronous messages, which ovs-ofctl prints (unbuffered) on
        // stderr; stdout only gets the reply to the monitor request, which says the monitor runs.
        let mut replies = BufReader::new(stdout);
        let mut events = BufReader::new(events);
        let started = monitor_started(&mut child, &args, &mut replies, &mut events);
        let start = match tokio::time::timeout(self.timeout, started).await {
            Ok(start) => start,
            Err(_) => return Err(self.expired(&mut child, OFCTL, &args).await),
        };
        if let Err(e) = start {
            reap(&mut child).await;
            return Err(e);
        }
        let (tx, rx) = mpsc::channel(MONITOR_QUEUE);
        let dropped = self.monitor_events_dropped.clone();
        tokio::spawn(async move {
            // Owning the child here: when this task ends (EOF or the receiver gone), it is killed, and
            // reaped unless the task itself is dropped (then tokio reaps it later).
            let mut child = child;
            // Nothing more is expected on stdout; it is read all the same, so that it never fills.
            let drain = async {
                let _ = tokio::io::copy(&mut replies, &mut tokio::io::sink()).await;
                std::future::pending::<()>().await;
            };
            tokio::select! {
                () = forward_events(events, &tx, &dropped) => {}
                () = drain => {}
            }
            reap(&mut child).await;
        });
        Ok(rx)
    }

    async fn learn_template(
        &self,
        priority_base: u16,
        table: Option<u8>,
    ) -> Result<Result<Template, LearnError>> {
        let out = self
            .run(OFCTL, &["dump-flows", "--no-names", &self.bridge], None)
            .await?;
        Ok(template::learn(&out, priority_base, table))
    }

    async fn port_keys(&self, iface_ids: &[String]) -> Result<HashMap<String, PortKeys>> {
        let json = self
            .run(
                VSCTL,
                &[
                    "--format=json",
                    "--columns=ofport,external_ids",
                    "list",
                    "Interface",
                ],
                None,
            )
            .await?;
        let ofports = discovery::parse_interfaces(&json);
        let table0 = self
            .run(
                OFCTL,
                &["dump-flows", "--no-names", &self.bridge, "table=0"],
                None,
            )
            .await?;
        let keys = discovery::parse_port_keys(&table0);
        Ok(iface_ids
            .iter()
            .filter_map(|id| {
                let port = ofports.get(id)?;
                Some((id.clone(), *keys.get(port)?))
            })
            .collect())
    }

    fn register_metrics(&self, registry: &mut Registry) {
        registry.counter(
            "monitor_events_dropped",
            "Flow monitor events lost because flowd had too many unread; the next reconcile repairs what they said",
            &self.monitor_events_dropped,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ovs::{flow::Cookie, RemovedReason};
    use std::{fmt::Debug, future::Future, os::unix::fs::PermissionsExt, time::Instant};

    /// What a stand-in tool may take at most in these tests.
    const AFTER: Duration = Duration::from_millis(500);
    /// The switch's reply to a monitor request, as ovs-ofctl prints it on stdout.
    const REPLY: &str = "NXST_FLOW_MONITOR reply (xid=0x2):";
    /// Set in the process that `the_monitor_dies_with_flowd_even_by_sigkill` kills: its stand-in dir.
    const PARENT_DIR_ENV: &str = "FLOWD_TEST_MONITOR_PARENT_DIR";

    #[tokio::test]
    async fn monitor_events_that_find_the_queue_full_are_counted_not_waited_for() {
        let line = " event=DELETED reason=idle table=46 idle_timeout=60 cookie=0x646e736600000001 \
                    ipv6,reg14=0x1,metadata=0x1,ipv6_src=fd00:10:244:1::5,ipv6_dst=2001:db8::1\n";
        let lines = line.repeat(5);
        let (tx, mut rx) = mpsc::channel(2);
        let dropped = Counter::default();
        // Returns at the end of the input although nobody reads: it never waited for room.
        tokio::time::timeout(AFTER, forward_events(lines.as_bytes(), &tx, &dropped))
            .await
            .expect("forwarding waited for the reader");
        assert_eq!(dropped.get(), 3);
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_ok());

        let mut registry = Registry::default();
        ofctl(Path::new("/nonexistent")).register_metrics(&mut registry);
        let counters: Vec<_> = registry.counters().collect();
        assert_eq!(counters, [("dnsflow_monitor_events_dropped", 0)]);
    }

    /// A directory with stand-ins for `ovs-ofctl` and `ovs-vsctl`: shell scripts that write their pid
    /// to `pid` there, then run `body`.
    fn stand_in(body: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("#!/bin/sh\necho $$ > '{}'\n{body}\n", pidfile.display());
        for tool in [OFCTL, VSCTL] {
            let path = dir.path().join(tool);
            std::fs::write(&path, &script).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        dir
    }

    /// The real programmer, finding the stand-ins in `dir` first on its children's PATH.
    fn ofctl(dir: &Path) -> Ofctl {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let path = std::env::join_paths(
            std::iter::once(dir.to_owned()).chain(std::env::split_paths(&path)),
        )
        .unwrap();
        Ofctl::new("br-int").with_env("PATH", path)
    }

    fn stand_in_pid(dir: &Path) -> u32 {
        let pid = std::fs::read_to_string(dir.join("pid")).expect("the stand-in never ran");
        pid.trim().parse().unwrap()
    }

    /// Whether process `pid` runs (a zombie has ended and only waits for its parent to reap it).
    fn running(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            !matches!(state, Some('Z' | 'X'))
        })
    }

    /// Runs `call` against a stand-in that never answers: it must fail with the timeout, in time,
    /// and leave no process behind, not even a zombie.
    async fn times_out<T: Debug>(
        dir: &Path,
        call: impl Future<Output = Result<T>>,
        tool: &str,
        argv: &str,
    ) {
        let _ = std::fs::remove_file(dir.join("pid"));
        let started = Instant::now();
        let err = call.await.expect_err("a call to a hung tool returned");
        let took = started.elapsed();
        let OvsError::Timeout {
            program,
            args,
            after,
        } = &err
        else {
            panic!("{argv}: not a timeout: {err}");
        };
        assert_eq!((*program, args.as_str(), *after), (tool, argv, AFTER));
        assert!(
            err.to_string().starts_with(&format!(
                "{tool} {argv} got no complete answer within 500ms and was killed"
            )),
            "{err}"
        );
        assert!(
            took >= AFTER && took < AFTER + REAP_WAIT,
            "{argv}: took {took:?}"
        );
        let pid = stand_in_pid(dir);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{argv}: the stand-in (pid {pid}) is still there"
        );
    }

    #[tokio::test]
    async fn hung_calls_time_out_and_leave_no_process_behind() {
        let dir = stand_in("exec sleep 1000");
        let o = ofctl(dir.path()).with_timeout(AFTER);
        let op = FlowOp::DeleteCookie {
            table: 44,
            cookie: Cookie::pod(1, 2),
            mask: flow::POD_MASK,
        };
        let d = dir.path();
        times_out(
            d,
            o.apply(&[op]),
            OFCTL,
            "--no-names --bundle add-flows br-int -",
        )
        .await;
        times_out(
            d,
            o.dump(1),
            OFCTL,
            "dump-flows --no-names br-int cookie=0x100000000/0xffffffff00000000",
        )
        .await;
        times_out(
            d,
            o.learn_template(1000, None),
            OFCTL,
            "dump-flows --no-names br-int",
        )
        .await;
        times_out(
            d,
            o.port_keys(&["pod".into()]),
            VSCTL,
            "--format=json --columns=ofport,external_ids list Interface",
        )
        .await;
        // A monitor is running once the switch answers its request; this one never does.
        times_out(
            d,
            o.monitor(44),
            OFCTL,
            "monitor br-int watch:!initial,table=44 --no-names",
        )
        .await;
    }

    #[tokio::test]
    async fn a_monitor_that_cannot_start_says_why() {
        let dir = stand_in("echo 'ovs-ofctl: br-int is not a bridge or a socket' >&2; exit 1");
        let err = ofctl(dir.path())
            .monitor(44)
            .await
            .expect_err("a monitor started");
        let OvsError::Failed { status, stderr, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(status.code(), Some(1));
        assert_eq!(stderr, "ovs-ofctl: br-int is not a bridge or a socket");
    }

    #[tokio::test]
    async fn a_monitor_reports_events_and_ends_when_its_receiver_goes() {
        let event = " event=DELETED reason=idle table=46 idle_timeout=2 cookie=0x646e736600012aff \
                     tcp,reg14=0x1,metadata=0x1,nw_src=10.244.1.5,nw_dst=8.8.8.8,tp_dst=443 \
                     actions=resubmit(,47)";
        let dir = stand_in(&format!(
            "echo '{REPLY}'\necho '{event}' >&2\nexec sleep 1000"
        ));
        let mut events = ofctl(dir.path())
            .with_timeout(AFTER)
            .monitor(46)
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
        let Ok(Some(FlowEvent::Deleted(RemovedReason::Idle, f))) = got else {
            panic!("{got:?}");
        };
        assert_eq!(f.cookie, Cookie(0x646e_7366_0001_2aff));
        let pid = stand_in_pid(dir.path());
        assert!(running(pid));
        drop(events);
        let deadline = Instant::now() + REAP_WAIT;
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(
                Instant::now() < deadline,
                "the monitor (pid {pid}) outlived its receiver"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the process it holds on drop: a failing test leaves nothing behind.
    struct Killing(std::process::Child);

    impl Drop for Killing {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Stands for flowd in `the_monitor_dies_with_flowd_even_by_sigkill`: starts a monitor, says so,
    /// and waits to be killed.
    #[tokio::test]
    #[ignore = "the process the_monitor_dies_with_flowd_even_by_sigkill starts and kills"]
    async fn monitor_parent() {
        let Some(dir) = std::env::var_os(PARENT_DIR_ENV) else {
            return;
        };
        let dir = PathBuf::from(dir);
        let _events = ofctl(&dir).monitor(44).await.unwrap();
        std::fs::write(dir.join("started"), "").unwrap();
        tokio::time::sleep(Duration::from_secs(600)).await;
    }

    #[test]
    fn the_monitor_dies_with_flowd_even_by_sigkill() {
        assert!(
            setpriv().is_some(),
            "this test needs util-linux setpriv on PATH"
        );
        let dir = stand_in(&format!("echo '{REPLY}'\nexec sleep 1000"));
        let test = module_path!()
            .split_once("::")
            .map_or(module_path!(), |(_crate, path)| path);
        let mut parent = Killing(
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([&format!("{test}::monitor_parent"), "--exact", "--ignored"])
                .env(PARENT_DIR_ENV, dir.path())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dir.path().join("started").exists() {
            let ended = parent.0.try_wait().unwrap();
            assert!(ended.is_none(), "the parent process ended: {ended:?}");
            assert!(Instant::now() < deadline, "the monitor did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = stand_in_pid(dir.path());
        assert!(running(pid));
        // SIGKILL: no destructor, no kill_on_drop; only the kernel can end the monitor now.
        parent.0.kill().unwrap();
        parent.0.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while running(pid) {
            if Instant::now() > deadline {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                panic!("the monitor (pid {pid}) outlived flowd");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_monitor_outlives_the_thread_that_started_it() {
        assert!(
            setpriv().is_some(),
            "this test needs util-linux setpriv on PATH"
        );
        let dir = stand_in(&format!("echo '{REPLY}'\nexec sleep 1000"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        let o = ofctl(dir.path());
        let mut events = std::thread::spawn(move || handle.block_on(o.monitor(44)))
            .join()
            .unwrap()
            .unwrap();
        let pid = stand_in_pid(dir.path());
        // Had that thread forked the monitor, the kernel would kill it now that the thread is gone.
        std::thread::sleep(Duration::from_millis(500));
        assert!(running(pid), "the monitor (pid {pid}) died with the thread");
        assert!(matches!(
            events.try_recv(),
            Err(mpsc::error::TryRecvError::Empty)
        ));
    }

    #[test]
    fn the_monitor_runs_under_setpriv_when_there_is_one() {
        let args = ["monitor", "br-int", "watch:!initial,table=44"];
        let (program, argv) = lifelong_argv(Some(Path::new("/usr/bin/setpriv")), &args);
        assert_eq!(program, "/usr/bin/setpriv");
        assert_eq!(
            argv,
            [
                "--pdeathsig",
                "KILL",
                "--",
                "ovs-ofctl",
                "monitor",
                "br-int",
                "watch:!initial,table=44"
            ]
        );
        let (program, argv) = lifelong_argv(None, &args);
        assert_eq!(program, "ovs-ofctl");
        assert_eq!(argv, args);
    }

    #[test]
    fn programs_are_found_only_where_executable_in_absolute_dirs() {
        let plain = tempfile::tempdir().unwrap();
        std::fs::write(plain.path().join("tool"), "").unwrap();
        let exec = stand_in("true");
        let path =
            std::env::join_paths([plain.path(), Path::new("relative"), exec.path()]).unwrap();
        assert_eq!(find_program(&path, OFCTL), Some(exec.path().join(OFCTL)));
        assert_eq!(find_program(&path, "tool"), None);
        assert_eq!(find_program(OsStr::new(""), OFCTL), None);
    }
}

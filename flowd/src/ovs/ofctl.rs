//! The real [`FlowProgrammer`]: `ovs-ofctl` and `ovs-vsctl` child processes. Arguments are fixed
//! keywords and formatted integers; flows go through stdin of one `--bundle` process per batch.

use super::{
    discovery::{self, PortKeys},
    flow::{self, FlowEvent, FlowOp, ParsedFlow},
    template::{self, LearnError, Template},
    FlowProgrammer, OvsError, Result, MONITOR_QUEUE,
};
use std::{collections::HashMap, ffi::OsString, process::Stdio};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    process::Command,
    sync::mpsc,
};

const OFCTL: &str = "ovs-ofctl";
const VSCTL: &str = "ovs-vsctl";
/// Cap on what one `ovs-ofctl`/`ovs-vsctl` call may print: a dump of 200,000 flows is ~60 MiB.
pub const MAX_OUTPUT: usize = 256 << 20;
/// Cap on the flows one dump returns: far above what one node's pods resolve, bounded all the same.
pub const MAX_DUMP_FLOWS: usize = 2_000_000;
/// Cap on a tool's error message kept for the log.
const MAX_STDERR: usize = 4096;

/// `ovs-ofctl`/`ovs-vsctl` against one bridge. `env` is passed to each child (e.g. `OVS_RUNDIR` of a
/// sandbox) on top of flowd's own environment, which is where `OVS_RUNDIR` normally comes from.
#[derive(Clone, Debug)]
pub struct Ofctl {
    bridge: String,
    env: Vec<(OsString, OsString)>,
}

impl Ofctl {
    pub fn new(bridge: impl Into<String>) -> Self {
        Self {
            bridge: bridge.into(),
            env: Vec::new(),
        }
    }

    /// Adds an environment variable for the child processes.
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    fn command(&self, program: &'static str) -> Command {
        let mut c = Command::new(program);
        c.envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
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
        let mut child = cmd
            .spawn()
            .map_err(|source| OvsError::Spawn { program, source })?;
        let io = |source| OvsError::Io { program, source };
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
                    source,
                })?;
        let io = |source| OvsError::Io {
            program: OFCTL,
            source,
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

    async fn monitor(&self, table: u8) -> Result<mpsc::Receiver<FlowEvent>> {
        let watch = format!("watch:!initial,table={table}");
        let mut child = self
            .command(OFCTL)
            .args(["monitor", &self.bridge, &watch, "--no-names"])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|source| OvsError::Spawn {
                program: OFCTL,
                source,
            })?;
        // The flow updates arrive as asynchronous messages, which ovs-ofctl prints (unbuffered) on
        // stderr; stdout only gets the reply to the monitor request.
        let Some(events) = child.stderr.take() else {
            return Err(OvsError::Io {
                program: OFCTL,
                source: std::io::Error::other("no stderr"),
            });
        };
        let (tx, rx) = mpsc::channel(MONITOR_QUEUE);
        tokio::spawn(async move {
            // Owning the child here: when this task ends (EOF or the receiver gone), it is killed.
            let _child = child;
            let mut reader = BufReader::new(events);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                // Bounded: an over-long line is cut, fails to parse and is ignored.
                let mut limited = (&mut reader).take(flow::MAX_LINE_LEN as u64);
                let read = tokio::select! {
                    r = limited.read_until(b'\n', &mut buf) => r,
                    () = tx.closed() => break,
                };
                match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if let Some(event) = flow::parse_monitor_line(&String::from_utf8_lossy(&buf)) {
                    if tx.try_send(event).is_err() && tx.is_closed() {
                        break;
                    }
                }
            }
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
}

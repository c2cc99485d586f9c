//! The one call flowd makes on ovs-vswitchd's control socket (the JSON-RPC `ovs-appctl` speaks):
//! `revalidator/wait`, answered once the revalidators have finished a round over the datapath's
//! flow caches. A grant is in the flow table when its bundle commits, but a drop the datapath
//! cached for the same traffic a moment before stays until a revalidation round after the commit
//! reaches it; the hold waits for that round before it lets the DNS response go (see
//! [`crate::hold`]).

use serde_json::{json, Value};
use std::{
    io,
    path::{Path, PathBuf},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
};

/// A reply larger than this is not ovs-vswitchd's to `revalidator/wait` (which is empty).
const MAX_REPLY: usize = 64 * 1024;

/// ovs-vswitchd's control socket in `rundir` (`OVS_RUNDIR`): `ovs-vswitchd.<pid>.ctl`, the pid read
/// from its pidfile now (it changes when ovs-vswitchd restarts).
pub fn vswitchd_socket(rundir: &Path) -> io::Result<PathBuf> {
    let pidfile = rundir.join("ovs-vswitchd.pid");
    let text = std::fs::read_to_string(&pidfile)?;
    let pid: u32 = text.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a pid: {:?}", pidfile.display(), text.trim()),
        )
    })?;
    Ok(rundir.join(format!("ovs-vswitchd.{pid}.ctl")))
}

/// A `revalidator/wait` sent and not answered yet.
#[derive(Debug)]
pub struct Revalidation {
    stream: UnixStream,
}

impl Revalidation {
    /// Sends `revalidator/wait` on `socket`; ovs-vswitchd takes it in its next main-loop round.
    pub async fn start(socket: &Path) -> io::Result<Self> {
        let mut stream = UnixStream::connect(socket).await?;
        let request = json!({"id": 0, "method": "revalidator/wait", "params": []});
        stream.write_all(request.to_string().as_bytes()).await?;
        Ok(Self { stream })
    }

    /// Waits for the answer: a revalidation round has ended since the request was taken.
    pub async fn done(mut self) -> Result<(), String> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("ovs-vswitchd's control socket: {e}"))?;
            if n == 0 {
                return Err("ovs-vswitchd closed its control socket without an answer".into());
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_REPLY {
                return Err(format!("ovs-vswitchd's answer exceeds {MAX_REPLY} bytes"));
            }
            match serde_json::from_slice::<Value>(&buf) {
                Ok(reply) => return answer(&reply),
                Err(e) if e.is_eof() => continue,
                Err(e) => return Err(format!("ovs-vswitchd's answer is not JSON-RPC: {e}")),
            }
        }
    }
}

/// A JSON-RPC reply: its `error`, when not null, says why the call failed.
fn answer(reply: &Value) -> Result<(), String> {
    match reply.get("error") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(e)) => Err(e.trim().to_owned()),
        Some(other) => Err(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A stand-in control socket: reads one request, answers `reply` in two pieces.
    async fn server(
        reply: &'static str,
    ) -> (tempfile::TempDir, PathBuf, tokio::task::JoinHandle<Value>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ovs-vswitchd.pid"), "4242\n").unwrap();
        let socket = vswitchd_socket(dir.path()).unwrap();
        assert!(socket.ends_with("ovs-vswitchd.4242.ctl"));
        let listener = UnixListener::bind(&socket).unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 1024];
            let n = s.read(&mut buf).await.unwrap();
            let request: Value = serde_json::from_slice(&buf[..n]).unwrap();
            let (a, b) = reply.split_at(reply.len() / 2);
            s.write_all(a.as_bytes()).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            s.write_all(b.as_bytes()).await.unwrap();
            request
        });
        (dir, socket, task)
    }

    #[tokio::test]
    async fn the_wait_is_asked_for_and_its_answer_read_in_pieces() {
        let (_dir, socket, task) = server(r#"{"error":null,"id":0,"result":""}"#).await;
        let wait = Revalidation::start(&socket).await.unwrap();
        wait.done().await.unwrap();
        let request = task.await.unwrap();
        assert_eq!(request["method"], "revalidator/wait");
        assert_eq!(request["params"], json!([]));
    }

    #[tokio::test]
    async fn an_error_or_a_broken_answer_says_why() {
        let (_dir, socket, _task) =
            server(r#"{"error":"can't wait on multiple udpifs.\n","id":0,"result":null}"#).await;
        let err = Revalidation::start(&socket).await.unwrap().done().await;
        assert_eq!(err, Err("can't wait on multiple udpifs.".into()));
        let (_dir, socket, _task) = server("]not json").await;
        let err = Revalidation::start(&socket).await.unwrap().done().await;
        assert!(err.unwrap_err().contains("not JSON-RPC"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ovs-vswitchd.pid"), "x").unwrap();
        assert!(vswitchd_socket(dir.path()).is_err());
    }
}

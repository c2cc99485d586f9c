//! tapd's `--capture` sink: a Frame Streams file written by a thread behind a bounded queue, rotating at
//! a size bound so the disk use stays bounded.

use crate::error::{Error, Result};
use bytes::Bytes;
use dnsflow_dnstap::capture::{CaptureWriter, STOP_LEN};
use std::{
    fs::{self, File},
    io::BufWriter,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

/// Frames waiting for the capture thread; beyond this they are dropped (and counted) rather than
/// slowing the dnstap reader down.
const CAPTURE_QUEUE: usize = 8192;

/// tapd's `--capture` sink: frames are queued (never waiting) to a thread that writes them to `path`,
/// moving a full file to `<path>.1` (replacing the previous one) once it reaches `max_bytes`.
#[derive(Debug)]
pub struct CaptureFile {
    tx: Option<mpsc::SyncSender<Bytes>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl CaptureFile {
    /// Creates the file (failing early if it cannot) and starts the writer thread.
    pub fn create(path: &Path, max_bytes: u64) -> Result<Self> {
        let writer = open_capture(path)?;
        let (tx, rx) = mpsc::sync_channel::<Bytes>(CAPTURE_QUEUE);
        let path = path.to_path_buf();
        let thread = thread::Builder::new()
            .name("tapd-capture".into())
            .spawn(move || write_loop(&path, max_bytes, writer, &rx))
            .map_err(Error::io("starting the capture thread"))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues a frame; returns false when the writer is behind or gone (the caller counts it).
    pub fn offer(&self, frame: Bytes) -> bool {
        self.tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(frame).is_ok())
    }

    /// Writes what is queued, then STOP, and waits for the writer thread.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for CaptureFile {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn open_capture(path: &Path) -> Result<CaptureWriter<BufWriter<File>>> {
    let context = || format!("creating capture file {}", path.display());
    let file = File::create(path).map_err(Error::io(context()))?;
    CaptureWriter::new(BufWriter::new(file)).map_err(Error::io(context()))
}

fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

fn write_loop(
    path: &Path,
    max_bytes: u64,
    mut writer: CaptureWriter<BufWriter<File>>,
    rx: &mpsc::Receiver<Bytes>,
) {
    for frame in rx {
        if writer.bytes_written() + 4 + frame.len() as u64 + STOP_LEN > max_bytes {
            let rotation = writer
                .finish()
                .map_err(Error::io("finishing capture file"))
                .and_then(|_| {
                    fs::rename(path, rotated(path)).map_err(Error::io("rotating capture file"))
                })
                .and_then(|()| open_capture(path));
            match rotation {
                Ok(w) => writer = w,
                Err(error) => {
                    tracing::error!(%error, "capture stopped");
                    return;
                }
            }
        }
        if let Err(error) = writer.write_frame(&frame) {
            tracing::error!(%error, "capture stopped");
            return;
        }
    }
    if let Err(error) = writer.finish() {
        tracing::warn!(%error, "capture file not finished cleanly");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dnsflow_dnstap::{capture::CaptureReader, dnstap::client_response_frame};
    use std::time::UNIX_EPOCH;

    /// A client response frame for `a.test` A 192.0.2.1.
    fn frame() -> Vec<u8> {
        let mut m = vec![0, 1, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        m.extend([1, b'a', 4, b't', b'e', b's', b't', 0, 0, 1, 0, 1]);
        m.extend([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
        client_response_frame(Some(b"ns1"), &[10, 0, 0, 7], &m, UNIX_EPOCH)
    }

    #[test]
    fn capture_file_rotates_at_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tap.fstrm");
        let one = frame();
        // Room for START (42 bytes), three frames and STOP.
        let bound = 60 + 3 * (one.len() as u64 + 4);
        let sink = CaptureFile::create(&path, bound).unwrap();
        for _ in 0..5 {
            assert!(sink.offer(Bytes::from(one.clone())));
        }
        sink.close();
        let count = |p: &Path| {
            CaptureReader::new(File::open(p).unwrap())
                .filter(std::result::Result::is_ok)
                .count()
        };
        assert_eq!(count(&rotated(&path)), 3);
        assert_eq!(count(&path), 2);
    }
}

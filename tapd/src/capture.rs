//! Frame Streams capture files: the format `fstrm_capture` writes (a unidirectional START carrying the
//! content type, data frames, STOP).
//!
//! [`CaptureWriter`] writes one; [`CaptureFile`] is tapd's `--capture` sink (a writer thread behind a
//! bounded queue, rotating at a size bound so the disk use stays bounded); [`CaptureReader`] turns a
//! capture back into [`DnsResponse`]s for replay.

use crate::{
    dnstap::{self, Decoded},
    error::{Error, Result},
    event::DnsResponse,
    framestream::{self, Control, Decoder, Output},
};
use bytes::{Bytes, BytesMut};
use dnsflow_proto::DNSTAP_CONTENT_TYPE;
use std::{
    fs::{self, File},
    io::{self, BufWriter, Read, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread,
    time::SystemTime,
};

/// Read size for capture files: large enough to amortize syscalls, small enough to stay cheap.
const READ_CHUNK: usize = 64 * 1024;
/// Frames waiting for the capture thread; beyond this they are dropped (and counted) rather than
/// slowing the dnstap reader down.
const CAPTURE_QUEUE: usize = 8192;
/// A STOP control frame: escape, length, type.
const STOP_LEN: u64 = 12;

/// Writes a Frame Streams file: START (with the dnstap content type) on creation, then data frames,
/// then STOP on [`CaptureWriter::finish`].
#[derive(Debug)]
pub struct CaptureWriter<W: Write> {
    out: W,
    scratch: BytesMut,
    written: u64,
}

impl<W: Write> CaptureWriter<W> {
    /// Writes the START control frame.
    pub fn new(mut out: W) -> io::Result<Self> {
        let start =
            framestream::encode_control(Control::Start, Some(DNSTAP_CONTENT_TYPE.as_bytes()));
        out.write_all(&start)?;
        Ok(Self {
            out,
            scratch: BytesMut::new(),
            written: start.len() as u64,
        })
    }

    /// Writes one data frame (a dnstap protobuf message). An empty frame cannot be written: its zero
    /// length would read as the escape of a control frame.
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        if frame.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty Frame Streams data frame",
            ));
        }
        self.scratch.clear();
        framestream::encode_data(frame, &mut self.scratch);
        self.out.write_all(&self.scratch)?;
        self.written += self.scratch.len() as u64;
        Ok(())
    }

    /// Bytes written so far, START included.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Writes STOP, flushes, and hands the output back.
    pub fn finish(mut self) -> io::Result<W> {
        self.out
            .write_all(&framestream::encode_control(Control::Stop, None))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// What a [`CaptureReader`] has seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Data frames read.
    pub frames: u64,
    /// Client responses yielded.
    pub events: u64,
    /// dnstap messages of another kind (queries, forwarder traffic), skipped.
    pub skipped: u64,
    /// Frames that did not decode (each yielded as an `Err`).
    pub decode_errors: u64,
}

/// Reads a Frame Streams file of dnstap and yields its client responses, numbered from 1.
///
/// A frame that does not decode yields an `Err` and reading goes on; a framing error (including a file
/// cut in the middle of a frame) or an I/O error yields one `Err` and ends the iteration.
#[derive(Debug)]
pub struct CaptureReader<R: Read> {
    input: R,
    decoder: Decoder,
    chunk: Box<[u8]>,
    stats: CaptureStats,
    ended: bool,
}

impl<R: Read> CaptureReader<R> {
    pub fn new(input: R) -> Self {
        Self {
            input,
            decoder: Decoder::dnstap(),
            chunk: vec![0; READ_CHUNK].into_boxed_slice(),
            stats: CaptureStats::default(),
            ended: false,
        }
    }

    pub fn stats(&self) -> CaptureStats {
        self.stats
    }

    fn end(&mut self, err: Option<Error>) -> Option<Result<DnsResponse>> {
        self.ended = true;
        err.map(Err)
    }

    fn on_frame(&mut self, frame: &[u8]) -> Option<Result<DnsResponse>> {
        self.stats.frames += 1;
        match dnstap::decode(frame, "", SystemTime::now()) {
            Ok(Decoded::Response(mut r)) => {
                self.stats.events += 1;
                r.sequence = self.stats.events;
                Some(Ok(r))
            }
            Ok(Decoded::Ignored) => {
                self.stats.skipped += 1;
                None
            }
            Err(e) => {
                self.stats.decode_errors += 1;
                Some(Err(e.into()))
            }
        }
    }
}

impl<R: Read> Iterator for CaptureReader<R> {
    type Item = Result<DnsResponse>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.ended {
            match self.decoder.poll() {
                Err(e) => return self.end(Some(e.into())),
                Ok(Some(Output::Data(frame))) => {
                    if let Some(item) = self.on_frame(&frame) {
                        return Some(item);
                    }
                }
                // A capture is unidirectional; a recorded handshake needs no answer.
                Ok(Some(Output::Reply(_))) => {}
                Ok(Some(Output::Finished)) => return self.end(None),
                Ok(None) => match self.input.read(&mut self.chunk) {
                    Ok(0) => {
                        let err = self.decoder.finish_input().err().map(Error::from);
                        return self.end(err);
                    }
                    Ok(n) => self.decoder.push(&self.chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return self.end(Some(Error::io("reading capture")(e))),
                },
            }
        }
        None
    }
}

/// tapd's `--capture` sink: frames are queued (never waiting) to a thread that writes them to `path`,
/// moving a full file to `<path>.1` (replacing the previous one) once it reaches `max_bytes`.
#[derive(Debug)]
pub struct CaptureFile {
    tx: Option<mpsc::SyncSender<Bytes>>,
    thread: Option<thread::JoinHandle<()>>,
    dropped: Arc<AtomicU64>,
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
            dropped: Arc::default(),
        })
    }

    /// Queues a frame; returns false (and counts it) when the writer is behind.
    pub fn offer(&self, frame: Bytes) -> bool {
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(frame).is_ok());
        if !sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// Frames dropped because the writer was behind or gone.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
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
    use crate::dnstap::client_response_frame;
    use std::time::UNIX_EPOCH;

    /// A minimal NOERROR response to `a.test` A with one address.
    fn dns_answer(last_octet: u8) -> Vec<u8> {
        let mut m = vec![0, 1, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        m.extend([1, b'a', 4, b't', b'e', b's', b't', 0, 0, 1, 0, 1]);
        m.extend([
            0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, last_octet,
        ]);
        m
    }

    fn frame(last_octet: u8) -> Vec<u8> {
        client_response_frame(
            Some(b"ns1"),
            &[10, 0, 0, 7],
            &dns_answer(last_octet),
            UNIX_EPOCH,
        )
    }

    #[test]
    fn writer_output_reads_back_with_skips_and_errors_counted() {
        let mut w = CaptureWriter::new(Vec::new()).unwrap();
        w.write_frame(&frame(1)).unwrap();
        w.write_frame(b"\xff\xffnot protobuf").unwrap();
        let query = dnsflow_proto::dnstap::Dnstap {
            r#type: 1,
            message: Some(dnsflow_proto::dnstap::Message {
                r#type: 5,
                ..Default::default()
            }),
            ..Default::default()
        };
        w.write_frame(&prost::Message::encode_to_vec(&query))
            .unwrap();
        w.write_frame(&frame(2)).unwrap();
        let bytes = w.finish().unwrap();

        let mut reader = CaptureReader::new(bytes.as_slice());
        let items: Vec<_> = reader.by_ref().collect();
        assert_eq!(items.len(), 3);
        let first = items[0].as_ref().unwrap();
        assert_eq!(first.qname.as_str(), "a.test");
        assert_eq!(first.client.to_string(), "10.0.0.7");
        assert_eq!(first.answers[0].ip.to_string(), "192.0.2.1");
        assert_eq!(first.server_identity, "ns1");
        assert_eq!(first.sequence, 1);
        assert!(matches!(items[1], Err(Error::Decode(_))));
        let last = items[2].as_ref().unwrap();
        assert_eq!(
            (last.answers[0].ip.to_string(), last.sequence),
            ("192.0.2.2".into(), 2)
        );
        assert_eq!(
            reader.stats(),
            CaptureStats {
                frames: 4,
                events: 2,
                skipped: 1,
                decode_errors: 1
            }
        );
    }

    #[test]
    fn a_cut_file_yields_its_frames_then_one_framing_error() {
        let mut w = CaptureWriter::new(Vec::new()).unwrap();
        w.write_frame(&frame(1)).unwrap();
        w.write_frame(&frame(2)).unwrap();
        let bytes = w.finish().unwrap();
        let cut = &bytes[..bytes.len() - 20];
        let items: Vec<_> = CaptureReader::new(cut).collect();
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok());
        assert!(matches!(
            items[1],
            Err(Error::Frame(framestream::FrameError::Truncated))
        ));
        // Not a capture at all: one error, then the end.
        let items: Vec<_> = CaptureReader::new(&b"\x00\x00\x00\x05hello"[..]).collect();
        assert_eq!(items.len(), 1);
        assert!(matches!(items[0], Err(Error::Frame(_))));
    }

    #[test]
    fn fstrm_capture_style_file_without_stop_is_read_whole() {
        let mut w = CaptureWriter::new(Vec::new()).unwrap();
        w.write_frame(&frame(9)).unwrap();
        let bytes = w.finish().unwrap();
        let no_stop = &bytes[..bytes.len() - 12];
        let items: Vec<_> = CaptureReader::new(no_stop).collect();
        assert_eq!(items.len(), 1);
        assert!(items[0].is_ok());
    }

    #[test]
    fn capture_file_rotates_at_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tap.fstrm");
        let one = frame(1);
        // Room for START (42 bytes), three frames and STOP.
        let bound = 60 + 3 * (one.len() as u64 + 4);
        let sink = CaptureFile::create(&path, bound).unwrap();
        for _ in 0..5 {
            assert!(sink.offer(Bytes::from(one.clone())));
        }
        sink.close();
        let count = |p: &Path| {
            CaptureReader::new(File::open(p).unwrap())
                .filter(Result::is_ok)
                .count()
        };
        assert_eq!(count(&rotated(&path)), 3);
        assert_eq!(count(&path), 2);
    }
}

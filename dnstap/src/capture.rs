//! Frame Streams capture files: the format `fstrm_capture` writes (a unidirectional START carrying the
//! content type, data frames, STOP).
//!
//! [`CaptureWriter`] writes one; [`CaptureReader`] turns a capture back into [`DnsResponse`]s for
//! replay.

use crate::{
    dnstap::{self, Decoded},
    error::{Error, Result},
    event::DnsResponse,
    framestream::{self, Control, Decoder, Output},
};
use bytes::BytesMut;
use dnsflow_proto::DNSTAP_CONTENT_TYPE;
use std::{
    io::{self, Read, Write},
    time::SystemTime,
};

/// Read size for capture files: large enough to amortize syscalls, small enough to stay cheap.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes a STOP control frame adds on [`CaptureWriter::finish`]: escape, length, type.
pub const STOP_LEN: u64 = 12;

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
            Ok(Decoded::Response {
                response: mut r, ..
            }) => {
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
}

//! Frame Streams (the transport dnstap senders speak), as a sans-IO state machine.
//!
//! [`Decoder`] takes bytes as they arrive and hands back data frames plus the control replies the
//! caller must write; it never touches a socket, so the socket task, the capture-file reader, the tests
//! and the fuzz target all drive the same code. The mode is decided by the first control frame: READY
//! starts the bidirectional handshake (READY → ACCEPT → START → data… → STOP → FINISH), START starts a
//! unidirectional stream (START → data… → STOP), as files and some senders use.
//!
//! Wire format: a data frame is a 32-bit big-endian length followed by that many bytes. A zero length
//! escapes a control frame: its own 32-bit length, a 32-bit type, then fields `[type][len][bytes]`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The specification caps control frames at 512 bytes; anything longer is hostile.
pub const MAX_CONTROL_FRAME: usize = 512;
/// The specification caps a content type at 256 bytes.
pub const MAX_CONTENT_TYPE: usize = 256;
/// Default data-frame cap: a dnstap frame holds at most a query and a response of 64 KiB each, plus
/// a little protobuf framing.
pub const DEFAULT_MAX_DATA_FRAME: usize = 256 * 1024;

const CONTROL_ACCEPT: u32 = 1;
const CONTROL_START: u32 = 2;
const CONTROL_STOP: u32 = 3;
const CONTROL_READY: u32 = 4;
const CONTROL_FINISH: u32 = 5;
const FIELD_CONTENT_TYPE: u32 = 1;

/// A Frame Streams control frame type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Accept,
    Start,
    Stop,
    Ready,
    Finish,
}

impl Control {
    fn code(self) -> u32 {
        match self {
            Self::Accept => CONTROL_ACCEPT,
            Self::Start => CONTROL_START,
            Self::Stop => CONTROL_STOP,
            Self::Ready => CONTROL_READY,
            Self::Finish => CONTROL_FINISH,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            CONTROL_ACCEPT => Self::Accept,
            CONTROL_START => Self::Start,
            CONTROL_STOP => Self::Stop,
            CONTROL_READY => Self::Ready,
            CONTROL_FINISH => Self::Finish,
            _ => return None,
        })
    }
}

/// Why a Frame Streams byte stream is refused. Each error ends the stream it came from, nothing else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("control frame of {0} bytes exceeds {MAX_CONTROL_FRAME}")]
    ControlTooLarge(u32),
    #[error("data frame of {len} bytes exceeds the cap of {max}")]
    DataTooLarge { len: u32, max: usize },
    #[error("malformed control frame: {0}")]
    MalformedControl(&'static str),
    #[error("unknown control frame type {0}")]
    UnknownControl(u32),
    #[error("unexpected {got:?} control frame while {state}")]
    UnexpectedControl { got: Control, state: &'static str },
    #[error("data frame before START")]
    DataBeforeStart,
    #[error("content type {0:?} refused")]
    WrongContentType(String),
    #[error("stream ends in the middle of a frame")]
    Truncated,
}

/// What the caller must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A data frame's payload.
    Data(Bytes),
    /// Control bytes to write back to the sender (ACCEPT, FINISH).
    Reply(Bytes),
    /// The sender stopped cleanly; the stream is over (write any reply first).
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing yet: READY or START decides the mode.
    Opening,
    /// Bidirectional, ACCEPT sent, waiting for START.
    Accepted,
    /// Data frames flow until STOP.
    Streaming { bidirectional: bool },
    /// STOP seen; FINISH queued when bidirectional.
    Stopped { finish_pending: bool },
    /// Finished reported, or an error seen: nothing more is read.
    Done,
}

impl State {
    fn describe(self) -> &'static str {
        match self {
            Self::Opening => "opening",
            Self::Accepted => "waiting for START",
            Self::Streaming { .. } => "streaming",
            Self::Stopped { .. } | Self::Done => "stopped",
        }
    }
}

/// The receiving side of a Frame Streams connection or file.
#[derive(Debug)]
pub struct Decoder {
    content_type: Bytes,
    max_data_frame: usize,
    buf: BytesMut,
    state: State,
}

impl Decoder {
    /// A decoder that only accepts `content_type` and refuses data frames longer than `max_data_frame`.
    pub fn new(content_type: &str, max_data_frame: usize) -> Self {
        Self {
            content_type: Bytes::copy_from_slice(content_type.as_bytes()),
            max_data_frame,
            buf: BytesMut::new(),
            state: State::Opening,
        }
    }

    /// A decoder for dnstap with the default data-frame cap.
    pub fn dnstap() -> Self {
        Self::new(dnsflow_proto::DNSTAP_CONTENT_TYPE, DEFAULT_MAX_DATA_FRAME)
    }

    /// Appends received bytes. Call [`Decoder::poll`] until it returns `Ok(None)` before pushing more,
    /// so that the buffer never holds more than one partial frame plus one read.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The receive buffer, so that a socket can read straight into it (`AsyncReadExt::read_buf`)
    /// instead of going through [`Decoder::push`]; the same rule applies: poll until `Ok(None)` after
    /// each read.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes received but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// True once the stream is over (cleanly or by an error).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// True once START was seen: the handshake is over.
    pub fn is_started(&self) -> bool {
        !matches!(self.state, State::Opening | State::Accepted)
    }

    /// Whether the sender opened with the bidirectional handshake.
    pub fn is_bidirectional(&self) -> bool {
        matches!(
            self.state,
            State::Accepted
                | State::Streaming {
                    bidirectional: true
                }
        )
    }

    /// Checks that the input ended at a frame boundary. EOF without STOP is normal (senders are
    /// restarted or reloaded without saying goodbye); EOF inside a frame is not.
    pub fn finish_input(&mut self) -> Result<(), FrameError> {
        let clean = self.buf.is_empty() || self.state == State::Done;
        self.state = State::Done;
        self.buf.clear();
        if clean {
            Ok(())
        } else {
            Err(FrameError::Truncated)
        }
    }

    /// The next thing to act on, or `Ok(None)` when more bytes are needed. After an error the decoder
    /// is done: the caller drops the stream.
    pub fn poll(&mut self) -> Result<Option<Output>, FrameError> {
        let result = self.step();
        if result.is_err() {
            self.state = State::Done;
            self.buf.clear();
        }
        result
    }

    fn step(&mut self) -> Result<Option<Output>, FrameError> {
        match self.state {
            State::Done => return Ok(None),
            State::Stopped { finish_pending } => {
                self.state = State::Done;
                if finish_pending {
                    return Ok(Some(Output::Reply(encode_control(Control::Finish, None))));
                }
                return Ok(Some(Output::Finished));
            }
            _ => {}
        }
        let Some(len) = peek_u32(&self.buf, 0) else {
            return Ok(None);
        };
        if len != 0 {
            if !matches!(self.state, State::Streaming { .. }) {
                return Err(FrameError::DataBeforeStart);
            }
            let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
            if len_usize > self.max_data_frame {
                return Err(FrameError::DataTooLarge {
                    len,
                    max: self.max_data_frame,
                });
            }
            if self.buf.len() < 4 + len_usize {
                return Ok(None);
            }
            self.buf.advance(4);
            return Ok(Some(Output::Data(self.buf.split_to(len_usize).freeze())));
        }
        let Some(ctl_len) = peek_u32(&self.buf, 4) else {
            return Ok(None);
        };
        let ctl_usize = usize::try_from(ctl_len).unwrap_or(usize::MAX);
        if ctl_usize > MAX_CONTROL_FRAME {
            return Err(FrameError::ControlTooLarge(ctl_len));
        }
        if self.buf.len() < 8 + ctl_usize {
            return Ok(None);
        }
        self.buf.advance(8);
        let frame = self.buf.split_to(ctl_usize).freeze();
        let (control, content_types) = parse_control(&frame)?;
        self.on_control(control, &content_types)
    }

    fn on_control(
        &mut self,
        control: Control,
        content_types: &[Bytes],
    ) -> Result<Option<Output>, FrameError> {
        let unexpected = |state: State| FrameError::UnexpectedControl {
            got: control,
            state: state.describe(),
        };
        match (self.state, control) {
            (State::Opening, Control::Ready) => {
                if !content_types.contains(&self.content_type) {
                    return Err(self.refuse(content_types));
                }
                self.state = State::Accepted;
                Ok(Some(Output::Reply(encode_control(
                    Control::Accept,
                    Some(&self.content_type),
                ))))
            }
            (State::Opening | State::Accepted, Control::Start) => {
                // A START may omit the content type (libfstrm writers without one); a different one is
                // refused.
                if !content_types.is_empty() && !content_types.contains(&self.content_type) {
                    return Err(self.refuse(content_types));
                }
                let bidirectional = self.state == State::Accepted;
                self.state = State::Streaming { bidirectional };
                self.step()
            }
            (State::Streaming { bidirectional }, Control::Stop) => {
                self.state = State::Stopped {
                    finish_pending: bidirectional,
                };
                self.step()
            }
            (state, _) => Err(unexpected(state)),
        }
    }

    fn refuse(&self, offered: &[Bytes]) -> FrameError {
        let offered: Vec<String> = offered
            .iter()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        FrameError::WrongContentType(offered.join(","))
    }
}

fn peek_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

/// Parses a control frame's body (after the escape and length): its type and content types.
fn parse_control(mut frame: &[u8]) -> Result<(Control, Vec<Bytes>), FrameError> {
    if frame.len() < 4 {
        return Err(FrameError::MalformedControl("shorter than its type"));
    }
    let code = frame.get_u32();
    let control = Control::from_code(code).ok_or(FrameError::UnknownControl(code))?;
    let mut content_types = Vec::new();
    while !frame.is_empty() {
        if frame.len() < 8 {
            return Err(FrameError::MalformedControl("truncated field header"));
        }
        let field = frame.get_u32();
        let len = usize::try_from(frame.get_u32()).unwrap_or(usize::MAX);
        if len > frame.len() {
            return Err(FrameError::MalformedControl("field longer than the frame"));
        }
        if field == FIELD_CONTENT_TYPE {
            if len > MAX_CONTENT_TYPE {
                return Err(FrameError::MalformedControl("content type too long"));
            }
            content_types.push(Bytes::copy_from_slice(&frame[..len]));
        }
        frame.advance(len);
    }
    Ok((control, content_types))
}

/// Encodes a control frame (escape, length, type, and an optional content-type field).
pub fn encode_control(control: Control, content_type: Option<&[u8]>) -> Bytes {
    let field_len = content_type.map_or(0, |c| 8 + c.len());
    let mut out = BytesMut::with_capacity(12 + field_len);
    out.put_u32(0);
    out.put_u32(u32::try_from(4 + field_len).unwrap_or(u32::MAX));
    out.put_u32(control.code());
    if let Some(c) = content_type {
        out.put_u32(FIELD_CONTENT_TYPE);
        out.put_u32(u32::try_from(c.len()).unwrap_or(u32::MAX));
        out.put_slice(c);
    }
    out.freeze()
}

/// Appends a data frame (length prefix and payload) to `out`. Payloads are dnstap messages, far below
/// the 4 GiB a length prefix can express.
pub fn encode_data(payload: &[u8], out: &mut BytesMut) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.reserve(4 + payload.len());
    out.put_u32(len);
    out.put_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &[u8] = b"protobuf:dnstap.Dnstap";

    fn drain(d: &mut Decoder) -> Result<Vec<Output>, FrameError> {
        let mut out = Vec::new();
        while let Some(o) = d.poll()? {
            out.push(o);
        }
        Ok(out)
    }

    fn data(payload: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_data(payload, &mut b);
        b.to_vec()
    }

    #[test]
    fn bidirectional_handshake_echoes_the_content_type() {
        let mut d = Decoder::dnstap();
        d.push(&encode_control(Control::Ready, Some(b"other")));
        // READY may offer several types; ours is picked.
        let mut ready = BytesMut::new();
        ready.put_u32(0);
        ready.put_u32(4 + 8 + 5 + 8 + u32::try_from(CT.len()).unwrap());
        ready.put_u32(CONTROL_READY);
        ready.put_u32(FIELD_CONTENT_TYPE);
        ready.put_u32(5);
        ready.put_slice(b"other");
        ready.put_u32(FIELD_CONTENT_TYPE);
        ready.put_u32(u32::try_from(CT.len()).unwrap());
        ready.put_slice(CT);
        let mut d2 = Decoder::dnstap();
        d2.push(&ready);
        assert_eq!(
            drain(&mut d2).unwrap(),
            vec![Output::Reply(encode_control(Control::Accept, Some(CT)))]
        );
        assert!(d2.is_bidirectional());
        d2.push(&encode_control(Control::Start, Some(CT)));
        d2.push(&data(b"one"));
        d2.push(&data(b"two"));
        d2.push(&encode_control(Control::Stop, None));
        assert_eq!(
            drain(&mut d2).unwrap(),
            vec![
                Output::Data(Bytes::from_static(b"one")),
                Output::Data(Bytes::from_static(b"two")),
                Output::Reply(encode_control(Control::Finish, None)),
            ]
        );
        assert!(d2.is_done());
        // The first decoder got a READY without our content type: refused.
        assert_eq!(
            drain(&mut d),
            Err(FrameError::WrongContentType("other".into()))
        );
    }

    #[test]
    fn unidirectional_stream_byte_by_byte() {
        let mut bytes = encode_control(Control::Start, Some(CT)).to_vec();
        bytes.extend(data(b"hello"));
        bytes.extend(data(&[7; 300]));
        bytes.extend(encode_control(Control::Stop, None));
        let mut d = Decoder::dnstap();
        let mut out = Vec::new();
        for b in bytes {
            d.push(&[b]);
            out.extend(drain(&mut d).unwrap());
        }
        assert_eq!(
            out,
            vec![
                Output::Data(Bytes::from_static(b"hello")),
                Output::Data(Bytes::from(vec![7; 300])),
                Output::Finished,
            ]
        );
        assert!(!d.is_bidirectional());
        assert_eq!(d.finish_input(), Ok(()));
    }

    #[test]
    fn eof_without_stop_is_normal_but_mid_frame_is_truncated() {
        let mut d = Decoder::dnstap();
        d.push(&encode_control(Control::Start, Some(CT)));
        d.push(&data(b"x"));
        assert_eq!(drain(&mut d).unwrap().len(), 1);
        assert_eq!(d.finish_input(), Ok(()));

        let mut d = Decoder::dnstap();
        d.push(&encode_control(Control::Start, Some(CT)));
        d.push(&data(b"xyz")[..5]);
        assert_eq!(drain(&mut d).unwrap(), vec![]);
        assert_eq!(d.finish_input(), Err(FrameError::Truncated));
    }

    #[test]
    fn hostile_lengths_are_refused_before_buffering() {
        let mut d = Decoder::dnstap();
        d.push(&encode_control(Control::Start, Some(CT)));
        d.push(&u32::MAX.to_be_bytes());
        assert_eq!(
            drain(&mut d),
            Err(FrameError::DataTooLarge {
                len: u32::MAX,
                max: DEFAULT_MAX_DATA_FRAME
            })
        );
        assert!(d.is_done());
        assert_eq!(d.poll(), Ok(None));

        let mut d = Decoder::dnstap();
        d.push(&[0, 0, 0, 0, 0, 0, 2, 1]);
        assert_eq!(drain(&mut d), Err(FrameError::ControlTooLarge(513)));
    }

    #[test]
    fn protocol_violations() {
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            (data(b"early"), FrameError::DataBeforeStart),
            (
                encode_control(Control::Start, Some(b"protobuf:other")).to_vec(),
                FrameError::WrongContentType("protobuf:other".into()),
            ),
            (
                encode_control(Control::Stop, None).to_vec(),
                FrameError::UnexpectedControl {
                    got: Control::Stop,
                    state: "opening",
                },
            ),
            (
                vec![0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 9],
                FrameError::UnknownControl(9),
            ),
            (
                vec![0, 0, 0, 0, 0, 0, 0, 2, 0, 0],
                FrameError::MalformedControl("shorter than its type"),
            ),
            (
                vec![0, 0, 0, 0, 0, 0, 0, 12, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 1, 0],
                FrameError::MalformedControl("field longer than the frame"),
            ),
        ];
        for (bytes, want) in cases {
            let mut d = Decoder::dnstap();
            d.push(&bytes);
            assert_eq!(drain(&mut d), Err(want), "{bytes:?}");
        }
        // A START without a content type is accepted, and a second START is not.
        let mut d = Decoder::dnstap();
        d.push(&encode_control(Control::Start, None));
        d.push(&encode_control(Control::Start, None));
        assert!(matches!(
            drain(&mut d),
            Err(FrameError::UnexpectedControl {
                got: Control::Start,
                ..
            })
        ));
    }

    #[test]
    fn data_frame_cap_is_configurable() {
        let mut d = Decoder::new("protobuf:dnstap.Dnstap", 4);
        d.push(&encode_control(Control::Start, Some(CT)));
        d.push(&data(b"four"));
        d.push(&data(b"fives"));
        assert_eq!(
            d.poll(),
            Ok(Some(Output::Data(Bytes::from_static(b"four"))))
        );
        assert_eq!(d.poll(), Err(FrameError::DataTooLarge { len: 5, max: 4 }));
    }
}

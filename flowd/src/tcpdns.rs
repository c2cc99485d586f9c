//! DNS over TCP, followed in br-int: the replies a trusted resolver sends a pod over TCP (an answer
//! too large for UDP comes truncated, and the pod's resolver asks again over TCP) arrive as segments
//! that flowd holds one by one. [`Streams`] puts each connection's bytes back in order and cuts them
//! into DNS messages (each framed by a two-byte length, RFC 1035 §4.2.2), so that the segment that
//! completes a message can wait for the grants that message justifies, like a UDP reply.
//!
//! Sans-IO: segments in, completed messages out. Everything here comes from the network and is
//! bounded: bytes waiting per connection, connections per pod and on the node, and an idle timeout.
//! A stream flowd cannot follow (its start was not seen, a gap wider than the buffer, a message that
//! does not fit) is given up and counted; its segments go on untouched.

use dnsflow_dnstap::packet::TcpSegment;
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

/// Bytes one connection may keep waiting: a whole DNS message of the largest size (65,535 and its
/// length), in order or not.
pub const MAX_STREAM_BYTES: usize = 65_537;
/// Connections followed per pod: a resolver that truncates sends each question to TCP once, and a
/// pod's stub keeps a handful open at most.
pub const MAX_STREAMS_PER_POD: usize = 16;
/// Connections followed on the node.
pub const MAX_STREAMS: usize = 4_096;
/// Segments one connection may keep ahead of the next byte expected (each is looked through when a
/// gap closes).
const MAX_AHEAD: usize = 64;
/// A connection with no segment for this long is forgotten (a resolver closes idle TCP sooner).
pub const IDLE: Duration = Duration::from_secs(30);
/// How often idle connections are looked for.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// Why a segment was not followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unfollowed {
    /// Data of a connection whose start (the resolver's SYN-ACK) flowd did not see.
    NoStart,
    /// The pod, or the node, has as many connections followed as it may.
    TooManyStreams,
    /// More bytes waiting than [`MAX_STREAM_BYTES`], or more segments than flowd keeps ahead of a
    /// gap: the connection is given up.
    TooMuchWaiting,
}

/// What one segment did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Followed {
    /// The DNS messages this segment completed, in stream order, without their lengths.
    pub messages: Vec<Vec<u8>>,
    /// Set when the segment belongs to a stream flowd does not (or no longer) follow.
    pub unfollowed: Option<Unfollowed>,
}

#[derive(Debug)]
struct Stream {
    /// The sequence number of the next byte in order.
    next: u32,
    /// Bytes in order from the start of the message being read.
    buf: Vec<u8>,
    /// Segments ahead of `next`, by sequence number.
    ahead: BTreeMap<u32, Vec<u8>>,
    waiting: usize,
    last: Instant,
}

impl Stream {
    fn new(next: u32, now: Instant) -> Self {
        Self {
            next,
            buf: Vec::new(),
            ahead: BTreeMap::new(),
            waiting: 0,
            last: now,
        }
    }

    /// Takes `payload` at `seq`; returns the messages completed, or why the stream is given up.
    fn take(&mut self, seq: u32, payload: &[u8]) -> Result<Vec<Vec<u8>>, Unfollowed> {
        // Signed distance from the next byte expected, sequence numbers wrapping.
        let offset = seq.wrapping_sub(self.next) as i32;
        if offset > 0 {
            if !payload.is_empty() && !self.ahead.contains_key(&seq) {
                self.waiting += payload.len();
                if self.waiting > MAX_STREAM_BYTES || self.ahead.len() >= MAX_AHEAD {
                    return Err(Unfollowed::TooMuchWaiting);
                }
                self.ahead.insert(seq, payload.to_vec());
            }
            return Ok(Vec::new());
        }
        // A retransmission, or a segment overlapping what was read: only its new bytes count.
        let old = offset.unsigned_abs() as usize;
        if old < payload.len() {
            self.append(&payload[old..])?;
        }
        // What waited ahead and now follows on.
        while let Some((&at, _)) = self
            .ahead
            .iter()
            .find(|(at, _)| (at.wrapping_sub(self.next) as i32) <= 0)
        {
            let bytes = self.ahead.remove(&at).unwrap_or_default();
            self.waiting -= bytes.len();
            let old = self.next.wrapping_sub(at) as usize;
            if old < bytes.len() {
                self.append(&bytes[old..])?;
            }
        }
        Ok(self.messages())
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), Unfollowed> {
        if self.buf.len() + bytes.len() + self.waiting > MAX_STREAM_BYTES {
            return Err(Unfollowed::TooMuchWaiting);
        }
        self.buf.extend_from_slice(bytes);
        self.next = self.next.wrapping_add(bytes.len() as u32);
        Ok(())
    }

    /// The whole messages at the front of `buf`, cut off it.
    fn messages(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(len) = self.buf.get(at..at + 2) {
            let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
            let Some(message) = self.buf.get(at + 2..at + 2 + len) else {
                break;
            };
            out.push(message.to_vec());
            at += 2 + len;
        }
        self.buf.drain(..at);
        out
    }
}

/// The DNS-over-TCP connections flowd follows, by (server, client).
#[derive(Debug, Default)]
pub struct Streams {
    streams: HashMap<(SocketAddr, SocketAddr), Stream>,
    per_pod: HashMap<IpAddr, usize>,
    pruned: Option<Instant>,
}

impl Streams {
    /// Follows `seg`, which arrived at `now`.
    pub fn on_segment(&mut self, seg: &TcpSegment, now: Instant) -> Followed {
        self.prune(now);
        let key = (seg.server, seg.client);
        if seg.rst {
            self.remove(&key);
            return Followed::default();
        }
        if seg.syn {
            // The resolver's SYN-ACK: data starts at the byte after it.
            let next = seg.seq.wrapping_add(1);
            if let Some(s) = self.streams.get_mut(&key) {
                *s = Stream::new(next, now);
            } else {
                let pod = self.per_pod.get(&seg.client.ip()).copied().unwrap_or(0);
                if pod >= MAX_STREAMS_PER_POD || self.streams.len() >= MAX_STREAMS {
                    return Followed {
                        messages: Vec::new(),
                        unfollowed: Some(Unfollowed::TooManyStreams),
                    };
                }
                self.streams.insert(key, Stream::new(next, now));
                *self.per_pod.entry(seg.client.ip()).or_default() += 1;
            }
            return Followed::default();
        }
        let Some(stream) = self.streams.get_mut(&key) else {
            return Followed {
                messages: Vec::new(),
                unfollowed: (!seg.payload.is_empty()).then_some(Unfollowed::NoStart),
            };
        };
        stream.last = now;
        let result = stream.take(seg.seq, &seg.payload);
        let followed = match result {
            Ok(messages) => Followed {
                messages,
                unfollowed: None,
            },
            Err(why) => {
                self.remove(&key);
                return Followed {
                    messages: Vec::new(),
                    unfollowed: Some(why),
                };
            }
        };
        if seg.fin {
            self.remove(&key);
        }
        followed
    }

    /// Connections followed now.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    fn remove(&mut self, key: &(SocketAddr, SocketAddr)) {
        if self.streams.remove(key).is_some() {
            let ip = key.1.ip();
            if let Some(n) = self.per_pod.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.per_pod.remove(&ip);
                }
            }
        }
    }

    fn prune(&mut self, now: Instant) {
        if self
            .pruned
            .is_some_and(|t| now.saturating_duration_since(t) < PRUNE_EVERY)
        {
            return;
        }
        self.pruned = Some(now);
        let idle: Vec<_> = self
            .streams
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last) >= IDLE)
            .map(|(k, _)| *k)
            .collect();
        for key in &idle {
            self.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SERVER: &str = "10.96.0.10:53";

    fn seg(client_port: u16, seq: u32, payload: &[u8]) -> TcpSegment {
        TcpSegment {
            server: SERVER.parse().unwrap(),
            client: SocketAddr::new([10, 244, 1, 5].into(), client_port),
            seq,
            syn: false,
            fin: false,
            rst: false,
            payload: payload.to_vec(),
        }
    }

    fn syn_ack(client_port: u16, isn: u32) -> TcpSegment {
        TcpSegment {
            syn: true,
            ..seg(client_port, isn, &[])
        }
    }

    /// `message` framed with its length.
    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = (message.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(message);
        out
    }

    #[test]
    fn a_message_split_over_segments_completes_with_its_last_one() {
        let mut s = Streams::default();
        let now = Instant::now();
        assert_eq!(s.on_segment(&syn_ack(1, 999), now), Followed::default());
        let wire = framed(b"hello, world");
        assert!(s
            .on_segment(&seg(1, 1000, &wire[..1]), now)
            .messages
            .is_empty());
        assert!(s
            .on_segment(&seg(1, 1001, &wire[1..5]), now)
            .messages
            .is_empty());
        assert_eq!(
            s.on_segment(&seg(1, 1005, &wire[5..]), now).messages,
            [b"hello, world".to_vec()]
        );
    }

    #[test]
    fn several_messages_on_one_connection_and_in_one_segment() {
        let mut s = Streams::default();
        let now = Instant::now();
        s.on_segment(&syn_ack(1, 0), now);
        let mut wire = framed(b"one");
        wire.extend(framed(b"two"));
        wire.extend(framed(b"thr"));
        let cut = wire.len() - 2;
        assert_eq!(
            s.on_segment(&seg(1, 1, &wire[..cut]), now).messages,
            [b"one".to_vec(), b"two".to_vec()]
        );
        let last = s.on_segment(&seg(1, 1 + cut as u32, &wire[cut..]), now);
        assert_eq!(last.messages, [b"thr".to_vec()]);
    }

    #[test]
    fn retransmitted_and_out_of_order_segments_count_once() {
        let mut s = Streams::default();
        let now = Instant::now();
        // Sequence numbers wrap around in the middle of the message.
        let isn = u32::MAX - 3;
        s.on_segment(&syn_ack(7, isn), now);
        let first = isn.wrapping_add(1);
        let wire = framed(b"abcdefgh");
        // The second half first, then the first half twice, then an overlapping retransmission.
        assert!(s
            .on_segment(&seg(7, first.wrapping_add(5), &wire[5..]), now)
            .messages
            .is_empty());
        assert_eq!(
            s.on_segment(&seg(7, first, &wire[..5]), now).messages,
            [b"abcdefgh".to_vec()]
        );
        assert!(s
            .on_segment(&seg(7, first, &wire[..5]), now)
            .messages
            .is_empty());
        assert!(s
            .on_segment(&seg(7, first.wrapping_add(3), &wire[3..]), now)
            .messages
            .is_empty());
        // The next message follows on as usual.
        let next = first.wrapping_add(wire.len() as u32);
        assert_eq!(
            s.on_segment(&seg(7, next, &framed(b"z")), now).messages,
            [b"z".to_vec()]
        );
    }

    #[test]
    fn what_cannot_be_followed_is_let_go_and_said() {
        let mut s = Streams::default();
        let now = Instant::now();
        // Data with no SYN-ACK seen: not followed.
        assert_eq!(
            s.on_segment(&seg(1, 5, &framed(b"x")), now).unfollowed,
            Some(Unfollowed::NoStart)
        );
        // A gap wider than a message can be: given up, and not followed from then on.
        s.on_segment(&syn_ack(2, 0), now);
        let big = vec![0u8; 40_000];
        assert_eq!(s.on_segment(&seg(2, 30_000, &big), now).unfollowed, None);
        assert_eq!(
            s.on_segment(&seg(2, 70_001, &big), now).unfollowed,
            Some(Unfollowed::TooMuchWaiting)
        );
        assert_eq!(
            s.on_segment(&seg(2, 1, &framed(b"x")), now).unfollowed,
            Some(Unfollowed::NoStart)
        );
        // Per pod, then idle ones forgotten.
        for port in 100..100 + MAX_STREAMS_PER_POD as u16 {
            assert_eq!(s.on_segment(&syn_ack(port, 0), now).unfollowed, None);
        }
        assert_eq!(
            s.on_segment(&syn_ack(999, 0), now).unfollowed,
            Some(Unfollowed::TooManyStreams)
        );
        let later = now + IDLE;
        assert_eq!(s.on_segment(&syn_ack(999, 0), later).unfollowed, None);
        assert_eq!(s.len(), 1);
        // FIN and RST end a stream.
        s.on_segment(
            &TcpSegment {
                fin: true,
                ..seg(999, 1, &[])
            },
            later,
        );
        assert!(s.is_empty());
    }

    proptest! {
        /// However a stream of messages is cut into segments, reordered and repeated, each message
        /// comes out exactly once, whole and in order, and nothing panics (within the bounds: the
        /// unit test above covers one-byte segments).
        #[test]
        fn any_cut_order_and_repetition_gives_each_message_once(
            messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..6),
            // Segments of at least 32 bytes: at most 1,510 bytes make no more than MAX_AHEAD.
            cuts in proptest::collection::vec(32usize..200, 1..40),
            order in proptest::collection::vec(any::<u16>(), 0..40),
            isn in any::<u32>(),
        ) {
            let wire: Vec<u8> = messages.iter().flat_map(|m| framed(m)).collect();
            let mut segments = Vec::new();
            let (mut at, mut i) = (0, 0);
            while at < wire.len() {
                let len = cuts[i % cuts.len()].min(wire.len() - at);
                segments.push((at, len));
                at += len;
                i += 1;
            }
            // Each segment sent once in a shuffled order, some twice.
            let mut sent: Vec<(usize, usize)> = segments.clone();
            for (k, o) in order.iter().enumerate() {
                let n = sent.len();
                sent.swap(k % n, usize::from(*o) % n);
                if o % 3 == 0 {
                    sent.push(segments[usize::from(*o) % segments.len()]);
                }
            }
            let mut s = Streams::default();
            let now = Instant::now();
            s.on_segment(&syn_ack(1, isn), now);
            let mut out = Vec::new();
            for (at, len) in sent {
                let seq = isn.wrapping_add(1).wrapping_add(at as u32);
                let f = s.on_segment(&seg(1, seq, &wire[at..at + len]), now);
                prop_assert_eq!(f.unfollowed, None);
                out.extend(f.messages);
            }
            prop_assert_eq!(out, messages);
        }

        #[test]
        fn any_segment_is_followed_or_refused(
            seq in any::<u32>(),
            syn in any::<bool>(),
            fin in any::<bool>(),
            payload in proptest::collection::vec(any::<u8>(), 0..2000),
        ) {
            let mut s = Streams::default();
            let now = Instant::now();
            s.on_segment(&syn_ack(1, 0), now);
            let _ = s.on_segment(&TcpSegment { syn, fin, ..seg(1, seq, &payload) }, now);
        }
    }
}

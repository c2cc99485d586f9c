//! A DNS response taken from a packet on its way to the client: what OVS hands flowd when it holds
//! a pod's DNS answer (the Ethernet frame of an `NXT_PACKET_IN2`), read into the same
//! [`DnsResponse`] a dnstap `CLIENT_RESPONSE` gives. The client is the packet's destination.
//!
//! Only UDP from port 53 over IPv4 or IPv6 (VLAN tags allowed) is read; fragments, other transports
//! and anything that does not parse are refused with a [`PacketError`], never a panic: the frame is
//! from the network, and the caller lets a refused packet go on unheld.

use crate::{
    dnstap::{parse_response, DecodeError},
    event::DnsResponse,
};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use std::{
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

/// The DNS port: a response comes from it.
pub const DNS_PORT: u16 = 53;

/// Why a frame gives no DNS response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("not an Ethernet/IP frame: {0}")]
    Frame(String),
    #[error("not IPv4 or IPv6")]
    NotIp,
    #[error("a fragment: the DNS message is not whole in it")]
    Fragment,
    #[error("not UDP")]
    NotUdp,
    #[error("not TCP")]
    NotTcp,
    #[error("UDP from port {0}, not 53")]
    NotFromDns(u16),
    #[error(transparent)]
    Dns(#[from] DecodeError),
}

/// The IP destination of `frame` (the client a reply goes to), if it is an IP packet.
pub fn destination(frame: &[u8]) -> Option<IpAddr> {
    match SlicedPacket::from_ethernet(frame).ok()?.net? {
        NetSlice::Ipv4(ip) => Some(IpAddr::V4(ip.header().destination_addr())),
        NetSlice::Ipv6(ip) => Some(IpAddr::V6(ip.header().destination_addr())),
        _ => None,
    }
}

/// A DNS response read from a frame, with who sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub response: DnsResponse,
    /// Addresses left out beyond the cap.
    pub addresses_cut: usize,
    /// The packet's source: the server that answered, as the pod sees it (after conntrack undid
    /// a Service's DNAT, the Service's address and port).
    pub server: SocketAddr,
}

/// `frame` sliced, with its destination (the client) and source (the server): an unfragmented IP
/// packet, or the reason it is not one.
fn unfragmented(frame: &[u8]) -> Result<(SlicedPacket<'_>, IpAddr, IpAddr), PacketError> {
    let sliced =
        SlicedPacket::from_ethernet(frame).map_err(|e| PacketError::Frame(e.to_string()))?;
    let (client, server, fragmented) = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => (
            IpAddr::V4(ip.header().destination_addr()),
            IpAddr::V4(ip.header().source_addr()),
            ip.payload().fragmented,
        ),
        Some(NetSlice::Ipv6(ip)) => (
            IpAddr::V6(ip.header().destination_addr()),
            IpAddr::V6(ip.header().source_addr()),
            ip.payload().fragmented,
        ),
        _ => return Err(PacketError::NotIp),
    };
    if fragmented {
        return Err(PacketError::Fragment);
    }
    Ok((sliced, client, server))
}

/// The DNS response in `frame` and how many of its addresses were left out beyond the cap;
/// `server_identity` names the responder (the packet says only its address), `now` is stamped as
/// both the response and the decode time.
pub fn response(
    frame: &[u8],
    server_identity: &str,
    now: SystemTime,
) -> Result<(DnsResponse, usize), PacketError> {
    reply(frame, server_identity, now).map(|r| (r.response, r.addresses_cut))
}

/// [`response`], with the address it came from.
pub fn reply(frame: &[u8], server_identity: &str, now: SystemTime) -> Result<Reply, PacketError> {
    let (sliced, client, server) = unfragmented(frame)?;
    let Some(TransportSlice::Udp(udp)) = &sliced.transport else {
        return Err(PacketError::NotUdp);
    };
    if udp.source_port() != DNS_PORT {
        return Err(PacketError::NotFromDns(udp.source_port()));
    }
    let (mut response, addresses_cut) = parse_response(udp.payload(), client, now)?;
    response.response_time = Some(now);
    response.server_identity = server_identity.to_owned();
    Ok(Reply {
        response,
        addresses_cut,
        server: SocketAddr::new(server, udp.source_port()),
    })
}

/// One TCP segment from a DNS server (source port 53) to a client, as a packet carries it: what
/// following a DNS-over-TCP stream needs. The payload is the segment's bytes, not a message: DNS over
/// TCP frames each message with a two-byte length, and a message may span segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSegment {
    pub server: SocketAddr,
    pub client: SocketAddr,
    pub seq: u32,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    pub payload: Vec<u8>,
}

/// The TCP segment in `frame`, from port 53.
pub fn tcp_segment(frame: &[u8]) -> Result<TcpSegment, PacketError> {
    let (sliced, client, server) = unfragmented(frame)?;
    let Some(TransportSlice::Tcp(tcp)) = &sliced.transport else {
        return Err(PacketError::NotTcp);
    };
    if tcp.source_port() != DNS_PORT {
        return Err(PacketError::NotFromDns(tcp.source_port()));
    }
    Ok(TcpSegment {
        server: SocketAddr::new(server, tcp.source_port()),
        client: SocketAddr::new(client, tcp.destination_port()),
        seq: tcp.sequence_number(),
        syn: tcp.syn(),
        fin: tcp.fin(),
        rst: tcp.rst(),
        payload: tcp.payload().to_vec(),
    })
}

/// The DNS response message `wire` (one message of a DNS-over-TCP stream, without its length) sent
/// to `client`, read as [`response`] reads one from a UDP packet.
pub fn tcp_response(
    wire: &[u8],
    client: IpAddr,
    server_identity: &str,
    now: SystemTime,
) -> Result<(DnsResponse, usize), PacketError> {
    let (mut response, addresses_cut) = parse_response(wire, client, now)?;
    response.response_time = Some(now);
    response.server_identity = server_identity.to_owned();
    Ok((response, addresses_cut))
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{rdata, Name, RData, Record, RecordType},
    };
    use proptest::prelude::*;
    use std::{net::Ipv4Addr, str::FromStr};

    fn dns(qname: &str, answers: &[(&str, Ipv4Addr)]) -> Vec<u8> {
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(Name::from_str(qname).unwrap(), RecordType::A));
        for (owner, ip) in answers {
            m.add_answer(Record::from_rdata(
                Name::from_str(owner).unwrap(),
                60,
                RData::A(rdata::A(*ip)),
            ));
        }
        m.to_vec().unwrap()
    }

    fn udp4(src_port: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv4([10, 96, 0, 10], [10, 244, 1, 5], 64)
            .udp(src_port, 40000);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn a_response_to_a_pod_is_read_with_the_pod_as_client() {
        let frame = udp4(
            53,
            &dns(
                "www.example.com.",
                &[("www.example.com.", Ipv4Addr::new(192, 0, 2, 7))],
            ),
        );
        let now = SystemTime::now();
        let (r, cut) = response(&frame, "ovs", now).unwrap();
        assert_eq!(cut, 0);
        assert_eq!(destination(&frame), Some(IpAddr::from([10, 244, 1, 5])));
        assert_eq!(destination(b"not a frame"), None);
        assert_eq!(
            reply(&frame, "ovs", now).unwrap().server,
            "10.96.0.10:53".parse().unwrap(),
            "the server is the packet's source"
        );
        assert_eq!(r.client, IpAddr::from([10, 244, 1, 5]));
        assert_eq!(r.qname.as_str(), "www.example.com");
        assert_eq!(r.answers[0].ip, IpAddr::from([192, 0, 2, 7]));
        assert_eq!(
            (r.response_time, r.server_identity.as_str()),
            (Some(now), "ovs")
        );
    }

    #[test]
    fn a_tcp_segment_from_port_53_is_read_with_its_sequence_number() {
        let b = PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv4([10, 96, 0, 10], [10, 244, 1, 5], 64)
            .tcp(53, 40000, 1_000, 64_000)
            .ack(7)
            .psh();
        let mut frame = Vec::new();
        b.write(&mut frame, b"\x00\x02ab").unwrap();
        let s = tcp_segment(&frame).unwrap();
        assert_eq!(s.server, "10.96.0.10:53".parse().unwrap());
        assert_eq!(s.client, "10.244.1.5:40000".parse().unwrap());
        assert_eq!((s.seq, s.syn, s.fin, s.rst), (1_000, false, false, false));
        assert_eq!(s.payload, b"\x00\x02ab");
        assert_eq!(tcp_segment(&udp4(53, b"x")), Err(PacketError::NotTcp));
        let b = PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv4([10, 96, 0, 10], [10, 244, 1, 5], 64)
            .tcp(80, 40000, 1, 64_000)
            .syn();
        let mut frame = Vec::new();
        b.write(&mut frame, &[]).unwrap();
        assert_eq!(tcp_segment(&frame), Err(PacketError::NotFromDns(80)));
    }

    #[test]
    fn ipv6_and_vlan_tagged_frames_are_read() {
        let payload = dns(
            "v6.example.",
            &[("v6.example.", Ipv4Addr::new(192, 0, 2, 8))],
        );
        let b = PacketBuilder::ethernet2([1; 6], [2; 6])
            .single_vlan(7.try_into().unwrap())
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .udp(53, 40000);
        let mut frame = Vec::new();
        b.write(&mut frame, &payload).unwrap();
        let r = reply(&frame, "ovs", SystemTime::now()).unwrap();
        assert_eq!(r.response.client, IpAddr::from([0xfe; 16]));
        assert_eq!(r.server, SocketAddr::new(IpAddr::from([0xfd; 16]), 53));
    }

    #[test]
    fn what_is_not_a_whole_dns_response_from_port_53_is_refused() {
        let good = dns("x.example.", &[]);
        assert_eq!(
            response(&udp4(5353, &good), "ovs", SystemTime::now()).unwrap_err(),
            PacketError::NotFromDns(5353)
        );
        let tcp = {
            let b = PacketBuilder::ethernet2([1; 6], [2; 6])
                .ipv4([10, 96, 0, 10], [10, 244, 1, 5], 64)
                .tcp(53, 40000, 1, 1000);
            let mut out = Vec::new();
            b.write(&mut out, &good).unwrap();
            out
        };
        assert_eq!(
            response(&tcp, "ovs", SystemTime::now()).unwrap_err(),
            PacketError::NotUdp
        );
        assert!(matches!(
            response(&udp4(53, b"not dns"), "ovs", SystemTime::now()),
            Err(PacketError::Dns(_))
        ));
        let mut truncated = udp4(53, &good);
        truncated.truncate(30);
        assert!(response(&truncated, "ovs", SystemTime::now()).is_err());
        // A first fragment: more-fragments set.
        let mut fragment = udp4(53, &good);
        fragment[14 + 6] |= 0x20;
        let sum = etherparse::Ipv4HeaderSlice::from_slice(&fragment[14..])
            .unwrap()
            .to_header()
            .calc_header_checksum();
        fragment[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(
            response(&fragment, "ovs", SystemTime::now()).unwrap_err(),
            PacketError::Fragment
        );
    }

    proptest! {
        /// Whatever bytes arrive, reading them ends in a response or an error.
        #[test]
        fn any_bytes_are_read_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = response(&bytes, "ovs", SystemTime::now());
            let _ = response(&udp4(53, &bytes), "ovs", SystemTime::now());
            let _ = tcp_segment(&bytes);
            let _ = destination(&bytes);
            let _ = tcp_response(&bytes, IpAddr::from([10, 244, 1, 5]), "ovs", SystemTime::now());
        }
    }
}

//! Every message of the subset as OVS's own parser reads it (`ovs-ofctl ofp-print`), and back.

#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use dnsflow_openflow::{decode, encode, CodecError, Message, PacketInFormat, HEADER_LEN};
use proptest::prelude::*;
use std::process::Command;

fn samples() -> Vec<(Message, &'static str)> {
    vec![
        (Message::Hello, "OFPT_HELLO (OF1.5)"),
        (
            Message::EchoRequest(Bytes::from_static(b"ping")),
            "OFPT_ECHO_REQUEST (OF1.5)",
        ),
        (
            Message::EchoReply(Bytes::from_static(b"ping")),
            "OFPT_ECHO_REPLY (OF1.5)",
        ),
        (Message::FeaturesRequest, "OFPT_FEATURES_REQUEST (OF1.5)"),
        (
            Message::SetConfig {
                miss_send_len: 65535,
            },
            "OFPT_SET_CONFIG (OF1.5) (xid=0x2a): frags=normal miss_send_len=65535",
        ),
        (
            Message::BarrierRequest,
            "OFPT_BARRIER_REQUEST (OF1.5) (xid=0x2a)",
        ),
        (
            Message::BarrierReply,
            "OFPT_BARRIER_REPLY (OF1.5) (xid=0x2a)",
        ),
        (
            Message::SetControllerId(0x646e),
            "NXT_SET_CONTROLLER_ID (OF1.5) (xid=0x2a): id=25710",
        ),
        (
            Message::SetPacketInFormat(PacketInFormat::Nxt2),
            "NXT_SET_PACKET_IN_FORMAT (OF1.5) (xid=0x2a): format=nxt_packet_in2",
        ),
        (
            Message::Error {
                kind: 1,
                code: 1,
                data: Bytes::from_static(&[0x06, 0x14, 0x00, 0x08, 0, 0, 0, 1]),
            },
            "OFPT_ERROR (OF1.5) (xid=0x2a): OFPBRC_BAD_TYPE",
        ),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn ovs_reads_what_we_write_and_we_read_it_back() {
    dnsflow_testkit::require_tool("ovs-ofctl").unwrap();
    for (message, printed) in samples() {
        let mut out = BytesMut::new();
        encode(0x2a, &message, &mut out).unwrap();
        let ofp = Command::new("ovs-ofctl")
            .args(["ofp-print", &hex(&out)])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&ofp.stdout);
        assert!(
            ofp.status.success() && text.contains(printed),
            "{message:?}: {text}"
        );
        assert!(!text.contains("***decode error"), "{message:?}: {text}");
        assert_eq!(
            decode(&out).unwrap(),
            Some((0x2a, message, out.len())),
            "{}",
            hex(&out)
        );
    }
}

#[test]
fn a_hello_offers_only_openflow_1_5() {
    let mut out = BytesMut::new();
    encode(1, &Message::Hello, &mut out).unwrap();
    let ofp = Command::new("ovs-ofctl")
        .args(["ofp-print", &hex(&out)])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&ofp.stdout).contains("version bitmap: 0x06"));
}

#[test]
fn partial_input_waits_and_bad_headers_are_errors() {
    let mut out = BytesMut::new();
    encode(7, &Message::BarrierRequest, &mut out).unwrap();
    encode(8, &Message::SetControllerId(3), &mut out).unwrap();
    for cut in 0..HEADER_LEN + 8 {
        let got = decode(&out[..cut]).unwrap();
        assert_eq!(got.is_some(), cut >= HEADER_LEN, "cut at {cut}");
    }
    let (_, first, used) = decode(&out).unwrap().unwrap();
    assert_eq!(first, Message::BarrierRequest);
    assert_eq!(
        decode(&out[used..]).unwrap().unwrap().1,
        Message::SetControllerId(3)
    );
    assert_eq!(
        decode(&[0x04, 20, 0, 8, 0, 0, 0, 1]),
        Err(CodecError::Version(4))
    );
    assert_eq!(
        decode(&[0x06, 20, 0, 4, 0, 0, 0, 1]),
        Err(CodecError::Length(4))
    );
    // A peer refusing our version may say so in its own.
    assert!(matches!(
        decode(&[0x01, 1, 0, 12, 0, 0, 0, 1, 0, 0, 0, 0]),
        Ok(Some((1, Message::Error { .. }, 12)))
    ));
    // Unknown messages and experimenters pass through.
    let other = [0x06, 4, 0, 16, 0, 0, 0, 9, 0, 0, 0x23, 0x20, 0, 0, 0, 99];
    assert!(matches!(
        decode(&other),
        Ok(Some((9, Message::Other { kind: 4, .. }, 16)))
    ));
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_nor_overread(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(Some((_, _, used))) = decode(&bytes) {
            prop_assert!(used >= HEADER_LEN && used <= bytes.len());
        }
    }

    #[test]
    fn everything_we_encode_decodes_to_itself(
        xid in any::<u32>(),
        data in proptest::collection::vec(any::<u8>(), 0..200),
        id in any::<u16>(),
    ) {
        let data = Bytes::from(data);
        for message in [
            Message::EchoRequest(data.clone()),
            Message::Error { kind: 1, code: 2, data: data.clone() },
            Message::SetControllerId(id),
            Message::SetConfig { miss_send_len: id },
        ] {
            let mut out = BytesMut::new();
            encode(xid, &message, &mut out).unwrap();
            prop_assert_eq!(decode(&out).unwrap(), Some((xid, message, out.len())));
        }
    }
}

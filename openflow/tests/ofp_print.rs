//! Every message of the subset as OVS's own parser reads it (`ovs-ofctl ofp-print`), and back.

#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use dnsflow_openflow::{
    decode, encode, Action, CodecError, FlowMod, FlowModCommand, Masked, Match, Message,
    PacketInFormat, Register, HEADER_LEN,
};
use proptest::prelude::*;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;

#[path = "ofp_print/flows.rs"]
mod flows;
#[path = "ofp_print/live.rs"]
mod live;

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

/// What `ovs-ofctl ofp-print` makes of one message.
fn ofp_print(bytes: &[u8]) -> String {
    let out = Command::new("ovs-ofctl")
        .args(["ofp-print", &hex(bytes)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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

/// A header of `kind` (and, for experimenter messages, Nicira's id and `subtype`) around `body`.
fn framed(kind: u8, prefix: &[u8], body: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + prefix.len() + body.len();
    let mut bytes = vec![0x06, kind];
    bytes.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
    bytes.extend_from_slice(&[0, 0, 0, 1]);
    bytes.extend_from_slice(prefix);
    bytes.extend_from_slice(body);
    bytes
}

/// The message kinds with structure, each with the bytes that select it.
const STRUCTURED: &[(u8, &[u8])] = &[
    (14, &[]),                              // OFPT_FLOW_MOD
    (11, &[]),                              // OFPT_FLOW_REMOVED
    (19, &[0, 1, 0, 0, 0, 0, 0, 0]),        // OFPT_MULTIPART_REPLY, flow descs
    (18, &[0, 1, 0, 0, 0, 0, 0, 0]),        // OFPT_MULTIPART_REQUEST, flow stats
    (4, &[0, 0, 0x23, 0x20, 0, 0, 0, 30]),  // NXT_PACKET_IN2
    (4, &[0, 0, 0x23, 0x20, 0, 0, 0, 28]),  // NXT_RESUME
    (33, &[]),                              // OFPT_BUNDLE_CONTROL
    (34, &[0, 0, 0, 1, 0, 0, 0, 3, 6, 14]), // OFPT_BUNDLE_ADD_MESSAGE of a flow mod
    (6, &[]),                               // OFPT_FEATURES_REPLY
];

fn masked32() -> impl Strategy<Value = Option<Masked<u32>>> {
    proptest::option::of((any::<u32>(), 1..=u32::MAX).prop_map(|(v, mask)| Masked {
        value: v & mask,
        mask,
    }))
}

fn typed_match() -> impl Strategy<Value = Match> {
    (
        (
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u16>()),
            proptest::option::of((any::<u32>(), 0u8..=32)),
            proptest::option::of((any::<u128>(), 0u8..=128)),
            proptest::option::of(any::<u8>()),
            proptest::option::of(any::<u16>()),
            proptest::option::of(any::<u16>()),
            proptest::option::of(any::<u16>()),
        ),
        proptest::collection::vec(masked32(), 16),
        masked32(),
        proptest::option::of((any::<u64>(), 1..=u64::MAX)),
    )
        .prop_map(
            |((in_port, eth_type, v4, v6, proto, tcp_src, tcp, udp), regs, ct, md)| {
                let mut m = Match {
                    in_port,
                    eth_type,
                    ipv4_src: v4.map(|(a, len)| Masked::<Ipv4Addr>::prefix(a.into(), len.max(1))),
                    ipv6_dst: v6.map(|(a, len)| Masked::<Ipv6Addr>::prefix(a.into(), len.max(1))),
                    ip_proto: proto,
                    tcp_src,
                    tcp_dst: tcp,
                    udp_src: udp,
                    ct_state: ct,
                    metadata: md.map(|(v, mask)| Masked {
                        value: v & mask,
                        mask,
                    }),
                    ..Match::default()
                };
                m.regs.copy_from_slice(&regs);
                m
            },
        )
}

fn typed_action() -> impl Strategy<Value = Action> {
    prop_oneof![
        any::<u32>().prop_map(|port| Action::Output { port }),
        any::<u8>().prop_map(|table| Action::Resubmit { table }),
        Just(Action::CtClear),
        (0u8..4, 0u32..128, 1u32..=8, any::<u128>()).prop_map(|(n, ofs, bits, v)| {
            Action::load(Register::XXReg(n), ofs.min(128 - bits), bits, v)
        }),
        (0u8..16, any::<u32>()).prop_map(|(n, v)| Action::load(Register::Reg(n), 0, 32, v.into())),
        (0u8..8, 0u32..64).prop_map(|(n, ofs)| Action::load(Register::XReg(n), ofs, 1, 1)),
        (
            any::<u16>(),
            any::<u16>(),
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..20),
            any::<bool>()
        )
            .prop_map(
                |(max_len, id, reason, userdata, pause)| Action::Controller {
                    max_len,
                    id,
                    reason,
                    userdata: Bytes::from(userdata),
                    pause,
                }
            ),
    ]
}

fn typed_flow_mod() -> impl Strategy<Value = FlowMod> {
    (
        (
            prop_oneof![
                Just(FlowModCommand::Add),
                Just(FlowModCommand::Modify),
                Just(FlowModCommand::ModifyStrict),
                Just(FlowModCommand::Delete),
                Just(FlowModCommand::DeleteStrict),
            ],
            any::<u8>(),
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            any::<u16>(),
            any::<u16>(),
            any::<bool>(),
        ),
        typed_match(),
        proptest::collection::vec(typed_action(), 0..6),
    )
        .prop_map(
            |(
                (command, table, priority, cookie, cookie_mask, idle, hard, rem),
                matches,
                actions,
            )| {
                FlowMod {
                    command,
                    table,
                    priority,
                    cookie,
                    cookie_mask,
                    idle_timeout: idle,
                    hard_timeout: hard,
                    send_flow_removed: rem,
                    matches,
                    actions,
                }
            },
        )
}

proptest! {
    #[test]
    fn random_bodies_behind_valid_headers_never_panic_nor_overread(
        which in 0..STRUCTURED.len(),
        body in proptest::collection::vec(any::<u8>(), 0..400),
        trailing in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let (kind, prefix) = STRUCTURED[which];
        let mut bytes = framed(kind, prefix, &body);
        let len = bytes.len();
        bytes.extend_from_slice(&trailing);
        if let Ok(Some((_, _, used))) = decode(&bytes) {
            prop_assert_eq!(used, len);
        }
    }

    #[test]
    fn typed_flow_mods_decode_to_themselves(flow_mod in typed_flow_mod(), xid in any::<u32>()) {
        let message = Message::FlowMod(flow_mod);
        let mut out = BytesMut::new();
        encode(xid, &message, &mut out).unwrap();
        prop_assert_eq!(decode(&out).unwrap(), Some((xid, message, out.len())));
    }

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

//! Against a real `ovs-vswitchd` (dummy datapath, in a temp dir, stopped by pid): the handshake
//! flowd will do, a bundle of flows, a dump of them, a paused packet's `NXT_PACKET_IN2` and the
//! `NXT_RESUME` that lets it go on.

use super::flows::{grant_flow, udp_packet};
use super::hex;
use bytes::{Bytes, BytesMut};
use dnsflow_openflow::*;
use dnsflow_testkit::{require_tool, wait_until, ChildDaemon};
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const CONTROLLER_ID: u16 = 7;
const COOKIE: u64 = 0xf10d_0000_0000_0001;
/// flowd owns the cookies with these bits.
const COOKIE_MASK: u64 = 0xffff_0000_0000_0000;
const IN_PORT: u32 = 1;
const OUT_PORT: u32 = 7;

/// ovsdb-server and ovs-vswitchd with one bridge `br0` (ports p1 = 1 and p7 = 7), all in `dir`.
struct Ovs {
    dir: tempfile::TempDir,
    // Dropped (killed) in this order: the switch before its database.
    _vswitchd: ChildDaemon,
    _ovsdb: ChildDaemon,
}

fn ovs_env<'a>(cmd: &'a mut Command, dir: &Path) -> &'a mut Command {
    for var in ["OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR"] {
        cmd.env(var, dir);
    }
    cmd
}

fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = ovs_env(&mut Command::new(program), dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Ovs {
    fn start() -> Self {
        for tool in [
            "ovsdb-tool",
            "ovsdb-server",
            "ovs-vswitchd",
            "ovs-vsctl",
            "ovs-appctl",
        ] {
            require_tool(tool).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let path = |name: &str| d.join(name).to_string_lossy().into_owned();
        run(
            d,
            "ovsdb-tool",
            &[
                "create",
                &path("conf.db"),
                "/usr/share/openvswitch/vswitch.ovsschema",
            ],
        );
        let ovsdb = ChildDaemon::spawn(
            "ovsdb-server",
            ovs_env(&mut Command::new("ovsdb-server"), d).args([
                path("conf.db"),
                format!("--remote=punix:{}", path("db.sock")),
                format!("--unixctl={}", path("ovsdb-server.ctl")),
            ]),
            d.join("ovsdb-server.log"),
        )
        .unwrap();
        wait_until("ovsdb-server's socket", || d.join("db.sock").exists()).unwrap();
        let db = format!("--db=unix:{}", path("db.sock"));
        run(d, "ovs-vsctl", &[&db, "--no-wait", "init"]);
        let vswitchd = ChildDaemon::spawn(
            "ovs-vswitchd",
            ovs_env(&mut Command::new("ovs-vswitchd"), d).args([
                format!("unix:{}", path("db.sock")),
                "--enable-dummy".into(),
                "--disable-system".into(),
                format!("--unixctl={}", path("vswitchd.ctl")),
            ]),
            d.join("ovs-vswitchd.log"),
        )
        .unwrap();
        run(
            d,
            "ovs-vsctl",
            &[
                &db,
                "--timeout=10",
                "add-br",
                "br0",
                "--",
                "set",
                "bridge",
                "br0",
                "datapath_type=dummy",
                "protocols=OpenFlow15",
                "fail-mode=secure",
                "--",
                "add-port",
                "br0",
                "p1",
                "--",
                "set",
                "interface",
                "p1",
                "type=dummy",
                "ofport_request=1",
                "--",
                "add-port",
                "br0",
                "p7",
                "--",
                "set",
                "interface",
                "p7",
                "type=dummy",
                "ofport_request=7",
            ],
        );
        wait_until("br0's management socket", || d.join("br0.mgmt").exists()).unwrap();
        Self {
            dir,
            _vswitchd: vswitchd,
            _ovsdb: ovsdb,
        }
    }

    fn mgmt(&self) -> PathBuf {
        self.dir.path().join("br0.mgmt")
    }

    fn appctl(&self, args: &[&str]) -> String {
        let ctl = self.dir.path().join("vswitchd.ctl");
        let mut all = vec!["-t", ctl.to_str().unwrap()];
        all.extend_from_slice(args);
        run(self.dir.path(), "ovs-appctl", &all)
    }
}

/// flowd's side of the socket, blocking, with the codec.
struct Conn {
    stream: UnixStream,
    buf: BytesMut,
    next_xid: u32,
}

impl Conn {
    fn open(path: &Path) -> Self {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Self {
            stream,
            buf: BytesMut::new(),
            next_xid: 1,
        }
    }

    fn send(&mut self, message: &Message) -> u32 {
        self.next_xid += 1;
        let mut out = BytesMut::new();
        encode(self.next_xid, message, &mut out).unwrap();
        self.stream.write_all(&out).unwrap();
        self.next_xid
    }

    fn recv(&mut self) -> (u32, Message) {
        loop {
            if let Some((xid, message, used)) = decode(&self.buf).unwrap() {
                let _ = self.buf.split_to(used);
                match message {
                    // OVS probes idle connections.
                    Message::EchoRequest(data) => {
                        let mut out = BytesMut::new();
                        encode(xid, &Message::EchoReply(data), &mut out).unwrap();
                        self.stream.write_all(&out).unwrap();
                    }
                    message => return (xid, message),
                }
                continue;
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).unwrap();
            assert!(n > 0, "OVS closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Everything OVS sends until the reply to a barrier sent now: errors, if any.
    fn barrier(&mut self) -> Vec<Message> {
        let xid = self.send(&Message::BarrierRequest);
        let mut before = Vec::new();
        loop {
            match self.recv() {
                (got, Message::BarrierReply) if got == xid => return before,
                (_, message) => before.push(message),
            }
        }
    }

    fn bundle(&mut self, kind: BundleControlType) -> Vec<Message> {
        let xid = self.send(&Message::BundleControl(BundleControl {
            bundle_id: 1,
            kind,
            flags: BundleFlags::ATOMIC_ORDERED,
        }));
        let mut before = Vec::new();
        loop {
            match self.recv() {
                (got, Message::BundleControl(reply)) if got == xid => {
                    assert_eq!(reply.bundle_id, 1);
                    return before;
                }
                (got, error @ Message::Error { .. }) if got == xid => {
                    before.push(error);
                    return before;
                }
                (_, message) => before.push(message),
            }
        }
    }

    fn add_to_bundle(&mut self, flow_mod: FlowMod) {
        self.send(&Message::BundleAdd(BundleAdd {
            bundle_id: 1,
            flags: BundleFlags::ATOMIC_ORDERED,
            message: Box::new(Message::FlowMod(flow_mod)),
        }));
    }

    /// flowd's flows (by cookie), across every part of the reply.
    fn dump(&mut self) -> Vec<FlowStats> {
        let xid = self.send(&Message::FlowStatsRequest(FlowStatsRequest {
            table: OFPTT_ALL,
            cookie: COOKIE,
            cookie_mask: COOKIE_MASK,
        }));
        let mut flows = Vec::new();
        loop {
            match self.recv() {
                (got, Message::FlowStatsReply { flows: part, more }) if got == xid => {
                    flows.extend(part);
                    if !more {
                        return flows;
                    }
                }
                (_, other) => panic!("unexpected {other:?}"),
            }
        }
    }
}

/// Table 0 marks DNS answers from port 1 in reg15 and pauses them to controller 7; after the
/// pause, table 1 sends what reg15 marks to port 7.
fn pause_flows() -> Vec<FlowMod> {
    let hold = Match {
        in_port: Some(IN_PORT),
        eth_type: Some(ETH_TYPE_IPV4),
        ip_proto: Some(IPPROTO_UDP),
        udp_src: Some(53),
        ..Match::default()
    };
    let mut marked = Match::default();
    marked.regs[15] = Some(Masked::exact(3));
    vec![
        FlowMod::add(
            0,
            100,
            COOKIE,
            hold,
            vec![
                Action::load(Register::Reg(15), 0, 32, 3),
                Action::pause_to_controller(CONTROLLER_ID, Bytes::from_static(&[1, 2])),
                Action::Resubmit { table: 1 },
            ],
        ),
        FlowMod::add(
            1,
            100,
            COOKIE,
            marked,
            vec![Action::Output { port: OUT_PORT }],
        ),
        FlowMod {
            cookie: COOKIE,
            ..grant_flow()
        },
    ]
}

fn actions_bytes(actions: &[Action]) -> Bytes {
    // The apply-actions of a flow mod with an empty match: header 8, flow mod 40, match 8,
    // instruction header 8.
    let mut out = BytesMut::new();
    encode(
        0,
        &Message::FlowMod(FlowMod::add(0, 0, 0, Match::default(), actions.to_vec())),
        &mut out,
    )
    .unwrap();
    out.freeze().slice(64..)
}

#[test]
fn ovs_pauses_a_packet_to_us_and_resumes_it_when_told() {
    let ovs = Ovs::start();
    let mut conn = Conn::open(&ovs.mgmt());

    conn.send(&Message::Hello);
    assert_eq!(conn.recv().1, Message::Hello);
    conn.send(&Message::FeaturesRequest);
    let (_, features) = conn.recv();
    let dpid = run(
        ovs.dir.path(),
        "ovs-vsctl",
        &[
            &format!("--db=unix:{}", ovs.dir.path().join("db.sock").display()),
            "get",
            "bridge",
            "br0",
            "datapath_id",
        ],
    );
    assert_eq!(
        features,
        Message::FeaturesReply {
            datapath_id: u64::from_str_radix(dpid.trim().trim_matches('"'), 16).unwrap()
        }
    );
    conn.send(&Message::SetControllerId(CONTROLLER_ID));
    conn.send(&Message::SetPacketInFormat(PacketInFormat::Nxt2));
    conn.send(&Message::SetConfig {
        miss_send_len: u16::MAX,
    });
    assert_eq!(conn.barrier(), vec![]);

    // The flows go in as one atomic bundle.
    assert_eq!(conn.bundle(BundleControlType::OpenRequest), vec![]);
    for flow_mod in pause_flows() {
        conn.add_to_bundle(flow_mod);
    }
    assert_eq!(conn.bundle(BundleControlType::CommitRequest), vec![]);
    assert_eq!(conn.barrier(), vec![]);

    // OVS reports them as they were written, actions byte for byte.
    let mut flows = conn.dump();
    flows.sort_by_key(|f| f.table);
    assert_eq!(flows.len(), 3, "{flows:?}");
    for (flow, written) in flows.iter().zip(pause_flows()) {
        assert_eq!(
            (flow.table, flow.priority, flow.cookie),
            (written.table, written.priority, COOKIE)
        );
        assert_eq!(flow.matches.fields, written.matches);
        assert_eq!(hex(&flow.actions), hex(&actions_bytes(&written.actions)));
        assert_eq!(flow.counters.packets, Some(0));
    }

    // A DNS answer arrives on port 1 and pauses.
    let packet = udp_packet();
    ovs.appctl(&["netdev-dummy/receive", "p1", &hex(&packet)]);
    let packet_in = match conn.recv() {
        (_, Message::PacketIn2(packet_in)) => packet_in,
        (_, other) => panic!("expected a packet-in, got {other:?}"),
    };
    assert_eq!(packet_in.packet, packet);
    assert_eq!(packet_in.userdata, Bytes::from_static(&[1, 2]));
    assert_eq!((packet_in.table_id, packet_in.cookie), (0, Some(COOKIE)));
    assert_eq!(packet_in.metadata.fields.in_port, Some(IN_PORT));
    // The register the flow loaded before the pause travels in the metadata.
    assert_eq!(packet_in.metadata.fields.regs[15], Some(Masked::exact(3)));
    assert!(packet_in.continuation.is_some());
    let held = conn.dump();
    assert_eq!(
        held[1].counters.packets,
        Some(0),
        "nothing passed the pause yet"
    );

    // Resumed, it continues after the pause: table 1 counts it and port 7 sends it.
    conn.send(&Message::Resume(packet_in.resume().unwrap()));
    assert_eq!(conn.barrier(), vec![]);
    let resumed = conn.dump();
    let after = resumed.iter().find(|f| f.table == 1).unwrap();
    assert_eq!(after.counters.packets, Some(1));
    let port = run(
        ovs.dir.path(),
        "ovs-ofctl",
        &[
            "-O",
            "OpenFlow15",
            "dump-ports",
            ovs.mgmt().to_str().unwrap(),
            "7",
        ],
    );
    assert!(port.contains("tx pkts=1,"), "{port}");

    // A delete by cookie across all tables removes every one of them.
    conn.send(&Message::FlowMod(FlowMod::delete_by_cookie(
        COOKIE,
        COOKIE_MASK,
    )));
    assert_eq!(conn.barrier(), vec![]);
    assert_eq!(conn.dump(), vec![]);
}

/// OVS checks each flow mod when it is added to a bundle, not at commit: a bad one is refused then
/// with its own error, and the bundle goes on without it. So flowd must look for errors before it
/// commits (a barrier after the adds) and discard the bundle if there are any.
#[test]
fn a_bad_flow_is_refused_when_added_and_the_bundle_can_be_discarded() {
    let ovs = Ovs::start();
    let mut conn = Conn::open(&ovs.mgmt());
    conn.send(&Message::Hello);
    assert_eq!(conn.recv().1, Message::Hello);

    assert_eq!(conn.bundle(BundleControlType::OpenRequest), vec![]);
    conn.add_to_bundle(pause_flows().remove(1));
    // A TCP port without ip_proto lacks its prerequisite.
    let bad = Match {
        tcp_dst: Some(443),
        ..Match::default()
    };
    conn.add_to_bundle(FlowMod::add(2, 1, COOKIE, bad, vec![]));
    let bad_xid = conn.next_xid;
    let errors = conn.barrier();
    let [Message::Error { kind, code, data }] = errors.as_slice() else {
        panic!("expected one error, got {errors:?}");
    };
    // The error quotes the bundle add that carried the flow mod.
    assert_eq!(data.get(4..8), Some(bad_xid.to_be_bytes().as_slice()));
    let mut error = BytesMut::new();
    encode(bad_xid, &errors[0], &mut error).unwrap();
    let printed = super::ofp_print(&error);
    assert!(
        printed.starts_with(&format!(
            "OFPT_ERROR (OF1.5) (xid={bad_xid:#x}): OFPBMC_BAD_PREREQ\nOFPT_BUNDLE_ADD_MESSAGE"
        )),
        "{kind} {code}: {printed}"
    );

    assert_eq!(conn.bundle(BundleControlType::DiscardRequest), vec![]);
    assert_eq!(conn.barrier(), vec![]);
    assert_eq!(conn.dump(), vec![], "a discarded bundle changes nothing");
}

//! A real OVN node in a temp dir, shaped like what OVN-Kubernetes builds, for flowd's tests: on OVN
//! 23.03 (Debian 12, the host's packages) or on OVN 25.03 (Debian 13's, in the root filesystem that
//! `scripts/test` makes, run under `chroot`), see [`Ovn`].
//!
//! [`Sandbox::start`] brings up ovsdb-server (OVS, NB, SB), ovs-vswitchd on the dummy datapath (nothing
//! touches the host, so sandboxes run side by side), ovn-northd and ovn-controller, each `--detach
//! --pidfile` and stopped by that pid on drop. The logical topology: a node switch with a load balancer
//! (packets recirculate through conntrack, as on OVN-K), a router port on it, a router with default
//! routes (`0.0.0.0/0`, `::/0`) to an exit switch, one port group per namespace, and each namespace's
//! EgressFirewall as OVN-K renders it: `to-lport` ACLs at `10000 - i` on `inport == @pg` in tier 2,
//! a CIDR that covers the pod subnets without them, `dnsName` rules on address sets (empty unless a
//! test fills them, as OVN-K's own resolution would).
//! Beside it, as on a real node: NetworkPolicy ACLs in tier 2 (every namespace's pods may egress, a
//! from-lport ACL after the load balancer; a namespace may deny ingress, to-lport on `outport`) and an
//! AdminNetworkPolicy-like deny in tier 1. [`Sandbox::trace`] is the oracle: `ofproto/trace` of a
//! packet from a pod, read from the last conntrack pass. [`Sandbox::add_remote_dns_server`] adds a
//! second node, known to this one only through the southbound database, whose CoreDNS answers in
//! Geneve through a real (userspace) tunnel port.
//!
//! All tools get the sandbox's `OVS_RUNDIR`/`OVN_RUNDIR` in their own environment (never this process's),
//! and [`Sandbox::ofctl`] hands the same to flowd's programmer, which runs the host's `ovs-ofctl`
//! against either version.
//!
//! [`Sandbox::start_netdev`] runs the same node on OVS's userspace (netdev) datapath instead, for real
//! packets: pods are network namespaces attached by veth ([`Sandbox::add_netns_pod`]), and the exit
//! switch's host is one too ([`Sandbox::add_exit_host`]). Such a sandbox touches the host (br-int's
//! own port becomes a tap device named `br-int`), so only one runs at a time on the machine.

use anyhow::{bail, Context, Result};
use flowd::{
    model::{PodKey, Protocol, Verdict},
    ovs::{Native, Ofctl},
    rules::{Destination, FirewallRules},
};
use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        atomic::{AtomicU32, Ordering},
        Condvar, Mutex,
    },
    time::{Duration, Instant},
};

/// The router's MAC on the node switch: a pod's default gateway.
pub const ROUTER_MAC: &str = "0a:58:0a:f4:01:01";
/// Pod IPs come from these node subnets (OVN-K's kind defaults), as the router port's networks.
pub const NODE_SUBNET_V4: &str = "10.244.1.1/24";
pub const NODE_SUBNET_V6: &str = "fd00:10:244:1::1/64";
/// The router's address on the node switch: a netns pod's default route.
const ROUTER_IPV4: &str = "10.244.1.1";
/// The exit switch's one plain port, where the router's default routes lead (see
/// [`Sandbox::add_exit_host`]).
const EXIT_HOST_MAC: &str = "0a:58:64:40:00:02";
const EXIT_HOST_CIDR: &str = "100.64.0.2/16";
/// The router's address on the exit switch.
const EXIT_ROUTER_IPV4: &str = "100.64.0.1";
/// The pod subnets of the whole cluster (OVN-K's `ClusterSubnets`, kind's defaults).
const CLUSTER_SUBNET_V4: &str = "10.244.0.0/16";
const CLUSTER_SUBNET_V6: &str = "fd00:10:244::/48";
/// The kube-dns Service's ClusterIP (kind's), a load balancer on the node switch...
pub const KUBE_DNS_VIP: &str = "10.96.0.10";
/// The second node of [`Sandbox::add_remote_dns_server`]: its chassis, its switch's router port
/// and pod subnet, and its address on the underlay (this node's is [`UNDERLAY_LOCAL`]).
const NODE2: &str = "node2";
const NODE2_ROUTER_MAC: &str = "0a:58:0a:f4:02:01";
const NODE2_SUBNET_V4: &str = "10.244.2.1/24";
const NODE2_SUBNET_V6: &str = "fd00:10:244:2::1/64";
const UNDERLAY_LOCAL: &str = "192.168.0.1";
const UNDERLAY_REMOTE: &str = "192.168.0.2";
const UNDERLAY_PREFIX: &str = "192.168.0.0/24";
const UNDERLAY_REMOTE_MAC: &str = "0a:58:c0:a8:00:02";
/// Geneve's UDP port, and OVN's option in it: class 0x0102, type 0x80 (critical), 4 bytes.
const GENEVE_PORT: u16 = 6081;
const OVN_GENEVE_CLASS: u16 = 0x0102;
const OVN_GENEVE_TYPE: u8 = 0x80;
/// ...whose one backend is the pod [`Sandbox::add_dns_server`] adds, at `10.244.1.<this>`.
pub const KUBE_DNS_HOST: u8 = 250;
/// How long to wait for a daemon or ovn-controller to catch up before failing the test.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// `--timeout` of ovs-vsctl/ovn-nbctl: a dozen sandboxes starting at once on two cores, beside a
/// compiler, have been seen to need more than 20 s for one `--wait=hv sync`.
const TOOL_TIMEOUT: &str = "--timeout=90";
/// `--timeout` of one `--wait=hv sync`, and how many are tried (see [`Sandbox::sync`]).
const SYNC_TIMEOUT: &str = "--timeout=20";
const SYNC_ATTEMPTS: usize = 3;
/// Sandboxes building their topology at the same time, at most: ovn-northd and ovn-controller
/// recompute everything then, and a dozen at once starve each other.
const CONCURRENT_STARTS: usize = 4;

/// A counting gate for [`CONCURRENT_STARTS`].
static STARTING: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

struct StartPermit;

impl StartPermit {
    fn acquire() -> Self {
        let (count, cv) = &STARTING;
        let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= CONCURRENT_STARTS {
            n = cv.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        StartPermit
    }
}

impl Drop for StartPermit {
    fn drop(&mut self) {
        let (count, cv) = &STARTING;
        *count.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        cv.notify_one();
    }
}

/// Netdev sandboxes take this lock (`flock`, so across test processes too, and released by a crash):
/// br-int's tap device has one name on the host.
const NETDEV_LOCK: &str = "dnsflow-netdev-sandbox.lock";
/// The tap devices ovs-vswitchd makes for a netdev br-int (its own port, and the datapath's). They
/// outlive ovs-vswitchd, so a sandbox removes them when it ends, and stale ones when it starts.
const NETDEV_TAPS: [&str; 2] = ["br-int", "ovs-netdev"];
/// Network namespaces (and the host ends of their veths) are named `<this><k>`, k from 1 in each
/// sandbox: the same names every run, so that those a crashed run left are found and removed.
const NETNS_PREFIX: &str = "dnsflow";
/// Network namespaces one netdev sandbox may attach.
const NETNS_MAX: usize = 8;

/// What a netdev sandbox holds on the host beside its daemons; see [`Sandbox::start_netdev`].
#[derive(Debug)]
struct Netdev {
    /// Held for the sandbox's life (the lock is released when the file closes).
    _lock: std::fs::File,
    /// The network namespaces attached so far.
    namespaces: Mutex<Vec<String>>,
}

impl Netdev {
    /// Waits for the machine's netdev sandbox lock, then removes what a crashed run left behind.
    fn acquire() -> Result<Self> {
        for tool in ["ip", "ethtool"] {
            dnsflow_testkit::require_tool(tool)?;
        }
        let path = std::env::temp_dir().join(NETDEV_LOCK);
        let lock = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        lock.lock()
            .with_context(|| format!("locking {}", path.display()))?;
        for k in 1..=NETNS_MAX {
            remove_netns(&format!("{NETNS_PREFIX}{k}"));
        }
        for tap in NETDEV_TAPS {
            remove_tap(tap);
        }
        Ok(Self {
            _lock: lock,
            namespaces: Mutex::new(Vec::new()),
        })
    }

    /// The next namespace's name, or `None` past [`NETNS_MAX`].
    fn next_name(&self) -> Option<String> {
        let mut names = self.namespaces.lock().unwrap_or_else(|e| e.into_inner());
        (names.len() < NETNS_MAX).then(|| {
            let name = format!("{NETNS_PREFIX}{}", names.len() + 1);
            names.push(name.clone());
            name
        })
    }

    fn remove_namespaces(&self) {
        for name in self
            .namespaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            remove_netns(&name);
        }
    }
}

/// Runs `ip <args>`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Removes network namespace `name` if it exists: the processes in it (by pid: ours, or a crashed
/// run's), its veth, the namespace.
fn remove_netns(name: &str) {
    if !Path::new("/run/netns").join(name).exists() {
        return;
    }
    let pids = Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for pid in pids.split_whitespace() {
        let _ = Command::new("kill").args(["-9", pid]).output();
    }
    // Deleting the host end deletes the pair at once; the namespace itself goes asynchronously.
    let _ = ip(&["link", "del", name]);
    let _ = ip(&["netns", "del", name]);
}

/// Removes tap device `name` if there is one (never another kind of device of that name).
fn remove_tap(name: &str) {
    if Path::new("/sys/class/net")
        .join(name)
        .join("tun_flags")
        .exists()
    {
        let _ = ip(&["link", "del", name]);
    }
}

/// A network namespace attached to a netdev sandbox's br-int by a veth pair (its end inside is
/// `eth0`); removed, with every process in it, when the sandbox ends.
#[derive(Clone, Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `ip <args>` inside the namespace, failing with its stderr.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }
}

const TOOLS: [&str; 8] = [
    "ovsdb-tool",
    "ovsdb-server",
    "ovs-vswitchd",
    "ovs-vsctl",
    "ovs-ofctl",
    "ovs-appctl",
    "ovn-northd",
    "ovn-controller",
];

/// What OVN-K's own resolution put in the address sets, by `dnsName` rule index.
pub type Resolved = HashMap<usize, Vec<IpAddr>>;

/// The OVN a sandbox runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ovn {
    /// OVS 3.1 + OVN 23.03 from the host's Debian 12 packages: no ACL tiers.
    V23_03,
    /// OVS 3.5 + OVN 25.03 from Debian 13, in a root filesystem run under chroot: ACL tiers and the
    /// verdict register, as clusters run OVN today.
    V25_03,
}

/// Where `scripts/test` makes the OVN 25.03 root filesystem, unless `DNSFLOW_OVN_2503_ROOT` says.
const OVN_2503_ROOT: &str = "/var/cache/dnsflow/trixie-ovn";

/// The tier OVN-K gives EgressFirewall and NetworkPolicy ACLs (`BuildACLWithDefaultTier`)...
const DEFAULT_TIER: &str = "--tier=2";
/// ...and AdminNetworkPolicy ACLs.
const ANP_TIER: &str = "--tier=1";
/// OVN-K's AdminNetworkPolicy ACL priorities are 20000..=30000; on OVN without tiers only a priority
/// above the EgressFirewall's keeps an ANP deny first.
const ANP_PRIORITY: &str = "29000";
/// Destinations an AdminNetworkPolicy denies to every pod of the node.
pub const ANP_DENIED: &str = "203.0.113.0/24";

impl Ovn {
    pub const ALL: [Ovn; 2] = [Ovn::V23_03, Ovn::V25_03];

    /// The root filesystem its tools run in; `None` for the host's.
    fn root(self) -> Option<PathBuf> {
        match self {
            Ovn::V23_03 => None,
            Ovn::V25_03 => Some(
                std::env::var_os("DNSFLOW_OVN_2503_ROOT")
                    .map_or_else(|| PathBuf::from(OVN_2503_ROOT), PathBuf::from),
            ),
        }
    }

    fn has_tiers(self) -> bool {
        self == Ovn::V25_03
    }

    /// The EgressFirewall ACL table of this OVN build (`ls_out_acl_eval`).
    pub fn ef_table(self) -> u8 {
        match self {
            Ovn::V23_03 => 46,
            Ovn::V25_03 => 51,
        }
    }

    /// The table where OVN hands a packet to its local port (`OFTABLE_LOG_TO_PHY`), after the
    /// logical egress pipeline: the same in both builds.
    pub fn delivery_table(self) -> u8 {
        65
    }
}

/// The root filesystem needs `/proc` and `/dev` inside for the daemons; mounted once per test run.
fn prepare_root(root: &Path) -> Result<()> {
    static MOUNTED: Mutex<bool> = Mutex::new(false);
    let mut done = MOUNTED.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return Ok(());
    }
    if !root.join("usr/bin/ovn-controller").is_file() {
        bail!(
            "no OVN 25.03 root filesystem at {}: run scripts/test, which makes it with debootstrap",
            root.display()
        );
    }
    let mounts = [
        ("proc", vec!["-t", "proc", "proc"]),
        ("dev", vec!["--bind", "/dev"]),
    ];
    for (dir, args) in mounts {
        let target = root.join(dir);
        let present = match dir {
            "proc" => target.join("self").exists(),
            _ => target.join("null").exists(),
        };
        if !present {
            let out = Command::new("mount")
                .args(&args)
                .arg(&target)
                .output()
                .context("running mount")?;
            if !out.status.success() {
                bail!(
                    "mount {} {} failed: {}",
                    args.join(" "),
                    target.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
    }
    *done = true;
    Ok(())
}

/// The oracle's answer for one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trace {
    Forwarded,
    Dropped,
}

/// A pod attached to the node switch.
#[derive(Clone, Debug)]
pub struct Pod {
    pub key: PodKey,
    pub ipv4: IpAddr,
    pub ipv6: IpAddr,
    pub mac: String,
    pub ofport: u32,
    /// Its OVS port's name: on the dummy datapath an internal port, what `netdev-dummy/receive`
    /// takes (see [`Sandbox::send_udp`]); on netdev the host end of its veth.
    pub port: String,
}

/// An Ethernet/IPv4/UDP frame from `from` to `to` (their MACs and IPv4 addresses), checksums
/// included, with source and destination `ports`, carrying `payload`; for [`Sandbox::send_frames`].
pub fn udp_frame(from: &Pod, to: &Pod, ports: (u16, u16), payload: &[u8]) -> Result<Vec<u8>> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (from.ipv4, to.ipv4) else {
        bail!("{} or {} has no IPv4 address", from.key, to.key);
    };
    let builder = etherparse::PacketBuilder::ethernet2(mac_bytes(&from.mac)?, mac_bytes(&to.mac)?)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(ports.0, ports.1);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload)?;
    Ok(frame)
}

/// `0a:58:...` as bytes.
fn mac_bytes(m: &str) -> Result<[u8; 6]> {
    let b: Vec<u8> = m
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()?;
    b.try_into().map_err(|_| anyhow::anyhow!("MAC {m}"))
}

/// A DNS response: `qname` A `ip`, TTL 300.
pub fn dns_answer(qname: &str, ip: std::net::Ipv4Addr) -> Result<Vec<u8>> {
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{rdata, Name, RData, Record, RecordType},
    };
    let name: Name = qname.parse()?;
    let mut m = Message::new(9, MessageType::Response, OpCode::Query);
    m.add_query(Query::query(name.clone(), RecordType::A));
    m.add_answer(Record::from_rdata(name, 300, RData::A(rdata::A(ip))));
    Ok(m.to_vec()?)
}

/// A UDP packet a pod sends, for [`Sandbox::send_udp`]; its source IP is the pod's of `dst`'s family.
#[derive(Clone, Debug)]
pub struct Udp<'a> {
    /// The next hop's MAC: a pod's on the same switch, else [`ROUTER_MAC`].
    pub dl_dst: &'a str,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

impl Udp<'_> {
    /// The packet from `pod`, in the datapath flow syntax `netdev-dummy/receive` parses in OVS 3.1
    /// and 3.5 (it composes the frame, a 64-byte payload included, from this key).
    fn odp_key(&self, pod: &Pod) -> String {
        let l3 = match self.dst {
            IpAddr::V4(dst) => format!(
                "eth_type(0x0800),ipv4(src={},dst={dst},proto=17,tos=0,ttl=64,frag=no)",
                pod.ipv4
            ),
            IpAddr::V6(dst) => format!(
                "eth_type(0x86dd),ipv6(src={},dst={dst},label=0,proto=17,tclass=0,hlimit=64,frag=no)",
                pod.ipv6
            ),
        };
        format!(
            "eth(src={},dst={}),{l3},udp(src={},dst={})",
            pod.mac, self.dl_dst, self.src_port, self.dst_port
        )
    }
}

/// An OVS port's packet counters (`ovs-ofctl dump-ports`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Packets the pod sent into br-int.
    pub rx: u64,
    /// Packets br-int delivered to the pod.
    pub tx: u64,
}

impl Pod {
    /// The pod as flowd's engine knows it (on node `node1`).
    pub fn info(&self) -> flowd::model::PodInfo {
        flowd::model::PodInfo {
            uid: None,
            key: self.key.clone(),
            ips: vec![self.ipv4, self.ipv6],
            node: Sandbox::NODE.into(),
        }
    }
}

/// A CoreDNS pod on a second node ([`Sandbox::add_remote_dns_server`]): the kube-dns load balancer's
/// only backend, reached from this node's pods through a Geneve tunnel.
#[derive(Debug)]
pub struct RemoteDns {
    pub key: PodKey,
    pub ipv4: IpAddr,
    /// br-phys's MAC, where the remote node sends this node's tunnel packets.
    local_mac: String,
    /// The underlay wire's port on br-phys.
    wire_ofport: u32,
}

/// One OVN node; see the module doc.
#[derive(Debug)]
pub struct Sandbox {
    ovn: Ovn,
    root: Option<PathBuf>,
    dir: tempfile::TempDir,
    next_port: AtomicU32,
    /// `Some` on the netdev datapath.
    netdev: Option<Netdev>,
}

fn check_tools() -> Result<()> {
    for tool in TOOLS.iter().chain(&["ovn-nbctl"]) {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false)
            || Path::new("/usr/sbin").join(tool).is_file();
        if !found {
            bail!(
                "{tool} is not installed: run scripts/test, which installs openvswitch-switch, ovn-central and ovn-host"
            );
        }
    }
    Ok(())
}

/// `ovs-vswitchd` and `ovsdb-server` live in /usr/sbin, which a test's PATH may lack; under `root`
/// when the tool runs in a chroot.
fn program(root: Option<&Path>, name: &str) -> PathBuf {
    let sbin = Path::new("/usr/sbin").join(name);
    let inside = root.map_or_else(|| sbin.clone(), |r| r.join("usr/sbin").join(name));
    if inside.is_file() {
        sbin
    } else {
        PathBuf::from(name)
    }
}

impl Sandbox {
    /// The chassis name of the sandbox's only node.
    pub const NODE: &'static str = "node1";

    /// Starts every daemon of `ovn` and builds the node's topology; fails (never skips) if that OVN is
    /// missing.
    pub fn start(ovn: Ovn) -> Result<Self> {
        Self::start_on(ovn, None)
    }

    /// The same node on OVS's userspace datapath (`datapath_type=netdev`), for real packets from
    /// pods in network namespaces ([`Sandbox::add_netns_pod`]) to a host behind the exit
    /// ([`Sandbox::add_exit_host`]). Waits until no other netdev sandbox runs on the machine.
    pub fn start_netdev(ovn: Ovn) -> Result<Self> {
        Self::start_on(ovn, Some(Netdev::acquire()?))
    }

    fn start_on(ovn: Ovn, netdev: Option<Netdev>) -> Result<Self> {
        check_tools()?;
        let root = ovn.root();
        if let Some(root) = &root {
            prepare_root(root)?;
        }
        let _permit = StartPermit::acquire();
        let builder = tempfile::Builder::new().prefix("ovn-sb").clone();
        let dir = match &root {
            Some(root) => builder.tempdir_in(root.join("tmp"))?,
            None => builder.tempdir()?,
        };
        let sb = Self {
            ovn,
            root,
            dir,
            next_port: AtomicU32::new(1),
            netdev,
        };
        let d = sb.inner_path();
        let p = |s: &str| d.join(s).to_string_lossy().into_owned();
        sb.run(
            "ovsdb-tool",
            &[
                "create",
                &p("conf.db"),
                "/usr/share/openvswitch/vswitch.ovsschema",
            ],
        )?;
        sb.run(
            "ovsdb-tool",
            &["create", &p("nb.db"), "/usr/share/ovn/ovn-nb.ovsschema"],
        )?;
        sb.run(
            "ovsdb-tool",
            &["create", &p("sb.db"), "/usr/share/ovn/ovn-sb.ovsschema"],
        )?;
        for (db, sock, name) in [
            ("conf.db", "db.sock", "ovsdb-server"),
            ("nb.db", "nb.sock", "ovsdb-nb"),
            ("sb.db", "sb.sock", "ovsdb-sb"),
        ] {
            sb.run(
                "ovsdb-server",
                &[
                    &p(db),
                    &format!("--remote=punix:{}", p(sock)),
                    &format!("--unixctl={}", p(&format!("{name}.ctl"))),
                    "--detach",
                    "--no-chdir",
                    &format!("--pidfile={}", p(&format!("{name}.pid"))),
                    &format!("--log-file={}", p(&format!("{name}.log"))),
                ],
            )?;
        }
        sb.vsctl(&["--no-wait", "init"])?;
        let db = format!("unix:{}", p("db.sock"));
        let pidfile = format!("--pidfile={}", p("ovs-vswitchd.pid"));
        let logfile = format!("--log-file={}", p("ovs-vswitchd.log"));
        let mut vswitchd = vec![db.as_str(), "--detach", "--no-chdir", &pidfile, &logfile];
        let datapath = if sb.netdev.is_some() {
            "datapath_type=netdev"
        } else {
            // Dummy datapath and ports, but real (userspace) tunnel ports: see add_remote_dns_server.
            vswitchd.push("--enable-dummy");
            "datapath_type=dummy"
        };
        sb.run("ovs-vswitchd", &vswitchd)?;
        sb.run(
            "ovn-northd",
            &[
                &format!("--ovnnb-db=unix:{}", p("nb.sock")),
                &format!("--ovnsb-db=unix:{}", p("sb.sock")),
                "--detach",
                "--no-chdir",
                &format!("--pidfile={}", p("ovn-northd.pid")),
                &format!("--log-file={}", p("ovn-northd.log")),
            ],
        )?;
        sb.vsctl(&[
            "add-br",
            "br-int",
            "--",
            "set",
            "bridge",
            "br-int",
            datapath,
            "fail-mode=secure",
            "other-config:disable-in-band=true",
        ])?;
        sb.vsctl(&[
            "set",
            "open_vswitch",
            ".",
            &format!("external_ids:system-id={}", Self::NODE),
            &format!("external_ids:ovn-remote=unix:{}", p("sb.sock")),
            "external_ids:ovn-encap-type=geneve",
            "external_ids:ovn-encap-ip=127.0.0.1",
        ])?;
        sb.start_ovn_controller()?;
        sb.build_topology()?;
        Ok(sb)
    }

    /// The sandbox's state directory, as this process sees it.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The state directory as the sandbox's own tools see it (inside the chroot).
    fn inner_path(&self) -> PathBuf {
        match &self.root {
            Some(root) => {
                Path::new("/").join(self.path().strip_prefix(root).unwrap_or(self.path()))
            }
            None => self.path().to_owned(),
        }
    }

    /// Environment for any OVS/OVN tool outside the sandbox's root pointed at this sandbox.
    pub fn env(&self) -> Vec<(String, String)> {
        Self::env_for(self.path())
    }

    fn env_for(dir: &Path) -> Vec<(String, String)> {
        let d = dir.to_string_lossy().into_owned();
        [
            "OVS_RUNDIR",
            "OVN_RUNDIR",
            "OVS_LOGDIR",
            "OVN_LOGDIR",
            "OVS_DBDIR",
        ]
        .into_iter()
        .map(|k| (k.to_owned(), d.clone()))
        .collect()
    }

    /// flowd's real programmer, aimed at this sandbox's `br-int`.
    pub fn ofctl(&self) -> Ofctl {
        self.env()
            .into_iter()
            .fold(Ofctl::new("br-int"), |o, (k, v)| o.with_env(k, v))
    }

    /// flowd's native programmer (its own OpenFlow connection to `br-int.mgmt`), aimed at this
    /// sandbox's `br-int`; it reads OVS with [`Sandbox::ofctl`].
    pub fn native(&self) -> Native {
        Native::new(
            self.ofctl(),
            Native::socket_path(Some(self.path()), "br-int"),
            std::time::Duration::from_secs(30),
        )
    }

    /// The sandbox's own build of `tool` (under chroot for OVN 25.03), pointed at its state.
    fn command(&self, tool: &str) -> Command {
        let program = program(self.root.as_deref(), tool);
        let mut c = match &self.root {
            Some(root) => {
                let mut c = Command::new("chroot");
                c.arg(root).arg(program);
                c
            }
            None => Command::new(program),
        };
        c.envs(Self::env_for(&self.inner_path()));
        c
    }

    fn output(&self, tool: &str, args: &[&str]) -> Result<Output> {
        self.command(tool)
            .args(args)
            .output()
            .with_context(|| format!("running {tool}"))
    }

    /// Runs a tool, failing with its stderr; returns its stdout.
    pub fn run(&self, tool: &str, args: &[&str]) -> Result<String> {
        let out = self.output(tool, args)?;
        if !out.status.success() {
            bail!(
                "{tool} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn vsctl(&self, args: &[&str]) -> Result<String> {
        let db = format!("--db=unix:{}", self.inner_path().join("db.sock").display());
        let mut all = vec![db.as_str(), TOOL_TIMEOUT];
        all.extend_from_slice(args);
        self.run("ovs-vsctl", &all)
    }

    pub fn nbctl(&self, args: &[&str]) -> Result<String> {
        let db = format!("--db=unix:{}", self.inner_path().join("nb.sock").display());
        let mut all = vec![db.as_str(), TOOL_TIMEOUT];
        all.extend_from_slice(args);
        self.run("ovn-nbctl", &all)
    }

    pub fn sbctl(&self, args: &[&str]) -> Result<String> {
        let db = format!("--db=unix:{}", self.inner_path().join("sb.sock").display());
        let mut all = vec![db.as_str(), TOOL_TIMEOUT];
        all.extend_from_slice(args);
        self.run("ovn-sbctl", &all)
    }

    /// The tunnel key OVN gave logical port `name`.
    pub fn port_key(&self, name: &str) -> Result<u32> {
        let key = self.sbctl(&[
            "--bare",
            "--columns=tunnel_key",
            "find",
            "port_binding",
            &format!("logical_port={name}"),
        ])?;
        Ok(key.trim().parse()?)
    }

    /// The node switch's tunnel key: its packets' `metadata` in br-int.
    pub fn switch_key(&self) -> Result<u32> {
        let key = self.sbctl(&[
            "--bare",
            "--columns=tunnel_key",
            "find",
            "datapath_binding",
            &format!("external_ids:name={}", Self::NODE),
        ])?;
        Ok(key.trim().parse()?)
    }

    /// `ovs-ofctl <args>` on br-int (e.g. `dump-flows`).
    pub fn ofctl_cmd(&self, args: &[&str]) -> Result<String> {
        self.run("ovs-ofctl", args)
    }

    /// Waits until ovn-controller has put every NB change into br-int.
    ///
    /// ovn-controller has been seen to die silently right after connecting to br-int when a dozen
    /// sandboxes start at once; such a sandbox gets it started again (said on stderr) rather than a
    /// test failing for a reason that is not flowd's.
    pub fn sync(&self) -> Result<()> {
        for attempt in 1..=SYNC_ATTEMPTS {
            let db = format!("--db=unix:{}", self.inner_path().join("nb.sock").display());
            match self.run("ovn-nbctl", &[&db, SYNC_TIMEOUT, "--wait=hv", "sync"]) {
                Ok(_) => return Ok(()),
                Err(e) if attempt == SYNC_ATTEMPTS => {
                    return Err(e).with_context(|| self.diagnosis());
                }
                Err(_) if !self.running("ovn-controller") => {
                    eprintln!(
                        "sandbox {}: ovn-controller is gone; starting it again\n{}",
                        self.path().display(),
                        self.diagnosis()
                    );
                    self.start_ovn_controller()?;
                }
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// What the OVN daemons said last, for a failure message.
    fn diagnosis(&self) -> String {
        let mut out = String::new();
        for name in ["ovn-controller", "ovn-northd", "ovs-vswitchd"] {
            let alive = self.running(name);
            let log = std::fs::read_to_string(self.path().join(format!("{name}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(12).collect();
            out += &format!("--- {name} (running: {alive}):\n");
            for l in tail.into_iter().rev() {
                out += l;
                out.push('\n');
            }
        }
        out
    }

    fn start_ovn_controller(&self) -> Result<()> {
        let p = |s: &str| self.inner_path().join(s).to_string_lossy().into_owned();
        self.run(
            "ovn-controller",
            &[
                &format!("unix:{}", p("db.sock")),
                "--detach",
                "--no-chdir",
                &format!("--pidfile={}", p("ovn-controller.pid")),
                &format!("--log-file={}", p("ovn-controller.log")),
            ],
        )
        .map(drop)
    }

    fn pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.path().join(format!("{name}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Whether the daemon of `name`'s pidfile runs. Pids wrap quickly here (pid_max 32768, thousands
    /// of short-lived tools): only a live process whose command line names this sandbox's directory
    /// counts. A zombie counts as gone: the detached daemon's parent is init, which may be slow to
    /// reap it.
    fn running(&self, name: &str) -> bool {
        let Some(pid) = self.pid(name) else {
            return false;
        };
        let live = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        });
        live && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            String::from_utf8_lossy(&c).contains(&*self.inner_path().to_string_lossy())
        })
    }

    /// Stops the daemon of `name`'s pidfile (SIGTERM, then SIGKILL), if it is ours, and waits for it.
    fn stop(&self, name: &str) {
        if let Some(pid) = self.pid(name).filter(|_| self.running(name)) {
            let _ = Command::new("kill").arg(pid.to_string()).output();
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.running(name) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.running(name) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
            }
        }
        let _ = std::fs::remove_file(self.path().join(format!("{name}.pid")));
    }

    /// Kills ovn-controller by its pid and starts it again; it wipes br-int when it reconnects.
    pub fn restart_ovn_controller(&self) -> Result<()> {
        self.stop("ovn-controller");
        self.start_ovn_controller()
    }

    fn build_topology(&self) -> Result<()> {
        let nb = |args: &[&str]| self.nbctl(args);
        nb(&["ls-add", "node1"])?;
        nb(&["lr-add", "ovn_cluster_router"])?;
        self.attach_to_router(
            "node1",
            ("rtos-node1", "stor-node1"),
            ROUTER_MAC,
            &[NODE_SUBNET_V4, NODE_SUBNET_V6],
        )?;
        // The exit: a second switch with one plain port the default routes point at.
        nb(&["ls-add", "ext"])?;
        self.attach_to_router(
            "ext",
            ("rtoe", "etor"),
            "0a:58:64:40:00:01",
            &["100.64.0.1/16", "fd98::1/64"],
        )?;
        nb(&[
            "lsp-add",
            "ext",
            "exthost",
            "--",
            "lsp-set-addresses",
            "exthost",
            &format!("{EXIT_HOST_MAC} 100.64.0.2 fd98::2"),
        ])?;
        nb(&[
            "lr-route-add",
            "ovn_cluster_router",
            "0.0.0.0/0",
            "100.64.0.2",
        ])?;
        nb(&["lr-route-add", "ovn_cluster_router", "::/0", "fd98::2"])?;
        // OVN-K always has load balancers on the node switch: packets go through conntrack.
        nb(&[
            "lb-add",
            "kube-dns",
            &format!("{KUBE_DNS_VIP}:53"),
            &format!("10.244.1.{KUBE_DNS_HOST}:53"),
            "udp",
        ])?;
        nb(&["ls-lb-add", "node1", "kube-dns"])?;
        // DNS over TCP too, as OVN-K writes kube-dns's `dns-tcp` port (a load balancer per protocol).
        nb(&[
            "lb-add",
            "kube-dns-tcp",
            &format!("{KUBE_DNS_VIP}:53"),
            &format!("10.244.1.{KUBE_DNS_HOST}:53"),
            "tcp",
        ])?;
        nb(&["ls-lb-add", "node1", "kube-dns-tcp"])?;
        // An AdminNetworkPolicy denying every pod of the node some destinations: tier 1, evaluated
        // before any EgressFirewall (on OVN without tiers, by priority).
        nb(&["pg-add", "anp_deny"])?;
        self.acl(
            "anp_deny",
            "to-lport",
            ANP_PRIORITY,
            &format!("inport == @anp_deny && ip4.dst == {ANP_DENIED}"),
            "drop",
            ANP_TIER,
        )?;
        if self.netdev.is_none() {
            // On netdev the exit host is a network namespace: see add_exit_host.
            self.add_ovs_port("exthost")?;
        }
        self.sync()
    }

    /// Puts `switch` on the cluster router: router port `ports.0` with `mac` and `networks`, and its
    /// peer `ports.1` on the switch.
    fn attach_to_router(
        &self,
        switch: &str,
        (lrp, lsp): (&str, &str),
        mac: &str,
        networks: &[&str],
    ) -> Result<()> {
        let mut add = vec!["lrp-add", "ovn_cluster_router", lrp, mac];
        add.extend_from_slice(networks);
        self.nbctl(&add)?;
        let peer = format!("router-port={lrp}");
        self.nbctl(&[
            "lsp-add",
            switch,
            lsp,
            "--",
            "lsp-set-type",
            lsp,
            "router",
            "--",
            "lsp-set-addresses",
            lsp,
            "router",
            "--",
            "lsp-set-options",
            lsp,
            &peer,
        ])
        .map(drop)
    }

    /// Adds an ACL to a port group with `options` (`--tier=N` first, dropped where this OVN has no
    /// tiers; then e.g. `--apply-after-lb`).
    fn acl(
        &self,
        pg: &str,
        dir: &str,
        prio: &str,
        m: &str,
        verdict: &str,
        options: &str,
    ) -> Result<()> {
        let mut args = vec!["--type=port-group"];
        args.extend(
            options
                .split_whitespace()
                .filter(|o| self.ovn.has_tiers() || !o.starts_with("--tier")),
        );
        args.extend(["acl-add", pg, dir, prio, m, verdict]);
        self.nbctl(&args).map(drop)
    }

    /// A NetworkPolicy on `namespace`'s pods as OVN-K renders it: ingress denied (to-lport on `outport`,
    /// OVN-K's default-deny priority 1000) except from `allowed` (1001, allow-related), in tier 2.
    pub fn deny_ingress(&self, namespace: &str, allowed: IpAddr) -> Result<()> {
        let np = Self::policy_group(namespace);
        let ip = if allowed.is_ipv4() { "ip4" } else { "ip6" };
        self.acl(
            &np,
            "to-lport",
            "1000",
            &format!("outport == @{np} && ip"),
            "drop",
            DEFAULT_TIER,
        )?;
        self.acl(
            &np,
            "to-lport",
            "1001",
            &format!("outport == @{np} && {ip}.src == {allowed}"),
            "allow-related",
            DEFAULT_TIER,
        )?;
        self.sync()
    }

    /// An internal OVS port bound to logical port `iface_id`; returns its name and ofport.
    fn add_ovs_port(&self, iface_id: &str) -> Result<(String, u32)> {
        let name = format!("p{}", self.next_port.fetch_add(1, Ordering::Relaxed));
        self.plug(&name, iface_id, Some("type=internal"))
    }

    /// Adds device `name` to br-int as an OVS port of `kind` (a `type=` setting; `None`: a system
    /// device such as a veth), bound to logical port `iface_id`; returns its name and ofport.
    fn plug(&self, name: &str, iface_id: &str, kind: Option<&str>) -> Result<(String, u32)> {
        let name = name.to_owned();
        let iface = format!("external_ids:iface-id={iface_id}");
        let mut args = vec!["add-port", "br-int", &name, "--", "set", "interface", &name];
        args.extend(kind);
        args.push(&iface);
        self.vsctl(&args)?;
        let ofport = self.ofport(&["get", "interface", &name, "ofport"])?;
        Ok((name, ofport))
    }

    /// The OpenFlow port of the interface `query` (`ovs-vsctl` arguments printing its `ofport`)
    /// names, once ovs-vswitchd has given it one.
    fn ofport(&self, query: &[&str]) -> Result<u32> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ofport = self.vsctl(query)?;
            if let Ok(p) = ofport.trim().parse::<i64>() {
                if p > 0 {
                    return Ok(u32::try_from(p)?);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no ofport for `ovs-vsctl {}`\n{}",
                    query.join(" "),
                    self.diagnosis()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn port_group(namespace: &str) -> String {
        let safe: String = namespace
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("pg_{safe}")
    }

    /// The port group of a namespace's NetworkPolicies (OVN-K keeps them apart from the EF's).
    fn policy_group(namespace: &str) -> String {
        format!("np{}", &Self::port_group(namespace)[2..])
    }

    fn exists(&self, table: &str, name: &str) -> Result<bool> {
        Ok(!self
            .nbctl(&[
                "--bare",
                "--columns=name",
                "find",
                table,
                &format!("name={name}"),
            ])?
            .trim()
            .is_empty())
    }

    /// The namespace's port group, made with its NetworkPolicy group on first use: every namespace's
    /// pods may egress (a from-lport allow after the load balancer, as a NetworkPolicy egress rule).
    fn ensure_port_group(&self, namespace: &str) -> Result<String> {
        let pg = Self::port_group(namespace);
        if !self.exists("port_group", &pg)? {
            self.nbctl(&["pg-add", &pg])?;
            let np = Self::policy_group(namespace);
            self.nbctl(&["pg-add", &np])?;
            let after_lb = format!("{DEFAULT_TIER} --apply-after-lb");
            self.acl(
                &np,
                "from-lport",
                "1001",
                &format!("inport == @{np} && ip"),
                "allow-related",
                &after_lb,
            )?;
        }
        Ok(pg)
    }

    /// Adds pod `namespace/name` with IPs `10.244.1.<host>` and `fd00:10:244:1::<host>` (hex), a
    /// logical port `<namespace>_<name>` in the namespace's port group, and its OVS port.
    pub fn add_pod(&self, namespace: &str, name: &str, host: u8) -> Result<Pod> {
        if self.netdev.is_some() {
            bail!("a netdev sandbox's pods are network namespaces: use Sandbox::add_netns_pod");
        }
        self.add_pod_plugged(namespace, name, host, |iface, _| self.add_ovs_port(iface))
    }

    /// [`Sandbox::add_pod`] on a netdev sandbox: the pod is a network namespace whose `eth0` has
    /// the pod's MAC and IPv4 address (IPv4 only) and a default route via the router, attached to
    /// br-int by a veth.
    pub fn add_netns_pod(&self, namespace: &str, name: &str, host: u8) -> Result<(Pod, Netns)> {
        let mut netns = None;
        let pod = self.add_pod_plugged(namespace, name, host, |iface, mac| {
            let cidr = format!("10.244.1.{host}/24");
            let (ns, port) =
                self.attach_netns(iface, mac, &cidr, &["default", "via", ROUTER_IPV4])?;
            netns = Some(ns);
            Ok(port)
        })?;
        Ok((pod, netns.context("no network namespace")?))
    }

    /// The host behind the exit on a netdev sandbox: a network namespace on the exit switch's plain
    /// port (its MAC, `100.64.0.2/16`), routing the pod subnets back via the router. Give it the
    /// addresses pods should reach (e.g. `ip route add local <net> dev lo`).
    pub fn add_exit_host(&self) -> Result<Netns> {
        let back = [CLUSTER_SUBNET_V4, "via", EXIT_ROUTER_IPV4];
        let (netns, _) = self.attach_netns("exthost", EXIT_HOST_MAC, EXIT_HOST_CIDR, &back)?;
        self.sync()?;
        Ok(netns)
    }

    /// A new network namespace attached to br-int, bound to logical port `iface_id`: its `eth0` gets
    /// `mac`, `cidr` and the route `route` (`ip route add` arguments). Returns it with the OVS port's
    /// name and ofport.
    fn attach_netns(
        &self,
        iface_id: &str,
        mac: &str,
        cidr: &str,
        route: &[&str],
    ) -> Result<(Netns, (String, u32))> {
        let netdev = self
            .netdev
            .as_ref()
            .context("network namespaces attach to a netdev sandbox only")?;
        let name = netdev
            .next_name()
            .with_context(|| format!("more than {NETNS_MAX} network namespaces"))?;
        let netns = Netns { name: name.clone() };
        ip(&["netns", "add", &name])?;
        ip(&[
            "link", "add", &name, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ])?;
        netns.ip(&["link", "set", "eth0", "address", mac])?;
        netns.ip(&["addr", "add", cidr, "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["link", "set", "lo", "up"])?;
        let mut add = vec!["route", "add"];
        add.extend_from_slice(route);
        netns.ip(&add)?;
        // The userspace datapath takes frames from the veth as the kernel hands them over: with
        // checksum offload on, TCP/UDP checksums are left to a NIC that is not there and OVS's
        // conntrack counts those packets invalid (OVN drops them: every connect times out); with
        // TSO/GSO/GRO it would get frames above the MTU.
        for (mut ethtool, dev) in [
            (netns.command("ethtool"), "eth0"),
            (Command::new("ethtool"), name.as_str()),
        ] {
            let out = ethtool
                .args(["-K", dev])
                .args([
                    "tx", "off", "rx", "off", "tso", "off", "gso", "off", "gro", "off",
                ])
                .output()
                .context("running ethtool")?;
            if !out.status.success() {
                bail!(
                    "ethtool -K {dev} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        ip(&["link", "set", &name, "up"])?;
        let port = self.plug(&name, iface_id, None)?;
        Ok((netns, port))
    }

    /// [`Sandbox::add_pod`] with its OVS port made by `plug` (given the iface-id and the MAC).
    fn add_pod_plugged(
        &self,
        namespace: &str,
        name: &str,
        host: u8,
        plug: impl FnOnce(&str, &str) -> Result<(String, u32)>,
    ) -> Result<Pod> {
        let key = PodKey::new(namespace, name);
        let iface = key.iface_id();
        let ipv4: IpAddr = format!("10.244.1.{host}").parse()?;
        let ipv6: IpAddr = format!("fd00:10:244:1::{host:x}").parse()?;
        let mac = format!("0a:58:0a:f4:01:{host:02x}");
        self.nbctl(&[
            "lsp-add",
            "node1",
            &iface,
            "--",
            "lsp-set-addresses",
            &iface,
            &format!("{mac} {ipv4} {ipv6}"),
        ])?;
        let pg = self.ensure_port_group(namespace)?;
        let lsp = self.nbctl(&["get", "logical_switch_port", &iface, "_uuid"])?;
        for group in [pg, Self::policy_group(namespace), "anp_deny".to_owned()] {
            self.nbctl(&["add", "port_group", &group, "ports", lsp.trim()])?;
        }
        let (port, ofport) = plug(&iface, &mac)?;
        self.sync()?;
        Ok(Pod {
            key,
            ipv4,
            ipv6,
            mac,
            ofport,
            port,
        })
    }

    /// Adds `kube-system/coredns`, the kube-dns load balancer's backend ([`KUBE_DNS_HOST`]).
    pub fn add_dns_server(&self) -> Result<Pod> {
        self.add_pod("kube-system", "coredns", KUBE_DNS_HOST)
    }

    /// Makes a second node and a CoreDNS pod on it, `kube-system/coredns-node2`, the kube-dns load
    /// balancer's only backend from then on; queries to [`KUBE_DNS_VIP`] leave this node in Geneve.
    ///
    /// As OVN-K builds it: `node2`'s switch on the cluster router, the pod's logical port bound to
    /// chassis `node2`. That chassis is only a row in the southbound database (no ovn-controller runs
    /// for it); this node's ovn-controller makes the tunnel to it, a real (userspace) Geneve port whose
    /// underlay is `br-phys` ([`UNDERLAY_LOCAL`]) with one dummy port for the wire. What node2 sends
    /// back, [`Sandbox::send_from_remote_dns`] puts on that wire. Dummy datapath only.
    pub fn add_remote_dns_server(&self) -> Result<RemoteDns> {
        if self.netdev.is_some() {
            bail!("a remote node is made on the dummy datapath only");
        }
        let appctl = |args: &[&str]| self.run("ovs-appctl", args);
        self.vsctl(&[
            "add-br",
            "br-phys",
            "--",
            "set",
            "bridge",
            "br-phys",
            "datapath_type=dummy",
            "--",
            "add-port",
            "br-phys",
            "wire",
            "--",
            "set",
            "interface",
            "wire",
            "type=dummy",
        ])?;
        appctl(&[
            "netdev-dummy/ip4addr",
            "br-phys",
            &format!("{UNDERLAY_LOCAL}/24"),
        ])?;
        appctl(&["ovs/route/add", UNDERLAY_PREFIX, "br-phys"])?;
        appctl(&[
            "tnl/neigh/set",
            "br-phys",
            UNDERLAY_REMOTE,
            UNDERLAY_REMOTE_MAC,
        ])?;
        self.vsctl(&[
            "set",
            "open_vswitch",
            ".",
            &format!("external_ids:ovn-encap-ip={UNDERLAY_LOCAL}"),
        ])?;

        let key = PodKey::new("kube-system", "coredns-node2");
        let iface = key.iface_id();
        let ipv4: IpAddr = format!("10.244.2.{KUBE_DNS_HOST}").parse()?;
        let nb = |args: &[&str]| self.nbctl(args);
        let rtos = format!("rtos-{NODE2}");
        let stor = format!("stor-{NODE2}");
        nb(&["ls-add", NODE2])?;
        self.attach_to_router(
            NODE2,
            (&rtos, &stor),
            NODE2_ROUTER_MAC,
            &[NODE2_SUBNET_V4, NODE2_SUBNET_V6],
        )?;
        nb(&[
            "lsp-add",
            NODE2,
            &iface,
            "--",
            "lsp-set-addresses",
            &iface,
            &format!("0a:58:0a:f4:02:{KUBE_DNS_HOST:02x} {ipv4}"),
        ])?;
        for lb in ["kube-dns", "kube-dns-tcp"] {
            nb(&[
                "set",
                "load_balancer",
                lb,
                &format!("vips:\"{KUBE_DNS_VIP}:53\"=\"{ipv4}:53\""),
            ])?;
        }
        self.sync()?;
        self.sbctl(&["chassis-add", NODE2, "geneve", UNDERLAY_REMOTE])?;
        self.sbctl(&["lsp-bind", &iface, NODE2])?;
        self.sync()?;

        // The tunnel ovn-controller makes to node2.
        self.ofport(&[
            "--bare",
            "--columns=ofport",
            "find",
            "interface",
            "type=geneve",
        ])?;
        let local_mac = self
            .vsctl(&["get", "interface", "br-phys", "mac_in_use"])?
            .trim()
            .trim_matches('"')
            .to_owned();
        let wire_ofport = self.ofport(&["get", "interface", "wire", "ofport"])?;
        Ok(RemoteDns {
            key,
            ipv4,
            local_mac,
            wire_ofport,
        })
    }

    /// Packets this node has put on the underlay's wire: what it sent node2 through the tunnel.
    pub fn underlay_sent(&self, dns: &RemoteDns) -> Result<u64> {
        Ok(self.bridge_port_stats("br-phys", dns.wire_ofport)?.tx)
    }

    /// Node2's CoreDNS answers `to` (from UDP port 53 to `to_port`) with `payload`, as OVN on node2
    /// sends it: through node2's switch, the router and this node's switch there (so from the router's
    /// MAC), then in Geneve to this node, the VNI naming this node's switch and OVN's option its
    /// logical ingress (the router port) and egress (`to`'s) ports; received on the underlay's wire.
    pub fn send_from_remote_dns(
        &self,
        dns: &RemoteDns,
        to: &Pod,
        to_port: u16,
        payload: &[u8],
    ) -> Result<()> {
        let (IpAddr::V4(src), IpAddr::V4(dst)) = (dns.ipv4, to.ipv4) else {
            bail!("{} or {} has no IPv4 address", dns.key, to.key);
        };
        let inner =
            etherparse::PacketBuilder::ethernet2(mac_bytes(ROUTER_MAC)?, mac_bytes(&to.mac)?)
                .ipv4(src.octets(), dst.octets(), 63)
                .udp(53, to_port);
        let ingress = self.port_key(&format!("stor-{}", Self::NODE))?;
        let egress = self.port_key(&to.key.iface_id())?;
        let mut geneve = Vec::with_capacity(16 + inner.size(payload.len()));
        // Version 0, 2 words of options; the critical-option flag; Transparent Ethernet Bridging.
        geneve.extend_from_slice(&[0x02, 0x40, 0x65, 0x58]);
        geneve.extend_from_slice(&(self.switch_key()? << 8).to_be_bytes());
        geneve.extend_from_slice(&OVN_GENEVE_CLASS.to_be_bytes());
        geneve.extend_from_slice(&[OVN_GENEVE_TYPE, 1]);
        geneve.extend_from_slice(&((ingress << 16) | egress).to_be_bytes());
        inner.write(&mut geneve, payload)?;
        let outer = etherparse::PacketBuilder::ethernet2(
            mac_bytes(UNDERLAY_REMOTE_MAC)?,
            mac_bytes(&dns.local_mac)?,
        )
        .ipv4(
            UNDERLAY_REMOTE.parse::<std::net::Ipv4Addr>()?.octets(),
            UNDERLAY_LOCAL.parse::<std::net::Ipv4Addr>()?.octets(),
            64,
        )
        .udp(49152, GENEVE_PORT);
        let mut frame = Vec::with_capacity(outer.size(geneve.len()));
        outer.write(&mut frame, &geneve)?;
        self.receive("wire", &[frame])
    }

    /// Deletes a pod's logical and OVS ports and makes them again, as a pod recreated under the same
    /// name: same iface-id and addresses, a new OVS port and a new logical port key (a filler port
    /// takes the old key first).
    pub fn recreate_pod(&self, pod: &Pod) -> Result<Pod> {
        let iface = pod.key.iface_id();
        let selector = format!("external_ids:iface-id={iface}");
        let port = self.vsctl(&["--bare", "--columns=name", "find", "interface", &selector])?;
        self.vsctl(&["del-port", "br-int", port.trim()])?;
        self.nbctl(&["lsp-del", &iface])?;
        self.nbctl(&["lsp-add", "node1", &format!("filler-{}", pod.ofport)])?;
        let host = match pod.ipv4 {
            IpAddr::V4(v4) => v4.octets()[3],
            IpAddr::V6(_) => bail!("pods have an IPv4 address first"),
        };
        self.add_pod(&pod.key.namespace, &pod.key.name, host)
    }

    /// The IP OVN-K's own resolution gives rule `i`'s `dnsName` in these sandboxes: never one the
    /// tests resolve for a pod (a pod often gets other IPs than the controller did).
    pub fn controller_ip(i: usize) -> IpAddr {
        IpAddr::from([192, 0, 2, u8::try_from(i % 250).unwrap_or(0) + 1])
    }

    /// Replaces the namespace's EgressFirewall ACLs with `rules`, as OVN-K renders them, its own
    /// resolution of each `dnsName` rule `i` being [`Sandbox::controller_ip`].
    pub fn set_egress_firewall(&self, rules: &FirewallRules) -> Result<()> {
        let resolved: Resolved = (0..rules.rules.len())
            .map(|i| (i, vec![Self::controller_ip(i)]))
            .collect();
        self.set_egress_firewall_resolved(rules, &[(None, &resolved)])
    }

    /// Replaces the namespace's EgressFirewall ACLs with `rules`, as OVN-K renders them had it resolved
    /// each `dnsName` rule `i` to `resolved[i]`: for the whole namespace (`None`, as OVN-K does), or for
    /// one pod only (the differential oracle's reference: what flowd grants, written as OVN's own ACLs
    /// on address sets). No entry: OVN-K resolved nothing (a wildcard, say).
    pub fn set_egress_firewall_resolved(
        &self,
        rules: &FirewallRules,
        resolved: &[(Option<&Pod>, &Resolved)],
    ) -> Result<()> {
        let pg = self.ensure_port_group(&rules.namespace)?;
        self.nbctl(&["--type=port-group", "acl-del", &pg])?;
        for (i, rule) in rules.rules.iter().enumerate() {
            let mut matches = Vec::new();
            match &rule.destination {
                Destination::Cidr(net) => {
                    let (ip, cluster) = if net.addr().is_ipv4() {
                        ("ip4", CLUSTER_SUBNET_V4)
                    } else {
                        ("ip6", CLUSTER_SUBNET_V6)
                    };
                    // An EgressFirewall is about traffic leaving the cluster: OVN-K leaves the pod
                    // subnets out of a CIDR that covers them (`clusterSubnetIntersection`), so that
                    // a Deny 0.0.0.0/0 does not cut pods off their DNS server.
                    let cluster: ipnet::IpNet = cluster.parse()?;
                    let exclusion =
                        if net.contains(&cluster.network()) || cluster.contains(&net.network()) {
                            format!(" && {ip}.dst != {cluster}")
                        } else {
                            String::new()
                        };
                    matches.push(format!("{ip}.dst == {net}{exclusion} && inport == @{pg}"));
                }
                Destination::DnsName(_) => {
                    // OVN-K's own resolution: an address set per family.
                    for (scope, resolved) in resolved {
                        let (base, inport) = match scope {
                            None => (format!("{pg}_{i}"), format!("@{pg}")),
                            Some(pod) => (
                                format!("{pg}_{i}_{}", pod.ofport),
                                format!("\"{}\"", pod.key.iface_id()),
                            ),
                        };
                        let ips = resolved.get(&i).map(Vec::as_slice).unwrap_or_default();
                        for (fam, v4) in [("v4", true), ("v6", false)] {
                            let name = format!("{base}_{fam}");
                            if !self.exists("address_set", &name)? {
                                self.nbctl(&["create", "address_set", &format!("name={name}")])?;
                            }
                            let addrs: Vec<String> = ips
                                .iter()
                                .filter(|ip| ip.is_ipv4() == v4)
                                .map(|ip| format!("\"{ip}\""))
                                .collect();
                            let set = format!("addresses=[{}]", addrs.join(","));
                            self.nbctl(&["set", "address_set", &name, &set])?;
                        }
                        matches.push(format!(
                            "(ip4.dst == ${base}_v4 || ip6.dst == ${base}_v6) && inport == {inport}"
                        ));
                    }
                }
                Destination::NodeSelector(_) => continue,
            }
            let ports: Vec<String> = rule
                .ports
                .iter()
                .map(|p| {
                    let proto = match p.protocol {
                        Protocol::Tcp => "tcp",
                        Protocol::Udp => "udp",
                        Protocol::Sctp => "sctp",
                    };
                    format!("({proto} && {proto}.dst == {})", p.port)
                })
                .collect();
            let action = match rule.verdict {
                Verdict::Allow => "allow",
                Verdict::Deny => "drop",
            };
            let priority = (10000 - i).to_string();
            for m in matches {
                let m = if ports.is_empty() {
                    m
                } else {
                    format!("{m} && ({})", ports.join(" || "))
                };
                self.acl(&pg, "to-lport", &priority, &m, action, DEFAULT_TIER)?;
            }
        }
        self.sync()
    }

    /// Whether a TCP/443 packet from `pod` to `to`, a pod on the same switch (so addressed to its MAC,
    /// not the router's), reaches it.
    pub fn trace_to_pod(&self, pod: &Pod, to: &Pod) -> Result<Trace> {
        self.trace_via(pod, &to.mac, to.ipv4, Some((Protocol::Tcp, 443)))
    }

    /// Whether a packet from `pod` to `dst` (`proto`/`port`, or plain IP when `None`) is forwarded or
    /// dropped by br-int, read from the last conntrack pass of `ofproto/trace`.
    pub fn trace(&self, pod: &Pod, dst: IpAddr, l4: Option<(Protocol, u16)>) -> Result<Trace> {
        self.trace_via(pod, ROUTER_MAC, dst, l4)
    }

    fn trace_via(
        &self,
        pod: &Pod,
        dl_dst: &str,
        dst: IpAddr,
        l4: Option<(Protocol, u16)>,
    ) -> Result<Trace> {
        let (src, v6) = match dst {
            IpAddr::V4(_) => (pod.ipv4, false),
            IpAddr::V6(_) => (pod.ipv6, true),
        };
        let proto = match (l4.map(|(p, _)| p), v6) {
            (None, false) => "ip",
            (None, true) => "ipv6",
            (Some(Protocol::Tcp), false) => "tcp",
            (Some(Protocol::Tcp), true) => "tcp6",
            (Some(Protocol::Udp), false) => "udp",
            (Some(Protocol::Udp), true) => "udp6",
            (Some(Protocol::Sctp), false) => "sctp",
            (Some(Protocol::Sctp), true) => "sctp6",
        };
        let (sf, df) = if v6 {
            ("ipv6_src", "ipv6_dst")
        } else {
            ("nw_src", "nw_dst")
        };
        let mut flow = format!(
            "in_port={},dl_src={},dl_dst={dl_dst},{proto},{sf}={src},{df}={dst},nw_ttl=64",
            pod.ofport, pod.mac
        );
        if let Some((p, port)) = l4 {
            // ofproto/trace wants the protocol's own field names (tp_dst is refused for UDP and SCTP).
            let f = match p {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
                Protocol::Sctp => "sctp",
            };
            flow += &format!(",{f}_src=40000,{f}_dst={port}");
        }
        let out = self.run(
            "ovs-appctl",
            &[
                "ofproto/trace",
                "br-int",
                &flow,
                "--ct-next",
                "trk,new",
                "--ct-next",
                "trk,new",
                "--ct-next",
                "trk,new",
            ],
        )?;
        let last = out
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("Datapath actions: "))
            .with_context(|| format!("no datapath actions in trace:\n{out}"))?;
        Ok(if forwards(last) {
            Trace::Forwarded
        } else {
            Trace::Dropped
        })
    }

    /// `pod` sends `packet`: br-int receives it on the pod's port (`netdev-dummy/receive`), a real
    /// packet through the datapath and conntrack, unlike [`Sandbox::trace`]'s.
    pub fn send_udp(&self, pod: &Pod, packet: &Udp) -> Result<()> {
        self.run(
            "ovs-appctl",
            &["netdev-dummy/receive", &pod.port, &packet.odp_key(pod)],
        )
        .map(drop)
    }

    /// Puts the Ethernet frames on `pod`'s port, in order, as if the pod had sent them: one call
    /// (netdev-dummy queues at most 100 packets per port).
    pub fn send_frames(&self, pod: &Pod, frames: &[Vec<u8>]) -> Result<()> {
        self.receive(&pod.port, frames)
    }

    /// `netdev-dummy/receive` of `frames` on OVS port `port`.
    fn receive(&self, port: &str, frames: &[Vec<u8>]) -> Result<()> {
        let hex: Vec<String> = frames
            .iter()
            .map(|f| f.iter().map(|b| format!("{b:02x}")).collect())
            .collect();
        let mut args = vec!["netdev-dummy/receive", port];
        args.extend(hex.iter().map(String::as_str));
        self.run("ovs-appctl", &args).map(drop)
    }

    /// The packet counters of `pod`'s OVS port.
    pub fn port_stats(&self, pod: &Pod) -> Result<PortStats> {
        self.bridge_port_stats("br-int", pod.ofport)
    }

    fn bridge_port_stats(&self, bridge: &str, ofport: u32) -> Result<PortStats> {
        let out = self.ofctl_cmd(&["dump-ports", bridge, &ofport.to_string()])?;
        let count = |dir: &str| {
            out.split(&format!("{dir} pkts="))
                .nth(1)
                .and_then(|r| r.split(',').next())
                .and_then(|n| n.trim().parse().ok())
                .with_context(|| format!("no {dir} pkts in dump-ports:\n{out}"))
        };
        Ok(PortStats {
            rx: count("rx")?,
            tx: count("tx")?,
        })
    }

    /// Waits for a round of ovs-vswitchd's revalidators: a packet that hit a datapath flow already
    /// cached is credited to its OpenFlow flows (`n_packets`) only then, not when it passes.
    pub fn credit_flow_stats(&self) -> Result<()> {
        self.run("ovs-appctl", &["revalidator/wait"]).map(drop)
    }

    /// Removes every ACL and the load balancer: the node switch then sends nothing through conntrack,
    /// unlike an OVN-K node switch (whose Services' load balancers are always there).
    pub fn remove_stateful_config(&self) -> Result<()> {
        let groups = self.nbctl(&["--bare", "--columns=name", "list", "port_group"])?;
        for pg in groups.split_whitespace() {
            self.nbctl(&["--type=port-group", "acl-del", pg])?;
        }
        self.nbctl(&["ls-lb-del", Self::NODE, "kube-dns"])?;
        self.nbctl(&["ls-lb-del", Self::NODE, "kube-dns-tcp"])?;
        self.sync()
    }

    /// Our flows (dnsflow cookie prefix) as `ovs-ofctl dump-flows` prints them.
    pub fn dnsflow_flows(&self, prefix: u32) -> Result<Vec<String>> {
        let filter = format!("cookie={:#x}/0xffffffff00000000", u64::from(prefix) << 32);
        Ok(self
            .ofctl_cmd(&["dump-flows", "--no-names", "br-int", &filter])?
            .lines()
            .filter(|l| l.contains("cookie="))
            .map(str::to_owned)
            .collect())
    }

    /// OVN's table-0 flows per ofport (to check the pods are bound).
    pub fn bound_ports(&self) -> Result<HashMap<u32, String>> {
        let dump = self.ofctl_cmd(&["dump-flows", "--no-names", "br-int", "table=0"])?;
        Ok(dump
            .lines()
            .filter_map(|l| {
                let p = l
                    .split([',', ' '])
                    .find_map(|t| t.strip_prefix("in_port="))?;
                Some((p.parse().ok()?, l.to_owned()))
            })
            .collect())
    }
}

/// A datapath action list forwards when, once `ct(...)` and `recirc(...)` are set aside, some top-level
/// action is an output (a port number, or a tunnel push).
fn forwards(actions: &str) -> bool {
    let mut depth = 0;
    let mut token = String::new();
    let mut tokens = Vec::new();
    for c in actions.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                tokens.push(std::mem::take(&mut token));
                continue;
            }
            _ => {}
        }
        token.push(c);
    }
    tokens.push(token);
    tokens
        .iter()
        .map(|t| t.trim())
        .any(|t| t.parse::<u32>().is_ok() || t.starts_with("tnl_push") || t.starts_with("output"))
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(netdev) = &self.netdev {
            netdev.remove_namespaces();
        }
        for name in [
            "ovn-controller",
            "ovn-northd",
            "ovs-vswitchd",
            "ovsdb-sb",
            "ovsdb-nb",
            "ovsdb-server",
        ] {
            self.stop(name);
        }
        if self.netdev.is_some() {
            for tap in NETDEV_TAPS {
                remove_tap(tap);
            }
        }
    }
}

#[test]
fn datapath_actions_are_read_as_the_oracle_expects() {
    assert!(forwards(
        "ct(commit,zone=5,mark=0/0x1,nat(src)),set(eth(src=0a:58:64:40:00:01,dst=0a:58:64:40:00:02)),set(ipv4(ttl=63)),4"
    ));
    assert!(!forwards("ct(commit,zone=5,mark=0/0x1,nat(src))"));
    assert!(!forwards("ct(zone=5,nat),recirc(0x1)"));
    assert!(!forwards("drop"));
}

/// The resolvers a node of this sandbox trusts: the kube-dns Service's address, as flowd reads it
/// from the Service.
pub fn kube_dns() -> tokio::sync::watch::Receiver<flowd::resolvers::ResolverSet> {
    flowd::resolvers::fixed([std::net::SocketAddr::new(
        KUBE_DNS_VIP.parse().expect("an IPv4 address"),
        53,
    )])
}

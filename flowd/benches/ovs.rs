//! flowd's OVS figures, measured on a real OVN 23.03 sandbox (built here, in a temp dir), for each
//! driver: `native` (flowd's own OpenFlow connection, one bundle per batch) and `ofctl` (one
//! `ovs-ofctl --bundle` process per batch):
//!
//! - grant install: one answer → its flow committed in OVS (the bundle acknowledged), p50/p99 over
//!   1,000 answers one after the other;
//! - DNS event → flow present in OVS (seen by an independent `ovs-ofctl monitor`), p50/p99, at 100 and
//!   1,000 events/s;
//! - 50,000 flows installed from cold (a restarted engine fed its whole answer cache at once);
//! - DNS response hold time (packet-in arrived → resumed, grants written in between), p50/p99, at 1,
//!   100 and 1,000 responses/s, real query/reply packets through the sandbox's datapath;
//! - a full reconcile of 100,000 flows (nothing to change; then after a wipe of all of them);
//! - the engine's peak RSS (VmHWM) holding 100,000 flows, in a child process of its own;
//! - answer memory (`memory`, no sandbox needed): one pod resolves 100,000 distinct names its rule
//!   allows, so past the per-pod cap every answer evicts a remembered one, while a second pod's
//!   answers arrive on another thread; `Engine::on_dns` latency of each pod, p50/p99, lock wait
//!   included.
//!
//! Run: `cargo bench -p flowd --bench ovs` (release build; prints the figures). Arguments select
//! cases by name: `-- memory` runs only the answer memory case, `-- sandbox` only the OVS ones.

#![allow(clippy::unwrap_used)]

#[path = "../tests/it/sandbox.rs"]
#[allow(dead_code)]
mod sandbox;

use anyhow::{Context, Result};
use dnsflow_dnstap::{Answer, DnsName, DnsResponse};
use flowd::{
    config::EngineSettings,
    egressfirewall::EgressFirewall,
    engine::Engine,
    hold::{HoldFlows, Holder, Resumer},
    model::PodInfo,
    ovs::{flow, FlowEvent, Native, Ofctl, Recording},
    rules::FirewallRules,
};
use sandbox::Sandbox;
use serde_json::json;
use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

const NS: &str = "bench";
const PODS: u8 = 20;
/// Addresses per answer in the bulk phases (CDN answers carry several).
const IPS_PER_ANSWER: u32 = 10;
/// Set in the child process that measures RSS: the sandbox directory to use.
const RSS_CHILD_ENV: &str = "FLOWD_BENCH_RSS_CHILD";

fn rules() -> FirewallRules {
    let ef = EgressFirewall::inline(
        NS,
        json!([
            {"type": "Allow", "to": {"dnsName": "example.com"}},
            {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}
        ]),
    );
    FirewallRules::from_egress_firewall(&ef.unwrap()).unwrap()
}

fn pod_info(i: u8) -> PodInfo {
    PodInfo {
        uid: None,
        key: flowd::model::PodKey::new(NS, format!("pod{i}")),
        ips: vec![format!("10.244.1.{}", 10 + i).parse().unwrap()],
        node: Sandbox::NODE.into(),
    }
}

/// The `k`-th distinct answer address (11.0.0.0/8).
fn dst(k: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0b00_0000 + k)
}

fn answer(pod: u8, name: u32, ips: impl Iterator<Item = Ipv4Addr>) -> DnsResponse {
    let answers = ips
        .map(|ip| Answer {
            ip: ip.into(),
            ttl: 300,
        })
        .collect();
    let qname = DnsName::new(&format!("n{name}.example.com")).unwrap();
    DnsResponse {
        sequence: u64::from(name),
        ..DnsResponse::noerror(pod_info(pod).ips[0], qname, Vec::new(), answers)
    }
}

fn engine(programmer: Native) -> Engine<Native> {
    // One namespace holds every grant here: lift the per-namespace and per-pod caps.
    let settings = EngineSettings {
        max_grants_per_pod: 1_000_000,
        max_grants_per_namespace: 1_000_000,
        ..EngineSettings::default()
    };
    let e = Engine::new(settings, programmer);
    e.set_node(Sandbox::NODE);
    e.set_rules(rules());
    for i in 0..PODS {
        e.upsert_pod(pod_info(i));
    }
    e
}

/// Feeds `flows` flows (answers of IPS_PER_ANSWER addresses, round robin over the pods) from `first`.
fn feed(e: &Engine<Native>, first: u32, flows: u32) {
    let now = Instant::now();
    let mut k = first;
    let mut name = first / IPS_PER_ANSWER;
    while k < first + flows {
        let n = IPS_PER_ANSWER.min(first + flows - k);
        e.on_dns(
            answer((name % u32::from(PODS)) as u8, name, (k..k + n).map(dst)),
            now,
        );
        k += n;
        name += 1;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn clear(sb: &Sandbox) -> Result<()> {
    let filter = format!(
        "cookie={:#x}/0xffffffff00000000",
        u64::from(EngineSettings::default().cookie_prefix) << 32
    );
    sb.ofctl_cmd(&["del-flows", "br-int", &filter]).map(drop)
}

/// Grants whose flows are all in OVS: each allow grant is one flow per conntrack-hint variant of the
/// template (two on a switch with a load balancer).
fn count(sb: &Sandbox, e: &Engine<Native>) -> Result<usize> {
    let variants = e.template().map_or(1, |t| t.allow.len().max(1));
    Ok(sb
        .dnsflow_flows(EngineSettings::default().cookie_prefix)?
        .len()
        / variants)
}

/// Event → flow in OVS at `rate` events/s for `secs` seconds; returns sorted latencies.
async fn latency(
    sb: &Sandbox,
    e: &Engine<Native>,
    rate: u32,
    secs: u32,
    first: u32,
) -> Result<Vec<Duration>> {
    let sent: Arc<Mutex<HashMap<IpAddr, Instant>>> = Arc::default();
    let seen: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let mut monitor = Command::new("ovs-ofctl")
        .args(["monitor", "br-int", "watch:!initial,table=46", "--no-names"])
        .envs(sb.env())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let events = monitor.stderr.take().context("monitor stderr")?;
    let reader = {
        let (sent, seen) = (Arc::clone(&sent), Arc::clone(&seen));
        std::thread::spawn(move || {
            for line in BufReader::new(events).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                if let Some(FlowEvent::Added(f)) = flow::parse_monitor_line(&line) {
                    if let Some(d) = f.fields.and_then(|m| m.dst) {
                        if let Some(t0) = sent.lock().unwrap().remove(&d) {
                            seen.lock().unwrap().push(at - t0);
                        }
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let total = rate * secs;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let start = tokio::time::Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(start + period * i).await;
        let ip = dst(first + i);
        sent.lock().unwrap().insert(ip.into(), Instant::now());
        e.on_dns(
            answer((i % u32::from(PODS)) as u8, first + i, std::iter::once(ip)),
            Instant::now(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().len() < total as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = monitor.kill();
    let _ = monitor.wait();
    let _ = reader.join();
    let mut v = seen.lock().unwrap().clone();
    anyhow::ensure!(
        v.len() == total as usize,
        "only {} of {total} flows seen",
        v.len()
    );
    v.sort();
    Ok(v)
}

/// In a process of its own: an engine that installs 100,000 flows into the sandbox at `dir`, reconciles
/// once, and reports its peak and current RSS.
fn rss_child(dir: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let ofctl = ["OVS_RUNDIR", "OVN_RUNDIR"]
            .into_iter()
            .fold(Ofctl::new("br-int"), |o, k| o.with_env(k, dir));
        let native = Native::new(
            ofctl,
            Native::socket_path(Some(std::path::Path::new(dir)), "br-int"),
            Duration::from_secs(30),
        );
        let e = engine(native);
        feed(&e, 0, 100_000);
        e.flush().await?;
        e.reconcile().await?;
        anyhow::ensure!(
            e.metrics_snapshot().flows_desired == 100_000,
            "not 100,000 flows"
        );
        println!(
            "{} {}",
            dnsflow_testkit::proc_status_kib(None, "VmHWM").unwrap_or(0),
            dnsflow_testkit::proc_status_kib(None, "VmRSS").unwrap_or(0)
        );
        Ok(())
    })
}

/// Records when each held packet arrived and how long it was held until resumed.
struct Timed {
    engine: Engine<Native>,
    arrived: Arc<Mutex<HashMap<bytes::Bytes, Instant>>>,
    held: Arc<Mutex<Vec<Duration>>>,
}

impl Resumer for Timed {
    async fn resume(&self, held: &dnsflow_openflow::PacketIn2) -> Result<(), String> {
        let result = Resumer::resume(&self.engine, held).await;
        // By the packet itself: held replies to different pods may share a continuation (the hold
        // flow names no port), each reply is a name of its own.
        if let Some(t0) = self.arrived.lock().unwrap().remove(&held.packet) {
            self.held.lock().unwrap().push(t0.elapsed());
        }
        result
    }
}

/// The reply for answer `k`: a new name and a new address each.
fn dns_reply(k: u32) -> Result<Vec<u8>> {
    sandbox::dns_answer(&format!("h{k}.example.com."), dst(900_000 + k))
}

/// DNS response hold time at 1, 100 and 1,000 responses/s: queries and replies injected in groups
/// every 20 ms (one `netdev-dummy/receive` per group and direction), each reply a new name and
/// address, so each needs its grant written before it is resumed.
async fn hold_times(sb: &Sandbox, pods: &[sandbox::Pod], dns: &sandbox::Pod) -> Result<()> {
    let native = sb.native();
    let mut packet_ins = native.packet_ins();
    let e = engine(native);
    let task = tokio::spawn(e.clone().run());
    e.flush().await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(e.template().is_some() && e.held_pods().len() == usize::from(PODS)) {
        anyhow::ensure!(Instant::now() < deadline, "pods never held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The replies come straight from the DNS pod: it is the one resolver trusted.
    let resolvers = || flowd::resolvers::fixed([std::net::SocketAddr::new(dns.ipv4, 53)]);
    let mut holds = HoldFlows::new(e.clone(), Duration::from_secs(600), resolvers());
    holds.refresh().await.map_err(anyhow::Error::msg)?;
    let arrived: Arc<Mutex<HashMap<bytes::Bytes, Instant>>> = Arc::default();
    let held: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let (tx, rx) = tokio::sync::mpsc::channel(65_536);
    {
        let arrived = arrived.clone();
        tokio::spawn(async move {
            while let Some(p) = packet_ins.recv().await {
                arrived
                    .lock()
                    .unwrap()
                    .insert(p.packet.clone(), Instant::now());
                if tx.send(p).await.is_err() {
                    break;
                }
            }
        });
    }
    let timed = Timed {
        engine: e.clone(),
        arrived,
        held: held.clone(),
    };
    let holder = Holder::new(
        e.clone(),
        Arc::new(timed),
        Duration::from_millis(100),
        resolvers(),
    );
    let metrics = holder.metrics().clone();
    tokio::spawn(holder.run(rx));
    let mut k = 0u32;
    for (rate, total) in [(1u32, 5u32), (100, 300), (1000, 2000)] {
        held.lock().unwrap().clear();
        let misses = metrics.deadline_misses.get();
        // netdev-dummy queues at most 100 packets per port: 20 per call stays well inside it.
        let per_group = (rate / 50).max(1);
        let gap = Duration::from_secs_f64(f64::from(per_group) / f64::from(rate));
        let start = tokio::time::Instant::now();
        let mut sent = 0;
        let mut group = 0u32;
        while sent < total {
            tokio::time::sleep_until(start + gap * group).await;
            group += 1;
            let n = per_group.min(total - sent);
            let mut queries: HashMap<usize, Vec<Vec<u8>>> = HashMap::new();
            let mut replies = Vec::new();
            for _ in 0..n {
                let i = (k % u32::from(PODS)) as usize;
                let port = 20_000 + (k % 40_000) as u16;
                queries.entry(i).or_default().push(sandbox::udp_frame(
                    &pods[i],
                    dns,
                    (port, 53),
                    &[0; 12],
                )?);
                replies.push(sandbox::udp_frame(
                    dns,
                    &pods[i],
                    (53, port),
                    &dns_reply(k)?,
                )?);
                k += 1;
            }
            for (i, frames) in queries {
                sb.send_frames(&pods[i], &frames)?;
            }
            sb.send_frames(dns, &replies)?;
            sent += n;
        }
        let until = Instant::now() + Duration::from_secs(10);
        while held.lock().unwrap().len() < total as usize && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut v = held.lock().unwrap().clone();
        anyhow::ensure!(
            v.len() == total as usize,
            "only {} of {total} held",
            v.len()
        );
        v.sort();
        // Responses over the rate limits go on unheld at once: they would flatter the figures.
        anyhow::ensure!(
            metrics.rate_limited.get() + metrics.unheld.get() == 0,
            "{} rate-limited, {} unheld: not all were held",
            metrics.rate_limited.get(),
            metrics.unheld.get()
        );
        println!(
            "[  hold] DNS response hold time at {rate:>4} responses/s: p50 {}  p99 {}  max {}  ({} held, {} past the 100 ms deadline)",
            ms(percentile(&v, 0.5)),
            ms(percentile(&v, 0.99)),
            ms(*v.last().unwrap()),
            v.len(),
            metrics.deadline_misses.get() - misses,
        );
    }
    holds.clear().await.map_err(anyhow::Error::msg)?;
    task.abort();
    clear(sb)?;
    Ok(())
}

/// One pod floods the engine with distinct allowed names while another resolves a few names on a
/// second thread, as two pods of a node would through tapd and the packet path: the latency of each
/// `Engine::on_dns` call, the wait for the engine's lock included. The per-pod cap is the default one,
/// so past it every answer of the flooding pod evicts a remembered answer.
fn answer_memory() -> Result<()> {
    /// Distinct names the flooding pod resolves.
    const FLOOD: u32 = 100_000;
    /// Names the other pod resolves again and again.
    const OTHER_NAMES: u32 = 1_000;
    /// The other pod's pace: one answer, then a sleep of this, for as long as the flood lasts.
    const OTHER_GAP: Duration = Duration::from_micros(100);
    let e = Engine::new(EngineSettings::default(), Recording::new(None));
    e.set_node(Sandbox::NODE);
    e.set_rules(rules());
    e.upsert_pod(pod_info(0));
    e.upsert_pod(pod_info(1));
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let flooder = {
        let (e, done) = (e.clone(), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut v = Vec::with_capacity(FLOOD as usize);
            for k in 0..FLOOD {
                let resp = answer(0, k, std::iter::once(dst(k)));
                let t0 = Instant::now();
                e.on_dns(resp, t0);
                v.push(t0.elapsed());
            }
            done.store(true, Ordering::Relaxed);
            v
        })
    };
    let mut other = Vec::new();
    let mut k = 0u32;
    while !done.load(Ordering::Relaxed) {
        let name = 1_000_000 + k % OTHER_NAMES;
        let resp = answer(1, name, std::iter::once(dst(name)));
        let t0 = Instant::now();
        e.on_dns(resp, t0);
        other.push(t0.elapsed());
        k += 1;
        std::thread::sleep(OTHER_GAP);
    }
    let mut flood = flooder.join().unwrap();
    let took = started.elapsed();
    anyhow::ensure!(!other.is_empty(), "the other pod sent nothing");
    let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
    for (who, v) in [("other pod", &mut other), ("flooding pod", &mut flood)] {
        v.sort();
        println!(
            "[memory] on_dns of the {who:<12} while one pod resolves {FLOOD} names: p50 {}  p99 {}  max {}  ({} answers)",
            us(percentile(v, 0.5)),
            us(percentile(v, 0.99)),
            us(*v.last().unwrap()),
            v.len(),
        );
    }
    println!(
        "[memory] the flood took {} ({:.0} answers/s)",
        ms(took),
        f64::from(FLOOD) / took.as_secs_f64()
    );
    Ok(())
}

fn main() -> Result<()> {
    if let Ok(dir) = std::env::var(RSS_CHILD_ENV) {
        return rss_child(&dir);
    }
    // `cargo bench` adds `--bench`; any other argument selects cases by name.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants =
        |case: &str| filters.is_empty() || filters.iter().any(|f| case.contains(f.as_str()));
    if wants("memory") {
        answer_memory()?;
    }
    if !wants("sandbox") {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let started = Instant::now();
        let sb = Sandbox::start(sandbox::Ovn::V23_03)?;
        let mut pods = Vec::new();
        for i in 0..PODS {
            pods.push(sb.add_pod(NS, &format!("pod{i}"), 10 + i)?);
        }
        let dns = sb.add_dns_server()?;
        sb.set_egress_firewall(&rules())?;
        println!("sandbox with {PODS} pods ready in {}", ms(started.elapsed()));

        for driver in ["native", "ofctl"] {
            let programmer = || {
                let p = sb.native();
                if driver == "ofctl" {
                    p.disable();
                }
                p
            };
            // 0. Grant install: one answer, one flush, one after the other.
            let e = engine(programmer());
            e.flush().await?;
            let mut v = Vec::new();
            for i in 0..1000u32 {
                let t0 = Instant::now();
                e.on_dns(
                    answer((i % u32::from(PODS)) as u8, i, std::iter::once(dst(i))),
                    Instant::now(),
                );
                e.flush().await?;
                v.push(t0.elapsed());
            }
            anyhow::ensure!(e.programmer().fallbacks() == 0, "a batch fell back to ovs-ofctl");
            anyhow::ensure!(count(&sb, &e)? == 1000, "not 1,000 flows in OVS");
            v.sort();
            println!(
                "[{driver:>6}] grant install (answer -> flow committed): p50 {}  p99 {}  max {}",
                ms(percentile(&v, 0.5)),
                ms(percentile(&v, 0.99)),
                ms(*v.last().unwrap()),
            );
            drop(e);
            clear(&sb)?;

            // 1. Latency under a steady event rate, engine running as in the daemon.
            let e = engine(programmer());
            let task = tokio::spawn(e.clone().run());
            e.flush().await?;
            let mut first = 0;
            for (rate, secs) in [(100, 5), (1000, 5)] {
                let before = e.metrics_snapshot();
                let v = latency(&sb, &e, rate, secs, first).await?;
                first += rate * secs;
                let m = e.metrics_snapshot();
                let batches = m.batches - before.batches;
                let bundle_us =
                    (m.batch_latency_sum_us - before.batch_latency_sum_us) / batches.max(1);
                println!(
                    "[{driver:>6}] event -> flow in OVS at {rate:>4} ev/s: p50 {}  p99 {}  max {}  ({} events in {batches} bundles of {:.2} ms on average)",
                    ms(percentile(&v, 0.5)),
                    ms(percentile(&v, 0.99)),
                    ms(*v.last().unwrap()),
                    v.len(),
                    bundle_us as f64 / 1e3,
                );
            }
            task.abort();
            drop(e);
            clear(&sb)?;

            // 2. 50,000 flows from cold: a restarted engine gets its whole cache at once.
            let e = engine(programmer());
            let t0 = Instant::now();
            feed(&e, 0, 50_000);
            let fed = t0.elapsed();
            e.flush().await?;
            let cold = t0.elapsed();
            anyhow::ensure!(count(&sb, &e)? == 50_000, "not 50,000 flows in OVS");
            println!(
                "[{driver:>6}] 50,000 flows from cold: {} (decisions {}, {} bundles)",
                ms(cold),
                ms(fed),
                e.metrics_snapshot().batches
            );
            drop(e);
            clear(&sb)?;
        }
        // 5 (here, before the bulk phases fill the bridge). Hold time.
        hold_times(&sb, &pods, &dns).await?;

        let e = engine(sb.native());
        feed(&e, 0, 50_000);
        e.flush().await?;

        // 3. Full reconcile of 100,000 flows.
        feed(&e, 50_000, 50_000);
        e.flush().await?;
        anyhow::ensure!(count(&sb, &e)? == 100_000, "not 100,000 flows in OVS");
        let t0 = Instant::now();
        e.reconcile().await?;
        println!("full reconcile of 100,000 flows, nothing to change: {}", ms(t0.elapsed()));
        clear(&sb)?;
        let t0 = Instant::now();
        e.reconcile().await?;
        anyhow::ensure!(count(&sb, &e)? == 100_000, "reconcile did not restore 100,000 flows");
        println!("full reconcile of 100,000 flows after all were wiped: {}", ms(t0.elapsed()));
        drop(e);
        clear(&sb)?;

        // 4. RSS with 100,000 flows, in a fresh process.
        let out = Command::new(std::env::current_exe()?)
            .env(RSS_CHILD_ENV, sb.path())
            .output()?;
        anyhow::ensure!(out.status.success(), "rss child: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace().map(|n| n.parse::<u64>().unwrap_or(0));
        let (hwm, rss) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
        println!(
            "engine with 100,000 flows: VmHWM {:.1} MiB, VmRSS {:.1} MiB",
            hwm as f64 / 1024.0,
            rss as f64 / 1024.0
        );
        Ok(())
    })
}

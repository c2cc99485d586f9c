//! `flowd replay`: the decision (and, with `--apply`/`--dry-run-ofctl`, the engine) run alone on
//! recorded input, without Kubernetes and without tapd.
//!
//! Input: a cluster snapshot ([`crate::snapshot`]) and either a dnstap capture or grpcurl's JSON event
//! stream ([`events`]). With neither given, the shipped example (`examples/`) is replayed, so
//! `cargo run -p flowd -- replay` shows the seed's case: `dnsName: google.com` Allow, `0.0.0.0/0` Deny,
//! and a pod resolving `www.google.com` through a CNAME to Google's CDN.
//!
//! The replay clock is each event's response time (from dnstap), else the time tapd decoded it.

pub mod events;

use crate::{
    cluster::union,
    config::{EngineSettings, OutputFormat, ReplayArgs},
    engine::{Engine, EngineError},
    model::{FlowKey, Grant, PodInfo, PodKey},
    ovs::{DryRun, FlowProgrammer, Ofctl},
    policy::{
        decide, exclusions, l4_name, matched_text, verdict_name, Excluded, Ignored, PolicySettings,
        RuleOutcome, RuleTrace,
    },
    snapshot::Snapshot,
};
use anyhow::Context as _;
use dnsflow_dnstap::{DnsName, DnsResponse};
use events::{InputStats, Item};
use serde_json::{json, Value};
use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    net::IpAddr,
    path::Path,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

/// The shipped example snapshot: namespace `abc` with the seed's EgressFirewall, its pods, a node.
pub const EXAMPLE_SNAPSHOT: &str = include_str!("../../examples/snapshot.yaml");
/// The shipped example capture: 10.244.1.5 resolving `www.google.com`, plus noise.
pub const EXAMPLE_CAPTURE: &[u8] = include_bytes!("../../examples/google.fstrm");

/// Stand-in EgressFirewall ACL table for `--dry-run-ofctl` without `--acl-table`: OVN 23.03.1's (a
/// real bridge is always discovered instead).
pub const DRY_RUN_ACL_TABLE: u8 = 46;

/// Why an event earned no flow, as a fixed category (for the summary) and the specifics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skip {
    pub category: &'static str,
    pub detail: String,
}

impl Skip {
    fn new(category: &'static str, detail: impl Into<String>) -> Self {
        Self {
            category,
            detail: detail.into(),
        }
    }
}

/// A grant with the name that earned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub grant: Grant,
    /// The name that matched the grant's rule: the question name, or the CNAME target that did.
    pub matched: DnsName,
}

impl Planned {
    /// "www.google.com", or "www3.l.google.com (CNAME target of www.google.com)".
    pub fn matched_text(&self) -> String {
        matched_text(&self.grant.reason.qname, &self.matched)
    }
}

/// What replay made of one recorded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventOutcome {
    /// 1-based position in the input.
    pub index: u64,
    /// The replay clock for this event.
    pub time: Option<SystemTime>,
    pub client: Option<IpAddr>,
    pub qname: Option<String>,
    pub pod: Option<PodKey>,
    pub result: Result<Vec<Planned>, Skip>,
    /// The rules that matched, with the name that matched each (empty when no rule was looked at).
    pub rules: Vec<RuleTrace>,
    /// Answer IPs, or ports of them, left without a flow OVS would use, and why: also when other
    /// answers of the event got flows.
    pub excluded: Vec<Excluded>,
}

/// The decision over a snapshot: finds the pod behind each answer and asks [`decide`].
#[derive(Debug)]
pub struct Planner<'a> {
    snapshot: &'a Snapshot,
    settings: PolicySettings,
    node: Option<&'a str>,
    pods_by_ip: HashMap<IpAddr, &'a PodInfo>,
}

impl<'a> Planner<'a> {
    /// `settings.cluster_subnets` is extended with every node's exclusions from the snapshot (pod, join
    /// and transit subnets, node addresses).
    pub fn new(
        snapshot: &'a Snapshot,
        mut settings: PolicySettings,
        node: Option<&'a str>,
    ) -> Self {
        settings.cluster_subnets = union([&settings.cluster_subnets, &snapshot.exclusions()]);
        let mut pods_by_ip = HashMap::new();
        for pod in &snapshot.pods {
            for ip in &pod.ips {
                pods_by_ip.entry(*ip).or_insert(pod);
            }
        }
        Self {
            snapshot,
            settings,
            node,
            pods_by_ip,
        }
    }

    pub fn settings(&self) -> &PolicySettings {
        &self.settings
    }

    /// Plans one recorded event.
    pub fn plan(&self, index: u64, item: Item) -> EventOutcome {
        let resp = match item {
            Ok(resp) => resp,
            Err(e) => {
                return EventOutcome {
                    index,
                    time: None,
                    client: None,
                    qname: None,
                    pod: None,
                    result: Err(Skip::new("invalid event", e)),
                    rules: Vec::new(),
                    excluded: Vec::new(),
                }
            }
        };
        let mut out = EventOutcome {
            index,
            time: Some(resp.response_time.unwrap_or(resp.decoded_time)),
            client: Some(resp.client),
            qname: Some(resp.qname.to_string()),
            pod: None,
            result: Ok(Vec::new()),
            rules: Vec::new(),
            excluded: Vec::new(),
        };
        let Some(pod) = self.pods_by_ip.get(&resp.client) else {
            out.result = Err(Skip::new(
                "client is not a known pod",
                resp.client.to_string(),
            ));
            return out;
        };
        out.pod = Some(pod.key.clone());
        if let Some(node) = self.node.filter(|n| *n != pod.node) {
            out.result = Err(Skip::new(
                "pod on another node",
                format!("{} runs on {}, not {node}", pod.key, pod.node),
            ));
            return out;
        }
        let Some(rules) = self.snapshot.rules.get(&pod.key.namespace) else {
            out.result = Err(match self.snapshot.invalid.get(&pod.key.namespace) {
                Some(why) => Skip::new("EgressFirewall invalid", why.clone()),
                None => Skip::new("namespace has no EgressFirewall", pod.key.namespace.clone()),
            });
            return out;
        };
        let decision = decide(&resp, pod, rules, &self.settings);
        out.excluded = exclusions(&decision, rules);
        out.result = if let Some(ignored) = &decision.ignored {
            Err(Skip::new(
                match ignored {
                    Ignored::NotNoError { .. } => "not NOERROR",
                    Ignored::ClientNotPod { .. } => "client is not a known pod",
                    Ignored::NoAddresses => "no A/AAAA answers",
                },
                ignored.to_string(),
            ))
        } else if !decision.grants.is_empty() {
            Ok(decision
                .grants
                .iter()
                .map(|g| Planned {
                    grant: g.clone(),
                    matched: decision
                        .matched_name(g.reason.rule_index)
                        .unwrap_or(&g.reason.qname)
                        .clone(),
                })
                .collect())
        } else if decision.rules.iter().any(|r| r.matches()) {
            let why: Vec<String> = out
                .excluded
                .iter()
                .map(ToString::to_string)
                .chain(decision.rules.iter().filter_map(|r| match &r.outcome {
                    RuleOutcome::NoPriority { .. } => {
                        Some(format!("rule {}: {}", r.index, r.reason()))
                    }
                    _ => None,
                }))
                .collect();
            Err(Skip::new("no usable answer", why.join("; ")))
        } else {
            Err(Skip::new(
                "no dnsName rule matches",
                resp.names()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" -> "),
            ))
        };
        out.rules = decision.rules;
        out
    }
}

/// Totals over a replay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Client responses (and undecodable records) read.
    pub events: u64,
    /// dnstap messages that were not client responses.
    pub not_client_responses: u64,
    pub skipped: BTreeMap<&'static str, u64>,
    pub grants: u64,
    /// Answer IPs (or ports of them) left without a usable flow, over all events.
    pub excluded: u64,
    /// Distinct flows with the replay time of their latest grant: a later grant for the same flow
    /// refreshes it.
    pub flows: BTreeMap<FlowKey, (Planned, Option<SystemTime>)>,
}

impl Summary {
    pub fn add(&mut self, outcome: &EventOutcome) {
        self.events += 1;
        self.excluded += outcome.excluded.len() as u64;
        match &outcome.result {
            Err(skip) => *self.skipped.entry(skip.category).or_default() += 1,
            Ok(planned) => {
                self.grants += planned.len() as u64;
                for p in planned {
                    self.flows
                        .insert(p.grant.key.clone(), (p.clone(), outcome.time));
                }
            }
        }
    }

    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }
}

/// `t` in RFC 3339, UTC, with as many fraction digits as it needs (0, 3, 6 or 9), as grpcurl prints
/// timestamps.
fn rfc3339(t: SystemTime) -> String {
    prost_types::Timestamp::from(t).to_string()
}

fn time_text(t: Option<SystemTime>) -> String {
    t.map_or_else(|| "-".into(), rfc3339)
}

/// One planned flow as a line: who, where, priority, verdict, lifetime, and why (the name that matched
/// the rule, which is a CNAME target when the question name did not).
pub fn flow_line(p: &Planned, engine: &EngineSettings, time: Option<SystemTime>) -> String {
    let g = &p.grant;
    format!(
        "flow  {pod} {src} -> {dst} {l4} priority={prio} {verdict} ttl={ttl} idle_timeout={idle}  \
         reason: {matched} matched rule {rule} dnsName={dns}  at {time}",
        pod = g.key.pod,
        src = g.key.src,
        dst = g.key.dst,
        l4 = l4_name(&g.key.l4),
        prio = g.key.priority,
        verdict = verdict_name(g.verdict),
        ttl = g.ttl,
        idle = engine.idle_timeout(g.ttl),
        matched = p.matched_text(),
        rule = g.reason.rule_index,
        dns = g.reason.dns_name,
        time = time_text(time),
    )
}

/// A grant as JSON, with the field names of `dnsflow.v1.Grant`, and `matchedName`: the name that
/// matched the rule (the question name, or a CNAME target of it).
pub fn grant_json(p: &Planned, engine: &EngineSettings, time: Option<SystemTime>) -> Value {
    let g = &p.grant;
    json!({
        "namespace": g.key.pod.namespace,
        "pod": g.key.pod.name,
        "podIp": g.key.src.to_string(),
        "queryName": g.reason.qname.to_string(),
        "matchedName": p.matched.to_string(),
        "ruleIndex": g.reason.rule_index,
        "action": verdict_name(g.verdict),
        "dnsName": g.reason.dns_name,
        "ip": g.key.dst.to_string(),
        "port": l4_name(&g.key.l4),
        "ttl": g.ttl,
        "idleTimeout": engine.idle_timeout(g.ttl),
        "priority": g.key.priority,
        "time": time.map(rfc3339),
    })
}

/// An excluded answer as JSON, with the field names of `dnsflow.v1.ExcludedAnswer` (`port` only when
/// one L4 match of the IP is concerned rather than the whole IP).
pub fn excluded_json(e: &Excluded) -> Value {
    let mut v = json!({"ip": e.ip().to_string(), "reason": e.reason()});
    if let Some(l4) = e.l4() {
        v["port"] = json!(l4_name(&l4));
    }
    v
}

fn rule_json(t: &RuleTrace) -> Value {
    json!({
        "index": t.index,
        "rule": t.rule,
        "matchedName": t.matched_name().map(ToString::to_string),
        "reason": t.reason(),
    })
}

fn outcome_json(o: &EventOutcome, engine: &EngineSettings) -> Value {
    let mut v = json!({
        "event": o.index,
        "time": o.time.map(rfc3339),
        "clientIp": o.client.map(|c| c.to_string()),
        "queryName": o.qname,
        "pod": o.pod.as_ref().map(ToString::to_string),
    });
    if !o.rules.is_empty() {
        v["rules"] = o.rules.iter().map(rule_json).collect();
    }
    if !o.excluded.is_empty() {
        v["excluded"] = o.excluded.iter().map(excluded_json).collect();
    }
    match &o.result {
        Ok(planned) => {
            v["grants"] = planned
                .iter()
                .map(|p| grant_json(p, engine, o.time))
                .collect();
        }
        Err(skip) => {
            v["skipped"] = json!({"reason": skip.category, "detail": skip.detail});
        }
    }
    v
}

/// Where the events come from.
enum Input<'a> {
    Capture(&'a Path),
    Events(&'a Path),
    ExampleCapture,
}

/// `-` reads standard input, so that `grpcurl ... | flowd replay --events -` works.
fn open(path: &Path) -> anyhow::Result<(Box<dyn std::io::Read>, String)> {
    if path == Path::new("-") {
        return Ok((Box::new(std::io::stdin().lock()), "standard input".into()));
    }
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    Ok((Box::new(file), path.display().to_string()))
}

fn read_input(input: &Input<'_>, each: impl FnMut(Item)) -> anyhow::Result<InputStats> {
    Ok(match input {
        Input::Capture(p) => {
            let (reader, origin) = open(p)?;
            events::read_capture(reader, &origin, each)?
        }
        Input::Events(p) => {
            let (reader, origin) = open(p)?;
            events::read_events_json(reader, &origin, each)?
        }
        Input::ExampleCapture => {
            events::read_capture(EXAMPLE_CAPTURE, "examples/google.fstrm", each)?
        }
    })
}

/// `flowd replay`; `args` should have passed [`ReplayArgs::validate`] (it is checked again here).
pub fn main(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    args.validate()?;
    let mut snapshot = match &args.snapshot {
        Some(path) => Snapshot::load(path)?,
        None => Snapshot::parse(EXAMPLE_SNAPSHOT, Path::new("examples/snapshot.yaml"))?,
    };
    if let Some(warning) = snapshot.networks_warning() {
        tracing::warn!(%warning, "snapshot");
        snapshot.warnings.push(warning);
    }
    let input = match (&args.capture, &args.events) {
        (Some(p), _) => Input::Capture(p),
        (None, Some(p)) => Input::Events(p),
        (None, None) => Input::ExampleCapture,
    };
    // The decision and the engine see the same settings: the flags plus every node's pod subnets.
    let mut settings = args.engine.clone();
    settings.cluster_subnets = union([&settings.cluster_subnets, &snapshot.exclusions()]);
    let use_engine = args.apply.is_some() || args.dry_run_ofctl;
    let planner = Planner::new(&snapshot, settings.policy(), args.node.as_deref());
    let mut summary = Summary::default();
    let mut outcomes = Vec::new();
    let mut fed: Vec<(DnsResponse, SystemTime)> = Vec::new();
    let mut stdout = std::io::stdout().lock();
    let mut write_err: Option<std::io::Error> = None;
    let mut index = 0u64;
    let stats = read_input(&input, |item| {
        index += 1;
        if let (true, Ok(resp)) = (use_engine, &item) {
            fed.push((
                resp.clone(),
                resp.response_time.unwrap_or(resp.decoded_time),
            ));
        }
        let outcome = planner.plan(index, item);
        summary.add(&outcome);
        match args.output {
            OutputFormat::Json => outcomes.push(outcome_json(&outcome, &settings)),
            OutputFormat::Text if write_err.is_none() => {
                if let Err(e) = write_text(&mut stdout, &outcome, &settings) {
                    write_err = Some(e);
                }
            }
            OutputFormat::Text => {}
        }
    })?;
    summary.not_client_responses = stats.not_client_responses;
    if let Some(e) = write_err {
        return Err(e).context("writing the replay output");
    }
    let engine = if let Some(bridge) = &args.apply {
        // Never fail open: without the service subnet a grant could open a Service.
        if snapshot.networks.is_none() && args.engine.cluster_subnets.is_empty() {
            anyhow::bail!(
                "refusing --apply: the snapshot has no OVN-Kubernetes ConfigMap ({} or {}) and no \
                 --cluster-subnet names the cluster's service subnet",
                crate::ovnkube::UPSTREAM_CONFIG,
                crate::ovnkube::OPENSHIFT_CONFIG
            );
        }
        let ofctl = Ofctl::new(bridge.clone()).with_timeout(settings.ovs_timeout);
        let run = run_engine(
            Engine::new(settings.clone(), ofctl),
            &snapshot,
            args.node.as_deref(),
            fed,
        );
        Some(run.with_context(|| format!("applying to bridge {bridge}"))?)
    } else if args.dry_run_ofctl {
        let table = settings.acl_table.unwrap_or(DRY_RUN_ACL_TABLE);
        let buf = SharedBuf::default();
        let dry = DryRun::new(table, Box::new(buf.clone()));
        let mut run = run_engine(
            Engine::new(settings.clone(), dry),
            &snapshot,
            args.node.as_deref(),
            fed,
        )
        .context("dry run")?;
        run.ofctl = Some(buf.text());
        Some(run)
    } else {
        None
    };
    match args.output {
        OutputFormat::Text => {
            if let Some(run) = &engine {
                write_engine_text(&mut stdout, run, args.apply.as_deref())?;
            }
            write_summary(&mut stdout, &summary, &snapshot)?;
        }
        OutputFormat::Json => {
            let mut doc = json!({
                "events": outcomes,
                "flows": summary.flows.values().map(|(g, at)| grant_json(g, &settings, *at)).collect::<Vec<_>>(),
                "summary": {
                    "events": summary.events,
                    "notClientResponses": summary.not_client_responses,
                    "skipped": summary.skipped,
                    "grants": summary.grants,
                    "excluded": summary.excluded,
                    "flows": summary.flows.len(),
                },
                "warnings": snapshot.warnings,
            });
            if let Some(run) = &engine {
                doc["engine"] = json!({
                    "bridge": args.apply,
                    "flows": run.flows,
                    "installed": run.installed,
                    "ofctl": run.ofctl,
                });
            }
            serde_json::to_writer_pretty(&mut stdout, &doc)?;
            writeln!(stdout)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What the engine did with the replayed answers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineRun {
    /// Flows the engine wants.
    pub flows: usize,
    /// Of those, written to OVS (the rest wait for their pod's port to appear on the bridge).
    pub installed: usize,
    /// With `--dry-run-ofctl`: the exact `ovs-ofctl --bundle add-flows` input.
    pub ofctl: Option<String>,
}

/// Feeds the snapshot and the answers to `engine`, in the order the daemon would see them (cluster
/// state first), and writes one batch.
fn run_engine<P: FlowProgrammer>(
    engine: Engine<P>,
    snapshot: &Snapshot,
    node: Option<&str>,
    answers: Vec<(DnsResponse, SystemTime)>,
) -> Result<EngineRun, EngineError> {
    if let Some(node) = node {
        engine.set_node(node);
    }
    engine.set_local_subnets(snapshot.pod_subnets());
    for rules in snapshot.rules.values() {
        engine.set_rules(rules.clone());
    }
    for pod in &snapshot.pods {
        engine.upsert_pod(pod.clone());
    }
    // The engine's clock is monotonic: the answers keep their spacing, from now on.
    let (start, first) = (Instant::now(), answers.first().map(|(_, at)| *at));
    for (resp, at) in answers {
        let offset = first
            .and_then(|first| at.duration_since(first).ok())
            .unwrap_or_default();
        engine.on_dns(resp, start + offset);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| {
            EngineError::Ovs(crate::ovs::OvsError::Io {
                program: "tokio runtime",
                error: source,
            })
        })?;
    runtime.block_on(engine.flush())?;
    let grants = engine.grants(None, None);
    Ok(EngineRun {
        flows: grants.len(),
        installed: grants.iter().filter(|g| g.installed).count(),
        ofctl: None,
    })
}

/// A `Write` whose bytes can be read back after the writer was handed away.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn write_engine_text(
    out: &mut impl Write,
    run: &EngineRun,
    bridge: Option<&str>,
) -> std::io::Result<()> {
    if let Some(text) = &run.ofctl {
        writeln!(out, "# ovs-ofctl --bundle add-flows <bridge> - input:")?;
        out.write_all(text.as_bytes())?;
    }
    let waiting = run.flows - run.installed.min(run.flows);
    match bridge {
        Some(bridge) => writeln!(
            out,
            "engine: {} flows installed in {bridge}, {waiting} waiting for their pod's port on the bridge",
            run.installed
        ),
        None => writeln!(out, "engine: {} flows in the dry run", run.installed),
    }
}

fn write_text(
    out: &mut impl Write,
    o: &EventOutcome,
    engine: &EngineSettings,
) -> std::io::Result<()> {
    let client = o.client.map_or_else(|| "-".into(), |c| c.to_string());
    let qname = o.qname.as_deref().unwrap_or("-");
    let event = format!("event {} {client} {qname}", o.index);
    match &o.result {
        Ok(planned) => {
            for p in planned {
                writeln!(out, "{}", flow_line(p, engine, o.time))?;
            }
            // A skipped event's line already says why each answer was excluded.
            for e in &o.excluded {
                writeln!(out, "excl  {event}: {e}")?;
            }
            for t in o.rules.iter().filter(|t| t.has_unused_entries()) {
                writeln!(out, "note  {event}: rule {}: {}", t.index, t.reason())?;
            }
        }
        Err(skip) => {
            writeln!(out, "skip  {event}: {}: {}", skip.category, skip.detail)?;
        }
    }
    Ok(())
}

fn write_summary(out: &mut impl Write, s: &Summary, snapshot: &Snapshot) -> std::io::Result<()> {
    for w in &snapshot.warnings {
        writeln!(out, "warning: {w}")?;
    }
    writeln!(
        out,
        "summary: {} events read ({} other dnstap messages ignored), {} skipped, {} grants, {} flows",
        s.events,
        s.not_client_responses,
        s.skipped_total(),
        s.grants,
        s.flows.len()
    )?;
    for (why, n) in &s.skipped {
        writeln!(out, "skipped: {n} {why}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        replay: ReplayArgs,
    }

    fn parse(args: &[&str]) -> Result<ReplayArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("replay").chain(args.iter().copied())).map(|c| c.replay)
    }

    #[test]
    fn arguments_parse_with_defaults_and_refuse_conflicts() {
        let a = parse(&[]).expect("defaults");
        assert_eq!(a.snapshot, None);
        assert_eq!((a.capture.as_ref(), a.events.as_ref()), (None, None));
        assert_eq!(a.output, OutputFormat::Text);
        assert!(a.apply.is_none() && !a.dry_run_ofctl);
        assert_eq!(a.engine.priority_base, 11000);

        let a = parse(&[
            "--snapshot",
            "s.yaml",
            "--events",
            "e.json",
            "--node",
            "n1",
            "--output",
            "json",
            "--dry-run-ofctl",
            "--strict-dns-names",
            "--acl-table",
            "44",
        ])
        .expect("valid");
        assert_eq!(a.events.as_deref(), Some(Path::new("e.json")));
        assert_eq!(a.node.as_deref(), Some("n1"));
        assert_eq!(a.output, OutputFormat::Json);
        assert!(a.dry_run_ofctl && a.engine.strict_names);
        assert_eq!(a.engine.acl_table, Some(44));

        assert!(parse(&["--capture", "c", "--events", "e"]).is_err());
        assert!(parse(&["--apply", "br-int", "--dry-run-ofctl"]).is_err());
        assert!(parse(&["--output", "yaml"]).is_err());
        assert!(parse(&["--apply"]).is_err());
    }

    fn snapshot() -> Snapshot {
        Snapshot::parse(EXAMPLE_SNAPSHOT, Path::new("examples/snapshot.yaml")).expect("example")
    }

    fn plan_all(planner: &Planner<'_>) -> Vec<EventOutcome> {
        let mut out = Vec::new();
        let mut i = 0;
        events::read_capture(EXAMPLE_CAPTURE, "example", |item| {
            i += 1;
            out.push(planner.plan(i, item));
        })
        .expect("the example reads");
        out
    }

    #[test]
    fn the_planner_finds_the_pod_and_says_why_events_earn_nothing() {
        let snap = snapshot();
        assert!(snap.warnings.is_empty(), "{:?}", snap.warnings);
        let planner = Planner::new(&snap, PolicySettings::default(), None);
        // The snapshot's node subnets join the cluster subnets.
        assert!(planner
            .settings()
            .cluster_subnets
            .contains(&"10.244.1.0/24".parse().expect("net")));
        let outcomes = plan_all(&planner);
        let mut summary = Summary::default();
        outcomes.iter().for_each(|o| summary.add(o));
        assert_eq!(summary.events, 6);
        assert_eq!(summary.grants, 3);
        assert_eq!(summary.flows.len(), 3);
        assert_eq!(summary.skipped_total(), 3 + 1);
        assert_eq!(outcomes[0].pod, Some(PodKey::new("abc", "client")));
        assert_eq!(
            outcomes[2].result,
            Err(Skip::new("not NOERROR", "rcode NXDOMAIN"))
        );

        let elsewhere = Planner::new(&snap, PolicySettings::default(), Some("ovn-worker2"));
        let outcomes = plan_all(&elsewhere);
        assert!(outcomes
            .iter()
            .all(|o| matches!(&o.result, Err(s) if s.category == "pod on another node")));

        let invalid = planner.plan(9, Err("bad frame".into()));
        assert_eq!(invalid.result, Err(Skip::new("invalid event", "bad frame")));
    }

    /// Namespace `abc` allows `*.l.google.com` (and `google.com` on tcp/443) after denying tcp/25 to
    /// 142.250.74.0/24; namespace `bad`'s EgressFirewall is invalid; namespace `none` has none.
    const REPORT_SNAPSHOT: &str = r#"
kind: List
items:
- kind: Pod
  metadata: {name: client, namespace: abc}
  spec: {nodeName: n1, containers: []}
  status: {phase: Running, podIPs: [{ip: 10.244.1.5}]}
- kind: Pod
  metadata: {name: p, namespace: bad}
  spec: {nodeName: n1, containers: []}
  status: {phase: Running, podIPs: [{ip: 10.244.1.6}]}
- kind: Pod
  metadata: {name: p, namespace: none}
  spec: {nodeName: n1, containers: []}
  status: {phase: Running, podIPs: [{ip: 10.244.1.7}]}
- kind: EgressFirewall
  metadata: {name: default, namespace: abc}
  spec:
    egress:
    - {type: Deny, to: {cidrSelector: 142.250.74.0/24}, ports: [{protocol: TCP, port: 25}]}
    - {type: Allow, to: {dnsName: "*.l.google.com"}}
    - {type: Allow, to: {dnsName: google.com}, ports: [{protocol: TCP, port: 443}]}
    - {type: Deny, to: {cidrSelector: 0.0.0.0/0}}
- kind: EgressFirewall
  metadata: {name: default, namespace: bad}
  spec: {egress: [{type: Allow, to: {dnsName: "bad name"}}]}
- kind: Node
  metadata:
    name: n1
    annotations: {k8s.ovn.org/node-subnets: '{"default":["10.244.1.0/24"]}'}
"#;

    #[test]
    fn each_event_reports_the_matched_name_the_excluded_answers_and_why_it_was_skipped() {
        struct Case {
            what: &'static str,
            client: &'static str,
            qname: &'static str,
            chain: &'static [&'static str],
            answers: &'static [&'static str],
            /// The text output for the event, line by line (flow lines cut before "ttl=").
            lines: &'static [&'static str],
        }
        let cases = [
            Case {
                what: "the CNAME target matched; a pod-subnet answer is excluded beside the granted one",
                client: "10.244.1.5",
                qname: "www.google.com",
                chain: &["www3.l.google.com"],
                answers: &["142.250.74.36", "10.244.1.9"],
                lines: &[
                    "flow  abc/client 10.244.1.5 -> 142.250.74.36 any priority=10999 Allow",
                    "excl  event 1 10.244.1.5 www.google.com: 10.244.1.9: inside cluster subnet 10.244.1.0/24",
                    "excl  event 1 10.244.1.5 www.google.com: 142.250.74.36 tcp/25: rule 0 (Deny cidrSelector=142.250.74.0/24 tcp/25) decides it first: rule 1's Allow flow never applies",
                    "note  event 1 10.244.1.5 www.google.com: rule 2: matches www.google.com at priority 10998; tcp/443 already covered by rule 1",
                ],
            },
            Case {
                what: "the question name matched: the flow says so, without a CNAME",
                client: "10.244.1.5",
                qname: "google.com",
                chain: &[],
                answers: &["8.8.8.8"],
                lines: &["flow  abc/client 10.244.1.5 -> 8.8.8.8 tcp/443 priority=10998 Allow"],
            },
            Case {
                what: "every answer excluded: one skip line that names them",
                client: "10.244.1.5",
                qname: "google.com",
                chain: &[],
                answers: &["10.244.1.9", "2a00::1"],
                lines: &["skip  event 1 10.244.1.5 google.com: no usable answer: 10.244.1.9: inside cluster subnet 10.244.1.0/24; 2a00::1: the pod has no IP of this family"],
            },
            Case {
                what: "an invalid EgressFirewall says why",
                client: "10.244.1.6",
                qname: "google.com",
                chain: &[],
                answers: &["8.8.8.8"],
                lines: &["skip  event 1 10.244.1.6 google.com: EgressFirewall invalid: egress[0].to.dnsName: \"bad name\" does not match the dnsName pattern ^(\\*\\.)?([A-Za-z0-9-]+\\.)*[A-Za-z0-9-]+\\.?$"],
            },
            Case {
                what: "no EgressFirewall at all",
                client: "10.244.1.7",
                qname: "google.com",
                chain: &[],
                answers: &["8.8.8.8"],
                lines: &["skip  event 1 10.244.1.7 google.com: namespace has no EgressFirewall: none"],
            },
        ];
        let snap = Snapshot::parse(REPORT_SNAPSHOT, Path::new("report.yaml")).expect("valid");
        let planner = Planner::new(&snap, PolicySettings::default(), None);
        let engine = EngineSettings::default();
        for c in cases {
            let resp = DnsResponse::noerror(
                c.client.parse().expect("ip"),
                DnsName::new(c.qname).expect("name"),
                c.chain
                    .iter()
                    .map(|n| DnsName::new(n).expect("name"))
                    .collect(),
                c.answers
                    .iter()
                    .map(|a| dnsflow_dnstap::Answer {
                        ip: a.parse().expect("ip"),
                        ttl: 60,
                    })
                    .collect(),
            );
            let outcome = planner.plan(1, Ok(resp));
            let mut text = Vec::new();
            write_text(&mut text, &outcome, &engine).expect("writes");
            let text = String::from_utf8(text).expect("utf-8");
            let lines: Vec<&str> = text
                .lines()
                .map(|l| l.split(" ttl=").next().unwrap_or(l))
                .collect();
            assert_eq!(lines, c.lines, "{}", c.what);
            // JSON carries the same: the matched name of each grant, and every exclusion.
            let v = outcome_json(&outcome, &engine);
            let excluded = v["excluded"].as_array().map_or(0, Vec::len);
            assert_eq!(excluded, outcome.excluded.len(), "{}", c.what);
            if let Ok(planned) = &outcome.result {
                for (p, g) in planned.iter().zip(v["grants"].as_array().expect("grants")) {
                    assert_eq!(g["matchedName"], p.matched.as_str(), "{}", c.what);
                    assert_eq!(g["queryName"], c.qname, "{}", c.what);
                    assert!(
                        text.contains(&format!("reason: {} matched rule", p.matched_text())),
                        "{}: {text}",
                        c.what
                    );
                }
            }
        }
        let first = planner.plan(
            1,
            Ok(DnsResponse::noerror(
                "10.244.1.5".parse().expect("ip"),
                DnsName::new("www.google.com").expect("name"),
                vec![DnsName::new("www3.l.google.com").expect("name")],
                vec![dnsflow_dnstap::Answer {
                    ip: "142.250.74.36".parse().expect("ip"),
                    ttl: 60,
                }],
            )),
        );
        let v = outcome_json(&first, &engine);
        assert_eq!(v["grants"][0]["matchedName"], "www3.l.google.com");
        assert_eq!(v["excluded"][0]["port"], "tcp/25");
        assert_eq!(v["rules"][0]["matchedName"], "www3.l.google.com");
        assert_eq!(v["rules"][1]["matchedName"], "www.google.com");
    }

    #[test]
    fn shared_buffers_read_back_what_was_written() {
        let buf = SharedBuf::default();
        let mut writer: Box<dyn Write + Send> = Box::new(buf.clone());
        writer.write_all(b"add x\n").expect("write");
        writer.flush().expect("flush");
        assert_eq!(buf.text(), "add x\n");
    }
}

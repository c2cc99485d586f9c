//! What DNS told the pods of this node: every (name, IP) a pod received, each with its own expiry, so
//! that a rule change can decide again from what the pod knows. An A answer and an AAAA answer for one
//! name, or two round-robin answers with different IPs, live side by side: a newer answer never
//! replaces an older one's addresses, it only refreshes the ones it repeats.
//!
//! What is kept depends on what an answer can still earn:
//! - A pod whose namespace has a `dnsName` rule keeps an [`AnswerMemory`] of its own, bounded by the
//!   per-pod grant cap: every rule change decides again from it, and a record outlives its expiry while
//!   a flow to its address lives (a connection in use keeps its grant through rule updates).
//! - The answers of every other pod earn nothing today: they matter only if the namespace gains a
//!   `dnsName` rule before their TTL runs out. They go to one node-wide [`RecentAnswers`] window of at
//!   most [`RECENT_MAX`] records, where the earliest-expiring are pushed out first, and move into the
//!   pod's own memory when its namespace gains such a rule (back when it loses its last one). A small
//!   cap per pod would bound each pod, not the node; one window bounds the node whatever the number
//!   of pods. It is shared, so a pod that floods it pushes other pods' answers out early: those could
//!   only have served a late rule, and no flow rests on them.
//!
//! Both stores keep an index by expiry beside their records, so the record to evict is at the index's
//! front (O(log n)) and pruning walks only the expired ones: no DNS answer makes the engine scan a
//! whole store under its lock.

use dnsflow_dnstap::{Answer, DnsName, DnsResponse};
use std::{
    cmp::Reverse,
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Instant,
};

/// Records the node-wide window ([`RecentAnswers`]) holds at most: a late rule needs only the answers
/// still within their TTL, and this is 250 pods (OpenShift's most per node) with 80 live names each,
/// in about 5 MiB.
pub const RECENT_MAX: usize = 20_000;
/// A full [`AnswerMemory`] looks at most this many of its earliest-expiring records for one to evict
/// that no flow uses: bounded work per answer (see [`AnswerMemory::remember`]).
const EVICT_LOOKAHEAD: usize = 16;

/// What a record is remembered by: the question name and the address.
type Key = (DnsName, IpAddr);

/// One address a pod received for a question name.
#[derive(Clone, Debug)]
struct Record {
    /// The CNAME chain followed from the question name to this address.
    chain: Arc<[DnsName]>,
    ttl: u32,
    /// When the answer arrived, and when it stops justifying a new flow (arrival + idle timeout).
    at: Instant,
    until: Instant,
}

impl Record {
    fn new(
        chain: &Arc<[DnsName]>,
        answer: &Answer,
        now: Instant,
        until: &impl Fn(u32) -> Instant,
    ) -> Self {
        Self {
            chain: Arc::clone(chain),
            ttl: answer.ttl,
            at: now,
            until: until(answer.ttl),
        }
    }

    /// Folds in a newer answer for the same name and address: an earlier, longer answer keeps its
    /// expiry; the chain is the newest one. Returns the expiry it had, when that changed.
    fn refresh(&mut self, newer: Record) -> Option<Instant> {
        if newer.until >= self.until {
            let old = std::mem::replace(self, newer).until;
            (old != self.until).then_some(old)
        } else {
            self.chain = newer.chain;
            None
        }
    }
}

/// A pod's remembered answers, bounded.
#[derive(Debug, Default)]
pub struct AnswerMemory {
    records: HashMap<Key, Record>,
    /// The same records by expiry, earliest first: where eviction and pruning look.
    by_until: BTreeSet<(Instant, Key)>,
}

/// One remembered answer, rebuilt as the response the policy decides on, with when each address came.
#[derive(Debug)]
pub struct Remembered {
    pub response: DnsResponse,
    pub at: HashMap<IpAddr, Instant>,
}

impl AnswerMemory {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Remembers every address of `resp` (a NOERROR answer) until `until(ttl)`. At `cap` records, one
    /// goes first: the earliest-expiring among the expired ones no flow uses (`in_use`), as long as one
    /// is among the [`EVICT_LOOKAHEAD`] earliest-expiring records; otherwise the earliest-expiring of
    /// all, in use or not. Only a pod with more than that many expired records still backing flows
    /// ahead of an unused one loses a used record where a full scan would not have.
    pub fn remember(
        &mut self,
        resp: &DnsResponse,
        now: Instant,
        until: impl Fn(u32) -> Instant,
        cap: usize,
        in_use: impl Fn(IpAddr) -> bool,
    ) {
        let chain: Arc<[DnsName]> = resp.cname_chain.clone().into();
        for a in &resp.answers {
            let record = Record::new(&chain, a, now, &until);
            self.insert((resp.qname.clone(), a.ip), record, now, cap, &in_use);
        }
    }

    fn insert(
        &mut self,
        key: Key,
        record: Record,
        now: Instant,
        cap: usize,
        in_use: &impl Fn(IpAddr) -> bool,
    ) {
        if let Some(r) = self.records.get_mut(&key) {
            if let Some(old) = r.refresh(record) {
                let mut entry = (old, key);
                self.by_until.remove(&entry);
                entry.0 = r.until;
                self.by_until.insert(entry);
            }
            return;
        }
        if self.records.len() >= cap {
            self.evict(now, in_use);
        }
        if self.records.len() < cap {
            self.by_until.insert((record.until, key.clone()));
            self.records.insert(key, record);
        }
    }

    /// Removes one record; see [`AnswerMemory::remember`] for which.
    fn evict(&mut self, now: Instant, in_use: &impl Fn(IpAddr) -> bool) {
        let victim = self
            .by_until
            .iter()
            .take(EVICT_LOOKAHEAD)
            .take_while(|(until, _)| *until <= now)
            .find(|(_, (_, ip))| !in_use(*ip))
            .or_else(|| self.by_until.first())
            .cloned();
        if let Some(entry) = victim {
            self.by_until.remove(&entry);
            self.records.remove(&entry.1);
        }
    }

    /// Forgets the records past their expiry whose address backs no flow any more. Walks the expired
    /// records only.
    pub fn prune(&mut self, now: Instant, in_use: impl Fn(IpAddr) -> bool) {
        let gone: Vec<(Instant, Key)> = self
            .by_until
            .iter()
            .take_while(|(until, _)| *until <= now)
            .filter(|(_, (_, ip))| !in_use(*ip))
            .cloned()
            .collect();
        for entry in gone {
            self.by_until.remove(&entry);
            self.records.remove(&entry.1);
        }
    }

    /// Every remembered answer, one response per question name and chain, with the TTLs as received.
    pub fn responses(&self, client: IpAddr) -> Vec<Remembered> {
        responses(&self.records, client)
    }
}

/// `records` as responses to `client`: one per question name and chain, with the TTLs as received.
fn responses(records: &HashMap<Key, Record>, client: IpAddr) -> Vec<Remembered> {
    let mut by_name: HashMap<(&DnsName, &[DnsName]), Remembered> = HashMap::new();
    for ((qname, ip), r) in records {
        let entry = by_name
            .entry((qname, &r.chain))
            .or_insert_with(|| Remembered {
                response: DnsResponse::noerror(client, qname.clone(), r.chain.to_vec(), Vec::new()),
                at: HashMap::new(),
            });
        entry.response.answers.push(Answer {
            ip: *ip,
            ttl: r.ttl,
        });
        entry.at.insert(*ip, r.at);
    }
    by_name.into_values().collect()
}

/// The node-wide window of what the pods of namespaces without a `dnsName` rule were told, at most
/// [`RECENT_MAX`] records; see the module documentation.
#[derive(Debug, Default)]
pub struct RecentAnswers {
    /// By pod id.
    pods: HashMap<u16, HashMap<Key, Record>>,
    /// Every record of the window by expiry, earliest first, with its pod: the front goes first.
    by_until: BTreeSet<(Instant, u16, Key)>,
}

impl RecentAnswers {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_until.len()
    }

    /// Remembers every address of `resp` (a NOERROR answer to pod `pod`) until `until(ttl)`. Expired
    /// records go first; beyond [`RECENT_MAX`], the earliest-expiring, whichever pod's.
    pub fn remember(
        &mut self,
        pod: u16,
        resp: &DnsResponse,
        now: Instant,
        until: impl Fn(u32) -> Instant,
    ) {
        self.prune(now);
        let chain: Arc<[DnsName]> = resp.cname_chain.clone().into();
        for a in &resp.answers {
            let record = Record::new(&chain, a, now, &until);
            self.insert(pod, (resp.qname.clone(), a.ip), record);
        }
    }

    fn insert(&mut self, pod: u16, key: Key, record: Record) {
        let records = self.pods.entry(pod).or_default();
        if let Some(r) = records.get_mut(&key) {
            if let Some(old) = r.refresh(record) {
                let mut entry = (old, pod, key);
                self.by_until.remove(&entry);
                entry.0 = r.until;
                self.by_until.insert(entry);
            }
            return;
        }
        self.by_until.insert((record.until, pod, key.clone()));
        records.insert(key, record);
        while self.by_until.len() > RECENT_MAX {
            self.evict_first();
        }
    }

    fn evict_first(&mut self) {
        let Some((_, pod, key)) = self.by_until.pop_first() else {
            return;
        };
        if let Some(records) = self.pods.get_mut(&pod) {
            records.remove(&key);
            if records.is_empty() {
                self.pods.remove(&pod);
            }
        }
    }

    /// Forgets the records past their expiry: no flow rests on them (their namespaces have no
    /// `dnsName` rule), and a rule added now could not grant from them.
    pub fn prune(&mut self, now: Instant) {
        while self
            .by_until
            .first()
            .is_some_and(|(until, _, _)| *until <= now)
        {
            self.evict_first();
        }
    }

    /// What the window holds for pod `pod`, as responses to `client` (see [`AnswerMemory::responses`]).
    pub fn responses(&self, pod: u16, client: IpAddr) -> Vec<Remembered> {
        self.pods
            .get(&pod)
            .map(|records| responses(records, client))
            .unwrap_or_default()
    }

    /// Forgets what the window holds for pod `pod`: it left, and its id may go to another pod.
    pub fn forget(&mut self, pod: u16) {
        for (key, r) in self.pods.remove(&pod).into_iter().flatten() {
            self.by_until.remove(&(r.until, pod, key));
        }
    }

    /// Moves what the window holds for pod `pod` into its own `memory` (its namespace gained a
    /// `dnsName` rule): the latest-expiring first, as many as fit under `cap`.
    pub fn restore(&mut self, pod: u16, memory: &mut AnswerMemory, now: Instant, cap: usize) {
        let Some(records) = self.pods.remove(&pod) else {
            return;
        };
        let mut records: Vec<(Key, Record)> = records.into_iter().collect();
        records.sort_by_key(|(_, r)| Reverse(r.until));
        let room = cap.saturating_sub(memory.records.len());
        for (i, (key, r)) in records.into_iter().enumerate() {
            let entry = (r.until, pod, key);
            self.by_until.remove(&entry);
            // Within the room, nothing is evicted.
            if i < room {
                memory.insert(entry.2, r, now, cap, &|_| false);
            }
        }
    }

    /// Moves pod `pod`'s own `memory` into the window (its namespace lost its last `dnsName` rule, and
    /// with it every flow its answers earned): what is still within its expiry.
    pub fn keep(&mut self, pod: u16, memory: &mut AnswerMemory, now: Instant) {
        memory.by_until.clear();
        for (key, r) in memory.records.drain() {
            if r.until > now {
                self.insert(pod, key, r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn resp(qname: &str, ips: &[&str]) -> DnsResponse {
        DnsResponse::noerror(
            ip("10.244.1.5"),
            DnsName::new(qname).unwrap(),
            Vec::new(),
            ips.iter().map(|a| Answer { ip: ip(a), ttl: 60 }).collect(),
        )
    }

    fn addresses(m: &AnswerMemory) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = m
            .responses(ip("10.244.1.5"))
            .into_iter()
            .flat_map(|r| r.response.answers.into_iter().map(|a| a.ip))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_and_aaaa_and_round_robin_answers_live_side_by_side() {
        let t0 = Instant::now();
        let until = |ttl: u32| t0 + Duration::from_secs(ttl.into());
        let mut m = AnswerMemory::default();
        m.remember(
            &resp("www.google.com", &["142.250.1.1"]),
            t0,
            until,
            10,
            |_| false,
        );
        m.remember(
            &resp("www.google.com", &["2a00:1450::1"]),
            t0,
            until,
            10,
            |_| false,
        );
        m.remember(
            &resp("www.google.com", &["142.250.1.2"]),
            t0,
            until,
            10,
            |_| false,
        );
        assert_eq!(
            addresses(&m),
            vec![ip("142.250.1.1"), ip("142.250.1.2"), ip("2a00:1450::1")]
        );
        let rs = m.responses(ip("10.244.1.5"));
        assert_eq!(rs.len(), 1, "one response per name and chain");
    }

    #[test]
    fn expired_records_stay_while_a_flow_uses_them_and_the_cap_evicts_unused_first() {
        let t0 = Instant::now();
        let until = |ttl: u32| t0 + Duration::from_secs(ttl.into());
        let mut m = AnswerMemory::default();
        m.remember(
            &resp("a.com", &["1.1.1.1", "1.1.1.2"]),
            t0,
            until,
            2,
            |_| false,
        );
        let later = t0 + Duration::from_secs(61);
        let used = |i: IpAddr| i == ip("1.1.1.1");
        m.prune(later, used);
        assert_eq!(addresses(&m), vec![ip("1.1.1.1")]);
        m.remember(&resp("b.com", &["2.2.2.2"]), later, until, 2, used);
        assert_eq!(addresses(&m), vec![ip("1.1.1.1"), ip("2.2.2.2")]);
        // Full: the record backing no flow goes before the one that does.
        m.remember(
            &resp("c.com", &["3.3.3.3"]),
            later,
            |_| later + Duration::from_secs(60),
            2,
            used,
        );
        assert_eq!(addresses(&m), vec![ip("1.1.1.1"), ip("3.3.3.3")]);
    }

    #[test]
    fn a_refreshed_record_moves_in_the_expiry_order_and_the_earliest_expiring_goes_at_the_cap() {
        let t0 = Instant::now();
        let until = |ttl: u32| t0 + Duration::from_secs(ttl.into());
        let mut m = AnswerMemory::default();
        let answer = |name: &str, addr: &str, ttl: u32| {
            DnsResponse::noerror(
                ip("10.244.1.5"),
                DnsName::new(name).unwrap(),
                Vec::new(),
                vec![Answer { ip: ip(addr), ttl }],
            )
        };
        m.remember(&answer("a.com", "1.1.1.1", 60), t0, until, 2, |_| false);
        m.remember(&answer("b.com", "2.2.2.2", 120), t0, until, 2, |_| false);
        // a.com now outlives b.com; a shorter repeat of it changes nothing.
        m.remember(&answer("a.com", "1.1.1.1", 300), t0, until, 2, |_| false);
        m.remember(&answer("a.com", "1.1.1.1", 10), t0, until, 2, |_| false);
        // Full, and nothing has expired: the one expiring first goes, in use or not.
        m.remember(&answer("c.com", "3.3.3.3", 200), t0, until, 2, |_| true);
        assert_eq!(addresses(&m), vec![ip("1.1.1.1"), ip("3.3.3.3")]);
        m.remember(&answer("d.com", "4.4.4.4", 250), t0, until, 2, |_| false);
        assert_eq!(addresses(&m), vec![ip("1.1.1.1"), ip("4.4.4.4")]);
        // Pruning goes by each record's own expiry.
        m.prune(t0 + Duration::from_secs(260), |_| false);
        assert_eq!(addresses(&m), vec![ip("1.1.1.1")]);
        assert_eq!(m.by_until.len(), m.records.len());
    }

    #[test]
    fn the_recent_window_is_bounded_for_the_whole_node_and_loses_the_earliest_expiring_first() {
        let t0 = Instant::now();
        let until = |ttl: u32| t0 + Duration::from_secs(ttl.into());
        let mut w = RecentAnswers::default();
        // Pod 1 fills the window, each answer living a second longer than the one before.
        for i in 0..RECENT_MAX as u32 {
            let [_, a, b, c] = i.to_be_bytes();
            let r = DnsResponse::noerror(
                ip("10.244.1.5"),
                DnsName::new(&format!("h{i}.example.com")).unwrap(),
                Vec::new(),
                vec![Answer {
                    ip: IpAddr::from([11, a, b, c]),
                    ttl: 60 + i,
                }],
            );
            w.remember(1, &r, t0, until);
        }
        assert_eq!(w.len(), RECENT_MAX);
        // Another pod's answer pushes out pod 1's earliest-expiring one, not its own.
        w.remember(2, &resp("www.google.com", &["142.250.1.1"]), t0, until);
        assert_eq!(w.len(), RECENT_MAX);
        let mut pod1 = AnswerMemory::default();
        w.restore(1, &mut pod1, t0, usize::MAX);
        assert_eq!(pod1.len(), RECENT_MAX - 1);
        assert!(!addresses(&pod1).contains(&ip("11.0.0.0")));
        assert!(addresses(&pod1).contains(&ip("11.0.0.1")));
        let mut pod2 = AnswerMemory::default();
        w.restore(2, &mut pod2, t0, usize::MAX);
        assert_eq!(addresses(&pod2), vec![ip("142.250.1.1")]);
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn a_pods_answers_move_between_its_memory_and_the_window_while_they_are_current() {
        let t0 = Instant::now();
        let secs = |s: u64| t0 + Duration::from_secs(s);
        let until = |ttl: u32| secs(ttl.into());
        let mut w = RecentAnswers::default();
        w.remember(1, &resp("a.com", &["1.1.1.1", "1.1.1.2"]), t0, until);
        w.remember(1, &resp("b.com", &["2.2.2.2"]), t0, |_| secs(90));
        w.remember(2, &resp("c.com", &["3.3.3.3"]), t0, until);
        // Into the pod's memory: the latest-expiring first, within its cap.
        let mut m = AnswerMemory::default();
        w.restore(1, &mut m, t0, 1);
        assert_eq!(addresses(&m), vec![ip("2.2.2.2")]);
        assert_eq!(w.len(), 1, "pod 2's record stays");
        // Back into the window: only what has not expired.
        m.remember(&resp("a.com", &["1.1.1.1"]), t0, until, 10, |_| false);
        w.keep(1, &mut m, secs(70));
        assert_eq!(m.len(), 0);
        assert_eq!(w.len(), 2);
        // A pod that leaves takes its records with it; the next answer drops the expired ones.
        w.forget(1);
        assert_eq!(w.len(), 1);
        w.remember(3, &resp("d.com", &["4.4.4.4"]), secs(61), |_| secs(200));
        assert_eq!(w.len(), 1);
        let mut pod3 = AnswerMemory::default();
        w.restore(3, &mut pod3, secs(61), 10);
        assert_eq!(addresses(&pod3), vec![ip("4.4.4.4")]);
    }
}

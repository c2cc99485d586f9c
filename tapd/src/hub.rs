//! The event hub: numbers decoded responses, remembers recent answers, and fans them out to
//! subscribers.
//!
//! The producer (a dnstap connection) never waits: each subscriber has a bounded channel fed with
//! `try_send`, and a full channel loses the event, counted for that subscriber (in its log line when
//! it goes) and in tapd's metrics (in all, and how many connected subscribers have lost any). The
//! recent-answer cache lets a subscriber that (re)connects first receive the answers whose TTL has not
//! run out yet.

use crate::metrics::{DropReason, Metrics};
use dnsflow_dnstap::DnsResponse;
use futures::Stream;
use ipnet::IpNet;
use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState},
    net::IpAddr,
    pin::Pin,
    str::FromStr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, PoisonError, RwLock,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};
use tokio::sync::mpsc;

/// Sizing of the hub.
#[derive(Debug, Clone, Copy)]
pub struct HubConfig {
    /// Events buffered per subscriber before new ones are dropped for it.
    pub subscriber_buffer: usize,
    /// Most answers the recent-answer cache holds.
    pub recent_entries: usize,
    /// Most memory the recent-answer cache holds, in bytes (about): big answers count for more.
    pub recent_max_bytes: usize,
    /// Longest time an answer stays in the cache, whatever its TTL says.
    pub recent_max_ttl: Duration,
    /// Most subscribers at once (each may hold `subscriber_buffer` events).
    pub max_subscribers: usize,
    /// Most subscribers of one peer (identity and address) at once, so that one peer cannot take
    /// the slots every node's flowd needs.
    pub max_subscribers_per_peer: usize,
}

/// Why a subscription is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TooManySubscribers {
    #[error("{0} subscribers already connected")]
    Total(usize),
    #[error("{peer} already has {max} subscriptions")]
    Peer { peer: Arc<str>, max: usize },
}

/// Who subscribes: the name logs give it, and the key its subscriptions are counted under (identity
/// and address, without the port).
#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    pub key: Arc<str>,
}

impl From<&str> for Peer {
    fn from(s: &str) -> Self {
        Self {
            name: s.to_owned(),
            key: Arc::from(s),
        }
    }
}

/// Which clients a subscriber wants; empty means all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientFilter(Vec<IpNet>);

/// Most networks one filter may list: every event is matched against them on the dnstap reader's
/// path, so the list must stay short (a node has a handful of pod subnets).
pub const MAX_FILTER_CIDRS: usize = 256;

/// Why a `client_cidrs` list is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("{0:?} is neither a CIDR nor an IP address")]
    NotACidr(String),
    #[error("{0} networks; at most {MAX_FILTER_CIDRS}")]
    TooMany(usize),
}

impl ClientFilter {
    /// Parses CIDRs; a bare IP means that one host.
    pub fn parse<S: AsRef<str>>(cidrs: &[S]) -> Result<Self, FilterError> {
        if cidrs.len() > MAX_FILTER_CIDRS {
            return Err(FilterError::TooMany(cidrs.len()));
        }
        cidrs
            .iter()
            .map(|s| {
                let s = s.as_ref().trim();
                IpNet::from_str(s)
                    .map(|n| n.trunc())
                    .or_else(|_| IpAddr::from_str(s).map(IpNet::from))
                    .map_err(|_| FilterError::NotACidr(s.to_owned()))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn matches(&self, ip: IpAddr) -> bool {
        self.0.is_empty() || self.0.iter().any(|n| n.contains(&ip))
    }
}

#[derive(Debug)]
struct Subscriber {
    id: u64,
    peer: Arc<str>,
    filter: ClientFilter,
    tx: mpsc::Sender<Arc<DnsResponse>>,
    dropped: Arc<AtomicU64>,
}

/// Stale order items tolerated before compacting: compaction is linear, so it must not run on every
/// insert of a small cache.
const COMPACT_SLACK: usize = 1024;

/// Answers are keyed by a keyed SipHash of (client, name, type), not by the values themselves: the
/// map and the order queue then hold 8 bytes per key instead of a cloned name, which matters at tens
/// of thousands of entries. A newer answer for the same key replaces the older one; a collision
/// (odds 2^-64, and unguessable from outside) would merely let one cached answer replace another.
type RecentKey = u64;

/// The identity hash for keys that are already hashes.
#[derive(Debug, Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Debug)]
struct RecentEntry {
    response: Arc<DnsResponse>,
    stored: Instant,
    expires: Instant,
    /// What it holds in memory, about.
    bytes: usize,
}

/// A cached answer on its way to a subscriber that asked for the replay, and how long it has been
/// held: its TTLs are counted down when it is sent.
#[derive(Debug)]
struct Replay {
    response: Arc<DnsResponse>,
    held: u32,
}

impl Replay {
    /// The answer as replayed now, or `None` when all its addresses have expired.
    fn materialize(self) -> Option<Arc<DnsResponse>> {
        let mut r = DnsResponse::clone(&self.response);
        r.replayed = true;
        r.answers.retain_mut(|a| {
            a.ttl = a.ttl.saturating_sub(self.held);
            a.ttl > 0
        });
        (!r.answers.is_empty()).then(|| Arc::new(r))
    }
}

/// About the memory one cached answer holds: the response, its names and addresses, and its places in
/// the map and the order queue.
fn footprint(r: &DnsResponse) -> usize {
    const OVERHEAD: usize = 96;
    std::mem::size_of::<DnsResponse>()
        + OVERHEAD
        + r.qname.as_str().len()
        + r.server_identity.len()
        + r.cname_chain
            .iter()
            .map(|n| std::mem::size_of::<dnsflow_dnstap::DnsName>() + n.as_str().len())
            .sum::<usize>()
        + r.answers.capacity() * std::mem::size_of::<dnsflow_dnstap::Answer>()
}

/// Bounded by entry count and by bytes; expired entries go when seen (eviction, snapshots).
#[derive(Debug)]
struct RecentCache {
    capacity: usize,
    max_bytes: usize,
    bytes: usize,
    max_ttl: Duration,
    keys: RandomState,
    entries: HashMap<RecentKey, RecentEntry, BuildHasherDefault<PreHashed>>,
    /// Insertion order, for evicting the oldest; items whose sequence no longer matches the map are
    /// stale (replaced) and skipped.
    order: VecDeque<(RecentKey, u64)>,
}

impl RecentCache {
    fn new(capacity: usize, max_bytes: usize, max_ttl: Duration) -> Self {
        Self {
            capacity,
            max_bytes,
            bytes: 0,
            max_ttl,
            keys: RandomState::new(),
            entries: HashMap::default(),
            order: VecDeque::new(),
        }
    }

    fn insert(&mut self, r: &Arc<DnsResponse>, now: Instant) {
        let ttl = r.max_ttl().min(self.max_ttl);
        if self.capacity == 0 || !r.is_noerror() || ttl.is_zero() {
            return;
        }
        let bytes = footprint(r);
        if bytes > self.max_bytes {
            return;
        }
        let key = self.keys.hash_one((r.client, &r.qname, r.qtype));
        if let Some(old) = self.entries.remove(&key) {
            self.bytes -= old.bytes;
        }
        while (self.entries.len() >= self.capacity || self.bytes + bytes > self.max_bytes)
            && self.evict_oldest()
        {}
        self.order.push_back((key, r.sequence));
        self.bytes += bytes;
        self.entries.insert(
            key,
            RecentEntry {
                response: Arc::clone(r),
                stored: now,
                expires: now + ttl,
                bytes,
            },
        );
        // Replaced answers leave stale items behind; drop them once they outnumber the live ones, so
        // the order queue stays within twice the live entries (plus a little slack).
        if self.order.len() > 2 * self.entries.len() + COMPACT_SLACK {
            let entries = &self.entries;
            self.order
                .retain(|(k, seq)| entries.get(k).is_some_and(|e| e.response.sequence == *seq));
        }
    }

    /// Removes the oldest live entry; false when there is none.
    fn evict_oldest(&mut self) -> bool {
        while let Some((key, seq)) = self.order.pop_front() {
            if self
                .entries
                .get(&key)
                .is_some_and(|e| e.response.sequence == seq)
            {
                if let Some(e) = self.entries.remove(&key) {
                    self.bytes -= e.bytes;
                }
                return true;
            }
        }
        false
    }

    /// The live answers for `filter`, oldest first, each with the seconds it has been held. They are
    /// the cached entries themselves, shared: a replay costs a pointer per answer, not a copy.
    fn snapshot(&mut self, filter: &ClientFilter, now: Instant) -> Vec<Replay> {
        let bytes = &mut self.bytes;
        self.entries.retain(|_, e| {
            let live = e.expires > now;
            if !live {
                *bytes -= e.bytes;
            }
            live
        });
        let mut out: Vec<Replay> = self
            .entries
            .values()
            .filter(|e| filter.matches(e.response.client))
            .map(|e| Replay {
                response: Arc::clone(&e.response),
                held: u32::try_from(now.duration_since(e.stored).as_secs()).unwrap_or(u32::MAX),
            })
            .collect();
        out.sort_by_key(|r| r.response.sequence);
        out
    }
}

#[derive(Debug)]
struct Inner {
    config: HubConfig,
    metrics: Arc<Metrics>,
    sequence: AtomicU64,
    next_subscriber: AtomicU64,
    closed: AtomicBool,
    subscribers: RwLock<Vec<Arc<Subscriber>>>,
    recent: Mutex<RecentCache>,
}

/// Shared handle to the hub; clones are cheap.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl Hub {
    pub fn new(config: HubConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                metrics,
                sequence: AtomicU64::new(0),
                next_subscriber: AtomicU64::new(1),
                closed: AtomicBool::new(false),
                subscribers: RwLock::new(Vec::new()),
                recent: Mutex::new(RecentCache::new(
                    config.recent_entries,
                    config.recent_max_bytes,
                    config.recent_max_ttl,
                )),
            }),
        }
    }

    /// Numbers `response` (sequence numbers start at 1), caches it, and offers it to every matching
    /// subscriber without waiting. Returns the sequence number.
    pub fn publish(&self, mut response: DnsResponse, now: Instant) -> u64 {
        let inner = &*self.inner;
        let sequence = inner.sequence.fetch_add(1, Ordering::Relaxed) + 1;
        response.sequence = sequence;
        let response = Arc::new(response);
        {
            let mut recent = inner.recent.lock().unwrap_or_else(PoisonError::into_inner);
            recent.insert(&response, now);
            inner
                .metrics
                .set_recent_answers(recent.entries.len(), recent.bytes);
        }
        let subscribers = inner
            .subscribers
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        for s in subscribers
            .iter()
            .filter(|s| s.filter.matches(response.client))
        {
            if let Err(mpsc::error::TrySendError::Full(_)) = s.tx.try_send(Arc::clone(&response)) {
                if s.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    inner.metrics.subscriber_lagging();
                }
                inner.metrics.dropped(DropReason::SubscriberFull);
            }
        }
        sequence
    }

    /// Registers a subscriber. With `replay_recent`, the stream starts with the cached answers still
    /// valid at `now`; it is registered before the snapshot is taken, so an answer arriving meanwhile
    /// may come twice but is never lost.
    pub fn subscribe(
        &self,
        filter: ClientFilter,
        replay_recent: bool,
        peer: Peer,
        now: Instant,
    ) -> Result<Subscription, TooManySubscribers> {
        let inner = &self.inner;
        let id = inner.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(inner.config.subscriber_buffer.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let subscriber = Arc::new(Subscriber {
            id,
            peer: Arc::clone(&peer.key),
            filter: filter.clone(),
            tx,
            dropped: Arc::clone(&dropped),
        });
        {
            let mut subs = inner
                .subscribers
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if subs.len() >= inner.config.max_subscribers {
                return Err(TooManySubscribers::Total(subs.len()));
            }
            let max = inner.config.max_subscribers_per_peer;
            if subs.iter().filter(|s| s.peer == peer.key).count() >= max {
                return Err(TooManySubscribers::Peer {
                    peer: peer.key,
                    max,
                });
            }
            // After close, the sender is dropped at once and the stream ends after the replay.
            if !inner.closed.load(Ordering::Acquire) {
                subs.push(subscriber);
            }
            inner.metrics.set_subscribers(subs.len());
        }
        let replay = if replay_recent {
            let mut recent = inner.recent.lock().unwrap_or_else(PoisonError::into_inner);
            let replay = recent.snapshot(&filter, now);
            inner
                .metrics
                .set_recent_answers(recent.entries.len(), recent.bytes);
            replay
        } else {
            Vec::new()
        };
        Ok(Subscription {
            hub: Arc::clone(inner),
            id,
            peer: peer.name,
            dropped,
            replay: replay.into(),
            rx,
        })
    }

    /// Ends every subscription once its buffered events are read, and refuses new live ones.
    pub fn close(&self) {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::Release);
        inner
            .subscribers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        inner.metrics.set_subscribers(0);
    }
}

/// One subscriber's events: the replay first, then the live stream. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Inner>,
    id: u64,
    peer: String,
    dropped: Arc<AtomicU64>,
    replay: VecDeque<Replay>,
    rx: mpsc::Receiver<Arc<DnsResponse>>,
}

impl Subscription {
    /// Events this subscriber lost so far because its buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Stream for Subscription {
    type Item = Arc<DnsResponse>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        while let Some(r) = self.replay.pop_front() {
            if let Some(r) = r.materialize() {
                return Poll::Ready(Some(r));
            }
        }
        self.rx.poll_recv(cx)
    }
}

impl std::ops::Drop for Subscription {
    fn drop(&mut self) {
        let mut subs = self
            .hub
            .subscribers
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        subs.retain(|s| s.id != self.id);
        self.hub.metrics.set_subscribers(subs.len());
        // Read under the lock: no publish can count a loss for this subscriber any more.
        if self.dropped() > 0 {
            self.hub.metrics.lagging_subscriber_gone();
        }
        tracing::info!(
            subscriber = self.id,
            peer = %self.peer,
            dropped = self.dropped(),
            "subscriber gone"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dnsflow_dnstap::{Answer, DnsName};
    use futures::{FutureExt, StreamExt};

    fn config() -> HubConfig {
        HubConfig {
            subscriber_buffer: 4,
            recent_entries: 3,
            recent_max_bytes: 1 << 20,
            max_subscribers_per_peer: 2,
            recent_max_ttl: Duration::from_secs(3600),
            max_subscribers: 3,
        }
    }

    fn resp(client: &str, name: &str, ip: &str, ttl: u32) -> DnsResponse {
        DnsResponse::noerror(
            client.parse().unwrap(),
            DnsName::new(name).unwrap(),
            vec![],
            vec![Answer {
                ip: ip.parse().unwrap(),
                ttl,
            }],
        )
    }

    fn ready(s: &mut Subscription) -> Vec<Arc<DnsResponse>> {
        let mut out = Vec::new();
        while let Some(Some(r)) = s.next().now_or_never() {
            out.push(r);
        }
        out
    }

    #[test]
    fn filters_parse_cidrs_and_bare_ips() {
        let f = ClientFilter::parse(&["10.244.1.0/24", "fd00::7", " 10.0.0.9 "]).unwrap();
        assert!(f.matches("10.244.1.77".parse().unwrap()));
        assert!(f.matches("fd00::7".parse().unwrap()));
        assert!(f.matches("10.0.0.9".parse().unwrap()));
        assert!(!f.matches("10.0.0.10".parse().unwrap()));
        assert!(ClientFilter::default().matches("1.2.3.4".parse().unwrap()));
        assert_eq!(
            ClientFilter::parse(&["10.0.0.0/33"]),
            Err(FilterError::NotACidr("10.0.0.0/33".into()))
        );
        assert_eq!(
            ClientFilter::parse(&vec!["10.0.0.1"; MAX_FILTER_CIDRS + 1]),
            Err(FilterError::TooMany(MAX_FILTER_CIDRS + 1))
        );
    }

    #[test]
    fn a_full_subscriber_loses_events_and_others_do_not() {
        let metrics = Arc::new(Metrics::default());
        let hub = Hub::new(config(), Arc::clone(&metrics));
        let now = Instant::now();
        let mut stuck = hub
            .subscribe(ClientFilter::default(), false, "a".into(), now)
            .unwrap();
        let mut only_b = hub
            .subscribe(
                ClientFilter::parse(&["10.0.0.2/32"]).unwrap(),
                false,
                "b".into(),
                now,
            )
            .unwrap();
        for i in 0..10 {
            hub.publish(resp("10.0.0.1", "x.test", "192.0.2.1", 5), now);
            if i % 2 == 0 {
                hub.publish(resp("10.0.0.2", "y.test", "192.0.2.2", 5), now);
                let got = ready(&mut only_b);
                assert_eq!(got.len(), 1);
                assert_eq!(got[0].client.to_string(), "10.0.0.2");
            }
        }
        assert_eq!(ready(&mut stuck).len(), 4);
        assert_eq!(stuck.dropped(), 11);
        assert_eq!(only_b.dropped(), 0);
        let has = |line: &str| metrics.openmetrics().lines().any(|l| l == line);
        assert!(has("tapd_dropped_total{reason=\"subscriber_full\"} 11"));
        assert!(has("tapd_subscribers 2"));
        assert!(has("tapd_subscribers_lagging 1"), "only the stuck one lags");
        drop(stuck);
        assert!(has("tapd_subscribers 1"));
        assert!(
            has("tapd_subscribers_lagging 0"),
            "the one that lagged is gone"
        );
        assert!(
            has("tapd_recent_answers 2"),
            "one answer per client and name"
        );
    }

    #[test]
    fn one_peer_cannot_take_every_slot() {
        let hub = Hub::new(config(), Arc::default());
        let now = Instant::now();
        let sub = |peer: &str| hub.subscribe(ClientFilter::default(), false, peer.into(), now);
        let _a1 = sub("operator.dnsflow@10.0.0.9").unwrap();
        let _a2 = sub("operator.dnsflow@10.0.0.9").unwrap();
        assert_eq!(
            sub("operator.dnsflow@10.0.0.9").err(),
            Some(TooManySubscribers::Peer {
                peer: "operator.dnsflow@10.0.0.9".into(),
                max: 2
            })
        );
        // Another peer (a node's flowd) still gets its slot.
        assert!(sub("flowd.dnsflow@10.89.0.2").is_ok());
    }

    #[test]
    fn subscribers_are_bounded() {
        let hub = Hub::new(config(), Arc::default());
        let now = Instant::now();
        let subs: Vec<Subscription> = (0..3)
            .map(|i| {
                hub.subscribe(
                    ClientFilter::default(),
                    false,
                    format!("p{i}").as_str().into(),
                    now,
                )
                .unwrap()
            })
            .collect();
        assert_eq!(
            hub.subscribe(ClientFilter::default(), false, "q".into(), now)
                .err(),
            Some(TooManySubscribers::Total(3))
        );
        drop(subs);
        assert!(hub
            .subscribe(ClientFilter::default(), false, "q".into(), now)
            .is_ok());
    }

    #[test]
    fn sequence_numbers_increase_from_one() {
        let hub = Hub::new(config(), Arc::default());
        let now = Instant::now();
        assert_eq!(
            hub.publish(resp("10.0.0.1", "a.test", "192.0.2.1", 5), now),
            1
        );
        assert_eq!(
            hub.publish(resp("10.0.0.1", "a.test", "192.0.2.1", 5), now),
            2
        );
    }

    #[test]
    fn replay_sends_live_answers_newest_per_key_with_ttls_counted_down() {
        let hub = Hub::new(config(), Arc::default());
        let t0 = Instant::now();
        hub.publish(resp("10.0.0.1", "a.test", "192.0.2.1", 100), t0);
        hub.publish(resp("10.0.0.1", "a.test", "192.0.2.9", 100), t0); // replaces the first
        hub.publish(resp("10.0.0.1", "short.test", "192.0.2.3", 5), t0);
        let mut nx = resp("10.0.0.1", "gone.test", "192.0.2.4", 100);
        nx.rcode = 3;
        hub.publish(nx, t0);
        hub.publish(resp("10.0.0.2", "b.test", "192.0.2.5", 100), t0);

        let later = t0 + Duration::from_secs(10);
        let mut s = hub
            .subscribe(
                ClientFilter::parse(&["10.0.0.1"]).unwrap(),
                true,
                "p".into(),
                later,
            )
            .unwrap();
        let got = ready(&mut s);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].replayed);
        assert_eq!(got[0].answers[0].ip.to_string(), "192.0.2.9");
        assert_eq!(got[0].answers[0].ttl, 90);
        assert_eq!(got[0].sequence, 2);

        // Live events follow the replay.
        hub.publish(resp("10.0.0.1", "c.test", "192.0.2.6", 100), later);
        let got = ready(&mut s);
        assert_eq!(got.len(), 1);
        assert!(!got[0].replayed);
    }

    #[test]
    fn recent_cache_is_bounded_and_evicts_the_oldest() {
        let mut cache = RecentCache::new(3, usize::MAX, Duration::from_secs(60));
        let now = Instant::now();
        for i in 0..1000u64 {
            let mut r = resp("10.0.0.1", &format!("n{}.test", i % 5), "192.0.2.1", 30);
            r.sequence = i + 1;
            cache.insert(&Arc::new(r), now);
            assert!(cache.entries.len() <= 3);
            assert!(cache.order.len() <= 2 * 3 + COMPACT_SLACK + 1);
        }
        let names: Vec<String> = cache
            .snapshot(&ClientFilter::default(), now)
            .iter()
            .map(|r| r.response.qname.to_string())
            .collect();
        assert_eq!(names, ["n2.test", "n3.test", "n4.test"]);
        // The TTL cap bounds how long anything stays.
        assert!(cache
            .snapshot(&ClientFilter::default(), now + Duration::from_secs(61))
            .is_empty());
        assert!(cache.entries.is_empty());
    }

    /// An answer of `n` addresses for `client`, numbered `seq`.
    fn big(client: u8, n: u16, seq: u64) -> Arc<DnsResponse> {
        let mut r = resp(&format!("10.0.0.{client}"), "many.test", "192.0.2.1", 60);
        r.answers = (0..n)
            .map(|i| Answer {
                ip: std::net::IpAddr::from([198, 18, (i >> 8) as u8, i as u8]),
                ttl: 60,
            })
            .collect();
        r.sequence = seq;
        Arc::new(r)
    }

    #[test]
    fn recent_cache_is_bounded_in_bytes_whatever_the_answers_hold() {
        let max_bytes = 256 << 10;
        let mut cache = RecentCache::new(20_000, max_bytes, Duration::from_secs(3600));
        let now = Instant::now();
        for i in 0..2_000u64 {
            cache.insert(&big((i % 250) as u8, 256, i + 1), now);
            assert!(cache.bytes <= max_bytes, "{} bytes", cache.bytes);
        }
        let held: usize = cache.entries.values().map(|e| e.bytes).sum();
        assert_eq!(held, cache.bytes, "the running total is exact");
        assert!(
            cache.entries.len() < 100,
            "{} big answers kept",
            cache.entries.len()
        );
        // Small answers still fit many at a time.
        for i in 0..2_000u64 {
            cache.insert(&big((i % 250) as u8, 1, 10_000 + i), now);
        }
        assert_eq!(cache.entries.len(), 250);
        // An answer larger than the whole bound is not kept at all.
        let mut tiny = RecentCache::new(10, 1024, Duration::from_secs(60));
        tiny.insert(&big(1, 256, 1), now);
        assert!(tiny.entries.is_empty() && tiny.bytes == 0);
    }

    #[test]
    fn a_replay_shares_the_cached_answers() {
        let hub = Hub::new(config(), Arc::default());
        let now = Instant::now();
        hub.publish(resp("10.0.0.1", "a.test", "192.0.2.1", 60), now);
        let cached = {
            let mut recent = hub.inner.recent.lock().unwrap();
            recent.snapshot(&ClientFilter::default(), now)
        };
        // The snapshot holds the cache's own entry, not a copy.
        let entry = hub
            .inner
            .recent
            .lock()
            .unwrap()
            .entries
            .values()
            .next()
            .map(|e| Arc::clone(&e.response))
            .unwrap();
        assert!(Arc::ptr_eq(&cached[0].response, &entry));
        // Counted down when sent.
        let mut s = hub
            .subscribe(
                ClientFilter::default(),
                true,
                "p".into(),
                now + Duration::from_secs(20),
            )
            .unwrap();
        let got = ready(&mut s);
        assert_eq!(got[0].answers[0].ttl, 40);
        assert!(got[0].replayed);
    }

    #[test]
    fn close_ends_streams_after_their_buffer() {
        let hub = Hub::new(config(), Arc::default());
        let now = Instant::now();
        let mut s = hub
            .subscribe(ClientFilter::default(), false, "p".into(), now)
            .unwrap();
        hub.publish(resp("10.0.0.1", "a.test", "192.0.2.1", 5), now);
        hub.close();
        assert!(s.next().now_or_never().flatten().is_some());
        assert_eq!(s.next().now_or_never(), Some(None));
        let mut late = hub
            .subscribe(ClientFilter::default(), false, "q".into(), now)
            .unwrap();
        assert_eq!(late.next().now_or_never(), Some(None));
    }
}

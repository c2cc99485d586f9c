//! What one pod was told by DNS: every (name, IP) it received, each with its own expiry, so that a
//! rule change can decide again from what the pod knows. An A answer and an AAAA answer for one name,
//! or two round-robin answers with different IPs, live side by side: a newer answer never replaces an
//! older one's addresses, it only refreshes the ones it repeats.

use dnsflow_dnstap::{Answer, DnsName, DnsResponse};
use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Instant};

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

/// A pod's remembered answers, bounded.
#[derive(Debug, Default)]
pub struct AnswerMemory {
    records: HashMap<(DnsName, IpAddr), Record>,
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

    /// Remembers every address of `resp` (a NOERROR answer) until `until(ttl)`. At `cap` records, the
    /// ones neither current nor backing a flow (`in_use`) go first, then the ones expiring first.
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
            let key = (resp.qname.clone(), a.ip);
            let record = Record {
                chain: Arc::clone(&chain),
                ttl: a.ttl,
                at: now,
                until: until(a.ttl),
            };
            match self.records.get_mut(&key) {
                // An earlier, longer answer keeps its expiry; the chain is the newest one.
                Some(r) => {
                    if record.until >= r.until {
                        *r = record;
                    } else {
                        r.chain = record.chain;
                    }
                }
                None => {
                    if self.records.len() >= cap {
                        self.evict(now, &in_use);
                    }
                    if self.records.len() < cap {
                        self.records.insert(key, record);
                    }
                }
            }
        }
    }

    fn evict(&mut self, now: Instant, in_use: &impl Fn(IpAddr) -> bool) {
        let victim = self
            .records
            .iter()
            .min_by_key(|((_, ip), r)| (r.until > now || in_use(*ip), r.until))
            .map(|(k, _)| k.clone());
        if let Some(k) = victim {
            self.records.remove(&k);
        }
    }

    /// Forgets the records past their expiry whose address backs no flow any more.
    pub fn prune(&mut self, now: Instant, in_use: impl Fn(IpAddr) -> bool) {
        self.records
            .retain(|(_, ip), r| r.until > now || in_use(*ip));
    }

    /// Every remembered answer, one response per question name and chain, with the TTLs as received.
    pub fn responses(&self, client: IpAddr) -> Vec<Remembered> {
        let mut by_name: HashMap<(&DnsName, &[DnsName]), Remembered> = HashMap::new();
        for ((qname, ip), r) in &self.records {
            let entry = by_name
                .entry((qname, &r.chain))
                .or_insert_with(|| Remembered {
                    response: DnsResponse::noerror(
                        client,
                        qname.clone(),
                        r.chain.to_vec(),
                        Vec::new(),
                    ),
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
}

//! What every accept loop of both daemons needs against a hostile or overloaded network: a pause
//! after a failed accept ([`AcceptBackoff`]), and a share of connections per address
//! ([`PerAddress`]) so that one peer cannot take them all.

use crate::Backoff;
use std::{
    collections::HashMap,
    fmt, io,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

/// Pauses an accept loop after a failed accept (out of file descriptors, typically) instead of
/// letting it spin: from 10 ms, doubling up to 1 s, back to the start once an accept succeeds.
#[derive(Debug)]
pub struct AcceptBackoff(Backoff);

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self(Backoff::new(
            Duration::from_millis(10),
            Duration::from_secs(1),
        ))
    }
}

impl AcceptBackoff {
    /// An accept succeeded.
    pub fn accepted(&mut self) {
        self.0.reset();
    }

    /// An accept on `listener` failed: logs it and waits.
    pub async fn failed(&mut self, error: &io::Error, listener: impl fmt::Display) {
        let delay = self.0.next_delay();
        tracing::warn!(%error, %listener, retry_in = ?delay, "accept failed");
        tokio::time::sleep(delay).await;
    }
}

/// At most `max` of something (connections, handshakes) per peer address at once. Cheap to clone:
/// clones share the counts.
#[derive(Debug, Clone)]
pub struct PerAddress {
    max: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerAddress {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    /// One of `ip`'s shares, held until the returned slot is dropped; `None` while `ip` holds all
    /// of them.
    pub fn try_take(&self, ip: IpAddr) -> Option<AddressSlot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(ip).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            owner: self.clone(),
            ip,
        })
    }
}

/// One share of an address in a [`PerAddress`], given back when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    owner: PerAddress,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self
            .owner
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_its_share_and_gets_it_back() {
        let shares = PerAddress::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = shares.try_take(a);
        let second = shares.try_take(a);
        assert!(first.is_some() && second.is_some());
        assert!(shares.try_take(a).is_none());
        assert!(
            shares.try_take(b).is_some(),
            "another address has its own share"
        );
        drop(first);
        assert!(shares.try_take(a).is_some());
        drop(second);
        // The share of b taken above was dropped at once.
        assert!(
            !shares.open.lock().unwrap().contains_key(&b),
            "released addresses are forgotten"
        );
    }
}

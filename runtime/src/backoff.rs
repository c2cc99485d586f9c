//! The one retry schedule of both daemons: every reconnect, restart and retry after a failure waits
//! by a [`Backoff`].

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use std::time::Duration;

/// Exponential backoff with jitter: each delay lies between half and all of a step that doubles from
/// `min` up to `max`, so that every flowd of a cluster does not redial a restarted tapd, or retry a
/// busy OVS, at the same instant. A [`reset`](Backoff::reset) after a healthy stretch starts from `min`
/// again. It never runs out.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        // backon adds a jitter of up to the whole current delay: steps of half the size give delays
        // within [step / 2, step).
        let builder = ExponentialBuilder::default()
            .with_min_delay(min / 2)
            .with_max_delay(max.max(min) / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
            max: max.max(min),
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        // Without a limit on attempts the schedule has no end; the fallback is never reached.
        self.delays.next().unwrap_or(self.max)
    }

    /// Starts over from the shortest delay.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn delays_grow_with_jitter_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(MIN, MAX);
        let first = b.next_delay();
        assert!(first >= MIN / 2 && first <= MIN, "{first:?}");
        let delays: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= MAX), "{delays:?}");
        assert!(delays[19] >= MAX / 2, "{delays:?}");
        assert!(delays.windows(2).any(|w| w[0] != w[1]), "jittered");
        b.reset();
        assert!(b.next_delay() <= MIN);
    }

    #[test]
    fn a_fixed_interval_is_min_equal_to_max() {
        let mut b = Backoff::new(MIN, MIN);
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d >= MIN / 2 && d <= MIN, "{d:?}");
        }
    }
}

//! Exponential backoff with jitter, the one kind of every retry of the CCM: a
//! controller's retries of an object that failed ([`Failures`]), the watches' retries
//! ([`crate::watch::WatchBackoff`]) and the platform client's retries of a call
//! ([`crate::platform::retry`]). Each says how far it jitters ([`Jitter`]).
//!
//! [`Backoff`] is pure: the caller passes the random number, so the delays are tested
//! without randomness.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// How far a delay is spread: the doubled delay times a factor from `low` to `high`,
/// chosen evenly by a random number in [0, 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Jitter {
    low: f64,
    high: f64,
}

impl Jitter {
    /// ±20 %: a controller's retries of one object.
    pub const PLUS_MINUS_20_PERCENT: Jitter = Jitter { low: 0.8, high: 1.2 };
    /// Up to 20 % shorter, never longer: the watches', whose cap is a promise.
    pub const UP_TO_20_PERCENT_SHORTER: Jitter = Jitter { low: 0.8, high: 1.0 };
    /// "Equal jitter": half fixed, half random, so that callers failing together do not
    /// retry together while each still waits at least half the nominal time.
    pub const EQUAL: Jitter = Jitter { low: 0.5, high: 1.0 };
}

/// Delays doubling from `first` up to `max`, jittered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub jitter: Jitter,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration, jitter: Jitter) -> Self {
        Backoff { first, max, jitter }
    }

    /// `first * 2^retries`, at most `max`, before jitter.
    pub fn nominal(&self, retries: u32) -> Duration {
        let factor = 2u32.saturating_pow(retries.min(30));
        self.first.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry number `retries + 1`; `random` in [0, 1) picks the jitter
    /// (out of range, or not a number, is clamped, not trusted).
    pub fn delay(&self, retries: u32, random: f64) -> Duration {
        let random = if random.is_finite() {
            random.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let Jitter { low, high } = self.jitter;
        self.nominal(retries).mul_f64(low + (high - low) * random)
    }
}

/// Consecutive failures per object (a Service's or a Node's key), and the backoff of its
/// next retry: what a controller's `error_policy` asks.
#[derive(Debug)]
pub struct Failures {
    backoff: Backoff,
    counts: Mutex<HashMap<String, u32>>,
}

impl Failures {
    pub fn new(backoff: Backoff) -> Self {
        Failures {
            backoff,
            counts: Mutex::new(HashMap::new()),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one more failure of `key`: how many in a row now, and how long to wait
    /// before the next try.
    pub fn record(&self, key: String) -> (u32, Duration) {
        let n = {
            let mut counts = self.counts();
            let n = counts.entry(key).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        (n, self.backoff.delay(n - 1, rand::random::<f64>()))
    }

    /// `key` succeeded: its next failure starts the backoff again.
    pub fn clear(&self, key: &str) {
        self.counts().remove(key);
    }

    /// Failures of `key` in a row.
    pub fn count(&self, key: &str) -> Option<u32> {
        self.counts().get(key).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let b = Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(300),
            Jitter::PLUS_MINUS_20_PERCENT,
        );
        assert_eq!(b.nominal(0), Duration::from_secs(1));
        assert_eq!(b.nominal(3), Duration::from_secs(8));
        assert_eq!(b.nominal(30), Duration::from_secs(300));
        assert_eq!(b.nominal(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn jitter_spans_its_range() {
        let s = Duration::from_secs(1);
        let b = |jitter| Backoff::new(s, s, jitter);
        assert_eq!(
            b(Jitter::PLUS_MINUS_20_PERCENT).delay(0, 0.0),
            Duration::from_millis(800)
        );
        assert!(b(Jitter::PLUS_MINUS_20_PERCENT).delay(0, 0.999) < Duration::from_millis(1200));
        assert_eq!(b(Jitter::UP_TO_20_PERCENT_SHORTER).delay(0, 1.0), s);
        assert_eq!(b(Jitter::EQUAL).delay(0, 0.0), Duration::from_millis(500));
        assert_eq!(b(Jitter::EQUAL).delay(0, f64::NAN), Duration::from_millis(500));
        assert_eq!(b(Jitter::EQUAL).delay(0, -3.0), Duration::from_millis(500));
    }

    #[test]
    fn failures_count_per_key_until_cleared() {
        let s = Duration::from_secs(1);
        let f = Failures::new(Backoff::new(
            s,
            Duration::from_secs(4),
            Jitter::UP_TO_20_PERCENT_SHORTER,
        ));
        let (n, first) = f.record("a".into());
        assert_eq!(n, 1);
        assert!(first <= s && first >= s.mul_f64(0.8), "{first:?}");
        f.record("a".into());
        let (n, third) = f.record("a".into());
        assert_eq!((n, f.count("a"), f.count("b")), (3, Some(3), None));
        assert!(third >= Duration::from_millis(3200), "{third:?}");
        f.clear("a");
        assert_eq!(f.count("a"), None);
        assert_eq!(f.record("a".into()).0, 1);
    }
}

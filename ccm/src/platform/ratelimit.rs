//! The client-side rate limiter shared by every caller of one client.
//!
//! Two independent brakes:
//! - a "not before" deadline: when any call is answered 429, nobody sends again before
//!   its `Retry-After` has passed (otherwise 50 concurrent reconciles would each burn a
//!   request to learn the same thing);
//! - an optional token bucket (`qps`, `burst`) to stay under a known platform quota.
//!
//! The decisions are made by [`RateLimiter::reserve`], a pure function of `now`; only
//! [`RateLimiter::acquire`] touches the clock.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Token-bucket settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucketConfig {
    /// Sustained requests per second (> 0).
    pub qps: f64,
    /// Requests that may be sent at once after a quiet period (>= 1).
    pub burst: u32,
}

#[derive(Debug)]
struct Bucket {
    qps: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
struct State {
    not_before: Option<Instant>,
    bucket: Option<Bucket>,
}

/// See the module docs.
#[derive(Debug)]
pub struct RateLimiter {
    state: Mutex<State>,
    waits: AtomicU64,
}

impl RateLimiter {
    /// A limiter with the optional token bucket (`None`: only the 429 deadline).
    /// A bucket with a non-positive or non-finite `qps` is treated as absent.
    pub fn new(bucket: Option<TokenBucketConfig>, now: Instant) -> Self {
        let bucket = bucket.filter(|b| b.qps.is_finite() && b.qps > 0.0).map(|b| {
            let burst = f64::from(b.burst.max(1));
            Bucket {
                qps: b.qps,
                burst,
                tokens: burst,
                last: now,
            }
        });
        RateLimiter {
            state: Mutex::new(State {
                not_before: None,
                bucket,
            }),
            waits: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is a
        // single assignment.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a 429: nobody sends before `now + retry_after`. Never shortens an
    /// existing deadline.
    pub fn note_retry_after(&self, now: Instant, retry_after: Duration) {
        let deadline = now + retry_after;
        let mut st = self.lock();
        if st.not_before.is_none_or(|nb| nb < deadline) {
            st.not_before = Some(deadline);
        }
    }

    /// The current "not before" deadline, if it is still ahead of `now`.
    pub fn not_before(&self, now: Instant) -> Option<Instant> {
        self.lock().not_before.filter(|nb| *nb > now)
    }

    /// Takes permission to send at `now`: `Duration::ZERO` when granted (a token is
    /// consumed), otherwise how long to wait before asking again.
    pub fn reserve(&self, now: Instant) -> Duration {
        let mut st = self.lock();
        if let Some(nb) = st.not_before {
            if nb > now {
                return nb - now;
            }
            st.not_before = None;
        }
        let Some(b) = st.bucket.as_mut() else {
            return Duration::ZERO;
        };
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * b.qps).min(b.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - b.tokens) / b.qps)
        }
    }

    /// Waits until this caller may send. Counts one wait per call that had to wait.
    /// Returns how long it waited (`ZERO` when it did not).
    pub async fn acquire(&self) -> Duration {
        let start = Instant::now();
        let mut waited = false;
        loop {
            let wait = self.reserve(Instant::now());
            if wait.is_zero() {
                return if waited { start.elapsed() } else { Duration::ZERO };
            }
            if !waited {
                waited = true;
                self.waits.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(wait_ms = wait.as_millis() as u64, "platform rate limiter: waiting");
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// How many calls had to wait so far.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn no_bucket_no_deadline_never_waits() {
        let t0 = Instant::now();
        let rl = RateLimiter::new(None, t0);
        for _ in 0..1000 {
            assert_eq!(rl.reserve(t0), Duration::ZERO);
        }
    }

    #[test]
    fn retry_after_blocks_everyone_until_the_deadline() {
        let t0 = Instant::now();
        let rl = RateLimiter::new(None, t0);
        rl.note_retry_after(t0, 2000 * MS);
        assert_eq!(rl.reserve(t0), 2000 * MS);
        assert_eq!(rl.reserve(t0 + 500 * MS), 1500 * MS);
        assert_eq!(rl.not_before(t0 + 500 * MS), Some(t0 + 2000 * MS));
        // A shorter Retry-After seen later does not shorten the deadline...
        rl.note_retry_after(t0 + 500 * MS, 100 * MS);
        assert_eq!(rl.reserve(t0 + 1000 * MS), 1000 * MS);
        // ...a longer one extends it.
        rl.note_retry_after(t0 + 1000 * MS, 3000 * MS);
        assert_eq!(rl.reserve(t0 + 2000 * MS), 2000 * MS);
        assert_eq!(rl.reserve(t0 + 4000 * MS), Duration::ZERO);
        assert_eq!(rl.not_before(t0 + 4000 * MS), None);
    }

    #[test]
    fn token_bucket_allows_burst_then_paces() {
        let t0 = Instant::now();
        let rl = RateLimiter::new(Some(TokenBucketConfig { qps: 10.0, burst: 3 }), t0);
        for _ in 0..3 {
            assert_eq!(rl.reserve(t0), Duration::ZERO);
        }
        let wait = rl.reserve(t0);
        assert!(wait > 99 * MS && wait <= 100 * MS, "{wait:?}");
        assert_eq!(rl.reserve(t0 + 100 * MS), Duration::ZERO);
        assert!(rl.reserve(t0 + 100 * MS) > Duration::ZERO);
        // A long quiet period refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(rl.reserve(later), Duration::ZERO);
        }
        assert!(rl.reserve(later) > Duration::ZERO);
    }

    #[test]
    fn deadline_applies_before_the_bucket() {
        let t0 = Instant::now();
        let rl = RateLimiter::new(Some(TokenBucketConfig { qps: 1.0, burst: 5 }), t0);
        rl.note_retry_after(t0, 300 * MS);
        assert_eq!(rl.reserve(t0 + 100 * MS), 200 * MS);
        assert_eq!(rl.reserve(t0 + 300 * MS), Duration::ZERO);
    }

    #[test]
    fn nonsense_bucket_is_ignored() {
        let t0 = Instant::now();
        for qps in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let rl = RateLimiter::new(Some(TokenBucketConfig { qps, burst: 0 }), t0);
            assert_eq!(rl.reserve(t0), Duration::ZERO);
        }
    }

    #[tokio::test]
    async fn acquire_waits_and_counts() {
        let rl = RateLimiter::new(None, Instant::now());
        assert_eq!(rl.acquire().await, Duration::ZERO);
        assert_eq!(rl.waits(), 0);
        rl.note_retry_after(Instant::now(), 150 * MS);
        let waited = rl.acquire().await;
        assert!(waited >= 150 * MS && waited < 2000 * MS, "{waited:?}");
        assert_eq!(rl.waits(), 1);
    }
}

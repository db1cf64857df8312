//! How the controllers' watches retry after the API server failed them.

use std::time::Duration;

use crate::backoff::{Backoff, Jitter};

/// The first and the largest delay before a failed watch is retried.
const MIN: Duration = Duration::from_millis(250);
pub const MAX: Duration = Duration::from_secs(5);

const BACKOFF: Backoff = Backoff::new(MIN, MAX, Jitter::UP_TO_20_PERCENT_SHORTER);

/// Retry delays of the watches: doubling from 250 ms to at most [`MAX`] with up to 20%
/// jitter, back to the start after any success. kube-runtime's default (client-go's: up
/// to 30 s, reset only after 2 quiet minutes) left a node watch closed 33 s after a 12 s
/// API server outage had ended; a few watches retried every 5 s cost the server nothing.
/// (The gateway's `source::kube::WatchBackoff` is the same; the crates share no code.)
#[derive(Clone, Debug, Default)]
pub struct WatchBackoff {
    /// Retries since the last success.
    retries: u32,
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // Replicas restarted together should not retry in step.
        let delay = BACKOFF.delay(self.retries, rand::random::<f64>());
        self.retries = self.retries.saturating_add(1);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.retries = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::utils::Backoff;

    #[test]
    fn capped_doubling_reset_on_success() {
        let mut b = WatchBackoff::default();
        let delays: Vec<Duration> = b.by_ref().take(8).collect();
        assert!(delays[0] <= MIN && delays[0] >= MIN.mul_f64(0.8));
        assert!(delays.windows(2).take(4).all(|w| w[1] > w[0]), "doubling: {delays:?}");
        assert!(delays.iter().all(|d| *d <= MAX), "capped: {delays:?}");
        assert!(delays[7] >= MAX.mul_f64(0.8), "{delays:?}");
        b.reset();
        assert!(b.next().unwrap() <= MIN);
    }
}

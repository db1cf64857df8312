//! A per-peer budget for audit lines: a peer trying every port of a denied Service would
//! otherwise write one "flow denied" line per try (65,535 lines for one scan, found by
//! `tests/reliability_gateway.rs`). The first [`LINES_PER_SECOND`] lines of a peer in a
//! second are written; the rest of that second are counted and reported in one line when
//! the second is over. The metrics still count every denied flow.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::peers::PeerId;

/// Audit lines of denied flows per peer per second.
pub const LINES_PER_SECOND: u32 = 20;
const WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

/// See the module documentation. Pure: the caller passes the time and writes the lines.
#[derive(Debug)]
pub struct AuditBudget {
    per_second: u32,
    peers: HashMap<PeerId, Window>,
}

impl Default for AuditBudget {
    fn default() -> Self {
        AuditBudget::new(LINES_PER_SECOND)
    }
}

impl AuditBudget {
    pub fn new(per_second: u32) -> Self {
        AuditBudget {
            per_second,
            peers: HashMap::new(),
        }
    }

    /// Whether a line for `peer` may be written at `now`, and how many lines of the
    /// peer's previous second were held back (to report first), if any.
    pub fn allow(&mut self, peer: &PeerId, now: Instant) -> (bool, Option<u64>) {
        let fresh = Window {
            start: now,
            logged: 0,
            suppressed: 0,
        };
        let w = self.peers.entry(peer.clone()).or_insert(fresh);
        let mut held = None;
        if now.saturating_duration_since(w.start) >= WINDOW {
            held = (w.suppressed > 0).then_some(w.suppressed);
            *w = fresh;
        }
        if w.logged < self.per_second {
            w.logged += 1;
            (true, held)
        } else {
            w.suppressed += 1;
            (false, held)
        }
    }

    /// Windows over at `now`: forgotten, and the peers with lines held back returned (so a
    /// scan's last second is reported too).
    pub fn expire(&mut self, now: Instant) -> Vec<(PeerId, u64)> {
        if self.peers.is_empty() {
            return Vec::new();
        }
        let mut held = Vec::new();
        self.peers.retain(|peer, w| {
            if now.saturating_duration_since(w.start) < WINDOW {
                return true;
            }
            if w.suppressed > 0 {
                held.push((peer.clone(), w.suppressed));
            }
            false
        });
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scan_writes_the_budget_then_one_summary_per_second() {
        let mut b = AuditBudget::new(3);
        let (alice, bob) = (PeerId::new("t", "alice"), PeerId::new("t", "bob"));
        let t0 = Instant::now();
        let allowed: Vec<bool> = (0..10).map(|_| b.allow(&alice, t0).0).collect();
        assert_eq!(allowed.iter().filter(|a| **a).count(), 3);
        // Another peer has its own budget.
        assert_eq!(b.allow(&bob, t0), (true, None));
        // Within the second nothing is reported yet.
        assert!(b.expire(t0 + Duration::from_millis(500)).is_empty());
        // The next second: alice's 7 held-back lines are reported with her next line.
        assert_eq!(b.allow(&alice, t0 + WINDOW), (true, Some(7)));
        // A scan that stops is reported by expire; bob had nothing held back.
        for _ in 0..5 {
            b.allow(&alice, t0 + WINDOW);
        }
        assert_eq!(b.expire(t0 + 2 * WINDOW), vec![(alice.clone(), 3)]);
        assert!(b.peers.is_empty(), "expired windows are forgotten");
        assert_eq!(b.allow(&alice, t0 + 3 * WINDOW), (true, None));
    }
}

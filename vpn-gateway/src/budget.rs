//! A CPU-time budget for handshake work: a flood of real handshake initiations (each
//! ~250 µs of X25519 work) could take a whole core, below any fixed rate limit an operator
//! chose. The handshake worker ([`crate::handshake`]) keeps them off the data loop, but
//! on a machine of two cores the cores are what the data needs. Kernel WireGuard judges
//! "under load" by its handshake queue (so does the gateway, see [`crate::handshake`]);
//! this also judges it by the time spent on handshake messages in the last window: the
//! worker's, and the loop's own on the cheap part (MAC checks, cookie replies).
//!
//! Pure state in the style of boringtun's noise: the caller owns the clock, measures each
//! handshake message it handled and passes the instants in (the gateway shares one
//! budget between its two threads behind a lock).

use std::time::{Duration, Instant};

/// The window over which handshake time is added up.
pub const WINDOW: Duration = Duration::from_millis(100);
/// Handshake time allowed per window: half of it, so a flood takes at most half of a core
/// (a quarter on average: an overspent window makes the next one under load too).
pub const ALLOWED: Duration = Duration::from_millis(50);
/// The most one message is charged: a handshake takes ~250 µs, anything much longer is the
/// thread being preempted on a busy machine, not handshake work. A normal handshake rate
/// then cannot use the budget up, however slow one message looked.
pub const MAX_CHARGE: Duration = Duration::from_millis(5);

/// Handshake time in the current window and whether the last one went over budget.
#[derive(Debug, Clone)]
pub struct HandshakeBudget {
    window: Duration,
    allowed: Duration,
    /// Start of the current window; `None` before the first message.
    start: Option<Instant>,
    spent: Duration,
    /// The previous window went over budget: the whole current one is under load.
    carried: bool,
}

impl Default for HandshakeBudget {
    fn default() -> Self {
        HandshakeBudget::new(WINDOW, ALLOWED)
    }
}

impl HandshakeBudget {
    /// `allowed` of handshake time per `window`.
    pub fn new(window: Duration, allowed: Duration) -> Self {
        HandshakeBudget {
            window: window.max(Duration::from_millis(1)),
            allowed,
            start: None,
            spent: Duration::ZERO,
            carried: false,
        }
    }

    /// A handshake message was handled from `started` to `ended`.
    pub fn record(&mut self, started: Instant, ended: Instant) {
        self.roll(ended);
        let took = ended.saturating_duration_since(started).min(MAX_CHARGE);
        self.spent = self.spent.saturating_add(took);
    }

    /// Must the next handshake message be treated as under load (cookie reply unless it
    /// carries a valid cookie)? True once the current window's handshake time is over
    /// budget, and for the whole window after one that went over.
    pub fn over(&mut self, now: Instant) -> bool {
        self.roll(now);
        self.carried || self.spent > self.allowed
    }

    /// While over budget at `now`, until when at the latest: the end of the current window
    /// when only the previous one went over, of the next one when this one did too.
    pub fn over_until(&mut self, now: Instant) -> Option<Instant> {
        if !self.over(now) {
            return None;
        }
        let start = self.start?;
        Some(if self.spent > self.allowed {
            start + 2 * self.window
        } else {
            start + self.window
        })
    }

    /// Close the current window if `now` is past it.
    fn roll(&mut self, now: Instant) {
        let Some(start) = self.start else {
            self.start = Some(now);
            return;
        };
        // An instant before the window's start (callers' clocks read out of order) belongs
        // to the current window.
        let elapsed = now.saturating_duration_since(start);
        if elapsed < self.window {
            return;
        }
        if elapsed < 2 * self.window {
            // The next window: the closed one's verdict carries over.
            self.carried = self.spent > self.allowed;
            self.start = Some(start + self.window);
        } else {
            // Whole windows without a handshake message in between: the last was quiet.
            self.carried = false;
            self.start = Some(now);
        }
        self.spent = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// `n` messages of `each`, back to back from `t`; returns the end.
    fn work(b: &mut HandshakeBudget, mut t: Instant, n: usize, each: Duration) -> Instant {
        for _ in 0..n {
            b.record(t, t + each);
            t += each;
        }
        t
    }

    #[test]
    fn a_normal_handshake_rate_never_goes_over() {
        let mut b = HandshakeBudget::default();
        let t0 = Instant::now();
        // 1,000 handshakes/s at 250 µs each (far above a normal rate) for 10 s: 25 % of
        // each window.
        for i in 0..10_000u32 {
            let t = t0 + Duration::from_micros(1_000) * i;
            assert!(!b.over(t), "over budget at {i}");
            b.record(t, t + Duration::from_micros(250));
        }
    }

    #[test]
    fn a_quiet_window_is_not_over_budget() {
        let mut b = HandshakeBudget::default();
        let t0 = Instant::now();
        assert!(!b.over(t0));
        let t = work(&mut b, t0, 10, Duration::from_micros(250));
        assert!(!b.over(t));
        assert!(!b.over(t0 + ms(150)), "the next window after a quiet one");
    }

    #[test]
    fn a_saturated_window_is_over_for_its_rest_and_the_whole_next_one() {
        let mut b = HandshakeBudget::default();
        let t0 = Instant::now();
        assert!(!b.over(t0));
        // 200 handshakes of 250 µs: exactly the allowance is not over it yet.
        let t = work(&mut b, t0, 200, Duration::from_micros(250));
        assert!(!b.over(t));
        let t = work(&mut b, t, 1, Duration::from_micros(250));
        assert!(b.over(t), "over the allowance within the window");
        assert!(b.over(t0 + ms(99)));
        // Under load for the next window, although nothing was spent in it.
        assert!(b.over(t0 + ms(100)));
        assert!(b.over(t0 + ms(199)));
        // The window after that: the carried one was quiet.
        assert!(!b.over(t0 + ms(200)));
    }

    #[test]
    fn recovers_after_the_load_stops() {
        let mut b = HandshakeBudget::default();
        let t0 = Instant::now();
        b.over(t0);
        let mut t = t0;
        for round in 0..5 {
            // Real handshakes back to back until over budget.
            let mut n = 0;
            while !b.over(t) {
                t = work(&mut b, t, 1, Duration::from_micros(250));
                n += 1;
                assert!(n < 1_000, "round {round}: never over budget");
            }
            // While over, a 10,000/s flood gets cookie replies (~3 µs each): cheap, so the
            // budget comes back after the carried window.
            let mut cookies = 0;
            while b.over(t) {
                b.record(t, t + Duration::from_micros(3));
                t += Duration::from_micros(100);
                cookies += 1;
                assert!(cookies < 5_000, "round {round}: never back under budget");
            }
            // The rest of this window, then all the next window.
            assert!(cookies > 1_000, "round {round}: only {cookies} cookie replies");
        }
        // The flood stops: handshakes are taken again, at once a second later...
        assert!(!b.clone().over(t + ms(1_000)));
        // ...and after the carried window when the last one ended over budget.
        let t = work(&mut b, t, 201, Duration::from_micros(250));
        assert!(b.over(t));
        let start = b.start.expect("started");
        assert!(b.over(start + ms(100)));
        assert!(!b.over(start + ms(200)));
    }

    #[test]
    fn over_until_is_the_end_of_the_load() {
        let mut b = HandshakeBudget::default();
        let t0 = Instant::now();
        assert_eq!(b.over_until(t0), None);
        let t = work(&mut b, t0, 201, Duration::from_micros(250));
        // Over in the first window: under load to the end of the second.
        assert_eq!(b.over_until(t), Some(t0 + ms(200)));
        // In the second (carried) window: to its end.
        assert_eq!(b.over_until(t0 + ms(150)), Some(t0 + ms(200)));
        assert_eq!(b.over_until(t0 + ms(200)), None);
    }

    #[test]
    fn a_long_gap_counts_as_quiet_windows() {
        let mut b = HandshakeBudget::default();
        let t0 = Instant::now();
        let t = work(&mut b, t0, 300, Duration::from_micros(250));
        assert!(b.over(t));
        // 250 ms later: the window in between had nothing.
        assert!(!b.over(t0 + ms(250)));
        // Windows are counted from the late message.
        let t = work(&mut b, t0 + ms(250), 201, Duration::from_micros(250));
        assert!(b.over(t));
        assert!(b.over(t0 + ms(250) + ms(199)));
    }

    #[test]
    fn clock_edge_cases() {
        let mut b = HandshakeBudget::default();
        let t0 = Instant::now() + ms(1_000);
        assert!(!b.over(t0));
        // An instant before the window's start, and an end before its start: charged
        // nothing, no panic.
        assert!(!b.over(t0 - ms(500)));
        b.record(t0, t0 - ms(1));
        assert!(!b.over(t0));
        // One message that seemed to take a whole second (the thread was stopped) is
        // charged MAX_CHARGE only.
        b.record(t0, t0 + ms(1_000) - ms(1));
        assert_eq!(b.spent, MAX_CHARGE);
        assert!(!b.over(t0 + ms(1_000)));
        // Exactly one window later the verdict is carried; exactly two later it is not.
        let mut b = HandshakeBudget::default();
        assert!(!b.over(t0));
        let t1 = work(&mut b, t0, 11, MAX_CHARGE);
        assert!(b.over(t1));
        assert!(b.over(t0 + ms(100)));
        let mut c = b.clone();
        assert!(!c.over(t0 + ms(200)));
        assert!(!b.over(t0 + ms(100) + ms(200)));
        // A zero window is clamped, so time still moves windows.
        let mut z = HandshakeBudget::new(Duration::ZERO, Duration::ZERO);
        z.record(t0, t0 + ms(1));
        assert!(z.over(t0 + ms(1)));
        assert!(!z.over(t0 + ms(10)));
    }
}

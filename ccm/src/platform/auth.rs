//! When to renew the bearer token.

use std::time::{Duration, SystemTime};

/// Lifetime assumed when the login answer has no readable `expires_at`: short enough
/// that a revoked token is replaced soon, and a 401 renews it anyway.
pub const FALLBACK_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// The instant at which a token obtained at `obtained_at` and expiring at `expires_at`
/// should be replaced: `renew_before` ahead of expiry, but never earlier than half-way
/// through its lifetime. Without that floor a short-lived token (or a clock skewed
/// against the platform's) would force a login before every call.
pub fn renew_at(obtained_at: SystemTime, expires_at: SystemTime, renew_before: Duration) -> SystemTime {
    let lifetime = expires_at.duration_since(obtained_at).unwrap_or(Duration::ZERO);
    obtained_at + lifetime - renew_before.min(lifetime / 2)
}

/// Whether the token must be renewed before it is used at `now`.
pub fn needs_renewal(now: SystemTime, obtained_at: SystemTime, expires_at: SystemTime, renew_before: Duration) -> bool {
    now >= renew_at(obtained_at, expires_at, renew_before)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const S: Duration = Duration::from_secs(1);

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn renews_shortly_before_expiry() {
        // One-hour token, renewed 60 s early.
        let (got, exp) = (t(1000), t(4600));
        assert!(!needs_renewal(t(1000), got, exp, 60 * S));
        assert!(!needs_renewal(t(4539), got, exp, 60 * S));
        assert!(needs_renewal(t(4540), got, exp, 60 * S));
        assert!(needs_renewal(t(5000), got, exp, 60 * S));
    }

    #[test]
    fn short_tokens_are_used_for_half_their_life() {
        // A 10 s token with a 60 s margin is still used for 5 s.
        let (got, exp) = (t(1000), t(1010));
        assert!(!needs_renewal(t(1004), got, exp, 60 * S));
        assert!(needs_renewal(t(1005), got, exp, 60 * S));
    }

    #[test]
    fn already_expired_tokens_are_renewed() {
        // expires_at in the past by our clock (skew): renew at once.
        assert!(needs_renewal(t(1000), t(1000), t(900), 60 * S));
    }

    #[test]
    fn zero_margin_renews_at_expiry() {
        assert!(!needs_renewal(t(1099), t(1000), t(1100), Duration::ZERO));
        assert!(needs_renewal(t(1100), t(1000), t(1100), Duration::ZERO));
    }
}

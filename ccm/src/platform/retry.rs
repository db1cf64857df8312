//! Which failed calls the client repeats, and how long it waits first.
//!
//! Pure: the caller passes the attempt number and the random jitter, so the policy is
//! tested without clocks or randomness.

use std::time::Duration;

use reqwest::Method;

use super::error::Error;
use crate::backoff::{Backoff, Jitter};

/// Retry and backoff settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (so at most `max_retries + 1` attempts). 401
    /// renewals are not counted: they have their own limit of one.
    pub max_retries: u32,
    /// Backoff before the first retry; doubles per retry.
    pub base_backoff: Duration,
    /// Upper bound of one backoff.
    pub max_backoff: Duration,
    /// Upper bound of one `Retry-After` wait; a platform asking for longer gets this.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

/// Whether `method` may be sent twice without harm. POST creates: a retried POST whose
/// first attempt did reach the platform would create a second object.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    )
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Give the error to the caller.
    GiveUp,
    /// Wait for the shared rate limiter's deadline (`Retry-After`, capped), then retry.
    /// The wait is registered with the limiter so that every caller honours it.
    AfterRateLimit(Duration),
    /// Sleep this long (exponential backoff with jitter), then retry.
    Backoff(Duration),
}

impl RetryPolicy {
    /// Decides after attempt number `retries_done + 1` failed with `error`.
    /// `jitter` is a random number in `[0, 1)`.
    pub fn decide(&self, method: &Method, error: &Error, retries_done: u32, jitter: f64) -> RetryDecision {
        if retries_done >= self.max_retries {
            return RetryDecision::GiveUp;
        }
        match error {
            // A 429 means the request was not processed: safe for any method.
            Error::RateLimited { retry_after } => {
                RetryDecision::AfterRateLimit((*retry_after).min(self.max_retry_after))
            }
            Error::Server { status, .. } if *status >= 500 && is_idempotent(method) => {
                RetryDecision::Backoff(self.backoff(retries_done, jitter))
            }
            Error::Transport(_) | Error::Timeout { .. } if is_idempotent(method) => {
                RetryDecision::Backoff(self.backoff(retries_done, jitter))
            }
            _ => RetryDecision::GiveUp,
        }
    }

    /// `base * 2^retries_done`, capped at `max_backoff`, then "equal jitter": half of it
    /// fixed, the other half random ([`Jitter::EQUAL`]).
    pub fn backoff(&self, retries_done: u32, jitter: f64) -> Duration {
        Backoff::new(self.base_backoff, self.max_backoff, Jitter::EQUAL).delay(retries_done, jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(status: u16) -> Error {
        Error::Server {
            status,
            message: "boom".into(),
        }
    }

    fn timeout() -> Error {
        Error::Timeout {
            method: "GET",
            path: "/x".into(),
            after: Duration::from_secs(10),
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy::default()
    }

    #[test]
    fn server_errors_retry_only_idempotent_methods() {
        let p = policy();
        for m in [Method::GET, Method::PUT, Method::DELETE] {
            assert!(matches!(p.decide(&m, &server(503), 0, 0.5), RetryDecision::Backoff(_)));
            assert!(matches!(p.decide(&m, &timeout(), 0, 0.5), RetryDecision::Backoff(_)));
        }
        assert_eq!(p.decide(&Method::POST, &server(503), 0, 0.5), RetryDecision::GiveUp);
        assert_eq!(p.decide(&Method::POST, &timeout(), 0, 0.5), RetryDecision::GiveUp);
    }

    #[test]
    fn rate_limits_retry_any_method_with_capped_wait() {
        let p = policy();
        let rl = |s| Error::RateLimited {
            retry_after: Duration::from_secs(s),
        };
        assert_eq!(
            p.decide(&Method::POST, &rl(2), 0, 0.9),
            RetryDecision::AfterRateLimit(Duration::from_secs(2))
        );
        assert_eq!(
            p.decide(&Method::GET, &rl(3600), 0, 0.9),
            RetryDecision::AfterRateLimit(Duration::from_secs(60))
        );
    }

    #[test]
    fn client_errors_are_not_retried() {
        let p = policy();
        for e in [
            Error::NotFound { what: "x".into() },
            Error::Conflict { message: "x".into() },
            Error::BadRequest { message: "x".into() },
            Error::Forbidden { message: "x".into() },
            Error::Unauthorized { message: "x".into() },
            Error::Invalid {
                message: "x".into(),
                fields: vec![],
            },
            Error::Unexpected {
                status: 418,
                message: "x".into(),
            },
        ] {
            assert_eq!(p.decide(&Method::GET, &e, 0, 0.0), RetryDecision::GiveUp, "{e}");
        }
    }

    #[test]
    fn retries_are_bounded() {
        let p = RetryPolicy {
            max_retries: 2,
            ..policy()
        };
        assert!(matches!(
            p.decide(&Method::GET, &server(500), 1, 0.0),
            RetryDecision::Backoff(_)
        ));
        assert_eq!(p.decide(&Method::GET, &server(500), 2, 0.0), RetryDecision::GiveUp);
        let none = RetryPolicy {
            max_retries: 0,
            ..policy()
        };
        let rl = Error::RateLimited {
            retry_after: Duration::from_secs(1),
        };
        assert_eq!(none.decide(&Method::GET, &rl, 0, 0.0), RetryDecision::GiveUp);
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let p = RetryPolicy {
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            ..policy()
        };
        assert_eq!(p.backoff(0, 0.0), Duration::from_millis(50));
        assert_eq!(p.backoff(0, 1.0), Duration::from_millis(100));
        assert_eq!(p.backoff(1, 0.0), Duration::from_millis(100));
        assert_eq!(p.backoff(2, 0.5), Duration::from_millis(300));
        assert_eq!(p.backoff(10, 1.0), Duration::from_millis(1000));
        assert_eq!(p.backoff(u32::MAX, 0.0), Duration::from_millis(500));
        // Out-of-range jitter is clamped, not trusted.
        assert_eq!(p.backoff(0, 7.0), Duration::from_millis(100));
        assert_eq!(p.backoff(0, f64::NAN), Duration::from_millis(50));
    }
}

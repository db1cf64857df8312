//! The platform client's error type.
//!
//! Every message is meant to be read by an operator in a log line or a Kubernetes Event.
//! None of them carries the login password or the bearer token: the only bodies we quote
//! are error bodies and undecodable answers, and login answers are never quoted.

use std::fmt;
use std::time::Duration;

/// A per-field validation error from a 422 answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FieldError {
    /// The field path as the platform names it, e.g. `rules[0].public_port`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Errors of the CloudRaya platform client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// 404: no such object (or an object of another cluster, which the platform hides).
    #[error("not found: {what}")]
    NotFound { what: String },

    /// 409: name taken, public IP attached elsewhere, pool exhausted, or the object is in
    /// a state that forbids the call (e.g. "load balancer is updating": poll, then retry).
    #[error("conflict: {message}")]
    Conflict { message: String },

    /// 422: semantically invalid fields.
    #[error("invalid request: {message}{}", render_fields(fields))]
    Invalid { message: String, fields: Vec<FieldError> },

    /// 429 after the client's own retries ran out.
    #[error("rate limited by the platform API (retry after {}s)", retry_after.as_secs_f64())]
    RateLimited { retry_after: Duration },

    /// 401: wrong credentials on login, or a token refused even after one renewal.
    #[error("unauthorized: {message}")]
    Unauthorized { message: String },

    /// 403: the token is valid but the account may not do this.
    #[error("forbidden: {message}")]
    Forbidden { message: String },

    /// 400: the platform could not parse the request (a client bug or a contract drift).
    #[error("bad request: {message}")]
    BadRequest { message: String },

    /// 5xx: a platform fault.
    #[error("platform error (HTTP {status}): {message}")]
    Server { status: u16, message: String },

    /// A status the contract does not list (3xx, 418, ...).
    #[error("unexpected answer from the platform API (HTTP {status}): {message}")]
    Unexpected { status: u16, message: String },

    /// The request did not complete: DNS, connect, TLS, connection reset, ...
    #[error("could not reach the platform API: {0}")]
    Transport(#[source] reqwest::Error),

    /// No complete answer within the per-call timeout.
    #[error("platform API call {method} {path} timed out after {}s", after.as_secs_f64())]
    Timeout {
        method: &'static str,
        path: String,
        after: Duration,
    },

    /// An answer whose body is not the envelope or payload the contract describes.
    #[error("could not decode the platform API answer (HTTP {status}): {source}; body starts with: {body_excerpt:?}")]
    Decode {
        status: u16,
        body_excerpt: String,
        #[source]
        source: serde_json::Error,
    },

    /// The client's configuration is unusable (e.g. a malformed base URL).
    #[error("invalid platform client configuration: {message}")]
    Config { message: String },
}

fn render_fields(fields: &[FieldError]) -> String {
    if fields.is_empty() {
        return String::new();
    }
    let list: Vec<String> = fields.iter().map(ToString::to_string).collect();
    format!(" ({})", list.join("; "))
}

impl Error {
    /// A short, stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::NotFound { .. } => "not_found",
            Error::Conflict { .. } => "conflict",
            Error::Invalid { .. } => "invalid",
            Error::RateLimited { .. } => "rate_limited",
            Error::Unauthorized { .. } => "unauthorized",
            Error::Forbidden { .. } => "forbidden",
            Error::BadRequest { .. } => "bad_request",
            Error::Server { .. } => "server",
            Error::Unexpected { .. } => "unexpected",
            Error::Transport(_) => "transport",
            Error::Timeout { .. } => "timeout",
            Error::Decode { .. } => "decode",
            Error::Config { .. } => "config",
        }
    }

    /// Whether the failure is transient: the same call may succeed later without anyone
    /// changing anything. Says nothing about whether repeating a POST is safe; the client's
    /// own retry policy (`retry.rs`) also looks at the method.
    ///
    /// A 409 is not counted as transient: some conflicts clear by themselves (an LB that
    /// is `updating`), others never do (a name taken); the caller knows which.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::RateLimited { .. } | Error::Transport(_) | Error::Timeout { .. } => true,
            Error::Server { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// Whether the call may have been carried out although it failed: no answer (transport,
    /// timeout), a platform fault (5xx), an answer we could not read. A 4xx (429 included)
    /// says the platform did nothing.
    pub fn may_have_taken_effect(&self) -> bool {
        !matches!(
            self,
            Error::NotFound { .. }
                | Error::Conflict { .. }
                | Error::Invalid { .. }
                | Error::RateLimited { .. }
                | Error::Unauthorized { .. }
                | Error::Forbidden { .. }
                | Error::BadRequest { .. }
        )
    }

    /// True for a 404; handy for "deleting something already gone is success".
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_lists_fields_in_message() {
        let e = Error::Invalid {
            message: "validation failed".into(),
            fields: vec![
                FieldError {
                    field: "rules[0].public_port".into(),
                    message: "must be between 1 and 65535".into(),
                },
                FieldError {
                    field: "name".into(),
                    message: "too long".into(),
                },
            ],
        };
        assert_eq!(
            e.to_string(),
            "invalid request: validation failed (rules[0].public_port: must be between 1 and 65535; name: too long)"
        );
        assert_eq!(e.metric_label(), "invalid");
        assert!(!e.is_retryable());
    }

    #[test]
    fn only_an_answered_4xx_says_nothing_was_done() {
        let timeout = Error::Timeout {
            method: "POST",
            path: "/x".into(),
            after: Duration::from_secs(1),
        };
        let server = Error::Server {
            status: 502,
            message: String::new(),
        };
        assert!(timeout.may_have_taken_effect() && server.may_have_taken_effect());
        for refused in [
            Error::Conflict {
                message: "name taken".into(),
            },
            Error::RateLimited {
                retry_after: Duration::from_secs(1),
            },
            Error::NotFound { what: "x".into() },
            Error::Forbidden { message: String::new() },
        ] {
            assert!(!refused.may_have_taken_effect(), "{refused}");
        }
    }

    #[test]
    fn retryable_classes() {
        assert!(
            Error::Server {
                status: 503,
                message: String::new()
            }
            .is_retryable()
        );
        assert!(
            Error::RateLimited {
                retry_after: Duration::from_secs(1)
            }
            .is_retryable()
        );
        assert!(
            Error::Timeout {
                method: "GET",
                path: "/x".into(),
                after: Duration::from_secs(1)
            }
            .is_retryable()
        );
        assert!(
            !Error::Conflict {
                message: "load balancer is updating".into()
            }
            .is_retryable()
        );
        assert!(!Error::NotFound { what: "x".into() }.is_retryable());
        assert!(!Error::Unauthorized { message: "x".into() }.is_retryable());
    }
}

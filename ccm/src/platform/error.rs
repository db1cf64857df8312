//! The platform client's error type.
//!
//! Every message is meant to be read by an operator in a log line or a Kubernetes Event.
//! None of them carries the login password or the bearer token: the only bodies we quote
//! are error bodies and undecodable answers, and login answers are never quoted.
//!
//! Every message is bounded: its `Display` is at most [`DISPLAY_CHARS`] characters
//! whatever the platform sent (a long `message`, hundreds of field errors, a serde error
//! quoting a long string), so that it fits an Event note and a log line. The full text
//! stays in the variant's fields for code that needs it.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// The most characters an [`Error`]'s `Display` has.
pub const DISPLAY_CHARS: usize = 1000;

/// The most characters of one piece of text from an answer (a message, a serde error) in
/// a `Display`.
const TEXT_CHARS: usize = 400;

/// The most characters of one field error (path and message) in a `Display`.
const FIELD_CHARS: usize = 150;

/// How many field errors a `Display` lists before "and N more".
const FIELDS_SHOWN: usize = 3;

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
    #[error("not found: {}", clip(what))]
    NotFound { what: String },

    /// 409: name taken, public IP attached elsewhere, pool exhausted, or the object is in
    /// a state that forbids the call (e.g. "load balancer is updating": poll, then retry).
    #[error("conflict: {}", clip(message))]
    Conflict { message: String },

    /// 422: semantically invalid fields.
    #[error("invalid request: {}{}", clip(message), render_fields(fields))]
    Invalid { message: String, fields: Vec<FieldError> },

    /// 429 after the client's own retries ran out.
    #[error("rate limited by the platform API (retry after {}s)", retry_after.as_secs_f64())]
    RateLimited { retry_after: Duration },

    /// 401: wrong credentials on login, or a token refused even after one renewal.
    #[error("unauthorized: {}", clip(message))]
    Unauthorized { message: String },

    /// 403: the token is valid but the account may not do this.
    #[error("forbidden: {}", clip(message))]
    Forbidden { message: String },

    /// 400: the platform could not parse the request (a client bug or a contract drift).
    #[error("bad request: {}", clip(message))]
    BadRequest { message: String },

    /// 5xx: a platform fault.
    #[error("platform error (HTTP {status}): {}", clip(message))]
    Server { status: u16, message: String },

    /// A status the contract does not list (3xx, 418, ...).
    #[error("unexpected answer from the platform API (HTTP {status}): {}", clip(message))]
    Unexpected { status: u16, message: String },

    /// The request did not complete: DNS, connect, TLS, connection reset, ...
    #[error("could not reach the platform API: {}", clip(&.0.to_string()))]
    Transport(#[source] reqwest::Error),

    /// No complete answer within the per-call timeout.
    #[error("platform API call {method} {} timed out after {}s", clip(path), after.as_secs_f64())]
    Timeout {
        method: &'static str,
        path: String,
        after: Duration,
    },

    /// An answer whose body is not the envelope or payload the contract describes.
    #[error("could not decode the platform API answer (HTTP {status}): {}; body starts with: {}", clip(&source.to_string()), clip(&format!("{body_excerpt:?}")))]
    Decode {
        status: u16,
        body_excerpt: String,
        #[source]
        source: serde_json::Error,
    },

    /// The client's configuration is unusable (e.g. a malformed base URL).
    #[error("invalid platform client configuration: {}", clip(message))]
    Config { message: String },
}

/// At most `max` characters of `s`, with `…` in place of the rest.
fn clip_to(s: &str, max: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max) {
        Some((cut, _)) => Cow::Owned(format!("{}…", &s[..cut])),
        None => Cow::Borrowed(s),
    }
}

fn clip(s: &str) -> Cow<'_, str> {
    clip_to(s, TEXT_CHARS)
}

/// The first [`FIELDS_SHOWN`] field errors, each clipped, then how many more there are.
fn render_fields(fields: &[FieldError]) -> String {
    if fields.is_empty() {
        return String::new();
    }
    let list: Vec<String> = fields
        .iter()
        .take(FIELDS_SHOWN)
        .map(|f| clip_to(&f.to_string(), FIELD_CHARS).into_owned())
        .collect();
    match fields.len().saturating_sub(FIELDS_SHOWN) {
        0 => format!(" ({})", list.join("; ")),
        more => format!(" ({}; and {more} more)", list.join("; ")),
    }
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
    fn every_message_is_bounded() {
        let long = "é".repeat(5000);
        let field = |i: usize| FieldError {
            field: format!("rules[{i}].{long}"),
            message: long.clone(),
        };
        let decode_source = serde_json::from_str::<u16>(&format!("\"{long}\"")).unwrap_err();
        assert!(
            decode_source.to_string().chars().count() > 5000,
            "serde quotes the string"
        );
        let errors = [
            Error::NotFound { what: long.clone() },
            Error::Conflict { message: long.clone() },
            Error::Invalid {
                message: long.clone(),
                fields: (0..500).map(field).collect(),
            },
            Error::Unauthorized { message: long.clone() },
            Error::Forbidden { message: long.clone() },
            Error::BadRequest { message: long.clone() },
            Error::Server {
                status: 503,
                message: long.clone(),
            },
            Error::Unexpected {
                status: 418,
                message: long.clone(),
            },
            Error::Timeout {
                method: "GET",
                path: long.clone(),
                after: Duration::from_secs(1),
            },
            Error::Decode {
                status: 200,
                body_excerpt: long.clone(),
                source: decode_source,
            },
            Error::Decode {
                status: 200,
                // Control characters are escaped in the quote: six characters each.
                body_excerpt: "\u{7f}".repeat(5000),
                source: serde_json::from_str::<u16>("\"éé\"").unwrap_err(),
            },
            Error::Config { message: long.clone() },
        ];
        for e in errors {
            let shown = e.to_string();
            let n = shown.chars().count();
            assert!(n <= DISPLAY_CHARS, "{} is {n} chars", e.metric_label());
            // Still says something of what was sent.
            assert!(shown.contains("éé"), "{shown}");
        }
    }

    #[test]
    fn invalid_shows_the_first_fields_then_how_many_more() {
        let fields: Vec<FieldError> = (0..7)
            .map(|i| FieldError {
                field: format!("rules[{i}].public_port"),
                message: "must be between 1 and 65535".into(),
            })
            .collect();
        let e = Error::Invalid {
            message: "Unprocessable Entity".into(),
            fields,
        };
        assert_eq!(
            e.to_string(),
            "invalid request: Unprocessable Entity (rules[0].public_port: must be between 1 and 65535; \
             rules[1].public_port: must be between 1 and 65535; rules[2].public_port: must be between 1 and 65535; \
             and 4 more)"
        );
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

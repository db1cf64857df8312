//! Decoding of the platform's answer envelope:
//! `{"code": 200, "message": "OK", "data": {...}, "error": null}`.
//!
//! [`decode_response`] is pure (status, headers, body in; payload or [`Error`] out) so
//! that every odd answer (proxy HTML pages, empty bodies, wrong shapes) can be tested
//! without a server. It never panics.
//!
//! A body is an envelope when it is a JSON text as RFC 8259 defines one, judged on the
//! whole body (unknown keys included): UTF-8 throughout, numbers a double can hold, and
//! an object whose `message`, `data` and `error` have the shapes above. A body with
//! bytes that are not UTF-8 anywhere, even in a key we would skip, is not JSON, so it is
//! not an envelope: like a proxy's HTML page it is quoted, [`EXCERPT_CHARS`] at most.

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::{Error, FieldError};

/// How much of an unexpected body we quote in errors.
pub const EXCERPT_CHARS: usize = 200;

/// `Retry-After` when the header is missing or not a number of seconds.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    data: Value,
    #[serde(default)]
    error: Value,
}

/// The envelope a body holds, if it is one (see the module docs). Parsed as a
/// [`Value`] first, so that what a struct would skip unread (unknown keys and their
/// values) is held to the same rules as the rest.
fn envelope(body: &[u8]) -> Result<Envelope, serde_json::Error> {
    let value: Value = serde_json::from_slice(body)?;
    serde_json::from_value(value)
}

/// Decodes an answer into the envelope's `data` (for 2xx) or the matching [`Error`].
///
/// An empty 2xx body reads as `data: null`, which suits callers that expect nothing
/// (`()` or [`serde::de::IgnoredAny`]) and is a [`Error::Decode`] for the others.
pub fn decode_response<T: DeserializeOwned>(status: u16, headers: &HeaderMap, body: &[u8]) -> Result<T, Error> {
    let is_blank = body.iter().all(u8::is_ascii_whitespace);
    if (200..300).contains(&status) {
        let data = if is_blank {
            Value::Null
        } else {
            envelope(body)
                .map_err(|source| Error::Decode {
                    status,
                    body_excerpt: excerpt(body),
                    source,
                })?
                .data
        };
        return serde_json::from_value(data).map_err(|source| Error::Decode {
            status,
            body_excerpt: excerpt(body),
            source,
        });
    }

    let envelope = if is_blank { None } else { envelope(body).ok() };
    let (message, fields) = match envelope {
        Some(env) => error_details(env),
        None if is_blank => (format!("empty body (HTTP {status})"), Vec::new()),
        // Not our envelope: typically an HTML page from a proxy or load balancer.
        None => (format!("non-JSON body: {}", excerpt(body)), Vec::new()),
    };
    Err(match status {
        400 => Error::BadRequest { message },
        401 => Error::Unauthorized { message },
        403 => Error::Forbidden { message },
        404 => Error::NotFound { what: message },
        409 => Error::Conflict { message },
        422 => Error::Invalid { message, fields },
        429 => Error::RateLimited {
            retry_after: parse_retry_after(headers),
        },
        500..=599 => Error::Server { status, message },
        _ => Error::Unexpected { status, message },
    })
}

/// Message and field errors of an error envelope. `error` is a string, except on 422
/// where it is a list of `{field, message}`; we accept either shape on any status.
fn error_details(env: Envelope) -> (String, Vec<FieldError>) {
    let fallback = env
        .message
        .filter(|m| !m.trim().is_empty())
        .unwrap_or_else(|| "no error message".to_owned());
    match env.error {
        Value::String(s) if !s.trim().is_empty() => (s, Vec::new()),
        Value::Array(items) => {
            let fields: Vec<FieldError> = items
                .into_iter()
                .map(|item| match serde_json::from_value::<FieldError>(item.clone()) {
                    Ok(f) => f,
                    // Keep whatever the platform said rather than dropping it.
                    Err(_) => FieldError {
                        field: String::new(),
                        message: compact(&item),
                    },
                })
                .collect();
            (fallback, fields)
        }
        Value::Null | Value::String(_) => (fallback, Vec::new()),
        other => (compact(&other), Vec::new()),
    }
}

fn compact(v: &Value) -> String {
    let s = v.to_string();
    truncate_chars(&s, EXCERPT_CHARS)
}

/// `Retry-After` in whole (or fractional) seconds; [`DEFAULT_RETRY_AFTER`] when missing
/// or garbled. HTTP-date values are not used by the contract and read as garbled.
pub fn parse_retry_after(headers: &HeaderMap) -> Duration {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        // Far-future values are capped by the retry policy; this only keeps the
        // conversion itself in range.
        .map(|s| Duration::from_secs_f64(s.min(86_400.0)))
        .unwrap_or(DEFAULT_RETRY_AFTER)
}

/// The start of a body as text, whitespace collapsed, for error messages.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(EXCERPT_CHARS * 4)]);
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    truncate_chars(&collapsed, EXCERPT_CHARS)
}

fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::types::{Instance, LoadBalancer, Page};
    use reqwest::header::HeaderValue;
    use serde::de::IgnoredAny;

    fn no_headers() -> HeaderMap {
        HeaderMap::new()
    }

    fn err<T: DeserializeOwned + std::fmt::Debug>(status: u16, body: &str) -> Error {
        match decode_response::<T>(status, &no_headers(), body.as_bytes()) {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn success_envelope() {
        let body = br#"{"code":200,"message":"OK","data":{"id":"cl-1","name":"a","region":"jkt","vpc_id":"vpc-1","subnet_id":"s-1"},"error":null}"#;
        let c: crate::platform::types::Cluster = decode_response(200, &no_headers(), body).expect("decodes");
        assert_eq!(c.id, "cl-1");
    }

    #[test]
    fn list_envelope() {
        let body = br#"{"code":200,"message":"OK","data":{"items":[],"page":1,"per_page":50,"total":0},"error":null,"extra":1}"#;
        let p: Page<Instance> = decode_response(200, &no_headers(), body).expect("decodes");
        assert_eq!(p.total, 0);
    }

    #[test]
    fn accepted_delete_with_any_or_no_data() {
        let h = no_headers();
        let _: IgnoredAny = decode_response(
            202,
            &h,
            br#"{"code":202,"message":"Accepted","data":null,"error":null}"#,
        )
        .expect("null");
        let _: IgnoredAny =
            decode_response(202, &h, br#"{"code":202,"data":{"id":"lb-1","status":"deleting"}}"#).expect("object");
        let _: IgnoredAny = decode_response(202, &h, b"").expect("empty body");
        let _: IgnoredAny = decode_response(200, &h, b"  \n").expect("blank body");
    }

    #[test]
    fn empty_body_where_data_is_needed_is_decode() {
        let e = err::<LoadBalancer>(200, "");
        assert!(matches!(e, Error::Decode { status: 200, .. }), "{e:?}");
    }

    #[test]
    fn wrong_data_shape_is_decode_with_excerpt() {
        let e = err::<LoadBalancer>(200, r#"{"code":200,"data":{"id":5},"error":null}"#);
        match e {
            Error::Decode {
                status, body_excerpt, ..
            } => {
                assert_eq!(status, 200);
                assert!(body_excerpt.contains(r#""id":5"#), "{body_excerpt}");
            }
            other => panic!("{other:?}"),
        }
        let e = err::<Page<Instance>>(200, r#"{"code":200,"data":[1,2,3]}"#);
        assert!(matches!(e, Error::Decode { .. }));
    }

    #[test]
    fn non_json_success_is_decode() {
        let e = err::<LoadBalancer>(200, "<html>hello</html>");
        assert!(matches!(e, Error::Decode { .. }));
        let e = err::<LoadBalancer>(201, r#"{"code":201,"data":"#);
        assert!(matches!(e, Error::Decode { status: 201, .. }));
    }

    #[test]
    fn string_errors_map_to_variants() {
        let body = |msg: &str, code: u16| format!(r#"{{"code":{code},"message":"x","data":null,"error":"{msg}"}}"#);
        assert!(
            matches!(err::<IgnoredAny>(400, &body("bad json", 400)), Error::BadRequest { message } if message == "bad json")
        );
        assert!(
            matches!(err::<IgnoredAny>(401, &body("token expired", 401)), Error::Unauthorized { message } if message == "token expired")
        );
        assert!(
            matches!(err::<IgnoredAny>(403, &body("nope", 403)), Error::Forbidden { message } if message == "nope")
        );
        assert!(
            matches!(err::<IgnoredAny>(404, &body("no such load balancer", 404)), Error::NotFound { what } if what == "no such load balancer")
        );
        assert!(
            matches!(err::<IgnoredAny>(409, &body("load balancer is updating", 409)), Error::Conflict { message } if message == "load balancer is updating")
        );
        assert!(
            matches!(err::<IgnoredAny>(503, &body("maintenance", 503)), Error::Server { status: 503, message } if message == "maintenance")
        );
        assert!(matches!(
            err::<IgnoredAny>(418, &body("teapot", 418)),
            Error::Unexpected { status: 418, .. }
        ));
    }

    #[test]
    fn unprocessable_with_field_list() {
        let e = err::<IgnoredAny>(
            422,
            r#"{"code":422,"message":"Unprocessable Entity","data":null,"error":[{"field":"rules[0].public_port","message":"must be between 1 and 65535"},{"bogus":true}]}"#,
        );
        match e {
            Error::Invalid { message, fields } => {
                assert_eq!(message, "Unprocessable Entity");
                assert_eq!(fields.len(), 2);
                assert_eq!(fields[0].field, "rules[0].public_port");
                assert_eq!(fields[0].message, "must be between 1 and 65535");
                assert!(fields[1].message.contains("bogus"));
            }
            other => panic!("{other:?}"),
        }
    }

    /// What `fuzz/corpus/platform_response/crash-21ebe7…` (a long run's finding) sends:
    /// a 422 with many field errors and bytes that are not UTF-8 where we skip unread.
    fn many_fields_body(extra_key: &[u8], n: usize) -> Vec<u8> {
        let mut body = br#"{"code":422,"message":"invalid","#.to_vec();
        body.push(b'"');
        body.extend_from_slice(extra_key);
        body.extend_from_slice(br#"":"x","error":["#);
        let fields: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"field":"rules[{i}].public_port","message":"must be between 1 and 65535"}}"#))
            .collect();
        body.extend_from_slice(fields.join(",").as_bytes());
        body.extend_from_slice(b"]}");
        body
    }

    #[test]
    fn a_body_with_bytes_that_are_not_utf8_is_not_an_envelope() {
        let body = many_fields_body(b"messa\xdd\xddge", 40);
        match decode_response::<IgnoredAny>(422, &no_headers(), &body).expect_err("422") {
            Error::Invalid { message, fields } => {
                assert!(message.starts_with("non-JSON body: {"), "{message}");
                assert!(message.chars().count() <= EXCERPT_CHARS + 20, "{message}");
                assert!(fields.is_empty(), "{fields:?}");
            }
            other => panic!("{other:?}"),
        }
        // The same whatever the status, 2xx included.
        let e = decode_response::<IgnoredAny>(200, &no_headers(), &body).expect_err("200");
        assert!(matches!(e, Error::Decode { status: 200, .. }), "{e:?}");
        // The same bytes inside a value.
        let body = b"{\"code\":500,\"message\":\"x\",\"data\":{\"k\":\"v\xff\"},\"error\":\"boom\"}";
        let e = decode_response::<IgnoredAny>(500, &no_headers(), body).expect_err("500");
        assert!(
            matches!(&e, Error::Server { message, .. } if message.starts_with("non-JSON body")),
            "{e:?}"
        );
        // A number no double holds is not JSON we can read either, wherever it is.
        let body = br#"{"code":409,"big":1e999,"error":"name taken"}"#;
        let e = decode_response::<IgnoredAny>(409, &no_headers(), body).expect_err("409");
        assert!(
            matches!(&e, Error::Conflict { message } if message.starts_with("non-JSON body")),
            "{e:?}"
        );
    }

    #[test]
    fn many_field_errors_are_kept_and_shown_bounded() {
        let body = many_fields_body(b"request_id", 500);
        let e = decode_response::<IgnoredAny>(422, &no_headers(), &body).expect_err("422");
        let Error::Invalid { fields, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(fields.len(), 500);
        let shown = e.to_string();
        assert!(
            shown.chars().count() <= crate::platform::error::DISPLAY_CHARS,
            "{shown}"
        );
        assert!(shown.starts_with("invalid request: invalid (rules[0].public_port: must be between 1 and 65535;"));
        assert!(shown.ends_with("; and 497 more)"), "{shown}");
    }

    #[test]
    fn unprocessable_with_a_string() {
        let e = err::<IgnoredAny>(
            422,
            r#"{"code":422,"message":"x","data":null,"error":"udp is not supported"}"#,
        );
        assert!(
            matches!(e, Error::Invalid { message, fields } if message == "udp is not supported" && fields.is_empty())
        );
    }

    #[test]
    fn error_without_error_field_uses_message() {
        let e = err::<IgnoredAny>(409, r#"{"code":409,"message":"name taken","data":null}"#);
        assert!(matches!(e, Error::Conflict { message } if message == "name taken"));
        let e = err::<IgnoredAny>(409, r#"{"code":409,"error":{"weird":1}}"#);
        assert!(matches!(e, Error::Conflict { message } if message.contains("weird")));
        let e = err::<IgnoredAny>(409, r#"{}"#);
        assert!(matches!(e, Error::Conflict { message } if message == "no error message"));
    }

    #[test]
    fn html_502_from_a_proxy() {
        let html = "<html>\n<head><title>502 Bad Gateway</title></head>\n<body>\n<center><h1>502 Bad Gateway</h1></center>\n<hr><center>nginx</center>\n</body>\n</html>\n";
        match err::<LoadBalancer>(502, html) {
            Error::Server { status, message } => {
                assert_eq!(status, 502);
                assert!(message.contains("502 Bad Gateway"), "{message}");
                assert!(!message.contains('\n'));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn empty_error_bodies() {
        assert!(
            matches!(err::<IgnoredAny>(504, ""), Error::Server { status: 504, message } if message.contains("empty body"))
        );
        assert!(matches!(err::<IgnoredAny>(401, ""), Error::Unauthorized { .. }));
    }

    #[test]
    fn rate_limited_reads_retry_after() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        let e = decode_response::<IgnoredAny>(429, &h, br#"{"code":429,"error":"slow down"}"#).expect_err("429");
        assert!(matches!(e, Error::RateLimited { retry_after } if retry_after == Duration::from_secs(3)));
        // Missing or garbled: the default.
        let e = decode_response::<IgnoredAny>(429, &no_headers(), b"").expect_err("429");
        assert!(matches!(e, Error::RateLimited { retry_after } if retry_after == DEFAULT_RETRY_AFTER));
    }

    #[test]
    fn retry_after_parsing() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, HeaderValue::from_static(v));
            parse_retry_after(&h)
        };
        assert_eq!(with("0"), Duration::ZERO);
        assert_eq!(with(" 2 "), Duration::from_secs(2));
        assert_eq!(with("1.5"), Duration::from_millis(1500));
        assert_eq!(with("-1"), DEFAULT_RETRY_AFTER);
        assert_eq!(with("NaN"), DEFAULT_RETRY_AFTER);
        assert_eq!(with("Wed, 21 Oct 2015 07:28:00 GMT"), DEFAULT_RETRY_AFTER);
        assert_eq!(with("1e300"), Duration::from_secs(86_400));
    }

    #[test]
    fn excerpt_is_bounded_and_utf8_safe() {
        let long = "é".repeat(1000);
        let e = excerpt(long.as_bytes());
        assert_eq!(e.chars().count(), EXCERPT_CHARS + 1);
        // Invalid UTF-8 and a cut in the middle of a multi-byte char do not panic.
        let mut bytes = vec![0xff, 0xfe];
        bytes.extend_from_slice(long.as_bytes());
        let _ = excerpt(&bytes[..801]);
        let _ = decode_response::<IgnoredAny>(500, &no_headers(), &bytes);
        let _ = decode_response::<LoadBalancer>(200, &no_headers(), &bytes);
    }
}

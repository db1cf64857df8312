//! The CCM's decoding of platform API answers (`platform::envelope::decode_response`)
//! into each payload type the client asks for, what the retry policy makes of the
//! error, and the login answer's `expires_at` (`platform::time`, `platform::auth`).
//!
//! Input: byte 0 picks the payload type; bytes 1–2 the HTTP status (high bit set: one of
//! the statuses the contract lists); then a `Retry-After` value (also read as an
//! `expires_at` timestamp) up to the first newline; the rest is the body.
//!
//! Checked: no panic; 2xx never decodes to an error other than `Decode`, other statuses
//! never decode to a value; a 429 waits at most a day; the retry policy gives up within
//! its retry budget with bounded waits; every error message is at most `DISPLAY_CHARS`
//! long (however many field errors a 422 lists); a body that is not JSON (judged here on
//! its own, with `serde_json::Value`: bytes that are not UTF-8 anywhere make it not JSON,
//! and the decoder decides the same) is quoted, at most `EXCERPT_CHARS` of it; a parsed
//! timestamp formats and parses back to the same millisecond; a decoded object (the IPv6
//! extension's fields included: `version`, `ip_versions`, `public_ipv6`, `private_ipv6`,
//! `ipv6_cidr`, absent ones read as IPv4 only) encodes and decodes back to itself.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Method;
use http::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use kuberaya_ccm::platform::envelope::{EXCERPT_CHARS, decode_response};
use kuberaya_ccm::platform::error::DISPLAY_CHARS;
use kuberaya_ccm::platform::retry::{RetryDecision, RetryPolicy};
use kuberaya_ccm::platform::{Cluster, Error, Instance, LoadBalancer, Page, PublicIp, Subnet, Vpc, auth, time};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::{DeserializeOwned, IgnoredAny};

const STATUSES: &[u16] = &[
    200, 201, 202, 204, 301, 400, 401, 403, 404, 409, 418, 422, 429, 500, 502, 503, 504,
];

/// [`check`], and a decoded value survives encoding and decoding again unchanged (what
/// the client writes back, e.g. `LoadBalancer::to_update`, is what it read).
fn check_round_trip<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
) {
    let Some(value) = check::<T>(status, headers, body) else { return };
    let encoded = serde_json::to_value(&value).expect("a decoded value encodes");
    let back: T = serde_json::from_value(encoded.clone()).unwrap_or_else(|e| panic!("{encoded} does not decode: {e}"));
    assert_eq!(back, value, "round trip through {encoded}");
}

/// Decodes `body` as the client does; the value, when it decoded to one.
fn check<T: DeserializeOwned>(status: u16, headers: &HeaderMap, body: &[u8]) -> Option<T> {
    let result = decode_response::<T>(status, headers, body);
    let ok_status = (200..300).contains(&status);
    let error = match result {
        Ok(value) => {
            assert!(ok_status, "HTTP {status} decoded to a value");
            return Some(value);
        }
        Err(e) => e,
    };
    let message = error.to_string();
    assert!(
        message.chars().count() <= DISPLAY_CHARS,
        "{} chars: {message}",
        message.chars().count()
    );
    match &error {
        Error::Decode { body_excerpt, .. } => {
            assert!(
                body_excerpt.chars().count() <= EXCERPT_CHARS + 1,
                "excerpt of {} chars",
                body_excerpt.len()
            );
        }
        _ if ok_status => panic!("HTTP {status} decoded to {error:?}"),
        Error::RateLimited { retry_after } => {
            assert_eq!(status, 429);
            assert!(*retry_after <= Duration::from_secs(86_400), "{retry_after:?}");
        }
        _ => {}
    }
    // A body that is not our envelope is quoted, and only its start.
    if !ok_status && serde_json::from_slice::<serde_json::Value>(body).is_err() {
        assert!(
            message.chars().count() <= EXCERPT_CHARS + 200,
            "{} chars: {message}",
            message.chars().count()
        );
    }
    let policy = RetryPolicy::default();
    for method in [Method::GET, Method::POST, Method::PUT, Method::DELETE] {
        let mut retries = 0;
        loop {
            match policy.decide(&method, &error, retries, 0.999) {
                RetryDecision::GiveUp => break,
                RetryDecision::AfterRateLimit(w) => assert!(w <= policy.max_retry_after),
                RetryDecision::Backoff(w) => {
                    assert!(method != Method::POST, "a POST retried after {error:?}");
                    assert!(w <= policy.max_backoff);
                }
            }
            retries += 1;
            assert!(
                retries <= policy.max_retries,
                "more than {} retries",
                policy.max_retries
            );
        }
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let [kind, s1, s2, rest @ ..] = data else { return };
    let status = if s1 & 0x80 != 0 {
        STATUSES[usize::from(*s2) % STATUSES.len()]
    } else {
        u16::from_be_bytes([*s1, *s2]) % 1000
    };
    let (header, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&[][..], rest),
    };
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(header) {
        headers.insert(RETRY_AFTER, v);
    }
    match kind % 11 {
        0 => check_round_trip::<LoadBalancer>(status, &headers, body),
        1 => check_round_trip::<Page<LoadBalancer>>(status, &headers, body),
        2 => check_round_trip::<PublicIp>(status, &headers, body),
        3 => check_round_trip::<Page<PublicIp>>(status, &headers, body),
        4 => check_round_trip::<Instance>(status, &headers, body),
        5 => check_round_trip::<Page<Instance>>(status, &headers, body),
        6 => check_round_trip::<Cluster>(status, &headers, body),
        7 => check_round_trip::<Vpc>(status, &headers, body),
        8 => check_round_trip::<Subnet>(status, &headers, body),
        9 => drop(check::<IgnoredAny>(status, &headers, body)),
        _ => drop(check::<()>(status, &headers, body)),
    }

    // The login answer's `expires_at`.
    let Ok(text) = std::str::from_utf8(header) else { return };
    let Some(t) = time::parse_rfc3339(text) else { return };
    let formatted = time::format_rfc3339(t);
    let millis = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_millis();
    // Formatting is for years 1970–9999 (RFC 3339's four digits).
    if formatted.as_bytes()[4] == b'-' {
        let back =
            time::parse_rfc3339(&formatted).unwrap_or_else(|| panic!("{formatted:?} (from {text:?}) does not parse"));
        assert_eq!(millis(back), millis(t), "{text:?} -> {formatted:?}");
    }
    let obtained = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
    let renew = auth::renew_at(obtained, t, Duration::from_secs(300));
    assert!(
        renew >= obtained && renew <= t.max(obtained),
        "renew at {renew:?} for {t:?}"
    );
});

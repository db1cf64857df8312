//! RFC 3339 timestamps (the platform's format) to and from `SystemTime`.
//!
//! The calendar is jiff's (the date crate k8s-openapi already builds); what is ours is
//! the shape check, because jiff's parser takes all of Temporal's ISO 8601 (basic format,
//! `+0700`, `[zone]` annotations) and the platform's format is narrower. Timestamps in
//! the API types stay strings.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jiff::Timestamp;

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`. `None` when malformed or before
/// 1970.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if !is_rfc3339_shaped(s.as_bytes()) {
        return None;
    }
    let ts: Timestamp = at_most_nanoseconds(s).parse().ok()?;
    let secs = u64::try_from(ts.as_second()).ok()?;
    let nanos = u32::try_from(ts.subsec_nanosecond()).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// `s` with its fraction cut to nanoseconds: RFC 3339 allows any number of digits, jiff
/// reads at most nine.
fn at_most_nanoseconds(s: &str) -> Cow<'_, str> {
    const START: usize = 20;
    let digits = s
        .get(START..)
        .filter(|_| s.as_bytes().get(START - 1) == Some(&b'.'))
        .map_or(0, |f| f.bytes().take_while(u8::is_ascii_digit).count());
    if digits <= 9 {
        return Cow::Borrowed(s);
    }
    Cow::Owned(format!("{}{}", &s[..START + 9], &s[START + digits..]))
}

/// Whether `b` has RFC 3339's shape: `YYYY-MM-DD`, `T` (or `t` or a space), `HH:MM:SS`, an
/// optional fraction of at least one digit, then `Z` (or `z`) or `±HH:MM` (at most
/// 23:59), and nothing more. The date's and time's values are jiff's to check.
fn is_rfc3339_shaped(b: &[u8]) -> bool {
    let digits = |from: usize, len: usize| {
        b.get(from..from + len)
            .is_some_and(|p| p.iter().all(u8::is_ascii_digit))
    };
    let one_of = |i: usize, set: &[u8]| b.get(i).is_some_and(|c| set.contains(c));
    let date_time = digits(0, 4)
        && one_of(4, b"-")
        && digits(5, 2)
        && one_of(7, b"-")
        && digits(8, 2)
        && one_of(10, b"Tt ")
        && digits(11, 2)
        && one_of(13, b":")
        && digits(14, 2)
        && one_of(16, b":")
        && digits(17, 2);
    if !date_time {
        return false;
    }
    let mut rest = &b[19..];
    if let Some(fraction) = rest.strip_prefix(b".") {
        let n = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return false;
        }
        rest = &fraction[n..];
    }
    match rest {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => {
            [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()) && [*h1, *h2] <= *b"23" && *m1 <= b'5'
        }
        _ => false,
    }
}

/// Formats as `YYYY-MM-DDTHH:MM:SS[.mmm]Z` (milliseconds only when non-zero).
/// Times before 1970 are clamped to the epoch, times after 9999 to its end.
pub fn format_rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let millis = d.subsec_millis();
    let ts = i64::try_from(d.as_secs())
        .ok()
        .and_then(|secs| Timestamp::new(secs, i32::try_from(millis * 1_000_000).ok()?).ok())
        .unwrap_or(Timestamp::MAX);
    if millis == 0 {
        ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
    } else {
        ts.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: &str) -> Option<u64> {
        parse_rfc3339(s).map(|t| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
    }

    #[test]
    fn parses_the_docs_example() {
        // 2026-11-25T18:00:00Z, checked with `date -u -d ... +%s`.
        assert_eq!(secs("2026-11-25T18:00:00Z"), Some(1_795_629_600));
        assert_eq!(secs("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(secs("2000-02-29T12:00:00Z"), Some(951_825_600));
    }

    #[test]
    fn offsets_and_fractions() {
        assert_eq!(secs("2026-11-26T01:00:00+07:00"), secs("2026-11-25T18:00:00Z"));
        assert_eq!(secs("2026-11-25T17:30:00-00:30"), secs("2026-11-25T18:00:00Z"));
        let t = parse_rfc3339("1970-01-01T00:00:01.25Z").and_then(|t| t.duration_since(UNIX_EPOCH).ok());
        assert_eq!(t, Some(Duration::from_millis(1250)));
        // RFC 3339's allowances: a lower-case `t` or a space between date and time, `z`.
        assert_eq!(secs("2026-11-25t18:00:00z"), secs("2026-11-25T18:00:00Z"));
        assert_eq!(secs(" 2026-11-25 18:00:00Z "), secs("2026-11-25T18:00:00Z"));
        assert_eq!(secs("1969-12-31T23:59:59Z"), None, "before 1970");
        // More digits than nanoseconds are cut, not refused.
        let t = parse_rfc3339("1970-01-01T00:00:01.1234567891Z").and_then(|t| t.duration_since(UNIX_EPOCH).ok());
        assert_eq!(t, Some(Duration::new(1, 123_456_789)));
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "tomorrow",
            "2026-11-25",
            "2026-11-25T18:00:00",
            "2026-13-25T18:00:00Z",
            "2026-02-30T18:00:00Z",
            "2026-11-25T18:00:00Zjunk",
            "2026-11-25T18:00:00.Z",
            "2026-11-25T18:00:00+0700",
            "2026-11-25T18:00:00+24:00",
            "2026-11-25T18:00:00+07:60",
            "２026-11-25T18:00:00Z",
            // ISO 8601 and Temporal forms that are not RFC 3339.
            "20261125T180000Z",
            "2026-11-25T18:00:00Z[UTC]",
            "2026-11-25T18:00Z",
        ] {
            assert_eq!(parse_rfc3339(s), None, "{s:?}");
        }
    }

    #[test]
    fn format_round_trips() {
        for s in [
            "2026-11-25T18:00:00Z",
            "1999-12-31T23:59:59Z",
            "2024-02-29T00:00:00.500Z",
        ] {
            let t = parse_rfc3339(s).expect("valid");
            assert_eq!(format_rfc3339(t), s);
        }
    }
}

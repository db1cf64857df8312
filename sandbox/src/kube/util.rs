//! Small pure helpers: timestamps, uids, JSON written in the real server's key order,
//! name validation, JSON paths.

use serde_json::Value;
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the epoch.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// RFC 3339 in UTC with second precision (`metav1.Time`). Instants past jiff's range
/// (years -9999 to 9999) are shown as its first or last second.
pub fn rfc3339(secs: i64) -> String {
    let t = jiff::Timestamp::from_second(secs).unwrap_or(if secs < 0 {
        jiff::Timestamp::MIN
    } else {
        jiff::Timestamp::MAX
    });
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub fn now_rfc3339() -> String {
    rfc3339(now_secs())
}

/// Parses an RFC 3339 timestamp (`YYYY-MM-DDTHH:MM:SS[.frac]Z` as the API writes them)
/// to whole seconds since the epoch, the fraction dropped (rounded down).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let t: jiff::Timestamp = s.parse().ok()?;
    let secs = t.as_second();
    Some(if t.subsec_nanosecond() < 0 { secs - 1 } else { secs })
}

/// kubectl's `HumanDuration` (as in the AGE column).
pub fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    if s < 120 {
        return format!("{s}s");
    }
    let m = s / 60;
    if m < 10 {
        let rs = s % 60;
        return if rs == 0 { format!("{m}m") } else { format!("{m}m{rs}s") };
    }
    if m < 180 {
        return format!("{m}m");
    }
    let h = s / 3600;
    if h < 8 {
        let rm = m % 60;
        return if rm == 0 { format!("{h}h") } else { format!("{h}h{rm}m") };
    }
    if h < 48 {
        return format!("{h}h");
    }
    let d = h / 24;
    if h < 24 * 8 {
        let rh = h % 24;
        return if rh == 0 { format!("{d}d") } else { format!("{d}d{rh}h") };
    }
    if h < 24 * 365 * 2 {
        return format!("{d}d");
    }
    let y = d / 365;
    if y < 8 {
        let rd = d % 365;
        return if rd == 0 { format!("{y}y") } else { format!("{y}y{rd}d") };
    }
    format!("{y}y")
}

/// A random RFC 4122 version 4 UUID.
pub fn new_uid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `generateName` suffix: five characters from the real server's alphabet.
pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random::<u32>() as usize % ALPHABET.len()] as char)
        .collect()
}

/// A random bearer token.
pub fn random_token() -> String {
    let b: [u8; 24] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Serializes with `kind`, `apiVersion` and `metadata` first in every object, as the real
/// server writes its typed objects; other keys follow in sorted order.
pub fn to_json_bytes(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_value(&mut out, v);
    out
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Object(map) => {
            out.push(b'{');
            let mut first = true;
            let head = ["kind", "apiVersion", "metadata"];
            for k in head {
                if let Some(x) = map.get(k) {
                    write_entry(out, &mut first, k, x);
                }
            }
            for (k, x) in map {
                if !head.contains(&k.as_str()) {
                    write_entry(out, &mut first, k, x);
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, x);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

fn write_entry(out: &mut Vec<u8>, first: &mut bool, k: &str, v: &Value) {
    if !*first {
        out.push(b',');
    }
    *first = false;
    out.extend_from_slice(Value::String(k.to_string()).to_string().as_bytes());
    out.push(b':');
    write_value(out, v);
}

/// DNS-1123 label: lowercase alphanumerics and '-', at most 63, starting and ending
/// alphanumeric. Returns the real server's messages.
pub fn dns1123_label_errors(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if s.len() > 63 {
        errs.push("must be no more than 63 characters".to_string());
    }
    let ok = !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if !ok {
        errs.push("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')".to_string());
    }
    errs
}

/// DNS-1123 subdomain: labels separated by dots, at most 253.
pub fn dns1123_subdomain_errors(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if s.len() > 253 {
        errs.push("must be no more than 253 characters".to_string());
    }
    let ok = !s.is_empty()
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !ok {
        errs.push("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')".to_string());
    }
    errs
}

/// Label keys (`[prefix/]name`) and values, as `metadata.labels` validation checks them.
pub fn label_key_ok(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix
        && !dns1123_subdomain_errors(p).is_empty()
    {
        return false;
    }
    qualified_name_ok(name)
}

fn qualified_name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
        && n.as_bytes()[0].is_ascii_alphanumeric()
        && n.as_bytes()[n.len() - 1].is_ascii_alphanumeric()
}

pub fn label_value_ok(v: &str) -> bool {
    v.is_empty() || qualified_name_ok(v)
}

/// Follows a dotted path (`spec.ports`) through objects.
pub fn get_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = v;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        cur = cur.get(part)?;
    }
    Some(cur)
}

/// Evaluates the simple JSONPath subset used in printer columns and `scale`
/// subresources: `.a.b`, `.a[0].b`, `.a[*].b`; returns the matched values.
pub fn json_path(v: &Value, path: &str) -> Vec<Value> {
    let p = path
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .trim_start_matches('$');
    let mut cur = vec![v.clone()];
    for seg in split_path(p) {
        let (name, index) = match seg.find('[') {
            Some(i) => (&seg[..i], Some(seg[i + 1..].trim_end_matches(']'))),
            None => (seg.as_str(), None),
        };
        let mut next = Vec::new();
        for c in &cur {
            let Some(x) = (if name.is_empty() { Some(c) } else { c.get(name) }) else {
                continue;
            };
            match index {
                None => next.push(x.clone()),
                Some("*") => {
                    if let Some(a) = x.as_array() {
                        next.extend(a.iter().cloned())
                    }
                }
                Some(f) if f.starts_with("?(") => {
                    if let Some(a) = x.as_array() {
                        next.extend(a.iter().filter(|e| filter_matches(e, f)).cloned())
                    }
                }
                Some(i) => {
                    if let (Some(a), Ok(i)) = (x.as_array(), i.parse::<usize>())
                        && let Some(e) = a.get(i)
                    {
                        next.push(e.clone())
                    }
                }
            }
        }
        cur = next;
    }
    cur
}

/// Splits a JSONPath on dots outside brackets and quotes.
fn split_path(p: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut cur, mut depth, mut quote) = (String::new(), 0i32, None::<char>);
    for ch in p.chars() {
        match (ch, quote) {
            ('"' | '\'', None) => quote = Some(ch),
            (c, Some(q)) if c == q => quote = None,
            ('[', None) => depth += 1,
            (']', None) => depth -= 1,
            ('.', None) if depth == 0 => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `?(@.a.b=="x")` / `!=` filters over an array element.
fn filter_matches(e: &Value, f: &str) -> bool {
    let inner = f.trim_start_matches("?(").trim_end_matches(')');
    let (lhs, rhs, eq) = match (inner.split_once("=="), inner.split_once("!=")) {
        (_, Some((l, r))) => (l, r, false),
        (Some((l, r)), None) => (l, r, true),
        (None, None) => {
            let field = inner.trim().trim_start_matches('@');
            return !json_path(e, field).is_empty();
        }
    };
    let field = lhs.trim().trim_start_matches('@');
    let want = rhs.trim().trim_matches(|c| c == '"' || c == '\'');
    let got = json_path(e, field).first().map(cell_text).unwrap_or_default();
    (got == want) == eq
}

/// Renders a value as kubectl prints a cell.
pub fn cell_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn time_roundtrip() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(parse_rfc3339("2024-02-29T23:59:59Z"), Some(1_709_251_199));
        assert_eq!(parse_rfc3339("2024-02-29T23:59:59.123456Z"), Some(1_709_251_199));
    }

    #[test]
    fn time_edges() {
        // Before the epoch a fraction still rounds down, as the fields read one by one did.
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59.5Z"), Some(-1));
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(parse_rfc3339("not a time"), None);
        assert_eq!(parse_rfc3339(""), None);
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(3600 * 30), "30h");
        assert_eq!(human_duration(86_400 * 3), "3d");
    }

    #[test]
    fn json_order() {
        let v = json!({"a": 1, "metadata": {"name": "x"}, "kind": "K", "apiVersion": "v1"});
        assert_eq!(
            String::from_utf8(to_json_bytes(&v)).unwrap(),
            r#"{"kind":"K","apiVersion":"v1","metadata":{"name":"x"},"a":1}"#
        );
    }

    #[test]
    fn names() {
        assert!(dns1123_label_errors("my-svc").is_empty());
        assert!(!dns1123_label_errors("My_svc").is_empty());
        assert!(!dns1123_label_errors("a.b").is_empty());
        assert!(dns1123_subdomain_errors("a.b-c").is_empty());
        assert!(!dns1123_subdomain_errors("-a").is_empty());
        assert!(label_key_ok("app.kubernetes.io/name"));
        assert!(!label_key_ok("bad key"));
        assert!(label_value_ok(""));
        assert!(!label_value_ok("-x"));
    }

    #[test]
    fn json_paths() {
        let v = json!({"spec": {"ports": [{"port": 80}, {"port": 443}]}});
        assert_eq!(json_path(&v, ".spec.ports[*].port"), vec![json!(80), json!(443)]);
        assert_eq!(json_path(&v, ".spec.ports[1].port"), vec![json!(443)]);
        assert!(json_path(&v, ".spec.nope").is_empty());
        let c = json!({"status": {"conditions": [{"type": "A", "status": "False"}, {"type": "Accepted", "status": "True"}]}});
        assert_eq!(
            json_path(&c, r#".status.conditions[?(@.type=="Accepted")].status"#),
            vec![json!("True")]
        );
        assert_eq!(
            json_path(&c, ".status.conditions[?(@.type!='Accepted')].type"),
            vec![json!("A")]
        );
    }

    #[test]
    fn uid_shape() {
        let u = new_uid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}

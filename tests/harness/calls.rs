//! The platform stand-in's call counts (`GET /_sandbox/calls`: `METHOD /path/template` →
//! count) and what the tests compute from them.

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};

use crate::Answer;

/// Call counts by `METHOD /path/template`.
pub type Calls = BTreeMap<String, u64>;

/// The counts out of an answer of `GET /_sandbox/calls` (its data, or the data's `calls`).
pub fn parse_calls(answer: &Answer) -> Result<Calls> {
    ensure!(answer.status == 200, "GET /_sandbox/calls: {}", answer.describe());
    let data = answer.data();
    let map = data.get("calls").unwrap_or(data);
    Ok(map
        .as_object()
        .context("call counts")?
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
        .collect())
}

/// The sum of the counts of mutating calls (POST, PUT, PATCH, DELETE) on load balancers
/// and public IPs (the `/kubernetes/` and `/network/` paths).
pub fn mutating(calls: &Calls) -> u64 {
    calls
        .iter()
        .filter(|(k, _)| {
            let (method, path) = k.split_once(' ').unwrap_or(("", ""));
            matches!(method, "POST" | "PUT" | "PATCH" | "DELETE")
                && (path.starts_with("/kubernetes/") || path.starts_with("/network/"))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Calls on the platform API's `/kubernetes/` and `/network/` paths (reads included).
pub fn lb_calls(calls: &Calls) -> u64 {
    calls
        .iter()
        .filter(|(k, _)| k.contains(" /kubernetes/") || k.contains(" /network/"))
        .map(|(_, v)| v)
        .sum()
}

/// The calls made between two samples (only those that grew).
pub fn diff(before: &Calls, after: &Calls) -> Calls {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calls(pairs: &[(&str, u64)]) -> Calls {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn diff_keeps_what_grew_and_mutating_counts_only_writes_on_lbs_and_ips() {
        let before = calls(&[("GET /kubernetes/v1/x", 2), ("POST /network/v1/ips", 1)]);
        let after = calls(&[
            ("GET /kubernetes/v1/x", 5),
            ("POST /network/v1/ips", 1),
            ("DELETE /kubernetes/v1/x", 2),
            ("POST /vm/v1/instances", 4),
        ]);
        let d = diff(&before, &after);
        assert_eq!(
            d,
            calls(&[
                ("GET /kubernetes/v1/x", 3),
                ("DELETE /kubernetes/v1/x", 2),
                ("POST /vm/v1/instances", 4)
            ])
        );
        assert_eq!(mutating(&d), 2);
        assert_eq!(lb_calls(&d), 5);
    }
}

//! Counters of the platform client, readable by the app (which exports them; the
//! Prometheus wiring lives with the app's metrics, not here).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// One counted request outcome: method, path template and status.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestKey {
    pub method: &'static str,
    /// The path template, e.g. `/kubernetes/v1/clusters/{cluster_id}/load-balancers/{id}`,
    /// so that IDs do not explode the label set.
    pub path: &'static str,
    /// The HTTP status (`"200"`, `"429"`, ...), or `"timeout"` / `"transport"` when no
    /// answer came.
    pub status: String,
}

/// Counters shared by every call of one client.
#[derive(Debug, Default)]
pub struct PlatformMetrics {
    requests: Mutex<HashMap<RequestKey, u64>>,
    logins: AtomicU64,
    retries: AtomicU64,
    relogins_on_401: AtomicU64,
    rate_limit_waits: AtomicU64,
}

impl PlatformMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one attempt (each HTTP exchange, retries included).
    pub fn record_request(&self, method: &'static str, path: &'static str, status: &str) {
        let key = RequestKey {
            method,
            path,
            status: status.to_owned(),
        };
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(key).or_insert(0) += 1;
    }

    pub(crate) fn inc_logins(&self) {
        self.logins.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn inc_retries(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn inc_relogins_on_401(&self) {
        self.relogins_on_401.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn inc_rate_limit_waits(&self) {
        self.rate_limit_waits.fetch_add(1, Ordering::Relaxed);
    }

    /// Every request counter, sorted.
    pub fn requests(&self) -> Vec<(RequestKey, u64)> {
        let map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map.iter().map(|(k, n)| (k.clone(), *n)).collect();
        v.sort();
        v
    }

    /// One request counter (0 when never seen).
    pub fn request_count(&self, method: &str, path: &str, status: &str) -> u64 {
        let map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|(k, _)| k.method == method && k.path == path && k.status == status)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Logins performed (first login, renewals before expiry and after a 401).
    pub fn logins(&self) -> u64 {
        self.logins.load(Ordering::Relaxed)
    }

    /// Retries of failed attempts (5xx, transport, timeouts, 429s).
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Token renewals forced by a 401.
    pub fn relogins_on_401(&self) -> u64 {
        self.relogins_on_401.load(Ordering::Relaxed)
    }

    /// Calls that had to wait for the client-side rate limiter.
    pub fn rate_limit_waits(&self) -> u64 {
        self.rate_limit_waits.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_key() {
        let m = PlatformMetrics::new();
        m.record_request("GET", "/vm/v1/instances", "200");
        m.record_request("GET", "/vm/v1/instances", "200");
        m.record_request("GET", "/vm/v1/instances", "503");
        assert_eq!(m.request_count("GET", "/vm/v1/instances", "200"), 2);
        assert_eq!(m.request_count("GET", "/vm/v1/instances", "503"), 1);
        assert_eq!(m.request_count("PUT", "/vm/v1/instances", "200"), 0);
        assert_eq!(m.requests().len(), 2);
    }
}

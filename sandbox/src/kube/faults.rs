//! Faults of the API server for reliability tests, under `/_sandbox/` (admin token only):
//! cut every open watch abruptly, compact the history (open watches end with 410 Gone),
//! fail the next N requests; and request counts by verb and resource, which tell whether
//! a client resumed its watch or listed everything again.
//!
//! The end-to-end tests run the real binaries, so these are HTTP endpoints; in-process
//! tests may call [`super::KubeApi::compact_history`] and [`Faults::cut_watches`] directly.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::status::ApiError;

/// One-shot failures: the next `count` requests whose verb is in `verbs` (any verb when
/// empty) are answered with `code` instead of being served.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Failing {
    pub code: u16,
    pub count: u32,
    #[serde(default)]
    pub verbs: Vec<String>,
    /// Sent as `Retry-After` and `details.retryAfterSeconds` (429 and 503 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u32>,
}

impl Failing {
    /// Whether a request with `verb` fails; consumes one failure when it does.
    pub fn take(&mut self, verb: &str) -> bool {
        if self.count == 0 || !(self.verbs.is_empty() || self.verbs.iter().any(|v| v == verb)) {
            return false;
        }
        self.count -= 1;
        true
    }

    fn check(&self) -> Result<(), ApiError> {
        if !(400..=599).contains(&self.code) {
            return Err(ApiError::bad_request(format!(
                "code must be an error status (400-599), not {}",
                self.code
            )));
        }
        Ok(())
    }

    /// The error a failed request gets, worded as the real server words its own.
    pub fn error(&self) -> ApiError {
        let (reason, message) = match self.code {
            429 => ("TooManyRequests", "too many requests, please try again later"),
            500 => ("InternalError", "Internal error occurred: injected fault"),
            503 => (
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
            504 => (
                "Timeout",
                "the server was unable to return a response in the time allotted",
            ),
            _ => ("InternalError", "injected fault"),
        };
        let mut e = ApiError::new(self.code, reason, message);
        if let (429 | 503, Some(s)) = (self.code, self.retry_after_seconds) {
            e.details = Some(json!({ "retryAfterSeconds": s }));
        }
        e
    }
}

#[derive(Default)]
struct State {
    failing: Option<Failing>,
    /// `"<verb> <resource>"` → requests served or failed.
    counts: BTreeMap<String, u64>,
    /// The same by client: the User-Agent's product (`kubectl`, `kube-rs`, ...).
    by_agent: BTreeMap<String, BTreeMap<String, u64>>,
    failed: u64,
    cuts: u64,
}

/// The fault switches and counters of one API server.
pub struct Faults {
    /// Bumped to cut every open watch; each watch holds a receiver, so the receiver count
    /// is the number of open watches.
    cut: tokio::sync::watch::Sender<u64>,
    state: Mutex<State>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            cut: tokio::sync::watch::channel(0).0,
            state: Mutex::new(State::default()),
        }
    }
}

impl Faults {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a new watch listens on to learn it must be cut.
    pub fn watch_cuts(&self) -> tokio::sync::watch::Receiver<u64> {
        self.cut.subscribe()
    }

    /// Watches open now.
    pub fn open_watches(&self) -> usize {
        self.cut.receiver_count()
    }

    /// Ends every open watch without an ERROR event or a clean end of the stream (the
    /// connection breaks, as when a load balancer or the server dies); returns how many.
    pub fn cut_watches(&self) -> usize {
        let open = self.open_watches();
        self.cut.send_modify(|n| *n += 1);
        self.lock().cuts += 1;
        open
    }

    /// Counts a request and decides whether it fails.
    pub fn on_request(&self, verb: &str, resource: &str, user_agent: &str) -> Result<(), ApiError> {
        let key = format!("{verb} {resource}");
        let agent = user_agent.split('/').next().unwrap_or_default().trim();
        let mut s = self.lock();
        *s.by_agent
            .entry(if agent.is_empty() { "-" } else { agent }.to_string())
            .or_default()
            .entry(key.clone())
            .or_default() += 1;
        *s.counts.entry(key).or_default() += 1;
        let fail = s.failing.as_mut().map(|f| (f.take(verb), f.error()));
        match fail {
            Some((true, e)) => {
                s.failed += 1;
                Err(e)
            }
            _ => Ok(()),
        }
    }

    fn report(&self) -> Value {
        let s = self.lock();
        json!({
            "counts": s.counts,
            "byAgent": s.by_agent,
            "openWatches": self.open_watches(),
            "failed": s.failed,
            "cuts": s.cuts,
        })
    }
}

/// Serves `/_sandbox/<rest>`.
pub fn route(api: &super::KubeApi, method: &axum::http::Method, rest: &[&str], body: &[u8]) -> Result<Value, ApiError> {
    use axum::http::Method;
    let f = &api.faults;
    match (method, rest) {
        (&Method::GET, ["requests"]) => Ok(f.report()),
        (&Method::DELETE, ["requests"]) => {
            let mut s = f.lock();
            s.counts.clear();
            s.by_agent.clear();
            s.failed = 0;
            drop(s);
            Ok(f.report())
        }
        (&Method::POST, ["watches", "cut"]) => Ok(json!({ "cut": f.cut_watches() })),
        (&Method::POST, ["history", "compact"]) => {
            let ended = f.open_watches();
            api.compact_history();
            Ok(json!({ "resourceVersion": api.resource_version().to_string(), "endedWatches": ended }))
        }
        (&Method::GET, ["faults"]) => Ok(json!({ "failing": f.lock().failing })),
        (&Method::PUT, ["faults"]) => {
            let failing: Failing =
                serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("faults: {e}")))?;
            failing.check()?;
            f.lock().failing = Some(failing.clone());
            Ok(json!({ "failing": failing }))
        }
        (&Method::DELETE, ["faults"]) => {
            f.lock().failing = None;
            Ok(json!({ "failing": null }))
        }
        (_, ["requests" | "faults"] | ["watches", "cut"] | ["history", "compact"]) => {
            Err(ApiError::method_not_allowed())
        }
        _ => Err(ApiError::not_found_path()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_one_shot_and_filtered_by_verb() {
        let mut f = Failing {
            code: 500,
            count: 2,
            verbs: vec!["watch".into()],
            retry_after_seconds: None,
        };
        assert!(!f.take("list"), "other verbs are served");
        assert!(f.take("watch"));
        assert!(f.take("watch"));
        assert!(!f.take("watch"), "only the next two");
        let mut any = Failing {
            code: 429,
            count: 1,
            ..Failing::default()
        };
        assert!(any.take("create"));
        assert!(!any.take("create"));
    }

    #[test]
    fn counts_and_failures() {
        let faults = Faults::default();
        faults.lock().failing = Some(Failing {
            code: 429,
            count: 1,
            verbs: vec![],
            retry_after_seconds: Some(1),
        });
        let e = faults
            .on_request("list", "services", "kubectl/v1.32.0 (linux/amd64)")
            .unwrap_err();
        assert_eq!((e.code, e.reason), (429, "TooManyRequests"));
        assert_eq!(e.to_status()["details"]["retryAfterSeconds"], 1);
        assert!(faults.on_request("list", "services", "").is_ok());
        let r = faults.report();
        assert_eq!(r["counts"]["list services"], 2);
        assert_eq!(r["byAgent"]["kubectl"]["list services"], 1);
        assert_eq!(r["byAgent"]["-"]["list services"], 1);
        assert_eq!(r["failed"], 1);
    }

    #[test]
    fn cuts_reach_every_open_watch() {
        let faults = Faults::default();
        let a = faults.watch_cuts();
        let b = faults.watch_cuts();
        assert_eq!(faults.open_watches(), 2);
        drop(b);
        assert_eq!(faults.cut_watches(), 1);
        assert!(a.has_changed().unwrap());
    }

    #[test]
    fn only_error_codes() {
        let bad = Failing {
            code: 200,
            count: 1,
            ..Failing::default()
        };
        assert!(bad.check().is_err());
    }
}

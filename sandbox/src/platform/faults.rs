//! Fault injection for the public API (`/_sandbox/faults`): which rules match a call, and
//! what happens to it. Pure: the clock and the random source are passed in.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::error::FieldError;

/// One rule as written to `PUT /_sandbox/faults`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_next: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
    #[serde(default)]
    pub hang: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultRules {
    pub rules: Vec<FaultRule>,
}

pub const DEFAULT_ERROR_STATUS: u16 = 503;
pub const DEFAULT_RETRY_AFTER_S: u64 = 1;

impl FaultRule {
    pub fn matches(&self, method: &str, path: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m.eq_ignore_ascii_case(method))
            && self.path.as_deref().is_none_or(|g| glob_match(g, path))
    }
}

/// Checks a set of rules before it is installed.
pub fn validate(rules: &[FaultRule]) -> Vec<FieldError> {
    let mut errors = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        if let Some(rate) = rule.error_rate
            && !(0.0..=1.0).contains(&rate)
        {
            errors.push(FieldError::new(
                format!("rules[{i}].error_rate"),
                "must be between 0 and 1",
            ));
        }
        if let Some(status) = rule.error_status
            && !(400..=599).contains(&status)
        {
            errors.push(FieldError::new(
                format!("rules[{i}].error_status"),
                "must be an HTTP error status (400 to 599)",
            ));
        }
        if rule.rate_limit_per_s == Some(0) {
            errors.push(FieldError::new(
                format!("rules[{i}].rate_limit_per_s"),
                "must be at least 1",
            ));
        }
    }
    errors
}

/// `*` matches any run of characters, `/` included; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p = pattern.as_bytes();
    let t = text.as_bytes();
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and how much of the text it has swallowed so far.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// What happens to one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Hang,
    Throttle { retry_after_s: u64 },
    Fail { status: u16 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Total latency of the matching rules, applied before the outcome.
    pub delay: Duration,
    pub outcome: Outcome,
}

#[derive(Debug, Clone)]
struct Active {
    rule: FaultRule,
    throttle_left: u64,
    window: Option<(Instant, u32)>,
}

/// The installed rules and their counters.
#[derive(Debug, Default)]
pub struct Faults {
    active: Vec<Active>,
}

impl Faults {
    pub fn set(&mut self, rules: Vec<FaultRule>) {
        self.active = rules
            .into_iter()
            .map(|rule| Active {
                throttle_left: rule.throttle_next.unwrap_or(0),
                rule,
                window: None,
            })
            .collect();
    }

    /// The rules, with `throttle_next` showing what is left of it.
    pub fn rules(&self) -> FaultRules {
        FaultRules {
            rules: self
                .active
                .iter()
                .map(|a| FaultRule {
                    throttle_next: a.rule.throttle_next.map(|_| a.throttle_left),
                    ..a.rule.clone()
                })
                .collect(),
        }
    }

    /// Applies every matching rule in order; the first one that answers the call wins.
    /// `random` yields uniform numbers in [0, 1).
    pub fn decide(&mut self, method: &str, path: &str, now: Instant, random: &mut dyn FnMut() -> f64) -> Decision {
        let mut delay = Duration::ZERO;
        for active in self.active.iter_mut() {
            let rule = &active.rule;
            if !rule.matches(method, path) {
                continue;
            }
            delay += Duration::from_millis(rule.latency_ms.unwrap_or(0));
            let retry_after_s = rule.retry_after_s.unwrap_or(DEFAULT_RETRY_AFTER_S);
            if rule.hang {
                return Decision {
                    delay,
                    outcome: Outcome::Hang,
                };
            }
            if active.throttle_left > 0 {
                active.throttle_left -= 1;
                return Decision {
                    delay,
                    outcome: Outcome::Throttle { retry_after_s },
                };
            }
            if let Some(limit) = rule.rate_limit_per_s {
                let (start, count) = match active.window {
                    Some((start, count)) if now.duration_since(start) < Duration::from_secs(1) => (start, count + 1),
                    _ => (now, 1),
                };
                active.window = Some((start, count));
                if count > limit {
                    return Decision {
                        delay,
                        outcome: Outcome::Throttle { retry_after_s },
                    };
                }
            }
            if let Some(rate) = rule.error_rate
                && rate > 0.0
                && random() < rate
            {
                return Decision {
                    delay,
                    outcome: Outcome::Fail {
                        status: rule.error_status.unwrap_or(DEFAULT_ERROR_STATUS),
                    },
                };
            }
        }
        Decision {
            delay,
            outcome: Outcome::Pass,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> impl FnMut() -> f64 {
        || 0.99
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "/a/b"));
        assert!(glob_match("/kubernetes/*", "/kubernetes/v1/clusters/x"));
        assert!(!glob_match("/kubernetes/*", "/vm/v1/instances"));
        assert!(glob_match("/a/*/c", "/a/b/x/c"));
        assert!(!glob_match("/a/*/c", "/a/b/x/d"));
        assert!(glob_match("*/load-balancers*", "/k/v1/clusters/c/load-balancers/lb-1"));
        assert!(glob_match("/exact", "/exact"));
        assert!(!glob_match("/exact", "/exact/more"));
        assert!(glob_match("a**b", "ab"));
    }

    #[test]
    fn method_and_path_matching() {
        let rule = FaultRule {
            method: Some("PUT".into()),
            path: Some("/kubernetes/*".into()),
            ..Default::default()
        };
        assert!(rule.matches("PUT", "/kubernetes/v1/x"));
        assert!(rule.matches("put", "/kubernetes/v1/x"));
        assert!(!rule.matches("GET", "/kubernetes/v1/x"));
        assert!(!rule.matches("PUT", "/vm/v1/instances"));
        assert!(FaultRule::default().matches("DELETE", "/anything"));
    }

    #[test]
    fn throttle_next_counts_down() {
        let mut f = Faults::default();
        f.set(vec![FaultRule {
            throttle_next: Some(2),
            retry_after_s: Some(3),
            ..Default::default()
        }]);
        let now = Instant::now();
        let throttled = Outcome::Throttle { retry_after_s: 3 };
        assert_eq!(f.decide("GET", "/x", now, &mut never()).outcome, throttled);
        assert_eq!(f.rules().rules[0].throttle_next, Some(1));
        assert_eq!(f.decide("GET", "/x", now, &mut never()).outcome, throttled);
        assert_eq!(f.decide("GET", "/x", now, &mut never()).outcome, Outcome::Pass);
    }

    #[test]
    fn rate_limit_per_second_window() {
        let mut f = Faults::default();
        f.set(vec![FaultRule {
            rate_limit_per_s: Some(2),
            ..Default::default()
        }]);
        let t0 = Instant::now();
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            outcomes.push(f.decide("GET", "/x", t0, &mut never()).outcome);
        }
        assert_eq!(
            outcomes,
            vec![Outcome::Pass, Outcome::Pass, Outcome::Throttle { retry_after_s: 1 }]
        );
        let later = t0 + Duration::from_millis(1001);
        assert_eq!(f.decide("GET", "/x", later, &mut never()).outcome, Outcome::Pass);
    }

    #[test]
    fn error_rate_uses_the_random_source() {
        let mut f = Faults::default();
        f.set(vec![FaultRule {
            error_rate: Some(0.5),
            error_status: Some(500),
            ..Default::default()
        }]);
        let now = Instant::now();
        assert_eq!(
            f.decide("GET", "/x", now, &mut || 0.1).outcome,
            Outcome::Fail { status: 500 }
        );
        assert_eq!(f.decide("GET", "/x", now, &mut || 0.6).outcome, Outcome::Pass);
        f.set(vec![FaultRule {
            error_rate: Some(1.0),
            ..Default::default()
        }]);
        assert_eq!(
            f.decide("GET", "/x", now, &mut || 0.999).outcome,
            Outcome::Fail { status: 503 }
        );
    }

    #[test]
    fn latency_adds_up_and_hang_wins() {
        let mut f = Faults::default();
        f.set(vec![
            FaultRule {
                latency_ms: Some(10),
                ..Default::default()
            },
            FaultRule {
                method: Some("POST".into()),
                latency_ms: Some(5),
                hang: true,
                ..Default::default()
            },
            FaultRule {
                latency_ms: Some(7),
                ..Default::default()
            },
        ]);
        let now = Instant::now();
        let d = f.decide("GET", "/x", now, &mut never());
        assert_eq!(d.delay, Duration::from_millis(17));
        assert_eq!(d.outcome, Outcome::Pass);
        let d = f.decide("POST", "/x", now, &mut never());
        assert_eq!(d.delay, Duration::from_millis(15));
        assert_eq!(d.outcome, Outcome::Hang);
    }

    #[test]
    fn non_matching_rules_do_nothing() {
        let mut f = Faults::default();
        f.set(vec![FaultRule {
            path: Some("/vm/*".into()),
            throttle_next: Some(1),
            ..Default::default()
        }]);
        let now = Instant::now();
        assert_eq!(
            f.decide("GET", "/network/v1/x", now, &mut never()).outcome,
            Outcome::Pass
        );
        assert_eq!(f.rules().rules[0].throttle_next, Some(1));
    }

    #[test]
    fn rule_validation() {
        let errs = validate(&[FaultRule {
            error_rate: Some(1.5),
            error_status: Some(200),
            rate_limit_per_s: Some(0),
            ..Default::default()
        }]);
        assert_eq!(errs.len(), 3);
        assert!(validate(&[FaultRule::default()]).is_empty());
    }
}

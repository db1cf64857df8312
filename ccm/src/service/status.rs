//! What to write to a Service's status: `status.loadBalancer.ingress` and our
//! `cloudraya.com/LoadBalancerReady` condition. Pure: returns a merge patch only when
//! something changes, so an unchanged Service is never written (upstream's
//! `TestPatchStatus`: no-op add, no-op clear).

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::{Value, json};

use crate::service::CONDITION_TYPE;

/// kube-apiserver's limit on a `metav1.Condition` message, in bytes
/// (`ValidateConditions` in `apimachinery/pkg/apis/meta/v1/validation`).
const CONDITION_MESSAGE_MAX_BYTES: usize = 32 * 1024;

/// Our condition as we want it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub ready: bool,
    /// CamelCase reason, e.g. `Provisioning`, `InvalidAnnotation`.
    pub reason: String,
    pub message: String,
}

impl Ready {
    pub fn yes(message: impl Into<String>) -> Self {
        Ready {
            ready: true,
            reason: "LoadBalancerActive".into(),
            message: message.into(),
        }
    }

    pub fn no(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Ready {
            ready: false,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// What to do with our condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionUpdate {
    Leave,
    Set(Ready),
    Remove,
}

/// What to do with `status.loadBalancer.ingress`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngressUpdate {
    Leave,
    /// Exactly these IPs, in this order (IPv4 first), each with `ipMode: VIP` (empty:
    /// clear).
    Set(Vec<String>),
}

/// The `ipMode` of every ingress entry we write: the LB forwards packets to the nodes
/// with their destination rewritten (a node port), so kube-proxy may short-circuit
/// in-cluster traffic to the address (upstream's `VIP`, the API server's default).
pub const IP_MODE_VIP: &str = "VIP";

/// The ingress entries the Service shows now, in order: (ip, ipMode).
fn current_ingress(svc: &Service) -> Vec<(Option<String>, Option<String>)> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ing| ing.iter().map(|i| (i.ip.clone(), i.ip_mode.clone())).collect())
        .unwrap_or_default()
}

/// The ingress IPs the Service shows now.
pub fn current_ingress_ips(svc: &Service) -> Vec<String> {
    let mut ips: Vec<String> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ing| ing.iter().filter_map(|i| i.ip.clone()).collect())
        .unwrap_or_default();
    ips.sort();
    ips
}

/// Our condition as the Service shows it now.
pub fn current_condition(svc: &Service) -> Option<&Condition> {
    svc.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == CONDITION_TYPE))
}

/// Whether setting `want` changes the condition (status, reason or message).
pub fn condition_differs(svc: &Service, want: &Ready) -> bool {
    match current_condition(svc) {
        None => true,
        Some(c) => {
            c.status != if want.ready { "True" } else { "False" }
                || c.reason != want.reason
                || c.message != want.message
        }
    }
}

/// The merge patch for the status subresource, or `None` when nothing changes.
pub fn status_patch(svc: &Service, ingress: &IngressUpdate, condition: &ConditionUpdate, now: Time) -> Option<Value> {
    let mut status = serde_json::Map::new();

    if let IngressUpdate::Set(want) = ingress {
        let mut seen = std::collections::HashSet::new();
        let want: Vec<&String> = want.iter().filter(|ip| seen.insert(ip.as_str())).collect();
        let want_entries: Vec<(Option<String>, Option<String>)> = want
            .iter()
            .map(|ip| (Some((*ip).clone()), Some(IP_MODE_VIP.to_owned())))
            .collect();
        if want_entries != current_ingress(svc) {
            let list: Vec<Value> = want
                .iter()
                .map(|ip| json!({ "ip": ip, "ipMode": IP_MODE_VIP }))
                .collect();
            status.insert("loadBalancer".into(), json!({ "ingress": list }));
        }
    }

    let existing: Vec<Condition> = svc
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let new_conditions = match condition {
        ConditionUpdate::Leave => None,
        ConditionUpdate::Remove => existing
            .iter()
            .any(|c| c.type_ == CONDITION_TYPE)
            .then(|| existing.iter().filter(|c| c.type_ != CONDITION_TYPE).cloned().collect()),
        ConditionUpdate::Set(want) if condition_differs(svc, want) => {
            let status_str = if want.ready { "True" } else { "False" };
            let last_transition_time = match current_condition(svc) {
                Some(c) if c.status == status_str => c.last_transition_time.clone(),
                _ => now,
            };
            let cond = Condition {
                type_: CONDITION_TYPE.to_owned(),
                status: status_str.to_owned(),
                reason: want.reason.clone(),
                message: crate::events::fit_bytes(&want.message, CONDITION_MESSAGE_MAX_BYTES),
                observed_generation: svc.metadata.generation,
                last_transition_time,
            };
            let mut list: Vec<Condition> = existing.iter().filter(|c| c.type_ != CONDITION_TYPE).cloned().collect();
            list.push(cond);
            Some(list)
        }
        ConditionUpdate::Set(_) => None,
    };
    if let Some(list) = new_conditions {
        status.insert(
            "conditions".into(),
            serde_json::to_value(list).unwrap_or(Value::Array(vec![])),
        );
    }

    (!status.is_empty()).then(|| json!({ "status": Value::Object(status) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::desired::tests::svc;
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
    use k8s_openapi::jiff::Timestamp;

    fn now() -> Time {
        Time(Timestamp::from_second(1_800_000_000).unwrap_or(Timestamp::UNIX_EPOCH))
    }

    fn with_ingress(mut s: Service, ips: &[&str]) -> Service {
        let st = s.status.get_or_insert_with(ServiceStatus::default);
        st.load_balancer = Some(LoadBalancerStatus {
            ingress: Some(
                ips.iter()
                    .map(|ip| LoadBalancerIngress {
                        ip: Some((*ip).into()),
                        ip_mode: Some("VIP".into()),
                        ..LoadBalancerIngress::default()
                    })
                    .collect(),
            ),
        });
        s
    }

    fn apply(s: &Service, patch: &Value) -> Service {
        let mut v = serde_json::to_value(s).expect("encode");
        merge(&mut v, patch);
        serde_json::from_value(v).expect("decode")
    }

    /// RFC 7386 merge patch (enough for these tests).
    fn merge(target: &mut Value, patch: &Value) {
        match patch {
            Value::Object(p) => {
                if !target.is_object() {
                    *target = json!({});
                }
                if let Value::Object(t) = target {
                    for (k, v) in p {
                        if v.is_null() {
                            t.remove(k);
                        } else {
                            merge(t.entry(k.clone()).or_insert(Value::Null), v);
                        }
                    }
                }
            }
            other => *target = other.clone(),
        }
    }

    #[test]
    fn ingress_is_patched_only_when_it_changes() {
        let s = svc();
        let set = IngressUpdate::Set(vec!["127.203.0.10".into()]);
        let p = status_patch(&s, &set, &ConditionUpdate::Leave, now()).expect("add status");
        assert_eq!(
            p,
            json!({"status": {"loadBalancer": {"ingress": [{"ip": "127.203.0.10", "ipMode": "VIP"}]}}})
        );
        let s = apply(&s, &p);
        assert_eq!(current_ingress_ips(&s), vec!["127.203.0.10"]);
        // No-op add: same IP (an API server may have added ipMode).
        let s = with_ingress(s, &["127.203.0.10"]);
        assert_eq!(status_patch(&s, &set, &ConditionUpdate::Leave, now()), None);
        // Clear.
        let clear = IngressUpdate::Set(vec![]);
        let p = status_patch(&s, &clear, &ConditionUpdate::Leave, now()).expect("clear");
        assert_eq!(p, json!({"status": {"loadBalancer": {"ingress": []}}}));
        // No-op clear.
        assert_eq!(status_patch(&svc(), &clear, &ConditionUpdate::Leave, now()), None);
        assert_eq!(
            status_patch(&s, &IngressUpdate::Leave, &ConditionUpdate::Leave, now()),
            None
        );
    }

    /// A dual-stack LB: both addresses, IPv4 first, each `ipMode: VIP`; the order counts,
    /// an entry without `ipMode` (written before dual-stack) gets it.
    #[test]
    fn dual_stack_ingress_lists_both_in_order_with_ip_mode() {
        let both = IngressUpdate::Set(vec!["127.203.0.10".into(), "fd00:203::10".into()]);
        let p = status_patch(&svc(), &both, &ConditionUpdate::Leave, now()).expect("add");
        assert_eq!(
            p,
            json!({"status": {"loadBalancer": {"ingress": [
                {"ip": "127.203.0.10", "ipMode": "VIP"},
                {"ip": "fd00:203::10", "ipMode": "VIP"}
            ]}}})
        );
        let s = apply(&svc(), &p);
        assert_eq!(status_patch(&s, &both, &ConditionUpdate::Leave, now()), None, "no-op");
        // Reversed (IPv6 first): put back in order.
        let reversed = with_ingress(svc(), &["fd00:203::10", "127.203.0.10"]);
        assert_eq!(
            status_patch(&reversed, &both, &ConditionUpdate::Leave, now()),
            Some(p.clone())
        );
        // Without ipMode: rewritten with it.
        let mut bare = with_ingress(svc(), &["127.203.0.10", "fd00:203::10"]);
        for i in bare
            .status
            .as_mut()
            .and_then(|st| st.load_balancer.as_mut())
            .and_then(|l| l.ingress.as_mut())
            .into_iter()
            .flatten()
        {
            i.ip_mode = None;
        }
        assert_eq!(status_patch(&bare, &both, &ConditionUpdate::Leave, now()), Some(p));
        // A family removed (PreferDualStack -> SingleStack): only the IPv4 entry stays.
        let v4 = IngressUpdate::Set(vec!["127.203.0.10".into()]);
        let p = status_patch(&s, &v4, &ConditionUpdate::Leave, now()).expect("shrink");
        assert_eq!(
            p["status"]["loadBalancer"]["ingress"],
            json!([{"ip": "127.203.0.10", "ipMode": "VIP"}])
        );
    }

    #[test]
    fn condition_is_written_on_change_only_and_keeps_others() {
        let mut s = svc();
        s.metadata.generation = Some(3);
        s.status = Some(ServiceStatus {
            conditions: Some(vec![Condition {
                type_: "example.com/Other".into(),
                status: "True".into(),
                reason: "X".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: now(),
            }]),
            load_balancer: None,
        });
        let pending = ConditionUpdate::Set(Ready::no("Provisioning", "load balancer lb-1 is provisioning"));
        let p = status_patch(&s, &IngressUpdate::Leave, &pending, now()).expect("set");
        let s = apply(&s, &p);
        let c = current_condition(&s).expect("ours");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Provisioning"));
        assert_eq!(c.observed_generation, Some(3));
        assert_eq!(
            s.status.as_ref().and_then(|st| st.conditions.as_ref()).map(Vec::len),
            Some(2)
        );
        assert_eq!(
            status_patch(&s, &IngressUpdate::Leave, &pending, now()),
            None,
            "unchanged"
        );
        let ready = ConditionUpdate::Set(Ready::yes("load balancer lb-1 is active at 127.203.0.10"));
        let p = status_patch(&s, &IngressUpdate::Set(vec!["127.203.0.10".into()]), &ready, now()).expect("ready");
        let s = apply(&s, &p);
        assert_eq!(current_condition(&s).map(|c| c.status.as_str()), Some("True"));
        assert_eq!(current_ingress_ips(&s), vec!["127.203.0.10"]);
        let p = status_patch(&s, &IngressUpdate::Set(vec![]), &ConditionUpdate::Remove, now()).expect("remove");
        let s = apply(&s, &p);
        assert!(current_condition(&s).is_none());
        assert_eq!(
            s.status.as_ref().and_then(|st| st.conditions.as_ref()).map(Vec::len),
            Some(1)
        );
        assert_eq!(
            status_patch(&s, &IngressUpdate::Leave, &ConditionUpdate::Remove, now()),
            None
        );
    }
}

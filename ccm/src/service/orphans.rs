//! What an orphan is: one judgement of the platform's LBs of this cluster against the
//! cluster's Services, used by the CCM's sweep and by `kuberaya lb orphans`, so that the
//! two never disagree about what may be deleted.
//!
//! - An **orphan** is an LB with our cluster ID and a Service UID whose Service is gone,
//!   or exists but neither wants an LB nor carries our finalizer, and that no live
//!   Service will adopt by name ([`find_orphans`]). Deleting it is safe.
//! - An **unknown** LB carries our cluster ID but no Service UID: the CCM never made it
//!   (or someone edited its labels), so nobody can tell whose it is. It is listed, never
//!   deleted.
//!
//! LBs already being deleted are neither.

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;

use crate::platform::{LABEL_CLUSTER_ID, LABEL_SERVICE_UID, LbStatus, LoadBalancer};
use crate::service::desired::desired_lb_name;
use crate::service::diff::{LiveService, Orphan, find_orphans};
use crate::service::{has_finalizer, is_deleting, wants_load_balancer};

/// An LB of this cluster that no Service can be judged for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownLb {
    pub id: String,
    pub name: String,
}

/// The LBs of one cluster, judged against its Services.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Judgement {
    /// Safe to delete: no reconcile will ever remove them.
    pub orphans: Vec<Orphan>,
    /// Ours by cluster ID, but without a Service UID: never deleted by us.
    pub unknown: Vec<UnknownLb>,
}

/// Judges `lbs` (listed before `services`, so that an LB of a Service created in between
/// is never taken for an orphan) against every Service of the cluster.
pub fn judge(cluster_id: &str, lbs: &[LoadBalancer], services: &[Service]) -> Judgement {
    let live: HashMap<String, LiveService> = services
        .iter()
        .filter_map(|s| {
            Some((
                s.uid()?,
                LiveService {
                    wants_lb: wants_load_balancer(s),
                    has_finalizer: has_finalizer(s),
                },
            ))
        })
        .collect();
    let adoptable: HashSet<(String, String)> = services
        .iter()
        .filter(|s| wants_load_balancer(s) && !is_deleting(s))
        .map(|s| {
            (
                format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()),
                desired_lb_name(s),
            )
        })
        .collect();
    let unknown = lbs
        .iter()
        .filter(|lb| {
            lb.labels.get(LABEL_CLUSTER_ID).map(String::as_str) == Some(cluster_id)
                && !lb.labels.contains_key(LABEL_SERVICE_UID)
                && lb.status != LbStatus::Deleting
        })
        .map(|lb| UnknownLb {
            id: lb.id.clone(),
            name: lb.name.clone(),
        })
        .collect();
    Judgement {
        orphans: find_orphans(cluster_id, lbs, &live, &adoptable),
        unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::Labels;
    use crate::service::FINALIZER;
    use crate::service::desired::lb_labels;
    use crate::service::diff::tests::lb_with;

    fn service(ns: &str, name: &str, uid: &str, type_: &str, finalizer: bool) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name, "uid": uid,
                         "finalizers": if finalizer { vec![FINALIZER] } else { vec![] }},
            "spec": {"type": type_, "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    #[test]
    fn orphans_and_unknown_lbs_of_one_cluster() {
        let lbs = [
            lb_with(
                "lb-live",
                "default-a",
                lb_labels("cl-1", "uid-a", "default", "a", false),
            ),
            lb_with(
                "lb-gone",
                "default-b",
                lb_labels("cl-1", "uid-gone", "default", "b", false),
            ),
            // The Service exists, is ClusterIP now and has no finalizer: nothing will clean up.
            lb_with("lb-cip", "default-c", lb_labels("cl-1", "uid-c", "default", "c", false)),
            // ClusterIP now but still finalized: its own reconcile cleans up.
            lb_with("lb-fin", "default-d", lb_labels("cl-1", "uid-d", "default", "d", false)),
            // Recreated with a new UID while we were down: adopted by name.
            lb_with(
                "lb-old",
                "kr-default-e",
                lb_labels("cl-1", "uid-e-old", "default", "e", false),
            ),
            lb_with(
                "lb-hand",
                "made-by-hand",
                Labels::from([(LABEL_CLUSTER_ID.to_owned(), "cl-1".to_owned())]),
            ),
            lb_with("lb-other", "x", lb_labels("cl-2", "uid-x", "default", "x", false)),
        ];
        let services = [
            service("default", "a", "uid-a", "LoadBalancer", true),
            service("default", "c", "uid-c", "ClusterIP", false),
            service("default", "d", "uid-d", "ClusterIP", true),
            service("default", "e", "uid-e-new", "LoadBalancer", false),
        ];
        let j = judge("cl-1", &lbs, &services);
        let orphans: Vec<&str> = j.orphans.iter().map(|o| o.id.as_str()).collect();
        assert_eq!(orphans, ["lb-gone", "lb-cip"]);
        assert_eq!(
            j.unknown,
            [UnknownLb {
                id: "lb-hand".into(),
                name: "made-by-hand".into()
            }]
        );
        // Being deleted already: neither.
        let mut deleting = lbs.clone();
        for lb in &mut deleting {
            lb.status = LbStatus::Deleting;
        }
        assert_eq!(judge("cl-1", &deleting, &services), Judgement::default());
    }
}

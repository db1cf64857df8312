//! The service (LoadBalancer) controller: a platform LB for every eligible
//! `type: LoadBalancer` Service.
//!
//! Layout: [`nodes`] (which nodes are backends; node-change detection and debounce),
//! [`families`] (which address families the LB serves, pure), [`desired`] (Service ->
//! desired LB, pure), [`diff`] (actual vs desired -> plan, pure),
//! [`status`] (status and condition patches, pure), [`orphans`] (which LBs may be
//! swept: shared with the CLI), [`lookup`] (a Service's LB on the platform, and what the
//! controller remembers of it), [`sweep`] (the orphan sweep), [`controller`] (the kube-rs
//! controller: finalizer, cleanup, events, requeues), [`apply`] (a Service's LB brought
//! in line, by plan arm).

pub mod apply;
pub mod context;
pub mod controller;
pub mod desired;
pub mod diff;
pub mod families;
pub mod lb_cache;
pub mod lookup;
pub mod nodes;
pub mod orphans;
pub mod refusal;
pub mod status;
pub mod sweep;

use std::hash::{DefaultHasher, Hash, Hasher};

use k8s_openapi::api::core::v1::Service;

/// The upstream finalizer guarding a Service's load balancer.
pub const FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";

/// Our `spec.loadBalancerClass`; unset means ours as well.
pub const LOAD_BALANCER_CLASS: &str = "cloudraya.com/lb";

/// The type of our condition in `status.conditions`.
pub const CONDITION_TYPE: &str = "cloudraya.com/LoadBalancerReady";

/// Whether the Service asks us for a load balancer (regardless of deletion).
pub fn wants_load_balancer(svc: &Service) -> bool {
    let Some(spec) = svc.spec.as_ref() else { return false };
    spec.type_.as_deref() == Some("LoadBalancer")
        && spec
            .load_balancer_class
            .as_deref()
            .is_none_or(|c| c == LOAD_BALANCER_CLASS)
}

/// Whether the Service carries our finalizer.
pub fn has_finalizer(svc: &Service) -> bool {
    svc.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
}

/// Whether the Service is being deleted.
pub fn is_deleting(svc: &Service) -> bool {
    svc.metadata.deletion_timestamp.is_some()
}

/// Upstream's `needsCleanup`: our finalizer is set and the Service is being deleted or
/// no longer wants a load balancer.
pub fn needs_cleanup(svc: &Service) -> bool {
    has_finalizer(svc) && (is_deleting(svc) || !wants_load_balancer(svc))
}

/// A hash of everything a reconcile reads from the Service: identity, spec, annotations,
/// finalizers and deletion (upstream's `needsUpdate`, as a kube-rs predicate). Status is
/// left out: it is what we write, and our own status patches must not start another
/// reconcile (at 1,000 Services they were two of every three platform reads); a status
/// edited by hand is put back at the next resync.
pub fn reconcile_inputs(svc: &Service) -> Option<u64> {
    let mut h = DefaultHasher::new();
    svc.metadata.uid.hash(&mut h);
    // `ServiceSpec` is not `Hash`; its JSON is deterministic (fields in order, maps sorted).
    serde_json::to_string(&svc.spec).ok()?.hash(&mut h);
    svc.metadata.annotations.hash(&mut h);
    svc.metadata.finalizers.hash(&mut h);
    svc.metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .hash(&mut h);
    Some(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::desired::tests::svc;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn set_type(mut s: Service, t: &str) -> Service {
        if let Some(spec) = s.spec.as_mut() {
            spec.type_ = Some(t.into());
        }
        s
    }

    fn set_class(mut s: Service, c: &str) -> Service {
        if let Some(spec) = s.spec.as_mut() {
            spec.load_balancer_class = Some(c.into());
        }
        s
    }

    fn finalized(mut s: Service) -> Service {
        s.metadata.finalizers = Some(vec![FINALIZER.into()]);
        s
    }

    fn deleting(mut s: Service) -> Service {
        s.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        s
    }

    /// Upstream's `TestSyncLoadBalancerIfNeeded` selection cases.
    #[test]
    fn which_services_want_a_load_balancer() {
        assert!(wants_load_balancer(&svc()));
        assert!(!wants_load_balancer(&set_type(svc(), "ClusterIP")));
        assert!(!wants_load_balancer(&set_type(svc(), "NodePort")));
        assert!(wants_load_balancer(&set_class(svc(), LOAD_BALANCER_CLASS)));
        assert!(!wants_load_balancer(&set_class(svc(), "other.example/lb")));
        assert!(!wants_load_balancer(&Service::default()));
    }

    #[test]
    fn only_what_a_reconcile_reads_changes_the_inputs() {
        use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
        let base = reconcile_inputs(&svc());
        assert_eq!(base, reconcile_inputs(&svc()), "deterministic");
        let mut status_only = svc();
        status_only.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some("127.203.0.1".into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        });
        status_only.metadata.resource_version = Some("42".into());
        assert_eq!(base, reconcile_inputs(&status_only), "our own status writes");

        let mut annotated = svc();
        annotated
            .metadata
            .annotations
            .get_or_insert_default()
            .insert("lb.cloudraya.com/algorithm".into(), "least_conn".into());
        let mut recreated = svc();
        recreated.metadata.uid = Some("another-uid".into());
        let mut port_changed = svc();
        if let Some(p) = port_changed
            .spec
            .as_mut()
            .and_then(|s| s.ports.as_mut())
            .and_then(|p| p.first_mut())
        {
            p.port += 1;
        }
        for (what, changed) in [
            ("annotation", annotated),
            ("type", set_type(svc(), "ClusterIP")),
            ("class", set_class(svc(), "other.example/lb")),
            ("port", port_changed),
            ("finalizer", finalized(svc())),
            ("deletion", deleting(svc())),
            ("uid", recreated),
        ] {
            assert_ne!(base, reconcile_inputs(&changed), "{what}");
        }
    }

    /// Upstream's `TestNeedsCleanup`.
    #[test]
    fn when_cleanup_is_needed() {
        assert!(!needs_cleanup(&svc()), "without finalizer");
        assert!(
            !needs_cleanup(&deleting(svc())),
            "deleting without finalizer: nothing of ours"
        );
        assert!(!needs_cleanup(&finalized(svc())), "finalizer, wants LB");
        assert!(needs_cleanup(&deleting(finalized(svc()))), "finalizer and deletion");
        assert!(
            needs_cleanup(&finalized(set_type(svc(), "ClusterIP"))),
            "type changed away"
        );
        assert!(
            needs_cleanup(&finalized(set_class(svc(), "other.example/lb"))),
            "class changed away"
        );
    }
}

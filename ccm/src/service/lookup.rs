//! The service controller's lookups of a Service's LB on the platform (hcloud-CCM's
//! "ops" layer): `find_lb_by_uid`, `find_lb_by_name` and `find_lb`, which ask the
//! platform when the context's cache ([`super::lb_cache`]) cannot answer.

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;

use crate::platform::labels::MAX_LABEL_VALUE_LEN;
use crate::platform::{
    LABEL_CLUSTER_ID, LABEL_SERVICE_NAME, LABEL_SERVICE_NAMESPACE, LABEL_SERVICE_UID, Labels, LoadBalancer,
};
use crate::service::context::Context;
use crate::service::diff::{LookupError, pick_by_name, pick_by_uid};
use crate::{Error, Result, platform_err};

/// The labels of our LBs of the Service with this UID.
fn uid_labels(cluster_id: &str, uid: &str) -> Labels {
    Labels::from([
        (LABEL_CLUSTER_ID.to_owned(), cluster_id.to_owned()),
        (LABEL_SERVICE_UID.to_owned(), uid.to_owned()),
    ])
}

pub(crate) fn cluster_labels(cluster_id: &str) -> Labels {
    Labels::from([(LABEL_CLUSTER_ID.to_owned(), cluster_id.to_owned())])
}

/// How far [`find_lb_by_uid`] may trust what the context knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// A UID the context knows to have no LB is not looked up (applying: a miss is
    /// caught by the create's 409).
    TrustKnown,
    /// Always asks the platform (cleanup: a missed LB would be left running).
    AskPlatform,
}

/// Finds the Service's LB: the one remembered for its UID (one GET by ID), else by UID
/// label (a label-filtered list, whose cost does not grow with the cluster's LBs) unless
/// the context knows there is none.
pub(crate) async fn find_lb_by_uid(
    ctx: &Context,
    svc: &Service,
    lookup: Lookup,
) -> Result<Result<Option<LoadBalancer>, LookupError>> {
    let cluster = &ctx.config.cluster_id;
    let uid = svc.uid().ok_or(Error::MissingObjectKey("metadata.uid"))?;
    // The first look at a deletion we asked for goes by label: the platform finishes most
    // deletions before it, and a GET's 404 would need the label lookup anyway to show that
    // no other LB of the Service is left; the lookup alone answers both. Later looks (the
    // LB was still being deleted) go by ID again.
    let known = ctx
        .lbs
        .lb_ids()
        .get_mut(&uid)
        .map(|k| (k.id.clone(), std::mem::take(&mut k.look_by_label)));
    if let Some((id, false)) = known {
        let (ns, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
        match ctx.platform.get_load_balancer(cluster, &id).await {
            // Still ours and still this Service's (labels can be edited behind our back):
            // its UID, or its namespace/name (one adopted after a 409, not relabelled yet).
            Ok(lb)
                if matches!(pick_by_uid(cluster, &uid, std::slice::from_ref(&lb)), Ok(Some(_)))
                    || matches!(
                        pick_by_name(cluster, &ns, &name, &lb.name, std::slice::from_ref(&lb)),
                        Ok(Some(_))
                    ) =>
            {
                return Ok(Ok(Some(lb)));
            }
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(platform_err("get_load_balancer")(e)),
        }
        ctx.lbs.lb_ids().remove(&uid);
    } else if known.is_none() && lookup == Lookup::TrustKnown && ctx.lbs.known_without_lb(&uid) {
        return Ok(Ok(None));
    }
    let by_uid = ctx
        .platform
        .list_load_balancers(cluster, &uid_labels(cluster, &uid))
        .await
        .map_err(platform_err("list_load_balancers"))?;
    ctx.lbs.unsure_uids().remove(&uid);
    match pick_by_uid(cluster, &uid, &by_uid) {
        Ok(Some(lb)) => {
            ctx.lbs.remember_lb(&uid, lb, true);
            Ok(Ok(Some(lb.clone())))
        }
        Ok(None) => Ok(Ok(None)),
        Err(e) => Ok(Err(e)),
    }
}

/// Finds an LB named `lb_name` among our LBs labelled with the Service's namespace and
/// name: one of a previous incarnation of the Service (deleted and recreated while we
/// were down). Another Service's LB of that name is not in the list (its labels name
/// that Service), so the create's 409 is then reported as a refusal.
pub(crate) async fn find_lb_by_name(
    ctx: &Context,
    svc: &Service,
    lb_name: &str,
) -> Result<Result<Option<LoadBalancer>, LookupError>> {
    let cluster = &ctx.config.cluster_id;
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let mut by_service = cluster_labels(cluster);
    by_service.insert(LABEL_SERVICE_NAMESPACE.to_owned(), ns.clone());
    by_service.insert(
        LABEL_SERVICE_NAME.to_owned(),
        name.chars().take(MAX_LABEL_VALUE_LEN).collect(),
    );
    let same_service = ctx
        .platform
        .list_load_balancers(cluster, &by_service)
        .await
        .map_err(platform_err("list_load_balancers"))?;
    Ok(pick_by_name(cluster, &ns, &name, lb_name, &same_service).map(|o| o.cloned()))
}

/// Both lookups, for cleanup: an LB of a previous incarnation with the Service's name
/// goes with it.
pub(crate) async fn find_lb(
    ctx: &Context,
    svc: &Service,
    lb_name: &str,
) -> Result<Result<Option<LoadBalancer>, LookupError>> {
    match find_lb_by_uid(ctx, svc, Lookup::AskPlatform).await? {
        // The LB we are deleting had this name: no other LB of the Service can have it.
        Ok(None)
            if svc
                .uid()
                .is_some_and(|uid| ctx.lbs.deleting_names().get(&uid).map(String::as_str) == Some(lb_name)) =>
        {
            Ok(Ok(None))
        }
        Ok(None) => find_lb_by_name(ctx, svc, lb_name).await,
        found => Ok(found),
    }
}

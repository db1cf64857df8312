//! Applying a Service: its LB brought in line with what it asks, one step per arm of
//! the plan ([`plan_apply`]): `create`, `update`, `wait` and `in_sync`.

use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use tracing::info;

use crate::platform::{self, Labels, LbStatus, LoadBalancer, LoadBalancerSpec, LoadBalancerUpdate};
use crate::service::context::{
    Context, handle_platform_error, jittered, patch_status, publish, refuse, transition_poll_delay,
};
use crate::service::desired::{DesiredLb, PublicIpRequest, desired_load_balancer, ingress_ips, older_claimant};
use crate::service::diff::{ApplyPlan, plan_apply};
use crate::service::lookup::{Lookup, find_lb_by_name, find_lb_by_uid};
use crate::service::nodes::MAX_BACKENDS;
use crate::service::status::{ConditionUpdate, IngressUpdate, Ready, condition_differs};
use crate::{Error, Result, platform_err};

/// Brings the Service's LB in line with what the Service asks: the desired LB and the
/// actual one, a plan ([`plan_apply`]), then one step per plan arm ([`create`],
/// [`update`], [`wait`], [`in_sync`]).
pub(crate) async fn apply(svc: &Service, ctx: &Context, api: &Api<Service>) -> Result<Action> {
    let nodes = ctx.nodes.get();
    let desired = match desired_load_balancer(svc, nodes.iter().map(|n| n.as_ref()), &ctx.config) {
        Ok(d) => d,
        Err(refusal) => return refuse(ctx, api, svc, refusal.reason(), refusal.to_string()).await,
    };
    let uid = svc.uid().ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let mut actual = match find_lb_by_uid(ctx, svc, Lookup::TrustKnown).await? {
        Ok(a) => a,
        Err(e) => return refuse(ctx, api, svc, "LookupFailed", e.to_string()).await,
    };

    let mut resolved_ip = None;
    if actual.is_none()
        && let PublicIpRequest::Address(addr) = &desired.public_ip
    {
        match public_ip_id(ctx, addr).await? {
            Some(id) => resolved_ip = Some(id),
            None => {
                let msg = format!("spec.loadBalancerIP: no public IP {addr} exists in the platform account");
                return refuse(ctx, api, svc, "UnsupportedServiceSpec", msg).await;
            }
        }
    }

    // Planned at most twice: LB names are unique in a cluster, so instead of looking for
    // an LB of the wanted name before every create, a create answered with 409 looks it
    // up and plans again against what it found (adopting one of a previous incarnation of
    // the Service; another Service's name is a refusal).
    let mut looked_up_by_name = false;
    loop {
        let plan = match plan_apply(actual.as_ref(), &desired, resolved_ip.as_deref()) {
            Ok(p) => p,
            Err(r) => return refuse(ctx, api, svc, "UnsupportedChange", r.to_string()).await,
        };
        return match plan {
            ApplyPlan::Create(spec) => match create(ctx, api, svc, &uid, &desired, &spec, !looked_up_by_name).await? {
                Created::Done(action) => Ok(action),
                Created::Adopt(lb) => {
                    looked_up_by_name = true;
                    actual = Some(*lb);
                    continue;
                }
            },
            ApplyPlan::Update { id, update, changes } => {
                self::update(ctx, api, svc, &desired, &id, &update, &changes).await
            }
            ApplyPlan::Wait { id, status } => wait(ctx, api, svc, &uid, &id, status).await,
            ApplyPlan::InSync => in_sync(ctx, api, svc, &uid, actual).await,
        };
    }
}

/// The ID of the account's public IP `addr` (`spec.loadBalancerIP`), if there is one.
async fn public_ip_id(ctx: &Context, addr: &std::net::IpAddr) -> Result<Option<String>> {
    let ips = ctx
        .platform
        .list_public_ips(&Labels::new())
        .await
        .map_err(platform_err("list_public_ips"))?;
    Ok(ips.iter().find(|ip| &ip.address == addr).map(|ip| ip.id.clone()))
}

/// What a create came to.
enum Created {
    /// Created, refused or failed: the reconcile's answer.
    Done(Action),
    /// The create met an LB of the wanted name that is this Service's (`may_adopt`):
    /// plan again against it.
    Adopt(Box<LoadBalancer>),
}

/// [`ApplyPlan::Create`]: creates the LB unless an older Service wants its name; a 409
/// looks the name up once (`may_adopt`), to adopt an LB of a previous incarnation.
async fn create(
    ctx: &Context,
    api: &Api<Service>,
    svc: &Service,
    uid: &str,
    desired: &DesiredLb,
    spec: &LoadBalancerSpec,
    may_adopt: bool,
) -> Result<Created> {
    let cluster = &ctx.config.cluster_id;
    // Nobody holds the name yet (or the create's 409 would have told): of the
    // Services that want it, the older one gets it.
    let others = ctx.services.get().map(|s| s.state()).unwrap_or_default();
    if let Some(older) = older_claimant(svc, &spec.name, others.iter().map(|s| s.as_ref())) {
        let msg = format!(
            "load balancer name {:?} is also wanted by Service {older}, which is older and gets it; set another with lb.cloudraya.com/name",
            spec.name
        );
        return refuse(ctx, api, svc, "LoadBalancerNameTaken", msg)
            .await
            .map(Created::Done);
    }
    warn_if_capped(ctx, svc, desired).await;
    let e = match ctx.platform.create_load_balancer(cluster, spec).await {
        Ok(lb) => {
            info!(lb = %lb.id, name = %lb.name, "created load balancer");
            ctx.lbs.transition_started(uid, &lb);
            publish(
                ctx,
                svc,
                EventType::Normal,
                "EnsuringLoadBalancer",
                format!("Creating load balancer {} ({})", spec.name, lb.id),
            );
            let cond = Ready::no("Provisioning", format!("load balancer {} is provisioning", lb.id));
            patch_status(api, svc, IngressUpdate::Leave, ConditionUpdate::Set(cond)).await?;
            let first_look = transition_poll_delay(Some(Duration::ZERO), ctx.timing.first_poll, ctx.timing.poll);
            return Ok(Created::Done(Action::requeue(first_look)));
        }
        Err(e) => e,
    };
    if e.may_have_taken_effect() {
        ctx.lbs.unsure_uids().insert(uid.to_owned());
    }
    if matches!(e, platform::Error::Conflict { .. }) && may_adopt {
        match find_lb_by_name(ctx, svc, &spec.name).await? {
            Ok(Some(lb)) => {
                // One of a previous incarnation, or ours whose create answer was lost.
                info!(lb = %lb.id, name = %lb.name, "adopting the existing load balancer of this name");
                let labelled = matches!(
                    crate::service::diff::pick_by_uid(&ctx.config.cluster_id, uid, std::slice::from_ref(&lb)),
                    Ok(Some(_))
                );
                ctx.lbs.remember_lb(uid, &lb, labelled);
                return Ok(Created::Adopt(Box::new(lb)));
            }
            Ok(None) => {}
            Err(lookup) => {
                return refuse(ctx, api, svc, "LookupFailed", lookup.to_string())
                    .await
                    .map(Created::Done);
            }
        }
    }
    handle_platform_error(ctx, api, svc, "create_load_balancer", e)
        .await
        .map(Created::Done)
}

/// [`ApplyPlan::Update`]: `PUT`s the LB and says what changed.
async fn update(
    ctx: &Context,
    api: &Api<Service>,
    svc: &Service,
    desired: &DesiredLb,
    id: &str,
    update: &LoadBalancerUpdate,
    changes: &[&'static str],
) -> Result<Action> {
    warn_if_capped(ctx, svc, desired).await;
    if let Err(e) = ctx
        .platform
        .update_load_balancer(&ctx.config.cluster_id, id, update)
        .await
    {
        return handle_platform_error(ctx, api, svc, "update_load_balancer", e).await;
    }
    info!(lb = %id, ?changes, "updated load balancer");
    publish(
        ctx,
        svc,
        EventType::Normal,
        "UpdatedLoadBalancer",
        format!("Updated load balancer {id} ({})", changes.join(", ")),
    );
    // Nothing the Service shows waits on an update: looked at after the full period.
    Ok(Action::requeue(ctx.timing.poll))
}

/// [`ApplyPlan::Wait`]: the LB is busy; our condition says with what, and it is looked
/// at again.
async fn wait(
    ctx: &Context,
    api: &Api<Service>,
    svc: &Service,
    uid: &str,
    id: &str,
    status: LbStatus,
) -> Result<Action> {
    let cond = match status {
        LbStatus::Provisioning => {
            ConditionUpdate::Set(Ready::no("Provisioning", format!("load balancer {id} is provisioning")))
        }
        LbStatus::Deleting => ConditionUpdate::Set(Ready::no(
            "Deleting",
            format!("load balancer {id} is being deleted; a new one follows"),
        )),
        _ => ConditionUpdate::Leave,
    };
    patch_status(api, svc, IngressUpdate::Leave, cond).await?;
    Ok(Action::requeue(ctx.next_poll(uid)))
}

/// [`ApplyPlan::InSync`]: once the LB is active, the Service shows its address and is
/// Ready; resynced after `timing.resync`.
async fn in_sync(
    ctx: &Context,
    api: &Api<Service>,
    svc: &Service,
    uid: &str,
    actual: Option<LoadBalancer>,
) -> Result<Action> {
    let Some(lb) = actual else {
        return Ok(Action::requeue(ctx.timing.poll));
    };
    if lb.status != LbStatus::Active {
        return Ok(Action::requeue(ctx.next_poll(uid)));
    }
    ctx.lbs.transition_finished(uid);
    let ingress = ingress_ips(&lb);
    let ready = Ready::yes(if ingress.is_empty() {
        format!("load balancer {} is active", lb.id)
    } else {
        format!("load balancer {} is active at {}", lb.id, ingress.join(", "))
    });
    let became_ready = condition_differs(svc, &ready);
    patch_status(api, svc, IngressUpdate::Set(ingress), ConditionUpdate::Set(ready)).await?;
    if became_ready {
        publish(
            ctx,
            svc,
            EventType::Normal,
            "EnsuredLoadBalancer",
            format!("Ensured load balancer {}", lb.id),
        );
    }
    Ok(Action::requeue(jittered(ctx.timing.resync, rand::random::<f64>())))
}

/// A Warning Event when the platform's backend limit leaves eligible nodes out; only on
/// the writes that set the backends, not on every resync.
async fn warn_if_capped(ctx: &Context, svc: &Service, desired: &DesiredLb) {
    if desired.eligible_backends > desired.backends.len() {
        let note = format!(
            "{} nodes are eligible but the platform takes at most {MAX_BACKENDS} backends per load balancer: \
             using {}, chosen by a hash of the Service UID (the same on every sync)",
            desired.eligible_backends,
            desired.backends.len()
        );
        publish(ctx, svc, EventType::Warning, "TooManyBackends", note);
    }
}

//! The kube-rs controller of LoadBalancer Services.
//!
//! [`reconcile`] routes a Service through [`kube::runtime::finalizer`] when it wants a
//! load balancer (or is being deleted with our finalizer), and through our own cleanup
//! when its type changed away. Apply computes the desired LB ([`super::desired`]), finds
//! the actual one by labels, plans ([`super::diff`]) and makes only the calls the plan
//! asks for. Slow platform operations are polled by requeue; no worker ever waits on
//! one. Refusals (invalid annotations, unsupported fields, platform 422/409) become a
//! Warning Event and our condition, and are retried slowly, never in a tight loop.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, info, instrument, warn};

use crate::annotations;
use crate::backoff::{Backoff, Failures, Jitter};
use crate::events::{self, EventQueue};
use crate::metrics::Metrics;
use crate::platform::{self, Labels, LbStatus, LoadBalancer, LoadBalancerSpec, LoadBalancerUpdate, Platform};
use crate::runner::{Connections, log_reconciles};
use crate::service::desired::{
    DesiredConfig, DesiredLb, PublicIpRequest, desired_lb_name, desired_load_balancer, ingress_ips, older_claimant,
};
use crate::service::diff::{ApplyPlan, DeletePlan, keep_public_ip, plan_apply, plan_delete};
use crate::service::lookup::{LbCache, Lookup, find_lb, find_lb_by_name, find_lb_by_uid};
use crate::service::nodes::{MAX_BACKENDS, NodeSetFingerprint, SettledNodes, debounce, selector_keys};
use crate::service::status::{ConditionUpdate, IngressUpdate, Ready, condition_differs, status_patch};
use crate::service::sweep::run_sweep;
use crate::service::{FINALIZER, is_deleting, needs_cleanup, reconcile_inputs, wants_load_balancer};
use crate::{Error, Result, platform_err};

/// The controller's name in Events and field managers.
pub const CONTROLLER_NAME: &str = "kuberaya-ccm-service-controller";

/// Timing knobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// Periodic resync of an in-sync Service (drift repair); jittered ±10 %.
    pub resync: Duration,
    /// Polling of a provisioning, updating or deleting LB: the longest wait between two
    /// looks. An LB we created (its Service waits for the address) is first looked at
    /// after `first_poll`, then ever less often up to `poll` ([`transition_poll_delay`]).
    pub poll: Duration,
    pub first_poll: Duration,
    /// Retry of a Service the platform refused (422, 409, no public IP left).
    pub refused_retry: Duration,
    /// First error backoff; doubled per failure up to `max_backoff`, jittered ±20 %.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            resync: Duration::from_secs(300),
            poll: Duration::from_secs(2),
            first_poll: Duration::from_millis(500),
            refused_retry: Duration::from_secs(60),
            base_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
        }
    }
}

/// What [`reconcile`] sees.
pub struct Context {
    pub client: Client,
    pub platform: Arc<dyn Platform>,
    /// Events go out through [`EventQueue`], off the reconcile path.
    events: EventQueue,
    pub metrics: Arc<Metrics>,
    /// All Nodes (a reflector store, ready before the controller starts), as of the last
    /// debounced batch of node changes.
    pub nodes: Arc<SettledNodes>,
    pub config: DesiredConfig,
    pub timing: Timing,
    /// Consecutive failures per Service (`namespace/name`), for the error backoff.
    pub(crate) failures: Failures,
    /// What the controller remembers of each Service's LB (see [`LbCache`]).
    pub(crate) lbs: LbCache,
    /// Every Service (the controller's store), once it runs: an LB name two Services want
    /// goes to the older one ([`older_claimant`]).
    services: OnceLock<Store<Service>>,
}

impl Context {
    pub fn new(
        client: Client,
        platform: Arc<dyn Platform>,
        metrics: Arc<Metrics>,
        nodes: Store<Node>,
        config: DesiredConfig,
        timing: Timing,
    ) -> Self {
        let failures = Failures::new(Backoff::new(
            timing.base_backoff,
            timing.max_backoff,
            Jitter::PLUS_MINUS_20_PERCENT,
        ));
        Context {
            events: EventQueue::start(events::recorder(client.clone(), CONTROLLER_NAME)),
            client,
            platform,
            metrics,
            nodes: Arc::new(SettledNodes::new(nodes)),
            config,
            timing,
            failures,
            lbs: LbCache::default(),
            services: OnceLock::new(),
        }
    }

    /// Gives the context the store of every Service (the controller's).
    pub fn see_services(&self, store: Store<Service>) {
        let _ = self.services.set(store);
    }

    /// When to look again at the Service's LB that is not settled yet.
    fn next_poll(&self, uid: &str) -> Duration {
        let waited = self
            .lbs
            .lb_ids()
            .get(uid)
            .and_then(|k| k.transition_since)
            .map(|since| since.elapsed());
        transition_poll_delay(waited, self.timing.first_poll, self.timing.poll)
    }
}

/// How long to wait before looking again at an LB we created `waited` ago (`None`: one
/// we did not create, or from before a restart): `first` at first, because the platform
/// finishes most creates in under a second, then with half the time waited so far on top
/// (a slow platform costs a few looks more than a fixed period would), never longer
/// apart than `max`.
pub fn transition_poll_delay(waited: Option<Duration>, first: Duration, max: Duration) -> Duration {
    match waited {
        Some(w) => (first + w / 2).min(max),
        None => max,
    }
}

fn key_of(svc: &Service) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
}

/// `d` jittered by ±10 % (`jitter` in [0, 1)).
pub fn jittered(d: Duration, jitter: f64) -> Duration {
    d.mul_f64(0.9 + 0.2 * jitter.clamp(0.0, 1.0))
}

/// Reconciles one Service. See the module docs.
#[instrument(skip(svc, ctx), fields(service = %key_of(&svc)))]
pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer();
    let ns = svc.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let key = key_of(&svc);

    let result = if needs_cleanup(&svc) {
        // Deleted, or its type (or class) changed away from ours: remove the LB, then our
        // finalizer. Done here rather than through `finalizer()`, which takes any `Ok` of
        // a cleanup for "done": waiting for the platform is a requeue, not an error.
        release(&svc, &ctx, &api).await
    } else if wants_load_balancer(&svc) && !is_deleting(&svc) {
        finalizer(&api, FINALIZER, svc, |event| async {
            match event {
                FinalizerEvent::Apply(s) => apply(&s, &ctx, &api).await,
                // Not reached (a Service being deleted with our finalizer is released
                // above); should it be, the finalizer stays until the LB is gone.
                FinalizerEvent::Cleanup(s) => match cleanup(&s, &ctx).await? {
                    Cleanup::Done => Ok(Action::await_change()),
                    Cleanup::Waiting(retry_after) => Err(Error::InProgress {
                        what: "load balancer being deleted".into(),
                        retry_after,
                    }),
                },
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    } else {
        Ok(Action::await_change())
    };

    if result.is_ok() {
        ctx.metrics.record_success();
        ctx.failures.clear(&key);
    }
    result
}

/// Requeue policy on errors: in-progress operations are polled; everything else backs
/// off exponentially with jitter, per Service.
pub fn error_policy(svc: Arc<Service>, error: &Error, ctx: Arc<Context>) -> Action {
    if let Error::InProgress { retry_after, .. } = error.inner() {
        return Action::requeue(*retry_after);
    }
    ctx.metrics.record_failure(error);
    let (failures, delay) = ctx.failures.record(key_of(&svc));
    warn!(service = %key_of(&svc), error = %error, failures, ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Queues an Event about `svc` (see [`EventQueue`]).
fn publish(ctx: &Context, svc: &Service, type_: EventType, reason: &str, note: String) {
    ctx.events
        .send(events::event(type_, reason, &note), svc.object_ref(&()));
}

async fn patch_status(
    api: &Api<Service>,
    svc: &Service,
    ingress: IngressUpdate,
    cond: ConditionUpdate,
) -> Result<bool> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let Some(patch) = status_patch(svc, &ingress, &cond, now) else {
        return Ok(false);
    };
    api.patch_status(&svc.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(Error::Kube)?;
    Ok(true)
}

/// Reports a refusal: condition (and a Warning Event when the condition changes).
async fn refuse(ctx: &Context, api: &Api<Service>, svc: &Service, reason: &str, message: String) -> Result<Action> {
    let want = Ready::no(reason, message.clone());
    if condition_differs(svc, &want) {
        publish(ctx, svc, EventType::Warning, "SyncLoadBalancerFailed", message.clone());
    }
    info!(reason, %message, "load balancer refused");
    patch_status(api, svc, IngressUpdate::Leave, ConditionUpdate::Set(want)).await?;
    Ok(Action::requeue(ctx.timing.refused_retry))
}

/// Whether a platform error is a refusal the user must act on (not a transient fault).
fn is_refusal(e: &platform::Error) -> bool {
    match e {
        platform::Error::Invalid { .. }
        | platform::Error::Forbidden { .. }
        | platform::Error::BadRequest { .. }
        | platform::Error::NotFound { .. } => true,
        platform::Error::Conflict { message } => !is_busy(message),
        _ => false,
    }
}

/// A 409 that clears by itself (the LB is busy).
fn is_busy(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    ["updating", "provisioning", "deleting"].iter().any(|w| m.contains(w))
}

async fn handle_platform_error(
    ctx: &Context,
    api: &Api<Service>,
    svc: &Service,
    op: &'static str,
    e: platform::Error,
) -> Result<Action> {
    if let platform::Error::Conflict { message } = &e
        && is_busy(message)
    {
        debug!(op, %message, "load balancer busy; polling");
        return Ok(Action::requeue(ctx.timing.poll));
    }
    if is_refusal(&e) {
        return refuse(ctx, api, svc, "PlatformRefused", format!("{op}: {e}")).await;
    }
    publish(
        ctx,
        svc,
        EventType::Warning,
        "SyncLoadBalancerFailed",
        format!("Error syncing load balancer: {op}: {e}"),
    );
    Err(Error::Platform { op, source: e })
}

/// Brings the Service's LB in line with what the Service asks: the desired LB and the
/// actual one, a plan ([`plan_apply`]), then one step per plan arm ([`create`],
/// [`update`], [`wait`], [`in_sync`]).
async fn apply(svc: &Service, ctx: &Context, api: &Api<Service>) -> Result<Action> {
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
                ctx.lbs.remember_lb(uid, &lb);
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
    let addr = lb.public_ip.as_ref().map(|ip| ip.address);
    let ready = Ready::yes(match addr {
        Some(a) => format!("load balancer {} is active at {a}", lb.id),
        None => format!("load balancer {} is active", lb.id),
    });
    let became_ready = condition_differs(svc, &ready);
    patch_status(
        api,
        svc,
        IngressUpdate::Set(ingress_ips(addr)),
        ConditionUpdate::Set(ready),
    )
    .await?;
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

/// Where a cleanup stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cleanup {
    /// No LB of this Service is left.
    Done,
    /// The platform is deleting it: look again after this long.
    Waiting(Duration),
}

/// Removes the Service's LB (see [`cleanup`]); once it is gone, our finalizer, and for a
/// Service that stays (its type changed away) its ingress and our condition too. Waiting
/// on the platform is a requeue: no error backoff, no error metric, no Warning.
async fn release(svc: &Service, ctx: &Context, api: &Api<Service>) -> Result<Action> {
    match cleanup(svc, ctx).await? {
        Cleanup::Waiting(after) => Ok(Action::requeue(after)),
        Cleanup::Done => {
            if !is_deleting(svc) {
                patch_status(api, svc, IngressUpdate::Set(vec![]), ConditionUpdate::Remove).await?;
            }
            remove_finalizer(api, svc).await?;
            Ok(Action::await_change())
        }
    }
}

/// Finds and deletes the Service's LB. While the platform deletes it, [`Cleanup::Waiting`]
/// with the next look: by ID while the ID is known, first after the platform's typical
/// transition time, then ever less often (as for a create); a 404 or an unknown ID falls
/// back to the label lookups, so a cleanup never ends while an LB of the Service may exist.
///
/// An LB whose ID we know (we created it, or found it by its labels) and have not seen
/// deleting is deleted by ID at once, without a GET first: the DELETE's answer says what
/// the GET would have (202: going; 404: gone, so the label lookups follow), and a DELETE
/// is idempotent on the platform.
async fn cleanup(svc: &Service, ctx: &Context) -> Result<Cleanup> {
    let ann = svc.metadata.annotations.clone().unwrap_or_default();
    // An unreadable retain annotation keeps the IP: never release what may be wanted.
    let retain = annotations::retain_public_ip(&ann).map_or(true, |v| v.unwrap_or(false));
    let reused = annotations::public_ip_id(&ann).map_or(true, |v| v.is_some())
        || svc
            .spec
            .as_ref()
            .and_then(|s| s.load_balancer_ip.as_deref())
            .is_some_and(|s| !s.trim().is_empty());
    let keep = keep_public_ip(retain, reused);
    let uid = svc.uid().ok_or(Error::MissingObjectKey("metadata.uid"))?;
    if let Some((id, name)) = ctx.lbs.known_staying(&uid) {
        match start_delete(ctx, svc, &uid, &id, &name, keep).await? {
            Some(waiting) => return Ok(waiting),
            // Gone already: forgotten; the lookups below make sure nothing else is left.
            None => {
                ctx.lbs.lb_ids().remove(&uid);
            }
        }
    }
    let lb_name = desired_lb_name(svc);
    let actual = match find_lb(ctx, svc, &lb_name).await? {
        Ok(a) => a,
        // Not ours to delete (another Service's name, or ambiguous): nothing to remove.
        Err(e) => {
            warn!(error = %e, "not deleting an LB that is not unambiguously this Service's");
            None
        }
    };
    match (plan_delete(actual.as_ref(), keep), actual) {
        (DeletePlan::Gone, _) => {
            ctx.lbs.lb_ids().remove(&uid);
            ctx.lbs.deleting_names().remove(&uid);
            publish(
                ctx,
                svc,
                EventType::Normal,
                "DeletedLoadBalancer",
                "Deleted load balancer".into(),
            );
            Ok(Cleanup::Done)
        }
        (DeletePlan::Delete { id, keep_public_ip }, Some(lb)) => {
            // Gone between the lookup and the DELETE: looked at again like any deletion.
            let waiting = start_delete(ctx, svc, &uid, &id, &lb.name, keep_public_ip).await?;
            Ok(waiting.unwrap_or(Cleanup::Waiting(ctx.timing.first_poll)))
        }
        (DeletePlan::Wait { id }, Some(lb)) => {
            debug!(lb = %id, "load balancer still being deleted");
            ctx.lbs.deletion_started(&uid, &id, &lb.name, false);
            Ok(Cleanup::Waiting(ctx.next_poll(&uid)))
        }
        // `plan_delete` plans a deletion only of an LB it was given.
        (DeletePlan::Delete { .. } | DeletePlan::Wait { .. }, None) => Ok(Cleanup::Waiting(ctx.timing.poll)),
    }
}

/// Asks the platform to delete the Service's LB `id` (named `name`): the first look
/// after the platform's typical transition time, or `None` when the LB is gone already
/// (404). A busy LB (409) is looked at again, not reported as an error.
async fn start_delete(
    ctx: &Context,
    svc: &Service,
    uid: &str,
    id: &str,
    name: &str,
    keep_public_ip: Option<bool>,
) -> Result<Option<Cleanup>> {
    publish(
        ctx,
        svc,
        EventType::Normal,
        "DeletingLoadBalancer",
        format!("Deleting load balancer {id}"),
    );
    match ctx
        .platform
        .delete_load_balancer(&ctx.config.cluster_id, id, keep_public_ip)
        .await
    {
        Ok(()) => {}
        Err(e) if e.is_not_found() => return Ok(None),
        Err(platform::Error::Conflict { message }) if is_busy(&message) => {
            debug!(lb = %id, %message, "load balancer busy; deleting it once it is not");
            return Ok(Some(Cleanup::Waiting(ctx.timing.poll)));
        }
        Err(e) => {
            publish(
                ctx,
                svc,
                EventType::Warning,
                "DeleteLoadBalancerFailed",
                format!("Error deleting load balancer {id}: {e}"),
            );
            return Err(Error::Platform {
                op: "delete_load_balancer",
                source: e,
            });
        }
    }
    info!(lb = %id, ?keep_public_ip, "deleting load balancer");
    ctx.lbs.deletion_started(uid, id, name, true);
    // The platform finishes most deletes in under a second.
    Ok(Some(Cleanup::Waiting(ctx.timing.first_poll)))
}

/// Removes our finalizer with a JSON patch that first tests its index, so another
/// controller's finalizer is never removed (as `kube::runtime::finalizer` does).
async fn remove_finalizer(api: &Api<Service>, svc: &Service) -> Result<()> {
    let Some(i) = svc.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{i}")},
    ]))
    .map_err(|e| Error::Config {
        message: "finalizer patch".into(),
        source: Some(Box::new(e)),
    })?;
    api.patch::<Service>(&svc.name_any(), &PatchParams::default(), &Patch::Json(patch))
        .await
        .map_err(Error::Kube)?;
    Ok(())
}

/// Settings of [`run`].
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub config: DesiredConfig,
    pub timing: Timing,
    /// Concurrent reconciles (`--concurrent-service-syncs`).
    pub concurrency: u16,
    /// Quiet period of the node-change debounce.
    pub node_debounce: Duration,
    /// Upper bound of a debounced node batch.
    pub node_debounce_max: Duration,
    /// Period of the orphan sweep.
    pub orphan_sweep: Duration,
}

/// Node changes that can move some LB's backends, as one debounced tick per burst. Of a
/// node's labels only those some Service's node selector reads count. Every batch also
/// settles `nodes`, so the ticked reconciles (and any other until the next batch) plan
/// with the node set the tick was decided on.
fn node_change_ticks(
    node_events: impl Stream<Item = ()> + Send + 'static,
    nodes: Arc<SettledNodes>,
    services: Store<Service>,
    quiet: Duration,
    max_delay: Duration,
) -> impl Stream<Item = ()> + Send {
    let mut last = NodeSetFingerprint::default();
    debounce(node_events, quiet, max_delay).filter_map(move |()| {
        nodes.settle();
        let selectors: Vec<annotations::NodeSelector> = services
            .state()
            .iter()
            .filter_map(|s| annotations::node_selector(s.annotations()).ok().flatten())
            .collect();
        let keys = selector_keys(&selectors);
        let fp = NodeSetFingerprint::of_selected(nodes.get().iter().map(|n| n.as_ref()), Some(&keys));
        let changed = fp != last;
        if changed {
            info!(
                eligible_nodes = fp.len(),
                "node set changed; resyncing every load balancer"
            );
            last = fp;
        }
        futures::future::ready(changed.then_some(()))
    })
}

/// Runs the service controller and the orphan sweep until `shutdown` resolves.
pub async fn run(
    connections: Connections,
    settings: RunSettings,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<()> {
    let client = connections.client;
    // Nodes: a reflector fed by its own task, so the store is complete before the
    // first reconcile (an empty node list must never empty every LB's backends).
    let (node_store, node_writer) = reflector::store::<Node>();
    let (tick_tx, tick_rx) = futures::channel::mpsc::unbounded::<()>();
    let node_api: Api<Node> = Api::all(client.clone());
    let node_task = tokio::spawn(async move {
        let stream = reflector::reflector(
            node_writer,
            watcher(node_api, watcher::Config::default()).backoff(crate::watch::WatchBackoff::default()),
        );
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => {
                    if tick_tx.unbounded_send(()).is_err() {
                        break;
                    }
                }
                Err(e) => warn!(error = %e, "node watch error"),
            }
        }
    });
    node_store.wait_until_ready().await.map_err(|e| Error::Config {
        message: "node reflector stopped before it was ready".into(),
        source: Some(Box::new(e)),
    })?;
    info!(nodes = node_store.state().len(), "node cache ready");

    let ctx = Arc::new(Context::new(
        client.clone(),
        connections.platform,
        connections.metrics,
        node_store.clone(),
        settings.config.clone(),
        settings.timing.clone(),
    ));
    let services: Api<Service> = Api::all(client);
    let (service_store, service_writer) = reflector::store::<Service>();
    // Only changes a reconcile reads start one (see `reconcile_inputs`); polls and
    // resyncs are requeues, node changes come as ticks.
    let service_changes = watcher(services, watcher::Config::default().any_semantic())
        .backoff(crate::watch::WatchBackoff::default())
        .reflect(service_writer)
        .applied_objects()
        .predicate_filter(reconcile_inputs, Default::default());
    ctx.see_services(service_store.clone());
    let controller = Controller::for_stream(service_changes, service_store).with_config(
        ControllerConfig::default()
            .concurrency(settings.concurrency)
            .debounce(Duration::from_millis(200)),
    );
    ctx.nodes.settle();
    let ticks = node_change_ticks(
        tick_rx,
        ctx.nodes.clone(),
        controller.store(),
        settings.node_debounce,
        settings.node_debounce_max,
    );

    let sweep_task = tokio::spawn(run_sweep(ctx.clone(), settings.orphan_sweep));

    let results = controller
        .reconcile_all_on(ticks)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx);
    log_reconciles(results, "service").await;
    sweep_task.abort();
    node_task.abort();
    Ok(())
}

#[cfg(test)]
mod tests;

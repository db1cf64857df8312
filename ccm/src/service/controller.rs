//! The kube-rs controller of LoadBalancer Services.
//!
//! [`reconcile`] routes a Service through [`kube::runtime::finalizer()`] when it wants a
//! load balancer (or is being deleted with our finalizer), and through our own cleanup
//! when its type changed away. Apply ([`super::apply`]) computes the desired LB
//! ([`super::desired`]), finds the actual one ([`super::lookup`]), plans
//! ([`super::diff`]) and makes only the calls the plan asks for. Slow platform operations
//! are polled by requeue; no worker ever waits on one. Refusals (invalid annotations, unsupported fields, platform 422/409) become a
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
use crate::platform::{self, Platform};
use crate::runner::{Connections, log_reconciles};
use crate::service::apply::apply;
use crate::service::desired::{DesiredConfig, desired_lb_name};
use crate::service::diff::{DeletePlan, keep_public_ip, plan_delete};
use crate::service::lookup::{LbCache, find_lb};
use crate::service::nodes::{NodeSetFingerprint, SettledNodes, debounce, selector_keys};
use crate::service::status::{ConditionUpdate, IngressUpdate, Ready, condition_differs, status_patch};
use crate::service::sweep::run_sweep;
use crate::service::{FINALIZER, is_deleting, needs_cleanup, reconcile_inputs, wants_load_balancer};
use crate::{Error, Result};

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
    pub(crate) services: OnceLock<Store<Service>>,
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
    pub(crate) fn next_poll(&self, uid: &str) -> Duration {
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
pub(crate) fn publish(ctx: &Context, svc: &Service, type_: EventType, reason: &str, note: String) {
    ctx.events
        .send(events::event(type_, reason, &note), svc.object_ref(&()));
}

pub(crate) async fn patch_status(
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
pub(crate) async fn refuse(
    ctx: &Context,
    api: &Api<Service>,
    svc: &Service,
    reason: &str,
    message: String,
) -> Result<Action> {
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

pub(crate) async fn handle_platform_error(
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

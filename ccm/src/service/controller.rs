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
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tracing::{debug, info, instrument, warn};

use crate::annotations;
use crate::platform;
use crate::runner::{Connections, log_reconciles};
use crate::service::apply::apply;
pub use crate::service::context::{CONTROLLER_NAME, Context, Timing, jittered, transition_poll_delay};
use crate::service::context::{is_busy, patch_status, publish};
use crate::service::desired::{DesiredConfig, desired_lb_name};
use crate::service::diff::{DeletePlan, keep_public_ip, plan_delete};
use crate::service::lookup::find_lb;
use crate::service::nodes::{NodeSetFingerprint, SettledNodes, debounce, selector_keys};
use crate::service::status::{ConditionUpdate, IngressUpdate};
use crate::service::sweep::run_sweep;
use crate::service::{FINALIZER, is_deleting, needs_cleanup, reconcile_inputs, wants_load_balancer};
use crate::{Error, Result};

fn key_of(svc: &Service) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
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

//! What every reconcile of the Service controller sees ([`Context`]: the clients, the
//! caches, the timing) and how it reports back: Events, the status, refusals and platform
//! errors.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, info};

use crate::backoff::{Backoff, Failures, Jitter};
use crate::events::{self, EventQueue};
use crate::metrics::Metrics;
use crate::platform::{self, Platform};
use crate::service::desired::DesiredConfig;
use crate::service::lb_cache::LbCache;
use crate::service::nodes::SettledNodes;
use crate::service::status::{ConditionUpdate, IngressUpdate, Ready, condition_differs, status_patch};
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

/// What [`reconcile`](super::controller::reconcile) sees.
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
    /// goes to the older one ([`older_claimant`](super::desired::older_claimant)).
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

/// `d` jittered by ±10 % (`jitter` in [0, 1)).
pub fn jittered(d: Duration, jitter: f64) -> Duration {
    d.mul_f64(0.9 + 0.2 * jitter.clamp(0.0, 1.0))
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
pub(crate) fn is_busy(message: &str) -> bool {
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

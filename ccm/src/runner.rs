//! How the CCM's controllers run: the [`Connections`] they share, a kube-rs controller's
//! result stream run to its end ([`log_reconciles`]), and periodic rounds ([`every`]).

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::Client;
use kube::runtime::controller::Action;
use tracing::debug;

use crate::metrics::Metrics;
use crate::platform::Platform;

/// What every controller talks to: the API server and the platform, and the metrics it
/// keeps.
#[derive(Clone)]
pub struct Connections {
    pub client: Client,
    pub platform: Arc<dyn Platform>,
    pub metrics: Arc<Metrics>,
}

/// Runs a kube-rs controller's result stream to its end (the controller's graceful
/// shutdown). Each result is only logged at debug: a failure is its `error_policy`'s to
/// count and report.
pub async fn log_reconciles<T: Display, E: Display>(
    results: impl Stream<Item = Result<(T, Action), E>>,
    kind: &'static str,
) {
    results
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => debug!(kind, object = %obj, "reconciled"),
                Err(e) => debug!(kind, error = %e, "reconcile error"),
            }
        })
        .await;
}

/// Runs `round` every `period`, the first at once; a round that overruns delays the next
/// instead of bunching them. Runs until its task is aborted.
pub async fn every<F, Fut>(period: Duration, mut round: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        round().await;
    }
}

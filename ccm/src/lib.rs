//! KubeRaya cloud-controller-manager for CloudRaya.
//!
//! - [`platform`]: the CloudRaya platform client ([`platform::Platform`] trait, its HTTP
//!   implementation, and, with the `testing` feature, an in-memory fake for tests).
//! - [`annotations`]: the typed `lb.cloudraya.com/` annotation table.
//! - [`providerid`]: the node provider-ID format (`cloudraya://<vm-id>`).
//! - [`service`]: the LoadBalancer service controller.
//! - [`node`]: the node controller (initialisation, address and label refresh) and the
//!   node lifecycle controller.
//! - [`config`]: the `--cloud-config` file.
//! - [`events`]: Event notes within kube-apiserver's byte limit.
//! - [`metrics`]: Prometheus metrics.
//! - [`watch`]: how watches retry after the API server failed them.
//! - [`backoff`]: exponential backoff with jitter, of every retry.
//! - [`runner`]: what the controllers share to run (connections, loops).
//! - [`run`]: the whole CCM in-process ([`run::start`], [`run::run`]): the platform and
//!   API server checks, `/metrics`, `/healthz`, `/readyz`, the leader election; the
//!   binary and `kuberaya sandbox up` use it.
//!
//! [`Error`] is the crate-wide error of the controllers. [`run_controllers`] runs every
//! controller (what [`run`] runs while it leads).

pub mod annotations;
pub mod backoff;
pub mod config;
pub mod events;
pub mod metrics;
pub mod node;
pub mod platform;
pub mod providerid;
pub mod run;
pub mod runner;
pub use kuberaya_serving as secure_http;
pub mod service;
#[cfg(test)]
pub(crate) mod testing;
pub mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

pub use node::NodeSettings;
pub use service::controller::{Context, RunSettings, error_policy, reconcile};

/// Settings of [`run_controllers`].
#[derive(Debug, Clone)]
pub struct ControllerSettings {
    pub service: service::controller::RunSettings,
    pub node: node::NodeSettings,
}

/// Runs the service controller and the node controllers until `shutdown` resolves (or
/// one of them fails). Call it only on the leader.
pub async fn run_controllers(
    client: kube::Client,
    platform: Arc<dyn platform::Platform>,
    metrics: Arc<metrics::Metrics>,
    settings: ControllerSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let shutdown = shutdown.boxed().shared();
    let connections = runner::Connections {
        client,
        platform,
        metrics,
    };
    tokio::try_join!(
        service::controller::run(connections.clone(), settings.service, shutdown.clone()),
        node::run(connections, settings.node, shutdown),
    )?;
    Ok(())
}

/// Errors of the controllers. Every variant keeps its cause as `#[source]`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),

    /// Adding or removing our finalizer, or the reconcile it wraps, failed.
    #[error("finalizer error: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),

    /// A platform call failed.
    #[error("platform error during {op}: {source}")]
    Platform {
        op: &'static str,
        #[source]
        source: platform::Error,
    },

    /// The platform's LBs for one Service could not be told apart.
    #[error("{0}")]
    Lookup(#[source] service::diff::LookupError),

    /// An object is missing a field we need (e.g. `metadata.namespace`).
    #[error("object is missing {0}")]
    MissingObjectKey(&'static str),

    /// A platform operation is still running; poll again after `retry_after`. Not a
    /// failure: `error_policy` requeues without backoff.
    #[error("{what}; checking again in {}s", retry_after.as_secs())]
    InProgress { what: String, retry_after: Duration },

    /// No VM was found for a Node to initialise.
    #[error("cannot initialise node {node}: {why}")]
    InstanceNotFound { node: String, why: String },

    /// The `--cloud-config` file is unusable.
    #[error("invalid cloud config: {message}")]
    Config {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

/// Result of the controllers.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `map_err` of a platform call: its error as ours, named by the call.
pub(crate) fn platform_err(op: &'static str) -> impl FnOnce(platform::Error) -> Error {
    move |source| Error::Platform { op, source }
}

impl Error {
    /// A short, stable label for metrics (`reconcile_failures{error=...}`).
    pub fn metric_label(&self) -> String {
        match self {
            Error::Kube(_) => "kube".into(),
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.metric_label(),
                _ => "finalizer".into(),
            },
            Error::Platform { source, .. } => format!("platform_{}", source.metric_label()),
            Error::Lookup(service::diff::LookupError::NonUniqueResult { .. }) => "non_unique_result".into(),
            Error::Lookup(service::diff::LookupError::NameTaken { .. }) => "name_taken".into(),
            Error::MissingObjectKey(_) => "missing_object_key".into(),
            Error::InProgress { .. } => "in_progress".into(),
            Error::InstanceNotFound { .. } => "instance_not_found".into(),
            Error::Config { .. } => "config".into(),
        }
    }

    /// The innermost error of ours (through the finalizer wrapper).
    pub fn inner(&self) -> &Error {
        match self {
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.inner(),
                _ => self,
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_labels_see_through_the_finalizer() {
        let e = Error::Finalizer(Box::new(kube::runtime::finalizer::Error::CleanupFailed(
            Error::InProgress {
                what: "x".into(),
                retry_after: Duration::from_secs(2),
            },
        )));
        assert_eq!(e.metric_label(), "in_progress");
        assert!(matches!(e.inner(), Error::InProgress { .. }));
        let p = Error::Platform {
            op: "create_load_balancer",
            source: platform::Error::Conflict { message: "x".into() },
        };
        assert_eq!(p.metric_label(), "platform_conflict");
        assert!(p.to_string().contains("create_load_balancer"));
    }
}

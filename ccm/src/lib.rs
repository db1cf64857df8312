//! KubeRaya cloud-controller-manager for CloudRaya.
//!
//! - [`platform`]: the CloudRaya platform client ([`platform::Platform`] trait, its HTTP
//!   implementation, and an in-memory fake for tests).
//! - [`annotations`]: the typed `lb.cloudraya.com/` annotation table.
//! - [`providerid`]: the node provider-ID format (`cloudraya://<vm-id>`).
//! - [`service`]: the LoadBalancer service controller.
//! - [`config`]: the `--cloud-config` file.
//! - [`metrics`]: Prometheus metrics.
//!
//! [`Error`] is the crate-wide error of the controllers.

pub mod annotations;
pub mod config;
pub mod metrics;
pub mod platform;
pub mod providerid;
pub mod service;

use std::time::Duration;

pub use service::controller::{Context, error_policy, reconcile};

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

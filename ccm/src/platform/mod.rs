//! The CloudRaya platform client.
//!
//! Everything the CCM and the CLI ask of the platform goes through the [`Platform`]
//! trait, so that a correction to our reading of the (non-public) API is a change to this
//! module only. [`HttpPlatform`] implements it over HTTP as `docs/platform-api.md`
//! describes; tests of the controllers can implement it in memory.
//!
//! Layout: `types` (wire types), `labels` (label keys we set), `envelope` (pure answer
//! decoding), `retry` (pure retry policy), `ratelimit` (the shared limiter), `auth`
//! (token renewal decision), `metrics` (counters), `http` (the client itself), and `fake`
//! (an in-memory implementation for reconcile tests), only with the `testing` feature or
//! in this crate's unit tests: test code is not part of the product's API.

pub mod auth;
pub mod envelope;
pub mod error;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod http;
pub mod labels;
pub mod metrics;
pub mod ratelimit;
pub mod retry;
pub mod time;
pub mod types;

use async_trait::async_trait;

pub use error::{Error, FieldError};
pub use http::{HttpPlatform, PlatformClientConfig};
pub use labels::{
    LABEL_CLUSTER_ID, LABEL_RETAIN_PUBLIC_IP, LABEL_SERVICE_NAME, LABEL_SERVICE_NAMESPACE, LABEL_SERVICE_UID,
};
pub use metrics::PlatformMetrics;
pub use ratelimit::TokenBucketConfig;
pub use types::*;

/// Result of platform calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Filters of `GET /vm/v1/instances`; unset fields do not filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceFilter {
    pub region: Option<String>,
    /// An instance matches when it carries every one of these labels.
    pub labels: Labels,
    pub vpc_id: Option<String>,
    pub subnet_id: Option<String>,
}

impl InstanceFilter {
    /// The worker VMs of a cluster (node pools label them with the cluster ID).
    pub fn cluster(cluster_id: impl Into<String>) -> Self {
        InstanceFilter {
            labels: Labels::from([(LABEL_CLUSTER_ID.to_owned(), cluster_id.into())]),
            ..Self::default()
        }
    }
}

/// The platform operations KubeRaya uses. Object-safe, so controllers hold an
/// `Arc<dyn Platform>`.
///
/// List calls return every page. A 404 is [`Error::NotFound`]; callers deleting an
/// object treat it as success.
#[async_trait]
pub trait Platform: Send + Sync {
    /// `GET /kubernetes/v1/clusters/{cluster_id}`.
    async fn get_cluster(&self, cluster_id: &str) -> Result<Cluster>;

    /// `GET /vm/v1/instances`, every page.
    async fn list_instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>>;

    /// `GET /vm/v1/instances/{id}`; a deleted VM is [`Error::NotFound`].
    async fn get_instance(&self, id: &str) -> Result<Instance>;

    /// `GET /network/v1/vpcs/{id}`.
    async fn get_vpc(&self, id: &str) -> Result<Vpc>;

    /// `GET /network/v1/subnets/{id}`.
    async fn get_subnet(&self, id: &str) -> Result<Subnet>;

    /// `GET /network/v1/public-ips?label=k=v...`, every page.
    async fn list_public_ips(&self, labels: &Labels) -> Result<Vec<PublicIp>>;

    /// `GET /network/v1/public-ips/{id}`.
    async fn get_public_ip(&self, id: &str) -> Result<PublicIp>;

    /// `POST /network/v1/public-ips` for one IP `version`; [`Error::Conflict`] when the
    /// region has none of that version left, [`Error::Invalid`] (on `version`) when the
    /// region has no IPv6 pool. Not retried on 5xx or timeouts (it could allocate twice).
    async fn create_public_ip(&self, region: &str, version: IpVersion, labels: &Labels) -> Result<PublicIp>;

    /// `DELETE /network/v1/public-ips/{id}`; [`Error::Conflict`] while attached.
    async fn delete_public_ip(&self, id: &str) -> Result<()>;

    /// `GET /kubernetes/v1/clusters/{cluster_id}/load-balancers?label=k=v...`, every page.
    async fn list_load_balancers(&self, cluster_id: &str, labels: &Labels) -> Result<Vec<LoadBalancer>>;

    /// `GET /kubernetes/v1/clusters/{cluster_id}/load-balancers/{id}`.
    async fn get_load_balancer(&self, cluster_id: &str, id: &str) -> Result<LoadBalancer>;

    /// `POST /kubernetes/v1/clusters/{cluster_id}/load-balancers`: answers at once with
    /// `status: provisioning`. Not retried on 5xx or timeouts: after an unclear failure,
    /// look the LB up by its labels before creating again.
    async fn create_load_balancer(&self, cluster_id: &str, spec: &LoadBalancerSpec) -> Result<LoadBalancer>;

    /// `PUT /kubernetes/v1/clusters/{cluster_id}/load-balancers/{id}`: replaces rules,
    /// backends and labels; answers with `status: updating`. [`Error::Conflict`] while
    /// the LB is provisioning, updating or deleting.
    async fn update_load_balancer(
        &self,
        cluster_id: &str,
        id: &str,
        update: &LoadBalancerUpdate,
    ) -> Result<LoadBalancer>;

    /// `DELETE /kubernetes/v1/clusters/{cluster_id}/load-balancers/{id}[?keep_public_ip=]`:
    /// starts an asynchronous delete (the LB stays `deleting` until `GET` answers 404).
    /// `keep_public_ip: None` keeps the platform's default (release an acquired IP, keep a
    /// reused one).
    async fn delete_load_balancer(&self, cluster_id: &str, id: &str, keep_public_ip: Option<bool>) -> Result<()>;
}

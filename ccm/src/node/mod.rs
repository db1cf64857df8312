//! The node controllers, as k8s.io/cloud-provider's:
//!
//! - [`controller`]: the cloud node controller. Initialises Nodes that carry the
//!   `node.cloudprovider.kubernetes.io/uninitialized` taint (provider ID, addresses,
//!   topology and instance-type labels, then the taint goes), and refreshes addresses and
//!   labels of every Node periodically, so a VM whose private IP changed updates its
//!   Node's `InternalIP` (and, through the service controller's node watch, every load
//!   balancer that targets it).
//! - [`lifecycle`]: the cloud node lifecycle controller. A Node whose VM is gone is
//!   deleted; a Node whose VM is stopped gets the `node.cloudprovider.kubernetes.io/shutdown`
//!   taint, removed when it runs again.
//!
//! [`run`] runs all of it until a shutdown future resolves.

pub mod controller;
pub mod lifecycle;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::api::{Api, Patch, PatchParams};
use tracing::info;

use crate::providerid;
use crate::runner::Connections;
use crate::{Error, Result};

/// The taint a kubelet started with `--cloud-provider=external` registers its Node with.
pub const UNINITIALIZED_TAINT: &str = "node.cloudprovider.kubernetes.io/uninitialized";

/// The taint of a Node whose VM is shut down.
pub const SHUTDOWN_TAINT: &str = "node.cloudprovider.kubernetes.io/shutdown";

/// The well-known topology and instance-type labels.
pub const LABEL_REGION: &str = "topology.kubernetes.io/region";
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
pub const LABEL_INSTANCE_TYPE: &str = "node.kubernetes.io/instance-type";

/// Settings of [`run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    /// The platform cluster; a Node without a provider ID is matched by name among its VMs.
    pub cluster_id: String,
    /// Period of the address and label refresh of every Node
    /// (`--node-status-update-frequency`).
    pub refresh: Duration,
    /// Period of the lifecycle check (`--node-monitor-period`; upstream's is 5 s).
    pub monitor: Duration,
    /// Nodes initialised concurrently.
    pub concurrency: u16,
    /// First retry of a Node whose VM was not found; doubled per failure up to
    /// `max_backoff`, jittered.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl NodeSettings {
    /// Our defaults for a cluster.
    pub fn new(cluster_id: impl Into<String>) -> Self {
        NodeSettings {
            cluster_id: cluster_id.into(),
            refresh: Duration::from_secs(10),
            monitor: Duration::from_secs(5),
            concurrency: 5,
            base_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// Runs the cloud node controller (initialisation and refresh) and the node lifecycle
/// controller until `shutdown` resolves.
pub async fn run(
    connections: Connections,
    settings: NodeSettings,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<()> {
    let ctx = Arc::new(controller::Context::new(
        connections.client,
        connections.platform,
        connections.metrics,
        settings.clone(),
    ));
    let refresh = tokio::spawn(controller::run_refresh(ctx.clone()));
    let monitor = tokio::spawn(lifecycle::run(ctx.clone()));
    info!(
        refresh = ?settings.refresh,
        monitor = ?settings.monitor,
        "node controllers started"
    );
    let res = controller::run_initializer(ctx, shutdown).await;
    refresh.abort();
    monitor.abort();
    res
}

/// Whether the Node carries a taint with this key.
pub fn has_taint(node: &Node, key: &str) -> bool {
    taints(node).iter().any(|t| t.key == key)
}

fn taints(node: &Node) -> &[Taint] {
    node.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or_default()
}

/// The VM ID of a Node whose provider ID is ours.
pub fn our_vm_id(node: &Node) -> Option<String> {
    let pid = node.spec.as_ref()?.provider_id.as_deref()?;
    providerid::parse(pid).ok().map(|p| p.vm_id().to_owned())
}

/// Whether the Node has any provider ID (ours or another provider's).
pub fn has_provider_id(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.provider_id.as_deref())
        .is_some_and(|p| !p.is_empty())
}

/// Whether the Node's `Ready` condition is `True`.
pub fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

fn node_name(node: &Node) -> Result<String> {
    node.metadata
        .name
        .clone()
        .ok_or(Error::MissingObjectKey("metadata.name"))
}

fn patch_error(what: &'static str) -> impl FnOnce(serde_json::Error) -> Error {
    move |e| Error::Config {
        message: format!("building the {what} patch"),
        source: Some(Box::new(e)),
    }
}

/// Removes the taint `key` with a JSON patch that first tests the taint's index, so a
/// concurrent change of the taint list fails the patch instead of removing another taint.
/// `node` may be a cache's stale copy (a reconcile queued by our own write reads the cache
/// before the write's watch event arrives): a failed test re-reads the Node and tries
/// again. Returns whether a taint was removed.
pub async fn remove_taint(api: &Api<Node>, node: &Node, key: &str) -> Result<bool> {
    patch_taints(api, node, "taint removal", |taints| {
        let i = taints.iter().position(|t| t.key == key)?;
        Some(serde_json::json!([
            {"op": "test", "path": format!("/spec/taints/{i}/key"), "value": key},
            {"op": "remove", "path": format!("/spec/taints/{i}")},
        ]))
    })
    .await
}

/// Adds `taint` unless a taint with its key is there (re-reading a stale `node` as
/// [`remove_taint`] does). Returns whether it was added.
pub async fn add_taint(api: &Api<Node>, node: &Node, taint: &Taint) -> Result<bool> {
    let value = serde_json::to_value(taint).map_err(patch_error("taint"))?;
    patch_taints(api, node, "taint", |taints| {
        if taints.iter().any(|t| t.key == taint.key) {
            return None;
        }
        Some(match taints.last() {
            // Absent, as kube-apiserver stores an empty list: `test` for null, then add.
            None => serde_json::json!([
                {"op": "test", "path": "/spec/taints", "value": null},
                {"op": "add", "path": "/spec/taints", "value": [value]},
            ]),
            // The length test makes a concurrent change fail the patch instead of racing it.
            Some(last) => serde_json::json!([
                {"op": "test", "path": format!("/spec/taints/{}/key", taints.len() - 1), "value": last.key},
                {"op": "add", "path": "/spec/taints/-", "value": value},
            ]),
        })
    })
    .await
}

/// How often a taint patch whose `test` failed is planned again on a fresh read.
const TAINT_PATCH_ATTEMPTS: usize = 3;

/// Applies the JSON patch `plan` makes of the Node's taints (`None`: nothing to do). A
/// failed `test` (422) means the Node changed since it was read: it is read again and
/// planned again, at most [`TAINT_PATCH_ATTEMPTS`] times in all.
async fn patch_taints(
    api: &Api<Node>,
    node: &Node,
    what: &'static str,
    plan: impl Fn(&[Taint]) -> Option<serde_json::Value>,
) -> Result<bool> {
    let name = node_name(node)?;
    let mut fresh: Option<Node> = None;
    let mut attempt = 1;
    loop {
        let current = fresh.as_ref().unwrap_or(node);
        let Some(ops) = plan(taints(current)) else {
            return Ok(false);
        };
        let patch: json_patch::Patch = serde_json::from_value(ops).map_err(patch_error(what))?;
        match api
            .patch(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
        {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(s)) if s.code == 422 && attempt < TAINT_PATCH_ATTEMPTS => {
                attempt += 1;
                fresh = Some(api.get(&name).await.map_err(Error::Kube)?);
            }
            Err(e) => return Err(Error::Kube(e)),
        }
    }
}

#[cfg(test)]
pub(crate) mod testing;

//! The cloud node controller, as k8s.io/cloud-provider's `CloudNodeController`.
//!
//! - **Initialisation** ([`reconcile`], a kube-rs controller over Nodes): a Node with the
//!   `uninitialized` taint gets its VM looked up (by provider ID, else by name among the
//!   cluster's VMs), then, in upstream's order, `spec.providerID` and the topology and
//!   instance-type labels, then `status.addresses`, and only then is the taint removed. A
//!   Node whose VM is not found yet gets a Warning Event saying why and is retried with
//!   backoff. Every step is idempotent: a reconcile interrupted half-way is finished by
//!   the next.
//! - **Refresh** ([`refresh_all`], every `--node-status-update-frequency`): every
//!   initialised Node's addresses and labels are brought back in line with its VM (one
//!   list of the cluster's VMs per round), so a changed private IP reaches the Node's
//!   `InternalIP`. As upstream, Nodes still tainted are left to initialisation. Unlike
//!   upstream, an untainted Node without a provider ID whose name is one of the cluster's
//!   VMs gets its provider ID too (a kubelet registered without the taint, or a taint
//!   removed by someone else, would otherwise never become a load-balancer backend).
//!
//! [`metadata_update`] is the pure decision of what to write.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, NodeAddress};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, instrument, warn};

use super::{
    LABEL_INSTANCE_TYPE, LABEL_REGION, LABEL_ZONE, NodeSettings, UNINITIALIZED_TAINT, has_provider_id, has_taint,
    our_vm_id, remove_taint,
};
use crate::backoff::{Backoff, Failures, Jitter};
use crate::events;
use crate::metrics::Metrics;
use crate::platform::{Instance, InstanceFilter, InstanceState, Platform};
use crate::providerid::ProviderId;
use crate::runner::{every, log_reconciles};
use crate::{Error, Result, platform_err};

/// The controller's name in Events and field managers.
pub const CONTROLLER_NAME: &str = "kuberaya-ccm-node-controller";

/// The Event reason of a Node whose VM cannot be found.
pub const REASON_INSTANCE_NOT_FOUND: &str = "InstanceNotFound";

/// What the node controllers see.
pub struct Context {
    pub client: Client,
    pub platform: Arc<dyn Platform>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: NodeSettings,
    /// Consecutive failures per Node, for the backoff.
    pub(crate) failures: Failures,
}

impl Context {
    pub fn new(client: Client, platform: Arc<dyn Platform>, metrics: Arc<Metrics>, settings: NodeSettings) -> Self {
        let failures = Failures::new(Backoff::new(
            settings.base_backoff,
            settings.max_backoff,
            Jitter::PLUS_MINUS_20_PERCENT,
        ));
        Context {
            recorder: events::recorder(client.clone(), CONTROLLER_NAME),
            client,
            platform,
            metrics,
            settings,
            failures,
        }
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }
}

/// What to write to a Node so that it matches its VM. Empty when it matches.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetadataUpdate {
    /// `spec.providerID`, only when the Node has none (it is immutable once set).
    pub provider_id: Option<String>,
    /// Labels to set (only those that differ).
    pub labels: BTreeMap<String, String>,
    /// `status.addresses`, when they differ.
    pub addresses: Option<Vec<NodeAddress>>,
}

impl MetadataUpdate {
    pub fn is_empty(&self) -> bool {
        self.provider_id.is_none() && self.labels.is_empty() && self.addresses.is_none()
    }

    /// The merge patch of the Node object (provider ID and labels), if any.
    pub fn node_patch(&self) -> Option<serde_json::Value> {
        if self.provider_id.is_none() && self.labels.is_empty() {
            return None;
        }
        let mut patch = json!({});
        if !self.labels.is_empty() {
            patch["metadata"] = json!({ "labels": self.labels });
        }
        if let Some(pid) = &self.provider_id {
            patch["spec"] = json!({ "providerID": pid });
        }
        Some(patch)
    }

    /// The merge patch of the Node's status (addresses), if any.
    pub fn status_patch(&self) -> Option<serde_json::Value> {
        self.addresses.as_ref().map(|a| json!({ "status": { "addresses": a } }))
    }
}

fn address(type_: &str, address: impl ToString) -> NodeAddress {
    NodeAddress {
        type_: type_.into(),
        address: address.to_string(),
    }
}

/// The addresses a Node of this VM has: `InternalIP` (private IP, then private IPv6 if
/// any: the IPv4 one first, so that what reads only the first `InternalIP` sees what it
/// saw before dual-stack), `ExternalIP` (public IP, if any), `Hostname` (the Node's
/// existing hostname address, else its name).
pub fn desired_addresses(node: &Node, vm: &Instance) -> Vec<NodeAddress> {
    let mut out = Vec::new();
    if let Some(ip) = vm.private_ip {
        out.push(address("InternalIP", ip));
    }
    if let Some(ip) = vm.private_ipv6 {
        out.push(address("InternalIP", ip));
    }
    if let Some(ip) = vm.public_ip {
        out.push(address("ExternalIP", ip));
    }
    let hostname = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .and_then(|a| a.iter().find(|a| a.type_ == "Hostname"))
        .map(|a| a.address.clone())
        .or_else(|| node.metadata.name.clone());
    if let Some(h) = hostname {
        out.push(address("Hostname", h));
    }
    out
}

/// What to write to `node` so that it matches `vm` (pure). A VM without a private IP of
/// either family yet leaves the addresses alone (never an address list without
/// `InternalIP`).
pub fn metadata_update(node: &Node, vm: &Instance) -> MetadataUpdate {
    let provider_id = (!has_provider_id(node)).then(|| ProviderId::new(vm.id.clone()).to_string());
    let current = node.metadata.labels.clone().unwrap_or_default();
    let labels = [
        (LABEL_REGION, &vm.region),
        (LABEL_ZONE, &vm.zone),
        (LABEL_INSTANCE_TYPE, &vm.package),
    ]
    .into_iter()
    .filter(|(k, v)| !v.is_empty() && current.get(*k) != Some(*v))
    .map(|(k, v)| (k.to_owned(), v.clone()))
    .collect();
    let has_private = vm.private_ip.is_some() || vm.private_ipv6.is_some();
    let addresses = if has_private {
        let want = desired_addresses(node, vm);
        let have = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.clone())
            .unwrap_or_default();
        (have != want).then_some(want)
    } else {
        None
    };
    MetadataUpdate {
        provider_id,
        labels,
        addresses,
    }
}

/// Why no VM was found for a Node (the text of the Warning Event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotFound(pub String);

/// The VM of `node` among `vms` (the cluster's VMs): by provider ID, else, for a Node
/// without one, by name. `Err` says why there is none. A VM the platform reports
/// deleted does not count.
pub fn pick_vm<'a>(node: &Node, vms: &'a [Instance]) -> Result<&'a Instance, NotFound> {
    let name = node.name_any();
    let found: Vec<&Instance> = match our_vm_id(node) {
        Some(id) => vms.iter().filter(|vm| vm.id == id).collect(),
        None if has_provider_id(node) => {
            return Err(NotFound(format!(
                "node {name} has provider ID {:?}, which is not a CloudRaya VM",
                node.spec
                    .as_ref()
                    .and_then(|s| s.provider_id.clone())
                    .unwrap_or_default()
            )));
        }
        None => vms.iter().filter(|vm| vm.name == name).collect(),
    };
    let found: Vec<&Instance> = found
        .into_iter()
        .filter(|vm| vm.state != InstanceState::Deleted)
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(NotFound(match our_vm_id(node) {
            Some(id) => format!("VM {id} of node {name} does not exist"),
            None => format!("no VM named {name} in this cluster"),
        })),
        many => Err(NotFound(format!(
            "{} VMs are named {name} in this cluster ({}); set the node's provider ID",
            many.len(),
            many.iter().map(|vm| vm.id.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Looks the VM of one Node up: `get_instance` by provider ID, else the cluster's VMs
/// by name. `Ok(Err(..))`: no such VM (and why).
pub async fn find_vm(ctx: &Context, node: &Node) -> Result<Result<Instance, NotFound>> {
    if let Some(id) = our_vm_id(node) {
        return match ctx.platform.get_instance(&id).await {
            Ok(vm) => Ok(pick_vm(node, std::slice::from_ref(&vm)).cloned()),
            Err(e) if e.is_not_found() => Ok(Err(NotFound(format!(
                "VM {id} of node {} does not exist",
                node.name_any()
            )))),
            Err(e) => Err(platform_err("get_instance")(e)),
        };
    }
    let vms = cluster_vms(ctx).await?;
    Ok(pick_vm(node, &vms).cloned())
}

async fn cluster_vms(ctx: &Context) -> Result<Vec<Instance>> {
    ctx.platform
        .list_instances(&InstanceFilter::cluster(ctx.settings.cluster_id.clone()))
        .await
        .map_err(platform_err("list_instances"))
}

/// Writes `update` to the Node: the object (provider ID, labels), then its status
/// (addresses). Returns whether anything was written.
async fn write_metadata(api: &Api<Node>, name: &str, update: &MetadataUpdate) -> Result<bool> {
    let pp = PatchParams::default();
    if let Some(p) = update.node_patch() {
        api.patch(name, &pp, &Patch::Merge(&p)).await.map_err(Error::Kube)?;
    }
    if let Some(p) = update.status_patch() {
        api.patch_status(name, &pp, &Patch::Merge(&p))
            .await
            .map_err(Error::Kube)?;
    }
    Ok(!update.is_empty())
}

async fn publish(ctx: &Context, node: &Node, type_: EventType, reason: &str, note: String) {
    events::publish(
        &ctx.recorder,
        &events::event(type_, reason, &note),
        &node.object_ref(&()),
    )
    .await;
}

/// Initialises one Node (see the module docs); Nodes without the taint are left to the
/// refresh.
#[instrument(skip(node, ctx), fields(node = %node.name_any()))]
pub async fn reconcile(node: Arc<Node>, ctx: Arc<Context>) -> Result<Action> {
    if !has_taint(&node, UNINITIALIZED_TAINT) || node.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let name = node.name_any();
    let vm = match find_vm(&ctx, &node).await? {
        Ok(vm) => vm,
        Err(NotFound(why)) => {
            publish(&ctx, &node, EventType::Warning, REASON_INSTANCE_NOT_FOUND, why.clone()).await;
            return Err(Error::InstanceNotFound { node: name, why });
        }
    };
    let api = ctx.nodes();
    let update = metadata_update(&node, &vm);
    write_metadata(&api, &name, &update).await?;
    remove_taint(&api, &node, UNINITIALIZED_TAINT).await?;
    ctx.metrics.nodes_initialized.inc();
    ctx.failures.clear(&name);
    info!(vm = %vm.id, provider_id = ?update.provider_id, "node initialised");
    Ok(Action::await_change())
}

/// Retries with exponential backoff and jitter, per Node.
pub fn error_policy(node: Arc<Node>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.record_node_failure(error);
    let (failures, delay) = ctx.failures.record(node.name_any());
    warn!(node = %node.name_any(), error = %error, failures, ?delay, "node initialisation failed");
    Action::requeue(delay)
}

/// One refresh round over `nodes`: each initialised Node's addresses and labels (and a
/// missing provider ID) brought in line with its VM. Returns how many Nodes changed.
pub async fn refresh_nodes(ctx: &Context, nodes: &[Node]) -> Result<usize> {
    let mut vms = cluster_vms(ctx).await?;
    let api = ctx.nodes();
    let mut changed = 0;
    for node in nodes {
        if has_taint(node, UNINITIALIZED_TAINT) || node.metadata.deletion_timestamp.is_some() {
            continue;
        }
        // A Node of ours whose VM lacks the cluster label: look it up by ID.
        if let Some(id) = our_vm_id(node)
            && !vms.iter().any(|vm| vm.id == id)
        {
            match ctx.platform.get_instance(&id).await {
                Ok(vm) => vms.push(vm),
                Err(e) if e.is_not_found() => continue,
                Err(e) => {
                    warn!(node = %node.name_any(), error = %e, "refresh: cannot look the VM up");
                    continue;
                }
            }
        }
        let Ok(vm) = pick_vm(node, &vms) else { continue };
        let update = metadata_update(node, vm);
        if update.is_empty() {
            continue;
        }
        match write_metadata(&api, &node.name_any(), &update).await {
            Ok(_) => {
                changed += 1;
                ctx.metrics.node_updates.inc();
                info!(node = %node.name_any(), vm = %vm.id, ?update, "node refreshed from its VM");
            }
            Err(e) => warn!(node = %node.name_any(), error = %e, "refresh: cannot update the node"),
        }
    }
    Ok(changed)
}

/// One refresh round over every Node (freshly listed).
pub async fn refresh_all(ctx: &Context) -> Result<usize> {
    let nodes = ctx.nodes().list(&ListParams::default()).await.map_err(Error::Kube)?;
    refresh_nodes(ctx, &nodes.items).await
}

/// The refresh loop (every `settings.refresh`).
pub async fn run_refresh(ctx: Arc<Context>) {
    every(ctx.settings.refresh, || async {
        match refresh_all(&ctx).await {
            Ok(0) => debug!("node refresh: nothing changed"),
            Ok(n) => info!(changed = n, "node refresh"),
            Err(e) => warn!(error = %e, "node refresh failed"),
        }
    })
    .await;
}

/// Runs the initialisation controller until `shutdown` resolves.
pub async fn run_initializer(
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<()> {
    let nodes = ctx.nodes();
    let concurrency = ctx.settings.concurrency.max(1);
    let results = Controller::new(nodes, watcher::Config::default().any_semantic())
        .trigger_backoff(crate::watch::WatchBackoff::default())
        .with_config(ControllerConfig::default().concurrency(concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx);
    log_reconciles(results, "node").await;
    Ok(())
}

#[cfg(test)]
mod tests;

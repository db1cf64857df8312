//! Node agents: one per worker VM of the cluster, doing what a kubelet started with
//! `--cloud-provider=external` does for its Node.
//!
//! - registers a `Node` named after the VM, with the taint
//!   `node.cloudprovider.kubernetes.io/uninitialized:NoSchedule` and a `spec.podCIDR`
//!   (the node IPAM controller's part) from the pod range;
//! - never sets `providerID` or addresses: that is the CCM's job. With `no_ccm` the agent
//!   plays that part itself: it removes the taint and keeps the InternalIP current;
//! - renews its `Lease` in `kube-node-lease` and keeps the `Ready` condition fresh while the
//!   VM runs; reports `Ready=False` as soon as the VM is stopped (sooner than a real node
//!   lifecycle controller would notice, which the tests rely on);
//! - when the VM is deleted, leaves the Node to the CCM's node lifecycle controller (or,
//!   with `no_ccm`, deletes it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeSpec, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Context, Result, UNINITIALIZED_TAINT, VM_ID_ANNOTATION, Vm, is_conflict, is_not_found, now};

const LEASE_NAMESPACE: &str = "kube-node-lease";
const LEASE_DURATION_S: i32 = 40;
/// Node status goes out every this many heartbeats (and at once on a change).
const STATUS_EVERY: u32 = 5;
const KUBELET_VERSION: &str = "v1.32.0-sandbox";
const FIELD_MANAGER: &str = "kuberaya-sandbox-kubelet";

/// A node of this cluster as its agent sees it: its VM, and what its Node says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    pub name: String,
    pub vm_id: String,
    /// The VM runs (so do the node's kubelet, kube-proxy and pods).
    pub running: bool,
    /// The Node's InternalIP once set (by the CCM), the VM's private IP before.
    pub ip: Ipv4Addr,
    /// `spec.podCIDR`, once the agent has registered the Node.
    pub pod_cidr: Option<Ipv4Net>,
    /// The Node's IPv6 InternalIP once set, the VM's private IPv6 before (dual-stack).
    pub ipv6: Option<Ipv6Addr>,
    /// The IPv6 range of `spec.podCIDRs` (dual-stack).
    pub pod_cidr_v6: Option<Ipv6Net>,
    /// The Node object exists.
    pub registered: bool,
}

impl LocalNode {
    pub fn new(vm: &Vm, node: Option<&Node>) -> Self {
        Self {
            name: vm.name.clone(),
            vm_id: vm.id.clone(),
            running: vm.running(),
            ip: node_ip(node, vm),
            pod_cidr: node
                .and_then(|n| n.spec.as_ref())
                .and_then(|s| s.pod_cidr.as_deref())
                .and_then(|c| c.parse().ok()),
            ipv6: node_ipv6(node, vm),
            pod_cidr_v6: node
                .and_then(|n| n.spec.as_ref())
                .and_then(|s| s.pod_cidrs.as_ref())
                .and_then(|cs| cs.iter().find_map(|c| c.parse().ok())),
            registered: node.is_some(),
        }
    }
}

fn internal_ips(node: Option<&Node>) -> impl Iterator<Item = &str> {
    node.and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .map(|a| a.address.as_str())
}

/// The address the node's processes use: its InternalIP when set, else the VM's private IP.
pub fn node_ip(node: Option<&Node>, vm: &Vm) -> Ipv4Addr {
    internal_ips(node).find_map(|a| a.parse().ok()).unwrap_or(vm.private_ip)
}

/// The node's IPv6 address: its IPv6 InternalIP when set, else the VM's private IPv6.
pub fn node_ipv6(node: Option<&Node>, vm: &Vm) -> Option<Ipv6Addr> {
    internal_ips(node).find_map(|a| a.parse().ok()).or(vm.private_ipv6)
}

fn has_internal_ip(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .is_some_and(|a| a.iter().any(|a| a.type_ == "InternalIP"))
}

/// A /24 of `range` not in `taken`: the `preferred`-th when free (so that node `i` gets
/// `x.y.i.0/24` whatever order the agents register in), else the first free one from the
/// second on.
pub fn free_pod_cidr(range: Ipv4Net, taken: &BTreeSet<Ipv4Net>, preferred: usize) -> Option<Ipv4Net> {
    let mut subnets = range.subnets(24).ok()?;
    if preferred > 0
        && let Some(net) = subnets.clone().nth(preferred)
        && !taken.contains(&net)
    {
        return Some(net);
    }
    subnets.by_ref().next();
    subnets.find(|net| !taken.contains(net))
}

/// The IPv6 pod range of the node whose IPv4 pod range is `v4` (the `i`-th /24 of
/// `v4_range`): the `i`-th /64 of `v6_range` (kube-controller-manager's default IPv6 node
/// mask), so `127.244.3.0/24` pairs with `fd00:244:0:3::/64`.
pub fn paired_pod_cidr_v6(v4: Ipv4Net, v4_range: Ipv4Net, v6_range: Ipv6Net) -> Option<Ipv6Net> {
    let index = (u32::from(v4.network()).checked_sub(u32::from(v4_range.network()))? >> 8) as u128;
    if v6_range.prefix_len() > 64 || index >> (64 - v6_range.prefix_len()) != 0 {
        return None;
    }
    Ipv6Net::new(Ipv6Addr::from(u128::from(v6_range.network()) + (index << 64)), 64).ok()
}

/// The Node's `spec.podCIDRs`: IPv4, then IPv6 in a dual-stack cluster.
fn pod_cidrs(v4: Ipv4Net, v6: Option<Ipv6Net>) -> Vec<String> {
    std::iter::once(v4.to_string())
        .chain(v6.map(|c| c.to_string()))
        .collect()
}

/// Whether the Node's `Ready` condition is `True`.
pub fn is_ready(node: &Node) -> bool {
    ready_condition(node).is_some_and(|c| c.status == "True")
}

fn ready_condition(node: &Node) -> Option<&NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

/// A Node as a kubelet registers it (with the node IPAM controller's pod ranges).
pub fn new_node(vm: &Vm, pod_cidr: Ipv4Net, pod_cidr_v6: Option<Ipv6Net>) -> Node {
    let labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), vm.name.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), "amd64".to_string()),
        ("beta.kubernetes.io/os".to_string(), "linux".to_string()),
        ("beta.kubernetes.io/arch".to_string(), "amd64".to_string()),
    ]);
    Node {
        metadata: ObjectMeta {
            name: Some(vm.name.clone()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(VM_ID_ANNOTATION.to_string(), vm.id.clone())])),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(pod_cidr.to_string()),
            pod_cidrs: Some(pod_cidrs(pod_cidr, pod_cidr_v6)),
            taints: Some(vec![Taint {
                key: UNINITIALIZED_TAINT.to_string(),
                value: Some("true".to_string()),
                effect: "NoSchedule".to_string(),
                time_added: None,
            }]),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

/// The conditions a kubelet reports: `Ready` per `running`, no pressure. A condition
/// keeps its `lastTransitionTime` unless its status changes.
pub fn conditions(node: Option<&Node>, running: bool, now: &Time) -> Vec<NodeCondition> {
    let old = |t: &str| {
        node.and_then(|n| n.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == t).cloned())
    };
    let make = |type_: &str, status: &str, reason: &str, message: &str| {
        let transition = old(type_)
            .filter(|c| c.status == status)
            .and_then(|c| c.last_transition_time)
            .unwrap_or_else(|| now.clone());
        NodeCondition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: Some(reason.to_string()),
            message: Some(message.to_string()),
            last_heartbeat_time: Some(now.clone()),
            last_transition_time: Some(transition),
        }
    };
    let ready = if running {
        make("Ready", "True", "KubeletReady", "kubelet is posting ready status")
    } else {
        make("Ready", "False", "VMStopped", "the node's VM is not running")
    };
    vec![
        make(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
        ),
        make(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure",
        ),
        make(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available",
        ),
        ready,
    ]
}

/// The taints without the `uninitialized` one; `None` when it is not there.
pub fn without_uninitialized(taints: &[Taint]) -> Option<Vec<Taint>> {
    if !taints.iter().any(|t| t.key == UNINITIALIZED_TAINT) {
        return None;
    }
    Some(
        taints
            .iter()
            .filter(|t| t.key != UNINITIALIZED_TAINT)
            .cloned()
            .collect(),
    )
}

/// Pod ranges handed out (node name → range), so agents registering at once never share.
type PodCidrs = Arc<Mutex<HashMap<String, Ipv4Net>>>;

/// Keeps one agent running per VM of the cluster.
pub(crate) async fn run(ctx: Arc<Context>, tasks: TaskTracker) {
    let cidrs: PodCidrs = Arc::default();
    let mut agents: HashMap<String, CancellationToken> = HashMap::new();
    let mut vms = ctx.vms.subscribe();
    loop {
        let current: Vec<Vm> = vms.borrow_and_update().clone();
        agents.retain(|_, token| !token.is_cancelled());
        for vm in current {
            if agents.contains_key(&vm.id) {
                continue;
            }
            let token = ctx.cancel.child_token();
            agents.insert(vm.id.clone(), token.clone());
            tracing::info!(node = %vm.name, vm_id = %vm.id, "node agent started");
            tasks.spawn(agent(ctx.clone(), vm, cidrs.clone(), token));
        }
        tokio::select! {
            _ = ctx.cancel.cancelled() => break,
            _ = vms.changed() => {}
        }
    }
}

/// What one agent remembers between heartbeats.
struct AgentState {
    last_running: Option<bool>,
    last_status: Option<Instant>,
}

async fn agent(ctx: Arc<Context>, vm: Vm, cidrs: PodCidrs, token: CancellationToken) {
    let mut vms = ctx.vms.subscribe();
    let mut state = AgentState {
        last_running: None,
        last_status: None,
    };
    let (vm_id, name) = (vm.id.clone(), vm.name.clone());
    loop {
        let vm = vms.borrow_and_update().iter().find(|v| v.id == vm_id).cloned();
        let Some(vm) = vm else {
            if let Err(e) = vm_gone(&ctx, &name).await {
                tracing::warn!(node = %name, error = %e, "cleaning up after a deleted VM failed");
            }
            tracing::info!(node = %name, vm_id = %vm_id, "VM deleted: node agent stopped");
            break;
        };
        if let Err(e) = heartbeat(&ctx, &vm, &cidrs, &mut state).await {
            tracing::warn!(node = %name, error = %e, "node heartbeat failed");
        }
        tokio::select! {
            _ = token.cancelled() => break,
            _ = tokio::time::sleep(ctx.options.heartbeat) => {}
            _ = vms.changed() => {}
        }
    }
    token.cancel();
}

async fn heartbeat(ctx: &Context, vm: &Vm, cidrs: &PodCidrs, state: &mut AgentState) -> Result<()> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let node = match api.get_opt(&vm.name).await? {
        Some(node) => node,
        None => register(ctx, &api, vm, cidrs).await?,
    };
    let pp = PatchParams::default();
    let spec = node.spec.clone().unwrap_or_default();
    if spec.pod_cidr.is_none() {
        let cidr = allocate_cidr(ctx, cidrs, &vm.name)?;
        let patch = json!({"spec": {"podCIDR": cidr.to_string(), "podCIDRs": pod_cidrs(cidr, v6_cidr(ctx, cidr))}});
        api.patch(&vm.name, &pp, &Patch::Merge(patch)).await?;
    }
    if ctx.options.no_ccm {
        if let Some(taints) = without_uninitialized(spec.taints.as_deref().unwrap_or_default()) {
            api.patch(&vm.name, &pp, &Patch::Merge(json!({"spec": {"taints": taints}})))
                .await?;
            tracing::info!(node = %vm.name, "no CCM: removed the uninitialized taint");
        }
        // As the CCM's node controller: the VM's private IPs (IPv4 first), kept current.
        if node_ip(Some(&node), vm) != vm.private_ip
            || node_ipv6(Some(&node), vm) != vm.private_ipv6
            || !has_internal_ip(&node)
        {
            let mut addresses = vec![json!({"type": "InternalIP", "address": vm.private_ip.to_string()})];
            if let Some(v6) = vm.private_ipv6 {
                addresses.push(json!({"type": "InternalIP", "address": v6.to_string()}));
            }
            addresses.push(json!({"type": "Hostname", "address": vm.name}));
            api.patch_status(
                &vm.name,
                &pp,
                &Patch::Merge(json!({"status": {"addresses": addresses}})),
            )
            .await?;
        }
    }
    let running = vm.running();
    if running {
        renew_lease(ctx, &node).await?;
    }
    let ready_now = is_ready(&node);
    let due = state
        .last_status
        .is_none_or(|t| t.elapsed() >= ctx.options.heartbeat * STATUS_EVERY);
    if state.last_running != Some(running) || ready_now != running || (running && due) {
        let status = json!({"status": {
            "conditions": conditions(Some(&node), running, &now()),
            "nodeInfo": {
                "architecture": "amd64", "operatingSystem": "linux", "osImage": "KubeRaya sandbox",
                "kernelVersion": "sandbox", "kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": KUBELET_VERSION,
                "containerRuntimeVersion": "sandbox://1.0", "machineID": vm.id, "systemUUID": vm.id, "bootID": vm.id,
            },
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110", "ephemeral-storage": "20Gi"},
            "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110", "ephemeral-storage": "20Gi"},
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        }});
        api.patch_status(&vm.name, &pp, &Patch::Merge(status)).await?;
        if state.last_running != Some(running) {
            tracing::info!(node = %vm.name, ready = running, "node status");
            let (reason, note) = if running {
                ("NodeReady", format!("Node {} status is now: NodeReady", vm.name))
            } else {
                (
                    "NodeNotReady",
                    format!("Node {} status is now: NodeNotReady (its VM is {})", vm.name, vm.state),
                )
            };
            super::record(&ctx.client, "kubelet", &node, !running, reason, note).await;
        }
        state.last_running = Some(running);
        state.last_status = Some(Instant::now());
    }
    Ok(())
}

fn allocate_cidr(ctx: &Context, cidrs: &PodCidrs, name: &str) -> Result<Ipv4Net> {
    let mut held = cidrs.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(c) = held.get(name) {
        return Ok(*c);
    }
    let mut taken: BTreeSet<Ipv4Net> = held.values().copied().collect();
    for node in ctx.nodes.state() {
        if let Some(c) = node
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidr.as_deref())
            .and_then(|c| c.parse().ok())
        {
            taken.insert(c);
        }
    }
    // Node i is the i-th VM by name (w1 → 1), as long as that range is free.
    let mut names: Vec<String> = ctx.vms.borrow().iter().map(|vm| vm.name.clone()).collect();
    names.sort();
    let preferred = names.iter().position(|n| n == name).map_or(0, |i| i + 1);
    let cidr = free_pod_cidr(ctx.options.pod_cidr, &taken, preferred)
        .ok_or_else(|| super::Error::Options(format!("pod range {} is exhausted", ctx.options.pod_cidr)))?;
    held.insert(name.to_string(), cidr);
    Ok(cidr)
}

/// The IPv6 pod range paired with `v4`, in a dual-stack cluster.
fn v6_cidr(ctx: &Context, v4: Ipv4Net) -> Option<Ipv6Net> {
    paired_pod_cidr_v6(v4, ctx.options.pod_cidr, ctx.options.pod_cidr_v6?)
}

async fn register(ctx: &Context, api: &Api<Node>, vm: &Vm, cidrs: &PodCidrs) -> Result<Node> {
    let cidr = allocate_cidr(ctx, cidrs, &vm.name)?;
    match api
        .create(&PostParams::default(), &new_node(vm, cidr, v6_cidr(ctx, cidr)))
        .await
    {
        Ok(node) => {
            tracing::info!(node = %vm.name, pod_cidr = %cidr, "node registered");
            Ok(node)
        }
        Err(e) if is_conflict(&e) => Ok(api.get(&vm.name).await?),
        Err(e) => Err(e.into()),
    }
}

async fn renew_lease(ctx: &Context, node: &Node) -> Result<()> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), LEASE_NAMESPACE);
    let renew = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let patch = json!({"spec": {"renewTime": renew, "holderIdentity": name}});
    match api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => {
            let owner = node.metadata.uid.clone().map(|uid| {
                vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: name.clone(),
                    uid,
                    ..Default::default()
                }]
            });
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(LEASE_NAMESPACE.into()),
                    owner_references: owner,
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(name.clone()),
                    lease_duration_seconds: Some(LEASE_DURATION_S),
                    renew_time: Some(renew),
                    ..LeaseSpec::default()
                }),
            };
            match api
                .create(
                    &PostParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &lease,
                )
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if is_conflict(&e) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// The VM is gone: the kubelet with it. The Node goes `NotReady`; deleting it is the CCM's
/// node lifecycle controller's job, or ours without a CCM.
async fn vm_gone(ctx: &Context, name: &str) -> Result<()> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    if ctx.options.no_ccm {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(node = %name, "no CCM: deleted the Node of a deleted VM"),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
        let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), LEASE_NAMESPACE);
        match leases.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(());
    }
    let Some(node) = api.get_opt(name).await? else {
        return Ok(());
    };
    let mut conds = conditions(Some(&node), false, &now());
    if let Some(ready) = conds.iter_mut().find(|c| c.type_ == "Ready") {
        ready.reason = Some("VMDeleted".into());
        ready.message = Some("the node's VM was deleted".into());
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": conds}})),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    fn vm(name: &str, state: &str, ip: [u8; 4]) -> Vm {
        Vm {
            id: format!("vm-{name}"),
            name: name.into(),
            state: state.into(),
            private_ip: Ipv4Addr::from(ip),
            private_ipv6: None,
            labels: BTreeMap::new(),
        }
    }

    fn with_status(mut node: Node, status: NodeStatus) -> Node {
        node.status = Some(status);
        node
    }

    #[test]
    fn registers_as_an_external_cloud_provider_kubelet() {
        let cidr: Ipv4Net = "127.244.1.0/24".parse().unwrap();
        let node = new_node(&vm("w1", "running", [127, 10, 0, 2]), cidr, None);
        assert_eq!(node.metadata.name.as_deref(), Some("w1"));
        let spec = node.spec.unwrap();
        let taints = spec.taints.unwrap();
        assert_eq!(taints.len(), 1);
        assert_eq!(
            (taints[0].key.as_str(), taints[0].effect.as_str()),
            (UNINITIALIZED_TAINT, "NoSchedule")
        );
        assert_eq!(spec.provider_id, None, "the CCM sets providerID");
        assert!(node.status.is_none(), "no addresses: the CCM sets them");
        assert_eq!(spec.pod_cidr.as_deref(), Some("127.244.1.0/24"));
    }

    #[test]
    fn node_ip_prefers_the_internal_ip_set_by_the_ccm() {
        let v = vm("w1", "running", [127, 10, 0, 2]);
        assert_eq!(node_ip(None, &v), Ipv4Addr::new(127, 10, 0, 2));
        let node = with_status(
            new_node(&v, "127.244.1.0/24".parse().unwrap(), None),
            NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: "w1".into(),
                    },
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: "127.10.0.9".into(),
                    },
                ]),
                ..Default::default()
            },
        );
        assert_eq!(node_ip(Some(&node), &v), Ipv4Addr::new(127, 10, 0, 9));
    }

    #[test]
    fn pod_cidrs_are_distinct_24s_from_the_second() {
        let range: Ipv4Net = "127.244.0.0/16".parse().unwrap();
        let mut taken = BTreeSet::new();
        let a = free_pod_cidr(range, &taken, 0).unwrap();
        assert_eq!(a.to_string(), "127.244.1.0/24");
        taken.insert(a);
        assert_eq!(
            free_pod_cidr(range, &taken, 3).unwrap().to_string(),
            "127.244.3.0/24",
            "the preferred one"
        );
        taken.insert("127.244.3.0/24".parse().unwrap());
        assert_eq!(
            free_pod_cidr(range, &taken, 3).unwrap().to_string(),
            "127.244.2.0/24",
            "taken: the first free"
        );
        let tiny: Ipv4Net = "127.50.0.0/23".parse().unwrap();
        taken.insert("127.50.1.0/24".parse().unwrap());
        assert_eq!(free_pod_cidr(tiny, &taken, 1), None);
    }

    #[test]
    fn ready_follows_the_vm_and_transition_time_only_moves_on_change() {
        let v = vm("w1", "running", [127, 10, 0, 2]);
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap());
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(2_000).unwrap());
        let first = conditions(None, true, &t0);
        let node = with_status(
            new_node(&v, "127.244.1.0/24".parse().unwrap(), None),
            NodeStatus {
                conditions: Some(first),
                ..Default::default()
            },
        );
        assert!(is_ready(&node));
        let again = conditions(Some(&node), true, &t1);
        let ready = again.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.last_transition_time, Some(t0.clone()));
        assert_eq!(ready.last_heartbeat_time, Some(t1.clone()));
        let stopped = conditions(Some(&node), false, &t1);
        let ready = stopped.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.last_transition_time, Some(t1));
    }

    #[test]
    fn without_ccm_only_the_uninitialized_taint_goes() {
        let other = Taint {
            key: "dedicated".into(),
            value: Some("x".into()),
            effect: "NoSchedule".into(),
            time_added: None,
        };
        let node = new_node(
            &vm("w1", "running", [127, 10, 0, 2]),
            "127.244.1.0/24".parse().unwrap(),
            None,
        );
        let mut taints = node.spec.unwrap().taints.unwrap();
        taints.push(other.clone());
        assert_eq!(without_uninitialized(&taints), Some(vec![other.clone()]));
        assert_eq!(without_uninitialized(&[other]), None);
    }

    #[test]
    fn local_node_from_vm_and_node() {
        let v = vm("w2", "stopped", [127, 10, 0, 3]);
        let ln = LocalNode::new(&v, None);
        assert!(!ln.running && !ln.registered && ln.pod_cidr.is_none());
        let node = new_node(&v, "127.244.2.0/24".parse().unwrap(), None);
        let ln = LocalNode::new(&v, Some(&node));
        assert!(ln.registered);
        assert_eq!(ln.pod_cidr, Some("127.244.2.0/24".parse().unwrap()));
        assert_eq!(ln.ip, Ipv4Addr::new(127, 10, 0, 3));
    }

    #[test]
    fn ipv6_pod_ranges_pair_with_the_ipv4_ones() {
        let v4: Ipv4Net = "127.244.0.0/16".parse().unwrap();
        let v6: Ipv6Net = "fd00:244::/48".parse().unwrap();
        let pair = |c: &str| paired_pod_cidr_v6(c.parse().unwrap(), v4, v6).map(|n| n.to_string());
        assert_eq!(pair("127.244.3.0/24").as_deref(), Some("fd00:244:0:3::/64"));
        assert_eq!(pair("127.244.255.0/24").as_deref(), Some("fd00:244:0:ff::/64"));
        assert_eq!(pair("127.243.0.0/24"), None, "outside the IPv4 range");
        let node = new_node(
            &vm("w1", "running", [127, 10, 0, 2]),
            "127.244.1.0/24".parse().unwrap(),
            Some("fd00:244:0:1::/64".parse().unwrap()),
        );
        let spec = node.spec.unwrap();
        assert_eq!(spec.pod_cidr.as_deref(), Some("127.244.1.0/24"));
        assert_eq!(
            spec.pod_cidrs,
            Some(vec!["127.244.1.0/24".to_string(), "fd00:244:0:1::/64".to_string()])
        );
    }
}

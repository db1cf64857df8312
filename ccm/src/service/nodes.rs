//! Which nodes back a load balancer, and when a node change is worth re-syncing every
//! load balancer.
//!
//! Like k8s.io/cloud-provider's service controller since its stable node set (GA in
//! 1.30), readiness is left to the load balancer's health checks: a node going NotReady
//! or Ready again rewrites no load balancer. A node is a backend when it
//! - carries a provider ID of ours (`cloudraya://<vm-id>`),
//! - is not being deleted,
//! - lacks the `ToBeDeletedByClusterAutoscaler` taint,
//! - is not labelled `node.kubernetes.io/exclude-from-external-load-balancers` (any value
//!   but `false` excludes, as upstream),
//! - and matches the Service's node selector annotation, if any.
//!
//! Address families ([`can_serve`]): the platform takes backends by VM and fills in their
//! `private_ip` and `private_ipv6` itself. An IPv6-only load balancer can only send to
//! VMs with an IPv6 address, so its backends are the nodes with an IPv6 `InternalIP`. An
//! IPv4 or dual-stack load balancer keeps every eligible node (as before dual-stack):
//! the platform sends IPv6 clients only to backends with a `private_ipv6`, and health
//! checks stay on `private_ip`, so a node without IPv6 still serves the IPv4 address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::Store;
use tokio::time::Instant;

use crate::annotations::NodeSelector;
use crate::platform::IpVersion;
use crate::providerid;

/// Nodes with this label (unless its value is `false`) are never backends.
pub const EXCLUDE_FROM_LB_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// The cluster autoscaler's taint on nodes it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

fn labels(node: &Node) -> BTreeMap<String, String> {
    node.metadata.labels.clone().unwrap_or_default()
}

/// Not excluded by label (upstream `nodeIncludedPredicate`: an unparsable value excludes).
pub fn is_included(node: &Node) -> bool {
    match node.metadata.labels.as_ref().and_then(|l| l.get(EXCLUDE_FROM_LB_LABEL)) {
        None => true,
        Some(v) => v.trim().eq_ignore_ascii_case("false"),
    }
}

/// Not tainted for deletion by the cluster autoscaler.
pub fn is_untainted(node: &Node) -> bool {
    !node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}

/// Not being deleted.
pub fn is_not_deleted(node: &Node) -> bool {
    node.metadata.deletion_timestamp.is_none()
}

/// The VM ID of a node whose provider ID is ours.
pub fn vm_id(node: &Node) -> Option<String> {
    let pid = node.spec.as_ref()?.provider_id.as_deref()?;
    providerid::parse(pid).ok().map(|p| p.vm_id().to_owned())
}

/// The VM ID when the node passes every stable-node-set predicate (selector aside).
pub fn eligible_vm_id(node: &Node) -> Option<String> {
    if is_not_deleted(node) && is_included(node) && is_untainted(node) {
        vm_id(node)
    } else {
        None
    }
}

/// The platform takes at most this many backends per load balancer (docs/platform-api.md:
/// a PUT with more is refused with a 422).
pub const MAX_BACKENDS: usize = 100;

/// At most `max` of `vm_ids` (sorted, unique), chosen by rendezvous hashing on `key`
/// (the Service UID): the same nodes on every resync; different Services pick different
/// subsets, so no node carries every LB; and a node joining or leaving swaps at most one
/// backend of each LB. Returned sorted.
pub fn cap_backends(mut vm_ids: Vec<String>, key: &str, max: usize) -> Vec<String> {
    if vm_ids.len() <= max {
        return vm_ids;
    }
    vm_ids.sort_by_cached_key(|vm| (rendezvous_score(key, vm), vm.clone()));
    vm_ids.truncate(max);
    vm_ids.sort();
    vm_ids
}

/// FNV-1a (64 bit) of `key`, a 0 byte and `vm`, then the splitmix64 finalizer (FNV alone
/// spreads similar names poorly). Fixed forever, unlike std's `DefaultHasher`, so the
/// choice survives upgrades of the CCM.
pub fn rendezvous_score(key: &str, vm: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes().chain([0]).chain(vm.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The `InternalIP` of each eligible node's VM (for the nodes that have one).
pub fn backend_ips<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> BTreeMap<String, IpAddr> {
    nodes
        .into_iter()
        .filter_map(|n| Some((eligible_vm_id(n)?, internal_ip(n)?)))
        .collect()
}

/// The IPv6 `InternalIP` of each eligible node's VM (for the nodes that have one).
pub fn backend_ipv6s<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> BTreeMap<String, Ipv6Addr> {
    nodes
        .into_iter()
        .filter_map(|n| Some((eligible_vm_id(n)?, internal_ipv6(n)?)))
        .collect()
}

/// Whether the node can carry a load balancer serving `ip_versions` (see the module
/// docs): only an IPv6-only one asks for something, an IPv6 `InternalIP`.
pub fn can_serve(node: &Node, ip_versions: &[IpVersion]) -> bool {
    ip_versions.contains(&IpVersion::V4) || internal_ipv6(node).is_some()
}

/// The backend VM IDs for a Service with this (optional) node selector: sorted, unique.
pub fn backend_vm_ids<'a>(nodes: impl IntoIterator<Item = &'a Node>, selector: Option<&NodeSelector>) -> Vec<String> {
    let mut ids: Vec<String> = nodes
        .into_iter()
        .filter(|n| selector.is_none_or(|s| s.matches(&labels(n))))
        .filter_map(eligible_vm_id)
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

fn internal_ips(node: &Node) -> impl Iterator<Item = IpAddr> + '_ {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
}

/// The node's `InternalIP` (the first one), which load balancers send traffic to.
pub fn internal_ip(node: &Node) -> Option<IpAddr> {
    internal_ips(node).next()
}

/// The node's IPv6 `InternalIP` (the first one; the node controller writes the IPv4 one
/// first), which an LB's IPv6 clients are sent to.
pub fn internal_ipv6(node: &Node) -> Option<Ipv6Addr> {
    internal_ips(node).find_map(|a| match a {
        IpAddr::V6(v6) => Some(v6),
        IpAddr::V4(_) => None,
    })
}

/// What of the node set can change any load balancer: per eligible node, its VM ID, its
/// labels (node selectors read them) and its `InternalIP`s, the first and the IPv6 one (a
/// VM whose private IP changed must be re-sent to the platform, which refreshes a
/// backend's addresses only on a PUT).
/// Readiness, conditions, other taints and the rest of the status are deliberately absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSetFingerprint(BTreeMap<String, NodeFingerprint>);

type NodeFingerprint = (String, BTreeMap<String, String>, Option<IpAddr>, Option<Ipv6Addr>);

impl NodeSetFingerprint {
    pub fn of<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Self {
        Self::of_selected(nodes, None)
    }

    /// The fingerprint with only the labels in `keys` (None: all labels). The keys some
    /// Service's node selector reads are the only labels that can move a backend: a burst
    /// of other label changes must not resync every LB.
    pub fn of_selected<'a>(nodes: impl IntoIterator<Item = &'a Node>, keys: Option<&BTreeSet<String>>) -> Self {
        NodeSetFingerprint(
            nodes
                .into_iter()
                .filter_map(|n| {
                    let vm = eligible_vm_id(n)?;
                    let name = n.metadata.name.clone()?;
                    let mut l = labels(n);
                    if let Some(keys) = keys {
                        l.retain(|k, _| keys.contains(k));
                    }
                    Some((name, (vm, l, internal_ip(n), internal_ipv6(n))))
                })
                .collect(),
        )
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The label keys these node selectors read.
pub fn selector_keys<'a>(selectors: impl IntoIterator<Item = &'a NodeSelector>) -> BTreeSet<String> {
    use crate::annotations::Requirement;
    selectors
        .into_iter()
        .flat_map(|s| &s.requirements)
        .map(|r| match r {
            Requirement::Equals(k, _)
            | Requirement::NotEquals(k, _)
            | Requirement::Exists(k)
            | Requirement::NotExists(k) => k.clone(),
        })
        .collect()
}

/// Whether an update from `old` to `new` of one node may change some load balancer.
pub fn should_sync_updated_node(old: &Node, new: &Node) -> bool {
    NodeSetFingerprint::of([old]) != NodeSetFingerprint::of([new])
}

/// The nodes reconciles plan backends with: the node cache as it was at the end of the
/// last debounced batch of node changes ([`SettledNodes::settle`]), the live cache
/// before the first. Without it a reconcile started for another reason (a resync, a
/// Service edit) in the middle of a burst of node changes would write a half-changed
/// backend set, and the burst's tick another one: two updates of that LB instead of one.
pub struct SettledNodes {
    store: Store<Node>,
    settled: RwLock<Option<Vec<Arc<Node>>>>,
}

impl SettledNodes {
    pub fn new(store: Store<Node>) -> Self {
        SettledNodes {
            store,
            settled: RwLock::new(None),
        }
    }

    /// Takes the cache as it is now as the settled node set.
    pub fn settle(&self) {
        let now = self.store.state();
        *self.settled.write().unwrap_or_else(|p| p.into_inner()) = Some(now);
    }

    /// The settled node set.
    pub fn get(&self) -> Vec<Arc<Node>> {
        let settled = self.settled.read().unwrap_or_else(|p| p.into_inner());
        match settled.as_ref() {
            Some(nodes) => nodes.clone(),
            None => self.store.state(),
        }
    }

    /// The live node cache.
    pub fn store(&self) -> &Store<Node> {
        &self.store
    }
}

/// Debounces a stream of change signals: one `()` once `quiet` passed without a new
/// signal, or at the latest `max_delay` after the first signal of a burst. Ends when
/// the input ends (after flushing a pending signal).
pub fn debounce<S>(input: S, quiet: Duration, max_delay: Duration) -> impl Stream<Item = ()> + Send
where
    S: Stream<Item = ()> + Send + 'static,
{
    type Boxed = Pin<Box<dyn Stream<Item = ()> + Send>>;
    let state: (Boxed, bool) = (Box::pin(input), false);
    futures::stream::unfold(state, move |(mut input, ended)| async move {
        if ended {
            return None;
        }
        input.next().await?;
        let start = Instant::now();
        loop {
            let deadline = std::cmp::min(Instant::now() + quiet, start + max_delay);
            match tokio::time::timeout_at(deadline, input.next()).await {
                Ok(Some(())) => continue,
                Ok(None) => return Some(((), (input, true))),
                Err(_) => return Some(((), (input, false))),
            }
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    /// A ready node `name` backed by VM `vm-<name>`.
    pub fn node(name: &str) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.to_owned());
        n.spec = Some(NodeSpec {
            provider_id: Some(format!("cloudraya://vm-{name}")),
            ..NodeSpec::default()
        });
        n.status = Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..NodeCondition::default()
            }]),
            ..NodeStatus::default()
        });
        n
    }

    pub fn with_label(mut n: Node, k: &str, v: &str) -> Node {
        n.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(k.into(), v.into());
        n
    }

    pub fn with_taint(mut n: Node, key: &str) -> Node {
        let spec = n.spec.get_or_insert_with(NodeSpec::default);
        spec.taints.get_or_insert_with(Vec::new).push(Taint {
            key: key.into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        });
        n
    }

    pub fn with_provider_id(mut n: Node, pid: Option<&str>) -> Node {
        n.spec.get_or_insert_with(NodeSpec::default).provider_id = pid.map(str::to_owned);
        n
    }

    pub fn with_condition(mut n: Node, ty: &str, status: Option<&str>) -> Node {
        let st = n.status.get_or_insert_with(NodeStatus::default);
        let conds = st.conditions.get_or_insert_with(Vec::new);
        conds.retain(|c| c.type_ != ty);
        if let Some(s) = status {
            conds.push(NodeCondition {
                type_: ty.into(),
                status: s.into(),
                ..NodeCondition::default()
            });
        }
        n
    }

    pub fn with_internal_ip(mut n: Node, ip: &str) -> Node {
        let st = n.status.get_or_insert_with(NodeStatus::default);
        st.addresses = Some(vec![k8s_openapi::api::core::v1::NodeAddress {
            type_: "InternalIP".into(),
            address: ip.into(),
        }]);
        n
    }

    /// The node with exactly these `InternalIP`s, in this order.
    pub fn with_internal_ips(mut n: Node, ips: &[&str]) -> Node {
        let st = n.status.get_or_insert_with(NodeStatus::default);
        st.addresses = Some(
            ips.iter()
                .map(|ip| k8s_openapi::api::core::v1::NodeAddress {
                    type_: "InternalIP".into(),
                    address: (*ip).into(),
                })
                .collect(),
        );
        n
    }

    /// Which nodes can carry an LB of which families, and a VM's IPv6 moving resyncs.
    #[test]
    fn nodes_by_address_family() {
        use IpVersion::{V4, V6};
        let v4 = with_internal_ips(node("a"), &["127.10.0.11"]);
        let dual = with_internal_ips(node("b"), &["127.10.0.12", "fd00:10::12"]);
        let v6_only = with_internal_ips(node("c"), &["fd00:10::13"]);
        let unknown = node("d");
        assert_eq!(internal_ipv6(&v4), None);
        assert_eq!(internal_ipv6(&dual), "fd00:10::12".parse().ok());
        assert_eq!(internal_ip(&dual), "127.10.0.12".parse().ok(), "the first one");
        assert_eq!(internal_ipv6(&v6_only), "fd00:10::13".parse().ok());
        for (n, v4_lb, v6_lb) in [
            (&v4, true, false),
            (&dual, true, true),
            (&v6_only, true, true),
            (&unknown, true, false),
        ] {
            assert_eq!(can_serve(n, &[V4]), v4_lb, "{:?}", n.metadata.name);
            assert_eq!(can_serve(n, &[V4, V6]), v4_lb, "{:?}", n.metadata.name);
            assert_eq!(can_serve(n, &[V6]), v6_lb, "{:?}", n.metadata.name);
        }
        let all = [v4.clone(), dual.clone(), v6_only.clone(), unknown];
        assert_eq!(
            backend_ipv6s(&all),
            BTreeMap::from([
                ("vm-b".to_owned(), "fd00:10::12".parse().expect("ip")),
                ("vm-c".to_owned(), "fd00:10::13".parse().expect("ip")),
            ])
        );
        // A VM gaining, changing or losing its IPv6 address changes the node set.
        let moved = with_internal_ips(node("b"), &["127.10.0.12", "fd00:10::50"]);
        let lost = with_internal_ips(node("b"), &["127.10.0.12"]);
        assert!(should_sync_updated_node(&dual, &moved));
        assert!(should_sync_updated_node(&dual, &lost));
        assert!(should_sync_updated_node(&lost, &dual));
        assert!(!should_sync_updated_node(&dual, &dual.clone()));
    }

    pub fn deleting(mut n: Node) -> Node {
        n.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        n
    }

    #[test]
    fn predicates_of_the_stable_node_set() {
        assert_eq!(eligible_vm_id(&node("a")), Some("vm-a".into()));
        assert_eq!(eligible_vm_id(&with_label(node("a"), EXCLUDE_FROM_LB_LABEL, "")), None);
        assert_eq!(
            eligible_vm_id(&with_label(node("a"), EXCLUDE_FROM_LB_LABEL, "true")),
            None
        );
        assert_eq!(
            eligible_vm_id(&with_label(node("a"), EXCLUDE_FROM_LB_LABEL, "yes")),
            None
        );
        assert_eq!(
            eligible_vm_id(&with_label(node("a"), EXCLUDE_FROM_LB_LABEL, "false")),
            Some("vm-a".into())
        );
        assert_eq!(eligible_vm_id(&with_taint(node("a"), TO_BE_DELETED_TAINT)), None);
        assert_eq!(eligible_vm_id(&with_taint(node("a"), "other")), Some("vm-a".into()));
        assert_eq!(eligible_vm_id(&deleting(node("a"))), None);
        assert_eq!(eligible_vm_id(&with_provider_id(node("a"), None)), None);
        assert_eq!(eligible_vm_id(&with_provider_id(node("a"), Some("aws:///i-1"))), None);
        // Readiness does not matter: the LB's health checks handle it.
        assert_eq!(
            eligible_vm_id(&with_condition(node("a"), "Ready", Some("False"))),
            Some("vm-a".into())
        );
        assert_eq!(
            eligible_vm_id(&with_condition(node("a"), "Ready", None)),
            Some("vm-a".into())
        );
    }

    #[test]
    fn backends_are_sorted_unique_and_selected() {
        let nodes = [
            node("c"),
            with_label(node("a"), "pool", "edge"),
            node("b"),
            with_provider_id(node("dup"), Some("cloudraya://vm-b")),
        ];
        assert_eq!(backend_vm_ids(&nodes, None), vec!["vm-a", "vm-b", "vm-c"]);
        let sel = NodeSelector {
            requirements: vec![crate::annotations::Requirement::Equals("pool".into(), "edge".into())],
        };
        assert_eq!(backend_vm_ids(&nodes, Some(&sel)), vec!["vm-a"]);
    }

    /// The cases of upstream's `Test_shouldSyncUpdatedNode_individualPredicates`, with
    /// our two deliberate differences: labels matter (node selectors read them) and the
    /// autoscaler taint or a deletion timestamp re-syncs at once (they leave the set).
    #[test]
    fn node_updates_that_resync_load_balancers() {
        let base = node("n");
        let cases: Vec<(&str, Node, Node, bool)> = vec![
            ("nothing changed", base.clone(), base.clone(), false),
            (
                "excluded F->T",
                base.clone(),
                with_label(base.clone(), EXCLUDE_FROM_LB_LABEL, ""),
                true,
            ),
            (
                "excluded T->F",
                with_label(base.clone(), EXCLUDE_FROM_LB_LABEL, ""),
                base.clone(),
                true,
            ),
            (
                "excluded T->T",
                with_label(base.clone(), EXCLUDE_FROM_LB_LABEL, ""),
                with_label(base.clone(), EXCLUDE_FROM_LB_LABEL, ""),
                false,
            ),
            (
                "other taint F->T",
                base.clone(),
                with_taint(base.clone(), "other"),
                false,
            ),
            (
                "other taint T->F",
                with_taint(base.clone(), "other"),
                base.clone(),
                false,
            ),
            (
                "autoscaler taint F->T",
                base.clone(),
                with_taint(base.clone(), TO_BE_DELETED_TAINT),
                true,
            ),
            (
                "readiness T->F",
                base.clone(),
                with_condition(base.clone(), "Ready", Some("False")),
                false,
            ),
            (
                "readiness F->unset",
                with_condition(base.clone(), "Ready", Some("False")),
                with_condition(base.clone(), "Ready", None),
                false,
            ),
            (
                "other condition F->T",
                with_condition(base.clone(), "DiskPressure", Some("False")),
                with_condition(base.clone(), "DiskPressure", Some("True")),
                false,
            ),
            ("deletionTimestamp F->T", base.clone(), deleting(base.clone()), true),
            (
                "providerID set F->T",
                with_provider_id(base.clone(), None),
                base.clone(),
                true,
            ),
            (
                "providerID set T->F",
                base.clone(),
                with_provider_id(base.clone(), None),
                true,
            ),
            (
                "providerID change",
                base.clone(),
                with_provider_id(base.clone(), Some("cloudraya://vm-other")),
                true,
            ),
            (
                "label added (selectors)",
                base.clone(),
                with_label(base.clone(), "pool", "x"),
                true,
            ),
            (
                "InternalIP set",
                base.clone(),
                with_internal_ip(base.clone(), "127.10.0.11"),
                true,
            ),
            (
                "InternalIP changed",
                with_internal_ip(base.clone(), "127.10.0.11"),
                with_internal_ip(base.clone(), "127.10.0.50"),
                true,
            ),
            (
                "excluded T, InternalIP changed",
                with_internal_ip(with_label(base.clone(), EXCLUDE_FROM_LB_LABEL, ""), "127.10.0.11"),
                with_internal_ip(with_label(base.clone(), EXCLUDE_FROM_LB_LABEL, ""), "127.10.0.50"),
                false,
            ),
            (
                "excluded T, providerID change",
                with_label(base.clone(), EXCLUDE_FROM_LB_LABEL, ""),
                with_provider_id(
                    with_label(base.clone(), EXCLUDE_FROM_LB_LABEL, ""),
                    Some("cloudraya://vm-2"),
                ),
                false,
            ),
            (
                "tainted T, ready F->T",
                with_condition(with_taint(base.clone(), TO_BE_DELETED_TAINT), "Ready", Some("False")),
                with_taint(base.clone(), TO_BE_DELETED_TAINT),
                false,
            ),
        ];
        for (name, old, new, want) in cases {
            assert_eq!(should_sync_updated_node(&old, &new), want, "{name}");
        }
    }

    /// Upstream's `TestNodeChangesForStableNodeSetEnabled`: which node-set changes must
    /// update LBs (the fingerprint changes) and which must not.
    #[test]
    fn node_set_changes_for_the_stable_node_set() {
        let (n1, n2, n3) = (node("n1"), node("n2"), node("n3"));
        let fp = |ns: &[&Node]| NodeSetFingerprint::of(ns.iter().copied());
        let initial = fp(&[&n1, &n2, &n3]);
        assert_eq!(initial, fp(&[&n1, &n2, &n3]), "no node changes");
        assert_ne!(fp(&[&n1, &n2]), initial, "a node added");
        assert_eq!(
            fp(&[&n1, &with_condition(n2.clone(), "Ready", Some("False")), &n3]),
            initial,
            "a node goes NotReady"
        );
        assert_ne!(
            fp(&[&n1, &with_taint(n2.clone(), TO_BE_DELETED_TAINT), &n3]),
            initial,
            "a node tainted for deletion"
        );
        assert_ne!(
            fp(&[&n1, &with_label(n2.clone(), EXCLUDE_FROM_LB_LABEL, ""), &n3]),
            initial,
            "a node excluded"
        );
        assert_ne!(fp(&[&n1, &n2]), initial, "a node deleted");
        assert_ne!(
            fp(&[&n1, &deleting(n2.clone()), &n3]),
            initial,
            "a node marked for deletion"
        );
        assert_eq!(
            fp(&[&n1, &with_taint(n2.clone(), "Other"), &n3]),
            initial,
            "a spurious node update"
        );
    }

    fn vms(n: usize) -> Vec<String> {
        let mut v: Vec<String> = (0..n).map(|i| format!("vm-{i:03}")).collect();
        v.sort();
        v
    }

    /// More eligible nodes than the platform takes: a deterministic subset of the cap's
    /// size, the same on every call, different per Service, and a joining node swaps at
    /// most one backend.
    #[test]
    fn backends_are_capped_deterministically() {
        assert_eq!(
            cap_backends(vms(3), "uid-1", MAX_BACKENDS),
            vms(3),
            "under the cap: all"
        );
        let all = vms(150);
        let a = cap_backends(all.clone(), "uid-1", MAX_BACKENDS);
        assert_eq!(a.len(), MAX_BACKENDS);
        assert!(a.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
        assert!(a.iter().all(|v| all.contains(v)));
        assert_eq!(
            a,
            cap_backends(all.clone(), "uid-1", MAX_BACKENDS),
            "stable across resyncs"
        );
        let mut shuffled = all.clone();
        shuffled.reverse();
        shuffled.sort();
        assert_eq!(
            a,
            cap_backends(shuffled, "uid-1", MAX_BACKENDS),
            "independent of the input order"
        );
        let b = cap_backends(all.clone(), "uid-2", MAX_BACKENDS);
        assert_ne!(a, b, "another Service, another subset");
        // Spread: over many Services, every node is picked about max/n of the time.
        let mut picked = std::collections::BTreeMap::<String, usize>::new();
        for i in 0..300 {
            for v in cap_backends(all.clone(), &format!("uid-{i}"), MAX_BACKENDS) {
                *picked.entry(v).or_default() += 1;
            }
        }
        assert_eq!(picked.len(), 150, "every node backs some LB");
        assert!(picked.values().all(|&n| (120..=280).contains(&n)), "{picked:?}");
        // A node joining: at most one backend changes, and the set stays at the cap.
        let mut more = all.clone();
        more.push("vm-new".into());
        for i in 0..50 {
            let key = format!("uid-{i}");
            let before = cap_backends(all.clone(), &key, MAX_BACKENDS);
            let after = cap_backends(more.clone(), &key, MAX_BACKENDS);
            assert_eq!(after.len(), MAX_BACKENDS);
            let removed = before.iter().filter(|v| !after.contains(v)).count();
            assert!(removed <= 1, "{key}: {removed} removed");
        }
        // The score is fixed (a changed hash would reshuffle every LB on upgrade).
        assert_eq!(rendezvous_score("", ""), 0x25fc_6dd3_6ce0_4b20);
    }

    /// Labels no node selector reads do not change the fingerprint; exclusion and the
    /// selectors' keys still do.
    #[test]
    fn only_selected_labels_count() {
        let sel = NodeSelector {
            requirements: vec![crate::annotations::Requirement::Exists("pool".into())],
        };
        let keys = selector_keys([&sel]);
        assert_eq!(keys, BTreeSet::from(["pool".to_string()]));
        let (n1, n2) = (node("n1"), node("n2"));
        let fp = |ns: &[&Node], k: Option<&BTreeSet<String>>| NodeSetFingerprint::of_selected(ns.iter().copied(), k);
        let initial = fp(&[&n1, &n2], Some(&keys));
        let relabelled = with_label(n2.clone(), "burst", "1");
        assert_eq!(fp(&[&n1, &relabelled], Some(&keys)), initial, "an unread label");
        assert_ne!(
            fp(&[&n1, &relabelled], None),
            fp(&[&n1, &n2], None),
            "all labels count without keys"
        );
        assert_ne!(
            fp(&[&n1, &with_label(n2.clone(), "pool", "a")], Some(&keys)),
            initial,
            "a selector's key"
        );
        assert_ne!(
            fp(
                &[&n1, &with_label(n2.clone(), EXCLUDE_FROM_LB_LABEL, "true")],
                Some(&keys)
            ),
            initial,
            "excluded"
        );
        let none = BTreeSet::new();
        assert_eq!(fp(&[&n1, &relabelled], Some(&none)), fp(&[&n1, &n2], Some(&none)));
    }

    #[tokio::test(start_paused = true)]
    async fn debounce_batches_a_burst() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<()>();
        let mut out = Box::pin(debounce(rx, Duration::from_millis(500), Duration::from_secs(3)));
        for _ in 0..10 {
            tx.unbounded_send(()).expect("send");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let t0 = Instant::now();
        assert_eq!(out.next().await, Some(()));
        // One tick for the burst, about `quiet` after its last signal.
        assert!(t0.elapsed() <= Duration::from_millis(500));
        // A steady stream still ticks at least every max_delay.
        let sender = tokio::spawn(async move {
            for _ in 0..100 {
                if tx.unbounded_send(()).is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let t1 = Instant::now();
        assert_eq!(out.next().await, Some(()));
        assert!(t1.elapsed() <= Duration::from_secs(3) + Duration::from_millis(200));
        sender.abort();
        let _ = sender.await;
        // The input ended: a pending signal is flushed, then the stream ends.
        assert!(matches!(out.next().await, Some(()) | None));
    }
}

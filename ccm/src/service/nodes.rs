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

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use tokio::time::Instant;

use crate::annotations::NodeSelector;
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

/// The `InternalIP` of each eligible node's VM (for the nodes that have one).
pub fn backend_ips<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> BTreeMap<String, IpAddr> {
    nodes
        .into_iter()
        .filter_map(|n| Some((eligible_vm_id(n)?, internal_ip(n)?)))
        .collect()
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

/// The node's `InternalIP` (the first one), which load balancers send traffic to.
pub fn internal_ip(node: &Node) -> Option<IpAddr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .and_then(|a| a.address.parse().ok())
}

/// What of the node set can change any load balancer: per eligible node, its VM ID, its
/// labels (node selectors read them) and its `InternalIP` (a VM whose private IP changed
/// must be re-sent to the platform, which refreshes a backend's address only on a PUT).
/// Readiness, conditions, other taints and the rest of the status are deliberately absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSetFingerprint(BTreeMap<String, NodeFingerprint>);

type NodeFingerprint = (String, BTreeMap<String, String>, Option<IpAddr>);

impl NodeSetFingerprint {
    pub fn of<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Self {
        NodeSetFingerprint(
            nodes
                .into_iter()
                .filter_map(|n| {
                    let vm = eligible_vm_id(n)?;
                    let name = n.metadata.name.clone()?;
                    Some((name, (vm, labels(n), internal_ip(n))))
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

/// Whether an update from `old` to `new` of one node may change some load balancer.
pub fn should_sync_updated_node(old: &Node, new: &Node) -> bool {
    NodeSetFingerprint::of([old]) != NodeSetFingerprint::of([new])
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

//! The cloud node lifecycle controller, as k8s.io/cloud-provider's
//! `CloudNodeLifecycleController` (`MonitorNodes`, every `--node-monitor-period`):
//!
//! - a Ready Node needs no platform call; a shutdown taint it still carries goes;
//! - a Node that is not Ready has its VM looked up by provider ID: gone (404, or reported
//!   `deleted`) → the Node is deleted; stopped (or stopping) → the
//!   `node.cloudprovider.kubernetes.io/shutdown:NoSchedule` taint is added; running
//!   again → the taint goes (upstream waits for Ready; we also act on the VM's state).
//!
//! Only Nodes with our provider ID (`cloudraya://`) are looked at. A platform error
//! changes nothing (never delete a Node on a guess). [`decide`] is the pure decision.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams};
use tracing::{debug, info, warn};

use super::controller::Context;
use super::{SHUTDOWN_TAINT, add_taint, has_taint, is_ready, our_vm_id, remove_taint};
use crate::platform::{Instance, InstanceState};
use crate::runner::every;
use crate::{Error, Result};

/// What the platform said of a Node's VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmLookup {
    /// The VM exists, in this state.
    Found(InstanceState),
    /// `get_instance` answered 404.
    NotFound,
    /// The lookup failed (5xx, timeout, ...): nothing can be concluded.
    Failed,
}

impl VmLookup {
    pub fn of(result: &crate::platform::Result<Instance>) -> Self {
        match result {
            Ok(vm) => VmLookup::Found(vm.state.clone()),
            Err(e) if e.is_not_found() => VmLookup::NotFound,
            Err(_) => VmLookup::Failed,
        }
    }
}

/// What to do to a Node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LifecycleAction {
    Nothing,
    DeleteNode,
    AddShutdownTaint,
    RemoveShutdownTaint,
}

impl LifecycleAction {
    /// The metrics label (`node_lifecycle_actions{action=...}`).
    pub fn label(self) -> &'static str {
        match self {
            LifecycleAction::Nothing => "nothing",
            LifecycleAction::DeleteNode => "delete_node",
            LifecycleAction::AddShutdownTaint => "add_shutdown_taint",
            LifecycleAction::RemoveShutdownTaint => "remove_shutdown_taint",
        }
    }
}

/// Whether the VM of `node` must be looked up: a Node of ours that is not Ready (and
/// not being deleted). A Ready Node is trusted to run, as upstream does.
pub fn needs_lookup(node: &Node) -> bool {
    our_vm_id(node).is_some() && !is_ready(node) && node.metadata.deletion_timestamp.is_none()
}

/// The decision for one Node, given the lookup of its VM (`None` when [`needs_lookup`]
/// said no lookup was needed).
pub fn decide(node: &Node, vm: Option<&VmLookup>) -> LifecycleAction {
    if our_vm_id(node).is_none() || node.metadata.deletion_timestamp.is_some() {
        return LifecycleAction::Nothing;
    }
    let tainted = has_taint(node, SHUTDOWN_TAINT);
    let shut_down = match vm {
        // Ready: the node runs.
        None => false,
        Some(VmLookup::NotFound) | Some(VmLookup::Found(InstanceState::Deleted)) => {
            return LifecycleAction::DeleteNode;
        }
        Some(VmLookup::Found(InstanceState::Stopped | InstanceState::Stopping)) => true,
        Some(VmLookup::Found(InstanceState::Running)) => false,
        // Starting, unknown states, failed lookups: leave the Node as it is.
        Some(VmLookup::Found(_)) | Some(VmLookup::Failed) => return LifecycleAction::Nothing,
    };
    match (shut_down, tainted) {
        (true, false) => LifecycleAction::AddShutdownTaint,
        (false, true) => LifecycleAction::RemoveShutdownTaint,
        _ => LifecycleAction::Nothing,
    }
}

/// The shutdown taint.
pub fn shutdown_taint() -> Taint {
    Taint {
        key: SHUTDOWN_TAINT.into(),
        effect: "NoSchedule".into(),
        time_added: None,
        value: None,
    }
}

/// Carries `action` out on `node`.
async fn act(ctx: &Context, node: &Node, action: LifecycleAction) -> Result<()> {
    let api = kube::Api::<Node>::all(ctx.client.clone());
    let name = node.name_any();
    let done = match action {
        LifecycleAction::Nothing => false,
        LifecycleAction::DeleteNode => match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => true,
            Err(kube::Error::Api(s)) if s.code == 404 => false,
            Err(e) => return Err(Error::Kube(e)),
        },
        LifecycleAction::AddShutdownTaint => add_taint(&api, node, &shutdown_taint()).await?,
        LifecycleAction::RemoveShutdownTaint => remove_taint(&api, node, SHUTDOWN_TAINT).await?,
    };
    if done {
        ctx.metrics.record_lifecycle_action(action.label());
        info!(node = %name, action = action.label(), "node lifecycle");
    }
    Ok(())
}

/// One round over `nodes`: look up what needs looking up, decide, act. Returns the
/// actions taken (other than [`LifecycleAction::Nothing`]).
pub async fn monitor_nodes(ctx: &Context, nodes: &[Node]) -> Vec<(String, LifecycleAction)> {
    let mut taken = Vec::new();
    for node in nodes {
        let lookup = match our_vm_id(node) {
            Some(id) if needs_lookup(node) => Some(VmLookup::of(&ctx.platform.get_instance(&id).await)),
            _ => None,
        };
        if lookup == Some(VmLookup::Failed) {
            warn!(node = %node.name_any(), "lifecycle: cannot look the VM up; leaving the node as it is");
        }
        let action = decide(node, lookup.as_ref());
        if action == LifecycleAction::Nothing {
            continue;
        }
        match act(ctx, node, action).await {
            Ok(()) => taken.push((node.name_any(), action)),
            Err(e) => warn!(node = %node.name_any(), action = action.label(), error = %e, "lifecycle action failed"),
        }
    }
    taken
}

/// The lifecycle loop (every `settings.monitor`), over a fresh list of Nodes each time.
pub async fn run(ctx: Arc<Context>) {
    let api = kube::Api::<Node>::all(ctx.client.clone());
    every(ctx.settings.monitor, || async {
        let nodes = match api.list(&ListParams::default()).await {
            Ok(l) => l.items,
            Err(e) => {
                warn!(error = %e, "lifecycle: cannot list nodes");
                return;
            }
        };
        let taken = monitor_nodes(&ctx, &nodes).await;
        debug!(nodes = nodes.len(), actions = taken.len(), "lifecycle round");
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::nodes::tests::{deleting, node, with_condition, with_provider_id, with_taint};

    fn not_ready(n: Node) -> Node {
        with_condition(n, "Ready", Some("False"))
    }

    #[test]
    fn only_our_not_ready_nodes_are_looked_up() {
        assert!(!needs_lookup(&node("a")), "ready");
        assert!(needs_lookup(&not_ready(node("a"))));
        assert!(
            needs_lookup(&with_condition(node("a"), "Ready", None)),
            "no Ready condition"
        );
        assert!(!needs_lookup(&with_provider_id(not_ready(node("a")), None)));
        assert!(!needs_lookup(&with_provider_id(
            not_ready(node("a")),
            Some("aws:///i-1")
        )));
        assert!(!needs_lookup(&deleting(not_ready(node("a")))));
    }

    #[test]
    fn decisions() {
        use InstanceState as S;
        use LifecycleAction as A;
        let n = not_ready(node("a"));
        let tainted = with_taint(n.clone(), SHUTDOWN_TAINT);
        let found = |s: S| VmLookup::Found(s);
        let ready = node("a");
        let cases: Vec<(&str, &Node, Option<VmLookup>, A)> = vec![
            ("ready, untainted", &ready, None, A::Nothing),
            ("VM gone", &n, Some(VmLookup::NotFound), A::DeleteNode),
            ("VM gone, tainted", &tainted, Some(VmLookup::NotFound), A::DeleteNode),
            ("VM reported deleted", &n, Some(found(S::Deleted)), A::DeleteNode),
            ("VM stopped", &n, Some(found(S::Stopped)), A::AddShutdownTaint),
            ("VM stopping", &n, Some(found(S::Stopping)), A::AddShutdownTaint),
            ("VM stopped, tainted", &tainted, Some(found(S::Stopped)), A::Nothing),
            (
                "VM running, tainted",
                &tainted,
                Some(found(S::Running)),
                A::RemoveShutdownTaint,
            ),
            ("VM running, untainted", &n, Some(found(S::Running)), A::Nothing),
            ("VM starting, tainted", &tainted, Some(found(S::Starting)), A::Nothing),
            (
                "unknown state",
                &n,
                Some(found(S::Other("rebooting".into()))),
                A::Nothing,
            ),
            ("lookup failed", &n, Some(VmLookup::Failed), A::Nothing),
            ("lookup failed, tainted", &tainted, Some(VmLookup::Failed), A::Nothing),
        ];
        for (name, node, lookup, want) in cases {
            assert_eq!(decide(node, lookup.as_ref()), want, "{name}");
        }
        let ready_tainted = with_taint(node("a"), SHUTDOWN_TAINT);
        assert_eq!(decide(&ready_tainted, None), A::RemoveShutdownTaint, "ready again");
        let foreign = with_provider_id(n.clone(), Some("aws:///i-1"));
        assert_eq!(decide(&foreign, Some(&VmLookup::NotFound)), A::Nothing, "not ours");
        let no_pid = with_provider_id(n.clone(), None);
        assert_eq!(decide(&no_pid, Some(&VmLookup::NotFound)), A::Nothing, "no provider ID");
        assert_eq!(
            decide(&deleting(n.clone()), Some(&VmLookup::NotFound)),
            A::Nothing,
            "already being deleted"
        );
    }

    #[test]
    fn lookups_from_platform_results() {
        let nf: crate::platform::Result<Instance> = Err(crate::platform::Error::NotFound { what: "VM x".into() });
        assert_eq!(VmLookup::of(&nf), VmLookup::NotFound);
        let busy: crate::platform::Result<Instance> = Err(crate::platform::Error::Conflict { message: "x".into() });
        assert_eq!(VmLookup::of(&busy), VmLookup::Failed);
    }
}

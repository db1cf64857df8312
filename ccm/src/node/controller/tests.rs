//! Pure decisions and reconcile tests of the node controller: the kube side through the
//! recording mock API server of [`crate::node::testing`], the platform through
//! [`FakePlatform`].

use super::*;
use crate::node::SHUTDOWN_TAINT;
use crate::node::lifecycle::{LifecycleAction, monitor_nodes};
use crate::node::testing::{calls, context, context_answering};
use crate::platform::LABEL_CLUSTER_ID;
use crate::platform::fake::FakePlatform;
use crate::service::nodes::tests::{node, with_condition, with_internal_ip, with_provider_id, with_taint};

/// A Node as a kubelet with `--cloud-provider=external` registers it.
fn registered(name: &str) -> Node {
    with_taint(with_provider_id(node(name), None), UNINITIALIZED_TAINT)
}

/// A platform whose VM `vm-<name>` (named `name`) belongs to cluster `cl-1`.
fn platform_with(names: &[&str]) -> Arc<FakePlatform> {
    let p = Arc::new(FakePlatform::new());
    for (i, n) in names.iter().enumerate() {
        let id = format!("vm-{n}");
        p.add_vm(&id, &format!("127.10.0.{}", 11 + i));
        p.modify_vm(&id, |vm| {
            vm.name = (*n).to_owned();
            vm.labels.insert(LABEL_CLUSTER_ID.into(), "cl-1".into());
        });
    }
    p
}

fn vm(p: &FakePlatform, id: &str) -> Instance {
    futures::executor::block_on(p.get_instance(id)).expect("vm")
}

fn addresses(update: &MetadataUpdate) -> Vec<(String, String)> {
    update
        .addresses
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|a| (a.type_, a.address))
        .collect()
}

#[test]
fn a_new_node_gets_provider_id_labels_and_addresses() {
    let p = platform_with(&["w1"]);
    p.modify_vm("vm-w1", |vm| vm.public_ip = "127.203.0.7".parse().ok());
    let u = metadata_update(&registered("w1"), &vm(&p, "vm-w1"));
    assert_eq!(u.provider_id.as_deref(), Some("cloudraya://vm-w1"));
    assert_eq!(u.labels[LABEL_REGION], "jkt");
    assert_eq!(u.labels[LABEL_ZONE], "jkt-a");
    assert_eq!(u.labels[LABEL_INSTANCE_TYPE], "standard-2");
    assert_eq!(
        addresses(&u),
        vec![
            ("InternalIP".to_string(), "127.10.0.11".to_string()),
            ("ExternalIP".into(), "127.203.0.7".into()),
            ("Hostname".into(), "w1".into()),
        ]
    );
    let patch = u.node_patch().expect("node patch");
    assert_eq!(patch["spec"]["providerID"], "cloudraya://vm-w1");
    assert_eq!(patch["metadata"]["labels"][LABEL_ZONE], "jkt-a");
    assert!(u.status_patch().expect("status patch")["status"]["addresses"].is_array());
}

#[test]
fn an_up_to_date_node_needs_nothing_and_a_moved_vm_only_its_addresses() {
    let p = platform_with(&["w1"]);
    let v = vm(&p, "vm-w1");
    let mut n = registered("w1");
    n.spec.as_mut().expect("spec").provider_id = Some("cloudraya://vm-w1".into());
    n.metadata.labels = Some(
        [
            (LABEL_REGION, "jkt"),
            (LABEL_ZONE, "jkt-a"),
            (LABEL_INSTANCE_TYPE, "standard-2"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
    );
    n.status.as_mut().expect("status").addresses = metadata_update(&n, &v).addresses;
    assert!(metadata_update(&n, &v).is_empty(), "{:?}", metadata_update(&n, &v));

    let mut moved = v.clone();
    moved.private_ip = "127.10.0.50".parse().ok();
    let u = metadata_update(&n, &moved);
    assert_eq!(u.provider_id, None, "a provider ID is never rewritten");
    assert!(u.labels.is_empty());
    assert_eq!(addresses(&u)[0], ("InternalIP".into(), "127.10.0.50".into()));
    assert!(u.node_patch().is_none());

    // A VM without a private IP yet leaves the addresses alone.
    let mut no_ip = v.clone();
    no_ip.private_ip = None;
    assert_eq!(metadata_update(&n, &no_ip).addresses, None);
}

/// A VM with a private IPv6 address: both `InternalIP`s, IPv4 first; its IPv6 address
/// appearing, changing or going away rewrites the addresses, nothing else.
#[test]
fn a_dual_stack_vm_gives_its_node_both_internal_ips_ipv4_first() {
    let p = platform_with(&["w1"]);
    p.modify_vm("vm-w1", |vm| {
        vm.private_ipv6 = "fd00:10::b".parse().ok();
        vm.public_ip = "127.203.0.7".parse().ok();
    });
    let v = vm(&p, "vm-w1");
    let u = metadata_update(&registered("w1"), &v);
    assert_eq!(
        addresses(&u),
        vec![
            ("InternalIP".to_string(), "127.10.0.11".to_string()),
            ("InternalIP".into(), "fd00:10::b".into()),
            ("ExternalIP".into(), "127.203.0.7".into()),
            ("Hostname".into(), "w1".into()),
        ]
    );
    let mut n = with_provider_id(node("w1"), Some("cloudraya://vm-w1"));
    n.metadata.labels = Some(u.labels.clone());
    n.status.as_mut().expect("status").addresses = u.addresses.clone();
    assert!(metadata_update(&n, &v).is_empty(), "in sync");

    let mut moved = v.clone();
    moved.private_ipv6 = "fd00:10::50".parse().ok();
    let u = metadata_update(&n, &moved);
    assert_eq!(addresses(&u)[1], ("InternalIP".into(), "fd00:10::50".into()));
    assert!(u.node_patch().is_none(), "addresses only");

    let mut lost = v.clone();
    lost.private_ipv6 = None;
    let u = metadata_update(&n, &lost);
    assert_eq!(
        addresses(&u).iter().filter(|(t, _)| t == "InternalIP").count(),
        1,
        "{u:?}"
    );
    assert_eq!(addresses(&u)[0], ("InternalIP".into(), "127.10.0.11".into()));

    // IPv6 before IPv4 has come: the IPv6 one alone, never an empty InternalIP list.
    let mut v6_first = v.clone();
    v6_first.private_ip = None;
    let u = metadata_update(&registered("w1"), &v6_first);
    assert_eq!(addresses(&u)[0], ("InternalIP".into(), "fd00:10::b".into()));
}

#[tokio::test]
async fn the_refresh_follows_a_vm_whose_ipv6_address_changed() {
    let p = platform_with(&["w1", "w2"]);
    for name in ["w1", "w2"] {
        p.modify_vm(&format!("vm-{name}"), |vm| vm.private_ipv6 = "fd00:10::b".parse().ok());
    }
    let mut nodes = Vec::new();
    for name in ["w1", "w2"] {
        let mut n = node(name);
        let u = metadata_update(&n, &vm(&p, &format!("vm-{name}")));
        n.metadata.labels = Some(u.labels.clone());
        n.status.as_mut().expect("status").addresses = u.addresses.clone();
        nodes.push(n);
    }
    p.modify_vm("vm-w2", |vm| vm.private_ipv6 = "fd00:10::50".parse().ok());
    let (ctx, server) = context(p.clone(), Arc::new(Metrics::default()), nodes.clone());
    assert_eq!(refresh_nodes(&ctx, &nodes).await.expect("refresh"), 1);
    drop(ctx);
    let calls = calls(server).await;
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert!(calls[0].is("PATCH", "/api/v1/nodes/w2/status"));
    assert_eq!(calls[0].body["status"]["addresses"][0]["address"], "127.10.0.12");
    assert_eq!(calls[0].body["status"]["addresses"][1]["address"], "fd00:10::50");
}

#[test]
fn vms_are_picked_by_provider_id_else_by_name() {
    let p = platform_with(&["w1", "w2"]);
    let vms = vec![vm(&p, "vm-w1"), vm(&p, "vm-w2")];
    assert_eq!(
        pick_vm(&registered("w2"), &vms).map(|v| v.id.clone()),
        Ok("vm-w2".into())
    );
    let by_id = with_provider_id(registered("other-name"), Some("cloudraya://vm-w1"));
    assert_eq!(pick_vm(&by_id, &vms).map(|v| v.id.clone()), Ok("vm-w1".into()));
    let gone = with_provider_id(registered("w1"), Some("cloudraya://vm-zz"));
    assert!(pick_vm(&gone, &vms).expect_err("gone").0.contains("vm-zz"));
    assert!(
        pick_vm(&registered("w9"), &vms)
            .expect_err("no vm")
            .0
            .contains("no VM named w9")
    );
    let foreign = with_provider_id(registered("w1"), Some("aws:///i-1"));
    assert!(
        pick_vm(&foreign, &vms)
            .expect_err("foreign")
            .0
            .contains("not a CloudRaya VM")
    );
    let mut twins = vms.clone();
    let mut twin = vms[0].clone();
    twin.id = "vm-twin".into();
    twins.push(twin);
    assert!(
        pick_vm(&registered("w1"), &twins)
            .expect_err("ambiguous")
            .0
            .contains("2 VMs")
    );
    let mut deleted = vms.clone();
    deleted[1].state = InstanceState::Deleted;
    assert!(
        pick_vm(&registered("w2"), &deleted).is_err(),
        "a deleted VM does not count"
    );
}

#[tokio::test]
async fn initialisation_patches_the_node_then_removes_the_taint() {
    let p = platform_with(&["w1"]);
    let metrics = Arc::new(Metrics::default());
    let n = registered("w1");
    let (ctx, server) = context(p.clone(), metrics.clone(), vec![n.clone()]);
    let res = reconcile(Arc::new(n), ctx).await;
    assert_eq!(res.expect("ok"), Action::await_change());
    let calls = calls(server).await;
    assert_eq!(calls.len(), 3, "{calls:#?}");
    assert!(calls[0].is("PATCH", "/api/v1/nodes/w1"));
    assert_eq!(calls[0].body["spec"]["providerID"], "cloudraya://vm-w1");
    assert_eq!(calls[0].body["metadata"]["labels"][LABEL_INSTANCE_TYPE], "standard-2");
    assert!(calls[1].is("PATCH", "/api/v1/nodes/w1/status"));
    assert_eq!(calls[1].body["status"]["addresses"][0]["address"], "127.10.0.11");
    assert!(calls[2].is("PATCH", "/api/v1/nodes/w1"));
    assert_eq!(calls[2].body[0]["op"], "test", "{:?}", calls[2].body);
    assert_eq!(calls[2].body[0]["value"], UNINITIALIZED_TAINT);
    assert_eq!(calls[2].body[1]["op"], "remove");
    assert_eq!(metrics.nodes_initialized.get(), 1);
    assert_eq!(
        p.calls(),
        vec!["list_instances"],
        "found by name among the cluster's VMs"
    );
}

#[tokio::test]
async fn a_node_with_our_provider_id_is_looked_up_by_id() {
    let p = platform_with(&["w1"]);
    let n = with_provider_id(registered("w1"), Some("cloudraya://vm-w1"));
    let (ctx, server) = context(p.clone(), Arc::new(Metrics::default()), vec![n.clone()]);
    reconcile(Arc::new(n), ctx).await.expect("ok");
    let calls = calls(server).await;
    assert!(calls[0].body["spec"].get("providerID").is_none(), "{:?}", calls[0].body);
    assert_eq!(p.calls(), vec!["get_instance"]);
}

#[tokio::test]
async fn a_missing_vm_is_an_event_and_a_retry_with_backoff() {
    let p = platform_with(&["w1"]);
    let metrics = Arc::new(Metrics::default());
    let n = Arc::new(registered("w7"));
    let (ctx, server) = context(p.clone(), metrics.clone(), vec![]);
    let err = reconcile(n.clone(), ctx.clone()).await.expect_err("no VM");
    assert!(matches!(err, Error::InstanceNotFound { .. }), "{err}");
    let first = error_policy(n.clone(), &err, ctx.clone());
    let second = error_policy(n.clone(), &err, ctx.clone());
    assert_ne!(first, second, "the delay grows");
    drop(ctx);
    let calls = calls(server).await;
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert!(calls[0].is_event(REASON_INSTANCE_NOT_FOUND));
    assert_eq!(calls[0].body["type"], "Warning");
    assert!(
        calls[0].body["note"]
            .as_str()
            .unwrap_or_default()
            .contains("no VM named w7")
    );
    assert!(
        metrics
            .render()
            .contains("node_initialization_failures_total{error=\"instance_not_found\"} 2")
    );
}

#[tokio::test]
async fn initialised_nodes_are_left_to_the_refresh() {
    let p = platform_with(&["w1"]);
    let (ctx, server) = context(p.clone(), Arc::new(Metrics::default()), vec![]);
    let res = reconcile(Arc::new(node("w1")), ctx).await;
    assert_eq!(res.expect("ok"), Action::await_change());
    assert!(calls(server).await.is_empty());
    assert!(p.calls().is_empty());
}

#[tokio::test]
async fn the_refresh_updates_only_the_node_whose_vm_moved() {
    let p = platform_with(&["w1", "w2"]);
    let metrics = Arc::new(Metrics::default());
    let mut nodes = Vec::new();
    for name in ["w1", "w2"] {
        let mut n = node(name);
        let v = vm(&p, &format!("vm-{name}"));
        let u = metadata_update(&n, &v);
        n.metadata.labels = Some(u.labels.clone());
        n.status.as_mut().expect("status").addresses = u.addresses.clone();
        nodes.push(n);
    }
    // A tainted node is initialisation's business, not the refresh's.
    nodes.push(registered("w3"));
    p.modify_vm("vm-w2", |vm| vm.private_ip = "127.10.0.50".parse().ok());
    p.clear_calls();
    let (ctx, server) = context(p.clone(), metrics.clone(), nodes.clone());
    assert_eq!(refresh_nodes(&ctx, &nodes).await.expect("refresh"), 1);
    drop(ctx);
    let calls = calls(server).await;
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert!(calls[0].is("PATCH", "/api/v1/nodes/w2/status"));
    assert_eq!(calls[0].body["status"]["addresses"][0]["address"], "127.10.0.50");
    assert_eq!(metrics.node_updates.get(), 1);
    assert_eq!(p.calls(), vec!["list_instances"], "one list per round");
}

#[tokio::test]
async fn the_refresh_gives_an_untainted_node_without_provider_id_its_vm() {
    let p = platform_with(&["w1"]);
    let n = with_internal_ip(with_provider_id(node("w1"), None), "127.10.0.11");
    let (ctx, server) = context(p.clone(), Arc::new(Metrics::default()), vec![n.clone()]);
    assert_eq!(refresh_nodes(&ctx, std::slice::from_ref(&n)).await.expect("refresh"), 1);
    drop(ctx);
    let calls = calls(server).await;
    assert_eq!(calls[0].body["spec"]["providerID"], "cloudraya://vm-w1");
}

#[tokio::test]
async fn lifecycle_deletes_taints_and_untaints() {
    let p = platform_with(&["w1", "w2", "w3", "w4"]);
    let metrics = Arc::new(Metrics::default());
    let not_ready = |n: Node| with_condition(n, "Ready", Some("False"));
    let nodes = vec![
        not_ready(node("w1")),                                       // VM deleted
        not_ready(node("w2")),                                       // VM stopped
        with_taint(node("w3"), SHUTDOWN_TAINT),                      // Ready again
        not_ready(with_provider_id(node("w4"), Some("aws:///i-4"))), // not ours
        node("w4"),                                                  // ready, nothing to do
    ];
    p.remove_vm("vm-w1");
    p.modify_vm("vm-w2", |vm| vm.state = InstanceState::Stopped);
    let (ctx, server) = context(p.clone(), metrics.clone(), nodes.clone());
    let taken = monitor_nodes(&ctx, &nodes).await;
    assert_eq!(
        taken,
        vec![
            ("w1".to_string(), LifecycleAction::DeleteNode),
            ("w2".into(), LifecycleAction::AddShutdownTaint),
            ("w3".into(), LifecycleAction::RemoveShutdownTaint),
        ]
    );
    drop(ctx);
    let calls = calls(server).await;
    assert_eq!(calls.len(), 3, "{calls:#?}");
    assert!(calls[0].is("DELETE", "/api/v1/nodes/w1"));
    assert!(calls[1].is("PATCH", "/api/v1/nodes/w2"));
    // No taints yet: the list is absent (kube-apiserver stores no empty list).
    assert_eq!(
        calls[1].body[0],
        json!({"op": "test", "path": "/spec/taints", "value": null})
    );
    assert_eq!(calls[1].body[1]["op"], "add", "{:?}", calls[1].body);
    assert_eq!(calls[1].body[1]["value"][0]["key"], SHUTDOWN_TAINT);
    assert_eq!(calls[1].body[1]["value"][0]["effect"], "NoSchedule");
    assert!(calls[2].is("PATCH", "/api/v1/nodes/w3"));
    assert_eq!(calls[2].body[1]["op"], "remove");
    assert_eq!(
        p.calls(),
        vec!["get_instance", "get_instance"],
        "only not-ready nodes of ours"
    );
    let text = metrics.render();
    assert!(
        text.contains("node_lifecycle_actions_total{action=\"delete_node\"} 1"),
        "{text}"
    );
    assert!(text.contains("node_lifecycle_actions_total{action=\"add_shutdown_taint\"} 1"));
}

/// A reconcile queued by our own write reads the cache before that write's watch event: its
/// Node is stale. The taint patch's failed `test` (422) is then answered by reading the
/// Node again, not by an error (which logged "node initialisation failed" at every start).
#[tokio::test]
async fn a_taint_patch_on_a_stale_node_reads_it_again() {
    let unprocessable = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid",
        "code": 422, "message": "operation '/0' failed at path '/spec/taints/0/key': path is invalid"});
    let stale = registered("w1");
    let p = platform_with(&["w1"]);

    // The taint is already gone on the server: nothing to do, and no error.
    let gone = serde_json::to_value(with_provider_id(node("w1"), Some("cloudraya://vm-w1"))).expect("node");
    let answer = {
        let unprocessable = unprocessable.clone();
        move |method: &str, _: &str, _: &serde_json::Value| match method {
            "PATCH" => (422, unprocessable.clone()),
            _ => (200, gone.clone()),
        }
    };
    let (ctx, server) = context_answering(p.clone(), Arc::new(Metrics::default()), answer);
    let removed = remove_taint(&ctx.nodes(), &stale, UNINITIALIZED_TAINT).await;
    assert!(matches!(removed, Ok(false)), "{removed:?}");
    drop(ctx);
    let made = calls(server).await;
    let seen: Vec<(&str, &str)> = made.iter().map(|c| (c.method.as_str(), c.path.as_str())).collect();
    assert_eq!(seen, vec![("PATCH", "/api/v1/nodes/w1"), ("GET", "/api/v1/nodes/w1")]);

    // Another taint came first meanwhile: the second patch tests and removes index 1.
    let moved = serde_json::to_value(with_taint(with_taint(node("w1"), "other"), UNINITIALIZED_TAINT)).expect("node");
    let mut patches = 0;
    let answer = move |method: &str, _: &str, _: &serde_json::Value| match method {
        "PATCH" => {
            patches += 1;
            if patches == 1 {
                (422, unprocessable.clone())
            } else {
                (200, moved.clone())
            }
        }
        _ => (200, moved.clone()),
    };
    let (ctx, server) = context_answering(p, Arc::new(Metrics::default()), answer);
    let removed = remove_taint(&ctx.nodes(), &stale, UNINITIALIZED_TAINT).await;
    assert!(matches!(removed, Ok(true)), "{removed:?}");
    drop(ctx);
    let made = calls(server).await;
    assert_eq!(made.len(), 3, "{made:#?}");
    assert!(made[2].is("PATCH", "/api/v1/nodes/w1"));
    assert_eq!(
        made[2].body[0],
        json!({"op": "test", "path": "/spec/taints/1/key", "value": UNINITIALIZED_TAINT})
    );
    assert_eq!(made[2].body[1], json!({"op": "remove", "path": "/spec/taints/1"}));
}

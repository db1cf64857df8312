//! kube-rs (watcher, Controller, Api::patch, CRDs from a derive) against the API server
//! stand-in.

#[path = "kube_support.rs"]
mod support;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, CustomResource, CustomResourceExt, Resource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use support::*;

async fn client(s: &Server) -> Client {
    let kc = kube::config::Kubeconfig::read_from(&s.kubeconfig).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(cfg).expect("client")
}

fn cm(name: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": {"k": "v"}})).unwrap()
}

async fn wait_for(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    name: &str,
) -> Result<(), tokio::time::error::Elapsed> {
    let fut = async move {
        loop {
            if rx.recv().await.as_deref() == Some(name) {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), fut).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_survives_forced_410() {
    let s = Server::start().await;
    let api: Api<ConfigMap> = Api::namespaced(client(&s).await, "default");
    api.create(&PostParams::default(), &cm("before")).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stream = watcher(api.clone(), watcher::Config::default().any_semantic())
        .default_backoff()
        .applied_objects();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            if let Ok(o) = ev {
                let _ = tx.send(o.name_any());
            }
        }
    });
    wait_for(&mut rx, "before").await.expect("initial list seen");
    // Streaming lists (sendInitialEvents) and metadata-only watches work too.
    let streaming = watcher(api.clone(), watcher::Config::default().streaming_lists()).applied_objects();
    let first = tokio::time::timeout(Duration::from_secs(10), std::pin::pin!(streaming).try_next()).await;
    assert_eq!(
        first.expect("streaming list in time").unwrap().unwrap().name_any(),
        "before"
    );
    let meta_api: Api<kube::core::PartialObjectMeta<ConfigMap>> = Api::namespaced(client(&s).await, "default");
    let meta = watcher(meta_api, watcher::Config::default()).applied_objects();
    let first = tokio::time::timeout(Duration::from_secs(10), std::pin::pin!(meta).try_next()).await;
    assert_eq!(
        first.expect("metadata list in time").unwrap().unwrap().name_any(),
        "before"
    );
    api.create(&PostParams::default(), &cm("live")).await.unwrap();
    wait_for(&mut rx, "live").await.expect("live change seen");
    // Compaction: the open watch ends with 410 and resuming from its version is refused.
    s.api.compact_history();
    api.create(&PostParams::default(), &cm("after-410")).await.unwrap();
    wait_for(&mut rx, "after-410")
        .await
        .expect("watcher re-listed after 410");
    task.abort();
    // A raw watch from a compacted version gets an ERROR event with a 410 Status.
    let lp = kube::api::WatchParams::default();
    let mut old = api.watch(&lp, "1").await.unwrap().boxed();
    let first = tokio::time::timeout(Duration::from_secs(10), old.try_next())
        .await
        .expect("event in time");
    match first {
        Ok(Some(kube::api::WatchEvent::Error(e))) => assert_eq!(e.code, 410),
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 410),
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_patch_with_each_patch_kind_and_metadata() {
    let s = Server::start().await;
    let client = client(&s).await;
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "p", "labels": {"a": "1"}},
        "spec": {"type": "LoadBalancer", "selector": {"app": "p"}, "ports": [{"name": "http", "port": 80}]}
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &svc).await.unwrap();
    let spec = created.spec.as_ref().unwrap();
    assert!(spec.cluster_ip.as_deref().unwrap().starts_with("127.96."));
    assert!(spec.ports.as_ref().unwrap()[0].node_port.is_some());
    let pp = PatchParams::default();
    let merged = api
        .patch("p", &pp, &Patch::Merge(json!({"metadata": {"labels": {"b": "2"}}})))
        .await
        .unwrap();
    assert_eq!(merged.labels().get("b").map(String::as_str), Some("2"));
    let jp: json_patch::Patch =
        serde_json::from_value(json!([{"op": "add", "path": "/metadata/annotations", "value": {"x": "y"}}])).unwrap();
    let patched = api.patch("p", &pp, &Patch::Json::<()>(jp)).await.unwrap();
    assert_eq!(patched.annotations().get("x").map(String::as_str), Some("y"));
    let smp = api
        .patch(
            "p",
            &pp,
            &Patch::Strategic(json!({"spec": {"ports": [{"name": "https", "port": 443}]}})),
        )
        .await
        .unwrap();
    assert_eq!(smp.spec.as_ref().unwrap().ports.as_ref().unwrap().len(), 2);
    let ssa = PatchParams::apply("kube-test").force();
    let applied = api
        .patch(
            "p",
            &ssa,
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "p", "labels": {"owned": "yes"}}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(applied.labels().get("owned").map(String::as_str), Some("yes"));
    assert!(
        applied
            .managed_fields()
            .iter()
            .any(|m| m.manager.as_deref() == Some("kube-test"))
    );
    // Status subresource: only status changes there.
    let st = api
        .patch_status(
            "p",
            &pp,
            &Patch::Merge(json!({"spec": {"type": "ClusterIP"}, "status": {"loadBalancer": {"ingress": [{"ip": "127.203.0.7"}]}}})),
        )
        .await
        .unwrap();
    assert_eq!(st.spec.as_ref().unwrap().type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(
        st.status.unwrap().load_balancer.unwrap().ingress.unwrap()[0]
            .ip
            .as_deref(),
        Some("127.203.0.7")
    );
    // Server-side apply on the status subresource (the controller-rs pattern) touches status only.
    let st = api
        .patch_status(
            "p",
            &PatchParams::apply("status-writer").force(),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Service", "spec": {"type": "NodePort"},
                "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Ok", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})),
        )
        .await
        .unwrap();
    assert_eq!(st.spec.as_ref().unwrap().type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(
        st.status.as_ref().unwrap().conditions.as_ref().unwrap()[0].type_,
        "Ready"
    );
    // Stale resourceVersion: 409.
    let mut stale = created.clone();
    stale.metadata.labels = Some([("c".to_string(), "3".to_string())].into());
    let err = api.replace("p", &PostParams::default(), &stale).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref e) if e.code == 409), "{err:?}");
    // Dry run.
    let dry = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    api.patch("p", &dry, &Patch::Merge(json!({"metadata": {"labels": {"dry": "1"}}})))
        .await
        .unwrap();
    assert!(api.get("p").await.unwrap().labels().get("dry").is_none());
    // Metadata-only reads.
    let meta = api.get_metadata("p").await.unwrap();
    assert_eq!(meta.metadata.name.as_deref(), Some("p"));
    let metas = api
        .list_metadata(&ListParams::default().labels("owned=yes"))
        .await
        .unwrap();
    assert_eq!(metas.items.len(), 1);
    // limit/continue.
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    for i in 0..5 {
        cms.create(&PostParams::default(), &cm(&format!("page-{i}")))
            .await
            .unwrap();
    }
    let first = cms.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().expect("continue token");
    let second = cms
        .list(&ListParams::default().limit(10).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(second.items.len(), 3);
    assert!(second.metadata.continue_.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorder_events_show_in_both_event_apis() {
    use k8s_openapi::api::core::v1::{Event as CoreEvent, ObjectReference};
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let s = Server::start().await;
    let client = client(&s).await;
    let svc = Api::<Service>::namespaced(client.clone(), "default")
        .get("kubernetes")
        .await
        .unwrap();
    let reference: ObjectReference = svc.object_ref(&());
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "kuberaya-test".into(),
            instance: Some("i-1".into()),
        },
    );
    let ev = Event {
        type_: EventType::Normal,
        reason: "Synced".into(),
        note: Some("synced the service".into()),
        action: "Sync".into(),
        secondary: None,
    };
    recorder.publish(&ev, &reference).await.unwrap();
    recorder.publish(&ev, &reference).await.unwrap();
    let core: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
    let list = core
        .list(&ListParams::default().fields("involvedObject.name=kubernetes"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);
    let e = &list.items[0];
    assert_eq!(e.message.as_deref(), Some("synced the service"));
    assert_eq!(e.series.as_ref().and_then(|s| s.count), Some(2));
    assert_eq!(e.reporting_component.as_deref(), Some("kuberaya-test"));
    let out = ok(&s, &["describe", "service", "kubernetes"]).await;
    assert!(out.contains("Synced") && out.contains("synced the service"), "{out}");

    // The stand-in validates Events as kube-apiserver does; what the Recorder writes
    // passes: without an instance (it then reports the controller's name), about a
    // cluster-scoped object (the Event goes to `default`), repeated (a series patch).
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let node = nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "worker-1"}})).unwrap(),
        )
        .await
        .unwrap();
    let anonymous = Recorder::new(
        client.clone(),
        Reporter {
            controller: "kuberaya-ccm-node-controller".into(),
            instance: None,
        },
    );
    let warning = Event {
        type_: EventType::Warning,
        reason: "InstanceNotFound".into(),
        note: Some("é".repeat(512)),
        action: "InstanceNotFound".into(),
        secondary: None,
    };
    for _ in 0..3 {
        anonymous.publish(&warning, &node.object_ref(&())).await.unwrap();
    }
    let list = core
        .list(&ListParams::default().fields("involvedObject.name=worker-1"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].series.as_ref().and_then(|s| s.count), Some(3));
    assert_eq!(
        list.items[0].reporting_instance.as_deref(),
        Some("kuberaya-ccm-node-controller")
    );
    // One byte more than kube-apiserver takes is refused, and the Recorder says so.
    let too_long = Event {
        note: Some(format!("{}a", "é".repeat(512))),
        reason: "Other".into(),
        ..warning
    };
    let err = anonymous.publish(&too_long, &node.object_ref(&())).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(e) if e.code == 422 && e.message.contains("can have at most 1024 characters")),
        "{err:?}"
    );
}

/// The patch sequence kube-lease-manager uses for leader election: server-side apply to
/// take a free lease, strategic merge to renew and release, 409 for a held one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_election_patch_sequence() {
    use k8s_openapi::api::coordination::v1::Lease;
    let s = Server::start().await;
    let leases: Api<Lease> = Api::namespaced(client(&s).await, "kube-system");
    let lease: Lease = serde_json::from_value(json!({"metadata": {"name": "ccm"}})).unwrap();
    leases.create(&PostParams::default(), &lease).await.unwrap();
    let take = |who: &str| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "spec": {"holderIdentity": who, "leaseDurationSeconds": 15, "acquireTime": "2026-01-01T00:00:00.000000Z", "renewTime": "2026-01-01T00:00:00.000000Z"}})
    };
    let pp = |who: &str| PatchParams {
        field_manager: Some(format!("lease-{who}")),
        ..Default::default()
    };
    leases.patch("ccm", &pp("a"), &Patch::Apply(take("a"))).await.unwrap();
    leases
        .patch(
            "ccm",
            &pp("a"),
            &Patch::Strategic(json!({"spec": {"renewTime": "2026-01-01T00:00:05.000000Z"}})),
        )
        .await
        .unwrap();
    let err = leases
        .patch("ccm", &pp("b"), &Patch::Apply(take("b")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409 && e.reason == "Conflict"),
        "{err:?}"
    );
    let release =
        json!({"spec": {"holderIdentity": null, "acquireTime": null, "renewTime": null, "leaseDurationSeconds": null}});
    leases.patch("ccm", &pp("a"), &Patch::Strategic(release)).await.unwrap();
    let got = leases.patch("ccm", &pp("b"), &Patch::Apply(take("b"))).await.unwrap();
    assert_eq!(got.spec.unwrap().holder_identity.as_deref(), Some("b"));
}

#[derive(Debug, thiserror::Error)]
enum ReconcileError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

const FINALIZER: &str = "example.com/lb-cleanup";

async fn reconcile(
    svc: Arc<Service>,
    client: Client,
) -> Result<Action, kube::runtime::finalizer::Error<ReconcileError>> {
    let api: Api<Service> = Api::namespaced(client, &svc.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER, svc, |ev| async {
        match ev {
            FinalizerEvent::Apply(s) => {
                let status = json!({"status": {
                    "loadBalancer": {"ingress": [{"ip": "127.203.0.9"}]},
                    "conditions": [{"type": "LoadBalancerReady", "status": "True", "reason": "Provisioned", "message": "ok", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
                }});
                api.patch_status(&s.name_any(), &PatchParams::default(), &Patch::Merge(status)).await?;
                Ok(Action::await_change())
            }
            FinalizerEvent::Cleanup(_) => Ok(Action::await_change()),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_reconciles_finalizer_and_status() {
    let s = Server::start().await;
    let client = client(&s).await;
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let ctl_client = client.clone();
    let controller = Controller::new(api.clone(), watcher::Config::default())
        .run(
            move |svc, _ctx: Arc<()>| reconcile(svc, ctl_client.clone()),
            |_svc, _err, _ctx| Action::requeue(Duration::from_millis(200)),
            Arc::new(()),
        )
        .for_each(|_| async {});
    let ctl = tokio::spawn(controller);
    let svc: Service = serde_json::from_value(
        json!({"metadata": {"name": "lb"}, "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}}),
    )
    .unwrap();
    api.create(&PostParams::default(), &svc).await.unwrap();
    let done = eventually(20, || {
        let api = api.clone();
        async move {
            let s = api.get("lb").await.ok()?;
            let has_fin = s.finalizers().iter().any(|f| f == FINALIZER);
            let ip = s
                .status
                .as_ref()?
                .load_balancer
                .as_ref()?
                .ingress
                .as_ref()?
                .first()?
                .ip
                .clone()?;
            (has_fin && ip == "127.203.0.9").then_some(s)
        }
    })
    .await;
    assert_eq!(done.status.unwrap().conditions.unwrap()[0].type_, "LoadBalancerReady");
    api.delete("lb", &DeleteParams::default()).await.unwrap();
    eventually(20, || {
        let api = api.clone();
        async move { matches!(api.get_opt("lb").await, Ok(None)).then_some(()) }
    })
    .await;
    ctl.abort();
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "test.kuberaya.io",
    version = "v1alpha1",
    kind = "Gadget",
    namespaced,
    status = "GadgetStatus",
    shortname = "gd"
)]
#[kube(printcolumn = r#"{"name":"Color","type":"string","jsonPath":".spec.color"}"#)]
pub struct GadgetSpec {
    color: String,
    #[schemars(range(min = 1, max = 5))]
    size: i32,
}

#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema, Default)]
pub struct GadgetStatus {
    ready: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_from_derive_is_usable_at_once() {
    let s = Server::start().await;
    let client = client(&s).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = crds.create(&PostParams::default(), &Gadget::crd()).await.unwrap();
    let established = crd
        .status
        .unwrap()
        .conditions
        .unwrap()
        .iter()
        .any(|c| c.type_ == "Established" && c.status == "True");
    assert!(established);
    let gadgets: Api<Gadget> = Api::namespaced(client.clone(), "default");
    let g = Gadget::new(
        "g1",
        GadgetSpec {
            color: "red".into(),
            size: 3,
        },
    );
    let created = gadgets.create(&PostParams::default(), &g).await.unwrap();
    assert_eq!(created.meta().generation, Some(1));
    let bad = Gadget::new(
        "g2",
        GadgetSpec {
            color: "blue".into(),
            size: 9,
        },
    );
    let err = gadgets.create(&PostParams::default(), &bad).await.unwrap_err();
    match err {
        kube::Error::Api(e) => {
            assert_eq!(e.code, 422);
            assert!(
                e.message
                    .contains("spec.size in body should be less than or equal to 5"),
                "{}",
                e.message
            );
        }
        other => panic!("{other:?}"),
    }
    let st = gadgets
        .patch_status(
            "g1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ready": true}})),
        )
        .await
        .unwrap();
    assert_eq!(st.meta().generation, Some(1));
    assert!(st.status.unwrap().ready);
    let list = gadgets.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    // Discovery sees it too.
    let discovery = kube::Discovery::new(client).run().await.unwrap();
    assert!(discovery.groups().any(|g| g.name() == "test.kuberaya.io"));
}

/// Issue 19: a list emptied by any route is stored absent, as kube-apiserver's Go
/// `omitempty` leaves it, so kube-runtime's `finalizer()` (a JSON patch that tests
/// `/metadata/finalizers` for null, then adds) works on every such object. Before, a
/// stored `finalizers: []` failed that test and a Service never got its LB back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalizers_emptied_by_every_route_are_absent_and_the_finalizer_helper_adds_again() {
    let s = Server::start().await;
    let client = client(&s).await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let pp = PatchParams::default();
    let with = |name: &str| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name, "finalizers": ["example.com/f"]}, "data": {"k": "v"}}))
            .unwrap()
    };
    let add_first: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/finalizers", "value": null},
        {"op": "add", "path": "/metadata/finalizers", "value": ["example.com/again"]}
    ]))
    .unwrap();
    for route in ["merge", "json", "strategic", "update", "apply"] {
        let name = format!("emptied-by-{route}");
        let ssa = PatchParams::apply("kube-test").force();
        if route == "apply" {
            // Server-side apply removes only what the applier owns: it made the object.
            api.patch(&name, &ssa, &Patch::Apply(with(&name))).await.unwrap();
        } else {
            api.create(&PostParams::default(), &with(&name)).await.unwrap();
        }
        let emptied = match route {
            "merge" => {
                api.patch(&name, &pp, &Patch::Merge(json!({"metadata": {"finalizers": []}})))
                    .await
            }
            "json" => {
                let p: json_patch::Patch =
                    serde_json::from_value(json!([{"op": "remove", "path": "/metadata/finalizers/0"}])).unwrap();
                api.patch(&name, &pp, &Patch::Json::<()>(p)).await
            }
            "strategic" => {
                api.patch(
                    &name,
                    &pp,
                    &Patch::Strategic(json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["example.com/f"]}})),
                )
                .await
            }
            "update" => {
                let mut cm = api.get(&name).await.unwrap();
                cm.metadata.finalizers = Some(vec![]);
                api.replace(&name, &PostParams::default(), &cm).await
            }
            _ => {
                api.patch(
                    &name,
                    &ssa,
                    &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": name, "finalizers": []}, "data": {"k": "v"}})),
                )
                .await
            }
        }
        .unwrap_or_else(|e| panic!("{route}: {e}"));
        assert_eq!(emptied.metadata.finalizers, None, "{route}: answered without the list");
        let raw: serde_json::Value = s
            .http()
            .get(format!("{}/api/v1/namespaces/default/configmaps/{name}", s.url()))
            .bearer_auth(s.token())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            raw["metadata"].get("finalizers").is_none(),
            "{route}: stored without the list: {raw}"
        );
        let again = api.patch(&name, &pp, &Patch::Json::<()>(add_first.clone())).await;
        let again = again.unwrap_or_else(|e| panic!("{route}: the finalizer helper's patch: {e}"));
        assert_eq!(again.finalizers(), ["example.com/again"], "{route}");
    }
}

/// Field selectors read an absent member as its Go zero value: an uncordoned Node
/// matches `spec.unschedulable=false` (`kubectl get nodes --field-selector`, and what
/// node controllers list by).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncordoned_node_matches_spec_unschedulable_false() {
    use k8s_openapi::api::core::v1::Node;
    let s = Server::start().await;
    let client = client(&s).await;
    let api: Api<Node> = Api::all(client);
    for name in ["n1", "n2"] {
        let n: Node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        api.create(&PostParams::default(), &n).await.unwrap();
    }
    api.patch(
        "n2",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"unschedulable": true}})),
    )
    .await
    .unwrap();
    let names = |list: kube::core::ObjectList<Node>| list.items.iter().map(|n| n.name_any()).collect::<Vec<_>>();
    let schedulable = api
        .list(&ListParams::default().fields("spec.unschedulable=false"))
        .await
        .unwrap();
    assert_eq!(names(schedulable), ["n1"]);
    let cordoned = api
        .list(&ListParams::default().fields("spec.unschedulable!=false"))
        .await
        .unwrap();
    assert_eq!(names(cordoned), ["n2"]);
    let unknown = api.list(&ListParams::default().fields("spec.podCIDR=x")).await;
    assert!(
        matches!(unknown, Err(kube::Error::Api(ref e)) if e.code == 400),
        "{unknown:?}"
    );
}

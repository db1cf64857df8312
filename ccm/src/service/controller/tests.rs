//! Reconcile tests: the kube side through a `tower_test` mock API server that records
//! every request (controller-rs's `ApiServerVerifier` pattern: an unexpected call shows
//! up in the recording, a missing one too), the platform side through
//! [`FakePlatform`].

use super::*;
use crate::backoff::{Backoff, Jitter};
use crate::metrics::Metrics;
use crate::platform::fake::{FakeFailure, FakePlatform};
use crate::platform::{LABEL_CLUSTER_ID, LABEL_SERVICE_NAME, LABEL_SERVICE_UID, LoadBalancer};
use crate::service::desired::tests::{annotate, cfg, svc};
use crate::service::lb_cache::KnownLb;
use crate::service::nodes::tests::{node, with_label};
use crate::service::status::Ready;
use crate::service::sweep::sweep_orphans;
use crate::testing::{Call, mock_api_server};
use http::{Request, Response};
use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::client::Body;
use kube::runtime::watcher::Event as WatchEvent;
use serde_json::Value;

const SVC_PATH: &str = "/api/v1/namespaces/default/services/web";
const STATUS_PATH: &str = "/api/v1/namespaces/default/services/web/status";

/// A test bench: the fake platform, a node store, and a function running one reconcile
/// against a recording mock API server.
struct Bench {
    platform: Arc<FakePlatform>,
    nodes: Store<Node>,
    writer: reflector::store::Writer<Node>,
    metrics: Arc<Metrics>,
    config: DesiredConfig,
}

impl Bench {
    fn new(node_names: &[&str]) -> Self {
        let platform = Arc::new(FakePlatform::new());
        let (nodes, mut writer) = reflector::store::<Node>();
        for (i, n) in node_names.iter().enumerate() {
            platform.add_vm(&format!("vm-{n}"), &format!("127.10.0.{}", 11 + i));
            writer.apply_watcher_event(&WatchEvent::Apply(node(n)));
        }
        Bench {
            platform,
            nodes,
            writer,
            metrics: Arc::new(Metrics::default()),
            config: cfg(),
        }
    }

    /// A bench on a platform cluster with IPv6, whose VMs (and so Nodes, as the node
    /// controller writes them) have both a private IPv4 and IPv6 address.
    fn dual(node_names: &[&str]) -> Self {
        use crate::service::nodes::tests::with_internal_ips;
        let platform = Arc::new(FakePlatform::new());
        platform.enable_ipv6();
        let (nodes, mut writer) = reflector::store::<Node>();
        for (i, n) in node_names.iter().enumerate() {
            let (v4, v6) = (format!("127.10.0.{}", 11 + i), format!("fd00:10::{}", 11 + i));
            platform.add_vm_dual(&format!("vm-{n}"), &v4, &v6);
            writer.apply_watcher_event(&WatchEvent::Apply(with_internal_ips(node(n), &[&v4, &v6])));
        }
        Bench {
            platform,
            nodes,
            writer,
            metrics: Arc::new(Metrics::default()),
            config: crate::service::desired::tests::dual_cfg(),
        }
    }

    fn add_node(&mut self, name: &str) {
        self.platform.add_vm(&format!("vm-{name}"), "127.10.0.99");
        self.writer.apply_watcher_event(&WatchEvent::Apply(node(name)));
    }

    fn context(&self) -> (Arc<Context>, tower_test::mock::Handle<Request<Body>, Response<Body>>) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (self.context_on(Client::new(service, "default")), handle)
    }

    fn context_on(&self, client: Client) -> Arc<Context> {
        let ctx = Context::new(
            client,
            self.platform.clone(),
            self.metrics.clone(),
            self.nodes.clone(),
            self.config.clone(),
            Timing::default(),
        );
        Arc::new(ctx)
    }

    /// A context whose API requests a mock server answers (with `s`, or an Event's own
    /// body) and records until the context is dropped.
    fn served_context(&self, s: &Service) -> (Arc<Context>, tokio::task::JoinHandle<Vec<Call>>) {
        let answer_with = serde_json::to_value(s).expect("encode service");
        let (client, server) = mock_api_server(move |method, path, body| {
            let answer = if path.ends_with("/events") {
                body.clone()
            } else {
                answer_with.clone()
            };
            (if method == "POST" { 201 } else { 200 }, answer)
        });
        (self.context_on(client), server)
    }

    /// Runs one reconcile; returns its result and every API request it made.
    async fn reconcile(&self, s: &Service) -> (Result<Action>, Vec<Call>) {
        let (ctx, server) = self.served_context(s);
        let res = reconcile_on(&ctx, s).await;
        (res, stop_serving(ctx, server).await)
    }
}

/// One reconcile of `s` on a context kept across reconciles (what it remembers counts).
async fn reconcile_on(ctx: &Arc<Context>, s: &Service) -> Result<Action> {
    tokio::time::timeout(Duration::from_secs(5), reconcile(Arc::new(s.clone()), ctx.clone()))
        .await
        .expect("reconcile finished within 5 s")
}

/// Drops the context (and with it the mock client and its Event queue, once drained), so
/// the mock server ends; returns every API request it recorded, the Events last (they
/// are published off the reconcile path, in their own order: see `EventQueue`).
async fn stop_serving(ctx: Arc<Context>, server: tokio::task::JoinHandle<Vec<Call>>) -> Vec<Call> {
    drop(ctx);
    let mut calls = tokio::time::timeout(Duration::from_secs(1), server)
        .await
        .expect("mock API server finished")
        .expect("mock API server task");
    calls.sort_by_key(|c| c.method == "POST" && c.path.ends_with("/events"));
    calls
}

fn finalized(mut s: Service) -> Service {
    s.metadata.finalizers = Some(vec![FINALIZER.into()]);
    s
}

fn deleting(mut s: Service) -> Service {
    s.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    s
}

fn with_type(mut s: Service, t: &str) -> Service {
    if let Some(spec) = s.spec.as_mut() {
        spec.type_ = Some(t.into());
    }
    s
}

/// The Service as it looks once its LB is reported: ingress and a Ready condition.
fn with_ready_status(mut s: Service, lb: &LoadBalancer) -> Service {
    let addrs = crate::service::desired::ingress_ips(lb);
    let ready = Ready::yes(if addrs.is_empty() {
        format!("load balancer {} is active", lb.id)
    } else {
        format!("load balancer {} is active at {}", lb.id, addrs.join(", "))
    });
    s.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(
                addrs
                    .into_iter()
                    .map(|a| LoadBalancerIngress {
                        ip: Some(a),
                        ip_mode: Some("VIP".into()),
                        ..LoadBalancerIngress::default()
                    })
                    .collect(),
            ),
        }),
        conditions: Some(vec![Condition {
            type_: crate::service::CONDITION_TYPE.into(),
            status: "True".into(),
            reason: ready.reason,
            message: ready.message,
            observed_generation: None,
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        }]),
    });
    s
}

/// Reconciles a finalized Service until its LB is active; returns the LB.
async fn provisioned(bench: &Bench, s: &Service) -> LoadBalancer {
    let (res, _) = bench.reconcile(s).await;
    assert!(res.is_ok(), "{res:?}");
    bench.platform.settle();
    let lbs = bench.platform.lbs("cl-1");
    assert_eq!(lbs.len(), 1);
    bench.platform.clear_calls();
    lbs[0].clone()
}

#[tokio::test]
async fn finalizer_is_added_before_any_platform_call() {
    let bench = Bench::new(&["a", "b"]);
    let (res, calls) = bench.reconcile(&svc()).await;
    assert_eq!(res.expect("ok"), Action::await_change());
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].is("PATCH", SVC_PATH));
    assert!(calls[0].body.to_string().contains(FINALIZER), "{:?}", calls[0].body);
    assert!(bench.platform.calls().is_empty(), "{:?}", bench.platform.calls());
}

#[tokio::test]
async fn other_classes_and_types_are_left_alone() {
    let bench = Bench::new(&["a"]);
    let mut other = svc();
    if let Some(spec) = other.spec.as_mut() {
        spec.load_balancer_class = Some("other.example/lb".into());
    }
    for s in [other, with_type(svc(), "ClusterIP"), with_type(svc(), "NodePort")] {
        let (res, calls) = bench.reconcile(&s).await;
        assert_eq!(res.expect("ok"), Action::await_change());
        assert!(calls.is_empty(), "{calls:?}");
    }
    assert!(bench.platform.calls().is_empty());
}

#[tokio::test]
async fn creates_the_lb_then_reports_ingress_once_active() {
    let bench = Bench::new(&["a", "b"]);
    let s = finalized(svc());
    let (res, calls) = bench.reconcile(&s).await;
    assert_eq!(
        res.expect("ok"),
        Action::requeue(Timing::default().first_poll),
        "polls soon, never blocks"
    );
    assert_eq!(bench.platform.mutating_calls(), vec!["create_load_balancer"]);
    let lbs = bench.platform.lbs("cl-1");
    assert_eq!(lbs.len(), 1);
    let lb = &lbs[0];
    assert_eq!(lb.name, "kr-default-web");
    assert_eq!(lb.labels[crate::platform::LABEL_SERVICE_UID], "uid-1");
    assert_eq!(lb.backends.len(), 2);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[0].is("PATCH", STATUS_PATH));
    assert_eq!(calls[0].body["status"]["conditions"][0]["reason"], "Provisioning");
    assert!(
        calls[0].body["status"].get("loadBalancer").is_none(),
        "no ingress before active"
    );
    assert!(calls[1].is_event("EnsuringLoadBalancer"));

    // Still provisioning (seen by a controller that did not create it, e.g. after a
    // restart): poll at the full period, no call that changes anything, no status write
    // (the condition already says Provisioning once the Service shows it).
    bench.platform.clear_calls();
    let (res, _) = bench.reconcile(&s).await;
    assert_eq!(res.expect("ok"), Action::requeue(Timing::default().poll));
    assert!(bench.platform.mutating_calls().is_empty());

    bench.platform.settle();
    bench.platform.clear_calls();
    let (res, calls) = bench.reconcile(&s).await;
    assert!(res.is_ok());
    assert!(bench.platform.mutating_calls().is_empty());
    let addr = lb.public_ip.as_ref().map(|ip| ip.address.to_string()).expect("ip");
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[0].is("PATCH", STATUS_PATH));
    assert_eq!(
        calls[0].body["status"]["loadBalancer"]["ingress"][0]["ip"],
        addr.as_str()
    );
    assert_eq!(calls[0].body["status"]["conditions"][0]["status"], "True");
    assert!(calls[1].is_event("EnsuredLoadBalancer"));
}

#[tokio::test]
async fn resync_with_nothing_changed_makes_no_call_at_all() {
    let bench = Bench::new(&["a", "b"]);
    let lb = provisioned(&bench, &finalized(svc())).await;
    let s = with_ready_status(finalized(svc()), &lb);
    for _ in 0..3 {
        let (res, calls) = bench.reconcile(&s).await;
        let action = res.expect("ok");
        assert_ne!(action, Action::await_change(), "periodic resync stays scheduled");
        assert!(calls.is_empty(), "no status write, no event: {calls:?}");
    }
    assert!(
        bench.platform.mutating_calls().is_empty(),
        "{:?}",
        bench.platform.calls()
    );
}

#[tokio::test]
async fn status_is_patched_only_when_the_ingress_changes() {
    let bench = Bench::new(&["a"]);
    let lb = provisioned(&bench, &finalized(svc())).await;
    let mut s = with_ready_status(finalized(svc()), &lb);
    if let Some(ing) = s
        .status
        .as_mut()
        .and_then(|st| st.load_balancer.as_mut())
        .and_then(|l| l.ingress.as_mut())
    {
        ing[0].ip = Some("127.203.0.250".into());
    }
    let (res, calls) = bench.reconcile(&s).await;
    assert!(res.is_ok());
    assert_eq!(calls.len(), 1, "only the status patch, no event: {calls:?}");
    assert!(calls[0].is("PATCH", STATUS_PATH));
    assert!(
        calls[0].body["status"].get("conditions").is_none(),
        "condition unchanged"
    );
    assert!(bench.platform.mutating_calls().is_empty());
}

#[tokio::test]
async fn invalid_annotation_warns_and_makes_no_platform_call() {
    let bench = Bench::new(&["a"]);
    let s = annotate(finalized(svc()), crate::annotations::ALGORITHM, "fastest");
    let (res, calls) = bench.reconcile(&s).await;
    assert_eq!(res.expect("ok"), Action::requeue(Timing::default().refused_retry));
    assert!(bench.platform.calls().is_empty(), "{:?}", bench.platform.calls());
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[0].is("PATCH", STATUS_PATH));
    assert_eq!(calls[0].body["status"]["conditions"][0]["reason"], "InvalidAnnotation");
    assert!(calls[1].is_event("SyncLoadBalancerFailed"));
    assert_eq!(calls[1].body["type"], "Warning");
    let note = calls[1].body["note"].as_str().unwrap_or_default();
    assert!(
        note.contains(crate::annotations::ALGORITHM) && note.contains("round_robin"),
        "{note}"
    );
}

fn with_families(mut s: Service, families: &[&str], policy: &str) -> Service {
    if let Some(spec) = s.spec.as_mut() {
        spec.ip_families = Some(families.iter().map(|f| (*f).to_owned()).collect());
        spec.ip_family_policy = Some(policy.to_owned());
    }
    s
}

/// RequireDualStack (or IPv6 only) on a platform cluster without IPv6: a Warning Event
/// and our condition False with reason IPv6Unavailable; no platform call at all, so no
/// half-made LB, and a slow retry.
#[tokio::test]
async fn require_dual_stack_without_platform_ipv6_is_refused_before_any_platform_call() {
    let bench = Bench::new(&["a"]);
    for s in [
        with_families(finalized(svc()), &["IPv4", "IPv6"], "RequireDualStack"),
        with_families(finalized(svc()), &["IPv6"], "SingleStack"),
    ] {
        let (res, calls) = bench.reconcile(&s).await;
        assert_eq!(res.expect("ok"), Action::requeue(Timing::default().refused_retry));
        assert!(bench.platform.calls().is_empty(), "{:?}", bench.platform.calls());
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert!(calls[0].is("PATCH", STATUS_PATH));
        let cond = &calls[0].body["status"]["conditions"][0];
        assert_eq!(
            (cond["status"].as_str(), cond["reason"].as_str()),
            (Some("False"), Some("IPv6Unavailable"))
        );
        assert!(
            calls[0].body["status"].get("loadBalancer").is_none(),
            "ingress left alone"
        );
        assert!(calls[1].is_event("SyncLoadBalancerFailed"));
        assert_eq!(calls[1].body["type"], "Warning");
        let note = calls[1].body["note"].as_str().unwrap_or_default();
        assert!(note.contains("cl-1 has no IPv6"), "{note}");
    }
    assert!(bench.platform.lbs("cl-1").is_empty());
    assert!(bench.platform.public_ips().is_empty());
}

/// PreferDualStack on a platform cluster with IPv6: one create with both families,
/// then both addresses in the ingress, IPv4 first, each `ipMode: VIP`; the backends
/// carry both addresses.
#[tokio::test]
async fn prefer_dual_stack_gets_an_lb_of_both_families_and_both_ingress_entries() {
    let bench = Bench::dual(&["a", "b"]);
    let s = with_families(finalized(svc()), &["IPv6", "IPv4"], "PreferDualStack");
    let (res, _) = bench.reconcile(&s).await;
    assert!(res.is_ok(), "{res:?}");
    assert_eq!(bench.platform.mutating_calls(), vec!["create_load_balancer"]);
    bench.platform.settle();
    let lb = bench.platform.lbs("cl-1").remove(0);
    assert_eq!(
        lb.ip_versions,
        vec![crate::platform::IpVersion::V4, crate::platform::IpVersion::V6]
    );
    let (v4, v6) = (
        lb.public_ip.clone().expect("IPv4").address,
        lb.public_ipv6.clone().expect("IPv6").address,
    );
    assert!(v4.is_ipv4() && v6.is_ipv6());
    assert!(
        lb.backends
            .iter()
            .all(|b| b.private_ip.is_some() && b.private_ipv6.is_some()),
        "{lb:?}"
    );

    bench.platform.clear_calls();
    let (res, calls) = bench.reconcile(&s).await;
    assert!(res.is_ok());
    assert!(bench.platform.mutating_calls().is_empty());
    assert!(calls[0].is("PATCH", STATUS_PATH));
    assert_eq!(
        calls[0].body["status"]["loadBalancer"]["ingress"],
        serde_json::json!([
            {"ip": v4.to_string(), "ipMode": "VIP"},
            {"ip": v6.to_string(), "ipMode": "VIP"}
        ])
    );
    let msg = calls[0].body["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(msg.contains(&v4.to_string()) && msg.contains(&v6.to_string()), "{msg}");
    // Once the Service shows it: nothing more.
    bench.platform.clear_calls();
    let (_, calls) = bench.reconcile(&with_ready_status(s, &lb)).await;
    assert!(calls.is_empty(), "{calls:?}");
    assert!(bench.platform.mutating_calls().is_empty());
}

/// SingleStack -> PreferDualStack -> SingleStack on a live Service: each a PUT of the
/// LB's families (never a new LB, the IPv4 address kept), the ingress following; the
/// IPv6 address the platform acquired is released when IPv6 goes.
#[tokio::test]
async fn a_family_policy_change_updates_the_lb_in_place_and_the_ingress_follows() {
    let bench = Bench::dual(&["a"]);
    let single = with_families(finalized(svc()), &["IPv4"], "SingleStack");
    let lb = provisioned(&bench, &single).await;
    assert_eq!(lb.ip_versions, vec![crate::platform::IpVersion::V4]);
    assert!(lb.public_ipv6.is_none());

    let prefer = with_families(
        with_ready_status(single.clone(), &lb),
        &["IPv4", "IPv6"],
        "PreferDualStack",
    );
    let (res, calls) = bench.reconcile(&prefer).await;
    assert_eq!(res.expect("ok"), Action::requeue(Timing::default().poll));
    assert_eq!(bench.platform.mutating_calls(), vec!["update_load_balancer"]);
    assert!(calls.iter().any(|c| c.is_event("UpdatedLoadBalancer")), "{calls:?}");
    bench.platform.settle();
    let dual = bench.platform.lbs("cl-1").remove(0);
    assert_eq!(dual.id, lb.id);
    assert_eq!(dual.public_ip, lb.public_ip, "the IPv4 address stays");
    let v6 = dual.public_ipv6.clone().expect("an IPv6 address added");
    bench.platform.clear_calls();
    let (_, calls) = bench.reconcile(&prefer).await;
    assert!(bench.platform.mutating_calls().is_empty());
    let ingress = &calls[0].body["status"]["loadBalancer"]["ingress"];
    assert_eq!(ingress.as_array().map(Vec::len), Some(2), "{calls:?}");
    assert_eq!(ingress[1]["ip"], v6.address.to_string());

    let back = with_families(with_ready_status(single, &dual), &["IPv4"], "SingleStack");
    bench.platform.clear_calls();
    let (res, _) = bench.reconcile(&back).await;
    assert!(res.is_ok());
    assert_eq!(bench.platform.mutating_calls(), vec!["update_load_balancer"]);
    bench.platform.settle();
    let after = bench.platform.lbs("cl-1").remove(0);
    assert_eq!((after.id.as_str(), after.public_ipv6.as_ref()), (lb.id.as_str(), None));
    assert!(
        !bench.platform.public_ips().iter().any(|ip| ip.id == v6.id),
        "the acquired IPv6 address is released"
    );
    bench.platform.clear_calls();
    let (_, calls) = bench.reconcile(&back).await;
    assert_eq!(
        calls[0].body["status"]["loadBalancer"]["ingress"],
        serde_json::json!([{"ip": lb.public_ip.expect("IPv4").address.to_string(), "ipMode": "VIP"}])
    );
}

/// An IPv6-only Service: an LB with only an IPv6 address, backends the nodes with IPv6.
#[tokio::test]
async fn an_ipv6_only_service_gets_an_ipv6_only_lb() {
    let mut bench = Bench::dual(&["a", "b"]);
    bench.add_node("c"); // a node without IPv6
    let s = with_families(finalized(svc()), &["IPv6"], "SingleStack");
    let lb = provisioned(&bench, &s).await;
    assert_eq!(lb.ip_versions, vec![crate::platform::IpVersion::V6]);
    assert!(lb.public_ip.is_none() && lb.public_ipv6.is_some());
    let mut vms: Vec<&str> = lb.backends.iter().map(|b| b.vm_id.as_str()).collect();
    vms.sort();
    assert_eq!(vms, vec!["vm-a", "vm-b"]);
    let (_, calls) = bench.reconcile(&s).await;
    let ingress = &calls[0].body["status"]["loadBalancer"]["ingress"];
    assert_eq!(ingress.as_array().map(Vec::len), Some(1), "{calls:?}");
    assert!(ingress[0]["ip"].as_str().is_some_and(|ip| ip.contains(':')));
}

#[tokio::test]
async fn invalid_annotation_leaves_an_existing_lb_exactly_as_it_was() {
    let bench = Bench::new(&["a"]);
    let lb = provisioned(&bench, &finalized(svc())).await;
    let s = annotate(
        with_ready_status(finalized(svc()), &lb),
        crate::annotations::HEALTH_CHECK_PORT,
        "99999",
    );
    let (res, _) = bench.reconcile(&s).await;
    assert!(res.is_ok());
    assert!(bench.platform.calls().is_empty(), "{:?}", bench.platform.calls());
    assert_eq!(bench.platform.lbs("cl-1"), vec![lb]);
}

#[tokio::test]
async fn annotation_change_updates_in_place_keeping_the_ip() {
    let bench = Bench::new(&["a"]);
    let lb = provisioned(&bench, &finalized(svc())).await;
    let s = annotate(
        with_ready_status(finalized(svc()), &lb),
        crate::annotations::ALGORITHM,
        "least_connection",
    );
    let (res, calls) = bench.reconcile(&s).await;
    assert_eq!(res.expect("ok"), Action::requeue(Timing::default().poll));
    assert_eq!(bench.platform.mutating_calls(), vec!["update_load_balancer"]);
    assert!(calls.iter().any(|c| c.is_event("UpdatedLoadBalancer")), "{calls:?}");
    let after = &bench.platform.lbs("cl-1")[0];
    assert_eq!(after.public_ip, lb.public_ip);
    assert_eq!(after.rules[0].algorithm, crate::platform::Algorithm::LeastConnection);
}

#[tokio::test]
async fn a_new_node_is_added_to_the_backends() {
    let mut bench = Bench::new(&["a", "b"]);
    let lb = provisioned(&bench, &finalized(svc())).await;
    bench.add_node("c");
    let s = with_ready_status(finalized(svc()), &lb);
    let (res, _) = bench.reconcile(&s).await;
    assert!(res.is_ok());
    assert_eq!(bench.platform.mutating_calls(), vec!["update_load_balancer"]);
    assert_eq!(bench.platform.lbs("cl-1")[0].backends.len(), 3);
}

/// A reconcile that is not a node tick's (a resync, a Service edit) plans with the nodes
/// of the last settled batch: a node change in mid-burst moves no backend until the
/// burst's tick, so the LB is updated once per burst.
#[tokio::test]
async fn backends_follow_the_settled_node_set_not_a_burst_in_progress() {
    let mut bench = Bench::new(&["a", "b"]);
    let lb = provisioned(&bench, &finalized(svc())).await;
    let s = with_ready_status(finalized(svc()), &lb);
    let (ctx, server) = bench.served_context(&s);
    ctx.nodes.settle();
    bench.add_node("c");
    reconcile_on(&ctx, &s).await.expect("resync in mid-burst");
    assert!(bench.platform.mutating_calls().is_empty());
    assert_eq!(bench.platform.lbs("cl-1")[0].backends.len(), 2);
    ctx.nodes.settle();
    reconcile_on(&ctx, &s).await.expect("the burst's tick");
    assert_eq!(bench.platform.mutating_calls(), vec!["update_load_balancer"]);
    assert_eq!(bench.platform.lbs("cl-1")[0].backends.len(), 3);
    stop_serving(ctx, server).await;
}

#[tokio::test]
async fn drift_is_repaired_and_a_vanished_lb_recreated() {
    let bench = Bench::new(&["a", "b"]);
    let lb = provisioned(&bench, &finalized(svc())).await;
    let s = with_ready_status(finalized(svc()), &lb);
    bench.platform.modify_lb("cl-1", &lb.id, |l| l.backends.clear());
    let (res, _) = bench.reconcile(&s).await;
    assert!(res.is_ok());
    assert_eq!(bench.platform.mutating_calls(), vec!["update_load_balancer"]);
    bench.platform.settle();
    bench.platform.clear_calls();
    bench.platform.remove_lb("cl-1", &lb.id);
    let (res, _) = bench.reconcile(&s).await;
    assert!(res.is_ok());
    assert_eq!(bench.platform.mutating_calls(), vec!["create_load_balancer"]);
}

#[tokio::test]
async fn an_lb_from_before_a_restart_is_adopted_not_duplicated() {
    let bench = Bench::new(&["a"]);
    // Created for this Service before the CCM restarted (same UID label).
    let lb = provisioned(&bench, &finalized(svc())).await;
    let s = finalized(svc());
    let (res, _) = bench.reconcile(&s).await;
    assert!(res.is_ok());
    assert!(bench.platform.mutating_calls().is_empty());
    assert_eq!(bench.platform.lbs("cl-1"), vec![lb]);
}

#[tokio::test]
async fn platform_refusal_is_a_warning_and_a_condition_not_a_tight_loop() {
    let bench = Bench::new(&["a"]);
    bench.platform.fail_next(
        "create_load_balancer",
        FakeFailure::Conflict("no public IP available in region jkt".into()),
    );
    let (res, calls) = bench.reconcile(&finalized(svc())).await;
    assert_eq!(res.expect("ok"), Action::requeue(Timing::default().refused_retry));
    assert!(calls.iter().any(|c| c.is_event("SyncLoadBalancerFailed")), "{calls:?}");
    let status = calls.iter().find(|c| c.is("PATCH", STATUS_PATH)).expect("status patch");
    assert_eq!(status.body["status"]["conditions"][0]["reason"], "PlatformRefused");
    let msg = status.body["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(msg.contains("no public IP available"), "{msg}");

    // UDP switched off on the platform: 422 -> the same treatment.
    bench.platform.set_udp_enabled(false);
    let mut udp = finalized(svc());
    if let Some(spec) = udp.spec.as_mut() {
        spec.ports = Some(vec![crate::service::desired::tests::port(
            "dns",
            "UDP",
            53,
            Some(30053),
        )]);
    }
    let (res, calls) = bench.reconcile(&udp).await;
    assert_eq!(res.expect("ok"), Action::requeue(Timing::default().refused_retry));
    let status = calls.iter().find(|c| c.is("PATCH", STATUS_PATH)).expect("status patch");
    let msg = status.body["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(msg.contains("udp is not supported"), "{msg}");
}

/// Two Services asking for the same LB name: the second one's create is answered 409,
/// the lookup by name finds no LB of that Service, so it is refused (a Warning and the
/// condition), and the first one's LB is left exactly as it was.
#[tokio::test]
async fn an_lb_name_taken_by_another_service_is_refused_not_adopted() {
    let bench = Bench::new(&["a"]);
    let web = annotate(finalized(svc()), crate::annotations::NAME, "shared");
    let lb = provisioned(&bench, &web).await;
    let mut api = annotate(finalized(svc()), crate::annotations::NAME, "shared");
    api.metadata.name = Some("api".into());
    api.metadata.uid = Some("uid-2".into());
    bench.platform.clear_calls();
    let (res, calls) = bench.reconcile(&api).await;
    assert_eq!(res.expect("ok"), Action::requeue(Timing::default().refused_retry));
    assert_eq!(
        bench.platform.calls(),
        vec!["list_load_balancers", "create_load_balancer", "list_load_balancers"]
    );
    assert!(
        bench
            .platform
            .mutating_calls()
            .iter()
            .all(|c| c == "create_load_balancer")
    );
    assert_eq!(bench.platform.lbs("cl-1"), vec![lb]);
    assert!(calls.iter().any(|c| c.is_event("SyncLoadBalancerFailed")), "{calls:?}");
    let status = calls
        .iter()
        .find(|c| c.is("PATCH", "/services/api/status"))
        .expect("status patch");
    let msg = status.body["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(msg.contains("name already taken"), "{msg}");
}

#[tokio::test]
async fn transient_platform_errors_go_to_the_error_policy() {
    let bench = Bench::new(&["a"]);
    bench
        .platform
        .fail_next("create_load_balancer", FakeFailure::Server(503));
    let (res, calls) = bench.reconcile(&finalized(svc())).await;
    let err = res.expect_err("error");
    assert_eq!(err.metric_label(), "platform_server");
    assert!(calls.iter().any(|c| c.is_event("SyncLoadBalancerFailed")));
}

#[tokio::test]
async fn cleanup_deletes_the_lb_and_its_acquired_ip_then_removes_the_finalizer() {
    let bench = Bench::new(&["a"]);
    let lb = provisioned(&bench, &finalized(svc())).await;
    assert_eq!(bench.platform.public_ips().len(), 1);
    let s = deleting(with_ready_status(finalized(svc()), &lb));

    let (res, calls) = bench.reconcile(&s).await;
    // Waiting for the platform is a requeue, not an error (no backoff, no error metric):
    // first after its typical transition time. The finalizer stays.
    assert_eq!(
        res.expect("deletion in progress is not an error"),
        Action::requeue(Timing::default().first_poll)
    );
    assert_eq!(bench.platform.mutating_calls(), vec!["delete_load_balancer"]);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].is_event("DeletingLoadBalancer"));

    bench.platform.settle();
    assert!(bench.platform.lbs("cl-1").is_empty());
    assert!(bench.platform.public_ips().is_empty(), "acquired IP released");
    bench.platform.clear_calls();
    let (res, calls) = bench.reconcile(&s).await;
    assert!(res.is_ok(), "{res:?}");
    assert!(bench.platform.mutating_calls().is_empty());
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[0].is("PATCH", SVC_PATH));
    assert!(calls[1].is_event("DeletedLoadBalancer"));
    let patch = calls[0].body.to_string();
    assert!(
        patch.contains("remove") && patch.contains("/metadata/finalizers/0"),
        "{patch}"
    );
}

#[tokio::test]
async fn a_retained_ip_survives_cleanup() {
    let bench = Bench::new(&["a"]);
    let s = annotate(finalized(svc()), crate::annotations::RETAIN_PUBLIC_IP, "true");
    let lb = provisioned(&bench, &s).await;
    let d = deleting(with_ready_status(s, &lb));
    let (res, _) = bench.reconcile(&d).await;
    assert!(res.is_ok(), "{res:?}");
    bench.platform.settle();
    let ips = bench.platform.public_ips();
    assert_eq!(ips.len(), 1);
    assert_eq!(Some(ips[0].id.clone()), lb.public_ip.map(|ip| ip.id));
    assert!(ips[0].attached_to.is_none());
}

#[tokio::test]
async fn type_change_away_removes_lb_status_and_finalizer() {
    let bench = Bench::new(&["a"]);
    let lb = provisioned(&bench, &finalized(svc())).await;
    let s = with_type(with_ready_status(finalized(svc()), &lb), "ClusterIP");
    let (res, _) = bench.reconcile(&s).await;
    assert_eq!(
        res.expect("waits for the delete, as a requeue"),
        Action::requeue(Timing::default().first_poll)
    );
    assert_eq!(bench.platform.mutating_calls(), vec!["delete_load_balancer"]);
    bench.platform.settle();
    let (res, calls) = bench.reconcile(&s).await;
    assert_eq!(res.expect("ok"), Action::await_change());
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(calls[0].is("PATCH", STATUS_PATH));
    assert_eq!(
        calls[0].body["status"]["loadBalancer"]["ingress"],
        serde_json::json!([])
    );
    assert!(calls[1].is("PATCH", SVC_PATH));
    assert!(calls[2].is_event("DeletedLoadBalancer"));
}

#[tokio::test]
async fn load_balancer_ip_reuses_a_free_public_ip() {
    let bench = Bench::new(&["a"]);
    bench.platform.add_public_ip("ip-mine", "127.203.0.77");
    let mut s = finalized(svc());
    if let Some(spec) = s.spec.as_mut() {
        spec.load_balancer_ip = Some("127.203.0.77".into());
    }
    let (res, _) = bench.reconcile(&s).await;
    assert!(res.is_ok());
    let lb = &bench.platform.lbs("cl-1")[0];
    assert_eq!(lb.public_ip.as_ref().map(|ip| ip.id.as_str()), Some("ip-mine"));
    // Deleting keeps the user's IP.
    bench.platform.settle();
    let d = deleting(with_ready_status(s.clone(), lb));
    let _ = bench.reconcile(&d).await;
    bench.platform.settle();
    assert_eq!(bench.platform.public_ips().len(), 1);

    let mut unknown = finalized(svc());
    if let Some(spec) = unknown.spec.as_mut() {
        spec.load_balancer_ip = Some("127.203.0.78".into());
    }
    bench.platform.clear_calls();
    let (res, calls) = bench.reconcile(&unknown).await;
    assert_eq!(res.expect("ok"), Action::requeue(Timing::default().refused_retry));
    assert!(bench.platform.mutating_calls().is_empty());
    assert!(calls.iter().any(|c| c.is_event("SyncLoadBalancerFailed")));
}

/// The backoff of a Service's reconciles, as `Context::new` builds it.
fn backoff_delay(failures: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    Backoff::new(base, max, Jitter::PLUS_MINUS_20_PERCENT).delay(failures, jitter)
}

#[tokio::test]
async fn error_policy_backs_off_per_service_and_resets_on_success() {
    let bench = Bench::new(&["a"]);
    let (ctx, _h) = bench.context();
    let s = Arc::new(finalized(svc()));
    let err = Error::MissingObjectKey("x");
    let mut last = Duration::ZERO;
    for i in 0..4 {
        let Action { .. } = error_policy(s.clone(), &err, ctx.clone());
        let n = ctx.failures.count("default/web");
        assert_eq!(n, Some(i + 1));
        let d = backoff_delay(i, Duration::from_secs(1), Duration::from_secs(300), 0.5);
        assert!(d >= last);
        last = d;
    }
    assert!(
        bench
            .metrics
            .render()
            .contains("reconcile_failures_total{error=\"missing_object_key\"} 4")
    );
}

#[test]
fn backoff_is_exponential_capped_and_jittered() {
    let (b, m) = (Duration::from_secs(1), Duration::from_secs(300));
    assert_eq!(backoff_delay(0, b, m, 0.5), Duration::from_secs(1));
    assert_eq!(backoff_delay(3, b, m, 0.5), Duration::from_secs(8));
    assert_eq!(backoff_delay(30, b, m, 0.5), Duration::from_secs(300));
    assert_eq!(backoff_delay(0, b, m, 0.0), Duration::from_millis(800));
    assert!(backoff_delay(0, b, m, 0.999) < Duration::from_millis(1200));
    let r = Duration::from_secs(300);
    assert!(jittered(r, 0.0) >= Duration::from_secs(270) && jittered(r, 1.0) <= Duration::from_secs(330));
}

#[test]
fn a_transition_we_started_is_polled_soon_then_ever_less_often() {
    let (first, max) = (Duration::from_millis(500), Duration::from_secs(2));
    let ms = |n| Some(Duration::from_millis(n));
    assert_eq!(transition_poll_delay(ms(0), first, max), first);
    assert_eq!(transition_poll_delay(ms(500), first, max), Duration::from_millis(750));
    assert_eq!(transition_poll_delay(ms(1250), first, max), Duration::from_millis(1125));
    assert_eq!(transition_poll_delay(ms(60_000), first, max), max, "capped");
    assert_eq!(
        transition_poll_delay(None, first, max),
        max,
        "not ours: the full period"
    );
    // A 30 s provisioning costs 18 looks at the fixed 2 s period, and not many more here.
    let (mut waited, mut looks) = (Duration::ZERO, 0);
    while waited < Duration::from_secs(30) {
        waited += transition_poll_delay(Some(waited), first, max);
        looks += 1;
    }
    assert!(looks <= 19, "{looks}");
}

#[tokio::test]
async fn orphan_sweep_deletes_only_our_lbs_of_vanished_services() {
    let bench = Bench::new(&["a"]);
    let _lb = provisioned(&bench, &finalized(svc())).await;
    // Another cluster's LB in the same platform, with a Service UID we do not know.
    let mut foreign = bench.platform.lbs("cl-1")[0].clone();
    foreign.id = "lb-foreign".into();
    foreign.labels.insert(LABEL_CLUSTER_ID.into(), "cl-2".into());
    foreign.labels.insert(LABEL_SERVICE_UID.into(), "uid-other".into());
    bench.platform.insert_lb("cl-2", foreign.clone());
    bench.platform.clear_calls();

    let (ctx, _h) = bench.context();
    let services = vec![finalized(svc())];
    assert_eq!(
        sweep_orphans(&ctx, || async { Ok(services.clone()) })
            .await
            .expect("sweep"),
        0,
        "Service still exists"
    );
    assert!(bench.platform.mutating_calls().is_empty());

    // The Service is gone (deleted while the CCM was down).
    assert_eq!(sweep_orphans(&ctx, || async { Ok(vec![]) }).await.expect("sweep"), 1);
    assert_eq!(bench.platform.mutating_calls(), vec!["delete_load_balancer"]);
    bench.platform.settle();
    assert!(bench.platform.lbs("cl-1").is_empty());
    assert_eq!(bench.platform.lbs("cl-2"), vec![foreign], "never touched");
    assert!(bench.metrics.render().contains("orphans_deleted_total 1"));
}

/// Once the sweep has listed all our LBs, a new Service's create needs no lookup before
/// it; a UID with several LBs is still looked up (and refused as ambiguous); cleanup
/// always asks the platform.
#[tokio::test]
async fn known_lbs_spare_the_lookup_before_a_create_but_not_before_a_delete() {
    let bench = Bench::new(&["a"]);
    let s = finalized(svc());
    let (ctx, server) = bench.served_context(&s);
    let s2 = s.clone();
    assert_eq!(sweep_orphans(&ctx, || async { Ok(vec![s2]) }).await.expect("sweep"), 0);
    assert_eq!(bench.platform.calls(), vec!["list_load_balancers"]);
    bench.platform.clear_calls();
    reconcile_on(&ctx, &s).await.expect("create");
    assert_eq!(bench.platform.calls(), vec!["create_load_balancer"]);

    // Two LBs carry one UID (made behind our back): the next full list flags it.
    let mut dup = bench.platform.lbs("cl-1")[0].clone();
    dup.id = "lb-dup".into();
    dup.name = "kr-default-web-2".into();
    bench.platform.insert_lb("cl-1", dup);
    let s2 = s.clone();
    sweep_orphans(&ctx, || async { Ok(vec![s2]) }).await.expect("sweep");
    bench.platform.clear_calls();
    let res = reconcile_on(&ctx, &s).await.expect("refused, not an error");
    assert_eq!(res, Action::requeue(Timing::default().refused_retry));
    assert_eq!(bench.platform.calls(), vec!["list_load_balancers"]);
    assert!(bench.platform.mutating_calls().is_empty());

    // Cleanup of a Service the context knows nothing of still asks the platform.
    let mut other = deleting(finalized(svc()));
    other.metadata.name = Some("api".into());
    other.metadata.uid = Some("uid-9".into());
    bench.platform.clear_calls();
    reconcile_on(&ctx, &other).await.expect("cleanup");
    assert_eq!(
        bench.platform.calls(),
        vec!["list_load_balancers", "list_load_balancers"],
        "by UID label, then by name"
    );
    stop_serving(ctx, server).await;
}

/// A create that failed without an answer may have made the LB: until a lookup by label
/// has answered, the UID is not trusted to have none, so a retry under another name
/// (the name annotation changed meanwhile) finds the first LB instead of making a second.
#[tokio::test]
async fn a_create_without_an_answer_makes_the_uid_unsure_until_a_lookup_answers() {
    let bench = Bench::new(&["a"]);
    let s = annotate(finalized(svc()), crate::annotations::NAME, "first");
    let (ctx, server) = bench.served_context(&s);
    let s2 = s.clone();
    sweep_orphans(&ctx, || async { Ok(vec![s2]) }).await.expect("sweep");
    bench
        .platform
        .fail_next("create_load_balancer", FakeFailure::Server(503));
    reconcile_on(&ctx, &s).await.expect_err("503");
    // The platform made it after all (the answer was lost), then the name changed.
    let first = provisioned(&bench, &s).await;
    let renamed = annotate(finalized(svc()), crate::annotations::NAME, "second");
    let res = reconcile_on(&ctx, &renamed).await.expect("refused, not an error");
    assert_eq!(
        res,
        Action::requeue(Timing::default().refused_retry),
        "a name cannot change"
    );
    assert_eq!(bench.platform.calls(), vec!["list_load_balancers"]);
    assert_eq!(bench.platform.lbs("cl-1"), vec![first], "no second LB");
    // The lookup answered: polled by ID from now on.
    bench.platform.clear_calls();
    reconcile_on(&ctx, &s).await.expect("in sync");
    assert_eq!(bench.platform.calls(), vec!["get_load_balancer"]);
    stop_serving(ctx, server).await;
}

/// An LB adopted by name after a 409 (a previous incarnation's, still labelled with the
/// old UID while it is busy) is polled by ID, not adopted again through another 409.
#[tokio::test]
async fn an_lb_adopted_by_name_is_polled_by_id_while_still_busy() {
    let bench = Bench::new(&["a"]);
    let (res, _) = bench.reconcile(&finalized(svc())).await;
    res.expect("created; left provisioning");
    let mut recreated = finalized(svc());
    recreated.metadata.uid = Some("uid-2".into());
    let (ctx, server) = bench.served_context(&recreated);
    let listed = vec![recreated.clone()];
    assert_eq!(
        sweep_orphans(&ctx, || async { Ok(listed) }).await.expect("sweep"),
        0,
        "adoptable"
    );
    bench.platform.clear_calls();
    reconcile_on(&ctx, &recreated).await.expect("adopt and wait");
    assert_eq!(
        bench.platform.calls(),
        vec!["create_load_balancer", "list_load_balancers"]
    );
    bench.platform.clear_calls();
    reconcile_on(&ctx, &recreated).await.expect("poll");
    assert_eq!(bench.platform.calls(), vec!["get_load_balancer"]);
    assert_eq!(bench.platform.lbs("cl-1").len(), 1);
    stop_serving(ctx, server).await;
}

/// The sweep forgets the LBs of Services that are gone (listed LB, Service not in the
/// later list), and keeps what it cannot judge.
#[tokio::test]
async fn the_sweep_forgets_lbs_of_services_that_are_gone() {
    let bench = Bench::new(&["a"]);
    let s = finalized(svc());
    let (ctx, server) = bench.served_context(&s);
    reconcile_on(&ctx, &s).await.expect("create");
    bench.platform.settle();
    ctx.lbs.lb_ids().insert(
        "uid-unlisted".into(),
        KnownLb::new("lb-not-listed", "kr-default-unlisted", true),
    );
    let s2 = s.clone();
    sweep_orphans(&ctx, || async { Ok(vec![s2]) }).await.expect("sweep");
    assert!(ctx.lbs.lb_ids().contains_key("uid-1"), "its Service is listed");
    assert!(
        ctx.lbs.lb_ids().contains_key("uid-unlisted"),
        "its LB was not listed: cannot tell"
    );
    // The Service is gone (its finalizer removed behind our back): the next sweep forgets it.
    sweep_orphans(&ctx, || async { Ok(vec![]) }).await.expect("sweep");
    assert!(!ctx.lbs.lb_ids().contains_key("uid-1"));
    stop_serving(ctx, server).await;
}

/// An LB the context does not know although it is the Service's (its create was answered
/// too late, or another replica made it): the create's 409 leads to it, and from then on
/// it is polled by ID.
#[tokio::test]
async fn an_lb_created_behind_the_known_set_is_found_by_the_409_and_remembered() {
    let bench = Bench::new(&["a"]);
    let s = finalized(svc());
    let (ctx, server) = bench.served_context(&s);
    let s2 = s.clone();
    sweep_orphans(&ctx, || async { Ok(vec![s2]) }).await.expect("sweep");
    let lb = provisioned(&bench, &s).await;
    reconcile_on(&ctx, &s).await.expect("adopt");
    assert_eq!(
        bench.platform.calls(),
        vec!["create_load_balancer", "list_load_balancers"]
    );
    assert_eq!(bench.platform.lbs("cl-1"), vec![lb], "not duplicated, not changed");
    bench.platform.clear_calls();
    reconcile_on(&ctx, &s).await.expect("resync");
    assert_eq!(bench.platform.calls(), vec!["get_load_balancer"]);
    stop_serving(ctx, server).await;
}

/// A Service created while the sweep runs, whose LB the controller creates at once: the
/// Services are listed after the LBs, so that LB is either not in the sweep's LB list or
/// its Service is in the Service list; never taken for an orphan.
#[tokio::test]
async fn orphan_sweep_spares_the_lb_of_a_service_created_meanwhile() {
    let bench = Bench::new(&["a"]);
    let _lb = provisioned(&bench, &finalized(svc())).await;
    bench.platform.clear_calls();
    let (ctx, _h) = bench.context();
    let mut new_svc = finalized(svc());
    new_svc.metadata.name = Some("new".into());
    new_svc.metadata.uid = Some("uid-new".into());
    let mut new_lb = bench.platform.lbs("cl-1")[0].clone();
    new_lb.id = "lb-new".into();
    new_lb.name = "kr-default-new".into();
    new_lb.labels.insert(LABEL_SERVICE_UID.into(), "uid-new".into());
    new_lb.labels.insert(LABEL_SERVICE_NAME.into(), "new".into());
    let list_services = || async {
        // The Services are listed after our LBs; the new Service and its LB appear
        // between the two lists.
        assert_eq!(bench.platform.calls(), vec!["list_load_balancers"]);
        bench.platform.insert_lb("cl-1", new_lb.clone());
        Ok(vec![finalized(svc()), new_svc.clone()])
    };
    assert_eq!(sweep_orphans(&ctx, list_services).await.expect("sweep"), 0);
    assert!(bench.platform.mutating_calls().is_empty());
    // The next sweep sees both, and both Services.
    let both = vec![finalized(svc()), new_svc.clone()];
    assert_eq!(
        sweep_orphans(&ctx, || async { Ok(both.clone()) }).await.expect("sweep"),
        0
    );
    assert!(bench.platform.mutating_calls().is_empty());
    assert_eq!(bench.platform.lbs("cl-1").len(), 2);
}

#[tokio::test(start_paused = true)]
async fn node_bursts_become_one_resync_and_readiness_flaps_none() {
    let (nodes, mut writer) = reflector::store::<Node>();
    writer.apply_watcher_event(&WatchEvent::Apply(node("a")));
    let (services, mut svc_writer) = reflector::store::<Service>();
    let (tx, rx) = futures::channel::mpsc::unbounded::<()>();
    let settled = Arc::new(SettledNodes::new(nodes));
    let mut ticks = Box::pin(node_change_ticks(
        rx,
        settled.clone(),
        services,
        Duration::from_millis(500),
        Duration::from_secs(3),
    ));
    // First batch: the initial node set.
    tx.unbounded_send(()).expect("send");
    assert_eq!(ticks.next().await, Some(()));
    // A burst of 20 node additions: one tick; reconciles see the new nodes from then on.
    for i in 0..20 {
        writer.apply_watcher_event(&WatchEvent::Apply(node(&format!("n{i}"))));
        tx.unbounded_send(()).expect("send");
    }
    assert_eq!(settled.get().len(), 1, "in mid-burst: the last settled set");
    assert_eq!(ticks.next().await, Some(()));
    assert_eq!(settled.get().len(), 21);
    // Labels no Service's node selector reads change nothing: no tick.
    for i in 0..10 {
        writer.apply_watcher_event(&WatchEvent::Apply(with_label(
            node(&format!("n{i}")),
            "burst",
            &i.to_string(),
        )));
        tx.unbounded_send(()).expect("send");
    }
    // Once a Service selects by a label, changing that label is a tick.
    let selecting = annotate(svc(), crate::annotations::NODE_SELECTOR, "pool=edge");
    svc_writer.apply_watcher_event(&WatchEvent::Apply(selecting));
    writer.apply_watcher_event(&WatchEvent::Apply(with_label(node("a"), "pool", "edge")));
    tx.unbounded_send(()).expect("send");
    assert_eq!(ticks.next().await, Some(()));
    // Readiness flaps change nothing: no tick; then the input ends.
    for _ in 0..5 {
        writer.apply_watcher_event(&WatchEvent::Apply(crate::service::nodes::tests::with_condition(
            with_label(node("a"), "pool", "edge"),
            "Ready",
            Some("False"),
        )));
        tx.unbounded_send(()).expect("send");
    }
    drop(tx);
    assert_eq!(ticks.next().await, None);
}

#[tokio::test]
async fn a_service_recreated_while_we_were_down_adopts_its_lb_by_name() {
    let bench = Bench::new(&["a"]);
    let lb = provisioned(&bench, &finalized(svc())).await;
    let mut recreated = finalized(svc());
    recreated.metadata.uid = Some("uid-2".into());
    let (res, _) = bench.reconcile(&recreated).await;
    assert!(res.is_ok(), "{res:?}");
    // No lookup by name before the create: the platform's 409 (names are unique in a
    // cluster) sends the controller to it, and it plans again against what it found.
    assert_eq!(
        bench.platform.calls(),
        vec![
            "list_load_balancers",
            "create_load_balancer",
            "list_load_balancers",
            "update_load_balancer"
        ],
        "relabelled, not duplicated"
    );
    let lbs = bench.platform.lbs("cl-1");
    assert_eq!(lbs.len(), 1);
    assert_eq!(lbs[0].id, lb.id);
    assert_eq!(lbs[0].labels[LABEL_SERVICE_UID], "uid-2");
}

/// Once the controller has found or created a Service's LB, polling it is one GET by ID,
/// not label-filtered lists; an LB gone behind its back (404) falls back to the lists and
/// is recreated.
#[tokio::test]
async fn a_known_lb_is_polled_by_id_and_a_vanished_one_looked_up_again() {
    let bench = Bench::new(&["a", "b"]);
    let s = finalized(svc());
    let (ctx, server) = bench.served_context(&s);
    let first = Timing::default().first_poll;
    assert_eq!(reconcile_on(&ctx, &s).await.expect("create"), Action::requeue(first));
    assert_eq!(
        bench.platform.calls(),
        vec!["list_load_balancers", "create_load_balancer"]
    );
    bench.platform.clear_calls();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let poll = reconcile_on(&ctx, &s).await.expect("poll while provisioning");
    assert_eq!(bench.platform.calls(), vec!["get_load_balancer"]);
    // The transition it started is looked at again sooner than the full period, later
    // than the first look.
    let next = ctx.next_poll("uid-1");
    assert!(
        next > first + Duration::from_millis(99) && next < Timing::default().poll,
        "{next:?}"
    );
    assert_ne!(poll, Action::requeue(Timing::default().poll));
    assert_ne!(poll, Action::requeue(first));
    bench.platform.settle();
    bench.platform.clear_calls();
    reconcile_on(&ctx, &s).await.expect("active");
    assert_eq!(bench.platform.calls(), vec!["get_load_balancer"]);

    let lb = bench.platform.lbs("cl-1").remove(0);
    bench.platform.remove_lb("cl-1", &lb.id);
    bench.platform.clear_calls();
    reconcile_on(&ctx, &s).await.expect("recreate");
    assert_eq!(
        bench.platform.calls(),
        vec!["get_load_balancer", "list_load_balancers", "create_load_balancer"]
    );
    let recreated = bench.platform.lbs("cl-1");
    assert_eq!(recreated.len(), 1);
    assert_ne!(recreated[0].id, lb.id);
    bench.platform.clear_calls();
    reconcile_on(&ctx, &s).await.expect("poll the new one");
    assert_eq!(bench.platform.calls(), vec!["get_load_balancer"]);
    stop_serving(ctx, server).await;
}

/// A deletion is polled like a creation, first after the typical transition time and
/// then ever less often, never as an error. The first look is the lookup by UID label:
/// the platform finishes most deletions before it, and a GET's 404 would need that lookup
/// anyway to confirm that no LB of the Service is left. While the LB is still being
/// deleted, the looks go by ID (one GET), and once the GET says 404 the label lookup
/// confirms before the finalizer goes. A Service whose type changes away takes the same
/// path.
#[tokio::test]
async fn a_deletion_is_looked_at_by_label_then_polled_by_id_then_confirmed_by_labels() {
    for type_change in [false, true] {
        let bench = Bench::new(&["a"]);
        let s = finalized(svc());
        let (ctx, server) = bench.served_context(&s);
        reconcile_on(&ctx, &s).await.expect("create");
        bench.platform.settle();
        reconcile_on(&ctx, &s).await.expect("active");
        let lb = bench.platform.lbs("cl-1")[0].clone();
        let gone = if type_change {
            with_type(with_ready_status(s.clone(), &lb), "ClusterIP")
        } else {
            deleting(with_ready_status(s.clone(), &lb))
        };
        bench.platform.clear_calls();
        let first = reconcile_on(&ctx, &gone).await.expect("deleting is not an error");
        assert_eq!(first, Action::requeue(Timing::default().first_poll));
        // The LB we created is deleted by its ID at once, without a GET first.
        assert_eq!(bench.platform.calls(), vec!["delete_load_balancer"]);
        // Still deleting at the first look, which goes by label and finds it so.
        bench.platform.clear_calls();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let second = reconcile_on(&ctx, &gone).await.expect("still deleting");
        assert_eq!(bench.platform.calls(), vec!["list_load_balancers"]);
        let delay = |a: &Action| format!("{a:?}");
        assert!(second != first, "{} then {}", delay(&first), delay(&second));
        assert!(second != Action::requeue(Timing::default().poll), "{second:?}");
        // Still deleting: one GET by ID per look from now on, never a second DELETE.
        bench.platform.clear_calls();
        let third = reconcile_on(&ctx, &gone).await.expect("still deleting");
        assert_eq!(bench.platform.calls(), vec!["get_load_balancer"]);
        assert!(third != Action::await_change(), "{third:?}");
        // Gone: a 404 by ID, then the lookup by UID label, then the finalizer. The LB we
        // deleted had the Service's name, which no other LB can have had meanwhile: no
        // lookup by name.
        bench.platform.settle();
        bench.platform.clear_calls();
        let done = reconcile_on(&ctx, &gone).await.expect("done");
        assert_eq!(done, Action::await_change());
        assert_eq!(bench.platform.calls(), vec!["get_load_balancer", "list_load_balancers"]);
        let api_calls = stop_serving(ctx, server).await;
        assert!(
            api_calls
                .iter()
                .any(|c| c.is("PATCH", SVC_PATH) && c.body.to_string().contains("/metadata/finalizers/0")),
            "finalizer removed: {api_calls:?}"
        );
        assert_eq!(
            api_calls
                .iter()
                .filter(|c| c.is_event("DeleteLoadBalancerFailed") || c.is_event("SyncLoadBalancerFailed"))
                .count(),
            0,
            "no Warning while waiting"
        );
    }
}

/// The common case: the platform has finished the deletion by the first look, and the
/// whole cleanup is two platform calls, the DELETE and one lookup by UID label. An LB
/// that another Service's label lookup would not find (adopted by name, still labelled
/// with the old UID) is looked at by ID instead: the label lookup cannot stand in for it.
#[tokio::test]
async fn a_quick_deletion_takes_two_calls_and_an_unlabelled_lb_is_looked_at_by_id() {
    let bench = Bench::new(&["a"]);
    let s = finalized(svc());
    let (ctx, server) = bench.served_context(&s);
    reconcile_on(&ctx, &s).await.expect("create");
    bench.platform.settle();
    reconcile_on(&ctx, &s).await.expect("active");
    let lb = bench.platform.lbs("cl-1")[0].clone();
    let gone = deleting(with_ready_status(s.clone(), &lb));
    bench.platform.clear_calls();
    reconcile_on(&ctx, &gone).await.expect("deleting");
    bench.platform.settle();
    let done = reconcile_on(&ctx, &gone).await.expect("done");
    assert_eq!(done, Action::await_change());
    assert_eq!(
        bench.platform.calls(),
        vec!["delete_load_balancer", "list_load_balancers"]
    );
    stop_serving(ctx, server).await;

    // Adopted by name: the LB of a previous incarnation (uid-1), now the LB of uid-2.
    let bench = Bench::new(&["a"]);
    let (res, _) = bench.reconcile(&finalized(svc())).await;
    res.expect("created; left provisioning");
    let mut recreated = finalized(svc());
    recreated.metadata.uid = Some("uid-2".into());
    let (ctx, server) = bench.served_context(&recreated);
    let listed = vec![recreated.clone()];
    sweep_orphans(&ctx, || async { Ok(listed) }).await.expect("sweep");
    reconcile_on(&ctx, &recreated).await.expect("adopt while it is busy");
    bench.platform.settle();
    let lb = bench.platform.lbs("cl-1")[0].clone();
    assert_ne!(
        lb.labels.get(LABEL_SERVICE_UID).map(String::as_str),
        Some("uid-2"),
        "not relabelled yet"
    );
    let gone = deleting(with_ready_status(recreated.clone(), &lb));
    bench.platform.clear_calls();
    reconcile_on(&ctx, &gone).await.expect("deleting");
    assert_eq!(bench.platform.calls(), vec!["delete_load_balancer"]);
    bench.platform.clear_calls();
    let second = reconcile_on(&ctx, &gone).await.expect("still deleting");
    assert_eq!(
        bench.platform.calls(),
        vec!["get_load_balancer"],
        "by ID: its labels name uid-1"
    );
    assert!(second != Action::await_change(), "{second:?}");
    bench.platform.settle();
    bench.platform.clear_calls();
    assert_eq!(reconcile_on(&ctx, &gone).await.expect("done"), Action::await_change());
    assert!(bench.platform.lbs("cl-1").is_empty());
    stop_serving(ctx, server).await;
}

/// Events are queued, not published by the reconcile: an API server that never answers
/// an Event does not hold up the create (each Event is a request; a worker waiting on it
/// is a worker not talking to the platform). The Event still goes out.
#[tokio::test]
async fn a_reconcile_never_waits_on_its_events() {
    let bench = Bench::new(&["a"]);
    let s = finalized(svc());
    let (ctx, mut handle) = bench.context();
    let answer_with = serde_json::to_value(&s).expect("encode service");
    let (event_seen, mut event_seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let server = tokio::spawn(async move {
        // Event requests are never answered (until the server ends); the rest are.
        let mut held = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().path().to_owned();
            if path.ends_with("/events") {
                let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let _ = event_seen.send(body["reason"].as_str().unwrap_or_default().to_owned());
                held.push(send);
                continue;
            }
            let resp = Response::builder()
                .status(200)
                .body(Body::from(serde_json::to_vec(&answer_with).unwrap_or_default()));
            if let Ok(resp) = resp {
                send.send_response(resp);
            }
        }
        held.len()
    });
    let res = reconcile_on(&ctx, &s).await;
    assert_eq!(res.expect("create"), Action::requeue(Timing::default().first_poll));
    assert_eq!(bench.platform.mutating_calls(), vec!["create_load_balancer"]);
    let reason = tokio::time::timeout(Duration::from_secs(5), event_seen_rx.recv())
        .await
        .expect("the Event is published meanwhile");
    assert_eq!(reason.as_deref(), Some("EnsuringLoadBalancer"));
    drop(ctx);
    server.abort();
}

/// The DELETE by a known ID answers 404 (the LB went behind our back): the ID is
/// forgotten and the label lookups decide (an LB of the Service may still exist under
/// another ID); the finalizer goes only once they find nothing. The LB we deleted is
/// never deleted twice: the looks after the DELETE are lookups (by label, then GETs).
#[tokio::test]
async fn a_known_lb_gone_before_its_delete_is_confirmed_by_labels() {
    let bench = Bench::new(&["a"]);
    let s = finalized(svc());
    let (ctx, server) = bench.served_context(&s);
    reconcile_on(&ctx, &s).await.expect("create");
    bench.platform.settle();
    reconcile_on(&ctx, &s).await.expect("active");
    let lb = bench.platform.lbs("cl-1")[0].clone();
    // Another LB of the same Service (a create answered too late): found by its label.
    let mut twin = lb.clone();
    twin.id = "lb-twin".into();
    twin.name = "kr-default-web-twin".into();
    bench.platform.insert_lb("cl-1", twin);
    bench.platform.remove_lb("cl-1", &lb.id);
    let gone = deleting(with_ready_status(s.clone(), &lb));

    bench.platform.clear_calls();
    let first = reconcile_on(&ctx, &gone).await.expect("not an error");
    assert_eq!(first, Action::requeue(Timing::default().first_poll));
    assert_eq!(
        bench.platform.calls(),
        vec!["delete_load_balancer", "list_load_balancers", "delete_load_balancer"],
        "404 by ID, then the lookup by UID label finds the twin, which is deleted"
    );
    bench.platform.clear_calls();
    let second = reconcile_on(&ctx, &gone).await.expect("still deleting");
    assert_eq!(
        bench.platform.calls(),
        vec!["list_load_balancers"],
        "a look (the first by label), not a second DELETE"
    );
    assert!(second != Action::await_change(), "{second:?}");

    bench.platform.settle();
    bench.platform.clear_calls();
    let done = reconcile_on(&ctx, &gone).await.expect("done");
    assert_eq!(done, Action::await_change());
    // The twin's name is not the Service's: the lookup by name runs too.
    assert_eq!(
        bench.platform.calls(),
        vec!["get_load_balancer", "list_load_balancers", "list_load_balancers"]
    );
    assert!(bench.platform.lbs("cl-1").is_empty());
    let api_calls = stop_serving(ctx, server).await;
    assert_eq!(
        api_calls
            .iter()
            .filter(|c| c.is("PATCH", SVC_PATH) && c.body.to_string().contains("/metadata/finalizers/0"))
            .count(),
        1,
        "finalizer removed once, at the end: {api_calls:?}"
    );
}

/// A CCM that does not know the LB (restarted, its sweep not run yet) finds it by its
/// labels, then deletes it; one the platform is already deleting is polled, not deleted.
#[tokio::test]
async fn an_unknown_lb_is_found_by_labels_before_its_delete() {
    let bench = Bench::new(&["a"]);
    let s = finalized(svc());
    let lb = provisioned(&bench, &s).await;
    let gone = deleting(with_ready_status(s.clone(), &lb));
    // A fresh context: nothing remembered.
    let (res, _) = bench.reconcile(&gone).await;
    assert_eq!(
        res.expect("not an error"),
        Action::requeue(Timing::default().first_poll)
    );
    assert_eq!(
        bench.platform.calls(),
        vec!["list_load_balancers", "delete_load_balancer"]
    );
    bench.platform.clear_calls();
    let (res, _) = bench.reconcile(&gone).await;
    assert_eq!(
        res.expect("not an error"),
        Action::requeue(Timing::default().poll),
        "deleting, not by us: looked at after the full period"
    );
    assert_eq!(bench.platform.calls(), vec!["list_load_balancers"]);
}

//! The real kubectl (v1.32) against the API server stand-in.

#[path = "kube_support.rs"]
mod support;

use serde_json::Value;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_create_namespaces_and_discovery() {
    let s = Server::start().await;
    let out = ok(&s, &["get", "ns"]).await;
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(out.contains(ns), "{out}");
    }
    assert!(out.contains("Active"), "{out}");
    ok(&s, &["create", "namespace", "team-a"]).await;
    let out = ok(&s, &["get", "namespace", "team-a", "-o", "json"]).await;
    let ns: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ns["status"]["phase"], "Active");
    assert!(ns["metadata"]["uid"].as_str().is_some());
    // The default ServiceAccount appears in new namespaces.
    ok(&s, &["get", "serviceaccount", "default", "-n", "team-a"]).await;
    let res = ok(&s, &["api-resources"]).await;
    for r in [
        "services",
        "endpointslices",
        "leases",
        "deployments",
        "poddisruptionbudgets",
        "priorityclasses",
        "clusterrolebindings",
        "customresourcedefinitions",
        "events",
    ] {
        assert!(res.contains(r), "api-resources lacks {r}: {res}");
    }
    let out = ok(&s, &["get", "svc", "-A"]).await;
    assert!(out.contains("kubernetes") && out.contains("127.96.0.1"), "{out}");
    let out = ok(&s, &["--context", "sandbox", "get", "svc", "kubernetes", "-o", "wide"]).await;
    assert!(out.contains("SELECTOR"), "{out}");
    let out = ok(&s, &["get", "svc", "kubernetes", "-o", "yaml"]).await;
    assert!(out.contains("clusterIP: 127.96.0.1"), "{out}");
    let out = ok(&s, &["get", "clusterrole", "cluster-admin"]).await;
    assert!(out.contains("cluster-admin"), "{out}");
    let err = fails(&s, &["get", "svc", "nope"]).await;
    assert!(err.contains("services \"nope\" not found"), "{err}");
    let err = fails(&s, &["--context", "missing", "get", "ns"]).await;
    assert!(err.contains("missing"), "{err}");
}

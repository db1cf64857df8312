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
    assert_eq!(ns["metadata"]["labels"]["kubernetes.io/metadata.name"], "team-a");
    assert!(ns["metadata"]["uid"].as_str().is_some());
    // The default ServiceAccount appears in new namespaces.
    ok(&s, &["get", "serviceaccount", "default", "-n", "team-a"]).await;
    // Typed-client creators (protobuf bodies).
    ok(
        &s,
        &[
            "create",
            "secret",
            "generic",
            "s1",
            "-n",
            "team-a",
            "--from-literal=k=v",
        ],
    )
    .await;
    let sec = ok(&s, &["get", "secret", "s1", "-n", "team-a", "-o", "jsonpath={.data.k}"]).await;
    assert_eq!(sec, "dg==");
    ok(&s, &["create", "serviceaccount", "bot", "-n", "team-a"]).await;
    let token = ok(&s, &["create", "token", "bot", "-n", "team-a"]).await;
    assert!(!token.trim().is_empty());
    ok(
        &s,
        &[
            "create",
            "role",
            "reader",
            "-n",
            "team-a",
            "--verb=get,list",
            "--resource=configmaps",
        ],
    )
    .await;
    ok(
        &s,
        &[
            "create",
            "rolebinding",
            "bot-reads",
            "-n",
            "team-a",
            "--role=reader",
            "--serviceaccount=team-a:bot",
        ],
    )
    .await;
    ok(
        &s,
        &[
            "create",
            "deployment",
            "web",
            "-n",
            "team-a",
            "--image=nginx:1",
            "--port=8080",
            "--replicas=2",
        ],
    )
    .await;
    let dep = json_of(&ok(&s, &["get", "deploy", "web", "-n", "team-a", "-o", "json"]).await);
    assert_eq!(dep["spec"]["replicas"], 2, "{dep}");
    assert_eq!(dep["spec"]["selector"]["matchLabels"]["app"], "web");
    assert_eq!(dep["spec"]["template"]["spec"]["containers"][0]["image"], "nginx:1");
    assert_eq!(
        dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"],
        8080
    );
    ok(
        &s,
        &["create", "service", "nodeport", "web", "-n", "team-a", "--tcp=80:8080"],
    )
    .await;
    let svc = json_of(&ok(&s, &["get", "svc", "web", "-n", "team-a", "-o", "json"]).await);
    assert_eq!(svc["spec"]["type"], "NodePort", "{svc}");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080);
    assert!(svc["spec"]["ports"][0]["nodePort"].as_i64().is_some());
    ok(
        &s,
        &[
            "expose",
            "deployment",
            "web",
            "-n",
            "team-a",
            "--name=web2",
            "--port=81",
            "--target-port=8080",
        ],
    )
    .await;
    ok(
        &s,
        &[
            "create",
            "priorityclass",
            "high",
            "--value=1000",
            "--description=important",
        ],
    )
    .await;
    ok(&s, &["describe", "priorityclass", "high"]).await;
    ok(
        &s,
        &[
            "create",
            "pdb",
            "web",
            "-n",
            "team-a",
            "--selector=app=web",
            "--min-available=50%",
        ],
    )
    .await;
    let pdb = json_of(&ok(&s, &["get", "pdb", "web", "-n", "team-a", "-o", "json"]).await);
    assert_eq!(pdb["spec"]["minAvailable"], "50%", "{pdb}");
    let out = ok(&s, &["get", "rolebinding", "bot-reads", "-n", "team-a", "-o", "wide"]).await;
    assert!(out.contains("Role/reader") && out.contains("team-a/bot"), "{out}");
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

const APP_V1: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  labels: {app: web, tier: front}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: https, port: 443, targetPort: 8443}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - {name: web, image: "nginx:1.25", ports: [{containerPort: 8080}]}
      - {name: sidecar, image: "busybox:1"}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: web-config}
data: {a: "1", b: "2"}
"#;

const APP_V2: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  labels: {app: web}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8081}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - {name: web, image: "nginx:1.26", ports: [{containerPort: 8080}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: web-config}
data: {a: "1"}
"#;

fn json_of(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_three_way_and_server_side() {
    let s = Server::start().await;
    let f1 = write(s.dir.path(), "app1.yaml", APP_V1);
    let out = ok(&s, &["apply", "-f", f1.to_str().unwrap()]).await;
    assert!(
        out.contains("service/web created") && out.contains("deployment.apps/web created"),
        "{out}"
    );
    let svc = json_of(&ok(&s, &["get", "svc", "web", "-o", "json"]).await);
    let cluster_ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    assert!(cluster_ip.starts_with("127.96."), "{svc}");
    let np = svc["spec"]["ports"][0]["nodePort"].as_i64().unwrap();
    assert!((30000..=32767).contains(&np));
    assert!(svc["spec"]["healthCheckNodePort"].as_i64().is_some());
    // A changed file: removed list items, labels and keys go; server-set fields stay.
    let f2 = write(s.dir.path(), "app2.yaml", APP_V2);
    let out = ok(&s, &["apply", "-f", f2.to_str().unwrap()]).await;
    assert!(out.contains("service/web configured"), "{out}");
    let svc = json_of(&ok(&s, &["get", "svc", "web", "-o", "json"]).await);
    assert_eq!(svc["spec"]["clusterIP"], cluster_ip.as_str());
    assert_eq!(svc["spec"]["ports"].as_array().unwrap().len(), 1, "{svc}");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8081);
    assert_eq!(svc["spec"]["ports"][0]["nodePort"], np);
    assert!(svc["metadata"]["labels"].get("tier").is_none(), "{svc}");
    let dep = json_of(&ok(&s, &["get", "deploy", "web", "-o", "json"]).await);
    assert_eq!(dep["spec"]["replicas"], 3);
    let cs = dep["spec"]["template"]["spec"]["containers"].as_array().unwrap();
    assert_eq!(cs.len(), 1, "{dep}");
    assert_eq!(cs[0]["image"], "nginx:1.26");
    assert_eq!(dep["metadata"]["generation"], 2);
    let cm = json_of(&ok(&s, &["get", "cm", "web-config", "-o", "json"]).await);
    assert!(cm["data"].get("b").is_none(), "{cm}");
    // Unchanged file: nothing to do.
    let out = ok(&s, &["apply", "-f", f2.to_str().unwrap()]).await;
    assert!(out.contains("unchanged"), "{out}");
    // Server-side apply, with a conflict for another manager and --force-conflicts.
    let ssa = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ssa}\ndata: {k: v}\n";
    let out = ok_stdin(&s, &["apply", "--server-side", "-f", "-"], ssa).await;
    assert!(out.contains("configmap/ssa serverside-applied"), "{out}");
    let other = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ssa}\ndata: {k: w}\n";
    let o = kubectl_stdin(
        &s,
        &["apply", "--server-side", "--field-manager", "other", "-f", "-"],
        other,
    )
    .await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("conflict") && err.contains(".data.k"), "{err}");
    ok_stdin(
        &s,
        &[
            "apply",
            "--server-side",
            "--field-manager",
            "other",
            "--force-conflicts",
            "-f",
            "-",
        ],
        other,
    )
    .await;
    let cm = json_of(&ok(&s, &["get", "cm", "ssa", "-o", "json"]).await);
    assert_eq!(cm["data"]["k"], "w");
    // Server-side apply of a smaller Deployment drops what the manager no longer applies.
    let d1 = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: ssa-d}\nspec:\n  selector: {matchLabels: {app: s}}\n  template:\n    metadata: {labels: {app: s}}\n    spec: {containers: [{name: a, image: a}, {name: b, image: b}]}\n";
    ok_stdin(&s, &["apply", "--server-side", "-f", "-"], d1).await;
    let d2 = d1.replace(", {name: b, image: b}", "");
    ok_stdin(&s, &["apply", "--server-side", "-f", "-"], &d2).await;
    let dep = json_of(&ok(&s, &["get", "deploy", "ssa-d", "-o", "json"]).await);
    assert_eq!(
        dep["spec"]["template"]["spec"]["containers"].as_array().unwrap().len(),
        1,
        "{dep}"
    );
    // Dry run changes nothing.
    let out = ok(&s, &["delete", "cm", "ssa", "--dry-run=server"]).await;
    assert!(out.contains("server dry run"), "{out}");
    ok(&s, &["get", "cm", "ssa"]).await;
    ok(&s, &["scale", "deploy", "web", "--replicas=5"]).await;
    let dep = json_of(&ok(&s, &["get", "deploy", "web", "-o", "json"]).await);
    assert_eq!(dep["spec"]["replicas"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_patch_label_annotate() {
    let s = Server::start().await;
    let f1 = write(s.dir.path(), "app1.yaml", APP_V1);
    ok(&s, &["apply", "-f", f1.to_str().unwrap()]).await;
    ok(
        &s,
        &[
            "patch",
            "svc",
            "web",
            "--type",
            "merge",
            "-p",
            r#"{"metadata":{"annotations":{"x":"1"}}}"#,
        ],
    )
    .await;
    ok(
        &s,
        &[
            "patch",
            "svc",
            "web",
            "--type",
            "json",
            "-p",
            r#"[{"op":"replace","path":"/spec/ports/0/targetPort","value":9090}]"#,
        ],
    )
    .await;
    ok(
        &s,
        &[
            "patch",
            "svc",
            "web",
            "--type",
            "strategic",
            "-p",
            r#"{"spec":{"ports":[{"name":"extra","port":8443}]}}"#,
        ],
    )
    .await;
    ok(
        &s,
        &[
            "patch",
            "deploy",
            "web",
            "-p",
            r#"{"spec":{"template":{"spec":{"containers":[{"name":"web","image":"nginx:2"}]}}}}"#,
        ],
    )
    .await;
    let svc = json_of(&ok(&s, &["get", "svc", "web", "-o", "json"]).await);
    assert_eq!(svc["metadata"]["annotations"]["x"], "1");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 9090);
    assert_eq!(svc["spec"]["ports"].as_array().unwrap().len(), 3, "{svc}");
    let dep = json_of(&ok(&s, &["get", "deploy", "web", "-o", "json"]).await);
    let cs = dep["spec"]["template"]["spec"]["containers"].as_array().unwrap();
    assert_eq!(cs.len(), 2);
    assert_eq!(cs[0]["image"], "nginx:2");
    ok(&s, &["label", "svc", "web", "env=prod"]).await;
    ok(&s, &["annotate", "svc", "web", "note=hello"]).await;
    let out = ok(&s, &["get", "svc", "-l", "env=prod,app in (web)", "-o", "name"]).await;
    assert_eq!(out.trim(), "service/web");
    let out = ok(&s, &["get", "svc", "-l", "env!=prod", "-o", "name"]).await;
    assert_eq!(out.trim(), "service/kubernetes");
    let out = ok(
        &s,
        &[
            "get",
            "svc",
            "-A",
            "--field-selector",
            "metadata.namespace=default,spec.type=LoadBalancer",
            "-o",
            "name",
        ],
    )
    .await;
    assert_eq!(out.trim(), "service/web");
    ok(&s, &["label", "svc", "web", "env-"]).await;
    let svc = json_of(&ok(&s, &["get", "svc", "web", "-o", "json"]).await);
    assert!(svc["metadata"]["labels"].get("env").is_none());
    assert_eq!(svc["metadata"]["annotations"]["note"], "hello");
    // Immutable fields are 422s with the real messages.
    let err = fails(
        &s,
        &[
            "patch",
            "svc",
            "web",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"clusterIP":"127.96.9.9"}}"#,
        ],
    )
    .await;
    assert!(err.contains("may not change once set"), "{err}");
    let err = fails(
        &s,
        &[
            "patch",
            "svc",
            "web",
            "--type",
            "json",
            "-p",
            r#"[{"op":"test","path":"/metadata/name","value":"other"}]"#,
        ],
    )
    .await;
    assert!(!err.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_watch_sees_changes() {
    let s = Server::start().await;
    ok(&s, &["create", "configmap", "w1", "--from-literal=a=1"]).await;
    let mut child = tokio::process::Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(&s.kubeconfig)
        .arg("--cache-dir")
        .arg(s.dir.path().join("kube-cache"))
        .args(["get", "configmaps", "-w", "-o", "name", "--request-timeout=0"])
        .env("HOME", s.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut seen = Vec::new();
    let read = async {
        while let Ok(Some(l)) = lines.next_line().await {
            seen.push(l.clone());
            if l.contains("w1") && seen.iter().filter(|x| x.contains("w1")).count() == 1 {
                ok(&s, &["create", "configmap", "w2", "--from-literal=b=2"]).await;
                ok(&s, &["label", "configmap", "w1", "x=y"]).await;
            }
            if seen.iter().filter(|x| x.contains("w1")).count() >= 2 && seen.iter().any(|x| x.contains("w2")) {
                break;
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), read)
        .await
        .expect("watch saw the changes");
    let _ = child.kill().await;
    assert!(seen.iter().any(|l| l == "configmap/w2"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_delete_waits_for_finalizers_and_wait() {
    let s = Server::start().await;
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: held, finalizers: [example.com/hold]}\n";
    ok_stdin(&s, &["apply", "-f", "-"], cm).await;
    let out = ok(&s, &["delete", "cm", "held", "--wait=false"]).await;
    assert!(out.contains("deleted"), "{out}");
    let got = json_of(&ok(&s, &["get", "cm", "held", "-o", "json"]).await);
    assert!(got["metadata"]["deletionTimestamp"].is_string());
    // `kubectl delete` (waiting) finishes once the finalizer goes.
    let waiting = {
        let mut c = tokio::process::Command::new(KUBECTL);
        c.arg("--kubeconfig")
            .arg(&s.kubeconfig)
            .args(["delete", "cm", "held", "--timeout=30s"])
            .env("HOME", s.dir.path())
            .kill_on_drop(true);
        c.output()
    };
    let patcher = async {
        tokio::time::sleep(std::time::Duration::from_millis(3000)).await;
        ok(
            &s,
            &[
                "patch",
                "cm",
                "held",
                "--type",
                "json",
                "-p",
                r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
            ],
        )
        .await;
    };
    let (o, _) = tokio::join!(waiting, patcher);
    let o = o.unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = fails(&s, &["get", "cm", "held"]).await;
    assert!(err.contains("not found"), "{err}");
    // wait --for=jsonpath and --for=condition.
    ok(
        &s,
        &[
            "wait",
            "--for=jsonpath={.status.phase}=Active",
            "namespace/default",
            "--timeout=10s",
        ],
    )
    .await;
    let node = r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n1","labels":{"node-role.kubernetes.io/worker":""}},"status":{"conditions":[{"type":"Ready","status":"False"}],"nodeInfo":{"kubeletVersion":"v1.32.0"},"addresses":[{"type":"InternalIP","address":"127.10.0.1"}]}}"#;
    ok_stdin(&s, &["create", "-f", "-"], node).await;
    let waiter = {
        let mut c = tokio::process::Command::new(KUBECTL);
        c.arg("--kubeconfig")
            .arg(&s.kubeconfig)
            .args(["wait", "--for=condition=Ready", "node/n1", "--timeout=30s"])
            .env("HOME", s.dir.path())
            .kill_on_drop(true);
        c.output()
    };
    let readier = async {
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
        ok(
            &s,
            &[
                "patch",
                "node",
                "n1",
                "--subresource=status",
                "--type",
                "strategic",
                "-p",
                r#"{"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#,
            ],
        )
        .await;
    };
    let (o, _) = tokio::join!(waiter, readier);
    let o = o.unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = ok(&s, &["get", "nodes", "-o", "wide"]).await;
    assert!(
        out.contains("Ready") && out.contains("worker") && out.contains("127.10.0.1"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_describe_service_shows_events_of_both_apis() {
    let s = Server::start().await;
    ok_stdin(&s, &["apply", "-f", "-"], APP_V1).await;
    let svc = json_of(&ok(&s, &["get", "svc", "web", "-o", "json"]).await);
    let uid = svc["metadata"]["uid"].as_str().unwrap();
    let core = serde_json::json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "web.1"},
        "involvedObject": {"kind": "Service", "namespace": "default", "name": "web", "uid": uid, "apiVersion": "v1"},
        "reason": "EnsuringLoadBalancer", "message": "Ensuring load balancer", "type": "Normal",
        "source": {"component": "service-controller"}, "count": 1,
        "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:00:00Z"});
    ok_stdin(&s, &["create", "-f", "-"], &core.to_string()).await;
    let v1 = serde_json::json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "web.2"},
        "regarding": {"kind": "Service", "namespace": "default", "name": "web", "uid": uid, "apiVersion": "v1"},
        "reason": "EnsuredLoadBalancer", "note": "Ensured load balancer", "type": "Normal", "action": "Ensure",
        "reportingController": "kuberaya-ccm", "reportingInstance": "ccm-1", "eventTime": "2026-01-01T00:00:01.000000Z"});
    ok_stdin(&s, &["create", "-f", "-"], &v1.to_string()).await;
    let out = ok(&s, &["describe", "service", "web"]).await;
    assert!(
        out.contains("LoadBalancer Ingress") || out.contains("Type:                     LoadBalancer"),
        "{out}"
    );
    assert!(
        out.contains("EnsuringLoadBalancer") && out.contains("EnsuredLoadBalancer"),
        "{out}"
    );
    let out = ok(&s, &["get", "events"]).await;
    assert!(
        out.contains("service/web") && out.contains("Ensured load balancer"),
        "{out}"
    );
    let out = ok(&s, &["get", "events.v1.events.k8s.io", "-o", "json"]).await;
    let list = json_of(&out);
    let notes: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["note"].as_str())
        .collect();
    assert!(
        notes.contains(&"Ensuring load balancer") && notes.contains(&"Ensured load balancer"),
        "{list}"
    );
    let out = ok(
        &s,
        &[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=web,reason=EnsuredLoadBalancer",
            "-o",
            "name",
        ],
    )
    .await;
    assert_eq!(out.trim(), "event/web.2");
}

/// kube-apiserver limits an events.k8s.io/v1 Event's note to 1024 bytes (not chars), and
/// wants what kube-runtime's Recorder sends: reason, action, reportingController and
/// reportingInstance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_create_refuses_an_event_note_over_1024_bytes() {
    let s = Server::start().await;
    ok(&s, &["create", "namespace", "team-a"]).await;
    let event = |name: &str, note: &str| {
        serde_json::json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": name, "namespace": "team-a"},
            "regarding": {"kind": "Service", "namespace": "team-a", "name": "web", "apiVersion": "v1"},
            "reason": "SyncLoadBalancerFailed", "note": note, "type": "Warning", "action": "SyncLoadBalancerFailed",
            "reportingController": "kuberaya-ccm-service-controller", "reportingInstance": "ccm-0",
            "eventTime": "2026-01-01T00:00:01.000000Z"})
        .to_string()
    };
    let refused = |name: &'static str, body: String| {
        let s = &s;
        async move {
            let o = kubectl_stdin(s, &["create", "-f", "-"], &body).await;
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            assert!(!o.status.success(), "{name} was kept: {err}");
            err
        }
    };

    let err = refused("1025 bytes", event("long", &"a".repeat(1025))).await;
    assert!(
        err.contains(r#"The Event "long" is invalid: message: Invalid value: "": can have at most 1024 characters"#),
        "{err}"
    );
    // 342 chars of U+FFFD are 1026 bytes.
    let err = refused("342 x U+FFFD", event("lossy", &"\u{FFFD}".repeat(342))).await;
    assert!(err.contains("can have at most 1024 characters"), "{err}");

    // 1024 bytes are kept, byte for byte.
    let note = format!("{}{}", "é".repeat(500), "a".repeat(24));
    assert_eq!(note.len(), 1024);
    ok_stdin(&s, &["create", "-f", "-"], &event("fits", &note)).await;
    let kept = ok(
        &s,
        &[
            "get",
            "events.v1.events.k8s.io",
            "fits",
            "-n",
            "team-a",
            "-o",
            "jsonpath={.note}",
        ],
    )
    .await;
    assert_eq!(kept, note);

    // The other rules, each naming its field.
    let mut missing = serde_json::from_str::<Value>(&event("bare", "n")).unwrap();
    for k in [
        "reason",
        "action",
        "reportingController",
        "reportingInstance",
        "regarding",
    ] {
        missing.as_object_mut().unwrap().remove(k);
    }
    let err = refused(
        "an Event without reason, action, reporter or regarding",
        missing.to_string(),
    )
    .await;
    for text in [
        "reason: Required value",
        "action: Required value",
        "reportingController: Required value",
        "reportingInstance: Required value",
        r#"involvedObject.namespace: Invalid value: "": does not match event.namespace"#,
    ] {
        assert!(err.contains(text), "{text}: {err}");
    }
    let mut long = serde_json::from_str::<Value>(&event("long-fields", "n")).unwrap();
    for k in ["reason", "action", "reportingInstance"] {
        long[k] = Value::from("r".repeat(129));
    }
    let err = refused("fields over 128", long.to_string()).await;
    for k in ["reason", "action", "reportingInstance"] {
        assert!(
            err.contains(&format!(r#"{k}: Invalid value: "": can have at most 128 characters"#)),
            "{k}: {err}"
        );
    }
    // Nothing refused was stored.
    let names = ok(&s, &["get", "events.v1.events.k8s.io", "-n", "team-a", "-o", "name"]).await;
    assert_eq!(names.trim(), "event.events.k8s.io/fits");
}

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wg]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}, scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas}}
    additionalPrinterColumns:
    - {name: Size, type: string, jsonPath: .spec.size}
    - {name: Replicas, type: integer, jsonPath: .spec.replicas, priority: 1}
    schema:
      openAPIV3Schema:
        type: object
        description: A widget for tests.
        properties:
          spec:
            type: object
            description: What the widget should be.
            required: [size]
            properties:
              size: {type: string, enum: [small, large], description: How big the widget is.}
              name: {type: string, pattern: "^[a-z]+$", maxLength: 8}
              replicas: {type: integer, minimum: 0, maximum: 10}
          status:
            type: object
            properties:
              replicas: {type: integer}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_crd_served_at_once_with_validation_and_explain() {
    let s = Server::start().await;
    ok_stdin(&s, &["apply", "-f", "-"], CRD).await;
    ok(
        &s,
        &[
            "wait",
            "--for=condition=Established",
            "crd/widgets.example.com",
            "--timeout=10s",
        ],
    )
    .await;
    let w = "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: small, replicas: 1}\n";
    ok_stdin(&s, &["apply", "-f", "-"], w).await;
    let out = ok(&s, &["get", "wg"]).await;
    assert!(out.contains("SIZE") && out.contains("small"), "{out}");
    let out = ok(&s, &["get", "widgets", "-o", "wide"]).await;
    assert!(out.contains("REPLICAS"), "{out}");
    let w2 = "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: large, replicas: 2}\n";
    ok_stdin(&s, &["apply", "-f", "-"], w2).await;
    let bad =
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w2}\nspec: {size: huge, name: ABC, replicas: 11}\n";
    let o = kubectl_stdin(&s, &["apply", "-f", "-"], bad).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("spec.size: Unsupported value: \"huge\": supported values: \"small\", \"large\""),
        "{err}"
    );
    assert!(
        err.contains("spec.replicas: Invalid value: 11: spec.replicas in body should be less than or equal to 10"),
        "{err}"
    );
    assert!(err.contains("spec.name in body should match '^[a-z]+$'"), "{err}");
    let junk = "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w3}\nspec: {size: small, junk: 1}\n";
    let o = kubectl_stdin(&s, &["apply", "-f", "-"], junk).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("strict decoding error: unknown field \"spec.junk\""),
        "{err}"
    );
    // Without strict validation unknown fields are pruned.
    ok_stdin(&s, &["apply", "--validate=false", "-f", "-"], junk).await;
    let w3 = json_of(&ok(&s, &["get", "widget", "w3", "-o", "json"]).await);
    assert!(w3["spec"].get("junk").is_none(), "{w3}");
    let out = ok(&s, &["explain", "widgets.spec"]).await;
    assert!(out.contains("How big the widget is"), "{out}");
    ok(&s, &["scale", "widget", "w1", "--replicas=4"]).await;
    let got = json_of(&ok(&s, &["get", "widget", "w1", "-o", "json"]).await);
    assert_eq!(got["spec"]["replicas"], 4);
    let res = ok(&s, &["api-resources", "--api-group=example.com"]).await;
    assert!(res.contains("widgets") && res.contains("wg"), "{res}");
    ok(&s, &["delete", "crd", "widgets.example.com"]).await;
    let err = fails(&s, &["get", "widgets"]).await;
    // kubectl may still hold the resource in its discovery cache: either way it is gone.
    assert!(
        err.contains("the server doesn't have a resource type")
            || err.contains("could not find the requested resource"),
        "{err}"
    );
}

/// Our own CRD (generated by the gateway's crdgen), applied and used with kubectl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_vpnpeer_crd_from_the_repo() {
    let crd = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds/vpnpeer.yaml");
    let Ok(text) = std::fs::read_to_string(&crd) else {
        return;
    };
    let s = Server::start().await;
    ok_stdin(&s, &["apply", "-f", "-"], &text).await;
    let peer = "apiVersion: vpn.cloudraya.com/v1alpha1\nkind: VpnPeer\nmetadata: {name: laptop}\nspec:\n  publicKey: AAAA\n  allow: [{namespace: default, ports: [80, http]}]\n";
    ok_stdin(&s, &["apply", "-f", "-"], peer).await;
    let got = json_of(&ok(&s, &["get", "vpnpeer", "laptop", "-o", "json"]).await);
    assert_eq!(got["spec"]["disabled"], false, "defaults apply: {got}");
    assert_eq!(got["spec"]["allow"][0]["ports"], serde_json::json!([80, "http"]));
    let status = r#"{"status":{"address":"100.64.0.2","conditions":[{"type":"Accepted","status":"True","reason":"Valid","message":"","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#;
    ok(
        &s,
        &[
            "patch",
            "vpnpeer",
            "laptop",
            "--subresource=status",
            "--type=merge",
            "-p",
            status,
        ],
    )
    .await;
    let out = ok(&s, &["get", "vpnpeers"]).await;
    assert!(
        out.contains("ACCEPTED") && out.contains("True") && out.contains("Valid") && out.contains("100.64.0.2"),
        "{out}"
    );
    let out = ok(&s, &["explain", "vpnpeer.spec.allow"]).await;
    assert!(out.contains("What the peer may reach"), "{out}");
    let bad = "apiVersion: vpn.cloudraya.com/v1alpha1\nkind: VpnPeer\nmetadata: {name: nokey}\nspec: {allow: []}\n";
    let o = kubectl_stdin(&s, &["apply", "-f", "-"], bad).await;
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("spec.publicKey: Required value"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Issue 19: API groups a cluster serves that our first kinds did not need: `batch/v1`
/// Jobs and CronJobs (stored and listed; nothing runs them here), `certificates.k8s.io`
/// CSRs with the `approval` subresource (`kubectl certificate approve`), and
/// `apiregistration.k8s.io` APIServices; all in discovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_serves_jobs_cronjobs_csrs_and_apiservices() {
    let s = Server::start().await;
    let resources = ok(&s, &["api-resources", "-o", "name"]).await;
    for r in [
        "jobs.batch",
        "cronjobs.batch",
        "certificatesigningrequests.certificates.k8s.io",
        "apiservices.apiregistration.k8s.io",
    ] {
        assert!(resources.lines().any(|l| l == r), "{r} in discovery:\n{resources}");
    }
    ok_stdin(
        &s,
        &["apply", "-f", "-"],
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: once\nspec:\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: c\n        image: busybox\n---\napiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: nightly\nspec:\n  schedule: \"0 3 * * *\"\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: OnFailure\n          containers:\n          - name: c\n            image: busybox\n",
    )
    .await;
    let names = ok(&s, &["get", "jobs,cj", "-o", "name"]).await;
    assert_eq!(
        names.lines().collect::<Vec<_>>(),
        ["job.batch/once", "cronjob.batch/nightly"],
        "{names}"
    );
    let all = ok(&s, &["get", "all", "-o", "name"]).await;
    assert!(
        all.contains("job.batch/once") && all.contains("cronjob.batch/nightly"),
        "category all: {all}"
    );

    ok_stdin(
        &s,
        &["apply", "-f", "-"],
        "apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata:\n  name: jane\nspec:\n  request: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURSBSRVFVRVNULS0tLS0K\n  signerName: kubernetes.io/kube-apiserver-client\n  usages:\n  - client auth\n",
    )
    .await;
    ok(&s, &["certificate", "approve", "jane"]).await;
    let csr: Value = serde_json::from_str(&ok(&s, &["get", "csr", "jane", "-o", "json"]).await).unwrap();
    assert_eq!(csr["status"]["conditions"][0]["type"], "Approved", "{csr}");
    assert_eq!(csr["status"]["conditions"][0]["status"], "True", "{csr}");
    assert_eq!(
        csr["spec"]["signerName"], "kubernetes.io/kube-apiserver-client",
        "approval leaves the spec: {csr}"
    );
    let selected = ok(
        &s,
        &[
            "get",
            "csr",
            "--field-selector",
            "spec.signerName=kubernetes.io/kube-apiserver-client",
            "-o",
            "name",
        ],
    )
    .await;
    assert_eq!(selected.trim(), "certificatesigningrequest.certificates.k8s.io/jane");

    ok_stdin(
        &s,
        &["apply", "-f", "-"],
        "apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata:\n  name: v1beta1.metrics.k8s.io\nspec:\n  group: metrics.k8s.io\n  version: v1beta1\n  groupPriorityMinimum: 100\n  versionPriority: 100\n  service:\n    name: metrics-server\n    namespace: kube-system\n",
    )
    .await;
    ok(&s, &["get", "apiservice", "v1beta1.metrics.k8s.io"]).await;
}

/// `kubectl debug` adds an ephemeral container through `pods/ephemeralcontainers`
/// (a strategic merge patch), which changes nothing else of the Pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_debug_adds_an_ephemeral_container() {
    let s = Server::start().await;
    ok_stdin(
        &s,
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: app\nspec:\n  containers:\n  - name: app\n    image: example/app\n",
    )
    .await;
    ok(
        &s,
        &[
            "debug",
            "app",
            "--image=busybox",
            "--container=dbg",
            "--profile=general",
        ],
    )
    .await;
    let pod: Value = serde_json::from_str(&ok(&s, &["get", "pod", "app", "-o", "json"]).await).unwrap();
    let eph = &pod["spec"]["ephemeralContainers"];
    assert_eq!(eph[0]["name"], "dbg", "{pod}");
    assert_eq!(eph[0]["image"], "busybox", "{pod}");
    assert_eq!(
        pod["spec"]["containers"][0]["name"], "app",
        "the rest of the Pod is kept: {pod}"
    );
}

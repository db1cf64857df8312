//! The API server stand-in over raw HTTPS: authentication, RBAC, bad input, watch
//! details, cascading deletion, namespaces, persistence across restarts.

#[path = "kube_support.rs"]
mod support;

use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;
use support::*;

struct Http<'a> {
    s: &'a Server,
    c: reqwest::Client,
    token: String,
}

impl<'a> Http<'a> {
    fn admin(s: &'a Server) -> Self {
        Http {
            s,
            c: s.http(),
            token: s.token(),
        }
    }
    fn with_token(s: &'a Server, token: &str) -> Self {
        Http {
            s,
            c: s.http(),
            token: token.to_string(),
        }
    }
    async fn raw(&self, method: Method, path: &str, ct: &str, body: Vec<u8>) -> (StatusCode, String) {
        let r = self
            .c
            .request(method, format!("{}{path}", self.s.url()))
            .bearer_auth(&self.token)
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .expect("request");
        let code = r.status();
        (code, r.text().await.expect("body"))
    }
    async fn json(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let ct = if method == Method::PATCH {
            "application/merge-patch+json"
        } else {
            "application/json"
        };
        let (code, text) = self
            .raw(
                method,
                path,
                ct,
                body.map(|b| b.to_string().into_bytes()).unwrap_or_default(),
            )
            .await;
        (code, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.json(Method::GET, path, None).await
    }
}

fn assert_status(v: &Value, code: u16, reason: &str) {
    assert_eq!(v["kind"], "Status", "{v}");
    assert_eq!(v["apiVersion"], "v1", "{v}");
    assert_eq!(v["status"], "Failure", "{v}");
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["reason"], reason, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_and_json_shape() {
    let s = Server::start().await;
    let anon = Http::with_token(&s, "wrong");
    let (code, v) = anon.get("/api/v1/namespaces").await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert_status(&v, 401, "Unauthorized");
    let (code, _) = anon.get("/version").await;
    assert_eq!(code, StatusCode::OK);
    let h = Http::admin(&s);
    let (_, text) = h
        .raw(
            Method::GET,
            "/api/v1/namespaces/default/services/kubernetes",
            "application/json",
            vec![],
        )
        .await;
    assert!(
        text.starts_with(r#"{"kind":"Service","apiVersion":"v1","metadata":"#),
        "{text}"
    );
    let r =
        h.c.get(format!("{}/apis", s.url()))
            .bearer_auth(&h.token)
            .header(
                "accept",
                "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json",
            )
            .send()
            .await
            .unwrap();
    assert_eq!(
        r.headers()["content-type"],
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
    );
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["kind"], "APIGroupDiscoveryList");
    let r =
        h.c.get(format!("{}/api/v1/namespaces", s.url()))
            .bearer_auth(&h.token)
            .header("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
            .send()
            .await
            .unwrap();
    let table: Value = r.json().await.unwrap();
    assert_eq!(table["kind"], "Table");
    assert_eq!(table["columnDefinitions"][0]["name"], "Name");
    assert_eq!(table["rows"].as_array().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_status_and_nothing_is_lost() {
    let s = Server::start().await;
    let h = Http::admin(&s);
    let cms = "/api/v1/namespaces/default/configmaps";
    let (code, _) = h
        .json(
            Method::POST,
            cms,
            Some(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "keep"}})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED);
    let (code, t) = h
        .raw(Method::POST, cms, "application/json", b"{not json".to_vec())
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_status(&serde_json::from_str(&t).unwrap(), 400, "BadRequest");
    let (code, t) = h
        .raw(Method::POST, cms, "application/yaml", b"a: [unclosed".to_vec())
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{t}");
    let (code, v) = h
        .json(
            Method::POST,
            cms,
            Some(json!({"apiVersion": "v2", "kind": "ConfigMap", "metadata": {"name": "x"}})),
        )
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("does not match the expected API version"),
        "{v}"
    );
    let (code, v) = h
        .json(
            Method::POST,
            cms,
            Some(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}})),
        )
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
    let (code, v) = h.json(Method::POST, cms, Some(json!([1, 2]))).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
    let (code, v) = h.get("/api/v1/namespaces/default/frobs").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_status(&v, 404, "NotFound");
    let (code, v) = h.get("/apis/nope.example.com/v1").await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{v}");
    let big = vec![b' '; 4 * 1024 * 1024];
    let (code, t) = h.raw(Method::POST, cms, "application/json", big).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{t}");
    let (code, v) = h
        .json(
            Method::POST,
            cms,
            Some(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Bad_Name"}})),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_status(&v, 422, "Invalid");
    assert_eq!(v["details"]["causes"][0]["field"], "metadata.name", "{v}");
    let (code, v) = h
        .json(
            Method::POST,
            "/api/v1/namespaces/nowhere/configmaps",
            Some(json!({"metadata": {"name": "x"}})),
        )
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(v["message"], "namespaces \"nowhere\" not found");
    let (code, v) = h
        .json(Method::POST, cms, Some(json!({"metadata": {"name": "keep"}})))
        .await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert_status(&v, 409, "AlreadyExists");
    let (code, v) = h
        .get("/api/v1/namespaces/default/configmaps?labelSelector=a%20in%20b")
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
    let (code, v) = h
        .get("/api/v1/namespaces/default/configmaps?fieldSelector=spec.nope%3D1")
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(v["message"], "field label not supported: spec.nope");
    let (code, _) = h
        .raw(Method::PATCH, &format!("{cms}/keep"), "text/plain", b"{}".to_vec())
        .await;
    assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (code, _) = h
        .raw(
            Method::PATCH,
            &format!("{cms}/keep"),
            "application/json-patch+json",
            b"{\"op\":1}".to_vec(),
        )
        .await;
    assert!(code.is_client_error());
    let (code, _) = h
        .raw(
            Method::POST,
            cms,
            "application/vnd.kubernetes.protobuf",
            b"garbage".to_vec(),
        )
        .await;
    assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (code, v) = h
        .json(
            Method::PUT,
            &format!("{cms}/keep"),
            Some(json!({"metadata": {"name": "other"}})),
        )
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
    // Odd shapes in every write path: answered (2xx or 4xx), never a dropped connection.
    let (_, _) = h
        .json(
            Method::POST,
            "/api/v1/namespaces/default/services",
            Some(json!({"metadata": {"name": "odd"}, "spec": {"ports": [{"port": 80}]}})),
        )
        .await;
    let odd = [
        json!({"spec": 5}),
        json!({"spec": {"ports": 5}}),
        json!({"spec": {"ports": [5, "x", null]}}),
        json!({"spec": {"ports": [{"port": "80"}]}}),
        json!({"spec": {"type": 7}}),
        json!({"spec": {"clusterIP": 7}}),
        json!({"metadata": {"labels": 5}}),
        json!({"metadata": {"labels": {"a": 5}}}),
        json!({"metadata": {"finalizers": "x"}}),
        json!({"metadata": {"finalizers": [1, {}]}}),
        json!({"metadata": {"ownerReferences": 5}}),
        json!({"metadata": {"ownerReferences": [{"uid": 5}]}}),
        json!({"metadata": 5}),
        json!({"status": {"loadBalancer": {"ingress": 5}}}),
        json!(null),
        json!([]),
        json!("x"),
    ];
    for (i, p) in odd.iter().enumerate() {
        for path in [
            "/api/v1/namespaces/default/services/odd",
            "/api/v1/namespaces/default/services/odd/status",
            "/api/v1/namespaces/default/configmaps/keep",
        ] {
            for ct in [
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
                "application/apply-patch+yaml",
            ] {
                let url = format!("{path}?fieldManager=fuzz{i}");
                let (code, t) = h.raw(Method::PATCH, &url, ct, p.to_string().into_bytes()).await;
                assert!(
                    code.is_success() || code.is_client_error(),
                    "{path} {ct} {p}: {code} {t}"
                );
            }
            let (code, t) = h
                .raw(Method::PUT, path, "application/json", p.to_string().into_bytes())
                .await;
            assert!(
                code.is_success() || code.is_client_error(),
                "PUT {path} {p}: {code} {t}"
            );
        }
        for post in [
            "/api/v1/namespaces/default/serviceaccounts/default/token",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            "/api/v1/namespaces/default/pods/none/eviction",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            "/apis/events.k8s.io/v1/namespaces/default/events",
        ] {
            let (code, t) = h
                .raw(Method::POST, post, "application/json", p.to_string().into_bytes())
                .await;
            assert!(
                code.is_success() || code.is_client_error(),
                "POST {post} {p}: {code} {t}"
            );
        }
    }
    // Still serving, nothing lost.
    let (code, v) = h.get(&format!("{cms}/keep")).await;
    assert_eq!(code, StatusCode::OK, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_are_held_to_rbac() {
    let s = Server::start().await;
    let h = Http::admin(&s);
    h.json(
        Method::POST,
        "/api/v1/namespaces",
        Some(json!({"metadata": {"name": "ctl"}})),
    )
    .await;
    h.json(
        Method::POST,
        "/api/v1/namespaces/ctl/serviceaccounts",
        Some(json!({"metadata": {"name": "ccm"}})),
    )
    .await;
    h.json(
        Method::POST,
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        Some(json!({"metadata": {"name": "svc-watch"}, "rules": [{"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]}, {"apiGroups": [""], "resources": ["services/status"], "verbs": ["patch"]}]})),
    )
    .await;
    h.json(
        Method::POST,
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        Some(json!({"metadata": {"name": "ccm"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "svc-watch"}, "subjects": [{"kind": "ServiceAccount", "name": "ccm", "namespace": "ctl"}]})),
    )
    .await;
    let (code, tr) = h
        .json(Method::POST, "/api/v1/namespaces/ctl/serviceaccounts/ccm/token", Some(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 600}})))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{tr}");
    let token = tr["status"]["token"].as_str().unwrap();
    let sa = Http::with_token(&s, token);
    let (code, _) = sa.get("/api/v1/services").await;
    assert_eq!(code, StatusCode::OK);
    let (code, _) = sa
        .json(
            Method::PATCH,
            "/api/v1/namespaces/default/services/kubernetes/status",
            Some(json!({"status": {}})),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let (code, v) = sa
        .json(Method::DELETE, "/api/v1/namespaces/default/services/kubernetes", None)
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert_status(&v, 403, "Forbidden");
    assert_eq!(
        v["message"],
        "services \"kubernetes\" is forbidden: User \"system:serviceaccount:ctl:ccm\" cannot delete resource \"services\" in API group \"\" in the namespace \"default\""
    );
    let (code, v) = sa.get("/api/v1/secrets").await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("cannot list resource \"secrets\" in API group \"\" at the cluster scope"),
        "{v}"
    );
    // kubectl as the ServiceAccount (impersonation by the admin) and `auth can-i`.
    let sa_user = "system:serviceaccount:ctl:ccm";
    let out = ok(&s, &["auth", "can-i", "watch", "services", "--as", sa_user, "-A"]).await;
    assert_eq!(out.trim(), "yes");
    let o = kubectl(
        &s,
        &["auth", "can-i", "delete", "services", "--as", sa_user, "-n", "default"],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "no");
    let err = fails(&s, &["get", "secrets", "-A", "--as", sa_user]).await;
    assert!(err.contains("cannot list resource \"secrets\""), "{err}");
    ok(&s, &["get", "services", "-A", "--as", sa_user]).await;
    let err = fails(&s, &["get", "nodes", "--as", "jane", "--as-group", "devs"]).await;
    assert!(err.contains("User \"jane\" cannot list resource \"nodes\""), "{err}");
    // kubectl with the token.
    let kc = s.dir.path().join("sa-kubeconfig");
    let text = std::fs::read_to_string(&s.kubeconfig)
        .unwrap()
        .replace(&s.token(), token);
    std::fs::write(&kc, text).unwrap();
    let o = tokio::process::Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(&kc)
        .args(["get", "secrets", "-A"])
        .env("HOME", s.dir.path())
        .output()
        .await
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

async fn watch_lines(h: &Http<'_>, path: &str, until: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut r =
        h.c.get(format!("{}{path}", h.s.url()))
            .bearer_auth(&h.token)
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut buf = Vec::new();
    let mut events = Vec::new();
    let read = async {
        while let Ok(Some(chunk)) = r.chunk().await {
            buf.extend_from_slice(&chunk);
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                events.push(serde_json::from_slice::<Value>(&line).unwrap());
            }
            if until(&events) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(40), read).await;
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_bookmarks_timeout_initial_events_and_selectors() {
    let s = Server::start().await;
    let h = Http::admin(&s);
    let cms = "/api/v1/namespaces/default/configmaps";
    let (_, a) = h
        .json(
            Method::POST,
            cms,
            Some(json!({"metadata": {"name": "a", "labels": {"w": "1"}}})),
        )
        .await;
    let rv = a["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    // Streaming list: initial ADDED events, then a bookmark marking their end.
    let ev = watch_lines(&h, &format!("{cms}?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=5"), |e| e.iter().any(|x| x["type"] == "BOOKMARK")).await;
    assert_eq!(ev[0]["type"], "ADDED");
    let bm = ev.iter().find(|x| x["type"] == "BOOKMARK").unwrap();
    assert_eq!(
        bm["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    // timeoutSeconds ends the stream, with a final bookmark.
    let started = std::time::Instant::now();
    let ev = watch_lines(
        &h,
        &format!("{cms}?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=1"),
        |_| false,
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(ev.last().unwrap()["type"], "BOOKMARK");
    // Label transitions: leaving the selector is a DELETED for that watch.
    let h2 = Http::admin(&s);
    let path = format!("{cms}?watch=1&resourceVersion={rv}&labelSelector=w%3D1&timeoutSeconds=10");
    let watcher = watch_lines(&h2, &path, |e| e.iter().any(|x| x["type"] == "DELETED"));
    let writer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.json(
            Method::PATCH,
            &format!("{cms}/a"),
            Some(json!({"metadata": {"labels": {"w": "2"}}})),
        )
        .await;
    };
    let (ev, _) = tokio::join!(watcher, writer);
    assert_eq!(ev.last().unwrap()["type"], "DELETED", "{ev:?}");
    assert_eq!(ev.last().unwrap()["object"]["metadata"]["labels"]["w"], "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_references_cascade_and_namespace_deletion() {
    let s = Server::start().await;
    let h = Http::admin(&s);
    h.json(
        Method::POST,
        "/api/v1/namespaces",
        Some(json!({"metadata": {"name": "doomed"}})),
    )
    .await;
    let (_, owner) = h
        .json(
            Method::POST,
            "/api/v1/namespaces/doomed/configmaps",
            Some(json!({"metadata": {"name": "owner"}})),
        )
        .await;
    let uid = owner["metadata"]["uid"].as_str().unwrap();
    let child = json!({"metadata": {"name": "child", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]}});
    h.json(Method::POST, "/api/v1/namespaces/doomed/secrets", Some(child))
        .await;
    let orphan = json!({"metadata": {"name": "orphan", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]}});
    h.json(Method::POST, "/api/v1/namespaces/doomed/configmaps", Some(orphan))
        .await;
    // Orphan policy keeps dependents (without the reference); background deletes them.
    let (code, _) = h
        .json(
            Method::DELETE,
            "/api/v1/namespaces/doomed/configmaps/owner?propagationPolicy=Orphan",
            None,
        )
        .await;
    assert!(code.is_success());
    let (code, o) = h.get("/api/v1/namespaces/doomed/secrets/child").await;
    assert_eq!(code, StatusCode::OK);
    assert!(o["metadata"].get("ownerReferences").is_none(), "{o}");
    let (_, owner2) = h
        .json(
            Method::POST,
            "/api/v1/namespaces/doomed/configmaps",
            Some(json!({"metadata": {"name": "owner2"}})),
        )
        .await;
    let uid2 = owner2["metadata"]["uid"].as_str().unwrap();
    h.json(
        Method::POST,
        "/api/v1/namespaces/doomed/configmaps",
        Some(json!({"metadata": {"name": "dep", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner2", "uid": uid2}]}})),
    )
    .await;
    h.json(
        Method::DELETE,
        "/api/v1/namespaces/doomed/configmaps/owner2?propagationPolicy=Foreground",
        None,
    )
    .await;
    let (code, _) = h.get("/api/v1/namespaces/doomed/configmaps/dep").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (code, _) = h.get("/api/v1/namespaces/doomed/configmaps/owner2").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    // Pod eviction.
    let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}});
    let (code, p) = h.json(Method::POST, "/api/v1/namespaces/doomed/pods", Some(pod)).await;
    assert_eq!(code, StatusCode::CREATED, "{p}");
    assert_eq!(p["status"]["phase"], "Pending");
    let ev = json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "p", "namespace": "doomed"}});
    let (code, _) = h
        .json(Method::POST, "/api/v1/namespaces/doomed/pods/p/eviction", Some(ev))
        .await;
    assert_eq!(code, StatusCode::CREATED);
    let (code, _) = h.get("/api/v1/namespaces/doomed/pods/p").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    // Secrets: stringData lands in data.
    let (_, sec) = h
        .json(
            Method::POST,
            "/api/v1/namespaces/doomed/secrets",
            Some(json!({"metadata": {"name": "sd"}, "stringData": {"k": "v"}})),
        )
        .await;
    assert_eq!(sec["data"]["k"], "dg==");
    assert!(sec.get("stringData").is_none());
    // Namespace deletion removes the contents, then the namespace.
    let (code, ns) = h.json(Method::DELETE, "/api/v1/namespaces/doomed", None).await;
    assert!(code.is_success(), "{ns}");
    let (code, _) = h.get("/api/v1/namespaces/doomed").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (_, list) = h.get("/api/v1/secrets?fieldSelector=metadata.namespace%3Ddoomed").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    ok(&s, &["get", "ns"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_restart_with_increasing_resource_versions() {
    let s = Server::start().await;
    let h = Http::admin(&s);
    let (_, c) = h
        .json(
            Method::POST,
            "/api/v1/namespaces/default/configmaps",
            Some(json!({"metadata": {"name": "persisted"}, "data": {"x": "1"}})),
        )
        .await;
    let rv1: u64 = c["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
    let (_, svc) = h
        .json(
            Method::POST,
            "/api/v1/namespaces/default/services",
            Some(json!({"metadata": {"name": "lb"}, "spec": {"type": "NodePort", "ports": [{"port": 80}]}})),
        )
        .await;
    let token = s.token();
    drop(h);
    let dir = s.stop().await;
    let s = Server::start_in(dir).await;
    assert_eq!(s.token(), token);
    let h = Http::admin(&s);
    let (code, c2) = h.get("/api/v1/namespaces/default/configmaps/persisted").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(c2["metadata"]["uid"], c["metadata"]["uid"]);
    let (_, svc2) = h.get("/api/v1/namespaces/default/services/lb").await;
    assert_eq!(
        svc2["spec"]["ports"][0]["nodePort"],
        svc["spec"]["ports"][0]["nodePort"]
    );
    let (_, n) = h
        .json(
            Method::POST,
            "/api/v1/namespaces/default/configmaps",
            Some(json!({"metadata": {"name": "new"}})),
        )
        .await;
    let rv2: u64 = n["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
    assert!(rv2 > rv1);
    // A watch from before the restart is too old.
    let ev = watch_lines(
        &h,
        &format!("/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv1}"),
        |e| !e.is_empty(),
    )
    .await;
    assert_eq!(ev[0]["type"], "ERROR");
    assert_eq!(ev[0]["object"]["code"], 410);
    // kubectl still works against the same kubeconfig.
    let out = ok(&s, &["get", "cm", "persisted", "-o", "jsonpath={.data.x}"]).await;
    assert_eq!(out, "1");

    // Two restarts in a row, the second with nothing to replay (its snapshot is kept as
    // it is), then a change: the change is journalled after what the snapshot holds and
    // survives the next restart.
    drop(h);
    let s = Server::start_in(s.stop().await).await;
    let s = Server::start_in(s.stop().await).await;
    let h = Http::admin(&s);
    let (code, _) = h
        .json(
            Method::POST,
            "/api/v1/namespaces/default/configmaps",
            Some(json!({"metadata": {"name": "after-quiet-restart"}})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED);
    drop(h);
    let s = Server::start_in(s.stop().await).await;
    let h = Http::admin(&s);
    for name in ["persisted", "new", "after-quiet-restart"] {
        let (code, _) = h.get(&format!("/api/v1/namespaces/default/configmaps/{name}")).await;
        assert_eq!(code, StatusCode::OK, "{name}");
    }
}

/// Many Services created concurrently: every ClusterIP and NodePort unique.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_service_allocation_is_unique() {
    let s = Server::start().await;
    let h = Http::admin(&s);
    let started = std::time::Instant::now();
    let creates = (0..300).map(|i| {
        let h = &h;
        async move {
            let svc = json!({"metadata": {"name": format!("s{i}")}, "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": [{"port": 80}]}});
            let (code, v) = h.json(Method::POST, "/api/v1/namespaces/default/services", Some(svc)).await;
            assert_eq!(code, StatusCode::CREATED, "{v}");
            v
        }
    });
    let all: Vec<Value> = futures::stream::iter(creates).buffer_unordered(32).collect().await;
    let elapsed = started.elapsed();
    let mut ips = std::collections::BTreeSet::new();
    let mut ports = std::collections::BTreeSet::new();
    for v in &all {
        assert!(ips.insert(v["spec"]["clusterIP"].as_str().unwrap().to_string()));
        assert!(ports.insert(v["spec"]["ports"][0]["nodePort"].as_i64().unwrap()));
        assert!(ports.insert(v["spec"]["healthCheckNodePort"].as_i64().unwrap()));
    }
    let (_, list) = h.get("/api/v1/namespaces/default/services?limit=1000").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 301);
    assert!(elapsed < Duration::from_secs(60), "300 creates took {elapsed:?}");
}

/// A watch over a burst larger than the live feed keeps every event (it catches up from
/// the history instead of ending with 410).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_keeps_every_event_of_a_burst() {
    let s = Server::start().await;
    let h = Http::admin(&s);
    let rv = s.api.resource_version();
    const N: usize = 2500;
    let path = format!("/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv}&timeoutSeconds=60");
    let watcher = watch_lines(&h, &path, |e| e.len() >= N || e.iter().any(|x| x["type"] == "ERROR"));
    let writer = async {
        let creates = (0..N).map(|i| {
            let h = &h;
            async move {
                let (code, _) = h
                    .json(
                        Method::POST,
                        "/api/v1/namespaces/default/configmaps",
                        Some(json!({"metadata": {"name": format!("b{i}")}})),
                    )
                    .await;
                assert_eq!(code, StatusCode::CREATED);
            }
        });
        futures::stream::iter(creates)
            .buffer_unordered(64)
            .collect::<Vec<()>>()
            .await;
    };
    let (events, _) = tokio::join!(watcher, writer);
    assert!(
        !events.iter().any(|x| x["type"] == "ERROR"),
        "watch ended with an error"
    );
    assert_eq!(events.len(), N);
    let names: std::collections::BTreeSet<&str> = events
        .iter()
        .filter_map(|e| e["object"]["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names.len(), N);
}

/// One KubeApi served, stopped and served again (as `sandbox up` may do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_api_serves_again_after_a_stop() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let api = kuberaya_sandbox::kube::KubeApi::open(kuberaya_sandbox::kube::KubeApiConfig::new(dir.path()))
        .await
        .unwrap();
    for _ in 0..2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(kuberaya_sandbox::kube::serve(listener, api.clone(), async move {
            let _ = rx.await;
        }));
        let ca = reqwest::Certificate::from_pem(api.ca_pem().unwrap().as_bytes()).unwrap();
        let c = reqwest::Client::builder()
            .tls_backend_rustls()
            .add_root_certificate(ca)
            .build()
            .unwrap();
        let r = c
            .get(format!("https://{addr}/api/v1/namespaces"))
            .bearer_auth(api.admin_token())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let _ = tx.send(());
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// `resourceVersion` on lists: Exact reads the past, too large is a 504, continue pages
/// are one consistent snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_resource_version_semantics() {
    let s = Server::start().await;
    let h = Http::admin(&s);
    let cms = "/api/v1/namespaces/default/configmaps";
    for i in 0..3 {
        h.json(
            Method::POST,
            cms,
            Some(json!({"metadata": {"name": format!("c{i}")}, "data": {"v": "old"}})),
        )
        .await;
    }
    let (_, first) = h.get(&format!("{cms}?limit=2")).await;
    let rv = first["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let token = first["metadata"]["continue"].as_str().unwrap().to_string();
    h.json(Method::PATCH, &format!("{cms}/c2"), Some(json!({"data": {"v": "new"}})))
        .await;
    h.json(Method::POST, cms, Some(json!({"metadata": {"name": "c3"}})))
        .await;
    let (_, rest) = h.get(&format!("{cms}?limit=10&continue={token}")).await;
    let items = rest["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "the page belongs to the first snapshot: {rest}");
    assert_eq!(items[0]["data"]["v"], "old");
    let (_, exact) = h
        .get(&format!("{cms}?resourceVersion={rv}&resourceVersionMatch=Exact"))
        .await;
    assert_eq!(exact["items"].as_array().unwrap().len(), 3);
    assert_eq!(exact["metadata"]["resourceVersion"], rv.as_str());
    let (code, v) = h
        .get(&format!(
            "{cms}?resourceVersion=999999999&resourceVersionMatch=NotOlderThan"
        ))
        .await;
    assert_eq!(code, StatusCode::GATEWAY_TIMEOUT);
    assert_status(&v, 504, "Timeout");
}

/// `TokenReview` (issue 19), what a server delegating authentication to the API server
/// sends for each bearer token it is given: answered for the tokens this server issued,
/// refused to a ServiceAccount without `system:auth-delegator`.
#[tokio::test]
async fn token_reviews_name_the_token_holder_and_are_held_to_rbac() {
    let s = Server::start().await;
    let h = Http::admin(&s);
    h.json(
        Method::POST,
        "/api/v1/namespaces",
        Some(json!({"metadata": {"name": "mon"}})),
    )
    .await;
    h.json(
        Method::POST,
        "/api/v1/namespaces/mon/serviceaccounts",
        Some(json!({"metadata": {"name": "metrics"}})),
    )
    .await;
    let (code, tr) = h
        .json(
            Method::POST,
            "/api/v1/namespaces/mon/serviceaccounts/metrics/token",
            Some(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{tr}");
    let token = tr["status"]["token"].as_str().unwrap().to_string();
    let review =
        |t: &str| json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": t}});

    let (code, v) = h
        .json(
            Method::POST,
            "/apis/authentication.k8s.io/v1/tokenreviews",
            Some(review(&token)),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{v}");
    assert_eq!(v["status"]["authenticated"], true, "{v}");
    assert_eq!(v["status"]["user"]["username"], "system:serviceaccount:mon:metrics");
    assert!(
        v["status"]["user"]["groups"]
            .as_array()
            .unwrap()
            .contains(&json!("system:serviceaccounts:mon")),
        "{v}"
    );
    let (code, v) = h
        .json(
            Method::POST,
            "/apis/authentication.k8s.io/v1/tokenreviews",
            Some(review("forged")),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{v}");
    assert_eq!(v["status"]["authenticated"], false, "{v}");
    let (code, v) = h
        .json(
            Method::POST,
            "/apis/authentication.k8s.io/v1/tokenreviews",
            Some(review("")),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{v}");

    // The ServiceAccount may review tokens only once bound to system:auth-delegator.
    let sa = Http::with_token(&s, &token);
    let (code, v) = sa
        .json(
            Method::POST,
            "/apis/authentication.k8s.io/v1/tokenreviews",
            Some(review(&token)),
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{v}");
    h.json(
        Method::POST,
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        Some(json!({"metadata": {"name": "metrics-auth"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"}, "subjects": [{"kind": "ServiceAccount", "name": "metrics", "namespace": "mon"}]})),
    )
    .await;
    let (code, v) = sa
        .json(
            Method::POST,
            "/apis/authentication.k8s.io/v1/tokenreviews",
            Some(review(&token)),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{v}");
    assert_eq!(v["status"]["authenticated"], true, "{v}");
}

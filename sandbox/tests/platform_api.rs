//! The platform stand-in over real HTTP: `PlatformStandIn::open` + `serve` on `127.0.0.1:0`,
//! checked with reqwest. Each test uses its own loopback ranges (public
//! `127.203.<n>.0/24`, VM `127.10.<n>.0/24`, n unique in 100..200) so tests run in
//! parallel.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kuberaya_sandbox::platform::{self, PlatformConfig, PlatformStandIn};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const CLUSTER: &str = "cl-1";
const LBS: &str = "/kubernetes/v1/clusters/cl-1/load-balancers";

struct Sandbox {
    url: String,
    client: reqwest::Client,
    platform: Arc<PlatformStandIn>,
    token: String,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    n: u8,
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    fn data(&self) -> &Value {
        &self.body["data"]
    }

    /// Asserts the envelope of an error answer and returns its `error`.
    fn error(&self, status: StatusCode) -> &Value {
        assert_eq!(self.status, status, "body: {}", self.body);
        assert_eq!(self.body["code"], status.as_u16(), "{}", self.body);
        assert!(self.body["data"].is_null(), "{}", self.body);
        assert!(self.body["message"].is_string(), "{}", self.body);
        &self.body["error"]
    }

    fn ok(&self, status: StatusCode) -> &Value {
        assert_eq!(self.status, status, "body: {}", self.body);
        assert_eq!(self.body["code"], status.as_u16(), "{}", self.body);
        assert!(self.body["error"].is_null(), "{}", self.body);
        &self.body["data"]
    }
}

fn config(n: u8, dir: &Path) -> PlatformConfig {
    PlatformConfig {
        state_dir: dir.to_path_buf(),
        public_ip_range: format!("127.203.{n}.0/24").parse().unwrap(),
        vm_ip_range: format!("127.10.{n}.0/24").parse().unwrap(),
        provisioning_delay: Duration::from_millis(100),
        ..PlatformConfig::default()
    }
}

impl Sandbox {
    async fn start(n: u8, dir: &Path) -> Sandbox {
        Self::start_with(n, config(n, dir)).await
    }

    async fn start_with(n: u8, config: PlatformConfig) -> Sandbox {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let platform = PlatformStandIn::open(config).await.unwrap();
        platform.seed_cluster(CLUSTER, "one", 2).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(platform::serve(listener, platform.clone(), async {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let mut sandbox = Sandbox {
            url,
            client,
            platform,
            token: String::new(),
            stop: Some(stop),
            server: Some(server),
            n,
        };
        sandbox.token = sandbox.login().await;
        sandbox
    }

    async fn login(&self) -> String {
        let a = self
            .call_as(
                None,
                Method::POST,
                "/core/v1/auth/login",
                Some(json!({"email": "admin@sandbox.local", "password": "sandbox"})),
            )
            .await;
        let data = a.ok(StatusCode::OK);
        assert!(data["expires_at"].as_str().unwrap().ends_with('Z'));
        data["token"].as_str().unwrap().to_string()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
        self.platform.shutdown().await;
    }

    async fn call_as(&self, token: Option<&str>, method: Method, path: &str, body: Option<Value>) -> Answer {
        let mut req = self.client.request(method, format!("{}{path}", self.url));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {status} {text:?}"));
        Answer { status, headers, body }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        self.call_as(Some(&self.token), method, path, body).await
    }

    async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, None).await
    }

    async fn raw(&self, method: Method, path: &str, body: &'static str) -> Answer {
        let resp = self
            .client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.json().await.unwrap();
        Answer { status, headers, body }
    }

    async fn workers(&self) -> Vec<Value> {
        let a = self
            .get("/vm/v1/instances?label=kuberaya.cloudraya.com/cluster-id=cl-1")
            .await;
        a.ok(StatusCode::OK)["items"].as_array().unwrap().clone()
    }

    async fn create_lb(&self, body: Value) -> Value {
        self.call(Method::POST, LBS, Some(body))
            .await
            .ok(StatusCode::CREATED)
            .clone()
    }

    async fn wait_status(&self, id: &str, status: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let a = self.get(&format!("{LBS}/{id}")).await;
            let lb = a.ok(StatusCode::OK).clone();
            if lb["status"] == status {
                return lb;
            }
            assert!(Instant::now() < deadline, "LB {id} never became {status}: {lb}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn wait_gone(&self, path: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.get(path).await.status != StatusCode::NOT_FOUND {
            assert!(Instant::now() < deadline, "{path} never went away");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn set_faults(&self, rules: Value) {
        self.call(Method::PUT, "/_sandbox/faults", Some(json!({ "rules": rules })))
            .await
            .ok(StatusCode::OK);
    }
}

fn web_lb(name: &str, port: u16, backends: &[&Value]) -> Value {
    json!({
        "name": name,
        "labels": {"kuberaya.cloudraya.com/cluster-id": CLUSTER, "app": name},
        "rules": [{"name": "http", "protocol": "tcp", "public_port": port, "private_port": 31080}],
        "backends": backends.iter().map(|vm| json!({"vm_id": vm["id"]})).collect::<Vec<_>>(),
    })
}

#[tokio::test]
async fn login_tokens_and_401s() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::start(101, dir.path()).await;

    let wrong = sb
        .call_as(
            None,
            Method::POST,
            "/core/v1/auth/login",
            Some(json!({"email": "admin@sandbox.local", "password": "nope"})),
        )
        .await;
    assert!(wrong.error(StatusCode::UNAUTHORIZED).is_string());

    let parts: Vec<&str> = sb.token.split('.').collect();
    assert_eq!(parts.len(), 3, "JWT-shaped: {}", sb.token);

    sb.call_as(None, Method::GET, "/vm/v1/instances", None)
        .await
        .error(StatusCode::UNAUTHORIZED);
    sb.call_as(Some("a.b.c"), Method::GET, "/vm/v1/instances", None)
        .await
        .error(StatusCode::UNAUTHORIZED);
    sb.get("/vm/v1/instances").await.ok(StatusCode::OK);

    // Revoking every token: the old one is a 401, a new login works.
    let revoked = sb.call_as(None, Method::POST, "/_sandbox/tokens/revoke", None).await;
    assert_eq!(revoked.ok(StatusCode::OK)["revoked"], 1);
    sb.get("/vm/v1/instances").await.error(StatusCode::UNAUTHORIZED);
    let fresh = sb.login().await;
    sb.call_as(Some(&fresh), Method::GET, "/vm/v1/instances", None)
        .await
        .ok(StatusCode::OK);

    // Expiry follows the configured TTL.
    sb.call(Method::PUT, "/_sandbox/config", Some(json!({"token_ttl_s": 1})))
        .await
        .ok(StatusCode::OK);
    let short = sb.login().await;
    sb.call_as(Some(&short), Method::GET, "/vm/v1/instances", None)
        .await
        .ok(StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let expired = sb.call_as(Some(&short), Method::GET, "/vm/v1/instances", None).await;
    assert_eq!(expired.error(StatusCode::UNAUTHORIZED), "token expired");
    sb.stop().await;
}

#[tokio::test]
async fn every_error_has_the_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::start(102, dir.path()).await;

    // Unknown route, unknown method, unknown objects.
    assert!(sb.get("/nope").await.error(StatusCode::NOT_FOUND).is_string());
    assert!(sb.get("/_sandbox/nope").await.error(StatusCode::NOT_FOUND).is_string());
    sb.call(Method::PATCH, LBS, None)
        .await
        .error(StatusCode::METHOD_NOT_ALLOWED);
    sb.get("/vm/v1/instances/vm-none").await.error(StatusCode::NOT_FOUND);
    sb.get("/network/v1/vpcs/vpc-none").await.error(StatusCode::NOT_FOUND);
    sb.get("/network/v1/subnets/sn-none").await.error(StatusCode::NOT_FOUND);
    sb.get("/network/v1/public-ips/ip-none")
        .await
        .error(StatusCode::NOT_FOUND);
    sb.get("/kubernetes/v1/clusters/cl-none")
        .await
        .error(StatusCode::NOT_FOUND);
    sb.get("/kubernetes/v1/clusters/cl-none/load-balancers")
        .await
        .error(StatusCode::NOT_FOUND);
    sb.get(&format!("{LBS}/lb-none")).await.error(StatusCode::NOT_FOUND);

    // Malformed requests: bad JSON, wrong types, no body, bad query values.
    let bad = sb.raw(Method::POST, LBS, "{not json").await;
    assert!(bad.error(StatusCode::BAD_REQUEST).as_str().unwrap().contains("JSON"));
    sb.raw(Method::POST, LBS, r#"{"name": 5}"#)
        .await
        .error(StatusCode::BAD_REQUEST);
    sb.raw(Method::POST, LBS, r#"{"rules": [{"public_port": "80"}]}"#)
        .await
        .error(StatusCode::BAD_REQUEST);
    sb.raw(Method::POST, LBS, "").await.error(StatusCode::BAD_REQUEST);
    sb.raw(Method::POST, "/core/v1/auth/login", r#"{"email": 1}"#)
        .await
        .error(StatusCode::BAD_REQUEST);
    for q in ["per_page=0", "per_page=101", "page=x", "label=nokey"] {
        sb.get(&format!("/vm/v1/instances?{q}"))
            .await
            .error(StatusCode::BAD_REQUEST);
    }

    // 422: a list of per-field errors.
    let invalid = sb
        .call(
            Method::POST,
            LBS,
            Some(json!({
                "name": "Bad_Name",
                "rules": [{"name": "http", "protocol": "tcp", "public_port": 70000, "private_port": 80}],
            })),
        )
        .await;
    let fields = invalid
        .error(StatusCode::UNPROCESSABLE_ENTITY)
        .as_array()
        .unwrap()
        .clone();
    let names: Vec<&str> = fields.iter().map(|f| f["field"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["name", "rules[0].public_port"]);
    assert_eq!(fields[1]["message"], "must be between 1 and 65535");

    // 409: a name taken within the cluster.
    sb.create_lb(web_lb("web", 8080, &[])).await;
    let taken = sb.call(Method::POST, LBS, Some(web_lb("web", 8081, &[]))).await;
    assert_eq!(taken.error(StatusCode::CONFLICT), "load balancer name already taken");
    sb.stop().await;
}

#[tokio::test]
async fn lb_lifecycle_create_update_delete() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::start(103, dir.path()).await;
    let workers = sb.workers().await;
    assert_eq!(workers.len(), 2);

    let created = sb.create_lb(web_lb("web", 18080, &[&workers[0]])).await;
    assert_eq!(created["status"], "provisioning");
    assert_eq!(created["region"], "jkt");
    assert_eq!(created["backends"][0]["private_ip"], workers[0]["private_ip"]);
    assert_eq!(created["rules"][0]["health_check"]["protocol"], "tcp");
    assert_eq!(created["rules"][0]["health_check"]["port"], 31080);
    assert_eq!(created["health"][0]["state"], "unknown");
    let id = created["id"].as_str().unwrap().to_string();
    let ip_id = created["public_ip"]["id"].as_str().unwrap().to_string();
    assert!(
        created["public_ip"]["address"]
            .as_str()
            .unwrap()
            .starts_with("127.203.103.")
    );
    let ip = sb.get(&format!("/network/v1/public-ips/{ip_id}")).await;
    let ip = ip.ok(StatusCode::OK);
    assert_eq!(ip["attached_to"], json!({"type": "load_balancer", "id": id}));
    assert_eq!(ip["labels"]["app"], "web");

    // PUT while provisioning is a conflict.
    let early = sb
        .call(Method::PUT, &format!("{LBS}/{id}"), Some(web_lb("web", 18080, &[])))
        .await;
    assert_eq!(early.error(StatusCode::CONFLICT), "load balancer is updating");

    let active = sb.wait_status(&id, "active").await;
    assert_eq!(active["health"].as_array().unwrap().len(), 1);

    // Update: both workers, a second rule; the name cannot change.
    let mut update = web_lb("web", 18080, &[&workers[0], &workers[1]]);
    update["rules"].as_array_mut().unwrap().push(
        json!({"name": "alt", "protocol": "tcp", "public_port": 18081, "private_port": 31081,
                     "health_check": {"protocol": "http", "port": 10256, "path": "/healthz"}}),
    );
    let mut renamed = update.clone();
    renamed["name"] = json!("other");
    let rename = sb.call(Method::PUT, &format!("{LBS}/{id}"), Some(renamed)).await;
    assert_eq!(rename.error(StatusCode::UNPROCESSABLE_ENTITY)[0]["field"], "name");
    let updated = sb.call(Method::PUT, &format!("{LBS}/{id}"), Some(update.clone())).await;
    let updated = updated.ok(StatusCode::OK);
    assert_eq!(updated["status"], "updating");
    assert_eq!(updated["rules"][1]["health_check"]["path"], "/healthz");
    let again = sb.call(Method::PUT, &format!("{LBS}/{id}"), Some(update)).await;
    assert_eq!(again.error(StatusCode::CONFLICT), "load balancer is updating");
    let active = sb.wait_status(&id, "active").await;
    assert_eq!(active["health"].as_array().unwrap().len(), 4);

    // List, with label filters and pagination.
    sb.create_lb(web_lb("second", 18090, &[])).await;
    let all = sb.get(LBS).await;
    assert_eq!(all.ok(StatusCode::OK)["total"], 2);
    let page = sb.get(&format!("{LBS}?per_page=1&page=2")).await;
    let page = page.ok(StatusCode::OK);
    assert_eq!(
        (page["total"].clone(), page["items"][0]["name"].clone()),
        (json!(2), json!("second"))
    );
    let filtered = sb.get(&format!("{LBS}?label=app=web")).await;
    let filtered = filtered.ok(StatusCode::OK);
    assert_eq!(filtered["total"], 1);
    assert_eq!(filtered["items"][0]["id"], id.as_str());

    // Delete: 202 deleting, 202 again, then gone with its acquired IP released.
    let deleting = sb.call(Method::DELETE, &format!("{LBS}/{id}"), None).await;
    assert_eq!(deleting.ok(StatusCode::ACCEPTED)["status"], "deleting");
    let again = sb.call(Method::DELETE, &format!("{LBS}/{id}"), None).await;
    assert_eq!(again.ok(StatusCode::ACCEPTED)["status"], "deleting");
    let put = sb
        .call(Method::PUT, &format!("{LBS}/{id}"), Some(web_lb("web", 18080, &[])))
        .await;
    put.error(StatusCode::CONFLICT);
    sb.wait_gone(&format!("{LBS}/{id}")).await;
    sb.get(&format!("/network/v1/public-ips/{ip_id}"))
        .await
        .error(StatusCode::NOT_FOUND);
    sb.call(Method::DELETE, &format!("{LBS}/{id}"), None)
        .await
        .error(StatusCode::NOT_FOUND);
    sb.stop().await;
}

#[tokio::test]
async fn public_ips_acquire_attach_release_keep() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::start(104, dir.path()).await;

    let ip = sb
        .call(
            Method::POST,
            "/network/v1/public-ips",
            Some(json!({"region": "jkt", "labels": {"owner": "test"}})),
        )
        .await;
    let ip = ip.ok(StatusCode::CREATED).clone();
    assert!(ip["attached_to"].is_null());
    let ip_id = ip["id"].as_str().unwrap().to_string();
    let ip_path = format!("/network/v1/public-ips/{ip_id}");
    sb.call(Method::POST, "/network/v1/public-ips", Some(json!({"region": "mars"})))
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY);
    let listed = sb.get("/network/v1/public-ips?label=owner=test&region=jkt").await;
    assert_eq!(listed.ok(StatusCode::OK)["total"], 1);

    // Attach the given IP; it cannot be deleted nor go to another LB.
    let mut body = web_lb("given", 18080, &[]);
    body["public_ip_id"] = json!(ip_id);
    let lb = sb.create_lb(body.clone()).await;
    assert_eq!(lb["public_ip"], json!({"id": ip_id, "address": ip["address"]}));
    sb.call(Method::DELETE, &ip_path, None)
        .await
        .error(StatusCode::CONFLICT);
    body["name"] = json!("thief");
    sb.call(Method::POST, LBS, Some(body.clone()))
        .await
        .error(StatusCode::CONFLICT);
    body["public_ip_id"] = json!("ip-none");
    let missing = sb.call(Method::POST, LBS, Some(body)).await;
    assert_eq!(
        missing.error(StatusCode::UNPROCESSABLE_ENTITY)[0]["field"],
        "public_ip_id"
    );

    // A given IP is kept on delete by default...
    let id = lb["id"].as_str().unwrap();
    sb.wait_status(id, "active").await;
    sb.call(Method::DELETE, &format!("{LBS}/{id}?keep_public_ip=maybe"), None)
        .await
        .error(StatusCode::BAD_REQUEST);
    sb.call(Method::DELETE, &format!("{LBS}/{id}"), None)
        .await
        .ok(StatusCode::ACCEPTED);
    sb.wait_gone(&format!("{LBS}/{id}")).await;
    let kept = sb.get(&ip_path).await;
    assert!(kept.ok(StatusCode::OK)["attached_to"].is_null());

    // ...and released with keep_public_ip=false.
    let mut body = web_lb("given2", 18080, &[]);
    body["public_ip_id"] = json!(ip_id);
    let lb = sb.create_lb(body).await;
    let id = lb["id"].as_str().unwrap();
    sb.call(Method::DELETE, &format!("{LBS}/{id}?keep_public_ip=false"), None)
        .await
        .ok(StatusCode::ACCEPTED);
    sb.wait_gone(&format!("{LBS}/{id}")).await;
    sb.get(&ip_path).await.error(StatusCode::NOT_FOUND);

    // An acquired IP is released by default, kept with keep_public_ip=true.
    let lb = sb.create_lb(web_lb("acquired", 18080, &[])).await;
    let id = lb["id"].as_str().unwrap();
    let acquired = format!("/network/v1/public-ips/{}", lb["public_ip"]["id"].as_str().unwrap());
    sb.call(Method::DELETE, &format!("{LBS}/{id}?keep_public_ip=true"), None)
        .await
        .ok(StatusCode::ACCEPTED);
    sb.wait_gone(&format!("{LBS}/{id}")).await;
    assert!(sb.get(&acquired).await.ok(StatusCode::OK)["attached_to"].is_null());
    let deleted = sb.call(Method::DELETE, &acquired, None).await;
    deleted.ok(StatusCode::OK);
    sb.get(&acquired).await.error(StatusCode::NOT_FOUND);
    sb.stop().await;
}

#[tokio::test]
async fn public_ip_pool_exhaustion_is_409() {
    let dir = tempfile::tempdir().unwrap();
    // A /30 has two hosts: two IPs, then none.
    let mut cfg = config(105, dir.path());
    cfg.public_ip_range = "127.203.105.0/30".parse().unwrap();
    let sb = Sandbox::start_with(105, cfg).await;
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..3 {
        let a = sb
            .call(Method::POST, "/network/v1/public-ips", Some(json!({"region": "jkt"})))
            .await;
        statuses.push(a.status.as_u16());
        last = Some(a);
    }
    assert_eq!(statuses, vec![201, 201, 409]);
    let last = last.unwrap();
    assert_eq!(last.error(StatusCode::CONFLICT), "no public IP available in region jkt");
    // An LB without public_ip_id needs one too.
    let refused = sb.call(Method::POST, LBS, Some(web_lb("web", 18080, &[]))).await;
    refused.error(StatusCode::CONFLICT);
    sb.stop().await;
}

#[tokio::test]
async fn clusters_are_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::start(106, dir.path()).await;
    let other = sb
        .call(
            Method::POST,
            "/_sandbox/clusters",
            Some(json!({"id": "cl-2", "name": "two"})),
        )
        .await;
    other.ok(StatusCode::CREATED);
    sb.call(
        Method::POST,
        "/_sandbox/clusters",
        Some(json!({"id": "cl-2", "name": "again"})),
    )
    .await
    .error(StatusCode::CONFLICT);

    let theirs = sb
        .call(
            Method::POST,
            "/kubernetes/v1/clusters/cl-2/load-balancers",
            Some(web_lb("web", 18080, &[])),
        )
        .await;
    let theirs = theirs.ok(StatusCode::CREATED).clone();
    let id = theirs["id"].as_str().unwrap();
    // The same name is fine in another cluster.
    sb.create_lb(web_lb("web", 18081, &[])).await;

    sb.get(&format!("{LBS}/{id}")).await.error(StatusCode::NOT_FOUND);
    sb.call(Method::PUT, &format!("{LBS}/{id}"), Some(web_lb("web", 18080, &[])))
        .await
        .error(StatusCode::NOT_FOUND);
    sb.call(Method::DELETE, &format!("{LBS}/{id}"), None)
        .await
        .error(StatusCode::NOT_FOUND);
    let ours = sb.get(LBS).await;
    let ours = ours.ok(StatusCode::OK);
    assert_eq!(ours["total"], 1);
    assert_ne!(ours["items"][0]["id"], id);
    sb.get(&format!("/kubernetes/v1/clusters/cl-2/load-balancers/{id}"))
        .await
        .ok(StatusCode::OK);
    sb.stop().await;
}

#[tokio::test]
async fn backends_must_be_running_vms_of_the_subnet_and_udp_can_be_off() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::start(107, dir.path()).await;
    let workers = sb.workers().await;
    let cluster = sb.get("/kubernetes/v1/clusters/cl-1").await;
    let cluster = cluster.ok(StatusCode::OK).clone();
    let subnet = cluster["subnet_id"].as_str().unwrap();
    let sn = sb.get(&format!("/network/v1/subnets/{subnet}")).await;
    assert_eq!(sn.ok(StatusCode::OK)["cidr"], "127.10.107.0/24");
    sb.get(&format!("/network/v1/vpcs/{}", cluster["vpc_id"].as_str().unwrap()))
        .await
        .ok(StatusCode::OK);

    // A VM in another subnet, and a stopped worker.
    sb.call(
        Method::POST,
        "/_sandbox/clusters",
        Some(json!({"id": "cl-x", "name": "x", "subnet_id": "subnet-x"})),
    )
    .await
    .ok(StatusCode::CREATED);
    let stranger = sb
        .call(
            Method::POST,
            "/_sandbox/vms",
            Some(json!({"name": "stranger", "cluster_id": "cl-x"})),
        )
        .await;
    let stranger = stranger.ok(StatusCode::CREATED).clone();
    assert_eq!(stranger["state"], "running");
    assert_eq!(stranger["subnet_id"], "subnet-x");
    let stopped = sb
        .call(
            Method::POST,
            &format!("/_sandbox/vms/{}/stop", workers[1]["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(stopped.ok(StatusCode::OK)["state"], "stopped");

    let body = web_lb("web", 18080, &[&workers[0], &stranger, &workers[1]]);
    let refused = sb.call(Method::POST, LBS, Some(body)).await;
    let errors = refused.error(StatusCode::UNPROCESSABLE_ENTITY).clone();
    assert_eq!(
        errors,
        json!([
            {"field": "backends[1].vm_id",
             "message": format!("VM {} is not in subnet {subnet}", stranger["id"].as_str().unwrap())},
            {"field": "backends[2].vm_id",
             "message": format!("VM {} is not running (state stopped)", workers[1]["id"].as_str().unwrap())},
        ])
    );

    // UDP: allowed by default, 422 once turned off.
    let udp = json!({
        "name": "dns",
        "rules": [{"name": "dns", "protocol": "udp", "public_port": 18053, "private_port": 30053}],
    });
    sb.create_lb(udp.clone()).await;
    let cfg = sb
        .call(Method::PUT, "/_sandbox/config", Some(json!({"udp_enabled": false})))
        .await;
    assert_eq!(cfg.ok(StatusCode::OK)["udp_enabled"], false);
    let mut udp2 = udp;
    udp2["name"] = json!("dns2");
    let refused = sb.call(Method::POST, LBS, Some(udp2)).await;
    assert_eq!(
        refused.error(StatusCode::UNPROCESSABLE_ENTITY),
        &json!([{"field": "rules[0].protocol", "message": "udp is not supported"}])
    );
    sb.stop().await;
}

#[tokio::test]
async fn traffic_flows_and_a_bind_error_marks_the_lb() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::start(108, dir.path()).await;
    let workers = sb.workers().await;
    let backend_ip = workers[0]["private_ip"].as_str().unwrap();

    // A backend service on the worker's private IP.
    let backend = tokio::net::TcpListener::bind((backend_ip, 31080)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = backend.accept().await {
            tokio::spawn(async move {
                let _ = conn.write_all(b"hello from w1").await;
            });
        }
    });
    let lb = sb.create_lb(web_lb("web", 18080, &[&workers[0]])).await;
    let id = lb["id"].as_str().unwrap();
    let lb = sb.wait_status(id, "active").await;
    let public: SocketAddr = format!("{}:18080", lb["public_ip"]["address"].as_str().unwrap())
        .parse()
        .unwrap();
    let mut conn = tokio::net::TcpStream::connect(public).await.unwrap();
    let mut got = String::new();
    conn.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "hello from w1");
    assert_eq!(lb["health"][0]["vm_id"], workers[0]["id"]);

    // Someone else holds the next LB's public port: the LB goes to `error`.
    let next_ip = format!("127.203.{}.12", sb.n);
    let squatter = tokio::net::TcpListener::bind((next_ip.as_str(), 18081)).await.unwrap();
    let lb2 = sb.create_lb(web_lb("blocked", 18081, &[])).await;
    assert_eq!(lb2["public_ip"]["address"], next_ip.as_str());
    let id2 = lb2["id"].as_str().unwrap();
    let failed = sb.wait_status(id2, "error").await;
    assert!(!failed["status_message"].as_str().unwrap().is_empty(), "{failed}");
    // A PUT on an `error` LB retries.
    drop(squatter);
    sb.call(
        Method::PUT,
        &format!("{LBS}/{id2}"),
        Some(web_lb("blocked", 18081, &[])),
    )
    .await
    .ok(StatusCode::OK);
    let recovered = sb.wait_status(id2, "active").await;
    assert_eq!(recovered["status_message"], "");
    sb.stop().await;
}

#[tokio::test]
async fn state_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::start(109, dir.path()).await;
    let workers = sb.workers().await;
    let lb = sb.create_lb(web_lb("web", 18080, &[&workers[0]])).await;
    let id = lb["id"].as_str().unwrap().to_string();
    sb.wait_status(&id, "active").await;
    // One LB still provisioning at shutdown: the reopened platform finishes it.
    sb.call(
        Method::PUT,
        "/_sandbox/config",
        Some(json!({"provisioning_delay_ms": 60_000})),
    )
    .await
    .ok(StatusCode::OK);
    let pending = sb.create_lb(web_lb("pending", 18081, &[])).await;
    let pending_id = pending["id"].as_str().unwrap().to_string();
    let old_token = sb.token.clone();
    let state_before = sb.get("/_sandbox/state").await.ok(StatusCode::OK).clone();
    sb.stop().await;

    let sb = Sandbox::start(109, dir.path()).await;
    // Seeding again creates nothing new.
    assert_eq!(sb.workers().await, workers);
    sb.call_as(Some(&old_token), Method::GET, LBS, None)
        .await
        .error(StatusCode::UNAUTHORIZED);
    let lb = sb.get(&format!("{LBS}/{id}")).await;
    assert_eq!(lb.ok(StatusCode::OK)["status"], "active");
    sb.wait_status(&pending_id, "active").await;
    let state_after = sb.get("/_sandbox/state").await.ok(StatusCode::OK).clone();
    assert_eq!(state_before["vms"], state_after["vms"]);
    assert_eq!(state_before["public_ips"], state_after["public_ips"]);
    // The restarted data plane serves the active LB's port again.
    let public = format!("{}:18080", lb.data()["public_ip"]["address"].as_str().unwrap());
    tokio::net::TcpStream::connect(public).await.unwrap();
    sb.stop().await;
}

#[tokio::test]
async fn faults_latency_throttle_rate_limit_errors_and_hang() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::start(110, dir.path()).await;

    // Latency, only on the matching method and path.
    sb.set_faults(json!([{"method": "GET", "path": "/vm/*", "latency_ms": 300}]))
        .await;
    let t = Instant::now();
    sb.get("/vm/v1/instances").await.ok(StatusCode::OK);
    assert!(t.elapsed() >= Duration::from_millis(300));
    let t = Instant::now();
    sb.get("/kubernetes/v1/clusters/cl-1").await.ok(StatusCode::OK);
    assert!(t.elapsed() < Duration::from_millis(300));

    // throttle_next: the next N matching calls are 429 with Retry-After.
    sb.set_faults(json!([{"path": "/kubernetes/*", "throttle_next": 2, "retry_after_s": 7}]))
        .await;
    for _ in 0..2 {
        let a = sb.get(LBS).await;
        assert!(a.error(StatusCode::TOO_MANY_REQUESTS).is_string());
        assert_eq!(a.headers["retry-after"], "7");
    }
    sb.get(LBS).await.ok(StatusCode::OK);
    // The control API is never faulted, and shows what is left.
    let left = sb.get("/_sandbox/faults").await;
    assert_eq!(left.ok(StatusCode::OK)["rules"][0]["throttle_next"], 0);

    // rate_limit_per_s: calls beyond N in a second are 429.
    sb.set_faults(json!([{"rate_limit_per_s": 3}])).await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(sb.get("/vm/v1/instances").await.status.as_u16());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 3, "{statuses:?}");
    assert_eq!(statuses[3..], [429, 429]);

    // error_rate 1 with error_status: every matching call fails, and does nothing.
    sb.set_faults(json!([{"method": "POST", "error_rate": 1.0, "error_status": 500}]))
        .await;
    let failed = sb.call(Method::POST, LBS, Some(web_lb("web", 18080, &[]))).await;
    assert!(failed.error(StatusCode::INTERNAL_SERVER_ERROR).is_string());
    sb.call(Method::DELETE, "/_sandbox/faults", None)
        .await
        .ok(StatusCode::OK);
    assert_eq!(sb.get(LBS).await.ok(StatusCode::OK)["total"], 0);
    sb.set_faults(json!([{"error_rate": 1.0}])).await;
    sb.get(LBS).await.error(StatusCode::SERVICE_UNAVAILABLE);
    sb.get("/_sandbox/state").await.ok(StatusCode::OK);

    // Invalid rules are refused.
    sb.call(
        Method::PUT,
        "/_sandbox/faults",
        Some(json!({"rules": [{"error_rate": 2.0}]})),
    )
    .await
    .error(StatusCode::UNPROCESSABLE_ENTITY);

    // hang: the client's timeout fires.
    sb.set_faults(json!([{"path": "/vm/v1/instances", "hang": true}])).await;
    let hung = sb
        .client
        .get(format!("{}/vm/v1/instances", sb.url))
        .bearer_auth(&sb.token)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(hung.unwrap_err().is_timeout());
    sb.call(Method::DELETE, "/_sandbox/faults", None)
        .await
        .ok(StatusCode::OK);
    sb.get("/vm/v1/instances").await.ok(StatusCode::OK);
    sb.stop().await;
}

#[tokio::test]
async fn hung_calls_do_not_block_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::start(111, dir.path()).await;
    sb.set_faults(json!([{"hang": true}])).await;
    let url = format!("{}/vm/v1/instances", sb.url);
    let client = sb.client.clone();
    let token = sb.token.clone();
    let call = tokio::spawn(async move { client.get(url).bearer_auth(token).send().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::time::timeout(Duration::from_secs(5), sb.stop())
        .await
        .expect("shutdown waits for no hung call");
    let answered = call.await.unwrap();
    if let Ok(resp) = answered {
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}

#[tokio::test]
async fn call_counts_by_route_template() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::start(112, dir.path()).await;
    sb.call(Method::DELETE, "/_sandbox/calls", None)
        .await
        .ok(StatusCode::OK);
    let lb = sb.create_lb(web_lb("web", 18080, &[])).await;
    let id = lb["id"].as_str().unwrap();
    sb.wait_status(id, "active").await;
    sb.set_faults(json!([{"method": "PUT", "throttle_next": 1}])).await;
    for _ in 0..2 {
        sb.call(Method::PUT, &format!("{LBS}/{id}"), Some(web_lb("web", 18080, &[])))
            .await;
    }
    sb.get("/vm/v1/instances/vm-none").await;
    sb.call_as(None, Method::GET, "/vm/v1/instances", None).await;

    let calls = sb.get("/_sandbox/calls").await;
    let calls = calls.ok(StatusCode::OK).clone();
    let get_lb = calls["GET /kubernetes/v1/clusters/{cluster_id}/load-balancers/{id}"]
        .as_u64()
        .unwrap();
    assert!(get_lb >= 1, "{calls}");
    assert_eq!(calls["POST /kubernetes/v1/clusters/{cluster_id}/load-balancers"], 1);
    // The throttled PUT counts too.
    assert_eq!(calls["PUT /kubernetes/v1/clusters/{cluster_id}/load-balancers/{id}"], 2);
    assert_eq!(calls["GET /vm/v1/instances/{id}"], 1);
    assert_eq!(calls["GET /vm/v1/instances"], 1);
    assert!(
        calls.as_object().unwrap().keys().all(|k| !k.contains("/_sandbox/")),
        "{calls}"
    );
    let cleared = sb.call(Method::DELETE, "/_sandbox/calls", None).await;
    assert_eq!(cleared.ok(StatusCode::OK), &json!({}));
    sb.stop().await;
}

#[tokio::test]
async fn sandbox_vm_controls() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::start(113, dir.path()).await;
    let vm = sb
        .call(
            Method::POST,
            "/_sandbox/vms",
            Some(json!({"name": "extra", "cluster_id": "cl-1", "labels": {"role": "x"}})),
        )
        .await;
    let vm = vm.ok(StatusCode::CREATED).clone();
    assert_eq!(vm["labels"]["kuberaya.cloudraya.com/cluster-id"], "cl-1");
    assert_eq!(vm["zone"], "jkt-a");
    let id = vm["id"].as_str().unwrap();
    let moved = sb
        .call(Method::PUT, &format!("/_sandbox/vms/{id}/private-ip"), None)
        .await;
    let moved = moved.ok(StatusCode::OK).clone();
    assert_ne!(moved["private_ip"], vm["private_ip"]);
    let chosen = sb
        .call(
            Method::PUT,
            &format!("/_sandbox/vms/{id}/private-ip"),
            Some(json!({"private_ip": "127.10.113.200"})),
        )
        .await;
    assert_eq!(chosen.ok(StatusCode::OK)["private_ip"], "127.10.113.200");
    let filtered = sb.get("/vm/v1/instances?label=role=x").await;
    assert_eq!(filtered.ok(StatusCode::OK)["total"], 1);
    sb.call(Method::POST, &format!("/_sandbox/vms/{id}/stop"), None)
        .await
        .ok(StatusCode::OK);
    let started = sb.call(Method::POST, &format!("/_sandbox/vms/{id}/start"), None).await;
    assert_eq!(started.ok(StatusCode::OK)["state"], "running");
    sb.call(Method::DELETE, &format!("/_sandbox/vms/{id}"), None)
        .await
        .ok(StatusCode::OK);
    sb.get(&format!("/vm/v1/instances/{id}"))
        .await
        .error(StatusCode::NOT_FOUND);
    sb.call(Method::POST, "/_sandbox/vms/vm-none/stop", None)
        .await
        .error(StatusCode::NOT_FOUND);
    let cfg = sb.get("/_sandbox/config").await;
    assert_eq!(
        cfg.ok(StatusCode::OK),
        &json!({"provisioning_delay_ms": 100, "udp_enabled": true, "token_ttl_s": 3600})
    );
    sb.stop().await;
}

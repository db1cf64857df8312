//! Behaviour of `HttpPlatform` over real HTTP, against a small scripted fake of the
//! platform written here (loopback only). The fake implements just enough of
//! docs/platform-api.md for each scenario: login, and whatever each test's script says.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use kuberaya_ccm::platform::time::format_rfc3339;
use kuberaya_ccm::platform::{
    Algorithm, BackendRef, Error, HttpPlatform, InstanceFilter, LABEL_CLUSTER_ID, Labels, LoadBalancerSpec, Platform,
    PlatformClientConfig, Rule, RuleProtocol,
};
use serde_json::{Value, json};

const EMAIL: &str = "ops@example.com";
const PASSWORD: &str = "correct horse battery staple";

/// A request the fake received (login requests are only counted).
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    auth: Option<String>,
    user_agent: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
    at: Instant,
}

enum Reply {
    Status(u16, Value),
    RateLimited(&'static str),
    Raw(u16, &'static str),
    Hang,
}

type Script = Box<dyn Fn(&Seen, usize) -> Reply + Send + Sync>;

struct Fake {
    script: Script,
    seen: Mutex<Vec<Seen>>,
    logins: AtomicUsize,
    token_ttl: Duration,
    login_delay: Duration,
}

impl Fake {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn logins(&self) -> usize {
        self.logins.load(Ordering::SeqCst)
    }
}

fn envelope(code: u16, data: Value, error: Value) -> Value {
    json!({"code": code, "message": "", "data": data, "error": error})
}

fn ok(data: Value) -> Reply {
    Reply::Status(200, envelope(200, data, Value::Null))
}

fn fail(status: u16, message: &str) -> Reply {
    Reply::Status(status, envelope(status, Value::Null, json!(message)))
}

fn json_response(status: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    (status, headers, body.to_string()).into_response()
}

async fn handle(State(fake): State<Arc<Fake>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if method == Method::POST && uri.path() == "/core/v1/auth/login" {
        tokio::time::sleep(fake.login_delay).await;
        let creds: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if creds["email"] != EMAIL || creds["password"] != PASSWORD {
            return json_response(401, &envelope(401, Value::Null, json!("wrong email or password")));
        }
        let n = fake.logins.fetch_add(1, Ordering::SeqCst) + 1;
        let expires_at = format_rfc3339(SystemTime::now() + fake.token_ttl);
        return json_response(
            200,
            &envelope(
                200,
                json!({"token": format!("tok-{n}"), "expires_at": expires_at}),
                Value::Null,
            ),
        );
    }
    let seen = Seen {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect(),
        auth: header("authorization"),
        user_agent: header("user-agent"),
        content_type: header("content-type"),
        body: body.to_vec(),
        at: Instant::now(),
    };
    let index = {
        let mut all = fake.seen.lock().unwrap_or_else(|p| p.into_inner());
        all.push(seen.clone());
        all.len() - 1
    };
    match (fake.script)(&seen, index) {
        Reply::Status(status, body) => json_response(status, &body),
        Reply::RateLimited(retry_after) => {
            let mut headers = HeaderMap::new();
            headers.insert("retry-after", HeaderValue::from_static(retry_after));
            let body = envelope(429, Value::Null, json!("too many requests"));
            (StatusCode::TOO_MANY_REQUESTS, headers, body.to_string()).into_response()
        }
        Reply::Raw(status, body) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut headers = HeaderMap::new();
            headers.insert("content-type", HeaderValue::from_static("text/html"));
            (status, headers, body).into_response()
        }
        Reply::Hang => {
            std::future::pending::<()>().await;
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

struct Harness {
    fake: Arc<Fake>,
    base: String,
}

impl Harness {
    async fn start(script: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> Self {
        Self::start_with(Duration::from_secs(3600), Duration::ZERO, script).await
    }

    async fn start_with(
        token_ttl: Duration,
        login_delay: Duration,
        script: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let fake = Arc::new(Fake {
            script: Box::new(script),
            seen: Mutex::new(Vec::new()),
            logins: AtomicUsize::new(0),
            token_ttl,
            login_delay,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let app = Router::new().fallback(handle).with_state(Arc::clone(&fake));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Harness {
            fake,
            base: format!("http://{addr}"),
        }
    }

    /// Fast backoffs so retry tests run quickly.
    fn config(&self) -> PlatformClientConfig {
        let mut c = PlatformClientConfig::new(&self.base, EMAIL, PASSWORD);
        c.timeout = Duration::from_secs(2);
        c.base_backoff = Duration::from_millis(10);
        c.max_backoff = Duration::from_millis(40);
        c
    }

    fn client(&self) -> HttpPlatform {
        self.client_with(|_| {})
    }

    fn client_with(&self, tweak: impl FnOnce(&mut PlatformClientConfig)) -> HttpPlatform {
        let mut c = self.config();
        tweak(&mut c);
        HttpPlatform::new(c).expect("client")
    }
}

fn instance(id: &str) -> Value {
    json!({
        "id": id, "name": id, "region": "jkt", "zone": "jkt-a",
        "package": "standard-2", "state": "running",
        "private_ip": "127.10.0.11", "public_ip": null,
        "vpc_id": "vpc-1", "subnet_id": "subnet-1",
        "labels": {LABEL_CLUSTER_ID: "cl-1"},
        "created_at": "2026-11-25T17:00:00Z"
    })
}

fn load_balancer(status: &str) -> Value {
    json!({
        "id": "lb-12ab", "name": "kr-cl1-default-web",
        "region": "jkt", "vpc_id": "vpc-1", "subnet_id": "subnet-1",
        "public_ip": {"id": "ip-8d1e", "address": "127.203.0.10"},
        "labels": {LABEL_CLUSTER_ID: "cl-1"},
        "status": status, "status_message": "",
        "rules": [{"name": "http", "protocol": "tcp", "public_port": 80, "private_port": 31080,
                   "algorithm": "round_robin", "allowed_sources": []}],
        "backends": [{"vm_id": "vm-1", "private_ip": "127.10.0.11"}],
        "health": [],
        "created_at": "2026-11-25T17:00:00Z", "updated_at": "2026-11-25T17:00:02Z"
    })
}

fn spec() -> LoadBalancerSpec {
    LoadBalancerSpec {
        name: "kr-cl1-default-web".into(),
        public_ip_id: None,
        public_ipv6_id: None,
        ip_versions: None,
        labels: Labels::from([(LABEL_CLUSTER_ID.to_owned(), "cl-1".to_owned())]),
        rules: vec![Rule {
            name: "http".into(),
            protocol: RuleProtocol::Tcp,
            public_port: 80,
            private_port: 31080,
            algorithm: Algorithm::RoundRobin,
            allowed_sources: vec![],
            health_check: None,
        }],
        backends: vec![BackendRef::new("vm-1")],
    }
}

#[tokio::test]
async fn rate_limited_call_waits_retry_after_then_succeeds() {
    let h = Harness::start(|_, i| {
        if i == 0 {
            Reply::RateLimited("1")
        } else {
            ok(instance("vm-1"))
        }
    })
    .await;
    let client = h.client();
    let started = Instant::now();
    let vm = client.get_instance("vm-1").await.expect("succeeds after the wait");
    let elapsed = started.elapsed();
    assert_eq!(vm.id, "vm-1");
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
    let seen = h.fake.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen[1].at.duration_since(seen[0].at) >= Duration::from_secs(1));
    let m = client.metrics();
    assert_eq!(m.request_count("GET", "/vm/v1/instances/{id}", "429"), 1);
    assert_eq!(m.request_count("GET", "/vm/v1/instances/{id}", "200"), 1);
    assert_eq!(m.rate_limit_waits(), 1);
    assert_eq!(client.rate_limit_waits(), 1);
}

#[tokio::test]
async fn rate_limit_holds_back_every_caller_of_the_client() {
    let h = Harness::start(|_, i| {
        if i == 0 {
            Reply::RateLimited("1")
        } else {
            ok(instance("vm-1"))
        }
    })
    .await;
    let client = Arc::new(h.client());
    let first = {
        let client = Arc::clone(&client);
        tokio::spawn(async move { client.get_instance("vm-1").await })
    };
    // Wait until the first caller has seen the 429 and is waiting on the limiter.
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.rate_limit_waits() == 0 {
        assert!(Instant::now() < deadline, "the first call never hit the limiter");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    client.get_instance("vm-2").await.expect("second caller");
    first.await.expect("join").expect("first caller");
    let seen = h.fake.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    let throttled_at = seen[0].at;
    for later in &seen[1..] {
        assert!(
            later.at.duration_since(throttled_at) >= Duration::from_secs(1),
            "a call went out before Retry-After passed"
        );
    }
    assert_eq!(client.rate_limit_waits(), 2);
}

#[tokio::test]
async fn rate_limit_retries_are_bounded() {
    let h = Harness::start(|_, _| Reply::RateLimited("0")).await;
    let client = h.client_with(|c| c.max_retries = 2);
    let err = client.get_vpc("vpc-1").await.expect_err("always 429");
    assert!(matches!(err, Error::RateLimited { .. }), "{err:?}");
    assert_eq!(h.fake.seen().len(), 3);
}

#[tokio::test]
async fn server_error_on_get_is_retried_and_succeeds() {
    let h = Harness::start(|_, i| {
        if i < 2 {
            fail(503, "platform maintenance")
        } else {
            ok(instance("vm-1"))
        }
    })
    .await;
    let client = h.client();
    let vm = client.get_instance("vm-1").await.expect("third attempt");
    assert_eq!(vm.id, "vm-1");
    assert_eq!(h.fake.seen().len(), 3);
    assert_eq!(client.metrics().retries(), 2);
}

#[tokio::test]
async fn server_error_retries_are_bounded() {
    let h = Harness::start(|_, _| Reply::Raw(502, "<html><h1>502 Bad Gateway</h1></html>")).await;
    let client = h.client_with(|c| c.max_retries = 1);
    let err = client.get_subnet("subnet-1").await.expect_err("always 502");
    match err {
        Error::Server { status, message } => {
            assert_eq!(status, 502);
            assert!(message.contains("502 Bad Gateway"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.fake.seen().len(), 2);
}

#[tokio::test]
async fn server_error_on_post_is_not_retried() {
    let h = Harness::start(|_, _| fail(503, "try later")).await;
    let client = h.client();
    let err = client.create_load_balancer("cl-1", &spec()).await.expect_err("503");
    assert!(matches!(err, Error::Server { status: 503, .. }), "{err:?}");
    assert_eq!(h.fake.seen().len(), 1, "a POST must not be resent");
    let err = client
        .create_public_ip("jkt", kuberaya_ccm::platform::IpVersion::V4, &Labels::new())
        .await
        .expect_err("503");
    assert!(matches!(err, Error::Server { status: 503, .. }), "{err:?}");
    assert_eq!(h.fake.seen().len(), 2);
}

#[tokio::test]
async fn put_and_delete_are_retried_on_server_errors() {
    let h = Harness::start(|seen, i| match (seen.method.as_str(), i) {
        (_, 0) | (_, 2) => fail(500, "oops"),
        ("PUT", _) => ok(load_balancer("updating")),
        _ => Reply::Status(202, envelope(202, load_balancer("deleting"), Value::Null)),
    })
    .await;
    let client = h.client();
    let lb = client
        .update_load_balancer("cl-1", "lb-12ab", &spec_update())
        .await
        .expect("PUT retried");
    assert_eq!(lb.status.as_str(), "updating");
    client
        .delete_load_balancer("cl-1", "lb-12ab", None)
        .await
        .expect("DELETE retried");
    assert_eq!(h.fake.seen().len(), 4);
}

fn spec_update() -> kuberaya_ccm::platform::LoadBalancerUpdate {
    let s = spec();
    kuberaya_ccm::platform::LoadBalancerUpdate {
        rules: s.rules,
        backends: s.backends,
        labels: s.labels,
        ip_versions: None,
    }
}

#[tokio::test]
async fn hanging_call_times_out() {
    let h = Harness::start(|_, _| Reply::Hang).await;
    let timeout = Duration::from_millis(300);
    let client = h.client_with(|c| {
        c.timeout = timeout;
        c.max_retries = 0;
    });
    let started = Instant::now();
    let err = client.get_instance("vm-1").await.expect_err("hangs");
    let elapsed = started.elapsed();
    match &err {
        Error::Timeout { method, path, after } => {
            assert_eq!(*method, "GET");
            assert_eq!(path, "/vm/v1/instances/vm-1");
            assert_eq!(*after, timeout);
        }
        other => panic!("{other:?}"),
    }
    assert!(elapsed >= timeout, "{elapsed:?}");
    assert!(elapsed < timeout + Duration::from_millis(1500), "{elapsed:?}");
    assert!(err.to_string().contains("timed out"));
    assert_eq!(
        client
            .metrics()
            .request_count("GET", "/vm/v1/instances/{id}", "timeout"),
        1
    );
}

#[tokio::test]
async fn hanging_get_is_retried_but_hanging_post_is_not() {
    let h = Harness::start(|_, _| Reply::Hang).await;
    let client = h.client_with(|c| {
        c.timeout = Duration::from_millis(200);
        c.max_retries = 1;
    });
    let err = client.get_cluster("cl-1").await.expect_err("hangs");
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert_eq!(h.fake.seen().len(), 2);
    let err = client
        .create_public_ip("jkt", kuberaya_ccm::platform::IpVersion::V4, &Labels::new())
        .await
        .expect_err("hangs");
    assert!(matches!(err, Error::Timeout { method: "POST", .. }), "{err:?}");
    assert_eq!(h.fake.seen().len(), 3);
}

#[tokio::test]
async fn unauthorized_once_logs_in_again_and_succeeds() {
    let h = Harness::start(|_, i| {
        if i == 0 {
            fail(401, "token revoked")
        } else {
            ok(instance("vm-1"))
        }
    })
    .await;
    let client = h.client();
    client.get_instance("vm-1").await.expect("after re-login");
    assert_eq!(h.fake.logins(), 2);
    let seen = h.fake.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].auth.as_deref(), Some("Bearer tok-1"));
    assert_eq!(seen[1].auth.as_deref(), Some("Bearer tok-2"));
    assert_eq!(client.metrics().relogins_on_401(), 1);
}

#[tokio::test]
async fn unauthorized_on_post_is_resent_after_re_login() {
    let h = Harness::start(|_, i| {
        if i == 0 {
            fail(401, "token revoked")
        } else {
            Reply::Status(201, envelope(201, load_balancer("provisioning"), Value::Null))
        }
    })
    .await;
    let client = h.client();
    let lb = client.create_load_balancer("cl-1", &spec()).await.expect("created");
    assert_eq!(lb.status.as_str(), "provisioning");
    assert_eq!(h.fake.seen().len(), 2);
}

#[tokio::test]
async fn unauthorized_twice_is_an_error() {
    let h = Harness::start(|_, _| fail(401, "token revoked")).await;
    let client = h.client();
    let err = client.get_instance("vm-1").await.expect_err("401 twice");
    assert!(matches!(err, Error::Unauthorized { .. }), "{err:?}");
    assert_eq!(h.fake.logins(), 2);
    assert_eq!(h.fake.seen().len(), 2);
}

#[tokio::test]
async fn wrong_credentials_are_unauthorized_without_the_password() {
    let h = Harness::start(|_, _| ok(instance("vm-1"))).await;
    let client = h.client_with(|c| c.password = "hunter2-wrong".into());
    let err = client.get_instance("vm-1").await.expect_err("bad login");
    assert!(matches!(err, Error::Unauthorized { .. }), "{err:?}");
    let text = format!("{err} {err:?}");
    assert!(text.contains(EMAIL), "{text}");
    assert!(!text.contains("hunter2-wrong"), "{text}");
    assert!(h.fake.seen().is_empty(), "no API call without a token");
}

#[tokio::test]
async fn token_is_reused_then_renewed_before_expiry() {
    // A 2 s token with the default 60 s margin is renewed half-way, after 1 s.
    let h = Harness::start_with(Duration::from_secs(2), Duration::ZERO, |_, _| ok(instance("vm-1"))).await;
    let client = h.client();
    client.get_instance("vm-1").await.expect("first");
    client.get_instance("vm-1").await.expect("second");
    assert_eq!(h.fake.logins(), 1, "a fresh token is reused");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    client.get_instance("vm-1").await.expect("third");
    assert_eq!(h.fake.logins(), 2, "renewed before expiry, without a 401");
    let seen = h.fake.seen();
    assert_eq!(seen[1].auth.as_deref(), Some("Bearer tok-1"));
    assert_eq!(seen[2].auth.as_deref(), Some("Bearer tok-2"));
}

#[tokio::test]
async fn concurrent_callers_share_one_login() {
    let h = Harness::start_with(Duration::from_secs(3600), Duration::from_millis(100), |_, _| {
        ok(instance("vm-1"))
    })
    .await;
    let client: Arc<dyn Platform> = Arc::new(h.client());
    let calls = (0..10).map(|_| {
        let client = Arc::clone(&client);
        tokio::spawn(async move { client.get_instance("vm-1").await })
    });
    for call in futures::future::join_all(calls).await {
        call.expect("join").expect("call");
    }
    assert_eq!(h.fake.logins(), 1);
    assert_eq!(h.fake.seen().len(), 10);
}

fn paged(total: usize, server_max: usize) -> impl Fn(&Seen, usize) -> Reply {
    move |seen, _| {
        let q = |name: &str| {
            seen.query
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| v.parse::<usize>().ok())
        };
        let page = q("page").unwrap_or(1).max(1);
        let per_page = q("per_page").unwrap_or(50).clamp(1, server_max);
        let items: Vec<Value> = ((page - 1) * per_page..(page * per_page).min(total))
            .map(|i| instance(&format!("vm-{i:03}")))
            .collect();
        ok(json!({"items": items, "page": page, "per_page": per_page, "total": total}))
    }
}

#[tokio::test]
async fn pagination_is_followed_with_filters() {
    let h = Harness::start(paged(250, 100)).await;
    let client = h.client();
    let filter = InstanceFilter {
        region: Some("jkt".into()),
        subnet_id: Some("subnet-1".into()),
        ..InstanceFilter::cluster("cl-1")
    };
    let vms = client.list_instances(&filter).await.expect("list");
    assert_eq!(vms.len(), 250);
    assert_eq!(vms[0].id, "vm-000");
    assert_eq!(vms[249].id, "vm-249");
    let seen = h.fake.seen();
    assert_eq!(seen.len(), 3);
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(s.path, "/vm/v1/instances");
        let has = |k: &str, v: &str| s.query.iter().any(|(qk, qv)| qk == k && qv == v);
        assert!(has("page", &(i + 1).to_string()), "{:?}", s.query);
        assert!(has("per_page", "100"));
        assert!(has("region", "jkt"));
        assert!(has("subnet_id", "subnet-1"));
        assert!(has("label", &format!("{LABEL_CLUSTER_ID}=cl-1")), "{:?}", s.query);
    }
}

#[tokio::test]
async fn pagination_follows_a_smaller_server_page_size() {
    let h = Harness::start(paged(120, 50)).await;
    let client = h.client();
    let vms = client.list_instances(&InstanceFilter::default()).await.expect("list");
    assert_eq!(vms.len(), 120);
    assert_eq!(h.fake.seen().len(), 3);
}

#[tokio::test]
async fn empty_list_is_one_call() {
    let h = Harness::start(paged(0, 100)).await;
    let client = h.client();
    let ips = client.list_public_ips(&Labels::new()).await.expect("list");
    assert!(ips.is_empty());
    assert_eq!(h.fake.seen().len(), 1);
    assert_eq!(h.fake.seen()[0].path, "/network/v1/public-ips");
}

#[tokio::test]
async fn unprocessable_fields_are_surfaced() {
    let h = Harness::start(|_, _| {
        Reply::Status(
            422,
            envelope(
                422,
                Value::Null,
                json!([
                    {"field": "rules[0].public_port", "message": "must be between 1 and 65535"},
                    {"field": "backends[1].vm_id", "message": "VM vm-9 is not in subnet subnet-1"}
                ]),
            ),
        )
    })
    .await;
    let client = h.client();
    let err = client.create_load_balancer("cl-1", &spec()).await.expect_err("422");
    let text = err.to_string();
    match err {
        Error::Invalid { fields, .. } => {
            assert_eq!(fields.len(), 2);
            assert_eq!(fields[0].field, "rules[0].public_port");
            assert_eq!(fields[1].message, "VM vm-9 is not in subnet subnet-1");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        text.contains("backends[1].vm_id: VM vm-9 is not in subnet subnet-1"),
        "{text}"
    );
    assert_eq!(h.fake.seen().len(), 1);
}

#[tokio::test]
async fn malformed_bodies_are_decode_errors() {
    let h = Harness::start(|_, i| match i {
        0 => ok(json!({"id": 5})),
        1 => Reply::Raw(200, "this is not json"),
        _ => Reply::Status(200, json!({"code": 200, "data": [1, 2]})),
    })
    .await;
    let client = h.client();
    for _ in 0..3 {
        let err = client.get_load_balancer("cl-1", "lb-1").await.expect_err("malformed");
        match err {
            Error::Decode {
                status, body_excerpt, ..
            } => {
                assert_eq!(status, 200);
                assert!(!body_excerpt.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(h.fake.seen().len(), 3, "decode errors are not retried");
}

#[tokio::test]
async fn not_found_names_the_object() {
    let h = Harness::start(|_, _| fail(404, "not found")).await;
    let client = h.client();
    let err = client.get_load_balancer("cl-1", "lb-1").await.expect_err("404");
    assert!(err.is_not_found());
    assert_eq!(err.to_string(), "not found: load balancer lb-1 in cluster cl-1");
    assert_eq!(h.fake.seen().len(), 1, "404 is not retried");
}

#[tokio::test]
async fn conflict_is_surfaced_not_retried() {
    let h = Harness::start(|_, _| fail(409, "load balancer is updating")).await;
    let client = h.client();
    let err = client
        .update_load_balancer("cl-1", "lb-1", &spec_update())
        .await
        .expect_err("409");
    assert!(
        matches!(&err, Error::Conflict { message } if message == "load balancer is updating"),
        "{err:?}"
    );
    assert_eq!(h.fake.seen().len(), 1);
}

#[tokio::test]
async fn requests_follow_the_contract() {
    let h = Harness::start(|seen, _| match (seen.method.as_str(), seen.path.as_str()) {
        ("POST", "/kubernetes/v1/clusters/cl-1/load-balancers") => {
            Reply::Status(201, envelope(201, load_balancer("provisioning"), Value::Null))
        }
        ("DELETE", "/kubernetes/v1/clusters/cl-1/load-balancers/lb-12ab") => {
            Reply::Status(202, envelope(202, Value::Null, Value::Null))
        }
        ("POST", "/network/v1/public-ips") => Reply::Status(
            201,
            envelope(
                201,
                json!({"id": "ip-1", "address": "127.203.0.11", "region": "jkt",
                       "labels": {}, "attached_to": null}),
                Value::Null,
            ),
        ),
        ("DELETE", "/network/v1/public-ips/ip-1") => ok(Value::Null),
        _ => fail(404, "no route"),
    })
    .await;
    let client = h.client_with(|c| c.user_agent = "kuberaya-test/1".into());

    let lb = client.create_load_balancer("cl-1", &spec()).await.expect("create");
    assert_eq!(lb.id, "lb-12ab");
    client
        .delete_load_balancer("cl-1", "lb-12ab", Some(false))
        .await
        .expect("delete");
    client
        .delete_load_balancer("cl-1", "lb-12ab", None)
        .await
        .expect("delete without keep_public_ip");
    let labels = Labels::from([("a".to_owned(), "b".to_owned())]);
    let ip = client
        .create_public_ip("jkt", kuberaya_ccm::platform::IpVersion::V4, &labels)
        .await
        .expect("ip");
    assert!(ip.attached_to.is_none());
    client.delete_public_ip("ip-1").await.expect("release");

    let seen = h.fake.seen();
    assert_eq!(seen.len(), 5);
    for s in &seen {
        assert_eq!(s.auth.as_deref(), Some("Bearer tok-1"));
        assert_eq!(s.user_agent.as_deref(), Some("kuberaya-test/1"));
    }
    let body: Value = serde_json::from_slice(&seen[0].body).expect("JSON body");
    assert_eq!(seen[0].content_type.as_deref(), Some("application/json"));
    assert_eq!(
        body,
        json!({
            "name": "kr-cl1-default-web",
            "labels": {LABEL_CLUSTER_ID: "cl-1"},
            "rules": [{"name": "http", "protocol": "tcp", "public_port": 80, "private_port": 31080,
                       "algorithm": "round_robin", "allowed_sources": []}],
            "backends": [{"vm_id": "vm-1"}]
        })
    );
    assert_eq!(seen[1].query, vec![("keep_public_ip".to_owned(), "false".to_owned())]);
    assert!(seen[2].query.is_empty());
    let body: Value = serde_json::from_slice(&seen[3].body).expect("JSON body");
    assert_eq!(body, json!({"region": "jkt", "labels": {"a": "b"}}));

    let m = client.metrics();
    assert_eq!(
        m.request_count(
            "DELETE",
            "/kubernetes/v1/clusters/{cluster_id}/load-balancers/{id}",
            "202"
        ),
        2
    );
    assert_eq!(m.logins(), 1);
    let keys: BTreeMap<String, u64> = m
        .requests()
        .into_iter()
        .map(|(k, n)| (format!("{} {} {}", k.method, k.path, k.status), n))
        .collect();
    // The login is counted like any other request.
    assert_eq!(keys.get("POST /core/v1/auth/login 200"), Some(&1), "{keys:?}");
    assert_eq!(keys.len(), 5, "{keys:?}");
}

#[tokio::test]
async fn unreachable_platform_is_a_transport_error() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Bind then drop a listener so the port is (almost certainly) closed.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let mut c = PlatformClientConfig::new(format!("http://{addr}"), EMAIL, PASSWORD);
    c.max_retries = 0;
    let client = HttpPlatform::new(c).expect("client");
    let err = client.get_instance("vm-1").await.expect_err("nothing listens");
    assert!(matches!(err, Error::Transport(_)), "{err:?}");
    assert!(err.is_retryable());
    assert!(!err.to_string().contains(PASSWORD));
}

//! Our platform client (`kuberaya_ccm::platform::HttpPlatform`) against the platform
//! stand-in over real HTTP: a full LB lifecycle, and one test per fault kind showing the
//! client's behaviour (429 waits `Retry-After`, 5xx on safe calls retried and on POST not,
//! hangs time out, latency, revoked tokens, per-second rate limits).
//!
//! The stand-in and the client were written separately from `docs/platform-api.md`; this
//! is where they meet. Fault tests need the stand-in's control API.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kuberaya_ccm::platform::{
    Algorithm, BackendRef, Error, HealthCheck, HttpPlatform, InstanceFilter, LABEL_CLUSTER_ID, Labels, LbStatus,
    LoadBalancerSpec, Platform, PlatformClientConfig, Rule, RuleProtocol,
};
use kuberaya_e2e::{JsonApi, PlatformTarget, SandboxOptions, poll_until};
use serde_json::{Value, json};

fn client(target: &PlatformTarget, tune: impl FnOnce(&mut PlatformClientConfig)) -> Result<HttpPlatform> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut cfg = PlatformClientConfig::new(&target.url, &target.email, &target.password);
    cfg.base_backoff = Duration::from_millis(20);
    cfg.max_backoff = Duration::from_millis(100);
    tune(&mut cfg);
    Ok(HttpPlatform::new(cfg)?)
}

async fn set_faults(ctl: &JsonApi, rules: Value) {
    let a = ctl.put("/_sandbox/faults", &json!({ "rules": rules })).await;
    assert_eq!(a.status, 200, "setting faults: {}", a.describe());
}

/// How often the stand-in saw `METHOD /template` (every answer counts, faulted or not).
async fn calls(ctl: &JsonApi, key: &str) -> u64 {
    let a = ctl.get("/_sandbox/calls").await;
    assert_eq!(a.status, 200, "{}", a.describe());
    a.data()[key].as_u64().unwrap_or(0)
}

fn stand_in() -> Result<PlatformTarget> {
    PlatformTarget::start_sandbox(SandboxOptions {
        provisioning_delay_ms: Some(100),
        ..Default::default()
    })
}

const LIST_LBS: &str = "GET /kubernetes/v1/clusters/{cluster_id}/load-balancers";
const GET_VM: &str = "GET /vm/v1/instances/{id}";
const POST_IP: &str = "POST /network/v1/public-ips";

#[tokio::test]
async fn lifecycle_of_a_load_balancer_through_the_client() -> Result<()> {
    let target = PlatformTarget::acquire_with(SandboxOptions {
        provisioning_delay_ms: Some(100),
        ..Default::default()
    })?;
    if !target.is_sandbox() {
        eprintln!("skipped: creates LBs on cluster VMs; run it against the stand-in");
        return Ok(());
    }
    let p = client(&target, |_| {})?;
    let cluster = p.get_cluster(&target.cluster_id).await?;
    let vms = p.list_instances(&InstanceFilter::cluster(&target.cluster_id)).await?;
    assert!(vms.len() >= 2, "the cluster has worker VMs: {vms:?}");
    assert!(
        vms.iter().all(|vm| vm.subnet_id == cluster.subnet_id),
        "workers are in the cluster's subnet"
    );

    let labels = Labels::from([(LABEL_CLUSTER_ID.to_string(), target.cluster_id.clone())]);
    let rule = Rule {
        name: "http".into(),
        protocol: RuleProtocol::Tcp,
        public_port: 8080,
        private_port: 30080,
        algorithm: Algorithm::RoundRobin,
        allowed_sources: vec![],
        health_check: Some(HealthCheck::http(10256, "/healthz")),
    };
    let spec = LoadBalancerSpec {
        name: "client-lifecycle".into(),
        public_ip_id: None,
        public_ipv6_id: None,
        ip_versions: None,
        labels: labels.clone(),
        rules: vec![rule.clone()],
        backends: vms.iter().map(|vm| BackendRef { vm_id: vm.id.clone() }).collect(),
    };
    let created = p.create_load_balancer(&target.cluster_id, &spec).await?;
    assert_eq!(created.status, LbStatus::Provisioning);

    let active = poll_until(Duration::from_secs(10), Duration::from_millis(50), || async {
        let lb = p.get_load_balancer(&target.cluster_id, &created.id).await.ok()?;
        (lb.status == LbStatus::Active).then_some(lb)
    })
    .await
    .context("LB never became active")?;
    assert!(active.public_ip.is_some(), "an active LB has a public IP");
    assert_eq!(
        active.rules[0].health_check.as_ref().map(|h| h.with_defaults(30080)),
        Some(HealthCheck::http(10256, "/healthz").with_defaults(30080))
    );
    assert_eq!(active.backends.len(), vms.len());
    assert!(
        active.backends.iter().all(|b| b.private_ip.is_some()),
        "the platform fills private IPs"
    );

    // Listed by our label; the name is taken.
    let listed = p.list_load_balancers(&target.cluster_id, &labels).await?;
    assert!(listed.iter().any(|lb| lb.id == created.id));
    let again = p.create_load_balancer(&target.cluster_id, &spec).await;
    assert!(
        matches!(again, Err(Error::Conflict { .. })),
        "same name twice is a conflict: {again:?}"
    );

    // Invalid fields come back as a field list.
    let mut bad = spec.clone();
    bad.name = "client-bad".into();
    bad.rules[0].health_check = Some(HealthCheck {
        timeout_s: Some(30),
        interval_s: Some(10),
        ..HealthCheck::tcp(30080)
    });
    match p.create_load_balancer(&target.cluster_id, &bad).await {
        Err(Error::Invalid { fields, .. }) => {
            assert!(fields.iter().any(|f| f.field.contains("timeout_s")), "{fields:?}")
        }
        other => panic!("expected a 422 with fields, got {other:?}"),
    }

    // Update in place: one backend fewer, same public IP.
    let mut update = active.to_update();
    update.backends.truncate(1);
    let updating = p.update_load_balancer(&target.cluster_id, &created.id, &update).await?;
    assert_eq!(updating.status, LbStatus::Updating);
    let updated = poll_until(Duration::from_secs(10), Duration::from_millis(50), || async {
        let lb = p.get_load_balancer(&target.cluster_id, &created.id).await.ok()?;
        (lb.status == LbStatus::Active).then_some(lb)
    })
    .await
    .context("LB never became active after the update")?;
    assert_eq!(updated.backends.len(), 1);
    assert_eq!(updated.public_ip, active.public_ip);

    // Delete: gone, and the acquired public IP released with it.
    let ip_id = active.public_ip.as_ref().map(|ip| ip.id.clone()).context("public ip")?;
    p.delete_load_balancer(&target.cluster_id, &created.id, None).await?;
    poll_until(Duration::from_secs(10), Duration::from_millis(50), || async {
        matches!(
            p.get_load_balancer(&target.cluster_id, &created.id).await,
            Err(Error::NotFound { .. })
        )
        .then_some(())
    })
    .await
    .context("LB was not deleted")?;
    assert!(
        matches!(p.get_public_ip(&ip_id).await, Err(Error::NotFound { .. })),
        "acquired public IP released"
    );
    Ok(())
}

#[tokio::test]
async fn throttled_calls_wait_retry_after_then_succeed() -> Result<()> {
    let target = stand_in()?;
    let ctl = target.control_api();
    let p = client(&target, |_| {})?;
    p.get_cluster(&target.cluster_id).await?; // log in outside the faults
    set_faults(
        &ctl,
        json!([{"path": "/kubernetes/v1/clusters/*/load-balancers", "throttle_next": 2, "retry_after_s": 1}]),
    )
    .await;

    let start = Instant::now();
    p.list_load_balancers(&target.cluster_id, &Labels::new()).await?;
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1900),
        "two 429s with Retry-After: 1 take at least 2 s, took {waited:?}"
    );
    assert!(waited < Duration::from_secs(6), "and not much more: {waited:?}");
    assert_eq!(calls(&ctl, LIST_LBS).await, 3, "two 429s, then the call that succeeded");
    assert_eq!(p.rate_limit_waits(), 2);
    Ok(())
}

#[tokio::test]
async fn a_429_holds_back_every_caller_of_the_client() -> Result<()> {
    let target = stand_in()?;
    let ctl = target.control_api();
    let p = Arc::new(client(&target, |_| {})?);
    p.get_cluster(&target.cluster_id).await?;
    // At most 5 calls per second on the LB list: 20 concurrent callers must spread out
    // over about 4 s instead of hammering the platform.
    set_faults(
        &ctl,
        json!([{"path": "/kubernetes/*", "rate_limit_per_s": 5, "retry_after_s": 1}]),
    )
    .await;
    let start = Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let p = p.clone();
            let cluster = target.cluster_id.clone();
            tokio::spawn(async move { p.list_load_balancers(&cluster, &Labels::new()).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        if t.await?.is_ok() {
            ok += 1;
        }
    }
    let elapsed = start.elapsed();
    let total = calls(&ctl, LIST_LBS).await;
    assert_eq!(ok, 20, "every caller gets through");
    assert!(
        elapsed >= Duration::from_secs(2),
        "20 calls at 5/s cannot finish at once: {elapsed:?}"
    );
    // Without a shared limiter each 429 is retried independently; with it, the rejected
    // calls are bounded well below 4 retries per caller.
    assert!(total < 20 * 3, "no retry storm: {total} calls for 20 successes");
    Ok(())
}

#[tokio::test]
async fn server_errors_are_retried_on_safe_calls_only() -> Result<()> {
    let target = stand_in()?;
    let ctl = target.control_api();
    let p = client(&target, |c| c.max_retries = 3)?;
    let vms = p.list_instances(&InstanceFilter::cluster(&target.cluster_id)).await?;
    let vm = vms.first().context("a VM")?.id.clone();

    set_faults(&ctl, json!([{"path": "/vm/*", "error_rate": 1.0, "error_status": 503}, {"method": "POST", "path": "/network/*", "error_rate": 1.0, "error_status": 500}])).await;
    let got = p.get_instance(&vm).await;
    assert!(matches!(got, Err(Error::Server { status: 503, .. })), "{got:?}");
    assert_eq!(calls(&ctl, GET_VM).await, 4, "a GET is tried 1 + max_retries times");
    let made = p
        .create_public_ip("jkt", kuberaya_ccm::platform::IpVersion::V4, &Labels::new())
        .await;
    assert!(matches!(made, Err(Error::Server { status: 500, .. })), "{made:?}");
    assert_eq!(calls(&ctl, POST_IP).await, 1, "a POST is never retried");

    // With 30% errors and enough retries, safe calls get through.
    set_faults(&ctl, json!([{"path": "/vm/*", "error_rate": 0.3}])).await;
    let p = client(&target, |c| c.max_retries = 8)?;
    for _ in 0..20 {
        p.get_instance(&vm).await?;
    }
    Ok(())
}

#[tokio::test]
async fn hanging_calls_time_out() -> Result<()> {
    let target = stand_in()?;
    let ctl = target.control_api();
    let p = client(&target, |c| {
        c.timeout = Duration::from_millis(400);
        c.max_retries = 1;
    })?;
    p.get_cluster(&target.cluster_id).await?;
    set_faults(&ctl, json!([{"path": "/kubernetes/*", "hang": true}])).await;
    let start = Instant::now();
    let got = p.get_cluster(&target.cluster_id).await;
    let elapsed = start.elapsed();
    assert!(matches!(got, Err(Error::Timeout { .. })), "{got:?}");
    assert!(
        elapsed >= Duration::from_millis(800),
        "two attempts of 400 ms: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "the timeout bounds the call: {elapsed:?}"
    );
    // The platform works again once the fault is lifted.
    let a = ctl.delete("/_sandbox/faults").await;
    assert_eq!(a.status, 200, "{}", a.describe());
    p.get_cluster(&target.cluster_id).await?;
    Ok(())
}

#[tokio::test]
async fn latency_is_added_to_each_call() -> Result<()> {
    let target = stand_in()?;
    let ctl = target.control_api();
    let p = client(&target, |_| {})?;
    p.get_cluster(&target.cluster_id).await?;
    set_faults(&ctl, json!([{"path": "/kubernetes/*", "latency_ms": 250}])).await;
    let start = Instant::now();
    p.get_cluster(&target.cluster_id).await?;
    assert!(start.elapsed() >= Duration::from_millis(250));
    Ok(())
}

#[tokio::test]
async fn revoked_token_means_one_login_more() -> Result<()> {
    let target = stand_in()?;
    let ctl = target.control_api();
    let p = client(&target, |_| {})?;
    p.get_cluster(&target.cluster_id).await?;
    assert_eq!(p.metrics().logins(), 1);
    let a = ctl.post("/_sandbox/tokens/revoke", &json!({})).await;
    assert_eq!(a.status, 200, "{}", a.describe());
    p.get_cluster(&target.cluster_id).await?;
    assert_eq!(p.metrics().logins(), 2, "a 401 makes the client log in once more");
    Ok(())
}

#[tokio::test]
async fn short_lived_tokens_are_renewed_before_they_expire() -> Result<()> {
    let target = stand_in()?;
    let ctl = target.control_api();
    let a = ctl.put("/_sandbox/config", &json!({"token_ttl_s": 2})).await;
    assert_eq!(a.status, 200, "{}", a.describe());
    let p = client(&target, |c| c.token_renew_before = Duration::from_secs(1))?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(3500) {
        p.get_cluster(&target.cluster_id).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(p.metrics().logins() >= 2, "the token was renewed");
    assert_eq!(
        calls(&ctl, "GET /kubernetes/v1/clusters/{cluster_id}").await,
        p.metrics()
            .request_count("GET", "/kubernetes/v1/clusters/{cluster_id}", "200"),
        "no call was refused with a 401: renewal happened before expiry"
    );
    Ok(())
}

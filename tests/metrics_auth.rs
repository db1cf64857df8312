//! `/metrics` of the CCM and of the gateway over HTTPS, as deploy/ serves them: the real
//! binaries on their own ServiceAccount tokens (with only deploy/'s RBAC, so
//! `system:auth-delegator` is proven enough to ask TokenReview and SubjectAccessReview),
//! scraped with the real `curl`:
//!
//! - no token, or a token the API server does not know: `401`;
//! - a ServiceAccount token without `get` on `/metrics`: `403`;
//! - a ServiceAccount bound to the ClusterRole `kuberaya-metrics-reader`: `200` and the
//!   Prometheus text;
//! - `/healthz` and `/readyz` answer without a token (the kubelet's probes);
//! - the binding removed, the scraper is refused once the review cache (10 s) expired.
//!
//! Against a sandbox started by the harness with `--external-ccm` (no CCM and no gateway
//! of its own): its API stand-in answers both reviews from RBAC, as kube-apiserver does.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kuberaya_e2e::ccm::{Ccm, write_cloud_config};
use kuberaya_e2e::cloud::CloudSandbox;
use kuberaya_e2e::cluster::Cluster;
use kuberaya_e2e::gateway::{PeerKey, peer_address, write_key};
use kuberaya_e2e::process::line_field;
use kuberaya_e2e::sandbox::{Ranges, free_port};
use kuberaya_e2e::{Process, poll_until_blocking, unique_net_index};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `curl -k` of `https://ADDR/PATH` with `token` as a bearer token: the status code and
/// the body (`None`: no HTTP answer).
fn get(addr: &str, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let mut cmd = Command::new("curl");
    // -k: the certificate is self-signed, as a scraper with insecure_skip_verify sees it.
    cmd.args(["-sk", "--max-time", "5", "-w", "\n%{http_code}"]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd.arg(format!("https://{addr}{path}")).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.parse().ok().filter(|c| *c != 0)?, body.to_string()))
}

/// A TokenRequest token of `namespace/sa`.
fn token(sb: &CloudSandbox, namespace: &str, sa: &str) -> Result<String> {
    Ok(sb
        .kubectl(&["create", "token", sa, "-n", namespace])?
        .trim()
        .to_string())
}

/// A kubeconfig for the sandbox's API server authenticating as `namespace/sa`.
fn service_account_kubeconfig(sb: &CloudSandbox, namespace: &str, sa: &str, path: &Path) -> Result<()> {
    let mut kc: Value =
        serde_json::from_str(&sb.kubectl(&["config", "view", "--raw", "--minify", "--flatten", "-o", "json"])?)?;
    kc["users"][0]["user"] = json!({ "token": token(sb, namespace, sa)? });
    std::fs::write(path, serde_json::to_vec_pretty(&kc)?)?;
    Ok(())
}

/// deploy/'s VpnPeer CRD, ServiceAccounts and RBAC of the CCM and the gateway (not their
/// Deployments: the binaries run here), and the scrapers: `monitoring/scraper` bound to
/// `kuberaya-metrics-reader`, `monitoring/nobody` bound to nothing.
fn install_rbac_and_scrapers(sb: &CloudSandbox) -> Result<()> {
    let d = repo().join("deploy");
    let mut args = vec!["apply".to_string()];
    for f in [
        "crds/vpnpeer.yaml",
        "ccm/serviceaccount.yaml",
        "ccm/rbac.yaml",
        "gateway/base/namespace.yaml",
        "gateway/base/serviceaccount.yaml",
        "gateway/base/rbac.yaml",
    ] {
        args.push("-f".into());
        args.push(d.join(f).display().to_string());
    }
    sb.kubectl(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    sb.kubectl(&["create", "namespace", "monitoring"])?;
    for sa in ["scraper", "nobody"] {
        sb.kubectl(&["create", "serviceaccount", sa, "-n", "monitoring"])?;
    }
    sb.kubectl(&[
        "create",
        "clusterrolebinding",
        "scraper-metrics",
        "--clusterrole=kuberaya-metrics-reader",
        "--serviceaccount=monitoring:scraper",
    ])?;
    Ok(())
}

/// Waits (bounded) until `path` on `addr` answers `code` with `token`; the last answer.
fn wait_answer(addr: &str, path: &str, token: Option<&str>, code: u16, within: Duration) -> Option<(u16, String)> {
    let mut last = None;
    poll_until_blocking(within, || {
        last = get(addr, path, token);
        last.as_ref().filter(|(c, _)| *c == code).cloned()
    })
    .or(last)
}

/// The three scrapes and the open health paths against the HTTPS server at `addr`, whose
/// metrics hold `sample`.
fn assert_scrapes(addr: &str, scraper: &str, nobody: &str, sample: &str, tails: &dyn Fn() -> String) -> Result<()> {
    let healthz = wait_answer(addr, "/healthz", None, 200, Duration::from_secs(20));
    ensure!(
        healthz == Some((200, "ok".into())),
        "/healthz without a token: {healthz:?}\n{}",
        tails()
    );
    let readyz = wait_answer(addr, "/readyz", None, 200, Duration::from_secs(20));
    ensure!(
        readyz.as_ref().map(|r| r.0) == Some(200),
        "/readyz without a token: {readyz:?}\n{}",
        tails()
    );
    let anonymous = get(addr, "/metrics", None);
    ensure!(
        anonymous.as_ref().map(|a| a.0) == Some(401),
        "an anonymous scrape: {anonymous:?}"
    );
    let unknown = get(addr, "/metrics", Some("not-a-token"));
    ensure!(
        unknown.as_ref().map(|a| a.0) == Some(401),
        "a token the API server does not know: {unknown:?}"
    );
    let denied = get(addr, "/metrics", Some(nobody));
    ensure!(
        denied
            .as_ref()
            .is_some_and(|(c, b)| *c == 403 && b.contains("system:serviceaccount:monitoring:nobody")),
        "a token without get on /metrics: {denied:?}\n{}",
        tails()
    );
    let served = get(addr, "/metrics", Some(scraper));
    ensure!(
        served
            .as_ref()
            .is_some_and(|(c, b)| *c == 200 && b.contains(sample) && b.trim_end().ends_with("# EOF")),
        "the scraper's token: {served:?}\n{}",
        tails()
    );
    // The health paths ignore a token, even one that may not read /metrics.
    ensure!(get(addr, "/healthz", Some(nobody)).map(|a| a.0) == Some(200));
    Ok(())
}

#[test]
fn metrics_over_https_need_a_token_allowed_to_get_them() -> Result<()> {
    let n = unique_net_index();
    // Services in 127.92.N.0/24: clear of the other test files' and of the sandbox's own.
    let ranges = Ranges {
        service_cidr: format!("127.92.{n}.0/24"),
        ..Ranges::standard(n)
    };
    let sb = CloudSandbox::up(&ranges, &["--nodes", "1", "--external-ccm"], 1)?;
    let work = tempfile::tempdir()?;
    install_rbac_and_scrapers(&sb)?;

    // The API server's own view first (kubectl auth can-i sends SubjectAccessReviews with
    // nonResourceAttributes).
    for (sa, want) in [("scraper", "yes"), ("nobody", "no")] {
        let out = sb.kubectl_output(
            &[
                "auth",
                "can-i",
                "get",
                "/metrics",
                &format!("--as=system:serviceaccount:monitoring:{sa}"),
            ],
            None,
        )?;
        ensure!(
            String::from_utf8_lossy(&out.stdout).trim() == want,
            "can-i get /metrics as {sa}: {out:?}"
        );
    }
    let scraper = token(&sb, "monitoring", "scraper")?;
    let nobody = token(&sb, "monitoring", "nobody")?;

    // The CCM on its own ServiceAccount token (no leader election: its Role is for the
    // Lease in kube-system, the harness's is in default).
    let ccm_kc = work.path().join("ccm.kubeconfig");
    service_account_kubeconfig(&sb, "kube-system", "kuberaya-ccm", &ccm_kc)?;
    let config = sb.state().join("cloud-config.yaml");
    write_cloud_config(&config, &sb.url, &sb.cluster_id)?;
    let secure = format!("127.0.0.1:{}", free_port());
    let (cmd, metrics) = Ccm::command(
        &ccm_kc,
        &config,
        (&sb.email, &sb.password),
        "info,kube_runtime=warn",
        &["--leader-elect=false", &format!("--secure-bind-address={secure}")],
    );
    let ccm = Ccm::start(cmd, metrics)?;
    let ccm_tails = || ccm.process.output_tails();
    assert_scrapes(&secure, &scraper, &nobody, "kuberaya_ccm_leader 1", &ccm_tails)?;
    // The plain endpoint of the tests is on loopback, as the binary's default is.
    ensure!(ccm.metric("kuberaya_ccm_leader") == Some(1.0), "plain loopback metrics");

    // The gateway likewise (its metrics name peers): Kubernetes sources, on its token.
    let gw_kc = work.path().join("gateway.kubeconfig");
    service_account_kubeconfig(&sb, "kuberaya-system", "kuberaya-gateway", &gw_kc)?;
    let key = PeerKey::random(peer_address(0));
    let key_file = write_key(work.path(), &key.private_key())?;
    let mut gateway = Process::start(
        "kuberaya-gateway",
        [
            "--kubeconfig",
            gw_kc.to_str().context("utf-8")?,
            "--namespace",
            "kuberaya-system",
            "--private-key-file",
            key_file.to_str().context("utf-8")?,
            "--publish-key-to-service=",
            "--listen",
            "127.0.0.1:0",
            "--metrics-bind-address",
            "127.0.0.1:0",
            "--health-bind-address",
            "127.0.0.1:0",
            "--secure-bind-address",
            "127.0.0.1:0",
        ],
    )?;
    let line = gateway.wait_for_stdout_line("kuberaya-gateway listening", Duration::from_secs(30))?;
    let gw_secure = line_field(&line, "secure")?;
    let gw_tails = || gateway.output_tails();
    assert_scrapes(
        &gw_secure,
        &scraper,
        &nobody,
        "kuberaya_gateway_cookie_replies_total 0",
        &gw_tails,
    )?;

    // The binding gone, the scraper is refused once the cached answer (10 s) expired, and
    // not later than that by much.
    let removed = Instant::now();
    sb.kubectl(&["delete", "clusterrolebinding", "scraper-metrics"])?;
    let refused = wait_answer(&secure, "/metrics", Some(&scraper), 403, Duration::from_secs(25));
    ensure!(
        refused.as_ref().map(|r| r.0) == Some(403),
        "the scraper after its binding was removed: {refused:?}"
    );
    ensure!(
        removed.elapsed() < Duration::from_secs(20),
        "refused within the cache's 10 s (took {:?})",
        removed.elapsed()
    );
    drop(gateway);
    drop(ccm);
    Ok(())
}

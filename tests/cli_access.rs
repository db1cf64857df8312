//! `kuberaya access` against the sandbox's real gateway, checked on the tunnel (onetun as
//! the operator's laptop):
//!
//! - `access explain` says denied (exit 1, "no rule") for a Service the peer's own rules
//!   do not name, and allowed "by own rule 0" for the one they do;
//! - `access grant -l role=oncall default/web --for 6s` lets the labelled peer reach `web`
//!   (within 2 s), `explain` then names the policy, `access list` shows it with the peer
//!   matched; the grant expires by itself (cut within 2 s of its end), `explain` says
//!   denied again;
//! - `access grant ... --for 1h` then `access revoke`: cut within 2 s;
//! - `explain` agrees with the tunnel on every (Service, port) pair tried.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kuberaya_e2e::sandbox::{Sandbox, User, WgPeer, curl_local, free_port, output_text};
use kuberaya_e2e::{Process, poll_until_blocking};
use serde_json::Value;

/// One onetun forward to `ip:80`.
struct Forward {
    port: u16,
    _onetun: Process,
}

impl Forward {
    fn open(peer: &WgPeer, ip: &str) -> Forward {
        let port = free_port();
        Forward {
            port,
            _onetun: peer.onetun(port, &format!("{ip}:80:TCP")),
        }
    }

    fn answers(&self, app: &str) -> bool {
        let (ok, body) = curl_local(self.port, 1.0);
        ok && body.starts_with(&format!("pod={app}-"))
    }
}

/// `kuberaya access explain ops TARGET`: (allowed, what it printed).
fn explain(user: &User, target: &str) -> Result<(bool, String)> {
    let out = user.kuberaya(&["access", "explain", "ops", target])?;
    let text = output_text(&out);
    ensure!(matches!(out.status.code(), Some(0 | 1)), "explain exits 0 or 1: {text}");
    Ok((out.status.success(), text))
}

/// Whether the tunnel answers within `within` (`want` true) or stops answering.
fn settles(f: &Forward, app: &str, want: bool, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    poll_until_blocking(within, || (f.answers(app) == want).then(|| t0.elapsed()))
}

#[test]
fn access_grants_expire_and_revoke_on_the_tunnel_and_explain_agrees() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work)?;
    let sandbox = Sandbox::up(&tmp.path().join("sandbox"), &[])?;
    let user = sandbox.user(&work);
    let api_ip = user.http_service("api")?;
    let web_ip = user.http_service("web")?;
    user.kuberaya_ok(&["peer", "add", "ops", "--allow", "default/api", "--out", "ops.conf"])?;
    user.kubectl(&["label", "vpnpeer", "ops", "-n", "kuberaya-system", "role=oncall"])?;
    let peer = WgPeer::from_conf(&std::fs::read_to_string(work.join("ops.conf"))?);

    // Own rule only.
    let (allowed, text) = explain(&user, "default/api:80")?;
    ensure!(allowed && text.contains("own rule 0"), "{text}");
    let (allowed, text) = explain(&user, "default/web:80")?;
    ensure!(!allowed && text.contains("no rule"), "{text}");
    let web = Forward::open(&peer, &web_ip);
    ensure!(
        settles(&web, "web", false, Duration::from_secs(3)).is_some(),
        "web is not reachable before a grant"
    );

    // A grant for 6 s.
    let said = user.kuberaya_ok(&["access", "grant", "-l", "role=oncall", "default/web", "--for", "6s"])?;
    let name = said
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.split('/').nth(1))
        .context("the policy's name")?
        .trim_end_matches(':')
        .to_string();
    let granted = Instant::now();
    let took = settles(&web, "web", true, Duration::from_secs(10));
    ensure!(took.is_some(), "the grant lets ops reach web: {said}");
    eprintln!("figures: grant to first answer {:?}", granted.elapsed());
    let (allowed, text) = explain(&user, "default/web:80")?;
    ensure!(
        allowed && text.contains(&format!("policy kuberaya-system/{name}")),
        "{text}"
    );
    let matched = poll_until_blocking(Duration::from_secs(10), || {
        let list: Value =
            serde_json::from_str(&user.kuberaya_ok(&["access", "list", "-A", "-o", "json"]).ok()?).ok()?;
        let item = list["items"]
            .as_array()?
            .iter()
            .find(|i| i["name"] == name.as_str())?
            .clone();
        (item["matchedPeers"] == 1).then_some(item)
    });
    ensure!(matched.is_some(), "access list shows the grant matching ops");
    // It expires by itself.
    let expired = settles(&web, "web", false, Duration::from_secs(15));
    ensure!(expired.is_some(), "the grant expires by itself");
    let after = granted.elapsed();
    ensure!(
        after < Duration::from_secs(6 + 3),
        "cut within 2 s of the end: {after:?}"
    );
    let (allowed, text) = explain(&user, "default/web:80")?;
    ensure!(!allowed, "{text}");
    // The own rule kept working throughout.
    drop(web);
    let api = Forward::open(&peer, &api_ip);
    ensure!(
        settles(&api, "api", true, Duration::from_secs(10)).is_some(),
        "api by ops's own rule"
    );
    drop(api);

    // Grant for an hour, then revoke.
    let said = user.kuberaya_ok(&[
        "access",
        "grant",
        "-l",
        "role=oncall",
        "default/web",
        "--for",
        "1h",
        "--name",
        "web-hour",
    ])?;
    ensure!(said.contains("kuberaya-system/web-hour"), "{said}");
    let web = Forward::open(&peer, &web_ip);
    ensure!(
        settles(&web, "web", true, Duration::from_secs(10)).is_some(),
        "the hour grant"
    );
    let t0 = Instant::now();
    user.kuberaya_ok(&["access", "revoke", "web-hour"])?;
    let cut = settles(&web, "web", false, Duration::from_secs(10));
    ensure!(
        cut.is_some() && t0.elapsed() < Duration::from_secs(3),
        "revoked within 2 s: {:?}",
        t0.elapsed()
    );
    let missing = user.kuberaya(&["access", "revoke", "web-hour"])?;
    ensure!(
        !missing.status.success() && output_text(&missing).contains("not found"),
        "{}",
        output_text(&missing)
    );

    // explain agrees with the tunnel (web: port 80 denied now; api: 80 allowed, 81 no port).
    for (target, app, ip) in [("default/web:80", "web", &web_ip), ("default/api:80", "api", &api_ip)] {
        let (allowed, text) = explain(&user, target)?;
        let f = Forward::open(&peer, ip);
        let seen = settles(&f, app, true, Duration::from_secs(if allowed { 10 } else { 3 })).is_some();
        ensure!(seen == allowed, "{target}: explain says {text}, the tunnel {seen}");
    }
    let (allowed, text) = explain(&user, "default/api:81")?;
    ensure!(!allowed && text.contains("no such port"), "{text}");
    Ok(())
}

//! `kuberaya access` against the sandbox's real gateway, checked on the tunnel (onetun as
//! the operator's laptop):
//!
//! - `access explain` says denied (exit 1, "no rule") for a Service the peer's own rules
//!   do not name, and allowed "by own rule 0" for the one they do;
//! - `access grant -l role=oncall default/web --for 6s` lets the labelled peer reach `web`
//!   (within 2 s), `explain` then names the policy, `access list` shows it with the peer
//!   matched; the grant expires by itself (cut within 2 s of its end), `explain` says
//!   denied again;
//! - `access grant ... --for 1h` then `access revoke`: cut within 2 s; the same for a
//!   grant to the peer by name;
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
        Forward::open_port(peer, ip, 80)
    }

    fn open_port(peer: &WgPeer, ip: &str, remote: u16) -> Forward {
        let port = free_port();
        Forward {
            port,
            _onetun: peer.onetun(port, &format!("{ip}:{remote}:TCP")),
        }
    }

    fn answers(&self, app: &str) -> bool {
        let (ok, body) = curl_local(self.port, 1.0);
        ok && body.starts_with(&format!("pod={app}-"))
    }
}

/// `kuberaya access explain ops TARGET`: (allowed, what it printed).
fn explain(user: &User, target: &str) -> Result<(bool, String)> {
    explain_as(user, "kuberaya-system", "ops", target)
}

/// `kuberaya access explain -n NS PEER TARGET`: (allowed, what it printed).
fn explain_as(user: &User, ns: &str, peer: &str, target: &str) -> Result<(bool, String)> {
    let out = user.kuberaya(&["access", "explain", "-n", ns, peer, target])?;
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

    // A grant to one peer by name (the gateway's own name label, which no peer can copy).
    let said = user.kuberaya_ok(&[
        "access",
        "grant",
        "ops",
        "default/web:80",
        "--for",
        "1h",
        "--name",
        "ops-web",
    ])?;
    ensure!(said.contains("kuberaya-system/ops-web"), "{said}");
    ensure!(
        settles(&web, "web", true, Duration::from_secs(10)).is_some(),
        "the grant by name"
    );
    let (allowed, text) = explain(&user, "default/web:80")?;
    ensure!(allowed && text.contains("policy kuberaya-system/ops-web"), "{text}");
    user.kuberaya_ok(&["access", "revoke", "ops-web"])?;
    ensure!(settles(&web, "web", false, Duration::from_secs(5)).is_some(), "revoked");

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

/// `explain` against the tunnel on 20 random (peer, Service, port) triples: two peers (an
/// admin peer and a team peer), three Services, an own rule each, a policy by label and a
/// grant by name; the seed is printed.
#[test]
fn explain_agrees_with_the_tunnel_on_random_triples() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work)?;
    let sandbox = Sandbox::up(&tmp.path().join("sandbox"), &[])?;
    let user = sandbox.user(&work);
    let mut ips = std::collections::BTreeMap::new();
    for app in ["api", "web", "db"] {
        ips.insert(app, user.http_service(app)?);
    }
    user.kuberaya_ok(&["peer", "add", "ops", "--allow", "default/api", "--out", "ops.conf"])?;
    user.kuberaya_ok(&[
        "peer",
        "add",
        "-n",
        "default",
        "dev",
        "--allow",
        "default/web",
        "--out",
        "dev.conf",
    ])?;
    user.kubectl(&["label", "vpnpeer", "dev", "-n", "default", "role=dev"])?;
    user.kuberaya_ok(&[
        "access",
        "grant",
        "-n",
        "default",
        "-l",
        "role=dev",
        "default/db:80",
        "--for",
        "1h",
    ])?;
    user.kuberaya_ok(&["access", "grant", "ops", "default/web", "--for", "1h"])?;
    let peers = [
        (
            "kuberaya-system",
            "ops",
            WgPeer::from_conf(&std::fs::read_to_string(work.join("ops.conf"))?),
        ),
        (
            "default",
            "dev",
            WgPeer::from_conf(&std::fs::read_to_string(work.join("dev.conf"))?),
        ),
    ];
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    eprintln!("random triples, seed {seed}");
    let mut x = seed;
    let mut next = |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let apps: Vec<&str> = ips.keys().copied().collect();
    let (mut allowed_seen, mut denied_seen) = (0, 0);
    for i in 0..20 {
        let (ns, name, peer) = &peers[next(peers.len())];
        let app = apps[next(apps.len())];
        let port = [80u16, 81][next(2)];
        let target = format!("default/{app}:{port}");
        let (allowed, text) = explain_as(&user, ns, name, &target)?;
        let f = Forward::open_port(peer, &ips[app], port);
        let seen = settles(&f, app, true, Duration::from_secs(if allowed { 15 } else { 3 })).is_some();
        ensure!(
            seen == allowed,
            "triple {i} ({ns}/{name}, {target}): explain says {text}, the tunnel {}",
            if seen { "answers" } else { "does not" }
        );
        if allowed {
            allowed_seen += 1;
        } else {
            denied_seen += 1;
        }
    }
    eprintln!("figures: 20 triples, {allowed_seen} allowed and {denied_seen} denied, all as explained");
    Ok(())
}

//! End to end: the real `kuberaya-gateway` driven by `VpnPeer` resources on a sandbox
//! cluster (`kuberaya sandbox up --no-ccm`), with the real `kubectl` for every change and
//! the stock userspace WireGuard client `onetun` as each operator's laptop; `curl` and
//! `dig` go through onetun's port forwards to the sandbox's loopback ClusterIPs.
//!
//! What is measured, not assumed (the figures are printed with `--nocapture`):
//! - a peer created with `kubectl apply` carries traffic within 1 s (a full HTTP exchange
//!   through a fresh onetun, so its handshake came first);
//! - a peer deleted, disabled (`kubectl patch`) or expired (`expiresAt`) is cut off within
//!   2 s, while another peer's session (its handshake count) is untouched; a disabled or
//!   expired peer's status says so (reason `Disabled`, `Expired`) and has no `address`,
//!   only `lastAddress`;
//! - a Service deleted is refused by the gateway for new flows at once;
//! - newer peers claiming an accepted peer's key (names sorting before it, in its
//!   namespace and in a team namespace) or its address are rejected, naming it, and its
//!   session is untouched.
//!
//! The whole scenario runs twice: on a lone gateway, and on a replica that does not write
//! status beside one that does (issue 22), which must behave the same.
//!
//! onetun 0.3.10 panics with more than one TCP forward per process and two onetuns with
//! the same key fight over the peer's endpoint, so each onetun has one forward and each
//! peer at most one onetun at a time.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kuberaya_ccm::platform::time::format_rfc3339;
use kuberaya_e2e::cluster::Cluster;
use kuberaya_e2e::gateway::{self, CutOff, Gateway, PeerKey, free_udp_port};
use kuberaya_e2e::probe::{curl, dig};
use kuberaya_e2e::sandbox::{TempSandbox, curl_local, free_port, gateway_keypair as keypair, onetun_path};
use kuberaya_e2e::{Process, binary, poll_until_blocking};
use serde_json::Value;

const GW_NS: &str = "kuberaya-system";

/// A sandbox of two nodes in a temporary state dir, without a gateway of its own: this
/// test runs its own gateway.
fn sandbox_up() -> Result<TempSandbox> {
    // Where `sandbox up` has a gateway, leave it out.
    let help = Command::new(binary("kuberaya"))
        .args(["sandbox", "up", "--help"])
        .output()?;
    let no_gateway = String::from_utf8_lossy(&help.stdout).contains("--no-gateway");
    let mut extra = vec!["--no-ccm", "--nodes", "2"];
    extra.extend(no_gateway.then_some("--no-gateway"));
    TempSandbox::up(&extra)
}

fn peer(sb: &TempSandbox, ns: &str, name: &str) -> Result<Value> {
    sb.get_json(&["get", "vpnpeer", "-n", ns, name])
}

/// An operator's laptop: a key pair and a tunnel address.
struct Laptop {
    name: &'static str,
    key: PeerKey,
}

impl Laptop {
    fn new(name: &'static str, address: &str) -> Laptop {
        Laptop {
            name,
            key: PeerKey::random(address.parse().expect("a tunnel address")),
        }
    }

    fn address(&self) -> String {
        self.key.address.to_string()
    }

    /// Its default IPv6 tunnel address: the gateway's IPv6 range (fd6b:7261:7961::/64) plus
    /// the IPv4 address's offset in 100.64.0.0/16.
    fn address_v6(&self) -> String {
        let offset = u32::from(self.key.address) - u32::from(std::net::Ipv4Addr::new(100, 64, 0, 0));
        let prefix = u128::from("fd6b:7261:7961::".parse::<std::net::Ipv6Addr>().unwrap());
        std::net::Ipv6Addr::from(prefix + u128::from(offset)).to_string()
    }

    /// The VpnPeer of this laptop in the gateway's namespace, allowed `default/web`.
    fn peer_yaml(&self, extra_spec: &str) -> String {
        format!(
            "apiVersion: vpn.cloudraya.com/v1alpha1\nkind: VpnPeer\nmetadata:\n  name: {}\n  namespace: {GW_NS}\nspec:\n  publicKey: \"{}\"\n  address: {}\n  allow:\n  - namespace: default\n    service: web\n{extra_spec}",
            self.name, self.key.public, self.key.address
        )
    }

    /// One onetun forwarding a fresh local port to `remote` (`host:port:PROTO`).
    fn onetun(&self, gw: &Gateway, remote: &str) -> Result<Tunnel> {
        let local = free_port();
        Ok(Tunnel {
            port: local,
            process: gw.wg_peer(&self.key).onetun(local, remote),
        })
    }
}

struct Tunnel {
    port: u16,
    process: Process,
}

impl Tunnel {
    /// One HTTP GET through the tunnel: the body when it answered.
    fn get(&self, timeout: Duration) -> Option<String> {
        let (ok, body) = curl_local(self.port, timeout.as_secs_f64());
        ok.then_some(body)
    }
}

/// A pod's answer: `pod=NAME namespace=default node=...`.
fn from_pod(body: &str) -> bool {
    body.starts_with("pod=web-") && body.contains("namespace=default")
}

/// The handshakes of the gateway's peer `name` in its own namespace.
fn handshakes(gw: &Gateway, name: &str) -> u64 {
    gw.handshakes(&format!("{GW_NS}/{name}"))
}

/// The flows of the gateway's peer `name` that it refused.
fn denied_flows(gw: &Gateway, name: &str) -> u64 {
    gw.metrics().get_all(
        "kuberaya_gateway_flows_total",
        &[&format!("peer=\"{GW_NS}/{name}\""), "verdict=\"denied\""],
    ) as u64
}

const WORKLOADS: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: default
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: any
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: secret
  namespace: default
spec:
  replicas: 1
  selector:
    matchLabels:
      app: secret
  template:
    metadata:
      labels:
        app: secret
    spec:
      containers:
      - name: secret
        image: any
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: secret
  namespace: default
spec:
  selector:
    app: secret
  ports:
  - name: http
    port: 80
    targetPort: 8080
"#;

/// Creates `laptop`'s peer with `kubectl apply`, waits until the gateway serves it (its
/// accepted-peers gauge), then starts a fresh onetun and measures how soon an HTTP exchange
/// with `web` goes through: (tunnel, pick-up time, time to the first answer), both from
/// `kubectl apply` returning (the resource exists by then).
///
/// onetun starts only once the gateway has the peer: a stock client whose first
/// initiation arrives before that retries only after WireGuard's 5 s REKEY_TIMEOUT.
fn create_and_connect(
    sb: &TempSandbox,
    gw: &Gateway,
    laptop: &Laptop,
    web: &str,
    extra: &str,
) -> Result<(Tunnel, Duration, Duration)> {
    let before = gw.accepted();
    sb.apply(&laptop.peer_yaml(extra))?;
    let created = Instant::now();
    let picked = poll_until_blocking(Duration::from_secs(10), || {
        (gw.accepted() > before).then(|| created.elapsed())
    })
    .with_context(|| {
        format!(
            "{}: the gateway never served the new peer: {}",
            laptop.name,
            gw.metrics()
        )
    })?;
    let t = laptop.onetun(gw, &format!("{web}:80:TCP"))?;
    let answered = poll_until_blocking(Duration::from_secs(15), || {
        t.get(Duration::from_millis(500))
            .filter(|b| from_pod(b))
            .map(|_| created.elapsed())
    });
    let Some(at) = answered else {
        bail!(
            "{}: no answer through onetun within 15 s\n{}",
            laptop.name,
            t.process.output_tails()
        );
    };
    eprintln!(
        "measured: {} served by the gateway {} ms after kubectl apply returned; first HTTP answer through a fresh onetun at {} ms",
        laptop.name,
        picked.as_millis(),
        at.as_millis()
    );
    Ok((t, picked, at))
}

/// After a change made at `changed`, polls the tunnel until it has failed for 2 s in a
/// row: the time from `changed` to the start of the first request of that failing run.
fn cut_off_after(t: &Tunnel, changed: Instant) -> Result<Duration> {
    let mut cut = CutOff::default();
    let deadline = changed + Duration::from_secs(15);
    while Instant::now() < deadline {
        let start = Instant::now();
        let ok = t.get(Duration::from_millis(400)).is_some_and(|b| from_pod(&b));
        if let Some(first_fail) = cut.record(start, ok) {
            return Ok(first_fail.saturating_duration_since(changed));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("traffic did not stop within 15 s of the change")
}

/// A peer whose session must survive other peers' changes.
struct Bystander {
    tunnel: Tunnel,
    handshakes: u64,
    /// When `handshakes` last changed: WireGuard rekeys a session after 120 s.
    session_start: Instant,
}

impl Bystander {
    /// Takes the current handshake count as the baseline.
    fn baseline(&mut self, gw: &Gateway) {
        let now = handshakes(gw, "bob");
        if now != self.handshakes {
            self.handshakes = now;
            self.session_start = Instant::now();
        }
    }

    /// The session carries traffic right after `what` and was not redone (no new
    /// handshake, unless the scheduled rekey of a session near 120 s old).
    fn untouched(&mut self, gw: &Gateway, what: &str) -> Result<()> {
        let body = self.tunnel.get(Duration::from_secs(2)).unwrap_or_default();
        ensure!(from_pod(&body), "bob's traffic after {what}: {body:?}");
        // Handshakes reach the metrics within a second.
        std::thread::sleep(Duration::from_millis(1100));
        let now = handshakes(gw, "bob");
        let rekey_due = self.session_start.elapsed() > Duration::from_secs(110);
        ensure!(
            now == self.handshakes || rekey_due,
            "bob's handshakes went from {} to {now} across {what}: his session was redone",
            self.handshakes
        );
        eprintln!("checked: bob's session untouched across {what} (handshakes {now})");
        self.baseline(gw);
        Ok(())
    }
}

/// The `kubectl get vpnpeers -A` table: `namespace/name` → [accepted, reason, address]
/// (empty when blank), cut at the header's column offsets.
fn peer_table(sb: &TempSandbox) -> Result<BTreeMap<String, Vec<String>>> {
    let table = sb.kubectl(&["get", "vpnpeers", "-A"])?;
    let mut lines = table.lines();
    let header = lines.next().context("header")?;
    let names = ["NAMESPACE", "NAME", "ACCEPTED", "REASON", "ADDRESS", "HANDSHAKE", "AGE"];
    ensure!(
        header.split_whitespace().eq(names),
        "columns of kubectl get vpnpeers: {table}"
    );
    let mut starts = Vec::new();
    let mut from = 0;
    for n in names {
        let at = from + header[from..].find(n).context("column")?;
        starts.push(at);
        from = at + n.len();
    }
    let mut out = BTreeMap::new();
    for l in lines {
        let cell = |i: usize| {
            let end = starts.get(i + 1).copied().unwrap_or(l.len()).min(l.len());
            l.get(starts[i].min(end)..end).unwrap_or_default().trim().to_string()
        };
        out.insert(format!("{}/{}", cell(0), cell(1)), (2..5).map(cell).collect());
    }
    Ok(out)
}

/// A peer's Accepted reason, `status.address` and `status.lastAddress`, as kubectl's
/// JSONPath prints them (empty when absent).
fn peer_status(sb: &TempSandbox, name: &str) -> Result<Vec<String>> {
    let out = sb.kubectl(&[
        "get",
        "vpnpeer",
        "-n",
        GW_NS,
        name,
        "-o",
        r#"jsonpath={.status.conditions[?(@.type=="Accepted")].reason}|{.status.address}|{.status.lastAddress}"#,
    ])?;
    Ok(out.trim().split('|').map(str::to_string).collect())
}

/// A peer's `status.addressV6` and `status.lastAddressV6` (empty when absent).
fn peer_status_v6(sb: &TempSandbox, name: &str) -> Result<Vec<String>> {
    let out = sb.kubectl(&[
        "get",
        "vpnpeer",
        "-n",
        GW_NS,
        name,
        "-o",
        "jsonpath={.status.addressV6}|{.status.lastAddressV6}",
    ])?;
    Ok(out.trim().split('|').map(str::to_string).collect())
}

fn wait_condition(sb: &TempSandbox, ns: &str, name: &str, accepted: bool) -> Result<()> {
    let cond = if accepted {
        "condition=Accepted".to_string()
    } else {
        "condition=Accepted=false".to_string()
    };
    sb.kubectl(&[
        "wait",
        "-n",
        ns,
        &format!("vpnpeer/{name}"),
        &format!("--for={cond}"),
        "--timeout=20s",
    ])
    .map(|_| ())
}

#[test]
fn vpn_peers_drive_the_gateway_live() -> Result<()> {
    drive(false)
}

/// Issue 22: the same scenario on a replica that does not write status, beside one that
/// does (started first, so it holds the Lease): what the follower serves, refuses and cuts
/// follows the leader's status, with the same timings.
#[test]
fn vpn_peers_drive_a_following_replica_live() -> Result<()> {
    drive(true)
}

fn replica(sb: &TempSandbox) -> Result<Gateway> {
    let mut cmd = gateway::kube_command(sb.kubeconfig(), GW_NS);
    cmd.args(["--private-key-secret", "kuberaya-gateway-key", "--listen"])
        .arg(format!("127.0.0.1:{}", free_udp_port()));
    Gateway::spawn(cmd, Duration::from_secs(60))
}

fn drive(follower: bool) -> Result<()> {
    onetun_path();
    let sb = sandbox_up()?;
    sb.kubectl(&[
        "apply",
        "-f",
        concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/crds/vpnpeer.yaml"),
    ])?;
    for ns in [GW_NS, "team"] {
        sb.apply(&format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"))?;
    }
    sb.apply(WORKLOADS)?;
    let web = sb.cluster_ip("web")?;
    let secret = sb.cluster_ip("secret")?;
    let ready = poll_until_blocking(Duration::from_secs(30), || {
        curl_direct(&web).filter(|b| from_pod(b)).map(|_| ())
    });
    ensure!(ready.is_some(), "web does not answer on its ClusterIP {web}");

    let leads = |g: &Gateway| g.metrics().get("kuberaya_gateway_leader", "") == 1.0;
    let leader = if follower {
        let l = replica(&sb)?;
        poll_until_blocking(Duration::from_secs(20), || leads(&l).then_some(()))
            .context("the first replica never led")?;
        Some(l)
    } else {
        None
    };
    let mut gw = replica(&sb)?;
    if follower {
        std::thread::sleep(Duration::from_secs(1));
        ensure!(!leads(&gw), "the second replica leads beside the first");
    }
    // The key was generated into the Secret.
    sb.kubectl(&["get", "secret", "-n", GW_NS, "kuberaya-gateway-key"])?;
    let result = run_scenario(&sb, &gw, &web, &secret, follower);
    let alive = gw.process.is_running();
    result.map_err(|e| e.context(format!("gateway output:\n{}", gw.process.output_tails())))?;
    ensure!(alive, "the gateway exited\n{}", gw.process.output_tails());
    if let Some(mut l) = leader {
        l.assert_healthy();
        ensure!(!leads(&gw), "the follower took the Lease from a live leader");
    }
    Ok(())
}

fn curl_direct(ip: &str) -> Option<String> {
    curl(&format!("http://{ip}:80/"))
}

fn run_scenario(sb: &TempSandbox, gw: &Gateway, web: &str, secret: &str, follower: bool) -> Result<()> {
    // bob: the bystander, connected first and checked across every other change.
    let bob = Laptop::new("bob", "100.64.0.20");
    let (bob_tunnel, _, _) = create_and_connect(sb, gw, &bob, web, "")?;
    wait_condition(sb, GW_NS, "bob", true)?;

    // alice: created, accepted, allowed web, refused secret, DNS.
    let alice = Laptop::new("alice", "100.64.0.10");
    let handshakes = poll_until_blocking(Duration::from_secs(5), || {
        Some(handshakes(gw, "bob")).filter(|n| *n >= 1)
    })
    .with_context(|| format!("bob's handshake is counted: {}", gw.metrics()))?;
    let mut bob_t = Bystander {
        tunnel: bob_tunnel,
        handshakes,
        session_start: Instant::now(),
    };
    let (alice_t, _, alice_after) = create_and_connect(sb, gw, &alice, web, "")?;
    ensure!(
        alice_after < Duration::from_secs(1),
        "a new peer carried traffic {} ms after its creation (goal: 1 s)",
        alice_after.as_millis()
    );
    let accepted_from = Instant::now();
    wait_condition(sb, GW_NS, "alice", true)?;
    let accepted_after = accepted_from.elapsed();
    eprintln!(
        "measured: alice Accepted in her status {} ms after her first answer",
        accepted_after.as_millis()
    );
    ensure!(
        accepted_after < Duration::from_secs(3),
        "acceptance written {} ms late",
        accepted_after.as_millis()
    );
    bob_t.untouched(gw, "alice's creation")?;

    // Status: rx/tx bytes and the last handshake, written at the status interval. They are
    // the writing replica's view (docs/vpnpeer.md): a follower's tunnel shows in its metrics.
    let status_from = Instant::now();
    let status = poll_until_blocking(Duration::from_secs(15), || {
        let p = peer(sb, GW_NS, "alice").ok()?;
        let s = &p["status"];
        let counted = s["rxBytes"].as_u64()? > 0 && s["txBytes"].as_u64()? > 0 && s["lastHandshake"].is_string();
        (follower || counted).then(|| s.clone())
    })
    .with_context(|| format!("alice's status: {:?}", peer(sb, GW_NS, "alice")))?;
    eprintln!(
        "measured: alice's status carried bytes and lastHandshake {} ms after Accepted: {status}",
        status_from.elapsed().as_millis()
    );
    ensure!(status["address"] == "100.64.0.10", "alice's address: {status}");
    let rows = peer_table(sb)?;
    let row = rows.get(&format!("{GW_NS}/alice")).context("alice's row")?;
    ensure!(
        row[0] == "True" && row[1] == "Accepted" && row[2] == "100.64.0.10",
        "alice's row: {rows:?}"
    );

    // Status writes are not per packet: under steady traffic, at most a few in 8 s.
    let mut versions = std::collections::BTreeSet::new();
    let mut bytes = Vec::new();
    let sampling = Instant::now();
    while sampling.elapsed() < Duration::from_secs(8) {
        let _ = alice_t.get(Duration::from_secs(1));
        let p = peer(sb, GW_NS, "alice")?;
        versions.insert(
            p["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        bytes.push(p["status"]["rxBytes"].as_u64().unwrap_or_default());
    }
    eprintln!(
        "measured: {} distinct resourceVersions of alice over 8 s of traffic (rx samples {:?})",
        versions.len(),
        bytes
    );
    ensure!(versions.len() <= 4, "status written too often: {versions:?}");
    // The counters are the writing replica's; a follower's traffic is not in them.
    ensure!(
        follower || bytes.last() > bytes.first(),
        "rxBytes did not grow under traffic: {bytes:?}"
    );
    drop(alice_t);

    // Denied: secret is not in alice's rules; the gateway refuses and counts the flow.
    let denied_before = denied_flows(gw, "alice");
    let t = alice.onetun(gw, &format!("{secret}:80:TCP"))?;
    for _ in 0..3 {
        let got = t.get(Duration::from_secs(2));
        ensure!(
            !got.as_deref().is_some_and(|b| b.starts_with("pod=")),
            "a denied Service answered: {got:?}"
        );
    }
    let counted = poll_until_blocking(Duration::from_secs(10), || {
        (denied_flows(gw, "alice") > denied_before).then_some(())
    });
    ensure!(counted.is_some(), "no denied flow counted for alice: {}", gw.metrics());
    drop(t);

    // DNS through onetun's UDP forward to the gateway's tunnel address.
    let t = alice.onetun(gw, "100.64.0.1:53:UDP")?;
    let answer = poll_until_blocking(Duration::from_secs(20), || {
        let out = dig(t.port, "web.default.svc.cluster.local");
        out.contains("status: NOERROR").then_some(out)
    })
    .with_context(|| format!("no DNS answer through onetun\n{}", t.process.output_tails()))?;
    ensure!(
        answer.contains(&format!("\t{web}")) || answer.contains(&format!(" {web}")),
        "A record of web ({web}): {answer}"
    );
    let denied = dig(t.port, "secret.default.svc.cluster.local");
    ensure!(denied.contains("status: NXDOMAIN"), "denied Service: {denied}");
    drop(t);

    // Deleted: cut off within 2 s; bob keeps his session.
    let t = alice.onetun(gw, &format!("{web}:80:TCP"))?;
    let up = poll_until_blocking(Duration::from_secs(10), || {
        t.get(Duration::from_secs(1)).filter(|b| from_pod(b))
    });
    ensure!(up.is_some(), "alice's new onetun works before the delete");
    bob_t.baseline(gw);
    let changed = Instant::now();
    sb.kubectl(&["delete", "vpnpeer", "-n", GW_NS, "alice", "--wait=false"])?;
    let cut = cut_off_after(&t, changed)?;
    eprintln!(
        "measured: alice deleted → traffic stopped {} ms after kubectl delete started",
        cut.as_millis()
    );
    ensure!(
        cut < Duration::from_secs(2),
        "deleted peer still served after {} ms",
        cut.as_millis()
    );
    bob_t.untouched(gw, "alice's deletion")?;
    drop(t);

    // Disabled with kubectl patch.
    let carol = Laptop::new("carol", "100.64.0.11");
    let (t, _, carol_after) = create_and_connect(sb, gw, &carol, web, "")?;
    ensure!(
        carol_after < Duration::from_secs(1),
        "carol: {} ms",
        carol_after.as_millis()
    );
    // Her status says where she was served (written within a second), so that it can
    // keep that as lastAddress.
    wait_condition(sb, GW_NS, "carol", true)?;
    // Served at her default IPv6 tunnel address too (dual-stack tunnel addressing).
    let v6 = peer_status_v6(sb, "carol")?;
    ensure!(
        v6 == [carol.address_v6(), carol.address_v6()],
        "carol's status (addressV6, lastAddressV6): {v6:?}"
    );
    bob_t.baseline(gw);
    let changed = Instant::now();
    sb.kubectl(&[
        "patch",
        "vpnpeer",
        "-n",
        GW_NS,
        "carol",
        "--type=merge",
        "-p",
        r#"{"spec":{"disabled":true}}"#,
    ])?;
    let cut = cut_off_after(&t, changed)?;
    eprintln!(
        "measured: carol disabled → traffic stopped {} ms after kubectl patch started",
        cut.as_millis()
    );
    ensure!(
        cut < Duration::from_secs(2),
        "disabled peer still served after {} ms",
        cut.as_millis()
    );
    wait_condition(sb, GW_NS, "carol", false)?;
    let status = peer_status(sb, "carol")?;
    ensure!(
        status == ["Disabled", "", &carol.address()],
        "carol's status (reason, address, lastAddress): {status:?}"
    );
    // Its IPv6 tunnel address likewise: none in use, the last one kept to give back.
    let status = peer_status_v6(sb, "carol")?;
    ensure!(
        status == ["", &carol.address_v6()],
        "carol's status (addressV6, lastAddressV6): {status:?}"
    );
    let row = peer_table(sb)?;
    ensure!(
        row.get(&format!("{GW_NS}/carol"))
            .is_some_and(|r| r[0] == "False" && r[1] == "Disabled"),
        "carol's row: {row:?}"
    );
    bob_t.untouched(gw, "carol's disabling")?;
    drop(t);

    // Expired: expiresAt a few seconds ahead.
    let dave = Laptop::new("dave", "100.64.0.12");
    let expires = std::time::SystemTime::now() + Duration::from_secs(6);
    let secs = expires.duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let expires_at = format_rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(secs));
    let until = Instant::now()
        + (std::time::UNIX_EPOCH + Duration::from_secs(secs))
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
    let (t, _, _) = create_and_connect(sb, gw, &dave, web, &format!("  expiresAt: \"{expires_at}\"\n"))?;
    bob_t.baseline(gw);
    let cut = cut_off_after(&t, until)?;
    eprintln!(
        "measured: dave expired at {expires_at} → traffic stopped {} ms after expiresAt",
        cut.as_millis()
    );
    ensure!(
        cut < Duration::from_secs(2),
        "expired peer still served {} ms after expiry",
        cut.as_millis()
    );
    // Nothing changed the VpnPeer: the gateway's timer at expiresAt rewrote its status,
    // without the address it no longer has.
    let want = ["Expired", "", &dave.address()];
    let said = poll_until_blocking(Duration::from_secs(10), || {
        (peer_status(sb, "dave").ok()? == want).then(|| until.elapsed())
    });
    let said = said.with_context(|| {
        format!(
            "dave's status after expiresAt (reason, address, lastAddress): {:?}",
            peer_status(sb, "dave")
        )
    })?;
    eprintln!(
        "measured: dave's status said Expired, without an address, by {} ms after expiresAt (first look, after the 2 s cut-off check)",
        said.as_millis()
    );
    bob_t.untouched(gw, "dave's expiry")?;
    drop(t);

    // Rejected peers, with their reason in kubectl's columns; bob keeps his key.
    bob_t.baseline(gw);
    let (_, other) = keypair();
    let rejected = [
        (
            GW_NS,
            "bad-key",
            "publicKey: \"not-a-key\"\n  allow: []".to_string(),
            "InvalidPublicKey",
        ),
        (
            GW_NS,
            "zz-dup",
            format!("publicKey: \"{}\"", bob.key.public),
            "DuplicatePublicKey",
        ),
        (
            GW_NS,
            "outside",
            format!("publicKey: \"{other}\"\n  address: 10.9.9.9"),
            "AddressOutsideRange",
        ),
        (
            "team",
            "nosy",
            format!("publicKey: \"{}\"\n  allow:\n  - namespace: default", keypair().1),
            "NamespaceNotAllowed",
        ),
    ];
    for (ns, name, spec, _) in &rejected {
        sb.apply(&format!(
            "apiVersion: vpn.cloudraya.com/v1alpha1\nkind: VpnPeer\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  {spec}\n"
        ))?;
    }
    for (ns, name, _, _) in &rejected {
        wait_condition(sb, ns, name, false)?;
    }
    let rows = peer_table(sb)?;
    eprintln!("kubectl get vpnpeers -A:\n{}", sb.kubectl(&["get", "vpnpeers", "-A"])?);
    for (ns, name, _, reason) in &rejected {
        let row = rows
            .get(&format!("{ns}/{name}"))
            .with_context(|| format!("{ns}/{name} in {rows:?}"))?;
        ensure!(
            row[0] == "False" && row[1] == *reason,
            "{ns}/{name}: {row:?}, want {reason}"
        );
    }
    let bob_row = rows.get(&format!("{GW_NS}/bob")).context("bob's row")?;
    ensure!(bob_row[0] == "True", "bob after a duplicate of his key: {bob_row:?}");
    bob_t.untouched(gw, "the rejected peers")?;

    // Newer peers never take what bob holds, whatever their names sort as: his key from a
    // name that sorts first, in his namespace and from a team namespace that sorts before
    // it, and his address named explicitly.
    sb.apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n")?;
    let takeovers = [
        (
            GW_NS,
            "aa-copy",
            format!("publicKey: \"{}\"", bob.key.public),
            "DuplicatePublicKey",
            "public key".to_string(),
        ),
        (
            "apps",
            "aa",
            format!("publicKey: \"{}\"", bob.key.public),
            "DuplicatePublicKey",
            "public key".to_string(),
        ),
        (
            GW_NS,
            "aa-addr",
            format!("publicKey: \"{}\"\n  address: {}", keypair().1, bob.address()),
            "AddressTaken",
            format!("address {}", bob.address()),
        ),
    ];
    for (ns, name, spec, _, _) in &takeovers {
        sb.apply(&format!(
            "apiVersion: vpn.cloudraya.com/v1alpha1\nkind: VpnPeer\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  {spec}\n"
        ))?;
    }
    for (ns, name, _, reason, what) in &takeovers {
        wait_condition(sb, ns, name, false)?;
        let said = sb.kubectl(&[
            "get",
            "vpnpeer",
            "-n",
            ns,
            name,
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Accepted")].reason}|{.status.conditions[?(@.type=="Accepted")].message}"#,
        ])?;
        let want = format!("{reason}|{what} is already used by {GW_NS}/bob, which already holds it");
        ensure!(said.trim() == want, "{ns}/{name}: {said:?}, want {want:?}");
    }
    ensure!(
        peer_status(sb, "bob")? == ["Accepted", &bob.address(), &bob.address()],
        "bob's status after the takeover attempts: {:?}",
        peer_status(sb, "bob")
    );
    bob_t.untouched(gw, "newer peers claiming his key and address")?;

    // A Service deleted: the gateway refuses new flows to it at once.
    let denied_before = denied_flows(gw, "bob");
    let changed = Instant::now();
    sb.kubectl(&["delete", "service", "web", "-n", "default", "--wait=false"])?;
    let refused = poll_until_blocking(Duration::from_secs(10), || {
        let ok = bob_t
            .tunnel
            .get(Duration::from_millis(500))
            .is_some_and(|b| from_pod(&b));
        (!ok && denied_flows(gw, "bob") > denied_before).then(|| changed.elapsed())
    })
    .with_context(|| format!("new flows to the deleted Service were not refused: {}", gw.metrics()))?;
    eprintln!(
        "measured: Service web deleted → bob's new flow refused by the gateway {} ms after kubectl delete started",
        refused.as_millis()
    );
    ensure!(
        refused < Duration::from_secs(2),
        "refused only after {} ms",
        refused.as_millis()
    );
    drop(bob_t);
    Ok(())
}

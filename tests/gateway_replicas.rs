//! End to end (issue 22): two gateway replicas in Kubernetes mode on one sandbox cluster
//! (`kuberaya sandbox up --no-ccm --no-gateway`), driven by `kubectl`, with onetun as the
//! laptop. One writer, the others follow:
//!
//! - exactly one replica leads (holds the Lease `kuberaya-system/kuberaya-gateway`, its
//!   `leader` gauge 1); a `VpnPeer` without an address gets one in its status, and both
//!   replicas serve it at that address;
//! - the leader frozen (SIGSTOP): a peer created meanwhile gets no status and is not
//!   served by the follower while the Lease holds; once it has expired the follower leads,
//!   writes the status and serves the peer; the old leader, thawed, has lost the Lease
//!   and follows (it serves the new peer at the same address);
//! - a peer deleted is dropped by both replicas within 2 s.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kuberaya_e2e::cluster::Cluster;
use kuberaya_e2e::gateway::{self, Gateway, PeerKey, free_udp_port};
use kuberaya_e2e::poll_until_blocking;
use kuberaya_e2e::probe::curl;
use kuberaya_e2e::sandbox::{TempSandbox, curl_local, free_port, onetun_path};

const GW_NS: &str = "kuberaya-system";

fn sandbox_up() -> Result<TempSandbox> {
    TempSandbox::up(&["--no-ccm", "--no-gateway", "--nodes", "2"])
}

fn replica(sb: &TempSandbox) -> Result<Gateway> {
    let mut cmd = gateway::kube_command(sb.kubeconfig(), GW_NS);
    cmd.args(["--private-key-secret", "kuberaya-gateway-key", "--listen"])
        .arg(format!("127.0.0.1:{}", free_udp_port()));
    Gateway::spawn(cmd, Duration::from_secs(60))
}

fn leads(gw: &Gateway) -> bool {
    gw.metrics().get("kuberaya_gateway_leader", "") == 1.0
}

fn peer_yaml(name: &str, key: &PeerKey) -> String {
    format!(
        "apiVersion: vpn.cloudraya.com/v1alpha1\nkind: VpnPeer\nmetadata:\n  name: {name}\n  namespace: {GW_NS}\nspec:\n  publicKey: \"{}\"\n  allow:\n  - namespace: default\n    service: web\n",
        key.public
    )
}

/// The address the peer's status grants (Accepted=True), if any.
fn status_address(sb: &TempSandbox, name: &str) -> Result<Option<String>> {
    let p = sb.get_json(&["get", "vpnpeer", "-n", GW_NS, name])?;
    let accepted = p["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Accepted" && c["status"] == "True");
    Ok(accepted
        .then(|| p["status"]["address"].as_str().map(str::to_string))
        .flatten())
}

/// Whether `web` answers through a fresh onetun as `key` at tunnel address `address`, via
/// replica `gw`, within `within`.
fn reaches(gw: &Gateway, key: &PeerKey, address: &str, web: &str, within: Duration) -> bool {
    let local = free_port();
    let mut t = gw
        .wg_peer_of(&key.private_key(), address)
        .onetun(local, &format!("{web}:80:TCP"));
    let ok = poll_until_blocking(within, || {
        let (ok, body) = curl_local(local, 0.5);
        (ok && body.starts_with("pod=web-")).then_some(())
    })
    .is_some();
    t.stop();
    ok
}

#[test]
fn two_replicas_one_writer_the_follower_serves_what_the_leader_granted() -> Result<()> {
    onetun_path();
    let sb = sandbox_up()?;
    for crd in ["vpnpeer.yaml", "vpnaccesspolicy.yaml"] {
        sb.kubectl(&[
            "apply",
            "-f",
            &format!("{}/deploy/crds/{crd}", env!("CARGO_MANIFEST_DIR")),
        ])?;
    }
    sb.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {GW_NS}\n"
    ))?;
    let work = tempfile::tempdir()?;
    let web = sb.user(work.path()).http_service("web")?;
    poll_until_blocking(Duration::from_secs(30), || {
        curl(&format!("http://{web}:80/")).filter(|b| b.starts_with("pod=web-"))
    })
    .context("web does not answer on its ClusterIP")?;

    // The first replica makes the key Secret; the second reads it.
    let mut a = replica(&sb)?;
    let mut b = replica(&sb)?;
    ensure!(a.public_key == b.public_key, "the replicas have different keys");
    let one_leads = poll_until_blocking(Duration::from_secs(20), || {
        let (la, lb) = (leads(&a), leads(&b));
        (la != lb).then_some(la)
    })
    .context("not exactly one replica leads")?;
    let (leader, follower) = if one_leads { (&mut a, &mut b) } else { (&mut b, &mut a) };
    let holder = sb.kubectl(&[
        "get",
        "lease",
        "-n",
        GW_NS,
        "kuberaya-gateway",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])?;
    ensure!(!holder.trim().is_empty(), "the Lease has no holder");
    eprintln!("leader holds the Lease as {holder:?}");

    // alice: no address in her spec; the leader grants one, both serve her there.
    let alice = PeerKey::random("100.64.0.99".parse()?);
    sb.apply(&peer_yaml("alice", &alice))?;
    let address = poll_until_blocking(Duration::from_secs(10), || status_address(&sb, "alice").ok().flatten())
        .context("alice's status has no address")?;
    for (which, gw) in [("leader", &*leader), ("follower", &*follower)] {
        ensure!(
            reaches(gw, &alice, &address, &web, Duration::from_secs(15)),
            "alice does not reach web through the {which} at {address}"
        );
    }

    // The leader frozen: nobody writes, the follower serves no new peer.
    leader.process.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let bob = PeerKey::random("100.64.0.98".parse()?);
    sb.apply(&peer_yaml("bob", &bob))?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        status_address(&sb, "bob")?.is_none(),
        "bob got a status while the leader was frozen"
    );
    ensure!(!leads(follower), "the follower leads while the Lease holds");
    // The follower takes the Lease once it expires (15 s), then writes bob's status.
    let bob_address = poll_until_blocking(Duration::from_secs(40), || status_address(&sb, "bob").ok().flatten())
        .context("bob never got a status after the leader froze")?;
    eprintln!(
        "measured: the follower wrote bob's status {:?} after the leader froze",
        frozen.elapsed()
    );
    ensure!(leads(follower), "the follower wrote without leading");
    ensure!(
        reaches(follower, &bob, &bob_address, &web, Duration::from_secs(15)),
        "bob does not reach web through the new leader"
    );
    // The old leader thawed: it lost the Lease, follows, and serves bob at his address.
    leader.process.signal(libc::SIGCONT);
    poll_until_blocking(Duration::from_secs(20), || (!leads(leader)).then_some(()))
        .context("the old leader still says it leads")?;
    ensure!(
        reaches(leader, &bob, &bob_address, &web, Duration::from_secs(15)),
        "bob does not reach web through the old leader, now following"
    );

    // alice deleted: both replicas drop her within 2 s.
    let before = [leader.accepted(), follower.accepted()];
    sb.kubectl(&["delete", "vpnpeer", "-n", GW_NS, "alice"])?;
    let deleted = Instant::now();
    for (i, gw) in [&*leader, &*follower].into_iter().enumerate() {
        poll_until_blocking(Duration::from_secs(2).saturating_sub(deleted.elapsed()), || {
            (gw.accepted() < before[i]).then_some(())
        })
        .with_context(|| format!("replica {i} still serves alice 2 s after her deletion"))?;
    }
    for gw in [leader, follower] {
        gw.assert_healthy();
    }
    Ok(())
}

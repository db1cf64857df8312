//! End to end (issue 22): two gateway replicas with one key and one peer set behind one
//! platform load balancer, the way the gateway's Service gets one: a UDP rule with the
//! `source` algorithm (a client stays on one replica) and an HTTP health check on the
//! gateways' health port. A stock WireGuard client (`onetun`) makes 20 requests a second
//! through it while the replica it talks to is SIGKILLed, then the other one.
//!
//! What must hold: the client is served again within 5 s of each kill (the health check
//! moves its flow, and the surviving replica starts a handshake at the first packet it
//! cannot read: session recovery, `vpn-gateway/src/tunnel.rs`); a bystander peer on the
//! surviving replica sees nothing (no failed request, no new handshake); and the failover
//! is the replicas' doing, not the client's: with session recovery off, the same client
//! is not back within those 5 s.
//!
//! A replica stopped with SIGTERM (as Kubernetes stops a pod) drains: it turns not ready
//! at once and keeps serving while the LB moves its clients to the other replica, so none
//! of their requests fails.
//!
//! The "VMs" are the platform stand-in's, their private IPs on loopback; the replicas
//! listen there as pods behind a NodePort would (the topology: `tests/harness/failover.rs`,
//! shared with `benches/gateway_failover.rs`).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kuberaya_e2e::failover::{Loop, Topology, handshakes, kill_and_measure, landed, onetun, wait_answers};
use kuberaya_e2e::gateway::Gateway;
use kuberaya_e2e::poll_until_blocking;

/// The goal: served again within this long after a kill.
const GOAL: Duration = Duration::from_secs(5);

/// Both replicas (from `start`) loaded and in the LB's rotation, and onetun as the
/// `client` peer connected through the LB: the replicas, the gateway's key, the tunnel, its
/// local address, and the replica the client landed on.
async fn replicas_and_client(
    t: &Topology,
    start: impl Fn(usize) -> Result<Gateway>,
) -> Result<(
    [Option<Gateway>; 2],
    String,
    kuberaya_e2e::Process,
    std::net::SocketAddr,
    usize,
)> {
    let replicas: [Option<Gateway>; 2] = [Some(start(0)?), Some(start(1)?)];
    let gateway_key = replicas[0].as_ref().context("replica 0")?.public_key.clone();
    for g in replicas.iter().flatten() {
        g.wait_accepted(t.peers.len() as u64, Duration::from_secs(10))
            .context("a replica did not load the peers")?;
    }
    // Both replicas up and in the LB's rotation (health checks every 2 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (client_tun, client_local) = onetun(&t.peers[0], &gateway_key, t.lb, Ipv4Addr::new(127, 0, 0, 1), t.web);
    wait_answers(client_local, Duration::from_secs(15))?;
    let on =
        landed(&replicas, "default/client", [0, 0]).context("the client's handshake is on neither or both replicas")?;
    Ok((replicas, gateway_key, client_tun, client_local, on))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_is_served_again_within_5_s_when_its_replica_is_killed() -> Result<()> {
    let t = Topology::start(&["client", "bystander"]).await?;
    let (mut replicas, gateway_key, mut client_tun, client_local, first) =
        replicas_and_client(&t, |i| t.replica(i, true)).await?;
    // A bystander on the other replica: the LB hashes the source address, so try sources
    // until one lands there.
    let mut bystander = None;
    for last in 2..40u8 {
        let before = handshakes(&replicas, "default/bystander");
        let (p, local) = onetun(&t.peers[1], &gateway_key, t.lb, Ipv4Addr::new(127, 0, 0, last), t.web);
        if wait_answers(local, Duration::from_secs(10)).is_ok()
            && landed(&replicas, "default/bystander", before) == Some(1 - first)
        {
            bystander = Some((p, local));
            break;
        }
    }
    let (mut bystander_tun, bystander_local) = bystander.context("no source address landed on the other replica")?;

    let client = Loop::start(client_local);
    let by = Loop::start(bystander_local);
    let survivor = 1 - first;
    let by_handshakes = replicas[survivor].as_ref().unwrap().handshakes("default/bystander");
    let watch_from = Instant::now();
    let kill = kill_and_measure(&mut replicas, first, &client, Duration::from_secs(30));
    // Served again: the end of the first answered request after the kill.
    let back = kill
        .served
        .context("the client was not served again within 30 s of the kill")?;
    eprintln!("kill 1: served again after {back:?}, {} requests lost", kill.lost);
    assert!(back <= GOAL, "served again after {back:?}, goal {GOAL:?}");
    let survivor_gw = replicas[survivor].as_ref().unwrap();
    assert!(
        survivor_gw
            .metrics()
            .get("kuberaya_gateway_session_recoveries_total", "")
            >= 1.0
    );
    // The bystander saw nothing.
    std::thread::sleep(Duration::from_secs(1));
    let failed_by = by.since(watch_from).iter().filter(|(_, ok)| !ok).count();
    assert_eq!(failed_by, 0, "the bystander lost requests");
    assert_eq!(
        survivor_gw.handshakes("default/bystander"),
        by_handshakes,
        "the bystander handshook again"
    );

    // The killed replica comes back (a new pod on the same node); once it is in rotation,
    // the other is killed: the client moves back.
    replicas[first] = Some(t.replica(first, true)?);
    replicas[first]
        .as_ref()
        .unwrap()
        .wait_accepted(2, Duration::from_secs(10))
        .context("restarted replica")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kill2 = kill_and_measure(&mut replicas, survivor, &client, Duration::from_secs(30));
    let back2 = kill2
        .served
        .context("the client was not served again within 30 s of the second kill")?;
    eprintln!("kill 2: served again after {back2:?}, {} requests lost", kill2.lost);
    assert!(back2 <= GOAL, "served again after {back2:?}, goal {GOAL:?}");
    drop((client, by));
    client_tun.stop();
    bystander_tun.stop();
    for g in replicas.iter_mut().flatten() {
        g.assert_healthy();
    }
    drop(t.dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_session_recovery_the_same_client_is_not_back_within_5_s() -> Result<()> {
    let t = Topology::start(&["client", "bystander"]).await?;
    let (mut replicas, _, mut client_tun, client_local, first) =
        replicas_and_client(&t, |i| t.replica(i, false)).await?;
    let client = Loop::start(client_local);
    // The stock client recovers by its own timers (about 15 s without an answer, then a
    // handshake): bounded here at 40 s.
    let kill = kill_and_measure(&mut replicas, first, &client, Duration::from_secs(40));
    let back = kill.served;
    eprintln!(
        "without session recovery: served again after {back:?}, {} requests lost",
        kill.lost
    );
    assert!(
        back.is_none_or(|b| b > GOAL),
        "back after {back:?} without session recovery"
    );
    let survivor = replicas[1 - first].as_ref().unwrap();
    assert_eq!(
        survivor.metrics().get("kuberaya_gateway_session_recoveries_total", ""),
        0.0
    );
    drop(client);
    client_tun.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_stopped_with_sigterm_hands_its_clients_over_without_a_failed_request() -> Result<()> {
    let t = Topology::start(&["client"]).await?;
    let drained = |i: usize| -> Result<Gateway> {
        let mut cmd = t.replica_command(i, true);
        cmd.args(["--shutdown-drain", "5s"]);
        let mut g = Gateway::spawn(cmd, Duration::from_secs(30))?;
        // Its stop at the end drains too.
        g.process.set_grace(Duration::from_secs(7));
        Ok(g)
    };
    let (mut replicas, _, mut client_tun, client_local, on) = replicas_and_client(&t, drained).await?;
    let client = Loop::open(client_local, Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopped = Instant::now();
    let g = replicas[on].as_mut().unwrap();
    g.process.signal(libc::SIGTERM);
    // Not ready at once, still serving; gone after the drain.
    let exited = poll_until_blocking(Duration::from_secs(15), || (!g.process.is_running()).then_some(()));
    let gone = stopped.elapsed();
    ensure!(exited.is_some(), "the replica did not exit within 15 s of SIGTERM");
    ensure!(
        gone >= Duration::from_secs(4),
        "the replica exited {gone:?} after SIGTERM, without draining"
    );
    // The client was handed over during the drain: the other replica took it by recovery.
    let survivor = replicas[1 - on].as_ref().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let failed = client.failed_between(stopped - Duration::from_secs(1), Instant::now());
    let total = client.requests_since(stopped).len();
    eprintln!(
        "SIGTERM with a 5 s drain: exited after {gone:?}; {} of {total} requests failed; survivor recoveries {}",
        failed.len(),
        survivor.metrics().get("kuberaya_gateway_session_recoveries_total", "")
    );
    ensure!(
        failed.is_empty(),
        "{} requests failed across the drained stop",
        failed.len()
    );
    ensure!(
        survivor.metrics().get("kuberaya_gateway_session_recoveries_total", "") >= 1.0,
        "the other replica never took the client over"
    );
    drop(client);
    client_tun.stop();
    Ok(())
}

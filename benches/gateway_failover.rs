//! Issue 22, gateway replicas: two `kuberaya-gateway` processes (release build, static
//! files, one key, one peer set) behind the platform stand-in's LB as the gateway Service
//! gets one (UDP, `source` algorithm, HTTP health check every 2 s), on loopback; the
//! topology is `tests/harness/failover.rs`, the one `tests/gateway_failover.rs` asserts on.
//! Three `onetun` clients each start a request every 50 ms through the LB, whatever their
//! other requests do (an open loop: an outage shows as the requests it fails, and its end
//! to within 50 ms; each request is bounded by a 1 s connect and a 1 s read): `client`,
//! and one bystander seated on each replica (`bystander-0`, `bystander-1`; the LB hashes
//! the source address, so each gets a source that lands there).
//!
//! 1. With session recovery: `KR_BENCH_KILLS` (10) SIGKILLs of the replica the client is
//!    on (so they alternate): the time from the SIGKILL to the end of the client's first
//!    successful request started after it (and to the survivor's recovery handshake, from
//!    its log), the client's failed requests, and whether the bystander on the surviving
//!    replica lost no request and did not handshake again. The killed replica is
//!    restarted and the next kill waits until the LB has it healthy again. The kills are
//!    spread over the LB's 2 s health-check cycle (a delay before each), which decides
//!    when the LB notices.
//! 2. The baseline, `--session-recovery false`: `KR_BENCH_BASELINE_KILLS` (3) kills, the
//!    same figures: how long a stock client takes to come back by its own timers.
//! 3. A rolling restart (with session recovery, all three loops running): replica 0
//!    stopped with SIGTERM, a new process started on the same VM IP (it needs the same
//!    IP:port, so stop, then start) and waited for until loaded and healthy in the LB, then
//!    replica 1 the same way; each client's failed requests, those under way at a SIGTERM
//!    apart.
//!
//! Run: `cargo bench --bench gateway_failover` (needs `onetun`). It builds the release
//! `kuberaya-gateway` and `kuberaya-sandbox` first, unless `KURAYA_BIN_DIR` names the
//! binaries to use. Every wait is bounded: a client not back is reported as such.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use common::{knob, machine, median_max, ratio, result, secs};
use kuberaya_e2e::Process;
use kuberaya_e2e::failover::{
    HEALTH_INTERVAL, Loop, RATE, Request, Topology, handshakes, kill_and_measure, landed, onetun_command, wait_answers,
};
use kuberaya_e2e::gateway::Gateway;
use kuberaya_e2e::sandbox::find_onetun;
use tokio::runtime::Runtime;

/// The goal: a client served again within this long after its replica is killed.
const GOAL: Duration = Duration::from_secs(5);
/// The peers of the static files, in this order.
const NAMES: [&str; 3] = ["client", "bystander-0", "bystander-1"];
/// The client's source address (the bystanders' are searched for).
const CLIENT_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// The peers each replica must have loaded.
const PEERS: u64 = NAMES.len() as u64;
/// Longest a phase's request loops may run (ended earlier when the phase ends).
const LOOP_LIMIT: Duration = Duration::from_secs(1800);

/// An onetun client and its request loop.
struct Client {
    /// Index in `NAMES` and the topology's peers.
    peer: usize,
    source: Ipv4Addr,
    tun: Process,
    requests: Loop,
}

impl Client {
    fn name(&self) -> String {
        format!("default/{}", NAMES[self.peer])
    }
}

/// Starts onetun as peer `peer` from `source` and waits for its first answer; no loop yet.
fn connect(t: &Topology, gateway_key: &str, peer: usize, source: Ipv4Addr) -> Result<(Process, SocketAddr)> {
    let (cmd, local) = onetun_command(&t.peers[peer], gateway_key, t.lb, source, t.web);
    let tun = Process::spawn_command(common::die_with_parent(cmd))?;
    wait_answers(local, Duration::from_secs(15))?;
    Ok((tun, local))
}

/// One phase: the topology, its two replicas, the client and the two bystanders.
struct Phase {
    t: Topology,
    recovery: bool,
    replicas: [Option<Gateway>; 2],
    gateway_key: String,
    client: Client,
    /// `bystanders[i]` is seated on replica `i` (re-seated after each restart of it).
    bystanders: [Client; 2],
}

fn start_replica(t: &Topology, i: usize, recovery: bool) -> Result<Gateway> {
    let mut cmd = t.replica_command(i, recovery);
    // Plain log lines: their timestamps are read (see `recovery_sent`).
    cmd.env("NO_COLOR", "1");
    let gw = Gateway::spawn(common::die_with_parent(cmd), Duration::from_secs(30))?;
    gw.wait_accepted(PEERS, Duration::from_secs(10))
        .with_context(|| format!("replica {i} did not load the peers"))?;
    Ok(gw)
}

/// Bystander `want` (peer `1 + want`) on replica `want`: tries sources in turn, first one
/// `seen` to land there; every source tried is added to `seen` with where it landed.
fn seat(
    t: &Topology,
    replicas: &[Option<Gateway>; 2],
    gateway_key: &str,
    want: usize,
    seen: &mut Vec<(Ipv4Addr, usize)>,
) -> Option<Client> {
    let peer = 1 + want;
    let name = format!("default/{}", NAMES[peer]);
    let known = seen.iter().find(|(_, r)| *r == want).map(|(s, _)| *s);
    let fresh = (2..=60u8).map(|last| Ipv4Addr::new(127, 0, 0, last));
    for source in known.into_iter().chain(fresh) {
        if known != Some(source) && seen.iter().any(|(s, _)| *s == source) {
            continue;
        }
        let before = handshakes(replicas, &name);
        let Ok((tun, local)) = connect(t, gateway_key, peer, source) else {
            continue;
        };
        let on = landed(replicas, &name, before);
        if let Some(r) = on {
            seen.push((source, r));
        }
        if on == Some(want) {
            return Some(Client {
                peer,
                source,
                tun,
                requests: Loop::open(local, LOOP_LIMIT),
            });
        }
    }
    None
}

impl Phase {
    fn start(rt: &Runtime, recovery: bool) -> Result<Phase> {
        let t = rt.block_on(Topology::start(&NAMES))?;
        let started = Instant::now();
        let replicas = [
            Some(start_replica(&t, 0, recovery)?),
            Some(start_replica(&t, 1, recovery)?),
        ];
        for i in 0..2 {
            rt.block_on(t.wait_in_rotation(i, started, Duration::from_secs(15)))?;
        }
        let gateway_key = replicas[0].as_ref().unwrap().public_key.clone();
        let (tun, local) = connect(&t, &gateway_key, 0, CLIENT_SOURCE)?;
        let client = Client {
            peer: 0,
            source: CLIENT_SOURCE,
            tun,
            requests: Loop::open(local, LOOP_LIMIT),
        };
        // The LB's choice depends on the source address alone (rendezvous hashing over the
        // VMs): sources are tried until each replica has a bystander.
        let mut seen = Vec::new();
        let b0 = seat(&t, &replicas, &gateway_key, 0, &mut seen);
        let b1 = seat(&t, &replicas, &gateway_key, 1, &mut seen);
        let (Some(b0), Some(b1)) = (b0, b1) else {
            bail!("no source address among 127.0.0.2-60 landed a bystander on each replica");
        };
        Ok(Phase {
            t,
            recovery,
            replicas,
            gateway_key,
            client,
            bystanders: [b0, b1],
        })
    }

    /// The replica the client has handshaken with: the one replica whose count is above 0
    /// (a restarted replica starts at 0 and the LB keeps the client where it is).
    fn client_on(&self) -> Option<usize> {
        let n = handshakes(&self.replicas, &self.client.name());
        match (n[0] > 0, n[1] > 0) {
            (true, false) => Some(0),
            (false, true) => Some(1),
            _ => None,
        }
    }

    /// Restarts onetun of bystander `i` (its source lands on replica `i` while both are in
    /// rotation) and checks it handshook there.
    fn reseat(&mut self, i: usize) -> Result<()> {
        let b = &mut self.bystanders[i];
        b.tun.stop();
        let name = format!("default/{}", NAMES[b.peer]);
        let before = handshakes(&self.replicas, &name);
        let (tun, local) = connect(&self.t, &self.gateway_key, b.peer, b.source)?;
        b.tun = tun;
        b.requests = Loop::open(local, LOOP_LIMIT);
        let on = landed(&self.replicas, &name, before);
        if on != Some(i) {
            bail!("bystander {i} from {} landed on {on:?}, not on replica {i}", b.source);
        }
        Ok(())
    }

    /// The client's onetun again, when it did not come back by itself.
    fn reconnect_client(&mut self) -> Result<()> {
        self.client.tun.stop();
        let (tun, local) = connect(&self.t, &self.gateway_key, 0, self.client.source)?;
        self.client.tun = tun;
        self.client.requests = Loop::open(local, LOOP_LIMIT);
        Ok(())
    }
}

/// A request of a loop takes at most this long (connect and read, 1 s each): a window's
/// failures are all known this long after its end.
const REQUEST_MAX: Duration = Duration::from_secs(2);

/// The figures of one kill.
struct Kill {
    /// SIGKILL → the end of the client's first successful request started after it.
    served: Option<Duration>,
    /// The client's failed requests from 1 s before the kill to 1 s after it was served
    /// again.
    lost: usize,
    /// The bystander on the survivor: no failed request and no new handshake.
    untouched: bool,
    /// The killed replica's restart → healthy in the LB.
    rotation: Option<Duration>,
    /// SIGKILL → the survivor's session-recovery handshake toward the client (its log).
    recovery: Option<Duration>,
}

/// The time from `at` to the first "session recovery: handshake started" toward `peer`
/// logged after it by `gw` (its log lines start with an RFC 3339 timestamp).
fn recovery_sent(gw: &Gateway, peer: &str, at: SystemTime) -> Option<Duration> {
    let at_ns = at.duration_since(UNIX_EPOCH).ok()?.as_nanos() as i128;
    gw.process
        .stderr()
        .lines()
        .filter(|l| l.contains("session recovery: handshake started") && l.contains(&format!("peer={peer}")))
        .filter_map(|l| l.split_whitespace().next()?.parse::<jiff::Timestamp>().ok())
        .map(|t| t.as_nanosecond() - at_ns)
        .filter(|ns| *ns >= 0)
        .min()
        .map(|ns| Duration::from_nanos(ns as u64))
}

/// A delay in `[0, HEALTH_INTERVAL)` for kill `k`, spread evenly over the interval
/// whatever the number of kills (multiples of the golden ratio, modulo 1).
fn cycle_offset(k: u64) -> Duration {
    HEALTH_INTERVAL.mul_f64((k as f64 * 0.618_033_988_749_895).fract())
}

/// `kills` kills of the replica the client is on; each restarted and back in rotation
/// before the next.
fn kills(rt: &Runtime, p: &mut Phase, kills: u64, wait: Duration) -> Result<Vec<Kill>> {
    let mut out = Vec::new();
    let mut expected = p.client_on().context("the client is on neither or both replicas")?;
    for k in 1..=kills {
        let victim = p.client_on().unwrap_or_else(|| {
            println!("  kill {k}: the client's replica is unclear from the metrics; taking replica {expected}");
            expected
        });
        let survivor = 1 - victim;
        let by_name = p.bystanders[survivor].name();
        let survivor_gw = p.replicas[survivor].as_ref().context("survivor down")?;
        let by_handshakes = survivor_gw.handshakes(&by_name);
        let recoveries = survivor_gw
            .metrics()
            .get("kuberaya_gateway_session_recoveries_total", "");
        // The LB notices a dead replica at its next health check: each kill comes at another
        // point of the check cycle, so that the figures cover it rather than one point.
        let offset = cycle_offset(k - 1);
        std::thread::sleep(offset);
        let from = Instant::now();
        // Sleeps 1 s, kills, and waits for the first success.
        let f = kill_and_measure(&mut p.replicas, victim, &p.client.requests, wait);
        let killed_wall = SystemTime::now() - f.killed.elapsed();
        let to = f.killed + f.served.unwrap_or(wait) + Duration::from_secs(1);
        if let Some(wait) = (to + REQUEST_MAX).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let lost = p.client.requests.failed_between(from, to).len();
        let by_failed = p.bystanders[survivor].requests.failed_between(from, to).len();
        let survivor_gw = p.replicas[survivor].as_ref().context("survivor down")?;
        let by_again = survivor_gw.handshakes(&by_name).saturating_sub(by_handshakes);
        let recovered = survivor_gw
            .metrics()
            .get("kuberaya_gateway_session_recoveries_total", "")
            - recoveries;
        let recovery = recovery_sent(survivor_gw, &p.client.name(), killed_wall);

        let restarted = Instant::now();
        p.replicas[victim] = Some(start_replica(&p.t, victim, p.recovery)?);
        let rotation = rt
            .block_on(p.t.wait_in_rotation(victim, restarted, Duration::from_secs(15)))
            .map_err(|e| println!("  kill {k}: {e:#}"))
            .ok()
            .map(|(took, _)| took);
        if f.served.is_none() {
            p.reconnect_client()?;
        }
        p.reseat(victim)?;
        println!(
            "  kill {k} (offset {}): replica {victim} (the client's); client served again after {} ({} the first \
             successful request started; the survivor's recovery handshake toward it {}), {lost} requests failed; \
             {by_name} on replica {survivor}: {by_failed} failed, {by_again} new handshakes; survivor's session \
             recoveries +{recovered}; restarted replica healthy in the LB after {}",
            secs(offset),
            f.served.map_or(format!("more than {wait:?}"), secs),
            f.back.map_or("-".into(), secs),
            recovery.map_or("none".into(), secs),
            rotation.map_or("-".into(), secs),
        );
        out.push(Kill {
            served: f.served,
            lost,
            untouched: by_failed == 0 && by_again == 0,
            rotation,
            recovery,
        });
        expected = survivor;
    }
    Ok(out)
}

/// Prints the figures of a kills phase; the median time to served again, if any was.
fn report(what: &str, kills: &[Kill], wait: Duration) -> Option<Duration> {
    let n = kills.len();
    let served: Vec<Duration> = kills.iter().filter_map(|k| k.served).collect();
    let within = served.iter().filter(|d| **d <= GOAL).count();
    let lost: Vec<usize> = kills.iter().map(|k| k.lost).collect();
    let untouched = kills.iter().filter(|k| k.untouched).count();
    let rotation: Vec<Duration> = kills.iter().filter_map(|k| k.rotation).collect();
    let stats = median_max(&served);
    result(
        &format!("failover.kill_to_first_success ({what}, {n} kills)"),
        match stats {
            Some((median, max)) => format!(
                "median {}, max {} (goal ≤ {}); {within} of {n} within the goal, {} not served within {wait:?}",
                secs(median),
                secs(max),
                secs(GOAL),
                n - served.len()
            ),
            None => format!("none served within {wait:?}"),
        },
    );
    let mut sorted = lost.clone();
    sorted.sort();
    result(
        &format!("failover.requests_lost ({what})"),
        format!(
            "median {} per kill, max {} (per kill {lost:?}; failed requests of the client's {RATE}/s, started \
             from 1 s before the kill to 1 s after it was served again)",
            sorted.get(n / 2).copied().unwrap_or(0),
            sorted.last().copied().unwrap_or(0),
        ),
    );
    let recovery: Vec<Duration> = kills.iter().filter_map(|k| k.recovery).collect();
    if let Some((median, max)) = median_max(&recovery) {
        result(
            &format!("failover.kill_to_recovery_handshake ({what})"),
            format!(
                "median {}, max {} ({} of {n}; SIGKILL → the survivor logs its handshake toward the client: the \
                 LB's health check moved the client's flow and its first packet arrived)",
                secs(median),
                secs(max),
                recovery.len()
            ),
        );
    }
    result(
        &format!("failover.bystander_untouched ({what})"),
        format!("{untouched} of {n} kills (the bystander on the survivor: 0 failed requests, 0 new handshakes)"),
    );
    result(
        &format!("failover.restart_to_rotation ({what})"),
        match median_max(&rotation) {
            Some((median, max)) => format!(
                "median {}, max {} ({} of {n}; a new process on the killed VM → healthy in the LB)",
                secs(median),
                secs(max),
                rotation.len()
            ),
            None => "never healthy within 15 s".into(),
        },
    );
    stats.map(|(median, _)| median)
}

/// Each client's failed requests during a rolling restart.
fn rolling_restart(rt: &Runtime, p: &mut Phase) -> Result<()> {
    // The window opens 1 s before the first SIGTERM, so that it holds the requests under
    // way then.
    let from = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let mut stops = Vec::new();
    for i in 0..2 {
        let mut old = p.replicas[i].take().context("replica down")?;
        let stopped = Instant::now();
        old.process.stop();
        let exited = stopped.elapsed();
        drop(old);
        let started = Instant::now();
        p.replicas[i] = Some(start_replica(&p.t, i, p.recovery)?);
        let loaded = started.elapsed();
        let (rotation, seen_down) = rt.block_on(p.t.wait_in_rotation(i, started, Duration::from_secs(15)))?;
        println!(
            "  replica {i}: SIGTERM → exited {}; new process → peers loaded {}, healthy in the LB {} (the LB {} \
             it down)",
            secs(exited),
            secs(loaded),
            secs(rotation),
            if seen_down { "had" } else { "never had" }
        );
        stops.push(stopped);
    }
    // Every client served again (bounded), then every request of the window finished.
    let last = *stops.last().unwrap();
    let clients = [&p.client, &p.bystanders[0], &p.bystanders[1]];
    let deadline = Instant::now() + Duration::from_secs(30);
    while clients.iter().any(|c| c.requests.served_after(last).is_none()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let to = Instant::now() + Duration::from_secs(1);
    std::thread::sleep(Duration::from_secs(1) + REQUEST_MAX);
    let mut summary = Vec::new();
    for c in clients {
        let all: Vec<Request> = c
            .requests
            .requests_since(from)
            .into_iter()
            .filter(|q| q.start < to)
            .collect();
        let failed = all.iter().filter(|q| !q.ok).count();
        let in_flight: usize = stops.iter().map(|s| c.requests.failed_across(*s)).sum();
        println!(
            "  {}: {} requests, {failed} failed ({in_flight} of them under way at a SIGTERM), longest outage {}",
            c.name(),
            all.len(),
            longest_outage(&all).map_or("none".into(), secs)
        );
        summary.push(format!("{} {}", NAMES[c.peer], failed.saturating_sub(in_flight)));
    }
    // Each new process took its clients over by session recovery (or the LB moved them).
    for (i, gw) in p.replicas.iter().enumerate() {
        let Some(gw) = gw else { continue };
        let peers: Vec<String> = NAMES
            .iter()
            .map(|n| format!("{n} {}", gw.handshakes(&format!("default/{n}"))))
            .collect();
        println!(
            "  new replica {i}: {} session recoveries; handshakes: {}",
            gw.metrics().get("kuberaya_gateway_session_recoveries_total", ""),
            peers.join(", ")
        );
    }
    result(
        "failover.rolling_restart (SIGTERM, then a new process on the same VM, one replica after the other)",
        format!(
            "failed requests beyond those under way at a SIGTERM: {}",
            summary.join(", ")
        ),
    );
    Ok(())
}

/// The longest time from the start of a failed request to the end of the next
/// successful one started after it.
fn longest_outage(requests: &[Request]) -> Option<Duration> {
    let mut by_start = requests.to_vec();
    by_start.sort_by_key(|q| q.start);
    let mut first_fail: Option<Instant> = None;
    let mut longest = None;
    for q in by_start {
        match (q.ok, first_fail) {
            (false, None) => first_fail = Some(q.start),
            (true, Some(f)) => {
                longest = longest.max(Some(q.end.duration_since(f)));
                first_fail = None;
            }
            _ => {}
        }
    }
    longest
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let n_fast = knob("KR_BENCH_KILLS", 10);
    let n_base = knob("KR_BENCH_BASELINE_KILLS", 3);
    println!("gateway_failover: kills={n_fast} baseline_kills={n_base}");
    if find_onetun().is_none() {
        result("failover", "skipped: no onetun");
        return Ok(());
    }
    common::build_binaries();
    println!("{}", machine());
    let rt = Runtime::new()?;

    println!("session recovery on:");
    let fast_wait = Duration::from_secs(30);
    let mut p = Phase::start(&rt, true)?;
    let fast = kills(&rt, &mut p, n_fast, fast_wait)?;
    let fast_median = report("session recovery", &fast, fast_wait);
    println!("rolling restart: {}", common::load_average());
    if let Err(e) = rolling_restart(&rt, &mut p) {
        result("failover.rolling_restart", format!("failed: {e:#}"));
    }
    drop(p);

    println!("baseline, --session-recovery false: {}", common::load_average());
    // A stock client gives up on a silent session after about 15 s, then handshakes.
    let base_wait = Duration::from_secs(40);
    let mut p = Phase::start(&rt, false)?;
    let base = kills(&rt, &mut p, n_base, base_wait)?;
    let base_median = report("without session recovery", &base, base_wait);
    drop(p);

    if let (Some(f), Some(b)) = (fast_median, base_median) {
        result(
            "failover.fast_vs_baseline (median kill → first success)",
            format!(
                "{} ({} with session recovery, {} without)",
                ratio(f.as_secs_f64(), b.as_secs_f64()),
                secs(f),
                secs(b)
            ),
        );
    }
    println!("{}", common::load_average());
    Ok(())
}

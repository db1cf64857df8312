//! Issue 12/13, the gateway under a handshake flood: the real `kuberaya-gateway` binary
//! (static files, loopback, release build).
//!
//! - handshakes per second it sustains: registered peers' initiations (pre-made with
//!   boringtun's noise `Tunn`, each newer than the last of its peer) sent with at most
//!   `KR_BENCH_INFLIGHT` unanswered, counting handshake responses; with the cookie limit out
//!   of the way (`--handshake-limit 1000000`) and with the default (100/s);
//! - the throughput an established `onetun` peer keeps during a flood: without a flood, with
//!   a 10,000/s flood of initiations from unknown keys (valid MAC1: anyone who knows the
//!   gateway's public key can make them; answered with cookie replies above the limit),
//!   and with a flood of real handshakes at full speed (the worst case: every one costs
//!   the gateway its Diffie-Hellman operations), counting the handshake responses and
//!   cookie replies that come back. The flood repeats its initiations after
//!   `KR_BENCH_FLOOD_ROUNDS` rounds: a repeat is a replay, which the gateway rejects after
//!   its Diffie-Hellman work, without a response; at 250 rounds the 10,000/s flood stays
//!   fresh for 6 s, so responses count every handshake taken.
//!
//! Run: `cargo bench --bench gateway_flood`. Knobs: `KR_BENCH_FLOOD_PEERS` (256),
//! `KR_BENCH_FLOOD_ROUNDS` (40 initiations per peer), `KR_BENCH_FLOOD_RATE` (10000/s),
//! `KR_BENCH_WINDOW_S` (5 s per throughput figure), `KR_BENCH_INFLIGHT` (256).

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use boringtun::noise::{Tunn, TunnResult};
use common::{cpu_time, knob, machine, result};
use kuberaya_e2e::gateway::{
    self, Gateway, PeerKey, StaticFiles, bulk_server, download_mbit, onetun_tcp, peer_address, random_bytes,
};
use kuberaya_e2e::{Process, b64, poll_until_blocking};

/// Peer `i` of the bench, with a fresh key.
fn peer(i: usize) -> PeerKey {
    PeerKey::random(peer_address(i as u64))
}

fn start_gateway(dir: &Path, peers: &[PeerKey], web: Ipv4Addr, port: u16, limit: u64) -> Result<Gateway> {
    let key = gateway::write_key(dir, &b64(&random_bytes::<32>()))?;
    let list: Vec<_> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| p.file_entry(&format!("p{i}"), &["web"]))
        .collect();
    let files = StaticFiles::write(
        dir,
        &list,
        &serde_json::json!([{"namespace": "default", "name": "web", "clusterIP": web.to_string(),
            "ports": [{"name": "bulk", "port": port}]}]),
    )?;
    let mut cmd = gateway::command(&key);
    cmd.args(files.args())
        .args(["--handshake-limit", &limit.to_string()])
        .env("RUST_LOG", "warn");
    let gw = Gateway::spawn(common::die_with_parent(cmd), Duration::from_secs(60))?;
    // The file source loads the peers within its 500 ms re-read.
    std::thread::sleep(Duration::from_secs(1));
    Ok(gw)
}

/// `rounds` initiations per peer, round by round (each newer than its peer's last).
fn initiations(peers: &[PeerKey], gw: &Gateway, rounds: usize) -> Vec<Vec<u8>> {
    let mut tunns: Vec<Tunn> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| p.client_tunn(gw.public, i as u32))
        .collect();
    let mut out = Vec::with_capacity(peers.len() * rounds);
    let mut buf = vec![0u8; 256];
    for _ in 0..rounds {
        for t in tunns.iter_mut() {
            if let TunnResult::WriteToNetwork(p) = t.format_handshake_initiation(&mut buf, true) {
                out.push(p.to_vec());
            }
        }
    }
    out
}

/// Sends `inits` keeping at most `inflight` unanswered; (responses, cookie replies, lost,
/// time). After 1 s without an answer the unanswered ones count as lost.
fn handshake_run(gw: &Gateway, inits: &[Vec<u8>], inflight: u64) -> Result<(u64, u64, u64, Duration)> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let total = inits.len() as u64;
    let (mut sent, mut responses, mut cookies, mut lost) = (0u64, 0u64, 0u64, 0u64);
    let mut buf = [0u8; 256];
    let started = Instant::now();
    let mut last_answer = Instant::now();
    loop {
        while sent < total && sent.saturating_sub(responses + cookies + lost) < inflight {
            sock.send_to(&inits[sent as usize], gw.udp)?;
            sent += 1;
        }
        if sent == total && responses + cookies + lost >= sent {
            break;
        }
        match sock.recv(&mut buf) {
            Ok(92) if buf[0] == 2 => responses += 1,
            Ok(64) if buf[0] == 3 => cookies += 1,
            Ok(_) => continue,
            Err(_) => {
                if last_answer.elapsed() > Duration::from_secs(1) {
                    lost = sent.saturating_sub(responses + cookies);
                    last_answer = Instant::now();
                }
                continue;
            }
        }
        last_answer = Instant::now();
    }
    Ok((responses, cookies, lost, started.elapsed()))
}

/// onetun as `peer`, once it moves data (at most 20 s).
fn onetun(gw: &Gateway, peer: &PeerKey, remote: SocketAddr) -> Result<(Process, SocketAddr)> {
    let (cmd, local) = onetun_tcp(&gw.wg_peer(peer), remote);
    let p = Process::spawn_command(common::die_with_parent(cmd))?;
    let moved = poll_until_blocking(Duration::from_secs(20), || {
        (download_mbit(local, Duration::from_millis(300)) > 0.0).then_some(())
    });
    if moved.is_none() {
        bail!("onetun moved no data\n{}", p.output_tails())
    }
    Ok((p, local))
}

/// What a flood sent and what came back.
#[derive(Default)]
struct FloodCounts {
    sent: AtomicU64,
    responses: AtomicU64,
    cookies: AtomicU64,
}

/// Sends `datagrams` round-robin at `rate` per second until `stop`, in a thread, counting
/// them and the answers in `counts`.
fn flood(to: SocketAddr, datagrams: Vec<Vec<u8>>, rate: u64, stop: Arc<AtomicBool>, counts: Arc<FloodCounts>) {
    std::thread::spawn(move || {
        let Ok(sock) = UdpSocket::bind("127.0.0.1:0") else {
            return;
        };
        let _ = sock.set_nonblocking(true);
        let started = Instant::now();
        let mut n = 0u64;
        let mut buf = [0u8; 256];
        while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            while n < due {
                if sock
                    .send_to(&datagrams[(n % datagrams.len() as u64) as usize], to)
                    .is_ok()
                {
                    n += 1;
                }
            }
            // Drain the answers (cookie replies, responses).
            while let Ok(len) = sock.recv(&mut buf) {
                match (len, buf[0]) {
                    (92, 2) => counts.responses.fetch_add(1, Ordering::Relaxed),
                    (64, 3) => counts.cookies.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        counts.sent.store(n, Ordering::Relaxed);
    });
}

fn main() -> Result<()> {
    common::build_binaries();
    let peers_n = knob("KR_BENCH_FLOOD_PEERS", 256) as usize;
    let rounds = knob("KR_BENCH_FLOOD_ROUNDS", 40) as usize;
    let rate = knob("KR_BENCH_FLOOD_RATE", 10_000);
    let window = Duration::from_secs(knob("KR_BENCH_WINDOW_S", 5));
    let inflight = knob("KR_BENCH_INFLIGHT", 256);
    println!("gateway_flood: peers={peers_n} rounds={rounds} rate={rate}/s window={window:?} inflight={inflight}");
    println!("{}", machine());
    let net = kuberaya_e2e::unique_net_index();
    let web = Ipv4Addr::new(127, 97, net, 10);
    let stop = Arc::new(AtomicBool::new(false));
    let bulk = bulk_server(web, stop.clone(), 64)?;
    // Peer 0 is the established one; the others handshake.
    let peers: Vec<PeerKey> = (0..peers_n + 1).map(peer).collect();

    for (limit, what) in [
        (1_000_000u64, "no cookie limit"),
        (100, "default --handshake-limit 100"),
    ] {
        let dir = tempfile::tempdir()?;
        let gw = start_gateway(dir.path(), &peers, web, bulk.port(), limit)?;
        let made = Instant::now();
        let inits = initiations(&peers[1..], &gw, rounds);
        let made = made.elapsed();
        let cpu0 = cpu_time(gw.process.pid()).unwrap_or_default();
        let (responses, cookies, lost, took) = handshake_run(&gw, &inits, inflight)?;
        let cpu = cpu_time(gw.process.pid()).unwrap_or_default().saturating_sub(cpu0);
        result(
            &format!("handshakes_per_s ({what}, {} peers)", peers_n),
            format!(
                "{:.0}/s: {responses} responses, {cookies} cookie replies, {lost} lost of {} initiations in {:.2} s; gateway CPU \
                 {:.2} s → {:.0} handshakes per CPU-second (initiations made in {:.1} s); {}",
                responses as f64 / took.as_secs_f64(),
                inits.len(),
                took.as_secs_f64(),
                cpu.as_secs_f64(),
                responses as f64 / cpu.as_secs_f64().max(1e-9),
                made.as_secs_f64(),
                common::load_average()
            ),
        );
    }

    // The established peer's throughput: without a flood, with a cookie flood, with a
    // flood of real handshakes (no limit).
    for (limit, what) in [(100u64, "default limit"), (1_000_000, "no cookie limit")] {
        let dir = tempfile::tempdir()?;
        let gw = start_gateway(dir.path(), &peers, web, bulk.port(), limit)?;
        let (mut ot, local) = onetun(&gw, &peers[0], bulk)?;
        let pid = gw.process.pid();
        let without = download_mbit(local, window);
        // A flood from keys the gateway does not know (valid MAC1), or registered peers' real
        // initiations (each taking the gateway's DH work until answered).
        let (datagrams, kind) = if limit == 100 {
            let unknown: Vec<PeerKey> = (0..64).map(peer).collect();
            (initiations(&unknown, &gw, 1), "initiations from unknown keys")
        } else {
            (initiations(&peers[1..], &gw, rounds), "registered peers' initiations")
        };
        let flood_stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(FloodCounts::default());
        let cpu0 = cpu_time(pid).unwrap_or_default();
        let flood_started = Instant::now();
        flood(gw.udp, datagrams, rate, flood_stop.clone(), counts.clone());
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let during = download_mbit(local, window);
        let took = started.elapsed() + Duration::from_millis(300);
        flood_stop.store(true, Ordering::Relaxed);
        let flooded = flood_started.elapsed();
        std::thread::sleep(Duration::from_millis(100));
        let cpu = cpu_time(pid).unwrap_or_default().saturating_sub(cpu0);
        result(
            &format!("established_peer_throughput ({what}: {rate}/s {kind})"),
            format!(
                "{during:.0} Mbit/s during vs {without:.0} Mbit/s without → {:.2}x (goal ≥ 0.5x); {} sent, {} \
                 handshake responses ({:.0}/s), {} cookie replies, gateway CPU {:.2} s in {:.1} s; {}",
                during / without.max(1e-9),
                counts.sent.load(Ordering::Relaxed),
                counts.responses.load(Ordering::Relaxed),
                counts.responses.load(Ordering::Relaxed) as f64 / flooded.as_secs_f64(),
                counts.cookies.load(Ordering::Relaxed),
                cpu.as_secs_f64(),
                took.as_secs_f64(),
                common::load_average()
            ),
        );
        ot.stop();
    }
    stop.store(true, Ordering::Relaxed);
    Ok(())
}

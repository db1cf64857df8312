//! Issue 13, "Gateway under attack": the real `kuberaya-gateway` binary (static files, on
//! loopback) against hostile datagrams, with every drop accounted for.
//!
//! - a handshake flood at ~10,000 initiations per second (valid MAC1, from keys the
//!   gateway does not know) while an established `onetun` peer downloads: cookie replies
//!   engage, and every flood datagram is a cookie reply, an `unknown_key` drop, a drop from
//!   the full handshake queue or a kernel receive-buffer drop (`/proc/net/udp`);
//! - a flood of registered peers' real initiations at ~10,000 per second with
//!   `--handshake-limit` lifted: the handshake worker answers some, and an established
//!   peer's data is answered all along;
//! - malformed, truncated, oversized and replayed datagrams: each kind lands on exactly
//!   its drop label, nothing panics, the session keeps working;
//! - a peer spoofing another peer's tunnel address: `spoofed`, nothing reaches the Service;
//! - a peer trying every port (1..=65535) of a denied Service: no SYN-ACK, no connection
//!   reaches the Service, 65,535 `not_allowed` drops and denied flows.
//!
//! The WireGuard clients of the attacker are boringtun's noise `Tunn` over a UDP socket
//! (a tool of the test). Default run well under 2 minutes; `KR_RELIABILITY_LONG=1` floods
//! for 20 s instead of 4 and repeats the datagram kinds 10 times as often.
//!
//! The established peer's throughput during the flood is printed (`RESULT` lines) and held
//! to a floor relative to its own throughput without the flood, measured in the same run
//! ([`FLOOD_SHARE_FLOOR`]); the performance goal itself is measured in
//! `benches/gateway_flood.rs`.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use kuberaya_e2e::gateway::{
    self, Gateway, Metrics, PeerKey, StaticFiles, bulk_server, checksum, dns_query, download_mbit, ipv4, onetun_tcp,
    pseudo, random_bytes, udp_packet,
};
use kuberaya_e2e::process::strip_ansi;
use kuberaya_e2e::wg_client::Client;
use kuberaya_e2e::{Process, b64, poll_until_blocking};

/// The tests of this file each start a gateway and push traffic: one at a time, so the
/// flood's throughput figure is not disturbed by a neighbour.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn long() -> bool {
    std::env::var("KR_RELIABILITY_LONG").is_ok_and(|v| v == "1")
}

/// The share of its own flood-free throughput the established peer keeps during the
/// handshake flood, at least. The baseline is measured in the same run, just before and
/// just after the flood, and the lower of the two is used, so that a machine busy with
/// something else for the whole test moves both figures alike. The benches hold the goal
/// (0.5×); this test ran at 0.24–0.81× on a loaded 2-core machine, and a tenth still tells
/// a working gateway from a starved peer (0.00× before the handshake budget).
const FLOOD_SHARE_FLOOR: f64 = 0.1;

// ---------------------------------------------------------------------------------------
// Keys and the gateway.

/// A peer of the test at `address` with a fresh key.
fn peer(address: [u8; 4]) -> PeerKey {
    PeerKey::random(Ipv4Addr::from(address))
}

/// The gateway under test with `peers` (name, key; each allowed to `web`) and `services`,
/// once it serves every peer.
fn start_gateway(dir: &Path, peers: &[(&str, &PeerKey)], services: serde_json::Value) -> Gateway {
    start_gateway_with(dir, peers, services, &[])
}

/// [`start_gateway`] with more arguments.
fn start_gateway_with(dir: &Path, peers: &[(&str, &PeerKey)], services: serde_json::Value, args: &[&str]) -> Gateway {
    let key = gateway::write_key(dir, &b64(&random_bytes::<32>())).unwrap();
    let list: Vec<_> = peers.iter().map(|(name, p)| p.file_entry(name, &["web"])).collect();
    let files = StaticFiles::write(dir, &list, &services).unwrap();
    let mut cmd = gateway::command(&key);
    cmd.args(files.args())
        .args(args)
        // The audit lines (info) stay on: their volume under a port scan is part of the test.
        .env("RUST_LOG", "info");
    let gw = Gateway::spawn(cmd, Duration::from_secs(60)).unwrap();
    let loaded = gw.wait_accepted(peers.len() as u64, Duration::from_secs(20));
    assert!(loaded.is_some(), "peers not accepted\n{}", gw.process.output_tails());
    gw
}

/// Handshake initiations the gateway dropped because its handshake worker's queue was full.
fn handshakes_dropped(m: &Metrics) -> u64 {
    m.get("kuberaya_gateway_handshakes_dropped_total", "") as u64
}

/// Drops of the gateway's UDP socket in the kernel (receive buffer full).
fn socket_drops(gw: &Gateway) -> u64 {
    udp_socket_drops(gw.udp)
}

/// The per-reason drop counts of `after` minus `before`, zeros left out.
fn drop_deltas(before: &Metrics, after: &Metrics) -> Vec<(String, u64)> {
    let b = before.drops();
    let mut out: Vec<(String, u64)> = after
        .drops()
        .into_iter()
        .map(|(r, n)| {
            let was = b.iter().find(|(x, _)| *x == r).map_or(0, |(_, n)| *n);
            (r, n - was)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    out.sort();
    out
}

/// The `drops` column of `/proc/net/udp` for the socket bound to `addr` (IPv4).
fn udp_socket_drops(addr: SocketAddr) -> u64 {
    let SocketAddr::V4(a) = addr else { return 0 };
    let local = format!("{:08X}:{:04X}", u32::from_le_bytes(a.ip().octets()), a.port());
    let text = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    text.lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(local.as_str()))
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------
// IP packets (more in the harness's gateway module).

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn tcp_syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0, 0x50, SYN, 0xff, 0xff, 0, 0, 0, 0]);
    let c = checksum(&[&pseudo(src, dst, 6, 20), &t]);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, 6, &t)
}

// ---------------------------------------------------------------------------------------
// The attacker's WireGuard client is the harness's [`Client`]; the established peer is onetun.

fn onetun(gw: &Gateway, peer: &PeerKey, remote: SocketAddr) -> (Process, SocketAddr) {
    let (cmd, local) = onetun_tcp(&gw.wg_peer(peer), remote);
    (Process::spawn_command(cmd).unwrap(), local)
}

struct Net {
    web: Ipv4Addr,
    secret: Ipv4Addr,
}

fn net() -> Net {
    let n = kuberaya_e2e::unique_net_index();
    Net {
        web: Ipv4Addr::new(127, 96, n, 10),
        secret: Ipv4Addr::new(127, 96, n, 11),
    }
}

/// "flow denied" lines and the sum of the held-back counts of the summary lines.
fn audit_counts(stderr: &str) -> (u64, u64) {
    let stderr = strip_ansi(stderr);
    let lines = stderr.matches("flow denied").count() as u64;
    let held = stderr
        .lines()
        .filter(|l| l.contains("denied flows not logged one by one"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("denied="))?
                .parse::<u64>()
                .ok()
        })
        .sum();
    (lines, held)
}

fn result(name: &str, value: impl std::fmt::Display) {
    println!("RESULT {name}: {value}");
    eprintln!("RESULT {name}: {value}");
}

// ---------------------------------------------------------------------------------------
// The scenarios.

#[test]
fn handshake_flood_gets_cookie_replies_every_datagram_is_accounted_for_and_the_peer_keeps_working() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let net = net();
    let stop = Arc::new(AtomicBool::new(false));
    let bulk = bulk_server(net.web, stop.clone(), 32).unwrap();
    let alice = peer([100, 64, 0, 2]);
    let mut gw = start_gateway(
        dir.path(),
        &[("alice", &alice)],
        serde_json::json!([{"namespace": "default", "name": "web", "clusterIP": net.web.to_string(),
            "ports": [{"name": "bulk", "port": bulk.port()}]}]),
    );

    // The established peer.
    let (mut ot, local) = onetun(&gw, &alice, bulk);
    let warm = poll_until_blocking(Duration::from_secs(20), || {
        (download_mbit(local, Duration::from_millis(300)) > 0.0).then_some(())
    });
    assert!(
        warm.is_some(),
        "onetun got nothing\n{}\n{}",
        ot.output_tails(),
        gw.process.output_tails()
    );
    let window = Duration::from_secs(if long() { 10 } else { 3 });
    let without = download_mbit(local, window);

    // The flood: initiations with a valid MAC1 (anyone who knows the gateway's public
    // key can make them) from 64 keys the gateway does not know, resent in a loop.
    let flood: Vec<Vec<u8>> = (0..64)
        .map(|i| {
            let mut t = PeerKey::new(random_bytes::<32>(), Ipv4Addr::UNSPECIFIED).client_tunn(gw.public, i);
            let mut out = vec![0u8; 256];
            match t.format_handshake_initiation(&mut out, false) {
                TunnResult::WriteToNetwork(p) => p.to_vec(),
                _ => panic!("initiation"),
            }
        })
        .collect();
    let rate = 10_000u64;
    let flood_for = Duration::from_secs(if long() { 20 } else { 4 });
    let before = gw.metrics();
    let kernel_before = socket_drops(&gw);
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let cookies_seen = Arc::new(AtomicU64::new(0));
    let reader = {
        let (sock, done, seen) = (sock.clone(), done.clone(), cookies_seen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let deadline = Instant::now() + Duration::from_secs(120);
            while Instant::now() < deadline {
                match sock.recv(&mut buf) {
                    Ok(64) if buf[0] == 3 => {
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) if done.load(Ordering::Relaxed) => return,
                    Err(_) => {}
                }
            }
        })
    };
    let sender = {
        let (sock, to) = (sock.clone(), gw.udp);
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut sent = 0u64;
            while started.elapsed() < flood_for {
                // Catch up to the schedule, 10 ms at a time.
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                while sent < due {
                    if sock.send_to(&flood[(sent % 64) as usize], to).is_ok() {
                        sent += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (sent, started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let during = download_mbit(local, window);
    let (sent, took) = sender.join().unwrap();
    // Let the gateway finish what is queued, then count.
    std::thread::sleep(Duration::from_millis(1500));
    done.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let after = gw.metrics();
    let kernel = socket_drops(&gw) - kernel_before;
    let flooder_drops = udp_socket_drops(sock.local_addr().unwrap());
    let cookies = after.cookies() - before.cookies();
    let deltas = drop_deltas(&before, &after);
    let unknown = after.dropped("unknown_key") - before.dropped("unknown_key");
    let queue_full = handshakes_dropped(&after) - handshakes_dropped(&before);
    // The baseline again, now the flood is over (and the counters above are read).
    let without_after = download_mbit(local, window);
    let baseline = without.min(without_after);
    result(
        "flood.offered",
        format!(
            "{sent} initiations in {:.2} s ({:.0}/s)",
            took.as_secs_f64(),
            sent as f64 / took.as_secs_f64()
        ),
    );
    result(
        "flood.accounted",
        format!(
            "{cookies} cookie replies ({} seen by the flooder), {unknown} unknown_key drops, {queue_full} \
             dropped by the full handshake queue, {kernel} kernel receive-buffer drops; drop deltas {deltas:?}",
            cookies_seen.load(Ordering::Relaxed)
        ),
    );
    result(
        "flood.established_peer_throughput",
        format!(
            "{during:.0} Mbit/s during vs {without:.0} Mbit/s without before and {without_after:.0} after → {:.2}x \
             of the lower",
            during / baseline.max(1e-9)
        ),
    );

    assert!(cookies > 0, "no cookie replies under a flood of {sent}");
    assert!(
        cookies_seen.load(Ordering::Relaxed) > 0,
        "the flooder saw no cookie reply"
    );
    // Over the limit (100/s) every initiation needs a cookie: nearly all of the flood.
    assert!(cookies * 2 > sent, "cookie replies {cookies} of {sent}");
    // The kernel's count is the socket's (the established peer's packets too), so the
    // flood's share of it is not known exactly: what the gateway read it counted.
    assert!(
        cookies + unknown + queue_full <= sent && cookies + unknown + queue_full + kernel >= sent,
        "every flood datagram is a cookie reply, an unknown_key drop, a full-queue drop or a kernel drop: \
         {cookies} + {unknown} + {queue_full} + {kernel} vs {sent} sent ({deltas:?})"
    );
    assert_eq!(
        cookies_seen.load(Ordering::Relaxed) + flooder_drops,
        cookies,
        "every cookie reply counted reached the flooder (or its socket's kernel drops)"
    );
    assert_eq!(
        deltas.iter().map(|(_, n)| n).sum::<u64>(),
        unknown,
        "no other drop during the flood: {deltas:?}"
    );
    assert!(
        during > 0.0,
        "the established peer got nothing through during the flood"
    );
    // And it still works afterwards.
    assert!(without_after > 0.0, "the peer's session is gone");
    assert!(
        without > 0.0,
        "no baseline: the established peer got nothing through before the flood"
    );
    assert!(
        during >= FLOOD_SHARE_FLOOR * baseline,
        "the established peer kept {during:.1} Mbit/s during the flood, less than {FLOOD_SHARE_FLOOR} of the \
         {baseline:.1} Mbit/s it got without (before {without:.1}, after {without_after:.1})"
    );
    ot.stop();
    stop.store(true, Ordering::Relaxed);
    gw.assert_healthy();
}

#[test]
fn a_flood_of_real_handshakes_with_the_limit_lifted_leaves_an_established_peers_data_answered() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let net = net();
    let alice = peer([100, 64, 0, 2]);
    let flooders: Vec<(String, PeerKey)> = (0..64u8)
        .map(|i| (format!("flooder{i}"), peer([100, 64, 1, i + 2])))
        .collect();
    let mut peers: Vec<(&str, &PeerKey)> = vec![("alice", &alice)];
    peers.extend(flooders.iter().map(|(n, p)| (n.as_str(), p)));
    let gw = start_gateway_with(
        dir.path(),
        &peers,
        serde_json::json!([{"namespace": "default", "name": "web", "clusterIP": net.web.to_string(),
            "ports": [{"name": "http", "port": 80}]}]),
        // The cookie limit out of the way: every initiation costs the gateway its X25519.
        &["--handshake-limit", "1000000"],
    );
    let mut c = Client::new(&alice, &gw);
    c.connect();
    assert!(
        c.dns_works(1),
        "no DNS answer through the tunnel\n{}",
        gw.process.output_tails()
    );

    // Registered peers' initiations, each newer than its peer's last; repeated after that
    // (a repeat is a replay, which the gateway rejects after the same X25519 work).
    let mut tunns: Vec<Tunn> = flooders
        .iter()
        .enumerate()
        .map(|(i, (_, p))| p.client_tunn(gw.public, i as u32))
        .collect();
    let mut flood = Vec::new();
    let mut out = vec![0u8; 256];
    for _ in 0..20 {
        for t in tunns.iter_mut() {
            if let TunnResult::WriteToNetwork(p) = t.format_handshake_initiation(&mut out, true) {
                flood.push(p.to_vec());
            }
        }
    }
    let rate = 10_000u64;
    let flood_for = Duration::from_secs(if long() { 20 } else { 4 });
    let before = gw.metrics();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let (to, stop) = (gw.udp, stop.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            let (mut sent, mut responses, mut cookies) = (0u64, 0u64, 0u64);
            let mut buf = [0u8; 256];
            while started.elapsed() < flood_for && !stop.load(Ordering::Relaxed) {
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                while sent < due {
                    if sock.send_to(&flood[(sent % flood.len() as u64) as usize], to).is_ok() {
                        sent += 1;
                    }
                }
                while let Ok(n) = sock.recv(&mut buf) {
                    match (n, buf[0]) {
                        (92, 2) => responses += 1,
                        (64, 3) => cookies += 1,
                        _ => {}
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (sent, responses, cookies, started.elapsed())
        })
    };
    // Alice's DNS round trips while the flood lasts (each retried, see `dns_works`).
    let started = Instant::now();
    let mut answered = 0u16;
    while started.elapsed() < flood_for {
        let ok = c.dns_works(answered.wrapping_mul(8).wrapping_add(100));
        if !ok {
            stop.store(true, Ordering::Relaxed);
        }
        assert!(
            ok,
            "alice's DNS query {answered} got no answer during the flood\n{}",
            gw.process.output_tails()
        );
        answered += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let (sent, responses, cookies, took) = flooder.join().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let after = gw.metrics();
    let queue_full = handshakes_dropped(&after) - handshakes_dropped(&before);
    result(
        "real_flood.offered",
        format!(
            "{sent} initiations of 64 registered peers in {:.2} s ({:.0}/s)",
            took.as_secs_f64(),
            sent as f64 / took.as_secs_f64()
        ),
    );
    result(
        "real_flood.answered",
        format!(
            "{responses} handshake responses, {cookies} cookie replies, {queue_full} dropped by the full \
             handshake queue; alice's DNS answered {answered} times in a row; drop deltas {:?}",
            drop_deltas(&before, &after)
        ),
    );
    assert!(answered > 0, "no DNS round trip during the flood");
    assert!(
        responses > 0,
        "the handshake worker answered none of {sent} initiations"
    );
    assert!(
        responses + cookies <= sent,
        "at most one answer per initiation: {responses} + {cookies} of {sent}"
    );
    // The worker's drops for the replays are counted, the established peer has none.
    let alice_drops = |m: &Metrics| m.get("kuberaya_gateway_packets_dropped_total", "peer=\"default/alice\"");
    assert_eq!(
        alice_drops(&after),
        alice_drops(&before),
        "{:?}",
        drop_deltas(&before, &after)
    );
    assert!(c.dns_works(9_000), "alice's session is gone after the flood");
}

#[test]
fn malformed_truncated_oversized_and_replayed_datagrams_are_dropped_and_counted() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let net = net();
    let carol = peer([100, 64, 0, 4]);
    let mut gw = start_gateway(
        dir.path(),
        &[("carol", &carol)],
        serde_json::json!([{"namespace": "default", "name": "web", "clusterIP": net.web.to_string(),
            "ports": [{"name": "http", "port": 80}]}]),
    );
    let mut c = Client::new(&carol, &gw);
    c.connect();
    assert!(
        c.dns_works(1),
        "no DNS answer through the tunnel\n{}",
        gw.process.output_tails()
    );
    let reps = if long() { 10 } else { 1 };

    // A captured valid data packet, delivered once, then replayed.
    let captured = c.seal(&dns_query(carol.address, 7));
    c.sock.send_to(&captured, gw.udp).unwrap();
    assert_eq!(
        c.receive(Duration::from_secs(2), 1).len(),
        1,
        "the captured packet is answered once"
    );
    // A valid initiation and a data packet never sent, to cut and stretch.
    let mut out = vec![0u8; 256];
    let init = match c.tunn.format_handshake_initiation(&mut out, true) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("initiation"),
    };
    // A data packet of carol's session that was never sent: a fresh counter, a payload
    // that fails its tag (the captured one's counter is spent, its copies are replays).
    let fresh = {
        let mut d = captured.clone();
        d[8..16].copy_from_slice(&1_000_000u64.to_le_bytes());
        let n = d.len() - 16;
        d[16..].copy_from_slice(&random_bytes::<2048>()[..n]);
        d
    };

    let mut expected: Vec<(&str, u64)> = Vec::new();
    let mut kinds: Vec<Vec<u8>> = Vec::new();
    let mut add = |label: &'static str, ds: Vec<Vec<u8>>, kinds: &mut Vec<Vec<u8>>| {
        for _ in 0..reps {
            kinds.extend(ds.iter().cloned());
        }
        match expected.iter_mut().find(|(l, _)| *l == label) {
            Some((_, n)) => *n += (ds.len() * reps) as u64,
            None => expected.push((label, (ds.len() * reps) as u64)),
        }
    };
    // Replays of the captured packet.
    add("replayed", vec![captured.clone(); 50], &mut kinds);
    // Truncations: every length of the initiation below its size, and of the data packet
    // below its header; the data packet cut inside its payload fails its tag.
    add(
        "malformed",
        (0..init.len()).map(|n| init[..n].to_vec()).collect(),
        &mut kinds,
    );
    add("malformed", (0..32).map(|n| fresh[..n].to_vec()).collect(), &mut kinds);
    add(
        "decrypt_failed",
        (32..fresh.len()).map(|n| fresh[..n].to_vec()).collect(),
        &mut kinds,
    );
    // Oversized: a handshake message one byte too long, and data packets up to the
    // largest UDP payload.
    let mut long_init = init.clone();
    long_init.push(0);
    add("malformed", vec![long_init], &mut kinds);
    for size in [2_000usize, 9_000, 65_507] {
        let mut d = vec![0u8; size];
        d[..16].copy_from_slice(&fresh[..16]);
        d[8..16].copy_from_slice(&(2_000_000 + size as u64).to_le_bytes());
        add("decrypt_failed", vec![d], &mut kinds);
    }
    // Garbage: unknown message types, and handshake-sized messages with a wrong MAC.
    add(
        "malformed",
        (0..64u8)
            .map(|i| {
                let mut d = random_bytes::<200>()[..(i as usize * 3) % 200].to_vec();
                if let Some(t) = d.first_mut() {
                    *t = [0u8, 5, 9, 255][i as usize % 4];
                }
                d
            })
            .collect(),
        &mut kinds,
    );
    add(
        "invalid_mac",
        (0..32)
            .map(|_| {
                let mut d = init.clone();
                d[8..116].copy_from_slice(&random_bytes::<108>());
                d
            })
            .collect(),
        &mut kinds,
    );
    // Data packets for receiver indexes nobody has.
    add(
        "unknown_index",
        (0..32)
            .map(|_| {
                let mut d = fresh.clone();
                d[4..8].copy_from_slice(&(0xff00_0000u32 | u32::from(random_bytes::<1>()[0])).to_le_bytes());
                d
            })
            .collect(),
        &mut kinds,
    );

    let before = gw.metrics();
    let kernel_before = socket_drops(&gw);
    c.send_raw_paced(&kinds, 5_000);
    let want: u64 = expected.iter().map(|(_, n)| n).sum();
    assert_eq!(want, kinds.len() as u64);
    let settled = poll_until_blocking(Duration::from_secs(10), || {
        let m = gw.metrics();
        let d = drop_deltas(&before, &m);
        (d.iter().map(|(_, n)| n).sum::<u64>() + socket_drops(&gw) - kernel_before >= want).then_some(d)
    });
    let after = gw.metrics();
    let deltas = drop_deltas(&before, &after);
    let kernel = socket_drops(&gw) - kernel_before;
    result("hostile_datagrams.sent", format!("{want} ({expected:?})"));
    result(
        "hostile_datagrams.counted",
        format!("{deltas:?}, kernel drops {kernel}"),
    );
    assert!(
        settled.is_some(),
        "not every datagram counted: sent {expected:?}, counted {deltas:?}"
    );
    assert_eq!(kernel, 0, "the gateway's socket overflowed at 5,000/s");
    let mut exp: Vec<(String, u64)> = expected.iter().map(|(l, n)| (l.to_string(), *n)).collect();
    exp.sort();
    assert_eq!(deltas, exp, "each kind of datagram is counted under its own reason");
    assert_eq!(
        after.cookies(),
        before.cookies(),
        "no cookie replies: nothing here was a valid handshake"
    );

    // The peer keeps working: a real handshake (the initiation above was never sent), then DNS.
    c.sock.send_to(&init, gw.udp).unwrap();
    let _ = c.receive(Duration::from_secs(1), 1);
    assert!(c.dns_works(100), "the session broke\n{}", gw.process.output_tails());
    gw.assert_healthy();
}

#[test]
fn a_peer_spoofing_another_peers_tunnel_address_is_dropped_and_counted() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let net = net();
    let sink = UdpSocket::bind((net.web, 0)).unwrap();
    sink.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let sink_port = sink.local_addr().unwrap().port();
    let alice = peer([100, 64, 0, 2]);
    let carol = peer([100, 64, 0, 4]);
    let mut gw = start_gateway(
        dir.path(),
        &[("alice", &alice), ("carol", &carol)],
        serde_json::json!([{"namespace": "default", "name": "web", "clusterIP": net.web.to_string(),
            "ports": [{"name": "dns", "port": sink_port, "protocol": "UDP"}]}]),
    );
    let mut c = Client::new(&carol, &gw);
    c.connect();
    // Carol's own packets reach the Service.
    let mut buf = [0u8; 64];
    let mut got = None;
    for _ in 0..10 {
        c.send(&udp_packet(carol.address, net.web, 5000, sink_port, b"mine"));
        if let Ok((n, _)) = sink.recv_from(&mut buf) {
            got = Some(buf[..n].to_vec());
            break;
        }
    }
    assert_eq!(got.as_deref(), Some(&b"mine"[..]), "carol's own packet did not arrive");
    // Late copies of the retries.
    std::thread::sleep(Duration::from_millis(300));
    while sink.recv_from(&mut buf).is_ok() {}

    let n = if long() { 10_000 } else { 1_000 };
    let before = gw.metrics();
    let kernel_before = socket_drops(&gw);
    let spoofed: Vec<Vec<u8>> = (0..n)
        .map(|i| match i % 3 {
            // As alice, a peer that exists.
            0 => c.seal(&udp_packet(alice.address, net.web, 5000, sink_port, b"as alice")),
            // As the gateway itself.
            1 => c.seal(&tcp_syn(Ipv4Addr::new(100, 64, 0, 1), net.web, 5001, sink_port, i)),
            // As a tunnel address nobody has.
            _ => c.seal(&udp_packet(
                Ipv4Addr::new(100, 64, 9, 9),
                net.web,
                5000,
                sink_port,
                b"nobody",
            )),
        })
        .collect();
    c.send_raw_paced(&spoofed, 5_000);
    let counted = poll_until_blocking(Duration::from_secs(10), || {
        let d = gw.metrics().get(
            "kuberaya_gateway_packets_dropped_total",
            "peer=\"default/carol\",reason=\"spoofed\"",
        ) - before.get(
            "kuberaya_gateway_packets_dropped_total",
            "peer=\"default/carol\",reason=\"spoofed\"",
        );
        (d as u64 + socket_drops(&gw) - kernel_before >= n as u64).then_some(d as u64)
    });
    let after = gw.metrics();
    let deltas = drop_deltas(&before, &after);
    result("spoofing", format!("{n} sent, drop deltas {deltas:?}"));
    assert_eq!(socket_drops(&gw), kernel_before, "kernel drops");
    assert_eq!(
        counted,
        Some(n as u64),
        "every spoofed packet counted as spoofed for carol: {deltas:?}"
    );
    assert_eq!(deltas, vec![("spoofed".to_string(), n as u64)], "nothing else dropped");
    // Nothing spoofed reached the Service.
    let mut leaked = 0;
    while sink.recv_from(&mut buf).is_ok() {
        leaked += 1;
    }
    assert_eq!(leaked, 0, "spoofed packets reached the Service");
    // Alice's counters did not move: nothing was taken for hers.
    assert_eq!(
        after.get("kuberaya_gateway_peer_rx_bytes_total", "peer=\"default/alice\""),
        before.get("kuberaya_gateway_peer_rx_bytes_total", "peer=\"default/alice\""),
    );
    gw.assert_healthy();
}

#[test]
fn a_peer_trying_every_port_of_a_denied_service_gets_no_access_and_every_try_is_counted() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let net = net();
    // The denied Service really listens, on one port.
    let secret = TcpListener::bind((net.secret, 0)).unwrap();
    secret.set_nonblocking(true).unwrap();
    let secret_port = secret.local_addr().unwrap().port();
    let carol = peer([100, 64, 0, 4]);
    let mut gw = start_gateway(
        dir.path(),
        &[("carol", &carol)],
        serde_json::json!([
            {"namespace": "default", "name": "web", "clusterIP": net.web.to_string(),
             "ports": [{"name": "http", "port": 80}]},
            {"namespace": "default", "name": "secret", "clusterIP": net.secret.to_string(),
             "ports": [{"name": "http", "port": secret_port}]}
        ]),
    );
    let mut c = Client::new(&carol, &gw);
    c.connect();

    let before = gw.metrics();
    let kernel_before = socket_drops(&gw);
    let rate: u64 = if long() { 5_000 } else { 20_000 };
    let started = Instant::now();
    let (mut synack, mut rst, mut other) = (0u64, 0u64, 0u64);
    let mut tally = |packets: Vec<Vec<u8>>| {
        for p in packets {
            match p.get(33) {
                Some(f) if f & (SYN | ACK) == SYN | ACK => synack += 1,
                Some(f) if f & 0x04 != 0 => rst += 1,
                _ => other += 1,
            }
        }
    };
    let mut port: u32 = 1;
    while port <= 65_535 {
        let t = Instant::now();
        let last = (port + (rate / 100) as u32 - 1).min(65_535);
        let batch: Vec<Vec<u8>> = (port..=last)
            .map(|p| c.seal(&tcp_syn(carol.address, net.secret, 40_000, p as u16, p)))
            .collect();
        for d in &batch {
            c.sock.send_to(d, gw.udp).unwrap();
        }
        port = last + 1;
        // Read what came back (RSTs) without blocking the pace.
        c.sock.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        tally(c.receive(Duration::from_millis(5), usize::MAX));
        std::thread::sleep(Duration::from_millis(10).saturating_sub(t.elapsed()));
    }
    let scan = started.elapsed();
    c.sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let settled = poll_until_blocking(Duration::from_secs(20), || {
        let m = gw.metrics();
        let n = m.dropped("not_allowed") - before.dropped("not_allowed") + socket_drops(&gw) - kernel_before;
        (n >= 65_535).then_some(())
    });
    tally(c.receive(Duration::from_secs(1), usize::MAX));
    let after = gw.metrics();
    let kernel = socket_drops(&gw) - kernel_before;
    let denied = after.dropped("not_allowed") - before.dropped("not_allowed");
    let flows = after.get("kuberaya_gateway_flows_total", "verdict=\"denied\"")
        - before.get("kuberaya_gateway_flows_total", "verdict=\"denied\"");
    // Every denied flow is audited: one by one within the per-peer budget, the rest summed.
    let settled_log = poll_until_blocking(Duration::from_secs(5), || {
        let (lines, held) = audit_counts(&gw.process.stderr());
        (lines + held >= denied).then_some((lines, held))
    });
    let (audit, held) = audit_counts(&gw.process.stderr());
    let deltas = drop_deltas(&before, &after);
    result(
        "port_scan",
        format!(
            "65535 SYNs in {:.1} s: {denied} not_allowed drops, {flows} denied flows, {kernel} kernel drops, \
             {rst} RSTs back, {synack} SYN-ACKs, {other} other; {audit} 'flow denied' audit lines + {held} in \
             summaries; drops {deltas:?}",
            scan.as_secs_f64()
        ),
    );
    assert!(
        settled.is_some(),
        "not every SYN counted: {denied} + {kernel} kernel drops"
    );
    assert_eq!(synack, 0, "a denied Service port answered");
    assert!(secret.accept().is_err(), "a connection reached the denied Service");
    assert_eq!(denied + kernel, 65_535, "every SYN dropped and counted: {deltas:?}");
    assert_eq!(flows as u64, denied, "every SYN a denied flow");
    assert_eq!(
        deltas,
        vec![("not_allowed".to_string(), denied)],
        "nothing else dropped"
    );
    assert!(
        settled_log.is_some(),
        "audited {audit} one by one + {held} summed of {denied} denied"
    );
    assert_eq!(audit + held, denied, "every denied flow audited");
    // 20 lines per second per peer, the scan's seconds plus the partial ones at each end.
    let budget = 20 * (scan.as_secs() + 3);
    assert!(audit <= budget, "{audit} audit lines for one scan (budget {budget})");
    // The peer's allowed access still works.
    assert!(c.dns_works(9), "the scanner's own session broke");
    gw.assert_healthy();
}

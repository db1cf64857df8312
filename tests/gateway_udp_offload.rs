//! UDP segmentation offload on the gateway's outer socket (issue 25), with the real
//! `kuberaya-gateway` binary (userspace data plane, static files, loopback) and a WireGuard
//! client of the test's own (boringtun's `Tunn`), which can do what stock clients cannot on
//! demand: put chosen packets into one UDP GSO train. Loopback hands the train to the
//! gateway's socket (`UDP_GRO`) in one piece, as a NIC's GRO does.
//!
//! What it shows: every datagram of a GRO train is decrypted and judged on its own before
//! anything is coalesced or forwarded, so a denied packet in the middle of a train is
//! dropped (and counted) while its allowed neighbours on both sides reach their Service;
//! and with `--udp-offload false` the same train is split by the kernel and judged alike.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use kuberaya_e2e::gateway::{self, Gateway, PeerKey, StaticFiles, random_bytes, udp_packet};
use kuberaya_e2e::process::strip_ansi;
use kuberaya_e2e::wg_client::{Client, send_gso_train};
use kuberaya_e2e::{b64, poll_until_blocking};

/// The Services' UDP ports: `web` is allowed to the peer, `secret` is not.
const WEB_PORT: u16 = 7001;
const SECRET_PORT: u16 = 7002;
/// Every packet's UDP payload: one length, so that the encrypted datagrams are one size.
const PAYLOAD: usize = 200;

/// The gateway with `web` and `secret` (UDP Services) and `peers` (name, key, the Services it
/// may reach), started with `args`.
fn start_gateway(
    dir: &Path,
    peers: &[(&str, &PeerKey, &str)],
    web: Ipv4Addr,
    secret: Ipv4Addr,
    args: &[&str],
) -> Gateway {
    let key = gateway::write_key(dir, &b64(&random_bytes::<32>())).unwrap();
    let services = serde_json::json!([
        {"namespace": "default", "name": "web", "clusterIP": web.to_string(),
         "ports": [{"name": "data", "port": WEB_PORT, "protocol": "UDP"}]},
        {"namespace": "default", "name": "secret", "clusterIP": secret.to_string(),
         "ports": [{"name": "data", "port": SECRET_PORT, "protocol": "UDP"}]},
    ]);
    let entries: Vec<_> = peers
        .iter()
        .map(|(name, k, allow)| k.file_entry(name, &[allow]))
        .collect();
    let files = StaticFiles::write(dir, &entries, &services).unwrap();
    let mut cmd = gateway::command(&key);
    cmd.args(files.args()).args(args).env("RUST_LOG", "info");
    let gw = Gateway::spawn(cmd, Duration::from_secs(60)).unwrap();
    assert!(
        gw.wait_accepted(peers.len() as u64, Duration::from_secs(20)).is_some(),
        "peers not accepted\n{}",
        gw.process.output_tails()
    );
    gw
}

/// A UDP "Service" on loopback: whatever it receives within `wait`, until `want` arrived.
fn sink(addr: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    s
}

fn received(s: &UdpSocket, want: usize, wait: Duration) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + wait;
    while got.len() < want && Instant::now() < deadline {
        if let Ok(n) = s.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
    }
    got
}

fn payload(tag: &str) -> Vec<u8> {
    let mut p = tag.as_bytes().to_vec();
    p.resize(PAYLOAD, b'.');
    p
}

/// The two Services' addresses (loopback, apart from other tests') and their sinks.
struct Services {
    dir: tempfile::TempDir,
    web: Ipv4Addr,
    secret: Ipv4Addr,
    web_sink: UdpSocket,
    secret_sink: UdpSocket,
}

impl Services {
    fn new() -> Self {
        let n = kuberaya_e2e::unique_net_index();
        let (web, secret) = (Ipv4Addr::new(127, 96, n, 10), Ipv4Addr::new(127, 96, n, 11));
        Services {
            dir: tempfile::tempdir().unwrap(),
            web,
            secret,
            web_sink: sink(SocketAddr::from((web, WEB_PORT))),
            secret_sink: sink(SocketAddr::from((secret, SECRET_PORT))),
        }
    }
}

fn scenario(offload: bool) {
    let Services {
        dir,
        web,
        secret,
        web_sink,
        secret_sink,
    } = Services::new();
    let alice = PeerKey::random(Ipv4Addr::new(100, 64, 0, 2));
    let offload_arg = if offload { "true" } else { "false" };
    let mut gw = start_gateway(
        dir.path(),
        &[("alice", &alice, "web")],
        web,
        secret,
        &["--udp-offload", offload_arg],
    );
    let mut c = Client::new(&alice, &gw);
    c.connect();
    // Logged as the loop starts, so before the handshake above was answered.
    let log = strip_ansi(&gw.process.output_tails());
    assert!(
        log.contains(&format!("gso={offload}")) && log.contains(&format!("gro={offload}")),
        "the gateway says which offloads it uses\n{log}"
    );

    // Rounds of one train: allowed, denied, allowed; each allowed pair should arrive, the
    // denied packet never. A round whose allowed packets did not both arrive (a datagram
    // lost on a busy machine, say: this is UDP) is retried, a bounded number of times.
    let me = c.address;
    let mut delivered_rounds = 0;
    for round in 0..10u8 {
        let packets = [
            udp_packet(me, web, 40_000, WEB_PORT, &payload(&format!("before-{round}"))),
            udp_packet(me, secret, 40_000, SECRET_PORT, &payload(&format!("denied-{round}"))),
            udp_packet(me, web, 40_000, WEB_PORT, &payload(&format!("after-{round}"))),
        ];
        let datagrams: Vec<Vec<u8>> = packets.iter().map(|p| c.seal(p)).collect();
        assert!(datagrams.iter().all(|d| d.len() == datagrams[0].len()));
        send_gso_train(&c.sock, c.gateway, &datagrams).unwrap();
        let got = received(&web_sink, 2, Duration::from_secs(2));
        if got == vec![payload(&format!("before-{round}")), payload(&format!("after-{round}"))] {
            delivered_rounds += 1;
            if delivered_rounds == 3 {
                break;
            }
        }
    }
    assert_eq!(
        delivered_rounds,
        3,
        "both allowed packets of a train reach web\n{}",
        gw.process.output_tails()
    );
    assert!(
        received(&secret_sink, 1, Duration::from_millis(500)).is_empty(),
        "the denied packet in the middle of a train never reaches secret"
    );
    let m = poll_until_blocking(Duration::from_secs(5), || {
        let m = gw.metrics();
        (m.dropped("not_allowed") >= 3).then_some(m)
    })
    .unwrap_or_else(|| panic!("every denied packet is counted\n{}", gw.metrics()));
    let trains = m.get("kuberaya_gateway_udp_gro_trains_total", "");
    if offload {
        assert!(trains >= 3.0, "the trains arrived as GRO trains: {trains}\n{m}");
    } else {
        assert_eq!(trains, 0.0, "no GRO without offloads\n{m}");
    }
    gw.assert_healthy();
}

#[test]
fn a_denied_packet_inside_a_gro_train_is_dropped_while_its_neighbours_pass() {
    scenario(true);
}

#[test]
fn without_udp_offload_the_same_train_is_judged_alike() {
    scenario(false);
}

/// `tag-SEQ....`: the sequence number back out of a payload.
fn seq(p: &[u8], tag: &str) -> Option<u32> {
    let s = std::str::from_utf8(p).ok()?.strip_prefix(tag)?.strip_prefix('-')?;
    s.split('.').next()?.parse().ok()
}

/// Two peers send trains back to back, so that receives hold data of both, which the
/// gateway decrypts on two threads (`--decrypt-threads 2`): each peer's allowed packets
/// all arrive, in the order sent; each denied one (one per train, in the middle) is
/// dropped and counted; a forged datagram among them is rejected, its neighbours pass.
#[test]
fn data_of_several_peers_decrypted_on_several_threads_stays_in_order_and_is_judged_per_packet() {
    const TRAIN: u32 = 8;
    const DENIED_AT: u32 = 3;
    let Services {
        dir,
        web,
        secret,
        web_sink,
        secret_sink,
    } = Services::new();
    let alice = PeerKey::random(Ipv4Addr::new(100, 64, 0, 2));
    let bob = PeerKey::random(Ipv4Addr::new(100, 64, 0, 3));
    let peers = [("alice", &alice, "web"), ("bob", &bob, "secret")];
    let mut gw = start_gateway(dir.path(), &peers, web, secret, &["--decrypt-threads", "2"]);
    let (mut a, mut b) = (Client::new(&alice, &gw), Client::new(&bob, &gw));
    a.connect();
    b.connect();
    // Each sink is read round by round (a burst of every round at once could overflow
    // a sink's socket on a busy machine, and a lost datagram would fail the test).
    let (mut web_got, mut secret_got) = (Vec::new(), Vec::new());
    let allowed = (TRAIN - 1) as usize;

    // Each peer's train: allowed packets numbered in order, one denied in the middle.
    let train = |c: &mut Client, tag: &str, allowed: (Ipv4Addr, u16), denied: (Ipv4Addr, u16), round: u32| {
        let me = c.address;
        let datagrams: Vec<Vec<u8>> = (0..TRAIN)
            .map(|i| {
                let (to, port) = if i == DENIED_AT { denied } else { allowed };
                c.seal(&udp_packet(
                    me,
                    to,
                    40_000,
                    port,
                    &payload(&format!("{tag}-{}", round * TRAIN + i)),
                ))
            })
            .collect();
        send_gso_train(&c.sock, c.gateway, &datagrams).unwrap();
    };
    let (mut rounds, mut forged) = (0, 0);
    let shared = |gw: &mut Gateway| gw.metrics().get("kuberaya_gateway_decrypt_shared_runs_total", "");
    while rounds < 200 && (rounds < 10 || shared(&mut gw) < 1.0) {
        train(&mut a, "alice", (web, WEB_PORT), (secret, SECRET_PORT), rounds);
        train(&mut b, "bob", (secret, SECRET_PORT), (web, WEB_PORT), rounds);
        if rounds % 5 == 0 {
            // A datagram with alice's index whose tag does not check out.
            let mut d = a.seal(&udp_packet(a.address, web, 40_000, WEB_PORT, &payload("forged")));
            let last = d.len() - 1;
            d[last] ^= 0xff;
            a.sock.send_to(&d, a.gateway).unwrap();
            forged += 1;
        }
        web_got.extend(received(&web_sink, allowed, Duration::from_secs(2)));
        secret_got.extend(received(&secret_sink, allowed, Duration::from_secs(2)));
        rounds += 1;
    }
    // Anything late (a denied or forged packet let through would show up here).
    web_got.extend(received(&web_sink, usize::MAX, Duration::from_millis(300)));
    secret_got.extend(received(&secret_sink, usize::MAX, Duration::from_millis(300)));
    let allowed_each = rounds as usize * allowed;
    let in_order = |got: &[Vec<u8>], tag: &str| -> Vec<u32> { got.iter().filter_map(|p| seq(p, tag)).collect() };
    let alice_seen = in_order(&web_got, "alice");
    let bob_seen = in_order(&secret_got, "bob");
    let expected: Vec<u32> = (0..rounds * TRAIN).filter(|i| i % TRAIN != DENIED_AT).collect();
    assert_eq!(
        alice_seen.len(),
        allowed_each,
        "every allowed packet of alice's arrives"
    );
    assert_eq!(alice_seen, expected, "alice's packets arrive in the order sent");
    assert_eq!(bob_seen, expected, "bob's packets arrive, in the order sent");
    assert!(
        in_order(&web_got, "bob").is_empty(),
        "bob's denied packets never reach web"
    );
    assert!(
        in_order(&secret_got, "alice").is_empty(),
        "alice's denied packets never reach secret"
    );
    assert!(
        !web_got.contains(&payload("forged")),
        "the forged datagram is not delivered"
    );
    let m = gw.metrics();
    assert!(
        m.dropped("not_allowed") >= 2 * rounds as u64,
        "every denied packet is counted\n{m}"
    );
    assert!(
        m.dropped("decrypt_failed") >= forged,
        "every forged datagram is counted\n{m}"
    );
    let shared = m.get("kuberaya_gateway_decrypt_shared_runs_total", "");
    assert!(
        shared >= 1.0,
        "receives with both peers' data were decrypted on two threads ({rounds} rounds)\n{m}"
    );
    eprintln!("{rounds} rounds, {shared} runs decrypted on two threads, {forged} forged");
    gw.assert_healthy();
}

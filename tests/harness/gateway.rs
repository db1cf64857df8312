//! The real `kuberaya-gateway` binary on loopback, as the gateway tests and benches run it:
//! its command line ([`command`], with static files [`StaticFiles`] or the caller's peer
//! source), its start line read into a [`Gateway`], its `/metrics` ([`Metrics`]), test
//! peers' keys ([`PeerKey`]), `onetun` connected as one of them ([`onetun_tcp`]), a bulk
//! TCP source behind it ([`bulk_server`], [`download_mbit`]), when a peer's traffic was
//! cut ([`CutOff`]), and IP packets for a test's own WireGuard client ([`dns_query`]).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use boringtun::x25519::{PublicKey, StaticSecret};
use serde_json::{Value, json};

use crate::probe::http_get_within;
use crate::process::line_field;
use crate::sandbox::{WgPeer, free_port};
use crate::{Process, b64, b64_decode, binary, poll_until_blocking};

/// `N` bytes from `/dev/urandom`.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    fill_random(&mut b);
    b
}

/// `n` bytes from `/dev/urandom`: a payload no compressor or coincidence reproduces.
pub fn random_vec(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    fill_random(&mut b);
    b
}

fn fill_random(b: &mut [u8]) {
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(b))
        .expect("/dev/urandom");
}

/// Peer `i`'s tunnel address in 100.64.0.0/16 (the gateway is 100.64.0.1): 100.64.0.2 on.
pub fn peer_address(i: u64) -> Ipv4Addr {
    let n = i + 2;
    Ipv4Addr::new(100, 64, (n / 256) as u8, (n % 256) as u8)
}

/// A WireGuard peer of a test: its static secret, base64 public key and tunnel address.
#[derive(Clone)]
pub struct PeerKey {
    pub secret: [u8; 32],
    pub public: String,
    pub address: Ipv4Addr,
}

impl PeerKey {
    pub fn new(secret: [u8; 32], address: Ipv4Addr) -> PeerKey {
        let public = b64(PublicKey::from(&StaticSecret::from(secret)).as_bytes());
        PeerKey {
            secret,
            public,
            address,
        }
    }

    /// This peer's side of a WireGuard session with the gateway whose public key is
    /// `gateway` (boringtun's noise `Tunn`, no preshared key), with session index `index`.
    pub fn client_tunn(&self, gateway: [u8; 32], index: u32) -> boringtun::noise::Tunn {
        boringtun::noise::Tunn::new(
            StaticSecret::from(self.secret),
            PublicKey::from(gateway),
            None,
            None,
            index,
            None,
        )
    }

    /// A fresh random key.
    pub fn random(address: Ipv4Addr) -> PeerKey {
        PeerKey::new(random_bytes(), address)
    }

    /// The private key in base64, as onetun and wg take it.
    pub fn private_key(&self) -> String {
        b64(&self.secret)
    }

    /// The peer as an entry of the gateway's `--peers-file` (namespace `default`) allowed to
    /// the Services `allow`.
    pub fn file_entry(&self, name: &str, allow: &[&str]) -> Value {
        let allow: Vec<Value> = allow.iter().map(|s| json!({"service": s})).collect();
        json!({"namespace": "default", "name": name,
               "spec": {"publicKey": self.public, "address": self.address.to_string(), "allow": allow}})
    }
}

/// Writes the private key (base64) to `DIR/gw.key`; returns the path.
pub fn write_key(dir: &Path, private_key: &str) -> Result<PathBuf> {
    let path = dir.join("gw.key");
    std::fs::write(&path, private_key)?;
    Ok(path)
}

/// Static-file mode: `DIR/peers.json` and `DIR/services.json`, which the gateway re-reads
/// every 500 ms.
pub struct StaticFiles {
    pub peers: PathBuf,
    pub services: PathBuf,
}

impl StaticFiles {
    pub fn write(dir: &Path, peers: &[Value], services: &Value) -> Result<StaticFiles> {
        let files = StaticFiles {
            peers: dir.join("peers.json"),
            services: dir.join("services.json"),
        };
        files.write_peers(peers)?;
        std::fs::write(&files.services, services.to_string())?;
        Ok(files)
    }

    /// Replaces the peers file atomically (the gateway never reads half of it).
    pub fn write_peers(&self, peers: &[Value]) -> Result<()> {
        let tmp = self.peers.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(peers)?)?;
        std::fs::rename(&tmp, &self.peers)?;
        Ok(())
    }

    /// `--peers-file P --services-file S`.
    pub fn args(&self) -> Vec<OsString> {
        vec![
            "--peers-file".into(),
            self.peers.clone().into(),
            "--services-file".into(),
            self.services.clone().into(),
        ]
    }
}

/// `kuberaya-gateway` with its metrics and health endpoints on free loopback ports; where
/// it listens, its key and its peer source are the caller's to add.
pub fn base_command() -> Command {
    let mut cmd = Command::new(binary("kuberaya-gateway"));
    cmd.args([
        "--metrics-bind-address",
        "127.0.0.1:0",
        "--health-bind-address",
        "127.0.0.1:0",
    ]);
    cmd
}

/// [`base_command`] in Kubernetes mode: peers, its key Secret and its Service in
/// `namespace` of the cluster of `kubeconfig`; where it listens is the caller's to add.
pub fn kube_command(kubeconfig: &Path, namespace: &str) -> Command {
    let mut cmd = base_command();
    cmd.arg("--kubeconfig").arg(kubeconfig).args(["--namespace", namespace]);
    cmd
}

/// [`base_command`] listening on a free loopback UDP port with the private key in
/// `key_file`; the peer source (e.g. [`StaticFiles::args`]) is the caller's to add.
pub fn command(key_file: &Path) -> Command {
    let mut cmd = base_command();
    cmd.args(["--listen", "127.0.0.1:0", "--private-key-file"])
        .arg(key_file);
    cmd
}

/// A free UDP port on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port")
}

/// A running gateway and what its start line said
/// (`kuberaya-gateway listening udp=... public_key=... metrics=...`).
pub struct Gateway {
    pub process: Process,
    /// The start line.
    pub line: String,
    pub udp: SocketAddr,
    /// The public key in base64, and its bytes.
    pub public_key: String,
    pub public: [u8; 32],
    /// The metrics endpoint, `127.0.0.1:PORT`.
    pub metrics: String,
}

impl Gateway {
    /// Spawns `cmd` (a `kuberaya-gateway` command line, perhaps behind a wrapper that execs
    /// it) and waits up to `timeout` for its start line.
    pub fn spawn(cmd: Command, timeout: Duration) -> Result<Gateway> {
        let mut process = Process::spawn_command(cmd)?;
        let line = process.wait_for_stdout_line("kuberaya-gateway listening", timeout)?;
        let public_key = line_field(&line, "public_key")?;
        let public = b64_decode(&public_key)
            .context("public key")?
            .try_into()
            .map_err(|_| anyhow::anyhow!("public key length in {line:?}"))?;
        Ok(Gateway {
            udp: line_field(&line, "udp")?.parse()?,
            metrics: line_field(&line, "metrics")?,
            public_key,
            public,
            line,
            process,
        })
    }

    /// Its `/metrics` (empty when it does not answer); each read may take 5 s, as a
    /// loaded gateway's large text can.
    pub fn metrics(&self) -> Metrics {
        Metrics(http_get_within(&self.metrics, "/metrics", Duration::from_secs(5)))
    }

    /// The peers it serves (`kuberaya_gateway_peers{state="accepted"}`).
    pub fn accepted(&self) -> u64 {
        self.metrics().get("kuberaya_gateway_peers", "state=\"accepted\"") as u64
    }

    /// Waits (at most `within`) until it serves `count` peers.
    pub fn wait_accepted(&self, count: u64, within: Duration) -> Option<()> {
        poll_until_blocking(within, || (self.accepted() >= count).then_some(()))
    }

    /// The handshakes of `peer` (`namespace/name`).
    pub fn handshakes(&self, peer: &str) -> u64 {
        self.metrics()
            .get("kuberaya_gateway_peer_handshakes_total", &format!("peer=\"{peer}\"")) as u64
    }

    /// `peer` as onetun meets this gateway.
    pub fn wg_peer(&self, peer: &PeerKey) -> WgPeer {
        self.wg_peer_of(&peer.private_key(), &peer.address.to_string())
    }

    /// The peer of `private_key` (base64) at tunnel `address` as onetun meets this gateway.
    pub fn wg_peer_of(&self, private_key: &str, address: &str) -> WgPeer {
        WgPeer {
            private_key: private_key.to_string(),
            gateway_key: self.public_key.clone(),
            endpoint: self.udp.to_string(),
            address: address.to_string(),
        }
    }

    /// It still runs and never panicked.
    pub fn assert_healthy(&mut self) {
        assert!(
            self.process.is_running(),
            "the gateway exited\n{}",
            self.process.output_tails()
        );
        assert!(
            !self.process.stderr().contains("panicked"),
            "the gateway panicked\n{}",
            self.process.output_tails()
        );
    }
}

/// When traffic through a tunnel was cut: the first failure of a run of failed tries that
/// has lasted 2 s (a retransmission or a slow answer is no cut).
#[derive(Debug, Default)]
pub struct CutOff {
    first_fail: Option<Instant>,
}

impl CutOff {
    /// A try made at `at` got through (`ok`) or not; the start of the run of failures once
    /// it has lasted 2 s.
    pub fn record(&mut self, at: Instant, ok: bool) -> Option<Instant> {
        match (ok, self.first_fail) {
            (true, _) => self.first_fail = None,
            (false, None) => self.first_fail = Some(at),
            (false, Some(f)) if at.duration_since(f) >= Duration::from_secs(2) => return Some(f),
            (false, Some(_)) => {}
        }
        None
    }
}

/// A `/metrics` text of the gateway.
pub struct Metrics(pub String);

impl std::fmt::Display for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Metrics {
    /// The sum of `name` over the label sets containing `label` (every set when empty).
    pub fn get(&self, name: &str, label: &str) -> f64 {
        self.get_all(name, &[label])
    }

    /// The sum of `name` over the label sets containing every one of `labels`.
    pub fn get_all(&self, name: &str, labels: &[&str]) -> f64 {
        self.0
            .lines()
            .filter(|l| {
                l.starts_with(name)
                    && l[name.len()..].starts_with([' ', '{'])
                    && labels.iter().all(|label| l.contains(label))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Packets dropped for `reason`, every peer's.
    pub fn dropped(&self, reason: &str) -> u64 {
        self.get(
            "kuberaya_gateway_packets_dropped_total",
            &format!("reason=\"{reason}\""),
        ) as u64
    }

    pub fn cookies(&self) -> u64 {
        self.get("kuberaya_gateway_cookie_replies_total", "") as u64
    }

    /// Every drop reason with its count.
    pub fn drops(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = Vec::new();
        for l in self
            .0
            .lines()
            .filter(|l| l.starts_with("kuberaya_gateway_packets_dropped_total{"))
        {
            let Some(reason) = l.split("reason=\"").nth(1).and_then(|r| r.split('"').next()) else {
                continue;
            };
            let v = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64;
            match out.iter_mut().find(|(r, _)| r == reason) {
                Some((_, n)) => *n += v,
                None => out.push((reason.to_string(), v)),
            }
        }
        out
    }
}

/// onetun as `peer` forwarding `127.0.0.1:<free port>` to `remote` over TCP, logging
/// errors only (its per-connection lines would cost a bench CPU): the command, for the
/// caller to wrap and spawn, and the local address.
pub fn onetun_tcp(peer: &WgPeer, remote: SocketAddr) -> (Command, SocketAddr) {
    let port = free_port();
    let mut cmd = peer.onetun_command(port, &format!("{remote}:TCP"));
    cmd.env("ONETUN_LOG", "error");
    (cmd, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// A TCP server on `ip` streaming zeros to each of its first `connections` connections
/// until the client closes its side (EOF, as a server that reads would see it), the
/// connection fails, or `stop` (at most 60 s each). Without the EOF check a closed
/// download's flow kept streaming toward a client that still accepted it (onetun keeps
/// reading a half-closed connection) and took bandwidth from the next measurement.
pub fn bulk_server(ip: Ipv4Addr, stop: Arc<AtomicBool>, connections: usize) -> Result<SocketAddr> {
    let l = TcpListener::bind((ip, 0))?;
    let a = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming().take(connections) {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Ok(mut s) = s else { continue };
            let stop = stop.clone();
            let closed = Arc::new(AtomicBool::new(false));
            if let Ok(mut r) = s.try_clone() {
                let closed = closed.clone();
                std::thread::spawn(move || {
                    let mut sink = [0u8; 4096];
                    let _ = r.set_read_timeout(Some(Duration::from_secs(60)));
                    while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
                    closed.store(true, Ordering::Relaxed);
                });
            }
            std::thread::spawn(move || {
                let chunk = vec![0u8; 64 * 1024];
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed)
                    && !closed.load(Ordering::Relaxed)
                    && started.elapsed() < Duration::from_secs(60)
                {
                    if s.write_all(&chunk).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(a)
}

/// Bytes read from `addr` for `length`, in Mbit/s (0 when it does not connect).
pub fn download_mbit(addr: SocketAddr, length: Duration) -> f64 {
    let started = Instant::now();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return 0.0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while started.elapsed() < length {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    got as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e6
}

// IP packets a test peer sends through its tunnel.

/// The Internet checksum of `chunks` laid end to end (an odd chunk padded with a zero).
pub fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for c in chunks {
        for w in c.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet (no options, TTL 64, DF) of protocol `proto` around `payload`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, 64, proto, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(&[&p]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// The IPv4 pseudo-header of a TCP or UDP checksum.
pub fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(12);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&[0, proto]);
    h.extend_from_slice(&(len as u16).to_be_bytes());
    h
}

/// An IPv4/UDP packet with its checksum.
pub fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let len = 8 + data.len();
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    let c = checksum(&[&pseudo(src, dst, 17, len), &u]);
    u[6..8].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, 17, &u)
}

/// A DNS query for `web.default.svc.cluster.local` to the gateway (100.64.0.1:53).
pub fn dns_query(src: Ipv4Addr, id: u16) -> Vec<u8> {
    let mut dns = Vec::new();
    dns.extend_from_slice(&id.to_be_bytes());
    dns.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in ["web", "default", "svc", "cluster", "local"] {
        dns.push(label.len() as u8);
        dns.extend_from_slice(label.as_bytes());
    }
    dns.extend_from_slice(&[0, 0, 1, 0, 1]);
    udp_packet(src, Ipv4Addr::new(100, 64, 0, 1), 40000, 53, &dns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_skip_the_gateway_and_file_entries_carry_key_and_allow() {
        assert_eq!(peer_address(0), Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(peer_address(254), Ipv4Addr::new(100, 64, 1, 0));
        let p = PeerKey::new([7; 32], peer_address(1));
        assert_eq!(b64_decode(&p.public).unwrap().len(), 32);
        assert_ne!(p.public, p.private_key());
        let e = p.file_entry("alice", &["web", "db"]);
        assert_eq!(e["spec"]["publicKey"], p.public.as_str());
        assert_eq!(e["spec"]["address"], "100.64.0.3");
        assert_eq!(e["spec"]["allow"][1]["service"], "db");
        assert_eq!(e["namespace"], "default");
    }

    #[test]
    fn metrics_sum_the_label_sets_that_carry_every_label() {
        let m = Metrics(
            "kuberaya_gateway_flows_total{peer=\"ns/a\",verdict=\"denied\"} 2\n\
             kuberaya_gateway_flows_total{peer=\"ns/a\",verdict=\"allowed\"} 5\n\
             kuberaya_gateway_flows_total{peer=\"ns/b\",verdict=\"denied\"} 3\n\
             kuberaya_gateway_flows_total_other{peer=\"ns/a\",verdict=\"denied\"} 9\n"
                .into(),
        );
        let flows = "kuberaya_gateway_flows_total";
        assert_eq!(m.get_all(flows, &["peer=\"ns/a\"", "verdict=\"denied\""]), 2.0);
        assert_eq!(m.get(flows, "verdict=\"denied\""), 5.0);
        assert_eq!(m.get(flows, ""), 10.0);
    }

    #[test]
    fn a_cut_is_two_seconds_of_failures_dated_from_the_first() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut c = CutOff::default();
        assert_eq!(c.record(at(0), false), None);
        assert_eq!(c.record(at(1500), true), None, "an answer ends the run");
        assert_eq!(c.record(at(1600), false), None);
        assert_eq!(c.record(at(3500), false), None);
        assert_eq!(c.record(at(3600), false), Some(at(1600)));
    }

    #[test]
    fn a_dns_query_carries_its_id_and_valid_ip_and_udp_checksums() {
        let src = Ipv4Addr::new(100, 64, 0, 2);
        let p = dns_query(src, 0xbeef);
        assert_eq!(p.len(), usize::from(u16::from_be_bytes([p[2], p[3]])));
        assert_eq!(checksum(&[&p[..20]]), 0, "IPv4 header checksum");
        assert_eq!(&p[16..20], &[100, 64, 0, 1]);
        assert_eq!(&p[22..24], &53u16.to_be_bytes());
        assert_eq!(&p[28..30], &0xbeefu16.to_be_bytes());
        let udp = &p[20..];
        assert_eq!(
            checksum(&[&pseudo(src, Ipv4Addr::new(100, 64, 0, 1), 17, udp.len()), udp]),
            0,
            "UDP checksum"
        );
    }

    #[test]
    fn metrics_sum_label_sets_and_drops_by_reason() {
        let m = Metrics(
            "# HELP x\nkuberaya_gateway_packets_dropped_total{peer=\"a\",reason=\"spoofed\"} 2\n\
             kuberaya_gateway_packets_dropped_total{peer=\"b\",reason=\"spoofed\"} 3\n\
             kuberaya_gateway_packets_dropped_total{reason=\"malformed\"} 1\n\
             kuberaya_gateway_cookie_replies_total 4\nkuberaya_gateway_cookie_replies_totalx 9\n"
                .into(),
        );
        assert_eq!(m.dropped("spoofed"), 5);
        assert_eq!(m.cookies(), 4);
        assert_eq!(m.drops(), vec![("spoofed".into(), 5), ("malformed".into(), 1)]);
        assert_eq!(m.get("kuberaya_gateway_packets_dropped_total", "peer=\"b\""), 3.0);
    }
}

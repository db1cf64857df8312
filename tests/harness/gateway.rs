//! The real `kuberaya-gateway` binary on loopback, as the gateway tests and benches run it:
//! its command line ([`command`], with static files [`StaticFiles`] or the caller's peer
//! source), its start line read into a [`Gateway`], its `/metrics` ([`Metrics`]), test
//! peers' keys ([`PeerKey`]), `onetun` connected as one of them ([`onetun_tcp`]), and a
//! bulk TCP source behind it ([`bulk_server`], [`download_mbit`]).

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
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("/dev/urandom");
    b
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
        WgPeer {
            private_key: peer.private_key(),
            gateway_key: self.public_key.clone(),
            endpoint: self.udp.to_string(),
            address: peer.address.to_string(),
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
        self.0
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']) && l.contains(label))
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
/// until it closes or `stop` (at most 60 s each).
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
            std::thread::spawn(move || {
                let chunk = vec![0u8; 64 * 1024];
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
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

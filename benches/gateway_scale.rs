//! Issue 12, gateway at scale: the real `kuberaya-gateway` binary in static-file mode
//! (`--peers-file/--services-file`, checked every 100 ms) with 10,000 peers, on loopback.
//! The load generator is a small WireGuard client built from boringtun's noise `Tunn`
//! (the measuring tool, not the system under test); the data plane is measured with the
//! stock userspace client `onetun` against a direct connection in the same run.
//!
//! Then the same peers as `VpnPeer` objects in the Kubernetes API stand-in
//! (`kuberaya-sandbox kube`, the CRD applied with `kubectl`), watched by the gateway with
//! `--kubeconfig`: time to create them, to load them all, RSS, add/remove latencies.
//!
//! Run: `cargo bench --bench gateway_scale` (sizes: see [`Sizes`], e.g.
//! `KR_BENCH_PEERS=500 KR_BENCH_TRIES=5 cargo bench --bench gateway_scale` for a smoke run;
//! `KR_BENCH_STATIC=0`, `KR_BENCH_KUBE=0` or `KR_BENCH_POLICY=0` skips a mode).
//!
//! Then (issue 23) the same peers, labelled, with `KR_BENCH_POLICIES` (1,000) access
//! policies with overlapping selectors: RSS, edit-to-enforcement, per-packet cost with 0
//! and with every policy.
//!
//! Every scenario has a timeout and reports "not reached within X" instead of hanging.

mod common;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use boringtun::noise::{Tunn, TunnResult};
use common::{cpu_time, knob, machine, median_max, peak_rss_mib, ratio, result, rss_mib, secs};
use futures::StreamExt;
use kuberaya_e2e::gateway::{self, Gateway, PeerKey, StaticFiles, dns_query, onetun_tcp, peer_address};
use kuberaya_e2e::kube_rest::KubeRest as Kube;
use kuberaya_e2e::sandbox::{find_onetun, gateway_keypair};
use kuberaya_e2e::{Process, poll_until_blocking};
use serde_json::{Value, json};

/// The sizes, from the environment; the defaults are the issue's.
#[derive(Debug, Clone)]
struct Sizes {
    /// `KR_BENCH_PEERS`: peers loaded.
    peers: u64,
    /// `KR_BENCH_TRIES`: tries of the add/remove latencies.
    tries: u64,
    /// `KR_BENCH_FLOOD_S`: length of the handshake flood.
    flood: Duration,
    /// `KR_BENCH_FLOOD_CLIENTS`: handshaking clients (threads) of the flood.
    flood_clients: u64,
    /// `KR_BENCH_FLOOD_PEERS`: distinct peers the flood clients handshake as.
    flood_peers: u64,
    /// `KR_BENCH_BULK_MB`: bytes of the single-stream transfer.
    bulk_mb: u64,
    /// `KR_BENCH_CONNS_S`: length of the connections-per-second runs.
    conns: Duration,
    /// `KR_BENCH_POLICIES`: access policies of the policy scenario.
    policies: u64,
}

impl Sizes {
    fn from_env() -> Sizes {
        Sizes {
            peers: knob("KR_BENCH_PEERS", 10_000),
            tries: knob("KR_BENCH_TRIES", 20),
            flood: Duration::from_secs(knob("KR_BENCH_FLOOD_S", 5)),
            flood_clients: knob("KR_BENCH_FLOOD_CLIENTS", 4),
            flood_peers: knob("KR_BENCH_FLOOD_PEERS", 64),
            bulk_mb: knob("KR_BENCH_BULK_MB", 64),
            conns: Duration::from_secs(knob("KR_BENCH_CONNS_S", 5)),
            policies: knob("KR_BENCH_POLICIES", 1_000),
        }
    }
}

/// A deterministic-per-run source of key bytes (xorshift seeded from the clock and pid):
/// test keys of a benchmark, not secrets.
struct KeyBytes(u64);

impl KeyBytes {
    fn new() -> KeyBytes {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        KeyBytes(t ^ (u64::from(std::process::id()) << 32) | 1)
    }

    fn next(&mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for chunk in out.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes());
        }
        out
    }
}

/// Peer `index` of the bench with the next key of `keys`.
fn new_peer(keys: &mut KeyBytes, index: u64) -> PeerKey {
    PeerKey::new(keys.next(), peer_address(index))
}

/// Peer `name`'s entry of the peers file: allowed to `web`.
fn entry(peer: &PeerKey, name: &str) -> Value {
    peer.file_entry(name, &["web"])
}

/// A WireGuard client of one peer over a UDP socket: boringtun's `Tunn`.
struct Client {
    tunn: Tunn,
    sock: UdpSocket,
    gateway: SocketAddr,
    buf: Vec<u8>,
    address: Ipv4Addr,
}

impl Client {
    fn new(peer: &PeerKey, gateway_public: &[u8; 32], gateway: SocketAddr, index: u32) -> Result<Client> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let tunn = peer.client_tunn(*gateway_public, index);
        Ok(Client {
            tunn,
            sock,
            gateway,
            buf: vec![0u8; 65536],
            address: peer.address,
        })
    }

    /// Sends a handshake initiation (forced) and waits up to `wait` for the session.
    fn handshake(&mut self, wait: Duration) -> Result<bool> {
        let mut out = vec![0u8; 2048];
        match self.tunn.format_handshake_initiation(&mut out, true) {
            TunnResult::WriteToNetwork(p) => {
                self.sock.send_to(p, self.gateway)?;
            }
            TunnResult::Err(e) => bail!("handshake initiation: {e:?}"),
            _ => {}
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let Ok(n) = self.sock.recv(&mut self.buf) else { continue };
            let datagram = self.buf[..n].to_vec();
            let mut dst = vec![0u8; 65536];
            let mut established = match self.tunn.decapsulate(None, &datagram, &mut dst) {
                TunnResult::WriteToNetwork(p) => {
                    // The keepalive that confirms the session.
                    self.sock.send_to(p, self.gateway)?;
                    true
                }
                // A handshake response without anything queued still makes a session;
                // a cookie reply does not (the next try carries mac2).
                TunnResult::Done => datagram.first() == Some(&2),
                _ => false,
            };
            // Anything else queued.
            loop {
                let mut more = vec![0u8; 2048];
                match self.tunn.decapsulate(None, &[], &mut more) {
                    TunnResult::WriteToNetwork(p) => {
                        self.sock.send_to(p, self.gateway)?;
                        established = true;
                    }
                    _ => break,
                }
            }
            if established {
                return Ok(true);
            }
            if datagram.first() == Some(&3) {
                // Cookie reply: retry at once with the cookie.
                return Ok(false);
            }
        }
        Ok(false)
    }

    /// Sends one DNS query for `web.default.svc.cluster.local` to 100.64.0.1 through the
    /// tunnel and waits up to `wait` for an answer.
    fn dns_roundtrip(&mut self, wait: Duration, id: u16) -> Result<bool> {
        let packet = dns_query(self.address, id);
        let mut out = vec![0u8; 2048];
        match self.tunn.encapsulate(&packet, &mut out) {
            TunnResult::WriteToNetwork(p) => {
                self.sock.send_to(p, self.gateway)?;
            }
            TunnResult::Err(e) => bail!("encapsulate: {e:?}"),
            _ => {}
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let Ok(n) = self.sock.recv(&mut self.buf) else { continue };
            let datagram = self.buf[..n].to_vec();
            let mut dst = vec![0u8; 65536];
            match self.tunn.decapsulate(None, &datagram, &mut dst) {
                TunnResult::WriteToTunnelV4(p, _) if p.len() > 30 && p[28..30] == id.to_be_bytes() => return Ok(true),
                TunnResult::WriteToNetwork(p) => {
                    self.sock.send_to(p, self.gateway)?;
                }
                _ => {}
            }
        }
        Ok(false)
    }
}

/// A gateway with a fresh key in `dir`, its peers from `source`, and `extra` arguments;
/// the time from spawn to its start line.
fn start_gateway(dir: &Path, source: &[OsString], extra: &[&str]) -> Result<(Gateway, Duration)> {
    let key_file = gateway::write_key(dir, &gateway_keypair().0)?;
    let started = Instant::now();
    let mut cmd = gateway::command(&key_file);
    cmd.args(source).args(extra).env("RUST_LOG", "warn");
    let gw = Gateway::spawn(common::die_with_parent(cmd), Duration::from_secs(120))?;
    Ok((gw, started.elapsed()))
}

/// Waits until the gateway reports `count` accepted peers; the time since `since`.
fn wait_loaded(gw: &Gateway, count: u64, since: Instant, timeout: Duration) -> Option<Duration> {
    gw.wait_accepted(count, timeout.saturating_sub(since.elapsed()))
        .map(|()| since.elapsed())
}

/// A TCP server on `ip`: port A sends `bulk` bytes and closes, port B answers "ok" and closes.
fn servers(ip: Ipv4Addr, bulk: u64, stop: Arc<AtomicBool>) -> Result<(SocketAddr, SocketAddr)> {
    let big = TcpListener::bind((ip, 0))?;
    let small = TcpListener::bind((ip, 0))?;
    let (a, b) = (big.local_addr()?, small.local_addr()?);
    let stop2 = stop.clone();
    std::thread::spawn(move || {
        let chunk = vec![0x5au8; 64 * 1024];
        for s in big.incoming() {
            if stop2.load(Ordering::Relaxed) {
                return;
            }
            let Ok(mut s) = s else { continue };
            std::thread::spawn({
                let chunk = chunk.clone();
                move || {
                    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
                    let mut left = bulk;
                    while left > 0 {
                        let n = left.min(chunk.len() as u64) as usize;
                        if s.write_all(&chunk[..n]).is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                }
            });
        }
    });
    std::thread::spawn(move || {
        for s in small.incoming() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if let Ok(mut s) = s {
                let _ = s.write_all(b"ok");
            }
        }
    });
    Ok((a, b))
}

/// Reads from `addr` until EOF (at most `limit`): bytes and time.
fn download(addr: SocketAddr, limit: Duration) -> Result<(u64, Duration)> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while started.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(_) => break,
        }
    }
    Ok((got, started.elapsed()))
}

/// Connections per second to `addr` (connect, read the answer to EOF, close) for `length`.
fn connections(addr: SocketAddr, length: Duration) -> (u64, u64) {
    let started = Instant::now();
    let (mut ok, mut failed) = (0, 0);
    while started.elapsed() < length {
        let done = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            Ok(out == b"ok")
        });
        match done {
            Ok(true) => ok += 1,
            _ => failed += 1,
        }
    }
    (ok, failed)
}

/// onetun as `peer`, forwarding 127.0.0.1:<free port> to `remote` over TCP; waits
/// until the forward listens (at most 20 s).
fn onetun(gw: &Gateway, peer: &PeerKey, remote: SocketAddr) -> Result<(Process, SocketAddr)> {
    let (cmd, local) = onetun_tcp(&gw.wg_peer(peer), remote);
    let p = Process::spawn_command(common::die_with_parent(cmd))?;
    let listens = poll_until_blocking(Duration::from_secs(20), || {
        TcpStream::connect_timeout(&local, Duration::from_millis(200))
            .is_ok()
            .then_some(())
    });
    if listens.is_none() {
        bail!("onetun did not listen\n{}", p.output_tails())
    }
    Ok((p, local))
}

fn mbit(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64().max(1e-9) / 1e6
}

/// A change of the peer set, made by the source under test.
enum Change<'a> {
    Add(&'a PeerKey, &'a str),
    Remove(&'a str),
}

/// Add → first handshake and remove → traffic stops, `sizes.tries` times, through
/// `change` (which adds or removes a peer at the source); prints the medians and maxima.
fn add_remove(
    gw: &Gateway,
    sizes: &Sizes,
    keys: &mut KeyBytes,
    mode: &str,
    change: &mut dyn FnMut(Change<'_>) -> Result<()>,
) -> Result<()> {
    let mut added = Vec::new();
    let mut removed = Vec::new();
    let mut failures = Vec::new();
    for t in 0..sizes.tries {
        let peer = new_peer(keys, sizes.peers + 10 + t);
        let name = format!("new{t}");
        let mut client = Client::new(&peer, &gw.public, gw.udp, 1000 + t as u32)?;
        change(Change::Add(&peer, &name))?;
        let start = Instant::now();
        let limit = Duration::from_secs(10);
        let mut ok = false;
        while start.elapsed() < limit {
            if client.handshake(Duration::from_millis(100))? {
                ok = true;
                break;
            }
        }
        if !ok {
            failures.push(format!("try {t}: no handshake within {}", secs(limit)));
            change(Change::Remove(&name))?;
            continue;
        }
        added.push(start.elapsed());
        // Traffic flows (DNS through the tunnel) before the removal.
        if !client.dns_roundtrip(Duration::from_secs(2), 1)? {
            failures.push(format!("try {t}: no DNS answer through the tunnel"));
        }
        change(Change::Remove(&name))?;
        let start = Instant::now();
        let mut last_answer = None;
        let mut unanswered_since = None;
        let mut id = 2u16;
        while start.elapsed() < limit {
            id = id.wrapping_add(1);
            let sent = start.elapsed();
            if client.dns_roundtrip(Duration::from_millis(50), id)? {
                last_answer = Some(sent);
                unanswered_since = None;
            } else if unanswered_since.is_none() {
                unanswered_since = Some(sent);
            }
            // Stopped: 1 s without an answer.
            if unanswered_since.is_some_and(|u| start.elapsed() - u > Duration::from_secs(1)) {
                break;
            }
        }
        match unanswered_since {
            Some(u) if start.elapsed() - u > Duration::from_secs(1) => removed.push(u),
            _ => failures.push(format!(
                "try {t}: traffic still answered {} after the removal (last answer at {last_answer:?})",
                secs(limit)
            )),
        }
    }
    if let Some((med, max)) = median_max(&added) {
        result(
            &format!("gateway.add_to_handshake ({} peers present, {mode})", sizes.peers),
            format!(
                "median {} max {} over {} tries (goal < 1 s)",
                secs(med),
                secs(max),
                added.len()
            ),
        );
    }
    if let Some((med, max)) = median_max(&removed) {
        result(
            &format!("gateway.remove_to_cutoff ({} peers present, {mode})", sizes.peers),
            format!(
                "median {} max {} over {} tries (goal < 2 s)",
                secs(med),
                secs(max),
                removed.len()
            ),
        );
    }
    for f in &failures {
        result(&format!("gateway.add_remove failure ({mode})"), f);
    }
    Ok(())
}

const VPNPEERS: &str = "/apis/vpn.cloudraya.com/v1alpha1/namespaces/default/vpnpeers";

fn vpnpeer(peer: &PeerKey, name: &str) -> Value {
    let mut v = entry(peer, name);
    v["apiVersion"] = json!("vpn.cloudraya.com/v1alpha1");
    v["kind"] = json!("VpnPeer");
    v["metadata"] = json!({"name": name, "namespace": "default"});
    if let Some(o) = v.as_object_mut() {
        o.remove("name");
        o.remove("namespace");
    }
    v
}

/// Kubernetes mode: `sizes.peers` VpnPeers in the API stand-in (`kuberaya-sandbox kube`),
/// created with 32 requests in flight; the gateway watches them (`--kubeconfig`) and
/// writes their status back.
fn kube_mode(sizes: &Sizes) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let net = kuberaya_e2e::unique_net_index();
    let kubeconfig = dir.path().join("kubeconfig");
    let mut cmd = kuberaya_e2e::kube_stand_in::command(&dir.path().join("kube"), &kubeconfig);
    cmd.arg("--service-cidr").arg(format!("127.{}.0.0/20", 160 + net % 64));
    let mut api_process = Process::spawn_command(common::die_with_parent(cmd))?;
    kuberaya_e2e::kube_stand_in::wait_listening(&mut api_process, Duration::from_secs(30))?;
    let crd = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["apply", "-f"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/crds/vpnpeer.yaml"))
        .output()
        .context("kubectl (the VpnPeer CRD is applied with it)")?;
    ensure!(
        crd.status.success(),
        "kubectl apply CRD: {}",
        String::from_utf8_lossy(&crd.stderr)
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let kube = Kube::from_kubeconfig(&kubeconfig)?;
    // The gateway's namespace, as deploy/ creates it: its leader-election Lease lives there.
    rt.block_on(kube.create(
        "/api/v1/namespaces",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kuberaya-system"}}),
    ))?;
    rt.block_on(kube.create(
        "/api/v1/namespaces/default/services",
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
                "spec": {"ports": [{"name": "http", "port": 80}]}}),
    ))?;

    let mut keys = KeyBytes::new();
    let peers: Vec<PeerKey> = (0..sizes.peers).map(|i| new_peer(&mut keys, i)).collect();
    let created = Instant::now();
    let api_cpu0 = cpu_time(api_process.pid()).unwrap_or_default();
    let kube_ref = &kube;
    let results: Vec<Result<()>> = rt.block_on(
        futures::stream::iter(peers.iter().enumerate())
            .map(|(i, p)| async move { kube_ref.create(VPNPEERS, &vpnpeer(p, &format!("p{i}"))).await })
            .buffer_unordered(32)
            .collect(),
    );
    let create_t = created.elapsed();
    let errors = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
        result("gateway.kube.create failure", format!("{errors} failed, e.g. {e:#}"));
    }
    result(
        &format!("gateway.kube.create ({} VpnPeers, 32 in flight)", sizes.peers),
        format!(
            "{} ({:.0}/s; API stand-in CPU {:.1} s)",
            secs(create_t),
            sizes.peers as f64 / create_t.as_secs_f64(),
            cpu_time(api_process.pid())
                .unwrap_or_default()
                .saturating_sub(api_cpu0)
                .as_secs_f64()
        ),
    );

    let source: Vec<OsString> = vec!["--kubeconfig".into(), kubeconfig.clone().into()];
    let spawned = Instant::now();
    let api_cpu0 = cpu_time(api_process.pid()).unwrap_or_default();
    let (gw, listening) = start_gateway(dir.path(), &source, &[])?;
    let pid = gw.process.pid();
    let load = wait_loaded(&gw, sizes.peers, spawned, Duration::from_secs(300));
    let gw_cpu = cpu_time(pid).unwrap_or_default();
    let api_cpu = cpu_time(api_process.pid()).unwrap_or_default().saturating_sub(api_cpu0);
    std::thread::sleep(Duration::from_millis(500));
    let rss = rss_mib(pid).unwrap_or(0.0);
    result(
        &format!("gateway.load ({} VpnPeers, Kubernetes)", sizes.peers),
        match load {
            Some(t) => format!(
                "{} from spawn until all accepted ({} to listening); CPU gateway {:.1} s, API stand-in {:.1} s; {}",
                secs(t),
                secs(listening),
                gw_cpu.as_secs_f64(),
                api_cpu.as_secs_f64(),
                common::load_average()
            ),
            None => "not reached within 300 s".into(),
        },
    );
    result(
        &format!("gateway.rss ({} VpnPeers, Kubernetes)", sizes.peers),
        format!(
            "{rss:.1} MiB VmRSS (goal < 100 MiB), peak {:.1} MiB",
            peak_rss_mib(pid).unwrap_or(0.0)
        ),
    );
    add_remove(&gw, sizes, &mut keys, "Kubernetes", &mut |change| {
        rt.block_on(async {
            match change {
                Change::Add(peer, name) => kube.create(VPNPEERS, &vpnpeer(peer, name)).await,
                Change::Remove(name) => kube.delete(&format!("{VPNPEERS}/{name}")).await,
            }
        })
    })?;
    result(
        &format!("gateway.rss after the tries ({} VpnPeers, Kubernetes)", sizes.peers),
        format!(
            "{:.1} MiB VmRSS, peak {:.1} MiB; {}",
            rss_mib(pid).unwrap_or(0.0),
            peak_rss_mib(pid).unwrap_or(0.0),
            common::load_average()
        ),
    );
    drop(gw);
    api_process.stop();
    Ok(())
}

fn main() -> Result<()> {
    common::build_binaries();
    let sizes = Sizes::from_env();
    println!("gateway_scale: {sizes:?}");
    println!("{}", machine());
    if common::enabled("KR_BENCH_STATIC") {
        static_mode(&sizes)?;
    }
    if common::enabled("KR_BENCH_KUBE") {
        kube_mode(&sizes)?;
    }
    if common::enabled("KR_BENCH_POLICY") {
        policy_mode(&sizes)?;
    }
    println!("{}", common::load_average());
    Ok(())
}

/// Issue 23: `sizes.peers` labelled peers and `sizes.policies` access policies with
/// overlapping selectors (static files, checked every 100 ms): RSS, the time from a policy
/// edit to enforcement (a grant answered through onetun, a revoke refused), and the
/// per-packet cost with 0 and with every policy, in one run.
fn policy_mode(sizes: &Sizes) -> Result<()> {
    if find_onetun().is_none() {
        result("gateway.policies", "skipped: no onetun");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let net = kuberaya_e2e::unique_net_index();
    let (web_ip, secret_ip) = (Ipv4Addr::new(127, 97, net, 20), Ipv4Addr::new(127, 97, net, 21));
    let stop = Arc::new(AtomicBool::new(false));
    let (bulk, small) = servers(web_ip, sizes.bulk_mb * 1024 * 1024, stop.clone())?;
    let (_, secret) = servers(secret_ip, 0, stop.clone())?;
    let files = StaticFiles::write(
        dir.path(),
        &[],
        &json!([
            {"namespace": "default", "name": "web", "clusterIP": web_ip.to_string(),
             "ports": [{"name": "bulk", "port": bulk.port()}, {"name": "small", "port": small.port()}]},
            {"namespace": "default", "name": "secret", "clusterIP": secret_ip.to_string(),
             "ports": [{"name": "small", "port": secret.port()}]}
        ]),
    )?;
    // Peers in 100 teams and 7 roles; each reaches web by its own rule.
    let mut keys = KeyBytes::new();
    let peers: Vec<PeerKey> = (0..sizes.peers).map(|i| new_peer(&mut keys, i)).collect();
    let peer_json: Vec<Value> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut e = entry(p, &format!("p{i}"));
            e["labels"] = json!({"team": format!("t{}", i % 100), "role": format!("r{}", i % 7)});
            e
        })
        .collect();
    files.write_peers(&peer_json)?;
    // Overlapping policies: team j%100, half of them also by role; all grant web (which
    // every peer already reaches), so the reach is the same and only the work grows.
    let policy = |name: &str, selector: Value, service: &str| {
        json!({"namespace": "default", "name": name,
               "spec": {"peerSelector": selector, "allow": [{"service": service}]}})
    };
    let base: Vec<Value> = (0..sizes.policies)
        .map(|j| {
            let mut sel = json!({"matchLabels": {"team": format!("t{}", j % 100)}});
            if j % 2 == 1 {
                sel["matchExpressions"] = json!([{"key": "role", "operator": "In",
                    "values": [format!("r{}", j % 7), format!("r{}", (j + 3) % 7)]}]);
            }
            policy(&format!("pol{j}"), sel, "web")
        })
        .collect();
    let policies_path = dir.path().join("policies.json");
    let write_policies = |list: &[Value]| -> Result<()> {
        let tmp = policies_path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(list)?)?;
        std::fs::rename(&tmp, &policies_path)?;
        Ok(())
    };
    write_policies(&base)?;
    let mut args = files.args();
    args.extend(["--policies-file".into(), policies_path.clone().into_os_string()]);
    let spawned = Instant::now();
    let (gw, _) = start_gateway(dir.path(), &args, &[])?;
    let load = wait_loaded(&gw, sizes.peers, spawned, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(1));
    let pid = gw.process.pid();
    result(
        &format!(
            "gateway.policies.load ({} peers, {} policies)",
            sizes.peers, sizes.policies
        ),
        match load {
            Some(t) => format!(
                "{} until all accepted; {:.1} MiB VmRSS (goal < 100 MiB), peak {:.1} MiB",
                secs(t),
                rss_mib(pid).unwrap_or(0.0),
                peak_rss_mib(pid).unwrap_or(0.0)
            ),
            None => "not reached within 120 s".into(),
        },
    );

    // Per-packet cost: p0's single stream with every policy, then with none.
    let stream = |what: &str| -> Result<f64> {
        let (mut t, local) = onetun(&gw, &peers[0], bulk)?;
        let (bytes, took) = download(local, Duration::from_secs(60))?;
        t.stop();
        let m = mbit(bytes, took);
        println!(
            "  {what}: {m:.0} Mbit/s ({} MiB in {})",
            bytes / 1024 / 1024,
            secs(took)
        );
        Ok(m)
    };
    let with = stream(&format!("{} policies", sizes.policies))?;
    write_policies(&[])?;
    std::thread::sleep(Duration::from_secs(2));
    let without = stream("0 policies")?;
    result(
        "gateway.policies.tcp_single_stream (p0 through onetun)",
        format!(
            "{with:.0} Mbit/s with {} policies vs {without:.0} Mbit/s with 0 → {}",
            sizes.policies,
            ratio(with, without)
        ),
    );
    write_policies(&base)?;

    // Edit → enforcement: a grant of `secret` to p0's team, then its removal.
    let (mut t, local) = onetun(&gw, &peers[0], secret)?;
    let answers = || {
        TcpStream::connect_timeout(&local, Duration::from_millis(500))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_millis(500)))?;
                let mut out = Vec::new();
                s.read_to_end(&mut out)?;
                Ok(out == b"ok")
            })
            .unwrap_or(false)
    };
    let (mut granted, mut revoked) = (Vec::new(), Vec::new());
    for i in 0..sizes.tries {
        let mut list = base.clone();
        list.push(policy(
            &format!("grant{i}"),
            json!({"matchLabels": {"team": "t0"}}),
            "secret",
        ));
        let t0 = Instant::now();
        write_policies(&list)?;
        if poll_until_blocking(Duration::from_secs(10), || answers().then_some(())).is_some() {
            granted.push(t0.elapsed());
        }
        let t0 = Instant::now();
        write_policies(&base)?;
        if poll_until_blocking(Duration::from_secs(10), || (!answers()).then_some(())).is_some() {
            revoked.push(t0.elapsed());
        }
    }
    t.stop();
    let show = |v: &[Duration]| match median_max(v) {
        Some((m, x)) => format!("median {}, max {} ({} of {})", secs(m), secs(x), v.len(), sizes.tries),
        None => "never".into(),
    };
    result(
        "gateway.policies.edit_to_enforcement (goal < 2 s; the file is checked every 100 ms)",
        format!("grant answered: {}; revoke refused: {}", show(&granted), show(&revoked)),
    );
    stop.store(true, Ordering::Relaxed);
    Ok(())
}

fn static_mode(sizes: &Sizes) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let net = kuberaya_e2e::unique_net_index();
    let web_ip = Ipv4Addr::new(127, 97, net, 10);
    let stop = Arc::new(AtomicBool::new(false));
    let (bulk_addr, small_addr) = servers(web_ip, sizes.bulk_mb * 1024 * 1024, stop.clone())?;
    // No peers in the file yet (the baseline below).
    let files = StaticFiles::write(
        dir.path(),
        &[],
        &json!([{"namespace": "default", "name": "web", "clusterIP": web_ip.to_string(),
                "ports": [{"name": "bulk", "port": bulk_addr.port()},
                          {"name": "small", "port": small_addr.port()}]}]),
    )?;

    // The peers: all get a key; the first `keep` are the bench's clients.
    let mut keys = KeyBytes::new();
    let peers: Vec<PeerKey> = (0..sizes.peers).map(|i| new_peer(&mut keys, i)).collect();
    let mut peer_json: Vec<Value> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| entry(p, &format!("p{i}")))
        .collect();

    // Baseline: the same gateway with no peers.
    let (gw0, listening0) = start_gateway(dir.path(), &files.args(), &[])?;
    std::thread::sleep(Duration::from_millis(500));
    let rss0 = rss_mib(gw0.process.pid()).unwrap_or(0.0);
    drop(gw0);

    // Loaded: every peer from the start.
    files.write_peers(&peer_json)?;
    let spawned = Instant::now();
    let (gw, listening) = start_gateway(dir.path(), &files.args(), &[])?;
    let load = wait_loaded(&gw, sizes.peers, spawned, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(500));
    let pid = gw.process.pid();
    let rss = rss_mib(pid).unwrap_or(0.0);
    result(
        &format!("gateway.load ({} peers, static files)", sizes.peers),
        match load {
            Some(t) => format!(
                "{} until all accepted ({} to listening; with 0 peers {} to listening → {})",
                secs(t),
                secs(listening),
                secs(listening0),
                ratio(t.as_secs_f64(), listening0.as_secs_f64())
            ),
            None => "not reached within 120 s".into(),
        },
    );
    result(
        &format!("gateway.rss ({} peers)", sizes.peers),
        format!(
            "{rss:.1} MiB VmRSS (goal < 100 MiB), peak {:.1} MiB; with 0 peers {rss0:.1} MiB → {:.0} bytes per peer",
            peak_rss_mib(pid).unwrap_or(0.0),
            (rss - rss0) * 1024.0 * 1024.0 / sizes.peers.max(1) as f64
        ),
    );

    // Add → first handshake, remove → traffic stops; `tries` times each.
    add_remove(&gw, sizes, &mut keys, "static files", &mut |change| {
        match change {
            Change::Add(peer, name) => peer_json.push(entry(peer, name)),
            Change::Remove(name) => peer_json.retain(|p| p["name"] != name),
        }
        files.write_peers(&peer_json)
    })?;

    // The data plane through onetun (an established peer) against a direct connection.
    let have_onetun = find_onetun().is_some();
    let mut flow_peer_tput = None;
    if have_onetun {
        let (direct_bytes, direct_t) = download(bulk_addr, Duration::from_secs(60))?;
        let (mut t1, local) = onetun(&gw, &peers[0], bulk_addr)?;
        let (gw_cpu0, ot_cpu0) = (
            cpu_time(pid).unwrap_or_default(),
            cpu_time(t1.pid()).unwrap_or_default(),
        );
        let (tun_bytes, tun_t) = download(local, Duration::from_secs(60))?;
        let gw_cpu = cpu_time(pid).unwrap_or_default().saturating_sub(gw_cpu0);
        let ot_cpu = cpu_time(t1.pid()).unwrap_or_default().saturating_sub(ot_cpu0);
        let (direct_mbit, tun_mbit) = (mbit(direct_bytes, direct_t), mbit(tun_bytes, tun_t));
        flow_peer_tput = Some(tun_mbit);
        result(
            "gateway.tcp_single_stream (onetun → gateway → server)",
            format!(
                "{tun_mbit:.0} Mbit/s ({} MiB in {}) vs direct {direct_mbit:.0} Mbit/s → {} of direct",
                tun_bytes / 1024 / 1024,
                secs(tun_t),
                ratio(tun_mbit, direct_mbit)
            ),
        );
        result(
            "gateway.tcp_single_stream.cpu",
            format!(
                "gateway {:.2} s, onetun {:.2} s over {} wall; {}",
                gw_cpu.as_secs_f64(),
                ot_cpu.as_secs_f64(),
                secs(tun_t),
                common::load_average()
            ),
        );
        t1.stop();
        let (d_ok, d_fail) = connections(small_addr, sizes.conns);
        let (mut t2, local) = onetun(&gw, &peers[1], small_addr)?;
        let (gw_cpu0, ot_cpu0) = (
            cpu_time(pid).unwrap_or_default(),
            cpu_time(t2.pid()).unwrap_or_default(),
        );
        let (o_ok, o_fail) = connections(local, sizes.conns);
        let gw_cpu = cpu_time(pid).unwrap_or_default().saturating_sub(gw_cpu0);
        let ot_cpu = cpu_time(t2.pid()).unwrap_or_default().saturating_sub(ot_cpu0);
        result(
            "gateway.connections_per_s.cpu",
            format!(
                "gateway {:.2} s, onetun {:.2} s over {}",
                gw_cpu.as_secs_f64(),
                ot_cpu.as_secs_f64(),
                secs(sizes.conns)
            ),
        );
        t2.stop();
        let per_s = |n: u64| n as f64 / sizes.conns.as_secs_f64();
        result(
            "gateway.connections_per_s (onetun → gateway → server)",
            format!(
                "{:.0}/s ({o_fail} failed) vs direct {:.0}/s ({d_fail} failed) → {} of direct",
                per_s(o_ok),
                per_s(d_ok),
                ratio(per_s(o_ok), per_s(d_ok))
            ),
        );
    } else {
        result(
            "gateway.data_plane",
            "skipped: onetun is not installed (scripts/test installs it)",
        );
    }

    // Handshake flood: `flood_clients` peers handshake in a loop; meanwhile an
    // established peer (onetun) downloads.
    // The established peer: onetun with a session before the flood starts.
    let established = if have_onetun {
        let (t3, local) = onetun(&gw, &peers[0], bulk_addr)?;
        // One short read proves the session; the transfer itself comes during the flood.
        let mut s = TcpStream::connect_timeout(&local, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut first = [0u8; 1024];
        let ok = s.read(&mut first).map(|n| n > 0).unwrap_or(false);
        drop(s);
        ok.then_some((t3, local))
    } else {
        None
    };
    let done = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicU64::new(0));
    let cookie_or_lost = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    let flood_start = Instant::now();
    let gw_cpu_flood0 = cpu_time(pid).unwrap_or_default();
    let per_client = sizes.flood_peers.div_ceil(sizes.flood_clients.max(1)).max(1) as usize;
    for c in 0..sizes.flood_clients as usize {
        // Each client cycles over peers of its own, so no per-peer limit bounds the rate.
        let mine: Vec<PeerKey> = (0..per_client)
            .map(|k| peers[(2 + c * per_client + k) % peers.len()].clone())
            .collect();
        let (done, completed, other) = (done.clone(), completed.clone(), cookie_or_lost.clone());
        let (public, udp) = (gw.public, gw.udp);
        threads.push(std::thread::spawn(move || -> Result<()> {
            let mut clients = mine
                .iter()
                .enumerate()
                .map(|(k, p)| Client::new(p, &public, udp, (5000 + c * 1000 + k) as u32))
                .collect::<Result<Vec<_>>>()?;
            let mut k = 0;
            while !done.load(Ordering::Relaxed) {
                if clients[k].handshake(Duration::from_millis(200))? {
                    completed.fetch_add(1, Ordering::Relaxed);
                } else {
                    other.fetch_add(1, Ordering::Relaxed);
                }
                k = (k + 1) % clients.len();
            }
            Ok(())
        }));
    }
    // Let the flood build up, then transfer through the established session.
    std::thread::sleep(Duration::from_millis(500));
    let during = if let Some((mut t3, local)) = established {
        let left = sizes
            .flood
            .saturating_sub(flood_start.elapsed())
            .max(Duration::from_secs(1));
        let (bytes, t) = download(local, left)?;
        t3.stop();
        Some(mbit(bytes, t))
    } else {
        None
    };
    while flood_start.elapsed() < sizes.flood {
        std::thread::sleep(Duration::from_millis(50));
    }
    done.store(true, Ordering::Relaxed);
    for t in threads {
        if let Ok(Err(e)) = t.join() {
            result("gateway.flood client failed", format!("{e:#}"));
        }
    }
    let flood_t = flood_start.elapsed();
    let gw_cpu_flood = cpu_time(pid).unwrap_or_default().saturating_sub(gw_cpu_flood0);
    result(
        &format!(
            "gateway.handshakes_per_s ({} clients over {} peers, {}, default --handshake-limit 100)",
            sizes.flood_clients,
            sizes.flood_peers,
            secs(flood_t)
        ),
        format!(
            "{:.0}/s completed ({} not completed: cookie reply or no answer within 200 ms); gateway CPU {:.2} s; {}",
            completed.load(Ordering::Relaxed) as f64 / flood_t.as_secs_f64(),
            cookie_or_lost.load(Ordering::Relaxed),
            gw_cpu_flood.as_secs_f64(),
            common::load_average()
        ),
    );
    if let (Some(d), Some(b)) = (during, flow_peer_tput) {
        result(
            "gateway.throughput_during_flood (established onetun peer)",
            format!("{d:.0} Mbit/s vs {b:.0} Mbit/s without the flood → {}", ratio(d, b)),
        );
    }
    result(
        "gateway.memory_note",
        format!(
            "size_of::<boringtun::noise::Tunn>() = {} bytes (the gateway keeps one per active peer)",
            std::mem::size_of::<Tunn>()
        ),
    );
    result(
        "gateway.peak_rss (end of run)",
        format!("{:.1} MiB", peak_rss_mib(pid).unwrap_or(0.0)),
    );
    stop.store(true, Ordering::Relaxed);
    println!("{}", common::load_average());
    Ok(())
}

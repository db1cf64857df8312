//! Gateway replicas behind a platform load balancer (issue 22), as `tests/gateway_failover.rs`
//! and `benches/gateway_failover.rs` build them: the platform stand-in with two worker VMs
//! whose private IPs are on loopback, one gateway key and one static peer set for every
//! replica, an "ok" web Service, and an LB with the gateway Service's UDP rule (`source`
//! algorithm, HTTP health check every 2 s on the replicas' health port) in front of the
//! replicas ([`Topology`]). A replica listens on its VM's IP ([`Topology::replica`]);
//! clients are `onetun` with a chosen source address, which the LB hashes ([`onetun`]),
//! each making [`RATE`] requests a second ([`Loop`]). [`kill_and_measure`] SIGKILLs a
//! replica and times the client's way back.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::gateway::{Gateway, PeerKey, StaticFiles, peer_address, write_key};
use crate::sandbox::{WgPeer, free_port, gateway_keypair};
use crate::{
    JsonApi, PlatformTarget, Process, SandboxOptions, binary, poll_until, poll_until_blocking, unique_net_index,
};

/// The gateways' WireGuard port on each "VM", and the LB's.
pub const WG_PORT: u16 = 51820;
/// The gateways' health port on each "VM" (`/healthz`).
pub const HEALTH_PORT: u16 = 18081;
/// The LB's health-check interval: a replica's state there is at most this old.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Requests per second of a client loop.
pub const RATE: u32 = 20;

/// A Service stand-in: answers "ok" to every connection, for a bounded number of them
/// (a bench's hour of loops at [`RATE`] fits).
pub fn ok_server(ip: Ipv4Addr) -> Result<SocketAddr> {
    let l = TcpListener::bind((ip, 0))?;
    let a = l.local_addr()?;
    std::thread::spawn(move || {
        for mut s in l.incoming().take(500_000).flatten() {
            let _ = s.write_all(b"ok");
        }
    });
    Ok(a)
}

/// One request through onetun's local forward: "ok" within 1 s.
pub fn request(local: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&local, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut out = Vec::new();
    s.read_to_end(&mut out).is_ok() && out == b"ok"
}

/// One request of a [`Loop`]: when it started and ended, and whether it was answered.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub start: Instant,
    pub end: Instant,
    pub ok: bool,
}

/// A client's request loop at [`RATE`] a second, until stopped (or dropped) or its time
/// is up. [`Loop::start`] makes one request at a time; [`Loop::open`] starts one every
/// period whatever the others do (as independent users would), so that an outage shows
/// as the requests it fails and its end to within a period.
pub struct Loop {
    results: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
}

/// Requests of an open loop under way at once, at most: a 1 s timeout at 20 a second
/// keeps about 20 waiting.
const MAX_IN_FLIGHT: usize = 64;

impl Loop {
    /// A loop of one request at a time, for at most 5 minutes.
    pub fn start(local: SocketAddr) -> Loop {
        Loop::run(local, Duration::from_secs(300), false)
    }

    /// A loop of one request at a time, for at most `limit`.
    pub fn start_for(local: SocketAddr, limit: Duration) -> Loop {
        Loop::run(local, limit, false)
    }

    /// An open loop (a request every period, each on a thread of its own, at most
    /// [`MAX_IN_FLIGHT`] under way), for at most `limit`.
    pub fn open(local: SocketAddr, limit: Duration) -> Loop {
        Loop::run(local, limit, true)
    }

    fn run(local: SocketAddr, limit: Duration, open: bool) -> Loop {
        let results = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (results.clone(), stop.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            let period = Duration::from_secs(1) / RATE;
            let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut next = Instant::now();
            while !s.load(Ordering::Relaxed) && started.elapsed() < limit {
                let one = {
                    let r = r.clone();
                    move || {
                        let start = Instant::now();
                        let ok = request(local);
                        r.lock().unwrap().push(Request {
                            start,
                            end: Instant::now(),
                            ok,
                        });
                    }
                };
                if !open {
                    one();
                } else if in_flight.load(Ordering::Relaxed) < MAX_IN_FLIGHT {
                    in_flight.fetch_add(1, Ordering::Relaxed);
                    let in_flight = in_flight.clone();
                    std::thread::spawn(move || {
                        one();
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                next += period;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                } else {
                    next = Instant::now();
                }
            }
        });
        Loop { results, stop }
    }

    /// The finished requests started at or after `t`, as (start, answered).
    pub fn since(&self, t: Instant) -> Vec<(Instant, bool)> {
        self.requests_since(t).iter().map(|q| (q.start, q.ok)).collect()
    }

    /// The finished requests started at or after `t`.
    pub fn requests_since(&self, t: Instant) -> Vec<Request> {
        self.results
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|q| q.start >= t)
            .collect()
    }

    /// The finished requests that failed, started in `[from, to)`.
    pub fn failed_between(&self, from: Instant, to: Instant) -> Vec<Request> {
        self.requests_since(from)
            .into_iter()
            .filter(|q| !q.ok && q.start < to)
            .collect()
    }

    /// The first successful request started after `t`, as the time from `t` to its start.
    pub fn first_ok_after(&self, t: Instant) -> Option<Duration> {
        self.requests_since(t)
            .iter()
            .filter(|q| q.ok)
            .map(|q| q.start.duration_since(t))
            .min()
    }

    /// The time from `t` to the end of the first successful request started after it:
    /// when the client was served again (a request that started before a repair may be
    /// answered after it, so its start says too little).
    pub fn served_after(&self, t: Instant) -> Option<Duration> {
        self.requests_since(t)
            .iter()
            .filter(|q| q.ok)
            .map(|q| q.end.duration_since(t))
            .min()
    }

    /// The requests under way at `t` that failed.
    pub fn failed_across(&self, t: Instant) -> usize {
        self.results
            .lock()
            .unwrap()
            .iter()
            .filter(|q| !q.ok && q.start < t && q.end > t)
            .count()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The platform stand-in, its LB in front of two VMs, and what every replica shares: the
/// key, the static files (the peers named at [`Topology::start`], each allowed to `web`)
/// and the web Service.
pub struct Topology {
    pub platform: PlatformTarget,
    pub api: JsonApi,
    /// The LB's API path, `/kubernetes/v1/clusters/C/load-balancers/ID`.
    pub lb_path: String,
    pub vm_ids: [String; 2],
    pub vm_ips: [String; 2],
    /// The LB's WireGuard address.
    pub lb: SocketAddr,
    pub web: SocketAddr,
    pub key_file: PathBuf,
    pub files: StaticFiles,
    /// One per name given to [`Topology::start`], in that order (`default/NAME`).
    pub peers: Vec<PeerKey>,
    pub dir: tempfile::TempDir,
}

impl Topology {
    /// The stand-in, the web Service, the files for peers `names`, and the LB once active.
    pub async fn start(names: &[&str]) -> Result<Topology> {
        let platform = PlatformTarget::start_sandbox(SandboxOptions {
            provisioning_delay_ms: Some(100),
            ..Default::default()
        })?;
        let api = platform.login().await?;
        let cluster = platform.cluster_id.clone();
        let vms = vms(&api, &cluster).await;
        if vms.len() < 2 {
            bail!("the stand-in's cluster has fewer than 2 worker VMs");
        }
        let field = |i: usize, f: &str| -> Result<String> {
            Ok(vms[i][f]
                .as_str()
                .with_context(|| format!("VM {i} has no {f}"))?
                .to_string())
        };
        let vm_ids = [field(0, "id")?, field(1, "id")?];
        let vm_ips = [field(0, "private_ip")?, field(1, "private_ip")?];
        let net = unique_net_index();
        let web = ok_server(Ipv4Addr::new(127, 98, net, 20))?;
        let dir = tempfile::tempdir()?;
        let key_file = write_key(dir.path(), &gateway_keypair().0)?;
        let peers: Vec<PeerKey> = (0..names.len())
            .map(|i| PeerKey::random(peer_address(i as u64)))
            .collect();
        let entries: Vec<Value> = peers
            .iter()
            .zip(names)
            .map(|(p, name)| p.file_entry(name, &["web"]))
            .collect();
        let files = StaticFiles::write(
            dir.path(),
            &entries,
            &json!([{"namespace": "default", "name": "web", "clusterIP": web.ip().to_string(),
                     "ports": [{"name": "web", "port": web.port()}]}]),
        )?;
        // The gateway Service's rule as the CCM writes it for the gateway's annotations. In
        // a cluster the LB checks kube-proxy's health check node port, which follows the
        // replica's readiness (externalTrafficPolicy Local); here it checks /readyz itself.
        let rule = json!({"name": "wireguard", "protocol": "udp", "public_port": WG_PORT, "private_port": WG_PORT,
            "algorithm": "source",
            "health_check": {"protocol": "http", "port": HEALTH_PORT, "path": "/readyz",
                             "interval_s": HEALTH_INTERVAL.as_secs(), "timeout_s": 1,
                             "healthy_threshold": 1, "unhealthy_threshold": 1}});
        let backends: Vec<Value> = vm_ids.iter().map(|id| json!({"vm_id": id})).collect();
        let a = api
            .post(
                &format!("/kubernetes/v1/clusters/{cluster}/load-balancers"),
                &json!({"name": "gateway", "labels": {"kuberaya.cloudraya.com/cluster-id": cluster},
                        "rules": [rule], "backends": backends}),
            )
            .await;
        if a.status != 201 {
            bail!("create LB: {}", a.describe());
        }
        let lb_path = format!(
            "/kubernetes/v1/clusters/{cluster}/load-balancers/{}",
            a.data()["id"].as_str().unwrap_or_default()
        );
        let lb = poll_until(Duration::from_secs(15), Duration::from_millis(100), || async {
            let a = api.get(&lb_path).await;
            (a.status == 200 && a.data()["status"] == "active").then(|| a.data().clone())
        })
        .await
        .context("the LB did not become active")?;
        let ip = lb["public_ip"]["address"].as_str().context("LB has no public IP")?;
        Ok(Topology {
            lb: SocketAddr::new(ip.parse()?, WG_PORT),
            platform,
            api,
            lb_path,
            vm_ids,
            vm_ips,
            web,
            key_file,
            files,
            peers,
            dir,
        })
    }

    /// The command of replica `i`: on VM `i`'s IP (its WireGuard and health ports there),
    /// its metrics on loopback, with or without session recovery.
    pub fn replica_command(&self, i: usize, recovery: bool) -> Command {
        let vm_ip = &self.vm_ips[i];
        let mut cmd = Command::new(binary("kuberaya-gateway"));
        cmd.args(["--metrics-bind-address", "127.0.0.1:0"])
            .args(["--health-bind-address", &format!("{vm_ip}:{HEALTH_PORT}")])
            .args(["--listen", &format!("{vm_ip}:{WG_PORT}")])
            .arg("--private-key-file")
            .arg(&self.key_file)
            .args(self.files.args())
            .args(["--session-recovery", if recovery { "true" } else { "false" }])
            .env("RUST_LOG", "info,kuberaya_gateway::tunnel=debug");
        cmd
    }

    /// Replica `i` started (see [`Topology::replica_command`]).
    pub fn replica(&self, i: usize, recovery: bool) -> Result<Gateway> {
        Gateway::spawn(self.replica_command(i, recovery), Duration::from_secs(30))
    }

    /// The LB's health state of each VM's backend (`healthy`, `unhealthy`, `unknown`; empty
    /// when the LB does not say).
    pub async fn health(&self) -> [String; 2] {
        let a = self.api.get(&self.lb_path).await;
        let entries = a.data()["health"].as_array().cloned().unwrap_or_default();
        let state = |vm: &str| {
            entries
                .iter()
                .find(|e| e["vm_id"] == vm)
                .and_then(|e| e["state"].as_str())
                .unwrap_or_default()
                .to_string()
        };
        [state(&self.vm_ids[0]), state(&self.vm_ids[1])]
    }

    /// Waits until the LB has replica `i` healthy again after a restart at `started`: at
    /// once if the LB had it down meanwhile, else once a health check has surely reached
    /// the new process (an interval and a little). The time since `started`, and whether
    /// the LB had it down; an error after `within`.
    pub async fn wait_in_rotation(&self, i: usize, started: Instant, within: Duration) -> Result<(Duration, bool)> {
        let checked = started + HEALTH_INTERVAL + Duration::from_millis(500);
        let deadline = started + within;
        let mut seen_down = false;
        loop {
            let state = &self.health().await[i];
            seen_down |= state != "healthy";
            if state == "healthy" && (seen_down || Instant::now() >= checked) {
                return Ok((started.elapsed(), seen_down));
            }
            if Instant::now() >= deadline {
                bail!("replica {i} not healthy in the LB within {within:?}: {state}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn vms(api: &JsonApi, cluster_id: &str) -> Vec<Value> {
    let a = api
        .get(&format!(
            "/vm/v1/instances?label=kuberaya.cloudraya.com/cluster-id={cluster_id}&per_page=100"
        ))
        .await;
    let mut items = a.data()["items"].as_array().cloned().unwrap_or_default();
    items.sort_by_key(|v| v["name"].as_str().unwrap_or_default().to_string());
    items
}

/// The command of onetun as `peer` through `endpoint`, its UDP socket bound to `source`
/// (which the LB's `source` algorithm hashes), forwarding a local port to `remote`; and
/// that local address.
pub fn onetun_command(
    peer: &PeerKey,
    gateway_key: &str,
    endpoint: SocketAddr,
    source: Ipv4Addr,
    remote: SocketAddr,
) -> (Command, SocketAddr) {
    let wg = WgPeer {
        private_key: peer.private_key(),
        gateway_key: gateway_key.to_string(),
        endpoint: endpoint.to_string(),
        address: peer.address.to_string(),
    };
    let port = free_port();
    let mut cmd = wg.onetun_command(port, &format!("{remote}:TCP"));
    cmd.args(["--endpoint-bind-addr", &format!("{source}:0")])
        .env("ONETUN_LOG", "error");
    (cmd, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// [`onetun_command`] started.
pub fn onetun(
    peer: &PeerKey,
    gateway_key: &str,
    endpoint: SocketAddr,
    source: Ipv4Addr,
    remote: SocketAddr,
) -> (Process, SocketAddr) {
    let (cmd, local) = onetun_command(peer, gateway_key, endpoint, source, remote);
    (Process::spawn_command(cmd).expect("onetun starts"), local)
}

/// Each replica's handshakes of `peer` (0 for one that is down).
pub fn handshakes(replicas: &[Option<Gateway>; 2], peer: &str) -> [u64; 2] {
    [0, 1].map(|i| replicas[i].as_ref().map_or(0, |g| g.handshakes(peer)))
}

/// The replica where `peer` handshook since `before` was read, if exactly one (the
/// per-peer metrics are refreshed every second: waits up to 3 s for them).
pub fn landed(replicas: &[Option<Gateway>; 2], peer: &str, before: [u64; 2]) -> Option<usize> {
    poll_until_blocking(Duration::from_secs(3), || {
        let now = handshakes(replicas, peer);
        let moved: Vec<usize> = (0..2).filter(|&i| now[i] > before[i]).collect();
        (moved.len() == 1).then(|| moved[0])
    })
}

/// Waits until `local` answers.
pub fn wait_answers(local: SocketAddr, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if request(local) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{local} did not answer within {within:?}")
}

/// What a kill did to a client.
#[derive(Debug, Clone, Copy)]
pub struct Failover {
    /// When the SIGKILL was sent.
    pub killed: Instant,
    /// The time from the kill to the start of the client's first successful request
    /// (None: not within the wait).
    pub back: Option<Duration>,
    /// The time from the kill to the end of that request: when the client was served
    /// again (see [`Loop::served_after`]).
    pub served: Option<Duration>,
    /// The client's failed requests started between the kill and then.
    pub lost: usize,
}

/// Kills replica `victim` (1 s into a steady state) while the client's loop runs, and
/// waits up to `wait` for the client to be served again; the replica's slot is left
/// empty.
pub fn kill_and_measure(replicas: &mut [Option<Gateway>; 2], victim: usize, client: &Loop, wait: Duration) -> Failover {
    std::thread::sleep(Duration::from_secs(1));
    let killed = Instant::now();
    if let Some(g) = replicas[victim].as_mut() {
        g.process.signal(libc::SIGKILL);
    }
    let deadline = killed + wait;
    let back = loop {
        if let Some(d) = client.first_ok_after(killed) {
            break Some(d);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let served = client.served_after(killed);
    let lost = client.since(killed).iter().filter(|(_, ok)| !ok).count();
    replicas[victim] = None;
    Failover {
        killed,
        back,
        served,
        lost,
    }
}

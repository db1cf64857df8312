//! End to end (issue 22), with the stock kernel-style client: `wireguard-go` configured
//! from a wg-quick file, in a network namespace of its own, as an operator's laptop.
//!
//! The topology, all in namespaces this test makes (root only):
//!
//! - `cluster`: the platform stand-in (its API and VMs on this namespace's loopback, the
//!   LBs' public IPs on 10.203.7.0/24, local to it), two gateway replicas with one key on
//!   the VMs' IPs, the web Service's ClusterIP 10.96.0.20 (local), and a bystander peer
//!   (onetun) on the replica the laptop is not on;
//! - `laptop`: wireguard-go (`wg0`, Endpoint = the LB's public IP), a veth to `cluster`,
//!   and a 20 requests/s loop to the ClusterIP through the tunnel.
//!
//! The replica the laptop is on is SIGKILLed: the laptop must be served again within 5 s
//! (the LB's health check moves its flow; the other replica starts a handshake at its
//! first packet), and the bystander must see nothing.
//!
//! The test drives the `cluster` side from a thread that entered that namespace (`setns`):
//! its sockets and the processes it starts are inside it.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kuberaya_e2e::bins::binary;
use kuberaya_e2e::failover::{HEALTH_PORT, WG_PORT, handshakes, landed, request};
use kuberaya_e2e::gateway::{Gateway, PeerKey, StaticFiles, write_key};
use kuberaya_e2e::netns::{self, Netns, VethEnd, in_namespaces_of, require_programs, require_root, run};
use kuberaya_e2e::sandbox::{WgPeer, free_port, gateway_keypair};
use kuberaya_e2e::wg_quick::WgQuick;
use kuberaya_e2e::{PlatformTarget, Process, SandboxOptions, poll_until_blocking};
use serde_json::{Value, json};

const PUBLIC_RANGE: &str = "10.203.7.0/24";
const SERVICE_RANGE: &str = "10.96.0.0/24";
const WEB: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 96, 0, 20)), 80);
const LAPTOP_VETH: &str = "192.0.2.2";
const CLUSTER_VETH: &str = "192.0.2.1";
const GOAL: Duration = Duration::from_secs(5);

/// Requests to `WEB` from inside the laptop's namespace, 20 a second, for at most 2 min.
struct Loop {
    results: Arc<Mutex<Vec<(Instant, bool)>>>,
    stop: Arc<AtomicBool>,
}

impl Loop {
    fn start(laptop: &Netns) -> Result<Loop> {
        let results = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (results.clone(), stop.clone());
        let name = laptop.name().to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let entered = Netns::attach(&name).enter().map_err(|e| e.to_string());
            let ok = entered.is_ok();
            let _ = tx.send(entered);
            if !ok {
                return;
            }
            let started = Instant::now();
            while !s.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                let at = Instant::now();
                let ok = request(WEB);
                r.lock().unwrap().push((at, ok));
                if let Some(wait) = Duration::from_millis(50).checked_sub(at.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        });
        rx.recv()?.map_err(|e| anyhow::anyhow!("setns into the laptop: {e}"))?;
        Ok(Loop { results, stop })
    }

    fn since(&self, t: Instant) -> Vec<(Instant, bool)> {
        self.results
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|(at, _)| *at >= t)
            .collect()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn replica(vm_ip: &str, key_file: &Path, files: &StaticFiles) -> Result<Gateway> {
    let mut cmd = Command::new(binary("kuberaya-gateway"));
    cmd.args(["--metrics-bind-address", "127.0.0.1:0"])
        .args(["--health-bind-address", &format!("{vm_ip}:{HEALTH_PORT}")])
        .args(["--listen", &format!("{vm_ip}:{WG_PORT}")])
        .arg("--private-key-file")
        .arg(key_file)
        .args(files.args());
    Gateway::spawn(cmd, Duration::from_secs(30))
}

#[test]
fn a_wireguard_go_laptop_is_served_again_within_5_s_when_its_replica_is_killed() -> Result<()> {
    require_root(
        "a_wireguard_go_laptop_is_served_again_within_5_s_when_its_replica_is_killed",
        "it creates network namespaces and a veth pair",
    );
    require_programs(&[
        ("wireguard-go", "wireguard-go"),
        ("wg", "wireguard-tools"),
        ("wg-quick", "wireguard-tools"),
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
    ]);
    // Namespaces first: dropped last, after every process inside is stopped.
    let laptop = Netns::unique("laptop")?;
    let cluster = Netns::unique("cluster")?;
    netns::veth_pair(
        VethEnd {
            ns: &laptop,
            name: "to-cluster",
            address: &format!("{LAPTOP_VETH}/24"),
        },
        VethEnd {
            ns: &cluster,
            name: "to-laptop",
            address: &format!("{CLUSTER_VETH}/24"),
        },
    )?;
    cluster.ip(["route", "add", "local", PUBLIC_RANGE, "dev", "lo"])?;
    cluster.ip(["route", "add", "local", SERVICE_RANGE, "dev", "lo"])?;
    laptop.ip(["route", "add", PUBLIC_RANGE, "via", CLUSTER_VETH])?;
    let dir = tempfile::tempdir()?;
    let client = PeerKey::random("100.64.0.2".parse()?);
    let bystander = PeerKey::random("100.64.0.3".parse()?);

    // The cluster side, from a thread inside its namespace.
    let cluster_name = cluster.name().to_string();
    let dir_path = dir.path().to_path_buf();
    let (client2, bystander2) = (client.clone(), bystander.clone());
    let laptop_name = laptop.name().to_string();
    let scenario = std::thread::spawn(move || -> Result<()> {
        Netns::attach(&cluster_name).enter()?;
        // Built after entering: its worker threads are inside the namespace too.
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        rt.block_on(cluster_side(&dir_path, &client2, &bystander2, &laptop_name))
    });
    let r = scenario
        .join()
        .map_err(|_| anyhow::anyhow!("the cluster side panicked"))?;
    drop(cluster);
    drop(laptop);
    r
}

async fn cluster_side(dir: &Path, client: &PeerKey, bystander: &PeerKey, laptop_name: &str) -> Result<()> {
    let platform = PlatformTarget::start_sandbox(SandboxOptions {
        provisioning_delay_ms: Some(100),
        public_ip_range: Some(PUBLIC_RANGE.to_string()),
        ..Default::default()
    })?;
    let api = platform.login().await?;
    let cluster_id = platform.cluster_id.clone();
    let a = api
        .get(&format!(
            "/vm/v1/instances?label=kuberaya.cloudraya.com/cluster-id={cluster_id}&per_page=100"
        ))
        .await;
    let mut vms = a.data()["items"].as_array().cloned().unwrap_or_default();
    vms.sort_by_key(|v| v["name"].as_str().unwrap_or_default().to_string());
    ensure!(vms.len() >= 2, "the stand-in's cluster has fewer than 2 worker VMs");
    let vm_ips: Vec<String> = vms[..2]
        .iter()
        .map(|v| v["private_ip"].as_str().unwrap_or_default().to_string())
        .collect();

    // The Service: answers "ok" on its ClusterIP (local to this namespace).
    let web = TcpListener::bind(WEB).context("bind the web ClusterIP")?;
    std::thread::spawn(move || {
        for mut s in web.incoming().take(10_000).flatten() {
            let _ = s.write_all(b"ok");
        }
    });
    let key_file = write_key(dir, &gateway_keypair().0)?;
    let files = StaticFiles::write(
        dir,
        &[
            client.file_entry("laptop", &["web"]),
            bystander.file_entry("bystander", &["web"]),
        ],
        &json!([{"namespace": "default", "name": "web", "clusterIP": WEB.ip().to_string(),
                 "ports": [{"name": "http", "port": WEB.port()}]}]),
    )?;
    let mut replicas: [Option<Gateway>; 2] = [
        Some(replica(&vm_ips[0], &key_file, &files)?),
        Some(replica(&vm_ips[1], &key_file, &files)?),
    ];
    let gateway_key = replicas[0].as_ref().map(|g| g.public_key.clone()).unwrap_or_default();
    let rule = json!({"name": "wireguard", "protocol": "udp", "public_port": WG_PORT, "private_port": WG_PORT,
        "algorithm": "source",
        "health_check": {"protocol": "http", "port": HEALTH_PORT, "path": "/readyz",
                         "interval_s": 2, "timeout_s": 1, "healthy_threshold": 1, "unhealthy_threshold": 1}});
    let backends: Vec<Value> = vms[..2].iter().map(|v| json!({"vm_id": v["id"]})).collect();
    let a = api
        .post(
            &format!("/kubernetes/v1/clusters/{cluster_id}/load-balancers"),
            &json!({"name": "gateway", "labels": {"kuberaya.cloudraya.com/cluster-id": cluster_id},
                    "rules": [rule], "backends": backends}),
        )
        .await;
    ensure!(a.status == 201, "create LB: {}", a.describe());
    let path = format!(
        "/kubernetes/v1/clusters/{cluster_id}/load-balancers/{}",
        a.data()["id"].as_str().unwrap_or_default()
    );
    let lb = kuberaya_e2e::poll_until(Duration::from_secs(15), Duration::from_millis(100), || async {
        let a = api.get(&path).await;
        (a.status == 200 && a.data()["status"] == "active").then(|| a.data().clone())
    })
    .await
    .context("the LB did not become active")?;
    let lb_ip = lb["public_ip"]["address"].as_str().context("no public IP")?.to_string();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The laptop: wireguard-go with a wg-quick config whose Endpoint is the LB.
    let conf = WgQuick::write(
        dir,
        "wg0.conf",
        &format!(
            "[Interface]\nPrivateKey = {}\nAddress = {}/32\n\n[Peer]\nPublicKey = {gateway_key}\nEndpoint = {lb_ip}:{WG_PORT}\nAllowedIPs = {SERVICE_RANGE}\n",
            client.private_key(),
            client.address
        ),
    )?;
    let ns = Netns::attach(laptop_name);
    let mut wg_go = ns.spawn_with_private_dir("/var/run/wireguard", &["wireguard-go", "-f", "wg0"])?;
    let wg_pid = wg_go.pid();
    poll_until_blocking(Duration::from_secs(15), || {
        run(in_namespaces_of(wg_pid, &["wg", "show", "wg0"]), Duration::from_secs(5))
            .ok()
            .filter(|o| o.status.success())
    })
    .context("wireguard-go did not come up")?;
    conf.up(&ns, wg_pid, "wg0", dir)?;
    let laptop_loop = Loop::start(&ns)?;
    let first = poll_until_blocking(Duration::from_secs(20), || {
        laptop_loop
            .since(Instant::now() - Duration::from_secs(1))
            .iter()
            .any(|(_, ok)| *ok)
            .then_some(())
    });
    if first.is_none() {
        bail!(
            "the laptop never reached web through wireguard-go\n{}",
            wg_go.output_tails()
        );
    }
    let on =
        landed(&replicas, "default/laptop", [0, 0]).context("the laptop's handshake is on neither or both replicas")?;

    // The bystander, on the other replica: onetun from this namespace, from a source the
    // LB hashes there.
    let mut by = None;
    for last in 2..40u8 {
        let before = handshakes(&replicas, "default/bystander");
        let wg = WgPeer {
            private_key: bystander.private_key(),
            gateway_key: gateway_key.clone(),
            endpoint: format!("{lb_ip}:{WG_PORT}"),
            address: bystander.address.to_string(),
        };
        let port = free_port();
        let mut cmd = wg.onetun_command(port, &format!("{WEB}:TCP"));
        cmd.args(["--endpoint-bind-addr", &format!("127.0.0.{last}:0")])
            .env("ONETUN_LOG", "error");
        let p = Process::spawn_command(cmd)?;
        let local = SocketAddr::from(([127, 0, 0, 1], port));
        let answered = poll_until_blocking(Duration::from_secs(10), || request(local).then_some(())).is_some();
        if answered && landed(&replicas, "default/bystander", before) == Some(1 - on) {
            by = Some((p, local));
            break;
        }
    }
    let (mut by_tun, by_local) = by.context("no bystander source landed on the other replica")?;
    let by_failures = Arc::new(Mutex::new((0u32, 0u32)));
    let by_stop = Arc::new(AtomicBool::new(false));
    let by_thread = {
        let (f, s) = (by_failures.clone(), by_stop.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            while !s.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                let ok = request(by_local);
                let mut g = f.lock().unwrap();
                g.0 += 1;
                g.1 += u32::from(!ok);
                drop(g);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let survivor = 1 - on;
    let by_handshakes = replicas[survivor]
        .as_ref()
        .map_or(0, |g| g.handshakes("default/bystander"));

    // The kill.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed = Instant::now();
    if let Some(g) = replicas[on].as_mut() {
        g.process.signal(libc::SIGKILL);
    }
    let back = poll_until_blocking(Duration::from_secs(30), || {
        laptop_loop
            .since(killed)
            .iter()
            .find(|(_, ok)| *ok)
            .map(|(at, _)| at.duration_since(killed))
    });
    let lost = laptop_loop.since(killed).iter().filter(|(_, ok)| !ok).count();
    std::thread::sleep(Duration::from_secs(1));
    by_stop.store(true, Ordering::Relaxed);
    let _ = by_thread.join();
    let (by_total, by_failed) = *by_failures.lock().unwrap();
    let back = back.context("the laptop was not served again within 30 s of the kill")?;
    eprintln!(
        "measured: wireguard-go laptop served again {back:?} after the kill ({lost} requests lost); bystander {by_failed} of {by_total} failed"
    );
    ensure!(back <= GOAL, "served again after {back:?}, goal {GOAL:?}");
    let survivor_gw = replicas[survivor].as_ref().context("the survivor")?;
    ensure!(by_failed == 0, "the bystander lost {by_failed} requests");
    ensure!(
        survivor_gw.handshakes("default/bystander") == by_handshakes,
        "the bystander handshook again"
    );
    ensure!(
        survivor_gw
            .metrics()
            .get("kuberaya_gateway_session_recoveries_total", "")
            >= 1.0
    );
    drop(laptop_loop);
    by_tun.stop();
    wg_go.stop();
    replicas[on] = None;
    if let Some(g) = replicas[survivor].as_mut() {
        g.assert_healthy();
    }
    drop(platform);
    Ok(())
}

//! End to end: the platform stand-in's load balancers really forward traffic.
//!
//! Two "VMs" of the stand-in each run a TCP server and a UDP server on their private IP
//! (on loopback). An LB with a round-robin rule over both must split new connections
//! evenly, stop sending to a stopped VM or to a VM whose server died (within the
//! health-check window), and forward again after the stand-in restarts.
//!
//! These need the stand-in's control API and loopback addresses, so they run against the
//! stand-in only (a real platform cannot reach servers in this process). The IPv6 test runs
//! in a network namespace of its own (root).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kuberaya_e2e::netns::{Netns, require_root};
use kuberaya_e2e::{JsonApi, PlatformTarget, SandboxOptions, poll_until};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio::time::timeout;

const BACKEND_TCP_PORT: u16 = 9000;
const BACKEND_UDP_PORT: u16 = 9001;
const STEP: Duration = Duration::from_secs(3);

/// A TCP server answering every connection with its name, and a UDP server echoing
/// `name:payload`, both on one VM's private IP.
struct Backend {
    tcp: JoinHandle<()>,
    udp: JoinHandle<()>,
}

impl Backend {
    async fn start(name: &str, ip: &str) -> Result<Backend> {
        let tcp_listener = TcpListener::bind((ip, BACKEND_TCP_PORT))
            .await
            .with_context(|| format!("bind {ip}"))?;
        let udp_socket = UdpSocket::bind((ip, BACKEND_UDP_PORT)).await?;
        let tcp_name = name.to_string();
        let tcp = tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp_listener.accept().await {
                let reply = tcp_name.clone();
                tokio::spawn(async move {
                    let _ = s.write_all(reply.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        let udp_name = name.to_string();
        let udp = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = udp_socket.recv_from(&mut buf).await {
                let mut reply = format!("{udp_name}:").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = udp_socket.send_to(&reply, from).await;
            }
        });
        Ok(Backend { tcp, udp })
    }

    /// Stop serving: the listening sockets close, so health checks fail.
    fn kill(&self) {
        self.tcp.abort();
        self.udp.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Which backend answers one new TCP connection to `addr` (None when refused).
async fn tcp_who(addr: SocketAddr) -> Option<String> {
    let mut s = timeout(STEP, TcpStream::connect(addr)).await.ok()?.ok()?;
    let mut out = String::new();
    timeout(STEP, s.read_to_string(&mut out)).await.ok()?.ok()?;
    (!out.is_empty()).then_some(out)
}

async fn tcp_spread(addr: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let who = tcp_who(addr).await.unwrap_or_else(|| "refused".into());
        *counts.entry(who).or_default() += 1;
    }
    counts
}

/// Which backend answers one datagram from a fresh client socket (a new flow).
async fn udp_who(addr: SocketAddr) -> Option<String> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.ok()?;
    sock.send_to(b"ping", addr).await.ok()?;
    let mut buf = [0u8; 1500];
    let (n, from) = timeout(Duration::from_millis(500), sock.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    assert_eq!(from, addr, "UDP replies must come from the LB's public address");
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    text.strip_suffix(":ping").map(str::to_string)
}

async fn udp_spread(addr: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let who = udp_who(addr).await.unwrap_or_else(|| "no answer".into());
        *counts.entry(who).or_default() += 1;
    }
    counts
}

#[derive(Debug, Clone, Copy)]
enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// Which backends answer `n` new connections (TCP) or flows (UDP).
    async fn spread(self, addr: SocketAddr, n: usize) -> HashMap<String, usize> {
        match self {
            Proto::Tcp => tcp_spread(addr, n).await,
            Proto::Udp => udp_spread(addr, n).await,
        }
    }
}

fn assert_even(counts: &HashMap<String, usize>, a: &str, b: &str, total: usize) {
    let (ca, cb) = (counts.get(a).copied().unwrap_or(0), counts.get(b).copied().unwrap_or(0));
    assert_eq!(
        ca + cb,
        total,
        "every connection must be answered by a backend: {counts:?}"
    );
    let low = total * 4 / 10;
    assert!(
        ca >= low && cb >= low,
        "round robin must split about evenly: {counts:?}"
    );
}

/// Poll until `n` new connections in a row all go to `only` (bounded).
async fn wait_all_to(proto: Proto, addr: SocketAddr, only: &str, n: usize) -> HashMap<String, usize> {
    let found = poll_until(Duration::from_secs(15), Duration::from_millis(200), || async {
        let counts = proto.spread(addr, n).await;
        (counts.get(only) == Some(&n)).then_some(counts)
    })
    .await;
    let last = proto.spread(addr, n).await;
    found.unwrap_or_else(|| panic!("traffic did not move entirely to {only} within 15 s; last spread {last:?}"))
}

async fn vms(api: &JsonApi, cluster_id: &str) -> Vec<Value> {
    let a = api
        .get(&format!(
            "/vm/v1/instances?label=kuberaya.cloudraya.com/cluster-id={cluster_id}&per_page=100"
        ))
        .await;
    assert_eq!(a.status, 200, "{}", a.describe());
    let mut items = a.data()["items"].as_array().cloned().unwrap_or_default();
    items.sort_by_key(|v| v["name"].as_str().unwrap_or_default().to_string());
    items
}

async fn wait_active(api: &JsonApi, path: &str) -> Result<Value> {
    poll_until(Duration::from_secs(15), Duration::from_millis(100), || async {
        let a = api.get(path).await;
        (a.status == 200 && a.data()["status"] == "active").then(|| a.data().clone())
    })
    .await
    .with_context(|| format!("{path} did not become active"))
}

fn public_addr(lb: &Value, port: u16) -> Result<SocketAddr> {
    let ip = lb["public_ip"]["address"].as_str().context("LB has no public IP")?;
    Ok(SocketAddr::new(ip.parse()?, port))
}

async fn create_lb(api: &JsonApi, cluster: &str, name: &str, rule: Value, vm_ids: &[&str]) -> Result<(String, Value)> {
    let backends: Vec<Value> = vm_ids.iter().map(|id| json!({"vm_id": id})).collect();
    let a = api
        .post(
            &format!("/kubernetes/v1/clusters/{cluster}/load-balancers"),
            &json!({"name": name, "labels": {"kuberaya.cloudraya.com/cluster-id": cluster}, "rules": [rule], "backends": backends}),
        )
        .await;
    if a.status != 201 {
        bail!("create LB: {}", a.describe());
    }
    let path = format!(
        "/kubernetes/v1/clusters/{cluster}/load-balancers/{}",
        a.data()["id"].as_str().unwrap_or_default()
    );
    let lb = wait_active(api, &path).await?;
    Ok((path, lb))
}

fn health_check() -> Value {
    // Checks every second with one failure enough: the test's "health-check window".
    json!({"protocol": "tcp", "port": BACKEND_TCP_PORT, "interval_s": 2, "timeout_s": 1, "healthy_threshold": 1, "unhealthy_threshold": 1})
}

/// Two VMs behind one round-robin rule: an even split; a stopped VM out at once and back
/// after it starts; a VM whose server died out once its health check fails; after a
/// restart of the stand-in the same LB forwards to both again.
async fn round_robin_health_and_restart(proto: Proto) -> Result<()> {
    let mut platform = PlatformTarget::start_sandbox(SandboxOptions {
        provisioning_delay_ms: Some(100),
        ..Default::default()
    })?;
    let api = platform.login().await?;
    let cluster = platform.cluster_id.clone();
    let vms = vms(&api, &cluster).await;
    assert!(vms.len() >= 2, "the stand-in's cluster has worker VMs");
    let (vm1, vm2) = (&vms[0], &vms[1]);
    let (vm1_id, vm1_ip) = (
        vm1["id"].as_str().context("id")?,
        vm1["private_ip"].as_str().context("ip")?,
    );
    let b1 = Backend::start("vm1", vm1_ip).await?;
    let _b2 = Backend::start("vm2", vm2["private_ip"].as_str().context("ip")?).await?;

    // UDP cannot be probed by connecting, so both rules check the VM's TCP port.
    let (rule, port) = match proto {
        Proto::Tcp => (
            json!({"name": "web", "protocol": "tcp", "public_port": 8080, "private_port": BACKEND_TCP_PORT, "algorithm": "round_robin", "health_check": health_check()}),
            8080,
        ),
        Proto::Udp => (
            json!({"name": "dns", "protocol": "udp", "public_port": 5353, "private_port": BACKEND_UDP_PORT, "algorithm": "round_robin", "health_check": health_check()}),
            5353,
        ),
    };
    let name = format!("fwd-{proto:?}").to_lowercase();
    let (path, lb) = create_lb(
        &api,
        &cluster,
        &name,
        rule,
        &[vm1_id, vm2["id"].as_str().context("id")?],
    )
    .await?;
    let addr = public_addr(&lb, port)?;

    // 100 connections (or flows, one per client socket) split about evenly.
    assert_even(&proto.spread(addr, 100).await, "vm1", "vm2", 100);

    // VM 1 stopped: all new connections go to VM 2.
    let ctl = platform.control_api();
    let a = ctl.post(&format!("/_sandbox/vms/{vm1_id}/stop"), &json!({})).await;
    assert_eq!(a.status, 200, "{}", a.describe());
    wait_all_to(proto, addr, "vm2", 20).await;

    // Started again: back in the rotation after its health checks pass.
    let a = ctl.post(&format!("/_sandbox/vms/{vm1_id}/start"), &json!({})).await;
    assert_eq!(a.status, 200, "{}", a.describe());
    poll_until(Duration::from_secs(15), Duration::from_millis(200), || async {
        (proto.spread(addr, 10).await.get("vm1").copied().unwrap_or(0) >= 3).then_some(())
    })
    .await
    .context("VM 1 did not come back into the rotation")?;

    // VM 1 running but its server dead: the health checks take it out. (TCP connections
    // never fail meanwhile: the LB retries the next backend when a connect fails.)
    b1.kill();
    poll_until(Duration::from_secs(10), Duration::from_millis(100), || async {
        let lb_now = api.get(&path).await;
        let unhealthy = lb_now.data()["health"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|h| h["vm_id"] == vm1_id && h["state"] == "unhealthy");
        unhealthy.then_some(())
    })
    .await
    .context("the LB never reported VM 1 unhealthy after its server died")?;
    wait_all_to(proto, addr, "vm2", 20).await;

    // The stand-in restarted: the LB is still there and forwards again, to both.
    let _b1 = Backend::start("vm1", vm1_ip).await?;
    platform.restart()?;
    let api = platform.login().await?;
    let lb_after = wait_active(&api, &path).await?;
    assert_eq!(lb_after["public_ip"], lb["public_ip"], "same public IP after a restart");
    let counts = poll_until(Duration::from_secs(15), Duration::from_millis(200), || async {
        let c = proto.spread(addr, 40).await;
        (c.get("vm1").copied().unwrap_or(0) + c.get("vm2").copied().unwrap_or(0) == 40).then_some(c)
    })
    .await
    .context("the LB does not forward after the stand-in restarted")?;
    assert_even(&counts, "vm1", "vm2", 40);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_lb_round_robin_health_and_restart() -> Result<()> {
    round_robin_health_and_restart(Proto::Tcp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_lb_round_robin_health_and_restart() -> Result<()> {
    round_robin_health_and_restart(Proto::Udp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_refuses_sources_outside_allowed_sources() -> Result<()> {
    let platform = PlatformTarget::start_sandbox(SandboxOptions {
        provisioning_delay_ms: Some(100),
        ..Default::default()
    })?;
    let api = platform.login().await?;
    let cluster = platform.cluster_id.clone();
    let vms = vms(&api, &cluster).await;
    let _b1 = Backend::start("vm1", vms[0]["private_ip"].as_str().unwrap()).await?;
    // Only 127.0.0.2 may connect; the test connects from 127.0.0.1 first.
    let rule = json!({"name": "web", "protocol": "tcp", "public_port": 8081, "private_port": BACKEND_TCP_PORT, "algorithm": "round_robin", "allowed_sources": ["127.0.0.2/32"], "health_check": health_check()});
    let (_path, lb) = create_lb(&api, &cluster, "fwd-acl", rule, &[vms[0]["id"].as_str().unwrap()]).await?;
    let addr = public_addr(&lb, 8081)?;
    assert_eq!(tcp_who(addr).await, None, "a client outside allowed_sources is refused");
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind("127.0.0.2:0".parse()?)?;
    let mut s = timeout(STEP, sock.connect(addr)).await??;
    let mut out = String::new();
    timeout(STEP, s.read_to_string(&mut out)).await??;
    assert_eq!(out, "vm1", "a client inside allowed_sources is forwarded");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// IPv6 (docs/platform-api.md, "IPv6"): in a network namespace of the test's own, never on
// the host's `lo`. The namespace gets what `kuberaya sandbox up --ip-family dual` gives the
// host: a `local` route per IPv6 range, which the stand-in serves with IPV6_FREEBIND. The
// test's own servers and clients bind addresses put on the namespace's `lo`.

const PUBLIC_V6: &str = "fd00:203::/112";
const VM_V6: &str = "fd00:10::/112";
/// IPv6 clients: one inside the allowed range of the test, one outside.
const CLIENT_V6_IN: &str = "fd00:99::5";
const CLIENT_V6_OUT: &str = "fd00:98::5";

/// A TCP server saying `name` and a UDP server echoing `name:payload` on `ip`.
async fn serve_on(name: &str, ip: IpAddr) -> Result<Backend> {
    Backend::start(name, &ip.to_string()).await
}

/// Which backend answers one new TCP connection from `from` to `addr` (None: refused).
async fn tcp_who_from(from: IpAddr, addr: SocketAddr) -> Option<String> {
    let sock = if from.is_ipv6() {
        tokio::net::TcpSocket::new_v6().ok()?
    } else {
        tokio::net::TcpSocket::new_v4().ok()?
    };
    sock.bind(SocketAddr::new(from, 0)).ok()?;
    let mut s = timeout(STEP, sock.connect(addr)).await.ok()?.ok()?;
    let mut out = String::new();
    timeout(STEP, s.read_to_string(&mut out)).await.ok()?.ok()?;
    (!out.is_empty()).then_some(out)
}

/// Which backend answers one datagram from a fresh socket on `from` (None: no answer).
async fn udp_who_from(from: IpAddr, addr: SocketAddr) -> Option<String> {
    let sock = UdpSocket::bind(SocketAddr::new(from, 0)).await.ok()?;
    sock.send_to(b"ping", addr).await.ok()?;
    let mut buf = [0u8; 1500];
    let (n, reply_from) = timeout(Duration::from_millis(500), sock.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    assert_eq!(reply_from, addr, "UDP replies must come from the LB's public address");
    String::from_utf8_lossy(&buf[..n])
        .strip_suffix(":ping")
        .map(str::to_string)
}

/// Who answers `n` new connections (TCP) or flows (UDP) from `from` to `addr`.
async fn spread_from(proto: Proto, from: IpAddr, addr: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let who = match proto {
            Proto::Tcp => tcp_who_from(from, addr).await,
            Proto::Udp => udp_who_from(from, addr).await,
        };
        *counts.entry(who.unwrap_or_else(|| "refused".into())).or_default() += 1;
    }
    counts
}

/// Runs `body` on a thread of its own inside a fresh network namespace (with a runtime
/// started there, so every socket and process of the test is inside); the namespace is
/// deleted afterwards.
fn in_test_namespace<F, Fut>(role: &str, body: F) -> Result<()>
where
    F: FnOnce(Netns) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<()>>,
{
    let ns = Netns::unique(role)?;
    ns.add_local_route(PUBLIC_V6)?;
    ns.add_local_route(VM_V6)?;
    for client in [CLIENT_V6_IN, CLIENT_V6_OUT] {
        ns.add_loopback_address(client.parse()?)?;
    }
    let name = ns.name().to_string();
    let outcome = std::thread::spawn(move || -> Result<()> {
        let inside = Netns::attach(&name);
        inside.enter()?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(body(inside))
    })
    .join();
    drop(ns);
    match outcome {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// An LB with both families: IPv4 clients reach both VMs' `private_ip`, IPv6 clients only
/// the VM with a `private_ipv6` (the other has none), on TCP and UDP; `allowed_sources`
/// with IPv4 CIDRs only refuses IPv6 clients and leaves IPv4 ones alone, an IPv6 CIDR lets
/// its clients in; all of it survives a restart of the stand-in.
async fn dual_stack_lb(ns: Netns) -> Result<()> {
    let mut platform = PlatformTarget::start_sandbox(SandboxOptions {
        provisioning_delay_ms: Some(100),
        workers: Some(2),
        public_ipv6_range: Some(PUBLIC_V6.into()),
        vm_ipv6_range: Some(VM_V6.into()),
        ..Default::default()
    })?;
    let api = platform.login().await?;
    let ctl = platform.control_api();
    let cluster = platform.cluster_id.clone();
    let vms = vms(&api, &cluster).await;
    let (vm1, vm2) = (&vms[0], &vms[1]);
    let vm1_id = vm1["id"].as_str().context("id")?.to_string();
    let vm2_id = vm2["id"].as_str().context("id")?.to_string();
    let vm1_v6: IpAddr = vm1["private_ipv6"].as_str().context("w1 has a private_ipv6")?.parse()?;
    // VM 2 without an IPv6 address: it must get no IPv6 traffic.
    let a = ctl
        .put(
            &format!("/_sandbox/vms/{vm2_id}/private-ip"),
            &json!({"private_ipv6": null}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.describe());
    assert_eq!(a.data()["private_ipv6"], Value::Null);

    let vm1_v4: IpAddr = vm1["private_ip"].as_str().context("ip")?.parse()?;
    let vm2_v4: IpAddr = vm2["private_ip"].as_str().context("ip")?.parse()?;
    // The test's servers bind the VMs' IPv6 addresses plainly: put them on lo.
    ns.add_loopback_address(vm1_v6)?;
    let _servers = [
        serve_on("vm1-v4", vm1_v4).await?,
        serve_on("vm1-v6", vm1_v6).await?,
        serve_on("vm2-v4", vm2_v4).await?,
    ];

    let rules = json!([
        {"name": "web", "protocol": "tcp", "public_port": 8080, "private_port": BACKEND_TCP_PORT, "algorithm": "round_robin", "health_check": health_check()},
        {"name": "dns", "protocol": "udp", "public_port": 5353, "private_port": BACKEND_UDP_PORT, "algorithm": "round_robin", "health_check": health_check()}
    ]);
    let backends = json!([{"vm_id": vm1_id}, {"vm_id": vm2_id}]);
    let a = api
        .post(
            &format!("/kubernetes/v1/clusters/{cluster}/load-balancers"),
            &json!({"name": "dual", "ip_versions": [4, 6], "rules": rules, "backends": backends}),
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.describe());
    let path = format!(
        "/kubernetes/v1/clusters/{cluster}/load-balancers/{}",
        a.data()["id"].as_str().context("id")?
    );
    let lb = wait_active(&api, &path).await?;
    assert_eq!(lb["ip_versions"], json!([4, 6]));
    let v6_ip: IpAddr = lb["public_ipv6"]["address"].as_str().context("public_ipv6")?.parse()?;
    let v6_range: ipnet::IpNet = PUBLIC_V6.parse()?;
    assert!(v6_range.contains(&v6_ip), "{v6_ip} is from the IPv6 pool");
    let backend_v6: Vec<&Value> = lb["backends"]
        .as_array()
        .context("backends")?
        .iter()
        .map(|b| &b["private_ipv6"])
        .collect();
    assert_eq!(backend_v6, [&json!(vm1_v6.to_string()), &Value::Null]);

    let v4_client: IpAddr = "127.0.0.1".parse()?;
    let (v6_in, v6_out): (IpAddr, IpAddr) = (CLIENT_V6_IN.parse()?, CLIENT_V6_OUT.parse()?);
    let check_both = |proto: Proto, port: u16| {
        let v4_addr = public_addr(&lb, port);
        async move {
            let v4_addr = v4_addr?;
            let v6_addr = SocketAddr::new(v6_ip, port);
            let v4 = spread_from(proto, v4_client, v4_addr, 20).await;
            assert_even(&v4, "vm1-v4", "vm2-v4", 20);
            let v6 = spread_from(proto, v6_in, v6_addr, 10).await;
            assert_eq!(
                v6.get("vm1-v6"),
                Some(&10),
                "{proto:?}: IPv6 clients go to vm1's private_ipv6 only: {v6:?}"
            );
            anyhow::Ok(())
        }
    };
    check_both(Proto::Tcp, 8080).await?;
    check_both(Proto::Udp, 5353).await?;

    // allowed_sources with IPv4 CIDRs only: IPv6 clients refused, IPv4 clients unaffected.
    let mut update = json!({"rules": rules, "backends": backends, "labels": {}});
    for r in update["rules"].as_array_mut().context("rules")? {
        r["allowed_sources"] = json!(["127.0.0.0/8"]);
    }
    put_and_wait(&api, &path, &update).await?;
    let v6_tcp = SocketAddr::new(v6_ip, 8080);
    let v6_udp = SocketAddr::new(v6_ip, 5353);
    assert_eq!(
        tcp_who_from(v6_in, v6_tcp).await,
        None,
        "IPv6 TCP client refused by IPv4-only allowed_sources"
    );
    assert_eq!(
        udp_who_from(v6_in, v6_udp).await,
        None,
        "IPv6 UDP client dropped by IPv4-only allowed_sources"
    );
    assert!(
        tcp_who_from(v4_client, public_addr(&lb, 8080)?).await.is_some(),
        "IPv4 client unaffected"
    );
    assert!(
        udp_who_from(v4_client, public_addr(&lb, 5353)?).await.is_some(),
        "IPv4 client unaffected"
    );

    // An IPv6 CIDR beside it: its clients are in, others of the family still out.
    for r in update["rules"].as_array_mut().context("rules")? {
        r["allowed_sources"] = json!(["127.0.0.0/8", "fd00:99::/64"]);
    }
    put_and_wait(&api, &path, &update).await?;
    assert_eq!(tcp_who_from(v6_in, v6_tcp).await.as_deref(), Some("vm1-v6"));
    assert_eq!(udp_who_from(v6_in, v6_udp).await.as_deref(), Some("vm1-v6"));
    assert_eq!(tcp_who_from(v6_out, v6_tcp).await, None);
    assert_eq!(udp_who_from(v6_out, v6_udp).await, None);

    // Restarted, the stand-in serves the same IPv6 address again.
    platform.restart()?;
    let api = platform.login().await?;
    let after = wait_active(&api, &path).await?;
    assert_eq!(
        after["public_ipv6"], lb["public_ipv6"],
        "same IPv6 public IP after a restart"
    );
    let back = poll_until(Duration::from_secs(15), Duration::from_millis(200), || async {
        (tcp_who_from(v6_in, v6_tcp).await.as_deref() == Some("vm1-v6")).then_some(())
    })
    .await;
    back.context("IPv6 forwarding after the stand-in restarted")?;
    assert_eq!(udp_who_from(v6_in, v6_udp).await.as_deref(), Some("vm1-v6"));
    Ok(())
}

async fn put_and_wait(api: &JsonApi, path: &str, body: &Value) -> Result<Value> {
    let a = api.put(path, body).await;
    if a.status != 200 {
        bail!("PUT {path}: {}", a.describe());
    }
    wait_active(api, path).await
}

#[test]
fn dual_stack_lb_forwards_each_family_and_filters_sources_by_family() -> Result<()> {
    require_root(
        "dual_stack_lb_forwards_each_family_and_filters_sources_by_family",
        "it creates a network namespace for the IPv6 sandbox addresses",
    );
    in_test_namespace("plat6", dual_stack_lb)
}

//! End to end with the stock WireGuard tools: `wireguard-go` and `wg` as the operator's
//! laptop, `curl`, `dig` and `iperf3` through the tunnel, and `wg show` against the
//! gateway's UAPI socket.
//!
//! The test builds its own hosts: a "laptop" and a "cluster" network namespace joined by a
//! veth pair on TEST-NET-1 (192.0.2.0/24). Inside the cluster namespace a local route makes
//! the whole Service range 10.96.0.0/16 this host's, so the fake ClusterIP servers (python's
//! http.server, iperf3) bind their ClusterIPs, and `kuberaya-gateway` runs there in static
//! files mode. Traffic never leaves the two namespaces. wireguard-go and the gateway each
//! get their own tmpfs on /var/run/wireguard (namespaces share that directory otherwise).
//!
//! Needs root; without it the tests fail with a message saying so.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kuberaya_e2e::netns::{self, Netns, VethEnd, in_namespaces_of, require_programs, require_root, run, run_ok};
use kuberaya_e2e::wg_quick::WgQuick;
use kuberaya_e2e::{Process, poll_until_blocking};

const BODY: &str = "hello from web";
const SECRET_BODY: &str = "the secret service";
/// The longest one client command (curl, dig, wg) may take.
const CMD: Duration = Duration::from_secs(15);
const LAPTOP_VETH: &str = "192.0.2.2";
const CLUSTER_VETH: &str = "192.0.2.1";
const GATEWAY_PORT: u16 = 51820;
const WEB_IP: &str = "10.96.0.10";
const SECRET_IP: &str = "10.96.0.11";
const PERF_IP: &str = "10.96.0.20";
const PERF_PORT: u16 = 5201;
/// A Service that serves a large file and answers an upload with its SHA-256.
const BULK_IP: &str = "10.96.0.30";
/// An allowed Service whose port nothing listens on: its host refuses connections.
const CLOSED_IP: &str = "10.96.0.40";
/// The bulk file: many TCP windows, so that the data plane coalesces (TUN mode) and
/// segments (both) long runs of segments.
const BULK_BYTES: usize = 24 << 20;
const PEER_ADDRESS: &str = "100.64.0.2";
const GATEWAY_TUNNEL_IP: &str = "100.64.0.1";
const SPOOFED_ADDRESS: &str = "100.64.0.99";

fn keypair() -> (String, String) {
    let out = Command::new(kuberaya_e2e::binary("kuberaya-gateway"))
        .arg("--generate-keypair")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut it = text.split_whitespace();
    (it.next().unwrap().to_string(), it.next().unwrap().to_string())
}

/// Write a file only its owner can read (keys, wg configs).
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// `key=value` from the gateway's "listening" line.
fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .to_string()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The flags of a gateway in static files mode listening on `listen`, with the files
/// they name written to `dir`: its key, and peer alice who may reach `web` and `perf`, not
/// `secret`. Metrics and health on loopback (of the gateway's namespace).
fn gateway_args(dir: &Path, gw_private: &str, peer_public: &str, listen: &str) -> Vec<String> {
    let key = write(dir, "gw.key", gw_private);
    let peers = write(
        dir,
        "peers.json",
        &serde_json::json!([{
            "namespace": "default", "name": "alice",
            "spec": {"publicKey": peer_public, "address": PEER_ADDRESS,
                     "allow": [{"service": "web"}, {"service": "perf"}, {"service": "bulk"},
                               {"service": "closed"}]}
        }])
        .to_string(),
    );
    let services = write(
        dir,
        "services.json",
        &serde_json::json!([
            {"namespace": "default", "name": "web", "clusterIP": WEB_IP,
             "ports": [{"name": "http", "port": 80}]},
            {"namespace": "default", "name": "secret", "clusterIP": SECRET_IP,
             "ports": [{"name": "http", "port": 80}]},
            {"namespace": "default", "name": "perf", "clusterIP": PERF_IP,
             "ports": [{"name": "iperf", "port": PERF_PORT}]},
            {"namespace": "default", "name": "bulk", "clusterIP": BULK_IP,
             "ports": [{"name": "http", "port": 80}]},
            {"namespace": "default", "name": "closed", "clusterIP": CLOSED_IP,
             "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}
        ])
        .to_string(),
    );
    let path = |p: PathBuf| p.to_str().unwrap().to_string();
    [
        "--listen",
        listen,
        "--private-key-file",
        &path(key),
        "--peers-file",
        &path(peers),
        "--services-file",
        &path(services),
        "--metrics-bind-address",
        "127.0.0.1:0",
        "--health-bind-address",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec()
}

/// Everything inside one namespace, at most [`CMD`]; panics when the command cannot run.
fn exec(ns: &Netns, args: &[&str]) -> std::process::Output {
    ns.exec(args, CMD).unwrap_or_else(|e| panic!("{e:#}"))
}

fn curl(ns: &Netns, extra: &[&str], url: &str) -> (bool, String) {
    let mut args = extra.to_vec();
    args.push(url);
    let out = curl_within(ns, 3, &args);
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// curl with `args`, giving up after `seconds` (the command itself gets 10 s more).
fn curl_within(ns: &Netns, seconds: u64, args: &[&str]) -> std::process::Output {
    let limit = seconds.to_string();
    let mut all = vec!["curl", "-sS", "-m", &limit];
    all.extend_from_slice(args);
    let within = Duration::from_secs(seconds + 10).max(CMD);
    ns.exec(&all, within).unwrap_or_else(|e| panic!("{e:#}"))
}

fn dig(ns: &Netns, server: &str, name: &str) -> String {
    let at = format!("@{server}");
    let out = exec(ns, &["dig", "+time=2", "+tries=2", &at, name, "A"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Serve `body` on `ip:80` inside `ns` with python's http.server; waits until it answers.
fn http_server(ns: &Netns, dir: &Path, ip: &str, body: &str) -> Process {
    let root = dir.join(ip);
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), body).unwrap();
    let p = ns
        .spawn(&[
            "python3",
            "-m",
            "http.server",
            "--bind",
            ip,
            "--directory",
            root.to_str().unwrap(),
            "80",
        ])
        .unwrap();
    let url = format!("http://{ip}/");
    let up = poll_until_blocking(Duration::from_secs(15), || {
        (curl(ns, &[], &url).1 == body).then_some(())
    });
    assert!(
        up.is_some(),
        "the fake Service on {ip} did not come up\n{}",
        p.output_tails()
    );
    p
}

/// Serve `dir` on `ip:80` inside `ns` (GET), and answer a POST with the SHA-256 of its body.
fn bulk_server(ns: &Netns, dir: &Path, ip: &str) -> Process {
    const SERVER: &str = r#"
import functools, hashlib, http.server, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    def do_POST(self):
        left, digest = int(self.headers["Content-Length"]), hashlib.sha256()
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
        body = digest.hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
handler = functools.partial(Handler, directory=sys.argv[2])
http.server.ThreadingHTTPServer((sys.argv[1], 80), handler).serve_forever()
"#;
    let p = ns.spawn(&["python3", "-c", SERVER, ip, dir.to_str().unwrap()]).unwrap();
    let url = format!("http://{ip}/");
    let up = poll_until_blocking(Duration::from_secs(15), || curl(ns, &["-d", "x"], &url).0.then_some(()));
    assert!(up.is_some(), "the bulk Service did not come up\n{}", p.output_tails());
    p
}

/// The value of the first sample of `metric` whose line contains every one of `labels`.
fn metric(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(metric) && labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Which data plane the gateway runs (`--dataplane`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plane {
    Userspace,
    Tun,
}

/// The gateway's nftables table and TUN device in TUN mode.
const NFT_TABLE: &str = "kuberaya-gateway";
const GW_TUN: &str = "kr-gw0";

#[test]
fn wireguard_go_laptop_reaches_allowed_services_by_name_and_nothing_else() {
    require_root(
        "wireguard_go_laptop_reaches_allowed_services_by_name_and_nothing_else",
        "it creates network namespaces, a veth pair, a TUN device and tmpfs mounts",
    );
    laptop_scenario(Plane::Userspace);
}

/// The same scenario with `--dataplane tun`: the kernel routes allowed packets, the
/// gateway's nftables table is set up (replacing one left by a crash) and removed on exit.
#[test]
fn wireguard_go_laptop_through_the_tun_data_plane() {
    require_root(
        "wireguard_go_laptop_through_the_tun_data_plane",
        "it creates network namespaces, a veth pair, TUN devices, nftables tables and tmpfs mounts",
    );
    let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun");
    assert!(
        tun.is_ok(),
        "the TUN data plane needs /dev/net/tun (character device 10,200, read-write for root): {:?}",
        tun.err()
    );
    require_programs(&[("nft", "nftables")]);
    laptop_scenario(Plane::Tun);
}

fn laptop_scenario(plane: Plane) {
    require_programs(&[
        ("wireguard-go", "wireguard-go"),
        ("wg", "wireguard-tools"),
        ("wg-quick", "wireguard-tools"),
        ("iperf3", "iperf3"),
        ("dig", "dnsutils"),
        ("curl", "curl"),
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("python3", "python3"),
        ("ping", "iputils-ping"),
    ]);
    let dir = tempfile::tempdir().unwrap();

    // Hosts first: dropped last, after every process below is stopped.
    let laptop = Netns::unique("laptop").unwrap();
    let cluster = Netns::unique("cluster").unwrap();
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
    )
    .unwrap();
    // The Service range is local to the cluster host: ClusterIPs bind without an address each.
    cluster
        .ip(["route", "add", "local", "10.96.0.0/16", "dev", "lo"])
        .unwrap();

    let _web = http_server(&cluster, dir.path(), WEB_IP, BODY);
    let bulk_dir = dir.path().join("bulk");
    std::fs::create_dir_all(&bulk_dir).unwrap();
    let bulk = kuberaya_e2e::gateway::random_vec(BULK_BYTES);
    std::fs::write(bulk_dir.join("big.bin"), &bulk).unwrap();
    let _bulk = bulk_server(&cluster, &bulk_dir, BULK_IP);
    let secret = http_server(&cluster, dir.path(), SECRET_IP, SECRET_BODY);
    let _perf = cluster
        .spawn(&["iperf3", "-s", "-B", PERF_IP, "-p", &PERF_PORT.to_string()])
        .unwrap();

    let (gw_private, gw_public) = keypair();
    let (peer_private, peer_public) = keypair();
    let mut gw_cmd = vec![kuberaya_e2e::binary("kuberaya-gateway").to_str().unwrap().to_string()];
    gw_cmd.extend(gateway_args(
        dir.path(),
        &gw_private,
        &peer_public,
        &format!("{CLUSTER_VETH}:{GATEWAY_PORT}"),
    ));
    gw_cmd.extend(["--uapi-interface", "kr-gw"].map(String::from));
    if plane == Plane::Tun {
        gw_cmd.extend(["--dataplane", "tun", "--tun-name", GW_TUN].map(String::from));
        // What a crashed gateway leaves behind: its table, with a rule of an older version.
        exec(&cluster, &["nft", "add", "table", "ip", NFT_TABLE]);
        exec(&cluster, &["nft", "add", "chain", "ip", NFT_TABLE, "stale"]);
        // As in a pod (read-only /proc/sys): no global forwarding, so only the gateway's
        // per-interface forwarding over rtnetlink can make the kernel forward.
        let off = exec(&cluster, &["sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward"]);
        assert!(off.status.success(), "{}", text(&off));
    }
    let mut gw = cluster.spawn_with_private_dir("/var/run/wireguard", &gw_cmd).unwrap();
    let line = gw
        .wait_for_stdout_line("kuberaya-gateway listening", Duration::from_secs(30))
        .unwrap();
    assert_eq!(field(&line, "public_key"), gw_public);
    assert_eq!(field(&line, "tunnel_address"), GATEWAY_TUNNEL_IP);
    let metrics_url = format!("http://{}/metrics", field(&line, "metrics"));
    let nft_table = || exec(&cluster, &["nft", "list", "table", "ip", NFT_TABLE]);
    if plane == Plane::Tun {
        let table = nft_table();
        let rules = String::from_utf8_lossy(&table.stdout).into_owned();
        assert!(table.status.success(), "no table {NFT_TABLE}: {}", text(&table));
        assert!(rules.contains("masquerade"), "{rules}");
        assert!(
            !rules.contains("stale"),
            "the crashed gateway's table was not replaced: {rules}"
        );
        let link = cluster.ip(["-br", "address", "show", GW_TUN]).unwrap();
        assert!(link.contains(&format!("{GATEWAY_TUNNEL_IP}/16")), "{link}");
        let sysctl = |path: &str| {
            let out = exec(&cluster, &["cat", &format!("/proc/sys/net/ipv4/{path}")]);
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        assert_eq!(sysctl("ip_forward"), "0", "the gateway wrote the global switch");
        for dev in [GW_TUN, "to-laptop"] {
            assert_eq!(sysctl(&format!("conf/{dev}/forwarding")), "1", "forwarding on {dev}");
        }
    }

    // The laptop: wireguard-go with the peer's wg-quick config.
    let conf = WgQuick {
        path: dir.path().join("wg0.conf"),
        text: format!(
            "[Interface]\nPrivateKey = {peer_private}\nAddress = {PEER_ADDRESS}/32\nDNS = {GATEWAY_TUNNEL_IP}\n\n\
             [Peer]\nPublicKey = {gw_public}\nEndpoint = {CLUSTER_VETH}:{GATEWAY_PORT}\n\
             AllowedIPs = 10.96.0.0/16, {GATEWAY_TUNNEL_IP}/32\nPersistentKeepalive = 25\n"
        ),
    };
    write(dir.path(), "wg0.conf", &conf.text);
    let mut wg_go = laptop
        .spawn_with_private_dir("/var/run/wireguard", &["wireguard-go", "-f", "wg0"])
        .unwrap();
    let wg_pid = wg_go.pid();
    let ready = poll_until_blocking(Duration::from_secs(15), || {
        run(in_namespaces_of(wg_pid, &["wg", "show", "wg0"]), CMD)
            .ok()
            .filter(|o| o.status.success())
    });
    assert!(
        ready.is_some(),
        "wireguard-go did not come up\n{}",
        wg_go.output_tails()
    );
    conf.up(&laptop, wg_pid, "wg0", dir.path()).unwrap();
    let dns = conf.values("DNS");
    assert_eq!(dns, [GATEWAY_TUNNEL_IP]);

    // Allowed: curl reaches web's ClusterIP through the tunnel.
    let web_url = format!("http://{WEB_IP}/");
    let got = poll_until_blocking(Duration::from_secs(30), || {
        let (ok, body) = curl(&laptop, &[], &web_url);
        (ok && body == BODY).then_some(body)
    });
    assert!(
        got.is_some(),
        "curl through wireguard-go to web failed\n{}\n{}",
        wg_go.output_tails(),
        gw.output_tails()
    );

    // ICMP echo to an allowed ClusterIP is answered (by the gateway in userspace mode, by
    // the Service's host in TUN mode); to a denied one it is not.
    let ping = |ip: &str| exec(&laptop, &["ping", "-c", "3", "-i", "0.2", "-W", "2", ip]);
    let out = ping(WEB_IP);
    assert!(
        out.status.success(),
        "ping to an allowed ClusterIP: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = ping(SECRET_IP);
    assert!(
        !out.status.success(),
        "ping to a denied ClusterIP answered: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Denied: no answer, and the Service never sees a request (beyond its readiness check).
    let requests = |p: &Process| p.stderr().matches("\"GET /").count();
    let seen_before = requests(&secret);
    let (ok, body) = curl(&laptop, &[], &format!("http://{SECRET_IP}/"));
    assert!(!ok && body != SECRET_BODY, "a denied Service answered: {body}");
    assert_eq!(requests(&secret), seen_before, "the denied Service saw a request");

    // Allowed, but nothing listens: refused at once, as the Service's host refuses it (curl:
    // "Couldn't connect", exit 7), in both modes. The userspace plane used to accept the
    // connection first and reset it after the request (curl: exit 56).
    let started = std::time::Instant::now();
    let out = curl_within(&laptop, 5, &[&format!("http://{CLOSED_IP}/")]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl to a Service port nothing listens on, after {:?}: {}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "refused only after {:?}",
        started.elapsed()
    );
    // The same over UDP: the host's port unreachable reaches dig (through the userspace
    // plane, which passes the error on; in TUN mode, the kernel's own).
    let started = std::time::Instant::now();
    let out = exec(
        &laptop,
        &[
            "dig",
            "+time=2",
            "+tries=1",
            &format!("@{CLOSED_IP}"),
            "web.default.svc.cluster.local",
        ],
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("connection refused"),
        "dig to a UDP port nothing listens on: {said}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused only after {:?}",
        started.elapsed()
    );

    // DNS on the gateway's tunnel address, the config's DNS server.
    let answer = dig(&laptop, &dns[0], "web.default.svc.cluster.local");
    assert!(answer.contains("status: NOERROR"), "{answer}");
    assert!(answer.contains(WEB_IP), "A record of web: {answer}");
    let denied = dig(&laptop, &dns[0], "secret.default.svc.cluster.local");
    assert!(denied.contains("status: NXDOMAIN"), "denied Service: {denied}");

    // iperf3 to an allowed Service port, bounded to 3 seconds of traffic.
    let perf_port = PERF_PORT.to_string();
    let report = poll_until_blocking(Duration::from_secs(30), || {
        let out = laptop
            .exec(
                &[
                    "iperf3",
                    "-c",
                    PERF_IP,
                    "-p",
                    &perf_port,
                    "-t",
                    "3",
                    "-J",
                    "--connect-timeout",
                    "3000",
                ],
                Duration::from_secs(30),
            )
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        if !out.status.success() {
            eprintln!("iperf3 failed, retrying: {}", v["error"]);
            std::thread::sleep(Duration::from_millis(500));
            return None;
        }
        Some(v)
    })
    .unwrap_or_else(|| panic!("iperf3 through the tunnel failed\n{}", gw.output_tails()));
    let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    let bps = report["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0);
    eprintln!(
        "iperf3 through the gateway ({plane:?}): {received} bytes, {:.1} Mbit/s",
        bps / 1e6
    );
    assert!(received > 0, "iperf3 moved no bytes: {report}");

    // Every byte arrives, in order, both ways: a download the gateway cuts into segments,
    // an upload it coalesces (TUN mode) or relays (userspace).
    let down = dir.path().join("down.bin");
    let big_url = format!("http://{BULK_IP}/big.bin");
    let out = curl_within(&laptop, 60, &["-o", down.to_str().unwrap(), &big_url]);
    assert!(
        out.status.success(),
        "downloading {BULK_BYTES} bytes ({plane:?})\n{}",
        gw.output_tails()
    );
    let got = std::fs::read(&down).unwrap();
    assert!(
        got.len() == bulk.len() && got == bulk,
        "the download differs ({plane:?}): {} bytes of {}",
        got.len(),
        bulk.len()
    );
    let sha = exec(&cluster, &["sha256sum", bulk_dir.join("big.bin").to_str().unwrap()]);
    let sha = String::from_utf8_lossy(&sha.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let upload = format!("@{}", bulk_dir.join("big.bin").display());
    let bulk_url = format!("http://{BULK_IP}/");
    let out = curl_within(
        &laptop,
        60,
        &[
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &upload,
            &bulk_url,
        ],
    );
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && answer == sha,
        "the upload arrived as {answer:?}, sent {sha} ({plane:?})"
    );

    // The laptop's view: a recent handshake with the gateway.
    let shake = run_ok(
        in_namespaces_of(wg_pid, &["wg", "show", "wg0", "latest-handshakes"]),
        CMD,
    )
    .unwrap();
    let (key, ts) = shake.trim().split_once('\t').expect("pubkey<TAB>time");
    assert_eq!(key, gw_public);
    let ts: u64 = ts.parse().unwrap();
    assert!(
        ts > 0 && unix_now().saturating_sub(ts) < 180,
        "no recent handshake: {shake}"
    );
    let human = run_ok(in_namespaces_of(wg_pid, &["wg", "show", "wg0"]), CMD).unwrap();
    assert!(human.contains("latest handshake:"), "{human}");

    // The gateway's view through its UAPI socket, with the stock `wg`.
    let gw_pid = gw.pid();
    let interfaces = run_ok(in_namespaces_of(gw_pid, &["wg", "show", "interfaces"]), CMD).unwrap();
    assert_eq!(interfaces.trim(), "kr-gw", "the gateway's private /var/run/wireguard");
    let dump = run_ok(in_namespaces_of(gw_pid, &["wg", "show", "kr-gw", "dump"]), CMD).unwrap();
    let rows: Vec<Vec<&str>> = dump.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows.len(), 2, "the interface and one peer: {dump}");
    assert_eq!(rows[0][0], gw_private, "{dump}");
    assert_eq!(rows[0][1], gw_public, "{dump}");
    assert_eq!(rows[0][2], GATEWAY_PORT.to_string(), "{dump}");
    let peer = &rows[1];
    assert_eq!(peer[0], peer_public, "{dump}");
    assert_eq!(peer[1], "(none)", "no preshared key: {dump}");
    assert!(peer[2].starts_with(&format!("{LAPTOP_VETH}:")), "endpoint: {dump}");
    assert_eq!(peer[3], format!("{PEER_ADDRESS}/32"), "{dump}");
    let gw_seen: u64 = peer[4].parse().unwrap();
    assert!(
        unix_now().saturating_sub(gw_seen) < 180,
        "gateway's latest handshake: {dump}"
    );
    let (rx, tx): (u64, u64) = (peer[5].parse().unwrap(), peer[6].parse().unwrap());
    assert!(rx > 0 && tx > 0, "transfer counters: {dump}");
    let human = run_ok(in_namespaces_of(gw_pid, &["wg", "show", "kr-gw"]), CMD).unwrap();
    assert!(
        human.contains("latest handshake:") && human.contains("allowed ips: 100.64.0.2/32"),
        "{human}"
    );
    let set = run(
        in_namespaces_of(gw_pid, &["wg", "set", "kr-gw", "listen-port", "1"]),
        CMD,
    )
    .unwrap();
    assert!(!set.status.success(), "wg set must be refused");
    assert!(text(&set).contains("Operation not permitted"), "{}", text(&set));
    assert!(
        gw.stderr().contains("uapi set refused"),
        "no log line for the refused set"
    );

    // Spoofing: a second address on the laptop's wg0, used as the source → dropped, counted.
    laptop
        .ip(["address", "add", &format!("{SPOOFED_ADDRESS}/32"), "dev", "wg0"])
        .unwrap();
    let (ok, body) = curl(&laptop, &["--interface", SPOOFED_ADDRESS, "-m", "2"], &web_url);
    assert!(!ok && body.is_empty(), "a spoofed source got an answer: {body}");
    let spoofed = poll_until_blocking(Duration::from_secs(10), || {
        let (ok, text) = curl(&cluster, &[], &metrics_url);
        let n = metric(
            &text,
            "kuberaya_gateway_packets_dropped_total",
            &["peer=\"default/alice\"", "reason=\"spoofed\""],
        )?;
        (ok && n > 0.0).then_some(n)
    });
    assert!(spoofed.is_some(), "no spoofed drop counted\n{}", gw.output_tails());
    laptop
        .ip(["address", "del", &format!("{SPOOFED_ADDRESS}/32"), "dev", "wg0"])
        .unwrap();
    // The peer itself keeps working.
    let (ok, body) = curl(&laptop, &[], &web_url);
    assert!(ok && body == BODY, "after the spoof attempt: {body}");

    assert!(gw.is_running(), "the gateway exited\n{}", gw.output_tails());
    assert!(wg_go.is_running(), "wireguard-go exited\n{}", wg_go.output_tails());
    if plane == Plane::Tun {
        // A clean exit removes the table and the device.
        gw.stop();
        let table = nft_table();
        assert!(!table.status.success(), "table left after exit: {}", text(&table));
        let link = cluster.exec(&["ip", "link", "show", GW_TUN], CMD).unwrap();
        assert!(!link.status.success(), "device left after exit: {}", text(&link));
    }
    // Processes stop before the namespaces go (reverse order of declaration).
}

/// `--uapi-dir`: the socket can live anywhere; `wg` finds it when that directory is
/// mounted on /var/run/wireguard in a mount namespace of its own (nothing else sees it).
#[test]
fn wg_show_reads_the_gateway_from_a_uapi_dir() {
    require_root(
        "wg_show_reads_the_gateway_from_a_uapi_dir",
        "it bind-mounts the socket directory on /var/run/wireguard in a mount namespace",
    );
    require_programs(&[("wg", "wireguard-tools"), ("unshare", "util-linux")]);
    let dir = tempfile::tempdir().unwrap();
    let sockets = dir.path().join("sockets");
    let (gw_private, gw_public) = keypair();
    let (_, peer_public) = keypair();
    let mut args = gateway_args(dir.path(), &gw_private, &peer_public, "127.0.0.1:0");
    args.extend(["--uapi-interface", "kr0", "--uapi-dir", sockets.to_str().unwrap()].map(String::from));
    let mut gw = Process::start("kuberaya-gateway", args).unwrap();
    let line = gw
        .wait_for_stdout_line("kuberaya-gateway listening", Duration::from_secs(30))
        .unwrap();
    let socket = sockets.join("kr0.sock");
    assert_eq!(field(&line, "uapi"), socket.display().to_string());
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the UAPI socket is for its owner only");
    let port = field(&line, "udp").rsplit(':').next().unwrap().to_string();

    let wg = |args: &str| {
        let mut cmd = Command::new("unshare");
        cmd.args([
            "-m",
            "sh",
            "-c",
            &format!(r#"mkdir -p /var/run/wireguard && mount --bind "$0" /var/run/wireguard && exec wg {args}"#),
            sockets.to_str().unwrap(),
        ]);
        run(cmd, CMD).unwrap()
    };
    let out = wg("show kr0 dump");
    assert!(out.status.success(), "{}", text(&out));
    let dump = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows: Vec<Vec<&str>> = dump.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows.len(), 2, "{dump}");
    assert_eq!(
        rows[0][..3],
        [gw_private.as_str(), gw_public.as_str(), port.as_str()],
        "{dump}"
    );
    // Before any handshake: no endpoint, no handshake, nothing transferred.
    assert_eq!(
        rows[1],
        [
            peer_public.as_str(),
            "(none)",
            "(none)",
            "100.64.0.2/32",
            "0",
            "0",
            "0",
            "off"
        ],
        "{dump}"
    );
    let out = wg("show kr0");
    let human = text(&out);
    assert!(human.contains(&format!("public key: {gw_public}")), "{human}");
    assert!(human.contains("private key: (hidden)"), "{human}");
    let out = wg("set kr0 peer AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= allowed-ips 100.64.0.9/32");
    assert!(!out.status.success());
    assert!(text(&out).contains("Operation not permitted"), "{}", text(&out));

    gw.stop();
    assert!(!socket.exists(), "the socket file is removed when the gateway stops");
}

/// The harness's teardown, on which the tests above rely: dropping a [`Netns`] kills what
/// still runs inside it and deletes it with its interfaces.
#[test]
fn dropped_namespace_takes_its_processes_and_links_with_it() {
    require_root(
        "dropped_namespace_takes_its_processes_and_links_with_it",
        "it creates network namespaces and a veth pair",
    );
    let a = Netns::unique("drop-a").unwrap();
    let b = Netns::unique("drop-b").unwrap();
    netns::veth_pair(
        VethEnd {
            ns: &a,
            name: "to-b",
            address: "192.0.2.1/30",
        },
        VethEnd {
            ns: &b,
            name: "to-a",
            address: "192.0.2.2/30",
        },
    )
    .unwrap();
    let link = b.ip(["-br", "address", "show", "to-a"]).unwrap();
    assert!(
        link.contains("192.0.2.2/30") && link.contains("UP"),
        "veth end in b: {link}"
    );
    // Not a Process: only the namespace's teardown ends it.
    let mut sleeper = a.command(&["sleep", "60"]).spawn().unwrap();
    let pid = sleeper.id();
    assert!(
        poll_until_blocking(Duration::from_secs(5), || a.pids().contains(&pid).then_some(())).is_some(),
        "the process runs inside the namespace"
    );
    let (name_a, name_b) = (a.name().to_string(), b.name().to_string());
    drop(a);
    drop(b);
    let status = poll_until_blocking(Duration::from_secs(5), || sleeper.try_wait().ok().flatten());
    assert!(status.is_some(), "the process inside was killed");
    let list = run_ok(
        {
            let mut c = Command::new("ip");
            c.args(["netns", "list"]);
            c
        },
        CMD,
    )
    .unwrap();
    assert!(!list.contains(&name_a) && !list.contains(&name_b), "{list}");
}

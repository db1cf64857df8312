//! End to end: the real `kuberaya-gateway` binary with static peers and Services files,
//! fake ClusterIP services on loopback, and the stock userspace WireGuard client `onetun`
//! as the operator's laptop. curl and dig go through onetun's port forwards.
//!
//! onetun 0.3.10 panics with more than one TCP forward per process (its smoltcp interface
//! runs out of address slots), and two onetun processes with the same key would fight over
//! the peer's endpoint, so each check runs its own onetun, one after the other.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kuberaya_e2e::{Process, poll_until_blocking};

const BODY: &str = "hello from web";

fn onetun_path() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("onetun"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("onetun is not installed: run `cargo install --locked onetun --version 0.3.10` (scripts/test does)")
    })
}

fn has(cmd: &str) -> bool {
    Command::new(cmd).arg("-v").output().is_ok()
}

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

/// A fake Service: answers every connection with a fixed HTTP response, for a bounded time.
fn fake_http(addr: Ipv4Addr) -> SocketAddr {
    let l = TcpListener::bind((addr, 0)).unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().take(64).flatten() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
                BODY.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
    });
    a
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Laptop {
    private: String,
    gateway_public: String,
    endpoint: String,
}

impl Laptop {
    /// One onetun forwarding `local` to `remote` (`host:port:PROTO`).
    fn onetun(&self, local: u16, remote: &str) -> Process {
        let mut cmd = Command::new(onetun_path());
        cmd.args([
            "--endpoint-addr",
            &self.endpoint,
            "--endpoint-public-key",
            &self.gateway_public,
            "--source-peer-ip",
            "100.64.0.2",
            "--keep-alive",
            "5",
            &format!("127.0.0.1:{local}:{remote}"),
        ])
        .env("ONETUN_PRIVATE_KEY", &self.private);
        Process::spawn_command(cmd).unwrap()
    }
}

fn curl(port: u16) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "-m", "3", &format!("http://127.0.0.1:{port}/")])
        .output()
        .expect("curl is installed");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn dig(port: u16, name: &str) -> String {
    let out = Command::new("dig")
        .args(["+time=2", "+tries=1", "-p", &port.to_string(), "@127.0.0.1", name, "A"])
        .output()
        .expect("dig is installed (apt package dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn onetun_reaches_allowed_service_is_refused_the_other_and_resolves_names() {
    let onetun = onetun_path();
    assert!(has("curl"), "curl is required");
    assert!(has("dig"), "dig is required (apt package dnsutils)");
    eprintln!("using {}", onetun.display());

    let net = kuberaya_e2e::unique_net_index();
    let web_ip = Ipv4Addr::new(127, 96, net, 10);
    let secret_ip = Ipv4Addr::new(127, 96, net, 11);
    let web = fake_http(web_ip);
    let secret = fake_http(secret_ip);

    let dir = tempfile::tempdir().unwrap();
    let (gw_private, gw_public) = keypair();
    let (peer_private, peer_public) = keypair();
    let key_file = write(dir.path(), "gw.key", &gw_private);
    let peers = write(
        dir.path(),
        "peers.json",
        &serde_json::json!([{
            "namespace": "default", "name": "alice",
            "spec": {"publicKey": peer_public, "address": "100.64.0.2", "allow": [{"service": "web"}]}
        }])
        .to_string(),
    );
    let services = write(
        dir.path(),
        "services.json",
        &serde_json::json!([
            {"namespace": "default", "name": "web", "clusterIP": web_ip.to_string(),
             "ports": [{"name": "http", "port": web.port()}]},
            {"namespace": "default", "name": "secret", "clusterIP": secret_ip.to_string(),
             "ports": [{"name": "http", "port": secret.port()}]}
        ])
        .to_string(),
    );
    let mut gw = Process::start(
        "kuberaya-gateway",
        [
            "--listen",
            "127.0.0.1:0",
            "--private-key-file",
            key_file.to_str().unwrap(),
            "--peers-file",
            peers.to_str().unwrap(),
            "--services-file",
            services.to_str().unwrap(),
            "--metrics-bind-address",
            "127.0.0.1:0",
            "--health-bind-address",
            "127.0.0.1:0",
        ],
    )
    .unwrap();
    let line = gw
        .wait_for_stdout_line("kuberaya-gateway listening", Duration::from_secs(30))
        .unwrap();
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_string()
    };
    let laptop = Laptop {
        private: peer_private,
        gateway_public: field("public_key"),
        endpoint: field("udp"),
    };
    assert_eq!(laptop.gateway_public, gw_public);
    let metrics = field("metrics");

    // Allowed: curl through onetun reaches web.
    let port = free_port();
    let mut t = laptop.onetun(port, &format!("{web}:TCP"));
    let got = poll_until_blocking(Duration::from_secs(20), || {
        let (ok, body) = curl(port);
        (ok && body == BODY).then_some(body)
    });
    assert!(
        got.is_some(),
        "curl through onetun to web failed\n{}\n{}",
        t.output_tails(),
        gw.output_tails()
    );
    t.stop();

    // Denied: the connection is reset at once, the Service never sees it.
    let port = free_port();
    let mut t = laptop.onetun(port, &format!("{secret}:TCP"));
    let started = Instant::now();
    let mut attempts = 0;
    while started.elapsed() < Duration::from_secs(6) && attempts < 5 {
        attempts += 1;
        let (ok, body) = curl(port);
        assert!(!(ok && body == BODY), "a denied Service answered");
        std::thread::sleep(Duration::from_millis(300));
    }
    let denied = poll_until_blocking(Duration::from_secs(10), || {
        let text = http_get(&metrics, "/metrics");
        text.lines()
            .any(|l| l.starts_with("kuberaya_gateway_flows_total") && l.contains("verdict=\"denied\""))
            .then_some(())
    });
    assert!(denied.is_some(), "no denied flow counted\n{}", gw.output_tails());
    assert!(gw.stderr().contains("flow denied"), "no audit line for the denied flow");
    t.stop();

    // DNS through onetun's UDP forwarding to the gateway's tunnel address.
    let port = free_port();
    let mut t = laptop.onetun(port, "100.64.0.1:53:UDP");
    let answer = poll_until_blocking(Duration::from_secs(20), || {
        let out = dig(port, "web.default.svc.cluster.local");
        out.contains("status: NOERROR").then_some(out)
    })
    .unwrap_or_else(|| {
        panic!(
            "no DNS answer through onetun\n{}\n{}",
            t.output_tails(),
            gw.output_tails()
        )
    });
    assert!(answer.contains(&web_ip.to_string()), "A record of web: {answer}");
    let denied = dig(port, "secret.default.svc.cluster.local");
    assert!(denied.contains("status: NXDOMAIN"), "denied Service: {denied}");
    let unknown = dig(port, "nope.default.svc.cluster.local");
    assert!(unknown.contains("status: NXDOMAIN"), "unknown Service: {unknown}");
    t.stop();

    assert!(gw.is_running(), "the gateway exited\n{}", gw.output_tails());
    assert!(gw.stderr().contains("flow ended"), "no audit line for the allowed flow");
}

/// A minimal HTTP/1.0 GET (the metrics endpoint), bounded by timeouts.
fn http_get(addr: &str, path: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = write!(s, "GET {path} HTTP/1.0\r\nhost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

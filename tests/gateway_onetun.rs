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
use std::time::Duration;

use kuberaya_e2e::probe::{assert_never_answers, dig, http_get};
use kuberaya_e2e::process::line_field;
use kuberaya_e2e::sandbox::{WgPeer, curl_local, free_port, gateway_keypair as keypair, onetun_path};
use kuberaya_e2e::{Process, poll_until_blocking};

const BODY: &str = "hello from web";

fn has(cmd: &str) -> bool {
    Command::new(cmd).arg("-v").output().is_ok()
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

fn curl(port: u16) -> (bool, String) {
    curl_local(port, 3.0)
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
    let field = |k: &str| line_field(&line, k).unwrap();
    let laptop = WgPeer {
        private_key: peer_private,
        gateway_key: field("public_key"),
        endpoint: field("udp"),
        address: "100.64.0.2".into(),
    };
    assert_eq!(laptop.gateway_key, gw_public);
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
    assert_never_answers(port, |body| body == BODY);
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

//! End to end over IPv6 (issue 24): the real `kuberaya-gateway` binary listening on
//! `[::1]`, static peers and Services files, a dual-stack Service whose IPv6 ClusterIP is
//! `::1` (the one IPv6 loopback address; its IPv4 one is unused here), and the stock
//! userspace WireGuard client `onetun` connecting over an IPv6 endpoint as the peer's IPv6
//! tunnel address (`fd6b:7261:7961::2`, the default: the ULA prefix + the IPv4 address's
//! offset). curl and dig go through onetun's port forwards.
//!
//! One onetun per check, one after the other (see tests/gateway_onetun.rs for why).

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kuberaya_e2e::probe::{assert_never_answers, http_get};
use kuberaya_e2e::process::line_field;
use kuberaya_e2e::sandbox::{WgPeer, curl_local, free_port, gateway_keypair as keypair, onetun_path};
use kuberaya_e2e::{Process, poll_until_blocking};

const BODY: &str = "hello over ipv6";
/// The peer's IPv6 tunnel address: the default for 100.64.0.2.
const PEER_V6: &str = "fd6b:7261:7961::2";
/// The gateway's IPv6 tunnel address (its DNS).
const GATEWAY_V6: &str = "fd6b:7261:7961::1";

/// A fake Service on `[::1]`: answers every connection with a fixed HTTP response, for a
/// bounded number of connections.
fn fake_http_v6() -> SocketAddr {
    let l = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).unwrap();
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

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `dig` through a forward on 127.0.0.1:`port` for `name`'s `qtype` records.
fn dig(port: u16, name: &str, qtype: &str) -> String {
    let out = Command::new("dig")
        .args([
            "+time=2",
            "+tries=1",
            "-p",
            &port.to_string(),
            "@127.0.0.1",
            name,
            qtype,
        ])
        .output()
        .expect("dig is installed (apt package dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn has_ipv6_loopback() -> bool {
    std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

#[test]
fn a_peer_over_ipv6_reaches_an_ipv6_cluster_ip_by_name_and_nothing_else() {
    assert!(has_ipv6_loopback(), "this test needs the IPv6 loopback (::1)");
    let onetun = onetun_path();
    eprintln!("using {}", onetun.display());

    let web = fake_http_v6();
    let admin = fake_http_v6();
    let net = kuberaya_e2e::unique_net_index();

    let dir = tempfile::tempdir().unwrap();
    let (gw_private, gw_public) = keypair();
    let (peer_private, peer_public) = keypair();
    let key_file = write(dir.path(), "gw.key", &gw_private);
    let peers = write(
        dir.path(),
        "peers.json",
        &serde_json::json!([{
            "namespace": "default", "name": "alice",
            "spec": {"publicKey": peer_public, "address": "100.64.0.2",
                     "allow": [{"service": "web", "ports": ["http"]}]}
        }])
        .to_string(),
    );
    // web is dual-stack (IPv6 ClusterIP ::1); its `admin` port is not granted. secret is
    // IPv4-only and not granted.
    let services = write(
        dir.path(),
        "services.json",
        &serde_json::json!([
            {"namespace": "default", "name": "web", "clusterIP": format!("127.96.{net}.10"),
             "clusterIPs": [format!("127.96.{net}.10"), "::1"],
             "ports": [{"name": "http", "port": web.port()}, {"name": "admin", "port": admin.port()}]},
            {"namespace": "default", "name": "secret", "clusterIP": format!("127.96.{net}.11"),
             "ports": [{"name": "http", "port": web.port()}]}
        ])
        .to_string(),
    );
    let mut gw = Process::start(
        "kuberaya-gateway",
        [
            "--listen",
            "[::1]:0",
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
    let endpoint = field("udp");
    assert!(endpoint.starts_with("[::1]:"), "the gateway listens on IPv6: {line}");
    let laptop = WgPeer {
        private_key: peer_private.clone(),
        gateway_key: field("public_key"),
        endpoint: endpoint.clone(),
        address: PEER_V6.into(),
    };
    assert_eq!(laptop.gateway_key, gw_public);
    let metrics = field("metrics");

    // Allowed: curl through onetun reaches web's IPv6 ClusterIP.
    let port = free_port();
    let mut t = laptop.onetun(port, &format!("[::1]:{}:TCP", web.port()));
    let got = poll_until_blocking(Duration::from_secs(20), || {
        let (ok, body) = curl_local(port, 3.0);
        (ok && body == BODY).then_some(body)
    });
    assert!(
        got.is_some(),
        "curl through onetun to [::1]:{} failed\n{}\n{}",
        web.port(),
        t.output_tails(),
        gw.output_tails()
    );
    t.stop();

    // Denied: the same ClusterIP's other port never answers, and is counted.
    let port = free_port();
    let mut t = laptop.onetun(port, &format!("[::1]:{}:TCP", admin.port()));
    assert_never_answers(port, |body| body == BODY);
    let denied = poll_until_blocking(Duration::from_secs(10), || {
        let text = http_get(&metrics, "/metrics");
        text.lines()
            .any(|l| l.starts_with("kuberaya_gateway_flows_total") && l.contains("verdict=\"denied\""))
            .then_some(())
    });
    assert!(denied.is_some(), "no denied flow counted\n{}", gw.output_tails());
    t.stop();

    // DNS on the gateway's IPv6 tunnel address: AAAA of web, its A too, NXDOMAIN for what
    // the peer may not reach, no data for a family a Service lacks.
    let port = free_port();
    let mut t = laptop.onetun(port, &format!("[{GATEWAY_V6}]:53:UDP"));
    let answer = poll_until_blocking(Duration::from_secs(20), || {
        let out = dig(port, "web.default.svc.cluster.local", "AAAA");
        out.contains("status: NOERROR").then_some(out)
    })
    .unwrap_or_else(|| {
        panic!(
            "no DNS answer through onetun\n{}\n{}",
            t.output_tails(),
            gw.output_tails()
        )
    });
    assert!(answer.contains("AAAA\t::1"), "AAAA record of web: {answer}");
    let a = dig(port, "web.default.svc.cluster.local", "A");
    assert!(a.contains(&format!("A\t127.96.{net}.10")), "A record of web: {a}");
    let denied = dig(port, "secret.default.svc.cluster.local", "AAAA");
    assert!(denied.contains("status: NXDOMAIN"), "denied Service: {denied}");
    t.stop();

    // Spoofed: the same key, another IPv6 source address; dropped and counted.
    let spoofer = WgPeer {
        address: "fd6b:7261:7961::99".into(),
        ..laptop.clone()
    };
    let port = free_port();
    let mut t = spoofer.onetun(port, &format!("[::1]:{}:TCP", web.port()));
    assert_never_answers(port, |body| body == BODY);
    let spoofed = poll_until_blocking(Duration::from_secs(10), || {
        let text = http_get(&metrics, "/metrics");
        text.lines()
            .any(|l| l.starts_with("kuberaya_gateway_packets_dropped_total") && l.contains("reason=\"spoofed\""))
            .then_some(())
    });
    assert!(
        spoofed.is_some(),
        "no spoofed packet counted\n{}\n{}",
        http_get(&metrics, "/metrics"),
        gw.output_tails()
    );
    t.stop();

    assert!(gw.is_running(), "the gateway exited\n{}", gw.output_tails());
}

//! `kuberaya sandbox up` runs the WireGuard gateway as a cluster runs it: behind its own
//! `LoadBalancer` Service provisioned by the CCM. A peer made with `kuberaya peer add`
//! connects with the stock userspace client `onetun` to the written config's `Endpoint`,
//! the load balancer's public IP, so every packet goes platform LB → node IP:NodePort →
//! kube-proxy → gateway. curl and dig go through onetun's port forwards.
//!
//! onetun 0.3.10 supports one TCP forward per process, and two onetun processes with the
//! same key would fight over the peer's endpoint, so each check runs its own onetun, one
//! after the other.

use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kuberaya_e2e::probe::{assert_never_answers, dig};
use kuberaya_e2e::sandbox::{Sandbox, WgPeer, curl_local, free_port, onetun_path, output_text};
use kuberaya_e2e::{binary, poll_until_blocking};

fn curl(port: u16) -> (bool, String) {
    curl_local(port, 3.0)
}

#[test]
fn a_peer_reaches_allowed_services_through_the_gateways_load_balancer() -> Result<()> {
    let onetun = onetun_path();
    eprintln!("using {}", onetun.display());
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("sandbox");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work)?;
    let sandbox = Sandbox::up(&state, &[])?;
    let n = sandbox.net;
    let public_prefix = format!("127.203.{n}.");
    let pod_octet = u16::from(n) + 100;
    let printed = &sandbox.up_output;
    assert!(
        printed.contains("WireGuard gateway, 2 replicas on"),
        "up reports the gateway's two replicas:\n{printed}"
    );
    assert!(
        printed.contains(&format!("gateway load balancer: {public_prefix}")),
        "the gateway's LB has a public IP of the platform:\n{printed}"
    );
    assert!(
        printed.contains("kuberaya peer add") && printed.contains("onetun"),
        "the try-this block shows how to connect:\n{printed}"
    );

    let user = sandbox.user(&work);
    // The gateway's Service: a UDP LoadBalancer whose ingress is a platform public IP.
    let lb_ip = user.kubectl(&[
        "get",
        "service",
        "-n",
        "kuberaya-system",
        "kuberaya-gateway",
        "-o",
        "jsonpath={.status.loadBalancer.ingress[0].ip}",
    ])?;
    assert!(lb_ip.starts_with(&public_prefix), "gateway LB IP {lb_ip:?}");
    let cidr = user.kubectl(&[
        "get",
        "configmap",
        "-n",
        "kuberaya-system",
        "kuberaya-config",
        "-o",
        "jsonpath={.data.service-cidr}",
    ])?;
    assert_eq!(cidr, format!("127.97.{n}.0/24"));

    let api_ip = user.http_service("api")?;
    let secret_ip = user.http_service("secret")?;

    let add = user.kuberaya(&["peer", "add", "alice", "--allow", "default/api", "--out", "alice.conf"])?;
    ensure!(add.status.success(), "peer add: {}", output_text(&add));
    let conf = std::fs::read_to_string(work.join("alice.conf"))?;
    let peer = WgPeer::from_conf(&conf);
    assert_eq!(
        peer.endpoint,
        format!("{lb_ip}:51820"),
        "the peer's Endpoint is the LB:\n{conf}"
    );

    // Allowed: curl through onetun reaches a pod of api.
    let port = free_port();
    let mut t = peer.onetun(port, &format!("{api_ip}:80:TCP"));
    let got = poll_until_blocking(Duration::from_secs(30), || {
        let (ok, body) = curl(port);
        (ok && body.contains("pod=api-")).then_some(body)
    });
    assert!(got.is_some(), "curl through onetun to api failed\n{}", t.output_tails());
    t.stop();

    // Denied: secret never answers through the tunnel.
    let port = free_port();
    let mut t = peer.onetun(port, &format!("{secret_ip}:80:TCP"));
    assert_never_answers(port, |body| body.contains("pod="));
    t.stop();

    // DNS through onetun's UDP forwarding to the gateway's tunnel address.
    let port = free_port();
    let mut t = peer.onetun(port, "100.64.0.1:53:UDP");
    let answer = poll_until_blocking(Duration::from_secs(30), || {
        let out = dig(port, "api.default.svc.cluster.local");
        out.contains("status: NOERROR").then_some(out)
    })
    .unwrap_or_else(|| panic!("no DNS answer through onetun\n{}", t.output_tails()));
    assert!(answer.contains(&api_ip), "A record of api: {answer}");
    let denied = dig(port, "secret.default.svc.cluster.local");
    assert!(denied.contains("status: NXDOMAIN"), "denied Service: {denied}");
    t.stop();

    // `sandbox status` shows both replicas, ready, each serving alice, one writing status.
    let status = Command::new(binary("kuberaya"))
        .args(["sandbox", "status", "-o", "json", "--state-dir"])
        .arg(&state)
        .output()?;
    ensure!(status.status.success(), "sandbox status: {}", output_text(&status));
    let doc: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    let replicas = doc["gateway_replicas"].as_array().context("gateway_replicas")?;
    assert_eq!(replicas.len(), 2, "{doc}");
    assert!(replicas.iter().all(|r| r["ready"] == true && r["peers"] == 1), "{doc}");
    assert_eq!(
        replicas.iter().filter(|r| r["leader"] == true).count(),
        1,
        "one writer: {doc}"
    );
    let table = Command::new(binary("kuberaya"))
        .args(["sandbox", "status", "--state-dir"])
        .arg(&state)
        .output()?;
    let table = String::from_utf8_lossy(&table.stdout).to_lowercase();
    assert!(
        table.contains("gateway replica") && table.contains("kuberaya-gateway-1"),
        "{table}"
    );

    // `sandbox down` stops the gateway: its socket is free again.
    let down = Command::new(binary("kuberaya"))
        .args(["sandbox", "down", "--state-dir"])
        .arg(&state)
        .output()?;
    ensure!(down.status.success(), "sandbox down: {}", output_text(&down));
    for last in [254, 253] {
        let gateway_addr = format!("127.{pod_octet}.255.{last}:51820");
        UdpSocket::bind(&gateway_addr).with_context(|| format!("{gateway_addr} still bound after sandbox down"))?;
    }
    Ok(())
}

#[test]
fn no_gateway_leaves_the_gateway_out() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("sandbox");
    let sandbox = Sandbox::up(&state, &["--no-gateway"])?;
    let printed = &sandbox.up_output;
    assert!(!printed.contains("WireGuard gateway"), "{printed}");
    assert!(!printed.contains("kuberaya peer add"), "{printed}");
    let user = sandbox.user(tmp.path());
    let out = user.run(
        Path::new("kubectl"),
        &["get", "service", "-n", "kuberaya-system", "kuberaya-gateway"],
    )?;
    assert!(!out.status.success(), "no gateway Service: {}", output_text(&out));
    Ok(())
}

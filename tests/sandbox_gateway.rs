//! `kuberaya sandbox up` runs the WireGuard gateway as a cluster runs it: behind its own
//! `LoadBalancer` Service provisioned by the CCM. A peer made with `kuberaya peer add`
//! connects with the stock userspace client `onetun` to the written config's `Endpoint`,
//! the load balancer's public IP, so every packet goes platform LB → node IP:NodePort →
//! kube-proxy → gateway. curl and dig go through onetun's port forwards.
//!
//! onetun 0.3.10 supports one TCP forward per process, and two onetun processes with the
//! same key would fight over the peer's endpoint, so each check runs its own onetun, one
//! after the other.

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kuberaya_e2e::{Process, binary, poll_until_blocking, unique_net_index};

fn onetun_path() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("onetun"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("onetun is not installed: run `cargo install --locked onetun --version 0.3.10` (scripts/test does)")
        })
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Stops the sandbox (and purges its state) however the test ends.
struct SandboxGuard {
    state: PathBuf,
}

impl Drop for SandboxGuard {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(log) = std::fs::read_to_string(self.state.join("sandbox.log"))
        {
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- sandbox.log (tail) ---\n{}",
                lines[lines.len().saturating_sub(60)..].join("\n")
            );
        }
        let _ = Command::new(binary("kuberaya"))
            .args(["sandbox", "down", "--purge", "--state-dir"])
            .arg(&self.state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The sandbox's cluster as a user reaches it: `kubectl` and `kuberaya` with its kubeconfig.
struct User {
    kubeconfig: PathBuf,
    work: PathBuf,
}

impl User {
    fn run(&self, program: &Path, args: &[&str]) -> Result<Output> {
        Command::new(program)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .current_dir(&self.work)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", program.display()))
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = self.run(Path::new("kubectl"), args)?;
        ensure!(out.status.success(), "kubectl {args:?}: {}", text(&out));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn kuberaya(&self, args: &[&str]) -> Result<Output> {
        self.run(&binary("kuberaya"), args)
    }

    /// A Deployment answering HTTP on 8080 (the pods' built-in responder) and its ClusterIP
    /// Service on port 80; returns the ClusterIP.
    fn http_service(&self, name: &str) -> Result<String> {
        self.kubectl(&[
            "create",
            "deployment",
            name,
            "--image=registry.k8s.io/e2e-test-images/agnhost:2.53",
            "--port=8080",
            "--",
            "/agnhost",
            "netexec",
            "--http-port=8080",
        ])?;
        self.kubectl(&["expose", "deployment", name, "--port=80", "--target-port=8080"])?;
        let ip = self.kubectl(&["get", "service", name, "-o", "jsonpath={.spec.clusterIP}"])?;
        ensure!(!ip.trim().is_empty(), "service {name} has no ClusterIP");
        Ok(ip.trim().to_string())
    }
}

/// `Key = value` of a wg-quick config.
fn conf_value(conf: &str, key: &str) -> String {
    conf.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key} in the peer config:\n{conf}"))
}

struct Peer {
    private_key: String,
    gateway_key: String,
    endpoint: String,
    address: String,
}

impl Peer {
    fn from_conf(conf: &str) -> Peer {
        let address = conf_value(conf, "Address");
        Peer {
            private_key: conf_value(conf, "PrivateKey"),
            gateway_key: conf_value(conf, "PublicKey"),
            endpoint: conf_value(conf, "Endpoint"),
            address: address.split('/').next().unwrap_or_default().to_string(),
        }
    }

    /// One onetun forwarding `127.0.0.1:local` to `remote` (`host:port:PROTO`).
    fn onetun(&self, local: u16, remote: &str) -> Process {
        let mut cmd = Command::new(onetun_path());
        cmd.args([
            "--endpoint-addr",
            &self.endpoint,
            "--endpoint-public-key",
            &self.gateway_key,
            "--source-peer-ip",
            &self.address,
            "--keep-alive",
            "5",
            &format!("127.0.0.1:{local}:{remote}"),
        ])
        .env("ONETUN_PRIVATE_KEY", &self.private_key);
        Process::spawn_command(cmd).expect("onetun starts")
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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

#[test]
fn a_peer_reaches_allowed_services_through_the_gateways_load_balancer() -> Result<()> {
    let onetun = onetun_path();
    eprintln!("using {}", onetun.display());
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("sandbox");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work)?;
    let _guard = SandboxGuard { state: state.clone() };
    let n = unique_net_index();
    let public_prefix = format!("127.203.{n}.");
    let pod_octet = u16::from(n) + 100;
    let up = Command::new(binary("kuberaya"))
        .args(["sandbox", "up", "--detach", "--state-dir"])
        .arg(&state)
        .args([
            "--public-ip-range",
            &format!("127.203.{n}.0/24"),
            "--vm-ip-range",
            &format!("127.10.{n}.0/24"),
            "--service-cidr",
            &format!("127.97.{n}.0/24"),
            "--pod-cidr",
            &format!("127.{pod_octet}.0.0/16"),
        ])
        .stdin(Stdio::null())
        .output()?;
    ensure!(up.status.success(), "sandbox up --detach: {}", text(&up));
    let printed = String::from_utf8_lossy(&up.stdout).into_owned();
    assert!(
        printed.contains("WireGuard gateway on"),
        "up reports the gateway:\n{printed}"
    );
    assert!(
        printed.contains(&format!("gateway load balancer: {public_prefix}")),
        "the gateway's LB has a public IP of the platform:\n{printed}"
    );
    assert!(
        printed.contains("kuberaya peer add") && printed.contains("onetun"),
        "the try-this block shows how to connect:\n{printed}"
    );

    let user = User {
        kubeconfig: state.join("kubeconfig"),
        work: work.clone(),
    };
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
    ensure!(add.status.success(), "peer add: {}", text(&add));
    let conf = std::fs::read_to_string(work.join("alice.conf"))?;
    let peer = Peer::from_conf(&conf);
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
    let started = Instant::now();
    let mut attempts = 0;
    while started.elapsed() < Duration::from_secs(6) && attempts < 5 {
        attempts += 1;
        let (ok, body) = curl(port);
        assert!(!(ok && body.contains("pod=")), "a denied Service answered: {body}");
        std::thread::sleep(Duration::from_millis(300));
    }
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

    // `sandbox down` stops the gateway: its socket is free again.
    let down = Command::new(binary("kuberaya"))
        .args(["sandbox", "down", "--state-dir"])
        .arg(&state)
        .output()?;
    ensure!(down.status.success(), "sandbox down: {}", text(&down));
    let gateway_addr = format!("127.{pod_octet}.255.254:51820");
    UdpSocket::bind(&gateway_addr).with_context(|| format!("{gateway_addr} still bound after sandbox down"))?;
    Ok(())
}

#[test]
fn no_gateway_leaves_the_gateway_out() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("sandbox");
    let _guard = SandboxGuard { state: state.clone() };
    let n = unique_net_index();
    let up = Command::new(binary("kuberaya"))
        .args(["sandbox", "up", "--detach", "--no-gateway", "--state-dir"])
        .arg(&state)
        .args([
            "--public-ip-range",
            &format!("127.203.{n}.0/24"),
            "--vm-ip-range",
            &format!("127.10.{n}.0/24"),
            "--service-cidr",
            &format!("127.97.{n}.0/24"),
            "--pod-cidr",
            &format!("127.{}.0.0/16", u16::from(n) + 100),
        ])
        .stdin(Stdio::null())
        .output()?;
    ensure!(up.status.success(), "sandbox up --no-gateway: {}", text(&up));
    let printed = String::from_utf8_lossy(&up.stdout);
    assert!(!printed.contains("WireGuard gateway"), "{printed}");
    assert!(!printed.contains("kuberaya peer add"), "{printed}");
    let user = User {
        kubeconfig: state.join("kubeconfig"),
        work: tmp.path().to_path_buf(),
    };
    let out = user.run(
        Path::new("kubectl"),
        &["get", "service", "-n", "kuberaya-system", "kuberaya-gateway"],
    )?;
    assert!(!out.status.success(), "no gateway Service: {}", text(&out));
    Ok(())
}

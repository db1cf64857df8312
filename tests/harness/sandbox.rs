//! A detached `kuberaya sandbox` on its own 127.0.0.0/8 ranges, reached as a user reaches
//! it (`kubectl`, `kuberaya` with its kubeconfig), and WireGuard peers connected with the
//! userspace client `onetun` from the wg-quick configs `kuberaya peer` writes.
//!
//! onetun 0.3.10 supports one TCP forward per process.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, ensure};

use crate::cluster::Cluster;
use crate::{Process, binary, unique_net_index};

/// The installed `onetun` (PATH, then `~/.cargo/bin`); panics with how to install it.
pub fn onetun_path() -> PathBuf {
    find_onetun().unwrap_or_else(|| {
        panic!("onetun is not installed: run `cargo install --locked onetun --version 0.3.10` (scripts/test does)")
    })
}

/// The installed `onetun` (PATH, then `~/.cargo/bin`), if any: for a bench that skips
/// what needs it.
pub fn find_onetun() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join("onetun")).find(|p| p.is_file())
}

/// Status, stdout and stderr of a finished command, for failure messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A detached sandbox in a state directory of its own; `sandbox down --purge` on drop,
/// however the test ends (with the tail of `sandbox.log` when it panicked).
pub struct Sandbox {
    pub state: PathBuf,
    /// The unique network index its ranges use.
    pub net: u8,
    /// What `sandbox up --detach` printed.
    pub up_output: String,
    kubeconfig: PathBuf,
    service_cidr: String,
}

/// The address ranges of a sandbox: `127.203.N.0/24` public IPs and `127.10.N.0/24` VMs
/// for its network index N, and its Service and pod CIDRs.
#[derive(Debug, Clone)]
pub struct Ranges {
    pub net: u8,
    pub service_cidr: String,
    pub pod_cidr: String,
}

impl Ranges {
    /// `127.97.N.0/24` Services and `127.(N+100).0.0/16` pods: what [`Sandbox::up`] uses.
    pub fn standard(net: u8) -> Ranges {
        Ranges {
            net,
            service_cidr: format!("127.97.{net}.0/24"),
            pod_cidr: format!("127.{}.0.0/16", u16::from(net) + 100),
        }
    }
}

impl Sandbox {
    /// `kuberaya sandbox up --detach` with `--public-ip-range 127.203.N.0/24`,
    /// `--vm-ip-range 127.10.N.0/24`, `--service-cidr 127.97.N.0/24` and
    /// `--pod-cidr 127.(N+100).0.0/16` for a fresh N, plus `extra` arguments.
    pub fn up(state: &Path, extra: &[&str]) -> Result<Sandbox> {
        Sandbox::up_on(state, &Ranges::standard(unique_net_index()), extra)
    }

    /// `kuberaya sandbox up --detach` on `ranges`, plus `extra` arguments. The sandbox is
    /// stopped on drop even when `up` fails.
    pub fn up_on(state: &Path, ranges: &Ranges, extra: &[&str]) -> Result<Sandbox> {
        let n = ranges.net;
        let mut sandbox = Sandbox {
            state: state.to_path_buf(),
            net: n,
            up_output: String::new(),
            kubeconfig: state.join("kubeconfig"),
            service_cidr: ranges.service_cidr.clone(),
        };
        let out = Command::new(binary("kuberaya"))
            .args(["sandbox", "up", "--detach", "--state-dir"])
            .arg(state)
            .args([
                "--public-ip-range",
                &format!("127.203.{n}.0/24"),
                "--vm-ip-range",
                &format!("127.10.{n}.0/24"),
                "--service-cidr",
                &ranges.service_cidr,
                "--pod-cidr",
                &ranges.pod_cidr,
            ])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .context("running kuberaya sandbox up")?;
        ensure!(out.status.success(), "sandbox up --detach: {}", output_text(&out));
        sandbox.up_output = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(sandbox)
    }

    pub fn service_cidr(&self) -> String {
        self.service_cidr.clone()
    }

    /// The last `lines` lines of `sandbox.log`.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.state, lines)
    }

    /// `kuberaya ARGS --state-dir STATE`, which must succeed; returns its stdout.
    pub fn kuberaya(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(binary("kuberaya"))
            .args(args)
            .arg("--state-dir")
            .arg(&self.state)
            .stdin(Stdio::null())
            .output()
            .context("running kuberaya")?;
        ensure!(out.status.success(), "kuberaya {args:?}: {}", output_text(&out));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// What `kuberaya sandbox env` exports: the platform's URL and credentials
    /// (`CLOUDRAYA_*`), `KUBECONFIG`, `KUBERAYA_CLUSTER_ID`.
    pub fn env(&self) -> Result<BTreeMap<String, String>> {
        Ok(parse_exports(&self.kuberaya(&["sandbox", "env"])?)
            .into_iter()
            .collect())
    }

    /// A user of the sandbox's cluster working in `work`.
    pub fn user(&self, work: &Path) -> User {
        User {
            kubeconfig: self.state.join("kubeconfig"),
            work: work.to_path_buf(),
            netns: None,
        }
    }
}

impl Cluster for Sandbox {
    fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        drop(DownGuard::new(&self.state));
    }
}

/// A [`Sandbox`] in a temporary directory of its own (state in `DIR/sb`; the directory
/// goes after `sandbox down --purge`), for files of the test beside it.
pub struct TempSandbox {
    /// Dropped first: `sandbox down --purge` before the directory goes.
    pub sandbox: Sandbox,
    pub dir: tempfile::TempDir,
}

impl TempSandbox {
    /// [`Sandbox::up`] with `extra` arguments in a fresh temporary directory.
    pub fn up(extra: &[&str]) -> Result<TempSandbox> {
        let dir = tempfile::tempdir()?;
        let sandbox = Sandbox::up(&dir.path().join("sb"), extra)?;
        Ok(TempSandbox { sandbox, dir })
    }

    /// [`Sandbox::up_on`] `ranges` with `extra` arguments in a fresh temporary directory.
    pub fn up_on(ranges: &Ranges, extra: &[&str]) -> Result<TempSandbox> {
        let dir = tempfile::tempdir()?;
        let sandbox = Sandbox::up_on(&dir.path().join("sb"), ranges, extra)?;
        Ok(TempSandbox { sandbox, dir })
    }
}

impl std::ops::Deref for TempSandbox {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.sandbox
    }
}

/// `kuberaya sandbox down --purge` of the sandbox in `state` on drop, however the test
/// ends (with the tail of `sandbox.log` when it panicked): for a sandbox started some
/// other way than [`Sandbox::up`].
pub struct DownGuard {
    pub state: PathBuf,
}

impl DownGuard {
    pub fn new(state: &Path) -> DownGuard {
        DownGuard {
            state: state.to_path_buf(),
        }
    }
}

impl Drop for DownGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- sandbox.log (tail) ---\n{}", log_tail(&self.state, 60));
        }
        let _ = Command::new(binary("kuberaya"))
            .args(["sandbox", "down", "--purge", "--state-dir"])
            .arg(&self.state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The last `lines` lines of the `sandbox.log` in `state` (empty when there is none).
pub fn log_tail(state: &Path, lines: usize) -> String {
    let log = std::fs::read_to_string(state.join("sandbox.log")).unwrap_or_default();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `export K=V` lines (what `kuberaya sandbox env` prints) as (K, V), undoing the single
/// quotes around a value.
pub fn parse_exports(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect()
}

/// A fresh `kuberaya-gateway --generate-keypair`: (private key, public key).
pub fn gateway_keypair() -> (String, String) {
    let out = Command::new(binary("kuberaya-gateway"))
        .arg("--generate-keypair")
        .output()
        .expect("kuberaya-gateway --generate-keypair");
    assert!(out.status.success(), "{}", output_text(&out));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut it = text.split_whitespace();
    (
        it.next().expect("private").to_string(),
        it.next().expect("public").to_string(),
    )
}

/// The sandbox's cluster as a user reaches it: `kubectl` and `kuberaya` with its kubeconfig.
pub struct User {
    pub kubeconfig: PathBuf,
    pub work: PathBuf,
    /// The network namespace the cluster lives in (`ip netns exec`), if not this one.
    pub netns: Option<String>,
}

impl User {
    pub fn run(&self, program: &Path, args: &[&str]) -> Result<Output> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .current_dir(&self.work)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", program.display()))
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = self.run(Path::new("kubectl"), args)?;
        ensure!(out.status.success(), "kubectl {args:?}: {}", output_text(&out));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn kuberaya(&self, args: &[&str]) -> Result<Output> {
        self.run(&binary("kuberaya"), args)
    }

    /// `kuberaya ARGS`, which must succeed; returns its stdout.
    pub fn kuberaya_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kuberaya(args)?;
        ensure!(out.status.success(), "kuberaya {args:?}: {}", output_text(&out));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A Deployment answering HTTP on 8080 (the pods' built-in responder) and its ClusterIP
    /// Service on port 80; returns the ClusterIP.
    pub fn http_service(&self, name: &str) -> Result<String> {
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
pub fn conf_value(conf: &str, key: &str) -> String {
    conf.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key} in the peer config:\n{conf}"))
}

/// What onetun needs from a peer's wg-quick config.
#[derive(Debug, Clone)]
pub struct WgPeer {
    pub private_key: String,
    pub gateway_key: String,
    pub endpoint: String,
    pub address: String,
}

impl WgPeer {
    pub fn from_conf(conf: &str) -> WgPeer {
        let address = conf_value(conf, "Address");
        WgPeer {
            private_key: conf_value(conf, "PrivateKey"),
            gateway_key: conf_value(conf, "PublicKey"),
            endpoint: conf_value(conf, "Endpoint"),
            address: address.split('/').next().unwrap_or_default().to_string(),
        }
    }

    /// One onetun forwarding `127.0.0.1:local` to `remote` (`host:port:PROTO`).
    pub fn onetun(&self, local: u16, remote: &str) -> Process {
        Process::spawn_command(self.onetun_command(local, remote)).expect("onetun starts")
    }

    /// The command of [`WgPeer::onetun`], for a caller to add to (a preshared key in
    /// `ONETUN_PRESHARED_KEY`, `ONETUN_LOG`) before spawning it.
    pub fn onetun_command(&self, local: u16, remote: &str) -> Command {
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
        cmd
    }
}

/// A free TCP port on 127.0.0.1.
/// A loopback port free for TCP and UDP, for a process under test to listen on.
///
/// Not an ephemeral port (`bind(:0)`): between this check and the process's own bind, a
/// concurrent test's outgoing connection could take it as its source port, and a CCM did
/// fail that way ("binding health on ...: address in use"). So ports come from below the
/// kernel's ephemeral range, which connections never use, and below the NodePort range
/// (30000-32767) and above the sandbox's fixed ports (18080, ...), in turn from a random
/// start, so that the tests of one binary (threads of this process) never get the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOWEST: u32 = 20_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .filter(|lo| *lo > LOWEST + 1_000)
        .unwrap_or(32_768);
    let span = ephemeral_start.min(30_000) - LOWEST;
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let port = (LOWEST + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOWEST}..{}", LOWEST + span)
}

/// `curl http://127.0.0.1:PORT/` with a total time limit; (succeeded, body).
pub fn curl_local(port: u16, max_time_s: f64) -> (bool, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-m",
            &max_time_s.to_string(),
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .expect("curl is installed");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

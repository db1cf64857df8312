//! Issue 13, CCM reliability: the real `kuberaya-ccm` binary keeps platform load balancers
//! exactly in line with `type: LoadBalancer` Services while it is SIGKILLed again and again
//! (`ccm_crash_loop_leaks_and_duplicates_nothing`), and while the platform fails, throttles,
//! hangs and restarts (`ccm_converges_under_platform_faults_without_a_retry_storm`).
//!
//! The CCM runs as an operator runs it (kubeconfig, cloud config with the platform URL,
//! credentials in its environment) against two stand-ins, each its own process: the
//! platform stand-in (`kuberaya-sandbox platform`, three worker VMs, restartable on its own
//! state directory, see [`PlatformTarget::restart`]) and the Kubernetes API stand-in
//! (`kuberaya-sandbox kube`), with a `Node` per VM registered by the test as a kubelet would
//! (tainted `uninitialized`: the CCM under test initialises them). No sandbox cluster runs:
//! the CCM only needs Nodes and Services, and the platform stand-in must restart alone.
//!
//! Short by default (100 Services, 20 kills over about a minute); `KR_RELIABILITY_LONG=1`
//! runs the long form (300 Services; 60 kills over 180 s; faults over a 120 s script).
//! `KR_RELIABILITY_SEED=N` replays a run (the seed is printed), `KR_RELIABILITY_CCM_LOG=FILE`
//! keeps every CCM's output. Figures are printed as `RESULT` lines and recorded in
//! docs/reliability.md.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use kuberaya_e2e::calls::{Calls, diff};
use kuberaya_e2e::kube_rest::KubeRest as Kube;
use kuberaya_e2e::{PlatformTarget, Process, SandboxOptions, binary, unique_net_index};
use serde_json::{Value, json};

const CLUSTER_LABEL: &str = "kuberaya.cloudraya.com/cluster-id";
const SERVICE_UID_LABEL: &str = "kuberaya.cloudraya.com/service-uid";
const SERVICE_NAME_LABEL: &str = "kuberaya.cloudraya.com/service-name";
const PROVIDER_PREFIX: &str = "cloudraya://";
const UNINITIALIZED_TAINT: &str = "node.cloudprovider.kubernetes.io/uninitialized";
const FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";
const ALGORITHM: &str = "lb.cloudraya.com/algorithm";
const HC_INTERVAL: &str = "lb.cloudraya.com/health-check-interval";
const NAMESPACE: &str = "default";
const SERVICES: &str = "/api/v1/namespaces/default/services";
/// Worker VMs (and Nodes) of the cluster.
const NODES: usize = 3;
/// The CCM's poll period of busy LBs, and its per-call platform timeout (below the 5 s
/// hangs, so that a hang is a timeout the CCM must recover from).
const POLL: &str = "1s";
const PLATFORM_TIMEOUT_S: u64 = 4;

fn long() -> bool {
    std::env::var("KR_RELIABILITY_LONG").is_ok_and(|v| v == "1")
}

/// A small deterministic PRNG (xorshift64*), seeded from `KR_RELIABILITY_SEED` or the clock.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("KR_RELIABILITY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("seed {seed} (KR_RELIABILITY_SEED={seed} replays this run)");
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        lo + (hi.saturating_sub(lo)).mul_f64(self.unit())
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// The spec of Service `name` at version `v` of the script: every version changes its
/// ports and annotations (version 0 is the created one).
fn service_body(name: &str, v: u32) -> Value {
    let algorithms = ["round_robin", "least_connection", "source"];
    let mut ports = vec![json!({"name": "http", "port": 80 + v, "targetPort": 8080})];
    if v % 2 == 1 {
        ports.push(json!({"name": "https", "port": 443, "targetPort": 8443}));
    }
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE, "annotations": {
            ALGORITHM: algorithms[v as usize % algorithms.len()],
            HC_INTERVAL: (10 + v).to_string(),
        }},
        "spec": {"type": "LoadBalancer", "selector": {"app": name}, "ports": ports}
    })
}

/// The public ports a Service's LB must have at version `v`.
fn ports_of(v: u32) -> BTreeSet<u64> {
    let mut p = BTreeSet::from([u64::from(80 + v)]);
    if v % 2 == 1 {
        p.insert(443);
    }
    p
}

/// The two stand-ins and clients of both.
struct StandIns {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    rt: tokio::runtime::Runtime,
    kube: Kube,
    // Declared before the processes: clients go first.
    _kube_process: Process,
    platform: PlatformTarget,
}

impl StandIns {
    fn up() -> Result<StandIns> {
        let started = Instant::now();
        let n = unique_net_index();
        // Room for 1,022 public IPs: LBs come and go faster than the script's Services.
        let platform = PlatformTarget::start_sandbox(SandboxOptions {
            public_ip_range: Some(format!("127.190.{}.0/22", (u16::from(n) - 60) * 4)),
            workers: Some(NODES as u32),
            provisioning_delay_ms: Some(300),
            ..SandboxOptions::default()
        })?;
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        let mut cmd = Command::new(binary("kuberaya-sandbox"));
        cmd.arg("kube")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--state-dir")
            .arg(dir.path().join("kube"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--service-cidr")
            .arg(format!("127.{}.0.0/20", u16::from(n) + 100));
        let mut kube_process = Process::spawn_command(cmd)?;
        kube_process.wait_for_stdout_line("listening on ", Duration::from_secs(30))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let kube = Kube::from_kubeconfig(&kubeconfig)?;
        let si = StandIns {
            dir,
            kubeconfig,
            rt,
            kube,
            _kube_process: kube_process,
            platform,
        };
        for name in si.vm_names()? {
            si.register_node(&name)?;
        }
        eprintln!("stand-ins with {NODES} VMs and Nodes up in {:.1?}", started.elapsed());
        Ok(si)
    }

    /// A Node as its kubelet registers it: tainted `uninitialized`, then `Ready`.
    fn register_node(&self, name: &str) -> Result<()> {
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"taints": [{"key": UNINITIALIZED_TAINT, "value": "true", "effect": "NoSchedule"}]}
        });
        self.rt.block_on(self.kube.create("/api/v1/nodes", &node))?;
        let now = "2026-01-01T00:00:00Z";
        let status = json!({"status": {"conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "test", "lastHeartbeatTime": now, "lastTransitionTime": now
        }]}});
        self.rt
            .block_on(self.kube.merge_patch(&format!("/api/v1/nodes/{name}/status"), &status))
    }

    fn control(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let ctl = self.platform.control_api();
        let mut last = None;
        // A transport error is retried: the stand-in may be restarting.
        for _ in 0..20 {
            match self.rt.block_on(ctl.try_request(method.clone(), path, body)) {
                Ok(a) => {
                    ensure!((200..300).contains(&a.status), "{method} {path}: {}", a.describe());
                    return Ok(a.data().clone());
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(last.expect("at least one attempt")).context(format!("{method} {path}"))
    }

    /// Call counts of the platform stand-in, `METHOD /path/template` → count.
    fn calls(&self) -> Result<Calls> {
        let data = self.control(reqwest::Method::GET, "/_sandbox/calls", None)?;
        let map = data.get("calls").unwrap_or(&data);
        Ok(map
            .as_object()
            .context("call counts")?
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
            .collect())
    }

    fn set_faults(&self, rules: Value) -> Result<()> {
        self.control(
            reqwest::Method::PUT,
            "/_sandbox/faults",
            Some(&json!({ "rules": rules })),
        )?;
        Ok(())
    }

    /// The platform's whole state (no faults apply to the control API).
    fn state(&self) -> Result<Value> {
        self.control(reqwest::Method::GET, "/_sandbox/state", None)
    }

    fn vm_names(&self) -> Result<Vec<String>> {
        let state = self.state()?;
        let cluster = &self.platform.cluster_id;
        Ok(state["vms"]
            .as_array()
            .context("vms")?
            .iter()
            .filter(|vm| vm["labels"][CLUSTER_LABEL] == cluster.as_str())
            .filter_map(|vm| vm["name"].as_str().map(String::from))
            .collect())
    }

    fn nodes_initialised(&self) -> Result<usize> {
        let v = self.rt.block_on(self.kube.get("/api/v1/nodes"))?;
        Ok(v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| {
                n["spec"]["providerID"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(PROVIDER_PREFIX))
                    && !n["spec"]["taints"]
                        .as_array()
                        .is_some_and(|ts| ts.iter().any(|t| t["key"] == UNINITIALIZED_TAINT))
            })
            .count())
    }

    fn services(&self) -> Result<Vec<Value>> {
        let v = self.rt.block_on(self.kube.get(SERVICES))?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }

    /// Starts `kuberaya-ccm` and waits until it leads (the Lease of a killed one expires
    /// after 2 s).
    fn start_ccm(&self) -> Result<Process> {
        let config = self.dir.path().join("cloud-config.yaml");
        std::fs::write(
            &config,
            format!(
                "api_url: {}\ncluster_id: {}\ntimeout_s: {PLATFORM_TIMEOUT_S}\n",
                self.platform.url, self.platform.cluster_id
            ),
        )?;
        let free = || std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr());
        let (metrics, health) = (free()?.to_string(), free()?.to_string());
        let mut cmd = Command::new(binary("kuberaya-ccm"));
        cmd.env("CLOUDRAYA_EMAIL", &self.platform.email)
            .env("CLOUDRAYA_PASSWORD", &self.platform.password)
            .env("RUST_LOG", "info,kube_runtime=warn")
            .env("NO_COLOR", "1")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cloud-config")
            .arg(&config)
            .args([
                "--leader-elect-resource-namespace",
                "default",
                "--leader-elect-lease-duration",
                "2s",
                "--leader-elect-renew-grace",
                "1s",
                "--metrics-bind-address",
                &metrics,
                "--health-bind-address",
                &health,
                "--secure-bind-address=0",
                "--resync-period",
                "30s",
                "--orphan-sweep-period",
                "5s",
                "--poll-period",
                POLL,
                "--node-sync-debounce",
                "300ms",
            ]);
        let mut process = Process::spawn_command(cmd)?;
        process.set_grace(Duration::from_secs(2));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !process.stdout().contains("became leader") {
            if Instant::now() > deadline || !process.is_running() {
                bail!("kuberaya-ccm did not become leader\n{}", process.output_tails());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(process)
    }
}

/// Panics in a CCM's output.
fn panics(ccm: &Process) -> usize {
    ccm.stdout().matches("panicked at").count() + ccm.stderr().matches("panicked at").count()
}

/// What the Services should be once the script is done: name → version.
type Expected = BTreeMap<String, u32>;

/// One step of the script.
#[derive(Debug, Clone)]
enum Op {
    Create(String),
    Update(String, u32),
    Delete(String),
    /// Create again (a new UID) once the deleted one is gone.
    Recreate(String, u32),
}

/// A script over `n` Services: every one created, about half updated (some twice), a
/// third deleted and half of those created again, each step at a time in `[0, window)`.
fn script(rng: &mut Rng, n: usize, window: Duration) -> (Vec<(Duration, Op)>, Expected) {
    let names: Vec<String> = (0..n).map(|i| format!("svc-{i}")).collect();
    let mut ops = Vec::new();
    let mut expected = Expected::new();
    let at = |rng: &mut Rng, lo: f64, hi: f64| window.mul_f64(lo + (hi - lo) * rng.unit());
    for name in &names {
        ops.push((at(rng, 0.0, 0.3), Op::Create(name.clone())));
        expected.insert(name.clone(), 0);
    }
    let mut order = names.clone();
    rng.shuffle(&mut order);
    let (deleted, kept) = order.split_at(n / 3);
    for (i, name) in kept.iter().enumerate() {
        if i % 2 == 0 {
            ops.push((at(rng, 0.3, 0.6), Op::Update(name.clone(), 1)));
            expected.insert(name.clone(), 1);
        }
        if i % 4 == 0 {
            ops.push((at(rng, 0.6, 0.9), Op::Update(name.clone(), 2)));
            expected.insert(name.clone(), 2);
        }
    }
    for (i, name) in deleted.iter().enumerate() {
        if i % 3 == 0 {
            ops.push((at(rng, 0.3, 0.4), Op::Update(name.clone(), 1)));
        }
        ops.push((at(rng, 0.4, 0.7), Op::Delete(name.clone())));
        expected.remove(name);
        if i % 2 == 0 {
            ops.push((at(rng, 0.75, 1.0), Op::Recreate(name.clone(), 3)));
            expected.insert(name.clone(), 3);
        }
    }
    ops.sort_by_key(|(t, _)| *t);
    (ops, expected)
}

/// Runs the script against the API server (16 steps in flight at most; a step's time is
/// when it may start). A recreate whose name still terminates is retried every 500 ms.
async fn run_script(kube: Kube, ops: Vec<(Duration, Op)>, done: Arc<AtomicBool>) -> Result<usize> {
    use futures::StreamExt;
    let started = tokio::time::Instant::now();
    // Steps of one Service stay in order: its create, updates and delete are far apart
    // in time, and each waits for the previous one of its Service.
    let locks: Arc<Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>> = Arc::default();
    let n = ops.len();
    let results: Vec<Result<()>> = futures::stream::iter(ops)
        .map(|(at, op)| {
            let kube = kube.clone();
            let locks = locks.clone();
            async move {
                tokio::time::sleep_until(started + at).await;
                let name = match &op {
                    Op::Create(n) | Op::Update(n, _) | Op::Delete(n) | Op::Recreate(n, _) => n.clone(),
                };
                let lock = locks.lock().unwrap().entry(name.clone()).or_default().clone();
                let _held = lock.lock().await;
                match op {
                    Op::Create(name) => {
                        let s = kube.create_or_conflict(SERVICES, &service_body(&name, 0)).await?;
                        ensure!(s != 409, "{name} created twice");
                    }
                    Op::Update(name, v) => {
                        let body = service_body(&name, v);
                        let patch = json!({"metadata": {"annotations": body["metadata"]["annotations"]},
                                           "spec": {"ports": body["spec"]["ports"]}});
                        kube.merge_patch(&format!("{SERVICES}/{name}"), &patch).await?;
                    }
                    Op::Delete(name) => kube.delete_if_present(&format!("{SERVICES}/{name}")).await?,
                    Op::Recreate(name, v) => {
                        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
                        while kube.create_or_conflict(SERVICES, &service_body(&name, v)).await? == 409 {
                            ensure!(tokio::time::Instant::now() < deadline, "{name} never went away");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    done.store(true, Ordering::SeqCst);
    for r in results {
        r?;
    }
    Ok(n)
}

/// How far the platform is from the Services.
#[derive(Debug, Default)]
struct Tally {
    /// Services expected and found with a finished LB (one, active, its ports, ingress = its IP).
    converged: usize,
    expected: usize,
    /// LBs of our cluster whose Service (by UID) does not exist.
    leaked: usize,
    /// LBs beyond the first of one Service.
    duplicated: usize,
    /// Services whose ingress IP is not their LB's public IP.
    wrong_ip: usize,
    /// Public IPs labelled with our cluster and attached to nothing.
    unattached_ips: usize,
    /// Services that exist but should not, or should but do not (the script's view).
    unexpected_services: usize,
    /// Why each unconverged Service is not, for failure messages (first few).
    notes: Vec<String>,
}

impl Tally {
    fn clean(&self) -> bool {
        self.converged == self.expected
            && self.leaked == 0
            && self.duplicated == 0
            && self.wrong_ip == 0
            && self.unattached_ips == 0
            && self.unexpected_services == 0
    }

    fn line(&self) -> String {
        format!(
            "converged {}/{}, leaked {}, duplicated {}, wrong ingress IPs {}, unattached public IPs {}, stuck or missing Services {}",
            self.converged,
            self.expected,
            self.leaked,
            self.duplicated,
            self.wrong_ip,
            self.unattached_ips,
            self.unexpected_services
        )
    }
}

/// Compares the platform's LBs and public IPs with the Services (and the script's
/// `expected` final state).
fn tally(si: &StandIns, expected: &Expected) -> Result<Tally> {
    let services = si.services()?;
    let state = si.state()?;
    let cluster = si.platform.cluster_id.as_str();
    let lbs: Vec<&Value> = state["load_balancers"]
        .as_array()
        .context("load_balancers in the state")?
        .iter()
        .filter(|lb| lb["labels"][CLUSTER_LABEL] == cluster)
        .collect();
    let ips: Vec<&Value> = state["public_ips"]
        .as_array()
        .context("public_ips in the state")?
        .iter()
        .filter(|ip| ip["labels"][CLUSTER_LABEL] == cluster)
        .collect();
    let mut by_uid: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for lb in &lbs {
        by_uid
            .entry(lb["labels"][SERVICE_UID_LABEL].as_str().unwrap_or("-"))
            .or_default()
            .push(lb);
    }
    let ip_addr = |id: &Value| -> Option<String> {
        ips.iter()
            .find(|ip| ip["id"] == *id)
            .and_then(|ip| ip["address"].as_str().map(String::from))
    };
    let mut t = Tally {
        expected: expected.len(),
        ..Tally::default()
    };
    let mut live_uids = BTreeSet::new();
    let mut seen = BTreeSet::new();
    // The script's Services only (not the API server's own `kubernetes`).
    for svc in services
        .iter()
        .filter(|s| s["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("svc-")))
    {
        let name = svc["metadata"]["name"].as_str().unwrap_or_default();
        let uid = svc["metadata"]["uid"].as_str().unwrap_or_default();
        live_uids.insert(uid);
        seen.insert(name.to_string());
        let Some(version) = expected.get(name) else {
            t.unexpected_services += 1;
            t.notes.push(format!(
                "{name}: exists (deleting: {})",
                svc["metadata"]["deletionTimestamp"]
            ));
            continue;
        };
        let mine = by_uid.get(uid).cloned().unwrap_or_default();
        t.duplicated += mine.len().saturating_sub(1);
        let ingress = svc["status"]["loadBalancer"]["ingress"][0]["ip"].as_str();
        let Some(lb) = mine.first() else {
            t.notes.push(format!("{name}: no LB (ingress {ingress:?})"));
            continue;
        };
        // The LB's address: the state has the public IP's id or the embedded object.
        let lb_ip = lb["public_ip"]["address"]
            .as_str()
            .map(String::from)
            .or_else(|| ip_addr(&lb["public_ip_id"]))
            .or_else(|| ip_addr(&lb["public_ip"]["id"]));
        let ports: BTreeSet<u64> = lb["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["public_port"].as_u64())
            .collect();
        let finalized = svc["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == FINALIZER));
        if ingress.is_some() && ingress.map(String::from) != lb_ip {
            t.wrong_ip += 1;
            t.notes.push(format!("{name}: ingress {ingress:?}, LB IP {lb_ip:?}"));
        }
        if lb["status"] == "active" && ports == ports_of(*version) && ingress.is_some() && finalized {
            if ingress.map(String::from) == lb_ip {
                t.converged += 1;
            }
        } else {
            t.notes.push(format!(
                "{name}: LB {} {} ports {ports:?} (want {:?}), ingress {ingress:?}, finalizer {finalized}",
                lb["id"],
                lb["status"],
                ports_of(*version)
            ));
        }
    }
    t.unexpected_services += expected.keys().filter(|n| !seen.contains(*n)).count();
    for (uid, l) in &by_uid {
        if !live_uids.contains(uid) {
            t.leaked += l.len();
            for lb in l {
                t.notes.push(format!(
                    "leaked LB {} {} of {} ({})",
                    lb["id"], lb["name"], lb["labels"][SERVICE_NAME_LABEL], lb["status"]
                ));
            }
        }
    }
    for ip in &ips {
        if ip["attached_to"].is_null() {
            t.unattached_ips += 1;
            t.notes
                .push(format!("unattached public IP {} {}", ip["id"], ip["address"]));
        }
    }
    Ok(t)
}

/// The lines of the CCM's output that mention a Service or LB named in `notes` (the
/// first 60), for failure messages.
fn ccm_lines_about(ccm: &Process, notes: &[String]) -> String {
    let names: BTreeSet<String> = notes
        .iter()
        .filter_map(|n| n.split([':', ' ']).next())
        .filter(|n| n.starts_with("svc-"))
        .map(|n| format!("default/{n}}}"))
        .collect();
    let out = ccm.stdout();
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| names.iter().any(|n| l.contains(n.as_str())))
        .collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// The lines of the platform stand-in's output that mention an LB named in `notes` (run
/// with `RUST_LOG=kuberaya_sandbox=info` for its transitions).
fn platform_lines_about(si: &StandIns, notes: &[String]) -> String {
    let ids: BTreeSet<String> = notes
        .iter()
        .flat_map(|n| n.split(['"', ' ']))
        .filter(|w| w.starts_with("lb-"))
        .map(String::from)
        .collect();
    let Some(p) = si.platform.process.as_ref() else {
        return String::new();
    };
    let out = format!("{}{}", p.stdout(), p.stderr());
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| ids.iter().any(|id| l.contains(id.as_str())))
        .collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// How often the CCM logged each of the messages that tell where its time went
/// (refusals by reason, failed reconciles by operation, retried calls).
fn ccm_log_summary(ccm: &Process) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in ccm.stdout().lines() {
        let key = if line.contains("load balancer refused") {
            let reason = line.split("reason=").nth(1).and_then(|r| r.split_whitespace().next());
            format!("refused {}", reason.unwrap_or("?"))
        } else if line.contains("reconcile failed") {
            let ops = [
                "list_load_balancers",
                "create_load_balancer",
                "update_load_balancer",
                "delete_load_balancer",
                "login",
                "Kubernetes",
            ];
            let op = ops.iter().find(|op| line.contains(*op)).unwrap_or(&"other");
            format!("reconcile failed ({op})")
        } else if line.contains("retrying") {
            "platform call retried".into()
        } else {
            continue;
        };
        *out.entry(key).or_default() += 1;
    }
    out
}

/// Keeps the CCM's whole output in the file `KR_RELIABILITY_CCM_LOG` names, if any (for a
/// look at a run afterwards; the CCM's own log directory goes with it).
fn keep_ccm_log(ccm: &Process) {
    if let Some(path) = std::env::var_os("KR_RELIABILITY_CCM_LOG") {
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, ccm.stdout().as_bytes()));
    }
}

/// Polls [`tally`] every second until it is clean or `limit` has passed; returns the last
/// one and how long it took.
fn wait_converged(si: &StandIns, expected: &Expected, limit: Duration) -> Result<(Tally, Duration)> {
    let started = Instant::now();
    loop {
        let t = tally(si, expected)?;
        if t.clean() || started.elapsed() > limit {
            return Ok((t, started.elapsed()));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Calls on load-balancer and public-IP routes (the ones a Service's reconciles make).
fn service_calls(calls: &Calls) -> u64 {
    calls
        .iter()
        .filter(|(k, _)| k.contains(" /kubernetes/v1/clusters/{cluster_id}/load-balancers") || k.contains(" /network/"))
        .map(|(_, v)| v)
        .sum()
}

/// Starts the CCM and waits until it has initialised every Node.
fn first_ccm(si: &StandIns) -> Result<Process> {
    let ccm = si.start_ccm()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while si.nodes_initialised()? < NODES {
        ensure!(
            Instant::now() < deadline,
            "the CCM initialises the Nodes\n{}",
            ccm.output_tails()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(ccm)
}

/// Scenario "CCM crash loop": while the script creates, updates and deletes the Services,
/// the CCM is SIGKILLed at random moments and restarted (each new one waits for the dead
/// one's Lease to expire). Afterwards the LBs match the Services exactly.
#[test]
fn ccm_crash_loop_leaks_and_duplicates_nothing() -> Result<()> {
    let (services, kills, window) = if long() {
        (300, 60, Duration::from_secs(180))
    } else {
        (100, 20, Duration::from_secs(60))
    };
    let started = Instant::now();
    let mut rng = Rng::from_env();
    let si = StandIns::up()?;
    let mut ccm = first_ccm(&si)?;
    let (ops, expected) = script(&mut rng, services, window);
    eprintln!(
        "script: {} steps over {window:?} for {services} Services ({} at the end); {kills} kills",
        ops.len(),
        expected.len()
    );
    let done = Arc::new(AtomicBool::new(false));
    let script_task = si.rt.spawn(run_script(si.kube.clone(), ops, done.clone()));

    // Kill at random moments: on average one kill per window/kills, counting the new
    // one's wait for the Lease (about 2 s) as part of it.
    let mut panicked = 0;
    let mut lived = Vec::new();
    let mean = window.div_f64(kills as f64).saturating_sub(Duration::from_secs(2));
    for k in 0..kills {
        let life = rng.between(Duration::from_millis(100), mean * 2);
        std::thread::sleep(life);
        ccm.signal(libc::SIGKILL);
        ccm.stop();
        panicked += panics(&ccm);
        keep_ccm_log(&ccm);
        lived.push(life);
        ccm = si
            .start_ccm()
            .with_context(|| format!("restart {} of {kills}", k + 1))?;
    }
    let kill_phase = started.elapsed();
    let steps = match si.rt.block_on(script_task)? {
        Ok(steps) => steps,
        Err(e) => {
            keep_ccm_log(&ccm);
            let stuck = vec![e.to_string()];
            bail!("{e:#}\nthe last CCM about it:\n{}", ccm_lines_about(&ccm, &stuck));
        }
    };
    eprintln!(
        "{kills} kills in {kill_phase:.1?} (lives {:?}); script of {steps} steps done at {:.1?}",
        lived
            .iter()
            .map(|d| format!("{:.1}", d.as_secs_f64()))
            .collect::<Vec<_>>(),
        started.elapsed()
    );

    let (t, took) = wait_converged(&si, &expected, Duration::from_secs(if long() { 240 } else { 90 }))?;
    panicked += panics(&ccm);
    keep_ccm_log(&ccm);
    println!(
        "RESULT ccm crash loop: {services} Services, {steps} steps, {kills} SIGKILLs: {}, panics {panicked}, converged {:.1}s after the script (total {:.1}s)",
        t.line(),
        took.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    ensure!(
        t.clean() && panicked == 0,
        "not clean after the crash loop: {}, panics {panicked}\n{}\nthe last CCM about them:\n{}\nthe platform about them:\n{}",
        t.line(),
        t.notes.iter().take(40).cloned().collect::<Vec<_>>().join("\n"),
        ccm_lines_about(&ccm, &t.notes),
        platform_lines_about(&si, &t.notes)
    );
    Ok(())
}

/// Adds `b` to `a`, route by route (call counts of two lives of the stand-in).
fn add(a: &mut Calls, b: &Calls) {
    for (k, v) in b {
        *a.entry(k.clone()).or_default() += v;
    }
}

/// The faults of scenario "Platform faults": 20 % of public calls answered 503, a quota
/// of `rate` calls a second (429 with `Retry-After: 1` beyond it), and, when `burst`,
/// the next 30 calls answered 429 with `Retry-After: 1`; when `hang`, every call on the
/// LB routes also takes 5 s (longer than the CCM's 4 s timeout: the CCM gives up, but a
/// POST, PUT or DELETE still happens).
fn fault_rules(rate: u32, burst: bool, hang: bool) -> Value {
    let mut rules = Vec::new();
    if burst {
        rules.push(json!({"throttle_next": 30, "retry_after_s": 1}));
    }
    rules.push(json!({"rate_limit_per_s": rate, "retry_after_s": 1}));
    if hang {
        rules.push(json!({"path": "/kubernetes/*/load-balancers*", "latency_ms": 5000}));
    }
    rules.push(json!({"error_rate": 0.2, "error_status": 503}));
    Value::Array(rules)
}

/// Calls per Service per minute allowed on the LB and public-IP routes (see
/// docs/reliability.md, "the bound"): a converging Service needs a handful of calls
/// per change; the CCM retries a call at most 3 times, backs off per Service from 1 s
/// up, polls a busy LB once per poll period (1 s) and resyncs an in-sync one every 30 s.
const MAX_CALLS_PER_SERVICE_MINUTE: f64 = 30.0;

/// Scenario "Platform faults": the Services are created, updated and deleted while the
/// platform answers 20 % of calls with 503, throttles (a quota and 429 bursts), takes 5 s
/// for every LB call for a while, and restarts mid-way. Everything converges, and the
/// calls the stand-in counted stay within [`MAX_CALLS_PER_SERVICE_MINUTE`].
#[test]
fn ccm_converges_under_platform_faults_without_a_retry_storm() -> Result<()> {
    let (services, rate) = if long() { (300, 40) } else { (100, 30) };
    let started = Instant::now();
    let mut rng = Rng::from_env();
    let mut si = StandIns::up()?;
    let ccm = first_ccm(&si)?;
    let window = Duration::from_secs(if long() { 120 } else { 40 });
    let (ops, expected) = script(&mut rng, services, window);
    let before = si.calls()?;
    si.set_faults(fault_rules(rate, true, false))?;
    let faults_on = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let script_task = si.rt.spawn(run_script(si.kube.clone(), ops, done.clone()));

    // The timeline, as fractions of the script's window (creates run from 0 to 30 %):
    // 429 bursts every 10 s, 5 s per LB call from 5 % to 30 %, the stand-in restarted at
    // 20 % (LBs are being created and provisioned).
    let mut counted = BTreeMap::new();
    let mut restarted = false;
    let mut hang = false;
    let mut last_burst = Instant::now();
    let mut events = Vec::new();
    while !done.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(250));
        let at = faults_on.elapsed().as_secs_f64() / window.as_secs_f64();
        if !restarted && at >= 0.2 {
            add(&mut counted, &si.calls()?);
            let t = Instant::now();
            si.platform.restart()?;
            events.push(format!("stand-in restarted in {:.1?}", t.elapsed()));
            restarted = true;
            si.set_faults(fault_rules(rate, false, hang))?;
        }
        let want_hang = (0.05..0.3).contains(&at);
        let burst = last_burst.elapsed() >= Duration::from_secs(10);
        if want_hang != hang || burst {
            hang = want_hang;
            if burst {
                last_burst = Instant::now();
            }
            si.set_faults(fault_rules(rate, burst, hang))?;
        }
    }
    let steps = si.rt.block_on(script_task)??;
    si.set_faults(fault_rules(rate, false, false))?;
    ensure!(restarted, "the stand-in restarted during the script");
    eprintln!("script of {steps} steps done at {:.1?}; {events:?}", started.elapsed());

    // Convergence with the 20 % errors and the quota still on.
    let (t, took) = wait_converged(&si, &expected, Duration::from_secs(if long() { 300 } else { 120 }))?;
    let fault_phase = faults_on.elapsed();
    add(&mut counted, &si.calls()?);
    si.set_faults(json!([]))?;
    let calls = diff(&before, &counted);
    let lb_calls = service_calls(&calls);
    let per_service_minute = lb_calls as f64 / services as f64 / (fault_phase.as_secs_f64() / 60.0);
    let panicked = panics(&ccm);
    keep_ccm_log(&ccm);
    println!(
        "RESULT ccm platform faults: {services} Services, {steps} steps, 20% 503, quota {rate}/s, 429 bursts of 30 every 10 s, 5 s per LB call for {:.0} s, 1 stand-in restart: {}, panics {panicked}, converged {:.1}s after the script; {lb_calls} LB/IP calls in {:.0}s = {per_service_minute:.1} per Service per minute (bound {MAX_CALLS_PER_SERVICE_MINUTE})",
        window.as_secs_f64() * 0.25,
        t.line(),
        took.as_secs_f64(),
        fault_phase.as_secs_f64()
    );
    eprintln!("calls by route: {calls:#?}\nCCM log: {:#?}", ccm_log_summary(&ccm));
    ensure!(
        t.clean() && panicked == 0,
        "not clean under platform faults: {}, panics {panicked}\n{}\nthe CCM about them:\n{}\nthe platform about them:\n{}",
        t.line(),
        t.notes.iter().take(40).cloned().collect::<Vec<_>>().join("\n"),
        ccm_lines_about(&ccm, &t.notes),
        platform_lines_about(&si, &t.notes)
    );
    ensure!(
        per_service_minute <= MAX_CALLS_PER_SERVICE_MINUTE,
        "retry storm: {per_service_minute:.1} LB/IP calls per Service per minute (bound {MAX_CALLS_PER_SERVICE_MINUTE}): {calls:#?}"
    );
    Ok(())
}

//! Issue 13, API server faults: watch streams cut, 410 Gone, the API server restarted.
//! The real `kuberaya-ccm` and `kuberaya-gateway` (Kubernetes mode) run against the
//! `kuberaya-sandbox kube` stand-in as a process of its own (so it can be restarted on the
//! same address, CA and tokens) and, for the CCM, the `kuberaya-sandbox platform` stand-in.
//!
//! Faults, driven through the stand-in's admin-only `/_sandbox/` controls:
//! - `cut`: every open watch connection breaks mid-stream (no ERROR event);
//! - `cut+429`: the same, and the next re-watches and re-lists are refused with 429;
//! - `410`: the watch history is compacted, open watches end with 410 Gone;
//! - `restart`: the stand-in is stopped (SIGTERM) and started again on the same state.
//!
//! During each fault the tests change things (Services created, updated, deleted;
//! VpnPeers created, deleted, disabled) and then prove every change took effect and that
//! nothing unchanged was redone: load balancers of untouched Services keep their id and
//! `updated_at` (no POST, PUT or DELETE reached them; mutating platform calls are counted
//! by the platform stand-in), and a bystander peer keeps its WireGuard session (its
//! handshake count does not move). Figures are printed (`--nocapture`).
//!
//! `KR_RELIABILITY_LONG=1` runs the longer form: more Services and every fault three times.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kuberaya_e2e::calls::{Calls, diff, parse_calls};
use kuberaya_e2e::ccm::{Ccm, write_cloud_config};
use kuberaya_e2e::cloud::{CLUSTER_LABEL, by_service};
use kuberaya_e2e::cluster::{Cluster, ingress_ip};
use kuberaya_e2e::gateway::{self, CutOff, Gateway, free_udp_port};
use kuberaya_e2e::kube_stand_in;
use kuberaya_e2e::sandbox::{free_port, gateway_keypair, onetun_path, output_text};
use kuberaya_e2e::{JsonApi, PlatformTarget, Process, SandboxOptions, poll_until_blocking, unique_net_index};
use serde_json::{Value, json};

const CLUSTER_ID: &str = "cl-reliability";
const GW_NS: &str = "kuberaya-system";

fn long() -> bool {
    std::env::var("KR_RELIABILITY_LONG").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The faults of the scenario, in the order they are applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Cut,
    CutThrottled,
    Gone,
    Restart,
    /// Down longer than the clients' periodic work (the gateway re-reads preshared keys
    /// every 10 s), shorter than the CCM's 15 s leader lease.
    Outage,
}

/// How long [`Fault::Outage`] keeps the API server down.
const OUTAGE: Duration = Duration::from_secs(12);

impl Fault {
    fn all() -> Vec<Fault> {
        let one = [
            Fault::Cut,
            Fault::CutThrottled,
            Fault::Gone,
            Fault::Restart,
            Fault::Outage,
        ];
        let rounds = if long() { 3 } else { 1 };
        (0..rounds).flat_map(|_| one).collect()
    }

    fn name(self) -> &'static str {
        match self {
            Fault::Cut => "cut",
            Fault::CutThrottled => "cut+429",
            Fault::Gone => "410",
            Fault::Restart => "restart",
            Fault::Outage => "outage",
        }
    }
}

/// The `kuberaya-sandbox kube` process: its state dir, address and kubeconfig stay the
/// same across restarts.
struct KubeServer {
    state: PathBuf,
    kubeconfig: PathBuf,
    addr: SocketAddr,
    url: String,
    service_cidr: String,
    process: Option<Process>,
    restarts: u32,
}

impl KubeServer {
    fn start(dir: &Path, service_cidr: &str) -> Result<KubeServer> {
        let mut k = KubeServer {
            state: dir.join("kube"),
            kubeconfig: dir.join("kubeconfig"),
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            url: String::new(),
            service_cidr: service_cidr.to_string(),
            process: None,
            restarts: 0,
        };
        k.spawn()?;
        Ok(k)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = kube_stand_in::command(&self.state, &self.kubeconfig);
        cmd.args(["--listen", &self.addr.to_string(), "--service-cidr", &self.service_cidr]);
        let mut p = Process::spawn_command(cmd)?;
        let url = kube_stand_in::wait_listening(&mut p, Duration::from_secs(60))?;
        ensure!(
            self.url.is_empty() || url == self.url,
            "the restarted API server moved from {} to {url}",
            self.url
        );
        self.url = url;
        self.process = Some(p);
        Ok(())
    }

    /// What a client trusts and presents: the CA, the admin token, the kubeconfig.
    fn identity(&self) -> Result<(String, String, String)> {
        Ok((
            std::fs::read_to_string(self.state.join("ca.crt"))?,
            std::fs::read_to_string(self.state.join("admin-token"))?,
            std::fs::read_to_string(&self.kubeconfig)?,
        ))
    }

    /// Stops the server with SIGTERM and starts it again after `pause` on the same address
    /// and state; checks the CA, token and kubeconfig did not change. Returns the downtime.
    fn restart(&mut self, pause: Duration) -> Result<Duration> {
        let before = self.identity()?;
        let mut p = self.process.take().context("the API server runs")?;
        let stopped = Instant::now();
        let status = p.stop();
        ensure!(
            status.is_some_and(|s| s.success()),
            "SIGTERM stops the API server cleanly: {}",
            p.output_tails()
        );
        drop(p);
        std::thread::sleep(pause);
        self.spawn()?;
        let down = stopped.elapsed();
        ensure!(
            self.identity()? == before,
            "the restarted API server kept its CA, admin token and kubeconfig"
        );
        self.restarts += 1;
        Ok(down)
    }

    /// A call of the stand-in's admin-only `/_sandbox/` controls (with curl, trusting the
    /// stand-in's CA).
    fn control(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let token = std::fs::read_to_string(self.state.join("admin-token"))?;
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-m", "10", "-X", method, "--cacert"])
            .arg(self.state.join("ca.crt"))
            .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
            .args(["-w", "\n%{http_code}"]);
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data", &b.to_string()]);
        }
        let out = cmd.arg(format!("{}/_sandbox/{path}", self.url)).output()?;
        ensure!(
            out.status.success(),
            "curl {method} /_sandbox/{path}: {}",
            output_text(&out)
        );
        let all = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = all.rsplit_once('\n').context("status line")?;
        ensure!(code == "200", "{method} /_sandbox/{path}: {code} {body}");
        Ok(serde_json::from_str(body)?)
    }

    /// Requests by verb and resource (`"list services"` → n) of every client but kubectl
    /// (the test's own), since the start of this server process.
    fn requests(&self) -> Result<BTreeMap<String, u64>> {
        let v = self.control("GET", "requests", None)?;
        let mut out = BTreeMap::new();
        for (agent, counts) in v["byAgent"].as_object().context("byAgent")? {
            if agent == "kubectl" {
                continue;
            }
            for (k, n) in counts.as_object().context("counts")? {
                *out.entry(k.clone()).or_default() += n.as_u64().unwrap_or(0);
            }
        }
        Ok(out)
    }

    fn open_watches(&self) -> Result<u64> {
        self.control("GET", "requests", None)?["openWatches"]
            .as_u64()
            .context("openWatches")
    }

    /// Waits until `want` watches are open again (every client re-watching); returns when,
    /// from `since`.
    fn wait_watches(&self, want: u64, since: Instant, what: &str) -> Result<Duration> {
        let mut last = 0;
        poll_until_blocking(Duration::from_secs(40), || {
            last = self.open_watches().unwrap_or(0);
            (last >= want).then(|| since.elapsed())
        })
        .with_context(|| format!("{what}: {last} watches open again, want {want}"))
    }

    /// Applies `fault` (the restart included); returns a one-line description.
    fn inject(&mut self, fault: Fault) -> Result<String> {
        Ok(match fault {
            Fault::Cut => {
                let v = self.control("POST", "watches/cut", None)?;
                format!("{} open watches cut", v["cut"])
            }
            Fault::CutThrottled => {
                self.control(
                    "PUT",
                    "faults",
                    Some(&json!({"code": 429, "count": 6, "verbs": ["watch", "list"], "retryAfterSeconds": 1})),
                )?;
                let v = self.control("POST", "watches/cut", None)?;
                format!(
                    "{} open watches cut, the next 6 watches/lists refused with 429",
                    v["cut"]
                )
            }
            Fault::Gone => {
                let v = self.control("POST", "history/compact", None)?;
                format!(
                    "history compacted at resourceVersion {}, {} open watches ended with 410",
                    v["resourceVersion"], v["endedWatches"]
                )
            }
            Fault::Restart => {
                let down = self.restart(Duration::ZERO)?;
                format!("API server restarted (down {} ms)", down.as_millis())
            }
            Fault::Outage => {
                let down = self.restart(OUTAGE)?;
                format!("API server down {} ms, then restarted", down.as_millis())
            }
        })
    }

    /// How many requests of `fault`'s 429 budget are left (0 for other faults).
    fn failures_left(&self) -> Result<u64> {
        Ok(self.control("GET", "faults", None)?["failing"]["count"]
            .as_u64()
            .unwrap_or(0))
    }
}

/// The cluster of the stand-in through `kubectl`, every call bounded by
/// `--request-timeout=20s` (a call during an outage fails instead of hanging).
impl Cluster for KubeServer {
    fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    fn request_timeout(&self) -> Option<Duration> {
        Some(Duration::from_secs(20))
    }
}

/// Differences of two request-count maps for keys matching `pred`.
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, key: &str) -> i64 {
    after.get(key).copied().unwrap_or(0) as i64 - before.get(key).copied().unwrap_or(0) as i64
}

/// Request counts reset with a restarted server: the delta then is the new count.
fn since(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, key: &str, restarted: bool) -> i64 {
    if restarted {
        after.get(key).copied().unwrap_or(0) as i64
    } else {
        delta(before, after, key)
    }
}

// ---------------------------------------------------------------------------------------
// The CCM.

/// The platform stand-in process and a logged-in client of it.
struct Platform {
    target: PlatformTarget,
    rt: tokio::runtime::Runtime,
    api: JsonApi,
    ctl: JsonApi,
}

impl Platform {
    fn start(n: u8) -> Result<Platform> {
        let target = PlatformTarget::start_sandbox(SandboxOptions {
            public_ip_range: Some(format!("127.203.{n}.0/24")),
            vm_ip_range: Some(format!("127.10.{n}.0/24")),
            cluster_id: Some(CLUSTER_ID.into()),
            workers: Some(3),
            provisioning_delay_ms: Some(100),
            ..SandboxOptions::default()
        })?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let api = rt.block_on(target.login())?;
        Ok(Platform {
            ctl: target.control_api(),
            target,
            rt,
            api,
        })
    }

    fn list(&self, path: &str) -> Result<Vec<Value>> {
        self.rt.block_on(self.api.list_all(path))
    }

    fn lbs(&self) -> Result<Vec<Value>> {
        self.list(&format!("/kubernetes/v1/clusters/{CLUSTER_ID}/load-balancers"))
    }

    /// Mutating calls so far (`POST`, `PUT`, `PATCH`, `DELETE`), login excluded.
    fn mutating_calls(&self) -> Result<Calls> {
        let a = self.rt.block_on(self.ctl.get("/_sandbox/calls"));
        let mut calls = parse_calls(&a)?;
        calls.retain(|k, _| {
            ["POST ", "PUT ", "PATCH ", "DELETE "].iter().any(|m| k.starts_with(m)) && !k.contains("/auth/")
        });
        Ok(calls)
    }
}

/// The calls that grew between two samples, and their sum.
fn sum_delta(before: &Calls, after: &Calls) -> (u64, Calls) {
    let grown = diff(before, after);
    (grown.values().sum(), grown)
}

fn service_yaml(name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: LoadBalancer\n  selector:\n    app: {name}\n  ports:\n  - name: http\n    port: {port}\n    targetPort: 8080\n"
    )
}

/// Whether the platform matches `expected` (Service → port): one active LB per Service
/// with that public port, its IP in the Service's ingress, no LB of any other Service.
/// Returns the LBs by Service, or what is still wrong.
fn lbs_match(
    kube: &KubeServer,
    platform: &Platform,
    expected: &BTreeMap<String, u16>,
) -> Result<std::result::Result<BTreeMap<String, Value>, String>> {
    let by_svc = by_service(platform.lbs()?);
    let services = kube.get_json(&["get", "services", "-n", "default"])?;
    let ingress: BTreeMap<String, String> = services["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter_map(|s| Some((s["metadata"]["name"].as_str()?.to_string(), ingress_ip(s)?)))
        .collect();
    let mut wrong = Vec::new();
    for (svc, lbs) in &by_svc {
        if !expected.contains_key(svc) {
            wrong.push(format!("{svc}: {} LB(s) left", lbs.len()));
        }
    }
    let mut out = BTreeMap::new();
    for (svc, port) in expected {
        match by_svc.get(svc).map(Vec::as_slice) {
            Some([lb]) => {
                let ports: Vec<u64> = lb["rules"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r["public_port"].as_u64())
                    .collect();
                let ip = lb["public_ip"]["address"].as_str().unwrap_or_default();
                if lb["status"] != "active" {
                    wrong.push(format!("{svc}: LB {}", lb["status"]));
                } else if ports != [u64::from(*port)] {
                    wrong.push(format!("{svc}: LB ports {ports:?}, want {port}"));
                } else if ingress.get(svc).map(String::as_str) != Some(ip) {
                    wrong.push(format!("{svc}: ingress {:?}, LB IP {ip}", ingress.get(svc)));
                } else {
                    out.insert(svc.clone(), lb.clone());
                }
            }
            Some(many) => wrong.push(format!("{svc}: {} LBs", many.len())),
            None => wrong.push(format!("{svc}: no LB")),
        }
    }
    Ok(if wrong.is_empty() {
        Ok(out)
    } else {
        Err(wrong.join("; "))
    })
}

/// Waits until the platform matches `expected`; returns the LBs and how long it took.
fn converge(
    kube: &KubeServer,
    platform: &Platform,
    expected: &BTreeMap<String, u16>,
    timeout: Duration,
) -> Result<(BTreeMap<String, Value>, Duration)> {
    let start = Instant::now();
    loop {
        let last = match lbs_match(kube, platform, expected)? {
            Ok(lbs) => return Ok((lbs, start.elapsed())),
            Err(w) => w,
        };
        if start.elapsed() > timeout {
            bail!("not converged within {} s: {last}", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The changes of one phase: two Services created, two updated (new port), two deleted.
struct Changes {
    create: Vec<String>,
    update: Vec<String>,
    delete: Vec<String>,
}

impl Changes {
    /// Picks the changes of phase `k` from `expected` (touching no Service changed before,
    /// so every phase leaves untouched Services to check).
    fn pick(k: usize, expected: &BTreeMap<String, u16>, touched: &BTreeSet<String>) -> Result<Changes> {
        let free: Vec<&String> = expected.keys().filter(|s| !touched.contains(*s)).collect();
        ensure!(free.len() >= 6, "enough untouched Services for phase {k}");
        Ok(Changes {
            create: vec![format!("p{k}-new-a"), format!("p{k}-new-b")],
            update: free[0..2].iter().map(|s| s.to_string()).collect(),
            delete: free[2..4].iter().map(|s| s.to_string()).collect(),
        })
    }

    fn count(&self) -> usize {
        self.create.len() + self.update.len() + self.delete.len()
    }

    /// Creates and updates with kubectl; updates `expected` and `touched`.
    fn upsert(
        &self,
        kube: &KubeServer,
        expected: &mut BTreeMap<String, u16>,
        touched: &mut BTreeSet<String>,
    ) -> Result<()> {
        let mut yaml = String::new();
        for s in &self.create {
            yaml.push_str(&service_yaml(s, 80));
            yaml.push_str("---\n");
            expected.insert(s.clone(), 80);
        }
        for s in &self.update {
            let port = expected[s] + 1;
            yaml.push_str(&service_yaml(s, port));
            yaml.push_str("---\n");
            expected.insert(s.clone(), port);
        }
        kube.apply(&yaml)?;
        touched.extend(self.create.iter().chain(&self.update).cloned());
        Ok(())
    }

    /// Deletes with kubectl (not waiting for the finalizer); updates `expected` and `touched`.
    fn delete(
        &self,
        kube: &KubeServer,
        expected: &mut BTreeMap<String, u16>,
        touched: &mut BTreeSet<String>,
    ) -> Result<()> {
        let mut del = vec!["delete", "service", "-n", "default", "--wait=false"];
        del.extend(self.delete.iter().map(String::as_str));
        kube.kubectl(&del)?;
        for s in &self.delete {
            expected.remove(s);
        }
        touched.extend(self.delete.iter().cloned());
        Ok(())
    }
}

/// `(id, updated_at)` of each LB: unchanged means no PUT and no re-create reached it.
fn fingerprints(lbs: &BTreeMap<String, Value>, of: impl Fn(&str) -> bool) -> BTreeMap<String, (String, String)> {
    lbs.iter()
        .filter(|(s, _)| of(s))
        .map(|(s, lb)| {
            (
                s.clone(),
                (
                    lb["id"].as_str().unwrap_or_default().to_string(),
                    lb["updated_at"].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect()
}

fn start_ccm(dir: &Path, kube: &KubeServer, platform: &Platform) -> Result<Ccm> {
    let config = dir.join("cloud-config.yaml");
    write_cloud_config(&config, &platform.target.url, CLUSTER_ID)?;
    let target = &platform.target;
    let mut ccm = Ccm::spawn_with(
        &kube.kubeconfig,
        &config,
        (&target.email, &target.password),
        "info,kuberaya_ccm=debug,kube_runtime=debug",
        // The default lease (15 s, renewed 5 s before it ends) outlives a restart.
        &[
            "--orphan-sweep-period",
            "1h",
            "--poll-period",
            "300ms",
            "--node-sync-debounce",
            "300ms",
        ],
    )?;
    ccm.wait_leader(Duration::from_secs(30))?;
    Ok(ccm)
}

/// Nodes for the platform's VMs, with their providerIDs (no CCM node initialisation needed).
fn register_nodes(kube: &KubeServer, platform: &Platform) -> Result<usize> {
    let vms = platform.list("/vm/v1/instances")?;
    ensure!(!vms.is_empty(), "the platform seeded VMs");
    let mut yaml = String::new();
    for vm in &vms {
        let name = vm["name"].as_str().context("vm name")?;
        let id = vm["id"].as_str().context("vm id")?;
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  providerID: cloudraya://{id}\n---\n"
        ));
    }
    kube.apply(&yaml)?;
    Ok(vms.len())
}

#[test]
fn ccm_resumes_after_api_server_faults() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let n = unique_net_index();
    let platform = Platform::start(n)?;
    let mut kube = KubeServer::start(dir.path(), &format!("127.95.{n}.0/24"))?;
    let nodes = register_nodes(&kube, &platform)?;
    let Ccm { process: mut ccm, .. } = start_ccm(dir.path(), &kube, &platform)?;
    let result = ccm_scenario(&mut kube, &platform, nodes);
    let alive = ccm.is_running();
    result.map_err(|e| {
        let kube_log = kube.process.as_ref().map(|p| p.output_tails()).unwrap_or_default();
        e.context(format!("ccm output:\n{}\nkube:\n{kube_log}", ccm.output_tails()))
    })?;
    ensure!(alive, "the CCM exited\n{}", ccm.output_tails());
    ensure!(
        !ccm.stdout().contains("leadership lost"),
        "the CCM lost its lease\n{}",
        ccm.output_tails()
    );
    Ok(())
}

fn ccm_scenario(kube: &mut KubeServer, platform: &Platform, nodes: usize) -> Result<()> {
    let faults = Fault::all();
    // Each phase (one per fault and a first without) updates two and deletes two Services
    // nobody touched before, and at least two stay untouched to the end.
    let count = 4 * (faults.len() + 1) + 2;
    let started = Instant::now();
    let mut expected: BTreeMap<String, u16> = (0..count).map(|i| (format!("s-{i:02}"), 80)).collect();
    let yaml: String = expected
        .keys()
        .map(|s| format!("{}---\n", service_yaml(s, 80)))
        .collect();
    kube.apply(&yaml)?;
    let (mut lbs, took) = converge(kube, platform, &expected, Duration::from_secs(60))?;
    eprintln!(
        "measured: {count} Services on {nodes} nodes converged in {} ms",
        took.as_millis()
    );
    let mut touched = BTreeSet::new();
    let mut baseline: Option<u64> = None;
    let mut rows = Vec::new();
    // Phase 0 has no fault: its mutating calls are the yardstick for the same changes.
    let phases: Vec<Option<Fault>> = std::iter::once(None).chain(faults.into_iter().map(Some)).collect();
    for (k, fault) in phases.into_iter().enumerate() {
        let changes = Changes::pick(k, &expected, &touched)?;
        let calls_before = platform.mutating_calls()?;
        let requests_before = kube.requests()?;
        let watches_before = kube.open_watches()?;
        let bystanders_before = fingerprints(&lbs, |s| {
            !changes.update.contains(&s.to_string()) && !changes.delete.contains(&s.to_string())
        });
        // A restart: the creates and updates land just before the stop (the watches may
        // not have carried them yet), the deletes while the clients reconnect. Any other
        // fault: every change while the watches are broken or re-listing.
        let changed_at = Instant::now();
        let what = match fault {
            Some(f @ (Fault::Restart | Fault::Outage)) => {
                changes.upsert(kube, &mut expected, &mut touched)?;
                let what = kube.inject(f)?;
                changes.delete(kube, &mut expected, &mut touched)?;
                what
            }
            Some(f) => {
                let what = kube.inject(f)?;
                changes.upsert(kube, &mut expected, &mut touched)?;
                changes.delete(kube, &mut expected, &mut touched)?;
                what
            }
            None => {
                changes.upsert(kube, &mut expected, &mut touched)?;
                changes.delete(kube, &mut expected, &mut touched)?;
                "no fault".to_string()
            }
        };
        converge(kube, platform, &expected, Duration::from_secs(60))?;
        let took = changed_at.elapsed();
        // Let late retries or re-creates show in the counts before they are read.
        std::thread::sleep(Duration::from_secs(2));
        let (after, _) = converge(kube, platform, &expected, Duration::from_secs(10))?;
        lbs = after;
        let (mutating, by_call) = sum_delta(&calls_before, &platform.mutating_calls()?);
        let bystanders_after = fingerprints(&lbs, |s| bystanders_before.contains_key(s));
        let rewritten: Vec<&String> = bystanders_before
            .iter()
            .filter(|(s, fp)| bystanders_after.get(*s) != Some(*fp))
            .map(|(s, _)| s)
            .collect();
        let restarted = matches!(fault, Some(Fault::Restart | Fault::Outage));
        let requests_after = kube.requests()?;
        let relists = since(&requests_before, &requests_after, "list services", restarted);
        let rewatches = since(&requests_before, &requests_after, "watch services", restarted);
        let failures_left = kube.failures_left()?;
        let name = fault.map_or("none", Fault::name);
        let rewatched = kube.wait_watches(watches_before, changed_at, &format!("fault {name}"))?;
        let watches_after = kube.open_watches()?;
        eprintln!(
            "measured: fault={name} ({what}): {} changes converged {}/{} in {} ms; platform mutating calls {mutating} {by_call:?}; \
             untouched LBs rewritten or re-created {}/{}; Service lists {relists}, Service watches {rewatches}; open watches {watches_before} -> {watches_after} (all back at {} ms); injected failures left {failures_left}",
            changes.count(),
            changes.count(),
            changes.count(),
            took.as_millis(),
            rewritten.len(),
            bystanders_before.len(),
            rewatched.as_millis(),
        );
        ensure!(
            rewritten.is_empty(),
            "fault {name}: LBs of unchanged Services were rewritten or re-created: {rewritten:?}\nbefore {bystanders_before:?}\nafter {bystanders_after:?}"
        );
        match baseline {
            None => baseline = Some(mutating),
            Some(b) => ensure!(
                mutating <= b,
                "fault {name}: {mutating} mutating platform calls for the same changes that took {b} without a fault: {by_call:?}"
            ),
        }
        if fault == Some(Fault::Cut) {
            ensure!(
                relists == 0,
                "fault cut: a cut watch resumes from its resourceVersion, yet Services were listed {relists} times"
            );
        }
        if fault.is_some() {
            ensure!(rewatches >= 1, "fault {name}: the Service watch was opened again");
        }
        rows.push(format!(
            "{name}: converged {}/{} in {} ms, untouched LBs rewritten 0/{}, mutating calls {mutating} (no-fault {}), Service re-lists {relists}",
            changes.count(),
            changes.count(),
            took.as_millis(),
            bystanders_before.len(),
            baseline.unwrap_or(0)
        ));
    }
    // Nothing was left behind: every LB is a Service's, and public IPs are all attached.
    let ips = platform.list(&format!("/network/v1/public-ips?label={CLUSTER_LABEL}={CLUSTER_ID}"))?;
    let loose: Vec<&Value> = ips.iter().filter(|ip| ip["attached_to"].is_null()).collect();
    ensure!(loose.is_empty(), "public IPs left unattached: {loose:?}");
    eprintln!(
        "summary: CCM across API server faults, {} Services at the end, {} public IPs, 0 unattached, {} s in all\n  {}",
        expected.len(),
        ips.len(),
        started.elapsed().as_secs(),
        rows.join("\n  ")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The gateway.

/// A small HTTP server on the `web` Service's ClusterIP (a loopback address), standing in
/// for its pods; stops when dropped.
struct Backend {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    fn start(addr: SocketAddr) -> Result<Backend> {
        let listener = TcpListener::bind(addr).with_context(|| format!("binding the backend on {addr}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 2048];
                        let _ = s.read(&mut buf);
                        let body = "pod=web-0 namespace=default\n";
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Backend {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The gateway in Kubernetes mode, its key generated into the Secret `kuberaya-gateway-key`.
fn start_gateway(kube: &KubeServer) -> Result<Gateway> {
    let mut cmd = gateway::kube_command(&kube.kubeconfig, GW_NS);
    cmd.args([
        "--private-key-secret",
        "kuberaya-gateway-key",
        "--listen",
        &format!("127.0.0.1:{}", free_udp_port()),
    ]);
    Gateway::spawn(cmd, Duration::from_secs(60))
}

/// The handshakes of the peer `name` (in the gateway's namespace).
fn handshakes(gw: &Gateway, name: &str) -> u64 {
    gw.handshakes(&format!("{GW_NS}/{name}"))
}

/// An operator's laptop: a key pair, a tunnel address, and at most one onetun.
struct Laptop {
    name: String,
    private: String,
    public: String,
    address: String,
    /// The preshared key, kept in the Secret `<name>-psk`.
    psk: Option<String>,
    tunnel: Option<(u16, Process)>,
}

impl Laptop {
    fn new(name: &str, host: u8) -> Result<Laptop> {
        let (private, public) = gateway_keypair();
        Ok(Laptop {
            name: name.to_string(),
            private,
            public,
            address: format!("100.64.0.{host}"),
            psk: None,
            tunnel: None,
        })
    }

    fn peer_yaml(&self) -> String {
        let psk = match self.psk {
            Some(_) => format!("  presharedKeySecretRef:\n    name: {}-psk\n", self.name),
            None => String::new(),
        };
        format!(
            "apiVersion: vpn.cloudraya.com/v1alpha1\nkind: VpnPeer\nmetadata:\n  name: {}\n  namespace: {GW_NS}\nspec:\n  publicKey: \"{}\"\n  address: {}\n{psk}  allow:\n  - namespace: default\n    service: web\n",
            self.name, self.public, self.address
        )
    }

    /// Gives the laptop a preshared key and stores it in its Secret.
    fn with_psk(mut self, kube: &KubeServer) -> Result<Laptop> {
        // Any 32 random bytes in base64 make a key; a fresh private key is such bytes.
        let (psk, _) = gateway_keypair();
        kube.kubectl(&[
            "create",
            "secret",
            "generic",
            "-n",
            GW_NS,
            &format!("{}-psk", self.name),
            &format!("--from-literal=presharedKey={psk}"),
        ])?;
        self.psk = Some(psk);
        Ok(self)
    }

    /// Starts onetun to `web:80` (once the gateway serves the peer: a stock client whose
    /// first initiation is refused retries only after 5 s).
    fn connect(&mut self, gw: &Gateway, web: &str) -> Result<()> {
        let local = free_port();
        let peer = gw.wg_peer_of(&self.private, &self.address);
        let mut cmd = peer.onetun_command(local, &format!("{web}:80:TCP"));
        if let Some(psk) = &self.psk {
            cmd.env("ONETUN_PRESHARED_KEY", psk);
        }
        self.tunnel = Some((local, Process::spawn_command(cmd)?));
        let ok = poll_until_blocking(Duration::from_secs(15), || {
            self.get(Duration::from_millis(500)).then_some(())
        });
        ensure!(ok.is_some(), "{}: no answer through onetun within 15 s", self.name);
        Ok(())
    }

    /// One HTTP exchange through the tunnel.
    fn get(&self, timeout: Duration) -> bool {
        let Some((port, _)) = &self.tunnel else { return false };
        Command::new("curl")
            .args(["-sS", "-m", &format!("{:.2}", timeout.as_secs_f64())])
            .arg(format!("http://127.0.0.1:{port}/"))
            .output()
            .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).starts_with("pod=web-"))
    }

    /// Waits until the tunnel has failed for 2 s in a row; the time from `since` to the
    /// first failure of that run.
    fn cut_off(&self, since: Instant, timeout: Duration) -> Result<Duration> {
        let mut cut = CutOff::default();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let start = Instant::now();
            if let Some(f) = cut.record(start, self.get(Duration::from_millis(400))) {
                return Ok(f.saturating_duration_since(since));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{}: traffic did not stop within {} s", self.name, timeout.as_secs())
    }
}

/// A peer whose session must survive the faults.
struct Bystander {
    laptop: Laptop,
    handshakes: u64,
    /// When `handshakes` last changed: WireGuard rekeys a session after 120 s.
    session: Instant,
}

impl Bystander {
    /// The session carries traffic and was not redone (no new handshake, unless the
    /// scheduled rekey of a session near 120 s old); returns `name=handshakes`.
    fn untouched(&mut self, gw: &Gateway, fault: &str) -> Result<String> {
        let name = &self.laptop.name;
        ensure!(
            self.laptop.get(Duration::from_secs(2)),
            "fault {fault}: {name}'s traffic: {}",
            gw.metrics()
        );
        // The gateway never dropped or rejected the peer (its log names every such peer).
        let peer = format!("{GW_NS}/{name}");
        let log = format!("{}\n{}", gw.process.stdout(), gw.process.stderr());
        let dropped: Vec<String> = log
            .lines()
            .filter(|l| l.contains(&peer) && (l.contains("peer removed") || l.contains("peer rejected")))
            .map(str::to_string)
            .collect();
        ensure!(
            dropped.is_empty(),
            "fault {fault}: the gateway dropped {name}: {dropped:?}"
        );
        let now = handshakes(gw, name);
        // A margin below WireGuard's 120 s rekey: a loaded machine skews the two clocks.
        let rekey_due = self.session.elapsed() > Duration::from_secs(100);
        ensure!(
            now == self.handshakes || rekey_due,
            "fault {fault}: {name}'s handshakes went from {} to {now} {} s into the session: it was redone",
            self.handshakes,
            self.session.elapsed().as_secs()
        );
        if now != self.handshakes {
            self.handshakes = now;
            self.session = Instant::now();
        }
        Ok(format!("{name}={now}"))
    }
}

/// When each change of a phase showed, from the moment the fault began.
struct Seen {
    watches: Duration,
    accepted: Duration,
    disabled: Duration,
    deleted_cut: Duration,
}

/// Polls, all at once so that each time is measured from `since`: the open watches back
/// to `watches`, `newcomer`'s status Accepted, `disabled`'s status not Accepted, and
/// `doomed`'s tunnel failing for 2 s in a row.
fn watch_changes(
    kube: &KubeServer,
    gw: &Gateway,
    doomed: &Laptop,
    newcomer: &str,
    disabled: &str,
    watches: u64,
    since: Instant,
) -> Result<Seen> {
    let (mut w, mut a, mut d, mut cut) = (None, None, None, None);
    let mut cutoff = CutOff::default();
    let mut last = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(45);
    while Instant::now() < deadline {
        if w.is_none() && kube.open_watches()? >= watches {
            w = Some(since.elapsed());
        }
        if a.is_none() || d.is_none() {
            let peers = kube.get_json(&["get", "vpnpeers", "-n", GW_NS])?;
            let accepted = |name: &str| {
                peers["items"].as_array().into_iter().flatten().find_map(|p| {
                    (p["metadata"]["name"] == name).then(|| {
                        p["status"]["conditions"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .find(|c| c["type"] == "Accepted")
                            .map(|c| c["status"].as_str().unwrap_or_default().to_string())
                    })?
                })
            };
            if a.is_none() && accepted(newcomer).as_deref() == Some("True") {
                a = Some(since.elapsed());
            }
            if d.is_none() && accepted(disabled).as_deref() == Some("False") {
                d = Some(since.elapsed());
            }
            last = peers;
        }
        if cut.is_none() {
            let start = Instant::now();
            cut = cutoff
                .record(start, doomed.get(Duration::from_millis(300)))
                .map(|f| f.saturating_duration_since(since));
        }
        if let (Some(watches), Some(accepted), Some(disabled), Some(deleted_cut)) = (w, a, d, cut) {
            return Ok(Seen {
                watches,
                accepted,
                disabled,
                deleted_cut,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "within 45 s: watches back {w:?}, {newcomer} Accepted {a:?}, {disabled} rejected {d:?}, {} cut {cut:?}; peers: {last}\n{}",
        doomed.name,
        gw.metrics()
    )
}

/// Creates `laptop`'s peer and waits until it carries traffic; returns the time from
/// `kubectl apply` to the first answer.
fn admit(kube: &KubeServer, gw: &Gateway, laptop: &mut Laptop, web: &str, timeout: Duration) -> Result<Duration> {
    let before = gw.accepted();
    kube.apply(&laptop.peer_yaml())?;
    let created = Instant::now();
    let served = poll_until_blocking(timeout, || (gw.accepted() > before).then_some(()));
    ensure!(
        served.is_some(),
        "{}: the gateway never served the new peer within {} s: {}",
        laptop.name,
        timeout.as_secs(),
        gw.metrics()
    );
    laptop.connect(gw, web)?;
    Ok(created.elapsed())
}

#[test]
fn gateway_resumes_after_api_server_faults() -> Result<()> {
    onetun_path();
    let dir = tempfile::tempdir()?;
    let n = unique_net_index();
    let mut kube = KubeServer::start(dir.path(), &format!("127.94.{n}.0/24"))?;
    kube.kubectl(&[
        "apply",
        "-f",
        concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/crds/vpnpeer.yaml"),
    ])?;
    kube.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {GW_NS}\n"
    ))?;
    kube.apply(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  ports:\n  - name: http\n    port: 80\n",
    )?;
    let web = kube.kubectl(&["get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"])?;
    let _backend = Backend::start(SocketAddr::new(web.parse()?, 80))?;
    let mut gw = start_gateway(&kube)?;
    let result = gateway_scenario(&mut kube, &gw, &web);
    let alive = gw.process.is_running();
    result.map_err(|e| {
        let kube_log = kube.process.as_ref().map(|p| p.output_tails()).unwrap_or_default();
        e.context(format!(
            "gateway output:\n{}\nkube:\n{kube_log}",
            gw.process.output_tails()
        ))
    })?;
    ensure!(alive, "the gateway exited\n{}", gw.process.output_tails());
    Ok(())
}

fn gateway_scenario(kube: &mut KubeServer, gw: &Gateway, web: &str) -> Result<()> {
    let faults = Fault::all();
    let started = Instant::now();
    // bob: the bystander whose session must survive every fault.
    // bob and carol: bystanders whose sessions must survive every fault; carol's peer
    // has a preshared key in a Secret, which the gateway reads from the API server.
    let mut bystanders = Vec::new();
    for (name, host, psk) in [("bob", 2, false), ("carol", 4, true)] {
        let mut laptop = Laptop::new(name, host)?;
        if psk {
            laptop = laptop.with_psk(kube)?;
        }
        admit(kube, gw, &mut laptop, web, Duration::from_secs(10))?;
        let handshakes = poll_until_blocking(Duration::from_secs(5), || {
            Some(handshakes(gw, name)).filter(|n| *n >= 1)
        })
        .with_context(|| format!("{name}'s handshake is counted: {}", gw.metrics()))?;
        bystanders.push(Bystander {
            laptop,
            handshakes,
            session: Instant::now(),
        });
    }
    // Each phase deletes the peer its predecessor created and disables one made up front.
    let mut doomed = Laptop::new("first", 3)?;
    admit(kube, gw, &mut doomed, web, Duration::from_secs(10))?;
    let mut to_disable = Vec::new();
    for (i, _) in faults.iter().enumerate() {
        let mut l = Laptop::new(&format!("dis-{i}"), 10 + i as u8)?;
        admit(kube, gw, &mut l, web, Duration::from_secs(10))?;
        to_disable.push(l);
    }
    let mut rows = Vec::new();
    for (i, (fault, mut disabled)) in faults.iter().copied().zip(to_disable).enumerate() {
        let name = fault.name();
        let requests_before = kube.requests()?;
        let watches_before = kube.open_watches()?;
        let accepted_before = gw.accepted();
        let changed = Instant::now();
        // The changes, made while the watches are broken or re-listing; around a restart
        // the new peer lands just before the stop, the delete and disable after it.
        let mut newcomer = Laptop::new(&format!("new-{i}"), 40 + i as u8)?;
        let what = if matches!(fault, Fault::Restart | Fault::Outage) {
            kube.apply(&newcomer.peer_yaml())?;
            kube.inject(fault)?
        } else {
            let what = kube.inject(fault)?;
            kube.apply(&newcomer.peer_yaml())?;
            what
        };
        kube.kubectl(&["delete", "vpnpeer", "-n", GW_NS, &doomed.name, "--wait=false"])?;
        kube.kubectl(&[
            "patch",
            "vpnpeer",
            "-n",
            GW_NS,
            &disabled.name,
            "--type=merge",
            "-p",
            r#"{"spec":{"disabled":true}}"#,
        ])?;
        let applied = changed.elapsed();
        let seen = watch_changes(
            kube,
            gw,
            &doomed,
            &newcomer.name,
            &disabled.name,
            watches_before,
            changed,
        )
        .with_context(|| format!("fault {name}"))?;
        // Net: one peer more, two fewer.
        ensure!(
            gw.accepted() == accepted_before - 1,
            "fault {name}: the gateway serves {} peers, want {}: {}",
            gw.accepted(),
            accepted_before - 1,
            gw.metrics()
        );
        // The log the bystander check reads does name dropped peers.
        let log = format!("{}\n{}", gw.process.stdout(), gw.process.stderr());
        let doomed_peer = format!("{GW_NS}/{}", doomed.name);
        ensure!(
            log.lines()
                .any(|l| l.contains(&doomed_peer) && l.contains("peer removed")),
            "fault {name}: the gateway logged the removal of {doomed_peer}"
        );
        let disabled_cut = disabled.cut_off(changed, Duration::from_secs(20))?;
        newcomer.connect(gw, web)?;
        let admitted = changed.elapsed();
        // Handshakes reach the metrics within a second.
        std::thread::sleep(Duration::from_millis(1100));
        let mut untouched = Vec::new();
        for b in &mut bystanders {
            untouched.push(b.untouched(gw, name)?);
        }
        let restarted = matches!(fault, Fault::Restart | Fault::Outage);
        let requests_after = kube.requests()?;
        let relists = since(
            &requests_before,
            &requests_after,
            "list vpnpeers.vpn.cloudraya.com",
            restarted,
        );
        let rewatches = since(
            &requests_before,
            &requests_after,
            "watch vpnpeers.vpn.cloudraya.com",
            restarted,
        );
        if fault == Fault::Cut {
            ensure!(relists == 0, "fault cut: VpnPeers were listed again {relists} times");
        }
        ensure!(rewatches >= 1, "fault {name}: the VpnPeer watch was opened again");
        eprintln!(
            "measured: fault={name} ({what}): changes made in {} ms; {watches_before} watches open again at {} ms; \
             new peer Accepted at {} ms, carried traffic at {} ms; deleted peer cut at {} ms; disabled peer Disabled at {} ms, cut at {} ms; \
             bystanders' handshakes {} unchanged; VpnPeer lists {relists}, watches {rewatches}",
            applied.as_millis(),
            seen.watches.as_millis(),
            seen.accepted.as_millis(),
            admitted.as_millis(),
            seen.deleted_cut.as_millis(),
            seen.disabled.as_millis(),
            disabled_cut.as_millis(),
            untouched.join(", "),
        );
        rows.push(format!(
            "{name}: 3/3 changes in effect (new peer Accepted {} ms, deleted cut {} ms, disabled {} ms), watches back {} ms, bystander handshakes unchanged, VpnPeer re-lists {relists}",
            seen.accepted.as_millis(),
            seen.deleted_cut.as_millis(),
            seen.disabled.as_millis(),
            seen.watches.as_millis(),
        ));
        // Stop the cut tunnels' onetuns; the newcomer is the next phase's to delete.
        drop(disabled.tunnel.take());
        drop(doomed.tunnel.take());
        doomed = newcomer;
    }
    eprintln!(
        "summary: gateway across API server faults, {} s in all\n  {}",
        started.elapsed().as_secs(),
        rows.join("\n  ")
    );
    Ok(())
}

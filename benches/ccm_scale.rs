//! Issue 12, CCM at scale: the real `kuberaya-ccm` binary against the platform stand-in
//! (adding 25 ms to every call) and the Kubernetes API stand-in (`kuberaya-sandbox platform`
//! and `kuberaya-sandbox kube`, see [`Sandbox`]), started as an operator would run it. Prints every figure as a `RESULT` line and a ratio against a baseline
//! taken in the same run (the same controller with `--concurrent-service-syncs 1`).
//!
//! Run: `cargo bench --bench ccm_scale` (sizes: see [`Sizes`], e.g.
//! `KR_BENCH_SERVICES=50 KR_BENCH_NODES=10 cargo bench --bench ccm_scale` for a smoke run;
//! `KR_BENCH_BASELINE=0 KR_BENCH_RATE_LIMITED=0 KR_BENCH_STEADY=0 KR_BENCH_CHURN=0` for the
//! measured convergence and the deletion alone).
//!
//! Every scenario has a timeout and reports "not reached within X" instead of hanging.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{cpu_time, die_with_parent, knob, machine, peak_rss_mib, ratio, result, secs};
use futures::StreamExt;
use kuberaya_e2e::ccm::{Ccm, write_cloud_config};
use kuberaya_e2e::gateway::Metrics;
use kuberaya_e2e::kube_rest::KubeRest as Kube;
use kuberaya_e2e::kube_stand_in;
use kuberaya_e2e::{JsonApi, Process, binary};
use serde_json::{Value, json};

const EMAIL: &str = "admin@sandbox.local";
const PASSWORD: &str = "sandbox";
const CLUSTER_ID: &str = "cl-sandbox";
const CLUSTER_LABEL: &str = "kuberaya.cloudraya.com/cluster-id";
const PROVIDER_PREFIX: &str = "cloudraya://";
const UNINITIALIZED_TAINT: &str = "node.cloudprovider.kubernetes.io/uninitialized";
const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// The label every bench Service carries: the prefix of its name (its set), so a set can
/// be counted without listing it.
const SET_LABEL: &str = "bench.kuberaya/set";

/// The set of a Service name: its leading letters (`s12` → `s`).
fn set_of(name: &str) -> &str {
    name.trim_end_matches(|c: char| c.is_ascii_digit())
}

/// The sizes, from the environment; the defaults are the issue's.
#[derive(Debug, Clone)]
struct Sizes {
    /// `KR_BENCH_SERVICES`: LoadBalancer Services created at once.
    services: u64,
    /// `KR_BENCH_NODES`: nodes of the sandbox cluster.
    nodes: u64,
    /// `KR_BENCH_LATENCY_MS`: latency the platform adds to every call.
    latency_ms: u64,
    /// `KR_BENCH_SYNCS`: `--concurrent-service-syncs` of the measured CCM.
    syncs: u64,
    /// `KR_BENCH_TIMEOUT_S`: the limit of each convergence wait.
    timeout: Duration,
    /// `KR_BENCH_BASELINE_TIMEOUT_S`: the limit of the baseline's convergence (it is slow:
    /// when not reached, its rate is extrapolated, and said so).
    baseline_timeout: Duration,
    /// `KR_BENCH_RESYNC_S`: `--resync-period` of the CCM; the quiet-resync window is one
    /// period plus 5 s.
    resync: Duration,
    /// `KR_BENCH_BURST`: node events in the burst (spread over 1 s).
    burst: u64,
    /// `KR_BENCH_RATE`: calls per second the throttled platform allows.
    rate: u64,
    /// `KR_BENCH_RATE_SERVICES`: Services created under the rate limit.
    rate_services: u64,
    /// `KR_BENCH_HC_INTERVAL_S`: `lb.cloudraya.com/health-check-interval` of every Service
    /// (0: the default, 5 s). The platform stand-in really probes every backend of every LB:
    /// 1,000 LBs x 100 nodes every 5 s is 20,000 TCP probes a second, which takes the CPU
    /// of this 2-core machine from the CCM; the CCM's calls are the same either way.
    hc_interval_s: u64,
    /// `KR_BENCH_BASELINE=0` skips the baseline, `KR_BENCH_RATE_LIMITED=0` the throttled run.
    baseline: bool,
    rate_limited: bool,
    /// After the measured convergence: `KR_BENCH_STEADY=0` skips the quiet resync, the node
    /// join and the node burst, `KR_BENCH_DELETE=0` the deletion of every Service,
    /// `KR_BENCH_CHURN=0` the churn (to repeat one scenario on a loaded machine; a
    /// reported run has them all).
    steady: bool,
    delete: bool,
    churn: bool,
}

impl Sizes {
    fn from_env() -> Sizes {
        Sizes {
            services: knob("KR_BENCH_SERVICES", 1000),
            nodes: knob("KR_BENCH_NODES", 100),
            latency_ms: knob("KR_BENCH_LATENCY_MS", 25),
            syncs: knob("KR_BENCH_SYNCS", 10),
            timeout: Duration::from_secs(knob("KR_BENCH_TIMEOUT_S", 300)),
            baseline_timeout: Duration::from_secs(knob("KR_BENCH_BASELINE_TIMEOUT_S", 120)),
            resync: Duration::from_secs(knob("KR_BENCH_RESYNC_S", 20)),
            burst: knob("KR_BENCH_BURST", 100),
            rate: knob("KR_BENCH_RATE", 20),
            rate_services: knob("KR_BENCH_RATE_SERVICES", 50),
            hc_interval_s: knob("KR_BENCH_HC_INTERVAL_S", 300),
            baseline: common::enabled("KR_BENCH_BASELINE"),
            rate_limited: common::enabled("KR_BENCH_RATE_LIMITED"),
            steady: common::enabled("KR_BENCH_STEADY"),
            delete: common::enabled("KR_BENCH_DELETE"),
            churn: common::enabled("KR_BENCH_CHURN"),
        }
    }
}

/// The two stand-ins the CCM talks to, each its own process: the platform stand-in
/// (`kuberaya-sandbox platform`, `--workers N` VMs) and the Kubernetes API stand-in
/// (`kuberaya-sandbox kube`), with a `Node` registered per VM by the bench (as a kubelet
/// would: tainted `uninitialized`, `Ready`). No sandbox cluster runs: its kube-proxy
/// stand-in would listen on every node's IP for every Service's NodePort (100 x 1,000
/// sockets, over this machine's open-file limit) and take most of the CPU.
struct Sandbox {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    url: String,
    email: String,
    password: String,
    cluster_id: String,
    rt: tokio::runtime::Runtime,
    api: JsonApi,
    ctl: JsonApi,
    kube: Kube,
    nodes: u64,
    // Declared last: the processes go after the clients.
    kube_process: Process,
    platform: Process,
}

impl Sandbox {
    /// Both stand-ins on address ranges of their own (`slot` picks them), `nodes` VMs and
    /// their Nodes, with room for 4,000 public IPs.
    fn up(slot: u8, nodes: u64) -> Result<Sandbox> {
        let started = Instant::now();
        let n = 200 + slot;
        let dir = tempfile::tempdir()?;
        let mut cmd = Command::new(binary("kuberaya-sandbox"));
        cmd.arg("platform")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--state-dir")
            .arg(dir.path().join("platform"))
            .args([
                "--email",
                EMAIL,
                "--password",
                PASSWORD,
                "--cluster-id",
                CLUSTER_ID,
                "--public-ip-range",
                &format!("127.{n}.0.0/20"),
                "--vm-ip-range",
                &format!("127.{}.0.0/24", n - 190),
                "--workers",
                &nodes.to_string(),
            ]);
        let mut platform = Process::spawn_command(die_with_parent(cmd))?;
        let line = platform.wait_for_stdout_line("listening on ", Duration::from_secs(30))?;
        let url = line
            .trim_start_matches("listening on ")
            .trim()
            .trim_end_matches('/')
            .to_string();
        let kubeconfig = dir.path().join("kubeconfig");
        let kube_state = dir.path().join("kube");
        let mut cmd = kube_stand_in::command(&kube_state, &kubeconfig);
        cmd.arg("--service-cidr").arg(format!("127.{}.0.0/20", n - 150));
        let mut kube_process = Process::spawn_command(die_with_parent(cmd))?;
        kube_stand_in::wait_listening(&mut kube_process, Duration::from_secs(30))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let api = rt
            .block_on(JsonApi::login(&url, EMAIL, PASSWORD))?
            .with_timeout(Duration::from_secs(60));
        let kube = Kube::from_kubeconfig(&kubeconfig)?;
        let sb = Sandbox {
            kubeconfig,
            cluster_id: CLUSTER_ID.to_string(),
            ctl: JsonApi::new(&url).with_timeout(Duration::from_secs(60)),
            url,
            email: EMAIL.to_string(),
            password: PASSWORD.to_string(),
            api,
            rt,
            kube,
            nodes,
            dir,
            kube_process,
            platform,
        };
        for name in sb.vm_ids()?.keys() {
            sb.register_node(name)?;
        }
        eprintln!("stand-ins with {nodes} VMs and Nodes up in {:.1?}", started.elapsed());
        Ok(sb)
    }

    /// Registers the Node of VM `name` as its kubelet would: tainted `uninitialized`, then
    /// `Ready`.
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
            "message": "bench", "lastHeartbeatTime": now, "lastTransitionTime": now
        }]}});
        self.rt
            .block_on(self.kube.merge_patch(&format!("/api/v1/nodes/{name}/status"), &status))?;
        Ok(())
    }

    /// A new VM of the cluster on the platform and its Node.
    fn add_node(&self, name: &str) -> Result<()> {
        self.control(
            reqwest::Method::POST,
            "/_sandbox/vms",
            Some(&json!({"name": name, "cluster_id": self.cluster_id})),
        )?;
        self.register_node(name)
    }

    /// CPU time so far of the platform stand-in and of the API stand-in.
    fn cpu(&self) -> (Duration, Duration) {
        (
            cpu_time(self.platform.pid()).unwrap_or_default(),
            cpu_time(self.kube_process.pid()).unwrap_or_default(),
        )
    }

    fn control(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let a = self.rt.block_on(self.ctl.try_request(method, path, body))?;
        ensure!((200..300).contains(&a.status), "{path}: {}", a.describe());
        Ok(a.data().clone())
    }

    /// Call counts of the platform stand-in, `METHOD /path/template` → count.
    fn calls(&self) -> Result<BTreeMap<String, u64>> {
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

    /// Every item of a paginated list of the platform API (100 a page).
    fn list(&self, path: &str) -> Result<Vec<Value>> {
        self.rt.block_on(self.api.list_all(path))
    }

    fn lbs(&self) -> Result<Vec<Value>> {
        self.list(&format!(
            "/kubernetes/v1/clusters/{}/load-balancers?label={CLUSTER_LABEL}={}",
            self.cluster_id, self.cluster_id
        ))
    }

    /// The platform's VMs of our cluster: name → id.
    fn vm_ids(&self) -> Result<BTreeMap<String, String>> {
        let vms = self.list(&format!("/vm/v1/instances?label={CLUSTER_LABEL}={}", self.cluster_id))?;
        Ok(vms
            .iter()
            .filter_map(|vm| Some((vm["name"].as_str()?.to_string(), vm["id"].as_str()?.to_string())))
            .collect())
    }

    fn nodes_json(&self) -> Result<Vec<Value>> {
        let v = self.rt.block_on(self.kube.get("/api/v1/nodes"))?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until the CCM has initialised `count` nodes (providerID set, taint gone).
    fn wait_initialised(&self, count: usize, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let nodes = self.nodes_json()?;
            let done = nodes
                .iter()
                .filter(|n| {
                    n["spec"]["providerID"]
                        .as_str()
                        .is_some_and(|p| p.starts_with(PROVIDER_PREFIX))
                        && !n["spec"]["taints"]
                            .as_array()
                            .is_some_and(|ts| ts.iter().any(|t| t["key"] == UNINITIALIZED_TAINT))
                })
                .count();
            if done >= count {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!("{done} of {count} nodes initialised within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Creates `count` LoadBalancer Services named `<prefix><i>` at once (32 requests in
    /// flight); returns how long the creation took.
    fn create_services(&self, prefix: &str, count: u64, hc_interval_s: u64) -> Result<Duration> {
        let names: Vec<String> = (0..count).map(|i| format!("{prefix}{i}")).collect();
        self.create_services_named(&names, hc_interval_s)
    }

    /// How many Services named `<prefix>*` exist, counted by the server (their
    /// [`SET_LABEL`], `limit=1`: `remainingItemCount`), so that waiting on 1,000 deletions
    /// does not have the API stand-in serialise all of them five times a second on the
    /// cores the measured CCM runs on.
    fn count_services(&self, prefix: &str) -> Result<usize> {
        let v = self.rt.block_on(self.kube.get(&format!(
            "/api/v1/namespaces/default/services?labelSelector={SET_LABEL}%3D{prefix}&limit=1"
        )))?;
        let here = v["items"].as_array().map_or(0, Vec::len);
        let more = v["metadata"]["remainingItemCount"].as_u64().unwrap_or(0) as usize;
        Ok(here + more)
    }

    /// Creates a LoadBalancer Service of each name at once (32 requests in flight).
    fn create_services_named(&self, names: &[String], hc_interval_s: u64) -> Result<Duration> {
        let annotations = if hc_interval_s > 0 {
            json!({ "lb.cloudraya.com/health-check-interval": hc_interval_s.to_string() })
        } else {
            json!({})
        };
        let annotations = &annotations;
        let started = Instant::now();
        let kube = &self.kube;
        let results: Vec<Result<()>> = self.rt.block_on(
            futures::stream::iter(names)
                .map(|name| async move {
                    let body = json!({
                        "apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": name, "namespace": "default", "annotations": annotations,
                                     "labels": {SET_LABEL: set_of(name)}},
                        "spec": {"type": "LoadBalancer", "selector": {"app": "none"},
                                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
                    });
                    kube.create("/api/v1/namespaces/default/services", &body).await
                })
                .buffer_unordered(32)
                .collect(),
        );
        for r in results {
            r?;
        }
        Ok(started.elapsed())
    }

    /// How many Services named `<prefix>*` have an ingress, and how many there are.
    fn ingress_count(&self, prefix: &str) -> Result<(u64, u64)> {
        let v = self.rt.block_on(self.kube.get("/api/v1/namespaces/default/services"))?;
        let mut total = 0;
        let mut done = 0;
        for s in v["items"].as_array().into_iter().flatten() {
            if !s["metadata"]["name"].as_str().is_some_and(|n| n.starts_with(prefix)) {
                continue;
            }
            total += 1;
            if s["status"]["loadBalancer"]["ingress"][0]["ip"].as_str().is_some() {
                done += 1;
            }
        }
        Ok((done, total))
    }

    /// Deletes the Services named `<prefix><i>` for every `i` of `which` at once (32
    /// requests in flight, without waiting for the deletions: `--wait=false`).
    fn delete_services(&self, prefix: &str, which: impl Iterator<Item = u64>) -> Result<()> {
        let kube = &self.kube;
        let results: Vec<Result<()>> = self.rt.block_on(
            futures::stream::iter(which)
                .map(|i| async move {
                    kube.delete_if_present(&format!("/api/v1/namespaces/default/services/{prefix}{i}"))
                        .await
                })
                .buffer_unordered(32)
                .collect(),
        );
        results.into_iter().collect()
    }

    /// The Services named `<prefix>*`: name → whether it has an ingress.
    fn services_of(&self, prefix: &str) -> Result<BTreeMap<String, bool>> {
        let v = self.rt.block_on(self.kube.get("/api/v1/namespaces/default/services"))?;
        Ok(v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let name = s["metadata"]["name"].as_str()?;
                name.starts_with(prefix).then(|| {
                    (
                        name.to_string(),
                        s["status"]["loadBalancer"]["ingress"][0]["ip"].as_str().is_some(),
                    )
                })
            })
            .collect())
    }

    /// Public IPs of the account not attached to anything.
    fn unattached_public_ips(&self) -> Result<usize> {
        Ok(self
            .list("/network/v1/public-ips")?
            .iter()
            .filter(|ip| ip["attached_to"].is_null())
            .count())
    }

    /// Starts `kuberaya-ccm` against this sandbox (dying with the bench) and waits until it
    /// leads.
    fn start_ccm(&self, syncs: u64, resync: Duration) -> Result<Ccm> {
        self.start_ccm_with(syncs, resync, None)
    }

    /// As [`Sandbox::start_ccm`], with the cloud config's client-side token bucket
    /// (`rate_limit: {qps, burst}`) when given.
    fn start_ccm_with(&self, syncs: u64, resync: Duration, bucket: Option<u64>) -> Result<Ccm> {
        let config = self.dir.path().join("cloud-config.yaml");
        write_cloud_config(&config, &self.url, &self.cluster_id)?;
        if let Some(qps) = bucket {
            let mut text = std::fs::read_to_string(&config)?;
            text.push_str(&format!("rate_limit: {{qps: {qps}, burst: {qps}}}\n"));
            std::fs::write(&config, text)?;
        }
        let (syncs, resync) = (syncs.to_string(), format!("{}s", resync.as_secs()));
        let (cmd, metrics) = Ccm::command(
            &self.kubeconfig,
            &config,
            (&self.email, &self.password),
            "info,kube_runtime=warn",
            &["--concurrent-service-syncs", &syncs, "--resync-period", &resync],
        );
        let mut ccm = Ccm::start(die_with_parent(cmd), metrics)?;
        ccm.wait_leader(Duration::from_secs(60))?;
        Ok(ccm)
    }

    /// The sum of the CCM's metric `name` over its label sets containing `label` (all
    /// when empty).
    fn metric(&self, metrics_addr: &str, name: &str, label: &str) -> Option<f64> {
        let body = self
            .rt
            .block_on(async {
                reqwest::get(format!("http://{metrics_addr}/metrics"))
                    .await?
                    .text()
                    .await
            })
            .ok()?;
        Some(Metrics(body).get(name, label))
    }
}

fn mutating(calls: &BTreeMap<String, u64>) -> u64 {
    calls
        .iter()
        .filter(|(k, _)| {
            let (method, path) = k.split_once(' ').unwrap_or(("", ""));
            matches!(method, "POST" | "PUT" | "PATCH" | "DELETE") && !path.starts_with("/auth")
        })
        .map(|(_, v)| v)
        .sum()
}

fn total(calls: &BTreeMap<String, u64>) -> u64 {
    calls.values().sum()
}

fn diff(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

fn show(calls: &BTreeMap<String, u64>) -> String {
    let mut v: Vec<_> = calls.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    v.iter().map(|(k, n)| format!("{k}={n}")).collect::<Vec<_>>().join(", ")
}

/// The outcome of one convergence run.
struct Convergence {
    /// Time from the first create to the last ingress; `None` when not reached.
    took: Option<Duration>,
    elapsed: Duration,
    done: u64,
    services: u64,
    calls: BTreeMap<String, u64>,
    ccm_cpu: Duration,
    platform_cpu: Duration,
    kube_cpu: Duration,
}

impl Convergence {
    fn describe(&self) -> String {
        match self.took {
            Some(t) => secs(t),
            None => format!(
                "not reached within {} ({} of {} Services; at that rate all would take ~{:.0} s)",
                secs(self.elapsed),
                self.done,
                self.services,
                self.projected().unwrap_or(f64::NAN)
            ),
        }
    }

    /// The convergence time, or, when not reached, the time extrapolated from the rate.
    fn projected(&self) -> Option<f64> {
        match self.took {
            Some(t) => Some(t.as_secs_f64()),
            None if self.done > 0 => Some(self.elapsed.as_secs_f64() * self.services as f64 / self.done as f64),
            None => None,
        }
    }
}

/// Creates `count` Services at once and waits (at most `timeout`) until all have an ingress.
fn converge(
    sb: &Sandbox,
    ccm: &Ccm,
    prefix: &str,
    count: u64,
    timeout: Duration,
    hc_interval_s: u64,
) -> Result<Convergence> {
    let before = sb.calls()?;
    let ccm_cpu0 = cpu_time(ccm.process.pid()).unwrap_or_default();
    let (platform_cpu0, kube_cpu0) = sb.cpu();
    let started = Instant::now();
    let created_in = sb.create_services(prefix, count, hc_interval_s)?;
    result(
        &format!("ccm.create ({count} Services through the API stand-in, 32 in flight)"),
        secs(created_in),
    );
    let mut done = 0;
    let took = loop {
        let (d, _) = sb.ingress_count(prefix)?;
        done = done.max(d);
        if d >= count {
            break Some(started.elapsed());
        }
        if started.elapsed() > timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let elapsed = started.elapsed();
    Ok(Convergence {
        took,
        elapsed,
        done,
        services: count,
        calls: diff(&before, &sb.calls()?),
        ccm_cpu: cpu_time(ccm.process.pid()).unwrap_or_default().saturating_sub(ccm_cpu0),
        platform_cpu: sb.cpu().0.saturating_sub(platform_cpu0),
        kube_cpu: sb.cpu().1.saturating_sub(kube_cpu0),
    })
}

/// The platform's limit of backends per LB, which the CCM caps at.
const MAX_BACKENDS: usize = 100;
const SERVICE_UID_LABEL: &str = "kuberaya.cloudraya.com/service-uid";

/// The backends the CCM picks for the Service with `uid` among the eligible `vms`: a copy
/// of `cap_backends` in ccm/src/service/nodes.rs (rendezvous hashing on the UID).
fn expected_backends(uid: &str, vms: &BTreeSet<String>) -> BTreeSet<String> {
    fn score(key: &str, vm: &str) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes().chain([0]).chain(vm.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^ (h >> 31)
    }
    let mut v: Vec<&String> = vms.iter().collect();
    v.sort_by_cached_key(|vm| (score(uid, vm), (*vm).clone()));
    v.into_iter().take(MAX_BACKENDS).cloned().collect()
}

/// Whether `lb` has the backends the CCM should give it among the eligible `vms`.
fn has_expected_backends(lb: &Value, vms: &BTreeSet<String>) -> bool {
    let uid = lb["labels"][SERVICE_UID_LABEL].as_str().unwrap_or_default();
    backend_vms(lb) == expected_backends(uid, vms)
}

fn backend_vms(lb: &Value) -> BTreeSet<String> {
    lb["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["vm_id"].as_str().map(String::from))
        .collect()
}

/// The measured run: convergence, quiet resync, node join, node-event burst, peak RSS.
fn measured(sizes: &Sizes) -> Result<Option<Convergence>> {
    // The joining node is one more than `nodes`: with 100, the 101st, beyond the
    // platform's 100 backends per LB, so the CCM must choose (see `expected_backends`).
    let initial = sizes.nodes.max(1);
    let sb = Sandbox::up(0, initial)?;
    let ccm = sb.start_ccm(sizes.syncs, sizes.resync)?;
    let init = sb.wait_initialised(initial as usize, sizes.timeout)?;
    eprintln!("CCM initialised {initial} nodes in {init:.1?}");
    sb.set_faults(json!([{ "latency_ms": sizes.latency_ms }]))?;

    let conv = converge(&sb, &ccm, "s", sizes.services, sizes.timeout, sizes.hc_interval_s)?;
    result(
        &format!(
            "ccm.converge: {} Services, {} nodes, {} ms/call, --concurrent-service-syncs {}",
            sizes.services, initial, sizes.latency_ms, sizes.syncs
        ),
        format!("{} (goal <= 15 s)", conv.describe()),
    );
    result(
        "ccm.converge.calls",
        format!(
            "{} total, {} mutating ({})",
            total(&conv.calls),
            mutating(&conv.calls),
            show(&conv.calls)
        ),
    );
    result(
        "ccm.converge.cpu",
        format!(
            "CCM {:.2} s, platform stand-in {:.2} s, API stand-in {:.2} s over {:.2} s wall; {}",
            conv.ccm_cpu.as_secs_f64(),
            conv.platform_cpu.as_secs_f64(),
            conv.kube_cpu.as_secs_f64(),
            conv.elapsed.as_secs_f64(),
            common::load_average()
        ),
    );
    if let Some(rss) = peak_rss_mib(ccm.process.pid()) {
        result(
            "ccm.peak_rss after convergence",
            format!("{rss:.1} MiB (goal < 64 MiB)"),
        );
    }
    if conv.took.is_none() {
        bail!("the measured CCM did not converge; the other scenarios need it");
    }

    if sizes.steady {
        steady_state(&sb, sizes, initial)?;
    }
    if let Some(rss) = peak_rss_mib(ccm.process.pid()) {
        result(
            &format!(
                "ccm.peak_rss ({} Services, {} nodes)",
                sizes.services,
                sb.nodes + u64::from(sizes.steady)
            ),
            format!("{rss:.1} MiB VmHWM (goal < 64 MiB)"),
        );
    }
    if sizes.delete
        && let Err(e) = delete_all(&sb, sizes)
    {
        println!("RESULT ccm.delete: failed: {e:#}");
    }
    if sizes.churn
        && let Err(e) = churn(&sb, &ccm, sizes)
    {
        println!("RESULT ccm.churn: failed: {e:#}");
    }
    Ok(Some(conv))
}

/// Issue 12's steady-state scenarios on the converged Services: a quiet resync, a node
/// joining, a burst of node events (`KR_BENCH_STEADY=0` skips them).
fn steady_state(sb: &Sandbox, sizes: &Sizes, initial: u64) -> Result<()> {
    // A resync with nothing changed: one resync period plus 5 s without any change.
    std::thread::sleep(Duration::from_secs(3));
    let before = sb.calls()?;
    let window = sizes.resync + Duration::from_secs(5);
    std::thread::sleep(window);
    let quiet = diff(&before, &sb.calls()?);
    result(
        &format!("ccm.quiet_resync ({} window)", secs(window)),
        format!(
            "{} mutating calls (goal 0), {} calls in all ({})",
            mutating(&quiet),
            total(&quiet),
            show(&quiet)
        ),
    );

    // A node joining: time until every LB has it as a backend.
    let vms_before = sb.vm_ids()?;
    let started = Instant::now();
    sb.add_node("bench-joined")?;
    let vm = loop {
        if let Some(id) = sb
            .vm_ids()?
            .into_iter()
            .find(|(n, _)| !vms_before.contains_key(n))
            .map(|(_, id)| id)
        {
            break id;
        }
        ensure!(started.elapsed() < sizes.timeout, "the new VM did not show");
        std::thread::sleep(Duration::from_millis(100));
    };
    let join_timeout = Duration::from_secs(60);
    let eligible: BTreeSet<String> = sb.vm_ids()?.into_values().collect();
    let with_new = |lbs: &[Value]| lbs.iter().filter(|lb| backend_vms(lb).contains(&vm)).count();
    let should_have = |lbs: &[Value]| {
        lbs.iter()
            .filter(|lb| {
                let uid = lb["labels"][SERVICE_UID_LABEL].as_str().unwrap_or_default();
                expected_backends(uid, &eligible).contains(&vm)
            })
            .count()
    };
    let first = 200.min(sizes.services as usize);
    let mut first_done = None;
    let mut last;
    let mut want_new;
    let joined = loop {
        let lbs = sb.lbs()?;
        let done = lbs.iter().filter(|lb| has_expected_backends(lb, &eligible)).count();
        last = done;
        want_new = should_have(&lbs);
        if first_done.is_none() && done >= first {
            first_done = Some(started.elapsed());
        }
        if done == lbs.len() && !lbs.is_empty() {
            eprintln!("join: {} of {} LBs have the new node", with_new(&lbs), lbs.len());
            break Some(started.elapsed());
        }
        if started.elapsed() > join_timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    result(
        &format!(
            "ccm.node_join ({} LBs, node {} joins; {} LBs should take it)",
            sizes.services,
            eligible.len(),
            want_new
        ),
        match joined {
            Some(t) => format!(
                "{} from the new VM and Node until every LB has its backends (at most {MAX_BACKENDS}); the first {first} LBs: {} (goal <= 5 s for 200 LBs)",
                secs(t),
                first_done.map(secs).unwrap_or_default()
            ),
            None => format!(
                "not reached within {}: {last} of {} LBs have their backends; the first {first}: {}",
                secs(join_timeout),
                sizes.services,
                first_done.map(secs).unwrap_or_else(|| "not reached".into())
            ),
        },
    );
    sb.wait_initialised(initial as usize + 1, Duration::from_secs(30))?;

    // A burst of node events within 1 s: half exclude their node, half change a plain label.
    std::thread::sleep(Duration::from_secs(3));
    let nodes: Vec<String> = sb
        .nodes_json()?
        .iter()
        .filter_map(|n| n["metadata"]["name"].as_str().map(String::from))
        .collect();
    let before = sb.calls()?;
    let started = Instant::now();
    let mut excluded = BTreeSet::new();
    for i in 0..sizes.burst {
        let node = &nodes[i as usize % nodes.len()];
        let labels = if i % 2 == 0 {
            excluded.insert(node.clone());
            json!({ EXCLUDE_LABEL: "true" })
        } else {
            json!({ "bench.kuberaya.io/burst": i.to_string() })
        };
        sb.rt.block_on(sb.kube.merge_patch(
            &format!("/api/v1/nodes/{node}"),
            &json!({"metadata": {"labels": labels}}),
        ))?;
        let due = Duration::from_millis((i + 1) * 1000 / sizes.burst);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let burst_took = started.elapsed();
    let vm_of = sb.vm_ids()?;
    let eligible: BTreeSet<String> = vm_of
        .iter()
        .filter(|(name, _)| !excluded.contains(*name))
        .map(|(_, id)| id.clone())
        .collect();
    let settle_timeout = Duration::from_secs(60);
    let mut settled = None;
    while started.elapsed() < settle_timeout {
        let lbs = sb.lbs()?;
        if lbs.iter().all(|lb| has_expected_backends(lb, &eligible)) {
            settled = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // Let anything still queued land before counting.
    std::thread::sleep(Duration::from_secs(3));
    let burst = diff(&before, &sb.calls()?);
    let lb_updates: u64 = burst
        .iter()
        .filter(|(k, _)| k.starts_with("PUT ") || k.starts_with("PATCH "))
        .filter(|(k, _)| k.contains("load-balancers"))
        .map(|(_, v)| v)
        .sum();
    result(
        &format!("ccm.node_burst ({} events in {})", sizes.burst, secs(burst_took)),
        format!(
            "{:.2} platform updates per LB (goal 1); backends settled {}; calls: {}",
            lb_updates as f64 / sizes.services as f64,
            settled
                .map(secs)
                .unwrap_or_else(|| format!("not within {}", secs(settle_timeout))),
            show(&burst)
        ),
    );
    Ok(())
}

/// Issue 26: every Service deleted at once; the time until the last one is gone (its
/// finalizer removed after its LB is gone), the calls, and what is left on the platform.
fn delete_all(sb: &Sandbox, sizes: &Sizes) -> Result<()> {
    let unattached_before = sb.unattached_public_ips()?;
    let before = sb.calls()?;
    let count = sb.services_of("s")?.len();
    let started = Instant::now();
    sb.delete_services("s", 0..sizes.services)?;
    // The Services still carry the CCM's finalizer: each goes once its LB is gone.
    let requests = started.elapsed();
    let (gone, left) = loop {
        let left = sb.count_services("s")?;
        if left == 0 {
            break (Some(started.elapsed()), 0);
        }
        if started.elapsed() > sizes.timeout {
            break (None, left);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let calls = diff(&before, &sb.calls()?);
    let lbs_left = sb.lbs()?.len();
    let ips_left = sb.unattached_public_ips()?.saturating_sub(unattached_before);
    result(
        &format!(
            "ccm.delete ({count} Services deleted at once, {} ms/call)",
            sizes.latency_ms
        ),
        match gone {
            Some(t) => format!(
                "{} until every Service is gone (goal <= 15 s; delete requests took {}); {} LBs and {} unattached public IPs left (goal 0, 0)",
                secs(t),
                secs(requests),
                lbs_left,
                ips_left
            ),
            None => format!(
                "not reached within {}: {left} of {count} Services left; {lbs_left} LBs left",
                secs(sizes.timeout)
            ),
        },
    );
    result(
        "ccm.delete.calls",
        format!(
            "{} total, {} mutating, {:.2} per Service ({})",
            total(&calls),
            mutating(&calls),
            total(&calls) as f64 / count.max(1) as f64,
            show(&calls)
        ),
    );
    Ok(())
}

/// The `q`-quantile (0..=1) of `xs` (sorted here).
fn quantile(xs: &mut [Duration], q: f64) -> Option<Duration> {
    xs.sort();
    let i = ((xs.len() as f64 - 1.0) * q).round() as usize;
    xs.get(i).copied()
}

/// Issue 26: `KR_BENCH_CHURN_SERVICES` (default: `KR_BENCH_SERVICES`) Services, then every
/// 5 s for `KR_BENCH_CHURN_S` (60) the oldest `KR_BENCH_CHURN_STEP` (100) deleted and as many
/// created. Reports create → ingress and delete → gone (p50, p99) and the calls per change.
fn churn(sb: &Sandbox, ccm: &Ccm, sizes: &Sizes) -> Result<()> {
    let total_services = knob("KR_BENCH_CHURN_SERVICES", sizes.services);
    let step = knob("KR_BENCH_CHURN_STEP", 100).min(total_services);
    let rounds = knob("KR_BENCH_CHURN_S", 60) / 5;
    let conv = converge(sb, ccm, "c", total_services, sizes.timeout, sizes.hc_interval_s)?;
    ensure!(
        conv.took.is_some(),
        "the churn's {total_services} Services did not converge"
    );
    let before = sb.calls()?;
    let mut created_at: BTreeMap<String, Instant> = BTreeMap::new();
    let mut deleted_at: BTreeMap<String, Instant> = BTreeMap::new();
    let (mut to_ingress, mut to_gone) = (Vec::new(), Vec::new());
    // Creates still without an ingress when the churn deleted them (the oldest go first):
    // how long each had waited, a lower bound of its create -> ingress.
    let mut cut_short: Vec<Duration> = Vec::new();
    let mut oldest = 0u64;
    let mut next = total_services;
    let started = Instant::now();
    let mut round = 0;
    let deadline = Duration::from_secs(rounds * 5) + sizes.timeout;
    loop {
        if round < rounds && started.elapsed() >= Duration::from_secs(round * 5) {
            eprintln!(
                "churn round {round} at {}: {} creates wait for their ingress, {} deletes for the Service to go",
                secs(started.elapsed()),
                created_at.len(),
                deleted_at.len()
            );
            let now = Instant::now();
            sb.delete_services("c", oldest..oldest + step)?;
            for i in oldest..oldest + step {
                let name = format!("c{i}");
                if let Some(at) = created_at.remove(&name) {
                    cut_short.push(now - at);
                }
                deleted_at.insert(name, now);
            }
            oldest += step;
            let names: Vec<String> = (next..next + step).map(|i| format!("c{i}")).collect();
            let now = Instant::now();
            sb.create_services_named(&names, sizes.hc_interval_s)?;
            for n in names {
                created_at.insert(n, now);
            }
            next += step;
            round += 1;
        }
        let seen = sb.services_of("c")?;
        let now = Instant::now();
        created_at.retain(|name, at| {
            let done = seen.get(name).copied().unwrap_or(false);
            if done {
                to_ingress.push(now - *at);
            }
            !done
        });
        deleted_at.retain(|name, at| {
            let gone = !seen.contains_key(name);
            if gone {
                to_gone.push(now - *at);
            }
            !gone
        });
        if round >= rounds && created_at.is_empty() && deleted_at.is_empty() {
            break;
        }
        if started.elapsed() >= deadline {
            // What the CCM says of the Services left waiting, for whoever looks into it.
            let v = sb.rt.block_on(sb.kube.get("/api/v1/namespaces/default/services"))?;
            let stuck: Vec<String> = v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| {
                    s["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| created_at.contains_key(n))
                })
                .take(5)
                .map(|s| {
                    format!(
                        "{} finalizers={} status={}",
                        s["metadata"]["name"], s["metadata"]["finalizers"], s["status"]
                    )
                })
                .collect();
            bail!(
                "churn not settled within {}: {} creates without ingress, {} deletes not gone; some of them:\n{}\nCCM output:\n{}",
                secs(deadline),
                created_at.len(),
                deleted_at.len(),
                stuck.join("\n"),
                ccm.process.output_tails()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let calls = diff(&before, &sb.calls()?);
    let changes = (to_ingress.len() + cut_short.len() + to_gone.len()).max(1);
    let q = |xs: &mut Vec<Duration>, p| quantile(xs, p).map(secs).unwrap_or_default();
    let cut = if cut_short.is_empty() {
        String::new()
    } else {
        // Counted in the quantiles at their wait so far: the figures are lower bounds.
        let longest = cut_short.iter().max().copied().unwrap_or_default();
        to_ingress.extend(cut_short.iter().copied());
        format!(
            " ({} creates were deleted before their ingress, after waiting up to {}: counted at their wait, so these are lower bounds)",
            cut_short.len(),
            secs(longest)
        )
    };
    result(
        &format!("ccm.churn ({total_services} Services; {step} deleted and {step} created every 5 s, {rounds} rounds)"),
        format!(
            "create -> ingress p50 {} p99 {}{cut}; delete -> gone p50 {} p99 {}; {:.2} platform calls per change ({} calls, {})",
            q(&mut to_ingress, 0.5),
            q(&mut to_ingress, 0.99),
            q(&mut to_gone, 0.5),
            q(&mut to_gone, 0.99),
            total(&calls) as f64 / changes as f64,
            total(&calls),
            show(&calls)
        ),
    );
    Ok(())
}

/// The baseline: the same controller with `--concurrent-service-syncs 1`.
fn baseline(sizes: &Sizes) -> Result<Convergence> {
    let sb = Sandbox::up(1, sizes.nodes)?;
    let ccm = sb.start_ccm(1, sizes.resync)?;
    sb.wait_initialised(sizes.nodes as usize, sizes.timeout)?;
    sb.set_faults(json!([{ "latency_ms": sizes.latency_ms }]))?;
    let conv = converge(
        &sb,
        &ccm,
        "s",
        sizes.services,
        sizes.baseline_timeout,
        sizes.hc_interval_s,
    )?;
    result("ccm.converge baseline (--concurrent-service-syncs 1)", conv.describe());
    Ok(conv)
}

/// Under a platform allowing `rate` calls per second (429 + Retry-After: 1 beyond it).
/// `bucket`: the CCM's client-side token bucket set to the platform's quota (the cloud
/// config's `rate_limit`), or none (the default: only the 429s' `Retry-After`).
fn rate_limited(sizes: &Sizes, bucket: bool) -> Result<()> {
    let sb = Sandbox::up(2, 3)?;
    let ccm = sb.start_ccm_with(sizes.syncs, Duration::from_secs(300), bucket.then_some(sizes.rate))?;
    sb.wait_initialised(3, sizes.timeout)?;
    let metrics = ccm.metrics.clone();
    let counters = || {
        let waits = sb.metric(&metrics, "kuberaya_ccm_platform_rate_limit_waits_total", "");
        let refused = sb.metric(&metrics, "kuberaya_ccm_platform_requests_total", "status=\"429\"");
        (waits.unwrap_or(0.0), refused.unwrap_or(0.0))
    };
    let (waits0, refused0) = counters();
    sb.set_faults(json!([
        { "latency_ms": sizes.latency_ms },
        { "rate_limit_per_s": sizes.rate, "retry_after_s": 1 },
    ]))?;
    let conv = converge(&sb, &ccm, "r", sizes.rate_services, sizes.timeout, sizes.hc_interval_s)?;
    sb.set_faults(json!([]))?;
    let (waits, refused) = counters();
    let (waits, refused) = (waits - waits0, (refused - refused0) as u64);
    let calls = total(&conv.calls);
    // Calls that got through: the ideal client needs exactly these, at `rate` per second.
    let passed = calls.saturating_sub(refused);
    let ideal = passed as f64 / sizes.rate as f64;
    result(
        &format!(
            "ccm.rate_limited ({} Services, {} calls/s allowed, {})",
            sizes.rate_services,
            sizes.rate,
            if bucket {
                format!("client bucket {0} qps, burst {0}", sizes.rate)
            } else {
                "no client bucket".to_owned()
            }
        ),
        format!(
            "{}; ideal bound {:.2} s ({} calls that passed / {} per s) → {} of ideal; {} calls, {} answered 429, {} waits in the client",
            conv.describe(),
            ideal,
            passed,
            sizes.rate,
            conv.projected()
                .map(|p| ratio(p, ideal))
                .unwrap_or_else(|| "n/a".into()),
            calls,
            refused,
            waits
        ),
    );
    Ok(())
}

/// Builds the release binaries the bench runs (cargo does nothing when they are up to
/// date); a stale binary from an earlier build would measure old code.
fn build_binaries() {
    if std::env::var_os("KURAYA_BIN_DIR").is_some() {
        return;
    }
    let status = common::release_build(&["--bin", "kuberaya-sandbox", "--bin", "kuberaya-ccm"]);
    assert!(
        status.as_ref().is_ok_and(|s| s.success()),
        "building the release binaries failed: {status:?}"
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    build_binaries();
    let sizes = Sizes::from_env();
    println!("ccm_scale: {sizes:?}");
    println!("{}", machine());
    let measured_conv = measured(&sizes).unwrap_or_else(|e| {
        println!("RESULT ccm.measured: failed: {e:#}");
        None
    });
    if sizes.baseline {
        match baseline(&sizes) {
            Ok(base) => {
                if let (Some(m), Some(b)) = (measured_conv.as_ref().and_then(|c| c.projected()), base.projected()) {
                    result(
                        "ccm.converge speed-up vs baseline",
                        format!(
                            "{} ({:.2} s vs {:.2} s{})",
                            ratio(b, m),
                            m,
                            b,
                            if base.took.is_none() {
                                ", baseline extrapolated"
                            } else {
                                ""
                            }
                        ),
                    );
                }
            }
            Err(e) => println!("RESULT ccm.baseline: failed: {e:#}"),
        }
    }
    if sizes.rate_limited {
        for bucket in [false, true] {
            if let Err(e) = rate_limited(&sizes, bucket) {
                println!("RESULT ccm.rate_limited: failed: {e:#}");
            }
        }
    }
    println!("{}", common::load_average());
}

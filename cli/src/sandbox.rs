//! `kuberaya sandbox up|down|status|env`: the whole system on one machine.
//!
//! A sandbox lives in a state directory (`--state-dir`), so several can run side by side:
//! - `sandbox.lock`: held (flock) by the running `sandbox up` process for its lifetime, so
//!   "is it running" never depends on a stale pid file;
//! - `sandbox.json`: how to reach it (written when ready, removed on a clean stop);
//! - `credentials.json` (0600): the platform stand-in's login, made once per state dir;
//! - `platform/`: the platform stand-in's persistent state;
//! - `kube/`: the Kubernetes API stand-in's state (certificates, token, objects);
//! - `kubeconfig` (0600): for `kubectl` and clients of the sandbox cluster;
//! - `sandbox.log`: the output of a `--detach`ed sandbox.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use k8s_openapi::api::coordination::v1::Lease;
use serde::{Deserialize, Serialize};

use kuberaya_sandbox::cluster::{Cluster, ClusterOptions, PlatformClient, PlatformLogin};
use kuberaya_sandbox::kube::{KubeApi, KubeApiConfig};
use kuberaya_sandbox::platform::{PlatformConfig, PlatformStandIn, serve};

use crate::output::{OutputFormat, table};

mod ranges;

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Start the sandbox (foreground; Ctrl-C stops it). `--detach` returns once it is ready.
    Up(UpArgs),
    /// Stop a running sandbox; `--purge` also deletes its state.
    Down(DownArgs),
    /// Show whether the sandbox runs and what it holds.
    Status(StatusArgs),
    /// Print `export` lines for the sandbox's platform API and cluster: `eval "$(kuberaya sandbox env)"`.
    Env(StateDirArg),
    /// Add, stop, start or delete a node of the sandbox cluster (its worker VM on the platform).
    Node(NodeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    #[command(subcommand)]
    pub action: NodeAction,
    #[command(flatten)]
    pub dir: StateDirArg,
}

#[derive(Debug, Clone, Subcommand)]
pub enum NodeAction {
    /// Create a running worker VM; its node agent registers the Node.
    Add { name: String },
    /// Stop the node's VM: the Node goes NotReady, its pods not ready.
    Stop { name: String },
    /// Start the node's VM again.
    Start { name: String },
    /// Delete the node's VM.
    Delete { name: String },
}

#[derive(Debug, Clone, Args)]
pub struct StateDirArg {
    /// Where the sandbox keeps its state [default: $XDG_STATE_HOME/kuberaya/sandbox, else ~/.local/state/kuberaya/sandbox]
    #[arg(long, env = "KUBERAYA_SANDBOX_DIR", global = true)]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub dir: StateDirArg,
    /// Run in the background and return once everything is ready.
    #[arg(long)]
    pub detach: bool,
    /// Address of the platform API [default: the previous run's address if free, else a free port on 127.0.0.1]
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Number of worker VMs (nodes) of the sandbox cluster.
    #[arg(long, visible_alias = "nodes", default_value_t = 3)]
    pub workers: usize,
    /// ID of the sandbox cluster on the platform.
    #[arg(long, default_value = "cl-sandbox")]
    pub cluster_id: String,
    /// Public IPs of load balancers come from this range (on loopback) [default: 127.203.0.0/24,
    /// or the next free /24 (127.204.0.0/24, ...) while another sandbox holds it]
    #[arg(long)]
    pub public_ip_range: Option<ipnet::Ipv4Net>,
    /// Private IPs of the worker VMs come from this range (on loopback) [default: 127.10.0.0/24,
    /// or the next free one]
    #[arg(long)]
    pub vm_ip_range: Option<ipnet::Ipv4Net>,
    /// Service ClusterIPs come from this range (on loopback) [default: 127.96.0.0/16, or the
    /// next free one]
    #[arg(long)]
    pub service_cidr: Option<ipnet::Ipv4Net>,
    /// Pod IPs: node i gets the i-th /24 of this range (on loopback) [default: 127.244.0.0/16,
    /// or the next free one]
    #[arg(long)]
    pub pod_cidr: Option<ipnet::Ipv4Net>,
    /// No CCM runs: the node agents remove the uninitialized taint and set node addresses
    /// (LoadBalancer Services stay pending).
    #[arg(long, conflicts_with = "external_ccm")]
    pub no_ccm: bool,
    /// No CCM runs inside the sandbox: nodes wait, tainted uninitialized, for one you run
    /// yourself (`kuberaya-ccm --kubeconfig <state-dir>/kubeconfig ...`).
    #[arg(long)]
    pub external_ccm: bool,
    /// How long the platform takes to provision or update a load balancer.
    #[arg(long, default_value_t = 300)]
    pub provisioning_delay_ms: u64,
    /// Play a platform without UDP load balancing.
    #[arg(long)]
    pub no_udp: bool,
    /// Do not run the WireGuard gateway (nor install its CRD, namespace and Service). Implied by
    /// `--no-ccm` and `--external-ccm`: nothing in the sandbox provisions its load balancer then,
    /// and such a sandbox is for bringing your own components.
    #[arg(long)]
    pub no_gateway: bool,
    /// Set by `--detach` on the background process it starts.
    #[arg(long, hide = true)]
    pub detached_child: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DownArgs {
    #[command(flatten)]
    pub dir: StateDirArg,
    /// Also delete the sandbox's state (platform objects, credentials, logs).
    #[arg(long)]
    pub purge: bool,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub dir: StateDirArg,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// How to reach a running sandbox (`sandbox.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Runtime {
    pub pid: u32,
    pub platform_url: String,
    pub email: String,
    pub password: String,
    pub cluster_id: String,
    pub started_at_unix: u64,
    /// The sandbox cluster's kubeconfig.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Credentials {
    email: String,
    password: String,
}

const RUNTIME_FILE: &str = "sandbox.json";
const LOCK_FILE: &str = "sandbox.lock";
const CREDENTIALS_FILE: &str = "credentials.json";
const LOG_FILE: &str = "sandbox.log";
const KUBECONFIG_FILE: &str = "kubeconfig";
const SANDBOX_EMAIL: &str = "admin@sandbox.local";
const EXAMPLE_FILE: &str = "web.yaml";

/// The Lease of the CCM's leader election: the one a deployed `kuberaya-ccm` uses by
/// default, so that a CCM started against the sandbox never reconciles alongside ours.
const CCM_LEASE_NAMESPACE: &str = "kube-system";
const CCM_LEASE_NAME: &str = "kuberaya-ccm";
/// The in-process CCM's identity. Only one `sandbox up` runs per state dir (the lock), so
/// a restarted sandbox takes back its own Lease at once, even after a crash.
const CCM_IDENTITY: &str = "kuberaya-sandbox";
const CCM_LEASE_DURATION: Duration = Duration::from_secs(15);
const CCM_RENEW_EVERY: Duration = Duration::from_secs(5);
const CCM_RETRY: Duration = Duration::from_secs(2);
const NODE_INIT_TIMEOUT: Duration = Duration::from_secs(30);

/// `web.yaml` of the "try this" block: a Deployment and its LoadBalancer Service.
const EXAMPLE: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 3
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: any
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: LoadBalancer
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
";

pub async fn run(cmd: SandboxCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SandboxCommand::Up(args) if args.detach => up_detached(args).await,
        SandboxCommand::Up(args) => up(args).await,
        SandboxCommand::Down(args) => down(args).await,
        SandboxCommand::Status(args) => status(args).await,
        SandboxCommand::Env(dir) => env(dir),
        SandboxCommand::Node(args) => node(args).await,
    }
}

pub fn default_state_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("kuberaya/sandbox"));
    }
    let home = std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .context("neither XDG_STATE_HOME nor HOME is set; pass --state-dir")?;
    Ok(PathBuf::from(home).join(".local/state/kuberaya/sandbox"))
}

fn state_dir(arg: &StateDirArg) -> anyhow::Result<PathBuf> {
    match &arg.state_dir {
        Some(dir) => Ok(dir.clone()),
        None => default_state_dir(),
    }
}

/// An exclusive, non-blocking flock on `sandbox.lock`: `Ok(None)` when another process holds it.
fn try_lock(dir: &Path) -> anyhow::Result<Option<File>> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(file));
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(err).with_context(|| format!("cannot lock {}", path.display()))
    }
}

/// The error for a second `sandbox up` on a state directory in use.
fn already_running(dir: &Path) -> anyhow::Error {
    let pid = read_runtime(dir)
        .ok()
        .flatten()
        .map(|rt| rt.pid.to_string())
        .unwrap_or_else(|| "?".into());
    anyhow::anyhow!(
        "a sandbox is already running in {} (pid {pid}); see `kuberaya sandbox status`, or stop it with `kuberaya sandbox down`",
        dir.display()
    )
}

fn is_running(dir: &Path) -> anyhow::Result<bool> {
    if !dir.join(LOCK_FILE).exists() {
        return Ok(false);
    }
    Ok(try_lock(dir)?.is_none())
}

fn read_runtime(dir: &Path) -> anyhow::Result<Option<Runtime>> {
    let path = dir.join(RUNTIME_FILE);
    match fs::read(&path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Write `contents` to `path` with mode 0600, atomically (temp file + rename).
fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn load_or_make_credentials(dir: &Path) -> anyhow::Result<Credentials> {
    let path = dir.join(CREDENTIALS_FILE);
    if let Ok(bytes) = fs::read(&path) {
        return serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not valid; delete it to make new credentials", path.display()));
    }
    let password: String = {
        let bytes: [u8; 18] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    };
    let creds = Credentials {
        email: SANDBOX_EMAIL.to_string(),
        password,
    };
    write_private(&path, &serde_json::to_vec_pretty(&creds)?)?;
    Ok(creds)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn bind_platform_listener(dir: &Path, requested: Option<SocketAddr>) -> anyhow::Result<tokio::net::TcpListener> {
    if let Some(addr) = requested {
        return tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"));
    }
    // Keep the previous run's address when it is free, so exported variables stay valid.
    if let Some(prev) = read_runtime(dir).ok().flatten().and_then(|rt| {
        rt.platform_url
            .strip_prefix("http://")
            .and_then(|a| a.parse::<SocketAddr>().ok())
    }) && let Ok(l) = tokio::net::TcpListener::bind(prev).await
    {
        return Ok(l);
    }
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen on 127.0.0.1")
}

/// Logs of the stand-ins and the in-process CCM on stderr (the `sandbox.log` of a detached
/// sandbox): warnings and errors unless `RUST_LOG` says otherwise.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    // The sandbox is a server: a client that goes away while one of its HTTP servers writes
    // (hyper writes with writev, which raises SIGPIPE) must cost that connection only, not the
    // whole sandbox, so the CLI's default SIGPIPE disposition is undone here.
    // SAFETY: changing a signal's disposition to "ignore"; no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let dir = state_dir(&args.dir)?;
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let Some(_lock) = try_lock(&dir)? else {
        return Err(already_running(&dir));
    };
    // A previous run that was killed leaves its runtime file behind; it is stale now.
    let _ = fs::remove_file(dir.join(RUNTIME_FILE));
    let started = Instant::now();
    let creds = load_or_make_credentials(&dir)?;
    let requested = ranges::Requested {
        public_ip_range: args.public_ip_range,
        vm_ip_range: args.vm_ip_range,
        service_cidr: args.service_cidr,
        pod_cidr: args.pod_cidr,
    };
    let ranges = ranges::claim(&dir, &requested)?;

    step(&format!("state in {}", dir.display()));
    if ranges != ranges::defaults() {
        step(&format!(
            "address ranges apart from the other running sandboxes: public IPs {}, VMs {}, services {}, pods {}",
            ranges.public_ip_range, ranges.vm_ip_range, ranges.service_cidr, ranges.pod_cidr
        ));
    }
    let config = PlatformConfig {
        state_dir: dir.join("platform"),
        email: creds.email.clone(),
        password: creds.password.clone(),
        public_ip_range: ranges.public_ip_range,
        vm_ip_range: ranges.vm_ip_range,
        provisioning_delay: Duration::from_millis(args.provisioning_delay_ms),
        udp_enabled: !args.no_udp,
        ..PlatformConfig::default()
    };
    let platform = PlatformStandIn::open(config)
        .await
        .context("cannot start the platform stand-in")?;
    platform
        .seed_cluster(&args.cluster_id, "sandbox", args.workers)
        .await
        .context("cannot create the sandbox cluster on the platform stand-in")?;
    let listener = bind_platform_listener(&dir, args.listen).await?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    step(&format!(
        "CloudRaya platform stand-in at {url} (cluster {}, {} worker VMs)",
        args.cluster_id, args.workers
    ));

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, platform.clone(), async move {
        let _ = stop_rx.await;
    }));

    let kube_api = KubeApi::open(KubeApiConfig {
        service_cidr: ranges.service_cidr,
        ..KubeApiConfig::new(dir.join("kube"))
    })
    .await
    .context("cannot start the Kubernetes API stand-in")?;
    let kube_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen on 127.0.0.1")?;
    let kube_url = format!("https://{}", kube_listener.local_addr()?);
    let (kube_stop_tx, kube_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let kube_server = tokio::spawn(kuberaya_sandbox::kube::serve(
        kube_listener,
        kube_api.clone(),
        async move {
            let _ = kube_stop_rx.await;
        },
    ));
    let kubeconfig = dir.join(KUBECONFIG_FILE);
    kube_api
        .write_kubeconfig(&kubeconfig, &kube_url, "kuberaya-sandbox")
        .context("cannot write the kubeconfig")?;
    step(&format!(
        "Kubernetes API stand-in at {kube_url} (kubeconfig {})",
        kubeconfig.display()
    ));
    let client = kuberaya_sandbox::cluster::client_from_kubeconfig(&kubeconfig).await?;
    let login = PlatformLogin {
        url: url.clone(),
        email: creds.email.clone(),
        password: creds.password.clone(),
    };
    let options = ClusterOptions {
        no_ccm: args.no_ccm,
        pod_cidr: ranges.pod_cidr,
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(client, login, &args.cluster_id, options)
        .await
        .context("cannot start the sandbox cluster")?;
    step(&format!(
        "cluster {}: {} nodes (pods in {}, services in {}){}",
        args.cluster_id,
        args.workers,
        ranges.pod_cidr,
        ranges.service_cidr,
        if args.no_ccm {
            ", no CCM"
        } else if args.external_ccm {
            ", nodes wait for your CCM"
        } else {
            ""
        }
    ));
    let ccm = if args.no_ccm || args.external_ccm {
        None
    } else {
        let ccm = InProcessCcm::start(&kubeconfig, &url, &creds, &args.cluster_id, !args.no_udp)
            .await
            .context("cannot start the CCM")?;
        step(&format!(
            "CCM: service, node and node lifecycle controllers (leader of Lease {CCM_LEASE_NAMESPACE}/{CCM_LEASE_NAME})"
        ));
        let initialised = ccm.wait_nodes_initialised(args.workers, NODE_INIT_TIMEOUT).await;
        let n = initialised.context("nodes not initialised by the CCM; see `kubectl get nodes`")?;
        step(&format!(
            "{n} nodes initialised by the CCM (providerID, addresses, zone labels)"
        ));
        Some(ccm)
    };
    let mut gateway = if args.no_gateway || ccm.is_none() {
        None
    } else {
        // "ready" means every part runs: a gateway that cannot start is an error.
        Some(
            InProcessGateway::start(&kubeconfig, ranges.service_cidr, ranges.pod_cidr)
                .await
                .context("the WireGuard gateway cannot start; pass another --pod-cidr, or --no-gateway")?,
        )
    };
    if let Some(gw) = gateway.as_mut() {
        step(&format!(
            "WireGuard gateway on {} (tunnel {}, public key {}) behind Service {}/{}",
            gw.info.udp,
            gw.info.tunnel_address,
            gw.info.public_key,
            crate::gateway::DEFAULT_GATEWAY_NAMESPACE,
            crate::gateway::DEFAULT_GATEWAY_SERVICE
        ));
        if args.no_udp {
            eprintln!("! the platform plays no UDP load balancing (--no-udp): the gateway's Service stays pending");
        } else {
            let ip = gw
                .wait_public_ip(&kubeconfig, GATEWAY_LB_TIMEOUT)
                .await
                .context("the gateway's load balancer; see `kuberaya lb list`")?;
            step(&format!("gateway load balancer: {ip}:{GATEWAY_PORT}/udp"));
        }
    }
    write_example(&dir)?;
    // kube-proxy's listeners (ClusterIPs, NodePorts, health ports) all bound.
    let failures = cluster.wait_listeners(Duration::from_secs(5)).await;
    if !failures.is_empty() {
        bail!(
            "kube-proxy cannot listen on {} address(es) that another process holds (another sandbox?): {}; pass other ranges (--service-cidr, --vm-ip-range)",
            failures.len(),
            failures.join("; ")
        );
    }

    let runtime = Runtime {
        pid: std::process::id(),
        platform_url: url.clone(),
        email: creds.email.clone(),
        password: creds.password.clone(),
        cluster_id: args.cluster_id.clone(),
        started_at_unix: unix_now(),
        kubeconfig: Some(kubeconfig.clone()),
    };
    write_private(&dir.join(RUNTIME_FILE), &serde_json::to_vec_pretty(&runtime)?)?;
    step(&format!("ready in {:.1}s", started.elapsed().as_secs_f64()));
    print_try_this(&dir, &args, &runtime, gateway.as_ref());
    let _ = std::io::stdout().flush();

    wait_for_stop_signal().await;
    eprintln!("stopping the sandbox...");
    if let Some(gateway) = gateway {
        gateway.shutdown().await;
    }
    if let Some(ccm) = ccm {
        ccm.shutdown().await;
    }
    cluster.shutdown().await;
    let _ = kube_stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), kube_server).await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    platform.shutdown().await;
    let _ = fs::remove_file(dir.join(RUNTIME_FILE));
    eprintln!("sandbox stopped");
    Ok(ExitCode::SUCCESS)
}

fn write_example(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(EXAMPLE_FILE);
    fs::write(&path, EXAMPLE).with_context(|| format!("cannot write {}", path.display()))
}

/// The CCM, run in this process as a cluster runs it: its own Kubernetes client from the
/// sandbox's kubeconfig, its own platform client with the sandbox's credentials, and
/// every controller only while it holds the leader Lease.
struct InProcessCcm {
    client: kube::Client,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessCcm {
    async fn start(
        kubeconfig: &Path,
        url: &str,
        creds: &Credentials,
        cluster_id: &str,
        udp_supported: bool,
    ) -> anyhow::Result<InProcessCcm> {
        use kuberaya_ccm::platform::{HttpPlatform, Platform as _, PlatformClientConfig};
        let client = kuberaya_sandbox::cluster::client_from_kubeconfig(kubeconfig).await?;
        let http = HttpPlatform::new(PlatformClientConfig::new(url, &creds.email, &creds.password))
            .context("cannot build the CCM's platform client")?;
        http.get_cluster(cluster_id)
            .await
            .with_context(|| format!("the CCM cannot read cluster {cluster_id} on the platform"))?;
        let metrics = Arc::new(kuberaya_ccm::metrics::Metrics::new(Some(http.metrics())));
        let settings = kuberaya_ccm::ControllerSettings {
            service: kuberaya_ccm::service::controller::RunSettings {
                config: kuberaya_ccm::service::desired::DesiredConfig {
                    cluster_id: cluster_id.to_string(),
                    udp_supported,
                },
                timing: kuberaya_ccm::service::controller::Timing {
                    resync: Duration::from_secs(60),
                    poll: Duration::from_millis(500),
                    ..Default::default()
                },
                concurrency: 10,
                node_debounce: Duration::from_millis(500),
                node_debounce_max: Duration::from_millis(2500),
                orphan_sweep: Duration::from_secs(60),
            },
            node: kuberaya_ccm::NodeSettings {
                refresh: Duration::from_secs(5),
                monitor: Duration::from_secs(2),
                ..kuberaya_ccm::NodeSettings::new(cluster_id)
            },
        };
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let platform: Arc<dyn kuberaya_ccm::platform::Platform> = Arc::new(http);
        let task = tokio::spawn(lead_and_run(client.clone(), platform, metrics, settings, stop_rx));
        Ok(InProcessCcm { client, stop, task })
    }

    /// Waits until `count` Nodes carry a providerID; returns how many do.
    async fn wait_nodes_initialised(&self, count: usize, timeout: Duration) -> anyhow::Result<usize> {
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(self.client.clone());
        let deadline = Instant::now() + timeout;
        loop {
            let list = nodes.list(&Default::default()).await?;
            let done = list
                .items
                .iter()
                .filter(|n| n.spec.as_ref().is_some_and(|s| s.provider_id.is_some()))
                .count();
            if done >= count {
                return Ok(done);
            }
            if Instant::now() > deadline {
                bail!("{done} of {count} nodes have a providerID after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the controllers and gives up the Lease.
    async fn shutdown(self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(Duration::from_secs(8), self.task).await.is_err() {
            eprintln!("the CCM did not stop within 8 s");
        }
    }
}

/// The WireGuard gateway's UDP port, on its Service and its socket.
const GATEWAY_PORT: u16 = 51820;
/// The gateway's tunnel range (it takes the first address).
const GATEWAY_TUNNEL_CIDR: &str = "100.64.0.0/16";
/// How long `sandbox up` waits for the gateway's load balancer.
const GATEWAY_LB_TIMEOUT: Duration = Duration::from_secs(30);
/// Field manager of the objects the sandbox applies for the gateway.
const GATEWAY_FIELD_MANAGER: &str = "kuberaya-sandbox";

/// The WireGuard gateway, run in this process as a cluster runs it: its own Kubernetes
/// client from the sandbox's kubeconfig, its socket on a pod-range address, behind its own
/// `LoadBalancer` Service (no selector; the sandbox writes its EndpointSlice), so a peer's
/// traffic goes Internet → platform LB → node IP:NodePort → kube-proxy → gateway.
struct InProcessGateway {
    info: kuberaya_gateway::run::StartedInfo,
    /// The load balancer's public IP, once the CCM provisioned it.
    public_ip: Option<String>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<kuberaya_gateway::Result<()>>,
}

/// The gateway's "pod IP": the pod range's last address but one (node i takes the i-th /24
/// from the start of the range, so this one is clear of them).
fn gateway_pod_ip(pod_cidr: ipnet::Ipv4Net) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(pod_cidr.broadcast()).saturating_sub(1))
}

/// Server-side apply of `obj` (named `name`) with the sandbox's field manager.
async fn apply<K>(api: &kube::Api<K>, name: &str, obj: &K) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = kube::api::PatchParams::apply(GATEWAY_FIELD_MANAGER).force();
    api.patch(name, &params, &kube::api::Patch::Apply(obj))
        .await
        .with_context(|| format!("cannot apply {name}"))?;
    Ok(())
}

impl InProcessGateway {
    /// Installs the VpnPeer CRD, the gateway's namespace and `kuberaya-config`, starts the
    /// gateway and registers it behind its Service; waits (bounded) for the load balancer.
    async fn start(kubeconfig: &Path, service_cidr: ipnet::Ipv4Net, pod_cidr: ipnet::Ipv4Net) -> anyhow::Result<Self> {
        use crate::gateway::{
            ANNOTATION_PUBLIC_KEY, ANNOTATION_TUNNEL_ADDRESS, CONFIG_KEY_SERVICE_CIDR, CONFIG_MAP,
            DEFAULT_GATEWAY_NAMESPACE as NAMESPACE, DEFAULT_GATEWAY_SERVICE as SERVICE,
        };
        use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServicePort, ServiceSpec};
        use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        use kube::CustomResourceExt as _;
        use kuberaya_gateway::crd::VpnPeer;
        use kuberaya_gateway::run::{RunConfig, Sources};

        let client = kuberaya_sandbox::cluster::client_from_kubeconfig(kubeconfig).await?;
        let crd = VpnPeer::crd();
        let crd_name = crd.metadata.name.clone().unwrap_or_default();
        apply(
            &kube::Api::<CustomResourceDefinition>::all(client.clone()),
            &crd_name,
            &crd,
        )
        .await?;
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(NAMESPACE.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        apply(&kube::Api::<Namespace>::all(client.clone()), NAMESPACE, &namespace).await?;
        let config = ConfigMap {
            metadata: ObjectMeta {
                name: Some(CONFIG_MAP.into()),
                namespace: Some(NAMESPACE.into()),
                ..Default::default()
            },
            data: Some([(CONFIG_KEY_SERVICE_CIDR.to_string(), service_cidr.to_string())].into()),
            ..Default::default()
        };
        apply(
            &kube::Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE),
            CONFIG_MAP,
            &config,
        )
        .await?;

        let pod_ip = gateway_pod_ip(pod_cidr);
        let tunnel_cidr: ipnet::Ipv4Net = GATEWAY_TUNNEL_CIDR.parse().context("the tunnel range")?;
        let loopback_any: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
        let started = kuberaya_gateway::run::start(RunConfig {
            listen: SocketAddr::from((pod_ip, GATEWAY_PORT)),
            tunnel_cidr,
            namespace: NAMESPACE.into(),
            sources: Sources::Kube {
                kubeconfig: Some(kubeconfig.to_path_buf()),
                client: None,
            },
            metrics_bind_address: loopback_any,
            health_bind_address: loopback_any,
            ..RunConfig::default()
        })
        .await
        .context("cannot start the gateway")?;
        let info = started.info().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(started.run(async move {
            let _ = stopped.await;
        }));
        let gateway = InProcessGateway {
            info,
            public_ip: None,
            stop,
            task,
        };

        let services = kube::Api::<Service>::namespaced(client.clone(), NAMESPACE);
        let port_name = "wireguard".to_string();
        let service = Service {
            metadata: ObjectMeta {
                name: Some(SERVICE.into()),
                namespace: Some(NAMESPACE.into()),
                annotations: Some(
                    [
                        (ANNOTATION_PUBLIC_KEY.to_string(), gateway.info.public_key.to_string()),
                        (
                            ANNOTATION_TUNNEL_ADDRESS.to_string(),
                            format!("{}/{}", gateway.info.tunnel_address, tunnel_cidr.prefix_len()),
                        ),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                ports: Some(vec![ServicePort {
                    name: Some(port_name.clone()),
                    protocol: Some("UDP".into()),
                    port: i32::from(GATEWAY_PORT),
                    target_port: Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(
                        i32::from(GATEWAY_PORT),
                    )),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let registered = async {
            apply(&services, SERVICE, &service).await?;
            let slice = EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("{SERVICE}-sandbox")),
                    namespace: Some(NAMESPACE.into()),
                    labels: Some([("kubernetes.io/service-name".to_string(), SERVICE.to_string())].into()),
                    ..Default::default()
                },
                address_type: "IPv4".into(),
                endpoints: vec![Endpoint {
                    addresses: vec![gateway.info.udp.ip().to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    ..Default::default()
                }],
                ports: Some(vec![EndpointPort {
                    name: Some(port_name),
                    protocol: Some("UDP".into()),
                    port: Some(i32::from(gateway.info.udp.port())),
                    ..Default::default()
                }]),
            };
            let slices = kube::Api::<EndpointSlice>::namespaced(client.clone(), NAMESPACE);
            apply(&slices, &format!("{SERVICE}-sandbox"), &slice).await
        }
        .await;
        if let Err(e) = registered {
            gateway.shutdown().await;
            return Err(e);
        }
        Ok(gateway)
    }

    /// Waits until the gateway's Service has a load-balancer IP (the CCM provisioned it).
    async fn wait_public_ip(&mut self, kubeconfig: &Path, timeout: Duration) -> anyhow::Result<String> {
        use crate::gateway::{DEFAULT_GATEWAY_NAMESPACE as NAMESPACE, DEFAULT_GATEWAY_SERVICE as SERVICE};
        let client = kuberaya_sandbox::cluster::client_from_kubeconfig(kubeconfig).await?;
        let services = kube::Api::<k8s_openapi::api::core::v1::Service>::namespaced(client, NAMESPACE);
        let deadline = Instant::now() + timeout;
        loop {
            let ip = services
                .get_opt(SERVICE)
                .await?
                .and_then(|s| s.status)
                .and_then(|s| s.load_balancer)
                .and_then(|lb| lb.ingress)
                .and_then(|i| i.into_iter().next())
                .and_then(|i| i.ip);
            if let Some(ip) = ip {
                self.public_ip = Some(ip.clone());
                return Ok(ip);
            }
            if Instant::now() > deadline {
                bail!("the load balancer of {NAMESPACE}/{SERVICE} has no IP after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the gateway and releases its sockets.
    async fn shutdown(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        match tokio::time::timeout(Duration::from_secs(3), &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("the gateway stopped with an error: {e}"),
            Ok(Err(e)) => eprintln!("the gateway task failed: {e}"),
            Err(_) => {
                eprintln!("the gateway did not stop within 3 s; aborting it");
                task.abort();
            }
        }
    }
}

/// Leader election on [`CCM_LEASE_NAME`], running every CCM controller while leading.
async fn lead_and_run(
    client: kube::Client,
    platform: Arc<dyn kuberaya_ccm::platform::Platform>,
    metrics: Arc<kuberaya_ccm::metrics::Metrics>,
    settings: kuberaya_ccm::ControllerSettings,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), CCM_LEASE_NAMESPACE);
    loop {
        loop {
            match try_lead(&leases).await {
                Ok(true) => break,
                Ok(false) => tracing::debug!("the CCM Lease is held by another CCM; waiting"),
                Err(e) => tracing::warn!(error = %e, "CCM leader election"),
            }
            tokio::select! {
                () = tokio::time::sleep(CCM_RETRY) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        tracing::info!(identity = CCM_IDENTITY, "the CCM leads; starting its controllers");
        metrics.set_leader(true);
        let (ctl_stop, mut ctl_stop_rx) = tokio::sync::watch::channel(false);
        let mut run = tokio::spawn(kuberaya_ccm::run_controllers(
            client.clone(),
            platform.clone(),
            metrics.clone(),
            settings.clone(),
            async move {
                let _ = ctl_stop_rx.wait_for(|s| *s).await;
            },
        ));
        let mut renewed = Instant::now();
        let (stopping, ended) = loop {
            tokio::select! {
                () = tokio::time::sleep(CCM_RENEW_EVERY) => {}
                _ = stop.wait_for(|s| *s) => break (true, None),
                r = &mut run => break (false, Some(r)),
            }
            match try_lead(&leases).await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => break (false, None),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the CCM Lease");
                    if renewed.elapsed() + CCM_RENEW_EVERY >= CCM_LEASE_DURATION {
                        break (false, None);
                    }
                }
            }
        };
        let ended = match ended {
            Some(r) => r,
            None => {
                let _ = ctl_stop.send(true);
                match tokio::time::timeout(Duration::from_secs(5), &mut run).await {
                    Ok(r) => r,
                    Err(_) => {
                        run.abort();
                        Ok(Ok(()))
                    }
                }
            }
        };
        match ended {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the CCM's controllers stopped"),
            Err(e) => tracing::error!(error = %e, "the CCM's controllers panicked"),
        }
        metrics.set_leader(false);
        if stopping {
            release_lead(&leases).await;
            return;
        }
        tracing::warn!("the CCM is no longer the leader; waiting to lead again");
    }
}

/// Takes or renews the Lease: `Ok(true)` while we hold it. Every write carries the
/// resourceVersion read, so two candidates cannot both win.
async fn try_lead(leases: &kube::Api<Lease>) -> kube::Result<bool> {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let now = k8s_openapi::jiff::Timestamp::now();
    let duration_s = i32::try_from(CCM_LEASE_DURATION.as_secs()).unwrap_or(i32::MAX);
    let is_conflict = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 409);
    let Some(mut lease) = leases.get_opt(CCM_LEASE_NAME).await? else {
        let lease = Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(CCM_LEASE_NAME.into()),
                namespace: Some(CCM_LEASE_NAMESPACE.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(CCM_IDENTITY.into()),
                lease_duration_seconds: Some(duration_s),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match leases.create(&Default::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let ours = holder == CCM_IDENTITY;
    let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(t), Some(d)) => t.0.as_second() + i64::from(d) < now.as_second(),
        _ => true,
    };
    if !ours && !holder.is_empty() && !expired {
        return Ok(false);
    }
    if !ours {
        spec.holder_identity = Some(CCM_IDENTITY.into());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(duration_s);
    match leases.replace(CCM_LEASE_NAME, &Default::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(e) if is_conflict(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up (empty holder), so another CCM may lead at once.
async fn release_lead(leases: &kube::Api<Lease>) {
    let Ok(Some(mut lease)) = leases.get_opt(CCM_LEASE_NAME).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(CCM_IDENTITY) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    if let Err(e) = leases.replace(CCM_LEASE_NAME, &Default::default(), &lease).await {
        tracing::warn!(error = %e, "cannot release the CCM Lease");
    }
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        // Without signal handlers we can only run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

fn step(msg: &str) {
    println!("✓ {msg}");
}

fn print_try_this(dir: &Path, args: &UpArgs, rt: &Runtime, gateway: Option<&InProcessGateway>) {
    let dir_flag = if args.dir.state_dir.is_some() && args.dir.state_dir != default_state_dir().ok() {
        format!(" --state-dir {}", dir.display())
    } else {
        String::new()
    };
    println!();
    println!("The sandbox is up. Try this in another shell:");
    println!();
    println!("  eval \"$(kuberaya sandbox env{dir_flag})\"");
    println!("  curl -s -X POST $CLOUDRAYA_API_URL/core/v1/auth/login -H 'content-type: application/json' \\");
    println!("       -d \"{{\\\"email\\\":\\\"$CLOUDRAYA_EMAIL\\\",\\\"password\\\":\\\"$CLOUDRAYA_PASSWORD\\\"}}\"");
    println!("  kuberaya sandbox status{dir_flag}");
    println!("  kubectl get nodes -o wide");
    println!("  kubectl apply -f {}", dir.join(EXAMPLE_FILE).display());
    if args.no_ccm || args.external_ccm {
        println!("  kubectl get service web    # no CCM in the sandbox: its EXTERNAL-IP stays <pending>");
    } else {
        println!("  kubectl wait --for=jsonpath='{{.status.loadBalancer.ingress}}' service/web --timeout=30s");
        println!("  curl http://$(kubectl get service web -o jsonpath='{{.status.loadBalancer.ingress[0].ip}}')/");
        println!("  kuberaya lb list");
    }
    if let Some(ip) = gateway.and_then(|g| g.public_ip.as_deref()) {
        println!();
        println!("A VPN peer, through the gateway's load balancer ({ip}:{GATEWAY_PORT}/udp), without root:");
        println!();
        println!("  kuberaya peer add alice --allow default/web --out alice.conf");
        println!("  onetun --private-key \"$(awk '/^PrivateKey/ {{print $3}}' alice.conf)\" \\");
        println!("    --endpoint-public-key \"$(awk '/^PublicKey/ {{print $3}}' alice.conf)\" \\");
        println!("    --endpoint-addr \"$(awk '/^Endpoint/ {{print $3}}' alice.conf)\" \\");
        println!("    --source-peer-ip \"$(awk '/^Address/ {{print $3}}' alice.conf | cut -d/ -f1)\" \\");
        println!("    \"127.0.0.1:18080:$(kubectl get service web -o jsonpath='{{.spec.clusterIP}}'):80:TCP\" &");
        println!("  curl http://127.0.0.1:18080/");
    }
    println!();
    println!("Platform API: {}  (cluster {})", rt.platform_url, rt.cluster_id);
    if args.detach || args.detached_child {
        println!("Stop it with: kuberaya sandbox down{dir_flag}");
    } else {
        println!("Press Ctrl-C to stop it.");
    }
}

async fn up_detached(args: UpArgs) -> anyhow::Result<ExitCode> {
    let dir = state_dir(&args.dir)?;
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if is_running(&dir)? {
        return Err(already_running(&dir));
    }
    let _ = fs::remove_file(dir.join(RUNTIME_FILE));
    let exe = std::env::current_exe().context("cannot find the kuberaya executable")?;
    let log_path = dir.join(LOG_FILE);
    let log = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("cannot write {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["sandbox", "up", "--detached-child", "--state-dir"]).arg(&dir);
    cmd.args(["--workers", &args.workers.to_string(), "--cluster-id", &args.cluster_id]);
    cmd.args(["--provisioning-delay-ms", &args.provisioning_delay_ms.to_string()]);
    // Only the ranges given: the child picks free ones for the rest.
    for (flag, range) in [
        ("--public-ip-range", args.public_ip_range),
        ("--vm-ip-range", args.vm_ip_range),
        ("--service-cidr", args.service_cidr),
        ("--pod-cidr", args.pod_cidr),
    ] {
        if let Some(r) = range {
            cmd.args([flag, &r.to_string()]);
        }
    }
    if args.no_ccm {
        cmd.arg("--no-ccm");
    }
    if args.external_ccm {
        cmd.arg("--external-ccm");
    }
    if let Some(listen) = args.listen {
        cmd.args(["--listen", &listen.to_string()]);
    }
    if args.no_udp {
        cmd.arg("--no-udp");
    }
    if args.no_gateway {
        cmd.arg("--no-gateway");
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the sandbox from our terminal so
    // closing the shell does not stop it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the sandbox in the background")?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(status) = child.try_wait()? {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            bail!("the sandbox stopped during start-up ({status}):\n{}", log.trim_end());
        }
        if let Some(rt) = read_runtime(&dir).ok().flatten()
            && rt.pid == child.id()
        {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            print!("{log}");
            println!(
                "Running in the background (pid {}); its log is {}.",
                rt.pid,
                log_path.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the sandbox was not ready within 90 s; see {}", log_path.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn down(args: DownArgs) -> anyhow::Result<ExitCode> {
    let dir = state_dir(&args.dir)?;
    if dir.exists() && is_running(&dir)? {
        let rt = read_runtime(&dir)?
            .context("the sandbox is starting or its sandbox.json is missing; try again in a moment")?;
        let pid = libc::pid_t::try_from(rt.pid).context("invalid pid in sandbox.json")?;
        // SAFETY: plain kill(2) on the pid the running sandbox wrote about itself.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while is_running(&dir)? {
            if Instant::now() > deadline {
                eprintln!("the sandbox (pid {pid}) did not stop within 15 s; killing it");
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                tokio::time::sleep(Duration::from_millis(200)).await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The lock goes with `up`'s return; the process exits a moment later, once its
        // runtime has wound down (its in-process gateway and CCM included).
        let exit_deadline = Instant::now() + Duration::from_secs(5);
        while process_alive(pid) && Instant::now() < exit_deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = fs::remove_file(dir.join(RUNTIME_FILE));
        println!("sandbox in {} stopped", dir.display());
    } else {
        println!("no sandbox is running in {}", dir.display());
    }
    if args.purge && dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot delete {}", dir.display()))?;
        println!("deleted {}", dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether `pid` is a live process (a zombie, exited but not yet reaped, is not).
fn process_alive(pid: libc::pid_t) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        // SAFETY: signal 0 only checks that the process exists.
        Err(_) => unsafe { libc::kill(pid, 0) == 0 },
    }
}

fn running_runtime(dir: &Path) -> anyhow::Result<Option<Runtime>> {
    if !dir.exists() || !is_running(dir)? {
        return Ok(None);
    }
    read_runtime(dir)
}

fn env(arg: StateDirArg) -> anyhow::Result<ExitCode> {
    let dir = state_dir(&arg)?;
    let Some(rt) = running_runtime(&dir)? else {
        bail!(
            "no sandbox is running in {}; start one with `kuberaya sandbox up --detach`",
            dir.display()
        );
    };
    println!("export CLOUDRAYA_API_URL={}", shell_quote(&rt.platform_url));
    println!("export CLOUDRAYA_EMAIL={}", shell_quote(&rt.email));
    println!("export CLOUDRAYA_PASSWORD={}", shell_quote(&rt.password));
    println!("export KUBERAYA_CLUSTER_ID={}", shell_quote(&rt.cluster_id));
    if let Some(kubeconfig) = &rt.kubeconfig {
        println!("export KUBECONFIG={}", shell_quote(&kubeconfig.display().to_string()));
    }
    Ok(ExitCode::SUCCESS)
}

async fn node(args: NodeArgs) -> anyhow::Result<ExitCode> {
    let dir = state_dir(&args.dir)?;
    let Some(rt) = running_runtime(&dir)? else {
        bail!(
            "no sandbox is running in {}; start one with `kuberaya sandbox up --detach`",
            dir.display()
        );
    };
    let platform = PlatformClient::new(PlatformLogin {
        url: rt.platform_url.clone(),
        email: rt.email.clone(),
        password: rt.password.clone(),
    })?;
    let (name, verb) = match &args.action {
        NodeAction::Add { name } => {
            let vm = platform.add_vm(&rt.cluster_id, name).await?;
            println!("node {name} added (VM {}, {})", vm.id, vm.private_ip);
            return Ok(ExitCode::SUCCESS);
        }
        NodeAction::Stop { name } => (name, "stop"),
        NodeAction::Start { name } => (name, "start"),
        NodeAction::Delete { name } => (name, "delete"),
    };
    let vm = platform.find_vm(&rt.cluster_id, name).await?;
    if verb == "delete" {
        platform.delete_vm(&vm.id).await?;
    } else {
        platform.vm_action(&vm.id, verb).await?;
    }
    println!("node {name}: {verb} done (VM {})", vm.id);
    Ok(ExitCode::SUCCESS)
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let dir = state_dir(&args.dir)?;
    let Some(rt) = running_runtime(&dir)? else {
        match args.output {
            OutputFormat::Json => println!("{}", serde_json::json!({"running": false, "state_dir": dir})),
            OutputFormat::Table => println!("no sandbox is running in {}", dir.display()),
        }
        return Ok(ExitCode::from(1));
    };
    let state = fetch_state(&rt.platform_url).await;
    match args.output {
        OutputFormat::Json => {
            let doc = serde_json::json!({
                "running": true,
                "state_dir": dir,
                "pid": rt.pid,
                "platform_url": rt.platform_url,
                "cluster_id": rt.cluster_id,
                "platform": state.as_ref().ok(),
                "platform_error": state.as_ref().err().map(|e| format!("{e:#}")),
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        OutputFormat::Table => {
            println!("sandbox running in {} (pid {})", dir.display(), rt.pid);
            println!("platform API: {}   cluster: {}", rt.platform_url, rt.cluster_id);
            match &state {
                Ok(state) => print_state_tables(state),
                Err(e) => println!("the platform stand-in does not answer: {e:#}"),
            }
        }
    }
    Ok(if state.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn fetch_state(url: &str) -> anyhow::Result<serde_json::Value> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let resp = client.get(format!("{url}/_sandbox/state")).send().await?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.context("the control API did not answer JSON")?;
    if !status.is_success() {
        bail!("control API answered {status}: {}", body["error"]);
    }
    Ok(body["data"].clone())
}

fn str_of(v: &serde_json::Value, key: &str) -> String {
    match &v[key] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_state_tables(state: &serde_json::Value) {
    let vms: Vec<Vec<String>> = state["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|vm| {
            vec![
                str_of(vm, "name"),
                str_of(vm, "id"),
                str_of(vm, "state"),
                str_of(vm, "private_ip"),
                str_of(vm, "public_ip"),
            ]
        })
        .collect();
    println!();
    print!("{}", table(&["vm", "id", "state", "private ip", "public ip"], &vms));
    let lbs: Vec<Vec<String>> = state["load_balancers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|lb| {
            let ports: Vec<String> = lb["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| format!("{}/{}", r["public_port"], str_of(r, "protocol")))
                .collect();
            vec![
                str_of(lb, "name"),
                str_of(lb, "id"),
                str_of(lb, "status"),
                lb["public_ip"]["address"].as_str().unwrap_or("-").to_string(),
                ports.join(","),
            ]
        })
        .collect();
    println!();
    if lbs.is_empty() {
        println!("no load balancers yet");
    } else {
        print!(
            "{}",
            table(&["load balancer", "id", "status", "public ip", "ports"], &lbs)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = try_lock(dir.path()).unwrap();
        assert!(first.is_some());
        assert!(is_running(dir.path()).unwrap(), "a held lock means running");
        drop(first);
        assert!(!is_running(dir.path()).unwrap());
    }

    #[test]
    fn credentials_are_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_make_credentials(dir.path()).unwrap();
        let b = load_or_make_credentials(dir.path()).unwrap();
        assert_eq!(a.password, b.password);
        assert_eq!(a.password.len(), 36);
        let mode = fs::metadata(dir.path().join(CREDENTIALS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

//! `kuberaya sandbox up|down|status|env|node`: the whole system on one machine.
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
//!
//! Rooms: `state` (the state dir, the lock, the runtime file, the credentials),
//! `platform` (the platform stand-in; `sandbox node`), `cluster` (the Kubernetes API
//! stand-in and the cluster on it), `ccm` and `gateway` (the CCM and the WireGuard
//! gateway, in-process through `kuberaya_ccm::run` and `kuberaya_gateway::run`),
//! `status` (`sandbox status`, `sandbox env`), `try_this` (what `up` prints when
//! ready), `ranges` (address ranges apart from other sandboxes). This module holds the
//! commands and the order things start and stop in.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};

use crate::output::OutputFormat;

mod ccm;
mod cluster;
mod gateway;
mod ipv6;
mod platform;
mod ranges;
mod state;
mod status;
mod try_this;

use ccm::InProcessCcm;
use cluster::SandboxCluster;
use gateway::{GATEWAY_LB_TIMEOUT, GATEWAY_PORT, InProcessGateway};
pub use ipv6::IpFamily;
use ipv6::{Ipv6Ranges, LocalRoutes};
use platform::ServedPlatform;
use state::{
    LOG_FILE, RUNTIME_FILE, already_running, is_running, load_or_make_credentials, process_alive, read_runtime,
    state_dir, try_lock, unix_now, write_private,
};
pub use state::{Runtime, default_state_dir};

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
    /// `dual`: every range also gets an IPv6 one (public IPs fd00:203::/112, VMs
    /// fd00:10::/112, Services fd00:96::/112, pods fd00:244::/48), Services may be
    /// dual-stack and load balancers get IPv6 addresses. Dual needs root: IPv6 loopback has
    /// only ::1, so it adds a `local` route on lo per IPv6 range (removed by `sandbox
    /// down`); run it in a network namespace of your own to leave the host's routes alone.
    #[arg(long, value_enum, default_value_t)]
    pub ip_family: IpFamily,
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
    /// WireGuard gateway replicas, serving the same peers at once (one writes status).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub gateway_replicas: u32,
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

/// How long `sandbox up` waits for the CCM to initialise every node.
const NODE_INIT_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(cmd: SandboxCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SandboxCommand::Up(args) if args.detach => up_detached(args).await,
        SandboxCommand::Up(args) => up(args).await,
        SandboxCommand::Down(args) => down(args).await,
        SandboxCommand::Status(args) => status::status(args).await,
        SandboxCommand::Env(dir) => status::env(dir),
        SandboxCommand::Node(args) => platform::node(args).await,
    }
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
    if args.ip_family.is_dual() {
        // SAFETY: geteuid has no preconditions.
        ipv6::check_privileges(unsafe { libc::geteuid() })?;
    }
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
    // Dual-stack: the IPv6 ranges' routes, removed when this function returns (stop or
    // failure alike).
    let v6 = args.ip_family.is_dual().then(Ipv6Ranges::default);
    let mut routes = match &v6 {
        Some(v6) => {
            let routes = LocalRoutes::add(&dir, v6)?;
            step(&format!(
                "dual-stack: IPv6 public IPs {}, VMs {}, services {}, pods {} (local routes on lo)",
                v6.public_ip_range, v6.vm_ip_range, v6.service_cidr, v6.pod_cidr
            ));
            Some(routes)
        }
        None => None,
    };
    let platform = ServedPlatform::start(&dir, &args, &creds, &ranges, v6.as_ref()).await?;
    let url = platform.url.clone();
    step(&format!(
        "CloudRaya platform stand-in at {url} (cluster {}, {} worker VMs)",
        args.cluster_id, args.workers
    ));
    let cluster = SandboxCluster::start(&dir, &args, &creds, &ranges, v6.as_ref(), &url).await?;
    let kubeconfig = cluster.kubeconfig.clone();
    let (pods, services) = match &v6 {
        Some(v6) => (
            format!("{} and {}", ranges.pod_cidr, v6.pod_cidr),
            format!("{} and {}", ranges.service_cidr, v6.service_cidr),
        ),
        None => (ranges.pod_cidr.to_string(), ranges.service_cidr.to_string()),
    };
    step(&format!(
        "cluster {}: {} nodes (pods in {pods}, services in {services}){}",
        args.cluster_id,
        args.workers,
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
            "CCM: service, node and node lifecycle controllers (leader of Lease {})",
            ccm.lease
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
        // Dual-stack: the replicas' IPv6 pod addresses on lo, as a pod's interface has its
        // address (the gateway binds it as it would in a real pod).
        if let (Some(routes), Some(v6)) = (routes.as_mut(), &v6) {
            for i in 0..args.gateway_replicas {
                if let Some(ip) = gateway::gateway_pod_ipv6(ranges.pod_cidr, v6.pod_cidr, i) {
                    routes.add_address(ip)?;
                }
            }
        }
        // "ready" means every part runs: a gateway that cannot start is an error.
        Some(
            InProcessGateway::start(
                &kubeconfig,
                ranges.service_cidr,
                ranges.pod_cidr,
                v6.as_ref(),
                args.gateway_replicas,
            )
            .await
            .context("the WireGuard gateway cannot start; pass another --pod-cidr, or --no-gateway")?,
        )
    };
    if let Some(gw) = gateway.as_mut() {
        let sockets: Vec<String> = gw.replicas.iter().map(|r| r.info.udp.to_string()).collect();
        step(&format!(
            "WireGuard gateway, {} replicas on {} (tunnel {}, public key {}) behind Service {}/{}",
            gw.replicas.len(),
            sockets.join(", "),
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
    try_this::write_example(&dir, args.ip_family.is_dual())?;
    // kube-proxy's listeners (ClusterIPs, NodePorts, health ports) all bound.
    let failures = cluster.cluster.wait_listeners(Duration::from_secs(5)).await;
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
        ip_family: args.ip_family,
        gateway_replicas: gateway
            .as_ref()
            .map(|g| g.replicas.iter().map(|r| r.record()).collect())
            .unwrap_or_default(),
    };
    write_private(&dir.join(RUNTIME_FILE), &serde_json::to_vec_pretty(&runtime)?)?;
    step(&format!("ready in {:.1}s", started.elapsed().as_secs_f64()));
    try_this::print_try_this(&dir, &args, &runtime, gateway.as_ref());
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
    platform.shutdown().await;
    let _ = fs::remove_file(dir.join(RUNTIME_FILE));
    eprintln!("sandbox stopped");
    Ok(ExitCode::SUCCESS)
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

async fn up_detached(args: UpArgs) -> anyhow::Result<ExitCode> {
    let dir = state_dir(&args.dir)?;
    if args.ip_family.is_dual() {
        // Said at once, not from the background process's log.
        // SAFETY: geteuid has no preconditions.
        ipv6::check_privileges(unsafe { libc::geteuid() })?;
    }
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
    cmd.args(["--gateway-replicas", &args.gateway_replicas.to_string()]);
    if args.ip_family.is_dual() {
        cmd.args(["--ip-family", "dual"]);
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
    // A dual-stack sandbox removes its routes as it stops; one that did not stop cleanly
    // (killed) left them recorded.
    if dir.exists() {
        let removed = ipv6::remove_recorded(&dir)?;
        if removed > 0 {
            println!("removed the {removed} IPv6 local routes it left on lo");
        }
    }
    if args.purge && dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot delete {}", dir.display()))?;
        println!("deleted {}", dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

//! `kuberaya-sandbox`: runs the local stand-ins. A thin wrapper over the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kuberaya_sandbox::platform::{self, PlatformConfig, PlatformStandIn};

#[derive(Debug, Parser)]
#[command(name = "kuberaya-sandbox", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the CloudRaya platform stand-in (API and load-balancer data plane).
    Platform(PlatformArgs),
    /// Run the Kubernetes API server stand-in (HTTPS, bearer token, kubeconfig for kubectl).
    Kube(KubeArgs),
}

#[derive(Debug, clap::Args)]
struct KubeArgs {
    /// Address to serve on (port 0: any free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Directory of the persistent state (certificates, token, objects).
    #[arg(long)]
    state_dir: PathBuf,
    /// Write a kubeconfig for kubectl here once serving.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Context (and cluster) name in the kubeconfig.
    #[arg(long, default_value = "kuberaya-sandbox")]
    context: String,
    /// Service ClusterIP range; two comma-separated (one per family, the primary first)
    /// make a dual-stack cluster, as kube-apiserver's --service-cluster-ip-range.
    #[arg(long, default_value = "127.96.0.0/16")]
    service_cidr: kuberaya_sandbox::kube::ServiceCidrs,
    /// Serve plain HTTP instead of HTTPS (the bearer token is still required).
    #[arg(long)]
    insecure_http: bool,
}

#[derive(Debug, clap::Args)]
struct PlatformArgs {
    /// Address of the HTTP API (port 0: any free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Directory of the persistent state.
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long, default_value = "admin@sandbox.local")]
    email: String,
    #[arg(long, default_value = "sandbox")]
    password: String,
    #[arg(long, default_value = "jkt")]
    region: String,
    /// Where public IPs of load balancers come from.
    #[arg(long, default_value = "127.203.0.0/24")]
    public_ip_range: ipnet::Ipv4Net,
    /// Where VM private IPs come from (also the seeded subnet's CIDR).
    #[arg(long, default_value = "127.10.0.0/24")]
    vm_ip_range: ipnet::Ipv4Net,
    /// Give the region IPv6 public IPs from this range (e.g. fd00:203::/112); without it
    /// the region has none. The host needs a `local` route for it on `lo` (root).
    #[arg(long)]
    public_ipv6_range: Option<ipnet::Ipv6Net>,
    /// Give the seeded subnet this `ipv6_cidr` (e.g. fd00:10::/112), so its VMs get a
    /// `private_ipv6` and the cluster `ip_versions: [4, 6]`; without it: IPv4 only.
    #[arg(long)]
    vm_ipv6_range: Option<ipnet::Ipv6Net>,
    #[arg(long, default_value = "cl-sandbox")]
    cluster_id: String,
    #[arg(long, default_value = "sandbox")]
    cluster_name: String,
    /// Worker VMs to seed in the cluster (w1..wN).
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// How long a load balancer stays provisioning/updating/deleting.
    #[arg(long, default_value_t = 300)]
    provisioning_delay_ms: u64,
    /// Refuse UDP rules (422 "udp is not supported").
    #[arg(long)]
    no_udp: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Harmless if nothing uses TLS; an error only means a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Platform(args) => run_platform(args).await,
        Command::Kube(args) => run_kube(args).await,
    }
}

async fn run_kube(args: KubeArgs) -> anyhow::Result<()> {
    use kuberaya_sandbox::kube::{KubeApi, KubeApiConfig};
    let config = KubeApiConfig {
        service_cidrs: args.service_cidr,
        tls: !args.insecure_http,
        ..KubeApiConfig::new(&args.state_dir)
    };
    let api = KubeApi::open(config)
        .await
        .with_context(|| format!("cannot open kube state in {}", args.state_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr().context("cannot read listen address")?;
    let url = format!("{}://{addr}", if args.insecure_http { "http" } else { "https" });
    if let Some(path) = &args.kubeconfig {
        api.write_kubeconfig(path, &url, &args.context)
            .context("cannot write the kubeconfig")?;
    }
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {url}")?;
        stdout.flush()?;
    }
    tracing::info!(%addr, "kube API stand-in serving");
    kuberaya_sandbox::kube::serve(listener, api, shutdown_signal())
        .await
        .context("serving the kube API failed")?;
    tracing::info!("kube API stand-in stopped");
    Ok(())
}

async fn run_platform(args: PlatformArgs) -> anyhow::Result<()> {
    let config = PlatformConfig {
        state_dir: args.state_dir.clone(),
        email: args.email,
        password: args.password,
        region: args.region,
        public_ip_range: args.public_ip_range,
        vm_ip_range: args.vm_ip_range,
        public_ipv6_range: args.public_ipv6_range,
        vm_ipv6_range: args.vm_ipv6_range,
        provisioning_delay: Duration::from_millis(args.provisioning_delay_ms),
        udp_enabled: !args.no_udp,
        ..PlatformConfig::default()
    };
    let platform = PlatformStandIn::open(config)
        .await
        .with_context(|| format!("cannot open platform state in {}", args.state_dir.display()))?;
    platform
        .seed_cluster(&args.cluster_id, &args.cluster_name, args.workers)
        .await
        .context("cannot seed the cluster")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr().context("cannot read listen address")?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on http://{addr}")?;
        stdout.flush()?;
    }
    tracing::info!(%addr, "platform stand-in serving");
    let served = platform::serve(listener, platform.clone(), shutdown_signal()).await;
    platform.shutdown().await;
    served.context("serving the platform API failed")?;
    tracing::info!("platform stand-in stopped");
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

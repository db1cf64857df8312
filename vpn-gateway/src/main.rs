//! `kuberaya-gateway`: the KubeRaya WireGuard gateway. See the crate documentation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use ipnet::Ipv4Net;
use kuberaya_gateway::dataplane::DataPlane;
use kuberaya_gateway::dataplane::tun::{TunConfig, TunDataPlane};
use kuberaya_gateway::dataplane::userspace::{UserspaceConfig, UserspaceDataPlane};
use kuberaya_gateway::gateway::{Gateway, GatewayConfig};
use kuberaya_gateway::http::Health;
use kuberaya_gateway::keys::PrivateKey;
use kuberaya_gateway::metrics::Metrics;
use kuberaya_gateway::peers::TunnelConfig;
use kuberaya_gateway::source::{FileSource, GatewayReport, PeerSource, ServiceCatalog};
use kuberaya_gateway::uapi::UapiListener;
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(
    name = "kuberaya-gateway",
    version,
    about = "KubeRaya WireGuard gateway (userspace and unprivileged by default; --dataplane tun for kernel forwarding)"
)]
struct Args {
    /// UDP address WireGuard listens on.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "0.0.0.0:51820")]
    listen: SocketAddr,
    /// The tunnel range; the gateway takes its first address.
    #[arg(long, env = "GATEWAY_TUNNEL_CIDR", default_value = "100.64.0.0/16")]
    tunnel_cidr: Ipv4Net,
    #[arg(long, env = "GATEWAY_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Kubeconfig for the Kubernetes source (default: in-cluster or $KUBECONFIG).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The gateway's namespace: its peers may name any namespace; its key Secret lives here.
    #[arg(long, env = "GATEWAY_NAMESPACE", default_value = "kuberaya-system")]
    namespace: String,
    /// Read the private key (base64) from this file.
    #[arg(long, env = "GATEWAY_PRIVATE_KEY_FILE")]
    private_key_file: Option<PathBuf>,
    /// Read the private key from this Secret in --namespace (created on first start).
    #[arg(long, env = "GATEWAY_PRIVATE_KEY_SECRET", default_value = "kuberaya-gateway-key")]
    private_key_secret: String,
    /// Static peers (JSON) instead of VpnPeer resources.
    #[arg(long)]
    peers_file: Option<PathBuf>,
    /// Static Services (JSON) instead of the cluster's.
    #[arg(long)]
    services_file: Option<PathBuf>,
    #[arg(long, env = "GATEWAY_METRICS_BIND_ADDRESS", default_value = "0.0.0.0:9090")]
    metrics_bind_address: SocketAddr,
    #[arg(long, env = "GATEWAY_HEALTH_BIND_ADDRESS", default_value = "0.0.0.0:8081")]
    health_bind_address: SocketAddr,
    /// DNS server for names outside the cluster domain (REFUSED when absent).
    #[arg(long, env = "GATEWAY_DNS_UPSTREAM")]
    dns_upstream: Option<SocketAddr>,
    /// Handshakes per second before cookie replies are demanded.
    #[arg(long, default_value_t = kuberaya_gateway::tunnel::DEFAULT_HANDSHAKE_LIMIT)]
    handshake_limit: u64,
    /// Serve the standard WireGuard UAPI (read-only) on `<uapi-dir>/<NAME>.sock`, so that
    /// `wg show NAME` works against the gateway. Off when unset.
    #[arg(long, env = "GATEWAY_UAPI_INTERFACE", value_name = "NAME")]
    uapi_interface: Option<String>,
    /// The directory of the UAPI socket (`wg` looks in /var/run/wireguard).
    #[arg(long, env = "GATEWAY_UAPI_DIR", default_value = kuberaya_gateway::uapi::DEFAULT_DIR)]
    uapi_dir: PathBuf,
    /// Where allowed packets go: `userspace` (unprivileged, flows relayed over sockets) or
    /// `tun` (NET_ADMIN: a TUN device, kernel routing and an nftables masquerade table).
    #[arg(long, env = "GATEWAY_DATAPLANE", value_enum, default_value_t = DataPlaneKind::Userspace)]
    dataplane: DataPlaneKind,
    /// The TUN device's name (with --dataplane tun).
    #[arg(long, env = "GATEWAY_TUN_NAME", default_value = kuberaya_gateway::dataplane::tun::DEFAULT_NAME)]
    tun_name: String,
    /// Print a fresh key pair ("<private> <public>", base64) and exit.
    #[arg(long)]
    generate_keypair: bool,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DataPlaneKind {
    Userspace,
    Tun,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.generate_keypair {
        let k = PrivateKey::generate();
        println!("{} {}", k.to_base64(), k.public_key());
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let _ = rustls::crypto::ring::default_provider().install_default();

    let tunnel = TunnelConfig {
        range: args.tunnel_cidr,
        gateway_namespace: args.namespace.clone(),
    };
    if tunnel.range.prefix_len() > 30 {
        bail!("--tunnel-cidr {} leaves no room for peers", tunnel.range);
    }
    let static_mode = args.peers_file.is_some() || args.services_file.is_some();
    let (report_tx, report_rx) = watch::channel(GatewayReport::default());

    let key;
    let peers_rx;
    let services_rx;
    // Keeps the sources alive.
    let _file_source;
    if static_mode {
        key = match &args.private_key_file {
            Some(p) => read_key(p)?,
            None => bail!("--private-key-file is required with --peers-file/--services-file"),
        };
        let src = FileSource::start(
            args.peers_file.clone(),
            args.services_file.clone(),
            Duration::from_millis(500),
        )?;
        peers_rx = src.peers();
        services_rx = src.services();
        _file_source = Some(src);
        drop(report_rx);
    } else {
        let client = kuberaya_gateway::source::kube::client(args.kubeconfig.as_deref()).await?;
        key = match &args.private_key_file {
            Some(p) => read_key(p)?,
            None => {
                kuberaya_gateway::source::kube::load_or_create_key(&client, &args.namespace, &args.private_key_secret)
                    .await
                    .context("private key Secret")?
            }
        };
        let src = kuberaya_gateway::source::kube::KubeSource::start(client.clone());
        peers_rx = src.peers();
        services_rx = src.services();
        tokio::spawn(kuberaya_gateway::source::kube::write_status(
            client,
            report_rx,
            kuberaya_gateway::source::kube::STATUS_INTERVAL,
        ));
        _file_source = None;
    }

    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let (m_addr, h_addr) = kuberaya_gateway::http::serve(
        args.metrics_bind_address,
        args.health_bind_address,
        metrics.clone(),
        health.clone(),
    )
    .await
    .context("binding the metrics/health addresses")?;
    let socket = tokio::net::UdpSocket::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let bound = socket.local_addr()?;
    let local = UserspaceConfig {
        gateway: tunnel.gateway_address(),
        cluster_domain: args.cluster_domain.clone(),
        dns_upstream: args.dns_upstream,
    };
    let dp: Box<dyn DataPlane> = match args.dataplane {
        DataPlaneKind::Userspace => Box::new(UserspaceDataPlane::new(local)),
        DataPlaneKind::Tun => Box::new(
            TunDataPlane::start(TunConfig {
                name: args.tun_name.clone(),
                range: tunnel.range,
                local,
            })
            .await
            .context("the TUN data plane")?,
        ),
    };
    let public = key.public_key();
    let mut gw = Gateway::new(
        GatewayConfig {
            tunnel: tunnel.clone(),
            handshake_limit: args.handshake_limit,
        },
        key,
        dp,
        metrics,
    );
    // The task (and with it the socket file) goes away when the runtime stops.
    let uapi = match &args.uapi_interface {
        Some(name) => {
            let listener = UapiListener::bind(&args.uapi_dir, name).context("the UAPI socket")?;
            let path = listener.path().display().to_string();
            tokio::spawn(listener.serve(gw.uapi_requests()));
            format!(" uapi={path}")
        }
        None => String::new(),
    };
    // One line for scripts and tests.
    println!(
        "kuberaya-gateway listening udp={bound} public_key={public} tunnel_address={} metrics={m_addr} health={h_addr}{uapi}",
        tunnel.gateway_address()
    );
    tracing::info!(udp = %bound, public_key = %public, "gateway started");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
    };
    gw.run(socket, peers_rx, services_rx, report_tx, health, shutdown)
        .await?;
    tracing::info!("gateway stopped");
    Ok(())
}

fn read_key(path: &std::path::Path) -> anyhow::Result<PrivateKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    PrivateKey::parse(&text).with_context(|| format!("{} does not hold a base64 WireGuard key", path.display()))
}

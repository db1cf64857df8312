//! `kuberaya-gateway`: the KubeRaya WireGuard gateway. See the crate documentation.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ipnet::{Ipv4Net, Ipv6Net};
use kuberaya_gateway::keys::PrivateKey;
use kuberaya_gateway::run::{DataPlaneChoice, KeySource, RunConfig, Sources, UapiConfig};
use kuberaya_gateway::secure_http::{CertFiles, SecureServing};

#[derive(Parser, Debug)]
#[command(
    name = "kuberaya-gateway",
    version,
    about = "KubeRaya WireGuard gateway (userspace and unprivileged by default; --dataplane tun for kernel forwarding)"
)]
struct Args {
    /// UDP address WireGuard listens on; repeat (or separate with commas) for one socket
    /// per address. Default: one dual-stack socket on [::]:51820 (IPv4 peers too), or
    /// 0.0.0.0:51820 when the host has no IPv6.
    #[arg(long, env = "GATEWAY_LISTEN", value_delimiter = ',', value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// The tunnel range; the gateway takes its first address.
    #[arg(long, env = "GATEWAY_TUNNEL_CIDR", default_value = "100.64.0.0/16")]
    tunnel_cidr: Ipv4Net,
    /// The IPv6 tunnel range (a ULA); the gateway takes `::1`, a peer by default the prefix
    /// plus its IPv4 address's offset in --tunnel-cidr. Must hold every such offset.
    #[arg(long, env = "GATEWAY_TUNNEL_RANGE_V6", default_value = kuberaya_gateway::peers::DEFAULT_TUNNEL_RANGE_V6)]
    tunnel_range_v6: Ipv6Net,
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
    #[arg(long, env = "GATEWAY_PRIVATE_KEY_SECRET", default_value = kuberaya_gateway::run::DEFAULT_KEY_SECRET)]
    private_key_secret: String,
    /// Annotate this Service in --namespace with the gateway's public key, tunnel address
    /// and cluster domain on start (what `kuberaya peer add` reads); "" to leave it alone.
    #[arg(long, env = "GATEWAY_SERVICE", value_name = "NAME", default_value = kuberaya_gateway::publish::DEFAULT_SERVICE)]
    publish_key_to_service: String,
    /// Static peers (JSON) instead of VpnPeer resources.
    #[arg(long)]
    peers_file: Option<PathBuf>,
    /// Static Services (JSON) instead of the cluster's.
    #[arg(long)]
    services_file: Option<PathBuf>,
    /// Static access policies (JSON) with --peers-file, instead of VpnAccessPolicy
    /// resources.
    #[arg(long)]
    policies_file: Option<PathBuf>,
    /// Plain-HTTP, unauthenticated `/metrics` (they name peers: loopback by default).
    #[arg(long, env = "GATEWAY_METRICS_BIND_ADDRESS", default_value = "127.0.0.1:9090")]
    metrics_bind_address: SocketAddr,
    #[arg(long, env = "GATEWAY_HEALTH_BIND_ADDRESS", default_value = "0.0.0.0:8081")]
    health_bind_address: SocketAddr,
    /// Serve HTTPS here: `/metrics` for bearer tokens the API server authenticates
    /// (TokenReview) and authorizes (SubjectAccessReview: `get` on the non-resource URL
    /// `/metrics`), `/healthz` and `/readyz` for anyone. Off when unset; needs the
    /// Kubernetes sources.
    #[arg(long, env = "GATEWAY_SECURE_BIND_ADDRESS")]
    secure_bind_address: Option<SocketAddr>,
    /// The HTTPS server's certificate (PEM, read at start); without it and
    /// --tls-private-key-file, a self-signed one is made at start.
    #[arg(long, env = "GATEWAY_TLS_CERT_FILE", requires = "tls_private_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// The key of --tls-cert-file (PEM).
    #[arg(long, env = "GATEWAY_TLS_PRIVATE_KEY_FILE", requires = "tls_cert_file")]
    tls_private_key_file: Option<PathBuf>,
    /// DNS server for names outside the cluster domain (REFUSED when absent).
    #[arg(long, env = "GATEWAY_DNS_UPSTREAM")]
    dns_upstream: Option<SocketAddr>,
    /// Handshakes per second before cookie replies are demanded. They are demanded too,
    /// whatever this says, while handshakes take over half of the gateway's time.
    #[arg(long, default_value_t = kuberaya_gateway::tunnel::DEFAULT_HANDSHAKE_LIMIT)]
    handshake_limit: u64,
    /// The Lease (in the gateway's namespace) that elects the one replica that writes
    /// VpnPeer and VpnAccessPolicy status and the Service's annotations; the others serve
    /// the peers its status grants. Kubernetes sources only.
    #[arg(long, env = "GATEWAY_LEASE", default_value = kuberaya_gateway::leader::DEFAULT_LEASE_NAME)]
    lease: String,
    /// On SIGTERM, report not ready (/readyz) and keep serving this long before exiting, so
    /// that the load balancer moves this replica's clients to another first (deploy/ sets
    /// 5s: the LB's health check every 2 s, plus the endpoint update).
    #[arg(long, default_value = "0s", value_parser = parse_drain, value_name = "DURATION")]
    shutdown_drain: std::time::Duration,
    /// Start a handshake at once toward a peer whose data this replica has no session for
    /// (one made with another replica, or before a restart), instead of waiting about
    /// 15 s for the client's own timers. `false` only to measure the difference.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    session_recovery: bool,
    /// UDP segmentation offloads on the outer sockets where the kernel has them: a train
    /// of datagrams to one peer leaves in one system call (GSO) and one from a peer
    /// arrives in one (GRO). `false` only to measure the difference or to work around a
    /// driver that mishandles them.
    #[arg(long, env = "GATEWAY_UDP_OFFLOAD", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    udp_offload: bool,
    /// Threads that decrypt data, the gateway loop's included: what arrives from several
    /// peers at once is spread over them by peer (one peer's packets stay on one thread,
    /// in order). 1 (the loop alone) unless the machine has cores to spare: on 2 cores
    /// shared with other work a second thread cost ~20 % (docs/benchmarks.md). 0: one per
    /// core, at most 4.
    #[arg(long, env = "GATEWAY_DECRYPT_THREADS", default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u16).range(0..=64))]
    decrypt_threads: u16,
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

/// `5s`, `500ms`, `1m 30s` (jiff's friendly format), not negative.
fn parse_drain(s: &str) -> Result<std::time::Duration, String> {
    let d: k8s_openapi::jiff::SignedDuration = s.trim().parse().map_err(|e| format!("invalid duration {s:?}: {e}"))?;
    std::time::Duration::try_from(d).map_err(|_| format!("a negative duration: {s:?}"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.generate_keypair {
        let k = PrivateKey::generate();
        println!("{} {}", k.to_base64(), k.public_key());
        return Ok(());
    }
    let (runtime, on_worker) = match args.dataplane {
        // TUN mode: the kernel does the forwarding and the loop is one task, so one thread
        // that both waits in `epoll_wait` and runs the loop: a datagram or a reply is handled
        // by the thread the kernel wakes, with no hand-off to a worker.
        DataPlaneKind::Tun => (
            tokio::runtime::Builder::new_current_thread().enable_all().build()?,
            false,
        ),
        // Userspace mode relays flows in tasks of their own: those use the other core.
        DataPlaneKind::Userspace => (tokio::runtime::Builder::new_multi_thread().enable_all().build()?, true),
    };
    runtime.block_on(serve(args, on_worker))
}

async fn serve(args: Args, on_worker: bool) -> anyhow::Result<()> {
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

    let static_mode = args.peers_file.is_some() || args.services_file.is_some() || args.policies_file.is_some();
    if static_mode && args.private_key_file.is_none() {
        anyhow::bail!("--private-key-file is required with --peers-file/--services-file/--policies-file");
    }
    let cfg = RunConfig {
        listen: args.listen,
        tunnel_cidr: args.tunnel_cidr,
        tunnel_cidr_v6: args.tunnel_range_v6,
        cluster_domain: args.cluster_domain,
        namespace: args.namespace,
        sources: if static_mode {
            Sources::Files {
                peers: args.peers_file,
                services: args.services_file,
                policies: args.policies_file,
            }
        } else {
            Sources::Kube {
                kubeconfig: args.kubeconfig,
                client: None,
            }
        },
        private_key: match args.private_key_file {
            Some(p) => KeySource::File(p),
            None => KeySource::Secret(args.private_key_secret),
        },
        metrics_bind_address: args.metrics_bind_address,
        health_bind_address: args.health_bind_address,
        secure: args.secure_bind_address.map(|bind_address| SecureServing {
            cert: args
                .tls_cert_file
                .clone()
                .zip(args.tls_private_key_file.clone())
                .map(|(cert, key)| CertFiles { cert, key }),
            ..SecureServing::new(bind_address)
        }),
        dns_upstream: args.dns_upstream,
        handshake_limit: args.handshake_limit,
        session_recovery: args.session_recovery,
        udp_offload: args.udp_offload,
        decrypt_threads: args.decrypt_threads.into(),
        lease: args.lease,
        shutdown_drain: args.shutdown_drain,
        identity: kuberaya_gateway::leader::default_identity(),
        uapi: args.uapi_interface.map(|interface| UapiConfig {
            dir: args.uapi_dir,
            interface,
        }),
        dataplane: match args.dataplane {
            DataPlaneKind::Userspace => DataPlaneChoice::Userspace,
            DataPlaneKind::Tun => DataPlaneChoice::Tun { name: args.tun_name },
        },
        publish_service: Some(args.publish_key_to_service).filter(|s| !s.is_empty()),
    };
    let gw = kuberaya_gateway::run::start(cfg)
        .await
        .context("starting the gateway")?;
    // One line for scripts and tests.
    println!("{}", gw.info());
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
    };
    if on_worker {
        // On a worker thread of the runtime, not on `main`'s: the worker that takes a socket
        // or TUN event then runs the loop itself, instead of waking the main thread for each
        // one (a futex wake-up per event).
        tokio::spawn(gw.run(shutdown)).await.context("the gateway loop")??;
    } else {
        gw.run(shutdown).await?;
    }
    Ok(())
}

//! The whole gateway in-process: [`start`] loads the key, starts the sources and binds
//! every socket; [`Started::run`] serves until a shutdown future resolves. The binary is
//! a thin wrapper over these, and `kuberaya sandbox up` can run the gateway the same way.
//!
//! ```no_run
//! # async fn example() -> kuberaya_gateway::Result<()> {
//! use kuberaya_gateway::run::{RunConfig, Sources, start};
//! let cfg = RunConfig {
//!     sources: Sources::Kube { kubeconfig: Some("/tmp/sb/kubeconfig".into()), client: None },
//!     listen: vec!["127.0.0.1:0".parse().unwrap()],
//!     ..RunConfig::default()
//! };
//! let gw = start(cfg).await?;
//! println!("{}", gw.info());
//! gw.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::dataplane::DataPlane;
use crate::dataplane::tun::{TunConfig, TunDataPlane};
use crate::dataplane::userspace::{UserspaceConfig, UserspaceDataPlane};
use crate::gateway::{Gateway, GatewayConfig};
use crate::http::{AbortOnDrop, Health, Serving};
use crate::keys::{PrivateKey, PublicKey};
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::peers::TunnelConfig;
use crate::secure_http::SecureServing;
use crate::source::kube::KubeSource;
use crate::source::{
    FileSource, GatewayReport, PeerSnapshot, PeerSource, PolicySnapshot, PolicySource, ServiceCatalog, ServiceSnapshot,
};
use crate::transport::Bound;
use crate::uapi::UapiListener;

/// The default name of the Secret holding the gateway's private key.
pub const DEFAULT_KEY_SECRET: &str = "kuberaya-gateway-key";
/// How often the static files are checked (metadata; read only when changed).
const FILE_RELOAD: Duration = Duration::from_millis(100);

/// Where peers and Services come from.
#[derive(Clone)]
pub enum Sources {
    /// `VpnPeer`s and Services of a cluster: `client` when given, else one from
    /// `kubeconfig` (else in-cluster or `$KUBECONFIG`).
    Kube {
        kubeconfig: Option<PathBuf>,
        client: Option<kube::Client>,
    },
    /// Static JSON files (see [`crate::source`]); a missing path means none.
    Files {
        peers: Option<PathBuf>,
        services: Option<PathBuf>,
        policies: Option<PathBuf>,
    },
}

/// Where the gateway's private key comes from.
#[derive(Clone, Debug)]
pub enum KeySource {
    /// A file holding the base64 key.
    File(PathBuf),
    /// A Secret in the gateway's namespace, generated on first start (Kubernetes sources only).
    Secret(String),
}

/// Where allowed packets go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DataPlaneChoice {
    /// Unprivileged: flows terminated in userspace and relayed over sockets.
    #[default]
    Userspace,
    /// NET_ADMIN: a TUN device of this name, kernel routing and an nftables table.
    Tun { name: String },
}

/// The standard WireGuard UAPI socket `<dir>/<interface>.sock`.
#[derive(Clone, Debug)]
pub struct UapiConfig {
    pub dir: PathBuf,
    pub interface: String,
}

/// Everything the gateway is configured with (the binary's flags).
#[derive(Clone)]
pub struct RunConfig {
    /// UDP addresses WireGuard listens on, one socket each; none: the default, one
    /// dual-stack `[::]:51820` socket, else `0.0.0.0:51820` ([`crate::transport`]).
    pub listen: Vec<SocketAddr>,
    /// The tunnel range; the gateway takes its first address.
    pub tunnel_cidr: Ipv4Net,
    /// The IPv6 tunnel range; the gateway takes `::1` in it, a peer by default the IPv4
    /// address's offset ([`crate::peers`]).
    pub tunnel_cidr_v6: Ipv6Net,
    pub cluster_domain: String,
    /// The gateway's namespace: its peers may name any namespace; its key Secret lives here.
    pub namespace: String,
    pub sources: Sources,
    pub private_key: KeySource,
    /// Plain-HTTP, unauthenticated `/metrics` (loopback by default: they name peers).
    pub metrics_bind_address: SocketAddr,
    pub health_bind_address: SocketAddr,
    /// `/metrics`, `/healthz` and `/readyz` over HTTPS, `/metrics` behind TokenReview and
    /// SubjectAccessReview (Kubernetes sources only; `None`: not served).
    pub secure: Option<SecureServing>,
    /// DNS server for names outside the cluster domain (REFUSED when absent).
    pub dns_upstream: Option<SocketAddr>,
    /// Handshakes per second before cookie replies are demanded.
    pub handshake_limit: u64,
    /// Session recovery (see [`crate::tunnel`]); on unless measuring without it.
    pub session_recovery: bool,
    /// UDP GSO/GRO on the outer sockets where the kernel has them (`udp_batch.rs`).
    pub udp_offload: bool,
    /// Threads that decrypt data, the loop's included (1: the loop alone, the default; 0: one
    /// per core, at most [`crate::gateway::MAX_DECRYPT_THREADS`]).
    pub decrypt_threads: usize,
    pub uapi: Option<UapiConfig>,
    pub dataplane: DataPlaneChoice,
    /// The gateway's Service in its namespace, annotated with its public key, tunnel
    /// address and cluster domain on start ([`crate::publish`]; Kubernetes sources only).
    pub publish_service: Option<String>,
    /// The Lease in the gateway's namespace that elects the one replica that writes status
    /// and annotations ([`crate::leader`]; Kubernetes sources only), and this replica's
    /// identity in it.
    pub lease: String,
    pub identity: String,
    /// On shutdown, report not ready and keep serving this long before stopping: the LB's
    /// health check moves this replica's clients to another one meanwhile, whose session
    /// recovery takes them over, so a rolling restart drops nothing (0: stop at once).
    pub shutdown_drain: Duration,
}

impl Default for RunConfig {
    /// The binary's defaults: Kubernetes sources, the key in a Secret.
    fn default() -> Self {
        RunConfig {
            listen: Vec::new(),
            tunnel_cidr: Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 16).expect("a valid prefix"),
            tunnel_cidr_v6: TunnelConfig::default_range_v6(),
            cluster_domain: "cluster.local".to_string(),
            namespace: "kuberaya-system".to_string(),
            sources: Sources::Kube {
                kubeconfig: None,
                client: None,
            },
            private_key: KeySource::Secret(DEFAULT_KEY_SECRET.to_string()),
            metrics_bind_address: SocketAddr::from(([127, 0, 0, 1], 9090)),
            health_bind_address: SocketAddr::from(([0, 0, 0, 0], 8081)),
            secure: None,
            dns_upstream: None,
            handshake_limit: crate::tunnel::DEFAULT_HANDSHAKE_LIMIT,
            session_recovery: true,
            udp_offload: true,
            decrypt_threads: 1,
            uapi: None,
            dataplane: DataPlaneChoice::Userspace,
            publish_service: Some(crate::publish::DEFAULT_SERVICE.to_string()),
            lease: crate::leader::DEFAULT_LEASE_NAME.to_string(),
            identity: crate::leader::default_identity(),
            shutdown_drain: Duration::ZERO,
        }
    }
}

/// What a started gateway is bound to.
#[derive(Clone, Debug)]
pub struct StartedInfo {
    /// The first UDP socket's address.
    pub udp: SocketAddr,
    /// Every UDP socket's address (the first is `udp`).
    pub udp_all: Vec<SocketAddr>,
    pub public_key: PublicKey,
    pub tunnel_address: Ipv4Addr,
    pub metrics: SocketAddr,
    pub health: SocketAddr,
    /// The HTTPS server, if served.
    pub secure: Option<SocketAddr>,
    pub uapi: Option<PathBuf>,
}

impl std::fmt::Display for StartedInfo {
    /// The binary's one line for scripts and tests.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kuberaya-gateway listening udp={} public_key={} tunnel_address={} metrics={} health={}",
            self.udp, self.public_key, self.tunnel_address, self.metrics, self.health
        )?;
        if self.udp_all.len() > 1 {
            let more: Vec<String> = self.udp_all[1..].iter().map(|a| a.to_string()).collect();
            write!(f, " udp_also={}", more.join(","))?;
        }
        if let Some(a) = &self.secure {
            write!(f, " secure={a}")?;
        }
        if let Some(p) = &self.uapi {
            write!(f, " uapi={}", p.display())?;
        }
        Ok(())
    }
}

/// A gateway whose sockets are bound and whose sources run; [`Started::run`] serves.
/// Dropping it stops everything it started.
pub struct Started {
    info: StartedInfo,
    gateway: Gateway,
    sockets: Vec<(UdpSocket, Bound)>,
    peers: watch::Receiver<PeerSnapshot>,
    services: watch::Receiver<ServiceSnapshot>,
    policies: watch::Receiver<PolicySnapshot>,
    report: watch::Sender<GatewayReport>,
    health: Arc<Health>,
    tasks: Tasks,
    _http: Serving,
    _secure: Option<AbortOnDrop>,
    _kube: Option<Arc<KubeSource>>,
    _files: Option<FileSource>,
    /// The election (Kubernetes sources), given up when the gateway stops.
    leadership: Option<Leadership>,
    shutdown_drain: Duration,
}

/// Tasks aborted when the gateway stops.
#[derive(Default)]
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn net_error(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> crate::Error {
    let what = what.to_string();
    move |source| crate::Error::Net { what, source }
}

fn read_key(path: &std::path::Path) -> crate::Result<PrivateKey> {
    // The file's text is the key too: wiped once parsed.
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| crate::Error::Io {
        path: path.display().to_string(),
        source,
    })?);
    PrivateKey::parse(&text)
        .map_err(|e| crate::Error::Config(format!("{} does not hold a base64 WireGuard key: {e}", path.display())))
}

/// Load the key, start the sources and bind every socket (inside a tokio runtime).
pub async fn start(cfg: RunConfig) -> crate::Result<Started> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tunnel = TunnelConfig {
        range: cfg.tunnel_cidr,
        range_v6: cfg.tunnel_cidr_v6,
        gateway_namespace: cfg.namespace.clone(),
    };
    tunnel.check().map_err(crate::Error::Config)?;
    if tunnel.range.prefix_len() > 30 {
        return Err(crate::Error::Config(format!(
            "tunnel range {} leaves no room for peers",
            tunnel.range
        )));
    }
    let (report_tx, report_rx) = watch::channel(GatewayReport::default());
    let mut tasks = Tasks::default();
    let (key, peers, services, policies, kube_source, files, client, leadership) = match &cfg.sources {
        Sources::Files {
            peers,
            services,
            policies,
        } => {
            let key = match &cfg.private_key {
                KeySource::File(p) => read_key(p)?,
                KeySource::Secret(_) => {
                    return Err(crate::Error::Config(
                        "a private key file is required with static peers/services files".to_string(),
                    ));
                }
            };
            let src = FileSource::start(peers.clone(), services.clone(), FILE_RELOAD)?
                .with_policies(policies.clone(), FILE_RELOAD)?;
            (
                key,
                src.peers(),
                src.services(),
                src.policies(),
                None,
                Some(src),
                None,
                None,
            )
        }
        Sources::Kube { kubeconfig, client } => {
            let client = match client {
                Some(c) => c.clone(),
                None => crate::source::kube::client(kubeconfig.as_deref()).await?,
            };
            let key = match &cfg.private_key {
                KeySource::File(p) => read_key(p)?,
                KeySource::Secret(name) => {
                    crate::source::kube::load_or_create_key(&client, &cfg.namespace, name).await?
                }
            };
            let leadership = Leadership::elect(client.clone(), &cfg.namespace, &cfg.lease, &cfg.identity).await?;
            if let Some(service) = cfg.publish_service.clone().filter(|s| !s.is_empty()) {
                let facts = crate::publish::Facts {
                    public_key: key.public_key(),
                    tunnel_address: format!("{}/{}", tunnel.gateway_address(), tunnel.range.prefix_len()),
                    tunnel_address_v6: Some(format!(
                        "{}/{}",
                        tunnel.gateway_address_v6(),
                        tunnel.range_v6.prefix_len()
                    )),
                    cluster_domain: cfg.cluster_domain.clone(),
                };
                tasks.0.push(tokio::spawn(crate::publish::publish(
                    client.clone(),
                    cfg.namespace.clone(),
                    service,
                    facts,
                    leadership.leading.clone(),
                )));
            }
            let src = KubeSource::start(client.clone());
            tasks.0.push(tokio::spawn(crate::source::kube::write_status(
                client.clone(),
                report_rx,
                crate::source::kube::STATUS_INTERVAL,
                leadership.leading.clone(),
            )));
            (
                key,
                src.peers(),
                src.services(),
                src.policies(),
                Some(src),
                None,
                Some(client),
                Some(leadership),
            )
        }
    };

    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let http = crate::http::serve(
        cfg.metrics_bind_address,
        cfg.health_bind_address,
        metrics.clone(),
        health.clone(),
    )
    .await
    .map_err(net_error(format_args!(
        "binding the metrics/health addresses {}/{}",
        cfg.metrics_bind_address, cfg.health_bind_address
    )))?;
    let secure = match (&cfg.secure, client) {
        (None, _) => None,
        (Some(secure), Some(client)) => {
            Some(crate::http::serve_secure(secure, client, metrics.clone(), health.clone()).await?)
        }
        (Some(_), None) => {
            return Err(crate::Error::Config(
                "the secure metrics server asks the API server who a scraper is: it needs the Kubernetes sources"
                    .to_string(),
            ));
        }
    };
    let sockets = crate::transport::bind_all(&cfg.listen, crate::transport::bind)
        .map_err(|(a, e)| net_error(format_args!("binding {a}"))(e))?;
    let udp_all: Vec<SocketAddr> = sockets.iter().map(|(_, b)| b.local).collect();
    let udp = udp_all[0];
    let local = UserspaceConfig {
        gateway: tunnel.gateway_address(),
        gateway_v6: tunnel.gateway_address_v6(),
        cluster_domain: cfg.cluster_domain.clone(),
        dns_upstream: cfg.dns_upstream,
    };
    let dp: Box<dyn DataPlane> = match &cfg.dataplane {
        DataPlaneChoice::Userspace => Box::new(UserspaceDataPlane::new(local)),
        DataPlaneChoice::Tun { name } => Box::new(
            TunDataPlane::start(TunConfig {
                name: name.clone(),
                range: tunnel.range,
                range_v6: Some(tunnel.range_v6),
                local,
            })
            .await
            .map_err(|e| crate::Error::Config(format!("the TUN data plane: {e}")))?,
        ),
    };
    let public_key = key.public_key();
    let mut gateway = Gateway::new(
        GatewayConfig {
            tunnel: tunnel.clone(),
            handshake_limit: cfg.handshake_limit,
            session_recovery: cfg.session_recovery,
            udp_offload: cfg.udp_offload,
            decrypt_threads: crate::gateway::decrypt_threads(cfg.decrypt_threads),
        },
        key,
        dp,
        metrics,
    );
    if let Some(l) = &leadership {
        gateway = gateway.follow(l.leading.clone());
    }
    let uapi = match &cfg.uapi {
        Some(u) => {
            let listener = UapiListener::bind(&u.dir, &u.interface)
                .map_err(|e| crate::Error::Config(format!("the UAPI socket: {e}")))?;
            let path = listener.path().to_path_buf();
            tasks.0.push(tokio::spawn(listener.serve(gateway.uapi_requests())));
            Some(path)
        }
        None => None,
    };
    Ok(Started {
        info: StartedInfo {
            udp,
            udp_all,
            public_key,
            tunnel_address: tunnel.gateway_address(),
            metrics: http.metrics,
            health: http.health,
            secure: secure.as_ref().map(|(a, _)| *a),
            uapi,
        },
        gateway,
        sockets,
        peers,
        services,
        policies,
        report: report_tx,
        health,
        tasks,
        _http: http,
        _secure: secure.map(|(_, t)| t),
        _kube: kube_source,
        _files: files,
        leadership,
        shutdown_drain: cfg.shutdown_drain,
    })
}

impl Started {
    pub fn info(&self) -> &StartedInfo {
        &self.info
    }

    /// Serve until `shutdown` resolves; then stop everything [`start`] started.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> crate::Result<()> {
        let Started {
            info,
            gateway,
            sockets,
            peers,
            services,
            policies,
            report,
            health,
            tasks,
            leadership,
            shutdown_drain,
            ..
        } = self;
        tracing::info!(udp = %info.udp, public_key = %info.public_key, "gateway started");
        let draining = health.clone();
        let shutdown = async move {
            shutdown.await;
            if !shutdown_drain.is_zero() {
                draining.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(drain = ?shutdown_drain, "stopping: not ready, still serving while clients move");
                tokio::time::sleep(shutdown_drain).await;
            }
        };
        let r = gateway
            .run(sockets, peers, services, policies, report, health, shutdown)
            .await
            .map_err(net_error(format_args!("the UDP socket {}", info.udp)));
        drop(tasks);
        // Give the Lease up, so that another replica writes at once.
        if let Some(l) = leadership {
            l.release(Duration::from_secs(3)).await;
        }
        tracing::info!("gateway stopped");
        r
    }
}

/// [`start`] then [`Started::run`]: the gateway until `shutdown` resolves.
pub async fn run(cfg: RunConfig, shutdown: impl Future<Output = ()>) -> crate::Result<()> {
    start(cfg).await?.run(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[tokio::test]
    async fn runs_in_process_and_stops_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let key = PrivateKey::generate();
        let cfg = RunConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            sources: Sources::Files {
                peers: Some(write(dir.path(), "peers.json", "[]")),
                services: Some(write(dir.path(), "services.json", "[]")),
                policies: Some(write(dir.path(), "policies.json", "[]")),
            },
            private_key: KeySource::File(write(dir.path(), "gw.key", &key.to_base64())),
            metrics_bind_address: "127.0.0.1:0".parse().unwrap(),
            health_bind_address: "127.0.0.1:0".parse().unwrap(),
            ..RunConfig::default()
        };
        let gw = start(cfg).await.unwrap();
        let info = gw.info().clone();
        assert_eq!(info.public_key, key.public_key());
        assert_eq!(info.tunnel_address, Ipv4Addr::new(100, 64, 0, 1));
        assert_ne!(info.udp.port(), 0);
        let line = info.to_string();
        assert!(line.starts_with("kuberaya-gateway listening udp=127.0.0.1:"), "{line}");
        // Serving: the health endpoint answers.
        tokio::net::TcpStream::connect(info.health).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(gw.run(async {
            let _ = stopped.await;
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops on shutdown")
            .unwrap()
            .unwrap();
        // Its sockets are released.
        UdpSocket::bind(info.udp).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(tokio::net::TcpStream::connect(info.health).await.is_err());
    }

    #[tokio::test]
    async fn static_files_need_a_key_file_and_ranges_need_room() {
        let cfg = RunConfig {
            sources: Sources::Files {
                peers: None,
                services: None,
                policies: None,
            },
            ..RunConfig::default()
        };
        let e = start(cfg).await.err().unwrap();
        assert!(e.to_string().contains("private key file"), "{e}");
        let cfg = RunConfig {
            tunnel_cidr: "100.64.0.0/31".parse().unwrap(),
            ..RunConfig::default()
        };
        let e = start(cfg).await.err().unwrap();
        assert!(e.to_string().contains("no room"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let cfg = RunConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            sources: Sources::Files {
                peers: None,
                services: None,
                policies: None,
            },
            private_key: KeySource::File(write(dir.path(), "gw.key", &PrivateKey::generate().to_base64())),
            metrics_bind_address: "127.0.0.1:0".parse().unwrap(),
            health_bind_address: "127.0.0.1:0".parse().unwrap(),
            secure: Some(SecureServing::new("127.0.0.1:0".parse().unwrap())),
            ..RunConfig::default()
        };
        let e = start(cfg).await.err().unwrap();
        assert!(e.to_string().contains("needs the Kubernetes sources"), "{e}");
    }
}

//! The whole CCM in-process: [`start`] checks the platform and the API server and binds
//! `/metrics`, `/healthz` and `/readyz` (plain, and over HTTPS with delegated
//! authentication: [`crate::secure_http`]); [`Started::run`] takes part in the leader
//! election and runs every controller while it leads, until a shutdown future resolves.
//! `kuberaya-ccm` is a thin wrapper over these (flags in, [`RunConfig`] out), and
//! `kuberaya sandbox up` runs its CCM the same way.
//!
//! ```no_run
//! # async fn example(cloud: kuberaya_ccm::config::CloudConfig) -> Result<(), kuberaya_ccm::run::Error> {
//! use kuberaya_ccm::run::{KubeAccess, LeaderElection, RunConfig, start};
//! let cfg = RunConfig {
//!     kube: KubeAccess::Kubeconfig("/tmp/sb/kubeconfig".into()),
//!     leader_election: Some(LeaderElection::new("replica-1")),
//!     ..RunConfig::new(cloud)
//! };
//! let ccm = start(cfg).await?;
//! ccm.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod election;
pub mod http;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::config::CloudConfig;
use crate::metrics::Metrics;
use crate::platform::{HttpPlatform, Platform};
use crate::secure_http::SecureServing;
use crate::service::controller::{RunSettings, Timing};
use crate::service::desired::DesiredConfig;
use crate::{ControllerSettings, NodeSettings};

pub use election::{DEFAULT_LEASE_NAME, DEFAULT_LEASE_NAMESPACE, LeaderElection, OnLeadershipLost};
pub use http::{BindError, Health};

/// Errors of starting and running the CCM. Each says what it was doing; the cause is
/// the `#[source]`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building the platform client")]
    PlatformClient(#[source] crate::platform::Error),
    #[error("looking up platform cluster {cluster_id}")]
    Cluster {
        cluster_id: String,
        #[source]
        source: crate::platform::Error,
    },
    #[error("cloud config {what} {configured:?} does not match platform cluster {cluster} ({actual:?})")]
    ClusterMismatch {
        what: &'static str,
        configured: String,
        cluster: String,
        actual: String,
    },
    #[error("{what} kubeconfig {}", path.display())]
    Kubeconfig {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("inferring the Kubernetes config")]
    InferConfig(#[source] kube::config::InferConfigError),
    #[error("{what}")]
    Kube {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Secure(#[from] crate::secure_http::Error),
    #[error("setting up leader election")]
    LeaderElection(#[source] kube_lease_manager::LeaseManagerError),
    #[error("leader election stopped")]
    ElectionStopped,
    /// Another replica took the Lease over (with [`OnLeadershipLost::Stop`]): the
    /// controllers are stopped; the caller should exit.
    #[error("leadership lost")]
    LeadershipLost,
    #[error("the controllers panicked: {0}")]
    ControllersPanicked(String),
    /// A controller failed.
    #[error(transparent)]
    Controllers(#[from] crate::Error),
}

/// Where the Kubernetes client comes from.
#[derive(Clone)]
pub enum KubeAccess {
    /// In-cluster config, else `$KUBECONFIG` / `~/.kube/config`.
    Infer,
    /// This kubeconfig file.
    Kubeconfig(PathBuf),
    /// A ready client.
    Client(kube::Client),
}

/// How often and how widely the controllers work: the binary's flags of the same names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Periods {
    /// `--resync-period`: resync of an in-sync Service (drift repair).
    pub resync: Duration,
    /// `--poll-period`: longest wait between two looks at a changing load balancer.
    pub poll: Duration,
    /// `--orphan-sweep-period`.
    pub orphan_sweep: Duration,
    /// `--node-sync-debounce`: quiet period batching node changes (a batch waits five
    /// times this at most).
    pub node_debounce: Duration,
    /// `--node-status-update-frequency`.
    pub node_refresh: Duration,
    /// `--node-monitor-period`.
    pub node_monitor: Duration,
    /// `--concurrent-service-syncs`.
    pub service_syncs: u16,
    /// `--concurrent-node-syncs`.
    pub node_syncs: u16,
}

impl Default for Periods {
    /// The binary's defaults.
    fn default() -> Self {
        Periods {
            resync: Duration::from_secs(300),
            poll: Duration::from_secs(2),
            orphan_sweep: Duration::from_secs(300),
            node_debounce: Duration::from_secs(1),
            node_refresh: Duration::from_secs(10),
            node_monitor: Duration::from_secs(5),
            service_syncs: 10,
            node_syncs: 5,
        }
    }
}

impl Periods {
    /// The controllers' settings for the cluster of `cloud`.
    pub fn controller_settings(&self, cloud: &CloudConfig) -> ControllerSettings {
        ControllerSettings {
            service: RunSettings {
                config: DesiredConfig {
                    cluster_id: cloud.cluster_id.clone(),
                    udp_supported: cloud.udp_supported,
                    // Until the platform cluster is read (see `start`).
                    ip_versions: crate::platform::ipv4_only(),
                },
                timing: Timing {
                    resync: self.resync,
                    poll: self.poll,
                    ..Timing::default()
                },
                concurrency: self.service_syncs.max(1),
                node_debounce: self.node_debounce,
                node_debounce_max: self.node_debounce.saturating_mul(5),
                orphan_sweep: self.orphan_sweep,
            },
            node: NodeSettings {
                refresh: self.node_refresh,
                monitor: self.node_monitor,
                concurrency: self.node_syncs.max(1),
                ..NodeSettings::new(cloud.cluster_id.clone())
            },
        }
    }
}

/// Everything the CCM is configured with.
#[derive(Clone)]
pub struct RunConfig {
    /// The platform, its credentials and the cluster (`--cloud-config`).
    pub cloud: CloudConfig,
    pub kube: KubeAccess,
    pub periods: Periods,
    /// `None`: the controllers run at once, with no Lease (`--leader-elect=false`).
    pub leader_election: Option<LeaderElection>,
    /// `/metrics` (`None`: not served).
    pub metrics_bind_address: Option<SocketAddr>,
    /// `/healthz` and `/readyz` (`None`: not served).
    pub health_bind_address: Option<SocketAddr>,
    /// All three over HTTPS, `/metrics` behind TokenReview and SubjectAccessReview
    /// (`None`: not served).
    pub secure_serving: Option<SecureServing>,
}

impl RunConfig {
    /// The binary's defaults for `cloud`: the inferred Kubernetes config, leader election
    /// on the default Lease, no HTTP servers.
    pub fn new(cloud: CloudConfig) -> Self {
        RunConfig {
            cloud,
            kube: KubeAccess::Infer,
            periods: Periods::default(),
            leader_election: Some(LeaderElection::new(election::default_identity())),
            metrics_bind_address: None,
            health_bind_address: None,
            secure_serving: None,
        }
    }
}

/// A CCM that reached the platform and the API server and serves HTTP;
/// [`Started::run`] runs its controllers. Dropping it stops its HTTP servers.
pub struct Started {
    client: kube::Client,
    platform: Arc<dyn Platform>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    settings: ControllerSettings,
    election: Option<LeaderElection>,
    http: http::Serving,
}

async fn kube_client(access: KubeAccess) -> Result<kube::Client, Error> {
    let config = match access {
        KubeAccess::Client(client) => return Ok(client),
        KubeAccess::Kubeconfig(path) => {
            let kc = Kubeconfig::read_from(&path).map_err(|source| Error::Kubeconfig {
                what: "reading",
                path: path.clone(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    what: "loading",
                    path,
                    source,
                })?
        }
        KubeAccess::Infer => kube::Config::infer().await.map_err(Error::InferConfig)?,
    };
    kube::Client::try_from(config).map_err(|source| Error::Kube {
        what: "building the Kubernetes client",
        source,
    })
}

/// Builds the Kubernetes client (no request yet) and binds the HTTP servers, then checks the platform (the cloud config's cluster, with
/// its credentials, region, VPC and subnet) and the API server, before anything else.
pub async fn start(cfg: RunConfig) -> Result<Started, Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let RunConfig {
        cloud,
        kube,
        periods,
        leader_election,
        metrics_bind_address,
        health_bind_address,
        secure_serving,
    } = cfg;
    // First: the secure server asks the API server who a scraper is.
    let client = kube_client(kube).await?;
    let http_platform = HttpPlatform::new(cloud.client_config()).map_err(Error::PlatformClient)?;
    let metrics = Arc::new(Metrics::new(Some(http_platform.metrics())));
    let platform: Arc<dyn Platform> = Arc::new(http_platform);
    let health = Arc::new(Health::default());
    let mut http = http::serve(
        metrics_bind_address,
        health_bind_address,
        metrics.clone(),
        health.clone(),
    )
    .await?;
    if let Some(secure) = &secure_serving {
        http.serve_secure(secure, client.clone(), metrics.clone(), health.clone())
            .await?;
    }

    let cluster = platform
        .get_cluster(&cloud.cluster_id)
        .await
        .map_err(|source| Error::Cluster {
            cluster_id: cloud.cluster_id.clone(),
            source,
        })?;
    for (what, configured, actual) in [
        ("region", &cloud.region, &cluster.region),
        ("vpc_id", &cloud.vpc_id, &cluster.vpc_id),
        ("subnet_id", &cloud.subnet_id, &cluster.subnet_id),
    ] {
        if let Some(c) = configured
            && c != actual
        {
            return Err(Error::ClusterMismatch {
                what,
                configured: c.clone(),
                cluster: cluster.id.clone(),
                actual: actual.clone(),
            });
        }
    }
    client.apiserver_version().await.map_err(|source| Error::Kube {
        what: "reaching the Kubernetes API server",
        source,
    })?;
    let mut settings = periods.controller_settings(&cloud);
    // The families the cluster's subnet carries decide which LBs can have IPv6.
    settings.service.config.ip_versions = cluster.ip_versions.clone();
    tracing::info!(ip_versions = ?cluster.ip_versions, "platform cluster address families");
    Ok(Started {
        client,
        platform,
        metrics,
        health,
        settings,
        election: leader_election,
        http,
    })
}

impl Started {
    /// Where `/metrics` listens, if served.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.http.metrics
    }

    /// Where `/healthz` and `/readyz` listen, if served.
    pub fn health_address(&self) -> Option<SocketAddr> {
        self.http.health
    }

    /// Where the HTTPS server listens, if served.
    pub fn secure_address(&self) -> Option<SocketAddr> {
        self.http.secure
    }

    /// The CCM's Kubernetes client.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// Runs the controllers (while leading, with leader election) until `shutdown`
    /// resolves; then stops them and, with leader election, gives the Lease up. Fails when
    /// a controller fails, and with [`Error::LeadershipLost`] under
    /// [`OnLeadershipLost::Stop`].
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
        let Started {
            client,
            platform,
            metrics,
            health,
            settings,
            election,
            http: _http,
        } = self;
        let shutdown = shutdown.boxed().shared();
        let controllers = election::Controllers {
            client,
            platform,
            metrics,
            settings,
        };
        let result = match election {
            None => {
                health.set_ready(true);
                controllers.metrics.set_leader(true);
                let r = controllers.run(shutdown).await;
                controllers.metrics.set_leader(false);
                r
            }
            Some(election) => election.lead_and_run(controllers, &health, shutdown).await,
        };
        health.set_ready(false);
        result
    }
}

/// [`start`] then [`Started::run`]: the CCM until `shutdown` resolves.
pub async fn run(cfg: RunConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
    start(cfg).await?.run(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cloud() -> CloudConfig {
        crate::config::CloudConfigFile::parse("api_url: http://127.0.0.1:9\ncluster_id: cl-1\n")
            .unwrap()
            .resolve(|_| Some("x".into()))
            .unwrap()
    }

    #[test]
    fn periods_become_controller_settings() {
        let mut cloud = cloud();
        cloud.udp_supported = false;
        let p = Periods {
            node_debounce: Duration::from_millis(500),
            service_syncs: 0,
            ..Periods::default()
        };
        let s = p.controller_settings(&cloud);
        assert_eq!(s.service.config.cluster_id, "cl-1");
        assert!(!s.service.config.udp_supported);
        assert_eq!(s.service.node_debounce_max, Duration::from_millis(2500));
        assert_eq!(s.service.concurrency, 1, "at least one");
        assert_eq!(s.service.timing.resync, Duration::from_secs(300));
        assert_eq!(s.node.cluster_id, "cl-1");
        assert_eq!(s.node.concurrency, 5);
    }

    #[tokio::test]
    async fn an_unreachable_platform_fails_start() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut cloud = cloud();
        // Nothing listens on port 9 (discard), and no retries.
        cloud.timeout = Some(Duration::from_millis(200));
        // A client of an API server that is never asked: the platform fails first.
        let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let cfg = RunConfig {
            kube: KubeAccess::Client(client),
            metrics_bind_address: Some(any),
            health_bind_address: Some(any),
            secure_serving: Some(crate::secure_http::SecureServing::new(any)),
            ..RunConfig::new(cloud)
        };
        let e = start(cfg).await.err().expect("fails");
        assert!(e.to_string().contains("looking up platform cluster cl-1"), "{e}");
    }
}

//! The sandbox's Kubernetes: the API server stand-in (its state under `kube/`, its
//! kubeconfig in the state dir) and the cluster on it (node agents, kube-proxy, pods),
//! whose nodes are the platform stand-in's worker VMs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kuberaya_sandbox::cluster::{Cluster, ClusterOptions, PlatformLogin};
use kuberaya_sandbox::kube::{KubeApi, KubeApiConfig, ServiceCidrs};

use super::UpArgs;
use super::ipv6::Ipv6Ranges;
use super::ranges::Ranges;
use super::state::{Credentials, KUBECONFIG_FILE};

/// The API server stand-in and the cluster running on it.
pub(super) struct SandboxCluster {
    pub kubeconfig: PathBuf,
    pub cluster: Cluster,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    _api: Arc<KubeApi>,
}

impl SandboxCluster {
    /// Serves the API server stand-in on a free loopback port, writes the kubeconfig and
    /// starts the cluster against the platform at `platform_url`.
    pub(super) async fn start(
        dir: &Path,
        args: &UpArgs,
        creds: &Credentials,
        ranges: &Ranges,
        v6: Option<&Ipv6Ranges>,
        platform_url: &str,
    ) -> anyhow::Result<SandboxCluster> {
        // Dual-stack: IPv4 the primary family, as the sandbox's defaults.
        let mut service_cidrs: Vec<ipnet::IpNet> = vec![ranges.service_cidr.into()];
        service_cidrs.extend(v6.map(|v6| ipnet::IpNet::from(v6.service_cidr)));
        let api = KubeApi::open(KubeApiConfig {
            service_cidrs: ServiceCidrs::new(service_cidrs).map_err(anyhow::Error::msg)?,
            ..KubeApiConfig::new(dir.join("kube"))
        })
        .await
        .context("cannot start the Kubernetes API stand-in")?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot listen on 127.0.0.1")?;
        let kube_url = format!("https://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(kuberaya_sandbox::kube::serve(listener, api.clone(), async move {
            let _ = stopped.await;
        }));
        let kubeconfig = dir.join(KUBECONFIG_FILE);
        api.write_kubeconfig(&kubeconfig, &kube_url, "kuberaya-sandbox")
            .context("cannot write the kubeconfig")?;
        super::step(&format!(
            "Kubernetes API stand-in at {kube_url} (kubeconfig {})",
            kubeconfig.display()
        ));
        let client = kuberaya_sandbox::cluster::client_from_kubeconfig(&kubeconfig).await?;
        let login = PlatformLogin {
            url: platform_url.to_string(),
            email: creds.email.clone(),
            password: creds.password.clone(),
        };
        let options = ClusterOptions {
            no_ccm: args.no_ccm,
            pod_cidr: ranges.pod_cidr,
            pod_cidr_v6: v6.map(|v6| v6.pod_cidr),
            ..ClusterOptions::default()
        };
        let cluster = Cluster::start(client, login, &args.cluster_id, options)
            .await
            .context("cannot start the sandbox cluster")?;
        Ok(SandboxCluster {
            kubeconfig,
            cluster,
            stop,
            server,
            _api: api,
        })
    }

    /// Stops the cluster, then the API server stand-in.
    pub(super) async fn shutdown(self) {
        self.cluster.shutdown().await;
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
    }
}

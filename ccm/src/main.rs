//! `kuberaya-ccm`: the KubeRaya cloud-controller-manager binary.
//!
//! Upstream-style flags (see `--help`); the controllers (service, node, node lifecycle)
//! run only on the leader of a `coordination.k8s.io` Lease unless `--leader-elect=false`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Parser;
use tracing::{error, info, warn};

use kuberaya_ccm::config::CloudConfig;
use kuberaya_ccm::run::{
    self, DEFAULT_LEASE_NAME, DEFAULT_LEASE_NAMESPACE, KubeAccess, LeaderElection, OnLeadershipLost, Periods, RunConfig,
};
use kuberaya_ccm::secure_http::{CacheTtls, CertFiles, SecureServing};

/// Parses `300ms`, `10s`, `5m`, `1h` or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("invalid duration {s:?}"))
}

/// KubeRaya cloud-controller-manager for CloudRaya.
#[derive(Debug, Parser)]
#[command(name = "kuberaya-ccm", version, about)]
struct Args {
    /// Path to a kubeconfig; default: in-cluster config, then $KUBECONFIG / ~/.kube/config.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,

    /// The cloud config file (YAML or JSON): api_url, cluster_id, region, vpc_id,
    /// subnet_id, email_file/password_file (else env CLOUDRAYA_EMAIL/CLOUDRAYA_PASSWORD).
    #[arg(long)]
    cloud_config: PathBuf,

    /// The cluster's name (logs and Event reporting).
    #[arg(long, default_value = "kubernetes")]
    cluster_name: String,

    /// Services reconciled concurrently.
    #[arg(long, default_value_t = 10)]
    concurrent_service_syncs: u16,

    /// Run controllers only while holding the leader Lease.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,

    /// Namespace of the leader Lease.
    #[arg(long, default_value = DEFAULT_LEASE_NAMESPACE)]
    leader_elect_resource_namespace: String,

    /// Name of the leader Lease.
    #[arg(long, default_value = DEFAULT_LEASE_NAME)]
    leader_elect_resource_name: String,

    /// Lease duration.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    leader_elect_lease_duration: Duration,

    /// Renew this long before the lease expires.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    leader_elect_renew_grace: Duration,

    /// Address of the HTTPS server: `/metrics` for bearer tokens the API server
    /// authenticates (TokenReview) and authorizes (SubjectAccessReview: `get` on the
    /// non-resource URL `/metrics`), `/healthz` and `/readyz` for anyone; `0` disables it.
    #[arg(long, default_value = "0.0.0.0:10258")]
    secure_bind_address: String,

    /// The HTTPS server's certificate (PEM, read at start); without it and
    /// --tls-private-key-file, a self-signed one is made at start.
    #[arg(long, requires = "tls_private_key_file")]
    tls_cert_file: Option<PathBuf>,

    /// The key of --tls-cert-file (PEM).
    #[arg(long, requires = "tls_cert_file")]
    tls_private_key_file: Option<PathBuf>,

    /// How long a TokenReview's answer is kept.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    authentication_token_webhook_cache_ttl: Duration,

    /// How long a SubjectAccessReview that allowed is kept.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    authorization_webhook_cache_authorized_ttl: Duration,

    /// How long a SubjectAccessReview that denied is kept.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    authorization_webhook_cache_unauthorized_ttl: Duration,

    /// Address of a plain-HTTP, unauthenticated `/metrics`; `0` disables it. Loopback by
    /// default: on hostNetwork any other address is open to the node's network.
    #[arg(long, default_value = "127.0.0.1:10260")]
    metrics_bind_address: String,

    /// Address of plain-HTTP `/healthz` and `/readyz`; `0` disables it (they are on the
    /// secure address too).
    #[arg(long, default_value = "0")]
    health_bind_address: String,

    /// Resync of an in-sync Service (drift repair).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    resync_period: Duration,

    /// Period of the orphan sweep.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    orphan_sweep_period: Duration,

    /// Longest wait between two looks at a provisioning/updating/deleting load balancer
    /// (one the CCM just created is first looked at after 0.5 s, then ever less often).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    poll_period: Duration,

    /// Quiet period batching a burst of node changes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    node_sync_debounce: Duration,

    /// Period of the refresh of every Node's addresses and labels from its VM.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    node_status_update_frequency: Duration,

    /// Period of the node lifecycle check (VM deleted or stopped).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    node_monitor_period: Duration,

    /// Nodes initialised concurrently.
    #[arg(long, default_value_t = 5)]
    concurrent_node_syncs: u16,

    /// Log as JSON.
    #[arg(long)]
    log_json: bool,
}

/// A bind address flag: `0` (or empty) disables the server.
fn bind_address(addr: &str, what: &str) -> Result<Option<SocketAddr>> {
    if addr == "0" || addr.is_empty() {
        return Ok(None);
    }
    let addr = addr
        .parse()
        .with_context(|| format!("invalid {what} address {addr:?}"))?;
    Ok(Some(addr))
}

/// What the flags say, for [`run::start`].
fn run_config(args: &Args, cloud: CloudConfig) -> Result<RunConfig> {
    Ok(RunConfig {
        cloud,
        kube: match &args.kubeconfig {
            Some(path) => KubeAccess::Kubeconfig(path.clone()),
            None => KubeAccess::Infer,
        },
        periods: Periods {
            resync: args.resync_period,
            poll: args.poll_period,
            orphan_sweep: args.orphan_sweep_period,
            node_debounce: args.node_sync_debounce,
            node_refresh: args.node_status_update_frequency,
            node_monitor: args.node_monitor_period,
            service_syncs: args.concurrent_service_syncs,
            node_syncs: args.concurrent_node_syncs,
        },
        leader_election: args.leader_elect.then(|| LeaderElection {
            namespace: args.leader_elect_resource_namespace.clone(),
            name: args.leader_elect_resource_name.clone(),
            identity: run::election::default_identity(),
            lease_duration: args.leader_elect_lease_duration,
            renew_grace: args.leader_elect_renew_grace,
            on_lost: OnLeadershipLost::Stop,
        }),
        metrics_bind_address: bind_address(&args.metrics_bind_address, "metrics")?,
        health_bind_address: bind_address(&args.health_bind_address, "health")?,
        secure_serving: bind_address(&args.secure_bind_address, "secure")?.map(|bind_address| SecureServing {
            bind_address,
            cert: args
                .tls_cert_file
                .clone()
                .zip(args.tls_private_key_file.clone())
                .map(|(cert, key)| CertFiles { cert, key }),
            cache: CacheTtls {
                token: args.authentication_token_webhook_cache_ttl,
                authorized: args.authorization_webhook_cache_authorized_ttl,
                unauthorized: args.authorization_webhook_cache_unauthorized_ttl,
            },
        }),
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        () = term => {},
    }
    info!("shutting down");
}

#[tokio::main]
async fn main() -> Result<()> {
    if rustls::crypto::ring::default_provider().install_default().is_err() {
        warn!("a rustls crypto provider was already installed");
    }
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_runtime=warn"));
    if args.log_json {
        tracing_subscriber::fmt().with_env_filter(filter).json().init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    let cloud = CloudConfig::load(&args.cloud_config).context("loading --cloud-config")?;
    info!(api_url = %cloud.api_url, cluster_id = %cloud.cluster_id, cluster_name = %args.cluster_name, "starting kuberaya-ccm");
    let config = run_config(&args, cloud)?;
    let started = run::start(config).await?;
    // From here on SIGTERM stops the controllers and gives the Lease up; during the
    // checks above it ends the process at once.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(());
    });
    match started
        .run(async move {
            let _ = stopped.await;
        })
        .await
    {
        Err(run::Error::LeadershipLost) => {
            error!("leadership lost; exiting so that no two replicas reconcile");
            std::process::exit(1);
        }
        r => Ok(r?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn flags_have_upstream_names_and_our_defaults() {
        let a = Args::try_parse_from(["kuberaya-ccm", "--cloud-config", "/c.yaml"]).expect("parses");
        assert_eq!(a.concurrent_service_syncs, 10);
        assert!(a.leader_elect);
        let a = Args::try_parse_from([
            "kuberaya-ccm",
            "--cloud-config=/c.yaml",
            "--leader-elect=false",
            "--kubeconfig=/k",
            "--cluster-name=c1",
            "--concurrent-service-syncs=3",
            "--metrics-bind-address=127.0.0.1:0",
            "--health-bind-address=127.0.0.1:0",
        ])
        .expect("parses");
        assert!(!a.leader_elect);
        assert_eq!(a.concurrent_service_syncs, 3);
        assert_eq!(a.kubeconfig, Some(PathBuf::from("/k")));
    }

    #[test]
    fn flags_become_the_run_config() {
        let cloud = kuberaya_ccm::config::CloudConfigFile::parse("api_url: http://127.0.0.1:9\ncluster_id: cl-1\n")
            .unwrap()
            .resolve(|_| Some("x".into()))
            .unwrap();
        let a = Args::try_parse_from(["kuberaya-ccm", "--cloud-config=/c.yaml", "--metrics-bind-address=0"]).unwrap();
        let c = run_config(&a, cloud.clone()).unwrap();
        let e = c.leader_election.expect("elects by default");
        assert_eq!((e.namespace.as_str(), e.name.as_str()), ("kube-system", "kuberaya-ccm"));
        assert_eq!(e.on_lost, OnLeadershipLost::Stop);
        assert_eq!(c.metrics_bind_address, None, "0 disables");
        assert_eq!(c.health_bind_address, None, "health is on the secure address");
        let secure = c.secure_serving.expect("HTTPS by default");
        assert_eq!(secure, SecureServing::new("0.0.0.0:10258".parse().unwrap()));
        let c = run_config(
            &Args::try_parse_from(["kuberaya-ccm", "--cloud-config=/c.yaml"]).unwrap(),
            cloud.clone(),
        )
        .unwrap();
        assert_eq!(
            c.metrics_bind_address,
            Some("127.0.0.1:10260".parse().unwrap()),
            "plain metrics on loopback only"
        );
        let a = Args::try_parse_from([
            "kuberaya-ccm",
            "--cloud-config=/c.yaml",
            "--secure-bind-address=127.0.0.1:8443",
            "--tls-cert-file=/t.crt",
            "--tls-private-key-file=/t.key",
            "--authorization-webhook-cache-unauthorized-ttl=0",
        ])
        .unwrap();
        let s = run_config(&a, cloud.clone()).unwrap().secure_serving.unwrap();
        assert_eq!(s.bind_address, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(s.cert.unwrap().key, PathBuf::from("/t.key"));
        assert_eq!(s.cache.unauthorized, Duration::ZERO);
        assert!(
            Args::try_parse_from(["kuberaya-ccm", "--cloud-config=/c.yaml", "--tls-cert-file=/t.crt"]).is_err(),
            "a certificate needs its key"
        );
        let a = Args::try_parse_from(["kuberaya-ccm", "--cloud-config=/c.yaml", "--secure-bind-address=0"]).unwrap();
        assert_eq!(run_config(&a, cloud.clone()).unwrap().secure_serving, None);
        assert_eq!(c.periods, Periods::default(), "the flags' defaults are the library's");
        let a = Args::try_parse_from(["kuberaya-ccm", "--cloud-config=/c.yaml", "--health-bind-address=x"]).unwrap();
        assert!(run_config(&a, cloud).is_err());
    }
}

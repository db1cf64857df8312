//! `kuberaya-ccm`: the KubeRaya cloud-controller-manager binary.
//!
//! Upstream-style flags (see `--help`); the controllers (service, node, node lifecycle)
//! run only on the leader of a `coordination.k8s.io` Lease unless `--leader-elect=false`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{error, info, warn};

use kuberaya_ccm::config::CloudConfig;
use kuberaya_ccm::metrics::Metrics;
use kuberaya_ccm::node::NodeSettings;
use kuberaya_ccm::platform::{HttpPlatform, Platform};
use kuberaya_ccm::service::controller::{RunSettings, Timing};
use kuberaya_ccm::service::desired::DesiredConfig;
use kuberaya_ccm::{ControllerSettings, run_controllers};

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
    #[arg(long, default_value = "kube-system")]
    leader_elect_resource_namespace: String,

    /// Name of the leader Lease.
    #[arg(long, default_value = "kuberaya-ccm")]
    leader_elect_resource_name: String,

    /// Lease duration.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    leader_elect_lease_duration: Duration,

    /// Renew this long before the lease expires.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    leader_elect_renew_grace: Duration,

    /// Address of the Prometheus endpoint (`/metrics`); `0` disables it.
    #[arg(long, default_value = "0.0.0.0:10260")]
    metrics_bind_address: String,

    /// Address of `/healthz` and `/readyz`; `0` disables it.
    #[arg(long, default_value = "0.0.0.0:10258")]
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

async fn kube_client(args: &Args) -> Result<Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => Config::infer().await.context("inferring the Kubernetes config")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

async fn serve(addr: &str, router: Router, what: &str) -> Result<()> {
    if addr == "0" || addr.is_empty() {
        return Ok(());
    }
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("invalid {what} address {addr:?}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} on {addr}"))?;
    info!(address = %listener.local_addr()?, "{what} listening");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            error!(error = %e, "HTTP server stopped");
        }
    });
    Ok(())
}

fn shutdown_signal() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {},
            _ = term => {},
        }
        info!("shutting down");
        let _ = tx.send(true);
    });
    rx
}

async fn wait_true(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
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
    let http = HttpPlatform::new(cloud.client_config()).context("building the platform client")?;
    let platform_metrics = http.metrics();
    let platform: Arc<dyn Platform> = Arc::new(http);
    let metrics = Arc::new(Metrics::new(Some(platform_metrics)));
    let ready = Arc::new(AtomicBool::new(false));

    let m = metrics.clone();
    let metrics_router = Router::new().route(
        "/metrics",
        get(move || {
            let m = m.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.render(),
                )
            }
        }),
    );
    serve(&args.metrics_bind_address, metrics_router, "metrics").await?;
    let r = ready.clone();
    let health_router = Router::new().route("/healthz", get(|| async { "ok" })).route(
        "/readyz",
        get(move || {
            let r = r.clone();
            async move {
                if r.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ok").into_response()
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
                }
            }
        }),
    );
    serve(&args.health_bind_address, health_router, "health").await?;

    // Check the platform and the credentials before anything else.
    let cluster = platform
        .get_cluster(&cloud.cluster_id)
        .await
        .with_context(|| format!("looking up platform cluster {}", cloud.cluster_id))?;
    for (what, configured, actual) in [
        ("region", &cloud.region, &cluster.region),
        ("vpc_id", &cloud.vpc_id, &cluster.vpc_id),
        ("subnet_id", &cloud.subnet_id, &cluster.subnet_id),
    ] {
        if let Some(c) = configured
            && c != actual
        {
            bail!(
                "cloud config {what} {c:?} does not match platform cluster {} ({actual:?})",
                cluster.id
            );
        }
    }
    let client = kube_client(&args).await?;
    client
        .apiserver_version()
        .await
        .context("reaching the Kubernetes API server")?;
    ready.store(true, Ordering::Relaxed);

    let stop = shutdown_signal();
    let service = RunSettings {
        config: DesiredConfig {
            cluster_id: cloud.cluster_id.clone(),
            udp_supported: cloud.udp_supported,
        },
        timing: Timing {
            resync: args.resync_period,
            poll: args.poll_period,
            ..Timing::default()
        },
        concurrency: args.concurrent_service_syncs.max(1),
        node_debounce: args.node_sync_debounce,
        node_debounce_max: args.node_sync_debounce.saturating_mul(5),
        orphan_sweep: args.orphan_sweep_period,
    };
    let settings = ControllerSettings {
        service,
        node: NodeSettings {
            refresh: args.node_status_update_frequency,
            monitor: args.node_monitor_period,
            concurrency: args.concurrent_node_syncs.max(1),
            ..NodeSettings::new(cloud.cluster_id.clone())
        },
    };

    if !args.leader_elect {
        metrics.set_leader(true);
        run_controllers(client, platform, metrics, settings, wait_true(stop)).await?;
        return Ok(());
    }

    let identity = format!(
        "{}_{}",
        std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "kuberaya-ccm".into()),
        std::process::id()
    );
    let manager = LeaseManagerBuilder::new(client.clone(), &args.leader_elect_resource_name)
        .with_namespace(&args.leader_elect_resource_namespace)
        .with_identity(&identity)
        .with_duration(args.leader_elect_lease_duration.as_secs().max(2))
        .with_grace(args.leader_elect_renew_grace.as_secs().max(1))
        .with_field_manager("kuberaya-ccm")
        .build()
        .await
        .context("setting up leader election")?;
    let (mut leader, _lease_task) = manager.watch().await;
    info!(%identity, lease = %args.leader_elect_resource_name, "waiting for leadership");
    loop {
        if *leader.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = leader.changed() => changed.context("leader election stopped")?,
            () = wait_true(stop.clone()) => return Ok(()),
        }
    }
    info!(%identity, "became leader");
    metrics.set_leader(true);
    let lost = async move {
        loop {
            if leader.changed().await.is_err() || !*leader.borrow() {
                return;
            }
        }
    };
    tokio::select! {
        r = run_controllers(client, platform, metrics.clone(), settings, wait_true(stop)) => {
            r?;
            Ok(())
        }
        () = lost => {
            metrics.set_leader(false);
            error!("leadership lost; exiting so that no two replicas reconcile");
            std::process::exit(1);
        }
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
}

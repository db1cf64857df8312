//! The CloudRaya platform stand-in of `sandbox up` (its state under `platform/`, its API
//! on the previous run's address when free), and `sandbox node`, which acts on the worker
//! VMs through that API.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use kuberaya_sandbox::cluster::{PlatformClient, PlatformLogin};
use kuberaya_sandbox::platform::{PlatformConfig, PlatformStandIn, serve};

use super::ipv6::Ipv6Ranges;
use super::ranges::Ranges;
use super::state::{Credentials, read_runtime, running_runtime, state_dir};
use super::{NodeAction, NodeArgs, UpArgs};

/// The platform stand-in, serving its API on the sandbox's address.
pub(super) struct ServedPlatform {
    pub url: String,
    platform: std::sync::Arc<PlatformStandIn>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl ServedPlatform {
    /// Opens the stand-in's state in `dir`, seeds the sandbox cluster with its worker VMs
    /// and serves the API.
    pub(super) async fn start(
        dir: &Path,
        args: &UpArgs,
        creds: &Credentials,
        ranges: &Ranges,
        v6: Option<&Ipv6Ranges>,
    ) -> anyhow::Result<ServedPlatform> {
        let config = PlatformConfig {
            state_dir: dir.join("platform"),
            email: creds.email.clone(),
            password: creds.password.clone(),
            public_ip_range: ranges.public_ip_range,
            vm_ip_range: ranges.vm_ip_range,
            // Dual-stack: an IPv6 pool, and VMs (so nodes and LB backends) with IPv6.
            public_ipv6_range: v6.map(|v6| v6.public_ip_range),
            vm_ipv6_range: v6.map(|v6| v6.vm_ip_range),
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
        let listener = bind_platform_listener(dir, args.listen).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, platform.clone(), async move {
            let _ = stopped.await;
        }));
        Ok(ServedPlatform {
            url,
            platform,
            stop,
            server,
        })
    }

    /// Stops serving and closes the stand-in's state.
    pub(super) async fn shutdown(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
        self.platform.shutdown().await;
    }
}

/// The platform API's listener: `requested`, else the previous run's address when free,
/// else a free port on 127.0.0.1.
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

/// `sandbox node add|stop|start|delete NAME`: the worker VM through the platform API.
pub(super) async fn node(args: NodeArgs) -> anyhow::Result<ExitCode> {
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

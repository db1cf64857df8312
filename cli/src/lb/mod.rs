//! `kuberaya lb ...`: the platform load balancers of the cluster's `LoadBalancer`
//! Services, found by the labels the CCM puts on them (`kuberaya_ccm::platform::labels`),
//! through the CCM's own platform client.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::kube::KubeArgs;
use crate::output::OutputArg;

mod describe;
mod list;
mod orphans;
mod platform;
#[cfg(test)]
pub(crate) mod tests;

pub use describe::{EventRow, LbDescribe, describe_of, describe_text, diagnose, parse_service_ref};
pub use list::{LbList, LbRow, backend_health, list_table, row_of};
pub use orphans::{OrphanList, OrphanRow, orphan_list, orphans_table};
pub use platform::{platform_error, resolve_platform, service_of};

/// Env var with the platform API URL (as `kuberaya sandbox env` exports it).
pub const ENV_API_URL: &str = "CLOUDRAYA_API_URL";
/// Env var with the platform cluster ID when no cloud config is given.
pub const ENV_CLUSTER_ID: &str = "KUBERAYA_CLUSTER_ID";

#[derive(Debug, Subcommand)]
pub enum LbCommand {
    /// List the cluster's load balancers: Service, public IP:ports, LB id, status, healthy backends.
    #[command(after_help = "Examples:
  eval \"$(kuberaya sandbox env)\"; kuberaya lb list
  kuberaya lb list --cloud-config /etc/kubernetes/cloud.yaml -n shop -o json | jq '.items[].publicIp'")]
    List(ListArgs),
    /// One Service's load balancer: rules, backend health, annotations in effect, Events,
    /// and what is wrong when it is pending.
    #[command(after_help = "Examples:\n  kuberaya lb describe shop/web\n  kuberaya lb describe -n shop web -o yaml")]
    Describe(DescribeArgs),
    /// Load balancers labelled with this cluster whose Service is gone.
    ///
    /// The same judgement as the CCM's orphan sweep: an LB with a Service UID whose Service
    /// is gone, or exists but neither wants an LB nor carries the CCM's finalizer. LBs with
    /// the cluster's label but no Service UID were not created by the CCM: they are listed
    /// apart ("unknown") and never deleted.
    #[command(after_help = "Examples:
  kuberaya lb orphans
  kuberaya lb orphans --delete          # asks for confirmation
  kuberaya lb orphans --delete --yes    # for scripts")]
    Orphans(OrphansArgs),
}

/// Platform credentials.
#[derive(Debug, Clone, Default, Args)]
pub struct PlatformArgs {
    /// The CCM's cloud config file [default: CLOUDRAYA_API_URL, CLOUDRAYA_EMAIL, CLOUDRAYA_PASSWORD and KUBERAYA_CLUSTER_ID from the environment].
    #[arg(long, global = true, value_name = "FILE")]
    pub cloud_config: Option<PathBuf>,
    /// The platform cluster ID (overrides the cloud config's and KUBERAYA_CLUSTER_ID).
    #[arg(long, global = true, value_name = "ID")]
    pub cluster_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub platform: PlatformArgs,
    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// NS/SVC, or SVC with -n.
    pub service: String,
    #[command(flatten)]
    pub platform: PlatformArgs,
    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(Debug, Args)]
pub struct OrphansArgs {
    /// Delete the orphans (asks first unless --yes); never the unknown LBs.
    #[arg(long)]
    pub delete: bool,
    /// Do not ask before deleting.
    #[arg(long, requires = "delete")]
    pub yes: bool,
    #[command(flatten)]
    pub platform: PlatformArgs,
    #[command(flatten)]
    pub output: OutputArg,
}

pub async fn run(cmd: LbCommand, kube_args: &KubeArgs) -> anyhow::Result<()> {
    match cmd {
        LbCommand::List(a) => list::list(kube_args, a).await,
        LbCommand::Describe(a) => describe::describe(kube_args, a).await,
        LbCommand::Orphans(a) => orphans::orphans(kube_args, a).await,
    }
}

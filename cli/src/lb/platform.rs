//! Reaching the platform: credentials from `--cloud-config` or the environment, the CCM's
//! platform client, and the load balancers labelled with this cluster.

use std::time::Duration;

use anyhow::anyhow;
use kuberaya_ccm::config::{CloudConfig, ENV_EMAIL, ENV_PASSWORD};
use kuberaya_ccm::platform::{
    Error as PlatformError, HttpPlatform, LABEL_CLUSTER_ID, LABEL_SERVICE_NAME, LABEL_SERVICE_NAMESPACE, Labels,
    LoadBalancer, Platform, PlatformClientConfig,
};

use super::{ENV_API_URL, ENV_CLUSTER_ID, PlatformArgs};

/// The client settings and cluster ID from `--cloud-config` (a loaded [`CloudConfig`]) or
/// the environment.
pub fn resolve_platform(
    cloud: Option<CloudConfig>,
    cluster_flag: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(PlatformClientConfig, String), String> {
    let (mut config, cluster) = match cloud {
        Some(c) => (c.client_config(), c.cluster_id),
        None => {
            let url = env(ENV_API_URL).ok_or_else(|| {
                format!("no platform credentials: pass --cloud-config FILE or set {ENV_API_URL}, {ENV_EMAIL} and {ENV_PASSWORD} (for the sandbox: eval \"$(kuberaya sandbox env)\")")
            })?;
            let email = env(ENV_EMAIL).ok_or_else(|| format!("{ENV_API_URL} is set but {ENV_EMAIL} is not"))?;
            let password =
                env(ENV_PASSWORD).ok_or_else(|| format!("{ENV_API_URL} is set but {ENV_PASSWORD} is not"))?;
            let cluster = env(ENV_CLUSTER_ID).unwrap_or_default();
            (PlatformClientConfig::new(url, email, password), cluster)
        }
    };
    let cluster = cluster_flag.map(str::to_string).unwrap_or(cluster);
    if cluster.is_empty() {
        return Err(format!(
            "no cluster ID: pass --cluster-id, set {ENV_CLUSTER_ID}, or use --cloud-config"
        ));
    }
    // A CLI fails fast rather than retrying for a minute.
    config.max_retries = 1;
    config.timeout = config.timeout.min(Duration::from_secs(10));
    Ok((config, cluster))
}

/// A platform error as one line that says what to check.
pub fn platform_error(e: PlatformError, what: &str) -> anyhow::Error {
    match &e {
        PlatformError::Unauthorized { .. } | PlatformError::Forbidden { .. } => anyhow!(
            "{what}: the platform refused the credentials ({e}); check {ENV_EMAIL}/{ENV_PASSWORD} or the cloud config's credential files"
        ),
        PlatformError::Transport(_) | PlatformError::Timeout { .. } => anyhow!(
            "{what}: {}; check {ENV_API_URL} or the cloud config's api_url",
            crate::kube::one_line(&e)
        ),
        _ => anyhow!("{what}: {}", crate::kube::one_line(&e)),
    }
}

pub(super) struct Connected {
    pub(super) platform: HttpPlatform,
    pub(super) cluster: String,
}

pub(super) fn platform(args: &PlatformArgs) -> anyhow::Result<Connected> {
    let cloud = match &args.cloud_config {
        Some(p) => Some(
            CloudConfig::load(p)
                .map_err(|e| anyhow!("--cloud-config {}: {}", p.display(), crate::kube::one_line(&e)))?,
        ),
        None => None,
    };
    let (config, cluster) =
        resolve_platform(cloud, args.cluster_id.as_deref(), |k| std::env::var(k).ok()).map_err(|e| anyhow!(e))?;
    let platform = HttpPlatform::new(config).map_err(|e| platform_error(e, "platform client"))?;
    Ok(Connected { platform, cluster })
}

pub(super) fn cluster_labels(cluster: &str) -> Labels {
    Labels::from([(LABEL_CLUSTER_ID.to_string(), cluster.to_string())])
}

pub(super) async fn cluster_lbs(c: &Connected) -> anyhow::Result<Vec<LoadBalancer>> {
    let mut lbs = c
        .platform
        .list_load_balancers(&c.cluster, &cluster_labels(&c.cluster))
        .await
        .map_err(|e| platform_error(e, "listing load balancers"))?;
    lbs.sort_by_key(|lb| (service_of(lb), lb.id.clone()));
    Ok(lbs)
}

/// `ns/name` of the Service an LB belongs to, from its labels.
pub fn service_of(lb: &LoadBalancer) -> Option<(String, String)> {
    Some((
        lb.labels.get(LABEL_SERVICE_NAMESPACE)?.clone(),
        lb.labels.get(LABEL_SERVICE_NAME)?.clone(),
    ))
}

//! The CCM of `sandbox up`, run in this process exactly as `kuberaya-ccm` runs it
//! ([`kuberaya_ccm::run`]): its own Kubernetes client from the sandbox's kubeconfig, its
//! own platform client with the sandbox's credentials, and every controller only while it
//! holds the leader Lease, the one a deployed `kuberaya-ccm` uses by default, so that a
//! CCM started against the sandbox never reconciles alongside ours.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kuberaya_ccm::config::CloudConfig;
use kuberaya_ccm::run::{KubeAccess, LeaderElection, OnLeadershipLost, Periods, RunConfig};

use super::state::Credentials;

/// The in-process CCM's identity. Only one `sandbox up` runs per state dir (the lock), so
/// a restarted sandbox takes back its own Lease at once, even after a crash.
const CCM_IDENTITY: &str = "kuberaya-sandbox";
/// How long `shutdown` waits for the controllers to stop and the Lease to be given up.
const CCM_STOP: Duration = Duration::from_secs(8);

/// Quicker than a cluster's defaults: a sandbox is small and its user watches it.
fn periods() -> Periods {
    Periods {
        resync: Duration::from_secs(60),
        poll: Duration::from_millis(500),
        orphan_sweep: Duration::from_secs(60),
        node_debounce: Duration::from_millis(500),
        node_refresh: Duration::from_secs(5),
        node_monitor: Duration::from_secs(2),
        ..Periods::default()
    }
}

/// A running in-process CCM.
pub(super) struct InProcessCcm {
    client: kube::Client,
    /// The Lease it elects on, `namespace/name`.
    pub lease: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), kuberaya_ccm::run::Error>>,
}

impl InProcessCcm {
    /// Checks the platform and the API server as the binary does, then runs the CCM in
    /// a task.
    pub(super) async fn start(
        kubeconfig: &Path,
        url: &str,
        creds: &Credentials,
        cluster_id: &str,
        udp_supported: bool,
    ) -> anyhow::Result<InProcessCcm> {
        let cloud = CloudConfig {
            api_url: url.to_string(),
            cluster_id: cluster_id.to_string(),
            region: None,
            vpc_id: None,
            subnet_id: None,
            email: creds.email.clone(),
            password: creds.password.clone(),
            udp_supported,
            rate_limit: None,
            timeout: None,
        };
        let election = LeaderElection {
            on_lost: OnLeadershipLost::Rejoin,
            ..LeaderElection::new(CCM_IDENTITY)
        };
        let lease = format!("{}/{}", election.namespace, election.name);
        let started = kuberaya_ccm::run::start(RunConfig {
            kube: KubeAccess::Kubeconfig(kubeconfig.to_path_buf()),
            periods: periods(),
            leader_election: Some(election),
            ..RunConfig::new(cloud)
        })
        .await
        .map_err(anyhow::Error::new)
        .with_context(|| format!("the CCM cannot start against cluster {cluster_id}"))?;
        let client = started.client().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(started.run(async move {
            let _ = stopped.await;
        }));
        Ok(InProcessCcm {
            client,
            lease,
            stop,
            task,
        })
    }

    /// Waits until `count` Nodes carry a providerID; returns how many do.
    pub(super) async fn wait_nodes_initialised(&self, count: usize, timeout: Duration) -> anyhow::Result<usize> {
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(self.client.clone());
        let deadline = Instant::now() + timeout;
        loop {
            let list = nodes.list(&Default::default()).await?;
            let done = list
                .items
                .iter()
                .filter(|n| n.spec.as_ref().is_some_and(|s| s.provider_id.is_some()))
                .count();
            if done >= count {
                return Ok(done);
            }
            if Instant::now() > deadline {
                bail!("{done} of {count} nodes have a providerID after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the controllers and gives up the Lease.
    pub(super) async fn shutdown(self) {
        let _ = self.stop.send(());
        match tokio::time::timeout(CCM_STOP, self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("the CCM stopped with an error: {:#}", anyhow::Error::new(e)),
            Ok(Err(e)) => eprintln!("the CCM task failed: {e}"),
            Err(_) => eprintln!("the CCM did not stop within {} s", CCM_STOP.as_secs()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandbox_elects_on_the_deployed_ccms_lease() {
        let e = LeaderElection::new(CCM_IDENTITY);
        assert_eq!(
            (e.namespace.as_str(), e.name.as_str()),
            (
                kuberaya_ccm::run::DEFAULT_LEASE_NAMESPACE,
                kuberaya_ccm::run::DEFAULT_LEASE_NAME
            )
        );
        assert_eq!(periods().service_syncs, Periods::default().service_syncs);
    }
}

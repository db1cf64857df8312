//! Leader election on a `coordination.k8s.io` Lease through `kube-lease-manager`, and
//! the controllers run only while leading: the one election of the CCM, whether the
//! binary or `kuberaya sandbox up` runs it.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{error, info, warn};

use super::{Error, Health};
use crate::metrics::Metrics;
use crate::platform::Platform;
use crate::{ControllerSettings, run_controllers};

/// The Lease namespace a deployed `kuberaya-ccm` elects on by default.
pub const DEFAULT_LEASE_NAMESPACE: &str = "kube-system";
/// The Lease name a deployed `kuberaya-ccm` elects on by default (`deploy/ccm`'s Role
/// names it).
pub const DEFAULT_LEASE_NAME: &str = "kuberaya-ccm";
/// The prefix of the field manager of this replica's Lease writes.
const FIELD_MANAGER: &str = "kuberaya-ccm";
/// The API server's limit on a field manager's length.
const MAX_FIELD_MANAGER_LEN: usize = 128;
/// How long stopping controllers may take before they are aborted.
const STOP_CONTROLLERS: Duration = Duration::from_secs(5);
/// The pause before failed controllers start again (under [`OnLeadershipLost::Rejoin`]).
const RESTART_CONTROLLERS: Duration = Duration::from_secs(2);
/// How long giving the Lease up may take on shutdown.
const RELEASE_LEASE: Duration = Duration::from_secs(3);

/// What a leader does when another replica has taken its Lease over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnLeadershipLost {
    /// Abort the controllers and fail with [`Error::LeadershipLost`]; the binary then
    /// exits, so that no two replicas ever reconcile side by side.
    #[default]
    Stop,
    /// Abort the controllers and stand by for the Lease again (an in-process CCM, which
    /// cannot exit without its host); controllers that fail start again after a pause.
    Rejoin,
}

/// The Lease and this replica's part in the election (the `--leader-elect-*` flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderElection {
    pub namespace: String,
    pub name: String,
    /// Unique among the replicas; a replica restarted with the same identity takes its
    /// Lease back at once.
    pub identity: String,
    /// How long a Lease holds without renewal (whole seconds, at least 2).
    pub lease_duration: Duration,
    /// Renew this long before the Lease would expire (whole seconds, at least 1).
    pub renew_grace: Duration,
    pub on_lost: OnLeadershipLost,
}

impl LeaderElection {
    /// The default Lease (`kube-system/kuberaya-ccm`), 15 s renewed 5 s before its end.
    pub fn new(identity: impl Into<String>) -> Self {
        LeaderElection {
            namespace: DEFAULT_LEASE_NAMESPACE.to_string(),
            name: DEFAULT_LEASE_NAME.to_string(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_grace: Duration::from_secs(5),
            on_lost: OnLeadershipLost::Stop,
        }
    }
}

/// A replica's identity: `$POD_NAME` (else `$HOSTNAME`, else `kuberaya-ccm`) and the pid.
pub fn default_identity() -> String {
    format!(
        "{}_{}",
        std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "kuberaya-ccm".into()),
        std::process::id()
    )
}

/// The shutdown future, shared by the election and every controller.
pub(super) type Shutdown = Shared<BoxFuture<'static, ()>>;

/// What runs while leading: every controller of [`run_controllers`].
#[derive(Clone)]
pub(super) struct Controllers {
    pub client: kube::Client,
    pub platform: Arc<dyn Platform>,
    pub metrics: Arc<Metrics>,
    pub settings: ControllerSettings,
}

impl Controllers {
    /// Runs the controllers until `shutdown` resolves.
    pub async fn run(&self, shutdown: Shutdown) -> Result<(), Error> {
        run_controllers(
            self.client.clone(),
            self.platform.clone(),
            self.metrics.clone(),
            self.settings.clone(),
            shutdown,
        )
        .await
        .map_err(Error::from)
    }
}

/// This replica's field manager of the Lease: one per identity, as kube-lease-manager asks
/// (a holder's server-side apply conflicts with another manager's fields, which is how two
/// replicas grabbing a free Lease at once are told apart; under one shared manager both
/// applies would succeed).
fn field_manager(identity: &str) -> String {
    format!("{FIELD_MANAGER}-{identity}")
        .chars()
        .take(MAX_FIELD_MANAGER_LEN)
        .collect()
}

/// How one term of leadership ended.
enum Term {
    Shutdown,
    Lost,
    Failed(Error),
}

impl LeaderElection {
    /// Stands for the Lease (ready from then on), runs the controllers while leading, and
    /// on `shutdown` stops them and gives the Lease up.
    pub(super) async fn lead_and_run(
        self,
        controllers: Controllers,
        health: &Health,
        shutdown: Shutdown,
    ) -> Result<(), Error> {
        let manager = LeaseManagerBuilder::new(controllers.client.clone(), &self.name)
            .with_namespace(&self.namespace)
            .with_identity(&self.identity)
            .with_duration(self.lease_duration.as_secs().max(2))
            .with_grace(self.renew_grace.as_secs().max(1))
            .with_field_manager(field_manager(&self.identity))
            .build()
            .await
            .map_err(Error::LeaderElection)?;
        let (mut leader, lease_task) = manager.watch().await;
        health.set_ready(true);
        let identity = &self.identity;
        let result = loop {
            info!(%identity, lease = %self.name, "waiting for leadership");
            let leading = loop {
                if *leader.borrow_and_update() {
                    break true;
                }
                tokio::select! {
                    changed = leader.changed() => if changed.is_err() { break false },
                    () = shutdown.clone() => return give_up(leader, lease_task, Ok(())).await,
                }
            };
            if !leading {
                break Err(Error::ElectionStopped);
            }
            info!(%identity, "became leader");
            controllers.metrics.set_leader(true);
            let term = self.term(&controllers, &mut leader, shutdown.clone()).await;
            controllers.metrics.set_leader(false);
            match term {
                Term::Shutdown => return give_up(leader, lease_task, Ok(())).await,
                Term::Failed(e) if self.on_lost == OnLeadershipLost::Rejoin => {
                    error!(error = %e, "the controllers stopped; starting them again while leading");
                    tokio::select! {
                        () = tokio::time::sleep(RESTART_CONTROLLERS) => {}
                        () = shutdown.clone() => return give_up(leader, lease_task, Ok(())).await,
                    }
                }
                Term::Failed(e) => return give_up(leader, lease_task, Err(e)).await,
                Term::Lost if self.on_lost == OnLeadershipLost::Stop => break Err(Error::LeadershipLost),
                Term::Lost => warn!(%identity, "leadership lost; the controllers stopped until it leads again"),
            }
        };
        // Not the holder: nothing to give up.
        lease_task.abort();
        result
    }

    /// One term: the controllers run until shutdown, until they fail, or until the Lease
    /// is lost (then they are aborted at once: the new leader reconciles already).
    async fn term(
        &self,
        controllers: &Controllers,
        leader: &mut tokio::sync::watch::Receiver<bool>,
        shutdown: Shutdown,
    ) -> Term {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stop_controllers = async move {
            let _ = stopped.await;
        }
        .boxed()
        .shared();
        let task_controllers = controllers.clone();
        let mut task = tokio::spawn(async move { task_controllers.run(stop_controllers).await });
        let lost = async {
            loop {
                if leader.changed().await.is_err() || !*leader.borrow_and_update() {
                    return;
                }
            }
        };
        tokio::select! {
            ended = &mut task => match ended {
                Ok(Ok(())) => Term::Shutdown,
                Ok(Err(e)) => Term::Failed(e),
                Err(e) => Term::Failed(Error::ControllersPanicked(e.to_string())),
            },
            () = shutdown => {
                let _ = stop.send(());
                match tokio::time::timeout(STOP_CONTROLLERS, &mut task).await {
                    Ok(Ok(Err(e))) => Term::Failed(e),
                    Ok(_) => Term::Shutdown,
                    Err(_) => {
                        warn!("the controllers did not stop within {STOP_CONTROLLERS:?}; aborting them");
                        task.abort();
                        Term::Shutdown
                    }
                }
            },
            () = lost => {
                task.abort();
                Term::Lost
            },
        }
    }
}

/// Closes the election: dropping the channel makes the Lease task give the Lease up
/// (bounded); returns `result`.
async fn give_up(
    leader: tokio::sync::watch::Receiver<bool>,
    lease_task: tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
    result: Result<(), Error>,
) -> Result<(), Error> {
    drop(leader);
    match tokio::time::timeout(RELEASE_LEASE, lease_task).await {
        Ok(Ok(Ok(_))) => info!("gave the leader Lease up"),
        Ok(Ok(Err(e))) => warn!(error = %e, "cannot give the leader Lease up"),
        Ok(Err(e)) => warn!(error = %e, "the leader election task failed"),
        Err(_) => warn!("giving the leader Lease up took longer than {RELEASE_LEASE:?}"),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_replica_writes_the_lease_as_its_own_field_manager() {
        let (a, b) = (field_manager("ccm-0_1a2b"), field_manager("ccm-1_3c4d"));
        assert_eq!(a, "kuberaya-ccm-ccm-0_1a2b");
        assert_ne!(a, b);
        let long = field_manager(&"x".repeat(300));
        assert_eq!(long.len(), MAX_FIELD_MANAGER_LEN);
        assert!(long.starts_with(FIELD_MANAGER));
    }
}

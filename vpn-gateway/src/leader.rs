//! One writer among replicas (issue 22). Every replica serves the same peers at once, but
//! only the holder of the gateway's Lease writes: `VpnPeer` and `VpnAccessPolicy` status
//! (where address allocation becomes durable) and the gateway Service's annotations. The
//! others follow what it wrote: a follower serves a peer only once its status grants it an
//! address ([`crate::peers::Granted`]), so a peer has one address whichever replica it
//! reaches. Static files have no Lease and no followers: every replica decides alone, from
//! the same files.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;

/// The Lease's name in the gateway's namespace (`deploy/gateway`'s Role names it).
pub const DEFAULT_LEASE_NAME: &str = "kuberaya-gateway";
/// How long the Lease holds without renewal: a dead leader's writes stop for at most this
/// long (new peers wait for their status that long; served peers are not affected).
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// Renew this long before the Lease would expire.
const RENEW_GRACE: Duration = Duration::from_secs(5);
/// The API server's limit on a field manager's length.
const MAX_FIELD_MANAGER_LEN: usize = 128;

/// A replica's identity: `$POD_NAME` (else `$HOSTNAME`, else `kuberaya-gateway`) and the pid.
pub fn default_identity() -> String {
    format!(
        "{}_{}",
        std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "kuberaya-gateway".into()),
        std::process::id()
    )
}

/// This replica's field manager of the Lease: one per identity, as kube-lease-manager asks
/// (two replicas grabbing a free Lease at once conflict only as different managers).
fn field_manager(identity: &str) -> String {
    format!("kuberaya-gateway-{identity}")
        .chars()
        .take(MAX_FIELD_MANAGER_LEN)
        .collect()
}

/// Whether this replica leads now, kept current by the Lease task; dropping it gives the
/// Lease up (bounded by the task itself).
pub struct Leadership {
    pub leading: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
}

impl Leadership {
    /// Stands for `namespace/name` as `identity`.
    pub async fn elect(client: Client, namespace: &str, name: &str, identity: &str) -> crate::Result<Leadership> {
        let manager = LeaseManagerBuilder::new(client, name)
            .with_namespace(namespace)
            .with_identity(identity)
            .with_duration(LEASE_DURATION.as_secs())
            .with_grace(RENEW_GRACE.as_secs())
            .with_field_manager(field_manager(identity))
            .build()
            .await
            .map_err(|e| crate::Error::Config(format!("leader election on {namespace}/{name}: {e}")))?;
        let (leading, task) = manager.watch().await;
        Ok(Leadership { leading, task })
    }

    /// A replica that always leads (static files, or a single writer by configuration).
    pub fn alone() -> watch::Receiver<bool> {
        // The sender is dropped: receivers keep reading `true`, and `changed()` ends.
        watch::channel(true).1
    }

    /// Gives the Lease up (within `within`), so another replica leads at once.
    pub async fn release(self, within: Duration) {
        let Leadership { leading, task } = self;
        drop(leading);
        match tokio::time::timeout(within, task).await {
            Ok(Ok(Ok(_))) => tracing::info!("gave the gateway Lease up"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "cannot give the gateway Lease up"),
            Ok(Err(e)) => tracing::warn!(error = %e, "the gateway's election task failed"),
            Err(_) => tracing::warn!("giving the gateway Lease up took longer than {within:?}"),
        }
    }
}

/// Waits until `leading` says this replica leads; false when the election has ended.
pub async fn until_leading(leading: &mut watch::Receiver<bool>) -> bool {
    loop {
        if *leading.borrow_and_update() {
            return true;
        }
        if leading.changed().await.is_err() {
            return *leading.borrow();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_replica_writes_the_lease_as_its_own_field_manager() {
        let (a, b) = (field_manager("gw-0_1"), field_manager("gw-1_2"));
        assert_eq!(a, "kuberaya-gateway-gw-0_1");
        assert_ne!(a, b);
        assert_eq!(field_manager(&"x".repeat(300)).len(), MAX_FIELD_MANAGER_LEN);
    }

    #[tokio::test]
    async fn a_replica_alone_always_leads() {
        let mut l = Leadership::alone();
        assert!(until_leading(&mut l).await);
        assert!(l.changed().await.is_err());
        assert!(*l.borrow());
    }

    #[tokio::test]
    async fn until_leading_waits_for_the_lease() {
        let (tx, mut rx) = watch::channel(false);
        let waiter = tokio::spawn(async move { until_leading(&mut rx).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        tx.send(true).unwrap();
        assert!(waiter.await.unwrap());
        // An election that ended without leading.
        let (tx, mut rx) = watch::channel(false);
        drop(tx);
        assert!(!until_leading(&mut rx).await);
    }
}

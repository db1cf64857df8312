//! Waiting for the gateway to accept (or reject) a generation of a peer: a watch on the
//! one VpnPeer (`kube::runtime::wait::await_condition`), so the answer shows as soon as
//! the gateway writes it.

use std::time::Duration;

use anyhow::{anyhow, bail};
use kube::Api;
use kube::runtime::wait::{Condition, await_condition};
use kube::runtime::{wait, watcher};
use kuberaya_gateway::crd::VpnPeer;

use super::config::PeerAddresses;
use super::state::{Acceptance, acceptance, address_v6};
use crate::kube::api_error;
use crate::output::Progress;

/// Whether the gateway's status is about an older generation than `generation`.
fn stale(p: &VpnPeer, generation: Option<i64>) -> bool {
    match (generation, p.status.as_ref().and_then(|s| s.observed_generation)) {
        (Some(want), Some(seen)) => seen < want,
        _ => false,
    }
}

/// The gateway has answered generation `generation` (or a later one): accepted with an
/// address, or rejected. A peer that is gone is settled too: nothing is left to wait for.
pub(super) fn settled(generation: Option<i64>) -> impl Condition<VpnPeer> {
    move |p: Option<&VpnPeer>| match p {
        None => true,
        Some(p) => {
            !stale(p, generation)
                && matches!(
                    acceptance(p),
                    Acceptance::Accepted { address: Some(_) } | Acceptance::Rejected { .. }
                )
        }
    }
}

/// A failed watch as one line, the way a failed read of the peer is told.
fn watch_error(e: wait::Error) -> anyhow::Error {
    let wait::Error::ProbeFailed(e) = e;
    match e {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            api_error(e, "reading the peer")
        }
        e => anyhow!("reading the peer: {}", crate::kube::one_line(&e)),
    }
}

/// Wait until the gateway accepts generation `generation` (or later) of the peer; its
/// tunnel addresses.
pub(super) async fn wait_accepted(
    api: &Api<VpnPeer>,
    name: &str,
    generation: Option<i64>,
    timeout_s: u64,
) -> anyhow::Result<PeerAddresses> {
    let progress = Progress::start(format!("waiting for the gateway to accept peer {name}"));
    let answer = await_condition(api.clone(), name, settled(generation));
    let peer = match tokio::time::timeout(Duration::from_secs(timeout_s), answer).await {
        Ok(Ok(Some(p))) => p,
        Ok(Ok(None)) => bail!("reading the peer: peer {name} was deleted while waiting for the gateway"),
        Ok(Err(e)) => return Err(watch_error(e)),
        Err(_) => {
            progress.finish("timed out");
            bail!(
                "the gateway did not accept peer {name} within {timeout_s}s; is it running? (kubectl -n kuberaya-system get pods,svc)"
            );
        }
    };
    match acceptance(&peer) {
        Acceptance::Accepted { address: Some(a) } => {
            progress.finish("accepted");
            Ok(PeerAddresses {
                v4: a,
                v6: address_v6(&peer),
            })
        }
        Acceptance::Rejected { reason, message } => {
            progress.finish("rejected");
            bail!("the gateway rejected peer {name}: {reason}: {message}");
        }
        Acceptance::Accepted { address: None } | Acceptance::Pending => {
            unreachable!("`settled` holds only for an answer")
        }
    }
}

//! Waiting for the gateway to accept (or reject) a generation of a peer.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::bail;
use kube::Api;
use kuberaya_gateway::crd::VpnPeer;

use super::state::{Acceptance, acceptance};
use crate::kube::api_error;
use crate::output::Progress;

/// Wait until the gateway accepts generation `generation` (or later) of the peer.
pub(super) async fn wait_accepted(
    api: &Api<VpnPeer>,
    name: &str,
    generation: Option<i64>,
    timeout_s: u64,
) -> anyhow::Result<Ipv4Addr> {
    let progress = Progress::start(format!("waiting for the gateway to accept peer {name}"));
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    loop {
        let p = api.get(name).await.map_err(|e| api_error(e, "reading the peer"))?;
        let stale = match (generation, p.status.as_ref().and_then(|s| s.observed_generation)) {
            (Some(want), Some(seen)) => seen < want,
            _ => false,
        };
        if !stale {
            match acceptance(&p) {
                Acceptance::Accepted { address: Some(a) } => {
                    progress.finish("accepted");
                    return Ok(a);
                }
                Acceptance::Rejected { reason, message } => {
                    progress.finish("rejected");
                    bail!("the gateway rejected peer {name}: {reason}: {message}");
                }
                _ => {}
            }
        }
        if Instant::now() >= deadline {
            progress.finish("timed out");
            bail!(
                "the gateway did not accept peer {name} within {timeout_s}s; is it running? (kubectl -n kuberaya-system get pods,svc)"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

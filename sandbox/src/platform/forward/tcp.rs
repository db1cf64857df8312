//! TCP rules: accept, filter, pick a backend, proxy both ways with half-close.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::family::Family;
use super::slot::{RuleConfig, RuleShared};
use super::{ForwarderSettings, source_allowed};

/// Buffer per direction of a proxied connection.
const COPY_BUF: usize = 32 * 1024;
/// Pause after a failed `accept` (e.g. out of file descriptors) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves one public address (of `family`) of a TCP rule.
pub(crate) async fn serve(
    listener: TcpListener,
    family: Family,
    shared: Arc<RuleShared>,
    settings: ForwarderSettings,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(listen = ?listener.local_addr().ok(), error = %e, "accept failed");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let config = shared.config();
        let client_ip = peer.ip().to_canonical();
        if !source_allowed(&config.listener.allowed_sources, client_ip) {
            tracing::debug!(rule = %config.listener.rule, %peer, "client not in allowed_sources: refused");
            refuse(stream);
            continue;
        }
        tasks.spawn(proxy(
            stream,
            peer,
            family,
            config,
            Arc::clone(&shared),
            settings.connect_timeout,
            cancel.clone(),
        ));
    }
}

/// Closes with a reset (SO_LINGER 0).
fn refuse(stream: TcpStream) {
    let _ = stream.set_zero_linger();
}

async fn proxy(
    mut client: TcpStream,
    peer: SocketAddr,
    family: Family,
    config: Arc<RuleConfig>,
    shared: Arc<RuleShared>,
    connect_timeout: Duration,
    cancel: CancellationToken,
) {
    let client_ip: IpAddr = peer.ip().to_canonical();
    let rule = &config.listener.rule;
    let mut candidates = config.eligible(family);
    let mut retry_after = None;
    let (mut upstream, _open) = loop {
        let Some(i) = shared.pick(&config, &candidates, client_ip, retry_after) else {
            tracing::debug!(%rule, %peer, "no healthy backend: refused");
            refuse(client);
            return;
        };
        let slot = Arc::clone(&candidates[i]);
        // Eligible for `family` means it has an address of it.
        let Some(backend) = slot.target(family) else {
            refuse(client);
            return;
        };
        let open = slot.open_guard();
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            connected = timeout(connect_timeout, TcpStream::connect(backend)) => connected,
        };
        match connected {
            Ok(Ok(upstream)) => break (upstream, open),
            Ok(Err(e)) => {
                tracing::debug!(%rule, %peer, %backend, error = %e, "backend connect failed");
            }
            Err(_) => {
                tracing::debug!(%rule, %peer, %backend, "backend connect timed out");
            }
        }
        if retry_after.is_some() {
            refuse(client);
            return;
        }
        candidates.remove(i);
        retry_after = Some(i);
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let copied = tokio::select! {
        _ = cancel.cancelled() => return,
        copied = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, COPY_BUF, COPY_BUF) => copied,
    };
    match copied {
        Ok((up, down)) => {
            tracing::trace!(%rule, %peer, up, down, "connection closed");
        }
        Err(e) => {
            tracing::debug!(%rule, %peer, error = %e, "connection ended with an error");
            // Pass the failure on as a reset rather than a clean close.
            let _ = client.set_zero_linger();
            let _ = upstream.set_zero_linger();
        }
    }
}

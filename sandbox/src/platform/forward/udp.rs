//! UDP rules: one listen socket; per client address a flow with its own connected upstream
//! socket to the chosen backend; replies leave through the listen socket.
//!
//! No allocation per packet: the listen loop owns one 64 KiB buffer, and reply tasks use
//! one 64 KiB buffer per worker thread (a reply is received and sent without an `.await`
//! in between, so the buffer is never held across a suspension point).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::family::Family;
use super::slot::{BackendSlot, OpenGuard, RuleConfig, RuleShared};
use super::{ForwarderSettings, source_allowed};

/// Largest UDP payload, plus room.
const BUF_LEN: usize = 64 * 1024;
/// Replies drained per wake-up of a flow before it yields to other tasks.
const MAX_DRAIN: usize = 64;
/// At most one warning of a kind (flow table full, no socket) per this period and rule.
const WARN_EVERY: Duration = Duration::from_secs(10);

thread_local! {
    static REPLY_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; BUF_LEN].into_boxed_slice());
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Arc<Flow>>>>;

struct Flow {
    upstream: UdpSocket,
    slot: Arc<BackendSlot>,
    /// The backend address the flow goes to.
    backend: SocketAddr,
    /// Milliseconds since the rule's epoch of the last packet either way.
    last_seen: AtomicU64,
    cancel: CancellationToken,
    _open: OpenGuard,
}

impl Flow {
    fn touch(&self, epoch: Instant) {
        self.last_seen.store(millis_since(epoch), Ordering::Relaxed);
    }
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn lock(flows: &Flows) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<Flow>>> {
    flows.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves one public address (of `family`) of a UDP rule on `socket` until `cancel`.
pub(crate) async fn serve(
    socket: Arc<UdpSocket>,
    family: Family,
    shared: Arc<RuleShared>,
    settings: ForwarderSettings,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let epoch = Instant::now();
    let flows: Flows = Arc::default();
    let mut buf = vec![0u8; BUF_LEN].into_boxed_slice();
    let mut generation = shared.generation();
    let mut config = shared.config();
    let mut last_full_warning: Option<Instant> = None;
    let mut last_socket_warning: Option<Instant> = None;
    loop {
        let received = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            received = socket.recv_from(&mut buf) => received,
        };
        let (len, client) = match received {
            Ok(received) => received,
            Err(e) => {
                tracing::debug!(listen = ?socket.local_addr().ok(), error = %e, "UDP receive failed");
                continue;
            }
        };
        if shared.generation() != generation {
            generation = shared.generation();
            config = shared.config();
        }
        if !source_allowed(&config.listener.allowed_sources, client.ip().to_canonical()) {
            tracing::trace!(rule = %config.listener.rule, %client, "client not in allowed_sources: dropped");
            continue;
        }
        let existing = lock(&flows).get(&client).cloned();
        let flow = match existing {
            Some(flow) if flow.slot.in_rotation() => flow,
            existing => {
                if let Some(stale) = existing {
                    // Its backend left the rotation: UDP has no connection to keep, so the
                    // client moves to a backend that answers.
                    remove_flow(&flows, client, &stale);
                }
                if lock(&flows).len() >= settings.max_udp_flows {
                    if last_full_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                        last_full_warning = Some(Instant::now());
                        tracing::warn!(
                            rule = %config.listener.rule,
                            max = settings.max_udp_flows,
                            "UDP flow table full: dropping packets of new clients"
                        );
                    }
                    continue;
                }
                let flow = match open_flow(&config, family, &shared, client, &cancel) {
                    Ok(Some(flow)) => flow,
                    Ok(None) => continue,
                    Err(e) => {
                        // E.g. out of file descriptors under a flood: say so, not per packet.
                        if last_socket_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                            last_socket_warning = Some(Instant::now());
                            tracing::warn!(rule = %config.listener.rule, error = %e, "cannot open UDP upstream socket: dropping packets of new clients");
                        }
                        continue;
                    }
                };
                lock(&flows).insert(client, Arc::clone(&flow));
                tasks.spawn(reply_loop(
                    Arc::clone(&flow),
                    client,
                    Arc::clone(&socket),
                    Arc::clone(&flows),
                    settings.udp_idle_timeout,
                    epoch,
                ));
                flow
            }
        };
        flow.touch(epoch);
        if let Err(e) = flow.upstream.send(&buf[..len]).await {
            tracing::debug!(%client, backend = %flow.backend, error = %e, "UDP send to backend failed");
        }
    }
    for (_, flow) in lock(&flows).drain() {
        flow.cancel.cancel();
    }
}

fn remove_flow(flows: &Flows, client: SocketAddr, flow: &Arc<Flow>) {
    let mut map = lock(flows);
    if map.get(&client).is_some_and(|f| Arc::ptr_eq(f, flow)) {
        map.remove(&client);
    }
    drop(map);
    flow.cancel.cancel();
}

/// A new flow for `client` to a backend picked now; `None` when no backend is eligible.
fn open_flow(
    config: &RuleConfig,
    family: Family,
    shared: &RuleShared,
    client: SocketAddr,
    cancel: &CancellationToken,
) -> std::io::Result<Option<Arc<Flow>>> {
    let candidates = config.eligible(family);
    let Some(i) = shared.pick(config, &candidates, client.ip().to_canonical(), None) else {
        tracing::debug!(rule = %config.listener.rule, %client, "no healthy backend: dropped");
        return Ok(None);
    };
    let slot = Arc::clone(&candidates[i]);
    // Eligible for `family` means it has an address of it.
    let Some(backend) = slot.target(family) else {
        return Ok(None);
    };
    let upstream = connect_upstream(backend)?;
    tracing::trace!(rule = %config.listener.rule, %client, %backend, "new UDP flow");
    Ok(Some(Arc::new(Flow {
        upstream,
        backend,
        last_seen: AtomicU64::new(0),
        cancel: cancel.child_token(),
        _open: slot.open_guard(),
        slot,
    })))
}

fn connect_upstream(backend: SocketAddr) -> std::io::Result<UdpSocket> {
    let local: SocketAddr = if backend.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(local)?;
    socket.connect(backend)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Forwards the backend's replies of one flow to its client until the flow is idle for
/// `idle` or cancelled, then removes it.
async fn reply_loop(
    flow: Arc<Flow>,
    client: SocketAddr,
    listen: Arc<UdpSocket>,
    flows: Flows,
    idle: Duration,
    epoch: Instant,
) {
    let expiry = |flow: &Flow| epoch + Duration::from_millis(flow.last_seen.load(Ordering::Relaxed)) + idle;
    let sleep = tokio::time::sleep_until(expiry(&flow));
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = flow.cancel.cancelled() => break,
            _ = &mut sleep => {
                let deadline = expiry(&flow);
                if Instant::now() >= deadline {
                    tracing::trace!(%client, backend = %flow.backend, "UDP flow expired");
                    break;
                }
                sleep.as_mut().reset(deadline);
            }
            ready = flow.upstream.readable() => {
                if let Err(e) = ready {
                    tracing::debug!(%client, backend = %flow.backend, error = %e, "UDP upstream failed");
                    break;
                }
                forward_replies(&flow, client, &listen, epoch);
            }
        }
    }
    remove_flow(&flows, client, &flow);
}

fn forward_replies(flow: &Flow, client: SocketAddr, listen: &UdpSocket, epoch: Instant) {
    REPLY_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        for _ in 0..MAX_DRAIN {
            match flow.upstream.try_recv(&mut buf) {
                Ok(len) => {
                    flow.touch(epoch);
                    if let Err(e) = listen.try_send_to(&buf[..len], client) {
                        tracing::trace!(%client, error = %e, "UDP reply dropped");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // E.g. ICMP port unreachable from the backend: reported once, go on.
                    tracing::debug!(%client, backend = %flow.backend, error = %e, "UDP receive from backend failed");
                }
            }
        }
    });
}

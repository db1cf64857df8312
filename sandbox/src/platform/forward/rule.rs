//! One running rule (listener): its bound sockets' tasks (one per public IP of the LB),
//! its configuration swapped on updates, and its backends' health-check tasks; the state
//! they share is in [`super::slot`].

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::{TcpListener, UdpSocket};
use tokio::time::{Duration, MissedTickBehavior, interval, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::family::Family;
use super::health::{HealthTracker, probe};
use super::slot::{BackendSlot, RuleConfig, RuleShared};
use super::{ForwardError, ForwarderSettings, HealthCheck, Listener, Protocol};
use super::{tcp, udp};

/// How long stopping a rule waits for its tasks to end before giving up on them (they have
/// all been cancelled; this only bounds a misbehaving one).
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A running health-check task of one backend slot.
struct CheckTask {
    slot: Arc<BackendSlot>,
    check: HealthCheck,
    cancel: CancellationToken,
}

/// One bound public address of a rule: its serving task stops with `cancel`, and with it
/// the connections and flows that came in through it.
struct ListenSocket {
    addr: SocketAddr,
    cancel: CancellationToken,
}

/// One running rule.
pub(crate) struct RuleRuntime {
    pub protocol: Protocol,
    shared: Arc<RuleShared>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    checks: Mutex<Vec<CheckTask>>,
    sockets: Mutex<Vec<ListenSocket>>,
}

impl RuleRuntime {
    /// Binds every address of `listener.listen` and starts forwarding and health checks.
    /// Fails (nothing left running) when one address cannot be bound.
    pub(crate) async fn start(
        listener: Listener,
        parent: &CancellationToken,
        settings: &ForwarderSettings,
    ) -> Result<Self, ForwardError> {
        let protocol = listener.protocol;
        let backends = build_slots(&listener, None);
        let shared = Arc::new(RuleShared::new(RuleConfig { listener, backends }));
        let rule = Self {
            protocol,
            shared,
            cancel: parent.child_token(),
            tasks: TaskTracker::new(),
            checks: Mutex::new(Vec::new()),
            sockets: Mutex::new(Vec::new()),
        };
        // Dropping the rule on an error cancels what did start.
        rule.sync_sockets(settings)?;
        rule.sync_checks();
        Ok(rule)
    }

    /// The public addresses bound now.
    pub(crate) fn addresses(&self) -> Vec<SocketAddr> {
        self.lock_sockets().iter().map(|s| s.addr).collect()
    }

    fn lock_sockets(&self) -> std::sync::MutexGuard<'_, Vec<ListenSocket>> {
        self.sockets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Swaps in `listener`'s settings, keeping the sockets of addresses that remain, open
    /// connections through them, and the health of backends that remain. An address that
    /// cannot be bound is an error; the rule keeps serving on the others.
    pub(crate) fn update(&self, listener: Listener, settings: &ForwarderSettings) -> Result<(), ForwardError> {
        let old = self.shared.config();
        if old.listener == listener {
            return Ok(());
        }
        let backends = build_slots(&listener, Some(&old));
        for slot in &old.backends {
            if !backends.iter().any(|b| Arc::ptr_eq(b, slot)) {
                slot.retired.store(true, Ordering::Relaxed);
            }
        }
        self.shared.swap(Arc::new(RuleConfig { listener, backends }));
        self.sync_checks();
        tracing::info!(protocol = ?self.protocol, listen = ?self.addresses(), "listener updated");
        self.sync_sockets(settings)
    }

    /// Makes the bound sockets match the config's addresses: closes the ones no longer
    /// listed (cutting what came in through them), binds the new ones.
    fn sync_sockets(&self, settings: &ForwarderSettings) -> Result<(), ForwardError> {
        let wanted = self.shared.config().listener.listen.clone();
        let mut sockets = self.lock_sockets();
        sockets.retain(|s| {
            let keep = wanted.contains(&s.addr);
            if !keep {
                s.cancel.cancel();
                tracing::info!(protocol = ?self.protocol, listen = %s.addr, "listener address closed");
            }
            keep
        });
        let mut first_error = None;
        for addr in wanted {
            if sockets.iter().any(|s| s.addr == addr) {
                continue;
            }
            match self.serve_on(addr, settings) {
                Ok(cancel) => {
                    tracing::info!(protocol = ?self.protocol, listen = %addr, "listener started");
                    sockets.push(ListenSocket { addr, cancel });
                }
                Err(source) => {
                    first_error.get_or_insert(ForwardError::Bind {
                        protocol: self.protocol,
                        addr,
                        source,
                    });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Binds `addr` and spawns its serving task; the token stops it.
    fn serve_on(&self, addr: SocketAddr, settings: &ForwarderSettings) -> std::io::Result<CancellationToken> {
        let cancel = self.cancel.child_token();
        let family = Family::of(addr);
        match self.protocol {
            Protocol::Tcp => {
                let socket = TcpListener::from_std(bind(addr, Protocol::Tcp)?.into())?;
                self.tasks.spawn(tcp::serve(
                    socket,
                    family,
                    Arc::clone(&self.shared),
                    settings.clone(),
                    cancel.clone(),
                    self.tasks.clone(),
                ));
            }
            Protocol::Udp => {
                let socket = UdpSocket::from_std(bind(addr, Protocol::Udp)?.into())?;
                self.tasks.spawn(udp::serve(
                    Arc::new(socket),
                    family,
                    Arc::clone(&self.shared),
                    settings.clone(),
                    cancel.clone(),
                    self.tasks.clone(),
                ));
            }
        }
        Ok(cancel)
    }

    /// Makes the running health-check tasks match the current config.
    fn sync_checks(&self) {
        let config = self.shared.config();
        let check = &config.listener.health_check;
        let mut checks = self.checks.lock().unwrap_or_else(PoisonError::into_inner);
        let (keep, stop): (Vec<_>, Vec<_>) = checks
            .drain(..)
            .partition(|t| &t.check == check && config.backends.iter().any(|b| Arc::ptr_eq(b, &t.slot)));
        for task in stop {
            task.cancel.cancel();
        }
        *checks = keep;
        for slot in &config.backends {
            if checks.iter().any(|t| Arc::ptr_eq(&t.slot, slot)) {
                continue;
            }
            let cancel = self.cancel.child_token();
            self.tasks
                .spawn(run_checks(Arc::clone(slot), check.clone(), cancel.clone()));
            checks.push(CheckTask {
                slot: Arc::clone(slot),
                check: check.clone(),
                cancel,
            });
        }
    }

    pub(crate) fn config(&self) -> Arc<RuleConfig> {
        self.shared.config()
    }

    /// Stops accepting, cuts open connections and flows, stops health checks, and waits
    /// for every task (so the socket is closed when this returns).
    pub(crate) async fn stop(&self) {
        self.cancel.cancel();
        self.tasks.close();
        let listen = self.addresses();
        if tokio::time::timeout(STOP_GRACE, self.tasks.wait()).await.is_err() {
            tracing::warn!(
                protocol = ?self.protocol,
                ?listen,
                remaining = self.tasks.len(),
                "listener tasks did not stop in time"
            );
        }
        tracing::info!(protocol = ?self.protocol, ?listen, "listener stopped");
    }
}

impl Drop for RuleRuntime {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The slots for `listener`'s backends: a backend that remains (same VM, IPs, checked
/// address and port) keeps its slot (health and open count); one whose port changed keeps
/// its health.
fn build_slots(listener: &Listener, old: Option<&RuleConfig>) -> Vec<Arc<BackendSlot>> {
    let check_ipv6 = listener.check_ipv6;
    listener
        .backends
        .iter()
        .map(|b| {
            let previous = old.and_then(|old| old.backends.iter().find(|s| s.same_as(b, check_ipv6)));
            match previous {
                Some(slot) if slot.addr.port() == listener.private_port => {
                    slot.set_running(b.running);
                    Arc::clone(slot)
                }
                Some(slot) => Arc::new(BackendSlot::new(
                    b,
                    listener.private_port,
                    check_ipv6,
                    slot.tracker_snapshot(),
                )),
                None => Arc::new(BackendSlot::new(
                    b,
                    listener.private_port,
                    check_ipv6,
                    HealthTracker::new(),
                )),
            }
        })
        .collect()
}

/// A non-blocking socket bound to `addr` (TCP: listening). An IPv6 address is bound with
/// `IPV6_FREEBIND`, so a `local` route for its range on `lo` is all the host needs (the
/// sandbox's IPv6 ranges are not assigned to any interface; IPv6 loopback has only `::1`).
fn bind(addr: SocketAddr, protocol: Protocol) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let (kind, proto) = match protocol {
        Protocol::Tcp => (Type::STREAM, socket2::Protocol::TCP),
        Protocol::Udp => (Type::DGRAM, socket2::Protocol::UDP),
    };
    let socket = Socket::new(Domain::for_address(addr), kind, Some(proto))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_freebind_v6(true)?;
    }
    if protocol == Protocol::Tcp {
        socket.set_reuse_address(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    if protocol == Protocol::Tcp {
        socket.listen(1024)?;
    }
    Ok(socket)
}

/// Checks `slot` with `check` every interval (the first at once) until `cancel`.
pub(crate) async fn run_checks(slot: Arc<BackendSlot>, check: HealthCheck, cancel: CancellationToken) {
    let mut ticker = interval(check.interval.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let success = match slot.check_ip {
            // Stopped, or an IPv6-only LB's backend without `private_ipv6`.
            _ if !slot.running() => false,
            None => false,
            Some(ip) => tokio::select! {
                _ = cancel.cancelled() => return,
                result = timeout(check.timeout, probe(&check.probe, ip)) => match result {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        tracing::trace!(vm_id = %slot.vm_id, %ip, error = %e, "health check failed");
                        false
                    }
                    Err(_) => {
                        tracing::trace!(vm_id = %slot.vm_id, %ip, "health check timed out");
                        false
                    }
                },
            },
        };
        slot.record(success, &check);
    }
}

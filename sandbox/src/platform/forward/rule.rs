//! One running rule (listener): its bound sockets' tasks (one per public IP of the LB),
//! its swappable configuration, its backends' health and its health-check tasks.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::balance::{self, Candidate};
use super::family::{self, Family};
use super::health::{self, HealthTracker};
use super::{ForwardError, ForwarderSettings, HealthCheck, HealthState, Listener, Protocol};
use super::{tcp, udp};

/// How long stopping a rule waits for its tasks to end before giving up on them (they have
/// all been cancelled; this only bounds a misbehaving one).
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// One backend of one rule: where to forward, whether it may get new connections, and how
/// many it has.
#[derive(Debug)]
pub(crate) struct BackendSlot {
    pub vm_id: String,
    pub ip: IpAddr,
    pub ipv6: Option<Ipv6Addr>,
    /// `private_ip:private_port`.
    pub addr: SocketAddr,
    /// Where the health checks go; `None`: nowhere (they fail).
    pub check_ip: Option<IpAddr>,
    running: AtomicBool,
    tracker: Mutex<HealthTracker>,
    /// Cache of `tracker.in_rotation()`, read on every new connection and UDP packet.
    health_ok: AtomicBool,
    /// No longer among the rule's backends (after an update).
    retired: AtomicBool,
    open: AtomicUsize,
}

impl BackendSlot {
    fn new(backend: &super::Backend, port: u16, check_ipv6: bool, tracker: HealthTracker) -> Self {
        let (ip, ipv6, running) = (backend.private_ip, backend.private_ipv6, backend.running);
        let slot = Self {
            vm_id: backend.vm_id.clone(),
            ip,
            ipv6,
            addr: SocketAddr::new(ip, port),
            check_ip: family::check_target(check_ipv6, ip, ipv6),
            running: AtomicBool::new(running),
            health_ok: AtomicBool::new(tracker.in_rotation()),
            tracker: Mutex::new(tracker),
            retired: AtomicBool::new(false),
            open: AtomicUsize::new(0),
        };
        if !running {
            slot.set_running(false);
        }
        slot
    }

    pub(crate) fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// Where a client of the `family` public address goes; `None`: not to this backend.
    pub(crate) fn target(&self, family: Family) -> Option<SocketAddr> {
        family::target(family, self.ip, self.ipv6).map(|ip| SocketAddr::new(ip, self.addr.port()))
    }

    /// The same backend (VM and addresses) as `backend` checked as `check_ipv6` says.
    fn same_as(&self, backend: &super::Backend, check_ipv6: bool) -> bool {
        self.vm_id == backend.vm_id
            && self.ip == backend.private_ip
            && self.ipv6 == backend.private_ipv6
            && self.check_ip == family::check_target(check_ipv6, backend.private_ip, backend.private_ipv6)
    }

    fn set_running(&self, running: bool) {
        let was = self.running.swap(running, Ordering::Relaxed);
        if !running {
            let mut tracker = self.lock_tracker();
            if was || tracker.state() != HealthState::Unhealthy {
                tracing::info!(vm_id = %self.vm_id, addr = %self.addr, "backend VM stopped: out of rotation");
            }
            tracker.mark_down();
            self.health_ok.store(false, Ordering::Relaxed);
        }
    }

    /// May get a new connection or flow.
    pub(crate) fn in_rotation(&self) -> bool {
        !self.retired.load(Ordering::Relaxed)
            && self.running.load(Ordering::Relaxed)
            && self.health_ok.load(Ordering::Relaxed)
    }

    pub(crate) fn state(&self) -> HealthState {
        if self.running() {
            self.lock_tracker().state()
        } else {
            HealthState::Unhealthy
        }
    }

    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts one open connection or flow until the guard drops.
    pub(crate) fn open_guard(self: &Arc<Self>) -> OpenGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(Arc::clone(self))
    }

    pub(crate) fn record(&self, success: bool, check: &HealthCheck) {
        let mut tracker = self.lock_tracker();
        let before = tracker.state();
        let after = tracker.record(
            success && self.running(),
            check.healthy_threshold,
            check.unhealthy_threshold,
        );
        self.health_ok.store(tracker.in_rotation(), Ordering::Relaxed);
        drop(tracker);
        if before != after {
            tracing::info!(vm_id = %self.vm_id, addr = %self.addr, ?before, ?after, "backend health changed");
        }
    }

    fn lock_tracker(&self) -> std::sync::MutexGuard<'_, HealthTracker> {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn tracker_snapshot(&self) -> HealthTracker {
        self.lock_tracker().clone()
    }
}

/// Decrements its backend's open count on drop.
#[derive(Debug)]
pub(crate) struct OpenGuard(Arc<BackendSlot>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A rule's configuration as the data path sees it; replaced as a whole on update.
#[derive(Debug)]
pub(crate) struct RuleConfig {
    pub listener: Listener,
    pub backends: Vec<Arc<BackendSlot>>,
}

impl RuleConfig {
    /// The backends that may get a new connection from a client of the `family` public
    /// address now (in rotation, and with an address of that family).
    pub(crate) fn eligible(&self, family: Family) -> Vec<Arc<BackendSlot>> {
        self.backends
            .iter()
            .filter(|b| b.in_rotation() && b.target(family).is_some())
            .cloned()
            .collect()
    }
}

/// What the data-path tasks of a rule share with its owner.
#[derive(Debug)]
pub(crate) struct RuleShared {
    config: RwLock<Arc<RuleConfig>>,
    /// Bumped on every config swap, so hot loops can cache the config.
    generation: AtomicU64,
    turn: AtomicUsize,
}

impl RuleShared {
    pub(crate) fn config(&self) -> Arc<RuleConfig> {
        Arc::clone(&self.config.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn swap(&self, config: Arc<RuleConfig>) -> Arc<RuleConfig> {
        let old = std::mem::replace(
            &mut *self.config.write().unwrap_or_else(PoisonError::into_inner),
            config,
        );
        self.generation.fetch_add(1, Ordering::Release);
        old
    }

    /// Picks among `candidates` for `client`; `retry_after` is the index (in the original
    /// list) of a backend that just failed and has been removed from `candidates`.
    pub(crate) fn pick(
        &self,
        config: &RuleConfig,
        candidates: &[Arc<BackendSlot>],
        client: IpAddr,
        retry_after: Option<usize>,
    ) -> Option<usize> {
        let view: Vec<Candidate<'_>> = candidates
            .iter()
            .map(|b| Candidate {
                key: &b.vm_id,
                open: b.open(),
            })
            .collect();
        let turn = match retry_after {
            Some(failed) => balance::retry_turn(failed),
            None => self.turn.fetch_add(1, Ordering::Relaxed),
        };
        balance::pick(config.listener.algorithm, &view, client, turn)
    }
}

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
        let shared = Arc::new(RuleShared {
            config: RwLock::new(Arc::new(RuleConfig { listener, backends })),
            generation: AtomicU64::new(0),
            turn: AtomicUsize::new(0),
        });
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
                .spawn(health::run_checks(Arc::clone(slot), check.clone(), cancel.clone()));
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

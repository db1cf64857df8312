//! One running rule (listener): its bound socket's task, its swappable configuration, its
//! backends' health and its health-check tasks.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use tokio::net::{TcpSocket, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::balance::{self, Candidate};
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
    /// `private_ip:private_port`.
    pub addr: SocketAddr,
    running: AtomicBool,
    tracker: Mutex<HealthTracker>,
    /// Cache of `tracker.in_rotation()`, read on every new connection and UDP packet.
    health_ok: AtomicBool,
    /// No longer among the rule's backends (after an update).
    retired: AtomicBool,
    open: AtomicUsize,
}

impl BackendSlot {
    fn new(vm_id: String, ip: IpAddr, port: u16, running: bool, tracker: HealthTracker) -> Self {
        let slot = Self {
            vm_id,
            ip,
            addr: SocketAddr::new(ip, port),
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
    /// The backends that may get a new connection now.
    pub(crate) fn eligible(&self) -> Vec<Arc<BackendSlot>> {
        self.backends.iter().filter(|b| b.in_rotation()).cloned().collect()
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

/// One running rule.
pub(crate) struct RuleRuntime {
    pub protocol: Protocol,
    pub listen: SocketAddr,
    shared: Arc<RuleShared>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    checks: Mutex<Vec<CheckTask>>,
}

impl RuleRuntime {
    /// Binds `listener.listen` and starts forwarding and health checks.
    pub(crate) async fn start(
        listener: Listener,
        parent: &CancellationToken,
        settings: &ForwarderSettings,
    ) -> Result<Self, ForwardError> {
        let protocol = listener.protocol;
        let listen = listener.listen;
        let bind_err = |source| ForwardError::Bind {
            protocol,
            addr: listen,
            source,
        };
        let backends = build_slots(&listener, None);
        let shared = Arc::new(RuleShared {
            config: RwLock::new(Arc::new(RuleConfig { listener, backends })),
            generation: AtomicU64::new(0),
            turn: AtomicUsize::new(0),
        });
        let cancel = parent.child_token();
        let tasks = TaskTracker::new();
        match protocol {
            Protocol::Tcp => {
                let socket = bind_tcp(listen).map_err(bind_err)?;
                tasks.spawn(tcp::serve(
                    socket,
                    Arc::clone(&shared),
                    settings.clone(),
                    cancel.clone(),
                    tasks.clone(),
                ));
            }
            Protocol::Udp => {
                let socket = UdpSocket::bind(listen).await.map_err(bind_err)?;
                tasks.spawn(udp::serve(
                    Arc::new(socket),
                    Arc::clone(&shared),
                    settings.clone(),
                    cancel.clone(),
                    tasks.clone(),
                ));
            }
        }
        tracing::info!(?protocol, %listen, "listener started");
        let rule = Self {
            protocol,
            listen,
            shared,
            cancel,
            tasks,
            checks: Mutex::new(Vec::new()),
        };
        rule.sync_checks();
        Ok(rule)
    }

    /// Swaps in `listener`'s settings, keeping the socket, open connections, and the health
    /// of backends that remain.
    pub(crate) fn update(&self, listener: Listener) {
        let old = self.shared.config();
        if old.listener == listener {
            return;
        }
        let backends = build_slots(&listener, Some(&old));
        for slot in &old.backends {
            if !backends.iter().any(|b| Arc::ptr_eq(b, slot)) {
                slot.retired.store(true, Ordering::Relaxed);
            }
        }
        self.shared.swap(Arc::new(RuleConfig { listener, backends }));
        self.sync_checks();
        tracing::info!(protocol = ?self.protocol, listen = %self.listen, "listener updated");
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
        if tokio::time::timeout(STOP_GRACE, self.tasks.wait()).await.is_err() {
            tracing::warn!(
                protocol = ?self.protocol,
                listen = %self.listen,
                remaining = self.tasks.len(),
                "listener tasks did not stop in time"
            );
        }
        tracing::info!(protocol = ?self.protocol, listen = %self.listen, "listener stopped");
    }
}

impl Drop for RuleRuntime {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The slots for `listener`'s backends: a backend that remains (same VM, IP and port) keeps
/// its slot (health and open count); one whose port changed keeps its health.
fn build_slots(listener: &Listener, old: Option<&RuleConfig>) -> Vec<Arc<BackendSlot>> {
    listener
        .backends
        .iter()
        .map(|b| {
            let previous = old.and_then(|old| old.backends.iter().find(|s| s.vm_id == b.vm_id && s.ip == b.private_ip));
            match previous {
                Some(slot) if slot.addr.port() == listener.private_port => {
                    slot.set_running(b.running);
                    Arc::clone(slot)
                }
                Some(slot) => Arc::new(BackendSlot::new(
                    b.vm_id.clone(),
                    b.private_ip,
                    listener.private_port,
                    b.running,
                    slot.tracker_snapshot(),
                )),
                None => Arc::new(BackendSlot::new(
                    b.vm_id.clone(),
                    b.private_ip,
                    listener.private_port,
                    b.running,
                    HealthTracker::new(),
                )),
            }
        })
        .collect()
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

//! A running rule's shared state: its backends ([`BackendSlot`]: where to forward, health,
//! open connections), its swappable configuration ([`RuleConfig`]) and what its socket
//! tasks share ([`RuleShared`]).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use super::balance::{self, Candidate};
use super::family::{self, Family};
use super::health::HealthTracker;
use super::{HealthCheck, HealthState, Listener};

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
    pub(super) retired: AtomicBool,
    open: AtomicUsize,
}

impl BackendSlot {
    pub(super) fn new(backend: &super::Backend, port: u16, check_ipv6: bool, tracker: HealthTracker) -> Self {
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
    pub(super) fn same_as(&self, backend: &super::Backend, check_ipv6: bool) -> bool {
        self.vm_id == backend.vm_id
            && self.ip == backend.private_ip
            && self.ipv6 == backend.private_ipv6
            && self.check_ip == family::check_target(check_ipv6, backend.private_ip, backend.private_ipv6)
    }

    pub(super) fn set_running(&self, running: bool) {
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

    pub(super) fn tracker_snapshot(&self) -> HealthTracker {
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
    pub(super) fn new(config: RuleConfig) -> Self {
        RuleShared {
            config: RwLock::new(Arc::new(config)),
            generation: AtomicU64::new(0),
            turn: AtomicUsize::new(0),
        }
    }

    pub(crate) fn config(&self) -> Arc<RuleConfig> {
        Arc::clone(&self.config.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(super) fn swap(&self, config: Arc<RuleConfig>) -> Arc<RuleConfig> {
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

//! The platform's data plane: every rule of every active load balancer listens on its
//! public IPs (one per family):port and forwards to the backends' private IP (of the
//! family the client reached):port.
//!
//! The API layer (`platform::api`) owns the load-balancer objects; it hands this module the
//! listeners that should exist for one LB with [`Forwarder::apply_lb`] and reads backend
//! health back with [`Forwarder::health`]. Nothing here knows about HTTP or JSON.
//!
//! Layout: `rule` runs one listener (its socket task, its swappable config, its backends'
//! health-check tasks); `tcp` and `udp` are the data paths; `balance` (backend choice),
//! `family` (which address, which source) and `health` (threshold state machine, probes)
//! keep the decisions pure and unit-tested.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ipnet::IpNet;
use tokio_util::sync::CancellationToken;

mod balance;
mod family;
mod health;
mod rule;
mod slot;
mod tcp;
#[cfg(test)]
mod tests;
mod udp;

pub(crate) use family::source_allowed;
use rule::RuleRuntime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
    LeastConnection,
    /// By a hash of the client IP.
    Source,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Connect to `port` on the backend's private IP.
    Tcp { port: u16 },
    /// `GET path` on the backend's private IP:`port`; healthy on 2xx.
    Http { port: u16, path: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub vm_id: String,
    /// Where clients of the LB's IPv4 address go.
    pub private_ip: IpAddr,
    /// Where clients of the LB's IPv6 address go; `None`: no IPv6 traffic.
    pub private_ipv6: Option<Ipv6Addr>,
    /// A stopped VM fails every health check, whatever listens on its address on loopback.
    pub running: bool,
}

/// One rule of one LB, as the data plane needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub rule: String,
    pub protocol: Protocol,
    /// One address per public IP of the LB (at most one per family).
    pub listen: Vec<SocketAddr>,
    pub private_port: u16,
    pub algorithm: Algorithm,
    /// Empty: any source.
    pub allowed_sources: Vec<IpNet>,
    pub health_check: HealthCheck,
    /// Health checks go to the backends' `private_ipv6` (an IPv6-only LB) rather than
    /// their `private_ip`.
    pub check_ipv6: bool,
    pub backends: Vec<Backend>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Healthy,
    Unhealthy,
    Unknown,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot listen on {protocol:?} {addr}: {source}")]
    Bind {
        protocol: Protocol,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Tunables of the data plane; the defaults are the platform's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwarderSettings {
    /// Bound on connecting to a backend; on failure the next healthy backend is tried once.
    pub connect_timeout: Duration,
    /// A UDP flow without traffic either way for this long is closed (60 s on the platform).
    pub udp_idle_timeout: Duration,
    /// Most UDP flows per rule; packets of new clients beyond it are dropped.
    pub max_udp_flows: usize,
}

impl Default for ForwarderSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            udp_idle_timeout: Duration::from_secs(60),
            max_udp_flows: 10_000,
        }
    }
}

/// One lock per key (an LB id), plus one over all keys: changes to different LBs run
/// concurrently (binding listeners and starting health checks of 1,000 LBs one at a
/// time made LBs wait seconds in `provisioning`), changes to one LB never interleave,
/// and `lock_all` waits for every change under way. A key's entry lives only while
/// someone holds or waits for it.
#[derive(Debug, Default)]
pub(crate) struct KeyedLocks {
    all: tokio::sync::RwLock<()>,
    keys: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

/// Held while changing one key; see [`KeyedLocks::lock`].
pub(crate) struct KeyedGuard<'a> {
    key: String,
    keys: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    _all: tokio::sync::RwLockReadGuard<'a, ()>,
}

impl KeyedLocks {
    pub(crate) async fn lock(&self, key: &str) -> KeyedGuard<'_> {
        let all = self.all.read().await;
        let entry = {
            let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(keys.entry(key.to_owned()).or_default())
        };
        KeyedGuard {
            key: key.to_owned(),
            keys: Arc::clone(&self.keys),
            guard: Some(entry.lock_owned().await),
            _all: all,
        }
    }

    /// Waits for every key's change under way and keeps new ones out.
    pub(crate) async fn lock_all(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.all.write().await
    }

    /// Keys with an entry (held or waited for).
    #[cfg(test)]
    pub(crate) fn entries(&self) -> usize {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        self.guard = None;
        // Entries are cloned only under the map's lock: a count of one there means no
        // one else holds or waits for this key.
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if keys.get(&self.key).is_some_and(|m| Arc::strong_count(m) == 1) {
            keys.remove(&self.key);
        }
    }
}

/// The data plane of the whole platform: the listeners of every LB, keyed by LB id.
///
/// Each rule runs as its own set of tasks (accept or receive loop, one task per TCP
/// connection or UDP flow, one health-check task per backend), all ended through a
/// cancellation token when the rule, its LB or the forwarder goes. Dropping the forwarder
/// cancels everything too; [`Forwarder::shutdown`] also waits for the sockets to close.
pub struct Forwarder {
    settings: ForwarderSettings,
    root: CancellationToken,
    /// Serialises `apply_lb` and `remove_lb` of one LB (different LBs proceed together)
    /// and `shutdown` with all of them.
    reconcile: KeyedLocks,
    lbs: Mutex<HashMap<String, Vec<Arc<RuleRuntime>>>>,
}

impl Default for Forwarder {
    fn default() -> Self {
        Self::with_settings(ForwarderSettings::default())
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.root.cancel();
    }
}

impl Forwarder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_settings(settings: ForwarderSettings) -> Self {
        Self {
            settings,
            root: CancellationToken::new(),
            reconcile: KeyedLocks::default(),
            lbs: Mutex::new(HashMap::new()),
        }
    }

    fn rules(&self, lb_id: &str) -> Vec<Arc<RuleRuntime>> {
        self.lbs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(lb_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Make the running listeners of `lb_id` exactly `listeners`: start new ones, update
    /// changed ones in place (same socket when the listen address is unchanged, so open
    /// connections survive), stop removed ones. On a bind error the other listeners of
    /// the LB still run and the error is returned (the API marks the LB `error`).
    ///
    /// A listener is identified by its protocol and listen addresses: a running rule
    /// sharing one of them with a new listener is updated in place (a rule renamed or
    /// otherwise changed keeps its sockets; a family added or removed opens or closes only
    /// that socket). Backends that remain (same VM id and private IPs) keep their health
    /// state.
    pub async fn apply_lb(&self, lb_id: &str, listeners: Vec<Listener>) -> Result<(), ForwardError> {
        let _serial = self.reconcile.lock(lb_id).await;
        let current = self.rules(lb_id);
        let overlaps = |r: &RuleRuntime, l: &Listener| {
            l.protocol == r.protocol && r.addresses().iter().any(|a| l.listen.contains(a))
        };
        let (keep, stop): (Vec<_>, Vec<_>) = current
            .into_iter()
            .partition(|r| listeners.iter().any(|l| overlaps(r, l)));
        futures::future::join_all(stop.iter().map(|r| r.stop())).await;

        let mut running: Vec<Arc<RuleRuntime>> = Vec::with_capacity(listeners.len());
        let mut first_error = None;
        for listener in listeners {
            let protocol = listener.protocol;
            let taken = listener.listen.iter().find(|a| {
                running
                    .iter()
                    .any(|r| r.protocol == protocol && r.addresses().contains(a))
            });
            if let Some(&addr) = taken {
                let error = ForwardError::Bind {
                    protocol,
                    addr,
                    source: std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "two rules of the load balancer listen there",
                    ),
                };
                tracing::warn!(lb_id, error = %error, "listener not started");
                first_error.get_or_insert(error);
                continue;
            }
            let reusable = keep
                .iter()
                .find(|r| overlaps(r, &listener) && !running.iter().any(|x| Arc::ptr_eq(x, r)));
            if let Some(rule) = reusable {
                if let Err(error) = rule.update(listener, &self.settings) {
                    tracing::warn!(lb_id, error = %error, "listener address not started");
                    first_error.get_or_insert(error);
                }
                running.push(Arc::clone(rule));
                continue;
            }
            match RuleRuntime::start(listener, &self.root, &self.settings).await {
                Ok(rule) => running.push(Arc::new(rule)),
                Err(error) => {
                    tracing::warn!(lb_id, error = %error, "listener not started");
                    first_error.get_or_insert(error);
                }
            }
        }
        // A kept rule that no new listener took (two old rules overlapping one new one).
        let orphans: Vec<_> = keep
            .iter()
            .filter(|r| !running.iter().any(|x| Arc::ptr_eq(x, r)))
            .collect();
        futures::future::join_all(orphans.iter().map(|r| r.stop())).await;
        let mut lbs = self.lbs.lock().unwrap_or_else(PoisonError::into_inner);
        if running.is_empty() {
            lbs.remove(lb_id);
        } else {
            lbs.insert(lb_id.to_owned(), running);
        }
        drop(lbs);
        first_error.map_or(Ok(()), Err)
    }

    /// Stop every listener of `lb_id`.
    pub async fn remove_lb(&self, lb_id: &str) {
        let _serial = self.reconcile.lock(lb_id).await;
        let removed = self
            .lbs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(lb_id)
            .unwrap_or_default();
        futures::future::join_all(removed.iter().map(|r| r.stop())).await;
    }

    /// Health of each (rule, backend vm_id) of `lb_id`, as the health checks see it now.
    pub fn health(&self, lb_id: &str) -> Vec<(String, String, HealthState)> {
        let mut out = Vec::new();
        for rule in self.rules(lb_id) {
            let config = rule.config();
            for slot in &config.backends {
                out.push((config.listener.rule.clone(), slot.vm_id.clone(), slot.state()));
            }
        }
        out
    }

    /// Open TCP connections or UDP flows of each (rule, backend vm_id) of `lb_id`.
    /// Connections to a backend that has since left the rule are not counted.
    pub fn open_connections(&self, lb_id: &str) -> Vec<(String, String, usize)> {
        let mut out = Vec::new();
        for rule in self.rules(lb_id) {
            let config = rule.config();
            for slot in &config.backends {
                out.push((config.listener.rule.clone(), slot.vm_id.clone(), slot.open()));
            }
        }
        out
    }

    /// Stop everything (listeners, health checks, open flows).
    pub async fn shutdown(&self) {
        let _serial = self.reconcile.lock_all().await;
        self.root.cancel();
        let all: Vec<_> = self
            .lbs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .flat_map(|(_, rules)| rules)
            .collect();
        futures::future::join_all(all.iter().map(|r| r.stop())).await;
    }
}

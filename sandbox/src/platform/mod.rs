//! The CloudRaya platform stand-in: `docs/platform-api.md`, implemented.
//!
//! [`PlatformStandIn`] owns the state (persisted by [`store`]), the tokens, the fault rules and
//! the data plane ([`forward::Forwarder`]); [`api`] maps HTTP onto it. Tests start it with
//! [`PlatformStandIn::open`] and [`serve`] on a listener bound to `127.0.0.1:0`.

pub mod api;
pub mod auth;
pub mod error;
pub mod faults;
pub mod forward;
mod lb;
pub mod model;
pub mod query;
pub mod store;
pub mod validate;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::watch;

pub use error::{Error, FieldError};

use forward::Forwarder;
use model::{CLUSTER_LABEL, Cluster, Labels, LbStatus, Region, Subnet, Vm, VmState, Vpc};
use store::{State, Store};

/// How the platform starts. `state_dir` has no useful default: callers set it.
#[derive(Debug, Clone)]
pub struct PlatformConfig {
    pub state_dir: PathBuf,
    pub email: String,
    pub password: String,
    pub region: String,
    pub public_ip_range: Ipv4Net,
    pub vm_ip_range: Ipv4Net,
    /// The region's IPv6 public IPs; `None` (the default): the region has none.
    pub public_ipv6_range: Option<Ipv6Net>,
    /// The `ipv6_cidr` of the subnets the platform makes (so their VMs get a
    /// `private_ipv6` and their clusters `ip_versions: [4, 6]`); `None`: IPv4 only.
    pub vm_ipv6_range: Option<Ipv6Net>,
    pub provisioning_delay: Duration,
    pub udp_enabled: bool,
    pub token_ttl: Duration,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::new(),
            email: "admin@sandbox.local".into(),
            password: "sandbox".into(),
            region: "jkt".into(),
            public_ip_range: Ipv4Net::new(std::net::Ipv4Addr::new(127, 203, 0, 0), 24).expect("valid prefix length"),
            vm_ip_range: Ipv4Net::new(std::net::Ipv4Addr::new(127, 10, 0, 0), 24).expect("valid prefix length"),
            public_ipv6_range: None,
            vm_ipv6_range: None,
            provisioning_delay: Duration::from_millis(300),
            udp_enabled: true,
            token_ttl: Duration::from_secs(3600),
        }
    }
}

/// What `PUT /_sandbox/config` may change while running.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub provisioning_delay: Duration,
    pub udp_enabled: bool,
    pub token_ttl: Duration,
}

/// The platform stand-in: state, tokens, faults, call counts and the data plane.
pub struct PlatformStandIn {
    config: PlatformConfig,
    settings: Mutex<Settings>,
    store: tokio::sync::Mutex<Store>,
    tokens: auth::Tokens,
    faults: Mutex<faults::Faults>,
    calls: Mutex<BTreeMap<String, u64>>,
    forwarder: Forwarder,
    /// Serialises the changes to the data plane of one LB, so an apply and a remove of
    /// the same LB never interleave; different LBs are applied concurrently.
    dataplane: forward::KeyedLocks,
    /// Set by [`PlatformStandIn::shutdown`]: timers stop, the data plane is left alone.
    stopping: watch::Sender<bool>,
    /// Set when serving stops: calls hung by a fault rule answer at last.
    hangs_released: watch::Sender<bool>,
}

impl std::fmt::Debug for PlatformStandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformStandIn")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Locks a std mutex; a panic elsewhere cannot leave these simple maps inconsistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PlatformStandIn {
    /// Loads the state of `config.state_dir`, restarts forwarding for every active LB and
    /// finishes the transitions (provisioning, updating, deleting) that were under way.
    pub async fn open(config: PlatformConfig) -> Result<Arc<PlatformStandIn>, Error> {
        let store = Store::open(&config.state_dir)?;
        let settings = Settings {
            provisioning_delay: config.provisioning_delay,
            udp_enabled: config.udp_enabled,
            token_ttl: config.token_ttl,
        };
        let pending: Vec<(String, LbStatus, u64)> = store
            .state
            .load_balancers
            .iter()
            .map(|r| (r.lb.id.clone(), r.lb.status, r.generation))
            .collect();
        let platform = Arc::new(PlatformStandIn {
            config,
            settings: Mutex::new(settings),
            store: tokio::sync::Mutex::new(store),
            tokens: auth::Tokens::default(),
            faults: Mutex::new(faults::Faults::default()),
            calls: Mutex::new(BTreeMap::new()),
            forwarder: Forwarder::new(),
            dataplane: forward::KeyedLocks::default(),
            stopping: watch::Sender::new(false),
            hangs_released: watch::Sender::new(false),
        });
        for (id, status, generation) in pending {
            match status {
                LbStatus::Active => platform.reapply(&id).await,
                LbStatus::Provisioning | LbStatus::Updating | LbStatus::Deleting => platform.schedule(&id, generation),
                LbStatus::Error => {}
            }
        }
        Ok(platform)
    }

    /// Makes sure the region, its network, the cluster and its `workers` running VMs
    /// (`w1`..`wN`, labelled with the cluster id) exist, creating only what is missing.
    /// With `vm_ipv6_range` configured, a cluster subnet without `ipv6_cidr` (a state dir
    /// from an IPv4-only run) gets it, and its VMs without `private_ipv6` get one.
    pub async fn seed_cluster(&self, cluster_id: &str, name: &str, workers: usize) -> Result<(), Error> {
        let mut store = self.store.lock().await;
        let (out, saved) = store.mutate(|s| {
            let region = self.config.region.clone();
            let cluster = match s.cluster(cluster_id) {
                Some(c) => c.clone(),
                None => {
                    let (vpc_id, subnet_id) = self.default_network(s, &region);
                    let cluster = Cluster {
                        id: cluster_id.to_string(),
                        name: name.to_string(),
                        region,
                        vpc_id,
                        subnet_id,
                    };
                    s.clusters.push(cluster.clone());
                    cluster
                }
            };
            if let Some(range) = self.config.vm_ipv6_range {
                self.add_ipv6_to_subnet(s, &cluster.subnet_id, range)?;
            }
            for i in 1..=workers {
                let vm_name = format!("w{i}");
                let exists = s.vms.iter().any(|vm| {
                    vm.name == vm_name && vm.labels.get(CLUSTER_LABEL).map(String::as_str) == Some(cluster_id)
                });
                if !exists {
                    let labels = Labels::from([(CLUSTER_LABEL.to_string(), cluster.id.clone())]);
                    self.add_vm(s, &vm_name, &cluster.subnet_id, labels, None, None, None, None, None)?;
                }
            }
            Ok(())
        })?;
        drop(store);
        saved.wait().await?;
        Ok(out)
    }

    /// The HTTP API (public routes and `/_sandbox/`).
    pub fn router(self: &Arc<Self>) -> axum::Router {
        api::router(self.clone())
    }

    /// Stops timers and the data plane. The state on disk is left as it is, so
    /// [`PlatformStandIn::open`] on the same directory carries on.
    pub async fn shutdown(&self) {
        self.stopping.send_replace(true);
        self.hangs_released.send_replace(true);
        // Wait for a data-plane change under way, then stop everything.
        let _dataplane = self.dataplane.lock_all().await;
        self.forwarder.shutdown().await;
    }

    /// Lets calls hung by a fault rule answer (with 503), e.g. when serving stops.
    pub fn release_hangs(&self) {
        self.hangs_released.send_replace(true);
    }

    pub fn config(&self) -> &PlatformConfig {
        &self.config
    }

    /// The cluster's network when it exists in the region; otherwise a new VPC and subnet
    /// covering the VM range.
    fn default_network(&self, s: &mut State, region: &str) -> (String, String) {
        if !s.regions.iter().any(|r| r.id == region) {
            s.regions.push(Region {
                id: region.to_string(),
                name: region.to_string(),
            });
        }
        if let Some(subnet) = s.subnets.iter().find(|sn| sn.region == region) {
            return (subnet.vpc_id.clone(), subnet.id.clone());
        }
        let vpc_id = s.fresh_id("vpc");
        s.vpcs.push(Vpc {
            id: vpc_id.clone(),
            name: "default".into(),
            region: region.to_string(),
            cidr: self.config.vm_ip_range,
        });
        let subnet_id = s.fresh_id("subnet");
        s.subnets.push(Subnet {
            id: subnet_id.clone(),
            name: "default".into(),
            vpc_id: vpc_id.clone(),
            region: region.to_string(),
            cidr: self.config.vm_ip_range,
            ipv6_cidr: self.config.vm_ipv6_range,
        });
        (vpc_id, subnet_id)
    }

    /// Gives subnet `subnet_id` the IPv6 `range` when it has none, and its VMs without an
    /// IPv6 address one.
    fn add_ipv6_to_subnet(&self, s: &mut State, subnet_id: &str, range: Ipv6Net) -> Result<(), Error> {
        let Some(subnet) = s.subnets.iter_mut().find(|sn| sn.id == subnet_id) else {
            return Ok(());
        };
        if subnet.ipv6_cidr.is_some() {
            return Ok(());
        }
        subnet.ipv6_cidr = Some(range);
        let without: Vec<String> = s
            .vms
            .iter()
            .filter(|vm| vm.subnet_id == subnet_id && vm.private_ipv6.is_none())
            .map(|vm| vm.id.clone())
            .collect();
        for id in without {
            let ip = s
                .free_vm_ipv6(range)
                .ok_or_else(|| Error::Conflict(format!("no IPv6 private IP left in {range}")))?;
            if let Some(vm) = s.vm_mut(&id) {
                vm.private_ipv6 = Some(ip);
            }
        }
        Ok(())
    }

    /// Whether `region` has IPv6 public IPs (only the configured region, when configured).
    pub(crate) fn has_ipv6_pool(&self, region: &str) -> bool {
        self.config.public_ipv6_range.is_some() && region == self.config.region
    }

    /// The IPv6 address of a new VM in `subnet`, or of a VM changing it: `requested` left
    /// out (`None`) takes the next free one of the subnet's `ipv6_cidr` (none without one),
    /// `Some(None)` is none; an address must be in the `ipv6_cidr` (422) and unused by
    /// another VM than `vm_id` (409).
    pub(crate) fn vm_ipv6(
        s: &State,
        subnet: &Subnet,
        requested: Option<Option<Ipv6Addr>>,
        vm_id: Option<&str>,
    ) -> Result<Option<Ipv6Addr>, Error> {
        match requested {
            Some(None) => Ok(None),
            Some(Some(ip)) => {
                let Some(range) = subnet.ipv6_cidr else {
                    return Err(Error::invalid(
                        "private_ipv6",
                        format!("subnet {} has no IPv6 (no ipv6_cidr)", subnet.id),
                    ));
                };
                if !range.contains(&ip) {
                    return Err(Error::invalid(
                        "private_ipv6",
                        format!("{ip} is not in subnet {}'s ipv6_cidr {range}", subnet.id),
                    ));
                }
                if let Some(other) = s
                    .vms
                    .iter()
                    .find(|o| o.private_ipv6 == Some(ip) && Some(o.id.as_str()) != vm_id)
                {
                    return Err(Error::Conflict(format!(
                        "private IPv6 {ip} is already used by VM {}",
                        other.id
                    )));
                }
                Ok(Some(ip))
            }
            None => match subnet.ipv6_cidr {
                None => Ok(None),
                Some(range) => s
                    .free_vm_ipv6(range)
                    .map(Some)
                    .ok_or_else(|| Error::Conflict(format!("no IPv6 private IP left in {range}"))),
            },
        }
    }

    /// Adds a running VM in `subnet_id` (which must exist).
    #[allow(clippy::too_many_arguments)]
    fn add_vm(
        &self,
        s: &mut State,
        name: &str,
        subnet_id: &str,
        labels: Labels,
        zone: Option<String>,
        package: Option<String>,
        private_ip: Option<Ipv4Addr>,
        private_ipv6: Option<Option<Ipv6Addr>>,
        public_ip: Option<Ipv4Addr>,
    ) -> Result<Vm, Error> {
        let subnet = s
            .subnets
            .iter()
            .find(|sn| sn.id == subnet_id)
            .cloned()
            .ok_or_else(|| Error::invalid("subnet_id", format!("subnet {subnet_id} does not exist")))?;
        let private_ip = match private_ip {
            Some(ip) => {
                if let Some(other) = s.vms.iter().find(|vm| vm.private_ip == ip) {
                    return Err(Error::Conflict(format!(
                        "private IP {ip} is already used by VM {}",
                        other.id
                    )));
                }
                ip
            }
            None => s
                .free_vm_ip(self.config.vm_ip_range)
                .ok_or_else(|| Error::Conflict(format!("no private IP left in {}", self.config.vm_ip_range)))?,
        };
        let private_ipv6 = Self::vm_ipv6(s, &subnet, private_ipv6, None)?;
        let vm = Vm {
            id: s.fresh_id("vm"),
            name: name.to_string(),
            zone: zone.unwrap_or_else(|| format!("{}-a", subnet.region)),
            region: subnet.region.clone(),
            package: package.unwrap_or_else(|| "standard-2".into()),
            state: VmState::Running,
            private_ip,
            public_ip,
            private_ipv6,
            vpc_id: subnet.vpc_id.clone(),
            subnet_id: subnet.id.clone(),
            labels,
            created_at: model::now_rfc3339(),
        };
        s.vms.push(vm.clone());
        Ok(vm)
    }

    pub(crate) fn settings(&self) -> Settings {
        *lock(&self.settings)
    }

    fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }
}

/// Serves the platform's API on `listener` until `shutdown` completes (calls hung by a
/// fault rule are then released). The platform itself keeps running: call
/// [`PlatformStandIn::shutdown`] to stop its data plane.
pub async fn serve(
    listener: tokio::net::TcpListener,
    platform: Arc<PlatformStandIn>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = platform.router();
    let releaser = platform.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            releaser.release_hangs();
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, vm_ipv6_range: Option<&str>) -> PlatformConfig {
        PlatformConfig {
            state_dir: dir.to_path_buf(),
            public_ip_range: "127.203.251.0/24".parse().unwrap(),
            vm_ip_range: "127.10.251.0/24".parse().unwrap(),
            vm_ipv6_range: vm_ipv6_range.map(|r| r.parse().unwrap()),
            ..PlatformConfig::default()
        }
    }

    /// A state dir of an IPv4-only run, opened with an IPv6 VM range: the seeded cluster's
    /// subnet gains its `ipv6_cidr` and the VMs their `private_ipv6`, at the same offsets.
    #[tokio::test]
    async fn seeding_adds_ipv6_to_an_ipv4_state() {
        let dir = tempfile::tempdir().unwrap();
        let v4 = PlatformStandIn::open(config(dir.path(), None)).await.unwrap();
        v4.seed_cluster("cl-1", "one", 2).await.unwrap();
        {
            let store = v4.store.lock().await;
            let cluster = store.state.cluster("cl-1").unwrap();
            assert_eq!(store.state.cluster_ip_versions(cluster), vec![model::IpVersion::V4]);
            assert!(store.state.vms.iter().all(|vm| vm.private_ipv6.is_none()));
        }
        v4.shutdown().await;
        drop(v4);

        let dual = PlatformStandIn::open(config(dir.path(), Some("fd00:10::/112")))
            .await
            .unwrap();
        dual.seed_cluster("cl-1", "one", 3).await.unwrap();
        let store = dual.store.lock().await;
        let cluster = store.state.cluster("cl-1").unwrap();
        assert_eq!(
            store.state.cluster_ip_versions(cluster),
            vec![model::IpVersion::V4, model::IpVersion::V6]
        );
        let mut addresses: Vec<(String, String)> = store
            .state
            .vms
            .iter()
            .map(|vm| {
                (
                    vm.private_ip.to_string(),
                    vm.private_ipv6.map(|a| a.to_string()).unwrap_or_default(),
                )
            })
            .collect();
        addresses.sort();
        assert_eq!(
            addresses,
            [
                ("127.10.251.11".to_string(), "fd00:10::b".to_string()),
                ("127.10.251.12".to_string(), "fd00:10::c".to_string()),
                ("127.10.251.13".to_string(), "fd00:10::d".to_string()),
            ]
        );
        drop(store);
        dual.shutdown().await;
    }
}

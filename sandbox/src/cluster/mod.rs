//! The sandbox cluster: what runs on a real cluster besides the API server, played by
//! ordinary Kubernetes clients (kube-rs `Client`, k8s-openapi types, reflectors), so it
//! runs against the API server stand-in or a real one alike.
//!
//! - [`nodes`]: one node agent per worker VM of the platform (a kubelet's registration,
//!   `Lease` and `Ready` condition);
//! - [`workloads`]: a Deployment controller (Deployment → Pods, no ReplicaSets) and a
//!   scheduler;
//! - [`pods`]: the kubelet's pod side: pod IPs, status, and a built-in responder on every
//!   declared `containerPort`;
//! - [`endpointslices`]: the EndpointSlice controller;
//! - [`kubeproxy`]: ClusterIP and NodePort forwarding and kube-proxy's health servers;
//! - [`vms`]: the platform's worker VMs (the nodes' machines).
//!
//! Every controller is level-triggered: it recomputes what should be from the reflector
//! stores whenever any watched object or VM changes (and on a resync tick), compares with
//! what is, and writes only the difference. The decisions are pure functions, unit-tested
//! in their modules; the I/O sits in each module's `reconcile`.

mod balance;
pub mod endpointslices;
pub mod kubeproxy;
mod net;
pub mod nodes;
pub mod pods;
pub mod vms;
pub mod workloads;

use std::collections::HashMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use vms::{PlatformClient, PlatformError, PlatformLogin, Vm};

/// Annotation on a Pod: `"false"` makes it not ready (its endpoints go not-ready).
pub const READY_ANNOTATION: &str = "sandbox.kuberaya.io/ready";
/// Annotation on a Pod: `"echo"` makes every TCP port a plain echo (no HTTP answers).
pub const RESPONDER_ANNOTATION: &str = "sandbox.kuberaya.io/responder";
/// Annotation on a Node: the id of its platform VM.
pub const VM_ID_ANNOTATION: &str = "sandbox.kuberaya.io/vm-id";
/// The taint a kubelet under `--cloud-provider=external` registers with; the CCM removes it.
pub const UNINITIALIZED_TAINT: &str = "node.cloudprovider.kubernetes.io/uninitialized";

/// How long a start waits for the first list of every watched kind.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Changes arriving within this window are handled by one reconcile.
const DEBOUNCE: Duration = Duration::from_millis(15);
/// How long [`Cluster::shutdown`] waits for the tasks to end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error("the {0} watch did not list within {SYNC_TIMEOUT:?}")]
    NotSynced(&'static str),
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("invalid option: {0}")]
    Options(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of the sandbox cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// No CCM runs: the node agents remove the `uninitialized` taint and set the nodes'
    /// addresses themselves, so pods schedule without a cloud controller.
    pub no_ccm: bool,
    /// Pod IPs: node `i` (its `spec.podCIDR`) gets the `i`-th /24 of this range.
    pub pod_cidr: Ipv4Net,
    /// Dual-stack: node `i` also gets the `i`-th /64 of this range (`fd00:244::/48`, so
    /// `fd00:244:0:<i>::/64`), and each pod the address of its IPv4 address's offset there.
    pub pod_cidr_v6: Option<Ipv6Net>,
    /// How often node agents renew their Lease (node status goes every 5th time).
    pub heartbeat: Duration,
    /// How often the platform's VM list is read.
    pub vm_poll: Duration,
    /// Every controller reconciles at least this often, changes or not.
    pub resync: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            no_ccm: false,
            pod_cidr: Ipv4Net::new(Ipv4Addr::new(127, 244, 0, 0), 16).expect("valid prefix length"),
            pod_cidr_v6: None,
            heartbeat: Duration::from_secs(2),
            vm_poll: Duration::from_millis(500),
            resync: Duration::from_secs(2),
        }
    }
}

/// What every controller of the cluster shares: the client, the caches and the wake-ups.
pub(crate) struct Context {
    pub client: kube::Client,
    pub platform: PlatformClient,
    pub cluster_id: String,
    pub options: ClusterOptions,
    pub nodes: Store<Node>,
    pub pods: Store<Pod>,
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub deployments: Store<Deployment>,
    /// Bumped on every watch event of any kind.
    pub changed: watch::Sender<u64>,
    /// The cluster's VMs as last read from the platform.
    pub vms: watch::Sender<Vec<Vm>>,
    /// kube-proxy's listeners that could not bind (`PROTO ADDR: error`), after its last pass.
    pub listen_failures: watch::Sender<Vec<String>>,
    pub cancel: CancellationToken,
}

impl Context {
    /// The nodes this cluster runs (one per VM), with what their agents know.
    pub fn local_nodes(&self) -> Vec<nodes::LocalNode> {
        let nodes: HashMap<String, Arc<Node>> = self
            .nodes
            .state()
            .into_iter()
            .filter_map(|n| n.metadata.name.clone().map(|name| (name, n)))
            .collect();
        self.vms
            .borrow()
            .iter()
            .map(|vm| nodes::LocalNode::new(vm, nodes.get(&vm.name).map(|n| n.as_ref())))
            .collect()
    }
}

/// The running sandbox cluster.
pub struct Cluster {
    cancel: CancellationToken,
    tasks: TaskTracker,
    ctx: Arc<Context>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("cluster_id", &self.ctx.cluster_id)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Starts the cluster's controllers and node agents against the API server `client`
    /// talks to and the worker VMs of `cluster_id` on the platform at `platform.url`.
    /// Returns once every watch has listed and the platform answered.
    pub async fn start(
        client: kube::Client,
        platform: PlatformLogin,
        cluster_id: &str,
        options: ClusterOptions,
    ) -> Result<Cluster> {
        if options.pod_cidr.prefix_len() > 23 {
            return Err(Error::Options(format!(
                "pod range {} must hold at least two /24s",
                options.pod_cidr
            )));
        }
        let platform = PlatformClient::new(platform)?;
        let vms = platform.cluster_vms(cluster_id).await?;
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (changed, _) = watch::channel(0u64);
        let changed_tx = changed.clone();

        let nodes = reflect::<Node>(Api::all(client.clone()), &changed_tx, &tasks, &cancel);
        let pods = reflect::<Pod>(Api::all(client.clone()), &changed_tx, &tasks, &cancel);
        let services = reflect::<Service>(Api::all(client.clone()), &changed_tx, &tasks, &cancel);
        let slices = reflect::<EndpointSlice>(Api::all(client.clone()), &changed_tx, &tasks, &cancel);
        let deployments = reflect::<Deployment>(Api::all(client.clone()), &changed_tx, &tasks, &cancel);
        let synced = async {
            wait_ready(&nodes, "nodes").await?;
            wait_ready(&pods, "pods").await?;
            wait_ready(&services, "services").await?;
            wait_ready(&slices, "endpointslices").await?;
            wait_ready(&deployments, "deployments").await
        };
        if let Err(e) = synced.await {
            cancel.cancel();
            tasks.close();
            return Err(e);
        }

        let ctx = Arc::new(Context {
            client,
            platform,
            cluster_id: cluster_id.to_string(),
            options,
            nodes,
            pods,
            services,
            slices,
            deployments,
            changed,
            vms: watch::Sender::new(vms),
            listen_failures: watch::Sender::new(Vec::new()),
            cancel: cancel.clone(),
        });
        tasks.spawn(poll_vms(ctx.clone()));
        tasks.spawn(nodes::run(ctx.clone(), tasks.clone()));
        tasks.spawn(workloads::run_deployments(ctx.clone()));
        tasks.spawn(workloads::run_scheduler(ctx.clone()));
        tasks.spawn(pods::run(ctx.clone()));
        tasks.spawn(endpointslices::run(ctx.clone()));
        tasks.spawn(kubeproxy::run(ctx.clone()));
        tracing::info!(cluster_id, vms = ctx.vms.borrow().len(), "sandbox cluster started");
        Ok(Cluster { cancel, tasks, ctx })
    }

    /// kube-proxy's listeners (ClusterIPs, NodePorts, health ports) that could not bind,
    /// as `PROTO ADDR: error`: another process (another sandbox on the same ranges) holds
    /// them. Empty when every listener runs.
    pub fn listen_failures(&self) -> Vec<String> {
        self.ctx.listen_failures.borrow().clone()
    }

    /// Waits (at most `within`) until kube-proxy has made a pass with every listener of
    /// `want` addresses bound or failed; returns the failures then.
    pub async fn wait_listeners(&self, within: Duration) -> Vec<String> {
        let mut rx = self.ctx.listen_failures.subscribe();
        let _ = tokio::time::timeout(within, rx.changed()).await;
        self.listen_failures()
    }

    /// The platform client the cluster reads its VMs with.
    pub fn platform(&self) -> &PlatformClient {
        &self.ctx.platform
    }

    /// Stops every agent, controller, responder and listener (their sockets are closed
    /// when this returns, bounded by a grace period).
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait()).await.is_err() {
            tracing::warn!(
                remaining = self.tasks.len(),
                "sandbox cluster tasks did not stop in time"
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A client for the API server of the kubeconfig at `path` (its current context).
pub async fn client_from_kubeconfig(path: &std::path::Path) -> Result<kube::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| Error::Kubeconfig(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Kubeconfig(e.to_string()))?;
    Ok(kube::Client::try_from(config)?)
}

/// A reflector of `K` kept by a task; every event bumps `changed`.
fn reflect<K>(api: Api<K>, changed: &watch::Sender<u64>, tasks: &TaskTracker, cancel: &CancellationToken) -> Store<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    let changed = changed.clone();
    let cancel = cancel.clone();
    tasks.spawn(async move {
        tokio::pin!(stream);
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => break,
                next = stream.next() => next,
            };
            match next {
                Some(Ok(_)) => {
                    changed.send_modify(|n| *n = n.wrapping_add(1));
                }
                Some(Err(e)) => tracing::debug!(kind = %K::kind(&Default::default()), error = %e, "watch error"),
                None => break,
            }
        }
    });
    reader
}

async fn wait_ready<K>(store: &Store<K>, what: &'static str) -> Result<()>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    match tokio::time::timeout(SYNC_TIMEOUT, store.wait_until_ready()).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(Error::NotSynced(what)),
    }
}

/// Reads the cluster's VMs from the platform every `vm_poll`.
async fn poll_vms(ctx: Arc<Context>) {
    let mut last_error: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = ctx.cancel.cancelled() => break,
            _ = tokio::time::sleep(ctx.options.vm_poll) => {}
        }
        match ctx.platform.cluster_vms(&ctx.cluster_id).await {
            Ok(vms) => {
                ctx.vms.send_if_modified(|old| {
                    if *old == vms {
                        false
                    } else {
                        *old = vms;
                        true
                    }
                });
            }
            Err(e) => {
                // The VM list keeps its last value; say so at most every 10 s.
                if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    last_error = Some(Instant::now());
                    tracing::warn!(error = %e, "cannot read the cluster's VMs");
                }
            }
        }
    }
}

/// Runs `reconcile` now, then again after every change of a watched object or of the VMs
/// (bursts coalesced), and at least every `resync`, until the cluster stops.
pub(crate) async fn control_loop<F, Fut>(ctx: Arc<Context>, name: &'static str, mut reconcile: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut changed = ctx.changed.subscribe();
    let mut vms = ctx.vms.subscribe();
    loop {
        if let Err(e) = reconcile().await {
            tracing::warn!(controller = name, error = %e, "reconcile failed");
        }
        tokio::select! {
            _ = ctx.cancel.cancelled() => break,
            _ = changed.changed() => {}
            _ = vms.changed() => {}
            _ = tokio::time::sleep(ctx.options.resync) => {}
        }
        tokio::select! {
            _ = ctx.cancel.cancelled() => break,
            _ = tokio::time::sleep(DEBOUNCE) => {}
        }
        changed.borrow_and_update();
        vms.borrow_and_update();
    }
}

/// Writes a controller made that its cache has not shown yet, so that a reconcile running
/// before the watch catches up does not make them twice (the real controllers'
/// "expectations"). Keyed by the owner (e.g. a Deployment's uid); expires after `ttl`.
#[derive(Debug)]
pub(crate) struct Expectations {
    ttl: Duration,
    pending: Mutex<HashMap<String, Pending>>,
}

#[derive(Debug)]
struct Pending {
    since: Instant,
    appear: Vec<String>,
    vanish: Vec<String>,
}

impl Expectations {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Records that objects named `appear` were created and `vanish` deleted for `key`.
    pub fn expect(&self, key: &str, appear: Vec<String>, vanish: Vec<String>) {
        if appear.is_empty() && vanish.is_empty() {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = pending.entry(key.to_string()).or_insert_with(|| Pending {
            since: Instant::now(),
            appear: Vec::new(),
            vanish: Vec::new(),
        });
        entry.since = Instant::now();
        entry.appear.extend(appear);
        entry.vanish.extend(vanish);
    }

    /// Whether the cache (`exists`) shows every write made for `key`, or they expired.
    pub fn satisfied(&self, key: &str, exists: impl Fn(&str) -> bool) -> bool {
        self.satisfied_at(key, Instant::now(), exists)
    }

    fn satisfied_at(&self, key: &str, now: Instant, exists: impl Fn(&str) -> bool) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(p) = pending.get_mut(key) else { return true };
        p.appear.retain(|n| !exists(n));
        p.vanish.retain(|n| exists(n));
        if (p.appear.is_empty() && p.vanish.is_empty()) || now.duration_since(p.since) > self.ttl {
            pending.remove(key);
            return true;
        }
        false
    }

    /// Forgets the keys `keep` says no to (their owners are gone).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|k, _| keep(k));
    }
}

/// Records an event about `obj` as `component` (e.g. `default-scheduler`, `kubelet`), for
/// `kubectl describe`. A failure is logged, never returned: events are best effort.
pub(crate) async fn record<K>(
    client: &kube::Client,
    component: &str,
    obj: &K,
    warning: bool,
    reason: &str,
    note: String,
) where
    K: Resource<DynamicType = ()>,
{
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let reporter = Reporter {
        controller: component.to_string(),
        instance: None,
    };
    let event = Event {
        type_: if warning { EventType::Warning } else { EventType::Normal },
        reason: reason.to_string(),
        note: Some(note),
        action: reason.to_string(),
        secondary: None,
    };
    if let Err(e) = Recorder::new(client.clone(), reporter)
        .publish(&event, &obj.object_ref(&()))
        .await
    {
        tracing::debug!(component, reason, error = %e, "event not recorded");
    }
}

/// `kube::Error` for a 404 answer.
pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// `kube::Error` for a 409 answer (AlreadyExists or a conflict).
pub(crate) fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Now, as the API's timestamps.
pub(crate) fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())
}

/// Five random characters from the alphabet of the real server's generated names.
pub(crate) fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_wait_for_the_cache_then_clear() {
        let e = Expectations::new(Duration::from_secs(5));
        assert!(e.satisfied("d1", |_| false), "nothing expected");
        e.expect("d1", vec!["p1".into(), "p2".into()], vec!["old".into()]);
        assert!(!e.satisfied("d1", |n| n == "p1" || n == "old"));
        assert!(
            !e.satisfied("d1", |n| n == "p1" || n == "p2" || n == "old"),
            "old not gone yet"
        );
        assert!(e.satisfied("d1", |n| n == "p1" || n == "p2"));
        assert!(e.satisfied("d1", |_| false), "cleared once met");
    }

    #[test]
    fn expectations_expire() {
        let e = Expectations::new(Duration::from_secs(5));
        e.expect("d1", vec!["p1".into()], vec![]);
        assert!(!e.satisfied_at("d1", Instant::now(), |_| false));
        assert!(e.satisfied_at("d1", Instant::now() + Duration::from_secs(6), |_| false));
        e.expect("d2", vec!["p".into()], vec![]);
        e.retain(|k| k != "d2");
        assert!(e.satisfied("d2", |_| false));
    }

    #[test]
    fn random_suffixes_use_the_server_alphabet() {
        for _ in 0..50 {
            let s = random_suffix();
            assert_eq!(s.len(), 5);
            assert!(s.chars().all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c)));
        }
    }
}

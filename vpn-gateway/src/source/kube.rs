//! The Kubernetes source: `VpnPeer`, `VpnAccessPolicy` and `Service` watchers (kube-rs
//! reflectors), preshared keys read from the Secrets peers name, the gateway's private key
//! from a Secret (generated on first start), and `VpnPeer` and `VpnAccessPolicy` status
//! written back when it changed (a peer's counters at most every [`STATUS_INTERVAL`]).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service as K8sService};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::watch;

use super::{
    GatewayReport, PeerReport, PeerSnapshot, PeerSource, PolicySnapshot, PolicySource, ServiceCatalog, ServiceSnapshot,
};
use crate::catalog::{Protocol, Service, ServicePort};
use crate::crd::{CONDITION_ACCEPTED, Condition, VpnAccessPolicy, VpnAccessPolicyStatus, VpnPeer, VpnPeerStatus};
use crate::keys::{PresharedKey, PrivateKey};
use crate::peers::{Granted, PeerId, PeerInput};
use crate::policy::{PolicyId, PolicyInput, PolicyReport};

/// How often changed statuses are written.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// How often preshared-key Secrets are re-read even without a peer change.
const SECRET_REFRESH: Duration = Duration::from_secs(10);
/// Watch events arriving within this of each other make one snapshot: rebuilding it costs
/// O(peers), and at startup the gateway's own status writes bring one event per peer.
const BATCH_QUIET: Duration = Duration::from_millis(50);
/// A batch is cut after this even while events keep coming.
const BATCH_MAX: Duration = Duration::from_millis(250);
/// The Secret key holding the gateway's private key, and the default preshared-key key.
pub const PRIVATE_KEY_KEY: &str = "privateKey";
pub const PRESHARED_KEY_KEY: &str = "presharedKey";
/// The field manager of our status writes.
const MANAGER: &str = "kuberaya-gateway";
/// The first and the largest delay before a failed watch is retried.
const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(250);
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Retry delays of the watches: doubling from [`WATCH_BACKOFF_MIN`] to at most
/// [`WATCH_BACKOFF_MAX`] with up to 20% jitter, back to the start after any success.
/// kube-runtime's default (client-go's: up to 30 s, reset only after 2 quiet minutes)
/// kept the gateway blind for up to 25 s after a 12 s API server outage, and a revoked
/// peer connected as long; two watches retried every 5 s cost the server nothing.
#[derive(Clone, Debug)]
pub struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff {
            next: WATCH_BACKOFF_MIN,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (base * 2).min(WATCH_BACKOFF_MAX);
        // Replicas restarted together should not retry in step.
        Some(base.mul_f64(1.0 - 0.2 * rand::random::<f64>()))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = WATCH_BACKOFF_MIN;
    }
}

/// A client from `kubeconfig`, or the default (in-cluster, `$KUBECONFIG`, `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> crate::Result<Client> {
    let config = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .map_err(|e| crate::Error::Config(format!("kubeconfig {}: {e}", p.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| crate::Error::Config(format!("kubeconfig {}: {e}", p.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| crate::Error::Config(format!("kubeconfig: {e}")))?,
    };
    Ok(Client::try_from(config)?)
}

/// The gateway's private key from `namespace/name`; generated and stored when absent.
pub async fn load_or_create_key(client: &Client, namespace: &str, name: &str) -> crate::Result<PrivateKey> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if let Some(s) = api.get_opt(name).await? {
        return key_from_secret(&s)
            .ok_or_else(|| crate::Error::Config(format!("Secret {namespace}/{name} has no valid {PRIVATE_KEY_KEY}")));
    }
    let key = PrivateKey::generate();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            PRIVATE_KEY_KEY.to_string(),
            ByteString(key.to_base64().into_bytes()),
        )])),
        type_: Some("Opaque".to_string()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %format!("{namespace}/{name}"), "generated the gateway's private key");
            Ok(key)
        }
        // Another replica won the race: use its key.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = api.get(name).await?;
            key_from_secret(&s).ok_or_else(|| crate::Error::Config(format!("Secret {namespace}/{name} is invalid")))
        }
        Err(e) => Err(e.into()),
    }
}

fn key_from_secret(s: &Secret) -> Option<PrivateKey> {
    let bytes = s.data.as_ref()?.get(PRIVATE_KEY_KEY)?;
    PrivateKey::parse(std::str::from_utf8(&bytes.0).ok()?).ok()
}

/// The preshared key in a Secret's `key` (the value is the base64 text `wg genpsk` prints).
pub fn psk_from_secret(s: &Secret, key: &str) -> Result<PresharedKey, String> {
    let name = s.name_any();
    let bytes = s
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or_else(|| format!("Secret {name} has no key {key}"))?;
    let text = std::str::from_utf8(&bytes.0).map_err(|_| format!("Secret {name} key {key} is not text"))?;
    PresharedKey::parse(text).map_err(|e| format!("Secret {name} key {key}: {e}"))
}

/// A peer's preshared key from reading its Secret. A definite answer decides (the key; or
/// the Secret or key missing, invalid, or forbidden); when the API server does not answer
/// (unreachable, 5xx, 429) the `known` outcome of the last read stands, so an API server
/// outage or restart never cuts a peer whose Secret did not change.
pub fn psk_from_read(
    read: Result<Option<Secret>, kube::Error>,
    secret: &str,
    key: &str,
    known: Option<&Result<Option<PresharedKey>, String>>,
) -> Result<Option<PresharedKey>, String> {
    match read {
        Ok(Some(s)) => psk_from_secret(&s, key).map(Some),
        Ok(None) => Err(format!("Secret {secret} not found")),
        Err(kube::Error::Api(e)) if e.code < 500 && e.code != 429 => Err(format!("reading Secret {secret}: {e}")),
        Err(e) => match known {
            Some(k) => {
                tracing::debug!(secret, error = %e, "Secret unreadable; keeping the last known preshared key");
                k.clone()
            }
            None => Err(format!("reading Secret {secret}: {e}")),
        },
    }
}

/// A Kubernetes Service as the gateway sees it.
pub fn service_from_k8s(s: &K8sService) -> Option<Service> {
    let spec = s.spec.as_ref()?;
    let cluster_ip = spec
        .cluster_ip
        .as_deref()
        .filter(|ip| *ip != "None")
        .and_then(|ip| ip.parse::<IpAddr>().ok());
    // Both families of a dual-stack Service (`clusterIPs[0]` is `clusterIP`).
    let cluster_ips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .filter(|ip| *ip != "None")
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .collect();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                "SCTP" => Protocol::Sctp,
                _ => return None,
            };
            Some(ServicePort {
                name: p.name.clone(),
                port: u16::try_from(p.port).ok()?,
                protocol,
            })
        })
        .collect();
    Some(Service {
        namespace: s.namespace()?,
        name: s.metadata.name.clone()?,
        cluster_ip,
        cluster_ips,
        ports,
    })
}

/// What the reflector keeps of a `VpnPeer`: what [`peer_from_k8s`] reads. Managed fields,
/// annotations (kubectl's last-applied copy of the object) and status conditions are most
/// of an object's size, and the store holds every peer.
pub fn trim_peer(p: &mut VpnPeer) {
    p.metadata.managed_fields = None;
    p.metadata.annotations = None;
    if let Some(s) = p.status.as_mut() {
        // The Accepted condition's status (not its message) says what the peer holds.
        let accepted = s
            .conditions
            .drain(..)
            .find(|c| c.type_ == CONDITION_ACCEPTED)
            .map(|c| Condition {
                message: String::new(),
                ..c
            });
        *s = VpnPeerStatus {
            address: s.address.take(),
            last_address: s.last_address.take(),
            address_v6: s.address_v6.take(),
            last_address_v6: s.last_address_v6.take(),
            observed_generation: s.observed_generation,
            conditions: accepted.into_iter().collect(),
            ..Default::default()
        };
    }
}

/// A `VpnPeer` as a peer input (the preshared key still to be filled in).
pub fn peer_from_k8s(p: &VpnPeer) -> Option<PeerInput> {
    let mut input = PeerInput::new(PeerId::new(p.namespace()?, p.metadata.name.clone()?), p.spec.clone());
    input.generation = p.metadata.generation;
    input.created = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
    input.uid = p.metadata.uid.clone();
    input.labels = p.metadata.labels.clone().unwrap_or_default();
    let status = p.status.as_ref();
    let parse = |a: Option<&String>| a.and_then(|a| a.parse().ok());
    let parse6 = |a: Option<&String>| a.and_then(|a| a.parse().ok());
    // The address in use, else the one it had before it was cut off (disabled, expired).
    input.previous_address = status.and_then(|s| parse(s.address.as_ref().or(s.last_address.as_ref())));
    input.previous_address_v6 = status.and_then(|s| parse6(s.address_v6.as_ref().or(s.last_address_v6.as_ref())));
    // What the gateway granted, as it wrote it: the key only for the spec it judged.
    if let Some(s) = status
        && s.conditions
            .iter()
            .any(|c| c.type_ == CONDITION_ACCEPTED && c.status == "True")
    {
        input.granted = Granted {
            key: s.observed_generation.is_some() && s.observed_generation == p.metadata.generation,
            address: parse(s.address.as_ref()),
            address_v6: parse6(s.address_v6.as_ref()),
        };
    }
    Some(input)
}

/// What the reflector keeps of a `VpnAccessPolicy`: its spec, name and generation.
pub fn trim_policy(p: &mut VpnAccessPolicy) {
    p.metadata.managed_fields = None;
    p.metadata.annotations = None;
    p.status = None;
}

/// A `VpnAccessPolicy` as a policy input.
pub fn policy_from_k8s(p: &VpnAccessPolicy) -> Option<PolicyInput> {
    let mut input = PolicyInput::new(PolicyId::new(p.namespace()?, p.metadata.name.clone()?), p.spec.clone());
    input.generation = p.metadata.generation;
    input.uid = p.metadata.uid.clone();
    Some(input)
}

/// The status to write for a policy's report; the transition time is kept while the
/// condition's status stays.
pub fn policy_status_for(
    previous: Option<&VpnAccessPolicyStatus>,
    r: &PolicyReport,
    now: Timestamp,
) -> VpnAccessPolicyStatus {
    let (status, reason, message) = match &r.outcome {
        Ok(()) => {
            let mut m = format!("grants to {} peer(s)", r.matched_peers);
            if let Some(note) = &r.note {
                m.push_str("; ");
                m.push_str(note);
            }
            ("True", "Accepted".to_string(), m)
        }
        Err(e) => ("False", e.reason().to_string(), e.to_string()),
    };
    VpnAccessPolicyStatus {
        conditions: vec![accepted_condition(
            previous.map(|p| &p.conditions[..]),
            status,
            reason,
            message,
            now,
        )],
        matched_peers: r.matched_peers,
        observed_generation: r.generation,
    }
}

/// The `Accepted` condition, keeping the previous one's transition time while its status
/// stays the same (one rule for peers and policies).
fn accepted_condition(
    previous: Option<&[Condition]>,
    status: &str,
    reason: String,
    message: String,
    now: Timestamp,
) -> Condition {
    let last_transition_time = match previous.into_iter().flatten().find(|c| c.type_ == CONDITION_ACCEPTED) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(now),
    };
    Condition {
        type_: CONDITION_ACCEPTED.to_string(),
        status: status.to_string(),
        reason,
        message,
        last_transition_time,
    }
}

/// The status to write for a report, keeping the condition's transition time when its
/// status did not change. A peer not served (disabled, expired, rejected) has no
/// `address`: only `lastAddress`, kept to give it back.
pub fn status_for(previous: Option<&VpnPeerStatus>, r: &PeerReport, now: Timestamp) -> VpnPeerStatus {
    let (status, reason, message) = match &r.outcome {
        Ok(a) => match r.address_v6 {
            Some(v6) => ("True", "Accepted".to_string(), format!("serving at {a} and {v6}")),
            None => ("True", "Accepted".to_string(), format!("serving at {a}")),
        },
        Err(e) => ("False", e.reason().to_string(), e.to_string()),
    };
    VpnPeerStatus {
        conditions: vec![accepted_condition(
            previous.map(|p| &p.conditions[..]),
            status,
            reason,
            message,
            now,
        )],
        address: r.outcome.as_ref().ok().map(|a| a.to_string()),
        last_address: r.last_address.map(|a| a.to_string()),
        address_v6: r.outcome.as_ref().ok().and(r.address_v6).map(|a| a.to_string()),
        last_address_v6: r.last_address_v6.map(|a| a.to_string()),
        last_handshake: r
            .last_handshake
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .and_then(|d| Timestamp::from_second(d.as_secs() as i64).ok())
            .map(Time)
            .or_else(|| previous.and_then(|p| p.last_handshake.clone())),
        rx_bytes: r.rx_bytes,
        tx_bytes: r.tx_bytes,
        observed_generation: r.generation,
    }
}

/// Watches VpnPeers, Services and the preshared-key Secrets; the watchers stop when it is
/// dropped.
pub struct KubeSource {
    peers: watch::Receiver<PeerSnapshot>,
    services: watch::Receiver<ServiceSnapshot>,
    policies: watch::Receiver<PolicySnapshot>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl KubeSource {
    /// Start the watchers (inside a tokio runtime).
    pub fn start(client: Client) -> Arc<Self> {
        let (ptx, prx) = watch::channel(PeerSnapshot::default());
        let (stx, srx) = watch::channel(ServiceSnapshot::default());

        let svc_api: Api<K8sService> = Api::all(client.clone());
        let (svc_store, svc_writer) = reflector::store();
        let svc_stream = watcher(svc_api, watcher::Config::default())
            .backoff(WatchBackoff::default())
            .reflect(svc_writer);
        let services_task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(svc_stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                        let mut services: Vec<Service> =
                            svc_store.state().iter().filter_map(|s| service_from_k8s(s)).collect();
                        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
                        stx.send_if_modified(|old| {
                            let new = ServiceSnapshot { services, loaded: true };
                            if *old != new {
                                *old = new;
                                true
                            } else {
                                false
                            }
                        });
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "Service watch"),
                }
            }
        });

        let (poltx, polrx) = watch::channel(PolicySnapshot::default());
        let policies_task = tokio::spawn(watch_policies(client.clone(), poltx));

        let peer_api: Api<VpnPeer> = Api::all(client.clone());
        let (peer_store, peer_writer) = reflector::store();
        let peer_stream = watcher(peer_api, watcher::Config::default())
            .backoff(WatchBackoff::default())
            .modify(trim_peer)
            .reflect(peer_writer);
        let peers_task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(peer_stream);
            let mut ready = false;
            let mut refresh = tokio::time::interval(SECRET_REFRESH);
            // The last outcome of each (namespace, Secret, key) read, kept for reads the
            // API server does not answer.
            let mut psk_known: HashMap<(String, String, String), Result<Option<PresharedKey>, String>> = HashMap::new();
            loop {
                tokio::select! {
                    ev = stream.next() => match ev {
                        None => return,
                        Some(Ok(watcher::Event::InitDone)) => ready = true,
                        Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))) => {}
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => { tracing::warn!(error = %e, "VpnPeer watch"); continue; }
                    },
                    _ = refresh.tick() => {}
                }
                if !ready {
                    continue;
                }
                // Take what else arrives right behind (the store has it already).
                let batch = tokio::time::Instant::now() + BATCH_MAX;
                loop {
                    let until = batch.min(tokio::time::Instant::now() + BATCH_QUIET);
                    match tokio::time::timeout_at(until, stream.next()).await {
                        Err(_) => break,
                        Ok(None) => return,
                        Ok(Some(Ok(_))) => {}
                        Ok(Some(Err(e))) => tracing::warn!(error = %e, "VpnPeer watch"),
                    }
                }
                let mut peers = Vec::new();
                let mut read = HashMap::new();
                for p in peer_store.state() {
                    let Some(mut input) = peer_from_k8s(&p) else { continue };
                    if let Some(r) = &p.spec.preshared_key_secret_ref {
                        let api: Api<Secret> = Api::namespaced(client.clone(), &input.id.namespace);
                        let key = r.key.as_deref().unwrap_or(PRESHARED_KEY_KEY);
                        let at = (input.id.namespace.clone(), r.name.clone(), key.to_string());
                        let outcome = psk_from_read(api.get_opt(&r.name).await, &r.name, key, psk_known.get(&at));
                        read.insert(at, outcome.clone());
                        input.preshared_key = outcome;
                    }
                    peers.push(input);
                }
                // Only keys still referenced are remembered.
                psk_known = read;
                peers.sort_by(|a, b| a.id.cmp(&b.id));
                ptx.send_if_modified(|old| {
                    let new = PeerSnapshot { peers, loaded: true };
                    if *old != new {
                        *old = new;
                        true
                    } else {
                        false
                    }
                });
            }
        });
        Arc::new(KubeSource {
            peers: prx,
            services: srx,
            policies: polrx,
            tasks: vec![services_task, peers_task, policies_task],
        })
    }
}

impl PeerSource for KubeSource {
    fn peers(&self) -> watch::Receiver<PeerSnapshot> {
        self.peers.clone()
    }
}

impl PolicySource for KubeSource {
    fn policies(&self) -> watch::Receiver<PolicySnapshot> {
        self.policies.clone()
    }
}

/// What the policy watch hears: a change of policies or of namespaces' labels.
enum PolicyEvent {
    Policies(Result<watcher::Event<VpnAccessPolicy>, watcher::Error>),
    Namespaces(Result<watcher::Event<Namespace>, watcher::Error>),
}

/// Keep `tx` at every `VpnAccessPolicy` (trimmed) and the labels of every namespace, in
/// batches like the peers. Without the CRD (a bundle installed before policies existed)
/// the watch fails and retries; the peers are served by their own rules meanwhile.
async fn watch_policies(client: Client, tx: watch::Sender<PolicySnapshot>) {
    let (store, writer) = reflector::store();
    let policies = watcher(Api::<VpnAccessPolicy>::all(client.clone()), watcher::Config::default())
        .backoff(WatchBackoff::default())
        .modify(trim_policy)
        .reflect(writer)
        .map(PolicyEvent::Policies);
    let (ns_store, ns_writer) = reflector::store();
    let namespaces = watcher(Api::<Namespace>::all(client), watcher::Config::default())
        .backoff(WatchBackoff::default())
        .modify(|n: &mut Namespace| {
            n.metadata.managed_fields = None;
            n.metadata.annotations = None;
            n.spec = None;
            n.status = None;
        })
        .reflect(ns_writer)
        .map(PolicyEvent::Namespaces);
    let mut stream = std::pin::pin!(futures::stream::select(policies, namespaces));
    let mut ready = false;
    let mut errors = 0u64;
    loop {
        match stream.next().await {
            None => return,
            Some(PolicyEvent::Policies(Ok(watcher::Event::InitDone))) => ready = true,
            Some(PolicyEvent::Policies(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)))) => {}
            Some(PolicyEvent::Namespaces(Ok(
                watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_),
            ))) => {}
            Some(PolicyEvent::Policies(Ok(_)) | PolicyEvent::Namespaces(Ok(_))) => continue,
            Some(PolicyEvent::Namespaces(Err(e))) => {
                tracing::warn!(error = %e, "Namespace watch");
                continue;
            }
            Some(PolicyEvent::Policies(Err(e))) => {
                // A missing CRD fails every retry: said once, then at debug level.
                errors += 1;
                if errors == 1 {
                    tracing::warn!(error = %e, "VpnAccessPolicy watch (is deploy/crds/vpnaccesspolicy.yaml applied?)");
                } else {
                    tracing::debug!(error = %e, "VpnAccessPolicy watch");
                }
                continue;
            }
        }
        errors = 0;
        if !ready {
            continue;
        }
        let batch = tokio::time::Instant::now() + BATCH_MAX;
        loop {
            let until = batch.min(tokio::time::Instant::now() + BATCH_QUIET);
            match tokio::time::timeout_at(until, stream.next()).await {
                Err(_) => break,
                Ok(None) => return,
                Ok(Some(_)) => {}
            }
        }
        let mut policies: Vec<PolicyInput> = store.state().iter().filter_map(|p| policy_from_k8s(p)).collect();
        policies.sort_by(|a, b| a.id.cmp(&b.id));
        let namespaces = ns_store
            .state()
            .iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.labels.clone().unwrap_or_default())))
            .collect();
        tx.send_if_modified(|old| {
            let new = PolicySnapshot {
                policies,
                namespaces,
                loaded: true,
            };
            if *old != new {
                *old = new;
                true
            } else {
                false
            }
        });
    }
}

impl ServiceCatalog for KubeSource {
    fn services(&self) -> watch::Receiver<ServiceSnapshot> {
        self.services.clone()
    }
}

/// Write statuses until the report channel closes: a peer's acceptance (condition,
/// address, generation) as soon as the gateway reports it changed, and its counters (last
/// handshake, bytes) at most every `every`; a policy's condition and matched peers as soon
/// as they change.
/// Writes the gateway's reports as status while this replica leads (`leading`); a replica
/// that does not lead writes nothing, and forgets what it wrote, so that when it leads
/// again it writes every status afresh.
pub async fn write_status(
    client: Client,
    mut reports: watch::Receiver<GatewayReport>,
    every: Duration,
    mut leading: watch::Receiver<bool>,
) {
    // What was written, as hashes and the few fields the next status carries over: the
    // whole status was ~400 bytes a peer.
    let mut written: HashMap<PeerId, Written> = HashMap::new();
    // Policies are few and small: their uid and last written status, whole.
    let mut policies_written: HashMap<PolicyId, (Option<String>, VpnAccessPolicyStatus)> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut election_open = true;
    loop {
        let counters = tokio::select! {
            r = leading.changed(), if election_open => {
                // A replica alone (no election) keeps leading.
                election_open = r.is_ok();
                false
            }
            _ = tick.tick() => {
                if reports.has_changed().is_err() {
                    return;
                }
                true
            }
            r = reports.changed() => {
                if r.is_err() {
                    return;
                }
                false
            }
        };
        if !*leading.borrow() {
            // Seen, not written.
            drop(reports.borrow_and_update());
            written.clear();
            policies_written.clear();
            continue;
        }
        let report = reports.borrow_and_update().clone();
        let now = Timestamp::now();
        for r in &report.peers {
            // Lost the Lease while writing: the new leader writes from here on.
            if !*leading.borrow() {
                break;
            }
            let prev = written.get(&r.id);
            let status = status_for(prev.map(Written::previous).as_ref(), r, now);
            let new = Written::of(&status);
            if !status_due(prev, &new, counters) {
                continue;
            }
            match patch_status(&client, &r.id, &status).await {
                Ok(()) => {
                    written.insert(r.id.clone(), new);
                }
                // Deleted since the report: nothing to write.
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    tracing::debug!(peer = %r.id, "VpnPeer gone before its status was written");
                    written.remove(&r.id);
                }
                Err(e) => tracing::warn!(peer = %r.id, error = %e, "writing VpnPeer status"),
            }
        }
        let current: std::collections::HashSet<&PeerId> = report.peers.iter().map(|r| &r.id).collect();
        written.retain(|id, _| current.contains(id));
        for r in &report.policies {
            // What was written to this object (not to an older one of the same name).
            let prev = policies_written
                .get(&r.id)
                .filter(|(uid, _)| *uid == r.uid)
                .map(|(_, s)| s);
            let status = policy_status_for(prev, r, now);
            // Only when something but the time changed.
            if prev.is_some_and(|p| *p == status) {
                continue;
            }
            match patch_policy_status(&client, &r.id, &status).await {
                Ok(()) => {
                    policies_written.insert(r.id.clone(), (r.uid.clone(), status));
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    policies_written.remove(&r.id);
                }
                Err(e) => tracing::warn!(policy = %r.id, error = %e, "writing VpnAccessPolicy status"),
            }
        }
        let current: std::collections::HashSet<&PolicyId> = report.policies.iter().map(|r| &r.id).collect();
        policies_written.retain(|id, _| current.contains(id));
    }
}

/// `PATCH` a `VpnAccessPolicy`'s status (merge; the response is not parsed).
async fn patch_policy_status(client: &Client, id: &PolicyId, status: &VpnAccessPolicyStatus) -> kube::Result<()> {
    use kube::Resource;
    let url = VpnAccessPolicy::url_path(&(), Some(&id.namespace));
    let patch = serde_json::json!({ "status": status });
    let req = kube::core::Request::new(url)
        .patch_subresource("status", &id.name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
        .map_err(kube::Error::BuildRequest)?;
    client.request_text(req).await.map(drop)
}

/// `PATCH` a `VpnPeer`'s status. The response (the whole object) is read but not parsed:
/// 10,000 of them parsed into `VpnPeer`s were a peak of allocations for nothing.
async fn patch_status(client: &Client, id: &PeerId, status: &VpnPeerStatus) -> kube::Result<()> {
    use kube::Resource;
    let url = VpnPeer::url_path(&(), Some(&id.namespace));
    let patch = status_patch(status);
    let req = kube::core::Request::new(url)
        .patch_subresource("status", &id.name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
        .map_err(kube::Error::BuildRequest)?;
    client.request_text(req).await.map(drop)
}

/// The merge patch of a status: an absent `address` is written as `null`, since a merge
/// patch leaves out fields alone, and an expired or disabled peer kept showing the address
/// it no longer has.
fn status_patch(status: &VpnPeerStatus) -> serde_json::Value {
    let mut s = serde_json::to_value(status).unwrap_or_default();
    if let Some(m) = s.as_object_mut() {
        if status.address.is_none() {
            m.insert("address".to_string(), serde_json::Value::Null);
        }
        if status.address_v6.is_none() {
            m.insert("addressV6".to_string(), serde_json::Value::Null);
        }
    }
    serde_json::json!({ "status": s })
}

/// A hash of `value`'s JSON, without building the JSON.
fn json_hash(value: &impl serde::Serialize) -> u64 {
    use std::hash::Hasher;
    struct HashWriter(std::collections::hash_map::DefaultHasher);
    impl std::io::Write for HashWriter {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.write(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = HashWriter(Default::default());
    // Serialising plain data into a writer that cannot fail does not fail.
    let _ = serde_json::to_writer(&mut w, value);
    w.0.finish()
}

/// What the status writer keeps of a status it wrote.
#[derive(Clone, Debug, PartialEq)]
struct Written {
    /// Condition, address and observed generation: written at once when they change.
    acceptance: u64,
    /// Everything, counters included.
    whole: u64,
    /// Carried over to the next status.
    accepted: String,
    last_transition_time: Time,
    last_handshake: Option<Time>,
}

impl Written {
    fn of(s: &VpnPeerStatus) -> Self {
        let cond = s.conditions.iter().find(|c| c.type_ == CONDITION_ACCEPTED);
        Written {
            acceptance: json_hash(&(&s.conditions, &s.address, &s.address_v6, &s.observed_generation)),
            whole: json_hash(s),
            accepted: cond.map(|c| c.status.clone()).unwrap_or_default(),
            last_transition_time: cond
                .map(|c| c.last_transition_time.clone())
                .unwrap_or(Time(Timestamp::UNIX_EPOCH)),
            last_handshake: s.last_handshake.clone(),
        }
    }

    /// As much of the written status as [`status_for`] reads.
    fn previous(&self) -> VpnPeerStatus {
        VpnPeerStatus {
            conditions: vec![Condition {
                type_: CONDITION_ACCEPTED.to_string(),
                status: self.accepted.clone(),
                reason: String::new(),
                message: String::new(),
                last_transition_time: self.last_transition_time.clone(),
            }],
            last_handshake: self.last_handshake.clone(),
            ..Default::default()
        }
    }
}

/// Whether `new` must be written over `prev`: always when the peer's acceptance changed,
/// and for counters only when `counters` (the status interval came round).
fn status_due(prev: Option<&Written>, new: &Written, counters: bool) -> bool {
    let Some(prev) = prev else { return true };
    if prev.whole == new.whole {
        return false;
    }
    counters || prev.acceptance != new.acceptance
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::Rejection;
    use std::net::Ipv4Addr;

    #[test]
    fn a_dual_stack_service_has_both_cluster_ips() {
        let s: K8sService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "fd00:96::10", "clusterIPs": ["fd00:96::10", "127.96.0.10"],
                     "ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "PreferDualStack",
                     "ports": [{"name": "http", "port": 80}]}
        }))
        .unwrap();
        let c = service_from_k8s(&s).unwrap();
        assert_eq!(c.cluster_ip, Some("fd00:96::10".parse().unwrap()));
        let all: Vec<IpAddr> = c.addresses().collect();
        assert_eq!(
            all,
            ["fd00:96::10".parse::<IpAddr>().unwrap(), "127.96.0.10".parse().unwrap()]
        );
        // A headless one has none of either.
        let headless: K8sService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "h", "namespace": "default"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"]}
        }))
        .unwrap();
        assert_eq!(service_from_k8s(&headless).unwrap().addresses().count(), 0);
    }

    #[test]
    fn services_convert() {
        let s: K8sService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}, {"port": 53, "protocol": "UDP"}]}
        }))
        .unwrap();
        let c = service_from_k8s(&s).unwrap();
        assert_eq!(c.cluster_ip, Some("10.96.0.10".parse().unwrap()));
        assert_eq!(
            c.ports[0],
            ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Protocol::Tcp
            }
        );
        assert_eq!(c.ports[1].protocol, Protocol::Udp);
        let headless: K8sService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "h", "namespace": "default"}, "spec": {"clusterIP": "None"}
        }))
        .unwrap();
        assert_eq!(service_from_k8s(&headless).unwrap().cluster_ip, None);
    }

    #[test]
    fn peers_convert_with_previous_address() {
        let p: VpnPeer = serde_json::from_value(serde_json::json!({
            "apiVersion": "vpn.cloudraya.com/v1alpha1", "kind": "VpnPeer",
            "metadata": {"name": "alice", "namespace": "team", "generation": 3},
            "spec": {"publicKey": "k"},
            "status": {"address": "100.64.0.7", "conditions": []}
        }))
        .unwrap();
        let i = peer_from_k8s(&p).unwrap();
        assert_eq!(i.id, PeerId::new("team", "alice"));
        assert_eq!(i.previous_address, Some(Ipv4Addr::new(100, 64, 0, 7)));
        assert_eq!(i.generation, Some(3));
        assert_eq!(i.granted, Granted::default(), "no Accepted=True: nothing held");
    }

    #[test]
    fn the_ipv6_address_round_trips_through_the_status() {
        let v6: std::net::Ipv6Addr = "fd6b:7261:7961::7".parse().unwrap();
        let served = PeerReport {
            id: PeerId::new("team", "alice"),
            generation: Some(2),
            outcome: Ok(Ipv4Addr::new(100, 64, 0, 7)),
            last_address: Some(Ipv4Addr::new(100, 64, 0, 7)),
            address_v6: Some(v6),
            last_address_v6: Some(v6),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        };
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let s = status_for(None, &served, t0);
        assert_eq!(s.address_v6.as_deref(), Some("fd6b:7261:7961::7"));
        assert_eq!(s.last_address_v6.as_deref(), Some("fd6b:7261:7961::7"));
        assert_eq!(s.conditions[0].message, "serving at 100.64.0.7 and fd6b:7261:7961::7");
        let mut p: VpnPeer = serde_json::from_value(serde_json::json!({
            "apiVersion": "vpn.cloudraya.com/v1alpha1", "kind": "VpnPeer",
            "metadata": {"name": "alice", "namespace": "team", "generation": 2},
            "spec": {"publicKey": "k", "addressV6": "fd6b:7261:7961::7"}
        }))
        .unwrap();
        assert_eq!(p.spec.address_v6.as_deref(), Some("fd6b:7261:7961::7"));
        p.status = Some(s);
        trim_peer(&mut p);
        let i = peer_from_k8s(&p).unwrap();
        assert_eq!(i.granted.address_v6, Some(v6));
        assert_eq!(i.previous_address_v6, Some(v6));
        // Cut off: no address in use, both written as null; the last one kept to give back.
        let off = PeerReport {
            outcome: Err(Rejection::Disabled),
            ..served
        };
        let s = status_for(None, &off, t0);
        assert_eq!(
            (s.address_v6.as_deref(), s.last_address_v6.as_deref()),
            (None, Some("fd6b:7261:7961::7"))
        );
        let patch = status_patch(&s);
        assert_eq!(patch["status"]["addressV6"], serde_json::Value::Null);
        assert_eq!(patch["status"]["lastAddressV6"], "fd6b:7261:7961::7");
        p.status = Some(s);
        let i = peer_from_k8s(&p).unwrap();
        assert_eq!(i.granted.address_v6, None);
        assert_eq!(i.previous_address_v6, Some(v6));
    }

    #[test]
    fn a_peer_holds_what_its_status_says_it_was_granted() {
        let peer = |generation: i64, observed: i64, accepted: &str| -> VpnPeer {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "vpn.cloudraya.com/v1alpha1", "kind": "VpnPeer",
                "metadata": {"name": "alice", "namespace": "team", "generation": generation,
                             "uid": "u-1", "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"publicKey": "k"},
                "status": {"address": "100.64.0.7", "observedGeneration": observed,
                           "conditions": [{"type": "Accepted", "status": accepted, "reason": "Accepted",
                                           "message": "serving", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
            }))
            .unwrap()
        };
        let i = peer_from_k8s(&peer(3, 3, "True")).unwrap();
        assert_eq!(i.created, Some("2026-01-01T00:00:00Z".parse().unwrap()));
        assert_eq!(i.uid.as_deref(), Some("u-1"));
        let at = Some(Ipv4Addr::new(100, 64, 0, 7));
        assert_eq!(
            i.granted,
            Granted {
                key: true,
                address: at,
                address_v6: None
            }
        );
        // Edited since: the address is still held, the key in the new spec is not.
        assert_eq!(
            peer_from_k8s(&peer(4, 3, "True")).unwrap().granted,
            Granted {
                key: false,
                address: at,
                address_v6: None
            }
        );
        assert_eq!(peer_from_k8s(&peer(3, 3, "False")).unwrap().granted, Granted::default());
        // The reflector's trimmed copy says the same.
        let mut trimmed = peer(3, 3, "True");
        trim_peer(&mut trimmed);
        assert_eq!(peer_from_k8s(&trimmed).unwrap(), i);
    }

    #[test]
    fn trimmed_peers_convert_the_same() {
        let mut p: VpnPeer = serde_json::from_value(serde_json::json!({
            "apiVersion": "vpn.cloudraya.com/v1alpha1", "kind": "VpnPeer",
            "metadata": {"name": "alice", "namespace": "team", "generation": 3,
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                         "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"publicKey": "k", "allow": [{"service": "web"}]},
            "status": {"address": "100.64.0.7", "rxBytes": 5,
                       "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                                       "message": "serving", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap();
        let before = peer_from_k8s(&p).unwrap();
        trim_peer(&mut p);
        assert_eq!(peer_from_k8s(&p).unwrap(), before);
        assert!(p.metadata.managed_fields.is_none() && p.metadata.annotations.is_none());
        let kept = &p.status.as_ref().unwrap().conditions;
        assert_eq!(
            (kept.len(), kept[0].status.as_str(), kept[0].message.as_str()),
            (1, "True", "")
        );
    }

    #[test]
    fn a_trimmed_peer_keeps_its_labels_for_policies() {
        let mut p: VpnPeer = serde_json::from_value(serde_json::json!({
            "apiVersion": "vpn.cloudraya.com/v1alpha1", "kind": "VpnPeer",
            "metadata": {"name": "alice", "namespace": "team", "labels": {"role": "dba"},
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {"publicKey": "k"}
        }))
        .unwrap();
        trim_peer(&mut p);
        let i = peer_from_k8s(&p).unwrap();
        assert_eq!(i.labels.get("role").map(String::as_str), Some("dba"));
    }

    #[test]
    fn policies_convert_and_report_their_status() {
        use crate::policy::PolicyRejection;
        let mut p: VpnAccessPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "vpn.cloudraya.com/v1alpha1", "kind": "VpnAccessPolicy",
            "metadata": {"name": "db", "namespace": "team", "generation": 2, "uid": "u-9",
                         "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"peerSelector": {"matchLabels": {"role": "dba"}}, "allow": [{"service": "pg"}]},
            "status": {"matchedPeers": 3, "conditions": []}
        }))
        .unwrap();
        trim_policy(&mut p);
        assert!(p.status.is_none() && p.metadata.managed_fields.is_none());
        let i = policy_from_k8s(&p).unwrap();
        assert_eq!(
            (i.id.to_string(), i.generation, i.uid.as_deref()),
            ("team/db".to_string(), Some(2), Some("u-9"))
        );
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let mut r = PolicyReport {
            id: i.id.clone(),
            uid: None,
            generation: Some(2),
            outcome: Ok(()),
            matched_peers: 2,
            note: None,
        };
        let s0 = policy_status_for(None, &r, t0);
        assert_eq!(
            (
                s0.conditions[0].status.as_str(),
                s0.matched_peers,
                s0.observed_generation
            ),
            ("True", 2, Some(2))
        );
        assert_eq!(policy_status_for(Some(&s0), &r, t1), s0, "unchanged: nothing to write");
        r.outcome = Err(PolicyRejection::Expired("2026-01-01T00:00:30Z".into()));
        r.matched_peers = 0;
        let s1 = policy_status_for(Some(&s0), &r, t1);
        let c = &s1.conditions[0];
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Expired"));
        assert_eq!(c.last_transition_time, Time(t1));
        assert_eq!(s1.matched_peers, 0);
    }

    #[test]
    fn status_keeps_transition_time_until_the_condition_flips() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let mut r = PeerReport {
            id: PeerId::new("a", "b"),
            generation: Some(1),
            outcome: Ok(Ipv4Addr::new(100, 64, 0, 2)),
            last_address: Some(Ipv4Addr::new(100, 64, 0, 2)),
            address_v6: None,
            last_address_v6: None,
            last_handshake: None,
            rx_bytes: 10,
            tx_bytes: 20,
        };
        let s0 = status_for(None, &r, t0);
        assert_eq!(s0.conditions[0].status, "True");
        assert_eq!(s0.address.as_deref(), Some("100.64.0.2"));
        let s1 = status_for(Some(&s0), &r, t1);
        assert_eq!(s1.conditions[0].last_transition_time, Time(t0));
        r.outcome = Err(Rejection::Disabled);
        let s2 = status_for(Some(&s1), &r, t1);
        assert_eq!(s2.conditions[0].status, "False");
        assert_eq!(s2.conditions[0].reason, "Disabled");
        assert_eq!(s2.conditions[0].last_transition_time, Time(t1));
        assert_eq!(s2.address, None);
    }

    #[test]
    fn an_expired_peer_says_so_and_has_no_address_in_use() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
        let served = PeerReport {
            id: PeerId::new("a", "b"),
            generation: Some(1),
            outcome: Ok(Ipv4Addr::new(100, 64, 0, 7)),
            last_address: Some(Ipv4Addr::new(100, 64, 0, 7)),
            address_v6: None,
            last_address_v6: None,
            last_handshake: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600)),
            rx_bytes: 5,
            tx_bytes: 6,
        };
        let s0 = status_for(None, &served, t0);
        let expired = PeerReport {
            outcome: Err(Rejection::Expired("2026-01-01T00:09:00Z".into())),
            last_handshake: None,
            ..served.clone()
        };
        let s1 = status_for(Some(&s0), &expired, t1);
        let c = &s1.conditions[0];
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Expired"));
        assert!(c.message.contains("2026-01-01T00:09:00Z"), "{}", c.message);
        assert_eq!(c.last_transition_time, Time(t1));
        assert_eq!(s1.address, None, "no address in use");
        assert_eq!(s1.last_address.as_deref(), Some("100.64.0.7"), "kept to give it back");
        assert_eq!(s1.last_handshake, s0.last_handshake, "the last handshake stays history");
        // The patch clears the address the object still has; the last one is written.
        let patch = status_patch(&s1);
        assert_eq!(patch["status"]["address"], serde_json::Value::Null);
        assert_eq!(patch["status"]["lastAddress"], "100.64.0.7");
        assert_eq!(patch["status"]["conditions"][0]["reason"], "Expired");
        let mut object = serde_json::json!({"status": serde_json::to_value(&s0).unwrap()});
        json_merge(&mut object, &patch);
        let after: VpnPeerStatus = serde_json::from_value(object["status"].clone()).unwrap();
        assert_eq!(after.address, None);
        assert_eq!(after.conditions, s1.conditions);
        // A served peer's patch carries its address.
        assert_eq!(status_patch(&s0)["status"]["address"], "100.64.0.7");
        // Disabled and other rejections alike.
        for r in [Rejection::Disabled, Rejection::BadKey("x".into())] {
            let s = status_for(
                Some(&s0),
                &PeerReport {
                    outcome: Err(r),
                    ..served.clone()
                },
                t1,
            );
            assert_eq!((s.address, s.last_address.as_deref()), (None, Some("100.64.0.7")));
        }
    }

    #[test]
    fn a_peer_served_again_gets_its_last_address_back() {
        let p: VpnPeer = serde_json::from_value(serde_json::json!({
            "apiVersion": "vpn.cloudraya.com/v1alpha1", "kind": "VpnPeer",
            "metadata": {"name": "alice", "namespace": "team"},
            "spec": {"publicKey": "k"},
            "status": {"lastAddress": "100.64.0.9", "conditions": []}
        }))
        .unwrap();
        let mut trimmed = p.clone();
        trim_peer(&mut trimmed);
        assert_eq!(
            peer_from_k8s(&trimmed).unwrap().previous_address,
            Some(Ipv4Addr::new(100, 64, 0, 9))
        );
    }

    /// RFC 7386, as the API server applies a merge patch.
    fn json_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        match (target.as_object_mut(), patch.as_object()) {
            (Some(t), Some(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        json_merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                    }
                }
            }
            _ => *target = patch.clone(),
        }
    }

    #[test]
    fn acceptance_is_written_at_once_counters_at_the_interval() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut r = PeerReport {
            id: PeerId::new("a", "b"),
            generation: Some(1),
            outcome: Ok(Ipv4Addr::new(100, 64, 0, 2)),
            last_address: Some(Ipv4Addr::new(100, 64, 0, 2)),
            address_v6: None,
            last_address_v6: None,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        };
        let due = |prev: &VpnPeerStatus, new: &VpnPeerStatus, counters| {
            status_due(Some(&Written::of(prev)), &Written::of(new), counters)
        };
        let s0 = status_for(None, &r, t0);
        assert!(
            status_due(None, &Written::of(&s0), false),
            "a new peer's status is written at once"
        );
        assert!(!due(&s0, &s0, true), "nothing changed");
        r.rx_bytes = 100;
        r.last_handshake = Some(SystemTime::now());
        let s1 = status_for(Some(&s0), &r, t0);
        assert!(!due(&s0, &s1, false), "counters wait for the interval");
        assert!(due(&s0, &s1, true));
        r.outcome = Err(Rejection::Disabled);
        let s2 = status_for(Some(&s1), &r, t0);
        assert!(due(&s1, &s2, false), "a rejection is written at once");
        r.outcome = Ok(Ipv4Addr::new(100, 64, 0, 2));
        r.generation = Some(2);
        let s3 = status_for(Some(&s1), &r, t0);
        assert!(due(&s1, &s3, false), "a new generation is acknowledged at once");
    }

    #[test]
    fn what_is_kept_of_a_written_status_gives_the_same_next_status() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:05:00Z".parse().unwrap();
        let mut r = PeerReport {
            id: PeerId::new("a", "b"),
            generation: Some(1),
            outcome: Ok(Ipv4Addr::new(100, 64, 0, 2)),
            last_address: Some(Ipv4Addr::new(100, 64, 0, 2)),
            address_v6: None,
            last_address_v6: None,
            last_handshake: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600)),
            rx_bytes: 7,
            tx_bytes: 9,
        };
        let s0 = status_for(None, &r, t0);
        let kept = Written::of(&s0).previous();
        r.last_handshake = None;
        for outcome in [Ok(Ipv4Addr::new(100, 64, 0, 2)), Err(Rejection::Disabled)] {
            r.outcome = outcome;
            assert_eq!(status_for(Some(&kept), &r, t1), status_for(Some(&s0), &r, t1));
        }
        assert_ne!(
            Written::of(&s0).whole,
            Written::of(&status_for(Some(&s0), &r, t1)).whole
        );
    }

    #[test]
    fn watch_retries_are_capped_and_reset() {
        use kube::runtime::utils::Backoff;
        let mut b = WatchBackoff::default();
        let delays: Vec<Duration> = b.by_ref().take(8).collect();
        assert!(delays[0] <= WATCH_BACKOFF_MIN && delays[0] >= WATCH_BACKOFF_MIN.mul_f64(0.8));
        assert!(delays.windows(2).take(4).all(|w| w[1] > w[0]), "doubling: {delays:?}");
        assert!(delays.iter().all(|d| *d <= WATCH_BACKOFF_MAX), "capped: {delays:?}");
        assert!(delays[7] >= WATCH_BACKOFF_MAX.mul_f64(0.8), "{delays:?}");
        b.reset();
        assert!(b.next().unwrap() <= WATCH_BACKOFF_MIN);
    }

    #[test]
    fn unanswered_secret_reads_keep_the_known_key() {
        let psk = PresharedKey([7; 32]);
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some("carol-psk".into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                PRESHARED_KEY_KEY.to_string(),
                ByteString(base64::Engine::encode(&base64::engine::general_purpose::STANDARD, psk.0).into_bytes()),
            )])),
            ..Default::default()
        };
        let known = psk_from_read(Ok(Some(secret)), "carol-psk", PRESHARED_KEY_KEY, None);
        assert_eq!(known, Ok(Some(psk.clone())));
        let api_error = |code: u16| {
            kube::Error::Api(
                kube::core::Status::failure("injected", "Injected")
                    .with_code(code)
                    .boxed(),
            )
        };
        // The API server did not answer: the last outcome stands.
        for unanswered in [500, 503, 429] {
            assert_eq!(
                psk_from_read(Err(api_error(unanswered)), "carol-psk", PRESHARED_KEY_KEY, Some(&known)),
                Ok(Some(psk.clone())),
                "{unanswered}"
            );
        }
        let unreachable = kube::Error::Service(Box::new(std::io::Error::other("connection refused")));
        assert_eq!(
            psk_from_read(Err(unreachable), "carol-psk", PRESHARED_KEY_KEY, Some(&known)),
            Ok(Some(psk))
        );
        // Nothing known yet: the peer waits, rejected.
        assert!(psk_from_read(Err(api_error(503)), "carol-psk", PRESHARED_KEY_KEY, None).is_err());
        // Definite answers decide.
        assert!(psk_from_read(Ok(None), "carol-psk", PRESHARED_KEY_KEY, Some(&known)).is_err());
        assert!(psk_from_read(Err(api_error(403)), "carol-psk", PRESHARED_KEY_KEY, Some(&known)).is_err());
    }

    #[test]
    fn secrets_hold_keys() {
        let k = PrivateKey::generate();
        let s = Secret {
            metadata: ObjectMeta {
                name: Some("gw".into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([
                (PRIVATE_KEY_KEY.to_string(), ByteString(k.to_base64().into_bytes())),
                (PRESHARED_KEY_KEY.to_string(), ByteString(b"nope".to_vec())),
            ])),
            ..Default::default()
        };
        assert_eq!(key_from_secret(&s).unwrap().public_key(), k.public_key());
        assert!(psk_from_secret(&s, PRESHARED_KEY_KEY).is_err());
        assert!(psk_from_secret(&s, "missing").unwrap_err().contains("no key"));
    }
}

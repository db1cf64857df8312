//! The watching source: reflectors of Services, `VpnPeer`s (with their preshared-key
//! Secrets) and `VpnAccessPolicy`s (with namespaces' labels), batched into snapshots; the
//! client, and the gateway's private key Secret.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service as K8sService};
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::watch;

use super::convert::{
    PRESHARED_KEY_KEY, PRIVATE_KEY_KEY, key_from_secret, peer_from_k8s, policy_from_k8s, psk_from_read,
    service_from_k8s, trim_peer, trim_policy,
};
use crate::catalog::Service;
use crate::crd::{VpnAccessPolicy, VpnPeer};
use crate::keys::{PresharedKey, PrivateKey};
use crate::policy::PolicyInput;
use crate::source::{PeerSnapshot, PeerSource, PolicySnapshot, PolicySource, ServiceCatalog, ServiceSnapshot};

/// How often preshared-key Secrets are re-read even without a peer change.
const SECRET_REFRESH: Duration = Duration::from_secs(10);
/// Watch events arriving within this of each other make one snapshot: rebuilding it costs
/// O(peers), and at startup the gateway's own status writes bring one event per peer.
const BATCH_QUIET: Duration = Duration::from_millis(50);
/// A batch is cut after this even while events keep coming.
const BATCH_MAX: Duration = Duration::from_millis(250);
/// The first and the largest delay before a failed watch is retried.
const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(250);
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Retry delays of the watches: doubling from `WATCH_BACKOFF_MIN` to at most
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
                let open = take_burst(&mut stream, |ev| {
                    if let Err(e) = ev {
                        tracing::warn!(error = %e, "VpnPeer watch");
                    }
                })
                .await;
                if !open {
                    return;
                }
                let state = peer_store.state();
                // Sized at once: grown by pushes, the list ended at 16,384 slots for 10,000
                // peers (13 MB), with the last two sizes alive together while it grew.
                let mut peers = Vec::with_capacity(state.len());
                let mut read = HashMap::new();
                for p in state {
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
                    let new = PeerSnapshot {
                        peers: peers.into(),
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
/// Takes the events that follow right behind one (each within [`BATCH_QUIET`] of the
/// last, for at most [`BATCH_MAX`]), handing each to `seen`, so that a burst of changes
/// makes one snapshot; false when the stream ended.
async fn take_burst<S: Stream + Unpin>(stream: &mut S, mut seen: impl FnMut(S::Item)) -> bool {
    let burst = tokio::time::Instant::now() + BATCH_MAX;
    loop {
        let until = burst.min(tokio::time::Instant::now() + BATCH_QUIET);
        match tokio::time::timeout_at(until, stream.next()).await {
            Err(_) => return true,
            Ok(None) => return false,
            Ok(Some(item)) => seen(item),
        }
    }
}

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
        if !take_burst(&mut stream, |_| {}).await {
            return;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}

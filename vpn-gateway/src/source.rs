//! Where peers and Services come from, as watch channels of whole snapshots:
//! - [`FileSource`]: JSON files (`--peers-file`, `--services-file`), re-read when they
//!   change; for tests and local runs.
//! - [`kube`]: the cluster: `VpnPeer`, `VpnAccessPolicy`, `Service` and `Secret`
//!   (preshared keys, the gateway's private key), and the statuses written back.
//!
//! Peers file: a JSON array of
//! `{"namespace": "default", "name": "alice", "spec": {<VpnPeer spec>}, "presharedKey": "<base64>"}`
//! (`namespace` defaults to `default`, `presharedKey` is optional and stands in for the
//! Secret a `presharedKeySecretRef` names; an optional `labels` object is what access
//! policies select by). Policies file (`--policies-file`): a JSON array of
//! `{"namespace": "default", "name": "db", "spec": {<VpnAccessPolicy spec>}}`. Services file: a JSON array of
//! `{"namespace": "default", "name": "web", "clusterIP": "127.96.0.10", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}`.

pub mod kube;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::watch;

use crate::catalog::Service;
use crate::crd::VpnPeerSpec;
use crate::keys::PresharedKey;
use crate::peers::{PeerId, PeerInput, Rejection};
use crate::policy::{PolicyInput, PolicyReport};

/// All peers, as the source last saw them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerSnapshot {
    /// Shared: the gateway keeps the snapshot it was sent, not a copy (at 10,000 peers a
    /// copy is ~8 MB, and old and new copies met at every change).
    pub peers: Arc<[PeerInput]>,
    /// False until the source has loaded once (the gateway is not ready before).
    pub loaded: bool,
}

/// All Services, as the source last saw them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceSnapshot {
    pub services: Vec<Service>,
    pub loaded: bool,
}

/// All access policies, and the labels of namespaces (what a `namespaceSelector`
/// matches), as the source last saw them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySnapshot {
    pub policies: Vec<PolicyInput>,
    pub namespaces: std::collections::HashMap<String, crate::policy::Labels>,
    pub loaded: bool,
}

/// A source of peers.
pub trait PeerSource: Send + Sync {
    fn peers(&self) -> watch::Receiver<PeerSnapshot>;
}

/// A source of access policies.
pub trait PolicySource: Send + Sync {
    fn policies(&self) -> watch::Receiver<PolicySnapshot>;
}

/// A source of Services.
pub trait ServiceCatalog: Send + Sync {
    fn services(&self) -> watch::Receiver<ServiceSnapshot>;
}

/// What the gateway reports of one peer (for status and diagnostics).
#[derive(Clone, Debug, PartialEq)]
pub struct PeerReport {
    pub id: PeerId,
    pub generation: Option<i64>,
    pub outcome: Result<Ipv4Addr, Rejection>,
    /// The address in use, else the one the peer had before (given back if it is served
    /// again).
    pub last_address: Option<Ipv4Addr>,
    /// The IPv6 tunnel address in use (with `outcome` `Ok`).
    pub address_v6: Option<Ipv6Addr>,
    /// The IPv6 address in use, else the one the peer had before.
    pub last_address_v6: Option<Ipv6Addr>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The gateway's report of every peer and every access policy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GatewayReport {
    pub peers: Vec<PeerReport>,
    pub policies: Vec<PolicyReport>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FilePeer {
    #[serde(default = "default_namespace")]
    namespace: String,
    name: String,
    spec: VpnPeerSpec,
    #[serde(default)]
    preshared_key: Option<String>,
    /// What access policies select it by.
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
}

fn default_namespace() -> String {
    "default".to_string()
}

/// Parse a peers file.
pub fn parse_peers(text: &str) -> Result<Vec<PeerInput>, serde_json::Error> {
    let peers: Vec<FilePeer> = serde_json::from_str(text)?;
    Ok(peers
        .into_iter()
        .map(|p| {
            let psk = match p.preshared_key.as_deref() {
                None => Ok(None),
                Some(s) => PresharedKey::parse(s).map(Some).map_err(|e| e.to_string()),
            };
            let mut input = PeerInput::new(PeerId::new(p.namespace, p.name), p.spec);
            input.preshared_key = psk;
            input.labels = p.labels;
            input
        })
        .collect())
}

/// Parse a Services file.
pub fn parse_services(text: &str) -> Result<Vec<Service>, serde_json::Error> {
    serde_json::from_str(text)
}

/// A file's contents, to tell whether it changed.
fn text_hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// What a file's metadata says of its contents: checked every poll, so that the file is
/// read (1.7 MB at 10,000 peers) only when it changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: m.len(),
        modified: m.modified().ok(),
    })
}

/// Whether to read the file on this poll: its metadata changed, or it is time for the
/// periodic full read (a rewrite within the file system's timestamp granularity that keeps
/// the length shows in no metadata).
fn should_read(last: Option<Stamp>, now: Option<Stamp>, polls_since_read: u32, full_every: u32) -> bool {
    now != last || polls_since_read >= full_every
}

/// Full reads of an unchanged-looking file, at most this far apart.
const FULL_READ_EVERY: Duration = Duration::from_secs(2);

/// Peers and Services from JSON files, checked every `reload` (metadata only) and re-read
/// when they changed. A file that stops parsing is reported and the last good snapshot kept.
pub struct FileSource {
    peers: watch::Receiver<PeerSnapshot>,
    services: watch::Receiver<ServiceSnapshot>,
    policies: watch::Receiver<PolicySnapshot>,
    /// Without a policies file: the sender of its empty snapshot, kept open.
    _no_policies: Option<watch::Sender<PolicySnapshot>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FilePolicy {
    #[serde(default = "default_namespace")]
    namespace: String,
    name: String,
    spec: crate::crd::VpnAccessPolicySpec,
}

/// Parse a policies file: a JSON array of
/// `{"namespace": "default", "name": "db", "spec": {<VpnAccessPolicy spec>}}`.
pub fn parse_policies(text: &str) -> Result<Vec<PolicyInput>, serde_json::Error> {
    let policies: Vec<FilePolicy> = serde_json::from_str(text)?;
    Ok(policies
        .into_iter()
        .map(|p| PolicyInput::new(PeerId::new(p.namespace, p.name), p.spec))
        .collect())
}

fn read(path: &Path) -> crate::Result<String> {
    std::fs::read_to_string(path).map_err(|source| crate::Error::Io {
        path: path.display().to_string(),
        source,
    })
}

impl FileSource {
    /// Load both files now (failing on errors) and keep watching them. A missing path
    /// means "none". Must be called inside a tokio runtime.
    pub fn start(peers: Option<PathBuf>, services: Option<PathBuf>, reload: Duration) -> crate::Result<Self> {
        let load_peers = |p: &Path| -> crate::Result<(String, Vec<PeerInput>)> {
            let text = read(p)?;
            let v = parse_peers(&text).map_err(|source| crate::Error::Json {
                path: p.display().to_string(),
                source,
            })?;
            Ok((text, v))
        };
        let load_services = |p: &Path| -> crate::Result<(String, Vec<Service>)> {
            let text = read(p)?;
            let v = parse_services(&text).map_err(|source| crate::Error::Json {
                path: p.display().to_string(),
                source,
            })?;
            Ok((text, v))
        };
        // What was last read, as a hash: the text itself is 170 bytes a peer.
        let (initial_peers_text, initial_peers) = match &peers {
            Some(p) => load_peers(p)?,
            None => (String::new(), Vec::new()),
        };
        let (initial_services_text, initial_services) = match &services {
            Some(p) => load_services(p)?,
            None => (String::new(), Vec::new()),
        };
        let full_every = (FULL_READ_EVERY.as_millis() / reload.as_millis().max(1)).max(1) as u32;
        let mut peers_stamp = peers.as_deref().and_then(stamp);
        let mut services_stamp = services.as_deref().and_then(stamp);
        let (mut peers_polls, mut services_polls) = (0u32, 0u32);
        let mut peers_text = text_hash(&initial_peers_text);
        let mut services_text = text_hash(&initial_services_text);
        drop((initial_peers_text, initial_services_text));
        let (ptx, prx) = watch::channel(PeerSnapshot {
            peers: initial_peers.into(),
            loaded: true,
        });
        let (stx, srx) = watch::channel(ServiceSnapshot {
            services: initial_services,
            loaded: true,
        });
        tokio::spawn(async move {
            let mut every = tokio::time::interval(reload);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if ptx.is_closed() && stx.is_closed() {
                    return;
                }
                let due = peers.as_deref().is_some_and(|p| {
                    let now = stamp(p);
                    peers_polls += 1;
                    let due = should_read(std::mem::replace(&mut peers_stamp, now), now, peers_polls, full_every);
                    if due {
                        peers_polls = 0;
                    }
                    due
                });
                if due
                    && let Some(p) = &peers
                    && let Ok(text) = read(p)
                    && text_hash(&text) != peers_text
                {
                    match parse_peers(&text) {
                        Ok(v) => {
                            tracing::info!(path = %p.display(), peers = v.len(), "peers file reloaded");
                            ptx.send_replace(PeerSnapshot {
                                peers: v.into(),
                                loaded: true,
                            });
                        }
                        Err(e) => {
                            tracing::warn!(path = %p.display(), error = %e, "peers file invalid; keeping the last one")
                        }
                    }
                    peers_text = text_hash(&text);
                }
                let due = services.as_deref().is_some_and(|p| {
                    let now = stamp(p);
                    services_polls += 1;
                    let due = should_read(
                        std::mem::replace(&mut services_stamp, now),
                        now,
                        services_polls,
                        full_every,
                    );
                    if due {
                        services_polls = 0;
                    }
                    due
                });
                if due
                    && let Some(p) = &services
                    && let Ok(text) = read(p)
                    && text_hash(&text) != services_text
                {
                    match parse_services(&text) {
                        Ok(v) => {
                            tracing::info!(path = %p.display(), services = v.len(), "services file reloaded");
                            stx.send_replace(ServiceSnapshot {
                                services: v,
                                loaded: true,
                            });
                        }
                        Err(e) => {
                            tracing::warn!(path = %p.display(), error = %e, "services file invalid; keeping the last one")
                        }
                    }
                    services_text = text_hash(&text);
                }
            }
        });
        let (no_policies_tx, no_policies_rx) = watch::channel(PolicySnapshot {
            loaded: true,
            ..Default::default()
        });
        Ok(FileSource {
            peers: prx,
            services: srx,
            policies: no_policies_rx,
            _no_policies: Some(no_policies_tx),
        })
    }

    /// Access policies from `path` too (none when `None`), loaded now (failing on errors)
    /// and re-read when the file changes, as the peers file is.
    pub fn with_policies(mut self, path: Option<PathBuf>, reload: Duration) -> crate::Result<Self> {
        let Some(path) = path else { return Ok(self) };
        let load = |p: &Path| -> crate::Result<(u64, Vec<PolicyInput>)> {
            let text = read(p)?;
            let v = parse_policies(&text).map_err(|source| crate::Error::Json {
                path: p.display().to_string(),
                source,
            })?;
            Ok((text_hash(&text), v))
        };
        let (mut last, initial) = load(&path)?;
        let (tx, rx) = watch::channel(PolicySnapshot {
            policies: initial,
            loaded: true,
            ..Default::default()
        });
        let full_every = (FULL_READ_EVERY.as_millis() / reload.as_millis().max(1)).max(1) as u32;
        let mut last_stamp = stamp(&path);
        let mut polls = 0u32;
        tokio::spawn(async move {
            let mut every = tokio::time::interval(reload);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if tx.is_closed() {
                    return;
                }
                let now = stamp(&path);
                polls += 1;
                if !should_read(std::mem::replace(&mut last_stamp, now), now, polls, full_every) {
                    continue;
                }
                polls = 0;
                let Ok(text) = read(&path) else { continue };
                if text_hash(&text) == last {
                    continue;
                }
                last = text_hash(&text);
                match parse_policies(&text) {
                    Ok(v) => {
                        tracing::info!(path = %path.display(), policies = v.len(), "policies file reloaded");
                        tx.send_replace(PolicySnapshot {
                            policies: v,
                            loaded: true,
                            ..Default::default()
                        });
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "policies file invalid; keeping the last one")
                    }
                }
            }
        });
        self.policies = rx;
        self._no_policies = None;
        Ok(self)
    }
}

impl PeerSource for FileSource {
    fn peers(&self) -> watch::Receiver<PeerSnapshot> {
        self.peers.clone()
    }
}

impl PolicySource for FileSource {
    fn policies(&self) -> watch::Receiver<PolicySnapshot> {
        self.policies.clone()
    }
}

impl ServiceCatalog for FileSource {
    fn services(&self) -> watch::Receiver<ServiceSnapshot> {
        self.services.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_file_format() {
        let v = parse_peers(
            r#"[{"name": "alice", "spec": {"publicKey": "k", "allow": [{"service": "web"}]}, "presharedKey": "AAAA"},
                {"namespace": "ops", "name": "bob", "spec": {"publicKey": "k2", "address": "100.64.0.9"}}]"#,
        )
        .unwrap();
        assert_eq!(v[0].id, PeerId::new("default", "alice"));
        assert!(
            v[0].preshared_key.is_err(),
            "a bad preshared key is reported, not fatal"
        );
        assert_eq!(v[1].spec.address.as_deref(), Some("100.64.0.9"));
        assert!(parse_peers(r#"[{"name": "x", "spec": {"publicKey": "k"}, "typo": 1}]"#).is_err());
    }

    #[tokio::test]
    async fn policies_file_loads_and_reloads() {
        let v = parse_policies(
            r#"[{"name": "db", "spec": {"peerSelector": {"matchLabels": {"role": "dba"}}, "allow": [{"service": "pg"}]}}]"#,
        )
        .unwrap();
        assert_eq!(v[0].id, PeerId::new("default", "db"));
        assert!(parse_policies(r#"[{"name": "x", "spec": {"peerSelector": {}}, "typo": 1}]"#).is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policies.json");
        std::fs::write(&path, "[]").unwrap();
        let src = FileSource::start(None, None, Duration::from_millis(20))
            .unwrap()
            .with_policies(Some(path.clone()), Duration::from_millis(20))
            .unwrap();
        let mut rx = src.policies();
        assert!(rx.borrow().loaded && rx.borrow().policies.is_empty());
        std::fs::write(&path, r#"[{"name": "a", "spec": {"peerSelector": {}}}]"#).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow().policies.len(), 1);
        // Without a file: none, loaded, and the channel stays open.
        let none = FileSource::start(None, None, Duration::from_secs(1)).unwrap();
        assert!(none.policies().borrow().loaded);
        assert!(none.policies().has_changed().is_ok());
    }

    #[test]
    fn reads_on_metadata_change_or_periodically() {
        let stamp_a = Stamp {
            len: 10,
            modified: Some(SystemTime::UNIX_EPOCH),
        };
        let (a, b) = (Some(stamp_a), Some(Stamp { len: 11, ..stamp_a }));
        assert!(!should_read(a, a, 1, 20), "unchanged metadata: no read");
        assert!(should_read(a, b, 1, 20));
        assert!(
            should_read(a, None, 1, 20),
            "a file that disappeared is tried (and fails)"
        );
        assert!(should_read(a, a, 20, 20), "the periodic full read");
    }

    #[tokio::test]
    async fn file_source_reloads_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.json");
        std::fs::write(&path, "[]").unwrap();
        let src = FileSource::start(Some(path.clone()), None, Duration::from_millis(20)).unwrap();
        let mut rx = src.peers();
        assert!(rx.borrow().peers.is_empty());
        std::fs::write(&path, r#"[{"name": "a", "spec": {"publicKey": "k"}}]"#).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow().peers.len(), 1);
        assert!(FileSource::start(Some(dir.path().join("missing.json")), None, Duration::from_secs(1)).is_err());
    }
}

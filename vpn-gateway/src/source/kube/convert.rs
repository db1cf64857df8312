//! Kubernetes objects as the gateway's inputs: Services, `VpnPeer`s and
//! `VpnAccessPolicy`s (and what the reflectors keep of them), and keys from Secrets.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Secret, Service as K8sService};
use kube::ResourceExt;

use crate::catalog::{Protocol, Service, ServicePort};
use crate::crd::{CONDITION_ACCEPTED, Condition, VpnAccessPolicy, VpnPeer, VpnPeerStatus};
use crate::keys::{PresharedKey, PrivateKey};
use crate::peers::{Granted, PeerId, PeerInput};
use crate::policy::{PolicyId, PolicyInput};

/// The Secret key holding the gateway's private key, and the default preshared-key key.
pub const PRIVATE_KEY_KEY: &str = "privateKey";
pub const PRESHARED_KEY_KEY: &str = "presharedKey";

pub(super) fn key_from_secret(s: &Secret) -> Option<PrivateKey> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;
    use std::collections::BTreeMap;
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

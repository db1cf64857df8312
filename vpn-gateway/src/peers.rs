//! Validation of peer inputs (a `VpnPeer` plus what the source resolved for it) into
//! accepted peers or rejection reasons, and allocation of tunnel addresses.
//!
//! Pure: the caller passes the current time. Results are deterministic: peers are taken
//! in `namespace/name` order, so when two peers claim the same key or address the first
//! one keeps it, whatever order the source listed them in.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::jiff::Timestamp;

use crate::crd::{PortRef, VpnPeerSpec};
use crate::keys::{PresharedKey, PublicKey};

/// `namespace/name` of a `VpnPeer`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId {
    pub namespace: String,
    pub name: String,
}

impl PeerId {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        PeerId {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One peer as a source delivers it.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerInput {
    pub id: PeerId,
    pub spec: VpnPeerSpec,
    /// The preshared key read from `presharedKeySecretRef`, or why it could not be read.
    pub preshared_key: Result<Option<PresharedKey>, String>,
    /// The address this peer had before (status), kept when still free.
    pub previous_address: Option<Ipv4Addr>,
    pub generation: Option<i64>,
}

impl PeerInput {
    pub fn new(id: PeerId, spec: VpnPeerSpec) -> Self {
        PeerInput {
            id,
            spec,
            preshared_key: Ok(None),
            previous_address: None,
            generation: None,
        }
    }
}

/// An allow rule with the namespace filled in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub namespace: String,
    pub service: Option<String>,
    pub ports: Option<Vec<PortRef>>,
}

/// A peer the gateway serves.
#[derive(Clone, Debug, PartialEq)]
pub struct AcceptedPeer {
    pub id: PeerId,
    pub public_key: PublicKey,
    pub address: Ipv4Addr,
    pub rules: Vec<Rule>,
    pub preshared_key: Option<PresharedKey>,
    pub expires_at: Option<Timestamp>,
}

/// Why a peer is not served. [`Rejection::reason`] is the condition reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("public key is invalid: {0}")]
    BadKey(String),
    #[error("address {0:?} is not an IPv4 address")]
    BadAddress(String),
    #[error("address {address} is outside the tunnel range {range} or reserved")]
    AddressOutsideRange { address: Ipv4Addr, range: Ipv4Net },
    #[error("address {address} is already used by {by}")]
    AddressTaken { address: Ipv4Addr, by: String },
    #[error("public key is already used by {by}")]
    DuplicatePublicKey { by: String },
    #[error("rule names namespace {namespace:?}; a peer outside the gateway's namespace reaches only its own")]
    NamespaceNotAllowed { namespace: String },
    #[error("preshared key: {0}")]
    PresharedKey(String),
    #[error("expired at {0}")]
    Expired(String),
    #[error("disabled")]
    Disabled,
    #[error("no free address left in the tunnel range {0}")]
    RangeExhausted(Ipv4Net),
}

impl Rejection {
    /// The `reason` of the `Accepted=False` condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::BadKey(_) => "InvalidPublicKey",
            Rejection::BadAddress(_) => "InvalidAddress",
            Rejection::AddressOutsideRange { .. } => "AddressOutsideRange",
            Rejection::AddressTaken { .. } => "AddressTaken",
            Rejection::DuplicatePublicKey { .. } => "DuplicatePublicKey",
            Rejection::NamespaceNotAllowed { .. } => "NamespaceNotAllowed",
            Rejection::PresharedKey(_) => "InvalidPresharedKey",
            Rejection::Expired(_) => "Expired",
            Rejection::Disabled => "Disabled",
            Rejection::RangeExhausted(_) => "AddressRangeExhausted",
        }
    }
}

/// The gateway's side of validation.
#[derive(Clone, Debug)]
pub struct TunnelConfig {
    pub range: Ipv4Net,
    /// Peers in this namespace may name any namespace in their rules.
    pub gateway_namespace: String,
}

impl TunnelConfig {
    /// The gateway's own tunnel address: the first host of the range.
    pub fn gateway_address(&self) -> Ipv4Addr {
        let n = u32::from(self.range.network());
        Ipv4Addr::from(n.saturating_add(1))
    }

    /// Whether a peer may use `a`: inside the range, not the network or broadcast
    /// address, not the gateway's.
    pub fn usable(&self, a: Ipv4Addr) -> bool {
        self.range.contains(&a)
            && a != self.range.network()
            && (self.range.prefix_len() >= 31 || a != self.range.broadcast())
            && a != self.gateway_address()
    }
}

/// The outcome for every input.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Validation {
    pub accepted: Vec<AcceptedPeer>,
    pub rejected: Vec<(PeerId, Rejection)>,
}

/// Both lists are sorted by peer id ([`validate`] makes them so), so a lookup is a binary
/// search: the gateway looks up every peer once a second, and a linear search made that
/// quadratic in the number of peers.
impl Validation {
    pub fn accepted(&self, id: &PeerId) -> Option<&AcceptedPeer> {
        let i = self.accepted.binary_search_by(|p| p.id.cmp(id)).ok()?;
        self.accepted.get(i)
    }
    pub fn rejection(&self, id: &PeerId) -> Option<&Rejection> {
        let i = self.rejected.binary_search_by(|(p, _)| p.cmp(id)).ok()?;
        self.rejected.get(i).map(|(_, r)| r)
    }
}

/// Validate every input at time `now`.
pub fn validate(inputs: &[PeerInput], cfg: &TunnelConfig, now: Timestamp) -> Validation {
    let mut sorted: Vec<&PeerInput> = inputs.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut out = Validation::default();

    // Pass 1: everything that depends on the peer alone, then duplicate keys.
    struct Candidate<'a> {
        input: &'a PeerInput,
        key: PublicKey,
        rules: Vec<Rule>,
        psk: Option<PresharedKey>,
        explicit: Option<Ipv4Addr>,
    }
    let mut keys: HashMap<PublicKey, &PeerId> = HashMap::new();
    let mut candidates = Vec::new();
    for input in sorted {
        match check_alone(input, cfg, now) {
            Err(r) => out.rejected.push((input.id.clone(), r)),
            Ok((key, rules, psk, explicit)) => {
                if let Some(by) = keys.get(&key) {
                    out.rejected
                        .push((input.id.clone(), Rejection::DuplicatePublicKey { by: by.to_string() }));
                    continue;
                }
                keys.insert(key, &input.id);
                candidates.push(Candidate {
                    input,
                    key,
                    rules,
                    psk,
                    explicit,
                });
            }
        }
    }

    // Pass 2: explicit addresses claim first, then previous ones, then allocation.
    let mut taken: HashMap<Ipv4Addr, PeerId> = HashMap::new();
    let mut address_of: Vec<Option<Ipv4Addr>> = vec![None; candidates.len()];
    let mut failed: Vec<Option<Rejection>> = vec![None; candidates.len()];
    for (i, c) in candidates.iter().enumerate() {
        if let Some(a) = c.explicit {
            if let Some(by) = taken.get(&a) {
                failed[i] = Some(Rejection::AddressTaken {
                    address: a,
                    by: by.to_string(),
                });
            } else {
                taken.insert(a, c.input.id.clone());
                address_of[i] = Some(a);
            }
        }
    }
    for (i, c) in candidates.iter().enumerate() {
        if c.explicit.is_none()
            && let Some(prev) = c.input.previous_address
            && cfg.usable(prev)
            && !taken.contains_key(&prev)
        {
            taken.insert(prev, c.input.id.clone());
            address_of[i] = Some(prev);
        }
    }
    let used: BTreeSet<u32> = taken.keys().map(|a| u32::from(*a)).collect();
    let mut next = u32::from(cfg.gateway_address()).saturating_add(1);
    let last = u32::from(cfg.range.broadcast());
    for (i, c) in candidates.iter().enumerate() {
        if c.explicit.is_some() || address_of[i].is_some() {
            continue;
        }
        while next <= last && (used.contains(&next) || !cfg.usable(Ipv4Addr::from(next))) {
            next += 1;
        }
        if next <= last && cfg.usable(Ipv4Addr::from(next)) {
            address_of[i] = Some(Ipv4Addr::from(next));
            next += 1;
        } else {
            failed[i] = Some(Rejection::RangeExhausted(cfg.range));
        }
    }

    for (i, c) in candidates.into_iter().enumerate() {
        match (address_of[i], failed[i].take()) {
            (Some(address), None) => out.accepted.push(AcceptedPeer {
                id: c.input.id.clone(),
                public_key: c.key,
                address,
                rules: c.rules,
                preshared_key: c.psk,
                expires_at: c.input.spec.expires_at.as_ref().map(|t| t.0),
            }),
            (_, Some(r)) => out.rejected.push((c.input.id.clone(), r)),
            (None, None) => out
                .rejected
                .push((c.input.id.clone(), Rejection::RangeExhausted(cfg.range))),
        }
    }
    // Accepted peers come out in id order already; rejections in two passes.
    out.rejected.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

type Alone = (PublicKey, Vec<Rule>, Option<PresharedKey>, Option<Ipv4Addr>);

fn check_alone(input: &PeerInput, cfg: &TunnelConfig, now: Timestamp) -> Result<Alone, Rejection> {
    let spec = &input.spec;
    if spec.disabled {
        return Err(Rejection::Disabled);
    }
    if let Some(exp) = &spec.expires_at
        && exp.0 <= now
    {
        return Err(Rejection::Expired(exp.0.to_string()));
    }
    let key = PublicKey::parse(&spec.public_key).map_err(|e| Rejection::BadKey(e.to_string()))?;
    let psk = input.preshared_key.clone().map_err(Rejection::PresharedKey)?;
    let explicit = match spec.address.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => {
            // Accept "100.64.0.7" and "100.64.0.7/32".
            let bare = s.strip_suffix("/32").unwrap_or(s);
            let a: Ipv4Addr = bare.parse().map_err(|_| Rejection::BadAddress(s.to_string()))?;
            if !cfg.usable(a) {
                return Err(Rejection::AddressOutsideRange {
                    address: a,
                    range: cfg.range,
                });
            }
            Some(a)
        }
    };
    let own = &input.id.namespace;
    let privileged = *own == cfg.gateway_namespace;
    let mut rules = Vec::with_capacity(spec.allow.len());
    for r in &spec.allow {
        let namespace = r
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| own.clone());
        if !privileged && namespace != *own {
            return Err(Rejection::NamespaceNotAllowed { namespace });
        }
        rules.push(Rule {
            namespace,
            service: r.service.clone().filter(|s| !s.is_empty()),
            ports: r.ports.clone(),
        });
    }
    Ok((key, rules, psk, explicit))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::AllowRule;
    use crate::keys::PrivateKey;

    pub(crate) fn cfg() -> TunnelConfig {
        TunnelConfig {
            range: "100.64.0.0/16".parse().unwrap(),
            gateway_namespace: "kuberaya-system".into(),
        }
    }

    fn key() -> String {
        PrivateKey::generate().public_key().to_base64()
    }

    fn peer(ns: &str, name: &str) -> PeerInput {
        PeerInput::new(
            PeerId::new(ns, name),
            VpnPeerSpec {
                public_key: key(),
                ..Default::default()
            },
        )
    }

    fn now() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn every_peer_is_found_by_id_whatever_the_input_order() {
        // Mixed accepted and rejected (disabled, or a duplicate key), given out of order.
        let mut inputs: Vec<PeerInput> = (0..40)
            .rev()
            .map(|i| peer(&format!("ns{}", i % 3), &format!("p{i}")))
            .collect();
        for p in inputs.iter_mut().step_by(4) {
            p.spec.disabled = true;
        }
        let mut dup = peer("zz", "dup");
        dup.spec.public_key = inputs[1].spec.public_key.clone();
        inputs.push(dup);
        let v = validate(&inputs, &cfg(), now());
        assert_eq!(v.accepted.len() + v.rejected.len(), inputs.len());
        for input in &inputs {
            let found = (v.accepted(&input.id).is_some(), v.rejection(&input.id).is_some());
            assert!(
                found == (true, false) || found == (false, true),
                "{:?}: {found:?}",
                input.id
            );
            assert_eq!(
                v.rejection(&input.id).is_some(),
                input.spec.disabled || input.id.to_string().ends_with("dup")
            );
        }
        assert!(v.accepted(&PeerId::new("nope", "nope")).is_none());
        assert!(v.rejection(&PeerId::new("nope", "nope")).is_none());
    }

    #[test]
    fn gateway_takes_the_first_address_and_peers_the_next() {
        let c = cfg();
        assert_eq!(c.gateway_address(), Ipv4Addr::new(100, 64, 0, 1));
        let v = validate(&[peer("a", "x"), peer("a", "y")], &c, now());
        assert_eq!(v.accepted.len(), 2);
        assert_eq!(v.accepted[0].address, Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(v.accepted[1].address, Ipv4Addr::new(100, 64, 0, 3));
    }

    #[test]
    fn explicit_and_previous_addresses_are_kept() {
        let mut a = peer("a", "a");
        a.previous_address = Some(Ipv4Addr::new(100, 64, 0, 9));
        let mut b = peer("a", "b");
        b.spec.address = Some("100.64.0.2".into());
        let v = validate(&[a.clone(), b], &cfg(), now());
        assert_eq!(v.accepted(&a.id).unwrap().address, Ipv4Addr::new(100, 64, 0, 9));
        assert_eq!(
            v.accepted(&PeerId::new("a", "b")).unwrap().address,
            Ipv4Addr::new(100, 64, 0, 2)
        );
    }

    #[test]
    fn address_conflicts_and_range() {
        let mut a = peer("a", "a");
        a.spec.address = Some("100.64.0.5".into());
        let mut b = peer("a", "b");
        b.spec.address = Some("100.64.0.5/32".into());
        let mut c = peer("a", "c");
        c.spec.address = Some("10.0.0.1".into());
        let mut d = peer("a", "d");
        d.spec.address = Some("100.64.0.1".into());
        let mut e = peer("a", "e");
        e.spec.address = Some("nope".into());
        let v = validate(&[e, d, c, b, a], &cfg(), now());
        assert_eq!(v.accepted.len(), 1);
        assert_eq!(v.rejection(&PeerId::new("a", "b")).unwrap().reason(), "AddressTaken");
        assert_eq!(
            v.rejection(&PeerId::new("a", "c")).unwrap().reason(),
            "AddressOutsideRange"
        );
        assert_eq!(
            v.rejection(&PeerId::new("a", "d")).unwrap().reason(),
            "AddressOutsideRange"
        );
        assert_eq!(v.rejection(&PeerId::new("a", "e")).unwrap().reason(), "InvalidAddress");
    }

    #[test]
    fn bad_and_duplicate_keys() {
        let mut a = peer("a", "a");
        a.spec.public_key = "zzz".into();
        let b = peer("b", "b");
        let mut c = peer("c", "c");
        c.spec.public_key = b.spec.public_key.clone();
        let v = validate(&[c, b, a], &cfg(), now());
        assert_eq!(
            v.rejection(&PeerId::new("a", "a")).unwrap().reason(),
            "InvalidPublicKey"
        );
        assert!(v.accepted(&PeerId::new("b", "b")).is_some());
        assert_eq!(
            v.rejection(&PeerId::new("c", "c")).unwrap().reason(),
            "DuplicatePublicKey"
        );
    }

    #[test]
    fn a_disabled_peer_does_not_hold_its_key() {
        let mut a = peer("a", "a");
        a.spec.disabled = true;
        let mut b = peer("b", "b");
        b.spec.public_key = a.spec.public_key.clone();
        let v = validate(&[a, b], &cfg(), now());
        assert_eq!(v.rejection(&PeerId::new("a", "a")), Some(&Rejection::Disabled));
        assert!(v.accepted(&PeerId::new("b", "b")).is_some());
    }

    #[test]
    fn namespaces_in_rules() {
        let mut team = peer("team-a", "alice");
        team.spec.allow = vec![AllowRule {
            namespace: Some("team-b".into()),
            ..Default::default()
        }];
        let mut own = peer("team-a", "bob");
        own.spec.allow = vec![AllowRule {
            service: Some("web".into()),
            ..Default::default()
        }];
        let mut admin = peer("kuberaya-system", "ops");
        admin.spec.allow = vec![AllowRule {
            namespace: Some("team-b".into()),
            ..Default::default()
        }];
        let v = validate(&[team, own, admin], &cfg(), now());
        assert_eq!(
            v.rejection(&PeerId::new("team-a", "alice")).unwrap().reason(),
            "NamespaceNotAllowed"
        );
        assert_eq!(
            v.accepted(&PeerId::new("team-a", "bob")).unwrap().rules[0].namespace,
            "team-a"
        );
        assert_eq!(
            v.accepted(&PeerId::new("kuberaya-system", "ops")).unwrap().rules[0].namespace,
            "team-b"
        );
    }

    #[test]
    fn expiry_uses_the_given_time() {
        let mut a = peer("a", "a");
        a.spec.expires_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-01-01T00:00:01Z".parse().unwrap(),
        ));
        assert_eq!(validate(std::slice::from_ref(&a), &cfg(), now()).accepted.len(), 1);
        let later: Timestamp = "2026-01-01T00:00:02Z".parse().unwrap();
        assert_eq!(validate(&[a], &cfg(), later).rejected[0].1.reason(), "Expired");
    }

    #[test]
    fn preshared_key_errors_reject() {
        let mut a = peer("a", "a");
        a.preshared_key = Err("secret a/psk not found".into());
        assert_eq!(
            validate(&[a], &cfg(), now()).rejected[0].1.reason(),
            "InvalidPresharedKey"
        );
    }

    #[test]
    fn small_range_exhausts() {
        let c = TunnelConfig {
            range: "100.64.0.0/30".parse().unwrap(),
            gateway_namespace: "g".into(),
        };
        let v = validate(&[peer("a", "a"), peer("a", "b")], &c, now());
        assert_eq!(v.accepted.len(), 1);
        assert_eq!(v.accepted[0].address, Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(v.rejected[0].1.reason(), "AddressRangeExhausted");
    }
}

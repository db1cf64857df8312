//! Validation of peer inputs (a `VpnPeer` plus what the source resolved for it) into
//! accepted peers or rejection reasons, and allocation of tunnel addresses.
//!
//! Pure: the caller passes the current time and what was accepted before. Conflicts (two
//! peers with one public key, two peers wanting one address) are decided for the older
//! claim, never by name and never by the last write:
//! 1. a peer that already holds the thing keeps it: it was accepted with that key, or is
//!    served at that address (by this gateway's previous validation, or by the status the
//!    source read), for as long as its spec asks for nothing else;
//! 2. otherwise the older peer wins: `creationTimestamp`, then `uid`, then (a peers file,
//!    which has neither) the earlier entry.
//!
//! The loser is rejected with a reason that names the winner and the rule that decided.
//! The result is the same whatever order the source listed the peers in.

use std::cmp::Ordering;
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
    /// The address this peer had before it was cut off (status `lastAddress`), given back
    /// when still free.
    pub previous_address: Option<Ipv4Addr>,
    pub generation: Option<i64>,
    /// What the source's record says the gateway granted this peer (its status).
    pub granted: Granted,
    /// The age of its claims: `creationTimestamp`, then `uid`. Both absent in a peers
    /// file, where the order of the entries stands in for age.
    pub created: Option<Timestamp>,
    pub uid: Option<String>,
    /// Its labels: what `VpnAccessPolicy` selectors match ([`crate::policy`]).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// What a peer holds according to its status, as the gateway wrote it: it survives a
/// gateway restart, which the gateway's own previous validation does not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Granted {
    /// Accepted for its spec as it is now (`Accepted=True` at the current generation): the
    /// public key in the spec is held.
    pub key: bool,
    /// Served at this address (`status.address` with `Accepted=True`).
    pub address: Option<Ipv4Addr>,
}

impl PeerInput {
    pub fn new(id: PeerId, spec: VpnPeerSpec) -> Self {
        PeerInput {
            id,
            spec,
            preshared_key: Ok(None),
            previous_address: None,
            generation: None,
            granted: Granted::default(),
            created: None,
            uid: None,
            labels: Default::default(),
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

/// Why the winner of a conflict won it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precedence {
    /// It was accepted with it (key) or is served at it (address).
    Holds,
    /// Neither held it, and the winner's claim is older.
    Older,
}

impl std::fmt::Display for Precedence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precedence::Holds => "which already holds it",
            Precedence::Older => "whose claim is older",
        })
    }
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
    #[error("address {address} is already used by {by}, {rule}")]
    AddressTaken {
        address: Ipv4Addr,
        by: String,
        rule: Precedence,
    },
    #[error("public key is already used by {by}, {rule}")]
    DuplicatePublicKey { by: String, rule: Precedence },
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

/// Validate every input at time `now`. `previous` is this gateway's last validation (empty
/// at start): where it knows a peer, it says what the peer holds; where it does not, the
/// peer's status ([`PeerInput::granted`]) does.
pub fn validate(inputs: &[PeerInput], previous: &Validation, cfg: &TunnelConfig, now: Timestamp) -> Validation {
    let mut out = Validation::default();

    // Pass 1: everything that depends on the peer alone, and what each one holds.
    struct Candidate<'a> {
        input: &'a PeerInput,
        /// Position in the input: the age of a peers file's entries.
        index: usize,
        key: PublicKey,
        rules: Vec<Rule>,
        psk: Option<PresharedKey>,
        explicit: Option<Ipv4Addr>,
        holds_key: bool,
        held_address: Option<Ipv4Addr>,
    }
    let mut candidates = Vec::new();
    for (index, input) in inputs.iter().enumerate() {
        match check_alone(input, cfg, now) {
            Err(r) => out.rejected.push((input.id.clone(), r)),
            Ok((key, rules, psk, explicit)) => {
                let (holds_key, held_address) = held(input, &key, previous);
                let held_address = held_address.filter(|a| cfg.usable(*a) && explicit.is_none_or(|e| e == *a));
                candidates.push(Candidate {
                    input,
                    index,
                    key,
                    rules,
                    psk,
                    explicit,
                    holds_key,
                    held_address,
                });
            }
        }
    }
    // Oldest first; every pass below takes claims in this order (holders before others).
    candidates.sort_by(|a, b| older(a.input, a.index, b.input, b.index));
    let id = |i: usize| candidates[i].input.id.to_string();
    let mut failed: Vec<Option<Rejection>> = vec![None; candidates.len()];

    // Pass 2: duplicate keys, the holder first, then the oldest.
    let mut key_claims: Vec<usize> = (0..candidates.len()).collect();
    key_claims.sort_by_key(|&i| !candidates[i].holds_key);
    let mut key_owner: HashMap<PublicKey, usize> = HashMap::new();
    for i in key_claims {
        match key_owner.get(&candidates[i].key) {
            Some(&w) => {
                failed[i] = Some(Rejection::DuplicatePublicKey {
                    by: id(w),
                    rule: precedence(candidates[w].holds_key),
                })
            }
            None => {
                key_owner.insert(candidates[i].key, i);
            }
        }
    }

    // Pass 3: addresses. Held ones are kept; then explicit and previous ones by age (a
    // previous address is a wish: a peer that cannot have it gets another); then the rest
    // are allocated, oldest first.
    let live: Vec<usize> = (0..candidates.len()).filter(|&i| failed[i].is_none()).collect();
    let mut taken: HashMap<Ipv4Addr, (usize, Precedence)> = HashMap::new();
    let mut address_of: Vec<Option<Ipv4Addr>> = vec![None; candidates.len()];
    for &i in &live {
        if let Some(a) = candidates[i].held_address
            && !taken.contains_key(&a)
        {
            taken.insert(a, (i, Precedence::Holds));
            address_of[i] = Some(a);
        }
    }
    for &i in &live {
        let c = &candidates[i];
        if address_of[i].is_some() {
            continue;
        }
        let wish = c.explicit.or(c.input.previous_address.filter(|a| cfg.usable(*a)));
        let Some(a) = wish else { continue };
        match taken.get(&a) {
            Some(&(w, rule)) if c.explicit.is_some() => {
                failed[i] = Some(Rejection::AddressTaken {
                    address: a,
                    by: id(w),
                    rule,
                })
            }
            Some(_) => {}
            None => {
                taken.insert(a, (i, Precedence::Older));
                address_of[i] = Some(a);
            }
        }
    }
    let used: BTreeSet<u32> = taken.keys().map(|a| u32::from(*a)).collect();
    let mut next = u32::from(cfg.gateway_address()).saturating_add(1);
    let last = u32::from(cfg.range.broadcast());
    for &i in &live {
        if address_of[i].is_some() || failed[i].is_some() {
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
            (_, Some(r)) => out.rejected.push((c.input.id.clone(), r)),
            (Some(address), None) => out.accepted.push(AcceptedPeer {
                id: c.input.id.clone(),
                public_key: c.key,
                address,
                rules: c.rules,
                preshared_key: c.psk,
                expires_at: c.input.spec.expires_at.as_ref().map(|t| t.0),
            }),
            (None, None) => out
                .rejected
                .push((c.input.id.clone(), Rejection::RangeExhausted(cfg.range))),
        }
    }
    // Looked up by id (binary search).
    out.accepted.sort_by(|a, b| a.id.cmp(&b.id));
    out.rejected.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Whether the peer holds `key`, and the address it holds (before the spec is checked
/// against it). This gateway's previous validation knows best; a peer it has not seen yet
/// (after a restart) holds what its status says.
fn held(input: &PeerInput, key: &PublicKey, previous: &Validation) -> (bool, Option<Ipv4Addr>) {
    if let Some(p) = previous.accepted(&input.id) {
        return (p.public_key == *key, Some(p.address));
    }
    if previous.rejection(&input.id).is_some() {
        // Its status may still say what it had before it was rejected.
        return (false, None);
    }
    (input.granted.key, input.granted.address)
}

fn precedence(holds: bool) -> Precedence {
    if holds { Precedence::Holds } else { Precedence::Older }
}

/// Age order of two claims: the older `creationTimestamp`, then the `uid`, then the
/// earlier entry (a peers file has neither). A peer with a timestamp is older than one
/// without. Never the name.
fn older(a: &PeerInput, a_index: usize, b: &PeerInput, b_index: usize) -> Ordering {
    let stamp = |p: &PeerInput| (p.created.is_none(), p.created);
    stamp(a)
        .cmp(&stamp(b))
        .then_with(|| a.uid.cmp(&b.uid))
        .then(a_index.cmp(&b_index))
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

    /// Validation with nothing accepted before.
    fn check(inputs: &[PeerInput]) -> Validation {
        validate(inputs, &Validation::default(), &cfg(), now())
    }

    /// `p` created `secs` seconds after an epoch of the test's own.
    fn created(mut p: PeerInput, secs: i64) -> PeerInput {
        p.created = Some(Timestamp::from_second(1_700_000_000 + secs).unwrap());
        p.uid = Some(format!("uid-{}", p.id));
        p
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
        let v = check(&inputs);
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
        let v = validate(&[peer("a", "x"), peer("a", "y")], &Validation::default(), &c, now());
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
        let v = check(&[a.clone(), b]);
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
        // a is older than b: its explicit claim wins, whatever the names or the order.
        let (a, b) = (created(a, 1), created(b, 2));
        let v = check(&[e, d, c, b, a]);
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
        let (b, c) = (created(b, 1), created(c, 2));
        let v = check(&[c, b, a]);
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
        let v = check(&[a, b]);
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
        let v = check(&[team, own, admin]);
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
        assert_eq!(check(std::slice::from_ref(&a)).accepted.len(), 1);
        let later: Timestamp = "2026-01-01T00:00:02Z".parse().unwrap();
        assert_eq!(
            validate(&[a], &Validation::default(), &cfg(), later).rejected[0]
                .1
                .reason(),
            "Expired"
        );
    }

    #[test]
    fn preshared_key_errors_reject() {
        let mut a = peer("a", "a");
        a.preshared_key = Err("secret a/psk not found".into());
        assert_eq!(check(&[a]).rejected[0].1.reason(), "InvalidPresharedKey");
    }

    #[test]
    fn small_range_exhausts() {
        let c = TunnelConfig {
            range: "100.64.0.0/30".parse().unwrap(),
            gateway_namespace: "g".into(),
        };
        let v = validate(&[peer("a", "a"), peer("a", "b")], &Validation::default(), &c, now());
        assert_eq!(v.accepted.len(), 1);
        assert_eq!(v.accepted[0].address, Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(v.rejected[0].1.reason(), "AddressRangeExhausted");
    }

    /// What two peers fight over in [`conflicts_go_to_the_holder_then_the_older_claim`].
    #[derive(Clone, Copy, Debug)]
    enum Contest {
        /// The same public key.
        Key,
        /// The challenger names the address the other one has (explicit `spec.address`).
        Address,
    }

    /// Who held the contested thing before this validation.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Holder {
        Nobody,
        /// Accepted by this gateway's previous validation.
        ByGateway,
        /// Accepted according to its status (a gateway that has just started).
        ByStatus,
    }

    #[test]
    fn conflicts_go_to_the_holder_then_the_older_claim() {
        let held_at = Ipv4Addr::new(100, 64, 0, 2);
        let mut cases = 0;
        for contest in [Contest::Key, Contest::Address] {
            for holder in [Holder::Nobody, Holder::ByGateway, Holder::ByStatus] {
                // The incumbent (the peer that holds, when anybody does) is the older or
                // the newer of the two.
                for incumbent_older in [true, false] {
                    // Names in both orders, in one namespace and across two.
                    for (inc_id, ch_id) in [
                        (("kuberaya-system", "ops-laptop"), ("kuberaya-system", "aa-copy")),
                        (("kuberaya-system", "aa-ops"), ("kuberaya-system", "zz-copy")),
                        (("kuberaya-system", "ops-laptop"), ("apps", "copy")),
                        (("apps", "ops-laptop"), ("kuberaya-system", "copy")),
                    ] {
                        for reversed in [false, true] {
                            cases += 1;
                            let what = format!(
                                "{contest:?}, held {holder:?}, incumbent older {incumbent_older}, {inc_id:?} vs {ch_id:?}, reversed {reversed}"
                            );
                            let mut inc = peer(inc_id.0, inc_id.1);
                            let mut ch = peer(ch_id.0, ch_id.1);
                            match contest {
                                Contest::Key => ch.spec.public_key = inc.spec.public_key.clone(),
                                Contest::Address => {
                                    inc.spec.address = (holder == Holder::Nobody).then(|| held_at.to_string());
                                    ch.spec.address = Some(held_at.to_string());
                                }
                            }
                            let (inc_age, ch_age) = if incumbent_older { (1, 2) } else { (2, 1) };
                            let (inc, ch) = (created(inc, inc_age), created(ch, ch_age));
                            let mut previous = Validation::default();
                            let mut inc = inc;
                            match holder {
                                Holder::Nobody => {}
                                Holder::ByGateway => previous = check(std::slice::from_ref(&inc)),
                                Holder::ByStatus => {
                                    inc.granted = Granted {
                                        key: true,
                                        address: Some(held_at),
                                    };
                                }
                            }
                            let inputs = if reversed {
                                vec![ch.clone(), inc.clone()]
                            } else {
                                vec![inc.clone(), ch.clone()]
                            };
                            let v = validate(&inputs, &previous, &cfg(), now());
                            let incumbent_wins = holder != Holder::Nobody || incumbent_older;
                            let (winner, loser) = if incumbent_wins { (&inc, &ch) } else { (&ch, &inc) };
                            let won = v
                                .accepted(&winner.id)
                                .unwrap_or_else(|| panic!("{what}: winner not accepted: {v:?}"));
                            if holder != Holder::Nobody || matches!(contest, Contest::Address) {
                                assert_eq!(won.address, held_at, "{what}");
                            }
                            let rule = if holder == Holder::Nobody {
                                Precedence::Older
                            } else {
                                Precedence::Holds
                            };
                            let expected = match contest {
                                Contest::Key => Rejection::DuplicatePublicKey {
                                    by: winner.id.to_string(),
                                    rule,
                                },
                                Contest::Address => Rejection::AddressTaken {
                                    address: held_at,
                                    by: winner.id.to_string(),
                                    rule,
                                },
                            };
                            assert_eq!(v.rejection(&loser.id), Some(&expected), "{what}");
                            assert!(v.accepted(&loser.id).is_none(), "{what}");
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 2 * 3 * 2 * 4 * 2);
    }

    #[test]
    fn the_loser_is_told_who_won_and_why() {
        let ops = created(peer("kuberaya-system", "ops-laptop"), 1);
        let mut copy = created(peer("apps", "aa-copy"), 2);
        copy.spec.public_key = ops.spec.public_key.clone();
        let previous = check(std::slice::from_ref(&ops));
        let v = validate(&[copy.clone(), ops.clone()], &previous, &cfg(), now());
        let r = v.rejection(&copy.id).unwrap();
        assert_eq!(r.reason(), "DuplicatePublicKey");
        assert_eq!(
            r.to_string(),
            "public key is already used by kuberaya-system/ops-laptop, which already holds it"
        );
        // The winner is exactly as it was: same address, same rules, so its session stays.
        assert_eq!(v.accepted(&ops.id), previous.accepted(&ops.id));
    }

    #[test]
    fn an_accepted_peer_keeps_its_address_until_its_spec_asks_for_another() {
        let a = created(peer("a", "a"), 1);
        let first = check(std::slice::from_ref(&a));
        let at = first.accepted(&a.id).unwrap().address;
        // An older peer appears (a restored backup, say) that wants the same address by
        // its last address: it gets another one; by an explicit address: it is refused.
        let mut wish = created(peer("a", "wish"), 0);
        wish.previous_address = Some(at);
        let mut explicit = created(peer("a", "explicit"), 0);
        explicit.spec.address = Some(at.to_string());
        let v = validate(&[wish.clone(), explicit.clone(), a.clone()], &first, &cfg(), now());
        assert_eq!(v.accepted(&a.id).unwrap().address, at);
        assert_ne!(v.accepted(&wish.id).unwrap().address, at);
        assert_eq!(v.rejection(&explicit.id).unwrap().reason(), "AddressTaken");
        // Its own spec asks for another address: it moves, and the address is free again.
        let mut moved = a.clone();
        moved.spec.address = Some("100.64.0.50".into());
        let v2 = validate(&[moved.clone(), explicit.clone()], &v, &cfg(), now());
        assert_eq!(v2.accepted(&a.id).unwrap().address, Ipv4Addr::new(100, 64, 0, 50));
        assert_eq!(v2.accepted(&explicit.id).unwrap().address, at);
        // Disabled, it holds nothing; enabled again, the address it had is taken now and
        // it gets another.
        let mut off = a.clone();
        off.spec.disabled = true;
        let mut taker = created(peer("a", "taker"), 5);
        taker.spec.address = Some(at.to_string());
        let v3 = validate(&[off, taker.clone()], &first, &cfg(), now());
        assert_eq!(v3.accepted(&taker.id).unwrap().address, at);
        let mut back = a.clone();
        back.previous_address = Some(at);
        let v4 = validate(&[back, taker.clone()], &v3, &cfg(), now());
        assert_eq!(v4.accepted(&taker.id).unwrap().address, at);
        assert_ne!(v4.accepted(&a.id).unwrap().address, at);
    }

    #[test]
    fn a_stale_status_does_not_outrank_what_the_gateway_knows() {
        // The gateway rejected `a` last time (disabled); its status still says it was
        // served at .2, where `b` is now. Enabled again, `a` does not take .2 back.
        let mut a = created(peer("a", "a"), 1);
        a.spec.disabled = true;
        let b = created(peer("a", "b"), 2);
        let before = check(&[a.clone(), b.clone()]);
        let at = before.accepted(&b.id).unwrap().address;
        a.spec.disabled = false;
        a.granted = Granted {
            key: true,
            address: Some(at),
        };
        let v = validate(&[a.clone(), b.clone()], &before, &cfg(), now());
        assert_eq!(v.accepted(&b.id).unwrap().address, at);
        assert_ne!(v.accepted(&a.id).unwrap().address, at);
    }

    #[test]
    fn a_key_held_for_an_older_spec_is_not_held() {
        // `old` was accepted with key K1 and then edited to K2, which `new` holds: `new`
        // keeps K2 although `old` is older.
        let new = created(peer("a", "new"), 2);
        let old = created(peer("a", "old"), 1);
        let previous = check(&[old.clone(), new.clone()]);
        let mut edited = old.clone();
        edited.spec.public_key = new.spec.public_key.clone();
        let v = validate(&[edited.clone(), new.clone()], &previous, &cfg(), now());
        assert!(v.accepted(&new.id).is_some());
        assert_eq!(
            v.rejection(&old.id),
            Some(&Rejection::DuplicatePublicKey {
                by: new.id.to_string(),
                rule: Precedence::Holds
            })
        );
        // After a restart, its status says the same: accepted, but at an older generation.
        let mut from_status = edited.clone();
        from_status.granted = Granted {
            key: false,
            address: previous.accepted(&old.id).map(|p| p.address),
        };
        let mut holder = new.clone();
        holder.granted = Granted {
            key: true,
            address: previous.accepted(&new.id).map(|p| p.address),
        };
        let v = validate(&[from_status, holder], &Validation::default(), &cfg(), now());
        assert!(v.accepted(&new.id).is_some());
        assert_eq!(v.rejection(&old.id).unwrap().reason(), "DuplicatePublicKey");
    }

    #[test]
    fn without_timestamps_the_earlier_entry_is_older() {
        // A peers file: no creationTimestamp or uid; the first entry wins, whatever its name.
        let z = peer("a", "zz");
        let mut a = peer("a", "aa");
        a.spec.public_key = z.spec.public_key.clone();
        let v = check(&[z.clone(), a.clone()]);
        assert!(v.accepted(&z.id).is_some());
        assert_eq!(v.rejection(&a.id).unwrap().reason(), "DuplicatePublicKey");
    }
}

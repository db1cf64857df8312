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
//!
//! IPv6 (issue 24): every served peer also gets an address in the IPv6 tunnel range (a
//! ULA, `fd6b:7261:7961::/64` by default). By default it is the range's prefix plus the
//! IPv4 address's offset in the IPv4 range (`100.64.0.7` → `fd6b:7261:7961::7`), so the two
//! follow each other; `spec.addressV6` names one instead. IPv6 claims follow the same rules:
//! a held address is kept, then explicit and default claims go by age (a lost explicit
//! claim rejects the peer, naming the winner; a lost default one gets another address, its
//! `lastAddressV6` when free, else one above every IPv4 offset, so it takes nobody's
//! default). A following replica serves only the IPv6 address the leader's status grants.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
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
    /// The same for the IPv6 tunnel address (status `addressV6`, else `lastAddressV6`).
    pub previous_address_v6: Option<Ipv6Addr>,
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
    /// Served at this IPv6 address (`status.addressV6` with `Accepted=True`).
    pub address_v6: Option<Ipv6Addr>,
}

impl PeerInput {
    pub fn new(id: PeerId, spec: VpnPeerSpec) -> Self {
        PeerInput {
            id,
            spec,
            preshared_key: Ok(None),
            previous_address: None,
            previous_address_v6: None,
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
    /// Its IPv6 tunnel address; `None` only on a following replica whose leader's status
    /// grants none (a leader without IPv6).
    pub address_v6: Option<Ipv6Addr>,
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
    #[error("addressV6 {0:?} is not an IPv6 address")]
    BadAddressV6(String),
    #[error("address {address} is outside the tunnel range {range} or reserved")]
    AddressOutsideRange { address: IpAddr, range: IpNet },
    #[error("address {address} is already used by {by}, {rule}")]
    AddressTaken {
        address: IpAddr,
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
    RangeExhausted(IpNet),
}

impl Rejection {
    /// The `reason` of the `Accepted=False` condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::BadKey(_) => "InvalidPublicKey",
            Rejection::BadAddress(_) | Rejection::BadAddressV6(_) => "InvalidAddress",
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

/// The IPv6 tunnel range by default (`--tunnel-range-v6`): a ULA ("kraya" in hex after
/// `fd`), the gateway at `::1`.
pub const DEFAULT_TUNNEL_RANGE_V6: &str = "fd6b:7261:7961::/64";

/// The gateway's side of validation.
#[derive(Clone, Debug)]
pub struct TunnelConfig {
    pub range: Ipv4Net,
    /// The IPv6 tunnel range: must hold every offset of `range` (see
    /// [`TunnelConfig::check`]).
    pub range_v6: Ipv6Net,
    /// Peers in this namespace may name any namespace in their rules.
    pub gateway_namespace: String,
}

impl TunnelConfig {
    /// [`DEFAULT_TUNNEL_RANGE_V6`].
    pub fn default_range_v6() -> Ipv6Net {
        DEFAULT_TUNNEL_RANGE_V6.parse().expect("a valid IPv6 network")
    }

    /// Whether the ranges work together: the IPv6 range must hold every IPv4 offset (a
    /// peer's default IPv6 address is the IPv4 one's offset in it).
    pub fn check(&self) -> Result<(), String> {
        let v4_bits = 32 - u32::from(self.range.prefix_len());
        let v6_bits = 128 - u32::from(self.range_v6.prefix_len());
        if v6_bits < v4_bits {
            return Err(format!(
                "the IPv6 tunnel range {} is smaller than the IPv4 one {} (it needs a prefix of at most /{})",
                self.range_v6,
                self.range,
                128 - v4_bits
            ));
        }
        Ok(())
    }

    /// The gateway's own IPv6 tunnel address: `::1` in the range.
    pub fn gateway_address_v6(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.range_v6.network()).saturating_add(1))
    }

    /// Whether a peer may use `a`: inside the IPv6 range, not its first address (the
    /// subnet-router anycast address), not the gateway's.
    pub fn usable_v6(&self, a: Ipv6Addr) -> bool {
        self.range_v6.contains(&a) && a != self.range_v6.network() && a != self.gateway_address_v6()
    }

    /// The default IPv6 address of a peer at `v4`: the IPv6 prefix plus `v4`'s offset in
    /// the IPv4 range.
    pub fn derived_v6(&self, v4: Ipv4Addr) -> Option<Ipv6Addr> {
        if !self.range.contains(&v4) {
            return None;
        }
        let offset = u128::from(u32::from(v4) - u32::from(self.range.network()));
        let a = Ipv6Addr::from(u128::from(self.range_v6.network()).checked_add(offset)?);
        self.usable_v6(a).then_some(a)
    }

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
    validate_as(inputs, previous, cfg, now, Role::Leading)
}

/// Who decides the IPv6 addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// This replica decides (alone, or as the leader).
    Leading,
    /// The leader decides: a peer gets the IPv6 address its status grants, or none.
    Following,
}

/// [`validate`] for a replica in `role`.
pub fn validate_as(
    inputs: &[PeerInput],
    previous: &Validation,
    cfg: &TunnelConfig,
    now: Timestamp,
    role: Role,
) -> Validation {
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
        explicit_v6: Option<Ipv6Addr>,
        holds_key: bool,
        held_address: Option<Ipv4Addr>,
        held_v6: Option<Ipv6Addr>,
    }
    let mut candidates = Vec::with_capacity(inputs.len());
    for (index, input) in inputs.iter().enumerate() {
        match check_alone(input, cfg, now) {
            Err(r) => out.rejected.push((input.id.clone(), r)),
            Ok(Alone {
                key,
                rules,
                psk,
                explicit,
                explicit_v6,
            }) => {
                let (holds_key, held_address, held_v6) = held(input, &key, previous);
                let held_address = held_address.filter(|a| cfg.usable(*a) && explicit.is_none_or(|e| e == *a));
                // A follower takes the leader's word for the IPv6 address, as written.
                let held_v6 = match role {
                    Role::Leading => held_v6,
                    Role::Following => input.granted.address_v6,
                };
                let held_v6 = held_v6.filter(|a| cfg.usable_v6(*a) && explicit_v6.is_none_or(|e| e == *a));
                candidates.push(Candidate {
                    input,
                    index,
                    key,
                    rules,
                    psk,
                    explicit,
                    explicit_v6,
                    holds_key,
                    held_address,
                    held_v6,
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
                    address: a.into(),
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
            failed[i] = Some(Rejection::RangeExhausted(cfg.range.into()));
        }
    }

    // Pass 4: IPv6 addresses of the peers served so far, by the same rules.
    let served: Vec<usize> = live
        .iter()
        .copied()
        .filter(|&i| failed[i].is_none() && address_of[i].is_some())
        .collect();
    let mut taken6: HashMap<Ipv6Addr, (usize, Precedence)> = HashMap::new();
    let mut v6_of: Vec<Option<Ipv6Addr>> = vec![None; candidates.len()];
    for &i in &served {
        if let Some(a) = candidates[i].held_v6
            && !taken6.contains_key(&a)
        {
            taken6.insert(a, (i, Precedence::Holds));
            v6_of[i] = Some(a);
        }
    }
    if role == Role::Leading {
        // Explicit and default claims together, oldest first (`served` is in age order).
        let mut lost_default = Vec::new();
        for &i in &served {
            if v6_of[i].is_some() {
                continue;
            }
            let explicit = candidates[i].explicit_v6;
            let Some(a) = explicit.or_else(|| address_of[i].and_then(|v4| cfg.derived_v6(v4))) else {
                lost_default.push(i);
                continue;
            };
            match taken6.get(&a) {
                Some(&(w, rule)) if explicit.is_some() => {
                    failed[i] = Some(Rejection::AddressTaken {
                        address: a.into(),
                        by: id(w),
                        rule,
                    })
                }
                Some(_) => lost_default.push(i),
                None => {
                    taken6.insert(a, (i, Precedence::Older));
                    v6_of[i] = Some(a);
                }
            }
        }
        // Whoever lost its default address gets its last one back when that is nobody's
        // default, else the first free one above every IPv4 offset.
        let defaults: BTreeSet<Ipv6Addr> = served
            .iter()
            .filter_map(|&i| address_of[i].and_then(|v4| cfg.derived_v6(v4)))
            .collect();
        let network = u128::from(cfg.range_v6.network());
        let v4_size = 1u128 << (32 - u32::from(cfg.range.prefix_len()));
        let above = Ipv6Addr::from(network.saturating_add(v4_size));
        let mut next = if cfg.range_v6.contains(&above) {
            above
        } else {
            cfg.range_v6.network()
        };
        for i in lost_default {
            let wish = candidates[i]
                .input
                .previous_address_v6
                .filter(|a| cfg.usable_v6(*a) && !taken6.contains_key(a) && !defaults.contains(a));
            let found = wish.or_else(|| {
                // Bounded: every address skipped is taken or someone's default.
                for _ in 0..=(taken6.len() + defaults.len() + 2) {
                    let a = next;
                    next = Ipv6Addr::from(u128::from(next).wrapping_add(1));
                    if !cfg.range_v6.contains(&a) {
                        return None;
                    }
                    if cfg.usable_v6(a) && !taken6.contains_key(&a) && !defaults.contains(&a) {
                        return Some(a);
                    }
                }
                None
            });
            match found {
                Some(a) => {
                    taken6.insert(a, (i, Precedence::Older));
                    v6_of[i] = Some(a);
                }
                None => failed[i] = Some(Rejection::RangeExhausted(cfg.range_v6.into())),
            }
        }
    }

    out.accepted.reserve_exact(candidates.len());
    for (i, c) in candidates.into_iter().enumerate() {
        match (address_of[i], failed[i].take()) {
            (_, Some(r)) => out.rejected.push((c.input.id.clone(), r)),
            (Some(address), None) => out.accepted.push(AcceptedPeer {
                id: c.input.id.clone(),
                public_key: c.key,
                address,
                address_v6: v6_of[i],
                rules: c.rules,
                preshared_key: c.psk,
                expires_at: c.input.spec.expires_at.as_ref().map(|t| t.0),
            }),
            (None, None) => out
                .rejected
                .push((c.input.id.clone(), Rejection::RangeExhausted(cfg.range.into()))),
        }
    }
    // Looked up by id (binary search).
    out.accepted.sort_by(|a, b| a.id.cmp(&b.id));
    out.rejected.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Whether the peer holds `key`, and the addresses it holds (before the spec is checked
/// against them). This gateway's previous validation knows best; a peer it has not seen
/// yet (after a restart) holds what its status says.
fn held(input: &PeerInput, key: &PublicKey, previous: &Validation) -> (bool, Option<Ipv4Addr>, Option<Ipv6Addr>) {
    if let Some(p) = previous.accepted(&input.id) {
        return (p.public_key == *key, Some(p.address), p.address_v6);
    }
    if previous.rejection(&input.id).is_some() {
        // Its status may still say what it had before it was rejected.
        return (false, None, None);
    }
    (input.granted.key, input.granted.address, input.granted.address_v6)
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

/// What is decided of a peer by itself.
struct Alone {
    key: PublicKey,
    rules: Vec<Rule>,
    psk: Option<PresharedKey>,
    explicit: Option<Ipv4Addr>,
    explicit_v6: Option<Ipv6Addr>,
}

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
                    address: a.into(),
                    range: cfg.range.into(),
                });
            }
            Some(a)
        }
    };
    let explicit_v6 = match spec.address_v6.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => {
            // Accept "fd6b:7261:7961::7" and "fd6b:7261:7961::7/128".
            let bare = s.strip_suffix("/128").unwrap_or(s);
            let a: Ipv6Addr = bare.parse().map_err(|_| Rejection::BadAddressV6(s.to_string()))?;
            if !cfg.usable_v6(a) {
                return Err(Rejection::AddressOutsideRange {
                    address: a.into(),
                    range: cfg.range_v6.into(),
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
    Ok(Alone {
        key,
        rules,
        psk,
        explicit,
        explicit_v6,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::AllowRule;
    use crate::keys::PrivateKey;

    pub(crate) fn cfg() -> TunnelConfig {
        TunnelConfig {
            range: "100.64.0.0/16".parse().unwrap(),
            range_v6: TunnelConfig::default_range_v6(),
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
            range_v6: TunnelConfig::default_range_v6(),
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
                                        ..Default::default()
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
                                    address: held_at.into(),
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
            ..Default::default()
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
            ..Default::default()
        };
        let mut holder = new.clone();
        holder.granted = Granted {
            key: true,
            address: previous.accepted(&new.id).map(|p| p.address),
            ..Default::default()
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

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn the_ipv6_address_follows_the_ipv4_offset() {
        let c = cfg();
        assert_eq!(c.gateway_address_v6(), v6("fd6b:7261:7961::1"));
        let mut b = peer("a", "b");
        b.spec.address = Some("100.64.1.50".into());
        let v = check(&[peer("a", "a"), b.clone()]);
        assert_eq!(v.accepted[0].address_v6, Some(v6("fd6b:7261:7961::2")));
        // 100.64.1.50 is offset 256 + 50 = 0x132.
        assert_eq!(v.accepted(&b.id).unwrap().address_v6, Some(v6("fd6b:7261:7961::132")));
        // Kept while it stays, also when the IPv4 address it came from does not.
        let mut explicit = peer("a", "e");
        explicit.spec.address_v6 = Some("fd6b:7261:7961::beef/128".into());
        let v = check(&[explicit.clone()]);
        assert_eq!(v.accepted[0].address_v6, Some(v6("fd6b:7261:7961::beef")));
        assert_eq!(v.accepted[0].address, Ipv4Addr::new(100, 64, 0, 2));
    }

    #[test]
    fn the_ipv6_range_must_hold_every_ipv4_offset() {
        let mut c = cfg();
        assert_eq!(c.check(), Ok(()));
        c.range_v6 = "fd6b:7261:7961::/112".parse().unwrap();
        assert_eq!(c.check(), Ok(()), "a /16 fits a /112 exactly");
        c.range_v6 = "fd6b:7261:7961::/113".parse().unwrap();
        let e = c.check().unwrap_err();
        assert!(e.contains("/112"), "{e}");
    }

    #[test]
    fn bad_ipv6_addresses_are_rejected() {
        for (given, reason, message) in [
            (
                "100.64.0.9",
                "InvalidAddress",
                "addressV6 \"100.64.0.9\" is not an IPv6 address",
            ),
            ("nope", "InvalidAddress", "addressV6 \"nope\" is not an IPv6 address"),
            (
                "fd00::1",
                "AddressOutsideRange",
                "address fd00::1 is outside the tunnel range fd6b:7261:7961::/64 or reserved",
            ),
            (
                "fd6b:7261:7961::1",
                "AddressOutsideRange",
                "address fd6b:7261:7961::1 is outside the tunnel range fd6b:7261:7961::/64 or reserved",
            ),
            (
                "fd6b:7261:7961::",
                "AddressOutsideRange",
                "address fd6b:7261:7961:: is outside the tunnel range fd6b:7261:7961::/64 or reserved",
            ),
        ] {
            let mut a = peer("a", "a");
            a.spec.address_v6 = Some(given.into());
            let v = check(&[a]);
            let r = &v.rejected[0].1;
            assert_eq!((r.reason(), r.to_string().as_str()), (reason, message), "{given}");
        }
    }

    /// What two peers fight over in [`ipv6_conflicts_go_to_the_holder_then_the_older_claim`].
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Contest6 {
        /// Both name the address in `addressV6` (the incumbent only when nobody holds it).
        Explicit,
        /// The challenger names the incumbent's default address.
        Default,
    }

    #[test]
    fn ipv6_conflicts_go_to_the_holder_then_the_older_claim() {
        let mut cases = 0;
        for contest in [Contest6::Explicit, Contest6::Default] {
            for holder in [Holder::Nobody, Holder::ByGateway, Holder::ByStatus] {
                for incumbent_older in [true, false] {
                    for reversed in [false, true] {
                        cases += 1;
                        let what = format!(
                            "{contest:?}, held {holder:?}, incumbent older {incumbent_older}, reversed {reversed}"
                        );
                        let (inc_age, ch_age) = if incumbent_older { (1, 2) } else { (2, 1) };
                        let mut inc = created(peer("kuberaya-system", "ops"), inc_age);
                        let mut ch = created(peer("apps", "copy"), ch_age);
                        // The incumbent is at .2; its default IPv6 address is ::2.
                        inc.spec.address = Some("100.64.0.2".into());
                        ch.spec.address = Some("100.64.0.3".into());
                        let contested = match contest {
                            Contest6::Explicit => v6("fd6b:7261:7961::77"),
                            Contest6::Default => v6("fd6b:7261:7961::2"),
                        };
                        if contest == Contest6::Explicit && holder == Holder::Nobody {
                            inc.spec.address_v6 = Some(contested.to_string());
                        }
                        ch.spec.address_v6 = Some(contested.to_string());
                        let mut previous = Validation::default();
                        match holder {
                            Holder::Nobody => {}
                            Holder::ByGateway => {
                                let mut alone = inc.clone();
                                alone.spec.address_v6 = Some(contested.to_string());
                                previous = check(std::slice::from_ref(&alone));
                            }
                            Holder::ByStatus => {
                                inc.granted = Granted {
                                    key: true,
                                    address: Some(Ipv4Addr::new(100, 64, 0, 2)),
                                    address_v6: Some(contested),
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
                        let rule = if holder == Holder::Nobody {
                            Precedence::Older
                        } else {
                            Precedence::Holds
                        };
                        if incumbent_wins {
                            let won = v.accepted(&inc.id).unwrap_or_else(|| panic!("{what}: {v:?}"));
                            assert_eq!(won.address_v6, Some(contested), "{what}");
                            assert_eq!(
                                v.rejection(&ch.id),
                                Some(&Rejection::AddressTaken {
                                    address: contested.into(),
                                    by: inc.id.to_string(),
                                    rule,
                                }),
                                "{what}"
                            );
                        } else {
                            let won = v.accepted(&ch.id).unwrap_or_else(|| panic!("{what}: {v:?}"));
                            assert_eq!(won.address_v6, Some(contested), "{what}");
                            match contest {
                                // Both named it: the newer explicit claim is refused.
                                Contest6::Explicit => assert_eq!(
                                    v.rejection(&inc.id),
                                    Some(&Rejection::AddressTaken {
                                        address: contested.into(),
                                        by: ch.id.to_string(),
                                        rule: Precedence::Older,
                                    }),
                                    "{what}"
                                ),
                                // A default is a default: the newer peer gets another
                                // address, above every IPv4 offset (nobody's default).
                                Contest6::Default => assert_eq!(
                                    v.accepted(&inc.id).unwrap().address_v6,
                                    Some(v6("fd6b:7261:7961::1:0")),
                                    "{what}"
                                ),
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 2 * 3 * 2 * 2);
    }

    #[test]
    fn a_lost_default_gets_its_last_ipv6_address_back_when_it_is_nobodys_default() {
        // `late` (newer) has default ::2, which the older `named` names explicitly.
        let mut named = created(peer("a", "named"), 1);
        named.spec.address = Some("100.64.0.9".into());
        named.spec.address_v6 = Some("fd6b:7261:7961::2".into());
        let mut late = created(peer("a", "late"), 2);
        late.spec.address = Some("100.64.0.2".into());
        late.previous_address_v6 = Some(v6("fd6b:7261:7961::1:5"));
        let v = check(&[late.clone(), named.clone()]);
        assert_eq!(
            v.accepted(&late.id).unwrap().address_v6,
            Some(v6("fd6b:7261:7961::1:5"))
        );
        // Its last address is somebody's default (::9, named's IPv4 offset): not given.
        late.previous_address_v6 = Some(v6("fd6b:7261:7961::9"));
        let v = check(&[late.clone(), named.clone()]);
        assert_eq!(
            v.accepted(&late.id).unwrap().address_v6,
            Some(v6("fd6b:7261:7961::1:0"))
        );
    }

    #[test]
    fn a_follower_serves_only_the_ipv6_address_the_status_grants() {
        let mut granted = created(peer("a", "granted"), 1);
        granted.granted = Granted {
            key: true,
            address: Some(Ipv4Addr::new(100, 64, 0, 2)),
            address_v6: Some(v6("fd6b:7261:7961::abc")),
        };
        let mut without = created(peer("a", "without"), 2);
        without.granted = Granted {
            key: true,
            address: Some(Ipv4Addr::new(100, 64, 0, 3)),
            address_v6: None,
        };
        let v = validate_as(
            &[granted.clone(), without.clone()],
            &Validation::default(),
            &cfg(),
            now(),
            Role::Following,
        );
        assert_eq!(
            v.accepted(&granted.id).unwrap().address_v6,
            Some(v6("fd6b:7261:7961::abc"))
        );
        assert_eq!(
            v.accepted(&without.id).unwrap().address_v6,
            None,
            "no default of its own"
        );
        assert_eq!(v.accepted(&without.id).unwrap().address, Ipv4Addr::new(100, 64, 0, 3));
        // The leader moves it: the follower follows the status, not its last validation.
        granted.granted.address_v6 = Some(v6("fd6b:7261:7961::abd"));
        let v2 = validate_as(&[granted.clone()], &v, &cfg(), now(), Role::Following);
        assert_eq!(
            v2.accepted(&granted.id).unwrap().address_v6,
            Some(v6("fd6b:7261:7961::abd"))
        );
        // The same inputs decided by a leader give the default to the one without.
        let v3 = validate(&[granted, without.clone()], &Validation::default(), &cfg(), now());
        assert_eq!(
            v3.accepted(&without.id).unwrap().address_v6,
            Some(v6("fd6b:7261:7961::3"))
        );
    }

    #[test]
    fn a_small_ipv6_range_allocates_within_itself_and_exhausts() {
        // /125 holds ::0-::7 and every IPv4 offset of the /29: no room above them.
        let c = TunnelConfig {
            range: "100.64.0.0/29".parse().unwrap(),
            range_v6: "fd6b:7261:7961::/125".parse().unwrap(),
            gateway_namespace: "g".into(),
        };
        assert_eq!(c.check(), Ok(()));
        let named = |name: &str, age: i64, at: &str| {
            let mut p = created(peer("a", name), age);
            p.spec.address_v6 = Some(format!("fd6b:7261:7961::{at}"));
            p
        };
        // n1-n3 at .2-.4 name ::3, ::5, ::6; `late` at .5 loses its default ::5.
        let late = created(peer("a", "late"), 9);
        let mut inputs = vec![
            named("n1", 1, "3"),
            named("n2", 2, "5"),
            named("n3", 3, "6"),
            late.clone(),
        ];
        // ::7 is free and nobody's default (.7 is the broadcast address): it gets it.
        let v = validate(&inputs, &Validation::default(), &c, now());
        assert_eq!(v.accepted(&late.id).unwrap().address, Ipv4Addr::new(100, 64, 0, 5));
        assert_eq!(v.accepted(&late.id).unwrap().address_v6, Some(v6("fd6b:7261:7961::7")));
        // n4 at .5 names ::7, `late` at .6 loses ::6: every other address is the
        // gateway's, a default or taken.
        inputs.insert(3, named("n4", 4, "7"));
        let v = validate(&inputs, &Validation::default(), &c, now());
        assert_eq!(v.accepted.len(), 4, "{v:?}");
        let r = v.rejection(&late.id).unwrap();
        assert_eq!(r.reason(), "AddressRangeExhausted");
        assert_eq!(
            r.to_string(),
            "no free address left in the tunnel range fd6b:7261:7961::/125"
        );
    }
}

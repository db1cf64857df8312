//! Access policies (`VpnAccessPolicy`): label-selected grants, like NetworkPolicy, with an
//! optional expiry. What a peer may reach is its own `allow` plus the rules of every
//! unexpired, accepted policy that selects it; nothing else (default deny).
//!
//! Pure: the caller passes the peers (with their labels), the validation that accepted
//! some of them, the policies and the time. The rules:
//! - a policy in the gateway's namespace selects peers of the namespaces its
//!   `namespaceSelector` picks (its own when absent) and may grant any namespace;
//! - a policy elsewhere selects peers of its own namespace only, whatever its selectors
//!   say, and grants only its own namespace: a rule naming another namespace refuses the
//!   whole policy (as it rejects a peer), with the reason in its status;
//! - an expired policy, or one with an invalid selector, grants nothing.
//!
//! Every rule keeps where it came from ([`RuleSource`]): the ACL answers with it, for the
//! audit log and [`crate::access::explain`]. Peers with equal effective rules get one shared list, and
//! the ACL compiles each distinct list once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;

use crate::crd::{LabelSelector, VpnAccessPolicySpec};
use crate::peers::{PeerId, PeerInput, Rule, Validation};

/// `namespace/name` of a `VpnAccessPolicy`.
pub type PolicyId = PeerId;

/// Labels of an object.
pub type Labels = BTreeMap<String, String>;

/// The label every namespace carries with its own name (Kubernetes 1.22 and later).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// The label every peer carries with its own name for policy selection, as namespaces
/// carry [`NAMESPACE_NAME_LABEL`]: the gateway sets it from `metadata.name`, over any label
/// of that key on the resource, so that no peer can take another's grant by copying it.
pub const PEER_NAME_LABEL: &str = "vpn.cloudraya.com/peer-name";

/// Whether `selector` looks at `key`.
fn mentions(selector: &LabelSelector, key: &str) -> bool {
    selector.match_labels.contains_key(key) || selector.match_expressions.iter().any(|e| e.key == key)
}

/// One policy as a source delivers it.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyInput {
    pub id: PolicyId,
    pub spec: VpnAccessPolicySpec,
    pub generation: Option<i64>,
    /// The object's uid: a policy deleted and created again under its name is another
    /// object, whose status must be written even if it reads the same.
    pub uid: Option<String>,
}

impl PolicyInput {
    pub fn new(id: PolicyId, spec: VpnAccessPolicySpec) -> Self {
        PolicyInput {
            id,
            spec,
            generation: None,
            uid: None,
        }
    }
}

/// Where an effective rule comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleSource {
    /// The peer's own `spec.allow[i]`.
    Own(usize),
    /// A policy that selects the peer.
    Policy(PolicyId),
}

impl std::fmt::Display for RuleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RuleSource::Own(i) => write!(f, "own rule {i}"),
            RuleSource::Policy(id) => write!(f, "policy {id}"),
        }
    }
}

/// An allow rule with its origin.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourcedRule {
    pub rule: Rule,
    pub source: RuleSource,
}

/// A peer's own rules, sourced (`spec.allow[i]` is rule `i`: validation keeps the order).
pub fn own_rules(rules: &[Rule]) -> Vec<SourcedRule> {
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| SourcedRule {
            rule: r.clone(),
            source: RuleSource::Own(i),
        })
        .collect()
}

/// Why a policy grants nothing. [`PolicyRejection::reason`] is the condition reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyRejection {
    #[error("rule {index} names namespace {namespace:?}; a policy outside the gateway's namespace grants only its own")]
    NamespaceNotAllowed { index: usize, namespace: String },
    #[error("{field}: {message}")]
    InvalidSelector { field: &'static str, message: String },
    #[error("expired at {0}")]
    Expired(String),
}

impl PolicyRejection {
    pub fn reason(&self) -> &'static str {
        match self {
            PolicyRejection::NamespaceNotAllowed { .. } => "NamespaceNotAllowed",
            PolicyRejection::InvalidSelector { .. } => "InvalidSelector",
            PolicyRejection::Expired(_) => "Expired",
        }
    }
}

/// What the gateway reports of one policy (for its status).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyReport {
    pub id: PolicyId,
    pub uid: Option<String>,
    pub generation: Option<i64>,
    pub outcome: Result<(), PolicyRejection>,
    /// The served peers it grants to (0 when it grants nothing).
    pub matched_peers: u32,
    /// A remark on an accepted policy (a `namespaceSelector` that is not honoured).
    pub note: Option<String>,
}

/// The outcome of [`effective`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Effective {
    /// Each accepted peer's effective rules, in the order of `Validation::accepted`. Equal
    /// lists are one `Arc`.
    pub rules: Vec<Arc<[SourcedRule]>>,
    /// Every policy, sorted by id.
    pub policies: Vec<PolicyReport>,
    /// The earliest `expiresAt` of a policy that grants now: when the outcome next changes
    /// without a new snapshot.
    pub next_expiry: Option<Timestamp>,
}

/// Whether `selector` is well formed (the API server's validation of a `LabelSelector`).
pub fn check_selector(selector: &LabelSelector) -> Result<(), String> {
    for e in &selector.match_expressions {
        if e.key.is_empty() {
            return Err("an expression without a key".into());
        }
        match e.operator.as_str() {
            "In" | "NotIn" if e.values.is_empty() => {
                return Err(format!("{} {} needs values", e.key, e.operator));
            }
            "Exists" | "DoesNotExist" if !e.values.is_empty() => {
                return Err(format!("{} {} takes no values", e.key, e.operator));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => return Err(format!("unknown operator {other:?}")),
        }
    }
    Ok(())
}

/// Whether `labels` satisfy `selector` (checked with [`check_selector`] first: an invalid
/// expression matches nothing).
pub fn selects(selector: &LabelSelector, labels: &Labels) -> bool {
    selector.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
        && selector.match_expressions.iter().all(|e| {
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| e.values.contains(v)),
                "NotIn" => value.is_none_or(|v| !e.values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

/// A policy that grants: which peers and what.
struct Granting<'a> {
    /// The policy's position in the sorted list (and its report's).
    index: usize,
    namespace: &'a str,
    /// `None`: its own namespace only.
    namespaces: Option<&'a LabelSelector>,
    peers: &'a LabelSelector,
    rules: Vec<SourcedRule>,
}

/// Check one policy alone: its rules (namespace filled in) and the selectors it uses.
fn check_policy<'a>(
    index: usize,
    p: &'a PolicyInput,
    gateway_namespace: &str,
    now: Timestamp,
) -> Result<(Granting<'a>, Option<String>), PolicyRejection> {
    let own = p.id.namespace.as_str();
    let privileged = own == gateway_namespace;
    if let Some(exp) = &p.spec.expires_at
        && exp.0 <= now
    {
        return Err(PolicyRejection::Expired(exp.0.to_string()));
    }
    check_selector(&p.spec.peer_selector).map_err(|message| PolicyRejection::InvalidSelector {
        field: "peerSelector",
        message,
    })?;
    let mut note = None;
    let namespaces = match &p.spec.namespace_selector {
        Some(s) if privileged => {
            check_selector(s).map_err(|message| PolicyRejection::InvalidSelector {
                field: "namespaceSelector",
                message,
            })?;
            Some(s)
        }
        Some(_) => {
            note = Some(format!(
                "namespaceSelector ignored: outside {gateway_namespace} a policy selects peers of its own namespace"
            ));
            None
        }
        None => None,
    };
    let mut rules = Vec::with_capacity(p.spec.allow.len());
    for (i, r) in p.spec.allow.iter().enumerate() {
        let namespace = r
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| own.to_string());
        if !privileged && namespace != own {
            return Err(PolicyRejection::NamespaceNotAllowed { index: i, namespace });
        }
        rules.push(SourcedRule {
            rule: Rule {
                namespace,
                service: r.service.clone().filter(|s| !s.is_empty()),
                ports: r.ports.clone(),
            },
            source: RuleSource::Policy(p.id.clone()),
        });
    }
    Ok((
        Granting {
            index,
            namespace: own,
            namespaces,
            peers: &p.spec.peer_selector,
            rules,
        },
        note,
    ))
}

/// The effective rules of every accepted peer at `now`, and the report of every policy.
/// `inputs` give the peers' labels; `namespaces` the labels of namespaces (a namespace
/// missing there is known by its [`NAMESPACE_NAME_LABEL`] alone).
pub fn effective(
    inputs: &[PeerInput],
    validation: &Validation,
    policies: &[PolicyInput],
    namespaces: &HashMap<String, Labels>,
    gateway_namespace: &str,
    now: Timestamp,
) -> Effective {
    let mut sorted: Vec<&PolicyInput> = policies.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut reports: Vec<PolicyReport> = Vec::with_capacity(sorted.len());
    let mut granting = Vec::new();
    let mut next_expiry: Option<Timestamp> = None;
    for (index, p) in sorted.iter().enumerate() {
        let outcome = check_policy(index, p, gateway_namespace, now);
        let note = match outcome {
            Ok((g, note)) => {
                if let Some(t) = p.spec.expires_at.as_ref().map(|t| t.0) {
                    next_expiry = Some(next_expiry.map_or(t, |n| n.min(t)));
                }
                granting.push(g);
                note
            }
            Err(ref e) => {
                reports.push(PolicyReport {
                    id: p.id.clone(),
                    uid: p.uid.clone(),
                    generation: p.generation,
                    outcome: Err(e.clone()),
                    matched_peers: 0,
                    note: None,
                });
                continue;
            }
        };
        reports.push(PolicyReport {
            id: p.id.clone(),
            uid: p.uid.clone(),
            generation: p.generation,
            outcome: Ok(()),
            matched_peers: 0,
            note,
        });
    }
    // Candidates by namespace: a policy without a namespaceSelector can select only its
    // own namespace's peers, so a peer is checked against those and the few that have one.
    let mut by_namespace: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut anywhere: Vec<usize> = Vec::new();
    for (gi, g) in granting.iter().enumerate() {
        match g.namespaces {
            None => by_namespace.entry(g.namespace).or_default().push(gi),
            Some(_) => anywhere.push(gi),
        }
    }
    let labels_of: HashMap<&PeerId, &Labels> = inputs.iter().map(|i| (&i.id, &i.labels)).collect();
    let empty = Labels::new();
    let mut namespace_labels: HashMap<&str, Labels> = HashMap::new();
    // The peer's own name is a label only when some policy selects by it (otherwise every
    // peer's label set would be unique, and the cache below would hold one per peer).
    let by_name = granting.iter().any(|g| mentions(g.peers, PEER_NAME_LABEL));
    // Peers with the same namespace and labels are selected by the same policies.
    let mut selected: HashMap<(&str, Labels), Arc<Vec<usize>>> = HashMap::new();
    let mut interned: HashMap<Vec<SourcedRule>, Arc<[SourcedRule]>> = HashMap::new();
    let mut out_rules = Vec::with_capacity(validation.accepted.len());
    for peer in &validation.accepted {
        let ns = peer.id.namespace.as_str();
        let mut labels = labels_of.get(&peer.id).copied().unwrap_or(&empty).clone();
        if by_name {
            labels.insert(PEER_NAME_LABEL.to_string(), peer.id.name.clone());
        }
        let picked = selected
            .entry((ns, labels.clone()))
            .or_insert_with(|| {
                let ns_labels = namespace_labels.entry(ns).or_insert_with(|| {
                    let mut l = namespaces.get(ns).cloned().unwrap_or_default();
                    l.insert(NAMESPACE_NAME_LABEL.to_string(), ns.to_string());
                    l
                });
                let mut picked: Vec<usize> = by_namespace
                    .get(ns)
                    .into_iter()
                    .flatten()
                    .chain(&anywhere)
                    .copied()
                    .filter(|&gi| {
                        let g = &granting[gi];
                        g.namespaces.is_none_or(|s| selects(s, ns_labels)) && selects(g.peers, &labels)
                    })
                    .collect();
                // Policy order (by id), whichever list each came from.
                picked.sort_unstable();
                Arc::new(picked)
            })
            .clone();
        let mut rules = own_rules(&peer.rules);
        for &gi in picked.iter() {
            let g = &granting[gi];
            // One report per policy, in policy order.
            reports[g.index].matched_peers += 1;
            rules.extend(g.rules.iter().cloned());
        }
        let shared = match interned.get(&rules) {
            Some(r) => r.clone(),
            None => {
                let r: Arc<[SourcedRule]> = rules.clone().into();
                interned.insert(rules, r.clone());
                r
            }
        };
        out_rules.push(shared);
    }
    Effective {
        rules: out_rules,
        policies: reports,
        next_expiry,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::acl::Acl;
    use crate::catalog::{Catalog, Protocol, Service, ServicePort};
    use crate::crd::{AllowRule, LabelSelectorRequirement, VpnPeerSpec};
    use crate::keys::PrivateKey;
    use crate::peers::{TunnelConfig, validate};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const GW: &str = "kuberaya-system";

    pub(crate) fn tunnel() -> TunnelConfig {
        TunnelConfig {
            range_v6: TunnelConfig::default_range_v6(),
            range: "100.64.0.0/16".parse().unwrap(),
            gateway_namespace: GW.into(),
        }
    }

    pub(crate) fn now() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    pub(crate) fn peer(ns: &str, name: &str, l: &[(&str, &str)], allow: Vec<AllowRule>) -> PeerInput {
        let mut p = PeerInput::new(
            PeerId::new(ns, name),
            VpnPeerSpec {
                public_key: PrivateKey::generate().public_key().to_base64(),
                allow,
                ..Default::default()
            },
        );
        p.labels = labels(l);
        p
    }

    pub(crate) fn allow(ns: Option<&str>, svc: Option<&str>) -> AllowRule {
        AllowRule {
            namespace: ns.map(Into::into),
            service: svc.map(Into::into),
            ports: None,
        }
    }

    pub(crate) fn matching(l: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: labels(l),
            ..Default::default()
        }
    }

    pub(crate) fn policy(ns: &str, name: &str, sel: LabelSelector, allow: Vec<AllowRule>) -> PolicyInput {
        PolicyInput::new(
            PolicyId::new(ns, name),
            VpnAccessPolicySpec {
                peer_selector: sel,
                allow,
                ..Default::default()
            },
        )
    }

    fn run(peers: &[PeerInput], policies: &[PolicyInput]) -> (Validation, Effective) {
        run_at(peers, policies, now())
    }

    fn run_at(peers: &[PeerInput], policies: &[PolicyInput], at: Timestamp) -> (Validation, Effective) {
        let v = validate(peers, &Validation::default(), &tunnel(), at);
        let e = effective(peers, &v, policies, &HashMap::new(), GW, at);
        (v, e)
    }

    /// `peer`'s effective rules as (namespace, service, source) triples.
    fn reach(v: &Validation, e: &Effective, ns: &str, name: &str) -> Vec<(String, Option<String>, String)> {
        let i = v
            .accepted
            .iter()
            .position(|p| p.id == PeerId::new(ns, name))
            .expect("accepted");
        e.rules[i]
            .iter()
            .map(|r| (r.rule.namespace.clone(), r.rule.service.clone(), r.source.to_string()))
            .collect()
    }

    fn report<'e>(e: &'e Effective, ns: &str, name: &str) -> &'e PolicyReport {
        e.policies
            .iter()
            .find(|r| r.id == PolicyId::new(ns, name))
            .expect("reported")
    }

    fn r(ns: &str, svc: Option<&str>, by: &str) -> (String, Option<String>, String) {
        (ns.into(), svc.map(Into::into), by.into())
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let l = labels(&[("team", "db"), ("tier", "gold")]);
        let expr = |key: &str, op: &str, values: &[&str]| LabelSelector {
            match_labels: Default::default(),
            match_expressions: vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: values.iter().map(|v| v.to_string()).collect(),
            }],
        };
        let cases: Vec<(LabelSelector, bool)> = vec![
            (LabelSelector::default(), true),
            (matching(&[("team", "db")]), true),
            (matching(&[("team", "db"), ("tier", "gold")]), true),
            (matching(&[("team", "web")]), false),
            (matching(&[("other", "x")]), false),
            (expr("tier", "In", &["gold", "silver"]), true),
            (expr("tier", "In", &["silver"]), false),
            (expr("tier", "NotIn", &["silver"]), true),
            (expr("missing", "NotIn", &["x"]), true),
            (expr("tier", "Exists", &[]), true),
            (expr("missing", "Exists", &[]), false),
            (expr("missing", "DoesNotExist", &[]), true),
            (expr("tier", "DoesNotExist", &[]), false),
        ];
        for (sel, want) in cases {
            assert!(check_selector(&sel).is_ok(), "{sel:?}");
            assert_eq!(selects(&sel, &l), want, "{sel:?}");
        }
        for bad in [
            expr("tier", "In", &[]),
            expr("tier", "Exists", &["x"]),
            expr("tier", "Matches", &["x"]),
            expr("", "Exists", &[]),
        ] {
            assert!(check_selector(&bad).is_err(), "{bad:?}");
        }
    }

    /// One row of the union table: the peers, the policies, and what one peer reaches.
    struct Case {
        what: &'static str,
        peers: Vec<PeerInput>,
        policies: Vec<PolicyInput>,
        peer: (&'static str, &'static str),
        want: Vec<(String, Option<String>, String)>,
    }

    #[test]
    fn a_peer_reaches_its_own_rules_and_every_policy_that_selects_it() {
        let dba = || peer("team-a", "alice", &[("role", "dba")], vec![allow(None, Some("web"))]);
        let cases = vec![
            Case {
                what: "no policy: own rules only",
                peers: vec![dba()],
                policies: vec![],
                peer: ("team-a", "alice"),
                want: vec![r("team-a", Some("web"), "own rule 0")],
            },
            Case {
                what: "a selecting policy adds its rules after the own ones",
                peers: vec![dba()],
                policies: vec![policy(
                    "team-a",
                    "db",
                    matching(&[("role", "dba")]),
                    vec![allow(None, Some("pg"))],
                )],
                peer: ("team-a", "alice"),
                want: vec![
                    r("team-a", Some("web"), "own rule 0"),
                    r("team-a", Some("pg"), "policy team-a/db"),
                ],
            },
            Case {
                what: "two policies: both, in policy order",
                peers: vec![dba()],
                policies: vec![
                    policy(
                        "team-a",
                        "z-cache",
                        LabelSelector::default(),
                        vec![allow(None, Some("redis"))],
                    ),
                    policy(
                        "team-a",
                        "db",
                        matching(&[("role", "dba")]),
                        vec![allow(None, Some("pg"))],
                    ),
                ],
                peer: ("team-a", "alice"),
                want: vec![
                    r("team-a", Some("web"), "own rule 0"),
                    r("team-a", Some("pg"), "policy team-a/db"),
                    r("team-a", Some("redis"), "policy team-a/z-cache"),
                ],
            },
            Case {
                what: "a policy whose labels do not match adds nothing",
                peers: vec![dba()],
                policies: vec![policy(
                    "team-a",
                    "db",
                    matching(&[("role", "dev")]),
                    vec![allow(None, Some("pg"))],
                )],
                peer: ("team-a", "alice"),
                want: vec![r("team-a", Some("web"), "own rule 0")],
            },
            Case {
                what: "a peer without own rules reaches what the policy grants",
                peers: vec![peer("team-a", "bob", &[("role", "dba")], vec![])],
                policies: vec![policy(
                    "team-a",
                    "db",
                    matching(&[("role", "dba")]),
                    vec![allow(None, None)],
                )],
                peer: ("team-a", "bob"),
                want: vec![r("team-a", None, "policy team-a/db")],
            },
            Case {
                what: "default deny: no rules, no policy",
                peers: vec![peer("team-a", "bob", &[], vec![])],
                policies: vec![policy(
                    "team-a",
                    "db",
                    matching(&[("role", "dba")]),
                    vec![allow(None, None)],
                )],
                peer: ("team-a", "bob"),
                want: vec![],
            },
            Case {
                what: "a team-a policy never selects a team-b peer, whatever its selector",
                peers: vec![peer("team-b", "eve", &[("role", "dba")], vec![])],
                policies: vec![{
                    let mut p = policy("team-a", "db", LabelSelector::default(), vec![allow(None, Some("pg"))]);
                    p.spec.namespace_selector = Some(LabelSelector::default());
                    p
                }],
                peer: ("team-b", "eve"),
                want: vec![],
            },
            Case {
                what: "a team-a policy naming team-b grants nothing, even to team-a's own peers",
                peers: vec![dba()],
                policies: vec![policy(
                    "team-a",
                    "sneaky",
                    LabelSelector::default(),
                    vec![allow(None, Some("pg")), allow(Some("team-b"), Some("pg"))],
                )],
                peer: ("team-a", "alice"),
                want: vec![r("team-a", Some("web"), "own rule 0")],
            },
            Case {
                what: "a gateway-namespace policy without namespaceSelector selects its own namespace",
                peers: vec![dba()],
                policies: vec![policy(
                    GW,
                    "ops",
                    LabelSelector::default(),
                    vec![allow(Some("db"), None)],
                )],
                peer: ("team-a", "alice"),
                want: vec![r("team-a", Some("web"), "own rule 0")],
            },
            Case {
                what: "a gateway-namespace policy with a namespaceSelector grants any namespace",
                peers: vec![dba()],
                policies: vec![{
                    let mut p = policy(GW, "ops", matching(&[("role", "dba")]), vec![allow(Some("db"), None)]);
                    p.spec.namespace_selector = Some(matching(&[(NAMESPACE_NAME_LABEL, "team-a")]));
                    p
                }],
                peer: ("team-a", "alice"),
                want: vec![
                    r("team-a", Some("web"), "own rule 0"),
                    r("db", None, &format!("policy {GW}/ops")),
                ],
            },
            Case {
                what: "a namespaceSelector picking another namespace leaves this one out",
                peers: vec![dba()],
                policies: vec![{
                    let mut p = policy(GW, "ops", LabelSelector::default(), vec![allow(Some("db"), None)]);
                    p.spec.namespace_selector = Some(matching(&[(NAMESPACE_NAME_LABEL, "team-b")]));
                    p
                }],
                peer: ("team-a", "alice"),
                want: vec![r("team-a", Some("web"), "own rule 0")],
            },
            Case {
                what: "an expired policy grants nothing",
                peers: vec![dba()],
                policies: vec![{
                    let mut p = policy("team-a", "db", LabelSelector::default(), vec![allow(None, Some("pg"))]);
                    p.spec.expires_at = Some(Time("2025-12-31T23:59:59Z".parse().unwrap()));
                    p
                }],
                peer: ("team-a", "alice"),
                want: vec![r("team-a", Some("web"), "own rule 0")],
            },
            Case {
                what: "a policy with an invalid selector grants nothing",
                peers: vec![dba()],
                policies: vec![policy(
                    "team-a",
                    "bad",
                    LabelSelector {
                        match_expressions: vec![LabelSelectorRequirement {
                            key: "role".into(),
                            operator: "In".into(),
                            values: vec![],
                        }],
                        ..Default::default()
                    },
                    vec![allow(None, Some("pg"))],
                )],
                peer: ("team-a", "alice"),
                want: vec![r("team-a", Some("web"), "own rule 0")],
            },
        ];
        for c in cases {
            let (v, e) = run(&c.peers, &c.policies);
            assert_eq!(reach(&v, &e, c.peer.0, c.peer.1), c.want, "{}", c.what);
        }
    }

    #[test]
    fn a_peer_is_selected_by_its_own_name_which_no_label_can_copy() {
        let by_name = matching(&[(PEER_NAME_LABEL, "alice")]);
        // mallory copies alice's name label onto her own peer; alice has none.
        let peers = vec![
            peer("team-a", "alice", &[], vec![]),
            peer("team-a", "mallory", &[(PEER_NAME_LABEL, "alice")], vec![]),
            peer("team-a", "bob", &[("role", "dev")], vec![]),
        ];
        let policies = vec![
            policy("team-a", "for-alice", by_name, vec![allow(None, Some("db"))]),
            policy(
                "team-a",
                "devs",
                matching(&[("role", "dev")]),
                vec![allow(None, Some("web"))],
            ),
        ];
        let (v, e) = run(&peers, &policies);
        assert_eq!(
            reach(&v, &e, "team-a", "alice"),
            vec![r("team-a", Some("db"), "policy team-a/for-alice")]
        );
        assert!(reach(&v, &e, "team-a", "mallory").is_empty());
        assert_eq!(
            reach(&v, &e, "team-a", "bob"),
            vec![r("team-a", Some("web"), "policy team-a/devs")]
        );
        assert_eq!(report(&e, "team-a", "for-alice").matched_peers, 1);
    }

    #[test]
    fn a_namespace_selector_matches_the_namespaces_labels() {
        let peers = vec![
            peer("team-a", "alice", &[], vec![]),
            peer("team-b", "bob", &[], vec![]),
            peer("team-c", "carol", &[], vec![]),
        ];
        let mut p = policy(GW, "prod-ops", LabelSelector::default(), vec![allow(Some("db"), None)]);
        p.spec.namespace_selector = Some(matching(&[("env", "prod")]));
        let namespaces: HashMap<String, Labels> = [
            ("team-a".to_string(), labels(&[("env", "prod")])),
            ("team-b".to_string(), labels(&[("env", "dev")])),
        ]
        .into_iter()
        .collect();
        let v = validate(&peers, &Validation::default(), &tunnel(), now());
        let e = effective(&peers, &v, std::slice::from_ref(&p), &namespaces, GW, now());
        assert_eq!(
            reach(&v, &e, "team-a", "alice"),
            vec![r("db", None, &format!("policy {GW}/prod-ops"))]
        );
        assert!(reach(&v, &e, "team-b", "bob").is_empty());
        assert!(reach(&v, &e, "team-c", "carol").is_empty(), "unknown labels: no match");
        assert_eq!(report(&e, GW, "prod-ops").matched_peers, 1);
    }

    #[test]
    fn policies_report_their_outcome_and_matched_peers() {
        let peers = vec![
            peer("team-a", "a1", &[("role", "dba")], vec![]),
            peer("team-a", "a2", &[("role", "dba")], vec![]),
            peer("team-a", "a3", &[("role", "dev")], vec![]),
            peer("team-b", "b1", &[("role", "dba")], vec![]),
        ];
        let mut expired = policy("team-a", "old", LabelSelector::default(), vec![]);
        expired.spec.expires_at = Some(Time("2025-01-01T00:00:00Z".parse().unwrap()));
        let mut ignored = policy("team-a", "wide", matching(&[("role", "dba")]), vec![]);
        ignored.spec.namespace_selector = Some(LabelSelector::default());
        let policies = vec![
            policy(
                "team-a",
                "dba",
                matching(&[("role", "dba")]),
                vec![allow(None, Some("pg"))],
            ),
            policy(
                "team-a",
                "cross",
                LabelSelector::default(),
                vec![allow(Some("team-b"), None)],
            ),
            expired,
            ignored,
        ];
        let (_, e) = run(&peers, &policies);
        let dba = report(&e, "team-a", "dba");
        assert_eq!((dba.outcome.clone(), dba.matched_peers), (Ok(()), 2));
        let cross = report(&e, "team-a", "cross");
        assert_eq!(cross.matched_peers, 0);
        let refused = cross.outcome.clone().unwrap_err();
        assert_eq!(refused.reason(), "NamespaceNotAllowed");
        assert!(refused.to_string().contains("\"team-b\""), "{refused}");
        let old = report(&e, "team-a", "old");
        assert_eq!(old.outcome.as_ref().unwrap_err().reason(), "Expired");
        let wide = report(&e, "team-a", "wide");
        assert_eq!(wide.matched_peers, 2, "team-b's dba is not selected");
        assert!(wide.note.as_deref().unwrap().contains("namespaceSelector ignored"));
        let ids: Vec<String> = e.policies.iter().map(|p| p.id.to_string()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
    }

    #[test]
    fn expiry_is_by_the_given_time_and_the_next_one_is_reported() {
        let peers = vec![peer("team-a", "alice", &[("jit", "yes")], vec![])];
        let mut soon = policy(
            "team-a",
            "soon",
            matching(&[("jit", "yes")]),
            vec![allow(None, Some("pg"))],
        );
        soon.spec.expires_at = Some(Time("2026-01-01T00:00:05Z".parse().unwrap()));
        let mut later = policy(
            "team-a",
            "later",
            matching(&[("jit", "yes")]),
            vec![allow(None, Some("web"))],
        );
        later.spec.expires_at = Some(Time("2026-01-01T01:00:00Z".parse().unwrap()));
        let policies = vec![soon, later];
        let (v, e) = run(&peers, &policies);
        assert_eq!(e.next_expiry, Some("2026-01-01T00:00:05Z".parse().unwrap()));
        assert_eq!(reach(&v, &e, "team-a", "alice").len(), 2);
        let after: Timestamp = "2026-01-01T00:00:05Z".parse().unwrap();
        let (v, e) = run_at(&peers, &policies, after);
        assert_eq!(
            reach(&v, &e, "team-a", "alice"),
            vec![r("team-a", Some("web"), "policy team-a/later")],
            "expired at exactly expiresAt"
        );
        assert_eq!(e.next_expiry, Some("2026-01-01T01:00:00Z".parse().unwrap()));
    }

    #[test]
    fn rejected_peers_are_not_counted_or_granted() {
        let mut off = peer("team-a", "off", &[("role", "dba")], vec![]);
        off.spec.disabled = true;
        let on = peer("team-a", "on", &[("role", "dba")], vec![]);
        let (v, e) = run(
            &[off, on],
            &[policy("team-a", "p", matching(&[("role", "dba")]), vec![])],
        );
        assert_eq!(v.accepted.len(), 1);
        assert_eq!(e.rules.len(), 1);
        assert_eq!(report(&e, "team-a", "p").matched_peers, 1);
    }

    #[test]
    fn peers_with_equal_effective_rules_share_one_list() {
        let peers: Vec<PeerInput> = (0..6)
            .map(|i| {
                let role = if i % 2 == 0 { "dba" } else { "dev" };
                peer(
                    "team-a",
                    &format!("p{i}"),
                    &[("role", role)],
                    vec![allow(None, Some("web"))],
                )
            })
            .collect();
        let (_, e) = run(
            &peers,
            &[policy(
                "team-a",
                "db",
                matching(&[("role", "dba")]),
                vec![allow(None, Some("pg"))],
            )],
        );
        assert!(Arc::ptr_eq(&e.rules[0], &e.rules[2]) && Arc::ptr_eq(&e.rules[2], &e.rules[4]));
        assert!(Arc::ptr_eq(&e.rules[1], &e.rules[3]));
        assert!(!Arc::ptr_eq(&e.rules[0], &e.rules[1]));
        // The ACL compiles each distinct list once.
        let v = validate(&peers, &Validation::default(), &tunnel(), now());
        let acl = Acl::compile_effective(
            tunnel().gateway_address(),
            v.accepted.iter().map(|p| p.address).zip(e.rules.iter().map(|r| &r[..])),
            &catalog(),
        );
        assert_eq!(acl.distinct_rule_sets(), 2);
    }

    fn catalog() -> Catalog {
        Catalog::new(services())
    }

    pub(crate) fn services() -> Vec<Service> {
        let svc = |ns: &str, name: &str, ip: &str, ports: &[(u16, &str)]| Service {
            namespace: ns.into(),
            name: name.into(),
            cluster_ip: Some(ip.parse().unwrap()),
            cluster_ips: vec![],
            ports: ports
                .iter()
                .map(|(p, n)| ServicePort {
                    name: Some(n.to_string()),
                    port: *p,
                    protocol: Protocol::Tcp,
                })
                .collect(),
        };
        vec![
            svc("team-a", "web", "127.96.0.10", &[(80, "http")]),
            svc("team-a", "pg", "127.96.0.11", &[(5432, "pg"), (9187, "metrics")]),
            svc("team-b", "pg", "127.96.0.12", &[(5432, "pg")]),
        ]
    }
}

//! Actual (the platform's LB, found by our labels) against desired: which calls to make.
//! Pure; "no mutating call when nothing changed" is proven here.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::platform::labels::LABEL_RETAIN_PUBLIC_IP;
use crate::platform::{
    BackendRef, HealthCheck, HealthCheckProtocol, IpVersion, LABEL_CLUSTER_ID, LABEL_SERVICE_NAME,
    LABEL_SERVICE_NAMESPACE, LABEL_SERVICE_UID, LbStatus, LoadBalancer, LoadBalancerSpec, LoadBalancerUpdate, Rule,
};
use crate::service::desired::{DesiredLb, PublicIpRequest, merge_labels};

/// Finding the one LB of a Service went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// More than one LB of our cluster carries the Service's UID.
    #[error("{} load balancers carry service UID {uid} ({}); expected at most one", ids.len(), ids.join(", "))]
    NonUniqueResult { uid: String, ids: Vec<String> },
    /// The LB name is used by an LB of another Service.
    #[error("load balancer name {name:?} is taken by {id} of Service {owner}; set another with lb.cloudraya.com/name")]
    NameTaken { name: String, id: String, owner: String },
}

fn is_ours(cluster_id: &str, lb: &LoadBalancer) -> bool {
    lb.labels.get(LABEL_CLUSTER_ID).map(String::as_str) == Some(cluster_id)
}

/// The LB of the Service with this UID among `lbs` (a list by labels; filtered again
/// here so that an object without our cluster ID is never picked).
pub fn pick_by_uid<'a>(
    cluster_id: &str,
    uid: &str,
    lbs: &'a [LoadBalancer],
) -> Result<Option<&'a LoadBalancer>, LookupError> {
    let found: Vec<&LoadBalancer> = lbs
        .iter()
        .filter(|lb| is_ours(cluster_id, lb) && lb.labels.get(LABEL_SERVICE_UID).map(String::as_str) == Some(uid))
        .collect();
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        many => Err(LookupError::NonUniqueResult {
            uid: uid.to_owned(),
            ids: many.iter().map(|lb| lb.id.clone()).collect(),
        }),
    }
}

/// Our LBs by the Service UID they carry: the UID with exactly one LB, and the UIDs
/// carried by several (which only a lookup by label may decide, as a
/// [`LookupError::NonUniqueResult`]). LBs being deleted are left out: they are going
/// away, and an entry for one would outlive its Service.
pub fn index_by_uid(cluster_id: &str, lbs: &[LoadBalancer]) -> (HashMap<String, String>, HashSet<String>) {
    let mut by_uid: HashMap<String, String> = HashMap::new();
    let mut ambiguous = HashSet::new();
    let staying = lbs.iter().filter(|lb| lb.status != LbStatus::Deleting);
    for lb in staying.filter(|lb| is_ours(cluster_id, lb)) {
        let Some(uid) = lb.labels.get(LABEL_SERVICE_UID) else {
            continue;
        };
        if ambiguous.contains(uid) {
            continue;
        }
        if by_uid.insert(uid.clone(), lb.id.clone()).is_some() {
            by_uid.remove(uid);
            ambiguous.insert(uid.clone());
        }
    }
    (by_uid, ambiguous)
}

/// The fallback: an LB of our cluster with the desired name. It is adopted when it
/// belongs to no Service or to a Service of the same namespace/name (one deleted and
/// recreated while we were down); an LB of another Service is a [`LookupError::NameTaken`].
pub fn pick_by_name<'a>(
    cluster_id: &str,
    namespace: &str,
    name: &str,
    lb_name: &str,
    lbs: &'a [LoadBalancer],
) -> Result<Option<&'a LoadBalancer>, LookupError> {
    let Some(lb) = lbs.iter().find(|lb| is_ours(cluster_id, lb) && lb.name == lb_name) else {
        return Ok(None);
    };
    let owner_ns = lb.labels.get(LABEL_SERVICE_NAMESPACE);
    let owner_name = lb.labels.get(LABEL_SERVICE_NAME);
    match (owner_ns, owner_name) {
        (None, None) => Ok(Some(lb)),
        (Some(ns), Some(n)) if ns == namespace && n == name => Ok(Some(lb)),
        _ => Err(LookupError::NameTaken {
            name: lb_name.to_owned(),
            id: lb.id.clone(),
            owner: format!(
                "{}/{}",
                owner_ns.map(String::as_str).unwrap_or("?"),
                owner_name.map(String::as_str).unwrap_or("?")
            ),
        }),
    }
}

/// A change the platform cannot make to an existing LB; reported, LB left as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanRefusal {
    #[error(
        "the load balancer is named {actual:?}; it cannot be renamed to {desired:?} (delete and recreate the Service, or revert lb.cloudraya.com/name)"
    )]
    NameChange { actual: String, desired: String },
    #[error(
        "the load balancer has public IP {actual}; it cannot change to {desired} (delete and recreate the Service, or revert the public IP setting)"
    )]
    PublicIpChange { actual: String, desired: String },
    #[error(
        "the load balancer has no {family} public IP; a family added to a live load balancer gets a new IP, it cannot take {desired} (delete and recreate the Service, or drop spec.loadBalancerIP)"
    )]
    PublicIpFamilyAdded { family: &'static str, desired: String },
}

/// What to do for a Service that wants a load balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyPlan {
    /// No LB yet: create it.
    Create(LoadBalancerSpec),
    /// The LB differs (or is in `error`): `PUT` this.
    Update {
        id: String,
        update: LoadBalancerUpdate,
        /// What differs, for the Event (`ip_versions`, `rules`, `backends`,
        /// `backend_ips`, `labels`, `retry`).
        changes: Vec<&'static str>,
    },
    /// The LB is provisioning, updating or deleting: poll, change nothing.
    Wait { id: String, status: LbStatus },
    /// Nothing to do.
    InSync,
}

impl ApplyPlan {
    /// Whether carrying the plan out calls a mutating platform endpoint.
    pub fn is_mutating(&self) -> bool {
        matches!(self, ApplyPlan::Create(_) | ApplyPlan::Update { .. })
    }
}

/// A rule as compared: defaults filled in, sources sorted.
fn normalize_rule(r: &Rule) -> Rule {
    let hc = r.health_check.clone().unwrap_or(HealthCheck {
        protocol: HealthCheckProtocol::Tcp,
        port: None,
        path: None,
        interval_s: None,
        timeout_s: None,
        healthy_threshold: None,
        unhealthy_threshold: None,
    });
    let mut allowed_sources = r.allowed_sources.clone();
    allowed_sources.sort();
    allowed_sources.dedup();
    Rule {
        allowed_sources,
        health_check: Some(hc.with_defaults(r.private_port)),
        ..r.clone()
    }
}

fn normalize_rules(rules: &[Rule]) -> Vec<Rule> {
    let mut v: Vec<Rule> = rules.iter().map(normalize_rule).collect();
    v.sort_by(|a, b| (a.protocol.as_str(), a.public_port).cmp(&(b.protocol.as_str(), b.public_port)));
    v
}

fn backend_set<'a>(ids: impl IntoIterator<Item = &'a str>) -> BTreeSet<&'a str> {
    ids.into_iter().collect()
}

/// Whether a backend's `private_ip` (filled by the platform at the last create/PUT) is
/// not its node's `InternalIP` any more: the VM's address changed and only a PUT makes
/// the platform read it again. Backends whose address either side does not know count
/// as current. On an LB serving IPv6 the same holds for `private_ipv6` against the
/// node's IPv6 `InternalIP`, and a backend without `private_ipv6` whose node has one
/// (its VM got an IPv6 address since) is stale too: it would get no IPv6 traffic.
fn stale_backend_ips(lb: &LoadBalancer, desired: &DesiredLb) -> bool {
    let serves_v6 = desired.ip_versions.contains(&IpVersion::V6);
    lb.backends.iter().any(|b| {
        let v4_stale = matches!(
            (b.private_ip, desired.backend_ips.get(&b.vm_id)),
            (Some(actual), Some(want)) if actual != *want
        );
        let v6_stale = serves_v6
            && desired
                .backend_ipv6s
                .get(&b.vm_id)
                .is_some_and(|want| b.private_ipv6 != Some(*want));
        v4_stale || v6_stale
    })
}

/// `ip_versions` as written: `None` (the platform's default, `[4]`) for an IPv4 LB, so
/// that what an IPv4 Service sends is what it sent before dual-stack.
fn written_ip_versions(v: &[IpVersion]) -> Option<Vec<IpVersion>> {
    (v != [IpVersion::V4]).then(|| v.to_vec())
}

/// Whether the LB's public IP of `a`'s family is not `a` (`None`: it has none yet).
fn address_mismatch(lb: &LoadBalancer, a: &std::net::IpAddr) -> bool {
    let have = match IpVersion::of(a) {
        IpVersion::V4 => &lb.public_ip,
        IpVersion::V6 => &lb.public_ipv6,
    };
    have.as_ref().is_some_and(|ip| &ip.address != a)
}

/// Compares the LB found with the desired one. `resolved_ip_id` is the ID of the public
/// IP a `PublicIpRequest::Address` names (looked up by the caller; only needed to create).
pub fn plan_apply(
    actual: Option<&LoadBalancer>,
    desired: &DesiredLb,
    resolved_ip_id: Option<&str>,
) -> Result<ApplyPlan, PlanRefusal> {
    let Some(lb) = actual else {
        // The annotation names the IPv4 IP; an address names an IP of its own family.
        let (public_ip_id, public_ipv6_id) = match &desired.public_ip {
            PublicIpRequest::Acquire => (None, None),
            PublicIpRequest::Id(id) => (Some(id.clone()), None),
            PublicIpRequest::Address(a) => {
                let id = resolved_ip_id.map(str::to_owned);
                match IpVersion::of(a) {
                    IpVersion::V4 => (id, None),
                    IpVersion::V6 => (None, id),
                }
            }
        };
        return Ok(ApplyPlan::Create(LoadBalancerSpec {
            name: desired.name.clone(),
            public_ip_id,
            public_ipv6_id,
            ip_versions: written_ip_versions(&desired.ip_versions),
            labels: desired.labels.clone(),
            rules: desired.rules.clone(),
            backends: desired.backends.clone(),
        }));
    };
    if matches!(
        lb.status,
        LbStatus::Provisioning | LbStatus::Updating | LbStatus::Deleting
    ) {
        return Ok(ApplyPlan::Wait {
            id: lb.id.clone(),
            status: lb.status.clone(),
        });
    }
    if lb.name != desired.name {
        return Err(PlanRefusal::NameChange {
            actual: lb.name.clone(),
            desired: desired.name.clone(),
        });
    }
    let mismatch = match &desired.public_ip {
        PublicIpRequest::Acquire => None,
        PublicIpRequest::Id(id) => lb
            .public_ip
            .as_ref()
            .filter(|ip| &ip.id != id)
            .map(|ip| (ip, id.clone())),
        PublicIpRequest::Address(a) => address_mismatch(lb, a)
            .then(|| {
                lb.public_ips()
                    .find(|ip| IpVersion::of(&ip.address) == IpVersion::of(a))
            })
            .flatten()
            .map(|ip| (ip, a.to_string())),
    };
    if let PublicIpRequest::Address(a) = &desired.public_ip
        && !lb.ip_versions.contains(&IpVersion::of(a))
    {
        return Err(PlanRefusal::PublicIpFamilyAdded {
            family: crate::service::families::family_name(IpVersion::of(a)),
            desired: a.to_string(),
        });
    }
    if let Some((ip, desired)) = mismatch {
        return Err(PlanRefusal::PublicIpChange {
            actual: format!("{} ({})", ip.address, ip.id),
            desired,
        });
    }

    let mut changes = Vec::new();
    // Families are changed in place (the platform acquires or releases the IP of a family
    // added or removed); never a new LB.
    let mut actual_versions = lb.ip_versions.clone();
    actual_versions.sort();
    actual_versions.dedup();
    let ip_versions_changed = actual_versions != desired.ip_versions;
    if ip_versions_changed {
        changes.push("ip_versions");
    }
    if normalize_rules(&lb.rules) != normalize_rules(&desired.rules) {
        changes.push("rules");
    }
    let actual_backends = backend_set(lb.backends.iter().map(|b| b.vm_id.as_str()));
    let desired_backends = backend_set(desired.backends.iter().map(|b| b.vm_id.as_str()));
    if actual_backends != desired_backends {
        changes.push("backends");
    } else if stale_backend_ips(lb, desired) {
        changes.push("backend_ips");
    }
    let labels = merge_labels(&lb.labels, &desired.labels);
    if labels != lb.labels {
        changes.push("labels");
    }
    if lb.status == LbStatus::Error {
        changes.push("retry");
    }
    if changes.is_empty() {
        return Ok(ApplyPlan::InSync);
    }
    Ok(ApplyPlan::Update {
        id: lb.id.clone(),
        update: LoadBalancerUpdate {
            rules: desired.rules.clone(),
            backends: desired
                .backends
                .iter()
                .map(|b| BackendRef::new(b.vm_id.clone()))
                .collect(),
            labels,
            ip_versions: ip_versions_changed.then(|| desired.ip_versions.clone()),
        },
        changes,
    })
}

/// What to do to remove a Service's load balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeletePlan {
    /// Nothing left on the platform.
    Gone,
    /// Start the delete.
    Delete { id: String, keep_public_ip: Option<bool> },
    /// Being deleted already: poll until it is gone.
    Wait { id: String },
}

/// `keep_public_ip` for a Service's own cleanup: keep a retained or reused IP, release
/// an acquired one explicitly.
pub fn keep_public_ip(retain: bool, reused: bool) -> Option<bool> {
    Some(retain || reused)
}

/// Plans the removal of `actual`.
pub fn plan_delete(actual: Option<&LoadBalancer>, keep_public_ip: Option<bool>) -> DeletePlan {
    match actual {
        None => DeletePlan::Gone,
        Some(lb) if lb.status == LbStatus::Deleting => DeletePlan::Wait { id: lb.id.clone() },
        Some(lb) => DeletePlan::Delete {
            id: lb.id.clone(),
            keep_public_ip,
        },
    }
}

/// What the orphan sweep knows of a live Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveService {
    pub wants_lb: bool,
    pub has_finalizer: bool,
}

/// An LB to delete because its Service is gone, with the `keep_public_ip` to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub id: String,
    pub name: String,
    pub service: String,
    pub keep_public_ip: Option<bool>,
}

/// Our LBs whose Service no longer exists (by UID), or exists but neither wants an LB
/// nor carries our finalizer (so no reconcile will ever remove it). LBs without our
/// cluster ID or without a Service UID label are never orphans: we cannot know them.
/// LBs already deleting are skipped, and so are LBs that a live Service wanting an LB
/// will adopt (`adoptable`: its `namespace/name` and desired LB name, matching the LB's
/// labels and name): a Service deleted and recreated while we were down keeps its LB
/// instead of getting a second one.
pub fn find_orphans(
    cluster_id: &str,
    lbs: &[LoadBalancer],
    services: &HashMap<String, LiveService>,
    adoptable: &HashSet<(String, String)>,
) -> Vec<Orphan> {
    lbs.iter()
        .filter(|lb| is_ours(cluster_id, lb) && lb.status != LbStatus::Deleting)
        .filter_map(|lb| {
            let uid = lb.labels.get(LABEL_SERVICE_UID)?;
            let owner = format!(
                "{}/{}",
                lb.labels
                    .get(LABEL_SERVICE_NAMESPACE)
                    .map(String::as_str)
                    .unwrap_or("?"),
                lb.labels.get(LABEL_SERVICE_NAME).map(String::as_str).unwrap_or("?")
            );
            let orphan = match services.get(uid) {
                None => !adoptable.contains(&(owner.clone(), lb.name.clone())),
                Some(s) => !s.wants_lb && !s.has_finalizer,
            };
            orphan.then(|| Orphan {
                id: lb.id.clone(),
                name: lb.name.clone(),
                service: format!(
                    "{}/{}",
                    lb.labels
                        .get(LABEL_SERVICE_NAMESPACE)
                        .map(String::as_str)
                        .unwrap_or("?"),
                    lb.labels.get(LABEL_SERVICE_NAME).map(String::as_str).unwrap_or("?")
                ),
                keep_public_ip: (lb.labels.get(LABEL_RETAIN_PUBLIC_IP).map(String::as_str) == Some("true"))
                    .then_some(true),
            })
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::platform::{Backend, Labels, LbPublicIp};
    use crate::service::desired::tests::{annotate, cfg, svc};
    use crate::service::desired::{desired_load_balancer, lb_labels};
    use crate::service::nodes::tests::node;

    fn desired() -> DesiredLb {
        desired_load_balancer(&svc(), &[node("a"), node("b")], &cfg()).expect("desired")
    }

    /// The LB the platform would echo back after creating `d` (defaults applied, some
    /// fields in another order), active.
    fn echoed(d: &DesiredLb) -> LoadBalancer {
        let mut rules = d.rules.clone();
        rules.reverse();
        LoadBalancer {
            id: "lb-1".into(),
            name: d.name.clone(),
            region: "jkt".into(),
            vpc_id: "vpc-1".into(),
            subnet_id: "subnet-1".into(),
            ip_versions: d.ip_versions.clone(),
            public_ip: Some(LbPublicIp {
                id: "ip-1".into(),
                address: "127.203.0.10".parse().expect("ip"),
            }),
            public_ipv6: None,
            labels: d.labels.clone(),
            status: LbStatus::Active,
            status_message: String::new(),
            rules,
            backends: d
                .backends
                .iter()
                .rev()
                .map(|b| Backend {
                    vm_id: b.vm_id.clone(),
                    private_ip: Some("127.10.0.11".parse().expect("ip")),
                    private_ipv6: None,
                })
                .collect(),
            health: vec![],
            created_at: None,
            updated_at: None,
        }
    }

    #[test]
    fn nothing_changed_means_no_mutating_call() {
        let d = desired();
        let lb = echoed(&d);
        let plan = plan_apply(Some(&lb), &d, None).expect("plan");
        assert_eq!(plan, ApplyPlan::InSync);
        assert!(!plan.is_mutating());
    }

    #[test]
    fn platform_defaults_do_not_count_as_changes() {
        let d = desired();
        let mut lb = echoed(&d);
        // The platform may omit defaulted fields; with_defaults makes them compare equal.
        for r in &mut lb.rules {
            let hc = r.health_check.as_mut().expect("hc");
            hc.path = Some("/healthz".into());
        }
        assert_eq!(plan_apply(Some(&lb), &d, None), Ok(ApplyPlan::InSync));
        // A rule without a health check equals an explicit TCP check on its port.
        let mut tcp = d.clone();
        for r in &mut tcp.rules {
            r.health_check = Some(HealthCheck::tcp(r.private_port));
        }
        let mut lb = echoed(&tcp);
        for r in &mut lb.rules {
            r.health_check = None;
        }
        assert_eq!(plan_apply(Some(&lb), &tcp, None), Ok(ApplyPlan::InSync));
    }

    #[test]
    fn foreign_labels_are_kept_and_not_a_change() {
        let d = desired();
        let mut lb = echoed(&d);
        lb.labels.insert("team".into(), "a".into());
        assert_eq!(plan_apply(Some(&lb), &d, None), Ok(ApplyPlan::InSync));
        let retained = desired_load_balancer(
            &annotate(svc(), crate::annotations::RETAIN_PUBLIC_IP, "true"),
            &[node("a"), node("b")],
            &cfg(),
        )
        .expect("d");
        match plan_apply(Some(&lb), &retained, None).expect("plan") {
            ApplyPlan::Update { update, changes, .. } => {
                assert_eq!(changes, vec!["labels"]);
                assert_eq!(update.labels["team"], "a");
                assert_eq!(update.labels[LABEL_RETAIN_PUBLIC_IP], "true");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A VM's private IP changed: its node's `InternalIP` follows (node controller), and
    /// only an LB whose backend still carries the old address gets a PUT.
    #[test]
    fn a_changed_node_ip_updates_only_the_lbs_that_target_the_node() {
        use crate::service::nodes::tests::{with_internal_ip, with_label};
        let a = with_internal_ip(node("a"), "127.10.0.11");
        let b = with_internal_ip(node("b"), "127.10.0.11");
        let d = desired_load_balancer(&svc(), &[a.clone(), b.clone()], &cfg()).expect("d");
        let lb = echoed(&d);
        assert_eq!(
            plan_apply(Some(&lb), &d, None),
            Ok(ApplyPlan::InSync),
            "addresses agree"
        );

        let moved = with_internal_ip(node("b"), "127.10.0.50");
        let d2 = desired_load_balancer(&svc(), &[a.clone(), moved.clone()], &cfg()).expect("d2");
        match plan_apply(Some(&lb), &d2, None).expect("plan") {
            ApplyPlan::Update { update, changes, .. } => {
                assert_eq!(changes, vec!["backend_ips"]);
                assert_eq!(update.backends, d2.backends, "the same backends, re-sent");
            }
            other => panic!("unexpected {other:?}"),
        }

        // An LB of a Service whose node selector leaves node b out is not touched.
        let edge_svc = annotate(svc(), crate::annotations::NODE_SELECTOR, "pool=edge");
        let a_edge = with_label(a.clone(), "pool", "edge");
        let edge = desired_load_balancer(&edge_svc, &[a_edge.clone(), b.clone()], &cfg()).expect("edge");
        let edge_lb = echoed(&edge);
        let edge_after = desired_load_balancer(&edge_svc, &[a_edge, moved], &cfg()).expect("edge after");
        assert_eq!(plan_apply(Some(&edge_lb), &edge_after, None), Ok(ApplyPlan::InSync));

        // Addresses unknown on either side: nothing to compare, nothing to do.
        let unknown = desired_load_balancer(&svc(), &[node("a"), node("b")], &cfg()).expect("unknown");
        assert_eq!(plan_apply(Some(&lb), &unknown, None), Ok(ApplyPlan::InSync));
        let mut no_ip = lb.clone();
        no_ip.backends.iter_mut().for_each(|b| b.private_ip = None);
        assert_eq!(plan_apply(Some(&no_ip), &d2, None), Ok(ApplyPlan::InSync));
    }

    fn dual_desired(policy: &str) -> DesiredLb {
        use crate::service::desired::tests::dual_cfg;
        let mut s = svc();
        if let Some(spec) = s.spec.as_mut() {
            spec.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
            spec.ip_family_policy = Some(policy.into());
        }
        desired_load_balancer(&s, &[node("a"), node("b")], &dual_cfg()).expect("desired")
    }

    /// [`echoed`] for an LB serving IPv4 and IPv6.
    fn echoed_dual(d: &DesiredLb) -> LoadBalancer {
        let mut lb = echoed(d);
        lb.ip_versions = vec![IpVersion::V6, IpVersion::V4];
        lb.public_ipv6 = Some(LbPublicIp {
            id: "ip-2".into(),
            address: "fd00:203::10".parse().expect("ip"),
        });
        lb
    }

    /// The families an LB serves are changed in place, both ways; an IPv4 LB's create and
    /// updates carry no `ip_versions` (the platform's default), as before dual-stack.
    #[test]
    fn family_changes_update_in_place_never_recreate() {
        let v4 = desired();
        match plan_apply(None, &v4, None).expect("plan") {
            ApplyPlan::Create(spec) => {
                assert_eq!((spec.ip_versions, spec.public_ipv6_id), (None, None));
            }
            other => panic!("unexpected {other:?}"),
        }
        let dual = dual_desired("PreferDualStack");
        match plan_apply(None, &dual, None).expect("plan") {
            ApplyPlan::Create(spec) => {
                assert_eq!(spec.ip_versions, Some(vec![IpVersion::V4, IpVersion::V6]));
            }
            other => panic!("unexpected {other:?}"),
        }

        // SingleStack -> PreferDualStack: a PUT adding IPv6, the rest re-sent as it is.
        let lb = echoed(&v4);
        match plan_apply(Some(&lb), &dual, None).expect("plan") {
            ApplyPlan::Update { id, update, changes } => {
                assert_eq!(id, "lb-1");
                assert_eq!(changes, vec!["ip_versions"]);
                assert_eq!(update.ip_versions, Some(vec![IpVersion::V4, IpVersion::V6]));
                assert_eq!(update.rules, dual.rules);
                assert_eq!(update.backends, dual.backends);
            }
            other => panic!("unexpected {other:?}"),
        }
        // In sync once the platform serves both (in whatever order it lists them).
        let both = echoed_dual(&dual);
        assert_eq!(plan_apply(Some(&both), &dual, None), Ok(ApplyPlan::InSync));
        // And back: a PUT removing IPv6.
        match plan_apply(Some(&both), &v4, None).expect("plan") {
            ApplyPlan::Update { update, changes, .. } => {
                assert_eq!(changes, vec!["ip_versions"]);
                assert_eq!(update.ip_versions, Some(vec![IpVersion::V4]));
            }
            other => panic!("unexpected {other:?}"),
        }
        // Another change of an IPv4 LB leaves ip_versions out of the PUT.
        let mut fewer = lb.clone();
        fewer.backends.pop();
        match plan_apply(Some(&fewer), &v4, None).expect("plan") {
            ApplyPlan::Update { update, changes, .. } => {
                assert_eq!(changes, vec!["backends"]);
                assert_eq!(update.ip_versions, None);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A dual-stack LB's backend whose VM's IPv6 address moved, or that the platform
    /// filled without one its node now has, is re-sent; an IPv4 LB ignores IPv6.
    #[test]
    fn a_changed_ipv6_node_address_updates_a_dual_stack_lb() {
        use crate::service::desired::tests::dual_cfg;
        use crate::service::nodes::tests::with_internal_ips;
        let mut s = svc();
        if let Some(spec) = s.spec.as_mut() {
            spec.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
            spec.ip_family_policy = Some("RequireDualStack".into());
        }
        let nodes = |b6: &str| {
            vec![
                with_internal_ips(node("a"), &["127.10.0.11", "fd00:10::11"]),
                with_internal_ips(node("b"), &["127.10.0.11", b6]),
            ]
        };
        let d = desired_load_balancer(&s, &nodes("fd00:10::12"), &dual_cfg()).expect("d");
        let mut lb = echoed_dual(&d);
        for b in &mut lb.backends {
            b.private_ipv6 = Some(
                if b.vm_id == "vm-a" {
                    "fd00:10::11"
                } else {
                    "fd00:10::12"
                }
                .parse()
                .expect("ip"),
            );
        }
        assert_eq!(plan_apply(Some(&lb), &d, None), Ok(ApplyPlan::InSync));
        let moved = desired_load_balancer(&s, &nodes("fd00:10::50"), &dual_cfg()).expect("d");
        assert!(matches!(
            plan_apply(Some(&lb), &moved, None),
            Ok(ApplyPlan::Update { changes, .. }) if changes == vec!["backend_ips"]
        ));
        let mut unfilled = lb.clone();
        unfilled.backends.iter_mut().for_each(|b| b.private_ipv6 = None);
        assert!(matches!(
            plan_apply(Some(&unfilled), &d, None),
            Ok(ApplyPlan::Update { changes, .. }) if changes == vec!["backend_ips"]
        ));
        // An IPv4 LB of the same nodes: IPv6 addresses are none of its business.
        let v4 = desired_load_balancer(&svc(), &nodes("fd00:10::50"), &dual_cfg()).expect("d");
        assert_eq!(plan_apply(Some(&echoed(&v4)), &v4, None), Ok(ApplyPlan::InSync));
    }

    #[test]
    fn a_reused_ipv6_address_is_created_with_and_held_to() {
        let mut d = dual_desired("RequireDualStack");
        d.public_ip = PublicIpRequest::Address("fd00:203::9".parse().expect("ip"));
        match plan_apply(None, &d, Some("ip-9")).expect("plan") {
            ApplyPlan::Create(spec) => {
                assert_eq!(spec.public_ip_id, None);
                assert_eq!(spec.public_ipv6_id.as_deref(), Some("ip-9"));
            }
            other => panic!("unexpected {other:?}"),
        }
        let lb = echoed_dual(&d);
        assert!(matches!(
            plan_apply(Some(&lb), &d, None),
            Err(PlanRefusal::PublicIpChange { actual, .. }) if actual.contains("fd00:203::10")
        ));
        d.public_ip = PublicIpRequest::Address("fd00:203::10".parse().expect("ip"));
        assert_eq!(plan_apply(Some(&lb), &d, None), Ok(ApplyPlan::InSync));
        // An LB that does not serve IPv6 yet would get a new IPv6 address from a PUT, not
        // this one: refused, the LB left as it is.
        let mut v4_lb = echoed(&d);
        v4_lb.ip_versions = vec![IpVersion::V4];
        let e = plan_apply(Some(&v4_lb), &d, None).expect_err("refused");
        assert!(
            matches!(&e, PlanRefusal::PublicIpFamilyAdded { family: "IPv6", .. }),
            "{e}"
        );
        // Without the address, the same change is a PUT adding IPv6.
        d.public_ip = PublicIpRequest::Acquire;
        assert!(matches!(
            plan_apply(Some(&v4_lb), &d, None),
            Ok(ApplyPlan::Update { changes, .. }) if changes == vec!["ip_versions"]
        ));
    }

    #[test]
    fn backend_and_rule_changes_update_in_place() {
        let d = desired();
        let mut lb = echoed(&d);
        lb.backends.pop();
        match plan_apply(Some(&lb), &d, None).expect("plan") {
            ApplyPlan::Update { id, update, changes } => {
                assert_eq!(id, "lb-1");
                assert_eq!(changes, vec!["backends"]);
                assert_eq!(update.backends, d.backends);
                assert_eq!(update.rules, d.rules);
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut lb = echoed(&d);
        lb.rules[0].algorithm = crate::platform::Algorithm::Source;
        assert!(matches!(
            plan_apply(Some(&lb), &d, None),
            Ok(ApplyPlan::Update { changes, .. }) if changes == vec!["rules"]
        ));
        let mut lb = echoed(&d);
        lb.rules[0].health_check = Some(HealthCheck::http(10256, "/other"));
        assert!(matches!(plan_apply(Some(&lb), &d, None), Ok(ApplyPlan::Update { .. })));
    }

    #[test]
    fn missing_lb_is_created_with_our_labels() {
        let d = desired();
        match plan_apply(None, &d, None).expect("plan") {
            ApplyPlan::Create(spec) => {
                assert_eq!(spec.name, d.name);
                assert_eq!(spec.public_ip_id, None);
                assert_eq!(spec.labels, d.labels);
                assert_eq!(spec.rules, d.rules);
                assert_eq!(spec.backends, d.backends);
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut reuse = d.clone();
        reuse.public_ip = PublicIpRequest::Address("127.203.0.9".parse().expect("ip"));
        assert!(matches!(
            plan_apply(None, &reuse, Some("ip-9")),
            Ok(ApplyPlan::Create(spec)) if spec.public_ip_id.as_deref() == Some("ip-9")
        ));
        reuse.public_ip = PublicIpRequest::Id("ip-7".into());
        assert!(matches!(
            plan_apply(None, &reuse, None),
            Ok(ApplyPlan::Create(spec)) if spec.public_ip_id.as_deref() == Some("ip-7")
        ));
    }

    #[test]
    fn in_progress_lbs_are_polled_not_changed() {
        let d = desired();
        for status in [LbStatus::Provisioning, LbStatus::Updating, LbStatus::Deleting] {
            let mut lb = echoed(&d);
            lb.status = status.clone();
            lb.backends.clear();
            let plan = plan_apply(Some(&lb), &d, None).expect("plan");
            assert_eq!(
                plan,
                ApplyPlan::Wait {
                    id: "lb-1".into(),
                    status
                }
            );
            assert!(!plan.is_mutating());
        }
        let mut lb = echoed(&d);
        lb.status = LbStatus::Error;
        assert!(matches!(
            plan_apply(Some(&lb), &d, None),
            Ok(ApplyPlan::Update { changes, .. }) if changes == vec!["retry"]
        ));
    }

    #[test]
    fn renames_and_public_ip_changes_are_refused() {
        let d = desired();
        let mut lb = echoed(&d);
        lb.name = "old-name".into();
        assert!(matches!(
            plan_apply(Some(&lb), &d, None),
            Err(PlanRefusal::NameChange { .. })
        ));
        let lb = echoed(&d);
        let mut other_ip = d.clone();
        other_ip.public_ip = PublicIpRequest::Id("ip-2".into());
        assert!(matches!(
            plan_apply(Some(&lb), &other_ip, None),
            Err(PlanRefusal::PublicIpChange { .. })
        ));
        other_ip.public_ip = PublicIpRequest::Id("ip-1".into());
        assert_eq!(plan_apply(Some(&lb), &other_ip, None), Ok(ApplyPlan::InSync));
        other_ip.public_ip = PublicIpRequest::Address("127.203.0.10".parse().expect("ip"));
        assert_eq!(plan_apply(Some(&lb), &other_ip, None), Ok(ApplyPlan::InSync));
    }

    pub(crate) fn lb_with(id: &str, name: &str, labels: Labels) -> LoadBalancer {
        let mut lb = echoed(&desired());
        lb.id = id.into();
        lb.name = name.into();
        lb.labels = labels;
        lb
    }

    #[test]
    fn lookup_by_uid_never_crosses_clusters_and_refuses_duplicates() {
        let ours = lb_with("lb-1", "x", lb_labels("cl-1", "uid-1", "default", "web", false));
        let foreign = lb_with("lb-2", "x", lb_labels("cl-2", "uid-1", "default", "web", false));
        let lbs = vec![foreign.clone(), ours.clone()];
        assert_eq!(pick_by_uid("cl-1", "uid-1", &lbs), Ok(Some(&ours)));
        assert_eq!(pick_by_uid("cl-1", "uid-9", &lbs), Ok(None));
        assert_eq!(pick_by_uid("cl-3", "uid-1", &lbs), Ok(None));
        let dup = lb_with("lb-3", "y", lb_labels("cl-1", "uid-1", "default", "web", false));
        let e = pick_by_uid("cl-1", "uid-1", &[ours, dup]).expect_err("non-unique");
        assert!(matches!(&e, LookupError::NonUniqueResult { ids, .. } if ids.len() == 2));
    }

    #[test]
    fn the_index_by_uid_keeps_our_unique_lbs_and_flags_duplicates() {
        let lbs = vec![
            lb_with("lb-1", "a", lb_labels("cl-1", "uid-1", "default", "a", false)),
            lb_with("lb-2", "b", lb_labels("cl-2", "uid-2", "default", "b", false)),
            lb_with("lb-3", "c", lb_labels("cl-1", "uid-3", "default", "c", false)),
            lb_with("lb-4", "c2", lb_labels("cl-1", "uid-3", "default", "c", false)),
            lb_with("lb-5", "c3", lb_labels("cl-1", "uid-3", "default", "c", false)),
            lb_with(
                "lb-6",
                "d",
                Labels::from([(LABEL_CLUSTER_ID.to_owned(), "cl-1".to_owned())]),
            ),
            LoadBalancer {
                status: LbStatus::Deleting,
                ..lb_with("lb-7", "e", lb_labels("cl-1", "uid-7", "default", "e", false))
            },
            LoadBalancer {
                status: LbStatus::Deleting,
                ..lb_with("lb-8", "a2", lb_labels("cl-1", "uid-1", "default", "a", false))
            },
        ];
        let (unique, ambiguous) = index_by_uid("cl-1", &lbs);
        assert_eq!(unique, HashMap::from([("uid-1".to_owned(), "lb-1".to_owned())]));
        assert_eq!(ambiguous, HashSet::from(["uid-3".to_owned()]));
    }

    #[test]
    fn lookup_by_name_adopts_only_what_is_ours_to_adopt() {
        let recreated = lb_with(
            "lb-1",
            "kr-default-web",
            lb_labels("cl-1", "old-uid", "default", "web", false),
        );
        assert_eq!(
            pick_by_name(
                "cl-1",
                "default",
                "web",
                "kr-default-web",
                std::slice::from_ref(&recreated)
            ),
            Ok(Some(&recreated))
        );
        let unlabelled = lb_with(
            "lb-2",
            "kr-default-web",
            Labels::from([(LABEL_CLUSTER_ID.to_owned(), "cl-1".to_owned())]),
        );
        assert_eq!(
            pick_by_name(
                "cl-1",
                "default",
                "web",
                "kr-default-web",
                std::slice::from_ref(&unlabelled)
            ),
            Ok(Some(&unlabelled))
        );
        let other = lb_with(
            "lb-3",
            "kr-default-web",
            lb_labels("cl-1", "u", "default", "other", false),
        );
        assert!(matches!(
            pick_by_name("cl-1", "default", "web", "kr-default-web", &[other]),
            Err(LookupError::NameTaken { .. })
        ));
        let foreign = lb_with(
            "lb-4",
            "kr-default-web",
            lb_labels("cl-2", "u", "default", "web", false),
        );
        assert_eq!(
            pick_by_name("cl-1", "default", "web", "kr-default-web", &[foreign]),
            Ok(None)
        );
    }

    #[test]
    fn delete_plans() {
        let lb = echoed(&desired());
        assert_eq!(plan_delete(None, Some(false)), DeletePlan::Gone);
        assert_eq!(
            plan_delete(Some(&lb), keep_public_ip(false, false)),
            DeletePlan::Delete {
                id: "lb-1".into(),
                keep_public_ip: Some(false)
            }
        );
        assert_eq!(keep_public_ip(true, false), Some(true));
        assert_eq!(keep_public_ip(false, true), Some(true));
        let mut deleting = lb.clone();
        deleting.status = LbStatus::Deleting;
        assert_eq!(
            plan_delete(Some(&deleting), Some(false)),
            DeletePlan::Wait { id: "lb-1".into() }
        );
    }

    #[test]
    fn orphans_are_ours_with_a_vanished_service() {
        let live = lb_with("lb-1", "a", lb_labels("cl-1", "uid-live", "default", "a", false));
        let gone = lb_with("lb-2", "b", lb_labels("cl-1", "uid-gone", "default", "b", false));
        let gone_retained = lb_with("lb-3", "c", lb_labels("cl-1", "uid-gone-2", "default", "c", true));
        let foreign = lb_with("lb-4", "d", lb_labels("cl-2", "uid-x", "default", "d", false));
        let unlabelled = lb_with(
            "lb-5",
            "e",
            Labels::from([(LABEL_CLUSTER_ID.to_owned(), "cl-1".to_owned())]),
        );
        let no_longer_lb = lb_with("lb-6", "f", lb_labels("cl-1", "uid-cip", "default", "f", false));
        let finalizing = lb_with("lb-7", "g", lb_labels("cl-1", "uid-fin", "default", "g", false));
        let mut already = lb_with("lb-8", "h", lb_labels("cl-1", "uid-gone-3", "default", "h", false));
        already.status = LbStatus::Deleting;
        let services = HashMap::from([
            (
                "uid-live".to_owned(),
                LiveService {
                    wants_lb: true,
                    has_finalizer: false,
                },
            ),
            (
                "uid-cip".to_owned(),
                LiveService {
                    wants_lb: false,
                    has_finalizer: false,
                },
            ),
            (
                "uid-fin".to_owned(),
                LiveService {
                    wants_lb: false,
                    has_finalizer: true,
                },
            ),
        ]);
        let lbs = [
            live,
            gone,
            gone_retained,
            foreign,
            unlabelled,
            no_longer_lb,
            finalizing,
            already,
            lb_with("lb-9", "i", lb_labels("cl-1", "uid-old", "default", "recreated", false)),
        ];
        // A Service deleted and recreated while we were down: adopted by name, not swept.
        let adoptable = HashSet::from([
            ("default/recreated".to_owned(), "i".to_owned()),
            // Same Service, but its LB has another name: not adoptable, so swept.
            ("default/b".to_owned(), "not-b".to_owned()),
        ]);
        let orphans = find_orphans("cl-1", &lbs, &services, &adoptable);
        let got: Vec<(&str, Option<bool>)> = orphans.iter().map(|o| (o.id.as_str(), o.keep_public_ip)).collect();
        assert_eq!(got, vec![("lb-2", None), ("lb-3", Some(true)), ("lb-6", None)]);
        assert_eq!(orphans[0].service, "default/b");
    }
}

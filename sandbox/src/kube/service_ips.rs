//! A Service's IP families and ClusterIPs, as kube-apiserver defaults, validates and
//! allocates them (`pkg/registry/core/service/storage/alloc.go`, `storage.go`'s
//! `patchAllocatedValues`/`normalizeClusterIPs`, and
//! `ValidateServiceClusterIPsRelatedFields`/`validateUpgradeDowngrade*` of the core
//! validation): `spec.ipFamilyPolicy`, `spec.ipFamilies`, `spec.clusterIP(s)` over one or
//! two configured Service CIDRs (`--service-cluster-ip-range`, primary first).

use super::status::Cause;
use ipnet::IpNet;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::net::IpAddr;

pub const IPV4: &str = "IPv4";
pub const IPV6: &str = "IPv6";
pub const SINGLE_STACK: &str = "SingleStack";
pub const PREFER_DUAL_STACK: &str = "PreferDualStack";
pub const REQUIRE_DUAL_STACK: &str = "RequireDualStack";
const NONE: &str = "None";

/// The Service CIDRs of the cluster: one, or one per family with the primary first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceCidrs(Vec<IpNet>);

impl ServiceCidrs {
    /// One CIDR, or two of different families (the first is the primary family).
    pub fn new(cidrs: Vec<IpNet>) -> Result<Self, String> {
        match cidrs.as_slice() {
            [_] => Ok(Self(cidrs)),
            [a, b] if family_of_net(a) != family_of_net(b) => Ok(Self(cidrs)),
            [a, b] => Err(format!(
                "service CIDRs {a} and {b} are of the same family: give at most one per family"
            )),
            [] => Err("no service CIDR given".into()),
            _ => Err(format!(
                "{} service CIDRs given: give one, or one per family",
                cidrs.len()
            )),
        }
    }

    /// `127.96.0.0/16` or `127.96.0.0/16,fd00:96::/112`, as kube-apiserver's flag.
    pub fn parse(s: &str) -> Result<Self, String> {
        let cidrs = s
            .split(',')
            .map(|c| c.trim().parse::<IpNet>().map_err(|e| format!("{c:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(cidrs)
    }

    pub fn all(&self) -> &[IpNet] {
        &self.0
    }

    pub fn primary(&self) -> IpNet {
        self.0[0]
    }

    pub fn primary_family(&self) -> &'static str {
        family_of_net(&self.0[0])
    }

    /// The first address of the primary range: the `kubernetes` Service's ClusterIP.
    pub fn first_address(&self) -> Option<IpAddr> {
        allocate(self.primary(), &BTreeSet::new())
    }

    pub fn is_dual(&self) -> bool {
        self.0.len() == 2
    }

    /// The CIDR of `family` (`"IPv4"`/`"IPv6"`), when configured.
    pub fn of(&self, family: &str) -> Option<IpNet> {
        self.0.iter().copied().find(|n| family_of_net(n) == family)
    }
}

impl std::str::FromStr for ServiceCidrs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl std::fmt::Display for ServiceCidrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&list.join(","))
    }
}

fn family_of_net(n: &IpNet) -> &'static str {
    match n {
        IpNet::V4(_) => IPV4,
        IpNet::V6(_) => IPV6,
    }
}

fn family_of(ip: &str) -> Option<&'static str> {
    match ip.parse::<IpAddr>().ok()? {
        IpAddr::V4(_) => Some(IPV4),
        IpAddr::V6(_) => Some(IPV6),
    }
}

fn other_family(f: &str) -> &'static str {
    if f == IPV4 { IPV6 } else { IPV4 }
}

/// The addresses of `cidr` the allocator hands out: all but the network address (and,
/// for IPv4, the broadcast address), as kube-apiserver's range allocator.
fn allocatable(cidr: IpNet, ip: IpAddr) -> bool {
    cidr.contains(&ip)
        && ip != cidr.network()
        && match cidr {
            IpNet::V4(_) => ip != cidr.broadcast(),
            IpNet::V6(_) => true,
        }
}

/// First free allocatable address of `cidr`.
pub fn allocate(cidr: IpNet, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    match cidr {
        IpNet::V4(n) => n.hosts().map(IpAddr::V4).find(|a| !used.contains(a)),
        IpNet::V6(n) => n
            .hosts()
            .map(IpAddr::V6)
            .filter(|a| allocatable(cidr, *a))
            .find(|a| !used.contains(a)),
    }
}

/// Go's `%#v` of a `[]string`, as the real messages print Service IP lists.
pub fn go_strings(v: &[String]) -> String {
    go_list("string", v)
}

/// Go's `%#v` of a slice of a string type `ty`.
fn go_list(ty: &str, v: &[String]) -> String {
    format!(
        "[]{ty}{{{}}}",
        v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")
    )
}

/// The fields this module owns, read from a Service spec.
#[derive(Clone, Debug, Default, PartialEq)]
struct Fields {
    cluster_ip: String,
    cluster_ips: Vec<String>,
    families: Vec<String>,
    policy: Option<String>,
    has_selector: bool,
    typ: String,
}

impl Fields {
    fn read(spec: &Value, causes: &mut Vec<Cause>) -> Self {
        let strings = |key: &str, causes: &mut Vec<Cause>| -> Vec<String> {
            match spec.get(key) {
                None | Some(Value::Null) => vec![],
                Some(Value::Array(a)) => a
                    .iter()
                    .enumerate()
                    .filter_map(|(i, v)| match v.as_str() {
                        Some(s) => Some(s.to_string()),
                        None => {
                            causes.push(Cause::type_invalid(&format!("spec.{key}[{i}]"), v, "must be a string"));
                            None
                        }
                    })
                    .collect(),
                Some(v) => {
                    causes.push(Cause::type_invalid(
                        &format!("spec.{key}"),
                        v,
                        "must be a list of strings",
                    ));
                    vec![]
                }
            }
        };
        Fields {
            cluster_ip: spec
                .get("clusterIP")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            cluster_ips: strings("clusterIPs", causes),
            families: strings("ipFamilies", causes),
            policy: spec.get("ipFamilyPolicy").and_then(Value::as_str).map(str::to_string),
            has_selector: spec
                .get("selector")
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty()),
            typ: spec
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("ClusterIP")
                .to_string(),
        }
    }

    fn write(&self, spec: &mut Value) {
        spec["clusterIP"] = json!(self.cluster_ips.first().cloned().unwrap_or_default());
        spec["clusterIPs"] = json!(self.cluster_ips);
        spec["ipFamilies"] = json!(self.families);
        spec["ipFamilyPolicy"] = json!(self.policy);
    }

    fn headless(&self) -> bool {
        self.cluster_ips.len() == 1 && self.cluster_ips[0] == NONE
    }

    fn policy(&self) -> &str {
        self.policy.as_deref().unwrap_or_default()
    }
}

fn policy_value(f: &Fields) -> Value {
    f.policy.as_ref().map_or(Value::Null, |p| json!(p))
}

/// Defaults, validates and allocates the IP family fields and ClusterIPs of `spec` (not
/// ExternalName); `old_spec` is the stored Service's spec on update (Null on create).
/// `used` holds every address other Services hold.
pub fn apply(
    old_spec: &Value,
    spec: &mut Value,
    cidrs: &ServiceCidrs,
    used: &BTreeSet<IpAddr>,
) -> Result<(), Vec<Cause>> {
    let mut causes = Vec::new();
    let mut new = Fields::read(spec, &mut causes);
    let old = (!old_spec.is_null())
        .then(|| Fields::read(old_spec, &mut Vec::new()))
        .filter(|o| o.typ != "ExternalName");
    if !causes.is_empty() {
        return Err(causes);
    }
    match &old {
        None => {
            // A client that sets only the singular field (old clients), or only the plural
            // one, meant the same address.
            if !new.cluster_ip.is_empty() && new.cluster_ips.is_empty() {
                new.cluster_ips = vec![new.cluster_ip.clone()];
            } else if new.cluster_ip.is_empty() && !new.cluster_ips.is_empty() {
                new.cluster_ip = new.cluster_ips[0].clone();
            }
        }
        Some(old) => {
            patch_allocated(old, &mut new);
            normalize_update(old, &mut new);
        }
    }
    causes.extend(validate_related(&new));
    if let Some(old) = &old {
        causes.extend(validate_upgrade_downgrade(old, &new));
    }
    if !causes.is_empty() {
        return Err(causes);
    }
    init_families(old.as_ref(), &mut new, cidrs)?;
    if !new.headless() {
        allocate_ips(old.as_ref(), &mut new, cidrs, used)?;
    }
    new.write(spec);
    Ok(())
}

/// Keeps what was allocated when a client resubmits without it (`patchAllocatedValues`).
fn patch_allocated(old: &Fields, new: &mut Fields) {
    if new.cluster_ip.is_empty() {
        new.cluster_ip = old.cluster_ip.clone();
    }
    if new.cluster_ips.is_empty() && !old.cluster_ips.is_empty() {
        new.cluster_ips = old.cluster_ips.clone();
    }
}

/// Keeps `clusterIP` and `clusterIPs` in step on update (`normalizeClusterIPs`).
fn normalize_update(old: &Fields, new: &mut Fields) {
    if !old.cluster_ips.is_empty() && new.cluster_ips.is_empty() && old.cluster_ip == new.cluster_ip {
        new.cluster_ips = old.cluster_ips.clone();
    }
    if old.cluster_ip != new.cluster_ip {
        if !old.cluster_ip.is_empty() && new.cluster_ip.is_empty() {
            if old.cluster_ips == new.cluster_ips {
                new.cluster_ips.clear();
            }
        } else if old.cluster_ips == new.cluster_ips {
            new.cluster_ips = vec![new.cluster_ip.clone()];
        }
    }
}

/// `ValidateServiceClusterIPsRelatedFields`.
fn validate_related(f: &Fields) -> Vec<Cause> {
    let mut causes = Vec::new();
    let ips = go_strings(&f.cluster_ips);
    if !f.cluster_ip.is_empty() {
        if f.cluster_ips.is_empty() {
            causes.push(Cause::required("spec.clusterIPs"));
        } else if f.cluster_ips[0] != f.cluster_ip {
            causes.push(Cause::invalid_raw(
                "spec.clusterIPs",
                &ips,
                "first value must match `clusterIP`",
            ));
        }
    } else if !f.cluster_ips.is_empty() {
        causes.push(Cause::invalid_raw(
            "spec.clusterIPs",
            &ips,
            "must be empty when `clusterIP` is not specified",
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, fam) in f.families.iter().enumerate() {
        let field = format!("spec.ipFamilies[{i}]");
        if fam != IPV4 && fam != IPV6 {
            causes.push(Cause::unsupported(&field, &json!(fam), &[json!(IPV4), json!(IPV6)]));
        }
        if !seen.insert(fam.as_str()) {
            causes.push(Cause::duplicate(&field, &json!(fam)));
        }
    }
    if let Some(p) = &f.policy
        && ![SINGLE_STACK, PREFER_DUAL_STACK, REQUIRE_DUAL_STACK].contains(&p.as_str())
    {
        causes.push(Cause::unsupported(
            "spec.ipFamilyPolicy",
            &json!(p),
            &[json!(PREFER_DUAL_STACK), json!(REQUIRE_DUAL_STACK), json!(SINGLE_STACK)],
        ));
    }
    let mut bad_ips = false;
    for (i, ip) in f.cluster_ips.iter().enumerate() {
        if i == 0 && ip == NONE {
            if f.cluster_ips.len() > 1 {
                bad_ips = true;
                causes.push(Cause::invalid_raw(
                    "spec.clusterIPs",
                    &ips,
                    "'None' must be the first and only value",
                ));
            }
            continue;
        }
        if ip.parse::<IpAddr>().is_err() {
            bad_ips = true;
            causes.push(Cause::invalid(
                &format!("spec.clusterIPs[{i}]"),
                &json!(ip),
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            ));
        }
    }
    if f.cluster_ips.len() > 2 {
        causes.push(Cause::invalid_raw(
            "spec.clusterIPs",
            &ips,
            "may only hold up to 2 values",
        ));
    }
    if bad_ips {
        return causes;
    }
    if f.cluster_ips.len() == 2 && family_of(&f.cluster_ips[0]) == family_of(&f.cluster_ips[1]) {
        causes.push(Cause::invalid_raw(
            "spec.clusterIPs",
            &ips,
            "may specify no more than one IP for each IP family",
        ));
    }
    if !f.headless() {
        for (i, (ip, fam)) in f.cluster_ips.iter().zip(&f.families).enumerate() {
            let got = family_of(ip);
            if fam == IPV4 && got == Some(IPV6) {
                causes.push(Cause::invalid(
                    &format!("spec.clusterIPs[{i}]"),
                    &json!(ip),
                    &format!("expected an IPv4 value as indicated by `ipFamilies[{i}]`"),
                ));
            }
            if fam == IPV6 && got != Some(IPV6) {
                causes.push(Cause::invalid(
                    &format!("spec.clusterIPs[{i}]"),
                    &json!(ip),
                    &format!("expected an IPv6 value as indicated by `ipFamilies[{i}]`"),
                ));
            }
        }
    }
    causes
}

/// `validateUpgradeDowngradeClusterIPs` and `validateUpgradeDowngradeIPFamilies`.
fn validate_upgrade_downgrade(old: &Fields, new: &Fields) -> Vec<Cause> {
    let mut causes = Vec::new();
    if !(old.headless() && new.headless()) {
        causes.extend(validate_list_update(
            IpList::ClusterIps,
            &old.cluster_ips,
            &new.cluster_ips,
            new,
        ));
    }
    // Headless Services may change families, and so may one becoming or leaving headless.
    if old.headless() == new.headless() && !new.headless() {
        causes.extend(validate_list_update(
            IpList::IpFamilies,
            &old.families,
            &new.families,
            new,
        ));
    }
    causes
}

/// The two lists whose primary is fixed once set, but whose secondary may be added, or
/// released with `SingleStack`.
#[derive(Clone, Copy)]
enum IpList {
    ClusterIps,
    IpFamilies,
}

impl IpList {
    fn field(self) -> &'static str {
        match self {
            IpList::ClusterIps => "spec.clusterIPs",
            IpList::IpFamilies => "spec.ipFamilies",
        }
    }

    /// One value, as the "releasing the secondary ..." messages name it.
    fn noun(self) -> &'static str {
        match self {
            IpList::ClusterIps => "clusterIP",
            IpList::IpFamilies => "ipFamily",
        }
    }

    /// The new list as Go's `%#v` prints it.
    fn render(self, v: &[String]) -> String {
        match self {
            IpList::ClusterIps => go_list("string", v),
            IpList::IpFamilies => go_list("core.IPFamily", v),
        }
    }
}

/// One list's update check: `old` and `new` are its values, `svc` the new Service's
/// fields. Where kube-apiserver's two functions differ, this follows each.
fn validate_list_update(list: IpList, old: &[String], new: &[String], svc: &Fields) -> Vec<Cause> {
    let mut causes = Vec::new();
    let field = list.field();
    // Upstream reports the new clusterIPs as the value of the "may not change" errors of
    // both lists (ipFamilies too, when it grew or shrank), and the list itself otherwise.
    let ips = go_strings(&svc.cluster_ips);
    let changed_primary = |causes: &mut Vec<Cause>| {
        causes.push(Cause::invalid_raw(
            &format!("{field}[0]"),
            &ips,
            "may not change once set",
        ))
    };
    if old.len() == new.len() {
        let own = list.render(new);
        for i in (0..old.len()).filter(|&i| old[i] != new[i]) {
            match list {
                IpList::ClusterIps => causes.push(Cause::invalid_raw(
                    &format!("{field}[{i}]"),
                    &own,
                    "may not change once set",
                )),
                // Upstream repeats the same `[0]` error per changed family; its message
                // shows it once.
                IpList::IpFamilies => {
                    causes.push(Cause::invalid_raw(
                        &format!("{field}[0]"),
                        &own,
                        "may not change once set",
                    ));
                    break;
                }
            }
        }
    } else if old.len() > new.len() {
        // Upstream tests the clusterIPs for both lists. Only a stored Service without
        // addresses (never one this server wrote) gets here with none.
        if svc.cluster_ips.is_empty() {
            causes.push(Cause::invalid_raw(
                &format!("{field}[0]"),
                &list.render(new),
                &format!("primary {} can not be unset", list.noun()),
            ));
        }
        if !new.is_empty() && new[0] != old[0] {
            changed_primary(&mut causes);
        }
        if new.len() == 1 && svc.policy() != SINGLE_STACK {
            causes.push(Cause::invalid(
                "spec.ipFamilyPolicy",
                &policy_value(svc),
                &format!(
                    "must be set to 'SingleStack' when releasing the secondary {}",
                    list.noun()
                ),
            ));
        }
    } else if !old.is_empty() && new[0] != old[0] {
        changed_primary(&mut causes);
    }
    causes
}

/// A PreferDualStack Service whose addresses and families are unchanged keeps them, even
/// if the cluster became (or stopped being) dual-stack since
/// (`isMatchingPreferDualStackClusterIPFields`).
fn unchanged_prefer_dual_stack(old: &Fields, new: &Fields) -> bool {
    new.policy.is_some()
        && old.typ == new.typ
        && ["ClusterIP", "NodePort", "LoadBalancer"].contains(&new.typ.as_str())
        && new.policy() == PREFER_DUAL_STACK
        && old.policy.as_deref().is_none_or(|p| p == PREFER_DUAL_STACK)
        && old.cluster_ips == new.cluster_ips
        && old.families == new.families
}

/// `initIPFamilyFields`: defaults the policy and families from the cluster's
/// configuration and checks them against it.
fn init_families(old: Option<&Fields>, f: &mut Fields, cidrs: &ServiceCidrs) -> Result<(), Vec<Cause>> {
    if let Some(o) = old
        && unchanged_prefer_dual_stack(o, f)
    {
        return Ok(());
    }
    let headless_selectorless = f.cluster_ip == NONE && !f.has_selector;
    if f.policy.is_none() {
        f.policy = Some(match old.and_then(|o| o.policy.clone()) {
            Some(p) => p,
            None if headless_selectorless => REQUIRE_DUAL_STACK.into(),
            None => SINGLE_STACK.into(),
        });
    }
    let causes = validate_related(f);
    if !causes.is_empty() {
        return Err(causes);
    }
    let mut causes = Vec::new();
    let policy = policy_value(f);
    if let Some(o) = old {
        if f.policy() == SINGLE_STACK {
            // Setting the policy to SingleStack with the lists unchanged is clear intent:
            // the secondary address and family go.
            if o.cluster_ips == f.cluster_ips && f.cluster_ips.len() > 1 {
                f.cluster_ips.truncate(1);
            }
            if o.families == f.families && f.families.len() > 1 {
                f.families.truncate(1);
            }
        } else {
            if !f.cluster_ips.is_empty() && f.cluster_ips.len() < o.cluster_ips.len() {
                causes.push(Cause::invalid(
                    "spec.ipFamilyPolicy",
                    &policy,
                    "must be 'SingleStack' to release the secondary cluster IP",
                ));
            }
            if !f.families.is_empty() && f.families.len() < o.families.len() {
                causes.push(Cause::invalid(
                    "spec.ipFamilyPolicy",
                    &policy,
                    "must be 'SingleStack' to release the secondary IP family",
                ));
            }
        }
    }
    if f.policy() == SINGLE_STACK {
        if f.cluster_ips.len() == 2 {
            causes.push(Cause::invalid(
                "spec.ipFamilyPolicy",
                &policy,
                "must be 'RequireDualStack' or 'PreferDualStack' when multiple cluster IPs are specified",
            ));
        }
        if f.families.len() == 2 {
            causes.push(Cause::invalid(
                "spec.ipFamilyPolicy",
                &policy,
                "must be 'RequireDualStack' or 'PreferDualStack' when multiple IP families are specified",
            ));
        }
    }
    for (i, ip) in f.cluster_ips.clone().iter().enumerate() {
        if ip == NONE {
            break;
        }
        let fam = family_of(ip).unwrap_or("unknown");
        if i >= f.families.len() {
            if cidrs.of(fam).is_none() {
                causes.push(Cause::invalid_raw(
                    &format!("spec.clusterIPs[{i}]"),
                    &go_strings(&f.cluster_ips),
                    &format!("{fam} is not configured on this cluster"),
                ));
            } else {
                f.families.push(fam.to_string());
            }
        }
    }
    if !causes.is_empty() {
        return Err(causes);
    }
    if headless_selectorless {
        // Its endpoints may be of any family: kube-apiserver allows both even on a
        // single-stack cluster.
        if f.families.is_empty() {
            f.families.push(cidrs.primary_family().to_string());
        }
        if f.families.len() < 2 && f.policy() != SINGLE_STACK {
            let other = other_family(&f.families[0]).to_string();
            f.families.push(other);
        }
        return Ok(());
    }
    if f.policy() == REQUIRE_DUAL_STACK && !cidrs.is_dual() {
        causes.push(Cause::invalid(
            "spec.ipFamilyPolicy",
            &policy,
            "this cluster is not configured for dual-stack services",
        ));
    }
    for (i, fam) in f.families.iter().enumerate() {
        if cidrs.of(fam).is_none() {
            causes.push(Cause::invalid(
                &format!("spec.ipFamilies[{i}]"),
                &json!(fam),
                "not configured on this cluster",
            ));
        }
    }
    if !causes.is_empty() {
        return Err(causes);
    }
    if f.families.is_empty() {
        f.families.push(cidrs.primary_family().to_string());
    }
    if f.policy() != SINGLE_STACK && f.families.len() == 1 && cidrs.is_dual() {
        let other = other_family(&f.families[0]).to_string();
        f.families.push(other);
    }
    Ok(())
}

/// One address per family: the requested one when free and in range, else the first
/// free one of the family's CIDR. Addresses the stored Service already holds stay its own.
fn allocate_ips(
    old: Option<&Fields>,
    f: &mut Fields,
    cidrs: &ServiceCidrs,
    used: &BTreeSet<IpAddr>,
) -> Result<(), Vec<Cause>> {
    let held: BTreeSet<&str> = old
        .filter(|o| !o.headless())
        .map(|o| o.cluster_ips.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let mut taken = used.clone();
    let mut causes = Vec::new();
    let families = f.families.clone();
    for (i, fam) in families.iter().enumerate() {
        let Some(cidr) = cidrs.of(fam) else { continue };
        if i >= f.cluster_ips.len() {
            f.cluster_ips.push(String::new());
        }
        let ip = f.cluster_ips[i].clone();
        if ip.is_empty() {
            match allocate(cidr, &taken) {
                Some(a) => {
                    taken.insert(a);
                    f.cluster_ips[i] = a.to_string();
                }
                None => causes.push(Cause::invalid(
                    "spec.clusterIPs",
                    &json!(""),
                    "failed to allocate IP: range is full",
                )),
            }
            continue;
        }
        if held.contains(ip.as_str()) {
            continue;
        }
        let Ok(addr) = ip.parse::<IpAddr>() else { continue };
        let detail = if !allocatable(cidr, addr) {
            format!(
                "failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. The range of valid IPs is {cidr}"
            )
        } else if !taken.insert(addr) {
            format!("failed to allocate IP {ip}: provided IP is already allocated")
        } else {
            continue;
        };
        causes.push(Cause::invalid_raw(
            "spec.clusterIPs",
            &go_strings(&f.cluster_ips),
            &detail,
        ));
    }
    if causes.is_empty() { Ok(()) } else { Err(causes) }
}

/// Drops the fields an ExternalName Service does not carry.
pub fn drop_for_external_name(spec: &mut Value) {
    if let Some(m) = spec.as_object_mut() {
        for k in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
            m.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single() -> ServiceCidrs {
        "127.96.0.0/16".parse().unwrap()
    }

    fn dual() -> ServiceCidrs {
        "127.96.0.0/16,fd00:96::/112".parse().unwrap()
    }

    /// `apply` on a create (`old` Null) or update; the resulting spec or the causes' texts.
    fn run(old: &Value, spec: Value, cidrs: &ServiceCidrs, used: &[&str]) -> Result<Value, Vec<String>> {
        let used: BTreeSet<IpAddr> = used.iter().map(|s| s.parse().unwrap()).collect();
        let mut spec = spec;
        apply(old, &mut spec, cidrs, &used)
            .map(|()| spec)
            .map_err(|c| c.iter().map(Cause::text).collect())
    }

    fn create(spec: Value, cidrs: &ServiceCidrs) -> Value {
        run(&Value::Null, spec, cidrs, &[]).expect("admitted")
    }

    fn ip_fields(spec: &Value) -> Value {
        json!([
            spec["clusterIP"],
            spec["clusterIPs"],
            spec["ipFamilies"],
            spec["ipFamilyPolicy"]
        ])
    }

    #[test]
    fn cidrs_are_one_or_one_per_family() {
        assert_eq!(dual().primary_family(), IPV4);
        assert_eq!(dual().of(IPV6), Some("fd00:96::/112".parse().unwrap()));
        assert!(!single().is_dual() && dual().is_dual());
        let v6_first: ServiceCidrs = "fd00:96::/112,127.96.0.0/16".parse().unwrap();
        assert_eq!(v6_first.primary_family(), IPV6);
        assert_eq!(v6_first.to_string(), "fd00:96::/112,127.96.0.0/16");
        assert!(
            ServiceCidrs::parse("127.96.0.0/16,127.97.0.0/16")
                .unwrap_err()
                .contains("same family")
        );
        assert!(ServiceCidrs::parse("127.96.0.0/16,fd00:96::/112,fd00:97::/112").is_err());
        assert!(ServiceCidrs::parse("nonsense").is_err());
        // IPv6: the network address (subnet-router anycast) is never handed out.
        assert_eq!(v6_first.first_address(), Some("fd00:96::1".parse().unwrap()));
    }

    #[test]
    fn a_service_without_ip_fields_is_single_stack_of_the_primary_family() {
        for cidrs in [single(), dual()] {
            let spec = create(json!({"type": "ClusterIP"}), &cidrs);
            assert_eq!(
                ip_fields(&spec),
                json!(["127.96.0.1", ["127.96.0.1"], ["IPv4"], "SingleStack"])
            );
        }
        let v6_first: ServiceCidrs = "fd00:96::/112,127.96.0.0/16".parse().unwrap();
        let spec = create(json!({}), &v6_first);
        assert_eq!(
            ip_fields(&spec),
            json!(["fd00:96::1", ["fd00:96::1"], ["IPv6"], "SingleStack"])
        );
    }

    #[test]
    fn prefer_dual_stack_gets_one_family_on_a_single_stack_cluster_and_both_on_a_dual_one() {
        let prefer = json!({"ipFamilyPolicy": "PreferDualStack"});
        assert_eq!(
            ip_fields(&create(prefer.clone(), &single())),
            json!(["127.96.0.1", ["127.96.0.1"], ["IPv4"], "PreferDualStack"])
        );
        assert_eq!(
            ip_fields(&create(prefer, &dual())),
            json!([
                "127.96.0.1",
                ["127.96.0.1", "fd00:96::1"],
                ["IPv4", "IPv6"],
                "PreferDualStack"
            ])
        );
        // The families' order is the Service's: IPv6 first when asked.
        let v6_first = create(
            json!({"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv6"]}),
            &dual(),
        );
        assert_eq!(
            ip_fields(&v6_first),
            json!([
                "fd00:96::1",
                ["fd00:96::1", "127.96.0.1"],
                ["IPv6", "IPv4"],
                "RequireDualStack"
            ])
        );
    }

    #[test]
    fn require_dual_stack_on_a_single_stack_cluster_is_refused_as_kube_apiserver_does() {
        let r = run(
            &Value::Null,
            json!({"ipFamilyPolicy": "RequireDualStack"}),
            &single(),
            &[],
        );
        assert_eq!(
            r.unwrap_err(),
            [
                r#"spec.ipFamilyPolicy: Invalid value: "RequireDualStack": this cluster is not configured for dual-stack services"#
            ]
        );
        let r = run(&Value::Null, json!({"ipFamilies": ["IPv6"]}), &single(), &[]);
        assert_eq!(
            r.unwrap_err(),
            [r#"spec.ipFamilies[0]: Invalid value: "IPv6": not configured on this cluster"#]
        );
        let r = run(
            &Value::Null,
            json!({"clusterIP": "fd00:96::5", "clusterIPs": ["fd00:96::5"]}),
            &single(),
            &[],
        );
        assert_eq!(
            r.unwrap_err(),
            [r#"spec.clusterIPs[0]: Invalid value: []string{"fd00:96::5"}: IPv6 is not configured on this cluster"#]
        );
    }

    #[test]
    fn bad_ip_family_fields_are_invalid() {
        let err = |spec: Value| run(&Value::Null, spec, &dual(), &[]).unwrap_err();
        assert_eq!(
            err(json!({"ipFamilyPolicy": "Both"})),
            [
                r#"spec.ipFamilyPolicy: Unsupported value: "Both": supported values: "PreferDualStack", "RequireDualStack", "SingleStack""#
            ]
        );
        assert_eq!(
            err(json!({"ipFamilies": ["IPv4", "IPv4"], "ipFamilyPolicy": "PreferDualStack"})),
            [r#"spec.ipFamilies[1]: Duplicate value: "IPv4""#]
        );
        assert_eq!(
            err(json!({"ipFamilies": ["IPv5"]})),
            [r#"spec.ipFamilies[0]: Unsupported value: "IPv5": supported values: "IPv4", "IPv6""#]
        );
        assert_eq!(
            err(json!({"ipFamilies": ["IPv4", "IPv6"]})),
            [
                r#"spec.ipFamilyPolicy: Invalid value: "SingleStack": must be 'RequireDualStack' or 'PreferDualStack' when multiple IP families are specified"#
            ]
        );
        assert_eq!(
            err(
                json!({"clusterIP": "127.96.0.7", "clusterIPs": ["127.96.0.7", "127.96.0.8"], "ipFamilyPolicy": "PreferDualStack"})
            ),
            [
                r#"spec.clusterIPs: Invalid value: []string{"127.96.0.7", "127.96.0.8"}: may specify no more than one IP for each IP family"#
            ]
        );
        assert_eq!(
            err(json!({"clusterIP": "fd00:96::7", "clusterIPs": ["fd00:96::7"], "ipFamilies": ["IPv4"]})),
            [
                r#"spec.clusterIPs[0]: Invalid value: "fd00:96::7": expected an IPv4 value as indicated by `ipFamilies[0]`"#
            ]
        );
        assert_eq!(
            err(json!({"clusterIP": "127.96.0.7", "clusterIPs": ["127.96.0.8"]})),
            [r#"spec.clusterIPs: Invalid value: []string{"127.96.0.8"}: first value must match `clusterIP`"#]
        );
    }

    #[test]
    fn requested_addresses_are_checked_per_family() {
        let spec = json!({"clusterIP": "127.96.0.7", "clusterIPs": ["127.96.0.7", "fd00:96::7"], "ipFamilyPolicy": "RequireDualStack"});
        assert_eq!(
            ip_fields(&create(spec.clone(), &dual())),
            json!([
                "127.96.0.7",
                ["127.96.0.7", "fd00:96::7"],
                ["IPv4", "IPv6"],
                "RequireDualStack"
            ])
        );
        assert_eq!(
            run(&Value::Null, spec.clone(), &dual(), &["fd00:96::7"]).unwrap_err(),
            [
                r#"spec.clusterIPs: Invalid value: []string{"127.96.0.7", "fd00:96::7"}: failed to allocate IP fd00:96::7: provided IP is already allocated"#
            ]
        );
        let mut outside = spec;
        outside["clusterIPs"][1] = json!("fd00:97::7");
        assert_eq!(
            run(&Value::Null, outside, &dual(), &[]).unwrap_err(),
            [
                r#"spec.clusterIPs: Invalid value: []string{"127.96.0.7", "fd00:97::7"}: failed to allocate IP fd00:97::7: the provided IP (fd00:97::7) is not in the valid range. The range of valid IPs is fd00:96::/112"#
            ]
        );
        // What others hold is skipped.
        let spec = run(
            &Value::Null,
            json!({"ipFamilyPolicy": "PreferDualStack"}),
            &dual(),
            &["127.96.0.1", "fd00:96::1"],
        )
        .unwrap();
        assert_eq!(spec["clusterIPs"], json!(["127.96.0.2", "fd00:96::2"]));
    }

    #[test]
    fn single_stack_to_prefer_dual_stack_adds_a_secondary_address_and_back_drops_it() {
        let old = create(json!({"type": "ClusterIP"}), &dual());
        // A merge patch of the policy: everything else as stored.
        let mut up = old.clone();
        up["ipFamilyPolicy"] = json!("PreferDualStack");
        let up = run(&old, up, &dual(), &[]).unwrap();
        assert_eq!(
            ip_fields(&up),
            json!([
                "127.96.0.1",
                ["127.96.0.1", "fd00:96::1"],
                ["IPv4", "IPv6"],
                "PreferDualStack"
            ])
        );
        // Shortening the lists without SingleStack is refused.
        let mut short = up.clone();
        short["clusterIPs"] = json!(["127.96.0.1"]);
        short["ipFamilies"] = json!(["IPv4"]);
        assert_eq!(
            run(&up, short, &dual(), &[]).unwrap_err(),
            [
                r#"spec.ipFamilyPolicy: Invalid value: "PreferDualStack": must be set to 'SingleStack' when releasing the secondary clusterIP"#,
                r#"spec.ipFamilyPolicy: Invalid value: "PreferDualStack": must be set to 'SingleStack' when releasing the secondary ipFamily"#
            ]
        );
        // SingleStack with the lists unchanged drops the secondary address and family.
        let mut down = up.clone();
        down["ipFamilyPolicy"] = json!("SingleStack");
        let down = run(&up, down, &dual(), &[]).unwrap();
        assert_eq!(
            ip_fields(&down),
            json!(["127.96.0.1", ["127.96.0.1"], ["IPv4"], "SingleStack"])
        );
        // A PUT without the IP fields keeps what the Service holds.
        let put = run(&up, json!({"type": "ClusterIP"}), &dual(), &[]).unwrap();
        assert_eq!(ip_fields(&put), ip_fields(&up));
        // The primary address stays.
        let mut moved = up.clone();
        moved["clusterIP"] = json!("127.96.0.9");
        moved["clusterIPs"] = json!(["127.96.0.9", "fd00:96::1"]);
        assert_eq!(
            run(&up, moved, &dual(), &[]).unwrap_err(),
            [r#"spec.clusterIPs[0]: Invalid value: []string{"127.96.0.9", "fd00:96::1"}: may not change once set"#]
        );
    }

    #[test]
    fn the_primary_family_may_not_change_and_reports_what_kube_apiserver_does() {
        let single_v4 = create(json!({"type": "ClusterIP"}), &dual());
        let dual_v4 = create(json!({"ipFamilyPolicy": "PreferDualStack"}), &dual());
        let with = |old: &Value, fams: Value, policy: &str| {
            let mut s = old.clone();
            s["ipFamilies"] = fams;
            s["ipFamilyPolicy"] = json!(policy);
            s
        };
        let mismatch = r#"spec.clusterIPs[0]: Invalid value: "127.96.0.1": expected an IPv6 value as indicated by `ipFamilies[0]`"#;
        // Same length: the value is the new ipFamilies.
        assert_eq!(
            run(
                &single_v4,
                with(&single_v4, json!(["IPv6"]), SINGLE_STACK),
                &dual(),
                &[]
            )
            .unwrap_err(),
            [
                mismatch,
                r#"spec.ipFamilies[0]: Invalid value: []core.IPFamily{"IPv6"}: may not change once set"#
            ]
        );
        // Grown or shrunk: upstream reports the new clusterIPs as the value
        // (`validateUpgradeDowngradeIPFamilies`).
        assert_eq!(
            run(
                &single_v4,
                with(&single_v4, json!(["IPv6", "IPv4"]), PREFER_DUAL_STACK),
                &dual(),
                &[]
            )
            .unwrap_err(),
            [
                mismatch,
                r#"spec.ipFamilies[0]: Invalid value: []string{"127.96.0.1"}: may not change once set"#
            ]
        );
        let mut shrunk = with(&dual_v4, json!(["IPv6"]), SINGLE_STACK);
        shrunk["clusterIPs"] = json!(["127.96.0.1"]);
        assert_eq!(
            run(&dual_v4, shrunk, &dual(), &[]).unwrap_err(),
            [
                mismatch,
                r#"spec.ipFamilies[0]: Invalid value: []string{"127.96.0.1"}: may not change once set"#
            ]
        );
    }

    #[test]
    fn a_stored_service_without_addresses_may_not_release_its_primary_family() {
        let old = json!({"type": "ClusterIP", "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack"});
        let mut new = old.clone();
        new["ipFamilies"] = json!(["IPv4"]);
        new["ipFamilyPolicy"] = json!(SINGLE_STACK);
        assert_eq!(
            run(&old, new, &dual(), &[]).unwrap_err(),
            [r#"spec.ipFamilies[0]: Invalid value: []core.IPFamily{"IPv4"}: primary ipFamily can not be unset"#]
        );
    }

    #[test]
    fn an_unchanged_prefer_dual_stack_service_is_not_upgraded_when_the_cluster_becomes_dual() {
        let old = create(json!({"ipFamilyPolicy": "PreferDualStack"}), &single());
        let same = run(&old, old.clone(), &dual(), &[]).unwrap();
        assert_eq!(same["clusterIPs"], json!(["127.96.0.1"]));
        // RequireDualStack is the explicit upgrade.
        let mut req = old.clone();
        req["ipFamilyPolicy"] = json!("RequireDualStack");
        let req = run(&old, req, &dual(), &[]).unwrap();
        assert_eq!(req["clusterIPs"], json!(["127.96.0.1", "fd00:96::1"]));
    }

    #[test]
    fn headless_services() {
        // With a selector: single-stack of the primary family, as any Service.
        let spec = create(json!({"clusterIP": "None", "selector": {"a": "b"}}), &single());
        assert_eq!(ip_fields(&spec), json!(["None", ["None"], ["IPv4"], "SingleStack"]));
        // Selectorless: its endpoints may be of either family, even on a single-stack
        // cluster.
        let spec = create(json!({"clusterIP": "None"}), &single());
        assert_eq!(
            ip_fields(&spec),
            json!(["None", ["None"], ["IPv4", "IPv6"], "RequireDualStack"])
        );
        let spec = create(
            json!({"clusterIP": "None", "selector": {"a": "b"}, "ipFamilyPolicy": "PreferDualStack"}),
            &dual(),
        );
        assert_eq!(
            ip_fields(&spec),
            json!(["None", ["None"], ["IPv4", "IPv6"], "PreferDualStack"])
        );
    }
}

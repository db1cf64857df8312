//! Which address families a Service's load balancer serves: the Service's
//! `spec.ipFamilies` and `spec.ipFamilyPolicy` against the families the platform cluster
//! carries (`Cluster.ip_versions`, read once at start). Pure.
//!
//! - `SingleStack` (also an unset policy): the Service's one family.
//! - `PreferDualStack`: every family of `spec.ipFamilies` the platform cluster has.
//! - `RequireDualStack`: both.
//!
//! An unset `spec.ipFamilies` (a Service not from an API server that defaults it) is
//! `[IPv4]`: IPv4-only Services behave exactly as before dual-stack. A family the
//! platform cluster lacks (IPv6 on a cluster whose subnet has no IPv6 range) is a
//! refusal with reason `IPv6Unavailable`: no platform call, no half-made LB.

use k8s_openapi::api::core::v1::ServiceSpec;

use crate::platform::IpVersion;
use crate::service::refusal::Refusal;

/// `spec.ipFamilyPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FamilyPolicy {
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

impl FamilyPolicy {
    /// The policy a Service sets; unset is `SingleStack` (kube-apiserver's default).
    fn of(spec: &ServiceSpec) -> Result<Self, Refusal> {
        match spec.ip_family_policy.as_deref() {
            None | Some("SingleStack") => Ok(FamilyPolicy::SingleStack),
            Some("PreferDualStack") => Ok(FamilyPolicy::PreferDualStack),
            Some("RequireDualStack") => Ok(FamilyPolicy::RequireDualStack),
            Some(other) => Err(Refusal::unsupported(
                "spec.ipFamilyPolicy",
                format!("{other:?} is not SingleStack, PreferDualStack or RequireDualStack"),
            )),
        }
    }
}

/// The Kubernetes name of a family (`IPv4`, `IPv6`).
pub fn family_name(v: IpVersion) -> &'static str {
    match v {
        IpVersion::V4 => "IPv4",
        IpVersion::V6 => "IPv6",
    }
}

/// `spec.ipFamilies` in the Service's order (primary first); unset or empty is `[IPv4]`.
fn service_families(spec: &ServiceSpec) -> Result<Vec<IpVersion>, Refusal> {
    let mut out = Vec::new();
    for (i, f) in spec.ip_families.iter().flatten().enumerate() {
        let v = match f.as_str() {
            "IPv4" => IpVersion::V4,
            "IPv6" => IpVersion::V6,
            other => {
                return Err(Refusal::unsupported(
                    format!("spec.ipFamilies[{i}]"),
                    format!("{other:?} is not IPv4 or IPv6"),
                ));
            }
        };
        if out.contains(&v) {
            return Err(Refusal::unsupported(
                format!("spec.ipFamilies[{i}]"),
                format!("{f} is listed twice"),
            ));
        }
        out.push(v);
    }
    if out.is_empty() {
        out.push(IpVersion::V4);
    }
    Ok(out)
}

/// The LB's `ip_versions` (sorted: `[4]`, `[6]` or `[4, 6]`) for a Service with `spec`
/// on a platform cluster carrying `platform` (`cluster_id` names it in refusals).
pub fn lb_ip_versions(spec: &ServiceSpec, platform: &[IpVersion], cluster_id: &str) -> Result<Vec<IpVersion>, Refusal> {
    let policy = FamilyPolicy::of(spec)?;
    let families = service_families(spec)?;
    let has = |v: IpVersion| platform.contains(&v) || (v == IpVersion::V4 && platform.is_empty());
    // What the Service needs of a family the platform cluster lacks.
    let lacks = |field: &str, missing: IpVersion, what: &str| {
        let message = format!(
            "{what}, and platform cluster {cluster_id} has no {} (its subnet has no {} range); no load balancer is made",
            family_name(missing),
            family_name(missing),
        );
        match missing {
            IpVersion::V6 => Refusal::ipv6_unavailable(field, message),
            IpVersion::V4 => Refusal::unsupported(field, message),
        }
    };
    let mut want: Vec<IpVersion> = match policy {
        FamilyPolicy::SingleStack => {
            let one = families[0];
            if !has(one) {
                let what = format!(
                    "an {} Service needs an {} public IP",
                    family_name(one),
                    family_name(one)
                );
                return Err(lacks("spec.ipFamilies", one, &what));
            }
            vec![one]
        }
        FamilyPolicy::PreferDualStack => {
            let usable: Vec<IpVersion> = families.iter().copied().filter(|v| has(*v)).collect();
            if usable.is_empty() {
                let one = families[0];
                let what = format!("PreferDualStack with only {} in spec.ipFamilies", family_name(one));
                return Err(lacks("spec.ipFamilies", one, &what));
            }
            usable
        }
        FamilyPolicy::RequireDualStack => {
            if let Some(missing) = [IpVersion::V4, IpVersion::V6].into_iter().find(|v| !has(*v)) {
                let what = format!("RequireDualStack needs an {} public IP", family_name(missing));
                return Err(lacks("spec.ipFamilyPolicy", missing, &what));
            }
            vec![IpVersion::V4, IpVersion::V6]
        }
    };
    want.sort();
    want.dedup();
    Ok(want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use IpVersion::{V4, V6};

    fn spec(families: Option<&[&str]>, policy: Option<&str>) -> ServiceSpec {
        ServiceSpec {
            ip_families: families.map(|f| f.iter().map(|s| (*s).to_owned()).collect()),
            ip_family_policy: policy.map(str::to_owned),
            ..ServiceSpec::default()
        }
    }

    /// Every policy and family list on a dual-stack and on an IPv4-only platform cluster.
    #[test]
    fn families_decide_the_lb_ip_versions() {
        let dual = [V4, V6];
        let v4 = [V4];
        type Case<'a> = (
            Option<&'a [&'a str]>,
            Option<&'a str>,
            &'a [IpVersion],
            Result<Vec<IpVersion>, &'a str>,
        );
        let cases: &[Case] = &[
            // Unset: IPv4 as before, whatever the platform has.
            (None, None, &v4, Ok(vec![V4])),
            (None, None, &dual, Ok(vec![V4])),
            (Some(&[]), None, &dual, Ok(vec![V4])),
            // SingleStack: the one family.
            (Some(&["IPv4"]), Some("SingleStack"), &dual, Ok(vec![V4])),
            (Some(&["IPv6"]), Some("SingleStack"), &dual, Ok(vec![V6])),
            (Some(&["IPv6"]), None, &dual, Ok(vec![V6])),
            (Some(&["IPv6"]), Some("SingleStack"), &v4, Err("IPv6Unavailable")),
            (Some(&["IPv4"]), Some("SingleStack"), &v4, Ok(vec![V4])),
            // PreferDualStack: what the Service lists and the platform has.
            (
                Some(&["IPv4", "IPv6"]),
                Some("PreferDualStack"),
                &dual,
                Ok(vec![V4, V6]),
            ),
            (
                Some(&["IPv6", "IPv4"]),
                Some("PreferDualStack"),
                &dual,
                Ok(vec![V4, V6]),
            ),
            (Some(&["IPv4", "IPv6"]), Some("PreferDualStack"), &v4, Ok(vec![V4])),
            (Some(&["IPv6", "IPv4"]), Some("PreferDualStack"), &v4, Ok(vec![V4])),
            // A single-stack Kubernetes cluster gives PreferDualStack one family.
            (Some(&["IPv4"]), Some("PreferDualStack"), &dual, Ok(vec![V4])),
            (Some(&["IPv6"]), Some("PreferDualStack"), &v4, Err("IPv6Unavailable")),
            // RequireDualStack: both, or a refusal.
            (
                Some(&["IPv4", "IPv6"]),
                Some("RequireDualStack"),
                &dual,
                Ok(vec![V4, V6]),
            ),
            (
                Some(&["IPv6", "IPv4"]),
                Some("RequireDualStack"),
                &dual,
                Ok(vec![V4, V6]),
            ),
            (
                Some(&["IPv4", "IPv6"]),
                Some("RequireDualStack"),
                &v4,
                Err("IPv6Unavailable"),
            ),
            // An empty platform list (never sent; absent reads as [4]) is IPv4.
            (Some(&["IPv4"]), None, &[], Ok(vec![V4])),
            // Invalid input: a clear refusal of the field.
            (Some(&["IPv5"]), None, &dual, Err("UnsupportedServiceSpec")),
            (
                Some(&["IPv4", "IPv4"]),
                Some("PreferDualStack"),
                &dual,
                Err("UnsupportedServiceSpec"),
            ),
            (Some(&["IPv4"]), Some("DualStack"), &dual, Err("UnsupportedServiceSpec")),
        ];
        for (families, policy, platform, want) in cases {
            let got = lb_ip_versions(&spec(*families, *policy), platform, "cl-1");
            let what = format!("{families:?} {policy:?} on {platform:?}");
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(&g, w, "{what}"),
                (Err(reason), Err(r)) => assert_eq!(r.reason(), *reason, "{what}: {r}"),
                (w, g) => panic!("{what}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn refusals_say_what_and_why() {
        let e = lb_ip_versions(&spec(Some(&["IPv4", "IPv6"]), Some("RequireDualStack")), &[V4], "cl-1")
            .expect_err("refused");
        let msg = e.to_string();
        assert!(msg.starts_with("spec.ipFamilyPolicy: RequireDualStack"), "{msg}");
        assert!(msg.contains("cl-1 has no IPv6"), "{msg}");
        let e = lb_ip_versions(&spec(Some(&["IPv6"]), None), &[V4], "cl-9").expect_err("refused");
        assert!(
            e.to_string()
                .starts_with("spec.ipFamilies: an IPv6 Service needs an IPv6 public IP"),
            "{e}"
        );
        assert!(e.to_string().contains("cl-9"), "{e}");
        let e = lb_ip_versions(&spec(Some(&["IPv4", "ipv6"]), None), &[V4], "cl-1").expect_err("refused");
        assert!(e.to_string().starts_with("spec.ipFamilies[1]: \"ipv6\""), "{e}");
    }
}

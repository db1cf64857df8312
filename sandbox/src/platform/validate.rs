//! Pure validation of request bodies (docs/platform-api.md, "Validation"): each function
//! returns the per-field errors of a 422, with nothing to look up but its arguments.

use std::collections::{HashMap, HashSet};

use ipnet::IpNet;

use super::error::FieldError;
use super::model::{
    Algorithm, BackendInput, HealthCheck, HealthCheckInput, HealthCheckProtocol, IpVersion, Labels, LbBackend, LbInput,
    Protocol, PublicIp, Rule, RuleInput, Vm, VmState,
};

pub const MAX_RULES: usize = 50;
pub const MAX_BACKENDS: usize = 100;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY: usize = 253;
pub const MAX_LABEL_VALUE: usize = 63;

/// The writable set of an LB once validated (the name is checked on its own).
#[derive(Debug, Clone, PartialEq)]
pub struct LbSpec {
    pub labels: Labels,
    pub rules: Vec<Rule>,
    pub backends: Vec<LbBackend>,
}

/// Validates rules, backends and labels of a create or update body.
pub fn lb_spec(input: &LbInput, udp_enabled: bool, vms: &[Vm], subnet_id: &str) -> Result<LbSpec, Vec<FieldError>> {
    let mut errors = Vec::new();
    let labels = input.labels.clone().unwrap_or_default();
    errors.extend(self::labels("labels", &labels));
    let rules = rules(input.rules.as_deref(), udp_enabled, &mut errors);
    let backends = backends(
        input.backends.as_deref().unwrap_or_default(),
        vms,
        subnet_id,
        &mut errors,
    );
    if errors.is_empty() {
        Ok(LbSpec {
            labels,
            rules,
            backends,
        })
    } else {
        Err(errors)
    }
}

/// An LB name: 1–63 of lowercase letters, digits and `-`, starting with a letter.
pub fn lb_name(name: Option<&str>) -> Vec<FieldError> {
    let Some(name) = name else {
        return vec![FieldError::new("name", "is required")];
    };
    let len = name.chars().count();
    if !(1..=63).contains(&len) {
        return vec![FieldError::new(
            "name",
            format!("must be 1 to 63 characters, got {len}"),
        )];
    }
    let starts_with_letter = name.starts_with(|c: char| c.is_ascii_lowercase());
    if !starts_with_letter || !name.chars().all(is_dns_char) {
        return vec![FieldError::new(
            "name",
            "must contain only lowercase letters, digits and '-', and start with a letter",
        )];
    }
    Vec::new()
}

fn is_dns_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

/// Labels of any object; `field` is where they sit in the body (`labels`).
pub fn labels(field: &str, labels: &Labels) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if labels.len() > MAX_LABELS {
        errors.push(FieldError::new(
            field,
            format!("at most {MAX_LABELS} labels, got {}", labels.len()),
        ));
    }
    for (key, value) in labels {
        let key_len = key.chars().count();
        if !(1..=MAX_LABEL_KEY).contains(&key_len) {
            errors.push(FieldError::new(
                format!("{field}.{key}"),
                format!("key must be 1 to {MAX_LABEL_KEY} characters, got {key_len}"),
            ));
        }
        let value_len = value.chars().count();
        if value_len > MAX_LABEL_VALUE {
            errors.push(FieldError::new(
                format!("{field}.{key}"),
                format!("value must be at most {MAX_LABEL_VALUE} characters, got {value_len}"),
            ));
        }
    }
    errors
}

/// The rules of an LB, with health-check defaults filled in. Errors go to `errors`; the
/// returned rules are only meaningful when none were added.
pub fn rules(input: Option<&[RuleInput]>, udp_enabled: bool, errors: &mut Vec<FieldError>) -> Vec<Rule> {
    let input = input.unwrap_or_default();
    if input.is_empty() {
        errors.push(FieldError::new("rules", "at least 1 rule is required"));
        return Vec::new();
    }
    if input.len() > MAX_RULES {
        errors.push(FieldError::new(
            "rules",
            format!("at most {MAX_RULES} rules, got {}", input.len()),
        ));
        return Vec::new();
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut listens: HashMap<(Protocol, u16), usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, rule) in input.iter().enumerate() {
        let at = |f: &str| format!("rules[{i}].{f}");
        let before = errors.len();

        let name = rule.name.as_deref().unwrap_or_default();
        let len = name.chars().count();
        if rule.name.is_none() {
            errors.push(FieldError::new(at("name"), "is required"));
        } else if !(1..=63).contains(&len) || !name.chars().all(is_dns_char) {
            errors.push(FieldError::new(
                at("name"),
                "must be 1 to 63 characters of lowercase letters, digits and '-'",
            ));
        } else if let Some(first) = names.insert(name, i) {
            errors.push(FieldError::new(
                at("name"),
                format!("duplicate rule name {name:?} (also rules[{first}])"),
            ));
        }

        let protocol = match rule.protocol.as_deref() {
            None => {
                errors.push(FieldError::new(at("protocol"), "is required"));
                None
            }
            Some("tcp") => Some(Protocol::Tcp),
            Some("udp") if udp_enabled => Some(Protocol::Udp),
            Some("udp") => {
                errors.push(FieldError::new(at("protocol"), "udp is not supported"));
                None
            }
            Some(other) => {
                errors.push(FieldError::new(
                    at("protocol"),
                    format!("must be tcp or udp, got {other:?}"),
                ));
                None
            }
        };

        let public_port = port(rule.public_port, &at("public_port"), errors);
        let private_port = port(rule.private_port, &at("private_port"), errors);
        if let (Some(protocol), Some(public_port)) = (protocol, public_port)
            && let Some(first) = listens.insert((protocol, public_port), i)
        {
            errors.push(FieldError::new(
                at("public_port"),
                format!(
                    "{} port {public_port} is already used by rules[{first}]",
                    protocol_name(protocol)
                ),
            ));
        }

        let algorithm = match rule.algorithm.as_deref() {
            None | Some("round_robin") => Algorithm::RoundRobin,
            Some("least_connection") => Algorithm::LeastConnection,
            Some("source") => Algorithm::Source,
            Some(other) => {
                errors.push(FieldError::new(
                    at("algorithm"),
                    format!("must be round_robin, least_connection or source, got {other:?}"),
                ));
                Algorithm::RoundRobin
            }
        };

        let mut allowed_sources = Vec::new();
        for (j, source) in rule.allowed_sources.as_deref().unwrap_or_default().iter().enumerate() {
            match source.parse::<IpNet>() {
                Ok(net) => allowed_sources.push(net),
                Err(_) => errors.push(FieldError::new(
                    at(&format!("allowed_sources[{j}]")),
                    format!("must be a CIDR such as 10.0.0.0/8, got {source:?}"),
                )),
            }
        }

        let health_check = health_check(rule.health_check.as_ref(), private_port, &at("health_check"), errors);

        if errors.len() == before
            && let (Some(protocol), Some(public_port), Some(private_port), Some(health_check)) =
                (protocol, public_port, private_port, health_check)
        {
            out.push(Rule {
                name: name.to_string(),
                protocol,
                public_port,
                private_port,
                algorithm,
                allowed_sources,
                health_check,
            });
        }
    }
    out
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

fn port(value: Option<i64>, field: &str, errors: &mut Vec<FieldError>) -> Option<u16> {
    match value {
        None => {
            errors.push(FieldError::new(field, "is required"));
            None
        }
        Some(p) => match u16::try_from(p) {
            Ok(p) if p >= 1 => Some(p),
            _ => {
                errors.push(FieldError::new(field, "must be between 1 and 65535"));
                None
            }
        },
    }
}

fn bounded(
    value: Option<i64>,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
    field: String,
    errors: &mut Vec<FieldError>,
) -> Option<u32> {
    let Some(v) = value else {
        return Some(default);
    };
    match u32::try_from(v) {
        Ok(v) if range.contains(&v) => Some(v),
        _ => {
            errors.push(FieldError::new(
                field,
                format!("must be between {} and {}", range.start(), range.end()),
            ));
            None
        }
    }
}

/// A rule's health check with defaults (TCP connect to the private port, every 10 s,
/// 5 s timeout, thresholds 3). `private_port` is `None` when the rule's own was invalid.
pub fn health_check(
    input: Option<&HealthCheckInput>,
    private_port: Option<u16>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<HealthCheck> {
    let default = HealthCheckInput::default();
    let input = input.unwrap_or(&default);
    let at = |f: &str| format!("{field}.{f}");
    let before = errors.len();

    let protocol = match input.protocol.as_deref() {
        None | Some("tcp") => HealthCheckProtocol::Tcp,
        Some("http") => HealthCheckProtocol::Http,
        Some(other) => {
            errors.push(FieldError::new(
                at("protocol"),
                format!("must be tcp or http, got {other:?}"),
            ));
            HealthCheckProtocol::Tcp
        }
    };
    let port = match input.port {
        None => private_port,
        Some(_) => self::port(input.port, &at("port"), errors),
    };
    // The path only means something to HTTP checks; a TCP check ignores it.
    let path = match protocol {
        HealthCheckProtocol::Tcp => None,
        HealthCheckProtocol::Http => {
            let path = input.path.clone().unwrap_or_else(|| "/".to_string());
            if !path.starts_with('/') {
                errors.push(FieldError::new(
                    at("path"),
                    format!("must start with '/', got {path:?}"),
                ));
            }
            Some(path)
        }
    };
    let interval_s = bounded(input.interval_s, 10, 1..=300, at("interval_s"), errors);
    let timeout_s = bounded(input.timeout_s, 5, 1..=60, at("timeout_s"), errors);
    if let (Some(interval), Some(timeout)) = (interval_s, timeout_s)
        && timeout >= interval
    {
        errors.push(FieldError::new(
            at("timeout_s"),
            format!("must be below interval_s ({interval})"),
        ));
    }
    let healthy_threshold = bounded(input.healthy_threshold, 3, 1..=10, at("healthy_threshold"), errors);
    let unhealthy_threshold = bounded(input.unhealthy_threshold, 3, 1..=10, at("unhealthy_threshold"), errors);
    if errors.len() != before {
        return None;
    }
    Some(HealthCheck {
        protocol,
        port: port?,
        path,
        interval_s: interval_s?,
        timeout_s: timeout_s?,
        healthy_threshold: healthy_threshold?,
        unhealthy_threshold: unhealthy_threshold?,
    })
}

/// Backends: distinct, existing, running VMs of `subnet_id`, with their private IPs.
pub fn backends(input: &[BackendInput], vms: &[Vm], subnet_id: &str, errors: &mut Vec<FieldError>) -> Vec<LbBackend> {
    if input.len() > MAX_BACKENDS {
        errors.push(FieldError::new(
            "backends",
            format!("at most {MAX_BACKENDS} backends, got {}", input.len()),
        ));
        return Vec::new();
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, backend) in input.iter().enumerate() {
        let field = format!("backends[{i}].vm_id");
        let Some(vm_id) = backend.vm_id.as_deref() else {
            errors.push(FieldError::new(field, "is required"));
            continue;
        };
        if !seen.insert(vm_id) {
            errors.push(FieldError::new(field, format!("duplicate vm_id {vm_id}")));
            continue;
        }
        let Some(vm) = vms.iter().find(|vm| vm.id == vm_id && vm.state != VmState::Deleted) else {
            errors.push(FieldError::new(field, format!("VM {vm_id} does not exist")));
            continue;
        };
        if vm.state != VmState::Running {
            let state = serde_json::to_value(vm.state).unwrap_or_default();
            errors.push(FieldError::new(
                field,
                format!(
                    "VM {vm_id} is not running (state {})",
                    state.as_str().unwrap_or("unknown")
                ),
            ));
            continue;
        }
        if vm.subnet_id != subnet_id {
            errors.push(FieldError::new(
                field,
                format!("VM {vm_id} is not in subnet {subnet_id}"),
            ));
            continue;
        }
        out.push(LbBackend {
            vm_id: vm.id.clone(),
            private_ip: vm.private_ip,
            private_ipv6: vm.private_ipv6,
        });
    }
    out
}

/// The `ip_versions` of a create or `PUT` body (`None`: `current`, i.e. `[4]` on create
/// and unchanged on `PUT`): one or two distinct of 4 and 6, 6 only in a cluster that has
/// IPv6. Answered in order, `[4, 6]`.
pub fn ip_versions(
    input: Option<&[i64]>,
    current: &[IpVersion],
    cluster_id: &str,
    cluster_has_ipv6: bool,
) -> Result<Vec<IpVersion>, FieldError> {
    let Some(input) = input else {
        return Ok(current.to_vec());
    };
    let field = "ip_versions";
    if input.is_empty() {
        return Err(FieldError::new(field, "must list 4, 6 or both"));
    }
    let mut out = Vec::new();
    for &n in input {
        let Some(v) = IpVersion::from_number(n) else {
            return Err(FieldError::new(field, format!("must contain only 4 and 6, got {n}")));
        };
        if out.contains(&v) {
            return Err(FieldError::new(field, format!("{n} is repeated")));
        }
        out.push(v);
    }
    out.sort();
    if out.contains(&IpVersion::V6) && !cluster_has_ipv6 {
        return Err(FieldError::new(field, format!("cluster {cluster_id} has no IPv6")));
    }
    Ok(out)
}

/// Where an LB's public IP of one family comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum IpSource {
    /// The family is not in `ip_versions`: no IP.
    None,
    /// The platform acquires one from the region's pool.
    Acquire,
    /// The caller's IP, attached (free-ness is checked later: a 409, not a 422).
    Attach(PublicIp),
}

/// Decides the public IP of `family` on create from `ip_versions` and the id given in
/// `field` (`public_ip_id` or `public_ipv6_id`), looked up as `found`: an id for a family
/// not in `ip_versions`, an unknown id, one in another region, or one of the other family
/// is a 422 on `field`.
pub fn ip_source(
    family: IpVersion,
    versions: &[IpVersion],
    field: &str,
    id: Option<&str>,
    found: Option<&PublicIp>,
    region: &str,
) -> Result<IpSource, FieldError> {
    let wanted = versions.contains(&family);
    let Some(id) = id else {
        return Ok(if wanted { IpSource::Acquire } else { IpSource::None });
    };
    if !wanted {
        return Err(FieldError::new(
            field,
            format!("given, but {} is not in ip_versions", family.number()),
        ));
    }
    let Some(ip) = found else {
        return Err(FieldError::new(field, format!("public IP {id} does not exist")));
    };
    if ip.region != region {
        return Err(FieldError::new(
            field,
            format!("public IP {id} is in region {}, not {region}", ip.region),
        ));
    }
    if ip.version != family {
        return Err(FieldError::new(
            field,
            format!("public IP {id} is {}, not {}", ip.version.name(), family.name()),
        ));
    }
    Ok(IpSource::Attach(ip.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn rule(name: &str, protocol: &str, public: i64, private: i64) -> RuleInput {
        RuleInput {
            name: Some(name.into()),
            protocol: Some(protocol.into()),
            public_port: Some(public),
            private_port: Some(private),
            ..Default::default()
        }
    }

    fn vm(id: &str, state: VmState, subnet: &str) -> Vm {
        Vm {
            id: id.into(),
            name: id.into(),
            region: "jkt".into(),
            zone: "jkt-a".into(),
            package: "standard-2".into(),
            state,
            private_ip: Ipv4Addr::new(127, 10, 0, 11),
            public_ip: None,
            private_ipv6: None,
            vpc_id: "vpc-1".into(),
            subnet_id: subnet.into(),
            labels: Labels::new(),
            created_at: String::new(),
        }
    }

    #[test]
    fn ip_versions_rules() {
        use IpVersion::{V4, V6};
        assert_eq!(ip_versions(None, &[V4], "cl-1", false), Ok(vec![V4]));
        assert_eq!(ip_versions(None, &[V4, V6], "cl-1", true), Ok(vec![V4, V6]));
        assert_eq!(ip_versions(Some(&[6, 4]), &[V4], "cl-1", true), Ok(vec![V4, V6]));
        assert_eq!(ip_versions(Some(&[6]), &[V4], "cl-1", true), Ok(vec![V6]));
        for bad in [&[][..], &[4, 4], &[5], &[4, 6, 4], &[0]] {
            let e = ip_versions(Some(bad), &[V4], "cl-1", true).unwrap_err();
            assert_eq!(e.field, "ip_versions", "{bad:?}");
        }
        let e = ip_versions(Some(&[4, 6]), &[V4], "cl-1", false).unwrap_err();
        assert_eq!(e, FieldError::new("ip_versions", "cluster cl-1 has no IPv6"));
        assert_eq!(ip_versions(Some(&[4]), &[V4], "cl-1", false), Ok(vec![V4]));
    }

    #[test]
    fn ip_source_rules() {
        use IpVersion::{V4, V6};
        let ip = |id: &str, address: &str, region: &str| PublicIp {
            id: id.into(),
            address: address.parse().unwrap(),
            version: IpVersion::of(address.parse().unwrap()),
            region: region.into(),
            labels: Labels::new(),
            attached_to: None,
        };
        let v4 = ip("ip-4", "127.203.0.11", "jkt");
        let v6 = ip("ip-6", "fd00:203::b", "jkt");
        let far = ip("ip-far", "fd00:203::c", "sby");
        let dual = [V4, V6];
        assert_eq!(
            ip_source(V6, &dual, "public_ipv6_id", None, None, "jkt"),
            Ok(IpSource::Acquire)
        );
        assert_eq!(
            ip_source(V6, &[V4], "public_ipv6_id", None, None, "jkt"),
            Ok(IpSource::None)
        );
        assert_eq!(
            ip_source(V6, &dual, "public_ipv6_id", Some("ip-6"), Some(&v6), "jkt"),
            Ok(IpSource::Attach(v6.clone()))
        );
        let field_of = |r: Result<IpSource, FieldError>| r.unwrap_err().field;
        // An id for a family the LB does not have.
        assert_eq!(
            field_of(ip_source(V6, &[V4], "public_ipv6_id", Some("ip-6"), Some(&v6), "jkt")),
            "public_ipv6_id"
        );
        assert_eq!(
            field_of(ip_source(V4, &[V6], "public_ip_id", Some("ip-4"), Some(&v4), "jkt")),
            "public_ip_id"
        );
        // Unknown, other region, other family.
        assert_eq!(
            field_of(ip_source(V6, &dual, "public_ipv6_id", Some("ip-x"), None, "jkt")),
            "public_ipv6_id"
        );
        assert_eq!(
            field_of(ip_source(
                V6,
                &dual,
                "public_ipv6_id",
                Some("ip-far"),
                Some(&far),
                "jkt"
            )),
            "public_ipv6_id"
        );
        let e = ip_source(V6, &dual, "public_ipv6_id", Some("ip-4"), Some(&v4), "jkt").unwrap_err();
        assert_eq!(e.message, "public IP ip-4 is IPv4, not IPv6");
        let e = ip_source(V4, &dual, "public_ip_id", Some("ip-6"), Some(&v6), "jkt").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("public_ip_id", "public IP ip-6 is IPv6, not IPv4")
        );
    }

    fn fields(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn names() {
        assert!(lb_name(Some("kr-cl1-default-web")).is_empty());
        assert!(lb_name(Some("a")).is_empty());
        assert_eq!(lb_name(None)[0].message, "is required");
        for bad in ["", "1abc", "-a", "Abc", "a_b", "a.b", &"a".repeat(64)] {
            assert_eq!(fields(&lb_name(Some(bad))), vec!["name"], "{bad:?}");
        }
    }

    #[test]
    fn label_limits() {
        let mut l = Labels::new();
        l.insert("k".repeat(253), "v".repeat(63));
        assert!(labels("labels", &l).is_empty());
        l.insert("k".repeat(254), "v".into());
        l.insert("ok".into(), "v".repeat(64));
        l.insert(String::new(), "v".into());
        let errs = labels("labels", &l);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs.iter().any(|e| e.field == "labels.ok"));
        let many: Labels = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        assert_eq!(fields(&labels("labels", &many)), vec!["labels"]);
    }

    #[test]
    fn rule_defaults_are_filled() {
        let mut errors = Vec::new();
        let rules = rules(Some(&[rule("http", "tcp", 80, 31080)]), true, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let r = &rules[0];
        assert_eq!(r.algorithm, Algorithm::RoundRobin);
        assert!(r.allowed_sources.is_empty());
        assert_eq!(
            r.health_check,
            HealthCheck {
                protocol: HealthCheckProtocol::Tcp,
                port: 31080,
                path: None,
                interval_s: 10,
                timeout_s: 5,
                healthy_threshold: 3,
                unhealthy_threshold: 3,
            }
        );
    }

    #[test]
    fn http_health_check_defaults_path() {
        let mut errors = Vec::new();
        let hc = HealthCheckInput {
            protocol: Some("http".into()),
            port: Some(10256),
            ..Default::default()
        };
        let hc = health_check(Some(&hc), Some(31080), "hc", &mut errors).unwrap();
        assert_eq!(hc.path.as_deref(), Some("/"));
        assert_eq!(hc.port, 10256);
    }

    #[test]
    fn rule_errors_name_their_field() {
        let mut bad_hc = rule("b", "tcp", 81, 1);
        bad_hc.health_check = Some(HealthCheckInput {
            protocol: Some("http".into()),
            path: Some("healthz".into()),
            interval_s: Some(3),
            timeout_s: Some(3),
            healthy_threshold: Some(0),
            unhealthy_threshold: Some(11),
            port: Some(0),
        });
        let mut bad_misc = rule("c", "tcp", 82, 2);
        bad_misc.algorithm = Some("random".into());
        bad_misc.allowed_sources = Some(vec!["10.0.0.0/8".into(), "nope".into()]);
        let input = vec![
            rule("http", "tcp", 0, 70000),
            bad_hc,
            bad_misc,
            rule("http", "udp", 80, 1),
            rule("d", "sctp", 80, 1),
            rule("Bad_Name", "tcp", 83, 1),
            RuleInput::default(),
        ];
        let mut errors = Vec::new();
        rules(Some(&input), false, &mut errors);
        let f = fields(&errors);
        for expected in [
            "rules[0].public_port",
            "rules[0].private_port",
            "rules[1].health_check.port",
            "rules[1].health_check.path",
            "rules[1].health_check.timeout_s",
            "rules[1].health_check.healthy_threshold",
            "rules[1].health_check.unhealthy_threshold",
            "rules[2].algorithm",
            "rules[2].allowed_sources[1]",
            "rules[3].name",
            "rules[3].protocol",
            "rules[4].protocol",
            "rules[5].name",
            "rules[6].name",
            "rules[6].protocol",
            "rules[6].public_port",
            "rules[6].private_port",
        ] {
            assert!(f.contains(&expected), "missing {expected} in {f:?}");
        }
        let udp = errors.iter().find(|e| e.field == "rules[3].protocol").unwrap();
        assert_eq!(udp.message, "udp is not supported");
        let port = errors.iter().find(|e| e.field == "rules[0].public_port").unwrap();
        assert_eq!(port.message, "must be between 1 and 65535");
    }

    #[test]
    fn same_port_different_protocols_is_fine() {
        let mut errors = Vec::new();
        let out = rules(
            Some(&[rule("a", "tcp", 53, 30053), rule("b", "udp", 53, 30053)]),
            true,
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(out.len(), 2);
        rules(
            Some(&[rule("a", "tcp", 53, 1), rule("b", "tcp", 53, 2)]),
            true,
            &mut errors,
        );
        assert_eq!(fields(&errors), vec!["rules[1].public_port"]);
    }

    #[test]
    fn rule_count_limits() {
        let mut errors = Vec::new();
        rules(None, true, &mut errors);
        rules(Some(&[]), true, &mut errors);
        let many: Vec<RuleInput> = (0..51).map(|i| rule(&format!("r{i}"), "tcp", 1000 + i, 1)).collect();
        rules(Some(&many), true, &mut errors);
        assert_eq!(fields(&errors), vec!["rules", "rules", "rules"]);
    }

    #[test]
    fn backend_checks() {
        let vms = vec![
            vm("vm-1", VmState::Running, "subnet-1"),
            vm("vm-2", VmState::Stopped, "subnet-1"),
            vm("vm-3", VmState::Running, "subnet-2"),
        ];
        let input: Vec<BackendInput> = ["vm-1", "vm-1", "vm-2", "vm-3", "vm-9"]
            .iter()
            .map(|id| BackendInput {
                vm_id: Some(id.to_string()),
            })
            .chain([BackendInput::default()])
            .collect();
        let mut errors = Vec::new();
        let out = backends(&input, &vms, "subnet-1", &mut errors);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].private_ip, Ipv4Addr::new(127, 10, 0, 11));
        let messages: Vec<String> = errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect();
        assert_eq!(
            messages,
            vec![
                "backends[1].vm_id: duplicate vm_id vm-1",
                "backends[2].vm_id: VM vm-2 is not running (state stopped)",
                "backends[3].vm_id: VM vm-3 is not in subnet subnet-1",
                "backends[4].vm_id: VM vm-9 does not exist",
                "backends[5].vm_id: is required",
            ]
        );
        let mut errors = Vec::new();
        assert!(backends(&[], &vms, "subnet-1", &mut errors).is_empty());
        assert!(errors.is_empty());
    }

    #[test]
    fn spec_collects_everything() {
        let input = LbInput {
            name: Some("web".into()),
            labels: Some(Labels::from([("a".to_string(), "v".repeat(64))])),
            rules: None,
            ..Default::default()
        };
        let errs = lb_spec(&input, true, &[], "subnet-1").unwrap_err();
        assert_eq!(fields(&errs), vec!["labels.a", "rules"]);
    }
}

//! The `lb.cloudraya.com/` Service annotations: one typed table, its getters, and the
//! renderer of `docs/annotations.md`.
//!
//! Every key is a constant with its `Type` and `Default`. Getters return
//! `Result<Option<T>, AnnotationError>`: `Ok(None)` when the annotation is not set,
//! `Err` (naming the annotation and the allowed values) when it is set to something we
//! cannot use. [`LbAnnotations::parse`] reads all of them at once and also refuses unknown
//! keys under the prefix, so a typo is reported instead of silently ignored.
//!
//! `docs/annotations.md` is generated from [`TABLE`] by [`render_markdown`]; a test fails
//! when the committed file drifts. Regenerate it with
//! `UPDATE_DOCS=1 cargo test -p kuberaya-ccm annotations_doc_is_current`.

use std::collections::BTreeMap;
use std::fmt;

use crate::platform::{Algorithm, HealthCheckProtocol};

/// Annotations of a Kubernetes object.
pub type Annotations = BTreeMap<String, String>;

/// The common prefix of our annotations.
pub const PREFIX: &str = "lb.cloudraya.com/";

/// The balancing algorithm of every rule.
///
/// Type: string, one of `round_robin`, `least_connection`, `source`.
/// Default: `source` when `spec.sessionAffinity` is `ClientIP`, else `round_robin`.
pub const ALGORITHM: &str = "lb.cloudraya.com/algorithm";

/// The platform name of the load balancer.
///
/// Type: string, 1–63 characters of `[a-z0-9-]` starting with a letter.
/// Default: `kr-<namespace>-<name>` (shortened with a hash when longer than 63).
/// Read-only after creation (the platform cannot rename a load balancer).
pub const NAME: &str = "lb.cloudraya.com/name";

/// The health-check protocol.
///
/// Type: string, `http` or `tcp`.
/// Default: `http`.
pub const HEALTH_CHECK_PROTOCOL: &str = "lb.cloudraya.com/health-check-protocol";

/// The health-check port on the nodes.
///
/// Type: integer 1–65535.
/// Default: `spec.healthCheckNodePort` with `externalTrafficPolicy: Local`, else 10256
/// (kube-proxy's health port); with `tcp`, each rule's node port.
pub const HEALTH_CHECK_PORT: &str = "lb.cloudraya.com/health-check-port";

/// The HTTP health-check path.
///
/// Type: string starting with `/`.
/// Default: `/healthz`.
pub const HEALTH_CHECK_PATH: &str = "lb.cloudraya.com/health-check-path";

/// Seconds between health checks.
///
/// Type: integer 1–300.
/// Default: 5.
pub const HEALTH_CHECK_INTERVAL: &str = "lb.cloudraya.com/health-check-interval";

/// Seconds a health check may take; below the interval.
///
/// Type: integer 1–60.
/// Default: 3.
pub const HEALTH_CHECK_TIMEOUT: &str = "lb.cloudraya.com/health-check-timeout";

/// Successes in a row before a backend is healthy again.
///
/// Type: integer 1–10.
/// Default: 2.
pub const HEALTH_CHECK_HEALTHY_THRESHOLD: &str = "lb.cloudraya.com/health-check-healthy-threshold";

/// Failures in a row before a backend is unhealthy.
///
/// Type: integer 1–10.
/// Default: 3.
pub const HEALTH_CHECK_UNHEALTHY_THRESHOLD: &str = "lb.cloudraya.com/health-check-unhealthy-threshold";

/// Reuse this existing (free, same-region) public IP instead of acquiring one.
///
/// Type: string, a platform public IP ID (`ip-...`).
/// Default: unset (the platform acquires a new IP, released with the load balancer).
/// Read-only after creation.
pub const PUBLIC_IP_ID: &str = "lb.cloudraya.com/public-ip-id";

/// Keep the public IP when the load balancer is deleted.
///
/// Type: boolean, `true` or `false`.
/// Default: `false` (an IP the platform acquired is released; a reused IP is always kept).
pub const RETAIN_PUBLIC_IP: &str = "lb.cloudraya.com/retain-public-ip";

/// Only nodes whose labels match this selector become backends.
///
/// Type: label selector, comma-separated `key=value`, `key!=value`, `key`, `!key`.
/// Default: unset (every eligible node).
pub const NODE_SELECTOR: &str = "lb.cloudraya.com/node-selector";

/// PROXY protocol towards the backends. **Not supported by the CloudRaya platform**:
/// `true` is refused, `false` is accepted and changes nothing.
///
/// Type: boolean.
/// Default: `false`.
pub const PROXY_PROTOCOL: &str = "lb.cloudraya.com/proxy-protocol";

/// One row of the reference table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnotationDoc {
    pub key: &'static str,
    pub ty: &'static str,
    pub default: &'static str,
    pub description: &'static str,
    /// Cannot change once the load balancer exists.
    pub read_only: bool,
}

/// Every annotation we read, in the order of the reference page.
pub const TABLE: &[AnnotationDoc] = &[
    AnnotationDoc {
        key: ALGORITHM,
        ty: "`round_robin` \\| `least_connection` \\| `source`",
        default: "`source` with `sessionAffinity: ClientIP`, else `round_robin`",
        description: "Balancing algorithm of every rule.",
        read_only: false,
    },
    AnnotationDoc {
        key: NAME,
        ty: "string, 1–63 of `[a-z0-9-]`, starting with a letter",
        default: "`kr-<namespace>-<name>` (hashed when too long)",
        description: "Platform name of the load balancer; unique in the cluster. A name an LB already carries stays with that LB's Service; a name two Services want and neither holds goes to the older Service (`creationTimestamp`, then UID), and the other is refused (`LoadBalancerNameTaken`, naming it).",
        read_only: true,
    },
    AnnotationDoc {
        key: HEALTH_CHECK_PROTOCOL,
        ty: "`http` \\| `tcp`",
        default: "`http`",
        description: "Health-check protocol.",
        read_only: false,
    },
    AnnotationDoc {
        key: HEALTH_CHECK_PORT,
        ty: "integer 1–65535",
        default: "`healthCheckNodePort` (`externalTrafficPolicy: Local`), else 10256 (kube-proxy); with `tcp`, the rule's node port",
        description: "Health-check port on the nodes.",
        read_only: false,
    },
    AnnotationDoc {
        key: HEALTH_CHECK_PATH,
        ty: "string starting with `/`",
        default: "`/healthz`",
        description: "HTTP health-check path (ignored with `tcp`).",
        read_only: false,
    },
    AnnotationDoc {
        key: HEALTH_CHECK_INTERVAL,
        ty: "integer seconds 1–300",
        default: "5",
        description: "Time between health checks.",
        read_only: false,
    },
    AnnotationDoc {
        key: HEALTH_CHECK_TIMEOUT,
        ty: "integer seconds 1–60, below the interval",
        default: "3",
        description: "Time a health check may take.",
        read_only: false,
    },
    AnnotationDoc {
        key: HEALTH_CHECK_HEALTHY_THRESHOLD,
        ty: "integer 1–10",
        default: "2",
        description: "Successes in a row before a backend is healthy again.",
        read_only: false,
    },
    AnnotationDoc {
        key: HEALTH_CHECK_UNHEALTHY_THRESHOLD,
        ty: "integer 1–10",
        default: "3",
        description: "Failures in a row before a backend is unhealthy.",
        read_only: false,
    },
    AnnotationDoc {
        key: PUBLIC_IP_ID,
        ty: "string (platform public IP ID)",
        default: "unset: the platform acquires an IP",
        description: "Reuse this free public IP of the region. A reused IP is never released by us.",
        read_only: true,
    },
    AnnotationDoc {
        key: RETAIN_PUBLIC_IP,
        ty: "`true` \\| `false`",
        default: "`false`",
        description: "Keep the acquired public IP when the load balancer is deleted.",
        read_only: false,
    },
    AnnotationDoc {
        key: NODE_SELECTOR,
        ty: "label selector: `k=v`, `k!=v`, `k`, `!k`, comma-separated",
        default: "unset: every eligible node",
        description: "Only matching nodes become backends.",
        read_only: false,
    },
    AnnotationDoc {
        key: PROXY_PROTOCOL,
        ty: "`true` \\| `false`",
        default: "`false`",
        description: "**Not supported by the CloudRaya platform**: `true` is refused with a Warning Event.",
        read_only: false,
    },
];

/// An annotation set to a value we cannot use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationError {
    /// The full annotation key.
    pub key: String,
    /// The value as written.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
    /// The allowed values, for the message.
    pub allowed: String,
}

impl fmt::Display for AnnotationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid annotation {}={:?}: {}; allowed: {}",
            self.key, self.value, self.reason, self.allowed
        )
    }
}

impl std::error::Error for AnnotationError {}

fn invalid(key: &str, value: &str, reason: impl Into<String>, allowed: impl Into<String>) -> AnnotationError {
    AnnotationError {
        key: key.to_owned(),
        value: value.to_owned(),
        reason: reason.into(),
        allowed: allowed.into(),
    }
}

fn raw<'a>(a: &'a Annotations, key: &str) -> Option<&'a str> {
    a.get(key).map(|v| v.trim())
}

fn parse_bool(key: &str, v: &str) -> Result<bool, AnnotationError> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(key, v, "not a boolean", "true, false")),
    }
}

fn parse_range(key: &str, v: &str, min: u32, max: u32) -> Result<u32, AnnotationError> {
    let allowed = format!("an integer from {min} to {max}");
    let n: u32 = v
        .parse()
        .map_err(|_| invalid(key, v, "not an integer", allowed.clone()))?;
    if n < min || n > max {
        return Err(invalid(key, v, "out of range", allowed));
    }
    Ok(n)
}

/// [`ALGORITHM`].
pub fn algorithm(a: &Annotations) -> Result<Option<Algorithm>, AnnotationError> {
    let Some(v) = raw(a, ALGORITHM) else { return Ok(None) };
    match Algorithm::from(v) {
        Algorithm::Other(_) => Err(invalid(
            ALGORITHM,
            v,
            "unknown algorithm",
            "round_robin, least_connection, source",
        )),
        known => Ok(Some(known)),
    }
}

/// Whether `s` is a valid platform load-balancer name (docs/platform-api.md).
pub fn is_valid_lb_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// [`NAME`].
pub fn name(a: &Annotations) -> Result<Option<String>, AnnotationError> {
    let Some(v) = raw(a, NAME) else { return Ok(None) };
    if !is_valid_lb_name(v) {
        return Err(invalid(
            NAME,
            v,
            "not a valid load-balancer name",
            "1-63 characters of a-z, 0-9 and '-', starting with a letter",
        ));
    }
    Ok(Some(v.to_owned()))
}

/// [`HEALTH_CHECK_PROTOCOL`].
pub fn health_check_protocol(a: &Annotations) -> Result<Option<HealthCheckProtocol>, AnnotationError> {
    let Some(v) = raw(a, HEALTH_CHECK_PROTOCOL) else {
        return Ok(None);
    };
    match HealthCheckProtocol::from(v) {
        HealthCheckProtocol::Other(_) => Err(invalid(HEALTH_CHECK_PROTOCOL, v, "unknown protocol", "http, tcp")),
        known => Ok(Some(known)),
    }
}

/// [`HEALTH_CHECK_PORT`].
pub fn health_check_port(a: &Annotations) -> Result<Option<u16>, AnnotationError> {
    let Some(v) = raw(a, HEALTH_CHECK_PORT) else {
        return Ok(None);
    };
    let n = parse_range(HEALTH_CHECK_PORT, v, 1, 65535)?;
    u16::try_from(n)
        .map(Some)
        .map_err(|_| invalid(HEALTH_CHECK_PORT, v, "out of range", "an integer from 1 to 65535"))
}

/// [`HEALTH_CHECK_PATH`].
pub fn health_check_path(a: &Annotations) -> Result<Option<String>, AnnotationError> {
    let Some(v) = raw(a, HEALTH_CHECK_PATH) else {
        return Ok(None);
    };
    let ok = v.starts_with('/') && v.len() <= 1024 && v.chars().all(|c| c.is_ascii_graphic());
    if !ok {
        return Err(invalid(
            HEALTH_CHECK_PATH,
            v,
            "not an absolute HTTP path",
            "a path starting with '/', without spaces",
        ));
    }
    Ok(Some(v.to_owned()))
}

/// [`HEALTH_CHECK_INTERVAL`].
pub fn health_check_interval(a: &Annotations) -> Result<Option<u32>, AnnotationError> {
    raw(a, HEALTH_CHECK_INTERVAL)
        .map(|v| parse_range(HEALTH_CHECK_INTERVAL, v, 1, 300))
        .transpose()
}

/// [`HEALTH_CHECK_TIMEOUT`].
pub fn health_check_timeout(a: &Annotations) -> Result<Option<u32>, AnnotationError> {
    raw(a, HEALTH_CHECK_TIMEOUT)
        .map(|v| parse_range(HEALTH_CHECK_TIMEOUT, v, 1, 60))
        .transpose()
}

/// [`HEALTH_CHECK_HEALTHY_THRESHOLD`].
pub fn health_check_healthy_threshold(a: &Annotations) -> Result<Option<u32>, AnnotationError> {
    raw(a, HEALTH_CHECK_HEALTHY_THRESHOLD)
        .map(|v| parse_range(HEALTH_CHECK_HEALTHY_THRESHOLD, v, 1, 10))
        .transpose()
}

/// [`HEALTH_CHECK_UNHEALTHY_THRESHOLD`].
pub fn health_check_unhealthy_threshold(a: &Annotations) -> Result<Option<u32>, AnnotationError> {
    raw(a, HEALTH_CHECK_UNHEALTHY_THRESHOLD)
        .map(|v| parse_range(HEALTH_CHECK_UNHEALTHY_THRESHOLD, v, 1, 10))
        .transpose()
}

/// [`PUBLIC_IP_ID`].
pub fn public_ip_id(a: &Annotations) -> Result<Option<String>, AnnotationError> {
    let Some(v) = raw(a, PUBLIC_IP_ID) else { return Ok(None) };
    let ok = !v.is_empty()
        && v.len() <= 128
        && v != "."
        && v != ".."
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !ok {
        return Err(invalid(
            PUBLIC_IP_ID,
            v,
            "not a public IP ID",
            "a platform public IP ID such as ip-8d1e",
        ));
    }
    Ok(Some(v.to_owned()))
}

/// [`RETAIN_PUBLIC_IP`].
pub fn retain_public_ip(a: &Annotations) -> Result<Option<bool>, AnnotationError> {
    raw(a, RETAIN_PUBLIC_IP)
        .map(|v| parse_bool(RETAIN_PUBLIC_IP, v))
        .transpose()
}

/// [`PROXY_PROTOCOL`]: `true` is refused (the platform has no PROXY protocol).
pub fn proxy_protocol(a: &Annotations) -> Result<Option<bool>, AnnotationError> {
    let Some(v) = raw(a, PROXY_PROTOCOL) else {
        return Ok(None);
    };
    match parse_bool(PROXY_PROTOCOL, v)? {
        true => Err(invalid(
            PROXY_PROTOCOL,
            v,
            "PROXY protocol is not supported by the CloudRaya platform",
            "false",
        )),
        false => Ok(Some(false)),
    }
}

/// One requirement of a [`NodeSelector`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        }
    }
}

/// An equality-based label selector (`k=v,k!=v,k,!k`); every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeSelector {
    pub requirements: Vec<Requirement>,
}

impl NodeSelector {
    /// Whether a node with these labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

fn valid_label_key(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c))
    });
    name_ok && prefix_ok
}

fn valid_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// [`NODE_SELECTOR`].
pub fn node_selector(a: &Annotations) -> Result<Option<NodeSelector>, AnnotationError> {
    let Some(v) = raw(a, NODE_SELECTOR) else {
        return Ok(None);
    };
    const ALLOWED: &str = "comma-separated key=value, key!=value, key or !key with valid label keys and values";
    let mut requirements = Vec::new();
    for part in v.split(',').map(str::trim) {
        let req = if let Some((k, val)) = part.split_once("!=") {
            Requirement::NotEquals(k.trim().to_owned(), val.trim().to_owned())
        } else if let Some((k, val)) = part.split_once("==").or_else(|| part.split_once('=')) {
            Requirement::Equals(k.trim().to_owned(), val.trim().to_owned())
        } else if let Some(k) = part.strip_prefix('!') {
            Requirement::NotExists(k.trim().to_owned())
        } else {
            Requirement::Exists(part.to_owned())
        };
        let ok = match &req {
            Requirement::Equals(k, val) | Requirement::NotEquals(k, val) => {
                valid_label_key(k) && valid_label_value(val)
            }
            Requirement::Exists(k) | Requirement::NotExists(k) => valid_label_key(k),
        };
        if !ok {
            return Err(invalid(
                NODE_SELECTOR,
                v,
                format!("invalid requirement {part:?}"),
                ALLOWED,
            ));
        }
        requirements.push(req);
    }
    Ok(Some(NodeSelector { requirements }))
}

/// Every `lb.cloudraya.com/` annotation of a Service, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LbAnnotations {
    pub algorithm: Option<Algorithm>,
    pub name: Option<String>,
    pub health_check_protocol: Option<HealthCheckProtocol>,
    pub health_check_port: Option<u16>,
    pub health_check_path: Option<String>,
    pub health_check_interval: Option<u32>,
    pub health_check_timeout: Option<u32>,
    pub health_check_healthy_threshold: Option<u32>,
    pub health_check_unhealthy_threshold: Option<u32>,
    pub public_ip_id: Option<String>,
    pub retain_public_ip: bool,
    pub node_selector: Option<NodeSelector>,
}

impl LbAnnotations {
    /// Parses every annotation; the first invalid one is the error. An unknown key under
    /// [`PREFIX`] (a typo) is an error too.
    pub fn parse(a: &Annotations) -> Result<Self, AnnotationError> {
        if let Some((k, v)) = a
            .iter()
            .find(|(k, _)| k.starts_with(PREFIX) && !TABLE.iter().any(|d| d.key == k.as_str()))
        {
            let known: Vec<&str> = TABLE.iter().map(|d| d.key).collect();
            return Err(invalid(k, v, "unknown annotation", known.join(", ")));
        }
        proxy_protocol(a)?;
        Ok(LbAnnotations {
            algorithm: algorithm(a)?,
            name: name(a)?,
            health_check_protocol: health_check_protocol(a)?,
            health_check_port: health_check_port(a)?,
            health_check_path: health_check_path(a)?,
            health_check_interval: health_check_interval(a)?,
            health_check_timeout: health_check_timeout(a)?,
            health_check_healthy_threshold: health_check_healthy_threshold(a)?,
            health_check_unhealthy_threshold: health_check_unhealthy_threshold(a)?,
            public_ip_id: public_ip_id(a)?,
            retain_public_ip: retain_public_ip(a)?.unwrap_or(false),
            node_selector: node_selector(a)?,
        })
    }
}

/// The reference page `docs/annotations.md`, rendered from [`TABLE`].
pub fn render_markdown() -> String {
    let mut out = String::new();
    out.push_str("# Service annotations\n\n");
    out.push_str("<!-- Generated from ccm/src/annotations.rs by `UPDATE_DOCS=1 cargo test -p kuberaya-ccm annotations_doc_is_current`. Do not edit. -->\n\n");
    out.push_str(
        "`kuberaya-ccm` reads these annotations on Services of `type: LoadBalancer` (with \
         `spec.loadBalancerClass` unset or `cloudraya.com/lb`). An invalid value, or an \
         unknown key under `lb.cloudraya.com/`, leaves the existing load balancer exactly as \
         it was and is reported as a Warning Event naming the annotation and the allowed \
         values, and as the `cloudraya.com/LoadBalancerReady` condition (status `False`, \
         reason `InvalidAnnotation`).\n\n",
    );
    out.push_str("| Annotation | Type | Default | Read-only | Description |\n");
    out.push_str("| --- | --- | --- | --- | --- |\n");
    for d in TABLE {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            d.key,
            d.ty,
            d.default,
            if d.read_only { "yes" } else { "no" },
            d.description
        ));
    }
    out.push_str(
        "\nRead-only annotations cannot change once the load balancer exists: a change is \
         refused with a Warning Event (delete and recreate the Service to apply it).\n\n\
         Service fields honoured as well: `spec.ports` (one rule per port, TCP and UDP), \
         `spec.loadBalancerSourceRanges` (the rules' allowed sources), `spec.sessionAffinity` \
         (`ClientIP` selects the `source` algorithm), `spec.externalTrafficPolicy` and \
         `spec.healthCheckNodePort` (the health check), `spec.loadBalancerIP` (deprecated \
         upstream: reuses the free public IP with that address, like `public-ip-id`). \
         `spec.allocateLoadBalancerNodePorts: false` is refused: CloudRaya load balancers \
         forward to node ports.\n",
    );
    out.push_str(DUAL_STACK_DOC);
    out
}

/// The "Dual-stack" section of `docs/annotations.md` (see [`crate::service::families`]).
const DUAL_STACK_DOC: &str = "
## Dual-stack

A Service's `spec.ipFamilies` and `spec.ipFamilyPolicy` decide which address families its \
load balancer serves (the platform's `ip_versions`), against the families the platform \
cluster carries (its `ip_versions`, `[4]` or `[4, 6]`, read when the CCM starts):

| `spec.ipFamilyPolicy` | Load balancer families | Platform cluster without IPv6 |
| --- | --- | --- |
| unset or `SingleStack` | the one family of `spec.ipFamilies` (`[4]` when unset, as before dual-stack) | IPv4: as before; IPv6: refused |
| `PreferDualStack` | every family of `spec.ipFamilies` the platform cluster has | IPv4 only (IPv6 dropped); refused when the Service lists only IPv6 |
| `RequireDualStack` | IPv4 and IPv6 | refused |

A refusal is a Warning Event and the `cloudraya.com/LoadBalancerReady` condition \
`False` with reason `IPv6Unavailable`, naming the field and the platform cluster; no \
platform call is made, so there is never a half-made load balancer. Changing the policy \
(or `spec.ipFamilies`) of a live Service changes the load balancer's families in place \
with one `PUT`: the platform acquires a public IP of a family added and releases the one \
of a family removed (one reused by ID is detached and kept; `retain-public-ip` applies to \
the deletion of the load balancer only); the load balancer and its other address stay.

- **Ingress.** `status.loadBalancer.ingress` lists one entry per public IP of the load \
  balancer, IPv4 first, each with `ipMode: VIP` (the load balancer forwards to node ports; \
  kube-proxy may send in-cluster traffic for the address straight to the Service).
- **Backends.** The platform takes backends by VM and fills in each one's `private_ip` and \
  `private_ipv6`. An IPv4 or dual-stack load balancer has every eligible node as a backend, \
  as before; the platform sends IPv6 clients only to backends with a `private_ipv6` and \
  health-checks on `private_ip`, so a node without IPv6 still serves the IPv4 address. An \
  IPv6-only load balancer has only the nodes with an IPv6 `InternalIP`. When a node's \
  IPv6 `InternalIP` changes (or appears), the load balancers serving IPv6 it backs are \
  re-sent, as for IPv4.
- **Source ranges.** `spec.loadBalancerSourceRanges` may mix IPv4 and IPv6 CIDRs; all go \
  to every rule's `allowed_sources`. The platform admits a client when the list is empty or \
  a CIDR of the client's family contains it: with only IPv4 ranges listed, every IPv6 \
  client of a dual-stack load balancer is refused. An entry that is not a CIDR, of either \
  family, is refused naming `spec.loadBalancerSourceRanges[i]`, and the load balancer is \
  left as it was.
- **Reused addresses.** `lb.cloudraya.com/public-ip-id` names the IPv4 public IP (refused \
  on an IPv6-only Service). `spec.loadBalancerIP` may be an address of either family the \
  load balancer serves, reused on create; a family added later to a live load balancer \
  gets a new address, so asking for a given one then is refused (recreate the Service).
- **Nodes.** The node controller writes a VM's `private_ipv6` as a second `InternalIP` \
  after the IPv4 one, and follows it when it changes.
";

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> Annotations {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn annotations_doc_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/annotations.md");
        let rendered = render_markdown();
        if std::env::var_os("UPDATE_DOCS").is_some() {
            std::fs::write(path, &rendered).expect("write docs/annotations.md");
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == rendered,
            "docs/annotations.md is out of date; run UPDATE_DOCS=1 cargo test -p kuberaya-ccm annotations_doc_is_current"
        );
    }

    #[test]
    fn table_lists_every_constant_once_under_the_prefix() {
        let keys = [
            ALGORITHM,
            NAME,
            HEALTH_CHECK_PROTOCOL,
            HEALTH_CHECK_PORT,
            HEALTH_CHECK_PATH,
            HEALTH_CHECK_INTERVAL,
            HEALTH_CHECK_TIMEOUT,
            HEALTH_CHECK_HEALTHY_THRESHOLD,
            HEALTH_CHECK_UNHEALTHY_THRESHOLD,
            PUBLIC_IP_ID,
            RETAIN_PUBLIC_IP,
            NODE_SELECTOR,
            PROXY_PROTOCOL,
        ];
        assert_eq!(TABLE.len(), keys.len());
        for k in keys {
            assert!(k.starts_with(PREFIX));
            assert_eq!(TABLE.iter().filter(|d| d.key == k).count(), 1, "{k}");
        }
    }

    #[test]
    fn unset_is_none_not_error() {
        let a = Annotations::new();
        assert_eq!(algorithm(&a), Ok(None));
        assert_eq!(health_check_port(&a), Ok(None));
        assert_eq!(node_selector(&a), Ok(None));
        assert_eq!(LbAnnotations::parse(&a), Ok(LbAnnotations::default()));
    }

    #[test]
    fn algorithm_values() {
        assert_eq!(algorithm(&ann(&[(ALGORITHM, "source")])), Ok(Some(Algorithm::Source)));
        assert_eq!(
            algorithm(&ann(&[(ALGORITHM, " least_connection ")])),
            Ok(Some(Algorithm::LeastConnection))
        );
        let e = algorithm(&ann(&[(ALGORITHM, "fastest")])).expect_err("invalid");
        let msg = e.to_string();
        assert!(
            msg.contains(ALGORITHM) && msg.contains("round_robin, least_connection, source"),
            "{msg}"
        );
    }

    #[test]
    fn numbers_are_range_checked() {
        assert_eq!(health_check_port(&ann(&[(HEALTH_CHECK_PORT, "8080")])), Ok(Some(8080)));
        for bad in ["0", "65536", "-1", "http", "1.5"] {
            let e = health_check_port(&ann(&[(HEALTH_CHECK_PORT, bad)])).expect_err(bad);
            assert_eq!(e.key, HEALTH_CHECK_PORT);
            assert!(e.to_string().contains("1 to 65535"));
        }
        assert_eq!(
            health_check_interval(&ann(&[(HEALTH_CHECK_INTERVAL, "300")])),
            Ok(Some(300))
        );
        assert!(health_check_interval(&ann(&[(HEALTH_CHECK_INTERVAL, "301")])).is_err());
        assert!(health_check_timeout(&ann(&[(HEALTH_CHECK_TIMEOUT, "61")])).is_err());
        assert!(health_check_healthy_threshold(&ann(&[(HEALTH_CHECK_HEALTHY_THRESHOLD, "11")])).is_err());
        assert_eq!(
            health_check_unhealthy_threshold(&ann(&[(HEALTH_CHECK_UNHEALTHY_THRESHOLD, "1")])),
            Ok(Some(1))
        );
    }

    #[test]
    fn protocol_path_name_ip() {
        assert_eq!(
            health_check_protocol(&ann(&[(HEALTH_CHECK_PROTOCOL, "tcp")])),
            Ok(Some(HealthCheckProtocol::Tcp))
        );
        assert!(health_check_protocol(&ann(&[(HEALTH_CHECK_PROTOCOL, "https")])).is_err());
        assert_eq!(
            health_check_path(&ann(&[(HEALTH_CHECK_PATH, "/ready")])),
            Ok(Some("/ready".into()))
        );
        assert!(health_check_path(&ann(&[(HEALTH_CHECK_PATH, "ready")])).is_err());
        assert!(health_check_path(&ann(&[(HEALTH_CHECK_PATH, "/a b")])).is_err());
        assert_eq!(name(&ann(&[(NAME, "web-lb")])), Ok(Some("web-lb".into())));
        for bad in ["Web", "1web", "web_lb", ""] {
            assert!(name(&ann(&[(NAME, bad)])).is_err(), "{bad}");
        }
        assert!(name(&ann(&[(NAME, &"a".repeat(64))])).is_err());
        assert_eq!(
            public_ip_id(&ann(&[(PUBLIC_IP_ID, "ip-8d1e")])),
            Ok(Some("ip-8d1e".into()))
        );
        assert!(public_ip_id(&ann(&[(PUBLIC_IP_ID, "ip/../x")])).is_err());
    }

    #[test]
    fn booleans_and_proxy_protocol() {
        assert_eq!(retain_public_ip(&ann(&[(RETAIN_PUBLIC_IP, "true")])), Ok(Some(true)));
        let e = retain_public_ip(&ann(&[(RETAIN_PUBLIC_IP, "yes")])).expect_err("not a bool");
        assert!(e.to_string().contains("true, false"));
        assert_eq!(proxy_protocol(&ann(&[(PROXY_PROTOCOL, "false")])), Ok(Some(false)));
        let e = proxy_protocol(&ann(&[(PROXY_PROTOCOL, "true")])).expect_err("unsupported");
        assert!(e.to_string().contains("not supported"), "{e}");
    }

    #[test]
    fn node_selector_forms() {
        let sel = node_selector(&ann(&[(NODE_SELECTOR, "pool=edge, !spot,zone!=b,gpu")]))
            .expect("valid")
            .expect("set");
        assert_eq!(sel.requirements.len(), 4);
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        assert!(sel.matches(&labels(&[("pool", "edge"), ("zone", "a"), ("gpu", "")])));
        assert!(!sel.matches(&labels(&[("pool", "edge"), ("zone", "b"), ("gpu", "")])));
        assert!(!sel.matches(&labels(&[("pool", "edge"), ("spot", "1"), ("gpu", "")])));
        assert!(!sel.matches(&labels(&[("pool", "core"), ("gpu", "")])));
        for bad in ["", "a=b,", "=x", "a=b c", "a/b/c=d"] {
            assert!(node_selector(&ann(&[(NODE_SELECTOR, bad)])).is_err(), "{bad:?}");
        }
        let with_prefix = node_selector(&ann(&[(NODE_SELECTOR, "node.kubernetes.io/pool==x")]));
        assert!(with_prefix.is_ok());
    }

    #[test]
    fn parse_refuses_unknown_keys_under_the_prefix() {
        let e = LbAnnotations::parse(&ann(&[("lb.cloudraya.com/algoritm", "source")])).expect_err("typo");
        assert!(e.to_string().contains("unknown annotation"));
        assert!(e.allowed.contains(ALGORITHM));
        // Other prefixes are none of our business.
        assert!(LbAnnotations::parse(&ann(&[("example.com/x", "y")])).is_ok());
        let all = LbAnnotations::parse(&ann(&[(ALGORITHM, "source"), (RETAIN_PUBLIC_IP, "true")])).expect("valid");
        assert_eq!(all.algorithm, Some(Algorithm::Source));
        assert!(all.retain_public_ip);
    }
}

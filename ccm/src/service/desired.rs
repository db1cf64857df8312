//! The desired load balancer of a Service: a pure function of (Service, Nodes,
//! annotations, config). No I/O; everything the controller decides about *what* a
//! load balancer should look like is here and unit-tested here.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};

use crate::annotations::{AnnotationError, LbAnnotations};
use crate::platform::labels::{LABEL_RETAIN_PUBLIC_IP, MAX_LABEL_VALUE_LEN};
use crate::platform::{
    Algorithm, BackendRef, HealthCheck, HealthCheckProtocol, IpVersion, LABEL_CLUSTER_ID, LABEL_SERVICE_NAME,
    LABEL_SERVICE_NAMESPACE, LABEL_SERVICE_UID, Labels, Rule, RuleProtocol,
};
pub use crate::service::refusal::Refusal;
use crate::service::{families, nodes};

/// kube-proxy's health port (`--healthz-bind-address`), checked with
/// `externalTrafficPolicy: Cluster`.
pub const KUBE_PROXY_HEALTH_PORT: u16 = 10256;
/// The path kube-proxy and the per-Service health check node port answer.
pub const HEALTHZ_PATH: &str = "/healthz";
/// Health-check defaults of ours (tighter than the platform's so that a node without
/// endpoints leaves the rotation within ~15 s with `externalTrafficPolicy: Local`).
pub const DEFAULT_HC_INTERVAL_S: u32 = 5;
pub const DEFAULT_HC_TIMEOUT_S: u32 = 3;
pub const DEFAULT_HC_HEALTHY_THRESHOLD: u32 = 2;
pub const DEFAULT_HC_UNHEALTHY_THRESHOLD: u32 = 3;

/// What the controller needs to know of its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredConfig {
    /// Our cluster's ID, the first label of every object we create.
    pub cluster_id: String,
    /// Whether the platform accepts `udp` rules (docs/platform-api.md: an assumption
    /// the stand-in can turn off). When false, UDP ports are refused before any call.
    pub udp_supported: bool,
    /// The address families the platform cluster carries (`Cluster.ip_versions`, read at
    /// start): `[4]`, or `[4, 6]` when its subnet has an IPv6 range.
    pub ip_versions: Vec<IpVersion>,
}

/// Which public IP the load balancer should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicIpRequest {
    /// Let the platform acquire one (released with the LB unless retained).
    Acquire,
    /// Reuse this public IP (the `public-ip-id` annotation).
    Id(String),
    /// Reuse the public IP with this address (`spec.loadBalancerIP`); resolved to an ID
    /// by the controller before creating.
    Address(IpAddr),
}

impl PublicIpRequest {
    /// Whether the IP is the user's (reused), so we must never release it.
    pub fn is_reused(&self) -> bool {
        !matches!(self, PublicIpRequest::Acquire)
    }
}

/// The load balancer a Service should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredLb {
    pub name: String,
    /// Our labels (cluster, Service UID, namespace, name; retain flag when set).
    pub labels: Labels,
    /// One rule per Service port, sorted by (protocol, public port); health checks with
    /// every default filled in.
    pub rules: Vec<Rule>,
    /// The address families the LB serves (sorted: `[4]`, `[6]` or `[4, 6]`; see
    /// [`families`]): one public IP of each.
    pub ip_versions: Vec<IpVersion>,
    /// Sorted, unique; at most [`nodes::MAX_BACKENDS`] (see [`nodes::cap_backends`]).
    /// Only nodes with an IPv6 `InternalIP` for an IPv6-only LB ([`nodes::can_serve`]).
    pub backends: Vec<BackendRef>,
    /// How many nodes are eligible: more than `backends.len()` when capped.
    pub eligible_backends: usize,
    /// The `InternalIP` of each backend's node, where known: a backend the platform
    /// reports with another `private_ip` is stale and needs a PUT.
    pub backend_ips: BTreeMap<String, IpAddr>,
    /// The IPv6 `InternalIP` of each backend's node, where known, when the LB serves
    /// IPv6: compared with the platform's `private_ipv6` the same way.
    pub backend_ipv6s: BTreeMap<String, Ipv6Addr>,
    pub public_ip: PublicIpRequest,
    pub retain_public_ip: bool,
}

/// A short stable hash (FNV-1a, 32 bits) for names; not security relevant.
fn short_hash(s: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// The LB name a Service asks for: its `lb.cloudraya.com/name` annotation when valid,
/// else [`default_lb_name`].
pub fn desired_lb_name(svc: &k8s_openapi::api::core::v1::Service) -> String {
    use kube::ResourceExt;
    let ann = svc.metadata.annotations.clone().unwrap_or_default();
    crate::annotations::name(&ann)
        .ok()
        .flatten()
        .unwrap_or_else(|| default_lb_name(&svc.namespace().unwrap_or_default(), &svc.name_any()))
}

/// Of the other live Services that want an LB named `name` (not deleting, asking for an
/// LB, another UID), the oldest one, when it is older than `svc` (`creationTimestamp`,
/// then UID): as `namespace/name`. An LB name nobody holds goes to the older claim, never
/// to whichever Service reconciles first; one that a Service holds stays with it (the
/// platform's 409 on a taken name says so).
pub fn older_claimant<'a>(
    svc: &k8s_openapi::api::core::v1::Service,
    name: &str,
    others: impl Iterator<Item = &'a k8s_openapi::api::core::v1::Service>,
) -> Option<String> {
    use kube::ResourceExt;
    let age = |s: &k8s_openapi::api::core::v1::Service| (s.creation_timestamp().map(|t| t.0), s.uid());
    let mine = age(svc);
    // Default names meet too: `kr-<namespace>-<name>` is the same for `a-b/c` and `a/b-c`.
    others
        .filter(|o| {
            o.uid() != svc.uid()
                && crate::service::wants_load_balancer(o)
                && !crate::service::is_deleting(o)
                && desired_lb_name(o) == name
        })
        .filter(|o| {
            // A Service without a timestamp (not from an API server) is never older.
            let theirs = age(o);
            theirs.0.is_some() && (mine.0.is_none() || theirs < mine)
        })
        .min_by(|a, b| age(a).cmp(&age(b)))
        .map(|o| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()))
}

/// The default platform name: `kr-<namespace>-<name>`, shortened with a hash of
/// `namespace/name` when longer than 63. Stored on live objects: never change.
pub fn default_lb_name(namespace: &str, name: &str) -> String {
    let full = format!("kr-{namespace}-{name}");
    if full.len() <= 63 {
        return full;
    }
    let hash = short_hash(&format!("{namespace}/{name}"));
    let keep = 63 - 1 - hash.len();
    let head = full[..keep].trim_end_matches('-');
    format!("{head}-{hash}")
}

/// The labels of the LB of this Service.
pub fn lb_labels(cluster_id: &str, uid: &str, namespace: &str, name: &str, retain: bool) -> Labels {
    let mut l = Labels::from([
        (LABEL_CLUSTER_ID.to_owned(), cluster_id.to_owned()),
        (LABEL_SERVICE_UID.to_owned(), uid.to_owned()),
        (LABEL_SERVICE_NAMESPACE.to_owned(), namespace.to_owned()),
        (
            LABEL_SERVICE_NAME.to_owned(),
            name.chars().take(MAX_LABEL_VALUE_LEN).collect(),
        ),
    ]);
    if retain {
        l.insert(LABEL_RETAIN_PUBLIC_IP.to_owned(), "true".to_owned());
    }
    l
}

/// The rule name of a port: `<protocol>-<port>`, unique since Kubernetes keeps
/// (protocol, port) unique within a Service.
pub fn rule_name(protocol: &RuleProtocol, port: u16) -> String {
    format!("{}-{port}", protocol.as_str())
}

fn port_u16(field: &str, v: i32) -> Result<u16, Refusal> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| Refusal::unsupported(field, format!("{v} is not a valid port")))
}

/// Computes the desired load balancer. `nodes` are all Nodes; eligibility is decided
/// here (see [`nodes`]). A Service asking for what we cannot do gets the first
/// [`Refusal`] in field order: metadata, annotations, spec, ports, then the public IP.
pub fn desired_load_balancer<'a>(
    svc: &Service,
    all_nodes: impl IntoIterator<Item = &'a Node>,
    cfg: &DesiredConfig,
) -> Result<DesiredLb, Refusal> {
    let ServiceId { namespace, name, uid } = service_id(svc)?;
    let ann = LbAnnotations::parse(&svc.metadata.annotations.clone().unwrap_or_default())?;
    let spec = svc
        .spec
        .as_ref()
        .ok_or_else(|| Refusal::unsupported("spec", "missing"))?;

    if spec.allocate_load_balancer_node_ports == Some(false) {
        return Err(Refusal::unsupported(
            "spec.allocateLoadBalancerNodePorts",
            "false is not supported: CloudRaya load balancers forward to node ports",
        ));
    }
    let ip_versions = families::lb_ip_versions(spec, &cfg.ip_versions, &cfg.cluster_id)?;
    let rule_settings = RuleSettings {
        algorithm: algorithm(&ann, spec),
        allowed_sources: allowed_sources(spec)?,
        health_check: HealthCheckSettings::of(&ann, spec)?,
    };
    let rules = rules(spec, cfg, &rule_settings)?;
    let public_ip = public_ip(&ann, spec, &ip_versions)?;
    let backends = Backends::of(all_nodes, &ann, uid, &ip_versions);

    Ok(DesiredLb {
        name: ann.name.clone().unwrap_or_else(|| default_lb_name(namespace, name)),
        labels: lb_labels(&cfg.cluster_id, uid, namespace, name, ann.retain_public_ip),
        rules,
        backends: backends.backends,
        backend_ips: backends.backend_ips,
        backend_ipv6s: backends.backend_ipv6s,
        ip_versions,
        eligible_backends: backends.eligible,
        public_ip,
        retain_public_ip: ann.retain_public_ip,
    })
}

/// Who the Service is: what its LB's name and labels are made of.
struct ServiceId<'a> {
    namespace: &'a str,
    name: &'a str,
    uid: &'a str,
}

fn service_id(svc: &Service) -> Result<ServiceId<'_>, Refusal> {
    let meta = &svc.metadata;
    let namespace = meta
        .namespace
        .as_deref()
        .ok_or_else(|| Refusal::unsupported("metadata.namespace", "missing"))?;
    let name = meta
        .name
        .as_deref()
        .ok_or_else(|| Refusal::unsupported("metadata.name", "missing"))?;
    let uid = meta
        .uid
        .as_deref()
        .ok_or_else(|| Refusal::unsupported("metadata.uid", "missing"))?;
    Ok(ServiceId { namespace, name, uid })
}

/// The balancing algorithm: the annotation's, else source hashing for
/// `sessionAffinity: ClientIP`, else round robin.
fn algorithm(ann: &LbAnnotations, spec: &ServiceSpec) -> Algorithm {
    match &ann.algorithm {
        Some(a) => a.clone(),
        None if spec.session_affinity.as_deref() == Some("ClientIP") => Algorithm::Source,
        None => Algorithm::RoundRobin,
    }
}

/// `spec.loadBalancerSourceRanges` as networks: truncated to their prefix, sorted, unique.
fn allowed_sources(spec: &ServiceSpec) -> Result<Vec<IpNet>, Refusal> {
    let mut allowed_sources: Vec<IpNet> = Vec::new();
    for (i, r) in spec.load_balancer_source_ranges.iter().flatten().enumerate() {
        let net: IpNet = r.trim().parse().map_err(|_| {
            Refusal::unsupported(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("{r:?} is not a CIDR"),
            )
        })?;
        allowed_sources.push(net.trunc());
    }
    allowed_sources.sort();
    allowed_sources.dedup();
    Ok(allowed_sources)
}

/// The health check of every rule, from the annotations and the traffic policy.
struct HealthCheckSettings {
    protocol: HealthCheckProtocol,
    /// The annotation's port, if any.
    port: Option<u16>,
    /// An HTTP check's port without the annotation: the Service's health check node
    /// port with `externalTrafficPolicy: Local`, else kube-proxy's.
    default_port: Option<u16>,
    path: String,
    interval: u32,
    timeout: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl HealthCheckSettings {
    fn of(ann: &LbAnnotations, spec: &ServiceSpec) -> Result<Self, Refusal> {
        let local = spec.external_traffic_policy.as_deref() == Some("Local");
        let interval = ann.health_check_interval.unwrap_or(DEFAULT_HC_INTERVAL_S);
        let timeout = ann.health_check_timeout.unwrap_or(DEFAULT_HC_TIMEOUT_S);
        if timeout >= interval {
            let e = AnnotationError {
                key: crate::annotations::HEALTH_CHECK_TIMEOUT.to_owned(),
                value: timeout.to_string(),
                reason: format!("must be below the health-check interval ({interval}s)"),
                allowed: format!("an integer from 1 to {}", interval.saturating_sub(1).min(60)),
            };
            return Err(e.into());
        }
        let default_port = if local {
            let p = spec.health_check_node_port.ok_or_else(|| {
                Refusal::unsupported(
                    "spec.healthCheckNodePort",
                    "not allocated yet although externalTrafficPolicy is Local",
                )
            })?;
            Some(port_u16("spec.healthCheckNodePort", p)?)
        } else {
            Some(KUBE_PROXY_HEALTH_PORT)
        };
        Ok(HealthCheckSettings {
            protocol: ann.health_check_protocol.clone().unwrap_or(HealthCheckProtocol::Http),
            port: ann.health_check_port,
            default_port,
            path: ann.health_check_path.clone().unwrap_or_else(|| HEALTHZ_PATH.to_owned()),
            interval,
            timeout,
            healthy_threshold: ann
                .health_check_healthy_threshold
                .unwrap_or(DEFAULT_HC_HEALTHY_THRESHOLD),
            unhealthy_threshold: ann
                .health_check_unhealthy_threshold
                .unwrap_or(DEFAULT_HC_UNHEALTHY_THRESHOLD),
        })
    }

    /// The health check of the rule to `private_port` (a TCP check connects to the node
    /// port itself unless the annotation names another), every default filled in.
    fn for_rule(&self, private_port: u16) -> HealthCheck {
        let (protocol, port, path) = match self.protocol {
            HealthCheckProtocol::Tcp => (HealthCheckProtocol::Tcp, Some(self.port.unwrap_or(private_port)), None),
            _ => (
                HealthCheckProtocol::Http,
                self.port.or(self.default_port),
                Some(self.path.clone()),
            ),
        };
        HealthCheck {
            protocol,
            port,
            path,
            interval_s: Some(self.interval),
            timeout_s: Some(self.timeout),
            healthy_threshold: Some(self.healthy_threshold),
            unhealthy_threshold: Some(self.unhealthy_threshold),
        }
        .with_defaults(private_port)
    }
}

/// What every rule of the LB shares.
struct RuleSettings {
    algorithm: Algorithm,
    allowed_sources: Vec<IpNet>,
    health_check: HealthCheckSettings,
}

/// The most rules a CloudRaya load balancer has.
const MAX_RULES: usize = 50;

/// One rule per Service port, sorted by (protocol, public port): at least one, at most
/// [`MAX_RULES`].
fn rules(spec: &ServiceSpec, cfg: &DesiredConfig, shared: &RuleSettings) -> Result<Vec<Rule>, Refusal> {
    let mut rules = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        rules.push(rule(&format!("spec.ports[{i}]"), p, cfg, shared)?);
    }
    if rules.is_empty() {
        return Err(Refusal::unsupported(
            "spec.ports",
            "a load balancer needs at least one port",
        ));
    }
    if rules.len() > MAX_RULES {
        return Err(Refusal::unsupported(
            "spec.ports",
            format!("{} ports; a CloudRaya load balancer has at most 50 rules", rules.len()),
        ));
    }
    rules.sort_by(|a, b| (a.protocol.as_str(), a.public_port).cmp(&(b.protocol.as_str(), b.public_port)));
    Ok(rules)
}

/// The rule of the Service port `p` (at `field`): its port to its node port.
fn rule(field: &str, p: &ServicePort, cfg: &DesiredConfig, shared: &RuleSettings) -> Result<Rule, Refusal> {
    let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => RuleProtocol::Tcp,
        "UDP" if cfg.udp_supported => RuleProtocol::Udp,
        "UDP" => {
            return Err(Refusal::unsupported(
                format!("{field}.protocol"),
                "UDP is not supported by this CloudRaya platform",
            ));
        }
        other => {
            return Err(Refusal::unsupported(
                format!("{field}.protocol"),
                format!("{other} is not supported (TCP and UDP are)"),
            ));
        }
    };
    let public_port = port_u16(&format!("{field}.port"), p.port)?;
    let node_port = p.node_port.ok_or_else(|| {
        Refusal::unsupported(
            format!("{field}.nodePort"),
            "not allocated; the load balancer needs one",
        )
    })?;
    let private_port = port_u16(&format!("{field}.nodePort"), node_port)?;
    Ok(Rule {
        name: rule_name(&protocol, public_port),
        protocol,
        public_port,
        private_port,
        algorithm: shared.algorithm.clone(),
        allowed_sources: shared.allowed_sources.clone(),
        health_check: Some(shared.health_check.for_rule(private_port)),
    })
}

/// The public IP the LB gets: the annotation's by ID, `spec.loadBalancerIP` by address
/// (not both), else a new one. The annotation names the IPv4 public IP (the one the
/// platform's `public_ip_id` takes); `spec.loadBalancerIP` may be of either family the
/// LB serves (an IPv6 address is reused as its `public_ipv6`).
fn public_ip(ann: &LbAnnotations, spec: &ServiceSpec, ip_versions: &[IpVersion]) -> Result<PublicIpRequest, Refusal> {
    let request = public_ip_request(ann, spec)?;
    match &request {
        PublicIpRequest::Id(_) if !ip_versions.contains(&IpVersion::V4) => Err(Refusal::unsupported(
            crate::annotations::PUBLIC_IP_ID,
            "names the load balancer's IPv4 public IP, and this Service's load balancer is IPv6 only",
        )),
        PublicIpRequest::Address(a) if !ip_versions.contains(&IpVersion::of(a)) => Err(Refusal::unsupported(
            "spec.loadBalancerIP",
            format!(
                "{a} is an {} address, and this Service's load balancer serves {} only",
                families::family_name(IpVersion::of(a)),
                ip_versions
                    .iter()
                    .map(|v| families::family_name(*v))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
        )),
        _ => Ok(request),
    }
}

fn public_ip_request(ann: &LbAnnotations, spec: &ServiceSpec) -> Result<PublicIpRequest, Refusal> {
    let lb_ip = spec
        .load_balancer_ip
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty());
    Ok(match (ann.public_ip_id.clone(), lb_ip) {
        (Some(id), None) => PublicIpRequest::Id(id),
        (None, Some(ip)) => PublicIpRequest::Address(
            ip.parse()
                .map_err(|_| Refusal::unsupported("spec.loadBalancerIP", format!("{ip:?} is not an IP address")))?,
        ),
        (None, None) => PublicIpRequest::Acquire,
        (Some(_), Some(_)) => {
            return Err(Refusal::unsupported(
                "spec.loadBalancerIP",
                format!(
                    "set together with the {} annotation; use only the annotation",
                    crate::annotations::PUBLIC_IP_ID
                ),
            ));
        }
    })
}

/// The LB's backends: the eligible nodes' VMs (capped, see [`nodes::cap_backends`]) and
/// their `InternalIP`s.
struct Backends {
    backends: Vec<BackendRef>,
    backend_ips: BTreeMap<String, IpAddr>,
    backend_ipv6s: BTreeMap<String, Ipv6Addr>,
    eligible: usize,
}

impl Backends {
    fn of<'a>(
        all_nodes: impl IntoIterator<Item = &'a Node>,
        ann: &LbAnnotations,
        uid: &str,
        ip_versions: &[IpVersion],
    ) -> Self {
        let all_nodes: Vec<&Node> = all_nodes.into_iter().collect();
        let eligible = nodes::backend_vm_ids(
            all_nodes.iter().copied().filter(|n| nodes::can_serve(n, ip_versions)),
            ann.node_selector.as_ref(),
        );
        let eligible_backends = eligible.len();
        let backends: Vec<BackendRef> = nodes::cap_backends(eligible, uid, nodes::MAX_BACKENDS)
            .into_iter()
            .map(BackendRef::new)
            .collect();
        let backend_ips = nodes::backend_ips(all_nodes.iter().copied())
            .into_iter()
            .filter(|(vm, _)| backends.iter().any(|b| &b.vm_id == vm))
            .collect();
        let backend_ipv6s = if ip_versions.contains(&IpVersion::V6) {
            nodes::backend_ipv6s(all_nodes.iter().copied())
                .into_iter()
                .filter(|(vm, _)| backends.iter().any(|b| &b.vm_id == vm))
                .collect()
        } else {
            BTreeMap::new()
        };
        Backends {
            backends,
            backend_ips,
            backend_ipv6s,
            eligible: eligible_backends,
        }
    }
}

/// The status ingress of an LB: each of its public addresses, IPv4 first.
pub fn ingress_ips(lb: &crate::platform::LoadBalancer) -> Vec<String> {
    lb.public_ips().map(|ip| ip.address.to_string()).collect()
}

/// Keys of a label map that are ours (we replace them; others' labels are kept).
pub fn is_our_label(key: &str) -> bool {
    key.starts_with("kuberaya.cloudraya.com/")
}

/// Merges our desired labels into an LB's labels, keeping labels that are not ours.
pub fn merge_labels(actual: &Labels, ours: &Labels) -> Labels {
    let mut out: BTreeMap<String, String> = actual
        .iter()
        .filter(|(k, _)| !is_our_label(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.extend(ours.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::annotations as a;
    use crate::service::nodes::tests::{node, with_label, with_taint};
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};

    pub fn cfg() -> DesiredConfig {
        DesiredConfig {
            cluster_id: "cl-1".into(),
            udp_supported: true,
            ip_versions: vec![IpVersion::V4],
        }
    }

    /// [`cfg`] on a platform cluster with IPv6.
    pub fn dual_cfg() -> DesiredConfig {
        DesiredConfig {
            ip_versions: vec![IpVersion::V4, IpVersion::V6],
            ..cfg()
        }
    }

    /// A `type: LoadBalancer` Service `default/web` with port 80 -> nodePort 31080.
    pub fn svc() -> Service {
        let mut s = Service::default();
        s.metadata.name = Some("web".into());
        s.metadata.namespace = Some("default".into());
        s.metadata.uid = Some("uid-1".into());
        s.spec = Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ports: Some(vec![port("http", "TCP", 80, Some(31080))]),
            external_traffic_policy: Some("Cluster".into()),
            ..ServiceSpec::default()
        });
        s
    }

    pub fn port(name: &str, proto: &str, port: i32, node_port: Option<i32>) -> ServicePort {
        ServicePort {
            name: Some(name.into()),
            protocol: Some(proto.into()),
            port,
            node_port,
            ..ServicePort::default()
        }
    }

    pub fn annotate(mut s: Service, k: &str, v: &str) -> Service {
        s.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(k.into(), v.into());
        s
    }

    fn spec_mut(s: &mut Service) -> &mut ServiceSpec {
        s.spec.get_or_insert_with(ServiceSpec::default)
    }

    fn nodes3() -> Vec<Node> {
        vec![node("a"), node("b"), node("c")]
    }

    fn desired(s: &Service) -> Result<DesiredLb, Refusal> {
        desired_load_balancer(s, &nodes3(), &cfg())
    }

    #[test]
    fn one_tcp_port_cluster_policy() {
        let d = desired(&svc()).expect("desired");
        assert_eq!(d.name, "kr-default-web");
        assert_eq!(d.public_ip, PublicIpRequest::Acquire);
        assert!(!d.retain_public_ip);
        assert_eq!(d.labels[LABEL_CLUSTER_ID], "cl-1");
        assert_eq!(d.labels[LABEL_SERVICE_UID], "uid-1");
        assert_eq!(d.labels[LABEL_SERVICE_NAMESPACE], "default");
        assert_eq!(d.labels[LABEL_SERVICE_NAME], "web");
        assert!(!d.labels.contains_key(LABEL_RETAIN_PUBLIC_IP));
        assert_eq!(
            d.backends,
            vec![
                BackendRef::new("vm-a"),
                BackendRef::new("vm-b"),
                BackendRef::new("vm-c")
            ]
        );
        assert_eq!(d.rules.len(), 1);
        let r = &d.rules[0];
        assert_eq!((r.name.as_str(), r.public_port, r.private_port), ("tcp-80", 80, 31080));
        assert_eq!(r.protocol, RuleProtocol::Tcp);
        assert_eq!(r.algorithm, Algorithm::RoundRobin);
        assert!(r.allowed_sources.is_empty());
        let hc = r.health_check.as_ref().expect("hc");
        assert_eq!(hc.protocol, HealthCheckProtocol::Http);
        assert_eq!(hc.port, Some(KUBE_PROXY_HEALTH_PORT));
        assert_eq!(hc.path.as_deref(), Some("/healthz"));
        assert_eq!(hc, &hc.with_defaults(r.private_port), "defaults filled in");
    }

    #[test]
    fn local_policy_checks_the_health_check_node_port() {
        let mut s = svc();
        spec_mut(&mut s).external_traffic_policy = Some("Local".into());
        spec_mut(&mut s).health_check_node_port = Some(32000);
        let d = desired(&s).expect("desired");
        let hc = d.rules[0].health_check.as_ref().expect("hc");
        assert_eq!((hc.port, hc.path.as_deref()), (Some(32000), Some("/healthz")));
        spec_mut(&mut s).health_check_node_port = None;
        assert!(matches!(desired(&s), Err(Refusal::Unsupported { field, .. }) if field == "spec.healthCheckNodePort"));
    }

    #[test]
    fn tcp_and_udp_ports_one_rule_each_sorted() {
        let mut s = svc();
        spec_mut(&mut s).ports = Some(vec![
            port("dns", "UDP", 53, Some(30053)),
            port("https", "TCP", 443, Some(30443)),
            port("dns-tcp", "TCP", 53, Some(30054)),
        ]);
        let d = desired(&s).expect("desired");
        let got: Vec<(&str, u16, u16)> = d
            .rules
            .iter()
            .map(|r| (r.name.as_str(), r.public_port, r.private_port))
            .collect();
        assert_eq!(
            got,
            vec![("tcp-53", 53, 30054), ("tcp-443", 443, 30443), ("udp-53", 53, 30053)]
        );
    }

    #[test]
    fn udp_is_refused_when_the_platform_has_it_off() {
        let mut s = svc();
        spec_mut(&mut s).ports = Some(vec![port("dns", "UDP", 53, Some(30053))]);
        let cfg = DesiredConfig {
            udp_supported: false,
            ..cfg()
        };
        let e = desired_load_balancer(&s, &nodes3(), &cfg).expect_err("refused");
        assert!(e.to_string().contains("UDP is not supported"), "{e}");
        assert_eq!(e.reason(), "UnsupportedServiceSpec");
    }

    #[test]
    fn sctp_missing_node_port_and_no_ports_are_refused() {
        let mut s = svc();
        spec_mut(&mut s).ports = Some(vec![port("x", "SCTP", 9, Some(30009))]);
        assert!(desired(&s).is_err());
        spec_mut(&mut s).ports = Some(vec![port("x", "TCP", 9, None)]);
        assert!(desired(&s).expect_err("no node port").to_string().contains("nodePort"));
        spec_mut(&mut s).ports = Some(vec![]);
        assert!(desired(&s).is_err());
        let mut s = svc();
        spec_mut(&mut s).allocate_load_balancer_node_ports = Some(false);
        assert!(
            desired(&s)
                .expect_err("refused")
                .to_string()
                .contains("allocateLoadBalancerNodePorts")
        );
        spec_mut(&mut s).allocate_load_balancer_node_ports = Some(true);
        assert!(desired(&s).is_ok());
    }

    /// More eligible nodes than the platform takes: the cap's worth, stable, and said.
    #[test]
    fn backends_are_capped_at_the_platform_limit() {
        let many: Vec<Node> = (0..130).map(|i| node(&format!("n{i:03}"))).collect();
        let d = desired_load_balancer(&svc(), &many, &cfg()).expect("desired");
        assert_eq!(d.backends.len(), nodes::MAX_BACKENDS);
        assert_eq!(d.eligible_backends, 130);
        let again = desired_load_balancer(&svc(), &many, &cfg()).expect("desired");
        assert_eq!(d.backends, again.backends);
        let few = desired_load_balancer(&svc(), &nodes3(), &cfg()).expect("desired");
        assert_eq!((few.backends.len(), few.eligible_backends), (3, 3));
    }

    #[test]
    fn backends_skip_ineligible_nodes() {
        let nodes = vec![
            node("a"),
            with_label(node("b"), nodes::EXCLUDE_FROM_LB_LABEL, "true"),
            with_taint(node("c"), nodes::TO_BE_DELETED_TAINT),
            nodes::tests::deleting(node("d")),
            nodes::tests::with_provider_id(node("e"), Some("kind://docker/x/e")),
            nodes::tests::with_condition(node("f"), "Ready", Some("False")),
        ];
        let d = desired_load_balancer(&svc(), &nodes, &cfg()).expect("desired");
        assert_eq!(d.backends, vec![BackendRef::new("vm-a"), BackendRef::new("vm-f")]);
        let s = annotate(svc(), a::NODE_SELECTOR, "pool=edge");
        let nodes = vec![with_label(node("a"), "pool", "edge"), node("b")];
        let d = desired_load_balancer(&s, &nodes, &cfg()).expect("desired");
        assert_eq!(d.backends, vec![BackendRef::new("vm-a")]);
        let d = desired_load_balancer(&svc(), &[], &cfg()).expect("no nodes is allowed");
        assert!(d.backends.is_empty());
    }

    #[test]
    fn source_ranges_become_allowed_sources() {
        let mut s = svc();
        spec_mut(&mut s).load_balancer_source_ranges =
            Some(vec!["10.0.0.0/8".into(), " 192.168.1.7/24".into(), "10.0.0.0/8".into()]);
        let d = desired(&s).expect("desired");
        let want: Vec<IpNet> = vec![
            "10.0.0.0/8".parse().expect("cidr"),
            "192.168.1.0/24".parse().expect("cidr"),
        ];
        assert_eq!(d.rules[0].allowed_sources, want);
        spec_mut(&mut s).load_balancer_source_ranges = Some(vec!["ten/8".into()]);
        let e = desired(&s).expect_err("invalid");
        assert!(e.to_string().contains("spec.loadBalancerSourceRanges[0]"), "{e}");
    }

    fn with_families(mut s: Service, families: &[&str], policy: &str) -> Service {
        spec_mut(&mut s).ip_families = Some(families.iter().map(|f| (*f).to_owned()).collect());
        spec_mut(&mut s).ip_family_policy = Some(policy.to_owned());
        s
    }

    /// `ipFamilies` / `ipFamilyPolicy` through the whole desired LB (the table of cases
    /// is in `families`): the LB's families, and the refusal before anything else.
    #[test]
    fn ip_families_decide_the_lb_families() {
        use IpVersion::{V4, V6};
        assert_eq!(desired(&svc()).expect("d").ip_versions, vec![V4], "IPv4 as before");
        assert_eq!(
            desired_load_balancer(&svc(), &nodes3(), &dual_cfg())
                .expect("d")
                .ip_versions,
            vec![V4],
            "an IPv4 Service on a dual-stack platform cluster stays IPv4"
        );
        let prefer = with_families(svc(), &["IPv4", "IPv6"], "PreferDualStack");
        let d = desired_load_balancer(&prefer, &nodes3(), &dual_cfg()).expect("d");
        assert_eq!(d.ip_versions, vec![V4, V6]);
        assert_eq!(
            desired(&prefer).expect("d").ip_versions,
            vec![V4],
            "no IPv6 on the platform"
        );

        let require = with_families(svc(), &["IPv4", "IPv6"], "RequireDualStack");
        assert_eq!(
            desired_load_balancer(&require, &nodes3(), &dual_cfg())
                .expect("d")
                .ip_versions,
            vec![V4, V6]
        );
        let e = desired(&require).expect_err("refused");
        assert_eq!(e.reason(), "IPv6Unavailable");
        assert!(matches!(&e, Refusal::Ipv6Unavailable { field, .. } if field == "spec.ipFamilyPolicy"));
        let v6 = with_families(svc(), &["IPv6"], "SingleStack");
        assert_eq!(desired(&v6).expect_err("refused").reason(), "IPv6Unavailable");
        assert_eq!(
            desired_load_balancer(&v6, &nodes3(), &dual_cfg())
                .expect("d")
                .ip_versions,
            vec![V6]
        );
        // The policy is part of what the LB is: switching it changes the desired LB.
        assert_ne!(
            desired_load_balancer(&prefer, &nodes3(), &dual_cfg()).expect("d"),
            desired_load_balancer(&svc(), &nodes3(), &dual_cfg()).expect("d")
        );
    }

    /// An IPv6-only LB can only send to VMs with IPv6: its backends are the nodes with an
    /// IPv6 InternalIP. Dual-stack keeps every node (the platform gives IPv6 clients only
    /// to backends with a `private_ipv6`), and knows each backend's IPv6 address.
    #[test]
    fn backends_by_the_families_the_lb_serves() {
        use crate::service::nodes::tests::with_internal_ips;
        let nodes = vec![
            with_internal_ips(node("a"), &["127.10.0.11", "fd00:10::11"]),
            with_internal_ips(node("b"), &["127.10.0.12"]),
            with_internal_ips(node("c"), &["fd00:10::13"]),
        ];
        let ids = |d: &DesiredLb| d.backends.iter().map(|b| b.vm_id.clone()).collect::<Vec<_>>();
        let v4 = desired_load_balancer(&svc(), &nodes, &dual_cfg()).expect("d");
        assert_eq!(ids(&v4), vec!["vm-a", "vm-b", "vm-c"]);
        assert!(v4.backend_ipv6s.is_empty(), "an IPv4 LB compares no IPv6 address");
        let dual = with_families(svc(), &["IPv4", "IPv6"], "RequireDualStack");
        let d = desired_load_balancer(&dual, &nodes, &dual_cfg()).expect("d");
        assert_eq!(ids(&d), vec!["vm-a", "vm-b", "vm-c"]);
        assert_eq!(d.eligible_backends, 3);
        assert_eq!(
            d.backend_ipv6s.keys().cloned().collect::<Vec<_>>(),
            vec!["vm-a".to_owned(), "vm-c".to_owned()]
        );
        let v6 = with_families(svc(), &["IPv6"], "SingleStack");
        let d = desired_load_balancer(&v6, &nodes, &dual_cfg()).expect("d");
        assert_eq!(ids(&d), vec!["vm-a", "vm-c"]);
        assert_eq!(d.eligible_backends, 2);
        // The node selector still applies on top.
        let selected = annotate(v6, a::NODE_SELECTOR, "pool=edge");
        let mut edged = nodes.clone();
        edged[2] = with_label(edged[2].clone(), "pool", "edge");
        edged[1] = with_label(edged[1].clone(), "pool", "edge");
        let d = desired_load_balancer(&selected, &edged, &dual_cfg()).expect("d");
        assert_eq!(ids(&d), vec!["vm-c"]);
    }

    /// Source ranges of both families go to every rule (the platform matches a client
    /// against the CIDRs of its family); an invalid one, of either family, is refused.
    #[test]
    fn source_ranges_of_both_families() {
        let mut s = with_families(svc(), &["IPv4", "IPv6"], "PreferDualStack");
        spec_mut(&mut s).load_balancer_source_ranges = Some(vec![
            "2001:db8::/32".into(),
            "10.0.0.0/8".into(),
            " fd00:1::7/64".into(),
            "2001:db8::/32".into(),
        ]);
        let d = desired_load_balancer(&s, &nodes3(), &dual_cfg()).expect("desired");
        let want: Vec<IpNet> = ["10.0.0.0/8", "2001:db8::/32", "fd00:1::/64"]
            .iter()
            .map(|c| c.parse().expect("cidr"))
            .collect();
        assert!(d.rules.iter().all(|r| r.allowed_sources == want), "{:?}", d.rules);
        for bad in ["fd00::/129", "fd00:::1/64", "2001:db8::"] {
            spec_mut(&mut s).load_balancer_source_ranges = Some(vec!["10.0.0.0/8".into(), bad.into()]);
            let e = desired_load_balancer(&s, &nodes3(), &dual_cfg()).expect_err(bad);
            assert_eq!(e.reason(), "UnsupportedServiceSpec");
            assert!(e.to_string().contains("spec.loadBalancerSourceRanges[1]"), "{e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    /// `spec.loadBalancerIP` may name a public IP of either family the LB serves; the
    /// public-IP annotation names the IPv4 one, so an IPv6-only LB cannot take it.
    #[test]
    fn reused_public_ips_by_family() {
        let dual = with_families(svc(), &["IPv4", "IPv6"], "RequireDualStack");
        let mut by_v6 = dual.clone();
        spec_mut(&mut by_v6).load_balancer_ip = Some("fd00:203::9".into());
        assert_eq!(
            desired_load_balancer(&by_v6, &nodes3(), &dual_cfg())
                .expect("d")
                .public_ip,
            PublicIpRequest::Address("fd00:203::9".parse().expect("ip"))
        );
        let mut v6_on_v4 = svc();
        spec_mut(&mut v6_on_v4).load_balancer_ip = Some("fd00:203::9".into());
        let e = desired_load_balancer(&v6_on_v4, &nodes3(), &dual_cfg()).expect_err("refused");
        assert!(
            e.to_string()
                .starts_with("spec.loadBalancerIP: fd00:203::9 is an IPv6 address"),
            "{e}"
        );
        let v6_only = with_families(svc(), &["IPv6"], "SingleStack");
        let annotated = annotate(v6_only.clone(), a::PUBLIC_IP_ID, "ip-8d1e");
        let e = desired_load_balancer(&annotated, &nodes3(), &dual_cfg()).expect_err("refused");
        assert!(e.to_string().contains(a::PUBLIC_IP_ID), "{e}");
        assert!(e.to_string().contains("IPv6 only"), "{e}");
        let mut v4_on_v6 = v6_only;
        spec_mut(&mut v4_on_v6).load_balancer_ip = Some("127.203.0.10".into());
        assert!(desired_load_balancer(&v4_on_v6, &nodes3(), &dual_cfg()).is_err());
        let annotated_dual = annotate(dual, a::PUBLIC_IP_ID, "ip-8d1e");
        assert_eq!(
            desired_load_balancer(&annotated_dual, &nodes3(), &dual_cfg())
                .expect("d")
                .public_ip,
            PublicIpRequest::Id("ip-8d1e".into())
        );
    }

    #[test]
    fn session_affinity_and_algorithm_annotation() {
        let mut s = svc();
        spec_mut(&mut s).session_affinity = Some("ClientIP".into());
        assert_eq!(desired(&s).expect("d").rules[0].algorithm, Algorithm::Source);
        let s = annotate(s, a::ALGORITHM, "least_connection");
        assert_eq!(desired(&s).expect("d").rules[0].algorithm, Algorithm::LeastConnection);
        let s = annotate(svc(), a::ALGORITHM, "random");
        let e = desired(&s).expect_err("invalid");
        assert_eq!(e.reason(), "InvalidAnnotation");
        assert!(e.to_string().contains(a::ALGORITHM));
    }

    #[test]
    fn health_check_annotations() {
        let s = annotate(
            annotate(
                annotate(
                    annotate(svc(), a::HEALTH_CHECK_PATH, "/ready"),
                    a::HEALTH_CHECK_PORT,
                    "8080",
                ),
                a::HEALTH_CHECK_INTERVAL,
                "10",
            ),
            a::HEALTH_CHECK_UNHEALTHY_THRESHOLD,
            "5",
        );
        let hc = desired(&s).expect("d").rules[0].health_check.clone().expect("hc");
        assert_eq!(hc.port, Some(8080));
        assert_eq!(hc.path.as_deref(), Some("/ready"));
        assert_eq!((hc.interval_s, hc.timeout_s), (Some(10), Some(DEFAULT_HC_TIMEOUT_S)));
        assert_eq!(hc.unhealthy_threshold, Some(5));
        let tcp = annotate(svc(), a::HEALTH_CHECK_PROTOCOL, "tcp");
        let hc = desired(&tcp).expect("d").rules[0].health_check.clone().expect("hc");
        assert_eq!(
            (hc.protocol, hc.port, hc.path),
            (HealthCheckProtocol::Tcp, Some(31080), None)
        );
        let bad = annotate(
            annotate(svc(), a::HEALTH_CHECK_INTERVAL, "3"),
            a::HEALTH_CHECK_TIMEOUT,
            "3",
        );
        let e = desired(&bad).expect_err("timeout >= interval");
        assert!(e.to_string().contains(a::HEALTH_CHECK_TIMEOUT), "{e}");
    }

    #[test]
    fn public_ip_reuse_and_load_balancer_ip() {
        let s = annotate(svc(), a::PUBLIC_IP_ID, "ip-8d1e");
        assert_eq!(desired(&s).expect("d").public_ip, PublicIpRequest::Id("ip-8d1e".into()));
        let mut s2 = svc();
        spec_mut(&mut s2).load_balancer_ip = Some("127.203.0.10".into());
        assert_eq!(
            desired(&s2).expect("d").public_ip,
            PublicIpRequest::Address("127.203.0.10".parse().expect("ip"))
        );
        spec_mut(&mut s2).load_balancer_ip = Some("nope".into());
        assert!(desired(&s2).is_err());
        let mut both = annotate(svc(), a::PUBLIC_IP_ID, "ip-1");
        spec_mut(&mut both).load_balancer_ip = Some("127.203.0.10".into());
        assert!(
            desired(&both)
                .expect_err("both")
                .to_string()
                .contains("spec.loadBalancerIP")
        );
        let retained = annotate(svc(), a::RETAIN_PUBLIC_IP, "true");
        let d = desired(&retained).expect("d");
        assert!(d.retain_public_ip);
        assert_eq!(d.labels[LABEL_RETAIN_PUBLIC_IP], "true");
    }

    #[test]
    fn name_annotation_and_long_default_names() {
        let s = annotate(svc(), a::NAME, "my-lb");
        assert_eq!(desired(&s).expect("d").name, "my-lb");
        let long = default_lb_name(&"n".repeat(40), &"s".repeat(40));
        assert!(long.len() <= 63 && a::is_valid_lb_name(&long), "{long}");
        assert_eq!(long, default_lb_name(&"n".repeat(40), &"s".repeat(40)), "stable");
        assert_ne!(long, default_lb_name(&"n".repeat(40), &"s".repeat(41)));
    }

    #[test]
    fn invalid_annotation_is_refused_whatever_else_is_set() {
        let s = annotate(svc(), a::PROXY_PROTOCOL, "true");
        assert!(matches!(desired(&s), Err(Refusal::Annotation(e)) if e.key == a::PROXY_PROTOCOL));
        let s = annotate(svc(), "lb.cloudraya.com/helth-check-path", "/x");
        assert!(matches!(desired(&s), Err(Refusal::Annotation(_))));
    }

    /// Upstream's `TestNeedsUpdate`: which Service changes must change the load
    /// balancer. Here "needs update" is "the desired LB differs".
    #[test]
    fn service_changes_that_change_the_load_balancer() {
        let base = svc();
        let d0 = desired(&base).expect("d");
        let changed = |f: &dyn Fn(&mut Service)| {
            let mut s = base.clone();
            f(&mut s);
            desired(&s).expect("d") != d0
        };
        assert!(changed(
            &|s| spec_mut(s).ports = Some(vec![port("http", "TCP", 8080, Some(31080))])
        ));
        assert!(changed(
            &|s| spec_mut(s).ports = Some(vec![port("http", "TCP", 80, Some(31081))])
        ));
        assert!(changed(
            &|s| spec_mut(s).ports = Some(vec![port("http", "UDP", 80, Some(31080))])
        ));
        assert!(changed(
            &|s| spec_mut(s).load_balancer_source_ranges = Some(vec!["1.2.3.4/32".into()])
        ));
        assert!(changed(&|s| spec_mut(s).session_affinity = Some("ClientIP".into())));
        assert!(changed(&|s| spec_mut(s).load_balancer_ip = Some("127.203.0.9".into())));
        assert!(changed(&|s| {
            spec_mut(s).external_traffic_policy = Some("Local".into());
            spec_mut(s).health_check_node_port = Some(32000);
        }));
        assert!(changed(&|s| *s = annotate(s.clone(), a::ALGORITHM, "source")));
        assert!(changed(&|s| s.metadata.uid = Some("uid-2".into())));
        // Not load-balancer relevant: the port's name and target port, other
        // annotations, labels, the cluster IP.
        assert!(!changed(
            &|s| spec_mut(s).ports = Some(vec![port("web", "TCP", 80, Some(31080))])
        ));
        assert!(!changed(&|s| *s = annotate(s.clone(), "example.com/owner", "team-a")));
        assert!(!changed(&|s| spec_mut(s).cluster_ip = Some("10.96.0.10".into())));
        assert!(!changed(&|s| spec_mut(s).session_affinity = Some("None".into())));
    }

    #[test]
    fn an_lb_name_two_services_want_goes_to_the_older() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let named = |ns: &str, name: &str, uid: &str, secs: i64| {
            let mut s = annotate(svc(), "lb.cloudraya.com/name", "shared");
            s.metadata.namespace = Some(ns.into());
            s.metadata.name = Some(name.into());
            s.metadata.uid = Some(uid.into());
            s.metadata.creation_timestamp = Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + secs).unwrap(),
            ));
            s
        };
        // Names and namespaces in both orders: only age counts.
        for (old, new) in [
            (named("zz", "zz", "u-z", 1), named("aa", "aa", "u-a", 2)),
            (named("aa", "aa", "u-a", 1), named("zz", "zz", "u-z", 2)),
        ] {
            let all = [old.clone(), new.clone()];
            let older = format!(
                "{}/{}",
                old.metadata.namespace.as_deref().unwrap(),
                old.metadata.name.as_deref().unwrap()
            );
            assert_eq!(older_claimant(&new, "shared", all.iter()), Some(older));
            assert_eq!(older_claimant(&old, "shared", all.iter()), None);
        }
        // Same second: the UID decides, the same way for both.
        let (a, b) = (named("x", "a", "u-1", 5), named("x", "b", "u-2", 5));
        assert_eq!(
            older_claimant(&b, "shared", [a.clone(), b.clone()].iter()),
            Some("x/a".into())
        );
        assert_eq!(older_claimant(&a, "shared", [a.clone(), b.clone()].iter()), None);
        // An older Service that no longer wants an LB, is being deleted, or wants another
        // name claims nothing.
        let old = named("x", "old", "u-0", 0);
        let mut cip = old.clone();
        cip.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        let mut deleting = old.clone();
        deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let other_name = annotate(old.clone(), "lb.cloudraya.com/name", "elsewhere");
        for o in [cip, deleting, other_name] {
            assert_eq!(older_claimant(&b, "shared", [o, b.clone()].iter()), None);
        }
        // Default names that meet (`kr-a-b-c` for `a-b/c` and `a/b-c`), neither annotated.
        let unnamed = |ns: &str, name: &str, uid: &str, secs: i64| {
            let mut s = named(ns, name, uid, secs);
            s.metadata.annotations = None;
            s
        };
        let (old, new) = (unnamed("a", "b-c", "u-old", 1), unnamed("a-b", "c", "u-new", 2));
        assert_eq!(desired_lb_name(&old), desired_lb_name(&new));
        let all = [new.clone(), old.clone()];
        assert_eq!(older_claimant(&new, "kr-a-b-c", all.iter()), Some("a/b-c".into()));
        assert_eq!(older_claimant(&old, "kr-a-b-c", all.iter()), None);
    }
}

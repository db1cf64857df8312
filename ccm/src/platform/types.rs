//! Wire types of the CloudRaya platform API, as `docs/platform-api.md` writes them.
//!
//! Decoding is lenient where the contract may grow: unknown fields are ignored, unknown
//! enum values decode to an `Other(String)` variant, and a `null` list or label map reads
//! as empty. Required fields stay required: an object without its `id` is a decode error.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Labels of a platform object (string keys and values; see [`super::labels`]).
pub type Labels = BTreeMap<String, String>;

/// Reads `null` as the type's default (an empty list or map).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// An IP version of the API (`4` or `6` on the wire). **Assumption**: the platform's IPv6
/// extension (`docs/platform-api.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum IpVersion {
    #[default]
    V4,
    V6,
}

impl IpVersion {
    /// The version of an address (an IPv4-mapped IPv6 address is IPv6 here: it is how the
    /// address is written, not where it leads).
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => IpVersion::V4,
            IpAddr::V6(_) => IpVersion::V6,
        }
    }

    /// The wire number.
    pub fn number(self) -> u8 {
        match self {
            IpVersion::V4 => 4,
            IpVersion::V6 => 6,
        }
    }
}

impl fmt::Display for IpVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IPv{}", self.number())
    }
}

impl Serialize for IpVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.number())
    }
}

impl<'de> Deserialize<'de> for IpVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u64::deserialize(d)? {
            4 => Ok(IpVersion::V4),
            6 => Ok(IpVersion::V6),
            n => Err(serde::de::Error::custom(format!("IP version {n} is neither 4 nor 6"))),
        }
    }
}

/// `[4]`: what an object without `ip_versions` has (data from before the IPv6 extension).
pub fn ipv4_only() -> Vec<IpVersion> {
    vec![IpVersion::V4]
}

/// Reads an absent or `null` `ip_versions` as `[4]`.
fn ip_versions_or_v4<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpVersion>, D::Error> {
    Ok(Option::<Vec<IpVersion>>::deserialize(d)?.unwrap_or_else(ipv4_only))
}

/// A string enum of the API with a catch-all for values this client does not know yet,
/// so that a platform adding a state does not make every list call fail.
macro_rules! api_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
            /// A value this client does not know (kept verbatim).
            Other(String),
        }

        impl $name {
            /// The wire spelling.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $wire,)+
                    $name::Other(s) => s.as_str(),
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                match s {
                    $($wire => $name::$variant,)+
                    other => $name::Other(other.to_owned()),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Ok($name::from(s.as_str()))
            }
        }
    };
}

api_enum!(
    /// A VM's state.
    InstanceState {
        Running = "running",
        Stopped = "stopped",
        Starting = "starting",
        Stopping = "stopping",
        Deleted = "deleted",
    }
);

api_enum!(
    /// Layer-4 protocol of a load-balancer rule.
    RuleProtocol {
        Tcp = "tcp",
        Udp = "udp",
    }
);

api_enum!(
    /// How a rule picks a healthy backend for a new connection or flow.
    Algorithm {
        RoundRobin = "round_robin",
        LeastConnection = "least_connection",
        Source = "source",
    }
);

api_enum!(
    /// Health-check protocol: `tcp` connects, `http` wants a 2xx to `GET path`.
    HealthCheckProtocol {
        Tcp = "tcp",
        Http = "http",
    }
);

api_enum!(
    /// Status of a load balancer (create and update are asynchronous).
    LbStatus {
        Provisioning = "provisioning",
        Active = "active",
        Updating = "updating",
        Error = "error",
        Deleting = "deleting",
    }
);

api_enum!(
    /// Health of one backend for one rule, as the platform's checks see it.
    HealthState {
        Healthy = "healthy",
        Unhealthy = "unhealthy",
        /// Not checked yet.
        Unknown = "unknown",
    }
);

api_enum!(
    /// What a public IP is attached to.
    AttachmentKind {
        LoadBalancer = "load_balancer",
    }
);

/// A VM (`/vm/v1/instances`). Read-only for us: node pools own VMs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub package: String,
    pub state: InstanceState,
    /// Optional so that one VM still being set up does not fail a whole list.
    #[serde(default)]
    pub private_ip: Option<IpAddr>,
    #[serde(default)]
    pub public_ip: Option<IpAddr>,
    /// The VM's IPv6 address in its subnet's `ipv6_cidr`, when it has one (**assumption**).
    #[serde(default)]
    pub private_ipv6: Option<Ipv6Addr>,
    #[serde(default)]
    pub vpc_id: String,
    #[serde(default)]
    pub subnet_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: Labels,
    #[serde(default)]
    pub created_at: Option<String>,
}

/// `GET /network/v1/vpcs/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vpc {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub region: String,
    pub cidr: IpNet,
}

/// `GET /network/v1/subnets/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub vpc_id: String,
    #[serde(default)]
    pub region: String,
    pub cidr: IpNet,
    /// The subnet's IPv6 range; `None`: IPv4 only (**assumption**).
    #[serde(default)]
    pub ipv6_cidr: Option<IpNet>,
}

/// What a public IP is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "type")]
    pub kind: AttachmentKind,
    pub id: String,
}

/// A public IP (`/network/v1/public-ips`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicIp {
    pub id: String,
    pub address: IpAddr,
    /// 4 or 6; absent (data from before the IPv6 extension) is 4.
    #[serde(default)]
    pub version: IpVersion,
    #[serde(default)]
    pub region: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: Labels,
    /// `None` when free.
    #[serde(default)]
    pub attached_to: Option<Attachment>,
}

/// Body of `POST /network/v1/public-ips`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicIpSpec {
    pub region: String,
    /// `None`: the platform's default, 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<IpVersion>,
    #[serde(default)]
    pub labels: Labels,
}

/// `GET /kubernetes/v1/clusters/{cluster_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub region: String,
    pub vpc_id: String,
    pub subnet_id: String,
    /// The families the cluster's subnet carries: `[4]` or `[4, 6]`; absent is `[4]`.
    #[serde(default = "ipv4_only", deserialize_with = "ip_versions_or_v4")]
    pub ip_versions: Vec<IpVersion>,
}

impl Cluster {
    /// Whether the cluster's subnet carries IPv6 (VMs with `private_ipv6`, LBs with
    /// `public_ipv6`).
    pub fn has_ipv6(&self) -> bool {
        self.ip_versions.contains(&IpVersion::V6)
    }
}

/// A health check of a rule. Unset fields take the platform's defaults (see
/// [`HealthCheck::with_defaults`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub protocol: HealthCheckProtocol,
    /// Default: the rule's `private_port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// HTTP only; default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// 1–300, default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_s: Option<u32>,
    /// 1–60 and below `interval_s`, default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
    /// 1–10, default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    /// 1–10, default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
}

impl HealthCheck {
    pub const DEFAULT_INTERVAL_S: u32 = 10;
    pub const DEFAULT_TIMEOUT_S: u32 = 5;
    pub const DEFAULT_THRESHOLD: u32 = 3;

    /// A TCP connect check on `port`, every field explicit.
    pub fn tcp(port: u16) -> Self {
        HealthCheck {
            protocol: HealthCheckProtocol::Tcp,
            port: Some(port),
            path: None,
            interval_s: Some(Self::DEFAULT_INTERVAL_S),
            timeout_s: Some(Self::DEFAULT_TIMEOUT_S),
            healthy_threshold: Some(Self::DEFAULT_THRESHOLD),
            unhealthy_threshold: Some(Self::DEFAULT_THRESHOLD),
        }
    }

    /// An HTTP `GET path` check on `port`, every field explicit.
    pub fn http(port: u16, path: impl Into<String>) -> Self {
        HealthCheck {
            protocol: HealthCheckProtocol::Http,
            path: Some(path.into()),
            ..Self::tcp(port)
        }
    }

    /// This check with the contract's defaults filled in, so that what we asked for and
    /// what the platform echoes back (defaults applied) compare equal.
    pub fn with_defaults(&self, private_port: u16) -> Self {
        let is_http = self.protocol == HealthCheckProtocol::Http;
        HealthCheck {
            protocol: self.protocol.clone(),
            port: Some(self.port.unwrap_or(private_port)),
            path: match &self.path {
                Some(p) => Some(p.clone()),
                None if is_http => Some("/".to_owned()),
                None => None,
            },
            interval_s: Some(self.interval_s.unwrap_or(Self::DEFAULT_INTERVAL_S)),
            timeout_s: Some(self.timeout_s.unwrap_or(Self::DEFAULT_TIMEOUT_S)),
            healthy_threshold: Some(self.healthy_threshold.unwrap_or(Self::DEFAULT_THRESHOLD)),
            unhealthy_threshold: Some(self.unhealthy_threshold.unwrap_or(Self::DEFAULT_THRESHOLD)),
        }
    }
}

/// One listener of a load balancer: `public_port` -> backends' `private_port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    pub protocol: RuleProtocol,
    pub public_port: u16,
    pub private_port: u16,
    pub algorithm: Algorithm,
    /// Empty: any source.
    #[serde(default, deserialize_with = "null_as_default")]
    pub allowed_sources: Vec<IpNet>,
    /// `None`: TCP connect to `private_port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

/// A backend of a load balancer as the platform reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub vm_id: String,
    /// Filled by the platform from the VM at the last create/PUT (it is not refreshed
    /// when the VM's address changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<IpAddr>,
    /// The VM's `private_ipv6` at the last create/PUT; `None`: the backend gets no IPv6
    /// traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ipv6: Option<Ipv6Addr>,
}

/// A backend as written on create and update: the VM only.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BackendRef {
    pub vm_id: String,
}

impl BackendRef {
    pub fn new(vm_id: impl Into<String>) -> Self {
        BackendRef { vm_id: vm_id.into() }
    }
}

/// Health of one backend for one rule (read-only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendHealth {
    pub rule: String,
    pub vm_id: String,
    pub state: HealthState,
}

/// The public IP of a load balancer, as embedded in the LB object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbPublicIp {
    pub id: String,
    pub address: IpAddr,
}

/// A load balancer of a Kubernetes Service
/// (`/kubernetes/v1/clusters/{cluster_id}/load-balancers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancer {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub vpc_id: String,
    #[serde(default)]
    pub subnet_id: String,
    /// The families the LB listens on: `[4]`, `[6]` or `[4, 6]`; absent is `[4]`.
    #[serde(default = "ipv4_only", deserialize_with = "ip_versions_or_v4")]
    pub ip_versions: Vec<IpVersion>,
    /// The IPv4 public IP. Optional so that an LB whose IP is not assigned yet still
    /// decodes; `None` too when 4 is not in `ip_versions`.
    #[serde(default)]
    pub public_ip: Option<LbPublicIp>,
    /// The IPv6 public IP, when 6 is in `ip_versions` (**assumption**).
    #[serde(default)]
    pub public_ipv6: Option<LbPublicIp>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: Labels,
    pub status: LbStatus,
    #[serde(default, deserialize_with = "null_as_default")]
    pub status_message: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub rules: Vec<Rule>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub backends: Vec<Backend>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub health: Vec<BackendHealth>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
}

impl LoadBalancer {
    /// The writable set as it stands, a starting point for a `PUT`.
    pub fn to_update(&self) -> LoadBalancerUpdate {
        LoadBalancerUpdate {
            rules: self.rules.clone(),
            backends: self.backends.iter().map(|b| BackendRef::new(b.vm_id.clone())).collect(),
            labels: self.labels.clone(),
            ip_versions: Some(self.ip_versions.clone()),
        }
    }

    /// The LB's public IPs, IPv4 first.
    pub fn public_ips(&self) -> impl Iterator<Item = &LbPublicIp> {
        self.public_ip.iter().chain(self.public_ipv6.iter())
    }
}

/// Body of `POST .../load-balancers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancerSpec {
    pub name: String,
    /// Reuse this (free, same-region) public IP; `None`: the platform acquires one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip_id: Option<String>,
    /// Reuse this (free, same-region) IPv6 public IP; `None`: the platform acquires one
    /// when 6 is in `ip_versions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ipv6_id: Option<String>,
    /// `None`: the platform's default, `[4]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_versions: Option<Vec<IpVersion>>,
    #[serde(default)]
    pub labels: Labels,
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub backends: Vec<BackendRef>,
}

/// Body of `PUT .../load-balancers/{id}`: replaces the whole writable set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancerUpdate {
    pub rules: Vec<Rule>,
    pub backends: Vec<BackendRef>,
    pub labels: Labels,
    /// `None`: unchanged. A family added acquires a public IP of it; one removed releases
    /// the IP the platform acquired (or detaches one attached by id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_versions: Option<Vec<IpVersion>>,
}

/// The `data` of a list endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(deserialize = "T: Deserialize<'de>"))]
pub struct Page<T> {
    #[serde(deserialize_with = "null_as_default")]
    pub items: Vec<T>,
    pub page: u32,
    pub per_page: u32,
    pub total: u64,
}

/// Objects with a platform ID (used to de-duplicate across pages).
pub trait HasId {
    fn id(&self) -> &str;
}

macro_rules! has_id {
    ($($t:ty),+) => {
        $(impl HasId for $t {
            fn id(&self) -> &str {
                &self.id
            }
        })+
    };
}
has_id!(Instance, PublicIp, LoadBalancer, Vpc, Subnet, Cluster);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// Decodes `doc`, re-encodes it and checks nothing was lost or changed.
    fn round_trip<T: serde::de::DeserializeOwned + Serialize>(doc: &Value) -> T {
        let v: T = serde_json::from_value(doc.clone()).expect("decodes");
        let back = serde_json::to_value(&v).expect("encodes");
        assert_eq!(&back, doc);
        v
    }

    #[test]
    fn instance_from_doc() {
        let doc = json!({
          "id": "vm-3f2a9c", "name": "w1", "region": "jkt", "zone": "jkt-a",
          "package": "standard-2", "state": "running",
          "private_ip": "127.10.0.11", "public_ip": null, "private_ipv6": "fd00:10::b",
          "vpc_id": "vpc-1", "subnet_id": "subnet-1",
          "labels": {"kuberaya.cloudraya.com/cluster-id": "cl-1"},
          "created_at": "2026-11-25T17:00:00Z"
        });
        let vm: Instance = round_trip(&doc);
        assert_eq!(vm.private_ipv6, Some("fd00:10::b".parse().expect("ip")));
        assert_eq!(vm.state, InstanceState::Running);
        assert_eq!(vm.private_ip, Some("127.10.0.11".parse().expect("ip")));
        assert_eq!(vm.labels[crate::platform::labels::LABEL_CLUSTER_ID], "cl-1");
    }

    #[test]
    fn unknown_enum_values_and_fields_are_tolerated() {
        let vm: Instance = serde_json::from_value(json!({
            "id": "vm-1", "state": "hibernating", "labels": null, "future_field": [1, 2]
        }))
        .expect("decodes");
        assert_eq!(vm.state, InstanceState::Other("hibernating".into()));
        assert_eq!(vm.state.as_str(), "hibernating");
        assert!(vm.labels.is_empty());
        assert_eq!(serde_json::to_value(&vm.state).expect("encodes"), json!("hibernating"));
    }

    #[test]
    fn missing_required_field_is_an_error() {
        let r: Result<Instance, _> = serde_json::from_value(json!({"state": "running"}));
        assert!(r.is_err());
        let r: Result<Vpc, _> = serde_json::from_value(json!({"id": "vpc-1", "cidr": "not-a-cidr"}));
        assert!(r.is_err());
    }

    #[test]
    fn networks_from_doc() {
        let vpc: Vpc = round_trip(&json!({"id": "vpc-1", "name": "main", "region": "jkt", "cidr": "10.0.0.0/16"}));
        assert_eq!(vpc.cidr.prefix_len(), 16);
        let subnet: Subnet = round_trip(&json!({
            "id": "subnet-1", "name": "workers", "vpc_id": "vpc-1", "region": "jkt", "cidr": "127.10.0.0/24",
            "ipv6_cidr": "fd00:10::/112"
        }));
        assert_eq!(subnet.ipv6_cidr, Some("fd00:10::/112".parse().expect("cidr")));
        let cluster: Cluster = round_trip(&json!({
            "id": "cl-1", "name": "prod", "region": "jkt", "vpc_id": "vpc-1", "subnet_id": "subnet-1",
            "ip_versions": [4, 6]
        }));
        assert!(cluster.has_ipv6());
    }

    #[test]
    fn public_ip_from_doc() {
        let ip: PublicIp = round_trip(&json!({
            "id": "ip-8d1e", "address": "127.203.0.10", "version": 4, "region": "jkt",
            "labels": {"a": "b"}, "attached_to": {"type": "load_balancer", "id": "lb-12ab"}
        }));
        assert_eq!(
            ip.attached_to,
            Some(Attachment {
                kind: AttachmentKind::LoadBalancer,
                id: "lb-12ab".into()
            })
        );
        let free: PublicIp = round_trip(&json!({
            "id": "ip-1", "address": "fd00:203::11", "version": 6, "region": "jkt", "labels": {}, "attached_to": null
        }));
        assert_eq!(free.attached_to, None);
        assert_eq!(free.version, IpVersion::V6);
    }

    fn doc_lb() -> Value {
        json!({
          "id": "lb-12ab",
          "name": "kr-cl1-default-web",
          "region": "jkt", "vpc_id": "vpc-1", "subnet_id": "subnet-1",
          "ip_versions": [4, 6],
          "public_ip": {"id": "ip-8d1e", "address": "127.203.0.10"},
          "public_ipv6": {"id": "ip-9a2f", "address": "fd00:203::10"},
          "labels": {"kuberaya.cloudraya.com/cluster-id": "cl-1"},
          "status": "active",
          "status_message": "",
          "rules": [
            {
              "name": "http",
              "protocol": "tcp",
              "public_port": 80,
              "private_port": 31080,
              "algorithm": "round_robin",
              "allowed_sources": [],
              "health_check": {
                "protocol": "http", "port": 10256, "path": "/healthz",
                "interval_s": 5, "timeout_s": 3,
                "healthy_threshold": 2, "unhealthy_threshold": 3
              }
            }
          ],
          "backends": [
            {"vm_id": "vm-3f2a9c", "private_ip": "127.10.0.11", "private_ipv6": "fd00:10::b"},
            {"vm_id": "vm-7c11d0", "private_ip": "127.10.0.12"}
          ],
          "health": [{"rule": "http", "vm_id": "vm-3f2a9c", "state": "healthy"}],
          "created_at": "2026-11-25T17:00:00Z",
          "updated_at": "2026-11-25T17:00:02Z"
        })
    }

    #[test]
    fn load_balancer_from_doc() {
        let lb: LoadBalancer = round_trip(&doc_lb());
        assert_eq!(lb.status, LbStatus::Active);
        let rule = &lb.rules[0];
        assert_eq!(rule.protocol, RuleProtocol::Tcp);
        assert_eq!(rule.algorithm, Algorithm::RoundRobin);
        let hc = rule.health_check.as_ref().expect("health check");
        assert_eq!(hc.protocol, HealthCheckProtocol::Http);
        assert_eq!(hc.with_defaults(rule.private_port), hc.clone());
        assert_eq!(lb.health[0].state, HealthState::Healthy);
        assert_eq!(lb.ip_versions, vec![IpVersion::V4, IpVersion::V6]);
        let addresses: Vec<String> = lb.public_ips().map(|ip| ip.address.to_string()).collect();
        assert_eq!(addresses, ["127.203.0.10", "fd00:203::10"]);
        assert_eq!(lb.backends[1].private_ipv6, None);
        let upd = lb.to_update();
        assert_eq!(
            upd.backends,
            vec![BackendRef::new("vm-3f2a9c"), BackendRef::new("vm-7c11d0")]
        );
        assert_eq!(upd.ip_versions, Some(vec![IpVersion::V4, IpVersion::V6]));
    }

    /// Answers of a platform from before the IPv6 extension (no `version`, `ip_versions`,
    /// `ipv6_cidr`, `private_ipv6`, `public_ipv6`) decode as IPv4 only.
    #[test]
    fn documents_without_the_ipv6_fields_are_ipv4() {
        let lb: LoadBalancer = serde_json::from_value(json!({
            "id": "lb-1", "name": "x", "status": "active",
            "public_ip": {"id": "ip-1", "address": "127.203.0.10"},
            "backends": [{"vm_id": "vm-1", "private_ip": "127.10.0.11"}]
        }))
        .expect("decodes");
        assert_eq!(lb.ip_versions, vec![IpVersion::V4]);
        assert_eq!(lb.public_ipv6, None);
        assert_eq!(lb.backends[0].private_ipv6, None);
        assert_eq!(lb.public_ips().count(), 1);
        let null_versions: LoadBalancer =
            serde_json::from_value(json!({"id": "lb-1", "name": "x", "status": "active", "ip_versions": null}))
                .expect("decodes");
        assert_eq!(null_versions.ip_versions, vec![IpVersion::V4]);

        let ip: PublicIp = serde_json::from_value(json!({"id": "ip-1", "address": "127.203.0.10"})).expect("decodes");
        assert_eq!(ip.version, IpVersion::V4);
        let cluster: Cluster = serde_json::from_value(json!({
            "id": "cl-1", "region": "jkt", "vpc_id": "vpc-1", "subnet_id": "subnet-1"
        }))
        .expect("decodes");
        assert_eq!(cluster.ip_versions, vec![IpVersion::V4]);
        assert!(!cluster.has_ipv6());
        let subnet: Subnet =
            serde_json::from_value(json!({"id": "s", "vpc_id": "v", "cidr": "127.10.0.0/24"})).expect("decodes");
        assert_eq!(subnet.ipv6_cidr, None);
        let vm: Instance = serde_json::from_value(json!({"id": "vm-1", "state": "running"})).expect("decodes");
        assert_eq!(vm.private_ipv6, None);
    }

    #[test]
    fn ip_versions_other_than_4_and_6_are_decode_errors() {
        assert_eq!(serde_json::to_value(IpVersion::V6).expect("encodes"), json!(6));
        assert_eq!(
            serde_json::from_value::<IpVersion>(json!(4)).expect("decodes"),
            IpVersion::V4
        );
        assert!(serde_json::from_value::<IpVersion>(json!(5)).is_err());
        assert!(serde_json::from_value::<IpVersion>(json!("6")).is_err());
        assert!(
            serde_json::from_value::<Instance>(json!({"id": "vm-1", "state": "running", "private_ipv6": "127.0.0.1"}))
                .is_err()
        );
        assert_eq!(IpVersion::of(&"::ffff:127.0.0.1".parse().expect("ip")), IpVersion::V6);
        assert_eq!(IpVersion::V6.to_string(), "IPv6");
    }

    #[test]
    fn load_balancer_while_provisioning() {
        let lb: LoadBalancer = serde_json::from_value(json!({
            "id": "lb-1", "name": "x", "status": "provisioning", "public_ip": null,
            "status_message": null, "rules": null, "backends": null
        }))
        .expect("decodes");
        assert_eq!(lb.status, LbStatus::Provisioning);
        assert!(lb.public_ip.is_none() && lb.rules.is_empty() && lb.backends.is_empty());
    }

    #[test]
    fn spec_serializes_as_the_doc_writes_it() {
        let spec = LoadBalancerSpec {
            name: "kr-cl1-default-web".into(),
            public_ip_id: None,
            public_ipv6_id: None,
            ip_versions: None,
            labels: Labels::from([("k".to_owned(), "v".to_owned())]),
            rules: vec![Rule {
                name: "dns".into(),
                protocol: RuleProtocol::Udp,
                public_port: 53,
                private_port: 30053,
                algorithm: Algorithm::Source,
                allowed_sources: vec!["10.0.0.0/8".parse().expect("cidr")],
                health_check: None,
            }],
            backends: vec![BackendRef::new("vm-1")],
        };
        assert_eq!(
            serde_json::to_value(&spec).expect("encodes"),
            json!({
                "name": "kr-cl1-default-web",
                "labels": {"k": "v"},
                "rules": [{"name": "dns", "protocol": "udp", "public_port": 53, "private_port": 30053,
                           "algorithm": "source", "allowed_sources": ["10.0.0.0/8"]}],
                "backends": [{"vm_id": "vm-1"}]
            })
        );
        let with_ip = LoadBalancerSpec {
            public_ip_id: Some("ip-8d1e".into()),
            ..spec
        };
        let v = serde_json::to_value(&with_ip).expect("encodes");
        assert_eq!(v["public_ip_id"], json!("ip-8d1e"));
        let dual = LoadBalancerSpec {
            public_ipv6_id: Some("ip-9a2f".into()),
            ip_versions: Some(vec![IpVersion::V4, IpVersion::V6]),
            ..with_ip
        };
        let v = serde_json::to_value(&dual).expect("encodes");
        assert_eq!(
            (&v["public_ipv6_id"], &v["ip_versions"]),
            (&json!("ip-9a2f"), &json!([4, 6]))
        );

        let upd = LoadBalancerUpdate {
            rules: vec![],
            backends: vec![],
            labels: Labels::new(),
            ip_versions: None,
        };
        assert_eq!(
            serde_json::to_value(&upd).expect("encodes"),
            json!({"rules": [], "backends": [], "labels": {}})
        );
        let upd = LoadBalancerUpdate {
            ip_versions: Some(vec![IpVersion::V6]),
            ..upd
        };
        assert_eq!(serde_json::to_value(&upd).expect("encodes")["ip_versions"], json!([6]));

        let v4 = PublicIpSpec {
            region: "jkt".into(),
            version: None,
            labels: Labels::new(),
        };
        assert_eq!(
            serde_json::to_value(&v4).expect("encodes"),
            json!({"region": "jkt", "labels": {}})
        );
        let v6 = PublicIpSpec {
            version: Some(IpVersion::V6),
            ..v4
        };
        assert_eq!(
            serde_json::to_value(&v6).expect("encodes"),
            json!({"region": "jkt", "version": 6, "labels": {}})
        );
    }

    #[test]
    fn health_check_defaults() {
        let hc = HealthCheck {
            protocol: HealthCheckProtocol::Http,
            port: None,
            path: None,
            interval_s: None,
            timeout_s: None,
            healthy_threshold: None,
            unhealthy_threshold: None,
        };
        assert_eq!(hc.with_defaults(31080), HealthCheck::http(31080, "/"));
        assert_eq!(serde_json::to_value(&hc).expect("encodes"), json!({"protocol": "http"}));
        let tcp = HealthCheck::tcp(10256);
        assert_eq!(tcp.with_defaults(1), tcp);
    }

    #[test]
    fn page_from_doc() {
        let p: Page<Cluster> = serde_json::from_value(json!({
            "items": [{"id": "cl-1", "name": "a", "region": "jkt", "vpc_id": "v", "subnet_id": "s"}],
            "page": 1, "per_page": 50, "total": 123
        }))
        .expect("decodes");
        assert_eq!((p.items.len(), p.page, p.per_page, p.total), (1, 1, 50, 123));
    }
}

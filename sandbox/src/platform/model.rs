//! The stand-in's own wire and state types, written from `docs/platform-api.md` (never
//! shared with the CCM's client: a misreading must not hide by being made on both sides).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::forward::HealthState;

pub type Labels = BTreeMap<String, String>;

/// The label that ties workers and LBs to their cluster.
pub const CLUSTER_LABEL: &str = "kuberaya.cloudraya.com/cluster-id";

// ---------------------------------------------------------------------------------------
// The envelope

/// Marks a response as already wrapped in the envelope, so the safety net in `api` leaves
/// it alone.
#[derive(Debug, Clone, Copy)]
pub struct Enveloped;

/// `{"code", "message", "data", "error"}` around every answer. `data` and `error` are
/// kept as serialized JSON so that objects keep their fields in declaration order.
#[derive(Debug)]
pub struct Envelope {
    status: StatusCode,
    data: String,
    error: String,
}

impl Envelope {
    /// A success answer; `data` is serialized here.
    pub fn ok(status: StatusCode, data: &impl Serialize) -> Result<Self, serde_json::Error> {
        Ok(Self {
            status,
            data: serde_json::to_string(data)?,
            error: "null".into(),
        })
    }

    pub fn error(status: StatusCode, error: &serde_json::Value) -> Self {
        Self {
            status,
            data: "null".into(),
            error: error.to_string(),
        }
    }
}

fn reason(status: StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("Unknown")
}

impl IntoResponse for Envelope {
    fn into_response(self) -> Response {
        let body = format!(
            r#"{{"code":{},"message":{},"data":{},"error":{}}}"#,
            self.status.as_u16(),
            serde_json::Value::from(reason(self.status)),
            self.data,
            self.error
        );
        let mut response = (self.status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        response.extensions_mut().insert(Enveloped);
        response
    }
}

/// The `data` of a list endpoint.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub page: usize,
    pub per_page: usize,
    pub total: usize,
}

// ---------------------------------------------------------------------------------------
// IP versions (docs/platform-api.md, "IPv6")

/// `4` or `6` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum IpVersion {
    #[default]
    V4,
    V6,
}

impl IpVersion {
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => IpVersion::V4,
            IpAddr::V6(_) => IpVersion::V6,
        }
    }

    pub fn number(self) -> u8 {
        match self {
            IpVersion::V4 => 4,
            IpVersion::V6 => 6,
        }
    }

    pub fn from_number(n: i64) -> Option<Self> {
        match n {
            4 => Some(IpVersion::V4),
            6 => Some(IpVersion::V6),
            _ => None,
        }
    }

    /// `IPv4` / `IPv6`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            IpVersion::V4 => "IPv4",
            IpVersion::V6 => "IPv6",
        }
    }
}

impl Serialize for IpVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.number())
    }
}

impl<'de> Deserialize<'de> for IpVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        IpVersion::from_number(n).ok_or_else(|| serde::de::Error::custom(format!("IP version {n} is neither 4 nor 6")))
    }
}

/// `[4]`: what objects stored before the IPv6 extension have.
pub fn ipv4_only() -> Vec<IpVersion> {
    vec![IpVersion::V4]
}

/// Tells a field given as `null` (`Some(None)`) from one left out (`None`).
fn explicit_null<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

// ---------------------------------------------------------------------------------------
// Networks, clusters, VMs, public IPs

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Region {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Vpc {
    pub id: String,
    pub name: String,
    pub region: String,
    pub cidr: Ipv4Net,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Subnet {
    pub id: String,
    pub name: String,
    pub vpc_id: String,
    pub region: String,
    pub cidr: Ipv4Net,
    /// `None`: an IPv4-only subnet (also every subnet stored before the IPv6 extension).
    #[serde(default)]
    pub ipv6_cidr: Option<Ipv6Net>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Cluster {
    pub id: String,
    pub name: String,
    pub region: String,
    pub vpc_id: String,
    pub subnet_id: String,
}

/// A cluster as the API answers it: `ip_versions` follows its subnet.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClusterView<'a> {
    #[serde(flatten)]
    pub cluster: &'a Cluster,
    pub ip_versions: Vec<IpVersion>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Stopped,
    Starting,
    Stopping,
    Deleted,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Vm {
    pub id: String,
    pub name: String,
    pub region: String,
    pub zone: String,
    pub package: String,
    pub state: VmState,
    pub private_ip: Ipv4Addr,
    pub public_ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub private_ipv6: Option<Ipv6Addr>,
    pub vpc_id: String,
    pub subnet_id: String,
    pub labels: Labels,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Attachment {
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PublicIp {
    pub id: String,
    pub address: IpAddr,
    /// Stored IPs from before the IPv6 extension are IPv4.
    #[serde(default)]
    pub version: IpVersion,
    pub region: String,
    pub labels: Labels,
    pub attached_to: Option<Attachment>,
}

// ---------------------------------------------------------------------------------------
// Load balancers

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LbStatus {
    Provisioning,
    Active,
    Updating,
    Error,
    Deleting,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    RoundRobin,
    LeastConnection,
    Source,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckProtocol {
    Tcp,
    Http,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HealthCheck {
    pub protocol: HealthCheckProtocol,
    pub port: u16,
    /// Only for `http`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub interval_s: u32,
    pub timeout_s: u32,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Rule {
    pub name: String,
    pub protocol: Protocol,
    pub public_port: u16,
    pub private_port: u16,
    pub algorithm: Algorithm,
    pub allowed_sources: Vec<IpNet>,
    pub health_check: HealthCheck,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LbBackend {
    pub vm_id: String,
    pub private_ip: Ipv4Addr,
    /// `None`: this backend gets no IPv6 traffic. Left out of the answer then, so an
    /// IPv4 LB's backends read as before the IPv6 extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ipv6: Option<Ipv6Addr>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PublicIpRef {
    pub id: String,
    pub address: IpAddr,
}

/// The LB as the API shows it, less the computed `health` (see [`LbView`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoadBalancer {
    pub id: String,
    pub name: String,
    pub region: String,
    pub vpc_id: String,
    pub subnet_id: String,
    /// `[4]`, `[6]` or `[4, 6]`; LBs stored before the IPv6 extension are `[4]`.
    #[serde(default = "ipv4_only")]
    pub ip_versions: Vec<IpVersion>,
    /// The IPv4 public IP; `None` when 4 is not in `ip_versions`.
    pub public_ip: Option<PublicIpRef>,
    /// The IPv6 public IP; `None` when 6 is not in `ip_versions`.
    #[serde(default)]
    pub public_ipv6: Option<PublicIpRef>,
    pub labels: Labels,
    pub status: LbStatus,
    pub status_message: String,
    pub rules: Vec<Rule>,
    pub backends: Vec<LbBackend>,
    pub created_at: String,
    pub updated_at: String,
}

/// A stored LB: the object plus what only the platform needs to know.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LbRecord {
    pub cluster_id: String,
    #[serde(flatten)]
    pub lb: LoadBalancer,
    /// The platform acquired the public IP itself (so it releases it on delete by default).
    pub public_ip_acquired: bool,
    /// The same for the IPv6 public IP.
    #[serde(default)]
    pub public_ipv6_acquired: bool,
    /// Decided when the delete starts: release the public IPs (both families) once the LB
    /// is gone.
    #[serde(default)]
    pub release_public_ip: bool,
    #[serde(default)]
    pub release_public_ipv6: bool,
    /// Bumped on every transition, so a stale timer does nothing.
    #[serde(default)]
    pub generation: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HealthEntry {
    pub rule: String,
    pub vm_id: String,
    pub state: HealthState,
}

/// An LB as answered: the object with its `health` filled from the data plane.
#[derive(Debug, Serialize)]
pub struct LbView<'a> {
    #[serde(flatten)]
    pub lb: &'a LoadBalancer,
    pub health: Vec<HealthEntry>,
}

// ---------------------------------------------------------------------------------------
// Request bodies. Fields are optional so that a missing one is a 422 naming it, and
// numbers are wide so that an out-of-range port is a 422 rather than a type error.

#[derive(Debug, Default, Deserialize)]
pub struct LbInput {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub public_ip_id: Option<String>,
    #[serde(default)]
    pub public_ipv6_id: Option<String>,
    /// Wide numbers, so that `[5]` is a 422 naming the field rather than a type error.
    #[serde(default)]
    pub ip_versions: Option<Vec<i64>>,
    #[serde(default)]
    pub labels: Option<Labels>,
    #[serde(default)]
    pub rules: Option<Vec<RuleInput>>,
    #[serde(default)]
    pub backends: Option<Vec<BackendInput>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct RuleInput {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub public_port: Option<i64>,
    #[serde(default)]
    pub private_port: Option<i64>,
    #[serde(default)]
    pub algorithm: Option<String>,
    #[serde(default)]
    pub allowed_sources: Option<Vec<String>>,
    #[serde(default)]
    pub health_check: Option<HealthCheckInput>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct HealthCheckInput {
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub interval_s: Option<i64>,
    #[serde(default)]
    pub timeout_s: Option<i64>,
    #[serde(default)]
    pub healthy_threshold: Option<i64>,
    #[serde(default)]
    pub unhealthy_threshold: Option<i64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct BackendInput {
    #[serde(default)]
    pub vm_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct LoginInput {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct PublicIpInput {
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub version: Option<i64>,
    #[serde(default)]
    pub labels: Option<Labels>,
}

#[derive(Debug, Deserialize)]
pub struct ClusterInput {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub vpc_id: Option<String>,
    #[serde(default)]
    pub subnet_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct VmInput {
    pub name: String,
    #[serde(default)]
    pub cluster_id: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub package: Option<String>,
    #[serde(default)]
    pub labels: Option<Labels>,
    #[serde(default)]
    pub private_ip: Option<Ipv4Addr>,
    /// Left out: one from the subnet's `ipv6_cidr` when it has one; `null`: none.
    #[serde(default, deserialize_with = "explicit_null")]
    pub private_ipv6: Option<Option<Ipv6Addr>>,
    #[serde(default)]
    pub public_ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub subnet_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct PrivateIpInput {
    #[serde(default)]
    pub private_ip: Option<Ipv4Addr>,
    /// Left out: unchanged; `null`: removed; an address: set.
    #[serde(default, deserialize_with = "explicit_null")]
    pub private_ipv6: Option<Option<Ipv6Addr>>,
}

/// The runtime settings of `/_sandbox/config`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SettingsView {
    pub provisioning_delay_ms: u64,
    pub udp_enabled: bool,
    pub token_ttl_s: u64,
}

#[derive(Debug, Default, Deserialize)]
pub struct SettingsInput {
    #[serde(default)]
    pub provisioning_delay_ms: Option<u64>,
    #[serde(default)]
    pub udp_enabled: Option<bool>,
    #[serde(default)]
    pub token_ttl_s: Option<u64>,
}

// ---------------------------------------------------------------------------------------
// Helpers

/// A fresh id such as `lb-3f2a9c`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// RFC 3339 in UTC with second precision, e.g. `2026-11-25T17:00:00Z` (the API stand-in's
/// formatter: one calendar conversion for the whole crate).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    crate::kube::util::rfc3339(i64::try_from(secs).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        // 2026-11-25T17:00:00Z
        let t = UNIX_EPOCH + Duration::from_secs(1_795_626_000);
        assert_eq!(rfc3339(t), "2026-11-25T17:00:00Z");
        // a leap day
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn ids_carry_their_prefix() {
        let id = new_id("lb");
        assert!(id.starts_with("lb-") && id.len() == 9, "{id}");
    }

    #[test]
    fn lb_record_flattens_the_object() {
        let record = LbRecord {
            cluster_id: "cl-1".into(),
            lb: LoadBalancer {
                id: "lb-1".into(),
                name: "web".into(),
                region: "jkt".into(),
                vpc_id: "vpc-1".into(),
                subnet_id: "subnet-1".into(),
                ip_versions: ipv4_only(),
                public_ip: Some(PublicIpRef {
                    id: "ip-1".into(),
                    address: Ipv4Addr::new(127, 203, 0, 10).into(),
                }),
                public_ipv6: None,
                labels: Labels::new(),
                status: LbStatus::Active,
                status_message: String::new(),
                rules: vec![],
                backends: vec![],
                created_at: now_rfc3339(),
                updated_at: now_rfc3339(),
            },
            public_ip_acquired: true,
            public_ipv6_acquired: false,
            release_public_ip: false,
            release_public_ipv6: false,
            generation: 3,
        };
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["name"], "web");
        assert_eq!(json["cluster_id"], "cl-1");
        let back: LbRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, record);
    }

    /// A record stored before the IPv6 extension loads as an IPv4-only LB.
    #[test]
    fn lb_record_without_ipv6_fields_loads() {
        let old = serde_json::json!({
            "cluster_id": "cl-1", "id": "lb-1", "name": "web", "region": "jkt", "vpc_id": "vpc-1",
            "subnet_id": "subnet-1", "public_ip": {"id": "ip-1", "address": "127.203.0.10"},
            "labels": {}, "status": "active", "status_message": "", "rules": [],
            "backends": [{"vm_id": "vm-1", "private_ip": "127.10.0.11"}],
            "created_at": "2026-11-25T17:00:00Z", "updated_at": "2026-11-25T17:00:00Z",
            "public_ip_acquired": true, "release_public_ip": false, "generation": 2
        });
        let record: LbRecord = serde_json::from_value(old).unwrap();
        assert_eq!(record.lb.ip_versions, vec![IpVersion::V4]);
        assert_eq!(record.lb.public_ipv6, None);
        assert_eq!(record.lb.backends[0].private_ipv6, None);
        assert!(!record.public_ipv6_acquired);
        let ip: PublicIp = serde_json::from_value(serde_json::json!({
            "id": "ip-1", "address": "127.203.0.10", "region": "jkt", "labels": {}, "attached_to": null
        }))
        .unwrap();
        assert_eq!(ip.version, IpVersion::V4);
        let vm: Vm = serde_json::from_value(serde_json::json!({
            "id": "vm-1", "name": "w1", "region": "jkt", "zone": "jkt-a", "package": "p", "state": "running",
            "private_ip": "127.10.0.11", "public_ip": null, "vpc_id": "v", "subnet_id": "s", "labels": {},
            "created_at": ""
        }))
        .unwrap();
        assert_eq!(vm.private_ipv6, None);
    }

    #[test]
    fn ip_versions_and_explicit_nulls() {
        assert_eq!(serde_json::to_value(IpVersion::V6).unwrap(), serde_json::json!(6));
        assert!(serde_json::from_value::<IpVersion>(serde_json::json!(5)).is_err());
        let left_out: PrivateIpInput = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(left_out.private_ipv6, None);
        let null: PrivateIpInput = serde_json::from_value(serde_json::json!({"private_ipv6": null})).unwrap();
        assert_eq!(null.private_ipv6, Some(None));
        let set: PrivateIpInput = serde_json::from_value(serde_json::json!({"private_ipv6": "fd00:10::b"})).unwrap();
        assert_eq!(set.private_ipv6, Some(Some("fd00:10::b".parse().unwrap())));
    }
}

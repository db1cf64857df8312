//! An in-memory [`Platform`] for reconcile tests: real semantics of the contract's
//! load-balancer and public-IP calls (asynchronous status, IP acquisition and release,
//! cluster isolation), a call log, and injectable failures. Time does not pass by itself:
//! [`FakePlatform::settle`] completes every pending operation, as the platform's data
//! plane would after its provisioning delay.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;

use async_trait::async_trait;

use super::types::*;
use super::{Error, FieldError, InstanceFilter, Platform, Result};

/// A failure to inject into the next call of a method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeFailure {
    /// 409 with this message.
    Conflict(String),
    /// 422 with this message.
    Invalid(String),
    /// 5xx.
    Server(u16),
}

impl FakeFailure {
    fn to_error(&self) -> Error {
        match self {
            FakeFailure::Conflict(m) => Error::Conflict { message: m.clone() },
            FakeFailure::Invalid(m) => Error::Invalid {
                message: m.clone(),
                fields: vec![FieldError {
                    field: "rules".into(),
                    message: m.clone(),
                }],
            },
            FakeFailure::Server(s) => Error::Server {
                status: *s,
                message: "injected".into(),
            },
        }
    }
}

#[derive(Debug, Default)]
struct State {
    clusters: BTreeMap<String, Cluster>,
    instances: BTreeMap<String, Instance>,
    ips: BTreeMap<String, PublicIp>,
    /// cluster ID -> LB ID -> (LB, keep_public_ip requested on delete)
    lbs: BTreeMap<String, BTreeMap<String, (LoadBalancer, Option<bool>)>>,
    calls: Vec<String>,
    failures: Vec<(String, FakeFailure)>,
    next_id: u64,
    udp_enabled: bool,
}

/// See the module docs.
#[derive(Debug)]
pub struct FakePlatform {
    state: Mutex<State>,
}

/// Calls that change platform state.
pub const MUTATING: &[&str] = &[
    "create_public_ip",
    "delete_public_ip",
    "create_load_balancer",
    "update_load_balancer",
    "delete_load_balancer",
];

impl Default for FakePlatform {
    fn default() -> Self {
        Self::new()
    }
}

impl FakePlatform {
    /// A platform with cluster `cl-1` (region `jkt`, `vpc-1`, `subnet-1`), UDP on, and
    /// nothing else.
    pub fn new() -> Self {
        let mut st = State {
            udp_enabled: true,
            ..State::default()
        };
        st.clusters.insert(
            "cl-1".into(),
            Cluster {
                id: "cl-1".into(),
                name: "cl-1".into(),
                region: "jkt".into(),
                vpc_id: "vpc-1".into(),
                subnet_id: "subnet-1".into(),
                ip_versions: ipv4_only(),
            },
        );
        FakePlatform { state: Mutex::new(st) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enter(&self, method: &str) -> Result<std::sync::MutexGuard<'_, State>> {
        let mut st = self.lock();
        st.calls.push(method.to_owned());
        if let Some(i) = st.failures.iter().position(|(m, _)| m == method) {
            let (_, f) = st.failures.remove(i);
            return Err(f.to_error());
        }
        Ok(st)
    }

    /// Adds a running VM in `cl-1`'s subnet.
    pub fn add_vm(&self, id: &str, private_ip: &str) {
        let ip = private_ip.parse().ok();
        self.lock().instances.insert(
            id.to_owned(),
            Instance {
                id: id.to_owned(),
                name: id.to_owned(),
                region: "jkt".into(),
                zone: "jkt-a".into(),
                package: "standard-2".into(),
                state: InstanceState::Running,
                private_ip: ip,
                public_ip: None,
                private_ipv6: None,
                vpc_id: "vpc-1".into(),
                subnet_id: "subnet-1".into(),
                labels: Labels::new(),
                created_at: None,
            },
        );
    }

    /// Changes a VM behind the controllers' back (state, private IP, labels).
    pub fn modify_vm(&self, id: &str, f: impl FnOnce(&mut Instance)) {
        if let Some(vm) = self.lock().instances.get_mut(id) {
            f(vm);
        }
    }

    /// Deletes a VM (a later `get_instance` answers 404).
    pub fn remove_vm(&self, id: &str) {
        self.lock().instances.remove(id);
    }

    /// Adds a free public IP (for reuse tests).
    pub fn add_public_ip(&self, id: &str, address: &str) {
        if let Ok(address) = address.parse() {
            self.lock().ips.insert(
                id.to_owned(),
                PublicIp {
                    id: id.to_owned(),
                    address,
                    version: IpVersion::of(&address),
                    region: "jkt".into(),
                    labels: Labels::new(),
                    attached_to: None,
                },
            );
        }
    }

    /// Puts an LB directly into a cluster (another cluster's, or one "created earlier").
    pub fn insert_lb(&self, cluster_id: &str, lb: LoadBalancer) {
        self.lock()
            .lbs
            .entry(cluster_id.to_owned())
            .or_default()
            .insert(lb.id.clone(), (lb, None));
    }

    /// Turns UDP rules off (422 "udp is not supported").
    pub fn set_udp_enabled(&self, on: bool) {
        self.lock().udp_enabled = on;
    }

    /// Makes the next call of `method` fail.
    pub fn fail_next(&self, method: &str, failure: FakeFailure) {
        self.lock().failures.push((method.to_owned(), failure));
    }

    /// Completes pending operations: provisioning/updating -> active, deleting -> gone
    /// (releasing an acquired IP unless kept, as the contract says).
    pub fn settle(&self) {
        let mut st = self.lock();
        let mut release = Vec::new();
        for lbs in st.lbs.values_mut() {
            lbs.retain(|_, (lb, keep)| {
                if lb.status == LbStatus::Deleting {
                    if let Some(ip) = &lb.public_ip {
                        release.push((ip.id.clone(), *keep));
                    }
                    return false;
                }
                if matches!(lb.status, LbStatus::Provisioning | LbStatus::Updating) {
                    lb.status = LbStatus::Active;
                }
                true
            });
        }
        for (ip_id, keep) in release {
            let acquired = st
                .ips
                .get(&ip_id)
                .is_some_and(|ip| ip.labels.contains_key(super::LABEL_CLUSTER_ID));
            let keep = keep.unwrap_or(!acquired);
            if keep {
                if let Some(ip) = st.ips.get_mut(&ip_id) {
                    ip.attached_to = None;
                }
            } else {
                st.ips.remove(&ip_id);
            }
        }
    }

    /// Every call so far, by method name, in order.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// The mutating calls so far.
    pub fn mutating_calls(&self) -> Vec<String> {
        self.lock()
            .calls
            .iter()
            .filter(|c| MUTATING.contains(&c.as_str()))
            .cloned()
            .collect()
    }

    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// The LBs of a cluster.
    pub fn lbs(&self, cluster_id: &str) -> Vec<LoadBalancer> {
        self.lock()
            .lbs
            .get(cluster_id)
            .map(|m| m.values().map(|(lb, _)| lb.clone()).collect())
            .unwrap_or_default()
    }

    /// Every public IP.
    pub fn public_ips(&self) -> Vec<PublicIp> {
        self.lock().ips.values().cloned().collect()
    }

    /// Changes an LB behind the controller's back.
    pub fn modify_lb(&self, cluster_id: &str, id: &str, f: impl FnOnce(&mut LoadBalancer)) {
        if let Some((lb, _)) = self.lock().lbs.get_mut(cluster_id).and_then(|m| m.get_mut(id)) {
            f(lb);
        }
    }

    /// Removes an LB behind the controller's back.
    pub fn remove_lb(&self, cluster_id: &str, id: &str) {
        if let Some(m) = self.lock().lbs.get_mut(cluster_id) {
            m.remove(id);
        }
    }
}

fn matches_labels(obj: &Labels, want: &Labels) -> bool {
    want.iter().all(|(k, v)| obj.get(k) == Some(v))
}

fn not_found(what: impl Into<String>) -> Error {
    Error::NotFound { what: what.into() }
}

fn validate(st: &State, rules: &[Rule], backends: &[BackendRef]) -> Result<()> {
    if rules.is_empty() {
        return Err(FakeFailure::Invalid("at least one rule".into()).to_error());
    }
    if !st.udp_enabled && rules.iter().any(|r| r.protocol == RuleProtocol::Udp) {
        return Err(FakeFailure::Invalid("udp is not supported".into()).to_error());
    }
    for b in backends {
        match st.instances.get(&b.vm_id) {
            Some(vm) if vm.state == InstanceState::Running => {}
            _ => {
                return Err(FakeFailure::Invalid(format!("VM {} is not running in subnet-1", b.vm_id)).to_error());
            }
        }
    }
    Ok(())
}

fn backends_of(st: &State, refs: &[BackendRef]) -> Vec<Backend> {
    refs.iter()
        .map(|b| Backend {
            vm_id: b.vm_id.clone(),
            private_ip: st.instances.get(&b.vm_id).and_then(|vm| vm.private_ip),
            private_ipv6: None,
        })
        .collect()
}

#[async_trait]
impl Platform for FakePlatform {
    async fn get_cluster(&self, cluster_id: &str) -> Result<Cluster> {
        let st = self.enter("get_cluster")?;
        st.clusters
            .get(cluster_id)
            .cloned()
            .ok_or_else(|| not_found(format!("cluster {cluster_id}")))
    }

    async fn list_instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>> {
        let st = self.enter("list_instances")?;
        Ok(st
            .instances
            .values()
            .filter(|vm| matches_labels(&vm.labels, &filter.labels))
            .cloned()
            .collect())
    }

    async fn get_instance(&self, id: &str) -> Result<Instance> {
        let st = self.enter("get_instance")?;
        st.instances
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(format!("VM {id}")))
    }

    async fn get_vpc(&self, id: &str) -> Result<Vpc> {
        let _st = self.enter("get_vpc")?;
        Ok(Vpc {
            id: id.to_owned(),
            name: id.to_owned(),
            region: "jkt".into(),
            cidr: "127.10.0.0/16".parse().map_err(|_| not_found("vpc"))?,
        })
    }

    async fn get_subnet(&self, id: &str) -> Result<Subnet> {
        let _st = self.enter("get_subnet")?;
        Ok(Subnet {
            id: id.to_owned(),
            name: id.to_owned(),
            vpc_id: "vpc-1".into(),
            region: "jkt".into(),
            cidr: "127.10.0.0/24".parse().map_err(|_| not_found("subnet"))?,
            ipv6_cidr: None,
        })
    }

    async fn list_public_ips(&self, labels: &Labels) -> Result<Vec<PublicIp>> {
        let st = self.enter("list_public_ips")?;
        Ok(st
            .ips
            .values()
            .filter(|ip| matches_labels(&ip.labels, labels))
            .cloned()
            .collect())
    }

    async fn get_public_ip(&self, id: &str) -> Result<PublicIp> {
        let st = self.enter("get_public_ip")?;
        st.ips
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(format!("public IP {id}")))
    }

    async fn create_public_ip(&self, region: &str, version: IpVersion, labels: &Labels) -> Result<PublicIp> {
        let mut st = self.enter("create_public_ip")?;
        if version == IpVersion::V6 {
            // This fake's region has no IPv6 pool (the contract's 422 on `version`).
            return Err(Error::Invalid {
                message: format!("region {region} has no IPv6 public IPs"),
                fields: vec![FieldError {
                    field: "version".into(),
                    message: format!("region {region} has no IPv6 public IPs"),
                }],
            });
        }
        st.next_id += 1;
        let n = st.next_id;
        let ip = PublicIp {
            id: format!("ip-{n}"),
            address: IpAddr::V4(Ipv4Addr::new(127, 203, 0, (n % 250) as u8 + 1)),
            version: IpVersion::V4,
            region: region.to_owned(),
            labels: labels.clone(),
            attached_to: None,
        };
        st.ips.insert(ip.id.clone(), ip.clone());
        Ok(ip)
    }

    async fn delete_public_ip(&self, id: &str) -> Result<()> {
        let mut st = self.enter("delete_public_ip")?;
        match st.ips.get(id) {
            None => Err(not_found(format!("public IP {id}"))),
            Some(ip) if ip.attached_to.is_some() => {
                Err(FakeFailure::Conflict("public IP is attached".into()).to_error())
            }
            Some(_) => {
                st.ips.remove(id);
                Ok(())
            }
        }
    }

    async fn list_load_balancers(&self, cluster_id: &str, labels: &Labels) -> Result<Vec<LoadBalancer>> {
        let st = self.enter("list_load_balancers")?;
        Ok(st
            .lbs
            .get(cluster_id)
            .map(|m| {
                m.values()
                    .map(|(lb, _)| lb)
                    .filter(|lb| matches_labels(&lb.labels, labels))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn get_load_balancer(&self, cluster_id: &str, id: &str) -> Result<LoadBalancer> {
        let st = self.enter("get_load_balancer")?;
        st.lbs
            .get(cluster_id)
            .and_then(|m| m.get(id))
            .map(|(lb, _)| lb.clone())
            .ok_or_else(|| not_found(format!("load balancer {id} in cluster {cluster_id}")))
    }

    async fn create_load_balancer(&self, cluster_id: &str, spec: &LoadBalancerSpec) -> Result<LoadBalancer> {
        let mut st = self.enter("create_load_balancer")?;
        let cluster = st
            .clusters
            .get(cluster_id)
            .cloned()
            .ok_or_else(|| not_found(format!("cluster {cluster_id}")))?;
        validate(&st, &spec.rules, &spec.backends)?;
        if st
            .lbs
            .get(cluster_id)
            .is_some_and(|m| m.values().any(|(lb, _)| lb.name == spec.name))
        {
            return Err(FakeFailure::Conflict("load balancer name already taken".into()).to_error());
        }
        st.next_id += 1;
        let lb_id = format!("lb-{}", st.next_id);
        let ip = match &spec.public_ip_id {
            Some(id) => match st.ips.get_mut(id) {
                Some(ip) if ip.attached_to.is_none() => {
                    ip.attached_to = Some(Attachment {
                        kind: AttachmentKind::LoadBalancer,
                        id: lb_id.clone(),
                    });
                    ip.clone()
                }
                Some(_) => return Err(FakeFailure::Conflict("public IP attached elsewhere".into()).to_error()),
                None => return Err(FakeFailure::Invalid(format!("public IP {id} does not exist")).to_error()),
            },
            None => {
                st.next_id += 1;
                let n = st.next_id;
                let ip = PublicIp {
                    id: format!("ip-{n}"),
                    address: IpAddr::V4(Ipv4Addr::new(127, 203, 0, (n % 250) as u8 + 1)),
                    version: IpVersion::V4,
                    region: cluster.region.clone(),
                    labels: spec.labels.clone(),
                    attached_to: Some(Attachment {
                        kind: AttachmentKind::LoadBalancer,
                        id: lb_id.clone(),
                    }),
                };
                st.ips.insert(ip.id.clone(), ip.clone());
                ip
            }
        };
        let lb = LoadBalancer {
            id: lb_id.clone(),
            name: spec.name.clone(),
            region: cluster.region,
            vpc_id: cluster.vpc_id,
            subnet_id: cluster.subnet_id,
            ip_versions: ipv4_only(),
            public_ipv6: None,
            public_ip: Some(LbPublicIp {
                id: ip.id,
                address: ip.address,
            }),
            labels: spec.labels.clone(),
            status: LbStatus::Provisioning,
            status_message: String::new(),
            rules: spec.rules.clone(),
            backends: backends_of(&st, &spec.backends),
            health: vec![],
            created_at: None,
            updated_at: None,
        };
        st.lbs
            .entry(cluster_id.to_owned())
            .or_default()
            .insert(lb_id, (lb.clone(), None));
        Ok(lb)
    }

    async fn update_load_balancer(
        &self,
        cluster_id: &str,
        id: &str,
        update: &LoadBalancerUpdate,
    ) -> Result<LoadBalancer> {
        let mut st = self.enter("update_load_balancer")?;
        validate(&st, &update.rules, &update.backends)?;
        let backends = backends_of(&st, &update.backends);
        let (lb, _) = st
            .lbs
            .get_mut(cluster_id)
            .and_then(|m| m.get_mut(id))
            .ok_or_else(|| not_found(format!("load balancer {id} in cluster {cluster_id}")))?;
        if matches!(
            lb.status,
            LbStatus::Provisioning | LbStatus::Updating | LbStatus::Deleting
        ) {
            return Err(FakeFailure::Conflict("load balancer is updating".into()).to_error());
        }
        lb.rules = update.rules.clone();
        lb.backends = backends;
        lb.labels = update.labels.clone();
        lb.status = LbStatus::Updating;
        Ok(lb.clone())
    }

    async fn delete_load_balancer(&self, cluster_id: &str, id: &str, keep_public_ip: Option<bool>) -> Result<()> {
        let mut st = self.enter("delete_load_balancer")?;
        let (lb, keep) = st
            .lbs
            .get_mut(cluster_id)
            .and_then(|m| m.get_mut(id))
            .ok_or_else(|| not_found(format!("load balancer {id} in cluster {cluster_id}")))?;
        lb.status = LbStatus::Deleting;
        *keep = keep_public_ip;
        Ok(())
    }
}

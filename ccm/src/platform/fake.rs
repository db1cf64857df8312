//! An in-memory [`Platform`] for reconcile tests: real semantics of the contract's
//! load-balancer and public-IP calls (asynchronous status, IP acquisition and release,
//! cluster isolation), a call log, and injectable failures. Time does not pass by itself:
//! [`FakePlatform::settle`] completes every pending operation, as the platform's data
//! plane would after its provisioning delay.
//!
//! IPv6 (the contract's assumption): cluster `cl-1` carries `[4]` until
//! [`FakePlatform::enable_ipv6`]; then LBs may have `ip_versions` with 6 (a public IPv6
//! from `fd00:203::/112`), VMs added with [`FakePlatform::add_vm_dual`] have a
//! `private_ipv6`, and backends carry it. IPs of a family added by a `PUT` are acquired,
//! those of a family removed released (acquired) or detached (reused), as on create and
//! delete.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
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

/// A 422 on `field`.
fn invalid(field: &str, message: impl Into<String>) -> Error {
    let message = message.into();
    Error::Invalid {
        message: message.clone(),
        fields: vec![FieldError {
            field: field.into(),
            message,
        }],
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

    /// Gives cluster `cl-1` (and its subnet) IPv6: `ip_versions: [4, 6]`.
    pub fn enable_ipv6(&self) {
        if let Some(c) = self.lock().clusters.get_mut("cl-1") {
            c.ip_versions = vec![IpVersion::V4, IpVersion::V6];
        }
    }

    /// Adds a running VM in `cl-1`'s subnet with both a private IPv4 and IPv6 address.
    pub fn add_vm_dual(&self, id: &str, private_ip: &str, private_ipv6: &str) {
        self.add_vm(id, private_ip);
        let v6 = private_ipv6.parse().ok();
        self.modify_vm(id, |vm| vm.private_ipv6 = v6);
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
    /// (releasing an acquired IP of either family unless kept, as the contract says).
    pub fn settle(&self) {
        let mut st = self.lock();
        let mut release = Vec::new();
        for lbs in st.lbs.values_mut() {
            lbs.retain(|_, (lb, keep)| {
                if lb.status == LbStatus::Deleting {
                    for ip in lb.public_ips() {
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
            st.release_ip(&ip_id, keep);
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

impl State {
    /// Lets go of an LB's public IP: an acquired one (it carries our labels) is released
    /// unless `keep`, a reused one detached unless `keep == Some(false)`.
    fn release_ip(&mut self, ip_id: &str, keep: Option<bool>) {
        let acquired = self
            .ips
            .get(ip_id)
            .is_some_and(|ip| ip.labels.contains_key(super::LABEL_CLUSTER_ID));
        if keep.unwrap_or(!acquired) {
            if let Some(ip) = self.ips.get_mut(ip_id) {
                ip.attached_to = None;
            }
        } else {
            self.ips.remove(ip_id);
        }
    }

    /// A new public IP of `version`, attached to LB `lb_id` when given.
    fn new_ip(&mut self, version: IpVersion, region: &str, labels: &Labels, lb_id: Option<&str>) -> PublicIp {
        self.next_id += 1;
        let n = self.next_id;
        let address = match version {
            IpVersion::V4 => IpAddr::V4(Ipv4Addr::new(127, 203, 0, (n % 250) as u8 + 1)),
            IpVersion::V6 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, (n % 0xfff0) as u16 + 1)),
        };
        let ip = PublicIp {
            id: format!("ip-{n}"),
            address,
            version,
            region: region.to_owned(),
            labels: labels.clone(),
            attached_to: lb_id.map(|id| Attachment {
                kind: AttachmentKind::LoadBalancer,
                id: id.to_owned(),
            }),
        };
        self.ips.insert(ip.id.clone(), ip.clone());
        ip
    }

    /// Attaches the free public IP `id` of `version` to LB `lb_id` (`field` names it in
    /// errors), as a create with `public_ip_id` / `public_ipv6_id` does.
    fn attach_ip(&mut self, field: &str, id: &str, version: IpVersion, lb_id: &str) -> Result<PublicIp> {
        match self.ips.get_mut(id) {
            Some(ip) if ip.version != version => Err(invalid(
                field,
                format!("public IP {id} is not an IPv{} address", version.number()),
            )),
            Some(ip) if ip.attached_to.is_none() => {
                ip.attached_to = Some(Attachment {
                    kind: AttachmentKind::LoadBalancer,
                    id: lb_id.to_owned(),
                });
                Ok(ip.clone())
            }
            Some(_) => Err(FakeFailure::Conflict("public IP attached elsewhere".into()).to_error()),
            None => Err(invalid(field, format!("public IP {id} does not exist"))),
        }
    }
}

/// The contract's checks of `ip_versions` against the cluster: non-empty, 4 and 6 at
/// most once each, 6 only in a cluster with IPv6.
fn validate_ip_versions(cluster: &Cluster, v: &[IpVersion]) -> Result<()> {
    let mut sorted = v.to_vec();
    sorted.sort();
    sorted.dedup();
    if v.is_empty() || sorted.len() != v.len() {
        return Err(invalid("ip_versions", "must list 4 and/or 6, each once"));
    }
    if v.contains(&IpVersion::V6) && !cluster.has_ipv6() {
        return Err(invalid("ip_versions", format!("cluster {} has no IPv6", cluster.id)));
    }
    Ok(())
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
            private_ipv6: st.instances.get(&b.vm_id).and_then(|vm| vm.private_ipv6),
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
        let st = self.enter("get_subnet")?;
        Ok(Subnet {
            id: id.to_owned(),
            name: id.to_owned(),
            vpc_id: "vpc-1".into(),
            region: "jkt".into(),
            cidr: "127.10.0.0/24".parse().map_err(|_| not_found("subnet"))?,
            ipv6_cidr: st
                .clusters
                .values()
                .any(|c| c.subnet_id == id && c.has_ipv6())
                .then(|| "fd00:10::/112".parse().ok())
                .flatten(),
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
        if version == IpVersion::V6 && !st.clusters.values().any(|c| c.region == region && c.has_ipv6()) {
            // The contract's 422 for a region without an IPv6 pool.
            return Err(invalid("version", format!("region {region} has no IPv6 public IPs")));
        }
        Ok(st.new_ip(version, region, labels, None))
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
        let ip_versions = spec.ip_versions.clone().unwrap_or_else(ipv4_only);
        validate_ip_versions(&cluster, &ip_versions)?;
        for (field, given, version) in [
            ("public_ip_id", &spec.public_ip_id, IpVersion::V4),
            ("public_ipv6_id", &spec.public_ipv6_id, IpVersion::V6),
        ] {
            if given.is_some() && !ip_versions.contains(&version) {
                return Err(invalid(field, format!("IPv{} is not in ip_versions", version.number())));
            }
        }
        let mut ips: Vec<PublicIp> = Vec::new();
        for (field, given, version) in [
            ("public_ip_id", &spec.public_ip_id, IpVersion::V4),
            ("public_ipv6_id", &spec.public_ipv6_id, IpVersion::V6),
        ] {
            if !ip_versions.contains(&version) {
                continue;
            }
            let ip = match given {
                Some(id) => st.attach_ip(field, id, version, &lb_id),
                None => Ok(st.new_ip(version, &cluster.region, &spec.labels, Some(&lb_id))),
            };
            match ip {
                Ok(ip) => ips.push(ip),
                Err(e) => {
                    // Nothing half-made: what this create took is given back.
                    for taken in &ips {
                        st.release_ip(&taken.id, None);
                    }
                    return Err(e);
                }
            }
        }
        let lb_ip = |v: IpVersion| {
            ips.iter().find(|ip| ip.version == v).map(|ip| LbPublicIp {
                id: ip.id.clone(),
                address: ip.address,
            })
        };
        let lb = LoadBalancer {
            id: lb_id.clone(),
            name: spec.name.clone(),
            region: cluster.region,
            vpc_id: cluster.vpc_id,
            subnet_id: cluster.subnet_id,
            public_ip: lb_ip(IpVersion::V4),
            public_ipv6: lb_ip(IpVersion::V6),
            ip_versions: {
                let mut v = ip_versions.clone();
                v.sort();
                v
            },
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
        let cluster = st
            .clusters
            .get(cluster_id)
            .cloned()
            .ok_or_else(|| not_found(format!("cluster {cluster_id}")))?;
        let (current, status) = st
            .lbs
            .get(cluster_id)
            .and_then(|m| m.get(id))
            .map(|(lb, _)| (lb.clone(), lb.status.clone()))
            .ok_or_else(|| not_found(format!("load balancer {id} in cluster {cluster_id}")))?;
        if matches!(status, LbStatus::Provisioning | LbStatus::Updating | LbStatus::Deleting) {
            return Err(FakeFailure::Conflict("load balancer is updating".into()).to_error());
        }
        // Families added get an acquired IP, families removed let theirs go.
        let mut public = [
            (IpVersion::V4, current.public_ip.clone()),
            (IpVersion::V6, current.public_ipv6.clone()),
        ];
        let mut ip_versions = current.ip_versions.clone();
        if let Some(want) = &update.ip_versions {
            validate_ip_versions(&cluster, want)?;
            for (version, ip) in &mut public {
                match (want.contains(version), ip.as_ref()) {
                    (true, None) => {
                        let new = st.new_ip(*version, &cluster.region, &update.labels, Some(id));
                        *ip = Some(LbPublicIp {
                            id: new.id,
                            address: new.address,
                        });
                    }
                    (false, Some(old)) => {
                        st.release_ip(&old.id, None);
                        *ip = None;
                    }
                    _ => {}
                }
            }
            ip_versions = want.clone();
            ip_versions.sort();
        }
        let (lb, _) = st
            .lbs
            .get_mut(cluster_id)
            .and_then(|m| m.get_mut(id))
            .ok_or_else(|| not_found(format!("load balancer {id} in cluster {cluster_id}")))?;
        let [(_, v4), (_, v6)] = public;
        lb.public_ip = v4;
        lb.public_ipv6 = v6;
        lb.ip_versions = ip_versions;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> Rule {
        Rule {
            name: "tcp-80".into(),
            protocol: RuleProtocol::Tcp,
            public_port: 80,
            private_port: 31080,
            algorithm: Algorithm::RoundRobin,
            allowed_sources: vec![],
            health_check: None,
        }
    }

    fn spec(name: &str, ip_versions: Option<Vec<IpVersion>>) -> LoadBalancerSpec {
        LoadBalancerSpec {
            name: name.into(),
            public_ip_id: None,
            public_ipv6_id: None,
            ip_versions,
            labels: Labels::from([(super::super::LABEL_CLUSTER_ID.to_owned(), "cl-1".to_owned())]),
            rules: vec![rule()],
            backends: vec![BackendRef::new("vm-1")],
        }
    }

    fn field_of(e: &Error) -> Option<&str> {
        match e {
            Error::Invalid { fields, .. } => fields.first().map(|f| f.field.as_str()),
            _ => None,
        }
    }

    /// The contract's IPv6 rules as the fake keeps them: 422s on `ip_versions` and the
    /// IP ids, nothing half-made; families added and removed by PUT; both IPs released.
    #[tokio::test]
    async fn the_ipv6_contract() {
        use IpVersion::{V4, V6};
        let p = FakePlatform::new();
        p.add_vm_dual("vm-1", "127.10.0.11", "fd00:10::11");
        let e = p
            .create_load_balancer("cl-1", &spec("a", Some(vec![V4, V6])))
            .await
            .expect_err("no IPv6 in cl-1");
        assert_eq!(field_of(&e), Some("ip_versions"));
        assert!(e.to_string().contains("cl-1 has no IPv6"), "{e}");
        let e = p
            .create_public_ip("jkt", V6, &Labels::new())
            .await
            .expect_err("no pool");
        assert_eq!(field_of(&e), Some("version"));

        p.enable_ipv6();
        for bad in [vec![], vec![V4, V4]] {
            let e = p
                .create_load_balancer("cl-1", &spec("a", Some(bad)))
                .await
                .expect_err("422");
            assert_eq!(field_of(&e), Some("ip_versions"));
        }
        p.add_public_ip("ip-v4", "127.203.0.9");
        let mut s = spec("a", Some(vec![V4, V6]));
        s.public_ipv6_id = Some("ip-v4".into());
        let e = p.create_load_balancer("cl-1", &s).await.expect_err("not an IPv6 IP");
        assert_eq!(field_of(&e), Some("public_ipv6_id"));
        let mut s = spec("a", Some(vec![V6]));
        s.public_ip_id = Some("ip-v4".into());
        let e = p.create_load_balancer("cl-1", &s).await.expect_err("IPv4 not served");
        assert_eq!(field_of(&e), Some("public_ip_id"));
        assert!(p.lbs("cl-1").is_empty());
        assert_eq!(p.public_ips().len(), 1, "nothing half-made: {:?}", p.public_ips());
        assert!(p.public_ips()[0].attached_to.is_none());

        let lb = p
            .create_load_balancer("cl-1", &spec("a", Some(vec![V6, V4])))
            .await
            .expect("created");
        assert_eq!(lb.ip_versions, vec![V4, V6]);
        let v6 = lb.public_ipv6.clone().expect("an IPv6 address");
        assert!(v6.address.is_ipv6() && lb.public_ip.as_ref().is_some_and(|ip| ip.address.is_ipv4()));
        assert_eq!(lb.backends[0].private_ipv6, "fd00:10::11".parse().ok());
        p.settle();

        let mut upd = lb.to_update();
        upd.ip_versions = Some(vec![V4]);
        let after = p.update_load_balancer("cl-1", &lb.id, &upd).await.expect("PUT");
        assert_eq!((after.ip_versions.clone(), after.public_ipv6.clone()), (vec![V4], None));
        assert_eq!(after.public_ip, lb.public_ip, "the other family's IP stays");
        assert!(
            !p.public_ips().iter().any(|ip| ip.id == v6.id),
            "acquired IPv6 released"
        );
        p.settle();
        upd.ip_versions = Some(vec![V4, V6]);
        let again = p.update_load_balancer("cl-1", &lb.id, &upd).await.expect("PUT");
        let new_v6 = again.public_ipv6.clone().expect("a new IPv6 address");
        p.settle();
        upd.ip_versions = None;
        let same = p.update_load_balancer("cl-1", &lb.id, &upd).await.expect("PUT");
        assert_eq!(same.ip_versions, vec![V4, V6], "absent: unchanged");
        p.settle();

        p.delete_load_balancer("cl-1", &lb.id, None).await.expect("delete");
        p.settle();
        assert!(
            !p.public_ips()
                .iter()
                .any(|ip| ip.id == new_v6.id || Some(&ip.id) == lb.public_ip.as_ref().map(|i| &i.id)),
            "both acquired IPs released: {:?}",
            p.public_ips()
        );
    }
}

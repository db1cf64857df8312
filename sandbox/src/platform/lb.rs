//! Load balancers of a cluster: create, update, delete, their asynchronous status, and
//! keeping the data plane in step with them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::error::{Error, FieldError, Result};
use super::forward::{self, HealthState, Listener};
use super::model::{
    Algorithm, Attachment, Cluster, HealthCheckProtocol, HealthEntry, IpVersion, LbInput, LbRecord, LbStatus,
    LoadBalancer, Protocol, PublicIp, PublicIpRef, VmState, ipv4_only, now_rfc3339,
};
use super::store::{Saved, State};
use super::{PlatformStandIn, validate};

impl PlatformStandIn {
    /// The LB `id` of cluster `cluster_id` (404 for an unknown cluster, an unknown LB, or
    /// another cluster's LB).
    pub(crate) fn find_lb<'s>(state: &'s State, cluster_id: &str, id: &str) -> Result<&'s LbRecord> {
        if state.cluster(cluster_id).is_none() {
            return Err(Error::not_found("cluster", cluster_id));
        }
        state
            .lb(id)
            .filter(|r| r.cluster_id == cluster_id)
            .ok_or_else(|| Error::not_found("load balancer", id))
    }

    /// The LB's `health`: one entry per rule and backend, as the data plane reports it.
    pub(crate) fn health_of(&self, record: &LbRecord) -> Vec<HealthEntry> {
        let reported: HashMap<(String, String), HealthState> = self
            .forwarder
            .health(&record.lb.id)
            .into_iter()
            .map(|(rule, vm, state)| ((rule, vm), state))
            .collect();
        let mut out = Vec::new();
        for rule in &record.lb.rules {
            for backend in &record.lb.backends {
                let key = (rule.name.clone(), backend.vm_id.clone());
                out.push(HealthEntry {
                    rule: rule.name.clone(),
                    vm_id: backend.vm_id.clone(),
                    state: reported.get(&key).copied().unwrap_or(HealthState::Unknown),
                });
            }
        }
        out
    }

    pub(crate) async fn create_lb(self: &Arc<Self>, cluster_id: &str, input: LbInput) -> Result<LbRecord> {
        let udp_enabled = self.settings().udp_enabled;
        let mut store = self.store.lock().await;
        let cluster = store
            .state
            .cluster(cluster_id)
            .cloned()
            .ok_or_else(|| Error::not_found("cluster", cluster_id))?;
        let (record, saved) = store.mutate(|s| {
            let mut errors = validate::lb_name(input.name.as_deref());
            let spec = validate::lb_spec(&input, udp_enabled, &s.vms, &cluster.subnet_id);
            let (versions, v4_source, v6_source) = match self.ip_sources(s, &cluster, &input) {
                Ok(sources) => sources,
                Err(more) => {
                    errors.extend(more);
                    (ipv4_only(), validate::IpSource::None, validate::IpSource::None)
                }
            };
            let spec = match spec {
                Ok(spec) if errors.is_empty() => spec,
                Ok(_) => return Err(Error::Invalid(errors)),
                Err(more) => {
                    errors.extend(more);
                    return Err(Error::Invalid(errors));
                }
            };
            let name = input.name.clone().unwrap_or_default();
            if s.load_balancers
                .iter()
                .any(|r| r.cluster_id == cluster_id && r.lb.name == name)
            {
                return Err(Error::Conflict("load balancer name already taken".into()));
            }
            let id = s.fresh_id("lb");
            // An IP attached elsewhere is a 409 before anything is taken; a failure after
            // (the IPv6 pool is empty) rolls the whole mutation back, the IPv4 IP included.
            for source in [&v4_source, &v6_source] {
                if let validate::IpSource::Attach(ip) = source
                    && let Some(att) = &ip.attached_to
                {
                    return Err(Error::Conflict(format!(
                        "public IP {} is attached to {} {}",
                        ip.id,
                        att.kind.replace('_', " "),
                        att.id
                    )));
                }
            }
            let v4 = self.take_ip(s, v4_source, &cluster.region, IpVersion::V4, &spec.labels, &id)?;
            let v6 = self.take_ip(s, v6_source, &cluster.region, IpVersion::V6, &spec.labels, &id)?;
            let now = now_rfc3339();
            let record = LbRecord {
                cluster_id: cluster_id.to_string(),
                lb: LoadBalancer {
                    id,
                    name,
                    region: cluster.region.clone(),
                    vpc_id: cluster.vpc_id.clone(),
                    subnet_id: cluster.subnet_id.clone(),
                    ip_versions: versions,
                    public_ip: v4.as_ref().map(|(ip, _)| ip.clone()),
                    public_ipv6: v6.as_ref().map(|(ip, _)| ip.clone()),
                    labels: spec.labels,
                    status: LbStatus::Provisioning,
                    status_message: String::new(),
                    rules: spec.rules,
                    backends: spec.backends,
                    created_at: now.clone(),
                    updated_at: now,
                },
                public_ip_acquired: v4.is_some_and(|(_, acquired)| acquired),
                public_ipv6_acquired: v6.is_some_and(|(_, acquired)| acquired),
                release_public_ip: false,
                release_public_ipv6: false,
                generation: 1,
            };
            s.load_balancers.push(std::sync::Arc::new(record.clone()));
            Ok(record)
        })?;
        drop(store);
        self.schedule_once_saved(saved, &record.lb.id, record.generation)
            .await?;
        Ok(record)
    }

    /// The `ip_versions` of a create body and where each family's public IP comes from,
    /// or the 422s of `ip_versions`, `public_ip_id` and `public_ipv6_id`.
    fn ip_sources(
        &self,
        s: &State,
        cluster: &Cluster,
        input: &LbInput,
    ) -> std::result::Result<(Vec<IpVersion>, validate::IpSource, validate::IpSource), Vec<FieldError>> {
        let has_ipv6 = s.cluster_ip_versions(cluster).contains(&IpVersion::V6);
        let versions = validate::ip_versions(input.ip_versions.as_deref(), &ipv4_only(), &cluster.id, has_ipv6)
            .map_err(|e| vec![e])?;
        let mut errors = Vec::new();
        let mut source = |family, field: &str, id: Option<&str>| {
            let found = id.and_then(|id| s.public_ip(id));
            match validate::ip_source(family, &versions, field, id, found, &cluster.region) {
                Ok(source) => source,
                Err(e) => {
                    errors.push(e);
                    validate::IpSource::None
                }
            }
        };
        let v4 = source(IpVersion::V4, "public_ip_id", input.public_ip_id.as_deref());
        let v6 = source(IpVersion::V6, "public_ipv6_id", input.public_ipv6_id.as_deref());
        if v6 == validate::IpSource::Acquire && !self.has_ipv6_pool(&cluster.region) {
            errors.push(FieldError::new(
                "ip_versions",
                format!("region {} has no IPv6 public IPs", cluster.region),
            ));
        }
        if errors.is_empty() {
            Ok((versions, v4, v6))
        } else {
            Err(errors)
        }
    }

    /// Attaches (or acquires, then attaches) the public IP of one family to LB `lb_id`;
    /// `Some((ip, acquired))`, or `None` for [`validate::IpSource::None`].
    fn take_ip(
        &self,
        s: &mut State,
        source: validate::IpSource,
        region: &str,
        version: IpVersion,
        labels: &super::model::Labels,
        lb_id: &str,
    ) -> Result<Option<(PublicIpRef, bool)>> {
        let (ip, acquired) = match source {
            validate::IpSource::None => return Ok(None),
            validate::IpSource::Attach(ip) => (ip, false),
            validate::IpSource::Acquire => (self.acquire_ip(s, region, version, labels)?, true),
        };
        let attached = s
            .public_ip_mut(&ip.id)
            .ok_or_else(|| Error::Internal(format!("public IP {} vanished", ip.id)))?;
        attached.attached_to = Some(Attachment {
            kind: "load_balancer".into(),
            id: lb_id.to_string(),
        });
        Ok(Some((
            PublicIpRef {
                id: ip.id,
                address: ip.address,
            },
            acquired,
        )))
    }

    /// A new public IP of `version` from the region's pool (only the configured region
    /// has one; IPv6 only when configured: 422 on `version` otherwise, which callers that
    /// name another field check first).
    pub(crate) fn acquire_ip(
        &self,
        s: &mut State,
        region: &str,
        version: IpVersion,
        labels: &super::model::Labels,
    ) -> Result<PublicIp> {
        let address: std::net::IpAddr = match version {
            IpVersion::V4 => (region == self.config.region)
                .then(|| s.free_public_ip(self.config.public_ip_range))
                .flatten()
                .ok_or_else(|| Error::Conflict(format!("no public IP available in region {region}")))?
                .into(),
            IpVersion::V6 => {
                let range = self
                    .config
                    .public_ipv6_range
                    .filter(|_| self.has_ipv6_pool(region))
                    .ok_or_else(|| Error::invalid("version", format!("region {region} has no IPv6 public IPs")))?;
                s.free_public_ipv6(range)
                    .ok_or_else(|| Error::Conflict(format!("no IPv6 public IP available in region {region}")))?
                    .into()
            }
        };
        let ip = PublicIp {
            id: s.fresh_id("ip"),
            address,
            version,
            region: region.to_string(),
            labels: labels.clone(),
            attached_to: None,
        };
        s.public_ips.push(ip.clone());
        Ok(ip)
    }

    /// Frees the public IP `ip` of an LB that no longer has its family: released when the
    /// platform acquired it (`release`), otherwise detached and kept.
    fn let_go_ip(s: &mut State, ip: &PublicIpRef, release: bool) {
        if release {
            s.public_ips.retain(|other| other.id != ip.id);
        } else if let Some(kept) = s.public_ip_mut(&ip.id) {
            kept.attached_to = None;
        }
    }

    pub(crate) async fn update_lb(self: &Arc<Self>, cluster_id: &str, id: &str, input: LbInput) -> Result<LbRecord> {
        let udp_enabled = self.settings().udp_enabled;
        let mut store = self.store.lock().await;
        let current = Self::find_lb(&store.state, cluster_id, id)?.clone();
        let cluster_subnet = current.lb.subnet_id.clone();
        let cluster = store
            .state
            .cluster(cluster_id)
            .cloned()
            .ok_or_else(|| Error::not_found("cluster", cluster_id))?;
        let (record, saved) = store.mutate(|s| {
            let mut errors = Vec::new();
            if let Some(name) = input.name.as_deref()
                && name != current.lb.name
            {
                errors.push(FieldError::new("name", "cannot be changed"));
            }
            let has_ipv6 = s.cluster_ip_versions(&cluster).contains(&IpVersion::V6);
            let versions = match validate::ip_versions(
                input.ip_versions.as_deref(),
                &current.lb.ip_versions,
                cluster_id,
                has_ipv6,
            ) {
                Ok(versions) => versions,
                Err(e) => {
                    errors.push(e);
                    current.lb.ip_versions.clone()
                }
            };
            let adds_v6 = versions.contains(&IpVersion::V6) && current.lb.public_ipv6.is_none();
            if adds_v6 && !self.has_ipv6_pool(&cluster.region) {
                errors.push(FieldError::new(
                    "ip_versions",
                    format!("region {} has no IPv6 public IPs", cluster.region),
                ));
            }
            let spec = validate::lb_spec(&input, udp_enabled, &s.vms, &cluster_subnet);
            let spec = match spec {
                Ok(spec) if errors.is_empty() => spec,
                Ok(_) => return Err(Error::Invalid(errors)),
                Err(more) => {
                    errors.extend(more);
                    return Err(Error::Invalid(errors));
                }
            };
            match current.lb.status {
                LbStatus::Provisioning | LbStatus::Updating => {
                    return Err(Error::Conflict("load balancer is updating".into()));
                }
                LbStatus::Deleting => {
                    return Err(Error::Conflict("load balancer is being deleted".into()));
                }
                LbStatus::Active | LbStatus::Error => {}
            }
            // The families: an added one takes a new IP (409 when none is left, and then
            // nothing changes: the mutation is rolled back), a removed one lets its IP go.
            let wants = |v| versions.contains(&v);
            let v4 = match (&current.lb.public_ip, wants(IpVersion::V4)) {
                (None, true) => self
                    .take_ip(
                        s,
                        validate::IpSource::Acquire,
                        &cluster.region,
                        IpVersion::V4,
                        &spec.labels,
                        id,
                    )?
                    .map(|(ip, _)| (Some(ip), true)),
                (Some(ip), false) => {
                    Self::let_go_ip(s, ip, current.public_ip_acquired);
                    Some((None, false))
                }
                _ => None,
            };
            let v6 = match (&current.lb.public_ipv6, wants(IpVersion::V6)) {
                (None, true) => self
                    .take_ip(
                        s,
                        validate::IpSource::Acquire,
                        &cluster.region,
                        IpVersion::V6,
                        &spec.labels,
                        id,
                    )?
                    .map(|(ip, _)| (Some(ip), true)),
                (Some(ip), false) => {
                    Self::let_go_ip(s, ip, current.public_ipv6_acquired);
                    Some((None, false))
                }
                _ => None,
            };
            let record = s.lb_mut(id).ok_or_else(|| Error::not_found("load balancer", id))?;
            if let Some((ip, acquired)) = v4 {
                record.lb.public_ip = ip;
                record.public_ip_acquired = acquired;
            }
            if let Some((ip, acquired)) = v6 {
                record.lb.public_ipv6 = ip;
                record.public_ipv6_acquired = acquired;
            }
            record.lb.ip_versions = versions;
            record.lb.rules = spec.rules;
            record.lb.backends = spec.backends;
            record.lb.labels = spec.labels;
            record.lb.status = LbStatus::Updating;
            record.lb.status_message = String::new();
            record.lb.updated_at = now_rfc3339();
            record.generation += 1;
            Ok(record.clone())
        })?;
        drop(store);
        self.schedule_once_saved(saved, &record.lb.id, record.generation)
            .await?;
        Ok(record)
    }

    /// Starts deleting (202). `keep_public_ip` overrides the default: release an IP the
    /// platform acquired, keep one the caller brought.
    pub(crate) async fn delete_lb(
        self: &Arc<Self>,
        cluster_id: &str,
        id: &str,
        keep_public_ip: Option<bool>,
    ) -> Result<LbRecord> {
        let mut store = self.store.lock().await;
        let current = Self::find_lb(&store.state, cluster_id, id)?.clone();
        if current.lb.status == LbStatus::Deleting {
            return Ok(current);
        }
        let (record, saved) = store.mutate(|s| {
            let record = s.lb_mut(id).ok_or_else(|| Error::not_found("load balancer", id))?;
            record.lb.status = LbStatus::Deleting;
            record.lb.status_message = String::new();
            record.lb.updated_at = now_rfc3339();
            record.release_public_ip = keep_public_ip.map_or(record.public_ip_acquired, |k| !k);
            record.release_public_ipv6 = keep_public_ip.map_or(record.public_ipv6_acquired, |k| !k);
            record.generation += 1;
            Ok(record.clone())
        })?;
        drop(store);
        self.schedule_once_saved(saved, &record.lb.id, record.generation)
            .await?;
        Ok(record)
    }

    /// Waits for a transition's write, then [`Self::schedule`]s its completion, in a task
    /// of its own: a client that goes away meanwhile (its call dropped by the server) must
    /// not leave the LB `provisioning`, `updating` or `deleting` with nothing to finish it
    /// (found by tests/reliability_ccm.rs, which SIGKILLs the CCM mid-call).
    async fn schedule_once_saved(self: &Arc<Self>, saved: Saved, id: &str, generation: u64) -> Result<()> {
        let platform = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            saved.wait().await?;
            platform.schedule(&id, generation);
            Ok(())
        })
        .await
        .map_err(|e| Error::Internal(format!("scheduling the transition of a load balancer: {e}")))?
    }

    /// After the provisioning delay, finishes the transition of `id` started at
    /// `generation` (unless another one started since).
    pub(crate) fn schedule(self: &Arc<Self>, id: &str, generation: u64) {
        let platform = self.clone();
        let id = id.to_string();
        let delay = self.settings().provisioning_delay;
        let mut stopping = self.stopping.subscribe();
        tokio::spawn(async move {
            let due = tokio::select! {
                _ = tokio::time::sleep(delay) => true,
                _ = async { drop(stopping.wait_for(|s| *s).await) } => false,
            };
            if due {
                platform.complete(&id, generation).await;
            }
        });
    }

    async fn complete(&self, id: &str, generation: u64) {
        let _dataplane = self.dataplane.lock(id).await;
        if self.is_stopping() {
            return;
        }
        let (status, listeners) = {
            let store = self.store.lock().await;
            let Some(record) = store.state.lb(id) else {
                return;
            };
            if record.generation != generation {
                return;
            }
            (record.lb.status, listeners(&store.state, record))
        };
        match status {
            LbStatus::Provisioning | LbStatus::Updating => {
                let result = self.forwarder.apply_lb(id, listeners).await;
                self.finish_apply(id, generation, result).await;
            }
            LbStatus::Deleting => {
                self.forwarder.remove_lb(id).await;
                let mut store = self.store.lock().await;
                let saved = match store.mutate(|s| {
                    let Some(pos) = s
                        .load_balancers
                        .iter()
                        .position(|r| r.lb.id == id && r.generation == generation)
                    else {
                        return Ok(());
                    };
                    let record = s.load_balancers.remove(pos);
                    tracing::info!(
                        lb = id,
                        release_public_ip = record.release_public_ip,
                        "load balancer deleted"
                    );
                    if let Some(ip) = &record.lb.public_ip {
                        Self::let_go_ip(s, ip, record.release_public_ip);
                    }
                    if let Some(ip) = &record.lb.public_ipv6 {
                        Self::let_go_ip(s, ip, record.release_public_ipv6);
                    }
                    Ok(())
                }) {
                    Ok(((), saved)) => {
                        drop(store);
                        saved.wait().await
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = saved {
                    tracing::error!(lb = id, error = %e, "cannot finish deleting load balancer");
                }
            }
            LbStatus::Active | LbStatus::Error => {}
        }
    }

    /// Records the outcome of a data-plane apply: `active`, or `error` with the reason.
    async fn finish_apply(&self, id: &str, generation: u64, result: std::result::Result<(), forward::ForwardError>) {
        let mut store = self.store.lock().await;
        let saved = match store.mutate(|s| {
            let Some(record) = s.lb_mut(id).filter(|r| r.generation == generation) else {
                return Ok(());
            };
            let (status, message) = match &result {
                Ok(()) => (LbStatus::Active, String::new()),
                Err(e) => (LbStatus::Error, e.to_string()),
            };
            if record.lb.status != status || record.lb.status_message != message {
                tracing::info!(lb = id, ?status, "load balancer applied to the data plane");
                record.lb.status = status;
                record.lb.status_message = message;
                record.lb.updated_at = now_rfc3339();
            }
            Ok(())
        }) {
            Ok(((), saved)) => {
                drop(store);
                saved.wait().await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            tracing::warn!(lb = id, error = %e, "data plane refused load balancer");
        }
        if let Err(e) = saved {
            tracing::error!(lb = id, error = %e, "cannot record load balancer status");
        }
    }

    /// Re-applies an active LB to the data plane (after a restart, or when one of its
    /// backend VMs changed state).
    pub(crate) async fn reapply(&self, id: &str) {
        let _dataplane = self.dataplane.lock(id).await;
        if self.is_stopping() {
            return;
        }
        let (generation, listeners) = {
            let store = self.store.lock().await;
            match store.state.lb(id) {
                Some(r) if r.lb.status == LbStatus::Active => (r.generation, listeners(&store.state, r)),
                _ => return,
            }
        };
        let result = self.forwarder.apply_lb(id, listeners).await;
        if result.is_err() {
            self.finish_apply(id, generation, result).await;
        }
    }

    /// Re-applies every active LB that has `vm_id` as a backend.
    pub(crate) async fn reapply_for_vm(&self, vm_id: &str) {
        let ids: Vec<String> = {
            let store = self.store.lock().await;
            store
                .state
                .load_balancers
                .iter()
                .filter(|r| r.lb.status == LbStatus::Active)
                .filter(|r| r.lb.backends.iter().any(|b| b.vm_id == vm_id))
                .map(|r| r.lb.id.clone())
                .collect()
        };
        for id in ids {
            self.reapply(&id).await;
        }
    }
}

/// The data plane's view of an LB: one listener per rule, on every public IP of the LB.
pub(crate) fn listeners(state: &State, record: &LbRecord) -> Vec<Listener> {
    let lb = &record.lb;
    let backends: Vec<forward::Backend> = lb
        .backends
        .iter()
        .map(|b| forward::Backend {
            vm_id: b.vm_id.clone(),
            private_ip: IpAddr::V4(b.private_ip),
            private_ipv6: b.private_ipv6,
            running: state.vm(&b.vm_id).is_some_and(|vm| vm.state == VmState::Running),
        })
        .collect();
    let addresses: Vec<IpAddr> = lb
        .public_ip
        .iter()
        .chain(&lb.public_ipv6)
        .map(|ip| ip.address)
        .collect();
    let check_ipv6 = lb.ip_versions == [IpVersion::V6];
    lb.rules
        .iter()
        .map(|rule| {
            let hc = &rule.health_check;
            let probe = match hc.protocol {
                HealthCheckProtocol::Tcp => forward::Probe::Tcp { port: hc.port },
                HealthCheckProtocol::Http => forward::Probe::Http {
                    port: hc.port,
                    path: hc.path.clone().unwrap_or_else(|| "/".into()),
                },
            };
            Listener {
                rule: rule.name.clone(),
                protocol: match rule.protocol {
                    Protocol::Tcp => forward::Protocol::Tcp,
                    Protocol::Udp => forward::Protocol::Udp,
                },
                listen: addresses
                    .iter()
                    .map(|&ip| SocketAddr::new(ip, rule.public_port))
                    .collect(),
                private_port: rule.private_port,
                algorithm: match rule.algorithm {
                    Algorithm::RoundRobin => forward::Algorithm::RoundRobin,
                    Algorithm::LeastConnection => forward::Algorithm::LeastConnection,
                    Algorithm::Source => forward::Algorithm::Source,
                },
                allowed_sources: rule.allowed_sources.clone(),
                health_check: forward::HealthCheck {
                    probe,
                    interval: Duration::from_secs(hc.interval_s.into()),
                    timeout: Duration::from_secs(hc.timeout_s.into()),
                    healthy_threshold: hc.healthy_threshold,
                    unhealthy_threshold: hc.unhealthy_threshold,
                },
                check_ipv6,
                backends: backends.clone(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::PlatformConfig;

    async fn status_of(platform: &PlatformStandIn, name: &str) -> Option<(String, LbStatus)> {
        let store = platform.store.lock().await;
        let record = store.state.load_balancers.iter().find(|r| r.lb.name == name)?;
        Some((record.lb.id.clone(), record.lb.status))
    }

    async fn wait_for(platform: &PlatformStandIn, name: &str, want: Option<LbStatus>) {
        for _ in 0..200 {
            if status_of(platform, name).await.map(|(_, s)| s) == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{name}: {:?}, want {want:?}", status_of(platform, name).await);
    }

    /// A call polled once and then dropped, as the server drops the call of a client that
    /// went away (a CCM killed mid-call), still has its transition completed.
    #[tokio::test]
    async fn a_dropped_call_still_completes_its_transition() {
        let dir = tempfile::tempdir().unwrap();
        let platform = PlatformStandIn::open(PlatformConfig {
            state_dir: dir.path().to_path_buf(),
            public_ip_range: "127.203.250.0/24".parse().unwrap(),
            vm_ip_range: "127.10.250.0/24".parse().unwrap(),
            provisioning_delay: Duration::from_millis(10),
            ..PlatformConfig::default()
        })
        .await
        .unwrap();
        platform.seed_cluster("cl-1", "one", 0).await.unwrap();
        let input = |port: u16| -> LbInput {
            serde_json::from_value(serde_json::json!({
                "name": "web",
                "rules": [{"name": "http", "protocol": "tcp", "public_port": port,
                           "private_port": 8080, "algorithm": "round_robin"}],
                "backends": [],
            }))
            .unwrap()
        };
        let dropped = Duration::ZERO;
        let _ = tokio::time::timeout(dropped, platform.create_lb("cl-1", input(18080))).await;
        wait_for(&platform, "web", Some(LbStatus::Active)).await;
        let (id, _) = status_of(&platform, "web").await.unwrap();
        let _ = tokio::time::timeout(dropped, platform.update_lb("cl-1", &id, input(18081))).await;
        assert_eq!(
            status_of(&platform, "web").await,
            Some((id.clone(), LbStatus::Updating))
        );
        wait_for(&platform, "web", Some(LbStatus::Active)).await;
        let _ = tokio::time::timeout(dropped, platform.delete_lb("cl-1", &id, None)).await;
        wait_for(&platform, "web", None).await;
        platform.shutdown().await;
    }
}

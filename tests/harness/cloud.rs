//! A detached sandbox as the CCM meets it: its cluster (through [`Cluster`]), its
//! platform API logged in with the credentials `kuberaya sandbox env` exports, and the
//! stand-in's `/_sandbox/` control API (call counts, faults).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::calls::{Calls, parse_calls};
use crate::cluster::Cluster;
use crate::sandbox::{Ranges, TempSandbox};
use crate::{Answer, JsonApi};

/// The label of a platform object that names its cluster.
pub const CLUSTER_LABEL: &str = "kuberaya.cloudraya.com/cluster-id";
/// The labels of a load balancer (and its public IP) that name its Service.
pub const SERVICE_UID_LABEL: &str = "kuberaya.cloudraya.com/service-uid";
pub const SERVICE_NAME_LABEL: &str = "kuberaya.cloudraya.com/service-name";
pub const SERVICE_NAMESPACE_LABEL: &str = "kuberaya.cloudraya.com/service-namespace";

/// A running sandbox in a temporary state dir with its platform API at hand;
/// `sandbox down --purge` on drop.
pub struct CloudSandbox {
    pub sandbox: TempSandbox,
    pub url: String,
    pub email: String,
    pub password: String,
    pub cluster_id: String,
    pub rt: tokio::runtime::Runtime,
    /// The platform API, logged in.
    pub api: JsonApi,
    /// The stand-in's control API.
    pub ctl: JsonApi,
}

impl CloudSandbox {
    /// `sandbox up --detach` on `ranges` with `extra` arguments, its platform API logged
    /// in, once `nodes` Nodes are Ready (at most 20 s).
    pub fn up(ranges: &Ranges, extra: &[&str], nodes: usize) -> Result<CloudSandbox> {
        let sandbox = TempSandbox::up_on(ranges, extra)?;
        let vars = sandbox.env()?;
        let get = |k: &str| vars.get(k).cloned().with_context(|| format!("sandbox env exports {k}"));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let url = get("CLOUDRAYA_API_URL")?;
        let email = get("CLOUDRAYA_EMAIL")?;
        let password = get("CLOUDRAYA_PASSWORD")?;
        let api = rt.block_on(JsonApi::login(&url, &email, &password))?;
        let sb = CloudSandbox {
            cluster_id: get("KUBERAYA_CLUSTER_ID")?,
            ctl: JsonApi::new(&url),
            sandbox,
            url,
            email,
            password,
            api,
            rt,
        };
        let ready = sb.wait_nodes_ready(nodes, Duration::from_secs(20));
        ensure!(ready.is_some(), "{nodes} Ready nodes: {}", sb.log());
        Ok(sb)
    }

    pub fn state(&self) -> &Path {
        &self.sandbox.state
    }

    /// The network index of its ranges.
    pub fn net(&self) -> u8 {
        self.sandbox.net
    }

    /// The tail of the sandbox's log (30 lines), for failure messages.
    pub fn log(&self) -> String {
        self.sandbox.log_tail(30)
    }

    /// `kuberaya ARGS --state-dir STATE`, which must succeed; returns its stdout.
    pub fn kuberaya(&self, args: &[&str]) -> Result<String> {
        self.sandbox.kuberaya(args)
    }

    /// A call of the platform API.
    pub fn platform(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Answer {
        self.rt.block_on(self.api.request(method, path, body))
    }

    /// A call of the stand-in's control API. A transport error is retried: the stand-in
    /// has been seen to reset a kept-alive connection right after a client of it was
    /// killed mid-request.
    pub fn control(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Answer {
        for _ in 0..2 {
            match self.rt.block_on(self.ctl.try_request(method.clone(), path, body)) {
                Ok(a) => return a,
                Err(e) => eprintln!("{method} {path}: {e:#}; retrying"),
            }
        }
        self.rt.block_on(self.ctl.request(method, path, body))
    }

    /// Every item of a paginated list of the platform API.
    pub fn list(&self, path: &str) -> Result<Vec<Value>> {
        self.rt.block_on(self.api.list_all(path))
    }

    /// The path of our cluster's load balancers.
    pub fn lbs_path(&self) -> String {
        format!("/kubernetes/v1/clusters/{}/load-balancers", self.cluster_id)
    }

    /// The load balancers under our cluster's path that carry our cluster ID.
    pub fn cluster_lbs(&self) -> Result<Vec<Value>> {
        self.list(&format!(
            "{}?label={CLUSTER_LABEL}={}",
            self.lbs_path(),
            self.cluster_id
        ))
    }

    /// Our cluster's load balancers of the Services in `namespace`, by Service name.
    pub fn lbs_in(&self, namespace: &str) -> Result<BTreeMap<String, Vec<Value>>> {
        let lbs = self.list(&format!(
            "{}?label={CLUSTER_LABEL}={}&label={SERVICE_NAMESPACE_LABEL}={namespace}",
            self.lbs_path(),
            self.cluster_id
        ))?;
        Ok(by_service(lbs))
    }

    /// The single load balancer of Service `namespace/name`.
    pub fn lb_in(&self, namespace: &str, name: &str) -> Result<Value> {
        only_lb(self.lbs_in(namespace)?, name)
    }

    /// The platform's VMs of our cluster by name.
    pub fn vms(&self) -> Result<BTreeMap<String, Value>> {
        let vms = self.list(&format!("/vm/v1/instances?label={CLUSTER_LABEL}={}", self.cluster_id))?;
        Ok(vms
            .into_iter()
            .filter_map(|vm| Some((vm["name"].as_str()?.to_string(), vm.clone())))
            .collect())
    }

    /// The platform's VMs of our cluster: name → id.
    pub fn vm_ids(&self) -> Result<BTreeMap<String, String>> {
        Ok(self
            .vms()?
            .into_iter()
            .filter_map(|(name, vm)| Some((name, vm["id"].as_str()?.to_string())))
            .collect())
    }

    /// Call counts of the stand-in.
    pub fn calls(&self) -> Result<Calls> {
        parse_calls(&self.control(reqwest::Method::GET, "/_sandbox/calls", None))
    }

    /// Replaces the stand-in's fault rules.
    pub fn set_faults(&self, rules: Value) -> Result<()> {
        let a = self.control(reqwest::Method::PUT, "/_sandbox/faults", Some(&json!({"rules": rules})));
        ensure!(a.status == 200, "PUT /_sandbox/faults: {}", a.describe());
        Ok(())
    }
}

impl Cluster for CloudSandbox {
    fn kubeconfig(&self) -> &Path {
        self.sandbox.kubeconfig()
    }
}

/// Load balancers by the name of their Service (label [`SERVICE_NAME_LABEL`]).
pub fn by_service(lbs: Vec<Value>) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for lb in lbs {
        let svc = lb["labels"][SERVICE_NAME_LABEL]
            .as_str()
            .unwrap_or_default()
            .to_string();
        out.entry(svc).or_default().push(lb);
    }
    out
}

/// The single load balancer of Service `name` in `by_service`.
pub fn only_lb(mut by_service: BTreeMap<String, Vec<Value>>, name: &str) -> Result<Value> {
    let mut all = by_service.remove(name).unwrap_or_default();
    ensure!(all.len() == 1, "one load balancer for {name}: {all:?}");
    Ok(all.remove(0))
}

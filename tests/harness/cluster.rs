//! A Kubernetes cluster as the tests reach it: the real `kubectl` (from `PATH`) with an
//! explicit `--kubeconfig` ([`Cluster`]), what the tests read out of its objects, and the
//! Deployment and Service manifests they apply.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::poll_until_blocking;
use crate::sandbox::output_text;

/// A kubeconfig with a kubectl HOME of its own (never the user's) and every call bounded.
pub struct Kubectl {
    pub kubeconfig: std::path::PathBuf,
    pub home: std::path::PathBuf,
    pub request_timeout: Duration,
}

impl Cluster for Kubectl {
    fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    fn home(&self) -> Option<&Path> {
        Some(&self.home)
    }

    fn request_timeout(&self) -> Option<Duration> {
        Some(self.request_timeout)
    }
}

/// A cluster reached with `kubectl --kubeconfig K`; implement [`Cluster::kubeconfig`] and
/// get the rest.
pub trait Cluster {
    /// The kubeconfig every `kubectl` call is given.
    fn kubeconfig(&self) -> &Path;

    /// The HOME kubectl runs with (its discovery cache; none: the caller's).
    fn home(&self) -> Option<&Path> {
        None
    }

    /// `--request-timeout` of every call (none: kubectl's default, no limit), so that a
    /// call to a server that stopped answering fails instead of hanging.
    fn request_timeout(&self) -> Option<Duration> {
        None
    }

    /// `kubectl --kubeconfig K ARGS` with `stdin` piped in (none: empty stdin); the status
    /// is not checked.
    fn kubectl_output(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Output> {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig").arg(self.kubeconfig());
        if let Some(t) = self.request_timeout() {
            cmd.arg(format!("--request-timeout={}s", t.as_secs().max(1)));
        }
        if let Some(home) = self.home() {
            cmd.env("HOME", home).env_remove("KUBECONFIG");
        }
        let mut child = cmd
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        if let Some(input) = stdin {
            child.stdin.take().context("kubectl stdin")?.write_all(input)?;
        }
        Ok(child.wait_with_output()?)
    }

    /// `kubectl ARGS`, which must succeed; returns its stdout.
    fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl_output(args, None)?;
        ensure!(out.status.success(), "kubectl {args:?}: {}", output_text(&out));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply -f -` of `yaml`, which must succeed.
    fn apply(&self, yaml: &str) -> Result<()> {
        let out = self.kubectl_output(&["apply", "-f", "-"], Some(yaml.as_bytes()))?;
        ensure!(out.status.success(), "kubectl apply: {}\n{yaml}", output_text(&out));
        Ok(())
    }

    /// `kubectl ARGS -o json`, parsed.
    fn get_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&all)?)?)
    }

    /// The Service `name` (current namespace), or `None` once it is gone.
    fn service_opt(&self, name: &str) -> Result<Option<Value>> {
        let out = self.kubectl_output(&["get", "service", name, "-o", "json"], None)?;
        if out.status.success() {
            return Ok(Some(serde_json::from_slice(&out.stdout)?));
        }
        ensure!(
            String::from_utf8_lossy(&out.stderr).contains("NotFound"),
            "kubectl get service {name}: {}",
            output_text(&out)
        );
        Ok(None)
    }

    /// `kubectl wait --timeout=TIMEOUT` (e.g. `40s`) for the Service's ingress; returns
    /// its first IP.
    fn wait_ingress(&self, name: &str, timeout: &str) -> Result<String> {
        let out = self.kubectl_output(
            &[
                "wait",
                "--for=jsonpath={.status.loadBalancer.ingress}",
                &format!("service/{name}"),
                &format!("--timeout={timeout}"),
            ],
            None,
        )?;
        ensure!(
            out.status.success(),
            "kubectl wait for the ingress of {name}: {}",
            output_text(&out)
        );
        ingress_ip(&self.get_json(&["get", "service", name])?).with_context(|| format!("ingress IP of {name}"))
    }

    /// Waits (at most `within`) until exactly `count` pods carry `app=APP` and all are
    /// ready with a pod IP; returns pod name → node name.
    fn wait_ready_pods(&self, app: &str, count: usize, within: Duration) -> Result<BTreeMap<String, String>> {
        let mut last = Value::Null;
        let pods = poll_until_blocking(within, || {
            let pods = self.get_json(&["get", "pods", "-l", &format!("app={app}")]).ok()?;
            last = pods.clone();
            let items = pods["items"].as_array()?;
            let ready: BTreeMap<String, String> = items
                .iter()
                .filter(|p| is_ready(p) && p["status"]["podIP"].is_string())
                .filter_map(|p| {
                    Some((
                        p["metadata"]["name"].as_str()?.into(),
                        p["spec"]["nodeName"].as_str()?.into(),
                    ))
                })
                .collect();
            (items.len() == count && ready.len() == count).then_some(ready)
        });
        pods.with_context(|| format!("{count} ready pods of {app}: {last}"))
    }

    /// The ClusterIP of Service `svc` (current namespace).
    fn cluster_ip(&self, svc: &str) -> Result<String> {
        let ip = self.kubectl(&["get", "service", svc, "-o", "jsonpath={.spec.clusterIP}"])?;
        ensure!(!ip.is_empty(), "Service {svc} has no ClusterIP");
        Ok(ip)
    }

    /// The Nodes by name.
    fn nodes(&self) -> Result<BTreeMap<String, Value>> {
        let nodes = self.get_json(&["get", "nodes"])?;
        Ok(nodes["items"]
            .as_array()
            .context("items")?
            .iter()
            .filter_map(|n| Some((n["metadata"]["name"].as_str()?.to_string(), n.clone())))
            .collect())
    }

    /// Waits (at most `within`) until exactly `count` Nodes are there, all Ready.
    fn wait_nodes_ready(&self, count: usize, within: Duration) -> Option<()> {
        poll_until_blocking(within, || {
            let nodes = self.get_json(&["get", "nodes"]).ok()?;
            let items = nodes["items"].as_array()?;
            (items.len() == count && items.iter().all(is_ready)).then_some(())
        })
    }
}

/// The status of an object's (Node's, Pod's) `Ready` condition: `None` without
/// conditions, else whether one says `Ready=True`.
pub fn ready_condition(obj: &Value) -> Option<bool> {
    let conds = obj["status"]["conditions"].as_array()?;
    Some(conds.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// Whether a Node or Pod has the condition `Ready=True`.
pub fn is_ready(obj: &Value) -> bool {
    ready_condition(obj) == Some(true)
}

/// Whether a Node carries a taint with `key`.
pub fn has_taint(node: &Value, key: &str) -> bool {
    node["spec"]["taints"]
        .as_array()
        .is_some_and(|ts| ts.iter().any(|t| t["key"] == key))
}

/// A Node's address of type `type_` (`InternalIP`, `Hostname`, ...).
pub fn node_address(node: &Value, type_: &str) -> Option<String> {
    node["status"]["addresses"]
        .as_array()?
        .iter()
        .find(|a| a["type"] == type_)
        .and_then(|a| a["address"].as_str())
        .map(String::from)
}

/// A Service's first ingress IP.
pub fn ingress_ip(svc: &Value) -> Option<String> {
    svc["status"]["loadBalancer"]["ingress"][0]["ip"]
        .as_str()
        .map(String::from)
}

/// A Deployment `name` (label `app: NAME`) of `replicas` pods whose container declares
/// port 8080 (TCP), and 5353/UDP too when `udp`: the sandbox's pods answer HTTP on their
/// TCP ports (`pod=NAME namespace=NS node=NODE`) and echo UDP with a `pod=NAME ` prefix.
pub fn deployment(name: &str, replicas: u32, udp: bool) -> String {
    let udp_port = if udp {
        "\n        - containerPort: 5353\n          protocol: UDP"
    } else {
        ""
    };
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels:\n      app: {name}\n  template:\n    metadata:\n      labels:\n        app: {name}\n    spec:\n      containers:\n      - name: {name}\n        image: any\n        ports:\n        - containerPort: 8080{udp_port}\n"
    )
}

/// A `type: LoadBalancer` Service for app `app` on port 80 (→ 8080); `extra_spec` holds
/// YAML lines indented for their place under `spec:`.
pub fn lb_service(name: &str, app: &str, annotations: &[(&str, &str)], extra_spec: &str) -> String {
    let mut meta = format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n");
    if !annotations.is_empty() {
        meta.push_str("  annotations:\n");
        for (k, v) in annotations {
            meta.push_str(&format!("    {k}: \"{v}\"\n"));
        }
    }
    format!(
        "{meta}spec:\n  type: LoadBalancer\n{extra_spec}  selector:\n    app: {app}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n"
    )
}

/// LB annotations for fast health checks, so that health changes show within seconds.
pub const FAST_HEALTH: &[(&str, &str)] = &[
    ("lb.cloudraya.com/health-check-interval", "2"),
    ("lb.cloudraya.com/health-check-timeout", "1"),
    ("lb.cloudraya.com/health-check-healthy-threshold", "1"),
    ("lb.cloudraya.com/health-check-unhealthy-threshold", "1"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ready_condition_tells_missing_from_not_ready() {
        assert_eq!(ready_condition(&json!({})), None);
        let not = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}});
        assert_eq!(ready_condition(&not), Some(false));
        assert!(!is_ready(&not));
        let ready = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        assert!(is_ready(&ready));
    }

    #[test]
    fn manifests_put_extra_spec_and_annotations_in_place() {
        let svc = lb_service("web", "app", FAST_HEALTH, "  externalTrafficPolicy: Local\n");
        assert!(svc.contains("  annotations:\n    lb.cloudraya.com/health-check-interval: \"2\"\n"));
        assert!(svc.contains("  type: LoadBalancer\n  externalTrafficPolicy: Local\n  selector:\n"));
        assert!(deployment("web", 2, true).ends_with("8080\n        - containerPort: 5353\n          protocol: UDP\n"));
    }
}

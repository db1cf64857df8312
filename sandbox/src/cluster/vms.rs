//! The cluster's view of the platform: its worker VMs, read through the public API of
//! `docs/platform-api.md` (as anything outside the platform would), and driven through the
//! stand-in's `/_sandbox/` control API (`kuberaya sandbox node add|stop|start|delete`).
//!
//! A small client of its own, written from the contract document: the sandbox never
//! imports the CCM's platform client.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

/// The label the node pools put on a cluster's worker VMs.
pub const CLUSTER_LABEL: &str = "kuberaya.cloudraya.com/cluster-id";
/// Bound on every call to the platform.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on pages read from a list.
const MAX_PAGES: u32 = 100;

/// How to reach and log in to the platform.
#[derive(Clone)]
pub struct PlatformLogin {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub email: String,
    pub password: String,
}

impl std::fmt::Debug for PlatformLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformLogin")
            .field("url", &self.url)
            .field("email", &self.email)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A VM as the public API shows it (the fields the cluster uses).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Vm {
    pub id: String,
    pub name: String,
    pub state: String,
    pub private_ip: Ipv4Addr,
    /// In a cluster whose platform subnet has IPv6 (`docs/platform-api.md`).
    #[serde(default)]
    pub private_ipv6: Option<Ipv6Addr>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Vm {
    /// A running VM runs its node's processes (kubelet, kube-proxy, pods).
    pub fn running(&self) -> bool {
        self.state == "running"
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("platform call {what} failed: {source}")]
    Http {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("platform call {what} answered {status}: {message}")]
    Status { what: String, status: u16, message: String },
    #[error("no VM named {name} in cluster {cluster_id}")]
    NoSuchVm { name: String, cluster_id: String },
}

/// A client of the platform's VM API and the stand-in's control API.
pub struct PlatformClient {
    http: reqwest::Client,
    login: PlatformLogin,
    token: Mutex<Option<String>>,
}

impl std::fmt::Debug for PlatformClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformClient")
            .field("url", &self.login.url)
            .finish_non_exhaustive()
    }
}

impl PlatformClient {
    /// Installs the ring crypto provider for rustls if none is installed yet (reqwest is
    /// built without one), then builds the client.
    pub fn new(login: PlatformLogin) -> Result<Self, PlatformError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(|source| PlatformError::Http {
                what: "client set-up".into(),
                source,
            })?;
        Ok(Self {
            http,
            login: PlatformLogin {
                url: login.url.trim_end_matches('/').to_string(),
                ..login
            },
            token: Mutex::new(None),
        })
    }

    fn cached_token(&self) -> Option<String> {
        self.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn log_in(&self) -> Result<String, PlatformError> {
        let body = json!({"email": self.login.email, "password": self.login.password});
        let data = self
            .call(reqwest::Method::POST, "/core/v1/auth/login", Some(body), None)
            .await?;
        let token = data["token"].as_str().unwrap_or_default().to_string();
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
        Ok(token)
    }

    /// One call; the envelope's `data` on success.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> Result<Value, PlatformError> {
        let what = format!("{method} {path}");
        let mut req = self.http.request(method, format!("{}{path}", self.login.url));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.map_err(|source| PlatformError::Http {
            what: what.clone(),
            source,
        })?;
        let status = resp.status().as_u16();
        let envelope: Value = resp.json().await.unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(envelope["data"].clone());
        }
        let message = match &envelope["error"] {
            Value::String(s) => s.clone(),
            Value::Null => "no error message".into(),
            other => other.to_string(),
        };
        Err(PlatformError::Status { what, status, message })
    }

    /// An authenticated call; logs in first when needed and once more on a 401.
    async fn authed(&self, path: &str) -> Result<Value, PlatformError> {
        let token = match self.cached_token() {
            Some(t) => t,
            None => self.log_in().await?,
        };
        match self.call(reqwest::Method::GET, path, None, Some(&token)).await {
            Err(PlatformError::Status { status: 401, .. }) => {
                let token = self.log_in().await?;
                self.call(reqwest::Method::GET, path, None, Some(&token)).await
            }
            other => other,
        }
    }

    /// The VMs of `cluster_id` (labelled with it), every page.
    pub async fn cluster_vms(&self, cluster_id: &str) -> Result<Vec<Vm>, PlatformError> {
        let mut out = Vec::new();
        for page in 1..=MAX_PAGES {
            let path = format!("/vm/v1/instances?label={CLUSTER_LABEL}={cluster_id}&per_page=100&page={page}");
            let data = self.authed(&path).await?;
            let items: Vec<Vm> = data["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| serde_json::from_value(v.clone()).ok())
                .collect();
            let total = data["total"].as_u64().unwrap_or(0);
            let n = items.len();
            out.extend(items);
            if n == 0 || out.len() as u64 >= total {
                break;
            }
        }
        Ok(out)
    }

    /// The VM of `cluster_id` named `name`.
    pub async fn find_vm(&self, cluster_id: &str, name: &str) -> Result<Vm, PlatformError> {
        self.cluster_vms(cluster_id)
            .await?
            .into_iter()
            .find(|vm| vm.name == name)
            .ok_or_else(|| PlatformError::NoSuchVm {
                name: name.into(),
                cluster_id: cluster_id.into(),
            })
    }

    /// Control API: a new running worker VM of `cluster_id`.
    pub async fn add_vm(&self, cluster_id: &str, name: &str) -> Result<Vm, PlatformError> {
        let body = json!({"name": name, "cluster_id": cluster_id, "labels": {CLUSTER_LABEL: cluster_id}});
        let data = self
            .call(reqwest::Method::POST, "/_sandbox/vms", Some(body), None)
            .await?;
        serde_json::from_value(data.clone()).map_err(|e| PlatformError::Status {
            what: "POST /_sandbox/vms".into(),
            status: 200,
            message: format!("unexpected answer {data}: {e}"),
        })
    }

    /// Control API: stop (`"stop"`) or start (`"start"`) a VM.
    pub async fn vm_action(&self, vm_id: &str, action: &str) -> Result<(), PlatformError> {
        self.call(
            reqwest::Method::POST,
            &format!("/_sandbox/vms/{vm_id}/{action}"),
            None,
            None,
        )
        .await?;
        Ok(())
    }

    /// Control API: delete a VM.
    pub async fn delete_vm(&self, vm_id: &str) -> Result<(), PlatformError> {
        self.call(reqwest::Method::DELETE, &format!("/_sandbox/vms/{vm_id}"), None, None)
            .await?;
        Ok(())
    }
}

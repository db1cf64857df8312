//! A plain REST client of a Kubernetes API server from a kubeconfig (server, CA, bearer
//! token), JSON in and out: for benches and tests that create thousands of objects with
//! bounded concurrency, where `kubectl` per object would be the bottleneck.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::b64_decode;

#[derive(Clone)]
pub struct KubeRest {
    client: reqwest::Client,
    server: String,
    token: String,
}

impl KubeRest {
    pub fn from_kubeconfig(path: &Path) -> Result<KubeRest> {
        let text = std::fs::read_to_string(path)?;
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(k).map(|v| v.trim().trim_matches('"').to_string()))
        };
        let server = field("server:").context("kubeconfig server")?;
        let token = field("token:").context("kubeconfig token")?;
        let _ = crate::http_client(); // installs the crypto provider
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64);
        if let Some(ca) = field("certificate-authority-data:") {
            let pem = b64_decode(&ca).context("CA data")?;
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
        }
        Ok(KubeRest {
            client: builder.build()?,
            server: server.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// One request; the status and the body as JSON (`Null` when it is not JSON).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, &Value)>,
    ) -> Result<(u16, Value)> {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.server))
            .bearer_auth(&self.token);
        if let Some((content_type, body)) = body {
            req = req.header("content-type", content_type).body(body.to_string());
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    async fn expect(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, &Value)>,
        ok: &[u16],
    ) -> Result<(u16, Value)> {
        let verb = method.to_string();
        let (status, v) = self.send(method, path, body).await?;
        ensure!(ok.contains(&status), "{verb} {path}: {status} {v}");
        Ok((status, v))
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        Ok(self.expect(reqwest::Method::GET, path, None, &[200]).await?.1)
    }

    pub async fn create(&self, path: &str, body: &Value) -> Result<()> {
        self.expect(
            reqwest::Method::POST,
            path,
            Some(("application/json", body)),
            &[200, 201],
        )
        .await
        .map(drop)
    }

    /// POST that may meet an object of the same name (409, e.g. while an earlier one still
    /// terminates); the status.
    pub async fn create_or_conflict(&self, path: &str, body: &Value) -> Result<u16> {
        let ok = [200, 201, 409];
        Ok(self
            .expect(reqwest::Method::POST, path, Some(("application/json", body)), &ok)
            .await?
            .0)
    }

    pub async fn merge_patch(&self, path: &str, body: &Value) -> Result<()> {
        let body = Some(("application/merge-patch+json", body));
        self.expect(reqwest::Method::PATCH, path, body, &[200]).await.map(drop)
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        self.expect(reqwest::Method::DELETE, path, None, &[200, 202])
            .await
            .map(drop)
    }

    /// DELETE where an object already gone (404) is fine.
    pub async fn delete_if_present(&self, path: &str) -> Result<()> {
        self.expect(reqwest::Method::DELETE, path, None, &[200, 202, 404])
            .await
            .map(drop)
    }
}

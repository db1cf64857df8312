//! The CCM's small HTTP surface: `/metrics` on the metrics address, `/healthz` and
//! `/readyz` on the health address (one server when both addresses are equal), all three
//! on the secure address: HTTPS, `/metrics` only for a bearer token the API server
//! authenticates and authorizes (`get` on the non-resource URL `/metrics`), the health
//! paths open for probes ([`crate::secure_http`]). The plain addresses are for loopback:
//! the deploy/ manifests serve only the secure one.
//!
//! - `/healthz` (liveness) answers `200 ok` while the process serves HTTP at all: a CCM
//!   that waits for the Lease, or for the platform, is alive.
//! - `/readyz` (readiness) answers `200 ok` once [`crate::run::start`] has reached the
//!   platform (the cluster of the cloud config, with its credentials) and the API server,
//!   and [`crate::run::Started::run`] has its leader election running (or, without
//!   election, its controllers starting); `503 not ready` before that and once it stops.
//!   A standby replica is ready: it is in the rotation for the Lease, and a Deployment of
//!   two replicas must be able to finish its rollout with one of them waiting.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::get;
use tracing::{error, info};

use crate::metrics::Metrics;
use crate::secure_http::{self, SecureServing};

/// The CCM's readiness, shared between [`crate::run`] and the `/readyz` handler.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// `/healthz` and `/readyz`.
pub fn health_routes(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(h): State<Arc<Health>>| async move {
                if h.is_ready() {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .with_state(health)
}

/// `/metrics` in the OpenMetrics text format.
pub fn metrics_routes(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.render(),
                )
            }),
        )
        .with_state(metrics)
}

/// The servers [`serve`] started, stopped when this is dropped.
#[derive(Debug)]
pub struct Serving {
    /// Where `/metrics` listens (`None`: disabled).
    pub metrics: Option<SocketAddr>,
    /// Where `/healthz` and `/readyz` listen (`None`: disabled).
    pub health: Option<SocketAddr>,
    /// Where the HTTPS server listens (`None`: disabled).
    pub secure: Option<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A bind failure: what was bound where.
#[derive(Debug, thiserror::Error)]
#[error("binding {what} on {addr}")]
pub struct BindError {
    pub what: &'static str,
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

async fn listen(
    what: &'static str,
    addr: SocketAddr,
    router: Router,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), BindError> {
    let bind_error = |source| BindError { what, addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    info!(address = %local, "{what} listening");
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            error!(error = %e, "HTTP server stopped");
        }
    });
    Ok((local, task))
}

/// Binds and serves `/metrics` on `metrics_addr` and `/healthz`, `/readyz` on
/// `health_addr` (`None` disables one); returns the bound addresses once listening.
pub async fn serve(
    metrics_addr: Option<SocketAddr>,
    health_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> Result<Serving, BindError> {
    let mut serving = Serving {
        metrics: None,
        health: None,
        secure: None,
        tasks: Vec::new(),
    };
    // One address (not port 0, which means a free port for each) is one server.
    if let Some(addr) = metrics_addr.filter(|a| a.port() != 0 && Some(*a) == health_addr) {
        let router = metrics_routes(metrics).merge(health_routes(health));
        let (addr, task) = listen("metrics and health", addr, router).await?;
        serving.tasks.push(task);
        serving.metrics = Some(addr);
        serving.health = Some(addr);
        return Ok(serving);
    }
    if let Some(addr) = metrics_addr {
        let (addr, task) = listen("metrics", addr, metrics_routes(metrics)).await?;
        serving.tasks.push(task);
        serving.metrics = Some(addr);
    }
    if let Some(addr) = health_addr {
        let (addr, task) = listen("health", addr, health_routes(health)).await?;
        serving.tasks.push(task);
        serving.health = Some(addr);
    }
    Ok(serving)
}

impl Serving {
    /// Adds the HTTPS server of `cfg`: `/metrics` behind the API server's reviews (asked
    /// with `client`), `/healthz` and `/readyz` open.
    pub async fn serve_secure(
        &mut self,
        cfg: &SecureServing,
        client: kube::Client,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<SocketAddr, secure_http::Error> {
        let routes = metrics_routes(metrics).merge(health_routes(health));
        let (addr, task) = secure_http::serve(cfg, client, routes).await?;
        self.tasks.push(task);
        self.secure = Some(addr);
        Ok(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A plain HTTP/1.0 GET; returns the status code and the body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out.split(' ').nth(1).unwrap().parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    #[tokio::test]
    async fn health_ready_and_metrics_answer() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let health = Arc::new(Health::default());
        let metrics = Arc::new(Metrics::new(None));
        let serving = serve(Some(any), Some(any), metrics.clone(), health.clone())
            .await
            .unwrap();
        let (m, h) = (serving.metrics.unwrap(), serving.health.unwrap());
        assert_ne!(m, h, "two servers for two addresses");
        assert_eq!(get(h, "/healthz").await, (200, "ok".into()));
        assert_eq!(get(h, "/readyz").await, (503, "not ready".into()));
        health.set_ready(true);
        assert_eq!(get(h, "/readyz").await, (200, "ok".into()));
        assert_eq!(get(h, "/metrics").await.0, 404, "metrics only on their address");
        metrics.set_leader(true);
        let (code, body) = get(m, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("kuberaya_ccm_leader 1"), "{body}");
        drop(serving);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(tokio::net::TcpStream::connect(h).await.is_err(), "stopped on drop");
    }

    #[tokio::test]
    async fn one_address_serves_everything_and_none_serves_nothing() {
        // A free port, so that both addresses are the same one.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let health = Arc::new(Health::default());
        let metrics = Arc::new(Metrics::new(None));
        let serving = serve(Some(port), Some(port), metrics.clone(), health.clone())
            .await
            .unwrap();
        assert_eq!(serving.metrics, serving.health);
        let a = serving.health.unwrap();
        assert_eq!(get(a, "/healthz").await.0, 200);
        assert_eq!(get(a, "/metrics").await.0, 200);
        let none = serve(None, None, metrics, health).await.unwrap();
        assert_eq!((none.metrics, none.health), (None, None));
    }
}

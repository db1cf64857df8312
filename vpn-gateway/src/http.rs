//! The small HTTP surface: `/metrics` on the metrics address, `/healthz` and `/readyz` on
//! the health address (the same server when both addresses are equal), and all three on
//! the secure address: HTTPS, `/metrics` (it names peers) only for a bearer token the API
//! server authenticates and authorizes for `get` on `/metrics`, the health paths open
//! ([`crate::secure_http`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::Metrics;
use crate::secure_http::{self, SecureServing};

/// Shared with the gateway loop: ready once the socket is bound and peers are loaded, and
/// not while draining before a stop.
#[derive(Default)]
pub struct Health {
    pub ready: AtomicBool,
    /// Stopping: not ready whatever the loop says, so that traffic moves elsewhere while
    /// this replica still serves.
    pub draining: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed)
    }
}

fn health_routes(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(h): State<Arc<Health>>| async move {
                if h.is_ready() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .with_state(health)
}

fn metrics_routes(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                (
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }),
        )
        .with_state(metrics)
}

/// The servers [`serve`] started, stopped when this is dropped.
pub struct Serving {
    pub metrics: SocketAddr,
    pub health: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Serves `/metrics` (behind the API server's reviews, asked with `client`), `/healthz`
/// and `/readyz` over HTTPS as `cfg` says; returns the bound address and the server task
/// (aborted when dropped with [`Serving`]).
pub async fn serve_secure(
    cfg: &SecureServing,
    client: kube::Client,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> Result<(SocketAddr, AbortOnDrop), secure_http::Error> {
    let routes = metrics_routes(metrics).merge(health_routes(health));
    let (addr, task) = secure_http::serve(cfg, client, routes).await?;
    Ok((addr, AbortOnDrop(task)))
}

/// A task aborted when this is dropped.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Bind and serve; returns the bound addresses once listening.
pub async fn serve(
    metrics_addr: SocketAddr,
    health_addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<Serving> {
    if metrics_addr == health_addr {
        let l = tokio::net::TcpListener::bind(metrics_addr).await?;
        let a = l.local_addr()?;
        let app = metrics_routes(metrics).merge(health_routes(health));
        return Ok(Serving {
            metrics: a,
            health: a,
            tasks: vec![tokio::spawn(async move { axum::serve(l, app).await })],
        });
    }
    let lm = tokio::net::TcpListener::bind(metrics_addr).await?;
    let lh = tokio::net::TcpListener::bind(health_addr).await?;
    let (am, ah) = (lm.local_addr()?, lh.local_addr()?);
    let m = metrics_routes(metrics);
    let h = health_routes(health);
    Ok(Serving {
        metrics: am,
        health: ah,
        tasks: vec![
            tokio::spawn(async move { axum::serve(lm, m).await }),
            tokio::spawn(async move { axum::serve(lh, h).await }),
        ],
    })
}

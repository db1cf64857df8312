//! The platform's data plane: every rule of every active load balancer listens on its
//! public IP:port and forwards to the backends' private IP:port.
//!
//! The API layer (`platform::api`) owns the load-balancer objects; it hands this module the
//! listeners that should exist for one LB with [`Forwarder::apply_lb`] and reads backend
//! health back with [`Forwarder::health`]. Nothing here knows about HTTP or JSON.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
    LeastConnection,
    /// By a hash of the client IP.
    Source,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Connect to `port` on the backend's private IP.
    Tcp { port: u16 },
    /// `GET path` on the backend's private IP:`port`; healthy on 2xx.
    Http { port: u16, path: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub vm_id: String,
    pub private_ip: IpAddr,
    /// A stopped VM fails every health check, whatever listens on its address on loopback.
    pub running: bool,
}

/// One rule of one LB, as the data plane needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub rule: String,
    pub protocol: Protocol,
    pub listen: SocketAddr,
    pub private_port: u16,
    pub algorithm: Algorithm,
    /// Empty: any source.
    pub allowed_sources: Vec<IpNet>,
    pub health_check: HealthCheck,
    pub backends: Vec<Backend>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Healthy,
    Unhealthy,
    Unknown,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot listen on {protocol:?} {addr}: {source}")]
    Bind {
        protocol: Protocol,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The data plane of the whole platform: the listeners of every LB, keyed by LB id.
///
/// SKELETON (to be replaced by the forwarding implementation): the method signatures are
/// the contract with `platform::api`.
#[derive(Default)]
pub struct Forwarder {}

impl Forwarder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Make the running listeners of `lb_id` exactly `listeners`: start new ones, update
    /// changed ones in place (same socket when the listen address is unchanged, so open
    /// connections survive), stop removed ones. On a bind error the other listeners of
    /// the LB still run and the error is returned (the API marks the LB `error`).
    pub async fn apply_lb(&self, lb_id: &str, listeners: Vec<Listener>) -> Result<(), ForwardError> {
        let _ = (lb_id, listeners);
        Ok(())
    }

    /// Stop every listener of `lb_id`.
    pub async fn remove_lb(&self, lb_id: &str) {
        let _ = lb_id;
    }

    /// Health of each (rule, backend vm_id) of `lb_id`, as the health checks see it now.
    pub fn health(&self, lb_id: &str) -> Vec<(String, String, HealthState)> {
        let _ = lb_id;
        Vec::new()
    }

    /// Stop everything (listeners, health checks, open flows).
    pub async fn shutdown(&self) {}
}

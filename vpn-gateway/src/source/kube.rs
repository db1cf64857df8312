//! The Kubernetes source: `VpnPeer`, `VpnAccessPolicy` and `Service` watchers (kube-rs
//! reflectors), preshared keys read from the Secrets peers name, the gateway's private key
//! from a Secret (generated on first start), and `VpnPeer` and `VpnAccessPolicy` status
//! written back when it changed (a peer's counters at most every [`STATUS_INTERVAL`]).
//!
//! - `convert`: Kubernetes objects as the gateway's inputs (no I/O).
//! - `status`: the statuses the gateway's reports become, and their writer.
//! - `watch`: the watching [`KubeSource`], the client and the gateway's key Secret.

mod convert;
mod status;
mod watch;

pub use convert::{
    PRESHARED_KEY_KEY, PRIVATE_KEY_KEY, peer_from_k8s, policy_from_k8s, psk_from_read, psk_from_secret,
    service_from_k8s, trim_peer, trim_policy,
};
pub use status::{STATUS_INTERVAL, policy_status_for, status_for, write_status};
pub use watch::{KubeSource, WATCH_BACKOFF_MAX, WatchBackoff, client, load_or_create_key};

//! Harness for the end-to-end tests: start the real binaries, wait for them, clean up.
//!
//! - [`bins`]: find the workspace's built binaries (`target/<profile>/` or
//!   `KURAYA_BIN_DIR`), building a missing one once with `cargo build --bin NAME`.
//! - [`process`]: [`Process`], a spawned binary with its output captured to files, that is
//!   terminated (SIGTERM, then SIGKILL) with its whole process group on drop.
//! - [`platform`]: [`PlatformTarget`], the CloudRaya platform the tests talk to: a real
//!   endpoint from the environment or a fresh platform stand-in; [`Janitor`] removes what
//!   a test created on a real endpoint.
//! - [`netns`]: [`Netns`], a network namespace of the test's own (deleted with everything
//!   in it on drop), veth pairs, bounded command runs, and daemons with a private
//!   `/var/run/wireguard`.
//! - [`http`]: [`JsonApi`], a raw JSON HTTP helper that returns `(status, headers, body)`
//!   as an [`Answer`], with envelope checks.
//! - [`sandbox`]: [`sandbox::Sandbox`], a detached `kuberaya sandbox` on unique ranges
//!   (purged on drop), its [`sandbox::User`], and WireGuard peers through `onetun`.
//! - [`cluster`]: [`cluster::Cluster`], `kubectl --kubeconfig` and what the tests read
//!   from Nodes, Pods and Services; Deployment and LoadBalancer Service manifests.
//! - [`cloud`]: [`cloud::CloudSandbox`], a sandbox with its platform API logged in and
//!   the stand-in's control API, as the CCM meets it.
//! - [`ccm`]: [`ccm::Ccm`], the `kuberaya-ccm` binary run against a `CloudSandbox`.
//! - [`calls`]: the stand-in's call counts and what the tests compute from them.
//! - [`probe`]: `curl`, `dig`, UDP echo and metrics probes, and which pod answered.
//! - [`gateway`]: the `kuberaya-gateway` binary on loopback: its command line, its start
//!   line ([`gateway::Gateway`]), `/metrics`, test peers' keys, onetun as a peer, when
//!   traffic was cut ([`gateway::CutOff`]), and IP packets for a test's own client.
//! - [`failover`]: two gateway replicas behind a platform LB ([`failover::Topology`]),
//!   onetun clients with a chosen source address, request loops, and a replica killed.
//! - [`kube_rest`]: [`kube_rest::KubeRest`], a plain REST client of the Kubernetes API
//!   for creating thousands of objects with bounded concurrency.
//! - [`kube_stand_in`]: the Kubernetes API stand-in (`kuberaya-sandbox kube`) alone: its
//!   command line and the URL it listens on.
//! - [`tunnel`]: [`tunnel::Tunnel`], a test peer's onetun through the sandbox's gateway
//!   to an HTTP Service, and whether requests get through or are cut off.
//! - [`b64`]: standard base64 ([`b64()`], [`b64_decode`]) on the workspace's crate.

pub mod b64;
pub mod bins;
pub mod calls;
pub mod ccm;
pub mod cloud;
pub mod cluster;
pub mod failover;
pub mod gateway;
pub mod http;
pub mod kube_rest;
pub mod kube_stand_in;
pub mod netns;
pub mod platform;
pub mod probe;
pub mod process;
pub mod sandbox;
pub mod tunnel;
pub mod wg_client;
pub mod wg_quick;

pub use b64::{b64, b64_decode};
pub use bins::{bin_dir, binary};
pub use http::{Answer, JsonApi, http_client, query_encode};
pub use netns::{Netns, VethEnd, require_root, veth_pair};
pub use platform::{Janitor, PlatformTarget, SandboxOptions, run_id, unique_net_index};
pub use process::Process;

use std::time::{Duration, Instant};

/// Poll `check` every `every` until it returns `Some`, or give up after `timeout`.
pub async fn poll_until<T, F, Fut>(timeout: Duration, every: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// [`poll_until`] for synchronous tests: poll `check` every 50 ms until it returns `Some`,
/// or give up after `timeout`.
pub fn poll_until_blocking<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

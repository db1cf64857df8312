//! Local stand-ins for what cannot run on a developer machine:
//! - [`platform`]: the CloudRaya platform API (with real L4 forwarding through its load
//!   balancers);
//! - [`kube`]: a Kubernetes API server (HTTPS, the REST API our controllers and `kubectl`
//!   use, watches, persistence in a state dir);
//! - [`cluster`]: what runs on a cluster besides the API server (node agents, workloads,
//!   EndpointSlices, kube-proxy), played by ordinary Kubernetes clients.
//!
//! The stand-ins are written from the contract documents (`docs/platform-api.md`, the
//! Kubernetes API), never from our client's types: this crate depends on neither `ccm`
//! nor `vpn-gateway`, so a misreading of a contract cannot hide by being made on both
//! sides.

pub mod cluster;
pub mod kube;
pub mod platform;

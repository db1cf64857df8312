//! Local stand-ins for what cannot run on a developer machine: the CloudRaya platform
//! (with real L4 forwarding through its load balancers) and, later, the Kubernetes API.
//!
//! The stand-ins are written from the contract documents (`docs/platform-api.md`, the
//! Kubernetes API), never from our client's types: this crate depends on neither `ccm`
//! nor `vpn-gateway`, so a misreading of a contract cannot hide by being made on both
//! sides.

pub mod cluster;
pub mod kube;
pub mod platform;

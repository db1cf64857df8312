//! KubeRaya cloud-controller-manager for CloudRaya.
//!
//! For now this crate holds the CloudRaya platform client ([`platform`]): the
//! [`platform::Platform`] trait every controller and the CLI talk to, and its HTTP
//! implementation written against `docs/platform-api.md`. The controllers (service,
//! node, node lifecycle) and the crate-wide error type come next.

pub mod platform;

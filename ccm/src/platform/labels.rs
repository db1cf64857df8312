//! The labels the CCM puts on platform objects (docs/platform-api.md, "Labels we put on
//! objects"). The platform does not interpret them; we find our objects by them.
//!
//! These keys are stored on live objects: never change them.

/// The cluster ID. Also set by node pools on worker VMs.
pub const LABEL_CLUSTER_ID: &str = "kuberaya.cloudraya.com/cluster-id";
/// The Service's `metadata.uid`.
pub const LABEL_SERVICE_UID: &str = "kuberaya.cloudraya.com/service-uid";
/// The Service's namespace.
pub const LABEL_SERVICE_NAMESPACE: &str = "kuberaya.cloudraya.com/service-namespace";
/// The Service's name.
pub const LABEL_SERVICE_NAME: &str = "kuberaya.cloudraya.com/service-name";
/// `"true"` on an LB whose Service asked to keep its public IP on deletion
/// (`lb.cloudraya.com/retain-public-ip`), so that an orphan sweep, which no longer has
/// the Service, still keeps it. Absent otherwise.
pub const LABEL_RETAIN_PUBLIC_IP: &str = "kuberaya.cloudraya.com/retain-public-ip";

/// Contract limits on labels (422 beyond them).
pub const MAX_LABEL_KEY_LEN: usize = 253;
pub const MAX_LABEL_VALUE_LEN: usize = 63;
pub const MAX_LABELS: usize = 64;

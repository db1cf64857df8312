//! The cluster objects the gateway needs installed, as `deploy/` holds them: the
//! `VpnPeer` and `VpnAccessPolicy` CRDs ([`crds`], the same as `deploy/crds/`), the gateway's
//! Namespace, its `kuberaya-config` ConfigMap and its Service (parsed from
//! `deploy/gateway/base/`).
//! For installers without kustomize (`kuberaya sandbox up`), so that there is no second
//! hand-written copy of them.

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt as _;

use crate::crd::{VpnAccessPolicy, VpnPeer};

/// `deploy/gateway/base/namespace.yaml`.
pub const NAMESPACE_YAML: &str = include_str!("../../deploy/gateway/base/namespace.yaml");
/// `deploy/gateway/base/config.yaml`.
pub const CONFIG_YAML: &str = include_str!("../../deploy/gateway/base/config.yaml");
/// `deploy/gateway/base/service.yaml`.
pub const SERVICE_YAML: &str = include_str!("../../deploy/gateway/base/service.yaml");
/// The ConfigMap of cluster facts in the gateway's namespace (the CLI reads it).
pub const CONFIG_MAP: &str = "kuberaya-config";
/// Its key holding the cluster's Service range.
pub const CONFIG_KEY_SERVICE_CIDR: &str = "service-cidr";

/// The `VpnPeer` CRD.
pub fn crd() -> CustomResourceDefinition {
    VpnPeer::crd()
}

/// Every CRD of the gateway: `VpnPeer` and `VpnAccessPolicy`.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![VpnPeer::crd(), VpnAccessPolicy::crd()]
}

/// The gateway's Namespace (`kuberaya-system`).
pub fn namespace() -> Namespace {
    serde_saphyr::from_str(NAMESPACE_YAML).expect("deploy/gateway/base/namespace.yaml is a Namespace (unit-tested)")
}

/// The gateway's namespace name, as `deploy/` names it.
pub fn namespace_name() -> String {
    namespace().metadata.name.unwrap_or_default()
}

/// `kuberaya-config` with the cluster's Service range `service_cidr`.
pub fn config_map(service_cidr: Ipv4Net) -> ConfigMap {
    let mut cm: ConfigMap =
        serde_saphyr::from_str(CONFIG_YAML).expect("deploy/gateway/base/config.yaml is a ConfigMap (unit-tested)");
    cm.data
        .get_or_insert_with(Default::default)
        .insert(CONFIG_KEY_SERVICE_CIDR.to_string(), service_cidr.to_string());
    cm
}

/// The gateway's `LoadBalancer` Service as deployed: its ports, client-IP affinity,
/// `externalTrafficPolicy: Local` and the LB's health-check annotations.
pub fn service() -> Service {
    serde_saphyr::from_str(SERVICE_YAML).expect("deploy/gateway/base/service.yaml is a Service (unit-tested)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_files_parse_into_the_objects() {
        let ns = namespace();
        assert_eq!(ns.metadata.name.as_deref(), Some("kuberaya-system"));
        assert_eq!(namespace_name(), "kuberaya-system");
        let cm = config_map("127.96.0.0/16".parse().unwrap());
        assert_eq!(cm.metadata.name.as_deref(), Some(CONFIG_MAP));
        assert_eq!(cm.metadata.namespace, ns.metadata.name, "in the gateway's namespace");
        assert_eq!(
            cm.data.unwrap().get(CONFIG_KEY_SERVICE_CIDR).map(String::as_str),
            Some("127.96.0.0/16")
        );
        let svc = service();
        assert_eq!(svc.metadata.name.as_deref(), Some(crate::publish::DEFAULT_SERVICE));
        assert_eq!(svc.metadata.namespace, ns.metadata.name);
        let spec = svc.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(crd().metadata.name.as_deref(), Some("vpnpeers.vpn.cloudraya.com"));
        let names: Vec<Option<String>> = crds().into_iter().map(|c| c.metadata.name).collect();
        assert_eq!(
            names,
            [
                Some("vpnpeers.vpn.cloudraya.com".to_string()),
                Some("vpnaccesspolicies.vpn.cloudraya.com".to_string())
            ]
        );
    }
}

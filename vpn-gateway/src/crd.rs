//! The custom resources: `VpnPeer`, one WireGuard peer of the gateway, and
//! `VpnAccessPolicy`, label-selected grants to peers (see [`VpnAccessPolicySpec`]).
//!
//! ```yaml
//! apiVersion: vpn.cloudraya.com/v1alpha1
//! kind: VpnPeer
//! metadata: { name: alice, namespace: team-a }
//! spec:
//!   publicKey: "base64 of 32 bytes"       # the private key never reaches the cluster
//!   address: 100.64.0.7                   # optional; allocated from the tunnel range
//!   addressV6: fd6b:7261:7961::7          # optional; default: the IPv6 range + address's offset
//!   allow:
//!     - service: web                      # namespace defaults to the peer's own
//!       ports: [80, "metrics"]            # Service port numbers or names; all when absent
//!   expiresAt: "2030-01-01T00:00:00Z"     # optional
//!   presharedKeySecretRef: { name: alice-psk, key: psk }   # optional
//!   disabled: false
//! ```
//!
//! ```yaml
//! apiVersion: vpn.cloudraya.com/v1alpha1
//! kind: VpnAccessPolicy
//! metadata: { name: db-readers, namespace: team-a }
//! spec:
//!   peerSelector: { matchLabels: { role: dba } }   # VpnPeers of this namespace
//!   allow:
//!     - service: pg                               # namespace defaults to the policy's own
//!       ports: [5432]
//!   expiresAt: "2030-01-01T00:00:00Z"             # optional
//! ```
//!
//! A policy outside the gateway's namespace selects peers of its own namespace and grants
//! only Services of its own namespace (a rule naming another one refuses the policy); in
//! the gateway's namespace `namespaceSelector` picks the peers' namespaces and rules may
//! name any namespace ([`crate::policy`]).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What an operator may write.
// Several `printcolumn(...)` entries repeat `type_ = ...`, which the lint takes for a
// duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "vpn.cloudraya.com",
    version = "v1alpha1",
    kind = "VpnPeer",
    namespaced,
    status = "VpnPeerStatus",
    shortname = "vpnpeer",
    doc = "A WireGuard peer of the KubeRaya VPN gateway and the Services it may reach",
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].reason"
    ),
    printcolumn(name = "Address", type_ = "string", json_path = ".status.address"),
    printcolumn(
        name = "AddressV6",
        type_ = "string",
        json_path = ".status.addressV6",
        priority = "1"
    ),
    printcolumn(name = "Handshake", type_ = "date", json_path = ".status.lastHandshake"),
    printcolumn(name = "Disabled", type_ = "boolean", json_path = ".spec.disabled", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct VpnPeerSpec {
    /// The peer's WireGuard public key, base64 (as `wg pubkey` prints it).
    pub public_key: String,
    /// The peer's tunnel address; allocated from the gateway's tunnel range when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The peer's IPv6 tunnel address; when empty, the gateway's IPv6 tunnel range plus the
    /// IPv4 address's offset in its range (100.64.0.7 → fd6b:7261:7961::7 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_v6: Option<String>,
    /// What the peer may reach. Nothing when empty (default deny).
    #[serde(default)]
    pub allow: Vec<AllowRule>,
    /// After this time the peer is cut off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "date_time_schema")]
    pub expires_at: Option<Time>,
    /// A Secret in the peer's namespace holding the preshared key (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preshared_key_secret_ref: Option<SecretKeyRef>,
    /// A disabled peer is kept but cut off.
    #[serde(default)]
    pub disabled: bool,
}

/// One allow rule: a namespace (default: the peer's own), optionally one Service in it,
/// optionally some of its ports (by number or name; all when absent).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "ports_schema")]
    pub ports: Option<Vec<PortRef>>,
}

/// A Service port, by number (`port`, not `targetPort`) or by name.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// A key of a Secret in the peer's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    pub name: String,
    /// The key in the Secret's data; `presharedKey` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// What the gateway reports.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VpnPeerStatus {
    /// `Accepted`: `True` when the gateway serves the peer, `False` with the reason.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The tunnel address in use (given or allocated); none while the peer is not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The tunnel address the peer last had: given back when it is served again (enabled,
    /// renewed) and the address is still free, so that its WireGuard config stays right.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_address: Option<String>,
    /// The IPv6 tunnel address in use; none while the peer is not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_v6: Option<String>,
    /// The IPv6 tunnel address the peer last had, given back as `lastAddress` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_address_v6: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "date_time_schema")]
    pub last_handshake: Option<Time>,
    #[serde(default)]
    pub rx_bytes: u64,
    #[serde(default)]
    pub tx_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A status condition (the shape of `metav1.Condition`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[schemars(schema_with = "date_time_schema_required")]
    pub last_transition_time: Time,
}

/// The condition type the gateway sets.
pub const CONDITION_ACCEPTED: &str = "Accepted";

fn date_time_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "string", "format": "date-time", "nullable": true })
}

fn date_time_schema_required(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "string", "format": "date-time" })
}

fn ports_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "nullable": true,
        "items": { "x-kubernetes-int-or-string": true }
    })
}

fn conditions_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status", "reason", "lastTransitionTime"],
            "properties": {
                "type": { "type": "string" },
                "status": { "type": "string", "enum": ["True", "False", "Unknown"] },
                "reason": { "type": "string" },
                "message": { "type": "string" },
                "lastTransitionTime": { "type": "string", "format": "date-time" }
            }
        }
    })
}

/// What an operator may write: which peers the policy selects and what they may reach.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "vpn.cloudraya.com",
    version = "v1alpha1",
    kind = "VpnAccessPolicy",
    namespaced,
    status = "VpnAccessPolicyStatus",
    shortname = "vpnpolicy",
    doc = "Services that the VpnPeers picked by a label selector may reach, optionally until a time",
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].reason"
    ),
    printcolumn(name = "Peers", type_ = "integer", json_path = ".status.matchedPeers"),
    printcolumn(name = "Expires", type_ = "date", json_path = ".spec.expiresAt"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct VpnAccessPolicySpec {
    /// The VpnPeers granted, by their labels (`{}`: every peer of the selected namespaces).
    pub peer_selector: LabelSelector,
    /// The namespaces whose VpnPeers are selected, by their labels (every namespace carries
    /// `kubernetes.io/metadata.name`). Only honoured in the gateway's namespace; absent, a
    /// policy selects the peers of its own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// What the selected peers may reach, as in a VpnPeer's `allow` (the namespace
    /// defaults to the policy's own).
    #[serde(default)]
    pub allow: Vec<AllowRule>,
    /// After this time the policy grants nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "date_time_schema")]
    pub expires_at: Option<Time>,
}

/// A Kubernetes label selector (the shape of `metav1.LabelSelector`): every `matchLabels`
/// pair and every expression must hold; an empty selector selects everything.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub match_labels: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// `key` `operator` `values`: `In` and `NotIn` take values, `Exists` and `DoesNotExist`
/// none.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    pub key: String,
    #[schemars(schema_with = "operator_schema")]
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// What the gateway reports of a policy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VpnAccessPolicyStatus {
    /// `Accepted`: `True` while the policy grants, `False` with the reason (a rule naming
    /// another namespace, an invalid selector, expired).
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The served VpnPeers it grants to now.
    #[serde(default)]
    pub matched_peers: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

fn operator_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"] })
}

/// The CRD as YAML, as written to `deploy/crds/vpnpeer.yaml`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = VpnPeer::crd();
    let body = serde_saphyr::to_string(&crd).unwrap_or_else(|e| format!("# serialization failed: {e}\n"));
    format!("# Generated by `cargo run -p kuberaya-gateway --bin crdgen`; do not edit.\n{body}")
}

/// Where the generated CRD lives, relative to the workspace root.
pub const CRD_PATH: &str = "deploy/crds/vpnpeer.yaml";

/// The `VpnAccessPolicy` CRD as YAML, as written to [`POLICY_CRD_PATH`].
pub fn policy_crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = VpnAccessPolicy::crd();
    let body = serde_saphyr::to_string(&crd).unwrap_or_else(|e| format!("# serialization failed: {e}\n"));
    format!("# Generated by `cargo run -p kuberaya-gateway --bin crdgen`; do not edit.\n{body}")
}

/// Where the generated `VpnAccessPolicy` CRD lives, relative to the workspace root.
pub const POLICY_CRD_PATH: &str = "deploy/crds/vpnaccesspolicy.yaml";

/// Every generated CRD file: (path relative to the workspace root, contents).
pub fn crd_files() -> [(&'static str, String); 2] {
    [(CRD_PATH, crd_yaml()), (POLICY_CRD_PATH, policy_crd_yaml())]
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crd_files_match_the_types() {
        for (file, yaml) in crd_files() {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file);
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == yaml,
                "{} is out of date: run `cargo run -p kuberaya-gateway --bin crdgen`",
                path.display()
            );
        }
    }

    #[test]
    fn policy_crd_names_scope_and_columns() {
        let crd = VpnAccessPolicy::crd();
        assert_eq!(crd.spec.group, "vpn.cloudraya.com");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, "VpnAccessPolicy");
        assert_eq!(crd.spec.names.plural, "vpnaccesspolicies");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        let columns: Vec<String> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect();
        assert_eq!(columns, ["Accepted", "Reason", "Peers", "Expires", "Age"]);
    }

    #[test]
    fn policy_spec_parses() {
        let spec: VpnAccessPolicySpec = serde_json::from_value(serde_json::json!({
            "peerSelector": {"matchLabels": {"team": "db"},
                             "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}]},
            "allow": [{"service": "pg", "ports": [5432]}],
            "expiresAt": "2030-01-01T00:00:00Z"
        }))
        .unwrap();
        assert_eq!(spec.peer_selector.match_labels["team"], "db");
        assert_eq!(spec.peer_selector.match_expressions[0].operator, "In");
        assert_eq!(spec.namespace_selector, None);
        assert_eq!(spec.allow[0].ports, Some(vec![PortRef::Number(5432)]));
        let empty: VpnAccessPolicySpec = serde_json::from_value(serde_json::json!({"peerSelector": {}})).unwrap();
        assert_eq!(empty.peer_selector, LabelSelector::default());
        assert!(serde_json::from_value::<VpnAccessPolicySpec>(serde_json::json!({"allow": []})).is_err());
    }

    #[test]
    fn crd_names_and_scope() {
        let crd = VpnPeer::crd();
        assert_eq!(crd.spec.group, "vpn.cloudraya.com");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, "VpnPeer");
        assert_eq!(crd.spec.names.plural, "vpnpeers");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        assert!(v.additional_printer_columns.as_ref().is_some_and(|c| c.len() >= 4));
    }

    #[test]
    fn spec_parses_mixed_ports_and_defaults() {
        let spec: VpnPeerSpec = serde_json::from_value(serde_json::json!({
            "publicKey": "k",
            "allow": [{"namespace": "db", "service": "pg", "ports": [5432, "metrics"]}, {}],
            "expiresAt": "2030-01-01T00:00:00Z"
        }))
        .unwrap();
        assert!(!spec.disabled);
        assert_eq!(
            spec.allow[0].ports,
            Some(vec![PortRef::Number(5432), PortRef::Name("metrics".into())])
        );
        assert_eq!(spec.allow[1], AllowRule::default());
        assert!(spec.expires_at.is_some());
        let back = serde_json::to_value(&spec).unwrap();
        assert_eq!(back["allow"][0]["ports"][0], 5432);
    }
}

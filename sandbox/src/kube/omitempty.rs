//! What kube-apiserver leaves out of a built-in object: it decodes every write into Go
//! types and encodes them again, so a member whose Go field is `omitempty` disappears when
//! it is empty (an empty slice, map or string, a nil pointer), whatever the client sent.
//! Clients depend on it: kube-runtime's finalizer adds its first finalizer with a JSON
//! patch that tests `/metadata/finalizers` for `null`, which fails on a stored `[]`.
//!
//! The rules are data about the Go types, in one place: which objects are Go maps (a Go
//! struct is never dropped by `omitempty`), which lists and strings are not `omitempty`.
//! Custom resources are not touched here: their schema decides (`schema.rs`).

use serde_json::Value;

/// Fields that are Go maps wherever they appear (`map[string]string`, `ResourceList`):
/// omitted when empty. Every other JSON object of a built-in kind is a Go struct, which
/// `omitempty` keeps even when empty (`status: {loadBalancer: {}}` on a Service).
const MAP_FIELDS: &[&str] = &[
    "labels",
    "annotations",
    "nodeSelector",
    "data",
    "binaryData",
    "matchLabels",
    "capacity",
    "allocatable",
    "limits",
    "requests",
    "overhead",
];

/// Go maps whose name alone does not say so (a `selector` is a `LabelSelector` struct
/// elsewhere): (store, path from the object's root).
const MAP_PATHS: &[(&str, &[&str])] = &[
    ("core/services", &["spec", "selector"]),
    ("core/replicationcontrollers", &["spec", "selector"]),
];

/// Lists without `omitempty` (required members), kept even when empty: (store, path).
const KEPT_LISTS: &[(&str, &[&str])] = &[("discovery.k8s.io/endpointslices", &["endpoints"])];

/// Objects whose string members are all `omitempty` (an empty string is the Go zero
/// value and is omitted): (store or "*" for every kind, path).
const OMITEMPTY_STRINGS: &[(&str, &[&str])] = &[("*", &["metadata"]), ("core/services", &["spec"])];

/// Drops, in place, every member of `obj` (an object of the built-in kind stored in
/// `storage`) that kube-apiserver would not encode.
pub fn normalize(storage: &str, obj: &mut Value) {
    let mut path = Vec::new();
    walk(storage, &mut path, obj);
}

fn walk(storage: &str, path: &mut Vec<String>, value: &mut Value) {
    match value {
        Value::Object(members) => {
            members.retain(|key, member| {
                path.push(key.clone());
                walk(storage, path, member);
                let keep = !omitted(storage, path, member);
                path.pop();
                keep
            });
        }
        Value::Array(items) => {
            // Items are not named members: an empty item stays (a list of structs).
            for item in items {
                walk(storage, path, item);
            }
        }
        _ => {}
    }
}

/// Whether the member at `path` (its own name last) with this (already normalised) value
/// is left out.
fn omitted(storage: &str, path: &[String], value: &Value) -> bool {
    let at = |rules: &[(&str, &[&str])]| {
        rules.iter().any(|(s, p)| {
            (*s == "*" || *s == storage) && p.len() == path.len() && p.iter().zip(path).all(|(a, b)| a == b)
        })
    };
    match value {
        Value::Null => true,
        Value::Array(items) => items.is_empty() && !at(KEPT_LISTS),
        Value::Object(members) => {
            members.is_empty() && (path.last().is_some_and(|name| MAP_FIELDS.contains(&name.as_str())) || at(MAP_PATHS))
        }
        Value::String(s) => {
            s.is_empty()
                && OMITEMPTY_STRINGS.iter().any(|(s, parent)| {
                    (*s == "*" || *s == storage)
                        && path.len() == parent.len() + 1
                        && parent.iter().zip(path).all(|(a, b)| a == b)
                })
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn normalized(storage: &str, mut v: Value) -> Value {
        normalize(storage, &mut v);
        v
    }

    #[test]
    fn a_service_emptied_by_the_ccm_is_stored_as_kube_apiserver_stores_it() {
        // What a client leaves after removing the last finalizer and the ingress.
        let svc = json!({
            "metadata": {"name": "f1", "namespace": "default", "finalizers": [], "labels": {},
                          "annotations": {}, "generateName": "", "ownerReferences": []},
            "spec": {"type": "ClusterIP", "selector": {}, "ports": [{"port": 80, "name": ""}],
                     "loadBalancerIP": "", "externalIPs": [], "loadBalancerSourceRanges": null},
            "status": {"loadBalancer": {"ingress": []}, "conditions": []}
        });
        assert_eq!(
            normalized("core/services", svc),
            json!({
                "metadata": {"name": "f1", "namespace": "default"},
                // A port's empty name is kept: only the listed structs' strings are omitempty.
                "spec": {"type": "ClusterIP", "ports": [{"port": 80, "name": ""}]},
                // Structs stay, empty or not.
                "status": {"loadBalancer": {}}
            })
        );
    }

    #[test]
    fn go_maps_go_when_empty_structs_stay() {
        let deploy = json!({
            "metadata": {"name": "d", "labels": {"a": "b"}},
            "spec": {"selector": {"matchLabels": {}}, "template": {"metadata": {"labels": {}}, "spec": {
                "nodeSelector": {}, "containers": [{"name": "c", "resources": {"limits": {}, "requests": {}}}]}}}
        });
        assert_eq!(
            normalized("apps/deployments", deploy),
            json!({
                "metadata": {"name": "d", "labels": {"a": "b"}},
                "spec": {"selector": {}, "template": {"metadata": {}, "spec": {
                    "containers": [{"name": "c", "resources": {}}]}}}
            })
        );
    }

    #[test]
    fn required_lists_and_taint_keys_stay_empty() {
        let slice = json!({"metadata": {"name": "s"}, "addressType": "IPv4", "endpoints": [], "ports": []});
        assert_eq!(
            normalized("discovery.k8s.io/endpointslices", slice),
            json!({"metadata": {"name": "s"}, "addressType": "IPv4", "endpoints": []})
        );
        let node =
            json!({"metadata": {"name": "n"}, "spec": {"taints": [{"key": "k", "value": "", "effect": "NoSchedule"}]}});
        assert_eq!(normalized("core/nodes", node.clone()), node);
        let untainted = json!({"metadata": {"name": "n"}, "spec": {"taints": []}});
        assert_eq!(
            normalized("core/nodes", untainted),
            json!({"metadata": {"name": "n"}, "spec": {}})
        );
    }
}

//! Discovery documents: `/version`, legacy discovery (`/api`, `/apis`, group versions),
//! aggregated discovery (`apidiscovery.k8s.io/v2`) and OpenAPI v2/v3.

use super::registry::ResourceType;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-kuberaya",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// Groups in discovery order: the core group first, then by first registration.
fn groups(types: &[ResourceType]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for t in types.iter().filter(|t| !t.group.is_empty()) {
        match out.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, vs)) => {
                if !vs.contains(&t.version) {
                    vs.push(t.version.clone());
                }
            }
            None => out.push((t.group.clone(), vec![t.version.clone()])),
        }
    }
    for (_, vs) in out.iter_mut() {
        vs.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
    }
    out
}

/// Kubernetes version ordering: GA > beta > alpha, higher numbers first.
fn version_priority(v: &str) -> (u8, u32, u32) {
    let rest = v.trim_start_matches('v');
    let num: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let major = num.parse().unwrap_or(0);
    let tail = &rest[num.len()..];
    if tail.is_empty() {
        (3, major, 0)
    } else if let Some(b) = tail.strip_prefix("beta") {
        (2, major, b.parse().unwrap_or(0))
    } else if let Some(a) = tail.strip_prefix("alpha") {
        (1, major, a.parse().unwrap_or(0))
    } else {
        (0, major, 0)
    }
}

pub fn api_versions(server: &str) -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}]})
}

pub fn api_group_list(types: &[ResourceType]) -> Value {
    let groups: Vec<Value> = groups(types).into_iter().map(|(g, vs)| group_doc(&g, &vs)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn group_doc(g: &str, vs: &[String]) -> Value {
    let versions: Vec<Value> = vs
        .iter()
        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
}

pub fn api_group(types: &[ResourceType], group: &str) -> Option<Value> {
    let (g, vs) = groups(types).into_iter().find(|(g, _)| g == group)?;
    let mut d = group_doc(&g, &vs);
    d["kind"] = json!("APIGroup");
    d["apiVersion"] = json!("v1");
    Some(d)
}

fn sub_kind(rt: &ResourceType, sub: &str) -> (String, String, String, Vec<&'static str>) {
    match sub {
        "scale" => (
            "autoscaling".into(),
            "v1".into(),
            "Scale".into(),
            vec!["get", "patch", "update"],
        ),
        "eviction" => ("policy".into(), "v1".into(), "Eviction".into(), vec!["create"]),
        "token" => (
            "authentication.k8s.io".into(),
            "v1".into(),
            "TokenRequest".into(),
            vec!["create"],
        ),
        "finalize" => (rt.group.clone(), rt.version.clone(), rt.kind.clone(), vec!["update"]),
        _ => (
            rt.group.clone(),
            rt.version.clone(),
            rt.kind.clone(),
            vec!["get", "patch", "update"],
        ),
    }
}

/// `APIResourceList` for one group version, or None if nothing is served there.
pub fn resource_list(types: &[ResourceType], group: &str, version: &str) -> Option<Value> {
    let served: Vec<&ResourceType> = types
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .collect();
    if served.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for t in served {
        let mut r = json!({
            "name": t.plural, "singularName": t.singular, "namespaced": t.namespaced,
            "kind": t.kind, "verbs": t.verbs,
        });
        if !t.short_names.is_empty() {
            r["shortNames"] = json!(t.short_names);
        }
        if !t.categories.is_empty() {
            r["categories"] = json!(t.categories);
        }
        resources.push(r);
        for s in &t.subresources {
            let (g, v, k, verbs) = sub_kind(t, s);
            let mut r = json!({"name": format!("{}/{s}", t.plural), "singularName": "", "namespaced": t.namespaced, "kind": k, "verbs": verbs});
            if g != t.group || v != t.version {
                r["group"] = json!(g);
                r["version"] = json!(v);
            }
            resources.push(r);
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}))
}

fn aggregated_resource(t: &ResourceType) -> Value {
    let mut r = json!({
        "resource": t.plural,
        "responseKind": {"group": t.group, "version": t.version, "kind": t.kind},
        "scope": if t.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": t.singular,
        "verbs": t.verbs,
    });
    if !t.short_names.is_empty() {
        r["shortNames"] = json!(t.short_names);
    }
    if !t.categories.is_empty() {
        r["categories"] = json!(t.categories);
    }
    let subs: Vec<Value> = t
        .subresources
        .iter()
        .map(|s| {
            let (g, v, k, verbs) = sub_kind(t, s);
            json!({"subresource": s, "responseKind": {"group": g, "version": v, "kind": k}, "verbs": verbs})
        })
        .collect();
    if !subs.is_empty() {
        r["subresources"] = json!(subs);
    }
    r
}

/// `APIGroupDiscoveryList` for `/api` (core) or `/apis` (the rest); `v2` or `v2beta1`.
pub fn aggregated(types: &[ResourceType], core: bool, api_version: &str) -> Value {
    let mut items = Vec::new();
    if core {
        let resources: Vec<Value> = types
            .iter()
            .filter(|t| t.group.is_empty())
            .map(aggregated_resource)
            .collect();
        items.push(json!({"metadata": {"creationTimestamp": null}, "versions": [{"version": "v1", "resources": resources, "freshness": "Current"}]}));
    } else {
        for (g, vs) in groups(types) {
            let versions: Vec<Value> = vs
                .iter()
                .map(|v| {
                    let resources: Vec<Value> = types
                        .iter()
                        .filter(|t| t.group == g && t.version == *v)
                        .map(aggregated_resource)
                        .collect();
                    json!({"version": v, "resources": resources, "freshness": "Current"})
                })
                .collect();
            items.push(json!({"metadata": {"name": g, "creationTimestamp": null}, "versions": versions}));
        }
    }
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": api_version, "metadata": {}, "items": items})
}

/// Group versions with an OpenAPI v3 document: those of custom resources.
fn openapi_gvs(types: &[ResourceType]) -> BTreeMap<String, Vec<&ResourceType>> {
    let mut out: BTreeMap<String, Vec<&ResourceType>> = BTreeMap::new();
    for t in types.iter().filter(|t| t.crd.is_some()) {
        out.entry(format!("apis/{}/{}", t.group, t.version))
            .or_default()
            .push(t);
    }
    out
}

fn gv_hash(types: &[&ResourceType]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for t in types {
        t.kind.hash(&mut h);
        t.schema.as_ref().map(|s| s.to_string()).hash(&mut h);
    }
    format!("{:016X}", h.finish())
}

/// `/openapi/v3`: the index of group-version documents.
pub fn openapi_v3_index(types: &[ResourceType]) -> Value {
    let mut paths = Map::new();
    for (gv, ts) in openapi_gvs(types) {
        paths.insert(
            gv.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={}", gv_hash(&ts))}),
        );
    }
    json!({"paths": paths})
}

fn reversed_group(g: &str) -> String {
    g.split('.').rev().collect::<Vec<_>>().join(".")
}

/// `/openapi/v3/apis/<group>/<version>`: schemas of the custom resources there, with
/// `x-kubernetes-group-version-kind` as kubectl's explain and apply look for.
pub fn openapi_v3_doc(types: &[ResourceType], gv_path: &str) -> Option<Value> {
    let gvs = openapi_gvs(types);
    let ts = gvs.get(gv_path)?;
    let mut schemas = Map::new();
    schemas.insert(
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta".into(),
        json!({"description": "ObjectMeta is metadata that all persisted resources must have, which includes all objects users must create.", "type": "object",
            "properties": {"name": {"type": "string", "description": "Name must be unique within a namespace."}, "namespace": {"type": "string", "description": "Namespace defines the space within which each name must be unique."},
            "labels": {"type": "object", "additionalProperties": {"type": "string", "default": ""}, "description": "Map of string keys and values that can be used to organize and categorize (scope and select) objects."},
            "annotations": {"type": "object", "additionalProperties": {"type": "string", "default": ""}, "description": "Annotations is an unstructured key value map stored with a resource."}}}),
    );
    let mut paths = Map::new();
    for t in ts {
        let mut s = t
            .schema
            .clone()
            .unwrap_or_else(|| json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
        if let Some(props) = s.get_mut("properties").and_then(Value::as_object_mut) {
            props.insert("apiVersion".into(), json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}));
            props.insert("kind".into(), json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}));
            props.insert("metadata".into(), json!({"allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}], "default": {}, "description": "Standard object's metadata."}));
        }
        s["x-kubernetes-group-version-kind"] = json!([{"group": t.group, "version": t.version, "kind": t.kind}]);
        schemas.insert(format!("{}.{}.{}", reversed_group(&t.group), t.version, t.kind), s);
        let base = if t.namespaced {
            format!("/apis/{}/{}/namespaces/{{namespace}}/{}", t.group, t.version, t.plural)
        } else {
            format!("/apis/{}/{}/{}", t.group, t.version, t.plural)
        };
        let params = json!([{"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}}, {"name": "dryRun", "in": "query", "schema": {"type": "string"}}, {"name": "fieldManager", "in": "query", "schema": {"type": "string"}}]);
        paths.insert(format!("{base}/{{name}}"), json!({"patch": {"parameters": params, "x-kubernetes-group-version-kind": {"group": t.group, "version": t.version, "kind": t.kind}, "x-kubernetes-action": "patch"}}));
        paths.insert(base, json!({"post": {"parameters": params, "x-kubernetes-group-version-kind": {"group": t.group, "version": t.version, "kind": t.kind}, "x-kubernetes-action": "post"}}));
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes CRD Swagger", "version": "v0.1.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::registry::builtins;

    #[test]
    fn documents() {
        let b = builtins();
        let core = resource_list(&b, "", "v1").unwrap();
        let names: Vec<&str> = core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert!(names.contains(&"services/status"));
        assert!(names.contains(&"serviceaccounts/token"));
        let agg = aggregated(&b, false, "apidiscovery.k8s.io/v2");
        let groups: Vec<&str> = agg["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["metadata"]["name"].as_str())
            .collect();
        assert!(groups.contains(&"apps") && groups.contains(&"events.k8s.io"));
        assert!(api_group(&b, "apps").is_some());
        assert!(resource_list(&b, "nope", "v1").is_none());
        assert!(version_priority("v1") > version_priority("v2beta1"));
    }
}

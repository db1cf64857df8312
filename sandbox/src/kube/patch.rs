//! Patches: JSON merge (RFC 7386), JSON patch (RFC 6902) and Kubernetes strategic merge
//! patch, driven by the patch-merge keys of the built-in types we serve.

use serde_json::{Map, Value};

/// How a list field merges under strategic merge patch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ListStrategy {
    /// Atomic: the patch's list replaces the old one.
    Replace,
    /// A set of scalars (`finalizers`).
    MergePrimitive,
    /// Items merged by this key.
    MergeByKey(&'static str),
}

/// The patch strategy of the list at `path` (field names, no indices), as the
/// Kubernetes types declare it with `patchStrategy`/`patchMergeKey`.
pub fn list_strategy(path: &[String]) -> ListStrategy {
    let last = path.last().map(String::as_str).unwrap_or_default();
    let parent = if path.len() >= 2 {
        path[path.len() - 2].as_str()
    } else {
        ""
    };
    match (parent, last) {
        ("metadata", "finalizers") => ListStrategy::MergePrimitive,
        ("metadata", "ownerReferences") => ListStrategy::MergeByKey("uid"),
        ("spec", "containers") | ("spec", "initContainers") | ("spec", "ephemeralContainers") => {
            ListStrategy::MergeByKey("name")
        }
        ("spec", "volumes") | ("spec", "imagePullSecrets") => ListStrategy::MergeByKey("name"),
        ("containers", "ports") | ("initContainers", "ports") => ListStrategy::MergeByKey("containerPort"),
        (_, "env") => ListStrategy::MergeByKey("name"),
        (_, "volumeMounts") => ListStrategy::MergeByKey("mountPath"),
        (_, "volumeDevices") => ListStrategy::MergeByKey("devicePath"),
        ("spec", "ports") => ListStrategy::MergeByKey("port"),
        ("status", "conditions") => ListStrategy::MergeByKey("type"),
        ("status", "addresses") => ListStrategy::MergeByKey("type"),
        ("status", "containerStatuses") => ListStrategy::Replace,
        ("spec", "hostAliases") => ListStrategy::MergeByKey("ip"),
        ("spec", "topologySpreadConstraints") => ListStrategy::MergeByKey("topologyKey"),
        ("status", "podIPs") | ("status", "hostIPs") => ListStrategy::MergeByKey("ip"),
        ("spec", "podCIDRs") => ListStrategy::MergePrimitive,
        _ => ListStrategy::Replace,
    }
}

/// Applies a strategic merge patch. `path` is the field path of `original`.
pub fn strategic_merge(original: &Value, patch: &Value) -> Result<Value, String> {
    Ok(smp_value(Some(original), patch, &mut Vec::new())?.unwrap_or(Value::Null))
}

fn smp_value(orig: Option<&Value>, patch: &Value, path: &mut Vec<String>) -> Result<Option<Value>, String> {
    match patch {
        Value::Object(p) => smp_map(orig, p, path),
        other => Ok(Some(other.clone())),
    }
}

fn smp_map(orig: Option<&Value>, patch: &Map<String, Value>, path: &mut Vec<String>) -> Result<Option<Value>, String> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut p = patch.clone();
            p.remove("$patch");
            return Ok(Some(strip_directives(&Value::Object(p))));
        }
        Some("delete") => return Ok(None),
        Some("merge") | None => {}
        Some(other) => return Err(format!("unknown patch type: {other}")),
    }
    let mut result = match orig {
        Some(Value::Object(o)) => o.clone(),
        _ => Map::new(),
    };
    if let Some(keep) = patch.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        result.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, v) in patch {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(del)) = (result.get_mut(field), v.as_array()) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if v.is_null() {
            result.remove(k);
            continue;
        }
        path.push(k.clone());
        let merged = match v {
            Value::Array(items) => Some(smp_list(result.get(k), items, path)?),
            Value::Object(_) => smp_value(result.get(k), v, path)?,
            other => Some(other.clone()),
        };
        path.pop();
        match merged {
            Some(m) => {
                result.insert(k.clone(), m);
            }
            None => {
                result.remove(k);
            }
        }
    }
    // `$setElementOrder` reorders merged lists as the patch author saw them.
    for (k, order) in patch {
        if let (Some(field), Some(order)) = (k.strip_prefix("$setElementOrder/"), order.as_array()) {
            path.push(field.to_string());
            let strategy = list_strategy(path);
            path.pop();
            if let Some(Value::Array(list)) = result.get_mut(field) {
                reorder(list, order, strategy);
            }
        }
    }
    Ok(Some(Value::Object(result)))
}

fn reorder(list: &mut [Value], order: &[Value], strategy: ListStrategy) {
    let key_of = |v: &Value| -> Value {
        match strategy {
            ListStrategy::MergeByKey(k) => v.get(k).cloned().unwrap_or(Value::Null),
            _ => v.clone(),
        }
    };
    let pos = |v: &Value| order.iter().position(|o| key_of(o) == key_of(v) || *o == key_of(v));
    list.sort_by_key(|v| pos(v).unwrap_or(usize::MAX));
}

fn smp_list(orig: Option<&Value>, items: &[Value], path: &mut Vec<String>) -> Result<Value, String> {
    // A `{"$patch": "replace"}` item replaces the whole list with the other items.
    if items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        let rest: Vec<Value> = items
            .iter()
            .filter(|i| i.get("$patch").is_none())
            .map(strip_directives)
            .collect();
        return Ok(Value::Array(rest));
    }
    let orig_list = orig.and_then(Value::as_array).cloned().unwrap_or_default();
    match list_strategy(path) {
        ListStrategy::Replace => Ok(Value::Array(items.iter().map(strip_directives).collect())),
        ListStrategy::MergePrimitive => {
            let mut out = orig_list;
            for i in items {
                if !out.contains(i) {
                    out.push(i.clone());
                }
            }
            Ok(Value::Array(out))
        }
        ListStrategy::MergeByKey(key) => {
            let mut out = orig_list;
            for item in items {
                let Some(kv) = item.get(key) else {
                    return Err(format!("map: {item} does not contain declared merge key: {key}"));
                };
                let idx = out.iter().position(|o| o.get(key) == Some(kv));
                if item.get("$patch").and_then(Value::as_str) == Some("delete") {
                    if let Some(i) = idx {
                        out.remove(i);
                    }
                    continue;
                }
                match idx {
                    Some(i) => {
                        if let Some(m) = smp_value(Some(&out[i]), item, path)? {
                            out[i] = m;
                        }
                    }
                    None => out.push(strip_directives(item)),
                }
            }
            Ok(Value::Array(out))
        }
    }
}

/// Drops `$`-directives from a value that is used as is.
fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(original: &Value, patch: &Value) -> Value {
    let mut doc = original.clone();
    json_patch::merge(&mut doc, patch);
    doc
}

/// RFC 6902 JSON patch. Like the real server's implementation, a `test` for `null`
/// succeeds on a missing path (kube-rs's finalizer helper relies on that).
pub fn json_patch(original: &Value, patch: &Value) -> Result<Value, String> {
    let ops = patch.as_array().ok_or("json patch must be an array of operations")?;
    let mut doc = original.clone();
    for raw in ops {
        let path = raw.get("path").and_then(Value::as_str).unwrap_or_default();
        if raw.get("op").and_then(Value::as_str) == Some("test")
            && raw.get("value").is_some_and(Value::is_null)
            && doc.pointer(path).is_none()
        {
            continue;
        }
        let op: json_patch::Patch =
            serde_json::from_value(Value::Array(vec![raw.clone()])).map_err(|e| e.to_string())?;
        json_patch::patch(&mut doc, &op).map_err(|e| e.to_string())?;
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn containers_merge_by_name() {
        let orig = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "image": "a:1", "ports": [{"containerPort": 80}]},
            {"name": "b", "image": "b:1"}
        ]}}}});
        let patch = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "image": "a:2", "ports": [{"containerPort": 81}]},
            {"name": "b", "$patch": "delete"},
            {"name": "c", "image": "c:1"}
        ]}}}});
        let out = strategic_merge(&orig, &patch).unwrap();
        let cs = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs.as_array().unwrap().len(), 2);
        assert_eq!(cs[0]["image"], "a:2");
        assert_eq!(cs[0]["ports"].as_array().unwrap().len(), 2);
        assert_eq!(cs[1]["name"], "c");
    }

    #[test]
    fn finalizers_conditions_ports_addresses() {
        let orig = json!({
            "metadata": {"finalizers": ["a"]},
            "spec": {"ports": [{"port": 80, "name": "http"}], "taints": [{"key": "x", "effect": "NoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": "False"}], "addresses": [{"type": "InternalIP", "address": "1"}]}
        });
        let patch = json!({
            "metadata": {"finalizers": ["b"], "$deleteFromPrimitiveList/finalizers": ["a"]},
            "spec": {"ports": [{"port": 443, "name": "https"}], "taints": [{"key": "y", "effect": "NoExecute"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}], "addresses": [{"type": "ExternalIP", "address": "2"}]}
        });
        let out = strategic_merge(&orig, &patch).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
        assert_eq!(out["spec"]["ports"].as_array().unwrap().len(), 2);
        // NodeSpec.taints has no patch strategy in the real types: replaced.
        assert_eq!(out["spec"]["taints"], json!([{"key": "y", "effect": "NoExecute"}]));
        assert_eq!(
            out["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}])
        );
        assert_eq!(out["status"]["addresses"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn directives() {
        let orig = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"x": {"y": 1}}});
        let patch = json!({"metadata": {"labels": {"a": null}}, "spec": {"x": {"$patch": "replace", "z": 2}}});
        let out = strategic_merge(&orig, &patch).unwrap();
        assert_eq!(
            out,
            json!({"metadata": {"labels": {"b": "2"}}, "spec": {"x": {"z": 2}}})
        );
        let order = json!({"spec": {"$setElementOrder/ports": [{"port": 2}, {"port": 1}], "ports": [{"port": 2}]}});
        let out = strategic_merge(&json!({"spec": {"ports": [{"port": 1}]}}), &order).unwrap();
        assert_eq!(out["spec"]["ports"], json!([{"port": 2}, {"port": 1}]));
        assert!(strategic_merge(&orig, &json!({"spec": {"ports": [{"name": "nokey"}]}})).is_err());
    }

    #[test]
    fn merge_and_json() {
        let orig = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        assert_eq!(
            merge_patch(&orig, &json!({"a": {"b": null}, "l": [3]})),
            json!({"a": {"c": 2}, "l": [3]})
        );
        let p = json!([{"op": "test", "path": "/l/0", "value": 1}, {"op": "remove", "path": "/l/0"}]);
        assert_eq!(json_patch(&orig, &p).unwrap()["l"], json!([2]));
        let bad = json!([{"op": "test", "path": "/l/0", "value": 9}]);
        assert!(json_patch(&orig, &bad).is_err());
        let null_test =
            json!([{"op": "test", "path": "/missing", "value": null}, {"op": "add", "path": "/missing", "value": [1]}]);
        assert_eq!(json_patch(&orig, &null_test).unwrap()["missing"], json!([1]));
        assert!(json_patch(&orig, &json!({"op": "add"})).is_err());
    }

    /// RFC 6902, each operation and each error, on the shapes our clients patch
    /// (finalizers, taints, annotations with `/` in their keys).
    #[test]
    fn json_patch_follows_rfc_6902() {
        let doc = json!({"metadata": {"annotations": {"a/b": "1", "m~n": "2"}, "finalizers": ["x"]},
                         "spec": {"taints": [{"key": "k0"}, {"key": "k1"}]}});
        let ok = |ops: Value| json_patch(&doc, &ops).unwrap_or_else(|e| panic!("{ops}: {e}"));
        let err = |ops: Value| json_patch(&doc, &ops).expect_err(&ops.to_string());
        // add: at an index (inserts), at the end index, at `-` (appends), a new member.
        assert_eq!(
            ok(json!([{"op": "add", "path": "/metadata/finalizers/0", "value": "y"}]))["metadata"]["finalizers"],
            json!(["y", "x"])
        );
        assert_eq!(
            ok(json!([{"op": "add", "path": "/metadata/finalizers/1", "value": "y"}]))["metadata"]["finalizers"],
            json!(["x", "y"])
        );
        assert_eq!(
            ok(json!([{"op": "add", "path": "/metadata/finalizers/-", "value": "y"}]))["metadata"]["finalizers"],
            json!(["x", "y"])
        );
        assert_eq!(
            ok(json!([{"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}]))["metadata"]["labels"],
            json!({"a": "b"})
        );
        err(json!([{"op": "add", "path": "/metadata/finalizers/5", "value": "y"}]));
        err(json!([{"op": "add", "path": "/nope/deeper", "value": 1}]));
        // `~1` is `/`, `~0` is `~` (annotation keys).
        assert_eq!(
            ok(json!([{"op": "replace", "path": "/metadata/annotations/a~1b", "value": "9"}]))["metadata"]["annotations"]
                ["a/b"],
            "9"
        );
        assert!(
            ok(json!([{"op": "remove", "path": "/metadata/annotations/m~0n"}]))["metadata"]["annotations"]
                .get("m~n")
                .is_none()
        );
        // remove and replace need the target.
        assert_eq!(
            ok(json!([{"op": "remove", "path": "/spec/taints/0"}]))["spec"]["taints"],
            json!([{"key": "k1"}])
        );
        err(json!([{"op": "remove", "path": "/spec/taints/2"}]));
        err(json!([{"op": "replace", "path": "/metadata/missing", "value": 1}]));
        // move and copy.
        let moved = ok(json!([{"op": "move", "from": "/metadata/finalizers", "path": "/metadata/kept"}]));
        assert!(moved["metadata"].get("finalizers").is_none() && moved["metadata"]["kept"] == json!(["x"]));
        assert_eq!(
            ok(json!([{"op": "copy", "from": "/spec/taints/1", "path": "/spec/taints/0"}]))["spec"]["taints"][0],
            json!({"key": "k1"})
        );
        err(json!([{"op": "move", "from": "/spec/missing", "path": "/spec/x"}]));
        // test: equal passes, unequal fails, null passes only for an absent member.
        ok(json!([{"op": "test", "path": "/spec/taints/1/key", "value": "k1"}]));
        err(json!([{"op": "test", "path": "/spec/taints/1/key", "value": "k0"}]));
        err(json!([{"op": "test", "path": "/spec/taints/5/key", "value": "k1"}]));
        ok(json!([{"op": "test", "path": "/metadata/ownerReferences", "value": null}]));
        err(json!([{"op": "test", "path": "/metadata/finalizers", "value": null}]));
        // A failed operation leaves nothing of the earlier ones: the whole patch fails.
        err(
            json!([{"op": "remove", "path": "/metadata/finalizers"}, {"op": "test", "path": "/spec/taints/0/key", "value": "zz"}]),
        );
        // Malformed operations.
        err(json!([{"op": "frobnicate", "path": "/a"}]));
        err(json!([{"op": "add", "path": "/a"}]));
        err(json!({"op": "add", "path": "/a", "value": 1}));
    }
}

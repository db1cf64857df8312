//! Field ownership (`managedFields`, FieldsV1) and server-side apply.

use super::patch::{ListStrategy, list_strategy};
use super::status::ApiError;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet};

/// A field path: `f:spec`, `f:ports`, `k:{"port":80}`, `v:"a"`.
pub type FieldPath = Vec<String>;

/// The leaf fields set in `v` (metadata bookkeeping fields excluded).
pub fn leaf_fields(v: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    walk(v, &mut Vec::new(), &mut Vec::new(), &mut out);
    out.retain(|p| !is_bookkeeping(p));
    out
}

fn is_bookkeeping(p: &FieldPath) -> bool {
    if p.first().map(String::as_str) == Some("f:apiVersion") || p.first().map(String::as_str) == Some("f:kind") {
        return true;
    }
    if p.first().map(String::as_str) != Some("f:metadata") {
        return false;
    }
    matches!(
        p.get(1).map(String::as_str),
        Some(
            "f:managedFields"
                | "f:resourceVersion"
                | "f:uid"
                | "f:creationTimestamp"
                | "f:generation"
                | "f:name"
                | "f:namespace"
                | "f:deletionTimestamp"
                | "f:deletionGracePeriodSeconds"
                | "f:selfLink"
                | "f:generateName"
        )
    )
}

fn walk(v: &Value, names: &mut Vec<String>, path: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                names.push(k.clone());
                path.push(format!("f:{k}"));
                walk(x, names, path, out);
                path.pop();
                names.pop();
            }
        }
        Value::Array(items) if !items.is_empty() => match list_strategy(names) {
            ListStrategy::MergeByKey(key) => {
                for item in items {
                    let kv = item.get(key).cloned().unwrap_or(Value::Null);
                    path.push(format!("k:{}", json!({ key: kv })));
                    let before = out.len();
                    walk(item, names, path, out);
                    if out.len() == before {
                        out.insert(path.clone());
                    }
                    path.pop();
                }
            }
            ListStrategy::MergePrimitive => {
                for item in items {
                    path.push(format!("v:{item}"));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            ListStrategy::Replace => {
                out.insert(path.clone());
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// Reads the value at a field path.
pub fn value_at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for p in path {
        if let Some(f) = p.strip_prefix("f:") {
            cur = cur.get(f)?;
        } else if let Some(k) = p.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).ok()?;
            let (kn, kv) = key.iter().next()?;
            cur = cur.as_array()?.iter().find(|i| i.get(kn) == Some(kv))?;
        } else if let Some(val) = p.strip_prefix("v:") {
            let val: Value = serde_json::from_str(val).ok()?;
            cur = cur.as_array()?.iter().find(|i| **i == val)?;
        } else {
            return None;
        }
    }
    Some(cur)
}

/// Encodes a set of paths as FieldsV1.
pub fn to_fields_v1(paths: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for p in paths {
        let mut cur = &mut root;
        for seg in p {
            let next = cur.entry(seg.clone()).or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(m) = next else { break };
            cur = m;
        }
    }
    Value::Object(root)
}

/// Decodes FieldsV1 into leaf paths.
pub fn from_fields_v1(v: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    fn rec(v: &Value, path: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
        let Some(m) = v.as_object() else { return };
        let children: Vec<_> = m.iter().filter(|(k, _)| k.as_str() != ".").collect();
        if children.is_empty() {
            if !path.is_empty() {
                out.insert(path.clone());
            }
            return;
        }
        for (k, x) in children {
            path.push(k.clone());
            rec(x, path, out);
            path.pop();
        }
    }
    rec(v, &mut Vec::new(), &mut out);
    out
}

/// One manager's entry.
#[derive(Clone, Debug)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub subresource: String,
    pub time: String,
    pub fields: BTreeSet<FieldPath>,
}

pub fn read_entries(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|e| {
                    let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
                    Entry {
                        manager: s("manager"),
                        operation: s("operation"),
                        api_version: s("apiVersion"),
                        subresource: s("subresource"),
                        time: s("time"),
                        fields: e.get("fieldsV1").map(from_fields_v1).unwrap_or_default(),
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn write_entries(obj: &mut Value, entries: &[Entry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields),
            });
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    if obj.is_object() && !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            m.remove("managedFields");
        } else {
            m.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// Records an `Update` by `manager`: the fields it changed become its own.
pub fn record_update(old: Option<&Value>, new: &mut Value, manager: &str, api_version: &str, subresource: &str) {
    let mut entries = old.map(read_entries).unwrap_or_default();
    let new_fields = leaf_fields(new);
    let changed: BTreeSet<FieldPath> = match old {
        None => new_fields.clone(),
        Some(o) => new_fields
            .iter()
            .filter(|p| value_at(o, p) != value_at(new, p))
            .cloned()
            .collect(),
    };
    for e in entries.iter_mut() {
        e.fields.retain(|p| new_fields.contains(p) && !changed.contains(p));
    }
    if !changed.is_empty() {
        let now = super::util::now_rfc3339();
        match entries
            .iter_mut()
            .find(|e| e.manager == manager && e.operation == "Update" && e.subresource == subresource)
        {
            Some(e) => {
                e.fields.extend(changed);
                e.time = now;
            }
            None => entries.push(Entry {
                manager: manager.into(),
                operation: "Update".into(),
                api_version: api_version.into(),
                subresource: subresource.into(),
                time: now,
                fields: changed,
            }),
        }
    }
    write_entries(new, &entries);
}

/// Server-side apply of `config` by `manager` onto `current` (None: create).
/// Returns the merged object with its managedFields, or a 409 listing conflicts.
pub fn apply(
    current: Option<&Value>,
    config: &Value,
    manager: &str,
    force: bool,
    api_version: &str,
    subresource: &str,
) -> Result<Value, ApiError> {
    let applied = leaf_fields(config);
    let mut entries = current.map(read_entries).unwrap_or_default();
    let base = current.cloned().unwrap_or_else(|| json!({}));
    // Conflicts: fields owned by someone else whose value the config changes.
    let mut conflicts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in &entries {
        if e.manager == manager && e.operation == "Apply" {
            continue;
        }
        for p in e.fields.intersection(&applied) {
            if value_at(&base, p) != value_at(config, p) {
                conflicts
                    .entry(format!("{}|{}", e.manager, e.api_version))
                    .or_default()
                    .push(render_path(p));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        let mut causes = Vec::new();
        let mut lines = Vec::new();
        let total: usize = conflicts.values().map(Vec::len).sum();
        for (who, fields) in &conflicts {
            let (m, av) = who.split_once('|').unwrap_or((who, ""));
            lines.push(format!(
                "conflict{} with \"{m}\" using {av}:",
                if fields.len() > 1 { "s" } else { "" }
            ));
            for f in fields {
                lines.push(format!("- {f}"));
                causes.push(json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{m}\" using {av}"), "field": f}));
            }
        }
        let message = if total == 1 {
            let (who, fields) = conflicts
                .iter()
                .next()
                .map(|(w, f)| (w.clone(), f.clone()))
                .unwrap_or_default();
            let (m, av) = who.split_once('|').unwrap_or((&who, ""));
            format!(
                "Apply failed with 1 conflict: conflict with \"{m}\" using {av}: {}",
                fields[0]
            )
        } else {
            format!("Apply failed with {total} conflicts: {}", lines.join("\n"))
        };
        let mut err = ApiError::new(409, "Conflict", message);
        err.details = Some(json!({ "causes": causes }));
        return Err(err);
    }
    // Fields this manager applied before but no longer does, and nobody else owns: removed.
    let previously: BTreeSet<FieldPath> = entries
        .iter()
        .filter(|e| e.manager == manager && e.operation == "Apply" && e.subresource == subresource)
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let others: BTreeSet<FieldPath> = entries
        .iter()
        .filter(|e| !(e.manager == manager && e.operation == "Apply"))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let mut merged = super::patch::strategic_merge(&base, &strip_meta(config))
        .map_err(|e| ApiError::bad_request(format!("error applying patch: {e}")))?;
    let dropped: Vec<&FieldPath> = previously
        .difference(&applied)
        .filter(|p| !others.contains(*p))
        .collect();
    // A keyed list item nobody owns anything under any more goes as a whole (outermost
    // first, while its key is still there to find it)...
    let still_owned = |prefix: &[String]| applied.iter().chain(others.iter()).any(|p| p.starts_with(prefix));
    let mut items: Vec<FieldPath> = dropped
        .iter()
        .flat_map(|p| {
            (1..=p.len())
                .filter(|i| p[i - 1].starts_with("k:"))
                .map(|i| p[..i].to_vec())
        })
        .filter(|item| !still_owned(item))
        .collect();
    items.sort_by_key(Vec::len);
    items.dedup();
    for item in &items {
        remove_at(&mut merged, item);
    }
    // ...then the single fields.
    for p in dropped {
        remove_at(&mut merged, p);
    }
    // Ownership: applied fields move to this manager (forced or unchanged values are shared).
    for e in entries.iter_mut() {
        if e.manager == manager && e.operation == "Apply" {
            continue;
        }
        if force {
            e.fields.retain(|p| !applied.contains(p));
        }
    }
    entries.retain(|e| !(e.manager == manager && e.operation == "Apply" && e.subresource == subresource));
    entries.push(Entry {
        manager: manager.into(),
        operation: "Apply".into(),
        api_version: api_version.into(),
        subresource: subresource.into(),
        time: super::util::now_rfc3339(),
        fields: applied,
    });
    write_entries(&mut merged, &entries);
    Ok(merged)
}

/// The config without server-owned metadata (it may carry none of those anyway).
fn strip_meta(config: &Value) -> Value {
    let mut c = config.clone();
    if let Some(m) = c.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in [
            "managedFields",
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "generation",
        ] {
            m.remove(k);
        }
    }
    c
}

fn remove_at(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for p in parents {
        let next = if let Some(f) = p.strip_prefix("f:") {
            cur.get_mut(f)
        } else if let Some(k) = p.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let Some((kn, kv)) = key.iter().next() else { return };
            cur.as_array_mut()
                .and_then(|a| a.iter_mut().find(|i| i.get(kn) == Some(kv)))
        } else {
            None
        };
        let Some(n) = next else { return };
        cur = n;
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(k) = last.strip_prefix("k:") {
        let key: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
        if let (Some((kn, kv)), Some(a)) = (key.iter().next(), cur.as_array_mut()) {
            a.retain(|i| i.get(kn) != Some(kv));
        }
    } else if let Some(val) = last.strip_prefix("v:") {
        let val: Value = serde_json::from_str(val).unwrap_or(Value::Null);
        if let Some(a) = cur.as_array_mut() {
            a.retain(|i| *i != val);
        }
    }
}

/// `.spec.replicas`, `.spec.ports[port=80].name` as the real conflict messages write them.
pub fn render_path(p: &FieldPath) -> String {
    let mut s = String::new();
    for seg in p {
        if let Some(f) = seg.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = seg.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let inner: Vec<String> = key
                .iter()
                .map(|(a, b)| format!("{a}={}", super::util::cell_text(b)))
                .collect();
            s.push_str(&format!("[{}]", inner.join(",")));
        } else if let Some(v) = seg.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_roundtrip() {
        let v = json!({"metadata": {"labels": {"a": "1"}, "finalizers": ["x"]}, "spec": {"ports": [{"port": 80, "name": "h"}]}});
        let f = leaf_fields(&v);
        let enc = to_fields_v1(&f);
        assert!(enc["f:spec"]["f:ports"]["k:{\"port\":80}"]["f:name"].is_object());
        assert_eq!(from_fields_v1(&enc), f);
        assert_eq!(
            render_path(&vec!["f:spec".into(), "f:ports".into(), "k:{\"port\":80}".into()]),
            ".spec.ports[port=80]"
        );
    }

    #[test]
    fn apply_conflicts_and_force() {
        let cfg_a =
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 1}});
        let obj = apply(None, &cfg_a, "a", false, "apps/v1", "").unwrap();
        let cfg_b =
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 2}});
        let err = apply(Some(&obj), &cfg_b, "b", false, "apps/v1", "").unwrap_err();
        assert_eq!(err.code, 409);
        assert!(err.message.contains(".spec.replicas"), "{}", err.message);
        let forced = apply(Some(&obj), &cfg_b, "b", true, "apps/v1", "").unwrap();
        assert_eq!(forced["spec"]["replicas"], 2);
        let owners: Vec<String> = read_entries(&forced)
            .into_iter()
            .filter(|e| !e.fields.is_empty())
            .map(|e| e.manager)
            .collect();
        assert_eq!(owners, vec!["b"]);
        // Same value: no conflict, shared ownership.
        let same = apply(Some(&forced), &cfg_b, "c", false, "apps/v1", "").unwrap();
        assert_eq!(same["spec"]["replicas"], 2);
    }

    #[test]
    fn apply_removes_dropped_fields() {
        let c1 = json!({"metadata": {"name": "x", "labels": {"a": "1", "b": "2"}}});
        let o = apply(None, &c1, "m", false, "v1", "").unwrap();
        let c2 = json!({"metadata": {"name": "x", "labels": {"a": "1"}}});
        let o2 = apply(Some(&o), &c2, "m", false, "v1", "").unwrap();
        assert_eq!(o2["metadata"]["labels"], json!({"a": "1"}));
    }

    #[test]
    fn apply_drops_list_items_it_no_longer_applies() {
        let two = json!({"spec": {"template": {"spec": {"containers": [{"name": "a", "image": "a"}, {"name": "b", "image": "b"}]}}}});
        let o = apply(None, &two, "m", false, "apps/v1", "").unwrap();
        let one = json!({"spec": {"template": {"spec": {"containers": [{"name": "a", "image": "a2"}]}}}});
        let o2 = apply(Some(&o), &one, "m", false, "apps/v1", "").unwrap();
        assert_eq!(
            o2["spec"]["template"]["spec"]["containers"],
            json!([{"name": "a", "image": "a2"}])
        );
    }

    #[test]
    fn update_takes_changed_fields() {
        let old = apply(None, &json!({"spec": {"a": 1, "b": 1}}), "m", false, "v1", "").unwrap();
        let mut new = old.clone();
        new["spec"]["a"] = json!(2);
        record_update(Some(&old), &mut new, "kubectl-edit", "v1", "");
        let e = read_entries(&new);
        assert_eq!(e.len(), 2);
        assert!(e[1].fields.contains(&vec!["f:spec".to_string(), "f:a".to_string()]));
        assert!(!e[0].fields.contains(&vec!["f:spec".to_string(), "f:a".to_string()]));
    }
}

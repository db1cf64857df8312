//! Structural-schema handling for custom resources: defaulting, pruning of unknown fields
//! and validation, with the real server's error messages.

use super::status::Cause;
use serde_json::{Value, json};

/// Outcome of running an object through its CRD schema.
#[derive(Debug, Default)]
pub struct Checked {
    pub causes: Vec<Cause>,
    /// Paths of fields dropped because the schema does not declare them.
    pub pruned: Vec<String>,
}

/// Defaults, prunes and validates `obj` (a whole custom resource) in place.
pub fn check(schema: &Value, obj: &mut Value) -> Checked {
    let mut out = Checked::default();
    let Some(m) = obj.as_object_mut() else {
        out.causes
            .push(Cause::type_invalid("", &json!("object"), "must be an object"));
        return out;
    };
    let props = schema.get("properties");
    for (k, v) in m.iter_mut() {
        if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        if let Some(s) = props.and_then(|p| p.get(k)) {
            walk(s, v, k, &mut out);
        }
    }
    if !preserves(schema) {
        let unknown: Vec<String> = m
            .keys()
            .filter(|k| !matches!(k.as_str(), "apiVersion" | "kind" | "metadata"))
            .filter(|k| props.and_then(|p| p.get(k.as_str())).is_none())
            .cloned()
            .collect();
        for k in unknown {
            m.remove(&k);
            out.pruned.push(k);
        }
    }
    apply_defaults(schema, obj);
    required(schema, obj, "", &mut out);
    out
}

fn preserves(s: &Value) -> bool {
    s.get("x-kubernetes-preserve-unknown-fields").and_then(Value::as_bool) == Some(true)
}

fn apply_defaults(schema: &Value, v: &mut Value) {
    let (Some(props), Some(m)) = (schema.get("properties").and_then(Value::as_object), v.as_object_mut()) else {
        return;
    };
    for (k, s) in props {
        if !m.contains_key(k)
            && let Some(d) = s.get("default")
        {
            m.insert(k.clone(), d.clone());
        }
        if let Some(child) = m.get_mut(k) {
            apply_defaults(s, child);
        }
    }
}

fn required(schema: &Value, v: &Value, path: &str, out: &mut Checked) {
    let Some(m) = v.as_object() else { return };
    if let Some(req) = schema.get("required").and_then(Value::as_array) {
        for r in req.iter().filter_map(Value::as_str) {
            if !m.contains_key(r) {
                out.causes.push(Cause::required(&join(path, r)));
            }
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, s) in props {
            if let Some(child) = m.get(k) {
                if path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                required(s, child, &join(path, k), out);
            }
        }
    }
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() {
        k.to_string()
    } else {
        format!("{path}.{k}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn walk(schema: &Value, v: &mut Value, path: &str, out: &mut Checked) {
    if v.is_null() && schema.get("nullable").and_then(Value::as_bool) == Some(true) {
        return;
    }
    let int_or_string = schema.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true);
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let actual = type_name(v);
        let ok = actual == t
            || (t == "number" && actual == "integer")
            || (int_or_string && (actual == "integer" || actual == "string"));
        if !ok {
            out.causes.push(Cause::invalid(
                path,
                &json!(actual),
                &format!("{path} in body must be of type {t}: {:?}", actual),
            ));
            return;
        }
    } else if int_or_string && !matches!(type_name(v), "integer" | "string") {
        out.causes.push(Cause::invalid(
            path,
            &json!(type_name(v)),
            &format!("{path} in body must be of type integer or string"),
        ));
        return;
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array)
        && !e.contains(v)
    {
        out.causes.push(Cause::unsupported(path, v, e));
    }
    match v {
        Value::String(s) => {
            let (s, v) = (s.clone(), &Value::String(s.clone()));
            let len = s.chars().count() as u64;
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && len < min
            {
                out.causes.push(Cause::invalid(
                    path,
                    v,
                    &format!("{path} in body should be at least {min} chars long"),
                ));
            }
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && len > max
            {
                out.causes.push(Cause::invalid(
                    path,
                    v,
                    &format!("{path} in body should be at most {max} chars long"),
                ));
            }
            if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
                match regex::Regex::new(p) {
                    Ok(re) if !re.is_match(&s) => {
                        out.causes
                            .push(Cause::invalid(path, v, &format!("{path} in body should match '{p}'")))
                    }
                    _ => {}
                }
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            let excl_min = schema.get("exclusiveMinimum").and_then(Value::as_bool) == Some(true);
            let excl_max = schema.get("exclusiveMaximum").and_then(Value::as_bool) == Some(true);
            if let Some(min) = schema.get("minimum") {
                let m = min.as_f64().unwrap_or(f64::MIN);
                if x < m || (excl_min && x == m) {
                    let op = if excl_min {
                        "greater than"
                    } else {
                        "greater than or equal to"
                    };
                    out.causes
                        .push(Cause::invalid(path, v, &format!("{path} in body should be {op} {min}")));
                }
            }
            if let Some(max) = schema.get("maximum") {
                let m = max.as_f64().unwrap_or(f64::MAX);
                if x > m || (excl_max && x == m) {
                    let op = if excl_max { "less than" } else { "less than or equal to" };
                    out.causes
                        .push(Cause::invalid(path, v, &format!("{path} in body should be {op} {max}")));
                }
            }
        }
        Value::Array(items) => {
            let n = items.len() as u64;
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && n < min
            {
                out.causes.push(Cause::invalid(
                    path,
                    &json!(n),
                    &format!("{path} in body should have at least {min} items"),
                ));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && n > max
            {
                out.causes.push(Cause::invalid(
                    path,
                    &json!(n),
                    &format!("{path} in body should have at most {max} items"),
                ));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, it) in items.iter_mut().enumerate() {
                    let p = format!("{path}[{i}]");
                    walk(item_schema, it, &p, out);
                    if it.is_object() {
                        required(item_schema, it, &p, out);
                    }
                }
            }
        }
        Value::Object(m) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let mut unknown = Vec::new();
            for (k, child) in m.iter_mut() {
                let p = join(path, k);
                if let Some(s) = props.and_then(|ps| ps.get(k)) {
                    walk(s, child, &p, out);
                } else if let Some(a) = additional.filter(|a| a.is_object()) {
                    walk(a, child, &p, out);
                } else if !(preserves(schema) || additional == Some(&json!(true))) {
                    unknown.push(k.clone());
                }
            }
            for k in unknown {
                m.remove(&k);
                out.pruned.push(join(path, &k));
            }
            if let Some(min) = schema.get("minProperties").and_then(Value::as_u64)
                && (m.len() as u64) < min
            {
                out.causes.push(Cause::invalid(
                    path,
                    &json!(m.len()),
                    &format!("{path} in body should have at least {min} properties"),
                ));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        json!({"type": "object", "properties": {"spec": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": "^[a-z]+$", "minLength": 2, "maxLength": 5},
            "replicas": {"type": "integer", "minimum": 0, "maximum": 10, "default": 1},
            "mode": {"type": "string", "enum": ["a", "b"]},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}
        }}}})
    }

    #[test]
    fn valid_object_is_defaulted_and_pruned() {
        let mut o = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {}, "spec": {"name": "abc", "junk": 1, "free": {"any": 1}}, "other": 2});
        let c = check(&schema(), &mut o);
        assert!(c.causes.is_empty(), "{:?}", c.causes);
        assert_eq!(o["spec"]["replicas"], 1);
        assert!(o["spec"].get("junk").is_none());
        assert!(o.get("other").is_none());
        assert_eq!(o["spec"]["free"]["any"], 1);
        assert_eq!(c.pruned, vec!["spec.junk".to_string(), "other".to_string()]);
    }

    #[test]
    fn messages_match_the_real_server() {
        let mut o = json!({"spec": {"name": "ABCDEFG", "replicas": 11, "mode": "c", "tags": ["a", "b", "c"]}});
        let c = check(&schema(), &mut o);
        let texts: Vec<String> = c.causes.iter().map(Cause::text).collect();
        assert!(
            texts.contains(
                &"spec.name: Invalid value: \"ABCDEFG\": spec.name in body should be at most 5 chars long".to_string()
            ),
            "{texts:?}"
        );
        assert!(
            texts.contains(
                &"spec.name: Invalid value: \"ABCDEFG\": spec.name in body should match '^[a-z]+$'".to_string()
            )
        );
        assert!(texts.contains(
            &"spec.replicas: Invalid value: 11: spec.replicas in body should be less than or equal to 10".to_string()
        ));
        assert!(texts.contains(&"spec.mode: Unsupported value: \"c\": supported values: \"a\", \"b\"".to_string()));
        assert!(
            texts.contains(&"spec.tags: Invalid value: 3: spec.tags in body should have at most 2 items".to_string())
        );
        let mut o = json!({"spec": {"replicas": "x"}});
        let texts: Vec<String> = check(&schema(), &mut o).causes.iter().map(Cause::text).collect();
        assert!(
            texts.contains(
                &"spec.replicas: Invalid value: \"string\": spec.replicas in body must be of type integer: \"string\""
                    .to_string()
            ),
            "{texts:?}"
        );
        assert!(texts.contains(&"spec.name: Required value".to_string()));
    }
}

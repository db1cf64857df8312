//! Label and field selectors: parsing (with the real server's error texts) and matching.

use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq)]
pub enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector`: every requirement must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector(pub Vec<Requirement>);

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        let mut rest = s.trim();
        while !rest.is_empty() {
            // Split off one requirement: up to a comma not inside parentheses.
            let mut depth = 0;
            let mut end = rest.len();
            for (i, c) in rest.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    ',' if depth == 0 => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            let part = rest[..end].trim();
            rest = if end < rest.len() {
                rest[end + 1..].trim_start()
            } else {
                ""
            };
            if part.is_empty() {
                return Err(format!(
                    "unable to parse requirement: found '', expected: identifier in {s:?}"
                ));
            }
            reqs.push(parse_requirement(part)?);
        }
        Ok(LabelSelector(reqs))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Eq(k, v) => labels.get(k) == Some(v),
            Requirement::NotEq(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|x| vs.contains(x)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|x| !vs.contains(x)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }

    /// Converts a `metav1.LabelSelector` object (matchLabels/matchExpressions).
    pub fn from_object(sel: &Value) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in m {
                reqs.push(Requirement::Eq(k.clone(), v.as_str().unwrap_or_default().to_string()));
            }
        }
        if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
            for e in exprs {
                let key = e.get("key").and_then(Value::as_str).unwrap_or_default().to_string();
                let vals: Vec<String> = e
                    .get("values")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                reqs.push(match e.get("operator").and_then(Value::as_str) {
                    Some("In") => Requirement::In(key, vals),
                    Some("NotIn") => Requirement::NotIn(key, vals),
                    Some("Exists") => Requirement::Exists(key),
                    Some("DoesNotExist") => Requirement::NotExists(key),
                    other => return Err(format!("{other:?} is not a valid label selector operator")),
                });
            }
        }
        Ok(LabelSelector(reqs))
    }

    /// The selector as a string (for `Scale.status.selector`).
    pub fn to_string_form(&self) -> String {
        self.0
            .iter()
            .map(|r| match r {
                Requirement::Eq(k, v) => format!("{k}={v}"),
                Requirement::NotEq(k, v) => format!("{k}!={v}"),
                Requirement::In(k, v) => format!("{k} in ({})", v.join(",")),
                Requirement::NotIn(k, v) => format!("{k} notin ({})", v.join(",")),
                Requirement::Exists(k) => k.clone(),
                Requirement::NotExists(k) => format!("!{k}"),
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn valid_key(k: &str) -> Result<String, String> {
    if super::util::label_key_ok(k) {
        Ok(k.to_string())
    } else {
        Err(format!("unable to parse requirement: invalid label key {k:?}"))
    }
}

fn valid_value(v: &str) -> Result<String, String> {
    if super::util::label_value_ok(v) {
        Ok(v.to_string())
    } else {
        Err(format!("unable to parse requirement: invalid label value: {v:?}"))
    }
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    if let Some(k) = part.strip_prefix('!') {
        return Ok(Requirement::NotExists(valid_key(k.trim())?));
    }
    for (op, neg) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((k, v)) = part.split_once(op) {
            let (k, v) = (valid_key(k.trim())?, valid_value(v.trim())?);
            return Ok(if neg {
                Requirement::NotEq(k, v)
            } else {
                Requirement::Eq(k, v)
            });
        }
    }
    let words: Vec<&str> = part.splitn(2, char::is_whitespace).collect();
    if words.len() == 2 {
        let key = valid_key(words[0])?;
        let rest = words[1].trim();
        let (op, list) = if let Some(l) = rest.strip_prefix("notin") {
            ("notin", l)
        } else if let Some(l) = rest.strip_prefix("in") {
            ("in", l)
        } else {
            return Err(format!(
                "unable to parse requirement: found '{rest}', expected: in, notin, =, ==, !=, gt, lt"
            ));
        };
        let list = list.trim();
        let inner = list
            .strip_prefix('(')
            .and_then(|l| l.strip_suffix(')'))
            .ok_or_else(|| format!("unable to parse requirement: found '{list}', expected: '('"))?;
        let vals = inner
            .split(',')
            .map(|v| valid_value(v.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(if op == "in" {
            Requirement::In(key, vals)
        } else {
            Requirement::NotIn(key, vals)
        });
    }
    Ok(Requirement::Exists(valid_key(part)?))
}

/// A parsed `fieldSelector`: `field=value`, `field==value`, `field!=value`, comma-joined.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector(pub Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses and checks every field against `supported` (the fields the kind allows).
    pub fn parse(s: &str, supported: &dyn Fn(&str) -> bool) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, eq, v) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid selector: '{s}'; can't understand '{part}'"));
            };
            let k = k.trim();
            if !supported(k) {
                return Err(format!("field label not supported: {k}"));
            }
            out.push((k.to_string(), eq, v.trim().to_string()));
        }
        Ok(FieldSelector(out))
    }

    /// The value this selector pins `field` to, if any.
    #[cfg(test)]
    pub fn exact(&self, field: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, eq, _)| k == field && *eq)
            .map(|(_, _, v)| v.as_str())
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(k, eq, v)| {
            let actual = field_value(obj, k);
            (actual == *v) == *eq
        })
    }
}

/// Selectable fields that are not strings in the Go types, with the zero value their
/// field set shows when the member is absent (omitempty): kube-apiserver formats the Go
/// value (`fmt.Sprint(node.Spec.Unschedulable)` in `pkg/registry/core/node/strategy.go`),
/// so an uncordoned Node matches `spec.unschedulable=false`.
const NON_STRING_FIELD_ZEROS: &[(&str, &str)] = &[("spec.unschedulable", "false")];

/// The value of a selectable field: a missing one reads as its Go zero value ("" for strings).
pub fn field_value(obj: &Value, path: &str) -> String {
    match super::util::get_path(obj, path) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => NON_STRING_FIELD_ZEROS
            .iter()
            .find(|(f, _)| *f == path)
            .map(|(_, zero)| zero.to_string())
            .unwrap_or_default(),
    }
}

/// Reads `metadata.labels` into a map.
pub fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn all_operators() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        let ok = |s: &str| LabelSelector::parse(s).unwrap().matches(&l);
        assert!(ok("app=web"));
        assert!(ok("app==web"));
        assert!(!ok("app!=web"));
        assert!(ok("app in (web, db)"));
        assert!(!ok("app notin (web,db)"));
        assert!(ok("tier,app"));
        assert!(ok("!missing"));
        assert!(!ok("!app"));
        assert!(ok("app in (web),tier=front,!x"));
        assert!(ok(""));
    }

    #[test]
    fn bad_selectors() {
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("a b c").is_err());
        assert!(LabelSelector::parse("bad key=x").is_err());
        assert!(LabelSelector::parse("a,,b").is_err());
    }

    #[test]
    fn match_expressions() {
        let sel = json!({"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]});
        let s = LabelSelector::from_object(&sel).unwrap();
        assert!(s.matches(&labels(&[("a", "1"), ("b", "")])));
        assert!(!s.matches(&labels(&[("a", "1")])));
        assert_eq!(s.to_string_form(), "a=1,b");
    }

    #[test]
    fn an_absent_bool_field_reads_as_false() {
        let node = json!({"metadata": {"name": "w1"}, "spec": {}});
        let sel = |s: &str| FieldSelector::parse(s, &|_| true).unwrap();
        assert!(sel("spec.unschedulable=false").matches(&node));
        assert!(!sel("spec.unschedulable=true").matches(&node));
        assert!(sel("spec.unschedulable=true").matches(&json!({"spec": {"unschedulable": true}})));
        assert!(sel("spec.nodeName=").matches(&json!({"spec": {}})));
    }

    #[test]
    fn fields() {
        let any = |_: &str| true;
        let f = FieldSelector::parse("metadata.name=x,spec.type!=NodePort", &any).unwrap();
        assert!(f.matches(&json!({"metadata": {"name": "x"}, "spec": {"type": "ClusterIP"}})));
        assert!(!f.matches(&json!({"metadata": {"name": "x"}, "spec": {"type": "NodePort"}})));
        assert_eq!(f.exact("metadata.name"), Some("x"));
        let only_name = |k: &str| k == "metadata.name";
        assert_eq!(
            FieldSelector::parse("spec.foo=1", &only_name).unwrap_err(),
            "field label not supported: spec.foo"
        );
    }
}

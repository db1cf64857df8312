//! Server-side printing (`as=Table`): the columns `kubectl get` (and `-o wide`, where
//! priority-1 columns show) prints for each kind.

use super::registry::ResourceType;
use super::util::{cell_text, human_duration, json_path, now_secs, parse_rfc3339};
use serde_json::{Value, json};

struct Col {
    name: &'static str,
    typ: &'static str,
    priority: i64,
}

const fn c(name: &'static str, typ: &'static str, priority: i64) -> Col {
    Col { name, typ, priority }
}

fn builtin_columns(plural: &str, group: &str) -> Vec<Col> {
    match (group, plural) {
        ("", "namespaces") => vec![c("Name", "string", 0), c("Status", "string", 0), c("Age", "string", 0)],
        ("", "nodes") => vec![
            c("Name", "string", 0),
            c("Status", "string", 0),
            c("Roles", "string", 0),
            c("Age", "string", 0),
            c("Version", "string", 0),
            c("Internal-IP", "string", 1),
            c("External-IP", "string", 1),
            c("OS-Image", "string", 1),
            c("Kernel-Version", "string", 1),
            c("Container-Runtime", "string", 1),
        ],
        ("", "services") => vec![
            c("Name", "string", 0),
            c("Type", "string", 0),
            c("Cluster-IP", "string", 0),
            c("External-IP", "string", 0),
            c("Port(s)", "string", 0),
            c("Age", "string", 0),
            c("Selector", "string", 1),
        ],
        ("", "endpoints") => vec![
            c("Name", "string", 0),
            c("Endpoints", "string", 0),
            c("Age", "string", 0),
        ],
        ("", "pods") => vec![
            c("Name", "string", 0),
            c("Ready", "string", 0),
            c("Status", "string", 0),
            c("Restarts", "string", 0),
            c("Age", "string", 0),
            c("IP", "string", 1),
            c("Node", "string", 1),
            c("Nominated Node", "string", 1),
            c("Readiness Gates", "string", 1),
        ],
        ("", "secrets") => vec![
            c("Name", "string", 0),
            c("Type", "string", 0),
            c("Data", "string", 0),
            c("Age", "string", 0),
        ],
        ("", "configmaps") => vec![c("Name", "string", 0), c("Data", "string", 0), c("Age", "string", 0)],
        ("", "serviceaccounts") => vec![c("Name", "string", 0), c("Secrets", "string", 0), c("Age", "string", 0)],
        ("", "events") | ("events.k8s.io", "events") => vec![
            c("Last Seen", "string", 0),
            c("Type", "string", 0),
            c("Reason", "string", 0),
            c("Object", "string", 0),
            c("Subobject", "string", 1),
            c("Source", "string", 1),
            c("Message", "string", 0),
            c("First Seen", "string", 1),
            c("Count", "string", 1),
            c("Name", "string", 1),
        ],
        ("discovery.k8s.io", "endpointslices") => vec![
            c("Name", "string", 0),
            c("AddressType", "string", 0),
            c("Ports", "string", 0),
            c("Endpoints", "string", 0),
            c("Age", "string", 0),
        ],
        ("coordination.k8s.io", "leases") => {
            vec![c("Name", "string", 0), c("Holder", "string", 0), c("Age", "string", 0)]
        }
        ("apps", "deployments") => vec![
            c("Name", "string", 0),
            c("Ready", "string", 0),
            c("Up-to-date", "string", 0),
            c("Available", "string", 0),
            c("Age", "string", 0),
            c("Containers", "string", 1),
            c("Images", "string", 1),
            c("Selector", "string", 1),
        ],
        ("policy", "poddisruptionbudgets") => vec![
            c("Name", "string", 0),
            c("Min Available", "string", 0),
            c("Max Unavailable", "string", 0),
            c("Allowed Disruptions", "string", 0),
            c("Age", "string", 0),
        ],
        ("scheduling.k8s.io", "priorityclasses") => vec![
            c("Name", "string", 0),
            c("Value", "string", 0),
            c("Global-Default", "string", 0),
            c("Age", "string", 0),
            c("PreemptionPolicy", "string", 0),
        ],
        ("rbac.authorization.k8s.io", "roles")
        | ("rbac.authorization.k8s.io", "clusterroles")
        | ("apiextensions.k8s.io", "customresourcedefinitions") => {
            vec![c("Name", "string", 0), c("Created At", "string", 0)]
        }
        ("rbac.authorization.k8s.io", _) => vec![
            c("Name", "string", 0),
            c("Role", "string", 0),
            c("Age", "string", 0),
            c("Users", "string", 1),
            c("Groups", "string", 1),
            c("ServiceAccounts", "string", 1),
        ],
        _ => vec![c("Name", "string", 0), c("Age", "string", 0)],
    }
}

fn age(obj: &Value) -> String {
    match obj
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(parse_rfc3339)
    {
        Some(t) => human_duration(now_secs() - t),
        None => "<unknown>".into(),
    }
}

fn s<'a>(obj: &'a Value, ptr: &str) -> &'a str {
    obj.pointer(ptr).and_then(Value::as_str).unwrap_or_default()
}

fn or_none(v: String) -> String {
    if v.is_empty() { "<none>".into() } else { v }
}

fn map_string(v: Option<&Value>) -> String {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", cell_text(v)))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn count(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::Object(m)) => m.len() as i64,
        Some(Value::Array(a)) => a.len() as i64,
        _ => 0,
    }
}

fn service_cells(o: &Value) -> Vec<Value> {
    let typ = s(o, "/spec/type");
    let typ = if typ.is_empty() { "ClusterIP" } else { typ };
    let external = match typ {
        "LoadBalancer" => {
            let ing: Vec<String> = o
                .pointer("/status/loadBalancer/ingress")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|i| {
                            i.get("ip")
                                .or(i.get("hostname"))
                                .and_then(Value::as_str)
                                .map(str::to_string)
                        })
                        .collect()
                })
                .unwrap_or_default();
            if ing.is_empty() {
                "<pending>".to_string()
            } else {
                ing.join(",")
            }
        }
        "ExternalName" => s(o, "/spec/externalName").to_string(),
        _ => or_none(
            o.pointer("/spec/externalIPs")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(cell_text).collect::<Vec<_>>().join(","))
                .unwrap_or_default(),
        ),
    };
    let ports = o
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                    let port = cell_text(p.get("port").unwrap_or(&Value::Null));
                    match p.get("nodePort").and_then(Value::as_i64) {
                        Some(np) => format!("{port}:{np}/{proto}"),
                        None => format!("{port}/{proto}"),
                    }
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let cip = s(o, "/spec/clusterIP");
    vec![
        json!(typ),
        json!(if cip.is_empty() { "<none>" } else { cip }),
        json!(external),
        json!(or_none(ports)),
        json!(age(o)),
        json!(or_none(map_string(o.pointer("/spec/selector")))),
    ]
}

fn node_cells(o: &Value) -> Vec<Value> {
    let conds = o
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut status = match conds
        .iter()
        .find(|c| c["type"] == "Ready")
        .map(|c| s(c, "/status").to_string())
    {
        Some(x) if x == "True" => "Ready".to_string(),
        Some(x) if x == "False" => "NotReady".to_string(),
        _ => "Unknown".to_string(),
    };
    if o.pointer("/spec/unschedulable") == Some(&json!(true)) {
        status.push_str(",SchedulingDisabled");
    }
    let roles: Vec<String> = o
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.keys()
                .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let addr = |t: &str| {
        o.pointer("/status/addresses")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().find(|x| x["type"] == t))
            .and_then(|x| x.get("address"))
            .and_then(Value::as_str)
            .unwrap_or("<none>")
            .to_string()
    };
    let info = |k: &str| {
        let v = s(o, &format!("/status/nodeInfo/{k}"));
        if v.is_empty() {
            "<unknown>".to_string()
        } else {
            v.to_string()
        }
    };
    vec![
        json!(status),
        json!(or_none(roles.join(","))),
        json!(age(o)),
        json!(s(o, "/status/nodeInfo/kubeletVersion")),
        json!(addr("InternalIP")),
        json!(addr("ExternalIP")),
        json!(info("osImage")),
        json!(info("kernelVersion")),
        json!(info("containerRuntimeVersion")),
    ]
}

fn event_cells(o: &Value) -> Vec<Value> {
    // Stored (v1) form.
    let last = o
        .get("lastTimestamp")
        .and_then(Value::as_str)
        .or_else(|| o.pointer("/series/lastObservedTime").and_then(Value::as_str))
        .or_else(|| o.get("eventTime").and_then(Value::as_str));
    let ago = |t: Option<&str>| {
        t.and_then(parse_rfc3339)
            .map(|t| human_duration(now_secs() - t))
            .unwrap_or_else(|| "<unknown>".into())
    };
    let obj = format!(
        "{}/{}",
        s(o, "/involvedObject/kind").to_lowercase(),
        s(o, "/involvedObject/name")
    );
    let source = {
        let comp = s(o, "/source/component");
        let comp = if comp.is_empty() {
            s(o, "/reportingComponent")
        } else {
            comp
        };
        let host = s(o, "/source/host");
        if host.is_empty() {
            comp.to_string()
        } else {
            format!("{comp}, {host}")
        }
    };
    let count = o
        .get("count")
        .or(o.pointer("/series/count"))
        .and_then(Value::as_i64)
        .unwrap_or(1);
    vec![
        json!(ago(last)),
        json!(s(o, "/type")),
        json!(s(o, "/reason")),
        json!(obj),
        json!(s(o, "/involvedObject/fieldPath")),
        json!(source),
        json!(s(o, "/message").trim()),
        json!(ago(o.get("firstTimestamp").and_then(Value::as_str).or(last))),
        json!(count.to_string()),
        json!(s(o, "/metadata/name")),
    ]
}

fn pod_cells(o: &Value) -> Vec<Value> {
    let total = count(o.pointer("/spec/containers"));
    let statuses = o
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ready = statuses.iter().filter(|c| c["ready"] == json!(true)).count();
    let restarts: i64 = statuses.iter().filter_map(|c| c["restartCount"].as_i64()).sum();
    let phase = s(o, "/status/phase");
    let status = if o.pointer("/metadata/deletionTimestamp").is_some() {
        "Terminating"
    } else if phase.is_empty() {
        "Unknown"
    } else {
        phase
    };
    let ip = s(o, "/status/podIP");
    let node = s(o, "/spec/nodeName");
    vec![
        json!(format!("{ready}/{total}")),
        json!(status),
        json!(restarts.to_string()),
        json!(age(o)),
        json!(if ip.is_empty() { "<none>" } else { ip }),
        json!(if node.is_empty() { "<none>" } else { node }),
        json!("<none>"),
        json!("<none>"),
    ]
}

fn deployment_cells(o: &Value) -> Vec<Value> {
    let n = |p: &str| o.pointer(p).and_then(Value::as_i64).unwrap_or(0);
    let containers = o
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names: Vec<String> = containers.iter().map(|c| s(c, "/name").to_string()).collect();
    let images: Vec<String> = containers.iter().map(|c| s(c, "/image").to_string()).collect();
    let sel = super::selectors::LabelSelector::from_object(o.pointer("/spec/selector").unwrap_or(&Value::Null))
        .map(|l| l.to_string_form())
        .unwrap_or_default();
    vec![
        json!(format!("{}/{}", n("/status/readyReplicas"), n("/spec/replicas"))),
        json!(n("/status/updatedReplicas")),
        json!(n("/status/availableReplicas")),
        json!(age(o)),
        json!(names.join(",")),
        json!(images.join(",")),
        json!(sel),
    ]
}

fn binding_cells(o: &Value) -> Vec<Value> {
    let subjects = o.get("subjects").and_then(Value::as_array).cloned().unwrap_or_default();
    let of = |k: &str| {
        subjects
            .iter()
            .filter(|x| x["kind"] == k)
            .map(|x| {
                if k == "ServiceAccount" {
                    format!("{}/{}", s(x, "/namespace"), s(x, "/name"))
                } else {
                    s(x, "/name").to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    vec![
        json!(format!("{}/{}", s(o, "/roleRef/kind"), s(o, "/roleRef/name"))),
        json!(age(o)),
        json!(of("User")),
        json!(of("Group")),
        json!(of("ServiceAccount")),
    ]
}

/// The cells after NAME for a built-in kind (the stored form of the object).
fn builtin_cells(rt: &ResourceType, o: &Value) -> Vec<Value> {
    let created = json!(s(o, "/metadata/creationTimestamp"));
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "namespaces") => vec![json!(s(o, "/status/phase")), json!(age(o))],
        ("", "nodes") => node_cells(o),
        ("", "services") => service_cells(o),
        ("", "endpoints") => {
            let eps: Vec<String> = o
                .get("subsets")
                .and_then(Value::as_array)
                .map(|subs| {
                    subs.iter()
                        .flat_map(|sub| {
                            let ports: Vec<i64> = sub
                                .get("ports")
                                .and_then(Value::as_array)
                                .map(|p| p.iter().filter_map(|x| x["port"].as_i64()).collect())
                                .unwrap_or_default();
                            let ips: Vec<String> = sub
                                .get("addresses")
                                .and_then(Value::as_array)
                                .map(|a| a.iter().map(|x| s(x, "/ip").to_string()).collect())
                                .unwrap_or_default();
                            ips.into_iter().flat_map(move |ip| {
                                let ports = ports.clone();
                                if ports.is_empty() {
                                    vec![ip]
                                } else {
                                    ports.into_iter().map(|p| format!("{ip}:{p}")).collect()
                                }
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            vec![json!(or_none(eps.join(","))), json!(age(o))]
        }
        ("", "pods") => pod_cells(o),
        ("", "secrets") => vec![
            json!(s(o, "/type")),
            json!(count(o.get("data")) + count(o.get("stringData"))),
            json!(age(o)),
        ],
        ("", "configmaps") => vec![json!(count(o.get("data")) + count(o.get("binaryData"))), json!(age(o))],
        ("", "serviceaccounts") => vec![json!(count(o.get("secrets"))), json!(age(o))],
        (_, "events") => event_cells(o),
        ("discovery.k8s.io", "endpointslices") => {
            let ports: Vec<String> = o
                .get("ports")
                .and_then(Value::as_array)
                .map(|p| p.iter().map(|x| cell_text(&x["port"])).collect())
                .unwrap_or_default();
            let eps: Vec<String> = o
                .get("endpoints")
                .and_then(Value::as_array)
                .map(|e| {
                    e.iter()
                        .flat_map(|x| x["addresses"].as_array().cloned().unwrap_or_default())
                        .map(|a| cell_text(&a))
                        .collect()
                })
                .unwrap_or_default();
            vec![
                json!(s(o, "/addressType")),
                json!(or_none(ports.join(","))),
                json!(or_none(eps.join(","))),
                json!(age(o)),
            ]
        }
        ("coordination.k8s.io", "leases") => vec![json!(s(o, "/spec/holderIdentity")), json!(age(o))],
        ("apps", "deployments") => deployment_cells(o),
        ("policy", "poddisruptionbudgets") => vec![
            json!(
                o.pointer("/spec/minAvailable")
                    .map(cell_text)
                    .unwrap_or_else(|| "N/A".into())
            ),
            json!(
                o.pointer("/spec/maxUnavailable")
                    .map(cell_text)
                    .unwrap_or_else(|| "N/A".into())
            ),
            json!(
                o.pointer("/status/disruptionsAllowed")
                    .and_then(Value::as_i64)
                    .unwrap_or(0)
            ),
            json!(age(o)),
        ],
        ("scheduling.k8s.io", "priorityclasses") => vec![
            json!(o.get("value").and_then(Value::as_i64).unwrap_or(0)),
            json!(o.get("globalDefault").and_then(Value::as_bool).unwrap_or(false)),
            json!(age(o)),
            json!(
                o.get("preemptionPolicy")
                    .and_then(Value::as_str)
                    .unwrap_or("PreemptLowerPriority")
            ),
        ],
        ("rbac.authorization.k8s.io", "roles")
        | ("rbac.authorization.k8s.io", "clusterroles")
        | ("apiextensions.k8s.io", _) => vec![created],
        ("rbac.authorization.k8s.io", _) => binding_cells(o),
        _ => vec![json!(age(o))],
    }
}

/// The column definitions and the cells for one object of `rt` (stored form).
fn columns(rt: &ResourceType) -> Vec<Value> {
    if rt.crd.is_some() {
        let mut cols = vec![
            json!({"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0}),
        ];
        if rt.columns.is_empty() {
            cols.push(json!({"name": "Age", "type": "date", "format": "", "description": "Creation timestamp", "priority": 0}));
        }
        for c in &rt.columns {
            cols.push(json!({"name": c.name, "type": c.typ, "format": c.format, "description": c.description, "priority": c.priority}));
        }
        return cols;
    }
    builtin_columns(&rt.plural, &rt.group)
        .into_iter()
        .map(|c| {
            let format = if c.name == "Name" { "name" } else { "" };
            json!({"name": c.name, "type": c.typ, "format": format, "description": "", "priority": c.priority})
        })
        .collect()
}

fn cells(rt: &ResourceType, o: &Value) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    if rt.crd.is_some() {
        let mut out = vec![name];
        if rt.columns.is_empty() {
            out.push(json!(age(o)));
        }
        for c in &rt.columns {
            let vals = json_path(o, &c.json_path);
            let v = match (c.typ.as_str(), vals.first()) {
                (_, None) => Value::Null,
                ("date", Some(Value::String(t))) => json!(
                    parse_rfc3339(t)
                        .map(|t| human_duration(now_secs() - t))
                        .unwrap_or_else(|| t.clone())
                ),
                (_, Some(v)) if vals.len() == 1 => v.clone(),
                _ => json!(vals.iter().map(cell_text).collect::<Vec<_>>().join(",")),
            };
            out.push(v);
        }
        return out;
    }
    let rest = builtin_cells(rt, o);
    if rt.plural == "events" {
        return rest;
    }
    let mut out = vec![name];
    out.extend(rest);
    out
}

/// Builds a `meta.k8s.io/v1` Table. `objects` are in the stored form; `shown` are what
/// the row's `object` carries (partial metadata or the full object as requested).
pub fn table(rt: &ResourceType, objects: &[(Value, Value)], rv: &str, cont: Option<&str>, with_columns: bool) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|(stored, shown)| json!({"cells": cells(rt, stored), "object": shown}))
        .collect();
    let mut meta = json!({"resourceVersion": rv});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": if with_columns { json!(columns(rt)) } else { json!([]) },
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::registry::builtins;

    #[test]
    fn service_row() {
        let b = builtins();
        let rt = b.iter().find(|t| t.plural == "services").unwrap();
        let svc = json!({"metadata": {"name": "s", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"type": "LoadBalancer", "clusterIP": "127.96.0.5", "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}], "selector": {"app": "a"}},
            "status": {"loadBalancer": {}}});
        let t = table(rt, &[(svc.clone(), json!({}))], "5", None, true);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "s");
        assert_eq!(cells[1], "LoadBalancer");
        assert_eq!(cells[3], "<pending>");
        assert_eq!(cells[4], "80:30080/TCP");
        assert_eq!(cells[6], "app=a");
        assert_eq!(
            t["columnDefinitions"].as_array().unwrap().len(),
            cells.as_array().unwrap().len()
        );
    }

    #[test]
    fn every_builtin_row_matches_its_columns() {
        for rt in builtins() {
            let o = json!({"metadata": {"name": "x", "creationTimestamp": "2020-01-01T00:00:00Z"}});
            let t = table(&rt, &[(o, json!({}))], "1", None, true);
            assert_eq!(
                t["columnDefinitions"].as_array().unwrap().len(),
                t["rows"][0]["cells"].as_array().unwrap().len(),
                "{}",
                rt.plural
            );
        }
    }
}

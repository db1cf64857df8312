//! Per-kind defaulting, validation and allocation, as the real server's registry
//! strategies do them. Pure functions over objects; the store supplies what is in use.

use super::registry::ResourceType;
use super::service_ips::{self, ServiceCidrs};
use super::status::Cause;
use super::util::{dns1123_label_errors, dns1123_subdomain_errors, label_key_ok, label_value_ok};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::net::IpAddr;

pub const NODE_PORT_MIN: u16 = 30000;
pub const NODE_PORT_MAX: u16 = 32767;

/// What other Services already hold.
#[derive(Debug, Default)]
pub struct InUse {
    pub ips: BTreeSet<IpAddr>,
    pub node_ports: BTreeSet<u16>,
}

/// Name and metadata checks shared by every kind.
pub fn validate_meta(rt: &ResourceType, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if name.is_empty() {
        causes.push(Cause::required("metadata.name"));
    } else {
        let errs = match rt.plural.as_str() {
            "namespaces" | "services" => dns1123_label_errors(name),
            "roles" | "rolebindings" | "clusterroles" | "clusterrolebindings" => {
                if name.contains('/') || name.contains('%') || name == "." || name == ".." {
                    vec!["may not contain '/' or '%'".to_string()]
                } else {
                    vec![]
                }
            }
            _ => dns1123_subdomain_errors(name),
        };
        for e in errs {
            causes.push(Cause::invalid("metadata.name", &json!(name), &e));
        }
    }
    if let Some(labels) = obj.pointer("/metadata/labels") {
        match labels.as_object() {
            Some(m) => {
                for (k, v) in m {
                    if !label_key_ok(k) {
                        causes.push(Cause::invalid("metadata.labels", &json!(k), "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
                    }
                    match v.as_str() {
                        Some(s) if label_value_ok(s) => {}
                        _ => causes.push(Cause::invalid("metadata.labels", v, "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character")),
                    }
                }
            }
            None if labels.is_null() => {}
            None => causes.push(Cause::type_invalid(
                "metadata.labels",
                labels,
                "must be a map of strings",
            )),
        }
    }
    if let Some(a) = obj.pointer("/metadata/annotations")
        && let Some(m) = a.as_object()
    {
        for (k, v) in m {
            if !label_key_ok(k) {
                causes.push(Cause::invalid("metadata.annotations", &json!(k), "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
            }
            if !v.is_string() {
                causes.push(Cause::type_invalid("metadata.annotations", v, "must be a string"));
            }
        }
    }
    causes
}

/// Service defaulting, validation and allocation (clusterIP, nodePorts,
/// healthCheckNodePort). `old` is the stored Service on update.
pub fn service(old: Option<&Value>, svc: &mut Value, cidrs: &ServiceCidrs, in_use: &InUse) -> Result<(), Vec<Cause>> {
    let mut causes = Vec::new();
    if !svc.get("spec").is_some_and(Value::is_object) {
        svc["spec"] = json!({});
    }
    let old_spec = old.and_then(|o| o.get("spec")).cloned().unwrap_or(Value::Null);
    let spec = &mut svc["spec"];
    let typ = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_string();
    if !["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"].contains(&typ.as_str()) {
        causes.push(Cause::unsupported(
            "spec.type",
            &json!(typ),
            &[
                json!("ClusterIP"),
                json!("ExternalName"),
                json!("LoadBalancer"),
                json!("NodePort"),
            ],
        ));
        return Err(causes);
    }
    spec["type"] = json!(typ);
    if spec.get("sessionAffinity").is_none() {
        spec["sessionAffinity"] = json!("None");
    }
    // loadBalancerClass: LoadBalancer only, immutable once set.
    let lbc = spec.get("loadBalancerClass").cloned().unwrap_or(Value::Null);
    if !lbc.is_null() && typ != "LoadBalancer" {
        causes.push(Cause::forbidden(
            "spec.loadBalancerClass",
            "may only be used when `type` is 'LoadBalancer'",
        ));
    }
    if old_spec.get("type").and_then(Value::as_str) == Some("LoadBalancer") && typ == "LoadBalancer" {
        let old_lbc = old_spec.get("loadBalancerClass").cloned().unwrap_or(Value::Null);
        if old_lbc != lbc {
            causes.push(Cause::invalid(
                "spec.loadBalancerClass",
                &lbc,
                "may not change once set",
            ));
        }
    }
    if typ == "ExternalName" {
        if spec
            .get("externalName")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .is_empty()
        {
            causes.push(Cause::required("spec.externalName"));
        }
        service_ips::drop_for_external_name(spec);
        return if causes.is_empty() { Ok(()) } else { Err(causes) };
    }
    if let Err(c) = service_ips::apply(&old_spec, spec, cidrs, &in_use.ips) {
        causes.extend(c);
    }
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    if spec.get("internalTrafficPolicy").is_none() {
        spec["internalTrafficPolicy"] = json!("Cluster");
    }
    let external = typ == "NodePort" || typ == "LoadBalancer";
    if external {
        if spec.get("externalTrafficPolicy").is_none() {
            spec["externalTrafficPolicy"] = json!("Cluster");
        }
    } else if let Some(m) = spec.as_object_mut() {
        m.remove("externalTrafficPolicy");
    }
    if typ == "LoadBalancer" && spec.get("allocateLoadBalancerNodePorts").is_none() {
        spec["allocateLoadBalancerNodePorts"] = json!(true);
    }
    if typ != "LoadBalancer"
        && let Some(m) = spec.as_object_mut()
    {
        m.remove("allocateLoadBalancerNodePorts");
    }
    let want_node_ports =
        typ == "NodePort" || (typ == "LoadBalancer" && spec["allocateLoadBalancerNodePorts"] != json!(false));
    // Ports.
    let mut taken = in_use.node_ports.clone();
    let old_ports = old_spec
        .get("ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ports = spec.get_mut("ports").and_then(Value::as_array_mut);
    let n_ports = ports.as_ref().map(|p| p.len()).unwrap_or(0);
    if n_ports == 0 && !headless {
        causes.push(Cause::required("spec.ports"));
    }
    let mut names = BTreeSet::new();
    if let Some(ports) = ports {
        for (i, p) in ports.iter_mut().enumerate() {
            let f = |s: &str| format!("spec.ports[{i}].{s}");
            if !p.is_object() {
                causes.push(Cause::type_invalid(&format!("spec.ports[{i}]"), p, "must be an object"));
                continue;
            }
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP").to_string();
            if !["TCP", "UDP", "SCTP"].contains(&proto.as_str()) {
                causes.push(Cause::unsupported(
                    &f("protocol"),
                    &json!(proto),
                    &[json!("SCTP"), json!("TCP"), json!("UDP")],
                ));
            }
            p["protocol"] = json!(proto);
            let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
            if port == 0 {
                causes.push(Cause::required(&f("port")));
            } else if !(1..=65535).contains(&port) {
                causes.push(Cause::invalid(
                    &f("port"),
                    &json!(port),
                    "must be between 1 and 65535, inclusive",
                ));
            }
            if p.get("targetPort").is_none_or(|t| t == &json!(0) || t == &json!("")) {
                p["targetPort"] = json!(port);
            }
            let name = p.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
            if n_ports > 1 && name.is_empty() {
                causes.push(Cause::required(&f("name")));
            }
            if !name.is_empty() && !names.insert(name.clone()) {
                causes.push(Cause::duplicate(&f("name"), &json!(name)));
            }
            let requested = p.get("nodePort").and_then(Value::as_i64).unwrap_or(0);
            let old_np = old_ports
                .iter()
                .find(|o| {
                    o.get("port").and_then(Value::as_i64) == Some(port)
                        && o.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == proto
                })
                .and_then(|o| o.get("nodePort").and_then(Value::as_i64))
                .unwrap_or(0);
            if !want_node_ports {
                if requested != 0 && requested != old_np {
                    if typ == "ClusterIP" || headless {
                        causes.push(Cause::forbidden(
                            &f("nodePort"),
                            "may not be used when `type` is 'ClusterIP'",
                        ));
                    } else {
                        check_node_port(requested, &f("nodePort"), &mut taken, &mut causes);
                    }
                } else if let Some(m) = p.as_object_mut()
                    && (typ == "ClusterIP" || typ == "LoadBalancer" && requested == old_np)
                    && typ == "ClusterIP"
                {
                    m.remove("nodePort");
                }
                continue;
            }
            if requested != 0 {
                if requested != old_np {
                    check_node_port(requested, &f("nodePort"), &mut taken, &mut causes);
                }
            } else if old_np != 0 {
                p["nodePort"] = json!(old_np);
            } else {
                match allocate_port(&mut taken) {
                    Some(np) => p["nodePort"] = json!(np),
                    None => causes.push(Cause::invalid(&f("nodePort"), &json!(0), "range is full")),
                }
            }
        }
    }
    // healthCheckNodePort.
    let local = typ == "LoadBalancer" && spec.get("externalTrafficPolicy").and_then(Value::as_str) == Some("Local");
    let hc = spec.get("healthCheckNodePort").and_then(Value::as_i64).unwrap_or(0);
    let old_hc = old_spec.get("healthCheckNodePort").and_then(Value::as_i64).unwrap_or(0);
    if local {
        if hc == 0 {
            if old_hc != 0 {
                spec["healthCheckNodePort"] = json!(old_hc);
            } else if let Some(np) = allocate_port(&mut taken) {
                spec["healthCheckNodePort"] = json!(np);
            }
        } else if hc != old_hc {
            check_node_port(hc, "spec.healthCheckNodePort", &mut taken, &mut causes);
        }
    } else if hc != 0 && hc != old_hc {
        causes.push(Cause::invalid(
            "spec.healthCheckNodePort",
            &json!(hc),
            "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'",
        ));
    } else if let Some(m) = spec.as_object_mut() {
        m.remove("healthCheckNodePort");
    }
    if !svc.get("status").is_some_and(Value::is_object) {
        svc["status"] = json!({"loadBalancer": {}});
    }
    if causes.is_empty() { Ok(()) } else { Err(causes) }
}

fn check_node_port(p: i64, field: &str, taken: &mut BTreeSet<u16>, causes: &mut Vec<Cause>) {
    if !(NODE_PORT_MIN as i64..=NODE_PORT_MAX as i64).contains(&p) {
        causes.push(Cause::invalid(
            field,
            &json!(p),
            &format!(
                "provided port is not in the valid range. The range of valid ports is {NODE_PORT_MIN}-{NODE_PORT_MAX}"
            ),
        ));
    } else if !taken.insert(p as u16) {
        causes.push(Cause::invalid(field, &json!(p), "provided port is already allocated"));
    }
}

/// A free node port; random start like the real allocator, then linear probe.
pub fn allocate_port(taken: &mut BTreeSet<u16>) -> Option<u16> {
    let span = (NODE_PORT_MAX - NODE_PORT_MIN + 1) as u32;
    let start = rand::random::<u32>() % span;
    for i in 0..span {
        let p = NODE_PORT_MIN + ((start + i) % span) as u16;
        if taken.insert(p) {
            return Some(p);
        }
    }
    None
}

/// What a Service holds (for the allocators).
pub fn service_holds(svc: &Value, into: &mut InUse) {
    if let Some(ips) = svc.pointer("/spec/clusterIPs").and_then(Value::as_array) {
        for ip in ips.iter().filter_map(Value::as_str).filter_map(|s| s.parse().ok()) {
            into.ips.insert(ip);
        }
    }
    if let Some(ports) = svc.pointer("/spec/ports").and_then(Value::as_array) {
        for np in ports.iter().filter_map(|p| p.get("nodePort").and_then(Value::as_u64)) {
            into.node_ports.insert(np as u16);
        }
    }
    if let Some(hc) = svc.pointer("/spec/healthCheckNodePort").and_then(Value::as_u64) {
        into.node_ports.insert(hc as u16);
    }
}

/// Defaults for the other built-in kinds on create.
pub fn defaults(rt: &ResourceType, obj: &mut Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "namespaces") => {
            if obj.pointer("/spec/finalizers").is_none() {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
            }
            if obj.pointer("/status/phase").is_none() {
                obj["status"] = json!({"phase": "Active"});
            }
        }
        ("", "pods") => {
            if obj
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .is_none_or(|c| c.is_empty())
            {
                causes.push(Cause::required("spec.containers"));
            }
            if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                spec.entry("restartPolicy").or_insert(json!("Always"));
                spec.entry("dnsPolicy").or_insert(json!("ClusterFirst"));
                spec.entry("schedulerName").or_insert(json!("default-scheduler"));
                spec.entry("serviceAccountName").or_insert(json!("default"));
                spec.entry("terminationGracePeriodSeconds").or_insert(json!(30));
            }
            if obj.pointer("/status/phase").is_none() {
                obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
            }
        }
        ("apps", "deployments") => {
            if obj.pointer("/spec/selector").is_none() {
                causes.push(Cause::required("spec.selector"));
            }
            if obj.pointer("/spec/template").is_none() {
                causes.push(Cause::required("spec.template"));
            }
            if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                spec.entry("replicas").or_insert(json!(1));
                spec.entry("revisionHistoryLimit").or_insert(json!(10));
                spec.entry("progressDeadlineSeconds").or_insert(json!(600));
                spec.entry("strategy").or_insert(
                    json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}),
                );
            }
        }
        ("", "secrets") if obj.get("type").is_none() => {
            obj["type"] = json!("Opaque");
        }
        ("", "configmaps") => {
            if let Some(data) = obj.get("data").and_then(Value::as_object) {
                for (k, v) in data {
                    if !v.is_string() {
                        causes.push(Cause::type_invalid(&format!("data[{k}]"), v, "must be a string"));
                    }
                }
            }
        }
        ("discovery.k8s.io", "endpointslices") if obj.get("addressType").is_none() => {
            causes.push(Cause::required("addressType"));
        }
        _ => {}
    }
    causes
}

/// Normalization on every write, as the real server does it: Secret `stringData` is
/// merged into `data` (base64); namespaces carry `kubernetes.io/metadata.name`; a missing
/// PriorityClass `preemptionPolicy` is defaulted.
pub fn normalize(rt: &ResourceType, obj: &mut Value) {
    use base64::Engine;
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "secrets") => {
            let Some(m) = obj.as_object_mut() else { return };
            if let Some(Value::Object(sd)) = m.remove("stringData") {
                let data = m.entry("data").or_insert_with(|| json!({}));
                if !data.is_object() {
                    *data = json!({});
                }
                for (k, v) in sd {
                    let text = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
                    data[k.as_str()] = json!(base64::engine::general_purpose::STANDARD.encode(text.as_bytes()));
                }
            }
        }
        ("", "namespaces") => {
            // The real server labels every namespace with its name.
            let name = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                let labels = meta.entry("labels").or_insert_with(|| json!({}));
                if !labels.is_object() {
                    *labels = json!({});
                }
                labels["kubernetes.io/metadata.name"] = json!(name);
            }
        }
        ("scheduling.k8s.io", "priorityclasses") if obj.get("preemptionPolicy").is_none_or(Value::is_null) => {
            obj["preemptionPolicy"] = json!("PreemptLowerPriority");
        }
        _ => {}
    }
}

/// kube-apiserver's length limits on Events (`pkg/apis/core/validation/events.go`), in
/// bytes (Go's `len`).
pub const EVENT_REPORTING_INSTANCE_MAX: usize = 128;
pub const EVENT_ACTION_MAX: usize = 128;
pub const EVENT_REASON_MAX: usize = 128;
pub const EVENT_NOTE_MAX: usize = 1024;

/// kube-apiserver's validation of an Event (`ValidateEventCreate`, `ValidateEventUpdate`
/// in `pkg/apis/core/validation/events.go`), on the stored `v1` form, so the field paths
/// are the `core` ones the real server names (`message` for `note`, `reportingController`
/// for `reportingComponent`, `involvedObject` for `regarding`). `strict`: the request came
/// through `events.k8s.io/v1`; through `v1` only the legacy checks apply, as there. `old`:
/// the stored Event on update.
///
/// Every Event with an `eventTime` (what events.k8s.io/v1 clients such as kube-runtime's
/// Recorder write) needs `reportingController`, `reportingInstance` (at most 128 bytes),
/// `action` and `reason` (at most 128 each), a note of at most 1024 bytes, and a
/// `regarding` in its own namespace unless it sits in `default` or `kube-system`.
pub fn event(stored: &Value, old: Option<&Value>, strict: bool) -> Vec<Cause> {
    let text = |k: &str| stored.get(k).and_then(Value::as_str).unwrap_or_default();
    let set = |v: Option<&Value>| match v {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    let namespace = stored
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let regarding_ns = stored
        .pointer("/involvedObject/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let ns_mismatch = || {
        Cause::invalid(
            "involvedObject.namespace",
            &json!(regarding_ns),
            "does not match event.namespace",
        )
    };
    let too_long =
        |field: &str, max: usize| Cause::invalid(field, &json!(""), &format!("can have at most {max} characters"));
    let mut causes = Vec::new();
    let has_time = set(stored.get("eventTime"));
    if !has_time {
        let ok = if regarding_ns.is_empty() {
            namespace.is_empty() || namespace == "default"
        } else {
            namespace == regarding_ns
        };
        if !ok {
            causes.push(ns_mismatch());
        }
    } else {
        if regarding_ns.is_empty() && namespace != "default" && namespace != "kube-system" {
            causes.push(ns_mismatch());
        }
        let controller = text("reportingComponent");
        if controller.is_empty() {
            causes.push(Cause::required("reportingController"));
        }
        if !label_key_ok(controller) {
            causes.push(Cause::invalid(
                "reportingController",
                &json!(controller),
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            ));
        }
        for (field, max) in [
            ("reportingInstance", EVENT_REPORTING_INSTANCE_MAX),
            ("action", EVENT_ACTION_MAX),
            ("reason", EVENT_REASON_MAX),
        ] {
            let v = text(field);
            if v.is_empty() {
                causes.push(Cause::required(field));
            }
            if v.len() > max {
                causes.push(too_long(field, max));
            }
        }
        if text("message").len() > EVENT_NOTE_MAX {
            causes.push(too_long("message", EVENT_NOTE_MAX));
        }
    }
    if !strict {
        return causes;
    }
    let series = stored.get("series").filter(|s| !s.is_null());
    let series_checked = old.is_none_or(|o| o.get("series").filter(|s| !s.is_null()) != series);
    if let Some(series) = series.filter(|_| series_checked) {
        if series.get("count").and_then(Value::as_i64).unwrap_or(0) < 2 {
            causes.push(Cause::invalid("series.count", &json!(""), "should be at least 2"));
        }
        if !set(series.get("lastObservedTime")) {
            causes.push(Cause::required("series.lastObservedTime"));
        }
    }
    match old {
        None => {
            if !has_time {
                causes.push(Cause::required("eventTime"));
            }
            let typ = text("type");
            if typ != "Normal" && typ != "Warning" {
                causes.push(Cause::invalid("type", &json!(""), &format!("has invalid value: {typ}")));
            }
            for field in ["firstTimestamp", "lastTimestamp"] {
                if set(stored.get(field)) {
                    causes.push(Cause::invalid(field, &json!(""), "needs to be unset"));
                }
            }
            if stored.get("count").and_then(Value::as_i64).unwrap_or(0) != 0 {
                causes.push(Cause::invalid("count", &json!(""), "needs to be unset"));
            }
            if set(stored.pointer("/source/component")) || set(stored.pointer("/source/host")) {
                causes.push(Cause::invalid("source", &json!(""), "needs to be unset"));
            }
        }
        Some(old) => {
            let field = |o: &Value, k: &str| o.get(k).filter(|v| !v.is_null()).cloned();
            for (stored_key, path) in [
                ("involvedObject", "involvedObject"),
                ("reason", "reason"),
                ("message", "message"),
                ("source", "source"),
                ("firstTimestamp", "firstTimestamp"),
                ("lastTimestamp", "lastTimestamp"),
                ("count", "count"),
                ("type", "type"),
                ("eventTime", "eventTime"),
                ("action", "action"),
                ("related", "related"),
                ("reportingComponent", "reportingController"),
                ("reportingInstance", "reportingInstance"),
            ] {
                let now = field(stored, stored_key);
                if now != field(old, stored_key) {
                    causes.push(Cause::invalid(path, &now.unwrap_or(Value::Null), "field is immutable"));
                }
            }
        }
    }
    causes
}

/// `v1` Event → `events.k8s.io/v1` Event.
pub fn event_to_v1(core: &Value) -> Value {
    let mut e = json!({
        "kind": "Event",
        "apiVersion": "events.k8s.io/v1",
        "metadata": core.get("metadata").cloned().unwrap_or(json!({})),
    });
    let copy = |e: &mut Value, from: &str, to: &str| {
        if let Some(v) = core.get(from).filter(|v| !v.is_null()) {
            e[to] = v.clone();
        }
    };
    copy(&mut e, "involvedObject", "regarding");
    copy(&mut e, "message", "note");
    copy(&mut e, "reason", "reason");
    copy(&mut e, "type", "type");
    copy(&mut e, "action", "action");
    copy(&mut e, "related", "related");
    copy(&mut e, "reportingInstance", "reportingInstance");
    copy(&mut e, "source", "deprecatedSource");
    copy(&mut e, "firstTimestamp", "deprecatedFirstTimestamp");
    copy(&mut e, "lastTimestamp", "deprecatedLastTimestamp");
    copy(&mut e, "count", "deprecatedCount");
    copy(&mut e, "eventTime", "eventTime");
    copy(&mut e, "reportingComponent", "reportingController");
    if e.get("reportingController").is_none()
        && let Some(c) = core.pointer("/source/component")
    {
        e["reportingController"] = c.clone();
    }
    if let Some(s) = core.get("series").filter(|s| s.is_object()) {
        e["series"] = json!({"count": s.get("count").cloned().unwrap_or(json!(1)), "lastObservedTime": s.get("lastObservedTime").cloned().unwrap_or(Value::Null)});
    }
    if e.get("eventTime").is_none() {
        e["eventTime"] = Value::Null;
    }
    e
}

/// `events.k8s.io/v1` Event → `v1` Event (the stored form).
pub fn event_from_v1(ev: &Value) -> Value {
    let mut c = json!({
        "kind": "Event",
        "apiVersion": "v1",
        "metadata": ev.get("metadata").cloned().unwrap_or(json!({})),
    });
    let copy = |c: &mut Value, from: &str, to: &str| {
        if let Some(v) = ev.get(from).filter(|v| !v.is_null()) {
            c[to] = v.clone();
        }
    };
    copy(&mut c, "regarding", "involvedObject");
    copy(&mut c, "note", "message");
    copy(&mut c, "reason", "reason");
    copy(&mut c, "type", "type");
    copy(&mut c, "action", "action");
    copy(&mut c, "related", "related");
    copy(&mut c, "reportingController", "reportingComponent");
    copy(&mut c, "reportingInstance", "reportingInstance");
    copy(&mut c, "deprecatedSource", "source");
    copy(&mut c, "deprecatedFirstTimestamp", "firstTimestamp");
    copy(&mut c, "deprecatedLastTimestamp", "lastTimestamp");
    copy(&mut c, "deprecatedCount", "count");
    copy(&mut c, "eventTime", "eventTime");
    if c.get("involvedObject").is_none() {
        c["involvedObject"] = json!({});
    }
    if let Some(s) = ev.get("series").filter(|s| s.is_object()) {
        c["series"] = json!({"count": s.get("count").cloned().unwrap_or(json!(1)), "lastObservedTime": s.get("lastObservedTime").cloned().unwrap_or(Value::Null)});
    }
    c
}

/// Sets a CRD's status as the apiextensions controllers would at once.
pub fn crd_status(crd: &mut Value) {
    let now = super::util::now_rfc3339();
    let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
    let stored: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|v| {
            v.iter()
                .filter(|x| x.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|x| x.get("name").cloned())
                .collect()
        })
        .unwrap_or_default();
    let cond = |t: &str, reason: &str, msg: &str| json!({"type": t, "status": "True", "lastTransitionTime": now, "reason": reason, "message": msg});
    crd["status"] = json!({
        "acceptedNames": names,
        "conditions": [
            cond("NamesAccepted", "NoConflicts", "no conflicts found"),
            cond("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "storedVersions": stored,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr() -> ServiceCidrs {
        ServiceCidrs::parse("127.96.0.0/16").unwrap()
    }

    #[test]
    fn service_defaults_and_allocation() {
        let mut s = json!({"metadata": {"name": "s"}, "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": [{"port": 80}]}});
        service(None, &mut s, &cidr(), &InUse::default()).unwrap();
        let spec = &s["spec"];
        assert_eq!(spec["clusterIP"], "127.96.0.1");
        assert_eq!(spec["ports"][0]["protocol"], "TCP");
        assert_eq!(spec["ports"][0]["targetPort"], 80);
        let np = spec["ports"][0]["nodePort"].as_u64().unwrap();
        assert!((30000..=32767).contains(&np));
        let hc = spec["healthCheckNodePort"].as_u64().unwrap();
        assert_ne!(hc, np);
        assert_eq!(spec["sessionAffinity"], "None");
        assert_eq!(spec["allocateLoadBalancerNodePorts"], true);
        assert_eq!(spec["ipFamilies"], json!(["IPv4"]));
    }

    #[test]
    fn service_requested_values() {
        let mut in_use = InUse::default();
        in_use.node_ports.insert(30080);
        in_use.ips.insert("127.96.0.10".parse().unwrap());
        let mut s = json!({"spec": {"type": "NodePort", "clusterIP": "127.96.0.10", "ports": [{"port": 80, "nodePort": 30080}]}});
        let causes = service(None, &mut s, &cidr(), &in_use).unwrap_err();
        assert_eq!(causes.len(), 2);
        assert!(
            causes[0].text().contains("provided IP is already allocated"),
            "{}",
            causes[0].text()
        );
        assert_eq!(
            causes[1].text(),
            "spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated"
        );
        let mut ok = json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30081}]}});
        service(None, &mut ok, &cidr(), &in_use).unwrap();
        assert_eq!(ok["spec"]["ports"][0]["nodePort"], 30081);
        let mut out = json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]}});
        assert!(service(None, &mut out, &cidr(), &in_use).is_err());
    }

    #[test]
    fn service_immutable_fields_and_headless() {
        let mut s = json!({"spec": {"type": "LoadBalancer", "loadBalancerClass": "a", "ports": [{"port": 80}]}});
        service(None, &mut s, &cidr(), &InUse::default()).unwrap();
        let old = s.clone();
        let mut new = json!({"spec": {"type": "LoadBalancer", "loadBalancerClass": "a", "ports": [{"port": 80}]}});
        service(Some(&old), &mut new, &cidr(), &InUse::default()).unwrap();
        assert_eq!(new["spec"]["clusterIP"], old["spec"]["clusterIP"]);
        assert_eq!(new["spec"]["ports"][0]["nodePort"], old["spec"]["ports"][0]["nodePort"]);
        let mut changed = json!({"spec": {"type": "LoadBalancer", "loadBalancerClass": "b", "clusterIP": "127.96.0.99", "ports": [{"port": 80}]}});
        let causes = service(Some(&old), &mut changed, &cidr(), &InUse::default()).unwrap_err();
        assert!(causes.iter().any(|c| c.field == "spec.loadBalancerClass"));
        assert!(causes.iter().any(|c| c.field == "spec.clusterIPs[0]"));
        let mut headless = json!({"spec": {"clusterIP": "None", "selector": {"a": "b"}}});
        service(None, &mut headless, &cidr(), &InUse::default()).unwrap();
        assert_eq!(headless["spec"]["clusterIPs"], json!(["None"]));
    }

    #[test]
    fn secret_string_data_goes_to_data() {
        let rt = crate::kube::registry::builtins()
            .into_iter()
            .find(|t| t.plural == "secrets")
            .unwrap();
        let mut s = json!({"data": {"a": "eA=="}, "stringData": {"b": "y"}});
        normalize(&rt, &mut s);
        assert_eq!(s, json!({"data": {"a": "eA==", "b": "eQ=="}}));
    }

    #[test]
    fn service_type_changes_release_ports() {
        let mut lb =
            json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": [{"port": 80}]}});
        service(None, &mut lb, &cidr(), &InUse::default()).unwrap();
        let mut back = lb.clone();
        back["spec"]["type"] = json!("ClusterIP");
        service(Some(&lb), &mut back, &cidr(), &InUse::default()).unwrap();
        let spec = &back["spec"];
        assert!(spec["ports"][0].get("nodePort").is_none(), "{spec}");
        assert!(spec.get("healthCheckNodePort").is_none());
        assert!(spec.get("externalTrafficPolicy").is_none());
        assert!(spec.get("allocateLoadBalancerNodePorts").is_none());
        assert_eq!(spec["clusterIP"], lb["spec"]["clusterIP"]);
        let mut no_alloc =
            json!({"spec": {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false, "ports": [{"port": 80}]}});
        service(None, &mut no_alloc, &cidr(), &InUse::default()).unwrap();
        assert!(no_alloc["spec"]["ports"][0].get("nodePort").is_none());
        let mut bad = json!({"spec": {"type": "Weird", "ports": [{"port": 80}]}});
        assert_eq!(
            service(None, &mut bad, &cidr(), &InUse::default()).unwrap_err()[0].field,
            "spec.type"
        );
        let mut two = json!({"spec": {"ports": [{"port": 80}, {"port": 81}]}});
        let causes = service(None, &mut two, &cidr(), &InUse::default()).unwrap_err();
        assert_eq!(causes[0].text(), "spec.ports[0].name: Required value");
    }

    #[test]
    fn event_views_roundtrip() {
        let v1 = json!({"metadata": {"name": "e"}, "regarding": {"kind": "Service", "name": "s"}, "note": "hi", "reason": "R", "type": "Normal", "reportingController": "c", "reportingInstance": "i", "action": "A", "eventTime": "2024-01-01T00:00:00.000000Z"});
        let core = event_from_v1(&v1);
        assert_eq!(core["involvedObject"]["name"], "s");
        assert_eq!(core["message"], "hi");
        let back = event_to_v1(&core);
        assert_eq!(back["regarding"], v1["regarding"]);
        assert_eq!(back["note"], "hi");
        assert_eq!(back["reportingController"], "c");
        // What the client did not send is not made up: no deprecated source or count.
        assert!(core.get("source").is_none() && back.get("deprecatedSource").is_none());
        let repeated =
            event_from_v1(&json!({"series": {"count": 2, "lastObservedTime": "2024-01-01T00:00:01.000000Z"}}));
        assert!(repeated.get("count").is_none(), "{repeated}");
        assert_eq!(repeated["series"]["count"], 2);
    }

    /// An events.k8s.io/v1 Event as kube-runtime's Recorder writes it, stored (`v1` form).
    fn recorded(ns: &str) -> Value {
        let mut e = event_from_v1(&json!({
            "metadata": {"name": "web.17", "namespace": ns},
            "regarding": {"kind": "Service", "namespace": ns, "name": "web", "apiVersion": "v1"},
            "note": "created load balancer lb-1", "reason": "EnsuredLoadBalancer", "type": "Normal",
            "action": "EnsuredLoadBalancer", "reportingController": "kuberaya-ccm-service-controller",
            "reportingInstance": "kuberaya-ccm-service-controller", "eventTime": "2026-01-01T00:00:00.000000Z"}));
        e["metadata"]["namespace"] = json!(ns);
        e
    }

    fn texts(causes: &[Cause]) -> Vec<String> {
        causes.iter().map(Cause::text).collect()
    }

    #[test]
    fn events_k8s_io_events_are_validated_as_kube_apiserver_does() {
        assert_eq!(texts(&event(&recorded("team-a"), None, true)), Vec::<String>::new());
        let with = |k: &str, v: Value| {
            let mut e = recorded("team-a");
            e[k] = v;
            texts(&event(&e, None, true))
        };
        // The note is limited in bytes: 1024 two-byte chars are 2048 bytes.
        assert_eq!(with("message", json!("a".repeat(EVENT_NOTE_MAX))), Vec::<String>::new());
        let too_long = [r#"message: Invalid value: "": can have at most 1024 characters"#];
        assert_eq!(with("message", json!("a".repeat(EVENT_NOTE_MAX + 1))), too_long);
        assert_eq!(with("message", json!("é".repeat(513))), too_long);
        assert_eq!(with("message", json!("é".repeat(512))), Vec::<String>::new());
        for (field, path) in [
            ("reason", "reason"),
            ("action", "action"),
            ("reportingInstance", "reportingInstance"),
        ] {
            assert_eq!(with(field, Value::Null), [format!("{path}: Required value")]);
            assert_eq!(with(field, json!("r".repeat(128))), Vec::<String>::new());
            assert_eq!(
                with(field, json!("r".repeat(129))),
                [format!(r#"{path}: Invalid value: "": can have at most 128 characters"#)]
            );
        }
        assert_eq!(
            with("reportingComponent", Value::Null),
            [
                "reportingController: Required value",
                r#"reportingController: Invalid value: "": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"#
            ]
        );
        // No regarding: only in `default` or `kube-system`, where cluster-scoped objects'
        // Events go.
        let mut e = recorded("team-a");
        e.as_object_mut().unwrap().remove("involvedObject");
        assert_eq!(
            texts(&event(&e, None, true)),
            [r#"involvedObject.namespace: Invalid value: "": does not match event.namespace"#]
        );
        let mut node = recorded("default");
        node["involvedObject"] = json!({"kind": "Node", "name": "worker-1"});
        assert_eq!(texts(&event(&node, None, true)), Vec::<String>::new());
        // Strict on create through events.k8s.io only.
        assert_eq!(with("eventTime", Value::Null), ["eventTime: Required value"]);
        assert_eq!(
            with("type", json!("Bad")),
            [r#"type: Invalid value: "": has invalid value: Bad"#]
        );
        assert_eq!(
            with("count", json!(3)),
            [r#"count: Invalid value: "": needs to be unset"#]
        );
        assert_eq!(
            with(
                "series",
                json!({"count": 1, "lastObservedTime": "2026-01-01T00:00:00.000000Z"})
            ),
            [r#"series.count: Invalid value: "": should be at least 2"#]
        );
        // Through the core API the strict rules do not apply, the legacy ones do.
        let mut core = recorded("team-a");
        core["count"] = json!(3);
        assert_eq!(texts(&event(&core, None, false)), Vec::<String>::new());
        core["message"] = json!("a".repeat(EVENT_NOTE_MAX + 1));
        assert_eq!(texts(&event(&core, None, false)), too_long);
    }

    #[test]
    fn an_event_update_may_add_a_series_and_change_nothing_else() {
        let old = recorded("default");
        let mut next = old.clone();
        next["series"] = json!({"count": 2, "lastObservedTime": "2026-01-01T00:00:05.000000Z"});
        assert_eq!(texts(&event(&next, Some(&old), true)), Vec::<String>::new());
        next["message"] = json!("another note");
        assert_eq!(
            texts(&event(&next, Some(&old), true)),
            [r#"message: Invalid value: "another note": field is immutable"#]
        );
        // The core API may change it.
        assert_eq!(texts(&event(&next, Some(&old), false)), Vec::<String>::new());
    }
}

//! The resource registry: which kinds are served, how (plural, scope, subresources, verbs,
//! printer columns), built-in kinds plus those registered from CRDs at run time.

use serde_json::{Value, json};

/// How objects of a kind are stored and shown.
#[derive(Clone, Debug, PartialEq)]
pub enum View {
    /// Stored as served.
    Plain,
    /// `events.k8s.io/v1` Event: a view of the `v1` Event store.
    EventsV1,
}

/// A printer column (`additionalPrinterColumns` or a built-in kind's column).
#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    pub name: String,
    pub typ: String,
    pub format: String,
    pub json_path: String,
    pub priority: i64,
    pub description: String,
}

/// The `scale` subresource's paths.
#[derive(Clone, Debug, PartialEq)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: String,
    pub label_selector: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub verbs: Vec<String>,
    /// `status`, `scale`, `eviction`, `token`.
    pub subresources: Vec<String>,
    /// Printer columns for custom resources; built-in kinds compute theirs in `table`.
    pub columns: Vec<Column>,
    pub scale: Option<ScalePaths>,
    /// The store this kind lives in (`group/plural`), shared by views of one store.
    pub storage: String,
    pub view: View,
    /// A CRD's `openAPIV3Schema` for this version.
    pub schema: Option<Value>,
    /// Registered from a CRD (named `plural.group`).
    pub crd: Option<String>,
    /// Fields usable in field selectors, besides metadata.name/namespace.
    pub selectable: Vec<String>,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
    pub fn has_status(&self) -> bool {
        self.subresources.iter().any(|s| s == "status")
    }
    pub fn has_sub(&self, s: &str) -> bool {
        self.subresources.iter().any(|x| x == s)
    }
    pub fn field_supported(&self, f: &str) -> bool {
        f == "metadata.name" || (self.namespaced && f == "metadata.namespace") || self.selectable.iter().any(|x| x == f)
    }
}

const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

struct B<'a> {
    group: &'a str,
    version: &'a str,
    kind: &'a str,
    plural: &'a str,
    namespaced: bool,
    short: &'a [&'a str],
    subs: &'a [&'a str],
    selectable: &'a [&'a str],
}

fn build(b: B<'_>) -> ResourceType {
    let categories = match b.plural {
        "pods" | "services" | "deployments" | "jobs" | "cronjobs" => vec!["all".to_string()],
        _ => vec![],
    };
    ResourceType {
        group: b.group.into(),
        version: b.version.into(),
        kind: b.kind.into(),
        plural: b.plural.into(),
        singular: b.kind.to_lowercase(),
        namespaced: b.namespaced,
        short_names: b.short.iter().map(|s| s.to_string()).collect(),
        categories,
        verbs: ALL_VERBS.iter().map(|s| s.to_string()).collect(),
        subresources: b.subs.iter().map(|s| s.to_string()).collect(),
        columns: vec![],
        scale: (b.plural == "deployments").then(|| ScalePaths {
            spec_replicas: ".spec.replicas".into(),
            status_replicas: ".status.replicas".into(),
            label_selector: None,
        }),
        storage: format!("{}/{}", if b.group.is_empty() { "core" } else { b.group }, b.plural),
        view: View::Plain,
        schema: None,
        crd: None,
        selectable: b.selectable.iter().map(|s| s.to_string()).collect(),
    }
}

const EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];

/// The kinds served from the start.
pub fn builtins() -> Vec<ResourceType> {
    let mut out = vec![
        build(B {
            group: "",
            version: "v1",
            kind: "Namespace",
            plural: "namespaces",
            namespaced: false,
            short: &["ns"],
            subs: &["status", "finalize"],
            selectable: &["status.phase"],
        }),
        build(B {
            group: "",
            version: "v1",
            kind: "Node",
            plural: "nodes",
            namespaced: false,
            short: &["no"],
            subs: &["status"],
            selectable: &["spec.unschedulable"],
        }),
        build(B {
            group: "",
            version: "v1",
            kind: "Service",
            plural: "services",
            namespaced: true,
            short: &["svc"],
            subs: &["status"],
            selectable: &["spec.type", "spec.clusterIP"],
        }),
        build(B {
            group: "",
            version: "v1",
            kind: "Endpoints",
            plural: "endpoints",
            namespaced: true,
            short: &["ep"],
            subs: &[],
            selectable: &[],
        }),
        build(B {
            group: "",
            version: "v1",
            kind: "Pod",
            plural: "pods",
            namespaced: true,
            short: &["po"],
            subs: &["status", "eviction", "ephemeralcontainers"],
            selectable: &[
                "spec.nodeName",
                "status.phase",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "status.podIP",
                "status.nominatedNodeName",
            ],
        }),
        build(B {
            group: "",
            version: "v1",
            kind: "Secret",
            plural: "secrets",
            namespaced: true,
            short: &[],
            subs: &[],
            selectable: &["type"],
        }),
        build(B {
            group: "",
            version: "v1",
            kind: "ConfigMap",
            plural: "configmaps",
            namespaced: true,
            short: &["cm"],
            subs: &[],
            selectable: &[],
        }),
        build(B {
            group: "",
            version: "v1",
            kind: "ServiceAccount",
            plural: "serviceaccounts",
            namespaced: true,
            short: &["sa"],
            subs: &["token"],
            selectable: &[],
        }),
        build(B {
            group: "",
            version: "v1",
            kind: "Event",
            plural: "events",
            namespaced: true,
            short: &["ev"],
            subs: &[],
            selectable: EVENT_FIELDS,
        }),
        build(B {
            group: "discovery.k8s.io",
            version: "v1",
            kind: "EndpointSlice",
            plural: "endpointslices",
            namespaced: true,
            short: &[],
            subs: &[],
            selectable: &["addressType"],
        }),
        build(B {
            group: "coordination.k8s.io",
            version: "v1",
            kind: "Lease",
            plural: "leases",
            namespaced: true,
            short: &[],
            subs: &[],
            selectable: &[],
        }),
        build(B {
            group: "apps",
            version: "v1",
            kind: "Deployment",
            plural: "deployments",
            namespaced: true,
            short: &["deploy"],
            subs: &["status", "scale"],
            selectable: &[],
        }),
        // Stored and served; no controller runs them here (no Job → Pod).
        build(B {
            group: "batch",
            version: "v1",
            kind: "Job",
            plural: "jobs",
            namespaced: true,
            short: &[],
            subs: &["status"],
            selectable: &["status.successful"],
        }),
        build(B {
            group: "batch",
            version: "v1",
            kind: "CronJob",
            plural: "cronjobs",
            namespaced: true,
            short: &["cj"],
            subs: &["status"],
            selectable: &[],
        }),
        build(B {
            group: "certificates.k8s.io",
            version: "v1",
            kind: "CertificateSigningRequest",
            plural: "certificatesigningrequests",
            namespaced: false,
            short: &["csr"],
            subs: &["status", "approval"],
            selectable: &["spec.signerName"],
        }),
        build(B {
            group: "apiregistration.k8s.io",
            version: "v1",
            kind: "APIService",
            plural: "apiservices",
            namespaced: false,
            short: &[],
            subs: &["status"],
            selectable: &[],
        }),
        build(B {
            group: "policy",
            version: "v1",
            kind: "PodDisruptionBudget",
            plural: "poddisruptionbudgets",
            namespaced: true,
            short: &["pdb"],
            subs: &["status"],
            selectable: &[],
        }),
        build(B {
            group: "scheduling.k8s.io",
            version: "v1",
            kind: "PriorityClass",
            plural: "priorityclasses",
            namespaced: false,
            short: &["pc"],
            subs: &[],
            selectable: &[],
        }),
        build(B {
            group: "apiextensions.k8s.io",
            version: "v1",
            kind: "CustomResourceDefinition",
            plural: "customresourcedefinitions",
            namespaced: false,
            short: &["crd", "crds"],
            subs: &["status"],
            selectable: &[],
        }),
    ];
    for (group, kind, plural, namespaced) in [
        ("rbac.authorization.k8s.io", "Role", "roles", true),
        ("rbac.authorization.k8s.io", "RoleBinding", "rolebindings", true),
        ("rbac.authorization.k8s.io", "ClusterRole", "clusterroles", false),
        (
            "rbac.authorization.k8s.io",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
        ),
        (
            "authorization.k8s.io",
            "SelfSubjectAccessReview",
            "selfsubjectaccessreviews",
            false,
        ),
        (
            "authorization.k8s.io",
            "SubjectAccessReview",
            "subjectaccessreviews",
            false,
        ),
        (
            "authorization.k8s.io",
            "LocalSubjectAccessReview",
            "localsubjectaccessreviews",
            true,
        ),
        ("authentication.k8s.io", "TokenReview", "tokenreviews", false),
    ] {
        let mut r = build(B {
            group,
            version: "v1",
            kind,
            plural,
            namespaced,
            short: &[],
            subs: &[],
            selectable: &[],
        });
        // Access and token reviews are answered, never stored.
        if group == "authorization.k8s.io" || group == "authentication.k8s.io" {
            r.verbs = vec!["create".into()];
        }
        out.push(r);
    }
    let mut ev = build(B {
        group: "events.k8s.io",
        version: "v1",
        kind: "Event",
        plural: "events",
        namespaced: true,
        short: &["ev"],
        subs: &[],
        selectable: &[],
    });
    ev.storage = "core/events".into();
    ev.view = View::EventsV1;
    ev.selectable = EVENT_FIELDS
        .iter()
        .map(|f| f.replace("involvedObject", "regarding"))
        .collect();
    out.push(ev);
    out
}

/// Builds the resource types a CRD defines (one per served version), or the causes
/// why it is invalid.
pub fn from_crd(crd: &Value) -> Result<Vec<ResourceType>, Vec<super::status::Cause>> {
    use super::status::Cause;
    let spec = crd.get("spec").cloned().unwrap_or(Value::Null);
    let s = |p: &str| {
        super::util::get_path(&spec, p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (group, plural, kind) = (s("group"), s("names.plural"), s("names.kind"));
    let mut causes = Vec::new();
    if group.is_empty() {
        causes.push(Cause::required("spec.group"));
    } else if !group.contains('.') {
        causes.push(Cause::invalid(
            "spec.group",
            &json!(group),
            "should be a domain with at least one dot",
        ));
    }
    if plural.is_empty() {
        causes.push(Cause::required("spec.names.plural"));
    }
    if kind.is_empty() {
        causes.push(Cause::required("spec.names.kind"));
    }
    let name = crd
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !plural.is_empty() && !group.is_empty() && name != format!("{plural}.{group}") {
        causes.push(Cause::invalid(
            "metadata.name",
            &json!(name),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    let scope = s("scope");
    if scope != "Namespaced" && scope != "Cluster" {
        causes.push(Cause::unsupported(
            "spec.scope",
            &json!(scope),
            &[json!("Cluster"), json!("Namespaced")],
        ));
    }
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        causes.push(Cause::required("spec.versions"));
    }
    if versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .count()
        != 1
        && !versions.is_empty()
    {
        causes.push(Cause::invalid(
            "spec.versions",
            &json!(versions.len()),
            "must have exactly one version marked as storage version",
        ));
    }
    if !causes.is_empty() {
        return Err(causes);
    }
    let strs = |p: &str| -> Vec<String> {
        super::util::get_path(&spec, p)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for v in versions {
        if v.get("served").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let vname = v.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        let mut subs = Vec::new();
        if v.pointer("/subresources/status").is_some() {
            subs.push("status".to_string());
        }
        let scale = v.pointer("/subresources/scale").map(|sc| ScalePaths {
            spec_replicas: sc
                .get("specReplicasPath")
                .and_then(Value::as_str)
                .unwrap_or(".spec.replicas")
                .into(),
            status_replicas: sc
                .get("statusReplicasPath")
                .and_then(Value::as_str)
                .unwrap_or(".status.replicas")
                .into(),
            label_selector: sc.get("labelSelectorPath").and_then(Value::as_str).map(str::to_string),
        });
        if scale.is_some() {
            subs.push("scale".to_string());
        }
        let columns = v
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .map(|cols| {
                cols.iter()
                    .map(|c| {
                        let g = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
                        Column {
                            name: g("name"),
                            typ: g("type"),
                            format: g("format"),
                            json_path: g("jsonPath"),
                            priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                            description: g("description"),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let singular = s("names.singular");
        out.push(ResourceType {
            group: group.clone(),
            version: vname,
            kind: kind.clone(),
            plural: plural.clone(),
            singular: if singular.is_empty() {
                kind.to_lowercase()
            } else {
                singular
            },
            namespaced: scope == "Namespaced",
            short_names: strs("names.shortNames"),
            categories: strs("names.categories"),
            verbs: ALL_VERBS.iter().map(|s| s.to_string()).collect(),
            subresources: subs,
            columns,
            scale,
            storage: format!("{group}/{plural}"),
            view: View::Plain,
            schema: v.pointer("/schema/openAPIV3Schema").cloned(),
            crd: Some(name.to_string()),
            selectable: v
                .get("selectableFields")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|f| f.get("jsonPath").and_then(Value::as_str))
                        .map(|p| p.trim_start_matches('.').to_string())
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_have_unique_paths() {
        let b = builtins();
        let mut seen = std::collections::HashSet::new();
        for r in &b {
            assert!(
                seen.insert((r.group.clone(), r.version.clone(), r.plural.clone())),
                "{}",
                r.plural
            );
        }
        let ev = b.iter().find(|r| r.group == "events.k8s.io").unwrap();
        assert_eq!(ev.storage, "core/events");
    }

    #[test]
    fn crd_types() {
        let crd = json!({
            "metadata": {"name": "foos.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"plural": "foos", "kind": "Foo", "shortNames": ["fo"]},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.r", "statusReplicasPath": ".status.r"}},
                    "additionalPrinterColumns": [{"name": "R", "type": "integer", "jsonPath": ".spec.r"}]}]}
        });
        let t = from_crd(&crd).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].subresources, vec!["status", "scale"]);
        assert_eq!(t[0].columns[0].json_path, ".spec.r");
        assert_eq!(t[0].short_names, vec!["fo"]);
        let bad = json!({"metadata": {"name": "x"}, "spec": {"group": "nodot", "scope": "Weird", "names": {}}});
        assert!(from_crd(&bad).unwrap_err().len() >= 4);
    }
}

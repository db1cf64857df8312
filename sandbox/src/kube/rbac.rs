//! RBAC authorization for ServiceAccount tokens: Roles/ClusterRoles reached through
//! RoleBindings/ClusterRoleBindings (the admin token bypasses it).

use serde_json::{Value, json};

/// The ClusterRoleBindings every cluster starts with (each binds the ClusterRole of its
/// own name), with the groups bound, after kube-apiserver's
/// `plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go`. `admin`, `edit` and `view`
/// have no binding: they are granted per namespace with a RoleBinding.
pub const BOOTSTRAP_CLUSTER_ROLE_BINDINGS: &[(&str, &[&str])] = &[
    ("cluster-admin", &["system:masters"]),
    ("system:discovery", &["system:authenticated"]),
    ("system:basic-user", &["system:authenticated"]),
    (
        "system:public-info-viewer",
        &["system:authenticated", "system:unauthenticated"],
    ),
];

/// The bootstrap ClusterRoles (name, rules), after kube-apiserver's bootstrap policy.
/// `admin`, `edit` and `view` are aggregated there; here their rules are written out,
/// for the API groups this server serves.
pub fn bootstrap_cluster_roles() -> Vec<(&'static str, Value)> {
    const READ: &[&str] = &["get", "list", "watch"];
    const WRITE: &[&str] = &["create", "delete", "deletecollection", "patch", "update"];
    // What `view` reads; Secrets are left out of it, as upstream does.
    let view = json!([
        {"apiGroups": [""], "resources": ["pods", "pods/log", "pods/status", "services", "services/status", "endpoints",
            "configmaps", "persistentvolumeclaims", "replicationcontrollers", "serviceaccounts", "events", "limitranges",
            "resourcequotas", "namespaces", "namespaces/status", "bindings"], "verbs": READ},
        {"apiGroups": ["apps"], "resources": ["deployments", "deployments/scale", "deployments/status", "replicasets",
            "replicasets/scale", "replicasets/status", "statefulsets", "statefulsets/scale", "daemonsets", "controllerrevisions"], "verbs": READ},
        {"apiGroups": ["batch"], "resources": ["jobs", "cronjobs"], "verbs": READ},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": READ},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": READ},
        {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": READ},
        {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses", "networkpolicies"], "verbs": READ},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": READ}
    ]);
    let writes = json!([
        {"apiGroups": [""], "resources": ["pods", "pods/attach", "pods/exec", "pods/portforward", "pods/proxy", "pods/eviction",
            "configmaps", "endpoints", "persistentvolumeclaims", "replicationcontrollers", "secrets", "serviceaccounts",
            "services", "services/proxy"], "verbs": WRITE},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": READ},
        {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
        {"apiGroups": ["apps"], "resources": ["deployments", "deployments/scale", "replicasets", "replicasets/scale",
            "statefulsets", "statefulsets/scale", "daemonsets"], "verbs": WRITE},
        {"apiGroups": ["batch"], "resources": ["jobs", "cronjobs"], "verbs": WRITE},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": WRITE},
        {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": WRITE},
        {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses", "networkpolicies"], "verbs": WRITE},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": WRITE}
    ]);
    let concat = |parts: &[&Value]| {
        Value::Array(
            parts
                .iter()
                .flat_map(|p| p.as_array().cloned().unwrap_or_default())
                .collect(),
        )
    };
    let edit = concat(&[&view, &writes]);
    let admin = concat(&[
        &edit,
        &json!([
            {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]},
            {"apiGroups": ["authorization.k8s.io"], "resources": ["localsubjectaccessreviews"], "verbs": ["create"]}
        ]),
    ]);
    vec![
        (
            "cluster-admin",
            json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}, {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
        ),
        ("admin", admin),
        ("edit", edit),
        ("view", view),
        (
            "system:discovery",
            json!([{"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*", "/version", "/version/", "/healthz", "/livez", "/readyz"], "verbs": ["get"]}]),
        ),
        (
            "system:basic-user",
            json!([{"apiGroups": ["authorization.k8s.io"], "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]}]),
        ),
        (
            "system:public-info-viewer",
            json!([{"nonResourceURLs": ["/healthz", "/livez", "/readyz", "/version", "/version/"], "verbs": ["get"]}]),
        ),
        (
            // What a server that delegates authentication and authorization needs (the
            // CCM's authenticated /metrics).
            "system:auth-delegator",
            json!([
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]}
            ]),
        ),
    ]
}

/// Who is asking.
#[derive(Clone, Debug, PartialEq)]
pub enum User {
    Admin,
    ServiceAccount {
        namespace: String,
        name: String,
    },
    /// Any other user, as the admin impersonates it (`kubectl --as`, `--as-group`).
    Named {
        name: String,
        groups: Vec<String>,
    },
}

impl User {
    pub fn name(&self) -> String {
        match self {
            User::Admin => "kubernetes-admin".into(),
            User::ServiceAccount { namespace, name } => format!("system:serviceaccount:{namespace}:{name}"),
            User::Named { name, .. } => name.clone(),
        }
    }
    pub fn groups(&self) -> Vec<String> {
        match self {
            User::Admin => vec!["system:masters".into(), "system:authenticated".into()],
            User::ServiceAccount { namespace, .. } => vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            User::Named { groups, .. } => {
                let mut g = groups.clone();
                g.push("system:authenticated".into());
                g
            }
        }
    }

    /// The user the admin impersonates (`Impersonate-User`, `Impersonate-Group`).
    pub fn impersonated(name: &str, groups: Vec<String>) -> User {
        if let Some((namespace, sa)) = name
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
        {
            return User::ServiceAccount {
                namespace: namespace.to_string(),
                name: sa.to_string(),
            };
        }
        User::Named {
            name: name.to_string(),
            groups,
        }
    }
}

/// One resource request's attributes.
pub struct Attrs<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    pub resource: &'a str,
    pub subresource: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
}

fn contains(list: Option<&Value>, want: &str) -> bool {
    list.and_then(Value::as_array)
        .is_some_and(|a| a.iter().filter_map(Value::as_str).any(|x| x == "*" || x == want))
}

fn rule_allows(rule: &Value, a: &Attrs<'_>) -> bool {
    let res = if a.subresource.is_empty() {
        a.resource.to_string()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    let res_ok = rule.get("resources").and_then(Value::as_array).is_some_and(|rs| {
        rs.iter().filter_map(Value::as_str).any(|r| {
            r == "*"
                || r == res
                || (a.subresource.is_empty() && r == a.resource)
                || r == format!("*/{}", a.subresource)
                || (r.ends_with("/*") && r.trim_end_matches("/*") == a.resource)
        })
    });
    let names_ok = match rule.get("resourceNames").and_then(Value::as_array) {
        Some(n) if !n.is_empty() => !a.name.is_empty() && n.iter().any(|x| x.as_str() == Some(a.name)),
        _ => true,
    };
    contains(rule.get("verbs"), a.verb) && contains(rule.get("apiGroups"), a.group) && res_ok && names_ok
}

fn subject_matches(s: &Value, user: &User) -> bool {
    let kind = s.get("kind").and_then(Value::as_str).unwrap_or_default();
    let name = s.get("name").and_then(Value::as_str).unwrap_or_default();
    match kind {
        "ServiceAccount" => match user {
            User::ServiceAccount { namespace, name: n } => {
                n == name && s.get("namespace").and_then(Value::as_str).unwrap_or_default() == namespace
            }
            User::Admin | User::Named { .. } => false,
        },
        "User" => user.name() == name,
        "Group" => user.groups().iter().any(|g| g == name),
        _ => false,
    }
}

fn role_rules<'a>(role_ref: &Value, ns: &str, roles: &'a [Value], cluster_roles: &'a [Value]) -> Vec<&'a Value> {
    let kind = role_ref.get("kind").and_then(Value::as_str).unwrap_or_default();
    let name = role_ref.get("name").and_then(Value::as_str).unwrap_or_default();
    let pool: Box<dyn Iterator<Item = &'a Value>> = if kind == "ClusterRole" {
        Box::new(cluster_roles.iter())
    } else {
        Box::new(
            roles
                .iter()
                .filter(move |r| r.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns)),
        )
    };
    pool.filter(|r| r.pointer("/metadata/name").and_then(Value::as_str) == Some(name))
        .flat_map(|r| {
            r.get("rules")
                .and_then(Value::as_array)
                .map(|v| v.iter().collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .collect()
}

/// Whether `user` may do `a`, given every Role, ClusterRole and binding.
pub fn allowed(
    user: &User,
    a: &Attrs<'_>,
    roles: &[Value],
    cluster_roles: &[Value],
    bindings: &[Value],
    cluster_bindings: &[Value],
) -> bool {
    if *user == User::Admin {
        return true;
    }
    for b in cluster_bindings {
        if b.get("subjects")
            .and_then(Value::as_array)
            .is_some_and(|s| s.iter().any(|s| subject_matches(s, user)))
            && role_rules(&b["roleRef"], "", roles, cluster_roles)
                .iter()
                .any(|r| rule_allows(r, a))
        {
            return true;
        }
    }
    if a.namespace.is_empty() {
        return false;
    }
    for b in bindings
        .iter()
        .filter(|b| b.pointer("/metadata/namespace").and_then(Value::as_str) == Some(a.namespace))
    {
        if b.get("subjects")
            .and_then(Value::as_array)
            .is_some_and(|s| s.iter().any(|s| subject_matches(s, user)))
            && role_rules(&b["roleRef"], a.namespace, roles, cluster_roles)
                .iter()
                .any(|r| rule_allows(r, a))
        {
            return true;
        }
    }
    false
}

/// Whether `rule` grants `verb` on the non-resource URL `path`: an entry `*` matches
/// every path, one ending in `*` its prefix, any other the path itself (upstream's
/// `NonResourceURLMatches`).
fn non_resource_rule_allows(rule: &Value, path: &str, verb: &str) -> bool {
    let path_ok = rule
        .get("nonResourceURLs")
        .and_then(Value::as_array)
        .is_some_and(|urls| {
            urls.iter()
                .filter_map(Value::as_str)
                .any(|u| match u.strip_suffix('*') {
                    Some(prefix) => path.starts_with(prefix),
                    None => u == path,
                })
        });
    path_ok && contains(rule.get("verbs"), verb)
}

/// Whether `user` may `verb` the non-resource URL `path` (`/metrics`, `/healthz`): only
/// ClusterRoles bound by ClusterRoleBindings grant those, as in kube-apiserver.
pub fn non_resource_allowed(
    user: &User,
    path: &str,
    verb: &str,
    roles: &[Value],
    cluster_roles: &[Value],
    cluster_bindings: &[Value],
) -> bool {
    if *user == User::Admin {
        return true;
    }
    cluster_bindings.iter().any(|b| {
        b.get("subjects")
            .and_then(Value::as_array)
            .is_some_and(|s| s.iter().any(|s| subject_matches(s, user)))
            && role_rules(&b["roleRef"], "", roles, cluster_roles)
                .iter()
                .any(|r| non_resource_rule_allows(r, path, verb))
    })
}

/// The real server's 403 text.
pub fn denied_message(user: &User, a: &Attrs<'_>) -> String {
    let res = if a.subresource.is_empty() {
        a.resource.to_string()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    let what = if a.name.is_empty() {
        super::status::qualified(a.resource, a.group)
    } else {
        format!("{} \"{}\"", super::status::qualified(a.resource, a.group), a.name)
    };
    let scope = if a.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace \"{}\"", a.namespace)
    };
    format!(
        "{what} is forbidden: User \"{}\" cannot {} resource \"{res}\" in API group \"{}\" {scope}",
        user.name(),
        a.verb,
        a.group
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn role_binding_grants_in_namespace_only() {
        let sa = User::ServiceAccount {
            namespace: "ns1".into(),
            name: "ctl".into(),
        };
        let roles = vec![
            json!({"metadata": {"name": "svc-reader", "namespace": "ns1"}, "rules": [{"apiGroups": [""], "resources": ["services", "services/status"], "verbs": ["get", "list", "watch", "patch"]}]}),
        ];
        let bindings = vec![
            json!({"metadata": {"name": "b", "namespace": "ns1"}, "roleRef": {"kind": "Role", "name": "svc-reader"}, "subjects": [{"kind": "ServiceAccount", "name": "ctl", "namespace": "ns1"}]}),
        ];
        let a = |verb, ns, sub| Attrs {
            verb,
            group: "",
            resource: "services",
            subresource: sub,
            namespace: ns,
            name: "",
        };
        assert!(allowed(&sa, &a("list", "ns1", ""), &roles, &[], &bindings, &[]));
        assert!(allowed(&sa, &a("patch", "ns1", "status"), &roles, &[], &bindings, &[]));
        assert!(!allowed(&sa, &a("delete", "ns1", ""), &roles, &[], &bindings, &[]));
        assert!(!allowed(&sa, &a("list", "ns2", ""), &roles, &[], &bindings, &[]));
        assert!(!allowed(&sa, &a("list", "", ""), &roles, &[], &bindings, &[]));
        assert_eq!(
            denied_message(&sa, &a("delete", "ns1", "")),
            "services is forbidden: User \"system:serviceaccount:ns1:ctl\" cannot delete resource \"services\" in API group \"\" in the namespace \"ns1\""
        );
    }

    #[test]
    fn cluster_binding_and_groups() {
        let sa = User::ServiceAccount {
            namespace: "x".into(),
            name: "y".into(),
        };
        let cr = vec![
            json!({"metadata": {"name": "nodes"}, "rules": [{"apiGroups": ["*"], "resources": ["nodes"], "verbs": ["*"], "resourceNames": ["n1"]}]}),
        ];
        let crb = vec![
            json!({"metadata": {"name": "b"}, "roleRef": {"kind": "ClusterRole", "name": "nodes"}, "subjects": [{"kind": "Group", "name": "system:serviceaccounts:x"}]}),
        ];
        let a = |name| Attrs {
            verb: "get",
            group: "",
            resource: "nodes",
            subresource: "",
            namespace: "",
            name,
        };
        assert!(allowed(&sa, &a("n1"), &[], &cr, &[], &crb));
        assert!(!allowed(&sa, &a("n2"), &[], &cr, &[], &crb));
    }

    #[test]
    fn non_resource_urls_need_a_cluster_role_binding() {
        let scraper = User::ServiceAccount {
            namespace: "mon".into(),
            name: "prometheus".into(),
        };
        let other = User::ServiceAccount {
            namespace: "mon".into(),
            name: "other".into(),
        };
        let cr = vec![
            json!({"metadata": {"name": "metrics-reader"}, "rules": [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]}),
            json!({"metadata": {"name": "debug"}, "rules": [{"nonResourceURLs": ["/debug/*"], "verbs": ["*"]}]}),
        ];
        let crb = vec![
            json!({"metadata": {"name": "b"}, "roleRef": {"kind": "ClusterRole", "name": "metrics-reader"}, "subjects": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": "mon"}]}),
            json!({"metadata": {"name": "d"}, "roleRef": {"kind": "ClusterRole", "name": "debug"}, "subjects": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": "mon"}]}),
        ];
        let may = |u: &User, path, verb| non_resource_allowed(u, path, verb, &[], &cr, &crb);
        assert!(may(&scraper, "/metrics", "get"));
        assert!(!may(&scraper, "/metrics", "post"));
        assert!(!may(&scraper, "/metrics/x", "get"), "no prefix without *");
        assert!(may(&scraper, "/debug/pprof", "post"), "a prefix with *");
        assert!(!may(&other, "/metrics", "get"));
        assert!(may(&User::Admin, "/metrics", "get"));
        // A resource rule grants no URL, a URL rule no resource.
        let a = Attrs {
            verb: "get",
            group: "",
            resource: "metrics",
            subresource: "",
            namespace: "",
            name: "",
        };
        assert!(!allowed(&scraper, &a, &[], &cr, &[], &crb));
    }
}

//! The object store and its semantics: resourceVersions, create/update/patch/delete,
//! finalizers, garbage collection, namespaces, CRD registration, the watch history.
//! Everything here is synchronous and runs under one lock.
//!
//! This module holds the [`Store`] itself, its reads (get, lists, lists at an older
//! resourceVersion, the watch history) and [`Store::commit`], the one place a write lands.
//! The rest is split by what a request does:
//! - [`snapshot`]: the state dir's snapshot and journal ([`snapshot::Persisted`], [`snapshot::JournalEntry`],
//!   [`replay`]);
//! - [`admit`]: defaulting, validation and allocation before any write;
//! - [`write`](mod@write): create, update (PUT), patch (every patch type, server-side apply) and the
//!   subresources;
//! - [`delete`]: deletion, finalizers, owner-reference garbage collection and namespace
//!   termination.

mod admit;
mod delete;
mod snapshot;
mod write;

pub use snapshot::{JournalEntry, replay};

use crate::kube::hooks;
use crate::kube::registry::{self, ResourceType, View};
use crate::kube::selectors::{FieldSelector, LabelSelector, labels_of};
use crate::kube::service_ips::ServiceCidrs;
use crate::kube::status::ApiError;
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use tokio::sync::broadcast;

/// One change, as watches see it.
#[derive(Clone, Debug)]
pub struct Change {
    pub storage: String,
    pub namespace: String,
    /// `ADDED`, `MODIFIED`, `DELETED`; or `ERROR` to end every watch (history compacted).
    pub typ: &'static str,
    pub rv: u64,
    pub object: Value,
    pub old: Option<Value>,
}

/// Options common to writes.
#[derive(Clone, Debug, Default)]
pub struct WriteOpts {
    pub dry_run: bool,
    pub manager: String,
    pub force: bool,
    pub strict: bool,
}

#[derive(Clone, Debug, Default)]
pub struct DeleteOpts {
    pub dry_run: bool,
    /// `Background` (default), `Foreground`, `Orphan`.
    pub propagation: Option<String>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
}

/// Patch kinds by content type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

/// A list request's filters.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl ListFilter {
    pub fn matches(&self, rt: &ResourceType, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && obj
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default()
                != ns
        {
            return false;
        }
        if !self.labels.matches(&labels_of(obj)) {
            return false;
        }
        if rt.view == View::EventsV1 {
            // Field selectors of the events.k8s.io view name `regarding.*`.
            let shown = hooks::event_to_v1(obj);
            return self.fields.matches(&shown);
        }
        self.fields.matches(obj)
    }
}

/// One page of a list: the items, the key to continue after, how many remain.
pub type Page = (Vec<Value>, Option<(String, String)>, usize);

pub struct Store {
    pub rv: u64,
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    pub types: Vec<ResourceType>,
    history: VecDeque<Arc<Change>>,
    history_limit: usize,
    /// The oldest resourceVersion a watch may resume from (the history holds every
    /// change after it); older ones get 410 Gone.
    pub oldest_rv: u64,
    /// ServiceAccount tokens: token → (namespace, name).
    pub tokens: BTreeMap<String, (String, String)>,
    pub service_cidrs: ServiceCidrs,
    pub tx: broadcast::Sender<Arc<Change>>,
    /// Something changed since the last [`Store::take_changes`] or [`Store::persisted`].
    pub dirty: bool,
    /// Objects written since then: (storage, namespace, name).
    written: std::collections::BTreeSet<(String, String, String)>,
    tokens_changed: bool,
}

fn meta_str<'a>(obj: &'a Value, f: &str) -> &'a str {
    obj.get("metadata")
        .and_then(|m| m.get(f))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn strip_status(obj: &mut Value) {
    if let Some(m) = obj.as_object_mut() {
        m.remove("status");
    }
}

/// Sets a namespace's `spec.finalizers` (`None` or empty: none).
fn set_spec_finalizers(ns: &mut Value, finalizers: Option<Value>) {
    match finalizers.filter(|f| f.as_array().is_some_and(|a| !a.is_empty())) {
        Some(f) => ns["spec"]["finalizers"] = f,
        None => {
            if let Some(spec) = ns.get_mut("spec").and_then(Value::as_object_mut) {
                spec.remove("finalizers");
            }
        }
    }
}

impl Store {
    pub fn new(service_cidrs: ServiceCidrs, history_limit: usize) -> Self {
        // Watches that fall further behind catch up from `history`.
        let (tx, _) = broadcast::channel(1024);
        Store {
            rv: 1,
            objects: BTreeMap::new(),
            types: registry::builtins(),
            history: VecDeque::new(),
            history_limit,
            oldest_rv: 1,
            tokens: BTreeMap::new(),
            service_cidrs,
            tx,
            dirty: false,
            written: Default::default(),
            tokens_changed: false,
        }
    }

    /// Creates the objects a new cluster starts with.
    pub fn bootstrap(&mut self) {
        let ns_rt = self.find("", "v1", "namespaces").cloned();
        let Some(ns_rt) = ns_rt else { return };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            if self.get_raw(&ns_rt, "", ns).is_none() {
                let _ = self.create(&ns_rt, None, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}}), &sys_opts());
            }
        }
        if let Some(svc) = self.find("", "v1", "services").cloned()
            && self.get_raw(&svc, "default", "kubernetes").is_none()
        {
            let first = self
                .service_cidrs
                .first_address()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let _ = self.create(
                    &svc,
                    Some("default"),
                    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
                        "spec": {"clusterIP": first, "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}], "sessionAffinity": "None", "type": "ClusterIP"}}),
                    &sys_opts(),
                );
        }
        if let Some(cr) = self.find("rbac.authorization.k8s.io", "v1", "clusterroles").cloned() {
            for (name, rules) in crate::kube::rbac::bootstrap_cluster_roles() {
                if self.get_raw(&cr, "", name).is_none() {
                    let _ = self.create(
                        &cr,
                        None,
                        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}, "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}}, "rules": rules}),
                        &sys_opts(),
                    );
                }
            }
        }
        if let Some(crb) = self
            .find("rbac.authorization.k8s.io", "v1", "clusterrolebindings")
            .cloned()
        {
            for (name, groups) in crate::kube::rbac::BOOTSTRAP_CLUSTER_ROLE_BINDINGS {
                if self.get_raw(&crb, "", name).is_none() {
                    let subjects: Vec<Value> = groups
                        .iter()
                        .map(|g| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": g}))
                        .collect();
                    let _ = self.create(
                        &crb,
                        None,
                        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
                            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                            "subjects": subjects}),
                        &sys_opts(),
                    );
                }
            }
        }
    }

    /// What kube-apiserver's endpoint reconciler keeps: the `kubernetes` Service's target
    /// port and its EndpointSlice pointing at the address the API server serves on, so that
    /// a pod reaches the API through the Service's ClusterIP (`KUBERNETES_SERVICE_HOST`).
    /// An unspecified address is advertised as loopback, where the sandbox's nodes live.
    pub fn advertise_apiserver(&mut self, addr: std::net::SocketAddr) {
        let ip = match addr.ip() {
            std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST,
            std::net::IpAddr::V4(v4) => v4,
            std::net::IpAddr::V6(_) => return,
        };
        let port = addr.port();
        if let Some(svc) = self.find("", "v1", "services").cloned()
            && let Some(old) = self.get_raw(&svc, "default", "kubernetes")
            && old["spec"]["ports"][0]["targetPort"] != json!(port)
        {
            let patch =
                json!({"spec": {"ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}]}});
            let _ = self.patch(
                &svc,
                "default",
                "kubernetes",
                None,
                PatchKind::Merge,
                &patch,
                &sys_opts(),
            );
        }
        let Some(es) = self.find("discovery.k8s.io", "v1", "endpointslices").cloned() else {
            return;
        };
        let want = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kubernetes", "namespace": "default",
                "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true}}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}]});
        match self.get_raw(&es, "default", "kubernetes").cloned() {
            None => {
                let _ = self.create(&es, Some("default"), want, &sys_opts());
            }
            Some(old) if old["endpoints"] != want["endpoints"] || old["ports"] != want["ports"] => {
                let mut body = want;
                body["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
                let _ = self.update(&es, "default", "kubernetes", None, body, &sys_opts());
            }
            Some(_) => {}
        }
    }

    // ---- registry ----

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
    }

    fn register(&mut self, types: Vec<ResourceType>) {
        if let Some(crd) = types.first().and_then(|t| t.crd.clone()) {
            self.types.retain(|t| t.crd.as_deref() != Some(crd.as_str()));
        }
        self.types.extend(types);
    }

    fn unregister(&mut self, crd: &str) {
        self.types.retain(|t| t.crd.as_deref() != Some(crd));
    }

    // ---- reads ----

    fn get_raw(&self, rt: &ResourceType, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&rt.storage)?.get(&(ns.to_string(), name.to_string()))
    }

    /// The object as `rt` shows it.
    pub fn present(&self, rt: &ResourceType, obj: &Value) -> Value {
        let mut o = match rt.view {
            View::EventsV1 => hooks::event_to_v1(obj),
            View::Plain => obj.clone(),
        };
        o["apiVersion"] = json!(rt.api_version());
        o["kind"] = json!(rt.kind);
        o
    }

    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.get_raw(rt, ns, name)
            .map(|o| self.present(rt, o))
            .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))
    }

    /// Objects matching the filter, in (namespace, name) order, starting after `after`.
    pub fn list(&self, rt: &ResourceType, f: &ListFilter, after: Option<&(String, String)>, limit: usize) -> Page {
        let empty = BTreeMap::new();
        let m = self.objects.get(&rt.storage).unwrap_or(&empty);
        self.list_in(m, rt, f, after, limit)
    }

    /// Like `list`, as the objects were at resourceVersion `rv` (rebuilt from the
    /// history: consistent pages, `resourceVersionMatch=Exact`); 410 when the history
    /// no longer reaches back that far.
    pub fn list_at(
        &self,
        rv: u64,
        rt: &ResourceType,
        f: &ListFilter,
        after: Option<&(String, String)>,
        limit: usize,
    ) -> Result<Page, ApiError> {
        if rv >= self.rv {
            return Ok(self.list(rt, f, after, limit));
        }
        if rv < self.oldest_rv {
            return Err(ApiError::gone(format!(
                "too old resource version: {rv} ({})",
                self.oldest_rv
            )));
        }
        let mut m = self.objects.get(&rt.storage).cloned().unwrap_or_default();
        for ch in self.history.iter().rev().take_while(|c| c.rv > rv) {
            if ch.storage != rt.storage {
                continue;
            }
            let key = (
                meta_str(&ch.object, "namespace").to_string(),
                meta_str(&ch.object, "name").to_string(),
            );
            match (ch.typ, &ch.old) {
                ("ADDED", _) => {
                    m.remove(&key);
                }
                (_, Some(old)) => {
                    m.insert(key, old.clone());
                }
                _ => {}
            }
        }
        Ok(self.list_in(&m, rt, f, after, limit))
    }

    fn list_in(
        &self,
        m: &BTreeMap<(String, String), Value>,
        rt: &ResourceType,
        f: &ListFilter,
        after: Option<&(String, String)>,
        limit: usize,
    ) -> Page {
        let mut out = Vec::new();
        let mut next = None;
        let mut remaining = 0;
        for (k, o) in m.iter() {
            if after.is_some_and(|a| k <= a) {
                continue;
            }
            if !f.matches(rt, o) {
                continue;
            }
            if limit > 0 && out.len() >= limit {
                if next.is_none() {
                    next = Some(last_key(&out));
                }
                remaining += 1;
                continue;
            }
            out.push(self.present(rt, o));
        }
        (out, next, remaining)
    }

    /// Every stored object of a storage (for RBAC and the like).
    pub fn all(&self, storage: &str) -> impl Iterator<Item = &Value> {
        self.objects.get(storage).into_iter().flat_map(|m| m.values())
    }

    /// Whether RBAC (the stored Roles, ClusterRoles and bindings) lets `user` do `a`.
    pub fn rbac_allows(&self, user: &crate::kube::rbac::User, a: &crate::kube::rbac::Attrs<'_>) -> bool {
        let collect = |kind: &str| {
            self.all(&format!("rbac.authorization.k8s.io/{kind}"))
                .cloned()
                .collect::<Vec<_>>()
        };
        crate::kube::rbac::allowed(
            user,
            a,
            &collect("roles"),
            &collect("clusterroles"),
            &collect("rolebindings"),
            &collect("clusterrolebindings"),
        )
    }

    /// Whether RBAC lets `user` `verb` the non-resource URL `path`.
    pub fn rbac_allows_path(&self, user: &crate::kube::rbac::User, path: &str, verb: &str) -> bool {
        let collect = |kind: &str| {
            self.all(&format!("rbac.authorization.k8s.io/{kind}"))
                .cloned()
                .collect::<Vec<_>>()
        };
        crate::kube::rbac::non_resource_allowed(
            user,
            path,
            verb,
            &collect("roles"),
            &collect("clusterroles"),
            &collect("clusterrolebindings"),
        )
    }

    /// Changes after `rv` for a watch, or 410 when history no longer reaches back.
    pub fn changes_since(&self, rv: u64) -> Result<Vec<Arc<Change>>, ApiError> {
        if rv < self.oldest_rv {
            return Err(ApiError::gone(format!(
                "too old resource version: {rv} ({})",
                self.oldest_rv
            )));
        }
        Ok(self.history.iter().filter(|c| c.rv > rv).cloned().collect())
    }

    /// Forgets the watch history (as an etcd compaction would) and ends open watches
    /// with a 410 `ERROR` event, so clients must re-list.
    pub fn compact(&mut self) {
        self.history.clear();
        self.oldest_rv = self.rv;
        let _ = self.tx.send(Arc::new(Change {
            storage: String::new(),
            namespace: String::new(),
            typ: "ERROR",
            rv: self.rv,
            object: json!({}),
            old: None,
        }));
    }

    // ---- the write path ----

    fn commit(&mut self, storage: &str, typ: &'static str, mut obj: Value, old: Option<Value>) -> Value {
        self.rv += 1;
        self.dirty = true;
        let rv = self.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = (
            meta_str(&obj, "namespace").to_string(),
            meta_str(&obj, "name").to_string(),
        );
        self.written.insert((storage.to_string(), key.0.clone(), key.1.clone()));
        let m = self.objects.entry(storage.to_string()).or_default();
        if typ == "DELETED" {
            m.remove(&key);
        } else {
            m.insert(key.clone(), obj.clone());
        }
        let change = Arc::new(Change {
            storage: storage.to_string(),
            namespace: key.0,
            typ,
            rv,
            object: obj.clone(),
            old,
        });
        self.history.push_back(change.clone());
        while self.history.len() > self.history_limit {
            if let Some(c) = self.history.pop_front() {
                self.oldest_rv = c.rv;
            }
        }
        let _ = self.tx.send(change);
        obj
    }

    /// Adds a ServiceAccount token.
    pub fn issue_token(&mut self, ns: &str, sa: &str) -> String {
        let t = crate::kube::util::random_token();
        self.tokens.insert(t.clone(), (ns.to_string(), sa.to_string()));
        self.dirty = true;
        self.tokens_changed = true;
        t
    }
}

fn last_key(out: &[Value]) -> (String, String) {
    out.last()
        .map(|o| (meta_str(o, "namespace").to_string(), meta_str(o, "name").to_string()))
        .unwrap_or_default()
}

/// Options for the server's own writes.
pub fn sys_opts() -> WriteOpts {
    WriteOpts {
        manager: "kube-apiserver".into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        let mut s = Store::new("127.96.0.0/16".parse().unwrap(), 100);
        s.bootstrap();
        s
    }

    fn rt(s: &Store, g: &str, p: &str) -> ResourceType {
        s.types.iter().find(|t| t.group == g && t.plural == p).unwrap().clone()
    }

    fn opts() -> WriteOpts {
        WriteOpts {
            manager: "test".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_kubernetes_service_points_at_the_address_the_api_serves_on() {
        let mut s = store();
        let (svc, es) = (rt(&s, "", "services"), rt(&s, "discovery.k8s.io", "endpointslices"));
        s.advertise_apiserver("127.0.0.1:40000".parse().unwrap());
        let service = s.get(&svc, "default", "kubernetes").unwrap();
        assert_eq!(service["spec"]["ports"][0]["targetPort"], 40000);
        assert_eq!(service["spec"]["clusterIP"], "127.96.0.1");
        let slice = s.get(&es, "default", "kubernetes").unwrap();
        assert_eq!(slice["metadata"]["labels"]["kubernetes.io/service-name"], "kubernetes");
        assert_eq!(slice["endpoints"][0]["addresses"], json!(["127.0.0.1"]));
        assert_eq!(
            slice["ports"],
            json!([{"name": "https", "port": 40000, "protocol": "TCP"}])
        );
        // Served again on the same address: nothing is written.
        let rv = slice["metadata"]["resourceVersion"].clone();
        s.advertise_apiserver("127.0.0.1:40000".parse().unwrap());
        assert_eq!(
            s.get(&es, "default", "kubernetes").unwrap()["metadata"]["resourceVersion"],
            rv
        );
        // On every address: advertised on loopback, where the sandbox's nodes are.
        s.advertise_apiserver("0.0.0.0:41000".parse().unwrap());
        let slice = s.get(&es, "default", "kubernetes").unwrap();
        assert_eq!(slice["endpoints"][0]["addresses"], json!(["127.0.0.1"]));
        assert_eq!(slice["ports"][0]["port"], 41000);
        assert_eq!(
            s.get(&svc, "default", "kubernetes").unwrap()["spec"]["ports"][0]["targetPort"],
            41000
        );
    }

    #[test]
    fn bootstrap_objects() {
        let s = store();
        let ns = rt(&s, "", "namespaces");
        for n in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            s.get(&ns, "", n).unwrap();
        }
        let svc = s.get(&rt(&s, "", "services"), "default", "kubernetes").unwrap();
        assert_eq!(svc["spec"]["clusterIP"], "127.96.0.1");
        s.get(&rt(&s, "", "serviceaccounts"), "kube-system", "default").unwrap();
        let roles = rt(&s, "rbac.authorization.k8s.io", "clusterroles");
        for (name, _) in crate::kube::rbac::bootstrap_cluster_roles() {
            s.get(&roles, "", name).unwrap();
        }
        let bindings = rt(&s, "rbac.authorization.k8s.io", "clusterrolebindings");
        for (name, _) in crate::kube::rbac::BOOTSTRAP_CLUSTER_ROLE_BINDINGS {
            s.get(&bindings, "", name).unwrap();
        }
    }

    #[test]
    fn the_edit_role_granted_in_a_namespace_writes_workloads_but_not_rbac() {
        use crate::kube::rbac::{Attrs, User};
        let mut s = store();
        let rb = rt(&s, "rbac.authorization.k8s.io", "rolebindings");
        s.create(
            &rb,
            Some("default"),
            json!({"metadata": {"name": "jane-edit"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "jane"}]}),
            &opts(),
        )
        .unwrap();
        let jane = User::impersonated("jane", vec![]);
        let may = |verb: &str, group: &str, resource: &str, namespace: &str| {
            s.rbac_allows(
                &jane,
                &Attrs {
                    verb,
                    group,
                    resource,
                    subresource: "",
                    namespace,
                    name: "",
                },
            )
        };
        assert!(may("create", "apps", "deployments", "default"));
        assert!(may("delete", "", "services", "default"));
        assert!(may("list", "", "secrets", "default"));
        assert!(
            !may("create", "rbac.authorization.k8s.io", "roles", "default"),
            "edit grants no RBAC"
        );
        assert!(
            !may("create", "apps", "deployments", "kube-system"),
            "only where it is bound"
        );
        assert!(
            may("create", "authorization.k8s.io", "selfsubjectaccessreviews", ""),
            "system:basic-user"
        );
    }

    #[test]
    fn crud_rv_generation_conflict() {
        let mut s = store();
        let cm = rt(&s, "", "configmaps");
        let c = s
            .create(
                &cm,
                Some("default"),
                json!({"metadata": {"name": "a"}, "data": {"k": "v"}}),
                &opts(),
            )
            .unwrap();
        let rv1: u64 = c["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            s.create(&cm, Some("default"), json!({"metadata": {"name": "a"}}), &opts())
                .unwrap_err()
                .code,
            409
        );
        let mut upd = c.clone();
        upd["data"]["k"] = json!("w");
        let u = s.update(&cm, "default", "a", None, upd.clone(), &opts()).unwrap();
        let rv2: u64 = u["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
        assert!(rv2 > rv1);
        let stale = s.update(&cm, "default", "a", None, upd, &opts()).unwrap_err();
        assert_eq!(stale.code, 409);
        assert_eq!(stale.reason, "Conflict");
        let dep = rt(&s, "apps", "deployments");
        let d = s.create(&dep, Some("default"), json!({"metadata": {"name": "d"}, "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}}}}), &opts()).unwrap();
        assert_eq!(d["metadata"]["generation"], 1);
        let p = s
            .patch(
                &dep,
                "default",
                "d",
                None,
                PatchKind::Merge,
                &json!({"metadata": {"labels": {"x": "y"}}}),
                &opts(),
            )
            .unwrap();
        assert_eq!(p["metadata"]["generation"], 1);
        let p = s
            .patch(
                &dep,
                "default",
                "d",
                None,
                PatchKind::Merge,
                &json!({"spec": {"replicas": 3}}),
                &opts(),
            )
            .unwrap();
        assert_eq!(p["metadata"]["generation"], 2);
        let st = s
            .patch(
                &dep,
                "default",
                "d",
                Some("status"),
                PatchKind::Merge,
                &json!({"spec": {"replicas": 9}, "status": {"replicas": 3}}),
                &opts(),
            )
            .unwrap();
        assert_eq!(st["spec"]["replicas"], 3);
        assert_eq!(st["status"]["replicas"], 3);
        let main = s
            .patch(
                &dep,
                "default",
                "d",
                None,
                PatchKind::Merge,
                &json!({"status": {"replicas": 7}}),
                &opts(),
            )
            .unwrap();
        assert_eq!(main["status"]["replicas"], 3);
    }

    #[test]
    fn node_provider_id_is_set_once() {
        let mut s = store();
        let no = rt(&s, "", "nodes");
        s.create(&no, None, json!({"metadata": {"name": "n"}}), &opts())
            .unwrap();
        s.patch(
            &no,
            "",
            "n",
            None,
            PatchKind::Merge,
            &json!({"spec": {"providerID": "cloudraya://1"}}),
            &opts(),
        )
        .unwrap();
        let e = s
            .patch(
                &no,
                "",
                "n",
                None,
                PatchKind::Merge,
                &json!({"spec": {"providerID": "cloudraya://2"}}),
                &opts(),
            )
            .unwrap_err();
        assert_eq!(e.code, 422);
        assert!(e.message.contains("spec.providerID: Forbidden"), "{}", e.message);
    }

    #[test]
    fn lists_at_an_older_resource_version() {
        let mut s = store();
        let cm = rt(&s, "", "configmaps");
        s.create(
            &cm,
            Some("default"),
            json!({"metadata": {"name": "a"}, "data": {"v": "1"}}),
            &opts(),
        )
        .unwrap();
        let rv = s.rv;
        s.patch(
            &cm,
            "default",
            "a",
            None,
            PatchKind::Merge,
            &json!({"data": {"v": "2"}}),
            &opts(),
        )
        .unwrap();
        s.create(&cm, Some("default"), json!({"metadata": {"name": "b"}}), &opts())
            .unwrap();
        s.delete(&cm, "default", "a", &DeleteOpts::default()).unwrap();
        let (then, _, _) = s.list_at(rv, &cm, &ListFilter::default(), None, 0).unwrap();
        assert_eq!(then.len(), 1);
        assert_eq!(then[0]["data"]["v"], "1");
        let (now, _, _) = s.list_at(s.rv, &cm, &ListFilter::default(), None, 0).unwrap();
        assert_eq!(now.len(), 1);
        assert_eq!(now[0]["metadata"]["name"], "b");
        s.compact();
        assert_eq!(
            s.list_at(rv, &cm, &ListFilter::default(), None, 0).unwrap_err().code,
            410
        );
    }

    #[test]
    fn finalizers_hold_deletion() {
        let mut s = store();
        let cm = rt(&s, "", "configmaps");
        s.create(
            &cm,
            Some("default"),
            json!({"metadata": {"name": "f", "finalizers": ["x/y"]}}),
            &opts(),
        )
        .unwrap();
        let (o, gone) = s.delete(&cm, "default", "f", &DeleteOpts::default()).unwrap();
        assert!(!gone);
        assert!(o["metadata"]["deletionTimestamp"].is_string());
        let err = s
            .patch(
                &cm,
                "default",
                "f",
                None,
                PatchKind::Merge,
                &json!({"metadata": {"finalizers": ["x/y", "z"]}}),
                &opts(),
            )
            .unwrap_err();
        assert_eq!(err.code, 422);
        s.patch(
            &cm,
            "default",
            "f",
            None,
            PatchKind::Json,
            &json!([{"op": "remove", "path": "/metadata/finalizers/0"}]),
            &opts(),
        )
        .unwrap();
        assert_eq!(s.get(&cm, "default", "f").unwrap_err().code, 404);
    }

    #[test]
    fn owner_references_cascade_and_namespace_deletion() {
        let mut s = store();
        let ns = rt(&s, "", "namespaces");
        s.create(&ns, None, json!({"metadata": {"name": "tmp"}}), &opts())
            .unwrap();
        s.get(&rt(&s, "", "serviceaccounts"), "tmp", "default").unwrap();
        let cm = rt(&s, "", "configmaps");
        let owner = s
            .create(&cm, Some("tmp"), json!({"metadata": {"name": "owner"}}), &opts())
            .unwrap();
        let uid = owner["metadata"]["uid"].as_str().unwrap();
        s.create(&cm, Some("tmp"), json!({"metadata": {"name": "child", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]}}), &opts()).unwrap();
        s.delete(&cm, "tmp", "owner", &DeleteOpts::default()).unwrap();
        assert_eq!(s.get(&cm, "tmp", "child").unwrap_err().code, 404);
        s.create(
            &cm,
            Some("tmp"),
            json!({"metadata": {"name": "held", "finalizers": ["a/b"]}}),
            &opts(),
        )
        .unwrap();
        let (n, gone) = s.delete(&ns, "", "tmp", &DeleteOpts::default()).unwrap();
        assert!(!gone);
        assert_eq!(n["status"]["phase"], "Terminating");
        assert_eq!(
            s.create(&cm, Some("tmp"), json!({"metadata": {"name": "new"}}), &opts())
                .unwrap_err()
                .code,
            403
        );
        s.patch(
            &cm,
            "tmp",
            "held",
            None,
            PatchKind::Merge,
            &json!({"metadata": {"finalizers": null}}),
            &opts(),
        )
        .unwrap();
        assert_eq!(s.get(&ns, "", "tmp").unwrap_err().code, 404);
    }

    /// As kube-apiserver with its namespace controller: a terminating namespace whose
    /// content is gone loses the controller's own `kubernetes` finalizer, but stays while
    /// another `spec.finalizers` entry is left; those change only through
    /// `namespaces/finalize`, and once the last goes the namespace is removed.
    #[test]
    fn a_namespace_waits_for_every_spec_finalizer() {
        let mut s = store();
        let ns = rt(&s, "", "namespaces");
        let created = s
            .create(&ns, None, json!({"metadata": {"name": "fin"}}), &opts())
            .unwrap();
        assert_eq!(created["spec"]["finalizers"], json!(["kubernetes"]));
        let finalize = |s: &mut Store, finalizers: Value| {
            s.update(
                &ns,
                "",
                "fin",
                Some("finalize"),
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "fin"}, "spec": {"finalizers": finalizers}}),
                &opts(),
            )
        };
        finalize(&mut s, json!(["kubernetes", "example.com/keep"])).unwrap();
        // A plain update does not touch them.
        let mut plain = s.get(&ns, "", "fin").unwrap();
        plain["spec"]["finalizers"] = json!([]);
        plain["metadata"]["labels"] = json!({"a": "b"});
        let updated = s.update(&ns, "", "fin", None, plain, &opts()).unwrap();
        assert_eq!(updated["spec"]["finalizers"], json!(["kubernetes", "example.com/keep"]));

        let cm = rt(&s, "", "configmaps");
        s.create(
            &cm,
            Some("fin"),
            json!({"metadata": {"name": "held", "finalizers": ["a/b"]}}),
            &opts(),
        )
        .unwrap();
        let (n, gone) = s.delete(&ns, "", "fin", &DeleteOpts::default()).unwrap();
        assert!(!gone);
        assert_eq!(n["status"]["phase"], "Terminating");
        assert_eq!(
            n["spec"]["finalizers"],
            json!(["kubernetes", "example.com/keep"]),
            "content left"
        );
        s.patch(
            &cm,
            "fin",
            "held",
            None,
            PatchKind::Merge,
            &json!({"metadata": {"finalizers": null}}),
            &opts(),
        )
        .unwrap();
        let left = s.get(&ns, "", "fin").unwrap();
        assert_eq!(left["spec"]["finalizers"], json!(["example.com/keep"]));
        assert_eq!(left["status"]["phase"], "Terminating");
        finalize(&mut s, json!([])).unwrap();
        assert_eq!(s.get(&ns, "", "fin").unwrap_err().code, 404);
    }

    #[test]
    fn history_and_compaction() {
        let mut s = store();
        let rv = s.rv;
        let cm = rt(&s, "", "configmaps");
        s.create(&cm, Some("default"), json!({"metadata": {"name": "h"}}), &opts())
            .unwrap();
        assert_eq!(s.changes_since(rv).unwrap().len(), 1);
        s.compact();
        assert_eq!(s.changes_since(rv).unwrap_err().code, 410);
        assert!(s.changes_since(s.rv).unwrap().is_empty());
    }

    #[test]
    fn persistence_roundtrip() {
        let mut s = store();
        let cm = rt(&s, "", "configmaps");
        s.create(&cm, Some("default"), json!({"metadata": {"name": "p"}}), &opts())
            .unwrap();
        let snap = s.snapshot();
        let mut t = Store::new("127.96.0.0/16".parse().unwrap(), 100);
        t.restore(&snap).unwrap();
        assert_eq!(t.rv, s.rv);
        t.get(&cm, "default", "p").unwrap();
        t.create(&cm, Some("default"), json!({"metadata": {"name": "q"}}), &opts())
            .unwrap();
        assert!(t.rv > s.rv);
    }

    /// A snapshot plus the journal entries after it restore the latest state: objects
    /// written, objects deleted, tokens; entries the snapshot already holds are skipped.
    #[test]
    fn journal_replays_onto_the_snapshot() {
        let mut s = store();
        let cm = rt(&s, "", "configmaps");
        for n in ["a", "b", "c"] {
            s.create(&cm, Some("default"), json!({"metadata": {"name": n}}), &opts())
                .unwrap();
        }
        let snap = serde_json::to_vec(&s.take_all(1)).unwrap();
        let old = s.take_changes(1);
        assert!(old.is_none(), "a snapshot takes the pending changes too");
        s.delete(&cm, "default", "a", &DeleteOpts::default()).unwrap();
        s.patch(
            &cm,
            "default",
            "b",
            None,
            PatchKind::Merge,
            &json!({"data": {"k": "v"}}),
            &opts(),
        )
        .unwrap();
        let tok = s.issue_token("default", "sa");
        let e2 = s.take_changes(2).unwrap();
        assert_eq!(e2.objects.len(), 2, "only the objects written");
        assert!(s.take_changes(3).is_none());
        s.create(&cm, Some("default"), json!({"metadata": {"name": "d"}}), &opts())
            .unwrap();
        let e3 = s.take_changes(3).unwrap();
        let stale = JournalEntry {
            seq: 1,
            ..Default::default()
        };
        let data = replay(&snap, &[stale, e2, e3]).unwrap();
        let mut t = Store::new("127.96.0.0/16".parse().unwrap(), 100);
        t.restore(&data).unwrap();
        assert_eq!(t.rv, s.rv);
        assert!(t.get(&cm, "default", "a").is_err());
        assert_eq!(t.get(&cm, "default", "b").unwrap()["data"]["k"], "v");
        t.get(&cm, "default", "c").unwrap();
        t.get(&cm, "default", "d").unwrap();
        assert!(t.tokens.contains_key(&tok));
    }

    #[test]
    fn crd_registers_and_validates() {
        let mut s = store();
        let crd = rt(&s, "apiextensions.k8s.io", "customresourcedefinitions");
        let c = s.create(&crd, None, json!({"metadata": {"name": "widgets.example.com"}, "spec": {"group": "example.com", "scope": "Namespaced",
            "names": {"plural": "widgets", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
              "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {"type": "object", "properties": {"size": {"type": "integer", "maximum": 5}}}}}}}]}}), &opts()).unwrap();
        assert_eq!(c["status"]["conditions"][1]["type"], "Established");
        let w = s.find("example.com", "v1", "widgets").unwrap().clone();
        s.create(
            &w,
            Some("default"),
            json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 3}}),
            &opts(),
        )
        .unwrap();
        let e = s.create(&w, Some("default"), json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "x"}, "spec": {"size": 9}}), &opts()).unwrap_err();
        assert_eq!(e.code, 422);
        assert!(
            e.message.starts_with("Widget.example.com \"x\" is invalid: spec.size"),
            "{}",
            e.message
        );
        s.delete(&crd, "", "widgets.example.com", &DeleteOpts::default())
            .unwrap();
        assert!(s.find("example.com", "v1", "widgets").is_none());
    }

    #[test]
    fn server_side_apply_creates_and_conflicts() {
        let mut s = store();
        let cm = rt(&s, "", "configmaps");
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"a": "1"}});
        let o = s
            .patch(
                &cm,
                "default",
                "ssa",
                None,
                PatchKind::Apply,
                &body,
                &WriteOpts {
                    manager: "m1".into(),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(o["data"]["a"], "1");
        assert_eq!(o["metadata"]["managedFields"][0]["manager"], "m1");
        let body2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"a": "2"}});
        let e = s
            .patch(
                &cm,
                "default",
                "ssa",
                None,
                PatchKind::Apply,
                &body2,
                &WriteOpts {
                    manager: "m2".into(),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!(e.code, 409);
        let o = s
            .patch(
                &cm,
                "default",
                "ssa",
                None,
                PatchKind::Apply,
                &body2,
                &WriteOpts {
                    manager: "m2".into(),
                    force: true,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(o["data"]["a"], "2");
    }
}

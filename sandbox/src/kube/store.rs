//! The object store and its semantics: resourceVersions, create/update/patch/delete,
//! finalizers, garbage collection, namespaces, CRD registration, the watch history.
//! Everything here is synchronous and runs under one lock.

use super::fields;
use super::hooks::{self, InUse};
use super::omitempty;
use super::patch;
use super::registry::{self, ResourceType, View};
use super::schema;
use super::selectors::{FieldSelector, LabelSelector, labels_of};
use super::status::{ApiError, Cause};
use super::util::{new_uid, now_rfc3339, random_suffix};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
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

#[derive(Serialize, Deserialize, Default)]
pub struct Persisted {
    rv: u64,
    objects: Vec<(String, Value)>,
    tokens: BTreeMap<String, (String, String)>,
    /// The last journal entry this snapshot includes (entries up to it are skipped on replay).
    #[serde(default)]
    pub seq: u64,
}

/// The changes since the last write to the state dir: the current version of every
/// object written since (`None`: deleted), and the tokens when they changed.
#[derive(Serialize, Deserialize, Default)]
pub struct JournalEntry {
    pub seq: u64,
    rv: u64,
    objects: Vec<(String, String, String, Option<Value>)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tokens: Option<BTreeMap<String, (String, String)>>,
}

/// Replays journal entries onto a snapshot (those after its `seq`, in order).
pub fn replay(snapshot: &[u8], entries: &[JournalEntry]) -> Result<Vec<u8>, String> {
    let mut p: Persisted = if snapshot.is_empty() {
        Persisted::default()
    } else {
        serde_json::from_slice(snapshot).map_err(|e| e.to_string())?
    };
    let mut objects: BTreeMap<(String, String, String), Value> = std::mem::take(&mut p.objects)
        .into_iter()
        .map(|(storage, o)| {
            let k = (
                storage,
                meta_str(&o, "namespace").to_string(),
                meta_str(&o, "name").to_string(),
            );
            (k, o)
        })
        .collect();
    let after = p.seq;
    for e in entries.iter().filter(|e| e.seq > after) {
        p.seq = e.seq;
        p.rv = p.rv.max(e.rv);
        for (storage, ns, name, obj) in &e.objects {
            let k = (storage.clone(), ns.clone(), name.clone());
            match obj {
                Some(o) => objects.insert(k, o.clone()),
                None => objects.remove(&k),
            };
        }
        if let Some(t) = &e.tokens {
            p.tokens = t.clone();
        }
    }
    p.objects = objects.into_iter().map(|((storage, _, _), o)| (storage, o)).collect();
    serde_json::to_vec(&p).map_err(|e| e.to_string())
}

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
    pub service_cidr: Ipv4Net,
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

/// The spec-ish content whose change bumps `generation` (all but metadata and status).
fn generation_content(obj: &Value, has_status: bool) -> Value {
    let mut c = obj.clone();
    if let Some(m) = c.as_object_mut() {
        m.remove("metadata");
        m.remove("apiVersion");
        m.remove("kind");
        if has_status {
            m.remove("status");
        }
    }
    c
}

impl Store {
    pub fn new(service_cidr: Ipv4Net, history_limit: usize) -> Self {
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
            service_cidr,
            tx,
            dirty: false,
            written: Default::default(),
            tokens_changed: false,
        }
    }

    /// Serialized state for the state dir.
    #[cfg(test)]
    pub fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&self.persisted(0)).unwrap_or_default()
    }

    /// A copy of the whole state (O(objects): for compaction and shutdown, not per write),
    /// marked as including journal entries up to `seq`; clears the pending changes.
    pub fn take_all(&mut self, seq: u64) -> Persisted {
        self.dirty = false;
        self.written.clear();
        self.tokens_changed = false;
        self.persisted(seq)
    }

    fn persisted(&self, seq: u64) -> Persisted {
        Persisted {
            rv: self.rv,
            objects: self
                .objects
                .iter()
                .flat_map(|(s, m)| m.values().map(move |o| (s.clone(), o.clone())))
                .collect(),
            tokens: self.tokens.clone(),
            seq,
        }
    }

    /// The changes since the last call (O(objects written)), as journal entry `seq`;
    /// `None` when nothing changed.
    pub fn take_changes(&mut self, seq: u64) -> Option<JournalEntry> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        let objects = std::mem::take(&mut self.written)
            .into_iter()
            .map(|(storage, ns, name)| {
                let obj = self
                    .objects
                    .get(&storage)
                    .and_then(|m| m.get(&(ns.clone(), name.clone())))
                    .cloned();
                (storage, ns, name, obj)
            })
            .collect();
        let tokens = std::mem::take(&mut self.tokens_changed).then(|| self.tokens.clone());
        Some(JournalEntry {
            seq,
            rv: self.rv,
            objects,
            tokens,
        })
    }

    /// Restores a snapshot; watches may resume only from its resourceVersion on.
    /// Loads a snapshot (or a replay's result); returns the last journal entry it includes.
    pub fn restore(&mut self, data: &[u8]) -> Result<u64, String> {
        let p: Persisted = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        self.rv = p.rv;
        self.oldest_rv = p.rv;
        self.tokens = p.tokens;
        for (storage, obj) in p.objects {
            let key = (
                meta_str(&obj, "namespace").to_string(),
                meta_str(&obj, "name").to_string(),
            );
            if storage == "apiextensions.k8s.io/customresourcedefinitions"
                && let Ok(types) = registry::from_crd(&obj)
            {
                self.register(types);
            }
            self.objects.entry(storage).or_default().insert(key, obj);
        }
        Ok(p.seq)
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
                .service_cidr
                .hosts()
                .next()
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
            for (name, rules) in super::rbac::bootstrap_cluster_roles() {
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
            for (name, groups) in super::rbac::BOOTSTRAP_CLUSTER_ROLE_BINDINGS {
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
    pub fn rbac_allows(&self, user: &super::rbac::User, a: &super::rbac::Attrs<'_>) -> bool {
        let collect = |kind: &str| {
            self.all(&format!("rbac.authorization.k8s.io/{kind}"))
                .cloned()
                .collect::<Vec<_>>()
        };
        super::rbac::allowed(
            user,
            a,
            &collect("roles"),
            &collect("clusterroles"),
            &collect("rolebindings"),
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

    fn in_use_except(&self, ns: &str, name: &str) -> InUse {
        let mut u = InUse::default();
        if let Some(m) = self.objects.get("core/services") {
            for ((n, nm), svc) in m {
                if !(n == ns && nm == name) {
                    hooks::service_holds(svc, &mut u);
                }
            }
        }
        u
    }

    /// Defaulting, validation and allocation for a new or changed object.
    fn admit(&self, rt: &ResourceType, old: Option<&Value>, obj: &mut Value, opts: &WriteOpts) -> Result<(), ApiError> {
        let name = meta_str(obj, "name").to_string();
        hooks::normalize(rt, obj);
        let mut causes = hooks::validate_meta(rt, obj);
        if old.is_none() {
            causes.extend(hooks::defaults(rt, obj));
        }
        if rt.storage == "core/services" {
            let ns = meta_str(obj, "namespace").to_string();
            let in_use = self.in_use_except(&ns, &name);
            if let Err(c) = hooks::service(old, obj, self.service_cidr, &in_use) {
                causes.extend(c);
            }
        }
        if rt.storage == "core/events" {
            causes.extend(hooks::event(obj, old, rt.view == View::EventsV1));
        }
        if rt.storage == "apiextensions.k8s.io/customresourcedefinitions" {
            if let Err(c) = registry::from_crd(obj) {
                causes.extend(c);
            }
            if let Some(o) = old
                && o.pointer("/spec/group") != obj.pointer("/spec/group")
            {
                causes.push(Cause::invalid(
                    "spec.group",
                    obj.pointer("/spec/group").unwrap_or(&Value::Null),
                    "field is immutable",
                ));
            }
        }
        if let Some(s) = &rt.schema {
            let checked = schema::check(s, obj);
            if opts.strict && !checked.pruned.is_empty() {
                let list: Vec<String> = checked
                    .pruned
                    .iter()
                    .map(|p| format!("unknown field \"{p}\""))
                    .collect();
                return Err(ApiError::bad_request(format!(
                    "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
                    list.join(", "),
                    kind = rt.kind,
                    version = rt.version,
                )));
            }
            causes.extend(checked.causes);
        }
        if let Some(o) = old
            && rt.storage == "core/nodes"
        {
            let was = o
                .pointer("/spec/providerID")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let now = obj
                .pointer("/spec/providerID")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !was.is_empty() && was != now {
                causes.push(Cause::forbidden(
                    "spec.providerID",
                    "node updates may not change providerID except from \"\" to valid",
                ));
            }
        }
        if let Some(o) = old
            && (rt.storage == "core/secrets" || rt.storage == "core/configmaps")
            && o.get("immutable") == Some(&json!(true))
            && (o.get("data") != obj.get("data") || o.get("binaryData") != obj.get("binaryData"))
        {
            causes.push(Cause::forbidden("data", "field is immutable when `immutable` is set"));
        }
        if causes.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(&rt.kind, &rt.group, &name, causes))
        }
    }

    fn check_kind(rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the object provided is not a JSON or YAML object",
            ));
        }
        if let Some(av) = obj.get("apiVersion").and_then(Value::as_str)
            && av != rt.api_version()
        {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                rt.api_version()
            )));
        }
        if let Some(k) = obj.get("kind").and_then(Value::as_str)
            && k != rt.kind
        {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                rt.kind
            )));
        }
        if obj.get("metadata").is_some_and(|m| !m.is_object() && !m.is_null()) {
            return Err(ApiError::bad_request("metadata must be an object"));
        }
        Ok(())
    }

    /// Input from `rt`'s view to the stored form.
    fn to_storage(rt: &ResourceType, obj: Value) -> Value {
        match rt.view {
            View::EventsV1 => hooks::event_from_v1(&obj),
            View::Plain => obj,
        }
    }

    fn namespace_check(&self, rt: &ResourceType, ns: &str) -> Result<(), ApiError> {
        if !rt.namespaced {
            return Ok(());
        }
        match self
            .objects
            .get("core/namespaces")
            .and_then(|m| m.get(&(String::new(), ns.to_string())))
        {
            None => Err(ApiError::not_found("", "namespaces", ns)),
            Some(n) if n.pointer("/metadata/deletionTimestamp").is_some() => Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    rt.plural, ""
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    pub fn create(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        body: Value,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        Self::check_kind(rt, &body)?;
        let mut obj = Self::to_storage(rt, body);
        if !obj.get("metadata").is_some_and(Value::is_object) {
            obj["metadata"] = json!({});
        }
        let body_ns = meta_str(&obj, "namespace").to_string();
        let ns = if rt.namespaced {
            let ns = ns.unwrap_or_default().to_string();
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            obj["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("namespace");
            }
            String::new()
        };
        if meta_str(&obj, "name").is_empty() {
            let gen_name = meta_str(&obj, "generateName").to_string();
            if !gen_name.is_empty() {
                obj["metadata"]["name"] = json!(format!("{gen_name}{}", random_suffix()));
            }
        }
        let name = meta_str(&obj, "name").to_string();
        if let Err(e) = self.namespace_check(rt, &ns) {
            if e.code == 403 {
                return Err(ApiError::forbidden(format!(
                    "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    super::status::qualified(&rt.plural, &rt.group)
                )));
            }
            return Err(e);
        }
        if rt.has_status() && rt.plural != "nodes" && rt.plural != "pods" && rt.plural != "namespaces" {
            strip_status(&mut obj);
        }
        {
            let m = obj["metadata"]
                .as_object_mut()
                .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
            for k in [
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "managedFields",
                "selfLink",
            ] {
                m.remove(k);
            }
        }
        if rt.crd.is_none() {
            omitempty::normalize(&rt.storage, &mut obj);
        }
        self.admit(rt, None, &mut obj, opts)?;
        if self.get_raw(rt, &ns, &name).is_some() {
            return Err(ApiError::already_exists(&rt.group, &rt.plural, &name));
        }
        obj["metadata"]["uid"] = json!(new_uid());
        obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
        if rt.has_status() || rt.crd.is_some() || rt.plural == "deployments" {
            obj["metadata"]["generation"] = json!(1);
        }
        if rt.storage == "apiextensions.k8s.io/customresourcedefinitions" {
            hooks::crd_status(&mut obj);
        }
        fields::record_update(None, &mut obj, &opts.manager, &rt.api_version(), "");
        if opts.dry_run {
            return Ok(self.present(rt, &obj));
        }
        let stored = self.commit(&rt.storage, "ADDED", obj, None);
        self.after_write(rt, &stored);
        Ok(self.present(rt, &stored))
    }

    /// Server-side effects of a stored write.
    fn after_write(&mut self, rt: &ResourceType, obj: &Value) {
        match rt.storage.as_str() {
            "core/namespaces" if obj.pointer("/metadata/deletionTimestamp").is_none() => {
                let ns = meta_str(obj, "name").to_string();
                if let Some(sa) = self.find("", "v1", "serviceaccounts").cloned()
                    && self.get_raw(&sa, &ns, "default").is_none()
                {
                    let _ = self.create(&sa, Some(&ns), json!({"metadata": {"name": "default"}}), &sys_opts());
                }
            }
            "apiextensions.k8s.io/customresourcedefinitions" => {
                if obj.pointer("/metadata/deletionTimestamp").is_none()
                    && let Ok(types) = registry::from_crd(obj)
                {
                    self.register(types);
                }
            }
            _ => {}
        }
    }

    /// PUT (subresource None, `status` or `scale`).
    pub fn update(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        sub: Option<&str>,
        body: Value,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        Self::check_kind(rt, &body)?;
        let mut obj = Self::to_storage(rt, body);
        let Some(old) = self.get_raw(rt, ns, name).cloned() else {
            let create_on_update = matches!(
                rt.storage.as_str(),
                "core/endpoints" | "coordination.k8s.io/leases" | "core/events"
            );
            if create_on_update && sub.is_none() {
                return self.create(rt, (!ns.is_empty()).then_some(ns), obj, opts);
            }
            return Err(ApiError::not_found(&rt.group, &rt.plural, name));
        };
        let body_name = meta_str(&obj, "name");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let rv = meta_str(&obj, "resourceVersion").to_string();
        if !rv.is_empty() && rv != meta_str(&old, "resourceVersion") {
            return Err(ApiError::stale(&rt.group, &rt.plural, name));
        }
        let new = match sub {
            Some(sub) => subresource_write(rt, sub, &old, &obj)?,
            None => {
                if !obj.get("metadata").is_some_and(Value::is_object) {
                    obj["metadata"] = json!({});
                }
                if rt.has_status() {
                    match old.get("status") {
                        Some(s) => obj["status"] = s.clone(),
                        None => strip_status(&mut obj),
                    }
                }
                obj
            }
        };
        self.store_update(rt, &old, new, sub.unwrap_or_default(), opts)
    }

    /// Common tail of update and patch: carries immutable metadata, admits, bumps
    /// generation, handles finalizers.
    fn store_update(
        &mut self,
        rt: &ResourceType,
        old: &Value,
        mut new: Value,
        sub: &str,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        let name = meta_str(old, "name").to_string();
        for k in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "namespace",
            "name",
            "generation",
        ] {
            match old["metadata"].get(k) {
                Some(v) => new["metadata"][k] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(k);
                    }
                }
            }
        }
        new["apiVersion"] = old.get("apiVersion").cloned().unwrap_or(json!(rt.api_version()));
        new["kind"] = json!(rt.kind);
        if rt.view == View::EventsV1 {
            new["apiVersion"] = json!("v1");
        }
        if old.pointer("/metadata/deletionTimestamp").is_some() {
            let old_f: Vec<Value> = old
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let new_f: Vec<Value> = new
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if new_f.iter().any(|f| !old_f.contains(f)) {
                return Err(ApiError::invalid(
                    &rt.kind,
                    &rt.group,
                    &name,
                    vec![Cause::forbidden(
                        "metadata.finalizers",
                        "no new finalizers can be added if the object is being deleted",
                    )],
                ));
            }
        }
        if rt.storage == "core/namespaces" && sub != "finalize" {
            // Only `finalize` changes them (kube-apiserver's namespace strategy).
            set_spec_finalizers(&mut new, old.pointer("/spec/finalizers").cloned());
        }
        // Every route (update, each patch type, apply, a subresource) ends here.
        if rt.crd.is_none() {
            omitempty::normalize(&rt.storage, &mut new);
        }
        if sub.is_empty() {
            self.admit(rt, Some(old), &mut new, opts)?;
        }
        let gen_old = generation_content(old, rt.has_status());
        let gen_new = generation_content(&new, rt.has_status());
        if let Some(g) = old.pointer("/metadata/generation").and_then(Value::as_i64)
            && gen_old != gen_new
        {
            new["metadata"]["generation"] = json!(g + 1);
        }
        if rt.storage == "apiextensions.k8s.io/customresourcedefinitions" && sub.is_empty() {
            hooks::crd_status(&mut new);
        }
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        fields::record_update(Some(old), &mut new, &opts.manager, &rt.api_version(), sub);
        if new == *old {
            return Ok(self.present(rt, old));
        }
        if opts.dry_run {
            return Ok(self.present(rt, &new));
        }
        let stored = self.commit(&rt.storage, "MODIFIED", new, Some(old.clone()));
        self.after_write(rt, &stored);
        let result = self.present(rt, &stored);
        self.finish_if_done(&rt.storage, &stored);
        Ok(result)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        sub: Option<&str>,
        kind: PatchKind,
        body: &Value,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        let old = self.get_raw(rt, ns, name).cloned();
        if kind == PatchKind::Apply {
            Self::check_kind(rt, body)?;
            if body.get("apiVersion").is_none() || body.get("kind").is_none() {
                return Err(ApiError::bad_request("invalid object type: /, Kind="));
            }
            let body_name = meta_str(body, "name");
            if !body_name.is_empty() && body_name != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({name})"
                )));
            }
            if opts.manager.is_empty() {
                return Err(ApiError::bad_request(
                    "PATCH, application/apply-patch+yaml: fieldManager is required for apply requests",
                ));
            }
            let config = Self::to_storage(rt, body.clone());
            if old.is_none() && sub.is_some() {
                return Err(ApiError::not_found(&rt.group, &rt.plural, name));
            }
            let Some(old) = old else {
                let merged = fields::apply(None, &config, &opts.manager, opts.force, &rt.api_version(), "")?;
                let mut o = merged;
                o["metadata"]["name"] = json!(name);
                let managed = o["metadata"]["managedFields"].clone();
                let mut created = self.create(
                    rt,
                    (!ns.is_empty()).then_some(ns),
                    o,
                    &WriteOpts {
                        manager: String::new(),
                        ..opts.clone()
                    },
                )?;
                // The applier owns what it applied.
                if !opts.dry_run {
                    let mut stored = self.get_raw(rt, ns, name).cloned().unwrap_or_default();
                    stored["metadata"]["managedFields"] = managed.clone();
                    let key = (ns.to_string(), name.to_string());
                    if let Some(m) = self.objects.get_mut(&rt.storage) {
                        m.insert(key, stored);
                    }
                }
                created["metadata"]["managedFields"] = managed;
                return Ok(created);
            };
            let mut merged = fields::apply(
                Some(&old),
                &config,
                &opts.manager,
                opts.force,
                &rt.api_version(),
                sub.unwrap_or_default(),
            )?;
            if rt.has_status() && sub.is_none() {
                match old.get("status") {
                    Some(s) => merged["status"] = s.clone(),
                    None => strip_status(&mut merged),
                }
            }
            if sub == Some("status") {
                // The status subresource takes only status from the applied config.
                let mut only_status = old.clone();
                match merged.get("status") {
                    Some(s) => only_status["status"] = s.clone(),
                    None => strip_status(&mut only_status),
                }
                only_status["metadata"]["managedFields"] = merged["metadata"]["managedFields"].clone();
                merged = only_status;
            }
            let managed = merged["metadata"]["managedFields"].clone();
            let mut o = self.store_update(
                rt,
                &old,
                merged,
                sub.unwrap_or_default(),
                &WriteOpts {
                    manager: opts.manager.clone(),
                    ..opts.clone()
                },
            )?;
            // Keep the apply ownership computed above rather than an Update entry.
            if !opts.dry_run {
                let key = (ns.to_string(), name.to_string());
                if let Some(stored) = self.objects.get_mut(&rt.storage).and_then(|m| m.get_mut(&key)) {
                    stored["metadata"]["managedFields"] = managed.clone();
                }
            }
            o["metadata"]["managedFields"] = managed;
            return Ok(o);
        }
        let Some(old) = old else {
            return Err(ApiError::not_found(&rt.group, &rt.plural, name));
        };
        let shown = self.present(rt, &old);
        let patched = match kind {
            PatchKind::Json => patch::json_patch(&shown, body).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {e}"),
                )
            })?,
            PatchKind::Merge => {
                if !body.is_object() {
                    return Err(ApiError::bad_request(
                        "json: cannot unmarshal into Go value of type map[string]interface {}",
                    ));
                }
                patch::merge_patch(&shown, body)
            }
            PatchKind::Strategic => {
                if rt.crd.is_some() {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                    ));
                }
                if !body.is_object() {
                    return Err(ApiError::bad_request(
                        "json: cannot unmarshal into Go value of type map[string]interface {}",
                    ));
                }
                patch::strategic_merge(&shown, body).map_err(ApiError::bad_request)?
            }
            // Handled above; kept total so no input can reach a panic.
            PatchKind::Apply => return Err(ApiError::internal("apply patch took the wrong path")),
        };
        if !patched.is_object() {
            return Err(ApiError::bad_request("the patched object is not an object"));
        }
        let rv = meta_str(&patched, "resourceVersion");
        if !rv.is_empty() && rv != meta_str(&old, "resourceVersion") {
            return Err(ApiError::stale(&rt.group, &rt.plural, name));
        }
        let mut new = Self::to_storage(rt, patched);
        if !new.get("metadata").is_some_and(Value::is_object) {
            new["metadata"] = json!({});
        }
        match sub {
            Some(sub) => new = subresource_write(rt, sub, &old, &new)?,
            None if rt.has_status() => match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => strip_status(&mut new),
            },
            None => {}
        }
        self.store_update(rt, &old, new, sub.unwrap_or_default(), opts)
    }

    /// DELETE: marks for deletion while finalizers remain, else removes and cascades.
    /// Returns the object and whether it is gone.
    pub fn delete(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<(Value, bool), ApiError> {
        let Some(old) = self.get_raw(rt, ns, name).cloned() else {
            return Err(ApiError::not_found(&rt.group, &rt.plural, name));
        };
        if let Some(uid) = &opts.precondition_uid
            && uid != meta_str(&old, "uid")
        {
            return Err(ApiError::conflict(
                &rt.group,
                &rt.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&old, "uid")
                ),
            ));
        }
        if let Some(rv) = &opts.precondition_rv
            && rv != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(
                &rt.group,
                &rt.plural,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta_str(&old, "resourceVersion")
                ),
            ));
        }
        if opts.dry_run {
            return Ok((self.present(rt, &old), true));
        }
        let mut finalizers: Vec<Value> = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        match opts.propagation.as_deref() {
            Some("Orphan") if !finalizers.contains(&json!("orphan")) => finalizers.push(json!("orphan")),
            Some("Foreground") if !finalizers.contains(&json!("foregroundDeletion")) => {
                finalizers.push(json!("foregroundDeletion"))
            }
            _ => {}
        }
        let is_ns = rt.storage == "core/namespaces";
        if finalizers.is_empty() && !is_ns {
            let gone = self.remove(&rt.storage, &old);
            return Ok((self.present(rt, &gone), true));
        }
        if old.pointer("/metadata/deletionTimestamp").is_some() {
            return Ok((self.present(rt, &old), false));
        }
        let mut marked = old.clone();
        marked["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
        marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        // As the real server does, graceful deletion bumps generation where there is one.
        if let Some(g) = marked.pointer("/metadata/generation").and_then(Value::as_i64) {
            marked["metadata"]["generation"] = json!(g + 1);
        }
        marked["metadata"]["finalizers"] = Value::Array(finalizers);
        if is_ns {
            marked["status"] = json!({"phase": "Terminating"});
        }
        let stored = self.commit(&rt.storage, "MODIFIED", marked, Some(old));
        if is_ns {
            self.sweep_namespace(name);
        }
        self.finish_if_done(&rt.storage, &stored);
        let now = self
            .objects
            .get(&rt.storage)
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .cloned();
        Ok(match now {
            Some(o) => (self.present(rt, &o), false),
            None => (self.present(rt, &stored), true),
        })
    }

    /// Removes an object for good, then cascades to its dependents.
    fn remove(&mut self, storage: &str, obj: &Value) -> Value {
        let gone = self.commit(storage, "DELETED", obj.clone(), Some(obj.clone()));
        if storage == "apiextensions.k8s.io/customresourcedefinitions" {
            let crd = meta_str(obj, "name").to_string();
            let cr_storage = format!(
                "{}/{}",
                obj.pointer("/spec/group").and_then(Value::as_str).unwrap_or_default(),
                obj.pointer("/spec/names/plural")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
            );
            let crs: Vec<Value> = self.all(&cr_storage).cloned().collect();
            for cr in crs {
                self.commit(&cr_storage, "DELETED", cr.clone(), Some(cr));
            }
            self.unregister(&crd);
        }
        let uid = meta_str(obj, "uid").to_string();
        let orphan = obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| f.contains(&json!("orphan")));
        self.collect_dependents(&uid, orphan);
        let ns = meta_str(obj, "namespace").to_string();
        if !ns.is_empty() {
            self.finish_namespace_if_empty(&ns);
        }
        gone
    }

    /// Garbage collection: dependents of a removed owner lose the reference, and are
    /// deleted when no owner remains (unless orphaned).
    fn collect_dependents(&mut self, uid: &str, orphan: bool) {
        if uid.is_empty() {
            return;
        }
        let mut dependents = Vec::new();
        for (storage, m) in &self.objects {
            for o in m.values() {
                if o.pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|r| r.iter().any(|x| x.get("uid").and_then(Value::as_str) == Some(uid)))
                {
                    dependents.push((storage.clone(), o.clone()));
                }
            }
        }
        for (storage, dep) in dependents {
            let mut refs: Vec<Value> = dep
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid));
            if orphan || !refs.is_empty() {
                let mut n = dep.clone();
                if refs.is_empty() {
                    if let Some(m) = n["metadata"].as_object_mut() {
                        m.remove("ownerReferences");
                    }
                } else {
                    n["metadata"]["ownerReferences"] = Value::Array(refs);
                }
                self.commit(&storage, "MODIFIED", n, Some(dep));
            } else if let Some(rt) = self
                .types
                .iter()
                .find(|t| t.storage == storage && t.view == View::Plain)
                .cloned()
            {
                let _ = self.delete(
                    &rt,
                    meta_str(&dep, "namespace"),
                    meta_str(&dep, "name"),
                    &DeleteOpts::default(),
                );
            }
        }
    }

    /// After an update: an object being deleted whose finalizers are all gone is removed.
    fn finish_if_done(&mut self, storage: &str, obj: &Value) {
        if obj.pointer("/metadata/deletionTimestamp").is_none() {
            return;
        }
        let mut finalizers: Vec<Value> = obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        // The garbage collector's own finalizers are done at once: dependents are handled synchronously.
        if finalizers.iter().any(|f| f == "foregroundDeletion" || f == "orphan") {
            let uid = meta_str(obj, "uid").to_string();
            let orphan = finalizers.contains(&json!("orphan"));
            self.collect_dependents(&uid, orphan);
            finalizers.retain(|f| f != "foregroundDeletion" && f != "orphan");
            let mut n = obj.clone();
            n["metadata"]["finalizers"] = Value::Array(finalizers.clone());
            if finalizers.is_empty()
                && let Some(m) = n["metadata"].as_object_mut()
            {
                m.remove("finalizers");
            }
            let stored = self.commit(storage, "MODIFIED", n, Some(obj.clone()));
            if finalizers.is_empty() && storage != "core/namespaces" {
                self.remove(storage, &stored);
            }
            return;
        }
        if storage == "core/namespaces" {
            self.finish_namespace_if_empty(meta_str(obj, "name"));
            return;
        }
        if finalizers.is_empty() {
            self.remove(storage, obj);
        }
    }

    /// Deletes everything in a terminating namespace.
    fn sweep_namespace(&mut self, ns: &str) {
        let mut victims = Vec::new();
        for (storage, m) in &self.objects {
            for ((n, name), _) in m.iter() {
                if n == ns {
                    victims.push((storage.clone(), name.clone()));
                }
            }
        }
        for (storage, name) in victims {
            if let Some(rt) = self
                .types
                .iter()
                .find(|t| t.storage == storage && t.view == View::Plain)
                .cloned()
            {
                let _ = self.delete(&rt, ns, &name, &DeleteOpts::default());
            }
        }
        self.finish_namespace_if_empty(ns);
    }

    /// A terminating namespace with no content left: the namespace controller's part is
    /// done, so its `kubernetes` finalizer goes from `spec.finalizers` (as its
    /// `namespaces/finalize` call does); the namespace is removed once no finalizer is left
    /// there or in `metadata.finalizers` (others' finalizers wait for their owners).
    fn finish_namespace_if_empty(&mut self, ns: &str) {
        let Some(n) = self
            .objects
            .get("core/namespaces")
            .and_then(|m| m.get(&(String::new(), ns.to_string())))
            .cloned()
        else {
            return;
        };
        if n.pointer("/metadata/deletionTimestamp").is_none() {
            return;
        }
        let empty = self.objects.values().all(|m| !m.keys().any(|(n, _)| n == ns));
        if !empty {
            return;
        }
        let spec_fin: Vec<Value> = n
            .pointer("/spec/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let n = if spec_fin.iter().any(|f| f == "kubernetes") {
            let mut finalized = n.clone();
            let rest: Vec<Value> = spec_fin.iter().filter(|f| *f != "kubernetes").cloned().collect();
            set_spec_finalizers(&mut finalized, Some(Value::Array(rest)));
            self.commit("core/namespaces", "MODIFIED", finalized, Some(n))
        } else {
            n
        };
        if n.pointer("/spec/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty())
        {
            return;
        }
        let meta_fin = n
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if meta_fin {
            return;
        }
        self.remove("core/namespaces", &n);
    }

    /// DELETE on a collection.
    pub fn delete_collection(
        &mut self,
        rt: &ResourceType,
        f: &ListFilter,
        opts: &DeleteOpts,
    ) -> Result<Vec<Value>, ApiError> {
        let (items, _, _) = self.list(rt, f, None, 0);
        let mut out = Vec::new();
        for it in items {
            if let Ok((o, _)) = self.delete(rt, meta_str(&it, "namespace"), meta_str(&it, "name"), opts) {
                out.push(o);
            }
        }
        Ok(out)
    }

    /// Adds a ServiceAccount token.
    pub fn issue_token(&mut self, ns: &str, sa: &str) -> String {
        let t = super::util::random_token();
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

/// What a write through subresource `sub` makes of `old` given the object the client sent
/// (or the patch made): only the part the subresource owns changes, as kube-apiserver's
/// per-subresource strategies do.
fn subresource_write(rt: &ResourceType, sub: &str, old: &Value, sent: &Value) -> Result<Value, ApiError> {
    let mut n = old.clone();
    match (rt.storage.as_str(), sub) {
        (_, "status") => match sent.get("status") {
            Some(s) => n["status"] = s.clone(),
            None => strip_status(&mut n),
        },
        // A namespace's `spec.finalizers` change only here (`namespaces/finalize`), as the
        // namespace controller and other finalizers do.
        ("core/namespaces", "finalize") => set_spec_finalizers(&mut n, sent.pointer("/spec/finalizers").cloned()),
        // Only the Approved/Denied conditions (`pkg/registry/certificates/certificates/strategy.go`).
        ("certificates.k8s.io/certificatesigningrequests", "approval") => {
            if !n.get("status").is_some_and(Value::is_object) {
                n["status"] = json!({});
            }
            n["status"]["conditions"] = sent.pointer("/status/conditions").cloned().unwrap_or(Value::Null);
        }
        // Only `spec.ephemeralContainers` (`kubectl debug`; `pkg/registry/core/pod/strategy.go`).
        ("core/pods", "ephemeralcontainers") => {
            if !n.get("spec").is_some_and(Value::is_object) {
                n["spec"] = json!({});
            }
            n["spec"]["ephemeralContainers"] = sent
                .pointer("/spec/ephemeralContainers")
                .cloned()
                .unwrap_or(Value::Null);
        }
        _ => return Err(ApiError::not_found_path()),
    }
    Ok(n)
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
        for (name, _) in super::super::rbac::bootstrap_cluster_roles() {
            s.get(&roles, "", name).unwrap();
        }
        let bindings = rt(&s, "rbac.authorization.k8s.io", "clusterrolebindings");
        for (name, _) in super::super::rbac::BOOTSTRAP_CLUSTER_ROLE_BINDINGS {
            s.get(&bindings, "", name).unwrap();
        }
    }

    #[test]
    fn the_edit_role_granted_in_a_namespace_writes_workloads_but_not_rbac() {
        use super::super::rbac::{Attrs, User};
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

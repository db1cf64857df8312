//! Deletion: preconditions, finalizers (the garbage collector's `orphan` and
//! `foregroundDeletion` among them), owner-reference garbage collection, CRDs taking
//! their objects with them, and namespace termination.

use super::{DeleteOpts, ListFilter, Store, meta_str, set_spec_finalizers};
use crate::kube::registry::{ResourceType, View};
use crate::kube::status::ApiError;
use crate::kube::util::now_rfc3339;
use serde_json::{Value, json};

impl Store {
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
    pub(super) fn finish_if_done(&mut self, storage: &str, obj: &Value) {
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
}

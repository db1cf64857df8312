//! The write path: create, update (PUT), patch (JSON, merge, strategic merge and
//! server-side apply) and writes through a subresource, down to [`Store::commit`].

use super::{PatchKind, Store, WriteOpts, meta_str, set_spec_finalizers, strip_status, sys_opts};
use crate::kube::fields;
use crate::kube::hooks;
use crate::kube::omitempty;
use crate::kube::patch;
use crate::kube::registry::{self, ResourceType, View};
use crate::kube::status::{ApiError, Cause};
use crate::kube::util::{new_uid, now_rfc3339, random_suffix};
use serde_json::{Value, json};

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
                    crate::kube::status::qualified(&rt.plural, &rt.group)
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

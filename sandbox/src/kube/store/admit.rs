//! Admission: what every create and update goes through before it is stored
//! (normalisation, defaulting, validation of metadata, per-kind rules, CRD schemas), and
//! the checks of a request body's kind and namespace.

use super::{Store, WriteOpts, meta_str};
use crate::kube::hooks::{self, InUse};
use crate::kube::registry::{self, ResourceType, View};
use crate::kube::schema;
use crate::kube::status::{ApiError, Cause};
use serde_json::{Value, json};

impl Store {
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
    pub(super) fn admit(
        &self,
        rt: &ResourceType,
        old: Option<&Value>,
        obj: &mut Value,
        opts: &WriteOpts,
    ) -> Result<(), ApiError> {
        let name = meta_str(obj, "name").to_string();
        hooks::normalize(rt, obj);
        let mut causes = hooks::validate_meta(rt, obj);
        if old.is_none() {
            causes.extend(hooks::defaults(rt, obj));
        }
        if rt.storage == "core/services" {
            let ns = meta_str(obj, "namespace").to_string();
            let in_use = self.in_use_except(&ns, &name);
            if let Err(c) = hooks::service(old, obj, &self.service_cidrs, &in_use) {
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

    pub(super) fn check_kind(rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
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
    pub(super) fn to_storage(rt: &ResourceType, obj: Value) -> Value {
        match rt.view {
            View::EventsV1 => hooks::event_from_v1(&obj),
            View::Plain => obj,
        }
    }

    pub(super) fn namespace_check(&self, rt: &ResourceType, ns: &str) -> Result<(), ApiError> {
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
}

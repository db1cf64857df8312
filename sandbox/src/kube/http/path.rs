//! Resource paths: a path resolved to its type, namespace, name and subresource
//! ([`Target`]), the verb it means and its authorization.

use super::Ctx;
use crate::kube::rbac::{self, Attrs, User};
use crate::kube::registry::ResourceType;
use crate::kube::status::ApiError;
use axum::http::Method;
use serde_json::json;

/// A resource path, resolved.
pub(super) struct Target {
    pub(super) rt: ResourceType,
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
    pub(super) sub: Option<String>,
}

pub(super) fn resolve(c: &Ctx<'_>, group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
    let (ns, rest): (Option<&str>, &[&str]) = match rest {
        ["namespaces", ns, r, tail @ ..]
            if !(group.is_empty() && tail.is_empty() && matches!(*r, "status" | "finalize")) =>
        {
            (Some(ns), &rest[2..])
        }
        _ => (None, rest),
    };
    let (res, name, sub) = match rest {
        [r] => (*r, None, None),
        [r, n] => (*r, Some(*n), None),
        [r, n, s] => (*r, Some(*n), Some(*s)),
        _ => return Err(ApiError::not_found_path()),
    };
    let rt = c
        .api
        .lock()
        .find(group, version, res)
        .cloned()
        .ok_or_else(ApiError::not_found_path)?;
    if ns.is_some() && !rt.namespaced {
        return Err(ApiError::not_found_path());
    }
    if let Some(s) = sub
        && !rt.has_sub(s)
    {
        return Err(ApiError::not_found_path());
    }
    Ok(Target {
        rt,
        namespace: ns.map(str::to_string),
        name: name.map(str::to_string),
        sub: sub.map(str::to_string),
    })
}

pub(super) fn verb_of(c: &Ctx<'_>, t: &Target) -> &'static str {
    let watch = matches!(c.q("watch"), Some("1" | "true"));
    match (c.method.clone(), t.name.is_some()) {
        (Method::GET | Method::HEAD, false) if watch => "watch",
        (Method::GET | Method::HEAD, false) => "list",
        (Method::GET | Method::HEAD, true) if watch => "watch",
        (Method::GET | Method::HEAD, true) => "get",
        (Method::POST, _) => "create",
        (Method::PUT, _) => "update",
        (Method::PATCH, _) => "patch",
        (Method::DELETE, false) => "deletecollection",
        (Method::DELETE, true) => "delete",
        _ => "unknown",
    }
}

pub(super) fn authorize(c: &Ctx<'_>, t: &Target, verb: &str) -> Result<(), ApiError> {
    // Everyone may ask what they may do (system:basic-user).
    if *c.user == User::Admin || (t.rt.group == "authorization.k8s.io" && t.rt.plural == "selfsubjectaccessreviews") {
        return Ok(());
    }
    let a = Attrs {
        verb,
        group: &t.rt.group,
        resource: &t.rt.plural,
        subresource: t.sub.as_deref().unwrap_or_default(),
        namespace: t.namespace.as_deref().unwrap_or_default(),
        name: t.name.as_deref().unwrap_or_default(),
    };
    if c.api.lock().rbac_allows(c.user, &a) {
        return Ok(());
    }
    let mut e = ApiError::forbidden(rbac::denied_message(c.user, &a));
    let mut d = json!({"kind": t.rt.plural});
    if let Some(n) = &t.name {
        d["name"] = json!(n);
    }
    if !t.rt.group.is_empty() {
        d["group"] = json!(t.rt.group);
    }
    e.details = Some(d);
    Err(e)
}

//! The verbs on resources: a request's options, and the verbs on one object (get, create,
//! update, patch, delete, deletecollection and the `scale`, `eviction` and `token`
//! subresources); lists, watches and reviews are handed on.

use super::list::{filter, list};
use super::negotiate::parse_body;
use super::negotiate::{shape, shaped};
use super::path::{authorize, resolve, verb_of};
use super::review::{access_review, token_review};
use super::watch::watch;
use super::{Ctx, json_response};
use crate::kube::registry::ResourceType;
use crate::kube::selectors::LabelSelector;
use crate::kube::status::{ApiError, success_status};
use crate::kube::store::{DeleteOpts, PatchKind, WriteOpts};
use crate::kube::util::{now_secs, rfc3339};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

pub(super) fn write_opts(c: &Ctx<'_>) -> Result<WriteOpts, ApiError> {
    let dry_run = match c.q("dryRun") {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Invalid dryRun value: {other:?}; supported values: \"All\""
            )));
        }
    };
    let manager = match c.q("fieldManager") {
        Some(m) if m.len() > 128 => {
            return Err(ApiError::bad_request(
                "fieldManager: Too long: may not be longer than 128",
            ));
        }
        Some(m) => m.to_string(),
        None => default_manager(c),
    };
    Ok(WriteOpts {
        dry_run,
        manager,
        force: matches!(c.q("force"), Some("true" | "1")),
        strict: c.q("fieldValidation") == Some("Strict"),
    })
}

/// The default field manager: the user agent's program name, as the real server does.
pub(super) fn default_manager(c: &Ctx<'_>) -> String {
    let ua = c
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown");
    let prog = ua.split('/').next().unwrap_or(ua);
    prog.chars().take(128).collect()
}

pub(super) fn patch_kind(ct: &str) -> Result<PatchKind, ApiError> {
    let base = ct.split(';').next().unwrap_or_default().trim();
    match base {
        "application/json-patch+json" => Ok(PatchKind::Json),
        "application/merge-patch+json" => Ok(PatchKind::Merge),
        "application/strategic-merge-patch+json" => Ok(PatchKind::Strategic),
        "application/apply-patch+yaml" | "application/apply-patch+cbor" => Ok(PatchKind::Apply),
        other => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other})"
            ),
        )),
    }
}

pub(super) fn resource(c: &Ctx<'_>, group: &str, version: &str, rest: &[&str]) -> Result<Response, ApiError> {
    let t = resolve(c, group, version, rest)?;
    let verb = verb_of(c, &t);
    authorize(c, &t, verb)?;
    let agent = c
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    c.api
        .faults
        .on_request(verb, &crate::kube::status::qualified(&t.rt.plural, &t.rt.group), agent)?;
    let ns = t.namespace.clone().unwrap_or_default();
    let rt = &t.rt;
    if rt.namespaced && t.namespace.is_none() && !matches!(verb, "list" | "watch") {
        return Err(ApiError::not_found_path());
    }
    if rt.group == "authorization.k8s.io" {
        return access_review(c, rt, &ns);
    }
    if rt.group == "authentication.k8s.io" {
        return token_review(c);
    }
    match (verb, t.name.as_deref(), t.sub.as_deref()) {
        ("list", _, _) => list(c, &t),
        ("watch", _, _) => watch(c, &t),
        ("get", Some(name), None | Some("status")) => {
            let shape = shape(&c.accept())?;
            let obj = c.api.lock().get(rt, &ns, name)?;
            Ok(json_response(StatusCode::OK, &shaped(c, rt, obj, shape)))
        }
        ("get", Some(name), Some("scale")) => {
            let obj = c.api.lock().get(rt, &ns, name)?;
            Ok(json_response(StatusCode::OK, &scale_of(rt, &obj)))
        }
        ("create", None, None) => {
            let body = parse_body(c)?;
            let opts = write_opts(c)?;
            let obj = c
                .api
                .lock()
                .create(rt, (!ns.is_empty()).then_some(ns.as_str()), body, &opts)?;
            Ok(json_response(StatusCode::CREATED, &obj))
        }
        ("create", Some(name), Some("eviction")) => {
            let _ = parse_body(c)?;
            let mut s = c.api.lock();
            s.delete(rt, &ns, name, &DeleteOpts::default())?;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        ("create", Some(name), Some("token")) => {
            let body = parse_body(c)?;
            let mut s = c.api.lock();
            s.get(rt, &ns, name)?;
            let token = s.issue_token(&ns, name);
            let secs = body
                .pointer("/spec/expirationSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(3600)
                .clamp(600, 1 << 32);
            let spec = body.get("spec").filter(|s| s.is_object()).cloned().unwrap_or(json!({}));
            let mut resp = json!({
                "kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"name": name, "namespace": ns, "creationTimestamp": null},
                "spec": spec,
                "status": {"token": token, "expirationTimestamp": rfc3339(now_secs() + secs)},
            });
            resp["spec"]["expirationSeconds"] = json!(secs);
            Ok(json_response(StatusCode::CREATED, &resp))
        }
        ("update", Some(name), sub) => {
            let body = parse_body(c)?;
            let opts = write_opts(c)?;
            if sub == Some("scale") {
                let replicas = body.pointer("/spec/replicas").cloned().unwrap_or(json!(0));
                let obj = scale_patch(c, rt, &ns, name, replicas, &opts)?;
                return Ok(json_response(StatusCode::OK, &scale_of(rt, &obj)));
            }
            let obj = c.api.lock().update(rt, &ns, name, sub, body, &opts)?;
            Ok(json_response(StatusCode::OK, &obj))
        }
        ("patch", Some(name), sub) => {
            let kind = patch_kind(&c.content_type())?;
            let body = if kind == PatchKind::Apply {
                let text = std::str::from_utf8(c.body).map_err(|_| ApiError::bad_request("the body is not UTF-8"))?;
                match serde_json::from_str::<Value>(text) {
                    Ok(v) => v,
                    Err(_) => serde_saphyr::from_str::<Value>(text)
                        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
                }
            } else {
                serde_json::from_slice::<Value>(c.body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?
            };
            let opts = write_opts(c)?;
            if sub == Some("scale") {
                let shown = scale_of(rt, &c.api.lock().get(rt, &ns, name)?);
                let patched = match kind {
                    PatchKind::Json => crate::kube::patch::json_patch(&shown, &body).map_err(ApiError::bad_request)?,
                    _ => crate::kube::patch::merge_patch(&shown, &body),
                };
                let replicas = patched.pointer("/spec/replicas").cloned().unwrap_or(json!(0));
                let obj = scale_patch(c, rt, &ns, name, replicas, &opts)?;
                return Ok(json_response(StatusCode::OK, &scale_of(rt, &obj)));
            }
            let existed = c.api.lock().get(rt, &ns, name).is_ok();
            let obj = c.api.lock().patch(rt, &ns, name, sub, kind, &body, &opts)?;
            let code = if existed { StatusCode::OK } else { StatusCode::CREATED };
            Ok(json_response(code, &obj))
        }
        ("delete", Some(name), None) => {
            let opts = delete_opts(c)?;
            let (obj, gone) = c.api.lock().delete(rt, &ns, name, &opts)?;
            if gone {
                let uid = obj
                    .pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                if rt.crd.is_some() || rt.plural == "pods" || rt.plural == "namespaces" {
                    return Ok(json_response(StatusCode::OK, &obj));
                }
                Ok(json_response(
                    StatusCode::OK,
                    &success_status(&rt.group, &rt.plural, name, &uid),
                ))
            } else {
                Ok(json_response(StatusCode::ACCEPTED, &obj))
            }
        }
        ("deletecollection", None, None) => {
            let filter = filter(c, rt, t.namespace.clone())?;
            let opts = delete_opts(c)?;
            let items = c.api.lock().delete_collection(rt, &filter, &opts)?;
            Ok(json_response(
                StatusCode::OK,
                &json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": {}, "items": items}),
            ))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

pub(super) fn scale_of(rt: &ResourceType, obj: &Value) -> Value {
    let paths = rt.scale.clone().unwrap_or(crate::kube::registry::ScalePaths {
        spec_replicas: ".spec.replicas".into(),
        status_replicas: ".status.replicas".into(),
        label_selector: None,
    });
    let first = |p: &str| crate::kube::util::json_path(obj, p).into_iter().next();
    let selector = match &paths.label_selector {
        Some(p) => first(p).map(|v| crate::kube::util::cell_text(&v)).unwrap_or_default(),
        None => obj
            .pointer("/spec/selector")
            .and_then(|s| LabelSelector::from_object(s).ok())
            .map(|l| l.to_string_form())
            .unwrap_or_default(),
    };
    json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": obj.pointer("/metadata/name"), "namespace": obj.pointer("/metadata/namespace"), "uid": obj.pointer("/metadata/uid"),
            "resourceVersion": obj.pointer("/metadata/resourceVersion"), "creationTimestamp": obj.pointer("/metadata/creationTimestamp")},
        "spec": {"replicas": first(&paths.spec_replicas).unwrap_or(json!(0))},
        "status": {"replicas": first(&paths.status_replicas).unwrap_or(json!(0)), "selector": selector},
    })
}

pub(super) fn scale_patch(
    c: &Ctx<'_>,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    replicas: Value,
    opts: &WriteOpts,
) -> Result<Value, ApiError> {
    if !replicas.is_i64() || replicas.as_i64().unwrap_or(-1) < 0 {
        return Err(ApiError::invalid(
            "Scale",
            "autoscaling",
            name,
            vec![crate::kube::status::Cause::invalid(
                "spec.replicas",
                &replicas,
                "must be greater than or equal to 0",
            )],
        ));
    }
    let path = rt
        .scale
        .as_ref()
        .map(|s| s.spec_replicas.clone())
        .unwrap_or(".spec.replicas".into());
    let mut patch = replicas;
    for seg in path.trim_start_matches('.').split('.').rev() {
        patch = json!({ seg: patch });
    }
    c.api.lock().patch(rt, ns, name, None, PatchKind::Merge, &patch, opts)
}

pub(super) fn delete_opts(c: &Ctx<'_>) -> Result<DeleteOpts, ApiError> {
    let body: Value = if c.body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(c.body)
            .map_err(|e| ApiError::bad_request(format!("couldn't decode DeleteOptions: {e}")))?
    };
    let dry = c.q("dryRun") == Some("All")
        || body
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|x| x == "All"));
    let propagation = c.q("propagationPolicy").map(str::to_string).or_else(|| {
        body.get("propagationPolicy")
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    if let Some(p) = &propagation
        && !["Background", "Foreground", "Orphan"].contains(&p.as_str())
    {
        return Err(ApiError::invalid(
            "DeleteOptions",
            "",
            "",
            vec![crate::kube::status::Cause::unsupported(
                "propagationPolicy",
                &json!(p),
                &[json!("Foreground"), json!("Background"), json!("Orphan"), json!("nil")],
            )],
        ));
    }
    if let Some(g) = c.q("gracePeriodSeconds") {
        g.parse::<i64>()
            .map_err(|_| ApiError::bad_request(format!("invalid gracePeriodSeconds: {g}")))?;
    }
    Ok(DeleteOpts {
        dry_run: dry,
        propagation,
        precondition_uid: body
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(str::to_string),
        precondition_rv: body
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

//! Access reviews (`kubectl auth can-i`) and token reviews: answered from RBAC and the
//! issued tokens, never stored.

use super::negotiate::parse_body;
use super::{Ctx, json_response, token_owner};
use crate::kube::rbac::{Attrs, User};
use crate::kube::registry::ResourceType;
use crate::kube::status::{ApiError, Cause};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};

/// The body of a review (access or token): POSTed, a JSON or YAML object.
pub(super) fn review_request(c: &Ctx<'_>) -> Result<Value, ApiError> {
    if *c.method != Method::POST {
        return Err(ApiError::method_not_allowed());
    }
    let review = parse_body(c)?;
    if !review.is_object() {
        return Err(ApiError::bad_request(
            "the object provided is not a JSON or YAML object",
        ));
    }
    Ok(review)
}

/// Types a review for its answer, as kube-apiserver echoes it (never stored, so no
/// creationTimestamp).
pub(super) fn review_answered(review: &mut Value, api_version: &str, kind: &str) {
    review["apiVersion"] = json!(api_version);
    review["kind"] = json!(kind);
    if !review.get("metadata").is_some_and(Value::is_object) {
        review["metadata"] = json!({});
    }
    review["metadata"]["creationTimestamp"] = Value::Null;
}

/// `SelfSubjectAccessReview` / `SubjectAccessReview` (`kubectl auth can-i`): answered from
/// RBAC, nothing stored.
pub(super) fn access_review(c: &Ctx<'_>, rt: &ResourceType, ns: &str) -> Result<Response, ApiError> {
    let mut review = review_request(c)?;
    let user = if rt.plural == "subjectaccessreviews" {
        let name = review.pointer("/spec/user").and_then(Value::as_str).unwrap_or_default();
        let groups = review
            .pointer("/spec/groups")
            .and_then(Value::as_array)
            .map(|g| g.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        User::impersonated(name, groups)
    } else {
        c.user.clone()
    };
    let ra = review
        .pointer("/spec/resourceAttributes")
        .filter(|v| !v.is_null())
        .cloned();
    let nra = review
        .pointer("/spec/nonResourceAttributes")
        .filter(|v| !v.is_null())
        .cloned();
    // kube-apiserver's validation of both access reviews.
    let cause = match (&ra, &nra) {
        (None, None) => Some(Cause::invalid_raw(
            "spec.resourceAttributes",
            "null",
            "exactly one of nonResourceAttributes or resourceAttributes must be specified",
        )),
        (Some(_), Some(n)) => Some(Cause::invalid(
            "spec.nonResourceAttributes",
            n,
            "cannot be specified in combination with resourceAttributes",
        )),
        _ => None,
    };
    if let Some(cause) = cause {
        return Err(ApiError::invalid(&rt.kind, "authorization.k8s.io", "", vec![cause]));
    }
    let allowed = match (&ra, &nra) {
        (Some(ra), _) => {
            let f = |k: &str| ra.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
            let (verb, group, resource, sub, name) =
                (f("verb"), f("group"), f("resource"), f("subresource"), f("name"));
            let namespace = if rt.plural == "localsubjectaccessreviews" {
                ns.to_string()
            } else {
                f("namespace")
            };
            let a = Attrs {
                verb: &verb,
                group: &group,
                resource: &resource,
                subresource: &sub,
                namespace: &namespace,
                name: &name,
            };
            c.api.lock().rbac_allows(&user, &a)
        }
        // Non-resource URLs (`/metrics`, `/healthz`): ClusterRoles' nonResourceURLs.
        (None, nra) => {
            let f = |k: &str| {
                nra.as_ref()
                    .and_then(|n| n.get(k))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            c.api.lock().rbac_allows_path(&user, &f("path"), &f("verb"))
        }
    };
    review_answered(&mut review, "authorization.k8s.io/v1", &rt.kind);
    review["status"] = if allowed {
        json!({"allowed": true, "reason": "allowed by RBAC"})
    } else {
        json!({"allowed": false})
    };
    Ok(json_response(StatusCode::CREATED, &review))
}

/// `TokenReview`: who a bearer token belongs to (the admin's, or a ServiceAccount's
/// issued by `serviceaccounts/token`), as a server delegating authentication asks it
/// (`authentication.k8s.io/v1`); answered, nothing stored.
pub(super) fn token_review(c: &Ctx<'_>) -> Result<Response, ApiError> {
    let mut review = review_request(c)?;
    let token = review
        .pointer("/spec/token")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if token.is_empty() {
        return Err(ApiError::invalid(
            "TokenReview",
            "authentication.k8s.io",
            "",
            vec![crate::kube::status::Cause::required("spec.token")],
        ));
    }
    let owner = token_owner(c.api, token);
    review_answered(&mut review, "authentication.k8s.io/v1", "TokenReview");
    review["status"] = match owner {
        Some(user) => json!({"authenticated": true, "user": {"username": user.name(), "groups": user.groups()},
            "audiences": review.pointer("/spec/audiences").cloned().unwrap_or(json!([]))}),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    Ok(json_response(StatusCode::CREATED, &review))
}

//! Lists: label and field selectors, pages (`limit`, `continue` tokens, consistent reads
//! at a resourceVersion) and the list's shape.

use super::negotiate::{Shape, metadata_only, row_object, shape, stored_form};
use super::path::Target;
use super::{Ctx, json_response};
use crate::kube::registry::ResourceType;
use crate::kube::selectors::{FieldSelector, LabelSelector};
use crate::kube::status::ApiError;
use crate::kube::store::ListFilter;
use crate::kube::table;
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine;
use serde_json::{Value, json};

pub(super) fn filter(c: &Ctx<'_>, rt: &ResourceType, namespace: Option<String>) -> Result<ListFilter, ApiError> {
    let labels = LabelSelector::parse(c.q("labelSelector").unwrap_or_default()).map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(c.q("fieldSelector").unwrap_or_default(), &|f| rt.field_supported(f))
        .map_err(ApiError::bad_request)?;
    Ok(ListFilter {
        namespace,
        labels,
        fields,
    })
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: u64,
    ns: String,
    name: String,
}

pub(super) fn list(c: &Ctx<'_>, t: &Target) -> Result<Response, ApiError> {
    let rt = &t.rt;
    let shape = shape(&c.accept())?;
    let mut f = filter(c, rt, t.namespace.clone())?;
    if let Some(n) = &t.name {
        f.fields.0.push(("metadata.name".into(), true, n.clone()));
    }
    let limit: usize = match c.q("limit") {
        Some(l) => l
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid limit: {l}")))?,
        None => 0,
    };
    // Which resourceVersion to list at: a continue token's (consistent pages), or an
    // explicit one with resourceVersionMatch=Exact; otherwise the newest.
    let mut at = None;
    let after = match c.q("continue") {
        Some(tok) if !tok.is_empty() => {
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(tok.trim_end_matches('='))
                .map_err(|_| ApiError::bad_request("continue key is not valid"))?;
            let ct: ContinueToken =
                serde_json::from_slice(&raw).map_err(|_| ApiError::bad_request("continue key is not valid"))?;
            if ct.rv < c.api.lock().oldest_rv {
                return Err(ApiError::gone(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                ));
            }
            at = Some(ct.rv);
            Some((ct.ns, ct.name))
        }
        _ => None,
    };
    if at.is_none()
        && let Some(rv) = c.q("resourceVersion").filter(|v| !v.is_empty() && *v != "0")
    {
        let n: u64 = rv
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?;
        let current = c.api.lock().rv;
        if n > current {
            let mut e = ApiError::new(
                504,
                "Timeout",
                format!("Too large resource version: {n}, current: {current}"),
            );
            e.details = Some(
                json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1}),
            );
            return Err(e);
        }
        if c.q("resourceVersionMatch") == Some("Exact") {
            at = Some(n);
        }
    }
    let (items, next, remaining, rv) = {
        let s = c.api.lock();
        match at {
            Some(at) => {
                let (items, next, remaining) = s.list_at(at, rt, &f, after.as_ref(), limit)?;
                (items, next, remaining, at.min(s.rv))
            }
            None => {
                let (items, next, remaining) = s.list(rt, &f, after.as_ref(), limit);
                (items, next, remaining, s.rv)
            }
        }
    };
    let cont = next.map(|(ns, name)| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&ContinueToken { rv, ns, name }).unwrap_or_default())
    });
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(tok) = &cont {
        meta["continue"] = json!(tok);
        meta["remainingItemCount"] = json!(remaining);
    }
    let body = match shape {
        Shape::Full => {
            json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": meta, "items": items})
        }
        Shape::Metadata => {
            json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": meta, "items": items.iter().map(metadata_only).collect::<Vec<_>>()})
        }
        Shape::Table => {
            let rows: Vec<(Value, Value)> = items.iter().map(|o| (stored_form(rt, o), row_object(c, o))).collect();
            table::table(rt, &rows, &rv.to_string(), cont.as_deref(), true)
        }
    };
    Ok(json_response(StatusCode::OK, &body))
}

//! Content negotiation: the Accept header, the shape a resource read goes back in (the
//! object, a Table, PartialObjectMetadata), the aggregated discovery version, and the
//! request body in the content type it names.

use super::Ctx;
use crate::kube::registry::ResourceType;
use crate::kube::status::ApiError;
use crate::kube::table;
use serde_json::{Value, json};
use std::collections::HashMap;

/// One entry of an Accept header.
#[derive(Debug, Clone, Default)]
pub(super) struct Media {
    pub(super) typ: String,
    pub(super) params: HashMap<String, String>,
}

pub(super) fn parse_accept(h: &str) -> Vec<Media> {
    h.split(',')
        .map(|part| {
            let mut it = part.split(';');
            let typ = it.next().unwrap_or_default().trim().to_ascii_lowercase();
            let params = it
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect();
            Media { typ, params }
        })
        .collect()
}

/// What the client wants back for resource reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Shape {
    Full,
    Table,
    Metadata,
}

pub(super) fn shape(accept: &[Media]) -> Result<Shape, ApiError> {
    let mut json_ok = false;
    for m in accept {
        let is_json =
            m.typ == "application/json" || m.typ == "*/*" || m.typ == "application/*" || m.typ == "application/yaml";
        if !is_json {
            continue;
        }
        match m.params.get("as").map(String::as_str) {
            Some("Table") if m.params.get("g").is_none_or(|g| g == "meta.k8s.io") => return Ok(Shape::Table),
            Some("PartialObjectMetadata") | Some("PartialObjectMetadataList") => return Ok(Shape::Metadata),
            Some(_) => {}
            None => json_ok = true,
        }
    }
    if json_ok {
        Ok(Shape::Full)
    } else {
        Err(ApiError::not_acceptable())
    }
}

pub(super) fn aggregated_version(accept: &[Media]) -> Option<&'static str> {
    for m in accept {
        if m.params.get("g").map(String::as_str) == Some("apidiscovery.k8s.io")
            && m.params.get("as").map(String::as_str) == Some("APIGroupDiscoveryList")
            && m.typ == "application/json"
        {
            match m.params.get("v").map(String::as_str) {
                Some("v2") => return Some("v2"),
                Some("v2beta1") => return Some("v2beta1"),
                _ => {}
            }
        }
    }
    None
}

pub(super) fn metadata_only(v: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": v.get("metadata").cloned().unwrap_or(json!({}))})
}

/// One object in the requested shape.
pub(super) fn shaped(c: &Ctx<'_>, rt: &ResourceType, obj: Value, shape: Shape) -> Value {
    match shape {
        Shape::Full => obj,
        Shape::Metadata => metadata_only(&obj),
        Shape::Table => {
            let stored = stored_form(rt, &obj);
            let shown = row_object(c, &obj);
            let rv = obj
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            table::table(rt, &[(stored, shown)], &rv, None, true)
        }
    }
}

pub(super) fn row_object(c: &Ctx<'_>, obj: &Value) -> Value {
    match c.q("includeObject") {
        Some("None") => Value::Null,
        Some("Object") => obj.clone(),
        _ => metadata_only(obj),
    }
}

/// The stored form the table renderers read (events are stored as v1).
pub(super) fn stored_form(rt: &ResourceType, obj: &Value) -> Value {
    if rt.view == crate::kube::registry::View::EventsV1 {
        crate::kube::hooks::event_from_v1(obj)
    } else {
        obj.clone()
    }
}

/// Parses a request body: JSON, or YAML when the content type says so.
pub(super) fn parse_body(c: &Ctx<'_>) -> Result<Value, ApiError> {
    let ct = c.content_type();
    if c.body.is_empty() {
        return Err(ApiError::bad_request("the body of the request was empty"));
    }
    if ct.contains("protobuf") {
        return crate::kube::proto::decode_object(c.body).map_err(|e| {
            let mut err = ApiError::unsupported_media(&ct);
            err.message = format!("{}: {e}", err.message);
            err
        });
    }
    match serde_json::from_slice::<Value>(c.body) {
        Ok(v) => Ok(v),
        Err(e) if ct.contains("yaml") => {
            let text = std::str::from_utf8(c.body).map_err(|_| ApiError::bad_request("the body is not UTF-8"))?;
            serde_saphyr::from_str::<Value>(text)
                .map_err(|y| ApiError::bad_request(format!("error converting YAML to JSON: {y}; as JSON: {e}")))
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "couldn't get version/kind; json parse error: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_shapes() {
        let t = parse_accept(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
        );
        assert_eq!(shape(&t).unwrap(), Shape::Table);
        assert_eq!(
            shape(&parse_accept(
                "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
            ))
            .unwrap(),
            Shape::Metadata
        );
        assert_eq!(shape(&parse_accept("*/*")).unwrap(), Shape::Full);
        assert_eq!(
            shape(&parse_accept("application/vnd.kubernetes.protobuf"))
                .unwrap_err()
                .code,
            406
        );
        let d = parse_accept(
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json",
        );
        assert_eq!(aggregated_version(&d), Some("v2"));
    }
}

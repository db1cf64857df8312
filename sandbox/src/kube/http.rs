//! HTTP: authentication, routing on (method, path segments), content negotiation
//! (JSON, Table, PartialObjectMetadata, aggregated discovery), watch streams.

use super::KubeApi;
use super::discovery;
use super::rbac::{self, Attrs, User};
use super::registry::ResourceType;
use super::selectors::{FieldSelector, LabelSelector};
use super::status::{ApiError, success_status};
use super::store::{Change, DeleteOpts, ListFilter, PatchKind, WriteOpts};
use super::table;
use super::util::{now_rfc3339, now_secs, rfc3339, to_json_bytes};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use base64::Engine;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Largest accepted request body, as the real server's 3 MiB limit.
pub const MAX_BODY: usize = 3 * 1024 * 1024;

pub fn router(api: Arc<KubeApi>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(api)
}

impl From<&ApiError> for StatusCode {
    fn from(e: &ApiError) -> Self {
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    let mut r = Response::new(Body::from(to_json_bytes(v)));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: &ApiError) -> Response {
    let mut r = json_response(StatusCode::from(e), &e.to_status());
    if let Some(s) = e.details.as_ref().and_then(|d| d["retryAfterSeconds"].as_u64()) {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

async fn handle(State(api): State<Arc<KubeApi>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parse_query(parts.uri.query().unwrap_or_default());
    let segs: Vec<String> = path.split('/').filter(|s| !s.is_empty()).map(percent_decode).collect();
    let public = matches!(
        segs.first().map(String::as_str),
        Some("healthz" | "livez" | "readyz" | "version")
    ) && segs.len() == 1;
    let user = match authenticate(&api, &parts.headers) {
        Some(u) => u,
        None if public => User::Admin,
        None => return error_response(&ApiError::unauthorized()),
    };
    let bytes = if parts.method == Method::GET || parts.method == Method::HEAD {
        axum::body::Bytes::new()
    } else {
        match axum::body::to_bytes(body, MAX_BODY).await {
            Ok(b) => b,
            Err(_) => return error_response(&ApiError::too_large()),
        }
    };
    if segs.first().map(String::as_str) == Some("_sandbox") {
        if !matches!(user, User::Admin) {
            return error_response(&ApiError::forbidden("the sandbox controls are for the admin"));
        }
        let rest: Vec<&str> = segs[1..].iter().map(String::as_str).collect();
        return match super::faults::route(&api, &parts.method, &rest, &bytes) {
            Ok(v) => json_response(StatusCode::OK, &v),
            Err(e) => error_response(&e),
        };
    }
    let ctx = Ctx {
        api: &api,
        method: &parts.method,
        headers: &parts.headers,
        query: &query,
        user: &user,
        body: &bytes,
    };
    match route(&ctx, &segs).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

struct Ctx<'a> {
    api: &'a Arc<KubeApi>,
    method: &'a Method,
    headers: &'a HeaderMap,
    query: &'a HashMap<String, String>,
    user: &'a User,
    body: &'a [u8],
}

impl Ctx<'_> {
    fn q(&self, k: &str) -> Option<&str> {
        self.query.get(k).map(String::as_str)
    }
    fn accept(&self) -> Vec<Media> {
        parse_accept(
            self.headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/json"),
        )
    }
    fn content_type(&self) -> String {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string()
    }
}

fn authenticate(api: &KubeApi, headers: &HeaderMap) -> Option<User> {
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = auth
        .strip_prefix("Bearer ")
        .or_else(|| auth.strip_prefix("bearer "))?
        .trim();
    let user = token_owner(api, token)?;
    if user == User::Admin
        && let Some(who) = headers.get("impersonate-user").and_then(|v| v.to_str().ok())
    {
        let groups = headers
            .get_all("impersonate-group")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect();
        return Some(User::impersonated(who, groups));
    }
    Some(user)
}

/// Whose bearer token `token` is: the admin's, or a ServiceAccount's this server issued.
fn token_owner(api: &KubeApi, token: &str) -> Option<User> {
    if token == api.admin_token {
        return Some(User::Admin);
    }
    let store = api.lock();
    let (namespace, name) = store.tokens.get(token)?.clone();
    Some(User::ServiceAccount { namespace, name })
}

/// One entry of an Accept header.
#[derive(Debug, Clone, Default)]
struct Media {
    typ: String,
    params: HashMap<String, String>,
}

fn parse_accept(h: &str) -> Vec<Media> {
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
enum Shape {
    Full,
    Table,
    Metadata,
}

fn shape(accept: &[Media]) -> Result<Shape, ApiError> {
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

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                percent_decode(&k.replace('+', " ")),
                percent_decode(&v.replace('+', " ")),
            )
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn route(c: &Ctx<'_>, segs: &[String]) -> Result<Response, ApiError> {
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let get_only = |c: &Ctx<'_>| {
        if *c.method == Method::GET || *c.method == Method::HEAD {
            Ok(())
        } else {
            Err(ApiError::method_not_allowed())
        }
    };
    match s.as_slice() {
        [] => {
            get_only(c)?;
            Ok(json_response(
                StatusCode::OK,
                &json!({"paths": ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/openapi/v2", "/openapi/v3", "/readyz", "/version"]}),
            ))
        }
        ["version"] => {
            get_only(c)?;
            Ok(json_response(StatusCode::OK, &discovery::version()))
        }
        ["healthz" | "livez" | "readyz"] => {
            let mut r = Response::new(Body::from("ok"));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Ok(r)
        }
        ["api"] | ["apis"] => {
            get_only(c)?;
            let core = s[0] == "api";
            if let Some(v) = aggregated_version(&c.accept()) {
                let types = c.api.lock().types.clone();
                let doc = discovery::aggregated(&types, core, &format!("apidiscovery.k8s.io/{v}"));
                let mut r = json_response(StatusCode::OK, &doc);
                let ct = format!("application/json;g=apidiscovery.k8s.io;v={v};as=APIGroupDiscoveryList");
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_str(&ct).unwrap_or(HeaderValue::from_static("application/json")),
                );
                return Ok(r);
            }
            let types = c.api.lock().types.clone();
            let host = c
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("127.0.0.1")
                .to_string();
            Ok(json_response(
                StatusCode::OK,
                &if core {
                    discovery::api_versions(&host)
                } else {
                    discovery::api_group_list(&types)
                },
            ))
        }
        ["openapi", "v2"] => {
            get_only(c)?;
            // An empty protobuf document: kubectl then validates on the server
            // (fieldValidation) and computes strategic merge patches from its built-in types.
            let wants_pb = c.accept().iter().any(|m| m.typ.contains("protobuf"));
            if wants_pb {
                let mut r = Response::new(Body::empty());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/com.github.proto-openapi.spec.v2.v1.0+protobuf"),
                );
                return Ok(r);
            }
            Ok(json_response(
                StatusCode::OK,
                &json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": {}, "definitions": {}}),
            ))
        }
        ["openapi", "v3"] => {
            get_only(c)?;
            let types = c.api.lock().types.clone();
            Ok(json_response(StatusCode::OK, &discovery::openapi_v3_index(&types)))
        }
        ["openapi", "v3", rest @ ..] => {
            get_only(c)?;
            let types = c.api.lock().types.clone();
            let doc = discovery::openapi_v3_doc(&types, &rest.join("/")).ok_or_else(ApiError::not_found_path)?;
            Ok(json_response(StatusCode::OK, &doc))
        }
        ["api", "v1"] => {
            get_only(c)?;
            let types = c.api.lock().types.clone();
            Ok(json_response(
                StatusCode::OK,
                &discovery::resource_list(&types, "", "v1").ok_or_else(ApiError::not_found_path)?,
            ))
        }
        ["apis", g] => {
            get_only(c)?;
            let types = c.api.lock().types.clone();
            Ok(json_response(
                StatusCode::OK,
                &discovery::api_group(&types, g).ok_or_else(ApiError::not_found_path)?,
            ))
        }
        ["apis", g, v] => {
            get_only(c)?;
            let types = c.api.lock().types.clone();
            Ok(json_response(
                StatusCode::OK,
                &discovery::resource_list(&types, g, v).ok_or_else(ApiError::not_found_path)?,
            ))
        }
        ["api", "v1", rest @ ..] => resource(c, "", "v1", rest),
        ["apis", g, v, rest @ ..] => resource(c, g, v, rest),
        _ => Err(ApiError::not_found_path()),
    }
}

fn aggregated_version(accept: &[Media]) -> Option<&'static str> {
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

/// A resource path, resolved.
struct Target {
    rt: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn resolve(c: &Ctx<'_>, group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
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

fn verb_of(c: &Ctx<'_>, t: &Target) -> &'static str {
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

fn authorize(c: &Ctx<'_>, t: &Target, verb: &str) -> Result<(), ApiError> {
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

/// Parses a request body: JSON, or YAML when the content type says so.
fn parse_body(c: &Ctx<'_>) -> Result<Value, ApiError> {
    let ct = c.content_type();
    if c.body.is_empty() {
        return Err(ApiError::bad_request("the body of the request was empty"));
    }
    if ct.contains("protobuf") {
        return super::proto::decode_object(c.body).map_err(|e| {
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

fn write_opts(c: &Ctx<'_>) -> Result<WriteOpts, ApiError> {
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
fn default_manager(c: &Ctx<'_>) -> String {
    let ua = c
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown");
    let prog = ua.split('/').next().unwrap_or(ua);
    prog.chars().take(128).collect()
}

fn patch_kind(ct: &str) -> Result<PatchKind, ApiError> {
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

fn metadata_only(v: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": v.get("metadata").cloned().unwrap_or(json!({}))})
}

/// One object in the requested shape.
fn shaped(c: &Ctx<'_>, rt: &ResourceType, obj: Value, shape: Shape) -> Value {
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

fn row_object(c: &Ctx<'_>, obj: &Value) -> Value {
    match c.q("includeObject") {
        Some("None") => Value::Null,
        Some("Object") => obj.clone(),
        _ => metadata_only(obj),
    }
}

/// The stored form the table renderers read (events are stored as v1).
fn stored_form(rt: &ResourceType, obj: &Value) -> Value {
    if rt.view == super::registry::View::EventsV1 {
        super::hooks::event_from_v1(obj)
    } else {
        obj.clone()
    }
}

fn resource(c: &Ctx<'_>, group: &str, version: &str, rest: &[&str]) -> Result<Response, ApiError> {
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
        .on_request(verb, &super::status::qualified(&t.rt.plural, &t.rt.group), agent)?;
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
                    PatchKind::Json => super::patch::json_patch(&shown, &body).map_err(ApiError::bad_request)?,
                    _ => super::patch::merge_patch(&shown, &body),
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

/// The body of a review (access or token): POSTed, a JSON or YAML object.
fn review_request(c: &Ctx<'_>) -> Result<Value, ApiError> {
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
fn review_answered(review: &mut Value, api_version: &str, kind: &str) {
    review["apiVersion"] = json!(api_version);
    review["kind"] = json!(kind);
    if !review.get("metadata").is_some_and(Value::is_object) {
        review["metadata"] = json!({});
    }
    review["metadata"]["creationTimestamp"] = Value::Null;
}

/// `SelfSubjectAccessReview` / `SubjectAccessReview` (`kubectl auth can-i`): answered from
/// RBAC, nothing stored.
fn access_review(c: &Ctx<'_>, rt: &ResourceType, ns: &str) -> Result<Response, ApiError> {
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
    let ra = review.pointer("/spec/resourceAttributes").cloned();
    let allowed = match &ra {
        Some(ra) => {
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
        // Non-resource URLs (discovery) are open to every authenticated user.
        None => true,
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
fn token_review(c: &Ctx<'_>) -> Result<Response, ApiError> {
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
            vec![super::status::Cause::required("spec.token")],
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

fn scale_of(rt: &ResourceType, obj: &Value) -> Value {
    let paths = rt.scale.clone().unwrap_or(super::registry::ScalePaths {
        spec_replicas: ".spec.replicas".into(),
        status_replicas: ".status.replicas".into(),
        label_selector: None,
    });
    let first = |p: &str| super::util::json_path(obj, p).into_iter().next();
    let selector = match &paths.label_selector {
        Some(p) => first(p).map(|v| super::util::cell_text(&v)).unwrap_or_default(),
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

fn scale_patch(
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
            vec![super::status::Cause::invalid(
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

fn delete_opts(c: &Ctx<'_>) -> Result<DeleteOpts, ApiError> {
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
            vec![super::status::Cause::unsupported(
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

fn filter(c: &Ctx<'_>, rt: &ResourceType, namespace: Option<String>) -> Result<ListFilter, ApiError> {
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

fn list(c: &Ctx<'_>, t: &Target) -> Result<Response, ApiError> {
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

/// A change as one watch sees it (None: not for this watch).
fn event_for(
    rt: &ResourceType,
    f: &ListFilter,
    ch: &Change,
    present: &dyn Fn(&Value) -> Value,
) -> Option<(&'static str, Value)> {
    if ch.storage != rt.storage || f.namespace.as_ref().is_some_and(|ns| *ns != ch.namespace) {
        return None;
    }
    let now_match = f.matches(rt, &ch.object);
    match ch.typ {
        "ADDED" => now_match.then(|| ("ADDED", present(&ch.object))),
        "DELETED" => now_match.then(|| ("DELETED", present(&ch.object))),
        _ => {
            let was = ch.old.as_ref().is_some_and(|o| f.matches(rt, o));
            match (was, now_match) {
                (true, true) => Some(("MODIFIED", present(&ch.object))),
                (false, true) => Some(("ADDED", present(&ch.object))),
                (true, false) => Some(("DELETED", present(&ch.object))),
                (false, false) => None,
            }
        }
    }
}

fn watch(c: &Ctx<'_>, t: &Target) -> Result<Response, ApiError> {
    let rt = t.rt.clone();
    let shape = shape(&c.accept())?;
    let mut f = filter(c, &rt, t.namespace.clone())?;
    if let Some(n) = &t.name {
        f.fields.0.push(("metadata.name".into(), true, n.clone()));
    }
    let bookmarks = matches!(c.q("allowWatchBookmarks"), Some("true" | "1"));
    let send_initial = matches!(c.q("sendInitialEvents"), Some("true" | "1"));
    let timeout = c
        .q("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1800)
        .min(3600);
    let rv_param = c.q("resourceVersion").unwrap_or_default().to_string();
    let include_object = c.q("includeObject").map(str::to_string);
    let (initial, mut rx, start_rv, err) = {
        let s = c.api.lock();
        let rx = s.tx.subscribe();
        let present = |o: &Value| s.present(&rt, o);
        let mut initial: Vec<(&'static str, Value)> = Vec::new();
        let mut err = None;
        if send_initial || rv_param.is_empty() || rv_param == "0" {
            let (items, _, _) = s.list(&rt, &f, None, 0);
            initial.extend(items.into_iter().map(|o| ("ADDED", o)));
        } else {
            let from: u64 = rv_param
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv_param}")))?;
            match s.changes_since(from) {
                Ok(chs) => initial.extend(chs.iter().filter_map(|ch| event_for(&rt, &f, ch, &present))),
                Err(e) => err = Some(e),
            }
        }
        (initial, rx, s.rv, err)
    };
    let (tx, out_rx) = tokio::sync::mpsc::channel::<axum::body::Bytes>(64);
    // A cut ends the body with an error, which breaks the connection mid-stream.
    let (cut_tx, cut_rx) = tokio::sync::oneshot::channel::<()>();
    let api = c.api.clone();
    let mut cuts = api.faults.watch_cuts();
    let mut stop = api.stop.subscribe();
    let every = api.bookmark_every;
    tokio::spawn(async move {
        let table_rt = rt.clone();
        let mut first_table = true;
        let mut encode = |typ: &str, obj: Value| -> axum::body::Bytes {
            let obj = match (shape, typ) {
                (_, "BOOKMARK") | (_, "ERROR") => obj,
                (Shape::Full, _) => obj,
                (Shape::Metadata, _) => metadata_only(&obj),
                (Shape::Table, _) => {
                    let stored = stored_form(&table_rt, &obj);
                    let shown = match include_object.as_deref() {
                        Some("None") => Value::Null,
                        Some("Object") => obj.clone(),
                        _ => metadata_only(&obj),
                    };
                    let rv = obj
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    let tbl = table::table(&table_rt, &[(stored, shown)], &rv, None, first_table);
                    first_table = false;
                    tbl
                }
            };
            let mut line = to_json_bytes(&json!({"type": typ, "object": obj}));
            line.push(b'\n');
            axum::body::Bytes::from(line)
        };
        let bookmark = |rv: u64, initial_end: bool| -> Value {
            let mut meta = json!({"resourceVersion": rv.to_string()});
            if initial_end {
                meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            let (kind, av) = match shape {
                Shape::Metadata => ("PartialObjectMetadata".to_string(), "meta.k8s.io/v1".to_string()),
                _ => (rt.kind.clone(), rt.api_version()),
            };
            json!({"kind": kind, "apiVersion": av, "metadata": meta})
        };
        if let Some(e) = err {
            let _ = tx.send(encode("ERROR", e.to_status())).await;
            return;
        }
        for (typ, obj) in initial {
            if tx.send(encode(typ, obj)).await.is_err() {
                return;
            }
        }
        let mut last_rv = start_rv;
        if send_initial && bookmarks && tx.send(encode("BOOKMARK", bookmark(last_rv, true))).await.is_err() {
            return;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    if bookmarks {
                        let _ = tx.send(encode("BOOKMARK", bookmark(last_rv, false))).await;
                    }
                    return;
                }
                _ = tick.tick(), if bookmarks => {
                    if tx.send(encode("BOOKMARK", bookmark(last_rv, false))).await.is_err() {
                        return;
                    }
                }
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => return,
                _ = cuts.changed() => {
                    let _ = cut_tx.send(());
                    return;
                }
                _ = tx.closed() => return,
                msg = rx.recv() => {
                    let batch = match msg {
                        Ok(ch) => vec![ch],
                        // Fell behind the live feed: catch up from the history, which
                        // reaches further back (410 only when it does not).
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            let caught_up = api.lock().changes_since(last_rv);
                            match caught_up {
                                Ok(chs) => chs,
                                Err(e) => {
                                    let _ = tx.send(encode("ERROR", e.to_status())).await;
                                    return;
                                }
                            }
                        }
                        Err(_) => return,
                    };
                    for ch in batch {
                        if ch.typ == "ERROR" {
                            let e = ApiError::gone(format!("too old resource version: {last_rv} ({})", ch.rv));
                            let _ = tx.send(encode("ERROR", e.to_status())).await;
                            return;
                        }
                        if ch.rv <= last_rv {
                            continue;
                        }
                        last_rv = ch.rv;
                        let ev = {
                            let s = api.lock();
                            let present = |o: &Value| s.present(&rt, o);
                            event_for(&rt, &f, &ch, &present)
                        };
                        if let Some((typ, obj)) = ev
                            && tx.send(encode(typ, obj)).await.is_err()
                        {
                            return;
                        }
                    }
                }
            }
        }
    });
    let stream = futures::stream::unfold((out_rx, Some(cut_rx)), |(mut rx, cut)| async move {
        match rx.recv().await {
            Some(b) => Some((Ok(b), (rx, cut))),
            // Ended: cleanly, unless it was cut.
            None => match cut?.await {
                Ok(()) => Some((
                    Err(std::io::Error::other("watch cut by /_sandbox/watches/cut")),
                    (rx, None),
                )),
                Err(_) => None,
            },
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    let _ = now_rfc3339;
    Ok(r)
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

    #[test]
    fn query_decoding() {
        let q = parse_query("labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1");
        assert_eq!(q["labelSelector"], "app=web,tier in (a)");
        assert_eq!(q["watch"], "1");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%é%%c3%a9"), "%é%é");
    }
}

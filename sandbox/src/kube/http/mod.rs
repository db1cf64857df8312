//! HTTP: authentication, routing on (method, path segments), content negotiation
//! (JSON, Table, PartialObjectMetadata, aggregated discovery), watch streams.
//!
//! This module holds the entry point ([`router`]): authentication, the query string, and
//! the paths that are not resources (health, version, discovery, OpenAPI). The rest:
//! - [`negotiate`]: what the client accepts and the shape objects go back in;
//! - [`path`]: a resource path resolved, its verb and its authorization;
//! - [`resource`](mod@resource): the verbs on one object
//!   (get, create, update, patch, delete, the scale, eviction and token subresources);
//! - [`list`]: lists, with selectors, pages and continue tokens;
//! - [`watch`]: watch streams, from the history and then live;
//! - [`review`]: access and token reviews, answered and never stored.

mod list;
mod negotiate;
mod path;
mod resource;
mod review;
mod watch;

use negotiate::{Media, aggregated_version, parse_accept};
use resource::resource;

use super::KubeApi;
use super::discovery;
use super::rbac::User;
use super::status::ApiError;
use super::util::to_json_bytes;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

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
        return match crate::kube::faults::route(&api, &parts.method, &rest, &bytes) {
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

fn parse_query(q: &str) -> HashMap<String, String> {
    url::form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

/// A path segment with its `%XX` escapes decoded; a malformed escape is kept as written.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = parse_query("labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1");
        assert_eq!(q["labelSelector"], "app=web,tier in (a)");
        assert_eq!(q["watch"], "1");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%é%%c3%a9"), "%é%é");
    }
}

//! A raw JSON HTTP helper for contract-level tests: no typed client, just status, headers
//! and the body as a `serde_json::Value`.

use std::sync::Once;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

/// Per-request timeout of [`JsonApi`] clients.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// A reqwest client (rustls with the `ring` provider installed once per process).
pub fn http_client() -> reqwest::Client {
    static PROVIDER: Once = Once::new();
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("building a reqwest client")
}

/// A query component, form-urlencoded (as `url` and Go's `url.QueryEscape` write it).
pub fn query_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// One HTTP answer: status, headers, the body parsed as JSON (`Value::Null` when it is
/// not JSON) and the raw body text.
#[derive(Debug, Clone)]
pub struct Answer {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Answer {
    /// The envelope's `data`.
    pub fn data(&self) -> &Value {
        &self.body["data"]
    }

    /// The envelope's `error`.
    pub fn error(&self) -> &Value {
        &self.body["error"]
    }

    /// A header's value as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A one-line description for assertion messages.
    pub fn describe(&self) -> String {
        let mut text = self.text.clone();
        if text.len() > 2000 {
            let mut cut = 2000;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str("...");
        }
        format!("{} {} -> {} {}", self.method, self.path, self.status, text)
    }

    /// Check the envelope convention of `docs/platform-api.md`: a JSON object with `code`
    /// (equal to the HTTP status), `message` (a string), `data` and `error`; on success
    /// `error` is null; on an error `data` is null and `error` is a non-empty list of
    /// `{field, message}` for 422 and a non-empty string otherwise.
    pub fn check_envelope(&self) -> std::result::Result<(), String> {
        let d = self.describe();
        let obj = self
            .body
            .as_object()
            .ok_or_else(|| format!("body is not a JSON object: {d}"))?;
        for key in ["code", "message", "data", "error"] {
            if !obj.contains_key(key) {
                return Err(format!("envelope lacks `{key}`: {d}"));
            }
        }
        if self.body["code"].as_u64() != Some(u64::from(self.status)) {
            return Err(format!("envelope `code` differs from the HTTP status: {d}"));
        }
        if !self.body["message"].is_string() {
            return Err(format!("envelope `message` is not a string: {d}"));
        }
        if (200..300).contains(&self.status) {
            if !self.error().is_null() {
                return Err(format!("`error` is not null on success: {d}"));
            }
        } else {
            if !self.data().is_null() {
                return Err(format!("`data` is not null on an error: {d}"));
            }
            if self.status == 422 {
                let list = self
                    .error()
                    .as_array()
                    .ok_or_else(|| format!("422 `error` is not a list: {d}"))?;
                if list.is_empty() {
                    return Err(format!("422 `error` is an empty list: {d}"));
                }
                for e in list {
                    if !e["field"].is_string() || !e["message"].is_string() {
                        return Err(format!(
                            "422 `error` entry is not {{field: string, message: string}}: {e} in {d}"
                        ));
                    }
                }
            } else {
                match self.error().as_str() {
                    Some(s) if !s.is_empty() => {}
                    _ => return Err(format!("`error` is not a non-empty string: {d}")),
                }
            }
        }
        Ok(())
    }
}

/// A JSON API client: a base URL and an optional bearer token.
#[derive(Clone)]
pub struct JsonApi {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl JsonApi {
    /// A client without a token.
    pub fn new(base: &str) -> JsonApi {
        JsonApi {
            client: http_client(),
            base: base.trim_end_matches('/').to_string(),
            token: None,
        }
    }

    /// Log in with `POST /core/v1/auth/login` and keep the token.
    pub async fn login(base: &str, email: &str, password: &str) -> Result<JsonApi> {
        let api = JsonApi::new(base);
        let a = api
            .try_request(
                Method::POST,
                "/core/v1/auth/login",
                Some(&json!({"email": email, "password": password})),
            )
            .await?;
        if a.status != 200 {
            bail!("login failed: {}", a.describe());
        }
        let token = a.data()["token"]
            .as_str()
            .with_context(|| format!("login answer has no data.token: {}", a.describe()))?
            .to_string();
        Ok(api.with_token(Some(token)))
    }

    /// The same client with another token (or none).
    pub fn with_token(&self, token: Option<String>) -> JsonApi {
        JsonApi {
            client: self.client.clone(),
            base: self.base.clone(),
            token,
        }
    }

    /// The same client with another per-request timeout (e.g. short, to see a hang).
    pub fn with_timeout(&self, timeout: Duration) -> JsonApi {
        let _ = http_client(); // installs the crypto provider
        JsonApi {
            client: reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(5)))
                .build()
                .expect("building a reqwest client"),
            base: self.base.clone(),
            token: self.token.clone(),
        }
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Send a request with an optional JSON body. `path` may carry a query string.
    pub async fn try_request(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Answer> {
        let bytes = body.map(|b| serde_json::to_vec(b).expect("serializing a Value"));
        self.try_send_raw(method, path, bytes, Some("application/json")).await
    }

    /// Send a request with a raw body (e.g. malformed JSON).
    pub async fn try_send_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        content_type: Option<&str>,
    ) -> Result<Answer> {
        let url = format!("{}{}", self.base, path);
        let mut req = self
            .client
            .request(method.clone(), &url)
            .header("Accept", "application/json");
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            if let Some(ct) = content_type {
                req = req.header("Content-Type", ct);
            }
            req = req.body(body);
        }
        let resp = req.send().await.with_context(|| format!("{method} {url}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp
            .text()
            .await
            .with_context(|| format!("reading the body of {method} {url}"))?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Answer {
            method: method.to_string(),
            path: path.to_string(),
            status,
            headers,
            body,
            text,
        })
    }

    /// [`JsonApi::try_request`], panicking on a transport error.
    pub async fn request(&self, method: Method, path: &str, body: Option<&Value>) -> Answer {
        self.try_request(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`JsonApi::try_send_raw`], panicking on a transport error.
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        content_type: Option<&str>,
    ) -> Answer {
        self.try_send_raw(method, path, body, content_type)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.request(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Answer {
        self.request(Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Answer {
        self.request(Method::PUT, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        self.request(Method::DELETE, path, None).await
    }

    /// Every item of a paginated list of the platform API: pages of 100 until `total`
    /// items or an empty page.
    pub async fn list_all(&self, path: &str) -> Result<Vec<Value>> {
        let mut items = Vec::new();
        for page in 1.. {
            let sep = if path.contains('?') { '&' } else { '?' };
            let a = self.get(&format!("{path}{sep}per_page=100&page={page}")).await;
            ensure!(a.status == 200, "GET {path}: {}", a.describe());
            let got = a.data()["items"].as_array().context("items")?.clone();
            let total = a.data()["total"].as_u64().unwrap_or(0) as usize;
            let done = got.is_empty() || items.len() + got.len() >= total;
            items.extend(got);
            if done {
                break;
            }
        }
        Ok(items)
    }
}

//! [`HttpPlatform`]: the [`Platform`] trait over the platform's HTTP API.
//!
//! One client per process is meant to be shared (`Arc<dyn Platform>`): the token, the
//! rate limiter and the metrics are per client.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use reqwest::Method;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{Instrument, instrument};
use url::Url;

use super::auth::{FALLBACK_TOKEN_LIFETIME, renew_at};
use super::envelope::decode_response;
use super::error::Error;
use super::metrics::PlatformMetrics;
use super::ratelimit::{RateLimiter, TokenBucketConfig};
use super::retry::{RetryDecision, RetryPolicy};
use super::time::{format_rfc3339, parse_rfc3339};
use super::types::*;
use super::{InstanceFilter, Platform, Result};

/// `User-Agent` unless configured otherwise.
pub const DEFAULT_USER_AGENT: &str = concat!("kuberaya-ccm/", env!("CARGO_PKG_VERSION"));

/// Page size asked of list endpoints (the contract's maximum).
pub const MAX_PER_PAGE: u32 = 100;

/// A list longer than this many pages is treated as a platform fault rather than
/// followed forever.
const MAX_PAGES: u32 = 10_000;

/// Settings of [`HttpPlatform`]. `Debug` never prints the password.
#[derive(Clone)]
pub struct PlatformClientConfig {
    /// E.g. `https://api.cloudraya.com` (a path prefix is kept).
    pub base_url: String,
    pub email: String,
    pub password: String,
    /// Per attempt: sending the request and reading the whole answer.
    pub timeout: Duration,
    /// Retries of a failed call (see [`RetryPolicy`]).
    pub max_retries: u32,
    pub user_agent: String,
    /// Renew the token this long before its `expires_at` (at most half its lifetime).
    pub token_renew_before: Duration,
    /// First backoff of the exponential retry backoff.
    pub base_backoff: Duration,
    /// Largest backoff.
    pub max_backoff: Duration,
    /// Largest `Retry-After` honoured for one wait.
    pub max_retry_after: Duration,
    /// Optional client-side token bucket; off by default.
    pub rate_limit: Option<TokenBucketConfig>,
    /// `per_page` of list calls (1..=100).
    pub page_size: u32,
}

impl PlatformClientConfig {
    /// The defaults: 10 s timeout, 3 retries, renew 60 s early, no token bucket.
    pub fn new(base_url: impl Into<String>, email: impl Into<String>, password: impl Into<String>) -> Self {
        let retry = RetryPolicy::default();
        PlatformClientConfig {
            base_url: base_url.into(),
            email: email.into(),
            password: password.into(),
            timeout: Duration::from_secs(10),
            max_retries: retry.max_retries,
            user_agent: DEFAULT_USER_AGENT.to_owned(),
            token_renew_before: Duration::from_secs(60),
            base_backoff: retry.base_backoff,
            max_backoff: retry.max_backoff,
            max_retry_after: retry.max_retry_after,
            rate_limit: None,
            page_size: MAX_PER_PAGE,
        }
    }
}

impl fmt::Debug for PlatformClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlatformClientConfig")
            .field("base_url", &self.base_url)
            .field("email", &self.email)
            .field("password", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("user_agent", &self.user_agent)
            .field("token_renew_before", &self.token_renew_before)
            .field("base_backoff", &self.base_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("max_retry_after", &self.max_retry_after)
            .field("rate_limit", &self.rate_limit)
            .field("page_size", &self.page_size)
            .finish()
    }
}

/// A bearer token and when to replace it. `Debug` never prints the token.
struct CachedToken {
    token: String,
    renew_at: SystemTime,
    expires_at: SystemTime,
}

impl fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedToken")
            .field("token", &"<redacted>")
            .field("renew_at", &self.renew_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

#[derive(Serialize)]
struct LoginRequest<'a> {
    email: &'a str,
    password: &'a str,
}

#[derive(Deserialize)]
struct LoginData {
    token: String,
    #[serde(default)]
    expires_at: Option<String>,
}

/// One prepared request.
struct Request {
    method: Method,
    /// The path template, for metrics and spans.
    template: &'static str,
    url: Url,
    body: Option<Vec<u8>>,
    /// What a 404 means, e.g. "load balancer lb-1 in cluster cl-1".
    what: Option<String>,
}

/// The CloudRaya platform over HTTP. See the module docs.
pub struct HttpPlatform {
    http: reqwest::Client,
    base: Url,
    email: String,
    password: String,
    timeout: Duration,
    retry: RetryPolicy,
    renew_before: Duration,
    page_size: u32,
    // tokio's Mutex: held across the login call so that concurrent callers share it.
    token: tokio::sync::Mutex<Option<CachedToken>>,
    limiter: RateLimiter,
    metrics: Arc<PlatformMetrics>,
}

impl fmt::Debug for HttpPlatform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpPlatform")
            .field("base", &self.base.as_str())
            .field("email", &self.email)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

fn method_str(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        _ => "OTHER",
    }
}

/// Rejects IDs that cannot name one object in a path (`..` would be normalised away and
/// turn a GET of one object into a list call).
fn check_id(kind: &str, id: &str) -> Result<()> {
    if id.is_empty() || id == "." || id == ".." {
        return Err(Error::BadRequest {
            message: format!("invalid {kind} ID {id:?}"),
        });
    }
    Ok(())
}

fn label_query(labels: &Labels) -> Vec<(&'static str, String)> {
    labels.iter().map(|(k, v)| ("label", format!("{k}={v}"))).collect()
}

fn encode<B: Serialize + ?Sized>(body: &B) -> Result<Vec<u8>> {
    serde_json::to_vec(body).map_err(|e| Error::BadRequest {
        message: format!("could not encode the request body: {e}"),
    })
}

impl HttpPlatform {
    /// Builds the client. Does not contact the platform (the first call logs in).
    pub fn new(config: PlatformClientConfig) -> Result<Self> {
        let base = Url::parse(config.base_url.trim()).map_err(|e| Error::Config {
            message: format!("base URL {:?}: {e}", config.base_url),
        })?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(Error::Config {
                message: format!("base URL {:?} is not an http(s) URL", config.base_url),
            });
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(Error::Config {
                message: "the base URL must not carry credentials; set email and password".to_owned(),
            });
        }
        if config.timeout.is_zero() {
            return Err(Error::Config {
                message: "timeout must be above zero".to_owned(),
            });
        }
        let http = reqwest::Client::builder()
            .user_agent(config.user_agent.clone())
            .connect_timeout(config.timeout)
            .build()
            .map_err(|e| Error::Config {
                message: format!("could not build the HTTP client: {e}"),
            })?;
        Ok(HttpPlatform {
            http,
            base,
            email: config.email,
            password: config.password,
            timeout: config.timeout,
            retry: RetryPolicy {
                max_retries: config.max_retries,
                base_backoff: config.base_backoff,
                max_backoff: config.max_backoff.max(config.base_backoff),
                max_retry_after: config.max_retry_after,
            },
            renew_before: config.token_renew_before,
            page_size: config.page_size.clamp(1, MAX_PER_PAGE),
            token: tokio::sync::Mutex::new(None),
            limiter: RateLimiter::new(config.rate_limit, Instant::now()),
            metrics: Arc::new(PlatformMetrics::new()),
        })
    }

    /// The client's counters (shared; keep the `Arc` to read them later).
    pub fn metrics(&self) -> Arc<PlatformMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Calls that had to wait for the shared rate limiter.
    pub fn rate_limit_waits(&self) -> u64 {
        self.limiter.waits()
    }

    pub fn base_url(&self) -> &Url {
        &self.base
    }

    fn url(&self, segments: &[&str], query: &[(&'static str, String)]) -> Result<Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| Error::Config {
                message: format!("base URL {} cannot take a path", self.base),
            })?
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        Ok(url)
    }

    fn request(
        &self,
        method: Method,
        template: &'static str,
        segments: &[&str],
        query: &[(&'static str, String)],
    ) -> Result<Request> {
        Ok(Request {
            method,
            template,
            url: self.url(segments, query)?,
            body: None,
            what: None,
        })
    }

    async fn wait_for_limiter(&self) {
        if !self.limiter.acquire().await.is_zero() {
            self.metrics.inc_rate_limit_waits();
        }
    }

    /// One HTTP exchange within the per-call timeout. Counts it in the metrics.
    async fn send_once(&self, req: &Request, token: Option<&str>) -> Result<(u16, HeaderMap, Vec<u8>)> {
        let mut rb = self
            .http
            .request(req.method.clone(), req.url.clone())
            .header(ACCEPT, "application/json");
        if let Some(token) = token {
            // bearer_auth marks the header sensitive, so it is never logged by reqwest.
            rb = rb.bearer_auth(token);
        }
        if let Some(body) = &req.body {
            rb = rb.header(CONTENT_TYPE, "application/json").body(body.clone());
        }
        let exchange = async {
            let resp = rb.send().await?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, body.to_vec()))
        };
        let method = method_str(&req.method);
        let timed_out = || Error::Timeout {
            method,
            path: req.url.path().to_owned(),
            after: self.timeout,
        };
        let result = match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Err(timed_out()),
            Ok(Err(e)) if e.is_timeout() => Err(timed_out()),
            Ok(Err(e)) => Err(Error::Transport(e)),
            Ok(Ok(answer)) => Ok(answer),
        };
        let status = match &result {
            Ok((status, _, _)) => status.to_string(),
            Err(e) => e.metric_label().to_owned(),
        };
        self.metrics.record_request(method, req.template, &status);
        tracing::debug!(status = %status, "platform answered");
        result
    }

    /// A valid token: the cached one, or a new one when it is due for renewal or is
    /// `stale` (the token a 401 was just answered to).
    async fn token(&self, stale: Option<&str>) -> Result<String> {
        let mut cached = self.token.lock().await;
        let now = SystemTime::now();
        if let Some(c) = cached.as_ref() {
            let refused = stale.is_some_and(|s| s == c.token);
            if !refused && now < c.renew_at {
                return Ok(c.token.clone());
            }
        }
        match self.login().await {
            Ok(fresh) => {
                let token = fresh.token.clone();
                *cached = Some(fresh);
                Ok(token)
            }
            Err(e) => {
                // An early renewal failed but the old token is still valid: keep using it
                // and try again on the next call.
                if let Some(c) = cached.as_ref()
                    && stale.is_none()
                    && now < c.expires_at
                {
                    tracing::warn!(error = %e, "renewing the platform API token failed; the current one is still valid");
                    return Ok(c.token.clone());
                }
                Err(e)
            }
        }
    }

    /// `POST /core/v1/auth/login`. Retried on 429 only (a POST; see `retry.rs`).
    async fn login(&self) -> Result<CachedToken> {
        let body = encode(&LoginRequest {
            email: &self.email,
            password: &self.password,
        })?;
        let mut req = self.request(
            Method::POST,
            "/core/v1/auth/login",
            &["core", "v1", "auth", "login"],
            &[],
        )?;
        req.body = Some(body);
        let span = tracing::info_span!("platform_login", email = %self.email);
        async {
            let mut retries = 0;
            loop {
                self.wait_for_limiter().await;
                let obtained_at = SystemTime::now();
                let result = match self.send_once(&req, None).await {
                    Ok((status, headers, body)) => {
                        decode_response::<LoginData>(status, &headers, &body).map_err(redact_login_error)
                    }
                    Err(e) => Err(e),
                };
                match result {
                    Ok(data) => {
                        self.metrics.inc_logins();
                        return Ok(self.cache_token(data, obtained_at));
                    }
                    Err(e) => match self.retry.decide(&req.method, &e, retries, rand::random()) {
                        RetryDecision::AfterRateLimit(wait) => {
                            retries += 1;
                            self.metrics.inc_retries();
                            self.limiter.note_retry_after(Instant::now(), wait);
                        }
                        RetryDecision::Backoff(wait) => {
                            retries += 1;
                            self.metrics.inc_retries();
                            tokio::time::sleep(wait).await;
                        }
                        RetryDecision::GiveUp => return Err(self.login_error(e)),
                    },
                }
            }
        }
        .instrument(span)
        .await
    }

    fn cache_token(&self, data: LoginData, obtained_at: SystemTime) -> CachedToken {
        let expires_at = match data.expires_at.as_deref().and_then(parse_rfc3339) {
            Some(t) => t,
            None => {
                tracing::warn!(
                    expires_at = ?data.expires_at,
                    "login answer has no readable expires_at; assuming {}s",
                    FALLBACK_TOKEN_LIFETIME.as_secs()
                );
                obtained_at + FALLBACK_TOKEN_LIFETIME
            }
        };
        let renew_at = renew_at(obtained_at, expires_at, self.renew_before);
        tracing::info!(
            expires_at = %format_rfc3339(expires_at),
            renew_at = %format_rfc3339(renew_at),
            "logged in to the platform API"
        );
        CachedToken {
            token: data.token,
            renew_at,
            expires_at,
        }
    }

    fn login_error(&self, e: Error) -> Error {
        match e {
            Error::Unauthorized { message } => Error::Unauthorized {
                message: format!(
                    "login to the platform API as {} was refused ({message}); check the email and password",
                    self.email
                ),
            },
            other => other,
        }
    }

    /// Sends `req` with a token, retrying as [`RetryPolicy`] says and renewing the token
    /// once on a 401, and decodes the answer.
    async fn execute<T: DeserializeOwned>(&self, req: Request) -> Result<T> {
        let span = tracing::debug_span!(
            "platform_request",
            method = method_str(&req.method),
            path = req.template
        );
        async {
            let mut retries = 0;
            let mut stale: Option<String> = None;
            loop {
                self.wait_for_limiter().await;
                let token = self.token(stale.as_deref()).await?;
                let result = match self.send_once(&req, Some(&token)).await {
                    Ok((status, headers, body)) => decode_response::<T>(status, &headers, &body),
                    Err(e) => Err(e),
                };
                let error = match result {
                    Ok(value) => return Ok(value),
                    Err(e) => e,
                };
                if let Error::Unauthorized { message } = &error {
                    if stale.is_none() {
                        // Tokens may be revoked at any time (e.g. a platform restart):
                        // log in again, once. The request was refused, so resending is
                        // safe for any method.
                        tracing::info!(%message, "platform API refused the token; logging in again");
                        self.metrics.inc_relogins_on_401();
                        stale = Some(token);
                        continue;
                    }
                    return Err(Error::Unauthorized {
                        message: format!("the platform API refused a freshly issued token: {message}"),
                    });
                }
                match self.retry.decide(&req.method, &error, retries, rand::random()) {
                    RetryDecision::GiveUp => return Err(describe(error, &req)),
                    RetryDecision::AfterRateLimit(wait) => {
                        tracing::warn!(
                            wait_ms = wait.as_millis() as u64,
                            "platform API rate limit hit; every call of this client waits"
                        );
                        retries += 1;
                        self.metrics.inc_retries();
                        self.limiter.note_retry_after(Instant::now(), wait);
                    }
                    RetryDecision::Backoff(wait) => {
                        tracing::warn!(
                            error = %error,
                            retry = retries + 1,
                            wait_ms = wait.as_millis() as u64,
                            "platform API call failed; retrying"
                        );
                        retries += 1;
                        self.metrics.inc_retries();
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Follows `page` to the end. Items are de-duplicated by ID: objects created or
    /// deleted between two pages can shift one into the next page.
    async fn list_all<T: DeserializeOwned + HasId>(
        &self,
        template: &'static str,
        segments: &[&str],
        mut query: Vec<(&'static str, String)>,
    ) -> Result<Vec<T>> {
        let mut items = Vec::new();
        let mut seen = HashSet::new();
        let fixed = query.len();
        for page in 1..=MAX_PAGES {
            query.truncate(fixed);
            query.push(("page", page.to_string()));
            query.push(("per_page", self.page_size.to_string()));
            let req = self.request(Method::GET, template, segments, &query)?;
            let path = req.url.path().to_owned();
            let got: Page<T> = self.execute(req).await?;
            if got.page != page {
                return Err(Error::Unexpected {
                    status: 200,
                    message: format!(
                        "asked {path} for page {page}, got page {}; not following the list further",
                        got.page
                    ),
                });
            }
            let n = got.items.len();
            for item in got.items {
                if seen.insert(item.id().to_owned()) {
                    items.push(item);
                }
            }
            let per_page = u64::from(got.per_page.max(1));
            let last = n == 0 || (n as u64) < per_page || u64::from(page) * per_page >= got.total;
            if last {
                return Ok(items);
            }
        }
        Err(Error::Unexpected {
            status: 200,
            message: format!("{template} has more than {MAX_PAGES} pages"),
        })
    }
}

/// Says which object a 404 is about (the platform's own message is generic).
fn describe(error: Error, req: &Request) -> Error {
    match (error, &req.what) {
        (Error::NotFound { .. }, Some(what)) => Error::NotFound { what: what.clone() },
        (e, _) => e,
    }
}

/// Login answers hold the token: never quote them.
fn redact_login_error(e: Error) -> Error {
    match e {
        Error::Decode { status, .. } => Error::Decode {
            status,
            body_excerpt: "(login answer not quoted: it may hold a token)".to_owned(),
            source: <serde_json::Error as serde::de::Error>::custom(
                "the login answer is not {\"token\": string, \"expires_at\": RFC 3339 string}",
            ),
        },
        other => other,
    }
}

#[async_trait]
impl Platform for HttpPlatform {
    #[instrument(skip(self))]
    async fn get_cluster(&self, cluster_id: &str) -> Result<Cluster> {
        check_id("cluster", cluster_id)?;
        let mut req = self.request(
            Method::GET,
            "/kubernetes/v1/clusters/{cluster_id}",
            &["kubernetes", "v1", "clusters", cluster_id],
            &[],
        )?;
        req.what = Some(format!("cluster {cluster_id}"));
        self.execute(req).await
    }

    #[instrument(skip(self))]
    async fn list_instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>> {
        let mut query = Vec::new();
        if let Some(region) = &filter.region {
            query.push(("region", region.clone()));
        }
        if let Some(vpc) = &filter.vpc_id {
            query.push(("vpc_id", vpc.clone()));
        }
        if let Some(subnet) = &filter.subnet_id {
            query.push(("subnet_id", subnet.clone()));
        }
        query.extend(label_query(&filter.labels));
        self.list_all("/vm/v1/instances", &["vm", "v1", "instances"], query)
            .await
    }

    #[instrument(skip(self))]
    async fn get_instance(&self, id: &str) -> Result<Instance> {
        check_id("instance", id)?;
        let mut req = self.request(
            Method::GET,
            "/vm/v1/instances/{id}",
            &["vm", "v1", "instances", id],
            &[],
        )?;
        req.what = Some(format!("instance {id}"));
        self.execute(req).await
    }

    #[instrument(skip(self))]
    async fn get_vpc(&self, id: &str) -> Result<Vpc> {
        check_id("VPC", id)?;
        let mut req = self.request(
            Method::GET,
            "/network/v1/vpcs/{id}",
            &["network", "v1", "vpcs", id],
            &[],
        )?;
        req.what = Some(format!("VPC {id}"));
        self.execute(req).await
    }

    #[instrument(skip(self))]
    async fn get_subnet(&self, id: &str) -> Result<Subnet> {
        check_id("subnet", id)?;
        let mut req = self.request(
            Method::GET,
            "/network/v1/subnets/{id}",
            &["network", "v1", "subnets", id],
            &[],
        )?;
        req.what = Some(format!("subnet {id}"));
        self.execute(req).await
    }

    #[instrument(skip(self))]
    async fn list_public_ips(&self, labels: &Labels) -> Result<Vec<PublicIp>> {
        self.list_all(
            "/network/v1/public-ips",
            &["network", "v1", "public-ips"],
            label_query(labels),
        )
        .await
    }

    #[instrument(skip(self))]
    async fn get_public_ip(&self, id: &str) -> Result<PublicIp> {
        check_id("public IP", id)?;
        let mut req = self.request(
            Method::GET,
            "/network/v1/public-ips/{id}",
            &["network", "v1", "public-ips", id],
            &[],
        )?;
        req.what = Some(format!("public IP {id}"));
        self.execute(req).await
    }

    #[instrument(skip(self, labels))]
    async fn create_public_ip(&self, region: &str, version: IpVersion, labels: &Labels) -> Result<PublicIp> {
        let mut req = self.request(
            Method::POST,
            "/network/v1/public-ips",
            &["network", "v1", "public-ips"],
            &[],
        )?;
        req.body = Some(encode(&PublicIpSpec {
            region: region.to_owned(),
            // IPv4 stays the request it was before the IPv6 extension.
            version: (version != IpVersion::V4).then_some(version),
            labels: labels.clone(),
        })?);
        self.execute(req).await
    }

    #[instrument(skip(self))]
    async fn delete_public_ip(&self, id: &str) -> Result<()> {
        check_id("public IP", id)?;
        let mut req = self.request(
            Method::DELETE,
            "/network/v1/public-ips/{id}",
            &["network", "v1", "public-ips", id],
            &[],
        )?;
        req.what = Some(format!("public IP {id}"));
        self.execute::<IgnoredAny>(req).await.map(|_| ())
    }

    #[instrument(skip(self))]
    async fn list_load_balancers(&self, cluster_id: &str, labels: &Labels) -> Result<Vec<LoadBalancer>> {
        check_id("cluster", cluster_id)?;
        self.list_all(
            "/kubernetes/v1/clusters/{cluster_id}/load-balancers",
            &["kubernetes", "v1", "clusters", cluster_id, "load-balancers"],
            label_query(labels),
        )
        .await
    }

    #[instrument(skip(self))]
    async fn get_load_balancer(&self, cluster_id: &str, id: &str) -> Result<LoadBalancer> {
        check_id("cluster", cluster_id)?;
        check_id("load balancer", id)?;
        let mut req = self.request(
            Method::GET,
            "/kubernetes/v1/clusters/{cluster_id}/load-balancers/{id}",
            &["kubernetes", "v1", "clusters", cluster_id, "load-balancers", id],
            &[],
        )?;
        req.what = Some(format!("load balancer {id} in cluster {cluster_id}"));
        self.execute(req).await
    }

    #[instrument(skip(self, spec), fields(name = %spec.name))]
    async fn create_load_balancer(&self, cluster_id: &str, spec: &LoadBalancerSpec) -> Result<LoadBalancer> {
        check_id("cluster", cluster_id)?;
        let mut req = self.request(
            Method::POST,
            "/kubernetes/v1/clusters/{cluster_id}/load-balancers",
            &["kubernetes", "v1", "clusters", cluster_id, "load-balancers"],
            &[],
        )?;
        req.body = Some(encode(spec)?);
        req.what = Some(format!("cluster {cluster_id}"));
        self.execute(req).await
    }

    #[instrument(skip(self, update))]
    async fn update_load_balancer(
        &self,
        cluster_id: &str,
        id: &str,
        update: &LoadBalancerUpdate,
    ) -> Result<LoadBalancer> {
        check_id("cluster", cluster_id)?;
        check_id("load balancer", id)?;
        let mut req = self.request(
            Method::PUT,
            "/kubernetes/v1/clusters/{cluster_id}/load-balancers/{id}",
            &["kubernetes", "v1", "clusters", cluster_id, "load-balancers", id],
            &[],
        )?;
        req.body = Some(encode(update)?);
        req.what = Some(format!("load balancer {id} in cluster {cluster_id}"));
        self.execute(req).await
    }

    #[instrument(skip(self))]
    async fn delete_load_balancer(&self, cluster_id: &str, id: &str, keep_public_ip: Option<bool>) -> Result<()> {
        check_id("cluster", cluster_id)?;
        check_id("load balancer", id)?;
        let query: Vec<(&'static str, String)> = keep_public_ip
            .map(|keep| ("keep_public_ip", keep.to_string()))
            .into_iter()
            .collect();
        let mut req = self.request(
            Method::DELETE,
            "/kubernetes/v1/clusters/{cluster_id}/load-balancers/{id}",
            &["kubernetes", "v1", "clusters", cluster_id, "load-balancers", id],
            &query,
        )?;
        req.what = Some(format!("load balancer {id} in cluster {cluster_id}"));
        self.execute::<IgnoredAny>(req).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base: &str) -> HttpPlatform {
        let _ = rustls::crypto::ring::default_provider().install_default();
        match HttpPlatform::new(PlatformClientConfig::new(base, "ops@example.com", "hunter2")) {
            Ok(c) => c,
            Err(e) => panic!("client: {e}"),
        }
    }

    #[test]
    fn config_debug_hides_the_password() {
        let c = PlatformClientConfig::new("https://api.example", "ops@example.com", "hunter2");
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("<redacted>"));
        assert!(!format!("{:?}", client("https://api.example")).contains("hunter2"));
    }

    #[test]
    fn rejects_bad_base_urls() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        for base in ["", "not a url", "ftp://x", "mailto:a@b", "https://u:p@api.example"] {
            let r = HttpPlatform::new(PlatformClientConfig::new(base, "e", "p"));
            assert!(matches!(r, Err(Error::Config { .. })), "{base}");
        }
    }

    #[test]
    fn urls_keep_a_prefix_and_encode_ids_and_labels() -> Result<()> {
        let c = client("https://api.example/prefix/");
        let url = c.url(&["vm", "v1", "instances", "a/b?c"], &[])?;
        assert_eq!(url.as_str(), "https://api.example/prefix/vm/v1/instances/a%2Fb%3Fc");
        let labels = Labels::from([(LABEL_KEY.to_owned(), "cl-1".to_owned())]);
        let url = c.url(&["vm", "v1", "instances"], &label_query(&labels))?;
        let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        assert_eq!(pairs, vec![("label".to_owned(), format!("{LABEL_KEY}=cl-1"))]);
        Ok(())
    }

    const LABEL_KEY: &str = crate::platform::labels::LABEL_CLUSTER_ID;

    #[test]
    fn ids_that_would_change_the_path_are_refused() {
        for id in ["", ".", ".."] {
            assert!(matches!(check_id("instance", id), Err(Error::BadRequest { .. })));
        }
        assert!(check_id("instance", "vm-1").is_ok());
    }

    #[test]
    fn login_decode_errors_never_quote_the_body() {
        let body = br#"{"code":200,"data":{"token":"secret-jwt","expires_at":5}}"#;
        let e = decode_response::<LoginData>(200, &HeaderMap::new(), body).map_err(redact_login_error);
        match e {
            Err(e @ Error::Decode { .. }) => {
                let text = format!("{e} {e:?}");
                assert!(!text.contains("secret-jwt"), "{text}");
            }
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("decoded a bad login answer"),
        }
    }
}

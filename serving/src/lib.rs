//! HTTPS with authentication and authorization delegated to the API server, as upstream
//! cloud-controller-managers serve their `/metrics` (k8s.io/apiserver's delegating
//! authenticator and authorizer):
//!
//! - a bearer token is reviewed with a `TokenReview` (who is it?): no token, or a token
//!   the API server does not know, is `401`;
//! - the user it names is checked with a `SubjectAccessReview` for the non-resource URL
//!   (`nonResourceAttributes {path: /metrics, verb: get}`, what a ClusterRole grants with
//!   `nonResourceURLs: ["/metrics"], verbs: ["get"]`): denied is `403`;
//! - both answers are cached for a short while ([`CacheTtls`], 10 s each by default, like
//!   upstream), so that a scraper costs two API calls per TTL, not per scrape;
//! - the always-open paths ([`OPEN_PATHS`]: `/healthz`, `/readyz`, `/livez`) answer
//!   without a token, as upstream's `--authorization-always-allow-paths` default does, so
//!   that a kubelet's probes reach them.
//!
//! The certificate is the operator's (PEM files, read at start) or, without them, a
//! self-signed one made at start (a scraper then skips verification, as Prometheus does
//! for upstream CCMs with `insecure_skip_verify`).
//!
//! A crate of its own so that the CCM and the gateway share it without depending on each
//! other; it knows nothing of either.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::{Api, PostParams};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::time::Instant;

/// Paths served to anyone, token or not (upstream's `--authorization-always-allow-paths`).
pub const OPEN_PATHS: &[&str] = &["/healthz", "/readyz", "/livez"];

/// How long review answers are kept (upstream: `--authentication-token-webhook-cache-ttl`,
/// `--authorization-webhook-cache-authorized-ttl`, `-unauthorized-ttl`, 10 s each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheTtls {
    /// A `TokenReview`'s answer, authenticated or not.
    pub token: Duration,
    /// A `SubjectAccessReview` that allowed.
    pub authorized: Duration,
    /// A `SubjectAccessReview` that denied.
    pub unauthorized: Duration,
}

impl Default for CacheTtls {
    fn default() -> Self {
        CacheTtls {
            token: Duration::from_secs(10),
            authorized: Duration::from_secs(10),
            unauthorized: Duration::from_secs(10),
        }
    }
}

/// The serving certificate and key (PEM files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where and how the secure server serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecureServing {
    pub bind_address: SocketAddr,
    /// `None`: a self-signed certificate made at start.
    pub cert: Option<CertFiles>,
    pub cache: CacheTtls,
}

impl SecureServing {
    /// Serving on `bind_address` with a self-signed certificate and upstream's cache TTLs.
    pub fn new(bind_address: SocketAddr) -> Self {
        SecureServing {
            bind_address,
            cert: None,
            cache: CacheTtls::default(),
        }
    }
}

/// Errors of setting up the secure server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {}: {reason}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("making a self-signed certificate")]
    SelfSigned(#[source] rcgen::Error),
    #[error("the TLS configuration")]
    Tls(#[source] rustls::Error),
    #[error("binding the secure server on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Who a token belongs to, as the `TokenReview` said.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct User {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: Vec<(String, Vec<String>)>,
}

/// What the API server is asked; [`KubeReviewer`] asks it, tests fake it.
#[async_trait::async_trait]
pub trait Reviewer: Send + Sync + 'static {
    /// `Ok(None)`: the token is not authenticated.
    async fn review_token(&self, token: &str) -> Result<Option<User>, String>;
    /// Whether `user` may `verb` the non-resource URL `path`.
    async fn review_access(&self, user: &User, path: &str, verb: &str) -> Result<bool, String>;
}

/// The reviews as `authentication.k8s.io/v1` and `authorization.k8s.io/v1` objects,
/// created with the server's own client (its ServiceAccount needs `system:auth-delegator`).
#[derive(Clone)]
pub struct KubeReviewer {
    pub client: kube::Client,
}

/// The `TokenReview` of `token`.
pub fn token_review(token: &str) -> TokenReview {
    TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: None,
        },
        ..TokenReview::default()
    }
}

/// The user an answered `TokenReview` authenticated, if it did.
pub fn reviewed_user(review: &TokenReview) -> Option<User> {
    let status = review.status.as_ref()?;
    if status.authenticated != Some(true) {
        return None;
    }
    let u = status.user.as_ref()?;
    let name = u.username.clone().filter(|n| !n.is_empty())?;
    let mut extra: Vec<(String, Vec<String>)> = u.extra.clone().unwrap_or_default().into_iter().collect();
    extra.sort();
    Some(User {
        name,
        uid: u.uid.clone().unwrap_or_default(),
        groups: u.groups.clone().unwrap_or_default(),
        extra,
    })
}

/// The `SubjectAccessReview` of `user` doing `verb` on the non-resource URL `path`.
pub fn access_review(user: &User, path: &str, verb: &str) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            uid: Some(user.uid.clone()).filter(|u| !u.is_empty()),
            groups: Some(user.groups.clone()),
            extra: Some(user.extra.iter().cloned().collect())
                .filter(|e: &std::collections::BTreeMap<_, _>| !e.is_empty()),
            non_resource_attributes: Some(NonResourceAttributes {
                path: Some(path.to_string()),
                verb: Some(verb.to_string()),
            }),
            resource_attributes: None,
        },
        ..SubjectAccessReview::default()
    }
}

/// Whether an answered `SubjectAccessReview` allowed (a denial wins).
pub fn review_allowed(review: &SubjectAccessReview) -> bool {
    review
        .status
        .as_ref()
        .is_some_and(|s| s.allowed && s.denied != Some(true))
}

#[async_trait::async_trait]
impl Reviewer for KubeReviewer {
    async fn review_token(&self, token: &str) -> Result<Option<User>, String> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answered = api
            .create(&PostParams::default(), &token_review(token))
            .await
            .map_err(|e| format!("TokenReview: {e}"))?;
        Ok(reviewed_user(&answered))
    }

    async fn review_access(&self, user: &User, path: &str, verb: &str) -> Result<bool, String> {
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let answered = api
            .create(&PostParams::default(), &access_review(user, path, verb))
            .await
            .map_err(|e| format!("SubjectAccessReview: {e}"))?;
        Ok(review_allowed(&answered))
    }
}

/// A request's verdict, and the status it is answered with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Served.
    Allowed,
    /// `401`: no bearer token, or one the API server does not know (or could not check:
    /// upstream answers 401 then too).
    Unauthenticated,
    /// `403`: the user may not `verb` the path.
    Forbidden { user: String },
    /// `500`: the access review failed.
    Error(String),
}

impl Verdict {
    pub fn status(&self) -> StatusCode {
        match self {
            Verdict::Allowed => StatusCode::OK,
            Verdict::Unauthenticated => StatusCode::UNAUTHORIZED,
            Verdict::Forbidden { .. } => StatusCode::FORBIDDEN,
            Verdict::Error(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The bearer token of an `Authorization` header, if any.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Entries a cache keeps at most: a full cache drops its expired entries, then all.
const CACHE_ENTRIES: usize = 4096;

/// Answers kept until their deadline.
struct TtlCache<K, V> {
    entries: HashMap<K, (V, Instant)>,
}

impl<K: std::hash::Hash + Eq, V: Clone> TtlCache<K, V> {
    fn new() -> Self {
        TtlCache {
            entries: HashMap::new(),
        }
    }

    fn get(&self, k: &K, now: Instant) -> Option<V> {
        self.entries
            .get(k)
            .filter(|(_, until)| now < *until)
            .map(|(v, _)| v.clone())
    }

    fn insert(&mut self, k: K, v: V, ttl: Duration, now: Instant) {
        if ttl.is_zero() {
            return;
        }
        if self.entries.len() >= CACHE_ENTRIES {
            self.entries.retain(|_, (_, until)| now < *until);
            if self.entries.len() >= CACHE_ENTRIES {
                self.entries.clear();
            }
        }
        self.entries.insert(k, (v, now + ttl));
    }
}

/// The SHA-256 of a token: the cache keeps no token itself.
fn token_key(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut k = [0u8; 32];
    k.copy_from_slice(d.as_ref());
    k
}

/// Tokens to users and users to access, through a [`Reviewer`] and two caches.
pub struct Authorizer<R = KubeReviewer> {
    reviewer: R,
    ttls: CacheTtls,
    tokens: Mutex<TtlCache<[u8; 32], Option<User>>>,
    access: Mutex<TtlCache<(User, String, String), bool>>,
}

impl<R: Reviewer> Authorizer<R> {
    pub fn new(reviewer: R, ttls: CacheTtls) -> Self {
        Authorizer {
            reviewer,
            ttls,
            tokens: Mutex::new(TtlCache::new()),
            access: Mutex::new(TtlCache::new()),
        }
    }

    /// The verdict on `token` asking to `verb` `path` (a protected path).
    pub async fn check(&self, token: Option<&str>, path: &str, verb: &str) -> Verdict {
        let Some(token) = token else {
            return Verdict::Unauthenticated;
        };
        let key = token_key(token);
        let cached = self.tokens.lock().expect("token cache").get(&key, Instant::now());
        let user = match cached {
            Some(u) => u,
            None => match self.reviewer.review_token(token).await {
                Ok(u) => {
                    self.tokens
                        .lock()
                        .expect("token cache")
                        .insert(key, u.clone(), self.ttls.token, Instant::now());
                    u
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the token review failed");
                    None
                }
            },
        };
        let Some(user) = user else {
            return Verdict::Unauthenticated;
        };
        let akey = (user.clone(), path.to_string(), verb.to_string());
        let cached = self.access.lock().expect("access cache").get(&akey, Instant::now());
        let allowed = match cached {
            Some(a) => a,
            None => match self.reviewer.review_access(&user, path, verb).await {
                Ok(a) => {
                    let ttl = if a {
                        self.ttls.authorized
                    } else {
                        self.ttls.unauthorized
                    };
                    self.access
                        .lock()
                        .expect("access cache")
                        .insert(akey, a, ttl, Instant::now());
                    a
                }
                Err(e) => return Verdict::Error(e),
            },
        };
        if allowed {
            Verdict::Allowed
        } else {
            Verdict::Forbidden { user: user.name }
        }
    }
}

/// The middleware: open paths pass; any other request needs a verdict of
/// [`Verdict::Allowed`] (the verb is the lower-cased method, as for non-resource URLs).
async fn authorize<R: Reviewer>(State(auth): State<Arc<Authorizer<R>>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if OPEN_PATHS.contains(&path.as_str()) {
        return next.run(req).await;
    }
    let verb = req.method().as_str().to_ascii_lowercase();
    match auth.check(bearer_token(req.headers()), &path, &verb).await {
        Verdict::Allowed => next.run(req).await,
        v @ Verdict::Unauthenticated => {
            (v.status(), [(header::WWW_AUTHENTICATE, "Bearer")], "Unauthorized\n").into_response()
        }
        v @ Verdict::Forbidden { .. } => {
            let Verdict::Forbidden { user } = &v else {
                unreachable!()
            };
            let body = format!("Forbidden: user \"{user}\" cannot {verb} path \"{path}\"\n");
            (v.status(), body).into_response()
        }
        v @ Verdict::Error(_) => {
            let Verdict::Error(e) = &v else { unreachable!() };
            tracing::warn!(error = %e, "the access review failed");
            (v.status(), "Internal Server Error: the access review failed\n").into_response()
        }
    }
}

/// `router` behind [`Authorizer::check`], but for [`OPEN_PATHS`].
pub fn protect<R: Reviewer>(router: Router, auth: Arc<Authorizer<R>>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(auth, authorize::<R>))
}

fn read(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// A rustls server config (ring, h2 and http/1.1) for `cert`, or for a self-signed
/// certificate naming `localhost`, the loopback addresses and `names`.
pub fn tls_config(cert: Option<&CertFiles>, names: &[String]) -> Result<Arc<rustls::ServerConfig>, Error> {
    let (chain, key) = match cert {
        Some(files) => {
            let pem = read("the TLS certificate", &files.cert)?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Pem {
                    what: "the TLS certificate",
                    path: files.cert.clone(),
                    reason: e.to_string(),
                })?;
            if chain.is_empty() {
                return Err(Error::Pem {
                    what: "the TLS certificate",
                    path: files.cert.clone(),
                    reason: "no CERTIFICATE block".into(),
                });
            }
            let key =
                PrivateKeyDer::from_pem_slice(&read("the TLS private key", &files.key)?).map_err(|e| Error::Pem {
                    what: "the TLS private key",
                    path: files.key.clone(),
                    reason: e.to_string(),
                })?;
            (chain, key)
        }
        None => {
            let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
            sans.extend(names.iter().filter(|n| !sans.contains(n)).cloned().collect::<Vec<_>>());
            let ck = rcgen::generate_simple_self_signed(sans).map_err(Error::SelfSigned)?;
            let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).map_err(|e| Error::Pem {
                what: "the self-signed key",
                path: PathBuf::new(),
                reason: e.to_string(),
            })?;
            (vec![ck.cert.der().clone()], key)
        }
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(Error::Tls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(Error::Tls)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves `routes` as `cfg` says: over TLS (the operator's certificate or a self-signed one
/// for the bind address), every path but [`OPEN_PATHS`] behind the API server's reviews,
/// asked with `client`. Returns the bound address and the server task.
pub async fn serve(
    cfg: &SecureServing,
    client: kube::Client,
    routes: Router,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), Error> {
    let names: Vec<String> = Some(cfg.bind_address.ip())
        .filter(|ip| !ip.is_unspecified())
        .map(|ip| ip.to_string())
        .into_iter()
        .collect();
    let tls = tls_config(cfg.cert.as_ref(), &names)?;
    let auth = Arc::new(Authorizer::new(KubeReviewer { client }, cfg.cache));
    let (addr, task) = serve_tls(cfg.bind_address, tls, protect(routes, auth)).await?;
    tracing::info!(address = %addr, self_signed = cfg.cert.is_none(), "secure metrics and health listening (HTTPS)");
    Ok((addr, task))
}

/// A TLS handshake taking longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `addr` and serves `router` over TLS; returns the bound address and the task
/// (aborting it closes the listener and every connection).
pub async fn serve_tls(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), Error> {
    let bind_error = |source| Error::Bind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let task = tokio::spawn(async move {
        // Connections live in this set: aborting the task drops them with it.
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let tcp = match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(e) => {
                            tracing::debug!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    };
                    let (acceptor, router) = (acceptor.clone(), router.clone());
                    conns.spawn(async move {
                        let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await else {
                            return;
                        };
                        let svc = hyper_util::service::TowerToHyperService::new(router);
                        let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                        let _ = builder
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                            .await;
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Tokens `admin` (allowed) and `nobody` (authenticated, denied); anything else is
    /// unknown; `broken` fails the access review. Counts the calls.
    #[derive(Default)]
    struct Fake {
        tokens: AtomicUsize,
        reviews: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Reviewer for Arc<Fake> {
        async fn review_token(&self, token: &str) -> Result<Option<User>, String> {
            self.tokens.fetch_add(1, Ordering::Relaxed);
            Ok(matches!(token, "admin" | "nobody" | "broken").then(|| User {
                name: format!("system:serviceaccount:ns:{token}"),
                groups: vec!["system:authenticated".into()],
                ..User::default()
            }))
        }
        async fn review_access(&self, user: &User, path: &str, verb: &str) -> Result<bool, String> {
            self.reviews.fetch_add(1, Ordering::Relaxed);
            if user.name.ends_with(":broken") {
                return Err("the API server is away".into());
            }
            Ok(user.name.ends_with(":admin") && path == "/metrics" && verb == "get")
        }
    }

    fn calls(f: &Fake) -> (usize, usize) {
        (f.tokens.load(Ordering::Relaxed), f.reviews.load(Ordering::Relaxed))
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_become_verdicts_and_answers_are_cached_for_their_ttl() {
        let fake = Arc::new(Fake::default());
        let auth = Authorizer::new(fake.clone(), CacheTtls::default());
        assert_eq!(auth.check(None, "/metrics", "get").await, Verdict::Unauthenticated);
        assert_eq!(calls(&fake), (0, 0), "no token, no call");
        assert_eq!(
            auth.check(Some("who"), "/metrics", "get").await,
            Verdict::Unauthenticated
        );
        assert_eq!(calls(&fake), (1, 0), "an unknown token is not access-reviewed");
        let denied = auth.check(Some("nobody"), "/metrics", "get").await;
        assert_eq!(
            denied,
            Verdict::Forbidden {
                user: "system:serviceaccount:ns:nobody".into()
            }
        );
        assert_eq!(denied.status(), StatusCode::FORBIDDEN);
        assert_eq!(auth.check(Some("admin"), "/metrics", "get").await, Verdict::Allowed);
        assert_eq!(calls(&fake), (3, 2));
        // Within the TTL: no call at all, whatever the answer was.
        for t in ["who", "nobody", "admin"] {
            auth.check(Some(t), "/metrics", "get").await;
        }
        assert_eq!(calls(&fake), (3, 2), "cached");
        // Another verb is another access review, on the cached user.
        assert!(matches!(
            auth.check(Some("admin"), "/metrics", "post").await,
            Verdict::Forbidden { .. }
        ));
        assert_eq!(calls(&fake), (3, 3));
        // Past the TTL: asked again.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(auth.check(Some("admin"), "/metrics", "get").await, Verdict::Allowed);
        assert_eq!(calls(&fake), (4, 4), "expired");
        // A failed access review is a 500, and not cached.
        let e = auth.check(Some("broken"), "/metrics", "get").await;
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        auth.check(Some("broken"), "/metrics", "get").await;
        assert_eq!(calls(&fake), (5, 6), "the token is cached, the failure is not");
    }

    #[tokio::test(start_paused = true)]
    async fn ttls_are_separate_and_zero_means_no_cache() {
        let fake = Arc::new(Fake::default());
        let ttls = CacheTtls {
            token: Duration::from_secs(60),
            authorized: Duration::from_secs(5),
            unauthorized: Duration::ZERO,
        };
        let auth = Authorizer::new(fake.clone(), ttls);
        auth.check(Some("admin"), "/metrics", "get").await;
        auth.check(Some("nobody"), "/metrics", "get").await;
        auth.check(Some("nobody"), "/metrics", "get").await;
        assert_eq!(calls(&fake), (2, 3), "a denial is not cached with a zero TTL");
        tokio::time::advance(Duration::from_secs(6)).await;
        auth.check(Some("admin"), "/metrics", "get").await;
        assert_eq!(calls(&fake), (2, 4), "the token is still cached, the access not");
    }

    #[test]
    fn bearer_tokens_and_reviews() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
        h.insert(header::AUTHORIZATION, "bearer  abc.def ".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("abc.def"));
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer_token(&h), None);

        let mut tr = token_review("t");
        assert_eq!(tr.spec.token.as_deref(), Some("t"));
        assert_eq!(reviewed_user(&tr), None, "not answered");
        tr.status = Some(
            serde_json::from_value(serde_json::json!({
                "authenticated": true,
                "user": {"username": "system:serviceaccount:a:b", "uid": "u1", "groups": ["g"]}
            }))
            .unwrap(),
        );
        let user = reviewed_user(&tr).unwrap();
        assert_eq!(
            (user.name.as_str(), user.uid.as_str()),
            ("system:serviceaccount:a:b", "u1")
        );
        tr.status.as_mut().unwrap().authenticated = Some(false);
        assert_eq!(reviewed_user(&tr), None);

        let mut sar = access_review(&user, "/metrics", "get");
        let json = serde_json::to_value(&sar).unwrap();
        assert_eq!(
            json["spec"]["nonResourceAttributes"],
            serde_json::json!({"path": "/metrics", "verb": "get"})
        );
        assert_eq!(json["spec"]["user"], "system:serviceaccount:a:b");
        assert_eq!(json["spec"]["groups"], serde_json::json!(["g"]));
        assert!(json["spec"]["resourceAttributes"].is_null());
        assert!(!review_allowed(&sar));
        sar.status = Some(serde_json::from_value(serde_json::json!({"allowed": true})).unwrap());
        assert!(review_allowed(&sar));
        sar.status.as_mut().unwrap().denied = Some(true);
        assert!(!review_allowed(&sar));
    }

    #[test]
    fn a_self_signed_certificate_or_the_given_one() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        tls_config(None, &["kuberaya".into()]).expect("self-signed");
        let dir = std::env::temp_dir().join(format!("secure-http-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        let files = CertFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        };
        std::fs::write(&files.cert, ck.cert.pem()).unwrap();
        std::fs::write(&files.key, ck.signing_key.serialize_pem()).unwrap();
        tls_config(Some(&files), &[]).expect("the files");
        std::fs::write(&files.cert, "not pem").unwrap();
        let e = tls_config(Some(&files), &[]).err().unwrap();
        assert!(e.to_string().contains("the TLS certificate"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        let e = tls_config(Some(&files), &[]).err().unwrap();
        assert!(e.to_string().starts_with("reading the TLS certificate"), "{e}");
    }
}

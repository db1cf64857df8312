//! HTTP routes of the platform stand-in: the public API (behind faults and bearer tokens)
//! and the `/_sandbox/` control API. Every answer is an envelope: our extractors turn
//! every bad request into an [`Error`], and a last layer wraps anything axum answered on
//! its own.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Path, RawQuery, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::{Error, Result};
use super::faults::{self, FaultRules, Outcome};
use super::model::{
    CLUSTER_LABEL, Cluster, ClusterInput, ClusterView, Envelope, Enveloped, IpVersion, LbInput, LbRecord, LbView,
    LoginInput, PrivateIpInput, PublicIpInput, Region, SettingsInput, SettingsView, Subnet, Vm, VmInput, VmState, Vpc,
    rfc3339,
};
use super::query::{self, ListQuery};
use super::{PlatformStandIn, lock, validate};

type AppState = Arc<PlatformStandIn>;

pub fn router(platform: Arc<PlatformStandIn>) -> Router {
    let protected = Router::new()
        .route("/vm/v1/instances", get(list_vms))
        .route("/vm/v1/instances/{id}", get(get_vm))
        .route("/network/v1/vpcs/{id}", get(get_vpc))
        .route("/network/v1/subnets/{id}", get(get_subnet))
        .route("/network/v1/public-ips", get(list_ips).post(create_ip))
        .route("/network/v1/public-ips/{id}", get(get_ip).delete(delete_ip))
        .route("/kubernetes/v1/clusters/{cluster_id}", get(get_cluster))
        .route(
            "/kubernetes/v1/clusters/{cluster_id}/load-balancers",
            get(list_lbs).post(create_lb),
        )
        .route(
            "/kubernetes/v1/clusters/{cluster_id}/load-balancers/{id}",
            get(get_lb).put(put_lb).delete(delete_lb),
        )
        .route_layer(middleware::from_fn_with_state(platform.clone(), require_token));
    // Faults sit outside authentication (a throttled platform does not look at tokens),
    // and counting outside both, so faulted calls are counted too.
    let public = Router::new()
        .route("/core/v1/auth/login", post(login))
        .merge(protected)
        .layer(middleware::from_fn_with_state(platform.clone(), inject_faults))
        .layer(middleware::from_fn_with_state(platform.clone(), count_calls));
    let sandbox = Router::new()
        .route("/_sandbox/state", get(sandbox_state))
        .route("/_sandbox/clusters", post(sandbox_add_cluster))
        .route("/_sandbox/vms", post(sandbox_add_vm))
        .route("/_sandbox/vms/{id}", axum::routing::delete(sandbox_delete_vm))
        .route("/_sandbox/vms/{id}/stop", post(sandbox_stop_vm))
        .route("/_sandbox/vms/{id}/start", post(sandbox_start_vm))
        .route("/_sandbox/vms/{id}/private-ip", put(sandbox_vm_private_ip))
        .route("/_sandbox/config", get(sandbox_config).put(sandbox_set_config))
        .route(
            "/_sandbox/faults",
            get(sandbox_faults).put(sandbox_set_faults).delete(sandbox_clear_faults),
        )
        .route("/_sandbox/calls", get(sandbox_calls).delete(sandbox_clear_calls))
        .route("/_sandbox/tokens/revoke", post(sandbox_revoke_tokens));
    public
        .merge(sandbox)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(envelope_everything))
        .with_state(platform)
}

// ---------------------------------------------------------------------------------------
// Extractors whose rejections are our errors (so axum's plain-text ones never show).

/// A JSON body: bad JSON or a wrong type is a 400 saying what was wrong.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self> {
        let bytes = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(Error::BadRequest("request body must be a JSON object".into()));
        }
        parse_json(&bytes).map(Json)
    }
}

/// A JSON body that may be left out (then `T::default()`).
pub struct OptionalJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self> {
        let bytes = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        parse_json(&bytes).map(OptionalJson)
    }
}

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes> {
    Bytes::from_request(req, state)
        .await
        .map_err(|e| Error::BadRequest(format!("cannot read request body: {}", e.body_text())))
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::BadRequest(format!("invalid JSON body: {e}")))
}

/// Path parameters.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Params<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(t)| Params(t))
            .map_err(|e| Error::BadRequest(e.body_text()))
    }
}

fn reply(status: StatusCode, data: impl Serialize) -> Result<Envelope> {
    Envelope::ok(status, &data).map_err(|e| Error::Internal(format!("cannot serialize answer: {e}")))
}

fn ok(data: impl Serialize) -> Result<Envelope> {
    reply(StatusCode::OK, data)
}

// ---------------------------------------------------------------------------------------
// Middleware

async fn not_found(req: Request) -> Error {
    Error::NotFound(format!("no route for {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> Error {
    Error::MethodNotAllowed(format!(
        "method {} is not allowed on {}",
        req.method(),
        req.uri().path()
    ))
}

/// Wraps any answer that is not yet an envelope (e.g. one axum made on its own).
async fn envelope_everything(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    if response.extensions().get::<Enveloped>().is_some() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .filter(|t| !t.trim().is_empty())
        .unwrap_or_else(|| parts.status.canonical_reason().unwrap_or("unknown error").to_string());
    let text = serde_json::Value::String(text);
    let wrapped = if parts.status.is_success() {
        Envelope::ok(parts.status, &text).ok()
    } else {
        None
    };
    let mut wrapped = wrapped
        .unwrap_or_else(|| Envelope::error(parts.status, &text))
        .into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            wrapped.headers_mut().insert(name.clone(), value.clone());
        }
    }
    wrapped
}

async fn count_calls(State(p): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(path) = req.extensions().get::<MatchedPath>() {
        let key = format!("{} {}", req.method(), path.as_str());
        *lock(&p.calls).entry(key).or_default() += 1;
    }
    next.run(req).await
}

async fn inject_faults(State(p): State<AppState>, req: Request, next: Next) -> Response {
    let decision = lock(&p.faults).decide(req.method().as_str(), req.uri().path(), Instant::now(), &mut || {
        rand::random::<f64>()
    });
    if !decision.delay.is_zero() {
        tokio::time::sleep(decision.delay).await;
    }
    match decision.outcome {
        Outcome::Pass => next.run(req).await,
        Outcome::Hang => {
            let mut released = p.hangs_released.subscribe();
            // Only a server shutting down ends the wait (the client's timeout fires first).
            let _ = released.wait_for(|r| *r).await;
            Error::Injected {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "injected fault: hung call released at shutdown".into(),
            }
            .into_response()
        }
        Outcome::Throttle { retry_after_s } => Error::TooManyRequests {
            message: "rate limited (injected fault)".into(),
            retry_after_s,
        }
        .into_response(),
        Outcome::Fail { status } => Error::Injected {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            message: format!("injected fault: {status}"),
        }
        .into_response(),
    }
}

async fn require_token(State(p): State<AppState>, req: Request<Body>, next: Next) -> Response {
    let authorization = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match p.tokens.check(authorization, SystemTime::now()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

// ---------------------------------------------------------------------------------------
// Public API

async fn login(State(p): State<AppState>, Json(input): Json<LoginInput>) -> Result<Envelope> {
    if input.email != p.config.email || input.password != p.config.password {
        return Err(Error::Unauthorized("wrong email or password".into()));
    }
    let ttl = p.settings().token_ttl;
    let (token, expires_at) = p.tokens.issue(&input.email, ttl, SystemTime::now());
    ok(serde_json::json!({"token": token, "expires_at": rfc3339(expires_at)}))
}

async fn list_vms(State(p): State<AppState>, RawQuery(raw): RawQuery) -> Result<Envelope> {
    let q = ListQuery::parse(raw.as_deref(), &["region", "vpc_id", "subnet_id"])?;
    let store = p.store.lock().await;
    let items: Vec<&Vm> = store
        .state
        .vms
        .iter()
        .filter(|vm| vm.state != VmState::Deleted)
        .filter(|vm| {
            q.matches("region", &vm.region)
                && q.matches("vpc_id", &vm.vpc_id)
                && q.matches("subnet_id", &vm.subnet_id)
                && q.matches_labels(&vm.labels)
        })
        .collect();
    ok(q.paginate(items))
}

async fn get_vm(State(p): State<AppState>, Params(id): Params<String>) -> Result<Envelope> {
    let store = p.store.lock().await;
    match store.state.vm(&id) {
        Some(vm) if vm.state != VmState::Deleted => ok(vm),
        _ => Err(Error::not_found("VM", &id)),
    }
}

async fn get_vpc(State(p): State<AppState>, Params(id): Params<String>) -> Result<Envelope> {
    let store = p.store.lock().await;
    let vpc: &Vpc = store
        .state
        .vpcs
        .iter()
        .find(|v| v.id == id)
        .ok_or_else(|| Error::not_found("VPC", &id))?;
    ok(vpc)
}

async fn get_subnet(State(p): State<AppState>, Params(id): Params<String>) -> Result<Envelope> {
    let store = p.store.lock().await;
    let subnet: &Subnet = store
        .state
        .subnets
        .iter()
        .find(|s| s.id == id)
        .ok_or_else(|| Error::not_found("subnet", &id))?;
    ok(subnet)
}

async fn list_ips(State(p): State<AppState>, RawQuery(raw): RawQuery) -> Result<Envelope> {
    let q = ListQuery::parse(raw.as_deref(), &["region"])?;
    let store = p.store.lock().await;
    let items: Vec<_> = store
        .state
        .public_ips
        .iter()
        .filter(|ip| q.matches("region", &ip.region) && q.matches_labels(&ip.labels))
        .collect();
    ok(q.paginate(items))
}

async fn get_ip(State(p): State<AppState>, Params(id): Params<String>) -> Result<Envelope> {
    let store = p.store.lock().await;
    ok(store
        .state
        .public_ip(&id)
        .ok_or_else(|| Error::not_found("public IP", &id))?)
}

async fn create_ip(State(p): State<AppState>, Json(input): Json<PublicIpInput>) -> Result<Envelope> {
    let mut store = p.store.lock().await;
    let (ip, saved) = store.mutate(|s| {
        let labels = input.labels.clone().unwrap_or_default();
        let mut errors = validate::labels("labels", &labels);
        match input.region.as_deref() {
            None => errors.push(super::FieldError::new("region", "is required")),
            Some(r) if !s.regions.iter().any(|known| known.id == r) => {
                errors.push(super::FieldError::new("region", format!("unknown region {r}")))
            }
            Some(_) => {}
        }
        let region = input.region.as_deref().unwrap_or_default();
        let version = match input.version {
            None => IpVersion::V4,
            Some(n) => match IpVersion::from_number(n) {
                Some(v) => v,
                None => {
                    errors.push(super::FieldError::new("version", format!("must be 4 or 6, got {n}")));
                    IpVersion::V4
                }
            },
        };
        if version == IpVersion::V6 && errors.is_empty() && !p.has_ipv6_pool(region) {
            errors.push(super::FieldError::new(
                "version",
                format!("region {region} has no IPv6 public IPs"),
            ));
        }
        if !errors.is_empty() {
            return Err(Error::Invalid(errors));
        }
        p.acquire_ip(s, region, version, &labels)
    })?;
    drop(store);
    saved.wait().await?;
    reply(StatusCode::CREATED, ip)
}

async fn delete_ip(State(p): State<AppState>, Params(id): Params<String>) -> Result<Envelope> {
    let mut store = p.store.lock().await;
    let (ip, saved) = store.mutate(|s| {
        let ip = s
            .public_ip(&id)
            .cloned()
            .ok_or_else(|| Error::not_found("public IP", &id))?;
        if let Some(att) = &ip.attached_to {
            return Err(Error::Conflict(format!(
                "public IP {id} is attached to {} {}",
                att.kind.replace('_', " "),
                att.id
            )));
        }
        s.public_ips.retain(|other| other.id != id);
        Ok(ip)
    })?;
    drop(store);
    saved.wait().await?;
    ok(ip)
}

async fn get_cluster(State(p): State<AppState>, Params(id): Params<String>) -> Result<Envelope> {
    let store = p.store.lock().await;
    let cluster = store
        .state
        .cluster(&id)
        .ok_or_else(|| Error::not_found("cluster", &id))?;
    ok(ClusterView {
        cluster,
        ip_versions: store.state.cluster_ip_versions(cluster),
    })
}

fn view<'a>(p: &PlatformStandIn, record: &'a LbRecord) -> LbView<'a> {
    LbView {
        lb: &record.lb,
        health: p.health_of(record),
    }
}

async fn list_lbs(
    State(p): State<AppState>,
    Params(cluster_id): Params<String>,
    RawQuery(raw): RawQuery,
) -> Result<Envelope> {
    let q = ListQuery::parse(raw.as_deref(), &[])?;
    let store = p.store.lock().await;
    if store.state.cluster(&cluster_id).is_none() {
        return Err(Error::not_found("cluster", &cluster_id));
    }
    let items: Vec<LbView> = store
        .state
        .load_balancers
        .iter()
        .filter(|r| r.cluster_id == cluster_id && q.matches_labels(&r.lb.labels))
        .map(|r| view(&p, r))
        .collect();
    ok(q.paginate(items))
}

async fn get_lb(State(p): State<AppState>, Params((cluster_id, id)): Params<(String, String)>) -> Result<Envelope> {
    let store = p.store.lock().await;
    let record = PlatformStandIn::find_lb(&store.state, &cluster_id, &id)?;
    ok(view(&p, record))
}

async fn create_lb(
    State(p): State<AppState>,
    Params(cluster_id): Params<String>,
    Json(input): Json<LbInput>,
) -> Result<Envelope> {
    let record = p.create_lb(&cluster_id, input).await?;
    reply(StatusCode::CREATED, view(&p, &record))
}

async fn put_lb(
    State(p): State<AppState>,
    Params((cluster_id, id)): Params<(String, String)>,
    Json(input): Json<LbInput>,
) -> Result<Envelope> {
    let record = p.update_lb(&cluster_id, &id, input).await?;
    ok(view(&p, &record))
}

async fn delete_lb(
    State(p): State<AppState>,
    Params((cluster_id, id)): Params<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Envelope> {
    let mut keep = None;
    for (k, v) in query::pairs(raw.as_deref()) {
        if k == "keep_public_ip" {
            keep = Some(query::parse_bool("keep_public_ip", &v)?);
        }
    }
    let record = p.delete_lb(&cluster_id, &id, keep).await?;
    reply(StatusCode::ACCEPTED, view(&p, &record))
}

// ---------------------------------------------------------------------------------------
// The control API

async fn sandbox_state(State(p): State<AppState>) -> Result<Envelope> {
    let store = p.store.lock().await;
    ok(&store.state)
}

async fn sandbox_add_cluster(State(p): State<AppState>, Json(input): Json<ClusterInput>) -> Result<Envelope> {
    if input.id.trim().is_empty() {
        return Err(Error::invalid("id", "must not be empty"));
    }
    let mut store = p.store.lock().await;
    let (cluster, saved) = store.mutate(|s| {
        if s.cluster(&input.id).is_some() {
            return Err(Error::Conflict(format!("cluster {} already exists", input.id)));
        }
        let region = input.region.clone().unwrap_or_else(|| p.config.region.clone());
        let (default_vpc, default_subnet) = p.default_network(s, &region);
        let vpc_id = match &input.vpc_id {
            None => default_vpc,
            Some(id) => {
                if !s.vpcs.iter().any(|v| &v.id == id) {
                    s.vpcs.push(Vpc {
                        id: id.clone(),
                        name: id.clone(),
                        region: region.clone(),
                        cidr: p.config.vm_ip_range,
                    });
                }
                id.clone()
            }
        };
        let subnet_id = match &input.subnet_id {
            None if input.vpc_id.is_none() => default_subnet,
            None => {
                let id = s.fresh_id("subnet");
                s.subnets.push(Subnet {
                    id: id.clone(),
                    name: id.clone(),
                    vpc_id: vpc_id.clone(),
                    region: region.clone(),
                    cidr: p.config.vm_ip_range,
                    ipv6_cidr: p.config.vm_ipv6_range,
                });
                id
            }
            Some(id) => {
                match s.subnets.iter().find(|sn| &sn.id == id) {
                    Some(sn) if sn.vpc_id != vpc_id => {
                        return Err(Error::invalid(
                            "subnet_id",
                            format!("subnet {id} is in VPC {}, not {vpc_id}", sn.vpc_id),
                        ));
                    }
                    Some(_) => {}
                    None => s.subnets.push(Subnet {
                        id: id.clone(),
                        name: id.clone(),
                        vpc_id: vpc_id.clone(),
                        region: region.clone(),
                        cidr: p.config.vm_ip_range,
                        ipv6_cidr: p.config.vm_ipv6_range,
                    }),
                }
                id.clone()
            }
        };
        if !s.regions.iter().any(|r| r.id == region) {
            s.regions.push(Region {
                id: region.clone(),
                name: region.clone(),
            });
        }
        let cluster = Cluster {
            id: input.id.clone(),
            name: input.name.clone(),
            region,
            vpc_id,
            subnet_id,
        };
        s.clusters.push(cluster.clone());
        Ok(cluster)
    })?;
    drop(store);
    saved.wait().await?;
    reply(StatusCode::CREATED, cluster)
}

async fn sandbox_add_vm(State(p): State<AppState>, Json(input): Json<VmInput>) -> Result<Envelope> {
    if input.name.trim().is_empty() {
        return Err(Error::invalid("name", "must not be empty"));
    }
    let mut labels = input.labels.clone().unwrap_or_default();
    let label_errors = validate::labels("labels", &labels);
    if !label_errors.is_empty() {
        return Err(Error::Invalid(label_errors));
    }
    let mut store = p.store.lock().await;
    let (vm, saved) = store.mutate(|s| {
        let cluster = match &input.cluster_id {
            None => None,
            Some(id) => Some(
                s.cluster(id)
                    .cloned()
                    .ok_or_else(|| Error::invalid("cluster_id", format!("cluster {id} does not exist")))?,
            ),
        };
        if let Some(c) = &cluster {
            labels.insert(CLUSTER_LABEL.to_string(), c.id.clone());
        }
        let subnet_id = match (&input.subnet_id, &cluster) {
            (Some(id), _) => id.clone(),
            (None, Some(c)) => c.subnet_id.clone(),
            (None, None) => {
                let region = p.config.region.clone();
                p.default_network(s, &region).1
            }
        };
        p.add_vm(
            s,
            &input.name,
            &subnet_id,
            labels,
            input.zone.clone(),
            input.package.clone(),
            input.private_ip,
            input.private_ipv6,
            input.public_ip,
        )
    })?;
    drop(store);
    saved.wait().await?;
    reply(StatusCode::CREATED, vm)
}

/// Changes one VM (404 when unknown) and answers it.
async fn change_vm(
    p: &PlatformStandIn,
    id: &str,
    change: impl FnOnce(&mut Vm, &super::store::State) -> Result<()>,
) -> Result<Vm> {
    let mut store = p.store.lock().await;
    let (out, saved) = store.mutate(|s| {
        let snapshot = s.clone();
        let vm = s
            .vm_mut(id)
            .filter(|vm| vm.state != VmState::Deleted)
            .ok_or_else(|| Error::not_found("VM", id))?;
        change(vm, &snapshot)?;
        Ok(vm.clone())
    })?;
    drop(store);
    saved.wait().await?;
    Ok(out)
}

async fn sandbox_stop_vm(State(p): State<AppState>, Params(id): Params<String>) -> Result<Envelope> {
    let vm = change_vm(&p, &id, |vm, _| {
        vm.state = VmState::Stopped;
        Ok(())
    })
    .await?;
    p.reapply_for_vm(&id).await;
    ok(vm)
}

async fn sandbox_start_vm(State(p): State<AppState>, Params(id): Params<String>) -> Result<Envelope> {
    let vm = change_vm(&p, &id, |vm, _| {
        vm.state = VmState::Running;
        Ok(())
    })
    .await?;
    p.reapply_for_vm(&id).await;
    ok(vm)
}

async fn sandbox_delete_vm(State(p): State<AppState>, Params(id): Params<String>) -> Result<Envelope> {
    let mut store = p.store.lock().await;
    let (vm, saved) = store.mutate(|s| {
        let pos = s
            .vms
            .iter()
            .position(|vm| vm.id == id)
            .ok_or_else(|| Error::not_found("VM", &id))?;
        let mut vm = s.vms.remove(pos);
        vm.state = VmState::Deleted;
        Ok(vm)
    })?;
    drop(store);
    saved.wait().await?;
    p.reapply_for_vm(&id).await;
    ok(vm)
}

async fn sandbox_vm_private_ip(
    State(p): State<AppState>,
    Params(id): Params<String>,
    OptionalJson(input): OptionalJson<PrivateIpInput>,
) -> Result<Envelope> {
    let range = p.config.vm_ip_range;
    let vm = change_vm(&p, &id, |vm, s| {
        if let Some(requested) = input.private_ipv6 {
            let subnet = s
                .subnets
                .iter()
                .find(|sn| sn.id == vm.subnet_id)
                .ok_or_else(|| Error::Internal(format!("subnet {} of VM {} is gone", vm.subnet_id, vm.id)))?;
            vm.private_ipv6 = PlatformStandIn::vm_ipv6(s, subnet, Some(requested), Some(&vm.id))?;
            if input.private_ip.is_none() {
                // Only the IPv6 address was asked to change.
                return Ok(());
            }
        }
        let ip = match input.private_ip {
            Some(ip) => {
                if let Some(other) = s.vms.iter().find(|o| o.private_ip == ip && o.id != vm.id) {
                    return Err(Error::Conflict(format!(
                        "private IP {ip} is already used by VM {}",
                        other.id
                    )));
                }
                ip
            }
            None => s
                .free_vm_ip(range)
                .ok_or_else(|| Error::Conflict(format!("no private IP left in {range}")))?,
        };
        // LBs keep the old address until their next PUT (docs: "Data plane").
        vm.private_ip = ip;
        Ok(())
    })
    .await?;
    ok(vm)
}

fn settings_view(p: &PlatformStandIn) -> SettingsView {
    let s = p.settings();
    SettingsView {
        provisioning_delay_ms: s.provisioning_delay.as_millis().try_into().unwrap_or(u64::MAX),
        udp_enabled: s.udp_enabled,
        token_ttl_s: s.token_ttl.as_secs(),
    }
}

async fn sandbox_config(State(p): State<AppState>) -> Result<Envelope> {
    ok(settings_view(&p))
}

async fn sandbox_set_config(State(p): State<AppState>, Json(input): Json<SettingsInput>) -> Result<Envelope> {
    if input.token_ttl_s == Some(0) {
        return Err(Error::invalid("token_ttl_s", "must be at least 1"));
    }
    {
        let mut s = lock(&p.settings);
        if let Some(ms) = input.provisioning_delay_ms {
            s.provisioning_delay = Duration::from_millis(ms);
        }
        if let Some(udp) = input.udp_enabled {
            s.udp_enabled = udp;
        }
        if let Some(ttl) = input.token_ttl_s {
            s.token_ttl = Duration::from_secs(ttl);
        }
    }
    ok(settings_view(&p))
}

async fn sandbox_faults(State(p): State<AppState>) -> Result<Envelope> {
    ok(lock(&p.faults).rules())
}

async fn sandbox_set_faults(State(p): State<AppState>, Json(input): Json<FaultRules>) -> Result<Envelope> {
    let errors = faults::validate(&input.rules);
    if !errors.is_empty() {
        return Err(Error::Invalid(errors));
    }
    let mut f = lock(&p.faults);
    f.set(input.rules);
    ok(f.rules())
}

async fn sandbox_clear_faults(State(p): State<AppState>) -> Result<Envelope> {
    let mut f = lock(&p.faults);
    f.set(Vec::new());
    ok(f.rules())
}

async fn sandbox_calls(State(p): State<AppState>) -> Result<Envelope> {
    ok(&*lock(&p.calls))
}

async fn sandbox_clear_calls(State(p): State<AppState>) -> Result<Envelope> {
    let mut calls = lock(&p.calls);
    calls.clear();
    ok(&*calls)
}

async fn sandbox_revoke_tokens(State(p): State<AppState>) -> Result<Envelope> {
    let revoked = p.tokens.revoke_all(SystemTime::now());
    ok(serde_json::json!({ "revoked": revoked }))
}

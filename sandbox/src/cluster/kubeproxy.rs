//! kube-proxy stand-in: Service traffic to endpoints, for every node of the cluster.
//!
//! - `clusterIP:port` (TCP and UDP) forwards to the Service's ready endpoints. ClusterIPs
//!   are loopback addresses, so one listener serves the whole machine (not one per node).
//! - `nodeIP:nodePort` on every running node forwards to the ready endpoints, or with
//!   `externalTrafficPolicy: Local` to the ready endpoints on that node only (none there:
//!   connections are refused, nothing is forwarded).
//! - With no ready endpoint, serving-and-terminating ones are used, as kube-proxy does.
//! - `sessionAffinity: ClientIP` keeps a client on its endpoint until it has been idle for
//!   `sessionAffinityConfig.clientIP.timeoutSeconds` (default 10800).
//! - Health servers on each running node's IP: `:10256/healthz`, and each Local
//!   LoadBalancer Service's `healthCheckNodePort`, answering 200 with the local endpoint
//!   count when the node has ready local endpoints and 503 otherwise.
//!
//! [`desired`] computes every listener from the caches (pure); `Proxy` makes the running
//! sockets match it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use super::balance::{Balancer, Target};
use super::endpointslices::SERVICE_NAME_LABEL;
use super::net::{self, Route};
use super::nodes::LocalNode;
use super::{Context, Result, control_loop};

/// kube-proxy's own health server port.
pub const PROXY_HEALTH_PORT: u16 = 10256;
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when not set.
const DEFAULT_AFFINITY_TIMEOUT_S: u64 = 10_800;
/// A listener that could not be bound is tried again after this long.
const BIND_RETRY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

/// What a health listener answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthAnswer {
    /// kube-proxy's `:10256/healthz`: the node is eligible.
    Proxy,
    /// A Service's `healthCheckNodePort` on one node.
    Service {
        namespace: String,
        name: String,
        local_endpoints: usize,
    },
}

impl HealthAnswer {
    /// Status code and JSON body, as kube-proxy answers.
    pub fn respond(&self, path: &str) -> (u16, String) {
        match self {
            HealthAnswer::Proxy => {
                if path != "/healthz" && path != "/livez" {
                    return (404, "404 page not found\n".into());
                }
                let now = k8s_openapi::jiff::Timestamp::now().to_string();
                (
                    200,
                    json!({"lastUpdated": now, "currentTime": now, "nodeEligible": true}).to_string(),
                )
            }
            HealthAnswer::Service {
                namespace,
                name,
                local_endpoints,
            } => {
                let body = json!({
                    "service": {"namespace": namespace, "name": name},
                    "localEndpoints": local_endpoints,
                    "serviceProxyHealthy": true,
                });
                (if *local_endpoints > 0 { 200 } else { 503 }, body.to_string())
            }
        }
    }
}

/// Every listener kube-proxy should have now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub forwards: BTreeMap<(Proto, SocketAddr), Target>,
    pub health: BTreeMap<SocketAddr, HealthAnswer>,
}

/// One endpoint of a Service port, as the slices show it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    addr: SocketAddr,
    node: Option<String>,
    ready: bool,
    serving: bool,
    terminating: bool,
}

fn proto_of(p: Option<&str>) -> Option<Proto> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        _ => None,
    }
}

/// An address family, as EndpointSlices' `addressType` and Services' `ipFamilies` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }
}

/// The Service's families (`ipFamilies`, IPv4 when unset): kube-proxy serves a family's
/// NodePorts only for Services of that family, as each family's proxier does.
fn service_families(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Vec<Family> {
    let listed: Vec<Family> = spec
        .ip_families
        .iter()
        .flatten()
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        })
        .collect();
    if listed.is_empty() { vec![Family::V4] } else { listed }
}

/// The Service's ClusterIPs (`clusterIPs`, else `clusterIP`); none when headless.
fn cluster_ips(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Vec<IpAddr> {
    let listed: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    if listed.is_empty() {
        spec.cluster_ip.iter().filter_map(|ip| ip.parse().ok()).collect()
    } else {
        listed
    }
}

/// The endpoints of `port` of `family` in `slices` (the Service's slices).
fn port_endpoints(port: &ServicePort, slices: &[&EndpointSlice], family: Family) -> Vec<Endpoint> {
    let name = port.name.as_deref().unwrap_or("");
    let proto = proto_of(port.protocol.as_deref());
    let mut out = Vec::new();
    for slice in slices {
        if slice.address_type != family.name() {
            continue;
        }
        let Some(target_port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == name && proto_of(p.protocol.as_deref()) == proto)
        else {
            continue;
        };
        let Some(number) = target_port.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for ep in &slice.endpoints {
            let Some(ip) = ep
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .filter(|ip| Family::of(*ip) == family)
            else {
                continue;
            };
            let c = ep.conditions.clone().unwrap_or_default();
            let ready = c.ready.unwrap_or(true);
            out.push(Endpoint {
                addr: SocketAddr::new(ip, number),
                node: ep.node_name.clone(),
                ready,
                serving: c.serving.unwrap_or(ready),
                terminating: c.terminating.unwrap_or(false),
            });
        }
    }
    out
}

/// The addresses to forward to: the ready endpoints (on `node` only, when given); when
/// none is ready, the serving and terminating ones.
fn usable(endpoints: &[Endpoint], node: Option<&str>) -> Vec<SocketAddr> {
    let local: Vec<&Endpoint> = endpoints
        .iter()
        .filter(|e| node.is_none_or(|n| e.node.as_deref() == Some(n)))
        .collect();
    let ready: BTreeSet<SocketAddr> = local.iter().filter(|e| e.ready).map(|e| e.addr).collect();
    let chosen = if ready.is_empty() {
        local
            .iter()
            .filter(|e| e.serving && e.terminating)
            .map(|e| e.addr)
            .collect()
    } else {
        ready
    };
    chosen.into_iter().collect()
}

fn affinity(svc: &Service) -> Option<Duration> {
    let spec = svc.spec.as_ref()?;
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .and_then(|t| u64::try_from(t).ok())
        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S);
    Some(Duration::from_secs(timeout))
}

/// Every listener for `services` and their `slices`, on the running `nodes`.
pub fn desired(services: &[Arc<Service>], slices: &[Arc<EndpointSlice>], nodes: &[LocalNode]) -> Desired {
    let mut by_service: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let ns = slice.metadata.namespace.clone().unwrap_or_default();
        if let Some(svc) = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
            by_service.entry((ns, svc.clone())).or_default().push(slice);
        }
    }
    let running: Vec<&LocalNode> = nodes.iter().filter(|n| n.running).collect();
    // Each running node's address of each family.
    let node_ips = |family: Family| -> Vec<(&LocalNode, IpAddr)> {
        running
            .iter()
            .filter_map(|n| match family {
                Family::V4 => Some((*n, IpAddr::V4(n.ip))),
                Family::V6 => n.ipv6.map(|ip| (*n, IpAddr::V6(ip))),
            })
            .collect()
    };
    let mut out = Desired::default();
    for family in [Family::V4, Family::V6] {
        for (_, ip) in node_ips(family) {
            out.health
                .insert(SocketAddr::new(ip, PROXY_HEALTH_PORT), HealthAnswer::Proxy);
        }
    }
    for svc in services {
        let Some(spec) = svc.spec.as_ref() else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let namespace = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let svc_slices = by_service
            .get(&(namespace.clone(), name.clone()))
            .cloned()
            .unwrap_or_default();
        let cluster_ips = cluster_ips(spec);
        let families = service_families(spec);
        let local_policy = spec.external_traffic_policy.as_deref() == Some("Local");
        let affinity = affinity(svc);
        let mut local_counts: BTreeMap<&str, BTreeSet<IpAddr>> = BTreeMap::new();
        for port in spec.ports.iter().flatten() {
            let Some(proto) = proto_of(port.protocol.as_deref()) else {
                continue;
            };
            let Ok(number) = u16::try_from(port.port) else { continue };
            for &family in &families {
                let endpoints = port_endpoints(port, &svc_slices, family);
                // The health check counts the primary family's endpoints (one per pod).
                if family == families[0] {
                    for node in &running {
                        let local_ready = endpoints
                            .iter()
                            .filter(|e| e.ready && e.node.as_deref() == Some(node.name.as_str()));
                        local_counts
                            .entry(node.name.as_str())
                            .or_default()
                            .extend(local_ready.map(|e| e.addr.ip()));
                    }
                }
                for ip in cluster_ips.iter().filter(|ip| Family::of(**ip) == family) {
                    out.forwards.insert(
                        (proto, SocketAddr::new(*ip, number)),
                        Target {
                            backends: usable(&endpoints, None),
                            affinity,
                        },
                    );
                }
                let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
                    continue;
                };
                for (node, ip) in node_ips(family) {
                    let only = local_policy.then_some(node.name.as_str());
                    out.forwards.insert(
                        (proto, SocketAddr::new(ip, node_port)),
                        Target {
                            backends: usable(&endpoints, only),
                            affinity,
                        },
                    );
                }
            }
        }
        let hc_port = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0);
        if let Some(hc_port) = hc_port.filter(|_| local_policy && spec.type_.as_deref() == Some("LoadBalancer")) {
            for (node, ip) in node_ips(Family::V4).into_iter().chain(node_ips(Family::V6)) {
                let local_endpoints = local_counts.get(node.name.as_str()).map_or(0, BTreeSet::len);
                out.health.insert(
                    SocketAddr::new(ip, hc_port),
                    HealthAnswer::Service {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        local_endpoints,
                    },
                );
            }
        }
    }
    out
}

struct RunningForward {
    route: Arc<Route>,
    cancel: CancellationToken,
}

struct RunningHealth {
    answer: Arc<RwLock<HealthAnswer>>,
    cancel: CancellationToken,
}

/// The running listeners, made to match [`Desired`].
#[derive(Default)]
pub(crate) struct Proxy {
    forwards: HashMap<(Proto, SocketAddr), RunningForward>,
    health: HashMap<SocketAddr, RunningHealth>,
    /// Listeners that failed to bind, when, and why.
    failed: HashMap<(Proto, SocketAddr), (Instant, String)>,
    tasks: TaskTracker,
}

impl Proxy {
    fn may_try(&mut self, key: (Proto, SocketAddr)) -> bool {
        self.failed.get(&key).is_none_or(|(t, _)| t.elapsed() >= BIND_RETRY)
    }

    fn bind_failed(&mut self, key: (Proto, SocketAddr), error: &std::io::Error) {
        if !self.failed.contains_key(&key) {
            tracing::warn!(protocol = ?key.0, addr = %key.1, %error, "kube-proxy cannot listen");
        }
        self.failed.insert(key, (Instant::now(), error.to_string()));
    }

    /// The listeners that could not bind, as `PROTO ADDR: error`, in address order.
    pub fn failures(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .failed
            .iter()
            .map(|((proto, addr), (_, e))| format!("{proto:?} {addr}: {e}"))
            .collect();
        out.sort();
        out
    }

    /// Starts, updates and stops listeners so that they are `want`.
    pub fn apply(&mut self, want: Desired, parent: &CancellationToken) {
        self.forwards.retain(|key, running| {
            let keep = want.forwards.contains_key(key);
            if !keep {
                running.cancel.cancel();
                tracing::debug!(protocol = ?key.0, addr = %key.1, "kube-proxy listener stopped");
            }
            keep
        });
        self.health.retain(|addr, running| {
            let keep = want.health.contains_key(addr);
            if !keep {
                running.cancel.cancel();
            }
            keep
        });
        self.failed
            .retain(|key, _| want.forwards.contains_key(key) || want.health.contains_key(&key.1));
        for (key, target) in want.forwards {
            if let Some(running) = self.forwards.get(&key) {
                if *running.route.target() != target {
                    running.route.set_target(target);
                }
                continue;
            }
            if !self.may_try(key) {
                continue;
            }
            let cancel = parent.child_token();
            let route = Arc::new(Route::new(target));
            let started = match key.0 {
                Proto::Tcp => net::bind_tcp(key.1).map(|l| {
                    self.tasks.spawn(net::forward_tcp(
                        l,
                        Arc::clone(&route),
                        cancel.clone(),
                        self.tasks.clone(),
                    ));
                }),
                Proto::Udp => net::bind_udp(key.1).map(|s| {
                    self.tasks.spawn(net::forward_udp(
                        s,
                        Arc::clone(&route),
                        cancel.clone(),
                        self.tasks.clone(),
                    ));
                }),
            };
            match started {
                Ok(()) => {
                    self.failed.remove(&key);
                    tracing::debug!(protocol = ?key.0, addr = %key.1, "kube-proxy listener started");
                    self.forwards.insert(key, RunningForward { route, cancel });
                }
                Err(e) => self.bind_failed(key, &e),
            }
        }
        for (addr, answer) in want.health {
            if let Some(running) = self.health.get(&addr) {
                let mut current = running.answer.write().unwrap_or_else(PoisonError::into_inner);
                if *current != answer {
                    *current = answer;
                }
                continue;
            }
            let key = (Proto::Tcp, addr);
            if !self.may_try(key) {
                continue;
            }
            match net::bind_tcp(addr) {
                Ok(listener) => {
                    self.failed.remove(&key);
                    let cancel = parent.child_token();
                    let answer = Arc::new(RwLock::new(answer));
                    let shared = Arc::clone(&answer);
                    let respond = Arc::new(move |path: &str| {
                        let (status, body) = shared.read().unwrap_or_else(PoisonError::into_inner).respond(path);
                        (status, "application/json", body)
                    });
                    self.tasks
                        .spawn(net::serve_http(listener, respond, cancel.clone(), self.tasks.clone()));
                    self.health.insert(addr, RunningHealth { answer, cancel });
                }
                Err(e) => self.bind_failed(key, &e),
            }
        }
    }

    /// Stops every listener and waits (bounded) for the sockets to close.
    pub async fn stop(&mut self) {
        for (_, r) in self.forwards.drain() {
            r.cancel.cancel();
        }
        for (_, r) in self.health.drain() {
            r.cancel.cancel();
        }
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.tasks.wait()).await;
    }
}

/// Keeps the listeners of every node (and the ClusterIPs) in line with the caches.
pub(crate) async fn run(ctx: Arc<Context>) {
    let proxy = Arc::new(tokio::sync::Mutex::new(Proxy::default()));
    let looped = Arc::clone(&proxy);
    let c = Arc::clone(&ctx);
    control_loop(Arc::clone(&ctx), "kube-proxy", move || {
        let (ctx, proxy) = (Arc::clone(&c), Arc::clone(&looped));
        async move {
            let want = desired(&ctx.services.state(), &ctx.slices.state(), &ctx.local_nodes());
            let mut proxy = proxy.lock().await;
            proxy.apply(want, &ctx.cancel);
            ctx.listen_failures.send_replace(proxy.failures());
            Result::Ok(())
        }
    })
    .await;
    proxy.lock().await.stop().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ClientIPConfig, ServiceSpec, SessionAffinityConfig};
    use k8s_openapi::api::discovery::v1::{Endpoint as SliceEndpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::net::Ipv4Addr;

    fn svc(name: &str, type_: &str, ports: Vec<ServicePort>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some(type_.into()),
                cluster_ip: Some("127.96.0.10".into()),
                ports: Some(ports),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn port(name: &str, proto: &str, port: i32, node_port: Option<i32>) -> ServicePort {
        ServicePort {
            name: Some(name.into()),
            protocol: Some(proto.into()),
            port,
            node_port,
            ..Default::default()
        }
    }

    fn ep(ip: &str, node: &str, ready: bool, terminating: bool) -> SliceEndpoint {
        SliceEndpoint {
            addresses: vec![ip.into()],
            node_name: Some(node.into()),
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(ready || terminating),
                terminating: Some(terminating),
            }),
            ..Default::default()
        }
    }

    fn slice(svc: &str, ports: &[(&str, &str, i32)], endpoints: Vec<SliceEndpoint>) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{svc}-abcde")),
                namespace: Some("default".into()),
                labels: Some(BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), svc.to_string())])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints,
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p, num)| EndpointPort {
                        name: Some((*n).into()),
                        protocol: Some((*p).into()),
                        port: Some(*num),
                        app_protocol: None,
                    })
                    .collect(),
            ),
        })
    }

    fn node(name: &str, last: u8, running: bool) -> LocalNode {
        LocalNode {
            name: name.into(),
            vm_id: format!("vm-{name}"),
            running,
            ip: Ipv4Addr::new(127, 10, 0, last),
            pod_cidr: None,
            ipv6: None,
            pod_cidr_v6: None,
            registered: true,
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn three_nodes() -> Vec<LocalNode> {
        vec![node("w1", 1, true), node("w2", 2, true), node("w3", 3, true)]
    }

    #[test]
    fn cluster_ip_once_and_node_port_on_every_running_node() {
        let s = Arc::new(svc("web", "NodePort", vec![port("", "TCP", 80, Some(30080))]));
        let sl = slice(
            "web",
            &[("", "TCP", 8080)],
            vec![
                ep("127.244.1.1", "w1", true, false),
                ep("127.244.2.1", "w2", true, false),
            ],
        );
        let mut nodes = three_nodes();
        nodes[2].running = false;
        let d = desired(&[s], &[sl], &nodes);
        let backends = vec![sa("127.244.1.1:8080"), sa("127.244.2.1:8080")];
        assert_eq!(d.forwards[&(Proto::Tcp, sa("127.96.0.10:80"))].backends, backends);
        assert_eq!(d.forwards[&(Proto::Tcp, sa("127.10.0.1:30080"))].backends, backends);
        assert_eq!(d.forwards[&(Proto::Tcp, sa("127.10.0.2:30080"))].backends, backends);
        assert!(
            !d.forwards.contains_key(&(Proto::Tcp, sa("127.10.0.3:30080"))),
            "stopped node"
        );
        assert_eq!(d.forwards.len(), 3);
        assert_eq!(d.health.len(), 2);
        assert_eq!(d.health[&sa("127.10.0.1:10256")], HealthAnswer::Proxy);
    }

    #[test]
    fn not_ready_endpoints_get_nothing_unless_only_terminating_serve() {
        let s = Arc::new(svc("web", "ClusterIP", vec![port("http", "TCP", 80, None)]));
        let sl = slice(
            "web",
            &[("http", "TCP", 8080)],
            vec![
                ep("127.244.1.1", "w1", true, false),
                ep("127.244.1.2", "w1", false, false),
            ],
        );
        let d = desired(std::slice::from_ref(&s), &[sl], &three_nodes());
        assert_eq!(
            d.forwards[&(Proto::Tcp, sa("127.96.0.10:80"))].backends,
            vec![sa("127.244.1.1:8080")]
        );
        let sl = slice(
            "web",
            &[("http", "TCP", 8080)],
            vec![
                ep("127.244.1.1", "w1", false, true),
                ep("127.244.1.2", "w1", false, false),
            ],
        );
        let d = desired(&[s], &[sl], &three_nodes());
        assert_eq!(
            d.forwards[&(Proto::Tcp, sa("127.96.0.10:80"))].backends,
            vec![sa("127.244.1.1:8080")]
        );
    }

    #[test]
    fn local_policy_forwards_and_reports_only_local_endpoints() {
        let mut s = svc("web", "LoadBalancer", vec![port("", "TCP", 80, Some(30080))]);
        let spec = s.spec.as_mut().unwrap();
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(31999);
        let sl = slice("web", &[("", "TCP", 8080)], vec![ep("127.244.2.1", "w2", true, false)]);
        let d = desired(&[Arc::new(s)], &[sl], &three_nodes());
        assert_eq!(d.forwards[&(Proto::Tcp, sa("127.10.0.1:30080"))].backends, vec![]);
        assert_eq!(
            d.forwards[&(Proto::Tcp, sa("127.10.0.2:30080"))].backends,
            vec![sa("127.244.2.1:8080")]
        );
        assert_eq!(
            d.forwards[&(Proto::Tcp, sa("127.96.0.10:80"))].backends,
            vec![sa("127.244.2.1:8080")]
        );
        let answer = |addr: &str| d.health[&sa(addr)].respond("/healthz");
        assert_eq!(answer("127.10.0.2:31999").0, 200);
        assert_eq!(answer("127.10.0.1:31999").0, 503);
        assert_eq!(answer("127.10.0.3:31999").0, 503);
        let body: serde_json::Value = serde_json::from_str(&answer("127.10.0.2:31999").1).unwrap();
        assert_eq!(body["localEndpoints"], 1);
        assert_eq!(body["service"]["name"], "web");
    }

    #[test]
    fn udp_and_named_ports_match_by_name_and_protocol() {
        let s = Arc::new(svc(
            "dns",
            "NodePort",
            vec![
                port("dns-udp", "UDP", 53, Some(30053)),
                port("dns-tcp", "TCP", 53, Some(30054)),
            ],
        ));
        let sl = slice(
            "dns",
            &[("dns-udp", "UDP", 5353), ("dns-tcp", "TCP", 5354)],
            vec![ep("127.244.1.1", "w1", true, false)],
        );
        let d = desired(&[s], &[sl], &[node("w1", 1, true)]);
        assert_eq!(
            d.forwards[&(Proto::Udp, sa("127.96.0.10:53"))].backends,
            vec![sa("127.244.1.1:5353")]
        );
        assert_eq!(
            d.forwards[&(Proto::Tcp, sa("127.96.0.10:53"))].backends,
            vec![sa("127.244.1.1:5354")]
        );
        assert_eq!(
            d.forwards[&(Proto::Udp, sa("127.10.0.1:30053"))].backends,
            vec![sa("127.244.1.1:5353")]
        );
    }

    #[test]
    fn round_robin_reaches_every_endpoint() {
        let target = Target {
            backends: vec![sa("10.0.0.1:1"), sa("10.0.0.2:1"), sa("10.0.0.3:1")],
            affinity: None,
        };
        let mut b = Balancer::default();
        let client: IpAddr = "127.0.0.1".parse().unwrap();
        let now = Instant::now();
        let picks: BTreeSet<SocketAddr> = (0..3).map(|_| b.pick(client, &target, &[], now).unwrap()).collect();
        assert_eq!(picks.len(), 3);
        let other = b.pick(client, &target, &[sa("10.0.0.1:1"), sa("10.0.0.2:1")], now);
        assert_eq!(other, Some(sa("10.0.0.3:1")));
        assert_eq!(
            b.pick(
                client,
                &Target {
                    backends: vec![],
                    affinity: None
                },
                &[],
                now
            ),
            None
        );
    }

    #[test]
    fn client_ip_affinity_sticks_until_idle_for_the_timeout() {
        let target = Target {
            backends: vec![sa("10.0.0.1:1"), sa("10.0.0.2:1"), sa("10.0.0.3:1")],
            affinity: Some(Duration::from_secs(10)),
        };
        let mut b = Balancer::default();
        let client: IpAddr = "127.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        let first = b.pick(client, &target, &[], t0).unwrap();
        for i in 1..5 {
            assert_eq!(
                b.pick(client, &target, &[], t0 + Duration::from_secs(i * 5)),
                Some(first)
            );
        }
        // Idle for longer than the timeout: a new pick happens (round robin moves on).
        let mut b = Balancer::default();
        let first = b.pick(client, &target, &[], t0).unwrap();
        let next = b.pick(client, &target, &[], t0 + Duration::from_secs(11)).unwrap();
        assert_ne!(first, next);
        // The sticky endpoint leaving moves the client.
        let without: Target = Target {
            backends: target.backends.iter().copied().filter(|b| *b != next).collect(),
            ..target.clone()
        };
        assert_ne!(b.pick(client, &without, &[], t0 + Duration::from_secs(12)), Some(next));
    }

    #[test]
    fn affinity_timeout_comes_from_the_service() {
        let mut s = svc("web", "ClusterIP", vec![]);
        assert_eq!(affinity(&s), None);
        s.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
        assert_eq!(affinity(&s), Some(Duration::from_secs(10_800)));
        s.spec.as_mut().unwrap().session_affinity_config = Some(SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(30),
            }),
        });
        assert_eq!(affinity(&s), Some(Duration::from_secs(30)));
    }

    #[test]
    fn proxy_health_answers_healthz_only() {
        assert_eq!(HealthAnswer::Proxy.respond("/healthz").0, 200);
        assert_eq!(HealthAnswer::Proxy.respond("/other").0, 404);
    }

    #[test]
    fn dual_stack_services_are_served_on_both_families_and_single_stack_ones_on_one() {
        let mut dual = svc("web", "NodePort", vec![port("", "TCP", 80, Some(30080))]);
        let spec = dual.spec.as_mut().unwrap();
        spec.cluster_ips = Some(vec!["127.96.0.10".into(), "fd00:96::a".into()]);
        spec.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
        let v4 = slice("web", &[("", "TCP", 8080)], vec![ep("127.244.1.1", "w1", true, false)]);
        let mut v6 = (*slice(
            "web",
            &[("", "TCP", 8080)],
            vec![ep("fd00:244:1::1", "w1", true, false)],
        ))
        .clone();
        v6.address_type = "IPv6".into();
        let mut nodes = three_nodes();
        nodes[0].ipv6 = Some("fd00:10::1".parse().unwrap());
        let single = svc("old", "NodePort", vec![port("", "TCP", 81, Some(30081))]);
        let d = desired(&[Arc::new(dual), Arc::new(single)], &[v4, Arc::new(v6)], &nodes);
        let backends = |a: &str| d.forwards[&(Proto::Tcp, sa(a))].backends.clone();
        assert_eq!(backends("127.96.0.10:80"), vec![sa("127.244.1.1:8080")]);
        assert_eq!(backends("[fd00:96::a]:80"), vec![sa("[fd00:244:1::1]:8080")]);
        assert_eq!(backends("127.10.0.1:30080"), vec![sa("127.244.1.1:8080")]);
        assert_eq!(backends("[fd00:10::1]:30080"), vec![sa("[fd00:244:1::1]:8080")]);
        // An IPv4-only Service gets no IPv6 NodePort; nodes without IPv6 none either.
        assert!(!d.forwards.contains_key(&(Proto::Tcp, sa("[fd00:10::1]:30081"))));
        assert!(d.forwards.contains_key(&(Proto::Tcp, sa("127.10.0.1:30081"))));
        assert_eq!(d.forwards.keys().filter(|(_, a)| a.is_ipv6()).count(), 2);
        assert_eq!(d.health[&sa("[fd00:10::1]:10256")], HealthAnswer::Proxy);
    }
}

//! The kubelet's pod side, for every node of the cluster: a Pod bound to a node gets an IP
//! in the node's `spec.podCIDR` (`127.244.<node>.<n>` by default), becomes `Running` and
//! `Ready`, and each declared `containerPort` is served on `podIP:port` by a built-in
//! responder:
//!
//! - TCP: a request that starts like HTTP gets `200` with `pod=<name> namespace=<ns>
//!   node=<node>\n`; anything else is echoed (every TCP port echoes with the annotation
//!   `sandbox.kuberaya.io/responder: echo`);
//! - UDP: every datagram comes back prefixed with `pod=<name> `.
//!
//! `sandbox.kuberaya.io/ready: "false"` makes a pod not ready (it keeps answering, as a
//! real pod failing its readiness probe does). Pods on a node whose VM is stopped are not
//! ready and do not answer.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::nodes::LocalNode;
use super::{Context, READY_ANNOTATION, RESPONDER_ANNOTATION, Result, control_loop, is_not_found, net, now};

/// A responder that could not bind is tried again after this long.
const BIND_RETRY: Duration = Duration::from_secs(2);
/// Bound on waiting for a client's first bytes.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether the Pod's `Ready` condition is `True`.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// Whether the pod should be ready: its node's VM runs and the annotation does not say no.
pub fn wants_ready(pod: &Pod, node_running: bool) -> bool {
    let annotation = pod.metadata.annotations.as_ref().and_then(|a| a.get(READY_ANNOTATION));
    node_running && annotation.map(String::as_str) != Some("false")
}

/// The lowest address of `cidr` not in `used`.
pub fn allocate_ip(cidr: Ipv4Net, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    cidr.hosts().find(|ip| !used.contains(ip))
}

/// A pod's (or its node's) addresses: IPv4, and IPv6 in a dual-stack cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
}

impl From<Ipv4Addr> for Addresses {
    fn from(v4: Ipv4Addr) -> Self {
        Self { v4, v6: None }
    }
}

impl Addresses {
    /// IPv4 first, as `status.podIPs` and `hostIPs` list them.
    pub fn all(&self) -> Vec<IpAddr> {
        std::iter::once(IpAddr::V4(self.v4))
            .chain(self.v6.map(IpAddr::V6))
            .collect()
    }

    fn listed(&self) -> Vec<Value> {
        self.all().iter().map(|ip| json!({"ip": ip.to_string()})).collect()
    }
}

/// The IPv6 address paired with the pod's IPv4 one: the same offset in the node's IPv6
/// pod range (`127.244.3.7` → `fd00:244:0:3::7`).
pub fn paired_ipv6(v4: Ipv4Addr, cidr: Ipv4Net, cidr_v6: Ipv6Net) -> Option<Ipv6Addr> {
    let offset = u32::from(v4).checked_sub(u32::from(cidr.network()))?;
    let ip = Ipv6Addr::from(u128::from(cidr_v6.network()) + u128::from(offset));
    cidr_v6.contains(&ip).then_some(ip)
}

/// The HTTP body a pod's responder answers with.
pub fn http_body(pod: &str, namespace: &str, node: &str) -> String {
    format!("pod={pod} namespace={namespace} node={node}\n")
}

/// The declared ports of every container: (protocol is UDP, port).
fn declared_ports(pod: &Pod) -> Vec<(bool, u16)> {
    let mut ports: Vec<(bool, u16)> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let udp = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => false,
                "UDP" => true,
                _ => return None,
            };
            Some((udp, u16::try_from(p.container_port).ok()?))
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The status a kubelet reports for a running pod; transition times kept when unchanged.
pub fn desired_status(pod: &Pod, ip: impl Into<Addresses>, host_ip: impl Into<Addresses>, ready: bool) -> Value {
    let (ip, host_ip): (Addresses, Addresses) = (ip.into(), host_ip.into());
    let ts = now();
    let old = pod.status.clone().unwrap_or_default();
    let since = |t: &str, status: &str| {
        old.conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| ts.clone())
    };
    let cond = |t: &str, ok: bool| {
        let status = if ok { "True" } else { "False" };
        let mut c = json!({"type": t, "status": status, "lastTransitionTime": since(t, status)});
        if !ok {
            c["reason"] = json!("ContainersNotReady");
        }
        c
    };
    let started = old.start_time.clone().unwrap_or_else(|| ts.clone());
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let containers: Vec<Value> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| {
            json!({
                "name": c.name,
                "image": c.image.clone().unwrap_or_default(),
                "imageID": format!("sandbox://{}", c.image.clone().unwrap_or_default()),
                "containerID": format!("sandbox://{uid}/{}", c.name),
                "ready": ready,
                "started": true,
                "restartCount": 0,
                "state": {"running": {"startedAt": started}},
            })
        })
        .collect();
    json!({
        "phase": "Running",
        "podIP": ip.v4.to_string(),
        "podIPs": ip.listed(),
        "hostIP": host_ip.v4.to_string(),
        "hostIPs": host_ip.listed(),
        "startTime": started,
        "qosClass": old.qos_class.clone().unwrap_or_else(|| "BestEffort".into()),
        "conditions": [
            cond("PodReadyToStartContainers", true),
            cond("Initialized", true),
            cond("Ready", ready),
            cond("ContainersReady", ready),
            cond("PodScheduled", true),
        ],
        "containerStatuses": containers,
    })
}

/// Whether the pod's status differs from what the kubelet reports (times aside).
pub fn needs_status(pod: &Pod, ip: impl Into<Addresses>, host_ip: impl Into<Addresses>, ready: bool) -> bool {
    let (ip, host_ip): (Addresses, Addresses) = (ip.into(), host_ip.into());
    let Some(s) = pod.status.as_ref() else { return true };
    let listed = |l: &Option<Vec<String>>| l.clone().unwrap_or_default();
    let pod_ips = listed(&s.pod_ips.as_ref().map(|l| l.iter().map(|p| p.ip.clone()).collect()));
    let host_ips = listed(&s.host_ips.as_ref().map(|l| l.iter().map(|p| p.ip.clone()).collect()));
    let text = |a: &Addresses| a.all().iter().map(ToString::to_string).collect::<Vec<_>>();
    let containers = pod.spec.as_ref().map_or(0, |s| s.containers.len());
    let statuses = s.container_statuses.as_deref().unwrap_or_default();
    s.phase.as_deref() != Some("Running")
        || s.pod_ip.as_deref() != Some(ip.v4.to_string().as_str())
        || s.host_ip.as_deref() != Some(host_ip.v4.to_string().as_str())
        || pod_ips != text(&ip)
        || host_ips != text(&host_ip)
        || is_ready(pod) != ready
        || statuses.len() != containers
        || statuses.iter().any(|c| c.ready != ready)
}

/// One pod's running responders.
struct Responders {
    ip: Addresses,
    ports: Vec<(bool, u16)>,
    echo_only: bool,
    cancel: CancellationToken,
}

#[derive(Default)]
struct Kubelet {
    /// Pod uid → its IP.
    ips: HashMap<String, Ipv4Addr>,
    /// Pod uid → responders.
    running: HashMap<String, Responders>,
    /// Pod uid → when starting its responders last failed.
    failed: HashMap<String, Instant>,
    tasks: TaskTracker,
}

pub(crate) async fn run(ctx: Arc<Context>) {
    let kubelet = Arc::new(tokio::sync::Mutex::new(Kubelet::default()));
    let (c, k) = (Arc::clone(&ctx), Arc::clone(&kubelet));
    control_loop(ctx, "kubelet", move || {
        let (ctx, kubelet) = (Arc::clone(&c), Arc::clone(&k));
        async move { kubelet.lock().await.reconcile(&ctx).await }
    })
    .await;
    let mut kubelet = kubelet.lock().await;
    for (_, r) in kubelet.running.drain() {
        r.cancel.cancel();
    }
    kubelet.tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), kubelet.tasks.wait()).await;
}

impl Kubelet {
    async fn reconcile(&mut self, ctx: &Context) -> Result<()> {
        let nodes: HashMap<String, LocalNode> = ctx.local_nodes().into_iter().map(|n| (n.name.clone(), n)).collect();
        let pods = ctx.pods.state();
        let mut seen = BTreeSet::new();
        let mut first_error = None;
        for pod in &pods {
            let Some(node) = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .and_then(|n| nodes.get(n))
            else {
                continue;
            };
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            seen.insert(uid.clone());
            if let Err(e) = self.sync_pod(ctx, pod, node, &uid, &pods).await {
                first_error.get_or_insert(e);
            }
        }
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|uid| !seen.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            self.stop(&uid);
        }
        self.ips.retain(|uid, _| seen.contains(uid));
        self.failed.retain(|uid, _| seen.contains(uid));
        first_error.map_or(Ok(()), Err)
    }

    fn stop(&mut self, uid: &str) {
        if let Some(r) = self.running.remove(uid) {
            r.cancel.cancel();
        }
    }

    async fn sync_pod(
        &mut self,
        ctx: &Context,
        pod: &Pod,
        node: &LocalNode,
        uid: &str,
        pods: &[Arc<Pod>],
    ) -> Result<()> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
        if pod.metadata.deletion_timestamp.is_some() {
            // The containers are gone: confirm the deletion, as a kubelet does.
            self.stop(uid);
            return match api
                .delete(
                    &name,
                    &DeleteParams {
                        grace_period_seconds: Some(0),
                        ..Default::default()
                    },
                )
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(e.into()),
            };
        }
        if matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            self.stop(uid);
            return Ok(());
        }
        let Some(cidr) = node.pod_cidr else { return Ok(()) };
        let ip = match self.pod_ip(pod, uid, cidr, pods) {
            Some(ip) => ip,
            None => {
                tracing::warn!(pod = %name, node = %node.name, %cidr, "no pod IP left on the node");
                return Ok(());
            }
        };
        let ip = Addresses {
            v4: ip,
            v6: node.pod_cidr_v6.and_then(|v6| paired_ipv6(ip, cidr, v6)),
        };
        let host = Addresses {
            v4: node.ip,
            v6: node.ipv6,
        };
        if node.running {
            self.ensure_responders(pod, uid, ip, &node.name);
        } else {
            self.stop(uid);
        }
        let ready = wants_ready(pod, node.running);
        if needs_status(pod, ip, host, ready) {
            let status = desired_status(pod, ip, host, ready);
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({"status": status})))
                .await
            {
                Ok(_) => tracing::debug!(pod = %name, ip = ?ip.all(), ready, "pod status"),
                Err(e) if is_not_found(&e) => self.stop(uid),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn pod_ip(&mut self, pod: &Pod, uid: &str, cidr: Ipv4Net, pods: &[Arc<Pod>]) -> Option<Ipv4Addr> {
        if let Some(ip) = self.ips.get(uid) {
            return Some(*ip);
        }
        let reported = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            .filter(|ip| cidr.contains(ip));
        let ip = match reported {
            Some(ip) => ip,
            None => {
                let mut used: BTreeSet<Ipv4Addr> = self.ips.values().copied().collect();
                used.extend(
                    pods.iter()
                        .filter_map(|p| p.status.as_ref()?.pod_ip.as_deref()?.parse::<Ipv4Addr>().ok())
                        .filter(|ip| cidr.contains(ip)),
                );
                allocate_ip(cidr, &used)?
            }
        };
        self.ips.insert(uid.to_string(), ip);
        Some(ip)
    }

    fn ensure_responders(&mut self, pod: &Pod, uid: &str, ip: Addresses, node: &str) {
        let ports = declared_ports(pod);
        let echo_only = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(RESPONDER_ANNOTATION))
            .map(String::as_str)
            == Some("echo");
        if let Some(r) = self.running.get(uid) {
            if r.ip == ip && r.ports == ports && r.echo_only == echo_only {
                return;
            }
            self.stop(uid);
        }
        if self.failed.get(uid).is_some_and(|t| t.elapsed() < BIND_RETRY) {
            return;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let identity = Arc::new(http_body(
            &name,
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            node,
        ));
        let prefix = Arc::new(format!("pod={name} ").into_bytes());
        let cancel = CancellationToken::new();
        // Every declared port on each of the pod's addresses.
        let listen: Vec<(bool, SocketAddr)> = ports
            .iter()
            .flat_map(|&(udp, port)| ip.all().into_iter().map(move |a| (udp, SocketAddr::new(a, port))))
            .collect();
        for (udp, addr) in listen {
            let started = if udp {
                net::bind_udp(addr).map(|s| {
                    self.tasks.spawn(udp_echo(s, Arc::clone(&prefix), cancel.clone()));
                })
            } else {
                net::bind_tcp(addr).map(|l| {
                    let identity = Arc::clone(&identity);
                    let tasks = self.tasks.clone();
                    self.tasks
                        .spawn(net::accept_loop(l, cancel.clone(), tasks, move |s, _| {
                            respond_tcp(s, Arc::clone(&identity), echo_only)
                        }));
                })
            };
            if let Err(e) = started {
                tracing::warn!(pod = %name, %addr, udp, error = %e, "pod responder cannot listen");
                cancel.cancel();
                self.failed.insert(uid.to_string(), Instant::now());
                return;
            }
        }
        self.failed.remove(uid);
        tracing::debug!(pod = %name, ip = ?ip.all(), ports = ports.len(), "pod responders started");
        self.running.insert(
            uid.to_string(),
            Responders {
                ip,
                ports,
                echo_only,
                cancel,
            },
        );
    }
}

/// Answers one TCP connection: HTTP when it starts like a request (and `echo_only` is
/// off), echo otherwise.
async fn respond_tcp(mut stream: TcpStream, identity: Arc<String>, echo_only: bool) {
    let mut first = vec![0u8; 4096];
    let n = match tokio::time::timeout(FIRST_BYTES_TIMEOUT, stream.read(&mut first)).await {
        Ok(Ok(n)) if n > 0 => n,
        _ => return,
    };
    first.truncate(n);
    if !echo_only && net::looks_like_http(&first) {
        if let Some(head) = net::read_head(&mut stream, first).await {
            net::write_response(
                &mut stream,
                200,
                "text/plain; charset=utf-8",
                &identity,
                head.method == "HEAD",
            )
            .await;
        }
        return;
    }
    if stream.write_all(&first).await.is_err() {
        return;
    }
    let (mut r, mut w) = stream.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// Echoes every datagram back to its sender, prefixed with `prefix`.
async fn udp_echo(socket: tokio::net::UdpSocket, prefix: Arc<Vec<u8>>, cancel: CancellationToken) {
    let mut buf = vec![0u8; 65_536];
    let mut out = Vec::with_capacity(65_536 + prefix.len());
    loop {
        let (n, from) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(_) => continue,
            },
        };
        out.clear();
        out.extend_from_slice(&prefix);
        out.extend_from_slice(&buf[..n]);
        let _ = socket.send_to(&out, from).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    fn pod(annotations: &[(&str, &str)], ports: &[(i32, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-1".into()),
                namespace: Some("default".into()),
                uid: Some("u1".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("w1".into()),
                containers: vec![Container {
                    name: "web".into(),
                    image: Some("any".into()),
                    ports: Some(
                        ports
                            .iter()
                            .map(|(p, proto)| ContainerPort {
                                container_port: *p,
                                protocol: Some((*proto).into()),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn ips_come_from_the_node_range_lowest_free_first() {
        let cidr: Ipv4Net = "127.244.2.0/24".parse().unwrap();
        let mut used = BTreeSet::new();
        assert_eq!(allocate_ip(cidr, &used), Some(Ipv4Addr::new(127, 244, 2, 1)));
        used.insert(Ipv4Addr::new(127, 244, 2, 1));
        used.insert(Ipv4Addr::new(127, 244, 2, 3));
        assert_eq!(allocate_ip(cidr, &used), Some(Ipv4Addr::new(127, 244, 2, 2)));
        let all: BTreeSet<Ipv4Addr> = cidr.hosts().collect();
        assert_eq!(allocate_ip(cidr, &all), None);
    }

    #[test]
    fn readiness_follows_the_node_and_the_annotation() {
        assert!(wants_ready(&pod(&[], &[]), true));
        assert!(!wants_ready(&pod(&[], &[]), false));
        assert!(!wants_ready(&pod(&[(READY_ANNOTATION, "false")], &[]), true));
        assert!(wants_ready(&pod(&[(READY_ANNOTATION, "true")], &[]), true));
    }

    #[test]
    fn status_is_written_until_it_matches() {
        let mut p = pod(&[], &[(8080, "TCP")]);
        let ip = Ipv4Addr::new(127, 244, 1, 1);
        let host = Ipv4Addr::new(127, 10, 0, 2);
        assert!(needs_status(&p, ip, host, true));
        let status = desired_status(&p, ip, host, true);
        p.status = Some(serde_json::from_value(status).unwrap());
        assert!(is_ready(&p));
        assert!(!needs_status(&p, ip, host, true));
        assert!(needs_status(&p, ip, host, false));
        let not_ready = desired_status(&p, ip, host, false);
        p.status = Some(serde_json::from_value(not_ready).unwrap());
        assert!(!is_ready(&p));
        assert!(!needs_status(&p, ip, host, false));
        assert!(!p.status.as_ref().unwrap().container_statuses.as_ref().unwrap()[0].ready);
    }

    #[test]
    fn declared_ports_by_protocol() {
        let p = pod(&[], &[(8080, "TCP"), (53, "UDP"), (8080, "TCP"), (9, "SCTP")]);
        assert_eq!(declared_ports(&p), vec![(false, 8080), (true, 53)]);
    }

    #[tokio::test]
    async fn tcp_responder_answers_http_or_echoes() {
        let listener = net::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let identity = Arc::new(http_body("web-1", "default", "w1"));
        tokio::spawn(net::accept_loop(
            listener,
            cancel.clone(),
            TaskTracker::new(),
            move |s, _| respond_tcp(s, Arc::clone(&identity), false),
        ));
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).await.unwrap();
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.ends_with("pod=web-1 namespace=default node=w1\n"), "{got}");
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        cancel.cancel();
    }

    #[tokio::test]
    async fn udp_responder_prefixes_the_pod_name() {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(udp_echo(socket, Arc::new(b"pod=web-1 ".to_vec()), cancel.clone()));
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(b"ping", addr).await.unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"pod=web-1 ping");
        cancel.cancel();
    }

    #[test]
    fn dual_stack_pods_list_both_addresses_ipv4_first() {
        let cidr: Ipv4Net = "127.244.3.0/24".parse().unwrap();
        let v6: Ipv6Net = "fd00:244:0:3::/64".parse().unwrap();
        let ip6 = paired_ipv6(Ipv4Addr::new(127, 244, 3, 7), cidr, v6).unwrap();
        assert_eq!(ip6, "fd00:244:0:3::7".parse::<Ipv6Addr>().unwrap());
        let ip = Addresses {
            v4: Ipv4Addr::new(127, 244, 3, 7),
            v6: Some(ip6),
        };
        let host = Addresses {
            v4: Ipv4Addr::new(127, 10, 0, 3),
            v6: Some("fd00:10::3".parse().unwrap()),
        };
        let mut p = pod(&[], &[(80, "TCP")]);
        let status = desired_status(&p, ip, host, true);
        assert_eq!(status["podIP"], "127.244.3.7");
        assert_eq!(
            status["podIPs"],
            json!([{"ip": "127.244.3.7"}, {"ip": "fd00:244:0:3::7"}])
        );
        assert_eq!(status["hostIPs"], json!([{"ip": "127.10.0.3"}, {"ip": "fd00:10::3"}]));
        p.status = Some(serde_json::from_value(status).unwrap());
        assert!(!needs_status(&p, ip, host, true));
        // A pod reported with its IPv4 address only is updated once the node has IPv6.
        assert!(needs_status(&p, ip.v4, host, true));
    }
}

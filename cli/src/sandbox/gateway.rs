//! The WireGuard gateway of `sandbox up`, run in-process through `kuberaya_gateway::run`
//! behind its own `LoadBalancer` Service. Its CRD, Namespace and `kuberaya-config` come
//! from the gateway crate ([`kuberaya_gateway::manifests`], i.e. `deploy/`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::ipv6::Ipv6Ranges;

/// The WireGuard gateway's UDP port, on its Service and its socket.
pub(super) const GATEWAY_PORT: u16 = 51820;
/// The gateway's tunnel range (it takes the first address).
const GATEWAY_TUNNEL_CIDR: &str = "100.64.0.0/16";
/// How long `sandbox up` waits for the gateway's load balancer.
pub(super) const GATEWAY_LB_TIMEOUT: Duration = Duration::from_secs(30);
/// Field manager of the objects the sandbox applies for the gateway.
const GATEWAY_FIELD_MANAGER: &str = "kuberaya-sandbox";

/// The WireGuard gateway, run in this process as a cluster runs it: `replicas` replicas
/// (2 by default, as `deploy/` runs it), each with its own Kubernetes client from the
/// sandbox's kubeconfig and its socket on its own pod-range address, one of them elected to
/// write status; all behind one `LoadBalancer` Service (no selector; the sandbox writes its
/// EndpointSlice), so a peer's traffic goes Internet → platform LB → node IP:NodePort →
/// kube-proxy → one replica (the same one for a client: ClientIP affinity).
pub(super) struct InProcessGateway {
    /// The first replica's facts (every replica has the same key and tunnel address).
    pub info: kuberaya_gateway::run::StartedInfo,
    pub replicas: Vec<Replica>,
    /// The load balancer's public IP, once the CCM provisioned it.
    pub public_ip: Option<String>,
}

/// One gateway replica of the sandbox.
pub(super) struct Replica {
    pub name: String,
    pub info: kuberaya_gateway::run::StartedInfo,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<kuberaya_gateway::Result<()>>,
}

impl Replica {
    /// What `sandbox status` reads of it.
    pub fn record(&self) -> super::state::GatewayReplica {
        super::state::GatewayReplica {
            name: self.name.clone(),
            udp: self.info.udp,
            metrics: self.info.metrics,
            health: self.info.health,
        }
    }
}

/// Replica `i`'s "pod IP": from the pod range's last address but one downwards (node i
/// takes the i-th /24 from the start of the range, so these are clear of them).
fn gateway_pod_ip(pod_cidr: ipnet::Ipv4Net, i: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(pod_cidr.broadcast()).saturating_sub(1 + i))
}

/// Replica `i`'s IPv6 pod address in a dual-stack sandbox: its IPv4 one's pair, as the
/// node agents pair pod addresses (`127.244.255.254` → `fd00:244:0:ff::fe`).
pub(super) fn gateway_pod_ipv6(
    pod_cidr: ipnet::Ipv4Net,
    pod_cidr_v6: ipnet::Ipv6Net,
    i: u32,
) -> Option<std::net::Ipv6Addr> {
    use kuberaya_sandbox::cluster::{nodes::paired_pod_cidr_v6, pods::paired_ipv6};
    let v4 = gateway_pod_ip(pod_cidr, i);
    let node_range = ipnet::Ipv4Net::new(v4, 24).ok()?.trunc();
    paired_ipv6(v4, node_range, paired_pod_cidr_v6(node_range, pod_cidr, pod_cidr_v6)?)
}

/// The gateway's own IPv6 tunnel address: the first of its IPv6 tunnel range, as the
/// gateway takes it.
fn gateway_tunnel_ipv6() -> String {
    let range = kuberaya_gateway::peers::TunnelConfig::default_range_v6();
    let first = std::net::Ipv6Addr::from(u128::from(range.network()) + 1);
    format!("{first}/{}", range.prefix_len())
}

/// Server-side apply of `obj` (named `name`) with the sandbox's field manager.
async fn apply<K>(api: &kube::Api<K>, name: &str, obj: &K) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = kube::api::PatchParams::apply(GATEWAY_FIELD_MANAGER).force();
    api.patch(name, &params, &kube::api::Patch::Apply(obj))
        .await
        .with_context(|| format!("cannot apply {name}"))?;
    Ok(())
}

/// `kuberaya-config` with the service ranges `kuberaya peer add` routes to: one per
/// family, comma-separated, in a dual-stack sandbox.
fn service_ranges_config(v4: ipnet::Ipv4Net, v6: Option<ipnet::Ipv6Net>) -> k8s_openapi::api::core::v1::ConfigMap {
    let mut cm = kuberaya_gateway::manifests::config_map(v4);
    if let Some(v6) = v6 {
        cm.data.get_or_insert_with(Default::default).insert(
            kuberaya_gateway::manifests::CONFIG_KEY_SERVICE_CIDR.to_string(),
            format!("{v4},{v6}"),
        );
    }
    cm
}

impl InProcessGateway {
    /// Installs the VpnPeer CRD, the gateway's namespace and `kuberaya-config`, starts
    /// `replicas` replicas of the
    /// gateway and registers it behind its Service; waits (bounded) for the load balancer.
    pub(super) async fn start(
        kubeconfig: &Path,
        service_cidr: ipnet::Ipv4Net,
        pod_cidr: ipnet::Ipv4Net,
        v6: Option<&Ipv6Ranges>,
        replicas: u32,
    ) -> anyhow::Result<Self> {
        use crate::gateway::{
            ANNOTATION_PUBLIC_KEY, ANNOTATION_TUNNEL_ADDRESS, ANNOTATION_TUNNEL_ADDRESS_V6, CONFIG_MAP,
            DEFAULT_GATEWAY_NAMESPACE as NAMESPACE, DEFAULT_GATEWAY_SERVICE as SERVICE,
        };
        use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
        use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        use kuberaya_gateway::manifests;
        use kuberaya_gateway::run::{RunConfig, Sources};

        let client = kuberaya_sandbox::cluster::client_from_kubeconfig(kubeconfig).await?;
        for crd in manifests::crds() {
            let crd_name = crd.metadata.name.clone().unwrap_or_default();
            apply(
                &kube::Api::<CustomResourceDefinition>::all(client.clone()),
                &crd_name,
                &crd,
            )
            .await?;
        }
        apply(
            &kube::Api::<Namespace>::all(client.clone()),
            NAMESPACE,
            &manifests::namespace(),
        )
        .await?;
        apply(
            &kube::Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE),
            CONFIG_MAP,
            &service_ranges_config(service_cidr, v6.map(|v6| v6.service_cidr)),
        )
        .await?;

        let tunnel_cidr: ipnet::Ipv4Net = GATEWAY_TUNNEL_CIDR.parse().context("the tunnel range")?;
        let loopback_any: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut started_replicas = Vec::new();
        // One after the other: the first makes the key Secret, the others read it.
        for i in 0..replicas.max(1) {
            let name = format!("kuberaya-gateway-{i}");
            // A replica's pod addresses: IPv4, and IPv6 in a dual-stack sandbox.
            let mut listen = vec![SocketAddr::from((gateway_pod_ip(pod_cidr, i), GATEWAY_PORT))];
            listen.extend(
                v6.and_then(|v6| gateway_pod_ipv6(pod_cidr, v6.pod_cidr, i))
                    .map(|ip| SocketAddr::from((ip, GATEWAY_PORT))),
            );
            let started = match kuberaya_gateway::run::start(RunConfig {
                listen,
                tunnel_cidr,
                namespace: NAMESPACE.into(),
                sources: Sources::Kube {
                    kubeconfig: Some(kubeconfig.to_path_buf()),
                    client: None,
                },
                metrics_bind_address: loopback_any,
                health_bind_address: loopback_any,
                // One process, several replicas: the pid does not tell them apart.
                identity: name.clone(),
                ..RunConfig::default()
            })
            .await
            {
                Ok(started) => started,
                Err(e) => {
                    // The replicas started so far stop: nothing is left running.
                    stop_all(started_replicas).await;
                    return Err(anyhow::Error::new(e).context(format!("cannot start gateway replica {i}")));
                }
            };
            let info = started.info().clone();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(started.run(async move {
                let _ = stopped.await;
            }));
            started_replicas.push(Replica { name, info, stop, task });
        }
        let gateway = InProcessGateway {
            info: started_replicas[0].info.clone(),
            replicas: started_replicas,
            public_ip: None,
        };

        let services = kube::Api::<Service>::namespaced(client.clone(), NAMESPACE);
        let port_name = "wireguard".to_string();
        // The Service as deploy/ ships it (ports, ClientIP affinity, externalTrafficPolicy
        // Local, the LB health check), without a selector: there are no pods, the sandbox
        // writes the EndpointSlice. The annotations `kuberaya peer add` reads are written
        // here too (the replicas' own publishing finds them up to date).
        let mut service = manifests::service();
        let annotations = service.metadata.annotations.get_or_insert_with(Default::default);
        annotations.insert(ANNOTATION_PUBLIC_KEY.to_string(), gateway.info.public_key.to_string());
        annotations.insert(
            ANNOTATION_TUNNEL_ADDRESS.to_string(),
            format!("{}/{}", gateway.info.tunnel_address, tunnel_cidr.prefix_len()),
        );
        if v6.is_some() {
            annotations.insert(ANNOTATION_TUNNEL_ADDRESS_V6.to_string(), gateway_tunnel_ipv6());
        }
        if let Some(spec) = service.spec.as_mut() {
            spec.selector = None;
            // Dual-stack: a load balancer of both families (an IPv6 endpoint for peers on
            // IPv6-only networks).
            if v6.is_some() {
                spec.ip_family_policy = Some("PreferDualStack".into());
            }
        }
        // Replica i runs "on" node i (as anti-affinity spreads them), which is what
        // externalTrafficPolicy Local routes and health-checks by.
        let nodes = match kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
            .list(&Default::default())
            .await
        {
            Ok(list) => list.items,
            Err(e) => {
                // Nothing is left running.
                gateway.shutdown().await;
                return Err(anyhow::Error::new(e).context("listing the nodes"));
            }
        };
        let mut nodes: Vec<String> = nodes.into_iter().filter_map(|n| n.metadata.name).collect();
        nodes.sort();
        let registered = async {
            apply(&services, SERVICE, &service).await?;
            // One slice per family, as the EndpointSlice controller writes them.
            let slice = |family: &str, suffix: &str, addresses: Vec<Option<String>>| EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("{SERVICE}-sandbox{suffix}")),
                    namespace: Some(NAMESPACE.into()),
                    labels: Some([("kubernetes.io/service-name".to_string(), SERVICE.to_string())].into()),
                    ..Default::default()
                },
                address_type: family.into(),
                endpoints: addresses
                    .into_iter()
                    .enumerate()
                    .filter_map(|(i, a)| Some((i, a?)))
                    .map(|(i, address)| Endpoint {
                        addresses: vec![address],
                        node_name: (!nodes.is_empty()).then(|| nodes[i % nodes.len()].clone()),
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            serving: Some(true),
                            terminating: Some(false),
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ports: Some(vec![EndpointPort {
                    name: Some(port_name.clone()),
                    protocol: Some("UDP".into()),
                    port: Some(i32::from(gateway.info.udp.port())),
                    ..Default::default()
                }]),
            };
            let of_family = |v6: bool| -> Vec<Option<String>> {
                gateway
                    .replicas
                    .iter()
                    .map(|r| {
                        r.info
                            .udp_all
                            .iter()
                            .find(|a| a.is_ipv6() == v6)
                            .map(|a| a.ip().to_string())
                    })
                    .collect()
            };
            let slices = kube::Api::<EndpointSlice>::namespaced(client.clone(), NAMESPACE);
            if v6.is_some() {
                apply(
                    &slices,
                    &format!("{SERVICE}-sandbox-v6"),
                    &slice("IPv6", "-v6", of_family(true)),
                )
                .await?;
            }
            apply(
                &slices,
                &format!("{SERVICE}-sandbox"),
                &slice("IPv4", "", of_family(false)),
            )
            .await
        }
        .await;
        if let Err(e) = registered {
            gateway.shutdown().await;
            return Err(e);
        }
        Ok(gateway)
    }

    /// Waits until the gateway's Service has a load-balancer IP (the CCM provisioned it).
    pub(super) async fn wait_public_ip(&mut self, kubeconfig: &Path, timeout: Duration) -> anyhow::Result<String> {
        use crate::gateway::{DEFAULT_GATEWAY_NAMESPACE as NAMESPACE, DEFAULT_GATEWAY_SERVICE as SERVICE};
        let client = kuberaya_sandbox::cluster::client_from_kubeconfig(kubeconfig).await?;
        let services = kube::Api::<k8s_openapi::api::core::v1::Service>::namespaced(client, NAMESPACE);
        let deadline = Instant::now() + timeout;
        loop {
            let ip = services
                .get_opt(SERVICE)
                .await?
                .and_then(|s| s.status)
                .and_then(|s| s.load_balancer)
                .and_then(|lb| lb.ingress)
                .and_then(|i| i.into_iter().next())
                .and_then(|i| i.ip);
            if let Some(ip) = ip {
                self.public_ip = Some(ip.clone());
                return Ok(ip);
            }
            if Instant::now() > deadline {
                bail!("the load balancer of {NAMESPACE}/{SERVICE} has no IP after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every replica and releases their sockets.
    pub(super) async fn shutdown(self) {
        stop_all(self.replicas).await;
    }
}

/// Stops `replicas`, each within 5 s (then aborted).
async fn stop_all(replicas: Vec<Replica>) {
    for r in replicas {
        let _ = r.stop.send(());
        let mut task = r.task;
        match tokio::time::timeout(Duration::from_secs(5), &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("gateway {} stopped with an error: {e}", r.name),
            Ok(Err(e)) => eprintln!("the task of gateway {} failed: {e}", r.name),
            Err(_) => {
                eprintln!("gateway {} did not stop within 5 s; aborting it", r.name);
                task.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kuberaya_gateway::manifests;

    /// The objects of `deploy/` the sandbox applies are where the CLI looks for them.
    #[test]
    fn the_gateway_crates_objects_are_where_the_cli_looks() {
        assert_eq!(manifests::namespace_name(), crate::gateway::DEFAULT_GATEWAY_NAMESPACE);
        let cm = manifests::config_map("127.96.0.0/16".parse().unwrap());
        assert_eq!(cm.metadata.name.as_deref(), Some(crate::gateway::CONFIG_MAP));
        assert_eq!(
            cm.metadata.namespace.as_deref(),
            Some(crate::gateway::DEFAULT_GATEWAY_NAMESPACE)
        );
        assert!(cm.data.unwrap().contains_key(crate::gateway::CONFIG_KEY_SERVICE_CIDR));
    }

    #[test]
    fn a_dual_stack_sandbox_tells_peers_both_service_ranges() {
        let v4 = "127.96.0.0/16".parse().unwrap();
        let ranges = |v6: Option<&str>| {
            let cm = service_ranges_config(v4, v6.map(|r| r.parse().unwrap()));
            cm.data.unwrap()[crate::gateway::CONFIG_KEY_SERVICE_CIDR].clone()
        };
        assert_eq!(ranges(None), "127.96.0.0/16");
        assert_eq!(ranges(Some("fd00:96::/112")), "127.96.0.0/16,fd00:96::/112");
    }

    #[test]
    fn dual_stack_replicas_get_the_pair_of_their_ipv4_pod_address() {
        let (v4, v6) = ("127.244.0.0/16".parse().unwrap(), "fd00:244::/48".parse().unwrap());
        assert_eq!(gateway_pod_ipv6(v4, v6, 0), Some("fd00:244:0:ff::fe".parse().unwrap()));
        assert_eq!(gateway_pod_ipv6(v4, v6, 1), Some("fd00:244:0:ff::fd".parse().unwrap()));
        assert_eq!(gateway_tunnel_ipv6(), "fd6b:7261:7961::1/64");
    }

    #[test]
    fn the_gateway_pod_ips_are_clear_of_the_nodes() {
        let range = "127.244.0.0/16".parse().unwrap();
        assert_eq!(gateway_pod_ip(range, 0), std::net::Ipv4Addr::new(127, 244, 255, 254));
        assert_eq!(gateway_pod_ip(range, 1), std::net::Ipv4Addr::new(127, 244, 255, 253));
    }
}

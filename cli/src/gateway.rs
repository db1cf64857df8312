//! Finding the VPN gateway from the cluster: its `LoadBalancer` Service gives the
//! WireGuard endpoint (ingress IP + UDP port) and, in annotations the gateway writes on
//! its own Service when it starts (kuberaya_gateway::publish), its public key, tunnel
//! address and cluster domain. The service range the peers route comes from
//! `--service-cidr`, else the `kuberaya-config` ConfigMap, else 10.96.0.0/12.

use std::net::Ipv4Addr;

use anyhow::anyhow;
use clap::Args;
use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::Api;
use kuberaya_gateway::keys::PublicKey;

use crate::kube::{api_error, is_not_found};

/// The annotation names are the gateway's own: it writes them, this reads them.
pub use kuberaya_gateway::publish::{ANNOTATION_CLUSTER_DOMAIN, ANNOTATION_PUBLIC_KEY, ANNOTATION_TUNNEL_ADDRESS};

pub const DEFAULT_GATEWAY_NAMESPACE: &str = "kuberaya-system";
pub const DEFAULT_GATEWAY_SERVICE: &str = kuberaya_gateway::publish::DEFAULT_SERVICE;
/// ConfigMap in the gateway's namespace with cluster facts (`service-cidr`).
pub const CONFIG_MAP: &str = "kuberaya-config";
pub const CONFIG_KEY_SERVICE_CIDR: &str = "service-cidr";
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// The tunnel range assumed when the annotation gives a bare address.
pub const DEFAULT_TUNNEL_PREFIX: u8 = 16;

/// Where the gateway is.
#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Namespace of the gateway (and of admin peers).
    #[arg(long, global = true, default_value = DEFAULT_GATEWAY_NAMESPACE, value_name = "NS")]
    pub gateway_namespace: String,
    /// Name of the gateway's LoadBalancer Service.
    #[arg(long, global = true, default_value = DEFAULT_GATEWAY_SERVICE, value_name = "NAME")]
    pub gateway_service: String,
}

impl Default for GatewayArgs {
    fn default() -> Self {
        GatewayArgs {
            gateway_namespace: DEFAULT_GATEWAY_NAMESPACE.into(),
            gateway_service: DEFAULT_GATEWAY_SERVICE.into(),
        }
    }
}

/// What a peer's config needs of the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayInfo {
    /// `IP:port` (or `host:port`).
    pub endpoint: String,
    pub public_key: PublicKey,
    pub tunnel_address: Ipv4Addr,
    pub tunnel_range: Ipv4Net,
    pub cluster_domain: String,
}

/// Read the gateway's facts off its Service. Errors name what is missing.
pub fn from_service(svc: &Service) -> Result<GatewayInfo, String> {
    let namespace = svc.metadata.namespace.as_deref().unwrap_or_default();
    let name = format!("{namespace}/{}", svc.metadata.name.as_deref().unwrap_or_default());
    let ann = svc.metadata.annotations.clone().unwrap_or_default();
    let key_text = ann
        .get(ANNOTATION_PUBLIC_KEY)
        .ok_or_else(|| missing_annotation(namespace, &name, ANNOTATION_PUBLIC_KEY))?;
    let public_key = PublicKey::parse(key_text)
        .map_err(|e| format!("annotation {ANNOTATION_PUBLIC_KEY} of {name} is not a WireGuard key: {e}"))?;
    let addr_text = ann
        .get(ANNOTATION_TUNNEL_ADDRESS)
        .ok_or_else(|| missing_annotation(namespace, &name, ANNOTATION_TUNNEL_ADDRESS))?;
    let (tunnel_address, tunnel_range) = parse_tunnel_address(addr_text).ok_or_else(|| {
        format!("annotation {ANNOTATION_TUNNEL_ADDRESS} of {name} is not an IPv4 address: {addr_text:?}")
    })?;
    let cluster_domain = ann
        .get(ANNOTATION_CLUSTER_DOMAIN)
        .cloned()
        .unwrap_or_else(|| DEFAULT_CLUSTER_DOMAIN.to_string());
    let spec = svc.spec.clone().unwrap_or_default();
    let ports = spec.ports.unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.protocol.as_deref() == Some("UDP"))
        .or_else(|| ports.first())
        .ok_or_else(|| format!("the gateway Service {name} has no port"))?
        .port;
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|i| i.first())
        .and_then(|i| i.ip.clone().or_else(|| i.hostname.clone()))
        .ok_or_else(|| {
            format!("the gateway Service {name} has no load-balancer IP yet; see `kuberaya lb describe {name}` for why")
        })?;
    Ok(GatewayInfo {
        endpoint: format!("{ingress}:{port}"),
        public_key,
        tunnel_address,
        tunnel_range,
        cluster_domain,
    })
}

/// The gateway writes its annotations when it starts: they are missing while it has not
/// started yet, or when RBAC forbade the patch (then its log gives the command to run).
fn missing_annotation(namespace: &str, service: &str, annotation: &str) -> String {
    format!(
        "the gateway Service {service} has no {annotation} annotation; the gateway writes it when it starts: \
         check that it runs (`kubectl -n {namespace} rollout status deployment/kuberaya-gateway`), and if its log \
         warns `may not annotate the gateway Service`, run the `kubectl annotate` command of its `fallback` field \
         once (docs/installing.md, step 3)"
    )
}

/// `100.64.0.1` (range /16 assumed) or `100.64.0.1/16`.
pub fn parse_tunnel_address(s: &str) -> Option<(Ipv4Addr, Ipv4Net)> {
    let s = s.trim();
    if let Ok(net) = s.parse::<Ipv4Net>() {
        return Some((net.addr(), net.trunc()));
    }
    let a: Ipv4Addr = s.parse().ok()?;
    let net = Ipv4Net::new(a, DEFAULT_TUNNEL_PREFIX).ok()?.trunc();
    Some((a, net))
}

/// The service range: the flag, else the ConfigMap's `service-cidr`, else the default.
pub fn service_cidr(flag: Option<IpNet>, config: Option<&ConfigMap>) -> Result<IpNet, String> {
    if let Some(f) = flag {
        return Ok(f);
    }
    if let Some(v) = config
        .and_then(|c| c.data.as_ref())
        .and_then(|d| d.get(CONFIG_KEY_SERVICE_CIDR))
    {
        return v.trim().parse().map_err(|_| {
            format!(
                "{CONFIG_MAP} ConfigMap: {CONFIG_KEY_SERVICE_CIDR} {v:?} is not a CIDR; fix it or pass --service-cidr"
            )
        });
    }
    Ok(DEFAULT_SERVICE_CIDR.parse().expect("valid default"))
}

/// Read the gateway Service; errors say how to fix the lookup.
pub async fn discover(client: &kube::Client, args: &GatewayArgs) -> anyhow::Result<GatewayInfo> {
    let api: Api<Service> = Api::namespaced(client.clone(), &args.gateway_namespace);
    let svc = match api.get(&args.gateway_service).await {
        Ok(s) => s,
        Err(e) if is_not_found(&e) => {
            return Err(anyhow!(
                "the gateway Service {}/{} does not exist; deploy the gateway or pass --gateway-namespace/--gateway-service",
                args.gateway_namespace,
                args.gateway_service
            ));
        }
        Err(e) => return Err(api_error(e, "reading the gateway Service")),
    };
    from_service(&svc).map_err(|e| anyhow!(e))
}

/// The service range for peer configs (see [`service_cidr`]).
pub async fn discover_service_cidr(
    client: &kube::Client,
    args: &GatewayArgs,
    flag: Option<IpNet>,
) -> anyhow::Result<IpNet> {
    if flag.is_some() {
        return service_cidr(flag, None).map_err(|e| anyhow!(e));
    }
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &args.gateway_namespace);
    let cm = api
        .get_opt(CONFIG_MAP)
        .await
        .map_err(|e| api_error(e, "reading the kuberaya-config ConfigMap"))?;
    service_cidr(None, cm.as_ref()).map_err(|e| anyhow!(e))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, ServicePort, ServiceSpec, ServiceStatus,
    };
    use kuberaya_gateway::keys::PrivateKey;

    pub(crate) fn gateway_service(key: &PublicKey, ip: Option<&str>) -> Service {
        let mut svc = Service::default();
        svc.metadata.namespace = Some(DEFAULT_GATEWAY_NAMESPACE.into());
        svc.metadata.name = Some(DEFAULT_GATEWAY_SERVICE.into());
        svc.metadata.annotations = Some(
            [
                (ANNOTATION_PUBLIC_KEY.to_string(), key.to_base64()),
                (ANNOTATION_TUNNEL_ADDRESS.to_string(), "100.64.0.1".to_string()),
            ]
            .into(),
        );
        svc.spec = Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ports: Some(vec![ServicePort {
                name: Some("wireguard".into()),
                port: 51820,
                protocol: Some("UDP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        svc.status = ip.map(|ip| ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some(ip.into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        });
        svc
    }

    #[test]
    fn reads_the_endpoint_key_and_address() {
        let key = PrivateKey::generate().public_key();
        let g = from_service(&gateway_service(&key, Some("127.203.0.5"))).unwrap();
        assert_eq!(g.endpoint, "127.203.0.5:51820");
        assert_eq!(g.public_key, key);
        assert_eq!(g.tunnel_address, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(g.tunnel_range.to_string(), "100.64.0.0/16");
        assert_eq!(g.cluster_domain, "cluster.local");
    }

    #[test]
    fn says_what_is_missing() {
        let key = PrivateKey::generate().public_key();
        let e = from_service(&gateway_service(&key, None)).unwrap_err();
        assert!(e.contains("no load-balancer IP yet"), "{e}");
        let mut svc = gateway_service(&key, Some("1.2.3.4"));
        svc.metadata.annotations = None;
        let e = from_service(&svc).unwrap_err();
        assert!(e.contains(ANNOTATION_PUBLIC_KEY), "{e}");
        // What to do about it, on one line.
        assert!(
            e.contains("kubectl -n kuberaya-system rollout status") && e.contains("may not annotate"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        svc.metadata.annotations = Some([(ANNOTATION_PUBLIC_KEY.to_string(), key.to_base64())].into());
        let e = from_service(&svc).unwrap_err();
        assert!(
            e.contains(ANNOTATION_TUNNEL_ADDRESS) && e.contains("installing.md"),
            "{e}"
        );
    }

    #[test]
    fn tunnel_address_forms() {
        let (a, n) = parse_tunnel_address("100.64.0.1/24").unwrap();
        assert_eq!(
            (a.to_string(), n.to_string()),
            ("100.64.0.1".into(), "100.64.0.0/24".into())
        );
        assert!(parse_tunnel_address("nope").is_none());
    }

    #[test]
    fn service_cidr_flag_then_configmap_then_default() {
        let mut cm = ConfigMap {
            data: Some([(CONFIG_KEY_SERVICE_CIDR.to_string(), "127.96.0.0/16".to_string())].into()),
            ..Default::default()
        };
        let flag: IpNet = "10.0.0.0/16".parse().unwrap();
        assert_eq!(service_cidr(Some(flag), Some(&cm)).unwrap(), flag);
        assert_eq!(service_cidr(None, Some(&cm)).unwrap().to_string(), "127.96.0.0/16");
        assert_eq!(service_cidr(None, None).unwrap().to_string(), DEFAULT_SERVICE_CIDR);
        cm.data = Some([(CONFIG_KEY_SERVICE_CIDR.to_string(), "bad".to_string())].into());
        assert!(service_cidr(None, Some(&cm)).is_err());
    }
}

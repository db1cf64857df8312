//! Finding the VPN gateway from the cluster: its `LoadBalancer` Service gives the
//! WireGuard endpoint (ingress IP + UDP port) and, in annotations the gateway writes on
//! its own Service when it starts (kuberaya_gateway::publish), its public key, tunnel
//! address and cluster domain. The service range the peers route comes from
//! `--service-cidr`, else the `kuberaya-config` ConfigMap, else 10.96.0.0/12.
//!
//! Dual-stack: the Service's ingress may list an IPv4 and an IPv6 address (IPv4 first);
//! [`GatewayInfo::endpoint_for`] picks the peer's endpoint from them (IPv4 unless asked
//! for IPv6 or there is no other). A gateway with an IPv6 tunnel range publishes its IPv6
//! tunnel address in [`ANNOTATION_TUNNEL_ADDRESS_V6`], and the service ranges may be a
//! pair, one of each family (`127.96.0.0/16,fd00:96::/112`, as kube-apiserver's
//! `--service-cluster-ip-range`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::anyhow;
use clap::{Args, ValueEnum};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::Api;
use kuberaya_gateway::keys::PublicKey;

use crate::kube::{api_error, is_not_found};

/// The annotation names are the gateway's own: it writes them, this reads them.
pub use kuberaya_gateway::publish::{
    ANNOTATION_CLUSTER_DOMAIN, ANNOTATION_PUBLIC_KEY, ANNOTATION_TUNNEL_ADDRESS, ANNOTATION_TUNNEL_ADDRESS_V6,
};

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

/// The address family of the endpoint a peer's config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EndpointFamily {
    Ipv4,
    Ipv6,
}

/// What a peer's config needs of the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayInfo {
    /// `IP:port` (or `host:port`, `[IPv6]:port`): the default endpoint, IPv4 when the
    /// ingress has one ([`GatewayInfo::endpoint_for`] with no family).
    pub endpoint: String,
    /// The load balancer's ingress, IP addresses or host names, in the Service's order.
    pub ingress: Vec<String>,
    /// The WireGuard (UDP) port of the Service.
    pub port: u16,
    pub public_key: PublicKey,
    pub tunnel_address: Ipv4Addr,
    pub tunnel_range: Ipv4Net,
    /// The gateway's IPv6 tunnel address and range, when it has one.
    pub tunnel_v6: Option<(Ipv6Addr, Ipv6Net)>,
    pub cluster_domain: String,
}

/// `host:port`, with an IPv6 address in brackets as WireGuard's `Endpoint` wants it.
pub fn endpoint_text(host: &str, port: u16) -> String {
    match host.parse::<Ipv6Addr>() {
        Ok(a) => format!("[{a}]:{port}"),
        Err(_) => format!("{host}:{port}"),
    }
}

impl GatewayInfo {
    /// The endpoint of `family`, or by default the first IPv4 ingress address, else the
    /// first ingress (a host name, or the IPv6 address of an IPv6-only load balancer).
    pub fn endpoint_for(&self, family: Option<EndpointFamily>) -> Result<String, String> {
        let is = |h: &&String, f: EndpointFamily| match h.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => f == EndpointFamily::Ipv4,
            Ok(IpAddr::V6(_)) => f == EndpointFamily::Ipv6,
            Err(_) => false,
        };
        let host = match family {
            None => self
                .ingress
                .iter()
                .find(|h| is(h, EndpointFamily::Ipv4))
                .or(self.ingress.first()),
            Some(f) => self.ingress.iter().find(|h| is(h, f)),
        };
        match host {
            Some(h) => Ok(endpoint_text(h, self.port)),
            None => {
                let which = match family {
                    Some(EndpointFamily::Ipv6) => "IPv6",
                    _ => "IPv4",
                };
                Err(format!(
                    "the gateway's load balancer has no {which} address (ingress: {}); drop --endpoint-family, \
                     or pass --endpoint HOST:PORT",
                    if self.ingress.is_empty() {
                        "none".to_string()
                    } else {
                        self.ingress.join(", ")
                    }
                ))
            }
        }
    }
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
    let tunnel_v6 = ann
        .get(ANNOTATION_TUNNEL_ADDRESS_V6)
        .map(|text| {
            parse_tunnel_address_v6(text).ok_or_else(|| {
                format!("annotation {ANNOTATION_TUNNEL_ADDRESS_V6} of {name} is not an IPv6 address/prefix: {text:?}")
            })
        })
        .transpose()?;
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
    let port = u16::try_from(port).map_err(|_| format!("the gateway Service {name} has a bad port {port}"))?;
    let ingress: Vec<String> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
        .collect();
    if ingress.is_empty() {
        return Err(format!(
            "the gateway Service {name} has no load-balancer IP yet; see `kuberaya lb describe {name}` for why"
        ));
    }
    let mut info = GatewayInfo {
        endpoint: String::new(),
        ingress,
        port,
        public_key,
        tunnel_address,
        tunnel_range,
        tunnel_v6,
        cluster_domain,
    };
    info.endpoint = info.endpoint_for(None)?;
    Ok(info)
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

/// `fd6b:7261:7961::1/64` (the address and its range); a bare address is refused: the
/// gateway always publishes the prefix.
pub fn parse_tunnel_address_v6(s: &str) -> Option<(Ipv6Addr, Ipv6Net)> {
    let net: Ipv6Net = s.trim().parse().ok()?;
    Some((net.addr(), net.trunc()))
}

/// The service ranges: the flag's, else the ConfigMap's `service-cidr` (one CIDR, or one
/// of each family separated by a comma), else the default.
pub fn service_cidr(flag: &[IpNet], config: Option<&ConfigMap>) -> Result<Vec<IpNet>, String> {
    if !flag.is_empty() {
        return Ok(flag.to_vec());
    }
    if let Some(v) = config
        .and_then(|c| c.data.as_ref())
        .and_then(|d| d.get(CONFIG_KEY_SERVICE_CIDR))
    {
        let bad = || {
            format!(
                "{CONFIG_MAP} ConfigMap: {CONFIG_KEY_SERVICE_CIDR} {v:?} is not a CIDR (or two, one per family, \
                 comma-separated); fix it or pass --service-cidr"
            )
        };
        let nets = v
            .split(',')
            .map(|c| c.trim().parse::<IpNet>().map_err(|_| bad()))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(nets);
    }
    Ok(vec![DEFAULT_SERVICE_CIDR.parse().expect("valid default")])
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

/// The service ranges for peer configs (see [`service_cidr`]).
pub async fn discover_service_cidr(
    client: &kube::Client,
    args: &GatewayArgs,
    flag: &[IpNet],
) -> anyhow::Result<Vec<IpNet>> {
    if !flag.is_empty() {
        return service_cidr(flag, None).map_err(|e| anyhow!(e));
    }
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &args.gateway_namespace);
    let cm = api
        .get_opt(CONFIG_MAP)
        .await
        .map_err(|e| api_error(e, "reading the kuberaya-config ConfigMap"))?;
    service_cidr(&[], cm.as_ref()).map_err(|e| anyhow!(e))
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
        assert_eq!(service_cidr(&[flag], Some(&cm)).unwrap(), [flag]);
        assert_eq!(
            service_cidr(&[], Some(&cm)).unwrap(),
            ["127.96.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            service_cidr(&[], None).unwrap(),
            [DEFAULT_SERVICE_CIDR.parse::<IpNet>().unwrap()]
        );
        cm.data = Some([(CONFIG_KEY_SERVICE_CIDR.to_string(), "bad".to_string())].into());
        assert!(service_cidr(&[], Some(&cm)).is_err());
        // Dual-stack: one range per family, as kube-apiserver's flag has them.
        cm.data = Some(
            [(
                CONFIG_KEY_SERVICE_CIDR.to_string(),
                "127.96.0.0/16, fd00:96::/112".to_string(),
            )]
            .into(),
        );
        let both: Vec<String> = service_cidr(&[], Some(&cm))
            .unwrap()
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(both, ["127.96.0.0/16", "fd00:96::/112"]);
        cm.data = Some([(CONFIG_KEY_SERVICE_CIDR.to_string(), "127.96.0.0/16,nope".to_string())].into());
        let e = service_cidr(&[], Some(&cm)).unwrap_err();
        assert!(e.contains("comma-separated") && e.contains("--service-cidr"), "{e}");
    }

    /// The gateway Service with `ingress` as its load balancer's addresses.
    fn dual_service(key: &PublicKey, ingress: &[&str]) -> Service {
        let mut svc = gateway_service(key, Some("0.0.0.0"));
        let lb = svc.status.as_mut().unwrap().load_balancer.as_mut().unwrap();
        lb.ingress = Some(
            ingress
                .iter()
                .map(|a| LoadBalancerIngress {
                    ip: Some(a.to_string()),
                    ..Default::default()
                })
                .collect(),
        );
        svc
    }

    #[test]
    fn the_endpoint_is_ipv4_by_default_and_ipv6_when_asked_for_or_the_only_one() {
        let key = PrivateKey::generate().public_key();
        let g = from_service(&dual_service(&key, &["127.203.0.5", "fd00:203::5"])).unwrap();
        assert_eq!(g.endpoint, "127.203.0.5:51820");
        assert_eq!(g.endpoint_for(None).unwrap(), "127.203.0.5:51820");
        assert_eq!(g.endpoint_for(Some(EndpointFamily::Ipv4)).unwrap(), "127.203.0.5:51820");
        assert_eq!(
            g.endpoint_for(Some(EndpointFamily::Ipv6)).unwrap(),
            "[fd00:203::5]:51820"
        );
        // IPv4 is the default whatever the order.
        let g = from_service(&dual_service(&key, &["fd00:203::5", "127.203.0.5"])).unwrap();
        assert_eq!(g.endpoint, "127.203.0.5:51820");
        // An IPv6-only load balancer: its address, in brackets.
        let g = from_service(&dual_service(&key, &["fd00:203::7"])).unwrap();
        assert_eq!(g.endpoint, "[fd00:203::7]:51820");
        let e = g.endpoint_for(Some(EndpointFamily::Ipv4)).unwrap_err();
        assert!(
            e.contains("no IPv4 address (ingress: fd00:203::7)") && e.contains("--endpoint"),
            "{e}"
        );
        // IPv6 asked for, none there.
        let g = from_service(&dual_service(&key, &["127.203.0.5"])).unwrap();
        let e = g.endpoint_for(Some(EndpointFamily::Ipv6)).unwrap_err();
        assert!(e.contains("no IPv6 address (ingress: 127.203.0.5)"), "{e}");
        // A host name is the default when there is no IPv4 address, and is no IPv6 one.
        let mut svc = dual_service(&key, &[]);
        let lb = svc.status.as_mut().unwrap().load_balancer.as_mut().unwrap();
        lb.ingress = Some(vec![LoadBalancerIngress {
            hostname: Some("gw.example.com".into()),
            ..Default::default()
        }]);
        let g = from_service(&svc).unwrap();
        assert_eq!(g.endpoint, "gw.example.com:51820");
        assert!(g.endpoint_for(Some(EndpointFamily::Ipv6)).is_err());
        assert_eq!(endpoint_text("::1", 5), "[::1]:5");
    }

    #[test]
    fn the_ipv6_tunnel_address_comes_from_its_annotation() {
        let key = PrivateKey::generate().public_key();
        let mut svc = gateway_service(&key, Some("127.203.0.5"));
        assert_eq!(from_service(&svc).unwrap().tunnel_v6, None);
        let ann = svc.metadata.annotations.as_mut().unwrap();
        ann.insert(ANNOTATION_TUNNEL_ADDRESS_V6.into(), "fd6b:7261:7961::1/64".into());
        let (a, n) = from_service(&svc).unwrap().tunnel_v6.unwrap();
        assert_eq!(
            (a.to_string(), n.to_string()),
            ("fd6b:7261:7961::1".into(), "fd6b:7261:7961::/64".into())
        );
        let ann = svc.metadata.annotations.as_mut().unwrap();
        ann.insert(ANNOTATION_TUNNEL_ADDRESS_V6.into(), "100.64.0.1/16".into());
        let e = from_service(&svc).unwrap_err();
        assert!(
            e.contains(ANNOTATION_TUNNEL_ADDRESS_V6) && e.contains("not an IPv6"),
            "{e}"
        );
    }
}

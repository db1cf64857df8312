//! `kuberaya expose audit`: every way into the cluster in one list: public load balancers
//! (with their source ranges), NodePort Services, Services with external IPs, and VPN peers
//! with exactly the Services and ports each can reach (the gateway's own rules, see
//! [`crate::reach`]). `--fail-on` turns chosen flags into exit code 1 for CI pipelines.

use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::Service as K8sService;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use kuberaya_gateway::crd::VpnPeer;
use kuberaya_gateway::peers::PeerId;
use kuberaya_gateway::source::kube::service_from_k8s;
use serde::Serialize;

use crate::gateway::GatewayArgs;
use crate::kube::{KubeArgs, Scope, api_error, connect};
use crate::output::{Color, OutputArg, Style, render, table};
use crate::peer;
use crate::reach::{Grants, Reach, reach_of_all};

#[derive(Debug, Subcommand)]
pub enum ExposeCommand {
    /// Every way into the cluster: public LBs, NodePorts, external IPs, VPN peers and their reach.
    #[command(after_help = "Examples:
  kuberaya expose audit
  kuberaya expose audit -o json | jq '.findings[] | select(.kind == \"vpn-peer\") | .reach'
  # In CI: fail when anything is exposed by NodePort or a peer is expired or never connected
  kuberaya expose audit --fail-on nodeport,expired,never-handshook")]
    Audit(AuditArgs),
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Exit with code 1 when a finding carries one of these flags.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "FLAG,...")]
    pub fail_on: Vec<Flag>,
    #[command(flatten)]
    pub output: OutputArg,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// What a finding is flagged for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Flag {
    /// A public load balancer.
    Loadbalancer,
    /// A public load balancer open to any source address.
    AnySource,
    /// A NodePort Service (for testing only).
    Nodeport,
    /// A Service with external IPs.
    ExternalIp,
    /// A VPN peer.
    Peer,
    /// A peer past its expiry that still exists.
    Expired,
    /// A peer that never completed a handshake.
    NeverHandshook,
    /// A disabled peer.
    Disabled,
    /// A peer the gateway rejected.
    Rejected,
}

impl Flag {
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::Loadbalancer => "loadbalancer",
            Flag::AnySource => "any-source",
            Flag::Nodeport => "nodeport",
            Flag::ExternalIp => "external-ip",
            Flag::Peer => "peer",
            Flag::Expired => "expired",
            Flag::NeverHandshook => "never-handshook",
            Flag::Disabled => "disabled",
            Flag::Rejected => "rejected",
        }
    }
}

/// One way in.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    /// `loadbalancer`, `nodeport`, `external-ip` or `vpn-peer`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// Where it is reached: `IP:port/proto`, `<nodes>:port/proto`, or a peer's tunnel address.
    pub addresses: Vec<String>,
    /// Load balancers: the allowed source ranges (empty: any).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<String>,
    /// Peers: the Services and ports their rules reach.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reach: Option<Vec<Reach>>,
    /// Peers: Accepted, Rejected, Pending, Disabled or Expired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    pub flags: Vec<Flag>,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Audit {
    pub findings: Vec<Finding>,
}

fn ports_of(svc: &K8sService, host: &str, node_port: bool) -> Vec<String> {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| {
            let proto = p.protocol.as_deref().unwrap_or("TCP").to_lowercase();
            let port = if node_port { p.node_port? } else { p.port };
            Some(format!("{host}:{port}/{proto}"))
        })
        .collect()
}

/// The audit of these Services and peers at `now` (pure).
pub fn audit(
    services: &[K8sService],
    peers: &[VpnPeer],
    grants: &Grants,
    gateway_namespace: &str,
    now: Timestamp,
) -> Audit {
    let mut findings = Vec::new();
    let mut sorted: Vec<&K8sService> = services.iter().collect();
    sorted.sort_by_key(|s| (s.namespace(), s.name_any()));
    for svc in &sorted {
        let spec = svc.spec.clone().unwrap_or_default();
        let (ns, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
        match spec.type_.as_deref() {
            Some("LoadBalancer") => {
                let ingress: Vec<String> = svc
                    .status
                    .as_ref()
                    .and_then(|s| s.load_balancer.as_ref())
                    .and_then(|l| l.ingress.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|i| i.ip.or(i.hostname))
                    .collect();
                let hosts = if ingress.is_empty() {
                    vec!["<pending>".to_string()]
                } else {
                    ingress
                };
                let ranges = spec.load_balancer_source_ranges.clone().unwrap_or_default();
                let mut flags = vec![Flag::Loadbalancer];
                if ranges.is_empty() {
                    flags.push(Flag::AnySource);
                }
                findings.push(Finding {
                    kind: "loadbalancer".into(),
                    namespace: ns.clone(),
                    name: name.clone(),
                    addresses: hosts.iter().flat_map(|h| ports_of(svc, h, false)).collect(),
                    note: if ranges.is_empty() {
                        "public, from any source".into()
                    } else {
                        format!("public, from {}", ranges.join(", "))
                    },
                    source_ranges: ranges,
                    reach: None,
                    state: None,
                    flags,
                });
            }
            Some("NodePort") => findings.push(Finding {
                kind: "nodeport".into(),
                namespace: ns.clone(),
                name: name.clone(),
                addresses: ports_of(svc, "<nodes>", true),
                source_ranges: vec![],
                reach: None,
                state: None,
                flags: vec![Flag::Nodeport],
                note: "NodePort: for testing only; use a LoadBalancer or the VPN".into(),
            }),
            _ => {}
        }
        let external = spec.external_ips.clone().unwrap_or_default();
        if !external.is_empty() {
            findings.push(Finding {
                kind: "external-ip".into(),
                namespace: ns.clone(),
                name: name.clone(),
                addresses: external.iter().flat_map(|ip| ports_of(svc, ip, false)).collect(),
                source_ranges: vec![],
                reach: None,
                state: None,
                flags: vec![Flag::ExternalIp],
                note: "external IPs: reachable wherever those addresses route".into(),
            });
        }
    }
    let catalog: Vec<_> = services.iter().filter_map(service_from_k8s).collect();
    let mut reach = reach_of_all(peers, &catalog, grants, gateway_namespace, now);
    let mut sorted_peers: Vec<&VpnPeer> = peers.iter().collect();
    sorted_peers.sort_by_key(|p| (p.namespace(), p.name_any()));
    for p in sorted_peers {
        let row = peer::row_of(p, now);
        let mut flags = vec![Flag::Peer];
        match row.state.as_str() {
            "Expired" => flags.push(Flag::Expired),
            "Disabled" => flags.push(Flag::Disabled),
            "Rejected" => flags.push(Flag::Rejected),
            _ => {}
        }
        if row.last_handshake.is_none() {
            flags.push(Flag::NeverHandshook);
        }
        let r = reach
            .remove(&PeerId::new(row.namespace.clone(), row.name.clone()))
            .unwrap_or_default();
        let admin = row.namespace == gateway_namespace;
        findings.push(Finding {
            kind: "vpn-peer".into(),
            addresses: row.address.clone().into_iter().collect(),
            source_ranges: vec![],
            note: format!(
                "{} peer, {}",
                if admin { "admin" } else { "team" },
                match row.state.as_str() {
                    "Accepted" => "active now".to_string(),
                    "Expired" => "expired but still present: remove it".to_string(),
                    s => format!("{} (reach applies once active)", s.to_lowercase()),
                }
            ),
            namespace: row.namespace,
            name: row.name,
            reach: Some(r),
            state: Some(row.state),
            flags,
        });
    }
    Audit { findings }
}

/// The findings that carry one of `fail_on`.
pub fn failing<'a>(a: &'a Audit, fail_on: &[Flag]) -> Vec<&'a Finding> {
    a.findings
        .iter()
        .filter(|f| f.flags.iter().any(|x| fail_on.contains(x)))
        .collect()
}

pub fn audit_table(a: &Audit, wide: bool, style: &Style) -> String {
    if a.findings.is_empty() {
        return "Nothing is exposed.\n".into();
    }
    let mut headers = vec!["kind", "namespace/name", "address", "exposes", "flags"];
    if wide {
        headers.push("note");
    }
    let rows: Vec<Vec<String>> = a
        .findings
        .iter()
        .map(|f| {
            let exposes = match &f.reach {
                Some(r) if r.is_empty() => "nothing".to_string(),
                Some(r) => r.iter().map(Reach::short).collect::<Vec<_>>().join(" "),
                None if f.source_ranges.is_empty() => "from any source".to_string(),
                None => format!("from {}", f.source_ranges.join(",")),
            };
            let flags: Vec<String> = f
                .flags
                .iter()
                .map(|x| match x {
                    Flag::Nodeport | Flag::Expired | Flag::Rejected | Flag::AnySource => {
                        style.paint(x.as_str(), Color::Red)
                    }
                    Flag::NeverHandshook | Flag::Disabled | Flag::ExternalIp => style.paint(x.as_str(), Color::Yellow),
                    _ => x.as_str().to_string(),
                })
                .collect();
            let mut row = vec![
                f.kind.clone(),
                format!("{}/{}", f.namespace, f.name),
                if f.addresses.is_empty() {
                    "-".into()
                } else {
                    f.addresses.join(",")
                },
                exposes,
                flags.join(","),
            ];
            if wide {
                row.push(f.note.clone());
            }
            row
        })
        .collect();
    table(&headers, &rows)
}

pub async fn run(cmd: ExposeCommand, kube_args: &KubeArgs) -> anyhow::Result<ExitCode> {
    let ExposeCommand::Audit(a) = cmd;
    let k = connect(kube_args).await?;
    let scope = if kube_args.namespace.is_some() && !kube_args.all_namespaces {
        Scope::from_args(kube_args, "default")
    } else {
        Scope::All
    };
    let services: Vec<K8sService> = Api::<K8sService>::all(k.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "listing Services"))?
        .items;
    let peers: Vec<VpnPeer> = match Api::<VpnPeer>::all(k.client.clone()).list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(kube::Error::Api(s)) if s.code == 404 => {
            eprintln!("note: the VpnPeer CRD is not installed; no VPN peers to audit");
            Vec::new()
        }
        Err(e) => return Err(api_error(e, "listing VpnPeers")),
    };
    let grants = Grants::fetch(&k).await?;
    let mut result = audit(
        &services,
        &peers,
        &grants,
        &a.gateway.gateway_namespace,
        Timestamp::now(),
    );
    result.findings.retain(|f| scope.contains(&f.namespace));
    let style = Style::detect();
    print!(
        "{}",
        render(a.output.output, &result, |wide| audit_table(&result, wide, &style))?
    );
    let bad = failing(&result, &a.fail_on);
    if bad.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let names: Vec<String> = bad
        .iter()
        .map(|f| format!("{} {}/{}", f.kind, f.namespace, f.name))
        .collect();
    eprintln!(
        "audit failed: {} finding(s) flagged {}: {}",
        bad.len(),
        a.fail_on.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(","),
        names.join(", ")
    );
    Ok(ExitCode::from(1))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, ServicePort, ServiceSpec, ServiceStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    pub(crate) fn k8s_service(
        ns: &str,
        name: &str,
        type_: &str,
        ip: &str,
        port: i32,
        node_port: Option<i32>,
    ) -> K8sService {
        let mut s = K8sService::default();
        s.metadata.namespace = Some(ns.into());
        s.metadata.name = Some(name.into());
        s.spec = Some(ServiceSpec {
            type_: Some(type_.into()),
            cluster_ip: Some(ip.into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port,
                node_port,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        s
    }

    pub(crate) fn fixture() -> (Vec<K8sService>, Vec<VpnPeer>, Timestamp) {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let mut lb = k8s_service("shop", "web", "LoadBalancer", "127.96.0.10", 80, Some(30080));
        lb.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some("127.203.0.10".into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        });
        let np = k8s_service("shop", "debug", "NodePort", "127.96.0.11", 8080, Some(30081));
        let mut ext = k8s_service("ops", "legacy", "ClusterIP", "127.96.0.12", 443, None);
        ext.spec.as_mut().unwrap().external_ips = Some(vec!["198.51.100.7".into()]);
        let db = k8s_service("db", "pg", "ClusterIP", "127.96.0.13", 5432, None);
        let admin = crate::peer::tests::with_status(
            crate::reach::tests::peer(
                "kuberaya-system",
                "alice",
                1,
                vec![crate::peer::parse_allow("db/pg").unwrap()],
            ),
            Some(("True", "Accepted")),
            Some("100.64.0.2"),
        );
        let mut admin = admin;
        admin.status.as_mut().unwrap().last_handshake = Some(Time(Timestamp::from_second(1_799_999_900).unwrap()));
        admin.status.as_mut().unwrap().rx_bytes = 1536;
        admin.status.as_mut().unwrap().tx_bytes = 4096;
        let mut team = crate::peer::tests::with_status(
            crate::reach::tests::peer("shop", "bob", 2, vec![crate::peer::parse_allow("shop/web:80").unwrap()]),
            Some(("False", "Expired")),
            None,
        );
        team.spec.expires_at = Some(Time(Timestamp::from_second(1_700_000_000).unwrap()));
        team.status.as_mut().unwrap().last_address = Some("100.64.0.3".into());
        (vec![lb, np, ext, db], vec![admin, team], now)
    }

    #[test]
    fn audit_lists_every_way_in() {
        let (services, peers, now) = fixture();
        let a = audit(&services, &peers, &Grants::default(), "kuberaya-system", now);
        let kinds: Vec<(&str, &str)> = a.findings.iter().map(|f| (f.kind.as_str(), f.name.as_str())).collect();
        assert_eq!(
            kinds,
            vec![
                ("external-ip", "legacy"),
                ("nodeport", "debug"),
                ("loadbalancer", "web"),
                ("vpn-peer", "alice"),
                ("vpn-peer", "bob"),
            ]
        );
        assert_eq!(a.findings[1].addresses, vec!["<nodes>:30081/tcp"]);
        assert_eq!(a.findings[2].addresses, vec!["127.203.0.10:80/tcp"]);
        assert!(a.findings[2].flags.contains(&Flag::AnySource));
        let alice = &a.findings[3];
        assert_eq!(alice.reach.as_ref().unwrap()[0].short(), "db/pg:5432/tcp");
        assert!(!alice.flags.contains(&Flag::NeverHandshook));
        let bob = &a.findings[4];
        assert!(bob.flags.contains(&Flag::Expired) && bob.flags.contains(&Flag::NeverHandshook));
        assert_eq!(bob.reach.as_ref().unwrap()[0].short(), "shop/web:80/tcp");
        assert_eq!(failing(&a, &[Flag::Nodeport]).len(), 1);
        assert_eq!(failing(&a, &[Flag::Expired, Flag::NeverHandshook]).len(), 1);
        assert!(failing(&a, &[Flag::Rejected]).is_empty());
    }
}

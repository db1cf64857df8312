//! What each peer can reach, resolved to Services now: the gateway's own validation
//! (`kuberaya_gateway::peers::validate`), policy resolution (`kuberaya_gateway::policy`)
//! and ACL compilation (`kuberaya_gateway::acl::Acl`) run over the cluster's `VpnPeer`s,
//! `VpnAccessPolicies` and Services, so the CLI answers exactly as the gateway enforces.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use kuberaya_gateway::access::{self, Compiled};
use kuberaya_gateway::catalog::Service;
use kuberaya_gateway::crd::{VpnAccessPolicy, VpnPeer};
use kuberaya_gateway::peers::{PeerId, TunnelConfig};
use kuberaya_gateway::policy::{Labels, PolicyInput, RuleSource};
use kuberaya_gateway::source::kube::{peer_from_k8s, policy_from_k8s};
use serde::Serialize;

use crate::kube::{Kube, api_error, is_not_found};

/// The access policies in force and the namespaces' labels they select by.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    pub policies: Vec<PolicyInput>,
    pub namespaces: HashMap<String, Labels>,
}

impl Grants {
    /// Every VpnAccessPolicy and Namespace's labels (none when the policy CRD is not
    /// installed: peers then reach by their own rules, as the gateway serves them).
    pub async fn fetch(k: &Kube) -> anyhow::Result<Grants> {
        let policies = match Api::<VpnAccessPolicy>::all(k.client.clone())
            .list(&ListParams::default())
            .await
        {
            Ok(l) => l.items.iter().filter_map(policy_from_k8s).collect(),
            Err(e) if is_not_found(&e) => Vec::new(),
            Err(e) => return Err(api_error(e, "listing VpnAccessPolicies")),
        };
        let namespaces = Api::<Namespace>::all(k.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| api_error(e, "listing Namespaces"))?
            .items
            .iter()
            .map(|n| (n.name_any(), n.metadata.labels.clone().unwrap_or_default()))
            .collect();
        Ok(Grants { policies, namespaces })
    }
}

/// One Service a peer can reach, with the ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reach {
    pub namespace: String,
    pub service: String,
    #[serde(rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<IpAddr>,
    pub ports: Vec<ReachPort>,
    /// The access policies that grant any of these ports (`ns/name`); none when the
    /// peer's own rules do.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub via: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReachPort {
    pub port: u16,
    pub protocol: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Reach {
    /// `ns/svc:80/tcp,443/tcp`.
    pub fn short(&self) -> String {
        let ports: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("{}/{}", p.port, p.protocol))
            .collect();
        let via = if self.via.is_empty() {
            String::new()
        } else {
            format!(" (policy {})", self.via.join(", "))
        };
        format!("{}/{}:{}{via}", self.namespace, self.service, ports.join(","))
    }
}

/// The reach of every peer by its rules, whether or not it is disabled or expired now (the
/// caller shows its state next to it): what it reaches, or would reach when re-enabled.
/// Peers whose rules the gateway rejects (a team peer naming another namespace, a bad
/// key) reach nothing.
pub fn reach_of_all(
    peers: &[VpnPeer],
    services: &[Service],
    grants: &Grants,
    gateway_namespace: &str,
    now: Timestamp,
) -> BTreeMap<PeerId, Vec<Reach>> {
    // Addresses only key the ACL here; a wide range keeps allocation from ever failing.
    let tunnel = TunnelConfig {
        range: Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10).expect("valid range"),
        range_v6: TunnelConfig::default_range_v6(),
        gateway_namespace: gateway_namespace.to_string(),
    };
    let inputs: Vec<_> = peers
        .iter()
        .filter_map(peer_from_k8s)
        .map(|mut i| {
            i.spec.disabled = false;
            i.spec.expires_at = None;
            i.spec.address = None;
            i.previous_address = None;
            i.granted.address = None;
            i.spec.preshared_key_secret_ref = None;
            i
        })
        .collect();
    let Compiled {
        validation,
        catalog,
        acl,
    } = access::compile(&inputs, &grants.policies, services, &grants.namespaces, &tunnel, now);
    let mut sorted: Vec<&Service> = catalog.services().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut out = BTreeMap::new();
    for input in &inputs {
        let mut reach = Vec::new();
        if let Some(p) = validation.accepted(&input.id) {
            for svc in &sorted {
                let idx = acl.allowed_ports(p.address, &svc.namespace, &svc.name);
                if idx.is_empty() {
                    continue;
                }
                // A port's first allowing rule (own rules come first): the policies among them.
                let mut via: Vec<String> = Vec::new();
                if let Some(ip) = svc.cluster_ip {
                    for &i in idx {
                        let port = &svc.ports[i];
                        if let Some(RuleSource::Policy(id)) =
                            acl.allowed_by(p.address, ip, port.protocol.ip_proto(), Some(port.port))
                        {
                            let id = id.to_string();
                            if !via.contains(&id) {
                                via.push(id);
                            }
                        }
                    }
                }
                reach.push(Reach {
                    namespace: svc.namespace.clone(),
                    service: svc.name.clone(),
                    cluster_ip: svc.cluster_ip,
                    via,
                    ports: idx
                        .iter()
                        .map(|&i| ReachPort {
                            port: svc.ports[i].port,
                            protocol: svc.ports[i].protocol.as_str().to_string(),
                            name: svc.ports[i].name.clone(),
                        })
                        .collect(),
                });
            }
        }
        out.insert(input.id.clone(), reach);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kuberaya_gateway::catalog::{Protocol, ServicePort};
    use kuberaya_gateway::crd::{AllowRule, PortRef, VpnPeerSpec};
    use kuberaya_gateway::keys::PublicKey;

    pub(crate) fn svc(ns: &str, name: &str, ip: &str, ports: &[(&str, u16)]) -> Service {
        Service {
            namespace: ns.into(),
            name: name.into(),
            cluster_ip: Some(ip.parse().unwrap()),
            cluster_ips: vec![],
            ports: ports
                .iter()
                .map(|(n, p)| ServicePort {
                    name: Some(n.to_string()),
                    port: *p,
                    protocol: Protocol::Tcp,
                })
                .collect(),
        }
    }

    pub(crate) fn peer(ns: &str, name: &str, key: u8, allow: Vec<AllowRule>) -> VpnPeer {
        let mut p = VpnPeer::new(
            name,
            VpnPeerSpec {
                public_key: PublicKey([key; 32]).to_base64(),
                allow,
                ..Default::default()
            },
        );
        p.metadata.namespace = Some(ns.into());
        p
    }

    fn rule(ns: Option<&str>, svc: Option<&str>, ports: Option<Vec<PortRef>>) -> AllowRule {
        AllowRule {
            namespace: ns.map(Into::into),
            service: svc.map(Into::into),
            ports,
        }
    }

    #[test]
    fn reach_follows_the_gateways_rules() {
        let services = vec![
            svc("team-a", "web", "127.96.0.10", &[("http", 80), ("metrics", 9090)]),
            svc("team-b", "db", "127.96.0.11", &[("pg", 5432)]),
        ];
        let admin = peer(
            "kuberaya-system",
            "ops",
            1,
            vec![
                rule(Some("team-b"), None, None),
                rule(Some("team-a"), Some("web"), Some(vec![PortRef::Name("http".into())])),
            ],
        );
        // A team peer naming another namespace is rejected by the gateway: no reach.
        let sneaky = peer("team-a", "sneaky", 2, vec![rule(Some("team-b"), None, None)]);
        let mut dev = peer("team-a", "dev", 3, vec![rule(None, Some("web"), None)]);
        dev.spec.disabled = true;
        let r = reach_of_all(
            &[admin, sneaky, dev],
            &services,
            &Grants::default(),
            "kuberaya-system",
            Timestamp::UNIX_EPOCH,
        );
        let ops = &r[&PeerId::new("kuberaya-system", "ops")];
        let shorts: Vec<String> = ops.iter().map(Reach::short).collect();
        assert_eq!(shorts, vec!["team-a/web:80/tcp", "team-b/db:5432/tcp"]);
        assert!(r[&PeerId::new("team-a", "sneaky")].is_empty());
        let dev = &r[&PeerId::new("team-a", "dev")];
        assert_eq!(dev[0].short(), "team-a/web:80/tcp,9090/tcp");
    }

    #[test]
    fn reach_through_a_policy_names_it() {
        use kuberaya_gateway::crd::{LabelSelector, VpnAccessPolicySpec};
        let services = vec![
            svc("team-a", "web", "127.96.0.10", &[("http", 80)]),
            svc("team-a", "db", "127.96.0.11", &[("pg", 5432)]),
        ];
        let mut dev = peer("team-a", "dev", 3, vec![rule(None, Some("web"), None)]);
        dev.metadata.labels = Some([("role".to_string(), "dba".to_string())].into());
        let other = peer("team-a", "other", 4, vec![]);
        let grants = Grants {
            policies: vec![PolicyInput::new(
                PeerId::new("team-a", "dbas"),
                VpnAccessPolicySpec {
                    peer_selector: LabelSelector {
                        match_labels: [("role".to_string(), "dba".to_string())].into(),
                        ..Default::default()
                    },
                    allow: vec![rule(None, Some("db"), None)],
                    ..Default::default()
                },
            )],
            namespaces: HashMap::new(),
        };
        let r = reach_of_all(
            &[dev, other],
            &services,
            &grants,
            "kuberaya-system",
            Timestamp::UNIX_EPOCH,
        );
        let shorts: Vec<String> = r[&PeerId::new("team-a", "dev")].iter().map(Reach::short).collect();
        assert_eq!(
            shorts,
            vec!["team-a/db:5432/tcp (policy team-a/dbas)", "team-a/web:80/tcp"]
        );
        assert!(r[&PeerId::new("team-a", "other")].is_empty());
    }
}

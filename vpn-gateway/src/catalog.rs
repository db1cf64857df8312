//! The Service catalog: what the gateway knows of the cluster's Services (namespace, name,
//! ClusterIPs of both families, ports), by name and by ClusterIP. The ACL compiles peers' rules against it
//! and DNS answers from it; the sources ([`crate::source`]) fill it.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::packet::{PROTO_TCP, PROTO_UDP};

/// A Service port's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
            Protocol::Sctp => 132,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

/// What the gateway needs of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// `None` for headless Services and Services without an address yet.
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<IpAddr>,
    /// Every ClusterIP (`spec.clusterIPs`: a dual-stack Service has one per family, the
    /// primary first); empty means just `cluster_ip`.
    #[serde(default, rename = "clusterIPs", skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<IpAddr>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

impl Service {
    /// Every ClusterIP of the Service, the primary first.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let all = if self.cluster_ips.is_empty() {
            self.cluster_ip.as_slice()
        } else {
            self.cluster_ips.as_slice()
        };
        all.iter().copied()
    }
}

/// The Services known to the gateway, by namespace and name and by ClusterIP.
///
/// A ClusterIP that two Services claim (a Service deleted and its address given to a new
/// one, seen by the cache before the deletion) belongs to neither until the cache settles:
/// which of them a packet to it reaches is not for the gateway to guess, so it is no
/// one's to grant, whatever order the Services were listed in.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    by_name: HashMap<(String, String), Arc<Service>>,
    by_ip: HashMap<IpAddr, Arc<Service>>,
    ambiguous: HashSet<IpAddr>,
}

impl Catalog {
    pub fn new(services: impl IntoIterator<Item = Service>) -> Self {
        let mut c = Catalog::default();
        for s in services {
            let s = Arc::new(s);
            for ip in s.addresses() {
                if let Some(other) = c.by_ip.insert(ip, s.clone())
                    && (other.namespace != s.namespace || other.name != s.name)
                {
                    c.ambiguous.insert(ip);
                }
            }
            c.by_name.insert((s.namespace.clone(), s.name.clone()), s);
        }
        for ip in &c.ambiguous {
            c.by_ip.remove(ip);
        }
        c
    }

    /// Whether two Services claim `ip` (then no rule grants it).
    pub fn is_ambiguous(&self, ip: &IpAddr) -> bool {
        self.ambiguous.contains(ip)
    }
    pub fn get(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.by_name
            .get(&(namespace.to_string(), name.to_string()))
            .map(|s| s.as_ref())
    }
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Service> {
        self.by_ip.get(&ip).map(|s| s.as_ref())
    }
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.by_name.values().map(|s| s.as_ref())
    }
    pub fn len(&self) -> usize {
        self.by_name.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn catalog() -> Catalog {
        Catalog::new([
            Service {
                namespace: "default".into(),
                name: "web".into(),
                cluster_ip: Some("127.96.0.10".parse().unwrap()),
                cluster_ips: vec![],
                ports: vec![
                    ServicePort {
                        name: Some("http".into()),
                        port: 80,
                        protocol: Protocol::Tcp,
                    },
                    ServicePort {
                        name: Some("metrics".into()),
                        port: 9090,
                        protocol: Protocol::Tcp,
                    },
                ],
            },
            Service {
                namespace: "default".into(),
                name: "dns".into(),
                cluster_ip: Some("127.96.0.53".parse().unwrap()),
                cluster_ips: vec![],
                ports: vec![ServicePort {
                    name: Some("dns".into()),
                    port: 53,
                    protocol: Protocol::Udp,
                }],
            },
            Service {
                namespace: "db".into(),
                name: "pg".into(),
                cluster_ip: Some("127.96.1.5".parse().unwrap()),
                cluster_ips: vec![],
                ports: vec![ServicePort {
                    name: None,
                    port: 5432,
                    protocol: Protocol::Tcp,
                }],
            },
        ])
    }

    /// [`catalog`] with `web` and `pg` dual-stack and an IPv6-only `default/six`.
    pub(crate) fn dual_catalog() -> Catalog {
        let mut services: Vec<Service> = catalog().services().cloned().collect();
        for s in &mut services {
            let v6 = match s.name.as_str() {
                "web" => "fd00:96::a",
                "pg" => "fd00:96::1:5",
                _ => continue,
            };
            s.cluster_ips = vec![s.cluster_ip.unwrap(), v6.parse().unwrap()];
        }
        services.push(Service {
            namespace: "default".into(),
            name: "six".into(),
            cluster_ip: Some("fd00:96::6".parse().unwrap()),
            cluster_ips: vec!["fd00:96::6".parse().unwrap()],
            ports: vec![ServicePort {
                name: Some("http".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
        });
        Catalog::new(services)
    }

    #[test]
    fn every_cluster_ip_finds_its_service() {
        let c = dual_catalog();
        for (ip, name) in [
            ("127.96.0.10", "web"),
            ("fd00:96::a", "web"),
            ("fd00:96::6", "six"),
            ("fd00:96::1:5", "pg"),
        ] {
            assert_eq!(
                c.by_ip(ip.parse().unwrap()).map(|s| s.name.as_str()),
                Some(name),
                "{ip}"
            );
        }
        // Two Services claiming one IPv6 ClusterIP: neither has it; their others stay.
        let mut services: Vec<Service> = c.services().cloned().collect();
        let six = services.iter_mut().find(|s| s.name == "six").unwrap();
        six.cluster_ips.push("fd00:96::a".parse().unwrap());
        let c = Catalog::new(services);
        assert!(c.is_ambiguous(&"fd00:96::a".parse().unwrap()));
        assert_eq!(c.by_ip("fd00:96::a".parse().unwrap()), None);
        assert_eq!(c.by_ip("127.96.0.10".parse().unwrap()).unwrap().name, "web");
        assert_eq!(c.by_ip("fd00:96::6".parse().unwrap()).unwrap().name, "six");
    }

    #[test]
    fn service_file_format() {
        let s: Service = serde_json::from_value(serde_json::json!({
            "namespace": "default", "name": "web", "clusterIP": "127.96.0.10",
            "ports": [{"name": "http", "port": 80}, {"port": 53, "protocol": "UDP"}]
        }))
        .unwrap();
        assert_eq!(s.ports[0].protocol, Protocol::Tcp);
        assert_eq!(s.ports[1].protocol, Protocol::Udp);
        let dual: Service = serde_json::from_value(serde_json::json!({
            "namespace": "default", "name": "web", "clusterIP": "127.96.0.10",
            "clusterIPs": ["127.96.0.10", "fd00:96::a"], "ports": [{"port": 80}]
        }))
        .unwrap();
        let all: Vec<IpAddr> = dual.addresses().collect();
        assert_eq!(
            all,
            ["127.96.0.10".parse::<IpAddr>().unwrap(), "fd00:96::a".parse().unwrap()]
        );
        assert_eq!(
            s.addresses().collect::<Vec<_>>(),
            ["127.96.0.10".parse::<IpAddr>().unwrap()]
        );
    }
}

//! The gateway's DNS answers, as a pure function of (query, peer, rules, Service catalog).
//! The socket work (UDP and TCP on the gateway's tunnel address) is the data plane's.
//!
//! - `svc.ns.svc.<domain>`, `svc.ns.svc` and `svc.ns` → the ClusterIPs: A for the IPv4
//!   one, AAAA for the IPv6 one of a dual-stack or IPv6 Service; no data (NOERROR) when the
//!   Service has none of the family asked for;
//! - `_port._proto.svc.ns.svc.<domain>` (and the short forms) → SRV for a named port;
//! - a Service the peer may not reach, or that does not exist → NXDOMAIN (the same
//!   answer, so a peer cannot probe which Services exist);
//! - other names → forwarded upstream when one is configured, else REFUSED.
//!
//! `svc.ns` is only taken as a Service name when `ns` is a namespace with Services, so
//! that `example.com` still goes upstream.

use std::net::{IpAddr, Ipv4Addr};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::acl::Acl;
use crate::catalog::{Catalog, Service};

/// TTL of the records we answer: short, so Service changes show up quickly.
pub const TTL: u32 = 5;

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsAnswer {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Relay the query to the upstream server unchanged and its answer back.
    Forward,
}

/// The resolver's configuration.
#[derive(Debug, Clone)]
pub struct Resolver {
    /// The cluster domain's labels, lowercase (`["cluster", "local"]`).
    domain: Vec<String>,
    has_upstream: bool,
}

enum Lookup<'a> {
    Service {
        ns: &'a str,
        svc: &'a str,
    },
    Srv {
        port: &'a str,
        proto: &'a str,
        ns: &'a str,
        svc: &'a str,
    },
    /// Inside the cluster domain but not a Service name.
    ClusterOther,
    External,
}

impl Resolver {
    pub fn new(cluster_domain: &str, has_upstream: bool) -> Self {
        let domain = cluster_domain
            .trim_matches('.')
            .split('.')
            .filter(|l| !l.is_empty())
            .map(|l| l.to_ascii_lowercase())
            .collect();
        Resolver { domain, has_upstream }
    }

    /// Answer a query from the peer whose tunnel address is `peer`. `None` when the bytes
    /// are not a DNS query at all (drop them).
    pub fn answer(&self, query: &[u8], peer: Ipv4Addr, acl: &Acl, catalog: &Catalog) -> Option<DnsAnswer> {
        let req = Message::from_vec(query).ok()?;
        if req.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        resp.metadata.recursion_available = self.has_upstream;
        if req.metadata.op_code != OpCode::Query {
            resp.metadata.response_code = ResponseCode::NotImp;
            return encode(&resp);
        }
        let [q] = req.queries.as_slice() else {
            resp.metadata.response_code = ResponseCode::FormErr;
            return encode(&resp);
        };
        resp.add_query(q.clone());
        let ascii = q.name().to_ascii().to_ascii_lowercase();
        let labels: Vec<&str> = ascii.trim_end_matches('.').split('.').collect();
        match self.classify(&labels, catalog) {
            Lookup::External if self.has_upstream => return Some(DnsAnswer::Forward),
            Lookup::External => resp.metadata.response_code = ResponseCode::Refused,
            Lookup::ClusterOther => {
                resp.metadata.authoritative = true;
                resp.metadata.response_code = ResponseCode::NXDomain;
            }
            Lookup::Service { ns, svc } => {
                resp.metadata.authoritative = true;
                match visible(catalog, acl, peer, ns, svc) {
                    None => resp.metadata.response_code = ResponseCode::NXDomain,
                    Some(s) => {
                        for rd in address_rdata(s, q.query_type()) {
                            resp.add_answer(Record::from_rdata(q.name().clone(), TTL, rd));
                        }
                    }
                }
            }
            Lookup::Srv { port, proto, ns, svc } => {
                resp.metadata.authoritative = true;
                match visible(catalog, acl, peer, ns, svc) {
                    None => resp.metadata.response_code = ResponseCode::NXDomain,
                    Some(s) => {
                        let target = self.service_name(ns, svc);
                        let found = acl
                            .allowed_ports(peer, ns, svc)
                            .iter()
                            .filter_map(|&i| s.ports.get(i))
                            .find(|p| {
                                p.name.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(port))
                                    && p.protocol.as_str() == proto
                            });
                        match (found, target) {
                            (Some(p), Some(target)) => {
                                if matches!(q.query_type(), RecordType::SRV | RecordType::ANY) {
                                    let srv = SRV::new(0, 100, p.port, target.clone());
                                    resp.add_answer(Record::from_rdata(q.name().clone(), TTL, RData::SRV(srv)));
                                    for rd in address_rdata(s, RecordType::ANY) {
                                        resp.add_additional(Record::from_rdata(target.clone(), TTL, rd));
                                    }
                                }
                            }
                            _ => resp.metadata.response_code = ResponseCode::NXDomain,
                        }
                    }
                }
            }
        }
        encode(&resp)
    }

    fn service_name(&self, ns: &str, svc: &str) -> Option<Name> {
        let mut s = format!("{svc}.{ns}.svc");
        for l in &self.domain {
            s.push('.');
            s.push_str(l);
        }
        s.push('.');
        Name::from_ascii(s).ok()
    }

    fn classify<'a>(&self, labels: &[&'a str], catalog: &Catalog) -> Lookup<'a> {
        let in_domain = labels.len() >= self.domain.len()
            && !self.domain.is_empty()
            && labels[labels.len() - self.domain.len()..]
                .iter()
                .zip(&self.domain)
                .all(|(a, b)| a == b);
        let (rest, explicit) = if in_domain {
            (&labels[..labels.len() - self.domain.len()], true)
        } else {
            (labels, false)
        };
        match rest {
            [svc, ns, "svc"] if !svc.starts_with('_') => Lookup::Service { ns, svc },
            [port, proto, svc, ns, "svc"] => match (port.strip_prefix('_'), proto.strip_prefix('_')) {
                (Some(port), Some(proto)) => Lookup::Srv { port, proto, ns, svc },
                _ => Lookup::ClusterOther,
            },
            [svc, ns] if !explicit && has_namespace(catalog, ns) => Lookup::Service { ns, svc },
            [port, proto, svc, ns] if !explicit && has_namespace(catalog, ns) => {
                match (port.strip_prefix('_'), proto.strip_prefix('_')) {
                    (Some(port), Some(proto)) => Lookup::Srv { port, proto, ns, svc },
                    _ => Lookup::External,
                }
            }
            _ if explicit => Lookup::ClusterOther,
            _ => Lookup::External,
        }
    }
}

fn has_namespace(catalog: &Catalog, ns: &str) -> bool {
    catalog.services().any(|s| s.namespace == ns)
}

fn visible<'c>(catalog: &'c Catalog, acl: &Acl, peer: Ipv4Addr, ns: &str, svc: &str) -> Option<&'c Service> {
    catalog.get(ns, svc).filter(|_| acl.may_resolve(peer, ns, svc))
}

/// The address records of `s` a query of `qtype` gets: its ClusterIPs of that family (A,
/// AAAA), or of both (ANY).
fn address_rdata(s: &Service, qtype: RecordType) -> impl Iterator<Item = RData> + '_ {
    s.addresses().filter_map(move |ip| match (ip, qtype) {
        (IpAddr::V4(a), RecordType::A | RecordType::ANY) => Some(RData::A(A(a))),
        (IpAddr::V6(a), RecordType::AAAA | RecordType::ANY) => Some(RData::AAAA(AAAA(a))),
        _ => None,
    })
}

fn encode(m: &Message) -> Option<DnsAnswer> {
    m.to_vec().ok().map(DnsAnswer::Reply)
}

/// A REFUSED/SERVFAIL-style reply to `query` (used when the upstream does not answer).
pub fn error_reply(query: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    let req = Message::from_vec(query).ok()?;
    let mut resp = Message::error_msg(req.metadata.id, req.metadata.op_code, code);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    for q in req.queries {
        resp.add_query(q);
    }
    resp.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::tests::peer;
    use crate::catalog::tests::catalog;
    use crate::peers::Rule;
    use hickory_proto::op::Query;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn setup() -> (Acl, Catalog, Ipv4Addr) {
        let p = peer(
            [100, 64, 0, 2],
            vec![Rule {
                namespace: "default".into(),
                service: Some("web".into()),
                ports: None,
            }],
        );
        let c = catalog();
        (
            Acl::compile(Ipv4Addr::new(100, 64, 0, 1), std::slice::from_ref(&p), &c),
            c,
            p.address,
        )
    }

    fn ask(r: &Resolver, name: &str, t: RecordType) -> Message {
        let (acl, c, me) = setup();
        match r.answer(&query(name, t), me, &acl, &c).unwrap() {
            DnsAnswer::Reply(b) => Message::from_vec(&b).unwrap(),
            DnsAnswer::Forward => panic!("forwarded {name}"),
        }
    }

    fn a_of(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_records_in_all_three_forms() {
        let r = Resolver::new("cluster.local", false);
        for name in [
            "web.default.svc.cluster.local.",
            "web.default.svc.",
            "web.default.",
            "WEB.Default.svc.cluster.local",
        ] {
            let m = ask(&r, name, RecordType::A);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
            assert_eq!(a_of(&m), vec![Ipv4Addr::new(127, 96, 0, 10)], "{name}");
            assert!(m.metadata.authoritative);
        }
        // AAAA for an IPv4 Service: no data, not an error.
        let m = ask(&r, "web.default.svc.cluster.local.", RecordType::AAAA);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn denied_and_unknown_are_nxdomain() {
        let r = Resolver::new("cluster.local", false);
        for name in [
            "pg.db.svc.cluster.local.",
            "nope.default.svc.cluster.local.",
            "dns.default.svc.",
            "x.cluster.local.",
        ] {
            let m = ask(&r, name, RecordType::A);
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
            assert!(m.answers.is_empty());
        }
    }

    #[test]
    fn srv_for_named_ports() {
        let r = Resolver::new("cluster.local", false);
        let m = ask(&r, "_http._tcp.web.default.svc.cluster.local.", RecordType::SRV);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        match &m.answers[0].data {
            RData::SRV(s) => {
                assert_eq!(s.port, 80);
                assert_eq!(s.target.to_ascii(), "web.default.svc.cluster.local.");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(m.additionals.len(), 1);
        let m = ask(&r, "_http._udp.web.default.svc.cluster.local.", RecordType::SRV);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn external_names_refused_or_forwarded() {
        let r = Resolver::new("cluster.local", false);
        assert_eq!(
            ask(&r, "example.com.", RecordType::A).metadata.response_code,
            ResponseCode::Refused
        );
        let (acl, c, me) = setup();
        let fwd = Resolver::new("cluster.local", true);
        assert_eq!(
            fwd.answer(&query("example.com.", RecordType::A), me, &acl, &c),
            Some(DnsAnswer::Forward)
        );
        // Cluster names are never forwarded.
        assert!(matches!(
            fwd.answer(&query("pg.db.svc.cluster.local.", RecordType::A), me, &acl, &c),
            Some(DnsAnswer::Reply(_))
        ));
    }

    #[test]
    fn garbage_is_dropped_without_panic() {
        let r = Resolver::new("cluster.local", false);
        let (acl, c, me) = setup();
        assert_eq!(r.answer(&[], me, &acl, &c), None);
        let q = query("web.default.svc.cluster.local.", RecordType::A);
        for cut in 0..q.len() {
            let _ = r.answer(&q[..cut], me, &acl, &c);
        }
        let mut x = q.clone();
        for i in 0..x.len() {
            x[i] ^= 0xff;
            let _ = r.answer(&x, me, &acl, &c);
        }
    }

    #[test]
    fn aaaa_for_ipv6_cluster_ips_and_no_data_for_the_missing_family() {
        use crate::catalog::tests::dual_catalog;
        let p = peer(
            [100, 64, 0, 2],
            vec![Rule {
                namespace: "default".into(),
                service: None,
                ports: None,
            }],
        );
        let c = dual_catalog();
        let acl = Acl::compile(Ipv4Addr::new(100, 64, 0, 1), std::slice::from_ref(&p), &c);
        let r = Resolver::new("cluster.local", false);
        let ask = |name: &str, t: RecordType| match r.answer(&query(name, t), p.address, &acl, &c).unwrap() {
            DnsAnswer::Reply(b) => Message::from_vec(&b).unwrap(),
            DnsAnswer::Forward => panic!("forwarded {name}"),
        };
        let aaaa_of = |m: &Message| -> Vec<std::net::Ipv6Addr> {
            m.answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::AAAA(a) => Some(a.0),
                    _ => None,
                })
                .collect()
        };
        let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap();
        // Dual-stack: each family answers its own.
        let m = ask("web.default.svc.cluster.local.", RecordType::AAAA);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(aaaa_of(&m), [v6("fd00:96::a")]);
        assert!(a_of(&m).is_empty());
        let m = ask("web.default.", RecordType::A);
        assert_eq!(a_of(&m), [Ipv4Addr::new(127, 96, 0, 10)]);
        assert!(aaaa_of(&m).is_empty());
        // IPv4-only asked for AAAA, IPv6-only asked for A: no data, not an error.
        for (name, t) in [
            ("dns.default.svc.cluster.local.", RecordType::AAAA),
            ("six.default.svc.cluster.local.", RecordType::A),
        ] {
            let m = ask(name, t);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name} {t}");
            assert!(m.answers.is_empty(), "{name} {t}");
        }
        assert_eq!(aaaa_of(&ask("six.default.svc.", RecordType::AAAA)), [v6("fd00:96::6")]);
        // What the peer may not reach is NXDOMAIN for AAAA as for A.
        for t in [RecordType::A, RecordType::AAAA] {
            let m = ask("pg.db.svc.cluster.local.", t);
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{t}");
            assert!(m.answers.is_empty());
        }
        // SRV names the target with both families' addresses.
        let m = ask("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV);
        assert_eq!(m.additionals.len(), 2);
        assert!(
            m.additionals
                .iter()
                .any(|r| matches!(&r.data, RData::AAAA(a) if a.0 == v6("fd00:96::a")))
        );
    }
}

//! The gateway's DNS responder (`dns::Resolver::answer`, `dns::error_reply`) on any bytes
//! a peer sends to port 53 of the gateway's tunnel address. Input: the DNS message.
//!
//! Besides "never panics", every reply must be a DNS message answering the query's ID,
//! and must not reveal a Service the asking peer may not reach: peer B has no rules, so
//! it never gets an address or SRV record; peer A only gets `default/web`'s, which is
//! dual-stack: its A record and its AAAA record (IPv6 ClusterIP), never another's. AAAA
//! queries are among the seeds.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RData;
use kuberaya_gateway::acl::Acl;
use kuberaya_gateway::catalog::{Catalog, Protocol, Service, ServicePort};
use kuberaya_gateway::dns::{self, DnsAnswer, Resolver};
use kuberaya_gateway::keys::PublicKey;
use kuberaya_gateway::peers::{AcceptedPeer, PeerId, Rule};
use libfuzzer_sys::fuzz_target;

const PEER_A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const PEER_B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 3);
const WEB: Ipv4Addr = Ipv4Addr::new(127, 96, 0, 10);
const WEB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0xa);

/// A Service with ClusterIPs `ips` (the first is the primary).
fn service(ns: &str, name: &str, ips: &[&str], ports: &[(Option<&str>, u16, Protocol)]) -> Service {
    let ips: Vec<IpAddr> = ips.iter().map(|ip| ip.parse().unwrap()).collect();
    Service {
        namespace: ns.into(),
        name: name.into(),
        cluster_ip: ips.first().copied(),
        cluster_ips: ips,
        ports: ports
            .iter()
            .map(|&(name, port, protocol)| ServicePort {
                name: name.map(Into::into),
                port,
                protocol,
            })
            .collect(),
    }
}

fn peer(address: Ipv4Addr, rules: Vec<Rule>) -> AcceptedPeer {
    AcceptedPeer {
        id: PeerId::new("default", address.to_string()),
        public_key: PublicKey([address.octets()[3]; 32]),
        address,
        address_v6: None,
        rules,
        preshared_key: None,
        expires_at: None,
    }
}

static POLICY: LazyLock<(Acl, Catalog)> = LazyLock::new(|| {
    let catalog = Catalog::new([
        service(
            "default",
            "web",
            &["127.96.0.10", "fd00:96::a"],
            &[
                (Some("http"), 80, Protocol::Tcp),
                (Some("metrics"), 9090, Protocol::Tcp),
            ],
        ),
        service("default", "dns", &["127.96.0.53"], &[(Some("dns"), 53, Protocol::Udp)]),
        service(
            "db",
            "pg",
            &["127.96.1.5", "fd00:96::1:5"],
            &[(Some("pg"), 5432, Protocol::Tcp)],
        ),
        service("v6", "api", &["fd00::10"], &[(Some("https"), 443, Protocol::Tcp)]),
    ]);
    let a = peer(
        PEER_A,
        vec![Rule {
            namespace: "default".into(),
            service: Some("web".into()),
            ports: None,
        }],
    );
    let acl = Acl::compile(Ipv4Addr::new(100, 64, 0, 1), &[a, peer(PEER_B, vec![])], &catalog);
    (acl, catalog)
});

static RESOLVERS: LazyLock<[Resolver; 3]> = LazyLock::new(|| {
    [
        Resolver::new("cluster.local", false),
        Resolver::new("cluster.local.", true),
        // A one-label domain: `svc.ns` and `svc.ns.<domain>` overlap more.
        Resolver::new("svc", false),
    ]
});

fuzz_target!(|data: &[u8]| {
    let (acl, catalog) = &*POLICY;
    let query = Message::from_vec(data).ok();
    for resolver in RESOLVERS.iter() {
        for peer in [PEER_A, PEER_B] {
            let Some(answer) = resolver.answer(data, peer, acl, catalog) else {
                assert!(
                    query
                        .as_ref()
                        .is_none_or(|q| q.metadata.message_type != MessageType::Query),
                    "a query was dropped"
                );
                continue;
            };
            let DnsAnswer::Reply(bytes) = answer else { continue };
            let q = query.as_ref().expect("a reply to bytes that are not a DNS message");
            let reply = Message::from_vec(&bytes).expect("our reply parses");
            assert_eq!(reply.metadata.id, q.metadata.id);
            assert_eq!(reply.metadata.message_type, MessageType::Response);
            for r in reply.answers.iter().chain(&reply.additionals) {
                match &r.data {
                    RData::A(a) => assert!(peer == PEER_A && a.0 == WEB, "{peer} was told {a:?}"),
                    RData::AAAA(a) => assert!(peer == PEER_A && a.0 == WEB6, "{peer} was told {a:?}"),
                    RData::SRV(s) => assert!(peer == PEER_A && [80, 9090].contains(&s.port), "{peer}: {s:?}"),
                    other => panic!("unexpected record {other:?}"),
                }
            }
            if reply.metadata.response_code != ResponseCode::NoError {
                assert!(reply.answers.is_empty());
            }
        }
    }
    if let Some(bytes) = dns::error_reply(data, ResponseCode::ServFail) {
        let reply = Message::from_vec(&bytes).expect("the error reply parses");
        assert_eq!(Some(reply.metadata.id), query.as_ref().map(|q| q.metadata.id));
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    }
});

//! "May this peer reach this Service port now, and why?" (`kuberaya access explain`): the
//! gateway's own validation, policy resolution and ACL compilation over the given objects,
//! then the lookup a packet gets. Above [`crate::policy`] and [`crate::acl`], which it
//! composes.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use k8s_openapi::jiff::Timestamp;

use crate::acl::{Acl, DenyReason, Explanation};
use crate::catalog::{Catalog, Service};
use crate::crd::PortRef;
use crate::peers::{PeerId, PeerInput, TunnelConfig, Validation, validate};
use crate::policy::{Labels, PolicyInput, effective};

/// What the gateway would serve, given these objects: its validation of the peers, the
/// Service catalog and the ACL compiled from every accepted peer's effective rules.
pub struct Compiled {
    pub validation: Validation,
    pub catalog: Catalog,
    pub acl: Acl,
}

/// The gateway's own validation, policy resolution and ACL compilation over these objects
/// (for `kuberaya access explain` and the reach that `kuberaya` shows).
pub fn compile(
    inputs: &[PeerInput],
    policies: &[PolicyInput],
    services: &[Service],
    namespaces: &HashMap<String, Labels>,
    tunnel: &TunnelConfig,
    now: Timestamp,
) -> Compiled {
    let validation = validate(inputs, &Validation::default(), tunnel, now);
    let eff = effective(
        inputs,
        &validation,
        policies,
        namespaces,
        &tunnel.gateway_namespace,
        now,
    );
    let catalog = Catalog::new(services.iter().cloned());
    let acl = Acl::compile_effective(
        tunnel.gateway_address(),
        validation
            .accepted
            .iter()
            .map(|p| p.address)
            .zip(eff.rules.iter().map(|r| &r[..])),
        &catalog,
    );
    Compiled {
        validation,
        catalog,
        acl,
    }
}

/// Whether the peer `peer` may reach `namespace/service:port` now, and why: the gateway's
/// own validation, policy resolution and ACL compilation over these objects, then the
/// lookup a packet gets. For `kuberaya access explain`.
#[allow(clippy::too_many_arguments)]
pub fn explain(
    inputs: &[PeerInput],
    policies: &[PolicyInput],
    services: &[Service],
    namespaces: &HashMap<String, Labels>,
    tunnel: &TunnelConfig,
    now: Timestamp,
    peer: &PeerId,
    namespace: &str,
    service: &str,
    port: &PortRef,
) -> Explanation {
    let Compiled {
        validation,
        catalog,
        acl,
    } = compile(inputs, policies, services, namespaces, tunnel, now);
    let Some(accepted) = validation.accepted(peer) else {
        let why = match validation.rejection(peer) {
            Some(r) => r.to_string(),
            None => "no such VpnPeer".to_string(),
        };
        return Explanation::Denied(DenyReason::PeerNotServed(why));
    };
    let address: Ipv4Addr = accepted.address;
    acl.explain(&catalog, address, namespace, service, port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::{allow, matching, now, peer, policy, services, tunnel};
    use crate::policy::{PolicyId, RuleSource};

    #[test]
    fn explain_names_the_rule_or_says_why_not() {
        let peers = vec![
            peer("team-a", "alice", &[("role", "dba")], vec![allow(None, Some("web"))]),
            {
                let mut p = peer("team-a", "off", &[], vec![]);
                p.spec.disabled = true;
                p
            },
        ];
        let mut pg = policy(
            "team-a",
            "db",
            matching(&[("role", "dba")]),
            vec![allow(None, Some("pg"))],
        );
        pg.spec.allow[0].ports = Some(vec![PortRef::Name("pg".into())]);
        let policies = vec![pg];
        let ex = |peer: (&str, &str), ns: &str, svc: &str, port: PortRef| {
            explain(
                &peers,
                &policies,
                &services(),
                &HashMap::new(),
                &tunnel(),
                now(),
                &PeerId::new(peer.0, peer.1),
                ns,
                svc,
                &port,
            )
        };
        let alice = ("team-a", "alice");
        let cases = [
            (
                ex(alice, "team-a", "web", PortRef::Number(80)),
                Explanation::Allowed { by: RuleSource::Own(0) },
            ),
            (
                ex(alice, "team-a", "pg", PortRef::Number(5432)),
                Explanation::Allowed {
                    by: RuleSource::Policy(PolicyId::new("team-a", "db")),
                },
            ),
            (
                ex(alice, "team-a", "pg", PortRef::Name("pg".into())),
                Explanation::Allowed {
                    by: RuleSource::Policy(PolicyId::new("team-a", "db")),
                },
            ),
            (
                ex(alice, "team-a", "pg", PortRef::Number(9187)),
                Explanation::Denied(DenyReason::NoRule),
            ),
            (
                ex(alice, "team-b", "pg", PortRef::Number(5432)),
                Explanation::Denied(DenyReason::NoRule),
            ),
            (
                ex(alice, "team-a", "nope", PortRef::Number(80)),
                Explanation::Denied(DenyReason::NoSuchService),
            ),
            (
                ex(alice, "team-a", "web", PortRef::Number(81)),
                Explanation::Denied(DenyReason::NoSuchPort),
            ),
            (
                ex(("team-a", "off"), "team-a", "web", PortRef::Number(80)),
                Explanation::Denied(DenyReason::PeerNotServed("disabled".into())),
            ),
            (
                ex(("team-a", "ghost"), "team-a", "web", PortRef::Number(80)),
                Explanation::Denied(DenyReason::PeerNotServed("no such VpnPeer".into())),
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
        assert_eq!(
            ex(alice, "team-a", "pg", PortRef::Number(5432)).to_string(),
            "allowed by policy team-a/db"
        );
        assert_eq!(
            ex(alice, "team-a", "web", PortRef::Number(80)).to_string(),
            "allowed by own rule 0"
        );
        assert_eq!(
            ex(alice, "team-a", "pg", PortRef::Number(9187)).to_string(),
            "denied: no rule"
        );
    }
}

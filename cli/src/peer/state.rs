//! What the gateway last said about a peer (pure): accepted, rejected or pending, and
//! the state `peer list` shows.

use std::net::{Ipv4Addr, Ipv6Addr};

use k8s_openapi::jiff::Timestamp;
use kuberaya_gateway::crd::{CONDITION_ACCEPTED, VpnPeer};

/// What the gateway last said about a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acceptance {
    Accepted {
        address: Option<Ipv4Addr>,
    },
    Rejected {
        reason: String,
        message: String,
    },
    /// No answer for the current generation yet.
    Pending,
}

pub fn acceptance(p: &VpnPeer) -> Acceptance {
    let Some(status) = &p.status else {
        return Acceptance::Pending;
    };
    if let (Some(seen), Some(generation)) = (status.observed_generation, p.metadata.generation)
        && seen < generation
    {
        return Acceptance::Pending;
    }
    match status.conditions.iter().find(|c| c.type_ == CONDITION_ACCEPTED) {
        Some(c) if c.status == "True" => Acceptance::Accepted {
            address: status
                .address
                .as_deref()
                .and_then(|a| a.split('/').next()?.parse().ok()),
        },
        Some(c) if c.status == "False" => Acceptance::Rejected {
            reason: c.reason.clone(),
            message: c.message.clone(),
        },
        _ => Acceptance::Pending,
    }
}

/// The IPv6 tunnel address the gateway gave the peer (`status.addressV6`), if any.
pub fn address_v6(p: &VpnPeer) -> Option<Ipv6Addr> {
    p.status
        .as_ref()?
        .address_v6
        .as_deref()
        .and_then(|a| a.split('/').next()?.parse().ok())
}

/// `Disabled`, `Expired`, `Accepted`, `Rejected` or `Pending`, with the rejection reason.
pub fn state(p: &VpnPeer, now: Timestamp) -> (&'static str, Option<String>) {
    if p.spec.disabled {
        return ("Disabled", None);
    }
    if p.spec.expires_at.as_ref().is_some_and(|t| t.0 <= now) {
        return ("Expired", None);
    }
    match acceptance(p) {
        Acceptance::Accepted { .. } => ("Accepted", None),
        Acceptance::Rejected { reason, .. } => ("Rejected", Some(reason)),
        Acceptance::Pending => ("Pending", None),
    }
}

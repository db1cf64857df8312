//! The peer's wg-quick config: where it goes, what it routes, and the preshared-key
//! Secret it shares with the gateway.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::anyhow;
use ipnet::IpNet;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kuberaya_gateway::crd::VpnPeer;
use kuberaya_gateway::keys::PresharedKey;
use kuberaya_gateway::source::kube::{PRESHARED_KEY_KEY, psk_from_secret};

use super::ConfigArgs;
use crate::gateway::GatewayInfo;
use crate::kube::{Kube, api_error};
use crate::wgquick::{self, PeerKey, WgConfig};

pub(super) fn out_path(config: &ConfigArgs, name: &str) -> Option<PathBuf> {
    match &config.out {
        Some(p) if p.as_os_str() == "-" => None,
        Some(p) => Some(p.clone()),
        None => Some(PathBuf::from(format!("{name}.conf"))),
    }
}

/// What the peer routes through the tunnel: the service ranges of IPv4 and the gateway's
/// tunnel address (for DNS) unless a range holds it; with an IPv6 tunnel address, the IPv6
/// service ranges and the gateway's IPv6 tunnel address likewise. A peer without an IPv6
/// tunnel address routes no IPv6: it could not send from any.
pub(super) fn allowed_ips(cidrs: &[IpNet], gw: &GatewayInfo, peer_v6: bool) -> Vec<IpNet> {
    let mut out = Vec::new();
    let mut family = |v6: bool, gateway: Option<IpNet>| {
        let ranges: Vec<IpNet> = cidrs
            .iter()
            .filter(|c| matches!(c, IpNet::V6(_)) == v6)
            .copied()
            .collect();
        out.extend(&ranges);
        if let Some(g) = gateway
            && !ranges.iter().any(|r| r.contains(&g))
        {
            out.push(g);
        }
    };
    family(false, Some(IpNet::from(ipnet::Ipv4Net::from(gw.tunnel_address))));
    if peer_v6 {
        family(true, gw.tunnel_v6.map(|(a, _)| IpNet::from(ipnet::Ipv6Net::from(a))));
    }
    out
}

/// The peer's tunnel addresses, as the gateway gave them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PeerAddresses {
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
}

/// The wg-quick config of peer `ns/name` at `addresses` behind the gateway `gw`, through
/// `endpoint`, routing the service ranges `cidrs` (and the gateway's tunnel addresses)
/// through the tunnel.
#[allow(clippy::too_many_arguments)]
pub(super) fn peer_config(
    ns: &str,
    name: &str,
    gw: &GatewayInfo,
    endpoint: String,
    cidrs: &[IpNet],
    key: PeerKey,
    addresses: PeerAddresses,
    psk: Option<PresharedKey>,
) -> WgConfig {
    WgConfig {
        title: format!("kuberaya peer {ns}/{name} (gateway {endpoint})"),
        key,
        address: addresses.v4,
        address_v6: addresses.v6,
        dns_server: gw.tunnel_address,
        dns_server_v6: addresses.v6.and(gw.tunnel_v6.map(|(a, _)| a)),
        search: wgquick::search_domains(ns, &gw.cluster_domain),
        gateway_public_key: gw.public_key,
        preshared_key: psk,
        endpoint,
        allowed_ips: allowed_ips(cidrs, gw, addresses.v6.is_some()),
        persistent_keepalive: wgquick::DEFAULT_KEEPALIVE,
    }
}

/// The endpoint the config names: `--endpoint`, else the gateway's of `--endpoint-family`
/// (IPv4 by default).
pub(super) fn endpoint(config: &ConfigArgs, gw: &GatewayInfo) -> anyhow::Result<String> {
    match &config.endpoint {
        Some(e) => Ok(e.clone()),
        None => gw.endpoint_for(config.endpoint_family).map_err(|e| anyhow!(e)),
    }
}

/// The addresses the config uses: the IPv6 one only when the cluster has IPv6 Services
/// to reach (an IPv6 range in `--service-cidr` or the kuberaya-config ConfigMap). The
/// gateway gives every peer an IPv6 tunnel address; on an IPv4-only cluster the config
/// stays the IPv4-only one it always was.
pub(super) fn config_addresses(cidrs: &[IpNet], addresses: PeerAddresses) -> PeerAddresses {
    let ipv6_cluster = cidrs.iter().any(|c| matches!(c, IpNet::V6(_)));
    PeerAddresses {
        v6: addresses.v6.filter(|_| ipv6_cluster),
        ..addresses
    }
}

/// Writes the config to `out` (or prints it), then says `what` happened: on stdout when
/// the config went to a file, else on stderr, so that a printed config stays usable.
pub(super) fn deliver_and_report(
    config: &WgConfig,
    out: Option<&Path>,
    qr: bool,
    replace: bool,
    what: &str,
) -> anyhow::Result<()> {
    deliver(config, out, qr, replace)?;
    let own_key = if config.key.on_device() {
        "; it has no PrivateKey: add the one your device made for this public key (it never left the device)"
    } else {
        ""
    };
    match out {
        Some(p) => println!("{what}; config written to {} (mode 0600){own_key}", p.display()),
        None => eprintln!("{what}{own_key}"),
    }
    Ok(())
}

/// Write the config (or print it when `out` is `None`) and the QR code.
pub(super) fn deliver(config: &WgConfig, out: Option<&Path>, qr: bool, replace: bool) -> anyhow::Result<()> {
    let text = wgquick::render(config);
    match out {
        Some(p) if replace => wgquick::replace(p, &text)?,
        Some(p) => wgquick::write_new(p, &text)?,
        None => print!("{text}"),
    }
    if qr {
        print!("{}", wgquick::qr(&text)?);
    }
    Ok(())
}

pub(super) fn psk_secret(ns: &str, name: &str, psk: &PresharedKey) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some(name.to_string());
    s.metadata.namespace = Some(ns.to_string());
    s.metadata.labels = Some([("app.kubernetes.io/managed-by".to_string(), "kuberaya".to_string())].into());
    s.type_ = Some("Opaque".into());
    s.data = Some(BTreeMap::from([(
        PRESHARED_KEY_KEY.to_string(),
        ByteString(psk.to_base64().into_bytes()),
    )]));
    s
}

pub(super) async fn read_psk(k: &Kube, ns: &str, peer: &VpnPeer) -> anyhow::Result<Option<PresharedKey>> {
    let Some(r) = &peer.spec.preshared_key_secret_ref else {
        return Ok(None);
    };
    let secrets: Api<Secret> = Api::namespaced(k.client.clone(), ns);
    let s = secrets
        .get(&r.name)
        .await
        .map_err(|e| api_error(e, &format!("reading Secret {ns}/{}", r.name)))?;
    psk_from_secret(&s, r.key.as_deref().unwrap_or(PRESHARED_KEY_KEY))
        .map(Some)
        .map_err(|e| anyhow!(e))
}

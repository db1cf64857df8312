//! The peer's wg-quick config: where it goes, what it routes, and the preshared-key
//! Secret it shares with the gateway.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
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

pub(super) fn allowed_ips(cidr: IpNet, gw: &GatewayInfo) -> Vec<IpNet> {
    let gw32 = IpNet::from(ipnet::Ipv4Net::new(gw.tunnel_address, 32).expect("/32 is valid"));
    if cidr.contains(&gw32) {
        vec![cidr]
    } else {
        vec![cidr, gw32]
    }
}

/// The wg-quick config of peer `ns/name` at `address` behind the gateway `gw`, routing
/// the Service CIDR `cidr` (and the gateway's tunnel address) through the tunnel.
pub(super) fn peer_config(
    ns: &str,
    name: &str,
    gw: &GatewayInfo,
    cidr: IpNet,
    key: PeerKey,
    address: Ipv4Addr,
    psk: Option<PresharedKey>,
) -> WgConfig {
    WgConfig {
        title: format!("kuberaya peer {ns}/{name} (gateway {})", gw.endpoint),
        key,
        address,
        dns_server: gw.tunnel_address,
        search: wgquick::search_domains(ns, &gw.cluster_domain),
        gateway_public_key: gw.public_key,
        preshared_key: psk,
        endpoint: gw.endpoint.clone(),
        allowed_ips: allowed_ips(cidr, gw),
        persistent_keepalive: wgquick::DEFAULT_KEEPALIVE,
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

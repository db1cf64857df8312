//! The peer's wg-quick config: where it goes, what it routes, and the preshared-key
//! Secret it shares with the gateway.

use std::collections::BTreeMap;
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
use crate::wgquick::{self, WgConfig};

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

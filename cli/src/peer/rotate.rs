//! `kuberaya peer rotate`: a new key pair for a peer, and a new config.

use anyhow::anyhow;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kuberaya_gateway::crd::VpnPeer;
use kuberaya_gateway::keys::PrivateKey;

use super::config::{allowed_ips, deliver, out_path, read_psk};
use super::wait::wait_accepted;
use super::{RotateArgs, get_peer, peer_namespace};
use crate::gateway;
use crate::kube::{KubeArgs, api_error, connect};
use crate::wgquick::{self, WgConfig};

pub(super) async fn rotate(kube_args: &KubeArgs, a: RotateArgs) -> anyhow::Result<()> {
    let ns = peer_namespace(kube_args, &a.gateway);
    let out = out_path(&a.config, &a.name);
    if let Some(p) = &out
        && !p.exists()
    {
        wgquick::check_creatable(p).map_err(|e| anyhow!(e))?;
    }
    let k = connect(kube_args).await?;
    let peer = get_peer(&k, &ns, &a.name).await?;
    let gw = gateway::discover(&k.client, &a.gateway).await?;
    let cidr = gateway::discover_service_cidr(&k.client, &a.gateway, a.config.service_cidr).await?;
    let psk = read_psk(&k, &ns, &peer).await?;
    let key = PrivateKey::generate();
    let new_public = key.public_key().to_base64();
    println!(
        "~ vpnpeer {ns}/{}: spec.publicKey {} -> {new_public}",
        a.name, peer.spec.public_key
    );
    let api: Api<VpnPeer> = Api::namespaced(k.client.clone(), &ns);
    let patch = serde_json::json!({"spec": {"publicKey": new_public}});
    let updated = api
        .patch(&a.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| api_error(e, &format!("updating peer {ns}/{}", a.name)))?;
    let address = wait_accepted(&api, &a.name, updated.metadata.generation, a.config.timeout).await?;
    let config = WgConfig {
        title: format!("kuberaya peer {ns}/{} (gateway {})", a.name, gw.endpoint),
        private_key: key,
        address,
        dns_server: gw.tunnel_address,
        search: wgquick::search_domains(&ns, &gw.cluster_domain),
        gateway_public_key: gw.public_key,
        preshared_key: psk,
        endpoint: gw.endpoint.clone(),
        allowed_ips: allowed_ips(cidr, &gw),
        persistent_keepalive: wgquick::DEFAULT_KEEPALIVE,
    };
    deliver(&config, out.as_deref(), a.config.qr, true)?;
    let msg = format!(
        "peer {ns}/{} has a new key; the old one no longer works{}",
        a.name,
        out.as_ref()
            .map(|p| format!("; config written to {} (mode 0600)", p.display()))
            .unwrap_or_default()
    );
    if out.is_some() {
        println!("{msg}");
    } else {
        eprintln!("{msg}");
    }
    Ok(())
}

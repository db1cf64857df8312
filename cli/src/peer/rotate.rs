//! `kuberaya peer rotate`: a new key pair for a peer (or the public key of one made on the
//! user's device), and a new config.

use anyhow::{anyhow, bail};
use kube::Api;
use kube::api::{Patch, PatchParams};
use kuberaya_gateway::crd::VpnPeer;

use super::config::{config_addresses, deliver_and_report, endpoint, out_path, peer_config, read_psk};
use super::wait::wait_accepted;
use super::{RotateArgs, get_peer, peer_namespace};
use crate::gateway;
use crate::kube::{KubeArgs, api_error, connect};
use crate::wgquick::{self, PeerKey};

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
    let endpoint = endpoint(&a.config, &gw)?;
    let cidrs = gateway::discover_service_cidr(&k.client, &a.gateway, &a.config.service_cidr).await?;
    let psk = read_psk(&k, &ns, &peer).await?;
    let key = PeerKey::made_here_or(a.key.public_key);
    let new_public = key.public_key().to_base64();
    if new_public == peer.spec.public_key {
        bail!(
            "peer {ns}/{} already has the key {new_public}; rotating needs a new one",
            a.name
        );
    }
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
    let addresses = wait_accepted(&api, &a.name, updated.metadata.generation, a.config.timeout).await?;
    let addresses = config_addresses(&cidrs, addresses);
    let config = peer_config(&ns, &a.name, &gw, endpoint, &cidrs, key, addresses, psk);
    let what = format!("peer {ns}/{} has a new key; the old one no longer works", a.name);
    deliver_and_report(&config, out.as_deref(), a.config.qr, true, &what)?;
    Ok(())
}

//! `kuberaya peer psk rotate`: a new preshared key in the Secret and in the config file.

use anyhow::anyhow;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kuberaya_gateway::crd::VpnPeer;
use kuberaya_gateway::keys::PresharedKey;
use kuberaya_gateway::source::kube::PRESHARED_KEY_KEY;

use super::config::psk_secret;
use super::wait::wait_accepted;
use super::{PskRotateArgs, get_peer, peer_namespace, psk_secret_name};
use crate::kube::{KubeArgs, api_error, connect};
use crate::wgquick;

pub(super) async fn psk_rotate(kube_args: &KubeArgs, a: PskRotateArgs) -> anyhow::Result<()> {
    let ns = peer_namespace(kube_args, &a.gateway);
    let text = std::fs::read_to_string(&a.config).map_err(|e| {
        anyhow!(
            "cannot read {}: {e}; pass the peer's config file to --config",
            a.config.display()
        )
    })?;
    let psk = PresharedKey(rand::random::<[u8; 32]>());
    let new_text = wgquick::set_preshared_key(&text, &psk).map_err(|e| anyhow!("{}: {e}", a.config.display()))?;
    let k = connect(kube_args).await?;
    let peer = get_peer(&k, &ns, &a.name).await?;
    let secrets: Api<Secret> = Api::namespaced(k.client.clone(), &ns);
    let api: Api<VpnPeer> = Api::namespaced(k.client.clone(), &ns);
    let mut generation = peer.metadata.generation;
    match &peer.spec.preshared_key_secret_ref {
        Some(r) => {
            let key = r.key.clone().unwrap_or_else(|| PRESHARED_KEY_KEY.into());
            println!("~ secret {ns}/{}: {key} replaced", r.name);
            let patch = serde_json::json!({"data": {key: ByteString(psk.to_base64().into_bytes())}});
            secrets
                .patch(&r.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| api_error(e, &format!("updating Secret {ns}/{}", r.name)))?;
        }
        None => {
            let name = psk_secret_name(&a.name);
            println!("+ secret {ns}/{name}");
            println!("~ vpnpeer {ns}/{}: spec.presharedKeySecretRef -> {name}", a.name);
            secrets
                .create(&PostParams::default(), &psk_secret(&ns, &name, &psk))
                .await
                .map_err(|e| api_error(e, &format!("creating Secret {ns}/{name}")))?;
            let patch =
                serde_json::json!({"spec": {"presharedKeySecretRef": {"name": name, "key": PRESHARED_KEY_KEY}}});
            let updated = api
                .patch(&a.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| api_error(e, &format!("updating peer {ns}/{}", a.name)))?;
            generation = updated.metadata.generation;
        }
    }
    wait_accepted(&api, &a.name, generation, a.timeout).await?;
    wgquick::replace(&a.config, &new_text)?;
    println!(
        "peer {ns}/{} has a new preshared key; {} updated",
        a.name,
        a.config.display()
    );
    Ok(())
}

//! `kuberaya peer remove`, `disable` and `enable`.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use kuberaya_gateway::crd::VpnPeer;

use super::{NameArgs, get_peer, peer_namespace, psk_secret_name};
use crate::kube::{KubeArgs, api_error, connect, is_not_found};

pub(super) async fn remove(kube_args: &KubeArgs, a: NameArgs) -> anyhow::Result<()> {
    let ns = peer_namespace(kube_args, &a.gateway);
    let k = connect(kube_args).await?;
    let peer = get_peer(&k, &ns, &a.name).await?;
    let owned_secret = peer
        .spec
        .preshared_key_secret_ref
        .as_ref()
        .map(|r| r.name.clone())
        .filter(|n| *n == psk_secret_name(&a.name));
    println!("- vpnpeer {ns}/{} (public key {})", a.name, peer.spec.public_key);
    if let Some(s) = &owned_secret {
        println!("- secret {ns}/{s}");
    }
    let api: Api<VpnPeer> = Api::namespaced(k.client.clone(), &ns);
    api.delete(&a.name, &DeleteParams::default())
        .await
        .map_err(|e| api_error(e, &format!("deleting peer {ns}/{}", a.name)))?;
    if let Some(s) = owned_secret {
        let secrets: Api<Secret> = Api::namespaced(k.client.clone(), &ns);
        match secrets.delete(&s, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api_error(e, &format!("deleting Secret {ns}/{s}"))),
        }
    }
    println!("peer {ns}/{} removed; its key no longer works", a.name);
    Ok(())
}

pub(super) async fn set_disabled(kube_args: &KubeArgs, a: NameArgs, disabled: bool) -> anyhow::Result<()> {
    let ns = peer_namespace(kube_args, &a.gateway);
    let k = connect(kube_args).await?;
    let peer = get_peer(&k, &ns, &a.name).await?;
    let word = if disabled { "disabled" } else { "enabled" };
    if peer.spec.disabled == disabled {
        println!("peer {ns}/{} is already {word}", a.name);
        return Ok(());
    }
    println!(
        "~ vpnpeer {ns}/{}: spec.disabled {} -> {disabled}",
        a.name, peer.spec.disabled
    );
    let api: Api<VpnPeer> = Api::namespaced(k.client.clone(), &ns);
    let patch = serde_json::json!({"spec": {"disabled": disabled}});
    api.patch(&a.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| api_error(e, &format!("updating peer {ns}/{}", a.name)))?;
    println!("peer {ns}/{} {word}", a.name);
    Ok(())
}

//! `kuberaya peer add`: a key pair made here (or the public key of one made on the user's
//! device), the VpnPeer (and its preshared-key Secret),
//! the wait for the gateway, the wg-quick config.

use anyhow::{anyhow, bail};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Resource};
use kuberaya_gateway::crd::{SecretKeyRef, VpnPeer, VpnPeerSpec};
use kuberaya_gateway::keys::PresharedKey;
use kuberaya_gateway::source::kube::PRESHARED_KEY_KEY;

use super::config::{config_addresses, deliver_and_report, endpoint, out_path, peer_config, psk_secret};
use super::parse::check_rules;
use super::wait::wait_accepted;
use super::{AddArgs, peer_namespace, psk_secret_name};
use crate::gateway;
use crate::kube::{Kube, KubeArgs, api_error, connect};
use crate::wgquick::{self, PeerKey};

async fn ensure_namespace(k: &Kube, ns: &str, what: &str) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(k.client.clone());
    match api.get_opt(ns).await.map_err(|e| api_error(e, "reading namespaces"))? {
        Some(_) => Ok(()),
        None => bail!("namespace {ns:?} ({what}) does not exist; see `kubectl get namespaces`"),
    }
}

pub(super) async fn add(kube_args: &KubeArgs, a: AddArgs) -> anyhow::Result<()> {
    let ns = peer_namespace(kube_args, &a.gateway);
    check_rules(&ns, &a.gateway.gateway_namespace, &a.allow).map_err(|e| anyhow!(e))?;
    let out = out_path(&a.config, &a.name);
    if let Some(p) = &out {
        wgquick::check_creatable(p).map_err(|e| anyhow!(e))?;
    }
    let k = connect(kube_args).await?;
    ensure_namespace(&k, &ns, "the peer's namespace, -n").await?;
    for r in &a.allow {
        if let Some(n) = &r.namespace {
            ensure_namespace(&k, n, "in --allow").await?;
        }
    }
    let gw = gateway::discover(&k.client, &a.gateway).await?;
    let endpoint = endpoint(&a.config, &gw)?;
    let cidrs = gateway::discover_service_cidr(&k.client, &a.gateway, &a.config.service_cidr).await?;
    let peers: Api<VpnPeer> = Api::namespaced(k.client.clone(), &ns);
    if peers
        .get_opt(&a.name)
        .await
        .map_err(|e| api_error(e, "reading VpnPeers"))?
        .is_some()
    {
        bail!(
            "peer {ns}/{} already exists; pick another name, or `kuberaya peer rotate {}` for new keys",
            a.name,
            a.name
        );
    }

    let key = PeerKey::made_here_or(a.key.public_key);
    let psk = a.psk.then(|| PresharedKey(rand::random::<[u8; 32]>()));
    let secrets: Api<Secret> = Api::namespaced(k.client.clone(), &ns);
    let secret_name = psk_secret_name(&a.name);
    if let Some(psk) = &psk {
        secrets
            .create(&PostParams::default(), &psk_secret(&ns, &secret_name, psk))
            .await
            .map_err(|e| api_error(e, &format!("creating Secret {ns}/{secret_name}")))?;
    }
    let spec = VpnPeerSpec {
        public_key: key.public_key().to_base64(),
        address: a.address.map(|x| x.to_string()),
        address_v6: a.address_v6.map(|x| x.to_string()),
        allow: a.allow.clone(),
        expires_at: a.expires.map(|d| {
            Time(Timestamp::now() + SignedDuration::from_secs(i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2)))
        }),
        preshared_key_secret_ref: psk.as_ref().map(|_| SecretKeyRef {
            name: secret_name.clone(),
            key: Some(PRESHARED_KEY_KEY.into()),
        }),
        disabled: false,
    };
    let mut resource = VpnPeer::new(&a.name, spec);
    resource.metadata.namespace = Some(ns.clone());
    let created = match peers.create(&PostParams::default(), &resource).await {
        Ok(p) => p,
        Err(e) => {
            if psk.is_some() {
                let _ = secrets.delete(&secret_name, &DeleteParams::default()).await;
            }
            return Err(api_error(e, &format!("creating VpnPeer {ns}/{}", a.name)));
        }
    };
    if psk.is_some()
        && let Some(owner) = created.controller_owner_ref(&())
    {
        let owner = OwnerReference {
            controller: None,
            ..owner
        };
        let patch = serde_json::json!({"metadata": {"ownerReferences": [owner]}});
        if let Err(e) = secrets
            .patch(&secret_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!("could not make the Secret owned by the peer: {e}");
        }
    }

    let outcome = wait_accepted(&peers, &a.name, created.metadata.generation, a.config.timeout).await;
    let addresses = match outcome {
        Ok(addr) => addr,
        Err(e) => {
            let _ = peers.delete(&a.name, &DeleteParams::default()).await;
            if psk.is_some() {
                let _ = secrets.delete(&secret_name, &DeleteParams::default()).await;
            }
            return Err(e.context("the peer was removed again; nothing was kept"));
        }
    };
    let addresses = config_addresses(&cidrs, addresses);
    let config = peer_config(&ns, &a.name, &gw, endpoint.clone(), &cidrs, key, addresses, psk);
    let address = match addresses.v6 {
        Some(v6) => format!("addresses {}, {v6}", addresses.v4),
        None => format!("address {}", addresses.v4),
    };
    let what = format!("peer {ns}/{} accepted: {address}, endpoint {endpoint}", a.name);
    deliver_and_report(&config, out.as_deref(), a.config.qr, false, &what)?;
    Ok(())
}

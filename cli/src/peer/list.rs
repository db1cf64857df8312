//! `kuberaya peer list` and `kuberaya peer show`: reading peers and what they reach.

use k8s_openapi::api::core::v1::Service as K8sService;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use kuberaya_gateway::crd::VpnPeer;
use kuberaya_gateway::peers::PeerId;
use kuberaya_gateway::source::kube::service_from_k8s;

use super::state::{Acceptance, acceptance};
use super::view::{PeerDetail, PeerList, list_table, row_of, show_text};
use super::{ListArgs, NameArgs, get_peer, peer_namespace};
use crate::kube::{Kube, KubeArgs, Scope, api_error, connect};
use crate::output::{Style, render};
use crate::reach::{Grants, reach_of_all};

pub(super) async fn list(kube_args: &KubeArgs, a: ListArgs) -> anyhow::Result<()> {
    let k = connect(kube_args).await?;
    let scope = Scope::from_args(kube_args, &a.gateway.gateway_namespace);
    let api: Api<VpnPeer> = match &scope {
        Scope::All => Api::all(k.client.clone()),
        Scope::One(ns) => Api::namespaced(k.client.clone(), ns),
    };
    let mut items = api
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "listing VpnPeers"))?
        .items;
    items.sort_by_key(|p| (p.namespace(), p.name_any()));
    let now = Timestamp::now();
    let list = PeerList {
        items: items.iter().map(|p| row_of(p, now)).collect(),
    };
    let style = Style::detect();
    print!(
        "{}",
        render(a.output.output, &list, |wide| list_table(
            &list,
            scope == Scope::All,
            wide,
            now,
            &style
        ))?
    );
    Ok(())
}

pub(super) async fn show(kube_args: &KubeArgs, a: NameArgs) -> anyhow::Result<()> {
    let ns = peer_namespace(kube_args, &a.gateway);
    let k = connect(kube_args).await?;
    let peer = get_peer(&k, &ns, &a.name).await?;
    let all: Api<VpnPeer> = Api::all(k.client.clone());
    let peers = all
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "listing VpnPeers"))?
        .items;
    let services = list_services(&k).await?;
    let now = Timestamp::now();
    let grants = Grants::fetch(&k).await?;
    let reach = reach_of_all(&peers, &services, &grants, &a.gateway.gateway_namespace, now)
        .remove(&PeerId::new(ns.clone(), a.name.clone()))
        .unwrap_or_default();
    let detail = PeerDetail {
        peer: row_of(&peer, now),
        message: match acceptance(&peer) {
            Acceptance::Rejected { message, .. } => Some(message),
            _ => None,
        },
        reach,
    };
    let style = Style::detect();
    print!(
        "{}",
        render(a.output.output, &detail, |wide| show_text(&detail, wide, now, &style))?
    );
    Ok(())
}

/// Every Service, as the gateway sees them.
pub async fn list_services(k: &Kube) -> anyhow::Result<Vec<kuberaya_gateway::catalog::Service>> {
    let api: Api<K8sService> = Api::all(k.client.clone());
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "listing Services"))?;
    Ok(list.items.iter().filter_map(service_from_k8s).collect())
}

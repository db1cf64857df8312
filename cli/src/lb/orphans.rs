//! `kuberaya lb orphans`: load balancers of this cluster whose Service is gone, judged
//! as the CCM's orphan sweep judges them, and their deletion.

use std::io::IsTerminal;

use anyhow::bail;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::ListParams;
use kuberaya_ccm::platform::{Error as PlatformError, LoadBalancer, Platform};
use kuberaya_ccm::service::orphans::judge;
use serde::Serialize;

use super::OrphansArgs;
use super::list::{LbRow, endpoint, row_of};
use super::platform::{cluster_lbs, platform, platform_error};
use crate::kube::{KubeArgs, api_error, connect};
use crate::output::{render, table};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrphanRow {
    #[serde(flatten)]
    pub lb: LbRow,
    pub retain_public_ip: bool,
}

/// What `lb orphans` shows: the orphans the CCM would delete too (the judgement is the
/// CCM library's, [`kuberaya_ccm::service::orphans::judge`]), and apart from them the LBs
/// of this cluster that nobody can judge. `--delete` deletes only the former.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OrphanList {
    pub items: Vec<OrphanRow>,
    /// Labelled with this cluster but with no Service UID: not created by the CCM.
    pub unknown: Vec<LbRow>,
}

pub fn orphans_table(list: &OrphanList, wide: bool) -> String {
    let mut out = if list.items.is_empty() {
        "No orphaned load balancers.\n".to_string()
    } else {
        let mut headers = vec!["lb-id", "public", "was-service", "status", "retain-ip"];
        if wide {
            headers.extend(["lb-name", "service-uid"]);
        }
        let rows: Vec<Vec<String>> = list
            .items
            .iter()
            .map(|o| {
                let r = &o.lb;
                let mut row = vec![
                    r.id.clone(),
                    endpoint(&r.public_ip, &r.ports),
                    match (&r.namespace, &r.service) {
                        (Some(ns), Some(s)) => format!("{ns}/{s}"),
                        _ => "-".into(),
                    },
                    r.status.clone(),
                    if o.retain_public_ip { "yes" } else { "no" }.into(),
                ];
                if wide {
                    row.push(r.name.clone());
                    row.push(r.service_uid.clone().unwrap_or_else(|| "-".into()));
                }
                row
            })
            .collect();
        table(&headers, &rows)
    };
    if !list.unknown.is_empty() {
        out.push_str(&format!(
            "\nUnknown: not created by the CCM ({} with this cluster's label but no Service UID; never deleted by --delete):\n",
            list.unknown.len()
        ));
        let rows: Vec<Vec<String>> = list
            .unknown
            .iter()
            .map(|r| {
                vec![
                    r.id.clone(),
                    endpoint(&r.public_ip, &r.ports),
                    r.name.clone(),
                    r.status.clone(),
                ]
            })
            .collect();
        out.push_str(&table(&["lb-id", "public", "lb-name", "status"], &rows));
    }
    out
}

/// The CCM's judgement of `lbs` against `services`, as rows.
pub fn orphan_list(cluster: &str, lbs: &[LoadBalancer], services: &[Service]) -> OrphanList {
    let judged = judge(cluster, lbs, services);
    let by_id = |id: &str| lbs.iter().find(|lb| lb.id == id).map(row_of);
    OrphanList {
        items: judged
            .orphans
            .iter()
            .filter_map(|o| {
                Some(OrphanRow {
                    lb: by_id(&o.id)?,
                    retain_public_ip: o.keep_public_ip == Some(true),
                })
            })
            .collect(),
        unknown: judged.unknown.iter().filter_map(|u| by_id(&u.id)).collect(),
    }
}

pub(super) async fn orphans(kube_args: &KubeArgs, a: OrphansArgs) -> anyhow::Result<()> {
    let c = platform(&a.platform)?;
    let lbs = cluster_lbs(&c).await?;
    let k = connect(kube_args).await?;
    let api: Api<Service> = Api::all(k.client.clone());
    // Listed after the LBs: an LB of a Service created in between is never an orphan.
    let services = api
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "listing Services"))?
        .items;
    let list = orphan_list(&c.cluster, &lbs, &services);
    print!("{}", render(a.output.output, &list, |wide| orphans_table(&list, wide))?);
    if !a.delete || list.items.is_empty() {
        return Ok(());
    }
    for o in &list.items {
        eprintln!(
            "- load balancer {} ({}){}",
            o.lb.id,
            o.lb.public_ip.as_deref().unwrap_or("no IP"),
            if o.retain_public_ip {
                ", keeping its public IP"
            } else {
                ""
            }
        );
    }
    if !a.yes {
        if !std::io::stdin().is_terminal() {
            bail!(
                "refusing to delete {} load balancers without confirmation; pass --yes",
                list.items.len()
            );
        }
        eprint!("Delete {} load balancers? [y/N] ", list.items.len());
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("nothing deleted");
            return Ok(());
        }
    }
    for o in &list.items {
        let keep = o.retain_public_ip.then_some(true);
        match c.platform.delete_load_balancer(&c.cluster, &o.lb.id, keep).await {
            Ok(()) | Err(PlatformError::NotFound { .. }) => eprintln!("load balancer {} deleted", o.lb.id),
            Err(e) => return Err(platform_error(e, &format!("deleting load balancer {}", o.lb.id))),
        }
    }
    Ok(())
}

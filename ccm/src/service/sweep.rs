//! The orphan sweep: our LBs whose Service is gone are deleted (which ones is
//! [`super::orphans::judge`]'s pure decision), and the LB cache learns every LB of ours.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::Api;
use tracing::{debug, info, warn};

use crate::runner::every;
use crate::service::context::Context;
use crate::service::lookup::cluster_labels;
use crate::service::orphans;
use crate::{Error, Result, platform_err};

/// Deletes our LBs whose Service is gone (see [`orphans::judge`]); returns how many.
/// Also sets the `load_balancers_managed` gauge.
///
/// `list_services` must list every Service of the cluster, freshly from the API server
/// (not a watch cache that may lag): a Service missing from it loses its LB. It is called
/// after our LBs are listed, so every LB considered was created before the Service list
/// was taken, and so was its Service: an LB of a Service created while the sweep runs is
/// never taken for an orphan.
pub async fn sweep_orphans<F, Fut>(ctx: &Context, list_services: F) -> Result<usize>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Vec<Service>>>,
{
    let cluster = &ctx.config.cluster_id;
    let lbs = ctx
        .platform
        .list_load_balancers(cluster, &cluster_labels(cluster))
        .await
        .map_err(platform_err("list_load_balancers"))?;
    ctx.lbs.learn_lbs(cluster, &lbs);
    let services = list_services().await?;
    ctx.metrics
        .lbs_managed
        .set(i64::try_from(lbs.len()).unwrap_or(i64::MAX));
    let live: HashSet<String> = services.iter().filter_map(|s| s.uid()).collect();
    // Forget LBs of Services that are gone: listed before the Services, so a Service
    // missing from the later list is gone (the same reasoning as for orphans).
    let listed: HashSet<&str> = lbs.iter().map(|lb| lb.id.as_str()).collect();
    ctx.lbs
        .lb_ids()
        .retain(|uid, known| live.contains(uid) || !listed.contains(known.id.as_str()));
    let judged = orphans::judge(cluster, &lbs, &services);
    if !judged.unknown.is_empty() {
        debug!(
            count = judged.unknown.len(),
            "orphan sweep: LBs of this cluster without a Service UID, left alone"
        );
    }
    let orphans = judged.orphans;
    let mut deleted = 0;
    for o in orphans {
        info!(lb = %o.id, name = %o.name, service = %o.service, keep_public_ip = ?o.keep_public_ip, "deleting orphaned load balancer");
        match ctx
            .platform
            .delete_load_balancer(cluster, &o.id, o.keep_public_ip)
            .await
        {
            Ok(()) => {
                deleted += 1;
                ctx.metrics.orphans_deleted.inc();
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                warn!(lb = %o.id, error = %e, "could not delete orphaned load balancer");
                continue;
            }
        }
        // Gone either way: no Service's lookup should start from it.
        ctx.lbs.lb_ids().retain(|_, known| known.id != o.id);
    }
    Ok(deleted)
}

/// Sweeps orphans every `period` (see [`sweep_orphans`]), until the task is aborted.
pub async fn run_sweep(ctx: Arc<Context>, period: Duration) {
    let api: Api<Service> = Api::all(ctx.client.clone());
    every(period, || async {
        // A fresh list each time (after the LBs): deciding deletions from a lagging
        // cache could remove the LB of a Service that exists.
        let list_services = || async {
            api.list(&kube::api::ListParams::default())
                .await
                .map(|list| list.items)
                .map_err(Error::Kube)
        };
        match sweep_orphans(&ctx, list_services).await {
            Ok(0) => debug!("orphan sweep: nothing to delete"),
            Ok(n) => info!(deleted = n, "orphan sweep"),
            Err(e) => warn!(error = %e, "orphan sweep failed"),
        }
    })
    .await;
}

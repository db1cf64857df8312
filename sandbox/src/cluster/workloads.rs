//! Workloads: a minimal Deployment controller and a scheduler.
//!
//! The Deployment controller manages Pods directly (no ReplicaSets): each Pod is owned by
//! its Deployment (`ownerReferences`, `controller: true`), carries the template's labels
//! plus `pod-template-hash`, and is named `<deployment>-<hash>-<suffix>`. Scaling creates
//! or deletes pods; a changed template rolls: new pods are created first, and old ones are
//! deleted only as new ones become ready (`maxUnavailable` 0). Pods bound to a Node that
//! no longer exists are deleted (the pod garbage collector's part).
//!
//! The scheduler binds each pending Pod to the Ready node with the fewest pods among those
//! whose `NoSchedule`/`NoExecute` taints it tolerates and whose labels match its
//! `nodeSelector`. The CCM's `uninitialized` taint therefore holds pods back until the CCM
//! (or the `no_ccm` node agents) remove it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, PodTemplateSpec, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use super::{Context, Expectations, Result, control_loop, is_not_found, nodes, now, pods, random_suffix, record};

pub const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";
const SCHEDULER_NAME: &str = "default-scheduler";

/// A short, stable hash of a pod template, in the alphabet of generated names.
pub fn template_hash(template: &PodTemplateSpec) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = serde_json::to_vec(template).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (0..10)
        .map(|_| {
            let c = ALPHABET[(h % ALPHABET.len() as u64) as usize] as char;
            h /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// What the controller knows of one of a Deployment's pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedPod {
    pub name: String,
    pub hash: String,
    pub ready: bool,
    pub scheduled: bool,
}

/// The writes that move a Deployment's pods towards `replicas` pods of template `hash`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub create: usize,
    pub delete: Vec<String>,
}

/// Scale and roll: create missing new pods, delete surplus new ones (unscheduled and
/// not-ready first), and delete old ones as far as ready new pods replace them.
pub fn plan(replicas: usize, hash: &str, pods: &[OwnedPod]) -> Plan {
    let (mut new, mut old): (Vec<&OwnedPod>, Vec<&OwnedPod>) = pods.iter().partition(|p| p.hash == hash);
    let mut out = Plan {
        create: replicas.saturating_sub(new.len()),
        delete: Vec::new(),
    };
    // Least useful first: unscheduled, then not ready, then by name (newest names last is
    // not knowable here; the order only has to be stable).
    let rank = |p: &&OwnedPod| (p.scheduled, p.ready, std::cmp::Reverse(p.name.clone()));
    new.sort_by_key(rank);
    if new.len() > replicas {
        out.delete
            .extend(new.drain(..new.len() - replicas).map(|p| p.name.clone()));
    }
    let new_ready = new.iter().filter(|p| p.ready).count();
    old.sort_by_key(rank);
    // Keep replicas available: old pods go once enough new ones are ready; not-ready old
    // pods never count, so they go at once.
    let old_ready = old.iter().filter(|p| p.ready).count();
    let keep_ready = replicas.saturating_sub(new_ready).min(old_ready);
    let mut kept = 0;
    for p in old {
        if p.ready && kept < keep_ready {
            kept += 1;
        } else {
            out.delete.push(p.name.clone());
        }
    }
    out
}

/// A new pod of `deployment` from its template.
pub fn new_pod(deployment: &Deployment, hash: &str, suffix: &str) -> Pod {
    let name = deployment.metadata.name.clone().unwrap_or_default();
    let spec = deployment.spec.clone().unwrap_or_default();
    let template = spec.template;
    let mut meta = template.metadata.unwrap_or_default();
    let mut labels = meta.labels.take().unwrap_or_default();
    labels.insert(TEMPLATE_HASH_LABEL.into(), hash.into());
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{name}-{hash}-{suffix}")),
            namespace: deployment.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: meta.annotations.take(),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name,
                uid: deployment.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        spec: template.spec,
        status: None,
    }
}

fn controller_uid(pod: &Pod) -> Option<&str> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// The Deployment status fields `kubectl rollout status` reads.
pub fn status(deployment: &Deployment, hash: &str, pods: &[OwnedPod]) -> serde_json::Value {
    let replicas = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0);
    let total = pods.len();
    let updated = pods.iter().filter(|p| p.hash == hash).count();
    let ready = pods.iter().filter(|p| p.ready).count();
    let available = usize::try_from(replicas).is_ok_and(|r| ready >= r);
    let complete = available && updated == total && updated == usize::try_from(replicas).unwrap_or(0);
    let old = deployment.status.clone().unwrap_or_default();
    let since = |t: &str, s: &str| {
        old.conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t && c.status == s)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(now)
    };
    let available_status = if available { "True" } else { "False" };
    let (progress_reason, progress_message) = if complete {
        ("NewReplicaSetAvailable", "Deployment has successfully progressed.")
    } else {
        ("ReplicaSetUpdated", "Deployment is progressing.")
    };
    json!({
        "observedGeneration": deployment.metadata.generation,
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": ready,
        "unavailableReplicas": total.saturating_sub(ready),
        "conditions": [
            {
                "type": "Available", "status": available_status,
                "reason": if available { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
                "message": if available { "Deployment has minimum availability." } else { "Deployment does not have minimum availability." },
                "lastTransitionTime": since("Available", available_status), "lastUpdateTime": since("Available", available_status),
            },
            {
                "type": "Progressing", "status": "True", "reason": progress_reason, "message": progress_message,
                "lastTransitionTime": since("Progressing", "True"), "lastUpdateTime": since("Progressing", "True"),
            },
        ],
    })
}

fn status_differs(deployment: &Deployment, want: &serde_json::Value) -> bool {
    let have = serde_json::to_value(deployment.status.clone().unwrap_or_default()).unwrap_or_default();
    let field = |v: &serde_json::Value, k: &str| v.get(k).and_then(serde_json::Value::as_i64).unwrap_or(0);
    let cond = |v: &serde_json::Value, t: &str| {
        v["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == t))
            .map(|c| (c["status"].clone(), c["reason"].clone()))
    };
    [
        "observedGeneration",
        "replicas",
        "updatedReplicas",
        "readyReplicas",
        "availableReplicas",
        "unavailableReplicas",
    ]
    .iter()
    .any(|k| field(&have, k) != field(want, k))
        || cond(&have, "Available") != cond(want, "Available")
        || cond(&have, "Progressing") != cond(want, "Progressing")
}

pub(crate) async fn run_deployments(ctx: Arc<Context>) {
    let expectations = Arc::new(Expectations::new(Duration::from_secs(5)));
    let c = Arc::clone(&ctx);
    control_loop(ctx, "deployments", move || {
        let (ctx, expectations) = (Arc::clone(&c), Arc::clone(&expectations));
        async move { reconcile_deployments(&ctx, &expectations).await }
    })
    .await;
}

async fn reconcile_deployments(ctx: &Context, expectations: &Expectations) -> Result<()> {
    let pods = ctx.pods.state();
    let mut owned: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
    for pod in &pods {
        if let Some(uid) = controller_uid(pod) {
            owned.entry(uid.to_string()).or_default().push(Arc::clone(pod));
        }
    }
    let names: HashSet<(String, String)> = pods
        .iter()
        .map(|p| {
            (
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    let mut first_error = None;
    for d in ctx.deployments.state() {
        if d.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let ns = d.metadata.namespace.clone().unwrap_or_default();
        let uid = d.metadata.uid.clone().unwrap_or_default();
        if !expectations.satisfied(&uid, |n| names.contains(&(ns.clone(), n.to_string()))) {
            continue;
        }
        let mine = owned.remove(&uid).unwrap_or_default();
        if let Err(e) = sync_deployment(ctx, &d, &mine, expectations).await {
            first_error.get_or_insert(e);
        }
    }
    // Pods of Deployments that are gone (the garbage collector's part), and pods bound to
    // nodes that are gone (the pod garbage collector's part).
    let deployments: HashSet<String> = ctx
        .deployments
        .state()
        .iter()
        .filter_map(|d| d.metadata.uid.clone())
        .collect();
    expectations.retain(|uid| deployments.contains(uid));
    let nodes: HashSet<String> = ctx
        .nodes
        .state()
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    for pod in &pods {
        let orphan = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && o.kind == "Deployment" && !deployments.contains(&o.uid));
        let lost = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_some_and(|n| !nodes.contains(n));
        if (orphan || lost) && pod.metadata.deletion_timestamp.is_none() {
            let api: Api<Pod> = Api::namespaced(
                ctx.client.clone(),
                pod.metadata.namespace.as_deref().unwrap_or_default(),
            );
            let name = pod.metadata.name.clone().unwrap_or_default();
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => tracing::info!(pod = %name, orphan, lost, "pod garbage-collected"),
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    first_error.get_or_insert(e.into());
                }
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn sync_deployment(ctx: &Context, d: &Deployment, mine: &[Arc<Pod>], expectations: &Expectations) -> Result<()> {
    let ns = d.metadata.namespace.clone().unwrap_or_default();
    let name = d.metadata.name.clone().unwrap_or_default();
    let uid = d.metadata.uid.clone().unwrap_or_default();
    let spec = d.spec.clone().unwrap_or_default();
    let replicas = usize::try_from(spec.replicas.unwrap_or(1)).unwrap_or(0);
    let hash = template_hash(&spec.template);
    let live: Vec<OwnedPod> = mine
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| OwnedPod {
            name: p.metadata.name.clone().unwrap_or_default(),
            hash: p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(TEMPLATE_HASH_LABEL))
                .cloned()
                .unwrap_or_default(),
            ready: pods::is_ready(p),
            scheduled: p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some(),
        })
        .collect();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let todo = plan(replicas, &hash, &live);
    let (mut created, mut deleted) = (Vec::new(), Vec::new());
    let mut result: Result<()> = Ok(());
    for _ in 0..todo.create {
        let pod = new_pod(d, &hash, &random_suffix());
        match pods_api.create(&PostParams::default(), &pod).await {
            Ok(p) => {
                let pod = p.metadata.name.unwrap_or_default();
                record(
                    &ctx.client,
                    "deployment-controller",
                    d,
                    false,
                    "SuccessfulCreate",
                    format!("Created pod: {pod}"),
                )
                .await;
                created.push(pod);
            }
            Err(e) => {
                result = Err(e.into());
                break;
            }
        }
    }
    for victim in &todo.delete {
        match pods_api.delete(victim, &DeleteParams::background()).await {
            Ok(_) => {
                record(
                    &ctx.client,
                    "deployment-controller",
                    d,
                    false,
                    "SuccessfulDelete",
                    format!("Deleted pod: {victim}"),
                )
                .await;
                deleted.push(victim.clone());
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                result = Err(e.into());
                break;
            }
        }
    }
    if !created.is_empty() || !deleted.is_empty() {
        tracing::info!(deployment = %name, namespace = %ns, created = created.len(), deleted = deleted.len(), "deployment pods");
    }
    expectations.expect(&uid, created, deleted);
    result?;
    if todo == Plan::default() {
        let want = status(d, &hash, &live);
        if status_differs(d, &want) {
            let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({"status": want})))
                .await
            {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Binds a pod to a node as the scheduler does: a `Binding` posted to the pod's `binding`
/// subresource (a real API server forbids changing `spec.nodeName` otherwise). A server
/// without that subresource (404 for the path, not the pod; or 405) gets `spec.nodeName` set by a patch.
async fn bind(api: &Api<Pod>, name: &str, namespace: &str, node: &str) -> Result<(), kube::Error> {
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name, "namespace": namespace},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    match api
        .create_subresource::<_, serde_json::Value>("binding", name, &PostParams::default(), &binding)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s))
            if s.code == 405 || (s.code == 404 && s.message.contains("could not find the requested resource")) =>
        {
            let patch = json!({"spec": {"nodeName": node}});
            api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// Whether `tolerations` tolerate `taint` (the Kubernetes rules: empty key with `Exists`
/// tolerates everything; empty effect matches every effect).
pub fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let effect_ok = t.effect.as_deref().is_none_or(|e| e.is_empty() || e == taint.effect);
        let exists = t.operator.as_deref() == Some("Exists");
        let key_ok = match t.key.as_deref() {
            None | Some("") => exists,
            Some(k) => k == taint.key,
        };
        let value_ok = exists || t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("");
        effect_ok && key_ok && value_ok
    })
}

/// Whether `pod` may run on `node`: Ready, schedulable, taints tolerated, selector matched.
pub fn fits(pod: &Pod, node: &Node) -> bool {
    let spec = pod.spec.clone().unwrap_or_default();
    let node_spec = node.spec.clone().unwrap_or_default();
    if !nodes::is_ready(node) || node_spec.unschedulable == Some(true) {
        return false;
    }
    let tolerations = spec.tolerations.unwrap_or_default();
    let blocked = node_spec
        .taints
        .iter()
        .flatten()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .any(|t| !tolerates(&tolerations, t));
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let selected = spec
        .node_selector
        .unwrap_or_default()
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v));
    !blocked && selected
}

/// The node for `pod`: among those it fits, the one with the fewest pods (by name on ties).
pub fn pick_node<'a>(pod: &Pod, nodes: &'a [Arc<Node>], load: &BTreeMap<String, usize>) -> Option<&'a Node> {
    nodes
        .iter()
        .filter(|n| fits(pod, n))
        .min_by_key(|n| {
            let name = n.metadata.name.clone().unwrap_or_default();
            (load.get(&name).copied().unwrap_or(0), name)
        })
        .map(|n| n.as_ref())
}

pub(crate) async fn run_scheduler(ctx: Arc<Context>) {
    let c = Arc::clone(&ctx);
    control_loop(ctx, "scheduler", move || {
        let ctx = Arc::clone(&c);
        async move { schedule(&ctx).await }
    })
    .await;
}

async fn schedule(ctx: &Context) -> Result<()> {
    let pods = ctx.pods.state();
    let nodes = ctx.nodes.state();
    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    for p in &pods {
        if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
            *load.entry(n).or_default() += 1;
        }
    }
    let mut pending: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| {
            let spec = p.spec.as_ref();
            p.metadata.deletion_timestamp.is_none()
                && spec.is_some_and(|s| s.node_name.is_none())
                && spec
                    .and_then(|s| s.scheduler_name.as_deref())
                    .is_none_or(|s| s == SCHEDULER_NAME)
        })
        .collect();
    pending.sort_by(|a, b| a.metadata.creation_timestamp.cmp(&b.metadata.creation_timestamp));
    let mut first_error = None;
    for pod in pending {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        let Some(node) = pick_node(pod, &nodes, &load) else {
            let already = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "PodScheduled" && c.reason.as_deref() == Some("Unschedulable"))
                });
            if !already {
                let cond = json!({"status": {"conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": "0 nodes are available: no Ready node whose taints the pod tolerates",
                    "lastTransitionTime": now(),
                }]}});
                match api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(cond))
                    .await
                {
                    Ok(_) => {
                        let note = "0 nodes are available: no Ready node whose taints the pod tolerates".to_string();
                        record(
                            &ctx.client,
                            SCHEDULER_NAME,
                            pod.as_ref(),
                            true,
                            "FailedScheduling",
                            note,
                        )
                        .await;
                    }
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => {
                        first_error.get_or_insert(e.into());
                    }
                }
            }
            continue;
        };
        let node_name = node.metadata.name.clone().unwrap_or_default();
        match bind(&api, &name, &ns, &node_name).await {
            Ok(()) => {
                tracing::debug!(pod = %name, node = %node_name, "pod scheduled");
                let note = format!("Successfully assigned {ns}/{name} to {node_name}");
                record(&ctx.client, SCHEDULER_NAME, pod.as_ref(), false, "Scheduled", note).await;
                *load.entry(node_name).or_default() += 1;
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                first_error.get_or_insert(e.into());
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DeploymentSpec;
    use k8s_openapi::api::core::v1::{Container, NodeCondition, NodeSpec, NodeStatus, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    fn owned(name: &str, hash: &str, ready: bool) -> OwnedPod {
        OwnedPod {
            name: name.into(),
            hash: hash.into(),
            ready,
            scheduled: true,
        }
    }

    #[test]
    fn scales_up_and_down() {
        assert_eq!(
            plan(3, "h", &[]),
            Plan {
                create: 3,
                delete: vec![]
            }
        );
        let pods = vec![owned("a", "h", true), owned("b", "h", false), owned("c", "h", true)];
        let p = plan(1, "h", &pods);
        assert_eq!(p.create, 0);
        assert_eq!(p.delete.len(), 2);
        assert!(p.delete.contains(&"b".to_string()), "not-ready pods go first");
        assert_eq!(plan(3, "h", &pods), Plan::default());
    }

    #[test]
    fn rolls_keeping_ready_pods_until_replaced() {
        let old = vec![owned("o1", "old", true), owned("o2", "old", true)];
        let p = plan(2, "new", &old);
        assert_eq!(
            p,
            Plan {
                create: 2,
                delete: vec![]
            },
            "surge first"
        );
        let mut pods = old.clone();
        pods.push(owned("n1", "new", true));
        pods.push(owned("n2", "new", false));
        let p = plan(2, "new", &pods);
        assert_eq!((p.create, p.delete.len()), (0, 1), "one new ready: one old goes");
        pods.retain(|p| p.name != "n2");
        pods.push(owned("n2", "new", true));
        let p = plan(2, "new", &pods);
        assert_eq!(p.delete.len(), 2, "all new ready: all old go");
        let p = plan(2, "new", &[owned("o1", "old", false), owned("n1", "new", false)]);
        assert_eq!(
            p,
            Plan {
                create: 1,
                delete: vec!["o1".into()]
            },
            "a not-ready old pod goes at once"
        );
    }

    fn deployment(image: &str) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("d-uid".into()),
                generation: Some(2),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(3),
                selector: LabelSelector {
                    match_labels: Some(BTreeMap::from([("app".into(), "web".into())])),
                    ..Default::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(BTreeMap::from([("app".into(), "web".into())])),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "c".into(),
                            image: Some(image.into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn template_hash_is_stable_and_follows_the_template() {
        let a = deployment("a");
        let h = template_hash(&a.spec.as_ref().unwrap().template);
        assert_eq!(h.len(), 10);
        assert_eq!(h, template_hash(&deployment("a").spec.unwrap().template));
        assert_ne!(h, template_hash(&deployment("b").spec.unwrap().template));
    }

    #[test]
    fn pods_carry_owner_labels_and_hash() {
        let d = deployment("a");
        let p = new_pod(&d, "hhhh", "xyz12");
        assert_eq!(p.metadata.name.as_deref(), Some("web-hhhh-xyz12"));
        let labels = p.metadata.labels.clone().unwrap();
        assert_eq!(labels["app"], "web");
        assert_eq!(labels[TEMPLATE_HASH_LABEL], "hhhh");
        let owner = &p.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("Deployment", "d-uid", Some(true))
        );
        assert_eq!(controller_uid(&p), Some("d-uid"));
    }

    #[test]
    fn status_reports_rollout_progress() {
        let d = deployment("a");
        let s = status(
            &d,
            "h",
            &[owned("a", "h", true), owned("b", "h", true), owned("c", "old", true)],
        );
        assert_eq!(
            (
                s["replicas"].as_i64(),
                s["updatedReplicas"].as_i64(),
                s["readyReplicas"].as_i64()
            ),
            (Some(3), Some(2), Some(3))
        );
        assert_eq!(s["observedGeneration"], 2);
        assert_eq!(s["conditions"][1]["reason"], "ReplicaSetUpdated");
        let s = status(
            &d,
            "h",
            &[owned("a", "h", true), owned("b", "h", true), owned("c", "h", true)],
        );
        assert_eq!(s["conditions"][0]["status"], "True");
        assert_eq!(s["conditions"][1]["reason"], "NewReplicaSetAvailable");
        let mut d2 = d.clone();
        d2.status = Some(serde_json::from_value(s.clone()).unwrap());
        assert!(!status_differs(&d2, &s));
        assert!(status_differs(&d, &s));
    }

    fn node(name: &str, ready: bool, taints: Vec<Taint>) -> Arc<Node> {
        Arc::new(Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([("zone".into(), name.into())])),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: Some(taints),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        })
    }

    fn taint(key: &str) -> Taint {
        Taint {
            key: key.into(),
            value: Some("true".into()),
            effect: "NoSchedule".into(),
            time_added: None,
        }
    }

    fn pod(tolerations: Vec<Toleration>, selector: Option<(&str, &str)>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                tolerations: Some(tolerations),
                node_selector: selector.map(|(k, v)| BTreeMap::from([(k.to_string(), v.to_string())])),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn uninitialized_taint_blocks_until_removed_or_tolerated() {
        let nodes = vec![node("w1", true, vec![taint(super::super::UNINITIALIZED_TAINT)])];
        assert!(pick_node(&pod(vec![], None), &nodes, &BTreeMap::new()).is_none());
        let tol = Toleration {
            key: Some(super::super::UNINITIALIZED_TAINT.into()),
            operator: Some("Exists".into()),
            ..Default::default()
        };
        assert!(pick_node(&pod(vec![tol], None), &nodes, &BTreeMap::new()).is_some());
        let everything = Toleration {
            operator: Some("Exists".into()),
            ..Default::default()
        };
        assert!(tolerates(&[everything], &taint("anything")));
        let wrong_value = Toleration {
            key: Some("k".into()),
            operator: Some("Equal".into()),
            value: Some("other".into()),
            ..Default::default()
        };
        assert!(!tolerates(&[wrong_value], &taint("k")));
    }

    #[test]
    fn picks_ready_matching_least_loaded_nodes() {
        let nodes = vec![
            node("w1", true, vec![]),
            node("w2", true, vec![]),
            node("w3", false, vec![]),
        ];
        let load = BTreeMap::from([("w1".to_string(), 2), ("w2".to_string(), 1)]);
        let chosen = pick_node(&pod(vec![], None), &nodes, &load).unwrap();
        assert_eq!(chosen.metadata.name.as_deref(), Some("w2"));
        let chosen = pick_node(&pod(vec![], Some(("zone", "w1"))), &nodes, &load).unwrap();
        assert_eq!(chosen.metadata.name.as_deref(), Some("w1"));
        assert!(
            pick_node(&pod(vec![], Some(("zone", "w3"))), &nodes, &load).is_none(),
            "w3 is not ready"
        );
    }
}

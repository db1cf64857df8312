//! The EndpointSlice controller: for every Service with a selector, slices listing the
//! matching pods that have an IP, as the real controller writes them: `ready`, `serving`
//! and `terminating` conditions, `nodeName`, `targetRef`, ports by name (a named
//! `targetPort` resolved per pod, pods grouped by their resolved ports), at most 100
//! endpoints per slice, labels `kubernetes.io/service-name` and
//! `endpointslice.kubernetes.io/managed-by`, owned by the Service.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use super::{Context, Expectations, Result, control_loop, is_not_found, pods, random_suffix};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
/// Most endpoints in one slice (the real controller's default).
pub const MAX_ENDPOINTS: usize = 100;

/// What one slice holds.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceContent {
    /// `IPv4` or `IPv6`: a slice holds the addresses of one family (immutable once
    /// written, as the API server keeps it).
    pub address_type: String,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

impl Default for SliceContent {
    fn default() -> Self {
        Self {
            address_type: IPV4.into(),
            ports: Vec::new(),
            endpoints: Vec::new(),
        }
    }
}

impl SliceContent {
    fn of(slice: &EndpointSlice) -> Self {
        normalize(SliceContent {
            address_type: slice.address_type.clone(),
            ports: slice.ports.clone().unwrap_or_default(),
            endpoints: slice.endpoints.clone(),
        })
    }
}

const IPV4: &str = "IPv4";
const IPV6: &str = "IPv6";

/// The address families whose endpoints a Service gets slices for: its `ipFamilies`
/// (IPv4 when unset), as the controller does.
fn service_families(svc: &Service) -> Vec<String> {
    let families: Vec<String> = svc
        .spec
        .as_ref()
        .and_then(|s| s.ip_families.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|f| f == IPV4 || f == IPV6)
        .collect();
    if families.is_empty() {
        vec![IPV4.into()]
    } else {
        families
    }
}

/// The pod's address of `family` (`status.podIPs`, else `status.podIP`).
fn pod_address(pod: &Pod, family: &str) -> Option<String> {
    let status = pod.status.as_ref()?;
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.clone());
    let all: Vec<String> = listed
        .chain(status.pod_ip.clone())
        .filter(|ip| !ip.is_empty())
        .collect();
    all.into_iter().find(|ip| match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => family == IPV4,
        Ok(std::net::IpAddr::V6(_)) => family == IPV6,
        Err(_) => false,
    })
}

/// Empty names as absent ones, so what the server returns compares equal to what we wrote.
fn normalize(mut c: SliceContent) -> SliceContent {
    for p in &mut c.ports {
        if p.name.as_deref() == Some("") {
            p.name = None;
        }
    }
    c
}

/// Whether a pod's label set matches a Service's selector.
pub fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.as_ref();
    selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The port a Service port reaches on `pod`; `None` when a named target port is not
/// declared there.
fn resolve(port: &ServicePort, pod: &Pod) -> Option<i32> {
    let proto = port.protocol.as_deref().unwrap_or("TCP");
    match &port.target_port {
        None => Some(port.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => pod.spec.as_ref()?.containers.iter().find_map(|c| {
            c.ports.iter().flatten().find_map(|p| {
                (p.name.as_deref() == Some(name.as_str()) && p.protocol.as_deref().unwrap_or("TCP") == proto)
                    .then_some(p.container_port)
            })
        }),
    }
}

/// The slices a Service should have given `pods`, per address family of the Service
/// (its `ipFamilies` order); `None` when the controller does not manage its endpoints
/// (no selector, or ExternalName).
pub fn desired_slices(svc: &Service, pods: &[Arc<Pod>]) -> Option<Vec<SliceContent>> {
    let spec = svc.spec.as_ref()?;
    spec.selector.as_ref().filter(|s| !s.is_empty())?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let mut out = Vec::new();
    for family in service_families(svc) {
        out.extend(family_slices(svc, pods, &family));
    }
    Some(out)
}

/// The slices of one address family: the matching pods' addresses of that family, or a
/// placeholder (as the real controller, so consumers see "no endpoints").
fn family_slices(svc: &Service, pods: &[Arc<Pod>], family: &str) -> Vec<SliceContent> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let Some(selector) = spec.selector.as_ref() else {
        return Vec::new();
    };
    let namespace = svc.metadata.namespace.as_deref().unwrap_or_default();
    let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
    let mut groups: BTreeMap<Vec<(String, String, i32)>, Vec<Endpoint>> = BTreeMap::new();
    let mut matching: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(namespace) && selects(selector, p))
        .collect();
    matching.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    for pod in matching {
        let status = pod.status.clone().unwrap_or_default();
        let Some(ip) = pod_address(pod, family) else {
            continue;
        };
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            continue;
        }
        let key: Vec<(String, String, i32)> = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let target = resolve(p, pod)?;
                Some((
                    p.name.clone().unwrap_or_default(),
                    p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    target,
                ))
            })
            .collect();
        if key.is_empty() && spec.ports.as_ref().is_some_and(|p| !p.is_empty()) {
            continue;
        }
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let ready = pods::is_ready(pod);
        groups.entry(key).or_default().push(Endpoint {
            addresses: vec![ip],
            conditions: Some(EndpointConditions {
                ready: Some(publish_not_ready || (ready && !terminating)),
                serving: Some(ready),
                terminating: Some(terminating),
            }),
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                namespace: pod.metadata.namespace.clone(),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let mut out = Vec::new();
    for (key, endpoints) in groups {
        let ports: Vec<EndpointPort> = key
            .into_iter()
            .map(|(name, protocol, port)| EndpointPort {
                name: Some(name),
                protocol: Some(protocol),
                port: Some(port),
                app_protocol: None,
            })
            .collect();
        for chunk in endpoints.chunks(MAX_ENDPOINTS) {
            out.push(normalize(SliceContent {
                address_type: family.to_string(),
                ports: ports.clone(),
                endpoints: chunk.to_vec(),
            }));
        }
    }
    if out.is_empty() {
        out.push(SliceContent {
            address_type: family.to_string(),
            ..SliceContent::default()
        });
    }
    out
}

/// One write of the plan.
#[derive(Debug, Clone, PartialEq)]
pub enum SliceAction {
    Create(SliceContent),
    Update { name: String, content: SliceContent },
    Delete(String),
}

/// The writes that turn the `existing` slices (name, content) into `desired`: slices that
/// already hold a wanted content stay, the others are reused for the rest, then created
/// or deleted.
pub fn plan(existing: &[(String, SliceContent)], desired: Vec<SliceContent>) -> Vec<SliceAction> {
    let mut free: Vec<&(String, SliceContent)> = existing.iter().collect();
    let mut rest = Vec::new();
    for want in desired {
        if let Some(i) = free.iter().position(|(_, have)| *have == want) {
            free.remove(i);
        } else {
            rest.push(want);
        }
    }
    let mut actions = Vec::new();
    for want in rest {
        // A slice's address type never changes: only one of the same family is reused.
        match free.iter().position(|(_, have)| have.address_type == want.address_type) {
            Some(i) => actions.push(SliceAction::Update {
                name: free.remove(i).0.clone(),
                content: want,
            }),
            None => actions.push(SliceAction::Create(want)),
        }
    }
    actions.extend(free.into_iter().map(|(name, _)| SliceAction::Delete(name.clone())));
    actions
}

fn slice_name(service: &str) -> String {
    // Names are at most 253 characters; keep room for "-" and the suffix.
    let base: String = service.chars().take(57).collect();
    format!("{base}-{}", random_suffix())
}

fn labels(svc: &Service) -> BTreeMap<String, String> {
    let mut labels = svc.metadata.labels.clone().unwrap_or_default();
    labels.insert(SERVICE_NAME_LABEL.into(), svc.metadata.name.clone().unwrap_or_default());
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    labels
}

fn api_ports(content: &SliceContent) -> Vec<EndpointPort> {
    content
        .ports
        .iter()
        .map(|p| EndpointPort {
            name: Some(p.name.clone().unwrap_or_default()),
            ..p.clone()
        })
        .collect()
}

fn new_slice(svc: &Service, name: String, content: &SliceContent) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: svc.metadata.namespace.clone(),
            labels: Some(labels(svc)),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Service".into(),
                name: svc.metadata.name.clone().unwrap_or_default(),
                uid: svc.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        address_type: content.address_type.clone(),
        endpoints: content.endpoints.clone(),
        ports: Some(api_ports(content)),
    }
}

fn managed(slice: &EndpointSlice) -> Option<(String, String)> {
    let labels = slice.metadata.labels.as_ref()?;
    if labels.get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY) {
        return None;
    }
    Some((
        slice.metadata.namespace.clone()?,
        labels.get(SERVICE_NAME_LABEL)?.clone(),
    ))
}

pub(crate) async fn run(ctx: Arc<Context>) {
    let expectations = Arc::new(Expectations::new(Duration::from_secs(5)));
    let c = Arc::clone(&ctx);
    control_loop(ctx, "endpointslices", move || {
        let (ctx, expectations) = (Arc::clone(&c), Arc::clone(&expectations));
        async move { reconcile(&ctx, &expectations).await }
    })
    .await;
}

async fn reconcile(ctx: &Context, expectations: &Expectations) -> Result<()> {
    let services = ctx.services.state();
    let pods = ctx.pods.state();
    let slices = ctx.slices.state();
    let mut by_service: BTreeMap<(String, String), Vec<Arc<EndpointSlice>>> = BTreeMap::new();
    for slice in &slices {
        if let Some(key) = managed(slice) {
            by_service.entry(key).or_default().push(Arc::clone(slice));
        }
    }
    let slice_names: HashSet<(String, String)> = slices
        .iter()
        .map(|s| {
            (
                s.metadata.namespace.clone().unwrap_or_default(),
                s.metadata.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    let mut first_error = None;
    let mut handled = HashSet::new();
    for svc in &services {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let uid = svc.metadata.uid.clone().unwrap_or_default();
        let Some(desired) = desired_slices(svc, &pods) else {
            continue;
        };
        handled.insert((ns.clone(), name.clone()));
        if svc.metadata.deletion_timestamp.is_some()
            || !expectations.satisfied(&uid, |n| slice_names.contains(&(ns.clone(), n.to_string())))
        {
            continue;
        }
        let mut existing: Vec<(String, SliceContent)> = by_service
            .get(&(ns.clone(), name.clone()))
            .into_iter()
            .flatten()
            .map(|s| (s.metadata.name.clone().unwrap_or_default(), SliceContent::of(s)))
            .collect();
        existing.sort_by(|a, b| a.0.cmp(&b.0));
        let actions = plan(&existing, desired);
        if actions.is_empty() {
            continue;
        }
        if let Err(e) = apply(ctx, svc, actions, expectations, &uid).await {
            first_error.get_or_insert(e);
        }
    }
    let uids: HashSet<&str> = services.iter().filter_map(|s| s.metadata.uid.as_deref()).collect();
    expectations.retain(|uid| uids.contains(uid));
    // Slices we manage whose Service is gone or no longer has a selector.
    for ((ns, svc), slices) in &by_service {
        if handled.contains(&(ns.clone(), svc.clone())) {
            continue;
        }
        let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), ns);
        for s in slices {
            let name = s.metadata.name.clone().unwrap_or_default();
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    first_error.get_or_insert(e.into());
                }
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn apply(
    ctx: &Context,
    svc: &Service,
    actions: Vec<SliceAction>,
    expectations: &Expectations,
    uid: &str,
) -> Result<()> {
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let service = svc.metadata.name.clone().unwrap_or_default();
    let (mut created, mut deleted) = (Vec::new(), Vec::new());
    let mut result = Ok(());
    for action in actions {
        let step = match &action {
            SliceAction::Create(content) => {
                let name = slice_name(&service);
                let r = api
                    .create(&PostParams::default(), &new_slice(svc, name.clone(), content))
                    .await;
                if r.is_ok() {
                    created.push(name);
                }
                r.map(|_| ())
            }
            SliceAction::Update { name, content } => {
                let patch = json!({
                    "metadata": {"labels": labels(svc)},
                    "ports": api_ports(content),
                    "endpoints": content.endpoints,
                });
                api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .map(|_| ())
            }
            SliceAction::Delete(name) => match api.delete(name, &DeleteParams::default()).await {
                Ok(_) => {
                    deleted.push(name.clone());
                    Ok(())
                }
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(e),
            },
        };
        if let Err(e) = step {
            result = Err(e.into());
            break;
        }
    }
    tracing::debug!(namespace = %ns, service = %service, created = created.len(), deleted = deleted.len(), "endpoint slices written");
    expectations.expect(uid, created, deleted);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodCondition, PodSpec, PodStatus, ServiceSpec};

    fn svc(selector: &[(&str, &str)], ports: Vec<ServicePort>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("svc-uid".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                selector: Some(selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ports: Some(ports),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn sport(name: Option<&str>, port: i32, target: Option<IntOrString>) -> ServicePort {
        ServicePort {
            name: name.map(String::from),
            port,
            protocol: Some("TCP".into()),
            target_port: target,
            ..Default::default()
        }
    }

    fn pod(name: &str, ip: Option<&str>, ready: bool, named_port: Option<(&str, i32)>) -> Arc<Pod> {
        Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                uid: Some(format!("uid-{name}")),
                labels: Some(BTreeMap::from([("app".to_string(), "web".to_string())])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("w1".into()),
                containers: vec![Container {
                    name: "c".into(),
                    ports: named_port.map(|(n, p)| {
                        vec![ContainerPort {
                            name: Some(n.into()),
                            container_port: p,
                            ..Default::default()
                        }]
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: ip.map(String::from),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        })
    }

    fn ready_flags(c: &SliceContent) -> Vec<(String, bool)> {
        c.endpoints
            .iter()
            .map(|e| (e.addresses[0].clone(), e.conditions.as_ref().unwrap().ready.unwrap()))
            .collect()
    }

    #[test]
    fn selects_pods_with_ips_and_marks_readiness() {
        let s = svc(&[("app", "web")], vec![sport(None, 80, Some(IntOrString::Int(8080)))]);
        let pods = vec![
            pod("b", Some("127.244.1.2"), false, None),
            pod("a", Some("127.244.1.1"), true, None),
            pod("c", None, true, None),
        ];
        let slices = desired_slices(&s, &pods).unwrap();
        assert_eq!(slices.len(), 1);
        assert_eq!(
            ready_flags(&slices[0]),
            vec![("127.244.1.1".into(), true), ("127.244.1.2".into(), false)]
        );
        assert_eq!(slices[0].ports[0].port, Some(8080));
        assert_eq!(slices[0].endpoints[0].node_name.as_deref(), Some("w1"));
        assert_eq!(
            slices[0].endpoints[0].target_ref.as_ref().unwrap().name.as_deref(),
            Some("a")
        );
    }

    #[test]
    fn terminating_pods_serve_but_are_not_ready() {
        let s = svc(&[("app", "web")], vec![sport(None, 80, None)]);
        let mut p = (*pod("a", Some("127.244.1.1"), true, None)).clone();
        p.metadata.deletion_timestamp = Some(crate::cluster::now());
        let slices = desired_slices(&s, &[Arc::new(p)]).unwrap();
        let c = slices[0].endpoints[0].conditions.clone().unwrap();
        assert_eq!(
            (c.ready, c.serving, c.terminating),
            (Some(false), Some(true), Some(true))
        );
        assert_eq!(slices[0].ports[0].port, Some(80), "no targetPort: the port");
    }

    #[test]
    fn named_target_ports_resolve_per_pod_and_group() {
        let s = svc(
            &[("app", "web")],
            vec![sport(Some("http"), 80, Some(IntOrString::String("web".into())))],
        );
        let pods = vec![
            pod("a", Some("127.244.1.1"), true, Some(("web", 8080))),
            pod("b", Some("127.244.1.2"), true, Some(("web", 9090))),
            pod("c", Some("127.244.1.3"), true, Some(("other", 7070))),
        ];
        let slices = desired_slices(&s, &pods).unwrap();
        assert_eq!(slices.len(), 2);
        let ports: Vec<i32> = slices.iter().map(|s| s.ports[0].port.unwrap()).collect();
        assert_eq!(ports, vec![8080, 9090]);
        assert!(slices.iter().all(|s| s.ports[0].name.as_deref() == Some("http")));
    }

    #[test]
    fn at_most_100_endpoints_per_slice() {
        let s = svc(&[("app", "web")], vec![sport(None, 80, None)]);
        let pods: Vec<Arc<Pod>> = (0..250)
            .map(|i| {
                pod(
                    &format!("p{i:03}"),
                    Some(&format!("127.244.{}.{}", i / 200, i % 200)),
                    true,
                    None,
                )
            })
            .collect();
        let slices = desired_slices(&s, &pods).unwrap();
        let sizes: Vec<usize> = slices.iter().map(|s| s.endpoints.len()).collect();
        assert_eq!(sizes, vec![100, 100, 50]);
    }

    #[test]
    fn no_selector_is_not_managed_and_no_pods_is_a_placeholder() {
        let mut s = svc(&[], vec![sport(None, 80, None)]);
        assert_eq!(desired_slices(&s, &[]), None);
        s.spec.as_mut().unwrap().selector = Some(BTreeMap::from([("app".into(), "none".into())]));
        assert_eq!(
            desired_slices(&s, &[pod("a", Some("127.244.1.1"), true, None)]),
            Some(vec![SliceContent::default()])
        );
    }

    #[test]
    fn plan_keeps_equal_slices_reuses_others_and_deletes_the_rest() {
        let a = SliceContent {
            address_type: IPV4.into(),
            ports: vec![],
            endpoints: vec![Endpoint {
                addresses: vec!["1".into()],
                ..Default::default()
            }],
        };
        let b = SliceContent {
            address_type: IPV4.into(),
            ports: vec![],
            endpoints: vec![Endpoint {
                addresses: vec!["2".into()],
                ..Default::default()
            }],
        };
        let c = SliceContent {
            address_type: IPV4.into(),
            ports: vec![],
            endpoints: vec![Endpoint {
                addresses: vec!["3".into()],
                ..Default::default()
            }],
        };
        let existing = vec![("s1".to_string(), a.clone()), ("s2".to_string(), b.clone())];
        assert_eq!(plan(&existing, vec![a.clone(), b.clone()]), vec![]);
        assert_eq!(plan(&existing, vec![b.clone()]), vec![SliceAction::Delete("s1".into())]);
        assert_eq!(
            plan(&existing, vec![c.clone(), a.clone()]),
            vec![SliceAction::Update {
                name: "s2".into(),
                content: c.clone()
            }]
        );
        assert_eq!(plan(&[], vec![c.clone()]), vec![SliceAction::Create(c)]);
    }

    #[test]
    fn written_slices_carry_labels_owner_and_api_port_names() {
        let s = svc(&[("app", "web")], vec![sport(None, 80, None)]);
        let content = desired_slices(&s, &[pod("a", Some("127.244.1.1"), true, None)])
            .unwrap()
            .remove(0);
        let slice = new_slice(&s, "web-abcde".into(), &content);
        let labels = slice.metadata.labels.clone().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "web");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(slice.metadata.owner_references.as_ref().unwrap()[0].uid, "svc-uid");
        assert_eq!(slice.ports.as_ref().unwrap()[0].name.as_deref(), Some(""));
        assert_eq!(SliceContent::of(&slice), content, "what we write reads back equal");
        assert_eq!(managed(&slice), Some(("default".into(), "web".into())));
    }

    #[test]
    fn a_dual_stack_service_gets_one_slice_per_family_in_its_order() {
        let mut s = svc(&[("app", "web")], vec![sport(None, 80, None)]);
        s.spec.as_mut().unwrap().ip_families = Some(vec!["IPv6".into(), "IPv4".into()]);
        let mut a = (*pod("a", Some("127.244.1.1"), true, None)).clone();
        a.status.as_mut().unwrap().pod_ips = Some(vec![
            k8s_openapi::api::core::v1::PodIP {
                ip: "127.244.1.1".into(),
            },
            k8s_openapi::api::core::v1::PodIP {
                ip: "fd00:244:1::1".into(),
            },
        ]);
        let slices = desired_slices(&s, &[Arc::new(a)]).unwrap();
        let seen: Vec<(&str, &str)> = slices
            .iter()
            .map(|c| (c.address_type.as_str(), c.endpoints[0].addresses[0].as_str()))
            .collect();
        assert_eq!(seen, [("IPv6", "fd00:244:1::1"), ("IPv4", "127.244.1.1")]);
        let written = new_slice(&s, "web-v6".into(), &slices[0]);
        assert_eq!(written.address_type, "IPv6");
        // Pods without an IPv6 address: the IPv6 family gets a placeholder.
        let slices = desired_slices(&s, &[pod("b", Some("127.244.1.2"), true, None)]).unwrap();
        assert_eq!(slices[0].address_type, "IPv6");
        assert!(slices[0].endpoints.is_empty());
        assert_eq!(slices[1].endpoints[0].addresses, ["127.244.1.2"]);
        // A slice is reused only for its own family.
        let existing = vec![("s4".to_string(), slices[1].clone())];
        let moved = SliceContent {
            address_type: "IPv6".into(),
            ..slices[1].clone()
        };
        assert_eq!(
            plan(&existing, vec![moved.clone()]),
            vec![SliceAction::Create(moved), SliceAction::Delete("s4".into())]
        );
    }
}

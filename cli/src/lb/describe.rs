//! `kuberaya lb describe`: one Service's load balancer, its Events, and what is wrong
//! with it (put together and printed by pure functions).

use std::collections::BTreeMap;

use anyhow::{anyhow, bail};
use k8s_openapi::api::core::v1::{Event, Service};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use kuberaya_ccm::annotations::{LbAnnotations, PREFIX};
use kuberaya_ccm::platform::{
    LABEL_SERVICE_NAME, LABEL_SERVICE_NAMESPACE, LABEL_SERVICE_UID, LbStatus, LoadBalancer, Platform,
};
use serde::Serialize;

use super::DescribeArgs;
use super::list::{backend_health, paint_status};
use super::platform::{cluster_labels, platform, platform_error};
use crate::kube::{KubeArgs, api_error, connect, is_not_found};
use crate::output::{Color, Style, render, table};

/// An Event of the Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventRow {
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
    pub message: String,
    pub count: i32,
}

/// `kuberaya lb describe` output.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LbDescribe {
    pub namespace: String,
    pub service: String,
    #[serde(rename = "type")]
    pub type_: String,
    pub ingress: Vec<String>,
    pub load_balancer_source_ranges: Vec<String>,
    /// `lb.cloudraya.com/*` annotations of the Service.
    pub annotations: BTreeMap<String, String>,
    pub annotation_error: Option<String>,
    pub load_balancer: Option<LoadBalancer>,
    pub healthy_backends: usize,
    pub backends: usize,
    pub conditions: Vec<String>,
    pub events: Vec<EventRow>,
    /// What is wrong, in words; empty when all is well.
    pub problems: Vec<String>,
}

/// What is wrong with a Service's load balancer.
pub fn diagnose(d: &LbDescribe) -> Vec<String> {
    let mut p = Vec::new();
    if d.type_ != "LoadBalancer" {
        p.push(format!(
            "the Service is of type {}, not LoadBalancer: no platform load balancer is made for it",
            d.type_
        ));
        return p;
    }
    if let Some(e) = &d.annotation_error {
        p.push(format!("invalid annotation: {e}"));
    }
    match &d.load_balancer {
        None => p.push(
            "no platform load balancer carries this Service's labels: the CCM has not created one yet; is it running? (see the Events below and the CCM's logs)"
                .into(),
        ),
        Some(lb) => {
            match &lb.status {
                LbStatus::Error => p.push(format!("the platform reports an error: {}", lb.status_message)),
                LbStatus::Provisioning | LbStatus::Updating => {
                    p.push(format!("the platform is still {} the load balancer", lb.status))
                }
                LbStatus::Deleting => p.push("the platform is deleting the load balancer".into()),
                _ => {}
            }
            if lb.backends.is_empty() {
                p.push("the load balancer has no backends: no Ready node is selected (check the nodes and lb.cloudraya.com/node-selector)".into());
            } else if d.healthy_backends == 0 {
                p.push("no backend is healthy: check the Service's endpoints (kubectl get endpointslices) and the health check".into());
            }
            if d.ingress.is_empty() && lb.public_ip.is_some() {
                p.push("the load balancer has a public IP but the Service's status does not show it yet: the CCM has not written it back".into());
            }
        }
    }
    for e in d.events.iter().filter(|e| e.type_ == "Warning") {
        p.push(format!("event {}: {}", e.reason, e.message));
    }
    p
}

pub fn describe_text(d: &LbDescribe, wide: bool, style: &Style) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{:<18}{v}\n", format!("{k}:")));
    line("Service", format!("{}/{}", d.namespace, d.service));
    line("Type", d.type_.clone());
    line(
        "Ingress",
        if d.ingress.is_empty() {
            "<pending>".into()
        } else {
            d.ingress.join(", ")
        },
    );
    line(
        "Source ranges",
        if d.load_balancer_source_ranges.is_empty() {
            "any".into()
        } else {
            d.load_balancer_source_ranges.join(", ")
        },
    );
    match &d.load_balancer {
        None => line("Load balancer", "none".into()),
        Some(lb) => {
            line("Load balancer", format!("{} ({})", lb.id, lb.name));
            line("Status", paint_status(style, lb.status.as_str()));
            if !lb.status_message.is_empty() {
                line("Message", lb.status_message.clone());
            }
            line(
                "Public IP",
                lb.public_ip
                    .as_ref()
                    .map(|p| format!("{} ({})", p.address, p.id))
                    .unwrap_or_else(|| "<pending>".into()),
            );
            line("Backends", format!("{}/{} healthy", d.healthy_backends, d.backends));
        }
    }
    if let Some(lb) = &d.load_balancer {
        s.push_str("Rules:\n");
        let mut headers = vec![
            "name",
            "protocol",
            "public",
            "private",
            "algorithm",
            "sources",
            "health-check",
        ];
        if wide {
            headers.push("interval");
        }
        let rows: Vec<Vec<String>> = lb
            .rules
            .iter()
            .map(|r| {
                let hc = r.health_check.as_ref().map(|h| h.with_defaults(r.private_port));
                let mut row = vec![
                    r.name.clone(),
                    r.protocol.to_string(),
                    r.public_port.to_string(),
                    r.private_port.to_string(),
                    r.algorithm.to_string(),
                    if r.allowed_sources.is_empty() {
                        "any".into()
                    } else {
                        r.allowed_sources
                            .iter()
                            .map(|n| n.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    },
                    match &hc {
                        None => format!("tcp:{}", r.private_port),
                        Some(h) => format!(
                            "{}:{}{}",
                            h.protocol,
                            h.port.unwrap_or(r.private_port),
                            h.path.clone().unwrap_or_default()
                        ),
                    },
                ];
                if wide {
                    row.push(
                        hc.and_then(|h| h.interval_s)
                            .map(|i| format!("{i}s"))
                            .unwrap_or_else(|| "-".into()),
                    );
                }
                row
            })
            .collect();
        indent(&mut s, &table(&headers, &rows));
        s.push_str("Backends:\n");
        let rows: Vec<Vec<String>> = lb
            .backends
            .iter()
            .map(|b| {
                let health: Vec<String> = lb
                    .health
                    .iter()
                    .filter(|h| h.vm_id == b.vm_id)
                    .map(|h| format!("{}={}", h.rule, h.state))
                    .collect();
                vec![
                    b.vm_id.clone(),
                    b.private_ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
                    if health.is_empty() {
                        "unknown".into()
                    } else {
                        health.join(",")
                    },
                ]
            })
            .collect();
        if rows.is_empty() {
            s.push_str("  none\n");
        } else {
            indent(&mut s, &table(&["vm", "private-ip", "health"], &rows));
        }
    }
    s.push_str("Annotations:\n");
    if d.annotations.is_empty() {
        s.push_str("  none (defaults)\n");
    }
    for (k, v) in &d.annotations {
        s.push_str(&format!("  {k}: {v}\n"));
    }
    if !d.conditions.is_empty() {
        s.push_str("Conditions:\n");
        for c in &d.conditions {
            s.push_str(&format!("  {c}\n"));
        }
    }
    s.push_str("Events:\n");
    if d.events.is_empty() {
        s.push_str("  none\n");
    } else {
        let rows: Vec<Vec<String>> = d
            .events
            .iter()
            .map(|e| {
                vec![
                    e.type_.clone(),
                    e.reason.clone(),
                    e.count.to_string(),
                    e.message.clone(),
                ]
            })
            .collect();
        indent(&mut s, &table(&["type", "reason", "count", "message"], &rows));
    }
    if d.problems.is_empty() {
        s.push_str("Problems:         none\n");
    } else {
        s.push_str("Problems:\n");
        for p in &d.problems {
            s.push_str(&format!("  - {}\n", style.paint(p, Color::Red)));
        }
    }
    s
}

fn indent(s: &mut String, t: &str) {
    for l in t.lines() {
        s.push_str("  ");
        s.push_str(l);
        s.push('\n');
    }
}

/// `NS/SVC`, or `SVC` in `-n NS` (default `default`).
pub fn parse_service_ref(s: &str, namespace: Option<&str>) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        None if !s.is_empty() => Ok((namespace.unwrap_or("default").to_string(), s.to_string())),
        _ => Err(format!("{s:?} is not NS/SVC or SVC")),
    }
}

pub(super) async fn describe(kube_args: &KubeArgs, a: DescribeArgs) -> anyhow::Result<()> {
    let (ns, name) = parse_service_ref(&a.service, kube_args.namespace.as_deref()).map_err(|e| anyhow!(e))?;
    let c = platform(&a.platform)?;
    let k = connect(kube_args).await?;
    let api: Api<Service> = Api::namespaced(k.client.clone(), &ns);
    let svc = match api.get(&name).await {
        Ok(s) => s,
        Err(e) if is_not_found(&e) => bail!("Service {ns}/{name} not found; see `kubectl get svc -n {ns}`"),
        Err(e) => return Err(api_error(e, &format!("reading Service {ns}/{name}"))),
    };
    let uid = svc.metadata.uid.clone().unwrap_or_default();
    let mut labels = cluster_labels(&c.cluster);
    labels.insert(LABEL_SERVICE_UID.into(), uid);
    let mut found = c
        .platform
        .list_load_balancers(&c.cluster, &labels)
        .await
        .map_err(|e| platform_error(e, "listing load balancers"))?;
    if found.is_empty() {
        let mut by_name = cluster_labels(&c.cluster);
        by_name.insert(LABEL_SERVICE_NAMESPACE.into(), ns.clone());
        by_name.insert(LABEL_SERVICE_NAME.into(), name.clone());
        found = c
            .platform
            .list_load_balancers(&c.cluster, &by_name)
            .await
            .map_err(|e| platform_error(e, "listing load balancers"))?;
    }
    let events: Api<Event> = Api::namespaced(k.client.clone(), &ns);
    let mut evs: Vec<Event> = events
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "listing Events"))?
        .items
        .into_iter()
        .filter(|e| {
            e.involved_object.kind.as_deref() == Some("Service") && e.involved_object.name.as_deref() == Some(&name)
        })
        .collect();
    evs.sort_by_key(|e| e.metadata.creation_timestamp.clone().map(|t| t.0));
    let d = describe_of(&svc, found.into_iter().next(), &evs);
    let style = Style::detect();
    print!(
        "{}",
        render(a.output.output, &d, |wide| describe_text(&d, wide, &style))?
    );
    Ok(())
}

/// How often an Event was seen: an events.k8s.io/v1 Event (what the CCM's Recorder
/// writes) counts its repeats in `series.count` and leaves the deprecated `count` unset;
/// an older one counts in `count`.
fn times_seen(e: &Event) -> i32 {
    let series = e.series.as_ref().and_then(|s| s.count);
    series.max(e.count).unwrap_or(1).max(1)
}

/// Put together what `describe` shows (pure).
pub fn describe_of(svc: &Service, lb: Option<LoadBalancer>, events: &[Event]) -> LbDescribe {
    let spec = svc.spec.clone().unwrap_or_default();
    let annotations = svc.annotations().clone();
    let ours: BTreeMap<String, String> = annotations
        .iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let annotation_error = LbAnnotations::parse(&annotations).err().map(|e| e.to_string());
    let (healthy, total) = lb.as_ref().map(backend_health).unwrap_or((0, 0));
    let status = svc.status.clone().unwrap_or_default();
    let mut d = LbDescribe {
        namespace: svc.namespace().unwrap_or_default(),
        service: svc.name_any(),
        type_: spec.type_.unwrap_or_else(|| "ClusterIP".into()),
        ingress: status
            .load_balancer
            .and_then(|l| l.ingress)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|i| i.ip.or(i.hostname))
            .collect(),
        load_balancer_source_ranges: spec.load_balancer_source_ranges.unwrap_or_default(),
        annotations: ours,
        annotation_error,
        load_balancer: lb,
        healthy_backends: healthy,
        backends: total,
        conditions: status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
            .collect(),
        events: events
            .iter()
            .map(|e| EventRow {
                type_: e.type_.clone().unwrap_or_else(|| "Normal".into()),
                reason: e.reason.clone().unwrap_or_default(),
                message: e.message.clone().unwrap_or_default().replace('\n', " "),
                count: times_seen(e),
            })
            .collect(),
        problems: Vec::new(),
    };
    d.problems = diagnose(&d);
    d
}

//! `kuberaya lb list`: one row per load balancer (the rows are pure).

use kuberaya_ccm::platform::{HealthState, LABEL_SERVICE_UID, LoadBalancer};
use serde::Serialize;

use super::ListArgs;
use super::platform::{cluster_lbs, platform, service_of};
use crate::kube::KubeArgs;
use crate::output::{Color, Style, render, table};

/// Backends whose every health entry is `healthy`, and all backends.
pub fn backend_health(lb: &LoadBalancer) -> (usize, usize) {
    let healthy = lb
        .backends
        .iter()
        .filter(|b| {
            let mine: Vec<_> = lb.health.iter().filter(|h| h.vm_id == b.vm_id).collect();
            !mine.is_empty() && mine.iter().all(|h| h.state == HealthState::Healthy)
        })
        .count();
    (healthy, lb.backends.len())
}

/// One LB in `lb list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LbRow {
    pub namespace: Option<String>,
    pub service: Option<String>,
    pub service_uid: Option<String>,
    pub public_ip: Option<String>,
    /// `80/tcp` for each rule's public port.
    pub ports: Vec<String>,
    pub id: String,
    pub name: String,
    pub status: String,
    pub status_message: String,
    pub healthy_backends: usize,
    pub backends: usize,
}

pub fn row_of(lb: &LoadBalancer) -> LbRow {
    let (healthy, total) = backend_health(lb);
    let svc = service_of(lb);
    LbRow {
        namespace: svc.as_ref().map(|s| s.0.clone()),
        service: svc.map(|s| s.1),
        service_uid: lb.labels.get(LABEL_SERVICE_UID).cloned(),
        public_ip: lb.public_ip.as_ref().map(|p| p.address.to_string()),
        ports: lb
            .rules
            .iter()
            .map(|r| format!("{}/{}", r.public_port, r.protocol))
            .collect(),
        id: lb.id.clone(),
        name: lb.name.clone(),
        status: lb.status.to_string(),
        status_message: lb.status_message.clone(),
        healthy_backends: healthy,
        backends: total,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LbList {
    pub items: Vec<LbRow>,
}

pub(super) fn paint_status(style: &Style, s: &str) -> String {
    match s {
        "active" => style.paint(s, Color::Green),
        "provisioning" | "updating" | "deleting" => style.paint(s, Color::Yellow),
        _ => style.paint(s, Color::Red),
    }
}

pub(super) fn endpoint(ip: &Option<String>, ports: &[String]) -> String {
    match ip {
        None => "<pending>".into(),
        Some(ip) if ports.is_empty() => ip.clone(),
        Some(ip) => ports.iter().map(|p| format!("{ip}:{p}")).collect::<Vec<_>>().join(","),
    }
}

pub fn list_table(list: &LbList, wide: bool, style: &Style) -> String {
    if list.items.is_empty() {
        return "No load balancers found.\n".into();
    }
    let mut headers = vec!["service", "public", "lb-id", "status", "backends"];
    if wide {
        headers.extend(["lb-name", "service-uid", "message"]);
    }
    let rows: Vec<Vec<String>> = list
        .items
        .iter()
        .map(|r| {
            let mut row = vec![
                match (&r.namespace, &r.service) {
                    (Some(ns), Some(s)) => format!("{ns}/{s}"),
                    _ => "-".into(),
                },
                endpoint(&r.public_ip, &r.ports),
                r.id.clone(),
                paint_status(style, &r.status),
                format!("{}/{}", r.healthy_backends, r.backends),
            ];
            if wide {
                row.push(r.name.clone());
                row.push(r.service_uid.clone().unwrap_or_else(|| "-".into()));
                row.push(if r.status_message.is_empty() {
                    "-".into()
                } else {
                    r.status_message.clone()
                });
            }
            row
        })
        .collect();
    table(&headers, &rows)
}

pub(super) async fn list(kube_args: &KubeArgs, a: ListArgs) -> anyhow::Result<()> {
    let c = platform(&a.platform)?;
    let lbs = cluster_lbs(&c).await?;
    let ns = if kube_args.all_namespaces {
        None
    } else {
        kube_args.namespace.clone()
    };
    let list = LbList {
        items: lbs
            .iter()
            .map(row_of)
            .filter(|r| ns.is_none() || r.namespace == ns)
            .collect(),
    };
    let style = Style::detect();
    print!(
        "{}",
        render(a.output.output, &list, |wide| list_table(&list, wide, &style))?
    );
    Ok(())
}
